//! The asynchronous IN strategy ([`InStrategy::Async`](super::InStrategy::Async)): several bulk
//! IN transfers in flight at once, handed to the device thread in order.
//!
//! Why: with one synchronous read at a time ([`InStrategy::Thread`](super::InStrategy::Thread))
//! the endpoint has no transfer queued between the end of one read and the start of the next,
//! and the phone's next packet waits for the reader thread to be scheduled. With `N` transfers
//! submitted, the host controller always has a buffer to fill.
//!
//! This module is the strategy's logic and holds no `unsafe`: the transfers themselves sit
//! behind the small [`InPool`] trait — "submit slot `i`", "the bytes slot `i` received", "cancel
//! slot `i`" — implemented over libusb by [`super::libusb_in`] (on `super::libusb_pool`) and, in the tests below, by a
//! fake bus that completes transfers from the test thread. The pool reports every completion to
//! [`Completions`], which runs on libusb's event thread and does only the minimum: record the
//! slot in the completed queue (or the fault), and wake the device thread when the queue goes
//! from empty to non-empty.
//!
//! - **Order.** libusb completes the transfers of one endpoint in submission order, and the
//!   completions of one context are delivered one at a time, so the completed queue is in
//!   stream order; [`AsyncReader::recv`] always reads from its head.
//! - **No allocation per transfer.** The pool's transfers and buffers are allocated once; the
//!   queue holds at most one entry per slot and is allocated with that capacity.
//! - **Backpressure.** A slot is submitted again only after the device thread has consumed all
//!   of its bytes ([`AsyncReader::recv`] resubmits it at once; after [`AsyncReader::recv_with`]
//!   the device thread's [`AsyncReader::submit_emptied`] does, at the end of its turn, once
//!   the OUT transfers the bytes called for are out), so a device thread that falls behind
//!   leaves no transfer in flight and the phone's data waits in the phone, as with the reader
//!   thread. Zero-length completions are resubmitted the same way as soon as they are seen.
//! - **Failure.** A transfer that fails (`NoDevice`: unplugged, or any other error) records the
//!   same [`Fault`] the reader thread would, wakes the device thread, and stops resubmission;
//!   `recv` returns the data completed before the failure first, then the error. Completions
//!   after a fault are dropped (the stream has a hole). A cancellation that nobody asked for is
//!   a fault too: otherwise the slot would silently drop out of the rotation.
//! - **Shutdown.** [`AsyncReader::close`] cancels every slot, waits (bounded by
//!   [`CANCEL_WAIT`]) until every submitted transfer has reported back, then stops the pool.
//!   Memory safety does not rest on this wait: see the ownership argument in
//!   [`super::libusb_pool`].

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::async_common::{Tracker, CANCEL_WAIT};
use super::link::{Counters, Fault};
use crate::link::LinkError;

/// Re-exported because the link, the device opener and the libusb pump name it here; it lives
/// with the rest of what both directions share.
pub(crate) use super::async_common::EventPump;

/// How one IN transfer ended, as the pool's completion callback reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Completed with this many bytes in the slot's buffer (0: a zero-length packet).
    Data(usize),
    /// Failed; `NoDevice` means unplugged.
    Failed(rusb::Error),
    /// Cancelled (expected only during [`AsyncReader::close`]).
    Cancelled,
}

/// A fixed set of IN transfers ("slots"), each with its own buffer: the submit/complete
/// backend of [`AsyncReader`]. Every successful [`InPool::submit`] leads to exactly one
/// [`Completions::completed`] call for that slot, from any thread, at any later time (possibly
/// before `submit` returns). The methods take `&mut self`: only the device thread that owns the
/// [`AsyncReader`] calls them, which is what lets [`InPool::data`] hand out the buffer safely.
pub(crate) trait InPool: Send {
    /// Number of slots (transfers in flight when all are submitted).
    fn slots(&self) -> usize;

    /// Starts whatever runs the completions (libusb's event thread).
    fn start(&mut self) -> Result<(), LinkError>;

    /// Submits slot `slot`. An error means nothing was submitted and no completion will come.
    fn submit(&mut self, slot: usize) -> Result<(), rusb::Error>;

    /// The bytes of slot `slot`'s last completion; empty while it is in flight.
    fn data(&mut self, slot: usize) -> &[u8];

