//! A host Session fed arbitrary device transfers interleaved with arbitrary API calls
//! (connect/send/recv/reset/unplug) and time steps; input format: `usbmux_fuzz::host_ops`.
//!
//! Invariants: no panic; every poll_transmit output parses as a mux packet of the negotiated
//! form, respects max_transfer and, when it carries TCP data, stays inside the window the
//! device advertised (the highest `ack + window` the device ever sent on that connection); a
//! read never returns more than the receive buffer holds; the number of live connections never
//! exceeds the pool; every loop is bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_core::wire::{HeaderKind, MuxPacket, MuxRepr};
use usbmux_core::{Buffers, Host, Instant, Session, SessionConfig};
use usbmux_fuzz::host_ops::{decode, Op};
use usbmux_fuzz::window::{tcp_as, Edges};
use usbmux_fuzz::Reader;

const RX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut s = Session::<Host, Vec<u8>, 4>::new(SessionConfig::default(), 1);
    let mut now = Instant::ZERO;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut edges = Edges::default();
    let mut steps = 0;
    while !r.is_empty() && steps < 200 {
        steps += 1;
        match decode(&mut r) {
            Op::Transfer(t) => {
                edges.note_transfer(t);
                s.handle_transfer(now, t);
            }
            Op::VersionReply(major) => s.handle_transfer(
                now,
                &[
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    20,
                    0,
                    0,
                    0,
                    major % 4,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
            ),
            Op::Connect(port) => {
                if let Ok(id) = s.connect(port, Buffers::new(vec![0; 1024], vec![0; RX])) {
                    ids.push(id);
                }
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
                if let Some(&id) = ids.get(i as usize % ids.len().max(1)) {
                    let _ = s.reset(id, "fuzz");
                }
            }
            Op::Advance(ms) => {
                now += usbmux_core::Duration::from_millis(u64::from(ms));
                s.handle_timeout(now);
            }
            Op::Disconnect => s.handle_disconnect(),
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
                    let seg = if edges.confused {
                        None
                    } else {
                        tcp_as(pkt, kind)
                    };
                    if let Some(seg) = seg {
                        edges.check(&seg);
                    }
                }
                Ok(None) => break,
                Err(e) => panic!("a 64 KiB buffer was too small: {e:?}"),
            }
        }
        while s.poll_event().is_some() {}
        for id in s.connection_ids().collect::<Vec<_>>() {
            if let Some(c) = s.connection(id) {
                assert!(c.recv_queue() <= RX);
            }
        }
        assert!(s.connection_count() <= 4);
    }
});
