//! The pseudo-TCP connection state machine, one [`Connection`] per mux connection, either role.
//!
//! Read first: `shared/PROTOCOL.md` §1.5 and the decisions table. usbmux runs a stripped-down TCP
//! over a reliable, ordered link (USB bulk): there is no retransmission, no checksum, no options
//! and no FIN handshake. What remains is connection setup, flow control and resets:
//!
//! - **Setup.** The host is always the active opener: SYN (seq 0) → SYN|ACK (seq 0, ack 1) → ACK.
//!   Both sides use ISN 0 (Debian's usbmuxd assumes the phone's ISN is 0); we still take
//!   ack = peer seq + 1.
//! - **Windows.** The 16-bit window field counts 256-byte units. We advertise only free receive
//!   space and never move our right edge (ack + window) backwards: because the ack has 1-byte
//!   granularity and the window 256-byte granularity, an old edge that is not 256-aligned with
//!   the current receive point is expressed with an ack up to 255 bytes behind what was received
//!   (harmless: nothing retransmits, the ack only serves flow control — usbmuxd itself acks only
//!   delivered bytes).
//! - **Validation.** A packet whose seq is not the next expected, whose ack is beyond what we sent,
//!   or whose data goes past our advertised edge resets this connection with a reason; others
//!   are not touched.
//! - **ACK policy.** A window update goes out at once when the application has drained enough to
//!   matter (half the buffer, or enough for a full segment while the peer may be blocked);
//!   otherwise after a short delay. Because nothing retransmits, an update that unblocks a peer
//!   is re-sent after an idle interval (with back-off, a bounded number of times) until the peer
//!   sends again.
//!
//! Method taxonomy (see `mux::Session`, which owns the connections and is the public API):
//! `process` consumes one received segment, `dispatch` produces at most one, `poll_at` says when
//! a timer needs `handle_timeout`.

use core::fmt::Write as _;

use crate::storage::{Buffers, RingBuffer};
use crate::time::{Duration, Instant};
use crate::wire::tcp::{self as tcpw, Flags};
use crate::wire::TcpRepr;

/// Longest reason text kept for a reset (peer RST payloads are cut here, marked `truncated`).
pub const REASON_CAP: usize = 96;

/// The smallest receive buffer a connection accepts: the window field counts 256-byte units, so
/// a smaller buffer could never admit a byte.
pub const MIN_RX_BUFFER: usize = 256;

/// A handle to a connection in a `Session`'s pool.
///
/// It carries a generation, so a handle kept after its connection was released is detected
/// (`InvalidHandle`) instead of silently addressing a newer connection in the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConnId {
    index: u16,
    generation: u16,
}

impl ConnId {
    pub(crate) const fn new(index: usize, generation: u16) -> Self {
        ConnId {
            index: index as u16,
            generation,
        }
    }

    /// Position in the pool (stable while the connection lives; reused afterwards).
    pub const fn index(self) -> usize {
        self.index as usize
    }

    /// How many times the slot had been reused when this connection took it.
    pub const fn generation(self) -> u16 {
        self.generation
    }
}

impl core::fmt::Display for ConnId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "#{}.{}", self.index, self.generation)
    }
}

/// Connection states, named as in RFC 793 where they exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum State {
    /// Host: SYN queued or sent, waiting for SYN|ACK.
    SynSent,
    /// Data flows both ways.
    Established,
    /// Ended (reset by either side, refused, timed out or unplugged). Received data can still
    /// be read; the application releases the slot with `Session::reset`.
    Closed,
}

impl core::fmt::Display for State {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            State::SynSent => "SYN-SENT",
            State::Established => "ESTABLISHED",
            State::Closed => "CLOSED",
        })
    }
}

/// Why a connection ended. Each variant says who ended it; the text (see [`ResetReason`]) has
/// the details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ResetKind {
    /// The peer sent RST on an established connection; text = its payload.
    PeerReset,
    /// The peer answered our SYN with RST (nothing listens on that port); text = its payload.
    Refused,
    /// The peer sent FIN (end of stream); usbmux has no half-close, so we answer RST.
    PeerFin,
    /// No SYN|ACK within the connect timeout.
    ConnectTimeout,
    /// The peer sent data beyond the right edge we advertised.
    WindowOverflow,
    /// The peer's seq was not the next one expected (lost, duplicated or reordered packet).
    UnexpectedSeq,
    /// The peer acknowledged data we never sent.
    AckBeyondSent,
    /// Flags that make no sense in this state (e.g. SYN on an established connection).
    BadFlags,
    /// This side's application reset or refused the connection; text = its reason.
    Local,
    /// The device had no free connection slot.
    PoolFull,
    /// Device role: the host sent VERSION again (it restarted), which ends every connection.
    PeerRestarted,
    /// The link went away (unplug, transport error); no RST could be sent.
    Unplugged,
    /// The version handshake never completed.
    HandshakeFailed,
    /// Device role: the application did not accept an incoming connection in time.
    NotAccepted,
    /// A packet of this connection had a corrupted header (e.g. a data offset other than 5
    /// words), so its payload could not be trusted.
    Malformed,
}

