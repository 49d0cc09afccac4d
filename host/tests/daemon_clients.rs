//! The daemon end to end with a client written here (the binary and plist protocols through
//! `usbmux_host::proto` / `plist_msg`): phones in-process and served over `usbmux-sim serve`'s
//! socket, Listen notifications on plug and unplug, Connect to echo, hostile clients.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use usbmux_host::daemon::{self, DaemonConfig, RunningDaemon, SocketSpec};
use usbmux_host::plist_msg::{PlistRequest, Request};
use usbmux_host::proto::{
    BinaryMessage, ConnectRequest, Header, MessageType, ProtocolVersion, ResultCode,
};
use usbmux_sim::socket::Server;
use usbmux_sim::PhoneConfig;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("usbmux-host-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &Path, phones: Vec<PhoneConfig>, sockets: Vec<PathBuf>) -> RunningDaemon {
    daemon::start(DaemonConfig {
        activated: None,
        socket: SocketSpec::Unix {
            path: dir.join("usbmuxd"),
            mode: 0o600,
        },
        config_dir: dir.join("lockdown"),
        simulate: phones,
        sim_sockets: sockets,
        session: usbmux_core::SessionConfig::default(),
        trace: None,
        usb: false,
        usb_on_demand: false,
    })
    .expect("daemon")
}

fn client(dir: &Path) -> UnixStream {
    let s = UnixStream::connect(dir.join("usbmuxd")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Reads one whole message.
fn read_message(s: &mut UnixStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("header");
    let header = Header::parse(&h).expect("valid header");
    let mut body = vec![0u8; header.length as usize - 16];
    s.read_exact(&mut body).expect("body");
    (header, body)
}

fn binary_listen(s: &mut UnixStream) {
    s.write_all(&BinaryMessage::Listen.to_vec(1).expect("encode"))
        .expect("listen");
    let (h, body) = read_message(s);
    assert_eq!(h.message, MessageType::Result);
    assert_eq!(h.tag, 1);
    assert_eq!(body, [0, 0, 0, 0]);
}

/// Waits for DEVICE_ADD records until `n` devices are known; returns (id, serial).
fn devices_added(s: &mut UnixStream, n: usize) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let (h, body) = read_message(s);
        assert_eq!(h.message, MessageType::DeviceAdd, "{h:?}");
        assert_eq!(h.tag, 0);
        assert_eq!(body.len(), 268);
        let mut msg = h.to_bytes().expect("header").to_vec();
        msg.extend_from_slice(&body);
        let (_, m) = BinaryMessage::parse(&msg).expect("record");
        let BinaryMessage::DeviceAdd(r) = m else {
            panic!("{m:?}")
        };
        assert_eq!(r.product_id, 0x12a8);
        out.push((r.device_id, r.serial));
    }
    out
}

fn binary_connect(dir: &Path, device_id: u32, port: u16) -> Result<UnixStream, ResultCode> {
    let mut s = client(dir);
    let body = {
        let mut b = [0u8; 8];
        ConnectRequest { device_id, port }
            .emit(&mut b)
            .expect("emit");
        b
    };
    let h =
        Header::new(ProtocolVersion::Binary, MessageType::Connect, 7, body.len()).expect("header");
    let mut msg = h.to_bytes().expect("bytes").to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).expect("connect");
    let (h, body) = read_message(&mut s);
    assert_eq!((h.message, h.tag), (MessageType::Result, 7));
    let code = ResultCode::from(u32::from_le_bytes(body[..4].try_into().expect("4 bytes")));
    if code == ResultCode::Ok {
        Ok(s)
    } else {
        Err(code)
    }
}

fn echo_roundtrip(s: &mut UnixStream, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let mut w = s.try_clone().expect("clone");
    let d = data.clone();
    let t = std::thread::spawn(move || w.write_all(&d).expect("write"));
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).expect("echo");
    t.join().expect("writer");
    assert!(back == data);
}

