//! `usb-vm-client`: the checking and measuring client of the real-kernel USB harness
//! (`tests/usb-vm/`), run inside the QEMU guest against whichever usbmuxd owns the phone.
//!
//! The shell tools of the guest (busybox, the two projects' iproxy and inetcat) can move bytes
//! but cannot time them, check them against a reference or read a daemon's CPU time at the right
//! moments, so the harness uses this one client, through the same client library, for both
//! daemons: any difference in the figures is the daemons', not the clients'.
//!
//! Commands (one per line of output the guest script parses; exit status 0 = the check held):
//!
//! - `wait --udid U [--gone] [--timeout S]`: until the daemon lists U (prints its DeviceID), or
//!   with `--gone` until it no longer does.
//! - `digest TARGET --file F`: sends an 8-byte big-endian length and F to the digest service
//!   (1999) and prints the SHA-256 the phone answers, in hex (the script compares it with
//!   `sha256sum F`).
//! - `echo TARGET --sizes N,N,...`: for each size, that many random bytes to the echo service (7)
//!   on a fresh connection; every byte must come back in order.
//! - `drain TARGET [--port P] [--timeout S]`: reads until the connection ends and prints how it
//!   ended; exit status 3 if it did not end within S seconds (an unplug must not leave it hanging).
//! - `bench --udid U --pid PID --daemon NAME --rep N [sizes]`: the measurements of issue 7 for
//!   one daemon, printed as one `@@BENCH key=value ...` line.
//! - `traced --udid U --pid PID --daemon NAME --reps N --softirqs TRACEFS [--up-mib M]
//!   [--down-mib M]`: N more transfers each way, traced, for the daemon's CPU without the
//!   softirqs that ran on top of it; one `@@BENCH` line per repetition. The softirq trace events
//!   must be enabled already (while no daemon ran).
//! - `table FILE`: medians of the `@@BENCH` lines in FILE per daemon (`debian` and our variants),
//!   and each of ours against Debian's.
//!
//! TARGET is `--udid U` (a connection through the daemon's socket, `--socket` or
//! `USBMUXD_SOCKET_ADDRESS` or /var/run/usbmuxd) or `--tcp HOST:PORT` (through an iproxy that
//! listens there; the device port is then the proxy's business).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use usbmux_host::client::{Client, SocketAddress, UsbmuxStream};
use usbmux_sim::service::source_byte;

/// The phone's service ports (usbmux-sim's).
const ECHO: u16 = 7;
const DISCARD: u16 = 9;
const SOURCE: u16 = 19;
const DIGEST: u16 = 1999;

/// How long a check waits for bytes before it declares the path stuck: long enough for TCG's
/// slowest moments, short enough that a hang fails the case well within the boot's timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Parsed `--key value` options and flags of one command.
struct Opts {
    values: BTreeMap<String, String>,
    flags: Vec<String>,
    positional: Vec<String>,
}

impl Opts {
    /// Splits `args`: `--gone` is the only flag; every other `--key` takes a value.
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            values: BTreeMap::new(),
            flags: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(key) = a.strip_prefix("--") {
                if key == "gone" {
                    o.flags.push(key.to_string());
                } else {
                    let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
                    o.values.insert(key.to_string(), v.clone());
                }
            } else {
                o.positional.push(a.clone());
            }
        }
        Ok(o)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    fn need(&self, key: &str) -> Result<&str, String> {
        self.get(key).ok_or_else(|| format!("--{key} is required"))
    }

    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{key} {v:?}: not a number")),
        }
    }

    fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }
}

/// The client of the daemon under test.
fn client(o: &Opts) -> Result<Client, String> {
    let address = SocketAddress::resolve(o.get("socket")).map_err(|e| e.to_string())?;
    Ok(Client::with_address(address)
        .with_timeout(Duration::from_secs(10))
        .with_prog_name(Some("usb-vm-client".into())))
}

/// A connected byte pipe to a device port, through the daemon or a TCP proxy.
enum Pipe {
    Mux(UsbmuxStream),
    Tcp(TcpStream),
}

