//! Zero-copy views and plain representations of everything usbmux puts on the USB bulk pipes.
//!
//! The layering follows the wire (see `shared/PROTOCOL.md` §1.1–1.5):
//!
//! - [`mux`]: the 8-byte (v1) or 16-byte (v2) mux header that starts every packet;
//! - [`version`]: the 12-byte VERSION body (mux protocol 0);
//! - [`control`]: the CONTROL body, one type byte and text (mux protocol 1);
//! - [`tcp`]: the 20-byte pseudo-TCP header (mux protocol 6). No IP header, no checksum.
//!
//! The SETUP body (mux protocol 2) is the single byte [`mux::SETUP_PAYLOAD`] and has no view.
//!
//! Each header comes as a pair, in the manner of smoltcp:
//!
//! - a `Packet<T: AsRef<[u8]>>` *view* that reads and writes fields in place (endianness lives in
//!   its accessors, never at the call site), and
//! - a plain `Repr` that is what the rest of the crate reasons about, with `parse`, `buffer_len`
//!   and `emit`.
//!
//! # Contract
//!
//! - Parse untrusted bytes **only** through `Packet::new_checked` (or call `check_len` yourself
//!   before any accessor). `new_unchecked` is for buffers this crate is about to fill.
//! - Once `check_len()` has succeeded on a view, **no getter or payload accessor panics**, whatever
//!   the bytes are. Setters may still panic on a view that was never checked and is too short;
//!   that is a bug in the caller, not a peer's doing.
//! - `Repr::parse` never panics and reports every inconsistency as [`Error`].
//! - `Repr::emit` cannot fail on a buffer of at least `Repr::buffer_len()` bytes; it panics only
//!   if handed a shorter buffer (a local bug).
//!
//! Numeric codes are enums with an `Unknown(n)` variant and `From` conversions both ways, so an
//! unknown code from a peer is data to log or reject, never a parse failure.

use core::fmt;

/// Bytes that cannot be a packet of the requested kind: too short for the header, a length field
/// that contradicts the buffer, a v2 header without its magic, a data offset below the minimum.
///
/// Deliberately carries no detail (like smoltcp's `wire::Error`): the caller's next step is the
/// same in every case — count it, drop the packet, and resynchronise if it came from a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Error;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed packet")
    }
}

impl core::error::Error for Error {}

/// Result of the wire layer's fallible operations (`new_checked`, `check_len`, `parse`).
pub type Result<T> = core::result::Result<T, Error>;

