//! [`TransferBuffer`]: the memory a libusb asynchronous transfer reads from or writes into —
//! preferably memory of the kernel's usbfs, mapped into the daemon (`libusb_dev_mem_alloc`),
//! else a plain heap allocation. `unsafe` code (rusb 0.9 does not declare these two libusb
//! functions; the vendored libusb exports them).
//!
//! Why: for a transfer in ordinary memory, usbfs allocates a kernel buffer per URB and copies
//! the data across (`copy_from_user` for OUT, `copy_to_user` for IN) — and a kernel that zeroes
//! its allocations (`init_on_alloc`, Debian's default) clears the whole buffer first, 64 KiB for
//! an IN transfer that may bring back a 28-byte ACK. Profiled in the VM harness
//! (`USB_VM_PROFILE=1`), clearing those pages and copying took about a third of the daemon's
//! CPU time in either direction. A transfer whose buffer lies in usbfs-mapped memory is done in
//! place: no allocation, no clearing, no copy. The mapping costs a bounded amount of the
//! kernel's usbfs memory (`usbfs_memory_mb`, 16 MiB by default for all devices), so when it is
//! refused (or not supported) the buffer falls back to the heap, one buffer at a time.

#![allow(unsafe_code)]
// Every unsafe block and impl says why it is sound; clippy holds us to it.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::c_int;
use std::ptr::NonNull;

use rusb::ffi;

extern "system" {
    /// `unsigned char *libusb_dev_mem_alloc(libusb_device_handle *, size_t)` (libusb ≥ 1.0.21).
    fn libusb_dev_mem_alloc(handle: *mut ffi::libusb_device_handle, length: usize) -> *mut u8;
    /// `int libusb_dev_mem_free(libusb_device_handle *, unsigned char *, size_t)`.
    fn libusb_dev_mem_free(
        handle: *mut ffi::libusb_device_handle,
        buffer: *mut u8,
        length: usize,
    ) -> c_int;
}

/// The shape of a pool of asynchronous transfers on one endpoint (`super::libusb_in`,
/// `super::libusb_out`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolSpec<'a> {
    /// The endpoint address.
    pub(crate) endpoint: u8,
    /// Transfers in the pool (at least one is made).
    pub(crate) count: usize,
    /// Bytes of each transfer's buffer.
    pub(crate) buffer_len: usize,
    /// Run an event thread of the pool's own (false: another thread handles the context's
    /// events — the IN pool's, or the device thread inline).
    pub(crate) own_events: bool,
    /// Ask for usbfs-mapped buffers ([`TransferBuffer`]).
    pub(crate) usbfs_buffers: bool,
    /// Labels threads and log lines (the UDID).
    pub(crate) name: &'a str,
}

/// Logs how many of a pool's buffers the kernel mapped.
pub(super) fn log_mapping(what: &str, name: &str, buffers: &[&TransferBuffer]) {
    let mapped = buffers.iter().filter(|b| b.is_mapped()).count();
    log::debug!(
        "USB {name}: {} {what} transfer buffers, {mapped} of them in usbfs memory",
        buffers.len()
    );
}

/// `len` bytes for transfers of one device: mapped usbfs memory when `kernel` is asked for and
/// granted, else heap memory. Freed on drop, which must happen while the device handle is still
/// open and no transfer uses the buffer (the pools' `Inner` guarantees both: it drops its
/// buffers after freeing its transfers, and before the handle it holds).
pub(super) struct TransferBuffer {
    ptr: NonNull<u8>,
    len: usize,
    /// The handle the mapping belongs to; `None` for heap memory.
    mapped: Option<NonNull<ffi::libusb_device_handle>>,
}

impl TransferBuffer {
    /// Allocates `len` (≥ 1) bytes, from usbfs when `kernel` and `handle` is an open handle.
    pub(super) fn new(handle: *mut ffi::libusb_device_handle, len: usize, kernel: bool) -> Self {
        let len = len.max(1);
        if let (true, Some(h)) = (kernel, NonNull::new(handle)) {
            // SAFETY: `handle` is an open device handle (the caller holds it); libusb returns
            // NULL when the kernel refuses the mapping, checked below.
            let raw = unsafe { libusb_dev_mem_alloc(h.as_ptr(), len) };
            if let Some(ptr) = NonNull::new(raw) {
                return TransferBuffer {
                    ptr,
                    len,
                    mapped: Some(h),
                };
            }
            log::debug!("USB: no usbfs memory for a {len}-byte transfer buffer; using the heap");
        }
        let ptr = NonNull::from(Box::leak(vec![0u8; len].into_boxed_slice())).cast::<u8>();
        TransferBuffer {
            ptr,
            len,
            mapped: None,
        }
    }

    /// The start of the buffer (for `libusb_fill_bulk_transfer` and copies in and out).
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Whether it is usbfs memory (transfers done in place).
    pub(super) fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }
}

impl Drop for TransferBuffer {
    fn drop(&mut self) {
        match self.mapped {
            Some(handle) => {
                // SAFETY: the mapping came from `libusb_dev_mem_alloc` on this still-open handle
                // with this length (type docs: dropped before the handle closes) and no transfer
                // uses it any more; it is unmapped exactly once.
                let rc =
                    unsafe { libusb_dev_mem_free(handle.as_ptr(), self.ptr.as_ptr(), self.len) };
                if rc != 0 {
                    log::warn!("USB: unmapping a transfer buffer failed ({rc})");
                }
            }
            None => {
                let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
                // SAFETY: the pointer of a leaked `Box<[u8]>` of exactly `len` bytes, no longer
                // used by any transfer, reclaimed exactly once.
                drop(unsafe { Box::from_raw(raw) });
            }
        }
    }
}
