//! A device Session fed arbitrary host transfers (after a real VERSION/SETUP, or not), SYNs,
//! and arbitrary accept/refuse/send/recv/reset calls and time steps; input format: one byte
//! (bit 0: accept incoming connections, else refuse them), then `usbmux_fuzz::device_ops`.
//!
//! Invariants: no panic; every transmit parses as a mux packet and fits max_transfer; TCP data
//! the device sends stays inside the window the host advertised (the highest edge of any host
//! SYN or ACK on that connection); a read never returns more than the receive buffer holds;
//! the pool is never exceeded; every loop is bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_core::wire::{HeaderKind, MuxPacket, MuxRepr};
use usbmux_core::{Buffers, Device, Event, Instant, Session, SessionConfig};
use usbmux_fuzz::device_ops::{decode, Op};
use usbmux_fuzz::window::{tcp_as, Edges};
use usbmux_fuzz::Reader;

const RX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let accept_all = r.u8() & 1 == 1;
    let mut s = Session::<Device, Vec<u8>, 4, 0>::new(SessionConfig::default());
    let mut now = Instant::ZERO;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u16;
    let mut edges = Edges::default();
    let mut steps = 0;
    while !r.is_empty() && steps < 200 {
        steps += 1;
        match decode(&mut r) {
            Op::Transfer(t) => {
                edges.note_transfer(t);
                s.handle_transfer(now, t);
            }
            Op::Handshake => {
                s.handle_transfer(
                    now,
                    &[0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0],
                );
                s.handle_transfer(
                    now,
                    &[
                        0, 0, 0, 2, 0, 0, 0, 17, 0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0xFF, 0xFF, 7,
                    ],
                );
                seq = 1;
            }
            Op::Syn(sport, dport) => {
                let mut p = vec![0, 0, 0, 6, 0, 0, 0, 36, 0xFE, 0xED, 0xFA, 0xCE];
                p.extend_from_slice(&seq.to_be_bytes());
                p.extend_from_slice(&[0xFF, 0xFF]);
                p.extend_from_slice(&sport.to_be_bytes());
                p.extend_from_slice(&dport.to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0x02, 0x00, 0, 0, 0, 0]);
                seq = seq.wrapping_add(1);
                edges.note_transfer(&p);
                s.handle_transfer(now, &p);
            }
            Op::Send(i, data) => {
                if let Some(&id) = ids.get(i as usize % ids.len().max(1)) {
                    if let Ok(n) = s.send(id, data) {
                        assert!(n <= data.len());
                    }
                }
            }
            Op::Recv(i, n) => {
                if let Some(&id) = ids.get(i as usize % ids.len().max(1)) {
                    let mut b = vec![0u8; n as usize];
                    if let Ok(m) = s.recv(id, &mut b) {
                        assert!(m <= b.len() && m <= RX);
                    }
                }
            }
            Op::Reset(i) => {
                if !ids.is_empty() {
                    let id = ids.remove(i as usize % ids.len());
                    let _ = s.reset(id, "fuzz");
                }
            }
            Op::Advance(ms) => {
                now += usbmux_core::Duration::from_millis(u64::from(ms));
                s.handle_timeout(now);
            }
        }
        for _ in 0..64 {
            match s.poll_transmit(now, &mut buf) {
                Ok(Some(t)) => {
                    assert!(t.len <= s.config().max_transfer);
                    let pkt = &buf[..t.len];
                    let kind = if s.version() == Some(2) && pkt[3] != 0 {
                        HeaderKind::V2
                    } else {
                        HeaderKind::V1
                    };
                    let p = MuxPacket::new_checked(pkt, kind).expect("our packets check");
                    MuxRepr::parse(&p).expect("our packets parse");
                    if let Some(seg) = tcp_as(pkt, kind) {
                        edges.check(&seg);
                    }
                }
                Ok(None) => break,
                Err(e) => panic!("a 64 KiB buffer was too small: {e:?}"),
            }
        }
        while let Some(e) = s.poll_event() {
            match e {
                Event::Incoming { id, .. } => {
                    if accept_all {
                        if s.accept(id, Buffers::new(vec![0; 512], vec![0; RX]))
                            .is_ok()
                        {
                            ids.push(id);
                        }
                    } else {
                        let _ = s.refuse(id, b"no");
                    }
                }
                Event::Reset { id, .. } => {
                    ids.retain(|&x| x != id);
                    let _ = s.reset(id, "");
                }
                _ => {}
            }
        }
        for id in s.connection_ids().collect::<Vec<_>>() {
            if let Some(c) = s.connection(id) {
                assert!(c.recv_queue() <= RX);
            }
        }
        assert!(s.connection_count() <= 4);
    }
});
