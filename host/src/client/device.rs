//! What the daemon tells about devices and listeners, decoded from its plist dictionaries or
//! binary records.

use plist::{Dictionary, Value};

use crate::plist_msg::display_udid;
use crate::proto::DeviceRecord;

/// How a device is connected to the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnectionType {
    /// USB (every device of libimobiledevice's usbmuxd and ours).
    Usb,
    /// Wi-Fi (Apple's daemon, usbmuxd2): tools such as iproxy connect to these directly over
    /// TCP at [`Device::network_address`], not through the daemon.
    Network,
    /// Anything else the daemon reports, as sent.
    Other(String),
}

/// A device as the daemon lists it (ListDevices, Listen's Attached / DEVICE_ADD).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Device {
    /// The daemon's id for this attachment of the device: what [`connect`](super::Client::connect)
    /// takes. A replugged device gets a new id, so look devices up anew rather than keeping ids.
    pub device_id: u32,
    /// The UDID in the form tools show and pair records are filed under: a 24-hex-digit UDID
    /// gets its hyphen after the eighth digit (as libusbmuxd does for Apple's daemon, which
    /// sends it without), and libusbmuxd's substitution for the all-`f` placeholder UDID is
    /// applied. Compare with [`matches_udid`](Self::matches_udid).
    pub udid: String,
    /// USB product id (0 when not reported).
    pub product_id: u16,
    /// USB location, `(bus << 16) | address` (0 when not reported).
    pub location_id: u32,
    /// USB or network.
    pub connection_type: ConnectionType,
    /// Bus speed in bits per second, when reported (plist protocol only).
    pub connection_speed: Option<u64>,
    /// The raw USB serial number string (Apple's daemon and ours report it).
    pub usb_serial: Option<String>,
    /// For network devices, the device's address as a raw `sockaddr` (see PROTOCOL.md §3.3).
    pub network_address: Option<Vec<u8>>,
}

impl Device {
    /// Whether `udid` names this device, in either form (with or without the hyphen of modern
    /// UDIDs) and in either case.
    pub fn matches_udid(&self, udid: &str) -> bool {
        udid_eq(&self.udid, udid)
    }

    /// A device from an Attached dictionary (also a ListDevices entry); `Err` names what is
    /// missing. `DeviceID` may be at the top level or in `Properties`; `SerialNumber` is
    /// required, as libusbmuxd requires it.
    pub(crate) fn from_attached(dict: &Dictionary) -> Result<Device, String> {
        let props = dict
            .get("Properties")
            .and_then(Value::as_dictionary)
            .ok_or("no Properties dictionary")?;
        let uint = |d: &Dictionary, key: &str| d.get(key).and_then(Value::as_unsigned_integer);
        let device_id = uint(dict, "DeviceID")
            .or_else(|| uint(props, "DeviceID"))
            .ok_or("no DeviceID")?;
        let device_id = u32::try_from(device_id).map_err(|_| "DeviceID out of range")?;
        let serial = props
            .get("SerialNumber")
            .and_then(Value::as_string)
            .ok_or("no SerialNumber")?;
        let connection_type = match props.get("ConnectionType").and_then(Value::as_string) {
            None | Some("USB") => ConnectionType::Usb,
            Some("Network") => ConnectionType::Network,
            Some(other) => ConnectionType::Other(other.to_owned()),
        };
        Ok(Device {
            device_id,
            udid: sanitize_udid(serial, device_id),
            product_id: uint(props, "ProductID")
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(0),
            location_id: uint(props, "LocationID")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            connection_type,
            connection_speed: uint(props, "ConnectionSpeed"),
            usb_serial: props
                .get("USBSerialNumber")
                .and_then(Value::as_string)
                .map(str::to_owned),
            network_address: props
                .get("NetworkAddress")
                .and_then(Value::as_data)
                .map(<[u8]>::to_vec),
        })
    }

    /// A device from a binary DEVICE_ADD record (always USB).
    pub(crate) fn from_record(record: DeviceRecord) -> Device {
        Device {
            device_id: record.device_id,
            udid: sanitize_udid(&record.serial, record.device_id),
            product_id: record.product_id,
            location_id: record.location,
            connection_type: ConnectionType::Usb,
            connection_speed: None,
            usb_serial: None,
            network_address: None,
        }
    }
}

/// libusbmuxd's normalisation of a reported serial number (PROTOCOL.md §3.3): 24 hex digits
/// get the hyphen after the eighth; the 40-`f` placeholder some daemons report for devices
/// without a readable serial gets the device id (8 hex digits) as its last 8 characters, so
/// two such devices stay distinguishable.
fn sanitize_udid(serial: &str, device_id: u32) -> String {
    if serial.len() == 40 && serial.bytes().all(|b| b == b'f' || b == b'F') {
        return format!("{}{device_id:08x}", &serial[..32]);
    }
    display_udid(serial).into_owned()
}

