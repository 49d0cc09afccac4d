//! The plist layer of the usbmuxd client protocol: header version 1, message type 8
//! (`shared/PROTOCOL.md` §3.3).
//!
//! Every plist message is a [`Header`] followed by a property list whose root is a dictionary.
//! Requests carry a string `MessageType` naming the request, the request's own keys, and client
//! identification keys (`ClientVersionString`, `ProgName`, `kLibUSBMuxVersion`, `BundleID`) that
//! the daemon only keeps for `ListListeners` and logs.
//!
//! - **Requests** ([`PlistRequest::parse`]) are accepted as XML or binary plists. The bytes go
//!   through [`plist_guard`] with [`LIMITS`] first, so no client can overflow the daemon's stack
//!   or make it expand a small binary plist into gigabytes; then every field the request needs is
//!   checked for presence and type, giving a typed [`PlistMsgError`] on anything else.
//!   [`PlistMsgError::reply_number`] says what libimobiledevice's usbmuxd answers in each case.
//! - **Replies** ([`Reply`]) are always XML, laid out byte for byte as libplist's `plist_to_xml`
//!   writes them (which is what libimobiledevice's usbmuxd sends): the usual prologue, one
//!   element per line, tab indentation, keys in usbmuxd's insertion order, `<data>` as base64
//!   lines under the element, and a final newline after `</plist>`.
//!
//! The `PortNumber` of Connect is byte-swapped on the wire (§3.4); [`Request::Connect`] holds
//! the real port and the swap happens here, in both directions.
//!
//! ```
//! use usbmux_host::plist_msg::{PlistRequest, Reply, Request};
//! use usbmux_host::proto::Header;
//!
//! let body = br#"<plist version="1.0"><dict>
//!     <key>MessageType</key><string>Connect</string>
//!     <key>DeviceID</key><integer>1</integer>
//!     <key>PortNumber</key><integer>32498</integer>
//! </dict></plist>"#;
//! let parsed = PlistRequest::parse(body)?;
//! assert_eq!(parsed.request, Request::Connect { device_id: 1, port: 62078 });
//!
//! // The daemon's answer: Result 0 with the request's tag.
//! let reply = Reply::Result(0).encode(7)?;
//! let (header, xml) = Header::split(&reply)?;
//! assert_eq!(header.tag, 7);
//! assert!(xml.ends_with(b"<integer>0</integer>\n</dict>\n</plist>\n"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;

use plist::{Dictionary, Value};
use thiserror::Error;
use usbmux_sim::plist_guard::{self, GuardError, Limits};

use crate::proto::{self, Header, MessageType, ProtoError, ProtocolVersion, MAX_BODY_LEN};

/// What a request body may contain before it is parsed (see [`plist_guard`]).
///
/// A request is one dictionary of scalars, so these bounds are far above anything a real client
/// sends: the whole body of the largest message the protocol allows ([`MAX_BODY_LEN`]), 256
/// arrays and dictionaries, nesting 32 deep, and strings and data expanding to four bodies'
/// worth (binary plists may reference one string from several places).
pub const LIMITS: Limits = Limits {
    max_len: MAX_BODY_LEN,
    max_collections: 256,
    max_depth: 32,
    max_expanded: 4 * MAX_BODY_LEN,
};

/// Result number usbmuxd sends for a request it does not know or cannot use.
const BAD_COMMAND: u32 = 1;
/// Result number for an unknown device (also a Connect without `DeviceID`).
const BAD_DEVICE: u32 = 2;
/// `EINVAL`, the Result number of a pair-record request without a usable id or data.
const EINVAL: u32 = 22;

/// The client identification keys of a request.
///
/// libusbmuxd adds them to every request; usbmuxd copies them into the client's record (for
/// `ListListeners` and logs) and requires none of them. A key of the wrong type is ignored, as
/// usbmuxd does, rather than failing the request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ClientInfo {
    /// `BundleID`: the application's bundle identifier (sent on macOS only).
    pub bundle_id: Option<String>,
    /// `ClientVersionString`, e.g. "libusbmuxd 2.0.2".
    pub client_version: Option<String>,
    /// `ProgName`: the executable's short name, e.g. "idevice_id".
    pub prog_name: Option<String>,
    /// `kLibUSBMuxVersion`: libusbmuxd's protocol revision (3 for libusbmuxd 2.x).
    pub lib_usbmux_version: Option<u64>,
}

impl ClientInfo {
    /// Picks the identification keys out of a request dictionary.
    fn from_dict(dict: &Dictionary) -> Self {
        let string = |key: &str| match dict.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Self {
            bundle_id: string("BundleID"),
            client_version: string("ClientVersionString"),
            prog_name: string("ProgName"),
            lib_usbmux_version: match dict.get("kLibUSBMuxVersion") {
                Some(Value::Integer(n)) => n.as_unsigned(),
                _ => None,
            },
        }
    }
}

/// A request of the plist protocol, with its fields checked and converted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Request {
    /// `Listen`: subscribe to Attached/Detached/Paired notifications on this socket.
    Listen,
    /// `Connect`: make this socket a byte pipe to `port` on device `device_id`.
    Connect {
        /// The daemon's id of the device (`DeviceID`).
        device_id: u32,
        /// The TCP port on the device, in host order: `PortNumber` with its bytes swapped back
        /// (§3.4), so 62078 for lockdownd although the wire carries 32498.
        port: u16,
    },
    /// `ListDevices`: the visible devices.
    ListDevices,
    /// `ListListeners`: the clients in Listen mode.
    ListListeners,
    /// `ReadBUID`: the host's SystemBUID.
    ReadBUID,
    /// `ReadPairRecord`: the stored pair record of one device.
    ReadPairRecord {
        /// `PairRecordID`: the device's UDID, not yet validated as a file name.
        id: String,
    },
    /// `SavePairRecord`: store a pair record (and tell listeners the device is now paired).
    SavePairRecord {
        /// `PairRecordID`: the device's UDID, not yet validated as a file name.
        id: String,
        /// `PairRecordData`: the record, a plist (XML or binary) not yet validated.
        data: Vec<u8>,
        /// `DeviceID`, when present as an integer from 1 to `u32::MAX`: the connected device the
        /// record belongs to, whose listeners get a Paired notification. usbmuxd ignores a
        /// missing, zero or non-integer `DeviceID`, and so does this parser.
        device_id: Option<u32>,
    },
    /// `DeletePairRecord`: remove a stored pair record.
    DeletePairRecord {
        /// `PairRecordID`: the device's UDID, not yet validated as a file name.
        id: String,
    },
    /// Any other `MessageType`, kept as sent; usbmuxd answers Result 1 (BADCOMMAND).
    Unknown(String),
}

