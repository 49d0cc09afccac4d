//! The usbmuxd client protocol: the 16-byte message header and the binary (version 0) bodies.
//!
//! This is the protocol spoken on the daemon's socket (`/var/run/usbmuxd`, or TCP
//! `127.0.0.1:27015`) between usbmuxd and its clients (iproxy, libimobiledevice tools, our
//! client library). See `shared/PROTOCOL.md` §3.
//!
//! Every message starts with a [`Header`]: four little-endian `u32`s — total length (header
//! included), protocol version, message type and a tag that replies echo. The body that follows is
//! either binary (header version 0: [`BinaryMessage`]) or an XML property list (message type
//! [`MessageType::Plist`]; handled elsewhere).
//!
//! Everything here is pure: parsers take arbitrary bytes and return a [`ProtoError`] on anything
//! they cannot accept, emitters write into a caller's buffer. Nothing panics on any input.
//!
//! ```
//! use usbmux_host::proto::{BinaryMessage, ConnectRequest, Header, MessageType};
//!
//! // A binary CONNECT to port 22 of device 1, tag 1 (PROTOCOL.md §6.1).
//! let connect = BinaryMessage::Connect(ConnectRequest { device_id: 1, port: 22 });
//! let mut buf = [0u8; 64];
//! let n = connect.emit(1, &mut buf)?;
//! assert_eq!(n, 24);
//!
//! let (header, body) = Header::split(&buf[..n])?;
//! assert_eq!(header.message, MessageType::Connect);
//! assert_eq!(BinaryMessage::parse_body(header.message, body)?, connect);
//! # Ok::<(), usbmux_host::proto::ProtoError>(())
//! ```

use thiserror::Error;

/// Size of the client-protocol header in bytes.
pub const HEADER_LEN: usize = 16;

/// Largest total message length (header included) a peer may announce.
///
/// usbmuxd reads each client's messages into a fixed 65 536-byte buffer (its `CMD_BUF_SIZE`) and
/// closes the connection of a client whose header announces more, so neither side of this
/// implementation sends or accepts anything longer.
pub const MAX_MESSAGE_LEN: u32 = 65_536;

/// Largest body (message minus header) that fits in [`MAX_MESSAGE_LEN`].
pub const MAX_BODY_LEN: usize = MAX_MESSAGE_LEN as usize - HEADER_LEN;

/// Why bytes could not be parsed as, or a value could not be emitted as, a client-protocol message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The input ends before the structure being parsed does.
    #[error("input truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the structure needs.
        needed: usize,
        /// Bytes the input has.
        available: usize,
    },
    /// The header's length field is smaller than the header itself.
    #[error("message length {len} is smaller than the 16-byte header")]
    LengthTooSmall {
        /// The announced total length.
        len: u32,
    },
    /// The header's length field exceeds [`MAX_MESSAGE_LEN`].
    #[error("message length {len} exceeds the maximum of {max}")]
    LengthTooLarge {
        /// The announced (or, when emitting, required) total length.
        len: u32,
        /// The limit, [`MAX_MESSAGE_LEN`].
        max: u32,
    },
    /// A fixed-size binary body has more bytes than its layout.
    #[error("{message:?} body must be {expected} bytes, got {actual}")]
    TrailingBytes {
        /// The message whose body it is.
        message: MessageType,
        /// The layout's size.
        expected: usize,
        /// The body's size.
        actual: usize,
    },
    /// The message type has no binary (version 0) body: plist messages and unknown types.
    #[error("message type {message:?} has no binary form")]
    NotBinary {
        /// The message type found.
        message: MessageType,
    },
    /// A device record's serial number does not fit its 256-byte, NUL-terminated field.
    #[error("serial number of {len} bytes does not fit (at most {max})", max = DeviceRecord::MAX_SERIAL_LEN)]
    SerialTooLong {
        /// Length of the serial number in bytes.
        len: usize,
    },
    /// A device record's serial number contains a NUL or a non-ASCII byte.
    #[error("serial number contains a NUL or non-ASCII byte")]
    InvalidSerial,
    /// A received device record's serial field has no NUL terminator in its 256 bytes.
    #[error("serial number field is not NUL-terminated")]
    UnterminatedSerial,
    /// The output buffer is too small for what is being emitted.
    #[error("output buffer too small: {needed} bytes needed, {available} available")]
    BufferTooSmall {
        /// Bytes the emitted structure needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
}

/// Declares a `u32` wire enum with named values, an `Unknown(u32)` catch-all and `From` both ways.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        ///
        /// Conversion from `u32` is total: values without a name become `Unknown`, so every value
        /// survives a round trip. Construct `Unknown` only for values without a name: an
        /// `Unknown` holding a named value encodes to the same bytes but compares unequal.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this crate has no name for, kept as received.
            Unknown(u32),
        }

        impl From<u32> for $name {
            fn from(value: u32) -> Self {
                match value {
                    $( $value => Self::$variant, )+
                    other => Self::Unknown(other),
                }
            }
        }

        impl From<$name> for u32 {
            fn from(value: $name) -> u32 {
                match value {
                    $( $name::$variant => $value, )+
                    $name::Unknown(other) => other,
                }
            }
        }
    };
}

