//! The pseudo-TCP header: 20 bytes after a mux header with protocol 6 (`shared/PROTOCOL.md` §1.5).
//!
//! ```text
//!  0: u16 src_port | 2: u16 dst_port | 4: u32 seq | 8: u32 ack
//! 12: u8 data offset (high nibble) | 13: u8 flags | 14: u16 window (x256 bytes)
//! 16: u16 checksum (0, ignored) | 18: u16 urgent (0, ignored)        (all big-endian)
//! ```
//!
//! It is the layout of a real TCP header, but nothing else is: there is no IP header, no
//! checksum, no retransmission, no options (a data offset above 5 is tolerated and the options
//! skipped unread), and the window counts **256-byte units**. Ports and sequence numbers identify
//! and order a connection as usual.

use core::fmt;
use core::ops;

use super::{read_u16, read_u32, write_u16, write_u32, Error, Result};

/// Length of the header this crate emits (data offset 5, no options), and the minimum accepted.
pub const HEADER_LEN: usize = 20;

/// The data-offset byte this crate emits: 5 words in the high nibble, reserved bits 0.
const DATA_OFFSET_5: u8 = 0x50;

/// The TCP flags byte (offset 13).
///
/// A plain bit set: any combination, including ones that make no sense and bits this crate has no
/// name for, is representable, because judging flags is the connection state machine's job
/// (PROTOCOL.md decisions table, "flags").
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Flags(u8);

impl Flags {
    /// No flag set.
    pub const NONE: Flags = Flags(0);
    /// End of the sender's stream. Peers answer it with RST (there is no half-close here).
    pub const FIN: Flags = Flags(0x01);
    /// Opens a connection (host to device), or with ACK accepts one.
    pub const SYN: Flags = Flags(0x02);
    /// Aborts a connection; its payload, if any, is a human-readable reason.
    pub const RST: Flags = Flags(0x04);
    /// Push: meaningless over USB, but some peers set it on data; accepted with ACK.
    pub const PSH: Flags = Flags(0x08);
    /// The ack field is valid; set on every packet after the SYN.
    pub const ACK: Flags = Flags(0x10);

    /// The raw byte, for the wire.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// From the raw byte; every value is accepted, unnamed bits included.
    pub const fn from_bits(bits: u8) -> Self {
        Flags(bits)
    }

    /// Whether every bit of `other` is set in `self` (true for an empty `other`). To test for an
    /// *exact* combination, compare with `==` instead.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is set in `self`.
    pub const fn intersects(self, other: Flags) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The bits of both; the `const` form of `|`.
    pub const fn union(self, other: Flags) -> Self {
        Flags(self.0 | other.0)
    }
}

impl ops::BitOr for Flags {
    type Output = Flags;

    fn bitor(self, rhs: Flags) -> Flags {
        self.union(rhs)
    }
}

impl ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        *self = self.union(rhs);
    }
}

/// Renders `SYN|ACK`, lowest bit first; unnamed bits as one hex group (`ACK|0x20`); no bits as
/// `none`.
impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Flags, &str); 5] = [
            (Flags::FIN, "FIN"),
            (Flags::SYN, "SYN"),
            (Flags::RST, "RST"),
            (Flags::PSH, "PSH"),
            (Flags::ACK, "ACK"),
        ];
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        let mut rest = self.0;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !flag.0;
            }
        }
        if rest != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#04x}")?;
        }
        Ok(())
    }
}

/// `Flags(SYN|ACK)`: the names, not the number, so test failures read well.
impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flags({self})")
    }
}

mod field {
    use core::ops::Range;

    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const SEQ_NUM: Range<usize> = 4..8;
    pub const ACK_NUM: Range<usize> = 8..12;
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WIN_SIZE: Range<usize> = 14..16;
    pub const CHECKSUM: Range<usize> = 16..18;
    pub const URGENT: Range<usize> = 18..20;
}

