//! `usbmuxd --trace FILE`: every transfer of every phone, both ways, in the simulator's
//! postcard trace format, so `usbmux-sim dump FILE` decodes what the daemon really sent and got.
//!
//! Tracing is a diagnostic, opt-in: its writer is shared by the device threads behind a mutex,
//! which is the only lock a traced daemon takes per transfer (none without `--trace`).

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;
use std::sync::{Arc, Mutex};

use log::warn;
use usbmux_core::Instant;
use usbmux_sim::trace::{Direction, Entry, Record, TraceWriter};

use crate::link::{DeviceIdentity, Link, LinkError};

/// A trace file shared by all devices.
#[derive(Clone)]
pub struct SharedTrace {
    writer: Arc<Mutex<TraceWriter<BufWriter<File>>>>,
    epoch: std::time::Instant,
}

impl SharedTrace {
    /// Creates (truncates) `path`, mode 0600.
    pub fn create(path: &Path) -> io::Result<SharedTrace> {
        let w = TraceWriter::create(path)?;
        Ok(SharedTrace {
            writer: Arc::new(Mutex::new(w)),
            epoch: std::time::Instant::now(),
        })
    }

    fn record(&self, phone: u32, entry: Entry) {
        let micros = self.epoch.elapsed().as_micros() as u64;
        let Ok(mut w) = self.writer.lock() else {
            return;
        };
        if let Err(e) = w.write(&Record {
            phone,
            micros,
            entry,
        }) {
            warn!("trace: {e}");
        }
    }

    /// Writes buffered records out.
    pub fn flush(&self) {
        if let Ok(mut w) = self.writer.lock() {
            let _ = w.flush();
        }
    }

    /// Records an OUT packet of `phone` (when there is one to show) and, if it has one, its ZLP.
    fn record_out(&self, phone: u32, packet: Option<&[u8]>, zlp: bool) {
        if let Some(packet) = packet {
            self.record(phone, Entry::transfer(Direction::Out, packet));
        }
        if zlp {
            self.record(
                phone,
                Entry::Zlp {
                    direction: Direction::Out,
                },
            );
        }
    }

    /// Records the end of `phone`'s link with its error.
    fn record_unplug(&self, phone: u32, e: &LinkError) {
        self.record(
            phone,
            Entry::Unplug {
                reason: e.to_string(),
            },
        );
    }
}

/// A link whose every transfer is recorded.
pub struct Traced {
    inner: Box<dyn Link>,
    trace: SharedTrace,
    phone: u32,
}

impl Traced {
    /// Wraps `inner`; records carry `phone` (the DeviceID).
    pub fn new(inner: Box<dyn Link>, trace: SharedTrace, phone: u32) -> Self {
        Traced {
            inner,
            trace,
            phone,
        }
    }
}

impl Link for Traced {
    fn identity(&self) -> &DeviceIdentity {
        self.inner.identity()
    }

    fn start(&mut self, waker: Arc<mio::Waker>) -> Result<(), LinkError> {
        self.trace.record(self.phone, Entry::Plug);
        self.inner.start(waker)
    }

    fn send(&mut self, now: Instant, transfer: &[u8], zlp: bool) -> Result<(), LinkError> {
        self.trace.record_out(self.phone, Some(transfer), zlp);
        self.inner.send(now, transfer, zlp)
    }

    fn recv(&mut self, now: Instant, buf: &mut [u8]) -> Result<Option<usize>, LinkError> {
        let r = self.inner.recv(now, buf);
        match &r {
            Ok(Some(n)) => self
                .trace
                .record(self.phone, Entry::transfer(Direction::In, &buf[..*n])),
            Err(e) => self.trace.record_unplug(self.phone, e),
            Ok(None) => {}
        }
        r
    }

    // Everything else is forwarded, so tracing does not change the data path (zero-copy
    // transfers, events handled on the device thread — without `register`/`handle_ready` a USB
    // link with inline events would never see a completion).

    fn recv_with(
        &mut self,
        now: Instant,
        scratch: &mut [u8],
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<usize>, LinkError> {
        let (trace, phone) = (&self.trace, self.phone);
        let r = self.inner.recv_with(now, scratch, &mut |bytes| {
            trace.record(phone, Entry::transfer(Direction::In, bytes));
            f(bytes);
        });
        if let Err(e) = &r {
            trace.record_unplug(phone, e);
        }
        r
    }

    fn lends_out_buffers(&self) -> bool {
        self.inner.lends_out_buffers()
    }

    fn out_buffer(&mut self) -> Option<&mut [u8]> {
        self.inner.out_buffer()
    }

    fn send_out_buffer(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        // The packet is in the inner link's buffer, which asking again returns unchanged.
        let packet = self
            .inner
            .out_buffer()
            .map(|buf| buf.get(..len).unwrap_or(buf));
        self.trace.record_out(self.phone, packet, zlp);
        self.inner.send_out_buffer(now, len, zlp)
    }

    fn hold_out_buffer(&mut self) -> Option<&mut [u8]> {
        self.inner.hold_out_buffer()
    }

    fn send_held(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        // As `send_out_buffer`: asking again returns the held buffer unchanged.
        let packet = self
            .inner
            .hold_out_buffer()
            .map(|buf| buf.get(..len).unwrap_or(buf));
        self.trace.record_out(self.phone, packet, zlp);
        self.inner.send_held(now, len, zlp)
    }

    fn release_held(&mut self) {
        self.inner.release_held();
    }

    fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> std::io::Result<()> {
        self.inner.register(registry, token)
    }

    fn handle_ready(&mut self) {
        self.inner.handle_ready();
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }

    fn end_turn(&mut self) {
        self.inner.end_turn();
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        self.trace.record(
            self.phone,
            Entry::Unplug {
                reason: "device released".into(),
            },
        );
        self.trace.flush();
    }
}