wire_enum! {
    /// The header's message field: what the body is.
    pub enum MessageType {
        /// Daemon → client: the result of a request (binary body: a `u32` [`ResultCode`]).
        Result = 1,
        /// Client → daemon: open a connection to a device port (binary body: [`ConnectRequest`]).
        Connect = 2,
        /// Client → daemon: subscribe to device events (no body).
        Listen = 3,
        /// Daemon → client: a device appeared (binary body: [`DeviceRecord`]).
        DeviceAdd = 4,
        /// Daemon → client: a device went away (binary body: `u32` device id).
        DeviceRemove = 5,
        /// Daemon → client: a device was paired (binary body: `u32` device id).
        DevicePaired = 6,
        /// Both ways: the body is an XML property list.
        Plist = 8,
    }
}

wire_enum! {
    /// The header's version field: which protocol the sender speaks.
    ///
    /// The daemon replies in the protocol of the request, but dispatches on the message type, not
    /// on this field (some daemons send plist replies with version 0, PROTOCOL.md §5.18). A
    /// daemon answers a request with an unknown version with [`ResultCode::BadVersion`].
    pub enum ProtocolVersion {
        /// Version 0: binary bodies; only Listen and Connect requests exist.
        Binary = 0,
        /// Version 1: property-list bodies (message type [`MessageType::Plist`]).
        Plist = 1,
    }
}

wire_enum! {
    /// The `u32` carried by a RESULT message (binary) or a plist Result's `Number`.
    ///
    /// The pair-record requests also answer with errno values (ENOENT = 2, EINVAL = 22, …) in
    /// the same field; 2 then reads as [`ResultCode::BadDevice`], 22 as `Unknown(22)`. Code 4 is
    /// undefined in usbmuxd; some clients call it "no such service". Treat unknown codes as
    /// generic errors.
    pub enum ResultCode {
        /// The request succeeded.
        Ok = 0,
        /// Unknown or malformed request, or a request in the wrong state (e.g. after Listen).
        BadCommand = 1,
        /// No device with that id (also: a Connect without DeviceID).
        BadDevice = 2,
        /// The device refused the connection (nothing listens on that port).
        ConnectionRefused = 3,
        /// The header's protocol version is not one the daemon speaks.
        BadVersion = 6,
    }
}

impl ResultCode {
    /// Whether this is [`ResultCode::Ok`].
    pub fn is_ok(self) -> bool {
        self == Self::Ok
    }
}

/// The 16-byte header in front of every client-protocol message (all fields `u32` little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Total message length in bytes, this header included: `16 ..= MAX_MESSAGE_LEN`.
    pub length: u32,
    /// Protocol of the sender.
    pub version: ProtocolVersion,
    /// What the body is.
    pub message: MessageType,
    /// Chosen by the client; a reply echoes its request's tag; notifications carry tag 0.
    pub tag: u32,
}

impl Header {
    /// Size of the header in bytes (same as [`HEADER_LEN`]).
    pub const LEN: usize = HEADER_LEN;

    /// A header for a body of `body_len` bytes.
    ///
    /// Fails with [`ProtoError::LengthTooLarge`] if the message would exceed [`MAX_MESSAGE_LEN`].
    pub fn new(
        version: ProtocolVersion,
        message: MessageType,
        tag: u32,
        body_len: usize,
    ) -> Result<Self, ProtoError> {
        let total = body_len.saturating_add(HEADER_LEN);
        let length = u32::try_from(total).unwrap_or(u32::MAX);
        let header = Self {
            length,
            version,
            message,
            tag,
        };
        header.check_length()?;
        Ok(header)
    }

    /// Parses the header at the start of `buf` (bytes after the first 16 are not looked at).
    ///
    /// The length field must lie in `16 ..= MAX_MESSAGE_LEN`; version and message type may be
    /// any value (unknown ones become `Unknown`, so a daemon can still answer with the tag).
    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let bytes: &[u8; HEADER_LEN] = buf.first_chunk().ok_or(ProtoError::Truncated {
            needed: HEADER_LEN,
            available: buf.len(),
        })?;
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let header = Self {
            length: word(0),
            version: word(4).into(),
            message: word(8).into(),
            tag: word(12),
        };
        header.check_length()?;
        Ok(header)
    }

    /// Parses a whole message at the start of `buf`: its header and its body of exactly
    /// [`body_len`](Self::body_len) bytes. Bytes after the message are not looked at; the
    /// message occupies `header.length` bytes of `buf`.
    pub fn split(buf: &[u8]) -> Result<(Self, &[u8]), ProtoError> {
        let header = Self::parse(buf)?;
        let total = header.total_len();
        let body = buf.get(HEADER_LEN..total).ok_or(ProtoError::Truncated {
            needed: total,
            available: buf.len(),
        })?;
        Ok((header, body))
    }

    /// Checks that the length field lies in `16 ..= MAX_MESSAGE_LEN`.
    pub fn check_length(&self) -> Result<(), ProtoError> {
        if (self.length as usize) < HEADER_LEN {
            Err(ProtoError::LengthTooSmall { len: self.length })
        } else if self.length > MAX_MESSAGE_LEN {
            Err(ProtoError::LengthTooLarge {
                len: self.length,
                max: MAX_MESSAGE_LEN,
            })
        } else {
            Ok(())
        }
    }

    /// Total message length in bytes (the length field).
    pub fn total_len(&self) -> usize {
        self.length as usize
    }

    /// Body length in bytes: the length field minus the header (0 if the field is too small).
    pub fn body_len(&self) -> usize {
        self.total_len().saturating_sub(HEADER_LEN)
    }

    /// Writes the header into the first 16 bytes of `buf` and returns 16.
    ///
    /// Fails, writing nothing, if the length field is out of range (so whatever is emitted
    /// parses again) or `buf` is shorter than 16 bytes.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, ProtoError> {
        self.check_length()?;
        let out = out_slice(buf, HEADER_LEN)?;
        let words = [
            self.length,
            self.version.into(),
            self.message.into(),
            self.tag,
        ];
        for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        Ok(HEADER_LEN)
    }

    /// The header as its 16 wire bytes; fails like [`emit`](Self::emit) on a bad length.
    pub fn to_bytes(&self) -> Result<[u8; HEADER_LEN], ProtoError> {
        let mut bytes = [0u8; HEADER_LEN];
        self.emit(&mut bytes)?;
        Ok(bytes)
    }
}

