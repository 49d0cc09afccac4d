//! How a USB device's facts become the [`DeviceIdentity`](crate::link::DeviceIdentity) clients
//! see: UDID from the serial string, location id, connection speed (PROTOCOL.md §2.1).

use core::fmt;

/// Where a device sits on the host: bus number and device address, as libusb reports them.
///
/// The address changes on every re-enumeration (replug, trust, mode switch), so a location names
/// one attachment of a device, not the device; the UDID names the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsbLocation {
    /// USB bus number.
    pub bus: u8,
    /// Device address on that bus (1–127).
    pub address: u8,
}

impl UsbLocation {
    /// The `LocationID` reported to clients; see [`location_id`].
    pub const fn location_id(self) -> u32 {
        location_id(self.bus, self.address)
    }
}

impl fmt::Display for UsbLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bus {} address {}", self.bus, self.address)
    }
}

/// The `LocationID` clients see: `(bus << 16) | address`.
///
/// This is what libimobiledevice's usbmuxd reports on Linux (PROTOCOL.md §2.1; the formula is
/// marked unconfirmed there). It is unique among attached devices, which is all clients use it
/// for; macOS's usbmuxd reports the IOKit locationID (port path) instead, so no client can rely
/// on its structure.
pub const fn location_id(bus: u8, address: u8) -> u32 {
    ((bus as u32) << 16) | address as u32
}

/// `ConnectionSpeed` in bit/s for a libusb speed, as usbmuxd reports it (PROTOCOL.md §2.1):
/// unknown speeds count as high speed, the USB 2 rate every phone supports.
pub fn speed_bps(speed: rusb::Speed) -> u64 {
    match speed {
        rusb::Speed::Low => 1_500_000,
        rusb::Speed::Full => 12_000_000,
        rusb::Speed::Super => 5_000_000_000,
        rusb::Speed::SuperPlus => 10_000_000_000,
        // High, Unknown and whatever later libusb versions add.
        _ => 480_000_000,
    }
}

/// Why a serial string cannot be a UDID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialError {
    /// The device has no serial string (iSerialNumber 0) or it is empty.
    Missing,
    /// The serial has characters other than ASCII letters, digits and `-` (shown with `?` for
    /// non-ASCII). The UDID ends up in file names (pair records) and in every client's output,
    /// so anything else is refused rather than passed on.
    Invalid(String),
    /// Longer than any UDID (64 characters).
    TooLong(usize),
}

impl fmt::Display for SerialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialError::Missing => f.write_str("device has no serial number"),
            SerialError::Invalid(s) => write!(f, "serial number {s:?} is not a UDID"),
            SerialError::TooLong(n) => write!(f, "serial number is {n} characters long"),
        }
    }
}

impl std::error::Error for SerialError {}

/// Longest serial accepted (UDIDs are 25 or 40 characters).
pub const MAX_SERIAL_LEN: usize = 64;

/// Converts a string descriptor to the ASCII serial usbmuxd uses: every non-ASCII character
/// becomes `?` (usbmuxd's UTF-16LE → ASCII rule), then the result is validated.
pub fn serial_from_descriptor(text: &str) -> Result<String, SerialError> {
    let ascii: String = text
        .chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect();
    if ascii.is_empty() {
        return Err(SerialError::Missing);
    }
    if ascii.len() > MAX_SERIAL_LEN {
        return Err(SerialError::TooLong(ascii.len()));
    }
    if !ascii
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(SerialError::Invalid(ascii.escape_debug().to_string()));
    }
    Ok(ascii)
}

/// The UDID for a USB serial: new-style 24-character serials (A12 and later,
/// `00008030001A2B3C4D5E6F70`) get a `-` after the 8th character
/// (`00008030-001A2B3C4D5E6F70`), which is how Apple writes them and what clients, pair record
/// file names and lockdown's `UniqueDeviceID` use; 40-character legacy UDIDs and anything else
/// are left as they are.
pub fn udid_from_serial(serial: &str) -> String {
    if serial.len() == 24 && serial.is_ascii() {
        let (head, tail) = serial.split_at(8);
        format!("{head}-{tail}")
    } else {
        serial.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udid_hyphenation() {
        assert_eq!(
            udid_from_serial("00008030001A2B3C4D5E6F70"),
            "00008030-001A2B3C4D5E6F70"
        );
        let legacy = "f1c15f36c3461bf9b24d568084d17cfb2d4243c4";
        assert_eq!(udid_from_serial(legacy), legacy);
        // Other lengths, including an already hyphenated UDID, pass through.
        assert_eq!(
            udid_from_serial("00008030-001A2B3C4D5E6F70"),
            "00008030-001A2B3C4D5E6F70"
        );
        assert_eq!(udid_from_serial("ABC"), "ABC");
        assert_eq!(udid_from_serial(""), "");
    }

    #[test]
    fn serial_validation() {
        assert_eq!(
            serial_from_descriptor("00008030001A2B3C4D5E6F70"),
            Ok("00008030001A2B3C4D5E6F70".to_string())
        );
        assert_eq!(serial_from_descriptor(""), Err(SerialError::Missing));
        assert_eq!(
            serial_from_descriptor("0000é"),
            Err(SerialError::Invalid("0000?".to_string()))
        );
        assert!(matches!(
            serial_from_descriptor("../../etc/passwd"),
            Err(SerialError::Invalid(_))
        ));
        assert!(matches!(
            serial_from_descriptor("a\0b"),
            Err(SerialError::Invalid(_))
        ));
        assert_eq!(
            serial_from_descriptor(&"a".repeat(65)),
            Err(SerialError::TooLong(65))
        );
    }

    #[test]
    fn speeds() {
        assert_eq!(speed_bps(rusb::Speed::Low), 1_500_000);
        assert_eq!(speed_bps(rusb::Speed::Full), 12_000_000);
        assert_eq!(speed_bps(rusb::Speed::High), 480_000_000);
        assert_eq!(speed_bps(rusb::Speed::Unknown), 480_000_000);
        assert_eq!(speed_bps(rusb::Speed::Super), 5_000_000_000);
        assert_eq!(speed_bps(rusb::Speed::SuperPlus), 10_000_000_000);
    }

    #[test]
    fn location_ids() {
        assert_eq!(location_id(1, 2), 0x0001_0002);
        assert_eq!(location_id(255, 127), 0x00ff_007f);
        let loc = UsbLocation { bus: 3, address: 9 };
        assert_eq!(loc.location_id(), 0x0003_0009);
        assert_eq!(loc.to_string(), "bus 3 address 9");
    }
}
