//! The simulated phone as a real USB device: a Linux FunctionFS function (`usbmux-sim
//! --functionfs DIR`), optionally with its configfs gadget (`--configfs NAME`).
//!
//! The same code is the shape of a usbmux gateway on a board with a USB device controller: the
//! kernel does the bus, this module turns endpoint files into a device-role [`Phone`].
//!
//! # How it runs
//!
//! Two ways. [`Runner::run_loop`] ([`event_loop`], the binary's default) does everything on the
//! calling thread: ep0 and both endpoints' AIO completions on one `ppoll`, transfers handed to
//! the phone and built by it in the kernel's own buffers. [`Runner::run`], described here, is
//! generic over [`Read`]/[`Write`] endpoints (so it is tested against in-memory fakes): it owns
//! the phone and three threads feed it through one channel:
//!
//! - **ep0**: reads FunctionFS events ([`ep0`]). SETUP requests are stalled right there (the
//!   function answers none; the kernel wants the answer before the next read of `ep0`). ENABLE
//!   starts a fresh phone; DISABLE and UNBIND unplug it (the phone and all its connections are
//!   dropped) until the next ENABLE.
//! - **OUT**: reads the bulk OUT endpoint with a [`DEVICE_READ_LEN`]-byte buffer. A read ends at
//!   the host's short packet or ZLP, so each read is one transfer as the host sent it, handed to
//!   the phone whole (strict framing, as on an iPhone; an empty read is a ZLP). A read that fails
//!   with `ESHUTDOWN` means the endpoint was disabled: an unplug, not an error.
//! - **IN**: writes each packet the phone emits as one transfer, then a zero-length write when
//!   the ZLP rule asks for it ([`usbmux_core::usb::needs_zlp`] with the packet size of the speed
//!   the host enumerated, which [`Endpoints::max_packet_size`] reports). Writes block until the
//!   host has read the transfer; at most [`IN_FLIGHT`] packets wait for the writer, then the
//!   phone is not asked for more. Packets of an unplugged phone are dropped, never written to
//!   the next host session.
//!
//! The endpoints are generic ([`std::io::Read`]/[`std::io::Write`]), so the whole runner is
//! tested against in-memory fakes; [`functionfs`] opens the real files.

#[cfg(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_endian = "little"
))]
pub mod aio;
pub mod configfs;
pub mod descriptors;
pub mod ep0;
#[cfg(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_endian = "little"
))]
pub mod event_loop;
pub mod functionfs;

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use usbmux_core::usb::{needs_zlp, MAX_PACKET};
use usbmux_core::{Instant, Transmit};

use crate::cable::DEVICE_READ_LEN;
use crate::phone::{Phone, PhoneConfig};
use ep0::{Ep0Error, Event, SetupRequest, EVENT_SIZE};

/// Packets handed to the IN writer and not yet written, at most.
pub const IN_FLIGHT: usize = 32;

/// Messages the reader threads may queue for the runner before they wait.
const QUEUE: usize = 256;

/// Events read from `ep0` at once.
const EVENTS_PER_READ: usize = 4;

/// A pause after an endpoint reported itself disabled, so a kernel (or fake) that keeps
/// answering `ESHUTDOWN` without blocking cannot make the reader spin.
const DOWN_PAUSE: Duration = Duration::from_millis(10);

/// How long the IN writer keeps retrying a packet its endpoint refuses as disabled while the
/// runner still counts the plug as current. FunctionFS drops a queued ENABLE/DISABLE when a
/// newer one arrives, so a disable and re-enable can reach us as no event at all (seen under
/// dummy_hcd at a replug during transfers): giving up at the first refusal would leave that
/// plug's phone mute for good. A real unplug ends the wait earlier (its event changes the
/// current plug).
const IN_RETRY_FOR: Duration = Duration::from_secs(3);

