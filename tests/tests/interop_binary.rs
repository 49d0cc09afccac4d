//! The binary client protocol (header version 0: LISTEN, CONNECT, RESULT, DEVICE_ADD,
//! DEVICE_REMOVE; `shared/PROTOCOL.md` §3.2) against our in-process daemon, spoken by a client
//! written here: the frames are built and checked byte by byte, with `usbmux_host::proto` only
//! as a cross-check. This is what libusbmuxd falls back to when a daemon answers BADVERSION, and
//! what old clients speak.

use std::io::{Read, Write};

use usbmux_host::proto::{
    BinaryMessage, ConnectRequest, DeviceRecord, Header, MessageType, ProtocolVersion, HEADER_LEN,
};
use usbmux_sim::PhoneConfig;
use usbmux_tests::client::ClientStream;
use usbmux_tests::daemon::{sim_udid, TestDaemon};
use usbmux_tests::net::{pattern, read_until_closed, round_trip};

/// Reads one binary message and checks its header: version 0, the expected type and tag, and a
/// length of exactly 16 + `body_len`. Returns the body.
fn expect_message(
    s: &mut ClientStream,
    message: MessageType,
    tag: u32,
    body_len: usize,
) -> Vec<u8> {
    let (header, body) = s.read_message().expect("read a message");
    assert_eq!(
        header,
        Header {
            length: (HEADER_LEN + body_len) as u32,
            version: ProtocolVersion::Binary,
            message,
            tag,
        }
    );
    assert_eq!(body.len(), body_len);
    body
}

/// A device record as the bytes must be: device id LE, product id LE, the serial NUL-padded to
/// 256 bytes, 2 bytes of padding, location LE (268 bytes).
fn record_bytes(device_id: u32, product_id: u16, serial: &str, location: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(268);
    b.extend_from_slice(&device_id.to_le_bytes());
    b.extend_from_slice(&product_id.to_le_bytes());
    let mut field = [0u8; 256];
    field[..serial.len()].copy_from_slice(serial.as_bytes());
    b.extend_from_slice(&field);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&location.to_le_bytes());
    assert_eq!(b.len(), DeviceRecord::LEN);
    b
}

/// Reads one DEVICE_ADD (tag 0, exactly 268 bytes of record) and returns its record.
fn expect_device_add(s: &mut ClientStream) -> DeviceRecord {
    let body = expect_message(s, MessageType::DeviceAdd, 0, DeviceRecord::LEN);
    let record = DeviceRecord::parse(&body).expect("a device record");
    assert_eq!(
        body,
        record_bytes(
            record.device_id,
            record.product_id,
            &record.serial,
            record.location
        ),
        "record bytes"
    );
    record
}

#[test]
fn binary_listen_reports_devices_and_plug_events() {
    let (u1, u2, u3) = (sim_udid(1), sim_udid(2), sim_udid(3));
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1), PhoneConfig::simulated(2)]);
    d.wait_for_devices(&[&u1, &u2]);

    let mut s = d.connect();
    let listen = [16, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 7, 0, 0, 0];
    assert_eq!(BinaryMessage::Listen.to_vec(7).expect("encode"), listen);
    s.write_all(&listen).expect("send LISTEN");
    // RESULT 0 with the request's tag, in the binary protocol.
    let mut result = [0u8; 20];
    s.read_exact(&mut result).expect("RESULT");
    assert_eq!(
        result,
        [20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]
    );

    // One DEVICE_ADD per phone: device ids in plug order, product id 0x12a8, serial = the
    // UDID as tools show it, location = the phone's location id.
    let mut adds = vec![expect_device_add(&mut s), expect_device_add(&mut s)];
    adds.sort_by_key(|r| r.device_id);
    assert_eq!(
        adds,
        [
            DeviceRecord {
                device_id: 1,
                product_id: 0x12a8,
                serial: u1.clone(),
                location: 1
            },
            DeviceRecord {
                device_id: 2,
                product_id: 0x12a8,
                serial: u2.clone(),
                location: 2
            },
        ]
    );

    // Unplug: DEVICE_REMOVE with the id.
    d.detach(&u2);
    let body = expect_message(&mut s, MessageType::DeviceRemove, 0, 4);
    assert_eq!(body, 2u32.to_le_bytes());
    // Plug: DEVICE_ADD with a new id (ids are not reused while the daemon runs).
    d.attach(PhoneConfig::simulated(3));
    assert_eq!(
        expect_device_add(&mut s),
        DeviceRecord {
            device_id: 3,
            product_id: 0x12a8,
            serial: u3,
            location: 3
        }
    );
}

/// Sends a binary CONNECT for `device_id`/`port` (checking the bytes: the port big-endian at
/// offset 20) on a fresh connection and returns the connection and the RESULT code.
fn binary_connect(d: &TestDaemon, device_id: u32, port: u16, tag: u32) -> (ClientStream, u32) {
    let mut request = Vec::new();
    request.extend_from_slice(&24u32.to_le_bytes());
    request.extend_from_slice(&0u32.to_le_bytes());
    request.extend_from_slice(&2u32.to_le_bytes());
    request.extend_from_slice(&tag.to_le_bytes());
    request.extend_from_slice(&device_id.to_le_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    request.extend_from_slice(&[0, 0]);
    let ours = BinaryMessage::Connect(ConnectRequest { device_id, port })
        .to_vec(tag)
        .expect("encode");
    assert_eq!(request, ours);
    let mut s = d.connect();
    s.write_all(&request).expect("send CONNECT");
    let body = expect_message(&mut s, MessageType::Result, tag, 4);
    let code = u32::from_le_bytes(body.try_into().expect("4 bytes"));
    (s, code)
}

#[test]
fn binary_connect_reaches_echo_and_reports_refusals() {
    let udid = sim_udid(1);
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    let id = d.wait_for_devices(&[&udid])[0].device_id as u32;

    // Port 7 (echo) in network order: RESULT 0, then the socket is a byte pipe to the phone.
    let (s, code) = binary_connect(&d, id, 7, 11);
    assert_eq!(code, 0, "RESULT of CONNECT to echo");
    let data = pattern(6, 256 * 1024);
    let back = round_trip(&s, &s, &data, data.len()).expect("echo round trip");
    assert!(back == data, "echo came back different");
    let mut w = &s;
    w.write_all(b"tail").expect("write");
    let mut tail = [0u8; 4];
    (&s).read_exact(&mut tail).expect("read");
    assert_eq!(&tail, b"tail");

    // A port nothing listens on: CONNREFUSED (3), then the daemon closes the socket.
    let (s, code) = binary_connect(&d, id, 4242, 12);
    assert_eq!(code, 3, "RESULT of CONNECT to a closed port");
    assert_eq!(read_until_closed(s).expect("closed"), b"");
    // The same port number read in the wrong byte order (7 as little-endian = port 1792) is a
    // different, closed port: the daemon must read the port big-endian.
    let mut request = BinaryMessage::Connect(ConnectRequest {
        device_id: id,
        port: 7,
    })
    .to_vec(13)
    .expect("encode");
    request[20..22].copy_from_slice(&7u16.to_le_bytes());
    let mut s = d.connect();
    s.write_all(&request).expect("send CONNECT");
    let body = expect_message(&mut s, MessageType::Result, 13, 4);
    assert_eq!(body, 3u32.to_le_bytes(), "port 1792 is not echo");
    // No such device: BADDEV (2).
    let (_s, code) = binary_connect(&d, id + 100, 7, 14);
    assert_eq!(code, 2, "RESULT of CONNECT to an unknown device");
}
