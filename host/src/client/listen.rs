//! [`Listener`]: a socket in Listen mode, as a blocking iterator of [`DeviceEvent`]s.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use log::{debug, warn};
use plist::Value;

use super::device::{Device, DeviceEvent};
use super::error::ClientError;
use super::stream::UsbmuxStream;
use super::wire::{decode, Incoming, MessageReader};
use super::Protocol;
use crate::proto::BinaryMessage;

/// A connection in Listen mode: the daemon sends an Attached event for every device present,
/// then one event per change, for as long as the connection stays open.
///
/// As an [`Iterator`] it blocks until the next event; it ends (`None`) when the daemon closes
/// the connection, and after yielding an error. [`next_timeout`](Self::next_timeout) waits a
/// bounded time instead. Messages the library does not know (other message types, devices it
/// cannot decode) are skipped with a log line, since a newer daemon may send more than this
/// library knows. To end a listener blocked in another thread, use a [`ListenStopper`].
#[derive(Debug)]
pub struct Listener {
    stream: UsbmuxStream,
    reader: MessageReader,
    protocol: Protocol,
    done: bool,
}

impl Listener {
    pub(crate) fn new(stream: UsbmuxStream, reader: MessageReader, protocol: Protocol) -> Self {
        Listener {
            stream,
            reader,
            protocol,
            done: false,
        }
    }

    /// The protocol this listener was set up with (binary when the daemon is binary-only).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Waits at most `timeout` for the next event: `Ok(None)` if none came in time. A message
    /// half received when the time runs out is kept, so calls can be repeated without losing
    /// anything. The daemon closing the connection is [`ClientError::Disconnected`].
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<DeviceEvent>, ClientError> {
        let deadline = Instant::now().checked_add(timeout);
        self.next_until(Some(deadline.unwrap_or_else(far_future)))
    }

    /// Waits until `deadline` (or for ever) for the next event.
    pub(crate) fn next_until(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<DeviceEvent>, ClientError> {
        if self.done {
            return Err(ClientError::Disconnected);
        }
        loop {
            let msg = match self.reader.read(&self.stream, deadline) {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            };
            let incoming = match decode(&msg) {
                Ok(i) => i,
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            };
            if let Some(event) = event_of(incoming) {
                return Ok(Some(event));
            }
        }
    }

    /// A handle that ends this listener from another thread.
    pub fn stopper(&self) -> Result<ListenStopper, ClientError> {
        Ok(ListenStopper(self.stream.try_clone()?))
    }

    /// The underlying socket.
    pub fn get_ref(&self) -> &UsbmuxStream {
        &self.stream
    }

    /// Ends the subscription, returning the socket.
    pub fn into_inner(self) -> UsbmuxStream {
        self.stream
    }
}

impl Iterator for Listener {
    type Item = Result<DeviceEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_until(None) {
            Ok(Some(event)) => Some(Ok(event)),
            Ok(None) => None, // cannot happen without a deadline
            Err(ClientError::Disconnected) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Ends a [`Listener`] from another thread: after [`stop`](Self::stop) the listener's
/// iterator returns `None` (its socket is shut down, so a blocked read returns at once).
#[derive(Debug)]
pub struct ListenStopper(UsbmuxStream);

impl ListenStopper {
    /// Shuts the listener's socket down. Calling it again does nothing.
    pub fn stop(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// The event a notification stands for; `None` for anything to skip.
pub(super) fn event_of(incoming: Incoming) -> Option<DeviceEvent> {
    match incoming {
        Incoming::Result(n) => {
            debug!("listener: Result {n} after Listen ignored");
            None
        }
        Incoming::Binary(BinaryMessage::DeviceAdd(record)) => {
            Some(DeviceEvent::Attached(Device::from_record(record)))
        }
        Incoming::Binary(BinaryMessage::DeviceRemove { device_id }) => {
            Some(DeviceEvent::Detached { device_id })
        }
        Incoming::Binary(BinaryMessage::DevicePaired { device_id }) => {
            Some(DeviceEvent::Paired { device_id })
        }
        Incoming::Binary(other) => {
            debug!("listener: {:?} ignored", other.message_type());
            None
        }
        Incoming::Plist(dict) => {
            let message = dict.get("MessageType").and_then(Value::as_string);
            let id = || {
                dict.get("DeviceID")
                    .and_then(Value::as_unsigned_integer)
                    .and_then(|n| u32::try_from(n).ok())
            };
            match message {
                Some("Attached") => match Device::from_attached(&dict) {
                    Ok(device) => Some(DeviceEvent::Attached(device)),
                    Err(e) => {
                        warn!("listener: Attached message skipped: {e}");
                        None
                    }
                },
                Some("Detached") => match id() {
                    Some(device_id) => Some(DeviceEvent::Detached { device_id }),
                    None => {
                        warn!("listener: Detached without a DeviceID skipped");
                        None
                    }
                },
                Some("Paired") => match id() {
                    Some(device_id) => Some(DeviceEvent::Paired { device_id }),
                    None => {
                        warn!("listener: Paired without a DeviceID skipped");
                        None
                    }
                },
                other => {
                    debug!("listener: message {other:?} ignored");
                    None
                }
            }
        }
    }
}

/// A deadline far enough away to mean "never" when `now + timeout` overflows.
fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(86_400 * 365))
        .unwrap_or(now)
}
