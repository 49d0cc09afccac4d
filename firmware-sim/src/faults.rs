//! Deterministic, seeded fault injection on the transfer stream of one phone.
//!
//! A [`FaultInjector`] sits between a host and one phone, on both directions of its cable. It
//! knows nothing about the transport (virtual cable, socket, FunctionFS): the harness hands it
//! every mux packet as it leaves one side ([`FaultInjector::push`], with the sender's `zlp` flag)
//! and takes what the other side must receive from [`FaultInjector::poll_output`] — transfers,
//! possibly mutated, duplicated, cut, merged, held back or rate-limited, and the
//! [`Output::Unplug`] the harness applies by calling `Session::handle_disconnect` on the host and
//! dropping the phone. Time is the caller's: [`FaultInjector::poll_at`] says when something is
//! due, [`FaultInjector::handle_timeout`] fires time-triggered rules.
//!
//! A transport wrapper (`Faulty<T>` in the manner of smoltcp's `FaultInjector`, STYLE.md §7) is
//! a thin loop around this type: push what its inner transport sends, hand on what
//! `poll_output` releases, and sleep until `poll_at`.
//!
//! What goes wrong is a [`Faults`] value: a seed and a list of [`Rule`]s, each a [`Trigger`]
//! ("the 4th data packet to port 7, host → phone", "at 2.5 s", "every SYN|ACK with
//! probability 0.1") and an [`Action`]. It serialises with `postcard`
//! ([`Faults::to_bytes`] / [`Faults::from_bytes`]), so a failing scenario can be saved and
//! replayed: given the same packets in the same order, the same faults fire (the only randomness
//! is a xorshift generator seeded from [`Faults::seed`]).
//!
//! Push every packet of both directions, from the first VERSION on: the injector learns the
//! header forms and the connections from them. Packets are parsed with `usbmux_core::wire`'s
//! checked views; the header form of each direction
//! (8-byte v1 or 16-byte v2) is tracked from the VERSION exchange, and every TCP connection's
//! next sequence number, ack and advertised right edge are tracked per side (for crafted RSTs
//! and window overruns). No byte sequence makes the injector panic: a mutation that does not
//! apply to a packet (a v2 field on a v1 packet, a TCP field on a CONTROL packet, a rewrite of a
//! packet an earlier rule made unparseable) is not applied, and the rule does not count that
//! packet (see [`Trigger`]).
//!
//! # Expected outcomes
//!
//! Against a `usbmux_core::Session<Host>` and a [`Phone`](crate::Phone) with the default
//! configuration; `firmware-sim/tests/faults.rs` asserts every row in each direction where the
//! fault applies. In every row, connections the fault did not touch carry on byte-exact, every
//! byte the host's application receives is a prefix of what was sent (except where the row
//! says otherwise), and other phones — each with its own session and injector — are untouched.
//!
//! "Detected by the receiver" means: the side that received the faulty packet resets *that*
//! connection with the given `ResetKind` and a reason text, and sends an RST carrying the text.
//! Phone → host: the host reports the kind; the phone gets `PeerReset` with the host's text.
//! Host → phone: the phone reports the kind; the host gets `PeerReset` — with the phone's text
//! by design, but today with "no such connection" once it sends again, because `Phone`
//! releases the slot before the RST leaves (a known issue, see the ignored test
//! `phone_rst_reason_reaches_host`). "As a lost packet" means: detected by the receiver with
//! `UnexpectedSeq` at the connection's next packet.
//!
//! | fault ([`Action`]) | host → phone (OUT) | phone → host (IN) |
//! |---|---|---|
//! | `Drop` of a data packet | as a lost packet | as a lost packet |
//! | `Drop` of the last data packet of a burst | found by the sender's probe (a pure ACK at its next seq after an idle interval): the receiver resets `UnexpectedSeq`, the sender sees `PeerReset` with that text | same |
//! | `Drop` of the SYN / the SYN\|ACK | host: `Refused` with `ConnectTimeout` after `connect_timeout` (5 s) | same, for the SYN\|ACK |
//! | `Drop` of a window update a sender waits for | recovered by the receiver's idle re-ACK (`reack_interval`, 50 ms): intact, later | same |
//! | `Drop` of one VERSION | host sends VERSION again after `version_timeout` (1 s): intact, later | same (the phone sees VERSION twice: `PeerRestarted`, before any connection) |
//! | `Drop` of every VERSION ("never answers") | host: `HandshakeFailed` after `version_attempts` (3 s); every connection `Refused` with `HandshakeFailed` | same |
//! | `Drop` of SETUP | intact (the phone needs none) | — (only the host sends SETUP) |
//! | `Duplicate` of a data packet | detected by the phone: `UnexpectedSeq` | detected by the host: `UnexpectedSeq` |
//! | `Duplicate` of a pure ACK | harmless: intact | harmless: intact |
//! | `Duplicate` of the SYN / the SYN\|ACK | SYN: ignored by the phone, intact | SYN\|ACK: detected by the host: `BadFlags` |
//! | `Reorder` within one connection | as a lost packet | as a lost packet |
//! | `Reorder` across connections | intact | intact |
//! | `SetLength` nonsense (< header, > 65 535) | phone answers a CONTROL type 3 text ("message size mismatch ..."): host `Event::DeviceMessage`; then as a lost packet | host counts a reassembly error and resynchronises at the next transfer; then as a lost packet |
//! | `SetLength` plausible but wrong | as nonsense (the phone compares it with the transfer) | framing is off until a nonsense length: a too-long length hands the next packet's first bytes to the application as data (usbmux has no checksum), then the connection resets (`UnexpectedSeq`); the next packet, of whatever connection, may be lost |
//! | `SetMagic` (v2 only) | phone drops it as malformed (no CONTROL text): as a lost packet | host drops it as malformed: as a lost packet |
//! | `SetProtocol` (unknown) | phone drops it (`dropped_unexpected`): as a lost packet | host drops it: as a lost packet |
//! | `MuxSeqOffset` (v2 tx_seq) | counted in `seq_anomalies`, intact | same |
//! | `SeqOffset` (wrong TCP seq) | detected by the phone: `UnexpectedSeq` | detected by the host: `UnexpectedSeq` |
//! | `AckOffset` (ack beyond sent) | detected by the phone: `AckBeyondSent` | detected by the host: `AckBeyondSent` (on the SYN\|ACK: `Refused` with `AckBeyondSent`) |
//! | `OverrunWindow` (data past the receiver's edge) | detected by the phone: `WindowOverflow` | detected by the host: `WindowOverflow` |
//! | `SetFlags` FIN\|ACK on data | the phone takes the data, then detects `PeerFin` | the host takes the data, then detects `PeerFin` |
//! | `SetWindow(0)` on a window update | recovered by the receiver's idle re-ACK: intact, later | same |
//! | `SetWindow(0)` on the SYN\|ACK | — | the host's probe (its data waits behind a closed window) makes the silent phone answer with its real window: intact |
//! | `InjectRst` "amnesia" | phone: `PeerReset` "amnesia"; the host learns at its next packet on it (anonymous RST "no such connection") | host: `PeerReset` "amnesia"; the phone learns at its next packet (anonymous RST "no such connection") |
//! | `InjectControl` | the phone takes no CONTROL: ignored (`dropped_unexpected`), intact | host: `Event::DeviceMessage` with the text; intact |
//! | `AnswerVersion(1)` | the phone answers 1: a v1 session, intact | header forms disagree (host v1, phone v2): the phone drops every host packet as malformed, every connection `Refused` with `ConnectTimeout` |
//! | `AnswerVersion(3)` | the phone answers 2 to any major ≥ 2: intact | host: `HandshakeFailed` at once; connections `Refused` with `HandshakeFailed` |
//! | `Split` into several transfers | a CONTROL error per piece; as a lost packet | host reassembles any split (1-byte pieces, 4 KiB pieces): intact |
//! | `Pack` several packets into one transfer | one CONTROL error; every packed packet lost | host cuts them apart: intact |
//! | `OmitZlp` | the phone's read runs on into the next transfer: one CONTROL error ("header says 4096 bytes, got 8192"), both packets lost | host reads a byte stream: intact |
//! | `Unplug` (half of the packet delivered first) | host `handle_disconnect`: every connection `Unplugged`, session `Dead` | same |
//! | `StopReading` | intact, later by the stop | same |
//! | `SlowLink` | intact, later (bytes / rate at least) | same |
//!
//! A time-triggered injection travels behind whatever its direction already carries.
//!
//! # Combining rules
//!
//! Rules are checked in order on every packet. Field rewrites of all rules that fire apply in
//! rule order; then the first firing rule among `Drop`, `Duplicate`, `Reorder`, `Split`, `Pack`,
//! `OmitZlp` and `Unplug` decides how the packet travels; injected packets follow it.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use usbmux_core::usb::needs_zlp;
use usbmux_core::wire::{
    self, mux as muxw, ControlPacket, ControlRepr, ControlType, HeaderKind, MuxPacket, MuxRepr,
    MuxSeq, Protocol, TcpFlags, TcpPacket, TcpRepr, VersionPacket, VersionRepr,
};
use usbmux_core::{Duration, Instant};