impl Pipe {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Pipe::Mux(s) => s.set_read_timeout(t),
            Pipe::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn try_clone(&self) -> io::Result<Pipe> {
        Ok(match self {
            Pipe::Mux(s) => Pipe::Mux(s.try_clone()?),
            Pipe::Tcp(s) => Pipe::Tcp(s.try_clone()?),
        })
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Pipe::Mux(s) => s.shutdown(Shutdown::Write),
            Pipe::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Pipe::Mux(s) => s.read(buf),
            Pipe::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Pipe::Mux(s) => s.write(buf),
            Pipe::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a command's connections go.
enum Target {
    /// Through the daemon to the device with this id.
    Mux { client: Client, device_id: u32 },
    /// To a TCP port (an iproxy).
    Tcp(String),
}

impl Target {
    fn from_opts(o: &Opts) -> Result<Target, String> {
        if let Some(addr) = o.get("tcp") {
            return Ok(Target::Tcp(addr.to_string()));
        }
        let udid = o.need("udid")?;
        let c = client(o)?;
        let device = c
            .find_device(udid)
            .map_err(|e| format!("list devices: {e}"))?
            .ok_or_else(|| format!("the daemon does not list {udid}"))?;
        Ok(Target::Mux {
            client: c,
            device_id: device.device_id,
        })
    }

    /// Connects to `port` (ignored for a TCP target: the proxy chose it). A proxy that was just
    /// started may not listen yet, so TCP connects are retried for a few seconds.
    fn connect(&self, port: u16) -> Result<Pipe, String> {
        match self {
            Target::Mux { client, device_id } => client
                .connect(*device_id, port)
                .map(Pipe::Mux)
                .map_err(|e| format!("connect to port {port}: {e}")),
            Target::Tcp(addr) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match TcpStream::connect(addr.as_str()) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Pipe::Tcp(s));
                        }
                        Err(e) if Instant::now() >= deadline => {
                            return Err(format!("connect to {addr}: {e}"))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            }
        }
    }
}

/// A fast deterministic byte generator (xorshift64*), seeded by the caller: the checks need
/// bytes no framing bug could reproduce by accident, not cryptographic randomness.
struct Noise(u64);

