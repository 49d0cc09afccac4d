//! A client of usbmuxd — ours, libimobiledevice's or Apple's — in the manner of libusbmuxd:
//! list and watch devices, open connections to device ports, manage pair records.
//!
//! Every call opens its own connection to the daemon (a socket carries one request, or becomes
//! a Listen or Connect for good; PROTOCOL.md §3.3), sends one request and reads the reply to
//! exactly its length, with a timeout on the whole exchange ([`Client::with_timeout`], 5 s by
//! default), so no call can hang on a daemon that does not answer.
//!
//! **Protocols.** Requests go out as plist messages carrying libusbmuxd's client
//! identification (`ClientVersionString` "usbmux-rs VERSION", `ProgName`,
//! `kLibUSBMuxVersion` 3), which usbmuxd shows in ListListeners. A daemon that answers
//! BADVERSION speaks only the old binary protocol: the request is repeated in binary, and the
//! client remembers it (for itself and its clones), so later calls go binary at once. The
//! binary protocol has only Listen and Connect: ListDevices is then emulated by a Listen that
//! collects DEVICE_ADD messages until none has come for a short quiet period
//! ([`Client::with_quiet_period`], 100 ms like libusbmuxd), and the other requests fail with
//! [`ClientError::Unsupported`].
//!
//! **Address.** [`SocketAddress::resolve`] takes an explicit address (a tool's option), else
//! `USBMUXD_SOCKET_ADDRESS`, else the platform default, in every form real clients write it.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use usbmux_host::client::{Client, DeviceEvent};
//!
//! let client = Client::new()?; // USBMUXD_SOCKET_ADDRESS or /var/run/usbmuxd
//! for device in client.list_devices()? {
//!     println!("{} (id {})", device.udid, device.device_id);
//! }
//! if let Some(device) = client.find_device("00008030001a2b3c4d5e6f70")? {
//!     let mut lockdown = client.connect(device.device_id, 62078)?;
//!     lockdown.write_all(b"...")?;
//! }
//! for event in client.listen()? {
//!     match event? {
//!         DeviceEvent::Attached(d) => println!("+ {}", d.udid),
//!         DeviceEvent::Detached { device_id } => println!("- {device_id}"),
//!         DeviceEvent::Paired { device_id } => println!("paired {device_id}"),
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod address;
#[cfg(feature = "async")]
mod async_listen;
mod device;
mod error;
mod listen;
mod stream;
mod wire;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::debug;
use plist::Value;

pub use self::address::{
    AddressError, SocketAddress, DEFAULT_TCP_HOST, DEFAULT_TCP_PORT, DEFAULT_UNIX_PATH, ENV_VAR,
};
#[cfg(feature = "async")]
pub use self::async_listen::EventStream;
pub use self::device::{udid_eq, ConnectionType, Device, DeviceEvent, ListenerInfo};
pub use self::error::ClientError;
pub use self::listen::{ListenStopper, Listener};
pub use self::stream::UsbmuxStream;

use self::error::{result_error, ResultKind};
use self::wire::{decode, is_bad_version, Incoming, MessageReader};
use crate::plist_msg::{display_udid, ClientInfo, PlistRequest, Request};
use crate::proto::{BinaryMessage, ConnectRequest};

/// How long a call may take by default, as libusbmuxd waits for a result.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the binary ListDevices emulation waits for another DEVICE_ADD before it takes the
/// list as complete (libusbmuxd's value).
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_millis(100);

/// The `kLibUSBMuxVersion` libusbmuxd 2.x sends, and so do we: daemons may use it to decide
/// what a client understands.
pub const LIB_USBMUX_VERSION: u64 = 3;

/// Which protocol requests are sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Plist messages (header version 1): every request exists.
    Plist,
    /// Binary messages (header version 0): only Listen and Connect exist.
    Binary,
}

/// A handle on the daemon: its address and the settings of every call.
///
/// Cheap to clone; clones share what was learnt about the daemon's protocol. It is `Send +
/// Sync`, so threads (one per proxied connection, say) can share one.
#[derive(Debug, Clone)]
pub struct Client {
    address: SocketAddress,
    timeout: Duration,
    quiet: Duration,
    prog_name: Option<String>,
    /// Set once the daemon answered BADVERSION to a plist request (or binary was asked for).
    binary: Arc<AtomicBool>,
    /// The tag of the next request (replies echo it; libusbmuxd counts up from 1 too).
    tag: Arc<AtomicU32>,
}

