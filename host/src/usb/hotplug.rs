//! [`Watcher`]: finds phones as they come and go (PROTOCOL.md §2.4) and opens each as a
//! [`UsbLink`].
//!
//! One thread owns the discovery. Where libusb supports hotplug ([`rusb::has_hotplug`]; on Linux
//! that is the udev backend, or netlink without udev) it registers for vendor 0x05AC, including
//! devices already present, and runs libusb's event loop; the callback only queues the event,
//! because opening a device from inside a hotplug callback is not allowed. Otherwise it lists the
//! devices every [`WatcherOptions::poll_interval`] (1 s, as usbmuxd) and compares. Either way
//! the opening itself ([`UsbLink::open_with`]) happens on the watcher thread, outside libusb
//! callbacks, and the results are reported through the caller's callback:
//!
//! - [`UsbEvent::Arrived`] with a ready (not yet started) link — the daemon gives it a new
//!   DeviceID; a replugged phone re-enumerates at a new address and arrives as a new link;
//! - [`UsbEvent::Left`] with the location of a device that had arrived. The link itself also
//!   notices (its transfers fail with `NoDevice` → `LinkError::Disconnected`), usually first.
//!
//! A device that cannot be opened for a USB reason (permissions, busy) is retried
//! [`WatcherOptions::open_attempts`] times, a second apart, then left alone until it is
//! replugged; devices that are not usbmux devices are left alone at once.
//!
//! USB is optional for the daemon: [`Watcher::start`] creates the only libusb context (nothing
//! touches USB before), and if libusb cannot start — no `/dev/bus/usb`, a container, no
//! permissions — it logs one clear line and returns [`UsbUnavailable`], which the daemon can
//! ignore and go on serving its other devices.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusb::{Context, Device, UsbContext};

use super::device::OpenError;
use super::identity::UsbLocation;
use super::link::{PipeConfig, UsbLink};
use super::matching::{Rejection, APPLE_VENDOR_ID};

/// What the [`Watcher`] reports.
// One event per plug or unplug, moved once: the size of `Arrived` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum UsbEvent {
    /// A usbmux device was opened and claimed; start the link and give it a DeviceID.
    Arrived(UsbLink),
    /// A device reported by an earlier `Arrived` is gone from this location.
    Left(UsbLocation),
}

/// How the [`Watcher`] works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatcherOptions {
    /// Poll the device list even where libusb has hotplug (for systems whose hotplug events do
    /// not arrive, e.g. no udevd running).
    pub force_poll: bool,
    /// Period of the device-list poll.
    pub poll_interval: Duration,
    /// usbmuxd's `-n`: no hotplug and no periodic poll; the device list is scanned at start and
    /// again whenever [`Watcher::rescan`] asks (upstream: a `-u` instance started by udev
    /// signals the running one).
    pub on_demand: bool,
    /// Attempts to open a device that fails with a USB error before giving up on it.
    pub open_attempts: u32,
    /// Buffer sizes of the links created.
    pub pipe: PipeConfig,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions {
            force_poll: false,
            poll_interval: Duration::from_secs(1),
            on_demand: false,
            open_attempts: 3,
            pipe: PipeConfig::default(),
        }
    }
}

