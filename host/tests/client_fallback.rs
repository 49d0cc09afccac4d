//! `usbmux_host::client` against fake daemons written here: a binary-only daemon that answers
//! BADVERSION to plist requests (the fallback for list / listen / connect, `Unsupported` for the
//! rest, remembered per client), and misbehaving daemons (silent, trickling, oversized,
//! closing) that must give `Timeout`, `Protocol` or `Disconnected` within the configured bound.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use usbmux_host::client::{
    Client, ClientError, ConnectionType, DeviceEvent, Protocol, SocketAddress,
};
use usbmux_host::plist_msg::{DeviceInfo, PlistRequest, Reply, Request};
use usbmux_host::proto::{
    BinaryMessage, ConnectRequest, DeviceRecord, Header, MessageType, ProtocolVersion, ResultCode,
};

/// What the fakes saw, for assertions.
#[derive(Default)]
struct Stats {
    plist_requests: AtomicUsize,
    binary_requests: AtomicUsize,
}

type Handler = fn(UnixStream, &Stats, &AtomicBool);

/// A fake daemon on a Unix socket: every connection is handed to `handler` on its own thread.
/// Dropping it stops accepting and tells the handlers to finish.
struct Fake {
    path: PathBuf,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn spawn(dir: &Path, handler: Handler) -> Fake {
        let path = dir.join("fake-usbmuxd");
        let listener = UnixListener::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).expect("blocking");
                        let (s, st) = (s.clone(), st.clone());
                        workers.push(std::thread::spawn(move || handler(conn, &s, &st)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        Fake {
            path,
            stats,
            stop,
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client {
        Client::with_address(SocketAddress::Unix(self.path.clone()))
    }

    fn plist_requests(&self) -> usize {
        self.stats.plist_requests.load(Ordering::Relaxed)
    }

    fn binary_requests(&self) -> usize {
        self.stats.binary_requests.load(Ordering::Relaxed)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request; `None` when the client went away (or the fake is stopping).
fn read_request(conn: &mut UnixStream, stop: &AtomicBool) -> Option<(Header, Vec<u8>)> {
    conn.set_read_timeout(Some(Duration::from_millis(20)))
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= 16 {
            let h = Header::parse(&buf).ok()?;
            if buf.len() >= h.total_len() {
                return Some((h, buf[16..h.total_len()].to_vec()));
            }
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        match conn.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
}

/// Waits for the client to close (or the fake to stop), reading and dropping what it sends.
fn drain(conn: &mut UnixStream, stop: &AtomicBool) {
    while read_request(conn, stop).is_some() {}
}

fn binary(conn: &mut UnixStream, tag: u32, m: BinaryMessage) {
    let _ = conn.write_all(&m.to_vec(tag).expect("encode"));
}

const SERIAL_24: &str = "00008030001A2B3C4D5E6F70";
const SERIAL_40: &str = "0123456789abcdef0123456789abcdef01234567";

/// An old, binary-only usbmuxd: BADVERSION to any plist request (in binary, as old daemons
/// answer); binary Listen lists devices 5 and 6, later says 5 is paired and 6 is gone; binary
/// Connect to device 5 port 7 is an echo, another port is refused, another device unknown.
fn binary_only(conn: UnixStream, stats: &Stats, stop: &AtomicBool) {
    binary_only_with(conn, stats, stop, false)
}

/// The same, but answering BADVERSION as a plist Result (as a daemon that parsed the plist
/// but refuses the version might).
fn binary_only_plist_refusal(conn: UnixStream, stats: &Stats, stop: &AtomicBool) {
    binary_only_with(conn, stats, stop, true)
}

fn binary_only_with(mut conn: UnixStream, stats: &Stats, stop: &AtomicBool, plist_refusal: bool) {
    let Some((h, body)) = read_request(&mut conn, stop) else {
        return;
    };
    if h.version != ProtocolVersion::Binary || h.message == MessageType::Plist {
        stats.plist_requests.fetch_add(1, Ordering::Relaxed);
        if plist_refusal {
            let _ = conn.write_all(&Reply::Result(6).encode(h.tag).expect("encode"));
        } else {
            binary(
                &mut conn,
                h.tag,
                BinaryMessage::Result(ResultCode::BadVersion),
            );
        }
        drain(&mut conn, stop);
        return;
    }
    stats.binary_requests.fetch_add(1, Ordering::Relaxed);
    match h.message {
        MessageType::Listen => {
            binary(&mut conn, h.tag, BinaryMessage::Result(ResultCode::Ok));
            for (device_id, serial) in [(5, SERIAL_24), (6, SERIAL_40)] {
                let record = DeviceRecord {
                    device_id,
                    product_id: 0x12a8,
                    serial: serial.into(),
                    location: 0x0001_0002,
                };
                binary(&mut conn, 0, BinaryMessage::DeviceAdd(record));
            }
            std::thread::sleep(Duration::from_millis(300));
            binary(&mut conn, 0, BinaryMessage::DevicePaired { device_id: 5 });
            binary(&mut conn, 0, BinaryMessage::DeviceRemove { device_id: 6 });
            drain(&mut conn, stop);
        }
        MessageType::Connect => {
            let Ok(req) = ConnectRequest::parse(&body) else {
                binary(
                    &mut conn,
                    h.tag,
                    BinaryMessage::Result(ResultCode::BadCommand),
                );
                return;
            };
            let code = match (req.device_id, req.port) {
                (5, 7) => ResultCode::Ok,
                (5, _) => ResultCode::ConnectionRefused,
                _ => ResultCode::BadDevice,
            };
            binary(&mut conn, h.tag, BinaryMessage::Result(code));
            if code == ResultCode::Ok {
                // Echo until the client closes.
                let mut buf = [0u8; 4096];
                let _ = conn.set_read_timeout(None);
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        _ => binary(
            &mut conn,
            h.tag,
            BinaryMessage::Result(ResultCode::BadCommand),
        ),
    }
}

fn check_binary_daemon(fake: &Fake) {
    let client = fake.client().with_timeout(Duration::from_secs(5));
    assert_eq!(client.protocol(), Protocol::Plist);

    // ListDevices → BADVERSION → binary Listen, collected until 100 ms of quiet.
    let started = Instant::now();
    let devices = client.list_devices().expect("list via Listen");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(client.protocol(), Protocol::Binary, "fallback remembered");
    assert_eq!(fake.plist_requests(), 1);
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0].device_id, 5);
    assert_eq!(
        devices[0].udid, "00008030-001A2B3C4D5E6F70",
        "hyphen inserted"
    );
    assert_eq!(devices[0].product_id, 0x12a8);
    assert_eq!(devices[0].location_id, 0x0001_0002);
    assert_eq!(devices[0].connection_type, ConnectionType::Usb);
    assert_eq!(devices[1].udid, SERIAL_40);

    // Later calls go binary at once: no more plist requests.
    let found = client
        .find_device("00008030001a2b3c4d5e6f70")
        .expect("find");
    assert_eq!(found.map(|d| d.device_id), Some(5));

    let mut s = client.connect(5, 7).expect("binary connect");
    s.write_all(b"hello binary").expect("write");
    let mut back = [0u8; 12];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"hello binary");
    drop(s);
    assert!(matches!(
        client.connect(5, 8),
        Err(ClientError::ConnectionRefused)
    ));
    assert!(matches!(
        client.connect(9, 7),
        Err(ClientError::NoSuchDevice)
    ));

    // Only Listen and Connect exist in binary.
    assert!(matches!(
        client.read_buid(),
        Err(ClientError::Unsupported {
            request: "ReadBUID"
        })
    ));
    assert!(matches!(
        client.read_pair_record(SERIAL_24),
        Err(ClientError::Unsupported { .. })
    ));
    assert!(matches!(
        client.save_pair_record(SERIAL_24, b"<plist/>"),
        Err(ClientError::Unsupported { .. })
    ));
    assert!(matches!(
        client.delete_pair_record(SERIAL_24),
        Err(ClientError::Unsupported { .. })
    ));
    assert!(matches!(
        client.list_listeners(),
        Err(ClientError::Unsupported { .. })
    ));

    // Listen in binary: the devices, then Paired and Detached.
    let mut l = client.listen().expect("listen");
    assert_eq!(l.protocol(), Protocol::Binary);
    let mut events = Vec::new();
    while events.len() < 4 {
        let ev = l
            .next_timeout(Duration::from_secs(5))
            .expect("event")
            .expect("in time");
        events.push(ev);
    }
    assert!(matches!(&events[0], DeviceEvent::Attached(d) if d.device_id == 5));
    assert!(matches!(&events[1], DeviceEvent::Attached(d) if d.device_id == 6));
    assert_eq!(events[2], DeviceEvent::Paired { device_id: 5 });
    assert_eq!(events[3], DeviceEvent::Detached { device_id: 6 });
    assert_eq!(
        fake.plist_requests(),
        1,
        "every later call went binary directly"
    );
    assert!(fake.binary_requests() >= 6);

    // A clone shares what was learnt.
    assert_eq!(client.clone().protocol(), Protocol::Binary);
}

#[test]
fn binary_only_daemon_answering_in_binary() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = Fake::spawn(dir.path(), binary_only);
    check_binary_daemon(&fake);
}

#[test]
fn binary_only_daemon_answering_in_plist() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = Fake::spawn(dir.path(), binary_only_plist_refusal);
    check_binary_daemon(&fake);
}

#[test]
fn first_call_unsupported_then_connect_falls_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = Fake::spawn(dir.path(), binary_only);
    let client = fake.client();
    assert!(matches!(
        client.read_buid(),
        Err(ClientError::Unsupported {
            request: "ReadBUID"
        })
    ));
    assert_eq!(client.protocol(), Protocol::Binary);
    assert!(client.connect(5, 7).is_ok());
    assert_eq!(fake.plist_requests(), 1);

    // A fresh client whose first call is Connect retries it in binary.
    let fresh = fake.client();
    let mut s = fresh.connect(5, 7).expect("connect after BADVERSION");
    s.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("echo");
    assert_eq!(fake.plist_requests(), 2);

    // And one that starts in binary never tries plist.
    let forced = fake.client().with_protocol(Protocol::Binary);
    assert_eq!(forced.list_devices().expect("list").len(), 2);
    assert_eq!(fake.plist_requests(), 2);
}

/// A plist daemon without ListDevices (BADCOMMAND to it) but with Listen: the client lists
/// devices by collecting the Attached messages, as libusbmuxd does.
fn plist_listen_only(mut conn: UnixStream, stats: &Stats, stop: &AtomicBool) {
    let Some((h, body)) = read_request(&mut conn, stop) else {
        return;
    };
    stats.plist_requests.fetch_add(1, Ordering::Relaxed);
    let request = PlistRequest::parse(&body).map(|r| r.request);
    if request != Ok(Request::Listen) {
        let _ = conn.write_all(&Reply::Result(1).encode(h.tag).expect("encode"));
        return;
    }
    let _ = conn.write_all(&Reply::Result(0).encode(h.tag).expect("encode"));
    for k in [1u32, 2] {
        let device = DeviceInfo {
            device_id: 10 + k,
            product_id: 0x12a8,
            location_id: k,
            speed: 480_000_000,
            udid: format!("00008030-{k:016X}"),
            usb_serial: format!("00008030{k:016X}"),
        };
        let _ = conn.write_all(&Reply::Attached(&device).encode(0).expect("encode"));
    }
    // Device 11 goes away again within the quiet period: not listed.
    std::thread::sleep(Duration::from_millis(30));
    let _ = conn.write_all(&Reply::Detached { device_id: 11 }.encode(0).expect("encode"));
    drain(&mut conn, stop);
}

#[test]
fn list_devices_without_list_devices_uses_plist_listen() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = Fake::spawn(dir.path(), plist_listen_only);
    let client = fake.client();
    let devices = client.list_devices().expect("list via plist Listen");
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].device_id, 12);
    assert_eq!(devices[0].udid, "00008030-0000000000000002");
    assert_eq!(devices[0].connection_speed, Some(480_000_000));
    assert_eq!(
        client.protocol(),
        Protocol::Plist,
        "BADCOMMAND is no reason to go binary"
    );
    assert_eq!(fake.plist_requests(), 2);
    assert!(matches!(client.read_buid(), Err(ClientError::BadCommand)));
}