/// The endpoint files of one FunctionFS function, as the runner uses them.
pub struct Endpoints<C, O, I> {
    /// `ep0`: events are read from it; a zero-length read or write stalls a SETUP.
    pub ep0: C,
    /// The bulk OUT endpoint: each `read` returns one transfer (0 bytes = a ZLP), or fails with
    /// `ESHUTDOWN` when the endpoint is disabled.
    pub out: O,
    /// The bulk IN endpoint: each `write` is one transfer (an empty one is a ZLP); fails with
    /// `ESHUTDOWN` or `EAGAIN` when the endpoint is disabled.
    pub inp: I,
    /// Called at each ENABLE: the IN endpoint's `wMaxPacketSize` at the speed the host
    /// enumerated (64 full speed, 512 high speed); `None` keeps the phone's configured size.
    pub max_packet_size: Box<dyn FnMut() -> Option<u16> + Send>,
}

impl<C, O, I> fmt::Debug for Endpoints<C, O, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoints").finish_non_exhaustive()
    }
}

/// What the runner did, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GadgetEvent {
    /// An event read from `ep0`.
    Ep0(Event),
    /// `ep0` delivered bytes that are not an event (skipped).
    Ep0Garbage(Ep0Error),
    /// A SETUP request was stalled (the function handles none).
    Stalled(SetupRequest),
    /// ENABLE: a fresh phone is plugged in, sending with this packet size.
    Plugged {
        /// Which plug since the start, from 1.
        plug: u64,
        /// The bulk packet size used for the ZLP rule.
        max_packet_size: u16,
    },
    /// The phone was unplugged (DISABLE or UNBIND, or ENABLE while one was plugged).
    Unplugged {
        /// Which plug ended.
        plug: u64,
        /// The event that ended it.
        cause: Event,
    },
    /// An endpoint reported itself disabled (`ESHUTDOWN`/`EAGAIN`): the host side went away.
    EndpointDown {
        /// "OUT" or "IN".
        endpoint: &'static str,
    },
    /// An OUT transfer arrived while no phone was plugged; dropped.
    OutDropped {
        /// Its length.
        len: usize,
    },
    /// An endpoint failed in a way that is not an unplug; the gadget cannot go on.
    EndpointFailed {
        /// "ep0", "OUT" or "IN".
        endpoint: &'static str,
        /// The error.
        error: String,
    },
    /// Something the phone saw (handshakes, connections); the phone's own event.
    Phone(usbmux_core::Event),
}

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// ENABLEs that plugged a phone.
    pub plugs: u64,
    /// OUT transfers handed to a phone (ZLPs included).
    pub out_transfers: u64,
    /// OUT transfers dropped because no phone was plugged.
    pub out_dropped: u64,
    /// IN packets given to the writer (ZLPs not counted).
    pub in_packets: u64,
    /// IN packets the writer follows with a ZLP (their length is a multiple of the packet size).
    pub in_zlps: u64,
    /// SETUP requests stalled.
    pub stalls: u64,
}

/// Why [`Runner::run`] ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum GadgetError {
    /// An endpoint failed for good (`ep0` closed or unreadable, an endpoint file error other
    /// than a disable). The function is unusable; start over.
    #[error("{endpoint}: {error}")]
    Endpoint {
        /// "ep0", "OUT" or "IN".
        endpoint: &'static str,
        /// The error.
        error: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Spawn(io::Error),
}

/// What the threads tell the runner.
enum Msg {
    Event(Event),
    Garbage(Ep0Error),
    Stalled(SetupRequest),
    /// One OUT transfer: the first `len` bytes of the buffer (which goes back to the reader).
    Out(Vec<u8>, usize),
    Down(&'static str),
    Failed(&'static str, io::Error),
    /// The IN writer finished (wrote or dropped) one packet; its buffer, for the next one.
    InDone(Vec<u8>),
    Stop,
}

/// One packet for the IN writer (the first `len` bytes of `data`), tagged with the plug it
/// belongs to.
struct Packet {
    plug: u64,
    data: Vec<u8>,
    len: usize,
    zlp: bool,
}

/// Stops a running [`Runner`] from another thread (a signal handler's thread, a test).
#[derive(Clone)]
pub struct Stopper {
    tx: SyncSender<Msg>,
    /// Wakes [`Runner::run_loop`] out of `poll`.
    wake: Option<Arc<OwnedFd>>,
}

impl fmt::Debug for Stopper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Stopper")
    }
}