/// libusb could not be initialised: there is no USB on this system for us.
#[derive(Debug, thiserror::Error)]
#[error("USB unavailable: libusb initialisation failed: {0}")]
pub struct UsbUnavailable(#[source] pub rusb::Error);

/// Creates a libusb context, the first USB action of the process. On failure, logs one warning
/// saying USB devices will not be served, and returns the error for the caller to ignore or
/// report.
pub fn open_context() -> Result<Context, UsbUnavailable> {
    Context::new().map_err(|e| {
        log::warn!(
            "USB unavailable ({e}): no USB devices will be found; other devices are still served"
        );
        UsbUnavailable(e)
    })
}

/// Logs what will keep devices from being seen even though libusb started: on Linux, no
/// `/dev/bus/usb` (a container without USB passthrough), or no udevd (libusb's udev backend only
/// hears of devices through udevd's events, so devices plugged in later are never seen —
/// shared/USB-VM.md).
fn warn_about_missing_plumbing() {
    if !cfg!(target_os = "linux") {
        return;
    }
    if !std::path::Path::new("/dev/bus/usb").exists() {
        log::warn!("USB: /dev/bus/usb does not exist, so no USB device can be opened here");
    } else if !std::path::Path::new("/run/udev/control").exists() {
        log::warn!(
            "USB: udevd does not seem to run (no /run/udev/control): devices plugged in after \
             start may not be seen"
        );
    }
}

/// How long one turn of libusb's event loop may block in hotplug mode: the bound on how late the
/// watcher notices events handled on another thread.
const EVENT_TICK: Duration = Duration::from_millis(200);
/// Delay between attempts to open a device that failed with a USB error.
const RETRY_DELAY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct StopFlag {
    /// (stopped, rescan requested)
    stopped: Mutex<(bool, bool)>,
    cond: Condvar,
}

impl StopFlag {
    fn is_set(&self) -> bool {
        self.stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn set(&self) {
        self.stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 = true;
        self.cond.notify_all();
    }

    fn request_rescan(&self) {
        self.stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1 = true;
        self.cond.notify_all();
    }

    /// Sleeps up to `timeout` or until a rescan is requested (which it consumes); true if
    /// stopped.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut guard, _) = self
            .cond
            .wait_timeout_while(guard, timeout, |(stopped, rescan)| !*stopped && !*rescan)
            .unwrap_or_else(PoisonError::into_inner);
        guard.1 = false;
        guard.0
    }
}

/// Asks a [`Watcher`] to scan the device list; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Rescanner(Arc<StopFlag>);

impl Rescanner {
    /// Requests a scan (the watcher thread does it).
    pub fn rescan(&self) {
        self.0.request_rescan();
    }
}

/// Watches for usbmux devices on a thread of its own; see the module docs. Stopping (or
/// dropping) it joins the thread; links already reported stay with their owner.
pub struct Watcher {
    context: Context,
    stop: Arc<StopFlag>,
    hotplug: bool,
    thread: Option<JoinHandle<()>>,
}

impl core::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Watcher")
            .field("hotplug", &self.hotplug)
            .finish_non_exhaustive()
    }
}

/// What the libusb hotplug callback queues for the watcher thread.
enum HotplugMsg {
    Arrived(Device<Context>),
    Left(UsbLocation),
}

struct HotplugSink(mpsc::Sender<HotplugMsg>);

impl rusb::Hotplug<Context> for HotplugSink {
    fn device_arrived(&mut self, device: Device<Context>) {
        // Only queue: a hotplug callback may not do synchronous I/O on the device.
        let _ = self.0.send(HotplugMsg::Arrived(device));
    }

    fn device_left(&mut self, device: Device<Context>) {
        let _ = self.0.send(HotplugMsg::Left(location_of(&device)));
    }
}

fn location_of<T: UsbContext>(device: &Device<T>) -> UsbLocation {
    UsbLocation {
        bus: device.bus_number(),
        address: device.address(),
    }
}

