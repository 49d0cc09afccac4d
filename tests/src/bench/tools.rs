//! Row 4 (tools) and row 8 (iproxy copy method): our `iproxy` and `inetcat` against
//! libusbmuxd's C tools (Debian `libusbmuxd-tools`) on the same daemon (ours, in this process)
//! and the same simulated phone, moving the same bytes:
//! - host → phone: an 8-byte length then N bytes into the phone's digest service (port 1999),
//!   timed until its SHA-256 answer arrives (so every byte went through), the answer checked;
//! - phone → host: N bytes read from the phone's source service (port 19), checked.
//!
//! CPU is the tool process's user + system time (from `/proc/PID/stat`) per GB moved. Each
//! figure is the median of `reps` interleaved runs (every tool once per round).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use usbmux_host::daemon::{self, DaemonConfig, SocketSpec};
use usbmux_sim::service::source_byte;
use usbmux_sim::PhoneConfig;

use crate::util::{cpu_seconds, median, sibling, Proc, Row};

fn free_port() -> u16 {
    usbmux_tests::net::free_local_ports(1).expect("a free port")[0]
}

struct Proxy {
    proc: Proc,
    port_digest: u16,
    port_source: u16,
}

/// Starts an iproxy binary with two forwards, `L1:1999 L2:19` (one process for both
/// directions; libusbmuxd-tools 2.0.2 takes several pairs too), and waits until both listen.
fn start_proxy(bin: &Path, extra: &[&str], address: &str) -> Proxy {
    let (pd, ps) = (free_port(), free_port());
    let proc = Proc::spawn(
        Command::new(bin)
            .args(extra)
            .arg(format!("{pd}:1999"))
            .arg(format!("{ps}:19"))
            .env("USBMUXD_SOCKET_ADDRESS", address),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [pd, ps] {
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen",
                bin.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The probe connections above reached the phone and closed; let them settle.
    std::thread::sleep(Duration::from_millis(100));
    Proxy {
        proc,
        port_digest: pd,
        port_source: ps,
    }
}

/// Writes the digest request (length, then `total` bytes of `block` repeated) to `w` and
/// returns the SHA-256 the phone must answer.
fn feed_digest(w: &mut impl Write, total: u64, block: &[u8]) -> Result<[u8; 32], String> {
    w.write_all(&total.to_be_bytes())
        .map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut sent = 0u64;
    while sent < total {
        let n = block.len().min((total - sent) as usize);
        w.write_all(&block[..n]).map_err(|e| e.to_string())?;
        h.update(&block[..n]);
        sent += n as u64;
    }
    Ok(h.finalize().into())
}

/// Reads `total` bytes of the source pattern from `r`, checking every byte.
fn read_source(r: &mut impl Read, total: u64) -> Result<(), String> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < total {
        let n = r.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("source ended after {got} bytes"));
        }
        let n = n.min((total - got) as usize);
        if buf[..n]
            .iter()
            .enumerate()
            .any(|(i, &b)| b != source_byte(got + i as u64))
        {
            return Err(format!("source data altered near byte {got}"));
        }
        got += n as u64;
    }
    Ok(())
}

/// Host → phone through `port` (digest): seconds, or an error if the digest did not match.
fn upload(port: u16, total: u64, block: &[u8]) -> Result<f64, String> {
    let mut s = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let want = feed_digest(&mut s, total, block)?;
    let mut answer = [0u8; 32];
    s.read_exact(&mut answer)
        .map_err(|e| format!("digest answer: {e}"))?;
    let dt = t0.elapsed().as_secs_f64();
    if answer != want {
        return Err("digest mismatch: bytes were lost or altered".into());
    }
    Ok(dt)
}

