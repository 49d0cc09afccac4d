//! Which USB devices are phones, and which configuration and interface carry usbmux.
//!
//! Read `shared/PROTOCOL.md` §2.1 first. Everything here is a pure function over plain descriptor
//! structs ([`DeviceDescriptorInfo`] and its parts), so the decision is tested on captured
//! descriptor data without hardware; [`descriptor_info`](super::descriptor_info) fills the
//! structs from rusb, and [`DeviceDescriptorInfo::parse`] fills them from raw descriptor bytes
//! (the layout of Linux's sysfs `descriptors` file, which is also what the test fixtures hold).
//!
//! The rule ([`choose_interface`]):
//! 1. vendor 0x05AC and a product id usbmux devices use ([`classify`]);
//! 2. configurations are scanned from the highest `bConfigurationValue` down, because Apple
//!    devices put the usbmux interface in their highest configuration (4 of 4 in the initial mode,
//!    5 of 5 with Valeria or CDC-NCM) and lower ones are PTP, audio/HID and the like;
//! 3. in each configuration, alternate setting 0 of every interface, in descriptor order; the
//!    candidate must be class 0xFF **and** subclass 0xFE **and** protocol 0x02. usbmuxd tests these
//!    with a logical OR, so it can pick Valeria (FF/2A/FF) or any other vendor interface that
//!    happens to have two bulk endpoints — we do not reproduce that;
//! 4. the candidate must have exactly two endpoints, both bulk, one IN and one OUT (either
//!    order). A candidate that fails this is skipped and the scan goes on; the first one that
//!    passes wins.

use core::fmt;

/// Apple's USB vendor id.
pub const APPLE_VENDOR_ID: u16 = 0x05AC;
/// iPhone, iPad, iPod touch, Watch and TV in their normal mode (usbmuxd's `usb.h` range).
pub const MOBILE_PRODUCT_IDS: core::ops::RangeInclusive<u16> = 0x1290..=0x12AF;
/// The T2 coprocessor ("iBridge") of Intel Macs.
pub const T2_PRODUCT_ID: u16 = 0x8600;
/// Apple Silicon Macs in restore (DFU-to-OS) mode.
pub const MAC_RESTORE_PRODUCT_IDS: core::ops::RangeInclusive<u16> = 0x1901..=0x1905;
/// The usbmux interface: class 0xFF (vendor specific), subclass 0xFE, protocol 0x02.
pub const USBMUX_INTERFACE: (u8, u8, u8) = (0xFF, 0xFE, 0x02);

/// What kind of Apple device a product id names; it changes what the daemon does after attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppleDeviceKind {
    /// iPhone / iPad / iPod / Watch / TV (0x1290–0x12AF): full treatment, including preflight.
    Mobile,
    /// T2 coprocessor (0x8600): usbmuxd skips preflight for it, and so must the daemon.
    T2,
    /// Apple Silicon Mac in restore mode (0x1901–0x1905).
    MacRestore,
}

impl AppleDeviceKind {
    /// Whether the daemon should skip preflight (the lockdown pairing check) for this device.
    pub const fn skips_preflight(self) -> bool {
        matches!(self, AppleDeviceKind::T2)
    }
}

/// Classifies a vendor/product pair, or says why it is not a usbmux device.
pub fn classify(vendor_id: u16, product_id: u16) -> Result<AppleDeviceKind, Rejection> {
    if vendor_id != APPLE_VENDOR_ID {
        return Err(Rejection::NotApple { vendor_id });
    }
    if MOBILE_PRODUCT_IDS.contains(&product_id) {
        Ok(AppleDeviceKind::Mobile)
    } else if product_id == T2_PRODUCT_ID {
        Ok(AppleDeviceKind::T2)
    } else if MAC_RESTORE_PRODUCT_IDS.contains(&product_id) {
        Ok(AppleDeviceKind::MacRestore)
    } else {
        Err(Rejection::UnsupportedProduct { product_id })
    }
}

/// The descriptors of one device: what the choice of configuration looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceDescriptorInfo {
    /// `idVendor`.
    pub vendor_id: u16,
    /// `idProduct`.
    pub product_id: u16,
    /// `bcdUSB` (0x0200 for USB 2.0, 0x0320 for USB 3.2), for logs.
    pub usb_version: u16,
    /// `iSerialNumber`: the string descriptor holding the UDID (0 = none).
    pub serial_index: u8,
    /// Every configuration, in descriptor-index order (not necessarily by value).
    pub configurations: Vec<ConfigInfo>,
}

