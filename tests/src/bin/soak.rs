//! `cargo run --release -p usbmux-tests --bin soak -- --seconds N [--phones 8] [--seed S]
//! [--workers W]`: churn against the real `usbmuxd` binary until N seconds have passed.
//!
//! - **Transfers**: W workers (default 8) open connections continuously, each to a random
//!   listed phone, echo or digest, with a random size (1 B to 4 MiB, log-uniform), and verify
//!   every byte (echo: compared; digest: SHA-256).
//! - **Plugs**: every 0.5–2 s a random phone is unplugged for 0.1–1 s (at most half of them at
//!   once); the daemon re-handshakes it when it comes back.
//! - **Hostile clients**: one after another, 25–75 ms apart, one of: bad header lengths, an
//!   unknown message type, a plist nested 9 000 deep, garbage instead of a plist, a pair-record
//!   id with `..`, a Connect to an absent device, a client that connects and leaves, a Listen
//!   client that never reads for a second — each with its expected answer checked.
//! - **Listen**: one client listens throughout and must see every notification in order
//!   (Attached and Detached alternate per DeviceID).
//! - **Responsiveness**: every second a ListDevices must answer within 100 ms (best of five).
//!
//! A transfer that ends early is allowed only if its phone was unplugged meanwhile (and what
//! came back before was exact); anything else — a corrupted or lost byte, a reset without an
//! unplug, a wrong answer to a hostile client, a slow ListDevices, the daemon's fds not back
//! at their starting count at the end — makes the run fail (exit status 1). The report gives
//! connections completed, bytes verified, interrupted transfers, plug cycles, hostile clients,
//! peak RSS and fd counts.
//!
//! The daemon is the `usbmuxd` binary next to this one; if it is missing, the soak builds it
//! (`cargo build --release -p usbmux-host --bin usbmuxd`) first.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use usbmux_host::proto::{BinaryMessage, ResultCode};
use usbmux_tests::client::{self, ClientStream};
use usbmux_tests::faulty::PhoneSpec;
use usbmux_tests::hostile::{self, read_until_closed_within, result_of, Rig, DIGEST, ECHO};

struct Args {
    seconds: u64,
    phones: u32,
    seed: u64,
    workers: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 60,
        phones: 8,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        workers: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .parse::<u64>()
                .map_err(|e| format!("{flag}: {e}"))
        };
        match flag.as_str() {
            "--seconds" => a.seconds = value()?,
            "--phones" => a.phones = u32::try_from(value()?).map_err(|e| e.to_string())?,
            "--seed" => a.seed = value()?,
            "--workers" => a.workers = usize::try_from(value()?).map_err(|e| e.to_string())?,
            "-h" | "--help" => {
                println!(
                    "usage: soak --seconds N [--phones 8] [--seed S] [--workers 8]\n\
                     Churn against usbmuxd; exits 1 on any lost or corrupted byte or leak."
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.phones < 2 || a.phones > 64 || a.workers == 0 || a.workers > 256 {
        return Err("--phones 2..=64, --workers 1..=256".into());
    }
    Ok(a)
}

/// xorshift64*: the run's only randomness, seeded from `--seed` (per thread: seed + index).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Log-uniform in 1..=max.
    fn size(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.leading_zeros();
        let b = self.below(u64::from(bits)) as u32;
        let lo = 1usize << b;
        (lo + self.below(lo as u64) as usize).clamp(1, max)
    }
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    bytes: AtomicU64,
    interrupted: AtomicU64,
    absent: AtomicU64,
    unplugs: AtomicU64,
    hostile: AtomicU64,
    notifications: AtomicU64,
    list_checks: AtomicU64,
}

struct World<'a> {
    rig: &'a Rig,
    stats: Stats,
    stop: AtomicBool,
    failures: Mutex<Vec<String>>,
    /// Phones currently held unplugged by the chaos thread.
    away: Mutex<Vec<usize>>,
}

