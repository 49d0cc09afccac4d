//! `UsbLink`'s reader and writer threads against a fake pair of bulk endpoints: OUT framing
//! (one transfer per packet, ZLPs, no timeout), ordering, IN hand-over, back-pressure, failure
//! and shutdown.

// Test helpers outside #[test] fns: a failed lock or poll is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant as StdInstant};

use mio::{Events, Poll, Token, Waker};
use usbmux_core::Instant;
use usbmux_host::link::{DeviceIdentity, Link, LinkError};
use usbmux_host::usb::{
    AppleDeviceKind, BulkIo, EventStrategy, InStrategy, OutStrategy, PipeConfig, UsbLink,
};

const NOW: Instant = Instant::ZERO;

/// What the next `write` does instead of succeeding in full.
#[derive(Clone, Copy)]
enum WriteOutcome {
    Fail(rusb::Error),
    Short(usize),
}

#[derive(Default)]
struct FakeState {
    /// Scripted IN transfers: data (possibly empty = ZLP) or an error.
    inbound: VecDeque<Result<Vec<u8>, rusb::Error>>,
    /// OUT transfers performed, with the timeout each was given.
    writes: Vec<(Vec<u8>, Duration)>,
    /// Scripted outcomes for the next writes.
    write_script: VecDeque<WriteOutcome>,
    /// While true, `write` blocks.
    writes_blocked: bool,
}

#[derive(Default)]
struct FakeEndpoints {
    state: Mutex<FakeState>,
    cond: Condvar,
    reads_completed: AtomicUsize,
    read_calls: AtomicUsize,
    write_calls: AtomicUsize,
}

impl FakeEndpoints {
    fn push_in(&self, item: Result<Vec<u8>, rusb::Error>) {
        self.state.lock().unwrap().inbound.push_back(item);
        self.cond.notify_all();
    }

    fn script_write(&self, outcome: WriteOutcome) {
        self.state.lock().unwrap().write_script.push_back(outcome);
    }

    fn block_writes(&self, blocked: bool) {
        self.state.lock().unwrap().writes_blocked = blocked;
        self.cond.notify_all();
    }

    fn writes(&self) -> Vec<Vec<u8>> {
        let state = self.state.lock().unwrap();
        state.writes.iter().map(|(d, _)| d.clone()).collect()
    }

    /// Waits until `n` writes happened.
    fn wait_writes(&self, n: usize) -> Vec<Vec<u8>> {
        let deadline = StdInstant::now() + Duration::from_secs(10);
        let mut state = self.state.lock().unwrap();
        while state.writes.len() < n {
            let left = deadline.saturating_duration_since(StdInstant::now());
            assert!(!left.is_zero(), "only {} of {n} writes", state.writes.len());
            state = self.cond.wait_timeout(state, left).unwrap().0;
        }
        state.writes.iter().map(|(d, _)| d.clone()).collect()
    }
}

impl BulkIo for FakeEndpoints {
    fn read(&self, buf: &mut [u8], timeout: Duration) -> Result<usize, rusb::Error> {
        self.read_calls.fetch_add(1, Ordering::SeqCst);
        let deadline = StdInstant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(item) = state.inbound.pop_front() {
                let data = item?;
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                self.reads_completed.fetch_add(1, Ordering::SeqCst);
                return Ok(n);
            }
            let left = deadline.saturating_duration_since(StdInstant::now());
            if left.is_zero() {
                return Err(rusb::Error::Timeout);
            }
            state = self.cond.wait_timeout(state, left).unwrap().0;
        }
    }

    fn write(&self, data: &[u8], timeout: Duration) -> Result<usize, rusb::Error> {
        self.write_calls.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        while state.writes_blocked {
            state = self.cond.wait(state).unwrap();
        }
        let result = match state.write_script.pop_front() {
            Some(WriteOutcome::Fail(e)) => return Err(e),
            Some(WriteOutcome::Short(n)) => n,
            None => data.len(),
        };
        state.writes.push((data.to_vec(), timeout));
        self.cond.notify_all();
        Ok(result)
    }
}

fn identity() -> DeviceIdentity {
    DeviceIdentity {
        udid: "00008030-001A2B3C4D5E6F70".into(),
        usb_serial: "00008030001A2B3C4D5E6F70".into(),
        product_id: 0x12a8,
        location_id: 0x0003_0009,
        speed: 480_000_000,
        max_packet_size: 512,
    }
}