/// A read/write view of a pseudo-TCP segment (header and data) in a byte buffer, normally a mux
/// payload.
///
/// The data runs to the end of the buffer, so build the view over exactly the mux payload.
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

    /// Checks that every accessor is safe to call: at least [`HEADER_LEN`] bytes, a data offset
    /// of at least 5 words, and a header (options included) that fits in the buffer.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error);
        }
        let header_len = self.header_len();
        if header_len < HEADER_LEN || header_len > len {
            return Err(Error);
        }
        Ok(())
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port: the sender's end of the connection (the host allocates its ports).
    pub fn src_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::SRC_PORT])
    }

    /// Destination port: the receiver's end (a device service port such as 62078 for packets
    /// from the host).
    pub fn dst_port(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::DST_PORT])
    }

    /// Sequence number of the first data byte (of the SYN itself on a SYN).
    pub fn seq_number(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::SEQ_NUM])
    }

    /// Acknowledgement number: next byte the sender expects. Meaningful when ACK is set.
    pub fn ack_number(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::ACK_NUM])
    }

    /// Header length in bytes, from the data offset (high nibble of byte 12) times 4: 0 to 60.
    /// Anything beyond 20 bytes is options, which are skipped and never interpreted.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFF] >> 4) * 4
    }

    /// The flags byte.
    pub fn flags(&self) -> Flags {
        Flags::from_bits(self.buffer.as_ref()[field::FLAGS])
    }

    /// The raw window field, in **256-byte units** (bytes = value << 8).
    pub fn window_len(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::WIN_SIZE])
    }

    /// The checksum field: always sent as 0, never verified (USB is checked by the bus).
    pub fn checksum(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::CHECKSUM])
    }

    /// The urgent pointer: always sent as 0, ignored.
    pub fn urgent(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::URGENT])
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The data after the header (and any options) to the end of the buffer, borrowed from the
    /// underlying buffer. A RST's data is its reason text.
    pub fn payload(&self) -> &'a [u8] {
        let header_len = self.header_len();
        let data = self.buffer.as_ref();
        &data[header_len..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the source port.
    pub fn set_src_port(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::SRC_PORT], value);
    }

    /// Writes the destination port.
    pub fn set_dst_port(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::DST_PORT], value);
    }

    /// Writes the sequence number.
    pub fn set_seq_number(&mut self, value: u32) {
        write_u32(&mut self.buffer.as_mut()[field::SEQ_NUM], value);
    }

    /// Writes the acknowledgement number.
    pub fn set_ack_number(&mut self, value: u32) {
        write_u32(&mut self.buffer.as_mut()[field::ACK_NUM], value);
    }

    /// Writes the header length, given in **bytes** (a multiple of 4 from 20 to 60; this crate
    /// only ever writes 20), as the data offset in the high nibble of byte 12. The low nibble
    /// (reserved bits) is preserved; bits of `value / 4` above the nibble are dropped.
    pub fn set_header_len(&mut self, value: u8) {
        let byte = &mut self.buffer.as_mut()[field::DATA_OFF];
        *byte = (*byte & 0x0f) | (((value / 4) & 0x0f) << 4);
    }

    /// Writes the flags byte.
    pub fn set_flags(&mut self, value: Flags) {
        self.buffer.as_mut()[field::FLAGS] = value.bits();
    }

    /// Writes the raw window field, in 256-byte units.
    pub fn set_window_len(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::WIN_SIZE], value);
    }

    /// Writes the checksum field (0 in everything this crate sends).
    pub fn set_checksum(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::CHECKSUM], value);
    }

    /// Writes the urgent pointer (0 in everything this crate sends).
    pub fn set_urgent(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::URGENT], value);
    }

    /// The data area after the header (per the current data offset) to the end of the buffer.
    /// Set the header length first (or use [`Repr::emit`]).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let header_len = self.header_len();
        &mut self.buffer.as_mut()[header_len..]
    }
}

/// A parsed pseudo-TCP segment, borrowing its data from the packet buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Repr<'a> {
    /// Sender's port.
    pub src_port: u16,
    /// Receiver's port.
    pub dst_port: u16,
    /// Sequence number of the first data byte.
    pub seq: u32,
    /// Acknowledgement number (meaningful with ACK).
    pub ack: u32,
    /// Flags, any combination (judged by the state machine, not here).
    pub flags: Flags,
    /// The raw wire window in **256-byte units**; see [`Repr::window_bytes`].
    pub window: u16,
    /// The data (a RST's reason text, for a RST).
    pub payload: &'a [u8],
}

