//! Simulated phones with fault injection, served over the simulator's socket protocol so the
//! real `usbmuxd` binary (`--sim-socket PATH`) talks to them out of process.
//!
//! `usbmux-sim serve` has no fault injection; this is the same link protocol (IDENTITY, DATA,
//! ZLP, UNPLUG over `SOCK_SEQPACKET`, see `firmware-sim/README.md`) with a
//! [`FaultInjector`] on both directions of each phone's cable:
//!
//! ```text
//! daemon --DATA/ZLP--> [injector H→D] --> virtual cable OUT --> Phone
//! daemon <--DATA/ZLP-- [injector D→H] <-------------------------- Phone
//! ```
//!
//! The daemon's DATA is paired with the ZLP that follows it (a transfer that needs one is held
//! until the ZLP or the next DATA arrives), so a daemon that forgets a ZLP is caught by the
//! cable exactly as on USB. Each phone has a fault schedule per plug ([`PhoneSpec::plugs`]): a
//! fresh phone and a fresh injector each time the daemon connects, and the last entry repeats
//! (`Faults::none()` after the schedule by default). [`PhoneHandle`] unplugs a phone and keeps it
//! away for a while (the daemon's watcher plugs it in again when the hold-off ends), and counts
//! plugs and fired rules so a test can check its fault really happened.
//!
//! Time: each plug's injector clock starts at 0 when the daemon connects, so `Trigger::AtTime`
//! micros count from the plug.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self as sock, AddressFamily, Backlog, MsgFlags, SockFlag, SockType};
use usbmux_core::usb::{needs_zlp, MAX_PACKET};
use usbmux_core::Instant;
use usbmux_sim::cable::{VirtualCable, DEVICE_READ_LEN};
use usbmux_sim::faults::{Direction, FaultInjector, Faults, Output};
use usbmux_sim::socket::{Message, MSG_DATA, MSG_UNPLUG, MSG_ZLP, RECV_BUFFER_LEN};
use usbmux_sim::{Phone, PhoneConfig};

/// Frames queued for a daemon that does not read before the phone stops producing (as
/// `usbmux-sim serve` does).
const OUT_QUEUE_FRAMES: usize = 64;

/// One phone: who it is and what goes wrong on each plug.
#[derive(Debug, Clone)]
pub struct PhoneSpec {
    /// The phone.
    pub cfg: PhoneConfig,
    /// Faults of the 1st, 2nd, … plug; the last one repeats when `repeat_last`, otherwise later
    /// plugs have none.
    pub plugs: Vec<Faults>,
    /// Whether the last schedule entry applies to every later plug too.
    pub repeat_last: bool,
    /// Starts unplugged: the daemon cannot plug it in before [`PhoneHandle::plug_in`].
    pub start_unplugged: bool,
}

impl PhoneSpec {
    /// Phone `k` (`PhoneConfig::simulated(k)`) without faults.
    pub fn healthy(k: u32) -> PhoneSpec {
        PhoneSpec {
            cfg: PhoneConfig::simulated(k),
            plugs: Vec::new(),
            repeat_last: false,
            start_unplugged: false,
        }
    }

    /// Phone `k` with `faults` on its first plug only.
    pub fn faulty(k: u32, faults: Faults) -> PhoneSpec {
        PhoneSpec {
            cfg: PhoneConfig::simulated(k),
            plugs: vec![faults],
            repeat_last: false,
            start_unplugged: false,
        }
    }

    /// Phone `k` with `faults` on every plug.
    pub fn always_faulty(k: u32, faults: Faults) -> PhoneSpec {
        PhoneSpec {
            cfg: PhoneConfig::simulated(k),
            plugs: vec![faults],
            repeat_last: true,
            start_unplugged: false,
        }
    }

    /// The same phone, starting unplugged.
    pub fn unplugged(mut self) -> PhoneSpec {
        self.start_unplugged = true;
        self
    }

    fn faults_for(&self, plug: u64) -> Faults {
        let i = usize::try_from(plug).unwrap_or(usize::MAX);
        match self.plugs.get(i) {
            Some(f) => f.clone(),
            None if self.repeat_last => self.plugs.last().cloned().unwrap_or_default(),
            None => Faults::none(),
        }
    }
}

