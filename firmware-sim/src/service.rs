//! The services a simulated phone runs, by port (`shared/ARCHITECTURE.md`).
//!
//! Each service is a small state machine driven by [`Phone`](crate::phone::Phone): it reads what
//! the host sent and queues what goes back, only as far as the connection's buffers allow, so
//! a slow host slows the service down instead of losing bytes.

use usbmux_core::mux::{RecvError, SendError};
use usbmux_core::{ConnId, Device, Session};

/// Port of the echo service: every byte comes back.
pub const ECHO: u16 = 7;
/// Port of the discard service: bytes are read and dropped.
pub const DISCARD: u16 = 9;
/// Port of the source service: a deterministic pattern, continuously.
pub const SOURCE: u16 = 19;

/// A request/response service over a byte stream (digest, lockdown): it consumes input and
/// produces reply bytes. The runner feeds it only while no earlier reply is waiting to be sent,
/// so a host that does not read cannot make the phone buffer without bound.
pub trait Responder: Send {
    /// Consumes a prefix of `input` and returns its length, appending any reply to `out`.
    /// Input arrives split at arbitrary points (a ring buffer hands out contiguous runs), so a
    /// responder keeps partial frames itself and must consume at least one byte of any
    /// non-empty input. `Err(text)`: the peer broke the protocol; the phone resets the connection
    /// with `text` as the RST reason.
    fn on_input(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String>;
}

/// What runs on one accepted connection.
pub enum Service {
    /// Returns every byte.
    Echo,
    /// Reads and drops.
    Discard,
    /// Writes [`source_byte`]`(offset)` for offsets 0, 1, 2, ... until the host goes away.
    Source {
        /// Bytes written so far.
        offset: u64,
    },
    /// A [`Responder`] and the part of its last reply not yet sent.
    Stream {
        /// The protocol.
        responder: Box<dyn Responder>,
        /// Reply bytes waiting for send-buffer space.
        pending: Vec<u8>,
        /// How much of `pending` was already queued.
        sent: usize,
    },
}

impl core::fmt::Debug for Service {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Service::Echo => f.write_str("Echo"),
            Service::Discard => f.write_str("Discard"),
            Service::Source { offset } => write!(f, "Source({offset})"),
            Service::Stream { pending, sent, .. } => {
                write!(f, "Stream({} pending)", pending.len() - sent)
            }
        }
    }
}

/// What one run of a service did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Nothing could move.
    Idle,
    /// Bytes moved.
    Moved,
    /// The peer broke the protocol: reset the connection with this text.
    Violation(String),
}

impl Service {
    /// The service listening on `port`, or `None` (the phone refuses with RST, as a real one
    /// does).
    pub fn for_port(port: u16, identity: &crate::identity::Identity) -> Option<Service> {
        match port {
            ECHO => Some(Service::Echo),
            DISCARD => Some(Service::Discard),
            SOURCE => Some(Service::Source { offset: 0 }),
            crate::digest::PORT => Some(Service::stream(Box::new(crate::digest::Digest::new()))),
            crate::lockdown::PORT => Some(Service::stream(Box::new(
                crate::lockdown::Lockdown::new(identity),
            ))),
            _ => None,
        }
    }

