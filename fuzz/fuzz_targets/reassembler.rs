//! The Reassembler fed arbitrary transfer sequences, both modes and several capacities; input
//! format: one flags byte (bit 0: v2 headers, bit 1: the 100-byte host reassembler instead of
//! the 64 KiB one), then transfers as `Reader::bytes` until the input ends.
//!
//! Invariants: no panic; every packet handed out has a length field equal to its length, at
//! least the header length and at most the capacity (host) or 65 535 (device); the device
//! mode hands out exactly the transfer; what is pending never exceeds the capacity; a stream of
//! whole, valid packets split anywhere comes out as exactly those packets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_core::usb::{Mode, Reassembler, MAX_PACKET};
use usbmux_fuzz::Reader;

fn check(packet: &[u8], header_len: usize, cap: usize) {
    assert!(packet.len() >= header_len);
    assert!(packet.len() <= cap.min(MAX_PACKET));
    let declared = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) as usize;
    assert_eq!(declared, packet.len());
}

/// The packets of `stream` if it is a sequence of whole packets with valid lengths.
fn whole_packets(stream: &[u8], header_len: usize, cap: usize) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let b = rest.get(4..8)?;
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < header_len || len > cap.min(MAX_PACKET) || len > rest.len() {
            return None;
        }
        let (p, tail) = rest.split_at(len);
        out.push(p);
        rest = tail;
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let header_len = if flags & 1 == 1 { 16 } else { 8 };
    let use_small = flags & 2 == 2;
    let mut big = Box::new(Reassembler::<65536>::new(Mode::Host, header_len));
    let mut small = Reassembler::<100>::new(Mode::Host, header_len);
    let mut dev = Reassembler::<0>::new(Mode::Device, header_len);
    let mut stream = Vec::new();
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut transfers = 0;
    while !r.is_empty() && transfers < 1000 {
        transfers += 1;
        let t = r.bytes();
        stream.extend_from_slice(t);
        let cap = if use_small { 100 } else { 65536 };
        let mut got = |res: Result<&[u8], _>| {
            if let Ok(p) = res {
                check(p, header_len, cap);
                out.push(p.to_vec());
            }
        };
        if use_small {
            small.push(t, &mut got);
        } else {
            big.push(t, &mut got);
        }
        dev.push(t, |res| {
            if let Ok(p) = res {
                check(p, header_len, MAX_PACKET);
                assert_eq!(p, t);
            }
        });
        assert!(big.pending() <= 65536);
        assert!(small.pending() <= 100);
    }
    let cap = if use_small { 100 } else { 65536 };
    if let Some(expected) = whole_packets(&stream, header_len, cap) {
        assert_eq!(
            out, expected,
            "a valid stream split into transfers came out changed"
        );
    }
});
