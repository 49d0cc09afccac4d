//! [`TransferPool`]: a fixed set of libusb asynchronous bulk transfers on one endpoint, their
//! buffers and, when asked, an event thread — everything of [`super::libusb_in`] (the
//! [`InPool`](super::async_in::InPool)) and [`super::libusb_out`] (the
//! [`OutPool`](super::async_out::OutPool)) that does not depend on the direction. Those two
//! add only where completions go (a [`Sink`]) and what a slot's bytes mean; all the `unsafe`
//! code of asynchronous transfers is here, in one place, under one ownership argument.
//!
//! rusb 0.9 wraps only libusb's synchronous transfers, so this module calls the C API directly:
//! `libusb_alloc_transfer`, `libusb_fill_bulk_transfer` (libusb1-sys's Rust version of the
//! inline C helper), `libusb_submit_transfer`, `libusb_cancel_transfer` and
//! `libusb_free_transfer`, with a completion callback that only records the outcome and hands
//! it to the pool's [`Sink`]. An event thread per pool runs
//! `libusb_handle_events_timeout_completed` on the device's context (rusb's safe
//! `handle_events`), or another thread does: the IN pool's event thread handles the OUT pool's
//! completions too, and with inline events the device thread handles them all
//! (`super::libusb_events`). Completions may also run on any other thread that happens to
//! handle the context's events (a synchronous OUT transfer's) — the callback does not care
//! which.
//!
//! # Ownership: why no callback ever sees freed memory
//!
//! Everything a transfer touches lives in one heap object, `Inner`: the `libusb_transfer`
//! structs, their buffers, the per-slot state, the [`Sink`] the callback reports to, and an
//! `Arc` of the rusb `DeviceHandle` the transfers were filled with (which itself holds the
//! libusb context). `Inner` is reference counted, and
//!
//! 1. **every successful submission owns one reference**: [`TransferPool::submit`] turns a
//!    clone of the `Arc` into the raw `user_data` pointer before `libusb_submit_transfer`, and
//!    takes it back only if the submission failed (then libusb will never call back). libusb
//!    calls the callback exactly once per successful submission — completed, failed, cancelled
//!    or device gone — and the callback turns `user_data` back into the `Arc` and drops it when
//!    it is done. So while a transfer is in flight or its callback runs, `Inner` (transfer,
//!    buffer, device handle, context) cannot be freed, whatever the rest of the program does;
//! 2. `Inner`'s destructor, which frees the transfers and buffers, therefore runs only when no
//!    transfer is in flight; and it never runs *inside* a callback in practice: the owner
//!    ([`TransferPool`], through `LibusbInPool`/`LibusbOutPool`) has every in-flight transfer
//!    cancelled and waited for (`AsyncReader::close`, `AsyncWriter::close`), then
//!    [`TransferPool::stop`] waits for the callbacks to release their references before the
//!    pool drops its own, and if they do not come within a bound it leaks one reference on
//!    purpose (a few hundred KiB, logged) instead of freeing anything — so a late callback
//!    finds valid memory and nothing is freed or closed on libusb's event thread;
//! 3. **the buffers are never shared with the kernel and Rust at once**: a slot's state is
//!    `IN_FLIGHT` from just before submission until its callback has stored the completion's
//!    length (release), which it does before reporting to the [`Sink`]; and
//!    [`TransferPool::buffer`] hands out the buffer only when it reads (acquire) a state other
//!    than `IN_FLIGHT`. `submit` and `buffer` both need `&mut TransferPool`, so a slice
//!    returned by `buffer` is gone before the slot can be submitted again, and there is never
//!    more than one. The buffers are raw allocations (usbfs mappings or leaked boxes,
//!    `super::libusb_mem`: no live `Box` or `&mut` while libusb or the kernel reads or writes
//!    them), freed after the transfers and before the device handle (`Inner`'s field order).

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

use super::libusb_mem::{log_mapping, PoolSpec, TransferBuffer};
use crate::link::LinkError;

/// Slot state while submitted; any other value is the length of the last completion.
const IN_FLIGHT: usize = usize::MAX;
/// How long one turn of the event thread may block: the bound on how late it notices a stop
/// when the interruption went to another thread handling the context's events.
const EVENT_TICK: Duration = Duration::from_millis(100);
/// After the pool's owner saw every completion (or gave up waiting for them), how long
/// [`TransferPool::stop`] waits for the callbacks to return and release their references.
const RELEASE_WAIT: Duration = Duration::from_millis(200);

/// How a transfer ended, read from libusb's status alike for both directions; each direction's
/// [`Sink`] turns it into its own outcome type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// Completed: libusb's `actual_length` (a negative one read as 0), not clamped.
    Completed(usize),
    /// Cancelled by `libusb_cancel_transfer`.
    Cancelled,
    /// Failed; `NoDevice` means unplugged.
    Failed(rusb::Error),
}