/// One direction of the cable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    /// Host → phone: bulk OUT transfers (the phone takes each as exactly one packet).
    HostToDevice,
    /// Phone → host: bulk IN transfers (the host reassembles them as a byte stream).
    DeviceToHost,
}

impl Direction {
    /// Both directions, host → phone first.
    pub const BOTH: [Direction; 2] = [Direction::HostToDevice, Direction::DeviceToHost];

    /// The other direction.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::HostToDevice => Direction::DeviceToHost,
            Direction::DeviceToHost => Direction::HostToDevice,
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::HostToDevice => 0,
            Direction::DeviceToHost => 1,
        }
    }
}

/// Which packets a [`Filter`] lets through, by what they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PacketKind {
    /// Every packet, including ones that do not parse.
    #[default]
    Any,
    /// VERSION (request or reply).
    Version,
    /// SETUP.
    Setup,
    /// CONTROL.
    Control,
    /// Any TCP packet.
    Tcp,
    /// SYN without ACK (the host's connect).
    Syn,
    /// SYN|ACK (the phone's accept).
    SynAck,
    /// TCP with payload, no SYN or RST.
    Data,
    /// TCP with ACK, no payload, no SYN, RST or FIN (an ack or window update).
    PureAck,
    /// Any RST.
    Rst,
}

/// Selects packets: by kind and, optionally, by the phone-side port of their connection (the
/// service port: destination host → phone, source phone → host). A port implies TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Filter {
    /// What the packet is.
    pub kind: PacketKind,
    /// The phone-side port, if only one connection's packets count.
    pub port: Option<u16>,
}

impl Filter {
    /// Every packet.
    pub const ANY: Filter = Filter {
        kind: PacketKind::Any,
        port: None,
    };

    /// Packets of `kind`, any connection.
    pub const fn kind(kind: PacketKind) -> Filter {
        Filter { kind, port: None }
    }

    /// Packets of `kind` on the connection(s) to phone port `port`.
    pub const fn on_port(kind: PacketKind, port: u16) -> Filter {
        Filter {
            kind,
            port: Some(port),
        }
    }
}

/// When a [`Rule`] fires.
///
/// Packet triggers count only packets that match the filter **and** to which the action
/// applies (e.g. `OmitZlp` only to packets that need a ZLP, `OverrunWindow` only to data
/// packets it can push past the receiver's known edge in one packet, `SetMagic` only to v2
/// packets), so "the 3rd packet" means the 3rd one the fault can hit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// Once, on the `n`-th (0-based) such packet in `dir`.
    AtPacket {
        /// How many such packets pass untouched first.
        n: u64,
        /// Which direction's packets count.
        dir: Direction,
        /// Which packets count.
        filter: Filter,
    },
    /// Once, at `micros` (of the caller's clock): actions that need no packet
    /// ([`Action::needs_packet`] false) fire at that instant through
    /// [`FaultInjector::handle_timeout`]; others on the first such packet in `dir` pushed then or
    /// later.
    AtTime {
        /// The instant, in microseconds.
        micros: u64,
        /// Which direction (and, for `InjectRst`, which sender's connection).
        dir: Direction,
        /// Which packets count (`InjectRst`: which connection, by its port).
        filter: Filter,
    },
    /// On every such packet in `dir`, each with probability `per_million` / 1 000 000, drawn from
    /// the seeded generator.
    Always {
        /// Which direction's packets count.
        dir: Direction,
        /// Which packets count.
        filter: Filter,
        /// Probability in millionths (1 000 000: every packet).
        per_million: u32,
    },
}

impl Trigger {
    /// The direction whose packets the trigger watches.
    pub fn dir(&self) -> Direction {
        match self {
            Trigger::AtPacket { dir, .. }
            | Trigger::AtTime { dir, .. }
            | Trigger::Always { dir, .. } => *dir,
        }
    }

    fn filter(&self) -> &Filter {
        match self {
            Trigger::AtPacket { filter, .. }
            | Trigger::AtTime { filter, .. }
            | Trigger::Always { filter, .. } => filter,
        }
    }
}

