//! The CONTROL body: what follows a mux header with protocol 1 (`shared/PROTOCOL.md` §1.4).
//!
//! ```text
//! 0: u8 type | 1..: text (not NUL terminated, not necessarily UTF-8)
//! ```
//!
//! Phones use it for diagnostics, e.g. type 3 "message was too large" when the host's framing is
//! wrong. The simulator sends it for the same reason. The text is bytes, not `str`: it comes from
//! a peer and is only logged (through [`crate::Bytes`] or a lossy conversion).

use super::{Error, Result};

enum_with_unknown! {
    /// The type byte of a CONTROL packet: how loudly to log the text.
    pub enum ControlType(u8) {
        /// The device reports an error (e.g. a malformed or oversized packet from us). Log as an
        /// error; the packet it refers to was dropped.
        Error = 3,
        /// The device reports a warning. Log it.
        Warning = 5,
        /// Informational text from the device. Log at debug level.
        Info = 7,
    }
}

/// Length of the fixed part of a CONTROL body (the type byte).
pub const HEADER_LEN: usize = 1;

mod field {
    use core::ops::RangeFrom;

    pub const TYPE: usize = 0;
    pub const TEXT: RangeFrom<usize> = 1..;
}

/// A read/write view of a CONTROL body in a byte buffer (normally a mux payload).
///
/// The text runs to the end of the buffer, so build the view over exactly the mux payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without any check. For buffers this crate is about to fill; accessors on an
    /// unchecked view may panic.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer and validates it with [`Packet::check_len`]: the only way to read untrusted
    /// bytes.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that the type byte is present. The text may be empty.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error)
        } else {
            Ok(())
        }
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The type byte.
    pub fn kind(&self) -> ControlType {
        ControlType::from(self.buffer.as_ref()[field::TYPE])
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The text after the type byte, to the end of the buffer, borrowed from the underlying
    /// buffer. Raw bytes: no terminator is stripped and no encoding is assumed.
    pub fn text(&self) -> &'a [u8] {
        let data = self.buffer.as_ref();
        &data[field::TEXT]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the type byte.
    pub fn set_kind(&mut self, value: ControlType) {
        self.buffer.as_mut()[field::TYPE] = value.into();
    }

    /// The text area: everything after the type byte.
    pub fn text_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::TEXT]
    }
}

/// A parsed CONTROL body, borrowing its text from the packet buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Repr<'a> {
    /// How the device wants the text treated.
    pub kind: ControlType,
    /// The message, raw bytes (not NUL terminated; may be empty).
    pub text: &'a [u8],
}

