//! [`UsbLink`]: the [`Link`] over a phone's bulk pipes: IN by several asynchronous transfers in
//! flight or one reader thread ([`InStrategy`]), OUT by asynchronous transfers or one writer
//! thread ([`OutStrategy`]), libusb's events handled by the device thread or an event thread
//! ([`EventStrategy`]). The defaults (all asynchronous, events inline) measured fastest and
//! cheapest in the VM harness (BENCHMARKS.md §6); the threaded shapes remain as options.
//!
//! rusb 0.9 has only synchronous transfers, so its blocking calls live on threads of their own
//! and the device thread never waits on the bus:
//!
//! - **IN, [`InStrategy::Thread`]: one reader thread.** Several threads reading one endpoint could complete out of order
//!   and reorder the byte stream, so there is exactly one. It reads into large buffers
//!   ([`PipeConfig::in_buffer_size`], 64 KiB: a whole mux packet of up to 65 535 bytes plus the
//!   short packet that ends it fits one transfer) taken from a small ring
//!   ([`PipeConfig::in_buffers`], 4) and hands each completed transfer over to the device thread,
//!   waking its [`mio::Waker`] when the hand-over queue goes from empty to non-empty.
//!   [`Link::recv`] copies out of the oldest buffer and gives it back to the ring once drained:
//!   no allocation per transfer, and a device thread that falls behind stops the reader (the
//!   phone's data then waits in the phone) instead of growing memory. The reads time out every
//!   [`PipeConfig::read_timeout`] only so the thread notices a close; a timed-out read that got
//!   some bytes returns them (rusb reports them as a success), so no data is lost to the timeout.
//!   Zero-length transfers carry nothing for the byte-stream reassembler and are not handed on.
//! - **IN, [`InStrategy::Async`] (the default): [`PipeConfig::in_buffers`] libusb asynchronous
//!   transfers in flight** (`super::async_in`, over `super::libusb_in` and the unsafe `super::libusb_pool`), so
//!   the endpoint always has a buffer queued, even while the device thread or the scheduler is
//!   busy. Same hand-over contract as the reader thread: completions in order, a transfer is
//!   resubmitted only after [`Link::recv`] has drained it (backpressure), a failure becomes the
//!   same [`LinkError`]. Needs a real libusb device handle, so only
//!   [`UsbLink::open_with`](super::UsbLink::open_with) builds it; [`UsbLink::with_io`] always
//!   uses the reader thread.
//! - **OUT, [`OutStrategy::Thread`]: one writer thread** fed by a bounded queue ([`PipeConfig::out_queue`] packets).
//!   [`Link::send`] copies the packet into a recycled buffer and returns; the writer submits it as
//!   **one** bulk transfer of exactly those bytes and then, when asked, a zero-length transfer —
//!   the ZLP that tells the phone where a packet whose length is a multiple of `wMaxPacketSize`
//!   ends (`usbmux_core::usb::needs_zlp`; PROTOCOL.md §2.2, §5.15). OUT transfers have no
//!   timeout: a write that timed out after part of the packet went out would leave the phone a
//!   truncated packet. Writing directly from the device thread would be possible but would hold
//!   it for the whole transfer (≈ 1 ms for 48 KiB at high speed) while clients and IN data wait,
//!   and would leave the bus idle while the device thread does its other work; with the queue,
//!   the next OUT transfer is submitted as soon as the previous one completes.
//! - **OUT, [`OutStrategy::Async`] (the default): [`PipeConfig::out_queue`] libusb asynchronous
//!   transfers** (`super::async_out`, over `super::libusb_out`): the device thread builds the
//!   packet in a free pre-allocated transfer ([`Link::out_buffer`]; [`Link::send`] copies it
//!   into one) and submits it itself, in order, the ZLP as libusb's `ADD_ZERO_PACKET` flag on
//!   the same transfer; no writer thread, so no hand-over per packet. Same backpressure (wait
//!   for a free transfer, at most the stall limit) and faults. Only
//!   [`UsbLink::open_with`](super::UsbLink::open_with) builds it.
//! - **Events, [`EventStrategy::Inline`] (the default, when both directions are
//!   asynchronous):** the device thread's poll loop watches libusb's file descriptors
//!   ([`Link::register`]) and runs the completions itself ([`Link::handle_ready`]); with
//!   [`EventStrategy::Thread`] they run on the IN pool's event thread (or the OUT pool's own,
//!   when IN uses the reader thread) and are handed over through a queue and the waker.
//! - **Failure.** A transfer error other than a timeout ends the link: `NoDevice` (unplugged) is
//!   reported as [`LinkError::Disconnected`], anything else as [`LinkError::Usb`]. The waker is
//!   woken, [`Link::recv`] returns the IN data that arrived before the failure and then the error,
//!   and [`Link::send`] returns the error.
//!
//! The USB calls sit behind the small [`BulkIo`] trait, implemented for a claimed rusb device
//! handle (see [`UsbLink::open`](super::UsbLink::open)) and by test fakes, so the threading, the
//! framing and the failure paths are tested without hardware.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use usbmux_core::Instant;