impl ResetKind {
    /// The default text for this cause, sent as our RST payload where we send one.
    pub const fn description(self) -> &'static str {
        match self {
            ResetKind::PeerReset => "connection reset by peer",
            ResetKind::Refused => "connection refused",
            ResetKind::PeerFin => "peer closed the connection (FIN)",
            ResetKind::ConnectTimeout => "connect timed out",
            ResetKind::WindowOverflow => "window overflow",
            ResetKind::UnexpectedSeq => "unexpected sequence number",
            ResetKind::AckBeyondSent => "ack beyond data sent",
            ResetKind::BadFlags => "unexpected TCP flags",
            ResetKind::Local => "reset by application",
            ResetKind::PoolFull => "connection pool full",
            ResetKind::PeerRestarted => "peer restarted the session",
            ResetKind::Unplugged => "link lost",
            ResetKind::HandshakeFailed => "version handshake failed",
            ResetKind::NotAccepted => "connection not accepted in time",
            ResetKind::Malformed => "malformed TCP header",
        }
    }
}

/// Why a connection ended, with a human-readable text both ends can see: for resets we send, the
/// text is our RST payload; for resets we receive, the peer's payload (e.g. a phone's reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResetReason {
    /// The cause.
    pub kind: ResetKind,
    text: heapless::Vec<u8, REASON_CAP>,
    truncated: bool,
}

impl ResetReason {
    /// A reason with the cause's default text.
    pub fn new(kind: ResetKind) -> Self {
        Self::with_text(kind, kind.description().as_bytes())
    }

    /// A reason with a given text (cut to [`REASON_CAP`] bytes; see [`Self::truncated`]).
    pub fn with_text(kind: ResetKind, text: &[u8]) -> Self {
        let n = text.len().min(REASON_CAP);
        let mut v = heapless::Vec::new();
        // Cannot fail: n <= capacity.
        let _ = v.extend_from_slice(&text[..n]);
        ResetReason {
            kind,
            text: v,
            truncated: n < text.len(),
        }
    }

    /// A reason whose text is formatted (cut to [`REASON_CAP`]).
    pub(crate) fn formatted(kind: ResetKind, args: core::fmt::Arguments<'_>) -> Self {
        let mut r = ResetReason {
            kind,
            text: heapless::Vec::new(),
            truncated: false,
        };
        let _ = TextWriter(&mut r).write_fmt(args);
        r
    }

    /// The reason text (peer payloads are bytes as sent, usually ASCII; a trailing newline is
    /// stripped on receipt).
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// True if the text was longer than [`REASON_CAP`] and was cut.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

struct TextWriter<'a>(&'a mut ResetReason);

impl core::fmt::Write for TextWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.0.text.push(b).is_err() {
                self.0.truncated = true;
                break;
            }
        }
        Ok(())
    }
}

impl core::fmt::Display for ResetReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.text.iter() {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            f.write_char(c)?;
        }
        if self.truncated {
            f.write_str("...")?;
        }
        Ok(())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for ResetReason {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{}: {=[u8]:a}", self.kind, &self.text[..])
    }
}

/// Timing and flow-control knobs of connections (part of `SessionConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConnConfig {
    /// SYN without SYN|ACK for this long → refused with `ConnectTimeout` (and an RST).
    pub connect_timeout: Duration,
    /// Longest a small window update or ack advance is held back to be merged with others.
    pub ack_delay: Duration,
    /// First idle interval before an unanswered window update is re-sent.
    pub reack_interval: Duration,
    /// Back-off cap of the re-send interval.
    pub reack_max_interval: Duration,
    /// How many times an unanswered update is re-sent before giving up (the peer had nothing
    /// more to send).
    pub reack_limit: u8,
    /// When window updates and acks go out (see [`AckPolicy`]).
    pub ack_policy: AckPolicy,
}

/// When a receiver tells the sender about acked data and freed window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AckPolicy {
    /// usbmux-rs's policy: an update goes out at once when the application has drained enough
    /// to matter (half the buffer, or a full segment while the peer may be blocked); smaller
    /// changes wait `ack_delay` to be merged.
    #[default]
    Drain,
    /// Debian usbmuxd 1.1.1's policy, kept for comparison benchmarks (PROTOCOL.md §1.5): every
    /// data packet is acked at once, and window freed by the application is only announced by
    /// the next such ACK or after `ack_delay` (usbmuxd: 30 ms).
    Usbmuxd,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            connect_timeout: Duration::from_secs(5),
            ack_delay: Duration::from_millis(2),
            reack_interval: Duration::from_millis(50),
            reack_max_interval: Duration::from_secs(2),
            reack_limit: 12,
            ack_policy: AckPolicy::Drain,
        }
    }
}

