//! What the asynchronous IN ([`super::async_in`]) and OUT ([`super::async_out`]) strategies
//! share: the [`Tracker`] between a pool's completion callback and the device thread, the
//! [`EventPump`] for inline events, and the bounded waits built on both.
//!
//! Why one place: both directions keep the same bookkeeping — transfers in flight, the first
//! [`Fault`], whether close has begun — behind one lock, wake the device thread through the same
//! waker and wait for completions the same way (on a condition variable when an event thread
//! runs the completions, by handling events themselves when they run inline). What differs
//! stays in each direction: its per-slot queue (IN: completed transfers in stream order; OUT:
//! free slots), when a completion wakes the device thread (IN: when the completed queue stops
//! being empty; OUT: on a fault) and when it signals a waiter (IN: only close waits, for
//! nothing in flight; OUT: a full ring waits for any completion).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::link::{lock, wake, Fault};
use crate::link::LinkError;

/// How long close waits for cancelled transfers to report back. libusb reports a cancellation
/// within a millisecond or so; this bound only matters if the event thread is wedged, and then
/// the pool keeps (leaks) its memory rather than free it under a transfer that may still
/// complete.
pub(crate) const CANCEL_WAIT: Duration = Duration::from_secs(2);

/// How long one [`Tracker::wait`] may handle events when the caller runs them inline: only a
/// bound on how often the caller re-checks its deadline (libusb returns as soon as it handled
/// something).
const PUMP_SLICE: Duration = Duration::from_millis(100);

/// Handling libusb's events on the device thread itself ([`EventStrategy::Inline`]
/// (super::EventStrategy::Inline)) instead of on an event thread: the completions of both
/// pools then run inside [`EventPump::pump`], on whichever thread calls it.
///
/// Why: with an event thread, every IN completion is a hand-over — the event thread wakes, takes
/// the queue's lock, writes the device thread's eventfd, and the device thread wakes to read it
/// — which in the VM cost more system calls and context switches per transfer than Debian's
/// usbmuxd spends in total, because it polls libusb's descriptors from its one main loop. The
/// device thread's mio loop watches [`EventPump::fds`] and calls `pump(0)` when one fires; the
/// few places that must wait for a completion (a full OUT ring, close) pump instead of sleeping
/// on a condition variable nobody would signal.
pub(crate) trait EventPump: Send + Sync {
    /// Handles the events pending now, or the first within `timeout`, on the calling thread.
    fn pump(&self, timeout: Duration);

    /// The file descriptors a poll loop must watch (with `true`: for writability, as libusb
    /// asks for usbfs descriptors; else for readability) so that it calls
    /// [`EventPump::pump`] whenever there is something to handle.
    fn fds(&self) -> Vec<(std::os::fd::RawFd, bool)>;
}

impl core::fmt::Debug for dyn EventPump {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("EventPump")
    }
}

/// The state under a [`Tracker`]'s lock: the bookkeeping both directions keep, plus the
/// direction's own per-slot queue.
#[derive(Debug)]
pub(crate) struct Ledger<Q> {
    /// The direction's own queue of slots (IN: completed transfers; OUT: free slots).
    pub(crate) slots: Q,
    /// Submitted transfers whose completion has not come yet.
    pub(crate) in_flight: usize,
    /// The first failure; nothing is submitted (nor, IN, queued) after it.
    pub(crate) fault: Option<Fault>,
    /// Close has begun: no more submissions, cancellations expected.
    pub(crate) closing: bool,
}

impl<Q> Ledger<Q> {
    /// Records `fault` unless a failure is already recorded (the first one is what the link
    /// reports). True if it was recorded.
    pub(crate) fn fail(&mut self, fault: Fault) -> bool {
        if self.fault.is_some() {
            return false;
        }
        log::debug!("USB link failed: {}", LinkError::from(fault));
        self.fault = Some(fault);
        true
    }

    /// Counts a submission about to happen (before it, since its completion may come first) if
    /// submitting is still allowed: no fault, not closing. True: submit it now.
    pub(crate) fn claim(&mut self) -> bool {
        let open = self.fault.is_none() && !self.closing;
        if open {
            self.in_flight += 1;
        }
        open
    }
}

