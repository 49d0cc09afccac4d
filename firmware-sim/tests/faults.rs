//! The fault matrix: every fault of `usbmux_sim::faults` in both directions, against a host
//! `Session` and a simulated `Phone`, with the outcome documented in `faults.rs` asserted.
//!
//! Each scenario runs two phones in lockstep on one simulated clock, each with its own host
//! session and its own `FaultInjector`: phone 0 gets the faults, phone 1 none — it must finish
//! byte-exact whatever happens to phone 0. On each phone the host opens an echo connection
//! (port 7, 64 KiB sent in 4060-byte writes, so that full packets are 4096 bytes and need a ZLP) and a source connection (port 19, 256 KiB read); the
//! fault targets one of them, and the other must carry on byte-exact. Every byte the host
//! received, even on a connection that was then reset, must be a prefix of what was sent: no
//! fault may corrupt data silently (except where documented: a plausible-but-wrong length).
#![allow(clippy::too_many_lines)]

use usbmux_core::mux::{ControlMessage, Phase, SessionStats};
use usbmux_core::usb::ReassemblyStats;
use usbmux_core::wire::ControlType;
use usbmux_core::{
    Buffers, ConnId, Duration, Event, Host, Instant, ResetKind, ResetReason, Session, SessionConfig,
};
use usbmux_sim::faults::{
    Action, Direction, FaultInjector, Faults, Filter, Output, PacketKind, Rule, Trigger,
};
use usbmux_sim::service::{source_byte, DISCARD, ECHO, SOURCE};
use usbmux_sim::{Phone, PhoneConfig};

use Direction::{DeviceToHost as D2H, HostToDevice as H2D};

type HostSession = Session<Host, Vec<u8>, 16>;

/// Simulated time after which a run gives up (a stall).
const TIME_LIMIT: Duration = Duration::from_secs(120);
const ECHO_LEN: usize = 64 * 1024;
const SOURCE_LEN: usize = 256 * 1024;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Work {
    /// Send these bytes, expect them back.
    Echo(Vec<u8>),
    /// Read this many bytes of the source pattern.
    Source(usize),
    /// Send these bytes to the discard service; `got` follows what the phone received (the
    /// service drops the bytes, so only their count is checked).
    Discard(Vec<u8>),
}

#[derive(Clone, Debug)]
struct FlowSpec {
    port: u16,
    work: Work,
    rx: usize,
    tx: usize,
    chunk: usize,
}

impl FlowSpec {
    fn echo() -> FlowSpec {
        FlowSpec {
            port: ECHO,
            work: Work::Echo(pattern(ECHO_LEN, 7)),
            rx: 128 * 1024,
            tx: 128 * 1024,
            // 4060 + 36 header bytes = 4096: every full write is a packet that needs a ZLP.
            chunk: 4060,
        }
    }

    fn discard() -> FlowSpec {
        FlowSpec {
            port: DISCARD,
            work: Work::Discard(pattern(ECHO_LEN, 9)),
            rx: 4096,
            tx: 128 * 1024,
            chunk: 4060,
        }
    }

    fn source() -> FlowSpec {
        FlowSpec {
            port: SOURCE,
            work: Work::Source(SOURCE_LEN),
            rx: 128 * 1024,
            tx: 4096,
            chunk: 0,
        }
    }