impl Client {
    /// A client for the daemon named by `USBMUXD_SOCKET_ADDRESS`, or the platform default.
    pub fn new() -> Result<Client, ClientError> {
        Ok(Client::with_address(SocketAddress::from_env()?))
    }

    /// A client for the daemon at `address`.
    pub fn with_address(address: SocketAddress) -> Client {
        Client {
            address,
            timeout: DEFAULT_TIMEOUT,
            quiet: DEFAULT_QUIET_PERIOD,
            prog_name: default_prog_name().clone(),
            binary: Arc::new(AtomicBool::new(false)),
            tag: Arc::new(AtomicU32::new(1)),
        }
    }

    /// Sets how long each call may take as a whole (connecting, sending, the reply; for
    /// [`listen`](Self::listen), until its Result). Default [`DEFAULT_TIMEOUT`].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Sets the quiet period of the binary ListDevices emulation. Default
    /// [`DEFAULT_QUIET_PERIOD`].
    #[must_use]
    pub fn with_quiet_period(mut self, quiet: Duration) -> Client {
        self.quiet = quiet;
        self
    }

    /// Sets the `ProgName` sent with each request (default: the executable's name), which the
    /// daemon shows in ListListeners; `None` sends none.
    #[must_use]
    pub fn with_prog_name(mut self, name: Option<String>) -> Client {
        self.prog_name = name;
        self
    }

    /// Starts with the given protocol. [`Protocol::Binary`] skips the plist attempt for
    /// daemons known to be binary-only; [`Protocol::Plist`] (the default) still falls back on
    /// BADVERSION.
    #[must_use]
    pub fn with_protocol(self, protocol: Protocol) -> Client {
        let binary = Arc::new(AtomicBool::new(protocol == Protocol::Binary));
        Client { binary, ..self }
    }

