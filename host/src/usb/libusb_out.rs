//! [`LibusbOutPool`]: the [`OutPool`] of the asynchronous OUT strategy over libusb's
//! asynchronous transfer API (`rusb::ffi`). `unsafe` code, the sibling of [`super::libusb_in`],
//! and built on the same ownership design (read that module's docs first):
//!
//! 1. all a transfer touches (the `libusb_transfer` structs, their buffers, the
//!    [`OutCompletions`], an `Arc` of the device handle) lives in one reference-counted `Inner`,
//!    and **every successful submission owns one reference**, taken back by the completion
//!    callback (or by `submit` itself when the submission failed). So `Inner` cannot be freed
//!    while a transfer is in flight or its callback runs;
//! 2. [`OutPool::stop`] waits (bounded) for the callbacks to release their references and leaks
//!    one reference on purpose if they never do, instead of freeing memory under a transfer;
//! 3. **a buffer is written by Rust only while its slot is not in flight**: a slot's flag is set
//!    before submission and cleared by the callback (release) before it reports the completion,
//!    and `submit` refuses a slot whose flag is still set. `submit` needs `&mut self`.
//!
//! Completions are handled by whichever thread handles the context's events: the asynchronous
//! IN pool's event thread when IN is asynchronous (one event thread per link, no hand-over
//! between two), else an event thread of this pool's own.

#![allow(unsafe_code)]
// Every unsafe block and impl says why it is sound; clippy holds us to it.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_int, c_uint, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusb::ffi::{self, constants as c};
use rusb::{DeviceHandle, UsbContext};

use super::async_out::{OutCompletions, OutOutcome, OutPool};
use super::libusb_in::error_from_libusb;
use super::libusb_mem::{log_mapping, PoolSpec, TransferBuffer};
use crate::link::LinkError;

/// How long one turn of the own event thread may block (bound on noticing a stop).
const EVENT_TICK: Duration = Duration::from_millis(100);
/// How long [`OutPool::stop`] waits for the callbacks to release their references.
const RELEASE_WAIT: Duration = Duration::from_millis(200);

struct Slot {
    /// From `libusb_alloc_transfer`, freed by `Inner::drop`.
    transfer: NonNull<ffi::libusb_transfer>,
    /// `Inner::buffer_len` bytes, usbfs-mapped or heap; freed when `Inner` drops, after
    /// the transfers and before the device handle.
    buffer: TransferBuffer,
    /// Submitted and its callback has not cleared it yet.
    in_flight: AtomicBool,
}

/// What the transfers point at; see the module docs for who owns it when.
struct Inner {
    slots: Box<[Slot]>,
    buffer_len: usize,
    completions: Arc<OutCompletions>,
    /// The handle the transfers were filled with: open for as long as a transfer exists.
    _device: Arc<dyn Send + Sync>,
}

// SAFETY: `Inner` is shared between the owning pool (the device thread, `&mut`) and the
// completion callback (any thread handling libusb events). A slot's transfer and buffer are
// written by the owner only while the slot is not in flight (the atomic flag, set before
// submission and cleared by the callback with release, read by `submit` with acquire), and
// read by libusb/the kernel only while it is; libusb's own functions are thread-safe.
// Everything else is `Send + Sync` itself.
unsafe impl Send for Inner {}
// SAFETY: as for `Send` above.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            // SAFETY: `Inner` is dropped only when no reference is left, and every submission
            // in flight (or whose callback runs) holds one, so no transfer is in flight. The
            // transfer came from `libusb_alloc_transfer`, has no FREE flags, and is freed once.
            unsafe { ffi::libusb_free_transfer(slot.transfer.as_ptr()) };
        }
    }
}

impl Inner {
    /// The completion callback's work, on safe ground.
    fn complete(&self, transfer: *mut ffi::libusb_transfer, status: c_int, actual: c_int) {
        let Some(index) = self
            .slots
            .iter()
            .position(|s| s.transfer.as_ptr() == transfer)
        else {
            log::error!("USB: completion of an unknown OUT transfer ignored");
            return;
        };
        let outcome = match status {
            c::LIBUSB_TRANSFER_COMPLETED => OutOutcome::Sent(usize::try_from(actual).unwrap_or(0)),
            c::LIBUSB_TRANSFER_CANCELLED => OutOutcome::Cancelled,
            c::LIBUSB_TRANSFER_NO_DEVICE => OutOutcome::Failed(rusb::Error::NoDevice),
            c::LIBUSB_TRANSFER_STALL => OutOutcome::Failed(rusb::Error::Pipe),
            c::LIBUSB_TRANSFER_OVERFLOW => OutOutcome::Failed(rusb::Error::Overflow),
            c::LIBUSB_TRANSFER_TIMED_OUT => OutOutcome::Failed(rusb::Error::Timeout),
            _ => OutOutcome::Failed(rusb::Error::Io),
        };
        // Free the slot before reporting: the report may let the sender reuse it at once.
        self.slots[index].in_flight.store(false, Ordering::Release);
        self.completions.completed(index, outcome);
    }
}

