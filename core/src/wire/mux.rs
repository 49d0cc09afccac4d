//! The mux header that starts every packet on the bulk pipes (`shared/PROTOCOL.md` §1.1–1.2).
//!
//! Two forms exist and nothing in the bytes says which one a packet uses: the form is *negotiated*
//! (an 8-byte v1 header until the VERSION reply says major 2, a 16-byte v2 header after that).
//! So the view is told its [`HeaderKind`] by the caller, who tracks the negotiation. The one place
//! where the caller cannot know yet — the device's VERSION reply — is what [`detect_kind`] is for.
//!
//! ```text
//! v1:  0: u32 protocol | 4: u32 total_len
//! v2:  0: u32 protocol | 4: u32 total_len | 8: u32 magic 0xFEEDFACE | 12: u16 tx_seq | 14: u16 rx_seq
//! ```
//!
//! All fields are big-endian. `total_len` counts the whole packet: mux header, protocol header and
//! payload.

use super::{read_u16, read_u32, write_u16, write_u32, Error, Result};

/// Length of the v1 ("old") mux header: protocol and total length only. Used for the host's first
/// VERSION packet and, with major-1 devices, for everything.
pub const V1_HEADER_LEN: usize = 8;

/// Length of the v2 mux header: v1 plus magic and the two sequence counters. Used for every packet
/// after a major-2 VERSION reply, starting with SETUP.
pub const V2_HEADER_LEN: usize = 16;

/// The constant at offset 8 of every v2 header. Its presence is also how [`detect_kind`] guesses
/// the form of a VERSION reply.
pub const MAGIC: u32 = 0xFEED_FACE;

/// Largest whole mux packet (all headers included) a phone accepts in one OUT transfer; anything
/// longer is answered with CONTROL "message was too large" (PROTOCOL.md §5.15). The view does not
/// enforce it: that is the framing layer's decision.
pub const MAX_PACKET_LEN: usize = 65535;

/// The single payload byte of the SETUP packet (mux protocol 2) the host sends right after a
/// major-2 VERSION reply.
pub const SETUP_PAYLOAD: u8 = 0x07;

enum_with_unknown! {
    /// What follows the mux header, from its `protocol` field (u32, big-endian).
    ///
    /// An `Unknown` protocol parses fine at this layer; the session decides whether to drop it.
    pub enum Protocol(u32) {
        /// Version negotiation: a 12-byte [`super::version`] body.
        Version = 0,
        /// Device-to-host diagnostics: a [`super::control`] body (type byte + text).
        Control = 1,
        /// Host-to-device "start v2 framing": payload is the single byte [`SETUP_PAYLOAD`].
        Setup = 2,
        /// Pseudo-TCP: a 20-byte [`super::tcp`] header and data (value = IPPROTO_TCP).
        Tcp = 6,
    }
}

/// Which of the two mux header forms a packet uses.
///
/// Not encoded in the packet itself: it follows from the negotiated version (v1 before the VERSION
/// reply and with major-1 devices, v2 after a major-2 reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HeaderKind {
    /// 8-byte header: protocol and total length.
    V1,
    /// 16-byte header: v1 plus magic, tx_seq and rx_seq.
    V2,
}

impl HeaderKind {
    /// Length in bytes of this header form ([`V1_HEADER_LEN`] or [`V2_HEADER_LEN`]).
    pub const fn header_len(self) -> usize {
        match self {
            HeaderKind::V1 => V1_HEADER_LEN,
            HeaderKind::V2 => V2_HEADER_LEN,
        }
    }
}

/// Guesses the header form of a packet whose form the caller cannot know, i.e. the device's
/// VERSION reply.
///
/// Returns [`HeaderKind::V2`] iff at least 12 bytes are present and bytes 8..12 hold [`MAGIC`]
/// (big-endian); otherwise [`HeaderKind::V1`]. Real devices answer with a v1 header (PROTOCOL.md
/// §1.1); this is a defensive fallback, never used once the form is negotiated. It never panics.
pub fn detect_kind(bytes: &[u8]) -> HeaderKind {
    match bytes.get(field::MAGIC) {
        Some(magic) if read_u32(magic) == MAGIC => HeaderKind::V2,
        _ => HeaderKind::V1,
    }
}

mod field {
    use core::ops::Range;

