//! The logic of an asynchronous OUT strategy: a small ring of pre-allocated bulk OUT transfers,
//! filled and submitted in order by the device thread, completed on libusb's event thread.
//!
//! Why: the writer thread's synchronous transfers cost about 8 system calls and 2–3 context
//! switches per OUT transfer in the VM (libusb's event lock changes hands between the writer and
//! the event thread each time), the main reason our CPU per GiB host → device is above Debian's
//! usbmuxd, which submits asynchronous transfers from its main loop. With the transfers
//! submitted straight from [`Link::send`](crate::link::Link::send) there is no hand-over to a
//! writer thread at all.
//!
//! Like [`super::async_in`], this module holds no `unsafe`: the transfers sit behind the small
//! [`OutPool`] trait ("copy these bytes into slot `i` and submit it", "cancel slot `i`"), which a
//! libusb backend implements and the tests below implement with a fake bus. Completions go to
//! [`OutCompletions`], which does the minimum on the event thread: free the slot (or record the
//! fault), signal a sender waiting for room, wake the device thread on a fault.
//!
//! - **Order.** Only the device thread submits, one packet at a time, and libusb completes the
//!   transfers of one endpoint in submission order, so the phone sees the packets in the order
//!   `send` was called. Free slots are reused oldest first.
//! - **ZLP.** The caller decides, exactly as for the writer thread (`zlp` of `Link::send`,
//!   i.e. `usbmux_core::usb::needs_zlp`: a non-empty packet whose length is a multiple of
//!   `wMaxPacketSize`); the pool turns it into libusb's `ADD_ZERO_PACKET` flag on the same
//!   transfer instead of a second zero-length transfer.
//! - **Backpressure.** The same as the writer thread's full queue: when every slot is in flight,
//!   `send` waits for a completion to free one, at most the stall limit, and then fails the link
//!   as stalled.
//! - **Failure.** A transfer that fails, times out, moves fewer bytes than asked or is cancelled
//!   by someone else records the same [`Fault`] the writer thread would, wakes the device
//!   thread, and makes every later `send` fail with it.
//! - **Shutdown.** [`AsyncWriter::close`] lets the packets in flight finish for a short while
//!   (the writer thread also finishes its queue), then cancels what is left and waits (bounded)
//!   for every callback before stopping the pool; if callbacks never come it gives up after the
//!   bound instead of hanging, and the backend keeps its memory alive (see
//!   [`super::libusb_pool`] for that ownership design).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::async_common::{EventPump, Tracker, CANCEL_WAIT};
use super::link::Fault;
use crate::link::LinkError;

/// How long [`AsyncWriter::close`] lets transfers in flight complete before cancelling them.
pub(crate) const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// How one OUT transfer ended, as the pool's completion callback reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutOutcome {
    /// Completed, having moved this many bytes (not counting the zero-length packet).
    Sent(usize),
    /// Failed; `NoDevice` means unplugged.
    Failed(rusb::Error),
    /// Cancelled (expected only during [`AsyncWriter::close`]).
    Cancelled,
}

/// A fixed set of OUT transfers ("slots") with a buffer of [`OutPool::capacity`] bytes each.
/// Every successful [`OutPool::submit`] leads to exactly one [`OutCompletions::completed`] call
/// for that slot, from any thread, possibly before `submit` returns. Only the device thread
/// calls these methods.
pub(crate) trait OutPool: Send {
    /// Number of slots.
    fn slots(&self) -> usize;

    /// Bytes each slot's buffer holds: the largest packet `submit` accepts.
    fn capacity(&self) -> usize;

    /// Starts whatever runs the completions (libusb's event thread).
    fn start(&mut self) -> Result<(), LinkError>;

    /// Slot `slot`'s buffer ([`OutPool::capacity`] bytes) to write the next packet into, in
    /// place; empty while the slot is in flight or for a slot that does not exist.
    fn buffer(&mut self, slot: usize) -> &mut [u8];

    /// Submits the first `len` bytes of slot `slot`'s buffer as one transfer, followed by a
    /// zero-length packet when `zlp`. The slot is not in flight. An error means nothing was
    /// submitted and no completion will come.
    fn submit(&mut self, slot: usize, len: usize, zlp: bool) -> Result<(), rusb::Error>;