impl End {
    fn from_libusb(status: c_int, actual: c_int) -> End {
        match status {
            c::LIBUSB_TRANSFER_COMPLETED => End::Completed(usize::try_from(actual).unwrap_or(0)),
            c::LIBUSB_TRANSFER_CANCELLED => End::Cancelled,
            c::LIBUSB_TRANSFER_NO_DEVICE => End::Failed(rusb::Error::NoDevice),
            c::LIBUSB_TRANSFER_STALL => End::Failed(rusb::Error::Pipe),
            c::LIBUSB_TRANSFER_OVERFLOW => End::Failed(rusb::Error::Overflow),
            c::LIBUSB_TRANSFER_TIMED_OUT => End::Failed(rusb::Error::Timeout),
            _ => End::Failed(rusb::Error::Io),
        }
    }
}

/// The per-direction half of a [`TransferPool`]: where its completions go. `Send + Sync`
/// because the completion callback reaches it from whichever thread handles libusb's events.
pub(super) trait Sink: Send + Sync + 'static {
    /// `"IN"` or `"OUT"`, for log lines.
    const DIRECTION: &'static str;
    /// The event thread's name, before the pool's name (`"usb-ev"`, `"usb-ev-out"`).
    const EVENT_THREAD: &'static str;

    /// Reports how slot `slot`'s transfer ended (`buffer_len`: the size of each buffer).
    /// Called by the completion callback, on whichever thread handles the context's events,
    /// exactly once per successful submission, after the slot has left the in-flight state:
    /// from here on the owner may read its buffer or submit it again. Runs inside libusb's
    /// event handling, so it must be short and must not panic.
    fn transfer_ended(&self, slot: usize, end: End, buffer_len: usize);
}

struct Slot {
    /// From `libusb_alloc_transfer`, freed by `Inner::drop`.
    transfer: NonNull<ffi::libusb_transfer>,
    /// `Inner::buffer_len` bytes, usbfs-mapped or heap; freed when `Inner` drops, after
    /// the transfers and before the device handle.
    buffer: TransferBuffer,
    /// `IN_FLIGHT`, or the length of the last completion (0 before the first, and after a
    /// failed or cancelled transfer or a refused submission).
    state: AtomicUsize,
}

/// What the transfers point at; see the module docs for who owns it when. The field order is
/// the drop order that matters: `slots` (the buffers, after `Drop` freed the transfers) before
/// `_device`.
struct Inner<S: Sink> {
    slots: Box<[Slot]>,
    buffer_len: usize,
    sink: Arc<S>,
    /// The handle the transfers were filled with: open for as long as a transfer exists.
    _device: Arc<dyn Send + Sync>,
}

// SAFETY: `Inner` is shared between the owning `TransferPool` (one thread at a time, `&mut`)
// and the completion callback (whichever thread handles libusb events). The raw pointers are
// used as follows: a slot's `libusb_transfer` is written by the owner only while it is not in
// flight (filling, then length, flags and submission) and read by the callback only for the
// transfer that is completing; libusb's own functions on it are thread-safe. A buffer is used
// by libusb/the kernel only while in flight and by the owner only while not in flight, which
// the atomic `state` (release in the callback, acquire in `buffer`) orders. Everything else is
// `Send + Sync` itself (the sink by `Sink`'s bounds).
unsafe impl<S: Sink> Send for Inner<S> {}
// SAFETY: as for `Send` above.
unsafe impl<S: Sink> Sync for Inner<S> {}

