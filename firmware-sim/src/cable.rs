//! [`VirtualCable`]: two USB bulk endpoints in memory, with the bus's real transfer semantics, and
//! [`CabledPhone`], a [`Phone`] plugged into one.
//!
//! Read first: `shared/PROTOCOL.md` §2.2 (bulk transfers), §2.3 (reassembly) and §5.15–5.16.
//!
//! # What a bulk pipe does
//!
//! USB moves bulk data in *packets* of at most `wMaxPacketSize` bytes (64 on full speed, 512 on
//! high speed, 1024 on SuperSpeed). A *transfer* is a run of packets that ends at the first packet
//! shorter than `wMaxPacketSize` — a zero-length packet (ZLP) counts as one. Nothing else marks
//! where a transfer ends. [`BulkPipe`] models exactly that:
//!
//! - a writer submits a transfer ([`BulkPipe::write`]); the pipe cuts it into packets. A transfer
//!   whose length is not a multiple of `wMaxPacketSize` ends with a short packet and is
//!   delimited. One whose length **is** a multiple ends with a full packet and is not: unless the
//!   writer follows it with a ZLP ([`BulkPipe::write_zlp`]), the reader sees it glued to whatever
//!   is written next. This is the ZLP rule, and the failure a host that forgets it produces.
//! - a reader submits a read with a buffer of `max_len` bytes ([`BulkPipe::read`]) and gets at
//!   most one transfer back. The read completes at the transfer's short packet or ZLP, **or when
//!   its buffer is full** — the rest stays for the next read. That is how a device packet larger
//!   than the host's 16 KiB IN buffers arrives in several IN transfers, and how a phone reading
//!   with a 64 KiB buffer sees two glued 48 KiB packets as one 65 536-byte message ("message was
//!   too large (65536 bytes, max = 65535)", PROTOCOL.md §5.15). A buffer full at the exact end of a
//!   transfer completes before the ZLP that follows is consumed, so the next read returns an empty
//!   transfer, as on a real bus.
//! - a read returns `None` while no transfer is complete: data written so far without a short
//!   packet or ZLP is not readable yet (unless it fills the reader's buffer).
//!
//! Nothing here blocks, sleeps or reads a clock; the pipe is a plain data structure that tests and
//! in-process drivers step by hand.

use std::collections::VecDeque;

use usbmux_core::usb::MAX_PACKET;
use usbmux_core::Instant;

use crate::phone::{Phone, PhoneConfig};

/// Buffer of the host's bulk IN reads (usbmuxd's `USB_MRU`): device packets larger than this
/// arrive in several IN transfers.
pub const HOST_READ_LEN: usize = 16 * 1024;

/// Buffer of the simulated phone's bulk OUT reads: one more than the largest mux packet a phone
/// accepts, so two transfers glued together by a missing ZLP are seen as the 65 536-byte message
/// real phones complain about, and any smaller glued pair as a length mismatch.
pub const DEVICE_READ_LEN: usize = 64 * 1024;

/// `wMaxPacketSize` used when the one given is 0 (libusb's fallback, as `usbmux_core::usb`).
const FALLBACK_MAX_PACKET_SIZE: usize = 64;

/// The packet size a pipe really uses for a `wMaxPacketSize` value: bits 10..0 (the rest is
/// reserved for bulk endpoints), 0 read as 64.
fn effective_packet_size(max_packet_size: u16) -> usize {
    match max_packet_size & 0x07FF {
        0 => FALLBACK_MAX_PACKET_SIZE,
        m => usize::from(m),
    }
}

/// One transfer as written, and how much of it a reader has taken.
#[derive(Debug)]
struct Chunk {
    data: Vec<u8>,
    /// Bytes already read (always a multiple of the packet size: reads end on packet boundaries).
    taken: usize,
    /// The transfer ended with a short packet or was a ZLP: it delimits a transfer.
    short: bool,
}

impl Chunk {
    fn left(&self) -> usize {
        self.data.len() - self.taken
    }
}

/// Counters of one [`BulkPipe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Non-empty transfers written.
    pub transfers_written: u64,
    /// ZLPs written.
    pub zlps_written: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Reads that returned a transfer (empty ones included).
    pub reads: u64,
    /// Reads that completed because the reader's buffer was full rather than at a short packet.
    pub reads_buffer_full: u64,
}