    /// Asks for slot `slot` to be cancelled if it is in flight (its completion still comes).
    fn cancel(&mut self, slot: usize);

    /// Stops the event handling; called once, after every completion came in (or the wait for
    /// them gave up).
    fn stop(&mut self);
}

/// OUT transfer counters of the asynchronous strategy (the writer thread keeps its own).
#[derive(Debug, Default)]
pub(crate) struct OutCounters {
    /// Transfers completed in full.
    pub(crate) transfers: AtomicU64,
    /// Bytes in them.
    pub(crate) bytes: AtomicU64,
    /// Of them, transfers that ended with a zero-length packet.
    pub(crate) zlps: AtomicU64,
}

/// The OUT slots' own bookkeeping, under the [`Tracker`]'s lock.
#[derive(Debug)]
struct Ring {
    /// Slots not in flight, the longest idle first.
    free: VecDeque<usize>,
    /// Per slot: the length and ZLP flag of its current submission.
    submitted: Vec<(usize, bool)>,
}

/// Where an OUT pool's completions go; shared between the completion callback and the
/// [`AsyncWriter`]. Its condition variable is signalled on every completion (a slot freed, a
/// fault, or nothing left in flight): a full ring waits for any of them.
#[derive(Debug)]
pub(crate) struct OutCompletions {
    tracker: Tracker<Ring>,
    pub(crate) counters: OutCounters,
}

impl OutCompletions {
    /// Completions for a pool of `slots` transfers (all free).
    pub(crate) fn new(slots: usize) -> Arc<OutCompletions> {
        Arc::new(OutCompletions {
            tracker: Tracker::new(Ring {
                free: (0..slots).collect(),
                submitted: vec![(0, false); slots],
            }),
            counters: OutCounters::default(),
        })
    }

    /// Makes waits handle events with `pump` (inline events), before the pool starts.
    pub(crate) fn set_pump(&self, pump: Arc<dyn EventPump>) {
        self.tracker.set_pump(pump);
    }

    /// Reports how a submitted transfer ended (on the event thread): one short lock, no
    /// allocation (the free list has room for every slot), a wake only on a fault.
    pub(crate) fn completed(&self, slot: usize, outcome: OutOutcome) {
        let new_fault = {
            let mut s = self.tracker.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            let (len, zlp) = s.slots.submitted.get(slot).copied().unwrap_or((0, false));
            let fault = match outcome {
                OutOutcome::Sent(n) if n == len => {
                    let c = &self.counters;
                    c.transfers.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(len as u64, Ordering::Relaxed);
                    if zlp {
                        c.zlps.fetch_add(1, Ordering::Relaxed);
                    }
                    None
                }
                OutOutcome::Sent(wrote) => Some(Fault::ShortWrite { wrote, len }),
                OutOutcome::Failed(error) => Some(Fault::from_usb("bulk OUT", error)),
                OutOutcome::Cancelled if s.closing => None,
                OutOutcome::Cancelled => Some(Fault::Usb {
                    what: "bulk OUT",
                    error: rusb::Error::Interrupted,
                }),
            };
            if slot < s.slots.submitted.len() && !s.slots.free.contains(&slot) {
                s.slots.free.push_back(slot);
            }
            let new_fault = fault.is_some_and(|fault| s.fail(fault));
            self.tracker.notify();
            new_fault
        };
        if new_fault {
            self.tracker.wake();
        }
    }

    /// The first OUT failure, if any.
    pub(crate) fn fault(&self) -> Option<Fault> {
        self.tracker.lock().fault
    }
}

/// The OUT side of a link in the asynchronous strategy: owns the pool, submits each packet in
/// order into a free slot. Used only from the device thread.
pub(crate) struct AsyncWriter {
    pool: Box<dyn OutPool>,
    completions: Arc<OutCompletions>,
    stall_limit: Duration,
    drain_wait: Duration,
    cancel_wait: Duration,
    /// A free slot handed out by [`AsyncWriter::reserve`] and not submitted yet.
    reserved: Option<usize>,
    /// A slot set aside by [`AsyncWriter::hold`]: `reserve` and `send` leave it alone.
    held: Option<usize>,
    started: bool,
    closed: bool,
}

