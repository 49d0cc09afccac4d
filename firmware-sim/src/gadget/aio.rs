//! Several transfers in flight on a FunctionFS endpoint, through Linux native AIO
//! (`io_setup`/`io_submit`/`io_getevents`), behind plain [`Read`]/[`Write`].
//!
//! Why: a blocking `read` or `write` queues one USB request and waits for it; the next one is
//! queued only after. A device controller serves requests only when they are queued — with
//! `dummy_hcd` a request queued after its timer ran waits for the next tick (125 µs on the usb-vm
//! harness's 6.1 kernel, 1 ms on older ones), and every transfer waits for a trip through
//! userspace — while a phone (and any gateway) keeps several requests queued so the bus never
//! waits for userspace.
//! FunctionFS queues an AIO request on the endpoint at submission, so requests complete in
//! submission order; the kernel copies OUT data into our buffer before it reports completion.
//!
//! - [`AioOut`]: keeps [`DEPTH`] reads of `len` bytes queued; each [`Read::read`] returns the
//!   oldest completed one (one transfer, as a blocking read would) and queues a new one.
//! - [`AioIn`]: each [`Write::write`] copies the transfer into a free slot and queues it; it
//!   waits only when all [`DEPTH`] slots are in flight. A completion that failed because the
//!   endpoint was disabled is dropped silently (the unplug is reported by `ep0`); another failure
//!   is returned by a later `write`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;

/// Transfers in flight per endpoint.
pub const DEPTH: usize = 8;

pub(super) const IOCB_CMD_PREAD: u16 = 0;
pub(super) const IOCB_CMD_PWRITE: u16 = 1;
/// `iocb.aio_flags`: signal the completion on the eventfd in `aio_resfd`.
const IOCB_FLAG_RESFD: u32 = 1;

/// `struct iocb` of `linux/aio_abi.h` (little-endian field order of `aio_key`/`aio_rw_flags`).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(super) struct IoEvent {
    /// The request's `data` as submitted.
    pub(super) data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// An AIO context (`io_setup`), destroyed on drop — which waits for requests still in flight,
/// so buffers owned next to it may only be freed after it.
pub(super) struct Context {
    id: libc::c_ulong,
    /// An eventfd every completion increments (`IOCB_FLAG_RESFD`), so a poll loop can wait
    /// for completions next to other files.
    resfd: Option<i32>,
}

impl Context {
    /// A context whose completions also count on `eventfd` (which must outlive it).
    pub(super) fn with_eventfd(events: usize, eventfd: i32) -> io::Result<Context> {
        let mut ctx = Context::new(events)?;
        ctx.resfd = Some(eventfd);
        Ok(ctx)
    }