/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConnStats {
    /// Payload bytes sent to the peer.
    pub bytes_sent: u64,
    /// Payload bytes received from the peer.
    pub bytes_received: u64,
    /// TCP packets sent (all kinds).
    pub packets_sent: u64,
    /// TCP packets received (all kinds).
    pub packets_received: u64,
    /// Packets sent without payload only to carry an ack/window update.
    pub pure_acks_sent: u64,
    /// Window updates re-sent by the idle re-ACK timer.
    pub reacks_sent: u64,
    /// Pure ACKs sent as probes while our data was unacknowledged or the peer's window closed.
    pub probes_sent: u64,
    /// Times the peer's window stopped us while data was queued.
    pub window_stalls: u64,
}

pub(crate) mod ev {
    pub const CONNECTED: u8 = 1;
    pub const READABLE: u8 = 2;
    pub const WRITABLE: u8 = 4;
    pub const CLOSED: u8 = 8;
}

/// Wrapping sequence-number order: is `a` after `b`?
#[inline]
pub(crate) fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// One pseudo-TCP connection and its buffers.
#[derive(Debug)]
pub struct Connection<B> {
    state: State,
    /// Port on this side (host: the source port it picked; device: the service port).
    local_port: u16,
    /// Port on the other side.
    remote_port: u16,
    /// Next sequence number we send.
    snd_nxt: u32,
    /// Highest ack received.
    snd_una: u32,
    /// The peer's right edge: we never send a byte at or past it.
    snd_edge: u32,
    /// Next sequence number expected from the peer.
    rcv_nxt: u32,
    /// Our right edge as last advertised (never moves back).
    rcv_edge: u32,
    /// The ack we last sent.
    ack_sent: u32,
    rx: RingBuffer<B>,
    tx: RingBuffer<B>,
    syn_pending: bool,
    synack_pending: bool,
    rst_pending: bool,
    ack_now: bool,
    window_dirty: bool,
    ack_due: Option<Instant>,
    connect_deadline: Option<Instant>,
    reack_at: Option<Instant>,
    /// Sender side: when to send a pure ACK at `snd_nxt` because data is unacknowledged or the
    /// peer's window is closed. Nothing retransmits, so this probe is how a lost data packet is
    /// found (the receiver sees a seq it did not expect and resets) and how a lost window update
    /// is asked for again.
    probe_at: Option<Instant>,
    probe_backoff: Duration,
    probe_count: u8,
    /// When we last sent anything on this connection (a peer's probe is answered only by a
    /// silent side, so two idle peers cannot ping-pong).
    last_sent: Option<Instant>,
    reack_backoff: Duration,
    reack_count: u8,
    stalled: bool,
    /// The application's source (`dispatch`'s `source`) filled all the room it was last
    /// offered, so it probably holds more bytes than the engine can see. Why: a connection fed
    /// that way has an empty send ring, and without this a closed peer window would look like
    /// "nothing to send" — no stall counted, no probe to ask again for a lost window update.
    source_more: bool,
    connected_once: bool,
    reason: Option<ResetReason>,
    pub(crate) events: u8,
    stats: ConnStats,
}

