//! The simulated phone against a host-role `Session` over the in-process `VirtualCable`, as a
//! host would see it: both handshake versions, every service by port, 100 MiB through digest
//! with the SHA-256 checked, 64 concurrent connections, and every lockdown request a
//! no-pairing client sends, with its answer.

use plist::{Dictionary, Value};
use sha2::{Digest as _, Sha256};
use usbmux_core::{
    Buffers, ConnId, Duration, Event, Host, Instant, ResetKind, Session, SessionConfig,
};
use usbmux_sim::cable::{CabledPhone, HOST_READ_LEN};
use usbmux_sim::service::source_byte;
use usbmux_sim::PhoneConfig;

type HostSession = Session<Host, Vec<u8>, 80>;

struct Rig {
    host: Box<HostSession>,
    dev: CabledPhone,
    now: Instant,
    events: Vec<Event>,
    buf: Vec<u8>,
}

impl Rig {
    fn new(cfg: PhoneConfig) -> Rig {
        let mut r = Rig {
            host: Box::new(HostSession::new(SessionConfig::default(), 1000)),
            dev: CabledPhone::new(cfg),
            now: Instant::ZERO,
            events: Vec::new(),
            buf: vec![0; 65536],
        };
        r.settle();
        r
    }

    /// Moves everything both ways until quiet; returns whether anything moved.
    fn step(&mut self) -> bool {
        let mut moved = false;
        while let Some(t) = self
            .host
            .poll_transmit(self.now, &mut self.buf)
            .expect("64 KiB")
        {
            moved = true;
            self.dev.host_write(self.now, &self.buf[..t.len]);
            if t.zlp {
                self.dev.host_write_zlp(self.now);
            }
        }
        while let Some(t) = self.dev.host_read(self.now, HOST_READ_LEN) {
            moved = true;
            self.host.handle_transfer(self.now, &t);
        }
        while let Some(e) = self.host.poll_event() {
            moved = true;
            self.events.push(e);
        }
        moved
    }

    fn settle(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("livelock");
    }

