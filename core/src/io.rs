//! A small driver for firmware: it pumps a [`Session`] over a non-blocking bulk pipe and lends
//! its connections out as [`embedded_io::Read`] + [`embedded_io::Write`].
//!
//! Read first: the calling contract in [`crate::mux`]. This module is that contract written
//! once, for the common case of a single-threaded gateway that owns one USB link:
//!
//! - [`BulkPipe`]: the two bulk endpoints, `nb`-style (`WouldBlock` = not now, call again).
//!   This is the hardware edge, so it is the one place that speaks `nb` (the `Session` API itself
//!   uses `Option`).
//! - [`Clock`]: where `now` comes from; converted to [`Instant`] at this boundary only.
//! - [`Driver`]: owns the session, the pipe, the clock and two transfer buffers.
//!   [`Driver::poll`] is one non-blocking pump: read available transfers → `handle_transfer`,
//!   `handle_timeout` when due, flush transmits, collect events. [`Driver::next_event`] hands
//!   the events out.
//! - [`Conn`] ([`Driver::conn`]): one connection as a blocking `embedded_io` stream; blocking
//!   means spinning [`Driver::poll`], so a call is bounded by nothing but the peer, as
//!   `embedded-io`'s blocking traits require. Use [`embedded_io::ReadReady`] /
//!   [`embedded_io::WriteReady`] first to never block.
//!
//! # End of stream and errors
//! usbmux has no FIN: a peer ends a connection with an RST, so "reset by the peer" is the
//! ordinary end of a stream and reads as end of file. Every other end is an error whose
//! [`embedded_io::ErrorKind`] says why:
//!
//! | how the connection ended | `read` once drained | `write` |
//! |---|---|---|
//! | peer reset or FIN ([`ResetKind::PeerReset`], [`ResetKind::PeerFin`]) | `Ok(0)` (EOF) | `ConnectionReset` |
//! | refused, pool full on the device | `ConnectionRefused` | `ConnectionRefused` |
//! | connect timeout | `TimedOut` | `TimedOut` |
//! | link lost ([`ResetKind::Unplugged`]) | `BrokenPipe` | `BrokenPipe` |
//! | handshake failed | `NotConnected` | `NotConnected` |
//! | protocol violation, peer restarted, local reset | `ConnectionReset` | `ConnectionReset` |
//! | handle released or stale | `NotConnected` | `NotConnected` |
//!
//! Bytes that arrived before any end can always be read first. Pipe failures map by
//! [`PipeErrorKind`]: `Disconnected` → `BrokenPipe`, `Timeout` → `TimedOut`, `Overflow` →
//! `InvalidData`, `Stall` and `Other` → `Other`.
//!
//! # Example
//! ```no_run
//! use embedded_io::{Read, Write};
//! use usbmux_core::io::{BulkPipe, Driver, PipeErrorKind};
//! use usbmux_core::{Buffers, Host, Instant, Session, SessionConfig};
//!
//! # struct UsbPipe;
//! # impl BulkPipe for UsbPipe {
//! #     type Error = PipeErrorKind;
//! #     fn read_transfer(&mut self, _: &mut [u8]) -> nb::Result<usize, PipeErrorKind> {
//! #         Err(nb::Error::WouldBlock)
//! #     }
//! #     fn write_transfer(&mut self, _: &[u8]) -> nb::Result<(), PipeErrorKind> {
//! #         Err(nb::Error::WouldBlock)
//! #     }
//! # }
//! # fn ticks_us() -> u64 { 0 }
//! // A gateway: 2 connections of 2 KiB + 2 KiB, packets of at most 2 KiB both ways.
//! let cfg = SessionConfig { max_transfer: 2048, ..SessionConfig::default() };
//! let session = Session::<Host, [u8; 2048], 2, 2048>::new(cfg, 0x4242);
//! let clock = || Instant::from_micros(ticks_us());
//! let mut driver = Driver::new(session, UsbPipe, clock, [0u8; 2048], [0u8; 2048]);
//!
//! let bufs = Buffers::new([0u8; 2048], [0u8; 2048]);
//! let id = driver.session_mut().connect(7, bufs).map_err(|e| e.0)?;
//! let mut conn = driver.conn(id);
//! conn.write_all(b"ping")?;
//! conn.flush()?;
//! let mut reply = [0u8; 4];
//! conn.read_exact(&mut reply).map_err(|_| "short read")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;

use embedded_io::ErrorKind;

use crate::mux::{Event, InsufficientSize, Phase, RecvError, Role, SendError, Session};
use crate::tcp::{ConnId, ResetKind, State};
use crate::time::Instant;

/// How many events [`Driver`] holds for the application. When they are not collected, further
/// events stay in the session (connection events are never lost there: they are flags; session
/// events keep the newest, see [`crate::mux::SessionStats::events_dropped`]).
pub const EVENT_QUEUE: usize = 8;

/// Most transfers one [`Driver::poll`] reads, so a peer that never stops sending cannot starve
/// the timers or the transmit side. More are read by the next poll.
pub const MAX_READS_PER_POLL: usize = 16;

/// What went wrong with a bulk pipe, for code that does not know the pipe's own error type
/// (after `embedded_io::ErrorKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PipeErrorKind {
    /// The device or the link is gone (unplug, bus reset, endpoint vanished). The driver ends
    /// the session ([`Session::handle_disconnect`]); build a new one when the link returns.
    Disconnected,
    /// A transfer did not complete within the pipe's own time limit. A write may be retried;
    /// the pipe decides whether part of it went out.
    Timeout,
    /// The endpoint is halted (STALL). Clear the halt, then poll again.
    Stall,
    /// The peer sent more than the read buffer holds (babble, or a transfer larger than the
    /// buffer lent to the driver). Give the driver a larger receive buffer.
    Overflow,
    /// Anything else.
    Other,
}

impl fmt::Display for PipeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PipeErrorKind::Disconnected => "bulk pipe disconnected",
            PipeErrorKind::Timeout => "bulk transfer timed out",
            PipeErrorKind::Stall => "bulk endpoint stalled",
            PipeErrorKind::Overflow => "bulk transfer overflowed the buffer",
            PipeErrorKind::Other => "bulk pipe error",
        })
    }
}