/// Reads requests and never answers.
fn silent(mut conn: UnixStream, _: &Stats, stop: &AtomicBool) {
    drain(&mut conn, stop);
}

/// Starts a reply (a header announcing 100 bytes) and then sends one byte every 50 ms.
fn trickle(mut conn: UnixStream, _: &Stats, stop: &AtomicBool) {
    if read_request(&mut conn, stop).is_none() {
        return;
    }
    let h = Header::new(ProtocolVersion::Plist, MessageType::Plist, 1, 100).expect("header");
    let _ = conn.write_all(&h.to_bytes().expect("bytes"));
    while !stop.load(Ordering::Relaxed) {
        if conn.write_all(b" ").is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_timeout<T: std::fmt::Debug>(
    what: &str,
    bound: Duration,
    f: impl FnOnce() -> Result<T, ClientError>,
) {
    let started = Instant::now();
    let result = f();
    let took = started.elapsed();
    assert!(
        matches!(result, Err(ClientError::Timeout)),
        "{what}: {result:?}"
    );
    assert!(
        took >= bound - Duration::from_millis(20),
        "{what}: {took:?} < {bound:?}"
    );
    assert!(
        took < bound + Duration::from_millis(700),
        "{what}: took {took:?}"
    );
}

#[test]
fn a_daemon_that_never_answers_times_out() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = Fake::spawn(dir.path(), silent);
    let bound = Duration::from_millis(300);
    let client = fake.client().with_timeout(bound);
    assert_eq!(client.timeout(), bound);
    assert_timeout("ReadBUID", bound, || client.read_buid());
    assert_timeout("ListDevices", bound, || client.list_devices());
    assert_timeout("Listen", bound, || client.listen().map(|_| ()));
    assert_timeout("Connect", bound, || client.connect(1, 62078).map(|_| ()));
    assert_timeout("SavePairRecord", bound, || {
        client.save_pair_record(SERIAL_24, b"<plist/>")
    });
}

#[test]
fn a_trickling_reply_still_times_out_at_the_bound() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = Fake::spawn(dir.path(), trickle);
    let bound = Duration::from_millis(400);
    let client = fake.client().with_timeout(bound);
    assert_timeout("ReadBUID (trickled)", bound, || client.read_buid());
}

