//! Hostile clients against the real `usbmuxd` binary: malformed headers and bodies, hostile
//! plists, wrong field types, impossible Connects, protocol misuse, resource exhaustion.
//!
//! Every case runs on a daemon of its own (two served phones, see `usbmux_tests::hostile`) and
//! checks two things: the outcome for the hostile client (an exact Result number, or the
//! daemon closing its socket, or — where the protocol says so — nothing at all), and that
//! nobody else noticed: a healthy echo connection opened *before* the attack still carries
//! fresh bytes exactly, a new ListDevices answers within 100 ms (best of five, see
//! `Rig::assert_responsive`), the daemon is still running, and its open file descriptors are
//! back to exactly what they were before the attack once the hostile client is gone.
//!
//! The test name is the case name; `cargo test -p usbmux-tests --test hostile_clients -- NAME`
//! runs one.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use usbmux_host::proto::{BinaryMessage, ConnectRequest, Header, MessageType, ResultCode};
use usbmux_tests::client::ClientStream;
use usbmux_tests::faulty::PhoneSpec;
use usbmux_tests::hostile::{self, read_until_closed_within, result_of, Healthy, Rig, ECHO};

/// How long a case waits for the daemon to close a hostile socket.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long "no reply" is watched for.
const QUIET: Duration = Duration::from_millis(300);

const BADCOMMAND: u32 = 1;
const BADDEV: u32 = 2;
const BADVERSION: u32 = 6;
const ENOENT: u32 = 2;
const EINVAL: u32 = 22;

/// The world of one case: the rig, its device ids, and the healthy connection.
struct Case {
    name: &'static str,
    rig: Rig,
    ids: Vec<u32>,
    healthy: Healthy,
    fds: usize,
}

impl Case {
    /// Starts a daemon with two phones (Unix socket, or TCP with `tcp`), opens the healthy
    /// echo connection to phone 1 and records the fd baseline. `None`: binary missing (skip).
    fn start(name: &'static str, tcp: bool) -> Option<Case> {
        eprintln!("case {name}");
        let rig = Rig::start_with(tcp, vec![PhoneSpec::healthy(1), PhoneSpec::healthy(2)])?;
        let ids = rig.wait_all_phones();
        let healthy = Healthy::open(&rig, ids[0], ECHO);
        // Every short-lived client of the set-up is closed; the daemon has let go of them once
        // the count is stable.
        let fds = rig.stable_fds();
        Some(Case {
            name,
            rig,
            ids,
            healthy,
            fds,
        })
    }

    fn client(&self) -> ClientStream {
        ClientStream::connect(self.rig.address()).expect("connect to the daemon")
    }

    /// Sends `bytes` on a fresh client and expects the daemon to close it after sending
    /// exactly `reply` (a Result number) or nothing (`None`).
    fn expect_closed(&self, bytes: &[u8], reply: Option<u32>) {
        let mut c = self.client();
        let _ = c.write_all(bytes);
        let got = read_until_closed_within(&mut c, CLOSE_WAIT).unwrap_or_else(|got| {
            panic!(
                "case {}: the daemon kept the hostile client open (got {} bytes)\n{}",
                self.name,
                got.len(),
                self.rig.log_tail()
            )
        });
        match reply {
            None => assert!(
                got.is_empty(),
                "case {}: expected no reply, got {got:02x?}",
                self.name
            ),
            Some(n) => assert_eq!(
                result_of(&got),
                Some(n),
                "case {}: expected Result {n} then close, got {got:02x?}",
                self.name
            ),
        }
    }

    /// Sends `bytes` on a fresh client, expects exactly one Result `n`, and that the
    /// connection stays usable (a ListDevices on it is answered). Returns the client.
    fn expect_result_and_open(&self, bytes: &[u8], n: u32) -> ClientStream {
        let mut c = self.client();
        c.write_all(bytes).expect("send");
        let (h, body) = c.read_message().unwrap_or_else(|e| {
            panic!(
                "case {}: no reply ({e})\n{}",
                self.name,
                self.rig.log_tail()
            )
        });
        let mut whole = h.to_bytes().expect("header").to_vec();
        whole.extend_from_slice(&body);
        assert_eq!(
            result_of(&whole),
            Some(n),
            "case {}: expected Result {n}, got {h:?} {body:02x?}",
            self.name
        );
        c.write_all(&plist_request(77, &request("ListDevices", &[])))
            .expect("send ListDevices after the error");
        let (h, body) = c.read_message().expect("ListDevices on the same socket");
        assert_eq!(h.tag, 77);
        assert!(
            String::from_utf8_lossy(&body).contains("DeviceList"),
            "case {}: the socket is not usable after the error",
            self.name
        );
        c
    }