/// Body of a binary CONNECT request: open a connection to `port` on device `device_id`.
///
/// Layout (8 bytes): device id `u32` little-endian, port `u16` **big-endian** (network order,
/// unlike everything around it), 2 reserved bytes (sent as 0, ignored on receipt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectRequest {
    /// The daemon's id of the device (from DEVICE_ADD / Attached).
    pub device_id: u32,
    /// The TCP port on the device, as a plain number (e.g. 62078 for lockdownd).
    pub port: u16,
}

impl ConnectRequest {
    /// Size of the body in bytes.
    pub const LEN: usize = 8;

    /// Parses a body of exactly [`LEN`](Self::LEN) bytes.
    pub fn parse(body: &[u8]) -> Result<Self, ProtoError> {
        let b: &[u8; Self::LEN] = exact(MessageType::Connect, body)?;
        Ok(Self {
            device_id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            port: u16::from_be_bytes([b[4], b[5]]),
        })
    }

    /// Writes the body into the start of `buf`; returns the number of bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, ProtoError> {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.device_id.to_le_bytes());
        b[4..6].copy_from_slice(&self.port.to_be_bytes());
        put(buf, &b)
    }
}

/// Body of a binary DEVICE_ADD message: the daemon's record of an attached device.
///
/// Layout (268 bytes, packed): device id `u32` LE, product id `u16` LE, serial number (UDID) in a
/// 256-byte NUL-terminated, NUL-padded ASCII field, 2 bytes of padding, location `u32` LE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceRecord {
    /// The daemon's id of the device; ids are not reused while the daemon runs.
    pub device_id: u32,
    /// USB product id (e.g. 0x12A8).
    pub product_id: u16,
    /// The device's serial number (UDID): ASCII, at most [`MAX_SERIAL_LEN`](Self::MAX_SERIAL_LEN)
    /// bytes, no NUL.
    pub serial: String,
    /// USB location: `(bus << 16) | address`.
    pub location: u32,
}

impl DeviceRecord {
    /// Size of the body in bytes.
    pub const LEN: usize = 268;
    /// Size of the serial-number field in bytes.
    pub const SERIAL_FIELD_LEN: usize = 256;
    /// Longest serial number that fits, leaving room for the terminating NUL.
    pub const MAX_SERIAL_LEN: usize = Self::SERIAL_FIELD_LEN - 1;

    const SERIAL_AT: usize = 6;
    const LOCATION_AT: usize = 264;

    /// Parses a body of exactly [`LEN`](Self::LEN) bytes.
    ///
    /// The serial number ends at the first NUL of its field (bytes after it are ignored) and must
    /// be ASCII; a field without a NUL is [`ProtoError::UnterminatedSerial`]. The padding is
    /// ignored.
    pub fn parse(body: &[u8]) -> Result<Self, ProtoError> {
        let b: &[u8; Self::LEN] = exact(MessageType::DeviceAdd, body)?;
        let field = &b[Self::SERIAL_AT..Self::SERIAL_AT + Self::SERIAL_FIELD_LEN];
        let end = field
            .iter()
            .position(|&c| c == 0)
            .ok_or(ProtoError::UnterminatedSerial)?;
        let serial = &field[..end];
        if !serial.is_ascii() {
            return Err(ProtoError::InvalidSerial);
        }
        let serial = String::from_utf8(serial.to_vec()).map_err(|_| ProtoError::InvalidSerial)?;
        let l = Self::LOCATION_AT;
        Ok(Self {
            device_id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            product_id: u16::from_le_bytes([b[4], b[5]]),
            serial,
            location: u32::from_le_bytes([b[l], b[l + 1], b[l + 2], b[l + 3]]),
        })
    }

    /// Checks that the serial number fits its field: at most 255 ASCII bytes, no NUL.
    pub fn check_serial(&self) -> Result<(), ProtoError> {
        let serial = self.serial.as_bytes();
        if serial.len() > Self::MAX_SERIAL_LEN {
            Err(ProtoError::SerialTooLong { len: serial.len() })
        } else if serial.iter().any(|&c| c == 0 || !c.is_ascii()) {
            Err(ProtoError::InvalidSerial)
        } else {
            Ok(())
        }
    }

