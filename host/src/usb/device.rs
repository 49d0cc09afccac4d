//! The thin layer over rusb: descriptors into [`DeviceDescriptorInfo`], and opening a device
//! into a [`UsbLink`] (configure, detach kernel drivers, claim, clear halts, read the serial).

use std::sync::Arc;
use std::time::Duration;

use rusb::{Context, Device, DeviceHandle, UsbContext};

use super::async_in::{AsyncReader, Completions, EventPump};
use super::async_out::{AsyncWriter, OutCompletions};
use super::identity::{location_id, serial_from_descriptor, speed_bps, udid_from_serial};
use super::identity::{SerialError, UsbLocation};
use super::libusb_events::LibusbEvents;
use super::libusb_in::LibusbInPool;
use super::libusb_mem::PoolSpec;
use super::libusb_out::LibusbOutPool;
use super::link::{BulkIo, EventStrategy, InStrategy, OutStrategy, PipeConfig, UsbLink};
use super::matching::{
    choose_interface, ConfigInfo, DeviceDescriptorInfo, EndpointInfo, InterfaceInfo, Rejection,
    TransferKind, UsbmuxInterface,
};
use crate::link::DeviceIdentity;

/// Timeout of the string-descriptor control transfers (usbmuxd uses the same 1 s).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a USB device could not be made into a [`UsbLink`].
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The device is not a usbmux device (or not in a usbmux mode). Expected for most devices;
    /// the watcher logs it at debug level and leaves the device alone.
    #[error("not a usbmux device: {0}")]
    Rejected(#[from] Rejection),
    /// A USB operation failed. `Access` means the device node is not writable (udev rule or
    /// permissions), `Busy` that another program (another usbmuxd?) holds the interface; the
    /// watcher retries a few times, then gives up until the device is replugged.
    #[error("{what}: {source}")]
    Usb {
        /// The step that failed.
        what: &'static str,
        /// libusb's error.
        #[source]
        source: rusb::Error,
    },
    /// The serial number cannot serve as a UDID.
    #[error("{0}")]
    Serial(#[from] SerialError),
}

impl OpenError {
    /// Whether retrying may help (a USB error), as opposed to a property of the device.
    pub fn is_transient(&self) -> bool {
        matches!(self, OpenError::Usb { .. })
    }
}

fn usb(what: &'static str) -> impl FnOnce(rusb::Error) -> OpenError {
    move |source| OpenError::Usb { what, source }
}

/// Reads a device's descriptors into the plain structs [`choose_interface`] takes.
///
/// Uses libusb's cached copies (no bus traffic, works on unopened and unconfigured devices).
/// A configuration whose descriptor cannot be read is left out (and logged) rather than failing
/// the whole device: the usbmux one may still be readable.
pub fn descriptor_info<T: UsbContext>(device: &Device<T>) -> rusb::Result<DeviceDescriptorInfo> {
    let desc = device.device_descriptor()?;
    let version = desc.usb_version();
    let mut info = DeviceDescriptorInfo {
        vendor_id: desc.vendor_id(),
        product_id: desc.product_id(),
        usb_version: (u16::from(version.major()) << 8)
            | (u16::from(version.minor()) << 4)
            | u16::from(version.sub_minor()),
        serial_index: desc.serial_number_string_index().unwrap_or(0),
        configurations: Vec::new(),
    };
    for index in 0..desc.num_configurations() {
        let config = match device.config_descriptor(index) {
            Ok(config) => config,
            Err(e) => {
                log::debug!(
                    "USB {:04x}:{:04x}: configuration index {index} unreadable: {e}",
                    info.vendor_id,
                    info.product_id
                );
                continue;
            }
        };
        let mut out = ConfigInfo {
            value: config.number(),
            interfaces: Vec::new(),
        };
        for interface in config.interfaces() {
            for alt in interface.descriptors() {
                out.interfaces.push(InterfaceInfo {
                    number: alt.interface_number(),
                    alt_setting: alt.setting_number(),
                    class: alt.class_code(),
                    subclass: alt.sub_class_code(),
                    protocol: alt.protocol_code(),
                    endpoints: alt
                        .endpoint_descriptors()
                        .map(|ep| EndpointInfo {
                            address: ep.address(),
                            transfer: match ep.transfer_type() {
                                rusb::TransferType::Control => TransferKind::Control,
                                rusb::TransferType::Isochronous => TransferKind::Isochronous,
                                rusb::TransferType::Bulk => TransferKind::Bulk,
                                rusb::TransferType::Interrupt => TransferKind::Interrupt,
                            },
                            max_packet_size: ep.max_packet_size(),
                        })
                        .collect(),
                });
            }
        }
        info.configurations.push(out);
    }
    Ok(info)
}

/// The claimed bulk pipe of an opened device: [`BulkIo`] over rusb's synchronous transfers.
/// The interface is released and the device closed (rusb's `DeviceHandle` drop) when the last
/// holder of the handle lets go: this pipe (the link's reader and writer threads) and, in the
/// asynchronous IN strategy, the transfer pool.
struct RusbPipe<T: UsbContext> {
    handle: Arc<DeviceHandle<T>>,
    ep_in: u8,
    ep_out: u8,
}

impl<T: UsbContext + 'static> BulkIo for RusbPipe<T> {
    fn read(&self, buf: &mut [u8], timeout: Duration) -> Result<usize, rusb::Error> {
        self.handle.read_bulk(self.ep_in, buf, timeout)
    }

    fn write(&self, data: &[u8], timeout: Duration) -> Result<usize, rusb::Error> {
        self.handle.write_bulk(self.ep_out, data, timeout)
    }
}