impl AsyncWriter {
    /// A writer over `pool`, reporting to `completions`; `send` waits at most `stall_limit` for
    /// a free slot.
    pub(crate) fn new(
        pool: Box<dyn OutPool>,
        completions: Arc<OutCompletions>,
        stall_limit: Duration,
    ) -> AsyncWriter {
        AsyncWriter {
            pool,
            completions,
            stall_limit,
            drain_wait: DRAIN_WAIT,
            cancel_wait: CANCEL_WAIT,
            reserved: None,
            held: None,
            started: false,
            closed: false,
        }
    }

    /// Replaces [`DRAIN_WAIT`] and [`CANCEL_WAIT`] (tests).
    #[cfg(test)]
    fn with_waits(mut self, drain: Duration, cancel: Duration) -> AsyncWriter {
        self.drain_wait = drain;
        self.cancel_wait = cancel;
        self
    }

    /// Starts the pool's event handling; faults from now on wake `waker`.
    pub(crate) fn start(&mut self, waker: Arc<mio::Waker>) -> Result<(), LinkError> {
        self.completions.tracker.set_waker(waker);
        self.pool.start()?;
        self.started = true;
        Ok(())
    }

    /// The first OUT failure, if any.
    pub(crate) fn fault(&self) -> Option<Fault> {
        self.completions.fault()
    }

    /// Transfers completed so far.
    pub(crate) fn counters(&self) -> &OutCounters {
        &self.completions.counters
    }

    /// A free slot's buffer to build the next packet in, without waiting: `None` when every
    /// slot is in flight (then [`AsyncWriter::send`] waits for one) or the link has failed.
    /// The slot stays reserved, unsubmitted, until [`AsyncWriter::submit_reserved`] (or a
    /// `send`) uses it, so asking again returns the same buffer.
    pub(crate) fn reserve(&mut self) -> Option<&mut [u8]> {
        if self.reserved.is_none() {
            self.reserved = self.take_free(1);
        }
        let slot = self.reserved?;
        Some(self.pool.buffer(slot))
    }

    /// A free slot for `reserve` (`keep` 1: any) or `hold` (`keep` 2: one must stay for the
    /// other packets, the reserved slot or a free one); `None` too once the link has failed
    /// or is closing. The reserved slot comes from the front of the free list (the oldest
    /// freed), the held one from the back.
    fn take_free(&mut self, keep: usize) -> Option<usize> {
        let mut s = self.completions.tracker.lock();
        if s.fault.is_some() || s.closing || !self.started {
            return None;
        }
        if s.slots.free.len() + usize::from(self.reserved.is_some()) < keep {
            return None;
        }
        if keep == 1 {
            s.slots.free.pop_front()
        } else {
            s.slots.free.pop_back()
        }
    }

    /// Submits the first `len` bytes of the buffer [`AsyncWriter::reserve`] returned as one
    /// transfer (plus its ZLP when `zlp`).
    pub(crate) fn submit_reserved(&mut self, len: usize, zlp: bool) -> Result<(), Fault> {
        let slot = self.reserved.take();
        self.submit_set_aside(slot, len, zlp)
    }

    /// A free slot's buffer set aside for the caller until [`AsyncWriter::submit_held`] or
    /// [`AsyncWriter::release_held`]: `reserve` and `send` do not touch it, and asking again
    /// returns it unchanged. `None` when the link has failed or is closing, or when taking it
    /// would leave no free slot for everything else.
    pub(crate) fn hold(&mut self) -> Option<&mut [u8]> {
        if self.held.is_none() {
            self.held = self.take_free(2);
        }
        let slot = self.held?;
        Some(self.pool.buffer(slot))
    }

    /// Submits the first `len` bytes of the held buffer as one transfer (plus its ZLP when
    /// `zlp`), after everything submitted before.
    pub(crate) fn submit_held(&mut self, len: usize, zlp: bool) -> Result<(), Fault> {
        let slot = self.held.take();
        self.submit_set_aside(slot, len, zlp)
    }

