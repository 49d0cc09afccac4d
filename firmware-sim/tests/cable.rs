//! The virtual cable: USB bulk semantics, and the ZLP trap — a host that honours `Transmit::zlp`
//! talks to the strict simulated phone byte-exact; one that omits ZLPs visibly fails.

mod common;

use common::{bufs, pattern, HostSession};
use usbmux_core::wire::ControlType;
use usbmux_core::{ConnId, Event, Instant, SessionConfig};
use usbmux_sim::cable::{BulkPipe, CabledPhone, VirtualCable, DEVICE_READ_LEN, HOST_READ_LEN};
use usbmux_sim::service::ECHO;
use usbmux_sim::PhoneConfig;

const SIZES: [u16; 3] = [64, 512, 1024];

#[test]
fn short_packet_ends_a_transfer() {
    for mps in SIZES {
        let m = usize::from(mps);
        let mut p = BulkPipe::new(mps);
        p.write(&pattern(m + 1, 1));
        p.write(&pattern(m - 1, 2));
        p.write(&[7]);
        assert_eq!(p.read(65536), Some(pattern(m + 1, 1)), "{mps}");
        assert_eq!(p.read(65536), Some(pattern(m - 1, 2)), "{mps}");
        assert_eq!(p.read(65536), Some(vec![7]), "{mps}");
        assert_eq!(p.read(65536), None, "{mps}");
    }
}

#[test]
fn zlp_ends_a_transfer() {
    for mps in SIZES {
        let m = usize::from(mps);
        let mut p = BulkPipe::new(mps);
        p.write(&pattern(3 * m, 1));
        assert_eq!(p.read(65536), None, "{mps}: incomplete without a ZLP");
        p.write_zlp();
        assert_eq!(p.read(65536), Some(pattern(3 * m, 1)), "{mps}");
        // A lone ZLP is an empty transfer.
        p.write(&[]);
        assert_eq!(p.read(65536), Some(vec![]), "{mps}");
        assert_eq!(p.read(65536), None, "{mps}");
        assert_eq!(p.stats().zlps_written, 2);
    }
}

#[test]
fn missing_zlp_glues_two_transfers() {
    for mps in SIZES {
        let m = usize::from(mps);
        let mut p = BulkPipe::new(mps);
        let a = pattern(2 * m, 1);
        let b = pattern(10, 2);
        p.write(&a);
        p.write(&b);
        assert!(p.read(65536) == Some([a, b].concat()), "{mps}");
        assert_eq!(p.read(65536), None, "{mps}");
    }
}

#[test]
fn reader_buffer_full_completes_a_transfer() {
    for mps in SIZES {
        let mut p = BulkPipe::new(mps);
        // Not a multiple of any packet size: the last packet is short.
        let big = pattern(40_001, 3);
        p.write(&big);
        let mut got = Vec::new();
        let mut reads = 0;
        while let Some(t) = p.read(HOST_READ_LEN) {
            assert!(t.len() <= HOST_READ_LEN);
            got.extend_from_slice(&t);
            reads += 1;
        }
        assert!(got == big, "{mps}: {} bytes back", got.len());
        assert_eq!(reads, 3, "{mps}: 16384 + 16384 + 7233");
        assert_eq!(p.stats().reads_buffer_full, 2);
    }
}

#[test]
fn buffer_full_does_not_make_a_partial_transfer_readable_early() {
    let mut p = BulkPipe::new(512);
    p.write(&pattern(1024, 1)); // two full packets, no terminator
    assert_eq!(p.read(4096), None);
    assert_eq!(
        p.read(512).map(|t| t.len()),
        Some(512),
        "a 512-byte buffer is full"
    );
    assert_eq!(p.read(4096), None);
    p.write_zlp();
    assert_eq!(p.read(4096).map(|t| t.len()), Some(512));
}

#[test]
fn cable_directions_are_independent() {
    let mut c = VirtualCable::new(512);
    c.host_write(&[1, 2, 3]);
    c.device_write(&[4; 512]);
    c.device_write_zlp();
    assert_eq!(c.host_read(HOST_READ_LEN), Some(vec![4; 512]));
    assert_eq!(c.host_read(HOST_READ_LEN), None);
    assert_eq!(c.device_read(DEVICE_READ_LEN), Some(vec![1, 2, 3]));
    assert!(c.out_pipe().is_empty() && c.in_pipe().is_empty());
    c.host_write(&[9; 512]);
    c.clear();
    assert_eq!(c.out_pipe().queued_bytes(), 0);
}

/// A host `Session` and a `CabledPhone`, in simulated time.
struct Rig {
    host: Box<HostSession>,
    dev: CabledPhone,
    now: Instant,
    send_zlps: bool,
    events: Vec<Event>,
    buf: Vec<u8>,
    out_transfers: u64,
}

impl Rig {
    fn new(mps: u16, send_zlps: bool) -> Rig {
        let mut pc = PhoneConfig::simulated(1);
        pc.identity.max_packet_size = mps;
        pc.session.usb_packet_size = mps;
        let hc = SessionConfig {
            usb_packet_size: mps,
            ..SessionConfig::default()
        };
        Rig {
            host: Box::new(HostSession::new(hc, 1)),
            dev: CabledPhone::new(pc),
            now: Instant::ZERO,
            send_zlps,
            events: Vec::new(),
            buf: vec![0; 65536],
            out_transfers: 0,
        }
    }

