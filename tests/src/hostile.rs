//! The real `usbmuxd` binary as a child process with phones from [`crate::faulty`], and what the
//! hostile-client, fault-matrix and soak runs check around it: the daemon's log, its open file
//! descriptors and RSS (`/proc/PID`), ListDevices latency, and healthy connections that must
//! stay byte-exact whatever happens next to them.
//!
//! The daemon runs out of process so its fds and memory are its own (tests of one binary run as
//! threads of one process) and its log can be searched for the reasons it gives.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use usbmux_host::proto::{BinaryMessage, ConnectRequest, MessageType, ResultCode};

use crate::client::{self, ClientStream, ListedDevice};
use crate::faulty::{FaultyPhones, PhoneSpec};
use crate::net::{poll_until, SETTLE_TIMEOUT};
use crate::tools::{self, ChildGuard};

/// Port of the simulated phone's echo service.
pub const ECHO: u16 = usbmux_sim::service::ECHO;
/// Port of the simulated phone's digest service (8-byte BE length, bytes, 32-byte SHA-256).
pub const DIGEST: u16 = usbmux_sim::digest::PORT;
/// The longest a ListDevices may take on a daemon that is not stuck.
pub const LIST_DEADLINE: Duration = Duration::from_millis(100);

/// A `usbmuxd` child with served phones, in a private temporary directory.
pub struct Rig {
    // Declared in drop order: the daemon first, then the phones, then the directory.
    daemon: ChildGuard,
    /// The phones (unplug them, look at fired faults).
    pub phones: FaultyPhones,
    address: String,
    dir: TempDir,
}

impl Rig {
    /// Starts the daemon on a Unix socket with these phones; `None` (a skip, outside CI) if the
    /// binary is not built.
    pub fn start(phones: Vec<PhoneSpec>) -> Option<Rig> {
        Rig::start_with(false, phones)
    }

