//! [`LibusbInPool`]: the [`InPool`] of the asynchronous IN strategy over libusb's asynchronous
//! transfer API (`rusb::ffi`, i.e. libusb1-sys). **The only `unsafe` code of the crate.**
//!
//! rusb 0.9 wraps only libusb's synchronous transfers, so this module calls the C API directly:
//! `libusb_alloc_transfer`, `libusb_fill_bulk_transfer` (libusb1-sys's Rust version of the
//! inline C helper), `libusb_submit_transfer`, `libusb_cancel_transfer` and
//! `libusb_free_transfer`, with a completion callback that only records the outcome and hands
//! it to [`Completions`]. An event thread per pool runs `libusb_handle_events_timeout_completed`
//! on the device's context (rusb's safe `handle_events`), or, with inline events, the device
//! thread does (`super::libusb_events`); completions may also run on any other thread that
//! happens to handle the context's events (a synchronous OUT transfer's) — the callback does
//! not care which.
//!
//! # Ownership: why no callback ever sees freed memory
//!
//! Everything a transfer touches lives in one heap object, `Inner`: the `libusb_transfer`
//! structs, their buffers, the per-slot state, the [`Completions`] the callback reports to, and
//! an `Arc` of the rusb `DeviceHandle` the transfers were filled with (which itself holds the
//! libusb context). `Inner` is reference counted, and
//!
//! 1. **every successful submission owns one reference**: `submit` turns a clone of the `Arc`
//!    into the raw `user_data` pointer before `libusb_submit_transfer`, and takes it back only if
//!    the submission failed (then libusb will never call back). libusb calls the callback
//!    exactly once per successful submission — completed, failed, cancelled or device gone —
//!    and the callback turns `user_data` back into the `Arc` and drops it when it is done. So
//!    while a transfer is in flight or its callback runs, `Inner` (transfer, buffer, device
//!    handle, context) cannot be freed, whatever the rest of the program does;
//! 2. `Inner`'s destructor, which frees the transfers and buffers, therefore runs only when no
//!    transfer is in flight; and it never runs *inside* a callback in practice: the owner
//!    ([`LibusbInPool`]) cancels everything and waits for the callbacks to release their
//!    references before it drops its own, and if they do not come within a bound it leaks one
//!    reference on purpose (a few hundred KiB, logged) instead of freeing anything — so a late
//!    callback finds valid memory and nothing is freed or closed on libusb's event thread;
//! 3. **the buffers are never shared with the kernel and Rust at once**: a slot's state is
//!    `IN_FLIGHT` from just before submission until its callback has stored the received length
//!    (release), and [`LibusbInPool::data`] hands out the bytes only when it reads (acquire) a
//!    state other than `IN_FLIGHT`. `submit` and `data` both need `&mut LibusbInPool`, so a
//!    slice returned by `data` is gone before the slot can be submitted again. The buffers are
//!    raw allocations (usbfs mappings or leaked boxes, `super::libusb_mem`: no live `Box` or
//!    `&mut` while libusb or the kernel writes into them), freed after the transfers and before
//!    the device handle (`Inner`'s field order).

#![allow(unsafe_code)]
// Every unsafe block and impl says why it is sound; clippy holds us to it.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_int, c_uint, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusb::ffi::{self, constants as c};
use rusb::{DeviceHandle, UsbContext};

use super::async_in::{Completions, InPool, Outcome};
use super::libusb_mem::{log_mapping, PoolSpec, TransferBuffer};
use crate::link::LinkError;

/// Slot state while submitted; any other value is the length of the last completion.
const IN_FLIGHT: usize = usize::MAX;
/// How long one turn of the event thread may block: the bound on how late it notices a stop
/// when the interruption went to another thread handling the context's events.
const EVENT_TICK: Duration = Duration::from_millis(100);
/// After [`AsyncReader`](super::async_in::AsyncReader) saw every completion, how long
/// [`LibusbInPool::stop`] waits for the callbacks to return and release their references.
const RELEASE_WAIT: Duration = Duration::from_millis(200);
/// Largest transfer we submit (libusb's `length` is a C int; usbfs limits far lower anyway).
const MAX_TRANSFER: usize = 16 << 20;