#[test]
fn binary_listen_connect_and_unplug_in_process() {
    let dir = Dir::new("inproc");
    let d = start(
        &dir.0,
        vec![PhoneConfig::simulated(1), PhoneConfig::simulated(2)],
        vec![],
    );
    let mut l = client(&dir.0);
    binary_listen(&mut l);
    let mut devs = devices_added(&mut l, 2);
    devs.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(devs[0].1, "00008030-0000000000000001");
    assert_eq!(devs[1].1, "00008030-0000000000000002");
    let mut c = binary_connect(&dir.0, devs[0].0, 7).expect("echo");
    echo_roundtrip(&mut c, 1 << 20);
    assert_eq!(
        binary_connect(&dir.0, devs[0].0, 4242).err(),
        Some(ResultCode::ConnectionRefused)
    );
    assert_eq!(
        binary_connect(&dir.0, 999, 7).err(),
        Some(ResultCode::BadDevice)
    );
    // Unplug: the listener hears DEVICE_REMOVE with the id, the open connection ends.
    d.detach("00008030-0000000000000001");
    let (h, body) = read_message(&mut l);
    assert_eq!(h.message, MessageType::DeviceRemove);
    assert_eq!(body, devs[0].0.to_le_bytes());
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    d.stop();
}

#[test]
fn phones_over_the_sim_socket_replug_with_new_ids() {
    let dir = Dir::new("socket");
    let p1 = dir.0.join("phone1");
    let server = Server::bind([(p1.clone(), PhoneConfig::simulated(5))])
        .expect("bind")
        .spawn()
        .expect("serve");
    let d = start(&dir.0, vec![], vec![p1.clone()]);
    let mut l = client(&dir.0);
    binary_listen(&mut l);
    let devs = devices_added(&mut l, 1);
    assert_eq!(devs[0].1, "00008030-0000000000000005");
    let mut c = binary_connect(&dir.0, devs[0].0, 7).expect("echo");
    echo_roundtrip(&mut c, 3 << 20);
    // The server goes away (unplug), comes back: Detached, then Attached with a new id.
    server.stop();
    let (h, _) = read_message(&mut l);
    assert_eq!(h.message, MessageType::DeviceRemove);
    let server = Server::bind([(p1, PhoneConfig::simulated(5))])
        .expect("bind")
        .spawn()
        .expect("serve");
    let again = devices_added(&mut l, 1);
    assert_eq!(again[0].1, devs[0].1);
    assert_ne!(
        again[0].0, devs[0].0,
        "a replugged phone gets a new DeviceID"
    );
    let mut c = binary_connect(&dir.0, again[0].0, 7).expect("echo again");
    echo_roundtrip(&mut c, 1000);
    d.stop();
    server.stop();
}

fn plist_message(tag: u32, xml: &str) -> Vec<u8> {
    let h =
        Header::new(ProtocolVersion::Plist, MessageType::Plist, tag, xml.len()).expect("header");
    let mut m = h.to_bytes().expect("bytes").to_vec();
    m.extend_from_slice(xml.as_bytes());
    m
}

fn plist_body(s: &mut UnixStream) -> plist::Dictionary {
    let (h, body) = read_message(s);
    assert_eq!(h.message, MessageType::Plist);
    plist::Value::from_reader_xml(&body[..])
        .expect("xml")
        .into_dictionary()
        .expect("dict")
}

