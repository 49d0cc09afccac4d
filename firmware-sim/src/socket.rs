//! The simulated phone as a separate process: one Unix `SOCK_SEQPACKET` socket per phone, served
//! by [`Server`] (`usbmux-sim serve PATH...`), and the daemon's end of it, [`SimLink`]
//! (`usbmuxd --sim-socket PATH`).
//!
//! # The link protocol (version [`LINK_VERSION`])
//!
//! A connection is one USB cable: a daemon that connects plugs the phone in, closing the
//! connection (or sending UNPLUG) unplugs it. Every connection gets a **fresh phone** — the
//! previous session, its connections and its handshake are gone, as after a real replug.
//!
//! Each datagram is one message; its first byte says which:
//!
//! | type | name | direction | rest of the datagram |
//! |---|---|---|---|
//! | `0x01` | IDENTITY | phone → daemon, first message only | link version `0x01`, then the postcard encoding of `(udid: String, product_id: u16, location_id: u32, speed: u64, max_packet_size: u16, device_name: String)` |
//! | `0x02` | DATA | both | one whole bulk transfer, 1 to [`MAX_TRANSFER_LEN`] bytes |
//! | `0x03` | ZLP | both | nothing: a zero-length packet |
//! | `0x04` | UNPLUG | both | nothing: the cable is pulled; the sender closes next |
//!
//! Postcard encodes integers as unsigned LEB128 varints and strings as a varint length followed
//! by UTF-8. `Identity::simulated(1)` is sent as
//!
//! ```text
//! 01 01 19 "00008030-0000000000000001" a8 25 01 80 f0 f0 e4 01 80 04 12 "Simulated iPhone 1"
//! ```
//!
//! A ZLP has a message of its own because a zero-length datagram cannot be told from the end of
//! the connection. DATA from the daemon goes through a [`VirtualCable`] inside the server, so the
//! phone reads it exactly as from USB: a DATA whose length is a multiple of the identity's
//! `wMaxPacketSize` and is not followed by a ZLP is glued to the next DATA, and the phone (strict:
//! one OUT transfer = one mux packet) answers with a CONTROL error text. The phone sends one DATA
//! per mux packet, followed by a ZLP when the ZLP rule requires it.
//!
//! Both ends receive into buffers of [`RECV_BUFFER_LEN`] (128 KiB, ≥ 64 KiB) bytes. A datagram
//! that fills the buffer completely may have been truncated by the kernel and is rejected as a
//! protocol error, as are an unknown type byte, a ZLP or UNPLUG with a payload, an empty DATA and
//! an IDENTITY anywhere but first from the phone. The server answers a protocol error by closing
//! the connection (the phone is unplugged) and waits for the next daemon.
//!
//! Socket files are created with mode 0600; a stale socket file (nobody listening) is replaced
//! on start, a live one or any other kind of file is left alone and reported.

use std::collections::VecDeque;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self as sock, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use usbmux_core::usb::MAX_PACKET;
use usbmux_core::Instant;

use crate::cable::{VirtualCable, DEVICE_READ_LEN};
use crate::identity::{Identity, IdentityError};
use crate::phone::{Phone, PhoneConfig};
use crate::trace::{Direction, Entry, Record, TraceWriter};

/// Version of the link protocol, sent in IDENTITY.
pub const LINK_VERSION: u8 = 1;

/// Type byte of IDENTITY.
pub const MSG_IDENTITY: u8 = 0x01;
/// Type byte of DATA.
pub const MSG_DATA: u8 = 0x02;
/// Type byte of ZLP.
pub const MSG_ZLP: u8 = 0x03;
/// Type byte of UNPLUG.
pub const MSG_UNPLUG: u8 = 0x04;

/// Size of the receive buffer at both ends; a datagram filling it completely is rejected.
pub const RECV_BUFFER_LEN: usize = 128 * 1024;

/// Largest transfer one DATA message carries (so that type byte + transfer never fill the
/// receive buffer).
pub const MAX_TRANSFER_LEN: usize = RECV_BUFFER_LEN - 2;

/// Frames the server queues for a daemon that does not read, before it stops asking the phone
/// for more (the phone then waits, as on a bus whose host submits no IN transfers).
const OUT_QUEUE_FRAMES: usize = 64;

