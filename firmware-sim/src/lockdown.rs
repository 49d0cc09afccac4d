//! lockdownd as a locked phone that never pairs (port [`PORT`], 62078), as described in
//! `shared/PROTOCOL.md` §10.
//!
//! # Wire format
//!
//! Each message is a 4-byte big-endian length followed by that many bytes of plist. Requests may
//! be XML or binary (`bplist00`) plists; replies are always XML. A length above
//! [`MAX_MESSAGE`] breaks the protocol: [`Responder::on_input`] returns `Err` and the phone
//! resets the connection. The connection stays open after every reply (also after `Goodbye`)
//! until the host closes it, since clients send several requests on one connection.
//!
//! # Requests and replies
//!
//! Every reply is a dictionary with its keys sorted, echoing `Request` (and `Key`/`Domain` where
//! noted); failures carry `Error: "<string>"` and no `Result`.
//!
//! | request | reply |
//! |---|---|
//! | `QueryType` | `Type: "com.apple.mobile.lockdown"` |
//! | `GetValue` (no `Key`, no `Domain`) | `Value`: the global dictionary (25 keys, below) |
//! | `GetValue Key=K`, K in that dictionary | `Key`, `Value` |
//! | `GetValue Key=DevicePublicKey` | `Key`, `Value`: a PKCS#1 PEM (`-----BEGIN RSA PUBLIC KEY-----`) as data |
//! | `GetValue` other `Key` (SerialNumber, any session-only key), any `Domain` | `Key`/`Domain` echoed, `Error: "MissingValue"` |
//! | `SetValue Key=UntrustedHostBUID Value=<string>` (no `Domain`) | `Key`; the value then appears in the global dictionary of this connection |
//! | `Pair` | `Error`: the identity's [`PairRefusal`] (`PasswordProtected` by default) |
//! | `StartSession`, `ValidatePair`, `Unpair` | `Error: "InvalidHostID"` (the phone trusts no host) |
//! | `StartService` (`Service` echoed), other `SetValue`, `RemoveValue`, `EnterRecovery`, `Activate`, `Deactivate` | `Error: "SessionInactive"` |
//! | `StopSession`, `Goodbye` | `Result: "Success"` |
//! | any other `Request` string | `Error: "UnknownRequest"` |
//! | a body that is not a plist dictionary, without a string `Request`, or with a `Key`/`Domain`/`Value` of the wrong type | `Error: "InvalidResponse"` (lockdownd's "malformed request"; `Request` echoed when it is a string) |
//!
//! # Values
//!
//! `DeviceName` and `UniqueDeviceID` come from the [`Identity`] (the UDID as hosts show it:
//! hyphenated for new-style UDIDs). The other values are a realistic set chosen by the UDID's
//! form, each overridable through [`Identity::lockdown`] ([`LockdownValues`]):
//!
//! | key | new-style UDID (iPhone 11, iOS 16.6, §10.6.1) | legacy 40-hex UDID (iPhone X, iOS 13.3.1, §10.10) |
//! |---|---|---|
//! | BasebandCertId | 2315222105 | 2315222105 |
//! | BasebandKeyHashInformation | {AKeyStatus 2, SKeyHash 32 zero bytes, SKeyStatus 0} | same |
//! | BasebandSerialNumber | data `12345678` | same |
//! | BasebandVersion | "4.02.01" | "5.30.01" |
//! | BoardId | 4 | 6 |
//! | BuildVersion | "20G75" | "17D50" |
//! | CPUArchitecture | "arm64e" | "arm64" |
//! | ChipID | 32816 (0x8030) | 32789 (0x8015) |
//! | DeviceClass | "iPhone" | "iPhone" |
//! | DeviceColor | "1" (a string) | "1" |
//! | DieID | 7445614290968614 | same |
//! | HardwareModel | "N104AP" | "D22AP" |
//! | HasSiDP | true | true |
//! | PartitionType | "GUID_partition_scheme" | same |
//! | ProductName | "iPhone OS" | same |
//! | ProductType | "iPhone12,1" | "iPhone10,3" |
//! | ProductVersion | "16.6" | "13.3.1" |
//! | ProductionSOC | true | true |
//! | ProtocolVersion | "2" (a string; lockdown's, not usbmux's) | "2" |
//! | SupportedDeviceFamilies | `[1]` | `[1]` |
//! | TelephonyCapability | true | true |
//! | UniqueChipID | 7445614290968614 | same |
//! | WiFiAddress | "a4:c3:f0:12:34:56" | same |
//!
//! With `TelephonyCapability = false` (a Wi-Fi-only iPad) the four `Baseband*` keys are left out,
//! as on a real one. The values are the same for every default phone, so a host's output can be
//! compared with §10.9 verbatim.
//!
//! `DevicePublicKey` is a deterministic 2048-bit RSA public key (exponent 65537) derived from the
//! UDID: it parses as PKCS#1, which is all a host checks before it sends `Pair`; nobody ever
//! needs its private half, because `Pair` is always refused.
//!
//! # Robustness
//!
//! Input comes from the host, so nothing in it can make the phone panic, buffer without bound or
//! recurse deeply: a message is at most [`MAX_MESSAGE`] bytes; a plist with more than
//! [`MAX_COLLECTIONS`] arrays/dictionaries, or a binary plist that shares one collection between
//! two parents (which the parser would expand, exponentially in the worst case), is refused
//! before the parser sees it (`Error: "InvalidResponse"`); ASCII (OpenStep) plists are not
//! accepted. At most one request is handled per call, so replies never pile up while the host
//! does not read.

use plist::{Dictionary, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::identity::Identity;
use crate::plist_guard::{self, Limits};
use crate::service::Responder;

/// The lockdown service's port.
pub const PORT: u16 = 62078;

/// Largest request body accepted, in bytes (real requests are a few KiB; `Pair` with its
/// certificates is the largest).
pub const MAX_MESSAGE: usize = 1 << 20;

/// Most arrays and dictionaries one request may contain (real requests have at most a handful).
pub const MAX_COLLECTIONS: usize = 256;

/// What [`plist_guard`] lets through to the plist parser: [`MAX_MESSAGE`] bytes,
/// [`MAX_COLLECTIONS`] collections nested at most as deep as there are collections, and string
/// and data payload (counted once per reference) up to four messages' worth.
const LIMITS: Limits = Limits {
    max_len: MAX_MESSAGE,
    max_collections: MAX_COLLECTIONS,
    max_depth: MAX_COLLECTIONS,
    max_expanded: 4 * MAX_MESSAGE,
};

/// The `Type` lockdownd answers to `QueryType`.
pub const SERVICE_TYPE: &str = "com.apple.mobile.lockdown";

/// How a locked phone refuses `Pair` (§10.3, §10.7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PairRefusal {
    /// The phone is locked with a passcode (libimobiledevice: -17, "Password protected").
    #[default]
    PasswordProtected,
    /// The "Trust this computer?" dialog is on screen, not answered yet (-19).
    PairingDialogResponsePending,
    /// The user tapped "Don't Trust" (-18).
    UserDeniedPairing,
}