/// One configuration descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigInfo {
    /// `bConfigurationValue`: what `SET_CONFIGURATION` takes (1-based; 0 means unconfigured).
    pub value: u8,
    /// Every interface descriptor, all alternate settings, in descriptor order.
    pub interfaces: Vec<InterfaceInfo>,
}

/// One interface descriptor (one alternate setting of one interface).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// `bInterfaceNumber`: what claiming takes.
    pub number: u8,
    /// `bAlternateSetting`; only setting 0 is considered (it is the one active after
    /// `SET_CONFIGURATION`).
    pub alt_setting: u8,
    /// `bInterfaceClass`.
    pub class: u8,
    /// `bInterfaceSubClass`.
    pub subclass: u8,
    /// `bInterfaceProtocol`.
    pub protocol: u8,
    /// The endpoint descriptors of this setting, in descriptor order.
    pub endpoints: Vec<EndpointInfo>,
}

/// One endpoint descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `bEndpointAddress`: bit 7 set = IN (device to host).
    pub address: u8,
    /// Transfer type, from `bmAttributes` bits 0–1.
    pub transfer: TransferKind,
    /// `wMaxPacketSize` as in the descriptor (bits 11–12 are the high-bandwidth multiplier of
    /// periodic endpoints; [`EndpointInfo::packet_size`] masks them off).
    pub max_packet_size: u16,
}

impl EndpointInfo {
    /// Whether this is an IN (device-to-host) endpoint.
    pub const fn is_in(&self) -> bool {
        self.address & 0x80 != 0
    }

    /// The packet size proper: `wMaxPacketSize` bits 0–10 (512 at high speed, 1024 at
    /// SuperSpeed for bulk).
    pub const fn packet_size(&self) -> u16 {
        self.max_packet_size & 0x07FF
    }
}

/// USB transfer type of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferKind {
    /// Control (never seen in an endpoint descriptor other than by mistake).
    Control,
    /// Isochronous (audio).
    Isochronous,
    /// Bulk: what usbmux uses.
    Bulk,
    /// Interrupt (HID, PTP events).
    Interrupt,
}

impl TransferKind {
    /// Decodes `bmAttributes` bits 0–1.
    pub const fn from_attributes(attributes: u8) -> Self {
        match attributes & 0x03 {
            0 => TransferKind::Control,
            1 => TransferKind::Isochronous,
            2 => TransferKind::Bulk,
            _ => TransferKind::Interrupt,
        }
    }
}

/// The usbmux pipe of a device: everything needed to configure, claim and use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UsbmuxInterface {
    /// What the product id says the device is.
    pub kind: AppleDeviceKind,
    /// `bConfigurationValue` to set (if the device is not in it already).
    pub configuration: u8,
    /// `bInterfaceNumber` to claim.
    pub interface: u8,
    /// Alternate setting (always 0 by the rule above; kept so callers need not assume it).
    pub alt_setting: u8,
    /// Bulk IN endpoint address.
    pub ep_in: u8,
    /// Bulk OUT endpoint address.
    pub ep_out: u8,
    /// Packet size of the OUT endpoint: the ZLP rule (`usbmux_core::usb::needs_zlp`) divides by
    /// it.
    pub max_packet_size: u16,
    /// Packet size of the IN endpoint (reads are multiples of it so they never overflow).
    pub in_max_packet_size: u16,
}

/// Why a device is not driven as a usbmux device. Each variant says what was seen; the watcher
/// logs it and leaves the device alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Not an Apple device: ignored silently.
    NotApple {
        /// The device's vendor id.
        vendor_id: u16,
    },
    /// An Apple device that does not speak usbmux (keyboard, adapter, DFU/recovery mode…).
    UnsupportedProduct {
        /// The device's product id.
        product_id: u16,
    },
    /// No configuration has an FF/FE/02 interface: a device in a mode without usbmux (or one
    /// whose descriptors could not be read). Replugging or a mode switch may help.
    NoUsbmuxInterface,
    /// The only FF/FE/02 interface(s) had unusable endpoints; the first such one is reported.
    BadEndpoints {
        /// `bConfigurationValue` of the configuration holding it.
        configuration: u8,
        /// `bInterfaceNumber`.
        interface: u8,
        /// What was wrong.
        problem: EndpointProblem,
    },
}

