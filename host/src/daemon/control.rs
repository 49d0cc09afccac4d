//! The control thread: accepts clients on the daemon's socket, speaks the usbmuxd client
//! protocol (binary version 0 and plist version 1), keeps the device list and the Listen
//! subscribers, and hands Connect sockets over to device threads.
//!
//! Every message is read to exactly its declared length (never a byte more, so nothing that
//! follows a Connect is taken for a command); a length outside `16..=65536` closes that client
//! with a log line. Replies go out in the requester's protocol with its tag; notifications carry
//! tag 0. One broken or slow client never affects another: each has its own bounded buffers.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use log::{debug, info, warn};
use mio::net::{TcpListener, UnixListener};
use mio::{Events, Interest, Poll, Token, Waker};

use super::device::{DeviceCmd, DeviceNote, DeviceThread};
use super::stream::ClientStream;
use crate::link::{DeviceIdentity, Link};
use crate::pair::PairRecordStore;
use crate::plist_msg::{ClientInfo, DeviceInfo, Listener, PlistRequest, Reply, Request};
use crate::proto::{
    self, BinaryMessage, ConnectRequest, DeviceRecord, Header, MessageType, ProtocolVersion,
    ResultCode,
};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKE: Token = Token(usize::MAX - 2);

/// Bytes a client may have waiting to be written (beyond what its socket buffers) before it
/// is dropped: a Listen client that never reads must not make the daemon buffer without bound.
/// A notification is under 1 KiB, so 256 KiB is hundreds of plug events of backlog, while a
/// thousand stuck listeners cost at most 256 MiB (at 4 MiB they could cost 4 GiB).
const MAX_PENDING_OUT: usize = 256 << 10;

/// Orders to the control thread from outside (the daemon handle, device discovery).
pub enum ControlCmd {
    /// A phone appeared: start its device thread.
    Attach(Box<dyn Link>),
    /// Unplug the phone with this UDID (either form): its device thread stops, listeners hear
    /// Detached. (Simulated phones; USB phones leave by themselves.)
    Detach(String),
    /// Stop everything and return.
    Stop,
    /// Stop if no phone is attached (upstream's `-x`, delivered as SIGUSR1 when `-z` allowed it).
    StopIfIdle,
}

/// The bound listening socket.
pub enum ListenSocket {
    /// A Unix stream socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl ListenSocket {
    fn accept(&self) -> io::Result<ClientStream> {
        match self {
            ListenSocket::Unix(l) => l.accept().map(|(s, _)| ClientStream::Unix(s)),
            ListenSocket::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                ClientStream::Tcp(s)
            }),
        }
    }

    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            ListenSocket::Unix(l) => l,
            ListenSocket::Tcp(l) => l,
        }
    }
}

struct Client {
    stream: ClientStream,
    number: u32,
    /// Bytes of the message being read (header, then body), never more than it declares.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    listening: bool,
    /// The protocol of the client's last request (replies and notifications use it).
    plist: bool,
    info: ClientInfo,
    /// Close once `out` is written.
    closing: bool,
}

struct DeviceEntry {
    thread: DeviceThread,
    info: DeviceInfo,
    announced: bool,
}

/// What the control thread needs to run.
pub struct Control {
    poll: Poll,
    listener: ListenSocket,
    waker: Arc<Waker>,
    cmds: Receiver<ControlCmd>,
    notes_tx: Sender<DeviceNote>,
    notes: Receiver<DeviceNote>,
    clients: Vec<Option<Client>>,
    devices: BTreeMap<u32, DeviceEntry>,
    next_device_id: u32,
    next_client: u32,
    pairs: PairRecordStore,
    session_cfg: usbmux_core::SessionConfig,
    trace: Option<super::trace::SharedTrace>,
}

