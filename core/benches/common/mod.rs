//! Bench code shared by `core/benches/throughput.rs` (`cargo bench -p usbmux-core`) and the
//! benchmark suite (`cargo run --release -p usbmux-tests --bin bench`, which includes this file
//! with `#[path]`): the in-memory host↔device pair, the `memcpy` baseline, the counting
//! allocator and the ACK-policy simulation. One copy, so both report the same measurement.
//!
//! The including binary declares the allocator:
//! `#[global_allocator] static GLOBAL: common::Counting = common::Counting;`
#![allow(dead_code)] // each includer uses a different part

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant as Wall;

use usbmux_core::{
    AckPolicy, Buffers, ConnConfig, ConnId, Device, Duration, Event, Host, Instant, Session,
    SessionConfig,
};

// ---- (b) allocation counter -------------------------------------------------------------------

/// `System`, counting every allocation (alloc, alloc_zeroed, realloc).
pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the counter is a relaxed atomic and never touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations so far (all threads).
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

// ---- in-memory pair ---------------------------------------------------------------------------

type HostSession = Session<Host, Vec<u8>, 1>;
type DeviceSession = Session<Device, Vec<u8>, 1, 0>;

pub const PORT: u16 = 9;
/// Source of the bytes sent (cycled); larger than every buffer, so nothing is cache-hot by luck.
pub const SOURCE_LEN: usize = 4 << 20;
/// The applications' write and read size.
pub const APP_CHUNK: usize = 64 * 1024;
/// Bytes per timed run (`cargo bench`).
pub const RUN_BYTES: u64 = 2 << 30;
/// Timed runs per variant (the best is reported).
pub const RUNS: usize = 5;

/// A host and a device session back to back in memory.
struct Pair {
    host: Box<HostSession>,
    dev: Box<DeviceSession>,
    now: Instant,
    pkt: Vec<u8>,
}

impl Pair {
    /// A handshaken pair with one connection whose four buffers are `buf` bytes each; returns
    /// it with the connection's host and device ids.
    fn open(buf: usize, cfg: SessionConfig) -> (Self, ConnId, ConnId) {
        let mut p = Pair {
            host: Box::new(HostSession::new(cfg, 1)),
            dev: Box::new(DeviceSession::new(cfg)),
            now: Instant::ZERO,
            pkt: vec![0; 65_536],
        };
        p.settle();
        let hid = p
            .host
            .connect(PORT, Buffers::new(vec![0; buf], vec![0; buf]))
            .map_err(|e| e.0)
            .expect("connect");
        let mut did = None;
        for _ in 0..100 {
            p.h2d();
            while let Some(e) = p.dev.poll_event() {
                if let Event::Incoming { id, .. } = e {
                    p.dev
                        .accept(id, Buffers::new(vec![0; buf], vec![0; buf]))
                        .map_err(|e| e.0)
                        .expect("accept");
                    did = Some(id);
                }
            }
            p.d2h();
            while p.host.poll_event().is_some() {}
        }
        (p, hid, did.expect("incoming connection"))
    }

    fn settle(&mut self) {
        for _ in 0..100 {
            self.h2d();
            self.d2h();
            while self.host.poll_event().is_some() {}
            while self.dev.poll_event().is_some() {}
        }
    }

    /// Host packets to the device, one transfer each (plus ZLP).
    fn h2d(&mut self) {
        while let Some(t) = self
            .host
            .poll_transmit(self.now, &mut self.pkt)
            .expect("64 KiB suffices")
        {
            self.dev.handle_transfer(self.now, &self.pkt[..t.len]);
            if t.zlp {
                self.dev.handle_transfer(self.now, &[]);
            }
        }
    }

    /// [`Pair::h2d`] with the host's payload asked from `source` (`poll_transmit_with`).
    fn h2d_with(&mut self, source: &mut dyn FnMut(ConnId, &mut [u8]) -> usize) {
        while let Some(t) = self
            .host
            .poll_transmit_with(self.now, &mut self.pkt, source)
            .expect("64 KiB suffices")
        {
            self.dev.handle_transfer(self.now, &self.pkt[..t.len]);
            if t.zlp {
                self.dev.handle_transfer(self.now, &[]);
            }
        }
    }

    /// [`Pair::d2h`] with the device's payload asked from `source` (`poll_transmit_with`).
    fn d2h_with(&mut self, source: &mut dyn FnMut(ConnId, &mut [u8]) -> usize) {
        while let Some(t) = self
            .dev
            .poll_transmit_with(self.now, &mut self.pkt, source)
            .expect("64 KiB suffices")
        {
            self.host.handle_transfer(self.now, &self.pkt[..t.len]);
            if t.zlp {
                self.host.handle_transfer(self.now, &[]);
            }
        }
    }

