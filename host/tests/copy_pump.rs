//! The tools' copy loops (`iproxy --copy buffer|splice`) move every byte, in order, and end at
//! the source's end.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use usbmux_host::tools::{pump_with, CopyMethod};

/// 3 MiB + 7 bytes of a pattern that does not repeat on any power-of-two boundary.
fn data() -> Vec<u8> {
    (0..(3u32 << 20) + 7)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i % 251) as u8)
        .collect()
}

/// Writer → [a, b] → pump → [c, d] → reader; returns what the reader got and what the pump
/// counted.
fn through(method: CopyMethod, data: &[u8]) -> (Vec<u8>, u64) {
    let (mut a, mut b) = UnixStream::pair().expect("pair");
    let (mut c, mut d) = UnixStream::pair().expect("pair");
    std::thread::scope(|s| {
        s.spawn(move || {
            a.write_all(data).expect("write");
            // Dropping `a` ends the source.
        });
        let pump = s.spawn(move || {
            let n = pump_with(method, &mut b, &mut c).expect("pump");
            drop(c); // ends the reader's stream
            n
        });
        let mut got = Vec::new();
        d.read_to_end(&mut got).expect("read");
        (got, pump.join().expect("pump thread"))
    })
}

#[test]
fn buffer_copies_everything() {
    let data = data();
    let (got, n) = through(CopyMethod::Buffer, &data);
    assert_eq!(n, data.len() as u64);
    assert!(got == data, "bytes differ");
}

#[test]
fn splice_copies_everything() {
    let data = data();
    let (got, n) = through(CopyMethod::Splice, &data);
    assert_eq!(n, data.len() as u64);
    assert!(got == data, "bytes differ");
}

#[test]
fn empty_source_copies_nothing() {
    for method in [CopyMethod::Buffer, CopyMethod::Splice] {
        let (got, n) = through(method, &[]);
        assert_eq!((got.len(), n), (0, 0), "{method:?}");
    }
}