impl Stopper {
    /// Makes [`Runner::run`] or [`Runner::run_loop`] return `Ok` soon; harmless if it has ended
    /// already.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(fd) = &self.wake {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a valid buffer to an eventfd we hold.
            unsafe { nix::libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }
}

/// Runs one simulated phone over FunctionFS endpoints (see the module docs).
pub struct Runner {
    cfg: PhoneConfig,
    tx: SyncSender<Msg>,
    rx: Receiver<Msg>,
    /// Written by [`Stopper::stop`]; polled by [`Runner::run_loop`].
    wake: Option<Arc<OwnedFd>>,
    on_event: Box<dyn FnMut(&GadgetEvent) + Send>,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("udid", &self.cfg.identity.udid)
            .finish_non_exhaustive()
    }
}

/// True for the errors FunctionFS gives on an endpoint that is not (or no longer) enabled:
/// `ESHUTDOWN` (disabled under a request), `EAGAIN` (disabled, non-blocking file) and
/// `ECONNRESET` (a request the controller cancelled).
fn is_down(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ESHUTDOWN) | Some(Errno::EAGAIN) | Some(Errno::ECONNRESET)
    )
}

impl Runner {
    /// A runner for phones configured by `cfg` (every ENABLE plugs a fresh one).
    pub fn new(cfg: PhoneConfig) -> Runner {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        Runner {
            cfg,
            tx,
            rx,
            // Only the one-thread loop needs it; it reports its absence when it starts.
            wake: eventfd().ok().map(Arc::new),
            on_event: Box::new(|_| {}),
        }
    }

    /// Calls `f` for everything the runner does (from the runner's thread; keep it short).
    pub fn on_event(mut self, f: impl FnMut(&GadgetEvent) + Send + 'static) -> Runner {
        self.on_event = Box::new(f);
        self
    }