impl PairRefusal {
    /// The `Error` string sent in the reply.
    pub fn as_str(self) -> &'static str {
        match self {
            PairRefusal::PasswordProtected => "PasswordProtected",
            PairRefusal::PairingDialogResponsePending => "PairingDialogResponsePending",
            PairRefusal::UserDeniedPairing => "UserDeniedPairing",
        }
    }
}

/// Bytes written as a hex string in configuration files (`"12345678"`), sent as plist data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct HexData(pub Vec<u8>);

impl Serialize for HexData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for HexData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_hex(&text).map(HexData).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "bad hex data {text:?}: expected an even number of hex digits"
            ))
        })
    }
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16);
    digits
        .chunks(2)
        .map(|p| Some((nibble(p[0])? * 16 + nibble(p[1])?) as u8))
        .collect()
}

/// `BasebandKeyHashInformation`: a dictionary `{AKeyStatus, SKeyHash, SKeyStatus}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BasebandKeyHash {
    /// `AKeyStatus` (2 on real phones).
    #[serde(rename = "AKeyStatus")]
    pub a_key_status: u64,
    /// `SKeyHash` (32 bytes).
    #[serde(rename = "SKeyHash")]
    pub s_key_hash: HexData,
    /// `SKeyStatus` (0 on real phones).
    #[serde(rename = "SKeyStatus")]
    pub s_key_status: u64,
}

impl Default for BasebandKeyHash {
    fn default() -> Self {
        BasebandKeyHash {
            a_key_status: 2,
            s_key_hash: HexData(vec![0; 32]),
            s_key_status: 0,
        }
    }
}

/// What a phone's lockdown says beyond its name and UDID: overrides of the realistic values (see
/// the module docs; `None` = the default for the UDID's form) and how it refuses `Pair`.
///
/// Field names in serialized form are lockdown's own keys (`ProductVersion = "17.5"` in TOML),
/// plus `pair_refusal`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockdownValues {
    /// The `Error` answered to `Pair`.
    pub pair_refusal: PairRefusal,
    /// `BasebandCertId` (integer).
    #[serde(rename = "BasebandCertId")]
    pub baseband_cert_id: Option<u64>,
    /// `BasebandKeyHashInformation` (dictionary).
    #[serde(rename = "BasebandKeyHashInformation")]
    pub baseband_key_hash_information: Option<BasebandKeyHash>,
    /// `BasebandSerialNumber` (data; hex in files).
    #[serde(rename = "BasebandSerialNumber")]
    pub baseband_serial_number: Option<HexData>,
    /// `BasebandVersion` (string).
    #[serde(rename = "BasebandVersion")]
    pub baseband_version: Option<String>,
    /// `BoardId` (integer).
    #[serde(rename = "BoardId")]
    pub board_id: Option<u64>,
    /// `BuildVersion` (string, e.g. "20G75").
    #[serde(rename = "BuildVersion")]
    pub build_version: Option<String>,
    /// `CPUArchitecture` ("arm64e" on A12 and later, "arm64" before).
    #[serde(rename = "CPUArchitecture")]
    pub cpu_architecture: Option<String>,
    /// `ChipID` (integer; 0x8030 = A13).
    #[serde(rename = "ChipID")]
    pub chip_id: Option<u64>,
    /// `DeviceClass` ("iPhone", "iPad", "iPod").
    #[serde(rename = "DeviceClass")]
    pub device_class: Option<String>,
    /// `DeviceColor` (a string, e.g. "1").
    #[serde(rename = "DeviceColor")]
    pub device_color: Option<String>,
    /// `DieID` (integer).
    #[serde(rename = "DieID")]
    pub die_id: Option<u64>,
    /// `HardwareModel` (e.g. "N104AP").
    #[serde(rename = "HardwareModel")]
    pub hardware_model: Option<String>,
    /// `HasSiDP` (boolean).
    #[serde(rename = "HasSiDP")]
    pub has_sidp: Option<bool>,
    /// `PartitionType` (string).
    #[serde(rename = "PartitionType")]
    pub partition_type: Option<String>,
    /// `ProductName` ("iPhone OS").
    #[serde(rename = "ProductName")]
    pub product_name: Option<String>,
    /// `ProductType` (e.g. "iPhone12,1").
    #[serde(rename = "ProductType")]
    pub product_type: Option<String>,
    /// `ProductVersion` (the iOS version, e.g. "16.6").
    #[serde(rename = "ProductVersion")]
    pub product_version: Option<String>,
    /// `ProductionSOC` (boolean).
    #[serde(rename = "ProductionSOC")]
    pub production_soc: Option<bool>,
    /// `ProtocolVersion` (a string, "2"): lockdown's protocol, unrelated to usbmux's version.
    #[serde(rename = "ProtocolVersion")]
    pub protocol_version: Option<String>,
    /// `SupportedDeviceFamilies` (array of integers; `[1]` iPhone, `[1, 2]` iPad).
    #[serde(rename = "SupportedDeviceFamilies")]
    pub supported_device_families: Option<Vec<u64>>,
    /// `TelephonyCapability` (boolean; false also drops the `Baseband*` keys).
    #[serde(rename = "TelephonyCapability")]
    pub telephony_capability: Option<bool>,
    /// `UniqueChipID` (integer, the ECID).
    #[serde(rename = "UniqueChipID")]
    pub unique_chip_id: Option<u64>,
    /// `WiFiAddress` (string, "aa:bb:cc:dd:ee:ff").
    #[serde(rename = "WiFiAddress")]
    pub wifi_address: Option<String>,
}

/// The defaults of the values that differ between the two realistic sets.
struct Preset {
    baseband_version: &'static str,
    board_id: u64,
    build_version: &'static str,
    cpu_architecture: &'static str,
    chip_id: u64,
    hardware_model: &'static str,
    product_type: &'static str,
    product_version: &'static str,
}

/// iPhone 11 (A13), iOS 16.6: §10.6.1.
const MODERN: Preset = Preset {
    baseband_version: "4.02.01",
    board_id: 4,
    build_version: "20G75",
    cpu_architecture: "arm64e",
    chip_id: 0x8030,
    hardware_model: "N104AP",
    product_type: "iPhone12,1",
    product_version: "16.6",
};

/// iPhone X (A11), iOS 13.3.1: §10.10.
const LEGACY: Preset = Preset {
    baseband_version: "5.30.01",
    board_id: 6,
    build_version: "17D50",
    cpu_architecture: "arm64",
    chip_id: 0x8015,
    hardware_model: "D22AP",
    product_type: "iPhone10,3",
    product_version: "13.3.1",
};

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn integer(n: u64) -> Value {
    Value::Integer(n.into())
}