    /// Gives the held slot back unsent.
    pub(crate) fn release_held(&mut self) {
        if let Some(slot) = self.held.take() {
            self.completions.tracker.lock().slots.free.push_back(slot);
        }
    }

    /// Submits a slot taken from the free list earlier (reserved or held).
    fn submit_set_aside(
        &mut self,
        slot: Option<usize>,
        len: usize,
        zlp: bool,
    ) -> Result<(), Fault> {
        let Some(slot) = slot else {
            return Err(Fault::Usb {
                what: "bulk OUT",
                error: rusb::Error::InvalidParam,
            });
        };
        {
            let mut s = self.completions.tracker.lock();
            if let Some(fault) = s.fault {
                s.slots.free.push_front(slot);
                return Err(fault);
            }
            s.in_flight += 1;
            if let Some(entry) = s.slots.submitted.get_mut(slot) {
                *entry = (len, zlp);
            }
        }
        self.submit(slot, len, zlp)
    }

    /// Submits slot `slot`, already counted in flight; a refusal becomes the fault.
    fn submit(&mut self, slot: usize, len: usize, zlp: bool) -> Result<(), Fault> {
        if let Err(error) = self.pool.submit(slot, len, zlp) {
            // Nothing was submitted: report it as the completion that will never come.
            self.completions.completed(slot, OutOutcome::Failed(error));
            return Err(self.fault().unwrap_or(Fault::Disconnected));
        }
        Ok(())
    }

    /// Submits `data` as one transfer (plus its ZLP when `zlp`), waiting at most the stall limit
    /// for a free slot. Errors: the link's fault, or a stall (which becomes the fault).
    pub(crate) fn send(&mut self, data: &[u8], zlp: bool) -> Result<(), Fault> {
        if data.len() > self.pool.capacity() {
            // The link never sends more than one mux packet per transfer, which fits a slot;
            // refusing is better than splitting a packet across transfers.
            return Err(Fault::Usb {
                what: "bulk OUT",
                error: rusb::Error::InvalidParam,
            });
        }
        let slot = {
            let tracker = &self.completions.tracker;
            let mut s = tracker.lock();
            // A slot reserved for in-place building and not used goes first.
            if let Some(slot) = self.reserved.take() {
                s.slots.free.push_front(slot);
            }
            // Read the clock only when the ring is full: each read is a system call where the
            // vDSO has no usable clock (the VM guest).
            let mut deadline = None;
            loop {
                if let Some(fault) = s.fault {
                    return Err(fault);
                }
                if s.closing || !self.started {
                    return Err(Fault::Disconnected);
                }
                if let Some(slot) = s.slots.free.pop_front() {
                    s.in_flight += 1;
                    if let Some(entry) = s.slots.submitted.get_mut(slot) {
                        *entry = (data.len(), zlp);
                    }
                    break slot;
                }
                let now = std::time::Instant::now();
                let deadline = *deadline.get_or_insert(now + self.stall_limit);
                if now >= deadline {
                    let fault = Fault::Stalled(self.stall_limit);
                    s.fault = Some(fault);
                    return Err(fault);
                }
                s = tracker.wait(s, deadline - now);
            }
        };
        let buf = self.pool.buffer(slot);
        match buf.get_mut(..data.len()) {
            Some(dst) => dst.copy_from_slice(data),
            None => {
                // Cannot happen (the slot is free and `data` fits the capacity): refuse rather
                // than send a different packet.
                self.completions
                    .completed(slot, OutOutcome::Failed(rusb::Error::InvalidParam));
                return Err(self.fault().unwrap_or(Fault::Disconnected));
            }
        }
        self.submit(slot, data.len(), zlp)
    }

    /// Lets the transfers in flight finish (bounded), cancels the rest, waits (bounded) for
    /// their callbacks and stops the pool. Idempotent.
    pub(crate) fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        let tracker = &self.completions.tracker;
        {
            let mut s = tracker.lock();
            s.closing = true;
            for slot in [self.reserved.take(), self.held.take()]
                .into_iter()
                .flatten()
            {
                s.slots.free.push_front(slot);
            }
        }
        tracker.notify();
        if self.started && !tracker.wait_idle(self.drain_wait) {
            let pool = &mut self.pool;
            tracker.cancel_all(
                pool.slots(),
                |slot| pool.cancel(slot),
                self.cancel_wait,
                "OUT",
            );
        }
        self.pool.stop();
    }
}