/// What one plug of a phone ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlugRecord {
    /// Rules that fired (indices into that plug's `Faults::rules`), in order.
    pub fired: Vec<usize>,
    /// Why the plug ended: "daemon unplugged", "fault unplug", "test unplug", "stopped", or
    /// an I/O error.
    pub end: String,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    unplug: AtomicBool,
    /// No accept before this instant (a phone kept unplugged).
    hold_off: Mutex<Option<std::time::Instant>>,
    plugs: AtomicU64,
    /// Plugs that have ended.
    ends: AtomicU64,
    /// When the last plug ended.
    last_end: Mutex<Option<std::time::Instant>>,
    /// Fired rules of the current plug, updated live.
    current_fired: Mutex<Vec<usize>>,
    history: Mutex<Vec<PlugRecord>>,
}

/// The test's handle on one served phone.
#[derive(Clone)]
pub struct PhoneHandle {
    path: PathBuf,
    udid: String,
    shared: Arc<Shared>,
}

impl PhoneHandle {
    /// The socket path (`usbmuxd --sim-socket PATH`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The phone's UDID (as `ListDevices` shows it).
    pub fn udid(&self) -> &str {
        &self.udid
    }

    /// How many times the daemon has connected to it.
    pub fn plugs(&self) -> u64 {
        self.shared.plugs.load(Ordering::SeqCst)
    }

    /// How many of its plugs have ended (unplugged by the test, a fault or the daemon).
    pub fn plug_ends(&self) -> u64 {
        self.shared.ends.load(Ordering::SeqCst)
    }

    /// Whether a plug of it ended within the last `d`.
    pub fn ended_within(&self, d: Duration) -> bool {
        self.shared
            .last_end
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() <= d)
    }

    /// Pulls the cable now (UNPLUG) and keeps the phone away for `away` (the daemon's watcher
    /// retries and plugs it in again after that).
    pub fn unplug_for(&self, away: Duration) {
        *self
            .shared
            .hold_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now() + away);
        self.shared.unplug.store(true, Ordering::SeqCst);
    }

    /// Lets the daemon plug it in (ends a hold-off at once).
    pub fn plug_in(&self) {
        *self
            .shared
            .hold_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Keeps it unplugged until [`PhoneHandle::plug_in`] (pulling the cable if it is in).
    pub fn unplug(&self) {
        self.unplug_for(Duration::from_secs(365 * 24 * 3600));
    }

    /// Rules fired so far on the current (or last) plug.
    pub fn fired_now(&self) -> Vec<usize> {
        self.shared
            .current_fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every finished plug, oldest first.
    pub fn history(&self) -> Vec<PlugRecord> {
        self.shared
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Phones served on sockets in a directory, one thread each; stopped (and the sockets removed)
/// on drop.
pub struct FaultyPhones {
    handles: Vec<PhoneHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl FaultyPhones {
    /// Binds one socket per phone in `dir` (`phone-1`, `phone-2`, …) and starts serving.
    pub fn serve(dir: &Path, phones: Vec<PhoneSpec>) -> io::Result<FaultyPhones> {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (i, spec) in phones.into_iter().enumerate() {
            let path = dir.join(format!("phone-{}", i + 1));
            let _ = std::fs::remove_file(&path);
            let fd = sock::socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )?;
            let addr = sock::UnixAddr::new(&path).map_err(io::Error::from)?;
            sock::bind(fd.as_raw_fd(), &addr)?;
            sock::listen(&fd, Backlog::new(4).map_err(io::Error::from)?)?;
            let handle = PhoneHandle {
                path,
                udid: spec.cfg.identity.udid.clone(),
                shared: Arc::new(Shared::default()),
            };
            if spec.start_unplugged {
                handle.unplug();
                handle.shared.unplug.store(false, Ordering::SeqCst);
            }
            let shared = handle.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("faulty phone {}", i + 1))
                .spawn(move || phone_thread(&spec, &fd, &shared))?;
            handles.push(handle);
            threads.push(t);
        }
        Ok(FaultyPhones { handles, threads })
    }

    /// The phones, in the order given.
    pub fn phones(&self) -> &[PhoneHandle] {
        &self.handles
    }

    /// Phone `i` (0-based).
    pub fn phone(&self, i: usize) -> &PhoneHandle {
        &self.handles[i]
    }

    /// `--sim-socket PATH` arguments for all phones.
    pub fn daemon_args(&self) -> Vec<String> {
        self.handles
            .iter()
            .flat_map(|h| ["--sim-socket".to_owned(), h.path.display().to_string()])
            .collect()
    }
}

impl Drop for FaultyPhones {
    fn drop(&mut self) {
        for h in &self.handles {
            h.shared.stop.store(true, Ordering::SeqCst);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for h in &self.handles {
            let _ = std::fs::remove_file(&h.path);
        }
    }
}

fn phone_thread(spec: &PhoneSpec, listener: &OwnedFd, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        let held = shared
            .hold_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| std::time::Instant::now() < t);
        if held {
            // Unplugged: a daemon that tries is turned away at once (accepted and closed, so
            // its attempt does not sit in the backlog holding a descriptor for seconds).
            if wait_fd(
                listener.as_fd(),
                PollFlags::POLLIN,
                Duration::from_millis(5),
            ) {
                drop(sock::accept(listener));
            }
            continue;
        }
        if !wait_fd(
            listener.as_fd(),
            PollFlags::POLLIN,
            Duration::from_millis(50),
        ) {
            continue;
        }
        let Ok(conn) = sock::accept(listener) else {
            continue;
        };
        let plug = shared.plugs.fetch_add(1, Ordering::SeqCst);
        shared.unplug.store(false, Ordering::SeqCst);
        shared
            .current_fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let mut run = PlugRun::new(spec, spec.faults_for(plug));
        let end = run.serve(&conn, shared);
        drop(conn);
        shared.ends.fetch_add(1, Ordering::SeqCst);
        *shared
            .last_end
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now());
        let fired: Vec<usize> = run.inj.fired().iter().map(|f| f.rule).collect();
        shared
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(PlugRecord { fired, end });
    }
}