#[test]
fn plist_requests_and_hostile_clients() {
    let dir = Dir::new("plist");
    let d = start(&dir.0, vec![PhoneConfig::simulated(1)], vec![]);
    // Give the phone a moment to finish its handshake.
    let mut list = Vec::new();
    for _ in 0..100 {
        let mut s = client(&dir.0);
        s.write_all(&plist_message(3, &request_xml("ListDevices")))
            .expect("send");
        let reply = plist_body(&mut s);
        list = reply
            .get("DeviceList")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        if !list.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(list.len(), 1);
    let props = list[0]
        .as_dictionary()
        .and_then(|d| d.get("Properties"))
        .and_then(|p| p.as_dictionary())
        .expect("props");
    assert_eq!(
        props.get("SerialNumber").and_then(|v| v.as_string()),
        Some("00008030-0000000000000001")
    );
    assert_eq!(
        props.get("ConnectionType").and_then(|v| v.as_string()),
        Some("USB")
    );

    // ReadBUID always answers a BUID; it is the one stored.
    let mut s = client(&dir.0);
    s.write_all(&plist_message(4, &request_xml("ReadBUID")))
        .expect("send");
    let buid = plist_body(&mut s)
        .get("BUID")
        .and_then(|v| v.as_string())
        .map(str::to_owned)
        .expect("BUID");
    let conf =
        plist::Value::from_file(dir.0.join("lockdown/SystemConfiguration.plist")).expect("stored");
    assert_eq!(
        conf.as_dictionary()
            .and_then(|d| d.get("SystemBUID"))
            .and_then(|v| v.as_string()),
        Some(buid.as_str())
    );

    // Traversal ids are refused with EINVAL.
    let mut s = client(&dir.0);
    let xml = request_xml_with(
        "ReadPairRecord",
        "<key>PairRecordID</key><string>../../etc/passwd</string>",
    );
    s.write_all(&plist_message(5, &xml)).expect("send");
    let r = plist_body(&mut s);
    assert_eq!(
        r.get("Number").and_then(|v| v.as_unsigned_integer()),
        Some(22)
    );

    // Hostile clients (bad headers, deep nesting, …) are the cases of
    // tests/tests/hostile_clients.rs, against the usbmuxd binary.

    // Connect through the plist protocol, port byte-swapped as libusbmuxd does.
    let id = list[0]
        .as_dictionary()
        .and_then(|d| d.get("DeviceID"))
        .and_then(|v| v.as_unsigned_integer())
        .expect("id");
    let mut s = client(&dir.0);
    let xml = request_xml_with(
        "Connect",
        &format!(
            "<key>DeviceID</key><integer>{id}</integer><key>PortNumber</key><integer>{}</integer>",
            7u16.swap_bytes()
        ),
    );
    s.write_all(&plist_message(8, &xml)).expect("send");
    assert_eq!(
        plist_body(&mut s)
            .get("Number")
            .and_then(|v| v.as_unsigned_integer()),
        Some(0)
    );
    echo_roundtrip(&mut s, 200_000);
    let parsed = PlistRequest::parse(xml.as_bytes()).expect("our request parses");
    assert_eq!(
        parsed.request,
        Request::Connect {
            device_id: id as u32,
            port: 7
        }
    );
    d.stop();
}

fn request_xml(message: &str) -> String {
    request_xml_with(message, "")
}

fn request_xml_with(message: &str, extra: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict><key>MessageType</key><string>{message}</string><key>ProgName</key><string>test</string><key>ClientVersionString</key><string>usbmux-rs test</string>{extra}</dict></plist>"
    )
}

fn plist_connect(dir: &Path, device_id: u64, port: u16) -> Option<UnixStream> {
    let mut s = client(dir);
    let xml = request_xml_with(
        "Connect",
        &format!("<key>DeviceID</key><integer>{device_id}</integer><key>PortNumber</key><integer>{}</integer>", port.swap_bytes()),
    );
    s.write_all(&plist_message(9, &xml)).expect("send");
    let n = plist_body(&mut s)
        .get("Number")
        .and_then(|v| v.as_unsigned_integer());
    (n == Some(0)).then_some(s)
}

/// Lists devices through a binary Listen and returns their ids in UDID order.
fn device_ids(dir: &Path, n: usize) -> Vec<u32> {
    let mut l = client(dir);
    binary_listen(&mut l);
    let mut devs = devices_added(&mut l, n);
    devs.sort_by(|a, b| a.1.cmp(&b.1));
    devs.into_iter().map(|d| d.0).collect()
}

#[test]
fn sixty_four_mib_each_way_with_sha256() {
    use sha2::{Digest, Sha256};
    let dir = Dir::new("bulk");
    let d = start(&dir.0, vec![PhoneConfig::simulated(1)], vec![]);
    let id = device_ids(&dir.0, 1)[0];
    // Host → phone: 64 MiB through digest, the phone's SHA-256 must match ours.
    let mut s = plist_connect(&dir.0, u64::from(id), 1999).expect("digest");
    let total: u64 = 64 << 20;
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    s.write_all(&total.to_be_bytes()).expect("len");
    let mut h = Sha256::new();
    for _ in 0..64 {
        s.write_all(&block).expect("data");
        h.update(&block);
    }
    let mut answer = [0u8; 32];
    s.read_exact(&mut answer).expect("digest answer");
    assert_eq!(answer[..], h.finalize()[..]);
    // Phone → host: 64 MiB from the source service, every byte checked against its pattern.
    let mut s = plist_connect(&dir.0, u64::from(id), 19).expect("source");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < total {
        let n = s.read(&mut buf).expect("source data");
        assert!(n > 0, "source ended early at {off}");
        for (i, &b) in buf[..n].iter().enumerate() {
            assert_eq!(
                b,
                usbmux_sim::service::source_byte(off + i as u64),
                "byte {}",
                off + i as u64
            );
        }
        off += n as u64;
    }
    d.stop();
}

