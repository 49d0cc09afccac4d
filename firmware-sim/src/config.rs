//! Configuration files for simulated phones (`usbmux-sim --config FILE`): TOML describing one or
//! more phones.
//!
//! # Format
//!
//! ```toml
//! # Optional: the number of phones. Without [[phone]] tables: that many default phones. With
//! # tables: the tables describe the first phones, default phones fill up to `count`.
//! count = 2
//!
//! [[phone]]                       # phone 1; every key is optional
//! udid = "00008030-001A2B3C4D5E6F70"
//! product_id = 0x12a8             # TOML allows hex integers
//! location_id = 0x00140000
//! speed = 480000000               # bit/s
//! max_packet_size = 512           # wMaxPacketSize: 64, 512 or 1024
//! version = 2                     # usbmux protocol version answered: 1 or 2
//! rx_buffer = 131072              # per connection, bytes
//! tx_buffer = 131072
//! device_name = "My test phone"
//!
//! [phone.lockdown]                # lockdown values of phone 1
//! ProductVersion = "17.5"
//! pair_refusal = "UserDeniedPairing"
//!
//! [[phone]]                       # phone 2: all defaults but the UDID
//! udid = "0123456789abcdef0123456789abcdef01234567"
//! ```
//!
//! | key | type | default for phone `k` (from 1) | rule |
//! |---|---|---|---|
//! | `count` | integer | the number of `[[phone]]` tables | 1..=[`MAX_PHONES`], not fewer than the tables |
//! | `udid` | string | `00008030-` + `k` as 16 upper-case hex digits | `XXXXXXXX-XXXXXXXXXXXXXXXX` (hex) or 40 hex digits; 24 hex digits without the hyphen (the USB serial form) are accepted and get the hyphen |
//! | `product_id` | integer | `0x12a8` | 0..=0xffff (not restricted to Apple's range, so hosts' matching can be tested) |
//! | `location_id` | integer | `k` | 0..=0xffffffff |
//! | `speed` | integer | 480000000 | bit/s |
//! | `max_packet_size` | integer | 512 | 64, 512 or 1024 |
//! | `version` | integer | 2 | 1 or 2 |
//! | `rx_buffer`, `tx_buffer` | integer | 131072 | [`MIN_BUFFER`]..=[`MAX_BUFFER`] |
//! | `device_name` | string | `Simulated iPhone k` | lockdown's DeviceName |
//! | `[phone.lockdown]` | table | the realistic set of `crate::lockdown` | see below |
//!
//! The `[phone.lockdown]` table takes `pair_refusal` (`"PasswordProtected"` (default),
//! `"PairingDialogResponsePending"` or `"UserDeniedPairing"`) and any of lockdown's own keys,
//! spelled as lockdown spells them: strings `BasebandVersion`, `BuildVersion`,
//! `CPUArchitecture`, `DeviceClass`, `DeviceColor`, `HardwareModel`, `PartitionType`,
//! `ProductName`, `ProductType`, `ProductVersion`, `ProtocolVersion`, `WiFiAddress`; integers
//! `BasebandCertId`, `BoardId`, `ChipID`, `DieID`, `UniqueChipID`; booleans `HasSiDP`,
//! `ProductionSOC`, `TelephonyCapability` (false also removes the `Baseband*` keys);
//! `SupportedDeviceFamilies` (array of integers); `BasebandSerialNumber` (data, as a hex string
//! such as `"12345678"`); `BasebandKeyHashInformation` (a table `{ AKeyStatus = 2, SKeyHash =
//! "<64 hex digits>", SKeyStatus = 0 }`). Keys left out keep the realistic value for the UDID's
//! form (iPhone 11 / iOS 16.6 for new-style UDIDs, iPhone X / iOS 13.3.1 for 40-hex ones).
//! `DeviceName` and `UniqueDeviceID` come from `device_name` and `udid`.
//!
//! Unknown keys are errors (a typo must not silently become a default). Two phones may not share
//! a UDID (compared without hyphen, ignoring case) or a location id. Every error names the file
//! and, where it applies, the phone (numbered from 1).

use std::path::Path;

use serde::Deserialize;
use usbmux_core::SessionConfig;

use crate::identity::{Identity, IdentityError};
use crate::lockdown::LockdownValues;
use crate::phone::PhoneConfig;

/// Most phones one file may describe.
pub const MAX_PHONES: u64 = 256;