impl Watcher {
    /// Creates the libusb context and starts watching; `on_event` is called on the watcher
    /// thread for every arrival and departure, including devices present at start. It should
    /// hand the event on (a channel plus a wake-up) rather than block: discovery waits for it.
    ///
    /// Fails only when libusb cannot start at all ([`UsbUnavailable`], already logged). A
    /// failed hotplug registration falls back to polling.
    pub fn start<F>(options: WatcherOptions, on_event: F) -> Result<Watcher, UsbUnavailable>
    where
        F: FnMut(UsbEvent) + Send + 'static,
    {
        let mut options = options;
        // A zero interval would spin; 10 ms is far below anything useful.
        options.poll_interval = options.poll_interval.max(Duration::from_millis(10));
        let context = open_context()?;
        warn_about_missing_plumbing();
        let stop = Arc::new(StopFlag::default());
        let mut state = State {
            context: context.clone(),
            options,
            on_event: Box::new(on_event),
            attached: HashSet::new(),
            ignored: HashSet::new(),
            pending: Vec::new(),
        };
        let (tx, rx) = mpsc::channel();
        let registration = if options.force_poll || options.on_demand || !rusb::has_hotplug() {
            None
        } else {
            match rusb::HotplugBuilder::new()
                .vendor_id(APPLE_VENDOR_ID)
                .enumerate(true)
                .register(&context, Box::new(HotplugSink(tx)))
            {
                Ok(registration) => Some(registration),
                Err(e) => {
                    log::warn!("USB hotplug registration failed ({e}); polling instead");
                    None
                }
            }
        };
        let hotplug = registration.is_some();
        log::info!(
            "USB: watching for devices ({}; libusb {}.{}.{})",
            if hotplug {
                "hotplug".to_string()
            } else if options.on_demand {
                "scanning on request only (-n)".to_string()
            } else {
                format!("polling every {} ms", options.poll_interval.as_millis())
            },
            rusb::version().major(),
            rusb::version().minor(),
            rusb::version().micro(),
        );
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("usb-watcher".into())
            .spawn(move || match registration {
                Some(registration) => {
                    state.run_hotplug(&thread_stop, &rx);
                    drop(registration);
                }
                None => state.run_poll(&thread_stop),
            })
            .map_err(|e| {
                log::warn!("USB unavailable: cannot start the watcher thread: {e}");
                UsbUnavailable(rusb::Error::Other)
            })?;
        Ok(Watcher {
            context,
            stop,
            hotplug,
            thread: Some(thread),
        })
    }

    /// Scans the device list now (for `-n`: a new device was announced by udev). Harmless in
    /// the other modes.
    pub fn rescan(&self) {
        self.stop.request_rescan();
    }

    /// A handle that asks for [`Watcher::rescan`] from another thread (a signal handler's).
    pub fn rescanner(&self) -> Rescanner {
        Rescanner(Arc::clone(&self.stop))
    }

    /// Whether libusb hotplug events drive the watcher (false: polling).
    pub fn uses_hotplug(&self) -> bool {
        self.hotplug
    }

    /// The libusb context (for opening devices by other means, or for diagnostics).
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Stops watching and joins the thread (within one poll interval or event tick, plus any
    /// device open in progress).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.set();
        self.context.interrupt_handle_events();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("USB watcher thread panicked");
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A device waiting to be opened.
struct Pending {
    device: Device<Context>,
    location: UsbLocation,
    attempts: u32,
    due: Instant,
}

/// The watcher thread's state.
struct State {
    context: Context,
    options: WatcherOptions,
    on_event: Box<dyn FnMut(UsbEvent) + Send>,
    /// Locations reported as `Arrived` (and not yet `Left`).
    attached: HashSet<UsbLocation>,
    /// Locations not to try again until their device leaves (rejected or given up on).
    ignored: HashSet<UsbLocation>,
    pending: Vec<Pending>,
}

impl State {
    fn run_hotplug(&mut self, stop: &StopFlag, rx: &mpsc::Receiver<HotplugMsg>) {
        let mut error_logged = false;
        while !stop.is_set() {
            if let Err(e) = self.context.handle_events(Some(EVENT_TICK)) {
                if !error_logged {
                    log::warn!("USB event handling failed: {e}");
                    error_logged = true;
                }
                if stop.wait(EVENT_TICK) {
                    break;
                }
            }
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    HotplugMsg::Arrived(device) => self.arrived(device),
                    HotplugMsg::Left(location) => self.left(location),
                }
            }
            self.open_due();
        }
    }

