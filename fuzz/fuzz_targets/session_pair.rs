//! A host and a device Session talking through a cable that drops, duplicates, reorders and
//! corrupts packets as the fuzzer chooses, while both applications send, read and reset; input
//! format: `usbmux_fuzz::pair_ops`. After the fuzzer's operations the cable turns perfect and
//! both sides run (bounded) until nothing moves.
//!
//! Invariants:
//! - no panic;
//! - every stream is a prefix-exact copy of what was sent (each byte read at stream offset k
//!   equals the sender's byte k), also for data read after the connection ended — a fault may
//!   only ever end a connection, never alter its bytes; the host application takes some bytes
//!   straight from transfers (`handle_transfer_with`) and reads the rest, and both count as
//!   reads of the same stream;
//! - after the drain, a connection that is still established on both sides has delivered every
//!   byte sent on it, both ways (so a fault ends a connection or is recovered from, never
//!   leaves it silently stuck);
//! - data a side sends stays inside the window its peer advertised (the highest edge of any
//!   packet that reached it on that connection);
//! - receive queues never exceed their buffers, pools and cable queues stay bounded.
//!
//! Corruption is limited to header fields that carry no payload identity (mux protocol, magic
//! and sequence counters, TCP seq, data offset, window): usbmux has no checksum, so a corrupted
//! payload byte, port, flags byte (an RST turned into FIN|ACK makes its reason text look like
//! data) or — on the host's byte-stream side — mux length (a longer one swallows the next
//! packet's bytes as payload) is undetectable by design, not a bug of this engine
//! (`firmware-sim`'s fault table documents those outcomes).
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use usbmux_core::tcp::State;
use usbmux_core::wire::{mux, HeaderKind};
use usbmux_core::{
    Buffers, ConnId, Device, Duration, Event, Host, Instant, Session, SessionConfig,
};
use usbmux_fuzz::pair_ops::{decode, Fault, Op};
use usbmux_fuzz::window::{tcp_as, Edges};
use usbmux_fuzz::Reader;

const BUF: usize = 2048;

/// `FUZZ_TRACE=1` prints every packet and operation (for reading a crash:
/// `FUZZ_TRACE=1 target/x86_64-unknown-linux-gnu/release/session_pair CRASH_FILE`).
fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fn show(what: &str, version: Option<u32>, pkt: &[u8]) {
    if trace() {
        let kind = World::kind(version, pkt);
        eprintln!(
            "{what}: {}",
            usbmux_core::wire::Summary { bytes: pkt, kind }
        );
    }
}

type HostS = Session<Host, Vec<u8>, 4>;
type DevS = Session<Device, Vec<u8>, 4, 0>;

fn byte_at(conn: usize, dir: usize, k: u64) -> u8 {
    (k.wrapping_mul(31)
        .wrapping_add(conn as u64 * 7 + dir as u64 * 101)
        % 253) as u8
}

