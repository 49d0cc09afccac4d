//! Our daemon, in-process, on a private socket with a private config dir and simulated phones.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;
use usbmux_host::daemon::{self, sim::SimLink, DaemonConfig, RunningDaemon, SocketSpec};
use usbmux_sim::PhoneConfig;

use crate::client::{self, ClientStream, ListedDevice};

/// A daemon started by `usbmux_host::daemon::start` for one test.
///
/// Everything lives in a temporary directory of its own: the Unix socket (`usbmuxd`), the
/// config dir (`lockdown/`: SystemConfiguration.plist, pair records) and a `home/` the tools
/// get as `HOME`, so tests running in parallel share nothing. Dropping it stops the daemon
/// (resetting its connections), then removes the directory.
pub struct TestDaemon {
    // Declared first: dropped (stopped) before the directory disappears.
    daemon: Option<RunningDaemon>,
    address: String,
    config_dir: PathBuf,
    dir: TempDir,
}

impl TestDaemon {
    /// Starts a daemon on a Unix socket (mode 0600) with these phones plugged in.
    pub fn start(phones: Vec<PhoneConfig>) -> TestDaemon {
        TestDaemon::start_with(false, phones, |_| {})
    }

    /// Starts a daemon on TCP 127.0.0.1 (port chosen by the kernel) with these phones.
    pub fn start_tcp(phones: Vec<PhoneConfig>) -> TestDaemon {
        TestDaemon::start_with(true, phones, |_| {})
    }

    /// Starts a daemon on TCP 127.0.0.1 (`tcp`) or a Unix socket, after `prepare` has had the
    /// (existing, empty) config dir to put files in, e.g. a SystemConfiguration.plist.
    pub fn start_with(
        tcp: bool,
        phones: Vec<PhoneConfig>,
        prepare: impl FnOnce(&Path),
    ) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("usbmux-interop-")
            .tempdir()
            .expect("temporary directory");
        let config_dir = dir.path().join("lockdown");
        std::fs::create_dir(&config_dir).expect("config dir");
        std::fs::create_dir(dir.path().join("home")).expect("home dir");
        prepare(&config_dir);
        let socket = if tcp {
            SocketSpec::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        } else {
            SocketSpec::Unix {
                path: dir.path().join("usbmuxd"),
                mode: 0o600,
            }
        };
        let running = daemon::start(DaemonConfig {
            activated: None,
            socket,
            config_dir: config_dir.clone(),
            simulate: phones,
            sim_sockets: Vec::new(),
            session: usbmux_core::SessionConfig::default(),
            trace: None,
            usb: false,
            usb_on_demand: false,
        })
        .expect("start the daemon");
        let address = running.socket().client_address();
        TestDaemon {
            daemon: Some(running),
            address,
            config_dir,
            dir,
        }
    }

    /// The `USBMUXD_SOCKET_ADDRESS` value that reaches it (`UNIX:/…/usbmuxd` or
    /// `127.0.0.1:PORT`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Its config dir (SystemConfiguration.plist, pair records).
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// The test's private directory (socket, config dir, `home/`), for scratch files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn running(&self) -> &RunningDaemon {
        self.daemon.as_ref().expect("daemon running")
    }

    /// Plugs in a simulated phone (an in-process [`SimLink`]).
    pub fn attach(&self, phone: PhoneConfig) {
        self.running().attach(Box::new(SimLink::new(phone)));
    }

    /// Unplugs the phone with this UDID.
    pub fn detach(&self, udid: &str) {
        self.running().detach(udid);
    }

    /// A command for peer tool `program` aimed at this daemon: `USBMUXD_SOCKET_ADDRESS` set,
    /// `HOME` and the XDG dirs inside the test's directory (nothing of the user's is read or
    /// written), standard input from /dev/null.
    pub fn command(&self, program: &str) -> Command {
        let home = self.dir.path().join("home");
        let mut cmd = Command::new(program);
        cmd.env("USBMUXD_SOCKET_ADDRESS", &self.address)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null());
        cmd
    }

    /// A fresh client connection to it (timeouts set).
    pub fn connect(&self) -> ClientStream {
        ClientStream::connect(&self.address).expect("connect to the daemon")
    }

    /// Waits until it lists exactly these serials; see [`client::wait_for_devices`].
    pub fn wait_for_devices(&self, serials: &[&str]) -> Vec<ListedDevice> {
        client::wait_for_devices(&self.address, serials)
    }

    /// Stops the daemon now (also done on drop).
    pub fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
    }
}

/// The UDID of `PhoneConfig::simulated(k)`: `00008030-` and `k` as 16 upper-case hex digits.
pub fn sim_udid(k: u32) -> String {
    PhoneConfig::simulated(k).identity.udid
}

/// Phones parsed from a `usbmux_sim::config` TOML text; panics on a bad file (a test bug).
pub fn phones_from_toml(toml: &str) -> Vec<PhoneConfig> {
    usbmux_sim::config::parse(toml).unwrap_or_else(|e| panic!("bad phone config: {e}"))
}
