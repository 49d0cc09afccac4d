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

/// What runs on one accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Service {
    /// The service listening on `port`, or `None` (the phone refuses with RST, as a real one
    /// does).
    pub fn for_port(port: u16) -> Option<Service> {
        match port {
            ECHO => Some(Service::Echo),
            DISCARD => Some(Service::Discard),
            SOURCE => Some(Service::Source { offset: 0 }),
            _ => None,
        }
    }

    /// Does as much work as the buffers allow; returns true if anything moved.
    pub fn run<const N: usize, const RX: usize>(
        &mut self,
        session: &mut Session<Device, Vec<u8>, N, RX>,
        id: ConnId,
    ) -> bool {
        match self {
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
            Service::Source { offset } => {
                let Ok(buf) = session.send_buffer(id) else {
                    return false;
                };
                let n = buf.len();
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = source_byte(*offset + i as u64);
                }
                let _ = session.commit(id, n);
                *offset += n as u64;
                n > 0
            }
        }
    }
}

/// The source service's pattern: byte `i` of the stream. Deterministic, cheap and not periodic
/// on any power-of-two boundary a framing bug would hide behind.
pub fn source_byte(i: u64) -> u8 {
    (i % 251) as u8 ^ ((i / 251) as u8).wrapping_mul(7)
}