/// What a [`Rule`] does. The module docs list the expected outcome of each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// The packet is lost.
    Drop,
    /// The packet arrives twice.
    Duplicate,
    /// The packet arrives after the next `after` transfers in its direction, or after
    /// `max_hold_micros` if fewer come by then.
    Reorder {
        /// Transfers that overtake it.
        after: u16,
        /// Longest hold.
        max_hold_micros: u64,
    },
    /// The mux header's total-length field is set to this value.
    SetLength(u32),
    /// The v2 header's magic is set to this value (v2 packets only).
    SetMagic(u32),
    /// The mux protocol field is set to this value.
    SetProtocol(u32),
    /// The v2 header's tx_seq is moved forward by this much (v2 packets only).
    MuxSeqOffset(u16),
    /// The TCP seq is moved forward by this much (wrapping; TCP only).
    SeqOffset(u32),
    /// The TCP ack is moved forward by this much (wrapping; TCP only): "ack beyond sent".
    AckOffset(u32),
    /// The TCP window field (256-byte units) is set to this value (TCP only).
    SetWindow(u16),
    /// The TCP flags byte is set to this value (TCP only).
    SetFlags(u8),
    /// A data packet is padded (with zeros after its payload) to end `extra` bytes past the
    /// right edge its receiver advertised: the sender overruns the window. The edge is the one
    /// in force when the packet is delivered (the receiver may have widened it meanwhile), so
    /// the padding is settled then. Applies only where the padded packet fits in 65 535 bytes.
    OverrunWindow {
        /// Bytes past the edge (at least 1 to overrun).
        extra: u32,
    },
    /// An RST with `text` as its payload is injected for a live connection, as if its sender
    /// in this direction had reset it, with that sender's next seq and last ack: right after
    /// the triggering TCP packet (its connection), or at the trigger time (the first live
    /// connection whose phone-side port matches the filter).
    InjectRst {
        /// The reason text (e.g. "amnesia").
        text: String,
    },
    /// A CONTROL packet (type byte `kind`: 3 error, 5 warning, 7 info) with `text` is injected.
    InjectControl {
        /// The type byte.
        kind: u8,
        /// The text.
        text: String,
    },
    /// A VERSION packet's major is rewritten (host → phone: the request; phone → host: the
    /// reply). "Never answers" is `Drop` of every VERSION instead.
    AnswerVersion(u32),
    /// The packet is cut into transfers of at most `max_len` bytes (packets longer than that).
    Split {
        /// Largest piece.
        max_len: u32,
    },
    /// The packet and the next `count - 1` transfers in its direction travel as one transfer
    /// (or fewer, if `max_hold_micros` passes first).
    Pack {
        /// Packets per transfer (at least 2 to pack anything).
        count: u16,
        /// Longest hold.
        max_hold_micros: u64,
    },
    /// The ZLP after the packet is left out (packets that need one): the receiver's read does
    /// not end, and the next transfer in that direction is read as part of the same one. The
    /// packet waits (indefinitely) for that next transfer, as on a real bus.
    OmitZlp,
    /// The cable is pulled: the first half of the triggering packet (if any) still arrives, then
    /// [`Output::Unplug`]; nothing is delivered afterwards.
    Unplug,
    /// The receiver in this direction stops reading for `micros`: everything in this direction
    /// (this packet included) is held until then, in order.
    StopReading {
        /// How long.
        micros: u64,
    },
    /// From now on this direction carries `bytes_per_sec` (0: unlimited again); transfers queue
    /// behind each other.
    SlowLink {
        /// Link rate.
        bytes_per_sec: u64,
    },
}

impl Action {
    /// False for actions that can fire on their own at a [`Trigger::AtTime`] instant, without a
    /// packet to act on: `Unplug`, `StopReading`, `SlowLink`, `InjectRst`, `InjectControl`.
    pub fn needs_packet(&self) -> bool {
        !matches!(
            self,
            Action::Unplug
                | Action::StopReading { .. }
                | Action::SlowLink { .. }
                | Action::InjectRst { .. }
                | Action::InjectControl { .. }
        )
    }
}

/// One fault: when, and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// When it fires.
    pub when: Trigger,
    /// What it does.
    pub action: Action,
}

impl Rule {
    /// Fires once, on the `n`-th (0-based) packet in `dir` matching `filter` that `action`
    /// applies to.
    pub fn at_packet(n: u64, dir: Direction, filter: Filter, action: Action) -> Rule {
        Rule {
            when: Trigger::AtPacket { n, dir, filter },
            action,
        }
    }

    /// Fires once at `micros` (or on the first matching packet then or later).
    pub fn at_time(micros: u64, dir: Direction, filter: Filter, action: Action) -> Rule {
        Rule {
            when: Trigger::AtTime {
                micros,
                dir,
                filter,
            },
            action,
        }
    }

    /// Fires on every matching packet with probability `per_million` / 1 000 000.
    pub fn always(dir: Direction, filter: Filter, per_million: u32, action: Action) -> Rule {
        Rule {
            when: Trigger::Always {
                dir,
                filter,
                per_million,
            },
            action,
        }
    }
}

/// A fault scenario for one phone: a seed and rules. Serialise it with [`Faults::to_bytes`] to
/// save a failing run; [`Faults::from_bytes`] replays it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Seed of the xorshift generator behind [`Trigger::Always`] probabilities.
    pub seed: u64,
    /// The rules, checked in order.
    pub rules: Vec<Rule>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// A scenario with one rule.
    pub fn one(rule: Rule) -> Faults {
        Faults {
            seed: 1,
            rules: vec![rule],
        }
    }

    /// Adds a rule.
    pub fn with(mut self, rule: Rule) -> Faults {
        self.rules.push(rule);
        self
    }

    /// The postcard encoding.
    pub fn to_bytes(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// Decodes a postcard encoding made by [`Faults::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Faults, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// Something the receiving side must be given, from [`FaultInjector::poll_output`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// One transfer for the receiver of `dir` (`Session::handle_transfer` / the phone's), then a
    /// zero-length transfer if `zlp`.
    Transfer {
        /// The direction it travels.
        dir: Direction,
        /// The transfer's bytes.
        bytes: Vec<u8>,
        /// A ZLP follows it.
        zlp: bool,
    },
    /// The cable was pulled: call `handle_disconnect` on the host and drop the phone. Nothing
    /// is delivered after this.
    Unplug,
}