    /// Device packets to the host, one transfer each (plus ZLP).
    fn d2h(&mut self) {
        while let Some(t) = self
            .dev
            .poll_transmit(self.now, &mut self.pkt)
            .expect("64 KiB suffices")
        {
            self.host.handle_transfer(self.now, &self.pkt[..t.len]);
            if t.zlp {
                self.host.handle_transfer(self.now, &[]);
            }
        }
    }

    /// Advances the clock a little and fires due timers (delayed ACKs).
    fn tick(&mut self) {
        self.now += Duration::from_micros(10);
        if self.host.poll_timeout().is_some_and(|t| t <= self.now) {
            self.host.handle_timeout(self.now);
        }
        if self.dev.poll_timeout().is_some_and(|t| t <= self.now) {
            self.dev.handle_timeout(self.now);
        }
    }

    fn packets(&self) -> u64 {
        self.host.stats().packets_out + self.dev.stats().packets_out
    }
}

/// Which way the data flows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    /// Host sends, device receives.
    HostToDevice,
    /// Device sends, host receives.
    DeviceToHost,
}

/// How the applications hand bytes to and take bytes from the engine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Api {
    /// `send` from the source, `recv` into a chunk buffer: 4 copies per byte.
    Copy,
    /// The application copies the source into `send_buffer`, `commit`s, and reads in place with
    /// `peek`/`consume`: 3 copies per byte (app -> tx ring -> packet -> rx ring).
    ZeroCopy,
    /// As `ZeroCopy`, but the application writes nothing (it `commit`s whatever the ring holds):
    /// the engine's own 2 copies per byte (tx ring -> packet -> rx ring), for reference.
    EngineOnly,
    /// The application copies its source straight into the packet being built
    /// (`poll_transmit_with`; the send buffer stays empty) and reads in place with
    /// `peek`/`consume`: 2 copies per byte (app -> packet -> rx ring), as the daemon does with
    /// a client socket.
    Source,
}

/// One timed run of [`engine_run`].
pub struct Measured {
    /// Seconds of the timed loop.
    pub secs: f64,
    /// Mux packets both sessions sent in it.
    pub packets: u64,
    /// Heap allocations in it.
    pub allocations: u64,
}

/// Moves `run_bytes` through a fresh pair in `dir` using `api`; times the steady-state loop
/// and counts its packets and heap allocations.
pub fn engine_run(dir: Dir, api: Api, src: &[u8], buf: usize, run_bytes: u64) -> Measured {
    let (mut p, hid, did) = Pair::open(buf, SessionConfig::default());
    let ids = (hid, did);
    let mut dst = vec![0u8; APP_CHUNK];
    // Warm up (first touches of the rings), then measure from a quiet state.
    run_loop(&mut p, ids, dir, api, src, &mut dst, 8 << 20);
    let packets0 = p.packets();
    let allocs0 = allocations();
    let t0 = Wall::now();
    run_loop(&mut p, ids, dir, api, src, &mut dst, run_bytes);
    let secs = t0.elapsed().as_secs_f64();
    Measured {
        secs,
        packets: p.packets() - packets0,
        allocations: allocations() - allocs0,
    }
}