    /// Asks for slot `slot` to be cancelled if it is in flight (its completion still comes,
    /// as [`Outcome::Cancelled`] or whatever it had finished with).
    fn cancel(&mut self, slot: usize);

    /// Stops the event thread and releases what is safe to release; called once, after the
    /// completions of everything submitted have come in (or [`CANCEL_WAIT`] passed).
    fn stop(&mut self);
}

/// One completed transfer waiting for the device thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Done {
    slot: usize,
    len: usize,
}

/// Where a pool's completions go: the queue the device thread reads, shared between the
/// completion callback (libusb's event thread) and the [`AsyncReader`]. Its condition variable
/// is signalled only when nothing is left in flight: only close waits, and for that.
#[derive(Debug)]
pub(crate) struct Completions {
    /// Completed transfers in stream order (at most one entry per slot); nothing is queued or
    /// resubmitted after a fault.
    tracker: Tracker<VecDeque<Done>>,
}

impl Completions {
    /// Completions for a pool of `slots` transfers.
    pub(crate) fn new(slots: usize) -> Arc<Completions> {
        Arc::new(Completions {
            tracker: Tracker::new(VecDeque::with_capacity(slots)),
        })
    }

    /// Makes waits handle events with `pump` (inline events), before the pool starts.
    pub(crate) fn set_pump(&self, pump: Arc<dyn EventPump>) {
        self.tracker.set_pump(pump);
    }

    /// Reports how a submitted transfer ended. Called from the pool's completion callback on
    /// the event thread: one short lock, no allocation (the queue has room for every slot), at
    /// most one wake.
    pub(crate) fn completed(&self, slot: usize, outcome: Outcome) {
        let wake_now = {
            let mut q = self.tracker.lock();
            q.in_flight = q.in_flight.saturating_sub(1);
            let wake_now = match outcome {
                Outcome::Data(_) | Outcome::Failed(_) if q.fault.is_some() => false,
                Outcome::Data(len) => {
                    let was_empty = q.slots.is_empty();
                    q.slots.push_back(Done { slot, len });
                    // The device thread drains the queue until `recv` says `None`, so one wake
                    // per empty → non-empty transition is enough.
                    was_empty
                }
                Outcome::Failed(error) => q.fail(Fault::from_usb("bulk IN", error)),
                Outcome::Cancelled if q.closing => false,
                Outcome::Cancelled => {
                    q.fail(Fault::Usb {
                        what: "bulk IN",
                        error: rusb::Error::Interrupted,
                    });
                    true
                }
            };
            if q.in_flight == 0 {
                self.tracker.notify();
            }
            wake_now
        };
        // Inline, the completion runs inside the device thread's own `pump`, which reads the
        // queue right after: waking it would be one system call per transfer for nothing.
        if wake_now && !self.tracker.inline() {
            self.tracker.wake();
        }
    }

    /// The first IN failure, if any.
    pub(crate) fn fault(&self) -> Option<Fault> {
        self.tracker.lock().fault
    }

    /// The first failure and the oldest completed transfer, under one lock.
    fn peek(&self) -> (Option<Fault>, Option<Done>) {
        let q = self.tracker.lock();
        (q.fault, q.slots.front().copied())
    }

    /// Retires the oldest completed transfer and, if submitting is still allowed (no fault,
    /// not closing), counts its resubmission, under one lock. True: submit it now.
    fn retire(&self) -> bool {
        let mut q = self.tracker.lock();
        q.slots.pop_front();
        q.claim()
    }

    /// Retires the oldest completed transfer without resubmitting it (see
    /// [`AsyncReader::submit_emptied`]); it is not in flight until then.
    fn retire_only(&self) {
        self.tracker.lock().slots.pop_front();
    }

    /// Counts one resubmission if submitting is still allowed. True: submit it now.
    fn claim(&self) -> bool {
        self.tracker.lock().claim()
    }
}

/// The IN side of a [`UsbLink`](super::UsbLink) in the asynchronous strategy: owns the pool,
/// reads completed transfers in order and resubmits them once consumed. Used only from the
/// device thread (through `Link::start`, `Link::recv` and the link's drop).
pub(crate) struct AsyncReader {
    pool: Box<dyn InPool>,
    completions: Arc<Completions>,
    /// Bytes of the head transfer already handed out.
    offset: usize,
    cancel_wait: Duration,
    started: bool,
    closed: bool,
    /// Slots [`AsyncReader::recv_with`] emptied, submitted again by
    /// [`AsyncReader::submit_emptied`] (oldest first; at most one entry per slot).
    emptied: Vec<usize>,
}