/// A rule that fired, for logs and for asserting that a scenario really hit its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fired {
    /// Index of the rule in [`Faults::rules`].
    pub rule: usize,
    /// When.
    pub at: Instant,
    /// The direction.
    pub dir: Direction,
    /// The triggering packet's index among the packets pushed in `dir` (0-based), or `None` for
    /// a time-triggered action without a packet.
    pub packet: Option<u64>,
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Packets pushed.
    pub packets_in: u64,
    /// Transfers handed out.
    pub transfers_out: u64,
    /// Packets dropped (by `Drop`, or pushed after an unplug).
    pub dropped: u64,
    /// Packets injected (`InjectRst`, `InjectControl`) and extra copies (`Duplicate`).
    pub injected: u64,
}

/// The sender-side facts of one direction of one TCP connection.
#[derive(Clone, Copy, Debug, Default)]
struct SideTrack {
    /// The sender's next sequence number.
    next_seq: u32,
    /// The sender's last ack.
    ack: u32,
    /// The right edge the sender last advertised (ack + window): where its peer must stop.
    edge: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default)]
struct ConnTrack {
    side: [SideTrack; 2],
    live: bool,
}

/// What a packet is, as far as the filters and mutations care.
#[derive(Clone, Copy, Debug, Default)]
struct Info {
    /// The header form it parsed with; `None`: it did not parse.
    kind: Option<HeaderKind>,
    protocol: Option<Protocol>,
    version_major: Option<u32>,
    tcp: Option<TcpInfo>,
    tx_seq: Option<(u16, u16)>,
}

#[derive(Clone, Copy, Debug)]
struct TcpInfo {
    src: u16,
    dst: u16,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    window: u16,
    payload_len: usize,
}

impl Info {
    fn parse(bytes: &[u8], lane_kind: HeaderKind) -> Info {
        let Some(&[a, b, c, d]) = bytes.get(0..4) else {
            return Info::default();
        };
        let protocol = Protocol::from(u32::from_be_bytes([a, b, c, d]));
        let kind = if protocol == Protocol::Version {
            muxw::detect_kind(bytes)
        } else {
            lane_kind
        };
        let Ok(packet) = MuxPacket::new_checked(bytes, kind) else {
            return Info::default();
        };
        let Ok(repr) = MuxRepr::parse(&packet) else {
            return Info::default();
        };
        let mut info = Info {
            kind: Some(kind),
            protocol: Some(protocol),
            tx_seq: repr.seq.map(|s| (s.tx, s.rx)),
            ..Info::default()
        };
        let payload = packet.payload();
        match protocol {
            Protocol::Version => {
                if let Ok(v) = VersionPacket::new_checked(payload).and_then(|p| {
                    let r = VersionRepr::parse(&p)?;
                    Ok(r)
                }) {
                    info.version_major = Some(v.major);
                }
            }
            Protocol::Tcp => {
                if let Ok(tp) = TcpPacket::new_checked(payload) {
                    if let Ok(seg) = TcpRepr::parse(&tp) {
                        info.tcp = Some(TcpInfo {
                            src: seg.src_port,
                            dst: seg.dst_port,
                            seq: seg.seq,
                            ack: seg.ack,
                            flags: seg.flags,
                            window: seg.window,
                            payload_len: seg.payload.len(),
                        });
                    }
                }
            }
            _ => {}
        }
        info
    }

    /// (host port, phone port) of a TCP packet travelling in `dir`.
    fn conn_key(&self, dir: Direction) -> Option<(u16, u16)> {
        self.tcp.map(|t| match dir {
            Direction::HostToDevice => (t.src, t.dst),
            Direction::DeviceToHost => (t.dst, t.src),
        })
    }

    fn matches(&self, dir: Direction, filter: &Filter) -> bool {
        if let Some(port) = filter.port {
            match self.conn_key(dir) {
                Some((_, p)) if p == port => {}
                _ => return false,
            }
        }
        let syn = TcpFlags::SYN;
        let ack = TcpFlags::ACK;
        match filter.kind {
            PacketKind::Any => true,
            PacketKind::Version => self.protocol == Some(Protocol::Version),
            PacketKind::Setup => self.protocol == Some(Protocol::Setup),
            PacketKind::Control => self.protocol == Some(Protocol::Control),
            PacketKind::Tcp => self.tcp.is_some(),
            PacketKind::Syn => self
                .tcp
                .is_some_and(|t| t.flags.contains(syn) && !t.flags.contains(ack)),
            PacketKind::SynAck => self
                .tcp
                .is_some_and(|t| t.flags.contains(syn) && t.flags.contains(ack)),
            PacketKind::Data => self.tcp.is_some_and(|t| {
                t.payload_len > 0 && !t.flags.intersects(syn.union(TcpFlags::RST))
            }),
            PacketKind::PureAck => self.tcp.is_some_and(|t| {
                t.payload_len == 0
                    && t.flags.contains(ack)
                    && !t
                        .flags
                        .intersects(syn.union(TcpFlags::RST).union(TcpFlags::FIN))
            }),
            PacketKind::Rst => self.tcp.is_some_and(|t| t.flags.contains(TcpFlags::RST)),
        }
    }
}

/// xorshift64*: small, seedable, and the same everywhere.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn chance(&mut self, per_million: u32) -> bool {
        per_million >= 1_000_000 || (self.next() % 1_000_000) < u64::from(per_million)
    }
}

#[derive(Clone, Debug)]
struct Item {
    at: Instant,
    bytes: Vec<u8>,
    zlp: bool,
    /// `OverrunWindow { extra }` to re-apply at delivery, against the receiver's edge then.
    overrun: Option<u32>,
}

#[derive(Clone, Debug)]
struct Held {
    bytes: Vec<u8>,
    zlp: bool,
    remaining: u16,
    deadline: Instant,
}

