//! Writes the checked-in seed corpora, `seeds/<target>/<name>.bin`, from the protocol's byte
//! vectors (shared/PROTOCOL.md §6) and from a recorded exchange between a host `Session` and a
//! simulated phone (`usbmux_sim::Phone`: echo, lockdown, digest, a refused port, a reset).
//!
//! Run from `fuzz/`: `cargo run --example gen_seeds`. It rewrites the files it names and
//! leaves every other file alone, so hand-added regression seeds (`regression-*.bin`) stay.
//! The output is deterministic: running it twice changes nothing.

use std::fs;
use std::path::Path;

use plist::{Dictionary, Value};
use usbmux_core::wire::{mux, HeaderKind, Summary};
use usbmux_core::{Buffers, Duration, Host, Instant, Session, SessionConfig};
use usbmux_fuzz::pair_ops::{Fault, Op as PairOp};
use usbmux_fuzz::{device_ops, host_ops, pair_ops, Writer};
use usbmux_host::plist_msg::{ClientInfo, DeviceInfo, PlistRequest, Reply, Request};
use usbmux_host::proto::{BinaryMessage, ConnectRequest, DeviceRecord, ResultCode};
use usbmux_sim::lockdown::frame_xml;
use usbmux_sim::{Phone, PhoneConfig};

/// PROTOCOL.md §6.1: binary CONNECT, device 1, port 22, tag 1.
const CONNECT_22: [u8; 24] = [
    0x18, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x00, 0x16, 0, 0,
];
/// §6.2: binary RESULT OK to tag 1.
const RESULT_OK: [u8; 20] = [
    0x14, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
];
/// §6.3: the host's VERSION (v1 header, major 2).
const VERSION_REQUEST: [u8; 20] = [
    0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
];
/// The device's VERSION reply as Debian's usbmuxd accepted it (USB-VM.md): the same bytes.
const VERSION_REPLY: [u8; 20] = VERSION_REQUEST;
/// A device answering major 1.
const VERSION_REPLY_V1: [u8; 20] = [
    0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0,
];
/// §6.4: SETUP (v2 header, tx 0, rx 0xFFFF, payload 0x07).
const SETUP: [u8; 17] = [
    0, 0, 0, 2, 0, 0, 0, 0x11, 0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0xFF, 0xFF, 0x07,
];
/// §6.5: the first SYN, sport 1, dport 62078.
const SYN_LOCKDOWN: [u8; 36] = [
    0, 0, 0, 6, 0, 0, 0, 0x24, 0xFE, 0xED, 0xFA, 0xCE, 0, 1, 0xFF, 0xFF, 0, 1, 0xF2, 0x7E, 0, 0, 0,
    0, 0, 0, 0, 0, 0x50, 0x02, 0x02, 0x00, 0, 0, 0, 0,
];
/// §6.6: the plist Connect body (device 1, port 62078 sent as 32498).
const PLIST_CONNECT: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n<plist version=\"1.0\"><dict>\n<key>ClientVersionString</key><string>my-rust-usbmux 0.1</string>\n<key>DeviceID</key><integer>1</integer>\n<key>MessageType</key><string>Connect</string>\n<key>PortNumber</key><integer>32498</integer>\n<key>ProgName</key><string>myprog</string>\n<key>kLibUSBMuxVersion</key><integer>3</integer>\n</dict></plist>\n";

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).expect("create the seed directory");
    fs::write(dir.join(format!("{name}.bin")), bytes).expect("write a seed");
}

/// One step of the recorded exchange, in the order the host saw it.
enum Step {
    Host(host_ops::Op<'static>),
    /// What the device sent (one transfer; empty = ZLP).
    FromDevice(Vec<u8>),
}

/// A host Session (exactly as `session_host` builds it) talking to a simulated phone, every
/// transfer recorded. The host side replays identically in the target, because it is
/// deterministic and sees the same operations in the same order.
struct Exchange {
    host: Session<Host, Vec<u8>, 4>,
    phone: Phone,
    now: Instant,
    ids: Vec<usbmux_core::ConnId>,
    steps: Vec<Step>,
    /// Every host → device transfer.
    out: Vec<Vec<u8>>,
    /// Every device → host transfer.
    inn: Vec<Vec<u8>>,
}

impl Exchange {
    fn new() -> Self {
        Exchange {
            host: Session::<Host, Vec<u8>, 4>::new(SessionConfig::default(), 1),
            phone: Phone::new(PhoneConfig::simulated(1)),
            now: Instant::ZERO,
            ids: Vec::new(),
            steps: Vec::new(),
            out: Vec::new(),
            inn: Vec::new(),
        }
    }