/// Smallest receive or send buffer, bytes.
pub const MIN_BUFFER: usize = 256;

/// Largest receive or send buffer, bytes (16 MiB).
pub const MAX_BUFFER: usize = 16 << 20;

/// A configuration file that cannot be used: which file, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {kind}")]
pub struct ConfigError {
    /// The file (as given to [`load`]) or `<string>` for [`parse`].
    pub file: String,
    /// What is wrong.
    pub kind: ConfigErrorKind,
}

/// What is wrong with a configuration file. Phones are numbered from 1, in file order.
#[derive(Debug, thiserror::Error)]
pub enum ConfigErrorKind {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    /// Not TOML, an unknown key, or a value of the wrong type or range (the message says where).
    #[error("{0}")]
    Toml(#[source] toml::de::Error),
    /// A bad UDID or wMaxPacketSize.
    #[error("phone {phone}: {source}")]
    Identity {
        /// The phone.
        phone: u64,
        /// What `Identity::validate` found.
        source: IdentityError,
    },
    /// A protocol version other than 1 or 2.
    #[error("phone {phone}: version {version}: expected 1 or 2")]
    Version {
        /// The phone.
        phone: u64,
        /// The version given.
        version: u32,
    },
    /// A buffer size out of range.
    #[error("phone {phone}: {name} = {size}: expected {MIN_BUFFER}..={MAX_BUFFER} bytes")]
    Buffer {
        /// The phone.
        phone: u64,
        /// `rx_buffer` or `tx_buffer`.
        name: &'static str,
        /// The size given.
        size: usize,
    },
    /// `count` out of range.
    #[error("count = {0}: expected 1..={MAX_PHONES}")]
    Count(u64),
    /// `count` smaller than the number of `[[phone]]` tables.
    #[error("count = {count} but the file has {tables} [[phone]] tables")]
    CountBelowTables {
        /// The count given.
        count: u64,
        /// The tables present.
        tables: u64,
    },
    /// More `[[phone]]` tables than [`MAX_PHONES`].
    #[error("{0} [[phone]] tables: at most {MAX_PHONES}")]
    TooManyPhones(u64),
    /// Neither `[[phone]]` tables nor `count`.
    #[error("no phones: add [[phone]] tables or `count = N`")]
    NoPhones,
    /// Two phones with one UDID.
    #[error("phones {first} and {second} have the same UDID {udid}")]
    DuplicateUdid {
        /// The earlier phone.
        first: u64,
        /// The later phone.
        second: u64,
        /// The UDID (as the later phone spells it).
        udid: String,
    },
    /// Two phones with one location id.
    #[error("phones {first} and {second} have the same location id {location_id:#x}")]
    DuplicateLocation {
        /// The earlier phone.
        first: u64,
        /// The later phone.
        second: u64,
        /// The location id.
        location_id: u32,
    },
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    count: Option<u64>,
    #[serde(default)]
    phone: Vec<PhoneTable>,
}

/// One `[[phone]]` table: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PhoneTable {
    udid: Option<String>,
    product_id: Option<u16>,
    location_id: Option<u32>,
    speed: Option<u64>,
    max_packet_size: Option<u16>,
    version: Option<u32>,
    rx_buffer: Option<usize>,
    tx_buffer: Option<usize>,
    device_name: Option<String>,
    lockdown: Option<LockdownValues>,
}

/// Reads and checks the configuration file at `path` (see the module docs).
pub fn load(path: &Path) -> Result<Vec<PhoneConfig>, ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_named(&text, file),
        Err(e) => Err(ConfigError {
            file,
            kind: ConfigErrorKind::Io(e),
        }),
    }
}

/// Parses and checks configuration text (see the module docs); errors name the file `<string>`.
pub fn parse(text: &str) -> Result<Vec<PhoneConfig>, ConfigError> {
    parse_named(text, "<string>".to_owned())
}

fn parse_named(text: &str, file: String) -> Result<Vec<PhoneConfig>, ConfigError> {
    phones(text).map_err(|kind| ConfigError { file, kind })
}