impl AsyncReader {
    /// A reader over `pool`, whose completions go to `completions`. Nothing is submitted
    /// before [`AsyncReader::start`].
    pub(crate) fn new(pool: Box<dyn InPool>, completions: Arc<Completions>) -> AsyncReader {
        AsyncReader {
            pool,
            completions,
            offset: 0,
            cancel_wait: CANCEL_WAIT,
            started: false,
            closed: false,
            emptied: Vec::new(),
        }
    }

    /// Replaces [`CANCEL_WAIT`] (tests of a pool whose cancellations never come).
    #[cfg(test)]
    fn with_cancel_wait(mut self, limit: Duration) -> AsyncReader {
        self.cancel_wait = limit;
        self
    }

    /// Starts the pool's event handling and submits every slot. A failed submission is a
    /// fault reported through `recv` (and the waker), like a failed transfer.
    pub(crate) fn start(&mut self, waker: Arc<mio::Waker>) -> Result<(), LinkError> {
        self.completions.tracker.set_waker(waker);
        self.pool.start()?;
        self.started = true;
        for slot in 0..self.pool.slots() {
            if self.completions.tracker.lock().claim() {
                self.submit(slot);
            }
        }
        Ok(())
    }

    /// Submits `slot`, already counted as in flight.
    fn submit(&mut self, slot: usize) {
        if let Err(error) = self.pool.submit(slot) {
            // Nothing was submitted: report it as the completion that will never come.
            self.completions.completed(slot, Outcome::Failed(error));
        }
    }

    /// The first IN failure, if any.
    pub(crate) fn fault(&self) -> Option<Fault> {
        self.completions.fault()
    }

    /// Copies the next bytes of the stream into `buf`: `Ok(None)` when nothing has completed,
    /// the failure once the data before it has been read. A transfer is resubmitted as soon as
    /// its last byte has been copied out.
    pub(crate) fn recv(
        &mut self,
        buf: &mut [u8],
        counters: &Counters,
    ) -> Result<Option<usize>, Fault> {
        if buf.is_empty() {
            return Ok(None);
        }
        self.take_with(counters, false, &mut |pending| {
            let n = pending.len().min(buf.len());
            buf[..n].copy_from_slice(&pending[..n]);
            n
        })
    }