    fn run_poll(&mut self, stop: &StopFlag) {
        let mut error_logged = false;
        loop {
            // Nobody else may run libusb's event loop in this mode: let it deliver what it
            // queued (hotplug notifications hold device references until handled).
            let _ = self.context.handle_events(Some(Duration::ZERO));
            match self.context.devices() {
                Ok(list) => {
                    error_logged = false;
                    let mut present = HashSet::new();
                    for device in list.iter() {
                        let is_apple = device
                            .device_descriptor()
                            .is_ok_and(|d| d.vendor_id() == APPLE_VENDOR_ID);
                        if is_apple {
                            present.insert(location_of(&device));
                            self.arrived(device);
                        }
                    }
                    let gone: Vec<UsbLocation> = self
                        .attached
                        .iter()
                        .chain(self.ignored.iter())
                        .chain(self.pending.iter().map(|p| &p.location))
                        .filter(|l| !present.contains(l))
                        .copied()
                        .collect();
                    for location in gone {
                        self.left(location);
                    }
                }
                Err(e) if !error_logged => {
                    log::warn!("USB device list failed: {e}");
                    error_logged = true;
                }
                Err(_) => {}
            }
            self.open_due();
            let next_retry = self.pending.iter().map(|p| p.due).min();
            let wait = next_retry
                .map(|due| due.saturating_duration_since(Instant::now()))
                .map_or(self.options.poll_interval, |d| {
                    d.min(self.options.poll_interval)
                });
            // -n: between scans only an open retry or a rescan request wakes the thread.
            let wait = match (self.options.on_demand, next_retry) {
                (true, None) => Duration::from_secs(3600),
                _ => wait,
            };
            if stop.wait(wait) {
                break;
            }
        }
    }

    /// A device is present: queue it for opening unless it is known already.
    fn arrived(&mut self, device: Device<Context>) {
        let location = location_of(&device);
        if self.attached.contains(&location)
            || self.ignored.contains(&location)
            || self.pending.iter().any(|p| p.location == location)
        {
            return;
        }
        self.pending.push(Pending {
            device,
            location,
            attempts: 0,
            due: Instant::now(),
        });
    }

    /// A device is gone: forget it, and report it if it had arrived.
    fn left(&mut self, location: UsbLocation) {
        self.pending.retain(|p| p.location != location);
        self.ignored.remove(&location);
        if self.attached.remove(&location) {
            log::info!("USB: device at {location} left");
            (self.on_event)(UsbEvent::Left(location));
        }
    }

    /// Tries to open every pending device whose time has come.
    fn open_due(&mut self) {
        let now = Instant::now();
        let (due, waiting): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.due <= now);
        self.pending = waiting;
        for mut p in due {
            match UsbLink::open_with(&p.device, self.options.pipe) {
                Ok(link) => {
                    self.attached.insert(p.location);
                    (self.on_event)(UsbEvent::Arrived(link));
                }
                Err(OpenError::Rejected(
                    r @ (Rejection::NotApple { .. } | Rejection::UnsupportedProduct { .. }),
                )) => {
                    log::debug!("USB: ignoring device at {}: {r}", p.location);
                    self.ignored.insert(p.location);
                }
                Err(e) if e.is_transient() && p.attempts + 1 < self.options.open_attempts => {
                    p.attempts += 1;
                    log::info!(
                        "USB: device at {}: {e}; retrying ({}/{})",
                        p.location,
                        p.attempts,
                        self.options.open_attempts
                    );
                    p.due = now + RETRY_DELAY;
                    self.pending.push(p);
                }
                Err(e) => {
                    let hint = match e {
                        OpenError::Usb {
                            source: rusb::Error::Access,
                            ..
                        } => " (no permission: install the udev rule or run as root)",
                        OpenError::Usb {
                            source: rusb::Error::Busy,
                            ..
                        } => " (another program, maybe another usbmuxd, has the device)",
                        _ => "",
                    };
                    log::warn!(
                        "USB: not using the device at {}: {e}{hint}; replug it to try again",
                        p.location
                    );
                    self.ignored.insert(p.location);
                }
            }
        }
    }
}