/// What was wrong with the endpoints of an FF/FE/02 interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointProblem {
    /// Not exactly two endpoints (the number found).
    Count(usize),
    /// Two endpoints, but not one IN and one OUT.
    Directions,
    /// Two endpoints, one of them not bulk.
    NotBulk,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rejection::NotApple { vendor_id } => write!(f, "vendor {vendor_id:04x} is not Apple"),
            Rejection::UnsupportedProduct { product_id } => {
                write!(f, "Apple product {product_id:04x} does not speak usbmux")
            }
            Rejection::NoUsbmuxInterface => {
                f.write_str("no configuration has a usbmux (ff/fe/02) interface")
            }
            Rejection::BadEndpoints {
                configuration,
                interface,
                problem,
            } => write!(
                f,
                "usbmux interface {interface} of configuration {configuration} is unusable: \
                 {problem}"
            ),
        }
    }
}

impl fmt::Display for EndpointProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EndpointProblem::Count(n) => write!(f, "{n} endpoints instead of 2"),
            EndpointProblem::Directions => f.write_str("endpoints are not one IN and one OUT"),
            EndpointProblem::NotBulk => f.write_str("an endpoint is not bulk"),
        }
    }
}

impl std::error::Error for Rejection {}

/// Chooses the configuration, interface and endpoints to drive, or says why there are none.
///
/// See the module docs for the rule. Pure: no I/O, no allocation beyond a sort of indices.
pub fn choose_interface(device: &DeviceDescriptorInfo) -> Result<UsbmuxInterface, Rejection> {
    let kind = classify(device.vendor_id, device.product_id)?;
    let mut order: Vec<&ConfigInfo> = device.configurations.iter().collect();
    // Highest value first; a stable sort keeps descriptor order between equal (bogus) values.
    order.sort_by_key(|c| core::cmp::Reverse(c.value));
    let mut first_problem = None;
    for config in order {
        for intf in &config.interfaces {
            if intf.alt_setting != 0
                || (intf.class, intf.subclass, intf.protocol) != USBMUX_INTERFACE
            {
                continue;
            }
            match bulk_pair(&intf.endpoints) {
                Ok((ep_in, ep_out)) => {
                    return Ok(UsbmuxInterface {
                        kind,
                        configuration: config.value,
                        interface: intf.number,
                        alt_setting: intf.alt_setting,
                        ep_in: ep_in.address,
                        ep_out: ep_out.address,
                        max_packet_size: ep_out.packet_size(),
                        in_max_packet_size: ep_in.packet_size(),
                    })
                }
                Err(problem) => {
                    first_problem.get_or_insert(Rejection::BadEndpoints {
                        configuration: config.value,
                        interface: intf.number,
                        problem,
                    });
                }
            }
        }
    }
    Err(first_problem.unwrap_or(Rejection::NoUsbmuxInterface))
}

/// The (IN, OUT) endpoints of a candidate interface, in either descriptor order.
fn bulk_pair(
    endpoints: &[EndpointInfo],
) -> Result<(&EndpointInfo, &EndpointInfo), EndpointProblem> {
    let [a, b] = endpoints else {
        return Err(EndpointProblem::Count(endpoints.len()));
    };
    if a.transfer != TransferKind::Bulk || b.transfer != TransferKind::Bulk {
        return Err(EndpointProblem::NotBulk);
    }
    match (a.is_in(), b.is_in()) {
        (true, false) => Ok((a, b)),
        (false, true) => Ok((b, a)),
        _ => Err(EndpointProblem::Directions),
    }
}

/// Why raw descriptor bytes could not be parsed. `at` is the byte offset of the offending
/// descriptor in the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DescriptorError {
    /// The input ends inside a descriptor (or before the configurations the device descriptor
    /// announced).
    Truncated {
        /// Offset of the incomplete descriptor.
        at: usize,
    },
    /// A `bLength` too small for the descriptor's type (or below 2, which would never advance).
    BadLength {
        /// Offset of the descriptor.
        at: usize,
        /// The `bLength` found.
        length: u8,
    },
    /// A descriptor of another type where a device (1) or configuration (2) descriptor must be.
    WrongType {
        /// Offset of the descriptor.
        at: usize,
        /// The type expected.
        expected: u8,
        /// The type found.
        found: u8,
    },
    /// An endpoint descriptor before any interface descriptor.
    OrphanEndpoint {
        /// Offset of the endpoint descriptor.
        at: usize,
    },
}