impl core::error::Error for PipeErrorKind {}

impl PipeErrorKind {
    /// The `embedded_io` kind a [`Conn`] reports for this pipe failure.
    pub const fn io_kind(self) -> ErrorKind {
        match self {
            PipeErrorKind::Disconnected => ErrorKind::BrokenPipe,
            PipeErrorKind::Timeout => ErrorKind::TimedOut,
            PipeErrorKind::Overflow => ErrorKind::InvalidData,
            PipeErrorKind::Stall | PipeErrorKind::Other => ErrorKind::Other,
        }
    }
}

/// The error of a [`BulkPipe`]: any type, as long as it can say which [`PipeErrorKind`] it is.
pub trait PipeError: fmt::Debug {
    /// The kind of failure, which decides what the driver does about it.
    fn kind(&self) -> PipeErrorKind;
}

impl PipeError for PipeErrorKind {
    fn kind(&self) -> PipeErrorKind {
        *self
    }
}

impl PipeError for core::convert::Infallible {
    fn kind(&self) -> PipeErrorKind {
        match *self {}
    }
}

/// The two bulk endpoints of one usbmux link, non-blocking.
///
/// Host role: OUT is `write_transfer`, IN is `read_transfer`; device role the other way round.
///
/// # The transfer rules (the ZLP rule)
/// - `write_transfer(data)` sends `data` as **one** bulk transfer: `Ok(())` means all of it was
///   taken (sent or queued in order); `WouldBlock` means none of it was, and the driver will
///   call again with the same bytes before any other. A partial write is not allowed: the
///   device side takes each OUT transfer as exactly one mux packet.
/// - `write_transfer(&[])` is a zero-length packet (ZLP). The driver sends one right after
///   every packet whose length is a multiple of wMaxPacketSize
///   ([`crate::Transmit::zlp`]), so the receiver sees where the transfer ends; the pipe sends
///   it as is and adds none of its own.
/// - `read_transfer(buf)` returns one whole received transfer in `buf[..n]`, or `Ok(0)` for a
///   received ZLP (harmless: the session ignores it). The host side may also return a transfer
///   cut into several reads (its reassembler rejoins them); the device side must not (one OUT
///   transfer = one mux packet), and reports a transfer larger than `buf` as
///   [`PipeErrorKind::Overflow`].
pub trait BulkPipe {
    /// The pipe's error; its [`PipeError::kind`] decides what the driver does.
    type Error: PipeError;

    /// Takes the next received transfer, if one is there (`WouldBlock`: none yet).
    fn read_transfer(&mut self, buf: &mut [u8]) -> nb::Result<usize, Self::Error>;

    /// Sends `data` as one transfer (empty: a ZLP), or takes none of it (`WouldBlock`).
    fn write_transfer(&mut self, data: &[u8]) -> nb::Result<(), Self::Error>;
}

impl<P: BulkPipe + ?Sized> BulkPipe for &mut P {
    type Error = P::Error;

    fn read_transfer(&mut self, buf: &mut [u8]) -> nb::Result<usize, Self::Error> {
        (**self).read_transfer(buf)
    }

    fn write_transfer(&mut self, data: &[u8]) -> nb::Result<(), Self::Error> {
        (**self).write_transfer(data)
    }
}

/// A monotonic clock, read once per [`Driver::poll`]. Any `FnMut() -> Instant` is one.
///
/// It must never go backwards; its epoch is the caller's (a timer's ticks since boot). Only the
/// driver reads it: `core`'s state machines take the value it returns.
pub trait Clock {
    /// The current time.
    fn now(&mut self) -> Instant;
}

impl<F: FnMut() -> Instant> Clock for F {
    fn now(&mut self) -> Instant {
        self()
    }
}

/// Errors of [`Driver::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DriverError<E> {
    /// The pipe failed. If its kind is [`PipeErrorKind::Disconnected`] the session was told
    /// ([`Session::handle_disconnect`]): it is dead, every connection ended with
    /// [`ResetKind::Unplugged`] and the driver dropped any unsent transfer; take the parts back
    /// ([`Driver::into_parts`]) and start a new session when the link returns. Any other kind
    /// changed nothing: a write that failed is retried first by the next poll, so recover the
    /// pipe (e.g. clear a halt) before polling again.
    Pipe(E),
    /// The transmit buffer cannot hold the next packet (nothing was sent). A buffer of
    /// `SessionConfig::max_transfer` bytes always suffices; give the driver a larger one.
    TransmitBufferTooSmall {
        /// Bytes the next packet needs.
        required: usize,
    },
}

impl<E: PipeError> DriverError<E> {
    /// The `embedded_io` kind a [`Conn`] reports for this failure.
    pub fn io_kind(&self) -> ErrorKind {
        match self {
            DriverError::Pipe(e) => e.kind().io_kind(),
            DriverError::TransmitBufferTooSmall { .. } => ErrorKind::InvalidInput,
        }
    }
}

impl<E: PipeError> fmt::Display for DriverError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::Pipe(e) => write!(f, "{}: {:?}", e.kind(), e),
            DriverError::TransmitBufferTooSmall { required } => {
                write!(f, "transmit buffer too small: {required} bytes needed")
            }
        }
    }
}

impl<E: PipeError> core::error::Error for DriverError<E> {}

/// Errors of a [`Conn`]'s `embedded_io` calls; [`embedded_io::Error::kind`] maps them as the
/// module docs' table says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConnError<E> {
    /// The connection ended for this cause (for `read`: any cause but the peer closing it,
    /// which reads as end of file). Its reason text is in
    /// `driver.session().connection(id)`; release the slot with `Session::reset`.
    Closed(ResetKind),
    /// The handle names no live connection (released with `Session::reset`, or stale).
    InvalidHandle,
    /// The connection's send buffer has no room at all (zero length): `write` could never
    /// take a byte. Lend a non-empty transmit buffer.
    NoSendBuffer,
    /// The driver failed while the call waited; see [`DriverError`].
    Driver(DriverError<E>),
}