#[derive(Clone, Debug)]
struct Lane {
    /// The header form the sender in this direction uses.
    kind: HeaderKind,
    /// The sender's last v2 counters (tx, rx), for injected packets.
    last_seq: Option<(u16, u16)>,
    queue: VecDeque<Item>,
    held: Vec<Held>,
    pack: Option<Held>,
    merge: Option<Vec<u8>>,
    stop_until: Option<Instant>,
    rate: Option<u64>,
    busy_until: Instant,
    stats: LaneStats,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            kind: HeaderKind::V1,
            last_seq: None,
            queue: VecDeque::new(),
            held: Vec::new(),
            pack: None,
            merge: None,
            stop_until: None,
            rate: None,
            busy_until: Instant::ZERO,
            stats: LaneStats::default(),
        }
    }

    /// Queues a transfer in order, after everything queued, behind any stop and the link rate.
    fn queue_raw(&mut self, now: Instant, bytes: Vec<u8>, zlp: bool) {
        self.queue_item(now, bytes, zlp, None);
    }

    fn queue_item(&mut self, now: Instant, bytes: Vec<u8>, zlp: bool, overrun: Option<u32>) {
        let mut at = now;
        if let Some(last) = self.queue.back() {
            at = at.max(last.at);
        }
        if let Some(s) = self.stop_until {
            at = at.max(s);
        }
        if let Some(rate) = self.rate {
            at = at.max(self.busy_until);
            let micros = (bytes.len() as u64)
                .saturating_mul(1_000_000)
                .div_ceil(rate.max(1));
            at += Duration::from_micros(micros);
            self.busy_until = at;
        }
        self.queue.push_back(Item {
            at,
            bytes,
            zlp,
            overrun,
        });
    }

    /// Sends one transfer on its way: through a pending ZLP merge or pack, then the queue; it
    /// counts as a later transfer for packets being reordered.
    fn submit(&mut self, now: Instant, bytes: Vec<u8>, zlp: bool) {
        self.submit_item(now, bytes, zlp, None);
    }

    fn submit_item(&mut self, now: Instant, bytes: Vec<u8>, zlp: bool, overrun: Option<u32>) {
        let (mut bytes, mut zlp, mut overrun) = (bytes, zlp, overrun);
        if let Some(mut head) = self.merge.take() {
            head.extend_from_slice(&bytes);
            bytes = head;
            overrun = None;
        }
        if let Some(mut p) = self.pack.take() {
            p.bytes.extend_from_slice(&bytes);
            p.zlp = zlp;
            p.remaining = p.remaining.saturating_sub(1);
            if p.remaining > 0 {
                self.pack = Some(p);
                return;
            }
            bytes = p.bytes;
            zlp = p.zlp;
            overrun = None;
        }
        self.queue_item(now, bytes, zlp, overrun);
        let mut k = 0;
        while k < self.held.len() {
            let h = &mut self.held[k];
            h.remaining = h.remaining.saturating_sub(1);
            if h.remaining == 0 {
                let h = self.held.remove(k);
                self.queue_raw(now, h.bytes, h.zlp);
            } else {
                k += 1;
            }
        }
    }

    /// Releases holds whose time is up.
    fn expire(&mut self, now: Instant) {
        let mut k = 0;
        while k < self.held.len() {
            if self.held[k].deadline <= now {
                let h = self.held.remove(k);
                self.queue_raw(now, h.bytes, h.zlp);
            } else {
                k += 1;
            }
        }
        if self.pack.as_ref().is_some_and(|p| p.deadline <= now) {
            if let Some(p) = self.pack.take() {
                self.queue_raw(now, p.bytes, p.zlp);
            }
        }
    }

    fn pending(&self) -> usize {
        self.queue.len()
            + self.held.len()
            + usize::from(self.pack.is_some())
            + usize::from(self.merge.is_some())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let holds = self.held.iter().map(|h| h.deadline);
        let pack = self.pack.iter().map(|p| p.deadline);
        let front = self.queue.front().map(|i| i.at);
        holds.chain(pack).chain(front).min()
    }

    fn stop(&mut self, until: Instant) {
        let until = self.stop_until.map_or(until, |s| s.max(until));
        self.stop_until = Some(until);
        for item in self.queue.iter_mut() {
            item.at = item.at.max(until);
        }
    }
}

#[derive(Clone, Debug, Default)]
struct RuleState {
    count: u64,
    done: bool,
}

/// Applies a [`Faults`] scenario to the transfers of one phone, both directions. See the module
/// docs for the calling contract and the expected outcome of each fault.
#[derive(Clone, Debug)]
pub struct FaultInjector {
    faults: Faults,
    state: Vec<RuleState>,
    rng: Rng,
    usb_packet_size: u16,
    lanes: [Lane; 2],
    conns: BTreeMap<(u16, u16), ConnTrack>,
    unplug_at: Option<Instant>,
    unplugged: bool,
    fired: Vec<Fired>,
}

/// How the packet in hand travels, decided by the first routing rule that fires.
#[derive(Clone, Copy, Debug)]
enum Route {
    Normal,
    Drop,
    Duplicate,
    Reorder { after: u16, max_hold: u64 },
    Split { max_len: usize },
    Pack { count: u16, max_hold: u64 },
    OmitZlp,
    Unplug,
}

impl FaultInjector {
    /// An injector for a link whose bulk endpoints have `usb_packet_size` (wMaxPacketSize: 64,
    /// 512 or 1024), which decides which transfers need a ZLP.
    pub fn new(faults: Faults, usb_packet_size: u16) -> FaultInjector {
        let state = vec![RuleState::default(); faults.rules.len()];
        let rng = Rng::new(faults.seed);
        FaultInjector {
            faults,
            state,
            rng,
            usb_packet_size,
            lanes: [Lane::new(), Lane::new()],
            conns: BTreeMap::new(),
            unplug_at: None,
            unplugged: false,
            fired: Vec::new(),
        }
    }

    /// The scenario.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Every rule firing so far, oldest first.
    pub fn fired(&self) -> &[Fired] {
        &self.fired
    }

    /// How many times rule `rule` fired.
    pub fn fire_count(&self, rule: usize) -> usize {
        self.fired.iter().filter(|f| f.rule == rule).count()
    }

    /// Counters of one direction.
    pub fn stats(&self, dir: Direction) -> LaneStats {
        self.lanes[dir.index()].stats
    }

    /// Transfers queued or held back in either direction (a packet waiting for its ZLP-less
    /// successor counts too). Zero: everything pushed was delivered or dropped.
    pub fn pending(&self) -> usize {
        self.lanes.iter().map(Lane::pending).sum::<usize>() + usize::from(self.unplug_at.is_some())
    }

    /// True once the cable was pulled (an `Unplug` fired).
    pub fn is_unplugged(&self) -> bool {
        self.unplugged
    }

