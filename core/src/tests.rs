//! Session-level tests: a host and a device `Session` back to back in memory.
//!
//! The `Pair` harness (after quinn-proto's `tests/util.rs`) moves transfers between the two
//! with deterministic time; `drive` runs until both are quiet and panics on livelock.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use std::collections::VecDeque;
use std::vec::Vec;

use crate::mux::{
    AcceptError, ConnectError, Phase, RecvError, SendError, SessionConfig, SessionStats,
};
use crate::storage::Buffers;
use crate::tcp::{ResetKind, State};
use crate::time::{Duration, Instant};
use crate::wire::ControlType;
use crate::{ConnId, Device, Event, Host, Session};

pub(crate) type HostSession = Session<Host, Vec<u8>, 40, 65536>;
pub(crate) type DeviceSession = Session<Device, Vec<u8>, 40, 0>;

/// Drops (false) or passes (true) one mux packet.
pub(crate) type Filter = Box<dyn FnMut(&[u8]) -> bool>;

pub(crate) fn bufs(rx: usize, tx: usize) -> Buffers<Vec<u8>> {
    Buffers::new(vec![0; rx], vec![0; tx])
}

/// What the device's application does with an incoming connection.
#[derive(Clone, Copy)]
pub(crate) enum Policy {
    Accept { rx: usize, tx: usize },
    Refuse,
    Ignore,
}

pub(crate) struct Pair {
    pub host: Box<HostSession>,
    pub dev: Box<DeviceSession>,
    pub now: Instant,
    pub host_events: Vec<Event>,
    pub dev_events: Vec<Event>,
    /// Device-side answer per port (default: refuse).
    pub policy: fn(u16) -> Policy,
    /// Device → host transfers are cut into pieces of this size (host reassembly).
    pub d2h_split: Option<usize>,
    /// Return false to drop a mux packet on the way (host → device, device → host).
    pub filter_h2d: Option<Filter>,
    pub filter_d2h: Option<Filter>,
    pub h2d_log: Vec<Vec<u8>>,
    pub d2h_log: Vec<Vec<u8>>,
    pub log: bool,
    pub accepted: Vec<ConnId>,
}

fn default_policy(port: u16) -> Policy {
    match port {
        7 | 9 | 19 | 1999 => Policy::Accept {
            rx: 128 * 1024,
            tx: 128 * 1024,
        },
        _ => Policy::Refuse,
    }
}

impl Pair {
    pub fn new() -> Self {
        Self::with_config(SessionConfig::default(), SessionConfig::default())
    }

    pub fn with_config(host_cfg: SessionConfig, dev_cfg: SessionConfig) -> Self {
        Pair {
            host: Box::new(HostSession::new(host_cfg, 1)),
            dev: Box::new(DeviceSession::new(dev_cfg)),
            now: Instant::from_millis(1000),
            host_events: Vec::new(),
            dev_events: Vec::new(),
            policy: default_policy,
            d2h_split: None,
            filter_h2d: None,
            filter_d2h: None,
            h2d_log: Vec::new(),
            d2h_log: Vec::new(),
            log: false,
            accepted: Vec::new(),
        }
    }

    /// A pair whose handshake is done.
    pub fn connected() -> Self {
        let mut p = Self::new();
        p.drive();
        assert_eq!(p.host.phase(), Phase::Active);
        assert_eq!(p.dev.phase(), Phase::Active);
        p
    }

    /// Moves every pending packet once in each direction; true if anything moved.
    pub fn step(&mut self) -> bool {
        let mut moved = false;
        let mut buf = vec![0u8; 65536];
        while let Some(t) = self.host.poll_transmit(self.now, &mut buf).expect("buffer") {
            moved = true;
            let pkt = &buf[..t.len];
            assert_eq!(t.zlp, t.len % 512 == 0);
            if self.log {
                self.h2d_log.push(pkt.to_vec());
            }
            if self.filter_h2d.as_mut().is_none_or(|f| f(pkt)) {
                self.dev.handle_transfer(self.now, pkt);
                if t.zlp {
                    self.dev.handle_transfer(self.now, &[]);
                }
            }
        }
        let mut out = VecDeque::new();
        while let Some(t) = self.dev.poll_transmit(self.now, &mut buf).expect("buffer") {
            moved = true;
            let pkt = buf[..t.len].to_vec();
            if self.log {
                self.d2h_log.push(pkt.clone());
            }
            if self.filter_d2h.as_mut().is_none_or(|f| f(&pkt)) {
                out.push_back(pkt);
            }
        }
        for pkt in out {
            match self.d2h_split {
                Some(n) => {
                    for piece in pkt.chunks(n) {
                        self.host.handle_transfer(self.now, piece);
                    }
                }
                None => self.host.handle_transfer(self.now, &pkt),
            }
        }
        while let Some(e) = self.host.poll_event() {
            moved = true;
            self.host_events.push(e);
        }
        while let Some(e) = self.dev.poll_event() {
            moved = true;
            if let Event::Incoming { id, port } = e {
                match (self.policy)(port) {
                    Policy::Accept { rx, tx } => {
                        self.dev
                            .accept(id, bufs(rx, tx))
                            .map_err(|e| e.0)
                            .expect("accept");
                        self.accepted.push(id);
                    }
                    Policy::Refuse => self.dev.refuse(id, b"no service").expect("refuse"),
                    Policy::Ignore => {}
                }
            }
            self.dev_events.push(e);
        }
        moved
    }

    /// Steps until quiet (no packets, no events), bounded.
    #[track_caller]
    pub fn drive(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("livelock: still busy after 100000 steps");
    }

    /// Advances the clock by `d` and fires timers on both sides, then drives.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.host.handle_timeout(self.now);
        self.dev.handle_timeout(self.now);
        self.drive();
    }

    /// Advances to the earliest timer of either side (if any), then drives.
    pub fn fire_next_timer(&mut self) -> bool {
        let t = [self.host.poll_timeout(), self.dev.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        match t {
            Some(t) => {
                if t > self.now {
                    self.now = t;
                }
                self.host.handle_timeout(self.now);
                self.dev.handle_timeout(self.now);
                self.drive();
                true
            }
            None => false,
        }
    }

    pub fn connect(&mut self, port: u16) -> ConnId {
        self.connect_with(port, 128 * 1024, 128 * 1024)
    }

    pub fn connect_with(&mut self, port: u16, rx: usize, tx: usize) -> ConnId {
        let id = self
            .host
            .connect(port, bufs(rx, tx))
            .map_err(|e| e.0)
            .expect("connect");
        self.drive();
        id
    }

    /// The device-side id of the n-th accepted connection.
    pub fn dev_id(&self, n: usize) -> ConnId {
        self.accepted[n]
    }

    pub fn host_has(&self, pred: impl Fn(&Event) -> bool) -> bool {
        self.host_events.iter().any(pred)
    }

    pub fn dev_has(&self, pred: impl Fn(&Event) -> bool) -> bool {
        self.dev_events.iter().any(pred)
    }
}