    /// The daemon's address.
    pub fn address(&self) -> &SocketAddress {
        &self.address
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The protocol the next request goes out in.
    pub fn protocol(&self) -> Protocol {
        if self.binary.load(Ordering::Relaxed) {
            Protocol::Binary
        } else {
            Protocol::Plist
        }
    }

    /// The devices the daemon currently shows.
    ///
    /// Plist ListDevices; on BADCOMMAND (a daemon with plist Listen but no ListDevices) a plist
    /// Listen collecting Attached messages; with a binary-only daemon a binary Listen collecting
    /// DEVICE_ADD. Entries the library cannot decode are skipped (logged), as libusbmuxd does.
    pub fn list_devices(&self) -> Result<Vec<Device>, ClientError> {
        let deadline = self.deadline();
        if self.protocol() == Protocol::Binary {
            return self.collect_devices(Protocol::Binary, deadline);
        }
        let (_, _, reply) = self.plist_call(Request::ListDevices, deadline)?;
        match reply {
            Incoming::Plist(dict) => {
                let list = dict
                    .get("DeviceList")
                    .and_then(Value::as_array)
                    .ok_or_else(|| ClientError::Protocol("reply has no DeviceList".into()))?;
                Ok(list
                    .iter()
                    .filter_map(|entry| {
                        let Some(d) = entry.as_dictionary() else {
                            debug!("ListDevices: entry that is not a dictionary skipped");
                            return None;
                        };
                        Device::from_attached(d)
                            .map_err(|e| debug!("ListDevices: entry skipped: {e}"))
                            .ok()
                    })
                    .collect())
            }
            Incoming::Result(n) if is_bad_version(n) => {
                self.fall_back_to_binary();
                self.collect_devices(Protocol::Binary, deadline)
            }
            Incoming::Result(1) => self.collect_devices(Protocol::Plist, deadline),
            Incoming::Result(n) => Err(unexpected_result(n, ResultKind::Errno)),
            Incoming::Binary(m) => Err(unexpected_binary(&m)),
        }
    }

    /// The device with this UDID, in either form (with or without the hyphen, any case); a USB
    /// entry is preferred over a network one of the same device, as libusbmuxd does. `None`
    /// when no device matches.
    pub fn find_device(&self, udid: &str) -> Result<Option<Device>, ClientError> {
        let mut matches: Vec<Device> = self
            .list_devices()?
            .into_iter()
            .filter(|d| d.matches_udid(udid))
            .collect();
        let usb = matches
            .iter()
            .position(|d| d.connection_type == ConnectionType::Usb);
        Ok(match usb {
            Some(i) => Some(matches.swap_remove(i)),
            None => matches.into_iter().next(),
        })
    }

    /// Subscribes to device events: the returned [`Listener`] yields an Attached event for
    /// every device present, then one per change. The timeout applies until the daemon has
    /// accepted the request; the listener itself waits as long as it is asked to.
    pub fn listen(&self) -> Result<Listener, ClientError> {
        let deadline = self.deadline();
        self.listen_with(self.protocol(), deadline)
    }

    /// Opens a connection to `port` (a plain port number, e.g. 62078 for lockdownd) on device
    /// `device_id`. The returned stream carries the device's bytes only, with no timeouts set.
    ///
    /// Fails with [`ClientError::NoSuchDevice`] for an unknown id and
    /// [`ClientError::ConnectionRefused`] when nothing listens on the port.
    pub fn connect(&self, device_id: u32, port: u16) -> Result<UsbmuxStream, ClientError> {
        let deadline = self.deadline();
        if self.protocol() == Protocol::Plist {
            let (stream, _, reply) =
                self.plist_call(Request::Connect { device_id, port }, deadline)?;
            match reply {
                Incoming::Result(n) if is_bad_version(n) => self.fall_back_to_binary(),
                Incoming::Result(n) => return connected(stream, n),
                Incoming::Plist(_) => {
                    return Err(ClientError::Protocol(
                        "Connect answered without Result".into(),
                    ))
                }
                Incoming::Binary(m) => return Err(unexpected_binary(&m)),
            }
        }
        let request = BinaryMessage::Connect(ConnectRequest { device_id, port });
        let (stream, _, reply) = self.binary_call(&request, deadline)?;
        match reply {
            Incoming::Result(n) => connected(stream, n),
            Incoming::Plist(_) => Err(ClientError::Protocol(
                "binary Connect answered with a plist".into(),
            )),
            Incoming::Binary(m) => Err(unexpected_binary(&m)),
        }
    }

    /// The host's SystemBUID, the id it identifies itself with to devices (created by the
    /// daemon on first use).
    pub fn read_buid(&self) -> Result<String, ClientError> {
        let dict = self.plist_dict_call(Request::ReadBUID, "ReadBUID")?;
        dict.get("BUID")
            .and_then(Value::as_string)
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Protocol("ReadBUID reply has no BUID string".into()))
    }

    /// The pair record stored for `udid` (the bytes of its plist file), or
    /// [`ClientError::NotFound`].
    ///
    /// A 24-hex-digit UDID is sent with its hyphen, the form records are filed under by every
    /// libusbmuxd client, so both forms find the same record.
    pub fn read_pair_record(&self, udid: &str) -> Result<Vec<u8>, ClientError> {
        let id = display_udid(udid).into_owned();
        let dict = self.plist_dict_call(Request::ReadPairRecord { id }, "ReadPairRecord")?;
        match dict.get("PairRecordData") {
            Some(Value::Data(d)) => Ok(d.clone()),
            _ => Err(ClientError::Protocol(
                "ReadPairRecord reply has no PairRecordData".into(),
            )),
        }
    }

    /// Stores `record` (a plist, XML or binary) as the pair record of `udid` (sent hyphenated,
    /// as in [`read_pair_record`](Self::read_pair_record)).
    pub fn save_pair_record(&self, udid: &str, record: &[u8]) -> Result<(), ClientError> {
        self.save(udid, record, None)
    }

    /// Like [`save_pair_record`](Self::save_pair_record), naming the connected device the
    /// record belongs to: the daemon then tells its listeners the device is paired.
    pub fn save_pair_record_for_device(
        &self,
        udid: &str,
        device_id: u32,
        record: &[u8],
    ) -> Result<(), ClientError> {
        self.save(udid, record, Some(device_id))
    }