use super::async_in::{AsyncReader, EventPump};
use super::async_out::AsyncWriter;
use super::identity::UsbLocation;
use super::matching::AppleDeviceKind;
use crate::link::{DeviceIdentity, Link, LinkError};

/// A pair of bulk endpoints: the only USB operations a [`UsbLink`] performs once it is set up.
///
/// Both calls follow rusb's `read_bulk`/`write_bulk` contract, which the link relies on:
/// `Ok(n)` = `n` bytes moved (a timed-out transfer that moved some bytes is `Ok`), an error means
/// nothing moved; `Duration::ZERO` means no timeout. They are called from the link's reader and
/// writer threads concurrently (one thread each), hence `Sync`.
pub trait BulkIo: Send + Sync + 'static {
    /// One bulk IN transfer into `buf`; returns the byte count (0 for a zero-length packet).
    fn read(&self, buf: &mut [u8], timeout: Duration) -> Result<usize, rusb::Error>;

    /// One bulk OUT transfer of exactly `data` (empty = a zero-length packet).
    fn write(&self, data: &[u8], timeout: Duration) -> Result<usize, rusb::Error>;
}

/// How a [`UsbLink`] reads its IN endpoint (see the module docs). Both keep the stream in order
/// and apply the same backpressure; which is faster is measured in the VM harness
/// (`tests/usb-vm/`), and the default follows the measurement: asynchronous transfers gave the
/// same single-connection throughput, more with 8 connections, and half the round-trip latency
/// (BENCHMARKS.md, section 6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum InStrategy {
    /// One reader thread doing synchronous reads into a ring of [`PipeConfig::in_buffers`].
    Thread,
    /// [`PipeConfig::in_buffers`] libusb asynchronous transfers in flight, completed on an
    /// event thread.
    #[default]
    Async,
}

impl InStrategy {
    /// The name used on the command line (`usbmuxd --usb-in`).
    pub fn name(self) -> &'static str {
        match self {
            InStrategy::Thread => "thread",
            InStrategy::Async => "async",
        }
    }
}

impl core::fmt::Display for InStrategy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for InStrategy {
    type Err = String;

    fn from_str(s: &str) -> Result<InStrategy, String> {
        match s {
            "thread" => Ok(InStrategy::Thread),
            "async" => Ok(InStrategy::Async),
            other => Err(format!(
                "unknown USB IN strategy {other:?} (expected \"thread\" or \"async\")"
            )),
        }
    }
}

/// How a [`UsbLink`] writes its OUT endpoint. Both send each packet as one transfer in the
/// order of [`Link::send`], decide the ZLP the same way and apply the same backpressure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OutStrategy {
    /// One writer thread doing synchronous writes fed by a queue of [`PipeConfig::out_queue`]
    /// packets (the module docs).
    Thread,
    /// [`PipeConfig::out_queue`] pre-allocated libusb asynchronous transfers, filled and
    /// submitted by the device thread itself (built in place, [`Link::out_buffer`]), the ZLP as
    /// libusb's `ADD_ZERO_PACKET` flag: no hand-over to a writer thread, which in the VM cost
    /// ≈ 8 system calls and 2–3 context switches per OUT transfer (`super::async_out`).
    #[default]
    Async,
}

impl OutStrategy {
    /// The name used on the command line (`usbmuxd --usb-out`).
    pub fn name(self) -> &'static str {
        match self {
            OutStrategy::Thread => "thread",
            OutStrategy::Async => "async",
        }
    }
}

impl core::fmt::Display for OutStrategy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for OutStrategy {
    type Err = String;

    fn from_str(s: &str) -> Result<OutStrategy, String> {
        match s {
            "thread" => Ok(OutStrategy::Thread),
            "async" => Ok(OutStrategy::Async),
            other => Err(format!(
                "unknown USB OUT strategy {other:?} (expected \"thread\" or \"async\")"
            )),
        }
    }
}

