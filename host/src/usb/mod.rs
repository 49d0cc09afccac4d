//! USB transport: phones over their usbmux bulk pipe, through rusb (vendored libusb).
//!
//! Read `shared/PROTOCOL.md` §2 (matching, bulk transfers, reassembly, hotplug) and §5.15–5.16
//! first. The pieces, from pure to threaded:
//!
//! - [`matching`]: which devices are phones and which configuration, interface and endpoints
//!   carry usbmux — pure functions over plain descriptor structs, tested on captured
//!   descriptors (`host/tests/fixtures/usb/`);
//! - [`identity`]: UDID from the serial string, location id, connection speed;
//! - [`UsbLink`]: the [`Link`](crate::link::Link) over a claimed device — by default several
//!   libusb asynchronous transfers in flight each way, their events handled by the device
//!   thread itself ([`EventStrategy::Inline`]); or IN by one reader thread with a ring of large
//!   buffers ([`InStrategy`]), OUT by one writer thread ([`OutStrategy`]), events on an event
//!   thread. Each mux packet is one OUT transfer plus its ZLP. Reassembly is not done here: the
//!   device thread feeds every IN transfer to `usbmux_core::usb::Reassembler`, which treats the
//!   pipe as a byte stream. The asynchronous logic is in `async_in`/`async_out` (their shared
//!   core in `async_common`), over the libusb transfer pools `libusb_in`/`libusb_out`; the
//!   libusb calls are in `libusb_pool` (the transfers both pools share), `libusb_events` and
//!   `libusb_mem` — the crate's only `unsafe` code;
//! - [`Watcher`]: hotplug (or 1 s polling) discovery, reporting [`UsbEvent::Arrived`] with a
//!   ready link and [`UsbEvent::Left`].
//!
//! # How the daemon uses it
//!
//! ```no_run
//! use std::sync::mpsc;
//! use usbmux_host::usb::{UsbEvent, Watcher, WatcherOptions};
//!
//! let (tx, rx) = mpsc::channel();
//! // No USB on this machine is not an error for the daemon: the watcher has logged why.
//! let watcher = Watcher::start(WatcherOptions::default(), move |event| {
//!     let _ = tx.send(event); // in the daemon: also wake its poll loop
//! })
//! .ok();
//! for event in rx {
//!     match event {
//!         // Hand `link` (a `Link`) to a new device thread; it calls `start(waker)` first.
//!         UsbEvent::Arrived(link) => println!("{} arrived", link.location()),
//!         UsbEvent::Left(location) => println!("{location} left"),
//!     }
//! }
//! drop(watcher); // joins the watcher thread
//! ```
//!
//! # Platform requirements
//!
//! libusb is built from source (rusb's `vendored` feature). On Linux it gets its udev backend —
//! hotplug through udevd's events — only when `libudev-dev` and `pkg-config` are installed at
//! build time; without them it falls back to kernel netlink events, which also work but see
//! devices before udev has set their permissions.

mod async_common;
mod async_in;
mod async_out;
mod device;
mod hotplug;
pub mod identity;
mod libusb_events;
mod libusb_in;
mod libusb_mem;
mod libusb_out;
mod libusb_pool;
mod link;
pub mod matching;

pub use device::{descriptor_info, OpenError};
pub use hotplug::{open_context, Rescanner, UsbEvent, UsbUnavailable, Watcher, WatcherOptions};
pub use identity::{location_id, speed_bps, udid_from_serial, UsbLocation};
pub use link::{BulkIo, EventStrategy, InStrategy, OutStrategy, PipeConfig, PipeStats, UsbLink};
pub use matching::{choose_interface, AppleDeviceKind, Rejection, UsbmuxInterface};
