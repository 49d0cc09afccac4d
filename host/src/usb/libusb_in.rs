//! [`LibusbInPool`]: the [`InPool`] of the asynchronous IN strategy over libusb's asynchronous
//! transfer API — a [`TransferPool`] of bulk IN transfers (`super::libusb_pool`, which holds
//! the `unsafe` code, its ownership and soundness argument, and the event thread) plus what is
//! IN's own: every submission offers the slot's whole buffer, a completion is reported to
//! [`Completions`] as an [`Outcome`] (its length clamped to the buffer), and
//! [`InPool::data`] hands out the received bytes in place, in the transfer's own buffer, while
//! the slot is not in flight.

use std::sync::Arc;

use rusb::{DeviceHandle, UsbContext};

use super::async_in::{Completions, InPool, Outcome};
use super::libusb_mem::PoolSpec;
use super::libusb_pool::{End, Sink, TransferPool};
use crate::link::LinkError;

/// Largest transfer we submit (libusb's `length` is a C int; usbfs limits far lower anyway).
const MAX_TRANSFER: usize = 16 << 20;

impl Sink for Completions {
    const DIRECTION: &'static str = "IN";
    const EVENT_THREAD: &'static str = "usb-ev";

    fn transfer_ended(&self, slot: usize, end: End, buffer_len: usize) {
        let outcome = match end {
            End::Completed(len) => Outcome::Data(len.min(buffer_len)),
            End::Cancelled => Outcome::Cancelled,
            End::Failed(e) => Outcome::Failed(e),
        };
        self.completed(slot, outcome);
    }
}

/// `count` bulk IN transfers of `buffer_len` bytes each on endpoint `endpoint` of an open,
/// claimed device, with an event thread of their own unless events are handled elsewhere.
/// See the module docs.
pub(crate) struct LibusbInPool<T: UsbContext + 'static> {
    pool: TransferPool<T, Completions>,
}

impl<T: UsbContext + 'static> LibusbInPool<T> {
    /// Allocates the transfers and buffers (nothing is submitted yet): usbfs-mapped buffers
    /// when `usbfs_buffers` and the kernel grants them (`super::libusb_mem`). `name` labels
    /// the event thread and log lines.
    pub(crate) fn new(
        device: Arc<DeviceHandle<T>>,
        spec: PoolSpec<'_>,
        completions: Arc<Completions>,
    ) -> Result<LibusbInPool<T>, rusb::Error> {
        let spec = PoolSpec {
            buffer_len: spec.buffer_len.clamp(1, MAX_TRANSFER),
            ..spec
        };
        Ok(LibusbInPool {
            pool: TransferPool::new(device, spec, completions)?,
        })
    }
}

impl<T: UsbContext + 'static> InPool for LibusbInPool<T> {
    fn slots(&self) -> usize {
        self.pool.slots()
    }

    fn start(&mut self) -> Result<(), LinkError> {
        self.pool.start()
    }

    fn submit(&mut self, slot: usize) -> Result<(), rusb::Error> {
        // The whole buffer, no flags: short transfers are normal (a mux packet ends).
        let len = self.pool.buffer_len();
        self.pool.submit(slot, len, 0)
    }

    fn data(&mut self, slot: usize) -> &[u8] {
        match self.pool.buffer(slot) {
            Some((bytes, len)) => {
                let bytes: &[u8] = bytes;
                bytes.get(..len).unwrap_or_default()
            }
            None => &[],
        }
    }

    fn cancel(&mut self, slot: usize) {
        self.pool.cancel(slot);
    }

    fn stop(&mut self) {
        self.pool.stop();
    }
}