impl<'a> Repr<'a> {
    /// Parses a view (checking its length itself). Any flags combination parses; options are
    /// skipped; checksum and urgent pointer are ignored.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Repr<'a>> {
        packet.check_len()?;
        Ok(Repr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            seq: packet.seq_number(),
            ack: packet.ack_number(),
            flags: packet.flags(),
            window: packet.window_len(),
            payload: packet.payload(),
        })
    }

    /// The advertised window in bytes (`window << 8`, at most 16 MiB - 256).
    pub fn window_bytes(&self) -> u32 {
        u32::from(self.window) << 8
    }

    /// Length of the header [`Repr::emit`] writes: always [`HEADER_LEN`] (no options).
    pub const fn header_len() -> usize {
        HEADER_LEN
    }

    /// Bytes [`Repr::emit`] writes: header plus data.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Writes the header (data offset 5, i.e. byte 0x50; checksum 0; urgent 0) and copies the
    /// data after it. Cannot fail on a buffer of at least `buffer_len()` bytes; bytes beyond are
    /// left untouched, so size the buffer (and the mux `payload_len`) to exactly `buffer_len()`,
    /// since the data runs to the buffer's end.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_seq_number(self.seq);
        packet.set_ack_number(self.ack);
        packet.buffer.as_mut()[field::DATA_OFF] = DATA_OFFSET_5;
        packet.set_flags(self.flags);
        packet.set_window_len(self.window);
        packet.set_checksum(0);
        packet.set_urgent(0);
        packet.payload_mut()[..self.payload.len()].copy_from_slice(self.payload);
    }
}