impl World<'_> {
    fn fail(&self, what: String) {
        eprintln!("FAILURE: {what}");
        if let Ok(mut f) = self.failures.lock() {
            f.push(what);
        }
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    ensure_usbmuxd();
    println!(
        "soak: {} s, {} phones, {} workers, seed {}",
        args.seconds, args.phones, args.workers, args.seed
    );
    let phones = (1..=args.phones).map(PhoneSpec::healthy).collect();
    let Some(rig) = Rig::start(phones) else {
        eprintln!("soak: no usbmuxd binary");
        std::process::exit(2);
    };
    rig.wait_all_phones();
    let fds_start = rig.stable_fds();
    let (rss_start, _) = rig.rss_kib();
    let world = World {
        rig: &rig,
        stats: Stats::default(),
        stop: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
        away: Mutex::new(Vec::new()),
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(args.seconds);
    std::thread::scope(|s| {
        let w = &world;
        for i in 0..args.workers {
            let seed = args.seed.wrapping_add(i as u64 + 1);
            s.spawn(move || worker(w, Rng::new(seed)));
        }
        s.spawn(|| chaos(w, Rng::new(args.seed ^ 0xC4A05)));
        s.spawn(|| hostile_clients(w, Rng::new(args.seed ^ 0x4057)));
        s.spawn(|| listener(w));
        let mut last_report = Instant::now();
        while Instant::now() < deadline && world.failures.lock().is_ok_and(|f| f.is_empty()) {
            std::thread::sleep(Duration::from_secs(1));
            if let Err(e) = responsive(&rig) {
                world.fail(e);
            }
            world.stats.list_checks.fetch_add(1, Ordering::Relaxed);
            if last_report.elapsed() >= Duration::from_secs(30) {
                last_report = Instant::now();
                println!(
                    "soak: {:>5.0} s: {} connections, {} MiB verified, RSS {} KiB, fds {}",
                    t0.elapsed().as_secs_f64(),
                    world.stats.connections.load(Ordering::Relaxed),
                    world.stats.bytes.load(Ordering::Relaxed) >> 20,
                    rig.rss_kib().0,
                    rig.fds()
                );
            }
        }
        world.stop.store(true, Ordering::SeqCst);
    });
    // Everything back: every phone plugged in and listed, no client left; the fds must return
    // to where they started.
    for p in rig.phones.phones() {
        p.plug_in();
    }
    let relisted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rig.wait_all_phones();
    }));
    if relisted.is_err() {
        world.fail("not every phone came back at the end".into());
    }
    let fds_ok = usbmux_tests::net::poll_until(Duration::from_secs(15), || {
        (rig.fds() == fds_start).then_some(())
    });
    let fds_end = rig.fds();
    if fds_ok.is_none() {
        world.fail(format!(
            "daemon fds {fds_end} at the end, {fds_start} at the start: {}",
            hostile::fd_listing(rig.pid())
        ));
    }
    let (rss_end, rss_peak) = rig.rss_kib();
    let st = &world.stats;
    let elapsed = t0.elapsed().as_secs_f64();
    println!("soak: {elapsed:.0} s, seed {}", args.seed);
    println!(
        "  connections completed   {}",
        st.connections.load(Ordering::Relaxed)
    );
    println!(
        "  bytes verified          {} ({:.1} MiB/s)",
        st.bytes.load(Ordering::Relaxed),
        st.bytes.load(Ordering::Relaxed) as f64 / elapsed / 1048576.0
    );
    println!(
        "  interrupted by unplug   {}",
        st.interrupted.load(Ordering::Relaxed)
    );
    println!(
        "  connects to absent phone {}",
        st.absent.load(Ordering::Relaxed)
    );
    println!(
        "  unplug/replug cycles    {}",
        st.unplugs.load(Ordering::Relaxed)
    );
    println!(
        "  hostile clients         {}",
        st.hostile.load(Ordering::Relaxed)
    );
    println!(
        "  notifications seen      {}",
        st.notifications.load(Ordering::Relaxed)
    );
    println!(
        "  ListDevices checks      {} (each < 100 ms)",
        st.list_checks.load(Ordering::Relaxed)
    );
    println!("  daemon RSS KiB          start {rss_start}, end {rss_end}, peak {rss_peak}");
    println!("  daemon fds              start {fds_start}, end {fds_end}");
    let failures = world.failures.into_inner().unwrap_or_default();
    let alive = {
        let mut r = rig;
        let a = r.alive();
        if a {
            r.stop();
        }
        a
    };
    if !alive {
        println!("soak: FAILED: the daemon died");
        std::process::exit(1);
    }
    if failures.is_empty() {
        println!("soak: PASSED");
    } else {
        println!("soak: FAILED ({} failures):", failures.len());
        for f in failures.iter().take(20) {
            println!("  {f}");
        }
        std::process::exit(1);
    }
}