impl fmt::Display for DescriptorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DescriptorError::Truncated { at } => write!(f, "descriptor at byte {at} is truncated"),
            DescriptorError::BadLength { at, length } => {
                write!(f, "descriptor at byte {at} has impossible bLength {length}")
            }
            DescriptorError::WrongType {
                at,
                expected,
                found,
            } => write!(
                f,
                "descriptor at byte {at} has type {found}, expected {expected}"
            ),
            DescriptorError::OrphanEndpoint { at } => {
                write!(f, "endpoint descriptor at byte {at} precedes any interface")
            }
        }
    }
}

impl std::error::Error for DescriptorError {}

const DT_DEVICE: u8 = 1;
const DT_CONFIG: u8 = 2;
const DT_INTERFACE: u8 = 4;
const DT_ENDPOINT: u8 = 5;

impl DeviceDescriptorInfo {
    /// Parses a device descriptor followed by all its configuration descriptors (each with its
    /// interface, endpoint and class-specific descriptors, `wTotalLength` bytes), as Linux
    /// exposes them in `/sys/bus/usb/devices/*/descriptors`.
    ///
    /// Takes untrusted bytes: every length is checked, unknown descriptors (class-specific,
    /// SuperSpeed companions, interface associations…) are skipped, and nothing panics.
    pub fn parse(raw: &[u8]) -> Result<Self, DescriptorError> {
        let dev = descriptor(raw, 0, DT_DEVICE, 18)?;
        let mut info = DeviceDescriptorInfo {
            usb_version: u16::from_le_bytes([dev[2], dev[3]]),
            vendor_id: u16::from_le_bytes([dev[8], dev[9]]),
            product_id: u16::from_le_bytes([dev[10], dev[11]]),
            serial_index: dev[16],
            configurations: Vec::new(),
        };
        let count = dev[17];
        let mut at = dev.len();
        for _ in 0..count {
            let head = descriptor(raw, at, DT_CONFIG, 9)?;
            let total = usize::from(u16::from_le_bytes([head[2], head[3]]));
            let end = at
                .checked_add(total.max(head.len()))
                .filter(|&end| end <= raw.len())
                .ok_or(DescriptorError::Truncated { at })?;
            info.configurations
                .push(ConfigInfo::parse_at(raw, at, end)?);
            at = end;
        }
        Ok(info)
    }
}

impl ConfigInfo {
    /// Parses one configuration descriptor with everything under it (`wTotalLength` bytes; any
    /// bytes beyond are ignored).
    pub fn parse(raw: &[u8]) -> Result<Self, DescriptorError> {
        let head = descriptor(raw, 0, DT_CONFIG, 9)?;
        let total = usize::from(u16::from_le_bytes([head[2], head[3]])).max(head.len());
        if total > raw.len() {
            return Err(DescriptorError::Truncated { at: 0 });
        }
        Self::parse_at(raw, 0, total)
    }

    /// Parses the configuration at `start`, whose descriptors end at `end` (≤ `raw.len()`).
    fn parse_at(raw: &[u8], start: usize, end: usize) -> Result<Self, DescriptorError> {
        let head = descriptor(raw, start, DT_CONFIG, 9)?;
        let mut config = ConfigInfo {
            value: head[5],
            interfaces: Vec::new(),
        };
        let mut at = start + head.len();
        while at < end {
            let (length, kind) = match raw.get(at..at + 2) {
                Some(&[length, kind]) => (length, kind),
                _ => return Err(DescriptorError::Truncated { at }),
            };
            let next = at + usize::from(length);
            if length < 2 {
                return Err(DescriptorError::BadLength { at, length });
            }
            if next > end {
                return Err(DescriptorError::Truncated { at });
            }
            let d = &raw[at..next];
            match kind {
                DT_INTERFACE => {
                    if d.len() < 9 {
                        return Err(DescriptorError::BadLength { at, length });
                    }
                    config.interfaces.push(InterfaceInfo {
                        number: d[2],
                        alt_setting: d[3],
                        class: d[5],
                        subclass: d[6],
                        protocol: d[7],
                        endpoints: Vec::new(),
                    });
                }
                DT_ENDPOINT => {
                    if d.len() < 7 {
                        return Err(DescriptorError::BadLength { at, length });
                    }
                    let intf = config
                        .interfaces
                        .last_mut()
                        .ok_or(DescriptorError::OrphanEndpoint { at })?;
                    intf.endpoints.push(EndpointInfo {
                        address: d[2],
                        transfer: TransferKind::from_attributes(d[3]),
                        max_packet_size: u16::from_le_bytes([d[4], d[5]]),
                    });
                }
                _ => {}
            }
            at = next;
        }
        Ok(config)
    }
}

