//! [`Session`]: one usbmux link (one phone) in either role — the version/SETUP handshake, the v2
//! sequence counters, a fixed pool of [`Connection`]s and the dispatch between them.
//!
//! Read first: `shared/PROTOCOL.md`, the decisions table and §1.1–1.5.
//!
//! # Method taxonomy (after quinn-proto)
//! - (A) getters, `&self`: [`Session::phase`], [`Session::version`], [`Session::stats`],
//!   [`Session::connection`], ...
//! - (B) inputs `handle_*`: [`Session::handle_transfer`] (one USB transfer),
//!   [`Session::handle_packet`] (one whole mux packet), [`Session::handle_timeout`],
//!   [`Session::handle_disconnect`].
//! - (C) commands: [`Session::connect`] (host), [`Session::accept`] / [`Session::refuse`]
//!   (device), [`Session::send`], [`Session::recv`], [`Session::reset`], and their zero-copy
//!   twins.
//! - (D) outputs `poll_*`: [`Session::poll_transmit`], [`Session::poll_timeout`],
//!   [`Session::poll_event`].
//!
//! After every (B) or (C): call `poll_transmit` until it returns `Ok(None)` (sending each packet
//! as one bulk transfer, then a ZLP if [`Transmit::zlp`]), then `poll_timeout` to learn when to
//! call `handle_timeout`, then `poll_event` until `None`. Calling `handle_timeout` early is a
//! harmless no-op.
//!
//! # Connection lifetime
//! Every connection's buffers are lent by the application ([`Buffers`]) when it is opened
//! (`connect`, `accept`). A connection that ends — for any reason, announced by
//! [`Event::Reset`] or [`Event::Refused`] — keeps its slot so data that arrived before the end
//! can still be read; the application then calls [`Session::reset`], which frees the slot and
//! hands the buffers back for reuse. `reset` on a live connection sends an RST first.

use core::marker::PhantomData;

use crate::storage::Buffers;
use crate::tcp::{
    self, ConnConfig, ConnId, ConnStats, Connection, Outcome, ResetKind, ResetReason, State,
};
use crate::time::{Duration, Instant};
use crate::usb::{self, Mode, Reassembler, ReassemblyError};
use crate::wire::{
    self, mux as muxw, ControlRepr, ControlType, HeaderKind, MuxPacket, MuxRepr, MuxSeq, Protocol,
    TcpRepr, VersionRepr,
};

mod sealed {
    pub trait Sealed {}
}

/// Which end of the cable a [`Session`] plays. Sealed: [`Host`] or [`Device`].
///
/// The role is a type, not a value, so firmware built for one role links none of the other's
/// steps: every role-specific branch tests `R::IS_HOST`, a constant the compiler folds away.
pub trait Role: sealed::Sealed {
    /// True for [`Host`].
    const IS_HOST: bool;
}

/// The host role (a computer or gateway talking to a phone): sends VERSION, opens connections.
#[derive(Debug)]
pub enum Host {}
/// The device role (a phone or a simulator): answers VERSION, accepts or refuses connections.
#[derive(Debug)]
pub enum Device {}

impl sealed::Sealed for Host {}
impl sealed::Sealed for Device {}
impl Role for Host {
    const IS_HOST: bool = true;
}
impl Role for Device {
    const IS_HOST: bool = false;
}

/// Knobs of a [`Session`]. `Default` gives what usbmuxd and phones use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SessionConfig {
    /// Connection timers and ACK policy.
    pub conn: ConnConfig,
    /// Largest mux packet this side sends, all headers included (one bulk transfer each).
    /// Default 49 152 like usbmuxd; never above 65 535, the phone's limit.
    pub max_transfer: usize,
    /// wMaxPacketSize of the OUT (host) or IN (device) endpoint, for the ZLP rule.
    pub usb_packet_size: u16,
    /// Host: how long to wait for the VERSION reply before sending VERSION again.
    pub version_timeout: Duration,
    /// Host: VERSION attempts before `HandshakeFailed`.
    pub version_attempts: u8,
    /// Device: the protocol major version answered (1 or 2).
    pub device_version: u32,
    /// Device: how long an `Incoming` connection may wait for `accept`/`refuse` before it is
    /// refused with `NotAccepted`.
    pub accept_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            conn: ConnConfig::default(),
            max_transfer: usb::DEFAULT_MAX_TRANSFER,
            usb_packet_size: 512,
            version_timeout: Duration::from_secs(1),
            version_attempts: 3,
            device_version: 2,
            accept_timeout: Duration::from_secs(5),
        }
    }
}

/// One mux packet written by `poll_transmit`: send `buf[..len]` as one bulk transfer, then, if
/// `zlp`, a zero-length transfer (its length is a multiple of wMaxPacketSize).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Transmit {
    /// Bytes written at the start of the caller's buffer.
    pub len: usize,
    /// A zero-length packet must follow.
    pub zlp: bool,
}

/// `poll_transmit`'s buffer cannot hold the next packet; nothing changed. Retry with at least
/// `required` bytes (a buffer of `SessionConfig::max_transfer` bytes always suffices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InsufficientSize {
    /// Bytes the next packet needs.
    pub required: usize,
}

/// Where the session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Phase {
    /// Version handshake in progress (host: VERSION sent or due; device: waiting for it).
    Handshake,
    /// Connections may flow.
    Active,
    /// Handshake failed or the link was lost; the session does nothing more. Make a new one.
    Dead,
}

/// A CONTROL message from the device (host role): a phone's error/warning/info text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlMessage {
    /// Type byte: 3 error, 5 warning, 7 info.
    pub kind: ControlType,
    text: heapless::Vec<u8, CONTROL_TEXT_CAP>,
    truncated: bool,
}

/// Longest CONTROL text kept (longer texts are cut and marked truncated).
pub const CONTROL_TEXT_CAP: usize = 160;

impl ControlMessage {
    /// A message with `text` (cut to [`CONTROL_TEXT_CAP`]).
    pub fn new(kind: ControlType, text: &[u8]) -> Self {
        let n = text.len().min(CONTROL_TEXT_CAP);
        let mut v = heapless::Vec::new();
        let _ = v.extend_from_slice(&text[..n]);
        ControlMessage {
            kind,
            text: v,
            truncated: n < text.len(),
        }
    }