    /// One mux packet leaving the sender of `dir` at `now` as one transfer (then a ZLP if
    /// `zlp`). What the receiver gets comes out of [`Self::poll_output`].
    pub fn push(&mut self, now: Instant, dir: Direction, packet: &[u8], zlp: bool) {
        let d = dir.index();
        self.lanes[d].stats.packets_in += 1;
        let index = self.lanes[d].stats.packets_in - 1;
        self.handle_timeout(now);
        if self.unplugged {
            self.lanes[d].stats.dropped += 1;
            return;
        }
        let info = Info::parse(packet, self.lanes[d].kind);
        if info.tx_seq.is_some() {
            self.lanes[d].last_seq = info.tx_seq;
        }
        // The phone's own header form follows from the reply it sends (before any rewrite).
        if dir == Direction::DeviceToHost {
            if let Some(major) = info.version_major {
                self.lanes[d].kind = if major == 2 {
                    HeaderKind::V2
                } else {
                    HeaderKind::V1
                };
            }
        }
        self.track(dir, &info);

        // Which rules fire on this packet.
        let mut firing = Vec::new();
        for (i, rule) in self.faults.rules.iter().enumerate() {
            let st = &mut self.state[i];
            if st.done || rule.when.dir() != dir {
                continue;
            }
            if !info.matches(dir, rule.when.filter())
                || !applies(&rule.action, &info, dir, &self.conns, packet.len(), zlp)
            {
                continue;
            }
            let fire = match &rule.when {
                Trigger::AtPacket { n, .. } => {
                    let hit = st.count == *n;
                    st.count += 1;
                    if hit {
                        st.done = true;
                    }
                    hit
                }
                Trigger::AtTime { micros, .. } => {
                    let hit = now.total_micros() >= *micros;
                    if hit {
                        st.done = true;
                    }
                    hit
                }
                Trigger::Always { per_million, .. } => {
                    st.count += 1;
                    self.rng.chance(*per_million)
                }
            };
            if fire {
                firing.push(i);
            }
        }

        let mut bytes = packet.to_vec();
        let mut zlp = zlp;
        let mut route = Route::Normal;
        let mut overrun = None;
        let mut after: Vec<Vec<u8>> = Vec::new();
        for &i in &firing {
            self.fired.push(Fired {
                rule: i,
                at: now,
                dir,
                packet: Some(index),
            });
            let action = self.faults.rules[i].action.clone();
            let routing = |r: Route| {
                if matches!(route, Route::Normal) {
                    r
                } else {
                    route
                }
            };
            match action {
                Action::Drop => route = routing(Route::Drop),
                Action::Duplicate => route = routing(Route::Duplicate),
                Action::Reorder {
                    after,
                    max_hold_micros,
                } => {
                    route = routing(Route::Reorder {
                        after,
                        max_hold: max_hold_micros,
                    })
                }
                Action::Split { max_len } => {
                    route = routing(Route::Split {
                        max_len: usize::try_from(max_len).unwrap_or(usize::MAX).max(1),
                    })
                }
                Action::Pack {
                    count,
                    max_hold_micros,
                } => {
                    route = routing(Route::Pack {
                        count,
                        max_hold: max_hold_micros,
                    })
                }
                Action::OmitZlp => route = routing(Route::OmitZlp),
                Action::Unplug => route = routing(Route::Unplug),
                Action::StopReading { micros } => {
                    self.lanes[d].stop(now + Duration::from_micros(micros));
                }
                Action::SlowLink { bytes_per_sec } => {
                    let lane = &mut self.lanes[d];
                    lane.rate = (bytes_per_sec > 0).then_some(bytes_per_sec);
                    lane.busy_until = lane.busy_until.max(now);
                }
                Action::InjectRst { text } => {
                    if let Some(key) = info.conn_key(dir) {
                        if let Some(p) = self.craft_rst(dir, key, text.as_bytes()) {
                            after.push(p);
                        }
                    }
                }
                Action::InjectControl { kind, text } => {
                    after.push(self.craft_control(dir, kind, text.as_bytes()));
                }
                mutation => {
                    if let Action::OverrunWindow { extra } = mutation {
                        overrun = Some(extra);
                    }
                    let len = self.mutate(&mut bytes, &info, dir, &mutation);
                    if let Some(len) = len {
                        zlp = needs_zlp(len, self.usb_packet_size);
                    }
                }
            }
        }

        // The host's header form follows from the reply it receives (after any rewrite).
        if dir == Direction::DeviceToHost && !matches!(route, Route::Drop) {
            if let Some(major) = Info::parse(&bytes, HeaderKind::V1).version_major {
                self.lanes[Direction::HostToDevice.index()].kind = if major == 2 {
                    HeaderKind::V2
                } else {
                    HeaderKind::V1
                };
            }
        }

        let mps = self.usb_packet_size;
        let lane = &mut self.lanes[d];
        match route {
            Route::Normal => lane.submit_item(now, bytes, zlp, overrun),
            Route::Drop => lane.stats.dropped += 1,
            Route::Duplicate => {
                lane.submit(now, bytes.clone(), zlp);
                lane.submit(now, bytes, zlp);
                lane.stats.injected += 1;
            }
            Route::Reorder { after, max_hold } => {
                if after == 0 {
                    lane.submit(now, bytes, zlp);
                } else {
                    lane.held.push(Held {
                        bytes,
                        zlp,
                        remaining: after,
                        deadline: now + Duration::from_micros(max_hold),
                    });
                }
            }
            Route::Split { max_len } => {
                for piece in bytes.chunks(max_len) {
                    lane.submit(now, piece.to_vec(), needs_zlp(piece.len(), mps));
                }
            }
            Route::Pack { count, max_hold } => {
                if count <= 1 {
                    lane.submit(now, bytes, zlp);
                } else {
                    if let Some(p) = lane.pack.take() {
                        lane.queue_raw(now, p.bytes, p.zlp);
                    }
                    lane.pack = Some(Held {
                        bytes,
                        zlp,
                        remaining: count - 1,
                        deadline: now + Duration::from_micros(max_hold),
                    });
                }
            }
            Route::OmitZlp => match lane.merge.as_mut() {
                Some(head) => head.extend_from_slice(&bytes),
                None => lane.merge = Some(bytes),
            },
            Route::Unplug => {
                let half = bytes.len() / 2;
                if half > 0 {
                    let piece = bytes[..half].to_vec();
                    lane.queue_raw(now, piece, false);
                }
                let at = lane.queue.back().map_or(now, |i| i.at.max(now));
                self.unplug(at);
                return;
            }
        }
        for p in after {
            let z = needs_zlp(p.len(), mps);
            let lane = &mut self.lanes[d];
            lane.stats.injected += 1;
            lane.submit(now, p, z);
        }
    }

