//! Shared helpers of the integration tests: temporary directories and a host `Session` driven
//! over a `SimLink` in real time, every wait bounded.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use usbmux_core::{Buffers, ConnId, Event, Host, Instant, Session, SessionConfig};
use usbmux_sim::socket::{LinkError, Received, SimLink};
use usbmux_sim::Identity;

/// The host side the issue asks for: a small pool, heap buffers.
pub type HostSession = Session<Host, Vec<u8>, 4>;

/// A fresh, empty directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "usbmux-sim-{}-{}-{}",
            std::process::id(),
            name,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connection buffers for the host.
pub fn bufs(n: usize) -> Buffers<Vec<u8>> {
    Buffers::new(vec![0; n], vec![0; n])
}

/// Connects to a phone socket, retrying while the server is not up yet (up to `within`).
pub fn connect_retry(path: &Path, within: Duration) -> (Identity, SimLink) {
    let deadline = std::time::Instant::now() + within;
    loop {
        match SimLink::connect(path, Duration::from_secs(5)) {
            Ok(x) => return x,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "could not connect to {}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A host session on a sim socket, driven in real time.
pub struct Daemon {
    pub host: Box<HostSession>,
    pub link: SimLink,
    pub events: Vec<Event>,
    pub unplugged: bool,
    epoch: std::time::Instant,
    buf: Vec<u8>,
}

impl Daemon {
    pub fn new(link: SimLink, usb_packet_size: u16) -> Daemon {
        let cfg = SessionConfig {
            usb_packet_size,
            ..SessionConfig::default()
        };
        Daemon {
            host: Box::new(HostSession::new(cfg, 1)),
            link,
            events: Vec::new(),
            unplugged: false,
            epoch: std::time::Instant::now(),
            buf: vec![0; 65536],
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as u64)
    }

    /// One round: send what the host has, wait (≤ 20 ms or the host's next timer) for one
    /// message from the phone, handle timers, collect events.
    pub fn step(&mut self) -> Result<(), LinkError> {
        let now = self.now();
        while let Ok(Some(t)) = self.host.poll_transmit(now, &mut self.buf) {
            self.link.send_transfer(&self.buf[..t.len])?;
            if t.zlp {
                self.link.send_zlp()?;
            }
        }
        if !self.unplugged {
            let mut wait = Duration::from_millis(20);
            if let Some(t) = self.host.poll_timeout() {
                let us = t.saturating_duration_since(now).total_micros();
                wait = wait.min(Duration::from_micros(us));
            }
            // Take everything queued, but wait only for the first message.
            let mut timeout = Some(wait);
            while let Some(r) = self.link.recv(timeout)? {
                timeout = Some(Duration::ZERO);
                let now = self.now();
                match r {
                    Received::Data(d) => self.host.handle_transfer(now, &d),
                    Received::Zlp => self.host.handle_transfer(now, &[]),
                    Received::Unplug => {
                        self.unplugged = true;
                        self.host.handle_disconnect();
                        break;
                    }
                }
            }
        }
        let now = self.now();
        self.host.handle_timeout(now);
        while let Some(e) = self.host.poll_event() {
            self.events.push(e);
        }
        Ok(())
    }

    /// Steps until `done` or `within` passes; true if `done`.
    pub fn run_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&mut Daemon) -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if done(self) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            if let Err(e) = self.step() {
                panic!("link failed: {e}");
            }
        }
    }

    /// Runs the VERSION handshake; panics if it does not reach version 2 in 5 s.
    pub fn handshake(&mut self) {
        let ok = self.run_until(Duration::from_secs(5), |d| {
            d.events.contains(&Event::HandshakeDone { version: 2 })
        });
        assert!(ok, "no handshake; events: {:?}", self.events);
    }

    /// Opens a connection to `port`; panics unless it connects within 5 s.
    pub fn connect(&mut self, port: u16, buf: usize) -> ConnId {
        let id = self.host.connect(port, bufs(buf)).expect("connect");
        let ok = self.run_until(Duration::from_secs(5), |d| {
            d.events.contains(&Event::Connected(id))
        });
        assert!(ok, "port {port} did not connect; events: {:?}", self.events);
        id
    }

    /// Sends `data` on `id` and reads `data.len()` bytes back (echo); returns what came back.
    pub fn echo(&mut self, id: ConnId, data: &[u8], within: Duration) -> Vec<u8> {
        let mut sent = 0;
        let mut back = Vec::new();
        let mut chunk = vec![0u8; 65536];
        self.run_until(within, |d| {
            if sent < data.len() {
                sent += d.host.send(id, &data[sent..]).unwrap_or(0);
            }
            while let Ok(n) = d.host.recv(id, &mut chunk) {
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&chunk[..n]);
            }
            back.len() >= data.len()
        });
        back
    }
}

/// A deterministic, non-repeating-looking test pattern (contains zeros).
pub fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}