    /// The text as sent (not NUL terminated; usually ASCII).
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// True if the text was cut.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// What happened; returned by [`Session::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The version handshake completed with this protocol major (1: 8-byte headers, 2: 16-byte
    /// headers with sequence counters). Connections now flow.
    HandshakeDone {
        /// Negotiated major version.
        version: u32,
    },
    /// Host: the device never answered VERSION usably; every connection was closed. Drop the
    /// device (usbmuxd does the same).
    HandshakeFailed,
    /// Host: a CONTROL message from the device (log it).
    DeviceMessage(ControlMessage),
    /// Device: the host sent VERSION again (it restarted); every connection was closed without
    /// RST and the handshake answered anew.
    PeerRestarted,
    /// Device: the host wants `port`. Call `accept` (with buffers) or `refuse`.
    Incoming {
        /// Handle for `accept`/`refuse`.
        id: ConnId,
        /// The service port asked for.
        port: u16,
    },
    /// Host: the connection is established.
    Connected(ConnId),
    /// Host: the connection was never established (RST from the device, timeout, handshake
    /// failure, unplug). Call `reset(id)` to get the buffers back.
    Refused {
        /// The connection.
        id: ConnId,
        /// Why, with the device's text if it sent one.
        reason: ResetReason,
    },
    /// New bytes can be read.
    Readable(ConnId),
    /// Send space opened (or the connection just became writable).
    Writable(ConnId),
    /// An established connection ended. Data received before can still be read; then call
    /// `reset(id)` to free the slot and get the buffers back.
    Reset {
        /// The connection.
        id: ConnId,
        /// Why, with the peer's RST text if it sent one.
        reason: ResetReason,
    },
}

/// Errors of [`Session::connect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConnectError {
    /// Every slot of the pool is in use; release one (`reset`) or size the pool larger.
    PoolFull,
    /// The receive buffer is shorter than 256 bytes (one window unit): no byte could ever be
    /// admitted. Lend a larger one.
    BufferTooSmall,
    /// The session is dead (handshake failed or unplugged); make a new one.
    SessionDead,
}

/// Errors of [`Session::accept`] / [`Session::refuse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AcceptError {
    /// Not a pending incoming connection (already handled, expired, or a stale handle).
    InvalidHandle,
    /// The receive buffer is shorter than 256 bytes.
    BufferTooSmall,
}

/// Errors of [`Session::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SendError {
    /// No such connection (released, or a stale handle).
    InvalidHandle,
    /// The connection has ended; nothing more can be sent. See its reason.
    Closed,
}

/// Errors of [`Session::recv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RecvError {
    /// No such connection (released, or a stale handle).
    InvalidHandle,
    /// The connection has ended and every byte received before was read: end of stream.
    Finished,
}

/// A handle that names no live connection (released or never existed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InvalidHandle;

/// Errors of [`Session::send_control`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueFull;

macro_rules! impl_error {
    ($($t:ty => |$s:ident| $body:expr;)*) => {$(
        impl core::fmt::Display for $t {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                let $s = self;
                f.write_str($body)
            }
        }
        impl core::error::Error for $t {}
    )*};
}

impl_error! {
    ConnectError => |s| match s {
        ConnectError::PoolFull => "connection pool full",
        ConnectError::BufferTooSmall => "receive buffer smaller than 256 bytes",
        ConnectError::SessionDead => "session is dead",
    };
    AcceptError => |s| match s {
        AcceptError::InvalidHandle => "no such pending connection",
        AcceptError::BufferTooSmall => "receive buffer smaller than 256 bytes",
    };
    SendError => |s| match s {
        SendError::InvalidHandle => "no such connection",
        SendError::Closed => "connection closed",
    };
    RecvError => |s| match s {
        RecvError::InvalidHandle => "no such connection",
        RecvError::Finished => "connection closed and drained",
    };
    InvalidHandle => |_s| "no such connection";
    QueueFull => |_s| "control queue full";
    InsufficientSize => |_s| "transmit buffer too small for the next packet";
}

/// Counters of a session (all monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SessionStats {
    /// Mux packets handled.
    pub packets_in: u64,
    /// Mux packets written by `poll_transmit`.
    pub packets_out: u64,
    /// Packets dropped because the handshake had not completed (PROTOCOL.md §5.17).
    pub dropped_before_handshake: u64,
    /// Packets that failed to parse (malformed header, TCP header, version...).
    pub dropped_malformed: u64,
    /// Packets with an unknown protocol number or of a kind this role does not take.
    pub dropped_unexpected: u64,
    /// Transfers the reassembler rejected (bad length, strict-mode framing errors).
    pub reassembly_errors: u64,
    /// v2 packets whose tx_seq was not the previous + 1 (counted, never dropped).
    pub seq_anomalies: u64,
    /// RSTs sent for packets of unknown connections.
    pub anon_rsts_sent: u64,
    /// RSTs not sent because their queue was full.
    pub rsts_dropped: u64,
    /// Connections reset because the peer's seq was unexpected.
    pub resets_bad_seq: u64,
    /// Connections reset because the peer acked unsent data.
    pub resets_bad_ack: u64,
    /// Connections reset because the peer overran our window.
    pub resets_window_overflow: u64,
    /// CONTROL messages received (host) or sent (device).
    pub control_messages: u64,
    /// Session events lost because their queue was full.
    pub events_dropped: u64,
    /// VERSION requests answered (device) or sent (host).
    pub version_packets: u64,
    /// Incoming connections refused because the pool was full.
    pub pool_full: u64,
}

#[derive(Debug)]
struct PendingSyn {
    local_port: u16,
    remote_port: u16,
    seq: u32,
    window: u16,
    deadline: Instant,
    announced: bool,
}

// Slots live inline in a fixed array (no allocator to box with); a pending or free slot costs
// as much as a live one, which is the point of a fixed pool.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Slot<B> {
    Free,
    Pending(PendingSyn),
    Active(Connection<B>),
}

/// An RST with a reason text, not tied to a live connection (unknown connections, refusals).
#[derive(Debug)]
struct OutRst {
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    reason: ResetReason,
}

#[derive(Debug)]
struct OutControl {
    kind: ControlType,
    text: heapless::Vec<u8, CONTROL_TEXT_CAP>,
}

const RST_QUEUE: usize = 8;
const EVENT_QUEUE: usize = 8;
const CONTROL_QUEUE: usize = 4;

/// One usbmux link in role `R`, with a pool of `N` connections whose buffers are of type `B`,
/// and (host role) a reassembly buffer of `RX` bytes for IN packets that straddle transfers.
///
/// `RX` must be at least 65 536 for a host to accept every legal packet (smaller capacities
/// skip larger packets with an error); the device role needs none (`RX = 0`), since it takes
/// each OUT transfer as exactly one packet, like a phone. See the module docs for the calling
/// contract.
pub struct Session<R: Role, B, const N: usize, const RX: usize = 65536> {
    reasm: Reassembler<RX>,
    inner: Inner<R, B, N>,
}