fn run_loop(
    p: &mut Pair,
    (hid, did): (ConnId, ConnId),
    dir: Dir,
    api: Api,
    src: &[u8],
    dst: &mut [u8],
    total: u64,
) {
    let (mut sent, mut received) = (0u64, 0u64);
    let mut off = 0usize;
    while received < total {
        // Sender: fill the send buffer (with `Source`, the packets ask for the bytes instead).
        while sent < total && api != Api::Source {
            let want = (APP_CHUNK as u64).min(total - sent) as usize;
            let want = want.min(src.len() - off);
            let n = match (dir, api) {
                (Dir::HostToDevice, Api::Copy) => p.host.send(hid, &src[off..off + want]),
                (Dir::DeviceToHost, Api::Copy) => p.dev.send(did, &src[off..off + want]),
                (Dir::HostToDevice, _) => {
                    let write = api == Api::ZeroCopy;
                    zero_copy_send(p.host.send_buffer(hid), &src[off..off + want], write)
                        .and_then(|n| p.host.commit(hid, n))
                }
                (Dir::DeviceToHost, _) => {
                    let write = api == Api::ZeroCopy;
                    zero_copy_send(p.dev.send_buffer(did), &src[off..off + want], write)
                        .and_then(|n| p.dev.commit(did, n))
                }
            }
            .expect("send");
            if n == 0 {
                break;
            }
            sent += n as u64;
            off = (off + n) % src.len();
        }
        // Data one way, then the receiver reads, then its window updates go back.
        let mut source = |_: ConnId, dst: &mut [u8]| {
            let n = (dst.len() as u64).min(total - sent) as usize;
            let n = n.min(src.len() - off);
            dst[..n].copy_from_slice(&src[off..off + n]);
            sent += n as u64;
            off = (off + n) % src.len();
            n
        };
        match (dir, api) {
            (Dir::HostToDevice, Api::Source) => p.h2d_with(&mut source),
            (Dir::DeviceToHost, Api::Source) => p.d2h_with(&mut source),
            (Dir::HostToDevice, _) => p.h2d(),
            (Dir::DeviceToHost, _) => p.d2h(),
        }
        loop {
            let n = match (dir, api) {
                (Dir::HostToDevice, Api::Copy) => p.dev.recv(did, dst),
                (Dir::DeviceToHost, Api::Copy) => p.host.recv(hid, dst),
                (Dir::HostToDevice, _) => {
                    let n = p.dev.peek(did).map(|d| black_box(d).len()).expect("peek");
                    p.dev.consume(did, n)
                }
                (Dir::DeviceToHost, _) => {
                    let n = p.host.peek(hid).map(|d| black_box(d).len()).expect("peek");
                    p.host.consume(hid, n)
                }
            }
            .expect("recv");
            if n == 0 {
                break;
            }
            black_box(&mut *dst);
            received += n as u64;
        }
        match dir {
            Dir::HostToDevice => p.d2h(),
            Dir::DeviceToHost => p.h2d(),
        }
        while p.host.poll_event().is_some() {}
        while p.dev.poll_event().is_some() {}
        p.tick();
    }
}

/// Fills the free run of a send buffer from `data` (or, with `write` false, only claims it).
fn zero_copy_send<E>(space: Result<&mut [u8], E>, data: &[u8], write: bool) -> Result<usize, E> {
    let space = space?;
    let n = space.len().min(data.len());
    if write {
        space[..n].copy_from_slice(&data[..n]);
    }
    black_box(&mut *space);
    Ok(n)
}

/// The baseline: the same number of bytes from the same source, in the same chunk sizes,
/// copied into one chunk-sized buffer.
pub fn memcpy_run(src: &[u8], total: u64) -> f64 {
    let mut dst = vec![0u8; APP_CHUNK];
    let t0 = Wall::now();
    let (mut done, mut off) = (0u64, 0usize);
    while done < total {
        let n = (APP_CHUNK as u64).min(total - done) as usize;
        let n = n.min(src.len() - off);
        dst[..n].copy_from_slice(&black_box(src)[off..off + n]);
        black_box(&mut dst);
        done += n as u64;
        off = (off + n) % src.len();
    }
    t0.elapsed().as_secs_f64()
}

// ---- (c) ACK policy over a simulated link -----------------------------------------------------

/// The ACK-policy simulation.
///
/// Link model: each direction is a bulk pipe that carries one transfer at a time; a transfer of
/// `n` bytes (a ZLP is a transfer of 0) occupies its pipe for `LATENCY + n / BANDWIDTH` and is
/// handed to the receiving session when that time is up, after which the pipe starts the next
/// queued transfer. Sessions and applications take no simulated time. The two pipes are
/// independent (USB 2.0 shares one bus; ACKs are small, so this flatters neither policy).
///
/// The sending application keeps its send buffer full from an endless source. The receiving
/// application either drains its receive buffer completely whenever anything happened ("as it
/// arrives") or reads at a fixed rate (`SLOW_READER` bytes per second, woken every
/// `READER_TICK`), like a client that writes the data on to a slower socket.
pub mod ack {
    use std::collections::VecDeque;

    use super::*;

    /// Per-transfer latency: one USB 2.0 microframe.
    pub const LATENCY: Duration = Duration::from_micros(125);
    /// Bytes per second of one pipe once a transfer runs (a good USB 2.0 bulk rate).
    pub const BANDWIDTH: u64 = 40_000_000;
    /// Fixed-rate reader: bytes per second.
    pub const SLOW_READER: u64 = 20_000_000;
    /// Fixed-rate reader: wake-up interval.
    pub const READER_TICK: Duration = Duration::from_millis(1);
    /// Payload moved per simulated run.
    pub const PAYLOAD: u64 = 64 << 20;