impl Drop for AsyncWriter {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    //! The ring, ordering, backpressure, failure and shutdown logic against a fake bus: the test
    //! plays the host controller, completing the oldest submitted transfer as libusb does on one
    //! endpoint.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::usb::async_common::fake::{DeviceThread, Pump};
    use std::sync::Mutex;
    use std::time::Instant;
    use usbmux_core::usb::needs_zlp;

    /// The fake bus: in flight and submitted are (slot, bytes, zlp flag).
    type Bus = crate::usb::async_common::fake::Bus<(usize, Vec<u8>, bool)>;

    struct FakePool {
        bus: Arc<Mutex<Bus>>,
        completions: Arc<OutCompletions>,
        slots: usize,
        capacity: usize,
        buffers: Vec<Vec<u8>>,
    }

    impl OutPool for FakePool {
        fn slots(&self) -> usize {
            self.slots
        }

        fn capacity(&self) -> usize {
            self.capacity
        }

        fn start(&mut self) -> Result<(), LinkError> {
            self.bus.lock().unwrap().started = true;
            Ok(())
        }

        fn buffer(&mut self, slot: usize) -> &mut [u8] {
            let in_flight = self.bus.lock().unwrap().in_flight(slot);
            match self.buffers.get_mut(slot) {
                Some(b) if !in_flight => b,
                _ => &mut [],
            }
        }

        fn submit(&mut self, slot: usize, len: usize, zlp: bool) -> Result<(), rusb::Error> {
            let data = self.buffers[slot][..len].to_vec();
            self.bus.lock().unwrap().submit((slot, data, zlp))
        }

        fn cancel(&mut self, slot: usize) {
            if self.bus.lock().unwrap().cancel(slot) {
                self.completions.completed(slot, OutOutcome::Cancelled);
            }
        }

        fn stop(&mut self) {
            self.bus.lock().unwrap().stopped = true;
        }
    }

    struct Rig {
        bus: Arc<Mutex<Bus>>,
        completions: Arc<OutCompletions>,
        writer: AsyncWriter,
        device: DeviceThread,
    }

    fn rig(slots: usize, stall: Duration) -> Rig {
        rig_with(slots, stall, false).0
    }

    /// A rig whose events are handled inline (`inline`) by the returned pump, each pump
    /// completing the oldest transfer in flight as libusb's event handling on the calling
    /// thread would.
    fn rig_with(slots: usize, stall: Duration, inline: bool) -> (Rig, Option<Arc<Pump>>) {
        let bus = Bus::new();
        let completions = OutCompletions::new(slots);
        let pump = inline.then(|| {
            let (bus, completions) = (Arc::clone(&bus), Arc::clone(&completions));
            Pump::new(move || {
                let next = bus.lock().unwrap().queued.pop_front();
                if let Some((slot, data, _)) = next {
                    completions.completed(slot, OutOutcome::Sent(data.len()));
                }
            })
        });
        if let Some(pump) = &pump {
            completions.set_pump(Arc::clone(pump) as Arc<dyn EventPump>);
        }
        let pool = FakePool {
            bus: Arc::clone(&bus),
            completions: Arc::clone(&completions),
            slots,
            capacity: 1024,
            buffers: vec![vec![0; 1024]; slots],
        };
        let mut writer = AsyncWriter::new(Box::new(pool), Arc::clone(&completions), stall)
            .with_waits(Duration::from_millis(50), Duration::from_millis(100));
        let device = DeviceThread::new();
        writer.start(device.waker()).unwrap();
        let rig = Rig {
            bus,
            completions,
            writer,
            device,
        };
        (rig, pump)
    }

    impl Rig {
        /// The controller completes the oldest transfer with `outcome` (`None`: all its bytes).
        fn complete(&self, outcome: Option<OutOutcome>) -> usize {
            let (slot, data, _) = self.bus.lock().unwrap().take_oldest();
            let outcome = outcome.unwrap_or(OutOutcome::Sent(data.len()));
            self.completions.completed(slot, outcome);
            slot
        }