/// Who handles a [`UsbLink`]'s libusb events — runs the completions of its asynchronous
/// transfers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EventStrategy {
    /// An event thread per phone (or the writer thread's synchronous transfers): completions
    /// are handed to the device thread through a queue and its waker.
    Thread,
    /// The device thread itself: its poll loop watches libusb's file descriptors and handles
    /// the events when one fires, so a completion is consumed where it happens — no event
    /// thread, no hand-over, no wake-up per transfer (Debian's usbmuxd's one-loop shape). Needs
    /// both directions asynchronous ([`InStrategy::Async`], [`OutStrategy::Async`]); with
    /// either synchronous, the link uses [`EventStrategy::Thread`] (`super::async_in::EventPump`).
    /// The default: in the VM it beat the event thread on every measure (BENCHMARKS.md §6).
    #[default]
    Inline,
}

impl EventStrategy {
    /// The name used on the command line (`usbmuxd --usb-events`).
    pub fn name(self) -> &'static str {
        match self {
            EventStrategy::Thread => "thread",
            EventStrategy::Inline => "inline",
        }
    }
}

impl core::fmt::Display for EventStrategy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for EventStrategy {
    type Err = String;

    fn from_str(s: &str) -> Result<EventStrategy, String> {
        match s {
            "thread" => Ok(EventStrategy::Thread),
            "inline" => Ok(EventStrategy::Inline),
            other => Err(format!(
                "unknown USB event strategy {other:?} (expected \"thread\" or \"inline\")"
            )),
        }
    }
}

/// Buffer and queue sizes of a [`UsbLink`]. The defaults are what the daemon uses; tests shrink
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipeConfig {
    /// Size of each IN buffer, i.e. the length requested by each bulk IN transfer. Rounded up to
    /// a multiple of 1024 so that it is a whole number of packets at every speed (a buffer that
    /// ends mid-packet makes the host controller report an overflow).
    pub in_buffer_size: usize,
    /// Number of IN buffers: transfers that may complete before the device thread has consumed
    /// them (the reader thread's ring), or transfers in flight ([`InStrategy::Async`]).
    pub in_buffers: usize,
    /// OUT packets that may wait for the writer before [`Link::send`] blocks (with
    /// [`OutStrategy::Async`]: OUT transfers in flight).
    pub out_queue: usize,
    /// Timeout of each bulk IN read: how long the reader may take to notice a close. Timeouts
    /// are not errors. (Asynchronous transfers have no timeout; close cancels them.)
    pub read_timeout: Duration,
    /// How long [`Link::send`] waits for room in a full OUT queue before it declares the pipe
    /// stalled and fails the link (a phone always drains its OUT pipe; one that has not taken a
    /// packet for this long is gone or wedged).
    pub send_stall_limit: Duration,
    /// How IN is read.
    pub in_strategy: InStrategy,
    /// How OUT is written.
    pub out_strategy: OutStrategy,
    /// Who handles libusb's events ([`EventStrategy::Inline`] only when both strategies are
    /// async; otherwise [`EventStrategy::Thread`]).
    pub events: EventStrategy,
    /// Asynchronous transfers use buffers mapped from the kernel's usbfs where it grants them
    /// (done in place: no per-transfer kernel allocation, clearing and copy — about a third
    /// of the daemon's CPU in the VM), else heap buffers (`usbmuxd --usb-heap-buffers`).
    pub usbfs_buffers: bool,
}

impl Default for PipeConfig {
    fn default() -> Self {
        PipeConfig {
            in_buffer_size: 64 * 1024,
            in_buffers: 4,
            out_queue: 8,
            read_timeout: Duration::from_millis(200),
            send_stall_limit: Duration::from_secs(10),
            in_strategy: InStrategy::default(),
            out_strategy: OutStrategy::default(),
            events: EventStrategy::default(),
            usbfs_buffers: true,
        }
    }
}

impl PipeConfig {
    /// The configuration a link actually uses: whole KiB buffers, at least one of everything,
    /// inline events only where both directions are asynchronous.
    pub fn normalized(mut self) -> Self {
        self.in_buffer_size = self
            .in_buffer_size
            .max(1)
            .div_ceil(1024)
            .saturating_mul(1024);
        self.in_buffers = self.in_buffers.max(1);
        self.out_queue = self.out_queue.max(1);
        self.read_timeout = self.read_timeout.max(Duration::from_millis(1));
        // Inline events need both directions asynchronous: a synchronous one has its own
        // thread blocking in libusb, and someone else must handle the other's completions.
        if self.in_strategy != InStrategy::Async || self.out_strategy != OutStrategy::Async {
            self.events = EventStrategy::Thread;
        }
        self
    }
}

