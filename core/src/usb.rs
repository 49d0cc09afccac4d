//! USB transfer rules: how mux packets map onto bulk transfers, in both directions.
//!
//! Read first: `shared/PROTOCOL.md` §2.2, §2.3 and §5 items 15–17.
//!
//! # OUT: one mux packet is one bulk transfer, never split
//!
//! The host submits every mux packet as exactly **one** bulk OUT transfer of exactly the packet's
//! `total_length` bytes: at most [`DEFAULT_MAX_TRANSFER`] by default, never more than
//! [`MAX_PACKET`]. A phone does not treat its OUT pipe as a byte stream: it takes each transfer it
//! reads as one whole message. A packet split into 16 KiB pieces therefore arrives as several
//! malformed messages, and two packets run together (e.g. because a ZLP went missing) arrive as
//! one message whose size matches neither header. Phones answer that with a CONTROL type 3 text
//! such as "asyncReadComplete, message was too large (65536 bytes, max = 65535)", as seen when
//! usbip or usbipd-win forwarding merged transfers (PROTOCOL.md §5.15).
//!
//! # The ZLP rule
//!
//! A USB bulk transfer ends at the first packet shorter than the endpoint's `wMaxPacketSize`
//! (64 on full speed, 512 on high speed, 1024 on SuperSpeed). A transfer whose length is an exact
//! multiple of it ends with a full-sized packet, so the receiver cannot tell that it ended and
//! would wait for more. The sender therefore follows such a transfer with a zero-length packet
//! (ZLP): [`needs_zlp`] says when. When `wMaxPacketSize` is unknown, 64 is assumed (libusb's
//! fallback; every legal bulk size is a multiple of 64, so this errs on the side of sending one).
//! A device role receiving a ZLP ignores it ([`Mode::Device`]).
//!
//! # IN: reassembly on the host
//!
//! The host does not rely on the phone's transfer boundaries. Under virtualisation the IN data can
//! arrive cut into 4 KiB pieces (PROTOCOL.md §5.16), which defeats usbmuxd's "a short transfer ends
//! the packet" heuristic. [`Reassembler`] in [`Mode::Host`] treats the IN pipe as a byte stream and
//! cuts it by the header's length field, across any number of transfers of any size. A length field
//! that cannot be right means the stream is out of sync (e.g. leftovers from an earlier session,
//! PROTOCOL.md §5.17): the error is reported once, and reassembly restarts at the next transfer,
//! because devices start every packet at a transfer boundary.
//!
//! The length field is the big-endian `u32` at bytes 4..8 in both header forms (8-byte v1 and
//! 16-byte v2), so this module needs nothing from `wire` to find packet boundaries.

use core::fmt;

/// Default largest OUT transfer the host sends (one mux packet, all headers included).
///
/// usbmuxd's USB MTU: 16 (v2 header) + 20 (TCP header) + 49 116 payload bytes. Real phones
/// accept it, and it stays well below [`MAX_PACKET`].
pub const DEFAULT_MAX_TRANSFER: usize = 49_152;

/// Largest mux packet accepted on receive (the length field a phone accepts: 65 535).
///
/// Anything larger is what a phone rejects with "message was too large"; on the host it means the
/// stream is out of sync.
pub const MAX_PACKET: usize = 65_535;

/// Bytes needed to read a packet's length: `protocol` (u32 BE) then `total_length` (u32 BE), the
/// common prefix of both header forms. No legal packet is shorter.
const LENGTH_PREFIX: usize = 8;

/// `wMaxPacketSize` assumed when the endpoint's is unknown (reported as 0), as libusb does.
const FALLBACK_MAX_PACKET_SIZE: usize = 64;

/// True when an OUT transfer of `len` bytes must be followed by a zero-length packet:
/// len > 0 and len % max_packet_size == 0. max_packet_size is wMaxPacketSize (64/512/1024);
/// 0 is treated as 64 (libusb's fallback when it is unknown).
///
/// Only bits 10..0 of `wMaxPacketSize` hold the size (bits 12..11 are reserved for bulk
/// endpoints), so the upper bits are ignored. An empty transfer is itself a ZLP and needs none.
pub const fn needs_zlp(len: usize, max_packet_size: u16) -> bool {
    let mps = match max_packet_size & 0x07FF {
        0 => FALLBACK_MAX_PACKET_SIZE,
        m => m as usize,
    };
    len > 0 && len.is_multiple_of(mps)
}

/// Which end of the cable a [`Reassembler`] serves; the two receive very differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Mode {
    /// The host reading the bulk IN pipe: a byte stream, cut by the length field across transfers.
    Host,
    /// The device (phone, gateway firmware, simulator) reading the bulk OUT pipe: strict, each
    /// transfer must be exactly one mux packet, as a phone requires.
    Device,
}