impl Request {
    /// The `MessageType` string of this request.
    pub fn message_type(&self) -> &str {
        match self {
            Self::Listen => "Listen",
            Self::Connect { .. } => "Connect",
            Self::ListDevices => "ListDevices",
            Self::ListListeners => "ListListeners",
            Self::ReadBUID => "ReadBUID",
            Self::ReadPairRecord { .. } => "ReadPairRecord",
            Self::SavePairRecord { .. } => "SavePairRecord",
            Self::DeletePairRecord { .. } => "DeletePairRecord",
            Self::Unknown(name) => name,
        }
    }
}

/// A parsed request body: the request and who sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlistRequest {
    /// What the client asks for.
    pub request: Request,
    /// The client's identification keys, for `ListListeners` and logs.
    pub client: ClientInfo,
}

/// Why a plist body could not be turned into a [`PlistRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Error)]
#[non_exhaustive]
pub enum PlistMsgError {
    /// The body was refused before or while parsing: too large, too many collections, too deep,
    /// a hostile binary plist, or simply not a plist.
    #[error("unusable plist body: {0}")]
    Guard(#[from] GuardError),
    /// The plist's root is not a dictionary.
    #[error("plist root is not a dictionary")]
    NotADict,
    /// The dictionary has no `MessageType`, or it is not a string.
    #[error("no string MessageType in the request")]
    MissingMessageType,
    /// A key the request needs is absent.
    #[error("{message} request without {key}")]
    MissingField {
        /// The request's `MessageType`.
        message: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// A key the request needs has the wrong type or an out-of-range value.
    #[error("{message} request: {key} is not {expected}")]
    BadField {
        /// The request's `MessageType`.
        message: &'static str,
        /// The offending key.
        key: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
}

impl PlistMsgError {
    /// The `Number` of the Result libimobiledevice's usbmuxd sends for this error, or `None`
    /// when it sends nothing at all (a body that is not a plist dictionary with a string
    /// `MessageType` is dropped silently).
    ///
    /// A Connect without a usable `DeviceID` gets 2 (BADDEV), one without a usable
    /// `PortNumber` 1 (BADCOMMAND); a pair-record request without a usable `PairRecordID` or
    /// `PairRecordData` gets 22 (EINVAL).
    pub fn reply_number(&self) -> Option<u32> {
        let key = match self {
            Self::Guard(_) | Self::NotADict | Self::MissingMessageType => return None,
            Self::MissingField { key, .. } | Self::BadField { key, .. } => *key,
        };
        Some(match key {
            "DeviceID" => BAD_DEVICE,
            "PairRecordID" | "PairRecordData" => EINVAL,
            _ => BAD_COMMAND,
        })
    }
}

/// Reads a required field of `dict` with `get`, which returns `None` for a wrong type.
fn field<'a, T>(
    dict: &'a Dictionary,
    message: &'static str,
    key: &'static str,
    expected: &'static str,
    get: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<T, PlistMsgError> {
    let value = dict
        .get(key)
        .ok_or(PlistMsgError::MissingField { message, key })?;
    get(value).ok_or(PlistMsgError::BadField {
        message,
        key,
        expected,
    })
}

fn as_u32(value: &Value) -> Option<u32> {
    u32::try_from(value.as_unsigned_integer()?).ok()
}

fn as_u16(value: &Value) -> Option<u16> {
    u16::try_from(value.as_unsigned_integer()?).ok()
}

fn as_string(value: &Value) -> Option<String> {
    value.as_string().map(str::to_owned)
}

fn as_data(value: &Value) -> Option<Vec<u8>> {
    value.as_data().map(<[u8]>::to_vec)
}

impl PlistRequest {
    /// Parses a request body (the bytes after the 16-byte header), XML or binary.
    ///
    /// NUL bytes at the end of an XML body are ignored (a C client may send its string's
    /// terminator). Keys the request does not use are ignored.
    pub fn parse(body: &[u8]) -> Result<Self, PlistMsgError> {
        let body = match plist_guard::Format::of(body) {
            plist_guard::Format::Xml => {
                let end = body.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                &body[..end]
            }
            plist_guard::Format::Binary => body,
        };
        let Value::Dictionary(dict) = plist_guard::parse(body, &LIMITS)? else {
            return Err(PlistMsgError::NotADict);
        };
        let Some(Value::String(message)) = dict.get("MessageType") else {
            return Err(PlistMsgError::MissingMessageType);
        };
        let id =
            |message: &'static str| field(&dict, message, "PairRecordID", "a string", as_string);
        let request = match message.as_str() {
            "Listen" => Request::Listen,
            "Connect" => {
                const M: &str = "Connect";
                let device_id = field(&dict, M, "DeviceID", "an integer 0..=2^32-1", as_u32)?;
                let wire = field(&dict, M, "PortNumber", "an integer 0..=65535", as_u16)?;
                Request::Connect {
                    device_id,
                    port: proto::plist_port(wire),
                }
            }
            "ListDevices" => Request::ListDevices,
            "ListListeners" => Request::ListListeners,
            "ReadBUID" => Request::ReadBUID,
            "ReadPairRecord" => Request::ReadPairRecord {
                id: id("ReadPairRecord")?,
            },
            "SavePairRecord" => {
                const M: &str = "SavePairRecord";
                Request::SavePairRecord {
                    id: id(M)?,
                    data: field(&dict, M, "PairRecordData", "data", as_data)?,
                    device_id: dict.get("DeviceID").and_then(as_u32).filter(|&id| id != 0),
                }
            }
            "DeletePairRecord" => Request::DeletePairRecord {
                id: id("DeletePairRecord")?,
            },
            other => Request::Unknown(other.to_owned()),
        };
        Ok(Self {
            request,
            client: ClientInfo::from_dict(&dict),
        })
    }

    /// The request as an XML body, the way libusbmuxd builds it: the client identification
    /// keys that are set (`BundleID`, `ClientVersionString`), `MessageType`, `ProgName`,
    /// `kLibUSBMuxVersion`, then the request's own keys (`PortNumber` byte-swapped).
    pub fn to_xml(&self) -> Vec<u8> {
        let client = &self.client;
        let mut dict: Vec<(&str, Node)> = Vec::new();
        if let Some(bundle) = &client.bundle_id {
            dict.push(("BundleID", Node::String(bundle)));
        }
        if let Some(version) = &client.client_version {
            dict.push(("ClientVersionString", Node::String(version)));
        }
        dict.push(("MessageType", Node::String(self.request.message_type())));
        if let Some(name) = &client.prog_name {
            dict.push(("ProgName", Node::String(name)));
        }
        if let Some(version) = client.lib_usbmux_version {
            dict.push(("kLibUSBMuxVersion", Node::Integer(version)));
        }
        match &self.request {
            Request::Connect { device_id, port } => {
                dict.push(("DeviceID", Node::Integer((*device_id).into())));
                dict.push(("PortNumber", Node::Integer(proto::plist_port(*port).into())));
            }
            Request::ReadPairRecord { id } | Request::DeletePairRecord { id } => {
                dict.push(("PairRecordID", Node::String(id)));
            }
            Request::SavePairRecord {
                id,
                data,
                device_id,
            } => {
                dict.push(("PairRecordID", Node::String(id)));
                dict.push(("PairRecordData", Node::Data(data)));
                if let Some(device_id) = device_id {
                    dict.push(("DeviceID", Node::Integer((*device_id).into())));
                }
            }
            Request::Listen
            | Request::ListDevices
            | Request::ListListeners
            | Request::ReadBUID
            | Request::Unknown(_) => {}
        }
        Node::Dict(dict).to_xml()
    }

    /// The whole request message (header version 1, message type 8, `tag`); fails only if it
    /// would exceed the protocol's 64 KiB message limit.
    pub fn encode(&self, tag: u32) -> Result<Vec<u8>, ProtoError> {
        encode_message(tag, &self.to_xml())
    }
}

/// Prefixes a plist body with its 16-byte header: length, version 1, message type 8, `tag`.
///
/// Fails with [`ProtoError::LengthTooLarge`] if the message would exceed
/// [`MAX_MESSAGE_LEN`](crate::proto::MAX_MESSAGE_LEN), which no peer would accept.
pub fn encode_message(tag: u32, body: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let header = Header::new(ProtocolVersion::Plist, MessageType::Plist, tag, body.len())?;
    let mut message = Vec::with_capacity(header.total_len());
    message.extend_from_slice(&header.to_bytes()?);
    message.extend_from_slice(body);
    Ok(message)
}

/// A device as the daemon reports it in Attached notifications and ListDevices replies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// The daemon's id of the device (from 1, never reused while the daemon runs).
    pub device_id: u32,
    /// USB product id, e.g. 0x12A8.
    pub product_id: u16,
    /// USB location: `(bus << 16) | address`.
    pub location_id: u32,
    /// Bus speed in bits per second: 480000000 for USB 2, 5000000000 for USB 3.
    pub speed: u64,
    /// The device's UDID, in either form: 24 hex digits with or without the hyphen after the
    /// eighth, or the 40-hex-digit legacy form.
    pub udid: String,
    /// The USB descriptor's iSerialNumber string exactly as read (24 hex digits without a
    /// hyphen on modern devices).
    pub usb_serial: String,
}

impl DeviceInfo {
    /// The UDID as clients expect it in `SerialNumber` and `UDID`: see [`display_udid`].
    pub fn serial_number(&self) -> Cow<'_, str> {
        display_udid(&self.udid)
    }

    /// The `Properties` dictionary of an Attached message: usbmuxd's six keys in its order
    /// (ConnectionSpeed, ConnectionType "USB", DeviceID, LocationID, ProductID, SerialNumber),
    /// then Apple's daemon's `UDID` and `USBSerialNumber`.
    fn properties<'a>(&'a self, serial: &'a str) -> Node<'a> {
        Node::Dict(vec![
            ("ConnectionSpeed", Node::Integer(self.speed)),
            ("ConnectionType", Node::String("USB")),
            ("DeviceID", Node::Integer(self.device_id.into())),
            ("LocationID", Node::Integer(self.location_id.into())),
            ("ProductID", Node::Integer(self.product_id.into())),
            ("SerialNumber", Node::String(serial)),
            ("UDID", Node::String(serial)),
            ("USBSerialNumber", Node::String(&self.usb_serial)),
        ])
    }

    /// The Attached dictionary (also a ListDevices entry): MessageType, DeviceID, Properties.
    fn attached<'a>(&'a self, serial: &'a str) -> Node<'a> {
        Node::Dict(vec![
            ("MessageType", Node::String("Attached")),
            ("DeviceID", Node::Integer(self.device_id.into())),
            ("Properties", self.properties(serial)),
        ])
    }
}

/// A UDID the way every tool shows it: a modern 24-hex-digit UDID gets its hyphen after the
/// eighth digit (what libusbmuxd does to Apple's daemon's unhyphenated serials, §10.4, and the
/// form pair records are filed under); anything else is returned unchanged.
pub fn display_udid(udid: &str) -> Cow<'_, str> {
    if udid.len() == 24 && udid.bytes().all(|b| b.is_ascii_hexdigit()) {
        Cow::Owned(format!("{}-{}", &udid[..8], &udid[8..]))
    } else {
        Cow::Borrowed(udid)
    }
}