/// Transfer counters of a [`UsbLink`] (for logs and `usbmuxctl`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Non-empty IN transfers handed to the device thread.
    pub in_transfers: u64,
    /// Bytes in them.
    pub in_bytes: u64,
    /// Zero-length IN transfers (dropped).
    pub in_zlps: u64,
    /// OUT transfers completed, not counting ZLPs.
    pub out_transfers: u64,
    /// Bytes in them.
    pub out_bytes: u64,
    /// Zero-length OUT transfers sent after packets.
    pub out_zlps: u64,
}

/// Why the link ended, as recorded by whichever side saw it first. `Copy` so both `send` and
/// `recv` can report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    Disconnected,
    Usb {
        what: &'static str,
        error: rusb::Error,
    },
    ShortWrite {
        wrote: usize,
        len: usize,
    },
    Stalled(Duration),
}

impl Fault {
    pub(super) fn from_usb(what: &'static str, error: rusb::Error) -> Fault {
        match error {
            rusb::Error::NoDevice => Fault::Disconnected,
            error => Fault::Usb { what, error },
        }
    }
}

impl From<Fault> for LinkError {
    fn from(fault: Fault) -> LinkError {
        match fault {
            Fault::Disconnected => LinkError::Disconnected,
            Fault::Usb { what, error } => LinkError::Usb(format!("{what}: {error}")),
            Fault::ShortWrite { wrote, len } => {
                LinkError::Usb(format!("bulk OUT: wrote {wrote} of {len} bytes"))
            }
            Fault::Stalled(d) => LinkError::Usb(format!(
                "bulk OUT: no packet accepted for {} s",
                d.as_secs()
            )),
        }
    }
}

struct RxBuf {
    data: Vec<u8>,
    len: usize,
}

#[derive(Default)]
struct RxState {
    /// Completed transfers, oldest first.
    full: VecDeque<RxBuf>,
    /// Buffers the reader may fill.
    free: Vec<Vec<u8>>,
    /// Bytes of `full[0]` already handed out.
    offset: usize,
}

struct TxPacket {
    data: Vec<u8>,
    zlp: bool,
}

#[derive(Default)]
struct TxState {
    queue: VecDeque<TxPacket>,
    /// Buffers of written packets, for reuse by `send`.
    free: Vec<Vec<u8>>,
    /// No more packets will come: the writer exits once the queue is empty.
    closed: bool,
    /// The writer has failed: `send` must not wait for it.
    failed: bool,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) in_transfers: AtomicU64,
    pub(super) in_bytes: AtomicU64,
    pub(super) in_zlps: AtomicU64,
    out_transfers: AtomicU64,
    out_bytes: AtomicU64,
    out_zlps: AtomicU64,
}

#[derive(Default)]
struct Shared {
    rx: Mutex<RxState>,
    /// Signalled when a buffer returns to `rx.free` (or on stop).
    rx_free: Condvar,
    tx: Mutex<TxState>,
    /// Signalled when a packet is queued (or on close).
    tx_ready: Condvar,
    /// Signalled when a packet leaves the queue (or the writer fails).
    tx_space: Condvar,
    stop: AtomicBool,
    fault: Mutex<Option<Fault>>,
    counters: Counters,
}

/// Locks a mutex even if a thread panicked while holding it: the queues stay consistent at
/// every unlock, and refusing to go on would only turn one bug into a hung device.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn fault(&self) -> Option<Fault> {
        *lock(&self.fault)
    }

    /// Records the first fault; later ones are consequences.
    fn fail(&self, fault: Fault) {
        let mut slot = lock(&self.fault);
        if slot.is_none() {
            log::debug!("USB link failed: {}", LinkError::from(fault));
            *slot = Some(fault);
        }
    }
}

pub(super) fn wake(waker: &mio::Waker) {
    if let Err(e) = waker.wake() {
        log::warn!("USB link: waking the device thread failed: {e}");
    }
}

/// The IN side of a [`UsbLink`]: what its [`InStrategy`] owns.
enum InSide {
    /// The reader thread, once started (and until joined).
    Thread(Option<JoinHandle<()>>),
    /// The asynchronous transfers.
    Async(Box<AsyncReader>),
}

