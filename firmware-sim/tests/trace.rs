//! Transfer traces: records round-trip, damaged files are errors with the record index (never a
//! panic), and a trace recorded by `serve --trace` dumps as readable lines — through the library
//! and through `usbmux-sim dump`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{pattern, Daemon, TempDir};
use usbmux_sim::service::ECHO;
use usbmux_sim::socket::{Server, SimLink};
use usbmux_sim::trace::{
    self, read_records, Direction, Dumper, Entry, Record, TraceErrorKind, TraceWriter,
    TRACE_VERSION,
};
use usbmux_sim::PhoneConfig;

const T: Duration = Duration::from_secs(10);

fn sample() -> Vec<Record> {
    vec![
        Record {
            phone: 1,
            micros: 0,
            entry: Entry::Plug,
        },
        Record::transfer(
            1,
            10,
            Direction::Out,
            &[0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2],
        ),
        Record::transfer(1, 11, Direction::Out, &[]),
        Record::transfer(2, 1_500_000, Direction::In, &pattern(49_152, 7)),
        Record::transfer(1, u64::MAX, Direction::In, &[0; 300]),
        Record {
            phone: u32::MAX,
            micros: 99,
            entry: Entry::Unplug {
                reason: "the daemon closed the link ✓".into(),
            },
        },
    ]
}

fn encode(records: &[Record]) -> Vec<u8> {
    let mut w = TraceWriter::new(Vec::new());
    for r in records {
        w.write(r).expect("write to a Vec");
    }
    assert_eq!(w.records(), records.len() as u64);
    w.into_inner()
}

#[test]
fn records_round_trip() {
    let recs = sample();
    let bytes = encode(&recs);
    assert_eq!(read_records(&bytes), Ok(recs.clone()));
    assert_eq!(
        Record::transfer(1, 0, Direction::In, &[]).entry,
        Entry::Zlp {
            direction: Direction::In
        }
    );
    // Every record starts with the version (after its COBS code byte) and ends with 0x00.
    assert_eq!(bytes.last(), Some(&0));
    assert_eq!(bytes[1], TRACE_VERSION);
    assert_eq!(read_records(&[]), Ok(vec![]));
}

#[test]
fn truncated_file_names_the_record() {
    let recs = sample();
    let bytes = encode(&recs);
    // Cut inside the last record.
    let cut = &bytes[..bytes.len() - 3];
    let err = read_records(cut).expect_err("truncated");
    assert_eq!(err.index, recs.len() - 1);
    assert!(matches!(err.kind, TraceErrorKind::Truncated(_)), "{err}");
    assert!(err
        .to_string()
        .starts_with(&format!("record {}", recs.len() - 1)));
    // Every prefix reads as a prefix of the records or fails; nothing panics.
    for n in 0..bytes.len() {
        match read_records(&bytes[..n]) {
            Ok(r) => assert!(recs.starts_with(&r), "prefix {n}"),
            Err(e) => assert!(e.index < recs.len(), "prefix {n}: {e}"),
        }
    }
}

#[test]
fn corrupt_records_are_errors() {
    let recs = sample();
    let bytes = encode(&recs);
    // Another version in the second record.
    let first_end = bytes.iter().position(|&b| b == 0).expect("terminator");
    let mut v = bytes.clone();
    v[first_end + 2] = 9;
    let err = read_records(&v).expect_err("version");
    assert_eq!((err.index, err.kind), (1, TraceErrorKind::Version(9)));
    // An empty record.
    let mut v = bytes.clone();
    v.insert(first_end + 1, 0);
    let err = read_records(&v).expect_err("empty record");
    assert_eq!((err.index, err.kind), (1, TraceErrorKind::Framing));
    // Garbage: every byte flipped one at a time, then random junk; errors only, no panic.
    for i in 0..bytes.len().min(400) {
        let mut v = bytes.clone();
        v[i] ^= 0x5a;
        let _ = read_records(&v);
    }
    for seed in 0..50 {
        let junk = pattern(1 + seed as usize * 37, seed);
        if let Err(e) = read_records(&junk) {
            let _ = e.to_string();
        }
    }
    // A record whose body is not a Record.
    let bogus = [4u8, TRACE_VERSION, 0xff, 0xff, 0];
    let err = read_records(&bogus).expect_err("bogus body");
    assert!(matches!(err.kind, TraceErrorKind::Corrupt(_)), "{err}");
}