/// Detaches the kernel driver of `interface` if one is bound. Best effort: platforms without
/// the notion answer `NotSupported`, and a failure shows up as `Busy` at the next step anyway.
fn detach_kernel_driver<T: UsbContext>(handle: &DeviceHandle<T>, interface: u8) {
    match handle.kernel_driver_active(interface) {
        Ok(true) => match handle.detach_kernel_driver(interface) {
            Ok(()) => log::debug!("USB: detached kernel driver from interface {interface}"),
            Err(e) => log::warn!("USB: detaching kernel driver from interface {interface}: {e}"),
        },
        Ok(false) | Err(rusb::Error::NotSupported | rusb::Error::NotFound) => {}
        Err(e) => log::debug!("USB: kernel driver state of interface {interface}: {e}"),
    }
}

/// Puts the device in the chosen configuration and claims the usbmux interface.
fn configure_and_claim<T: UsbContext>(
    handle: &DeviceHandle<T>,
    info: &DeviceDescriptorInfo,
    choice: &UsbmuxInterface,
) -> Result<(), OpenError> {
    // An error here usually means "unconfigured" on some platforms; treat it as such.
    let current = handle.active_configuration().unwrap_or(0);
    if current != choice.configuration {
        // Linux refuses SET_CONFIGURATION (EBUSY) while a kernel driver holds an interface of
        // the current configuration; usbmuxd's udev rule unconfigures the device first, we do
        // not rely on it.
        if let Some(config) = info.configurations.iter().find(|c| c.value == current) {
            let mut numbers: Vec<u8> = config.interfaces.iter().map(|i| i.number).collect();
            numbers.sort_unstable();
            numbers.dedup();
            for number in numbers {
                detach_kernel_driver(handle, number);
            }
        }
        log::debug!(
            "USB: switching configuration {current} -> {}",
            choice.configuration
        );
        handle
            .set_active_configuration(choice.configuration)
            .map_err(usb("setting the usbmux configuration"))?;
    }
    detach_kernel_driver(handle, choice.interface);
    handle
        .claim_interface(choice.interface)
        .map_err(usb("claiming the usbmux interface"))?;
    // A halted endpoint left over from an earlier user would fail the first transfer.
    for ep in [choice.ep_in, choice.ep_out] {
        if let Err(e) = handle.clear_halt(ep) {
            log::debug!("USB: clearing halt on endpoint {ep:#04x}: {e}");
        }
    }
    Ok(())
}

/// Reads the serial string with the device's first language, as usbmuxd does.
fn read_serial<T: UsbContext>(handle: &DeviceHandle<T>, index: u8) -> Result<String, OpenError> {
    if index == 0 {
        return Err(SerialError::Missing.into());
    }
    let languages = handle
        .read_languages(CONTROL_TIMEOUT)
        .map_err(usb("reading string descriptor languages"))?;
    let language = *languages.first().ok_or(SerialError::Missing)?;
    let text = handle
        .read_string_descriptor(language, index, CONTROL_TIMEOUT)
        .map_err(usb("reading the serial number"))?;
    Ok(serial_from_descriptor(&text)?)
}

/// Opens `device` through a libusb context of the phone's own rather than the one it was found
/// in.
///
/// The watcher's context carries hotplug and its event loop: if a phone's transfers completed
/// there as well, every completion would wake the watcher too and make it compete for libusb's
/// event lock. Measured in the VM harness (BENCHMARKS.md §6): the watcher took ≈ 14 % of the
/// daemon's CPU and ≈ 30 context switches per MiB that way. A context per phone keeps each
/// phone's completions on its own event thread. The device is found again by bus and address
/// (unique while it stays plugged in) with the same vendor and product.
fn open_in_own_context<T: UsbContext>(
    device: &Device<T>,
) -> Result<DeviceHandle<Context>, OpenError> {
    let want = device
        .device_descriptor()
        .map_err(usb("reading the device descriptor"))?;
    let context = Context::new().map_err(usb("creating the phone's libusb context"))?;
    let devices = context
        .devices()
        .map_err(usb("listing devices in the phone's context"))?;
    let same = devices.iter().find(|d| {
        d.bus_number() == device.bus_number()
            && d.address() == device.address()
            && d.device_descriptor().is_ok_and(|dd| {
                dd.vendor_id() == want.vendor_id() && dd.product_id() == want.product_id()
            })
    });
    match same {
        Some(d) => d.open().map_err(usb("opening the device")),
        None => Err(OpenError::Usb {
            what: "finding the device again in its own context",
            source: rusb::Error::NoDevice,
        }),
    }
}