struct Inner<R: Role, B, const N: usize> {
    cfg: SessionConfig,
    phase: Phase,
    version: Option<u32>,
    rx_kind: HeaderKind,
    tx_kind: HeaderKind,
    /// Host: VERSION due; device: a VERSION reply (with this major) due.
    version_due: Option<u32>,
    version_deadline: Option<Instant>,
    attempts: u8,
    setup_due: bool,
    tx_seq: u16,
    rx_seq: u16,
    rx_seq_seen: bool,
    new_header_len: Option<usize>,
    slots: [Slot<B>; N],
    gens: [u16; N],
    /// Every slot at this index or above is free: the per-call scans (transmit, timers, events,
    /// lookups) stop here instead of at `N`, so a large pool with few connections costs what
    /// its connections cost (a daemon's pool has 1024 slots; four full scans per turn of its
    /// loop were ≈ 5 % of its CPU in the VM). New connections take the lowest free slot, so the
    /// mark stays near the number of live connections.
    live: usize,
    next_port: u16,
    cursor: usize,
    event_cursor: usize,
    maybe_conn_events: bool,
    rsts: heapless::Deque<OutRst, RST_QUEUE>,
    controls: heapless::Deque<OutControl, CONTROL_QUEUE>,
    events: heapless::Deque<Event, EVENT_QUEUE>,
    stats: SessionStats,
    _role: PhantomData<R>,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>, const N: usize, const RX: usize> Session<Host, B, N, RX> {
    /// A host session. `first_port` is the first source port (pass a random one, so a restarted
    /// host does not collide with connections the phone still remembers; 0 is skipped). The
    /// first `poll_transmit` yields the VERSION request.
    pub fn new(cfg: SessionConfig, first_port: u16) -> Self {
        let mut inner = Inner::new(cfg);
        inner.version_due = Some(2);
        inner.next_port = first_port;
        Session {
            reasm: Reassembler::new(Mode::Host, muxw::V1_HEADER_LEN),
            inner,
        }
    }

    /// Opens a connection to the device's `port`, lending `bufs` to it. The SYN goes out with
    /// the next `poll_transmit` once the handshake is done; [`Event::Connected`] or
    /// [`Event::Refused`] follows. On error the buffers come back with it.
    pub fn connect(
        &mut self,
        port: u16,
        bufs: Buffers<B>,
    ) -> Result<ConnId, (ConnectError, Buffers<B>)> {
        let inner = &mut self.inner;
        if inner.phase == Phase::Dead {
            return Err((ConnectError::SessionDead, bufs));
        }
        if bufs.rx.as_ref().len() < tcp::MIN_RX_BUFFER {
            return Err((ConnectError::BufferTooSmall, bufs));
        }
        let Some(index) = inner.free_slot() else {
            return Err((ConnectError::PoolFull, bufs));
        };
        // Only a pool of 65 534+ slots can run out of ports before slots.
        let Some(sport) = inner.alloc_port() else {
            return Err((ConnectError::PoolFull, bufs));
        };
        inner.slots[index] = Slot::Active(Connection::new_active(sport, port, bufs));
        inner.occupied(index);
        let id = ConnId::new(index, inner.gens[index]);
        debug!("conn {}: connect {} -> {}", id, sport, port);
        Ok(id)
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>, const N: usize, const RX: usize> Session<Device, B, N, RX> {
    /// A device session; it waits for the host's VERSION.
    pub fn new(cfg: SessionConfig) -> Self {
        Session {
            reasm: Reassembler::new(Mode::Device, muxw::V1_HEADER_LEN),
            inner: Inner::new(cfg),
        }
    }

    /// Accepts an `Incoming` connection, lending it `bufs`; the SYN|ACK goes out next.
    pub fn accept(
        &mut self,
        id: ConnId,
        bufs: Buffers<B>,
    ) -> Result<(), (AcceptError, Buffers<B>)> {
        let inner = &mut self.inner;
        if !inner.valid(id) {
            return Err((AcceptError::InvalidHandle, bufs));
        }
        if bufs.rx.as_ref().len() < tcp::MIN_RX_BUFFER {
            return Err((AcceptError::BufferTooSmall, bufs));
        }
        let slot = &mut inner.slots[id.index()];
        let Slot::Pending(p) = slot else {
            return Err((AcceptError::InvalidHandle, bufs));
        };
        let conn = Connection::new_passive(p.local_port, p.remote_port, p.seq, p.window, bufs);
        *slot = Slot::Active(conn);
        debug!("conn {}: accepted", id);
        Ok(())
    }

    /// Refuses an `Incoming` connection with an RST carrying `text` (e.g. "no service").
    pub fn refuse(&mut self, id: ConnId, text: &[u8]) -> Result<(), InvalidHandle> {
        let inner = &mut self.inner;
        if !inner.valid(id) {
            return Err(InvalidHandle);
        }
        let Slot::Pending(p) = &inner.slots[id.index()] else {
            return Err(InvalidHandle);
        };
        let rst = OutRst {
            src_port: p.local_port,
            dst_port: p.remote_port,
            seq: 0,
            ack: p.seq.wrapping_add(1),
            reason: ResetReason::with_text(ResetKind::Local, text),
        };
        inner.queue_rst(rst);
        inner.free(id.index());
        Ok(())
    }

    /// Queues a CONTROL message to the host (type 3 error, 5 warning, 7 info).
    pub fn send_control(&mut self, kind: ControlType, text: &[u8]) -> Result<(), QueueFull> {
        self.inner.queue_control(kind, text)
    }
}

impl<R: Role, B: AsRef<[u8]> + AsMut<[u8]>, const N: usize, const RX: usize> Session<R, B, N, RX> {
    // ---- (A) getters ----

    /// Where the session is in its life.
    pub fn phase(&self) -> Phase {
        self.inner.phase
    }

    /// The negotiated protocol major, once the handshake is done.
    pub fn version(&self) -> Option<u32> {
        self.inner.version
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.cfg
    }

    /// Session counters.
    pub fn stats(&self) -> SessionStats {
        self.inner.stats
    }

    /// The reassembler's counters.
    pub fn reassembly_stats(&self) -> usb::ReassemblyStats {
        self.reasm.stats()
    }

    /// A live connection (for its state, ports, queues and stats).
    pub fn connection(&self, id: ConnId) -> Option<&Connection<B>> {
        self.inner.conn(id)
    }

    /// The connection's state, if the handle is live.
    pub fn state(&self, id: ConnId) -> Option<State> {
        self.inner.conn(id).map(Connection::state)
    }

    /// The connection's counters, if the handle is live.
    pub fn conn_stats(&self, id: ConnId) -> Option<ConnStats> {
        self.inner.conn(id).map(Connection::stats)
    }

    /// Live connections (including ended ones not yet released, and pending incoming ones).
    pub fn connection_count(&self) -> usize {
        self.inner.slots[..self.inner.live]
            .iter()
            .filter(|s| !matches!(s, Slot::Free))
            .count()
    }

    /// Handles of every live connection (for a driver's bookkeeping).
    pub fn connection_ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.inner.slots[..self.inner.live]
            .iter()
            .enumerate()
            .filter(|(_, s)| !matches!(s, Slot::Free))
            .map(|(i, _)| ConnId::new(i, self.inner.gens[i]))
    }

    // ---- (B) inputs ----

    /// Feeds one USB transfer from the peer (host: a bulk IN transfer, any size, split
    /// anywhere; device: a bulk OUT transfer, which must be exactly one mux packet — otherwise a
    /// CONTROL error text goes back, as a phone does).
    pub fn handle_transfer(&mut self, now: Instant, transfer: &[u8]) {
        self.handle_transfer_inner(now, transfer, None);
    }

    /// [`Session::handle_transfer`] for an application that can take a connection's bytes
    /// where it sends them on (a socket) instead of reading them out of the receive buffer:
    /// when data arrives for a connection whose receive buffer is empty, `sink(id, data)` is
    /// offered the payload first and returns how much it took (more than `data.len()` counts
    /// as `data.len()`); only the rest is queued in the receive buffer. Why: each byte is then
    /// copied once (packet → socket) instead of twice (packet → receive buffer → socket), the
    /// mirror of [`Session::poll_transmit_with`].
    ///
    /// Bytes already in the receive buffer always come out first (`sink` is not offered data
    /// until it is empty), so the two ways may be mixed; window and ACKs move exactly as if the
    /// application had read the bytes taken at once. The payload is validated (sequence,
    /// window) before it is offered.
    pub fn handle_transfer_with(
        &mut self,
        now: Instant,
        transfer: &[u8],
        sink: &mut dyn FnMut(ConnId, &[u8]) -> usize,
    ) {
        self.handle_transfer_inner(now, transfer, Some(sink));
    }

    fn handle_transfer_inner(&mut self, now: Instant, transfer: &[u8], mut sink: Option<Sink<'_>>) {
        let Session { reasm, inner } = self;
        reasm.push(transfer, |res| match res {
            Ok(packet) => inner.handle_packet(now, packet, sink.as_mut()),
            Err(e) => inner.on_reassembly_error(e),
        });
        if let Some(hl) = inner.new_header_len.take() {
            reasm.set_header_len(hl);
        }
    }

    /// Feeds one whole mux packet (header included), for transports that already delimit
    /// packets.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) {
        self.inner.handle_packet(now, packet, None);
        if let Some(hl) = self.inner.new_header_len.take() {
            self.reasm.set_header_len(hl);
        }
    }

    /// Fires expired timers (VERSION retry, connect timeout, delayed and idle re-ACKs, accept
    /// timeout). Early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }

    /// The link is gone (unplug, transport error): every connection ends with `Unplugged`
    /// (no RST can be sent) and the session becomes `Dead`.
    pub fn handle_disconnect(&mut self) {
        self.inner.close_all(ResetKind::Unplugged);
        self.inner.phase = Phase::Dead;
        self.reasm.reset();
    }

    // ---- (C) commands ----

    /// Queues bytes for the peer; returns how many fit (`Ok(0)`: the send buffer is full, wait
    /// for [`Event::Writable`]). Bytes queued before the handshake or connect completes go out
    /// once it does.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize, SendError> {
        let c = self.inner.conn_mut(id).ok_or(SendError::InvalidHandle)?;
        if c.state() == State::Closed {
            return Err(SendError::Closed);
        }
        Ok(c.send(data))
    }