    /// Writes the body into the start of `buf`; returns the number of bytes written.
    ///
    /// Fails, writing nothing, if the serial number does not fit (see
    /// [`check_serial`](Self::check_serial)) or `buf` is too small.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, ProtoError> {
        self.check_serial()?;
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.device_id.to_le_bytes());
        b[4..6].copy_from_slice(&self.product_id.to_le_bytes());
        let serial = self.serial.as_bytes();
        b[Self::SERIAL_AT..Self::SERIAL_AT + serial.len()].copy_from_slice(serial);
        b[Self::LOCATION_AT..].copy_from_slice(&self.location.to_le_bytes());
        put(buf, &b)
    }
}

/// A message of the binary protocol (header version 0), decoded.
///
/// The binary protocol has only two requests, Listen and Connect; everything else a client can
/// ask exists only as a plist message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BinaryMessage {
    /// RESULT: the answer to a request.
    Result(ResultCode),
    /// CONNECT request.
    Connect(ConnectRequest),
    /// LISTEN request (empty body).
    Listen,
    /// DEVICE_ADD notification.
    DeviceAdd(DeviceRecord),
    /// DEVICE_REMOVE notification.
    DeviceRemove {
        /// Id of the device that went away.
        device_id: u32,
    },
    /// DEVICE_PAIRED notification.
    DevicePaired {
        /// Id of the device that was paired.
        device_id: u32,
    },
}

impl BinaryMessage {
    /// The header's message type for this message.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Result(_) => MessageType::Result,
            Self::Connect(_) => MessageType::Connect,
            Self::Listen => MessageType::Listen,
            Self::DeviceAdd(_) => MessageType::DeviceAdd,
            Self::DeviceRemove { .. } => MessageType::DeviceRemove,
            Self::DevicePaired { .. } => MessageType::DevicePaired,
        }
    }

    /// Body length in bytes.
    pub fn body_len(&self) -> usize {
        match self {
            Self::Result(_) | Self::DeviceRemove { .. } | Self::DevicePaired { .. } => 4,
            Self::Connect(_) => ConnectRequest::LEN,
            Self::Listen => 0,
            Self::DeviceAdd(_) => DeviceRecord::LEN,
        }
    }

    /// Total message length in bytes, header included.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// Parses the body of a message of type `message`; the body must have exactly the layout's
    /// size. Plist and unknown message types are [`ProtoError::NotBinary`].
    pub fn parse_body(message: MessageType, body: &[u8]) -> Result<Self, ProtoError> {
        Ok(match message {
            MessageType::Result => Self::Result(parse_u32(message, body)?.into()),
            MessageType::Connect => Self::Connect(ConnectRequest::parse(body)?),
            MessageType::Listen => {
                exact::<0>(message, body)?;
                Self::Listen
            }
            MessageType::DeviceAdd => Self::DeviceAdd(DeviceRecord::parse(body)?),
            MessageType::DeviceRemove => Self::DeviceRemove {
                device_id: parse_u32(message, body)?,
            },
            MessageType::DevicePaired => Self::DevicePaired {
                device_id: parse_u32(message, body)?,
            },
            MessageType::Plist | MessageType::Unknown(_) => {
                return Err(ProtoError::NotBinary { message })
            }
        })
    }

    /// Parses a whole message at the start of `buf` (see [`Header::split`]) and its body.
    ///
    /// The header's version field is not checked: dispatch is on the message type.
    pub fn parse(buf: &[u8]) -> Result<(Header, Self), ProtoError> {
        let (header, body) = Header::split(buf)?;
        Ok((header, Self::parse_body(header.message, body)?))
    }

    /// Writes the body into the start of `buf`; returns the number of bytes written.
    pub fn emit_body(&self, buf: &mut [u8]) -> Result<usize, ProtoError> {
        match self {
            Self::Result(code) => put(buf, &u32::from(*code).to_le_bytes()),
            Self::Connect(request) => request.emit(buf),
            Self::Listen => Ok(0),
            Self::DeviceAdd(record) => record.emit(buf),
            Self::DeviceRemove { device_id } | Self::DevicePaired { device_id } => {
                put(buf, &device_id.to_le_bytes())
            }
        }
    }

    /// The header of this message with the given tag (version [`ProtocolVersion::Binary`]).
    pub fn header(&self, tag: u32) -> Header {
        Header {
            // At most 16 + 268 bytes: always fits.
            length: self.total_len() as u32,
            version: ProtocolVersion::Binary,
            message: self.message_type(),
            tag,
        }
    }

    /// Writes the whole message (header version 0, then body) into the start of `buf`; returns
    /// the number of bytes written. Fails, writing nothing, if `buf` is too small or a device
    /// record's serial does not fit.
    pub fn emit(&self, tag: u32, buf: &mut [u8]) -> Result<usize, ProtoError> {
        if let Self::DeviceAdd(record) = self {
            record.check_serial()?;
        }
        let out = out_slice(buf, self.total_len())?;
        let (head, body) = out.split_at_mut(HEADER_LEN);
        self.header(tag).emit(head)?;
        Ok(HEADER_LEN + self.emit_body(body)?)
    }

    /// The whole message as a new vector; fails like [`emit`](Self::emit).
    pub fn to_vec(&self, tag: u32) -> Result<Vec<u8>, ProtoError> {
        let mut out = vec![0u8; self.total_len()];
        self.emit(tag, &mut out)?;
        Ok(out)
    }
}