    fn save(&self, udid: &str, record: &[u8], device_id: Option<u32>) -> Result<(), ClientError> {
        let request = Request::SavePairRecord {
            id: display_udid(udid).into_owned(),
            data: record.to_vec(),
            device_id,
        };
        self.plist_result_call(request, "SavePairRecord")
    }

    /// Removes the pair record of `udid` (sent hyphenated, as in
    /// [`read_pair_record`](Self::read_pair_record)); [`ClientError::NotFound`] if there is
    /// none.
    pub fn delete_pair_record(&self, udid: &str) -> Result<(), ClientError> {
        let id = display_udid(udid).into_owned();
        self.plist_result_call(Request::DeletePairRecord { id }, "DeletePairRecord")
    }

    /// The clients currently in Listen mode.
    pub fn list_listeners(&self) -> Result<Vec<ListenerInfo>, ClientError> {
        let dict = self.plist_dict_call(Request::ListListeners, "ListListeners")?;
        let list = dict
            .get("ListenerList")
            .and_then(Value::as_array)
            .ok_or_else(|| ClientError::Protocol("reply has no ListenerList".into()))?;
        Ok(list
            .iter()
            .filter_map(Value::as_dictionary)
            .map(ListenerInfo::from_dict)
            .collect())
    }

    // ---- plumbing ----

    fn deadline(&self) -> Instant {
        let now = Instant::now();
        // A timeout too large for the clock means "a day": no call could use more.
        now.checked_add(self.timeout)
            .or_else(|| now.checked_add(Duration::from_secs(86_400)))
            .unwrap_or(now)
    }

    fn next_tag(&self) -> u32 {
        // Tag 0 is what notifications carry: skip it when the counter wraps.
        loop {
            let tag = self.tag.fetch_add(1, Ordering::Relaxed);
            if tag != 0 {
                return tag;
            }
        }
    }

    fn fall_back_to_binary(&self) {
        debug!(
            "{}: BADVERSION to a plist request; using the binary protocol",
            self.address
        );
        self.binary.store(true, Ordering::Relaxed);
    }

    fn client_info(&self) -> ClientInfo {
        ClientInfo {
            bundle_id: None,
            client_version: Some(concat!("usbmux-rs ", env!("CARGO_PKG_VERSION")).to_owned()),
            prog_name: self.prog_name.clone(),
            lib_usbmux_version: Some(LIB_USBMUX_VERSION),
        }
    }

    /// Sends one request on a new connection and reads the first message back.
    fn call(
        &self,
        bytes: &[u8],
        tag: u32,
        deadline: Instant,
    ) -> Result<(UsbmuxStream, MessageReader, Incoming), ClientError> {
        let stream = wire::open(&self.address, deadline)?;
        wire::write_all(&stream, bytes, deadline)?;
        let mut reader = MessageReader::default();
        let msg = reader
            .read(&stream, Some(deadline))?
            .ok_or(ClientError::Timeout)?;
        if msg.header.tag != tag {
            // libusbmuxd only warns about this too.
            debug!("reply tag {} to request tag {tag}", msg.header.tag);
        }
        let incoming = decode(&msg)?;
        Ok((stream, reader, incoming))
    }

    fn plist_call(
        &self,
        request: Request,
        deadline: Instant,
    ) -> Result<(UsbmuxStream, MessageReader, Incoming), ClientError> {
        let tag = self.next_tag();
        let bytes = PlistRequest {
            request,
            client: self.client_info(),
        }
        .encode(tag)
        .map_err(|e| ClientError::Protocol(format!("request does not fit a message: {e}")))?;
        self.call(&bytes, tag, deadline)
    }

    fn binary_call(
        &self,
        request: &BinaryMessage,
        deadline: Instant,
    ) -> Result<(UsbmuxStream, MessageReader, Incoming), ClientError> {
        let tag = self.next_tag();
        let bytes = request
            .to_vec(tag)
            .map_err(|e| ClientError::Protocol(format!("request does not encode: {e}")))?;
        self.call(&bytes, tag, deadline)
    }