/// libusb's completion callback for every OUT transfer.
extern "system" fn on_complete(transfer: *mut ffi::libusb_transfer) {
    // SAFETY: libusb passes the transfer that completed; it is alive (its `Inner` is kept by
    // the reference `user_data` carries) and no longer in flight, so reading it races nothing.
    let (user_data, status, actual) = unsafe {
        (
            (*transfer).user_data,
            (*transfer).status,
            (*transfer).actual_length,
        )
    };
    // SAFETY: `user_data` is the `Arc::into_raw` `LibusbOutPool::submit` made for this
    // submission; libusb calls back exactly once per successful submission.
    let inner = unsafe { Arc::from_raw(user_data.cast_const().cast::<Inner>()) };
    inner.complete(transfer, status, actual);
}

/// `count` bulk OUT transfers of up to `buffer_len` bytes each on endpoint `endpoint` of an
/// open, claimed device. See the module docs.
pub(crate) struct LibusbOutPool<T: UsbContext + 'static> {
    inner: Arc<Inner>,
    context: T,
    name: String,
    /// Run an event thread of our own (no asynchronous IN pool handles the context's events).
    own_events: bool,
    stop: Arc<AtomicBool>,
    events: Option<JoinHandle<()>>,
    stopped: bool,
}

impl<T: UsbContext + 'static> LibusbOutPool<T> {
    /// Allocates the transfers and buffers (nothing is submitted): usbfs-mapped buffers when
    /// `usbfs_buffers` and the kernel grants them (`super::libusb_mem`).
    pub(crate) fn new(
        device: Arc<DeviceHandle<T>>,
        spec: PoolSpec<'_>,
        completions: Arc<OutCompletions>,
    ) -> Result<LibusbOutPool<T>, rusb::Error> {
        let PoolSpec {
            endpoint,
            count,
            buffer_len,
            own_events,
            usbfs_buffers,
            name,
        } = spec;
        let buffer_len = buffer_len.max(1);
        c_int::try_from(buffer_len).map_err(|_| rusb::Error::InvalidParam)?;
        let handle = device.as_raw();
        let context = device.context().clone();
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count.max(1) {
            // SAFETY: plain allocation (0 isochronous packets); null on failure, checked.
            let raw = unsafe { ffi::libusb_alloc_transfer(0) };
            let Some(transfer) = NonNull::new(raw) else {
                free_partial(slots);
                return Err(rusb::Error::NoMem);
            };
            slots.push(Slot {
                transfer,
                buffer: TransferBuffer::new(handle, buffer_len, usbfs_buffers),
                in_flight: AtomicBool::new(false),
            });
        }
        let inner = Arc::new(Inner {
            slots: slots.into_boxed_slice(),
            buffer_len,
            completions,
            _device: device,
        });
        let buffers: Vec<&TransferBuffer> = inner.slots.iter().map(|s| &s.buffer).collect();
        log_mapping("OUT", name, &buffers);
        let user_data = Arc::as_ptr(&inner).cast_mut().cast::<c_void>();
        for slot in inner.slots.iter() {
            // SAFETY: the transfer is freshly allocated and not submitted; `handle` stays open
            // as long as `inner`; the buffer lives as long as `inner`; `user_data` is only
            // dereferenced by `on_complete` for a submission owning a reference. Length and
            // flags are set per submission. Timeout 0 = none (a timed-out OUT transfer could
            // leave the phone half a packet).
            unsafe {
                ffi::libusb_fill_bulk_transfer(
                    slot.transfer.as_ptr(),
                    handle,
                    endpoint,
                    slot.buffer.as_ptr(),
                    0,
                    on_complete,
                    user_data,
                    0 as c_uint,
                );
                (*slot.transfer.as_ptr()).flags = 0;
            }
        }
        Ok(LibusbOutPool {
            inner,
            context,
            name: name.to_owned(),
            own_events,
            stop: Arc::new(AtomicBool::new(false)),
            events: None,
            stopped: false,
        })
    }
}

/// Frees what `LibusbOutPool::new` allocated before a later allocation failed.
fn free_partial(slots: Vec<Slot>) {
    for slot in slots {
        // SAFETY: allocated by `libusb_alloc_transfer`, never submitted, freed once.
        unsafe { ffi::libusb_free_transfer(slot.transfer.as_ptr()) };
        drop(slot.buffer);
    }
}

