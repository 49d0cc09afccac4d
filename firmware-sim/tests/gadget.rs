//! The FunctionFS runner without a kernel: its endpoints are in-memory fakes that behave like
//! FunctionFS's files (blocking OUT reads that end at a short packet or ZLP and fail with
//! `ESHUTDOWN` when the endpoint is disabled, IN writes refused with `EAGAIN` while disabled,
//! ep0 events, stalls by zero-length transfers), and a host `Session` drives the phone through
//! them: handshake, echo, ZLPs at both packet sizes, unplug and replug, stalls, garbage on ep0.
#![cfg(all(feature = "functionfs", target_os = "linux"))]

mod common;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{bufs, pattern, HostSession};
use usbmux_core::{ConnId, Event, Instant, SessionConfig};
use usbmux_sim::cable::{BulkPipe, HOST_READ_LEN};
use usbmux_sim::gadget::ep0::{self, SetupRequest};
use usbmux_sim::gadget::{Endpoints, GadgetError, GadgetEvent, RunStats, Runner, Stopper};
use usbmux_sim::service::ECHO;
use usbmux_sim::PhoneConfig;

const T: Duration = Duration::from_secs(10);

/// The bus both fakes and the test's host share.
struct Bus {
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    enabled: bool,
    /// Changes at every ENABLE and DISABLE: a read that started under another value was
    /// interrupted by a disable.
    epoch: u64,
    out: BulkPipe,
    inp: BulkPipe,
    events: VecDeque<u8>,
    stalls: Vec<&'static str>,
    closed: bool,
    /// IN writes refused as by a disabled endpoint although no event says so (FunctionFS
    /// drops a DISABLE that a newer ENABLE overtakes).
    in_refused: bool,
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl Bus {
    fn new(mps: u16) -> Arc<Bus> {
        Arc::new(Bus {
            state: Mutex::new(State {
                enabled: false,
                epoch: 0,
                out: BulkPipe::new(mps),
                inp: BulkPipe::new(mps),
                events: VecDeque::new(),
                stalls: Vec::new(),
                closed: false,
                in_refused: false,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("bus lock")
    }

    fn event(&self, ev: ep0::Event) {
        self.raw_event(&ep0::encode_event(&ev));
    }

    fn raw_event(&self, bytes: &[u8]) {
        self.lock().events.extend(bytes);
        self.cv.notify_all();
    }

    fn enable(&self) {
        {
            let mut s = self.lock();
            s.enabled = true;
            s.epoch += 1;
            s.events.extend(ep0::encode_event(&ep0::Event::Enable));
        }
        self.cv.notify_all();
    }

    /// Pulls the cable: everything in flight is lost, then DISABLE.
    fn disable(&self) {
        {
            let mut s = self.lock();
            s.enabled = false;
            s.epoch += 1;
            s.out.clear();
            s.inp.clear();
            s.events.extend(ep0::encode_event(&ep0::Event::Disable));
        }
        self.cv.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    fn host_write(&self, t: &[u8]) {
        self.lock().out.write(t);
        self.cv.notify_all();
    }

    /// One IN read of the host; waits up to `wait` for a complete transfer.
    fn host_read(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut s = self.lock();
        if let Some(t) = s.inp.read(HOST_READ_LEN) {
            return Some(t);
        }
        let (mut s, _) = self.cv.wait_timeout(s, wait).expect("bus lock");
        s.inp.read(HOST_READ_LEN)
    }
}

struct FakeEp0(Arc<Bus>);

impl Read for FakeEp0 {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.0.lock();
        if buf.is_empty() {
            s.stalls.push("read");
            return Err(errno(nix::errno::Errno::EL2HLT));
        }
        loop {
            if s.closed {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if !s.events.is_empty() {
                let n = s
                    .events
                    .len()
                    .min(buf.len() / ep0::EVENT_SIZE * ep0::EVENT_SIZE);
                // A partial event at the end (the garbage test) is delivered as it is.
                let n = if n == 0 {
                    s.events.len().min(buf.len())
                } else {
                    n
                };
                for b in buf.iter_mut().take(n) {
                    *b = s.events.pop_front().unwrap_or(0);
                }
                return Ok(n);
            }
            s = self.0.cv.wait(s).expect("bus lock");
        }
    }
}

impl Write for FakeEp0 {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(buf.is_empty(), "the runner only writes ep0 to stall");
        self.0.lock().stalls.push("write");
        Err(errno(nix::errno::Errno::EL2HLT))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct FakeOut(Arc<Bus>);

impl Read for FakeOut {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.0.lock();
        let mut started: Option<u64> = None;
        loop {
            if s.closed {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            match (s.enabled, started) {
                // Disabled before the read began: FunctionFS waits for the next enable.
                (false, None) => {}
                (false, Some(_)) => return Err(errno(nix::errno::Errno::ESHUTDOWN)),
                (true, Some(e)) if e != s.epoch => return Err(errno(nix::errno::Errno::ESHUTDOWN)),
                (true, _) => {
                    started = Some(s.epoch);
                    if let Some(t) = s.out.read(buf.len()) {
                        buf[..t.len()].copy_from_slice(&t);
                        return Ok(t.len());
                    }
                }
            }
            s = self.0.cv.wait(s).expect("bus lock");
        }
    }
}

struct FakeIn(Arc<Bus>);

impl Write for FakeIn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut s = self.0.lock();
            if s.closed {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if !s.enabled || s.in_refused {
                // O_NONBLOCK on a disabled endpoint.
                return Err(errno(nix::errno::Errno::EAGAIN));
            }
            s.inp.write(buf);
        }
        self.0.cv.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A runner on a fake bus, its events, and how to stop it.
struct Gadget {
    bus: Arc<Bus>,
    events: Arc<Mutex<Vec<GadgetEvent>>>,
    stopper: Stopper,
    thread: Option<JoinHandle<Result<RunStats, GadgetError>>>,
}

impl Gadget {
    fn start(mps: u16) -> Gadget {
        let bus = Bus::new(mps);
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&events);
        let runner = Runner::new(PhoneConfig::simulated(1)).on_event(move |e| {
            log.lock().expect("log").push(e.clone());
        });
        let stopper = runner.stopper();
        let eps = Endpoints {
            ep0: FakeEp0(Arc::clone(&bus)),
            out: FakeOut(Arc::clone(&bus)),
            inp: FakeIn(Arc::clone(&bus)),
            max_packet_size: Box::new(move || Some(mps)),
        };
        let thread = std::thread::spawn(move || runner.run(eps));
        Gadget {
            bus,
            events,
            stopper,
            thread: Some(thread),
        }
    }

    fn wait_event(&self, what: &str, f: impl Fn(&GadgetEvent) -> bool) {
        let deadline = std::time::Instant::now() + T;
        loop {
            if self.events.lock().expect("log").iter().any(&f) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {what}; events: {:?}",
                self.events.lock().expect("log")
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(mut self) -> Result<RunStats, GadgetError> {
        self.stopper.stop();
        let r = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("runner panicked");
        self.bus.close();
        r
    }
}

impl Drop for Gadget {
    fn drop(&mut self) {
        self.stopper.stop();
        self.bus.close();
    }
}

/// A host session on the fake bus, driven in real time.
struct Host {
    session: Box<HostSession>,
    bus: Arc<Bus>,
    events: Vec<Event>,
    epoch: std::time::Instant,
    buf: Vec<u8>,
}

impl Host {
    fn new(bus: &Arc<Bus>, mps: u16, first_port: u16) -> Host {
        let cfg = SessionConfig {
            usb_packet_size: mps,
            ..SessionConfig::default()
        };
        Host {
            session: Box::new(HostSession::new(cfg, first_port)),
            bus: Arc::clone(bus),
            events: Vec::new(),
            epoch: std::time::Instant::now(),
            buf: vec![0; 65536],
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as u64)
    }

    fn step(&mut self) {
        let now = self.now();
        while let Ok(Some(t)) = self.session.poll_transmit(now, &mut self.buf) {
            self.bus.host_write(&self.buf[..t.len]);
            if t.zlp {
                self.bus.host_write(&[]);
            }
        }
        let mut wait = Duration::from_millis(5);
        while let Some(t) = self.bus.host_read(wait) {
            wait = Duration::ZERO;
            let now = self.now();
            self.session.handle_transfer(now, &t);
        }
        let now = self.now();
        self.session.handle_timeout(now);
        while let Some(e) = self.session.poll_event() {
            self.events.push(e);
        }
    }

    fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Host) -> bool) {
        let deadline = std::time::Instant::now() + T;
        while !done(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {what}; host events: {:?}",
                self.events
            );
            self.step();
        }
    }

    fn handshake(&mut self) {
        self.run_until("handshake", |h| {
            h.events.contains(&Event::HandshakeDone { version: 2 })
        });
    }

    fn connect(&mut self, port: u16) -> ConnId {
        let id = self
            .session
            .connect(port, bufs(256 * 1024))
            .expect("connect");
        self.run_until("connection", |h| h.events.contains(&Event::Connected(id)));
        id
    }

    /// Sends `data` and reads as many bytes back.
    fn echo(&mut self, id: ConnId, data: &[u8]) -> Vec<u8> {
        let mut sent = 0;
        let mut back = Vec::new();
        let mut chunk = vec![0u8; 65536];
        self.run_until("echo", |h| {
            if sent < data.len() {
                sent += h.session.send(id, &data[sent..]).unwrap_or(0);
            }
            while let Ok(n) = h.session.recv(id, &mut chunk) {
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&chunk[..n]);
            }
            back.len() >= data.len()
        });
        back
    }
}

#[test]
fn handshake_echo_unplug_and_a_fresh_phone_after_replug() {
    let g = Gadget::start(512);
    g.bus.event(ep0::Event::Bind);
    g.bus.enable();
    g.wait_event("plug", |e| {
        *e == GadgetEvent::Plugged {
            plug: 1,
            max_packet_size: 512,
        }
    });
    let mut host = Host::new(&g.bus, 512, 1);
    host.handshake();
    let id = host.connect(ECHO);
    let data = pattern(300_000, 1);
    assert!(host.echo(id, &data) == data, "echo differs");

    g.bus.disable();
    g.wait_event("unplug", |e| {
        *e == GadgetEvent::Unplugged {
            plug: 1,
            cause: ep0::Event::Disable,
        }
    });

    // A new host session: a phone that had kept its state would see a restart (PeerRestarted)
    // and its old connection; a fresh one sees nothing but a first VERSION.
    g.bus.enable();
    g.wait_event("replug", |e| {
        *e == GadgetEvent::Plugged {
            plug: 2,
            max_packet_size: 512,
        }
    });
    let mut host = Host::new(&g.bus, 512, 1000);
    host.handshake();
    let id = host.connect(ECHO);
    let data = pattern(10_000, 2);
    assert!(host.echo(id, &data) == data, "echo after replug differs");
    // The second phone saw a first handshake, not a host restarting on an old phone.
    {
        let log = g.events.lock().expect("log");
        let second = log
            .iter()
            .position(|e| matches!(e, GadgetEvent::Plugged { plug: 2, .. }))
            .expect("plug 2");
        let after = &log[second..];
        assert!(after.contains(&GadgetEvent::Phone(Event::HandshakeDone { version: 2 })));
        assert!(
            !after.contains(&GadgetEvent::Phone(Event::PeerRestarted)),
            "the phone of plug 1 survived: {after:?}"
        );
    }
    let stats = g.stop().expect("runner ended cleanly");
    assert_eq!(stats.plugs, 2);
    assert!(
        stats.out_transfers > 10 && stats.in_packets > 10,
        "{stats:?}"
    );
}

/// A disable and re-enable of IN that the runner hears nothing of (the kernel dropped both
/// events): the phone's replies wait for the endpoint instead of being dropped for good.
#[test]
fn an_in_endpoint_refusing_for_a_while_without_events_loses_nothing() {
    let g = Gadget::start(512);
    g.bus.event(ep0::Event::Bind);
    g.bus.enable();
    g.wait_event("plug", |e| {
        matches!(e, GadgetEvent::Plugged { plug: 1, .. })
    });
    g.bus.lock().in_refused = true;
    let bus = Arc::clone(&g.bus);
    let heal = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        bus.lock().in_refused = false;
        bus.cv.notify_all();
    });
    let mut host = Host::new(&g.bus, 512, 1);
    host.handshake();
    heal.join().expect("heal");
    let id = host.connect(ECHO);
    let data = pattern(50_000, 3);
    assert!(host.echo(id, &data) == data, "echo differs");
    assert!(g
        .events
        .lock()
        .expect("log")
        .contains(&GadgetEvent::EndpointDown { endpoint: "IN" }));
    let stats = g.stop().expect("runner ended cleanly");
    assert_eq!(stats.plugs, 1);
}

#[test]
fn zlps_at_full_speed_and_high_speed() {
    for mps in [64u16, 512] {
        let g = Gadget::start(mps);
        g.bus.enable();
        g.wait_event("plug", |e| {
            matches!(e, GadgetEvent::Plugged { max_packet_size, .. } if *max_packet_size == mps)
        });
        let mut host = Host::new(&g.bus, mps, 1);
        host.handshake();
        let id = host.connect(ECHO);
        // Payloads whose echo packets (16-byte v2 header + 20-byte TCP header + n) are whole
        // multiples of the packet size: without the ZLP the host's read would never complete.
        for k in 1..=8usize {
            let n = k * usize::from(mps) - 36;
            let data = pattern(n, k as u32);
            assert!(host.echo(id, &data) == data, "mps {mps}: {n} bytes");
        }
        let stats = g.stop().expect("clean end");
        assert!(stats.in_zlps >= 8, "mps {mps}: {stats:?}");
    }
}

#[test]
fn setup_requests_are_stalled_in_their_direction_and_garbage_is_skipped() {
    let g = Gadget::start(512);
    let get = SetupRequest {
        request_type: 0xc1,
        request: 0x40,
        value: 0,
        index: 0,
        length: 4,
    };
    let set = SetupRequest {
        request_type: 0x41,
        request: 0x41,
        value: 1,
        index: 0,
        length: 0,
    };
    g.bus.event(ep0::Event::Setup(get));
    g.bus.event(ep0::Event::Setup(set));
    g.wait_event("stalls", |e| *e == GadgetEvent::Stalled(set));
    assert_eq!(g.bus.lock().stalls, vec!["read", "write"]);
    // An event type from the future, then 5 stray bytes: reported, skipped, still running.
    let mut future = [0u8; 12];
    future[8] = 42;
    g.bus.raw_event(&future);
    g.wait_event("unknown type", |e| {
        *e == GadgetEvent::Ep0Garbage(ep0::Ep0Error::UnknownType(42))
    });
    g.bus.raw_event(&[1, 2, 3, 4, 5]);
    g.wait_event("truncated", |e| {
        *e == GadgetEvent::Ep0Garbage(ep0::Ep0Error::Truncated(5))
    });
    g.bus.enable();
    g.wait_event("plug", |e| {
        matches!(e, GadgetEvent::Plugged { plug: 1, .. })
    });
    let mut host = Host::new(&g.bus, 512, 1);
    host.handshake();
    let stats = g.stop().expect("clean end");
    assert_eq!(stats.stalls, 2);
}

#[test]
fn a_closed_ep0_ends_the_run_with_an_error() {
    let mut g = Gadget::start(512);
    g.bus.close();
    let r = g.thread.take().expect("running").join().expect("no panic");
    assert!(matches!(r, Err(GadgetError::Endpoint { .. })), "{r:?}");
}
