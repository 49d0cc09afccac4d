//! The client's side of the wire: opening the socket, writing and reading whole messages under
//! a deadline, and decoding what the daemon sends.
//!
//! Reads never go past the end of the message being read: after a Connect's Result the very
//! next byte may be the device's, and it belongs to the caller.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use plist::{Dictionary, Value};
use usbmux_sim::plist_guard::{self, Limits};

use super::address::SocketAddress;
use super::error::ClientError;
use super::stream::UsbmuxStream;
use crate::proto::{BinaryMessage, Header, MessageType, ResultCode, HEADER_LEN, MAX_BODY_LEN};

/// What a reply body may contain. A device list is the largest reply: one dictionary per
/// device plus one for its properties, so 512 collections allow some 250 devices, far more than
/// fit in the 64 KiB a message may have; the collection count also bounds the parser's
/// recursion, so no daemon can overflow this process's stack.
const REPLY_LIMITS: Limits = Limits {
    max_len: MAX_BODY_LEN,
    max_collections: 512,
    max_depth: 32,
    max_expanded: 4 * MAX_BODY_LEN,
};

/// The time left until `deadline`, or `None` once it has passed (a zero timeout would mean
/// "block forever" to the socket API, so it must never be set).
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Opens a connection to the daemon, giving up on TCP when `deadline` passes.
pub(crate) fn open(
    address: &SocketAddress,
    deadline: Instant,
) -> Result<UsbmuxStream, ClientError> {
    let unreachable = |source: io::Error| ClientError::DaemonUnreachable {
        address: address.to_string(),
        source,
    };
    match address {
        SocketAddress::Unix(path) => Ok(UsbmuxStream::Unix(
            UnixStream::connect(path).map_err(unreachable)?,
        )),
        SocketAddress::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolved to no address");
            for addr in (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(unreachable)?
            {
                let Some(left) = remaining(deadline) else {
                    return Err(ClientError::Timeout);
                };
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(UsbmuxStream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            match last.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Err(ClientError::Timeout),
                _ => Err(unreachable(last)),
            }
        }
    }
}

/// Writes all of `bytes`, failing with [`ClientError::Timeout`] once `deadline` passes.
pub(crate) fn write_all(
    stream: &UsbmuxStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> Result<(), ClientError> {
    let mut w = stream;
    while !bytes.is_empty() {
        let left = remaining(deadline).ok_or(ClientError::Timeout)?;
        stream.set_write_timeout(Some(left))?;
        match w.write(bytes) {
            Ok(0) => return Err(ClientError::Disconnected),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One whole message from the daemon.
#[derive(Debug)]
pub(crate) struct Message {
    pub header: Header,
    pub body: Vec<u8>,
}

/// Reassembles messages from the socket, reading no byte beyond the current message.
///
/// A read that hits its deadline keeps what it has, so the next call goes on where it stopped
/// and a listener can wait for events in slices of time without losing its place.
#[derive(Debug, Default)]
pub(crate) struct MessageReader {
    /// The bytes of the message being read so far.
    buf: Vec<u8>,
}

impl MessageReader {
    /// Reads until a whole message is there (`Ok(Some)`) or `deadline` passes (`Ok(None)`; with
    /// no deadline it waits for ever). The daemon closing the connection is
    /// [`ClientError::Disconnected`]; a header announcing an impossible length is a
    /// [`ClientError::Protocol`] error.
    pub fn read(
        &mut self,
        stream: &UsbmuxStream,
        deadline: Option<Instant>,
    ) -> Result<Option<Message>, ClientError> {
        loop {
            let want = if self.buf.len() < HEADER_LEN {
                HEADER_LEN
            } else {
                let header = Header::parse(&self.buf)
                    .map_err(|e| ClientError::Protocol(format!("bad message header: {e}")))?;
                if self.buf.len() >= header.total_len() {
                    let body = self.buf.split_off(HEADER_LEN);
                    self.buf.clear();
                    return Ok(Some(Message { header, body }));
                }
                header.total_len()
            };
            let timeout = match deadline {
                None => None,
                Some(d) => match remaining(d) {
                    Some(left) => Some(left),
                    None => return Ok(None),
                },
            };
            stream.set_read_timeout(timeout)?;
            let have = self.buf.len();
            self.buf.resize(want, 0);
            let mut r = stream;
            let result = r.read(self.buf.get_mut(have..).unwrap_or_default());
            let n = match result {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(have);
                    match e.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            if deadline.is_some() =>
                        {
                            continue; // the loop sees the deadline has passed
                        }
                        _ => return Err(e.into()),
                    }
                }
            };
            self.buf.truncate(have + n);
            if n == 0 {
                return Err(ClientError::Disconnected);
            }
        }
    }
}

/// A message from the daemon, decoded.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A Result, plist (`{MessageType: Result, Number}`) or binary: its number.
    Result(u32),
    /// Any other plist message: its root dictionary.
    Plist(Dictionary),
    /// Any other binary message.
    Binary(BinaryMessage),
}

/// Decodes a message by its type (not its header version, which some daemons get wrong).
pub(crate) fn decode(msg: &Message) -> Result<Incoming, ClientError> {
    match msg.header.message {
        MessageType::Plist => {
            let dict = parse_dict(&msg.body)?;
            if dict.get("MessageType").and_then(Value::as_string) == Some("Result") {
                let number = dict
                    .get("Number")
                    .and_then(Value::as_unsigned_integer)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        ClientError::Protocol("Result without a usable Number".into())
                    })?;
                return Ok(Incoming::Result(number));
            }
            Ok(Incoming::Plist(dict))
        }
        message => match BinaryMessage::parse_body(message, &msg.body) {
            Ok(BinaryMessage::Result(code)) => Ok(Incoming::Result(u32::from(code))),
            Ok(other) => Ok(Incoming::Binary(other)),
            Err(e) => Err(ClientError::Protocol(format!(
                "bad binary {message:?} message: {e}"
            ))),
        },
    }
}

/// Parses a plist body whose root must be a dictionary (NULs at the end of XML are ignored,
/// in case a C daemon sends its string's terminator).
pub(crate) fn parse_dict(body: &[u8]) -> Result<Dictionary, ClientError> {
    let body = match plist_guard::Format::of(body) {
        plist_guard::Format::Xml => {
            let end = body.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            body.get(..end).unwrap_or_default()
        }
        plist_guard::Format::Binary => body,
    };
    match plist_guard::parse(body, &REPLY_LIMITS) {
        Ok(Value::Dictionary(d)) => Ok(d),
        Ok(_) => Err(ClientError::Protocol(
            "plist reply is not a dictionary".into(),
        )),
        Err(e) => Err(ClientError::Protocol(format!("unusable plist reply: {e}"))),
    }
}

/// Whether a Result number is BADVERSION.
pub(crate) fn is_bad_version(n: u32) -> bool {
    ResultCode::from(n) == ResultCode::BadVersion
}