    /// Starts the daemon on TCP 127.0.0.1 (`tcp`) or a Unix socket.
    pub fn start_with(tcp: bool, phones: Vec<PhoneSpec>) -> Option<Rig> {
        let bin = tools::usbmuxd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("usbmux-hostile-")
            .tempdir()
            .expect("temporary directory");
        let config = dir.path().join("lockdown");
        std::fs::create_dir(&config).expect("config dir");
        let phones = FaultyPhones::serve(dir.path(), phones).expect("serve phones");
        let (socket, address) = if tcp {
            let port = crate::net::free_local_ports(1).expect("a free port")[0];
            let a = format!("127.0.0.1:{port}");
            (a.clone(), a)
        } else {
            let p = dir.path().join("usbmuxd");
            (p.display().to_string(), format!("UNIX:{}", p.display()))
        };
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["-f", "-v", "--no-usb", "-P", "NONE", "-S", &socket, "-C"])
            .arg(&config)
            .args(phones.daemon_args())
            .env("XDG_RUNTIME_DIR", dir.path());
        let daemon = ChildGuard::spawn_captured(&mut cmd).expect("spawn usbmuxd");
        let rig = Rig {
            daemon,
            phones,
            address,
            dir,
        };
        let up = poll_until(SETTLE_TIMEOUT, || {
            ClientStream::connect(&rig.address).ok().map(|_| ())
        });
        assert!(up.is_some(), "usbmuxd never listened:\n{}", rig.log());
        Some(rig)
    }

    /// `USBMUXD_SOCKET_ADDRESS` of the daemon.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The test's private directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.daemon.stderr_text()
    }

    /// Waits (bounded) until the log contains `needle`; true if it does.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        poll_until(timeout, || self.log().contains(needle).then_some(())).is_some()
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.daemon.try_wait(), Ok(None))
    }

    /// Open file descriptors of the daemon.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The daemon's fd count once it has stayed the same for 100 ms (at most 5 s): sockets a
    /// client just closed take the daemon a moment to notice.
    pub fn stable_fds(&self) -> usize {
        let mut last = self.fds();
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = self.fds();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    /// (VmRSS, VmHWM) of the daemon in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        proc_rss(self.pid())
    }

    /// Waits until the daemon lists exactly these UDIDs; returns them.
    pub fn wait_devices(&self, udids: &[&str]) -> Vec<ListedDevice> {
        client::wait_for_devices(&self.address, udids)
    }

    /// Waits until every served phone is listed; returns their DeviceIDs in phone order.
    pub fn wait_all_phones(&self) -> Vec<u32> {
        let udids: Vec<String> = self
            .phones
            .phones()
            .iter()
            .map(|p| p.udid().to_owned())
            .collect();
        let refs: Vec<&str> = udids.iter().map(String::as_str).collect();
        let listed = self.wait_devices(&refs);
        udids
            .iter()
            .map(|u| {
                listed
                    .iter()
                    .find(|d| &d.serial == u)
                    .map(|d| d.device_id as u32)
                    .expect("listed")
            })
            .collect()
    }

    /// The DeviceID of phone `i` (0-based) as listed now, if it is listed.
    pub fn device_id(&self, i: usize) -> Option<u32> {
        let udid = self.phones.phone(i).udid();
        client::list_devices(&self.address)
            .ok()?
            .into_iter()
            .find(|d| d.serial == udid)
            .map(|d| d.device_id as u32)
    }

    /// A binary-protocol Connect to `port` of device `device_id`: the stream after Result OK,
    /// or the Result code the daemon answered.
    pub fn connect(&self, device_id: u32, port: u16) -> Result<ClientStream, ResultCode> {
        connect(&self.address, device_id, port)
    }

    /// The fastest of up to five ListDevices round trips on fresh connections (one slow answer
    /// on a loaded machine is scheduling; a stuck daemon fails them all). Panics with the log if
    /// none answers within [`LIST_DEADLINE`].
    pub fn assert_responsive(&self) -> Duration {
        let mut best = Duration::MAX;
        let mut last_err = None;
        for _ in 0..5 {
            let t = Instant::now();
            match client::list_devices(&self.address) {
                Ok(_) => best = best.min(t.elapsed()),
                Err(e) => last_err = Some(e),
            }
            if best < LIST_DEADLINE {
                return best;
            }
        }
        panic!(
            "ListDevices did not answer within {LIST_DEADLINE:?} (best {best:?}, error {last_err:?})\n--- log:\n{}",
            self.log_tail()
        );
    }

    /// Waits (at most `timeout`) for the daemon's fd count to be exactly `baseline`; panics
    /// with the count and the log otherwise.
    pub fn assert_fds_return(&self, baseline: usize, timeout: Duration) {
        let mut last = 0;
        let ok = poll_until(timeout, || {
            last = self.fds();
            (last == baseline).then_some(())
        });
        assert!(
            ok.is_some(),
            "daemon fds did not return to {baseline} (now {last}): {}\n--- log:\n{}",
            fd_listing(self.pid()),
            self.log_tail()
        );
    }

    /// The last 60 lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Stops the daemon with SIGTERM and waits (bounded); panics if it does not exit cleanly.
    pub fn stop(mut self) {
        let _ = self.daemon.terminate();
        let status = self.daemon.wait_timeout(Duration::from_secs(10));
        assert!(
            matches!(status, Ok(Some(s)) if s.success()),
            "usbmuxd did not exit cleanly on SIGTERM: {status:?}\n--- log:\n{}",
            self.log_tail()
        );
    }
}

/// (VmRSS, VmHWM) of process `pid` in KiB (0 if unreadable).
pub fn proc_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What process `pid`'s fds point at, summarised (for failure messages).
pub fn fd_listing(pid: u32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let t = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let kind = t.split(':').next().unwrap_or("").to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
    }
    format!("{kinds:?}")
}