/// One message of the link protocol, borrowing DATA's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// The phone's identity (first message, phone → daemon). Boxed: an `Identity` is large.
    Identity(Box<Identity>),
    /// One whole bulk transfer.
    Data(&'a [u8]),
    /// A zero-length packet.
    Zlp,
    /// The cable is pulled.
    Unplug,
}

/// The IDENTITY body: only what a host learns over USB, plus the name for logs. Its own type so
/// the wire layout does not follow `Identity`'s fields as they grow.
#[derive(Debug, Serialize, Deserialize)]
struct IdentityWire {
    udid: String,
    product_id: u16,
    location_id: u32,
    speed: u64,
    max_packet_size: u16,
    device_name: String,
}

/// A datagram that is not a message of the link protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// An empty message (cannot be sent as a datagram; only from [`Message::decode`]).
    #[error("empty message")]
    Empty,
    /// The type byte is none of the four.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// A message with a length its type does not allow (ZLP/UNPLUG with a payload, empty DATA).
    #[error("{kind} message of {len} bytes")]
    BadLength {
        /// The message type.
        kind: &'static str,
        /// The datagram's length.
        len: usize,
    },
    /// The datagram filled the receive buffer: it may have been cut, or a transfer is larger
    /// than [`MAX_TRANSFER_LEN`].
    #[error("message of {0} bytes or more is too large")]
    TooLarge(usize),
    /// IDENTITY of a link protocol version this build does not speak.
    #[error("unsupported link version {0}")]
    LinkVersion(u8),
    /// IDENTITY whose body does not decode, or names an impossible phone.
    #[error("bad identity: {0}")]
    BadIdentity(String),
    /// IDENTITY where it is not allowed (from the daemon, or not first).
    #[error("unexpected IDENTITY message")]
    UnexpectedIdentity,
    /// A message other than IDENTITY arrived first from the phone.
    #[error("expected IDENTITY first")]
    ExpectedIdentity,
}

impl<'a> Message<'a> {
    /// Parses one datagram. Never panics.
    pub fn decode(datagram: &'a [u8]) -> Result<Message<'a>, FrameError> {
        let (&ty, rest) = datagram.split_first().ok_or(FrameError::Empty)?;
        let len = datagram.len();
        match ty {
            MSG_IDENTITY => {
                let (&ver, body) = rest.split_first().ok_or(FrameError::BadLength {
                    kind: "IDENTITY",
                    len,
                })?;
                if ver != LINK_VERSION {
                    return Err(FrameError::LinkVersion(ver));
                }
                let w: IdentityWire = match postcard::take_from_bytes(body) {
                    Ok((w, [])) => w,
                    Ok((_, extra)) => {
                        return Err(FrameError::BadIdentity(format!(
                            "{} trailing bytes",
                            extra.len()
                        )))
                    }
                    Err(e) => return Err(FrameError::BadIdentity(e.to_string())),
                };
                let id = Identity {
                    udid: w.udid,
                    product_id: w.product_id,
                    location_id: w.location_id,
                    speed: w.speed,
                    max_packet_size: w.max_packet_size,
                    device_name: w.device_name,
                    ..Identity::default()
                };
                id.validate()
                    .map_err(|e| FrameError::BadIdentity(e.to_string()))?;
                Ok(Message::Identity(Box::new(id)))
            }
            MSG_DATA if rest.is_empty() => Err(FrameError::BadLength { kind: "DATA", len }),
            MSG_DATA => Ok(Message::Data(rest)),
            MSG_ZLP if rest.is_empty() => Ok(Message::Zlp),
            MSG_ZLP => Err(FrameError::BadLength { kind: "ZLP", len }),
            MSG_UNPLUG if rest.is_empty() => Ok(Message::Unplug),
            MSG_UNPLUG => Err(FrameError::BadLength {
                kind: "UNPLUG",
                len,
            }),
            other => Err(FrameError::UnknownType(other)),
        }
    }

    /// The datagram carrying this message. A `Data(&[])` encodes as a ZLP.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Identity(id) => {
                let w = IdentityWire {
                    udid: id.udid.clone(),
                    product_id: id.product_id,
                    location_id: id.location_id,
                    speed: id.speed,
                    max_packet_size: id.max_packet_size,
                    device_name: id.device_name.clone(),
                };
                let mut out = vec![MSG_IDENTITY, LINK_VERSION];
                // Serializing strings and integers into a Vec cannot fail.
                if let Ok(body) = postcard::to_stdvec(&w) {
                    out.extend_from_slice(&body);
                }
                out
            }
            Message::Data([]) | Message::Zlp => vec![MSG_ZLP],
            Message::Data(d) => {
                let mut out = Vec::with_capacity(1 + d.len());
                out.push(MSG_DATA);
                out.extend_from_slice(d);
                out
            }
            Message::Unplug => vec![MSG_UNPLUG],
        }
    }
}