impl Control {
    /// Sets up the control thread's state over a bound `listener`; returns it with the sender
    /// and waker that feed it commands.
    pub fn new(
        mut listener: ListenSocket,
        pairs: PairRecordStore,
        session_cfg: usbmux_core::SessionConfig,
        trace: Option<super::trace::SharedTrace>,
    ) -> io::Result<(Control, Sender<ControlCmd>, Arc<Waker>)> {
        let poll = Poll::new()?;
        poll.registry()
            .register(listener.source(), LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (tx, cmds) = mpsc::channel();
        let (notes_tx, notes) = mpsc::channel();
        let c = Control {
            poll,
            listener,
            waker: waker.clone(),
            cmds,
            notes_tx,
            notes,
            clients: Vec::new(),
            devices: BTreeMap::new(),
            next_device_id: 1,
            next_client: 1,
            pairs,
            session_cfg,
            trace,
        };
        Ok((c, tx, waker))
    }

    /// Runs until `ControlCmd::Stop`.
    pub fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("poll: {e}");
                }
                continue;
            }
            let mut touched = Vec::new();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    WAKE => {}
                    Token(i) => touched.push(i),
                }
            }
            for i in touched {
                self.service_client(i);
            }
            if !self.commands() {
                break;
            }
            self.device_notes();
        }
        self.shutdown();
    }

    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                ControlCmd::Attach(link) => self.attach(link),
                ControlCmd::Detach(udid) => self.detach(&udid),
                ControlCmd::Stop => return false,
                ControlCmd::StopIfIdle => {
                    if self.devices.is_empty() {
                        info!("no devices attached: exiting as asked");
                        return false;
                    }
                    info!(
                        "asked to exit if idle, but {} device(s) are attached",
                        self.devices.len()
                    );
                }
            }
        }
        true
    }

    fn attach(&mut self, link: Box<dyn Link>) {
        let device_id = self.next_device_id;
        self.next_device_id = self.next_device_id.wrapping_add(1).max(1);
        let id: DeviceIdentity = link.identity().clone();
        let link: Box<dyn Link> = match &self.trace {
            Some(t) => Box::new(super::trace::Traced::new(link, t.clone(), device_id)),
            None => link,
        };
        let info = DeviceInfo {
            device_id,
            product_id: id.product_id,
            location_id: id.location_id,
            speed: id.speed,
            udid: id.udid.clone(),
            usb_serial: id.usb_serial.clone(),
        };
        let notes = self.notes_tx.clone();
        let waker = self.waker.clone();
        let notify = Box::new(move |n: DeviceNote| {
            let _ = notes.send(n);
            let _ = waker.wake();
        });
        // A random first source port, so a restarted daemon does not collide with connections
        // the phone still remembers (PROTOCOL.md §5.6).
        let first_port = random_port();
        match DeviceThread::spawn(device_id, link, self.session_cfg, first_port, notify) {
            Ok(thread) => {
                info!("device {device_id} ({}) attached, handshaking", id.udid);
                self.devices.insert(
                    device_id,
                    DeviceEntry {
                        thread,
                        info,
                        announced: false,
                    },
                );
            }
            Err(e) => warn!("device {}: cannot start its thread: {e}", id.udid),
        }
    }

    fn detach(&mut self, udid: &str) {
        let want = udid.replace('-', "").to_ascii_uppercase();
        let id = self
            .devices
            .iter()
            .find(|(_, d)| d.info.udid.replace('-', "").to_ascii_uppercase() == want)
            .map(|(id, _)| *id);
        let Some(device_id) = id else {
            warn!("detach: no device {udid}");
            return;
        };
        if let Some(d) = self.devices.remove(&device_id) {
            info!("device {device_id} ({}) unplugged", d.info.udid);
            d.thread.stop();
            if d.announced {
                self.broadcast(|c| detached_message(c.plist, device_id));
            }
        }
        // The thread's own Gone note finds no entry and is ignored.
        self.device_notes();
    }

    fn device_notes(&mut self) {
        while let Ok(note) = self.notes.try_recv() {
            match note {
                DeviceNote::Ready { device_id } => {
                    let Some(d) = self.devices.get_mut(&device_id) else {
                        continue;
                    };
                    d.announced = true;
                    info!("device {device_id} ({}) ready", d.info.udid);
                    let info = d.info.clone();
                    self.broadcast(|c| attached_message(c.plist, &info));
                }
                DeviceNote::Gone { device_id, reason } => {
                    let Some(d) = self.devices.remove(&device_id) else {
                        continue;
                    };
                    info!("device {device_id} ({}) gone: {reason}", d.info.udid);
                    if d.announced {
                        self.broadcast(|c| detached_message(c.plist, device_id));
                    }
                    drop(d.thread);
                }
            }
        }
    }

    fn broadcast(&mut self, msg: impl Fn(&Client) -> Option<Vec<u8>>) {
        for i in 0..self.clients.len() {
            let Some(c) = self.clients[i].as_mut() else {
                continue;
            };
            if !c.listening {
                continue;
            }
            if let Some(m) = msg(c) {
                c.out.extend_from_slice(&m);
            }
            self.flush(i);
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok(mut stream) => {
                    let slot = self
                        .clients
                        .iter()
                        .position(Option::is_none)
                        .unwrap_or_else(|| {
                            self.clients.push(None);
                            self.clients.len() - 1
                        });
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!("cannot watch a new client: {e}");
                        continue;
                    }
                    let number = self.next_client;
                    self.next_client = self.next_client.wrapping_add(1);
                    debug!("client {number} connected");
                    self.clients[slot] = Some(Client {
                        stream,
                        number,
                        inbuf: Vec::with_capacity(proto::HEADER_LEN),
                        out: Vec::new(),
                        listening: false,
                        plist: false,
                        info: ClientInfo::default(),
                        closing: false,
                    });
                    self.service_client(slot);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads and handles whole messages from client `i`, then writes what it has pending.
    fn service_client(&mut self, i: usize) {
        loop {
            let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else {
                return;
            };
            if c.closing {
                break;
            }
            // How much of the current message is still missing.
            let want = if c.inbuf.len() < proto::HEADER_LEN {
                proto::HEADER_LEN - c.inbuf.len()
            } else {
                match Header::parse(&c.inbuf) {
                    Ok(h) => h.length as usize - c.inbuf.len(),
                    Err(e) => {
                        warn!("client {}: bad header ({e}); closing", c.number);
                        self.drop_client(i);
                        return;
                    }
                }
            };
            if want == 0 {
                let msg = std::mem::take(&mut c.inbuf);
                if !self.handle_message(i, &msg) {
                    return; // handed over or dropped
                }
                continue;
            }
            let start = c.inbuf.len();
            c.inbuf.resize(start + want, 0);
            match c.stream.read(&mut c.inbuf[start..]) {
                Ok(0) => {
                    debug!("client {} closed", c.number);
                    self.drop_client(i);
                    return;
                }
                Ok(n) => c.inbuf.truncate(start + n),
                Err(e) => {
                    c.inbuf.truncate(start);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => {}
                        _ => {
                            debug!("client {}: {e}", c.number);
                            self.drop_client(i);
                            return;
                        }
                    }
                }
            }
        }
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_client(i);
                    return;
                }
            }
        }
        if c.out.len() > MAX_PENDING_OUT {
            warn!(
                "client {} does not read its notifications; closing",
                c.number
            );
            self.drop_client(i);
        } else if c.closing && c.out.is_empty() {
            self.drop_client(i);
        }
    }

    fn drop_client(&mut self, i: usize) {
        if let Some(mut c) = self.clients.get_mut(i).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Handles one whole message; false if the client is gone (handed over or dropped).
    fn handle_message(&mut self, i: usize, msg: &[u8]) -> bool {
        let Ok((header, body)) = Header::split(msg) else {
            self.drop_client(i);
            return false;
        };
        let tag = header.tag;
        let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else {
            return false;
        };
        if c.listening {
            // PROTOCOL.md decisions: after Listen, any further command → BADCOMMAND and close.
            warn!("client {}: command after Listen; closing", c.number);
            let plist = c.plist;
            self.reply_result(i, plist, tag, ResultCode::BadCommand.into());
            self.close_after_flush(i);
            return false;
        }
        match (header.version, header.message) {
            (ProtocolVersion::Unknown(v), _) => {
                debug!("client {}: header version {v}", c.number);
                self.reply_result(i, false, tag, ResultCode::BadVersion.into());
                true
            }
            (_, MessageType::Plist) => {
                c.plist = true;
                match PlistRequest::parse(body) {
                    Ok(req) => {
                        c.info = req.client.clone();
                        self.plist_request(i, tag, req.request)
                    }
                    Err(e) => {
                        warn!("client {}: {e}", c.number);
                        match e.reply_number() {
                            Some(n) => {
                                self.reply_result(i, true, tag, n);
                                true
                            }
                            None => {
                                self.reply_result(i, true, tag, ResultCode::BadCommand.into());
                                self.close_after_flush(i);
                                false
                            }
                        }
                    }
                }
            }
            (_, MessageType::Connect) => {
                c.plist = false;
                match ConnectRequest::parse(body) {
                    Ok(r) => self.connect(i, tag, r.device_id, r.port),
                    Err(_) => {
                        self.reply_result(i, false, tag, ResultCode::BadCommand.into());
                        true
                    }
                }
            }
            (_, MessageType::Listen) => {
                c.plist = false;
                self.listen(i, tag);
                true
            }
            (_, other) => {
                debug!("client {}: message type {:?}", c.number, other);
                let plist = c.plist;
                self.reply_result(i, plist, tag, ResultCode::BadCommand.into());
                true
            }
        }
    }

    fn close_after_flush(&mut self, i: usize) {
        if let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) {
            c.closing = true;
        }
        self.flush(i);
    }

    fn push(&mut self, i: usize, bytes: Option<Vec<u8>>) {
        if let (Some(c), Some(b)) = (self.clients.get_mut(i).and_then(Option::as_mut), bytes) {
            c.out.extend_from_slice(&b);
        }
    }

    fn reply_result(&mut self, i: usize, plist: bool, tag: u32, n: u32) {
        self.push(i, result_message(plist, tag, n));
    }

    fn plist_request(&mut self, i: usize, tag: u32, req: Request) -> bool {
        match req {
            Request::Listen => {
                self.listen(i, tag);
                true
            }
            Request::Connect { device_id, port } => self.connect(i, tag, device_id, port),
            Request::ListDevices => {
                let list: Vec<DeviceInfo> = self
                    .devices
                    .values()
                    .filter(|d| d.announced)
                    .map(|d| d.info.clone())
                    .collect();
                self.push(i, Reply::DeviceList(&list).encode(tag).ok());
                true
            }
            Request::ListListeners => {
                let infos: Vec<(u32, ClientInfo)> = self
                    .clients
                    .iter()
                    .flatten()
                    .filter(|c| c.listening)
                    .map(|c| (c.number, c.info.clone()))
                    .collect();
                let listeners: Vec<Listener<'_>> = infos
                    .iter()
                    .map(|(n, info)| Listener {
                        number: *n,
                        client: info,
                    })
                    .collect();
                let bytes = Reply::ListenerList(&listeners).encode(tag).ok();
                self.push(i, bytes);
                true
            }
            Request::ReadBUID => {
                match self.pairs.system_buid() {
                    Ok(buid) => {
                        let bytes = Reply::Buid(&buid).encode(tag).ok();
                        self.push(i, bytes);
                    }
                    Err(e) => {
                        warn!("SystemBUID: {e}");
                        self.reply_result(i, true, tag, e.errno());
                    }
                }
                true
            }
            Request::ReadPairRecord { id } => {
                match self.pairs.read(&id) {
                    Ok(data) => {
                        let bytes = Reply::PairRecordData(&data).encode(tag).ok();
                        self.push(i, bytes);
                    }
                    Err(e) => {
                        debug!("ReadPairRecord {id:?}: {e}");
                        self.reply_result(i, true, tag, e.errno());
                    }
                }
                true
            }
            Request::SavePairRecord {
                id,
                data,
                device_id,
            } => {
                match self.pairs.save(&id, &data) {
                    Ok(()) => {
                        self.reply_result(i, true, tag, 0);
                        if let Some(dev) =
                            device_id.filter(|d| self.devices.get(d).is_some_and(|e| e.announced))
                        {
                            self.broadcast(|c| paired_message(c.plist, dev));
                        }
                    }
                    Err(e) => {
                        warn!("SavePairRecord {id:?}: {e}");
                        self.reply_result(i, true, tag, e.errno());
                    }
                }
                true
            }
            Request::DeletePairRecord { id } => {
                let n = match self.pairs.delete(&id) {
                    Ok(()) => 0,
                    Err(e) => {
                        debug!("DeletePairRecord {id:?}: {e}");
                        e.errno()
                    }
                };
                self.reply_result(i, true, tag, n);
                true
            }
            Request::Unknown(name) => {
                debug!("unknown plist request {name:?}");
                self.reply_result(i, true, tag, ResultCode::BadCommand.into());
                true
            }
        }
    }

    fn listen(&mut self, i: usize, tag: u32) {
        let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let plist = c.plist;
        c.listening = true;
        debug!("client {} listens", c.number);
        let mut out = result_message(plist, tag, 0).unwrap_or_default();
        for d in self.devices.values().filter(|d| d.announced) {
            out.extend(attached_message(plist, &d.info).unwrap_or_default());
        }
        self.push(i, Some(out));
    }

    /// Connect: hands the client's socket to the device thread; false (the client left the
    /// control thread) on success.
    fn connect(&mut self, i: usize, tag: u32, device_id: u32, port: u16) -> bool {
        let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else {
            return false;
        };
        let plist = c.plist;
        let Some(dev) = self.devices.get(&device_id).filter(|d| d.announced) else {
            debug!("client {}: Connect to unknown device {device_id}", c.number);
            self.reply_result(i, plist, tag, ResultCode::BadDevice.into());
            return true;
        };
        // Anything still queued for the client (earlier replies) goes first, synchronously: the
        // socket leaves this thread now.
        let Some(mut c) = self.clients[i].take() else {
            return false;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        if !c.out.is_empty()
            && c.stream
                .write_all_bounded(&c.out, std::time::Duration::from_secs(1))
                .is_err()
        {
            return false;
        }
        let ok = result_message(plist, tag, ResultCode::Ok.into()).unwrap_or_default();
        let refused =
            result_message(plist, tag, ResultCode::ConnectionRefused.into()).unwrap_or_default();
        debug!(
            "client {}: Connect to device {device_id} port {port}",
            c.number
        );
        if let Err(DeviceCmd::Connect {
            mut stream,
            refused,
            ..
        }) = dev.thread.try_send(DeviceCmd::Connect {
            stream: c.stream,
            port,
            ok,
            refused,
        }) {
            // The device thread ended a moment ago (its Gone note is on its way): the client
            // still gets an answer.
            info!("device {device_id} is going away; Connect refused");
            let _ = stream.write_all_bounded(&refused, std::time::Duration::from_millis(100));
        }
        false
    }

    fn shutdown(&mut self) {
        for (_, d) in std::mem::take(&mut self.devices) {
            d.thread.stop();
        }
        for i in 0..self.clients.len() {
            self.drop_client(i);
        }
    }
}