/// The descriptor at `at`, checked for type and minimum length.
fn descriptor(raw: &[u8], at: usize, kind: u8, min_len: u8) -> Result<&[u8], DescriptorError> {
    let (length, found) = match raw.get(at..at.saturating_add(2)) {
        Some(&[length, found]) => (length, found),
        _ => return Err(DescriptorError::Truncated { at }),
    };
    if found != kind {
        return Err(DescriptorError::WrongType {
            at,
            expected: kind,
            found,
        });
    }
    if length < min_len {
        return Err(DescriptorError::BadLength { at, length });
    }
    raw.get(at..at + usize::from(length))
        .ok_or(DescriptorError::Truncated { at })
}

/// Parses the hex-dump text of the test fixtures (and of `xxd -p`-style dumps): hex byte pairs
/// separated by whitespace, `#` starting a comment to the end of the line.
///
/// Returns the offending token on anything that is not a hex byte.
pub fn parse_hex_dump(text: &str) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        for token in line.split_whitespace() {
            let token = token.trim_start_matches("0x");
            if token.len() % 2 != 0 {
                return Err(token.to_string());
            }
            for pair in token.as_bytes().chunks(2) {
                let s = core::str::from_utf8(pair).map_err(|_| token.to_string())?;
                bytes.push(u8::from_str_radix(s, 16).map_err(|_| token.to_string())?);
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(address: u8, mps: u16) -> EndpointInfo {
        EndpointInfo {
            address,
            transfer: TransferKind::Bulk,
            max_packet_size: mps,
        }
    }

    fn intf(number: u8, csp: (u8, u8, u8), endpoints: Vec<EndpointInfo>) -> InterfaceInfo {
        InterfaceInfo {
            number,
            alt_setting: 0,
            class: csp.0,
            subclass: csp.1,
            protocol: csp.2,
            endpoints,
        }
    }

    fn device(product_id: u16, configurations: Vec<ConfigInfo>) -> DeviceDescriptorInfo {
        DeviceDescriptorInfo {
            vendor_id: APPLE_VENDOR_ID,
            product_id,
            usb_version: 0x0200,
            serial_index: 3,
            configurations,
        }
    }

    #[test]
    fn classify_ranges() {
        assert_eq!(classify(0x05ac, 0x1290), Ok(AppleDeviceKind::Mobile));
        assert_eq!(classify(0x05ac, 0x12af), Ok(AppleDeviceKind::Mobile));
        assert_eq!(classify(0x05ac, 0x8600), Ok(AppleDeviceKind::T2));
        assert!(AppleDeviceKind::T2.skips_preflight());
        assert!(!AppleDeviceKind::Mobile.skips_preflight());
        for p in 0x1901..=0x1905 {
            assert_eq!(classify(0x05ac, p), Ok(AppleDeviceKind::MacRestore));
        }
        for p in [0x128f, 0x12b0, 0x1900, 0x1906, 0x8601, 0x110a] {
            assert_eq!(
                classify(0x05ac, p),
                Err(Rejection::UnsupportedProduct { product_id: p })
            );
        }
        assert_eq!(
            classify(0x18d1, 0x12a8),
            Err(Rejection::NotApple { vendor_id: 0x18d1 })
        );
    }

    #[test]
    fn alt_setting_other_than_zero_is_ignored() {
        let mut mux = intf(1, USBMUX_INTERFACE, vec![bulk(0x81, 512), bulk(0x02, 512)]);
        mux.alt_setting = 1;
        let dev = device(
            0x12a8,
            vec![ConfigInfo {
                value: 1,
                interfaces: vec![mux],
            }],
        );
        assert_eq!(choose_interface(&dev), Err(Rejection::NoUsbmuxInterface));
    }

    #[test]
    fn endpoint_problems() {
        let cases = [
            (vec![bulk(0x81, 512)], EndpointProblem::Count(1)),
            (
                vec![bulk(0x81, 512), bulk(0x02, 512), bulk(0x83, 512)],
                EndpointProblem::Count(3),
            ),
            (
                vec![bulk(0x81, 512), bulk(0x82, 512)],
                EndpointProblem::Directions,
            ),
            (
                vec![bulk(0x01, 512), bulk(0x02, 512)],
                EndpointProblem::Directions,
            ),
            (
                vec![
                    EndpointInfo {
                        address: 0x81,
                        transfer: TransferKind::Interrupt,
                        max_packet_size: 64,
                    },
                    bulk(0x02, 512),
                ],
                EndpointProblem::NotBulk,
            ),
        ];
        for (eps, problem) in cases {
            let dev = device(
                0x12a8,
                vec![ConfigInfo {
                    value: 3,
                    interfaces: vec![intf(1, USBMUX_INTERFACE, eps)],
                }],
            );
            assert_eq!(
                choose_interface(&dev),
                Err(Rejection::BadEndpoints {
                    configuration: 3,
                    interface: 1,
                    problem
                })
            );
        }
    }

    #[test]
    fn bad_candidate_in_higher_config_falls_back_to_lower() {
        let dev = device(
            0x12a8,
            vec![
                ConfigInfo {
                    value: 1,
                    interfaces: vec![intf(
                        0,
                        USBMUX_INTERFACE,
                        vec![bulk(0x02, 512), bulk(0x81, 512)],
                    )],
                },
                ConfigInfo {
                    value: 2,
                    interfaces: vec![intf(0, USBMUX_INTERFACE, vec![bulk(0x81, 512)])],
                },
            ],
        );
        let got = choose_interface(&dev).expect("config 1 is usable");
        assert_eq!((got.configuration, got.ep_in, got.ep_out), (1, 0x81, 0x02));
    }

    #[test]
    fn packet_size_masks_multiplier_bits() {
        let ep = bulk(0x81, 0x1200);
        assert_eq!(ep.packet_size(), 0x200);
        assert!(ep.is_in());
        assert!(!bulk(0x02, 512).is_in());
    }

    #[test]
    fn parse_rejects_garbage_without_panicking() {
        assert_eq!(
            DeviceDescriptorInfo::parse(&[]),
            Err(DescriptorError::Truncated { at: 0 })
        );
        let mut dev = [0u8; 18];
        dev[0] = 18;
        dev[1] = 1;
        dev[17] = 1; // one configuration announced, none present
        assert_eq!(
            DeviceDescriptorInfo::parse(&dev),
            Err(DescriptorError::Truncated { at: 18 })
        );
        // A zero bLength inside a configuration must not loop forever.
        let cfg = [9, 2, 11, 0, 1, 1, 0, 0xc0, 0xfa, 0, 4];
        assert_eq!(
            ConfigInfo::parse(&cfg),
            Err(DescriptorError::BadLength { at: 9, length: 0 })
        );
        // An endpoint before any interface.
        let cfg = [9, 2, 16, 0, 1, 1, 0, 0xc0, 0xfa, 7, 5, 0x81, 2, 0, 2, 0];
        assert_eq!(
            ConfigInfo::parse(&cfg),
            Err(DescriptorError::OrphanEndpoint { at: 9 })
        );
        // wTotalLength beyond the input.
        let cfg = [9, 2, 200, 0, 1, 1, 0, 0xc0, 0xfa];
        assert_eq!(
            ConfigInfo::parse(&cfg),
            Err(DescriptorError::Truncated { at: 0 })
        );
        // Every prefix of a valid configuration parses or fails cleanly.
        let good = parse_hex_dump(
            "09 02 20 00 01 01 00 c0 fa  09 04 00 00 02 ff fe 02 00 \
             07 05 81 02 00 02 00  07 05 02 02 00 02 00",
        )
        .expect("hex");
        for n in 0..good.len() {
            let _ = ConfigInfo::parse(&good[..n]);
        }
        assert_eq!(ConfigInfo::parse(&good).map(|c| c.interfaces.len()), Ok(1));
    }

    #[test]
    fn hex_dump_parsing() {
        assert_eq!(
            parse_hex_dump("# c\n12 01 # x\n0xff\nabCD"),
            Ok(vec![0x12, 1, 0xff, 0xab, 0xcd])
        );
        assert_eq!(parse_hex_dump("1"), Err("1".to_string()));
        assert_eq!(parse_hex_dump("zz"), Err("zz".to_string()));
    }
}