// ---- socket plumbing (nix; every call non-blocking, waits through poll) ----

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(sock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

/// A poll timeout for `d`, rounded up to whole milliseconds so a wait never ends just before a
/// deadline (which would spin). `None` waits forever.
fn poll_timeout(d: Option<Duration>) -> PollTimeout {
    match d {
        None => PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// Waits until `fd` has one of `events` (or an error/hang-up) or `timeout` passes. True if ready.
fn wait_fd(fd: BorrowedFd<'_>, events: PollFlags, timeout: Option<Duration>) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, events)];
    match nix::poll::poll(&mut fds, poll_timeout(timeout)) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends one datagram without blocking: `Ok(false)` if the socket's queue is full.
fn try_send(fd: BorrowedFd<'_>, datagram: &[u8]) -> io::Result<bool> {
    match sock::send(
        fd.as_raw_fd(),
        datagram,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    ) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Receives one datagram without blocking: `Ok(None)` if none is queued, `Ok(Some(0))` at the
/// end of the connection.
fn try_recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match sock::recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
        Ok(n) => Ok(Some(n)),
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn time_left(deadline: Option<std::time::Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()))
}

// ---- the daemon's end ----

/// What [`SimLink::recv`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// One bulk IN transfer (one mux packet, as the phone sends them).
    Data(Vec<u8>),
    /// A zero-length packet (feed it to the session as an empty transfer, or ignore it).
    Zlp,
    /// The phone was unplugged: it sent UNPLUG or closed the connection. Drop the device; connect
    /// again for a fresh phone.
    Unplug,
}

/// Errors of [`SimLink`].
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed (no such path, permission denied, connection reset, ...).
    #[error("sim socket: {0}")]
    Io(#[from] io::Error),
    /// No IDENTITY (connect) or no room to send (send) within the timeout. The server may be
    /// busy with another daemon, or stuck.
    #[error("sim socket: timed out")]
    Timeout,
    /// The phone broke the link protocol; drop the link.
    #[error("sim socket: {0}")]
    Protocol(#[from] FrameError),
    /// The link is already unplugged ([`Received::Unplug`] was returned); connect again.
    #[error("sim socket: unplugged")]
    Unplugged,
}

/// The daemon's end of a simulated phone's socket: a USB cable to one phone.
///
/// `send_transfer` is one bulk OUT transfer; the ZLP rule applies as on real USB (a transfer
/// whose length is a multiple of the identity's `max_packet_size` must be followed by
/// `send_zlp`, or the phone sees it glued to the next one). `recv` yields the phone's IN
/// transfers, one mux packet each, and ZLPs. Every call is bounded by a timeout; the socket is
/// also available through [`AsFd`] for a daemon's own poll loop (readable = `recv` has
/// something).
#[derive(Debug)]
pub struct SimLink {
    fd: OwnedFd,
    buf: Vec<u8>,
    send_timeout: Option<Duration>,
    unplugged: bool,
}

impl SimLink {
    /// How long a send may wait for room in the socket by default.
    pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);

    /// Connects to a phone's socket and reads its IDENTITY, waiting at most `timeout` in all.
    ///
    /// The returned [`Identity`] carries what the link protocol sends (UDID, product id, location,
    /// speed, `max_packet_size`, device name; validated); its other fields (lockdown values) are
    /// defaults. The phone is fresh: start with the VERSION handshake.
    pub fn connect(path: &Path, timeout: Duration) -> Result<(Identity, SimLink), LinkError> {
        let deadline = std::time::Instant::now() + timeout;
        let fd = seqpacket_socket()?;
        let addr = UnixAddr::new(path).map_err(io::Error::from)?;
        loop {
            match sock::connect(fd.as_raw_fd(), &addr) {
                Ok(()) => break,
                // A full backlog: the server is busy; try again until the deadline.
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(LinkError::Timeout);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        let mut link = SimLink {
            fd,
            buf: vec![0; RECV_BUFFER_LEN],
            send_timeout: Some(Self::DEFAULT_SEND_TIMEOUT),
            unplugged: false,
        };
        let Some(n) = link.recv_datagram(time_left(Some(deadline)))? else {
            return Err(LinkError::Timeout);
        };
        if n == 0 {
            return Err(LinkError::Unplugged);
        }
        match Message::decode(&link.buf[..n])? {
            Message::Identity(id) => Ok((*id, link)),
            _ => Err(FrameError::ExpectedIdentity.into()),
        }
    }

    /// Sets how long a send may wait for room (`None`: forever). Default
    /// [`SimLink::DEFAULT_SEND_TIMEOUT`].
    pub fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.send_timeout = timeout;
    }

    /// A second handle on the same link, so one thread can receive while another sends (the
    /// socket is duplicated; each datagram goes to exactly one reader).
    pub fn try_clone(&self) -> Result<SimLink, LinkError> {
        Ok(SimLink {
            fd: self.fd.try_clone()?,
            buf: vec![0; self.buf.len()],
            send_timeout: self.send_timeout,
            unplugged: self.unplugged,
        })
    }

    /// Sends one bulk OUT transfer (an empty one is a ZLP). At most [`MAX_TRANSFER_LEN`] bytes.
    pub fn send_transfer(&mut self, transfer: &[u8]) -> Result<(), LinkError> {
        if transfer.len() > MAX_TRANSFER_LEN {
            return Err(FrameError::TooLarge(transfer.len() + 1).into());
        }
        self.send_raw(&Message::Data(transfer).encode())
    }

    /// Sends a zero-length packet on the OUT endpoint.
    pub fn send_zlp(&mut self) -> Result<(), LinkError> {
        self.send_raw(&[MSG_ZLP])
    }

    /// Pulls the cable: the phone's session ends. Drop the link afterwards.
    pub fn send_unplug(&mut self) -> Result<(), LinkError> {
        let r = self.send_raw(&[MSG_UNPLUG]);
        self.unplugged = true;
        r
    }

    /// Sends any datagram as it is, for tests of how the server copes with garbage. Use the
    /// typed sends otherwise.
    pub fn send_raw(&mut self, datagram: &[u8]) -> Result<(), LinkError> {
        if self.unplugged {
            return Err(LinkError::Unplugged);
        }
        let deadline = self.send_timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if try_send(self.fd.as_fd(), datagram)? {
                return Ok(());
            }
            let left = time_left(deadline);
            if left == Some(Duration::ZERO) {
                return Err(LinkError::Timeout);
            }
            wait_fd(self.fd.as_fd(), PollFlags::POLLOUT, left)?;
        }
    }

    /// The next message from the phone, waiting at most `timeout` (`None`: forever,
    /// `Some(ZERO)`: just look). `Ok(None)`: nothing arrived in time.
    ///
    /// The end of the connection is reported as [`Received::Unplug`], like an UNPLUG message;
    /// after that every call returns [`LinkError::Unplugged`].
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Received>, LinkError> {
        if self.unplugged {
            return Err(LinkError::Unplugged);
        }
        let Some(n) = self.recv_datagram(timeout)? else {
            return Ok(None);
        };
        if n == 0 {
            self.unplugged = true;
            return Ok(Some(Received::Unplug));
        }
        match Message::decode(&self.buf[..n])? {
            Message::Data(d) => Ok(Some(Received::Data(d.to_vec()))),
            Message::Zlp => Ok(Some(Received::Zlp)),
            Message::Unplug => {
                self.unplugged = true;
                Ok(Some(Received::Unplug))
            }
            Message::Identity(_) => Err(FrameError::UnexpectedIdentity.into()),
        }
    }

    /// One datagram into `self.buf`: its length (0 = end of connection), or `None` on timeout.
    fn recv_datagram(&mut self, timeout: Option<Duration>) -> Result<Option<usize>, LinkError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(n) = try_recv(self.fd.as_fd(), &mut self.buf)? {
                if n == self.buf.len() {
                    return Err(FrameError::TooLarge(n).into());
                }
                return Ok(Some(n));
            }
            let left = time_left(deadline);
            if left == Some(Duration::ZERO) {
                return Ok(None);
            }
            wait_fd(self.fd.as_fd(), PollFlags::POLLIN, left)?;
        }
    }
}