    /// A plist-only request answered by a dictionary (or a Result with an errno).
    fn plist_dict_call(
        &self,
        request: Request,
        name: &'static str,
    ) -> Result<plist::Dictionary, ClientError> {
        match self.plist_only_call(request, name)? {
            Incoming::Plist(dict) => Ok(dict),
            Incoming::Result(n) => Err(unexpected_result(n, ResultKind::Errno)),
            Incoming::Binary(m) => Err(unexpected_binary(&m)),
        }
    }

    /// A plist-only request answered by a Result.
    fn plist_result_call(&self, request: Request, name: &'static str) -> Result<(), ClientError> {
        match self.plist_only_call(request, name)? {
            Incoming::Result(n) => match result_error(n, ResultKind::Errno) {
                None => Ok(()),
                Some(e) => Err(e),
            },
            Incoming::Plist(_) => Err(ClientError::Protocol(format!(
                "{name} answered without Result"
            ))),
            Incoming::Binary(m) => Err(unexpected_binary(&m)),
        }
    }

    /// A request that exists only as a plist: [`ClientError::Unsupported`] with a binary-only
    /// daemon (found out now or before).
    fn plist_only_call(
        &self,
        request: Request,
        name: &'static str,
    ) -> Result<Incoming, ClientError> {
        if self.protocol() == Protocol::Binary {
            return Err(ClientError::Unsupported { request: name });
        }
        let (_, _, reply) = self.plist_call(request, self.deadline())?;
        match reply {
            Incoming::Result(n) if is_bad_version(n) => {
                self.fall_back_to_binary();
                Err(ClientError::Unsupported { request: name })
            }
            other => Ok(other),
        }
    }

    fn listen_with(&self, protocol: Protocol, deadline: Instant) -> Result<Listener, ClientError> {
        if protocol == Protocol::Plist {
            let (stream, reader, reply) = self.plist_call(Request::Listen, deadline)?;
            match reply {
                Incoming::Result(n) if is_bad_version(n) => self.fall_back_to_binary(),
                Incoming::Result(n) => {
                    return match result_error(n, ResultKind::Device) {
                        None => Ok(Listener::new(stream, reader, Protocol::Plist)),
                        Some(e) => Err(e),
                    }
                }
                Incoming::Plist(_) => {
                    return Err(ClientError::Protocol(
                        "Listen answered without Result".into(),
                    ))
                }
                Incoming::Binary(m) => return Err(unexpected_binary(&m)),
            }
        }
        let (stream, reader, reply) = self.binary_call(&BinaryMessage::Listen, deadline)?;
        match reply {
            Incoming::Result(n) => match result_error(n, ResultKind::Device) {
                None => Ok(Listener::new(stream, reader, Protocol::Binary)),
                Some(e) => Err(e),
            },
            Incoming::Plist(_) => Err(ClientError::Protocol(
                "binary Listen answered with a plist".into(),
            )),
            Incoming::Binary(m) => Err(unexpected_binary(&m)),
        }
    }

    /// ListDevices by Listen: the Attached events that arrive until none has come for the
    /// quiet period (a Detached in between removes its device again).
    fn collect_devices(
        &self,
        protocol: Protocol,
        deadline: Instant,
    ) -> Result<Vec<Device>, ClientError> {
        let mut listener = self.listen_with(protocol, deadline)?;
        let mut devices: Vec<Device> = Vec::new();
        loop {
            let quiet_end = Instant::now()
                .checked_add(self.quiet)
                .map_or(deadline, |q| q.min(deadline));
            match listener.next_until(Some(quiet_end))? {
                Some(DeviceEvent::Attached(d)) => {
                    devices.retain(|x| x.device_id != d.device_id);
                    devices.push(d);
                }
                Some(DeviceEvent::Detached { device_id }) => {
                    devices.retain(|x| x.device_id != device_id);
                }
                Some(DeviceEvent::Paired { .. }) => {}
                None if quiet_end >= deadline => return Err(ClientError::Timeout),
                None => return Ok(devices),
            }
        }
    }
}