fn wait_fd(fd: BorrowedFd<'_>, events: PollFlags, timeout: Duration) -> bool {
    let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, events)];
    matches!(nix::poll::poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// One plug: a fresh phone, cable and injector.
struct PlugRun {
    phone: Phone,
    cable: VirtualCable,
    inj: FaultInjector,
    mps: u16,
    epoch: std::time::Instant,
    /// A daemon transfer waiting to see whether a ZLP follows it.
    held: Option<Vec<u8>>,
    out: VecDeque<Vec<u8>>,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl PlugRun {
    fn new(spec: &PhoneSpec, faults: Faults) -> PlugRun {
        let mps = spec.cfg.identity.max_packet_size;
        let mut out = VecDeque::new();
        out.push_back(Message::Identity(Box::new(spec.cfg.identity.clone())).encode());
        PlugRun {
            phone: Phone::new(spec.cfg.clone()),
            cable: VirtualCable::new(mps),
            inj: FaultInjector::new(faults, mps),
            mps,
            epoch: std::time::Instant::now(),
            held: None,
            out,
            tx: vec![0; MAX_PACKET + 1],
            rx: vec![0; RECV_BUFFER_LEN],
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    fn serve(&mut self, conn: &OwnedFd, shared: &Shared) -> String {
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                let _ = try_send(conn.as_fd(), &[MSG_UNPLUG]);
                return "stopped".into();
            }
            if shared.unplug.swap(false, Ordering::SeqCst) {
                let _ = try_send(conn.as_fd(), &[MSG_UNPLUG]);
                return "test unplug".into();
            }
            // Daemon → phone.
            for _ in 0..256 {
                match try_recv(conn.as_fd(), &mut self.rx) {
                    Ok(None) => break,
                    Ok(Some(0)) => return "daemon unplugged".into(),
                    Ok(Some(n)) => {
                        if let Err(end) = self.take_datagram(n) {
                            return end;
                        }
                    }
                    Err(e) => return format!("recv: {e}"),
                }
            }
            // Timers, then everything that can move, until nothing does.
            let now = self.now();
            self.inj.handle_timeout(now);
            if self.phone.poll_timeout().is_some_and(|t| t <= now) {
                self.phone.handle_timeout(now);
            }
            for _ in 0..10_000 {
                match self.step(now) {
                    Step::Moved => {}
                    Step::Idle => break,
                    Step::Unplugged => {
                        let _ = self.flush(conn);
                        let _ = try_send(conn.as_fd(), &[MSG_UNPLUG]);
                        return "fault unplug".into();
                    }
                }
            }
            *shared
                .current_fired
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                self.inj.fired().iter().map(|f| f.rule).collect();
            if let Err(e) = self.flush(conn) {
                return format!("send: {e}");
            }
            // Sleep until the daemon sends, the socket drains, or a timer is due (at most 20 ms,
            // so stop and unplug requests are seen).
            let due = [self.inj.poll_at(), self.phone.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .map(|t| {
                    Duration::from_micros(t.total_micros().saturating_sub(now.total_micros()))
                });
            let wait = due
                .unwrap_or(Duration::from_millis(20))
                .min(Duration::from_millis(20));
            let mut flags = PollFlags::POLLIN;
            if !self.out.is_empty() {
                flags |= PollFlags::POLLOUT;
            }
            if !wait.is_zero() {
                wait_fd(conn.as_fd(), flags, wait);
            }
        }
    }

    /// One datagram from the daemon.
    fn take_datagram(&mut self, n: usize) -> Result<(), String> {
        if n == self.rx.len() {
            return Err("oversized datagram".into());
        }
        let now = self.now();
        match self.rx[0] {
            MSG_DATA if n > 1 => {
                let data = self.rx[1..n].to_vec();
                if let Some(prev) = self.held.take() {
                    // No ZLP came after a transfer that needed one: it travels without, and
                    // the cable glues it to this one, as a bus would.
                    self.inj.push(now, Direction::HostToDevice, &prev, false);
                }
                if needs_zlp(data.len(), self.mps) {
                    self.held = Some(data);
                } else {
                    self.inj.push(now, Direction::HostToDevice, &data, false);
                }
                Ok(())
            }
            MSG_ZLP if n == 1 => {
                match self.held.take() {
                    Some(prev) => self.inj.push(now, Direction::HostToDevice, &prev, true),
                    None => self.cable.host_write_zlp(),
                }
                Ok(())
            }
            MSG_UNPLUG if n == 1 => Err("daemon unplugged".into()),
            t => Err(format!(
                "bad datagram from the daemon (type {t:#04x}, {n} bytes)"
            )),
        }
    }

    /// Moves one round: injector outputs, phone input, phone output.
    fn step(&mut self, now: Instant) -> Step {
        let mut moved = false;
        while self.out.len() < OUT_QUEUE_FRAMES {
            let Some(o) = self.inj.poll_output(now) else {
                break;
            };
            moved = true;
            match o {
                Output::Transfer {
                    dir: Direction::HostToDevice,
                    bytes,
                    zlp,
                } => {
                    self.cable.host_write(&bytes);
                    if zlp {
                        self.cable.host_write_zlp();
                    }
                }
                Output::Transfer {
                    dir: Direction::DeviceToHost,
                    bytes,
                    zlp,
                } => {
                    for chunk in bytes.chunks(usbmux_sim::socket::MAX_TRANSFER_LEN) {
                        self.out.push_back(Message::Data(chunk).encode());
                    }
                    if zlp {
                        self.out.push_back(vec![MSG_ZLP]);
                    }
                }
                Output::Unplug => return Step::Unplugged,
            }
        }
        while let Some(t) = self.cable.device_read(DEVICE_READ_LEN) {
            moved = true;
            self.phone.handle_transfer(now, &t);
        }
        // One phone packet per round, so the injector hands it on before the phone produces
        // more (and the queue bound holds).
        if self.out.len() < OUT_QUEUE_FRAMES {
            if let Ok(Some(t)) = self.phone.poll_transmit(now, &mut self.tx) {
                moved = true;
                self.inj
                    .push(now, Direction::DeviceToHost, &self.tx[..t.len], t.zlp);
            }
        }
        if moved {
            Step::Moved
        } else {
            Step::Idle
        }
    }

    fn flush(&mut self, conn: &OwnedFd) -> io::Result<()> {
        while let Some(frame) = self.out.front() {
            if !try_send(conn.as_fd(), frame)? {
                break;
            }
            self.out.pop_front();
        }
        Ok(())
    }
}

enum Step {
    Moved,
    Idle,
    Unplugged,
}

fn try_send(fd: BorrowedFd<'_>, datagram: &[u8]) -> io::Result<bool> {
    match sock::send(
        fd.as_raw_fd(),
        datagram,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    ) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn try_recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match sock::recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
        Ok(n) => Ok(Some(n)),
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
