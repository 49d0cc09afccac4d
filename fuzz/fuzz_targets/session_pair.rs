//! A host and a device Session talking through a cable that drops, duplicates, reorders and
//! corrupts packets as the fuzzer chooses, while both applications send, read and reset.
//!
//! Invariants: no panic; every stream is a prefix-exact copy of what was sent (each byte read at
//! stream offset k equals the sender's byte k) for as long as the connection lives and for the
//! data read after it ended — a fault may only ever end a connection, never alter its bytes;
//! pools stay bounded. Corruption is limited to header fields that carry no payload identity
//! (mux protocol, magic and sequence counters, TCP seq, data offset, window): usbmux has no
//! checksum, so a corrupted payload byte, port, flags byte (an RST turned into FIN|ACK makes its
//! reason text look like data) or — on the host's byte-stream side — mux length (a longer one
//! swallows the next packet's bytes as payload) is undetectable by design, not a bug of this
//! engine (`firmware-sim`'s fault table documents those outcomes).
#![no_main]

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usbmux_core::{Buffers, ConnId, Device, Duration, Event, Host, Instant, Session, SessionConfig};

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fault {
    Pass,
    Drop,
    Duplicate,
    Swap,
    Corrupt { at: u8, xor: u8 },
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    HostSend(u8, u16),
    DevSend(u8, u16),
    HostRead(u8, u16),
    DevRead(u8, u16),
    HostReset(u8),
    ToDevice(Fault),
    ToHost(Fault),
    Advance(u8),
}

fn byte_at(conn: usize, dir: usize, k: u64) -> u8 {
    (k.wrapping_mul(31).wrapping_add(conn as u64 * 7 + dir as u64 * 101) % 253) as u8
}

struct Stream {
    sent: u64,
    read: u64,
}

struct Conn {
    /// Stable identity of the connection's streams (indices shift when one is removed).
    tag: usize,
    host: ConnId,
    dev: Option<ConnId>,
    /// [host → device, device → host]
    streams: [Stream; 2],
}

fn corrupt(pkt: &mut [u8], at: u8, xor: u8) {
    // Mux protocol 0..4, magic and counters 8..16, TCP seq 20..24 (after a 16-byte header),
    // data offset 28, window 30..32.
    const FIELDS: [usize; 22] = [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 28, 30, 31, 28, 30, 31];
    let i = FIELDS[at as usize % FIELDS.len()];
    if let Some(b) = pkt.get_mut(i) {
        *b ^= xor | 1;
    }
}

fn deliver(q: &mut VecDeque<Vec<u8>>, fault: Fault) -> Vec<Vec<u8>> {
    let Some(mut p) = q.pop_front() else { return Vec::new() };
    match fault {
        Fault::Pass => vec![p],
        Fault::Drop => Vec::new(),
        Fault::Duplicate => vec![p.clone(), p],
        Fault::Swap => match q.pop_front() {
            Some(next) => vec![next, p],
            None => vec![p],
        },
        Fault::Corrupt { at, xor } => {
            corrupt(&mut p, at, xor);
            vec![p]
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut host = Box::new(Session::<Host, Vec<u8>, 4>::new(SessionConfig::default(), 1));
    let mut dev = Box::new(Session::<Device, Vec<u8>, 4, 0>::new(SessionConfig::default()));
    let mut now = Instant::ZERO;
    let mut conns: Vec<Conn> = Vec::new();
    let mut next_tag = 0usize;
    let mut to_dev: VecDeque<Vec<u8>> = VecDeque::new();
    let mut to_host: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    let mut scratch = vec![0u8; 65536];
    for op in ops.into_iter().take(300) {
        match op {
            Op::Connect => {
                if let Ok(id) = host.connect(7, Buffers::new(vec![0; 2048], vec![0; 2048])) {
                    next_tag += 1;
                    conns.push(Conn { tag: next_tag, host: id, dev: None, streams: [Stream { sent: 0, read: 0 }, Stream { sent: 0, read: 0 }] });
                }
            }
            Op::HostSend(i, n) | Op::DevSend(i, n) if !conns.is_empty() => {
                let host_side = matches!(op, Op::HostSend(..));
                let ci = i as usize % conns.len();
                let c = &mut conns[ci];
                let d = if host_side { 0 } else { 1 };
                let data: Vec<u8> = (0..u64::from(n % 4096)).map(|k| byte_at(c.tag, d, c.streams[d].sent + k)).collect();
                let r = if host_side { host.send(c.host, &data) } else if let Some(id) = c.dev { dev.send(id, &data) } else { Ok(0) };
                if let Ok(m) = r {
                    c.streams[d].sent += m as u64;
                }
            }
            Op::HostRead(i, n) | Op::DevRead(i, n) if !conns.is_empty() => {
                let host_side = matches!(op, Op::HostRead(..));
                let ci = i as usize % conns.len();
                let c = &mut conns[ci];
                let d = if host_side { 1 } else { 0 };
                let want = usize::from(n) % 4096 + 1;
                let r = if host_side { host.recv(c.host, &mut scratch[..want]) } else if let Some(id) = c.dev { dev.recv(id, &mut scratch[..want]) } else { Ok(0) };
                if let Ok(m) = r {
                    for (k, &b) in scratch[..m].iter().enumerate() {
                        let off = c.streams[d].read + k as u64;
                        assert!(off < c.streams[d].sent, "more bytes arrived than were sent");
                        assert_eq!(b, byte_at(c.tag, d, off), "byte {off} of stream {}/{d} altered", c.tag);
                    }
                    c.streams[d].read += m as u64;
                }
            }
            Op::HostReset(i) if !conns.is_empty() => {
                let ci = i as usize % conns.len();
                let c = conns.remove(ci);
                let _ = host.reset(c.host, "fuzz reset");
                if let Some(id) = c.dev {
                    let _ = dev.reset(id, "");
                }
            }
            Op::ToDevice(f) => {
                for p in deliver(&mut to_dev, f) {
                    dev.handle_transfer(now, &p);
                }
            }
            Op::ToHost(f) => {
                for p in deliver(&mut to_host, f) {
                    host.handle_transfer(now, &p);
                }
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms) * 10);
                host.handle_timeout(now);
                dev.handle_timeout(now);
            }
            _ => {}
        }
        for _ in 0..32 {
            match host.poll_transmit(now, &mut buf) {
                Ok(Some(t)) if to_dev.len() < 256 => to_dev.push_back(buf[..t.len].to_vec()),
                _ => break,
            }
        }
        for _ in 0..32 {
            match dev.poll_transmit(now, &mut buf) {
                Ok(Some(t)) if to_host.len() < 256 => to_host.push_back(buf[..t.len].to_vec()),
                _ => break,
            }
        }
        while host.poll_event().is_some() {}
        while let Some(e) = dev.poll_event() {
            if let Event::Incoming { id, .. } = e {
                // Pair the device's connection with the host's by port (a duplicated or
                // corrupted SYN can make an extra one, which is reset).
                if dev.accept(id, Buffers::new(vec![0; 2048], vec![0; 2048])).is_ok() {
                    let remote = dev.connection(id).map(|c| c.remote_port());
                    let owner = conns.iter_mut().find(|c| {
                        c.dev.is_none() && host.connection(c.host).map(|h| h.local_port()) == remote
                    });
                    match owner {
                        Some(c) => c.dev = Some(id),
                        None => {
                            let _ = dev.reset(id, "unexpected");
                        }
                    }
                }
            }
        }
        assert!(host.connection_count() <= 4);
        assert!(dev.connection_count() <= 4);
    }
});
