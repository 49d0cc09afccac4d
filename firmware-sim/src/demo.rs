//! The README's first command: a host `Session` and a simulated [`Phone`] talking over an
//! in-memory cable, every packet printed as it crosses.
//!
//! It walks through what any usbmux host does: the VERSION/SETUP handshake, a connection to the
//! echo service with data both ways, a refused port (the phone's RST text comes back), a source
//! stream read through a small window, and a reset.

use std::fmt::Write as _;

use usbmux_core::wire::{HeaderKind, Summary};
use usbmux_core::{Buffers, ConnId, Event, Host, Instant, Session, SessionConfig};

use crate::phone::{Phone, PhoneConfig};
use crate::service::{self, source_byte};

type HostSession = Session<Host, Vec<u8>, 8>;

struct Cable {
    host: Box<HostSession>,
    phone: Phone,
    now: Instant,
    out: String,
    packets: usize,
    quiet: bool,
}

impl Cable {
    fn line(&mut self, dir: &str, bytes: &[u8], zlp: bool) {
        self.packets += 1;
        if self.quiet {
            return;
        }
        let kind = if self.host.version() == Some(2) {
            HeaderKind::V2
        } else {
            HeaderKind::V1
        };
        let z = if zlp { " +ZLP" } else { "" };
        let _ = writeln!(self.out, "  {dir} {}{z}", Summary { bytes, kind });
    }

    /// Moves packets both ways until neither side has anything to send.
    fn pump(&mut self) -> Vec<Event> {
        let mut buf = vec![0u8; 65536];
        let mut events = Vec::new();
        for _ in 0..10_000 {
            let mut moved = false;
            while let Ok(Some(t)) = self.host.poll_transmit(self.now, &mut buf) {
                moved = true;
                let pkt = buf[..t.len].to_vec();
                self.line("host  -> phone", &pkt, t.zlp);
                self.phone.handle_transfer(self.now, &pkt);
                if t.zlp {
                    self.phone.handle_transfer(self.now, &[]);
                }
            }
            while let Ok(Some(t)) = self.phone.poll_transmit(self.now, &mut buf) {
                moved = true;
                let pkt = buf[..t.len].to_vec();
                self.line("phone -> host ", &pkt, t.zlp);
                self.host.handle_transfer(self.now, &pkt);
            }
            while let Some(e) = self.host.poll_event() {
                moved = true;
                events.push(e);
            }
            if !moved {
                break;
            }
        }
        events
    }

    fn say(&mut self, text: &str) {
        let _ = writeln!(self.out, "{text}");
    }
}