impl Noise {
    fn seeded() -> Noise {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
        Noise(t | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `wait`: polls the daemon's device list.
fn cmd_wait(o: &Opts) -> Result<(), String> {
    let udid = o.need("udid")?;
    let gone = o.flag("gone");
    let timeout = Duration::from_secs_f64(o.num("timeout", 20.0)?);
    let c = client(o)?.with_timeout(Duration::from_secs(3));
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match c.find_device(udid) {
            Ok(Some(d)) if !gone => {
                println!("device {} id {}", d.udid, d.device_id);
                return Ok(());
            }
            Ok(None) if gone => {
                println!("device {udid} gone");
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{udid} still {} after {timeout:?} {last}",
                if gone { "listed" } else { "not listed" }
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `digest`: the phone's SHA-256 of a file's bytes.
fn cmd_digest(o: &Opts) -> Result<(), String> {
    let path = o.need("file")?;
    let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let target = Target::from_opts(o)?;
    let t0 = Instant::now();
    let mut pipe = target.connect(DIGEST)?;
    pipe.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    pipe.write_all(&(data.len() as u64).to_be_bytes())
        .and_then(|()| pipe.write_all(&data))
        .map_err(|e| format!("sending {path}: {e}"))?;
    let mut hash = [0u8; 32];
    pipe.read_exact(&mut hash)
        .map_err(|e| format!("reading the digest: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}  ({} bytes in {secs:.2} s, {:.1} MB/s)",
        hex(&hash),
        data.len(),
        data.len() as f64 / secs / 1e6
    );
    Ok(())
}

/// `echo`: sizes round trip intact, one fresh connection each.
fn cmd_echo(o: &Opts) -> Result<(), String> {
    let sizes: Vec<usize> = o
        .need("sizes")?
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| format!("size {s:?}")))
        .collect::<Result<_, _>>()?;
    let target = Target::from_opts(o)?;
    let mut noise = Noise::seeded();
    let mut failed = 0;
    for n in sizes {
        let mut sent = vec![0u8; n];
        noise.fill(&mut sent);
        match echo_once(&target, &sent) {
            Ok(()) => println!("echo {n} ok"),
            Err(e) => {
                println!("echo {n} FAILED: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} size(s) did not come back intact"));
    }
    Ok(())
}

/// One echo of `sent`: written from a second thread while this one reads, so no buffer size
/// limits what can be tested.
fn echo_once(target: &Target, sent: &[u8]) -> Result<(), String> {
    let mut pipe = target.connect(ECHO)?;
    pipe.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut writer = pipe.try_clone().map_err(|e| e.to_string())?;
    let mut got = vec![0u8; sent.len()];
    std::thread::scope(|s| {
        let w = s.spawn(|| writer.write_all(sent));
        let r = pipe.read_exact(&mut got);
        let w = w
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
        w.map_err(|e| format!("write: {e}"))?;
        r.map_err(|e| format!("read: {e}"))
    })?;
    if got != sent {
        let at = got.iter().zip(sent).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!("bytes differ from offset {at}"));
    }
    // Nothing more may arrive: a duplicated packet would show here.
    pipe.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let mut extra = [0u8; 1];
    match pipe.read(&mut extra) {
        Ok(0) => Err("the connection closed after the echo".into()),
        Ok(_) => Err("more bytes came back than were sent".into()),
        Err(_) => Ok(()),
    }
}

/// `drain`: how and when a connection ends (used while the phone is unplugged).
fn cmd_drain(o: &Opts) -> Result<ExitCode, String> {
    let port: u16 = o.num("port", SOURCE)?;
    let timeout = Duration::from_secs_f64(o.num("timeout", 20.0)?);
    let target = Target::from_opts(o)?;
    let mut pipe = target.connect(port)?;
    // Short read timeouts so the overall deadline is checked even while nothing arrives.
    pipe.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    println!("drain: connected");
    let t0 = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        if t0.elapsed() > timeout {
            println!("drain: still open after {timeout:?} ({total} bytes)");
            return Ok(ExitCode::from(3));
        }
        match pipe.read(&mut buf) {
            Ok(0) => {
                println!(
                    "drain: ended eof after {total} bytes, {:.2} s",
                    t0.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
            Ok(n) => total += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                println!(
                    "drain: ended error ({e}) after {total} bytes, {:.2} s",
                    t0.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// A process's CPU time at one moment, to subtract from a later one.
///
/// Why not only `/proc/PID/stat`: its utime + stime count 10 ms ticks, and a 16 MiB transfer
/// costs a daemon 0.1–0.3 s, so one tick is 3–10 % of the figure being compared. The
/// scheduler's own run time per thread (`/proc/PID/task/TID/schedstat`, nanoseconds) has no such
/// step; ticks are the fallback for a kernel without it.
#[derive(Debug, Clone)]
enum CpuSample {
    /// Nanoseconds on a CPU per thread id.
    Threads(std::collections::HashMap<u32, u64>),
    /// utime + stime in seconds (tick resolution).
    Ticks(f64),
}

impl CpuSample {
    /// Seconds of CPU the process used between `self` and `later`. A thread that started in
    /// between counts from zero; one that ended in between is lost (none does in a daemon
    /// during a transfer).
    fn seconds_until(&self, later: &CpuSample) -> f64 {
        match (self, later) {
            (CpuSample::Threads(a), CpuSample::Threads(b)) => {
                let ns: u64 = b
                    .iter()
                    .map(|(tid, t)| t.saturating_sub(a.get(tid).copied().unwrap_or(0)))
                    .sum();
                ns as f64 / 1e9
            }
            (CpuSample::Ticks(a), CpuSample::Ticks(b)) => b - a,
            // Cannot happen (one process, one kernel); a visible nonsense rather than a guess.
            _ => f64::NAN,
        }
    }
}

/// The CPU time of process `pid` now: per-thread scheduler run time, or ticks without it.
fn cpu_sample(pid: u32) -> Result<CpuSample, String> {
    match thread_run_times(pid) {
        Some(threads) => Ok(CpuSample::Threads(threads)),
        None => cpu_seconds(pid).map(CpuSample::Ticks),
    }
}

/// Nanoseconds on a CPU of each thread of `pid` (the first field of `schedstat`); `None` when
/// the kernel has no schedstat or the process is gone.
fn thread_run_times(pid: u32) -> Option<std::collections::HashMap<u32, u64>> {
    let mut out = std::collections::HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread may end between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let ns = stat.split_whitespace().next()?.parse::<u64>().ok()?;
        out.insert(tid, ns);
    }
    (!out.is_empty()).then_some(out)
}

/// user + system CPU seconds of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name may contain spaces; the fields after its ")" are fixed: utime is the
    // 12th of them, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<f64, String> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: field {i} missing"))
    };
    let ticks = field(11)? + field(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(ticks / hz)
}

/// The time softirqs ran on top of one process's threads, from the kernel's
/// `irq/softirq_entry` and `irq/softirq_exit` trace events (`traced --softirqs TRACEFS`).
///
/// Why: a kernel without `CONFIG_IRQ_TIME_ACCOUNTING` (Debian's) counts a softirq as run time
/// of whichever task it interrupted, in schedstat as in `/proc/PID/stat`. In the guest,
/// dummy_hcd's timer — which moves every transfer's bytes between the host and the gadget —
/// runs as one, so how much bus emulation lands on a daemon depends on whether it happens to be
/// on that CPU when the timer fires, not on the daemon's own work. A kernel with irq time
/// accounting (as many distributions' kernels are built) leaves softirqs out of a task's run
/// time; this meter lets the harness print that figure beside the one it counts.
///
/// The meter only sets filters and switches recording (`tracing_on`); the events must already
/// be enabled, by the caller, while the bus is idle. Enabling or disabling an event patches the
/// kernel's text at the tracepoint, and these tracepoints sit in the softirq loop itself: done
/// while dummy_hcd's timer ran 8 000 times a second on both vCPUs (any daemon keeps IN
/// transfers posted), it left the TCG guest with both CPUs stuck in softirqs (soft lockups,
/// RCU stalls, a CPU caught just past the patching's `int3` in `handle_softirqs`) in about one
/// boot in three on a slower host.
struct SoftirqMeter {
    /// The tracefs directory (`/sys/kernel/tracing` or `/sys/kernel/debug/tracing`).
    dir: std::path::PathBuf,
}

/// The two events the meter reads (paths under tracefs's `events/`).
const SOFTIRQ_EVENTS: [&str; 2] = ["irq/softirq_entry", "irq/softirq_exit"];

impl SoftirqMeter {
    /// Traces the softirqs that interrupt any thread `pid` has now (a daemon starts no thread
    /// during a transfer), from an empty buffer. The events must be enabled already (see the
    /// type's docs); an error says so if they are not.
    fn start(dir: &str, pid: u32) -> Result<SoftirqMeter, String> {
        let meter = SoftirqMeter { dir: dir.into() };
        for e in SOFTIRQ_EVENTS {
            let path = meter.dir.join(format!("events/{e}/enable"));
            let on = std::fs::read_to_string(&path)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            if on.trim() != "1" {
                return Err(format!(
                    "{}: the event is not enabled (enable it while the bus is idle: \
                     toggling it patches the softirq loop's code)",
                    path.display()
                ));
            }
        }
        let tids = thread_run_times(pid).ok_or_else(|| format!("no threads of pid {pid}"))?;
        let filter: Vec<String> = tids.keys().map(|t| format!("common_pid == {t}")).collect();
        meter.write("tracing_on", "0")?;
        for e in SOFTIRQ_EVENTS {
            meter.write(&format!("events/{e}/filter"), &filter.join(" || "))?;
        }
        meter.restart()?;
        Ok(meter)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        std::fs::write(&path, format!("{value}\n")).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Empties the buffer and traces again.
    fn restart(&self) -> Result<(), String> {
        self.write("trace", "")?;
        self.write("tracing_on", "1")
    }

    /// Seconds of softirqs on the process's threads since the last (re)start; traces again
    /// from empty.
    fn take(&self) -> Result<f64, String> {
        self.write("tracing_on", "0")?;
        let path = self.dir.join("trace");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let secs = softirq_seconds(&text)?;
        self.restart()?;
        Ok(secs)
    }
}

impl Drop for SoftirqMeter {
    /// Leaves tracefs as it found it: not recording, filters cleared, buffer empty (the events
    /// stay enabled: with recording off and no filter, a softirq's event is dropped before it is
    /// built).
    fn drop(&mut self) {
        let _ = self.write("tracing_on", "0");
        for e in SOFTIRQ_EVENTS {
            let _ = self.write(&format!("events/{e}/filter"), "0");
        }
        let _ = self.write("trace", "");
    }
}

/// The summed length of the softirqs in a tracefs `trace` text: each `softirq_exit` minus the
/// `softirq_entry` before it on the same CPU (softirqs do not nest on a CPU). A pair cut by
/// the start or the end of tracing counts nothing; a buffer that lost events is an error, not
/// a smaller figure.
fn softirq_seconds(text: &str) -> Result<f64, String> {
    let mut open: BTreeMap<u32, f64> = BTreeMap::new();
    let mut total = 0.0;
    for line in text.lines() {
        if let Some(counts) = line.strip_prefix("# entries-in-buffer/entries-written:") {
            let counts = counts.split_whitespace().next().unwrap_or("");
            if let Some((kept, written)) = counts.split_once('/') {
                if kept != written {
                    return Err(format!(
                        "the trace buffer lost events ({kept} of {written} kept)"
                    ));
                }
            }
            continue;
        }
        let (entry, head) = if let Some((head, _)) = line.split_once(": softirq_entry:") {
            (true, head)
        } else if let Some((head, _)) = line.split_once(": softirq_exit:") {
            (false, head)
        } else {
            continue;
        };
        // `comm-pid [cpu] flags seconds`: the CPU is the last bracket (a command name may hold
        // anything but the flags never hold one), the stamp the last word.
        let cpu = head
            .rsplit_once('[')
            .and_then(|(_, r)| r.split_once(']'))
            .and_then(|(c, _)| c.trim().parse::<u32>().ok());
        let stamp = head
            .split_whitespace()
            .next_back()
            .and_then(|t| t.parse::<f64>().ok());
        let (Some(cpu), Some(stamp)) = (cpu, stamp) else {
            return Err(format!("unreadable trace line: {line:?}"));
        };
        if entry {
            open.insert(cpu, stamp);
        } else if let Some(start) = open.remove(&cpu) {
            total += (stamp - start).max(0.0);
        }
    }
    Ok(total)
}

/// Peak resident set (VmHWM) of a process in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status: no VmHWM"))
}

/// Writes `total` bytes to the discard service.
fn upload(target: &Target, total: u64) -> Result<(), String> {
    let mut pipe = target.connect(DISCARD)?;
    let mut block = vec![0u8; 64 * 1024];
    Noise::seeded().fill(&mut block);
    let mut left = total;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        pipe.write_all(&block[..n])
            .map_err(|e| format!("discard write: {e}"))?;
        left -= n as u64;
    }
    pipe.shutdown_write();
    Ok(())
}

/// Reads `total` bytes of the source service and checks the first and last byte of every read
/// against its pattern (every byte would cost the client more CPU than the daemon spends; the
/// cases check whole streams).
fn download(target: &Target, total: u64) -> Result<(), String> {
    let mut pipe = target.connect(SOURCE)?;
    pipe.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut off: u64 = 0;
    while off < total {
        let want = (total - off).min(buf.len() as u64) as usize;
        let n = pipe
            .read(&mut buf[..want])
            .map_err(|e| format!("source read at {off}: {e}"))?;
        if n == 0 {
            return Err(format!("source ended at {off} of {total}"));
        }
        let last = n - 1;
        if buf[0] != source_byte(off) || buf[last] != source_byte(off + last as u64) {
            return Err(format!("source pattern broken near offset {off}"));
        }
        off += n as u64;
    }
    Ok(())
}

/// Runs `f` on `n` threads at once; the wall time of the slowest.
fn parallel(n: usize, f: impl Fn() -> Result<(), String> + Sync) -> Result<f64, String> {
    let t0 = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(&f)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    Ok(secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `up` / `down --mib N`: one transfer to discard / from source on one connection, its MB/s
/// printed (the profiling runs of the harness, `USB_VM_PROFILE`, watch the daemon during it).
fn cmd_one_way(o: &Opts, up: bool) -> Result<(), String> {
    let total: u64 = o.num("mib", 16u64)? << 20;
    let target = Target::from_opts(o)?;
    let t0 = Instant::now();
    if up {
        upload(&target, total)?;
    } else {
        download(&target, total)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} {} MiB: {:.2} MB/s",
        if up { "host→device" } else { "device→host" },
        total >> 20,
        total as f64 / secs / 1e6
    );
    Ok(())
}

/// `bench`: one daemon's figures, one `@@BENCH` line.
fn cmd_bench(o: &Opts) -> Result<(), String> {
    let pid: u32 = o.num("pid", 0)?;
    if pid == 0 {
        return Err("--pid is required".into());
    }
    let daemon = o.need("daemon")?.to_string();
    let rep = o.get("rep").unwrap_or("1").to_string();
    let mib = 1024 * 1024;
    let up: u64 = o.num("up-mib", 32u64)? * mib;
    let down: u64 = o.num("down-mib", 16u64)? * mib;
    let par: usize = o.num("par", 8usize)?.max(1);
    let par_up: u64 = o.num("par-up-mib", 32u64)? * mib;
    let par_down: u64 = o.num("par-down-mib", 16u64)? * mib;
    let connects: usize = o.num("connects", 20usize)?.max(1);
    let pings: usize = o.num("pings", 200usize)?.max(1);
    let target = Target::from_opts(o)?;

    let mut out: Vec<(String, String)> = vec![("daemon".into(), daemon), ("rep".into(), rep)];
    let mut put = |k: &str, v: f64| out.push((k.to_string(), format!("{v:.3}")));

    // One connection each way, with the daemon's CPU time over each transfer.
    let gib = (1u64 << 30) as f64;
    let c0 = cpu_sample(pid)?;
    let t0 = Instant::now();
    upload(&target, up)?;
    let secs = t0.elapsed().as_secs_f64();
    let c1 = cpu_sample(pid)?;
    put("up_mbs", up as f64 / secs / 1e6);
    put("cpu_up_s_per_gib", c0.seconds_until(&c1) * gib / up as f64);

    let t0 = Instant::now();
    download(&target, down)?;
    let secs = t0.elapsed().as_secs_f64();
    let c2 = cpu_sample(pid)?;
    put("down_mbs", down as f64 / secs / 1e6);
    put(
        "cpu_down_s_per_gib",
        c1.seconds_until(&c2) * gib / down as f64,
    );

    // `par` connections at once, each way.
    let each_up = par_up / par as u64;
    let secs = parallel(par, || upload(&target, each_up))?;
    put("par_up_mbs", (each_up * par as u64) as f64 / secs / 1e6);
    let each_down = par_down / par as u64;
    let secs = parallel(par, || download(&target, each_down))?;
    put("par_down_mbs", (each_down * par as u64) as f64 / secs / 1e6);

    // Connect latency: Connect request to the first echoed byte.
    let mut lat = Vec::with_capacity(connects);
    for _ in 0..connects {
        let t0 = Instant::now();
        let mut pipe = target.connect(ECHO)?;
        pipe.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut b = [0x5a_u8];
        pipe.write_all(&b).map_err(|e| e.to_string())?;
        pipe.read_exact(&mut b).map_err(|e| format!("echo: {e}"))?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    put("connect_ms", median(lat));

    // 1-byte round trips on one connection.
    let mut pipe = target.connect(ECHO)?;
    pipe.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut rtt = Vec::with_capacity(pings);
    for i in 0..pings {
        let mut b = [i as u8];
        let t0 = Instant::now();
        pipe.write_all(&b).map_err(|e| e.to_string())?;
        pipe.read_exact(&mut b).map_err(|e| format!("echo: {e}"))?;
        rtt.push(t0.elapsed().as_secs_f64() * 1e3);
        if b[0] != i as u8 {
            return Err("echo returned another byte".into());
        }
    }
    put("rtt_ms", median(rtt));
    put("rss_mib", peak_rss_kib(pid)? as f64 / 1024.0);

    let line: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("@@BENCH {}", line.join(" "));
    Ok(())
}

/// `traced`: the daemon's CPU per GiB without the softirqs that ran on top of it, over `--reps`
/// more transfers each way (`SoftirqMeter`), one `@@BENCH` line per repetition with the
/// `cpu_{up,down}_own_s_per_gib` keys (and the traced transfers' own MB/s and counted CPU, to see
/// what the tracing weighed on each daemon: `traced_*`).
///
/// A command of its own, run in a daemon session of its own, because the events must be enabled
/// while no daemon runs (see `SoftirqMeter`) and `bench`'s transfers must run without them:
/// recording a softirq's event at every softirq of the guest slows the bus (in one test, 5
/// repetitions each, ours host→device 75.3 MB/s and 6.84 CPU s/GiB traced against 83.5 and
/// 6.21 untraced).
fn cmd_traced(o: &Opts) -> Result<(), String> {
    let pid: u32 = o.num("pid", 0)?;
    if pid == 0 {
        return Err("--pid is required".into());
    }
    let daemon = o.need("daemon")?.to_string();
    let reps: u32 = o.num("reps", 1u32)?.max(1);
    let mib = 1024 * 1024;
    let up: u64 = o.num("up-mib", 32u64)? * mib;
    let down: u64 = o.num("down-mib", 16u64)? * mib;
    let target = Target::from_opts(o)?;
    let meter = SoftirqMeter::start(o.need("softirqs")?, pid)?;
    let gib = (1u64 << 30) as f64;
    for rep in 1..=reps {
        let mut line = format!("@@BENCH daemon={daemon} rep={rep}");
        // Anything recorded between repetitions (the daemon idles) is not counted.
        meter.take()?;
        for (way, bytes) in [("up", up), ("down", down)] {
            let c0 = cpu_sample(pid)?;
            let t0 = Instant::now();
            if way == "up" {
                upload(&target, bytes)?;
            } else {
                download(&target, bytes)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let cpu = c0.seconds_until(&cpu_sample(pid)?);
            let per_gib = gib / bytes as f64;
            let own = (cpu - meter.take()?) * per_gib;
            line += &format!(
                " cpu_{way}_own_s_per_gib={own:.3} traced_{way}_mbs={:.3} \
                 traced_cpu_{way}_s_per_gib={:.3}",
                bytes as f64 / secs / 1e6,
                cpu * per_gib
            );
        }
        println!("{line}");
    }
    Ok(())
}

/// The rows of the table: the `@@BENCH` key and its label.
const METRICS: &[(&str, &str)] = &[
    ("up_mbs", "host→device MB/s, 1 connection"),
    ("down_mbs", "device→host MB/s, 1 connection"),
    ("par_up_mbs", "host→device MB/s, 8 connections"),
    ("par_down_mbs", "device→host MB/s, 8 connections"),
    ("cpu_up_s_per_gib", "daemon CPU s/GiB host→device"),
    ("cpu_down_s_per_gib", "daemon CPU s/GiB device→host"),
    (
        "cpu_up_own_s_per_gib",
        "daemon CPU s/GiB host→device, softirqs excluded (traced transfer)",
    ),
    (
        "cpu_down_own_s_per_gib",
        "daemon CPU s/GiB device→host, softirqs excluded (traced transfer)",
    ),
    ("connect_ms", "Connect → first echo byte, p50 ms"),
    ("rtt_ms", "1-byte echo round trip, p50 ms"),
    ("rss_mib", "daemon peak RSS MiB"),
];

/// `table`: medians per daemon from the `@@BENCH` lines of a file.
fn cmd_table(o: &Opts) -> Result<(), String> {
    let path = o
        .positional
        .first()
        .ok_or("table: the file of @@BENCH lines is required")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    // daemon -> metric -> values
    let mut data: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start_matches('\r').strip_prefix("@@BENCH ") else {
            continue;
        };
        let kv: BTreeMap<&str, &str> = rest
            .split_whitespace()
            .filter_map(|p| p.split_once('='))
            .collect();
        let Some(daemon) = kv.get("daemon") else {
            continue;
        };
        let row = data.entry(daemon.to_string()).or_default();
        for (k, v) in kv {
            if let Ok(x) = v.parse::<f64>() {
                row.entry(k.to_string()).or_default().push(x);
            }
        }
    }
    // Debian's first, the others (our daemon's variants) after it, each with its ratio.
    let Some(debian) = data.get("debian") else {
        return Err("no measurements of Debian's usbmuxd in the file".into());
    };
    let others: Vec<(&String, &BTreeMap<String, Vec<f64>>)> = data
        .iter()
        .filter(|(d, _)| d.as_str() != "debian")
        .collect();
    if others.is_empty() {
        return Err("no measurements of our usbmuxd in the file".into());
    }
    let runs = |m: &BTreeMap<String, Vec<f64>>| m.get("up_mbs").map_or(0, Vec::len);
    let mut head = format!(
        "| metric (median of runs) | debian ({} runs) |",
        runs(debian)
    );
    let mut rule = "|---|---|".to_string();
    for (name, m) in &others {
        head.push_str(&format!(" {name} ({} runs) | {name} ÷ debian |", runs(m)));
        rule.push_str("---|---|");
    }
    println!("{head}");
    println!("{rule}");
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    for (key, label) in METRICS {
        let d = debian.get(*key).map(|v| median(v.clone()));
        let mut row = format!("| {label} | {} |", fmt(d));
        for (_, m) in &others {
            let u = m.get(*key).map(|v| median(v.clone()));
            let ratio = match (d, u) {
                (Some(d), Some(u)) if d > 0.0 => format!("{:.2}", u / d),
                _ => "-".to_string(),
            };
            row.push_str(&format!(" {} | {ratio} |", fmt(u)));
        }
        println!("{row}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: usb-vm-client wait|digest|echo|drain|bench|up|down|table [options] (see the source's docs)");
        return ExitCode::from(2);
    };
    let result = Opts::parse(rest).and_then(|o| match cmd.as_str() {
        "wait" => cmd_wait(&o).map(|()| ExitCode::SUCCESS),
        "digest" => cmd_digest(&o).map(|()| ExitCode::SUCCESS),
        "echo" => cmd_echo(&o).map(|()| ExitCode::SUCCESS),
        "drain" => cmd_drain(&o),
        "bench" => cmd_bench(&o).map(|()| ExitCode::SUCCESS),
        "traced" => cmd_traced(&o).map(|()| ExitCode::SUCCESS),
        "up" | "down" => cmd_one_way(&o, cmd == "up").map(|()| ExitCode::SUCCESS),
        "table" => cmd_table(&o).map(|()| ExitCode::SUCCESS),
        other => Err(format!("unknown command {other:?}")),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("usb-vm-client {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{softirq_seconds, SoftirqMeter, SOFTIRQ_EVENTS};

    /// Lines as Debian's 6.1 kernel writes them (the harness's timeline runs): pairs per CPU,
    /// interleaved across CPUs, one cut by the start of tracing and one by its end.
    #[test]
    fn softirq_time_is_the_sum_of_each_cpus_pairs() {
        let text = "\
# tracer: nop
#
# entries-in-buffer/entries-written: 7/7   #P:2
#
     usb-watcher-703     [001] ..s1.    39.697600: softirq_exit: vec=8 [action=HRTIMER]
     usb-watcher-703     [001] ..s1.    39.697692: softirq_entry: vec=8 [action=HRTIMER]
         usbmuxd-700     [000] ..s..    39.697700: softirq_entry: vec=1 [action=TIMER]
     usb-watcher-703     [001] ..s1.    39.697819: softirq_exit: vec=8 [action=HRTIMER]
         usbmuxd-700     [000] ..s..    39.697750: softirq_exit: vec=1 [action=TIMER]
  odd [name]-701     [001] ..s..    39.698133: softirq_entry: vec=8 [action=HRTIMER]
  odd [name]-701     [001] ..s..    39.698233: softirq_exit: vec=8 [action=HRTIMER]
     usb-watcher-703     [000] ..s1.    39.699000: softirq_entry: vec=8 [action=HRTIMER]
";
        let s = softirq_seconds(text).expect("readable");
        assert!((s - (127e-6 + 50e-6 + 100e-6)).abs() < 1e-9, "{s}");
    }

    #[test]
    fn a_buffer_that_lost_events_is_an_error() {
        let text = "# entries-in-buffer/entries-written: 5/9   #P:2\n";
        assert_eq!(
            softirq_seconds(text),
            Err("the trace buffer lost events (5 of 9 kept)".to_string())
        );
        assert!(softirq_seconds("  x-1 [000] ..s.. nonsense: softirq_exit: vec=8\n").is_err());
    }

    /// The meter never enables or disables an event (that patches the kernel's code; done
    /// during USB traffic it hung the guest): it refuses events left off, and otherwise only
    /// filters, records and clears, leaving the events as it found them. A directory laid out
    /// as tracefs stands in for it.
    #[test]
    fn the_meter_only_filters_and_records_events_enabled_beforehand() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let read = |f: &str| std::fs::read_to_string(root.join(f)).expect(f);
        for e in SOFTIRQ_EVENTS {
            std::fs::create_dir_all(root.join(format!("events/{e}"))).expect("mkdir");
            std::fs::write(root.join(format!("events/{e}/enable")), "0\n").expect("enable");
        }
        let tracefs = root.to_str().expect("utf-8 path");
        let refused = SoftirqMeter::start(tracefs, std::process::id()).map(|_| ());
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("is not enabled")),
            "{refused:?}"
        );
        assert_eq!(read("events/irq/softirq_entry/enable"), "0\n");

        for e in SOFTIRQ_EVENTS {
            std::fs::write(root.join(format!("events/{e}/enable")), "1\n").expect("enable");
        }
        let meter = SoftirqMeter::start(tracefs, std::process::id()).expect("started");
        let me = format!("common_pid == {}", std::process::id());
        for e in SOFTIRQ_EVENTS {
            assert!(read(&format!("events/{e}/filter")).contains(&me));
        }
        assert_eq!(read("tracing_on"), "1\n");
        assert_eq!(
            meter.take(),
            Ok(0.0),
            "an empty trace holds no softirq time"
        );
        drop(meter);
        assert_eq!(read("tracing_on"), "0\n");
        for e in SOFTIRQ_EVENTS {
            assert_eq!(read(&format!("events/{e}/filter")), "0\n");
            assert_eq!(read(&format!("events/{e}/enable")), "1\n", "left enabled");
        }
    }
}