/// The value of a plist Connect's `PortNumber` for TCP port `port` — and back.
///
/// Clients put the port into `PortNumber` in network byte order and read that as a
/// little-endian integer (what `htons(port)` gives on every common CPU), and the daemon undoes it
/// with `ntohs`. On the wire the integer is therefore the port with its two bytes swapped:
/// port 62078 (0xF27E, lockdownd) is sent as 32498 (0x7EF2), port 22 as 5632. Every known client
/// and daemon does this whatever the CPU, so this function swaps unconditionally. Swapping is its
/// own inverse: the daemon uses the same function to get the port back (PROTOCOL.md §3.4).
pub fn plist_port(port: u16) -> u16 {
    port.swap_bytes()
}

/// The first `N` bytes of `body`, which must be exactly `N` long.
fn exact<const N: usize>(message: MessageType, body: &[u8]) -> Result<&[u8; N], ProtoError> {
    match body.first_chunk::<N>() {
        None => Err(ProtoError::Truncated {
            needed: N,
            available: body.len(),
        }),
        Some(_) if body.len() > N => Err(ProtoError::TrailingBytes {
            message,
            expected: N,
            actual: body.len(),
        }),
        Some(bytes) => Ok(bytes),
    }
}

/// A body that is one little-endian `u32`.
fn parse_u32(message: MessageType, body: &[u8]) -> Result<u32, ProtoError> {
    exact::<4>(message, body).map(|b| u32::from_le_bytes(*b))
}

/// The first `len` bytes of `buf`, or [`ProtoError::BufferTooSmall`].
fn out_slice(buf: &mut [u8], len: usize) -> Result<&mut [u8], ProtoError> {
    let available = buf.len();
    buf.get_mut(..len).ok_or(ProtoError::BufferTooSmall {
        needed: len,
        available,
    })
}