        fn woken(&mut self) -> bool {
            self.device.woken(Duration::from_millis(100))
        }

        fn in_flight(&self) -> usize {
            self.bus.lock().unwrap().queued.len()
        }

        /// Whether nothing is in flight, as the completions count it.
        fn idle(&self) -> bool {
            self.completions.tracker.wait_idle(Duration::ZERO)
        }
    }

    #[test]
    fn packets_are_submitted_in_order_and_slots_reused_oldest_first() {
        let mut r = rig(3, Duration::from_secs(1));
        for i in 0..3u8 {
            r.writer.send(&[i; 10], false).unwrap();
        }
        assert_eq!(r.complete(None), 0);
        assert_eq!(r.complete(None), 1);
        r.writer.send(&[3; 10], false).unwrap();
        r.writer.send(&[4; 10], false).unwrap();
        let bus = r.bus.lock().unwrap();
        let order: Vec<(usize, u8)> = bus.submissions.iter().map(|s| (s.0, s.1[0])).collect();
        assert_eq!(order, [(0, 0), (1, 1), (2, 2), (0, 3), (1, 4)]);
        drop(bus);
        assert_eq!(r.completions.counters.transfers.load(Ordering::Relaxed), 2);
        assert_eq!(r.completions.counters.bytes.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn a_full_ring_blocks_send_until_a_completion_frees_a_slot() {
        let mut r = rig(2, Duration::from_secs(5));
        r.writer.send(b"a", false).unwrap();
        r.writer.send(b"b", false).unwrap();
        assert_eq!(r.in_flight(), 2);
        let completions = Arc::clone(&r.completions);
        let bus = Arc::clone(&r.bus);
        let controller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let (slot, data, _) = bus.lock().unwrap().queued.pop_front().unwrap();
            completions.completed(slot, OutOutcome::Sent(data.len()));
        });
        let started = Instant::now();
        r.writer.send(b"c", false).unwrap();
        let waited = started.elapsed();
        controller.join().unwrap();
        assert!(
            waited >= Duration::from_millis(80),
            "did not wait: {waited:?}"
        );
        assert!(waited < Duration::from_secs(4), "not woken: {waited:?}");
        let bus = r.bus.lock().unwrap();
        assert_eq!(bus.submissions.last().unwrap().0, 0);
        assert_eq!(bus.submissions.last().unwrap().1, b"c");
    }