    /// Sends a plist request on a fresh client and returns the reply's Result number (the
    /// daemon may close afterwards or not).
    fn plist_result(&self, dict: plist::Dictionary) -> Option<u32> {
        let mut c = self.client();
        c.write_all(&plist_request(5, &dict)).expect("send");
        let (h, body) = c.read_message().ok()?;
        let mut whole = h.to_bytes().ok()?.to_vec();
        whole.extend_from_slice(&body);
        result_of(&whole)
    }

    /// The checks every case ends with: the healthy connection, responsiveness, the daemon
    /// alive, fds back to the baseline.
    fn finish(mut self) {
        self.healthy
            .check(256 * 1024)
            .unwrap_or_else(|e| panic!("case {}: healthy connection broke: {e}", self.name));
        let latency = self.rig.assert_responsive();
        assert!(self.rig.alive(), "case {}: the daemon died", self.name);
        self.rig
            .assert_fds_return(self.fds, Duration::from_secs(10));
        eprintln!(
            "case {}: ok (ListDevices {latency:?}, fds {})",
            self.name, self.fds
        );
        self.rig.stop();
    }
}

/// A raw 16-byte header.
fn header(length: u32, version: u32, message: u32, tag: u32) -> Vec<u8> {
    [length, version, message, tag]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// A request dictionary with libusbmuxd's identification keys and `extra` entries.
fn request(message_type: &str, extra: &[(&str, plist::Value)]) -> plist::Dictionary {
    let mut d = plist::Dictionary::new();
    d.insert("ClientVersionString".into(), "usbmux-tests".into());
    d.insert("MessageType".into(), message_type.into());
    d.insert("ProgName".into(), "hostile".into());
    d.insert("kLibUSBMuxVersion".into(), 3.into());
    for (k, v) in extra {
        d.insert((*k).into(), v.clone());
    }
    d
}

fn xml(dict: &plist::Dictionary) -> Vec<u8> {
    let mut body = Vec::new();
    plist::Value::Dictionary(dict.clone())
        .to_writer_xml(&mut body)
        .expect("xml");
    body
}

fn plist_request(tag: u32, dict: &plist::Dictionary) -> Vec<u8> {
    plist_body(tag, &xml(dict))
}

fn plist_body(tag: u32, body: &[u8]) -> Vec<u8> {
    usbmux_host::plist_msg::encode_message(tag, body).expect("fits")
}

fn binary(msg: BinaryMessage, tag: u32) -> Vec<u8> {
    msg.to_vec(tag).expect("binary message")
}

fn int(v: u64) -> plist::Value {
    plist::Value::Integer(v.into())
}

fn string(s: &str) -> plist::Value {
    plist::Value::String(s.into())
}

/// A binary plist `{MessageType: "ListDevices", X: [[[…]]]}` with `depth` nested arrays: a
/// daemon that parsed it recursively would overflow its stack; one that accepted it would
/// answer with a DeviceList.
fn deep_binary_plist(depth: usize) -> Vec<u8> {
    // Objects: 0 the dict, 1 "MessageType", 2 "X", 3 "ListDevices", 4.. the arrays.
    let n = 4 + depth;
    assert!(n < 65_536);
    let mut out = b"bplist00".to_vec();
    let mut offsets = Vec::with_capacity(n);
    let r = |i: usize| (i as u16).to_be_bytes();
    offsets.push(out.len());
    out.push(0xD2);
    out.extend_from_slice(&r(1));
    out.extend_from_slice(&r(2));
    out.extend_from_slice(&r(3));
    out.extend_from_slice(&r(4));
    for s in ["MessageType", "X", "ListDevices"] {
        offsets.push(out.len());
        out.push(0x50 | s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    for i in 0..depth {
        offsets.push(out.len());
        if i + 1 < depth {
            out.push(0xA1);
            out.extend_from_slice(&r(5 + i));
        } else {
            out.push(0xA0);
        }
    }
    let table = out.len();
    assert!(table < 65_536);
    for o in &offsets {
        out.extend_from_slice(&(*o as u16).to_be_bytes());
    }
    out.extend_from_slice(&[0; 6]);
    out.push(2); // offset int size
    out.push(2); // object ref size
    out.extend_from_slice(&(n as u64).to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&(table as u64).to_be_bytes());
    out
}

macro_rules! case {
    ($name:ident, $tcp:expr, |$c:ident| $body:block) => {
        #[test]
        #[allow(unused_mut)]
        fn $name() {
            let Some(mut $c) = Case::start(stringify!($name), $tcp) else {
                return;
            };
            $body
            $c.finish();
        }
    };
    ($name:ident, |$c:ident| $body:block) => {
        case!($name, false, |$c| $body);
    };
}

// ---- headers ----

case!(header_length_0_is_closed, |c| {
    c.expect_closed(&header(0, 1, 8, 1), None);
});

case!(header_length_15_is_closed, |c| {
    c.expect_closed(&header(15, 0, 3, 1), None);
});

case!(header_length_u32_max_is_closed, |c| {
    c.expect_closed(&header(u32::MAX, 1, 8, 1), None);
});

case!(header_length_65537_is_closed, |c| {
    c.expect_closed(&header(65_537, 1, 8, 1), None);
});

case!(header_length_u32_max_on_tcp_is_closed, true, |c| {
    c.expect_closed(&header(u32::MAX, 1, 8, 1), None);
});

case!(header_length_17_without_body_waits_quietly, |c| {
    // A header announcing one body byte that never comes: the daemon waits for it (as
    // usbmuxd does), answers nothing, and lets go when the client leaves.
    let mut h = c.client();
    h.write_all(&header(17, 1, 8, 1)).expect("send");
    assert!(
        read_until_closed_within(&mut h, QUIET).is_err_and(|got| got.is_empty()),
        "expected silence on an incomplete message"
    );
    drop(h);
});

case!(header_split_into_single_bytes_is_assembled, |c| {
    // Not hostile in itself, but a client trickling a request byte by byte must get its
    // answer, with its tag.
    let mut s = c.client();
    let msg = plist_request(0xdead_beef, &request("ListDevices", &[]));
    for b in &msg {
        s.write_all(&[*b]).expect("byte");
        s.flush().expect("flush");
    }
    let (h, body) = s.read_message().expect("reply");
    assert_eq!(h.tag, 0xdead_beef);
    assert!(String::from_utf8_lossy(&body).contains("DeviceList"));
});

case!(partial_header_then_close_is_forgotten, |c| {
    let mut s = c.client();
    s.write_all(&header(16, 0, 3, 1)[..5]).expect("send");
    drop(s);
});

case!(body_shorter_than_declared_then_close, |c| {
    let body = xml(&request("ListDevices", &[]));
    let mut msg = header(16 + body.len() as u32 + 100, 1, 8, 1);
    msg.extend_from_slice(&body);
    let mut s = c.client();
    s.write_all(&msg).expect("send");
    drop(s);
});

case!(
    body_shorter_than_declared_then_half_close_gets_no_reply,
    |c| {
        let body = xml(&request("ListDevices", &[]));
        let mut msg = header(16 + body.len() as u32 + 100, 1, 8, 1);
        msg.extend_from_slice(&body);
        let mut s = c.client();
        s.write_all(&msg).expect("send");
        if let ClientStream::Unix(u) = &s {
            u.shutdown(std::net::Shutdown::Write).expect("shutdown");
        }
        let got = read_until_closed_within(&mut s, CLOSE_WAIT).expect("closed at EOF");
        assert!(got.is_empty(), "no reply to an incomplete message");
    }
);

// ---- message types and versions ----

case!(
    unknown_message_type_is_badcommand_and_keeps_the_socket,
    |c| {
        c.expect_result_and_open(&header(16, 0, 99, 3), BADCOMMAND);
    }
);

case!(client_sent_result_message_is_badcommand, |c| {
    let mut m = header(20, 0, 1, 3);
    m.extend_from_slice(&0u32.to_le_bytes());
    c.expect_result_and_open(&m, BADCOMMAND);
});

case!(client_sent_device_add_is_badcommand, |c| {
    let m = binary(
        BinaryMessage::DeviceAdd(usbmux_host::proto::DeviceRecord {
            device_id: 1,
            product_id: 0x12a8,
            serial: "00008030-0000000000000001".into(),
            location: 1,
        }),
        3,
    );
    c.expect_result_and_open(&m, BADCOMMAND);
});

case!(unknown_version_is_badversion, |c| {
    c.expect_result_and_open(&header(16, 7, 3, 3), BADVERSION);
});

case!(version_u32_max_is_badversion, |c| {
    let mut m = header(16 + 8, u32::MAX, 2, 3);
    m.extend_from_slice(&[0; 8]);
    c.expect_result_and_open(&m, BADVERSION);
});

case!(binary_connect_with_short_body_is_badcommand, |c| {
    let mut m = header(20, 0, 2, 3);
    m.extend_from_slice(&c.ids[0].to_le_bytes());
    c.expect_result_and_open(&m, BADCOMMAND);
});

case!(binary_connect_with_long_body_is_badcommand, |c| {
    let mut m = header(16 + 64, 0, 2, 3);
    m.extend_from_slice(&[0x41; 64]);
    c.expect_result_and_open(&m, BADCOMMAND);
});

// ---- hostile plists ----

case!(xml_that_is_not_a_plist_is_refused_and_closed, |c| {
    let body = b"<?xml version=\"1.0\"?><html><body>not a plist</body></html>";
    c.expect_closed(&plist_body(3, body), Some(BADCOMMAND));
});

case!(random_bytes_as_plist_are_refused_and_closed, |c| {
    let body = usbmux_tests::net::pattern(42, 4000);
    c.expect_closed(&plist_body(3, &body), Some(BADCOMMAND));
});

case!(truncated_binary_plist_is_refused_and_closed, |c| {
    let mut body = Vec::new();
    plist::Value::Dictionary(request("ListDevices", &[]))
        .to_writer_binary(&mut body)
        .expect("binary");
    body.truncate(body.len() - 20);
    c.expect_closed(&plist_body(3, &body), Some(BADCOMMAND));
});

case!(plist_root_array_is_refused_and_closed, |c| {
    let mut body = Vec::new();
    plist::Value::Array(vec![string("ListDevices")])
        .to_writer_xml(&mut body)
        .expect("xml");
    c.expect_closed(&plist_body(3, &body), Some(BADCOMMAND));
});

case!(plist_without_message_type_is_refused_and_closed, |c| {
    let mut d = request("ListDevices", &[]);
    d.remove("MessageType");
    c.expect_closed(&plist_request(3, &d), Some(BADCOMMAND));
});

case!(plist_message_type_integer_is_refused_and_closed, |c| {
    let d = request("x", &[("MessageType", int(3))]);
    c.expect_closed(&plist_request(3, &d), Some(BADCOMMAND));
});

case!(unknown_plist_message_type_is_badcommand, |c| {
    c.expect_result_and_open(&plist_request(3, &request("FormatDisk", &[])), BADCOMMAND);
});

/// `{MessageType: ListDevices, X: <array>×depth}` as XML, the arrays closed or not.
fn deep_xml(depth: usize, closed: bool) -> Vec<u8> {
    let close = if closed {
        "</array>".repeat(depth) + "</dict></plist>"
    } else {
        String::new()
    };
    format!(
        "<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>MessageType</key>\
         <string>ListDevices</string><key>X</key>{}{close}",
        "<array>".repeat(depth)
    )
    .into_bytes()
}

case!(xml_nested_10000_deep_is_refused_at_the_header, |c| {
    // 10 000 nested arrays take 150 KB of XML, more than a message may hold: the length in the
    // header alone closes the client, before a byte of the body is read.
    let body = deep_xml(10_000, true);
    let mut msg = header(16 + body.len() as u32, 1, 8, 3);
    msg.extend_from_slice(&body);
    c.expect_closed(&msg, None);
});

case!(xml_nested_as_deep_as_fits_is_refused_before_parsing, |c| {
    // The deepest nesting one message holds (9 300 arrays, left open): refused by the guard
    // (depth limit 32) before the XML parser sees it. A DeviceList answer would mean it was
    // parsed; a stack overflow would fail `finish`.
    let body = deep_xml(9_300, false);
    assert!(body.len() <= 65_520, "{}", body.len());
    c.expect_closed(&plist_body(3, &body), Some(BADCOMMAND));
});

case!(
    binary_plist_nested_10000_deep_is_refused_before_parsing,
    |c| {
        c.expect_closed(&plist_body(3, &deep_binary_plist(10_000)), Some(BADCOMMAND));
    }
);

case!(plist_with_300_collections_is_refused, |c| {
    let items: Vec<plist::Value> = (0..300).map(|_| plist::Value::Array(vec![])).collect();
    let d = request("ListDevices", &[("X", plist::Value::Array(items))]);
    c.expect_closed(&plist_request(3, &d), Some(BADCOMMAND));
});

case!(plist_of_60_kib_is_accepted, |c| {
    let pad = "p".repeat(60 * 1024);
    let d = request("ListDevices", &[("Padding", string(&pad))]);
    let msg = plist_request(9, &d);
    assert!(msg.len() > 60 * 1024 && msg.len() <= 65_536);
    let mut s = c.client();
    s.write_all(&msg).expect("send");
    let (h, body) = s.read_message().expect("reply");
    assert_eq!(h.tag, 9);
    assert!(String::from_utf8_lossy(&body).contains("DeviceList"));
});

case!(binary_plist_request_is_accepted, |c| {
    let mut body = Vec::new();
    plist::Value::Dictionary(request("ListDevices", &[]))
        .to_writer_binary(&mut body)
        .expect("binary");
    let mut s = c.client();
    s.write_all(&plist_body(4, &body)).expect("send");
    let (h, body) = s.read_message().expect("reply");
    assert_eq!((h.message, h.tag), (MessageType::Plist, 4));
    let reply = plist::Value::from_reader(std::io::Cursor::new(body)).expect("plist reply");
    let n = reply
        .as_dictionary()
        .and_then(|d| d.get("DeviceList"))
        .and_then(plist::Value::as_array)
        .map(Vec::len);
    assert_eq!(n, Some(2));
});

case!(binary_plist_connect_is_accepted_and_echoes, |c| {
    let d = request(
        "Connect",
        &[
            ("DeviceID", int(u64::from(c.ids[1]))),
            ("PortNumber", int(u64::from(ECHO.swap_bytes()))),
        ],
    );
    let mut body = Vec::new();
    plist::Value::Dictionary(d)
        .to_writer_binary(&mut body)
        .expect("binary");
    let mut s = c.client();
    s.write_all(&plist_body(4, &body)).expect("send");
    let (h, body) = s.read_message().expect("reply");
    let mut whole = h.to_bytes().expect("h").to_vec();
    whole.extend_from_slice(&body);
    assert_eq!(result_of(&whole), Some(0));
    hostile::verify(&s, ECHO, &usbmux_tests::net::pattern(5, 100_000)).expect("echo");
});

// ---- wrong field types ----

case!(connect_with_string_device_id_is_baddev, |c| {
    let d = request(
        "Connect",
        &[
            ("DeviceID", string("1")),
            ("PortNumber", int(u64::from(ECHO.swap_bytes()))),
        ],
    );
    assert_eq!(c.plist_result(d), Some(BADDEV));
});

case!(connect_with_huge_device_id_is_baddev, |c| {
    let d = request(
        "Connect",
        &[
            ("DeviceID", int(1 << 40)),
            ("PortNumber", int(u64::from(ECHO.swap_bytes()))),
        ],
    );
    assert_eq!(c.plist_result(d), Some(BADDEV));
});

case!(connect_with_data_port_number_is_badcommand, |c| {
    let d = request(
        "Connect",
        &[
            ("DeviceID", int(u64::from(c.ids[0]))),
            ("PortNumber", plist::Value::Data(vec![0, 7])),
        ],
    );
    assert_eq!(c.plist_result(d), Some(BADCOMMAND));
});

case!(connect_with_port_number_70000_is_badcommand, |c| {
    let d = request(
        "Connect",
        &[
            ("DeviceID", int(u64::from(c.ids[0]))),
            ("PortNumber", int(70_000)),
        ],
    );
    assert_eq!(c.plist_result(d), Some(BADCOMMAND));
});

case!(connect_without_port_number_is_badcommand, |c| {
    let d = request("Connect", &[("DeviceID", int(u64::from(c.ids[0])))]);
    assert_eq!(c.plist_result(d), Some(BADCOMMAND));
});

// ---- impossible connects ----

case!(connect_to_absent_device_is_baddev, |c| {
    let err = c.rig.connect(9999, ECHO).err();
    assert_eq!(err, Some(ResultCode::BadDevice));
});

case!(connect_to_device_id_0_is_baddev, |c| {
    assert_eq!(c.rig.connect(0, ECHO).err(), Some(ResultCode::BadDevice));
});

case!(plist_connect_to_absent_device_is_baddev, |c| {
    let d = request(
        "Connect",
        &[
            ("DeviceID", int(4242)),
            ("PortNumber", int(u64::from(ECHO.swap_bytes()))),
        ],
    );
    assert_eq!(c.plist_result(d), Some(BADDEV));
});

case!(connect_to_port_0_is_refused, |c| {
    assert_eq!(
        c.rig.connect(c.ids[1], 0).err(),
        Some(ResultCode::ConnectionRefused)
    );
});

case!(connect_to_closed_port_is_refused, |c| {
    assert_eq!(
        c.rig.connect(c.ids[1], 4321).err(),
        Some(ResultCode::ConnectionRefused)
    );
});

case!(hundred_refused_connects_leak_nothing, |c| {
    for i in 0..100u16 {
        assert_eq!(
            c.rig.connect(c.ids[i as usize % 2], 1000 + i).err(),
            Some(ResultCode::ConnectionRefused)
        );
    }
});

// ---- protocol misuse ----

case!(listen_twice_on_one_socket_is_badcommand_and_closed, |c| {
    let mut s = c.client();
    s.write_all(&binary(BinaryMessage::Listen, 1))
        .expect("listen");
    let (h, _) = s.read_message().expect("result");
    assert_eq!(h.message, MessageType::Result);
    s.write_all(&binary(BinaryMessage::Listen, 2))
        .expect("listen again");
    // The two DeviceAdds of the first Listen, then Result BADCOMMAND for tag 2, then close.
    let got = read_until_closed_within(&mut s, CLOSE_WAIT).expect("closed");
    let mut rest = &got[..];
    let mut last = None;
    while let Ok((h, body)) = Header::split(rest) {
        last = Some((h, body.to_vec()));
        rest = &rest[h.total_len()..];
    }
    let (h, body) = last.expect("a reply");
    assert_eq!((h.message, h.tag), (MessageType::Result, 2));
    assert_eq!(body, BADCOMMAND.to_le_bytes());
});

case!(connect_after_listen_is_badcommand_and_closed, |c| {
    let mut s = c.client();
    s.write_all(&plist_request(1, &request("Listen", &[])))
        .expect("listen");
    let (h, _) = s.read_message().expect("result");
    assert_eq!(h.tag, 1);
    let d = request(
        "Connect",
        &[
            ("DeviceID", int(u64::from(c.ids[0]))),
            ("PortNumber", int(u64::from(ECHO.swap_bytes()))),
        ],
    );
    s.write_all(&plist_request(2, &d)).expect("connect");
    let got = read_until_closed_within(&mut s, CLOSE_WAIT).expect("closed");
    assert!(
        String::from_utf8_lossy(&got).contains("<integer>1</integer>"),
        "BADCOMMAND expected after the notifications"
    );
});

case!(commands_after_connect_reach_the_phone_as_data, |c| {
    // Bytes that look exactly like requests, sent after a successful Connect, are data: the
    // echo service sends them back byte for byte, and the daemon does not act on them.
    let s = c.rig.connect(c.ids[1], ECHO).expect("connect");
    let mut data = plist_request(7, &request("ListDevices", &[]));
    data.extend(binary(BinaryMessage::Listen, 8));
    data.extend(header(u32::MAX, 1, 8, 9));
    data.extend(binary(
        BinaryMessage::Connect(ConnectRequest {
            device_id: c.ids[0],
            port: ECHO,
        }),
        10,
    ));
    hostile::verify(&s, ECHO, &data).expect("echoed as data");
    // And no listener appeared from the Listen inside.
    assert!(usbmux_tests::client::listener_names(c.rig.address())
        .expect("ListListeners")
        .is_empty());
});

case!(pipelined_requests_are_answered_in_order, |c| {
    let mut s = c.client();
    let mut burst = Vec::new();
    for tag in 1..=100u32 {
        burst.extend(plist_request(tag, &request("ListDevices", &[])));
    }
    s.write_all(&burst).expect("send");
    for tag in 1..=100u32 {
        let (h, _) = s.read_message().expect("reply");
        assert_eq!(h.tag, tag);
    }
});

case!(client_gone_before_connect_reply_leaks_nothing, |c| {
    for _ in 0..20 {
        let mut s = c.client();
        s.write_all(&binary(
            BinaryMessage::Connect(ConnectRequest {
                device_id: c.ids[1],
                port: ECHO,
            }),
            1,
        ))
        .expect("send");
        drop(s);
    }
});

case!(client_gone_with_data_in_flight_leaks_nothing, |c| {
    for i in 0..10 {
        let mut s = c.rig.connect(c.ids[1], ECHO).expect("connect");
        s.write_all(&usbmux_tests::net::pattern(i, 300_000))
            .expect("send");
        drop(s);
    }
});

// ---- pair records ----

fn pair_id_case(c: &Case, id: &str) {
    for m in ["ReadPairRecord", "DeletePairRecord"] {
        let d = request(m, &[("PairRecordID", string(id))]);
        assert_eq!(c.plist_result(d), Some(EINVAL), "{m} {id:?}");
    }
    let d = request(
        "SavePairRecord",
        &[
            ("PairRecordID", string(id)),
            (
                "PairRecordData",
                plist::Value::Data(xml(&plist::Dictionary::new())),
            ),
        ],
    );
    assert_eq!(c.plist_result(d), Some(EINVAL), "SavePairRecord {id:?}");
    let names: Vec<_> = std::fs::read_dir(c.rig.dir().join("lockdown"))
        .expect("config dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        names.iter().all(|n| n == "SystemConfiguration.plist"),
        "nothing but the BUID file may exist: {names:?}"
    );
}

case!(pair_record_id_with_slash_is_einval, |c| {
    pair_id_case(&c, "00008030/0000000000000001");
});

case!(pair_record_id_dotdot_is_einval, |c| {
    pair_id_case(&c, "../../../../tmp/x");
});

case!(pair_record_id_with_nul_is_einval, |c| {
    pair_id_case(&c, "00008030-00000000\u{0}00000001");
});

case!(pair_record_id_of_10_kib_is_einval, |c| {
    pair_id_case(&c, &"A".repeat(10 * 1024));
});

case!(pair_record_of_absent_device_is_enoent, |c| {
    let d = request(
        "ReadPairRecord",
        &[("PairRecordID", string("00008030-00000000000000FF"))],
    );
    assert_eq!(c.plist_result(d), Some(ENOENT));
});

case!(save_pair_record_with_array_data_is_einval, |c| {
    let mut arr = Vec::new();
    plist::Value::Array(vec![int(1)])
        .to_writer_xml(&mut arr)
        .expect("xml");
    let d = request(
        "SavePairRecord",
        &[
            ("PairRecordID", string("00008030-0000000000000001")),
            ("PairRecordData", plist::Value::Data(arr)),
        ],
    );
    assert_eq!(c.plist_result(d), Some(EINVAL));
});

case!(save_pair_record_with_garbage_data_is_einval, |c| {
    let d = request(
        "SavePairRecord",
        &[
            ("PairRecordID", string("00008030-0000000000000001")),
            (
                "PairRecordData",
                plist::Value::Data(usbmux_tests::net::pattern(3, 2000)),
            ),
        ],
    );
    assert_eq!(c.plist_result(d), Some(EINVAL));
});

case!(save_pair_record_with_string_data_is_einval, |c| {
    let d = request(
        "SavePairRecord",
        &[
            ("PairRecordID", string("00008030-0000000000000001")),
            ("PairRecordData", string("<dict/>")),
        ],
    );
    assert_eq!(c.plist_result(d), Some(EINVAL));
});

// ---- resource exhaustion ----

case!(thousand_idle_clients, |c| {
    assert!(
        hostile::raise_fd_limit() >= 1100,
        "this test needs 1100 open files"
    );
    let mut idle = Vec::new();
    for i in 0..1000 {
        match ClientStream::connect(c.rig.address()) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("client {i} could not connect: {e}"),
        }
    }
    // The daemon holds all of them (each one fd) and still serves others at once.
    let held = usbmux_tests::net::poll_until(Duration::from_secs(10), || {
        (c.rig.fds() >= c.fds + 1000).then_some(())
    });
    assert!(
        held.is_some(),
        "daemon fds {} with 1000 idle clients",
        c.rig.fds()
    );
    c.healthy
        .check(64 * 1024)
        .expect("healthy with 1000 idle clients");
    c.rig.assert_responsive();
    drop(idle);
});

case!(thousand_idle_clients_on_tcp, true, |c| {
    assert!(
        hostile::raise_fd_limit() >= 1100,
        "this test needs 1100 open files"
    );
    let idle: Vec<ClientStream> = (0..1000)
        .map(|_| ClientStream::connect(c.rig.address()).expect("connect"))
        .collect();
    c.rig.assert_responsive();
    drop(idle);
});

case!(slow_loris_does_not_block_others, |c| {
    // One byte per second of a valid request, for 4 s; meanwhile others are served at once.
    let msg = plist_request(1, &request("ListDevices", &[]));
    let mut loris = c.client();
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(4) {
        loris.write_all(&msg[sent..=sent]).expect("a byte");
        sent += 1;
        let t = Instant::now();
        c.rig.assert_responsive();
        let mut probe = c.rig.connect(c.ids[1], ECHO).expect("connect meanwhile");
        probe.write_all(b"ping").expect("ping");
        let mut back = [0u8; 4];
        probe.read_exact(&mut back).expect("pong");
        assert_eq!(&back, b"ping");
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    drop(loris);
});

#[test]
fn deep_plists_of_the_hostile_cases_are_well_formed() {
    // The nesting cases only prove something if their bodies are real plists whose only fault
    // is depth: at depth 20 they parse, and say ListDevices.
    for body in [deep_binary_plist(20), deep_xml(20, true)] {
        let v = plist::Value::from_reader(std::io::Cursor::new(body)).expect("parses");
        let d = v.as_dictionary().expect("dict");
        assert_eq!(
            d.get("MessageType").and_then(plist::Value::as_string),
            Some("ListDevices")
        );
        assert!(d.get("X").and_then(plist::Value::as_array).is_some());
    }
}

#[test]
fn listen_client_that_never_reads_is_dropped_with_bounded_memory() {
    // A plist Listen client that never reads while phones come and go: the daemon queues its
    // notifications up to its bound (256 KiB past what the kernel buffers), then drops it with a
    // log line; its memory stays bounded meanwhile, and everyone else is served throughout.
    const CHURN: u32 = 8;
    let name = "listen_client_that_never_reads_is_dropped_with_bounded_memory";
    eprintln!("case {name}");
    let phones = (1..=CHURN + 1).map(PhoneSpec::healthy).collect();
    let Some(mut rig) = Rig::start(phones) else {
        return;
    };
    let ids = rig.wait_all_phones();
    let mut healthy = Healthy::open(&rig, ids[0], ECHO);
    let fds = rig.stable_fds();
    let (rss0, _) = rig.rss_kib();
    let mut stuck = ClientStream::connect(rig.address()).expect("connect");
    stuck
        .write_all(&plist_request(1, &request("Listen", &[])))
        .expect("listen");
    let start = Instant::now();
    let mut peak = rss0;
    let mut cycles = 0u64;
    let dropped = loop {
        if rig.log().contains("does not read its notifications") {
            break true;
        }
        if start.elapsed() > Duration::from_secs(90) {
            break false;
        }
        for p in &rig.phones.phones()[1..] {
            p.unplug_for(Duration::ZERO);
        }
        cycles += 1;
        std::thread::sleep(Duration::from_millis(15));
        peak = peak.max(rig.rss_kib().0);
        if cycles.is_multiple_of(40) {
            healthy.check(4096).expect("healthy during the churn");
        }
    };
    let took = start.elapsed();
    assert!(
        dropped,
        "the stuck listener was never dropped\n{}",
        rig.log_tail()
    );
    eprintln!(
        "dropped after {took:?}, {cycles} churn rounds; RSS {rss0} KiB before, peak {peak} KiB"
    );
    assert!(
        peak < rss0 + 24 * 1024,
        "daemon RSS grew from {rss0} KiB to {peak} KiB for one stuck listener"
    );
    // The stuck client gets what was queued before the drop, then the end.
    let got = read_until_closed_within(&mut stuck, Duration::from_secs(20))
        .expect("the stuck listener is closed");
    assert!(!got.is_empty(), "nothing reached the stuck listener");
    drop(stuck);
    // Every phone back, then the usual checks.
    rig.wait_all_phones();
    healthy.check(256 * 1024).expect("healthy after the churn");
    rig.assert_responsive();
    assert!(rig.alive());
    rig.assert_fds_return(fds, Duration::from_secs(10));
    rig.stop();
}