struct Slot {
    /// From `libusb_alloc_transfer`, freed by `Inner::drop`.
    transfer: NonNull<ffi::libusb_transfer>,
    /// `Inner::buffer_len` bytes, usbfs-mapped or heap; freed when `Inner` drops, after
    /// the transfers and before the device handle.
    buffer: TransferBuffer,
    /// `IN_FLIGHT`, or the length received by the last completion (0 before the first).
    state: AtomicUsize,
}

/// What the transfers point at; see the module docs for who owns it when.
struct Inner {
    slots: Box<[Slot]>,
    buffer_len: usize,
    completions: Arc<Completions>,
    /// The handle the transfers were filled with: open for as long as a transfer exists.
    _device: Arc<dyn Send + Sync>,
}

// SAFETY: `Inner` is shared between the owning `LibusbInPool` (one thread at a time, `&mut`)
// and the completion callback (whichever thread handles libusb events). The raw pointers are
// used as follows: a slot's `libusb_transfer` is written by the owner only while it is not in
// flight (filling, `user_data`, then submit) and read by the callback only for the transfer
// that is completing; libusb's own functions on it are thread-safe. A buffer is written only
// by libusb/the kernel while in flight and read only by the owner while not in flight, which
// the atomic `state` (release in the callback, acquire in `data`) orders. Everything else is
// `Send + Sync` itself.
unsafe impl Send for Inner {}
// SAFETY: as for `Send` above.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            // SAFETY: `Inner` is dropped only when no reference is left, and every transfer in
            // flight (or whose callback is running) holds one, so no transfer is in flight. The
            // transfer came from `libusb_alloc_transfer` and is freed exactly once, here; it
            // has no FREE_BUFFER/FREE_TRANSFER flags, so libusb does not free anything itself.
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
            log::error!("USB: completion of an unknown IN transfer ignored");
            return;
        };
        let outcome = match status {
            c::LIBUSB_TRANSFER_COMPLETED => {
                Outcome::Data(usize::try_from(actual).unwrap_or(0).min(self.buffer_len))
            }
            c::LIBUSB_TRANSFER_CANCELLED => Outcome::Cancelled,
            c::LIBUSB_TRANSFER_NO_DEVICE => Outcome::Failed(rusb::Error::NoDevice),
            c::LIBUSB_TRANSFER_STALL => Outcome::Failed(rusb::Error::Pipe),
            c::LIBUSB_TRANSFER_OVERFLOW => Outcome::Failed(rusb::Error::Overflow),
            c::LIBUSB_TRANSFER_TIMED_OUT => Outcome::Failed(rusb::Error::Timeout),
            _ => Outcome::Failed(rusb::Error::Io),
        };
        let len = match outcome {
            Outcome::Data(len) => len,
            _ => 0,
        };
        // Release: the bytes libusb wrote are visible to whoever reads this state (acquire).
        self.slots[index].state.store(len, Ordering::Release);
        self.completions.completed(index, outcome);
    }
}

/// libusb's completion callback for every transfer of every pool.
extern "system" fn on_complete(transfer: *mut ffi::libusb_transfer) {
    // SAFETY: libusb passes the transfer that completed; it was allocated by
    // `libusb_alloc_transfer` and is alive (its `Inner` is kept by the reference `user_data`
    // carries, point 1 of the module docs). It is no longer in flight, so reading its fields
    // races with nothing.
    let (user_data, status, actual) = unsafe {
        (
            (*transfer).user_data,
            (*transfer).status,
            (*transfer).actual_length,
        )
    };
    // SAFETY: `user_data` is the `Arc::into_raw` that `LibusbInPool::submit` made for this
    // submission; libusb calls back exactly once per successful submission, so this takes that
    // reference back exactly once.
    let inner = unsafe { Arc::from_raw(user_data.cast_const().cast::<Inner>()) };
    inner.complete(transfer, status, actual);
    // `inner` drops here: the last use of anything this submission kept alive.
}