/// The global dictionary `GetValue` returns without a session (see the module docs), keys sorted.
pub fn global_values(identity: &Identity) -> Dictionary {
    let v = &identity.lockdown;
    let p = if identity.udid.contains('-') {
        &MODERN
    } else {
        &LEGACY
    };
    let text = |o: &Option<String>, d: &str| string(o.as_deref().unwrap_or(d));
    let mut d = Dictionary::new();
    let mut put = |k: &str, value: Value| {
        d.insert(k.to_owned(), value);
    };
    let telephony = v.telephony_capability.unwrap_or(true);
    if telephony {
        put(
            "BasebandCertId",
            integer(v.baseband_cert_id.unwrap_or(2_315_222_105)),
        );
        let hash = v.baseband_key_hash_information.clone().unwrap_or_default();
        let mut h = Dictionary::new();
        h.insert("AKeyStatus".into(), integer(hash.a_key_status));
        h.insert("SKeyHash".into(), Value::Data(hash.s_key_hash.0));
        h.insert("SKeyStatus".into(), integer(hash.s_key_status));
        put("BasebandKeyHashInformation", Value::Dictionary(h));
        let serial = match &v.baseband_serial_number {
            Some(s) => s.0.clone(),
            None => vec![0x12, 0x34, 0x56, 0x78],
        };
        put("BasebandSerialNumber", Value::Data(serial));
        put(
            "BasebandVersion",
            text(&v.baseband_version, p.baseband_version),
        );
    }
    put("BoardId", integer(v.board_id.unwrap_or(p.board_id)));
    put("BuildVersion", text(&v.build_version, p.build_version));
    put(
        "CPUArchitecture",
        text(&v.cpu_architecture, p.cpu_architecture),
    );
    put("ChipID", integer(v.chip_id.unwrap_or(p.chip_id)));
    put("DeviceClass", text(&v.device_class, "iPhone"));
    put("DeviceColor", text(&v.device_color, "1"));
    put("DeviceName", string(&identity.device_name));
    put("DieID", integer(v.die_id.unwrap_or(7_445_614_290_968_614)));
    put("HardwareModel", text(&v.hardware_model, p.hardware_model));
    put("HasSiDP", Value::Boolean(v.has_sidp.unwrap_or(true)));
    put(
        "PartitionType",
        text(&v.partition_type, "GUID_partition_scheme"),
    );
    put("ProductName", text(&v.product_name, "iPhone OS"));
    put("ProductType", text(&v.product_type, p.product_type));
    put(
        "ProductVersion",
        text(&v.product_version, p.product_version),
    );
    put(
        "ProductionSOC",
        Value::Boolean(v.production_soc.unwrap_or(true)),
    );
    put("ProtocolVersion", text(&v.protocol_version, "2"));
    let families = v.supported_device_families.clone().unwrap_or(vec![1]);
    put(
        "SupportedDeviceFamilies",
        Value::Array(families.into_iter().map(integer).collect()),
    );
    put("TelephonyCapability", Value::Boolean(telephony));
    put(
        "UniqueChipID",
        integer(v.unique_chip_id.unwrap_or(7_445_614_290_968_614)),
    );
    put("UniqueDeviceID", string(&identity.udid));
    put("WiFiAddress", text(&v.wifi_address, "a4:c3:f0:12:34:56"));
    d.sort_keys();
    d
}

/// The phone's `DevicePublicKey`: a PKCS#1 PEM (`-----BEGIN RSA PUBLIC KEY-----`) of a 2048-bit
/// RSA public key with exponent 65537, derived deterministically from `udid`.
pub fn device_public_key(udid: &str) -> Vec<u8> {
    // The modulus: SHA-256 blocks of the UDID, top bit set (a full 2048 bits) and odd.
    let mut modulus = Vec::with_capacity(256);
    for block in 0u8..8 {
        let mut h = Sha256::new();
        h.update(b"usbmux-sim DevicePublicKey\0");
        h.update(udid.as_bytes());
        h.update([block]);
        modulus.extend_from_slice(&h.finalize());
    }
    modulus[0] |= 0x80;
    modulus[255] |= 1;
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER } (DER). The modulus
    // needs a leading zero to stay positive: 257 content bytes.
    let mut der = vec![0x30, 0x82, 0x01, 0x0a, 0x02, 0x82, 0x01, 0x01, 0x00];
    der.extend_from_slice(&modulus);
    der.extend_from_slice(&[0x02, 0x03, 0x01, 0x00, 0x01]);
    let b64 = base64(&der);
    let mut pem = b"-----BEGIN RSA PUBLIC KEY-----\n".to_vec();
    for line in b64.as_bytes().chunks(64) {
        pem.extend_from_slice(line);
        pem.push(b'\n');
    }
    pem.extend_from_slice(b"-----END RSA PUBLIC KEY-----\n");
    pem
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Why a reply could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The plist writer failed.
    #[error("cannot write the plist: {0}")]
    Plist(#[from] plist::Error),
    /// The body does not fit the 4-byte length.
    #[error("plist of {0} bytes does not fit a 4-byte length")]
    TooLong(usize),
}

/// Frames a plist dictionary as lockdown does: 4-byte big-endian length, then XML.
pub fn frame_xml(dict: &Dictionary) -> Result<Vec<u8>, EncodeError> {
    let mut framed = vec![0; 4];
    plist::to_writer_xml(&mut framed, dict)?;
    let len = framed.len() - 4;
    let len = u32::try_from(len).map_err(|_| EncodeError::TooLong(len))?;
    framed[..4].copy_from_slice(&len.to_be_bytes());
    Ok(framed)
}

/// Where the framing parser is.
#[derive(Debug)]
enum Frame {
    /// Reading the 4-byte length: `have` bytes of it so far.
    Length { buf: [u8; 4], have: usize },
    /// Reading a body of `len` bytes into `buf` (grown as bytes arrive, never reserved ahead).
    Body { len: usize, buf: Vec<u8> },
}

/// Requests a real phone serves only inside a session: refused with `SessionInactive`.
const SESSION_REQUESTS: &[&str] = &[
    "StartService",
    "SetValue",
    "RemoveValue",
    "EnterRecovery",
    "Activate",
    "Deactivate",
];

/// Requests that name a host the phone would have to trust: refused with `InvalidHostID`.
const HOST_REQUESTS: &[&str] = &["StartSession", "ValidatePair", "Unpair"];

/// The lockdown service of one connection (see the module docs).
#[derive(Debug)]
pub struct Lockdown {
    values: Dictionary,
    public_key: Vec<u8>,
    pair_refusal: PairRefusal,
    untrusted_host_buid: Option<String>,
    frame: Frame,
    requests: u64,
}

impl Lockdown {
    /// The lockdown service of the phone `identity` describes, waiting for a request.
    pub fn new(identity: &Identity) -> Self {
        Lockdown {
            values: global_values(identity),
            public_key: device_public_key(&identity.udid),
            pair_refusal: identity.lockdown.pair_refusal,
            untrusted_host_buid: None,
            frame: Frame::Length {
                buf: [0; 4],
                have: 0,
            },
            requests: 0,
        }
    }