fn describe(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the walkthrough and returns its transcript. Errors mean the engine misbehaved.
pub fn run() -> Result<String, String> {
    let mut c = Cable {
        host: Box::new(HostSession::new(SessionConfig::default(), 1)),
        phone: Phone::new(PhoneConfig::default()),
        now: Instant::ZERO,
        out: String::new(),
        packets: 0,
        quiet: false,
    };
    c.say("usbmux-rs demo: a host Session and a simulated iPhone on an in-memory USB cable\n");
    c.say("1. Version handshake (VERSION 2.0 in an 8-byte header, then SETUP in v2 headers)");
    let ev = c.pump();
    c.say(&format!("   host events: {}\n", describe(&ev)));
    if c.host.version() != Some(2) {
        return Err("handshake did not reach version 2".into());
    }

    c.say("2. Connect to the echo service (port 7) and send a line");
    let echo = connect(&mut c, service::ECHO)?;
    let msg = b"hello, phone";
    c.host.send(echo, msg).map_err(|e| e.to_string())?;
    let ev = c.pump();
    let mut back = vec![0u8; 64];
    let n = c.host.recv(echo, &mut back).map_err(|e| e.to_string())?;
    c.say(&format!("   host events: {}", describe(&ev)));
    c.say(&format!(
        "   echoed back: {:?}\n",
        String::from_utf8_lossy(&back[..n])
    ));
    if &back[..n] != msg {
        return Err("echo mismatch".into());
    }

    c.say("3. Connect to a port nobody listens on (4242): the phone refuses with an RST");
    let id = c.host.connect(4242, bufs()).map_err(|e| e.0.to_string())?;
    let ev = c.pump();
    let refused = ev.iter().find_map(|e| match e {
        Event::Refused { id: i, reason } if *i == id => Some(reason.to_string()),
        _ => None,
    });
    let reason = refused.ok_or("port 4242 was not refused")?;
    c.say(&format!("   refused: \"{reason}\"\n"));
    let _ = c.host.reset(id, "");

    c.say("4. Read 1 MiB from the source service (port 19) through a 16 KiB window (packets not shown)");
    let src = c
        .host
        .connect(
            service::SOURCE,
            Buffers::new(vec![0; 16 * 1024], vec![0; 1024]),
        )
        .map_err(|e| e.0.to_string())?;
    c.quiet = true;
    let before = c.packets;
    let mut got = 0u64;
    let mut buf = vec![0u8; 8192];
    for _ in 0..100_000 {
        c.pump();
        loop {
            let n = c.host.recv(src, &mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            for (i, &b) in buf[..n].iter().enumerate() {
                if b != source_byte(got + i as u64) {
                    return Err(format!("source byte {} wrong", got + i as u64));
                }
            }
            got += n as u64;
        }
        if got >= 1 << 20 {
            break;
        }
        // Let delayed ACKs fire: the clock only moves when told to.
        if let Some(t) = c.host.poll_timeout() {
            c.now = c.now.max(t);
            c.host.handle_timeout(c.now);
        }
    }
    c.quiet = false;
    let stats = c.host.conn_stats(src).ok_or("source connection vanished")?;
    c.say(&format!(
        "   {} bytes verified in {} packets, {} of them the host's window updates\n",
        got,
        c.packets - before,
        stats.pure_acks_sent,
    ));

    c.say("5. Reset the echo connection from the host: the phone sees our reason");
    let _ = c.host.reset(echo, "demo finished");
    c.pump();
    let saw = c
        .phone
        .take_events()
        .into_iter()
        .rev()
        .find_map(|e| match e {
            Event::Reset { reason, .. } => Some(reason.to_string()),
            _ => None,
        });
    c.say(&format!("   phone saw: \"{}\"\n", saw.unwrap_or_default()));
    let s = c.host.stats();
    let resets = s.resets_bad_seq + s.resets_bad_ack + s.resets_window_overflow;
    c.say(&format!(
        "host session: {} packets in, {} out, {} resets for bad seq/ack/window",
        s.packets_in, s.packets_out, resets
    ));
    Ok(c.out)
}

fn bufs() -> Buffers<Vec<u8>> {
    Buffers::new(vec![0; 128 * 1024], vec![0; 128 * 1024])
}

fn connect(c: &mut Cable, port: u16) -> Result<ConnId, String> {
    let id = c.host.connect(port, bufs()).map_err(|e| e.0.to_string())?;
    let ev = c.pump();
    c.say(&format!("   host events: {}", describe(&ev)));
    if ev.contains(&Event::Connected(id)) {
        Ok(id)
    } else {
        Err(format!("connect to port {port} failed"))
    }
}

#[cfg(test)]
mod test {
    #[test]
    fn demo_runs_and_says_what_happened() {
        let out = super::run().expect("demo");
        assert!(out.contains("host  -> phone v1 VERSION 2.0"));
        assert!(out.contains("phone -> host  v1 VERSION 2.0"));
        assert!(out.contains("SETUP"));
        assert!(out.contains("echoed back: \"hello, phone\""));
        assert!(out.contains("refused: \"Connection refused\""));
        assert!(out.contains("1048576 bytes verified"));
        assert!(out.contains(", 0 resets for bad seq/ack/window"));
        assert!(out.contains("phone saw: \"demo finished\""));
    }
}