fn small_config() -> PipeConfig {
    PipeConfig {
        in_buffer_size: 4096,
        in_buffers: 2,
        out_queue: 4,
        read_timeout: Duration::from_millis(20),
        send_stall_limit: Duration::from_secs(5),
        in_strategy: InStrategy::Thread,
        out_strategy: OutStrategy::Thread,
        events: EventStrategy::Thread,
        usbfs_buffers: false,
    }
}

struct Harness {
    fake: Arc<FakeEndpoints>,
    link: UsbLink,
    poll: Poll,
    events: Events,
}

impl Harness {
    fn new(config: PipeConfig) -> Harness {
        let fake = Arc::new(FakeEndpoints::default());
        let io: Arc<dyn BulkIo> = fake.clone();
        let mut link = UsbLink::with_io(identity(), AppleDeviceKind::Mobile, io, config);
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).unwrap());
        link.start(waker).unwrap();
        Harness {
            fake,
            link,
            poll,
            events: Events::with_capacity(8),
        }
    }

    /// Waits for a wake-up; false on timeout.
    fn wait_wake(&mut self, timeout: Duration) -> bool {
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        !self.events.is_empty()
    }

    /// Receives transfers the way the device thread does — wait for a wake, then `recv` until
    /// `None` — until `count` transfers (or an error) arrived.
    fn recv_transfers(&mut self, count: usize, buf_len: usize) -> Result<Vec<Vec<u8>>, LinkError> {
        let mut out = Vec::new();
        let deadline = StdInstant::now() + Duration::from_secs(10);
        let mut buf = vec![0; buf_len];
        while out.len() < count {
            while let Some(n) = self.link.recv(NOW, &mut buf)? {
                out.push(buf[..n].to_vec());
            }
            if out.len() >= count {
                break;
            }
            let left = deadline.saturating_duration_since(StdInstant::now());
            assert!(!left.is_zero(), "got {} of {count} transfers", out.len());
            self.wait_wake(left);
        }
        Ok(out)
    }
}

/// Polls `cond` until it holds (10 s at most).
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(StdInstant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn packet(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn out_one_transfer_per_packet_then_zlp_without_timeout() {
    let mut h = Harness::new(small_config());
    let a = packet(36, 1);
    let b = packet(512, 2);
    let c = packet(49_152, 3);
    h.link.send(NOW, &a, false).unwrap();
    h.link.send(NOW, &b, true).unwrap();
    h.link.send(NOW, &c, true).unwrap();
    let writes = h.fake.wait_writes(5);
    assert_eq!(writes, vec![a, b, vec![], c, vec![]]);
    let state = h.fake.state.lock().unwrap();
    assert!(
        state.writes.iter().all(|(_, t)| t.is_zero()),
        "OUT must not time out"
    );
    drop(state);
    let stats = h.link.stats();
    assert_eq!((stats.out_transfers, stats.out_zlps), (3, 2));
    assert_eq!(stats.out_bytes, 36 + 512 + 49_152);
}

#[test]
fn out_order_is_kept_under_backpressure() {
    let mut h = Harness::new(small_config());
    h.fake.block_writes(true);
    let fake = h.fake.clone();
    // Unblock a little later: `send` must wait for room (queue of 4), not fail or reorder.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        fake.block_writes(false);
    });
    let packets: Vec<Vec<u8>> = (0..200)
        .map(|i| packet(1 + i * 37 % 3000, i as u8))
        .collect();
    for (i, p) in packets.iter().enumerate() {
        h.link.send(NOW, p, i % 10 == 0).unwrap();
    }
    releaser.join().unwrap();
    let mut expected = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        expected.push(p.clone());
        if i % 10 == 0 {
            expected.push(Vec::new());
        }
    }
    assert_eq!(h.fake.wait_writes(expected.len()), expected);
}