    /// A handle that ends [`Runner::run`] or [`Runner::run_loop`].
    pub fn stopper(&self) -> Stopper {
        Stopper {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// Serves the endpoints until stopped (`Ok`) or an endpoint fails for good (`Err`).
    ///
    /// The reader threads block in the endpoint files; on return they are left behind (a
    /// blocked read cannot be interrupted portably) and end when their endpoint fails or the
    /// process exits.
    pub fn run<C, O, I>(mut self, eps: Endpoints<C, O, I>) -> Result<RunStats, GadgetError>
    where
        C: Read + Write + Send + 'static,
        O: Read + Send + 'static,
        I: Write + Send + 'static,
    {
        let Endpoints {
            ep0,
            out,
            inp,
            mut max_packet_size,
        } = eps;
        let current = Arc::new(AtomicU64::new(0));
        let (in_tx, in_rx) = mpsc::sync_channel::<Packet>(IN_FLIGHT);
        // Buffers go round (reader → runner → reader, runner → writer → runner) instead of
        // being allocated per transfer: a fresh 64 KiB buffer each time made the allocator
        // return memory to the kernel and fault it back in, cleared, per transfer (≈ 5 % of
        // the whole VM guest's time in `clear_page` for the OUT reader alone).
        let (out_free_tx, out_free_rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        spawn("usbmux-sim ep0", {
            let tx = self.tx.clone();
            move || ep0_thread(ep0, &tx)
        })?;
        spawn("usbmux-sim OUT", {
            let tx = self.tx.clone();
            move || out_thread(out, &tx, &out_free_rx)
        })?;
        spawn("usbmux-sim IN", {
            let tx = self.tx.clone();
            let current = Arc::clone(&current);
            move || in_thread(inp, &in_rx, &tx, &current)
        })?;

        let epoch = std::time::Instant::now();
        let now =
            || Instant::from_micros(u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX));
        let mut plugs = Plugs {
            phone: None,
            stats: RunStats::default(),
            mps: self.cfg.identity.max_packet_size,
        };
        let mut in_flight = 0usize;
        let mut in_free: Vec<Vec<u8>> = Vec::new();
        loop {
            // Feed the writer while it has room.
            if let Some(p) = plugs.phone.as_mut() {
                let t = now();
                if p.poll_timeout().is_some_and(|d| d <= t) {
                    p.handle_timeout(t);
                }
                while in_flight < IN_FLIGHT {
                    let mut buf = in_free.pop().unwrap_or_else(|| vec![0u8; MAX_PACKET + 1]);
                    match p.poll_transmit(t, &mut buf) {
                        Ok(Some(x)) => {
                            let zlp = plugs.stats.count_in(&x, plugs.mps);
                            let packet = Packet {
                                plug: plugs.stats.plugs,
                                data: buf,
                                len: x.len,
                                zlp,
                            };
                            // Never blocks: at most IN_FLIGHT packets are queued.
                            if in_tx.send(packet).is_err() {
                                return Err(GadgetError::Endpoint {
                                    endpoint: "IN",
                                    error: io::Error::other("the IN writer ended"),
                                });
                            }
                            in_flight += 1;
                        }
                        Ok(None) => {
                            in_free.push(buf);
                            break;
                        }
                        Err(e) if e.required > buf.len() => {
                            buf.resize(e.required, 0);
                            in_free.push(buf);
                        }
                        Err(_) => {
                            in_free.push(buf);
                            break;
                        }
                    }
                }
                for ev in p.take_events() {
                    (self.on_event)(&GadgetEvent::Phone(ev));
                }
            }

            let wait = plugs
                .phone
                .as_ref()
                .and_then(|p| p.poll_timeout())
                .map(|d| {
                    let us = d.saturating_duration_since(now()).total_micros().max(1000);
                    Duration::from_micros(us)
                });
            let msg = match wait {
                Some(w) => match self.rx.recv_timeout(w) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    // We hold a sender ourselves: cannot happen, but end cleanly if it does.
                    Err(RecvTimeoutError::Disconnected) => return Ok(plugs.stats),
                },
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return Ok(plugs.stats),
                },
            };
            match msg {
                Msg::Stop => return Ok(plugs.stats),
                Msg::InDone(buf) => {
                    in_flight = in_flight.saturating_sub(1);
                    if in_free.len() < IN_FLIGHT {
                        in_free.push(buf);
                    }
                }
                Msg::Out(buf, len) => {
                    plugs.deliver_out(now(), &buf, len, true, &mut *self.on_event);
                    // Full queue: the reader has plenty; let this one go.
                    let _ = out_free_tx.try_send(buf);
                }
                Msg::Down(endpoint) => (self.on_event)(&GadgetEvent::EndpointDown { endpoint }),
                Msg::Garbage(e) => (self.on_event)(&GadgetEvent::Ep0Garbage(e)),
                Msg::Stalled(r) => {
                    plugs.stats.stalls += 1;
                    (self.on_event)(&GadgetEvent::Stalled(r));
                }
                Msg::Failed(endpoint, error) => {
                    return Err(fail(&mut *self.on_event, endpoint, error))
                }
                Msg::Event(ev) => {
                    if plugs.apply(ev, &self.cfg, &mut *max_packet_size, &mut *self.on_event) {
                        // Packets still queued for an earlier plug are dropped by the writer.
                        current.store(plugs.current(), Ordering::SeqCst);
                    }
                }
            }
        }
    }
}

impl RunStats {
    /// Counts IN packet `x` as sent; returns whether a ZLP follows it (the phone's own rule, or
    /// the one for the plug's packet size `mps`).
    fn count_in(&mut self, x: &Transmit, mps: u16) -> bool {
        let zlp = x.zlp || needs_zlp(x.len, mps);
        self.in_packets += 1;
        self.in_zlps += u64::from(zlp);
        zlp
    }
}

/// What both runners keep across ep0 events: the phone plugged in (if any), the counters and
/// the packet size of the current plug.
struct Plugs {
    phone: Option<Phone>,
    stats: RunStats,
    mps: u16,
}