fn phones(text: &str) -> Result<Vec<PhoneConfig>, ConfigErrorKind> {
    let file: File = toml::from_str(text).map_err(ConfigErrorKind::Toml)?;
    let tables = file.phone.len() as u64;
    if tables > MAX_PHONES {
        return Err(ConfigErrorKind::TooManyPhones(tables));
    }
    let count = match file.count {
        None if tables == 0 => return Err(ConfigErrorKind::NoPhones),
        None => tables,
        Some(c) if c == 0 || c > MAX_PHONES => return Err(ConfigErrorKind::Count(c)),
        Some(c) if c < tables => {
            return Err(ConfigErrorKind::CountBelowTables { count: c, tables })
        }
        Some(c) => c,
    };
    let mut tables = file.phone.into_iter();
    let mut out: Vec<PhoneConfig> = Vec::new();
    for k in 1..=count {
        let cfg = phone(k, tables.next().unwrap_or_default())?;
        let key = |c: &PhoneConfig| c.identity.usb_serial().to_ascii_uppercase();
        for (i, other) in out.iter().enumerate() {
            let first = i as u64 + 1;
            if key(other) == key(&cfg) {
                return Err(ConfigErrorKind::DuplicateUdid {
                    first,
                    second: k,
                    udid: cfg.identity.udid,
                });
            }
            if other.identity.location_id == cfg.identity.location_id {
                return Err(ConfigErrorKind::DuplicateLocation {
                    first,
                    second: k,
                    location_id: cfg.identity.location_id,
                });
            }
        }
        out.push(cfg);
    }
    Ok(out)
}

/// Phone `k`: the defaults of `PhoneConfig::simulated(k)` with the table's values on top.
fn phone(k: u64, t: PhoneTable) -> Result<PhoneConfig, ConfigErrorKind> {
    // k <= MAX_PHONES, far below u32::MAX.
    let mut cfg = PhoneConfig::simulated(u32::try_from(k).unwrap_or(u32::MAX));
    let id: &mut Identity = &mut cfg.identity;
    if let Some(udid) = t.udid {
        id.udid = with_hyphen(udid);
    }
    if let Some(v) = t.product_id {
        id.product_id = v;
    }
    if let Some(v) = t.location_id {
        id.location_id = v;
    }
    if let Some(v) = t.speed {
        id.speed = v;
    }
    if let Some(v) = t.max_packet_size {
        id.max_packet_size = v;
    }
    if let Some(v) = t.device_name {
        id.device_name = v;
    }
    if let Some(v) = t.lockdown {
        id.lockdown = v;
    }
    id.validate()
        .map_err(|source| ConfigErrorKind::Identity { phone: k, source })?;
    let session: &mut SessionConfig = &mut cfg.session;
    session.usb_packet_size = cfg.identity.max_packet_size;
    if let Some(version) = t.version {
        if !(1..=2).contains(&version) {
            return Err(ConfigErrorKind::Version { phone: k, version });
        }
        session.device_version = version;
    }
    for (name, given, field) in [
        ("rx_buffer", t.rx_buffer, &mut cfg.rx_buffer),
        ("tx_buffer", t.tx_buffer, &mut cfg.tx_buffer),
    ] {
        if let Some(size) = given {
            if !(MIN_BUFFER..=MAX_BUFFER).contains(&size) {
                return Err(ConfigErrorKind::Buffer {
                    phone: k,
                    name,
                    size,
                });
            }
            *field = size;
        }
    }
    Ok(cfg)
}