/// What `process` wants the session to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing special.
    Ok,
    /// The connection just closed (its reason is set).
    Closed,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Connection<B> {
    /// Host role: a connection to `remote_port` from `local_port`, SYN queued.
    pub(crate) fn new_active(local_port: u16, remote_port: u16, bufs: Buffers<B>) -> Self {
        let mut c = Self::blank(local_port, remote_port, bufs);
        c.state = State::SynSent;
        c.syn_pending = true;
        // Assume the phone's ISN is 0 until its SYN|ACK says otherwise.
        c.rcv_nxt = 1;
        c.rcv_edge = c.candidate_edge();
        c.ack_sent = 0;
        c
    }

    /// Device role: an accepted connection whose SYN carried `peer_seq` and `peer_window`.
    pub(crate) fn new_passive(
        local_port: u16,
        remote_port: u16,
        peer_seq: u32,
        peer_window: u16,
        bufs: Buffers<B>,
    ) -> Self {
        let mut c = Self::blank(local_port, remote_port, bufs);
        c.state = State::Established;
        c.connected_once = true;
        c.synack_pending = true;
        c.rcv_nxt = peer_seq.wrapping_add(1);
        c.rcv_edge = c.candidate_edge();
        c.ack_sent = c.rcv_nxt;
        // Our ISN is 0: our first data byte is seq 1.
        c.snd_una = 1;
        c.snd_edge = 1u32.wrapping_add(u32::from(peer_window) << 8);
        c
    }

    fn blank(local_port: u16, remote_port: u16, bufs: Buffers<B>) -> Self {
        Connection {
            state: State::SynSent,
            local_port,
            remote_port,
            snd_nxt: 0,
            snd_una: 0,
            snd_edge: 0,
            rcv_nxt: 0,
            rcv_edge: 0,
            ack_sent: 0,
            rx: RingBuffer::new(bufs.rx),
            tx: RingBuffer::new(bufs.tx),
            syn_pending: false,
            synack_pending: false,
            rst_pending: false,
            ack_now: false,
            window_dirty: false,
            ack_due: None,
            connect_deadline: None,
            reack_at: None,
            probe_at: None,
            probe_backoff: Duration::ZERO,
            probe_count: 0,
            last_sent: None,
            reack_backoff: Duration::ZERO,
            reack_count: 0,
            stalled: false,
            source_more: false,
            connected_once: false,
            reason: None,
            events: 0,
            stats: ConnStats::default(),
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// This side's port.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// The other side's port.
    pub fn remote_port(&self) -> u16 {
        self.remote_port
    }

    /// Counters.
    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    /// Why it closed, once closed.
    pub fn reason(&self) -> Option<&ResetReason> {
        self.reason.as_ref()
    }

    /// Bytes received and not yet read.
    pub fn recv_queue(&self) -> usize {
        self.rx.len()
    }

    /// Bytes written and not yet sent.
    pub fn send_queue(&self) -> usize {
        self.tx.len()
    }

    /// Free space in the send buffer.
    pub fn send_capacity(&self) -> usize {
        self.tx.window()
    }

    /// How many more bytes the peer's window admits right now.
    pub fn peer_window(&self) -> usize {
        let d = self.snd_edge.wrapping_sub(self.snd_nxt);
        if (d as i32) > 0 {
            d as usize
        } else {
            0
        }
    }

    /// Whether the connection ever reached ESTABLISHED (decides `Reset` vs `Refused`).
    pub fn was_connected(&self) -> bool {
        self.connected_once
    }

    /// (src port, dst port, seq, ack) for an RST sent on this connection's behalf.
    pub(crate) fn rst_fields(&self) -> (u16, u16, u32, u32) {
        (
            self.local_port,
            self.remote_port,
            self.snd_nxt,
            self.rcv_nxt,
        )
    }

    /// The reason of an RST that was decided but not yet sent (the connection closed itself
    /// and the application releases it before `poll_transmit` ran); taking it means the caller
    /// sends it.
    pub(crate) fn take_pending_rst(&mut self) -> Option<ResetReason> {
        if self.rst_pending {
            self.rst_pending = false;
            Some(
                self.reason
                    .clone()
                    .unwrap_or_else(|| ResetReason::new(ResetKind::Local)),
            )
        } else {
            None
        }
    }

    pub(crate) fn matches(&self, local_port: u16, remote_port: u16) -> bool {
        self.local_port == local_port && self.remote_port == remote_port
    }

    pub(crate) fn into_buffers(self) -> Buffers<B> {
        Buffers {
            rx: self.rx.into_inner(),
            tx: self.tx.into_inner(),
        }
    }

    /// The right edge the current free space would allow (never less than the old one is decided
    /// by the caller).
    fn candidate_edge(&self) -> u32 {
        let units = (self.rx.window() / 256).min(0xFFFF) as u32;
        self.rcv_nxt.wrapping_add(units * 256)
    }

    /// (ack, window units, edge) to put in the next packet: the edge never moves back, the ack
    /// never passes what was received.
    fn advertise(&self) -> (u32, u16, u32) {
        let cand = self.candidate_edge();
        let edge = if seq_gt(cand, self.rcv_edge) {
            cand
        } else {
            self.rcv_edge
        };
        let d = edge.wrapping_sub(self.rcv_nxt);
        let w = d.div_ceil(256).min(0xFFFF);
        (edge.wrapping_sub(w * 256), w as u16, edge)
    }

    /// Is anything of ours waiting on the peer: data sent but not acknowledged, or data queued
    /// behind a closed window?
    fn outstanding(&self) -> bool {
        seq_gt(self.snd_nxt, self.snd_una) || (self.more_to_send() && self.peer_window() == 0)
    }

    /// Bytes wait to be sent: in the send ring, or (probably) at the application's source.
    fn more_to_send(&self) -> bool {
        !self.tx.is_empty() || self.source_more
    }

    /// Could the peer be waiting for a window update? Its remaining window (nothing is lost, so
    /// its next seq is our `rcv_nxt`) is smaller than a useful segment.
    fn peer_may_be_blocked(&self, max_payload: usize) -> bool {
        let remaining = self.rcv_edge.wrapping_sub(self.rcv_nxt) as usize;
        remaining < self.useful_segment(max_payload)
    }

    fn useful_segment(&self, max_payload: usize) -> usize {
        max_payload.min(self.rx.capacity() / 2).max(1)
    }

    fn close(&mut self, reason: ResetReason, send_rst: bool) {
        debug!(
            "conn {}->{}: {} -> CLOSED ({})",
            self.local_port, self.remote_port, self.state, reason
        );
        self.state = State::Closed;
        self.rst_pending = send_rst;
        self.syn_pending = false;
        self.synack_pending = false;
        self.ack_now = false;
        self.window_dirty = false;
        self.ack_due = None;
        self.connect_deadline = None;
        self.reack_at = None;
        self.probe_at = None;
        self.tx.clear();
        self.reason = Some(reason);
        self.events |= ev::CLOSED;
    }

    /// Ends the connection from this side (RST with `reason`'s text unless already closed).
    pub(crate) fn abort(&mut self, reason: ResetReason, send_rst: bool) {
        if self.state != State::Closed {
            self.close(reason, send_rst);
        }
    }

    /// Consumes one segment addressed to this connection. `deliver`, if given, is offered the
    /// payload first while the receive buffer is empty and returns how much it took (see
    /// `Session::handle_transfer_with`); the rest is queued.
    pub(crate) fn process(
        &mut self,
        now: Instant,
        seg: &TcpRepr<'_>,
        cfg: &ConnConfig,
        deliver: Option<Take<'_>>,
    ) -> Outcome {
        self.stats.packets_received += 1;
        let flags = seg.flags;
        match self.state {
            State::Closed => Outcome::Ok,
            State::SynSent => {
                if flags.contains(Flags::RST) {
                    self.close(peer_text(ResetKind::Refused, seg.payload), false);
                    return Outcome::Closed;
                }
                if !(flags.contains(Flags::SYN) && flags.contains(Flags::ACK)) || self.syn_pending {
                    self.close(
                        ResetReason::formatted(
                            ResetKind::BadFlags,
                            format_args!("unexpected flags {} while connecting", flags),
                        ),
                        true,
                    );
                    return Outcome::Closed;
                }
                if seg.ack != self.snd_nxt {
                    self.close(
                        ResetReason::formatted(
                            ResetKind::AckBeyondSent,
                            format_args!(
                                "SYN|ACK acks {} but our SYN was {}",
                                seg.ack,
                                self.snd_nxt.wrapping_sub(1)
                            ),
                        ),
                        true,
                    );
                    return Outcome::Closed;
                }
                self.rcv_nxt = seg.seq.wrapping_add(1);
                self.rcv_edge = self.candidate_edge();
                self.snd_una = seg.ack;
                self.snd_edge = seg.ack.wrapping_add(u32::from(seg.window) << 8);
                self.connect_deadline = None;
                self.state = State::Established;
                self.connected_once = true;
                debug!(
                    "conn {}->{}: SYN-SENT -> ESTABLISHED",
                    self.local_port, self.remote_port
                );
                // The third step of the handshake.
                self.ack_now = true;
                self.events |= ev::CONNECTED | ev::WRITABLE;
                Outcome::Ok
            }
            State::Established => self.process_established(now, seg, cfg, deliver),
        }
    }

    fn process_established(
        &mut self,
        now: Instant,
        seg: &TcpRepr<'_>,
        cfg: &ConnConfig,
        deliver: Option<Take<'_>>,
    ) -> Outcome {
        let flags = seg.flags;
        if flags.contains(Flags::RST) {
            self.close(peer_text(ResetKind::PeerReset, seg.payload), false);
            return Outcome::Closed;
        }
        if self.synack_pending {
            // Device role: nothing may arrive before our SYN|ACK went out, except a repeated SYN.
            if flags.contains(Flags::SYN) && !flags.contains(Flags::ACK) {
                return Outcome::Ok;
            }
        }
        // After the handshake every segment carries ACK (RFC 793; usbmuxd and phones always set
        // it). Without it — e.g. an RST whose flags were corrupted into FIN — the payload is not
        // stream data and must not be taken for it.
        if flags.contains(Flags::SYN) || !flags.contains(Flags::ACK) {
            self.close(
                ResetReason::formatted(
                    ResetKind::BadFlags,
                    format_args!("unexpected flags {} on an open connection", flags),
                ),
                true,
            );
            return Outcome::Closed;
        }
        if seg.seq != self.rcv_nxt {
            self.close(
                ResetReason::formatted(
                    ResetKind::UnexpectedSeq,
                    format_args!(
                        "unexpected sequence number {} (expected {})",
                        seg.seq, self.rcv_nxt
                    ),
                ),
                true,
            );
            return Outcome::Closed;
        }
        if flags.contains(Flags::ACK) {
            if seq_gt(seg.ack, self.snd_nxt) {
                self.close(
                    ResetReason::formatted(
                        ResetKind::AckBeyondSent,
                        format_args!(
                            "ack {} beyond data sent (next seq {})",
                            seg.ack, self.snd_nxt
                        ),
                    ),
                    true,
                );
                return Outcome::Closed;
            }
            if !seq_gt(self.snd_una, seg.ack) {
                let progress = seq_gt(seg.ack, self.snd_una);
                let old_edge = self.snd_edge;
                self.snd_una = seg.ack;
                self.snd_edge = seg.ack.wrapping_add(u32::from(seg.window) << 8);
                if self.peer_window() > 0 {
                    self.stalled = false;
                }
                if progress || seq_gt(self.snd_edge, old_edge) {
                    // The peer is alive and listening: start probing afresh if still needed.
                    self.probe_count = 0;
                    self.probe_backoff = cfg.reack_interval;
                    self.probe_at = self.outstanding().then(|| now + cfg.reack_interval);
                }
            }
        }
        let len = seg.payload.len();
        if len > 0 {
            let end = self.rcv_nxt.wrapping_add(len as u32);
            if seq_gt(end, self.rcv_edge) {
                self.close(
                    ResetReason::formatted(
                        ResetKind::WindowOverflow,
                        format_args!(
                            "window overflow: {} bytes at {}, window ends at {}",
                            len, self.rcv_nxt, self.rcv_edge
                        ),
                    ),
                    true,
                );
                return Outcome::Closed;
            }
            // Straight to the application while nothing is queued before these bytes.
            let taken = match deliver {
                Some(d) if self.rx.is_empty() => d(seg.payload).min(len),
                _ => 0,
            };
            let rest = &seg.payload[taken..];
            let n = self.rx.enqueue_slice(rest);
            if n < rest.len() {
                // Unreachable while the edge invariant holds (edge - rcv_nxt <= free space);
                // kept so a broken invariant resets instead of losing bytes.
                self.close(ResetReason::new(ResetKind::WindowOverflow), true);
                return Outcome::Closed;
            }
            self.rcv_nxt = end;
            self.stats.bytes_received += len as u64;
            if !rest.is_empty() {
                self.events |= ev::READABLE;
            }
            self.window_dirty = true;
            if cfg.ack_policy == AckPolicy::Usbmuxd {
                self.ack_now = true;
            }
            // The peer is sending again: whatever update it was waiting for arrived.
            self.reack_at = None;
            self.reack_count = 0;
        } else if flags.contains(Flags::ACK)
            && self.last_sent.is_none_or(|t| now >= t + cfg.reack_interval)
        {
            // A pure ACK while we have been silent: the peer may be probing because it is
            // blocked on a window update of ours that was lost (or corrupted). Answer with the
            // current ack and window. Only a silent side answers, so two idle peers exchange
            // at most one packet per interval.
            self.ack_now = true;
        }
        if flags.contains(Flags::FIN) {
            self.close(ResetReason::new(ResetKind::PeerFin), true);
            return Outcome::Closed;
        }
        Outcome::Ok
    }

    /// Application read: copies out up to `buf.len()` received bytes.
    pub(crate) fn recv(&mut self, buf: &mut [u8]) -> usize {
        let n = self.rx.dequeue_slice(buf);
        if n > 0 && self.state == State::Established {
            self.window_dirty = true;
        }
        n
    }

    /// Zero-copy read: the longest contiguous run of received bytes.
    pub(crate) fn peek(&self) -> &[u8] {
        self.rx.get_allocated(0, usize::MAX)
    }

    /// Zero-copy read: drops `n` bytes returned by `peek`.
    pub(crate) fn consume(&mut self, n: usize) -> usize {
        let n = self.rx.dequeue_allocated(n);
        if n > 0 && self.state == State::Established {
            self.window_dirty = true;
        }
        n
    }

    /// Application write: queues as much of `data` as fits.
    pub(crate) fn send(&mut self, data: &[u8]) -> usize {
        self.tx.enqueue_slice(data)
    }

    /// Zero-copy write: the free space to fill, then `commit`.
    pub(crate) fn send_buffer(&mut self) -> &mut [u8] {
        self.tx.get_unallocated(usize::MAX)
    }

    /// Zero-copy write: queues `n` bytes written into `send_buffer`.
    pub(crate) fn commit(&mut self, n: usize) -> usize {
        self.tx.enqueue_unallocated(n)
    }

    /// Earliest instant at which `handle_timeout` has work for this connection.
    pub(crate) fn poll_at(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        for d in [
            self.connect_deadline,
            self.ack_due,
            self.reack_at,
            self.probe_at,
        ]
        .into_iter()
        .flatten()
        {
            t = Some(t.map_or(d, |x| x.min(d)));
        }
        t
    }

    /// Does `dispatch` have something to send right now (ignoring buffer space)?
    pub(crate) fn wants_transmit(&self, max_payload: usize) -> bool {
        if self.rst_pending
            || self.syn_pending
            || self.synack_pending
            || self.ack_now
            || self.window_dirty
        {
            return true;
        }
        self.state == State::Established
            && !self.tx.is_empty()
            && self.peer_window() > 0
            && max_payload > 0
    }

    /// Fires expired timers. Returns `Outcome::Closed` if the connection timed out.
    pub(crate) fn handle_timeout(&mut self, now: Instant, cfg: &ConnConfig) -> Outcome {
        if let Some(d) = self.connect_deadline {
            if now >= d && self.state == State::SynSent {
                self.close(ResetReason::new(ResetKind::ConnectTimeout), true);
                return Outcome::Closed;
            }
        }
        if let Some(d) = self.ack_due {
            if now >= d {
                self.ack_due = None;
                self.ack_now = true;
            }
        }
        if let Some(d) = self.probe_at {
            if now >= d {
                self.probe_count = self.probe_count.saturating_add(1);
                if !self.outstanding() || self.probe_count > cfg.reack_limit {
                    self.probe_at = None;
                } else {
                    self.ack_now = true;
                    self.stats.probes_sent += 1;
                    self.probe_backoff = self.probe_backoff.doubled().min(cfg.reack_max_interval);
                    self.probe_at = Some(now + self.probe_backoff);
                }
            }
        }
        if let Some(d) = self.reack_at {
            if now >= d {
                self.reack_count = self.reack_count.saturating_add(1);
                if self.reack_count > cfg.reack_limit {
                    self.reack_at = None;
                } else {
                    self.ack_now = true;
                    self.stats.reacks_sent += 1;
                    self.reack_backoff = self.reack_backoff.doubled().min(cfg.reack_max_interval);
                    self.reack_at = Some(now + self.reack_backoff);
                }
            }
        }
        Outcome::Ok
    }

    /// Produces at most one TCP segment (header + payload) into `out`, which starts where the
    /// TCP header goes. `Ok(None)`: nothing to send. `Err(required)`: `out` is too small for the
    /// next segment; nothing changed.
    ///
    /// `zlp_unit` is (mux header length, wMaxPacketSize): a data packet that would be an exact
    /// multiple of the packet size (and so need a ZLP, one more transfer) is cut one byte short
    /// when more data follows anyway.
    ///
    /// `source`, when given, supplies payload straight into `out` while the send ring is empty
    /// (see `mux::Session::poll_transmit_with`): it writes up to the slice's length and returns
    /// how much it wrote.
    pub(crate) fn dispatch(
        &mut self,
        now: Instant,
        out: &mut [u8],
        max_payload: usize,
        zlp_unit: (usize, usize),
        cfg: &ConnConfig,
        source: Option<Fill<'_>>,
    ) -> Result<Option<usize>, usize> {
        let hl = tcpw::HEADER_LEN;
        if self.rst_pending {
            let text: &[u8] = self.reason.as_ref().map_or(&[], |r| r.text());
            // The reason is best effort: cut it to fit rather than fail.
            let room = out.len().saturating_sub(hl).min(max_payload);
            if out.len() < hl {
                return Err(hl);
            }
            let payload = &text[..text.len().min(room)];
            let repr = TcpRepr {
                src_port: self.local_port,
                dst_port: self.remote_port,
                seq: self.snd_nxt,
                ack: self.rcv_nxt,
                flags: Flags::RST,
                window: 0,
                payload,
            };
            let n = emit(&repr, out);
            self.rst_pending = false;
            self.stats.packets_sent += 1;
            return Ok(Some(n));
        }
        if self.state == State::Closed {
            return Ok(None);
        }
        if out.len() < hl {
            return if self.wants_transmit(max_payload) {
                Err(hl)
            } else {
                Ok(None)
            };
        }
        if self.syn_pending {
            let (_, window, edge) = self.advertise();
            let repr = TcpRepr {
                src_port: self.local_port,
                dst_port: self.remote_port,
                seq: 0,
                ack: 0,
                flags: Flags::SYN,
                window,
                payload: &[],
            };
            let n = emit(&repr, out);
            self.rcv_edge = edge;
            self.snd_nxt = 1;
            self.syn_pending = false;
            self.last_sent = Some(now);
            self.connect_deadline = Some(now + cfg.connect_timeout);
            self.stats.packets_sent += 1;
            return Ok(Some(n));
        }
        if self.synack_pending {
            let (ack, window, edge) = self.advertise();
            let repr = TcpRepr {
                src_port: self.local_port,
                dst_port: self.remote_port,
                seq: 0,
                ack,
                flags: Flags::SYN.union(Flags::ACK),
                window,
                payload: &[],
            };
            let n = emit(&repr, out);
            self.rcv_edge = edge;
            self.ack_sent = ack;
            self.snd_nxt = 1;
            self.synack_pending = false;
            self.last_sent = Some(now);
            self.stats.packets_sent += 1;
            self.events |= ev::WRITABLE;
            return Ok(Some(n));
        }
        if self.state != State::Established {
            return Ok(None);
        }

        if self.window_dirty {
            self.window_dirty = false;
            let (ack, _, edge) = self.advertise();
            if edge != self.rcv_edge || ack != self.ack_sent {
                let grown = edge.wrapping_sub(self.rcv_edge) as usize;
                let open = edge.wrapping_sub(self.rcv_nxt) as usize;
                let urgent = cfg.ack_policy == AckPolicy::Drain
                    && (grown >= self.rx.capacity() / 2
                        || (self.peer_may_be_blocked(max_payload)
                            && open >= self.useful_segment(max_payload)));
                if urgent {
                    self.ack_now = true;
                } else if self.ack_due.is_none() {
                    self.ack_due = Some(now + cfg.ack_delay);
                }
            }
        }

        let queued = self.tx.len();
        let sendable = queued.min(self.peer_window());
        let mut n = sendable.min(max_payload).min(out.len() - hl);
        let (mux_hl, mps) = zlp_unit;
        if n > 1 && n < sendable && mps > 0 && (mux_hl + hl + n).is_multiple_of(mps) {
            n -= 1;
        }
        // Nothing queued: the application may put the payload in place itself (one copy fewer
        // than through the ring). Its bytes come after everything the ring held, because the
        // ring is empty. More usually follows, so the packet is sized to need no ZLP.
        let mut direct = 0;
        if let Some(source) = source.filter(|_| queued == 0) {
            let mut room = self.peer_window().min(max_payload).min(out.len() - hl);
            if room > 1 && mps > 0 && (mux_hl + hl + room).is_multiple_of(mps) {
                room -= 1;
            }
            if room > 0 {
                direct = source(&mut out[hl..hl + room]).min(room);
                n = direct;
                self.source_more = direct == room;
            }
        }
        if self.more_to_send() && self.peer_window() == 0 && !self.stalled {
            self.stalled = true;
            self.stats.window_stalls += 1;
            if self.probe_at.is_none() {
                self.probe_backoff = cfg.reack_interval;
                self.probe_at = Some(now + cfg.reack_interval);
            }
        }
        if n == 0 && !self.ack_now {
            return Ok(None);
        }
        let was_full = self.tx.is_full();
        let (ack, window, edge) = self.advertise();
        let blocked_before = self.peer_may_be_blocked(max_payload);
        let repr = TcpRepr {
            src_port: self.local_port,
            dst_port: self.remote_port,
            seq: self.snd_nxt,
            ack,
            flags: Flags::ACK,
            window,
            payload: &[],
        };
        let total = emit(&repr, out);
        // Payload straight from the send ring (at most two runs, at the wrap point), unless the
        // application put it in place already.
        let mut copied = direct;
        while copied < n {
            let run = self.tx.get_allocated(0, n - copied);
            let len = run.len();
            if len == 0 {
                break;
            }
            out[hl + copied..hl + copied + len].copy_from_slice(run);
            self.tx.dequeue_allocated(len);
            copied += len;
        }
        self.snd_nxt = self.snd_nxt.wrapping_add(copied as u32);
        self.stats.bytes_sent += copied as u64;
        self.last_sent = Some(now);
        if copied > 0 && self.probe_at.is_none() {
            self.probe_count = 0;
            self.probe_backoff = cfg.reack_interval;
            self.probe_at = Some(now + cfg.reack_interval);
        }
        self.stats.packets_sent += 1;
        if copied == 0 {
            self.stats.pure_acks_sent += 1;
        }
        if was_full && copied > 0 {
            self.events |= ev::WRITABLE;
        }
        let moved = edge != self.rcv_edge;
        self.rcv_edge = edge;
        self.ack_sent = ack;
        self.ack_now = false;
        self.ack_due = None;
        if moved && blocked_before {
            // The peer may have been waiting for exactly this update; nothing retransmits, so
            // re-send it if the peer stays silent.
            self.reack_backoff = cfg.reack_interval;
            self.reack_count = 0;
            self.reack_at = Some(now + cfg.reack_interval);
        }
        Ok(Some(total + copied))
    }
}

/// An application's payload source for one connection: writes up to `dst.len()` bytes of its
/// next data into `dst`, returns how many (`Connection::dispatch`).
pub(crate) type Fill<'a> = &'a mut dyn FnMut(&mut [u8]) -> usize;

/// An application's payload sink for one connection: offered received bytes while the receive
/// buffer is empty, returns how many it took (`Connection::process`).
pub(crate) type Take<'a> = &'a mut dyn FnMut(&[u8]) -> usize;

/// Writes the header of `repr` (and its payload, if any) at the start of `out`; returns the
/// header length plus `repr.payload.len()`. `out` must hold `repr.buffer_len()` bytes.
fn emit(repr: &TcpRepr<'_>, out: &mut [u8]) -> usize {
    let len = repr.buffer_len();
    let mut pkt = tcpw::Packet::new_unchecked(&mut out[..len]);
    repr.emit(&mut pkt);
    len
}

/// A reason carrying the peer's RST payload (trailing newline stripped), or the default text.
fn peer_text(kind: ResetKind, payload: &[u8]) -> ResetReason {
    let mut p = payload;
    while let [rest @ .., b'\n' | b'\r' | 0] = p {
        p = rest;
    }
    if p.is_empty() {
        ResetReason::new(kind)
    } else {
        ResetReason::with_text(kind, p)
    }
}