/// A binary-protocol Connect on a fresh connection to `address`.
pub fn connect(address: &str, device_id: u32, port: u16) -> Result<ClientStream, ResultCode> {
    let mut s = ClientStream::connect(address).map_err(|_| ResultCode::Unknown(u32::MAX))?;
    let msg = BinaryMessage::Connect(ConnectRequest { device_id, port })
        .to_vec(1)
        .map_err(|_| ResultCode::Unknown(u32::MAX))?;
    s.write_all(&msg)
        .map_err(|_| ResultCode::Unknown(u32::MAX))?;
    let (h, body) = s
        .read_message()
        .map_err(|_| ResultCode::Unknown(u32::MAX))?;
    match BinaryMessage::parse_body(h.message, &body) {
        Ok(BinaryMessage::Result(ResultCode::Ok)) => Ok(s),
        Ok(BinaryMessage::Result(code)) => Err(code),
        _ => Err(ResultCode::Unknown(u32::MAX - 1)),
    }
}

/// A connection that must keep working: an echo (or digest) pipe opened before something
/// hostile happens, checked with fresh bytes afterwards.
pub struct Healthy {
    stream: ClientStream,
    port: u16,
    seed: u64,
}

impl Healthy {
    /// Opens it to `port` (echo or digest) of device `device_id` and checks it once.
    pub fn open(rig: &Rig, device_id: u32, port: u16) -> Healthy {
        let stream = rig
            .connect(device_id, port)
            .unwrap_or_else(|e| panic!("healthy Connect failed: {e:?}\n{}", rig.log_tail()));
        let mut h = Healthy {
            stream,
            port,
            seed: u64::from(device_id) << 32 | u64::from(port),
        };
        h.check(64 * 1024).expect("healthy connection works");
        h
    }

    /// Sends `len` fresh bytes and checks what comes back (the same bytes from echo, their
    /// SHA-256 from digest).
    pub fn check(&mut self, len: usize) -> io::Result<()> {
        self.seed += 1;
        let data = crate::net::pattern(self.seed, len);
        verify(&self.stream, self.port, &data)
    }
}

/// Sends `data` through an established connection to `port` (echo: expects it back; digest:
/// expects its SHA-256) and checks the answer.
pub fn verify(stream: &ClientStream, port: u16, data: &[u8]) -> io::Result<()> {
    let reader = stream.try_clone()?;
    let writer = stream.try_clone()?;
    if port == DIGEST {
        let mut msg = (data.len() as u64).to_be_bytes().to_vec();
        msg.extend_from_slice(data);
        let back = crate::net::round_trip(reader, writer, &msg, 32)?;
        let want = Sha256::digest(data);
        if back[..] != want[..] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "digest mismatch",
            ));
        }
    } else {
        let back = crate::net::round_trip(reader, writer, data, data.len())?;
        if back != data {
            let at = back.iter().zip(data).position(|(a, b)| a != b);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("echo differs at byte {at:?}"),
            ));
        }
    }
    Ok(())
}

/// Reads until the daemon closes the connection or `timeout` passes. `Ok(bytes)` if it closed
/// (EOF or reset), `Err` if it was still open.
pub fn read_until_closed_within(
    s: &mut ClientStream,
    timeout: Duration,
) -> Result<Vec<u8>, Vec<u8>> {
    let _ = s.set_timeouts(Some(Duration::from_millis(50)));
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Ok(got),
        }
    }
    Err(got)
}

/// Whether the first message in `bytes` is a Result (binary or plist) with `Number` `n`.
pub fn is_result(bytes: &[u8], n: u32) -> bool {
    result_of(bytes) == Some(n)
}

/// The `Number` of the Result message at the start of `bytes` (binary or plist).
pub fn result_of(bytes: &[u8]) -> Option<u32> {
    let (h, body) = usbmux_host::proto::Header::split(bytes).ok()?;
    match h.message {
        MessageType::Result => {
            BinaryMessage::parse_body(h.message, body)
                .ok()
                .and_then(|m| match m {
                    BinaryMessage::Result(c) => Some(u32::from(c)),
                    _ => None,
                })
        }
        MessageType::Plist => plist::Value::from_reader(io::Cursor::new(body))
            .ok()?
            .as_dictionary()?
            .get("Number")?
            .as_unsigned_integer()
            .and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

/// Raises this process's soft limit on open files to its hard limit (tests that hold a
/// thousand client sockets must not depend on the shell's `ulimit -n`); returns the new limit.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}
