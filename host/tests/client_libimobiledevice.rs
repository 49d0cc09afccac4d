//! `usbmux_host::client` against libimobiledevice's `usbmuxd` (Debian's package, 1.1.1), a
//! daemon nobody here wrote: ListDevices, Listen, ReadBUID (compared with the
//! SystemConfiguration.plist it wrote), pair records saved, read and deleted, ListListeners,
//! and Connect to an absent device.
//!
//! Debian's 1.1.1 has no socket option: it always uses `/var/run/usbmuxd` (a link to `/run`)
//! and `/var/lib/lockdown`. Each test therefore runs it as root in a private mount namespace
//! of its own, with directories of the test bind-mounted over both, and talks to the socket
//! from outside, where the same socket is the test directory's `run/usbmuxd`. It needs no USB
//! device (`-n`: no hotplug). Without the binary, `unshare` or root the test fails under CI
//! (`CI=true`) and is skipped with a message elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use usbmux_host::client::{Client, ClientError, SocketAddress};

const USBMUXD: &str = "/usr/sbin/usbmuxd";
/// How long the daemon may take to create its socket (it takes milliseconds).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Why this machine cannot run the peer, if it cannot.
fn missing_peer() -> Option<String> {
    if !Path::new(USBMUXD).is_file() {
        return Some(format!("{USBMUXD} is missing: apt-get install usbmuxd"));
    }
    if find_in_path("unshare").is_none() {
        return Some("`unshare` is missing: apt-get install util-linux".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("running Debian's usbmuxd in a private mount namespace needs root".into());
    }
    None
}

/// Debian's usbmuxd in its own mount namespace, killed and reaped on drop.
struct Peer {
    child: Child,
    dir: tempfile::TempDir,
}

impl Peer {
    /// Starts the daemon, or returns `None` (a skip outside CI; a panic under CI) when the
    /// machine lacks what it needs.
    fn start() -> Option<Peer> {
        if let Some(why) = missing_peer() {
            assert!(
                !in_ci(),
                "CI must run the libimobiledevice usbmuxd test: {why}"
            );
            eprintln!("SKIPPED (not a pass): {why}");
            return None;
        }
        // The mount point must exist in the real tree; creating it is harmless (it is where
        // Debian's usbmuxd keeps its records anyway).
        std::fs::create_dir_all("/var/lib/lockdown").expect("/var/lib/lockdown");
        let dir = tempfile::tempdir().expect("tmp");
        for sub in ["run", "lockdown"] {
            std::fs::create_dir(dir.path().join(sub)).expect("subdir");
        }
        let log = std::fs::File::create(dir.path().join("usbmuxd.log")).expect("log");
        let script = format!(
            "mount --bind '{run}' /run && mount --bind '{lockdown}' /var/lib/lockdown && exec {USBMUXD} -f -v -n",
            run = dir.path().join("run").display(),
            lockdown = dir.path().join("lockdown").display(),
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn unshare");
        let mut peer = Peer { child, dir };
        peer.wait_ready();
        Some(peer)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/usbmuxd")
    }

    fn lockdown(&self) -> PathBuf {
        self.dir.path().join("lockdown")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("usbmuxd.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let end = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "usbmuxd exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < end,
                "usbmuxd did not listen within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self) -> Client {
        Client::with_address(SocketAddress::Unix(self.socket()))
            .with_prog_name(Some("usbmux-rs-client-test".into()))
            .with_timeout(Duration::from_secs(5))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SIGTERM for a clean exit, SIGKILL if it does not come; always reaped.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let end = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn list_listen_and_connect_to_an_absent_device() {
    let Some(peer) = Peer::start() else { return };
    let client = peer.client();

    assert_eq!(client.list_devices().expect("ListDevices"), vec![]);
    assert_eq!(
        client.protocol(),
        usbmux_host::client::Protocol::Plist,
        "usbmuxd 1.1.1 speaks plist"
    );

    let mut listener = client.listen().expect("Listen answered Result 0");
    assert_eq!(
        listener
            .next_timeout(Duration::from_millis(200))
            .expect("no error"),
        None,
        "no devices, no events"
    );
    let listeners = client.list_listeners().expect("ListListeners");
    assert!(
        listeners
            .iter()
            .any(|l| l.prog_name.as_deref() == Some("usbmux-rs-client-test")),
        "{listeners:?}"
    );
    drop(listener);

    assert!(
        matches!(client.connect(1, 62078), Err(ClientError::NoSuchDevice)),
        "log:\n{}",
        peer.log()
    );
    assert!(client
        .find_device("00008030-0000000000000001")
        .expect("find")
        .is_none());
}

#[test]
fn buid_and_pair_records() {
    let Some(peer) = Peer::start() else { return };
    let client = peer.client();

    let buid = client.read_buid().expect("ReadBUID");
    let config = plist::Value::from_file(peer.lockdown().join("SystemConfiguration.plist"))
        .expect("usbmuxd wrote SystemConfiguration.plist");
    let written = config
        .as_dictionary()
        .and_then(|d| d.get("SystemBUID"))
        .and_then(plist::Value::as_string)
        .expect("SystemBUID");
    assert_eq!(buid, written);
    assert_eq!(client.read_buid().expect("again"), buid);

    let udid = "00008030-001A2B3C4D5E6F70";
    assert!(matches!(
        client.read_pair_record(udid),
        Err(ClientError::NotFound)
    ));
    let mut record = plist::Dictionary::new();
    record.insert(
        "HostID".into(),
        "6F2C1B77-0A7E-4F6B-9C55-2B7A4D8E1F00".into(),
    );
    record.insert("SystemBUID".into(), buid.clone().into());
    let mut xml = Vec::new();
    plist::Value::Dictionary(record.clone())
        .to_writer_xml(&mut xml)
        .expect("xml");
    client.save_pair_record(udid, &xml).expect("SavePairRecord");
    assert!(peer.lockdown().join(format!("{udid}.plist")).is_file());

    // usbmuxd stores what libplist writes: compare the dictionaries, not the bytes.
    let back = client.read_pair_record(udid).expect("ReadPairRecord");
    let back = plist::Value::from_reader_xml(back.as_slice()).expect("an XML plist");
    assert_eq!(back.as_dictionary(), Some(&record));

    client.delete_pair_record(udid).expect("DeletePairRecord");
    assert!(!peer.lockdown().join(format!("{udid}.plist")).exists());
    assert!(matches!(
        client.read_pair_record(udid),
        Err(ClientError::NotFound)
    ));
    assert!(matches!(
        client.delete_pair_record(udid),
        Err(ClientError::NotFound)
    ));
}
