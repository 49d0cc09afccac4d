//! The device thread against an in-process simulated phone: client sockets relayed byte-exact
//! both ways, refusals, and the ends of connections from either side.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use usbmux_core::{Instant, SessionConfig};
use usbmux_host::daemon::device::{DeviceCmd, DeviceNote, DeviceThread};
use usbmux_host::daemon::sim::SimLink;
use usbmux_host::daemon::stream::ClientStream;
use usbmux_host::link::{DeviceIdentity, Link, LinkError};
use usbmux_sim::PhoneConfig;

/// What the device thread did with the link's held buffer.
#[derive(Default)]
struct Held {
    /// A buffer is held now (bytes read ahead wait in it).
    now: AtomicBool,
    /// Packets sent from it.
    sent: AtomicUsize,
}

/// The simulated phone's link, watched: every call goes to it, and whether a buffer is held
/// and how many packets went out of one are counted.
struct Watched {
    inner: SimLink,
    held: Arc<Held>,
}

impl Link for Watched {
    fn identity(&self) -> &DeviceIdentity {
        self.inner.identity()
    }
    fn start(&mut self, waker: Arc<mio::Waker>) -> Result<(), LinkError> {
        self.inner.start(waker)
    }
    fn send(&mut self, now: Instant, transfer: &[u8], zlp: bool) -> Result<(), LinkError> {
        self.inner.send(now, transfer, zlp)
    }
    fn recv(&mut self, now: Instant, buf: &mut [u8]) -> Result<Option<usize>, LinkError> {
        self.inner.recv(now, buf)
    }
    fn lends_out_buffers(&self) -> bool {
        self.inner.lends_out_buffers()
    }
    fn out_buffer(&mut self) -> Option<&mut [u8]> {
        self.inner.out_buffer()
    }
    fn send_out_buffer(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        self.inner.send_out_buffer(now, len, zlp)
    }
    fn hold_out_buffer(&mut self) -> Option<&mut [u8]> {
        self.held.now.store(true, Ordering::SeqCst);
        self.inner.hold_out_buffer()
    }
    fn send_held(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        self.held.now.store(false, Ordering::SeqCst);
        self.held.sent.fetch_add(1, Ordering::SeqCst);
        self.inner.send_held(now, len, zlp)
    }
    fn release_held(&mut self) {
        self.held.now.store(false, Ordering::SeqCst);
        self.inner.release_held();
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }
    fn end_turn(&mut self) {
        self.inner.end_turn();
    }
}

fn start() -> (DeviceThread, mpsc::Receiver<DeviceNote>) {
    start_with(Box::new(SimLink::new(PhoneConfig::simulated(1))))
}

/// The device thread on the watched simulated phone.
fn start_watched() -> (DeviceThread, Arc<Held>) {
    let held = Arc::new(Held::default());
    let link = Watched {
        inner: SimLink::new(PhoneConfig::simulated(1)),
        held: Arc::clone(&held),
    };
    (start_with(Box::new(link)).0, held)
}

fn start_with(link: Box<dyn Link>) -> (DeviceThread, mpsc::Receiver<DeviceNote>) {
    let (tx, rx) = mpsc::channel();
    let t = DeviceThread::spawn(
        7,
        link,
        SessionConfig::default(),
        4000,
        Box::new(move |n| {
            let _ = tx.send(n);
        }),
    )
    .expect("spawn");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(DeviceNote::Ready { device_id: 7 })
    );
    (t, rx)
}

/// Hands one end of a socket pair to the device thread; returns the client's end.
fn connect(t: &DeviceThread, port: u16) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().expect("pair");
    theirs.set_nonblocking(true).expect("nonblocking");
    let stream = ClientStream::Unix(mio::net::UnixStream::from_std(theirs));
    assert!(t.send(DeviceCmd::Connect {
        stream,
        port,
        ok: b"OK!".to_vec(),
        refused: b"NO!".to_vec()
    }));
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    ours
}

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read");
    v
}

/// Writes `data` to the echo connection `c` from another thread while the echo is read here
/// (a client that wrote everything before reading would stall once the buffers on the way are
/// full); the echo must be `data`, byte-exact.
fn echo_exact(c: &mut UnixStream, data: &[u8], what: &str) {
    let mut writer = c.try_clone().expect("clone");
    let d2 = data.to_vec();
    let w = std::thread::spawn(move || writer.write_all(&d2).expect("write"));
    let back = read_exact(c, data.len());
    w.join().expect("writer");
    assert!(back == data, "{what}: bytes lost, repeated or reordered");
}