    /// usbmuxd's CONN_INBUF_SIZE.
    const HOST_RX: usize = 256 * 1024;
    /// Send buffers large enough that the sending application never runs dry between
    /// transmissions (a smaller one would add its own short packets to both policies).
    const HOST_TX: usize = 256 * 1024;
    /// A phone-sized receive buffer.
    const DEV_RX: usize = 128 * 1024;
    const DEV_TX: usize = 256 * 1024;

    type H = Session<Host, Vec<u8>, 1>;
    type D = Session<Device, Vec<u8>, 1, 0>;

    #[derive(Default)]
    struct Pipe {
        queue: VecDeque<Vec<u8>>,
        /// The transfer on the wire and when it arrives.
        current: Option<(Vec<u8>, Instant)>,
        zlps: u64,
        /// Total time the pipe carried a transfer.
        busy: Duration,
    }

    impl Pipe {
        fn push(&mut self, now: Instant, t: Vec<u8>) {
            self.queue.push_back(t);
            self.start(now);
        }

        fn start(&mut self, now: Instant) {
            if self.current.is_none() {
                if let Some(t) = self.queue.pop_front() {
                    let wire = t.len() as u64 * 1_000_000 / BANDWIDTH;
                    let cost = LATENCY + Duration::from_micros(wire);
                    if t.is_empty() {
                        self.zlps += 1;
                    }
                    self.current = Some((t, now + cost));
                    self.busy = self.busy + cost;
                }
            }
        }

        fn due(&self) -> Option<Instant> {
            self.current.as_ref().map(|c| c.1)
        }