/// Why bytes received over USB did not make a mux packet.
///
/// The bytes concerned are dropped by the reassembler (an oversize packet's as they arrive) and
/// counted in [`ReassemblyStats`]; the caller only reports the error and carries on pushing. The `Display` texts read like a
/// phone's, because the device role sends them to the host as CONTROL type 3 error texts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReassemblyError {
    /// Length field smaller than the header (or a transfer shorter than a header, device mode).
    ///
    /// Host: the stream is out of sync; the rest of the transfer was discarded and reassembly
    /// resumes at the next transfer. Device: the transfer was dropped.
    TooShort {
        /// The length field (host) or the transfer's length (device).
        len: usize,
    },
    /// Length field (host) or transfer (device) above MAX_PACKET.
    ///
    /// Host: the stream is out of sync, handled as for `TooShort`. Device: the host did not
    /// delimit its packets (a missing ZLP, or a forwarder merging transfers); the transfer was
    /// dropped.
    TooLong {
        /// The length field (host) or the transfer's length (device).
        len: usize,
    },
    /// A legal packet larger than this Reassembler's capacity N (host mode); its bytes are skipped
    /// exactly, so the stream stays in sync.
    ///
    /// The caller has lost one packet; a pseudo-TCP connection it belonged to will notice the gap
    /// and reset. Give the reassembler a capacity of 65 536 to never see this.
    ExceedsCapacity {
        /// The packet's length field.
        len: usize,
    },
    /// Device mode: the transfer's length differs from the header's length field.
    ///
    /// The host split a packet over several transfers or merged several into one; the transfer
    /// was dropped.
    LengthMismatch {
        /// The header's length field.
        declared: usize,
        /// The transfer's length.
        actual: usize,
    },
}

impl fmt::Display for ReassemblyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ReassemblyError::TooShort { len } => write!(
                f,
                "asyncReadComplete, message was too small ({len} bytes, shorter than its header)"
            ),
            ReassemblyError::TooLong { len } => write!(
                f,
                "asyncReadComplete, message was too large ({len} bytes, max = {MAX_PACKET})"
            ),
            ReassemblyError::ExceedsCapacity { len } => write!(
                f,
                "asyncReadComplete, message does not fit the receive buffer ({len} bytes)"
            ),
            ReassemblyError::LengthMismatch { declared, actual } => write!(
                f,
                "asyncReadComplete, message size mismatch (header says {declared} bytes, got {actual})"
            ),
        }
    }
}

impl core::error::Error for ReassemblyError {}

/// Counters of what a [`Reassembler`] has seen, for logs and for tests that assert nothing was
/// silently lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ReassemblyStats {
    /// Complete packets handed to the callback.
    pub packets: u64,
    /// Errors handed to the callback (each one once).
    pub errors: u64,
    /// Times the host-mode stream lost sync and restarted at a transfer boundary.
    pub resyncs: u64,
    /// Bytes received but not delivered: skipped oversize packets, bytes dropped to resync, and
    /// (device mode) rejected transfers.
    pub bytes_discarded: u64,
}

/// Where the host-mode stream stands between two transfers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At a packet boundary; nothing held.
    Idle,
    /// `got` bytes (1..8) of a packet's length prefix are held in `head`.
    Header { got: usize },
    /// A packet of `len` bytes (`LENGTH_PREFIX..=N`) is being collected in `buf`; `got` held.
    Body { len: usize, got: usize },
    /// The rest of an [`ReassemblyError::ExceedsCapacity`] packet is being skipped.
    Skip { remaining: usize },
}

/// Turns received USB transfers into mux packets, in either [`Mode`].
///
/// `N` is the capacity for packets that straddle transfers (host mode); the host daemon uses
/// 65 536, so every legal packet fits. A device needs no buffer at all: `Reassembler<0>`.
///
/// Complete packets found inside a single transfer are handed out as slices of that transfer,
/// without copying; only a packet that straddles transfers is copied into the internal buffer.
/// Whatever the input, no method panics and nothing is allocated.
pub struct Reassembler<const N: usize> {
    mode: Mode,
    header_len: usize,
    state: State,
    head: [u8; LENGTH_PREFIX],
    stats: ReassemblyStats,
    buf: [u8; N],
}