struct Stream {
    sent: u64,
    read: u64,
    /// Host → device only: bytes the host application holds outside the session and hands
    /// over through `poll_transmit_with`'s source (as the daemon reads client sockets straight
    /// into USB transfers); they join the stream (`sent`) when the source is asked for them.
    pending: u64,
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
    // The fields a corruption may hit, at their place in this packet's header form (a
    // negotiated v1 session has 8-byte headers, so TCP's fields sit 8 bytes earlier): the mux
    // protocol; a v2 header's magic and counters, or a VERSION body; TCP seq, data offset and
    // window. Everything else carries payload identity (see the module docs).
    let v2 = mux::detect_kind(pkt) == HeaderKind::V2;
    let hl = if v2 {
        mux::V2_HEADER_LEN
    } else {
        mux::V1_HEADER_LEN
    };
    let protocol = pkt
        .get(0..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut fields: Vec<usize> = vec![0, 1, 2, 3];
    if v2 || protocol == 0 {
        fields.extend(8..16);
    }
    if protocol == 6 {
        fields.extend([hl + 4, hl + 5, hl + 6, hl + 7, hl + 12, hl + 14, hl + 15]);
        fields.extend([hl + 12, hl + 14, hl + 15]);
    }
    let i = fields[at as usize % fields.len()];
    if let Some(b) = pkt.get_mut(i) {
        *b ^= xor | 1;
    }
}

fn deliver(q: &mut VecDeque<Vec<u8>>, fault: Fault) -> Vec<Vec<u8>> {
    let Some(mut p) = q.pop_front() else {
        return Vec::new();
    };
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

/// Reads up to `want` bytes of one stream and checks each against the sender's pattern.
/// Returns how many were read.
fn read_checked(
    host: &mut HostS,
    dev: &mut DevS,
    c: &mut Conn,
    host_side: bool,
    want: usize,
    scratch: &mut [u8],
) -> usize {
    let d = if host_side { 1 } else { 0 };
    let r = if host_side {
        host.recv(c.host, &mut scratch[..want])
    } else if let Some(id) = c.dev {
        dev.recv(id, &mut scratch[..want])
    } else {
        Ok(0)
    };
    let Ok(m) = r else { return 0 };
    assert!(m <= want);
    take_checked(c, d, &scratch[..m]);
    m
}

/// Checks `bytes`, the next ones the application got of stream `d` of `c` (read, or taken
/// straight from a transfer), against the sender's pattern, and counts them read.
fn take_checked(c: &mut Conn, d: usize, bytes: &[u8]) {
    for (k, &b) in bytes.iter().enumerate() {
        let off = c.streams[d].read + k as u64;
        assert!(off < c.streams[d].sent, "more bytes arrived than were sent");
        assert_eq!(
            b,
            byte_at(c.tag, d, off),
            "byte {off} of stream {}/{d} altered",
            c.tag
        );
    }
    c.streams[d].read += bytes.len() as u64;
}

struct World {
    host: Box<HostS>,
    dev: Box<DevS>,
    now: Instant,
    conns: Vec<Conn>,
    to_dev: VecDeque<Vec<u8>>,
    to_host: VecDeque<Vec<u8>>,
    /// Edges advertised to the host (by packets that reached it), and to the device.
    host_edges: Edges,
    dev_edges: Edges,
    buf: Vec<u8>,
    /// How many more bytes the host application takes straight from transfers.
    sink_budget: usize,
    /// Calls of `pump` so far.
    rounds: u64,
}

impl World {
    fn kind(version: Option<u32>, pkt: &[u8]) -> HeaderKind {
        if version == Some(2) && pkt[3] != 0 {
            HeaderKind::V2
        } else {
            HeaderKind::V1
        }
    }

    fn to_device(&mut self, p: &[u8]) {
        show("  => device", self.dev.version(), p);
        self.dev_edges.note_transfer(p);
        self.dev.handle_transfer(self.now, p);
    }

    fn to_host(&mut self, p: &[u8]) {
        show("  => host", self.host.version(), p);
        self.host_edges.note_transfer(p);
        // The host application takes up to `sink_budget` bytes straight from the transfer
        // (`handle_transfer_with`, as the daemon writes to client sockets), checked like a read.
        let (conns, budget) = (&mut self.conns, &mut self.sink_budget);
        self.host
            .handle_transfer_with(self.now, p, &mut |id, data| {
                let Some(c) = conns.iter_mut().find(|c| c.host == id) else {
                    return 0;
                };
                let m = data.len().min(*budget);
                take_checked(c, 1, &data[..m]);
                *budget -= m;
                m
            });
    }

    /// Moves what both sides want to send onto the cable and handles their events. Returns
    /// whether anything was sent.
    fn pump(&mut self) -> bool {
        let mut moved = false;
        // Every other round each connection's packets are built on their own first
        // (`poll_transmit_for_with`, as the daemon sends bytes it read ahead), then the rest
        // as usual: the stream checks hold either way.
        self.rounds += 1;
        let ids: Vec<Option<ConnId>> = if self.rounds % 2 == 0 {
            self.conns.iter().map(|c| Some(c.host)).collect()
        } else {
            Vec::new()
        };
        // The host's pending bytes (see `Stream::pending`), served in place when asked.
        let conns = &mut self.conns;
        let mut source = |id: ConnId, dst: &mut [u8]| -> usize {
            let Some(c) = conns.iter_mut().find(|c| c.host == id) else {
                return 0;
            };
            let tag = c.tag;
            let s = &mut c.streams[0];
            let m = (dst.len() as u64).min(s.pending) as usize;
            for (k, b) in dst[..m].iter_mut().enumerate() {
                *b = byte_at(tag, 0, s.sent + k as u64);
            }
            s.sent += m as u64;
            s.pending -= m as u64;
            m
        };
        for one in ids.into_iter().chain(std::iter::repeat(None)).take(32) {
            let built = match one {
                Some(id) => self
                    .host
                    .poll_transmit_for_with(self.now, id, &mut self.buf, &mut source),
                None => self
                    .host
                    .poll_transmit_with(self.now, &mut self.buf, &mut source),
            };
            match built {
                Ok(None) if one.is_some() => continue,
                Ok(Some(t)) => {
                    let pkt = &self.buf[..t.len];
                    show("host sends", self.host.version(), pkt);
                    if let Some(seg) = tcp_as(pkt, Self::kind(self.host.version(), pkt)) {
                        self.host_edges.check(&seg);
                    }
                    moved = true;
                    if self.to_dev.len() < 256 {
                        self.to_dev.push_back(pkt.to_vec());
                    }
                }
                Ok(None) => break,
                Err(e) => panic!("a 64 KiB buffer was too small: {e:?}"),
            }
        }
        for _ in 0..32 {
            match self.dev.poll_transmit(self.now, &mut self.buf) {
                Ok(Some(t)) => {
                    let pkt = &self.buf[..t.len];
                    show("device sends", self.dev.version(), pkt);
                    if let Some(seg) = tcp_as(pkt, Self::kind(self.dev.version(), pkt)) {
                        self.dev_edges.check(&seg);
                    }
                    moved = true;
                    if self.to_host.len() < 256 {
                        self.to_host.push_back(pkt.to_vec());
                    }
                }
                Ok(None) => break,
                Err(e) => panic!("a 64 KiB buffer was too small: {e:?}"),
            }
        }
        while let Some(e) = self.host.poll_event() {
            if trace() {
                eprintln!("host event {e:?}");
            }
        }
        while let Some(e) = self.dev.poll_event() {
            if trace() {
                eprintln!("device event {e:?}");
            }
            if let Event::Incoming { id, .. } = e {
                // Pair the device's connection with the host's by port (a duplicated or
                // corrupted SYN can make an extra one, which is reset).
                if self
                    .dev
                    .accept(id, Buffers::new(vec![0; BUF], vec![0; BUF]))
                    .is_ok()
                {
                    let remote = self.dev.connection(id).map(|c| c.remote_port());
                    let host = &self.host;
                    let owner = self.conns.iter_mut().find(|c| {
                        c.dev.is_none() && host.connection(c.host).map(|h| h.local_port()) == remote
                    });
                    match owner {
                        Some(c) => c.dev = Some(id),
                        None => {
                            let _ = self.dev.reset(id, "unexpected");
                        }
                    }
                }
            }
        }
        self.check_bounds();
        moved
    }

    fn check_bounds(&self) {
        assert!(self.host.connection_count() <= 4);
        assert!(self.dev.connection_count() <= 4);
        for id in self.host.connection_ids() {
            assert!(self.host.connection(id).map_or(0, |c| c.recv_queue()) <= BUF);
        }
        for id in self.dev.connection_ids() {
            assert!(self.dev.connection(id).map_or(0, |c| c.recv_queue()) <= BUF);
        }
    }

    fn established(&self, c: &Conn) -> bool {
        self.host.state(c.host) == Some(State::Established)
            && c.dev
                .is_some_and(|id| self.dev.state(id) == Some(State::Established))
    }

    fn complete(&self, c: &Conn) -> bool {
        c.streams.iter().all(|s| s.read == s.sent)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut w = World {
        host: Box::new(HostS::new(SessionConfig::default(), 1)),
        dev: Box::new(DevS::new(SessionConfig::default())),
        now: Instant::ZERO,
        conns: Vec::new(),
        to_dev: VecDeque::new(),
        to_host: VecDeque::new(),
        host_edges: Edges::default(),
        dev_edges: Edges::default(),
        buf: vec![0u8; 65536],
        sink_budget: 0,
        rounds: 0,
    };
    let mut next_tag = 0usize;
    let mut scratch = vec![0u8; 65536];
    let mut steps = 0;
    while !r.is_empty() && steps < 300 {
        steps += 1;
        let op = decode(&mut r);
        if trace() {
            eprintln!("{op:?}");
        }
        match op {
            Op::Connect => {
                if let Ok(id) = w.host.connect(7, Buffers::new(vec![0; BUF], vec![0; BUF])) {
                    next_tag += 1;
                    w.conns.push(Conn {
                        tag: next_tag,
                        host: id,
                        dev: None,
                        streams: [
                            Stream {
                                sent: 0,
                                read: 0,
                                pending: 0,
                            },
                            Stream {
                                sent: 0,
                                read: 0,
                                pending: 0,
                            },
                        ],
                    });
                }
            }
            Op::HostSend(i, n) | Op::DevSend(i, n) if !w.conns.is_empty() => {
                let host_side = matches!(op, Op::HostSend(..));
                let ci = i as usize % w.conns.len();
                let c = &mut w.conns[ci];
                let d = if host_side { 0 } else { 1 };
                // Bit 15 of the length: the host hands these bytes over through the source
                // instead of the send buffer; once some wait there, later ones must too (the
                // source's bytes come after everything in the send buffer).
                if host_side && (n & 0x8000 != 0 || c.streams[0].pending > 0) {
                    c.streams[0].pending += u64::from(n % 4096);
                } else {
                    let data: Vec<u8> = (0..u64::from(n % 4096))
                        .map(|k| byte_at(c.tag, d, c.streams[d].sent + k))
                        .collect();
                    let r = if host_side {
                        w.host.send(c.host, &data)
                    } else if let Some(id) = c.dev {
                        w.dev.send(id, &data)
                    } else {
                        Ok(0)
                    };
                    if let Ok(m) = r {
                        assert!(m <= data.len());
                        c.streams[d].sent += m as u64;
                    }
                }
            }
            Op::HostRead(i, n) | Op::DevRead(i, n) if !w.conns.is_empty() => {
                let host_side = matches!(op, Op::HostRead(..));
                let ci = i as usize % w.conns.len();
                let want = usize::from(n) % 4096 + 1;
                read_checked(
                    &mut w.host,
                    &mut w.dev,
                    &mut w.conns[ci],
                    host_side,
                    want,
                    &mut scratch,
                );
            }
            Op::HostReset(i) | Op::DevReset(i) if !w.conns.is_empty() => {
                let ci = i as usize % w.conns.len();
                let c = w.conns.remove(ci);
                // The side named resets first, so its RST is what the peer sees.
                if matches!(op, Op::HostReset(..)) {
                    let _ = w.host.reset(c.host, "fuzz reset");
                    if let Some(id) = c.dev {
                        let _ = w.dev.reset(id, "");
                    }
                } else {
                    if let Some(id) = c.dev {
                        let _ = w.dev.reset(id, "fuzz reset");
                    }
                    let _ = w.host.reset(c.host, "");
                }
            }
            Op::ToDevice(f) => {
                for p in deliver(&mut w.to_dev, f) {
                    w.to_device(&p);
                }
            }
            Op::ToHost(f) => {
                // How much the host application takes straight from these transfers: none,
                // some, most or all, by the step's position in the input.
                w.sink_budget = [0, 4096, 60_000, usize::MAX][steps % 4];
                for p in deliver(&mut w.to_host, f) {
                    w.to_host(&p);
                }
            }
            Op::Advance(ms) => {
                w.now += Duration::from_millis(u64::from(ms) * 10);
                w.host.handle_timeout(w.now);
                w.dev.handle_timeout(w.now);
            }
            _ => {}
        }
        w.pump();
    }

    // The drain: a perfect cable, both applications reading everything, time moving on.
    if trace() {
        eprintln!("drain");
    }
    // Bounded by what is left to move: a closed 2 KiB window moves 2 KiB per two rounds (data
    // one round, its ack the next), and the fuzzer can leave ~1 MiB waiting at the source.
    let left: u64 = w
        .conns
        .iter()
        .flat_map(|c| c.streams.iter())
        .map(|s| s.pending + s.sent.saturating_sub(s.read))
        .sum();
    let rounds = 200 + usize::try_from(left / 1000).unwrap_or(usize::MAX);
    for _ in 0..rounds {
        let mut moved = false;
        while let Some(p) = w.to_dev.pop_front() {
            w.to_device(&p);
            moved = true;
        }
        while let Some(p) = w.to_host.pop_front() {
            w.sink_budget = usize::MAX;
            w.to_host(&p);
            moved = true;
        }
        for ci in 0..w.conns.len() {
            for host_side in [true, false] {
                for _ in 0..8 {
                    if read_checked(
                        &mut w.host,
                        &mut w.dev,
                        &mut w.conns[ci],
                        host_side,
                        4096,
                        &mut scratch,
                    ) == 0
                    {
                        break;
                    }
                    moved = true;
                }
            }
        }
        moved |= w.pump();
        let done = w.conns.iter().all(|c| !w.established(c) || w.complete(c));
        if !moved {
            if done {
                break;
            }
            // Nothing moves: jump to the next timer (a probe, a timeout). None at all means
            // nothing will ever move again; the check below judges that state.
            let next = match (w.host.poll_timeout(), w.dev.poll_timeout()) {
                (Some(a), Some(b)) => Some(if a < b { a } else { b }),
                (a, b) => a.or(b),
            };
            let Some(next) = next else { break };
            if next > w.now {
                w.now = next;
            }
            w.host.handle_timeout(w.now);
            w.dev.handle_timeout(w.now);
        }
    }
    for c in &w.conns {
        if w.established(c) {
            assert!(
                w.complete(c),
                "connection {} still established on both sides but stuck: host→device {}/{} bytes, device→host {}/{}",
                c.tag,
                c.streams[0].read,
                c.streams[0].sent,
                c.streams[1].read,
                c.streams[1].sent
            );
        }
    }
});