    #[test]
    fn inline_a_full_ring_handles_events_itself_and_wakes_nobody() {
        let (mut r, pump) = rig_with(2, Duration::from_secs(5), true);
        let pump = pump.unwrap();
        for b in [b"a", b"b", b"c", b"d"] {
            r.writer.send(b, false).unwrap();
        }
        // The third and fourth sends found the ring full: each pumped once, which completed
        // the oldest transfer (no other thread exists to do it).
        assert_eq!(pump.pumps(), 2);
        let order: Vec<(usize, Vec<u8>)> = r
            .bus
            .lock()
            .unwrap()
            .submissions
            .iter()
            .map(|s| (s.0, s.1.clone()))
            .collect();
        assert_eq!(
            order,
            [
                (0, b"a".to_vec()),
                (1, b"b".to_vec()),
                (0, b"c".to_vec()),
                (1, b"d".to_vec())
            ]
        );
        assert!(!r.woken(), "an inline completion woke the device thread");
        // Close drains what is in flight by pumping, without cancelling.
        r.writer.close();
        assert_eq!(r.in_flight(), 0);
        assert!(r.bus.lock().unwrap().cancels.is_empty());
        assert!(r.idle());
        assert_eq!(r.completions.counters.transfers.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn packets_built_in_place_are_submitted_in_order_with_sends() {
        let mut r = rig(2, Duration::from_secs(1));
        let buf = r.writer.reserve().unwrap();
        assert_eq!(buf.len(), 1024);
        buf[..3].copy_from_slice(b"one");
        // Asking again without submitting: the same slot, the bytes still there.
        assert_eq!(&r.writer.reserve().unwrap()[..3], b"one");
        r.writer.submit_reserved(3, true).unwrap();
        r.writer.reserve().unwrap()[..3].copy_from_slice(b"two");
        r.writer.submit_reserved(3, false).unwrap();
        // Every slot in flight: nothing to build in, and submitting without a reservation fails.
        assert!(r.writer.reserve().is_none());
        assert!(r.writer.submit_reserved(1, false).is_err());
        r.complete(None);
        // A reservation left unused goes to the next `send`.
        r.writer.reserve().unwrap()[..5].copy_from_slice(b"stale");
        r.writer.send(b"three", false).unwrap();
        let bus = r.bus.lock().unwrap();
        let got: Vec<(usize, &[u8], bool)> = bus
            .submissions
            .iter()
            .map(|s| (s.0, s.1.as_slice(), s.2))
            .collect();
        assert_eq!(
            got,
            [
                (0, &b"one"[..], true),
                (1, &b"two"[..], false),
                (0, &b"three"[..], false)
            ]
        );
    }

    #[test]
    fn close_returns_an_unused_reservation() {
        let mut r = rig(1, Duration::from_secs(1));
        assert!(r.writer.reserve().is_some());
        r.writer.close();
        assert!(r.writer.reserve().is_none(), "reserved after close");
        assert_eq!(r.completions.tracker.lock().slots.free.len(), 1);
        assert!(r.bus.lock().unwrap().submissions.is_empty());
    }

    #[test]
    fn a_ring_that_never_frees_fails_the_link_as_stalled() {
        let mut r = rig(1, Duration::from_millis(100));
        r.writer.send(b"a", false).unwrap();
        let started = Instant::now();
        let err = r.writer.send(b"b", false).unwrap_err();
        assert_eq!(err, Fault::Stalled(Duration::from_millis(100)));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(r.writer.send(b"c", false), Err(err));
        assert_eq!(r.bus.lock().unwrap().submissions.len(), 1);
    }

    #[test]
    fn the_zlp_flag_follows_the_packet_size_rule() {
        let mut r = rig(8, Duration::from_secs(1));
        let cases = [
            (512, 512, true),
            (1000, 512, false),
            (64, 64, true),
            (100, 64, false),
        ];
        for &(len, mps, _) in &cases {
            r.writer.send(&vec![7; len], needs_zlp(len, mps)).unwrap();
        }
        let flags: Vec<(usize, bool)> = r
            .bus
            .lock()
            .unwrap()
            .submissions
            .iter()
            .map(|s| (s.1.len(), s.2))
            .collect();
        let expected: Vec<(usize, bool)> = cases.iter().map(|&(l, _, z)| (l, z)).collect();
        assert_eq!(flags, expected);
        for _ in 0..cases.len() {
            r.complete(None);
        }
        assert_eq!(r.completions.counters.zlps.load(Ordering::Relaxed), 2);
        assert_eq!(r.completions.counters.transfers.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn failures_become_the_link_fault_and_wake_the_device_thread() {
        for (outcome, fault) in [
            (
                OutOutcome::Failed(rusb::Error::NoDevice),
                Fault::Disconnected,
            ),
            (
                OutOutcome::Failed(rusb::Error::Timeout),
                Fault::Usb {
                    what: "bulk OUT",
                    error: rusb::Error::Timeout,
                },
            ),
            (OutOutcome::Sent(3), Fault::ShortWrite { wrote: 3, len: 10 }),
            (
                OutOutcome::Cancelled,
                Fault::Usb {
                    what: "bulk OUT",
                    error: rusb::Error::Interrupted,
                },
            ),
        ] {
            let mut r = rig(2, Duration::from_secs(1));
            r.writer.send(&[1; 10], false).unwrap();
            assert!(!r.woken());
            r.complete(Some(outcome));
            assert!(r.woken(), "{outcome:?} did not wake");
            assert_eq!(r.writer.fault(), Some(fault));
            assert_eq!(r.writer.send(b"x", false), Err(fault));
            assert_eq!(r.bus.lock().unwrap().submissions.len(), 1);
        }
    }

    #[test]
    fn a_refused_submission_is_a_fault_and_frees_its_slot() {
        let mut r = rig(1, Duration::from_millis(100));
        r.bus
            .lock()
            .unwrap()
            .submit_errors
            .push_back(rusb::Error::NoDevice);
        assert_eq!(r.writer.send(b"a", false), Err(Fault::Disconnected));
        assert!(r.idle());
        assert_eq!(r.writer.send(b"b", false), Err(Fault::Disconnected));
    }

    #[test]
    fn a_held_buffer_is_untouched_by_sends_and_in_place_builds_until_it_goes() {
        let mut r = rig(3, Duration::from_secs(1));
        r.writer.hold().expect("held")[..4].copy_from_slice(b"late");
        // Sends and in-place builds use the other two slots and never the held one.
        r.writer.reserve().expect("reserved")[..1].copy_from_slice(b"a");
        r.writer.submit_reserved(1, false).unwrap();
        r.writer.send(b"b", false).unwrap();
        // No slot left to spare: a send would wait for a completion, not take the held one.
        assert!(r.writer.reserve().is_none());
        assert_eq!(r.writer.hold().expect("the same")[..4], *b"late");
        r.writer.submit_held(4, false).unwrap();
        assert!(r.writer.hold().is_none(), "held the last free slot");
        let order: Vec<Vec<u8>> = r
            .bus
            .lock()
            .unwrap()
            .submissions
            .iter()
            .map(|s| s.1.clone())
            .collect();
        assert_eq!(order, [b"a".to_vec(), b"b".to_vec(), b"late".to_vec()]);
        // Released unsent, a held slot is free again; one is never held while it is the only
        // one left for everything else.
        r.complete(None);
        r.complete(None);
        assert!(r.writer.hold().is_some());
        r.writer.release_held();
        r.writer.send(b"c", false).unwrap();
        r.writer.send(b"d", false).unwrap();
        assert!(r.writer.hold().is_none());
        // A slot held at close is not submitted, and the writer ends idle.
        r.complete(None);
        r.complete(None);
        assert!(r.writer.hold().is_some());
        r.writer.close();
        assert!(r.idle());
        assert_eq!(r.bus.lock().unwrap().submissions.len(), 5);
        assert!(r.writer.hold().is_none());
    }

    #[test]
    fn an_oversized_packet_is_refused_without_submitting() {
        let mut r = rig(1, Duration::from_secs(1));
        assert!(r.writer.send(&[0; 1025], false).is_err());
        assert!(r.bus.lock().unwrap().submissions.is_empty());
        r.writer.send(&[0; 1024], false).unwrap();
    }

    #[test]
    fn close_cancels_what_is_in_flight_and_waits_for_the_callbacks() {
        let mut r = rig(3, Duration::from_secs(1));
        r.writer.send(b"a", false).unwrap();
        r.writer.send(b"b", false).unwrap();
        r.writer.close();
        let bus = r.bus.lock().unwrap();
        assert!(bus.queued.is_empty());
        assert_eq!(bus.cancels, [0, 1, 2]);
        assert!(bus.stopped && bus.started);
        drop(bus);
        assert!(r.idle());
        assert_eq!(r.writer.send(b"c", false), Err(Fault::Disconnected));
        // Cancellations during close are not faults.
        assert_eq!(r.writer.fault(), None);
    }

    #[test]
    fn close_lets_transfers_that_complete_in_time_finish_uncancelled() {
        let mut r = rig(2, Duration::from_secs(1));
        r.writer.send(b"a", false).unwrap();
        let completions = Arc::clone(&r.completions);
        let bus = Arc::clone(&r.bus);
        let controller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            let (slot, data, _) = bus.lock().unwrap().queued.pop_front().unwrap();
            completions.completed(slot, OutOutcome::Sent(data.len()));
        });
        r.writer.close();
        controller.join().unwrap();
        assert!(r.bus.lock().unwrap().cancels.is_empty());
        assert_eq!(r.completions.counters.transfers.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn close_does_not_hang_when_callbacks_never_come() {
        let mut r = rig(2, Duration::from_secs(1));
        r.bus.lock().unwrap().cancel_completes = false;
        r.writer.send(b"a", false).unwrap();
        let started = Instant::now();
        r.writer.close();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "close hung: {took:?}");
        let bus = r.bus.lock().unwrap();
        assert_eq!(bus.cancels, [0, 1]);
        assert!(bus.stopped);
    }
}
