//! The device thread: one per attached phone. It owns the phone's `Session<Host>` (no lock
//! around the engine), its [`Link`] and every client socket connected to that phone, and moves
//! bytes between them in one `mio` loop:
//!
//! link IN transfers → `handle_transfer` → timers → `poll_transmit` → link OUT;
//! client socket → the packet being built (`Session::poll_transmit_with`: read straight into
//! the payload area of a USB transfer the link lends, only as far as the phone's window allows —
//! backpressure end to end), or, for links that lend no buffers, → `Session::send_buffer`
//! (the connection's ring); `Session::peek` → client socket → `consume` (the window reopens only
//! as the client reads).
//!
//! The control thread hands over a client socket with [`DeviceCmd::Connect`] once the client's
//! Connect request named this phone; from then on every byte of that socket is data.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;

use log::{debug, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use usbmux_core::mux::RecvError;
use usbmux_core::{Buffers, ConnId, Event, Host, Instant, Session, SessionConfig};

use super::stream::ClientStream;
use crate::link::{DeviceIdentity, Link};

/// Connections one phone can carry at once (usbmuxd allows 65 535 source ports per device; a
/// slot costs a few hundred bytes, buffers are allocated per connection).
pub const MAX_CONNECTIONS: usize = 1024;

/// Receive buffer per connection: the window the phone sees. 512 KiB, as usbmuxd2 advertises
/// to real phones (libimobiledevice's usbmuxd advertises 128 KiB from a 256 KiB buffer). Why
/// more than 256 KiB: the daemon announces freed window every half buffer, so the phone can
/// only run that far ahead of its last ACK; with 256 KiB it kept two or three 48 KiB packets
/// queued and one connection device→host was 66.8 MB/s in the VM harness, with 512 KiB 70.6
/// (5 repetitions each in one boot). Memory is taken only where a client falls behind: the
/// phone's bytes go straight to client sockets that keep up.
pub const CONN_RX: usize = 512 * 1024;
/// Send buffer per connection (client bytes waiting for the phone's window).
pub const CONN_TX: usize = 128 * 1024;

type Buf = Box<[u8]>;
type HostSession = Session<Host, Buf, MAX_CONNECTIONS>;

const WAKE: Token = Token(usize::MAX);
/// The link's own event sources (libusb's descriptors when its events are handled inline).
const LINK: Token = Token(usize::MAX - 1);

/// Orders from the control thread.
pub enum DeviceCmd {
    /// Connect `stream` to the phone's `port`; write `ok` to the client when the phone accepts
    /// (then relay bytes), or `refused` and close when it does not.
    Connect {
        /// The client socket (already deregistered from the control thread's poll).
        stream: ClientStream,
        /// Device port, host order.
        port: u16,
        /// The Result OK message, in the client's protocol.
        ok: Vec<u8>,
        /// The Result CONNREFUSED message, in the client's protocol.
        refused: Vec<u8>,
    },
    /// Reset every connection (RSTs go out) and end the thread.
    Stop,
}

/// The orders queue of one device thread. Its thread closes it as it ends and answers what is
/// still queued; from then on [`Inbox::send`] hands each order back, so a Connect is always
/// answered — by the device thread or by the sender — never dropped with the queue (a channel
/// whose receiver is dropped between its last drain and the thread's end loses what was sent
/// in that instant).
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<InboxState>>);

#[derive(Default)]
struct InboxState {
    queue: VecDeque<DeviceCmd>,
    closed: bool,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        // A panic elsewhere while holding the lock leaves a queue that is still consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `cmd`, or gives it back if the thread has closed the inbox.
    fn send(&self, cmd: DeviceCmd) -> Result<(), DeviceCmd> {
        let mut st = self.lock();
        if st.closed {
            return Err(cmd);
        }
        st.queue.push_back(cmd);
        Ok(())
    }

    /// The oldest order, if any.
    fn try_recv(&self) -> Option<DeviceCmd> {
        self.lock().queue.pop_front()
    }

    /// Closes the inbox and returns what was still queued.
    fn close(&self) -> VecDeque<DeviceCmd> {
        let mut st = self.lock();
        st.closed = true;
        std::mem::take(&mut st.queue)
    }

    /// True when only this end is left (the control thread dropped its handle).
    fn orphaned(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }
}

