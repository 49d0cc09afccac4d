//! `usbmuxd`: the usbmux daemon. Options follow libimobiledevice's usbmuxd, so service files
//! and scripts keep working; `--simulate N` runs it with simulated phones and no root.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use log::{error, info};
use usbmux_host::daemon::{self, DaemonConfig, SocketSpec};
use usbmux_host::usb::{EventStrategy, InStrategy, OutStrategy, PipeConfig};
use usbmux_sim::PhoneConfig;

/// Default client socket of the system daemon (clients find it there without configuration).
const SYSTEM_SOCKET: &str = "/var/run/usbmuxd";
const SYSTEM_PIDFILE: &str = "/var/run/usbmuxd.pid";
const SYSTEM_CONFIG_DIR: &str = "/var/lib/lockdown";

/// Expose iPhone/iPad connections to clients over a socket (usbmux daemon).
#[derive(Parser, Debug)]
#[command(name = "usbmuxd", version, about, long_about = None)]
struct Cli {
    /// Do not daemonize (run in the foreground).
    #[arg(short = 'f', long = "foreground")]
    foreground: bool,
    /// Be more verbose (repeat for more).
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    verbose: u8,
    /// Drop privileges to this user (and its group) once the socket and pidfile are open.
    #[arg(short = 'U', long = "user")]
    user: Option<String>,
    /// Do not use USB hotplug or polling: scan for devices at start and on SIGUSR2 (which a
    /// `usbmuxd -u` started by udev sends to a running instance).
    #[arg(short = 'n', long = "disable-hotplug")]
    disable_hotplug: bool,
    /// Run in udev activation mode (implies -n and -z).
    #[arg(short = 'u', long = "udev")]
    udev: bool,
    /// Run in systemd activation mode (implies -n and -z; a socket passed by systemd via
    /// LISTEN_FDS is used as the client socket).
    #[arg(short = 's', long = "systemd")]
    systemd: bool,
    /// Let another instance ask this one to exit (-x: SIGUSR1 exits when no device is attached).
    #[arg(short = 'z', long = "enable-exit")]
    enable_exit: bool,
    /// Ask a running instance to exit if no device is attached (sends SIGUSR1), then exit.
    #[arg(short = 'x', long = "exit")]
    exit: bool,
    /// Ask a running instance to exit even with devices attached (sends SIGTERM), then exit.
    #[arg(short = 'X', long = "force-exit")]
    force_exit: bool,
    /// Do not pair (accepted; pairing is later work).
    #[arg(short = 'p', long = "no-preflight")]
    no_preflight: bool,
    /// Listen on ADDR:PORT (IPv6 in brackets) or a Unix socket PATH instead of /var/run/usbmuxd.
    #[arg(short = 'S', long = "socket", value_name = "ADDR:PORT|PATH")]
    socket: Option<String>,
    /// Pidfile (NONE for none); a second instance refuses to start while one runs.
    #[arg(short = 'P', long = "pidfile", value_name = "PATH|NONE")]
    pidfile: Option<String>,
    /// Directory of pair records and SystemConfiguration.plist.
    #[arg(short = 'C', long = "config-dir", value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Log to this file instead of standard error.
    #[arg(short = 'l', long = "logfile", value_name = "FILE")]
    logfile: Option<PathBuf>,
    /// Attach N simulated phones; switches to user-local defaults (foreground, socket under
    /// $XDG_RUNTIME_DIR, no pidfile, private config dir, no USB).
    #[arg(long = "simulate", value_name = "N")]
    simulate: Option<u32>,
    /// Describe the simulated phones in a TOML file (see usbmux-sim's README).
    #[arg(long = "sim-config", value_name = "FILE")]
    sim_config: Option<PathBuf>,
    /// Attach the phone served by `usbmux-sim serve` at PATH (repeatable); reconnects while the
    /// path is absent or after the phone was unplugged.
    #[arg(long = "sim-socket", value_name = "PATH")]
    sim_socket: Vec<PathBuf>,
    /// Serve USB phones even with simulated ones (the default without --simulate).
    #[arg(long = "usb", conflicts_with = "no_usb")]
    usb: bool,
    /// Do not touch USB at all.
    #[arg(long = "no-usb")]
    no_usb: bool,
    /// Record every USB transfer in FILE (postcard; `usbmux-sim dump FILE` decodes it).
    #[arg(long = "trace", value_name = "FILE")]
    trace: Option<PathBuf>,
    /// How USB IN is read: `thread` (one reader thread, synchronous reads) or `async` (libusb
    /// asynchronous transfers, --usb-in-buffers of them in flight).
    #[arg(long = "usb-in", value_name = "thread|async", default_value_t = PipeConfig::default().in_strategy)]
    usb_in: InStrategy,
    /// USB IN buffers: the reader thread's ring, or the transfers in flight with --usb-in async.
    #[arg(long = "usb-in-buffers", value_name = "N", default_value_t = PipeConfig::default().in_buffers as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    usb_in_buffers: u16,
    /// Size of each USB IN buffer (and of each IN transfer), in KiB.
    #[arg(long = "usb-in-kib", value_name = "KIB", default_value_t = (PipeConfig::default().in_buffer_size / 1024) as u16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    usb_in_kib: u16,
    /// How USB OUT is written: `async` (libusb asynchronous transfers submitted by the phone's
    /// thread, up to 8 in flight) or `thread` (one writer thread, synchronous writes).
    #[arg(long = "usb-out", value_name = "thread|async", default_value_t = PipeConfig::default().out_strategy)]
    usb_out: OutStrategy,
    /// Who handles libusb's events: `inline` (the phone's thread polls libusb's descriptors
    /// itself; only with --usb-in async --usb-out async, else `thread`) or `thread` (an event
    /// thread per phone hands completions to the phone's thread).
    #[arg(long = "usb-events", value_name = "thread|inline", default_value_t = PipeConfig::default().events)]
    usb_events: EventStrategy,
    /// Give asynchronous USB transfers heap buffers instead of memory mapped from the kernel's
    /// usbfs (which spares the kernel an allocation, clearing and copy per transfer).
    #[arg(long = "usb-heap-buffers")]
    usb_heap_buffers: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut logger = env_logger::Builder::new();
    logger.filter_level(level).format_timestamp_millis();
    if let Some(path) = &cli.logfile {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                logger.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => {
                eprintln!("usbmuxd: cannot open log file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    logger.init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("usbmuxd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where a user-local daemon keeps its socket and state: `$XDG_RUNTIME_DIR/usbmuxd-rs`, else
/// `usbmuxd-rs-UID` in the temp dir (created 0700; refused if someone else owns it).
fn user_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
    {
        Some(base) => base.join("usbmuxd-rs"),
        None => std::env::temp_dir().join(format!("usbmuxd-rs-{}", nix::unistd::getuid())),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    if cli.exit || cli.force_exit {
        let path = cli.pidfile.clone().unwrap_or_else(|| SYSTEM_PIDFILE.into());
        return pidfile::signal_running(path.as_ref(), cli.force_exit);
    }
    raise_open_file_limit();
    let simulated =
        cli.simulate.is_some() || cli.sim_config.is_some() || !cli.sim_socket.is_empty();
    let mut phones: Vec<PhoneConfig> = match &cli.sim_config {
        Some(path) => usbmux_sim::config::load(path).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    if let Some(n) = cli.simulate {
        if u64::from(n) > usbmux_sim::config::MAX_PHONES {
            return Err(format!(
                "--simulate {n}: at most {} phones",
                usbmux_sim::config::MAX_PHONES
            ));
        }
        // --simulate N with --sim-config: the file's phones first, defaults fill up to N.
        while phones.len() < n as usize {
            phones.push(PhoneConfig::simulated(phones.len() as u32 + 1));
        }
    }

    let (socket, config_dir) = if simulated {
        let dir = user_dir();
        create_private_dir(&dir)?;
        let socket = match &cli.socket {
            Some(s) => SocketSpec::parse(s, 0o600)?,
            None => SocketSpec::Unix {
                path: dir.join("usbmuxd"),
                mode: 0o600,
            },
        };
        (
            socket,
            cli.config_dir
                .clone()
                .unwrap_or_else(|| dir.join("lockdown")),
        )
    } else {
        let socket = match &cli.socket {
            Some(s) => SocketSpec::parse(s, 0o666)?,
            None => SocketSpec::Unix {
                path: SYSTEM_SOCKET.into(),
                mode: 0o666,
            },
        };
        (
            socket,
            cli.config_dir
                .clone()
                .unwrap_or_else(|| SYSTEM_CONFIG_DIR.into()),
        )
    };
    if !simulated && !cli.foreground && !cli.systemd {
        // Before any thread exists: fork, setsid, chdir /, stdio to /dev/null (whoever started
        // us must not wait on our output pipes). Logs then go only to -l FILE, which stays open.
        nix::unistd::daemon(false, false).map_err(|e| format!("daemonize: {e}"))?;
    }
    let pidfile_path: Option<PathBuf> = match (&cli.pidfile, simulated) {
        (Some(p), _) if p == "NONE" => None,
        (Some(p), _) => Some(p.into()),
        (None, true) => None,
        (None, false) => Some(SYSTEM_PIDFILE.into()),
    };
    let _pidfile = match &pidfile_path {
        Some(p) => match pidfile::lock_or_notify(p, cli.udev)? {
            Some(lock) => Some(lock),
            // udev started us for a new device while one runs: it was told to rescan.
            None => return Ok(()),
        },
        None => None,
    };
    // -p: there is no preflight (pairing) yet, so there is nothing to skip.
    let _ = cli.no_preflight;

    let signals = signals::register()?;
    let activated = if cli.systemd {
        activation::take()
    } else {
        None
    };
    let usb_pipe = PipeConfig {
        in_strategy: cli.usb_in,
        out_strategy: cli.usb_out,
        events: cli.usb_events,
        usbfs_buffers: !cli.usb_heap_buffers,
        in_buffers: usize::from(cli.usb_in_buffers),
        in_buffer_size: usize::from(cli.usb_in_kib) * 1024,
        ..PipeConfig::default()
    };
    let usb = if simulated { cli.usb } else { !cli.no_usb };
    let d = daemon::start_with_usb_pipe(
        DaemonConfig {
            activated,
            socket,
            config_dir,
            simulate: phones.clone(),
            sim_sockets: cli.sim_socket.clone(),
            trace: cli.trace.clone(),
            usb,
            // Upstream: -u and -s imply -n (udev or systemd starts us per device).
            usb_on_demand: cli.disable_hotplug || cli.udev || cli.systemd,
            session: usbmux_core::SessionConfig::default(),
        },
        usb_pipe,
    )
    .map_err(|e| e.to_string())?;
    if usb {
        info!(
            "USB IN: {} ({} x {} KiB)",
            usb_pipe.in_strategy,
            usb_pipe.in_buffers,
            usb_pipe.in_buffer_size / 1024
        );
        let used = usb_pipe.normalized();
        info!(
            "USB OUT: {}; libusb events: {}",
            used.out_strategy, used.events
        );
    }
    if simulated {
        println!(
            "usbmuxd (usbmux-rs) with {} simulated phone(s):",
            phones.len() + cli.sim_socket.len()
        );
        for p in &cli.sim_socket {
            println!("  (served at {})", p.display());
        }
        for p in &phones {
            println!("  {}  \"{}\"", p.identity.udid, p.identity.device_name);
        }
        println!("Point clients at it with:");
        println!(
            "  export USBMUXD_SOCKET_ADDRESS={}",
            d.socket().client_address()
        );
        println!("then e.g. `idevice_id -l`, `ideviceinfo -s`, `iproxy 2222:7`. Stop with Ctrl-C.");
    }
    if let Some(user) = &cli.user {
        drop_privileges(user)?;
    }
    info!("running");
    let stop = d.stopper();
    let rescan = d.usb_rescanner();
    signals::serve(
        signals,
        stop,
        move || {
            if let Some(r) = &rescan {
                r.rescan();
            }
        },
        cli.enable_exit || cli.udev || cli.systemd,
    )?;
    d.wait();
    Ok(())
}

/// Each client connection holds a socket (and, connected, nothing else): raise the soft
/// open-file limit to the hard one, as many connections as the system allows.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            info!("open-file limit raised from {soft} to {hard}");
        }
    }
}

/// Switches to `user` (its primary group first, then supplementary groups cleared).
fn drop_privileges(user: &str) -> Result<(), String> {
    use nix::unistd::{setgid, setgroups, setuid, User};
    let u = User::from_name(user)
        .map_err(|e| format!("user {user}: {e}"))?
        .ok_or_else(|| format!("no user {user}"))?;
    setgroups(&[u.gid]).map_err(|e| format!("setgroups: {e}"))?;
    setgid(u.gid).map_err(|e| format!("setgid: {e}"))?;
    setuid(u.uid).map_err(|e| format!("setuid: {e}"))?;
    info!("running as {user}");
    Ok(())
}

mod activation {
    //! systemd socket activation: `LISTEN_PID` names us and `LISTEN_FDS` ≥ 1 → fd 3 is the
    //! client socket, already bound and listening. (No existing usbmuxd supports it.)
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::PathBuf;

    use nix::sys::socket::{getsockname, SockaddrStorage};
    use usbmux_host::daemon::ActivatedSocket;

    const SD_LISTEN_FDS_START: i32 = 3;

    pub fn take() -> Option<ActivatedSocket> {
        let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
        let n: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
        if pid != std::process::id() || n < 1 {
            return None;
        }
        // Children must not think the socket is theirs.
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        // SAFETY: systemd passes fd 3 open and owned by this process when LISTEN_PID is ours and
        // LISTEN_FDS >= 1 (checked above), and this runs once, before the daemon opens anything
        // else, so no other owner of fd 3 exists.
        let fd = unsafe { OwnedFd::from_raw_fd(SD_LISTEN_FDS_START) };
        let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok()?;
        match addr.as_unix_addr() {
            Some(un) => {
                let path = un
                    .path()
                    .map_or_else(|| PathBuf::from("(activated)"), PathBuf::from);
                Some(ActivatedSocket::Unix(
                    std::os::unix::net::UnixListener::from(fd),
                    path,
                ))
            }
            None => Some(ActivatedSocket::Tcp(std::net::TcpListener::from(fd))),
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let err = |e: std::io::Error| format!("{}: {e}", dir.display());
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    // In a shared temp dir someone else may have made it first: then it is not ours to use.
    let m = std::fs::symlink_metadata(dir).map_err(err)?;
    if !m.is_dir() || m.uid() != nix::unistd::getuid().as_raw() {
        return Err(format!(
            "{} is not a directory owned by this user",
            dir.display()
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

mod pidfile {
    //! A pidfile held with an exclusive lock for the daemon's life, so a second instance
    //! refuses to start.
    use std::fs::File;
    use std::io::Write;
    use std::path::Path;

    /// Keeps the lock while alive (the file stays open; the lock goes with the process).
    pub struct Pidfile(#[allow(dead_code)] File);

    /// `-x` / `-X`: signal the instance named by the pidfile (SIGUSR1: exit if idle; SIGTERM:
    /// exit now).
    pub fn signal_running(path: &Path, force: bool) -> Result<(), String> {
        use nix::sys::signal::{kill, Signal};
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("pidfile {}: {e}", path.display()))?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| format!("pidfile {} holds no pid", path.display()))?;
        let sig = if force {
            Signal::SIGTERM
        } else {
            Signal::SIGUSR1
        };
        kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|e| format!("signal {pid}: {e}"))?;
        Ok(())
    }

    /// Like [`lock`], but in udev mode (`-u`) a running instance is not an error: it gets
    /// SIGUSR2 (scan for devices) and `Ok(None)` says this one should exit.
    pub fn lock_or_notify(path: &Path, udev: bool) -> Result<Option<Pidfile>, String> {
        match lock(path) {
            Ok(p) => Ok(Some(p)),
            Err(e) if udev => {
                let text = std::fs::read_to_string(path).map_err(|_| e.clone())?;
                let pid: i32 = text.trim().parse().map_err(|_| e.clone())?;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGUSR2,
                )
                .map_err(|err| format!("{e}; and signalling it failed: {err}"))?;
                log::info!("told the running usbmuxd ({pid}) to look for new devices");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens the pidfile and takes a POSIX record lock (`fcntl(F_SETLK)`, as upstream usbmuxd
    /// does, so ours and theirs also exclude each other), then writes our pid.
    pub fn lock(path: &Path) -> Result<Pidfile, String> {
        use nix::fcntl::{fcntl, FcntlArg};
        use nix::libc;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(path)
            .map_err(|e| format!("pidfile {}: {e}", path.display()))?;
        let whole_file = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        fcntl(&f, FcntlArg::F_SETLK(&whole_file)).map_err(|_| {
            format!(
                "another usbmuxd is running (pidfile {} is locked)",
                path.display()
            )
        })?;
        f.set_len(0).map_err(|e| e.to_string())?;
        writeln!(f, "{}", std::process::id()).map_err(|e| e.to_string())?;
        Ok(Pidfile(f))
    }
}

mod signals {
    //! SIGINT/SIGTERM end the daemon cleanly (connections are reset, the socket removed);
    //! SIGUSR1 ends it only if no phone is attached, and only when `-z` allowed it; SIGUSR2
    //! makes it scan for USB devices (for `-n`).
    //!
    //! The handlers are registered before the socket exists (a client or a `-u` instance may
    //! signal as soon as it sees the socket: the default action would kill the daemon), and
    //! served once the daemon runs.
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
    use signal_hook::iterator::Signals;

    pub fn register() -> Result<Signals, String> {
        Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2]).map_err(|e| format!("signals: {e}"))
    }

    pub fn serve(
        mut signals: Signals,
        stop: impl Fn(bool) + Send + 'static,
        rescan: impl Fn() + Send + 'static,
        exit_allowed: bool,
    ) -> Result<(), String> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    match sig {
                        SIGUSR1 if exit_allowed => stop(true),
                        SIGUSR1 => log::info!("SIGUSR1 ignored (start with -z to allow it)"),
                        SIGUSR2 => rescan(),
                        _ => {
                            stop(false);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