    /// Wraps a request/response protocol.
    pub fn stream(responder: Box<dyn Responder>) -> Service {
        Service::Stream {
            responder,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// Does as much work as the buffers allow.
    pub fn run<const N: usize, const RX: usize>(
        &mut self,
        session: &mut Session<Device, Vec<u8>, N, RX>,
        id: ConnId,
    ) -> Progress {
        if let Service::Stream {
            responder,
            pending,
            sent,
        } = self
        {
            return run_stream(responder.as_mut(), pending, sent, session, id);
        }
        let moved = self.run_simple(session, id);
        if moved {
            Progress::Moved
        } else {
            Progress::Idle
        }
    }

    fn run_simple<const N: usize, const RX: usize>(
        &mut self,
        session: &mut Session<Device, Vec<u8>, N, RX>,
        id: ConnId,
    ) -> bool {
        match self {
            Service::Stream { .. } => false,
            Service::Echo => {
                let mut moved = false;
                // Copy only what the send buffer takes, so nothing read is ever dropped.
                loop {
                    let room = match session.send_buffer(id) {
                        Ok(b) => b.len(),
                        Err(SendError::Closed | SendError::InvalidHandle) => return moved,
                    };
                    let data = match session.peek(id) {
                        Ok(d) => d,
                        Err(RecvError::Finished | RecvError::InvalidHandle) => return moved,
                    };
                    let n = room.min(data.len());
                    if n == 0 {
                        return moved;
                    }
                    let mut chunk = [0u8; 4096];
                    let n = n.min(chunk.len());
                    chunk[..n].copy_from_slice(&data[..n]);
                    let _ = session.consume(id, n);
                    let _ = session.send(id, &chunk[..n]);
                    moved = true;
                }
            }
            Service::Discard => {
                let mut moved = false;
                while let Ok(data) = session.peek(id) {
                    let n = data.len();
                    if n == 0 {
                        break;
                    }
                    let _ = session.consume(id, n);
                    moved = true;
                }
                moved
            }
            // Written straight into the packets being built (`fill_direct`).
            Service::Source { .. } => false,
        }
    }

    /// Bytes the host sent, offered where they arrived (`Session::handle_transfer_with`) while
    /// the connection's receive buffer is empty; returns how many the service took. Discard
    /// takes them all: a phone that drops what it is sent has no reason to copy it into the
    /// receive buffer first (≈ 40 µs per 48 KiB in the VM harness's emulated guest, on the way
    /// from the host's data to the phone's ACK). The others take theirs from the buffer.
    pub fn take_direct(&mut self, data: &[u8]) -> usize {
        match self {
            Service::Discard => data.len(),
            _ => 0,
        }
    }

    /// The next bytes for the host, written into `dst` — the payload area of the packet being
    /// built (`Session::poll_transmit_with`); returns how many. Source fills it whole: one copy
    /// of its pattern into the packet instead of one into the send buffer and one out of it.
    /// The others send from the buffer.
    pub fn fill_direct(&mut self, dst: &mut [u8]) -> usize {
        match self {
            Service::Source { offset } => {
                fill_source(dst, *offset);
                *offset += dst.len() as u64;
                dst.len()
            }
            _ => 0,
        }
    }
}

fn run_stream<const N: usize, const RX: usize>(
    responder: &mut dyn Responder,
    pending: &mut Vec<u8>,
    sent: &mut usize,
    session: &mut Session<Device, Vec<u8>, N, RX>,
    id: ConnId,
) -> Progress {
    let mut moved = false;
    for _ in 0..1024 {
        // Send what is waiting first.
        if *sent < pending.len() {
            match session.send(id, &pending[*sent..]) {
                Ok(0) => break,
                Ok(n) => {
                    *sent += n;
                    moved = true;
                    continue;
                }
                Err(_) => break,
            }
        }
        pending.clear();
        *sent = 0;
        let input = match session.peek(id) {
            Ok(d) if !d.is_empty() => d,
            _ => break,
        };
        match responder.on_input(input, pending) {
            Ok(0) => break,
            Ok(n) => {
                let _ = session.consume(id, n);
                moved = true;
            }
            Err(text) => return Progress::Violation(text),
        }
    }
    if moved {
        Progress::Moved
    } else {
        Progress::Idle
    }
}

/// The source service's pattern: byte `i` of the stream. Deterministic, cheap and not periodic
/// on any power-of-two boundary a framing bug would hide behind.
pub fn source_byte(i: u64) -> u8 {
    (i % 251) as u8 ^ ((i / 251) as u8).wrapping_mul(7)
}

/// The period of [`source_byte`]: `i % 251` and `(i / 251) as u8` repeat together after
/// 251 × 256 bytes.
const SOURCE_PERIOD: usize = 251 * 256;

/// Writes [`source_byte`]`(offset + i)` into `buf[i]`, copying from one precomputed period: a
/// division per byte made the phone, not the daemon, the bottleneck of throughput benchmarks.
pub fn fill_source(buf: &mut [u8], offset: u64) {
    static PERIOD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let period = PERIOD.get_or_init(|| (0..SOURCE_PERIOD as u64).map(source_byte).collect());
    let mut at = (offset % SOURCE_PERIOD as u64) as usize;
    let mut rest = buf;
    while !rest.is_empty() {
        let n = rest.len().min(SOURCE_PERIOD - at);
        let (head, tail) = rest.split_at_mut(n);
        head.copy_from_slice(&period[at..at + n]);
        rest = tail;
        at = 0;
    }
}

#[cfg(test)]
mod test {
    use super::{fill_source, source_byte, SOURCE_PERIOD};

    #[test]
    fn fill_source_is_source_byte() {
        // Offsets inside, at and across the period boundary; lengths over two periods.
        for offset in [
            0u64,
            1,
            250,
            12_345,
            SOURCE_PERIOD as u64 - 3,
            7 * SOURCE_PERIOD as u64 + 99,
        ] {
            let mut buf = vec![0u8; 2 * SOURCE_PERIOD + 17];
            fill_source(&mut buf, offset);
            for (i, &b) in buf.iter().enumerate() {
                assert_eq!(b, source_byte(offset + i as u64), "offset {offset} + {i}");
            }
        }
    }
}