/// Where a pool's completions meet the device thread: the [`Ledger`] under one lock, the
/// condition variable that waits sleep on, the device thread's waker and, with inline events,
/// the [`EventPump`] that waits handle events with instead.
#[derive(Debug)]
pub(crate) struct Tracker<Q> {
    ledger: Mutex<Ledger<Q>>,
    /// Signalled by completions that a waiter may be waiting for (never inline).
    changed: Condvar,
    /// The device thread's waker, set when the link starts, before the first submission.
    waker: OnceLock<Arc<mio::Waker>>,
    /// Set when events are handled inline ([`EventPump`]): completions then run on the
    /// thread that will look at the state next, and waits pump.
    pump: OnceLock<Arc<dyn EventPump>>,
}

impl<Q> Tracker<Q> {
    /// A tracker with nothing in flight around the direction's queue `slots`.
    pub(crate) fn new(slots: Q) -> Tracker<Q> {
        Tracker {
            ledger: Mutex::new(Ledger {
                slots,
                in_flight: 0,
                fault: None,
                closing: false,
            }),
            changed: Condvar::new(),
            waker: OnceLock::new(),
            pump: OnceLock::new(),
        }
    }

    /// Makes waits handle events with `pump` (inline events), before the pool starts.
    pub(crate) fn set_pump(&self, pump: Arc<dyn EventPump>) {
        let _ = self.pump.set(pump);
    }

    /// Sets the device thread's waker; only the first call counts (`UsbLink` refuses a second
    /// start anyway).
    pub(crate) fn set_waker(&self, waker: Arc<mio::Waker>) {
        let _ = self.waker.set(waker);
    }

    /// Whether events are handled inline, by the thread that reads the state.
    pub(crate) fn inline(&self) -> bool {
        self.pump.get().is_some()
    }

    /// The state, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Ledger<Q>> {
        lock(&self.ledger)
    }

    /// Wakes the threads waiting in [`Tracker::wait`]. Inline, nobody sleeps on the condition
    /// variable (waits pump), and notifying is a system call even then, so it does nothing.
    pub(crate) fn notify(&self) {
        if !self.inline() {
            self.changed.notify_all();
        }
    }

    /// Wakes the device thread's poll loop (once the link has started).
    pub(crate) fn wake(&self) {
        if let Some(waker) = self.waker.get() {
            wake(waker);
        }
    }

    /// One bounded wait for a completion while holding `guard`: on the condition variable when
    /// completions come from an event thread, or by handling events inline (with the lock
    /// released: the completions take it) for at most [`PUMP_SLICE`]. Callers loop, re-checking
    /// their condition and deadline; wake-ups may be spurious.
    pub(crate) fn wait<'a>(
        &'a self,
        guard: MutexGuard<'a, Ledger<Q>>,
        left: Duration,
    ) -> MutexGuard<'a, Ledger<Q>> {
        match self.pump.get() {
            Some(pump) => {
                drop(guard);
                pump.pump(left.min(PUMP_SLICE));
                self.lock()
            }
            None => {
                self.changed
                    .wait_timeout(guard, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        }
    }

    /// Waits until nothing is in flight, at most `limit`; true if nothing is.
    pub(crate) fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut ledger = self.lock();
        while ledger.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            ledger = self.wait(ledger, deadline - now);
        }
        true
    }

    /// The end of close: `cancel`s each of the pool's `slots` and waits, at most `limit`, for
    /// every transfer in flight to report back. If some never do, says so: the pool then keeps
    /// their memory (see [`super::libusb_pool`]). `what` names the direction for the log.
    pub(crate) fn cancel_all(
        &self,
        slots: usize,
        mut cancel: impl FnMut(usize),
        limit: Duration,
        what: &str,
    ) {
        for slot in 0..slots {
            cancel(slot);
        }
        if !self.wait_idle(limit) {
            log::error!(
                "USB: {what} transfers still in flight {} ms after cancelling them",
                limit.as_millis()
            );
        }
    }
}

/// Test doubles both directions' tests use: a fake bus (the test plays the host controller), a
/// fake inline event pump, and the device thread's waker.
#[cfg(test)]
pub(crate) mod fake {
    #![allow(clippy::unwrap_used)]

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::EventPump;

    /// A transfer the fake bus holds: the slot it belongs to, and whatever else the direction's
    /// tests record about it.
    pub(crate) trait Transfer {
        /// The slot submitted.
        fn slot(&self) -> usize;
    }

    impl Transfer for usize {
        fn slot(&self) -> usize {
            *self
        }
    }