/// One bulk endpoint: transfers written at one end, read at the other, with USB's packet
/// semantics (see the module docs).
///
/// # The ZLP rule
/// A writer must follow every transfer whose length is a non-zero multiple of
/// [`BulkPipe::max_packet_size`] with [`BulkPipe::write_zlp`] (`usbmux_core::usb::needs_zlp`
/// says when; `Transmit::zlp` carries it). Otherwise the reader cannot see where the transfer ends
/// and receives it joined to the next one.
#[derive(Debug)]
pub struct BulkPipe {
    max_packet_size: usize,
    chunks: VecDeque<Chunk>,
    queued: usize,
    stats: PipeStats,
}

impl BulkPipe {
    /// An empty pipe with this `wMaxPacketSize` (64, 512 or 1024 in practice; only bits 10..0
    /// count, and 0 means 64, as libusb assumes).
    pub fn new(max_packet_size: u16) -> Self {
        BulkPipe {
            max_packet_size: effective_packet_size(max_packet_size),
            chunks: VecDeque::new(),
            queued: 0,
            stats: PipeStats::default(),
        }
    }

    /// The packet size the pipe cuts transfers into.
    pub fn max_packet_size(&self) -> usize {
        self.max_packet_size
    }

    /// Bytes written and not yet read (complete transfers or not).
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// True if nothing at all is queued, not even a ZLP.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Counters since construction.
    pub fn stats(&self) -> PipeStats {
        self.stats
    }

    /// Submits one transfer. An empty `transfer` is a ZLP (same as [`BulkPipe::write_zlp`]).
    ///
    /// A transfer whose length is a multiple of the packet size is **not** delimited by itself:
    /// follow it with a ZLP, or the reader gets it glued to the next transfer.
    pub fn write(&mut self, transfer: &[u8]) {
        if transfer.is_empty() {
            self.write_zlp();
            return;
        }
        self.stats.transfers_written += 1;
        self.stats.bytes_written += transfer.len() as u64;
        self.queued += transfer.len();
        self.chunks.push_back(Chunk {
            data: transfer.to_vec(),
            taken: 0,
            short: !transfer.len().is_multiple_of(self.max_packet_size),
        });
    }

    /// Submits a zero-length packet: ends the transfer in progress, or is an empty transfer by
    /// itself.
    pub fn write_zlp(&mut self) {
        self.stats.zlps_written += 1;
        self.chunks.push_back(Chunk {
            data: Vec::new(),
            taken: 0,
            short: true,
        });
    }

    /// One read with a buffer of `max_len` bytes: the next complete transfer, or its first
    /// `max_len` bytes if it does not fit (the rest stays for the next read). `None` when no
    /// transfer is complete yet. `Some(vec![])` is a zero-length transfer (a lone ZLP).
    ///
    /// `max_len` is rounded down to a multiple of the packet size, and is at least one packet: a
    /// real bus cannot put part of a packet in a buffer (it would be an overflow error).
    pub fn read(&mut self, max_len: usize) -> Option<Vec<u8>> {
        let mps = self.max_packet_size;
        let cap = (max_len / mps * mps).max(mps);
        // Find where the read completes without consuming anything: at a short packet / ZLP, or
        // where the buffer fills.
        let mut got = 0usize;
        let mut end = None;
        for (i, c) in self.chunks.iter().enumerate() {
            if got + c.left() >= cap && c.left() > 0 {
                end = Some((i, cap - got, true));
                break;
            }
            if c.short {
                end = Some((i, c.left(), false));
                break;
            }
            got += c.left();
        }
        let (last, take_last, full) = end?;
        let mut out = Vec::with_capacity(got + take_last);
        for _ in 0..last {
            if let Some(c) = self.chunks.pop_front() {
                out.extend_from_slice(&c.data[c.taken..]);
            }
        }
        if let Some(c) = self.chunks.front_mut() {
            out.extend_from_slice(&c.data[c.taken..c.taken + take_last]);
            c.taken += take_last;
            // A buffer-full read leaves a chunk's rest (and its terminator) in place; a read that
            // ended at the short packet consumed the chunk whole.
            if !full || (c.taken == c.data.len() && !c.short) {
                self.chunks.pop_front();
            }
        }
        self.queued -= out.len();
        self.stats.reads += 1;
        if full {
            self.stats.reads_buffer_full += 1;
        }
        Some(out)
    }

    /// Drops everything queued (the cable was unplugged).
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.queued = 0;
    }
}