impl<const N: usize> fmt::Debug for Reassembler<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The buffer is left out: 64 KiB of stale bytes helps no one.
        f.debug_struct("Reassembler")
            .field("mode", &self.mode)
            .field("capacity", &N)
            .field("header_len", &self.header_len)
            .field("state", &self.state)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<const N: usize> Reassembler<N> {
    /// `header_len` is the minimum legal packet length: 8 before/without v2, 16 after v2 is negotiated.
    ///
    /// Values below 8 are treated as 8: no packet can be shorter than its length field's end.
    pub const fn new(mode: Mode, header_len: usize) -> Self {
        Reassembler {
            mode,
            header_len,
            state: State::Idle,
            head: [0; LENGTH_PREFIX],
            stats: ReassemblyStats {
                packets: 0,
                errors: 0,
                resyncs: 0,
                bytes_discarded: 0,
            },
            buf: [0; N],
        }
    }

    /// Changes the minimum legal packet length once the header form is negotiated (16 after a
    /// major-2 VERSION reply). Applies to every length not yet checked; a packet being collected
    /// is kept.
    pub fn set_header_len(&mut self, header_len: usize) {
        self.header_len = header_len;
    }

    /// The role this reassembler was built for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The capacity `N` for packets that straddle transfers.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Drops any partial packet (e.g. on unplug / new handshake).
    ///
    /// Also abandons skipping an oversize packet: a new session starts a new stream. The statistics
    /// are kept.
    pub fn reset(&mut self) {
        self.state = State::Idle;
    }

    /// Bytes of an incomplete packet held.
    ///
    /// Zero at a packet boundary, which is where a host wants to be before it tears a session down
    /// cleanly.
    pub fn pending(&self) -> usize {
        match self.state {
            State::Header { got } | State::Body { got, .. } => got,
            State::Idle | State::Skip { .. } => 0,
        }
    }

    /// Bytes of an oversize packet still to be skipped (host mode), after it was reported as
    /// [`ReassemblyError::ExceedsCapacity`].
    pub fn skipping(&self) -> usize {
        match self.state {
            State::Skip { remaining } => remaining,
            _ => 0,
        }
    }

    /// Counters since construction.
    pub fn stats(&self) -> ReassemblyStats {
        self.stats
    }

    /// Feeds one bulk IN transfer (host) or OUT transfer (device), of any length 0..=64 KiB and beyond,
    /// and calls `f` once per complete packet (Ok(bytes of the whole mux packet, header included)) or
    /// error, in stream order.
    ///
    /// Every delivered packet is at least the header length long and its length field equals its
    /// length. An empty transfer delivers nothing.
    pub fn push<F: FnMut(Result<&[u8], ReassemblyError>)>(&mut self, transfer: &[u8], mut f: F) {
        match self.mode {
            Mode::Host => self.push_host(transfer, &mut f),
            Mode::Device => self.push_device(transfer, &mut f),
        }
    }

    /// Smallest legal packet length.
    fn min_len(&self) -> usize {
        self.header_len.max(LENGTH_PREFIX)
    }

    /// Classifies a length field; `Ok` means a packet this reassembler can deliver.
    fn check_len(&self, len: usize) -> Result<(), ReassemblyError> {
        if len < self.min_len() {
            Err(ReassemblyError::TooShort { len })
        } else if len > MAX_PACKET {
            Err(ReassemblyError::TooLong { len })
        } else if len > N {
            Err(ReassemblyError::ExceedsCapacity { len })
        } else {
            Ok(())
        }
    }

    fn push_device<F: FnMut(Result<&[u8], ReassemblyError>)>(
        &mut self,
        transfer: &[u8],
        f: &mut F,
    ) {
        let actual = transfer.len();
        if actual == 0 {
            // A ZLP delimiting the previous transfer (see the module docs): not a message.
            return;
        }
        let verdict = if actual < self.min_len() {
            Err(ReassemblyError::TooShort { len: actual })
        } else if actual > MAX_PACKET {
            Err(ReassemblyError::TooLong { len: actual })
        } else {
            match length_field(transfer) {
                Some(declared) if declared == actual => Ok(()),
                Some(declared) => Err(ReassemblyError::LengthMismatch { declared, actual }),
                // Unreachable: `actual >= min_len() >= LENGTH_PREFIX`.
                None => Err(ReassemblyError::TooShort { len: actual }),
            }
        };
        match verdict {
            Ok(()) => {
                self.stats.packets = self.stats.packets.saturating_add(1);
                f(Ok(transfer));
            }
            Err(e) => {
                debug!("usb: dropped OUT transfer of {} bytes", actual);
                self.stats.errors = self.stats.errors.saturating_add(1);
                self.discarded(actual);
                f(Err(e));
            }
        }
    }

    fn push_host<F: FnMut(Result<&[u8], ReassemblyError>)>(&mut self, transfer: &[u8], f: &mut F) {
        let mut rest = transfer;
        // Every iteration consumes bytes of `rest` or delivers a packet, so this ends.
        while !rest.is_empty() {
            match self.state {
                State::Skip { remaining } => {
                    let n = remaining.min(rest.len());
                    rest = advance(rest, n);
                    self.discarded(n);
                    self.state = skip(remaining.saturating_sub(n));
                }
                State::Header { got } => {
                    let got = got.min(LENGTH_PREFIX);
                    let n = copy_prefix(self.head.get_mut(got..).unwrap_or_default(), rest);
                    rest = advance(rest, n);
                    let got = got.saturating_add(n);
                    if got < LENGTH_PREFIX {
                        // `rest` is empty: wait for the next transfer.
                        self.state = State::Header { got };
                        continue;
                    }
                    let len = length_field(&self.head).unwrap_or(0);
                    match self.check_len(len) {
                        Ok(()) => {
                            // len >= LENGTH_PREFIX and len <= N, so the prefix fits.
                            copy_prefix(self.buf.get_mut(..len).unwrap_or_default(), &self.head);
                            self.progress(len, LENGTH_PREFIX, f);
                        }
                        Err(e @ ReassemblyError::ExceedsCapacity { .. }) => {
                            self.discarded(LENGTH_PREFIX);
                            self.oversize(e, len.saturating_sub(LENGTH_PREFIX), f);
                        }
                        Err(e) => {
                            let dropped = LENGTH_PREFIX.saturating_add(rest.len());
                            self.desync(e, dropped, f);
                            return;
                        }
                    }
                }
                State::Body { len, got } => {
                    // Clamped so the range is always valid; `got < len <= N` holds anyway.
                    let len = len.min(N);
                    let got = got.min(len);
                    let n = copy_prefix(self.buf.get_mut(got..len).unwrap_or_default(), rest);
                    rest = advance(rest, n);
                    self.progress(len, got.saturating_add(n), f);
                }
                State::Idle => {
                    let Some(len) = length_field(rest) else {
                        // Fewer than 8 bytes: hold the partial prefix.
                        let n = copy_prefix(&mut self.head, rest);
                        rest = advance(rest, n);
                        self.state = State::Header { got: n };
                        continue;
                    };
                    match self.check_len(len) {
                        Ok(()) => match rest.get(..len) {
                            Some(packet) => {
                                // Fast path: wholly inside this transfer, no copy.
                                self.stats.packets = self.stats.packets.saturating_add(1);
                                f(Ok(packet));
                                rest = advance(rest, len);
                            }
                            None => {
                                // Straddles into the next transfer: keep what we have.
                                let n =
                                    copy_prefix(self.buf.get_mut(..len).unwrap_or_default(), rest);
                                rest = advance(rest, n);
                                self.state = State::Body { len, got: n };
                            }
                        },
                        Err(e @ ReassemblyError::ExceedsCapacity { .. }) => {
                            // Skipped by the `Skip` state, header included, so that even a packet
                            // wholly inside this transfer is handled the same as a straddling one.
                            self.oversize(e, len, f);
                        }
                        Err(e) => {
                            self.desync(e, rest.len(), f);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// `got` of a `len`-byte packet are in `buf`: deliver it if complete, else keep collecting.
    fn progress<F: FnMut(Result<&[u8], ReassemblyError>)>(
        &mut self,
        len: usize,
        got: usize,
        f: &mut F,
    ) {
        if got < len {
            self.state = State::Body { len, got };
        } else {
            self.state = State::Idle;
            self.stats.packets = self.stats.packets.saturating_add(1);
            f(Ok(self.buf.get(..len).unwrap_or_default()));
        }
    }

    /// Reports a legal packet too big for `buf` and skips its next `remaining` bytes.
    fn oversize<F: FnMut(Result<&[u8], ReassemblyError>)>(
        &mut self,
        e: ReassemblyError,
        remaining: usize,
        f: &mut F,
    ) {
        debug!(
            "usb: skipping a packet larger than the receive buffer ({})",
            N
        );
        self.stats.errors = self.stats.errors.saturating_add(1);
        self.state = skip(remaining);
        f(Err(e));
    }

    /// Reports a nonsense length field and drops `dropped` bytes (whatever was pending plus the
    /// rest of the transfer); the next transfer starts a packet.
    fn desync<F: FnMut(Result<&[u8], ReassemblyError>)>(
        &mut self,
        e: ReassemblyError,
        dropped: usize,
        f: &mut F,
    ) {
        warn!("usb: IN stream out of sync, {} bytes dropped", dropped);
        self.stats.errors = self.stats.errors.saturating_add(1);
        self.stats.resyncs = self.stats.resyncs.saturating_add(1);
        self.discarded(dropped);
        self.state = State::Idle;
        f(Err(e));
    }

    fn discarded(&mut self, n: usize) {
        // usize is at most 64 bits on every target Rust supports, so this cast is lossless.
        self.stats.bytes_discarded = self.stats.bytes_discarded.saturating_add(n as u64);
    }
}

/// The total-length field (bytes 4..8, big-endian) of a packet starting at `bytes[0]`, or `None`
/// when fewer than 8 bytes are there.
fn length_field(bytes: &[u8]) -> Option<usize> {
    let field: [u8; 4] = bytes.get(4..LENGTH_PREFIX)?.try_into().ok()?;
    // On a 16-bit target a length that does not fit is certainly too long.
    Some(usize::try_from(u32::from_be_bytes(field)).unwrap_or(usize::MAX))
}

/// Copies as many bytes as fit from the start of `src` to the start of `dst`; returns the count.
fn copy_prefix(dst: &mut [u8], src: &[u8]) -> usize {
    let n = dst.len().min(src.len());
    if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
        d.copy_from_slice(s);
    }
    n
}

/// `bytes` without its first `n` (all of it gone if `n` exceeds it).
fn advance(bytes: &[u8], n: usize) -> &[u8] {
    bytes.get(n..).unwrap_or_default()
}

/// The state after an oversize packet with `remaining` bytes left to skip.
fn skip(remaining: usize) -> State {
    if remaining == 0 {
        State::Idle
    } else {
        State::Skip { remaining }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use std::boxed::Box;
    use std::vec::Vec;

    type Out = Vec<Result<Vec<u8>, ReassemblyError>>;

    /// A v1-style packet of `len` bytes (TCP protocol, length field = `len`) with a body derived
    /// from `seed`.
    fn pkt(len: usize, seed: u8) -> Vec<u8> {
        let mut p = Vec::with_capacity(len);
        p.extend_from_slice(&6u32.to_be_bytes());
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend((8..len).map(|i| seed.wrapping_add((i % 251) as u8)));
        p.truncate(len);
        p
    }

    /// A packet whose length field says `declared`, followed by `body` filler bytes.
    fn header(declared: u32, body: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&declared.to_be_bytes());
        p.resize(8 + body, 0x5a);
        p
    }

    fn feed<const N: usize>(r: &mut Reassembler<N>, transfers: &[&[u8]]) -> Out {
        let mut out = Vec::new();
        for t in transfers {
            r.push(t, |res| out.push(res.map(|p| p.to_vec())));
        }
        out
    }

    fn oks(packets: &[&[u8]]) -> Out {
        packets.iter().map(|p| Ok(p.to_vec())).collect()
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// Uniform-ish in `0..n` (n > 0).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn host<const N: usize>() -> Box<Reassembler<N>> {
        Box::new(Reassembler::new(Mode::Host, 8))
    }

    #[test]
    fn zlp_table() {
        let cases: &[(usize, u16, bool)] = &[
            (0, 64, false),
            (0, 512, false),
            (1, 64, false),
            (63, 64, false),
            (64, 64, true),
            (128, 64, true),
            (511, 512, false),
            (512, 512, true),
            (513, 512, false),
            (1024, 512, true),
            (512, 1024, false),
            (1024, 1024, true),
            (2048, 1024, true),
            (64, 0, true),
            (65, 0, false),
            (512, 0, true),
            (49_152, 64, true),
            (49_152, 512, true),
            (49_152, 1024, true),
            (49_151, 512, false),
            (49_153, 512, false),
            (65_535, 512, false),
            (8, 512, false),
        ];
        for &(len, mps, want) in cases {
            assert_eq!(needs_zlp(len, mps), want, "len {len}, wMaxPacketSize {mps}");
        }
        // Reserved upper bits of wMaxPacketSize are ignored.
        assert!(needs_zlp(512, 0x1200));
        const _: () = assert!(needs_zlp(DEFAULT_MAX_TRANSFER, 512));
    }

    #[test]
    fn host_one_packet_per_transfer() {
        let mut r = host::<65536>();
        let (a, b, c) = (pkt(8, 1), pkt(36, 2), pkt(1500, 3));
        let out = feed(&mut *r, &[&a, &b, &c]);
        assert_eq!(out, oks(&[&a, &b, &c]));
        assert_eq!(r.pending(), 0);
        let s = r.stats();
        assert_eq!(
            (s.packets, s.errors, s.resyncs, s.bytes_discarded),
            (3, 0, 0, 0)
        );
    }

    #[test]
    fn host_fast_path_is_zero_copy() {
        let mut r = Reassembler::<64>::new(Mode::Host, 8);
        let t = [pkt(20, 1), pkt(30, 2)].concat();
        let range = t.as_ptr_range();
        let mut seen = 0;
        r.push(&t, |res| {
            if let Ok(p) = res {
                assert!(range.contains(&p.as_ptr()), "packet was copied");
                seen += 1;
            }
        });
        assert_eq!(seen, 2);
    }

    #[test]
    fn host_several_packets_in_one_transfer() {
        let mut r = host::<65536>();
        let (a, b, c) = (pkt(8, 1), pkt(100, 2), pkt(44, 3));
        let t = [a.clone(), b.clone(), c.clone()].concat();
        assert_eq!(feed(&mut *r, &[&t]), oks(&[&a, &b, &c]));
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn host_split_at_every_position() {
        for header_len in [8, 16] {
            let (a, b, c) = (pkt(16, 1), pkt(45, 2), pkt(17, 3));
            let stream = [a.clone(), b.clone(), c.clone()].concat();
            for cut in 0..=stream.len() {
                let mut r = Reassembler::<64>::new(Mode::Host, header_len);
                let (x, y) = stream.split_at(cut);
                let mut out = Vec::new();
                r.push(x, |res| out.push(res.map(|p| p.to_vec())));
                // What is held is exactly the part of the packet the cut runs through.
                let boundaries = [0, a.len(), a.len() + b.len(), stream.len()];
                let start = boundaries
                    .iter()
                    .rev()
                    .find(|&&s| s <= cut)
                    .copied()
                    .unwrap_or(0);
                assert_eq!(r.pending(), cut - start, "cut {cut}");
                r.push(y, |res| out.push(res.map(|p| p.to_vec())));
                assert_eq!(out, oks(&[&a, &b, &c]), "cut {cut}, header {header_len}");
                assert_eq!(r.pending(), 0);
                assert_eq!(r.stats().errors, 0);
            }
        }
    }

    #[test]
    fn host_header_split_three_ways() {
        // A header arriving one byte per transfer, with empty transfers in between.
        let p = pkt(12, 9);
        let mut r = host::<64>();
        let mut out = Vec::new();
        for b in &p {
            r.push(&[], |res| out.push(res.map(|p| p.to_vec())));
            r.push(core::slice::from_ref(b), |res| {
                out.push(res.map(|p| p.to_vec()))
            });
        }
        assert_eq!(out, oks(&[&p]));
    }

    #[test]
    fn host_large_packet_in_small_transfers() {
        for chunk in [4096, 16384] {
            let mut r = host::<65536>();
            let (a, big, c) = (pkt(40, 1), pkt(60_000, 2), pkt(9, 3));
            let stream = [a.clone(), big.clone(), c.clone()].concat();
            let mut out = Vec::new();
            for t in stream.chunks(chunk) {
                r.push(t, |res| out.push(res.map(|p| p.to_vec())));
            }
            assert_eq!(out, oks(&[&a, &big, &c]), "chunk {chunk}");
            assert_eq!(r.pending(), 0);
            assert_eq!(r.stats().packets, 3);
        }
    }

    #[test]
    fn host_packet_transfer_by_transfer_like_usbmuxd() {
        // The phone's own layout: a 60000-byte packet in 16384-byte IN transfers, short at the end.
        let mut r = host::<65536>();
        let big = pkt(60_000, 7);
        let mut n = 0;
        for (i, t) in big.chunks(16384).enumerate() {
            r.push(t, |res| {
                assert_eq!(res, Ok(&big[..]));
                n += 1;
            });
            if i < 3 {
                assert_eq!(r.pending(), (i + 1) * 16384);
            }
        }
        assert_eq!(n, 1);
    }

    #[test]
    fn host_empty_transfers_interleaved() {
        let mut r = host::<65536>();
        let (a, b) = (pkt(30, 1), pkt(50, 2));
        let stream = [a.clone(), b.clone()].concat();
        let out = feed(
            &mut *r,
            &[
                &[],
                &stream[..5],
                &[],
                &[],
                &stream[5..40],
                &[],
                &stream[40..],
                &[],
            ],
        );
        assert_eq!(out, oks(&[&a, &b]));
        assert_eq!(r.stats().errors, 0);
    }

    #[test]
    fn host_too_short_resyncs_at_next_transfer() {
        let mut r = host::<65536>();
        let (a, b) = (pkt(20, 1), pkt(20, 2));
        let mut bad = header(4, 30);
        // The garbage after the bad header even holds a plausible packet: it must not be parsed.
        bad.extend_from_slice(&pkt(10, 3));
        let t1 = [a.clone(), bad.clone()].concat();
        let out = feed(&mut *r, &[&t1, &b]);
        assert_eq!(
            out,
            [Ok(a), Err(ReassemblyError::TooShort { len: 4 }), Ok(b)].to_vec()
        );
        let s = r.stats();
        assert_eq!((s.packets, s.errors, s.resyncs), (2, 1, 1));
        assert_eq!(s.bytes_discarded, bad.len() as u64);
    }

    #[test]
    fn host_too_short_respects_header_len() {
        let mut r = host::<65536>();
        r.set_header_len(16);
        let (a, b) = (pkt(16, 1), pkt(15, 2));
        let out = feed(&mut *r, &[&[a.clone(), b].concat(), &a]);
        assert_eq!(
            out,
            [
                Ok(a.clone()),
                Err(ReassemblyError::TooShort { len: 15 }),
                Ok(a)
            ]
            .to_vec()
        );
    }

    #[test]
    fn host_too_long_resyncs_at_next_transfer() {
        let mut r = host::<65536>();
        let (a, b) = (pkt(20, 1), pkt(20, 2));
        let bad = header(65_536, 100);
        // The bad header straddles: 3 bytes at the end of one transfer, the rest in the next.
        let t1 = [a.clone(), bad[..3].to_vec()].concat();
        let t2 = bad[3..].to_vec();
        let out = feed(&mut *r, &[&t1, &t2, &b]);
        assert_eq!(
            out,
            [Ok(a), Err(ReassemblyError::TooLong { len: 65_536 }), Ok(b)].to_vec()
        );
        let s = r.stats();
        assert_eq!((s.packets, s.errors, s.resyncs), (2, 1, 1));
        assert_eq!(s.bytes_discarded, bad.len() as u64);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn host_exceeds_capacity_skips_exactly() {
        let mut r = host::<64>();
        let (a, big, b, huge, c) = (pkt(20, 1), pkt(100, 2), pkt(64, 3), pkt(300, 4), pkt(8, 5));
        let stream = [a.clone(), big.clone(), b.clone(), huge.clone(), c.clone()].concat();
        let expected: Out = [
            Ok(a),
            Err(ReassemblyError::ExceedsCapacity { len: 100 }),
            Ok(b),
            Err(ReassemblyError::ExceedsCapacity { len: 300 }),
            Ok(c),
        ]
        .to_vec();
        // Whole stream at once, and cut in 30-byte and 7-byte transfers: the same outcome.
        for chunk in [stream.len(), 30, 7] {
            let mut r2 = host::<64>();
            let mut out = Vec::new();
            for t in stream.chunks(chunk) {
                r2.push(t, |res| out.push(res.map(|p| p.to_vec())));
            }
            assert_eq!(out, expected, "chunk {chunk}");
            let s = r2.stats();
            assert_eq!(
                (s.packets, s.errors, s.resyncs, s.bytes_discarded),
                (3, 2, 0, 400)
            );
            assert_eq!((r2.pending(), r2.skipping()), (0, 0));
        }
        // Skipping survives across transfers and is visible.
        r.push(&big[..50], |res| {
            assert_eq!(res, Err(ReassemblyError::ExceedsCapacity { len: 100 }))
        });
        assert_eq!((r.pending(), r.skipping()), (0, 50));
        r.reset();
        assert_eq!(r.skipping(), 0);
    }

    #[test]
    fn host_zero_capacity_reports_every_packet() {
        let mut r = Reassembler::<0>::new(Mode::Host, 8);
        let a = pkt(8, 1);
        let out = feed(&mut r, &[&a[..3], &a[3..], &a]);
        // Straddling or not, the outcome depends only on the stream.
        assert_eq!(
            out,
            [
                Err(ReassemblyError::ExceedsCapacity { len: 8 }),
                Err(ReassemblyError::ExceedsCapacity { len: 8 }),
            ]
            .to_vec()
        );
    }

    #[test]
    fn host_reset_drops_partial() {
        let mut r = host::<65536>();
        let a = pkt(100, 1);
        r.push(&a[..5], |_| panic!("nothing complete yet"));
        assert_eq!(r.pending(), 5);
        r.reset();
        assert_eq!(r.pending(), 0);
        r.push(&a[..50], |_| panic!("nothing complete yet"));
        assert_eq!(r.pending(), 50);
        r.reset();
        assert_eq!(feed(&mut *r, &[&a]), oks(&[&a]));
    }

    /// Packets of random lengths (mostly small, some up to 65535), cut at random points into
    /// random-size transfers (including empty ones), come out once each, in order, byte-exact;
    /// those above the capacity come out as `ExceedsCapacity` at their place in the stream.
    fn random_split<const N: usize>(seed: u64, header_len: usize) {
        let mut rng = XorShift(seed);
        let mut stream = Vec::new();
        let mut expected: Out = Vec::new();
        for i in 0..400 {
            let len = match rng.below(20) {
                0 => header_len + rng.below(MAX_PACKET + 1 - header_len),
                1 => header_len,
                _ => header_len + rng.below(2000),
            };
            let p = pkt(len, i as u8);
            expected.push(if len <= N {
                Ok(p.clone())
            } else {
                Err(ReassemblyError::ExceedsCapacity { len })
            });
            stream.extend_from_slice(&p);
        }
        let mut r: Box<Reassembler<N>> = Box::new(Reassembler::new(Mode::Host, header_len));
        let mut out = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let size = match rng.below(6) {
                0 => 0,
                1 => 1 + rng.below(16),
                2 => 16384,
                3 => 4096,
                4 => 1 + rng.below(4096),
                _ => 1 + rng.below(70_000),
            };
            let end = (at + size).min(stream.len());
            r.push(&stream[at..end], |res| out.push(res.map(|p| p.to_vec())));
            assert!(r.pending() <= N.max(8));
            at = end;
        }
        assert_eq!(out.len(), expected.len(), "seed {seed}");
        for (i, (o, e)) in out.iter().zip(&expected).enumerate() {
            assert!(o == e, "seed {seed}: packet {i} differs");
        }
        let s = r.stats();
        assert_eq!(s.resyncs, 0);
        assert_eq!(s.packets + s.errors, expected.len() as u64);
        assert_eq!((r.pending(), r.skipping()), (0, 0));
    }

    #[test]
    fn host_random_split_full_capacity() {
        for seed in [1, 0x9e37_79b9_7f4a_7c15, 42, 7777] {
            random_split::<65536>(seed, 8);
            random_split::<65536>(seed ^ 0xdead_beef, 16);
        }
    }

    #[test]
    fn host_random_split_small_capacity() {
        for seed in [3, 0x1234_5678_9abc_def1] {
            random_split::<1024>(seed, 8);
            random_split::<100>(seed, 16);
        }
    }

    #[test]
    fn device_exact_packet_zero_copy() {
        let mut r = Reassembler::<0>::new(Mode::Device, 8);
        assert_eq!(r.mode(), Mode::Device);
        for len in [8, 36, 49_152, MAX_PACKET] {
            let p = pkt(len, 1);
            let mut n = 0;
            r.push(&p, |res| {
                let got = res.unwrap_or_default();
                assert_eq!(got.as_ptr(), p.as_ptr(), "packet was copied");
                assert_eq!(got.len(), len);
                n += 1;
            });
            assert_eq!(n, 1);
        }
        assert_eq!(r.stats().packets, 4);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn device_zlp_ignored() {
        let mut r = Reassembler::<0>::new(Mode::Device, 16);
        let p = pkt(512, 1);
        let out = feed(&mut r, &[&p, &[], &p]);
        assert_eq!(out, oks(&[&p, &p]));
        assert_eq!(
            r.stats(),
            ReassemblyStats {
                packets: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn device_errors() {
        let mut r = Reassembler::<0>::new(Mode::Device, 8);
        let short = [0u8, 0, 0, 6, 0];
        let long = pkt(MAX_PACKET + 1, 1);
        let mut split = pkt(100, 2);
        split.truncate(60);
        let merged = [pkt(20, 3), pkt(20, 4)].concat();
        let out = feed(&mut r, &[&short, &long, &split, &merged]);
        assert_eq!(
            out,
            [
                Err(ReassemblyError::TooShort { len: 5 }),
                Err(ReassemblyError::TooLong { len: 65_536 }),
                Err(ReassemblyError::LengthMismatch {
                    declared: 100,
                    actual: 60
                }),
                Err(ReassemblyError::LengthMismatch {
                    declared: 20,
                    actual: 40
                }),
            ]
            .to_vec()
        );
        let s = r.stats();
        assert_eq!((s.packets, s.errors, s.resyncs), (0, 4, 0));
        assert_eq!(s.bytes_discarded, (5 + 65_536 + 60 + 40) as u64);

        // After v2 is negotiated an 8-byte packet is too short for a 16-byte header.
        r.set_header_len(16);
        let out = feed(&mut r, &[&pkt(8, 0), &pkt(16, 0)]);
        assert_eq!(
            out,
            [Err(ReassemblyError::TooShort { len: 8 }), Ok(pkt(16, 0))].to_vec()
        );
    }

    #[test]
    fn display_texts() {
        assert_eq!(
            std::format!("{}", ReassemblyError::TooLong { len: 65_536 }),
            "asyncReadComplete, message was too large (65536 bytes, max = 65535)"
        );
        let all = [
            ReassemblyError::TooShort { len: 5 },
            ReassemblyError::ExceedsCapacity { len: 1000 },
            ReassemblyError::LengthMismatch {
                declared: 7894,
                actual: 4096,
            },
        ];
        for e in all {
            let s = std::format!("{e}");
            assert!(s.starts_with("asyncReadComplete, message "), "{s}");
            assert!(s.is_ascii());
        }
        assert!(std::format!("{}", all[2]).contains("7894"));
        // Usable as an error object.
        let _: &dyn core::error::Error = &all[0];
    }

    /// Random bytes, with plausible length fields sprinkled in so every path is reached; checks
    /// the invariants of whatever comes out.
    fn garbage<const N: usize>(mode: Mode, seed: u64) {
        let mut rng = XorShift(seed);
        let mut r: Box<Reassembler<N>> = Box::new(Reassembler::new(mode, 8));
        let mut callbacks = 0u64;
        for round in 0..300 {
            if round == 150 {
                r.set_header_len(16);
            }
            let len = match rng.below(5) {
                0 => 0,
                1 => rng.below(16),
                2 => rng.below(200),
                3 => rng.below(5000),
                _ => rng.below(70_000),
            };
            let mut t: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Sometimes write a plausible or borderline length field somewhere.
            for _ in 0..rng.below(4) {
                if t.len() >= 8 {
                    let at = rng.below(t.len() - 7);
                    let v: u32 = match rng.below(6) {
                        0 => t.len() as u32,
                        1 => (t.len() - at) as u32,
                        2 => rng.below(64) as u32,
                        3 => 65_535,
                        4 => 65_536,
                        _ => u32::MAX,
                    };
                    t[at + 4..at + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            let min = if round >= 150 { 16 } else { 8 };
            r.push(&t, |res| {
                callbacks += 1;
                if let Ok(p) = res {
                    assert!(p.len() >= min && p.len() <= MAX_PACKET);
                    assert_eq!(length_field(p), Some(p.len()));
                    if mode == Mode::Host {
                        assert!(p.len() <= N);
                    } else {
                        assert_eq!(p.len(), t.len());
                    }
                }
            });
            assert!(r.pending() <= N.max(8));
            if rng.below(50) == 0 {
                r.reset();
            }
        }
        let s = r.stats();
        assert_eq!(s.packets + s.errors, callbacks);
    }

    #[test]
    fn no_panic_on_garbage() {
        for seed in [1, 2, 0xfeed_face, 0x0123_4567_89ab_cdef] {
            for mode in [Mode::Host, Mode::Device] {
                garbage::<0>(mode, seed);
                garbage::<7>(mode, seed);
                garbage::<64>(mode, seed);
                garbage::<65536>(mode, seed);
            }
        }
    }

    #[test]
    fn header_len_below_eight_is_eight() {
        let mut r = Reassembler::<64>::new(Mode::Host, 0);
        let out = feed(&mut r, &[&header(4, 0), &pkt(8, 1)]);
        assert_eq!(
            out,
            [Err(ReassemblyError::TooShort { len: 4 }), Ok(pkt(8, 1))].to_vec()
        );
    }
}