    /// Lends the rest of the oldest completed transfer to `f` where it lies (no copy):
    /// `Ok(Some(n))` after one call of `f` with `n` bytes, otherwise as [`AsyncReader::recv`].
    /// Unlike `recv` it does not resubmit the emptied transfer: [`AsyncReader::submit_emptied`]
    /// does, once the caller has sent what the bytes called for (the device thread's turn
    /// ends with it, `Link::end_turn`).
    pub(crate) fn recv_with(
        &mut self,
        counters: &Counters,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<usize>, Fault> {
        self.take_with(counters, true, &mut |pending| {
            f(pending);
            pending.len()
        })
    }

    /// Submits again the transfers [`AsyncReader::recv_with`] emptied since the last call
    /// (none after a fault or once closing). Why later: the IN transfer that brought the
    /// phone's ACK is emptied before the OUT transfer that ACK lets go is built, and its
    /// resubmission (a system call, ≈ 20–80 µs in the VM harness's guest) would stand between
    /// the two on the round trip that bounds one connection's throughput. The other transfers
    /// of the pool stay in flight meanwhile.
    pub(crate) fn submit_emptied(&mut self) {
        let mut emptied = std::mem::take(&mut self.emptied);
        for &slot in &emptied {
            if self.completions.claim() {
                self.submit(slot);
            }
        }
        emptied.clear();
        self.emptied = emptied;
    }

    /// The common part of `recv` and `recv_with`: offers the unread bytes of the oldest
    /// non-empty completed transfer to `consume`, which returns how many it took (a call with
    /// no bytes is never made). An emptied transfer is resubmitted at once, or with `later`
    /// left for [`AsyncReader::submit_emptied`].
    fn take_with(
        &mut self,
        counters: &Counters,
        later: bool,
        consume: &mut dyn FnMut(&[u8]) -> usize,
    ) -> Result<Option<usize>, Fault> {
        // Each turn either returns or retires one zero-length transfer.
        for _ in 0..=self.pool.slots() {
            // The fault is read with the queue: completions queue data before they record a
            // fault, so data that arrived before the failure is always delivered first.
            let (fault, head) = self.completions.peek();
            let Some(head) = head else {
                return match fault {
                    Some(fault) => Err(fault),
                    None => Ok(None),
                };
            };
            let data = self.pool.data(head.slot);
            let end = head.len.min(data.len());
            let pending = data.get(self.offset..end).unwrap_or(&[]);
            let n = if pending.is_empty() {
                0
            } else {
                consume(pending).min(pending.len())
            };
            if head.len == 0 {
                counters.in_zlps.fetch_add(1, Ordering::Relaxed);
            } else if self.offset == 0 {
                counters.in_transfers.fetch_add(1, Ordering::Relaxed);
                counters.in_bytes.fetch_add(end as u64, Ordering::Relaxed);
            }
            if self.offset + n >= end {
                self.offset = 0;
                if later {
                    self.completions.retire_only();
                    self.emptied.push(head.slot);
                } else if self.completions.retire() {
                    self.submit(head.slot);
                }
            } else {
                self.offset += n;
            }
            if n > 0 {
                return Ok(Some(n));
            }
        }
        // Zero-length transfers kept coming for a whole turn: the queue is not empty, so no
        // completion will wake the device thread for what is left. Wake it ourselves so that
        // this `None` does not strand it.
        self.completions.tracker.wake();
        Ok(None)
    }

    /// Cancels every transfer, waits for their completions (at most the cancel wait) and
    /// stops the pool. Idempotent.
    pub(crate) fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.completions.tracker.lock().closing = true;
        if self.started {
            let pool = &mut self.pool;
            self.completions.tracker.cancel_all(
                pool.slots(),
                |slot| pool.cancel(slot),
                self.cancel_wait,
                "IN",
            );
        }
        self.pool.stop();
    }
}

impl Drop for AsyncReader {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    //! The ordering, backpressure, failure and shutdown logic against a fake bus: the test plays
    //! the host controller, completing the oldest submitted transfer (as libusb does on one
    //! endpoint) with the bytes it chooses.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::usb::async_common::fake::{DeviceThread, Pump};
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::time::Instant;

    /// The fake bus: in flight and submitted are slot numbers.
    type Bus = crate::usb::async_common::fake::Bus<usize>;

    /// The pool: its buffers are what the test "controller" wrote into `written` when it
    /// completed the slot.
    struct FakePool {
        bus: Arc<Mutex<Bus>>,
        completions: Arc<Completions>,
        written: Arc<Mutex<Vec<Vec<u8>>>>,
        /// Every submission completes at once with a zero-length packet (a phone sending only
        /// ZLPs, faster than the device thread retires them).
        zlp_on_submit: Arc<AtomicBool>,
        buffers: Vec<Vec<u8>>,
    }

    impl InPool for FakePool {
        fn slots(&self) -> usize {
            self.buffers.len()
        }

        fn start(&mut self) -> Result<(), LinkError> {
            self.bus.lock().unwrap().started = true;
            Ok(())
        }

        fn submit(&mut self, slot: usize) -> Result<(), rusb::Error> {
            self.bus.lock().unwrap().submit(slot)?;
            if self.zlp_on_submit.load(Ordering::SeqCst) {
                self.bus.lock().unwrap().queued.pop_back();
                self.written.lock().unwrap()[slot].clear();
                self.completions.completed(slot, Outcome::Data(0));
            }
            Ok(())
        }

        fn data(&mut self, slot: usize) -> &[u8] {
            assert!(
                !self.bus.lock().unwrap().in_flight(slot),
                "slot {slot} read while in flight"
            );
            self.buffers[slot].clone_from(&self.written.lock().unwrap()[slot]);
            &self.buffers[slot]
        }

        fn cancel(&mut self, slot: usize) {
            if self.bus.lock().unwrap().cancel(slot) {
                self.completions.completed(slot, Outcome::Cancelled);
            }
        }

        fn stop(&mut self) {
            self.bus.lock().unwrap().stopped = true;
        }
    }