/// Builds the release `usbmuxd` next to this binary if it is not there.
fn ensure_usbmuxd() {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
    else {
        return;
    };
    if dir.join("usbmuxd").exists() {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile = if dir.ends_with("release") {
        vec!["--release"]
    } else {
        vec![]
    };
    eprintln!("soak: building usbmuxd");
    let ok = std::process::Command::new(cargo)
        .args(["build", "-p", "usbmux-host", "--bin", "usbmuxd"])
        .args(profile)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("soak: could not build usbmuxd");
        std::process::exit(2);
    }
}

fn responsive(rig: &Rig) -> Result<(), String> {
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        if client::list_devices(rig.address()).is_ok() {
            best = best.min(t.elapsed());
        }
        if best < hostile::LIST_DEADLINE {
            return Ok(());
        }
    }
    Err(format!("ListDevices took {best:?} (best of five)"))
}

/// One connection after another, each verified.
fn worker(w: &World<'_>, mut rng: Rng) {
    while w.running() {
        let ends_before: Vec<u64> = w
            .rig
            .phones
            .phones()
            .iter()
            .map(|p| p.plug_ends())
            .collect();
        let listed = match client::list_devices(w.rig.address()) {
            Ok(l) if !l.is_empty() => l,
            Ok(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                w.fail(format!("ListDevices failed: {e}"));
                return;
            }
        };
        let d = &listed[rng.below(listed.len() as u64) as usize];
        let Some((idx, phone)) = w
            .rig
            .phones
            .phones()
            .iter()
            .enumerate()
            .find(|(_, p)| p.udid() == d.serial)
        else {
            w.fail(format!("unknown phone {} listed", d.serial));
            return;
        };
        let port = if rng.below(2) == 0 { ECHO } else { DIGEST };
        let len = rng.size(4 << 20);
        let seed = rng.next();
        let outcome = one_transfer(w.rig.address(), d.device_id as u32, port, seed, len);
        match outcome {
            Ok(()) => {
                w.stats.connections.fetch_add(1, Ordering::Relaxed);
                w.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(Outcome::Absent) => {
                w.stats.absent.fetch_add(1, Ordering::Relaxed);
            }
            Err(Outcome::Corrupt(what)) => w.fail(format!(
                "corrupted transfer ({len} bytes to port {port} of {}): {what}",
                d.serial
            )),
            Err(Outcome::Cut(what)) => {
                // Allowed only if the phone was unplugged meanwhile (its plug end may be
                // registered a moment after the client saw the reset), or just before (the
                // daemon may list a phone whose departure it is still processing).
                let explained = usbmux_tests::net::poll_until(Duration::from_secs(3), || {
                    (phone.plug_ends() > ends_before[idx]
                        || phone.ended_within(Duration::from_secs(2)))
                    .then_some(())
                });
                if explained.is_some() {
                    w.stats.interrupted.fetch_add(1, Ordering::Relaxed);
                } else {
                    w.fail(format!(
                        "transfer of {len} bytes to port {port} of {} cut without an unplug: {what}",
                        d.serial
                    ));
                }
            }
        }
    }
}

enum Outcome {
    /// The phone was not there (BadDevice): it left between ListDevices and Connect.
    Absent,
    /// Ended early with an exact prefix (reset, refused, EOF).
    Cut(String),
    /// Wrong bytes.
    Corrupt(String),
}

fn one_transfer(
    address: &str,
    device_id: u32,
    port: u16,
    seed: u64,
    len: usize,
) -> Result<(), Outcome> {
    let s = match connect(address, device_id, port) {
        Ok(s) => s,
        Err(Ok(ResultCode::BadDevice)) => return Err(Outcome::Absent),
        Err(Ok(e)) => return Err(Outcome::Cut(format!("Connect answered {e:?}"))),
        Err(Err(e)) => return Err(Outcome::Cut(format!("Connect: {e}"))),
    };
    let data = usbmux_tests::net::pattern(seed, len);
    let (to_send, expect) = if port == DIGEST {
        let mut m = (len as u64).to_be_bytes().to_vec();
        m.extend_from_slice(&data);
        (m, Sha256::digest(&data).to_vec())
    } else {
        (data.clone(), data)
    };
    let (Ok(mut r), Ok(mut wr)) = (s.try_clone(), s.try_clone()) else {
        return Err(Outcome::Cut("clone".into()));
    };
    std::thread::scope(|sc| {
        let to_send = &to_send;
        sc.spawn(move || {
            let _ = wr.write_all(to_send);
        });
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            if got == expect.len() {
                break Ok(());
            }
            let want = buf.len().min(expect.len() - got);
            match r.read(&mut buf[..want]) {
                Ok(0) => break Err(Outcome::Cut(format!("EOF after {got} bytes"))),
                Ok(n) => {
                    if buf[..n] != expect[got..got + n] {
                        break Err(Outcome::Corrupt(format!("bytes {got}..{} differ", got + n)));
                    }
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(Outcome::Cut(format!("{e} after {got} bytes"))),
            }
        };
        if end.is_err() {
            if let ClientStream::Unix(u) = &s {
                let _ = u.shutdown(std::net::Shutdown::Both);
            }
        }
        end
    })
}

/// A binary Connect: the stream, or the Result code, or the I/O error on the way.
fn connect(
    address: &str,
    device_id: u32,
    port: u16,
) -> Result<ClientStream, Result<ResultCode, io::Error>> {
    let mut s = ClientStream::connect(address).map_err(Err)?;
    let msg = BinaryMessage::Connect(usbmux_host::proto::ConnectRequest { device_id, port })
        .to_vec(1)
        .map_err(|e| Err(io::Error::other(e.to_string())))?;
    s.write_all(&msg).map_err(Err)?;
    let (h, body) = s.read_message().map_err(Err)?;
    match BinaryMessage::parse_body(h.message, &body) {
        Ok(BinaryMessage::Result(ResultCode::Ok)) => Ok(s),
        Ok(BinaryMessage::Result(code)) => Err(Ok(code)),
        other => Err(Err(io::Error::other(format!("reply {other:?}")))),
    }
}

/// Unplugs a random phone now and then, for a random while.
fn chaos(w: &World<'_>, mut rng: Rng) {
    let phones = w.rig.phones.phones();
    while w.running() {
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
        let i = rng.below(phones.len() as u64) as usize;
        let away_ms = 100 + rng.below(900);
        {
            let Ok(mut away) = w.away.lock() else { return };
            if away.len() >= phones.len() / 2 || away.contains(&i) {
                continue;
            }
            away.push(i);
        }
        phones[i].unplug_for(Duration::from_millis(away_ms));
        w.stats.unplugs.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        // Wait until it is back (or the run ends), then let it be chosen again.
        while w.running() && t.elapsed() < Duration::from_millis(away_ms + 3000) {
            if t.elapsed() > Duration::from_millis(away_ms) && w.rig.device_id(i).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(mut away) = w.away.lock() {
            away.retain(|&k| k != i);
        }
    }
}

/// A hostile client every ~50 ms, its answer checked.
fn hostile_clients(w: &World<'_>, mut rng: Rng) {
    let addr = w.rig.address();
    while w.running() {
        std::thread::sleep(Duration::from_millis(25 + rng.below(50)));
        let kind = rng.below(8);
        let r = match kind {
            0 => expect_closed(addr, &header(rng.below(16) as u32, 1, 8), None),
            1 => expect_closed(addr, &header(u32::MAX - rng.below(1000) as u32, 1, 8), None),
            2 => expect_result(addr, &header(16, 0, 50 + rng.below(200) as u32), 1),
            3 => {
                let nest = "<array>".repeat(9_000);
                let body = format!(
                    "<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>MessageType</key>\
                     <string>ListDevices</string><key>X</key>{nest}"
                );
                expect_closed(addr, &plist_body(body.as_bytes()), Some(1))
            }
            4 => expect_closed(
                addr,
                &plist_body(&usbmux_tests::net::pattern(
                    rng.next(),
                    1 + rng.size(60_000),
                )),
                Some(1),
            ),
            5 => {
                let body = format!(
                    "<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>MessageType</key>\
                     <string>ReadPairRecord</string><key>PairRecordID</key><string>../{}</string>\
                     </dict></plist>",
                    rng.next()
                );
                expect_result(addr, &plist_body(body.as_bytes()), 22)
            }
            6 => match hostile::connect(addr, 100_000 + rng.below(1000) as u32, ECHO) {
                Err(ResultCode::BadDevice) => Ok(()),
                other => Err(format!("Connect to an absent device: {:?}", other.err())),
            },
            _ => {
                // Listen and never read for a second, or connect and leave at once.
                match ClientStream::connect(addr) {
                    Ok(mut s) => {
                        if rng.below(2) == 0 {
                            let _ =
                                s.write_all(&BinaryMessage::Listen.to_vec(1).unwrap_or_default());
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        Ok(())
                    }
                    Err(e) => Err(format!("connect: {e}")),
                }
            }
        };
        w.stats.hostile.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r {
            w.fail(format!("hostile client {kind}: {e}"));
        }
    }
}

fn header(length: u32, version: u32, message: u32) -> Vec<u8> {
    [length, version, message, 1]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn plist_body(body: &[u8]) -> Vec<u8> {
    usbmux_host::plist_msg::encode_message(1, body).unwrap_or_default()
}

fn expect_closed(addr: &str, bytes: &[u8], reply: Option<u32>) -> Result<(), String> {
    let mut c = ClientStream::connect(addr).map_err(|e| e.to_string())?;
    let _ = c.write_all(bytes);
    let got = read_until_closed_within(&mut c, Duration::from_secs(5))
        .map_err(|_| "the daemon kept a hostile client open".to_string())?;
    match reply {
        None if got.is_empty() => Ok(()),
        Some(n) if result_of(&got) == Some(n) => Ok(()),
        _ => Err(format!(
            "expected {reply:?} and close, got {} bytes",
            got.len()
        )),
    }
}

fn expect_result(addr: &str, bytes: &[u8], n: u32) -> Result<(), String> {
    let mut c = ClientStream::connect(addr).map_err(|e| e.to_string())?;
    c.write_all(bytes).map_err(|e| e.to_string())?;
    let (h, body) = c.read_message().map_err(|e| e.to_string())?;
    let mut whole = h.to_bytes().map_err(|e| e.to_string())?.to_vec();
    whole.extend_from_slice(&body);
    match result_of(&whole) {
        Some(got) if got == n => Ok(()),
        got => Err(format!("expected Result {n}, got {got:?}")),
    }
}

/// One Listen client throughout: notifications must alternate Attached/Detached per DeviceID.
fn listener(w: &World<'_>) {
    let Ok(mut s) = ClientStream::connect(w.rig.address()) else {
        w.fail("listener: connect".into());
        return;
    };
    let _ = s.set_timeouts(Some(Duration::from_millis(200)));
    if s.write_all(&BinaryMessage::Listen.to_vec(1).unwrap_or_default())
        .is_err()
    {
        w.fail("listener: send".into());
        return;
    }
    let mut attached = std::collections::HashSet::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while w.running() {
        match s.read(&mut chunk) {
            Ok(0) => {
                w.fail("listener: the daemon closed the Listen connection".into());
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                w.fail(format!("listener: {e}"));
                return;
            }
        }
        while let Ok((h, _)) = usbmux_host::proto::Header::split(&buf) {
            let len = h.total_len();
            let msg = buf.drain(..len).collect::<Vec<u8>>();
            match BinaryMessage::parse(&msg).map(|(_, m)| m) {
                Ok(BinaryMessage::DeviceAdd(r)) => {
                    w.stats.notifications.fetch_add(1, Ordering::Relaxed);
                    if !attached.insert(r.device_id) {
                        w.fail(format!("listener: device {} attached twice", r.device_id));
                    }
                }
                Ok(BinaryMessage::DeviceRemove { device_id }) => {
                    w.stats.notifications.fetch_add(1, Ordering::Relaxed);
                    if !attached.remove(&device_id) {
                        w.fail(format!("listener: device {device_id} removed unannounced"));
                    }
                }
                Ok(BinaryMessage::Result(_) | BinaryMessage::DevicePaired { .. }) => {}
                other => w.fail(format!("listener: unexpected {other:?}")),
            }
        }
    }
}