    impl<T, U> Transfer for (usize, T, U) {
        fn slot(&self) -> usize {
            self.0
        }
    }

    /// The host controller a fake pool submits to: the test completes its transfers, oldest
    /// first, as libusb does on one endpoint.
    #[derive(Debug, Default)]
    pub(crate) struct Bus<T> {
        /// Submitted transfers, oldest first (what the "controller" completes next).
        pub(crate) queued: VecDeque<T>,
        /// Every submission, in order.
        pub(crate) submissions: Vec<T>,
        pub(crate) cancels: Vec<usize>,
        /// Errors for the next submissions.
        pub(crate) submit_errors: VecDeque<rusb::Error>,
        /// Cancel completes the transfer at once (as libusb soon does); false: never.
        pub(crate) cancel_completes: bool,
        pub(crate) started: bool,
        pub(crate) stopped: bool,
    }

    impl<T: Transfer + Clone + Default> Bus<T> {
        /// A bus whose cancellations complete at once.
        pub(crate) fn new() -> Arc<Mutex<Bus<T>>> {
            Arc::new(Mutex::new(Bus {
                cancel_completes: true,
                ..Bus::default()
            }))
        }

        /// Whether slot `slot` is in flight.
        pub(crate) fn in_flight(&self, slot: usize) -> bool {
            self.queued.iter().any(|t| t.slot() == slot)
        }

        /// Takes a submission (of a slot not in flight): refused with the next of
        /// `submit_errors`, else recorded and queued.
        pub(crate) fn submit(&mut self, transfer: T) -> Result<(), rusb::Error> {
            let slot = transfer.slot();
            assert!(
                !self.in_flight(slot),
                "slot {slot} submitted while in flight"
            );
            if let Some(e) = self.submit_errors.pop_front() {
                return Err(e);
            }
            self.submissions.push(transfer.clone());
            self.queued.push_back(transfer);
            Ok(())
        }

        /// Records a cancellation; true if it took the transfer off the bus, whose completion
        /// the pool must then report (with the bus unlocked).
        pub(crate) fn cancel(&mut self, slot: usize) -> bool {
            self.cancels.push(slot);
            if !self.cancel_completes {
                return false;
            }
            match self.queued.iter().position(|t| t.slot() == slot) {
                Some(i) => {
                    self.queued.remove(i);
                    true
                }
                None => false,
            }
        }

        /// The oldest transfer in flight, taken off the bus to complete it.
        pub(crate) fn take_oldest(&mut self) -> T {
            self.queued.pop_front().expect("nothing in flight")
        }
    }

    /// Inline events: each pump runs `on_pump`, as libusb's event handling on the calling
    /// thread would run completions, and is counted.
    pub(crate) struct Pump {
        pub(crate) pumps: AtomicUsize,
        on_pump: Box<dyn Fn() + Send + Sync>,
    }

    impl Pump {
        pub(crate) fn new(on_pump: impl Fn() + Send + Sync + 'static) -> Arc<Pump> {
            Arc::new(Pump {
                pumps: AtomicUsize::new(0),
                on_pump: Box::new(on_pump),
            })
        }

        pub(crate) fn pumps(&self) -> usize {
            self.pumps.load(Ordering::SeqCst)
        }
    }

    impl EventPump for Pump {
        fn pump(&self, _timeout: Duration) {
            self.pumps.fetch_add(1, Ordering::SeqCst);
            (self.on_pump)();
        }

        fn fds(&self) -> Vec<(std::os::fd::RawFd, bool)> {
            Vec::new()
        }
    }

    /// The device thread's poll loop, reduced to its waker.
    pub(crate) struct DeviceThread {
        poll: mio::Poll,
        events: mio::Events,
    }

    impl DeviceThread {
        pub(crate) fn new() -> DeviceThread {
            DeviceThread {
                poll: mio::Poll::new().unwrap(),
                events: mio::Events::with_capacity(4),
            }
        }

        /// A waker of this poll loop, for the link's `start`.
        pub(crate) fn waker(&self) -> Arc<mio::Waker> {
            Arc::new(mio::Waker::new(self.poll.registry(), mio::Token(0)).unwrap())
        }

        /// Whether the waker fired since the last call, waiting at most `timeout`.
        pub(crate) fn woken(&mut self, timeout: Duration) -> bool {
            self.poll.poll(&mut self.events, Some(timeout)).unwrap();
            !self.events.is_empty()
        }
    }
}