/// The two bulk endpoints of a usbmux interface: OUT (host → phone) and IN (phone → host), each a
/// [`BulkPipe`] with the same `wMaxPacketSize`.
///
/// The host writes OUT transfers with [`VirtualCable::host_write`] (one mux packet each, then
/// [`VirtualCable::host_write_zlp`] when `Transmit::zlp` says so) and reads IN transfers with
/// [`VirtualCable::host_read`] (usbmuxd uses [`HOST_READ_LEN`]-byte buffers); the phone does the
/// mirror image with [`DEVICE_READ_LEN`]-byte reads. The ZLP rule of [`BulkPipe`] applies to both
/// directions.
#[derive(Debug)]
pub struct VirtualCable {
    out: BulkPipe,
    inp: BulkPipe,
}

impl VirtualCable {
    /// A cable whose endpoints have this `wMaxPacketSize` (see [`BulkPipe::new`]).
    pub fn new(max_packet_size: u16) -> Self {
        VirtualCable {
            out: BulkPipe::new(max_packet_size),
            inp: BulkPipe::new(max_packet_size),
        }
    }

    /// The packet size of both endpoints.
    pub fn max_packet_size(&self) -> usize {
        self.out.max_packet_size()
    }

    /// Host side: submits one OUT transfer (empty = ZLP).
    pub fn host_write(&mut self, transfer: &[u8]) {
        self.out.write(transfer);
    }

    /// Host side: submits a ZLP on the OUT endpoint.
    pub fn host_write_zlp(&mut self) {
        self.out.write_zlp();
    }

    /// Host side: one IN read with a `max_len`-byte buffer (see [`BulkPipe::read`]).
    pub fn host_read(&mut self, max_len: usize) -> Option<Vec<u8>> {
        self.inp.read(max_len)
    }

    /// Phone side: submits one IN transfer (empty = ZLP).
    pub fn device_write(&mut self, transfer: &[u8]) {
        self.inp.write(transfer);
    }

    /// Phone side: submits a ZLP on the IN endpoint.
    pub fn device_write_zlp(&mut self) {
        self.inp.write_zlp();
    }

    /// Phone side: one OUT read with a `max_len`-byte buffer (see [`BulkPipe::read`]).
    pub fn device_read(&mut self, max_len: usize) -> Option<Vec<u8>> {
        self.out.read(max_len)
    }

    /// The OUT endpoint (host → phone).
    pub fn out_pipe(&self) -> &BulkPipe {
        &self.out
    }

    /// The IN endpoint (phone → host).
    pub fn in_pipe(&self) -> &BulkPipe {
        &self.inp
    }

    /// Unplug: everything in flight either way is lost.
    pub fn clear(&mut self) {
        self.out.clear();
        self.inp.clear();
    }
}

/// A [`Phone`] plugged into a [`VirtualCable`]: the in-process transport for tests and
/// `usbmuxd --simulate`.
///
/// The host end is the cable's: [`CabledPhone::host_write`] for OUT transfers (honour the ZLP
/// rule!), [`CabledPhone::host_read`] for IN transfers. The phone end is driven here: after every
/// host write and timer, the phone reads each complete OUT transfer with a [`DEVICE_READ_LEN`]-byte
/// buffer (strictly one mux packet per transfer, as a real phone), and everything it sends goes
/// into the IN pipe as one transfer per mux packet, followed by a ZLP when its length is a
/// multiple of `wMaxPacketSize`.
pub struct CabledPhone {
    phone: Phone,
    cable: VirtualCable,
    buf: Vec<u8>,
}

impl CabledPhone {
    /// A fresh phone (waiting for VERSION) on a cable with its identity's `wMaxPacketSize`.
    pub fn new(cfg: PhoneConfig) -> Self {
        let cable = VirtualCable::new(cfg.identity.max_packet_size);
        CabledPhone {
            phone: Phone::new(cfg),
            cable,
            buf: vec![0; MAX_PACKET + 1],
        }
    }

    /// Host: one OUT transfer (empty = ZLP); the phone handles it as soon as it is complete.
    pub fn host_write(&mut self, now: Instant, transfer: &[u8]) {
        self.cable.host_write(transfer);
        self.run(now);
    }

    /// Host: a ZLP on the OUT endpoint.
    pub fn host_write_zlp(&mut self, now: Instant) {
        self.cable.host_write_zlp();
        self.run(now);
    }