impl<E> From<DriverError<E>> for ConnError<E> {
    fn from(e: DriverError<E>) -> Self {
        ConnError::Driver(e)
    }
}

/// The `embedded_io` kind of a connection that ended with `kind`.
fn closed_kind(kind: ResetKind) -> ErrorKind {
    match kind {
        ResetKind::Refused | ResetKind::PoolFull | ResetKind::NotAccepted => {
            ErrorKind::ConnectionRefused
        }
        ResetKind::ConnectTimeout => ErrorKind::TimedOut,
        ResetKind::Unplugged => ErrorKind::BrokenPipe,
        ResetKind::HandshakeFailed => ErrorKind::NotConnected,
        ResetKind::PeerReset
        | ResetKind::PeerFin
        | ResetKind::WindowOverflow
        | ResetKind::UnexpectedSeq
        | ResetKind::AckBeyondSent
        | ResetKind::BadFlags
        | ResetKind::Local
        | ResetKind::Malformed
        | ResetKind::PeerRestarted => ErrorKind::ConnectionReset,
    }
}

impl<E: PipeError> fmt::Display for ConnError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Closed(kind) => write!(f, "connection ended: {}", kind.description()),
            ConnError::InvalidHandle => f.write_str("no such connection"),
            ConnError::NoSendBuffer => f.write_str("connection has no send buffer"),
            ConnError::Driver(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<E: PipeError> core::error::Error for ConnError<E> {}

impl<E: PipeError> embedded_io::Error for ConnError<E> {
    fn kind(&self) -> ErrorKind {
        match self {
            ConnError::Closed(kind) => closed_kind(*kind),
            ConnError::InvalidHandle => ErrorKind::NotConnected,
            ConnError::NoSendBuffer => ErrorKind::WriteZero,
            ConnError::Driver(e) => e.io_kind(),
        }
    }
}

/// The transmit the pipe has not taken yet. It is retried before anything else, so packets
/// leave in the order `poll_transmit` produced them and a ZLP right after its packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// Nothing waiting: the next packet may be taken from the session.
    Idle,
    /// `tx_buf[..len]` waits, then a ZLP if `zlp`.
    Packet { len: usize, zlp: bool },
    /// The packet went out; its ZLP waits.
    Zlp,
}

/// Owns a [`Session`] and drives it over a [`BulkPipe`] with a [`Clock`]; see the module docs.
///
/// Memory is the caller's: the session (with its connection pool), and two transfer buffers of
/// the connection buffer type `B`: `rx_buf` receives one transfer at a time, `tx_buf` holds the
/// packet being sent until the pipe takes it.
pub struct Driver<P, C, R: Role, B, const N: usize, const RX: usize = 65536> {
    session: Session<R, B, N, RX>,
    pipe: P,
    clock: C,
    rx_buf: B,
    tx_buf: B,
    pending: Pending,
    events: heapless::Deque<Event, EVENT_QUEUE>,
}

/// Everything a [`Driver`] owned, handed back by [`Driver::into_parts`].
pub struct Parts<P, C, R: Role, B, const N: usize, const RX: usize> {
    /// The session (dead after a disconnect).
    pub session: Session<R, B, N, RX>,
    /// The pipe.
    pub pipe: P,
    /// The clock.
    pub clock: C,
    /// The receive transfer buffer.
    pub rx_buf: B,
    /// The transmit transfer buffer (its contents are unspecified).
    pub tx_buf: B,
}