impl<'a> Repr<'a> {
    /// Parses a view (checking its length itself). Every type byte parses, unknown ones as
    /// [`ControlType::Unknown`].
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Repr<'a>> {
        packet.check_len()?;
        Ok(Repr {
            kind: packet.kind(),
            text: packet.text(),
        })
    }

    /// Bytes [`Repr::emit`] writes: the type byte plus the text.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.text.len()
    }

    /// Writes the type byte and copies the text right after it. Cannot fail on a buffer of at
    /// least `buffer_len()` bytes; bytes beyond it are left untouched, so size the buffer (and
    /// the mux `payload_len`) to exactly `buffer_len()`, since the text runs to the buffer's end.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_kind(self.kind);
        packet.text_mut()[..self.text.len()].copy_from_slice(self.text);
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::wire::mux;

    /// A phone's complaint about an oversized transfer: v2 mux header (tx 5, rx 0x0102), protocol
    /// 1, type 3, text "message was too large" (21 bytes); total 16 + 1 + 21 = 38.
    static PACKET_BYTES: [u8; 38] = [
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x26, 0xfe, 0xed, 0xfa, 0xce, 0x00, 0x05, 0x01,
        0x02, 0x03, b'm', b'e', b's', b's', b'a', b'g', b'e', b' ', b'w', b'a', b's', b' ', b't',
        b'o', b'o', b' ', b'l', b'a', b'r', b'g', b'e',
    ];

    static TEXT: &[u8] = b"message was too large";

    fn body() -> &'static [u8] {
        &PACKET_BYTES[16..]
    }

    #[test]
    fn test_deconstruct() {
        let packet = Packet::new_checked(body()).expect("valid");
        assert_eq!(packet.kind(), ControlType::Error);
        assert_eq!(packet.text(), TEXT);
    }

    #[test]
    fn test_construct() {
        let mut bytes = [0xa5u8; 22];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_kind(ControlType::Error);
        packet.text_mut().copy_from_slice(TEXT);
        assert_eq!(&bytes[..], body());
    }

    #[test]
    fn test_truncated() {
        assert_eq!(Packet::new_checked(&[][..]), Err(Error));
        assert_eq!(Repr::parse(&Packet::new_unchecked(&[][..])), Err(Error));
        // Every non-empty prefix is a (shorter) message.
        for len in 1..body().len() {
            let packet = Packet::new_checked(&body()[..len]).expect("valid");
            assert_eq!(packet.text(), &TEXT[..len - 1]);
        }
    }

    #[test]
    fn test_empty_text() {
        let packet = Packet::new_checked(&[7u8][..]).expect("valid");
        assert_eq!(
            Repr::parse(&packet),
            Ok(Repr {
                kind: ControlType::Info,
                text: &[],
            })
        );
    }

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(body()).expect("valid");
        assert_eq!(
            Repr::parse(&packet),
            Ok(Repr {
                kind: ControlType::Error,
                text: TEXT,
            })
        );
    }

    #[test]
    fn test_emit() {
        let repr = Repr {
            kind: ControlType::Error,
            text: TEXT,
        };
        assert_eq!(repr.buffer_len(), 22);
        let mut bytes = [0xa5u8; 22];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        assert_eq!(&bytes[..], body());
    }

    /// The whole packet, through both layers.
    #[test]
    fn test_full_packet() {
        let mux_packet =
            mux::Packet::new_checked(&PACKET_BYTES[..], mux::HeaderKind::V2).expect("valid");
        let mux_repr = mux::Repr::parse(&mux_packet).expect("parses");
        assert_eq!(mux_repr.protocol, mux::Protocol::Control);
        let packet = Packet::new_checked(mux_packet.payload()).expect("valid");
        let repr = Repr::parse(&packet).expect("parses");
        assert_eq!(repr.text, TEXT);

        let mux_repr = mux::Repr {
            protocol: mux::Protocol::Control,
            payload_len: repr.buffer_len(),
            seq: Some(mux::MuxSeq { tx: 5, rx: 0x0102 }),
        };
        let mut bytes = [0xa5u8; 38];
        let mut mux_packet = mux::Packet::new_unchecked(&mut bytes[..], mux_repr.kind());
        mux_repr.emit(&mut mux_packet);
        repr.emit(&mut Packet::new_unchecked(mux_packet.payload_mut()));
        assert_eq!(bytes, PACKET_BYTES);
    }

    #[test]
    fn test_unknown_type() {
        let packet = Packet::new_checked(&[0x42u8, b'x'][..]).expect("valid");
        assert_eq!(packet.kind(), ControlType::Unknown(0x42));
        let repr = Repr::parse(&packet).expect("unknown types parse");
        assert_eq!(repr.kind, ControlType::Unknown(0x42));
        let mut bytes = [0xa5u8; 2];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        assert_eq!(bytes, [0x42, b'x']);

        assert_eq!(ControlType::from(3u8), ControlType::Error);
        assert_eq!(ControlType::from(5u8), ControlType::Warning);
        assert_eq!(ControlType::from(7u8), ControlType::Info);
        assert_eq!(u8::from(ControlType::Warning), 5);
        assert_eq!(u8::from(ControlType::Unknown(0)), 0);
    }
}
