//! [`Phone`]: a `Session<Device>` with its services — the simulated iPhone itself, minus any
//! transport. Feed it the host's OUT transfers, take its IN transfers from `poll_transmit`.

use std::collections::HashMap;

use usbmux_core::mux::InsufficientSize;
use usbmux_core::{Buffers, ConnId, Device, Event, Instant, Session, SessionConfig, Transmit};

use crate::identity::Identity;
use crate::service::{Progress, Service};

/// How many events a phone keeps for [`Phone::take_events`].
pub const EVENT_LOG: usize = 1024;

/// Most connections one simulated phone holds at once: as many as the daemon gives one phone
/// (`usbmuxd`'s `MAX_CONNECTIONS`), so 16 phones carry the 10 000 connections of the scale bench.
/// A free slot costs a few hundred bytes; buffers are allocated per connection.
pub const MAX_CONNECTIONS: usize = 1024;

/// Everything that makes one simulated phone: identity, engine settings, buffer sizes.
#[derive(Debug, Clone)]
pub struct PhoneConfig {
    /// Who the phone is (UDID, USB ids, lockdown's DeviceName).
    pub identity: Identity,
    /// Engine settings (`device_version`: the protocol version answered, 1 or 2; timers).
    pub session: SessionConfig,
    /// Receive buffer per connection (its free space is the window the host sees).
    pub rx_buffer: usize,
    /// Send buffer per connection.
    pub tx_buffer: usize,
}

impl Default for PhoneConfig {
    fn default() -> Self {
        PhoneConfig::simulated(1)
    }
}

impl PhoneConfig {
    /// The deterministic configuration of simulated phone `k` (see `crate::identity`).
    pub fn simulated(k: u32) -> Self {
        let identity = Identity::simulated(k);
        let session = SessionConfig {
            usb_packet_size: identity.max_packet_size,
            ..SessionConfig::default()
        };
        PhoneConfig {
            identity,
            session,
            rx_buffer: 128 * 1024,
            tx_buffer: 128 * 1024,
        }
    }
}

type DeviceSession = Session<Device, Vec<u8>, MAX_CONNECTIONS, 0>;

/// A simulated phone: the device role of usbmux plus the services of `crate::service`.
pub struct Phone {
    session: Box<DeviceSession>,
    services: HashMap<ConnId, Service>,
    cfg: PhoneConfig,
    events: std::collections::VecDeque<Event>,
    events_dropped: u64,
}

impl Phone {
    /// A phone waiting for the host's VERSION.
    pub fn new(cfg: PhoneConfig) -> Self {
        Phone {
            session: Box::new(DeviceSession::new(cfg.session)),
            services: HashMap::new(),
            cfg,
            events: std::collections::VecDeque::new(),
            events_dropped: 0,
        }
    }

    /// The engine (stats, connection states).
    pub fn session(&self) -> &DeviceSession {
        &self.session
    }

    /// One bulk OUT transfer from the host (a ZLP is an empty slice).
    pub fn handle_transfer(&mut self, now: Instant, transfer: &[u8]) {
        let services = &mut self.services;
        self.session
            .handle_transfer_with(now, transfer, &mut |id, data| {
                services.get_mut(&id).map_or(0, |s| s.take_direct(data))
            });
        self.run();
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        self.run();
    }

    /// When `handle_timeout` is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.session.poll_timeout()
    }

    /// The next IN transfer (one mux packet; then a ZLP if `zlp`). Services get to run between
    /// packets, so a source keeps the pipe full and an echo answers as soon as it can.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut [u8],
    ) -> Result<Option<Transmit>, InsufficientSize> {
        for _ in 0..2 {
            let services = &mut self.services;
            let mut source =
                |id, dst: &mut [u8]| services.get_mut(&id).map_or(0, |s| s.fill_direct(dst));
            if let Some(t) = self.session.poll_transmit_with(now, buf, &mut source)? {
                return Ok(Some(t));
            }
            if !self.run() {
                break;
            }
        }
        Ok(None)
    }

    /// Events the phone saw (handshakes, connections, resets), oldest first, drained.
    ///
    /// Only the newest [`EVENT_LOG`] are kept, so a phone nobody asks (a long-running in-process
    /// simulation) does not grow without bound; [`Phone::events_dropped`] counts the rest.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events).into()
    }

    /// Events dropped from the log because nobody took them in time.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    /// Handles events and runs every service once; true if anything happened.
    fn run(&mut self) -> bool {
        let mut moved = false;
        while let Some(ev) = self.session.poll_event() {
            moved = true;
            match &ev {
                Event::Incoming { id, port } => {
                    match Service::for_port(*port, &self.cfg.identity) {
                        Some(s) => {
                            let bufs = Buffers::new(
                                vec![0; self.cfg.rx_buffer],
                                vec![0; self.cfg.tx_buffer],
                            );
                            if self.session.accept(*id, bufs).is_ok() {
                                self.services.insert(*id, s);
                            }
                        }
                        None => {
                            let _ = self.session.refuse(*id, b"Connection refused");
                        }
                    }
                }
                Event::Reset { id, .. } | Event::Refused { id, .. } => {
                    self.services.remove(id);
                    let _ = self.session.reset(*id, "");
                }
                Event::PeerRestarted => self.services.clear(),
                _ => {}
            }
            if self.events.len() >= EVENT_LOG {
                self.events.pop_front();
                self.events_dropped += 1;
            }
            self.events.push_back(ev);
        }
        let mut violations = Vec::new();
        for (id, svc) in self.services.iter_mut() {
            match svc.run(&mut self.session, *id) {
                Progress::Idle => {}
                Progress::Moved => moved = true,
                Progress::Violation(text) => violations.push((*id, text)),
            }
        }
        for (id, text) in violations {
            moved = true;
            self.services.remove(&id);
            let _ = self.session.reset(id, &text);
        }
        moved
    }
}