    /// Fires time-triggered rules due at `now` and releases holds whose time is up. Calling it
    /// early is harmless; [`Self::push`] and [`Self::poll_output`] call it too.
    pub fn handle_timeout(&mut self, now: Instant) {
        for lane in self.lanes.iter_mut() {
            lane.expire(now);
        }
        if self.unplugged {
            return;
        }
        for i in 0..self.faults.rules.len() {
            let rule = &self.faults.rules[i];
            let Trigger::AtTime {
                micros,
                dir,
                filter,
            } = rule.when
            else {
                continue;
            };
            if self.state[i].done || rule.action.needs_packet() || now.total_micros() < micros {
                continue;
            }
            self.state[i].done = true;
            self.fired.push(Fired {
                rule: i,
                at: now,
                dir,
                packet: None,
            });
            let d = dir.index();
            let mps = self.usb_packet_size;
            match rule.action.clone() {
                Action::Unplug => self.unplug(now),
                Action::StopReading { micros } => {
                    self.lanes[d].stop(now + Duration::from_micros(micros));
                }
                Action::SlowLink { bytes_per_sec } => {
                    let lane = &mut self.lanes[d];
                    lane.rate = (bytes_per_sec > 0).then_some(bytes_per_sec);
                    lane.busy_until = lane.busy_until.max(now);
                }
                Action::InjectRst { text } => {
                    let key = self
                        .conns
                        .iter()
                        .find(|(k, c)| c.live && filter.port.is_none_or(|p| p == k.1))
                        .map(|(k, _)| *k);
                    if let Some(p) = key.and_then(|k| self.craft_rst(dir, k, text.as_bytes())) {
                        let lane = &mut self.lanes[d];
                        lane.stats.injected += 1;
                        let z = needs_zlp(p.len(), mps);
                        lane.submit(now, p, z);
                    }
                }
                Action::InjectControl { kind, text } => {
                    let p = self.craft_control(dir, kind, text.as_bytes());
                    let lane = &mut self.lanes[d];
                    lane.stats.injected += 1;
                    let z = needs_zlp(p.len(), mps);
                    lane.submit(now, p, z);
                }
                _ => {}
            }
        }
    }

    /// When something is next due (a transfer's release, a hold's end, a time-triggered rule),
    /// or `None`.
    pub fn poll_at(&self) -> Option<Instant> {
        if self.unplugged && self.unplug_at.is_none() {
            return None;
        }
        let lanes = self.lanes.iter().filter_map(Lane::next_deadline);
        let rules = self
            .faults
            .rules
            .iter()
            .zip(&self.state)
            .filter_map(|(r, st)| match r.when {
                Trigger::AtTime { micros, .. } if !st.done && !r.action.needs_packet() => {
                    Some(Instant::from_micros(micros))
                }
                _ => None,
            });
        lanes.chain(rules).chain(self.unplug_at).min()
    }

    /// The next thing due by `now` for either receiver, in order (each direction stays in
    /// order; across directions, by due time). `None`: nothing due yet.
    pub fn poll_output(&mut self, now: Instant) -> Option<Output> {
        self.handle_timeout(now);
        let due = (0..2)
            .filter_map(|d| {
                self.lanes[d]
                    .queue
                    .front()
                    .filter(|i| i.at <= now)
                    .map(|i| (i.at, d))
            })
            .min();
        if let Some(u) = self.unplug_at.filter(|u| *u <= now) {
            if due.is_none_or(|(at, _)| at > u) {
                self.unplug_at = None;
                for lane in self.lanes.iter_mut() {
                    lane.queue.clear();
                    lane.held.clear();
                    lane.pack = None;
                    lane.merge = None;
                }
                return Some(Output::Unplug);
            }
        }
        let (_, d) = due?;
        let mut item = self.lanes[d].queue.pop_front()?;
        self.lanes[d].stats.transfers_out += 1;
        let dir = if d == 0 {
            Direction::HostToDevice
        } else {
            Direction::DeviceToHost
        };
        if let Some(extra) = item.overrun {
            // The receiver may have advertised a larger edge since the push (its edge only
            // moves when it sends, and the tracking follows every packet it sent): pad again.
            let info = Info::parse(&item.bytes, self.lanes[d].kind);
            let action = Action::OverrunWindow { extra };
            if let Some(len) = self.mutate(&mut item.bytes, &info, dir, &action) {
                item.zlp = needs_zlp(len, self.usb_packet_size);
            }
        }
        Some(Output::Transfer {
            dir,
            bytes: item.bytes,
            zlp: item.zlp,
        })
    }

    fn unplug(&mut self, at: Instant) {
        if !self.unplugged {
            self.unplugged = true;
            self.unplug_at = Some(at);
        }
    }