/// Deterministic test data.
pub(crate) fn pattern(len: usize, seed: u32) -> Vec<u8> {
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

/// Moves `data` from one side to the other through connection ids `from`/`to`, reading with
/// `read_chunk`-sized reads (a slow reader reads little per step). Returns what arrived.
pub(crate) fn transfer(
    p: &mut Pair,
    host_sends: bool,
    from: ConnId,
    to: ConnId,
    data: &[u8],
    read_chunk: usize,
) -> Vec<u8> {
    let mut sent = 0;
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; read_chunk];
    let mut idle = 0;
    while got.len() < data.len() {
        let before = (sent, got.len());
        if sent < data.len() {
            let n = if host_sends {
                p.host.send(from, &data[sent..])
            } else {
                p.dev.send(from, &data[sent..])
            }
            .expect("send");
            sent += n;
        }
        p.step();
        let r = if host_sends {
            p.dev.recv(to, &mut buf)
        } else {
            p.host.recv(to, &mut buf)
        };
        match r {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("recv: {e:?} after {} bytes", got.len()),
        }
        if (sent, got.len()) == before {
            idle += 1;
            // Let delayed ACKs fire.
            p.fire_next_timer();
            assert!(
                idle < 1000,
                "stalled at {} of {} bytes",
                got.len(),
                data.len()
            );
        } else {
            idle = 0;
        }
    }
    got
}

// ---------------------------------------------------------------------------------------------