    struct Rig {
        bus: Arc<Mutex<Bus>>,
        completions: Arc<Completions>,
        written: Arc<Mutex<Vec<Vec<u8>>>>,
        zlp_on_submit: Arc<AtomicBool>,
        reader: AsyncReader,
        counters: Counters,
        device: DeviceThread,
    }

    fn rig(slots: usize) -> Rig {
        let bus = Bus::new();
        let completions = Completions::new(slots);
        let written = Arc::new(Mutex::new(vec![Vec::new(); slots]));
        let zlp_on_submit = Arc::new(AtomicBool::new(false));
        let pool = FakePool {
            bus: Arc::clone(&bus),
            completions: Arc::clone(&completions),
            written: Arc::clone(&written),
            zlp_on_submit: Arc::clone(&zlp_on_submit),
            buffers: vec![Vec::new(); slots],
        };
        let reader = AsyncReader::new(Box::new(pool), Arc::clone(&completions));
        Rig {
            bus,
            completions,
            written,
            zlp_on_submit,
            reader,
            counters: Counters::default(),
            device: DeviceThread::new(),
        }
    }

    impl Rig {
        fn start(&mut self) {
            self.reader.start(self.device.waker()).unwrap();
        }

        /// The controller completes the oldest submitted transfer with `data`.
        fn complete(&self, data: &[u8]) -> usize {
            let slot = self.bus.lock().unwrap().take_oldest();
            self.written.lock().unwrap()[slot] = data.to_vec();
            self.completions.completed(slot, Outcome::Data(data.len()));
            slot
        }

        fn fail(&self, error: rusb::Error) {
            let slot = self.bus.lock().unwrap().take_oldest();
            self.completions.completed(slot, Outcome::Failed(error));
        }

        fn in_flight(&self) -> Vec<usize> {
            self.bus.lock().unwrap().queued.iter().copied().collect()
        }

        fn submissions(&self) -> Vec<usize> {
            self.bus.lock().unwrap().submissions.clone()
        }

        fn recv(&mut self, size: usize) -> Result<Option<Vec<u8>>, Fault> {
            let mut buf = vec![0; size];
            Ok(self
                .reader
                .recv(&mut buf, &self.counters)?
                .map(|n| buf[..n].to_vec()))
        }

        /// Everything `recv` gives until `None`, concatenated.
        fn drain(&mut self, size: usize) -> Vec<u8> {
            let mut out = Vec::new();
            for _ in 0..1000 {
                match self.recv(size).unwrap() {
                    Some(chunk) => out.extend_from_slice(&chunk),
                    None => return out,
                }
            }
            panic!("recv never returned None");
        }

        /// Whether the device thread's waker fired since the last call.
        fn woken(&mut self) -> bool {
            self.device.woken(Duration::ZERO)
        }

        /// Whether nothing is in flight, as the completions count it.
        fn idle(&self) -> bool {
            self.completions.tracker.wait_idle(Duration::ZERO)
        }
    }