impl<P, C, R, B, const N: usize, const RX: usize> Driver<P, C, R, B, N, RX>
where
    P: BulkPipe,
    C: Clock,
    R: Role,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// A driver for `session` over `pipe`, reading time from `clock`.
    ///
    /// `rx_buf` must hold the largest transfer the peer sends: for a device, the host's
    /// `max_transfer` (up to 65 535); a host may use any multiple of wMaxPacketSize, since its
    /// reassembler rejoins packets cut across reads. `tx_buf` needs at most
    /// `session.config().max_transfer` bytes; a smaller one cuts data packets shorter, and one
    /// that cannot hold a control packet makes `poll` fail with
    /// [`DriverError::TransmitBufferTooSmall`].
    pub fn new(session: Session<R, B, N, RX>, pipe: P, clock: C, rx_buf: B, tx_buf: B) -> Self {
        Driver {
            session,
            pipe,
            clock,
            rx_buf,
            tx_buf,
            pending: Pending::Idle,
            events: heapless::Deque::new(),
        }
    }

    // ---- getters ----

    /// The session, for its getters (`phase`, `connection`, `stats`, `poll_timeout`...).
    pub fn session(&self) -> &Session<R, B, N, RX> {
        &self.session
    }

    /// The session, for commands (`connect`, `accept`, `refuse`, `reset`, ...). After a
    /// command call [`Self::poll`] (or use a [`Conn`], which polls) so its packets go out;
    /// take events from [`Self::next_event`], not from the session.
    pub fn session_mut(&mut self) -> &mut Session<R, B, N, RX> {
        &mut self.session
    }

    /// The pipe.
    pub fn pipe(&self) -> &P {
        &self.pipe
    }

    /// The pipe, e.g. to clear a halted endpoint after [`PipeErrorKind::Stall`].
    pub fn pipe_mut(&mut self) -> &mut P {
        &mut self.pipe
    }

    /// True when no packet or ZLP waits for the pipe (every packet produced so far was
    /// written).
    pub fn is_flushed(&self) -> bool {
        self.pending == Pending::Idle
    }

    /// Gives everything back. A transmit still waiting for the pipe is dropped (check
    /// [`Self::is_flushed`] first if that matters).
    pub fn into_parts(self) -> Parts<P, C, R, B, N, RX> {
        Parts {
            session: self.session,
            pipe: self.pipe,
            clock: self.clock,
            rx_buf: self.rx_buf,
            tx_buf: self.tx_buf,
        }
    }

    // ---- the pump ----

    /// One non-blocking pump, in the order of the session's calling contract: read up to
    /// [`MAX_READS_PER_POLL`] available transfers into the session, fire its timers if due,
    /// write its packets (a transmit left waiting by `WouldBlock` first, then new ones until the
    /// session has none or the pipe blocks), then collect events for [`Self::next_event`].
    ///
    /// Call it whenever the pipe may have work and no later than
    /// `session().poll_timeout()`; calling it more often is harmless. A [`Conn`] calls it
    /// while it waits. Every step runs even when an earlier one failed (so events, e.g. the
    /// resets a disconnect causes, are always collected); the first error is returned.
    pub fn poll(&mut self) -> Result<(), DriverError<P::Error>> {
        let now = self.clock.now();
        let mut result = self.read_transfers(now);
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
        }
        let flushed = self.write_transfers(now);
        if result.is_ok() {
            result = flushed;
        }
        self.collect_events();
        result
    }

    /// The next event, or `None`. Events are collected by [`Self::poll`] (and here, from the
    /// session, when the driver's queue has room); a `Readable` or `Writable` already queued
    /// is not queued twice.
    ///
    /// Device role: answer `Event::Incoming` with `session_mut().accept(..)` or `refuse(..)`.
    /// Both roles: after `Event::Reset` or `Event::Refused` (and reading what is left), call
    /// `session_mut().reset(id, "")` to free the slot and get the buffers back.
    pub fn next_event(&mut self) -> Option<Event> {
        self.collect_events();
        self.events.pop_front()
    }

    /// Lends connection `id` as a blocking `embedded_io` stream. The handle is checked on
    /// use (a stale one is [`ConnError::InvalidHandle`]).
    pub fn conn(&mut self, id: ConnId) -> Conn<'_, P, C, R, B, N, RX> {
        Conn { driver: self, id }
    }

    fn read_transfers(&mut self, now: Instant) -> Result<(), DriverError<P::Error>> {
        for _ in 0..MAX_READS_PER_POLL {
            match self.pipe.read_transfer(self.rx_buf.as_mut()) {
                Ok(n) => {
                    // A pipe that claims more than the buffer holds is clamped, not trusted.
                    let buf = self.rx_buf.as_ref();
                    let n = n.min(buf.len());
                    self.session.handle_transfer(now, &buf[..n]);
                }
                Err(nb::Error::WouldBlock) => break,
                Err(nb::Error::Other(e)) => return Err(self.pipe_failed(e)),
            }
        }
        Ok(())
    }

    fn write_transfers(&mut self, now: Instant) -> Result<(), DriverError<P::Error>> {
        loop {
            let written = match self.pending {
                Pending::Idle => {
                    match self.session.poll_transmit(now, self.tx_buf.as_mut()) {
                        Ok(Some(t)) => {
                            self.pending = Pending::Packet {
                                len: t.len,
                                zlp: t.zlp,
                            };
                        }
                        Ok(None) => return Ok(()),
                        Err(InsufficientSize { required }) => {
                            warn!("transmit buffer too small: {} bytes needed", required);
                            return Err(DriverError::TransmitBufferTooSmall { required });
                        }
                    }
                    continue;
                }
                Pending::Packet { len, .. } => {
                    let buf = self.tx_buf.as_ref();
                    self.pipe.write_transfer(&buf[..len.min(buf.len())])
                }
                Pending::Zlp => self.pipe.write_transfer(&[]),
            };
            match written {
                Ok(()) => {
                    self.pending = match self.pending {
                        Pending::Packet { zlp: true, .. } => Pending::Zlp,
                        _ => Pending::Idle,
                    };
                }
                Err(nb::Error::WouldBlock) => return Ok(()),
                Err(nb::Error::Other(e)) => return Err(self.pipe_failed(e)),
            }
        }
    }

    fn pipe_failed(&mut self, e: P::Error) -> DriverError<P::Error> {
        let kind = e.kind();
        if kind == PipeErrorKind::Disconnected {
            if self.session.phase() != Phase::Dead {
                debug!("bulk pipe disconnected: ending the session");
                self.session.handle_disconnect();
            }
            self.pending = Pending::Idle;
        } else {
            warn!("bulk pipe error: {:?}", kind);
        }
        DriverError::Pipe(e)
    }

    fn collect_events(&mut self) {
        while !self.events.is_full() {
            let Some(e) = self.session.poll_event() else {
                break;
            };
            // Compared by hand: `Event`'s derived `==` (reason texts and all) would cost
            // firmware far more code than these two cases need.
            let repeat = self.events.iter().any(|q| match (q, &e) {
                (Event::Readable(a), Event::Readable(b))
                | (Event::Writable(a), Event::Writable(b)) => a == b,
                _ => false,
            });
            if !repeat {
                // Cannot fail: checked for room above.
                let _ = self.events.push_back(e);
            }
        }
    }
}

/// One connection of a [`Driver`] as a blocking byte stream ([`Driver::conn`]).
///
/// - `read` returns what has arrived (at least one byte), waiting for some if none has;
///   `Ok(0)` only at the end of the stream: the peer closed it and every byte was read.
/// - `write` queues what fits in the connection's send buffer (at least one byte), waiting for
///   room if there is none. Queued bytes leave on the next poll: call `flush` (or any blocking
///   call, or [`Driver::poll`]).
/// - `flush` waits until every queued byte has been handed to the pipe.
///
/// Waiting spins [`Driver::poll`] and ends only when the peer acts or the link fails; check
/// `read_ready`/`write_ready` first to never wait.
pub struct Conn<'d, P, C, R: Role, B, const N: usize, const RX: usize> {
    driver: &'d mut Driver<P, C, R, B, N, RX>,
    id: ConnId,
}