    /// Host: one IN read with a `max_len`-byte buffer; `None` when no transfer is complete.
    pub fn host_read(&mut self, now: Instant, max_len: usize) -> Option<Vec<u8>> {
        self.run(now);
        self.cable.host_read(max_len)
    }

    /// When the phone's next timer is due (call [`CabledPhone::handle_timeout`] then).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.phone.poll_timeout()
    }

    /// Fires the phone's expired timers; what it sends goes into the IN pipe.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.phone.handle_timeout(now);
        self.run(now);
    }

    /// The phone.
    pub fn phone(&self) -> &Phone {
        &self.phone
    }

    /// The phone, to inspect its events.
    pub fn phone_mut(&mut self) -> &mut Phone {
        &mut self.phone
    }

    /// The cable (queued bytes, counters).
    pub fn cable(&self) -> &VirtualCable {
        &self.cable
    }

    /// Delivers complete OUT transfers to the phone, then moves the phone's packets into the IN
    /// pipe until it has nothing more to send.
    fn run(&mut self, now: Instant) {
        while let Some(t) = self.cable.device_read(DEVICE_READ_LEN) {
            self.phone.handle_transfer(now, &t);
        }
        // Bounded: the phone only sends what the host's windows admit, but a bug must not hang.
        for _ in 0..100_000 {
            match self.phone.poll_transmit(now, &mut self.buf) {
                Ok(Some(t)) => {
                    self.cable.device_write(&self.buf[..t.len]);
                    if t.zlp {
                        self.cable.device_write_zlp();
                    }
                }
                Ok(None) => break,
                Err(e) => self.buf.resize(e.required, 0),
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn short_packet_ends_transfer() {
        let mut p = BulkPipe::new(512);
        p.write(&bytes(700));
        p.write(&bytes(3));
        assert_eq!(p.read(16384), Some(bytes(700)));
        assert_eq!(p.read(16384), Some(bytes(3)));
        assert_eq!(p.read(16384), None);
        assert_eq!(p.queued_bytes(), 0);
    }

    #[test]
    fn multiple_of_packet_size_waits_for_zlp() {
        let mut p = BulkPipe::new(64);
        p.write(&bytes(128));
        assert_eq!(p.read(1024), None, "not delimited yet");
        p.write_zlp();
        assert_eq!(p.read(1024), Some(bytes(128)));
        assert_eq!(p.read(1024), None);
    }

    #[test]
    fn missing_zlp_glues() {
        let mut p = BulkPipe::new(512);
        p.write(&[1; 512]);
        p.write(&[2; 10]);
        let mut want = vec![1; 512];
        want.extend_from_slice(&[2; 10]);
        assert_eq!(p.read(65536), Some(want));
    }

    #[test]
    fn buffer_full_completes_and_leaves_rest() {
        let mut p = BulkPipe::new(512);
        let data = bytes(40_000);
        p.write(&data);
        assert_eq!(p.read(16384).as_deref(), Some(&data[..16384]));
        assert_eq!(p.read(16384).as_deref(), Some(&data[16384..32768]));
        assert_eq!(p.read(16384).as_deref(), Some(&data[32768..]));
        assert_eq!(p.read(16384), None);
        assert_eq!(p.stats().reads_buffer_full, 2);
    }

    #[test]
    fn buffer_full_at_end_leaves_zlp_as_empty_transfer() {
        let mut p = BulkPipe::new(512);
        p.write(&bytes(16384));
        p.write_zlp();
        assert_eq!(p.read(16384), Some(bytes(16384)));
        assert_eq!(p.read(16384), Some(vec![]));
        assert_eq!(p.read(16384), None);
        assert!(p.is_empty());
    }

    #[test]
    fn odd_read_lengths_round_to_packets() {
        let mut p = BulkPipe::new(512);
        p.write(&bytes(2000));
        // 1000 rounds down to 512; 10 up to one packet.
        assert_eq!(p.read(1000).map(|v| v.len()), Some(512));
        assert_eq!(p.read(10).map(|v| v.len()), Some(512));
        assert_eq!(p.read(65536).map(|v| v.len()), Some(976));
    }

    #[test]
    fn zero_packet_size_means_64() {
        assert_eq!(BulkPipe::new(0).max_packet_size(), 64);
        assert_eq!(BulkPipe::new(0x1800 | 512).max_packet_size(), 512);
    }
}