/// A new-style UDID in its USB form (24 hex digits) gets its hyphen after 8 digits, as hosts
/// show it; anything else is kept for `Identity::validate` to judge.
fn with_hyphen(udid: String) -> String {
    if udid.len() == 24 && udid.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("{}-{}", &udid[..8], &udid[8..])
    } else {
        udid
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::lockdown::{HexData, PairRefusal};

    const FULL: &str = r#"
count = 3

[[phone]]
udid = "00008030-001A2B3C4D5E6F70"
product_id = 0x12ab
location_id = 0x00140000
speed = 5000000000
max_packet_size = 1024
version = 1
rx_buffer = 65536
tx_buffer = 262144
device_name = "My test phone"

[phone.lockdown]
ProductVersion = "17.5"
pair_refusal = "UserDeniedPairing"
BasebandSerialNumber = "cafe"
SupportedDeviceFamilies = [1, 2]
BasebandKeyHashInformation = { AKeyStatus = 3, SKeyHash = "00ff", SKeyStatus = 1 }

[[phone]]
udid = "0123456789abcdef0123456789abcdef01234567"
"#;

    fn kind(text: &str) -> ConfigErrorKind {
        let e = parse(text).unwrap_err();
        assert_eq!(e.file, "<string>");
        assert!(e.to_string().starts_with("<string>: "), "{e}");
        e.kind
    }

    #[test]
    fn full_file() {
        let phones = parse(FULL).unwrap();
        assert_eq!(phones.len(), 3);
        let p = &phones[0];
        assert_eq!(p.identity.udid, "00008030-001A2B3C4D5E6F70");
        assert_eq!(p.identity.product_id, 0x12ab);
        assert_eq!(p.identity.location_id, 0x0014_0000);
        assert_eq!(p.identity.speed, 5_000_000_000);
        assert_eq!(p.identity.max_packet_size, 1024);
        assert_eq!(p.session.usb_packet_size, 1024);
        assert_eq!(p.session.device_version, 1);
        assert_eq!((p.rx_buffer, p.tx_buffer), (65536, 262_144));
        assert_eq!(p.identity.device_name, "My test phone");
        let l = &p.identity.lockdown;
        assert_eq!(l.product_version.as_deref(), Some("17.5"));
        assert_eq!(l.pair_refusal, PairRefusal::UserDeniedPairing);
        assert_eq!(l.baseband_serial_number, Some(HexData(vec![0xca, 0xfe])));
        assert_eq!(l.supported_device_families, Some(vec![1, 2]));
        let h = l.baseband_key_hash_information.as_ref().unwrap();
        assert_eq!((h.a_key_status, h.s_key_status), (3, 1));
        assert_eq!(h.s_key_hash, HexData(vec![0, 0xff]));
        assert_eq!(l.product_type, None);

        // Phone 2: only the UDID differs from the defaults of phone 2.
        let mut expected = PhoneConfig::simulated(2);
        expected.identity.udid = "0123456789abcdef0123456789abcdef01234567".into();
        assert_eq!(phones[1].identity, expected.identity);
        assert_eq!(phones[1].session.device_version, 2);
        // Phone 3: filled in by `count`.
        assert_eq!(phones[2].identity, Identity::simulated(3));
        assert_eq!(phones[2].rx_buffer, PhoneConfig::simulated(3).rx_buffer);
    }

    #[test]
    fn count_shortcut() {
        let phones = parse("count = 4").unwrap();
        assert_eq!(phones.len(), 4);
        for (i, p) in phones.iter().enumerate() {
            let d = PhoneConfig::simulated(i as u32 + 1);
            assert_eq!(p.identity, d.identity);
            assert_eq!(p.session.device_version, d.session.device_version);
            assert_eq!((p.rx_buffer, p.tx_buffer), (d.rx_buffer, d.tx_buffer));
        }
        assert_eq!(
            parse(&format!("count = {MAX_PHONES}")).unwrap().len() as u64,
            MAX_PHONES
        );
        // Empty tables are default phones too.
        let phones = parse("[[phone]]\n[[phone]]\n").unwrap();
        assert_eq!(phones[1].identity, Identity::simulated(2));
    }

    #[test]
    fn usb_form_udid_gets_its_hyphen() {
        let phones = parse("[[phone]]\nudid = \"00008030001A2B3C4D5E6F70\"").unwrap();
        assert_eq!(phones[0].identity.udid, "00008030-001A2B3C4D5E6F70");
    }

    #[test]
    fn errors() {
        assert!(matches!(kind(""), ConfigErrorKind::NoPhones));
        assert!(matches!(kind("count = 0"), ConfigErrorKind::Count(0)));
        assert!(matches!(kind("count = 257"), ConfigErrorKind::Count(257)));
        assert!(matches!(
            kind("count = 1\n[[phone]]\n[[phone]]"),
            ConfigErrorKind::CountBelowTables {
                count: 1,
                tables: 2
            }
        ));
        assert!(matches!(
            kind(&"[[phone]]\n".repeat(257)),
            ConfigErrorKind::TooManyPhones(257)
        ));
        assert!(matches!(kind("count = -1"), ConfigErrorKind::Toml(_)));
        assert!(matches!(kind("this is not toml"), ConfigErrorKind::Toml(_)));
        assert!(matches!(
            kind("[[phone]]\nudi = \"x\""),
            ConfigErrorKind::Toml(_)
        ));
        assert!(matches!(
            kind("[[phone]]\nproduct_id = 0x10000"),
            ConfigErrorKind::Toml(_)
        ));
        assert!(matches!(
            kind("[[phone]]\nversion = \"2\""),
            ConfigErrorKind::Toml(_)
        ));
        assert!(matches!(
            kind("[[phone]]\n[phone.lockdown]\nProductVerson = \"1\""),
            ConfigErrorKind::Toml(_)
        ));
        assert!(matches!(
            kind("[[phone]]\n[phone.lockdown]\npair_refusal = \"Maybe\""),
            ConfigErrorKind::Toml(_)
        ));
        assert!(matches!(
            kind("[[phone]]\n[phone.lockdown]\nBasebandSerialNumber = \"xyz\""),
            ConfigErrorKind::Toml(_)
        ));
        assert!(matches!(
            kind("[[phone]]\n[[phone]]\nudid = \"nope\""),
            ConfigErrorKind::Identity {
                phone: 2,
                source: IdentityError::BadUdid(_)
            }
        ));
        assert!(matches!(
            kind("[[phone]]\nmax_packet_size = 100"),
            ConfigErrorKind::Identity {
                phone: 1,
                source: IdentityError::BadPacketSize(100)
            }
        ));
        for v in [0, 3] {
            assert!(matches!(
                kind(&format!("[[phone]]\nversion = {v}")),
                ConfigErrorKind::Version { phone: 1, version } if version == v
            ));
        }
        for (name, size) in [("rx_buffer", 255), ("tx_buffer", MAX_BUFFER + 1)] {
            match kind(&format!("[[phone]]\n{name} = {size}")) {
                ConfigErrorKind::Buffer {
                    phone: 1,
                    name: n,
                    size: s,
                } => assert_eq!((n, s), (name, size)),
                other => panic!("{other:?}"),
            }
        }
        // Both ends of the buffer range are fine.
        parse(&format!(
            "[[phone]]\nrx_buffer = {MIN_BUFFER}\ntx_buffer = {MAX_BUFFER}"
        ))
        .unwrap();
        // The second phone's default UDID is the first one's configured UDID.
        assert!(matches!(
            kind("count = 2\n[[phone]]\nudid = \"00008030-0000000000000002\""),
            ConfigErrorKind::DuplicateUdid {
                first: 1,
                second: 2,
                ..
            }
        ));
        assert!(matches!(
            kind("[[phone]]\nudid = \"00008030-000000000000000a\"\n[[phone]]\nudid = \"00008030000000000000000A\"\nlocation_id = 9"),
            ConfigErrorKind::DuplicateUdid { first: 1, second: 2, .. }
        ));
        assert!(matches!(
            kind("count = 3\n[[phone]]\nlocation_id = 3"),
            ConfigErrorKind::DuplicateLocation {
                first: 1,
                second: 3,
                location_id: 3
            }
        ));
        // Messages say what and where.
        let e = parse("[[phone]]\nversion = 7").unwrap_err();
        assert_eq!(
            e.to_string(),
            "<string>: phone 1: version 7: expected 1 or 2"
        );
        let e = parse("[[phone]]\nudi = \"x\"").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("udi"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("usbmux-sim-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("phones.toml");
        std::fs::write(&good, FULL).unwrap();
        assert_eq!(load(&good).unwrap().len(), 3);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "count = 0").unwrap();
        let e = load(&bad).unwrap_err();
        assert_eq!(e.file, bad.display().to_string());
        assert!(e
            .to_string()
            .starts_with(&format!("{}: count = 0", bad.display())));
        let missing = dir.join("missing.toml");
        let e = load(&missing).unwrap_err();
        assert!(matches!(e.kind, ConfigErrorKind::Io(_)));
        assert!(e.to_string().contains("missing.toml: cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lockdown_values_reach_the_service() {
        use crate::lockdown::Lockdown;
        let phones = parse(FULL).unwrap();
        let l = Lockdown::new(&phones[0].identity);
        assert_eq!(l.pair_refusal(), PairRefusal::UserDeniedPairing);
        assert_eq!(
            l.values()["ProductVersion"],
            plist::Value::String("17.5".into())
        );
        assert_eq!(
            l.values()["DeviceName"],
            plist::Value::String("My test phone".into())
        );
        // The legacy phone gets the legacy set.
        let l = Lockdown::new(&phones[1].identity);
        assert_eq!(
            l.values()["CPUArchitecture"],
            plist::Value::String("arm64".into())
        );
    }
}