impl AsFd for SimLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

// ---- the phone's end ----

/// Why [`Server::bind`] or [`Server::spawn`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No socket path was given.
    #[error("no socket path given")]
    NoPhones,
    /// Another server is listening on this path.
    #[error("{0}: another server is listening there")]
    InUse(PathBuf),
    /// The path exists and is not a socket; it is left alone.
    #[error("{0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// A phone's identity is invalid.
    #[error("{path}: {source}")]
    BadIdentity {
        /// The phone's socket path.
        path: PathBuf,
        /// What is wrong.
        source: IdentityError,
    },
    /// Creating, binding or listening on the socket failed.
    #[error("{path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("starting a phone thread: {0}")]
    Spawn(io::Error),
}

type SharedTrace = Arc<Mutex<TraceWriter<Box<dyn Write + Send>>>>;

/// A bound, listening socket and the phone behind it.
struct Listener {
    index: u32,
    path: PathBuf,
    cfg: PhoneConfig,
    fd: OwnedFd,
    /// (device, inode) of the socket file, so only our own file is removed at the end.
    file_id: (u64, u64),
}

/// Simulated phones served on Unix seqpacket sockets, one socket and one thread per phone.
///
/// [`Server::bind`] creates every socket (so a daemon may connect as soon as it returns), then
/// [`Server::spawn`] starts serving. Each phone's thread waits for a daemon, plugs a fresh
/// [`Phone`] in for it, and runs it until the daemon closes, unplugs or breaks the protocol;
/// then it waits for the next one. One daemon at a time per phone: a second one waits in the
/// listen backlog until the first is gone. Timers use a monotonic clock; threads sleep in
/// `poll(2)` until a message, a timer or a stop.
pub struct Server {
    listeners: Vec<Listener>,
    trace: Option<SharedTrace>,
    log: bool,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("paths", &self.paths())
            .field("trace", &self.trace.is_some())
            .finish()
    }
}