    fn new(events: usize) -> io::Result<Context> {
        let mut ctx: libc::c_ulong = 0;
        let n = libc::c_long::try_from(events).unwrap_or(libc::c_long::MAX);
        // SAFETY: io_setup writes the context id into `ctx`, a valid c_ulong.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, n, &mut ctx as *mut libc::c_ulong) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Context {
            id: ctx,
            resfd: None,
        })
    }

    /// Queues one request on `fd`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid (and, for a read, not be touched) until the request's
    /// completion has been reaped by [`Context::reap`] or the context is dropped.
    pub(super) unsafe fn submit(
        &self,
        fd: i32,
        opcode: u16,
        buf: *mut u8,
        len: usize,
        data: u64,
    ) -> io::Result<()> {
        let mut cb = Iocb {
            data,
            opcode,
            fildes: u32::try_from(fd).unwrap_or(u32::MAX),
            buf: buf as u64,
            nbytes: len as u64,
            ..Iocb::default()
        };
        if let Some(resfd) = self.resfd {
            cb.flags = IOCB_FLAG_RESFD;
            cb.resfd = u32::try_from(resfd).unwrap_or(u32::MAX);
        }
        let mut list: [*mut Iocb; 1] = [&mut cb];
        loop {
            // SAFETY: `list` points at one initialised iocb that lives across the call (the
            // kernel copies it); the buffer it names is valid per this function's contract.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.id,
                    1 as libc::c_long,
                    list.as_mut_ptr(),
                )
            };
            match r {
                1 => return Ok(()),
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                _ => return Err(io::Error::other("io_submit queued nothing")),
            }
        }
    }

    /// Waits for at least `min` completions (0: only takes what is there).
    pub(super) fn reap(&self, min: usize, out: &mut [IoEvent]) -> io::Result<usize> {
        loop {
            // SAFETY: `out` is a valid, writable array of `out.len()` io_event structures; a
            // null timeout waits without limit.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.id,
                    min as libc::c_long,
                    out.len() as libc::c_long,
                    out.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if r >= 0 {
                return Ok(usize::try_from(r).unwrap_or(0));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the id came from io_setup; io_destroy waits for outstanding requests.
        unsafe {
            libc::syscall(libc::SYS_io_destroy, self.id);
        }
    }
}

/// The result of a completed request: bytes moved, or the error.
pub(super) fn result(ev: &IoEvent) -> io::Result<usize> {
    if ev.res < 0 {
        let code = i32::try_from(-ev.res).unwrap_or(libc::EIO);
        Err(io::Error::from_raw_os_error(code))
    } else {
        Ok(usize::try_from(ev.res).unwrap_or(0))
    }
}

/// One request slot: its buffer and, once complete, its result.
struct Slot {
    buf: Box<[u8]>,
    done: Option<io::Result<usize>>,
}

/// The bulk OUT endpoint with [`DEPTH`] reads queued (see the module docs).
pub struct AioOut {
    // Field order matters: the context is dropped (waiting for the kernel) before the slots.
    ctx: Context,
    slots: Vec<Slot>,
    /// Slots with a request queued, oldest first.
    queued: VecDeque<usize>,
    fd: OwnedFd,
}

impl AioOut {
    /// Reads of `len` bytes on `fd` (a FunctionFS OUT endpoint file).
    pub fn new(fd: OwnedFd, len: usize) -> io::Result<AioOut> {
        Ok(AioOut {
            ctx: Context::new(DEPTH)?,
            slots: (0..DEPTH)
                .map(|_| Slot {
                    buf: vec![0u8; len].into_boxed_slice(),
                    done: None,
                })
                .collect(),
            queued: VecDeque::new(),
            fd,
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        for i in 0..DEPTH {
            if self.queued.contains(&i) {
                continue;
            }
            let slot = &mut self.slots[i];
            slot.done = None;
            let ptr = slot.buf.as_mut_ptr();
            let len = slot.buf.len();
            // SAFETY: the slot's buffer is heap memory owned by `self`, not touched until this
            // request is reaped (it is in `queued` until then), and outlived by `ctx` only
            // through drop order (ctx first).
            unsafe {
                self.ctx
                    .submit(self.fd.as_raw_fd(), IOCB_CMD_PREAD, ptr, len, i as u64)?;
            }
            self.queued.push_back(i);
        }
        Ok(())
    }
}

impl Read for AioOut {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Err(e) = self.fill() {
            // Nothing queued and nothing can be: report (e.g. EAGAIN/ESHUTDOWN while disabled).
            if self.queued.is_empty() {
                return Err(e);
            }
        }
        let Some(&oldest) = self.queued.front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        while self.slots[oldest].done.is_none() {
            self.reap(1)?;
        }
        self.queued.pop_front();
        match self.slots[oldest].done.take() {
            Some(Ok(n)) => {
                let n = n.min(buf.len()).min(self.slots[oldest].buf.len());
                buf[..n].copy_from_slice(&self.slots[oldest].buf[..n]);
                Ok(n)
            }
            Some(Err(e)) => {
                // A disable fails every queued read at once: report it once, not once per slot.
                self.reap(0)?;
                while let Some(&next) = self.queued.front() {
                    if !matches!(self.slots[next].done, Some(Err(_))) {
                        break;
                    }
                    self.slots[next].done = None;
                    self.queued.pop_front();
                }
                Err(e)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AioOut {
    /// Records completions; waits for at least `min`.
    fn reap(&mut self, min: usize) -> io::Result<()> {
        let mut events = [IoEvent::default(); DEPTH];
        let n = self.ctx.reap(min, &mut events)?;
        for ev in &events[..n] {
            if let Some(slot) = usize::try_from(ev.data)
                .ok()
                .and_then(|i| self.slots.get_mut(i))
            {
                slot.done = Some(result(ev));
            }
        }
        Ok(())
    }
}

/// The bulk IN endpoint with up to [`DEPTH`] writes in flight (see the module docs).
pub struct AioIn {
    ctx: Context,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// A failure of an earlier write other than a disable, returned by the next `write`.
    failed: Option<io::Error>,
    fd: OwnedFd,
}

impl AioIn {
    /// Writes of at most `len` bytes each on `fd` (a FunctionFS IN endpoint file).
    pub fn new(fd: OwnedFd, len: usize) -> io::Result<AioIn> {
        Ok(AioIn {
            ctx: Context::new(DEPTH)?,
            slots: (0..DEPTH)
                .map(|_| Slot {
                    buf: vec![0u8; len].into_boxed_slice(),
                    done: None,
                })
                .collect(),
            free: (0..DEPTH).rev().collect(),
            failed: None,
            fd,
        })
    }

    /// Takes completions; waits for one if `wait`.
    fn reap(&mut self, wait: bool) -> io::Result<()> {
        let mut events = [IoEvent::default(); DEPTH];
        let n = self.ctx.reap(usize::from(wait), &mut events)?;
        for ev in &events[..n] {
            if let Ok(i) = usize::try_from(ev.data) {
                if i < DEPTH && !self.free.contains(&i) {
                    self.free.push(i);
                }
            }
            if let Err(e) = result(ev) {
                let down = matches!(
                    e.raw_os_error().map(Errno::from_raw),
                    Some(Errno::ESHUTDOWN) | Some(Errno::ECONNRESET)
                );
                if !down && self.failed.is_none() {
                    self.failed = Some(e);
                }
            }
        }
        Ok(())
    }
}

impl Write for AioIn {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.reap(false)?;
        while self.free.is_empty() {
            self.reap(true)?;
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let Some(i) = self.free.pop() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let slot = &mut self.slots[i];
        if data.len() > slot.buf.len() {
            self.free.push(i);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("transfer of {} bytes > {}", data.len(), slot.buf.len()),
            ));
        }
        slot.buf[..data.len()].copy_from_slice(data);
        let ptr = slot.buf.as_mut_ptr();
        // SAFETY: the slot is off the free list until its completion is reaped, so its buffer
        // is not written again while the kernel reads it; `ctx` is dropped before the slots.
        let r = unsafe {
            self.ctx.submit(
                self.fd.as_raw_fd(),
                IOCB_CMD_PWRITE,
                ptr,
                data.len(),
                i as u64,
            )
        };
        match r {
            Ok(()) => Ok(data.len()),
            Err(e) => {
                self.free.push(i);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use std::fs::OpenOptions;

    fn scratch(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("usbmux-sim-aio-{}-{tag}", std::process::id()))
    }

    /// The request layout and the syscalls work (on a regular file, where every read and write
    /// is at offset 0): a wrong `iocb` layout fails with EINVAL or moves the wrong bytes.
    #[test]
    fn reads_and_writes_go_through_the_kernel() {
        assert_eq!(std::mem::size_of::<Iocb>(), 64);
        assert_eq!(std::mem::size_of::<IoEvent>(), 32);
        let path = scratch("rw");
        std::fs::write(&path, b"one transfer").expect("write file");
        let f = OpenOptions::new().read(true).open(&path).expect("open");
        let mut out = AioOut::new(f.into(), 4096).expect("io_setup");
        let mut buf = [0u8; 4096];
        // More reads than slots: slots are recycled in order.
        for _ in 0..3 * DEPTH {
            let n = out.read(&mut buf).expect("read");
            assert_eq!(&buf[..n], b"one transfer");
        }
        drop(out);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        let mut inp = AioIn::new(f.into(), 64).expect("io_setup");
        for _ in 0..3 * DEPTH {
            assert_eq!(inp.write(b"ABC").expect("write"), 3);
        }
        assert!(inp.write(&[0u8; 65]).is_err(), "larger than a slot");
        drop(inp);
        let got = std::fs::read(&path).expect("read file");
        assert_eq!(&got[..], b"ABC transfer");
        let _ = std::fs::remove_file(&path);
    }
}