impl<P, C, R, B, const N: usize, const RX: usize> Conn<'_, P, C, R, B, N, RX>
where
    P: BulkPipe,
    C: Clock,
    R: Role,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The connection's handle.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The driver, e.g. to look at the connection's state or to take events between calls.
    pub fn driver(&mut self) -> &mut Driver<P, C, R, B, N, RX> {
        self.driver
    }

    /// Why the connection ended (`Local` if the session kept no reason).
    fn end_kind(&self) -> ResetKind {
        self.driver
            .session
            .connection(self.id)
            .and_then(|c| c.reason())
            .map_or(ResetKind::Local, |r| r.kind)
    }

    /// One non-blocking read: `Some(n)` to return (0 = end of stream), `None` if nothing yet.
    fn try_read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ConnError<P::Error>> {
        match self.driver.session.recv(self.id, buf) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(RecvError::InvalidHandle) => Err(ConnError::InvalidHandle),
            Err(RecvError::Finished) => match self.end_kind() {
                ResetKind::PeerReset | ResetKind::PeerFin => Ok(Some(0)),
                kind => Err(ConnError::Closed(kind)),
            },
        }
    }

    /// True if a `read` would return at once (data, end of stream or an error).
    fn readable_now(&self) -> bool {
        self.driver
            .session
            .connection(self.id)
            .is_none_or(|c| c.recv_queue() > 0 || c.state() == State::Closed)
    }

    /// True if a `write` would return at once (room, or an error).
    fn writable_now(&self) -> bool {
        self.driver.session.connection(self.id).is_none_or(|c| {
            c.send_capacity() > 0 || c.state() == State::Closed || c.send_queue() == 0
        })
    }
}

impl<P, C, R, B, const N: usize, const RX: usize> embedded_io::ErrorType
    for Conn<'_, P, C, R, B, N, RX>
where
    P: BulkPipe,
    R: Role,
{
    type Error = ConnError<P::Error>;
}

impl<P, C, R, B, const N: usize, const RX: usize> embedded_io::Read for Conn<'_, P, C, R, B, N, RX>
where
    P: BulkPipe,
    C: Clock,
    R: Role,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Reads what has arrived, waiting for at least one byte; `Ok(0)` at end of stream (or
    /// for an empty `buf`). Bytes that arrived before a failure are returned first; the
    /// failure is reported by the read that finds nothing left.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(n) = self.try_read(buf)? {
                return Ok(n);
            }
            if let Err(e) = self.driver.poll() {
                return match self.try_read(buf) {
                    Ok(Some(n)) if n > 0 => Ok(n),
                    _ => Err(ConnError::Driver(e)),
                };
            }
        }
    }
}

impl<P, C, R, B, const N: usize, const RX: usize> embedded_io::Write for Conn<'_, P, C, R, B, N, RX>
where
    P: BulkPipe,
    C: Clock,
    R: Role,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Queues what fits (at least one byte), waiting for room; bytes written before the
    /// connection is established go out once it is.
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.driver.session.send(self.id, buf) {
                Ok(0) => {}
                Ok(n) => return Ok(n),
                Err(SendError::InvalidHandle) => return Err(ConnError::InvalidHandle),
                Err(SendError::Closed) => return Err(ConnError::Closed(self.end_kind())),
            }
            if self
                .driver
                .session
                .connection(self.id)
                .is_some_and(|c| c.send_capacity() == 0 && c.send_queue() == 0)
            {
                return Err(ConnError::NoSendBuffer);
            }
            self.driver.poll()?;
        }
    }

    /// Waits until every byte written has been handed to the pipe (usbmux has no end-to-end
    /// acknowledgement beyond the window). Fails once the connection has ended: an ended
    /// connection drops its unsent bytes, so success could not be told from loss.
    fn flush(&mut self) -> Result<(), Self::Error> {
        loop {
            let c = self
                .driver
                .session
                .connection(self.id)
                .ok_or(ConnError::InvalidHandle)?;
            if c.state() == State::Closed {
                return Err(ConnError::Closed(self.end_kind()));
            }
            if c.send_queue() == 0 && self.driver.is_flushed() {
                return Ok(());
            }
            self.driver.poll()?;
        }
    }
}

impl<P, C, R, B, const N: usize, const RX: usize> embedded_io::ReadReady
    for Conn<'_, P, C, R, B, N, RX>
where
    P: BulkPipe,
    C: Clock,
    R: Role,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Polls once if needed; true if the next `read` returns at once.
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        if !self.readable_now() {
            self.driver.poll()?;
        }
        Ok(self.readable_now())
    }
}

impl<P, C, R, B, const N: usize, const RX: usize> embedded_io::WriteReady
    for Conn<'_, P, C, R, B, N, RX>
where
    P: BulkPipe,
    C: Clock,
    R: Role,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Polls once if needed; true if the next `write` returns at once.
    fn write_ready(&mut self) -> Result<bool, Self::Error> {
        if !self.writable_now() {
            self.driver.poll()?;
        }
        Ok(self.writable_now())
    }
}

#[cfg(test)]
mod tests {
    //! A host `Driver` and a device `Driver` joined by an in-memory cable. Single-threaded and
    //! deterministic: the host's pipe runs the device (driver and echo service) before every
    //! call, so the host's blocking calls make progress, and both read one fake clock.
    use std::boxed::Box;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::rc::Rc;
    use std::vec;
    use std::vec::Vec;

    use embedded_io::{Error as _, ErrorKind, Read, ReadReady, Write, WriteReady};

    use super::*;
    use crate::storage::Buffers;
    use crate::usb::needs_zlp;
    use crate::{Device, Host, SessionConfig};

    /// wMaxPacketSize of both endpoints: small, so ZLPs are frequent.
    const MPS: u16 = 64;
    /// Largest packet either side sends (a multiple of MPS: full packets need a ZLP).
    const MAX_TRANSFER: usize = 4096;
    /// Fake time per clock read.
    const TICK_US: u64 = 50;

    type HostDriver = Driver<MemPipe, FakeClock, Host, Vec<u8>, 4, 65536>;
    type DeviceDriver = Driver<MemPipe, FakeClock, Device, Vec<u8>, 4, 0>;