impl<S: Sink> Drop for Inner<S> {
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

impl<S: Sink> Inner<S> {
    /// The completion callback's work, on safe ground.
    fn complete(&self, transfer: *mut ffi::libusb_transfer, status: c_int, actual: c_int) {
        let Some(index) = self
            .slots
            .iter()
            .position(|s| s.transfer.as_ptr() == transfer)
        else {
            log::error!(
                "USB: completion of an unknown {} transfer ignored",
                S::DIRECTION
            );
            return;
        };
        let end = End::from_libusb(status, actual);
        let len = match end {
            End::Completed(len) => len.min(self.buffer_len),
            _ => 0,
        };
        // Release: the bytes libusb wrote are visible to whoever reads this state (acquire).
        // Before the report: the report may let the owner reuse the slot at once.
        self.slots[index].state.store(len, Ordering::Release);
        self.sink.transfer_ended(index, end, self.buffer_len);
    }
}

/// libusb's completion callback for every transfer of every pool of sink `S`.
extern "system" fn on_complete<S: Sink>(transfer: *mut ffi::libusb_transfer) {
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
    // SAFETY: `user_data` is the `Arc::into_raw` that `TransferPool::submit` made for this
    // submission, of an `Inner<S>`: the transfer was filled with `on_complete::<S>` by a
    // `TransferPool<_, S>`. libusb calls back exactly once per successful submission, so this
    // takes that reference back exactly once.
    let inner = unsafe { Arc::from_raw(user_data.cast_const().cast::<Inner<S>>()) };
    inner.complete(transfer, status, actual);
    // `inner` drops here: the last use of anything this submission kept alive.
}

/// The `rusb::Error` of a libusb error code.
fn error_from_libusb(code: c_int) -> rusb::Error {
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

/// `count` bulk transfers of up to `buffer_len` bytes each on endpoint `endpoint` of an open,
/// claimed device (the direction is the endpoint's), completions reported to a sink `S`, with
/// an event thread of their own when asked. See the module docs.
pub(super) struct TransferPool<T: UsbContext + 'static, S: Sink> {
    inner: Arc<Inner<S>>,
    context: T,
    name: String,
    /// Run an event thread (false: another thread handles the context's events — the IN
    /// pool's event thread, or the device thread inline).
    own_events: bool,
    stop: Arc<AtomicBool>,
    events: Option<JoinHandle<()>>,
    /// [`TransferPool::stop`] has run.
    stopped: bool,
}

impl<T: UsbContext + 'static, S: Sink> TransferPool<T, S> {
    /// Allocates the transfers and buffers (nothing is submitted yet): usbfs-mapped buffers
    /// when `spec.usbfs_buffers` and the kernel grants them (`super::libusb_mem`).
    /// `spec.name` labels the event thread and log lines.
    pub(super) fn new(
        device: Arc<DeviceHandle<T>>,
        spec: PoolSpec<'_>,
        sink: Arc<S>,
    ) -> Result<TransferPool<T, S>, rusb::Error> {
        let PoolSpec {
            endpoint,
            count,
            buffer_len,
            own_events,
            usbfs_buffers,
            name,
        } = spec;
        let buffer_len = buffer_len.max(1);
        // `submit` sets each transfer's length, a C int, to at most `buffer_len`.
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
                state: AtomicUsize::new(0),
            });
        }
        let inner = Arc::new(Inner {
            slots: slots.into_boxed_slice(),
            buffer_len,
            sink,
            _device: device,
        });
        let buffers: Vec<&TransferBuffer> = inner.slots.iter().map(|s| &s.buffer).collect();
        log_mapping(S::DIRECTION, name, &buffers);
        let user_data = Arc::as_ptr(&inner).cast_mut().cast::<c_void>();
        for slot in inner.slots.iter() {
            // SAFETY: the transfer is freshly allocated and not submitted; `handle` stays open
            // as long as `inner` (it holds the `DeviceHandle`); the buffer has `buffer_len`
            // bytes and lives as long as `inner`; `user_data` points at an `Inner<S>` and is
            // only dereferenced by `on_complete::<S>` for a submission that owns a reference to
            // `inner`. Length and flags are set by `submit` (no flags: libusb frees nothing;
            // short transfers are normal). Timeout 0 = none (a mux packet may take its time to
            // come; a timed-out OUT transfer could leave the phone half a packet).
            unsafe {
                ffi::libusb_fill_bulk_transfer(
                    slot.transfer.as_ptr(),
                    handle,
                    endpoint,
                    slot.buffer.as_ptr(),
                    0,
                    on_complete::<S>,
                    user_data,
                    0 as c_uint,
                );
                (*slot.transfer.as_ptr()).flags = 0;
            }
        }
        Ok(TransferPool {
            inner,
            context,
            name: name.to_owned(),
            own_events,
            stop: Arc::new(AtomicBool::new(false)),
            events: None,
            stopped: false,
        })
    }

    /// Number of transfers.
    pub(super) fn slots(&self) -> usize {
        self.inner.slots.len()
    }

    /// Bytes of each transfer's buffer: the most one transfer moves.
    pub(super) fn buffer_len(&self) -> usize {
        self.inner.buffer_len
    }

    /// Starts the pool's own event thread, if it is to have one (once).
    pub(super) fn start(&mut self) -> Result<(), LinkError> {
        if !self.own_events || self.events.is_some() {
            return Ok(());
        }
        let (context, stop) = (self.context.clone(), Arc::clone(&self.stop));
        let thread = std::thread::Builder::new()
            .name(format!("{} {}", S::EVENT_THREAD, self.name))
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

    /// Slot `slot`'s whole buffer ([`TransferPool::buffer_len`] bytes, the last completion's
    /// in place) and the length that completion recorded (≤ the buffer's; see `Slot::state`);
    /// `None` while the slot is in flight or for a slot that does not exist. The borrow of
    /// `self` keeps the slot from being submitted while the slice lives (module docs, point 3).
    pub(super) fn buffer(&mut self, slot: usize) -> Option<(&mut [u8], usize)> {
        let s = self.inner.slots.get(slot)?;
        let len = s.state.load(Ordering::Acquire);
        if len == IN_FLIGHT {
            return None;
        }
        // SAFETY: the slot is not in flight (acquire pairs with the callback's release, so what
        // libusb and the kernel wrote is visible and they no longer use the buffer), and it
        // cannot be submitted while the returned borrow of `self` lives (`submit` needs
        // `&mut self`); no other reference to the buffer exists (only this method makes one,
        // through `&mut self`). It has `buffer_len` initialised bytes (zeroed heap memory, or
        // mapped kernel memory) and lives as long as `self.inner`.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(s.buffer.as_ptr(), self.inner.buffer_len) };
        Some((bytes, len.min(self.inner.buffer_len)))
    }

    /// Submits slot `slot` for `len` bytes (OUT: the first `len` bytes of its buffer; IN: room
    /// for up to `len`) with libusb transfer `flags` (`LIBUSB_TRANSFER_ADD_ZERO_PACKET` or 0).
    /// `Busy` if it is in flight. An error means nothing was submitted and no completion will
    /// come.
    pub(super) fn submit(&mut self, slot: usize, len: usize, flags: u8) -> Result<(), rusb::Error> {
        let Some(s) = self.inner.slots.get(slot) else {
            return Err(rusb::Error::InvalidParam);
        };
        if len > self.inner.buffer_len {
            return Err(rusb::Error::InvalidParam);
        }
        let length = c_int::try_from(len).map_err(|_| rusb::Error::InvalidParam)?;
        if s.state.swap(IN_FLIGHT, Ordering::AcqRel) == IN_FLIGHT {
            return Err(rusb::Error::Busy);
        }
        // SAFETY: the slot was not in flight (its state was not IN_FLIGHT) and only `&mut self`
        // submits, so libusb does not use the transfer; `len` ≤ `buffer_len` (checked above),
        // the size of the buffer it was filled with in `new`.
        unsafe {
            let t = s.transfer.as_ptr();
            (*t).length = length;
            (*t).flags = flags;
        }
        // This submission's reference to `Inner` (module docs, point 1); its pointer is the
        // `user_data` filled in at creation.
        let reference = Arc::into_raw(Arc::clone(&self.inner));
        // SAFETY: the transfer is valid (owned by `inner`), filled in `new` and above, and not
        // in flight.
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

    /// Asks libusb to cancel slot `slot` if it is in flight; its completion still comes.
    pub(super) fn cancel(&mut self, slot: usize) {
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
                "USB {}: cancelling {} transfer {slot}: {}",
                self.name,
                S::DIRECTION,
                error_from_libusb(rc)
            );
        }
    }

    /// Lets the callbacks release their references (bounded), stops the event thread, and
    /// leaks `Inner` if a reference is still out (module docs, point 2). Once; called after
    /// every completion came in (or the wait for them gave up), and by `Drop`.
    pub(super) fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        // The callbacks have reported (or the owner gave up waiting); let them return and
        // drop their references while the event thread still runs.
        let deadline = Instant::now() + RELEASE_WAIT;
        while Arc::strong_count(&self.inner) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.events.take() {
            self.context.interrupt_handle_events();
            if thread.join().is_err() {
                log::error!(
                    "USB {} event thread of {} panicked",
                    S::DIRECTION,
                    self.name
                );
            }
        }
        if Arc::strong_count(&self.inner) > 1 {
            log::error!(
                "USB {}: {} transfers never completed after cancel; keeping their memory (and \
                 the device handle) allocated for good rather than freeing it under them",
                self.name,
                S::DIRECTION
            );
            std::mem::forget(Arc::clone(&self.inner));
        }
    }
}

/// Frees what `TransferPool::new` allocated before a later allocation failed.
fn free_partial(slots: Vec<Slot>) {
    for slot in slots {
        // SAFETY: allocated by `libusb_alloc_transfer`, never submitted, freed once.
        unsafe { ffi::libusb_free_transfer(slot.transfer.as_ptr()) };
        drop(slot.buffer);
    }
}

impl<T: UsbContext + 'static, S: Sink> Drop for TransferPool<T, S> {
    fn drop(&mut self) {
        // Normally `stop` already ran (the reader's or writer's close); this covers a pool
        // dropped without it.
        self.stop();
    }
}