/// One client in Listen mode, for a ListListeners reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listener<'a> {
    /// The daemon's number of the client connection, used in the entry's `ID String`.
    ///
    /// libimobiledevice's usbmuxd puts the number of the client *asking* into every entry (a
    /// bug); pass the listener's own number to give each entry a distinct id.
    pub number: u32,
    /// The identification keys the listener sent with its Listen request.
    pub client: &'a ClientInfo,
}

/// A message from the daemon to a client: a reply to a request or a notification.
///
/// Replies carry the request's tag; notifications (Attached, Detached, Paired) carry tag 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply<'a> {
    /// `{MessageType: "Result", Number: n}`: the outcome of Listen, Connect, the pair-record
    /// requests and of anything unknown. `n` is a
    /// [`ResultCode`](crate::proto::ResultCode) value or, for pair-record requests, an errno
    /// (2 ENOENT, 22 EINVAL, …).
    Result(u32),
    /// `{MessageType: "Attached", DeviceID, Properties}`: a device became visible.
    Attached(&'a DeviceInfo),
    /// `{MessageType: "Detached", DeviceID}`: a device went away.
    Detached {
        /// The daemon's id of the device.
        device_id: u32,
    },
    /// `{MessageType: "Paired", DeviceID}`: a pair record was saved for a connected device.
    Paired {
        /// The daemon's id of the device.
        device_id: u32,
    },
    /// `{DeviceList: [Attached dictionaries]}` (no MessageType): the ListDevices reply.
    DeviceList(&'a [DeviceInfo]),
    /// `{ListenerList: [{Blacklisted, BundleID?, ConnType, ID String, ProgName,
    /// kLibUSBMuxVersion}]}`: the ListListeners reply. `ProgName` is "unknown" and
    /// `kLibUSBMuxVersion` 0 when the listener did not send them; `BundleID` only appears when
    /// it did.
    ListenerList(&'a [Listener<'a>]),
    /// `{BUID: string}`: the ReadBUID reply.
    Buid(&'a str),
    /// `{PairRecordData: data}`: the ReadPairRecord reply, the record's file bytes.
    PairRecordData(&'a [u8]),
}

impl Reply<'_> {
    /// The reply as an XML body, byte for byte as libimobiledevice's usbmuxd writes it.
    pub fn to_xml(&self) -> Vec<u8> {
        let message = |name: &'static str, device_id: u32| {
            Node::Dict(vec![
                ("MessageType", Node::String(name)),
                ("DeviceID", Node::Integer(device_id.into())),
            ])
        };
        match *self {
            Self::Result(number) => Node::Dict(vec![
                ("MessageType", Node::String("Result")),
                ("Number", Node::Integer(number.into())),
            ])
            .to_xml(),
            Self::Attached(device) => device.attached(&device.serial_number()).to_xml(),
            Self::Detached { device_id } => message("Detached", device_id).to_xml(),
            Self::Paired { device_id } => message("Paired", device_id).to_xml(),
            Self::DeviceList(devices) => {
                let serials: Vec<Cow<'_, str>> =
                    devices.iter().map(DeviceInfo::serial_number).collect();
                let list = devices
                    .iter()
                    .zip(&serials)
                    .map(|(device, serial)| device.attached(serial))
                    .collect();
                Node::Dict(vec![("DeviceList", Node::Array(list))]).to_xml()
            }
            Self::ListenerList(listeners) => {
                let ids: Vec<(String, &str)> = listeners
                    .iter()
                    .map(|l| {
                        let name = l.client.prog_name.as_deref().unwrap_or("unknown");
                        (format!("{}-{name}", l.number), name)
                    })
                    .collect();
                let list = listeners
                    .iter()
                    .zip(&ids)
                    .map(|(listener, (id, name))| {
                        let mut entry = vec![("Blacklisted", Node::Bool(false))];
                        if let Some(bundle) = &listener.client.bundle_id {
                            entry.push(("BundleID", Node::String(bundle)));
                        }
                        entry.extend([
                            ("ConnType", Node::Integer(0)),
                            ("ID String", Node::String(id)),
                            ("ProgName", Node::String(name)),
                            (
                                "kLibUSBMuxVersion",
                                Node::Integer(listener.client.lib_usbmux_version.unwrap_or(0)),
                            ),
                        ]);
                        Node::Dict(entry)
                    })
                    .collect();
                Node::Dict(vec![("ListenerList", Node::Array(list))]).to_xml()
            }
            Self::Buid(buid) => Node::Dict(vec![("BUID", Node::String(buid))]).to_xml(),
            Self::PairRecordData(data) => {
                Node::Dict(vec![("PairRecordData", Node::Data(data))]).to_xml()
            }
        }
    }

    /// The whole message: header (version 1, message type 8, `tag`) and XML body. Fails only if
    /// it would exceed the protocol's 64 KiB message limit (a pair record or device list far
    /// larger than any real one).
    pub fn encode(&self, tag: u32) -> Result<Vec<u8>, ProtoError> {
        encode_message(tag, &self.to_xml())
    }
}