    /// Advances the simulated clock to the next timer of either side.
    fn tick(&mut self) {
        let next = [self.host.poll_timeout(), self.dev.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        self.now = match next {
            Some(t) if t > self.now => t,
            _ => self.now + Duration::from_millis(1),
        };
        self.host.handle_timeout(self.now);
        self.dev.handle_timeout(self.now);
        self.settle();
    }

    fn connect(&mut self, port: u16) -> ConnId {
        let id = self
            .host
            .connect(port, Buffers::new(vec![0; 256 * 1024], vec![0; 256 * 1024]))
            .map_err(|e| e.0)
            .expect("slot");
        self.settle();
        id
    }

    fn connected(&self, id: ConnId) -> bool {
        self.events.contains(&Event::Connected(id))
    }

    /// Sends `data` and collects `want` bytes back, bounded.
    fn exchange(&mut self, id: ConnId, data: &[u8], want: usize) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::with_capacity(want);
        let mut chunk = vec![0u8; 256 * 1024];
        for _ in 0..200_000 {
            if sent < data.len() {
                sent += self.host.send(id, &data[sent..]).expect("open");
            }
            self.settle();
            loop {
                let n = self.host.recv(id, &mut chunk).expect("open");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
            }
            if sent == data.len() && got.len() >= want {
                return got;
            }
            self.tick();
        }
        panic!(
            "stalled: sent {sent} of {}, got {} of {want}",
            data.len(),
            got.len()
        );
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

#[test]
fn handshake_v2_and_v1() {
    let r = Rig::new(PhoneConfig::simulated(1));
    assert_eq!(r.host.version(), Some(2));
    let mut cfg = PhoneConfig::simulated(2);
    cfg.session.device_version = 1;
    let mut r = Rig::new(cfg);
    assert_eq!(r.host.version(), Some(1));
    let id = r.connect(7);
    assert!(r.connected(id));
    let d = pattern(100_000, 1);
    assert!(r.exchange(id, &d, d.len()) == d);
}

#[test]
fn echo_discard_source_and_refusal() {
    let mut r = Rig::new(PhoneConfig::simulated(1));
    let echo = r.connect(7);
    let d = pattern(3 << 20, 2);
    assert!(r.exchange(echo, &d, d.len()) == d);

    let discard = r.connect(9);
    let d = pattern(2 << 20, 3);
    assert!(r.exchange(discard, &d, 0).is_empty());
    for _ in 0..100 {
        r.tick();
    }
    let c = r.host.connection(discard).expect("open");
    assert_eq!(c.send_queue(), 0, "the phone took everything");
    assert_eq!(c.stats().bytes_sent, 2 << 20);

    let source = r.connect(19);
    let got = r.exchange(source, &[], 1 << 20);
    for (i, &b) in got.iter().enumerate() {
        assert_eq!(b, source_byte(i as u64), "source byte {i}");
    }

    let refused = r.connect(4242);
    assert!(r.events.iter().any(|e| matches!(e, Event::Refused { id, reason }
        if *id == refused && reason.kind == ResetKind::Refused && reason.text() == b"Connection refused")));
}

#[test]
fn hundred_mib_through_digest() {
    let mut r = Rig::new(PhoneConfig::simulated(1));
    let id = r.connect(1999);
    let total: u64 = 100 << 20;
    let mut hasher = Sha256::new();
    let block = pattern(1 << 20, 9);
    let mut header_sent = false;
    let mut sent = 0u64;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 64];
    for _ in 0..1_000_000 {
        if !header_sent {
            assert_eq!(r.host.send(id, &total.to_be_bytes()), Ok(8));
            header_sent = true;
        }
        while sent < total {
            let off = (sent % block.len() as u64) as usize;
            let n = r.host.send(id, &block[off..]).expect("open");
            if n == 0 {
                break;
            }
            hasher.update(&block[off..off + n]);
            sent += n as u64;
        }
        r.settle();
        let n = r.host.recv(id, &mut chunk).expect("open");
        answer.extend_from_slice(&chunk[..n]);
        if answer.len() >= 32 {
            break;
        }
        if sent == total {
            r.tick();
        }
    }
    assert_eq!(sent, total);
    assert_eq!(answer.len(), 32);
    assert_eq!(answer[..], hasher.finalize()[..]);
}

#[test]
fn sixty_four_concurrent_connections() {
    let mut r = Rig::new(PhoneConfig::simulated(1));
    let ids: Vec<ConnId> = (0..64)
        .map(|_| {
            r.host
                .connect(7, Buffers::new(vec![0; 32 * 1024], vec![0; 32 * 1024]))
                .map_err(|e| e.0)
                .expect("slot")
        })
        .collect();
    r.settle();
    assert!(ids.iter().all(|&id| r.connected(id)));
    let data: Vec<Vec<u8>> = (0..64)
        .map(|i| pattern(200_000 + i * 1111, i as u8))
        .collect();
    let mut sent = vec![0; 64];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); 64];
    let mut chunk = vec![0u8; 32 * 1024];
    for _ in 0..100_000 {
        for (i, &id) in ids.iter().enumerate() {
            if sent[i] < data[i].len() {
                sent[i] += r.host.send(id, &data[i][sent[i]..]).expect("open");
            }
        }
        r.settle();
        for (i, &id) in ids.iter().enumerate() {
            let n = r.host.recv(id, &mut chunk).expect("open");
            got[i].extend_from_slice(&chunk[..n]);
        }
        if got.iter().zip(&data).all(|(g, d)| g.len() == d.len()) {
            break;
        }
        r.tick();
    }
    for i in 0..64 {
        assert!(got[i] == data[i], "connection {i}");
    }
}

// ---- lockdown ---------------------------------------------------------------------------------

fn request(pairs: &[(&str, Value)]) -> Vec<u8> {
    let mut d = Dictionary::new();
    d.insert("Label".into(), Value::String("usbmux-rs-test".into()));
    for (k, v) in pairs {
        d.insert((*k).into(), v.clone());
    }
    let mut body = Vec::new();
    plist::to_writer_xml(&mut body, &Value::Dictionary(d)).expect("encode");
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&body);
    framed
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