pub(super) fn error_from_libusb(code: c_int) -> rusb::Error {
    match code {
        c::LIBUSB_ERROR_IO => rusb::Error::Io,
        c::LIBUSB_ERROR_INVALID_PARAM => rusb::Error::InvalidParam,
        c::LIBUSB_ERROR_ACCESS => rusb::Error::Access,
        c::LIBUSB_ERROR_NO_DEVICE => rusb::Error::NoDevice,
        c::LIBUSB_ERROR_NOT_FOUND => rusb::Error::NotFound,
        c::LIBUSB_ERROR_BUSY => rusb::Error::Busy,
        c::LIBUSB_ERROR_TIMEOUT => rusb::Error::Timeout,
        c::LIBUSB_ERROR_OVERFLOW => rusb::Error::Overflow,
        c::LIBUSB_ERROR_PIPE => rusb::Error::Pipe,
        c::LIBUSB_ERROR_INTERRUPTED => rusb::Error::Interrupted,
        c::LIBUSB_ERROR_NO_MEM => rusb::Error::NoMem,
        c::LIBUSB_ERROR_NOT_SUPPORTED => rusb::Error::NotSupported,
        _ => rusb::Error::Other,
    }
}

/// `count` bulk IN transfers of `buffer_len` bytes each on endpoint `endpoint` of an open,
/// claimed device, with an event thread of their own. See the module docs.
pub(crate) struct LibusbInPool<T: UsbContext + 'static> {
    inner: Arc<Inner>,
    context: T,
    name: String,
    /// Run an event thread (false: the device thread handles the events inline).
    own_events: bool,
    stop: Arc<AtomicBool>,
    events: Option<JoinHandle<()>>,
    /// `InPool::stop` has run.
    stopped: bool,
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
        let PoolSpec {
            endpoint,
            count,
            buffer_len,
            own_events,
            usbfs_buffers,
            name,
        } = spec;
        let buffer_len = buffer_len.clamp(1, MAX_TRANSFER);
        let length = c_int::try_from(buffer_len).map_err(|_| rusb::Error::InvalidParam)?;
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
                state: AtomicUsize::new(0),
            });
        }
        let inner = Arc::new(Inner {
            slots: slots.into_boxed_slice(),
            buffer_len,
            completions,
            _device: device,
        });
        let buffers: Vec<&TransferBuffer> = inner.slots.iter().map(|s| &s.buffer).collect();
        log_mapping("IN", name, &buffers);
        let user_data = Arc::as_ptr(&inner).cast_mut().cast::<c_void>();
        for slot in inner.slots.iter() {
            // SAFETY: the transfer is freshly allocated and not submitted; `handle` stays open
            // as long as `inner` (it holds the `DeviceHandle`); the buffer has `length` bytes
            // and lives as long as `inner`; `user_data` is only dereferenced by `on_complete`
            // for a submission that owns a reference to `inner`. No flags: short transfers are
            // normal (a mux packet ends), libusb frees nothing. Timeout 0 = none.
            unsafe {
                ffi::libusb_fill_bulk_transfer(
                    slot.transfer.as_ptr(),
                    handle,
                    endpoint,
                    slot.buffer.as_ptr(),
                    length,
                    on_complete,
                    user_data,
                    0 as c_uint,
                );
                (*slot.transfer.as_ptr()).flags = 0;
            }
        }
        Ok(LibusbInPool {
            inner,
            context,
            name: name.to_owned(),
            own_events,
            stop: Arc::new(AtomicBool::new(false)),
            events: None,
            stopped: false,
        })
    }

    fn stop_events(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.context.interrupt_handle_events();
        if let Some(thread) = self.events.take() {
            if thread.join().is_err() {
                log::error!("USB event thread of {} panicked", self.name);
            }
        }
    }
}

/// Frees what `LibusbInPool::new` allocated before a later allocation failed.
fn free_partial(slots: Vec<Slot>) {
    for slot in slots {
        // SAFETY: allocated by `libusb_alloc_transfer`, never submitted, freed once.
        unsafe { ffi::libusb_free_transfer(slot.transfer.as_ptr()) };
        drop(slot.buffer);
    }
}