/// What a device thread tells the control thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceNote {
    /// The usbmux handshake completed: the phone can be announced (Attached).
    Ready {
        /// The daemon's DeviceID of this phone.
        device_id: u32,
    },
    /// The phone is gone (unplug, link error, failed handshake, stop); announce Detached if it
    /// had been announced.
    Gone {
        /// The daemon's DeviceID of this phone.
        device_id: u32,
        /// Why, for the log.
        reason: String,
    },
}

/// The control thread's handle on a running device thread.
pub struct DeviceThread {
    /// The DeviceID clients use.
    pub device_id: u32,
    /// Who the phone is.
    pub identity: DeviceIdentity,
    tx: Inbox,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Starts a device thread for `link`. `notify` is called from that thread.
    pub fn spawn(
        device_id: u32,
        link: Box<dyn Link>,
        cfg: SessionConfig,
        first_port: u16,
        notify: Box<dyn Fn(DeviceNote) + Send>,
    ) -> io::Result<DeviceThread> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let tx = Inbox::default();
        let rx = tx.clone();
        let identity = link.identity().clone();
        let w = waker.clone();
        let thread = std::thread::Builder::new()
            .name(format!("device-{device_id}"))
            .spawn(move || {
                let mut d = Device::new(device_id, link, poll, w, rx, cfg, first_port, notify);
                let reason = d.run();
                (d.notify)(DeviceNote::Gone { device_id, reason });
                d.refuse_queued();
            })?;
        Ok(DeviceThread {
            device_id,
            identity,
            tx,
            waker,
            thread: Some(thread),
        })
    }

    /// Sends an order; false if the thread has already ended.
    pub fn send(&self, cmd: DeviceCmd) -> bool {
        self.try_send(cmd).is_ok()
    }

    /// Sends an order; gives it back if the thread has already ended, so a Connect's client
    /// can still be answered.
    pub fn try_send(&self, cmd: DeviceCmd) -> Result<(), DeviceCmd> {
        let r = self.tx.send(cmd);
        let _ = self.waker.wake();
        r
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.send(DeviceCmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.tx.send(DeviceCmd::Stop);
            let _ = self.waker.wake();
            let _ = t.join();
        }
    }
}

/// The monotonic clock at the boundary: `std::time::Instant` → the engine's microseconds.
struct Clock(std::time::Instant);

impl Clock {
    fn now(&self) -> Instant {
        Instant::from_micros(self.0.elapsed().as_micros() as u64)
    }

    /// From `now` (read earlier in the same wake-up) to `t`: a wait measured from a reading
    /// taken microseconds ago ends that much late, which no timer here minds, and saves a
    /// clock read per wake-up (a system call where the clock has no vDSO, as in the VM
    /// harness's guest).
    fn until(now: Instant, t: Instant) -> std::time::Duration {
        std::time::Duration::from_micros(t.total_micros().saturating_sub(now.total_micros()))
    }
}

/// A client socket relayed to one phone connection.
struct Conn {
    id: ConnId,
    stream: Option<ClientStream>,
    port: u16,
    /// Bytes to write before any phone data (the Result OK message).
    prefix: Vec<u8>,
    refused: Vec<u8>,
    connected: bool,
    /// The client closed its sending side: deliver what it wrote, then reset the phone side.
    client_eof: bool,
    /// The phone ended the connection: flush what it sent, then close the client.
    phone_ended: bool,
    /// Edge-triggered readiness, cleared on WouldBlock.
    readable: bool,
    writable: bool,
}

/// The client connection of engine connection `id`, if it still has one.
fn conn_of<'a>(
    conns: &'a mut [Option<Conn>],
    by_id: &HashMap<ConnId, usize>,
    id: ConnId,
) -> Option<&'a mut Conn> {
    conns.get_mut(*by_id.get(&id)?)?.as_mut()
}

/// What one read or write of a client socket came to ([`socket_io`]).
enum SocketIo {
    /// This many bytes moved (a read of 0 is the end of the client's stream).
    Moved(usize),
    /// Nothing now: at `WouldBlock` the readiness flag is cleared, so the poll loop's next
    /// event for the socket sets it again.
    Later,
    /// Any other error: for a read, the client's sending side is over; for a write, the client
    /// is gone.
    Failed,
}

