//! What the fuzz targets and the seed generator share: the byte formats of the structured
//! targets.
//!
//! The structured targets (`session_*`, `reassembler`, `roundtrip`, `sim_lockdown`) read their
//! input with [`Reader`] instead of `arbitrary`, because a seed corpus must be *written*: the
//! generator (`examples/gen_seeds.rs`) encodes real exchanges (a host talking to a simulated
//! phone) with [`Writer`] into exactly the bytes the target decodes back into the same
//! operations. `arbitrary` has no encoder, and its byte layout may change between versions,
//! which would silently turn checked-in seeds into noise.
//!
//! The format is forgiving in the way libFuzzer needs: every byte string decodes to something
//! (an exhausted reader yields zeros and empty slices), so mutations stay meaningful.

/// Reads fixed-width big-endian numbers and length-prefixed byte strings from fuzzer input.
/// Past the end it yields zeros and empty slices: decoding never fails.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over the whole input.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// True when every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// Two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// Four bytes, big-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// A byte string: a `u16` length, then that many bytes (fewer if the input ends first).
    pub fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16()).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.data)
    }
}

/// The encoder matching [`Reader`], for the seed generator.
#[derive(Debug, Clone, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// An empty encoding.
    pub fn new() -> Self {
        Writer(Vec::new())
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// Two bytes, big-endian.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Four bytes, big-endian.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A byte string as [`Reader::bytes`] reads it (at most 65 535 bytes; longer is cut).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let n = v.len().min(usize::from(u16::MAX));
        self.u16(n as u16);
        self.0.extend_from_slice(&v[..n]);
        self
    }

    /// Raw bytes, for a format's trailing part ([`Reader::rest`]).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// `session_host`: a host `Session` driven by these operations.
pub mod host_ops {
    use super::{Reader, Writer};

    /// One step of the `session_host` target.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Op<'a> {
        /// A bulk IN transfer from the device, as is.
        Transfer(&'a [u8]),
        /// A well-formed VERSION reply with major `n % 4`, to reach the active phase quickly.
        VersionReply(u8),
        /// `connect(port)`.
        Connect(u16),
        /// `send` on connection `i` (modulo the number opened).
        Send(u8, &'a [u8]),
        /// `recv` of up to `n` bytes on connection `i`.
        Recv(u8, u16),
        /// `reset` of connection `i`.
        Reset(u8),
        /// Time moves by `ms`, then `handle_timeout`.
        Advance(u16),
        /// The device was unplugged.
        Disconnect,
    }

    /// Decodes the next operation.
    pub fn decode<'a>(r: &mut Reader<'a>) -> Op<'a> {
        match r.u8() % 8 {
            0 => Op::Transfer(r.bytes()),
            1 => Op::VersionReply(r.u8()),
            2 => Op::Connect(r.u16()),
            3 => Op::Send(r.u8(), r.bytes()),
            4 => Op::Recv(r.u8(), r.u16()),
            5 => Op::Reset(r.u8()),
            6 => Op::Advance(r.u16()),
            _ => Op::Disconnect,
        }
    }

    /// Encodes `op` so that [`decode`] returns it.
    pub fn encode(w: &mut Writer, op: &Op<'_>) {
        match *op {
            Op::Transfer(t) => w.u8(0).bytes(t),
            Op::VersionReply(n) => w.u8(1).u8(n),
            Op::Connect(p) => w.u8(2).u16(p),
            Op::Send(i, d) => w.u8(3).u8(i).bytes(d),
            Op::Recv(i, n) => w.u8(4).u8(i).u16(n),
            Op::Reset(i) => w.u8(5).u8(i),
            Op::Advance(ms) => w.u8(6).u16(ms),
            Op::Disconnect => w.u8(7),
        };
    }
}

/// `session_device`: a device `Session` driven by these operations (after one byte saying
/// whether incoming connections are accepted).
pub mod device_ops {
    use super::{Reader, Writer};