    /// The global dictionary (without `UntrustedHostBUID`).
    pub fn values(&self) -> &Dictionary {
        &self.values
    }

    /// The `DevicePublicKey` PEM.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// What `Pair` is answered with.
    pub fn pair_refusal(&self) -> PairRefusal {
        self.pair_refusal
    }

    /// The `UntrustedHostBUID` a host set on this connection, if any.
    pub fn untrusted_host_buid(&self) -> Option<&str> {
        self.untrusted_host_buid.as_deref()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Answers one request body (an XML or binary plist, without its length prefix).
    pub fn handle(&mut self, body: &[u8]) -> Dictionary {
        self.requests += 1;
        let mut reply = Dictionary::new();
        let request = match parse_request(body) {
            Some(r) => r,
            None => return error(reply, "InvalidResponse"),
        };
        let name = match request.get("Request") {
            Some(Value::String(s)) => s.clone(),
            _ => return error(reply, "InvalidResponse"),
        };
        reply.insert("Request".into(), Value::String(name.clone()));
        let mut reply = match name.as_str() {
            "QueryType" => {
                reply.insert("Type".into(), string(SERVICE_TYPE));
                reply
            }
            "GetValue" => self.get_value(&request, reply),
            "SetValue" => self.set_value(&request, reply),
            "Pair" => error(reply, self.pair_refusal.as_str()),
            "StopSession" | "Goodbye" => {
                reply.insert("Result".into(), string("Success"));
                reply
            }
            "StartService" => {
                if let Some(service @ Value::String(_)) = request.get("Service") {
                    reply.insert("Service".into(), service.clone());
                }
                error(reply, "SessionInactive")
            }
            n if HOST_REQUESTS.contains(&n) => error(reply, "InvalidHostID"),
            n if SESSION_REQUESTS.contains(&n) => error(reply, "SessionInactive"),
            _ => error(reply, "UnknownRequest"),
        };
        reply.sort_keys();
        reply
    }

    fn get_value(&self, request: &Dictionary, mut reply: Dictionary) -> Dictionary {
        let Some((key, domain)) = key_and_domain(request, &mut reply) else {
            return error(reply, "InvalidResponse");
        };
        let value = match (key, domain) {
            (None, None) => {
                let mut all = self.values.clone();
                if let Some(buid) = &self.untrusted_host_buid {
                    all.insert("UntrustedHostBUID".into(), string(buid));
                    all.sort_keys();
                }
                Some(Value::Dictionary(all))
            }
            (Some("DevicePublicKey"), None) => Some(Value::Data(self.public_key.clone())),
            (Some("UntrustedHostBUID"), None) => self.untrusted_host_buid.as_deref().map(string),
            (Some(k), None) => self.values.get(k).cloned(),
            (_, Some(_)) => None,
        };
        match value {
            Some(v) => {
                reply.insert("Value".into(), v);
                reply
            }
            None => error(reply, "MissingValue"),
        }
    }

    fn set_value(&mut self, request: &Dictionary, mut reply: Dictionary) -> Dictionary {
        let Some((key, domain)) = key_and_domain(request, &mut reply) else {
            return error(reply, "InvalidResponse");
        };
        if key != Some("UntrustedHostBUID") || domain.is_some() {
            return error(reply, "SessionInactive");
        }
        match request.get("Value") {
            Some(Value::String(buid)) => {
                self.untrusted_host_buid = Some(buid.clone());
                reply
            }
            _ => error(reply, "InvalidResponse"),
        }
    }
}

/// Reads the optional `Key` and `Domain` strings of `request`, echoing them into `reply`;
/// `None` if either is present but not a string.
fn key_and_domain<'a>(
    request: &'a Dictionary,
    reply: &mut Dictionary,
) -> Option<(Option<&'a str>, Option<&'a str>)> {
    let mut get = |name: &str| match request.get(name) {
        None => Some(None),
        Some(Value::String(s)) => {
            reply.insert(name.to_owned(), Value::String(s.clone()));
            Some(Some(s.as_str()))
        }
        Some(_) => None,
    };
    let key = get("Key")?;
    let domain = get("Domain")?;
    Some((key, domain))
}

fn error(mut reply: Dictionary, text: &str) -> Dictionary {
    reply.insert("Error".into(), string(text));
    reply.sort_keys();
    reply
}

/// Parses a request body into a dictionary, or `None` if it is not a (safe) plist dictionary.
fn parse_request(body: &[u8]) -> Option<Dictionary> {
    plist_guard::parse(body, &LIMITS).ok()?.into_dictionary()
}

