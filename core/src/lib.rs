//! `usbmux-core` is a deterministic implementation of Apple's usbmux protocol: it performs no I/O,
//! reads no clock and allocates nothing.
//!
//! It is the engine shared by the host daemon (`usbmux-host`), the simulated phone
//! (`usbmux-sim`), gateway firmware and the fuzzers. Everything that decides *which bytes go
//! where* lives here as pure state transitions over caller-sized buffers:
//!
//! - [`wire`]: zero-copy views and `Repr`s of the mux header (v1 and v2), the VERSION packet,
//!   CONTROL packets and the 20-byte pseudo-TCP header.
//! - [`usb`]: the USB transfer rules: one mux packet per OUT transfer, ZLPs, and the
//!   [`usb::Reassembler`] that turns IN transfers back into mux packets.
//! - [`tcp`]: the pseudo-TCP connection state machine (SYN / SYN|ACK / ACK, windows in 256-byte
//!   units, flow control, delayed ACK, RST with a reason).
//! - [`mux`]: [`mux::Session`], the version/setup handshake and a fixed pool of connections, in
//!   either role ([`mux::Host`] or [`mux::Device`]).
//! - [`io`]: a small driver that pumps a `Session` over a non-blocking bulk pipe and lends
//!   connections out as `embedded_io::Read + Write`.
//!
//! Wire facts and the project's protocol decisions are in `shared/PROTOCOL.md`; the layering in
//! `shared/ARCHITECTURE.md`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

#[cfg(test)]
mod tests;

#[macro_use]
mod fmt;

pub mod io;
pub mod mux;
pub mod storage;
pub mod tcp;
pub mod time;
pub mod usb;
pub mod wire;

pub use fmt::Bytes;
pub use mux::{Device, Event, Host, Role, Session, SessionConfig, Transmit};
pub use storage::Buffers;
pub use tcp::{AckPolicy, ConnConfig, ConnId, ResetKind, ResetReason};
pub use time::{Duration, Instant};
