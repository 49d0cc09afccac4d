//! The gadget on one thread: `ep0` events, OUT and IN transfers on one `poll(2)` loop
//! ([`Runner::run_loop`](super::Runner::run_loop), the default of `usbmux-sim --functionfs`).
//!
//! Why: the threaded runner ([`Runner::run`](super::Runner::run)) hands every OUT transfer
//! from its reader thread to the phone's thread, and every IN packet to a writer thread and back
//! — three thread wake-ups and two copies per round trip on top of the kernel's. One connection's
//! throughput is its window divided by the data round trip, and in an emulated guest each
//! wake-up costs tens of microseconds, so the phone's hand-offs were a large part of that round
//! trip. Here the OUT transfers are handed to the phone in the buffers the kernel filled
//! (no copy), IN packets are built in the buffers the kernel sends from, and one eventfd tells
//! the loop about every completion (`IOCB_FLAG_RESFD`). A gateway on a board runs the same
//! loop.
//!
//! Rules kept from the threaded runner:
//! - An OUT transfer is handed over whole, in the order the host sent it (FunctionFS completes an
//!   endpoint's requests in queue order; the loop still takes them oldest first), and only to
//!   the phone of the plug it was queued for: a transfer read just before a DISABLE never
//!   reaches the phone of the next ENABLE.
//! - A refusal as "disabled" (`EAGAIN`/`ESHUTDOWN`, which FunctionFS reports as a request's
//!   completion) is not an error: OUT reads are queued again after a 10 ms pause (FunctionFS may
//!   drop a DISABLE/ENABLE pair entirely, so no ENABLE may come); an IN packet refused so is
//!   dropped — its host went away — and the next ones go out as soon as the endpoint takes them,
//!   so the phone never stays mute (the threaded runner retries such a packet for 3 s instead).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::TryRecvError;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags};
use nix::sys::time::TimeSpec;
use usbmux_core::usb::MAX_PACKET;
use usbmux_core::Instant;

use super::aio::{result, Context, IoEvent, IOCB_CMD_PREAD, IOCB_CMD_PWRITE};
use super::ep0::{self, Event, EVENT_SIZE};
use super::{
    drain, eventfd, fail, is_down, stall, GadgetError, GadgetEvent, Msg, Plugs, RunStats, Runner,
    DOWN_PAUSE, EVENTS_PER_READ,
};
use crate::cable::DEVICE_READ_LEN;

/// OUT reads kept queued.
pub const OUT_DEPTH: usize = 8;
/// IN packets in flight at most (each may be followed by a ZLP).
pub const IN_DEPTH: usize = 8;

/// The shortest timed wait: a deadline that is due is handled in the turn that finds it, so a
/// shorter one could only mean a timer that does not advance — and a busy loop.
const MIN_WAIT: Duration = Duration::from_micros(100);

/// What a request's `data` says it is (low two bits; the slot above them). The plug an OUT read
/// was queued for is kept in its slot.
const KIND_OUT: u64 = 0;
const KIND_IN: u64 = 1;
const KIND_ZLP: u64 = 2;

/// The endpoint files of one FunctionFS function, for [`Runner::run_loop`].
pub struct LoopEndpoints {
    /// `ep0` (set non-blocking by the loop).
    pub ep0: File,
    /// The bulk OUT endpoint file.
    pub out: OwnedFd,
    /// The bulk IN endpoint file.
    pub inp: OwnedFd,
    /// As [`Endpoints::max_packet_size`](super::Endpoints::max_packet_size).
    pub max_packet_size: Box<dyn FnMut() -> Option<u16> + Send>,
}

impl std::fmt::Debug for LoopEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopEndpoints").finish_non_exhaustive()
    }
}

fn tag(kind: u64, slot: usize) -> u64 {
    kind | ((slot as u64) << 2)
}