#[test]
fn dumper_follows_the_handshake() {
    let version_req = [
        0u8, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let setup = [
        0u8, 0, 0, 2, 0, 0, 0, 17, 0xfe, 0xed, 0xfa, 0xce, 0, 0, 0xff, 0xff, 7,
    ];
    let recs = [
        Record {
            phone: 1,
            micros: 0,
            entry: Entry::Plug,
        },
        Record::transfer(1, 5, Direction::Out, &version_req),
        Record::transfer(1, 1_000_007, Direction::In, &version_req),
        Record::transfer(1, 1_000_010, Direction::Out, &setup),
        Record::transfer(1, 1_000_011, Direction::Out, &[]),
    ];
    let mut d = Dumper::new();
    let lines: Vec<String> = recs.iter().enumerate().map(|(i, r)| d.line(i, r)).collect();
    assert_eq!(lines[0], "     0    0.000000 phone 1 plugged in");
    assert_eq!(
        lines[1],
        "     1    0.000005 phone 1 host->phone    20 B  v1 VERSION 2.0"
    );
    assert_eq!(
        lines[2],
        "     2    1.000007 phone 1 phone->host    20 B  v1 VERSION 2.0"
    );
    assert_eq!(
        lines[3],
        "     3    1.000010 phone 1 host->phone    17 B  v2 tx=0 rx=65535 SETUP [07]"
    );
    assert_eq!(
        lines[4],
        "     4    1.000011 phone 1 host->phone     0 B  ZLP"
    );
}

/// Records a session through `Server::with_trace`, returns the trace file's bytes.
fn record_a_session(dir: &TempDir) -> Vec<u8> {
    let sock = dir.path("t.sock");
    let file = dir.path("trace.bin");
    let server = Server::bind([(sock.clone(), PhoneConfig::simulated(1))])
        .expect("bind")
        .with_trace(TraceWriter::create(&file).expect("trace file"))
        .spawn()
        .expect("spawn");
    let (_, link) = SimLink::connect(&sock, T).expect("connect");
    let mut d = Daemon::new(link, 512);
    d.handshake();
    let c = d.connect(ECHO, 64 * 1024);
    let data = pattern(476, 1);
    assert!(d.echo(c, &data, T) == data);
    d.link.send_unplug().expect("unplug");
    drop(d);
    // Let the phone thread log the unplug before stopping (bounded).
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        let bytes = std::fs::read(&file).expect("read trace");
        if read_records(&bytes)
            .map(|r| r.iter().any(|r| matches!(r.entry, Entry::Unplug { .. })))
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    server.stop();
    std::fs::read(&file).expect("read trace")
}

#[test]
fn serve_trace_dumps_readably() {
    let dir = TempDir::new("trace");
    let bytes = record_a_session(&dir);
    let recs = read_records(&bytes).expect("a good trace");
    assert!(matches!(recs.first().map(|r| &r.entry), Some(Entry::Plug)));
    assert!(
        recs.windows(2).all(|w| w[0].micros <= w[1].micros),
        "monotonic time"
    );
    // The 512-byte data packet went out with its ZLP right behind it.
    let i = recs
        .iter()
        .position(|r| {
            matches!(&r.entry, Entry::Transfer { direction: Direction::Out, data } if data.len() == 512)
        })
        .expect("the 512-byte packet");
    assert_eq!(
        recs[i + 1].entry,
        Entry::Zlp {
            direction: Direction::Out
        }
    );

    let mut out = Vec::new();
    let n = trace::dump(&bytes, &mut out).expect("dump");
    assert_eq!(n, recs.len());
    let text = String::from_utf8(out).expect("utf-8");
    for want in [
        "phone 1 plugged in",
        "phone 1 host->phone    20 B  v1 VERSION 2.0",
        "phone 1 phone->host    20 B  v1 VERSION 2.0",
        "host->phone    17 B  v2 tx=0 rx=65535 SETUP [07]",
        "TCP 1 -> 7 seq=0 ack=0 SYN",
        "phone->host    36 B  v2 ",
        "host->phone   512 B  v2 ",
        "len=476",
        "host->phone     0 B  ZLP",
        "phone 1 unplugged (the daemon sent UNPLUG)",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("malformed"), "{text}");

    // The same through the command line, and a damaged copy fails with the record index.
    let file = dir.path("trace.bin");
    let bin = env!("CARGO_BIN_EXE_usbmux-sim");
    let o = Command::new(bin)
        .arg("dump")
        .arg(&file)
        .output()
        .expect("run dump");
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), text);
    let bad = dir.path("bad.bin");
    std::fs::write(&bad, &bytes[..bytes.len() - 1]).expect("write");
    let o = Command::new(bin)
        .arg("dump")
        .arg(&bad)
        .output()
        .expect("run dump");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("record {}: truncated", recs.len() - 1)),
        "{err}"
    );
    let o = Command::new(bin)
        .arg("dump")
        .arg(dir.path("missing"))
        .output()
        .expect("run dump");
    assert!(!o.status.success());
}