/// One read or write of a client socket, `EINTR` retried (bounded: after 8 in a row it gives
/// `Later` with `ready` still set, so the next turn tries again). One place for what the
/// daemon's four socket paths (ring and direct, each way) make of an outcome.
fn socket_io(ready: &mut bool, mut op: impl FnMut() -> io::Result<usize>) -> SocketIo {
    for _ in 0..8 {
        match op() {
            Ok(n) => return SocketIo::Moved(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *ready = false;
                return SocketIo::Later;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return SocketIo::Failed,
        }
    }
    SocketIo::Later
}

/// The source of `Session::poll_transmit_with`: reads connection `id`'s client socket straight
/// into `dst` (the payload area of the packet being built in a USB transfer). 0 when the client
/// has nothing now (its readiness is cleared at `WouldBlock`, so the next read waits for the
/// poll loop's next readable event) or has ended (`ended` is set, so the loop goes on and
/// `client_output` finishes the connection once its bytes are out).
fn read_client(
    conns: &mut [Option<Conn>],
    by_id: &HashMap<ConnId, usize>,
    id: ConnId,
    dst: &mut [u8],
    ended: &mut bool,
) -> usize {
    let Some(c) = conn_of(conns, by_id, id) else {
        return 0;
    };
    if !c.connected || !c.readable || c.client_eof || c.phone_ended || dst.is_empty() {
        return 0;
    }
    let Some(stream) = c.stream.as_mut() else {
        return 0;
    };
    match socket_io(&mut c.readable, || stream.read(dst)) {
        SocketIo::Moved(0) | SocketIo::Failed => {
            c.client_eof = true;
            *ended = true;
            0
        }
        SocketIo::Moved(n) => n.min(dst.len()),
        SocketIo::Later => 0,
    }
}

/// Phone → client without the receive buffer: writes `data` of connection `id` straight to
/// its client socket and returns how much the socket took (the session queues the rest). Only
/// for a connected client whose Result message is out and whose socket was last seen writable;
/// `WouldBlock` clears that, and any other error takes nothing, so `client_output` meets it
/// again and ends the connection the usual way.
fn write_client(
    conns: &mut [Option<Conn>],
    by_id: &HashMap<ConnId, usize>,
    id: ConnId,
    data: &[u8],
) -> usize {
    let Some(c) = conn_of(conns, by_id, id) else {
        return 0;
    };
    if !c.connected || !c.writable || !c.prefix.is_empty() || data.is_empty() {
        return 0;
    }
    let Some(stream) = c.stream.as_mut() else {
        return 0;
    };
    match socket_io(&mut c.writable, || stream.write(data)) {
        SocketIo::Moved(n) => n.min(data.len()),
        SocketIo::Later | SocketIo::Failed => 0,
    }
}

struct Device {
    device_id: u32,
    link: Box<dyn Link>,
    poll: Poll,
    waker: Arc<Waker>,
    rx: Inbox,
    session: Box<HostSession>,
    notify: Box<dyn Fn(DeviceNote) + Send>,
    clock: Clock,
    conns: Vec<Option<Conn>>,
    by_id: HashMap<ConnId, usize>,
    spare: Vec<Buffers<Buf>>,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    ready: bool,
    /// The link's sources fired: call `Link::handle_ready` before reading it.
    link_ready: bool,
    messages: MessageLog,
    /// A connection's next bytes, read from its client while the phone's window was closed
    /// into the payload area of the OUT buffer the link holds for them ([`Device::read_ahead`]).
    ahead: Option<ReadAhead>,
    /// The connection whose client last filled a whole packet: when its window closes, its
    /// next bytes are read ahead as soon as its client has some.
    ahead_next: Option<ConnId>,
}

/// Bytes read ahead for connection `id`: `len` of them, in place in the link's held buffer
/// (`Link::hold_out_buffer`) at the session's payload area. They go out before anything else
/// that client writes, in the first packet the connection may send ([`Device::send_read_ahead`]).
#[derive(Clone, Copy, Debug)]
struct ReadAhead {
    id: ConnId,
    len: usize,
}

/// CONTROL texts of one phone logged per second; more are counted, not logged.
const MESSAGES_PER_SEC: u32 = 10;

/// Rate limit of the "device says" log line: a phone that floods CONTROL messages must not
/// flood the daemon's log (and its disk) with them.
struct MessageLog {
    device_id: u32,
    window: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl MessageLog {
    fn new(device_id: u32) -> Self {
        MessageLog {
            device_id,
            window: std::time::Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether a message arriving `now` may be logged; reports what an earlier second
    /// suppressed when a new second begins.
    fn admit(&mut self, now: std::time::Instant) -> bool {
        if now.duration_since(self.window) >= std::time::Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!(
                    "device {}: {} more device messages not logged (over {MESSAGES_PER_SEC}/s)",
                    self.device_id, self.suppressed
                );
            }
            self.window = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < MESSAGES_PER_SEC {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Recycled connection buffers kept per device (a burst of short connections reuses them).
const SPARE_BUFFERS: usize = 16;

impl Device {
    #[allow(clippy::too_many_arguments)]
    fn new(
        device_id: u32,
        link: Box<dyn Link>,
        poll: Poll,
        waker: Arc<Waker>,
        rx: Inbox,
        mut cfg: SessionConfig,
        first_port: u16,
        notify: Box<dyn Fn(DeviceNote) + Send>,
    ) -> Self {
        cfg.usb_packet_size = link.identity().max_packet_size;
        Device {
            device_id,
            link,
            poll,
            waker,
            rx,
            session: Box::new(HostSession::new(cfg, first_port)),
            notify,
            clock: Clock(std::time::Instant::now()),
            conns: Vec::new(),
            by_id: HashMap::new(),
            spare: Vec::new(),
            inbuf: vec![0; 256 * 1024],
            outbuf: vec![0; 65536],
            ready: false,
            link_ready: false,
            messages: MessageLog::new(device_id),
            ahead: None,
            ahead_next: None,
        }
    }

    /// The loop; returns why it ended.
    fn run(&mut self) -> String {
        if let Err(e) = self.link.start(self.waker.clone()) {
            return format!("link did not start: {e}");
        }
        if let Err(e) = self.link.register(self.poll.registry(), LINK) {
            return format!("cannot watch the link: {e}");
        }
        let mut events = Events::with_capacity(256);
        loop {
            // One clock read per wake-up, not per turn: a turn takes microseconds, and where the
            // clock has no vDSO (the VM guest's HPET) every read is a system call.
            let now = self.clock.now();
            if let Err(reason) = self.pump(now) {
                self.session.handle_disconnect();
                self.drain_events();
                self.close_all_clients();
                return reason;
            }
            let timeout = [self.session.poll_timeout(), self.link.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .map(|t| Clock::until(now, t));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return format!("poll: {e}");
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    continue;
                }
                if ev.token() == LINK {
                    self.link_ready = true;
                    continue;
                }
                if let Some(Some(c)) = self.conns.get_mut(ev.token().0) {
                    c.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    c.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                }
            }
            match self.commands() {
                Ok(()) => {}
                Err(()) => {
                    self.shutdown();
                    return "stopped".into();
                }
            }
        }
    }

    /// Takes orders; `Err` on Stop (or when the control thread is gone).
    fn commands(&mut self) -> Result<(), ()> {
        loop {
            match self.rx.try_recv() {
                Some(DeviceCmd::Connect {
                    stream,
                    port,
                    ok,
                    refused,
                }) => self.connect(stream, port, ok, refused),
                Some(DeviceCmd::Stop) => return Err(()),
                None if self.rx.orphaned() => return Err(()),
                None => return Ok(()),
            }
        }
    }

    fn buffers(&mut self) -> Buffers<Buf> {
        self.spare.pop().unwrap_or_else(|| {
            Buffers::new(
                vec![0; CONN_RX].into_boxed_slice(),
                vec![0; CONN_TX].into_boxed_slice(),
            )
        })
    }

    fn recycle(&mut self, b: Buffers<Buf>) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(b);
        }
    }

    fn connect(&mut self, mut stream: ClientStream, port: u16, ok: Vec<u8>, refused: Vec<u8>) {
        let bufs = self.buffers();
        match self.session.connect(port, bufs) {
            Ok(id) => {
                let slot = self
                    .conns
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    Token(slot),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    warn!(
                        "device {}: cannot watch a client socket: {e}",
                        self.device_id
                    );
                    if let Ok(b) = self.session.reset(id, "client socket failed") {
                        self.recycle(b);
                    }
                    return;
                }
                debug!(
                    "device {}: connecting to port {port} ({id})",
                    self.device_id
                );
                self.conns[slot] = Some(Conn {
                    id,
                    stream: Some(stream),
                    port,
                    prefix: ok,
                    refused,
                    connected: false,
                    client_eof: false,
                    phone_ended: false,
                    readable: false,
                    writable: true,
                });
                self.by_id.insert(id, slot);
            }
            Err((e, bufs)) => {
                self.recycle(bufs);
                warn!(
                    "device {}: connect to port {port} failed: {e}",
                    self.device_id
                );
                let _ = stream.write_all_bounded(&refused, std::time::Duration::from_secs(1));
            }
        }
    }

    /// Runs the engine until nothing moves: link input, client input, timers, transmits,
    /// events, client output. `Err` when the link failed.
    fn pump(&mut self, now: Instant) -> Result<(), String> {
        for _ in 0..1024 {
            let mut moved = false;
            if std::mem::take(&mut self.link_ready) {
                self.link.handle_ready();
            }
            loop {
                // USB links lend their transfer buffers, and the phone's bytes go from there
                // straight to the client sockets while nothing is queued before them: two
                // copies fewer per byte.
                let (session, conns, by_id) = (&mut self.session, &mut self.conns, &self.by_id);
                let got = self.link.recv_with(now, &mut self.inbuf, &mut |bytes| {
                    session.handle_transfer_with(now, bytes, &mut |id, data| {
                        write_client(conns, by_id, id, data)
                    });
                });
                match got {
                    Ok(Some(_)) => moved = true,
                    Ok(None) => break,
                    Err(e) => return Err(format!("link: {e}")),
                }
            }
            self.link.handle_timeout(now);
            self.session.handle_timeout(now);
            // A link that lends its OUT buffers gets the clients' bytes read straight into
            // them (`read_client`, below); otherwise they go through the send buffers.
            let direct = self.link.lends_out_buffers();
            if !direct {
                moved |= self.client_input();
            }
            // Bytes read ahead go first, once their connection may send again: they came
            // from its client before anything the loop below would read.
            moved |= self.send_read_ahead(now)?;
            let mut client_ended = false;
            // The connection that last filled a whole packet from its client: if its window
            // closed with that, its next bytes are read ahead below.
            let mut filled: Option<ConnId> = None;
            let (conns, by_id) = (&mut self.conns, &self.by_id);
            let waiting = self.ahead.map(|a| a.id);
            let mut source = |id: ConnId, dst: &mut [u8]| {
                // (Cannot happen: a connection with bytes read ahead has a closed window, or
                // `send_read_ahead` would have sent them; kept so no later read overtakes them.)
                if !direct || waiting == Some(id) {
                    return 0;
                }
                let n = read_client(conns, by_id, id, dst, &mut client_ended);
                if n == dst.len() {
                    filled = Some(id);
                }
                n
            };
            loop {
                // Built in place in a free USB transfer when the link has one (one copy fewer
                // per byte), else in `outbuf` and copied by `send`.
                if let Some(buf) = self.link.out_buffer() {
                    match self.session.poll_transmit_with(now, buf, &mut source) {
                        Ok(Some(t)) => {
                            moved = true;
                            if let Err(e) = self.link.send_out_buffer(now, t.len, t.zlp) {
                                return Err(format!("link: {e}"));
                            }
                            continue;
                        }
                        Ok(None) => break,
                        // Smaller than the next packet needs (not with USB's 64 KiB buffers):
                        // build it in `outbuf` below.
                        Err(_) => {}
                    }
                }
                match self
                    .session
                    .poll_transmit_with(now, &mut self.outbuf, &mut source)
                {
                    Ok(Some(t)) => {
                        moved = true;
                        if let Err(e) = self.link.send(now, &self.outbuf[..t.len], t.zlp) {
                            return Err(format!("link: {e}"));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Cannot happen with a buffer of max_transfer bytes; do not spin.
                        return Err(format!(
                            "engine: transmit buffer too small ({} bytes)",
                            e.required
                        ));
                    }
                }
            }
            if filled.is_some() {
                self.ahead_next = filled;
            }
            moved |= self.read_ahead(&mut client_ended);
            // The IN transfers emptied above go back to the phone now, after the OUT
            // transfers their bytes let go (`Link::end_turn`).
            self.link.end_turn();
            moved |= client_ended;
            moved |= self.drain_events();
            moved |= self.client_output();
            if self.session.phase() == usbmux_core::mux::Phase::Dead {
                return Err("usbmux handshake failed".into());
            }
            if !moved {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Reads the next bytes of connection [`Device::ahead_next`] from its client into a
    /// buffer the link holds, once the phone's window for it is closed with nothing queued and
    /// its client has bytes. Why: the ACK that opens the window then finds the next packet's
    /// payload in place, and the reaction to it is one submission instead of a socket read and
    /// a submission — in the VM harness the read was ≈ 100 µs of a ≈ 1.1 ms round trip, and
    /// one connection moves one window per round trip. No copy is added: the bytes are read
    /// where the packet will be built. One connection at a time; true if bytes were read.
    /// `ended` is set when the client's stream ended instead.
    fn read_ahead(&mut self, ended: &mut bool) -> bool {
        let Some(id) = self.ahead_next else {
            return false;
        };
        if self.ahead.is_some() {
            return false;
        }
        match self.session.connection(id) {
            Some(k) if k.peer_window() == 0 => {
                if k.send_queue() != 0 {
                    // Its send buffer goes first (bytes left over from a read-ahead).
                    return false;
                }
            }
            // Gone, or its window is open again: the send loop reads its client.
            _ => {
                self.ahead_next = None;
                return false;
            }
        }
        if !conn_of(&mut self.conns, &self.by_id, id).is_some_and(|c| c.readable) {
            // Nothing from the client yet: its next readable event brings the device thread
            // back here.
            return false;
        }
        let Some(buf) = self.link.hold_out_buffer() else {
            return false;
        };
        let n = match self.session.payload_area(buf.len()) {
            Some(area) => read_client(&mut self.conns, &self.by_id, id, &mut buf[area], ended),
            None => 0,
        };
        if n == 0 {
            self.link.release_held();
            return false;
        }
        self.ahead = Some(ReadAhead { id, len: n });
        self.ahead_next = None;
        true
    }

    /// Sends the bytes read ahead once their connection's window has opened: the packet is
    /// built around them in the held buffer (`Session::poll_transmit_for_with`, which builds
    /// nothing of any other connection there). What the window does not take yet goes to the
    /// connection's send buffer, which is empty (nothing else of this connection was read
    /// meanwhile) and goes out before its client is read again. Gone connections release the
    /// buffer. True if a packet was sent.
    fn send_read_ahead(&mut self, now: Instant) -> Result<bool, String> {
        let Some(ahead) = self.ahead else {
            return Ok(false);
        };
        let Some(k) = self.session.connection(ahead.id) else {
            // Reset or released: its client is being closed, the bytes have nowhere to go.
            self.ahead = None;
            self.link.release_held();
            return Ok(false);
        };
        if k.peer_window() == 0 {
            return Ok(false);
        }
        if k.send_queue() != 0 {
            // Cannot happen (see above); the bytes' order is no longer certain, so the
            // connection ends, visibly, rather than deliver them out of order.
            self.ahead = None;
            self.link.release_held();
            self.reset_conn(ahead.id, "internal error: bytes read ahead out of order");
            return Ok(true);
        }
        let Some(buf) = self.link.hold_out_buffer() else {
            // The link failed or is closing: the next send says so.
            self.ahead = None;
            return Ok(false);
        };
        let Some(area) = self.session.payload_area(buf.len()) else {
            self.ahead = None;
            self.link.release_held();
            return Ok(false);
        };
        let mut taken = 0;
        let built = self
            .session
            .poll_transmit_for_with(now, ahead.id, buf, &mut |_, dst| {
                // `dst` starts where the bytes are (the payload area's start).
                taken = ahead.len.min(dst.len());
                taken
            });
        let t = match built {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(false),
            Err(e) => {
                return Err(format!(
                    "engine: transmit buffer too small ({} bytes)",
                    e.required
                ))
            }
        };
        self.ahead = None;
        // The rest goes to the send buffer straight from the held buffer, before that is
        // submitted (and reused); the send buffer only goes out after this packet.
        let unsent = if taken > 0 {
            &buf[area.start + taken..area.start + ahead.len]
        } else {
            &[]
        };
        let mut queued = 0;
        while queued < unsent.len() {
            match self.session.send(ahead.id, &unsent[queued..]) {
                Ok(n @ 1..) => queued += n,
                _ => break,
            }
        }
        let (queued_all, had_rest) = (queued == unsent.len(), !unsent.is_empty());
        self.link
            .send_held(now, t.len, t.zlp)
            .map_err(|e| format!("link: {e}"))?;
        if !queued_all {
            // The send buffer is smaller than one packet (not with the daemon's sizes).
            self.reset_conn(ahead.id, "internal error: no room for bytes read ahead");
        } else if had_rest {
            // Its client probably has more: read ahead again when the window closes.
            self.ahead_next = Some(ahead.id);
        }
        Ok(true)
    }

    /// Ends connection `id` towards both ends with `reason`.
    fn reset_conn(&mut self, id: ConnId, reason: &str) {
        warn!("device {}: {reason}", self.device_id);
        if let Some(&slot) = self.by_id.get(&id) {
            self.finish(slot, true, reason);
        }
    }

    /// Handles engine events; true if there were any.
    fn drain_events(&mut self) -> bool {
        let mut any = false;
        while let Some(ev) = self.session.poll_event() {
            any = true;
            match ev {
                Event::HandshakeDone { version } => {
                    info!("device {}: usbmux version {version}", self.device_id);
                    if !self.ready {
                        self.ready = true;
                        (self.notify)(DeviceNote::Ready {
                            device_id: self.device_id,
                        });
                    }
                }
                Event::HandshakeFailed => {
                    warn!("device {}: usbmux handshake failed", self.device_id)
                }
                Event::DeviceMessage(m) => {
                    if self.messages.admit(std::time::Instant::now()) {
                        warn!(
                            "device {}: device says ({:?}): {}",
                            self.device_id,
                            m.kind,
                            String::from_utf8_lossy(m.text())
                        )
                    }
                }
                Event::Connected(id) => {
                    if let Some(c) = self.conn_mut(id) {
                        c.connected = true;
                        c.readable = true;
                        c.writable = true;
                    }
                }
                Event::Refused { id, reason } => {
                    info!("device {}: connection refused: {reason}", self.device_id);
                    if let Some(slot) = self.by_id.remove(&id) {
                        if let Some(mut c) = self.conns[slot].take() {
                            if let Some(mut s) = c.stream.take() {
                                let _ = self.poll.registry().deregister(&mut s);
                                let _ = s.write_all_bounded(
                                    &c.refused,
                                    std::time::Duration::from_secs(1),
                                );
                            }
                        }
                    }
                    if let Ok(b) = self.session.reset(id, "") {
                        self.recycle(b);
                    }
                }
                Event::Reset { id, reason } => {
                    let port = self.conn_mut(id).map(|c| c.port).unwrap_or(0);
                    info!(
                        "device {}: connection to port {port} ended: {reason}",
                        self.device_id
                    );
                    if let Some(c) = self.conn_mut(id) {
                        c.phone_ended = true;
                        c.writable = true;
                    }
                }
                Event::Readable(id) => {
                    if let Some(c) = self.conn_mut(id) {
                        c.writable = true;
                    }
                }
                Event::Writable(id) => {
                    if let Some(c) = self.conn_mut(id) {
                        c.readable = true;
                    }
                }
                Event::Incoming { .. } | Event::PeerRestarted => {}
            }
        }
        any
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        conn_of(&mut self.conns, &self.by_id, id)
    }

    /// Client → phone: reads each readable client straight into its connection's send ring.
    fn client_input(&mut self) -> bool {
        let mut moved = false;
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            if !c.connected || !c.readable || c.client_eof || c.phone_ended {
                continue;
            }
            let id = c.id;
            let Some(stream) = c.stream.as_mut() else {
                continue;
            };
            while let Ok(buf) = self.session.send_buffer(id) {
                if buf.is_empty() {
                    // The phone's window is full: stop reading (backpressure); the engine's
                    // Writable event resumes.
                    break;
                }
                match socket_io(&mut c.readable, || stream.read(buf)) {
                    SocketIo::Moved(0) | SocketIo::Failed => {
                        c.client_eof = true;
                        moved = true;
                        break;
                    }
                    SocketIo::Moved(n) => {
                        let _ = self.session.commit(id, n);
                        moved = true;
                    }
                    SocketIo::Later => break,
                }
            }
        }
        moved
    }

    /// Phone → client, and the end of connections.
    fn client_output(&mut self) -> bool {
        let mut moved = false;
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            if !c.connected {
                continue;
            }
            let id = c.id;
            let mut client_gone = false;
            if c.writable {
                let Some(stream) = c.stream.as_mut() else {
                    continue;
                };
                // The Result message first, then the phone's bytes.
                while !c.prefix.is_empty() {
                    match socket_io(&mut c.writable, || stream.write(&c.prefix)) {
                        SocketIo::Moved(n) => {
                            c.prefix.drain(..n);
                            moved = true;
                        }
                        SocketIo::Later => break,
                        SocketIo::Failed => {
                            client_gone = true;
                            break;
                        }
                    }
                }
                while c.writable && c.prefix.is_empty() && !client_gone {
                    let data = match self.session.peek(id) {
                        Ok(d) if !d.is_empty() => d,
                        _ => break,
                    };
                    match socket_io(&mut c.writable, || stream.write(data)) {
                        SocketIo::Moved(n) => {
                            let _ = self.session.consume(id, n);
                            moved = true;
                        }
                        SocketIo::Later => break,
                        SocketIo::Failed => client_gone = true,
                    }
                }
            }
            // Ends: the phone ended and everything it sent is with the client; or the client
            // went away; or the client closed and everything it wrote reached the phone.
            let flushed_to_client =
                c.prefix.is_empty() && matches!(self.session.peek(id), Err(RecvError::Finished));
            // (Bytes read ahead need no check here: their client is not read again, so its end
            // is not seen, until they are sent.)
            let delivered_to_phone = self
                .session
                .connection(id)
                .is_none_or(|k| k.send_queue() == 0);
            if (c.phone_ended && flushed_to_client)
                || client_gone
                || (c.client_eof && delivered_to_phone)
            {
                let phone_ended = c.phone_ended;
                let reason = if client_gone {
                    "client went away"
                } else {
                    "client closed the connection"
                };
                self.finish(slot, phone_ended, reason);
                moved = true;
            }
        }
        moved
    }

    /// Releases a connection: an RST to the phone if it is still open there, and the client
    /// socket closed (reset on TCP if the phone reset it).
    fn finish(&mut self, slot: usize, phone_ended: bool, reason: &str) {
        let Some(mut c) = self.conns[slot].take() else {
            return;
        };
        self.by_id.remove(&c.id);
        if let Ok(b) = self.session.reset(c.id, reason) {
            self.recycle(b);
        }
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
            if phone_ended {
                s.abort();
            }
        }
        debug!(
            "device {}: connection to port {} released",
            self.device_id, c.port
        );
    }

    fn close_all_clients(&mut self) {
        for slot in 0..self.conns.len() {
            if let Some(mut c) = self.conns[slot].take() {
                if let Some(mut s) = c.stream.take() {
                    let _ = self.poll.registry().deregister(&mut s);
                    if !c.connected {
                        let _ =
                            s.write_all_bounded(&c.refused, std::time::Duration::from_millis(100));
                    }
                    s.abort();
                }
            }
        }
        self.by_id.clear();
    }

    /// Connects that were queued while the device went away: answered (refused) rather than
    /// closed without a word. Called after `Gone` was sent; the control thread may still hand
    /// over a Connect until it reads that note: this closes the inbox, so from now on its send
    /// fails and it answers the client itself.
    fn refuse_queued(&mut self) {
        for cmd in self.rx.close() {
            if let DeviceCmd::Connect {
                mut stream,
                refused,
                ..
            } = cmd
            {
                let _ = stream.write_all_bounded(&refused, std::time::Duration::from_millis(100));
            }
        }
    }

    /// Daemon shutdown: every connection is reset (RSTs go out), then the link gets a moment.
    fn shutdown(&mut self) {
        let ids: Vec<ConnId> = self.session.connection_ids().collect();
        for id in ids {
            if let Ok(b) = self.session.reset(id, "usbmuxd shutting down") {
                self.recycle(b);
            }
        }
        let _ = self.pump(self.clock.now());
        self.close_all_clients();
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// An order is taken by the thread or handed back to the sender, at any moment of the
    /// thread's end: what was queued comes out of `close`, and every send after it fails with
    /// the order itself.
    #[test]
    fn an_inbox_never_swallows_an_order() {
        let tx = Inbox::default();
        let rx = tx.clone();
        assert!(!rx.orphaned());
        assert!(tx.send(DeviceCmd::Stop).is_ok());
        assert!(tx.send(DeviceCmd::Stop).is_ok());
        assert!(matches!(rx.try_recv(), Some(DeviceCmd::Stop)));
        let left = rx.close();
        assert_eq!(left.len(), 1, "the order still queued at the close");
        assert!(matches!(tx.send(DeviceCmd::Stop), Err(DeviceCmd::Stop)));
        assert!(rx.try_recv().is_none());
        drop(tx);
        assert!(rx.orphaned());
    }
}