impl Plugs {
    /// The number of the plug whose phone is in, `u64::MAX` while none is.
    fn current(&self) -> u64 {
        if self.phone.is_some() {
            self.stats.plugs
        } else {
            u64::MAX
        }
    }

    /// Hands OUT transfer `buf[..len]` to the phone plugged in, or counts and reports it dropped
    /// when no phone is in or it was read for an earlier plug (`of_current_plug` false).
    fn deliver_out(
        &mut self,
        now: Instant,
        buf: &[u8],
        len: usize,
        of_current_plug: bool,
        on_event: &mut (dyn FnMut(&GadgetEvent) + Send),
    ) {
        match self.phone.as_mut() {
            Some(p) if of_current_plug => {
                self.stats.out_transfers += 1;
                p.handle_transfer(now, buf.get(..len).unwrap_or(&[]));
            }
            _ => {
                self.stats.out_dropped += 1;
                on_event(&GadgetEvent::OutDropped { len });
            }
        }
    }

    /// Applies one ep0 event (reported first): ENABLE plugs a fresh phone, unplugging one still
    /// there; DISABLE and UNBIND unplug. True when the plug changed.
    fn apply(
        &mut self,
        ev: Event,
        cfg: &PhoneConfig,
        max_packet_size: &mut (dyn FnMut() -> Option<u16> + Send),
        on_event: &mut (dyn FnMut(&GadgetEvent) + Send),
    ) -> bool {
        on_event(&GadgetEvent::Ep0(ev));
        if !matches!(ev, Event::Enable | Event::Disable | Event::Unbind) {
            return false;
        }
        if self.phone.take().is_some() {
            on_event(&GadgetEvent::Unplugged {
                plug: self.stats.plugs,
                cause: ev,
            });
        }
        if ev == Event::Enable {
            self.stats.plugs += 1;
            self.mps = max_packet_size()
                .filter(|m| *m > 0)
                .unwrap_or(cfg.identity.max_packet_size);
            let mut cfg = cfg.clone();
            cfg.session.usb_packet_size = self.mps;
            self.phone = Some(Phone::new(cfg));
            on_event(&GadgetEvent::Plugged {
                plug: self.stats.plugs,
                max_packet_size: self.mps,
            });
        }
        true
    }
}

/// Reports an endpoint failure and makes the run's error of it.
fn fail(
    on_event: &mut (dyn FnMut(&GadgetEvent) + Send),
    endpoint: &'static str,
    error: io::Error,
) -> GadgetError {
    on_event(&GadgetEvent::EndpointFailed {
        endpoint,
        error: error.to_string(),
    });
    GadgetError::Endpoint { endpoint, error }
}

/// A new eventfd (non-blocking, close-on-exec).
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; on success we own the returned descriptor.
    let fd = unsafe { nix::libc::eventfd(0, nix::libc::EFD_NONBLOCK | nix::libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Empties an eventfd (non-blocking: nothing to take is fine).
fn drain(fd: &OwnedFd) {
    let mut v = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a valid 8-byte buffer.
    unsafe { nix::libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), GadgetError> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(GadgetError::Spawn)
}

/// Stalls `r`: a zero-length transfer in the direction opposite to the request's data stage,
/// which FunctionFS turns into a STALL handshake (the call itself then fails with `EL2HLT`).
fn stall<T: Read + Write>(ep0: &mut T, r: &SetupRequest) {
    if r.is_in() {
        let _ = ep0.read(&mut []);
    } else {
        let _ = ep0.write(&[]);
    }
}

fn ep0_thread(mut ep0: impl Read + Write, tx: &SyncSender<Msg>) {
    let mut buf = [0u8; EVENT_SIZE * EVENTS_PER_READ];
    loop {
        let n = match ep0.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Msg::Failed("ep0", io::ErrorKind::UnexpectedEof.into()));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Msg::Failed("ep0", e));
                return;
            }
        };
        for ev in ep0::parse_events(&buf[..n]) {
            let msg = match ev {
                Ok(Event::Setup(r)) => {
                    // Answer before anything else touches ep0, then report.
                    stall(&mut ep0, &r);
                    if tx.send(Msg::Event(Event::Setup(r))).is_err() {
                        return;
                    }
                    Msg::Stalled(r)
                }
                Ok(ev) => Msg::Event(ev),
                Err(e) => Msg::Garbage(e),
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    }
}