impl<T: UsbContext + 'static> InPool for LibusbInPool<T> {
    fn slots(&self) -> usize {
        self.inner.slots.len()
    }

    fn start(&mut self) -> Result<(), LinkError> {
        if !self.own_events || self.events.is_some() {
            return Ok(());
        }
        let (context, stop) = (self.context.clone(), Arc::clone(&self.stop));
        let thread = std::thread::Builder::new()
            .name(format!("usb-ev {}", self.name))
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

    fn submit(&mut self, slot: usize) -> Result<(), rusb::Error> {
        let Some(s) = self.inner.slots.get(slot) else {
            return Err(rusb::Error::InvalidParam);
        };
        if s.state.swap(IN_FLIGHT, Ordering::AcqRel) == IN_FLIGHT {
            return Err(rusb::Error::Busy);
        }
        // This submission's reference to `Inner` (module docs, point 1); its pointer is the
        // `user_data` filled in at creation.
        let reference = Arc::into_raw(Arc::clone(&self.inner));
        // SAFETY: the transfer is valid (owned by `inner`) and not in flight (state was not
        // IN_FLIGHT and only `&mut self` submits); it was filled in `new`.
        let rc = unsafe { ffi::libusb_submit_transfer(s.transfer.as_ptr()) };
        if rc != 0 {
            // SAFETY: the submission failed, so libusb will not call back: the reference made
            // above is still ours to take back, exactly once.
            drop(unsafe { Arc::from_raw(reference) });
            s.state.store(0, Ordering::Release);
            return Err(error_from_libusb(rc));
        }
        Ok(())
    }

    fn data(&mut self, slot: usize) -> &[u8] {
        let Some(s) = self.inner.slots.get(slot) else {
            return &[];
        };
        let len = s.state.load(Ordering::Acquire);
        if len == IN_FLIGHT {
            return &[];
        }
        // SAFETY: the slot is not in flight (acquire pairs with the callback's release, so the
        // received bytes are visible), and it cannot be submitted while the returned borrow of
        // `self` lives; the buffer has `buffer_len` ≥ `len` initialised bytes (zeroed heap
        // memory, or mapped kernel memory; `len` clamped by the callback) and lives as long as `self.inner`.
        unsafe { std::slice::from_raw_parts(s.buffer.as_ptr(), len.min(self.inner.buffer_len)) }
    }

    fn cancel(&mut self, slot: usize) {
        let Some(s) = self.inner.slots.get(slot) else {
            return;
        };
        if s.state.load(Ordering::Acquire) != IN_FLIGHT {
            return;
        }
        // SAFETY: the transfer is valid (owned by `inner`, which we hold). Cancelling one that
        // has completed meanwhile is allowed (libusb answers NOT_FOUND); a cancelled transfer
        // still gets its callback, which releases its reference.
        let rc = unsafe { ffi::libusb_cancel_transfer(s.transfer.as_ptr()) };
        if rc != 0 && rc != c::LIBUSB_ERROR_NOT_FOUND {
            log::debug!(
                "USB {}: cancelling IN transfer {slot}: {}",
                self.name,
                error_from_libusb(rc)
            );
        }
    }

    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        // The callbacks have reported (or the reader gave up waiting); let them return and
        // drop their references while the event thread still runs.
        let deadline = Instant::now() + RELEASE_WAIT;
        while Arc::strong_count(&self.inner) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop_events();
        if Arc::strong_count(&self.inner) > 1 {
            log::error!(
                "USB {}: IN transfers never completed after cancel; keeping their memory (and \
                 the device handle) allocated for good rather than freeing it under them",
                self.name
            );
            std::mem::forget(Arc::clone(&self.inner));
        }
    }
}

impl<T: UsbContext + 'static> Drop for LibusbInPool<T> {
    fn drop(&mut self) {
        // Normally `stop` already ran (AsyncReader::close); this covers a pool dropped
        // without it.
        self.stop();
    }
}