    /// One direction of the cable: transfers in order. The ZLP rule is checked on the way in.
    #[derive(Default)]
    struct Lane {
        queue: VecDeque<Vec<u8>>,
        zlp_due: bool,
        packets: usize,
        zlps: usize,
        /// Every write attempt: (bytes, taken).
        attempts: Vec<(Vec<u8>, bool)>,
    }

    impl Lane {
        fn push(&mut self, data: &[u8]) {
            if self.zlp_due {
                assert!(data.is_empty(), "a ZLP must follow its packet at once");
                self.zlp_due = false;
                self.zlps += 1;
            } else {
                assert!(!data.is_empty(), "a ZLP that follows no packet");
                self.zlp_due = needs_zlp(data.len(), MPS);
                self.packets += 1;
            }
            self.queue.push_back(data.to_vec());
        }
    }

    #[derive(Default)]
    struct Cable {
        h2d: Lane,
        d2h: Lane,
        unplugged: bool,
    }

    struct MemPipe {
        cable: Rc<RefCell<Cable>>,
        host_end: bool,
        /// Answer every other read and every other write with `WouldBlock`.
        flaky: bool,
        reads: u64,
        writes: u64,
        /// Run before every call (the host end runs the device).
        pump: Option<Box<dyn FnMut()>>,
    }

    impl MemPipe {
        fn start(&mut self, write: bool) -> nb::Result<(), PipeErrorKind> {
            if let Some(p) = self.pump.as_mut() {
                p();
            }
            let calls = if write {
                &mut self.writes
            } else {
                &mut self.reads
            };
            *calls += 1;
            if self.cable.borrow().unplugged {
                return Err(nb::Error::Other(PipeErrorKind::Disconnected));
            }
            if self.flaky && *calls % 2 == 1 {
                return Err(nb::Error::WouldBlock);
            }
            Ok(())
        }
    }

    impl BulkPipe for MemPipe {
        type Error = PipeErrorKind;

        fn read_transfer(&mut self, buf: &mut [u8]) -> nb::Result<usize, PipeErrorKind> {
            self.start(false)?;
            let mut cable = self.cable.borrow_mut();
            let lane = if self.host_end {
                &mut cable.d2h
            } else {
                &mut cable.h2d
            };
            let mut t = lane.queue.pop_front().ok_or(nb::Error::WouldBlock)?;
            if t.len() > buf.len() {
                if !self.host_end {
                    // One OUT transfer must fit the device's buffer whole.
                    return Err(nb::Error::Other(PipeErrorKind::Overflow));
                }
                // An IN transfer longer than the host's buffer arrives in pieces.
                lane.queue.push_front(t.split_off(buf.len()));
            }
            buf[..t.len()].copy_from_slice(&t);
            Ok(t.len())
        }

        fn write_transfer(&mut self, data: &[u8]) -> nb::Result<(), PipeErrorKind> {
            let r = self.start(true);
            let mut cable = self.cable.borrow_mut();
            let lane = if self.host_end {
                &mut cable.h2d
            } else {
                &mut cable.d2h
            };
            lane.attempts.push((data.to_vec(), r.is_ok()));
            r?;
            lane.push(data);
            Ok(())
        }
    }

    #[derive(Clone)]
    struct FakeClock(Rc<Cell<u64>>);

    impl Clock for FakeClock {
        fn now(&mut self) -> Instant {
            let t = self.0.get() + TICK_US;
            self.0.set(t);
            Instant::from_micros(t)
        }
    }

    /// The phone: accepts port 7 and echoes through `Conn`, never blocking
    /// (`read_ready`/`write_ready` first); refuses every other port.
    struct EchoDevice {
        driver: DeviceDriver,
        conns: Vec<(ConnId, Vec<u8>)>,
        events: Vec<Event>,
    }