impl Server {
    /// Creates and listens on one socket per phone, numbered from 1 in order. A stale socket
    /// file is replaced; files are made mode 0600.
    pub fn bind<I>(phones: I) -> Result<Server, ServeError>
    where
        I: IntoIterator<Item = (PathBuf, PhoneConfig)>,
    {
        let mut listeners = Vec::new();
        for (i, (path, cfg)) in phones.into_iter().enumerate() {
            cfg.identity
                .validate()
                .map_err(|source| ServeError::BadIdentity {
                    path: path.clone(),
                    source,
                })?;
            let (fd, file_id) = bind_listener(&path)?;
            listeners.push(Listener {
                index: u32::try_from(i + 1).unwrap_or(u32::MAX),
                path,
                cfg,
                fd,
                file_id,
            });
        }
        if listeners.is_empty() {
            return Err(ServeError::NoPhones);
        }
        Ok(Server {
            listeners,
            trace: None,
            log: true,
        })
    }

    /// Records every transfer of every phone to `trace` (see [`crate::trace`]).
    pub fn with_trace<W: Write + Send + 'static>(mut self, trace: TraceWriter<W>) -> Self {
        let w: Box<dyn Write + Send> = Box::new(trace.into_inner());
        self.trace = Some(Arc::new(Mutex::new(TraceWriter::new(w))));
        self
    }

    /// Whether to log plugs, unplugs and protocol errors to stderr (default: yes).
    pub fn with_logging(mut self, on: bool) -> Self {
        self.log = on;
        self
    }

    /// The socket paths, phone 1 first.
    pub fn paths(&self) -> Vec<&Path> {
        self.listeners.iter().map(|l| l.path.as_path()).collect()
    }

    /// Starts one thread per phone.
    pub fn spawn(self) -> Result<RunningServer, ServeError> {
        let (stop_tx, stop_rx) = UnixStream::pair().map_err(ServeError::Spawn)?;
        let epoch = std::time::Instant::now();
        let mut threads = Vec::new();
        let mut files = Vec::new();
        for l in self.listeners {
            files.push((l.path.clone(), l.file_id));
            let ctx = Ctx {
                index: l.index,
                path: l.path,
                cfg: l.cfg,
                trace: self.trace.clone(),
                epoch,
                log: self.log,
            };
            let stop = stop_rx.try_clone().map_err(ServeError::Spawn)?;
            let fd = l.fd;
            let t = std::thread::Builder::new()
                .name(format!("usbmux-sim phone {}", l.index))
                .spawn(move || phone_thread(&ctx, &fd, &stop))
                .map_err(ServeError::Spawn)?;
            threads.push(t);
        }
        Ok(RunningServer {
            stop: Some(stop_tx),
            threads,
            files,
            trace: self.trace,
        })
    }
}