#[test]
fn in_transfers_arrive_in_order_and_zlps_are_dropped() {
    let mut h = Harness::new(small_config());
    let (a, b, c) = (packet(100, 1), packet(4096, 2), packet(7, 3));
    h.fake.push_in(Ok(a.clone()));
    h.fake.push_in(Ok(Vec::new()));
    h.fake.push_in(Ok(b.clone()));
    h.fake.push_in(Ok(c.clone()));
    assert!(h.wait_wake(Duration::from_secs(5)), "no wake-up");
    let got = h.recv_transfers(3, 8192).unwrap();
    assert_eq!(got, vec![a, b, c]);
    let stats = h.link.stats();
    assert_eq!(
        (stats.in_transfers, stats.in_bytes, stats.in_zlps),
        (3, 4203, 1)
    );
}

#[test]
fn small_recv_buffer_gets_a_transfer_in_pieces() {
    let mut h = Harness::new(small_config());
    let a = packet(1000, 9);
    let b = packet(10, 10);
    h.fake.push_in(Ok(a.clone()));
    h.fake.push_in(Ok(b.clone()));
    let got = h.recv_transfers(5, 300).unwrap();
    assert_eq!(
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        [300, 300, 300, 100, 10]
    );
    assert_eq!(got[..4].concat(), a);
    assert_eq!(got[4], b);
    // An empty buffer neither consumes nor fails.
    assert_eq!(h.link.recv(NOW, &mut []).unwrap(), None);
}

#[test]
fn ring_exhaustion_stops_reading_until_buffers_return() {
    let mut h = Harness::new(small_config()); // 2 IN buffers
    for i in 0..5 {
        h.fake.push_in(Ok(packet(64, i)));
    }
    wait_until("two reads", || {
        h.fake.reads_completed.load(Ordering::SeqCst) == 2
    });
    std::thread::sleep(Duration::from_millis(100));
    // Both buffers are full and nobody consumed them: the reader waits instead of reading on.
    assert_eq!(h.fake.reads_completed.load(Ordering::SeqCst), 2);
    let got = h.recv_transfers(5, 4096).unwrap();
    assert_eq!(got, (0..5).map(|i| packet(64, i)).collect::<Vec<_>>());
    assert_eq!(h.fake.reads_completed.load(Ordering::SeqCst), 5);
}

#[test]
fn timeouts_do_not_end_the_link() {
    let mut h = Harness::new(small_config());
    std::thread::sleep(Duration::from_millis(150)); // several 20 ms read timeouts
    assert!(h.fake.read_calls.load(Ordering::SeqCst) >= 2);
    assert_eq!(h.link.recv(NOW, &mut [0; 64]).unwrap(), None);
    h.fake.push_in(Err(rusb::Error::Interrupted));
    h.fake.push_in(Ok(packet(5, 5)));
    assert_eq!(h.recv_transfers(1, 64).unwrap(), vec![packet(5, 5)]);
    h.link.send(NOW, &[1, 2, 3], false).unwrap();
    h.fake.wait_writes(1);
}

#[test]
fn unplug_delivers_pending_data_then_disconnected() {
    let mut h = Harness::new(small_config());
    h.fake.push_in(Ok(packet(20, 1)));
    h.fake.push_in(Err(rusb::Error::NoDevice));
    // Drain like the device thread until the failure shows: the data comes first.
    let mut buf = [0; 64];
    let mut received = Vec::new();
    let deadline = StdInstant::now() + Duration::from_secs(10);
    let err = loop {
        match h.link.recv(NOW, &mut buf) {
            Ok(Some(n)) => received.push(n),
            Ok(None) => {
                assert!(StdInstant::now() < deadline, "no failure reported");
                h.wait_wake(Duration::from_millis(100));
            }
            Err(e) => break e,
        }
    };
    assert_eq!(received, [20]);
    assert!(matches!(err, LinkError::Disconnected));
    // The error stays, and sending fails too.
    assert!(matches!(
        h.link.recv(NOW, &mut buf),
        Err(LinkError::Disconnected)
    ));
    assert!(matches!(
        h.link.send(NOW, &[0; 8], false),
        Err(LinkError::Disconnected)
    ));
}