/// The stream of a Connect answered with Result `n`: a raw pipe without timeouts on 0.
fn connected(stream: UsbmuxStream, n: u32) -> Result<UsbmuxStream, ClientError> {
    if let Some(e) = result_error(n, ResultKind::Device) {
        return Err(e);
    }
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

fn unexpected_result(n: u32, kind: ResultKind) -> ClientError {
    result_error(n, kind)
        .unwrap_or_else(|| ClientError::Protocol("Result 0 where data was expected".into()))
}

fn unexpected_binary(m: &BinaryMessage) -> ClientError {
    ClientError::Protocol(format!(
        "unexpected binary {:?} message as a reply",
        m.message_type()
    ))
}

/// The executable's short name (argv\[0\] without its directory), as libusbmuxd sends it.
fn default_prog_name() -> &'static Option<String> {
    static NAME: OnceLock<Option<String>> = OnceLock::new();
    NAME.get_or_init(|| {
        let arg0 = std::env::args_os().next().map(std::path::PathBuf::from);
        let path = arg0.or_else(|| std::env::current_exe().ok())?;
        path.file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Client>();
        send_sync::<UsbmuxStream>();
        send_sync::<ClientError>();
        fn send<T: Send>() {}
        send::<Listener>();
    }

    #[test]
    fn requests_identify_the_client() {
        let client = Client::with_address(SocketAddress::Unix("/nonexistent".into()))
            .with_prog_name(Some("probe".into()));
        let info = client.client_info();
        assert_eq!(
            info.client_version.as_deref(),
            Some(concat!("usbmux-rs ", env!("CARGO_PKG_VERSION")))
        );
        assert_eq!(info.prog_name.as_deref(), Some("probe"));
        assert_eq!(info.lib_usbmux_version, Some(3));
        assert!(default_prog_name().is_some(), "the test binary has a name");
        // Connect's port goes out byte-swapped (PROTOCOL.md §3.4).
        let xml = PlistRequest {
            request: Request::Connect {
                device_id: 1,
                port: 62078,
            },
            client: info,
        }
        .to_xml();
        let text = String::from_utf8(xml).expect("utf-8");
        assert!(text.contains("<integer>32498</integer>"), "{text}");
        assert!(text.contains("<string>probe</string>"), "{text}");
    }

    #[test]
    fn tags_skip_zero() {
        let client = Client::with_address(SocketAddress::Unix("/x".into()));
        client.tag.store(u32::MAX, Ordering::Relaxed);
        assert_eq!(client.next_tag(), u32::MAX);
        assert_eq!(client.next_tag(), 1);
    }
}

/// Entry points for the fuzz targets in `fuzz/`: the parts of the library that read what a
/// daemon sends, on arbitrary bytes. Not part of the API (hidden, may change).
#[doc(hidden)]
pub mod fuzzing {
    use plist::Value;

    use super::device::{Device, ListenerInfo};
    use super::wire::{decode, Incoming, Message};
    use crate::proto::{Header, HEADER_LEN};

    /// Reads `bytes` as one reply or notification from a daemon, as the calls do — header,
    /// body, Result / plist / binary decoding — then takes devices, listeners and events out of
    /// what decoded, as ListDevices, ListListeners and a listener do. Returns how many of those
    /// it understood (so the work cannot be optimised away); errors are results, never panics.
    pub fn decode_reply(bytes: &[u8]) -> usize {
        let Ok(header) = Header::parse(bytes) else {
            return 0;
        };
        let Some(body) = bytes.get(HEADER_LEN..header.total_len()) else {
            return 0;
        };
        let msg = Message {
            header,
            body: body.to_vec(),
        };
        let Ok(incoming) = decode(&msg) else {
            return 0;
        };
        let mut understood = 1;
        if let Incoming::Plist(dict) = &incoming {
            let entries = |key: &str| {
                dict.get(key)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_dictionary)
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            };
            understood += entries("DeviceList")
                .into_iter()
                .filter(|d| Device::from_attached(d).is_ok())
                .count();
            understood += entries("ListenerList")
                .into_iter()
                .map(ListenerInfo::from_dict)
                .count();
        }
        understood + usize::from(super::listen::event_of(incoming).is_some())
    }
}