fn untag(data: u64) -> (u64, usize) {
    (data & 3, usize::try_from(data >> 2).unwrap_or(usize::MAX))
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we hold, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct OutSlot {
    buf: Box<[u8]>,
    done: Option<io::Result<usize>>,
    plug: u64,
}

/// The loop's state (buffers are owned here; `ctx` is declared first so it is dropped — waiting
/// for the kernel to finish every request — before them).
struct Loop {
    ctx: Context,
    /// Completions are counted here (`IOCB_FLAG_RESFD`).
    done_fd: OwnedFd,
    out_fd: OwnedFd,
    in_fd: OwnedFd,
    out: Vec<OutSlot>,
    /// Slots with a read queued, oldest first.
    out_queued: VecDeque<usize>,
    /// When the OUT endpoint said "disabled": no reads until this instant.
    out_paused_until: Option<std::time::Instant>,
    in_bufs: Vec<Vec<u8>>,
    in_free: Vec<usize>,
}

impl Loop {
    /// Queues reads on every free OUT slot, for `plug`, unless paused at `wall`.
    fn queue_reads(&mut self, plug: u64, wall: std::time::Instant) -> io::Result<()> {
        if self.out_paused_until.is_some_and(|t| wall < t) {
            return Ok(());
        }
        self.out_paused_until = None;
        for i in 0..OUT_DEPTH {
            if self.out_queued.contains(&i) {
                continue;
            }
            let slot = &mut self.out[i];
            slot.done = None;
            slot.plug = plug;
            let (ptr, len) = (slot.buf.as_mut_ptr(), slot.buf.len());
            // SAFETY: the slot's buffer is owned by `self`, not touched until this request is
            // reaped (it stays in `out_queued` until then), and `ctx` is dropped first.
            unsafe {
                self.ctx.submit(
                    self.out_fd.as_raw_fd(),
                    IOCB_CMD_PREAD,
                    ptr,
                    len,
                    tag(KIND_OUT, i),
                )?;
            }
            self.out_queued.push_back(i);
        }
        Ok(())
    }

    /// Queues an IN packet (slot `slot`, `len` bytes) and its ZLP.
    fn submit_in(&mut self, slot: usize, len: usize, zlp: bool) -> io::Result<()> {
        let buf = &mut self.in_bufs[slot];
        let ptr = buf.as_mut_ptr();
        // SAFETY: the slot is off the free list until its completion is reaped, so its buffer
        // is not written while the kernel reads it; `ctx` is dropped before the buffers. A ZLP
        // names the same buffer with length 0 (nothing is read from it).
        unsafe {
            self.ctx.submit(
                self.in_fd.as_raw_fd(),
                IOCB_CMD_PWRITE,
                ptr,
                len,
                tag(KIND_IN, slot),
            )?;
            if zlp {
                self.ctx.submit(
                    self.in_fd.as_raw_fd(),
                    IOCB_CMD_PWRITE,
                    ptr,
                    0,
                    tag(KIND_ZLP, slot),
                )?;
            }
        }
        Ok(())
    }
}

impl Runner {
    /// Serves the endpoints on the calling thread until stopped (`Ok`) or an endpoint fails
    /// for good (`Err`); see the [module docs](self).
    pub fn run_loop(mut self, eps: LoopEndpoints) -> Result<RunStats, GadgetError> {
        let LoopEndpoints {
            mut ep0,
            out,
            inp,
            mut max_packet_size,
        } = eps;
        let setup = |error: io::Error| GadgetError::Endpoint {
            endpoint: "ep0",
            error,
        };
        let Some(wake) = self.wake.clone() else {
            return Err(setup(io::Error::other("no eventfd for stopping")));
        };
        set_nonblocking(&ep0).map_err(setup)?;
        set_nonblocking(&out).map_err(setup)?;
        set_nonblocking(&inp).map_err(setup)?;
        let done_fd = eventfd().map_err(setup)?;
        let ctx =
            Context::with_eventfd(OUT_DEPTH + 2 * IN_DEPTH, done_fd.as_raw_fd()).map_err(setup)?;
        let mut lp = Loop {
            ctx,
            done_fd,
            out_fd: out,
            in_fd: inp,
            out: (0..OUT_DEPTH)
                .map(|_| OutSlot {
                    buf: vec![0u8; DEVICE_READ_LEN].into_boxed_slice(),
                    done: None,
                    plug: 0,
                })
                .collect(),
            out_queued: VecDeque::new(),
            out_paused_until: None,
            in_bufs: (0..IN_DEPTH).map(|_| vec![0u8; MAX_PACKET + 1]).collect(),
            in_free: (0..IN_DEPTH).rev().collect(),
        };

        // One clock read per turn (where the clock has no vDSO, as in the VM harness's guest,
        // every read is a system call); the turn's work takes microseconds.
        let epoch = std::time::Instant::now();
        let engine_time = |wall: std::time::Instant| {
            Instant::from_micros(
                u64::try_from(wall.saturating_duration_since(epoch).as_micros())
                    .unwrap_or(u64::MAX),
            )
        };
        let mut plugs = Plugs {
            phone: None,
            stats: RunStats::default(),
            mps: self.cfg.identity.max_packet_size,
        };
        let mut ep0_buf = [0u8; EVENT_SIZE * EVENTS_PER_READ];
        let mut events = [IoEvent::default(); OUT_DEPTH + 2 * IN_DEPTH];
        let mut ep0_ready = true;
        loop {
            // 1. Stop?
            match self.rx.try_recv() {
                Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => return Ok(plugs.stats),
                _ => {}
            }
            let wall = std::time::Instant::now();
            let t = engine_time(wall);
            let current = plugs.current();

            // 2. Completions.
            drain(&lp.done_fd);
            let (mut out_down, mut in_down) = (false, false);
            loop {
                let n = lp
                    .ctx
                    .reap(0, &mut events)
                    .map_err(|error| GadgetError::Endpoint {
                        endpoint: "OUT",
                        error,
                    })?;
                for ev in &events[..n] {
                    let (kind, slot) = untag(ev.data);
                    let res = result(ev);
                    match kind {
                        KIND_OUT => {
                            if let Some(s) = lp.out.get_mut(slot) {
                                s.done = Some(res);
                            }
                        }
                        KIND_IN | KIND_ZLP => {
                            // A ZLP names its packet's buffer with length 0: the slot is free
                            // once the packet itself is done (completions come in order).
                            if kind == KIND_IN && slot < IN_DEPTH && !lp.in_free.contains(&slot) {
                                lp.in_free.push(slot);
                            }
                            match res {
                                Err(e) if is_down(&e) => in_down = true,
                                Err(error) => return Err(fail(&mut *self.on_event, "IN", error)),
                                Ok(_) => {}
                            }
                        }
                        _ => {}
                    }
                }
                if n < events.len() {
                    break;
                }
            }
            // OUT transfers in the order they were queued.
            while let Some(&i) = lp.out_queued.front() {
                let Some(res) = lp.out[i].done.take() else {
                    break;
                };
                lp.out_queued.pop_front();
                match res {
                    Ok(len) => {
                        let slot = &lp.out[i];
                        let of_current = slot.plug == current;
                        plugs.deliver_out(t, &slot.buf, len, of_current, &mut *self.on_event);
                    }
                    Err(e) if is_down(&e) => out_down = true,
                    Err(error) => return Err(fail(&mut *self.on_event, "OUT", error)),
                }
            }
            if in_down {
                (self.on_event)(&GadgetEvent::EndpointDown { endpoint: "IN" });
            }
            if out_down {
                (self.on_event)(&GadgetEvent::EndpointDown { endpoint: "OUT" });
                lp.out_paused_until = Some(wall + DOWN_PAUSE);
            }

            // 3. ep0: every event it has (a SETUP is answered before the next read).
            if ep0_ready {
                loop {
                    let n = match ep0.read(&mut ep0_buf) {
                        Ok(0) => {
                            return Err(fail(
                                &mut *self.on_event,
                                "ep0",
                                io::ErrorKind::UnexpectedEof.into(),
                            ))
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(error) => return Err(fail(&mut *self.on_event, "ep0", error)),
                    };
                    for ev in ep0::parse_events(&ep0_buf[..n]) {
                        match ev {
                            Ok(Event::Setup(r)) => {
                                stall(&mut ep0, &r);
                                (self.on_event)(&GadgetEvent::Ep0(Event::Setup(r)));
                                plugs.stats.stalls += 1;
                                (self.on_event)(&GadgetEvent::Stalled(r));
                            }
                            Ok(ev) => {
                                if plugs.apply(
                                    ev,
                                    &self.cfg,
                                    &mut *max_packet_size,
                                    &mut *self.on_event,
                                ) && plugs.phone.is_some()
                                {
                                    // A fresh plug: read at once.
                                    lp.out_paused_until = None;
                                }
                            }
                            Err(e) => (self.on_event)(&GadgetEvent::Ep0Garbage(e)),
                        }
                    }
                }
            }
            let current = plugs.current();

            // 4. Timers and IN packets — before the reads are queued again: the ACK for the data
            //    just handed over is what the host waits for (its window is closed), while the
            //    reads still queued take its next transfers; queueing a read costs the kernel
            //    a buffer of the read's size (cleared), 80–280 µs per read in the VM harness's
            //    guest, so the four queued before the ACK delayed it by ≈ 0.4 ms.
            if let Some(p) = plugs.phone.as_mut() {
                if p.poll_timeout().is_some_and(|d| d <= t) {
                    p.handle_timeout(t);
                }
                while let Some(slot) = lp.in_free.pop() {
                    let sent = loop {
                        match p.poll_transmit(t, &mut lp.in_bufs[slot]) {
                            Err(e) if e.required > lp.in_bufs[slot].len() => {
                                lp.in_bufs[slot].resize(e.required, 0);
                            }
                            Ok(Some(x)) => break Some(x),
                            Ok(None) | Err(_) => break None,
                        }
                    };
                    let Some(x) = sent else {
                        lp.in_free.push(slot);
                        break;
                    };
                    let zlp = plugs.stats.count_in(&x, plugs.mps);
                    // The kernel reports a disabled endpoint as the request's completion, so a
                    // failed submission is a real failure (a bad file, a full context).
                    if let Err(error) = lp.submit_in(slot, x.len, zlp) {
                        return Err(fail(&mut *self.on_event, "IN", error));
                    }
                }
                for ev in p.take_events() {
                    (self.on_event)(&GadgetEvent::Phone(ev));
                }
            }

            // 5. Keep reads queued while a phone is plugged.
            if plugs.phone.is_some() {
                if let Err(error) = lp.queue_reads(current, wall) {
                    return Err(fail(&mut *self.on_event, "OUT", error));
                }
            }

            // 6. Wait for ep0, a completion, a stop or the next timer.
            let deadline = wait_for(Waits {
                phone: plugs
                    .phone
                    .as_ref()
                    .and_then(|p| p.poll_timeout())
                    .map(|d| Duration::from_micros(d.saturating_duration_since(t).total_micros())),
                can_send: !lp.in_free.is_empty(),
                // The OUT pause only matters while a phone is plugged (reads are queued for one).
                out_pause: lp
                    .out_paused_until
                    .filter(|_| plugs.phone.is_some())
                    .map(|at| at.saturating_duration_since(wall)),
            });
            // ppoll: microseconds, not poll's whole milliseconds (the phone's delayed ACK is
            // 2 ms; rounding it up to the next millisecond would add up to half of that).
            let timeout = deadline.map(|d| TimeSpec::from_duration(d.min(Duration::from_secs(60))));
            let mut fds = [
                PollFd::new(ep0.as_fd(), PollFlags::POLLIN),
                PollFd::new(lp.done_fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::ppoll(&mut fds, timeout, None) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(fail(&mut *self.on_event, "ep0", e.into())),
            }
            ep0_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            if fds[2].revents().is_some_and(|r| !r.is_empty()) {
                drain(&wake);
            }
        }
    }
}

/// What the loop may wait for, each as the time left from the start of the turn.
struct Waits {
    /// The phone's next timer (after `handle_timeout` ran for the due ones).
    phone: Option<Duration>,
    /// An IN slot is free: `poll_transmit` was called.
    can_send: bool,
    /// The pause of OUT reads after the endpoint said "disabled", while a phone is plugged.
    out_pause: Option<Duration>,
}

/// How long `ppoll` may wait (`None`: until a file is ready). Every deadline that was due was
/// handled in the turn, so a zero here would be a timer that does not advance — a busy loop:
/// a phone timer still due waits for a free IN slot (its ACK is built by `poll_transmit`; the IN
/// completion wakes the loop), one still due with a slot free is looked at again after a
/// millisecond, and no wait is shorter than [`MIN_WAIT`].
fn wait_for(w: Waits) -> Option<Duration> {
    let phone = match w.phone {
        Some(d) if d.is_zero() => w.can_send.then_some(Duration::from_millis(1)),
        other => other,
    };
    [phone, w.out_pause]
        .into_iter()
        .flatten()
        .map(|d| d.max(MIN_WAIT))
        .min()
}

#[cfg(test)]
mod test {
    use super::*;

    /// The waits that made the loop spin (a zero timeout every turn) stay away: an OUT pause
    /// that has passed (the loop only counts one while a phone is plugged; before that, a
    /// pause left by an unplug spun until the next plug), a phone timer waiting for an IN slot,
    /// a deadline microseconds away.
    #[test]
    fn the_loop_never_waits_zero() {
        let ms = Duration::from_millis;
        let none = Waits {
            phone: None,
            can_send: true,
            out_pause: None,
        };
        assert_eq!(wait_for(Waits { ..none }), None, "nothing to wait for");
        let phone = |d, can_send| Waits {
            phone: Some(d),
            can_send,
            ..none
        };
        assert_eq!(wait_for(phone(ms(2), true)), Some(ms(2)));
        assert_eq!(wait_for(phone(Duration::ZERO, false)), None, "waits for IN");
        assert_eq!(wait_for(phone(Duration::ZERO, true)), Some(ms(1)));
        assert_eq!(
            wait_for(phone(Duration::from_micros(3), true)),
            Some(MIN_WAIT)
        );
        let passed = Waits {
            out_pause: Some(Duration::ZERO),
            ..none
        };
        assert_eq!(wait_for(passed), Some(MIN_WAIT));
        let soonest = Waits {
            phone: Some(ms(30)),
            can_send: true,
            out_pause: Some(ms(7)),
        };
        assert_eq!(wait_for(soonest), Some(ms(7)));
    }

    #[test]
    fn tags_round_trip() {
        for (kind, slot) in [(KIND_OUT, 0), (KIND_IN, 7), (KIND_ZLP, 15)] {
            assert_eq!(untag(tag(kind, slot)), (kind, slot));
        }
    }
}