/// Copies `bytes` to the start of `buf`; returns their length.
fn put(buf: &mut [u8], bytes: &[u8]) -> Result<usize, ProtoError> {
    out_slice(buf, bytes.len())?.copy_from_slice(bytes);
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// PROTOCOL.md §6.1: binary CONNECT, device 1, port 22, tag 1, version 0.
    const CONNECT_6_1: [u8; 24] = [
        0x18, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0x01, 0, 0, 0, // header
        0x01, 0, 0, 0, 0x00, 0x16, 0, 0, // device 1, port 22 BE, reserved
    ];

    /// PROTOCOL.md §6.2: binary RESULT OK, tag 1.
    const RESULT_6_2: [u8; 20] = [
        0x14, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0x01, 0, 0, 0, // header
        0, 0, 0, 0, // result 0
    ];

    fn sample_record() -> DeviceRecord {
        DeviceRecord {
            device_id: 7,
            product_id: 0x12A8,
            serial: "00008030-001A2B3C4D5E6F70".to_owned(),
            location: (3 << 16) | 12,
        }
    }

    fn all_messages() -> Vec<BinaryMessage> {
        vec![
            BinaryMessage::Result(ResultCode::Ok),
            BinaryMessage::Result(ResultCode::BadVersion),
            BinaryMessage::Result(ResultCode::Unknown(22)),
            BinaryMessage::Connect(ConnectRequest {
                device_id: 1,
                port: 62078,
            }),
            BinaryMessage::Listen,
            BinaryMessage::DeviceAdd(sample_record()),
            BinaryMessage::DeviceRemove { device_id: 9 },
            BinaryMessage::DevicePaired {
                device_id: 0xDEAD_BEEF,
            },
        ]
    }

    #[test]
    fn vector_6_1_connect_parses() {
        let (header, message) = BinaryMessage::parse(&CONNECT_6_1).expect("6.1 parses");
        assert_eq!(
            header,
            Header {
                length: 24,
                version: ProtocolVersion::Binary,
                message: MessageType::Connect,
                tag: 1,
            }
        );
        assert_eq!(
            message,
            BinaryMessage::Connect(ConnectRequest {
                device_id: 1,
                port: 22,
            })
        );
    }

    #[test]
    fn vector_6_1_connect_emits() {
        let message = BinaryMessage::Connect(ConnectRequest {
            device_id: 1,
            port: 22,
        });
        let mut buf = [0xAAu8; 32];
        assert_eq!(message.emit(1, &mut buf), Ok(24));
        assert_eq!(buf[..24], CONNECT_6_1);
        assert_eq!(buf[24..], [0xAA; 8], "nothing written past the message");
        assert_eq!(message.to_vec(1).expect("emits"), CONNECT_6_1);
    }

    #[test]
    fn vector_6_2_result_round_trip() {
        let (header, message) = BinaryMessage::parse(&RESULT_6_2).expect("6.2 parses");
        assert_eq!(header.tag, 1);
        assert_eq!(header.version, ProtocolVersion::Binary);
        assert_eq!(header.message, MessageType::Result);
        assert_eq!(message, BinaryMessage::Result(ResultCode::Ok));
        assert!(matches!(message, BinaryMessage::Result(code) if code.is_ok()));
        assert_eq!(message.to_vec(1).expect("emits"), RESULT_6_2);
    }

    #[test]
    fn vector_6_6_plist_port_is_byte_swapped() {
        assert_eq!(plist_port(62078), 32498);
        assert_eq!(plist_port(62078), 0x7EF2);
        assert_eq!(plist_port(22), 5632);
        assert_eq!(plist_port(32498), 62078, "the swap is its own inverse");
        for port in [0, 1, 0x00FF, 0xFF00, 0x1234, u16::MAX] {
            assert_eq!(plist_port(plist_port(port)), port);
        }
    }

    #[test]
    fn connect_port_is_big_endian_device_id_little_endian() {
        let request = ConnectRequest {
            device_id: 0x0102_0304,
            port: 0xF27E,
        };
        let mut buf = [0u8; ConnectRequest::LEN];
        assert_eq!(request.emit(&mut buf), Ok(8));
        assert_eq!(buf, [0x04, 0x03, 0x02, 0x01, 0xF2, 0x7E, 0, 0]);
    }

    #[test]
    fn connect_reserved_bytes_are_ignored() {
        let body = [1, 0, 0, 0, 0, 22, 0xAB, 0xCD];
        assert_eq!(
            ConnectRequest::parse(&body),
            Ok(ConnectRequest {
                device_id: 1,
                port: 22
            })
        );
    }

    #[test]
    fn header_round_trip_and_layout() {
        let header = Header::new(ProtocolVersion::Plist, MessageType::Plist, 0x0A0B_0C0D, 300)
            .expect("fits");
        assert_eq!(header.length, 316);
        assert_eq!(header.body_len(), 300);
        let bytes = header.to_bytes().expect("emits");
        assert_eq!(
            bytes,
            [0x3C, 0x01, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0x0D, 0x0C, 0x0B, 0x0A]
        );
        assert_eq!(Header::parse(&bytes), Ok(header));
    }

    #[test]
    fn header_keeps_unknown_version_and_type() {
        let header = Header {
            length: 16,
            version: ProtocolVersion::Unknown(7),
            message: MessageType::Unknown(7),
            tag: 42,
        };
        let bytes = header.to_bytes().expect("emits");
        assert_eq!(Header::parse(&bytes), Ok(header));
    }

    #[test]
    fn header_length_bounds() {
        let with_len = |len: u32| {
            let mut bytes = RESULT_6_2;
            bytes[..4].copy_from_slice(&len.to_le_bytes());
            Header::parse(&bytes)
        };
        for len in [0, 1, 15] {
            assert_eq!(with_len(len), Err(ProtoError::LengthTooSmall { len }));
        }
        assert_eq!(with_len(16).map(|h| h.body_len()), Ok(0));
        assert_eq!(
            with_len(MAX_MESSAGE_LEN).map(|h| h.body_len()),
            Ok(MAX_BODY_LEN)
        );
        for len in [MAX_MESSAGE_LEN + 1, u32::MAX] {
            assert_eq!(
                with_len(len),
                Err(ProtoError::LengthTooLarge {
                    len,
                    max: MAX_MESSAGE_LEN
                })
            );
        }
    }

    #[test]
    fn header_new_and_emit_reject_bad_lengths() {
        let new = |body_len| Header::new(ProtocolVersion::Plist, MessageType::Plist, 1, body_len);
        assert!(new(MAX_BODY_LEN).is_ok());
        assert_eq!(
            new(MAX_BODY_LEN + 1),
            Err(ProtoError::LengthTooLarge {
                len: MAX_MESSAGE_LEN + 1,
                max: MAX_MESSAGE_LEN
            })
        );
        assert!(matches!(
            new(usize::MAX),
            Err(ProtoError::LengthTooLarge { .. })
        ));

        let bad = Header {
            length: 8,
            version: ProtocolVersion::Binary,
            message: MessageType::Listen,
            tag: 0,
        };
        let mut buf = [0x55u8; 16];
        assert_eq!(
            bad.emit(&mut buf),
            Err(ProtoError::LengthTooSmall { len: 8 })
        );
        assert_eq!(buf, [0x55; 16], "nothing written on error");
    }

    #[test]
    fn header_truncated_at_every_length() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                Header::parse(&RESULT_6_2[..n]),
                Err(ProtoError::Truncated {
                    needed: HEADER_LEN,
                    available: n
                })
            );
        }
    }

    #[test]
    fn split_truncated_at_every_length() {
        for n in 0..CONNECT_6_1.len() {
            let expected = if n < HEADER_LEN {
                ProtoError::Truncated {
                    needed: HEADER_LEN,
                    available: n,
                }
            } else {
                ProtoError::Truncated {
                    needed: 24,
                    available: n,
                }
            };
            assert_eq!(Header::split(&CONNECT_6_1[..n]), Err(expected));
            assert_eq!(BinaryMessage::parse(&CONNECT_6_1[..n]), Err(expected));
        }
    }

    #[test]
    fn split_leaves_following_bytes_alone() {
        let mut stream = CONNECT_6_1.to_vec();
        stream.extend_from_slice(&RESULT_6_2);
        let (header, body) = Header::split(&stream).expect("first message");
        assert_eq!(body, &CONNECT_6_1[16..]);
        let rest = &stream[header.total_len()..];
        assert_eq!(
            BinaryMessage::parse(rest).map(|(_, m)| m),
            Ok(BinaryMessage::Result(ResultCode::Ok))
        );
    }

    #[test]
    fn every_message_round_trips() {
        for (tag, message) in (0u32..).zip(all_messages()) {
            let bytes = message.to_vec(tag).expect("emits");
            assert_eq!(bytes.len(), message.total_len());
            let (header, parsed) = BinaryMessage::parse(&bytes).expect("parses");
            assert_eq!(header, message.header(tag));
            assert_eq!(parsed, message);
        }
    }

    #[test]
    fn every_body_truncated_at_every_length() {
        for message in all_messages() {
            let bytes = message.to_vec(3).expect("emits");
            let body = &bytes[HEADER_LEN..];
            let kind = message.message_type();
            for n in 0..body.len() {
                assert_eq!(
                    BinaryMessage::parse_body(kind, &body[..n]),
                    Err(ProtoError::Truncated {
                        needed: body.len(),
                        available: n
                    }),
                    "{kind:?} body cut at {n}"
                );
            }
            let mut long = body.to_vec();
            long.push(0);
            assert_eq!(
                BinaryMessage::parse_body(kind, &long),
                Err(ProtoError::TrailingBytes {
                    message: kind,
                    expected: body.len(),
                    actual: body.len() + 1
                })
            );
        }
    }

    #[test]
    fn emit_into_small_buffers_fails_without_writing() {
        for message in all_messages() {
            let total = message.total_len();
            for n in 0..total {
                let mut buf = vec![0x77u8; n];
                assert_eq!(
                    message.emit(5, &mut buf),
                    Err(ProtoError::BufferTooSmall {
                        needed: total,
                        available: n
                    })
                );
                assert!(buf.iter().all(|&b| b == 0x77));
            }
        }
    }

    #[test]
    fn plist_and_unknown_types_have_no_binary_body() {
        for message in [MessageType::Plist, MessageType::Unknown(7)] {
            assert_eq!(
                BinaryMessage::parse_body(message, b"<plist/>"),
                Err(ProtoError::NotBinary { message })
            );
        }
    }

    #[test]
    fn device_record_layout() {
        let record = sample_record();
        let mut buf = [0xEEu8; DeviceRecord::LEN];
        assert_eq!(record.emit(&mut buf), Ok(268));
        assert_eq!(buf[0..4], [7, 0, 0, 0]);
        assert_eq!(buf[4..6], [0xA8, 0x12]);
        assert_eq!(&buf[6..6 + 25], record.serial.as_bytes());
        assert!(buf[6 + 25..262].iter().all(|&b| b == 0), "NUL padded");
        assert_eq!(buf[262..264], [0, 0], "padding");
        assert_eq!(buf[264..268], [12, 0, 3, 0]);
        assert_eq!(DeviceRecord::parse(&buf), Ok(record));
    }

    #[test]
    fn device_record_serial_limits() {
        let mut record = sample_record();
        record.serial = "A".repeat(255);
        let bytes = BinaryMessage::DeviceAdd(record.clone())
            .to_vec(0)
            .expect("255 bytes fit");
        assert_eq!(
            BinaryMessage::parse(&bytes).map(|(_, m)| m),
            Ok(BinaryMessage::DeviceAdd(record.clone()))
        );

        record.serial = "A".repeat(256);
        let mut buf = [0u8; 400];
        assert_eq!(
            record.emit(&mut buf),
            Err(ProtoError::SerialTooLong { len: 256 })
        );
        assert_eq!(
            BinaryMessage::DeviceAdd(record.clone()).emit(0, &mut buf),
            Err(ProtoError::SerialTooLong { len: 256 })
        );
        assert!(buf.iter().all(|&b| b == 0), "nothing written on error");

        for bad in ["a\0b", "caf\u{e9}"] {
            record.serial = bad.to_owned();
            assert_eq!(record.emit(&mut buf), Err(ProtoError::InvalidSerial));
        }

        record.serial = String::new();
        let mut body = [0u8; DeviceRecord::LEN];
        record.emit(&mut body).expect("empty serial fits");
        assert_eq!(DeviceRecord::parse(&body), Ok(record));
    }

    #[test]
    fn device_record_parse_rejects_bad_serial_fields() {
        let mut body = [0u8; DeviceRecord::LEN];
        sample_record().emit(&mut body).expect("emits");

        let mut garbage_after_nul = body;
        garbage_after_nul[200] = 0xFF;
        assert_eq!(DeviceRecord::parse(&garbage_after_nul), Ok(sample_record()));

        let mut unterminated = body;
        unterminated[6..262].fill(b'x');
        assert_eq!(
            DeviceRecord::parse(&unterminated),
            Err(ProtoError::UnterminatedSerial)
        );

        let mut non_ascii = body;
        non_ascii[8] = 0xC3;
        assert_eq!(
            DeviceRecord::parse(&non_ascii),
            Err(ProtoError::InvalidSerial)
        );
    }

    #[test]
    fn enums_convert_both_ways() {
        let named: [(u32, MessageType); 7] = [
            (1, MessageType::Result),
            (2, MessageType::Connect),
            (3, MessageType::Listen),
            (4, MessageType::DeviceAdd),
            (5, MessageType::DeviceRemove),
            (6, MessageType::DevicePaired),
            (8, MessageType::Plist),
        ];
        for (value, message) in named {
            assert_eq!(MessageType::from(value), message);
            assert_eq!(u32::from(message), value);
        }
        for value in [0, 7, 9, u32::MAX] {
            assert_eq!(MessageType::from(value), MessageType::Unknown(value));
            assert_eq!(u32::from(MessageType::from(value)), value);
        }

        assert_eq!(ProtocolVersion::from(0), ProtocolVersion::Binary);
        assert_eq!(ProtocolVersion::from(1), ProtocolVersion::Plist);
        assert_eq!(ProtocolVersion::from(2), ProtocolVersion::Unknown(2));
        assert_eq!(u32::from(ProtocolVersion::Plist), 1);

        let codes: [(u32, ResultCode); 5] = [
            (0, ResultCode::Ok),
            (1, ResultCode::BadCommand),
            (2, ResultCode::BadDevice),
            (3, ResultCode::ConnectionRefused),
            (6, ResultCode::BadVersion),
        ];
        for (value, code) in codes {
            assert_eq!(ResultCode::from(value), code);
            assert_eq!(u32::from(code), value);
        }
        assert_eq!(ResultCode::from(4), ResultCode::Unknown(4));
        assert_eq!(ResultCode::from(22), ResultCode::Unknown(22));
        assert!(!ResultCode::BadVersion.is_ok());
    }

    #[test]
    fn errors_display() {
        let err = ProtoError::LengthTooLarge {
            len: 70_000,
            max: MAX_MESSAGE_LEN,
        };
        assert_eq!(
            err.to_string(),
            "message length 70000 exceeds the maximum of 65536"
        );
        assert_eq!(
            ProtoError::SerialTooLong { len: 300 }.to_string(),
            "serial number of 300 bytes does not fit (at most 255)"
        );
    }

    /// xorshift64*: a small deterministic generator, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Runs every parser over `bytes`; what they return does not matter, only that they return.
    fn parse_everything(bytes: &[u8]) {
        let _ = Header::parse(bytes);
        let _ = Header::split(bytes);
        let _ = BinaryMessage::parse(bytes);
        let _ = ConnectRequest::parse(bytes);
        let _ = DeviceRecord::parse(bytes);
        for message in 0..10 {
            let _ = BinaryMessage::parse_body(MessageType::from(message), bytes);
        }
    }

    #[test]
    fn no_panic_on_pseudo_random_bytes() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut buf = vec![0u8; 600];
        for _ in 0..20_000 {
            let len = rng.below(buf.len() + 1);
            for b in buf.iter_mut().take(len) {
                *b = rng.next() as u8;
            }
            parse_everything(&buf[..len]);
        }
    }

    #[test]
    fn no_panic_on_mutated_valid_messages() {
        let mut rng = Rng(1);
        let seeds: Vec<Vec<u8>> = all_messages()
            .iter()
            .map(|m| m.to_vec(1).expect("emits"))
            .collect();
        for _ in 0..20_000 {
            let mut bytes = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            bytes.truncate(rng.below(bytes.len() + 1));
            parse_everything(&bytes);
        }
    }

    fn any_result_code() -> impl Strategy<Value = ResultCode> {
        any::<u32>().prop_map(ResultCode::from)
    }

    fn any_message() -> impl Strategy<Value = BinaryMessage> {
        prop_oneof![
            any_result_code().prop_map(BinaryMessage::Result),
            (any::<u32>(), any::<u16>()).prop_map(|(device_id, port)| BinaryMessage::Connect(
                ConnectRequest { device_id, port }
            )),
            Just(BinaryMessage::Listen),
            (any::<u32>(), any::<u16>(), "[ -~]{0,255}", any::<u32>()).prop_map(
                |(device_id, product_id, serial, location)| {
                    BinaryMessage::DeviceAdd(DeviceRecord {
                        device_id,
                        product_id,
                        serial,
                        location,
                    })
                }
            ),
            any::<u32>().prop_map(|device_id| BinaryMessage::DeviceRemove { device_id }),
            any::<u32>().prop_map(|device_id| BinaryMessage::DevicePaired { device_id }),
        ]
    }

    proptest! {
        #[test]
        fn prop_message_round_trip(message in any_message(), tag in any::<u32>()) {
            let bytes = message.to_vec(tag).expect("emits");
            let (header, parsed) = BinaryMessage::parse(&bytes).expect("parses");
            prop_assert_eq!(header.tag, tag);
            prop_assert_eq!(header.version, ProtocolVersion::Binary);
            prop_assert_eq!(parsed, message);
        }

        #[test]
        fn prop_header_round_trip(
            length in 16u32..=MAX_MESSAGE_LEN,
            version in any::<u32>(),
            message in any::<u32>(),
            tag in any::<u32>(),
        ) {
            let header = Header { length, version: version.into(), message: message.into(), tag };
            let bytes = header.to_bytes().expect("emits");
            prop_assert_eq!(Header::parse(&bytes), Ok(header));
            prop_assert_eq!(u32::from(header.version), version);
            prop_assert_eq!(u32::from(header.message), message);
        }

        #[test]
        fn prop_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            parse_everything(&bytes);
        }
    }
}
