//! Phones served by `usbmux-sim serve` over a Unix `SOCK_SEQPACKET` socket, as a [`Link`]
//! (`usbmuxd --sim-socket PATH`), and the watcher that plugs them in.
//!
//! The socket carries whole transfers (and ZLPs as messages of their own), so the daemon's
//! framing meets the simulator's strict phone exactly as it would meet USB. A reader thread
//! receives and wakes the device thread; sends go out from the device thread.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info, warn};
use usbmux_core::Instant;
use usbmux_sim::socket::{Received, SimLink};

use crate::link::{DeviceIdentity, Link, LinkError};

enum Incoming {
    Transfer(Vec<u8>),
    Gone(String),
}

/// One phone on a simulator socket.
pub struct SocketLink {
    identity: DeviceIdentity,
    tx: SimLink,
    reader: Option<SimLink>,
    rx: Option<Receiver<Incoming>>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Told when the link ends, so the watcher can reconnect.
    ended: Option<mpsc::Sender<()>>,
}

impl SocketLink {
    /// Connects to the phone at `path` (waiting at most `timeout` for its IDENTITY).
    pub fn connect(path: &std::path::Path, timeout: Duration) -> Result<SocketLink, LinkError> {
        let (id, link) =
            SimLink::connect(path, timeout).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let reader = link
            .try_clone()
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let identity = DeviceIdentity {
            udid: id.udid.clone(),
            usb_serial: id.usb_serial(),
            product_id: id.product_id,
            location_id: id.location_id,
            speed: id.speed,
            max_packet_size: id.max_packet_size,
        };
        Ok(SocketLink {
            identity,
            tx: link,
            reader: Some(reader),
            rx: None,
            thread: None,
            stop: Arc::new(AtomicBool::new(false)),
            ended: None,
        })
    }
}

impl Link for SocketLink {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn start(&mut self, waker: Arc<mio::Waker>) -> Result<(), LinkError> {
        let Some(mut reader) = self.reader.take() else {
            return Ok(());
        };
        let (tx, rx) = mpsc::channel();
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sim-socket-{}", self.identity.udid))
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let msg = match reader.recv(Some(Duration::from_millis(200))) {
                        Ok(None) => continue,
                        Ok(Some(Received::Data(d))) => Incoming::Transfer(d),
                        // The host's reassembler takes IN data as a byte stream: a ZLP carries
                        // nothing for it.
                        Ok(Some(Received::Zlp)) => continue,
                        Ok(Some(Received::Unplug)) => Incoming::Gone("phone unplugged".into()),
                        Err(e) => Incoming::Gone(e.to_string()),
                    };
                    let last = matches!(msg, Incoming::Gone(_));
                    if tx.send(msg).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                    if last {
                        return;
                    }
                }
            })
            .map_err(|e| LinkError::Io {
                what: "spawn reader",
                source: e,
            })?;
        self.rx = Some(rx);
        self.thread = Some(thread);
        Ok(())
    }

    fn send(&mut self, _now: Instant, transfer: &[u8], zlp: bool) -> Result<(), LinkError> {
        self.tx
            .send_transfer(transfer)
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        if zlp {
            self.tx
                .send_zlp()
                .map_err(|e| LinkError::Protocol(e.to_string()))?;
        }
        Ok(())
    }

    fn recv(&mut self, _now: Instant, buf: &mut [u8]) -> Result<Option<usize>, LinkError> {
        let Some(rx) = &self.rx else { return Ok(None) };
        match rx.try_recv() {
            Ok(Incoming::Transfer(t)) => {
                if t.len() > buf.len() {
                    return Err(LinkError::Protocol(format!(
                        "transfer of {} bytes",
                        t.len()
                    )));
                }
                buf[..t.len()].copy_from_slice(&t);
                Ok(Some(t.len()))
            }
            Ok(Incoming::Gone(why)) => {
                debug!("sim socket {}: {why}", self.identity.udid);
                Err(LinkError::Disconnected)
            }
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(LinkError::Disconnected),
        }
    }

    /// Nothing is put off: every datagram is sent and read as it comes.
    fn end_turn(&mut self) {}
}

impl Drop for SocketLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.tx.send_unplug();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(e) = self.ended.take() {
            let _ = e.send(());
        }
    }
}

/// Keeps a phone socket plugged in: connects while the path exists, attaches each connection as
/// a device, and connects again after the phone went away (a replug gets a new DeviceID).
pub struct SocketWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SocketWatcher {
    /// Watches `path`; `attach` plugs a link into the daemon.
    pub fn spawn(
        path: PathBuf,
        attach: impl Fn(Box<dyn Link>) + Send + 'static,
    ) -> std::io::Result<SocketWatcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sim-socket-watch".into())
            .spawn(move || {
                let mut announced_missing = false;
                while !s.load(Ordering::Relaxed) {
                    match SocketLink::connect(&path, Duration::from_secs(2)) {
                        Ok(mut link) => {
                            announced_missing = false;
                            info!(
                                "sim socket {}: phone {} plugged in",
                                path.display(),
                                link.identity.udid
                            );
                            let (tx, rx) = mpsc::channel();
                            link.ended = Some(tx);
                            attach(Box::new(link));
                            // Wait for the link to end (or for the daemon to stop).
                            while !s.load(Ordering::Relaxed) {
                                match rx.recv_timeout(Duration::from_millis(200)) {
                                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                                }
                            }
                        }
                        Err(e) => {
                            if !announced_missing {
                                warn!("sim socket {}: {e}; retrying", path.display());
                                announced_missing = true;
                            }
                            std::thread::sleep(Duration::from_millis(250));
                        }
                    }
                }
            })?;
        Ok(SocketWatcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for SocketWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
