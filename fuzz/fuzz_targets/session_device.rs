//! A device Session fed arbitrary host transfers (after a real VERSION/SETUP, or not) and
//! arbitrary accept/refuse/send/recv calls. Invariants: no panic; every transmit parses; bounded
//! state.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usbmux_core::{Buffers, Device, Event, Instant, Session, SessionConfig};

#[derive(Arbitrary, Debug)]
enum Op {
    Transfer(Vec<u8>),
    Handshake,
    /// A SYN from host port `sport` to `dport`, v2 framed.
    Syn(u16, u16),
    Send(u8, Vec<u8>),
    Recv(u8, u16),
    Advance(u16),
}

fuzz_target!(|input: (bool, Vec<Op>)| {
    let (accept_all, ops) = input;
    let mut s = Session::<Device, Vec<u8>, 4, 0>::new(SessionConfig::default());
    let mut now = Instant::ZERO;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u16;
    for op in ops.into_iter().take(200) {
        match op {
            Op::Transfer(t) => s.handle_transfer(now, &t),
            Op::Handshake => {
                s.handle_transfer(now, &[0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
                s.handle_transfer(now, &[0, 0, 0, 2, 0, 0, 0, 17, 0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0xFF, 0xFF, 7]);
                seq = 1;
            }
            Op::Syn(sport, dport) => {
                let mut p = vec![0, 0, 0, 6, 0, 0, 0, 36, 0xFE, 0xED, 0xFA, 0xCE];
                p.extend_from_slice(&seq.to_be_bytes());
                p.extend_from_slice(&[0, 0]);
                p.extend_from_slice(&sport.to_be_bytes());
                p.extend_from_slice(&dport.to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0x02, 0x00, 0, 0, 0, 0]);
                seq = seq.wrapping_add(1);
                s.handle_transfer(now, &p);
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
            Op::Advance(ms) => {
                now += usbmux_core::Duration::from_millis(u64::from(ms));
                s.handle_timeout(now);
            }
        }
        for _ in 0..64 {
            match s.poll_transmit(now, &mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => panic!("a 64 KiB buffer was too small: {e:?}"),
            }
        }
        while let Some(e) = s.poll_event() {
            match e {
                Event::Incoming { id, .. } => {
                    if accept_all {
                        if s.accept(id, Buffers::new(vec![0; 512], vec![0; 512])).is_ok() {
                            ids.push(id);
                        }
                    } else {
                        let _ = s.refuse(id, b"no");
                    }
                }
                Event::Reset { id, .. } => {
                    let _ = s.reset(id, "");
                }
                _ => {}
            }
        }
        assert!(s.connection_count() <= 4);
    }
});