    /// Zero-copy send: the free part of the send buffer (one contiguous run; may be shorter
    /// than the whole free space at the wrap point). Write into it, then [`Self::commit`].
    pub fn send_buffer(&mut self, id: ConnId) -> Result<&mut [u8], SendError> {
        let c = self.inner.conn_mut(id).ok_or(SendError::InvalidHandle)?;
        if c.state() == State::Closed {
            return Err(SendError::Closed);
        }
        Ok(c.send_buffer())
    }

    /// Zero-copy send: queues `n` bytes written into [`Self::send_buffer`].
    pub fn commit(&mut self, id: ConnId, n: usize) -> Result<usize, SendError> {
        let c = self.inner.conn_mut(id).ok_or(SendError::InvalidHandle)?;
        if c.state() == State::Closed {
            return Err(SendError::Closed);
        }
        Ok(c.commit(n))
    }

    /// Reads received bytes. `Ok(0)`: nothing yet (wait for [`Event::Readable`]);
    /// `Err(Finished)`: the connection ended and everything was read.
    pub fn recv(&mut self, id: ConnId, buf: &mut [u8]) -> Result<usize, RecvError> {
        let c = self.inner.conn_mut(id).ok_or(RecvError::InvalidHandle)?;
        let n = c.recv(buf);
        if n == 0 && c.state() == State::Closed && !buf.is_empty() {
            return Err(RecvError::Finished);
        }
        Ok(n)
    }

    /// Zero-copy read: the next contiguous run of received bytes (empty: nothing yet, or
    /// `Err(Finished)` once ended and drained). Then [`Self::consume`].
    pub fn peek(&self, id: ConnId) -> Result<&[u8], RecvError> {
        let c = self.inner.conn(id).ok_or(RecvError::InvalidHandle)?;
        let data = c.peek();
        if data.is_empty() && c.state() == State::Closed {
            return Err(RecvError::Finished);
        }
        Ok(data)
    }

    /// Zero-copy read: drops `n` bytes seen through [`Self::peek`].
    pub fn consume(&mut self, id: ConnId, n: usize) -> Result<usize, RecvError> {
        let c = self.inner.conn_mut(id).ok_or(RecvError::InvalidHandle)?;
        Ok(c.consume(n))
    }

    /// Ends a connection and frees its slot, handing its buffers back. A live connection is
    /// reset first (RST with `text` as its reason); an ended one is just released. Unread data
    /// is dropped. (A pending incoming connection is refused with `refuse`.)
    pub fn reset(&mut self, id: ConnId, text: &str) -> Result<Buffers<B>, InvalidHandle> {
        let inner = &mut self.inner;
        let c = inner.conn_mut(id).ok_or(InvalidHandle)?;
        if let Some(reason) = c.take_pending_rst() {
            // The connection closed itself (bad seq, overflow, ...) and its RST has not left
            // yet: it must still go, with its reason, even though the slot is freed now.
            let (src_port, dst_port, seq, ack) = c.rst_fields();
            inner.queue_rst(OutRst {
                src_port,
                dst_port,
                seq,
                ack,
                reason,
            });
        } else if c.state() != State::Closed {
            // The slot is freed below, so the RST leaves as a detached one.
            let reason = if text.is_empty() {
                ResetReason::new(ResetKind::Local)
            } else {
                ResetReason::with_text(ResetKind::Local, text.as_bytes())
            };
            let (src_port, dst_port, seq, ack) = c.rst_fields();
            inner.queue_rst(OutRst {
                src_port,
                dst_port,
                seq,
                ack,
                reason,
            });
        }
        let Slot::Active(c) = core::mem::replace(&mut inner.slots[id.index()], Slot::Free) else {
            return Err(InvalidHandle);
        };
        inner.gens[id.index()] = inner.gens[id.index()].wrapping_add(1);
        inner.vacated();
        Ok(c.into_buffers())
    }

    // ---- (D) outputs ----