    pub const PROTOCOL: Range<usize> = 0..4;
    pub const LENGTH: Range<usize> = 4..8;
    pub const MAGIC: Range<usize> = 8..12;
    pub const TX_SEQ: Range<usize> = 12..14;
    pub const RX_SEQ: Range<usize> = 14..16;
}

/// A read/write view of a mux packet (header and payload) in a byte buffer.
///
/// The buffer may be longer than the packet (a reassembly buffer, a transfer buffer): the packet
/// ends at its `total_len` field, and [`Packet::payload`] stops there.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
    kind: HeaderKind,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without any check.
    ///
    /// For buffers this crate is about to fill (with [`Repr::emit`]). Never use it on bytes from a
    /// peer: accessors on an unchecked view may panic.
    pub const fn new_unchecked(buffer: T, kind: HeaderKind) -> Self {
        Packet { buffer, kind }
    }

    /// Wraps a buffer and validates it with [`Packet::check_len`]: the only way to read untrusted
    /// bytes.
    pub fn new_checked(buffer: T, kind: HeaderKind) -> Result<Self> {
        let packet = Self::new_unchecked(buffer, kind);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that every accessor is safe to call: the buffer holds the whole header, and the
    /// `total_len` field is at least the header length and at most the buffer length.
    ///
    /// It does not check the magic (a v2 packet with a wrong magic still has well-defined fields;
    /// [`Repr::parse`] rejects it) nor [`MAX_PACKET_LEN`].
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        let header_len = self.kind.header_len();
        if len < header_len {
            return Err(Error);
        }
        let total_len = usize::try_from(self.total_len()).map_err(|_| Error)?;
        if total_len < header_len || total_len > len {
            return Err(Error);
        }
        Ok(())
    }

    /// Gives the buffer back, e.g. to reuse it for the next packet.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The header form this view was created with.
    pub fn kind(&self) -> HeaderKind {
        self.kind
    }

    /// Length of this view's header: 8 for v1, 16 for v2.
    pub fn header_len(&self) -> usize {
        self.kind.header_len()
    }

    /// The `protocol` field: what follows the header.
    pub fn protocol(&self) -> Protocol {
        Protocol::from(read_u32(&self.buffer.as_ref()[field::PROTOCOL]))
    }

    /// The raw `total_len` field: the whole packet, headers included.
    pub fn total_len(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::LENGTH])
    }

    /// The `magic` field of a v2 header ([`MAGIC`] in a well-formed one).
    ///
    /// A v1 header has no such field: returns 0 for a v1 view (never reads the payload).
    pub fn magic(&self) -> u32 {
        match self.kind {
            HeaderKind::V1 => 0,
            HeaderKind::V2 => read_u32(&self.buffer.as_ref()[field::MAGIC]),
        }
    }

    /// The sender's packet counter (`tx_seq`) of a v2 header. Informational only: nothing is
    /// retransmitted or reordered with it (PROTOCOL.md §1.2).
    ///
    /// Returns 0 for a v1 view, which has no such field.
    pub fn tx_seq(&self) -> u16 {
        match self.kind {
            HeaderKind::V1 => 0,
            HeaderKind::V2 => read_u16(&self.buffer.as_ref()[field::TX_SEQ]),
        }
    }

    /// The `rx_seq` field of a v2 header: the last `tx_seq` the sender saw from us (0xFFFF
    /// before any). Informational only.
    ///
    /// Returns 0 for a v1 view, which has no such field.
    pub fn rx_seq(&self) -> u16 {
        match self.kind {
            HeaderKind::V1 => 0,
            HeaderKind::V2 => read_u16(&self.buffer.as_ref()[field::RX_SEQ]),
        }
    }

    /// `total_len` as an index; saturates so that an unchecked view fails a slice bound instead of
    /// wrapping on a 16-bit target.
    fn total_len_usize(&self) -> usize {
        usize::try_from(self.total_len()).unwrap_or(usize::MAX)
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The bytes after the header up to `total_len`, borrowed from the underlying buffer (not from
    /// the view), so they outlive it. Bytes in the buffer beyond `total_len` are not included.
    pub fn payload(&self) -> &'a [u8] {
        let start = self.header_len();
        let end = self.total_len_usize();
        let data = self.buffer.as_ref();
        &data[start..end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the `protocol` field.
    pub fn set_protocol(&mut self, value: Protocol) {
        write_u32(&mut self.buffer.as_mut()[field::PROTOCOL], value.into());
    }

    /// Writes the raw `total_len` field (whole packet, headers included). [`Packet::payload_mut`]
    /// uses it, so set it first.
    pub fn set_total_len(&mut self, value: u32) {
        write_u32(&mut self.buffer.as_mut()[field::LENGTH], value);
    }

    /// Writes the `magic` field of a v2 header. Does nothing on a v1 view (it would overwrite the
    /// payload).
    pub fn set_magic(&mut self, value: u32) {
        if self.kind == HeaderKind::V2 {
            write_u32(&mut self.buffer.as_mut()[field::MAGIC], value);
        }
    }

    /// Writes the `tx_seq` field of a v2 header. Does nothing on a v1 view.
    pub fn set_tx_seq(&mut self, value: u16) {
        if self.kind == HeaderKind::V2 {
            write_u16(&mut self.buffer.as_mut()[field::TX_SEQ], value);
        }
    }

    /// Writes the `rx_seq` field of a v2 header. Does nothing on a v1 view.
    pub fn set_rx_seq(&mut self, value: u16) {
        if self.kind == HeaderKind::V2 {
            write_u16(&mut self.buffer.as_mut()[field::RX_SEQ], value);
        }
    }

    /// The bytes after the header up to `total_len`, for the caller to fill after
    /// [`Repr::emit`]. Panics if `total_len` contradicts the buffer, which cannot happen after
    /// `emit` into a buffer of at least `buffer_len()` bytes or after `check_len`.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        let end = self.total_len_usize();
        &mut self.buffer.as_mut()[start..end]
    }
}

/// The two v2 sequence counters, as carried in a header.
///
/// Both wrap at `u16`. See PROTOCOL.md §1.2 for how each side advances them; the wire layer only
/// carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MuxSeq {
    /// Sender's counter: 0 on SETUP, +1 per packet sent.
    pub tx: u16,
    /// Last `tx` the sender received from its peer (0xFFFF before any).
    pub rx: u16,
}

