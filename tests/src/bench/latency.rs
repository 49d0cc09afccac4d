//! Row 5: latency through our daemon (phone out of process): the Connect round trip (a new
//! client socket, the plist Connect request, until Result OK — what every iproxy connection
//! pays) and the 1-byte echo round trip through a connected socket. Baselines: the same
//! exchanges with a bare Unix-socket echo server in this process (connect + 1-byte round trip;
//! 1-byte round trip).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::daemon::{Baseline, Rig, Service, ECHO};
use crate::util::{percentile, Row};

fn ping(s: &mut (impl Read + Write)) -> f64 {
    let t0 = Instant::now();
    let mut b = [0x5au8];
    s.write_all(&b).expect("echo write");
    s.read_exact(&mut b).expect("echo read");
    t0.elapsed().as_secs_f64() * 1e6
}

/// Row 5.
pub fn run(quick: bool, rows: &mut Vec<Row>) {
    let (connects, pings) = if quick { (300, 2_000) } else { (2_000, 20_000) };
    let rig = Rig::start(1, true);
    let base = Baseline::start(rig.dir());
    let echo = base.path(Service::Echo).to_path_buf();
    let client = rig.client();
    let dev = rig.devices[0];
    println!(
        "latency: {connects} connects, {pings} 1-byte round trips, interleaved with the baseline"
    );
    let (mut c, mut cb) = (Vec::new(), Vec::new());
    for _ in 0..connects {
        let t0 = Instant::now();
        let s = client.connect(dev, ECHO).expect("connect");
        c.push(t0.elapsed().as_secs_f64() * 1e6);
        drop(s);
        let t0 = Instant::now();
        let mut s = UnixStream::connect(&echo).expect("baseline");
        ping(&mut s);
        cb.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let mut s = client.connect(dev, ECHO).expect("connect");
    let mut sb = UnixStream::connect(&echo).expect("baseline");
    let (mut e, mut eb) = (Vec::new(), Vec::new());
    for _ in 0..pings {
        e.push(ping(&mut s));
        eb.push(ping(&mut sb));
    }
    for (what, v, b) in [
        (
            "Connect round trip (socket + request → Result OK)",
            &mut c,
            &mut cb,
        ),
        ("1-byte echo round trip, connected", &mut e, &mut eb),
    ] {
        for p in [50.0, 99.0] {
            let (x, y) = (percentile(v, p), percentile(b, p));
            rows.push(
                Row::new("latency", format!("{what}, p{p:.0}"), x, "µs")
                    .baseline("bare Unix socket", y),
            );
        }
    }
}