#[test]
fn sixty_four_connections_over_four_phones() {
    let dir = Dir::new("many");
    let phones = (1..=4).map(PhoneConfig::simulated).collect();
    let d = start(&dir.0, phones, vec![]);
    let ids = device_ids(&dir.0, 4);
    let threads: Vec<_> = (0..64)
        .map(|k| {
            let dir = dir.0.clone();
            let id = ids[k % 4];
            std::thread::spawn(move || {
                let mut s = binary_connect(&dir, id, 7).expect("echo");
                echo_roundtrip(&mut s, 256 * 1024 + k * 1000);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("connection byte-exact");
    }
    d.stop();
}

#[test]
fn a_client_that_stops_reading_loses_nothing() {
    let dir = Dir::new("stall");
    let d = start(&dir.0, vec![PhoneConfig::simulated(1)], vec![]);
    let id = device_ids(&dir.0, 1)[0];
    let mut s = binary_connect(&dir.0, id, 7).expect("echo");
    // Write far more than every buffer on the way holds without reading: the writer blocks
    // (backpressure), then the reader drains and every byte comes back in order.
    let len = 24 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    let mut w = s.try_clone().expect("clone");
    let d2 = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&d2).expect("write"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !writer.is_finished(),
        "the phone's window must have stopped the writer"
    );
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).expect("everything comes back");
    writer.join().expect("writer");
    assert!(back == data);
    d.stop();
}

#[test]
fn resets_from_either_side() {
    let dir = Dir::new("resets");
    let d = start(&dir.0, vec![PhoneConfig::simulated(1)], vec![]);
    let id = device_ids(&dir.0, 1)[0];
    // The phone resets: lockdown refuses a message longer than 1 MiB and resets the connection;
    // the client sees the end of the stream.
    let mut s = binary_connect(&dir.0, id, 62078).expect("lockdown");
    s.write_all(&(2u32 << 20).to_be_bytes()).expect("send");
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "no reply, only the end of the connection");
    // The client goes away mid-stream: the daemon resets the phone side; the phone and the
    // daemon carry on.
    let mut s = binary_connect(&dir.0, id, 9).expect("discard");
    s.write_all(&vec![1u8; 1 << 20]).expect("send");
    drop(s);
    let mut s = binary_connect(&dir.0, id, 7).expect("echo after both resets");
    echo_roundtrip(&mut s, 100_000);
    d.stop();
}