impl Responder for Lockdown {
    /// Consumes input up to the end of at most one request and appends its framed reply. `Err`
    /// for a length above [`MAX_MESSAGE`] (the phone resets the connection).
    fn on_input(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            match &mut self.frame {
                Frame::Length { buf, have } => {
                    let n = (4 - *have).min(rest.len());
                    buf[*have..*have + n].copy_from_slice(&rest[..n]);
                    *have += n;
                    used += n;
                    if *have == 4 {
                        let len = u32::from_be_bytes(*buf) as usize;
                        if len > MAX_MESSAGE {
                            return Err(format!(
                                "lockdown message of {len} bytes exceeds the limit of \
                                 {MAX_MESSAGE}"
                            ));
                        }
                        self.frame = Frame::Body {
                            len,
                            buf: Vec::new(),
                        };
                    }
                }
                Frame::Body { len, buf } => {
                    let n = (*len - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    used += n;
                }
            }
            if let Frame::Body { len, buf } = &mut self.frame {
                if buf.len() == *len {
                    let body = core::mem::take(buf);
                    self.frame = Frame::Length {
                        buf: [0; 4],
                        have: 0,
                    };
                    let reply = self.handle(&body);
                    let framed = frame_xml(&reply)
                        .map_err(|e| format!("lockdown could not encode its reply: {e}"))?;
                    out.extend_from_slice(&framed);
                    return Ok(used);
                }
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn s(v: &str) -> Value {
        Value::String(v.to_owned())
    }

    fn dict(pairs: &[(&str, Value)]) -> Dictionary {
        let mut d = Dictionary::new();
        for (k, v) in pairs {
            d.insert((*k).to_owned(), v.clone());
        }
        d
    }

    fn request(name: &str, extra: &[(&str, Value)]) -> Dictionary {
        let mut d = dict(extra);
        d.insert("Request".into(), s(name));
        d.insert("Label".into(), s("usbmux-sim-test"));
        d
    }

    fn framed_raw(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn framed_binary(d: &Dictionary) -> Vec<u8> {
        let mut body = Vec::new();
        Value::Dictionary(d.clone())
            .to_writer_binary(&mut body)
            .unwrap();
        assert!(body.starts_with(b"bplist00"));
        framed_raw(&body)
    }

    /// Feeds framed bytes, all at once, and returns the parsed replies (checking their framing
    /// and that they are XML).
    fn replies(l: &mut Lockdown, input: &[u8]) -> Vec<Dictionary> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < input.len() {
            let n = l.on_input(&input[at..], &mut out).unwrap();
            assert!(n >= 1);
            at += n;
        }
        parse_replies(&out)
    }

    fn parse_replies(mut out: &[u8]) -> Vec<Dictionary> {
        let mut all = Vec::new();
        while !out.is_empty() {
            let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            let body = &out[4..4 + len];
            assert!(body.starts_with(b"<?xml"), "reply is not XML");
            let v = Value::from_reader_xml(body).unwrap();
            all.push(v.into_dictionary().unwrap());
            out = &out[4 + len..];
        }
        all
    }

    fn ask_with(identity: &Identity, req: &Dictionary) -> Dictionary {
        let mut l = Lockdown::new(identity);
        ask_on(&mut l, req)
    }

    fn ask_on(l: &mut Lockdown, req: &Dictionary) -> Dictionary {
        let mut r = replies(l, &frame_xml(req).unwrap());
        assert_eq!(r.len(), 1);
        r.remove(0)
    }

    fn ask(req: &Dictionary) -> Dictionary {
        ask_with(&Identity::simulated(1), req)
    }

    fn keys(d: &Dictionary) -> Vec<&str> {
        d.keys().map(String::as_str).collect()
    }

    #[test]
    fn query_type() {
        let r = ask(&request("QueryType", &[]));
        assert_eq!(
            r,
            dict(&[
                ("Request", s("QueryType")),
                ("Type", s("com.apple.mobile.lockdown"))
            ])
        );
    }

    const KEYS: [&str; 25] = [
        "BasebandCertId",
        "BasebandKeyHashInformation",
        "BasebandSerialNumber",
        "BasebandVersion",
        "BoardId",
        "BuildVersion",
        "CPUArchitecture",
        "ChipID",
        "DeviceClass",
        "DeviceColor",
        "DeviceName",
        "DieID",
        "HardwareModel",
        "HasSiDP",
        "PartitionType",
        "ProductName",
        "ProductType",
        "ProductVersion",
        "ProductionSOC",
        "ProtocolVersion",
        "SupportedDeviceFamilies",
        "TelephonyCapability",
        "UniqueChipID",
        "UniqueDeviceID",
        "WiFiAddress",
    ];

    #[test]
    fn get_value_without_key_is_the_global_dictionary() {
        let r = ask(&request("GetValue", &[]));
        assert_eq!(keys(&r), ["Request", "Value"]);
        assert_eq!(r["Request"], s("GetValue"));
        let v = r["Value"].as_dictionary().unwrap();
        assert_eq!(keys(v), KEYS);
        assert_eq!(v["UniqueDeviceID"], s("00008030-0000000000000001"));
        assert_eq!(v["DeviceName"], s("Simulated iPhone 1"));
        // Types that matter (§10.6.1).
        assert_eq!(v["DeviceColor"], s("1"));
        assert_eq!(v["ProtocolVersion"], s("2"));
        assert_eq!(v["UniqueChipID"], integer(7_445_614_290_968_614));
        assert_eq!(v["ChipID"], integer(32816));
        assert_eq!(
            v["BasebandSerialNumber"],
            Value::Data(vec![0x12, 0x34, 0x56, 0x78])
        );
        assert_eq!(v["SupportedDeviceFamilies"], Value::Array(vec![integer(1)]));
        assert_eq!(v["HasSiDP"], Value::Boolean(true));
        let h = v["BasebandKeyHashInformation"].as_dictionary().unwrap();
        assert_eq!(keys(h), ["AKeyStatus", "SKeyHash", "SKeyStatus"]);
        assert_eq!(h["SKeyHash"], Value::Data(vec![0; 32]));
        assert_eq!(&Lockdown::new(&Identity::simulated(1)).values().clone(), v);
    }

    /// What `ideviceinfo -s` prints for a dictionary (libimobiledevice 1.3.0's layout).
    fn render(d: &Dictionary, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        let scalar = |v: &Value| match v {
            Value::String(t) => t.clone(),
            Value::Integer(n) => n.to_string(),
            Value::Boolean(b) => b.to_string(),
            Value::Data(d) => base64(d),
            other => panic!("unexpected {other:?}"),
        };
        for (k, v) in d {
            match v {
                Value::Dictionary(sub) => {
                    out.push_str(&format!("{pad}{k}: \n"));
                    render(sub, indent + 1, out);
                }
                Value::Array(a) => {
                    out.push_str(&format!("{pad}{k}[{}]: \n", a.len()));
                    for (i, x) in a.iter().enumerate() {
                        out.push_str(&format!("{pad} {i}: {}\n", scalar(x)));
                    }
                }
                v => out.push_str(&format!("{pad}{k}: {}\n", scalar(v))),
            }
        }
    }

    /// PROTOCOL.md §10.9, verbatim.
    const IDEVICEINFO_S: &str = "\
BasebandCertId: 2315222105
BasebandKeyHashInformation: 
 AKeyStatus: 2
 SKeyHash: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
 SKeyStatus: 0
BasebandSerialNumber: EjRWeA==
BasebandVersion: 4.02.01
BoardId: 4
BuildVersion: 20G75
CPUArchitecture: arm64e
ChipID: 32816
DeviceClass: iPhone
DeviceColor: 1
DeviceName: iPhone
DieID: 7445614290968614
HardwareModel: N104AP
HasSiDP: true
PartitionType: GUID_partition_scheme
ProductName: iPhone OS
ProductType: iPhone12,1
ProductVersion: 16.6
ProductionSOC: true
ProtocolVersion: 2
SupportedDeviceFamilies[1]: 
 0: 1
TelephonyCapability: true
UniqueChipID: 7445614290968614
UniqueDeviceID: 00008030-001A2B3C4D5E6F70
WiFiAddress: a4:c3:f0:12:34:56
";

    #[test]
    fn global_dictionary_prints_like_protocol_10_9() {
        let mut id = Identity::simulated(1);
        id.udid = "00008030-001A2B3C4D5E6F70".into();
        id.device_name = "iPhone".into();
        let r = ask_with(&id, &request("GetValue", &[]));
        let mut text = String::new();
        render(r["Value"].as_dictionary().unwrap(), 0, &mut text);
        assert_eq!(text, IDEVICEINFO_S);
    }

    #[test]
    fn get_value_with_key() {
        for (key, value) in [
            ("ProductVersion", s("16.6")),
            ("ProductType", s("iPhone12,1")),
            ("DeviceName", s("Simulated iPhone 1")),
            ("UniqueDeviceID", s("00008030-0000000000000001")),
            ("DeviceColor", s("1")),
            ("ProtocolVersion", s("2")),
            ("UniqueChipID", integer(7_445_614_290_968_614)),
            ("WiFiAddress", s("a4:c3:f0:12:34:56")),
        ] {
            let r = ask(&request("GetValue", &[("Key", s(key))]));
            assert_eq!(
                r,
                dict(&[
                    ("Key", s(key)),
                    ("Request", s("GetValue")),
                    ("Value", value)
                ]),
                "{key}"
            );
        }
    }

    /// Minimal DER reader: (tag, content, rest).
    fn der(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = b[0];
        let (len, at) = match b[1] {
            n if n < 0x80 => (usize::from(n), 2),
            0x81 => (usize::from(b[2]), 3),
            0x82 => (usize::from(b[2]) << 8 | usize::from(b[3]), 4),
            n => panic!("length form {n:#x}"),
        };
        (tag, &b[at..at + len], &b[at + len..])
    }

    fn unbase64(text: &str) -> Vec<u8> {
        const A: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in text.chars().filter(|&c| c != '=') {
            bits = bits << 6 | A.find(c).unwrap() as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }

    #[test]
    fn device_public_key_is_pkcs1_pem_data() {
        let r = ask(&request("GetValue", &[("Key", s("DevicePublicKey"))]));
        assert_eq!(keys(&r), ["Key", "Request", "Value"]);
        let pem = r["Value"].as_data().expect("DevicePublicKey must be data");
        let text = std::str::from_utf8(pem).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN RSA PUBLIC KEY-----");
        assert_eq!(*lines.last().unwrap(), "-----END RSA PUBLIC KEY-----");
        assert!(text.ends_with('\n'));
        assert!(lines[1..lines.len() - 1].iter().all(|l| l.len() <= 64));
        let body = unbase64(&lines[1..lines.len() - 1].concat());
        let (tag, seq, rest) = der(&body);
        assert_eq!((tag, rest.len()), (0x30, 0));
        let (tag, n, rest) = der(seq);
        assert_eq!(tag, 0x02);
        assert_eq!(n.len(), 257);
        assert_eq!(n[0], 0);
        assert!(n[1] & 0x80 != 0, "2048 bits");
        assert!(n[256] & 1 == 1, "odd");
        let (tag, e, rest) = der(rest);
        assert_eq!((tag, e, rest.len()), (0x02, &[1u8, 0, 1][..], 0));
        // Deterministic per UDID, different between phones.
        assert_eq!(pem, device_public_key("00008030-0000000000000001"));
        assert_ne!(pem, device_public_key("00008030-0000000000000002"));
    }

    #[test]
    fn base64_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn unavailable_keys_and_domains_are_missing_values() {
        for extra in [
            vec![("Key", s("SerialNumber"))],
            vec![("Key", s("TimeIntervalSince1970"))],
            vec![("Key", s("NoSuchKey"))],
            vec![("Key", s("UntrustedHostBUID"))],
            vec![("Domain", s("com.apple.disk_usage"))],
            vec![("Domain", s("com.apple.mobile.battery"))],
            vec![
                ("Domain", s("com.apple.disk_usage")),
                ("Key", s("TotalDiskCapacity")),
            ],
            vec![
                ("Domain", s("com.apple.international")),
                ("Key", s("ProductVersion")),
            ],
        ] {
            let r = ask(&request("GetValue", &extra));
            let mut expected = dict(&extra);
            expected.insert("Request".into(), s("GetValue"));
            expected.insert("Error".into(), s("MissingValue"));
            expected.sort_keys();
            assert_eq!(r, expected);
            assert_eq!(keys(&r), keys(&expected));
        }
    }

    #[test]
    fn set_value_untrusted_host_buid() {
        let buid = s("8A9B1C2D-3E4F-5061-7283-94A5B6C7D8E9");
        let mut l = Lockdown::new(&Identity::simulated(1));
        let r = ask_on(
            &mut l,
            &request(
                "SetValue",
                &[("Key", s("UntrustedHostBUID")), ("Value", buid.clone())],
            ),
        );
        assert_eq!(
            r,
            dict(&[("Key", s("UntrustedHostBUID")), ("Request", s("SetValue"))])
        );
        assert_eq!(
            l.untrusted_host_buid(),
            Some("8A9B1C2D-3E4F-5061-7283-94A5B6C7D8E9")
        );
        let all = ask_on(&mut l, &request("GetValue", &[]));
        let v = all["Value"].as_dictionary().unwrap();
        assert_eq!(v.len(), 26);
        assert_eq!(v["UntrustedHostBUID"], buid);
        assert!(keys(v).windows(2).all(|w| w[0] < w[1]), "sorted");
        let one = ask_on(
            &mut l,
            &request("GetValue", &[("Key", s("UntrustedHostBUID"))]),
        );
        assert_eq!(one["Value"], buid);
    }

    #[test]
    fn other_set_values_need_a_session() {
        for (extra, error) in [
            (
                vec![("Key", s("DeviceName")), ("Value", s("x"))],
                "SessionInactive",
            ),
            (
                vec![
                    ("Domain", s("com.apple.mobile.wireless_lockdown")),
                    ("Key", s("EnableWifiConnections")),
                    ("Value", Value::Boolean(true)),
                ],
                "SessionInactive",
            ),
            (
                vec![
                    ("Domain", s("com.apple.x")),
                    ("Key", s("UntrustedHostBUID")),
                    ("Value", s("x")),
                ],
                "SessionInactive",
            ),
            (vec![("Key", s("UntrustedHostBUID"))], "InvalidResponse"),
            (
                vec![("Key", s("UntrustedHostBUID")), ("Value", integer(1))],
                "InvalidResponse",
            ),
        ] {
            let r = ask(&request("SetValue", &extra));
            let mut expected: Dictionary = dict(&extra)
                .into_iter()
                .filter(|(k, _)| k != "Value")
                .collect();
            expected.insert("Request".into(), s("SetValue"));
            expected.insert("Error".into(), s(error));
            expected.sort_keys();
            assert_eq!(r, expected, "{extra:?}");
        }
    }

    #[test]
    fn pair_is_refused_as_configured() {
        let pair = request(
            "Pair",
            &[
                (
                    "PairRecord",
                    Value::Dictionary(dict(&[
                        ("DeviceCertificate", Value::Data(b"cert".to_vec())),
                        ("HostID", s("11111111-2222-3333-4444-555555555555")),
                    ])),
                ),
                (
                    "PairingOptions",
                    Value::Dictionary(dict(&[("ExtendedPairingErrors", Value::Boolean(true))])),
                ),
                ("ProtocolVersion", s("2")),
            ],
        );
        let mut id = Identity::simulated(1);
        assert_eq!(
            ask_with(&id, &pair),
            dict(&[("Error", s("PasswordProtected")), ("Request", s("Pair"))])
        );
        for refusal in [
            PairRefusal::PasswordProtected,
            PairRefusal::PairingDialogResponsePending,
            PairRefusal::UserDeniedPairing,
        ] {
            id.lockdown.pair_refusal = refusal;
            assert_eq!(Lockdown::new(&id).pair_refusal(), refusal);
            assert_eq!(
                ask_with(&id, &pair),
                dict(&[("Error", s(refusal.as_str())), ("Request", s("Pair"))])
            );
        }
    }

    #[test]
    fn session_and_other_requests() {
        for (name, extra, expected) in [
            (
                "StartSession",
                vec![("HostID", s("H")), ("SystemBUID", s("B"))],
                vec![("Error", s("InvalidHostID"))],
            ),
            ("ValidatePair", vec![], vec![("Error", s("InvalidHostID"))]),
            ("Unpair", vec![], vec![("Error", s("InvalidHostID"))]),
            (
                "StartService",
                vec![("Service", s("com.apple.afc"))],
                vec![
                    ("Error", s("SessionInactive")),
                    ("Service", s("com.apple.afc")),
                ],
            ),
            (
                "StartService",
                vec![],
                vec![("Error", s("SessionInactive"))],
            ),
            ("RemoveValue", vec![], vec![("Error", s("SessionInactive"))]),
            (
                "EnterRecovery",
                vec![],
                vec![("Error", s("SessionInactive"))],
            ),
            ("Activate", vec![], vec![("Error", s("SessionInactive"))]),
            ("Deactivate", vec![], vec![("Error", s("SessionInactive"))]),
            ("StopSession", vec![], vec![("Result", s("Success"))]),
            ("Goodbye", vec![], vec![("Result", s("Success"))]),
            ("Frobnicate", vec![], vec![("Error", s("UnknownRequest"))]),
            ("", vec![], vec![("Error", s("UnknownRequest"))]),
        ] {
            let r = ask(&request(name, &extra));
            let mut e = dict(&expected);
            e.insert("Request".into(), s(name));
            e.sort_keys();
            assert_eq!(r, e, "{name}");
        }
    }

    #[test]
    fn connection_stays_usable_after_goodbye() {
        let mut l = Lockdown::new(&Identity::simulated(1));
        let mut input = frame_xml(&request("Goodbye", &[])).unwrap();
        input.extend(frame_xml(&request("QueryType", &[])).unwrap());
        let r = replies(&mut l, &input);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1]["Type"], s(SERVICE_TYPE));
        assert_eq!(l.requests(), 2);
    }

    #[test]
    fn malformed_requests_are_invalid() {
        let invalid = dict(&[("Error", s("InvalidResponse"))]);
        let xml = |inner: &str| {
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">{inner}</plist>"
            )
        };
        let bodies: Vec<Vec<u8>> = vec![
            vec![],
            b"garbage".to_vec(),
            b"bplist00 but not really".to_vec(),
            b"{Request = QueryType;}".to_vec(), // ASCII plists are not accepted
            xml("<array><string>QueryType</string></array>").into_bytes(),
            xml("<dict><key>Label</key><string>x</string></dict>").into_bytes(),
            xml("<dict><key>Request</key><integer>1</integer></dict>").into_bytes(),
            xml("<dict><key>Request</key><string>QueryType</string>").into_bytes(),
            vec![0xff; 100],
        ];
        let mut l = Lockdown::new(&Identity::simulated(1));
        for body in bodies {
            let r = replies(&mut l, &framed_raw(&body));
            assert_eq!(
                r,
                std::slice::from_ref(&invalid),
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        }
        // The connection still works afterwards.
        assert_eq!(
            ask_on(&mut l, &request("QueryType", &[]))["Type"],
            s(SERVICE_TYPE)
        );
        // A Key or Domain that is not a string.
        for extra in [("Key", integer(5)), ("Domain", Value::Array(vec![]))] {
            let r = ask(&request("GetValue", &[extra]));
            assert_eq!(
                r,
                dict(&[("Error", s("InvalidResponse")), ("Request", s("GetValue"))])
            );
        }
    }

    #[test]
    fn binary_requests_are_accepted() {
        let mut l = Lockdown::new(&Identity::simulated(1));
        let r = replies(&mut l, &framed_binary(&request("QueryType", &[])));
        assert_eq!(r[0]["Type"], s(SERVICE_TYPE));
        let r = replies(
            &mut l,
            &framed_binary(&request("GetValue", &[("Key", s("ProductVersion"))])),
        );
        assert_eq!(r[0]["Value"], s("16.6"));
        let pair = request(
            "Pair",
            &[(
                "PairRecord",
                Value::Dictionary(dict(&[("HostID", s("H")), ("SystemBUID", s("H"))])),
            )],
        );
        let r = replies(&mut l, &framed_binary(&pair));
        assert_eq!(r[0]["Error"], s("PasswordProtected"));
    }

    #[test]
    fn input_split_anywhere_gives_the_same_replies() {
        let mut input = frame_xml(&request("QueryType", &[])).unwrap();
        input.extend(framed_binary(&request(
            "GetValue",
            &[("Key", s("DeviceName"))],
        )));
        input.extend(frame_xml(&request("Pair", &[])).unwrap());
        input.extend(framed_raw(b""));
        let expected = replies(&mut Lockdown::new(&Identity::simulated(1)), &input);
        assert_eq!(expected.len(), 4);
        for a in 0..=input.len() {
            let mut l = Lockdown::new(&Identity::simulated(1));
            let mut got = replies(&mut l, &input[..a]);
            got.extend(replies(&mut l, &input[a..]));
            assert_eq!(got, expected, "split at {a}");
        }
        let mut l = Lockdown::new(&Identity::simulated(1));
        let mut got = Vec::new();
        for b in input.chunks(1) {
            got.extend(replies(&mut l, b));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn one_request_per_call() {
        let first = frame_xml(&request("QueryType", &[])).unwrap();
        let mut input = first.clone();
        input.extend(frame_xml(&request("Goodbye", &[])).unwrap());
        let mut l = Lockdown::new(&Identity::simulated(1));
        let mut out = Vec::new();
        assert_eq!(l.on_input(&input, &mut out), Ok(first.len()));
        assert_eq!(parse_replies(&out).len(), 1);
    }

    #[test]
    fn oversize_length_is_a_protocol_violation() {
        let mut l = Lockdown::new(&Identity::simulated(1));
        let mut out = Vec::new();
        let len = (MAX_MESSAGE as u32 + 1).to_be_bytes();
        assert_eq!(l.on_input(&len[..3], &mut out), Ok(3));
        let err = l.on_input(&len[3..], &mut out).unwrap_err();
        assert!(err.contains("exceeds"), "{err}");
        assert!(out.is_empty());
        let mut l = Lockdown::new(&Identity::simulated(1));
        assert!(l.on_input(&u32::MAX.to_be_bytes(), &mut out).is_err());
        // Exactly the limit is fine (and answered as the garbage it is).
        let mut l = Lockdown::new(&Identity::simulated(1));
        let r = replies(&mut l, &framed_raw(&vec![b'x'; MAX_MESSAGE]));
        assert_eq!(r[0]["Error"], s("InvalidResponse"));
    }

    #[test]
    fn deep_or_exploding_plists_are_refused() {
        let invalid = dict(&[("Error", s("InvalidResponse"))]);
        let mut l = Lockdown::new(&Identity::simulated(1));
        let deep = |open: &str, close: &str, n: usize| {
            let mut x = String::from(
                "<plist><dict><key>Request</key><string>QueryType</string><key>X</key>",
            );
            x.push_str(&open.repeat(n));
            x.push_str(&close.repeat(n));
            x.push_str("</dict></plist>");
            x.into_bytes()
        };
        // Within the limit: parsed and answered.
        let ok = deep("<array>", "</array>", MAX_COLLECTIONS - 1);
        assert_eq!(
            replies(&mut l, &framed_raw(&ok))[0]["Type"],
            s(SERVICE_TYPE)
        );
        for body in [
            deep("<array>", "</array>", MAX_COLLECTIONS),
            deep("<p:array>", "</p:array>", 50_000),
            deep("<dict >", "</dict>", 50_000),
            deep("<array\n>", "</array>", 50_000),
            b"<".repeat(MAX_MESSAGE),
        ] {
            assert_eq!(
                replies(&mut l, &framed_raw(&body)),
                std::slice::from_ref(&invalid)
            );
        }

        // Binary: [A, A] where A = [] — a collection shared by two parents — and a longer
        // chain that would expand to 2^200 nodes.
        let shared: Vec<u8> = [
            &b"bplist00"[..],
            &[0xA2, 1, 1, 0xA0],        // objects 0 and 1 at offsets 8 and 11
            &[8, 11],                   // offset table at 12
            &[0, 0, 0, 0, 0, 0, 1, 1],  // trailer: offset size 1, ref size 1
            &[0, 0, 0, 0, 0, 0, 0, 2],  // 2 objects
            &[0; 8],                    // root 0
            &[0, 0, 0, 0, 0, 0, 0, 12], // offset table
        ]
        .concat();
        assert!(
            Value::from_reader(std::io::Cursor::new(&shared)).is_ok(),
            "valid plist"
        );
        assert_eq!(
            plist_guard::check_binary(&shared, &LIMITS),
            Err(plist_guard::GuardError::SharedCollection)
        );
        assert_eq!(
            replies(&mut l, &framed_raw(&shared)),
            std::slice::from_ref(&invalid)
        );
        let n = 200u8;
        let mut chain = b"bplist00".to_vec();
        let mut offsets = Vec::new();
        for i in 0..n {
            offsets.push(chain.len() as u8);
            if i + 1 < n {
                chain.extend_from_slice(&[0xA2, i + 1, i + 1]);
            } else {
                chain.push(0xA0);
            }
        }
        let table = chain.len() as u8;
        chain.extend_from_slice(&offsets);
        chain.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 1]);
        chain.extend_from_slice(&u64::from(n).to_be_bytes());
        chain.extend_from_slice(&[0; 8]);
        chain.extend_from_slice(&u64::from(table).to_be_bytes());
        assert_eq!(
            plist_guard::check_binary(&chain, &LIMITS),
            Err(plist_guard::GuardError::SharedCollection)
        );
        assert_eq!(
            replies(&mut l, &framed_raw(&chain)),
            std::slice::from_ref(&invalid)
        );
        // Truncated / lying binary plists.
        for cut in 0..shared.len() {
            assert!(
                plist_guard::check_binary(&shared[..cut], &LIMITS).is_err() || cut == shared.len()
            );
        }
        let mut lying = shared.clone();
        let at = lying.len() - 16;
        lying[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes()); // root out of range
        assert!(plist_guard::check_binary(&lying, &LIMITS).is_err());
        let mut lying = shared.clone();
        lying[8] = 0xAF; // extended length that runs past the end
        lying[9] = 0x13;
        assert!(plist_guard::check_binary(&lying, &LIMITS).is_err());
    }

    #[test]
    fn legacy_udid_gets_the_pre_a12_values() {
        let mut id = Identity::simulated(1);
        id.udid = "0123456789abcdef0123456789abcdef01234567".into();
        let v = global_values(&id);
        assert_eq!(keys(&v), KEYS);
        assert_eq!(
            v["UniqueDeviceID"],
            s("0123456789abcdef0123456789abcdef01234567")
        );
        assert_eq!(v["CPUArchitecture"], s("arm64"));
        assert_eq!(v["ChipID"], integer(32789));
        assert_eq!(v["ProductType"], s("iPhone10,3"));
        assert_eq!(v["ProductVersion"], s("13.3.1"));
        assert_eq!(v["HardwareModel"], s("D22AP"));
        assert_eq!(v["BuildVersion"], s("17D50"));
        assert_eq!(v["BoardId"], integer(6));
        assert_eq!(v["BasebandVersion"], s("5.30.01"));
    }

    #[test]
    fn overrides() {
        let mut id = Identity::simulated(3);
        id.lockdown.product_version = Some("17.5".into());
        id.lockdown.product_type = Some("iPad13,4".into());
        id.lockdown.baseband_serial_number = Some(HexData(vec![0xde, 0xad]));
        id.lockdown.supported_device_families = Some(vec![1, 2]);
        let v = global_values(&id);
        assert_eq!(v["ProductVersion"], s("17.5"));
        assert_eq!(v["ProductType"], s("iPad13,4"));
        assert_eq!(v["BasebandSerialNumber"], Value::Data(vec![0xde, 0xad]));
        assert_eq!(
            v["SupportedDeviceFamilies"],
            Value::Array(vec![integer(1), integer(2)])
        );
        assert_eq!(v["DeviceName"], s("Simulated iPhone 3"));
        id.lockdown.telephony_capability = Some(false);
        let v = global_values(&id);
        assert_eq!(v.len(), 21);
        assert!(keys(&v).iter().all(|k| !k.starts_with("Baseband")));
        assert_eq!(v["TelephonyCapability"], Value::Boolean(false));
        let r = ask_with(&id, &request("GetValue", &[("Key", s("BasebandVersion"))]));
        assert_eq!(r["Error"], s("MissingValue"));
    }

    #[test]
    fn hex_data_serde() {
        assert_eq!(parse_hex("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_hex(""), Some(vec![]));
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex("é1"), None);
        let v: LockdownValues =
            toml::from_str("BasebandSerialNumber = \"0102\"\npair_refusal = \"UserDeniedPairing\"")
                .unwrap();
        assert_eq!(v.baseband_serial_number, Some(HexData(vec![1, 2])));
        assert_eq!(v.pair_refusal, PairRefusal::UserDeniedPairing);
        let back = toml::to_string(&v).unwrap();
        assert_eq!(toml::from_str::<LockdownValues>(&back).unwrap(), v);
        assert!(toml::from_str::<LockdownValues>("BasebandSerialNumber = \"012\"").is_err());
        assert!(toml::from_str::<LockdownValues>("Bogus = 1").is_err());
    }
}
