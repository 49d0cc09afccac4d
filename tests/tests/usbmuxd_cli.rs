//! The `usbmuxd` binary's upstream options, as service files and scripts use them: the locked
//! pidfile (a second instance refuses), `-x` (exit if idle, with `-z`), `-X` (exit now),
//! daemonizing without `-f`, and `-U` (privileges dropped once the socket is open).
//!
//! The binary is found next to the test executable's directory (`cargo test --workspace` builds
//! it). These tests run as root in CI (daemonizing and `-U` need it); elsewhere they skip.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use usbmux_tests::net::poll_until;

/// Polls `cond` until it holds (bounded).
fn until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll_until(timeout, || cond().then_some(())).is_some()
}
use usbmux_tests::tools::{in_ci, require_tool, run_tool, usbmuxd_binary, ChildGuard};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The binary, or `None` (a skip outside CI; a failure in CI).
fn binary() -> Option<std::path::PathBuf> {
    let b = usbmuxd_binary();
    if b.is_none() {
        assert!(!in_ci(), "the usbmuxd binary is not built");
    }
    b
}

fn wait_for(path: &Path) -> bool {
    until(Duration::from_secs(10), || path.exists())
}

/// Running (a zombie waiting for a reaper that a container may not have counts as ended).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

#[test]
fn pidfile_excludes_a_second_instance_and_x_ends_an_idle_one() {
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (sock, pid) = (dir.path().join("sock"), dir.path().join("pid"));
    let args = |s: &Path| {
        let mut c = Command::new(&bin);
        c.args(["-f", "-z", "--no-usb", "-S"])
            .arg(s)
            .arg("-P")
            .arg(&pid)
            .arg("-C")
            .arg(dir.path().join("lockdown"));
        c
    };
    let mut first = ChildGuard::spawn_captured(&mut args(&sock)).expect("spawn");
    assert!(wait_for(&sock), "no socket: {}", first.stderr_text());
    let pid_text = std::fs::read_to_string(&pid).expect("pidfile");
    assert_eq!(pid_text.trim(), first.pid().to_string());

    let second = run_tool(&mut args(&dir.path().join("sock2")));
    assert_eq!(second.code(), Some(1));
    assert!(
        second.stderr.contains("another usbmuxd is running"),
        "{}",
        second.stderr
    );

    let x = run_tool(Command::new(&bin).arg("-x").arg("-P").arg(&pid));
    assert_eq!(x.code(), Some(0), "{}", x.stderr);
    let status = first
        .wait_timeout(Duration::from_secs(10))
        .expect("wait")
        .expect("exited after -x");
    assert!(status.success());
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn x_spares_a_busy_daemon_and_force_exit_ends_it() {
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (sock, pid) = (dir.path().join("sock"), dir.path().join("pid"));
    let mut d = ChildGuard::spawn_captured(
        Command::new(&bin)
            .args(["-f", "-z", "--simulate", "1", "-S"])
            .arg(&sock)
            .arg("-P")
            .arg(&pid)
            .env("XDG_RUNTIME_DIR", dir.path()),
    )
    .expect("spawn");
    assert!(wait_for(&sock), "no socket: {}", d.stderr_text());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        run_tool(Command::new(&bin).arg("-x").arg("-P").arg(&pid)).code(),
        Some(0)
    );
    assert!(
        d.wait_timeout(Duration::from_millis(700))
            .expect("wait")
            .is_none(),
        "a daemon with a phone ignores -x"
    );
    assert_eq!(
        run_tool(Command::new(&bin).arg("-X").arg("-P").arg(&pid)).code(),
        Some(0)
    );
    let status = d
        .wait_timeout(Duration::from_secs(10))
        .expect("wait")
        .expect("exited after -X");
    assert!(status.success());
}

#[test]
fn without_f_it_daemonizes_and_keeps_serving() {
    let Some(bin) = binary() else { return };
    if !is_root() {
        assert!(!in_ci(), "CI runs as root");
        eprintln!("SKIPPED (not a pass): daemonizing is checked as root only");
        return;
    }
    if !require_tool("idevice_id", "libimobiledevice-utils") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let (sock, pid) = (dir.path().join("sock"), dir.path().join("pid"));
    let out = run_tool(
        Command::new(&bin)
            .args(["--no-usb", "-S"])
            .arg(&sock)
            .arg("-P")
            .arg(&pid)
            .arg("-C")
            .arg(dir.path().join("lockdown"))
            .arg("-l")
            .arg(dir.path().join("log")),
    );
    assert_eq!(
        out.code(),
        Some(0),
        "the launcher returns at once: {}",
        out.stderr
    );
    assert!(wait_for(&sock));
    assert!(until(Duration::from_secs(5), || std::fs::read_to_string(
        &pid
    )
    .is_ok_and(|t| !t.trim().is_empty())));
    let daemon_pid: i32 = std::fs::read_to_string(&pid)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    assert!(alive(daemon_pid));
    let list = run_tool(
        Command::new("idevice_id")
            .arg("-l")
            .env("USBMUXD_SOCKET_ADDRESS", format!("UNIX:{}", sock.display())),
    );
    assert_eq!(list.code(), Some(0), "{}", list.stderr);
    assert_eq!(list.stdout, "");
    assert_eq!(
        run_tool(Command::new(&bin).arg("-X").arg("-P").arg(&pid)).code(),
        Some(0)
    );
    assert!(
        until(Duration::from_secs(10), || !alive(daemon_pid)),
        "the daemon ended after -X"
    );
}