/// A parsed mux header: what the session reasons about instead of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Repr {
    /// What follows the header.
    pub protocol: Protocol,
    /// Bytes after the mux header (protocol header and data), i.e. `total_len - header_len`.
    pub payload_len: usize,
    /// The v2 counters; `Some` means a v2 (16-byte) header, `None` a v1 (8-byte) one.
    pub seq: Option<MuxSeq>,
}

impl Repr {
    /// Parses a checked or unchecked view: calls [`Packet::check_len`] itself, and additionally
    /// rejects a v2 header whose magic is not [`MAGIC`] (the stream is out of sync).
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&T>) -> Result<Repr> {
        packet.check_len()?;
        let seq = match packet.kind() {
            HeaderKind::V1 => None,
            HeaderKind::V2 => {
                if packet.magic() != MAGIC {
                    return Err(Error);
                }
                Some(MuxSeq {
                    tx: packet.tx_seq(),
                    rx: packet.rx_seq(),
                })
            }
        };
        Ok(Repr {
            protocol: packet.protocol(),
            payload_len: packet.payload().len(),
            seq,
        })
    }

    /// The header form this representation emits: v2 iff `seq` is `Some`.
    pub const fn kind(&self) -> HeaderKind {
        match self.seq {
            Some(_) => HeaderKind::V2,
            None => HeaderKind::V1,
        }
    }

    /// Length of the header this representation emits (8 or 16).
    pub const fn header_len(&self) -> usize {
        self.kind().header_len()
    }

    /// Length of the whole packet: header plus `payload_len`. The caller keeps it at most
    /// [`MAX_PACKET_LEN`] for anything sent to a phone.
    pub const fn buffer_len(&self) -> usize {
        self.header_len().saturating_add(self.payload_len)
    }

    /// Writes the header: protocol, `total_len = buffer_len()` and, for v2, the magic and both
    /// counters. The payload is left to the caller, through [`Packet::payload_mut`].
    ///
    /// Create the view with `Packet::new_unchecked(buf, repr.kind())`; should its kind differ,
    /// `emit` switches the view to `self.kind()` so that `payload_mut` addresses the right bytes.
    /// Cannot fail on a buffer of at least `buffer_len()` bytes (panics on a shorter one).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.kind = self.kind();
        packet.set_protocol(self.protocol);
        packet.set_total_len(u32::try_from(self.buffer_len()).unwrap_or(u32::MAX));
        if let Some(seq) = self.seq {
            packet.set_magic(MAGIC);
            packet.set_tx_seq(seq.tx);
            packet.set_rx_seq(seq.rx);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// PROTOCOL.md §6.3: the host's VERSION packet, v1 header.
    static VERSION_BYTES: [u8; 20] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// PROTOCOL.md §6.4: the host's SETUP packet, v2 header, tx 0, rx 0xFFFF.
    static SETUP_BYTES: [u8; 17] = [
        0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x11, 0xfe, 0xed, 0xfa, 0xce, 0x00, 0x00, 0xff,
        0xff, 0x07,
    ];

    /// PROTOCOL.md §6.5: the first SYN, v2 header (tx 1, rx 0xFFFF) + 20-byte TCP header.
    static SYN_BYTES: [u8; 36] = [
        0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x24, 0xfe, 0xed, 0xfa, 0xce, 0x00, 0x01, 0xff,
        0xff, 0x00, 0x01, 0xf2, 0x7e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x50, 0x02,
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    static VERSION_BODY: [u8; 12] = [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0];

    fn setup_repr() -> Repr {
        Repr {
            protocol: Protocol::Setup,
            payload_len: 1,
            seq: Some(MuxSeq { tx: 0, rx: 0xffff }),
        }
    }

    #[test]
    fn test_deconstruct_v1() {
        let packet = Packet::new_checked(&VERSION_BYTES[..], HeaderKind::V1).expect("valid");
        assert_eq!(packet.kind(), HeaderKind::V1);
        assert_eq!(packet.header_len(), 8);
        assert_eq!(packet.protocol(), Protocol::Version);
        assert_eq!(packet.total_len(), 20);
        // No v2 fields in a v1 header, even though the payload has bytes there.
        assert_eq!(packet.magic(), 0);
        assert_eq!(packet.tx_seq(), 0);
        assert_eq!(packet.rx_seq(), 0);
        assert_eq!(packet.payload(), &VERSION_BODY[..]);
    }

    #[test]
    fn test_deconstruct_v2() {
        let packet = Packet::new_checked(&SETUP_BYTES[..], HeaderKind::V2).expect("valid");
        assert_eq!(packet.kind(), HeaderKind::V2);
        assert_eq!(packet.header_len(), 16);
        assert_eq!(packet.protocol(), Protocol::Setup);
        assert_eq!(packet.total_len(), 17);
        assert_eq!(packet.magic(), MAGIC);
        assert_eq!(packet.tx_seq(), 0);
        assert_eq!(packet.rx_seq(), 0xffff);
        assert_eq!(packet.payload(), &[SETUP_PAYLOAD][..]);

        let packet = Packet::new_checked(&SYN_BYTES[..], HeaderKind::V2).expect("valid");
        assert_eq!(packet.protocol(), Protocol::Tcp);
        assert_eq!(packet.total_len(), 36);
        assert_eq!(packet.tx_seq(), 1);
        assert_eq!(packet.rx_seq(), 0xffff);
        assert_eq!(packet.payload(), &SYN_BYTES[16..]);
    }

    #[test]
    fn test_payload_stops_at_total_len() {
        let mut bytes = [0u8; 24];
        bytes[..17].copy_from_slice(&SETUP_BYTES);
        let packet = Packet::new_checked(&bytes[..], HeaderKind::V2).expect("valid");
        assert_eq!(packet.payload(), &[SETUP_PAYLOAD][..]);
        let repr = Repr::parse(&packet).expect("parses");
        assert_eq!(repr.payload_len, 1);
    }

    #[test]
    fn test_construct_v1() {
        let mut bytes = [0xa5u8; 20];
        let mut packet = Packet::new_unchecked(&mut bytes[..], HeaderKind::V1);
        packet.set_protocol(Protocol::Version);
        packet.set_total_len(20);
        // No-ops on a v1 view: must not clobber the payload.
        packet.set_magic(MAGIC);
        packet.set_tx_seq(0x1234);
        packet.set_rx_seq(0x5678);
        packet.payload_mut().copy_from_slice(&VERSION_BODY);
        assert_eq!(bytes, VERSION_BYTES);
    }

    #[test]
    fn test_construct_v2() {
        let mut bytes = [0xa5u8; 17];
        let mut packet = Packet::new_unchecked(&mut bytes[..], HeaderKind::V2);
        packet.set_protocol(Protocol::Setup);
        packet.set_total_len(17);
        packet.set_magic(MAGIC);
        packet.set_tx_seq(0);
        packet.set_rx_seq(0xffff);
        packet.payload_mut()[0] = SETUP_PAYLOAD;
        assert_eq!(packet.into_inner(), &SETUP_BYTES[..]);
    }

    #[test]
    fn test_truncated() {
        for len in 0..VERSION_BYTES.len() {
            assert_eq!(
                Packet::new_checked(&VERSION_BYTES[..len], HeaderKind::V1),
                Err(Error),
                "len {len}"
            );
        }
        for len in 0..SETUP_BYTES.len() {
            assert_eq!(
                Packet::new_checked(&SETUP_BYTES[..len], HeaderKind::V2),
                Err(Error),
                "len {len}"
            );
        }
        for len in 0..SYN_BYTES.len() {
            assert_eq!(
                Packet::new_checked(&SYN_BYTES[..len], HeaderKind::V2),
                Err(Error),
                "len {len}"
            );
        }
    }

    #[test]
    fn test_impossible_len() {
        // total_len below the header length.
        for total in [0u32, 7] {
            let mut bytes = VERSION_BYTES;
            bytes[4..8].copy_from_slice(&total.to_be_bytes());
            assert_eq!(Packet::new_checked(&bytes[..], HeaderKind::V1), Err(Error));
        }
        // A v1-sized length in a v2 header is still too short for it.
        for total in [8u32, 15] {
            let mut bytes = SETUP_BYTES;
            bytes[4..8].copy_from_slice(&total.to_be_bytes());
            assert_eq!(Packet::new_checked(&bytes[..], HeaderKind::V2), Err(Error));
        }
        // total_len beyond the buffer.
        for total in [18u32, 0xffff, u32::MAX] {
            let mut bytes = SETUP_BYTES;
            bytes[4..8].copy_from_slice(&total.to_be_bytes());
            let packet = Packet::new_unchecked(&bytes[..], HeaderKind::V2);
            assert_eq!(packet.check_len(), Err(Error));
            assert_eq!(Repr::parse(&packet), Err(Error));
        }
        // Exactly a header and nothing else is fine.
        let mut bytes = SETUP_BYTES;
        bytes[4..8].copy_from_slice(&16u32.to_be_bytes());
        let packet = Packet::new_checked(&bytes[..], HeaderKind::V2).expect("valid");
        assert_eq!(packet.payload(), &[][..]);
    }

    #[test]
    fn test_parse_v1() {
        let packet = Packet::new_checked(&VERSION_BYTES[..], HeaderKind::V1).expect("valid");
        assert_eq!(
            Repr::parse(&packet),
            Ok(Repr {
                protocol: Protocol::Version,
                payload_len: 12,
                seq: None,
            })
        );
    }

    #[test]
    fn test_parse_v2() {
        let packet = Packet::new_checked(&SETUP_BYTES[..], HeaderKind::V2).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(setup_repr()));

        let packet = Packet::new_checked(&SYN_BYTES[..], HeaderKind::V2).expect("valid");
        assert_eq!(
            Repr::parse(&packet),
            Ok(Repr {
                protocol: Protocol::Tcp,
                payload_len: 20,
                seq: Some(MuxSeq { tx: 1, rx: 0xffff }),
            })
        );
    }

    #[test]
    fn test_parse_wrong_magic() {
        let mut bytes = SETUP_BYTES;
        bytes[11] = 0xcf;
        // The fields are readable ...
        let packet = Packet::new_checked(&bytes[..], HeaderKind::V2).expect("lengths are fine");
        assert_eq!(packet.magic(), 0xfeed_facf);
        // ... but it is not a v2 packet.
        assert_eq!(Repr::parse(&packet), Err(Error));
    }

    #[test]
    fn test_emit_v1() {
        let repr = Repr {
            protocol: Protocol::Version,
            payload_len: 12,
            seq: None,
        };
        assert_eq!(repr.kind(), HeaderKind::V1);
        assert_eq!(repr.header_len(), 8);
        assert_eq!(repr.buffer_len(), 20);
        let mut bytes = [0xa5u8; 20];
        let mut packet = Packet::new_unchecked(&mut bytes[..], repr.kind());
        repr.emit(&mut packet);
        packet.payload_mut().copy_from_slice(&VERSION_BODY);
        assert_eq!(bytes, VERSION_BYTES);
    }

    #[test]
    fn test_emit_v2() {
        let repr = setup_repr();
        assert_eq!(repr.kind(), HeaderKind::V2);
        assert_eq!(repr.header_len(), 16);
        assert_eq!(repr.buffer_len(), 17);
        let mut bytes = [0xa5u8; 17];
        let mut packet = Packet::new_unchecked(&mut bytes[..], repr.kind());
        repr.emit(&mut packet);
        assert_eq!(packet.payload_mut().len(), 1);
        packet.payload_mut()[0] = SETUP_PAYLOAD;
        assert_eq!(bytes, SETUP_BYTES);
    }

    #[test]
    fn test_emit_fixes_mismatched_kind() {
        let repr = setup_repr();
        let mut bytes = [0xa5u8; 17];
        let mut packet = Packet::new_unchecked(&mut bytes[..], HeaderKind::V1);
        repr.emit(&mut packet);
        assert_eq!(packet.kind(), HeaderKind::V2);
        packet.payload_mut()[0] = SETUP_PAYLOAD;
        assert_eq!(bytes, SETUP_BYTES);
    }

    #[test]
    fn test_emit_parse_round_trip_larger_buffer() {
        let repr = Repr {
            protocol: Protocol::Tcp,
            payload_len: 20,
            seq: Some(MuxSeq { tx: 0xfffe, rx: 3 }),
        };
        let mut bytes = [0xa5u8; 64];
        let mut packet = Packet::new_unchecked(&mut bytes[..], repr.kind());
        repr.emit(&mut packet);
        assert_eq!(packet.payload_mut().len(), 20);
        let packet = Packet::new_checked(&bytes[..], HeaderKind::V2).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(repr));
    }

    #[test]
    fn test_unknown_protocol() {
        let mut bytes = SETUP_BYTES;
        bytes[0..4].copy_from_slice(&[0x00, 0x00, 0x01, 0x09]);
        let packet = Packet::new_checked(&bytes[..], HeaderKind::V2).expect("valid");
        assert_eq!(packet.protocol(), Protocol::Unknown(0x109));
        let repr = Repr::parse(&packet).expect("unknown protocols parse");
        assert_eq!(repr.protocol, Protocol::Unknown(0x109));

        let mut out = [0xa5u8; 17];
        let mut packet = Packet::new_unchecked(&mut out[..], repr.kind());
        repr.emit(&mut packet);
        packet.payload_mut()[0] = SETUP_PAYLOAD;
        assert_eq!(out, bytes);

        assert_eq!(Protocol::from(0u32), Protocol::Version);
        assert_eq!(Protocol::from(1u32), Protocol::Control);
        assert_eq!(Protocol::from(2u32), Protocol::Setup);
        assert_eq!(Protocol::from(6u32), Protocol::Tcp);
        assert_eq!(Protocol::from(3u32), Protocol::Unknown(3));
        assert_eq!(u32::from(Protocol::Tcp), 6);
        assert_eq!(u32::from(Protocol::Unknown(77)), 77);
    }

    #[test]
    fn test_detect_kind() {
        assert_eq!(detect_kind(&VERSION_BYTES), HeaderKind::V1);
        assert_eq!(detect_kind(&SETUP_BYTES), HeaderKind::V2);
        assert_eq!(detect_kind(&SETUP_BYTES[..12]), HeaderKind::V2);
        for len in 0..12 {
            assert_eq!(detect_kind(&SETUP_BYTES[..len]), HeaderKind::V1);
        }
        // A VERSION reply sent (unusually) with a v2 header.
        let mut reply = [0u8; 28];
        reply[4..8].copy_from_slice(&28u32.to_be_bytes());
        reply[8..12].copy_from_slice(&MAGIC.to_be_bytes());
        reply[14..16].copy_from_slice(&[0xff, 0xff]);
        reply[16..20].copy_from_slice(&2u32.to_be_bytes());
        let kind = detect_kind(&reply);
        assert_eq!(kind, HeaderKind::V2);
        let packet = Packet::new_checked(&reply[..], kind).expect("valid");
        assert_eq!(packet.protocol(), Protocol::Version);
        assert_eq!(&packet.payload()[..4], &[0, 0, 0, 2]);
    }

    #[test]
    fn test_header_kind_len() {
        assert_eq!(HeaderKind::V1.header_len(), V1_HEADER_LEN);
        assert_eq!(HeaderKind::V2.header_len(), V2_HEADER_LEN);
    }
}
