//! In-process simulated phones as a [`Link`]: `usbmuxd --simulate N`.
//!
//! The phone (`usbmux_sim::cable::CabledPhone`) sits on a virtual cable with real bulk
//! semantics (packets of wMaxPacketSize, ZLPs, reads of at most one transfer), so the daemon's
//! framing is checked exactly as a USB phone would check it. It runs on the device thread
//! itself: a write delivers the OUT transfer to the phone at once, and whatever the phone sends
//! back is read in the same turn, so no thread and no waker are needed.

use std::sync::Arc;

use usbmux_core::Instant;
use usbmux_sim::cable::CabledPhone;
use usbmux_sim::PhoneConfig;

use crate::link::{DeviceIdentity, Link, LinkError};

/// IN reads of the simulated host: 64 KiB, larger than usbmuxd's 16 KiB (the byte-stream
/// reassembler takes any size).
const READ_LEN: usize = 64 * 1024;

/// A simulated phone plugged into the daemon in-process.
pub struct SimLink {
    phone: CabledPhone,
    identity: DeviceIdentity,
    /// The OUT transfer being built in place ([`Link::out_buffer`]), as a USB link lends its
    /// transfers: the device thread then reads client sockets straight into it, so the
    /// in-process phone runs the same data path as a USB one.
    out: Vec<u8>,
    /// The buffer set aside by [`Link::hold_out_buffer`] and whether it is held now.
    held: Vec<u8>,
    holding: bool,
}

impl SimLink {
    /// Plugs in a phone with configuration `cfg`.
    pub fn new(cfg: PhoneConfig) -> Self {
        let id = &cfg.identity;
        let identity = DeviceIdentity {
            udid: id.udid.clone(),
            usb_serial: id.usb_serial(),
            product_id: id.product_id,
            location_id: id.location_id,
            speed: id.speed,
            max_packet_size: id.max_packet_size,
        };
        SimLink {
            phone: CabledPhone::new(cfg),
            identity,
            out: vec![0; usbmux_core::usb::MAX_PACKET],
            held: Vec::new(),
            holding: false,
        }
    }
}

impl Link for SimLink {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn start(&mut self, _waker: Arc<mio::Waker>) -> Result<(), LinkError> {
        Ok(())
    }

    fn send(&mut self, now: Instant, transfer: &[u8], zlp: bool) -> Result<(), LinkError> {
        self.phone.host_write(now, transfer);
        if zlp {
            self.phone.host_write_zlp(now);
        }
        Ok(())
    }

    fn lends_out_buffers(&self) -> bool {
        true
    }

    fn out_buffer(&mut self) -> Option<&mut [u8]> {
        Some(&mut self.out)
    }

    fn send_out_buffer(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        let Some(transfer) = self.out.get(..len) else {
            return Err(LinkError::Protocol(format!(
                "an OUT transfer of {len} bytes does not fit the {}-byte buffer",
                self.out.len()
            )));
        };
        self.phone.host_write(now, transfer);
        if zlp {
            self.phone.host_write_zlp(now);
        }
        Ok(())
    }

    fn hold_out_buffer(&mut self) -> Option<&mut [u8]> {
        if !self.holding {
            self.held.resize(usbmux_core::usb::MAX_PACKET, 0);
            self.holding = true;
        }
        Some(&mut self.held)
    }

    fn send_held(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        let transfer = match self.held.get(..len) {
            Some(t) if self.holding => t,
            _ => {
                return Err(LinkError::Protocol(format!(
                    "send_held of {len} bytes without a held buffer that large"
                )))
            }
        };
        self.holding = false;
        self.phone.host_write(now, transfer);
        if zlp {
            self.phone.host_write_zlp(now);
        }
        Ok(())
    }

    fn release_held(&mut self) {
        self.holding = false;
    }

    fn recv(&mut self, now: Instant, buf: &mut [u8]) -> Result<Option<usize>, LinkError> {
        match self.phone.host_read(now, READ_LEN.min(buf.len())) {
            Some(t) => {
                let n = t.len().min(buf.len());
                buf[..n].copy_from_slice(&t[..n]);
                Ok(Some(n))
            }
            None => Ok(None),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.phone.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.phone.handle_timeout(now);
    }

    /// Nothing is put off: the phone is in process.
    fn end_turn(&mut self) {}
}
