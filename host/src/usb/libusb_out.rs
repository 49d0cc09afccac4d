//! [`LibusbOutPool`]: the [`OutPool`] of the asynchronous OUT strategy over libusb's
//! asynchronous transfer API — a [`TransferPool`] of bulk OUT transfers (`super::libusb_pool`,
//! which holds the `unsafe` code, its ownership and soundness argument, and the event thread;
//! the sibling of [`super::libusb_in`]) plus what is OUT's own: the device thread builds a
//! packet in place in a free slot's buffer ([`OutPool::buffer`]), each submission sends a
//! given length, followed by a zero-length packet when asked
//! (`LIBUSB_TRANSFER_ADD_ZERO_PACKET`), and a completion is reported to [`OutCompletions`] as
//! an [`OutOutcome`].
//!
//! Completions are handled by whichever thread handles the context's events: the asynchronous
//! IN pool's event thread when IN is asynchronous (one event thread per link, no hand-over
//! between two), the device thread with inline events, else an event thread of this pool's
//! own.

use std::sync::Arc;

use rusb::ffi::constants as c;
use rusb::{DeviceHandle, UsbContext};

use super::async_out::{OutCompletions, OutOutcome, OutPool};
use super::libusb_mem::PoolSpec;
use super::libusb_pool::{End, Sink, TransferPool};
use crate::link::LinkError;

impl Sink for OutCompletions {
    const DIRECTION: &'static str = "OUT";
    const EVENT_THREAD: &'static str = "usb-ev-out";

    fn transfer_ended(&self, slot: usize, end: End, _buffer_len: usize) {
        let outcome = match end {
            End::Completed(len) => OutOutcome::Sent(len),
            End::Cancelled => OutOutcome::Cancelled,
            End::Failed(e) => OutOutcome::Failed(e),
        };
        self.completed(slot, outcome);
    }
}

/// `count` bulk OUT transfers of up to `buffer_len` bytes each on endpoint `endpoint` of an
/// open, claimed device. See the module docs.
pub(crate) struct LibusbOutPool<T: UsbContext + 'static> {
    pool: TransferPool<T, OutCompletions>,
}

impl<T: UsbContext + 'static> LibusbOutPool<T> {
    /// Allocates the transfers and buffers (nothing is submitted): usbfs-mapped buffers when
    /// `usbfs_buffers` and the kernel grants them (`super::libusb_mem`).
    pub(crate) fn new(
        device: Arc<DeviceHandle<T>>,
        spec: PoolSpec<'_>,
        completions: Arc<OutCompletions>,
    ) -> Result<LibusbOutPool<T>, rusb::Error> {
        Ok(LibusbOutPool {
            pool: TransferPool::new(device, spec, completions)?,
        })
    }
}

impl<T: UsbContext + 'static> OutPool for LibusbOutPool<T> {
    fn slots(&self) -> usize {
        self.pool.slots()
    }

    fn capacity(&self) -> usize {
        self.pool.buffer_len()
    }

    fn start(&mut self) -> Result<(), LinkError> {
        self.pool.start()
    }

    fn buffer(&mut self, slot: usize) -> &mut [u8] {
        match self.pool.buffer(slot) {
            Some((bytes, _)) => bytes,
            None => &mut [],
        }
    }

    fn submit(&mut self, slot: usize, len: usize, zlp: bool) -> Result<(), rusb::Error> {
        let flags = if zlp {
            c::LIBUSB_TRANSFER_ADD_ZERO_PACKET
        } else {
            0
        };
        self.pool.submit(slot, len, flags)
    }

    fn cancel(&mut self, slot: usize) {
        self.pool.cancel(slot);
    }

    fn stop(&mut self) {
        self.pool.stop();
    }
}