#[test]
fn other_in_errors_end_the_link_with_the_reason() {
    let mut h = Harness::new(small_config());
    h.fake.push_in(Err(rusb::Error::Pipe));
    let err = h.recv_transfers(1, 64).expect_err("link must fail");
    match err {
        LinkError::Usb(text) => assert!(text.contains("bulk IN"), "{text}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn out_failure_wakes_and_ends_the_link() {
    let mut h = Harness::new(small_config());
    h.fake
        .script_write(WriteOutcome::Fail(rusb::Error::NoDevice));
    h.link.send(NOW, &packet(10, 1), false).unwrap();
    assert!(
        h.wait_wake(Duration::from_secs(5)),
        "no wake-up on OUT failure"
    );
    assert!(matches!(
        h.link.recv(NOW, &mut [0; 64]),
        Err(LinkError::Disconnected)
    ));
    assert!(matches!(
        h.link.send(NOW, &[1], false),
        Err(LinkError::Disconnected)
    ));
}

#[test]
fn interrupted_out_is_retried_and_short_write_fails() {
    let mut h = Harness::new(small_config());
    h.fake
        .script_write(WriteOutcome::Fail(rusb::Error::Interrupted));
    let a = packet(100, 1);
    h.link.send(NOW, &a, false).unwrap();
    assert_eq!(h.fake.wait_writes(1), vec![a]);

    h.fake.script_write(WriteOutcome::Short(50));
    h.link.send(NOW, &packet(100, 2), false).unwrap();
    assert!(h.wait_wake(Duration::from_secs(5)));
    match h.link.recv(NOW, &mut [0; 8]) {
        Err(LinkError::Usb(text)) => assert!(text.contains("wrote 50 of 100"), "{text}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_wedged_out_pipe_fails_send_after_the_stall_limit() {
    let config = PipeConfig {
        out_queue: 1,
        send_stall_limit: Duration::from_millis(100),
        ..small_config()
    };
    let mut h = Harness::new(config);
    h.fake.block_writes(true);
    h.link.send(NOW, &[1], false).unwrap(); // taken by the writer, which blocks
    wait_until("the writer to take it", || {
        h.fake.write_calls.load(Ordering::SeqCst) == 1
    });
    h.link.send(NOW, &[2], false).unwrap(); // fills the queue
    let started = StdInstant::now();
    let err = h.link.send(NOW, &[3], false).expect_err("must stall");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(matches!(err, LinkError::Usb(ref t) if t.contains("no packet accepted")));
    h.fake.block_writes(false);
}

#[test]
fn close_joins_both_threads_and_releases_the_endpoints() {
    let h = Harness::new(small_config());
    let fake = h.fake.clone();
    let mut link = h.link;
    link.send(NOW, &packet(10, 1), true).unwrap();
    link.close();
    // Queued packets were written before the writer exited.
    assert_eq!(fake.writes(), vec![packet(10, 1), vec![]]);
    // Only the test holds the fake now (`fake` and `h.fake`): the link and both threads let go.
    assert_eq!(Arc::strong_count(&fake), 2);
}

#[test]
fn drop_stops_the_reader_promptly() {
    let h = Harness::new(PipeConfig {
        read_timeout: Duration::from_millis(50),
        ..small_config()
    });
    let fake = h.fake.clone();
    let started = StdInstant::now();
    drop(h);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The idle writer exits on its own right after; wait for it to let go.
    let deadline = StdInstant::now() + Duration::from_secs(5);
    while Arc::strong_count(&fake) > 1 {
        assert!(
            StdInstant::now() < deadline,
            "threads still hold the endpoints"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn start_twice_is_an_error_and_identity_is_kept() {
    let mut h = Harness::new(small_config());
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), Token(1)).unwrap());
    assert!(matches!(h.link.start(waker), Err(LinkError::Protocol(_))));
    assert_eq!(h.link.identity(), &identity());
    assert_eq!(h.link.kind(), AppleDeviceKind::Mobile);
    let loc = h.link.location();
    assert_eq!((loc.bus, loc.address), (3, 9));
    // Odd sizes are rounded to whole packets at every speed.
    assert_eq!(h.link.config().in_buffer_size, 4096);
}

#[test]
fn in_buffer_size_is_rounded_to_whole_packets() {
    let fake: Arc<dyn BulkIo> = Arc::new(FakeEndpoints::default());
    let link = UsbLink::with_io(
        identity(),
        AppleDeviceKind::T2,
        fake,
        PipeConfig {
            in_buffer_size: 1000,
            in_buffers: 0,
            out_queue: 0,
            ..PipeConfig::default()
        },
    );
    let config = link.config();
    assert_eq!(
        (config.in_buffer_size, config.in_buffers, config.out_queue),
        (1024, 1, 1)
    );
    assert!(link.kind().skips_preflight());
}

#[test]
fn with_io_reads_in_with_the_thread_whatever_the_config_says() {
    // Asynchronous transfers need a libusb handle; a plain `BulkIo` gets the reader thread,
    // and the link says so.
    let fake = Arc::new(FakeEndpoints::default());
    let io: Arc<dyn BulkIo> = fake.clone();
    let mut link = UsbLink::with_io(
        identity(),
        AppleDeviceKind::Mobile,
        io,
        PipeConfig {
            in_strategy: InStrategy::Async,
            ..small_config()
        },
    );
    assert_eq!(link.config().in_strategy, InStrategy::Thread);
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
    link.start(waker).unwrap();
    fake.push_in(Ok(b"via the reader thread".to_vec()));
    wait_until("the reader to read", || {
        fake.reads_completed.load(Ordering::SeqCst) == 1
    });
    let mut buf = [0u8; 64];
    let deadline = StdInstant::now() + Duration::from_secs(10);
    let n = loop {
        if let Some(n) = link.recv(NOW, &mut buf).unwrap() {
            break n;
        }
        assert!(StdInstant::now() < deadline, "nothing received");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(&buf[..n], b"via the reader thread");
}

#[test]
fn in_strategy_names_round_trip() {
    for strategy in [InStrategy::Thread, InStrategy::Async] {
        assert_eq!(strategy.name().parse::<InStrategy>(), Ok(strategy));
        assert_eq!(strategy.to_string(), strategy.name());
    }
    assert!("threads".parse::<InStrategy>().is_err());
    assert_eq!(PipeConfig::default().in_strategy, InStrategy::Async);
}

#[test]
fn out_strategy_names_round_trip_and_async_is_the_default() {
    for strategy in [OutStrategy::Thread, OutStrategy::Async] {
        assert_eq!(strategy.name().parse::<OutStrategy>(), Ok(strategy));
        assert_eq!(strategy.to_string(), strategy.name());
    }
    assert!("sync".parse::<OutStrategy>().is_err());
    assert_eq!(PipeConfig::default().out_strategy, OutStrategy::Async);
}

#[test]
fn events_are_inline_by_default_and_only_where_both_directions_are_asynchronous() {
    for strategy in [EventStrategy::Thread, EventStrategy::Inline] {
        assert_eq!(strategy.name().parse::<EventStrategy>(), Ok(strategy));
        assert_eq!(strategy.to_string(), strategy.name());
    }
    assert!("inlined".parse::<EventStrategy>().is_err());
    let default = PipeConfig::default();
    assert_eq!(default.events, EventStrategy::Inline);
    assert_eq!(default.normalized().events, EventStrategy::Inline);
    for (in_strategy, out_strategy) in [
        (InStrategy::Thread, OutStrategy::Async),
        (InStrategy::Async, OutStrategy::Thread),
        (InStrategy::Thread, OutStrategy::Thread),
    ] {
        let used = PipeConfig {
            in_strategy,
            out_strategy,
            ..default
        }
        .normalized();
        // The asked strategies stay; only the events move to a thread.
        assert_eq!(
            (used.in_strategy, used.out_strategy, used.events),
            (in_strategy, out_strategy, EventStrategy::Thread)
        );
    }
}

#[test]
fn a_plain_bulk_io_link_writes_with_the_writer_thread_even_if_async_out_is_asked() {
    // Asynchronous OUT transfers need a libusb handle, like asynchronous IN.
    let fake = Arc::new(FakeEndpoints::default());
    let io: Arc<dyn BulkIo> = fake.clone();
    let mut link = UsbLink::with_io(
        identity(),
        AppleDeviceKind::Mobile,
        io,
        PipeConfig {
            out_strategy: OutStrategy::Async,
            ..small_config()
        },
    );
    assert_eq!(link.config().out_strategy, OutStrategy::Thread);
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
    link.start(waker).unwrap();
    link.send(NOW, b"via the writer thread", false).unwrap();
    wait_until("the writer to write", || link.stats().out_transfers == 1);
    assert_eq!(link.stats().out_bytes, 21);
}