    /// Moves packets both ways until both sides are quiet.
    fn pump(&mut self) {
        let mut buf = vec![0u8; 65536];
        for _ in 0..64 {
            let mut moved = false;
            while let Ok(Some(t)) = self.host.poll_transmit(self.now, &mut buf) {
                self.out.push(buf[..t.len].to_vec());
                self.phone.handle_transfer(self.now, &buf[..t.len]);
                moved = true;
            }
            while self.host.poll_event().is_some() {}
            // Device transfers reach the host one by one, each as a recorded step.
            let mut from_dev = Vec::new();
            while let Ok(Some(t)) = self.phone.poll_transmit(self.now, &mut buf) {
                from_dev.push(buf[..t.len].to_vec());
                if t.zlp {
                    from_dev.push(Vec::new());
                }
            }
            for t in from_dev {
                self.host.handle_transfer(self.now, &t);
                self.inn.push(t.clone());
                self.steps.push(Step::FromDevice(t));
                moved = true;
                while let Ok(Some(t)) = self.host.poll_transmit(self.now, &mut buf) {
                    self.out.push(buf[..t.len].to_vec());
                    self.phone.handle_transfer(self.now, &buf[..t.len]);
                }
                while self.host.poll_event().is_some() {}
            }
            if !moved {
                break;
            }
        }
    }

    fn op(&mut self, op: host_ops::Op<'static>) {
        match op {
            host_ops::Op::Connect(port) => {
                let id = self
                    .host
                    .connect(port, Buffers::new(vec![0; 1024], vec![0; 1024]))
                    .expect("connect");
                self.ids.push(id);
            }
            host_ops::Op::Send(i, data) => {
                let _ = self.host.send(self.ids[usize::from(i)], data);
            }
            host_ops::Op::Recv(i, n) => {
                let mut b = vec![0u8; usize::from(n)];
                let _ = self.host.recv(self.ids[usize::from(i)], &mut b);
            }
            host_ops::Op::Reset(i) => {
                let _ = self.host.reset(self.ids[usize::from(i)], "fuzz");
            }
            host_ops::Op::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                self.host.handle_timeout(self.now);
                self.phone.handle_timeout(self.now);
            }
            _ => unreachable!("not used by the recording"),
        }
        self.steps.push(Step::Host(op));
        self.pump();
    }

    fn host_script(&self) -> Vec<u8> {
        let mut w = Writer::new();
        for s in &self.steps {
            match s {
                Step::Host(op) => host_ops::encode(&mut w, op),
                Step::FromDevice(t) => host_ops::encode(&mut w, &host_ops::Op::Transfer(t)),
            }
        }
        w.0
    }
}

fn lockdown_request(name: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut d = Dictionary::new();
    d.insert("Label".into(), Value::String("gen_seeds".into()));
    d.insert("Request".into(), Value::String(name.into()));
    for (k, v) in extra {
        d.insert((*k).into(), Value::String((*v).into()));
    }
    frame_xml(&d).expect("frame a request")
}

fn lockdown_request_binary(name: &str) -> Vec<u8> {
    let mut d = Dictionary::new();
    d.insert("Request".into(), Value::String(name.into()));
    let mut body = Vec::new();
    plist::to_writer_binary(&mut body, &d).expect("binary plist");
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend(body);
    framed
}

fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

/// A short name for a packet: `trace-NN-<summary words>`.
fn packet_name(i: usize, pkt: &[u8], kind: HeaderKind) -> String {
    let summary = Summary { bytes: pkt, kind }.to_string();
    let words: String = summary
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '|'))
        .take(3)
        .collect::<Vec<_>>()
        .join("_");
    format!("trace-{i:02}-{}", words.to_lowercase())
}