impl<T: UsbContext + 'static> OutPool for LibusbOutPool<T> {
    fn slots(&self) -> usize {
        self.inner.slots.len()
    }

    fn capacity(&self) -> usize {
        self.inner.buffer_len
    }

    fn start(&mut self) -> Result<(), LinkError> {
        if !self.own_events || self.events.is_some() {
            return Ok(());
        }
        let (context, stop) = (self.context.clone(), Arc::clone(&self.stop));
        let thread = std::thread::Builder::new()
            .name(format!("usb-ev-out {}", self.name))
            .spawn(move || {
                let mut logged = false;
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = context.handle_events(Some(EVENT_TICK)) {
                        if !logged {
                            log::warn!("USB event handling failed: {e}");
                            logged = true;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
            .map_err(|source| LinkError::Io {
                what: "spawning the USB event thread",
                source,
            })?;
        self.events = Some(thread);
        Ok(())
    }

    fn buffer(&mut self, slot: usize) -> &mut [u8] {
        let Some(s) = self.inner.slots.get(slot) else {
            return &mut [];
        };
        if s.in_flight.load(Ordering::Acquire) {
            return &mut [];
        }
        // SAFETY: the slot is not in flight (acquire orders us after the callback that cleared
        // the flag), so neither libusb nor the kernel uses the buffer, and it cannot be
        // submitted while the returned borrow of `self` lives (`submit` needs `&mut self`);
        // no other reference to it exists (only the pool reads or writes buffers, through
        // `&mut self`). It has `buffer_len` initialised bytes and lives as long as `inner`.
        unsafe { std::slice::from_raw_parts_mut(s.buffer.as_ptr(), self.inner.buffer_len) }
    }

    fn submit(&mut self, slot: usize, len: usize, zlp: bool) -> Result<(), rusb::Error> {
        let Some(s) = self.inner.slots.get(slot) else {
            return Err(rusb::Error::InvalidParam);
        };
        if len > self.inner.buffer_len {
            return Err(rusb::Error::InvalidParam);
        }
        let length = c_int::try_from(len).map_err(|_| rusb::Error::InvalidParam)?;
        if s.in_flight.swap(true, Ordering::AcqRel) {
            return Err(rusb::Error::Busy);
        }
        // SAFETY: the slot was not in flight (the flag was clear) and only `&mut self` submits,
        // so libusb does not use the transfer; `len` ≤ `buffer_len` (checked above).
        unsafe {
            let t = s.transfer.as_ptr();
            (*t).length = length;
            (*t).flags = if zlp {
                c::LIBUSB_TRANSFER_ADD_ZERO_PACKET
            } else {
                0
            };
        }
        // This submission's reference to `Inner` (module docs, point 1).
        let reference = Arc::into_raw(Arc::clone(&self.inner));
        // SAFETY: the transfer is valid (owned by `inner`), filled in `new` and above, and not
        // in flight.
        let rc = unsafe { ffi::libusb_submit_transfer(s.transfer.as_ptr()) };
        if rc != 0 {
            // SAFETY: the submission failed, so libusb will not call back: the reference made
            // above is still ours to take back, exactly once.
            drop(unsafe { Arc::from_raw(reference) });
            s.in_flight.store(false, Ordering::Release);
            return Err(error_from_libusb(rc));
        }
        Ok(())
    }

    fn cancel(&mut self, slot: usize) {
        let Some(s) = self.inner.slots.get(slot) else {
            return;
        };
        if !s.in_flight.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the transfer is valid (owned by `inner`, which we hold). Cancelling one that
        // completed meanwhile is allowed (NOT_FOUND); a cancelled transfer still gets its
        // callback, which releases its reference.
        let rc = unsafe { ffi::libusb_cancel_transfer(s.transfer.as_ptr()) };
        if rc != 0 && rc != c::LIBUSB_ERROR_NOT_FOUND {
            log::debug!(
                "USB {}: cancelling OUT transfer {slot}: {}",
                self.name,
                error_from_libusb(rc)
            );
        }
    }

    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let deadline = Instant::now() + RELEASE_WAIT;
        while Arc::strong_count(&self.inner) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.events.take() {
            self.context.interrupt_handle_events();
            if thread.join().is_err() {
                log::error!("USB OUT event thread of {} panicked", self.name);
            }
        }
        if Arc::strong_count(&self.inner) > 1 {
            log::error!(
                "USB {}: OUT transfers never completed after cancel; keeping their memory (and \
                 the device handle) allocated for good rather than freeing it under them",
                self.name
            );
            std::mem::forget(Arc::clone(&self.inner));
        }
    }
}

impl<T: UsbContext + 'static> Drop for LibusbOutPool<T> {
    fn drop(&mut self) {
        self.stop();
    }
}