/// A UDID reduced to what identifies it: the hyphen of the 25-character form removed, ASCII
/// lower case.
fn canonical_udid(udid: &str) -> String {
    let b = udid.as_bytes();
    let hyphenated = b.len() == 25
        && b[8] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 8 || c.is_ascii_hexdigit());
    let mut s = if hyphenated {
        udid.replacen('-', "", 1)
    } else {
        udid.to_owned()
    };
    s.make_ascii_lowercase();
    s
}

/// Whether two UDIDs name the same device: equal once the hyphen of modern UDIDs is ignored
/// and ASCII case is folded (`00008030-001A…` = `00008030001a…`).
pub fn udid_eq(a: &str, b: &str) -> bool {
    canonical_udid(a) == canonical_udid(b)
}

/// A change in the set of devices, as a listener hears it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceEvent {
    /// A device became visible (also sent for every device present when listening starts).
    Attached(Device),
    /// A device went away; its id is not used again while the daemon runs.
    Detached {
        /// The daemon's id of the device.
        device_id: u32,
    },
    /// A pair record was saved for a connected device.
    Paired {
        /// The daemon's id of the device.
        device_id: u32,
    },
}

/// One client in Listen mode, from a ListListeners reply. Every field is optional: the reply's
/// entries differ between daemons and only libimobiledevice's usbmuxd and ours are known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ListenerInfo {
    /// `ID String`: `<connection number>-<ProgName>` (libimobiledevice's usbmuxd puts the
    /// number of the client *asking* in every entry; ours the listener's own).
    pub id_string: Option<String>,
    /// `ProgName`: the listening program's name ("unknown" if it did not send one).
    pub prog_name: Option<String>,
    /// `BundleID`: the listening application's bundle id (macOS clients only).
    pub bundle_id: Option<String>,
    /// `kLibUSBMuxVersion` the listener sent (0 if none).
    pub lib_usbmux_version: Option<u64>,
    /// `ConnType` (0 for local clients).
    pub conn_type: Option<u64>,
    /// `Blacklisted`.
    pub blacklisted: Option<bool>,
}

impl ListenerInfo {
    pub(crate) fn from_dict(d: &Dictionary) -> ListenerInfo {
        let string = |key: &str| d.get(key).and_then(Value::as_string).map(str::to_owned);
        ListenerInfo {
            id_string: string("ID String"),
            prog_name: string("ProgName"),
            bundle_id: string("BundleID"),
            lib_usbmux_version: d
                .get("kLibUSBMuxVersion")
                .and_then(Value::as_unsigned_integer),
            conn_type: d.get("ConnType").and_then(Value::as_unsigned_integer),
            blacklisted: d.get("Blacklisted").and_then(Value::as_boolean),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udid_forms_compare_equal() {
        let hyphen = "00008030-001A2B3C4D5E6F70";
        assert!(udid_eq(hyphen, "00008030001A2B3C4D5E6F70"));
        assert!(udid_eq(hyphen, "00008030-001a2b3c4d5e6f70"));
        assert!(udid_eq("00008030001a2b3c4d5e6f70", hyphen));
        let legacy = "0123456789abcdef0123456789abcdef01234567";
        assert!(udid_eq(legacy, &legacy.to_uppercase()));
        assert!(!udid_eq(hyphen, "00008030-001A2B3C4D5E6F71"));
        assert!(!udid_eq("0000-8030", "00008030"));
        assert!(!udid_eq("", hyphen));
    }

    #[test]
    fn serials_are_sanitized_like_libusbmuxd() {
        assert_eq!(
            sanitize_udid("00008030001A2B3C4D5E6F70", 1),
            "00008030-001A2B3C4D5E6F70"
        );
        assert_eq!(
            sanitize_udid(&"f".repeat(40), 0x1c),
            format!("{}0000001c", "f".repeat(32))
        );
        let legacy = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(sanitize_udid(legacy, 3), legacy);
    }

    #[test]
    fn attached_dictionaries() {
        let mut props = Dictionary::new();
        props.insert("SerialNumber".into(), "00008030001A2B3C4D5E6F70".into());
        props.insert("DeviceID".into(), 4u64.into());
        props.insert("ConnectionType".into(), "Network".into());
        props.insert(
            "NetworkAddress".into(),
            Value::Data(vec![0x10, 2, 0, 0, 127, 0, 0, 1]),
        );
        let mut d = Dictionary::new();
        d.insert("Properties".into(), props.clone().into());
        let dev = Device::from_attached(&d).expect("device");
        assert_eq!(dev.device_id, 4);
        assert_eq!(dev.udid, "00008030-001A2B3C4D5E6F70");
        assert_eq!(dev.connection_type, ConnectionType::Network);
        assert_eq!(
            dev.network_address.as_deref(),
            Some(&[0x10, 2, 0, 0, 127, 0, 0, 1][..])
        );
        assert_eq!(
            (dev.product_id, dev.location_id, dev.connection_speed),
            (0, 0, None)
        );

        props.remove("SerialNumber");
        d.insert("Properties".into(), props.into());
        assert!(Device::from_attached(&d).is_err());
        assert!(Device::from_attached(&Dictionary::new()).is_err());
    }
}
