//! A host Session fed arbitrary device transfers interleaved with arbitrary API calls and
//! time steps. Invariants: no panic, poll_transmit output always parses as a mux packet of the
//! negotiated form and respects max_transfer, the number of live connections never exceeds the
//! pool, and every loop is bounded.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usbmux_core::wire::{HeaderKind, MuxPacket, MuxRepr};
use usbmux_core::{Buffers, Host, Instant, Session, SessionConfig};

#[derive(Arbitrary, Debug)]
enum Op {
    Transfer(Vec<u8>),
    /// A well-formed v2 VERSION reply, so the fuzzer reaches the active phase quickly.
    VersionReply(u8),
    Connect(u16),
    Send(u8, Vec<u8>),
    Recv(u8, u16),
    Reset(u8),
    Advance(u16),
    Disconnect,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut s = Session::<Host, Vec<u8>, 4>::new(SessionConfig::default(), 1);
    let mut now = Instant::ZERO;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 65536];
    for op in ops.into_iter().take(200) {
        match op {
            Op::Transfer(t) => s.handle_transfer(now, &t),
            Op::VersionReply(major) => s.handle_transfer(
                now,
                &[0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, major % 4, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            Op::Connect(port) => {
                if let Ok(id) = s.connect(port, Buffers::new(vec![0; 1024], vec![0; 1024])) {
                    ids.push(id);
                }
            }
            Op::Send(i, data) => {
                if let Some(&id) = ids.get(i as usize % ids.len().max(1)) {
                    let _ = s.send(id, &data);
                }
            }
            Op::Recv(i, n) => {
                if let Some(&id) = ids.get(i as usize % ids.len().max(1)) {
                    let mut b = vec![0u8; n as usize];
                    let _ = s.recv(id, &mut b);
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
                    let kind = if s.version() == Some(2) && pkt[3] != 0 { HeaderKind::V2 } else { HeaderKind::V1 };
                    let p = MuxPacket::new_checked(pkt, kind).expect("our packets check");
                    MuxRepr::parse(&p).expect("our packets parse");
                }
                Ok(None) => break,
                Err(e) => panic!("a 64 KiB buffer was too small: {e:?}"),
            }
        }
        while s.poll_event().is_some() {}
        assert!(s.connection_count() <= 4);
    }
});
