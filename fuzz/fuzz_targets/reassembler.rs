//! The Reassembler fed arbitrary transfer sequences, both modes and several capacities.
//! Invariants: no panic; every packet handed out has a length field equal to its length, at
//! least the header length and at most the capacity (host) or 65 535 (device).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usbmux_core::usb::{Mode, Reassembler, MAX_PACKET};

#[derive(Arbitrary, Debug)]
struct Input {
    v2: bool,
    small: bool,
    transfers: Vec<Vec<u8>>,
}

fn check(packet: &[u8], header_len: usize, cap: usize) {
    assert!(packet.len() >= header_len);
    assert!(packet.len() <= cap.min(MAX_PACKET));
    let declared = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) as usize;
    assert_eq!(declared, packet.len());
}

fuzz_target!(|input: Input| {
    let header_len = if input.v2 { 16 } else { 8 };
    let mut big = Box::new(Reassembler::<65536>::new(Mode::Host, header_len));
    let mut small = Reassembler::<100>::new(Mode::Host, header_len);
    let mut dev = Reassembler::<0>::new(Mode::Device, header_len);
    for t in &input.transfers {
        if input.small {
            small.push(t, |r| {
                if let Ok(p) = r {
                    check(p, header_len, 100)
                }
            });
        } else {
            big.push(t, |r| {
                if let Ok(p) = r {
                    check(p, header_len, 65536)
                }
            });
        }
        dev.push(t, |r| {
            if let Ok(p) = r {
                check(p, header_len, MAX_PACKET);
                assert_eq!(p.len(), t.len());
            }
        });
    }
    assert!(big.pending() <= 65536);
    assert!(small.pending() <= 100);
});
