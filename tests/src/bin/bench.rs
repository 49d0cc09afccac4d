//! `cargo run --release -p usbmux-tests --bin bench`: end-to-end figures of usbmux-rs next to
//! the C tools, measured in the same run so the ratios hold on a noisy machine.
//!
//! Today it has the tools row of the benchmark suite: our `iproxy` against libusbmuxd's C
//! `iproxy` (Debian `libusbmuxd-tools`) on the same daemon (ours, in this process, release
//! build) and the same simulated phone, moving the same bytes:
//! - host → phone: an 8-byte length then N bytes into the phone's digest service (port 1999),
//!   timed until its SHA-256 answer arrives (so every byte went through), the answer checked;
//! - phone → host: N bytes read from the phone's source service (port 19), checked.
//!
//! Throughput is MB/s of payload; CPU is the iproxy process's user + system time (from
//! `/proc/PID/stat`) per GB moved. Each figure is the median of `--reps` interleaved runs.
//! `--quick` moves 64 MiB per run instead of 256 MiB. `--json FILE` writes the rows as JSON.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use usbmux_host::daemon::{self, DaemonConfig, SocketSpec};
use usbmux_sim::service::source_byte;
use usbmux_sim::PhoneConfig;

struct Args {
    quick: bool,
    reps: usize,
    json: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        reps: 3,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--reps" => a.reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(3).max(1),
            "--json" => a.json = it.next().map(PathBuf::from),
            other => {
                eprintln!("bench: unknown argument {other:?} (--quick, --reps N, --json FILE)");
                std::process::exit(2);
            }
        }
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// user + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

struct Proxy {
    child: Child,
    port_digest: u16,
    port_source: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an iproxy binary with two forwards, `L1:1999 L2:19` (one process for both
/// directions; libusbmuxd-tools 2.0.2 takes several pairs too), and waits until both listen.
fn start_proxy(bin: &Path, address: &str) -> Proxy {
    let (pd, ps) = (free_port(), free_port());
    let child = Command::new(bin)
        .arg(format!("{pd}:1999"))
        .arg(format!("{ps}:19"))
        .env("USBMUXD_SOCKET_ADDRESS", address)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn iproxy");
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
        child,
        port_digest: pd,
        port_source: ps,
    }
}

/// Host → phone through `port` (digest): seconds, or an error if the digest did not match.
fn upload(port: u16, total: u64, block: &[u8]) -> Result<f64, String> {
    let mut s = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    s.write_all(&total.to_be_bytes())
        .map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut sent = 0u64;
    while sent < total {
        let n = block.len().min((total - sent) as usize);
        s.write_all(&block[..n]).map_err(|e| e.to_string())?;
        h.update(&block[..n]);
        sent += n as u64;
    }
    let mut answer = [0u8; 32];
    s.read_exact(&mut answer)
        .map_err(|e| format!("digest answer: {e}"))?;
    let dt = t0.elapsed().as_secs_f64();
    if answer[..] != h.finalize()[..] {
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
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let t0 = Instant::now();
    while got < total {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
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
    Ok(t0.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[allow(clippy::needless_range_loop)] // `dir` picks both the function and the result slot
fn main() {
    let a = args();
    let total: u64 = if a.quick { 64 << 20 } else { 256 << 20 };
    let exe = std::env::current_exe().expect("exe");
    let ours = exe.with_file_name("iproxy");
    let theirs = PathBuf::from("/usr/bin/iproxy");
    let mut impls: Vec<(&str, PathBuf)> = Vec::new();
    if ours.exists() {
        impls.push(("usbmux-rs iproxy", ours));
    } else {
        eprintln!(
            "bench: our iproxy is not built: cargo build --release -p usbmux-host --bin iproxy"
        );
    }
    if theirs.exists() {
        impls.push(("libusbmuxd iproxy (C)", theirs));
    } else {
        eprintln!("bench: no C iproxy (apt-get install libusbmuxd-tools): our figures only");
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
        "machine: {} cores; {} MiB per run, median of {} interleaved runs",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        total >> 20,
        a.reps
    );
    println!(
        "daemon: usbmux-rs usbmuxd (release, in this process), one simulated phone in-process"
    );
    // results[impl][dir] = (MB/s samples, CPU s/GB samples)
    let mut results = vec![[(Vec::new(), Vec::new()), (Vec::new(), Vec::new())]; impls.len()];
    for _ in 0..a.reps {
        for (k, (name, bin)) in impls.iter().enumerate() {
            let p = start_proxy(bin, &address);
            let pid = p.child.id();
            for dir in 0..2 {
                let cpu0 = cpu_seconds(pid);
                let r = if dir == 0 {
                    upload(p.port_digest, total, &block)
                } else {
                    download(p.port_source, total)
                };
                let cpu = cpu_seconds(pid) - cpu0;
                match r {
                    Ok(dt) => {
                        results[k][dir].0.push(total as f64 / dt / 1e6);
                        results[k][dir].1.push(cpu / (total as f64 / 1e9));
                    }
                    Err(e) => eprintln!("bench: {name}: {e}"),
                }
            }
        }
    }
    d.stop();

    let dirs = ["host -> phone (digest)", "phone -> host (source)"];
    println!(
        "{:<24} {:<24} {:>10} {:>14}",
        "tool", "direction", "MB/s", "CPU s per GB"
    );
    let mut rows = Vec::new();
    for (k, (name, _)) in impls.iter().enumerate() {
        for (dir, label) in dirs.iter().enumerate() {
            let (mbs, cpu) = &results[k][dir];
            if mbs.is_empty() {
                println!("{name:<24} {label:<24} {:>10} {:>14}", "failed", "-");
                continue;
            }
            let (m, c) = (median(mbs.clone()), median(cpu.clone()));
            println!("{name:<24} {label:<24} {m:>10.1} {c:>14.3}");
            rows.push(serde_json::json!({"tool": name, "direction": label, "mb_per_s": m, "cpu_s_per_gb": c}));
        }
    }
    if impls.len() == 2 {
        println!("ratios (usbmux-rs / C), target: throughput >= 1.0, CPU <= 1.0");
        for (dir, label) in dirs.iter().enumerate() {
            let ours = &results[0][dir];
            let theirs = &results[1][dir];
            if ours.0.is_empty() || theirs.0.is_empty() {
                continue;
            }
            let t = median(ours.0.clone()) / median(theirs.0.clone());
            let c = median(ours.1.clone()) / median(theirs.1.clone());
            println!(
                "  {label:<24} throughput {t:.2} ({}), CPU {c:.2} ({})",
                if t >= 1.0 { "met" } else { "not met" },
                if c <= 1.0 { "met" } else { "not met" }
            );
        }
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::Value::Array(rows).to_string()).expect("write json");
    }
}