    /// Writes the next mux packet into `buf` (at most `SessionConfig::max_transfer` bytes are
    /// used). `Ok(None)`: nothing to send now.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut [u8],
    ) -> Result<Option<Transmit>, InsufficientSize> {
        self.poll_transmit_inner(now, buf, None)
    }

    /// [`Session::poll_transmit`] for an application that keeps a connection's outgoing bytes
    /// where they come from (a socket) instead of in the send buffer: when a connection may send
    /// and its send buffer is empty, `source(id, dst)` is asked to write that connection's next
    /// bytes into `dst` — the payload area of the packet being built in `buf` — and to return
    /// how many it wrote (0: none now; more than `dst.len()` counts as `dst.len()`). Why: the
    /// bytes are then copied once (socket → packet) instead of twice (socket → send buffer →
    /// packet), which was the largest user-space cost of a daemon's host → device path.
    ///
    /// Bytes already in a connection's send buffer always go first (`source` is not asked
    /// until it is empty), so the two ways may be mixed. Window, packet size and the ZLP rule
    /// apply as for buffered bytes; `dst` is never larger than the window allows. A source that
    /// fills all of `dst` is taken to hold more: if the peer's window then closes, the
    /// connection counts a stall and probes for a lost window update as it would with bytes
    /// in its send buffer (one that returns less is taken to be drained).
    pub fn poll_transmit_with(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        source: &mut dyn FnMut(ConnId, &mut [u8]) -> usize,
    ) -> Result<Option<Transmit>, InsufficientSize> {
        self.poll_transmit_inner(now, buf, Some(source))
    }

    /// [`Session::poll_transmit_with`] for connection `id` alone: its next packet (data, an
    /// ACK, its RST), or `Ok(None)` when it has none or the handle is stale — never another
    /// connection's packet nor a session-level one. Why: an application that read a
    /// connection's next payload ahead of time, while the peer's window was closed, into the
    /// [`Session::payload_area`] of a transfer buffer it set aside must have exactly that
    /// connection's packet built around it (its `source` then just reports the bytes already
    /// in place); anything else built there would overwrite them.
    pub fn poll_transmit_for_with(
        &mut self,
        now: Instant,
        id: ConnId,
        buf: &mut [u8],
        source: &mut dyn FnMut(ConnId, &mut [u8]) -> usize,
    ) -> Result<Option<Transmit>, InsufficientSize> {
        let r = self.inner.poll_transmit_for(now, id, buf, source);
        if let Some(hl) = self.inner.new_header_len.take() {
            self.reasm.set_header_len(hl);
        }
        r
    }

    /// Where, in a buffer of `buf_len` bytes, [`Session::poll_transmit_with`] puts the payload
    /// of a data packet when the peer's window allows a whole one: behind the mux and TCP
    /// headers, as long as the packet size allows (one byte shorter where the packet would
    /// otherwise need a ZLP). `None` before the handshake is done (the header size is not
    /// known yet) or when the buffer cannot hold the headers. A source given a `dst` in this
    /// buffer gets a prefix of this range, starting at its start.
    pub fn payload_area(&self, buf_len: usize) -> Option<core::ops::Range<usize>> {
        self.inner.payload_area(buf_len)
    }

    fn poll_transmit_inner(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        source: Option<Source<'_>>,
    ) -> Result<Option<Transmit>, InsufficientSize> {
        let r = self.inner.poll_transmit(now, buf, source);
        if let Some(hl) = self.inner.new_header_len.take() {
            self.reasm.set_header_len(hl);
        }
        r
    }

    /// When `handle_timeout` should be called next (`None`: no timer running).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    /// The next event, or `None`.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.inner.poll_event()
    }

    /// The slot index at and above which every slot is free (tests of the scans' bound).
    #[cfg(test)]
    pub(crate) fn live_mark(&self) -> usize {
        self.inner.live
    }
}

/// The payload source of [`Session::poll_transmit_with`]: connection, destination → bytes written.
type Source<'a> = &'a mut dyn FnMut(ConnId, &mut [u8]) -> usize;

/// The payload sink of [`Session::handle_transfer_with`]: connection, data → bytes taken.
type Sink<'a> = &'a mut dyn FnMut(ConnId, &[u8]) -> usize;

impl<R: Role, B: AsRef<[u8]> + AsMut<[u8]>, const N: usize> Inner<R, B, N> {
    fn new(cfg: SessionConfig) -> Self {
        // ConnId stores the slot index in a u16.
        const { assert!(N <= u16::MAX as usize, "connection pool larger than 65535") };
        let mut cfg = cfg;
        cfg.max_transfer = cfg.max_transfer.clamp(64, muxw::MAX_PACKET_LEN);
        Inner {
            cfg,
            phase: Phase::Handshake,
            version: None,
            rx_kind: HeaderKind::V1,
            tx_kind: HeaderKind::V1,
            version_due: None,
            version_deadline: None,
            attempts: 0,
            setup_due: false,
            tx_seq: 0,
            rx_seq: 0xFFFF,
            rx_seq_seen: false,
            new_header_len: None,
            slots: core::array::from_fn(|_| Slot::Free),
            gens: [0; N],
            live: 0,
            next_port: 1,
            cursor: 0,
            event_cursor: 0,
            maybe_conn_events: false,
            rsts: heapless::Deque::new(),
            controls: heapless::Deque::new(),
            events: heapless::Deque::new(),
            stats: SessionStats::default(),
            _role: PhantomData,
        }
    }

    fn valid(&self, id: ConnId) -> bool {
        id.index() < N
            && self.gens[id.index()] == id.generation()
            && !matches!(self.slots[id.index()], Slot::Free)
    }

    fn conn(&self, id: ConnId) -> Option<&Connection<B>> {
        if !self.valid(id) {
            return None;
        }
        match &self.slots[id.index()] {
            Slot::Active(c) => Some(c),
            _ => None,
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Connection<B>> {
        if !self.valid(id) {
            return None;
        }
        self.maybe_conn_events = true;
        match &mut self.slots[id.index()] {
            Slot::Active(c) => Some(c),
            _ => None,
        }
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| matches!(s, Slot::Free))
    }

    fn free(&mut self, index: usize) {
        self.slots[index] = Slot::Free;
        self.gens[index] = self.gens[index].wrapping_add(1);
        self.vacated();
    }

    /// Slot `index` has just been taken.
    fn occupied(&mut self, index: usize) {
        self.live = self.live.max(index + 1);
        self.check_live();
    }

    /// A slot has just been freed: lower the mark past the free slots at the top.
    fn vacated(&mut self) {
        while self.live > 0 && matches!(self.slots[self.live - 1], Slot::Free) {
            self.live -= 1;
        }
        self.check_live();
    }

    /// The mark's invariant, checked in debug builds (tests and fuzzing).
    fn check_live(&self) {
        debug_assert!(
            self.slots[self.live..]
                .iter()
                .all(|s| matches!(s, Slot::Free)),
            "a slot at or above the live mark is in use"
        );
    }

    /// Host: the next source port from `next_port`, skipping 0 and ports in use
    /// by this session (bounded: at most N are in use, so N + 2 candidates suffice).
    fn alloc_port(&mut self) -> Option<u16> {
        for _ in 0..N + 2 {
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1);
            if p != 0
                && !self.slots[..self.live]
                    .iter()
                    .any(|s| matches!(s, Slot::Active(c) if c.local_port() == p))
            {
                return Some(p);
            }
        }
        None
    }

