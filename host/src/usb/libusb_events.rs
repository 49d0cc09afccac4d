//! [`LibusbEvents`]: the [`EventPump`] over one phone's libusb context, for
//! [`EventStrategy::Inline`](super::EventStrategy::Inline) — the device thread handles the
//! context's events itself, from its mio loop, instead of an event thread doing it. `unsafe`
//! code: rusb 0.9 does not wrap `libusb_get_pollfds`.
//!
//! Why it is enough to watch these descriptors: each phone has a libusb context of its own
//! (`super::device::open_in_own_context`), whose descriptors are libusb's internal event
//! descriptor (hotplug and device-gone messages, interruptions), its timer descriptor (transfer
//! timeouts; ours have none) and the phone's usbfs descriptor, which the kernel makes writable
//! when a URB has completed. libusb reports on Linux that the timer descriptor covers its
//! timeouts (`libusb_pollfds_handle_timeouts`), so nothing is due without one of them firing.
//! The set is fixed after the device is open: the watcher's hotplug context is a different one.
//! mio's registrations are edge-triggered; that is sound here because one `pump(0)` handles
//! everything libusb finds ready (it polls the descriptors itself and reaps every completed URB
//! of the device), and every new completion wakes the descriptor's queue again.

#![allow(unsafe_code)]
// Every unsafe block and impl says why it is sound; clippy holds us to it.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::os::fd::RawFd;
use std::time::Duration;

use rusb::ffi;
use rusb::UsbContext;

use super::async_in::EventPump;

/// A context whose events the caller handles on its own thread.
pub(crate) struct LibusbEvents<T: UsbContext> {
    context: T,
}

impl<T: UsbContext> LibusbEvents<T> {
    /// The pump of `context`. Nothing else may handle this context's events regularly (no event
    /// thread, no synchronous transfers), or completions would run there and the device
    /// thread, which skips waking itself when inline, would not learn of them.
    pub(crate) fn new(context: T) -> LibusbEvents<T> {
        LibusbEvents { context }
    }
}

impl<T: UsbContext + 'static> EventPump for LibusbEvents<T> {
    fn pump(&self, timeout: Duration) {
        if let Err(e) = self.context.handle_events(Some(timeout)) {
            // Only EINTR-like failures of poll(2) come back here; the next pump retries.
            log::debug!("USB: handling libusb events: {e}");
        }
    }

    fn fds(&self) -> Vec<(RawFd, bool)> {
        let ctx = self.context.as_raw();
        // SAFETY: `ctx` is a live context (we hold it). The call returns a NULL-terminated array
        // of pointers to `libusb_pollfd`, or NULL on failure, which we free with
        // `libusb_free_pollfds` exactly once, below, after the last read.
        let list = unsafe { ffi::libusb_get_pollfds(ctx) };
        if list.is_null() {
            log::warn!("USB: libusb did not list its file descriptors");
            return Vec::new();
        }
        let mut out = Vec::new();
        // Bounded: libusb's list of one context holds a handful of entries.
        for i in 0..1024 {
            // SAFETY: the array is NULL-terminated and `i` stops at the first NULL, so every
            // index read is within it.
            let entry = unsafe { *list.add(i) };
            if entry.is_null() {
                break;
            }
            // SAFETY: a non-NULL entry of the array points at a `libusb_pollfd` that stays valid
            // until `libusb_free_pollfds`.
            let (fd, events) = unsafe { ((*entry).fd, (*entry).events) };
            out.push((fd, events & POLLOUT != 0));
        }
        // SAFETY: `list` came from `libusb_get_pollfds` and is freed once; nothing read from it
        // is used afterwards (the values were copied).
        unsafe { ffi::libusb_free_pollfds(list) };
        out
    }
}

/// `POLLOUT` of poll(2) (the same value on every Linux architecture and the BSDs).
const POLLOUT: i16 = 0x004;