    fn expected(&self) -> Vec<u8> {
        match &self.work {
            Work::Echo(d) | Work::Discard(d) => d.clone(),
            Work::Source(n) => (0..*n as u64).map(source_byte).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    Reset(ResetReason),
    Refused(ResetReason),
}

#[derive(Debug)]
struct Flow {
    spec: FlowSpec,
    expected: Vec<u8>,
    id: Option<ConnId>,
    connected: bool,
    sent: usize,
    got: Vec<u8>,
    end: Option<End>,
}

impl Flow {
    fn complete(&self) -> bool {
        self.got.len() >= self.expected.len()
    }

    fn finished(&self) -> bool {
        self.end.is_some() || self.complete()
    }

    fn is_prefix(&self) -> bool {
        self.got.len() <= self.expected.len() && self.got[..] == self.expected[..self.got.len()]
    }
}

struct Rig {
    host: Box<HostSession>,
    phone: Option<Phone>,
    inj: FaultInjector,
    flows: Vec<Flow>,
    messages: Vec<ControlMessage>,
    host_events: Vec<Event>,
    phone_events: Vec<Event>,
    phone_stats: Option<SessionStats>,
    done_at: Option<Instant>,
    buf: Vec<u8>,
}

impl Rig {
    fn new(setup: &Setup, faults: Faults) -> Rig {
        let mut host = Box::new(HostSession::new(setup.host, 1));
        let phone = Phone::new(setup.phone.clone());
        let inj = FaultInjector::new(faults, setup.phone.identity.max_packet_size);
        let flows = setup
            .flows
            .iter()
            .map(|spec| {
                let bufs = Buffers::new(vec![0; spec.rx], vec![0; spec.tx]);
                let id = host
                    .connect(spec.port, bufs)
                    .map_err(|e| e.0)
                    .expect("connect");
                Flow {
                    expected: spec.expected(),
                    spec: spec.clone(),
                    id: Some(id),
                    connected: false,
                    sent: 0,
                    got: Vec::new(),
                    end: None,
                }
            })
            .collect();
        Rig {
            host,
            phone: Some(phone),
            inj,
            flows,
            messages: Vec::new(),
            host_events: Vec::new(),
            phone_events: Vec::new(),
            phone_stats: None,
            done_at: None,
            buf: vec![0; 65536],
        }
    }

    fn finished(&self) -> bool {
        self.flows.iter().all(Flow::finished)
    }

    fn next_timer(&self) -> Option<Instant> {
        [
            self.host.poll_timeout(),
            self.phone.as_ref().and_then(Phone::poll_timeout),
            self.inj.poll_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn timeout(&mut self, now: Instant) {
        self.host.handle_timeout(now);
        if let Some(p) = self.phone.as_mut() {
            p.handle_timeout(now);
        }
        self.inj.handle_timeout(now);
    }

    fn read(&mut self, k: usize) -> bool {
        let f = &mut self.flows[k];
        let Some(id) = f.id else { return false };
        if matches!(f.spec.work, Work::Discard(_)) {
            return false;
        }
        let mut moved = false;
        let mut tmp = [0u8; 16384];
        while f.got.len() < f.expected.len() {
            let want = (f.expected.len() - f.got.len()).min(tmp.len());
            match self.host.recv(id, &mut tmp[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    f.got.extend_from_slice(&tmp[..n]);
                    moved = true;
                }
            }
        }
        moved
    }

    fn on_event(&mut self, e: Event) {
        self.host_events.push(e.clone());
        let find = |flows: &[Flow], id: ConnId| flows.iter().position(|f| f.id == Some(id));
        match e {
            Event::Connected(id) => {
                if let Some(k) = find(&self.flows, id) {
                    self.flows[k].connected = true;
                }
            }
            Event::Reset { id, reason } | Event::Refused { id, reason } => {
                if let Some(k) = find(&self.flows, id) {
                    self.read(k);
                    let f = &mut self.flows[k];
                    f.end = Some(if f.connected {
                        End::Reset(reason)
                    } else {
                        End::Refused(reason)
                    });
                    f.id = None;
                    assert!(self.host.reset(id, "").is_ok());
                }
            }
            Event::DeviceMessage(m) => self.messages.push(m),
            _ => {}
        }
    }

    /// One round: the application, both senders, the injector, the events. True if anything
    /// moved.
    fn pump(&mut self, now: Instant) -> bool {
        let mut moved = false;
        for f in self.flows.iter_mut() {
            let (Some(id), Work::Echo(data) | Work::Discard(data)) = (f.id, &f.spec.work) else {
                continue;
            };
            if f.connected && f.sent < data.len() {
                let end = (f.sent + f.spec.chunk).min(data.len());
                if let Ok(n) = self.host.send(id, &data[f.sent..end]) {
                    f.sent += n;
                    moved |= n > 0;
                }
            }
        }
        while let Some(t) = self
            .host
            .poll_transmit(now, &mut self.buf)
            .expect("64 KiB buffer")
        {
            moved = true;
            self.inj.push(now, H2D, &self.buf[..t.len], t.zlp);
        }
        if let Some(phone) = self.phone.as_mut() {
            while let Some(t) = phone
                .poll_transmit(now, &mut self.buf)
                .expect("64 KiB buffer")
            {
                moved = true;
                self.inj.push(now, D2H, &self.buf[..t.len], t.zlp);
            }
        }
        while let Some(out) = self.inj.poll_output(now) {
            moved = true;
            match out {
                Output::Transfer {
                    dir: H2D,
                    bytes,
                    zlp,
                } => {
                    if let Some(phone) = self.phone.as_mut() {
                        phone.handle_transfer(now, &bytes);
                        if zlp {
                            phone.handle_transfer(now, &[]);
                        }
                    }
                }
                Output::Transfer {
                    dir: D2H,
                    bytes,
                    zlp,
                } => {
                    self.host.handle_transfer(now, &bytes);
                    if zlp {
                        self.host.handle_transfer(now, &[]);
                    }
                }
                Output::Unplug => {
                    self.host.handle_disconnect();
                    if let Some(p) = self.phone.take() {
                        self.phone_stats = Some(p.session().stats());
                    }
                }
            }
        }
        // The calling contract: after inputs, transmit before looking at events (a reset
        // detected by `handle_transfer` sends its RST before `on_event` releases the slot).
        while let Some(t) = self
            .host
            .poll_transmit(now, &mut self.buf)
            .expect("64 KiB buffer")
        {
            moved = true;
            self.inj.push(now, H2D, &self.buf[..t.len], t.zlp);
        }
        while let Some(e) = self.host.poll_event() {
            moved = true;
            self.on_event(e);
        }
        for k in 0..self.flows.len() {
            moved |= self.read(k);
        }
        moved |= self.discard_progress();
        if let Some(p) = self.phone.as_mut() {
            let evs = p.take_events();
            moved |= !evs.is_empty();
            self.phone_events.extend(evs);
        }
        moved
    }

    /// What the phone's discard service received, as a prefix of what was sent.
    fn discard_progress(&mut self) -> bool {
        let Some(phone) = self.phone.as_ref() else {
            return false;
        };
        let s = phone.session();
        let received: u64 = s
            .connection_ids()
            .filter_map(|id| s.connection(id))
            .filter(|c| c.local_port() == DISCARD)
            .map(|c| c.stats().bytes_received)
            .sum();
        let mut moved = false;
        for f in self.flows.iter_mut() {
            if let Work::Discard(d) = &f.spec.work {
                let n = (received as usize).min(d.len());
                if n > f.got.len() {
                    f.got = d[..n].to_vec();
                    moved = true;
                }
            }
        }
        moved
    }

    fn phone_stats(&self) -> SessionStats {
        self.phone
            .as_ref()
            .map(|p| p.session().stats())
            .or(self.phone_stats)
            .unwrap_or_default()
    }

    fn host_stats(&self) -> SessionStats {
        self.host.stats()
    }

    fn reassembly(&self) -> ReassemblyStats {
        self.host.reassembly_stats()
    }
}

#[derive(Clone)]
struct Setup {
    faults: Faults,
    phone: PhoneConfig,
    host: SessionConfig,
    flows: Vec<FlowSpec>,
}

impl Setup {
    fn new(faults: Faults) -> Setup {
        Setup {
            faults,
            phone: PhoneConfig::simulated(1),
            host: SessionConfig::default(),
            flows: vec![FlowSpec::echo(), FlowSpec::source()],
        }
    }

    fn one(rule: Rule) -> Setup {
        Setup::new(Faults::one(rule))
    }
}

struct World {
    rigs: Vec<Rig>,
    now: Instant,
    rounds: usize,
}

impl World {
    fn run(setup: &Setup) -> World {
        // The postcard encoding replays the same scenario: run from the decoded copy.
        let bytes = setup.faults.to_bytes().expect("encode");
        let faults = Faults::from_bytes(&bytes).expect("decode");
        assert_eq!(faults, setup.faults);
        let mut w = World {
            rigs: vec![Rig::new(setup, faults), Rig::new(setup, Faults::none())],
            now: Instant::ZERO,
            rounds: 0,
        };
        let limit = Instant::ZERO + TIME_LIMIT;
        loop {
            w.rounds += 1;
            assert!(w.rounds < 200_000, "livelock: {} rounds", w.rounds);
            let mut moved = false;
            for r in w.rigs.iter_mut() {
                moved |= r.pump(w.now);
                if r.done_at.is_none() && r.finished() {
                    r.done_at = Some(w.now);
                }
            }
            if moved {
                continue;
            }
            // Finished, and nothing injected is still on its way.
            if w.rigs.iter().all(|r| r.finished() && r.inj.pending() == 0) {
                break;
            }
            let Some(t) = w.rigs.iter().filter_map(Rig::next_timer).min() else {
                break;
            };
            if t > limit {
                break;
            }
            w.now = w.now.max(t);
            for r in w.rigs.iter_mut() {
                r.timeout(w.now);
            }
        }
        // The untouched phone always finishes byte-exact.
        let other = &w.rigs[1];
        for f in &other.flows {
            assert!(
                f.end.is_none() && f.got == f.expected,
                "phone 1 (no faults) port {}: {:?}, {} of {} bytes",
                f.spec.port,
                f.end,
                f.got.len(),
                f.expected.len()
            );
        }
        w
    }

    fn rig(&self) -> &Rig {
        &self.rigs[0]
    }

    fn flow(&self, port: u16) -> &Flow {
        self.rig()
            .flows
            .iter()
            .find(|f| f.spec.port == port)
            .expect("no flow on that port")
    }

    /// The rule fired (at least once): the scenario really hit its target.
    #[track_caller]
    fn fired(&self, rule: usize) -> &Self {
        assert!(
            self.rig().inj.fire_count(rule) > 0,
            "rule {rule} never fired; {}",
            self.describe()
        );
        self
    }

    #[track_caller]
    fn intact(&self, port: u16) -> &Self {
        let f = self.flow(port);
        assert!(
            f.end.is_none() && f.got == f.expected,
            "port {port} not intact: {}",
            self.describe()
        );
        self
    }

    #[track_caller]
    fn prefix(&self, port: u16) -> &Self {
        let f = self.flow(port);
        assert!(
            f.is_prefix(),
            "port {port} got corrupted data: {}",
            self.describe()
        );
        self
    }

    #[track_caller]
    fn reset(&self, port: u16, kind: ResetKind, text: &str) -> &Self {
        self.prefix(port);
        let f = self.flow(port);
        match &f.end {
            Some(End::Reset(r)) if r.kind == kind && contains(r.text(), text) => {}
            _ => panic!(
                "port {port}: expected Reset {kind:?} {text:?}; {}",
                self.describe()
            ),
        }
        self
    }

    #[track_caller]
    fn refused(&self, port: u16, kind: ResetKind) -> &Self {
        let f = self.flow(port);
        match &f.end {
            Some(End::Refused(r)) if r.kind == kind => {}
            _ => panic!(
                "port {port}: expected Refused {kind:?}; {}",
                self.describe()
            ),
        }
        self
    }

    /// The phone ended its side of the connection to `port` with `kind` (and `text` in its
    /// reason).
    #[track_caller]
    fn phone_reset(&self, kind: ResetKind, text: &str) -> &Self {
        let hit = self.rig().phone_events.iter().any(|e| {
            matches!(e, Event::Reset { reason, .. } | Event::Refused { reason, .. }
                if reason.kind == kind && contains(reason.text(), text))
        });
        assert!(
            hit,
            "phone never ended a connection with {kind:?} {text:?}; {}",
            self.describe()
        );
        self
    }

    #[track_caller]
    fn device_error(&self, text: &str) -> &Self {
        let hit = self
            .rig()
            .messages
            .iter()
            .any(|m| m.kind == ControlType::Error && contains(m.text(), text));
        assert!(hit, "no CONTROL error {text:?}; {}", self.describe());
        self
    }

    #[track_caller]
    fn no_device_messages(&self) -> &Self {
        assert!(self.rig().messages.is_empty(), "{}", self.describe());
        self
    }

    fn elapsed(&self) -> Duration {
        self.rig().done_at.unwrap_or(self.now) - Instant::ZERO
    }

    fn baseline(&self) -> Duration {
        self.rigs[1].done_at.unwrap_or(self.now) - Instant::ZERO
    }

    fn describe(&self) -> String {
        let r = self.rig();
        let mut s = format!("t={} rounds={}\n", self.now, self.rounds);
        for f in &r.flows {
            s += &format!(
                "  port {}: connected={} sent={} got={}/{} prefix={} end={:?}\n",
                f.spec.port,
                f.connected,
                f.sent,
                f.got.len(),
                f.expected.len(),
                f.is_prefix(),
                f.end.as_ref().map(|e| match e {
                    End::Reset(r) => format!("Reset {:?} {r}", r.kind),
                    End::Refused(r) => format!("Refused {:?} {r}", r.kind),
                })
            );
        }
        s += &format!(
            "  host phase={:?} version={:?}\n",
            r.host.phase(),
            r.host.version()
        );
        s += &format!("  host stats {:?}\n", r.host_stats());
        s += &format!("  reassembly {:?}\n", r.reassembly());
        s += &format!("  phone stats {:?}\n", r.phone_stats());
        for m in &r.messages {
            s += &format!(
                "  device message {:?} {:?}\n",
                m.kind,
                String::from_utf8_lossy(m.text())
            );
        }
        for e in &r.phone_events {
            if matches!(
                e,
                Event::Reset { .. } | Event::Refused { .. } | Event::PeerRestarted
            ) {
                s += &format!("  phone event {e:?}\n");
            }
        }
        for e in &r.host_events {
            if matches!(e, Event::HandshakeDone { .. } | Event::HandshakeFailed) {
                s += &format!("  host event {e:?}\n");
            }
        }
        s += &format!("  fired {:?}\n", r.inj.fired());
        s += &format!(
            "  stats h2d {:?} d2h {:?}",
            r.inj.stats(H2D),
            r.inj.stats(D2H)
        );
        s
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn data(port: u16) -> Filter {
    Filter::on_port(PacketKind::Data, port)
}

fn kind(k: PacketKind) -> Filter {
    Filter::kind(k)
}

fn run(setup: Setup) -> World {
    World::run(&setup)
}

/// The connection to `port` was ended by the side that received the faulty packet in `dir`,
/// with `kind` and `text`, and the other side heard of it. Host → phone: the phone detects it;
/// the host's connection then ends with `PeerReset` (its text is the phone's reason by design,
/// currently "no such connection": see `phone_rst_reason_reaches_host`). Phone → host: the host
/// detects it and its RST carries the reason to the phone.
#[track_caller]
fn detected(w: &World, dir: Direction, port: u16, kind: ResetKind, text: &str) {
    match dir {
        H2D => {
            w.phone_reset(kind, text)
                .reset(port, ResetKind::PeerReset, "");
        }
        D2H => {
            w.reset(port, kind, text)
                .phone_reset(ResetKind::PeerReset, text);
        }
    }
}

/// A discard flow (the phone's window updates are pure ACKs; its buffer is 4 KiB) and a source
/// flow read through an 8 KiB host buffer (the host's window updates are pure ACKs): every
/// window update unblocks a sender.
fn window_setup(faults: Faults) -> Setup {
    let mut s = Setup::new(faults);
    s.phone.rx_buffer = 4096;
    s.flows = vec![FlowSpec::discard(), FlowSpec::source()];
    s.flows[1].rx = 8192;
    s
}

// ---- Drop --------------------------------------------------------------------------------

#[test]
fn drop_data_packet_resets_that_connection_only() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::Drop,
        )));
        w.fired(0).intact(SOURCE).no_device_messages();
        detected(
            &w,
            dir,
            ECHO,
            ResetKind::UnexpectedSeq,
            "unexpected sequence number",
        );
        assert_eq!(w.rig().inj.stats(dir).dropped, 1);
    }
}

#[test]
fn drop_syn_or_synack_is_refused_after_connect_timeout() {
    for (dir, k) in [(H2D, PacketKind::Syn), (D2H, PacketKind::SynAck)] {
        let w = run(Setup::one(Rule::at_packet(
            0,
            dir,
            Filter::on_port(k, ECHO),
            Action::Drop,
        )));
        w.fired(0)
            .refused(ECHO, ResetKind::ConnectTimeout)
            .intact(SOURCE);
        assert!(w.elapsed() >= Duration::from_secs(5), "{}", w.describe());
    }
}

#[test]
fn dropped_window_update_is_recovered_by_idle_reack() {
    for dir in Direction::BOTH {
        let w = run(window_setup(Faults::one(Rule::at_packet(
            5,
            dir,
            kind(PacketKind::PureAck),
            Action::Drop,
        ))));
        w.fired(0)
            .intact(DISCARD)
            .intact(SOURCE)
            .no_device_messages();
        // The sender waited for the re-sent update.
        let reack = SessionConfig::default().conn.reack_interval;
        assert!(w.elapsed() >= reack, "{}", w.describe());
    }
}

#[test]
fn dropped_version_is_retried() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            0,
            dir,
            kind(PacketKind::Version),
            Action::Drop,
        )));
        w.fired(0).intact(ECHO).intact(SOURCE);
        assert_eq!(w.rig().host.version(), Some(2));
        assert_eq!(
            w.rig().host_stats().version_packets,
            3,
            "2 sent, 1 received"
        );
        assert!(w.elapsed() >= Duration::from_secs(1), "{}", w.describe());
        if dir == D2H {
            // The phone heard VERSION twice: a restarted host, as far as it knows.
            assert!(w.rig().phone_events.contains(&Event::PeerRestarted));
        }
    }
}