    /// One step of the `session_device` target.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Op<'a> {
        /// A bulk OUT transfer from the host, as is.
        Transfer(&'a [u8]),
        /// A real VERSION (major 2) and SETUP from the host.
        Handshake,
        /// A v2 SYN from host port `sport` to `dport`.
        Syn(u16, u16),
        /// `send` on accepted connection `i`.
        Send(u8, &'a [u8]),
        /// `recv` of up to `n` bytes on accepted connection `i`.
        Recv(u8, u16),
        /// `reset` of accepted connection `i`.
        Reset(u8),
        /// Time moves by `ms`, then `handle_timeout`.
        Advance(u16),
    }

    /// Decodes the next operation.
    pub fn decode<'a>(r: &mut Reader<'a>) -> Op<'a> {
        match r.u8() % 7 {
            0 => Op::Transfer(r.bytes()),
            1 => Op::Handshake,
            2 => Op::Syn(r.u16(), r.u16()),
            3 => Op::Send(r.u8(), r.bytes()),
            4 => Op::Recv(r.u8(), r.u16()),
            5 => Op::Reset(r.u8()),
            _ => Op::Advance(r.u16()),
        }
    }

    /// Encodes `op` so that [`decode`] returns it.
    pub fn encode(w: &mut Writer, op: &Op<'_>) {
        match *op {
            Op::Transfer(t) => w.u8(0).bytes(t),
            Op::Handshake => w.u8(1),
            Op::Syn(s, d) => w.u8(2).u16(s).u16(d),
            Op::Send(i, d) => w.u8(3).u8(i).bytes(d),
            Op::Recv(i, n) => w.u8(4).u8(i).u16(n),
            Op::Reset(i) => w.u8(5).u8(i),
            Op::Advance(ms) => w.u8(6).u16(ms),
        };
    }
}

/// `session_pair`: a host and a device `Session` joined by a faulty cable.
pub mod pair_ops {
    use super::{Reader, Writer};