    /// Moves everything that can move at the current time; true if anything did.
    fn step(&mut self) -> bool {
        let mut moved = false;
        while let Ok(Some(t)) = self.host.poll_transmit(self.now, &mut self.buf) {
            moved = true;
            self.out_transfers += 1;
            self.dev.host_write(self.now, &self.buf[..t.len]);
            if t.zlp && self.send_zlps {
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

    /// Steps, advancing simulated time to the next timer when idle, until `done` or 60
    /// simulated seconds (or 200 000 steps) pass. True if `done`.
    fn run_until(&mut self, mut done: impl FnMut(&mut Rig) -> bool) -> bool {
        let limit = self.now + usbmux_core::Duration::from_secs(60);
        for _ in 0..200_000 {
            if done(self) {
                return true;
            }
            if self.step() {
                continue;
            }
            let next = [self.host.poll_timeout(), self.dev.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= limit => {
                    self.now = self.now.max(t);
                    self.host.handle_timeout(self.now);
                    self.dev.handle_timeout(self.now);
                }
                _ => return done(self),
            }
        }
        false
    }

    fn handshake(&mut self) {
        assert!(self.run_until(|r| r.events.contains(&Event::HandshakeDone { version: 2 })));
    }

    fn connect_echo(&mut self) -> ConnId {
        let id = self.host.connect(ECHO, bufs(256 * 1024)).expect("connect");
        assert!(self.run_until(|r| r.events.contains(&Event::Connected(id))));
        id
    }

    /// Sends each message in turn (one `send` per message, so each leaves as its own packet
    /// when the window allows) and collects the echo until `want` bytes or no progress.
    fn echo(&mut self, id: ConnId, msgs: &[Vec<u8>], want: usize) -> Vec<u8> {
        let mut back = Vec::new();
        let mut chunk = vec![0u8; 65536];
        for m in msgs {
            let mut sent = 0;
            let ok = self.run_until(|r| {
                sent += r.host.send(id, &m[sent..]).unwrap_or(0);
                sent == m.len()
            });
            assert!(ok, "send stalled");
            self.step();
        }
        self.run_until(|r| {
            while let Ok(n) = r.host.recv(id, &mut chunk) {
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&chunk[..n]);
            }
            back.len() >= want
        });
        back
    }

    fn device_errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::DeviceMessage(m) if m.kind == ControlType::Error => {
                    Some(String::from_utf8_lossy(m.text()).into_owned())
                }
                _ => None,
            })
            .collect()
    }
}

/// Messages whose packets are exact multiples of `mps` (36 bytes of v2 + TCP header each), plus
/// a large one cut into near-49 152-byte packets (the engine trims a full packet by one byte
/// to spare its ZLP while more data follows).
fn zlp_heavy_messages(mps: usize) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = (1..=4).map(|k| pattern(k * mps - 36, k as u32)).collect();
    v.push(pattern(200_000, 99));
    v
}

#[test]
fn echo_with_zlps_is_byte_exact() {
    for mps in SIZES {
        let mut r = Rig::new(mps, true);
        r.handshake();
        let id = r.connect_echo();
        let msgs = zlp_heavy_messages(usize::from(mps));
        let want: Vec<u8> = msgs.concat();
        let back = r.echo(id, &msgs, want.len());
        assert!(
            back == want,
            "{mps}: echo differs ({} of {} bytes)",
            back.len(),
            want.len()
        );
        assert_eq!(r.device_errors(), Vec::<String>::new(), "{mps}");
        let out = r.dev.cable().out_pipe().stats();
        let inp = r.dev.cable().in_pipe().stats();
        assert!(
            out.zlps_written >= 4,
            "{mps}: host sent {} ZLPs",
            out.zlps_written
        );
        assert!(
            inp.zlps_written >= 1,
            "{mps}: phone sent {} ZLPs",
            inp.zlps_written
        );
        assert!(
            inp.reads_buffer_full > 0,
            "{mps}: 48 KiB packets span 16 KiB IN reads"
        );
        assert_eq!(r.dev.phone().session().stats().reassembly_errors, 0);
    }
}

#[test]
fn omitting_zlps_fails_visibly() {
    for mps in SIZES {
        let m = usize::from(mps);
        let mut r = Rig::new(mps, false);
        // VERSION (20), SETUP (17) and SYN (36) are no multiples: the handshake still works.
        r.handshake();
        let id = r.connect_echo();
        // A packet of exactly `mps` bytes, not delimited, then a small one glued to it.
        let msgs = vec![pattern(m - 36, 1), pattern(10, 2)];
        let want = msgs.concat();
        let back = r.echo(id, &msgs, want.len());
        assert!(
            back != want,
            "{mps}: the echo must not survive a missing ZLP"
        );
        let errors = r.device_errors();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("message size mismatch")
                    && e.contains(&format!("got {}", m + 46))),
            "{mps}: {errors:?}"
        );
        assert!(r.dev.phone().session().stats().reassembly_errors >= 1);
    }
}

#[test]
fn glued_large_packets_are_the_65536_byte_message() {
    // Two 49 152-byte packets without a ZLP between them: the phone's 64 KiB read fills up, and
    // it says what real phones say behind usbip (PROTOCOL.md §5.15). Each message is sent on
    // its own so its packet is exactly 49 152 bytes (nothing follows to trim it for).
    let mut r = Rig::new(512, false);
    r.handshake();
    let id = r.connect_echo();
    let msgs = vec![pattern(49_116, 5), pattern(49_116, 6)];
    let want = msgs.concat();
    let back = r.echo(id, &msgs, want.len());
    assert!(back != want);
    let errors = r.device_errors();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("message was too large (65536 bytes, max = 65535)")),
        "{errors:?}"
    );
}