#[test]
fn version_never_answered_fails_the_handshake() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::always(
            dir,
            kind(PacketKind::Version),
            1_000_000,
            Action::Drop,
        )));
        assert_eq!(w.rig().inj.fire_count(0), 3, "three attempts");
        w.refused(ECHO, ResetKind::HandshakeFailed)
            .refused(SOURCE, ResetKind::HandshakeFailed);
        let r = w.rig();
        assert_eq!(r.host.phase(), Phase::Dead);
        assert!(r.host_events.contains(&Event::HandshakeFailed));
        assert!(w.elapsed() >= Duration::from_secs(3), "{}", w.describe());
    }
}

#[test]
fn dropped_setup_is_harmless() {
    // Only the host sends SETUP.
    let w = run(Setup::one(Rule::at_packet(
        0,
        H2D,
        kind(PacketKind::Setup),
        Action::Drop,
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
}

// ---- Duplicate ---------------------------------------------------------------------------

#[test]
fn duplicate_data_packet_resets_that_connection_only() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::Duplicate,
        )));
        w.fired(0).intact(SOURCE);
        detected(
            &w,
            dir,
            ECHO,
            ResetKind::UnexpectedSeq,
            "unexpected sequence number",
        );
    }
}

#[test]
fn duplicate_pure_ack_is_harmless() {
    for dir in Direction::BOTH {
        let w = run(window_setup(Faults::one(Rule::at_packet(
            3,
            dir,
            kind(PacketKind::PureAck),
            Action::Duplicate,
        ))));
        w.fired(0).intact(DISCARD).intact(SOURCE);
    }
}