    #[test]
    fn start_submits_every_slot_and_nothing_before() {
        let mut r = rig(4);
        assert!(r.submissions().is_empty());
        assert!(!r.bus.lock().unwrap().started);
        r.start();
        assert!(r.bus.lock().unwrap().started);
        assert_eq!(r.in_flight(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn completions_are_delivered_in_order_and_resubmitted_after_consumption() {
        let mut r = rig(3);
        r.start();
        assert!(!r.woken());
        r.complete(b"first ");
        assert!(r.woken(), "empty -> non-empty wakes the device thread");
        r.complete(b"second ");
        assert!(!r.woken(), "a non-empty queue needs no second wake");
        r.complete(b"third");
        // All three complete, none consumed: none is resubmitted (backpressure).
        assert!(r.in_flight().is_empty());
        assert_eq!(r.submissions(), vec![0, 1, 2]);
        // Read 4 bytes: slot 0 is not drained, so it is not resubmitted yet.
        assert_eq!(r.recv(4).unwrap().unwrap(), b"firs");
        assert!(r.in_flight().is_empty());
        assert_eq!(r.recv(100).unwrap().unwrap(), b"t ");
        assert_eq!(r.in_flight(), vec![0], "drained slot 0 goes back at once");
        assert_eq!(r.drain(100), b"second third");
        assert_eq!(r.in_flight(), vec![0, 1, 2]);
        assert_eq!(r.counters.in_transfers.load(Ordering::Relaxed), 3);
        assert_eq!(r.counters.in_bytes.load(Ordering::Relaxed), 18);
        // The rotation continues in the same order.
        assert_eq!(r.complete(b"fourth"), 0);
        assert_eq!(r.drain(100), b"fourth");
        assert_eq!(r.in_flight(), vec![1, 2, 0]);
    }

    #[test]
    fn lent_transfers_are_whole_in_order_and_resubmitted() {
        let mut r = rig(2);
        r.start();
        r.complete(b"first");
        r.complete(b"");
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let got = r
            .reader
            .recv_with(&r.counters, &mut |b| seen.push(b.to_vec()));
        assert_eq!(got, Ok(Some(5)));
        // The zero-length transfer is skipped (never lent), the next one lent whole; the
        // emptied transfers go back at the end of the turn.
        r.reader.submit_emptied();
        r.complete(b"second");
        let got = r
            .reader
            .recv_with(&r.counters, &mut |b| seen.push(b.to_vec()));
        assert_eq!(got, Ok(Some(6)));
        r.reader.submit_emptied();
        // Part of a transfer by copy, the rest lent: the offset carries over.
        r.complete(b"third!");
        let mut half = [0u8; 3];
        assert_eq!(r.reader.recv(&mut half, &r.counters), Ok(Some(3)));
        let got = r
            .reader
            .recv_with(&r.counters, &mut |b| seen.push(b.to_vec()));
        assert_eq!(got, Ok(Some(3)));
        assert_eq!(&half, b"thi");
        assert_eq!(seen, [&b"first"[..], b"second", b"rd!"]);
        assert_eq!(
            r.reader
                .recv_with(&r.counters, &mut |_| panic!("lent nothing")),
            Ok(None)
        );
        r.reader.submit_emptied();
        // Every consumed slot went back in flight.
        assert_eq!(r.bus.lock().unwrap().queued.len(), 2);
    }

    /// A lent transfer is submitted again only by `submit_emptied` (the end of the device
    /// thread's turn, after the OUT transfers its bytes let go), oldest first, once each; after
    /// a fault or a close nothing is.
    #[test]
    fn lent_transfers_go_back_at_the_end_of_the_turn() {
        let mut r = rig(3);
        r.start();
        let a = r.complete(b"ack one");
        let b = r.complete(b"ack two");
        for _ in 0..2 {
            assert!(r
                .reader
                .recv_with(&r.counters, &mut |_| {})
                .unwrap()
                .is_some());
        }
        assert_eq!(r.reader.recv_with(&r.counters, &mut |_| {}), Ok(None));
        // Only the transfer nobody emptied is still on the bus.
        assert_eq!(r.in_flight().len(), 1);
        let before = r.submissions().len();
        r.reader.submit_emptied();
        assert_eq!(&r.submissions()[before..], &[a, b]);
        assert_eq!(r.in_flight().len(), 3);
        r.reader.submit_emptied();
        assert_eq!(
            r.submissions().len(),
            before + 2,
            "each emptied transfer goes back once"
        );

        // Emptied, then the link fails: nothing goes back.
        r.complete(b"data");
        assert!(r
            .reader
            .recv_with(&r.counters, &mut |_| {})
            .unwrap()
            .is_some());
        r.fail(rusb::Error::NoDevice);
        let before = r.submissions().len();
        r.reader.submit_emptied();
        assert_eq!(
            r.submissions().len(),
            before,
            "no resubmission after a fault"
        );
    }

    /// An emptied transfer waiting for the end of the turn is not in flight: a close neither
    /// waits for it nor submits it.
    #[test]
    fn lent_transfers_are_not_resubmitted_once_closing() {
        let mut r = rig(2);
        r.start();
        r.complete(b"x");
        assert!(r
            .reader
            .recv_with(&r.counters, &mut |_| {})
            .unwrap()
            .is_some());
        let t0 = Instant::now();
        r.reader.close();
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "close waited for the emptied transfer"
        );
        assert!(r.idle());
        let before = r.submissions();
        r.reader.submit_emptied();
        assert_eq!(r.submissions(), before, "no resubmission once closing");
    }

    #[test]
    fn a_device_thread_that_falls_behind_stops_resubmission() {
        let mut r = rig(2);
        r.start();
        r.complete(b"a");
        r.complete(b"b");
        // The "phone" has more, but nothing is in flight to carry it.
        assert!(r.in_flight().is_empty());
        assert_eq!(r.recv(1).unwrap().unwrap(), b"a");
        assert_eq!(r.in_flight(), vec![0]);
        r.complete(b"c");
        assert_eq!(r.drain(10), b"bc");
        assert_eq!(r.in_flight(), vec![1, 0]);
    }

    #[test]
    fn zero_length_completions_are_skipped_and_resubmitted() {
        let mut r = rig(3);
        r.start();
        r.complete(b"");
        r.complete(b"x");
        r.complete(b"");
        assert_eq!(r.drain(10), b"x");
        assert_eq!(r.counters.in_zlps.load(Ordering::Relaxed), 2);
        assert_eq!(r.counters.in_transfers.load(Ordering::Relaxed), 1);
        assert_eq!(r.in_flight(), vec![0, 1, 2]);
        // A lone ZLP: recv resubmits it and has nothing to give.
        r.complete(b"");
        assert_eq!(r.recv(10).unwrap(), None);
        assert_eq!(r.in_flight(), vec![1, 2, 0]);
    }

    #[test]
    fn endless_zero_length_packets_do_not_spin_or_strand_the_device_thread() {
        let mut r = rig(2);
        r.start();
        r.complete(b"");
        r.complete(b"");
        assert!(r.woken());
        // From now on the queue never runs empty, so completions wake nobody.
        r.zlp_on_submit.store(true, Ordering::SeqCst);
        // Every retired ZLP comes straight back: recv gives up after a bounded turn...
        assert_eq!(r.recv(10).unwrap(), None);
        // ...and, with the queue still non-empty, wakes the device thread itself.
        assert!(
            r.woken(),
            "a None with completions still queued must come with a wake"
        );
        r.zlp_on_submit.store(false, Ordering::SeqCst);
        assert_eq!(r.drain(10), b"");
        assert_eq!(r.in_flight().len(), 2);
    }

    #[test]
    fn a_failed_transfer_delivers_earlier_data_then_the_fault() {
        let mut r = rig(3);
        r.start();
        r.complete(b"before");
        assert!(r.woken());
        r.fail(rusb::Error::NoDevice);
        assert_eq!(r.reader.fault(), Some(Fault::Disconnected));
        // A transfer that still completes after the fault is not delivered (hole in stream).
        r.complete(b"after");
        assert_eq!(r.recv(100).unwrap().unwrap(), b"before");
        assert_eq!(r.recv(100), Err(Fault::Disconnected));
        assert_eq!(r.recv(100), Err(Fault::Disconnected));
        // Consumed slot 0 is not resubmitted after the fault.
        assert!(r.in_flight().is_empty());
        assert_eq!(r.submissions(), vec![0, 1, 2]);
    }

    #[test]
    fn a_fault_wakes_the_device_thread() {
        let mut r = rig(2);
        r.start();
        r.fail(rusb::Error::Io);
        assert!(r.woken());
        assert_eq!(
            r.recv(10),
            Err(Fault::Usb {
                what: "bulk IN",
                error: rusb::Error::Io
            })
        );
        // The other transfer is still in flight until close cancels it.
        assert_eq!(r.in_flight(), vec![1]);
        r.reader.close();
        assert!(r.in_flight().is_empty());
    }

    #[test]
    fn a_failed_resubmission_is_a_fault_after_the_data() {
        let mut r = rig(1);
        r.start();
        r.complete(b"last");
        r.bus
            .lock()
            .unwrap()
            .submit_errors
            .push_back(rusb::Error::NoDevice);
        assert_eq!(r.recv(100).unwrap().unwrap(), b"last");
        assert_eq!(r.recv(100), Err(Fault::Disconnected));
        assert!(r.in_flight().is_empty());
        assert!(r.idle(), "count balanced");
    }

    #[test]
    fn a_failed_first_submission_is_reported() {
        let mut r = rig(2);
        r.bus
            .lock()
            .unwrap()
            .submit_errors
            .push_back(rusb::Error::Access);
        r.start();
        assert!(r.woken());
        assert!(
            r.in_flight().is_empty(),
            "no submission after the first fails"
        );
        assert!(matches!(r.recv(10), Err(Fault::Usb { .. })));
    }

    #[test]
    fn an_unexpected_cancellation_is_a_fault() {
        let mut r = rig(2);
        r.start();
        let slot = r.bus.lock().unwrap().queued.pop_front().unwrap();
        r.completions.completed(slot, Outcome::Cancelled);
        assert!(r.recv(10).is_err());
    }

    #[test]
    fn close_cancels_in_flight_transfers_and_waits_for_them() {
        let mut r = rig(4);
        r.start();
        r.complete(b"pending");
        r.reader.close();
        let bus = r.bus.lock().unwrap();
        assert_eq!(bus.cancels, vec![0, 1, 2, 3]);
        assert!(bus.queued.is_empty());
        assert!(bus.stopped);
        drop(bus);
        assert!(r.idle());
        // Closing twice (close, then drop) cancels once.
        r.reader.close();
        assert_eq!(r.bus.lock().unwrap().cancels.len(), 4);
    }

    #[test]
    fn close_waits_for_completions_that_come_from_another_thread() {
        let mut r = rig(3);
        r.bus.lock().unwrap().cancel_completes = false;
        r.start();
        let (bus, completions) = (Arc::clone(&r.bus), Arc::clone(&r.completions));
        let event_thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let slots: Vec<usize> = bus.lock().unwrap().queued.drain(..).collect();
            for slot in slots {
                completions.completed(slot, Outcome::Cancelled);
            }
        });
        let t0 = Instant::now();
        r.reader.close();
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(40),
            "returned after {waited:?}"
        );
        assert!(r.bus.lock().unwrap().stopped);
        assert!(r.idle());
        event_thread.join().unwrap();
        // Cancellations during close are not faults.
        assert_eq!(r.reader.fault(), None);
    }

    #[test]
    fn inline_completions_wake_nobody_and_close_pumps_until_idle() {
        let mut r = rig(2);
        r.bus.lock().unwrap().cancel_completes = false;
        // Inline events: each pump completes every cancelled transfer, as libusb's event
        // handling on the calling thread would (the fake bus's cancel does not complete them).
        let (bus, completions) = (Arc::clone(&r.bus), Arc::clone(&r.completions));
        let pump = Pump::new(move || {
            let cancelled: Vec<usize> = {
                let mut bus = bus.lock().unwrap();
                let cancels = bus.cancels.clone();
                bus.queued.retain(|s| !cancels.contains(s));
                cancels
            };
            for slot in cancelled {
                completions.completed(slot, Outcome::Cancelled);
            }
        });
        r.completions
            .set_pump(Arc::clone(&pump) as Arc<dyn EventPump>);
        r.start();
        r.complete(b"inline");
        assert!(!r.woken(), "an inline completion woke the device thread");
        let mut buf = [0u8; 16];
        assert_eq!(r.reader.recv(&mut buf, &r.counters), Ok(Some(6)));
        assert_eq!(&buf[..6], b"inline");
        let started = Instant::now();
        r.reader.close();
        assert!(pump.pumps() >= 1);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "close waited instead of pumping"
        );
        assert!(r.idle());
        assert!(r.bus.lock().unwrap().stopped);
    }

    #[test]
    fn close_does_not_hang_when_cancellations_never_come() {
        let r = rig(2);
        let Rig {
            bus,
            completions,
            reader,
            device,
            ..
        } = r;
        bus.lock().unwrap().cancel_completes = false;
        let mut reader = reader.with_cancel_wait(Duration::from_millis(100));
        reader.start(device.waker()).unwrap();
        let t0 = Instant::now();
        drop(reader);
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(
            bus.lock().unwrap().stopped,
            "the pool is told to stop anyway"
        );
        assert!(!completions.tracker.wait_idle(Duration::ZERO));
    }

    #[test]
    fn a_reader_never_started_submits_and_cancels_nothing() {
        let r = rig(2);
        let bus = Arc::clone(&r.bus);
        drop(r);
        let bus = bus.lock().unwrap();
        assert!(bus.submissions.is_empty());
        assert!(bus.cancels.is_empty());
        assert!(bus.stopped);
    }

    #[test]
    fn nothing_is_submitted_after_close() {
        let mut r = rig(2);
        r.start();
        r.complete(b"ab");
        r.reader.close();
        let before = r.submissions();
        // The queued data is still readable; its slot is not resubmitted.
        assert_eq!(r.recv(10).unwrap().unwrap(), b"ab");
        assert_eq!(r.submissions(), before);
    }
}