/// Declares a numeric wire code as an enum with an extra `Unknown(n)` variant, plus `From`
/// conversions in both directions.
///
/// Unknown codes must survive a round trip (to be logged, or forwarded by a relay), so the
/// conversion from the raw integer is total. Note that `Unknown(n)` with a known `n` converts to
/// the raw `n` and back to the *named* variant; only the named form is canonical.
macro_rules! enum_with_unknown {
    (
        $( #[$enum_attr:meta] )*
        pub enum $name:ident($ty:ty) {
            $(
                $( #[$variant_attr:meta] )*
                $variant:ident = $value:expr
            ),+ $(,)?
        }
    ) => {
        #[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Clone, Copy)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        $( #[$enum_attr] )*
        pub enum $name {
            $(
                $( #[$variant_attr] )*
                $variant,
            )+
            /// A code this crate does not know. It is carried verbatim so the caller can log it,
            /// forward it or reject the packet; it is never a parse error by itself.
            Unknown($ty),
        }

        impl ::core::convert::From<$ty> for $name {
            fn from(value: $ty) -> Self {
                match value {
                    $( $value => $name::$variant, )+
                    other => $name::Unknown(other),
                }
            }
        }

        impl ::core::convert::From<$name> for $ty {
            fn from(value: $name) -> Self {
                match value {
                    $( $name::$variant => $value, )+
                    $name::Unknown(other) => other,
                }
            }
        }
    };
}

pub mod control;
pub mod mux;
pub mod tcp;
pub mod version;

pub use control::{ControlType, Packet as ControlPacket, Repr as ControlRepr};
pub use mux::{HeaderKind, MuxSeq, Packet as MuxPacket, Protocol, Repr as MuxRepr};
pub use tcp::{Flags as TcpFlags, Packet as TcpPacket, Repr as TcpRepr};
pub use version::{Packet as VersionPacket, Repr as VersionRepr};

/// Big-endian field helpers shared by the views. Callers pass ranges of the exact width, so the
/// `try_into` conversions cannot fail; a mismatch would be a bug in a `field` table, and it
/// degrades to 0 rather than panicking.
fn read_u16(bytes: &[u8]) -> u16 {
    bytes.try_into().map(u16::from_be_bytes).unwrap_or(0)
}

fn read_u32(bytes: &[u8]) -> u32 {
    bytes.try_into().map(u32::from_be_bytes).unwrap_or(0)
}

fn write_u16(bytes: &mut [u8], value: u16) {
    bytes.copy_from_slice(&value.to_be_bytes());
}

fn write_u32(bytes: &mut [u8], value: u32) {
    bytes.copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod test {
    use super::*;

    enum_with_unknown! {
        /// Test enum.
        pub enum Code(u8) {
            /// One.
            One = 1,
            /// Two.
            Two = 2,
        }
    }

    #[test]
    fn test_enum_with_unknown_round_trip() {
        assert_eq!(Code::from(1), Code::One);
        assert_eq!(Code::from(2), Code::Two);
        assert_eq!(Code::from(9), Code::Unknown(9));
        assert_eq!(u8::from(Code::Two), 2);
        assert_eq!(u8::from(Code::Unknown(9)), 9);
        // Non-canonical Unknown of a known value normalises to the named variant.
        assert_eq!(Code::from(u8::from(Code::Unknown(1))), Code::One);
    }

    #[test]
    fn test_error_display() {
        assert_eq!(Error.to_string(), "malformed packet");
    }

    /// Runs every view and `Repr::parse` over `bytes`; whatever the bytes, nothing may panic, and
    /// whatever parses must emit back to the same header bytes.
    fn exercise(bytes: &[u8]) {
        for kind in [HeaderKind::V1, HeaderKind::V2, mux::detect_kind(bytes)] {
            if let Ok(packet) = MuxPacket::new_checked(bytes, kind) {
                let _ = (
                    packet.protocol(),
                    packet.magic(),
                    packet.tx_seq(),
                    packet.rx_seq(),
                );
                let payload = packet.payload();
                assert_eq!(
                    payload.len() + packet.header_len(),
                    packet.total_len() as usize
                );
                if let Ok(repr) = MuxRepr::parse(&packet) {
                    assert_eq!(repr.kind(), kind);
                    assert_eq!(repr.buffer_len(), packet.total_len() as usize);
                    let mut out = std::vec![0u8; repr.buffer_len()];
                    let mut view = MuxPacket::new_unchecked(&mut out[..], repr.kind());
                    repr.emit(&mut view);
                    view.payload_mut().copy_from_slice(payload);
                    assert_eq!(&out[..], &bytes[..repr.buffer_len()]);
                }
                exercise_bodies(payload);
            }
        }
        exercise_bodies(bytes);
    }

    fn exercise_bodies(bytes: &[u8]) {
        if let Ok(packet) = VersionPacket::new_checked(bytes) {
            let _ = packet.padding();
            let repr = VersionRepr::parse(&packet).expect("checked version parses");
            assert_eq!((repr.major, repr.minor), (packet.major(), packet.minor()));
        } else {
            assert!(bytes.len() < version::HEADER_LEN);
        }
        if let Ok(packet) = ControlPacket::new_checked(bytes) {
            let repr = ControlRepr::parse(&packet).expect("checked control parses");
            let mut out = std::vec![0u8; repr.buffer_len()];
            repr.emit(&mut ControlPacket::new_unchecked(&mut out[..]));
            assert_eq!(&out[..], bytes);
        } else {
            assert!(bytes.is_empty());
        }
        if let Ok(packet) = TcpPacket::new_checked(bytes) {
            let _ = (packet.checksum(), packet.urgent());
            let repr = TcpRepr::parse(&packet).expect("checked tcp parses");
            assert_eq!(repr.payload, packet.payload());
            let mut out = std::vec![0u8; repr.buffer_len()];
            repr.emit(&mut TcpPacket::new_unchecked(&mut out[..]));
            let reparsed = TcpRepr::parse(&TcpPacket::new_checked(&out[..]).expect("emitted"));
            assert_eq!(reparsed, Ok(repr));
        }
    }

    /// xorshift32: deterministic "random-looking" bytes without a dependency.
    fn next(state: &mut u32) -> u32 {
        *state ^= *state << 13;
        *state ^= *state >> 17;
        *state ^= *state << 5;
        *state
    }

    #[test]
    fn test_no_panic_on_prefixes_and_noise() {
        let vectors: [&[u8]; 4] = [
            // PROTOCOL.md §6.3, §6.4, §6.5 and a v2 CONTROL packet.
            &[
                0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            &[
                0, 0, 0, 2, 0, 0, 0, 0x11, 0xfe, 0xed, 0xfa, 0xce, 0, 0, 0xff, 0xff, 7,
            ],
            &[
                0, 0, 0, 6, 0, 0, 0, 0x24, 0xfe, 0xed, 0xfa, 0xce, 0, 1, 0xff, 0xff, 0, 1, 0xf2,
                0x7e, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 2, 2, 0, 0, 0, 0, 0,
            ],
            &[
                0, 0, 0, 1, 0, 0, 0, 0x13, 0xfe, 0xed, 0xfa, 0xce, 0, 5, 0, 4, 3, b'b', b'a',
            ],
        ];
        for vector in vectors {
            for len in 0..=vector.len() {
                exercise(&vector[..len]);
            }
        }

        let mut state = 0x1234_5678;
        let mut buf = [0u8; 96];
        for round in 0..20_000u32 {
            let len = (next(&mut state) as usize) % buf.len();
            for b in buf.iter_mut() {
                *b = next(&mut state) as u8;
            }
            // Make plausible headers common enough to reach the deeper paths.
            if round % 2 == 0 && len >= 8 {
                let total = next(&mut state) % (len as u32 + 4);
                buf[4..8].copy_from_slice(&total.to_be_bytes());
                buf[0..4].copy_from_slice(&(next(&mut state) % 8).to_be_bytes());
            }
            if round % 4 == 0 && len >= 12 {
                buf[8..12].copy_from_slice(&mux::MAGIC.to_be_bytes());
            }
            if round % 3 == 0 && len >= 29 {
                buf[28] = (5 + (next(&mut state) % 4) as u8) << 4;
                buf[12] = (5 + (next(&mut state) % 4) as u8) << 4;
            }
            exercise(&buf[..len]);
        }
    }

    #[test]
    fn test_be_helpers() {
        let mut b = [0u8; 6];
        write_u16(&mut b[0..2], 0x1234);
        write_u32(&mut b[2..6], 0xFEED_FACE);
        assert_eq!(b, [0x12, 0x34, 0xFE, 0xED, 0xFA, 0xCE]);
        assert_eq!(read_u16(&b[0..2]), 0x1234);
        assert_eq!(read_u32(&b[2..6]), 0xFEED_FACE);
        // Wrong widths degrade instead of panicking.
        assert_eq!(read_u16(&b[0..3]), 0);
        assert_eq!(read_u32(&b[0..3]), 0);
    }
}

/// A one-line, human-readable rendering of a whole mux packet, for logs, trace dumps and demos:
/// `v2 tx=1 rx=65535 TCP 1 -> 62078 seq=0 ack=0 SYN win=512 len=0`.
///
/// `kind` is the header form negotiated for this direction; VERSION packets are recognised in
/// either form (as `Session` does). Malformed bytes render as `malformed (N bytes)`; nothing
/// panics.
#[derive(Clone, Copy, Debug)]
pub struct Summary<'a> {
    /// The packet, header included.
    pub bytes: &'a [u8],
    /// The header form to read it with.
    pub kind: HeaderKind,
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.bytes;
        let proto = match bytes.get(0..4) {
            Some(&[a, b, c, d]) => Protocol::from(u32::from_be_bytes([a, b, c, d])),
            _ => return write!(f, "malformed ({} bytes)", bytes.len()),
        };
        let kind = if proto == Protocol::Version {
            mux::detect_kind(bytes)
        } else {
            self.kind
        };
        let Ok(packet) = MuxPacket::new_checked(bytes, kind) else {
            return write!(f, "malformed ({} bytes)", bytes.len());
        };
        let Ok(repr) = MuxRepr::parse(&packet) else {
            return write!(f, "malformed ({} bytes)", bytes.len());
        };
        match repr.seq {
            Some(s) => write!(f, "v2 tx={} rx={} ", s.tx, s.rx)?,
            None => f.write_str("v1 ")?,
        }
        let payload = packet.payload();
        match proto {
            Protocol::Version => {
                match VersionPacket::new_checked(payload).and_then(|p| VersionRepr::parse(&p)) {
                    Ok(v) => write!(f, "VERSION {}.{}", v.major, v.minor),
                    Err(_) => write!(f, "VERSION malformed ({} bytes)", payload.len()),
                }
            }
            Protocol::Setup => write!(f, "SETUP {:02x?}", payload),
            Protocol::Control => {
                match ControlPacket::new_checked(payload).and_then(|p| ControlRepr::parse(&p)) {
                    Ok(c) => {
                        write!(f, "CONTROL {:?} \"", c.kind)?;
                        for &b in c.text {
                            let ch = if (0x20..0x7f).contains(&b) {
                                b as char
                            } else {
                                '.'
                            };
                            fmt::Write::write_char(f, ch)?;
                        }
                        f.write_str("\"")
                    }
                    Err(_) => write!(f, "CONTROL malformed ({} bytes)", payload.len()),
                }
            }
            Protocol::Tcp => match TcpPacket::new_checked(payload).and_then(|p| TcpRepr::parse(&p))
            {
                Ok(t) => write!(f, "{t}"),
                Err(_) => write!(f, "TCP malformed ({} bytes)", payload.len()),
            },
            Protocol::Unknown(n) => write!(f, "protocol {n} ({} bytes)", payload.len()),
        }
    }
}

#[cfg(test)]
mod summary_test {
    use super::*;
    use std::string::ToString;

    #[test]
    fn renders_each_kind_and_never_panics() {
        let version = [
            0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(
            Summary {
                bytes: &version,
                kind: HeaderKind::V2
            }
            .to_string(),
            "v1 VERSION 2.0"
        );
        let syn = [
            0, 0, 0, 6, 0, 0, 0, 0x24, 0xFE, 0xED, 0xFA, 0xCE, 0, 1, 0xFF, 0xFF, 0, 1, 0xF2, 0x7E,
            0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0x02, 0x00, 0, 0, 0, 0,
        ];
        assert_eq!(
            Summary {
                bytes: &syn,
                kind: HeaderKind::V2
            }
            .to_string(),
            "v2 tx=1 rx=65535 TCP 1 -> 62078 seq=0 ack=0 SYN win=512 len=0"
        );
        assert_eq!(
            Summary {
                bytes: &syn[..5],
                kind: HeaderKind::V2
            }
            .to_string(),
            "malformed (5 bytes)"
        );
        for n in 0..syn.len() {
            let _ = Summary {
                bytes: &syn[..n],
                kind: HeaderKind::V1,
            }
            .to_string();
        }
    }
}