    /// What the cable does to the next packet of one direction.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fault {
        /// Delivered unchanged.
        Pass,
        /// Lost.
        Drop,
        /// Delivered twice.
        Duplicate,
        /// Delivered after the packet behind it.
        Swap,
        /// One header byte (chosen by `at`) xored with `xor | 1`.
        Corrupt {
            /// Which corruptible header byte.
            at: u8,
            /// The xor mask (bit 0 always set, so the byte changes).
            xor: u8,
        },
    }

    /// One step of the `session_pair` target.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        /// The host opens a connection to the device's port 7.
        Connect,
        /// The host sends up to `n % 4096` pattern bytes on connection `i`.
        HostSend(u8, u16),
        /// The device sends up to `n % 4096` pattern bytes on connection `i`.
        DevSend(u8, u16),
        /// The host reads up to `n % 4096 + 1` bytes of connection `i`.
        HostRead(u8, u16),
        /// The device reads up to `n % 4096 + 1` bytes of connection `i`.
        DevRead(u8, u16),
        /// The host resets connection `i` (and the device releases its end).
        HostReset(u8),
        /// The device resets connection `i` (and the host releases its end).
        DevReset(u8),
        /// The next host → device packet crosses the cable.
        ToDevice(Fault),
        /// The next device → host packet crosses the cable.
        ToHost(Fault),
        /// Time moves by `10 * ms` ms; both sides handle timeouts.
        Advance(u8),
    }

    fn fault(r: &mut Reader<'_>) -> Fault {
        match r.u8() % 5 {
            0 => Fault::Pass,
            1 => Fault::Drop,
            2 => Fault::Duplicate,
            3 => Fault::Swap,
            _ => Fault::Corrupt {
                at: r.u8(),
                xor: r.u8(),
            },
        }
    }

    fn put_fault(w: &mut Writer, f: Fault) {
        match f {
            Fault::Pass => w.u8(0),
            Fault::Drop => w.u8(1),
            Fault::Duplicate => w.u8(2),
            Fault::Swap => w.u8(3),
            Fault::Corrupt { at, xor } => w.u8(4).u8(at).u8(xor),
        };
    }

    /// Decodes the next operation.
    pub fn decode(r: &mut Reader<'_>) -> Op {
        match r.u8() % 10 {
            0 => Op::Connect,
            1 => Op::HostSend(r.u8(), r.u16()),
            2 => Op::DevSend(r.u8(), r.u16()),
            3 => Op::HostRead(r.u8(), r.u16()),
            4 => Op::DevRead(r.u8(), r.u16()),
            5 => Op::HostReset(r.u8()),
            6 => Op::DevReset(r.u8()),
            7 => Op::ToDevice(fault(r)),
            8 => Op::ToHost(fault(r)),
            _ => Op::Advance(r.u8()),
        }
    }

    /// Encodes `op` so that [`decode`] returns it.
    pub fn encode(w: &mut Writer, op: Op) {
        match op {
            Op::Connect => {
                w.u8(0);
            }
            Op::HostSend(i, n) => {
                w.u8(1).u8(i).u16(n);
            }
            Op::DevSend(i, n) => {
                w.u8(2).u8(i).u16(n);
            }
            Op::HostRead(i, n) => {
                w.u8(3).u8(i).u16(n);
            }
            Op::DevRead(i, n) => {
                w.u8(4).u8(i).u16(n);
            }
            Op::HostReset(i) => {
                w.u8(5).u8(i);
            }
            Op::DevReset(i) => {
                w.u8(6).u8(i);
            }
            Op::ToDevice(f) => {
                w.u8(7);
                put_fault(w, f);
            }
            Op::ToHost(f) => {
                w.u8(8);
                put_fault(w, f);
            }
            Op::Advance(ms) => {
                w.u8(9).u8(ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_decode_back() {
        let host = [
            host_ops::Op::Transfer(b"abc"),
            host_ops::Op::VersionReply(2),
            host_ops::Op::Connect(62078),
            host_ops::Op::Send(1, b"xyz"),
            host_ops::Op::Recv(2, 300),
            host_ops::Op::Reset(3),
            host_ops::Op::Advance(1000),
            host_ops::Op::Disconnect,
        ];
        let mut w = Writer::new();
        for op in &host {
            host_ops::encode(&mut w, op);
        }
        let mut r = Reader::new(&w.0);
        for op in &host {
            assert_eq!(&host_ops::decode(&mut r), op);
        }
        assert!(r.is_empty());

        let dev = [
            device_ops::Op::Transfer(b"abc"),
            device_ops::Op::Handshake,
            device_ops::Op::Syn(1, 7),
            device_ops::Op::Send(1, b"xyz"),
            device_ops::Op::Recv(2, 300),
            device_ops::Op::Reset(3),
            device_ops::Op::Advance(1000),
        ];
        let mut w = Writer::new();
        for op in &dev {
            device_ops::encode(&mut w, op);
        }
        let mut r = Reader::new(&w.0);
        for op in &dev {
            assert_eq!(&device_ops::decode(&mut r), op);
        }
        assert!(r.is_empty());

        use pair_ops::{Fault, Op};
        let pair = [
            Op::Connect,
            Op::HostSend(1, 2),
            Op::DevSend(3, 4),
            Op::HostRead(5, 6),
            Op::DevRead(7, 8),
            Op::HostReset(9),
            Op::DevReset(10),
            Op::ToDevice(Fault::Pass),
            Op::ToDevice(Fault::Drop),
            Op::ToHost(Fault::Duplicate),
            Op::ToHost(Fault::Swap),
            Op::ToHost(Fault::Corrupt { at: 3, xor: 0x80 }),
            Op::Advance(11),
        ];
        let mut w = Writer::new();
        for op in pair {
            pair_ops::encode(&mut w, op);
        }
        let mut r = Reader::new(&w.0);
        for op in pair {
            assert_eq!(pair_ops::decode(&mut r), op);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn reader_never_fails() {
        let mut r = Reader::new(&[0x00, 0x05, 1, 2]);
        assert_eq!(r.bytes(), &[1, 2]);
        assert_eq!(r.u32(), 0);
        assert_eq!(r.bytes(), &[] as &[u8]);
        assert!(r.is_empty());
    }
}

/// The "windows never exceeded" check: the right window edges a peer advertised, per
/// connection, and whether a segment we send stays inside them.
pub mod window {
    use std::collections::HashMap;

    use usbmux_core::wire::{
        mux, HeaderKind, MuxPacket, MuxRepr, Protocol, TcpFlags, TcpPacket, TcpRepr,
    };

    /// The TCP segment in a mux packet read with a `kind` header, if it is one.
    pub fn tcp_as(pkt: &[u8], kind: HeaderKind) -> Option<TcpRepr<'_>> {
        let p = MuxPacket::new_checked(pkt, kind).ok()?;
        let r = MuxRepr::parse(&p).ok()?;
        if r.protocol != Protocol::Tcp {
            return None;
        }
        TcpRepr::parse(&TcpPacket::new_checked(p.payload()).ok()?).ok()
    }

    /// The highest right edge (`ack + window`, or `1 + window` from a SYN, our ISN being 0)
    /// the peer advertised on each connection, keyed by (our port, peer port), from every
    /// packet that reached us — under both header forms. A maximum over everything the engine
    /// could have believed is a bound it can never legitimately exceed. An ACK beyond what we
    /// ever sent on that connection is left out: the engine refuses it (and its edge could lie
    /// more than 2^31 ahead, where sequence comparisons wrap).
    #[derive(Debug, Default)]
    pub struct Edges {
        edges: HashMap<(u16, u16), u32>,
        /// The end of the highest sequence we sent on each connection (SYN and FIN count one).
        sent: HashMap<(u16, u16), u32>,
        /// A transfer did not consist of whole packets: the host reassembles a byte stream,
        /// so what it saw can no longer be followed and the check is off.
        pub confused: bool,
    }

    fn raise(map: &mut HashMap<(u16, u16), u32>, key: (u16, u16), value: u32) {
        let e = map.entry(key).or_insert(value);
        if (value.wrapping_sub(*e) as i32) > 0 {
            *e = value;
        }
    }

    impl Edges {
        /// Notes the edges advertised in one transfer from the peer.
        pub fn note_transfer(&mut self, transfer: &[u8]) {
            let mut rest = transfer;
            while !rest.is_empty() {
                let len = match rest.get(4..8) {
                    Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
                    None => 0,
                };
                if len < mux::V1_HEADER_LEN || len > rest.len() {
                    self.confused = true;
                    return;
                }
                let (pkt, tail) = rest.split_at(len);
                for kind in [HeaderKind::V1, HeaderKind::V2] {
                    if let Some(t) = tcp_as(pkt, kind) {
                        self.note(&t);
                    }
                }
                rest = tail;
            }
        }

        /// Notes the edge one segment from the peer advertises.
        pub fn note(&mut self, t: &TcpRepr<'_>) {
            let key = (t.dst_port, t.src_port);
            if t.flags.contains(TcpFlags::SYN) {
                raise(&mut self.edges, key, 1u32.wrapping_add(t.window_bytes()));
            }
            if t.flags.contains(TcpFlags::ACK) {
                let Some(&sent) = self.sent.get(&key) else {
                    return;
                };
                if (t.ack.wrapping_sub(sent) as i32) > 0 {
                    return;
                }
                raise(&mut self.edges, key, t.ack.wrapping_add(t.window_bytes()));
            }
        }

        /// Records `seg`, which we sent, and panics if it carries data beyond every edge the
        /// peer advertised.
        pub fn check(&mut self, seg: &TcpRepr<'_>) {
            let key = (seg.src_port, seg.dst_port);
            let data = seg.payload.len() as u32;
            let rst = seg.flags.contains(TcpFlags::RST);
            if !rst {
                let mut end = seg.seq.wrapping_add(data);
                if seg.flags.intersects(TcpFlags::SYN.union(TcpFlags::FIN)) {
                    end = end.wrapping_add(1);
                }
                raise(&mut self.sent, key, end);
            }
            if data == 0 || rst {
                return;
            }
            let Some(&edge) = self.edges.get(&key) else {
                panic!("data sent before the peer advertised a window: {seg}");
            };
            let end = seg.seq.wrapping_add(data);
            assert!(
                (edge.wrapping_sub(end) as i32) >= 0,
                "data beyond the peer's window (edge {edge}): {seg}"
            );
        }
    }
}
