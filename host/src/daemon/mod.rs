//! The `usbmuxd` daemon: a control thread for the client protocol (`control`) and one device
//! thread per phone (`device`). Concurrency model and why: `host/README.md`.

pub mod control;
pub mod device;
pub mod sim;
pub mod socket_link;
pub mod stream;
pub mod trace;

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::info;
use usbmux_sim::PhoneConfig;

use self::control::{Control, ControlCmd, ListenSocket};
use crate::link::Link;
use crate::pair::PairRecordStore;

/// Where clients find the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSpec {
    /// A Unix stream socket at this path, with this mode (usbmuxd's is 0666).
    Unix {
        /// The socket file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A TCP socket (`-S ADDR:PORT`).
    Tcp(SocketAddr),
}

impl SocketSpec {
    /// Parses `-S`'s argument: anything with a ':' is `ADDR:PORT` (IPv6 in brackets), else a path.
    pub fn parse(arg: &str, unix_mode: u32) -> Result<SocketSpec, String> {
        if arg.contains(':') {
            arg.parse::<SocketAddr>()
                .map(SocketSpec::Tcp)
                .map_err(|e| format!("bad socket address {arg:?}: {e}"))
        } else if arg.is_empty() {
            Err("empty socket path".into())
        } else {
            Ok(SocketSpec::Unix {
                path: PathBuf::from(arg),
                mode: unix_mode,
            })
        }
    }

    /// What a client puts in `USBMUXD_SOCKET_ADDRESS` to reach this socket.
    pub fn client_address(&self) -> String {
        match self {
            SocketSpec::Unix { path, .. } => format!("UNIX:{}", path.display()),
            SocketSpec::Tcp(a) => a.to_string(),
        }
    }
}

/// Everything the daemon needs to start.
#[derive(Debug)]
pub struct DaemonConfig {
    /// A listening socket handed over by the service manager (systemd socket activation); used
    /// instead of binding `socket` when present.
    pub activated: Option<ActivatedSocket>,
    /// The client socket.
    pub socket: SocketSpec,
    /// Pair records and SystemConfiguration.plist.
    pub config_dir: PathBuf,
    /// In-process simulated phones to attach at start.
    pub simulate: Vec<PhoneConfig>,
    /// Sockets of phones served by `usbmux-sim serve`, kept plugged in while they exist.
    pub sim_sockets: Vec<PathBuf>,
    /// Engine settings for every device session.
    pub session: usbmux_core::SessionConfig,
    /// Record every transfer of every phone in this file (`usbmux-sim dump` reads it).
    pub trace: Option<PathBuf>,
    /// Serve USB phones (libusb hotplug or a 1 s poll). Unavailable USB is logged, not fatal.
    pub usb: bool,
    /// `-n`: no hotplug and no poll; USB is scanned at start and when the handle from
    /// [`RunningDaemon::usb_rescanner`] asks.
    pub usb_on_demand: bool,
}

/// A running daemon (the control thread and its devices).
pub struct RunningDaemon {
    usb: Option<crate::usb::Watcher>,
    /// Remove the socket file at stop (we bound it; an activated one belongs to systemd).
    owns_socket: bool,
    watchers: Vec<socket_link::SocketWatcher>,
    cmds: Sender<ControlCmd>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<()>>,
    socket: SocketSpec,
}

impl RunningDaemon {
    /// The socket it listens on (with the real port if `-S` asked for port 0).
    pub fn socket(&self) -> &SocketSpec {
        &self.socket
    }

    /// Attaches a phone.
    pub fn attach(&self, link: Box<dyn Link>) {
        let _ = self.cmds.send(ControlCmd::Attach(link));
        let _ = self.waker.wake();
    }

    /// A handle that asks the USB watcher to scan the device list (`-n` mode, SIGUSR2); `None`
    /// without USB.
    pub fn usb_rescanner(&self) -> Option<crate::usb::Rescanner> {
        self.usb.as_ref().map(crate::usb::Watcher::rescanner)
    }

    /// Unplugs the phone with this UDID (either form).
    pub fn detach(&self, udid: &str) {
        let _ = self.cmds.send(ControlCmd::Detach(udid.to_owned()));
        let _ = self.waker.wake();
    }

    /// Stops every device (resetting their connections) and the control thread, and waits.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    /// Waits until the daemon stops (by `stopper`, a signal or `-x`), then cleans up as `stop`
    /// does (removes the socket file it created).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.watchers.clear();
        self.usb = None;
        self.remove_socket();
    }

    fn remove_socket(&self) {
        if let (true, SocketSpec::Unix { path, .. }) = (self.owns_socket, &self.socket) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// A handle that can stop the daemon from another thread (a signal handler's thread):
    /// called with `true` it stops only if no phone is attached.
    pub fn stopper(&self) -> impl Fn(bool) + Send + 'static {
        let cmds = self.cmds.clone();
        let waker = self.waker.clone();
        move |only_if_idle| {
            let _ = cmds.send(if only_if_idle {
                ControlCmd::StopIfIdle
            } else {
                ControlCmd::Stop
            });
            let _ = waker.wake();
        }
    }

    fn stop_inner(&mut self) {
        // No reconnecting while everything shuts down.
        self.watchers.clear();
        self.usb = None;
        let _ = self.cmds.send(ControlCmd::Stop);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.remove_socket();
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner();
        }
    }
}