#[test]
fn echo_through_the_device_thread_is_byte_exact() {
    let (t, _notes) = start();
    let mut c = connect(&t, 7);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + (i >> 11)) as u8).collect();
    echo_exact(&mut c, &data, "echo");
    t.stop();
}

/// A pattern that shows loss, repetition and reordering.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Waits (bounded) until `f` holds.
fn until(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn bytes_read_ahead_while_the_window_is_closed_arrive_once_in_order() {
    let (t, held) = start_watched();
    let mut c = connect(&t, 7);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
    // The client writes without reading the echo: the daemon's buffers towards it fill, the
    // phone stops echoing and reading, its window closes, and the next bytes are read ahead;
    // windows open and close again and again on the way.
    echo_exact(&mut c, &pattern(6 << 20, 3), "echo");
    assert!(
        held.sent.load(Ordering::SeqCst) >= 1,
        "nothing read ahead and sent"
    );
    t.stop();
}

/// The phone's source service never reads what it is sent: its window closes for good after
/// 128 KiB, so a client that writes more has its next bytes read ahead, and they wait.
fn blocked_for_good(t: &DeviceThread, held: &Held) -> UnixStream {
    let mut a = connect(t, 19);
    assert_eq!(read_exact(&mut a, 3), b"OK!");
    let mut writer = a.try_clone().expect("clone");
    // Blocks once everything is full; fails once the test ends the connection.
    std::thread::spawn(move || {
        let _ = writer.write_all(&vec![7u8; 1 << 20]);
    });
    assert!(
        until(|| held.now.load(Ordering::SeqCst)),
        "nothing read ahead"
    );
    a
}

#[test]
fn a_connection_with_bytes_read_ahead_holds_up_no_other() {
    let (t, held) = start_watched();
    let _a = blocked_for_good(&t, &held);
    // While A's bytes wait in the held buffer, B moves 2 MiB each way, byte-exact.
    let mut b = connect(&t, 7);
    assert_eq!(read_exact(&mut b, 3), b"OK!");
    echo_exact(&mut b, &pattern(2 << 20, 9), "B");
    // A's bytes still wait: nothing was built in their buffer, nothing sent from it.
    assert!(held.now.load(Ordering::SeqCst));
    assert_eq!(held.sent.load(Ordering::SeqCst), 0);
    t.stop();
}

#[test]
fn refused_port_gets_the_refused_message_and_eof() {
    let (t, _notes) = start();
    let mut c = connect(&t, 4242);
    let mut all = Vec::new();
    c.read_to_end(&mut all).expect("read");
    assert_eq!(all, b"NO!");
    // The phone still works.
    let mut c = connect(&t, 7);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
}

#[test]
fn many_parallel_connections() {
    let (t, _notes) = start();
    let mut clients: Vec<UnixStream> = (0..32).map(|_| connect(&t, 7)).collect();
    for c in clients.iter_mut() {
        assert_eq!(read_exact(c, 3), b"OK!");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(&vec![i as u8; 10_000 + i]).expect("write");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(read_exact(c, 10_000 + i), vec![i as u8; 10_000 + i]);
    }
}

#[test]
fn client_close_resets_the_phone_connection_after_delivery() {
    let (t, _notes) = start();
    // digest: write one message, shut down our sending side, the answer still arrives.
    let mut c = connect(&t, 1999);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
    let body = vec![0x5au8; 100_000];
    c.write_all(&(body.len() as u64).to_be_bytes())
        .expect("len");
    c.write_all(&body).expect("body");
    let answer = read_exact(&mut c, 32);
    assert_ne!(answer, vec![0u8; 32]);
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .expect("eof after the phone connection was reset");
    assert!(rest.is_empty());
}

#[test]
fn stop_ends_the_thread_and_reports_gone() {
    let (t, notes) = start();
    let mut c = connect(&t, 7);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
    t.stop();
    assert!(matches!(
        notes.recv_timeout(Duration::from_secs(5)),
        Ok(DeviceNote::Gone { device_id: 7, .. })
    ));
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}