/// One log line: `TCP 1 -> 62078 seq=0 ack=0 SYN win=512 len=0` (window in raw units).
impl fmt::Display for Repr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TCP {} -> {} seq={} ack={} {} win={} len={}",
            self.src_port,
            self.dst_port,
            self.seq,
            self.ack,
            self.flags,
            self.window,
            self.payload.len()
        )
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::wire::mux;

    /// PROTOCOL.md §6.5: the host's first SYN, v2 mux header + TCP header.
    static SYN_PACKET_BYTES: [u8; 36] = [
        0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x24, 0xfe, 0xed, 0xfa, 0xce, 0x00, 0x01, 0xff,
        0xff, 0x00, 0x01, 0xf2, 0x7e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x50, 0x02,
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// Device to host data: sport 62078, dport 1, seq 1, ack 289, ACK|PSH, window 0x0200,
    /// checksum/urgent 0, payload "hello".
    static DATA_BYTES: [u8; 25] = [
        0xf2, 0x7e, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x01, 0x21, 0x50, 0x18, 0x02,
        0x00, 0x00, 0x00, 0x00, 0x00, b'h', b'e', b'l', b'l', b'o',
    ];

    static PAYLOAD: &[u8] = b"hello";

    fn syn_bytes() -> &'static [u8] {
        &SYN_PACKET_BYTES[16..]
    }

    fn syn_repr() -> Repr<'static> {
        Repr {
            src_port: 1,
            dst_port: 62078,
            seq: 0,
            ack: 0,
            flags: Flags::SYN,
            window: 0x0200,
            payload: &[],
        }
    }

    fn data_repr() -> Repr<'static> {
        Repr {
            src_port: 62078,
            dst_port: 1,
            seq: 1,
            ack: 289,
            flags: Flags::ACK | Flags::PSH,
            window: 0x0200,
            payload: PAYLOAD,
        }
    }

    #[test]
    fn test_deconstruct() {
        let packet = Packet::new_checked(syn_bytes()).expect("valid");
        assert_eq!(packet.src_port(), 1);
        assert_eq!(packet.dst_port(), 62078);
        assert_eq!(packet.seq_number(), 0);
        assert_eq!(packet.ack_number(), 0);
        assert_eq!(packet.header_len(), 20);
        assert_eq!(packet.flags(), Flags::SYN);
        assert_eq!(packet.window_len(), 0x0200);
        assert_eq!(packet.checksum(), 0);
        assert_eq!(packet.urgent(), 0);
        assert_eq!(packet.payload(), &[][..]);

        let packet = Packet::new_checked(&DATA_BYTES[..]).expect("valid");
        assert_eq!(packet.src_port(), 62078);
        assert_eq!(packet.dst_port(), 1);
        assert_eq!(packet.seq_number(), 1);
        assert_eq!(packet.ack_number(), 289);
        assert_eq!(packet.flags(), Flags::from_bits(0x18));
        assert_eq!(packet.window_len(), 0x0200);
        assert_eq!(packet.payload(), PAYLOAD);
    }

    #[test]
    fn test_construct() {
        let mut bytes = [0xa5u8; 25];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_src_port(62078);
        packet.set_dst_port(1);
        packet.set_seq_number(1);
        packet.set_ack_number(289);
        // The reserved low nibble is preserved by set_header_len, so clear it first.
        packet.buffer[field::DATA_OFF] = 0;
        packet.set_header_len(20);
        packet.set_flags(Flags::ACK | Flags::PSH);
        packet.set_window_len(0x0200);
        packet.set_checksum(0);
        packet.set_urgent(0);
        packet.payload_mut().copy_from_slice(PAYLOAD);
        assert_eq!(bytes, DATA_BYTES);
    }

    #[test]
    fn test_set_header_len_keeps_low_nibble() {
        let mut bytes = [0u8; 24];
        bytes[field::DATA_OFF] = 0x0a;
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_header_len(24);
        assert_eq!(packet.header_len(), 24);
        assert_eq!(bytes[field::DATA_OFF], 0x6a);
    }

    #[test]
    fn test_truncated() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&DATA_BYTES[..len]),
                Err(Error),
                "len {len}"
            );
            assert_eq!(
                Repr::parse(&Packet::new_unchecked(&DATA_BYTES[..len])),
                Err(Error)
            );
        }
        // Past the header, a shorter buffer is a shorter payload (the mux length delimits it).
        for len in HEADER_LEN..DATA_BYTES.len() {
            let packet = Packet::new_checked(&DATA_BYTES[..len]).expect("valid");
            assert_eq!(packet.payload(), &PAYLOAD[..len - HEADER_LEN]);
        }
    }

    #[test]
    fn test_impossible_len() {
        // Data offset below 5 words.
        for offset in 0u8..5 {
            let mut bytes = DATA_BYTES;
            bytes[field::DATA_OFF] = offset << 4;
            assert_eq!(
                Packet::new_checked(&bytes[..]),
                Err(Error),
                "offset {offset}"
            );
        }
        // Data offset beyond the buffer.
        let mut bytes = DATA_BYTES;
        bytes[field::DATA_OFF] = 0x70; // 28 bytes > 25
        assert_eq!(Packet::new_checked(&bytes[..]), Err(Error));
        bytes[field::DATA_OFF] = 0xf0; // 60 bytes
        assert_eq!(Packet::new_checked(&bytes[..]), Err(Error));
        assert_eq!(Repr::parse(&Packet::new_unchecked(&bytes[..])), Err(Error));
    }

    #[test]
    fn test_options_skipped() {
        // Data offset 6: four option bytes, then "h".
        let mut bytes = [0u8; 25];
        bytes[..20].copy_from_slice(&DATA_BYTES[..20]);
        bytes[field::DATA_OFF] = 0x60;
        bytes[20..24].copy_from_slice(&[0x02, 0x04, 0x05, 0xb4]);
        bytes[24] = b'h';
        let packet = Packet::new_checked(&bytes[..]).expect("valid");
        assert_eq!(packet.header_len(), 24);
        let repr = Repr::parse(&packet).expect("parses");
        assert_eq!(repr.payload, b"h");
        // A header that is all options and no data.
        let packet = Packet::new_checked(&bytes[..24]).expect("valid");
        assert_eq!(packet.payload(), &[][..]);
    }

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(syn_bytes()).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(syn_repr()));
        let packet = Packet::new_checked(&DATA_BYTES[..]).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(data_repr()));
    }

    #[test]
    fn test_parse_ignores_checksum_and_urgent() {
        let mut bytes = DATA_BYTES;
        bytes[16..20].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let packet = Packet::new_checked(&bytes[..]).expect("valid");
        assert_eq!(packet.checksum(), 0xdead);
        assert_eq!(packet.urgent(), 0xbeef);
        assert_eq!(Repr::parse(&packet), Ok(data_repr()));
    }

    #[test]
    fn test_emit() {
        let repr = syn_repr();
        assert_eq!(Repr::header_len(), HEADER_LEN);
        assert_eq!(repr.buffer_len(), 20);
        let mut bytes = [0xa5u8; 20];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        assert_eq!(&bytes[..], syn_bytes());

        let repr = data_repr();
        assert_eq!(repr.buffer_len(), 25);
        let mut bytes = [0xa5u8; 25];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        assert_eq!(bytes, DATA_BYTES);
    }

    /// The whole §6.5 packet, through both layers.
    #[test]
    fn test_full_syn_packet() {
        let mux_packet =
            mux::Packet::new_checked(&SYN_PACKET_BYTES[..], mux::HeaderKind::V2).expect("valid");
        let mux_repr = mux::Repr::parse(&mux_packet).expect("parses");
        assert_eq!(mux_repr.protocol, mux::Protocol::Tcp);
        let packet = Packet::new_checked(mux_packet.payload()).expect("valid");
        assert_eq!(Repr::parse(&packet), Ok(syn_repr()));

        let tcp_repr = syn_repr();
        let mux_repr = mux::Repr {
            protocol: mux::Protocol::Tcp,
            payload_len: tcp_repr.buffer_len(),
            seq: Some(mux::MuxSeq { tx: 1, rx: 0xffff }),
        };
        assert_eq!(mux_repr.buffer_len(), 36);
        let mut bytes = [0xa5u8; 36];
        let mut mux_packet = mux::Packet::new_unchecked(&mut bytes[..], mux_repr.kind());
        mux_repr.emit(&mut mux_packet);
        tcp_repr.emit(&mut Packet::new_unchecked(mux_packet.payload_mut()));
        assert_eq!(bytes, SYN_PACKET_BYTES);
    }

    #[test]
    fn test_window_bytes() {
        assert_eq!(syn_repr().window_bytes(), 131_072);
        let mut repr = syn_repr();
        repr.window = 0xffff;
        assert_eq!(repr.window_bytes(), 0x00ff_ff00);
        repr.window = 0;
        assert_eq!(repr.window_bytes(), 0);
    }

    #[test]
    fn test_unknown_flags() {
        // Every flags byte parses and round-trips, unnamed bits included.
        for bits in 0..=u8::MAX {
            let mut bytes = DATA_BYTES;
            bytes[field::FLAGS] = bits;
            let repr = Repr::parse(&Packet::new_checked(&bytes[..]).expect("valid"))
                .expect("any flags parse");
            assert_eq!(repr.flags.bits(), bits);
            let mut out = [0xa5u8; 25];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]));
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn test_flags_ops() {
        let synack = Flags::SYN | Flags::ACK;
        assert_eq!(synack.bits(), 0x12);
        assert_eq!(Flags::SYN.union(Flags::ACK), synack);
        assert!(synack.contains(Flags::SYN));
        assert!(synack.contains(synack));
        assert!(synack.contains(Flags::NONE));
        assert!(!synack.contains(Flags::SYN | Flags::RST));
        assert!(synack.intersects(Flags::SYN | Flags::RST));
        assert!(!synack.intersects(Flags::RST));
        assert!(Flags::default().is_empty());
        let mut flags = Flags::NONE;
        flags |= Flags::RST;
        assert_eq!(flags, Flags::from_bits(0x04));
        assert_eq!(
            [Flags::FIN, Flags::SYN, Flags::RST, Flags::PSH, Flags::ACK].map(Flags::bits),
            [0x01, 0x02, 0x04, 0x08, 0x10]
        );
    }

    #[test]
    fn test_flags_display() {
        assert_eq!(Flags::NONE.to_string(), "none");
        assert_eq!((Flags::SYN | Flags::ACK).to_string(), "SYN|ACK");
        assert_eq!((Flags::ACK | Flags::PSH).to_string(), "PSH|ACK");
        assert_eq!(Flags::from_bits(0x1f).to_string(), "FIN|SYN|RST|PSH|ACK");
        assert_eq!(Flags::from_bits(0x30).to_string(), "ACK|0x20");
        assert_eq!(Flags::from_bits(0xc0).to_string(), "0xc0");
        assert_eq!(format!("{:?}", Flags::RST), "Flags(RST)");
        assert_eq!(
            syn_repr().to_string(),
            "TCP 1 -> 62078 seq=0 ack=0 SYN win=512 len=0"
        );
    }
}