/// A [`Server`] whose threads are running. Dropping it stops them (see [`RunningServer::stop`]).
pub struct RunningServer {
    stop: Option<UnixStream>,
    threads: Vec<JoinHandle<()>>,
    files: Vec<(PathBuf, (u64, u64))>,
    trace: Option<SharedTrace>,
}

impl fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningServer")
            .field("phones", &self.threads.len())
            .finish()
    }
}

impl RunningServer {
    /// Blocks until every phone thread has ended (they only end on [`RunningServer::stop`] from
    /// another handle, so in practice: forever — the command line's `serve`).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops serving: connected daemons get UNPLUG, threads end, the trace is flushed and the
    /// socket files are removed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Closing our end wakes every thread's poll (the other end reads end-of-file).
        self.stop = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(trace) = &self.trace {
            if let Ok(mut t) = trace.lock() {
                let _ = t.flush();
            }
        }
        for (path, id) in self.files.drain(..) {
            if let Ok(m) = fs::symlink_metadata(&path) {
                if m.file_type().is_socket() && (m.dev(), m.ino()) == id {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates the listening socket at `path`, replacing a stale socket file.
fn bind_listener(path: &Path) -> Result<(OwnedFd, (u64, u64)), ServeError> {
    let io_err = |source: io::Error| ServeError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if socket_is_live(path) {
                return Err(ServeError::InUse(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(io_err)?;
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let fd = seqpacket_socket().map_err(io_err)?;
    let addr = UnixAddr::new(path).map_err(|e| io_err(e.into()))?;
    sock::bind(fd.as_raw_fd(), &addr).map_err(|e| io_err(e.into()))?;
    // Narrow the mode before listening: until `listen`, connects are refused anyway.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    let m = fs::symlink_metadata(path).map_err(io_err)?;
    let backlog = Backlog::new(4).map_err(|e| io_err(e.into()))?;
    sock::listen(&fd, backlog).map_err(|e| io_err(e.into()))?;
    Ok((fd, (m.dev(), m.ino())))
}

/// True if something accepts connections at `path` (a live server, not a stale file).
fn socket_is_live(path: &Path) -> bool {
    let Ok(fd) = seqpacket_socket() else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    matches!(
        sock::connect(fd.as_raw_fd(), &addr),
        Ok(()) | Err(Errno::EAGAIN)
    )
}

/// What one phone thread knows.
struct Ctx {
    index: u32,
    path: PathBuf,
    cfg: PhoneConfig,
    trace: Option<SharedTrace>,
    epoch: std::time::Instant,
    log: bool,
}

impl Ctx {
    /// The monotonic clock, converted to the engine's time at this boundary only.
    fn now(&self) -> Instant {
        Instant::from_micros(u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    fn log(&self, msg: fmt::Arguments<'_>) {
        if self.log {
            eprintln!(
                "usbmux-sim: phone {} ({}): {msg}",
                self.index,
                self.path.display()
            );
        }
    }

    fn trace(&self, entry: Entry) {
        let Some(trace) = &self.trace else { return };
        if let Ok(mut t) = trace.lock() {
            // Timestamped under the lock, so records of all phones are in time order.
            let rec = Record {
                phone: self.index,
                micros: self.now().total_micros(),
                entry,
            };
            if let Err(e) = t.write(&rec) {
                self.log(format_args!("trace write failed: {e}"));
            }
        }
    }

    fn trace_transfer(&self, direction: Direction, data: &[u8]) {
        if self.trace.is_some() {
            self.trace(Entry::transfer(direction, data));
        }
    }

    fn flush_trace(&self) {
        if let Some(trace) = &self.trace {
            if let Ok(mut t) = trace.lock() {
                let _ = t.flush();
            }
        }
    }
}

/// How a daemon's session ended.
enum End {
    /// The daemon left or misbehaved; wait for the next one.
    Unplugged(String),
    /// The server is stopping.
    Stop,
}

/// Accepts daemons one after the other until the stop socket says so.
fn phone_thread(ctx: &Ctx, listener: &OwnedFd, stop: &UnixStream) {
    ctx.log(format_args!(
        "serving {} (wMaxPacketSize {})",
        ctx.cfg.identity.udid, ctx.cfg.identity.max_packet_size
    ));
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                ctx.log(format_args!("poll failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if fds[1].any().unwrap_or(false) {
            return;
        }
        if !fds[0].any().unwrap_or(false) {
            continue;
        }
        let conn = match sock::accept(listener) {
            Ok(c) => c,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) | Err(Errno::ECONNABORTED) => continue,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                ctx.log(format_args!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        ctx.log(format_args!("daemon connected: plugged in"));
        ctx.trace(Entry::Plug);
        match run_phone(ctx, &conn, stop) {
            End::Unplugged(reason) => {
                ctx.log(format_args!("unplugged: {reason}"));
                ctx.trace(Entry::Unplug { reason });
                ctx.flush_trace();
            }
            End::Stop => {
                let _ = try_send(conn.as_fd(), &[MSG_UNPLUG]);
                ctx.trace(Entry::Unplug {
                    reason: "server stopped".into(),
                });
                ctx.flush_trace();
                return;
            }
        }
    }
}

/// Runs a fresh phone for one connected daemon until it goes away or the server stops.
fn run_phone(ctx: &Ctx, conn: &OwnedFd, stop: &UnixStream) -> End {
    let mut phone = Phone::new(ctx.cfg.clone());
    let mut cable = VirtualCable::new(ctx.cfg.identity.max_packet_size);
    let mut out: VecDeque<Vec<u8>> = VecDeque::new();
    out.push_back(Message::Identity(Box::new(ctx.cfg.identity.clone())).encode());
    let mut tx = vec![0u8; MAX_PACKET + 1];
    let mut rx = vec![0u8; RECV_BUFFER_LEN];
    loop {
        let now = ctx.now();
        if phone.poll_timeout().is_some_and(|t| t <= now) {
            phone.handle_timeout(now);
        }
        // The phone's IN transfers, as far as the daemon keeps up.
        while out.len() < OUT_QUEUE_FRAMES {
            match phone.poll_transmit(now, &mut tx) {
                Ok(Some(t)) => {
                    let pkt = &tx[..t.len];
                    ctx.trace_transfer(Direction::In, pkt);
                    out.push_back(Message::Data(pkt).encode());
                    if t.zlp {
                        ctx.trace_transfer(Direction::In, &[]);
                        out.push_back(vec![MSG_ZLP]);
                    }
                }
                Ok(None) => break,
                Err(e) if e.required > tx.len() => tx.resize(e.required, 0),
                Err(_) => break,
            }
        }
        while let Some(frame) = out.front() {
            match try_send(conn.as_fd(), frame) {
                Ok(true) => {
                    out.pop_front();
                }
                Ok(false) => break,
                Err(e) => return End::Unplugged(send_failure(conn, &mut rx, &e)),
            }
        }

        // Sleep until the daemon sends, the socket drains, a timer is due or we are stopped.
        let timeout = phone.poll_timeout().map(|t| {
            let us = t.saturating_duration_since(now).total_micros().max(1000);
            Duration::from_micros(us)
        });
        ctx.flush_trace();
        let mut conn_events = PollFlags::POLLIN;
        if !out.is_empty() {
            conn_events |= PollFlags::POLLOUT;
        }
        let mut fds = [
            PollFd::new(conn.as_fd(), conn_events),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, poll_timeout(timeout)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return End::Unplugged(format!("poll failed: {e}")),
        }
        if fds[1].any().unwrap_or(false) {
            return End::Stop;
        }
        let readable = fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
        });
        if readable {
            // A bounded batch, so a flood cannot starve the phone's own output.
            for _ in 0..64 {
                let n = match try_recv(conn.as_fd(), &mut rx) {
                    Ok(None) => break,
                    Ok(Some(0)) => return End::Unplugged("the daemon closed the link".into()),
                    Ok(Some(n)) => n,
                    Err(e) => return End::Unplugged(format!("receive failed: {e}")),
                };
                if n == rx.len() {
                    return End::Unplugged(format!("protocol error: {}", FrameError::TooLarge(n)));
                }
                match Message::decode(&rx[..n]) {
                    Ok(Message::Data(d)) => {
                        ctx.trace_transfer(Direction::Out, d);
                        cable.host_write(d);
                    }
                    Ok(Message::Zlp) => {
                        ctx.trace_transfer(Direction::Out, &[]);
                        cable.host_write_zlp();
                    }
                    Ok(Message::Unplug) => return End::Unplugged("the daemon sent UNPLUG".into()),
                    Ok(Message::Identity(_)) => {
                        return End::Unplugged(format!(
                            "protocol error: {}",
                            FrameError::UnexpectedIdentity
                        ))
                    }
                    Err(e) => return End::Unplugged(format!("protocol error: {e}")),
                }
            }
        }
        let now = ctx.now();
        while let Some(t) = cable.device_read(DEVICE_READ_LEN) {
            phone.handle_transfer(now, &t);
        }
        // Nobody reads the phone's event log here; keep it from growing for as long as a
        // daemon stays connected.
        drop(phone.take_events());
    }
}

/// Why a send to the daemon failed: a daemon that sent UNPLUG and closed makes our send fail
/// before we read its UNPLUG, so look for it among what is still queued.
fn send_failure(conn: &OwnedFd, rx: &mut [u8], e: &io::Error) -> String {
    for _ in 0..1024 {
        match try_recv(conn.as_fd(), rx) {
            Ok(Some(n)) if n > 0 && n < rx.len() => {
                if Message::decode(&rx[..n]) == Ok(Message::Unplug) {
                    return "the daemon sent UNPLUG".into();
                }
            }
            _ => break,
        }
    }
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
            "the daemon closed the link".into()
        }
        _ => format!("sending to the daemon failed: {e}"),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn identity_layout_is_as_documented() {
        let id = Identity::simulated(1);
        let bytes = Message::Identity(Box::new(id.clone())).encode();
        let mut want = vec![0x01, 0x01, 0x19];
        want.extend_from_slice(b"00008030-0000000000000001");
        want.extend_from_slice(&[0xa8, 0x25, 0x01, 0x80, 0xf0, 0xf0, 0xe4, 0x01, 0x80, 0x04]);
        want.push(0x12);
        want.extend_from_slice(b"Simulated iPhone 1");
        assert_eq!(bytes, want);
        assert_eq!(Message::decode(&bytes), Ok(Message::Identity(Box::new(id))));
    }

    #[test]
    fn messages_round_trip_and_garbage_is_rejected() {
        for m in [Message::Data(&[1, 2, 3]), Message::Zlp, Message::Unplug] {
            assert_eq!(Message::decode(&m.encode()), Ok(m.clone()));
        }
        assert_eq!(Message::Data(&[]).encode(), vec![MSG_ZLP]);
        assert_eq!(Message::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Message::decode(&[9]), Err(FrameError::UnknownType(9)));
        assert!(matches!(
            Message::decode(&[MSG_DATA]),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            Message::decode(&[MSG_ZLP, 0]),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            Message::decode(&[MSG_UNPLUG, 0]),
            Err(FrameError::BadLength { .. })
        ));
        assert_eq!(
            Message::decode(&[MSG_IDENTITY, 2]),
            Err(FrameError::LinkVersion(2))
        );
        assert!(matches!(
            Message::decode(&[MSG_IDENTITY, 1, 3, b'a']),
            Err(FrameError::BadIdentity(_))
        ));
        // A well-formed body naming an impossible phone.
        let mut bad = Identity::simulated(1);
        bad.udid = "../../etc".into();
        assert!(matches!(
            Message::decode(&Message::Identity(Box::new(bad)).encode()),
            Err(FrameError::BadIdentity(_))
        ));
        // Every prefix of a good IDENTITY fails cleanly.
        let good = Message::Identity(Box::new(Identity::simulated(7))).encode();
        for n in 0..good.len() {
            assert!(Message::decode(&good[..n]).is_err());
        }
    }
}
