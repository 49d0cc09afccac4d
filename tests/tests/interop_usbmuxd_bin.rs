//! The built `usbmuxd` binary, run as a new user would (`usbmuxd --simulate 2` with its
//! user-local defaults), then Debian's `idevice_id -l` pointed at it with the address it prints.
//!
//! The binary is found next to the test executable's directory ([`usbmuxd_binary`]);
//! `cargo test --workspace` builds it. After `cargo test -p usbmux-tests` alone, build it first:
//! `cargo build -p usbmux-host --bin usbmuxd`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use usbmux_tests::daemon::sim_udid;
use usbmux_tests::net::{poll_until, SETTLE_TIMEOUT};
use usbmux_tests::tools::{require_tool, run_tool, usbmuxd_binary, ChildGuard};

const EXPORT: &str = "export USBMUXD_SOCKET_ADDRESS=";

/// A `usbmuxd --simulate 2` child with `XDG_RUNTIME_DIR` in its own temporary directory.
struct BinaryDaemon {
    // Declared first: killed before the directory goes.
    daemon: ChildGuard,
    /// What it printed after `export USBMUXD_SOCKET_ADDRESS=`.
    address: String,
    runtime: tempfile::TempDir,
}

impl BinaryDaemon {
    /// Starts it and waits (bounded) for its `export USBMUXD_SOCKET_ADDRESS=…` line; `None` if
    /// the binary is not built (outside CI).
    fn start() -> Option<BinaryDaemon> {
        let bin = usbmuxd_binary()?;
        let runtime = tempfile::Builder::new()
            .prefix("usbmuxd-bin-")
            .tempdir()
            .expect("temporary directory");
        let mut cmd = Command::new(bin);
        cmd.args(["--simulate", "2"])
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env_remove("USBMUXD_SOCKET_ADDRESS")
            .env_remove("RUST_LOG");
        let daemon = ChildGuard::spawn_captured(&mut cmd).expect("spawn usbmuxd");
        let printed = daemon.wait_for_output(SETTLE_TIMEOUT, |out, _| {
            out.lines().any(|l| l.trim_start().starts_with(EXPORT)) && out.ends_with('\n')
        });
        assert!(
            printed,
            "usbmuxd printed no `{EXPORT}…` line\n--- stdout:\n{}\n--- stderr:\n{}",
            daemon.stdout_text(),
            daemon.stderr_text()
        );
        let address = daemon
            .stdout_text()
            .lines()
            .find_map(|l| l.trim().strip_prefix(EXPORT).map(str::to_owned))
            .expect("the export line");
        Some(BinaryDaemon {
            daemon,
            address,
            runtime,
        })
    }

    /// The socket file its address names.
    fn socket_path(&self) -> PathBuf {
        self.runtime.path().join("usbmuxd-rs").join("usbmuxd")
    }

    /// `idevice_id -l` against it: exit 0; its lines, sorted.
    fn idevice_id_list(&self) -> Vec<String> {
        let home = self.runtime.path().join("home");
        let out = run_tool(
            Command::new("idevice_id")
                .arg("-l")
                .env("USBMUXD_SOCKET_ADDRESS", &self.address)
                .env("HOME", &home)
                .stdin(Stdio::null()),
        );
        assert_eq!(out.code(), Some(0), "idevice_id -l: {out:?}");
        let mut lines: Vec<String> = out.stdout_lines().into_iter().map(str::to_owned).collect();
        lines.sort_unstable();
        lines
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    fn terminate(self) -> std::process::ExitStatus {
        self.daemon.terminate().expect("SIGTERM");
        let out = self.daemon.finish(Duration::from_secs(10));
        assert_eq!(out.stderr, "", "usbmuxd complained: {out:?}");
        out.status
    }
}

#[test]
fn usbmuxd_binary_with_simulated_phones_serves_idevice_id() {
    if !require_tool("idevice_id", "libimobiledevice-utils") {
        return;
    }
    let Some(d) = BinaryDaemon::start() else {
        return;
    };
    // It tells the user where its socket is: under $XDG_RUNTIME_DIR, private to the user.
    let socket = d.socket_path();
    assert_eq!(d.address, format!("UNIX:{}", socket.display()));
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&socket).expect("the socket exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    }
    // And which phones it simulates.
    let (u1, u2) = (sim_udid(1), sim_udid(2));
    let stdout = d.daemon.stdout_text();
    for (udid, name) in [(&u1, "Simulated iPhone 1"), (&u2, "Simulated iPhone 2")] {
        let line = format!("  {udid}  \"{name}\"");
        assert!(
            stdout.lines().any(|l| l == line),
            "no line {line:?} in\n{stdout}"
        );
    }

    // The phones finish their handshake just after start: poll, bounded.
    let want = vec![u1, u2];
    let mut last = Vec::new();
    let listed = poll_until(SETTLE_TIMEOUT, || {
        last = d.idevice_id_list();
        (last == want).then_some(())
    });
    assert!(
        listed.is_some(),
        "idevice_id -l never printed {want:?}; last: {last:?}"
    );

    // Ctrl-C / SIGTERM ends it cleanly.
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "usbmuxd exit status");
}

/// DAEMON BUG (reported): on SIGTERM the binary leaves its socket file behind. `usbmuxd`'s
/// main waits with `RunningDaemon::wait()`, which joins the control thread but never runs
/// `stop_inner()`'s `remove_file` (the Drop impl skips it once the thread handle is taken),
/// although the signal handler's comment promises "the socket removed". Harmless for the next
/// start (a dead socket file is replaced), but it is litter in $XDG_RUNTIME_DIR and contradicts
/// the documented behaviour.
#[test]
fn usbmuxd_binary_removes_its_socket_on_sigterm() {
    let Some(d) = BinaryDaemon::start() else {
        return;
    };
    let socket = d.socket_path();
    assert!(
        socket.exists(),
        "socket {} missing while running",
        socket.display()
    );
    // Stop the daemon but keep its directory (`runtime`) to look into.
    let BinaryDaemon {
        daemon, runtime, ..
    } = d;
    daemon.terminate().expect("SIGTERM");
    let out = daemon.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        !socket.exists(),
        "socket file {} left behind after SIGTERM",
        socket.display()
    );
    drop(runtime);
}