/// A phone's usbmux pipe over USB. Implements [`Link`]; see the module docs for the threads.
///
/// Created by [`UsbLink::open`](super::UsbLink::open) (usually through the
/// [`Watcher`](super::Watcher)) or, over any [`BulkIo`], by [`UsbLink::with_io`]. Nothing runs
/// until [`Link::start`]. Dropping the link stops the reader (waiting at most one
/// [`PipeConfig::read_timeout`]; asynchronous transfers are cancelled and their completions
/// awaited) and lets the writer finish the packets already queued in the background;
/// [`UsbLink::close`] waits for both. The USB interface is released when the last
/// of them lets go of the device handle.
pub struct UsbLink {
    identity: DeviceIdentity,
    kind: AppleDeviceKind,
    io: Arc<dyn BulkIo>,
    config: PipeConfig,
    shared: Arc<Shared>,
    in_side: InSide,
    writer: Option<JoinHandle<()>>,
    /// The OUT side with [`OutStrategy::Async`] (then there is no writer thread).
    async_out: Option<Box<AsyncWriter>>,
    /// With [`EventStrategy::Inline`]: the context's events, handled by the device thread.
    pump: Option<Arc<dyn EventPump>>,
    started: bool,
}

impl core::fmt::Debug for UsbLink {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UsbLink")
            .field("identity", &self.identity)
            .field("kind", &self.kind)
            .field("in_strategy", &self.config.in_strategy)
            .field("out_strategy", &self.config.out_strategy)
            .field("events", &self.config.events)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl UsbLink {
    /// A link over any pair of bulk pipes (tests use a fake;
    /// [`UsbLink::open`](super::UsbLink::open) passes a claimed rusb handle).
    /// `identity.max_packet_size` is informational here: the ZLP decision is the caller's (`zlp`
    /// in [`Link::send`]). IN is read by the reader thread whatever `config.in_strategy` says:
    /// asynchronous transfers need a libusb handle, which only
    /// [`UsbLink::open_with`](super::UsbLink::open_with) has; likewise OUT is written by the
    /// writer thread whatever `config.out_strategy` says.
    pub fn with_io(
        identity: DeviceIdentity,
        kind: AppleDeviceKind,
        io: Arc<dyn BulkIo>,
        config: PipeConfig,
    ) -> UsbLink {
        let config = PipeConfig {
            in_strategy: InStrategy::Thread,
            out_strategy: OutStrategy::Thread,
            events: EventStrategy::Thread,
            ..config.normalized()
        };
        UsbLink {
            identity,
            kind,
            io,
            config,
            shared: Arc::new(Shared::default()),
            in_side: InSide::Thread(None),
            writer: None,
            async_out: None,
            pump: None,
            started: false,
        }
    }

    /// A link whose IN side is `reader` (asynchronous transfers) and whose OUT side is `io`'s
    /// `write`, as usual.
    pub(super) fn with_async_in(
        identity: DeviceIdentity,
        kind: AppleDeviceKind,
        io: Arc<dyn BulkIo>,
        reader: AsyncReader,
        config: PipeConfig,
    ) -> UsbLink {
        UsbLink {
            identity,
            kind,
            io,
            config: PipeConfig {
                in_strategy: InStrategy::Async,
                out_strategy: OutStrategy::Thread,
                events: EventStrategy::Thread,
                ..config.normalized()
            },
            shared: Arc::new(Shared::default()),
            in_side: InSide::Async(Box::new(reader)),
            writer: None,
            async_out: None,
            pump: None,
            started: false,
        }
    }

    /// The same link with its OUT side replaced by asynchronous transfers (`writer`), before
    /// [`Link::start`].
    pub(super) fn with_async_out(mut self, writer: AsyncWriter) -> UsbLink {
        self.async_out = Some(Box::new(writer));
        self.config.out_strategy = OutStrategy::Async;
        self
    }

    /// The same link with its libusb events handled by the device thread through `pump`
    /// ([`EventStrategy::Inline`]); both directions must be asynchronous already, with `pump`
    /// set on their completions.
    pub(super) fn with_inline_events(mut self, pump: Arc<dyn EventPump>) -> UsbLink {
        self.pump = Some(pump);
        self.config.events = EventStrategy::Inline;
        self
    }

    /// The first failure seen by either direction.
    fn fault(&self) -> Option<Fault> {
        self.shared
            .fault()
            .or_else(|| match &self.in_side {
                InSide::Async(reader) => reader.fault(),
                InSide::Thread(_) => None,
            })
            .or_else(|| self.async_out.as_ref().and_then(|w| w.fault()))
    }

    /// What the product id says the device is (T2 devices skip preflight).
    pub fn kind(&self) -> AppleDeviceKind {
        self.kind
    }

    /// Bus and address, recovered from the identity's location id (see
    /// [`location_id`](super::location_id)); the [`Watcher`](super::Watcher) reports departures
    /// by this value.
    pub fn location(&self) -> UsbLocation {
        let id = self.identity.location_id;
        UsbLocation {
            bus: ((id >> 16) & 0xff) as u8,
            address: (id & 0xff) as u8,
        }
    }

    /// The sizes in use (after rounding).
    pub fn config(&self) -> PipeConfig {
        self.config
    }

    /// Transfer counters so far.
    pub fn stats(&self) -> PipeStats {
        let c = &self.shared.counters;
        let mut stats = PipeStats {
            in_transfers: c.in_transfers.load(Ordering::Relaxed),
            in_bytes: c.in_bytes.load(Ordering::Relaxed),
            in_zlps: c.in_zlps.load(Ordering::Relaxed),
            out_transfers: c.out_transfers.load(Ordering::Relaxed),
            out_bytes: c.out_bytes.load(Ordering::Relaxed),
            out_zlps: c.out_zlps.load(Ordering::Relaxed),
        };
        if let Some(writer) = &self.async_out {
            let c = writer.counters();
            stats.out_transfers += c.transfers.load(Ordering::Relaxed);
            stats.out_bytes += c.bytes.load(Ordering::Relaxed);
            stats.out_zlps += c.zlps.load(Ordering::Relaxed);
        }
        stats
    }

    /// Stops the link and waits for both threads: the reader within one read timeout, the writer
    /// once the packets already queued are written (or fail). Use it where the interface must be
    /// free afterwards (daemon shutdown, reopening the same device); plain drop does not wait for
    /// the writer.
    pub fn close(mut self) {
        self.shutdown(true);
    }

    fn shutdown(&mut self, join_writer: bool) {
        let shared = &self.shared;
        shared.stop.store(true, Ordering::SeqCst);
        lock(&shared.tx).closed = true;
        shared.tx_ready.notify_all();
        shared.tx_space.notify_all();
        // Take the lock so a reader between its stop check and its wait cannot miss the signal.
        drop(lock(&shared.rx));
        shared.rx_free.notify_all();
        // Asynchronous OUT first: its completions may be handled by the IN pool's event thread.
        if let Some(writer) = &mut self.async_out {
            writer.close();
        }
        match &mut self.in_side {
            InSide::Thread(reader) => {
                if let Some(reader) = reader.take() {
                    if reader.join().is_err() {
                        log::error!("USB reader thread of {} panicked", self.identity.udid);
                    }
                }
            }
            InSide::Async(reader) => reader.close(),
        }
        if let Some(writer) = self.writer.take() {
            if join_writer && writer.join().is_err() {
                log::error!("USB writer thread of {} panicked", self.identity.udid);
            }
        }
    }

    fn spawn(
        &self,
        role: &str,
        waker: &Arc<mio::Waker>,
        body: fn(&dyn BulkIo, &Shared, &mio::Waker, PipeConfig),
    ) -> Result<JoinHandle<()>, LinkError> {
        let (io, shared, waker, config) = (
            Arc::clone(&self.io),
            Arc::clone(&self.shared),
            Arc::clone(waker),
            self.config,
        );
        std::thread::Builder::new()
            .name(format!("usb-{role} {}", self.identity.udid))
            .spawn(move || body(&*io, &shared, &waker, config))
            .map_err(|source| LinkError::Io {
                what: "spawning a USB thread",
                source,
            })
    }
}

impl Drop for UsbLink {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

impl Link for UsbLink {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn start(&mut self, waker: Arc<mio::Waker>) -> Result<(), LinkError> {
        if self.started {
            return Err(LinkError::Protocol("USB link started twice".into()));
        }
        self.started = true;
        match self.in_side {
            InSide::Thread(_) => {
                {
                    let mut rx = lock(&self.shared.rx);
                    rx.free = (0..self.config.in_buffers)
                        .map(|_| vec![0; self.config.in_buffer_size])
                        .collect();
                }
                self.in_side = InSide::Thread(Some(self.spawn("in", &waker, run_reader)?));
            }
            InSide::Async(ref mut reader) => reader.start(Arc::clone(&waker))?,
        }
        if let Some(writer) = &mut self.async_out {
            if let Err(e) = writer.start(Arc::clone(&waker)) {
                self.shutdown(true);
                return Err(e);
            }
            return Ok(());
        }
        match self.spawn("out", &waker, run_writer) {
            Ok(writer) => self.writer = Some(writer),
            Err(e) => {
                self.shutdown(true);
                return Err(e);
            }
        }
        Ok(())
    }

    fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> std::io::Result<()> {
        let Some(pump) = &self.pump else {
            return Ok(());
        };
        for (fd, writable) in pump.fds() {
            let interest = if writable {
                mio::Interest::WRITABLE
            } else {
                mio::Interest::READABLE
            };
            registry.register(&mut mio::unix::SourceFd(&fd), token, interest)?;
        }
        Ok(())
    }

    fn handle_ready(&mut self) {
        if let Some(pump) = &self.pump {
            pump.pump(Duration::ZERO);
        }
    }

    fn send(&mut self, _now: Instant, transfer: &[u8], zlp: bool) -> Result<(), LinkError> {
        if let Some(fault) = self.fault() {
            return Err(fault.into());
        }
        if let Some(writer) = &mut self.async_out {
            return writer.send(transfer, zlp).map_err(LinkError::from);
        }
        let shared = &*self.shared;
        let mut tx = lock(&shared.tx);
        if tx.queue.len() >= self.config.out_queue && !tx.failed {
            let limit = self.config.send_stall_limit;
            let deadline = std::time::Instant::now() + limit;
            while tx.queue.len() >= self.config.out_queue && !tx.failed {
                let now = std::time::Instant::now();
                if now >= deadline {
                    drop(tx);
                    shared.fail(Fault::Stalled(limit));
                    return Err(Fault::Stalled(limit).into());
                }
                tx = shared
                    .tx_space
                    .wait_timeout(tx, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        if tx.failed {
            drop(tx);
            return Err(shared.fault().unwrap_or(Fault::Disconnected).into());
        }
        let mut data = tx.free.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(transfer);
        tx.queue.push_back(TxPacket { data, zlp });
        drop(tx);
        shared.tx_ready.notify_one();
        Ok(())
    }

    fn recv_with(
        &mut self,
        now: Instant,
        scratch: &mut [u8],
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<usize>, LinkError> {
        let InSide::Async(reader) = &mut self.in_side else {
            return crate::link::recv_via_scratch(self, now, scratch, f);
        };
        match reader.recv_with(&self.shared.counters, f) {
            Ok(None) => match self.async_out.as_ref().and_then(|w| w.fault()) {
                Some(fault) => Err(fault.into()),
                None => Ok(None),
            },
            other => other.map_err(LinkError::from),
        }
    }

    fn end_turn(&mut self) {
        if let InSide::Async(reader) = &mut self.in_side {
            reader.submit_emptied();
        }
    }

    fn lends_out_buffers(&self) -> bool {
        self.async_out.is_some()
    }

    fn out_buffer(&mut self) -> Option<&mut [u8]> {
        self.async_out.as_mut()?.reserve()
    }

    fn send_out_buffer(&mut self, _now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        match &mut self.async_out {
            Some(writer) => writer.submit_reserved(len, zlp).map_err(LinkError::from),
            None => Err(LinkError::Protocol(
                "send_out_buffer without an out_buffer".into(),
            )),
        }
    }

    fn hold_out_buffer(&mut self) -> Option<&mut [u8]> {
        self.async_out.as_mut()?.hold()
    }

    fn send_held(&mut self, _now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        match &mut self.async_out {
            Some(writer) => writer.submit_held(len, zlp).map_err(LinkError::from),
            None => Err(LinkError::Protocol(
                "send_held without a held buffer".into(),
            )),
        }
    }

    fn release_held(&mut self) {
        if let Some(writer) = &mut self.async_out {
            writer.release_held();
        }
    }

    fn recv(&mut self, _now: Instant, buf: &mut [u8]) -> Result<Option<usize>, LinkError> {
        let shared = &*self.shared;
        let out_fault = self.async_out.as_ref().and_then(|w| w.fault());
        if let InSide::Async(reader) = &mut self.in_side {
            return match reader.recv(buf, &shared.counters) {
                Ok(None) if !buf.is_empty() => out_fault.map_or(Ok(None), |f| Err(f.into())),
                other => other.map_err(LinkError::from),
            };
        }
        // Read the fault before the queue: the reader queues data before it records a fault, so
        // data that arrived before the failure is always delivered first.
        let fault = shared.fault().or(out_fault);
        if buf.is_empty() {
            return Ok(None);
        }
        let mut rx = lock(&shared.rx);
        let offset = rx.offset;
        if let Some(head) = rx.full.front() {
            let head_len = head.len;
            let pending = head.data.get(offset..head_len).unwrap_or(&[]);
            let n = pending.len().min(buf.len());
            buf[..n].copy_from_slice(&pending[..n]);
            if offset + n >= head_len {
                if let Some(done) = rx.full.pop_front() {
                    rx.free.push(done.data);
                }
                rx.offset = 0;
                drop(rx);
                shared.rx_free.notify_one();
            } else {
                rx.offset = offset + n;
            }
            return Ok(Some(n));
        }
        drop(rx);
        match fault {
            Some(fault) => Err(fault.into()),
            None => Ok(None),
        }
    }
}

/// The reader thread: one bulk IN transfer at a time into ring buffers.
fn run_reader(io: &dyn BulkIo, shared: &Shared, waker: &mio::Waker, config: PipeConfig) {
    let counters = &shared.counters;
    loop {
        let mut buf = {
            let mut rx = lock(&shared.rx);
            loop {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(buf) = rx.free.pop() {
                    break buf;
                }
                rx = shared
                    .rx_free
                    .wait_timeout(rx, config.read_timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        match io.read(&mut buf, config.read_timeout) {
            Ok(0) => {
                counters.in_zlps.fetch_add(1, Ordering::Relaxed);
                lock(&shared.rx).free.push(buf);
            }
            Ok(n) => {
                let len = n.min(buf.len());
                counters.in_transfers.fetch_add(1, Ordering::Relaxed);
                counters.in_bytes.fetch_add(len as u64, Ordering::Relaxed);
                let was_empty = {
                    let mut rx = lock(&shared.rx);
                    let was_empty = rx.full.is_empty();
                    rx.full.push_back(RxBuf { data: buf, len });
                    was_empty
                };
                // The device thread drains the queue until `recv` says `None`, so one wake per
                // empty → non-empty transition is enough.
                if was_empty {
                    wake(waker);
                }
            }
            Err(rusb::Error::Timeout | rusb::Error::Interrupted) => {
                lock(&shared.rx).free.push(buf);
            }
            Err(error) => {
                lock(&shared.rx).free.push(buf);
                shared.fail(Fault::from_usb("bulk IN", error));
                wake(waker);
                return;
            }
        }
    }
}

/// How often an interrupted OUT transfer (nothing sent) is retried before giving up.
const MAX_INTERRUPTED_RETRIES: u32 = 16;

/// One whole OUT transfer of `data`, without timeout.
fn write_exact(io: &dyn BulkIo, data: &[u8]) -> Result<(), Fault> {
    let mut retries = 0;
    loop {
        match io.write(data, Duration::ZERO) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(wrote) => {
                return Err(Fault::ShortWrite {
                    wrote,
                    len: data.len(),
                })
            }
            // rusb reports a partly completed transfer as Ok, so an error means nothing was
            // sent and the packet may be submitted again without duplicating bytes.
            Err(rusb::Error::Interrupted) if retries < MAX_INTERRUPTED_RETRIES => retries += 1,
            Err(error) => return Err(Fault::from_usb("bulk OUT", error)),
        }
    }
}

/// The writer thread: each queued packet as one transfer, then its ZLP if asked.
fn run_writer(io: &dyn BulkIo, shared: &Shared, waker: &mio::Waker, config: PipeConfig) {
    let counters = &shared.counters;
    loop {
        let packet = {
            let mut tx = lock(&shared.tx);
            loop {
                if let Some(packet) = tx.queue.pop_front() {
                    break packet;
                }
                if tx.closed {
                    return;
                }
                tx = shared
                    .tx_ready
                    .wait(tx)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let mut result = write_exact(io, &packet.data);
        if result.is_ok() {
            counters.out_transfers.fetch_add(1, Ordering::Relaxed);
            counters
                .out_bytes
                .fetch_add(packet.data.len() as u64, Ordering::Relaxed);
            if packet.zlp {
                result = write_exact(io, &[]);
                if result.is_ok() {
                    counters.out_zlps.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let mut tx = lock(&shared.tx);
        // Keep at most one spare buffer per queue slot: enough that a steady stream allocates
        // nothing, few enough that a burst of 48 KiB packets does not stay allocated forever.
        if tx.free.len() < config.out_queue {
            tx.free.push(packet.data);
        }
        if let Err(fault) = result {
            tx.failed = true;
            tx.queue.clear();
            drop(tx);
            shared.fail(fault);
            shared.tx_space.notify_all();
            wake(waker);
            return;
        }
        drop(tx);
        shared.tx_space.notify_one();
    }
}