/// Phone → host through `port` (source): seconds, bytes checked.
fn download(port: u16, total: u64) -> Result<f64, String> {
    let mut s = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    read_source(&mut s, total)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// One inetcat run: (seconds from spawn to the last byte, CPU seconds of the inetcat
/// process). `upload`: stdin → digest (stdin stays open until the answer is in: libusbmuxd's
/// inetcat exits at stdin's end and would drop it); else source → stdout.
fn inetcat_run(
    bin: &Path,
    address: &str,
    upload: bool,
    total: u64,
    block: &[u8],
) -> Result<(f64, f64), String> {
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .arg(if upload { "1999" } else { "19" })
        .env("USBMUXD_SOCKET_ADDRESS", address)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let proc = Proc(child);
    // A tool that loses bytes leaves the digest waiting forever: kill it after a while (the
    // reads below then end with an error).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        let limit = Duration::from_secs(5) + Duration::from_secs_f64(total as f64 / 50e6);
        std::thread::spawn(move || {
            let t = Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if t.elapsed() > limit {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
    };
    let r = if upload {
        std::thread::scope(|s| {
            let w = s.spawn(|| feed_digest(&mut stdin, total, block));
            let mut answer = [0u8; 32];
            let read = stdout
                .read_exact(&mut answer)
                .map_err(|e| format!("digest answer: {e}"));
            let dt = t0.elapsed().as_secs_f64();
            let want = w.join().map_err(|_| "writer panicked")??;
            read?;
            if answer != want {
                return Err("digest mismatch".to_string());
            }
            Ok(dt)
        })
    } else {
        read_source(&mut stdout, total).map(|()| t0.elapsed().as_secs_f64())
    };
    let cpu = cpu_seconds(pid);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let killed = watchdog.join().unwrap_or(false);
    drop(proc);
    match r {
        Err(e) if killed => Err(format!(
            "no answer within the time limit (bytes lost?): {e}"
        )),
        r => r.map(|dt| (dt, cpu)),
    }
}

/// Samples of one tool in one direction.
#[derive(Default, Clone)]
struct Samples {
    mbs: Vec<f64>,
    cpu_per_gb: Vec<f64>,
}

struct Tool {
    name: &'static str,
    bin: PathBuf,
    extra: &'static [&'static str],
    /// [host → phone, phone → host]
    s: [Samples; 2],
}

const DIRS: [&str; 2] = ["host→phone (digest)", "phone→host (source)"];

/// Runs rows 4 and 8; `splice_only`: row 8 alone (our iproxy's two copy methods, no C tools).
pub fn run(quick: bool, reps: usize, splice_only: bool, rows: &mut Vec<Row>) {
    let total: u64 = if quick { 64 << 20 } else { 256 << 20 };
    let c_iproxy = PathBuf::from("/usr/bin/iproxy");
    let c_inetcat = PathBuf::from("/usr/bin/inetcat");
    let mut proxies = Vec::new();
    let mut cats = Vec::new();
    match sibling("iproxy") {
        Some(p) => {
            proxies.push(Tool {
                name: "usbmux-rs iproxy",
                bin: p.clone(),
                extra: &[],
                s: Default::default(),
            });
            proxies.push(Tool {
                name: "usbmux-rs iproxy --copy splice",
                bin: p,
                extra: &["--copy", "splice"],
                s: Default::default(),
            });
        }
        None => eprintln!("bench: build ours: cargo build --release -p usbmux-host --bins"),
    }
    if c_iproxy.exists() && !splice_only {
        proxies.push(Tool {
            name: "libusbmuxd iproxy (C)",
            bin: c_iproxy,
            extra: &[],
            s: Default::default(),
        });
    }
    if let Some(p) = sibling("inetcat").filter(|_| !splice_only) {
        cats.push(Tool {
            name: "usbmux-rs inetcat",
            bin: p,
            extra: &[],
            s: Default::default(),
        });
    }
    if c_inetcat.exists() && !splice_only {
        cats.push(Tool {
            name: "libusbmuxd inetcat (C)",
            bin: c_inetcat,
            extra: &[],
            s: Default::default(),
        });
    }
    if !splice_only && !c_iproxy_or_inetcat_present(&proxies, &cats) {
        eprintln!("bench: no C tools (apt-get install libusbmuxd-tools): our figures only");
    }
    let dir = tempfile::tempdir().expect("dir");
    let d = daemon::start(DaemonConfig {
        activated: None,
        socket: SocketSpec::Unix {
            path: dir.path().join("usbmuxd"),
            mode: 0o600,
        },
        config_dir: dir.path().join("lockdown"),
        simulate: vec![PhoneConfig::simulated(1)],
        sim_sockets: vec![],
        session: usbmux_core::SessionConfig::default(),
        trace: None,
        usb: false,
        usb_on_demand: false,
    })
    .expect("daemon");
    let address = d.socket().client_address();
    std::thread::sleep(Duration::from_millis(200));
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    println!(
        "tools: {} MiB per run, median of {reps} interleaved runs; daemon: ours in this process, one in-process phone",
        total >> 20
    );
    let gb = total as f64 / 1e9;
    for _ in 0..reps {
        for t in proxies.iter_mut() {
            let p = start_proxy(&t.bin, t.extra, &address);
            for dir in 0..2 {
                let cpu0 = cpu_seconds(p.proc.pid());
                let r = if dir == 0 {
                    upload(p.port_digest, total, &block)
                } else {
                    download(p.port_source, total)
                };
                let cpu = cpu_seconds(p.proc.pid()) - cpu0;
                match r {
                    Ok(dt) => {
                        t.s[dir].mbs.push(total as f64 / dt / 1e6);
                        t.s[dir].cpu_per_gb.push(cpu / gb);
                    }
                    Err(e) => eprintln!("bench: {}: {e}", t.name),
                }
            }
        }
        for t in cats.iter_mut() {
            for dir in 0..2 {
                match inetcat_run(&t.bin, &address, dir == 0, total, &block) {
                    Ok((dt, cpu)) => {
                        t.s[dir].mbs.push(total as f64 / dt / 1e6);
                        t.s[dir].cpu_per_gb.push(cpu / gb);
                    }
                    Err(e) => eprintln!("bench: {}: {e}", t.name),
                }
            }
        }
    }
    d.stop();
    if !splice_only {
        report(&proxies, "libusbmuxd iproxy (C)", true, rows);
        report(&cats, "libusbmuxd inetcat (C)", false, rows);
    }
    // Row 8: our iproxy's copy methods against each other.
    if let (Some(buf), Some(spl)) = (
        proxies
            .iter()
            .find(|t| t.extra.is_empty() && t.name.starts_with("usbmux-rs")),
        proxies.iter().find(|t| !t.extra.is_empty()),
    ) {
        for (dir, label) in DIRS.iter().enumerate() {
            rows.push(
                Row::new(
                    "splice",
                    format!("iproxy --copy splice, {label}"),
                    median(spl.s[dir].mbs.clone()),
                    "MB/s",
                )
                .baseline("--copy buffer", median(buf.s[dir].mbs.clone())),
            );
            rows.push(
                Row::new(
                    "splice",
                    format!("iproxy --copy splice, {label}, CPU"),
                    median(spl.s[dir].cpu_per_gb.clone()),
                    "CPU s/GB",
                )
                .baseline("--copy buffer", median(buf.s[dir].cpu_per_gb.clone())),
            );
            // Both ran back to back in every round: the ratio within a round is the least
            // exposed to the machine's load drifting between rounds.
            let ratios: Vec<f64> = spl.s[dir]
                .mbs
                .iter()
                .zip(&buf.s[dir].mbs)
                .map(|(s, b)| s / b)
                .collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
            rows.push(Row::new(
                "splice",
                format!(
                    "splice / buffer throughput, {label}, median of {} per-round ratios (range {lo:.2}–{hi:.2})",
                    ratios.len()
                ),
                median(ratios),
                "×",
            ));
        }
    }
}

fn c_iproxy_or_inetcat_present(a: &[Tool], b: &[Tool]) -> bool {
    a.iter().chain(b).any(|t| t.name.contains("(C)"))
}

/// Rows of one tool family: ours against the C tool named `c_name`.
fn report(tools: &[Tool], c_name: &str, targets: bool, rows: &mut Vec<Row>) {
    let c = tools.iter().find(|t| t.name == c_name);
    // The splice variant is row 8's (against our default), not a contender of its own.
    for t in tools
        .iter()
        .filter(|t| t.name != c_name && t.extra.is_empty())
    {
        for (dir, label) in DIRS.iter().enumerate() {
            let mbs = median(t.s[dir].mbs.clone());
            let cpu = median(t.s[dir].cpu_per_gb.clone());
            let mut r1 = Row::new("tools", format!("{}, {label}", t.name), mbs, "MB/s");
            let mut r2 = Row::new(
                "tools",
                format!("{}, {label}, CPU", t.name),
                cpu,
                "CPU s/GB",
            );
            if let Some(c) = c {
                let (cm, cc) = (
                    median(c.s[dir].mbs.clone()),
                    median(c.s[dir].cpu_per_gb.clone()),
                );
                r1 = r1.baseline(c_name, cm);
                r2 = r2.baseline(c_name, cc);
                if targets {
                    r1 = r1.target("≥ 1.0 × C", mbs >= cm);
                    r2 = r2.target("≤ 1.0 × C", cpu <= cc);
                }
            }
            rows.push(r1);
            rows.push(r2);
        }
    }
    if let Some(c) = c {
        for (dir, label) in DIRS.iter().enumerate() {
            rows.push(Row::new(
                "tools",
                format!("{c_name}, {label}"),
                median(c.s[dir].mbs.clone()),
                "MB/s",
            ));
            rows.push(Row::new(
                "tools",
                format!("{c_name}, {label}, CPU"),
                median(c.s[dir].cpu_per_gb.clone()),
                "CPU s/GB",
            ));
        }
    }
}
