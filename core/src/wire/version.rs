//! The VERSION body: 12 bytes after a mux header with protocol 0 (`shared/PROTOCOL.md` §1.3).
//!
//! ```text
//! 0: u32 major | 4: u32 minor | 8: u32 padding      (all big-endian)
//! ```
//!
//! The host sends {2, 0, 0}; the device answers with the major it speaks (1 or 2), which decides
//! the mux header form for the rest of the session. The view is built over the mux payload
//! ([`super::mux::Packet::payload`]).

use super::{read_u32, write_u32, Error, Result};

/// Length of the VERSION body. A peer may send more; the extra bytes are ignored.
pub const HEADER_LEN: usize = 12;

mod field {
    use core::ops::Range;

    pub const MAJOR: Range<usize> = 0..4;
    pub const MINOR: Range<usize> = 4..8;
    pub const PADDING: Range<usize> = 8..12;
}

/// A read/write view of a VERSION body in a byte buffer (normally a mux payload).
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

    /// Checks that the buffer holds at least [`HEADER_LEN`] bytes. Longer buffers are accepted
    /// (a peer may append bytes; usbmuxd only requires the minimum) and the rest is ignored.
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

    /// The protocol major version: 2 for v2 (16-byte) mux headers, 1 for v1; anything else is a
    /// device the host cannot talk to.
    pub fn major(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::MAJOR])
    }

    /// The protocol minor version (0 in practice; not used for any decision).
    pub fn minor(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::MINOR])
    }

    /// The padding word: sent as 0, ignored on receipt.
    pub fn padding(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::PADDING])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the major version.
    pub fn set_major(&mut self, value: u32) {
        write_u32(&mut self.buffer.as_mut()[field::MAJOR], value);
    }

    /// Writes the minor version.
    pub fn set_minor(&mut self, value: u32) {
        write_u32(&mut self.buffer.as_mut()[field::MINOR], value);
    }

    /// Writes the padding word (0 in everything this crate sends).
    pub fn set_padding(&mut self, value: u32) {
        write_u32(&mut self.buffer.as_mut()[field::PADDING], value);
    }
}

/// A parsed VERSION body. The padding is not represented: it carries nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Repr {
    /// Protocol major version (the host asks for 2).
    pub major: u32,
    /// Protocol minor version (0).
    pub minor: u32,
}

impl Repr {
    /// Parses a view (checking its length itself). Any padding value and any trailing bytes are
    /// accepted; judging the major version is the session's job.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&T>) -> Result<Repr> {
        packet.check_len()?;
        Ok(Repr {
            major: packet.major(),
            minor: packet.minor(),
        })
    }

    /// Bytes [`Repr::emit`] writes: always [`HEADER_LEN`].
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes major, minor and a zero padding. Cannot fail on a buffer of at least
    /// [`HEADER_LEN`] bytes; bytes beyond it are left untouched.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_major(self.major);
        packet.set_minor(self.minor);
        packet.set_padding(0);
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::wire::mux;

    /// PROTOCOL.md §6.3: the host's VERSION packet (v1 mux header + body {2, 0, 0}).
    static PACKET_BYTES: [u8; 20] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    static BODY_BYTES: [u8; 12] = [
        0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    static REPR: Repr = Repr { major: 2, minor: 0 };

    #[test]
    fn test_deconstruct() {
        let packet = Packet::new_checked(&BODY_BYTES[..]).expect("valid");
        assert_eq!(packet.major(), 2);
        assert_eq!(packet.minor(), 0);
        assert_eq!(packet.padding(), 0);
    }

    #[test]
    fn test_deconstruct_big_endian() {
        let bytes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let packet = Packet::new_checked(&bytes[..]).expect("valid");
        assert_eq!(packet.major(), 0x0102_0304);
        assert_eq!(packet.minor(), 0x0506_0708);
        assert_eq!(packet.padding(), 0x090a_0b0c);
    }

    #[test]
    fn test_construct() {
        let mut bytes = [0xa5u8; 12];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_major(2);
        packet.set_minor(0);
        packet.set_padding(0);
        assert_eq!(bytes, BODY_BYTES);
    }

    #[test]
    fn test_truncated() {
        for len in 0..HEADER_LEN {
            assert_eq!(Packet::new_checked(&BODY_BYTES[..len]), Err(Error));
            let packet = Packet::new_unchecked(&BODY_BYTES[..len]);
            assert_eq!(Repr::parse(&packet), Err(Error));
        }
    }

    #[test]
    fn test_extra_bytes_ignored() {
        let mut bytes = [0xeeu8; 16];
        bytes[..12].copy_from_slice(&BODY_BYTES);
        let packet = Packet::new_checked(&bytes[..]).expect("longer is fine");
        assert_eq!(Repr::parse(&packet), Ok(REPR));
    }

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(&BODY_BYTES[..]).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(REPR));
        // Padding is not judged.
        let mut bytes = BODY_BYTES;
        bytes[11] = 0x42;
        let packet = Packet::new_checked(&bytes[..]).expect("valid");
        assert_eq!(packet.padding(), 0x42);
        assert_eq!(Repr::parse(&packet), Ok(REPR));
    }

    #[test]
    fn test_emit() {
        assert_eq!(REPR.buffer_len(), HEADER_LEN);
        let mut bytes = [0xa5u8; 12];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        REPR.emit(&mut packet);
        assert_eq!(bytes, BODY_BYTES);
    }

    /// The whole §6.3 packet, through both layers.
    #[test]
    fn test_full_packet() {
        let mux_packet =
            mux::Packet::new_checked(&PACKET_BYTES[..], mux::HeaderKind::V1).expect("valid");
        let mux_repr = mux::Repr::parse(&mux_packet).expect("parses");
        assert_eq!(mux_repr.protocol, mux::Protocol::Version);
        let packet = Packet::new_checked(mux_packet.payload()).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(REPR));

        let mux_repr = mux::Repr {
            protocol: mux::Protocol::Version,
            payload_len: REPR.buffer_len(),
            seq: None,
        };
        let mut bytes = [0xa5u8; 20];
        let mut mux_packet = mux::Packet::new_unchecked(&mut bytes[..], mux_repr.kind());
        mux_repr.emit(&mut mux_packet);
        REPR.emit(&mut Packet::new_unchecked(mux_packet.payload_mut()));
        assert_eq!(bytes, PACKET_BYTES);
    }

    #[test]
    fn test_unknown_major_parses() {
        let mut bytes = BODY_BYTES;
        bytes[..4].copy_from_slice(&7u32.to_be_bytes());
        let packet = Packet::new_checked(&bytes[..]).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(Repr { major: 7, minor: 0 }));
    }
}