#[test]
fn handshake_v2_byte_exact() {
    let mut p = Pair::new();
    p.log = true;
    p.drive();
    // PROTOCOL.md §6.3 and §6.4.
    assert_eq!(
        p.h2d_log[0],
        [0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        p.h2d_log[1],
        [0, 0, 0, 2, 0, 0, 0, 0x11, 0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0xFF, 0xFF, 7]
    );
    // The device's reply: an 8-byte header, version 2.0.
    assert_eq!(
        p.d2h_log[0],
        [0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(p.host.version(), Some(2));
    assert_eq!(p.dev.version(), Some(2));
    assert!(p.host_has(|e| *e == Event::HandshakeDone { version: 2 }));
    assert!(p.dev_has(|e| *e == Event::HandshakeDone { version: 2 }));
    // §6.5: the first SYN (source port 1 → lockdown 62078), tx_seq 1, rx_seq 0xFFFF.
    p.host
        .connect(62078, bufs(128 * 1024, 1024))
        .map_err(|e| e.0)
        .expect("connect");
    p.step();
    assert_eq!(
        p.h2d_log[2],
        [
            0, 0, 0, 6, 0, 0, 0, 0x24, 0xFE, 0xED, 0xFA, 0xCE, 0, 1, 0xFF, 0xFF, //
            0, 1, 0xF2, 0x7E, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0x02, 0x00, 0, 0, 0, 0
        ]
    );
}

#[test]
fn handshake_v1() {
    let dev_cfg = SessionConfig {
        device_version: 1,
        ..SessionConfig::default()
    };
    let mut p = Pair::with_config(SessionConfig::default(), dev_cfg);
    p.log = true;
    p.drive();
    assert_eq!(p.host.version(), Some(1));
    // No SETUP in v1; the SYN carries an 8-byte header.
    let id = p.connect(7);
    assert!(p.host_has(|e| *e == Event::Connected(id)));
    assert_eq!(p.h2d_log[1].len(), 8 + 20);
    let d = pattern(100_000, 1);
    let dev = p.dev_id(0);
    assert_eq!(transfer(&mut p, true, id, dev, &d, 4096), d);
}

#[test]
fn host_drops_everything_before_version_reply() {
    let mut p = Pair::new();
    // A leftover TCP packet from an earlier session arrives first (PROTOCOL.md §5.17).
    let stale = [
        0, 0, 0, 6, 0, 0, 0, 0x24, 0xFE, 0xED, 0xFA, 0xCE, 0, 9, 0, 9, //
        0xF2, 0x7E, 0, 5, 0, 0, 0, 7, 0, 0, 0, 1, 0x50, 0x10, 0x02, 0x00, 0, 0, 0, 0,
    ];
    p.host.handle_transfer(p.now, &stale);
    assert_eq!(p.host.stats().dropped_before_handshake, 1);
    assert_eq!(p.host.phase(), Phase::Handshake);
    p.drive();
    assert_eq!(p.host.phase(), Phase::Active);
    // It was dropped, not answered with an RST.
    let s: SessionStats = p.host.stats();
    assert_eq!(s.anon_rsts_sent, 0);
}

#[test]
fn version_retries_then_handshake_failed() {
    let mut p = Pair::new();
    p.filter_h2d = Some(Box::new(|_| false)); // the phone never hears us
    p.drive();
    let id = p
        .host
        .connect(7, bufs(1024, 1024))
        .map_err(|e| e.0)
        .expect("queued");
    for _ in 0..10 {
        p.fire_next_timer();
    }
    assert_eq!(p.host.phase(), Phase::Dead);
    assert_eq!(p.host.stats().version_packets, 3);
    assert!(p.host_has(|e| *e == Event::HandshakeFailed));
    assert!(p.host_has(|e| matches!(e, Event::Refused { id: i, reason } if *i == id && reason.kind == ResetKind::HandshakeFailed)));
    assert_eq!(
        p.host.connect(7, bufs(1024, 1024)).map_err(|e| e.0),
        Err(ConnectError::SessionDead)
    );
    assert!(p.host.reset(id, "").is_ok());
}

#[test]
fn host_rejects_unsupported_version() {
    let mut p = Pair::new();
    let mut buf = [0u8; 64];
    let t = p.host.poll_transmit(p.now, &mut buf).unwrap().unwrap();
    assert_eq!(t.len, 20);
    // VERSION 3.0 in reply.
    p.host.handle_transfer(
        p.now,
        &[
            0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    assert_eq!(p.host.phase(), Phase::Dead);
    assert_eq!(p.host.poll_event(), Some(Event::HandshakeFailed));
}

#[test]
fn connect_and_refuse() {
    let mut p = Pair::connected();
    let ok = p.connect(7);
    assert!(p.host_has(|e| *e == Event::Connected(ok)));
    assert_eq!(p.host.state(ok), Some(State::Established));
    let no = p.connect(4242);
    let refused = p.host_events.iter().find_map(|e| match e {
        Event::Refused { id, reason } if *id == no => Some(reason.clone()),
        _ => None,
    });
    let reason = refused.expect("refused");
    assert_eq!(reason.kind, ResetKind::Refused);
    assert_eq!(reason.text(), b"no service");
    assert_eq!(p.host.recv(no, &mut [0u8; 8]), Err(RecvError::Finished));
    let b = p.host.reset(no, "").expect("release");
    assert_eq!(b.rx.len(), 128 * 1024);
    assert_eq!(
        p.host.recv(no, &mut [0u8; 8]),
        Err(RecvError::InvalidHandle)
    );
}

#[test]
fn scans_stop_at_the_highest_slot_in_use_and_holes_are_reused() {
    let mut p = Pair::connected();
    assert_eq!((p.host.live_mark(), p.dev.live_mark()), (0, 0));
    let ids: Vec<ConnId> = (0..3).map(|_| p.connect(7)).collect();
    assert_eq!(
        ids.iter().map(|id| id.index()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!((p.host.live_mark(), p.dev.live_mark()), (3, 3));
    // Freeing the top slot lowers the mark; a hole below it does not.
    p.host.reset(ids[2], "").expect("release");
    assert_eq!(p.host.live_mark(), 2);
    p.host.reset(ids[0], "").expect("release");
    assert_eq!(p.host.live_mark(), 2);
    p.drive();
    // The device released nothing yet: its connections stay below its own mark.
    assert_eq!(p.dev.live_mark(), 3);
    // A new connection takes the hole, and both live connections still carry data both ways.
    let d = p.connect(7);
    assert_eq!((d.index(), p.host.live_mark()), (0, 2));
    for (k, (host, dev)) in [(ids[1], p.dev_id(1)), (d, p.dev_id(3))]
        .into_iter()
        .enumerate()
    {
        let up = pattern(200_000, 20 + k as u32);
        assert!(transfer(&mut p, true, host, dev, &up, 4096) == up);
        let down = pattern(200_000, 30 + k as u32);
        assert!(transfer(&mut p, false, dev, host, &down, 4096) == down);
    }
    p.host.reset(ids[1], "").expect("release");
    p.host.reset(d, "").expect("release");
    assert_eq!(p.host.live_mark(), 0);
    assert_eq!(p.host.connection_count(), 0);
}

#[test]
fn a_source_fills_packets_in_place_after_the_send_buffer_within_the_window() {
    let mut p = Pair::connected();
    let id = p.connect(7);
    let other = p.connect(9);
    let dev = p.dev_id(0);
    let data = pattern(1 << 20, 41);
    // The first bytes go through the send buffer; the source must not be asked before they
    // are out, or the stream would arrive out of order.
    assert_eq!(p.host.send(id, &data[..1000]), Ok(1000));
    let (mut next, mut largest_ask, mut zlps) = (1000, 0, 0);
    let mut got = Vec::new();
    let (mut buf, mut rx) = (vec![0u8; 65536], vec![0u8; 65536]);
    for _ in 0..100_000 {
        if got.len() == data.len() {
            break;
        }
        let now = p.now;
        while let Some(t) = p
            .host
            .poll_transmit_with(now, &mut buf, &mut |cid, dst| {
                if cid == other {
                    return 0; // a connection with nothing to say
                }
                assert_eq!(cid, id, "asked for a connection that does not exist");
                largest_ask = largest_ask.max(dst.len());
                // Short reads, as from a socket.
                let n = dst.len().min(data.len() - next).min(30_000);
                dst[..n].copy_from_slice(&data[next..next + n]);
                next += n;
                n
            })
            .expect("buffer")
        {
            assert_eq!(t.zlp, t.len % 512 == 0);
            zlps += usize::from(t.zlp);
            p.dev.handle_transfer(now, &buf[..t.len]);
            if t.zlp {
                p.dev.handle_transfer(now, &[]);
            }
        }
        while let Ok(n @ 1..) = p.dev.recv(dev, &mut rx) {
            got.extend_from_slice(&rx[..n]);
        }
        // The device's acks and window updates back to the host.
        p.step();
    }
    assert!(got == data, "bytes lost, repeated or reordered");
    assert!(
        largest_ask > 0 && largest_ask <= 128 * 1024,
        "asked {largest_ask}"
    );
    assert_eq!(zlps, 0, "a full packet from the source needed a ZLP");
    assert_eq!(p.host.conn_stats(id).unwrap().bytes_sent, 1 << 20);
    assert_eq!(
        p.host.stats().seq_anomalies + p.dev.stats().seq_anomalies,
        0
    );
}

#[test]
fn bytes_read_ahead_into_the_payload_area_go_out_in_that_connections_packet_only() {
    let mut p = Pair::new();
    // Before the handshake the header size, and so the payload's place, is not known.
    assert_eq!(p.host.payload_area(65536), None);
    p.drive();
    // v2: 16-byte mux header, 20-byte TCP header; 49 152 bytes in all (the default packet
    // size) would be a multiple of 512 and need a ZLP, so the area is one byte shorter.
    assert_eq!(p.host.payload_area(65536), Some(36..49151));
    assert_eq!(p.host.payload_area(1000), Some(36..1000));
    assert_eq!(p.host.payload_area(30), None);
    p.policy = |_| Policy::Accept {
        rx: 64 * 1024,
        tx: 1024,
    };
    let id = p.connect(7);
    let other = p.connect(9);
    let (dev, dev_other) = (p.dev_id(0), p.dev_id(1));
    // Fill `id`'s 64 KiB window, so the next bytes can only be read ahead.
    let data = pattern(100_000, 53);
    let mut next = 0;
    pump_source(&mut p, id, &data, &mut next);
    assert_eq!(next, 64 * 1024);
    assert_eq!(p.host.connection(id).unwrap().peer_window(), 0);
    // Read ahead into a set-aside buffer while the window is closed; meanwhile the other
    // connection has bytes queued and a session-level RST waits (a stale connection's): none
    // of them may be built in that buffer.
    let mut held = vec![0u8; 65536];
    let area = p.host.payload_area(held.len()).expect("active");
    let staged = (data.len() - next).min(area.len());
    held[area.start..area.start + staged].copy_from_slice(&data[next..next + staged]);
    assert_eq!(p.host.send(other, b"other bytes"), Ok(11));
    let gone = p.connect(7);
    p.host
        .reset(gone, "a reason to overwrite")
        .expect("release");
    let now = p.now;
    let mut asked = 0;
    // Window still closed: nothing for `id`, and nothing else either.
    let nothing = p
        .host
        .poll_transmit_for_with(now, id, &mut held, &mut |_, _| {
            asked += 1;
            0
        })
        .expect("buffer");
    assert_eq!(
        (nothing, asked),
        (None, 0),
        "built a packet with the window closed"
    );
    assert!(held[area.start..area.start + staged] == data[next..next + staged]);
    // The device reads: its window opens (its update reaches the host through `step`, which
    // also carries the other connection's bytes in ordinary buffers).
    let mut rx = vec![0u8; 128 * 1024];
    let mut got = Vec::new();
    while let Ok(n @ 1..) = p.dev.recv(dev, &mut rx) {
        got.extend_from_slice(&rx[..n]);
    }
    p.drive();
    assert!(p.host.connection(id).unwrap().peer_window() >= staged);
    let base = held.as_ptr() as usize;
    let t = p
        .host
        .poll_transmit_for_with(now, id, &mut held, &mut |cid, dst| {
            assert_eq!(cid, id);
            assert_eq!(
                dst.as_ptr() as usize,
                base + area.start,
                "payload elsewhere"
            );
            staged.min(dst.len())
        })
        .expect("buffer")
        .expect("the read-ahead packet");
    assert_eq!(t.len, area.start + staged);
    p.dev.handle_transfer(now, &held[..t.len]);
    next += staged;
    // A stale handle builds nothing.
    let stale = p
        .host
        .poll_transmit_for_with(now, gone, &mut held, &mut |_, _| 0)
        .expect("buffer");
    assert_eq!(stale, None);
    pump_source(&mut p, id, &data, &mut next);
    for _ in 0..100 {
        while let Ok(n @ 1..) = p.dev.recv(dev, &mut rx) {
            got.extend_from_slice(&rx[..n]);
        }
        pump_source(&mut p, id, &data, &mut next);
        if got.len() == data.len() {
            break;
        }
    }
    assert!(got == data, "bytes lost, repeated or reordered");
    let mut other_got = [0u8; 16];
    assert_eq!(p.dev.recv(dev_other, &mut other_got), Ok(11));
    assert_eq!(&other_got[..11], b"other bytes");
}

/// Host → device through a source (as the daemon reads client sockets) until nothing moves;
/// the device's answers go back through `p.step`.
fn pump_source(p: &mut Pair, id: ConnId, data: &[u8], next: &mut usize) {
    let mut buf = vec![0u8; 65536];
    for _ in 0..1000 {
        let now = p.now;
        let mut moved = false;
        while let Some(t) = p
            .host
            .poll_transmit_with(now, &mut buf, &mut |cid, dst| {
                if cid != id {
                    return 0;
                }
                let n = dst.len().min(data.len() - *next);
                dst[..n].copy_from_slice(&data[*next..*next + n]);
                *next += n;
                n
            })
            .expect("buffer")
        {
            moved = true;
            p.dev.handle_transfer(now, &buf[..t.len]);
        }
        moved |= p.step();
        if !moved {
            return;
        }
    }
    panic!("still busy after 1000 rounds");
}

#[test]
fn a_source_held_up_by_a_closed_window_counts_a_stall_and_probes_for_a_lost_update() {
    let mut p = Pair::connected();
    p.policy = |_| Policy::Accept { rx: 1024, tx: 1024 };
    let id = p.connect(7);
    let dev = p.dev_id(0);
    let data = pattern(10_000, 47);
    let mut next = 0;
    pump_source(&mut p, id, &data, &mut next);
    // The device's 1 KiB window is full and its reader idle; the rest waits at the source,
    // where the engine cannot see it.
    assert_eq!(next, 1024);
    assert_eq!(p.host.connection(id).unwrap().peer_window(), 0);
    assert_eq!(p.host.conn_stats(id).unwrap().window_stalls, 1);
    // The device reads everything, but its window updates (and re-acks) are all lost: only
    // the host's probe can ask again.
    p.filter_d2h = Some(Box::new(|_| false));
    let mut rx = vec![0u8; 4096];
    assert_eq!(p.dev.recv(dev, &mut rx), Ok(1024));
    let mut got = rx[..1024].to_vec();
    p.drive();
    for _ in 0..4 {
        p.fire_next_timer();
    }
    assert!(p.host.conn_stats(id).unwrap().probes_sent >= 1, "no probe");
    p.filter_d2h = None;
    for _ in 0..200 {
        p.fire_next_timer();
        pump_source(&mut p, id, &data, &mut next);
        while let Ok(n @ 1..) = p.dev.recv(dev, &mut rx) {
            got.extend_from_slice(&rx[..n]);
        }
        if got.len() == data.len() {
            break;
        }
    }
    assert!(got == data, "bytes lost, repeated or reordered");
}

#[test]
fn a_sink_takes_bytes_before_the_receive_buffer_and_only_while_it_is_empty() {
    let mut p = Pair::connected();
    let id = p.connect(7);
    let dev = p.dev_id(0);
    let data = pattern(1 << 20, 43);
    let (mut sent, mut got, mut offered_with_queue) = (0usize, Vec::new(), 0usize);
    let (mut buf, mut rx) = (vec![0u8; 65536], vec![0u8; 65536]);
    let mut round = 0usize;
    for _ in 0..100_000 {
        if got.len() == data.len() {
            break;
        }
        round += 1;
        if sent < data.len() {
            sent += p.dev.send(dev, &data[sent..]).expect("send");
        }
        let now = p.now;
        while let Some(t) = p.dev.poll_transmit(now, &mut buf).expect("buffer") {
            // What the host's receive buffer holds before this transfer: the sink may only be
            // offered data while it is empty, or the stream would be reordered.
            let queued = p.host.peek(id).map_or(0, <[u8]>::len);
            p.host
                .handle_transfer_with(now, &buf[..t.len], &mut |cid, bytes| {
                    assert_eq!(cid, id, "offered data of a connection that does not exist");
                    offered_with_queue += queued;
                    // Take all, some or none, as a socket would.
                    let n = match round % 3 {
                        0 => bytes.len(),
                        1 => bytes.len().min(10_000),
                        _ => 0,
                    };
                    got.extend_from_slice(&bytes[..n]);
                    n
                });
            if t.zlp {
                p.host.handle_transfer(now, &[]);
            }
        }
        // Every third round the application also reads what was queued (after the sink took
        // its part, which came first on the wire).
        if round % 3 == 2 {
            while let Ok(n @ 1..) = p.host.recv(id, &mut rx) {
                got.extend_from_slice(&rx[..n]);
            }
        }
        // Window updates back to the device: bytes the sink took count as read.
        p.step();
    }
    assert_eq!(
        offered_with_queue, 0,
        "offered data while older bytes were queued"
    );
    assert!(got == data, "bytes lost, repeated or reordered");
    assert_eq!(p.host.conn_stats(id).unwrap().bytes_received, 1 << 20);
}

#[test]
fn connect_times_out_without_synack() {
    let mut p = Pair::connected();
    p.policy = |_| Policy::Ignore;
    // The device would give up on the unaccepted connection no sooner than the host's connect
    // timeout, so what ends it here is the host's timer.
    assert!(p.dev.config().accept_timeout >= p.host.config().conn.connect_timeout);
    let id = p.connect(7);
    assert_eq!(p.host.state(id), Some(State::SynSent));
    p.advance(Duration::from_secs(5));
    assert!(p.host_has(|e| matches!(e, Event::Refused { id: i, reason } if *i == id && reason.kind == ResetKind::ConnectTimeout)));
}

#[test]
fn ten_mib_each_way() {
    let mut p = Pair::connected();
    let id = p.connect(7);
    let dev = p.dev_id(0);
    let up = pattern(10 << 20, 7);
    assert!(transfer(&mut p, true, id, dev, &up, 64 * 1024) == up);
    let down = pattern(10 << 20, 8);
    assert!(transfer(&mut p, false, dev, id, &down, 64 * 1024) == down);
    let hs = p.host.conn_stats(id).unwrap();
    assert_eq!(hs.bytes_sent, 10 << 20);
    assert_eq!(hs.bytes_received, 10 << 20);
    assert_eq!(p.host.stats().seq_anomalies, 0);
    assert_eq!(p.dev.stats().seq_anomalies, 0);
}

#[test]
fn ten_mib_through_4k_in_transfers() {
    let mut p = Pair::connected();
    p.d2h_split = Some(4096);
    let id = p.connect(7);
    let dev = p.dev_id(0);
    let down = pattern(10 << 20, 9);
    assert!(transfer(&mut p, false, dev, id, &down, 100_000) == down);
}

#[test]
fn thirty_two_connections_interleaved() {
    let mut p = Pair::connected();
    let ids: Vec<ConnId> = (0..32).map(|_| p.connect(7)).collect();
    assert_eq!(p.accepted.len(), 32);
    let data: Vec<Vec<u8>> = (0..32)
        .map(|i| pattern(50_000 + i * 1000, i as u32))
        .collect();
    let mut sent = vec![0usize; 32];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); 32];
    let mut buf = vec![0u8; 7000];
    for _ in 0..10_000 {
        for i in 0..32 {
            if sent[i] < data[i].len() {
                let end = (sent[i] + 3000).min(data[i].len());
                sent[i] += p.host.send(ids[i], &data[i][sent[i]..end]).unwrap();
            }
        }
        p.step();
        for i in 0..32 {
            let n = p.dev.recv(p.accepted[i], &mut buf).unwrap();
            got[i].extend_from_slice(&buf[..n]);
        }
        if (0..32).all(|i| got[i].len() == data[i].len()) {
            break;
        }
        p.fire_next_timer();
    }
    for i in 0..32 {
        assert!(got[i] == data[i], "connection {i}");
    }
    // Source ports were distinct and increasing from the first port.
    let ports: Vec<u16> = ids
        .iter()
        .map(|&id| p.host.connection(id).unwrap().local_port())
        .collect();
    assert_eq!(ports, (1..=32).collect::<Vec<u16>>());
}

#[test]
fn reset_mid_stream_both_sides_see_reason() {
    let mut p = Pair::connected();
    let a = p.connect(7);
    let b = p.connect(7);
    let (da, db) = (p.dev_id(0), p.dev_id(1));
    p.host.send(a, &pattern(5000, 1)).unwrap();
    p.drive();
    // The device resets `a` with its own reason.
    let bufs_back = p.dev.reset(da, "service crashed").expect("reset");
    assert_eq!(bufs_back.tx.len(), 128 * 1024);
    p.drive();
    let reason = p.host_events.iter().find_map(|e| match e {
        Event::Reset { id, reason } if *id == a => Some(reason.clone()),
        _ => None,
    });
    let reason = reason.expect("host saw the reset");
    assert_eq!(reason.kind, ResetKind::PeerReset);
    assert_eq!(reason.text(), b"service crashed");
    assert_eq!(p.host.send(a, b"x"), Err(SendError::Closed));
    // The other connection is untouched.
    let d = pattern(70_000, 2);
    assert!(transfer(&mut p, true, b, db, &d, 9000) == d);
    // And the host resets b: the device sees the host's text.
    p.host.reset(b, "client went away").unwrap();
    p.drive();
    assert!(p.dev_has(|e| matches!(e, Event::Reset { id, reason } if *id == db && reason.text() == b"client went away")));
}

#[test]
fn data_before_reset_is_still_readable() {
    let mut p = Pair::connected();
    let a = p.connect(7);
    let da = p.dev_id(0);
    p.dev.send(da, b"last words").unwrap();
    p.step();
    p.dev.reset(da, "bye").unwrap();
    p.drive();
    let mut buf = [0u8; 64];
    assert_eq!(p.host.recv(a, &mut buf), Ok(10));
    assert_eq!(&buf[..10], b"last words");
    assert_eq!(p.host.recv(a, &mut buf), Err(RecvError::Finished));
    let ev_read = p
        .host_events
        .iter()
        .position(|e| *e == Event::Readable(a))
        .unwrap();
    let ev_reset = p
        .host_events
        .iter()
        .position(|e| matches!(e, Event::Reset { id, .. } if *id == a))
        .unwrap();
    assert!(ev_read < ev_reset);
}

#[test]
fn device_unplug() {
    let mut p = Pair::connected();
    let a = p.connect(7);
    let b = p.connect(7);
    p.host.handle_disconnect();
    p.drive();
    for id in [a, b] {
        assert!(p.host_has(|e| matches!(e, Event::Reset { id: i, reason } if *i == id && reason.kind == ResetKind::Unplugged)));
    }
    assert_eq!(p.host.phase(), Phase::Dead);
    // No RST went to the device (the link is gone).
    let mut buf = [0u8; 128];
    assert_eq!(p.host.poll_transmit(p.now, &mut buf), Ok(None));
    assert!(p.host.reset(a, "").is_ok());
}

#[test]
fn pool_full_is_refused_not_panicking() {
    let mut p = Pair::connected();
    // Host side: 40 slots.
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(p.host.connect(9, bufs(512, 512)).map_err(|e| e.0).unwrap());
    }
    let e = p.host.connect(9, bufs(512, 512)).map_err(|e| e.0);
    assert_eq!(e, Err(ConnectError::PoolFull));
    p.drive();
    assert_eq!(p.dev.connection_count(), 40);
    // Releasing one makes room again, on both sides (the device saw our RST).
    p.host.reset(ids[0], "").unwrap();
    p.drive();
    assert_eq!(
        p.dev.connection_count(),
        40,
        "device keeps the closed one until released"
    );
    let again = p
        .host
        .connect(9, bufs(512, 512))
        .map_err(|e| e.0)
        .expect("slot free again");
    p.drive();
    assert!(p.host_has(|e| matches!(e, Event::Refused { id, reason } if *id == again && reason.text() == b"connection pool full")));
    assert_eq!(p.dev.stats().pool_full, 1);
}

#[test]
fn device_pool_full_refuses_with_rst() {
    type SmallDev = Session<Device, Vec<u8>, 2, 0>;
    let mut host = HostSession::new(SessionConfig::default(), 100);
    let mut dev = SmallDev::new(SessionConfig::default());
    let now = Instant::ZERO;
    let mut buf = vec![0u8; 65536];
    let ids: Vec<ConnId> = (0..3)
        .map(|_| host.connect(7, bufs(1024, 1024)).map_err(|e| e.0).unwrap())
        .collect();
    for _ in 0..20 {
        while let Some(t) = host.poll_transmit(now, &mut buf).unwrap() {
            dev.handle_transfer(now, &buf[..t.len]);
        }
        while let Some(e) = dev.poll_event() {
            if let Event::Incoming { id, .. } = e {
                dev.accept(id, bufs(1024, 1024)).map_err(|e| e.0).unwrap();
            }
        }
        while let Some(t) = dev.poll_transmit(now, &mut buf).unwrap() {
            host.handle_transfer(now, &buf[..t.len]);
        }
    }
    assert_eq!(dev.stats().pool_full, 1);
    let mut connected = 0;
    let mut refused = Vec::new();
    while let Some(e) = host.poll_event() {
        match e {
            Event::Connected(_) => connected += 1,
            Event::Refused { id, reason } => refused.push((id, reason)),
            _ => {}
        }
    }
    assert_eq!(connected, 2);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, ids[2]);
    assert_eq!(refused[0].1.text(), b"connection pool full");
}

#[test]
fn slow_reader_on_device_stops_host_without_loss() {
    let mut p = Pair::connected();
    p.policy = |_| Policy::Accept { rx: 1024, tx: 1024 };
    let id = p.connect(7);
    let dev = p.dev_id(0);
    let d = pattern(300_000, 3);
    // Host can queue much more than the device's 1 KiB window; the device reads 100 B a step.
    let got = transfer(&mut p, true, id, dev, &d, 100);
    assert!(got == d);
    assert_eq!(p.dev.stats().resets_window_overflow, 0);
    assert!(p.host.conn_stats(id).unwrap().window_stalls > 0);
}

#[test]
fn slow_reader_on_host_stops_device_without_loss() {
    let mut p = Pair::connected();
    let id = p.connect_with(7, 768, 4096);
    let dev = p.dev_id(0);
    let d = pattern(200_000, 4);
    let got = transfer(&mut p, false, dev, id, &d, 50);
    assert!(got == d);
    assert!(p.dev.conn_stats(dev).unwrap().window_stalls > 0);
}

#[test]
fn lost_window_update_recovered_by_idle_reack() {
    let mut p = Pair::connected();
    let id = p.connect_with(7, 4096, 4096);
    let dev = p.dev_id(0);
    // Device fills the host's 4 KiB window.
    let d = pattern(20_000, 5);
    let mut sent = p.dev.send(dev, &d).unwrap();
    p.drive();
    assert_eq!(p.host.connection(id).unwrap().recv_queue(), 4096);
    // The host reads everything, but its window update is lost on the way.
    let mut got = vec![0u8; 4096];
    assert_eq!(p.host.recv(id, &mut got), Ok(4096));
    let dropped = std::rc::Rc::new(std::cell::Cell::new(0));
    let dd = dropped.clone();
    p.filter_h2d = Some(Box::new(move |_| {
        if dd.get() == 0 {
            dd.set(1);
            false
        } else {
            true
        }
    }));
    p.drive();
    assert_eq!(dropped.get(), 1, "the update was dropped");
    assert_eq!(
        p.host.connection(id).unwrap().recv_queue(),
        0,
        "device is stuck"
    );
    // The idle re-ACK brings it back.
    p.fire_next_timer();
    assert!(p.host.conn_stats(id).unwrap().reacks_sent >= 1);
    let mut all = got;
    let mut buf = vec![0u8; 4096];
    for _ in 0..200 {
        sent += p.dev.send(dev, &d[sent..]).unwrap();
        p.drive();
        let n = p.host.recv(id, &mut buf).unwrap();
        all.extend_from_slice(&buf[..n]);
        if all.len() == d.len() {
            break;
        }
        p.fire_next_timer();
    }
    assert!(all == d);
}

#[test]
fn bad_seq_resets_only_that_connection() {
    let mut p = Pair::connected();
    let a = p.connect(7);
    let b = p.connect(7);
    let db = p.dev_id(1);
    // Drop one device→host data packet on `a` (dport = a's source port 1): the next one has an
    // unexpected seq.
    let a_port = p.host.connection(a).unwrap().local_port();
    let mut n = 0;
    p.filter_d2h = Some(Box::new(move |pkt| {
        let is_a_data = pkt.len() > 36 && u16::from_be_bytes([pkt[18], pkt[19]]) == a_port;
        if is_a_data {
            n += 1;
            return n != 1;
        }
        true
    }));
    let da = p.dev_id(0);
    p.dev.send(da, b"first").unwrap();
    p.step();
    p.dev.send(da, b"second").unwrap();
    p.drive();
    let reason = p.host_events.iter().find_map(|e| match e {
        Event::Reset { id, reason } if *id == a => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(reason.expect("reset").kind, ResetKind::UnexpectedSeq);
    assert_eq!(p.host.stats().resets_bad_seq, 1);
    // The device saw our RST with the reason.
    assert!(p.dev_has(|e| matches!(e, Event::Reset { id, reason } if *id == da && reason.text().starts_with(b"unexpected sequence number"))));
    let d = pattern(10_000, 6);
    assert!(transfer(&mut p, false, db, b, &d, 10_000) == d);
}

/// Feeds the host a hand-made TCP packet on an established connection.
fn inject_to_host(
    p: &mut Pair,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: &[u8],
) {
    let len = 16 + 20 + payload.len();
    let mut pkt = vec![0u8; len];
    pkt[0..4].copy_from_slice(&6u32.to_be_bytes());
    pkt[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    pkt[8..12].copy_from_slice(&0xFEED_FACEu32.to_be_bytes());
    pkt[16..18].copy_from_slice(&sport.to_be_bytes());
    pkt[18..20].copy_from_slice(&dport.to_be_bytes());
    pkt[20..24].copy_from_slice(&seq.to_be_bytes());
    pkt[24..28].copy_from_slice(&ack.to_be_bytes());
    pkt[28] = 0x50;
    pkt[29] = flags;
    pkt[30..32].copy_from_slice(&window.to_be_bytes());
    pkt[36..].copy_from_slice(payload);
    p.host.handle_transfer(p.now, &pkt);
}

#[test]
fn ack_beyond_sent_resets() {
    let mut p = Pair::connected();
    let a = p.connect(7);
    let sport = p.host.connection(a).unwrap().local_port();
    inject_to_host(&mut p, 7, sport, 1, 1000, 0x10, 512, b"");
    p.drive();
    assert!(p.host_has(|e| matches!(e, Event::Reset { id, reason } if *id == a && reason.kind == ResetKind::AckBeyondSent)));
    assert_eq!(p.host.stats().resets_bad_ack, 1);
}

#[test]
fn window_overflow_resets() {
    let mut p = Pair::connected();
    let a = p.connect_with(7, 1024, 1024);
    let sport = p.host.connection(a).unwrap().local_port();
    // The host advertised 1024 bytes from seq 1; send 1025.
    inject_to_host(&mut p, 7, sport, 1, 1, 0x10, 512, &[0u8; 1025]);
    p.drive();
    assert!(p.host_has(|e| matches!(e, Event::Reset { id, reason } if *id == a && reason.kind == ResetKind::WindowOverflow)));
    assert_eq!(p.host.stats().resets_window_overflow, 1);
    assert!(p.dev_has(|e| matches!(e, Event::Reset { reason, .. } if reason.text().starts_with(b"window overflow"))));
}

#[test]
fn fin_ends_stream_and_is_answered_by_rst() {
    let mut p = Pair::connected();
    let a = p.connect(7);
    let sport = p.host.connection(a).unwrap().local_port();
    inject_to_host(&mut p, 7, sport, 1, 1, 0x11, 512, b"tail");
    p.drive();
    let mut buf = [0u8; 8];
    assert_eq!(p.host.recv(a, &mut buf), Ok(4));
    assert!(p.host_has(|e| matches!(e, Event::Reset { id, reason } if *id == a && reason.kind == ResetKind::PeerFin)));
    assert!(p.dev_has(|e| matches!(e, Event::Reset { .. })));
}

#[test]
fn unknown_connection_gets_anonymous_rst() {
    let mut p = Pair::connected();
    p.log = true;
    inject_to_host(&mut p, 7, 555, 42, 0, 0x10, 512, b"stray");
    p.step();
    assert_eq!(p.host.stats().anon_rsts_sent, 1);
    let rst = p.h2d_log.last().unwrap();
    assert_eq!(&rst[16..20], &[2, 43, 0, 7]);
    assert_eq!(u32::from_be_bytes(rst[20..24].try_into().unwrap()), 0);
    assert_eq!(u32::from_be_bytes(rst[24..28].try_into().unwrap()), 42);
    assert_eq!(rst[29], 0x04);
    // A stray RST is not answered.
    inject_to_host(&mut p, 7, 556, 1, 0, 0x04, 0, b"");
    p.step();
    assert_eq!(p.host.stats().anon_rsts_sent, 1);
}

#[test]
fn version_at_active_device_resets_connections() {
    let mut p = Pair::connected();
    let _a = p.connect(7);
    let da = p.dev_id(0);
    // A restarted host: a brand-new host session on the same device.
    *p.host = HostSession::new(SessionConfig::default(), 777);
    p.drive();
    assert!(p.dev_has(|e| *e == Event::PeerRestarted));
    assert!(p.dev_has(|e| matches!(e, Event::Reset { id, reason } if *id == da && reason.kind == ResetKind::PeerRestarted)));
    assert_eq!(p.host.phase(), Phase::Active);
    let b = p.connect(7);
    assert!(p.host_has(|e| *e == Event::Connected(b)));
    assert_eq!(p.host.connection(b).unwrap().local_port(), 777);
}

#[test]
fn device_strict_framing_reports_control_error() {
    let mut p = Pair::connected();
    // Two packets glued into one transfer (a host that forgot its ZLP).
    let mut buf = vec![0u8; 65536];
    p.host
        .connect(7, bufs(1024, 1024))
        .map_err(|e| e.0)
        .unwrap();
    let t = p.host.poll_transmit(p.now, &mut buf).unwrap().unwrap();
    let mut glued = buf[..t.len].to_vec();
    glued.extend_from_slice(&buf[..t.len]);
    p.dev.handle_transfer(p.now, &glued);
    p.drive();
    assert_eq!(p.dev.stats().reassembly_errors, 1);
    let msg = p.host_events.iter().find_map(|e| match e {
        Event::DeviceMessage(m) => Some(m.clone()),
        _ => None,
    });
    let msg = msg.expect("control message");
    assert_eq!(msg.kind, ControlType::Error);
    assert!(!msg.text().is_empty());
}

#[test]
fn accept_refuse_errors() {
    let mut p = Pair::connected();
    p.policy = |_| Policy::Ignore;
    p.connect(7);
    let id = p.dev_events.iter().find_map(|e| match e {
        Event::Incoming { id, port: 7 } => Some(*id),
        _ => None,
    });
    let id = id.unwrap();
    assert_eq!(
        p.dev.accept(id, bufs(100, 100)).map_err(|e| e.0),
        Err(AcceptError::BufferTooSmall)
    );
    p.dev.accept(id, bufs(1024, 1024)).map_err(|e| e.0).unwrap();
    assert_eq!(
        p.dev.accept(id, bufs(1024, 1024)).map_err(|e| e.0),
        Err(AcceptError::InvalidHandle)
    );
    assert!(p.dev.refuse(id, b"x").is_err());
    assert_eq!(
        p.host.connect(7, bufs(255, 1024)).map_err(|e| e.0),
        Err(ConnectError::BufferTooSmall)
    );
    // Stale handle after release.
    let released = p.dev.reset(id, "").unwrap();
    drop(released);
    assert_eq!(p.dev.send(id, b"x"), Err(SendError::InvalidHandle));
    assert!(p.dev.reset(id, "").is_err());
}

#[test]
fn small_transmit_buffer_is_an_error_not_a_state_change() {
    let mut p = Pair::new();
    let mut tiny = [0u8; 10];
    let e = p.host.poll_transmit(p.now, &mut tiny);
    assert_eq!(e.map_err(|e| e.required), Err(20));
    let mut buf = [0u8; 64];
    assert_eq!(
        p.host.poll_transmit(p.now, &mut buf).unwrap().unwrap().len,
        20
    );
}

#[test]
fn control_queue_full_is_an_error() {
    let mut p = Pair::connected();
    for i in 0..4 {
        p.dev
            .send_control(ControlType::Info, format!("message {i}").as_bytes())
            .expect("room");
    }
    assert_eq!(
        p.dev.send_control(ControlType::Warning, b"one too many"),
        Err(crate::mux::QueueFull)
    );
    p.drive();
    let texts: Vec<Vec<u8>> = p
        .host_events
        .iter()
        .filter_map(|e| match e {
            Event::DeviceMessage(m) => Some(m.text().to_vec()),
            _ => None,
        })
        .collect();
    assert_eq!(
        texts,
        (0..4)
            .map(|i| format!("message {i}").into_bytes())
            .collect::<Vec<_>>()
    );
    assert_eq!(p.host.stats().control_messages, 4);
}

#[test]
fn usbmuxd_ack_policy_acks_every_data_packet() {
    use crate::tcp::{AckPolicy, ConnConfig};
    let cfg = SessionConfig {
        conn: ConnConfig {
            ack_policy: AckPolicy::Usbmuxd,
            ack_delay: Duration::from_millis(30),
            ..ConnConfig::default()
        },
        ..SessionConfig::default()
    };
    let mut p = Pair::with_config(cfg, SessionConfig::default());
    p.drive();
    let id = p.connect(7);
    let dev = p.dev_id(0);
    let before = p.host.conn_stats(id).unwrap().pure_acks_sent;
    for _ in 0..10 {
        p.dev.send(dev, &[1u8; 1000]).unwrap();
        p.drive();
    }
    // One immediate ACK per data packet, even though the application read nothing.
    assert_eq!(p.host.conn_stats(id).unwrap().pure_acks_sent - before, 10);
    let mut buf = vec![0u8; 20_000];
    assert_eq!(p.host.recv(id, &mut buf), Ok(10_000));
}

#[test]
fn stats_count_both_ways() {
    let mut p = Pair::connected();
    let id = p.connect(7);
    let dev = p.dev_id(0);
    p.host.send(id, &[7u8; 3000]).unwrap();
    p.drive();
    let mut buf = [0u8; 4000];
    assert_eq!(p.dev.recv(dev, &mut buf), Ok(3000));
    let h = p.host.conn_stats(id).unwrap();
    let d = p.dev.conn_stats(dev).unwrap();
    assert_eq!(h.bytes_sent, 3000);
    assert_eq!(d.bytes_received, 3000);
    // The SYN reached the device before it had a connection to count it in.
    assert_eq!(h.packets_sent, d.packets_received + 1);
    assert_eq!(p.host.stats().packets_out, p.dev.stats().packets_in);
    assert_eq!(p.dev.stats().packets_out, p.host.stats().packets_in);
}

#[test]
fn tcp_options_mean_corruption_and_reset_the_connection() {
    let mut p = Pair::connected();
    let a = p.connect(7);
    let b = p.connect(7);
    let sport = p.host.connection(a).unwrap().local_port();
    // Data offset 6 words: the first 4 payload bytes would be taken for options.
    let len = 16 + 24 + 4;
    let mut pkt = vec![0u8; len];
    pkt[0..4].copy_from_slice(&6u32.to_be_bytes());
    pkt[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    pkt[8..12].copy_from_slice(&0xFEED_FACEu32.to_be_bytes());
    pkt[16..18].copy_from_slice(&7u16.to_be_bytes());
    pkt[18..20].copy_from_slice(&sport.to_be_bytes());
    pkt[20..24].copy_from_slice(&1u32.to_be_bytes());
    pkt[24..28].copy_from_slice(&1u32.to_be_bytes());
    pkt[28] = 0x60;
    pkt[29] = 0x10;
    pkt[30..32].copy_from_slice(&512u16.to_be_bytes());
    p.host.handle_transfer(p.now, &pkt);
    p.drive();
    assert!(p.host_has(|e| matches!(e, Event::Reset { id, reason } if *id == a && reason.kind == ResetKind::Malformed)));
    assert_eq!(p.host.recv(a, &mut [0u8; 16]), Err(RecvError::Finished));
    assert_eq!(p.host.state(b), Some(State::Established));
}

#[test]
fn full_size_packets_avoid_zlps_while_more_data_follows() {
    let mut p = Pair::connected();
    let id = p.connect_with(7, 1 << 20, 1 << 20);
    let dev = p.dev_id(0);
    p.log = true;
    let data = pattern(1 << 20, 11);
    assert_eq!(p.host.send(id, &data), Ok(1 << 20));
    let got = transfer(&mut p, true, id, dev, &[], 1);
    assert!(got.is_empty());
    let mut rbuf = vec![0u8; 1 << 20];
    let mut got = Vec::new();
    for _ in 0..1000 {
        p.step();
        let n = p.dev.recv(dev, &mut rbuf).unwrap();
        got.extend_from_slice(&rbuf[..n]);
        if got.len() == data.len() {
            break;
        }
        p.fire_next_timer();
    }
    assert!(got == data);
    let data_packets: Vec<usize> = p.h2d_log.iter().map(Vec::len).filter(|&l| l > 36).collect();
    assert!(
        data_packets.len() >= 21,
        "{} data packets",
        data_packets.len()
    );
    assert!(
        data_packets.contains(&49_151),
        "full packets are one byte short"
    );
    // 49 152-byte packets would each need a ZLP; trimming one byte avoids them while more
    // data follows.
    let zlps = p.h2d_log.iter().filter(|pkt| pkt.len() % 512 == 0).count();
    assert!(zlps <= 1, "{zlps} ZLPs");
}

#[test]
fn unacknowledged_data_is_probed_so_a_lost_packet_is_found() {
    let mut p = Pair::connected();
    let id = p.connect(7);
    let dev = p.dev_id(0);
    // The one data packet the device sends is lost; nothing else would follow.
    let mut dropped = false;
    p.filter_d2h = Some(Box::new(move |pkt| {
        if pkt.len() > 36 && !dropped {
            dropped = true;
            return false;
        }
        true
    }));
    p.dev.send(dev, b"lost in transit").unwrap();
    p.drive();
    for _ in 0..5 {
        p.fire_next_timer();
    }
    assert!(p.dev.conn_stats(dev).map_or(0, |s| s.probes_sent) >= 1);
    assert!(p.host_has(|e| matches!(e, Event::Reset { id: i, reason } if *i == id && reason.kind == ResetKind::UnexpectedSeq)));
    assert!(p.dev_has(|e| matches!(e, Event::Reset { id: i, reason } if *i == dev && reason.text().starts_with(b"unexpected sequence number"))));
}

#[test]
fn a_segment_without_ack_is_never_taken_as_data() {
    // An RST whose flags were corrupted into a bare FIN: its reason text must not become data.
    let mut p = Pair::connected();
    let a = p.connect(7);
    let sport = p.host.connection(a).unwrap().local_port();
    inject_to_host(&mut p, 7, sport, 1, 1, 0x01, 512, b"connect timed out");
    p.drive();
    assert_eq!(p.host.recv(a, &mut [0u8; 64]), Err(RecvError::Finished));
    assert!(p.host_has(|e| matches!(e, Event::Reset { id, reason } if *id == a && reason.kind == ResetKind::BadFlags)));
}