/// A listening socket inherited from the service manager.
#[derive(Debug)]
pub enum ActivatedSocket {
    /// A Unix stream socket (its path, for the log and for clients).
    Unix(std::os::unix::net::UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
}

/// Binds the socket (removing a stale socket file first) or takes the activated one, opens the
/// pair-record store, starts the control thread and attaches the simulated phones. USB links
/// get the default [`PipeConfig`](crate::usb::PipeConfig); see [`start_with_usb_pipe`].
pub fn start(cfg: DaemonConfig) -> io::Result<RunningDaemon> {
    start_with_usb_pipe(cfg, crate::usb::PipeConfig::default())
}

/// [`start`], with the buffer sizes and IN strategy of every USB link (`usbmuxd --usb-in`).
/// A separate entry point rather than a [`DaemonConfig`] field so that existing callers, which
/// build `DaemonConfig` literally, keep compiling.
pub fn start_with_usb_pipe(
    cfg: DaemonConfig,
    usb_pipe: crate::usb::PipeConfig,
) -> io::Result<RunningDaemon> {
    let owns_socket = cfg.activated.is_none();
    let (listener, socket) = match cfg.activated {
        Some(ActivatedSocket::Unix(l, path)) => {
            l.set_nonblocking(true)?;
            (
                ListenSocket::Unix(mio::net::UnixListener::from_std(l)),
                SocketSpec::Unix { path, mode: 0o666 },
            )
        }
        Some(ActivatedSocket::Tcp(l)) => {
            l.set_nonblocking(true)?;
            let addr = l.local_addr()?;
            (
                ListenSocket::Tcp(mio::net::TcpListener::from_std(l)),
                SocketSpec::Tcp(addr),
            )
        }
        None => bind(&cfg.socket)?,
    };
    let pairs = PairRecordStore::open(&cfg.config_dir)
        .map_err(|e| io::Error::other(format!("{}: {e}", cfg.config_dir.display())))?;
    let trace = match &cfg.trace {
        Some(p) => Some(
            trace::SharedTrace::create(p)
                .map_err(|e| io::Error::other(format!("trace {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let (mut control, cmds, waker) = Control::new(listener, pairs, cfg.session, trace)?;
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control.run())?;
    let mut d = RunningDaemon {
        usb: None,
        owns_socket,
        watchers: Vec::new(),
        cmds,
        waker,
        thread: Some(thread),
        socket,
    };
    for phone in cfg.simulate {
        d.attach(Box::new(sim::SimLink::new(phone)));
    }
    if cfg.usb {
        let (cmds, waker) = (d.cmds.clone(), d.waker.clone());
        // Arrivals become devices; a departure is noticed by the device's own link (its
        // transfers fail), which ends it and tells listeners.
        let options = crate::usb::WatcherOptions {
            on_demand: cfg.usb_on_demand,
            pipe: usb_pipe,
            ..Default::default()
        };
        let watcher = crate::usb::Watcher::start(options, move |ev| {
            if let crate::usb::UsbEvent::Arrived(link) = ev {
                let _ = cmds.send(ControlCmd::Attach(Box::new(link)));
                let _ = waker.wake();
            }
        });
        d.usb = watcher.ok();
    }
    for path in cfg.sim_sockets {
        let (cmds, waker) = (d.cmds.clone(), d.waker.clone());
        let w = socket_link::SocketWatcher::spawn(path, move |link| {
            let _ = cmds.send(ControlCmd::Attach(link));
            let _ = waker.wake();
        })?;
        d.watchers.push(w);
    }
    info!("listening on {}", d.socket.client_address());
    Ok(d)
}

fn bind(spec: &SocketSpec) -> io::Result<(ListenSocket, SocketSpec)> {
    match spec {
        SocketSpec::Unix { path, mode } => {
            remove_stale_socket(path)?;
            let l = mio::net::UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))?;
            Ok((ListenSocket::Unix(l), spec.clone()))
        }
        SocketSpec::Tcp(addr) => {
            let l = mio::net::TcpListener::bind(*addr)?;
            let real = l.local_addr()?;
            Ok((ListenSocket::Tcp(l), SocketSpec::Tcp(real)))
        }
    }
}

/// A socket file nobody answers on is left over from a crash: remove it. A live one means
/// another daemon runs; anything that is not a socket is not ours to delete.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running daemon", path.display()),
                ))
            } else {
                std::fs::remove_file(path)
            }
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
    }
}
