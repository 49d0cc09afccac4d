//! Row 3 (daemon end to end) and the rig rows 5 and 6 share: our `usbmuxd` release binary as a
//! child process, its phones either out of process (`usbmux-sim serve`, `--sim-socket`: the
//! daemon's CPU and memory are its own) or in it (`--simulate N`: the in-process virtual
//! cable), and clients in this process.
//!
//! Each transfer is timed from its first byte to its end: discard until the daemon closed the
//! connection after our shutdown (so everything was handed to the phone), source until N bytes
//! arrived (the first byte of every read checked), echo until all N bytes came back (checked
//! likewise). The same transfers against a bare Unix socket served by threads of this process
//! are the baseline: what the kernel's sockets and this client manage without a daemon.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use usbmux_host::client::{Client, SocketAddress};
use usbmux_sim::service::source_byte;

use crate::util::{cpu_seconds, sibling, unix_address, wait_until, Proc, Row};

/// Ports of the simulated phone's services.
pub const ECHO: u16 = 7;
/// Discard service.
pub const DISCARD: u16 = 9;
/// Source service.
pub const SOURCE: u16 = 19;

/// Our daemon with its phones, in a private directory.
pub struct Rig {
    /// Dropped last: the processes go first.
    pub daemon: Proc,
    /// `usbmux-sim serve`, when the phones are out of process.
    pub sim: Option<Proc>,
    /// `USBMUXD_SOCKET_ADDRESS` of the daemon.
    pub address: String,
    /// DeviceIDs of the phones.
    pub devices: Vec<u32>,
    dir: tempfile::TempDir,
}

impl Rig {
    /// Starts `usbmuxd` with `phones` simulated phones, out of process (`usbmux-sim serve`)
    /// or in the daemon (`--simulate`), and waits until all are listed.
    pub fn start(phones: usize, out_of_process: bool) -> Rig {
        let usbmuxd = sibling("usbmuxd").expect("cargo build --release -p usbmux-host --bins");
        let dir = tempfile::tempdir().expect("dir");
        let sock = dir.path().join("usbmuxd");
        let mut sim = None;
        let mut cmd = Command::new(usbmuxd);
        cmd.arg("-f")
            .arg("-S")
            .arg(&sock)
            .arg("-C")
            .arg(dir.path().join("lockdown"))
            .env("XDG_RUNTIME_DIR", dir.path());
        if out_of_process {
            let bin = sibling("usbmux-sim").expect("cargo build --release -p usbmux-sim");
            let paths: Vec<PathBuf> = (1..=phones)
                .map(|k| dir.path().join(format!("phone{k}")))
                .collect();
            sim = Some(Proc::spawn(
                Command::new(bin).arg("serve").arg("--quiet").args(&paths),
            ));
            wait_until("usbmux-sim sockets", Duration::from_secs(20), || {
                paths.iter().all(|p| p.exists())
            });
            for p in &paths {
                cmd.arg("--sim-socket").arg(p);
            }
        } else {
            cmd.arg("--simulate").arg(phones.to_string());
        }
        let daemon = Proc::spawn(&mut cmd);
        let address = unix_address(&sock);
        let client = client(&address);
        let mut devices = Vec::new();
        wait_until("the phones to be listed", Duration::from_secs(30), || {
            devices = client
                .list_devices()
                .map(|d| d.iter().map(|d| d.device_id).collect())
                .unwrap_or_default();
            devices.len() == phones
        });
        devices.sort_unstable();
        Rig {
            daemon,
            sim,
            address,
            devices,
            dir,
        }
    }

    /// A client of the daemon.
    pub fn client(&self) -> Client {
        client(&self.address)
    }

    /// The rig's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn client(address: &str) -> Client {
    Client::with_address(SocketAddress::parse(address).expect("address"))
        .with_timeout(Duration::from_secs(30))
}

/// What a transfer does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Service {
    /// Client writes, phone drops.
    Discard,
    /// Phone writes, client reads.
    Source,
    /// Client writes, phone returns it.
    Echo,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Discard => "discard",
            Service::Source => "source",
            Service::Echo => "echo",
        }
    }

    fn port(self) -> u16 {
        match self {
            Service::Discard => DISCARD,
            Service::Source => SOURCE,
            Service::Echo => ECHO,
        }
    }
}

/// 1 MiB-ish of the source pattern, a whole number of its periods (251 × 256), so writing it
/// again and again continues the pattern.
fn source_block() -> Vec<u8> {
    (0..251u64 * 256 * 16).map(source_byte).collect()
}

/// A bare Unix-socket server in this process with the phone's discard, source and echo
/// behaviour, one listener per service: the baseline.
pub struct Baseline {
    paths: [PathBuf; 3],
}