#[test]
fn duplicate_connection_setup() {
    // A repeated SYN is ignored by the phone; a repeated SYN|ACK on an established connection
    // is a protocol violation for the host.
    let w = run(Setup::one(Rule::at_packet(
        0,
        H2D,
        Filter::on_port(PacketKind::Syn, ECHO),
        Action::Duplicate,
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
    let w = run(Setup::one(Rule::at_packet(
        0,
        D2H,
        Filter::on_port(PacketKind::SynAck, ECHO),
        Action::Duplicate,
    )));
    w.fired(0)
        .reset(ECHO, ResetKind::BadFlags, "SYN|ACK")
        .phone_reset(ResetKind::PeerReset, "SYN|ACK")
        .intact(SOURCE);
}

// ---- Reorder -----------------------------------------------------------------------------

#[test]
fn reorder_within_a_connection_resets_it() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::Reorder {
                after: 1,
                max_hold_micros: 100_000,
            },
        )));
        w.fired(0).intact(SOURCE);
        detected(
            &w,
            dir,
            ECHO,
            ResetKind::UnexpectedSeq,
            "unexpected sequence number",
        );
    }
}

#[test]
fn reorder_across_connections_is_harmless() {
    // The echo connection's SYN (SYN|ACK) overtaken by the source connection's.
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            0,
            dir,
            Filter::on_port(PacketKind::Tcp, ECHO),
            Action::Reorder {
                after: 1,
                max_hold_micros: 100_000,
            },
        )));
        w.fired(0).intact(ECHO).intact(SOURCE);
    }
}

// ---- Header corruption -------------------------------------------------------------------

#[test]
fn nonsense_length_breaks_framing_of_one_packet() {
    for len in [0x0010_0000, 4] {
        for dir in Direction::BOTH {
            let w = run(Setup::one(Rule::at_packet(
                3,
                dir,
                data(ECHO),
                Action::SetLength(len),
            )));
            w.fired(0).intact(SOURCE);
            detected(
                &w,
                dir,
                ECHO,
                ResetKind::UnexpectedSeq,
                "unexpected sequence number",
            );
            match dir {
                H2D => {
                    w.device_error("message size mismatch");
                }
                D2H => {
                    let r = w.rig();
                    assert_eq!(r.host_stats().reassembly_errors, 1, "{}", w.describe());
                    assert_eq!(r.reassembly().resyncs, 1, "{}", w.describe());
                }
            }
        }
    }
}