/// The part of the plist data model the daemon sends, in the order it is to be written.
enum Node<'a> {
    Dict(Vec<(&'a str, Node<'a>)>),
    Array(Vec<Node<'a>>),
    String(&'a str),
    /// Every integer usbmuxd sends is unsigned.
    Integer(u64),
    Bool(bool),
    Data(&'a [u8]),
}

/// libplist's XML prologue (declaration, doctype, `<plist>` start tag), one per line.
const PROLOGUE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
<plist version=\"1.0\">\n";

/// What follows the root element.
const EPILOGUE: &str = "</plist>\n";

impl Node<'_> {
    /// The whole document with this node as its root.
    fn to_xml(&self) -> Vec<u8> {
        let mut out = String::from(PROLOGUE);
        self.write(&mut out, 0);
        out.push_str(EPILOGUE);
        out.into_bytes()
    }

    /// Writes this node at nesting `depth` in libplist's layout: `depth` tabs, the element, a
    /// newline; collections open and close on lines of their own with their children one tab
    /// further in; empty collections and empty strings as empty-element tags.
    fn write(&self, out: &mut String, depth: usize) {
        indent(out, depth);
        match self {
            Self::Dict(entries) if entries.is_empty() => out.push_str("<dict/>"),
            Self::Array(items) if items.is_empty() => out.push_str("<array/>"),
            Self::Dict(entries) => {
                out.push_str("<dict>\n");
                for (key, value) in entries {
                    indent(out, depth + 1);
                    text_element(out, "key", key);
                    out.push('\n');
                    value.write(out, depth + 1);
                }
                indent(out, depth);
                out.push_str("</dict>");
            }
            Self::Array(items) => {
                out.push_str("<array>\n");
                for item in items {
                    item.write(out, depth + 1);
                }
                indent(out, depth);
                out.push_str("</array>");
            }
            Self::String(text) => text_element(out, "string", text),
            Self::Integer(n) => {
                out.push_str("<integer>");
                out.push_str(&n.to_string());
                out.push_str("</integer>");
            }
            Self::Bool(true) => out.push_str("<true/>"),
            Self::Bool(false) => out.push_str("<false/>"),
            Self::Data(bytes) => {
                // Base64 in lines of at most 76 columns counting 8 per tab of indentation
                // (which stops growing at 8 tabs), each line a whole number of 3-byte groups.
                out.push_str("<data>\n");
                let tabs = depth.min(8);
                let per_line = (76 - tabs * 8) / 4 * 3;
                for line in bytes.chunks(per_line) {
                    indent(out, tabs);
                    base64(out, line);
                    out.push('\n');
                }
                indent(out, depth);
                out.push_str("</data>");
            }
        }
        out.push('\n');
    }
}

fn indent(out: &mut String, depth: usize) {
    out.extend(std::iter::repeat_n('\t', depth));
}

/// `<tag>text</tag>` with `<`, `>` and `&` escaped (all that libplist escapes), or `<tag/>` for
/// an empty text.
fn text_element(out: &mut String, tag: &str, text: &str) {
    if text.is_empty() {
        out.push('<');
        out.push_str(tag);
        out.push_str("/>");
        return;
    }
    out.push('<');
    out.push_str(tag);
    out.push('>');
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            c => out.push(c),
        }
    }
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
}

