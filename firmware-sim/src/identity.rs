//! Who a simulated phone says it is: its USB identity (what `usbmuxd` reads from descriptors)
//! and the values its lockdown service reports.
//!
//! Default identities are deterministic so tests and users can predict them: phone `k`
//! (numbered from 1) is
//!
//! | field | value |
//! |---|---|
//! | UDID | `00008030-` + `k` as 16 hex digits, e.g. `00008030-0000000000000001` |
//! | USB serial (iSerialNumber) | the UDID without the hyphen (24 hex digits) |
//! | DeviceName | `Simulated iPhone k` |
//! | product id | 0x12a8 (iPhone) |
//! | location id | `k` (bus 0, address `k`) |
//! | speed | 480 000 000 bit/s (USB 2 high speed), wMaxPacketSize 512 |
//! | lockdown values | the realistic iPhone 11 / iOS 16.6 set (`crate::lockdown`), `Pair` refused with `PasswordProtected` |

use serde::{Deserialize, Serialize};

use crate::lockdown::LockdownValues;

/// The identity of one simulated phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Identity {
    /// The UDID as hosts show it: new style `XXXXXXXX-XXXXXXXXXXXXXXXX` (8 + 16 hex) or legacy
    /// 40 hex digits. USB presents new-style UDIDs without the hyphen ([`Identity::usb_serial`]).
    pub udid: String,
    /// USB product id (0x1290..=0x12af are iPhones/iPads/iPods).
    pub product_id: u16,
    /// Location id reported to clients.
    pub location_id: u32,
    /// Link speed in bit/s (480 000 000 for USB 2 high speed).
    pub speed: u64,
    /// wMaxPacketSize of the bulk endpoints (64, 512 or 1024): it decides when ZLPs are needed.
    pub max_packet_size: u16,
    /// Lockdown's DeviceName.
    pub device_name: String,
    /// Lockdown's other values (overrides of the realistic defaults) and its answer to `Pair`.
    pub lockdown: LockdownValues,
}

impl Default for Identity {
    fn default() -> Self {
        Identity::simulated(1)
    }
}

/// A UDID or serial that cannot be a phone's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Neither 8-hex + "-" + 16-hex nor 40 hex digits.
    #[error("bad UDID {0:?}: expected XXXXXXXX-XXXXXXXXXXXXXXXX (hex) or 40 hex digits")]
    BadUdid(String),
    /// wMaxPacketSize other than 64, 512 or 1024.
    #[error("bad wMaxPacketSize {0}: expected 64, 512 or 1024")]
    BadPacketSize(u16),
}

impl Identity {
    /// The deterministic identity of simulated phone `k` (see the module docs).
    pub fn simulated(k: u32) -> Identity {
        Identity {
            udid: format!("00008030-{:016X}", k),
            product_id: 0x12a8,
            location_id: k,
            speed: 480_000_000,
            max_packet_size: 512,
            device_name: format!("Simulated iPhone {k}"),
            lockdown: LockdownValues::default(),
        }
    }

    /// The serial number string descriptor: a new-style UDID without its hyphen; a legacy one as
    /// it is. (usbmuxd re-inserts the hyphen after 8 characters when the serial is 24 long.)
    pub fn usb_serial(&self) -> String {
        self.udid.replace('-', "")
    }

    /// Checks the UDID form and the packet size.
    pub fn validate(&self) -> Result<(), IdentityError> {
        let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
        let ok = match self.udid.split_once('-') {
            Some((a, b)) => a.len() == 8 && b.len() == 16 && hex(a) && hex(b),
            None => self.udid.len() == 40 && hex(&self.udid),
        };
        if !ok {
            return Err(IdentityError::BadUdid(self.udid.clone()));
        }
        if ![64, 512, 1024].contains(&self.max_packet_size) {
            return Err(IdentityError::BadPacketSize(self.max_packet_size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn default_identities_are_predictable() {
        let p = Identity::simulated(1);
        assert_eq!(p.udid, "00008030-0000000000000001");
        assert_eq!(p.usb_serial(), "000080300000000000000001");
        assert_eq!(p.device_name, "Simulated iPhone 1");
        assert_eq!(Identity::simulated(26).udid, "00008030-000000000000001A");
        p.validate().unwrap();
    }

    #[test]
    fn validation() {
        let mut p = Identity::simulated(1);
        p.udid = "0123456789abcdef0123456789abcdef01234567".into();
        p.validate().unwrap();
        assert_eq!(p.usb_serial(), p.udid);
        for bad in [
            "",
            "../../etc/passwd",
            "00008030-00000000000000",
            "00008030_0000000000000001",
            "g0008030-0000000000000001",
        ] {
            p.udid = bad.into();
            assert!(
                matches!(p.validate(), Err(IdentityError::BadUdid(_))),
                "{bad}"
            );
        }
        p.udid = Identity::simulated(1).udid;
        p.max_packet_size = 100;
        assert_eq!(p.validate(), Err(IdentityError::BadPacketSize(100)));
    }
}