#[test]
fn plausible_wrong_length() {
    // 100 bytes too long. The phone compares it with the transfer: as a nonsense length.
    let len = 4096 + 100;
    let w = run(Setup::one(Rule::at_packet(
        3,
        H2D,
        data(ECHO),
        Action::SetLength(len),
    )));
    w.fired(0)
        .intact(SOURCE)
        .device_error("message size mismatch");
    detected(
        &w,
        H2D,
        ECHO,
        ResetKind::UnexpectedSeq,
        "unexpected sequence number",
    );
    // The host's byte stream swallows the next 100 bytes into this packet: they reach the
    // application as data (no checksum in usbmux), then the connection resets at its next
    // packet and the stream resynchronises.
    let w = run(Setup::one(Rule::at_packet(
        3,
        D2H,
        data(ECHO),
        Action::SetLength(len),
    )));
    w.fired(0).intact(SOURCE);
    let f = w.flow(ECHO);
    assert!(!f.is_prefix(), "expected garbage: {}", w.describe());
    assert!(matches!(&f.end, Some(End::Reset(r)) if r.kind == ResetKind::UnexpectedSeq));
    assert!(w.rig().host_stats().reassembly_errors >= 1);
}

#[test]
fn wrong_magic_is_a_lost_packet() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::SetMagic(0xDEAD_BEEF),
        )));
        w.fired(0).intact(SOURCE).no_device_messages();
        detected(
            &w,
            dir,
            ECHO,
            ResetKind::UnexpectedSeq,
            "unexpected sequence number",
        );
        let receiver = match dir {
            H2D => w.rig().phone_stats(),
            D2H => w.rig().host_stats(),
        };
        assert_eq!(receiver.dropped_malformed, 1);
    }
}

#[test]
fn unknown_protocol_is_a_lost_packet() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::SetProtocol(0x99),
        )));
        w.fired(0).intact(SOURCE).no_device_messages();
        detected(
            &w,
            dir,
            ECHO,
            ResetKind::UnexpectedSeq,
            "unexpected sequence number",
        );
        let receiver = match dir {
            H2D => w.rig().phone_stats(),
            D2H => w.rig().host_stats(),
        };
        assert_eq!(receiver.dropped_unexpected, 1);
    }
}

#[test]
fn wrong_mux_counter_is_only_counted() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::MuxSeqOffset(5),
        )));
        w.fired(0).intact(ECHO).intact(SOURCE);
        let receiver = match dir {
            H2D => w.rig().phone_stats(),
            D2H => w.rig().host_stats(),
        };
        // The wrong one and the right one after it.
        assert_eq!(receiver.seq_anomalies, 2);
    }
}

// ---- TCP header corruption ---------------------------------------------------------------

#[test]
fn wrong_seq_resets_that_connection() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::SeqOffset(1000),
        )));
        w.fired(0).intact(SOURCE);
        detected(
            &w,
            dir,
            ECHO,
            ResetKind::UnexpectedSeq,
            "unexpected sequence number",
        );
    }
}

#[test]
fn ack_beyond_sent_resets_that_connection() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::AckOffset(1_000_000),
        )));
        w.fired(0).intact(SOURCE);
        detected(&w, dir, ECHO, ResetKind::AckBeyondSent, "beyond data sent");
    }
    // On the SYN|ACK the connection never opens.
    let w = run(Setup::one(Rule::at_packet(
        0,
        D2H,
        Filter::on_port(PacketKind::SynAck, ECHO),
        Action::AckOffset(1_000_000),
    )));
    w.fired(0)
        .refused(ECHO, ResetKind::AckBeyondSent)
        .intact(SOURCE);
}

#[test]
fn sending_past_the_window_resets_that_connection() {
    // Host → phone on echo (the phone's buffer is 8 KiB); phone → host on source (the host's
    // buffer is 8 KiB): the padded packet ends one byte past the receiver's edge.
    for (dir, port, other) in [(H2D, ECHO, SOURCE), (D2H, SOURCE, ECHO)] {
        let mut s = Setup::one(Rule::at_packet(
            3,
            dir,
            data(port),
            Action::OverrunWindow { extra: 1 },
        ));
        s.phone.rx_buffer = 8192;
        s.flows[1].rx = 8192;
        let w = run(s);
        w.fired(0).intact(other);
        detected(&w, dir, port, ResetKind::WindowOverflow, "window overflow");
    }
}

#[test]
fn fin_resets_after_the_data() {
    for dir in Direction::BOTH {
        let fin_ack = 0x11;
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::SetFlags(fin_ack),
        )));
        w.fired(0).intact(SOURCE);
        detected(&w, dir, ECHO, ResetKind::PeerFin, "(FIN)");
        if dir == D2H {
            // The FIN's data was delivered first: four 4060-byte echoes.
            assert_eq!(w.flow(ECHO).got.len(), 4 * 4060, "{}", w.describe());
        }
    }
}

#[test]
fn zero_window_on_an_update_is_recovered_by_idle_reack() {
    for dir in Direction::BOTH {
        let w = run(window_setup(Faults::one(Rule::at_packet(
            5,
            dir,
            kind(PacketKind::PureAck),
            Action::SetWindow(0),
        ))));
        w.fired(0).intact(DISCARD).intact(SOURCE);
        assert!(w.elapsed() >= SessionConfig::default().conn.reack_interval);
    }
}

// ---- Injected packets --------------------------------------------------------------------

#[test]
fn rst_mid_stream_with_text() {
    let amnesia = || Action::InjectRst {
        text: "amnesia".into(),
    };
    // As if the phone forgot the connection: the host reports its text; the phone, which never
    // sent it, learns at its next packet (the host no longer knows the connection).
    let w = run(Setup::one(Rule::at_packet(3, D2H, data(ECHO), amnesia())));
    w.fired(0)
        .reset(ECHO, ResetKind::PeerReset, "amnesia")
        .phone_reset(ResetKind::PeerReset, "no such connection")
        .intact(SOURCE);
    // As if the host forgot it: the phone reports the text, the host learns at its next packet.
    let w = run(Setup::one(Rule::at_packet(3, H2D, data(ECHO), amnesia())));
    w.fired(0)
        .phone_reset(ResetKind::PeerReset, "amnesia")
        .reset(ECHO, ResetKind::PeerReset, "no such connection")
        .intact(SOURCE);
}