        /// The transfer that arrives at `now`, if any (and starts the next one).
        fn arrive(&mut self, now: Instant) -> Option<Vec<u8>> {
            match self.current.take() {
                Some((t, due)) if due <= now => {
                    self.start(now);
                    Some(t)
                }
                other => {
                    self.current = other;
                    None
                }
            }
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Reader {
        AsItArrives,
        FixedRate,
    }

    pub struct Outcome {
        pub mb_per_s: f64,
        pub packets_per_mib: f64,
        /// Mean payload of the sender's data packets.
        pub mean_segment: f64,
        pub window_stalls: u64,
        pub pure_acks: u64,
        /// Share of the time the data direction's pipe was busy.
        pub data_pipe_busy: f64,
        /// ZLP transfers on the data direction's pipe.
        pub zlps: u64,
    }

    /// One simulated transfer of [`PAYLOAD`] bytes in `dir` with `reader` and `policy`.
    pub fn run(dir: Dir, reader: Reader, policy: AckPolicy) -> Outcome {
        let conn = ConnConfig {
            ack_policy: policy,
            ack_delay: match policy {
                AckPolicy::Usbmuxd => Duration::from_millis(30),
                AckPolicy::Drain => ConnConfig::default().ack_delay,
            },
            ..ConnConfig::default()
        };
        let cfg = SessionConfig {
            conn,
            ..SessionConfig::default()
        };
        let mut host = Box::new(H::new(cfg, 1));
        let mut dev = Box::new(D::new(cfg));
        let (mut h2d, mut d2h) = (Pipe::default(), Pipe::default());
        let mut now = Instant::ZERO;
        let mut pkt = vec![0u8; 65_536];
        let src = vec![0x5Au8; APP_CHUNK];
        let mut dst = vec![0u8; APP_CHUNK];

        let hid = host
            .connect(PORT, Buffers::new(vec![0; HOST_RX], vec![0; HOST_TX]))
            .map_err(|e| e.0)
            .expect("connect");
        let mut did = None;
        let mut connected = false;
        let (mut received, mut start) = (0u64, None::<(Instant, u64)>);
        let mut credit = 0u64;
        let mut next_read = now;
        let mut steps = 0u64;
        let mut busy0 = Duration::ZERO;

        while received < PAYLOAD {
            steps += 1;
            assert!(steps < 50_000_000, "ACK simulation does not progress");
            // Arrivals.
            while let Some(t) = h2d.arrive(now) {
                dev.handle_transfer(now, &t);
            }
            while let Some(t) = d2h.arrive(now) {
                host.handle_transfer(now, &t);
            }
            if host.poll_timeout().is_some_and(|t| t <= now) {
                host.handle_timeout(now);
            }
            if dev.poll_timeout().is_some_and(|t| t <= now) {
                dev.handle_timeout(now);
            }
            transmit(now, &mut host, &mut dev, &mut h2d, &mut d2h, &mut pkt);
            while let Some(e) = host.poll_event() {
                connected |= e == Event::Connected(hid);
            }
            while let Some(e) = dev.poll_event() {
                if let Event::Incoming { id, .. } = e {
                    dev.accept(id, Buffers::new(vec![0; DEV_RX], vec![0; DEV_TX]))
                        .map_err(|e| e.0)
                        .expect("accept");
                    did = Some(id);
                }
            }
            // The SYN|ACK after `accept`.
            transmit(now, &mut host, &mut dev, &mut h2d, &mut d2h, &mut pkt);
            // Applications.
            if let (true, Some(did)) = (connected, did) {
                if start.is_none() {
                    start = Some((now, host.stats().packets_out + dev.stats().packets_out));
                    busy0 = match dir {
                        Dir::HostToDevice => h2d.busy,
                        Dir::DeviceToHost => d2h.busy,
                    };
                }
                loop {
                    let n = match dir {
                        Dir::HostToDevice => host.send(hid, &src),
                        Dir::DeviceToHost => dev.send(did, &src),
                    }
                    .expect("send");
                    if n == 0 {
                        break;
                    }
                }
                let budget = match reader {
                    Reader::AsItArrives => u64::MAX,
                    Reader::FixedRate => {
                        if now >= next_read {
                            credit = SLOW_READER * READER_TICK.total_micros() / 1_000_000;
                            next_read = now + READER_TICK;
                        }
                        credit
                    }
                };
                let mut read = 0u64;
                while read < budget {
                    let want = (budget - read).min(APP_CHUNK as u64) as usize;
                    let n = match dir {
                        Dir::HostToDevice => dev.recv(did, &mut dst[..want]),
                        Dir::DeviceToHost => host.recv(hid, &mut dst[..want]),
                    }
                    .expect("recv");
                    if n == 0 {
                        break;
                    }
                    read += n as u64;
                }
                if reader == Reader::FixedRate {
                    credit -= read;
                }
                received += read;
                transmit(now, &mut host, &mut dev, &mut h2d, &mut d2h, &mut pkt);
            }
            // Next thing to happen.
            let mut next = [
                h2d.due(),
                d2h.due(),
                host.poll_timeout(),
                dev.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            if reader == Reader::FixedRate && connected {
                next = Some(next.map_or(next_read, |t| t.min(next_read)));
            }
            match next {
                Some(t) if t > now => now = t,
                Some(_) => {}
                None => panic!("ACK simulation stalled at {now}"),
            }
        }
        let (t0, p0) = start.expect("started");
        let secs = (now - t0).total_micros() as f64 / 1e6;
        let packets = host.stats().packets_out + dev.stats().packets_out - p0;
        let (hs, ds) = (
            host.conn_stats(hid).expect("live"),
            dev.conn_stats(did.expect("accepted")).expect("live"),
        );
        let (sender, receiver) = match dir {
            Dir::HostToDevice => (hs, ds),
            Dir::DeviceToHost => (ds, hs),
        };
        let data_packets = sender.packets_sent - sender.pure_acks_sent;
        let busy = match dir {
            Dir::HostToDevice => h2d.busy,
            Dir::DeviceToHost => d2h.busy,
        };
        let busy = busy.total_micros().saturating_sub(busy0.total_micros()) as f64 / 1e6;
        Outcome {
            mb_per_s: received as f64 / secs / 1e6,
            packets_per_mib: packets as f64 / (received as f64 / (1 << 20) as f64),
            mean_segment: sender.bytes_sent as f64 / data_packets.max(1) as f64,
            window_stalls: sender.window_stalls,
            pure_acks: receiver.pure_acks_sent,
            data_pipe_busy: (busy / secs).min(1.0),
            zlps: match dir {
                Dir::HostToDevice => h2d.zlps,
                Dir::DeviceToHost => d2h.zlps,
            },
        }
    }

    fn transmit(
        now: Instant,
        host: &mut H,
        dev: &mut D,
        h2d: &mut Pipe,
        d2h: &mut Pipe,
        pkt: &mut [u8],
    ) {
        while let Some(t) = host.poll_transmit(now, pkt).expect("64 KiB suffices") {
            h2d.push(now, pkt[..t.len].to_vec());
            if t.zlp {
                h2d.push(now, Vec::new());
            }
        }
        while let Some(t) = dev.poll_transmit(now, pkt).expect("64 KiB suffices") {
            d2h.push(now, pkt[..t.len].to_vec());
            if t.zlp {
                d2h.push(now, Vec::new());
            }
        }
    }
}

/// The bytes the benches send: [`SOURCE_LEN`] of a pattern no cache line repeats.
pub fn source() -> Vec<u8> {
    (0..SOURCE_LEN)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect()
}

/// MB/s (10^6 bytes per second).
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}