impl UsbLink {
    /// Opens a device as a usbmux link with the default [`PipeConfig`]; see
    /// [`UsbLink::open_with`].
    pub fn open<T: UsbContext + 'static>(device: &Device<T>) -> Result<UsbLink, OpenError> {
        Self::open_with(device, PipeConfig::default())
    }

    /// Opens a device as a usbmux link: checks it is one (before touching it, so other devices
    /// are never opened), sets the usbmux configuration if the device is not in it (detaching
    /// kernel drivers in the way), claims the interface, clears halts and reads the serial.
    /// The returned link does nothing until [`Link::start`](crate::link::Link::start).
    ///
    /// Blocks for a few control transfers (≤ 1 s each); call it from the watcher's thread, never
    /// from inside a libusb hotplug callback.
    pub fn open_with<T: UsbContext + 'static>(
        device: &Device<T>,
        config: PipeConfig,
    ) -> Result<UsbLink, OpenError> {
        let info = descriptor_info(device).map_err(usb("reading descriptors"))?;
        let choice = choose_interface(&info)?;
        let location = UsbLocation {
            bus: device.bus_number(),
            address: device.address(),
        };
        let handle = open_in_own_context(device)?;
        configure_and_claim(&handle, &info, &choice)?;
        let usb_serial = read_serial(&handle, info.serial_index)?;
        let identity = DeviceIdentity {
            udid: udid_from_serial(&usb_serial),
            usb_serial,
            product_id: info.product_id,
            location_id: location_id(location.bus, location.address),
            speed: speed_bps(device.speed()),
            max_packet_size: choice.max_packet_size,
        };
        log::info!(
            "USB: {} ({:04x}:{:04x}, USB {:x}.{:02x}, {} Mbit/s) at {location}: configuration {}, \
             interface {}, IN {:#04x} / OUT {:#04x}, wMaxPacketSize {}",
            identity.udid,
            info.vendor_id,
            info.product_id,
            info.usb_version >> 8,
            info.usb_version & 0xff,
            identity.speed / 1_000_000,
            choice.configuration,
            choice.interface,
            choice.ep_in,
            choice.ep_out,
            choice.max_packet_size,
        );
        let handle = Arc::new(handle);
        let pipe = Arc::new(RusbPipe {
            handle: Arc::clone(&handle),
            ep_in: choice.ep_in,
            ep_out: choice.ep_out,
        });
        let sizes = config.normalized();
        let inline = sizes.events == EventStrategy::Inline;
        // Inline, the device thread handles this (the phone's own) context's events.
        let pump: Option<Arc<dyn EventPump>> =
            inline.then(|| Arc::new(LibusbEvents::new(handle.context().clone())) as _);
        // Built first, while `handle` is still ours to clone.
        let writer = match sizes.out_strategy {
            OutStrategy::Thread => None,
            OutStrategy::Async => {
                let completions = OutCompletions::new(sizes.out_queue);
                if let Some(pump) = &pump {
                    completions.set_pump(Arc::clone(pump));
                }
                let spec = PoolSpec {
                    endpoint: choice.ep_out,
                    count: sizes.out_queue,
                    buffer_len: usbmux_core::usb::MAX_PACKET,
                    // The asynchronous IN pool's event thread (or the device thread, inline)
                    // handles our completions too.
                    own_events: sizes.in_strategy != InStrategy::Async,
                    usbfs_buffers: sizes.usbfs_buffers,
                    name: &identity.udid,
                };
                let pool = LibusbOutPool::new(Arc::clone(&handle), spec, Arc::clone(&completions))
                    .map_err(usb("allocating OUT transfers"))?;
                Some(AsyncWriter::new(
                    Box::new(pool),
                    completions,
                    sizes.send_stall_limit,
                ))
            }
        };
        let link = match sizes.in_strategy {
            InStrategy::Thread => UsbLink::with_io(identity, choice.kind, pipe, config),
            InStrategy::Async => {
                // The sizes after the link's rounding, so both strategies use the same buffers.
                let completions = Completions::new(sizes.in_buffers);
                if let Some(pump) = &pump {
                    completions.set_pump(Arc::clone(pump));
                }
                let spec = PoolSpec {
                    endpoint: choice.ep_in,
                    count: sizes.in_buffers,
                    buffer_len: sizes.in_buffer_size,
                    own_events: !inline,
                    usbfs_buffers: sizes.usbfs_buffers,
                    name: &identity.udid,
                };
                let pool = LibusbInPool::new(handle, spec, Arc::clone(&completions))
                    .map_err(usb("allocating IN transfers"))?;
                let reader = AsyncReader::new(Box::new(pool), completions);
                UsbLink::with_async_in(identity, choice.kind, pipe, reader, config)
            }
        };
        let link = match pump {
            Some(pump) => link.with_inline_events(pump),
            None => link,
        };
        Ok(match writer {
            Some(writer) => link.with_async_out(writer),
            None => link,
        })
    }
}