    fn find(&self, local: u16, remote: u16) -> Option<usize> {
        self.slots[..self.live].iter().position(|s| match s {
            Slot::Active(c) => c.matches(local, remote),
            Slot::Pending(p) => p.local_port == local && p.remote_port == remote,
            Slot::Free => false,
        })
    }

    fn push_event(&mut self, e: Event) {
        if self.events.is_full() {
            // Keep the newest: the oldest (usually a log message) matters least.
            let _ = self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        let _ = self.events.push_back(e);
    }

    fn queue_rst(&mut self, rst: OutRst) {
        if self.rsts.push_back(rst).is_err() {
            self.stats.rsts_dropped += 1;
        }
    }

    fn queue_control(&mut self, kind: ControlType, text: &[u8]) -> Result<(), QueueFull> {
        let n = text.len().min(CONTROL_TEXT_CAP);
        let mut v = heapless::Vec::new();
        let _ = v.extend_from_slice(&text[..n]);
        self.controls
            .push_back(OutControl { kind, text: v })
            .map_err(|_| QueueFull)
    }

    fn close_all(&mut self, kind: ResetKind) {
        // `free` may lower the mark while we go; the slots above it are free anyway.
        for i in 0..self.live {
            match &mut self.slots[i] {
                Slot::Active(c) => c.abort(ResetReason::new(kind), false),
                Slot::Pending(_) => self.free(i),
                Slot::Free => {}
            }
        }
        self.maybe_conn_events = true;
        self.rsts.clear();
        self.controls.clear();
    }

    fn on_reassembly_error(&mut self, e: ReassemblyError) {
        self.stats.reassembly_errors += 1;
        warn!("reassembly: {}", e);
        if !R::IS_HOST {
            // What a phone does with a badly framed transfer: say so and drop it.
            let mut text: heapless::String<CONTROL_TEXT_CAP> = heapless::String::new();
            let _ = core::fmt::Write::write_fmt(&mut text, format_args!("{}", e));
            if self
                .queue_control(ControlType::Error, text.as_bytes())
                .is_ok()
            {
                self.stats.control_messages += 1;
            }
        }
    }

    fn handle_packet(&mut self, now: Instant, bytes: &[u8], sink: Option<&mut Sink<'_>>) {
        if self.phase == Phase::Dead {
            return;
        }
        self.stats.packets_in += 1;
        // The protocol field sits at the same place in both header forms; VERSION packets may
        // come in either form (a restarted host, a defensive read of a reply), so detect it.
        let protocol = match bytes.get(0..4) {
            Some(b) => Protocol::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            None => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        let kind = if protocol == Protocol::Version {
            muxw::detect_kind(bytes)
        } else {
            self.rx_kind
        };
        let Ok(packet) = MuxPacket::new_checked(bytes, kind) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let Ok(repr) = MuxRepr::parse(&packet) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        if let Some(MuxSeq { tx, .. }) = repr.seq {
            if self.rx_seq_seen && tx != self.rx_seq.wrapping_add(1) {
                self.stats.seq_anomalies += 1;
            }
            self.rx_seq = tx;
            self.rx_seq_seen = true;
        }
        let payload = packet.payload();
        match protocol {
            Protocol::Version => self.on_version(payload),
            Protocol::Control if R::IS_HOST => self.on_control(payload),
            Protocol::Setup if !R::IS_HOST => {
                trace!("SETUP received");
            }
            Protocol::Tcp => {
                if self.phase != Phase::Active {
                    self.stats.dropped_before_handshake += 1;
                    return;
                }
                let Ok(tp) = wire::TcpPacket::new_checked(payload) else {
                    self.stats.dropped_malformed += 1;
                    return;
                };
                let Ok(seg) = TcpRepr::parse(&tp) else {
                    self.stats.dropped_malformed += 1;
                    return;
                };
                if tp.header_len() != wire::tcp::HEADER_LEN {
                    // Nobody sends TCP options over usbmux, and with no checksum a different
                    // data offset means a corrupted header whose payload would be misread:
                    // end that connection rather than accept shifted bytes.
                    self.stats.dropped_malformed += 1;
                    self.abort_by_ports(seg.dst_port, seg.src_port, ResetKind::Malformed);
                    return;
                }
                self.on_tcp(now, &seg, sink);
            }
            _ => {
                self.stats.dropped_unexpected += 1;
            }
        }
    }

    fn on_version(&mut self, payload: &[u8]) {
        let Ok(v) = wire::VersionPacket::new_checked(payload).and_then(|p| VersionRepr::parse(&p))
        else {
            self.stats.dropped_malformed += 1;
            return;
        };
        self.stats.version_packets += 1;
        if R::IS_HOST {
            if self.phase != Phase::Handshake || self.version_deadline.is_none() {
                warn!(
                    "VERSION {}.{} ignored: not waiting for one",
                    v.major, v.minor
                );
                self.stats.dropped_unexpected += 1;
                return;
            }
            self.version_deadline = None;
            match v.major {
                1 => {
                    self.activate(1);
                }
                2 => {
                    self.rx_kind = HeaderKind::V2;
                    self.tx_kind = HeaderKind::V2;
                    self.new_header_len = Some(muxw::V2_HEADER_LEN);
                    self.setup_due = true;
                    self.activate(2);
                }
                other => {
                    warn!("device answered VERSION {}.{}: unsupported", other, v.minor);
                    self.fail();
                }
            }
        } else {
            if self.phase == Phase::Active {
                // A restarted host: it remembers none of our connections.
                info!("VERSION while active: host restarted, closing all connections");
                self.close_all(ResetKind::PeerRestarted);
                self.push_event(Event::PeerRestarted);
            }
            let answer = if v.major >= 2 && self.cfg.device_version >= 2 {
                2
            } else {
                1
            };
            self.version_due = Some(answer);
            self.tx_kind = HeaderKind::V1;
            self.tx_seq = 0;
            self.rx_seq = 0xFFFF;
            self.rx_seq_seen = false;
            let (kind, hl) = if answer == 2 {
                (HeaderKind::V2, muxw::V2_HEADER_LEN)
            } else {
                (HeaderKind::V1, muxw::V1_HEADER_LEN)
            };
            self.rx_kind = kind;
            self.new_header_len = Some(hl);
            self.activate(answer);
        }
    }

    fn activate(&mut self, version: u32) {
        debug!("handshake done: version {}", version);
        self.phase = Phase::Active;
        self.version = Some(version);
        self.push_event(Event::HandshakeDone { version });
    }

    fn fail(&mut self) {
        self.phase = Phase::Dead;
        self.version_due = None;
        self.version_deadline = None;
        self.close_all(ResetKind::HandshakeFailed);
        self.push_event(Event::HandshakeFailed);
    }

    fn on_control(&mut self, payload: &[u8]) {
        let Ok(c) = wire::ControlPacket::new_checked(payload).and_then(|p| ControlRepr::parse(&p))
        else {
            self.stats.dropped_malformed += 1;
            return;
        };
        self.stats.control_messages += 1;
        self.push_event(Event::DeviceMessage(ControlMessage::new(c.kind, c.text)));
    }

    fn on_tcp(&mut self, now: Instant, seg: &TcpRepr<'_>, sink: Option<&mut Sink<'_>>) {
        let local = seg.dst_port;
        let remote = seg.src_port;
        let flags = seg.flags;
        match self.find(local, remote) {
            Some(i) => match &mut self.slots[i] {
                Slot::Active(c) => {
                    let id = ConnId::new(i, self.gens[i]);
                    let mut deliver = sink.map(|s| move |data: &[u8]| s(id, data));
                    let deliver = deliver.as_mut().map(|d| d as tcp::Take<'_>);
                    if c.process(now, seg, &self.cfg.conn, deliver) == Outcome::Closed {
                        match c.reason().map(|r| r.kind) {
                            Some(ResetKind::UnexpectedSeq) => self.stats.resets_bad_seq += 1,
                            Some(ResetKind::AckBeyondSent) => self.stats.resets_bad_ack += 1,
                            Some(ResetKind::WindowOverflow) => {
                                self.stats.resets_window_overflow += 1
                            }
                            _ => {}
                        }
                    }
                    self.maybe_conn_events = true;
                }
                Slot::Pending(_) => {
                    // Before accept the host may only repeat its SYN; anything else is dropped.
                    self.stats.dropped_unexpected += 1;
                }
                Slot::Free => {}
            },
            None => {
                if !R::IS_HOST
                    && flags.contains(wire::TcpFlags::SYN)
                    && !flags.contains(wire::TcpFlags::ACK)
                {
                    self.on_syn(now, seg);
                } else if !flags.contains(wire::TcpFlags::RST) {
                    // PROTOCOL.md §1.5: answer packets of unknown connections with an RST.
                    self.stats.anon_rsts_sent += 1;
                    self.queue_rst(OutRst {
                        src_port: local,
                        dst_port: remote,
                        seq: 0,
                        ack: seg.seq,
                        reason: ResetReason::with_text(ResetKind::Local, b"no such connection"),
                    });
                }
            }
        }
    }

    /// Ends the live connection with these ports (if any), sending an RST with the reason.
    fn abort_by_ports(&mut self, local: u16, remote: u16, kind: ResetKind) {
        if let Some(i) = self.find(local, remote) {
            if let Slot::Active(c) = &mut self.slots[i] {
                c.abort(ResetReason::new(kind), true);
                self.maybe_conn_events = true;
            }
        }
    }

    fn on_syn(&mut self, now: Instant, seg: &TcpRepr<'_>) {
        let Some(index) = self.free_slot() else {
            self.stats.pool_full += 1;
            self.queue_rst(OutRst {
                src_port: seg.dst_port,
                dst_port: seg.src_port,
                seq: 0,
                ack: seg.seq.wrapping_add(1),
                reason: ResetReason::new(ResetKind::PoolFull),
            });
            return;
        };
        self.slots[index] = Slot::Pending(PendingSyn {
            local_port: seg.dst_port,
            remote_port: seg.src_port,
            seq: seg.seq,
            window: seg.window,
            deadline: now + self.cfg.accept_timeout,
            announced: false,
        });
        self.occupied(index);
        self.maybe_conn_events = true;
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.version_deadline {
            if now >= d {
                self.version_deadline = None;
                if self.attempts >= self.cfg.version_attempts {
                    warn!("no VERSION reply after {} attempts", self.attempts);
                    self.fail();
                } else {
                    self.version_due = Some(2);
                }
            }
        }
        for i in 0..self.live {
            match &mut self.slots[i] {
                Slot::Active(c) => {
                    c.handle_timeout(now, &self.cfg.conn);
                }
                Slot::Pending(p) if now >= p.deadline => {
                    let rst = OutRst {
                        src_port: p.local_port,
                        dst_port: p.remote_port,
                        seq: 0,
                        ack: p.seq.wrapping_add(1),
                        reason: ResetReason::new(ResetKind::NotAccepted),
                    };
                    self.queue_rst(rst);
                    self.free(i);
                }
                _ => {}
            }
        }
        self.maybe_conn_events = true;
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.version_deadline;
        let mut take = |d: Instant| t = Some(t.map_or(d, |x: Instant| x.min(d)));
        for s in &self.slots[..self.live] {
            match s {
                Slot::Active(c) => {
                    if let Some(d) = c.poll_at() {
                        take(d);
                    }
                }
                Slot::Pending(p) => take(p.deadline),
                Slot::Free => {}
            }
        }
        t
    }

    /// Writes a mux header for `protocol` with `payload_len` bytes after it into `buf`
    /// (which must hold it) and advances tx_seq; returns the packet's total length.
    fn emit_header(&mut self, buf: &mut [u8], protocol: Protocol, payload_len: usize) -> usize {
        let seq = match self.tx_kind {
            HeaderKind::V1 => None,
            HeaderKind::V2 => {
                let s = MuxSeq {
                    tx: self.tx_seq,
                    rx: self.rx_seq,
                };
                self.tx_seq = self.tx_seq.wrapping_add(1);
                Some(s)
            }
        };
        let repr = MuxRepr {
            protocol,
            payload_len,
            seq,
        };
        let len = repr.buffer_len();
        let mut p = MuxPacket::new_unchecked(&mut buf[..len], repr.kind());
        repr.emit(&mut p);
        self.stats.packets_out += 1;
        len
    }

    fn transmit(&self, len: usize) -> Option<Transmit> {
        Some(Transmit {
            len,
            zlp: usb::needs_zlp(len, self.cfg.usb_packet_size),
        })
    }

    fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        mut source: Option<Source<'_>>,
    ) -> Result<Option<Transmit>, InsufficientSize> {
        if self.phase == Phase::Dead {
            return Ok(None);
        }
        let limit = buf.len().min(self.cfg.max_transfer);
        let buf = &mut buf[..limit];

        // Handshake packets first.
        if let Some(major) = self.version_due {
            let need = muxw::V1_HEADER_LEN + wire::version::HEADER_LEN;
            if buf.len() < need {
                return Err(InsufficientSize { required: need });
            }
            // VERSION (request or reply) always travels in the 8-byte header.
            let saved = self.tx_kind;
            self.tx_kind = HeaderKind::V1;
            self.emit_header(buf, Protocol::Version, wire::version::HEADER_LEN);
            let hl = muxw::V1_HEADER_LEN;
            let v = VersionRepr { major, minor: 0 };
            v.emit(&mut wire::VersionPacket::new_unchecked(&mut buf[hl..need]));
            self.version_due = None;
            self.stats.version_packets += u64::from(R::IS_HOST);
            if R::IS_HOST {
                self.tx_kind = saved;
                self.attempts = self.attempts.saturating_add(1);
                self.version_deadline = Some(now + self.cfg.version_timeout);
            } else if major == 2 {
                self.tx_kind = HeaderKind::V2;
            }
            return Ok(self.transmit(need));
        }
        if self.setup_due {
            let need = muxw::V2_HEADER_LEN + 1;
            if buf.len() < need {
                return Err(InsufficientSize { required: need });
            }
            self.tx_seq = 0;
            self.rx_seq = if self.rx_seq_seen {
                self.rx_seq
            } else {
                0xFFFF
            };
            self.emit_header(buf, Protocol::Setup, 1);
            let hl = muxw::V2_HEADER_LEN;
            buf[hl] = muxw::SETUP_PAYLOAD;
            self.setup_due = false;
            return Ok(self.transmit(need));
        }
        if self.phase != Phase::Active {
            return Ok(None);
        }
        let hl = self.tx_kind.header_len();

        if let Some(c) = self.controls.front() {
            let need = hl + 1 + c.text.len();
            if buf.len() < need {
                return Err(InsufficientSize { required: need });
            }
            let Some(c) = self.controls.pop_front() else {
                return Ok(None);
            };
            self.emit_header(buf, Protocol::Control, 1 + c.text.len());
            let h = hl;
            let repr = ControlRepr {
                kind: c.kind,
                text: &c.text,
            };
            repr.emit(&mut wire::ControlPacket::new_unchecked(&mut buf[h..need]));
            return Ok(self.transmit(need));
        }

        if !self.rsts.is_empty() {
            if buf.len() < hl + wire::tcp::HEADER_LEN {
                return Err(InsufficientSize {
                    required: hl + wire::tcp::HEADER_LEN,
                });
            }
            let Some(r) = self.rsts.pop_front() else {
                return Ok(None);
            };
            // The reason text is best effort: cut to what the buffer holds.
            let room = buf.len() - hl - wire::tcp::HEADER_LEN;
            let text = r.reason.text();
            let seg = TcpRepr {
                src_port: r.src_port,
                dst_port: r.dst_port,
                seq: r.seq,
                ack: r.ack,
                flags: wire::TcpFlags::RST,
                window: 0,
                payload: &text[..text.len().min(room)],
            };
            let total = hl + seg.buffer_len();
            seg.emit(&mut wire::TcpPacket::new_unchecked(&mut buf[hl..total]));
            self.emit_header(buf, Protocol::Tcp, total - hl);
            return Ok(self.transmit(total));
        }

        // Connections, round robin so one busy connection cannot starve the others.
        let live = self.live;
        for k in 0..live {
            let i = (self.cursor + k) % live;
            if let Some(t) = self.dispatch_slot(now, i, buf, source.as_mut())? {
                self.cursor = (i + 1) % live;
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// The next packet of the connection in slot `i` (if it is active and has one), built in
    /// `buf` behind the mux header: `poll_transmit`'s step per connection.
    fn dispatch_slot(
        &mut self,
        now: Instant,
        i: usize,
        buf: &mut [u8],
        source: Option<&mut Source<'_>>,
    ) -> Result<Option<Transmit>, InsufficientSize> {
        let hl = self.tx_kind.header_len();
        let max_payload = self
            .cfg
            .max_transfer
            .saturating_sub(hl + wire::tcp::HEADER_LEN);
        let cfg = self.cfg.conn;
        let Some(Slot::Active(c)) = self.slots.get_mut(i) else {
            return Ok(None);
        };
        let Some(out) = buf.get_mut(hl..) else {
            if c.wants_transmit(max_payload) {
                return Err(InsufficientSize {
                    required: hl + wire::tcp::HEADER_LEN,
                });
            }
            return Ok(None);
        };
        let id = ConnId::new(i, self.gens[i]);
        let mut for_conn = source.map(|s| move |dst: &mut [u8]| s(id, dst));
        match c.dispatch(
            now,
            out,
            max_payload,
            (hl, usize::from(self.cfg.usb_packet_size)),
            &cfg,
            for_conn.as_mut().map(|f| f as tcp::Fill<'_>),
        ) {
            Ok(Some(n)) => {
                self.maybe_conn_events = true;
                let total = self.emit_header(buf, Protocol::Tcp, n);
                Ok(self.transmit(total))
            }
            Ok(None) => Ok(None),
            Err(required) => Err(InsufficientSize {
                required: hl + required,
            }),
        }
    }

    /// `Session::poll_transmit_for_with`: connection `id`'s next packet only.
    fn poll_transmit_for(
        &mut self,
        now: Instant,
        id: ConnId,
        buf: &mut [u8],
        source: Source<'_>,
    ) -> Result<Option<Transmit>, InsufficientSize> {
        if self.phase != Phase::Active || !self.valid(id) {
            return Ok(None);
        }
        let limit = buf.len().min(self.cfg.max_transfer);
        let mut source = source;
        self.dispatch_slot(now, id.index(), &mut buf[..limit], Some(&mut source))
    }

    /// `Session::payload_area`.
    fn payload_area(&self, buf_len: usize) -> Option<core::ops::Range<usize>> {
        if self.phase != Phase::Active {
            return None;
        }
        let start = self.tx_kind.header_len() + wire::tcp::HEADER_LEN;
        let end = buf_len.min(self.cfg.max_transfer);
        let mut len = end.checked_sub(start)?;
        // The same cut as `dispatch`'s for more data to follow: no packet that needs a ZLP.
        let mps = usize::from(self.cfg.usb_packet_size);
        if len > 1 && mps > 0 && (start + len).is_multiple_of(mps) {
            len -= 1;
        }
        Some(start..start + len)
    }

    fn poll_event(&mut self) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if !self.maybe_conn_events || N == 0 {
            return None;
        }
        let live = self.live;
        for k in 0..live {
            let i = (self.event_cursor + k) % live;
            let id = ConnId::new(i, self.gens[i]);
            let ev = match &mut self.slots[i] {
                Slot::Pending(p) if !p.announced => {
                    p.announced = true;
                    Some(Event::Incoming {
                        id,
                        port: p.local_port,
                    })
                }
                Slot::Active(c) if c.events != 0 => {
                    let e = c.events;
                    if e & tcp::ev::CONNECTED != 0 {
                        c.events &= !tcp::ev::CONNECTED;
                        Some(Event::Connected(id))
                    } else if e & tcp::ev::READABLE != 0 {
                        c.events &= !tcp::ev::READABLE;
                        Some(Event::Readable(id))
                    } else if e & tcp::ev::WRITABLE != 0 {
                        c.events &= !tcp::ev::WRITABLE;
                        if c.state() == State::Closed {
                            continue;
                        }
                        Some(Event::Writable(id))
                    } else {
                        c.events = 0;
                        let reason = c
                            .reason()
                            .cloned()
                            .unwrap_or_else(|| ResetReason::new(ResetKind::Local));
                        if c.was_connected() {
                            Some(Event::Reset { id, reason })
                        } else {
                            Some(Event::Refused { id, reason })
                        }
                    }
                }
                _ => None,
            };
            if let Some(ev) = ev {
                self.event_cursor = i;
                return Some(ev);
            }
        }
        self.maybe_conn_events = false;
        None
    }
}