/// Sends one lockdown request and reads exactly one framed reply.
fn ask(r: &mut Rig, id: ConnId, pairs: &[(&str, Value)]) -> Dictionary {
    let framed = request(pairs);
    let mut sent = 0;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 65536];
    for _ in 0..10_000 {
        if sent < framed.len() {
            sent += r.host.send(id, &framed[sent..]).expect("open");
        }
        r.settle();
        let n = r.host.recv(id, &mut chunk).expect("open");
        got.extend_from_slice(&chunk[..n]);
        if got.len() >= 4 {
            let len = u32::from_be_bytes([got[0], got[1], got[2], got[3]]) as usize;
            if got.len() == 4 + len {
                let v = Value::from_reader_xml(&got[4..]).expect("XML reply");
                return v.into_dictionary().expect("dict reply");
            }
            assert!(got.len() < 4 + len, "more than one reply");
        }
        r.tick();
    }
    panic!("no reply");
}

fn field<'a>(d: &'a Dictionary, k: &str) -> Option<&'a str> {
    d.get(k).and_then(Value::as_string)
}

#[test]
fn every_lockdown_request_over_the_cable() {
    let cfg = PhoneConfig::simulated(3);
    let udid = cfg.identity.udid.clone();
    let mut r = Rig::new(cfg);
    let id = r.connect(62078);
    assert!(r.connected(id));

    let d = ask(&mut r, id, &[("Request", s("QueryType"))]);
    assert_eq!(field(&d, "Request"), Some("QueryType"));
    assert_eq!(field(&d, "Type"), Some("com.apple.mobile.lockdown"));

    let d = ask(&mut r, id, &[("Request", s("GetValue"))]);
    let all = d
        .get("Value")
        .and_then(Value::as_dictionary)
        .expect("the global dictionary");
    assert_eq!(all.len(), 25);
    assert_eq!(field(all, "UniqueDeviceID"), Some(udid.as_str()));
    assert_eq!(field(all, "DeviceName"), Some("Simulated iPhone 3"));

    let d = ask(
        &mut r,
        id,
        &[("Request", s("GetValue")), ("Key", s("ProductVersion"))],
    );
    assert_eq!(field(&d, "Key"), Some("ProductVersion"));
    assert!(field(&d, "Value").is_some());

    let d = ask(
        &mut r,
        id,
        &[("Request", s("GetValue")), ("Key", s("DevicePublicKey"))],
    );
    let pem = d.get("Value").and_then(Value::as_data).expect("PEM data");
    assert!(pem.starts_with(b"-----BEGIN RSA PUBLIC KEY-----"));

    for (key, domain) in [
        (Some("SerialNumber"), None),
        (None, Some("com.apple.mobile.battery")),
    ] {
        let mut req = vec![("Request", s("GetValue"))];
        if let Some(k) = key {
            req.push(("Key", s(k)));
        }
        if let Some(dm) = domain {
            req.push(("Domain", s(dm)));
        }
        let d = ask(&mut r, id, &req);
        assert_eq!(
            field(&d, "Error"),
            Some("MissingValue"),
            "{key:?} {domain:?}"
        );
    }

    let d = ask(
        &mut r,
        id,
        &[
            ("Request", s("SetValue")),
            ("Key", s("UntrustedHostBUID")),
            ("Value", s("A1B2C3D4-0000-0000-0000-000000000000")),
        ],
    );
    assert_eq!(field(&d, "Error"), None);

    let expectations = [
        ("Pair", Some("PasswordProtected"), None),
        ("StartSession", Some("InvalidHostID"), None),
        ("ValidatePair", Some("InvalidHostID"), None),
        ("StartService", Some("SessionInactive"), None),
        ("StopSession", None, Some("Success")),
        ("NoSuchRequest", Some("UnknownRequest"), None),
        ("Goodbye", None, Some("Success")),
    ];
    for (req, error, result) in expectations {
        let mut pairs = vec![("Request", s(req))];
        if req == "StartService" {
            pairs.push(("Service", s("com.apple.afc")));
        }
        let d = ask(&mut r, id, &pairs);
        assert_eq!(field(&d, "Request"), Some(req));
        assert_eq!(field(&d, "Error"), error, "{req}");
        assert_eq!(field(&d, "Result"), result, "{req}");
    }
}