fn result_message(plist: bool, tag: u32, n: u32) -> Option<Vec<u8>> {
    if plist {
        Reply::Result(n).encode(tag).ok()
    } else {
        BinaryMessage::Result(ResultCode::from(n)).to_vec(tag).ok()
    }
}

fn attached_message(plist: bool, d: &DeviceInfo) -> Option<Vec<u8>> {
    if plist {
        Reply::Attached(d).encode(0).ok()
    } else {
        let record = DeviceRecord {
            device_id: d.device_id,
            product_id: d.product_id,
            serial: d.serial_number().into_owned(),
            location: d.location_id,
        };
        BinaryMessage::DeviceAdd(record).to_vec(0).ok()
    }
}

fn detached_message(plist: bool, device_id: u32) -> Option<Vec<u8>> {
    if plist {
        Reply::Detached { device_id }.encode(0).ok()
    } else {
        BinaryMessage::DeviceRemove { device_id }.to_vec(0).ok()
    }
}

fn paired_message(plist: bool, device_id: u32) -> Option<Vec<u8>> {
    if plist {
        Reply::Paired { device_id }.encode(0).ok()
    } else {
        BinaryMessage::DevicePaired { device_id }.to_vec(0).ok()
    }
}

/// A random source port in 1..=65535 (the engine skips 0 anyway).
fn random_port() -> u16 {
    let mut b = [0u8; 2];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: fall back to the clock, still better than always 1.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos());
        return (t as u16).max(1);
    }
    u16::from_le_bytes(b).max(1)
}