#[test]
fn pair_records_listeners_and_socket_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new("pairs");
    let d = start(&dir.0, vec![PhoneConfig::simulated(1)], vec![]);
    let mode = std::fs::metadata(dir.0.join("usbmuxd"))
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A plist listener, for Paired and for ListListeners.
    let mut l = client(&dir.0);
    let listen = request_xml_with("Listen", "<key>kLibUSBMuxVersion</key><integer>3</integer>");
    l.write_all(&plist_message(1, &listen)).expect("listen");
    assert_eq!(
        plist_body(&mut l)
            .get("Number")
            .and_then(|v| v.as_unsigned_integer()),
        Some(0)
    );
    let attached = plist_body(&mut l);
    assert_eq!(
        attached.get("MessageType").and_then(|v| v.as_string()),
        Some("Attached")
    );
    let id = attached
        .get("DeviceID")
        .and_then(|v| v.as_unsigned_integer())
        .expect("id");

    let mut s = client(&dir.0);
    s.write_all(&plist_message(2, &request_xml("ListListeners")))
        .expect("send");
    let list = plist_body(&mut s);
    let listeners = list
        .get("ListenerList")
        .and_then(|v| v.as_array())
        .expect("list");
    assert_eq!(listeners.len(), 1);

    let udid = "00008030-0000000000000001";
    let record = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><plist version=\"1.0\"><dict><key>HostID</key><string>ABC</string><key>SystemBUID</key><string>DEF</string></dict></plist>";
    let save = request_xml_with(
        "SavePairRecord",
        &format!(
            "<key>PairRecordID</key><string>{udid}</string><key>PairRecordData</key><data>{}</data><key>DeviceID</key><integer>{id}</integer>",
            base64(record.as_bytes())
        ),
    );
    let mut s = client(&dir.0);
    s.write_all(&plist_message(3, &save)).expect("send");
    assert_eq!(
        plist_body(&mut s)
            .get("Number")
            .and_then(|v| v.as_unsigned_integer()),
        Some(0)
    );
    let paired = plist_body(&mut l);
    assert_eq!(
        paired.get("MessageType").and_then(|v| v.as_string()),
        Some("Paired")
    );
    let file = dir.0.join("lockdown").join(format!("{udid}.plist"));
    assert_eq!(
        std::fs::metadata(&file)
            .expect("record")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let read = request_xml_with(
        "ReadPairRecord",
        &format!("<key>PairRecordID</key><string>{udid}</string>"),
    );
    let mut s = client(&dir.0);
    s.write_all(&plist_message(4, &read)).expect("send");
    let data = plist_body(&mut s)
        .get("PairRecordData")
        .and_then(|v| v.as_data())
        .map(<[u8]>::to_vec)
        .expect("data");
    let v = plist::Value::from_reader_xml(&data[..]).expect("xml");
    assert_eq!(
        v.as_dictionary()
            .and_then(|d| d.get("HostID"))
            .and_then(|v| v.as_string()),
        Some("ABC")
    );

    let del = request_xml_with(
        "DeletePairRecord",
        &format!("<key>PairRecordID</key><string>{udid}</string>"),
    );
    let mut s = client(&dir.0);
    s.write_all(&plist_message(5, &del)).expect("send");
    assert_eq!(
        plist_body(&mut s)
            .get("Number")
            .and_then(|v| v.as_unsigned_integer()),
        Some(0)
    );
    assert!(!file.exists());
    let mut s = client(&dir.0);
    s.write_all(&plist_message(6, &read)).expect("send");
    assert_eq!(
        plist_body(&mut s)
            .get("Number")
            .and_then(|v| v.as_unsigned_integer()),
        Some(2),
        "ENOENT"
    );

    // A listener that sends another command gets BADCOMMAND and is closed.
    l.write_all(&plist_message(7, &request_xml("ListDevices")))
        .expect("send");
    assert_eq!(
        plist_body(&mut l)
            .get("Number")
            .and_then(|v| v.as_unsigned_integer()),
        Some(1)
    );
    let mut rest = Vec::new();
    assert_eq!(l.read_to_end(&mut rest).expect("closed"), 0);
    // An unknown request and an unknown header version.
    let mut s = client(&dir.0);
    s.write_all(&plist_message(8, &request_xml("Frobnicate")))
        .expect("send");
    assert_eq!(
        plist_body(&mut s)
            .get("Number")
            .and_then(|v| v.as_unsigned_integer()),
        Some(1)
    );
    let mut s = client(&dir.0);
    s.write_all(&[16, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 42, 0, 0, 0])
        .expect("send");
    let (h, body) = read_message(&mut s);
    assert_eq!((h.message, h.tag), (MessageType::Result, 42));
    assert_eq!(body, 6u32.to_le_bytes(), "BADVERSION");
    d.stop();
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_phone_reset_reaches_a_tcp_client_as_a_reset() {
    use std::net::TcpStream;
    let dir = Dir::new("tcp-rst");
    let d = daemon::start(DaemonConfig {
        activated: None,
        socket: SocketSpec::Tcp("127.0.0.1:0".parse().expect("addr")),
        config_dir: dir.0.join("lockdown"),
        simulate: vec![PhoneConfig::simulated(1)],
        sim_sockets: vec![],
        session: usbmux_core::SessionConfig::default(),
        trace: None,
        usb: false,
        usb_on_demand: false,
    })
    .expect("daemon");
    let SocketSpec::Tcp(addr) = d.socket().clone() else {
        panic!("tcp")
    };
    let read_msg = |s: &mut TcpStream| -> (Header, Vec<u8>) {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).expect("header");
        let header = Header::parse(&h).expect("header");
        let mut body = vec![0u8; header.length as usize - 16];
        s.read_exact(&mut body).expect("body");
        (header, body)
    };
    // The device id, from a binary Listen.
    let mut l = TcpStream::connect(addr).expect("connect");
    l.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    l.write_all(&BinaryMessage::Listen.to_vec(1).expect("listen"))
        .expect("send");
    assert_eq!(read_msg(&mut l).0.message, MessageType::Result);
    let (h, body) = read_msg(&mut l);
    assert_eq!(h.message, MessageType::DeviceAdd);
    let id = u32::from_le_bytes(body[..4].try_into().expect("id"));
    // Connect to lockdown and make the phone reset the connection (a 2 MiB message length).
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 8];
    ConnectRequest {
        device_id: id,
        port: 62078,
    }
    .emit(&mut b)
    .expect("emit");
    let mut msg = Header::new(ProtocolVersion::Binary, MessageType::Connect, 2, 8)
        .expect("h")
        .to_bytes()
        .expect("b")
        .to_vec();
    msg.extend_from_slice(&b);
    s.write_all(&msg).expect("connect");
    let (_, body) = read_msg(&mut s);
    assert_eq!(body, [0, 0, 0, 0]);
    s.write_all(&(2u32 << 20).to_be_bytes()).expect("send");
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "an RST, not an orderly close"
    );
    d.stop();
}