fn main() {
    // --- The recorded exchange.
    let mut x = Exchange::new();
    x.pump(); // VERSION, its reply, SETUP
    let query = leak(lockdown_request("QueryType", &[]));
    let get = leak(lockdown_request("GetValue", &[("Key", "ProductVersion")]));
    let mut digest = 16u64.to_be_bytes().to_vec();
    digest.extend_from_slice(b"0123456789abcdef");
    let digest = leak(digest);
    for op in [
        host_ops::Op::Connect(7),
        host_ops::Op::Send(0, b"hello, usbmux"),
        host_ops::Op::Recv(0, 64),
        host_ops::Op::Connect(62078),
        host_ops::Op::Send(1, query),
        host_ops::Op::Recv(1, 1024),
        host_ops::Op::Send(1, get),
        host_ops::Op::Recv(1, 1024),
        host_ops::Op::Connect(1999),
        host_ops::Op::Send(2, digest),
        host_ops::Op::Recv(2, 32),
        host_ops::Op::Connect(5), // nothing listens: refused
        host_ops::Op::Reset(0),
        host_ops::Op::Advance(1000),
    ] {
        x.op(op);
    }
    assert!(x.inn.len() > 8 && x.out.len() > 8, "the exchange ran");

    // session_host: the whole exchange, and its handshake alone.
    write("session_host", "sim_exchange", &x.host_script());
    let mut w = Writer::new();
    host_ops::encode(&mut w, &host_ops::Op::Transfer(&VERSION_REPLY));
    host_ops::encode(&mut w, &host_ops::Op::Connect(62078));
    host_ops::encode(&mut w, &host_ops::Op::Advance(6000));
    write("session_host", "version_then_connect_timeout", &w.0);
    let mut w = Writer::new();
    host_ops::encode(&mut w, &host_ops::Op::Transfer(&VERSION_REPLY_V1));
    host_ops::encode(&mut w, &host_ops::Op::Connect(7));
    host_ops::encode(&mut w, &host_ops::Op::Disconnect);
    write("session_host", "version1_connect_unplug", &w.0);

    // session_device: the host's side of the exchange, accepting.
    let mut w = Writer::new();
    w.u8(1);
    for t in &x.out {
        device_ops::encode(&mut w, &device_ops::Op::Transfer(t));
    }
    write("session_device", "sim_exchange_host_side", &w.0);
    let mut w = Writer::new();
    w.u8(1);
    for op in [
        device_ops::Op::Transfer(&VERSION_REQUEST),
        device_ops::Op::Transfer(&SETUP),
        device_ops::Op::Transfer(&SYN_LOCKDOWN),
        device_ops::Op::Send(0, b"reply"),
        device_ops::Op::Advance(500),
        device_ops::Op::Reset(0),
    ] {
        device_ops::encode(&mut w, &op);
    }
    write("session_device", "vectors_version_setup_syn", &w.0);
    let mut w = Writer::new();
    w.u8(0);
    for op in [
        device_ops::Op::Handshake,
        device_ops::Op::Syn(1, 62078),
        device_ops::Op::Syn(2, 7),
    ] {
        device_ops::encode(&mut w, &op);
    }
    write("session_device", "handshake_syn_refused", &w.0);

    // reassembler: the device's transfers as sent, and the same stream cut into 7-byte pieces.
    let mut w = Writer::new();
    w.u8(1);
    for t in &x.inn {
        w.bytes(t);
    }
    write("reassembler", "sim_in_transfers_v2", &w.0);
    let stream: Vec<u8> = x.inn.concat();
    let mut w = Writer::new();
    w.u8(1);
    for piece in stream.chunks(7) {
        w.bytes(piece);
    }
    write("reassembler", "sim_in_stream_7_byte_pieces", &w.0);
    let mut w = Writer::new();
    w.u8(2); // v1 headers, the 100-byte reassembler
    w.bytes(&VERSION_REPLY)
        .bytes(&VERSION_REPLY[..5])
        .bytes(&VERSION_REPLY[5..]);
    write("reassembler", "version_split_small", &w.0);

    // wire: the vectors, and one packet of each kind from the exchange.
    write("wire", "version_request", &VERSION_REQUEST);
    write("wire", "version_reply_v1", &VERSION_REPLY_V1);
    write("wire", "setup", &SETUP);
    write("wire", "syn_lockdown", &SYN_LOCKDOWN);
    let mut seen = std::collections::BTreeSet::new();
    for (i, pkt) in x.inn.iter().chain(&x.out).enumerate() {
        if pkt.is_empty() || pkt.len() > 512 {
            continue;
        }
        let name = packet_name(i, pkt, mux::detect_kind(pkt));
        let key = name
            .split_once('-')
            .map(|(_, r)| r.split_once('-').map(|(_, k)| k.to_owned()));
        if seen.insert(key) {
            write("wire", &name, pkt);
        }
    }

    // roundtrip: one item of each kind, with the vectors' field values.
    let mut w = Writer::new();
    w.u8(0).u8(0).u32(0).bytes(&VERSION_REQUEST[8..]); // mux v1 VERSION
    w.u8(1).u8(1).u16(0).u16(0xFFFF).u32(2).bytes(&[7]); // mux v2 SETUP
    w.u8(2)
        .u16(1)
        .u16(62078)
        .u32(0)
        .u32(0)
        .u8(0x02)
        .u16(0x0200)
        .bytes(&[])
        .u16(1)
        .u16(0xFFFF);
    w.u8(3).u32(2).u32(0);
    w.u8(4).u8(7).bytes(b"device says hi").u16(3).u16(2);
    w.u8(5).u8(1).u32(1).u16(22).u32(1); // binary CONNECT (§6.1)
    w.u8(5)
        .u8(3)
        .u32(3)
        .u16(0x12a8)
        .bytes(b"00008030-0000000000000001")
        .u32(0x10002)
        .u32(9);
    w.u8(6).u8(1).u32(1).u16(62078); // plist Connect (§6.6)
    w.u8(1)
        .bytes(b"my-rust-usbmux 0.1")
        .u8(1)
        .bytes(b"ver")
        .u8(1)
        .bytes(b"myprog")
        .u8(1)
        .u32(3);
    write("roundtrip", "one_of_each", &w.0);

    // client_proto: binary messages and plist requests as the daemon reads them.
    write("client_proto", "binary_connect_22", &CONNECT_22);
    write("client_proto", "binary_result_ok", &RESULT_OK);
    write(
        "client_proto",
        "plist_connect_body",
        PLIST_CONNECT.as_bytes(),
    );
    let client = ClientInfo {
        bundle_id: None,
        client_version: Some("libusbmuxd 2.0.2".into()),
        prog_name: Some("idevice_id".into()),
        lib_usbmux_version: Some(3),
    };
    for (name, request) in [
        ("plist_listen", Request::Listen),
        ("plist_list_devices", Request::ListDevices),
        ("plist_read_buid", Request::ReadBUID),
        (
            "plist_read_pair_record",
            Request::ReadPairRecord {
                id: "00008030-0000000000000001".into(),
            },
        ),
        (
            "plist_save_pair_record",
            Request::SavePairRecord {
                id: "00008030-0000000000000001".into(),
                data: b"<plist><dict/></plist>".to_vec(),
                device_id: Some(1),
            },
        ),
    ] {
        let req = PlistRequest {
            request,
            client: client.clone(),
        };
        write("client_proto", &format!("{name}_body"), &req.to_xml());
        write(
            "client_proto",
            &format!("{name}_message"),
            &req.encode(1).expect("encode"),
        );
    }
    let binary_listen = BinaryMessage::Listen.to_vec(2).expect("listen");
    write("client_proto", "binary_listen", &binary_listen);
    let add = BinaryMessage::DeviceAdd(DeviceRecord {
        device_id: 3,
        product_id: 0x12a8,
        serial: "00008030-0000000000000001".into(),
        location: 0x10002,
    });
    write(
        "client_proto",
        "binary_device_add",
        &add.to_vec(0).expect("device add"),
    );
    let refused = BinaryMessage::Result(ResultCode::ConnectionRefused);
    write(
        "client_proto",
        "binary_result_refused",
        &refused.to_vec(1).expect("result"),
    );
    let c = BinaryMessage::Connect(ConnectRequest {
        device_id: 1,
        port: 62078,
    });
    write(
        "client_proto",
        "binary_connect_lockdown",
        &c.to_vec(5).expect("connect"),
    );

    // socket_address: every form the parser documents, and near misses.
    for (name, text) in [
        ("unix_prefix", "UNIX:/var/run/usbmuxd"),
        ("bare_path", "/var/run/usbmuxd"),
        ("unix_url", "unix:///tmp/usbmuxd"),
        ("unix_url_relative", "unix://relative"),
        ("tcp_v4", "127.0.0.1:27015"),
        ("tcp_name", "localhost:27015"),
        ("tcp_v6", "[::1]:27015"),
        ("tcp_url", "tcp://127.0.0.1:27015/"),
        ("empty_host", ":27015"),
        ("port_zero", "host:0"),
        ("unix_host_name", "unix:5"),
    ] {
        write("socket_address", name, text.as_bytes());
    }

    // sim_lockdown: the requests real tools send (PROTOCOL.md §10.3), whole and chunked, and
    // the digest service.
    write("sim_lockdown", "query_type", &[&[0u8][..], query].concat());
    write(
        "sim_lockdown",
        "get_value_chunks_of_3",
        &[&[3u8][..], get].concat(),
    );
    let pair = lockdown_request("Pair", &[]);
    write(
        "sim_lockdown",
        "pair_byte_by_byte",
        &[&[1u8][..], &pair].concat(),
    );
    let set = lockdown_request(
        "SetValue",
        &[("Key", "UntrustedHostBUID"), ("Value", "ABC")],
    );
    let all = lockdown_request("GetValue", &[]);
    let bye = lockdown_request("Goodbye", &[]);
    write(
        "sim_lockdown",
        "set_get_goodbye_chunks_of_61",
        &[&[61u8][..], &set, &all, &bye].concat(),
    );
    write(
        "sim_lockdown",
        "binary_query_type",
        &[&[0u8][..], &lockdown_request_binary("QueryType")].concat(),
    );
    write(
        "sim_lockdown",
        "oversize_length",
        &[0u8, 0x00, 0x10, 0x00, 0x01],
    );
    write(
        "sim_lockdown",
        "digest_chunks_of_5",
        &[&[0x85u8][..], digest].concat(),
    );

    // session_pair: a clean exchange, then the same with each fault at the first data packet.
    let clean: Vec<PairOp> = {
        let mut ops = vec![PairOp::Connect];
        ops.extend([PairOp::ToDevice(Fault::Pass), PairOp::ToHost(Fault::Pass)].repeat(3));
        ops.extend([PairOp::HostSend(0, 1500), PairOp::DevSend(0, 700)]);
        ops.extend([PairOp::ToDevice(Fault::Pass), PairOp::ToHost(Fault::Pass)].repeat(2));
        ops.extend([PairOp::HostRead(0, 4095), PairOp::DevRead(0, 4095)]);
        ops
    };
    let script = |ops: &[PairOp]| {
        let mut w = Writer::new();
        for &op in ops {
            pair_ops::encode(&mut w, op);
        }
        w.0
    };
    write("session_pair", "clean_echo", &script(&clean));
    for (name, fault) in [
        ("drop", Fault::Drop),
        ("duplicate", Fault::Duplicate),
        ("swap", Fault::Swap),
        ("corrupt_seq", Fault::Corrupt { at: 12, xor: 0x40 }),
        ("corrupt_window", Fault::Corrupt { at: 17, xor: 0x80 }),
    ] {
        let mut ops = clean.clone();
        ops[11] = PairOp::ToDevice(fault); // the host's first data packet
        ops.extend([PairOp::Advance(255), PairOp::HostReset(0), PairOp::Connect]);
        write("session_pair", &format!("data_{name}"), &script(&ops));
    }
    let mut ops = clean.clone();
    ops.push(PairOp::DevReset(0));
    ops.extend([PairOp::ToHost(Fault::Pass), PairOp::HostRead(0, 100)]);
    write("session_pair", "device_resets", &script(&ops));

    // client_replies: what a daemon sends the client library, whole messages with headers.
    let plist_message = |body: &[u8], tag: u32| {
        let len = u32::try_from(16 + body.len()).expect("small");
        let mut m = Vec::new();
        for word in [len, 1, 8, tag] {
            m.extend_from_slice(&word.to_le_bytes());
        }
        m.extend_from_slice(body);
        m
    };
    let device = DeviceInfo {
        device_id: 1,
        product_id: 0x12a8,
        location_id: 0x10002,
        speed: 480_000_000,
        udid: "00008030-0000000000000001".into(),
        usb_serial: "000080300000000000000001".into(),
    };
    for (name, reply) in [
        ("plist_result_ok", Reply::Result(0)),
        ("plist_result_bad_version", Reply::Result(6)),
        (
            "plist_device_list",
            Reply::DeviceList(std::slice::from_ref(&device)),
        ),
        ("plist_attached", Reply::Attached(&device)),
        ("plist_detached", Reply::Detached { device_id: 1 }),
        ("plist_paired", Reply::Paired { device_id: 1 }),
        (
            "plist_buid",
            Reply::Buid("1F6ABB0C-3A30-4D4B-9E4C-2C7C5E2D1A11"),
        ),
    ] {
        write("client_replies", name, &plist_message(&reply.to_xml(), 1));
    }
    write("client_replies", "binary_result_ok", &RESULT_OK);
    write(
        "client_replies",
        "binary_device_add",
        &add.to_vec(0).expect("device add"),
    );
}