    impl EchoDevice {
        fn step(&mut self) {
            let _ = self.driver.poll();
            while let Some(e) = self.driver.next_event() {
                if let Event::Incoming { id, port } = e {
                    if port == 7 {
                        let bufs = Buffers::new(vec![0; 16 * 1024], vec![0; 16 * 1024]);
                        self.driver
                            .session_mut()
                            .accept(id, bufs)
                            .map_err(|e| e.0)
                            .expect("accept");
                        self.conns.push((id, Vec::new()));
                    } else {
                        self.driver
                            .session_mut()
                            .refuse(id, b"no service")
                            .expect("refuse");
                    }
                }
                self.events.push(e);
            }
            for (id, carry) in self.conns.iter_mut() {
                let mut conn = self.driver.conn(*id);
                let mut buf = [0u8; 8192];
                loop {
                    if carry.is_empty() {
                        if !conn.read_ready().unwrap_or(false) {
                            break;
                        }
                        match conn.read(&mut buf) {
                            Ok(n) if n > 0 => carry.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    if !conn.write_ready().unwrap_or(false) {
                        break;
                    }
                    match conn.write(carry) {
                        Ok(n) => {
                            carry.drain(..n);
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }

    struct Rig {
        host: HostDriver,
        dev: Rc<RefCell<EchoDevice>>,
        cable: Rc<RefCell<Cable>>,
    }

    fn config() -> SessionConfig {
        SessionConfig {
            max_transfer: MAX_TRANSFER,
            usb_packet_size: MPS,
            ..SessionConfig::default()
        }
    }

    fn rig(flaky: bool) -> Rig {
        let cable = Rc::new(RefCell::new(Cable::default()));
        let time = Rc::new(Cell::new(0));
        let dev_pipe = MemPipe {
            cable: cable.clone(),
            host_end: false,
            flaky,
            reads: 0,
            writes: 0,
            pump: None,
        };
        let dev = Rc::new(RefCell::new(EchoDevice {
            driver: Driver::new(
                Session::<Device, Vec<u8>, 4, 0>::new(config()),
                dev_pipe,
                FakeClock(time.clone()),
                vec![0; MAX_TRANSFER],
                vec![0; MAX_TRANSFER],
            ),
            conns: Vec::new(),
            events: Vec::new(),
        }));
        let d = dev.clone();
        let host_pipe = MemPipe {
            cable: cable.clone(),
            host_end: true,
            flaky,
            reads: 0,
            writes: 0,
            pump: Some(Box::new(move || d.borrow_mut().step())),
        };
        let host = Driver::new(
            Session::<Host, Vec<u8>, 4, 65536>::new(config(), 1000),
            host_pipe,
            FakeClock(time),
            vec![0; 1024],
            vec![0; MAX_TRANSFER],
        );
        Rig { host, dev, cable }
    }

    fn bufs() -> Buffers<Vec<u8>> {
        Buffers::new(vec![0; 16 * 1024], vec![0; 16 * 1024])
    }

    fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// Connects to `port` and waits (bounded) until the connection is established or ended.
    fn connect(r: &mut Rig, port: u16) -> ConnId {
        let id = r
            .host
            .session_mut()
            .connect(port, bufs())
            .map_err(|e| e.0)
            .expect("connect");
        for _ in 0..1000 {
            if r.host.session().state(id) != Some(State::SynSent) {
                return id;
            }
            r.host.poll().expect("poll");
        }
        panic!("connect never finished");
    }

    #[track_caller]
    fn assert_clean(r: &Rig) {
        let h = r.host.session().stats();
        let d = r.dev.borrow().driver.session().stats();
        for s in [h, d] {
            assert_eq!(s.seq_anomalies, 0, "{s:?}");
            assert_eq!(s.reassembly_errors, 0, "{s:?}");
            assert_eq!(s.dropped_malformed, 0, "{s:?}");
            assert_eq!(s.dropped_unexpected, 0, "{s:?}");
        }
    }

    fn echo_100k(flaky: bool) {
        let mut r = rig(flaky);
        let id = connect(&mut r, 7);
        assert_eq!(r.host.session().state(id), Some(State::Established));
        let data = pattern(100 * 1024);
        let mut conn = r.host.conn(id);
        let (mut off, mut k) = (0, 0usize);
        while off < data.len() {
            // Uneven chunks, some larger than one packet.
            let n = (1 + (k * 2719) % 9000).min(data.len() - off);
            conn.write_all(&data[off..off + n]).expect("write");
            conn.flush().expect("flush");
            let mut back = vec![0u8; n];
            conn.read_exact(&mut back).expect("read");
            assert!(back == data[off..off + n], "echo differs at {off}");
            off += n;
            k += 1;
        }
        assert_eq!(r.host.session().state(id), Some(State::Established));
        assert_clean(&r);
        let cable = r.cable.borrow();
        // Full packets went out both ways, each followed by its ZLP.
        assert!(cable.h2d.zlps > 0, "no ZLP host -> device");
        assert!(cable.d2h.zlps > 0, "no ZLP device -> host");
        if flaky {
            // Every refused write was retried at once with the same bytes.
            for lane in [&cable.h2d, &cable.d2h] {
                assert!(lane.attempts.iter().any(|a| !a.1 && !a.0.is_empty()));
                // Including ZLPs refused right after their packet went out.
                assert!(lane.attempts.iter().any(|a| !a.1 && a.0.is_empty()));
                for w in lane.attempts.windows(2) {
                    if !w[0].1 {
                        assert_eq!(w[0].0, w[1].0, "a blocked transfer was not retried first");
                    }
                }
            }
        }
    }

    #[test]
    fn echo_100k_through_embedded_io() {
        echo_100k(false);
    }

    #[test]
    fn echo_100k_when_every_other_call_would_block() {
        echo_100k(true);
    }

    #[test]
    fn peer_close_reads_as_eof_and_fails_writes() {
        let mut r = rig(false);
        let id = connect(&mut r, 7);
        let mut conn = r.host.conn(id);
        conn.write_all(b"bye?").unwrap();
        let mut back = [0u8; 4];
        conn.read_exact(&mut back).unwrap();
        let dev_id = r.dev.borrow().conns[0].0;
        r.dev
            .borrow_mut()
            .driver
            .session_mut()
            .reset(dev_id, "done")
            .unwrap();
        r.dev.borrow_mut().conns.clear();
        let mut conn = r.host.conn(id);
        assert_eq!(conn.read(&mut back).unwrap(), 0);
        assert_eq!(conn.read(&mut back).unwrap(), 0);
        assert!(conn.read_ready().unwrap());
        let e = conn.write(b"x").unwrap_err();
        assert_eq!(e, ConnError::Closed(ResetKind::PeerReset));
        assert_eq!(e.kind(), ErrorKind::ConnectionReset);
        let mut saw = false;
        while let Some(e) = r.host.next_event() {
            if let Event::Reset { id: i, reason } = e {
                assert_eq!(i, id);
                assert_eq!(reason.kind, ResetKind::PeerReset);
                assert_eq!(reason.text(), b"done");
                saw = true;
            }
        }
        assert!(saw);
        // Released: the handle is stale.
        r.host.session_mut().reset(id, "").unwrap();
        let e = r.host.conn(id).read(&mut back).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotConnected);
        assert_eq!(
            r.host.conn(id).write(b"x").unwrap_err().kind(),
            ErrorKind::NotConnected
        );
        assert_eq!(
            r.host.conn(id).flush().unwrap_err().kind(),
            ErrorKind::NotConnected
        );
    }

    #[test]
    fn refused_port_is_connection_refused() {
        let mut r = rig(false);
        let id = r
            .host
            .session_mut()
            .connect(9, bufs())
            .map_err(|e| e.0)
            .unwrap();
        let mut conn = r.host.conn(id);
        // Bytes written before the connection is established are queued...
        assert_eq!(conn.write(b"early").unwrap(), 5);
        // ...and the refusal is what the read finds.
        let e = conn.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e, ConnError::Closed(ResetKind::Refused));
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
        assert_eq!(
            conn.flush().unwrap_err().kind(),
            ErrorKind::ConnectionRefused
        );
        assert!(r
            .dev
            .borrow()
            .events
            .iter()
            .any(|e| matches!(e, Event::Incoming { port: 9, .. })));
    }

    #[test]
    fn disconnect_returns_data_first_then_broken_pipe() {
        let mut r = rig(false);
        let id = connect(&mut r, 7);
        let mut conn = r.host.conn(id);
        conn.write_all(b"hello").unwrap();
        conn.flush().unwrap();
        for _ in 0..100 {
            if conn.driver().session().connection(id).unwrap().recv_queue() == 5 {
                break;
            }
            conn.driver().poll().unwrap();
        }
        r.cable.borrow_mut().unplugged = true;
        let mut conn = r.host.conn(id);
        let mut buf = [0u8; 16];
        // What arrived before the unplug is still read.
        assert_eq!(conn.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        // The read that meets the unplug reports the pipe's error...
        let e = conn.read(&mut buf).unwrap_err();
        assert_eq!(
            e,
            ConnError::Driver(DriverError::Pipe(PipeErrorKind::Disconnected))
        );
        assert_eq!(e.kind(), ErrorKind::BrokenPipe);
        // ...and from then on the connection is over: no more polling, no EOF.
        let e = conn.read(&mut buf).unwrap_err();
        assert_eq!(e, ConnError::Closed(ResetKind::Unplugged));
        assert_eq!(e.kind(), ErrorKind::BrokenPipe);
        assert_eq!(conn.write(b"x").unwrap_err().kind(), ErrorKind::BrokenPipe);
        assert_eq!(r.host.session().phase(), Phase::Dead);
        assert!(r.host.is_flushed());
        let mut events = Vec::new();
        while let Some(e) = r.host.next_event() {
            events.push(e);
        }
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Reset { id: i, reason } if *i == id && reason.kind == ResetKind::Unplugged
        )));
        // Later polls keep reporting the pipe's state and change nothing.
        assert_eq!(
            r.host.poll(),
            Err(DriverError::Pipe(PipeErrorKind::Disconnected))
        );
        let parts = r.host.into_parts();
        assert_eq!(parts.session.phase(), Phase::Dead);
    }

    #[test]
    fn blocked_pipe_keeps_packets_and_order() {
        // A pipe that takes nothing until opened: the first packet waits in the driver, every
        // later one in the session, and all leave in order once it opens.
        struct Gate {
            open: bool,
            sent: Vec<Vec<u8>>,
            tries: usize,
        }
        impl BulkPipe for &RefCell<Gate> {
            type Error = PipeErrorKind;
            fn read_transfer(&mut self, _: &mut [u8]) -> nb::Result<usize, PipeErrorKind> {
                Err(nb::Error::WouldBlock)
            }
            fn write_transfer(&mut self, data: &[u8]) -> nb::Result<(), PipeErrorKind> {
                let mut g = self.borrow_mut();
                g.tries += 1;
                if !g.open {
                    return Err(nb::Error::WouldBlock);
                }
                g.sent.push(data.to_vec());
                Ok(())
            }
        }
        let gate = RefCell::new(Gate {
            open: false,
            sent: Vec::new(),
            tries: 0,
        });
        let session = Session::<Host, Vec<u8>, 2, 65536>::new(config(), 1);
        let mut d = Driver::new(session, &gate, || Instant::ZERO, vec![0; 64], vec![0; 4096]);
        for _ in 0..5 {
            d.poll().unwrap();
            assert!(!d.is_flushed());
        }
        assert_eq!(gate.borrow().tries, 5);
        assert!(gate.borrow().sent.is_empty());
        gate.borrow_mut().open = true;
        d.poll().unwrap();
        assert!(d.is_flushed());
        let g = gate.borrow();
        // Only the VERSION request (the handshake has not been answered).
        assert_eq!(g.sent.len(), 1);
        assert_eq!(g.sent[0].len(), 20);
    }

    #[test]
    fn small_transmit_buffer_is_reported() {
        let cable = Rc::new(RefCell::new(Cable::default()));
        let pipe = MemPipe {
            cable,
            host_end: true,
            flaky: false,
            reads: 0,
            writes: 0,
            pump: None,
        };
        let session = Session::<Host, Vec<u8>, 1, 65536>::new(config(), 1);
        let mut d = Driver::new(session, pipe, || Instant::ZERO, vec![0; 64], vec![0; 10]);
        let e = d.poll().unwrap_err();
        assert_eq!(e, DriverError::TransmitBufferTooSmall { required: 20 });
        let e: ConnError<PipeErrorKind> = e.into();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn empty_buffers_return_at_once() {
        let mut r = rig(false);
        let id = r
            .host
            .session_mut()
            .connect(7, bufs())
            .map_err(|e| e.0)
            .unwrap();
        let mut conn = r.host.conn(id);
        assert_eq!(conn.read(&mut []).unwrap(), 0);
        assert_eq!(conn.write(&[]).unwrap(), 0);
        // Room in the send buffer: ready without polling.
        assert!(conn.write_ready().unwrap());
        assert!(r.cable.borrow().h2d.attempts.is_empty());
    }

    #[test]
    fn zero_length_send_buffer_is_write_zero() {
        let mut r = rig(false);
        let id = r
            .host
            .session_mut()
            .connect(7, Buffers::new(vec![0; 1024], Vec::new()))
            .map_err(|e| e.0)
            .unwrap();
        let e = r.host.conn(id).write(b"x").unwrap_err();
        assert_eq!(e, ConnError::NoSendBuffer);
        assert_eq!(e.kind(), ErrorKind::WriteZero);
    }

    #[test]
    fn readable_events_are_not_queued_twice() {
        let mut r = rig(false);
        let id = connect(&mut r, 7);
        while r.host.next_event().is_some() {}
        let mut conn = r.host.conn(id);
        conn.write_all(&[7u8; 3000]).unwrap();
        conn.flush().unwrap();
        for _ in 0..50 {
            r.host.poll().unwrap();
        }
        let mut readable = 0;
        while let Some(e) = r.host.next_event() {
            readable += usize::from(e == Event::Readable(id));
        }
        assert_eq!(readable, 1);
        assert_eq!(r.host.session().connection(id).unwrap().recv_queue(), 3000);
    }
}