fn out_thread(mut out: impl Read, tx: &SyncSender<Msg>, free: &Receiver<Vec<u8>>) {
    let mut spare = None;
    loop {
        let mut buf = spare
            .take()
            .or_else(|| free.try_recv().ok())
            .unwrap_or_else(|| vec![0u8; DEVICE_READ_LEN]);
        let msg = match out.read(&mut buf) {
            Ok(n) => Msg::Out(buf, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                spare = Some(buf);
                continue;
            }
            Err(e) if is_down(&e) => {
                spare = Some(buf);
                thread::sleep(DOWN_PAUSE);
                Msg::Down("OUT")
            }
            Err(e) => {
                let _ = tx.send(Msg::Failed("OUT", e));
                return;
            }
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

fn in_thread(
    mut inp: impl Write,
    rx: &Receiver<Packet>,
    tx: &SyncSender<Msg>,
    current: &AtomicU64,
) {
    // The plug whose packets failed with a disabled endpoint for longer than IN_RETRY_FOR:
    // the rest of them are dropped.
    let mut dead = u64::MAX;
    while let Ok(p) = rx.recv() {
        if p.plug == current.load(Ordering::SeqCst) && p.plug != dead {
            match write_packet(&mut inp, &p, tx, current) {
                Ok(()) => {}
                Err(e) if is_down(&e) => dead = p.plug,
                Err(e) => {
                    let _ = tx.send(Msg::Failed("IN", e));
                    return;
                }
            }
        }
        if tx.send(Msg::InDone(p.data)).is_err() {
            return;
        }
    }
}

/// Writes `p` (and its ZLP), retrying while the endpoint refuses as disabled, `p`'s plug is
/// still current and [`IN_RETRY_FOR`] has not passed; the first refusal is reported as
/// [`Msg::Down`].
fn write_packet(
    inp: &mut impl Write,
    p: &Packet,
    tx: &SyncSender<Msg>,
    current: &AtomicU64,
) -> io::Result<()> {
    // Set at the first refusal only: reading the clock for every packet would cost a system
    // call per transfer where the clock has no vDSO (as in the VM harness's guest).
    let mut deadline = None;
    let data = p.data.get(..p.len).unwrap_or(&[]);
    let parts: &[&[u8]] = if p.zlp { &[data, &[]] } else { &[data] };
    for part in parts {
        loop {
            match write_transfer(inp, part) {
                Ok(()) => break,
                Err(e) if is_down(&e) => {
                    let deadline = *deadline.get_or_insert_with(|| {
                        let _ = tx.send(Msg::Down("IN"));
                        std::time::Instant::now() + IN_RETRY_FOR
                    });
                    if std::time::Instant::now() >= deadline
                        || current.load(Ordering::SeqCst) != p.plug
                    {
                        return Err(e);
                    }
                    thread::sleep(DOWN_PAUSE);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Writes one whole transfer in one `write` (two writes would be two transfers), retrying a
/// write interrupted before it started.
fn write_transfer(inp: &mut impl Write, data: &[u8]) -> io::Result<()> {
    for _ in 0..8 {
        match inp.write(data) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short write: {n} of {} bytes",
                    data.len()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::ErrorKind::Interrupted.into())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn disabled_endpoints_are_told_from_failures() {
        for e in [Errno::ESHUTDOWN, Errno::EAGAIN, Errno::ECONNRESET] {
            assert!(is_down(&io::Error::from_raw_os_error(e as i32)), "{e}");
        }
        for e in [Errno::EIO, Errno::EBADF, Errno::ENODEV, Errno::EOVERFLOW] {
            assert!(!is_down(&io::Error::from_raw_os_error(e as i32)), "{e}");
        }
        assert!(!is_down(&io::ErrorKind::BrokenPipe.into()));
    }
}