#[test]
fn u_drops_privileges_after_opening_the_socket() {
    let Some(bin) = binary() else { return };
    if !is_root() {
        assert!(!in_ci(), "CI runs as root");
        eprintln!("SKIPPED (not a pass): -U needs root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        panic!("no user nobody");
    };
    let dir = tempfile::tempdir().expect("dir");
    let sock = dir.path().join("sock");
    let d = ChildGuard::spawn_captured(
        Command::new(&bin)
            .args(["-f", "-U", "nobody", "--simulate", "1", "-P", "NONE", "-S"])
            .arg(&sock)
            .env("XDG_RUNTIME_DIR", dir.path()),
    )
    .expect("spawn");
    assert!(wait_for(&sock), "no socket: {}", d.stderr_text());
    let uid_line = || {
        std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
    };
    assert!(
        until(Duration::from_secs(5), || uid_line()
            .is_some_and(
                |l| l.split_whitespace().nth(1) == Some(&nobody.uid.to_string())
            )),
        "still {:?}",
        uid_line()
    );
    // It still serves: the socket was opened before the drop (the phone may still be in its
    // handshake: poll).
    if require_tool("idevice_id", "libimobiledevice-utils") {
        let listed = until(Duration::from_secs(10), || {
            let list = run_tool(
                Command::new("idevice_id")
                    .arg("-l")
                    .env("USBMUXD_SOCKET_ADDRESS", format!("UNIX:{}", sock.display())),
            );
            list.stdout.trim() == "00008030-0000000000000001"
        });
        assert!(listed, "{}", d.stderr_text());
    }
}

#[test]
fn systemd_socket_activation_hands_over_the_listening_socket() {
    let Some(bin) = binary() else { return };
    if !require_tool("systemd-socket-activate", "systemd")
        || !require_tool("idevice_id", "libimobiledevice-utils")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let sock = dir.path().join("activated");
    // systemd-socket-activate binds the socket and starts usbmuxd on the first client, passing
    // the listening socket as fd 3 with LISTEN_PID/LISTEN_FDS, as a .socket unit does.
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(&sock)
        .arg(&bin)
        .args(["-f", "-s", "--no-usb", "-P", "NONE", "-C"])
        .arg(dir.path().join("lockdown"));
    let activator = ChildGuard::spawn_captured(&mut cmd).expect("spawn systemd-socket-activate");
    assert!(wait_for(&sock), "no socket: {}", activator.stderr_text());
    let list = run_tool(
        Command::new("idevice_id")
            .arg("-l")
            .env("USBMUXD_SOCKET_ADDRESS", format!("UNIX:{}", sock.display())),
    );
    assert_eq!(
        list.code(),
        Some(0),
        "{}\n{}",
        list.stderr,
        activator.stderr_text()
    );
    assert_eq!(list.stdout, "");
    // Still the same socket after the daemon answered: it was used, not re-bound.
    assert!(sock.exists());
}

#[test]
fn a_udev_instance_tells_the_running_one_to_rescan_and_exits() {
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (sock, pid) = (dir.path().join("sock"), dir.path().join("pid"));
    let mut running = ChildGuard::spawn_captured(
        Command::new(&bin)
            .args(["-f", "-n", "-z", "-v", "-S"])
            .arg(&sock)
            .arg("-P")
            .arg(&pid)
            .arg("-C")
            .arg(dir.path().join("lockdown")),
    )
    .expect("spawn");
    assert!(wait_for(&sock), "no socket: {}", running.stderr_text());
    // What udev runs for a new device: `usbmuxd -u`; with one running, it signals and exits 0.
    let second = run_tool(
        Command::new(&bin)
            .args(["-u", "-f", "-v", "-S"])
            .arg(dir.path().join("sock2"))
            .arg("-P")
            .arg(&pid),
    );
    assert_eq!(second.code(), Some(0), "{}", second.stderr);
    assert!(
        second.stderr.contains("look for new devices"),
        "{}",
        second.stderr
    );
    assert!(
        !dir.path().join("sock2").exists(),
        "the second instance did not serve"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        running.try_wait().expect("wait").is_none(),
        "SIGUSR2 does not end the daemon"
    );
}