    /// Follows a TCP connection's sequence numbers and edges from an (original) packet.
    fn track(&mut self, dir: Direction, info: &Info) {
        let (Some(t), Some(key)) = (info.tcp, info.conn_key(dir)) else {
            return;
        };
        let flags = t.flags;
        if dir == Direction::HostToDevice
            && flags.contains(TcpFlags::SYN)
            && !flags.contains(TcpFlags::ACK)
        {
            self.conns.insert(
                key,
                ConnTrack {
                    live: true,
                    ..ConnTrack::default()
                },
            );
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let side = &mut c.side[dir.index()];
        let extra = u32::from(flags.intersects(TcpFlags::SYN.union(TcpFlags::FIN)));
        side.next_seq = t.seq.wrapping_add(t.payload_len as u32).wrapping_add(extra);
        if flags.contains(TcpFlags::ACK) {
            side.ack = t.ack;
            side.edge = Some(t.ack.wrapping_add(u32::from(t.window) << 8));
        }
        if flags.intersects(TcpFlags::RST.union(TcpFlags::FIN)) {
            c.live = false;
        }
    }

    /// A v1 or v2 mux header for a packet injected into `dir`.
    fn header(&self, dir: Direction, protocol: Protocol, payload_len: usize) -> MuxRepr {
        let lane = &self.lanes[dir.index()];
        let seq = match lane.kind {
            HeaderKind::V1 => None,
            HeaderKind::V2 => {
                let (tx, rx) = lane.last_seq.unwrap_or((0, 0xFFFF));
                Some(MuxSeq {
                    tx: tx.wrapping_add(1),
                    rx,
                })
            }
        };
        MuxRepr {
            protocol,
            payload_len,
            seq,
        }
    }

    fn craft_rst(&self, dir: Direction, key: (u16, u16), text: &[u8]) -> Option<Vec<u8>> {
        let c = self.conns.get(&key)?;
        if !c.live {
            return None;
        }
        let side = c.side[dir.index()];
        let (src, dst) = match dir {
            Direction::HostToDevice => (key.0, key.1),
            Direction::DeviceToHost => (key.1, key.0),
        };
        let room = muxw::MAX_PACKET_LEN - muxw::V2_HEADER_LEN - wire::tcp::HEADER_LEN;
        let seg = TcpRepr {
            src_port: src,
            dst_port: dst,
            seq: side.next_seq,
            ack: side.ack,
            flags: TcpFlags::RST,
            window: 0,
            payload: &text[..text.len().min(room)],
        };
        let mux = self.header(dir, Protocol::Tcp, seg.buffer_len());
        let mut buf = vec![0u8; mux.buffer_len()];
        let hl = mux.header_len();
        mux.emit(&mut MuxPacket::new_unchecked(&mut buf[..], mux.kind()));
        seg.emit(&mut TcpPacket::new_unchecked(&mut buf[hl..]));
        Some(buf)
    }

    fn craft_control(&self, dir: Direction, kind: u8, text: &[u8]) -> Vec<u8> {
        let room = muxw::MAX_PACKET_LEN - muxw::V2_HEADER_LEN - 1;
        let repr = ControlRepr {
            kind: ControlType::from(kind),
            text: &text[..text.len().min(room)],
        };
        let mux = self.header(dir, Protocol::Control, repr.buffer_len());
        let mut buf = vec![0u8; mux.buffer_len()];
        let hl = mux.header_len();
        mux.emit(&mut MuxPacket::new_unchecked(&mut buf[..], mux.kind()));
        repr.emit(&mut ControlPacket::new_unchecked(&mut buf[hl..]));
        buf
    }

    /// Applies a field rewrite through checked views; returns the packet's new length if it
    /// changed. A rewrite that no longer applies (an earlier one broke the packet) is skipped.
    fn mutate(
        &self,
        bytes: &mut Vec<u8>,
        info: &Info,
        dir: Direction,
        action: &Action,
    ) -> Option<usize> {
        let kind = info.kind?;
        let hl = kind.header_len();
        match *action {
            Action::SetLength(v) => {
                // The first 8 bytes are common to both forms: a v1 view reaches the field.
                let mut p = MuxPacket::new_checked(&mut bytes[..], HeaderKind::V1).ok()?;
                p.set_total_len(v);
                None
            }
            Action::SetProtocol(v) => {
                let mut p = MuxPacket::new_checked(&mut bytes[..], HeaderKind::V1).ok()?;
                p.set_protocol(Protocol::from(v));
                None
            }
            Action::SetMagic(v) => {
                let mut p = MuxPacket::new_checked(&mut bytes[..], HeaderKind::V2).ok()?;
                p.set_magic(v);
                None
            }
            Action::MuxSeqOffset(k) => {
                let mut p = MuxPacket::new_checked(&mut bytes[..], HeaderKind::V2).ok()?;
                let tx = p.tx_seq();
                p.set_tx_seq(tx.wrapping_add(k));
                None
            }
            Action::AnswerVersion(major) => {
                let p = MuxPacket::new_checked(&bytes[..], kind).ok()?;
                let end = usize::try_from(p.total_len()).ok()?;
                let body = bytes.get_mut(hl..end)?;
                let mut v = VersionPacket::new_checked(body).ok()?;
                v.set_major(major);
                None
            }
            Action::SeqOffset(_)
            | Action::AckOffset(_)
            | Action::SetWindow(_)
            | Action::SetFlags(_) => {
                let p = MuxPacket::new_checked(&bytes[..], kind).ok()?;
                let end = usize::try_from(p.total_len()).ok()?;
                let mut t = TcpPacket::new_checked(bytes.get_mut(hl..end)?).ok()?;
                match *action {
                    Action::SeqOffset(k) => {
                        let s = t.seq_number();
                        t.set_seq_number(s.wrapping_add(k));
                    }
                    Action::AckOffset(k) => {
                        let a = t.ack_number();
                        t.set_ack_number(a.wrapping_add(k));
                    }
                    Action::SetWindow(w) => t.set_window_len(w),
                    Action::SetFlags(f) => t.set_flags(TcpFlags::from_bits(f)),
                    _ => {}
                }
                None
            }
            Action::OverrunWindow { extra } => {
                let new_len = overrun_len(info, dir, &self.conns, extra)?;
                let t = info.tcp?;
                let total = hl + wire::tcp::HEADER_LEN + new_len;
                // Only a consistent packet is padded, and only ever made longer.
                if bytes.len() != hl + wire::tcp::HEADER_LEN + t.payload_len
                    || new_len == t.payload_len
                {
                    return None;
                }
                bytes.resize(total, 0);
                let mut p = MuxPacket::new_checked(&mut bytes[..], kind).ok()?;
                p.set_total_len(u32::try_from(total).ok()?);
                Some(total)
            }
            _ => None,
        }
    }
}

/// The payload length that makes a data packet end `extra` bytes past its receiver's edge, if
/// that fits in one packet.
fn overrun_len(
    info: &Info,
    dir: Direction,
    conns: &BTreeMap<(u16, u16), ConnTrack>,
    extra: u32,
) -> Option<usize> {
    let t = info.tcp?;
    if t.payload_len == 0 || t.flags.intersects(TcpFlags::SYN.union(TcpFlags::RST)) {
        return None;
    }
    let hl = info.kind?.header_len();
    let c = conns.get(&info.conn_key(dir)?)?;
    let edge = c.side[dir.reverse().index()].edge?;
    let to_edge = i64::from(edge.wrapping_sub(t.seq) as i32);
    let len = to_edge + i64::from(extra);
    let len = usize::try_from(len).ok()?;
    let max = muxw::MAX_PACKET_LEN - hl - wire::tcp::HEADER_LEN;
    (len >= t.payload_len && len <= max).then_some(len)
}

/// Whether `action` can do anything to this packet (rules count only such packets).
fn applies(
    action: &Action,
    info: &Info,
    dir: Direction,
    conns: &BTreeMap<(u16, u16), ConnTrack>,
    len: usize,
    zlp: bool,
) -> bool {
    match action {
        Action::SetLength(_) | Action::SetProtocol(_) => info.kind.is_some(),
        Action::SetMagic(_) | Action::MuxSeqOffset(_) => info.kind == Some(HeaderKind::V2),
        Action::SeqOffset(_)
        | Action::AckOffset(_)
        | Action::SetWindow(_)
        | Action::SetFlags(_) => info.tcp.is_some(),
        Action::OverrunWindow { extra } => overrun_len(info, dir, conns, *extra).is_some(),
        Action::InjectRst { .. } => info
            .conn_key(dir)
            .and_then(|k| conns.get(&k))
            .is_some_and(|c| c.live),
        Action::AnswerVersion(_) => info.version_major.is_some(),
        Action::OmitZlp => zlp,
        Action::Split { max_len } => usize::try_from(*max_len).is_ok_and(|m| len > m.max(1)),
        Action::Drop
        | Action::Duplicate
        | Action::Reorder { .. }
        | Action::Pack { .. }
        | Action::Unplug
        | Action::StopReading { .. }
        | Action::SlowLink { .. }
        | Action::InjectControl { .. } => true,
    }
}