#[test]
fn control_error_text() {
    let control = || Action::InjectControl {
        kind: 3,
        text: "injected error".into(),
    };
    let w = run(Setup::one(Rule::at_packet(3, D2H, data(ECHO), control())));
    w.fired(0)
        .device_error("injected error")
        .intact(ECHO)
        .intact(SOURCE);
    assert_eq!(w.rig().messages.len(), 1);
    // The phone takes no CONTROL packets: it counts and ignores it.
    let w = run(Setup::one(Rule::at_packet(3, H2D, data(ECHO), control())));
    w.fired(0).no_device_messages().intact(ECHO).intact(SOURCE);
    assert_eq!(w.rig().phone_stats().dropped_unexpected, 1);
}

// ---- Version answers ---------------------------------------------------------------------

#[test]
fn version_answer_1() {
    // The host's request rewritten to 1: the phone answers 1, and a v1 session works.
    let w = run(Setup::one(Rule::at_packet(
        0,
        H2D,
        kind(PacketKind::Version),
        Action::AnswerVersion(1),
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
    assert_eq!(w.rig().host.version(), Some(1));
    // The phone's reply rewritten to 1 while the phone speaks v2: the two disagree on the
    // header form, the phone drops every host packet as malformed, every connect times out.
    let w = run(Setup::one(Rule::at_packet(
        0,
        D2H,
        kind(PacketKind::Version),
        Action::AnswerVersion(1),
    )));
    w.fired(0)
        .refused(ECHO, ResetKind::ConnectTimeout)
        .refused(SOURCE, ResetKind::ConnectTimeout);
    assert!(w.rig().phone_stats().dropped_malformed >= 2);
}

#[test]
fn version_answer_3() {
    // The phone answers 2 to any request of 2 or more.
    let w = run(Setup::one(Rule::at_packet(
        0,
        H2D,
        kind(PacketKind::Version),
        Action::AnswerVersion(3),
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
    assert_eq!(w.rig().host.version(), Some(2));
    // The host takes no 3: the handshake fails at once, nothing connects.
    let w = run(Setup::one(Rule::at_packet(
        0,
        D2H,
        kind(PacketKind::Version),
        Action::AnswerVersion(3),
    )));
    w.fired(0)
        .refused(ECHO, ResetKind::HandshakeFailed)
        .refused(SOURCE, ResetKind::HandshakeFailed);
    assert_eq!(w.rig().host.phase(), Phase::Dead);
    assert!(w.elapsed() < Duration::from_secs(1));
}

// ---- Transfer framing --------------------------------------------------------------------

#[test]
fn split_packet() {
    // IN: the host reassembles any split — one packet in 1-byte pieces, and every packet in
    // 4 KiB pieces (as under virtualisation).
    let w = run(Setup::one(Rule::at_packet(
        3,
        D2H,
        data(ECHO),
        Action::Split { max_len: 1 },
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
    let w = run(Setup::one(Rule::always(
        D2H,
        Filter::ANY,
        1_000_000,
        Action::Split { max_len: 4096 },
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
    assert_eq!(w.rig().host_stats().reassembly_errors, 0);
    // OUT: the strict phone rejects every piece with a CONTROL error.
    let w = run(Setup::one(Rule::at_packet(
        3,
        H2D,
        data(ECHO),
        Action::Split { max_len: 1000 },
    )));
    w.fired(0)
        .device_error("message size mismatch (header says 4096 bytes, got 1000)")
        .intact(SOURCE);
    assert_eq!(
        w.rig().phone_stats().reassembly_errors,
        5,
        "{}",
        w.describe()
    );
    detected(
        &w,
        H2D,
        ECHO,
        ResetKind::UnexpectedSeq,
        "unexpected sequence number",
    );
}

#[test]
fn packed_packets() {
    // IN: several packets (up to 4 x 48 KiB) in one transfer are cut apart by the host.
    let w = run(Setup::one(Rule::always(
        D2H,
        Filter::ANY,
        1_000_000,
        Action::Pack {
            count: 4,
            max_hold_micros: 1000,
        },
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
    // OUT: one CONTROL error; all three packets are lost.
    let w = run(Setup::one(Rule::at_packet(
        3,
        H2D,
        data(ECHO),
        Action::Pack {
            count: 3,
            max_hold_micros: 100_000,
        },
    )));
    w.fired(0)
        .device_error("message size mismatch")
        .intact(SOURCE);
    assert_eq!(w.rig().phone_stats().reassembly_errors, 1);
    detected(
        &w,
        H2D,
        ECHO,
        ResetKind::UnexpectedSeq,
        "unexpected sequence number",
    );
}

#[test]
fn omitted_zlp() {
    // IN: the host reads a byte stream; ZLPs do not matter to it.
    let w = run(Setup::one(Rule::always(
        D2H,
        Filter::ANY,
        1_000_000,
        Action::OmitZlp,
    )));
    w.fired(0).intact(ECHO).intact(SOURCE);
    // OUT: the phone's read runs into the next transfer: 4096 + 4096 bytes in one message.
    let w = run(Setup::one(Rule::at_packet(
        3,
        H2D,
        data(ECHO),
        Action::OmitZlp,
    )));
    w.fired(0)
        .device_error("message size mismatch (header says 4096 bytes, got 8192)")
        .intact(SOURCE);
    detected(
        &w,
        H2D,
        ECHO,
        ResetKind::UnexpectedSeq,
        "unexpected sequence number",
    );
}

// ---- Link ----------------------------------------------------------------------------------

#[test]
fn unplug_mid_transfer() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::Unplug,
        )));
        w.fired(0)
            .reset(ECHO, ResetKind::Unplugged, "")
            .reset(SOURCE, ResetKind::Unplugged, "");
        let r = w.rig();
        assert!(r.inj.is_unplugged() && r.phone.is_none());
        assert_eq!(r.host.phase(), Phase::Dead);
    }
}

#[test]
fn stop_reading_is_only_slower() {
    for dir in Direction::BOTH {
        let w = run(Setup::one(Rule::at_packet(
            3,
            dir,
            data(ECHO),
            Action::StopReading { micros: 2_000_000 },
        )));
        w.fired(0).intact(ECHO).intact(SOURCE);
        assert!(w.elapsed() >= Duration::from_secs(2), "{}", w.describe());
        assert_eq!(w.baseline(), Duration::ZERO);
    }
}

#[test]
fn slow_link_is_only_slower() {
    // 1 MB/s: 64 KiB of echo each way plus 256 KiB of source.
    for (dir, bytes) in [(H2D, ECHO_LEN), (D2H, ECHO_LEN + SOURCE_LEN)] {
        let w = run(Setup::one(Rule::at_packet(
            0,
            dir,
            Filter::ANY,
            Action::SlowLink {
                bytes_per_sec: 1_000_000,
            },
        )));
        w.fired(0).intact(ECHO).intact(SOURCE);
        let min = Duration::from_micros(bytes as u64);
        assert!(
            w.elapsed() >= min,
            "{} < {min}: {}",
            w.elapsed(),
            w.describe()
        );
    }
}

// ---- Time triggers -------------------------------------------------------------------------

/// Packets cross a 1 MB/s link (so time passes), and at 20 ms the fault fires.
fn at_20ms(dir: Direction, filter: Filter, action: Action) -> Setup {
    Setup::new(
        Faults::one(Rule::at_packet(
            0,
            dir,
            Filter::ANY,
            Action::SlowLink {
                bytes_per_sec: 1_000_000,
            },
        ))
        .with(Rule::at_time(20_000, dir, filter, action)),
    )
}

#[test]
fn time_triggered_faults() {
    // A packet action fires on the first matching packet at or after the time.
    let w = run(at_20ms(D2H, data(SOURCE), Action::Drop));
    w.fired(1).intact(ECHO);
    detected(
        &w,
        D2H,
        SOURCE,
        ResetKind::UnexpectedSeq,
        "unexpected sequence number",
    );
    assert!(w.rig().inj.fired()[1].at >= Instant::from_millis(20));
    // Packet-less actions fire at the time itself.
    let rst = Action::InjectRst {
        text: "amnesia".into(),
    };
    let w = run(at_20ms(D2H, Filter::on_port(PacketKind::Tcp, ECHO), rst));
    w.fired(1)
        .reset(ECHO, ResetKind::PeerReset, "amnesia")
        .intact(SOURCE);
    assert_eq!(w.rig().inj.fired()[1].packet, None);
    for dir in Direction::BOTH {
        let w = run(at_20ms(dir, Filter::ANY, Action::Unplug));
        w.fired(1)
            .reset(ECHO, ResetKind::Unplugged, "")
            .reset(SOURCE, ResetKind::Unplugged, "");
        assert_eq!(w.rig().inj.fired()[1].at, Instant::from_millis(20));
    }
}

// ---- Scenarios as data ---------------------------------------------------------------------

/// One rule of every action and trigger kind.
fn every_fault(seed: u64) -> Faults {
    let f = data(ECHO);
    let actions = vec![
        Action::Drop,
        Action::Duplicate,
        Action::Reorder {
            after: 2,
            max_hold_micros: 5000,
        },
        Action::SetLength(7),
        Action::SetMagic(1),
        Action::SetProtocol(3),
        Action::MuxSeqOffset(9),
        Action::SeqOffset(1),
        Action::AckOffset(1 << 20),
        Action::SetWindow(0),
        Action::SetFlags(0x02),
        Action::OverrunWindow { extra: 300 },
        Action::InjectRst {
            text: "amnesia".into(),
        },
        Action::InjectControl {
            kind: 5,
            text: "warning".into(),
        },
        Action::AnswerVersion(3),
        Action::Split { max_len: 3 },
        Action::Pack {
            count: 2,
            max_hold_micros: 1000,
        },
        Action::OmitZlp,
        Action::StopReading { micros: 1000 },
        Action::SlowLink {
            bytes_per_sec: 10_000_000,
        },
        Action::Unplug,
    ];
    let mut faults = Faults {
        seed,
        rules: Vec::new(),
    };
    for (i, a) in actions.into_iter().enumerate() {
        let dir = Direction::BOTH[i % 2];
        let when = match i % 3 {
            0 => Trigger::AtPacket {
                n: i as u64,
                dir,
                filter: f,
            },
            1 => Trigger::AtTime {
                micros: 1000 * i as u64,
                dir,
                filter: Filter::ANY,
            },
            _ => Trigger::Always {
                dir,
                filter: kind(PacketKind::Tcp),
                per_million: 20_000,
            },
        };
        faults.rules.push(Rule { when, action: a });
    }
    faults
}

#[test]
fn faults_round_trip_through_postcard() {
    let faults = every_fault(0xC0FFEE);
    let bytes = faults.to_bytes().unwrap();
    assert_eq!(Faults::from_bytes(&bytes).unwrap(), faults);
    // Truncated or garbage encodings are errors, not panics.
    for n in 0..bytes.len() {
        let _ = Faults::from_bytes(&bytes[..n]);
    }
    assert!(Faults::from_bytes(&[0xFF; 16]).is_err());
}

/// Random faults of every kind (seeded): no panic, no livelock, the other phone untouched, and
/// the same scenario replays to the same result.
#[test]
fn random_faults_are_deterministic_and_contained() {
    for seed in 1..=12u64 {
        let mut faults = every_fault(seed);
        // Turn every rule into a random one on this seed's direction.
        for (i, r) in faults.rules.iter_mut().enumerate() {
            let dir = Direction::BOTH[(seed as usize + i) % 2];
            let per_million = if matches!(r.action, Action::Unplug) {
                500
            } else {
                10_000
            };
            r.when = Trigger::Always {
                dir,
                filter: Filter::ANY,
                per_million,
            };
        }
        let setup = Setup::new(faults.clone());
        let a = World::run(&setup);
        let b = World::run(&Setup::new(
            Faults::from_bytes(&faults.to_bytes().unwrap()).unwrap(),
        ));
        assert_eq!(a.rig().inj.fired(), b.rig().inj.fired(), "seed {seed}");
        for (fa, fb) in a.rig().flows.iter().zip(&b.rig().flows) {
            assert_eq!((&fa.got, &fa.end), (&fb.got, &fb.end), "seed {seed}");
        }
        assert_eq!(a.now, b.now);
    }
}

/// Without the faults that legitimately hand garbage to the application (a plausible wrong
/// length; a padded overrun packed with others), whatever random faults hit, every byte the
/// host received is a prefix of what was sent.
#[test]
fn random_faults_never_corrupt_data() {
    for seed in 100..160u64 {
        let mut faults = every_fault(seed);
        faults.rules.retain(|r| {
            !matches!(
                r.action,
                Action::SetLength(_) | Action::OverrunWindow { .. }
            )
        });
        for (i, r) in faults.rules.iter_mut().enumerate() {
            r.when = Trigger::Always {
                dir: Direction::BOTH[(seed as usize + i) % 2],
                filter: Filter::ANY,
                per_million: 15_000,
            };
        }
        let w = World::run(&Setup::new(faults));
        for f in &w.rig().flows {
            assert!(f.is_prefix(), "seed {seed}: {}", w.describe());
        }
    }
}

/// The injector itself never panics, whatever it is fed: noise, truncated and plausible headers
/// in both directions, with every action firing often.
#[test]
fn injector_survives_any_bytes() {
    let mut faults = every_fault(7);
    for r in faults.rules.iter_mut() {
        if !matches!(r.action, Action::Unplug) {
            r.when = Trigger::Always {
                dir: r.when.dir(),
                filter: Filter::ANY,
                per_million: 300_000,
            };
        }
    }
    let mut inj = FaultInjector::new(faults, 512);
    let mut x: u32 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut now = Instant::ZERO;
    let mut buf = [0u8; 600];
    for round in 0..20_000u32 {
        let len = next() as usize % buf.len();
        for b in buf.iter_mut() {
            *b = next() as u8;
        }
        if len >= 8 && round % 2 == 0 {
            let proto = [0u32, 1, 2, 6][next() as usize % 4];
            buf[0..4].copy_from_slice(&proto.to_be_bytes());
            let total = if round % 4 == 0 {
                len as u32
            } else {
                next() % 700
            };
            buf[4..8].copy_from_slice(&total.to_be_bytes());
        }
        if len >= 12 && round % 3 == 0 {
            buf[8..12].copy_from_slice(&0xFEED_FACE_u32.to_be_bytes());
        }
        if len >= 36 && round % 5 == 0 {
            buf[28] = 0x50;
            buf[29] = [0x02, 0x12, 0x10, 0x04, 0x11][next() as usize % 5];
        }
        let dir = Direction::BOTH[(next() % 2) as usize];
        inj.push(now, dir, &buf[..len], next() % 7 == 0);
        now += Duration::from_micros(u64::from(next() % 500));
        while inj.poll_output(now).is_some() {}
        let _ = inj.poll_at();
    }
}

// ---- Loss that only the sender's probe reveals ------------------------------------------

/// Nothing in usbmux retransmits: a lost packet is noticed when its connection sends again.
/// When the lost one was the *last* data packet of a burst, the sender's probe (a pure ACK at
/// its next seq after an idle interval with unacknowledged data) is what sends again: the
/// phone sees a seq it did not expect and resets with a reason the host sees.
#[test]
fn lost_last_packet_is_found_by_the_probe() {
    // The echo's 17th and last write (576 bytes) never reaches the phone.
    let w = run(Setup::one(Rule::at_packet(
        16,
        H2D,
        data(ECHO),
        Action::Drop,
    )));
    w.fired(0)
        .intact(SOURCE)
        .phone_reset(ResetKind::UnexpectedSeq, "unexpected sequence number")
        .reset(ECHO, ResetKind::PeerReset, "unexpected sequence number");
}

/// A window of 0 in the SYN|ACK: the host cannot send. Its probe (a pure ACK while its data
/// waits behind a closed window) reaches a phone that has been silent, which answers with its
/// real window, and the echo completes.
#[test]
fn zero_window_in_synack_is_recovered_by_the_probe() {
    let w = run(Setup::one(Rule::at_packet(
        0,
        D2H,
        Filter::on_port(PacketKind::SynAck, ECHO),
        Action::SetWindow(0),
    )));
    w.fired(0).intact(SOURCE).intact(ECHO);
}

// ---- Releasing a connection that closed itself still sends its RST -----------------------------

/// A phone that detects a violation ends its connection with a reason and an RST carrying it,
/// so the host sees `PeerReset` with the phone's text ("unexpected sequence number ..."), even
/// though `Phone` reads events (and releases the connection with `Session::reset`) before it
/// calls `poll_transmit`: `reset` sends an RST the connection had decided on but not yet sent.
#[test]
fn phone_rst_reason_reaches_host() {
    let w = run(Setup::one(Rule::at_packet(
        3,
        H2D,
        data(ECHO),
        Action::Drop,
    )));
    w.fired(0)
        .phone_reset(ResetKind::UnexpectedSeq, "unexpected sequence number")
        .reset(ECHO, ResetKind::PeerReset, "unexpected sequence number");
}

/// The same at the core level, without the simulator's `Phone`: a device session detects a bad
/// seq, its application sees `Event::Reset` and releases the slot with `reset(id)` before
/// calling `poll_transmit` — and the RST with the reason still goes out.
#[test]
fn reset_before_transmit_keeps_the_rst() {
    use usbmux_core::wire::{HeaderKind, Summary};
    use usbmux_core::Device;
    let cfg = SessionConfig::default();
    let mut host = HostSession::new(cfg, 1);
    let mut dev = Session::<Device, Vec<u8>, 4, 0>::new(cfg);
    let mut inj = FaultInjector::new(
        Faults::one(Rule::at_packet(0, H2D, data(ECHO), Action::SeqOffset(5))),
        512,
    );
    let bufs = || Buffers::new(vec![0u8; 4096], vec![0u8; 4096]);
    let id = host.connect(ECHO, bufs()).map_err(|e| e.0).unwrap();
    let now = Instant::ZERO;
    let mut buf = vec![0u8; 65536];
    let mut dev_rsts = Vec::new();
    for round in 0..20 {
        if round == 5 {
            host.send(id, b"hello").unwrap();
        }
        while let Some(t) = host.poll_transmit(now, &mut buf).unwrap() {
            inj.push(now, H2D, &buf[..t.len], t.zlp);
        }
        while let Some(out) = inj.poll_output(now) {
            match out {
                Output::Transfer {
                    dir: H2D, bytes, ..
                } => dev.handle_transfer(now, &bytes),
                Output::Transfer { bytes, .. } => host.handle_transfer(now, &bytes),
                Output::Unplug => {}
            }
        }
        // The application looks at events first, as `Phone` does.
        while let Some(e) = dev.poll_event() {
            match e {
                Event::Incoming { id, .. } => dev.accept(id, bufs()).map_err(|e| e.0).unwrap(),
                Event::Reset { id, .. } => {
                    dev.reset(id, "").unwrap();
                }
                _ => {}
            }
        }
        while let Some(t) = dev.poll_transmit(now, &mut buf).unwrap() {
            let line = Summary {
                bytes: &buf[..t.len],
                kind: HeaderKind::V2,
            }
            .to_string();
            if line.contains("RST") {
                dev_rsts.push(line);
            }
            inj.push(now, D2H, &buf[..t.len], t.zlp);
        }
        while host.poll_event().is_some() {}
    }
    assert_eq!(dev.stats().resets_bad_seq, 1, "the device detected it");
    assert!(
        dev_rsts.iter().any(|l| l.contains("RST")),
        "the device's RST (\"unexpected sequence number ...\") was never sent"
    );
}