/// Answers with a header announcing more than the protocol allows.
fn oversized(mut conn: UnixStream, _: &Stats, stop: &AtomicBool) {
    if read_request(&mut conn, stop).is_some() {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&(16u32 << 20).to_le_bytes());
        h[4] = 1;
        h[8] = 8;
        let _ = conn.write_all(&h);
        drain(&mut conn, stop);
    }
}

/// Reads the request and hangs up.
fn hang_up(mut conn: UnixStream, _: &Stats, stop: &AtomicBool) {
    let _ = read_request(&mut conn, stop);
}

/// Answers every request with a plist that is no plist.
fn garbage(mut conn: UnixStream, _: &Stats, stop: &AtomicBool) {
    if let Some((h, _)) = read_request(&mut conn, stop) {
        let body = b"<plist><dict><key>BUID</key>";
        let header = Header::new(
            ProtocolVersion::Plist,
            MessageType::Plist,
            h.tag,
            body.len(),
        )
        .expect("header");
        let _ = conn.write_all(&header.to_bytes().expect("bytes"));
        let _ = conn.write_all(body);
        drain(&mut conn, stop);
    }
}

#[test]
fn broken_daemons_give_typed_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let big = Fake::spawn(dir.path(), oversized);
    assert!(
        matches!(big.client().read_buid(), Err(ClientError::Protocol(m)) if m.contains("header")),
    );
    drop(big);
    let _ = std::fs::remove_file(dir.path().join("fake-usbmuxd"));

    let closer = Fake::spawn(dir.path(), hang_up);
    assert!(matches!(
        closer.client().read_buid(),
        Err(ClientError::Disconnected)
    ));
    assert!(matches!(
        closer.client().connect(1, 1),
        Err(ClientError::Disconnected)
    ));
    drop(closer);
    let _ = std::fs::remove_file(dir.path().join("fake-usbmuxd"));

    let junk = Fake::spawn(dir.path(), garbage);
    assert!(matches!(
        junk.client().read_buid(),
        Err(ClientError::Protocol(_))
    ));
    assert!(matches!(
        junk.client().list_devices(),
        Err(ClientError::Protocol(_))
    ));
}