impl Baseline {
    /// Binds the three baseline sockets in `dir` and serves them from threads.
    pub fn start(dir: &Path) -> Baseline {
        let paths = [
            dir.join("base-discard"),
            dir.join("base-source"),
            dir.join("base-echo"),
        ];
        for (k, p) in paths.iter().enumerate() {
            let l = UnixListener::bind(p).expect("baseline socket");
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || serve_baseline(k, s));
                }
            });
        }
        Baseline { paths }
    }

    /// The socket of `s`.
    pub fn path(&self, s: Service) -> &Path {
        &self.paths[match s {
            Service::Discard => 0,
            Service::Source => 1,
            Service::Echo => 2,
        }]
    }
}

fn serve_baseline(kind: usize, mut s: UnixStream) {
    let mut buf = vec![0u8; 256 * 1024];
    match kind {
        0 => while matches!(s.read(&mut buf), Ok(n) if n > 0) {},
        1 => {
            let block = source_block();
            while s.write_all(&block).is_ok() {}
        }
        _ => {
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

/// A byte pipe to a service: through the daemon or the baseline.
trait Stream: Read + Write + Send + 'static {
    fn clone_box(&self) -> Box<dyn Stream>;
    fn shutdown_write(&self);
}

impl Stream for UnixStream {
    fn clone_box(&self) -> Box<dyn Stream> {
        Box::new(self.try_clone().expect("clone"))
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Stream for usbmux_host::client::UsbmuxStream {
    fn clone_box(&self) -> Box<dyn Stream> {
        Box::new(self.try_clone().expect("clone"))
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Moves `bytes` through `s` as `service` does; returns the seconds from `start` to the end.
fn transfer(
    mut s: Box<dyn Stream>,
    service: Service,
    bytes: u64,
    block: &[u8],
) -> Result<f64, String> {
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    match service {
        Service::Discard => {
            let mut sent = 0u64;
            while sent < bytes {
                let n = block.len().min((bytes - sent) as usize);
                s.write_all(&block[..n]).map_err(|e| e.to_string())?;
                sent += n as u64;
            }
            s.shutdown_write();
            // The end: the daemon (or baseline) closes once everything was taken.
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        Service::Source => read_checked(&mut s, bytes, &mut buf, source_byte)?,
        Service::Echo => {
            let mut w = s.clone_box();
            let len = block.len() as u64;
            std::thread::scope(|sc| {
                let writer = sc.spawn(move || {
                    let mut sent = 0u64;
                    while sent < bytes {
                        let n = block.len().min((bytes - sent) as usize);
                        w.write_all(&block[..n]).map_err(|e| e.to_string())?;
                        sent += n as u64;
                    }
                    Ok::<(), String>(())
                });
                let r = read_checked(&mut s, bytes, &mut buf, |i| block[(i % len) as usize]);
                writer.join().map_err(|_| "writer panicked".to_string())??;
                r
            })?;
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Reads `bytes`, checking the first byte of every read against `expect`.
fn read_checked(
    s: &mut Box<dyn Stream>,
    bytes: u64,
    buf: &mut [u8],
    expect: impl Fn(u64) -> u8,
) -> Result<(), String> {
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("ended after {got} of {bytes} bytes"));
        }
        if buf[0] != expect(got) {
            return Err(format!("data altered at byte {got}"));
        }
        got += n as u64;
    }
    Ok(())
}

/// Outcome of `conns` parallel transfers.
pub struct Outcome {
    /// All bytes over the time from the common start to the last end.
    pub aggregate_mbs: f64,
    /// Slowest and fastest connection's own MB/s.
    pub min_mbs: f64,
    /// Fastest connection's MB/s.
    pub max_mbs: f64,
    /// CPU seconds of the watched processes per GB (payload, one direction).
    pub cpu_per_gb: [f64; 3],
}

/// Runs `conns` transfers of `total / conns` bytes each in parallel, all started together.
fn parallel(
    open: &dyn Fn() -> Box<dyn Stream>,
    service: Service,
    conns: usize,
    total: u64,
    watch: [Option<u32>; 3],
) -> Result<Outcome, String> {
    let per = total / conns as u64;
    let block = Arc::new(match service {
        Service::Source => Vec::new(),
        _ => (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect::<Vec<u8>>(),
    });
    let streams: Vec<Box<dyn Stream>> = (0..conns).map(|_| open()).collect();
    let barrier = Arc::new(Barrier::new(conns + 1));
    let handles: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let (barrier, block) = (barrier.clone(), block.clone());
            std::thread::spawn(move || {
                barrier.wait();
                transfer(s, service, per, &block)
            })
        })
        .collect();
    let cpu0 = watch.map(|p| p.map(cpu_seconds));
    barrier.wait();
    let t0 = Instant::now();
    let mut times = Vec::new();
    for h in handles {
        times.push(h.join().map_err(|_| "transfer panicked".to_string())??);
    }
    let wall = t0.elapsed().as_secs_f64();
    let moved = per * conns as u64;
    let cpu = [0, 1, 2].map(|k| match (watch[k], cpu0[k]) {
        (Some(pid), Some(c0)) => (cpu_seconds(pid) - c0) / (moved as f64 / 1e9),
        _ => f64::NAN,
    });
    let rates: Vec<f64> = times.iter().map(|t| per as f64 / t / 1e6).collect();
    Ok(Outcome {
        aggregate_mbs: moved as f64 / wall / 1e6,
        min_mbs: rates.iter().copied().fold(f64::INFINITY, f64::min),
        max_mbs: rates.iter().copied().fold(0.0, f64::max),
        cpu_per_gb: cpu,
    })
}

/// Row 3.
pub fn run(quick: bool, rows: &mut Vec<Row>) {
    let total: u64 = if quick { 128 << 20 } else { 1 << 30 };
    println!(
        "daemon: {} MiB per transfer (64 connections: {} MiB each)",
        total >> 20,
        (total / 64) >> 20
    );
    let oop = Rig::start(1, true);
    let inproc = Rig::start(1, false);
    let base = Baseline::start(oop.dir());
    let services = [Service::Discard, Service::Source, Service::Echo];
    for conns in [1usize, 64] {
        for &service in &services {
            let open_base = |path: PathBuf| {
                move || -> Box<dyn Stream> {
                    Box::new(UnixStream::connect(&path).expect("baseline connect"))
                }
            };
            let rig_open = |rig: &Rig| {
                let (c, dev) = (rig.client(), rig.devices[0]);
                move || -> Box<dyn Stream> {
                    Box::new(c.connect(dev, service.port()).expect("connect"))
                }
            };
            let b = parallel(
                &open_base(base.path(service).to_path_buf()),
                service,
                conns,
                total,
                [None, None, None],
            );
            let o = parallel(
                &rig_open(&oop),
                service,
                conns,
                total,
                [
                    Some(oop.daemon.pid()),
                    oop.sim.as_ref().map(Proc::pid),
                    Some(std::process::id()),
                ],
            );
            let i = parallel(
                &rig_open(&inproc),
                service,
                conns,
                total,
                [Some(inproc.daemon.pid()), None, None],
            );
            let (b, o, i) = match (b, o, i) {
                (Ok(b), Ok(o), Ok(i)) => (b, o, i),
                (b, o, i) => {
                    eprintln!(
                        "bench: daemon {} x{conns}: baseline {:?}, out of process {:?}, in process {:?}",
                        service.name(),
                        b.err(),
                        o.err(),
                        i.err()
                    );
                    continue;
                }
            };
            let what = format!(
                "{}, {conns} conn{}",
                service.name(),
                if conns > 1 { "s" } else { "" }
            );
            let goal = |r: Row, v: f64| {
                if conns == 1 {
                    r.target("≥ 1250 MB/s", v >= 1250.0)
                } else {
                    r
                }
            };
            rows.push(goal(
                Row::new(
                    "daemon",
                    format!("{what}, phone out of process"),
                    o.aggregate_mbs,
                    "MB/s",
                )
                .baseline("bare Unix socket", b.aggregate_mbs),
                o.aggregate_mbs,
            ));
            rows.push(goal(
                Row::new(
                    "daemon",
                    format!("{what}, phone in process (virtual cable)"),
                    i.aggregate_mbs,
                    "MB/s",
                )
                .baseline("bare Unix socket", b.aggregate_mbs),
                i.aggregate_mbs,
            ));
            rows.push(Row::new(
                "daemon",
                format!("{what}, daemon CPU (phone out of process)"),
                o.cpu_per_gb[0],
                "CPU s/GB",
            ));
            if conns == 1 {
                // What the daemon would move with a core of its own, if CPU were its only limit:
                // the wall figures share 2 cores with the phone, the client and other work.
                rows.push(Row::new(
                    "daemon",
                    format!(
                        "{what}, daemon's CPU-bound ceiling on one core (1 / its CPU s per GB)"
                    ),
                    1000.0 / o.cpu_per_gb[0],
                    "MB/s",
                ));
            }
            rows.push(Row::new(
                "daemon",
                format!("{what}, phone process CPU (usbmux-sim serve)"),
                o.cpu_per_gb[1],
                "CPU s/GB",
            ));
            rows.push(Row::new(
                "daemon",
                format!("{what}, client CPU (this process; phone out of process)"),
                o.cpu_per_gb[2],
                "CPU s/GB",
            ));
            rows.push(Row::new(
                "daemon",
                format!("{what}, daemon + phone CPU (phone in process)"),
                i.cpu_per_gb[0],
                "CPU s/GB",
            ));
            if conns > 1 {
                rows.push(
                    Row::new(
                        "daemon",
                        format!("{what}, slowest connection (phone out of process)"),
                        o.min_mbs,
                        "MB/s",
                    )
                    .baseline("fastest connection", o.max_mbs),
                );
            }
        }
    }
}