/// Standard base64 (RFC 4648 alphabet, `=` padding) of `bytes`, appended to `out`.
fn base64(out: &mut String, bytes: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ResultCode;

    fn s(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    fn int(n: u64) -> Value {
        Value::Integer(n.into())
    }

    fn dict(pairs: &[(&str, Value)]) -> Dictionary {
        let mut d = Dictionary::new();
        for (k, v) in pairs {
            d.insert((*k).to_owned(), v.clone());
        }
        d
    }

    /// A request dictionary with libusbmuxd 2.0.2's identification keys.
    fn request(name: &str, extra: &[(&str, Value)]) -> Dictionary {
        let mut d = dict(&[
            ("ClientVersionString", s("libusbmuxd 2.0.2")),
            ("MessageType", s(name)),
            ("ProgName", s("idevice_id")),
            ("kLibUSBMuxVersion", int(3)),
        ]);
        for (k, v) in extra {
            d.insert((*k).to_owned(), v.clone());
        }
        d
    }

    fn xml(d: &Dictionary) -> Vec<u8> {
        let mut out = Vec::new();
        Value::Dictionary(d.clone())
            .to_writer_xml(&mut out)
            .unwrap();
        out
    }

    fn binary(d: &Dictionary) -> Vec<u8> {
        let mut out = Vec::new();
        Value::Dictionary(d.clone())
            .to_writer_binary(&mut out)
            .unwrap();
        assert!(out.starts_with(b"bplist00"));
        out
    }

    /// Parses `d` as XML and as binary, checks both agree and returns the result.
    fn parse_both(d: &Dictionary) -> Result<PlistRequest, PlistMsgError> {
        let from_xml = PlistRequest::parse(&xml(d));
        assert_eq!(PlistRequest::parse(&binary(d)), from_xml);
        from_xml
    }

    fn libusbmuxd_client() -> ClientInfo {
        ClientInfo {
            bundle_id: None,
            client_version: Some("libusbmuxd 2.0.2".into()),
            prog_name: Some("idevice_id".into()),
            lib_usbmux_version: Some(3),
        }
    }

    fn sample_device() -> DeviceInfo {
        DeviceInfo {
            device_id: 3,
            product_id: 0x12A8,
            location_id: 0x0001_0004,
            speed: 480_000_000,
            udid: "00008030001A2B3C4D5E6F70".into(),
            usb_serial: "00008030001A2B3C4D5E6F70".into(),
        }
    }

    /// Parses an XML reply body back with the `plist` crate.
    fn parse_reply(body: &[u8]) -> Dictionary {
        assert!(body.starts_with(PROLOGUE.as_bytes()), "libplist prologue");
        assert!(body.ends_with(b"</plist>\n"), "libplist epilogue");
        Value::from_reader_xml(body)
            .unwrap()
            .into_dictionary()
            .unwrap()
    }

    fn keys(d: &Dictionary) -> Vec<&str> {
        d.keys().map(String::as_str).collect()
    }

    #[test]
    fn every_request_parses_from_xml_and_binary() {
        let data = b"<?xml version=\"1.0\"?><plist><dict/></plist>".to_vec();
        let cases: Vec<(Dictionary, Request)> = vec![
            (request("Listen", &[]), Request::Listen),
            (
                request(
                    "Connect",
                    &[("DeviceID", int(5)), ("PortNumber", int(5632))],
                ),
                Request::Connect {
                    device_id: 5,
                    port: 22,
                },
            ),
            (request("ListDevices", &[]), Request::ListDevices),
            (request("ListListeners", &[]), Request::ListListeners),
            (request("ReadBUID", &[]), Request::ReadBUID),
            (
                request(
                    "ReadPairRecord",
                    &[("PairRecordID", s("00008030-001A2B3C4D5E6F70"))],
                ),
                Request::ReadPairRecord {
                    id: "00008030-001A2B3C4D5E6F70".into(),
                },
            ),
            (
                request(
                    "SavePairRecord",
                    &[
                        ("PairRecordID", s("00008030-001A2B3C4D5E6F70")),
                        ("PairRecordData", Value::Data(data.clone())),
                        ("DeviceID", int(7)),
                    ],
                ),
                Request::SavePairRecord {
                    id: "00008030-001A2B3C4D5E6F70".into(),
                    data: data.clone(),
                    device_id: Some(7),
                },
            ),
            (
                request(
                    "DeletePairRecord",
                    &[(
                        "PairRecordID",
                        s("0123456789abcdef0123456789abcdef01234567"),
                    )],
                ),
                Request::DeletePairRecord {
                    id: "0123456789abcdef0123456789abcdef01234567".into(),
                },
            ),
            (request("Wibble", &[]), Request::Unknown("Wibble".into())),
        ];
        for (d, expected) in cases {
            let parsed = parse_both(&d).unwrap();
            assert_eq!(parsed.request, expected);
            assert_eq!(parsed.client, libusbmuxd_client());
            assert_eq!(
                parsed.request.message_type(),
                d["MessageType"].as_string().unwrap()
            );
        }
    }

    #[test]
    fn requests_round_trip_through_to_xml() {
        let clients = [
            ClientInfo::default(),
            libusbmuxd_client(),
            ClientInfo {
                bundle_id: Some("com.example.app".into()),
                ..libusbmuxd_client()
            },
        ];
        let requests = [
            Request::Listen,
            Request::Connect {
                device_id: u32::MAX,
                port: 62078,
            },
            Request::ListDevices,
            Request::ListListeners,
            Request::ReadBUID,
            Request::ReadPairRecord { id: "x".into() },
            Request::SavePairRecord {
                id: "y".into(),
                data: (0..=255).collect(),
                device_id: None,
            },
            Request::SavePairRecord {
                id: "y".into(),
                data: vec![],
                device_id: Some(1),
            },
            Request::DeletePairRecord { id: "z".into() },
            Request::Unknown("Other & <more>".into()),
        ];
        for client in &clients {
            for request in &requests {
                let message = PlistRequest {
                    request: request.clone(),
                    client: client.clone(),
                };
                let bytes = message.encode(9).unwrap();
                let (header, body) = Header::split(&bytes).unwrap();
                assert_eq!(header.version, ProtocolVersion::Plist);
                assert_eq!(header.message, MessageType::Plist);
                assert_eq!(header.tag, 9);
                assert_eq!(PlistRequest::parse(body), Ok(message));
            }
        }
        // libusbmuxd's key order, PortNumber swapped on the wire.
        let connect = PlistRequest {
            request: Request::Connect {
                device_id: 1,
                port: 62078,
            },
            client: libusbmuxd_client(),
        };
        let d = parse_reply(&connect.to_xml());
        assert_eq!(
            keys(&d),
            [
                "ClientVersionString",
                "MessageType",
                "ProgName",
                "kLibUSBMuxVersion",
                "DeviceID",
                "PortNumber"
            ]
        );
        assert_eq!(d["PortNumber"], int(32498));
    }

    /// PROTOCOL.md §6.6, byte for byte, behind its header.
    #[test]
    fn connect_vector_6_6() {
        let body = concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" ",
            "\"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n",
            "<plist version=\"1.0\"><dict>\n",
            "<key>ClientVersionString</key><string>my-rust-usbmux 0.1</string>\n",
            "<key>DeviceID</key><integer>1</integer>\n",
            "<key>MessageType</key><string>Connect</string>\n",
            "<key>PortNumber</key><integer>32498</integer>\n",
            "<key>ProgName</key><string>myprog</string>\n",
            "<key>kLibUSBMuxVersion</key><integer>3</integer>\n",
            "</dict></plist>\n",
        )
        .as_bytes();
        let tag = 0x2A;
        let message = encode_message(tag, body).unwrap();
        let len = u32::try_from(16 + body.len()).unwrap();
        let mut header = len.to_le_bytes().to_vec();
        header.extend_from_slice(&[1, 0, 0, 0, 8, 0, 0, 0, 0x2A, 0, 0, 0]);
        assert_eq!(&message[..16], header.as_slice());

        let (header, body) = Header::split(&message).unwrap();
        assert_eq!(header.message, MessageType::Plist);
        let parsed = PlistRequest::parse(body).unwrap();
        assert_eq!(
            parsed.request,
            Request::Connect {
                device_id: 1,
                port: 62078
            }
        );
        assert_eq!(
            parsed.client,
            ClientInfo {
                bundle_id: None,
                client_version: Some("my-rust-usbmux 0.1".into()),
                prog_name: Some("myprog".into()),
                lib_usbmux_version: Some(3),
            }
        );
    }

    #[test]
    fn result_is_byte_exact() {
        let body = Reply::Result(ResultCode::Ok.into()).to_xml();
        let expected = concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" ",
            "\"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n",
            "<plist version=\"1.0\">\n",
            "<dict>\n",
            "\t<key>MessageType</key>\n",
            "\t<string>Result</string>\n",
            "\t<key>Number</key>\n",
            "\t<integer>0</integer>\n",
            "</dict>\n",
            "</plist>\n",
        );
        assert_eq!(String::from_utf8(body).unwrap(), expected);

        let message = Reply::Result(22).encode(5).unwrap();
        let (header, body) = Header::split(&message).unwrap();
        assert_eq!(header.tag, 5);
        assert_eq!(header.version, ProtocolVersion::Plist);
        assert_eq!(header.message, MessageType::Plist);
        assert_eq!(
            parse_reply(body),
            dict(&[("MessageType", s("Result")), ("Number", int(22))])
        );
    }

    #[test]
    fn attached_and_device_list() {
        let device = sample_device();
        let properties = dict(&[
            ("ConnectionSpeed", int(480_000_000)),
            ("ConnectionType", s("USB")),
            ("DeviceID", int(3)),
            ("LocationID", int(0x0001_0004)),
            ("ProductID", int(0x12A8)),
            ("SerialNumber", s("00008030-001A2B3C4D5E6F70")),
            ("UDID", s("00008030-001A2B3C4D5E6F70")),
            ("USBSerialNumber", s("00008030001A2B3C4D5E6F70")),
        ]);
        let attached = dict(&[
            ("MessageType", s("Attached")),
            ("DeviceID", int(3)),
            ("Properties", Value::Dictionary(properties.clone())),
        ]);
        let d = parse_reply(&Reply::Attached(&device).to_xml());
        assert_eq!(d, attached);
        assert_eq!(keys(&d), ["MessageType", "DeviceID", "Properties"]);
        assert_eq!(
            keys(d["Properties"].as_dictionary().unwrap()),
            keys(&properties)
        );

        let mut legacy = sample_device();
        legacy.device_id = 4;
        legacy.udid = "0123456789abcdef0123456789abcdef01234567".into();
        legacy.usb_serial = legacy.udid.clone();
        legacy.speed = 5_000_000_000;
        let d = parse_reply(&Reply::DeviceList(&[device.clone(), legacy]).to_xml());
        assert_eq!(keys(&d), ["DeviceList"]);
        let list = d["DeviceList"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0], Value::Dictionary(attached));
        let second = list[1].as_dictionary().unwrap();
        let props = second["Properties"].as_dictionary().unwrap();
        assert_eq!(
            props["SerialNumber"],
            s("0123456789abcdef0123456789abcdef01234567")
        );
        assert_eq!(props["ConnectionSpeed"], int(5_000_000_000));
        assert_eq!(second["DeviceID"], int(4));

        let empty = Reply::DeviceList(&[]).to_xml();
        assert!(String::from_utf8(empty.clone())
            .unwrap()
            .contains("\t<key>DeviceList</key>\n\t<array/>\n"));
        assert_eq!(parse_reply(&empty)["DeviceList"], Value::Array(vec![]));
    }

    #[test]
    fn notifications() {
        for (reply, name) in [
            (Reply::Detached { device_id: 9 }, "Detached"),
            (Reply::Paired { device_id: 9 }, "Paired"),
        ] {
            let d = parse_reply(&reply.to_xml());
            assert_eq!(d, dict(&[("MessageType", s(name)), ("DeviceID", int(9))]));
            assert_eq!(keys(&d), ["MessageType", "DeviceID"]);
        }
    }

    #[test]
    fn listener_list() {
        let syslog = ClientInfo {
            prog_name: Some("idevicesyslog".into()),
            ..libusbmuxd_client()
        };
        let mac = ClientInfo {
            bundle_id: Some("com.apple.dt.Xcode".into()),
            client_version: Some("usbmuxd-500".into()),
            prog_name: Some("Xcode".into()),
            lib_usbmux_version: Some(3),
        };
        let anonymous = ClientInfo::default();
        let listeners = [
            Listener {
                number: 4,
                client: &syslog,
            },
            Listener {
                number: 7,
                client: &mac,
            },
            Listener {
                number: 8,
                client: &anonymous,
            },
        ];
        let d = parse_reply(&Reply::ListenerList(&listeners).to_xml());
        assert_eq!(keys(&d), ["ListenerList"]);
        let list = d["ListenerList"].as_array().unwrap();
        let entry = |i: usize| list[i].as_dictionary().unwrap().clone();
        assert_eq!(
            entry(0),
            dict(&[
                ("Blacklisted", Value::Boolean(false)),
                ("ConnType", int(0)),
                ("ID String", s("4-idevicesyslog")),
                ("ProgName", s("idevicesyslog")),
                ("kLibUSBMuxVersion", int(3)),
            ])
        );
        assert_eq!(
            keys(&entry(1)),
            [
                "Blacklisted",
                "BundleID",
                "ConnType",
                "ID String",
                "ProgName",
                "kLibUSBMuxVersion"
            ]
        );
        assert_eq!(entry(1)["BundleID"], s("com.apple.dt.Xcode"));
        assert_eq!(entry(1)["ID String"], s("7-Xcode"));
        assert_eq!(
            entry(2),
            dict(&[
                ("Blacklisted", Value::Boolean(false)),
                ("ConnType", int(0)),
                ("ID String", s("8-unknown")),
                ("ProgName", s("unknown")),
                ("kLibUSBMuxVersion", int(0)),
            ])
        );
        assert_eq!(
            parse_reply(&Reply::ListenerList(&[]).to_xml())["ListenerList"],
            Value::Array(vec![])
        );
    }

    #[test]
    fn buid_and_pair_record_data() {
        let buid = "8A9B1C2D-3E4F-5061-7283-94A5B6C7D8E9";
        let d = parse_reply(&Reply::Buid(buid).to_xml());
        assert_eq!(d, dict(&[("BUID", s(buid))]));

        for len in [0usize, 1, 2, 3, 50, 51, 52, 102, 1000, 40 * 1024] {
            let record: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let body = Reply::PairRecordData(&record).to_xml();
            let d = parse_reply(&body);
            assert_eq!(d, dict(&[("PairRecordData", Value::Data(record.clone()))]));
            // libplist's data layout: 51 bytes (68 base64 characters) per line, one tab in.
            let text = String::from_utf8(body).unwrap();
            let start = text.find("<data>\n").unwrap() + 7;
            let end = text.find("\t</data>\n").unwrap();
            let lines: Vec<&str> = text[start..end].lines().collect();
            assert_eq!(lines.len(), len.div_ceil(51));
            assert!(lines.iter().all(|l| l.starts_with('\t') && l.len() <= 69));
            if len > 51 {
                assert_eq!(lines[0].len(), 69);
            }
        }
        // The largest pair record the store accepts still fits in one message.
        let largest = vec![0xA5; crate::pair::MAX_RECORD_LEN];
        assert!(Reply::PairRecordData(&largest).encode(1).is_ok());
        let too_large = vec![0xA5; MAX_BODY_LEN];
        assert!(matches!(
            Reply::PairRecordData(&too_large).encode(1),
            Err(ProtoError::LengthTooLarge { .. })
        ));
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = String::new();
            base64(&mut out, input.as_bytes());
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn strings_are_escaped_like_libplist() {
        let body = Reply::Buid("a<b>&c\"d'").to_xml();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.contains("<string>a&lt;b&gt;&amp;c\"d'</string>"));
        assert_eq!(parse_reply(&body)["BUID"], s("a<b>&c\"d'"));
        let empty = String::from_utf8(Reply::Buid("").to_xml()).unwrap();
        assert!(empty.contains("\t<string/>\n"));
    }

    #[test]
    fn display_udid_forms() {
        assert_eq!(
            display_udid("00008030001A2B3C4D5E6F70"),
            "00008030-001A2B3C4D5E6F70"
        );
        assert_eq!(
            display_udid("00008030-001A2B3C4D5E6F70"),
            "00008030-001A2B3C4D5E6F70"
        );
        let legacy = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(display_udid(legacy), legacy);
        assert_eq!(
            display_udid("not-a-udid-of-24-chars!!"),
            "not-a-udid-of-24-chars!!"
        );
    }

    #[test]
    fn missing_and_bad_fields_are_typed() {
        let connect = |extra: &[(&str, Value)]| parse_both(&request("Connect", extra));
        let missing = |message, key| PlistMsgError::MissingField { message, key };
        let err = connect(&[("PortNumber", int(32498))]).unwrap_err();
        assert_eq!(err, missing("Connect", "DeviceID"));
        assert_eq!(err.reply_number(), Some(2));
        let err = connect(&[("DeviceID", int(1))]).unwrap_err();
        assert_eq!(err, missing("Connect", "PortNumber"));
        assert_eq!(err.reply_number(), Some(1));
        for bad in [
            s("1"),
            Value::Integer((-1i64).into()),
            int(1 << 32),
            Value::Boolean(true),
        ] {
            let err = connect(&[("DeviceID", bad), ("PortNumber", int(1))]).unwrap_err();
            assert!(matches!(
                err,
                PlistMsgError::BadField {
                    key: "DeviceID",
                    ..
                }
            ));
            assert_eq!(err.reply_number(), Some(2));
        }
        for bad in [s("62078"), int(65536), Value::Integer((-5i64).into())] {
            let err = connect(&[("DeviceID", int(1)), ("PortNumber", bad)]).unwrap_err();
            assert!(matches!(
                err,
                PlistMsgError::BadField {
                    key: "PortNumber",
                    ..
                }
            ));
            assert_eq!(err.reply_number(), Some(1));
        }
        assert_eq!(
            connect(&[("DeviceID", int(0)), ("PortNumber", int(0))]).map(|r| r.request),
            Ok(Request::Connect {
                device_id: 0,
                port: 0
            })
        );

        for name in ["ReadPairRecord", "SavePairRecord", "DeletePairRecord"] {
            let err = parse_both(&request(name, &[])).unwrap_err();
            assert!(matches!(
                err,
                PlistMsgError::MissingField {
                    key: "PairRecordID",
                    ..
                }
            ));
            assert_eq!(err.reply_number(), Some(22));
            let err =
                parse_both(&request(name, &[("PairRecordID", Value::Data(vec![1]))])).unwrap_err();
            assert!(matches!(
                err,
                PlistMsgError::BadField {
                    key: "PairRecordID",
                    ..
                }
            ));
            assert_eq!(err.reply_number(), Some(22));
        }
        let save = |extra: &[(&str, Value)]| {
            let mut all = vec![("PairRecordID", s("00008030-001A2B3C4D5E6F70"))];
            all.extend_from_slice(extra);
            parse_both(&request("SavePairRecord", &all))
        };
        let err = save(&[]).unwrap_err();
        assert_eq!(err, missing("SavePairRecord", "PairRecordData"));
        assert_eq!(err.reply_number(), Some(22));
        let err = save(&[("PairRecordData", s("not data"))]).unwrap_err();
        assert!(matches!(
            err,
            PlistMsgError::BadField {
                key: "PairRecordData",
                ..
            }
        ));
        // An unusable DeviceID is ignored, as usbmuxd does.
        for ignored in [s("7"), int(0), int(1 << 33), Value::Integer((-1i64).into())] {
            let parsed = save(&[
                ("PairRecordData", Value::Data(vec![])),
                ("DeviceID", ignored),
            ]);
            assert!(matches!(
                parsed.unwrap().request,
                Request::SavePairRecord {
                    device_id: None,
                    ..
                }
            ));
        }
    }

    #[test]
    fn client_fields_of_the_wrong_type_are_ignored() {
        let d = dict(&[
            ("MessageType", s("ListDevices")),
            ("ProgName", int(1)),
            ("ClientVersionString", Value::Boolean(true)),
            ("BundleID", Value::Array(vec![])),
            ("kLibUSBMuxVersion", s("3")),
        ]);
        let parsed = parse_both(&d).unwrap();
        assert_eq!(parsed.request, Request::ListDevices);
        assert_eq!(parsed.client, ClientInfo::default());
    }

    #[test]
    fn not_a_request() {
        let no_type = dict(&[("ProgName", s("x"))]);
        assert_eq!(parse_both(&no_type), Err(PlistMsgError::MissingMessageType));
        let wrong_type = dict(&[("MessageType", int(3))]);
        assert_eq!(
            parse_both(&wrong_type),
            Err(PlistMsgError::MissingMessageType)
        );
        assert_eq!(PlistMsgError::MissingMessageType.reply_number(), None);

        for root in [
            Value::Array(vec![s("Listen")]),
            s("Listen"),
            int(3),
            Value::Data(vec![1, 2]),
        ] {
            let mut body = Vec::new();
            root.to_writer_xml(&mut body).unwrap();
            assert_eq!(PlistRequest::parse(&body), Err(PlistMsgError::NotADict));
            let mut body = Vec::new();
            root.to_writer_binary(&mut body).unwrap();
            assert_eq!(PlistRequest::parse(&body), Err(PlistMsgError::NotADict));
        }
        for garbage in [
            &b""[..],
            b"\0\0\0",
            b"hello",
            b"<plist><dict><key>MessageType</key>",
            b"{ MessageType = Listen; }",
            b"bplist00",
        ] {
            let err = PlistRequest::parse(garbage).unwrap_err();
            assert!(
                matches!(err, PlistMsgError::Guard(_)),
                "{garbage:?}: {err:?}"
            );
            assert_eq!(err.reply_number(), None);
        }
    }

    #[test]
    fn trailing_nuls_are_tolerated() {
        let mut body = xml(&request("ReadBUID", &[]));
        body.extend_from_slice(&[0, 0]);
        assert_eq!(
            PlistRequest::parse(&body).map(|r| r.request),
            Ok(Request::ReadBUID)
        );
    }

    #[test]
    fn hostile_bodies_are_refused_without_overflow() {
        let nested = |n: usize| {
            let mut x = String::from(
                "<plist><dict><key>MessageType</key><string>Listen</string><key>X</key>",
            );
            x.push_str(&"<array>".repeat(n));
            x.push_str(&"</array>".repeat(n));
            x.push_str("</dict></plist>");
            x.into_bytes()
        };
        // 100 000 levels: larger than any message, refused by size.
        let err = PlistRequest::parse(&nested(100_000)).unwrap_err();
        assert!(matches!(
            err,
            PlistMsgError::Guard(GuardError::TooLarge {
                max: MAX_BODY_LEN,
                ..
            })
        ));
        // As deep as fits in a message: refused by the collection count.
        assert_eq!(
            PlistRequest::parse(&nested(4000)),
            Err(PlistMsgError::Guard(GuardError::TooManyCollections {
                max: 256
            }))
        );
        // Few collections but too deep.
        assert_eq!(
            PlistRequest::parse(&nested(40)),
            Err(PlistMsgError::Guard(GuardError::TooDeep {
                depth: 41,
                max: 32
            }))
        );
        // Deep but within the limits: accepted, the extra key ignored.
        assert_eq!(
            PlistRequest::parse(&nested(31)).map(|r| r.request),
            Ok(Request::Listen)
        );
        // Huge.
        let mut huge = xml(&request("ListDevices", &[]));
        huge.extend(std::iter::repeat_n(b' ', MAX_BODY_LEN));
        assert!(matches!(
            PlistRequest::parse(&huge),
            Err(PlistMsgError::Guard(GuardError::TooLarge { .. }))
        ));
        // A binary plist sharing one collection between two parents.
        let shared: Vec<u8> = [
            &b"bplist00"[..],
            &[0xA2, 1, 1, 0xA0],
            &[8, 11],
            &[0, 0, 0, 0, 0, 0, 1, 1],
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[0; 8],
            &[0, 0, 0, 0, 0, 0, 0, 12],
        ]
        .concat();
        assert_eq!(
            PlistRequest::parse(&shared),
            Err(PlistMsgError::Guard(GuardError::SharedCollection))
        );
    }

    #[test]
    fn no_panic_on_mutated_requests() {
        let seeds: Vec<Vec<u8>> = [
            request(
                "Connect",
                &[("DeviceID", int(1)), ("PortNumber", int(32498))],
            ),
            request(
                "SavePairRecord",
                &[
                    ("PairRecordID", s("00008030-001A2B3C4D5E6F70")),
                    ("PairRecordData", Value::Data(vec![1, 2, 3])),
                ],
            ),
        ]
        .iter()
        .flat_map(|d| [xml(d), binary(d)])
        .collect();
        let mut state = 0x0123_4567_89AB_CDEFu64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for _ in 0..10_000 {
            let seed = &seeds[(next() % seeds.len() as u64) as usize];
            let mut bytes = seed.clone();
            for _ in 0..=next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            bytes.truncate((next() % (bytes.len() as u64 + 1)) as usize);
            if let Err(err) = PlistRequest::parse(&bytes) {
                let _ = err.reply_number();
                let _ = err.to_string();
            }
        }
    }
}
