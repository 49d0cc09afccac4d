//! Peer tools as child processes: finding them, running them with a deadline, capturing their
//! output, and killing them whatever happens to the test.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one short tool run (`idevice_id -l`, `ideviceinfo -s`, …) may take. Healthy runs
/// take milliseconds; libimobiledevice itself waits 5 s for a usbmuxd reply and 30 s for a
/// lockdown reply, so a hang shows up here rather than as a stuck test.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a killed or exiting child, or a reader of its pipes, may take to finish.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the tests run under CI: `CI` is set, non-empty, and neither `0` nor `false`
/// (GitHub and GitLab set `CI=true`, some runners `CI=1`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The executable `name` in `PATH`, if any.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks that peer tool `tool` (from Debian package `package`) is installed.
///
/// Returns true if it is. If it is not: under CI ([`in_ci`]) this panics, so a CI machine
/// without the peer tools fails instead of passing vacuously; elsewhere it prints what to
/// install and returns false, and the test returns early (a skip).
pub fn require_tool(tool: &str, package: &str) -> bool {
    if find_tool(tool).is_some() {
        return true;
    }
    let hint = format!("`{tool}` is not in PATH: install it with `apt-get install {package}`");
    assert!(!in_ci(), "interop test needs a peer tool under CI: {hint}");
    eprintln!("SKIPPED (not a pass): {hint}");
    false
}

/// The `usbmuxd` binary of this workspace, next to the test executable's directory
/// (`target/<profile>/deps/interop_…` → `target/<profile>/usbmuxd`; this follows
/// `CARGO_TARGET_DIR` since the tests run from there).
///
/// `env!("CARGO_BIN_EXE_usbmuxd")` only exists for tests of usbmux-host itself, so the tests
/// crate looks for the file. Cargo builds it: `cargo test --workspace` builds every binary of
/// usbmux-host (the package has integration tests); after `cargo test -p usbmux-tests` alone,
/// run `cargo build -p usbmux-host --bin usbmuxd` first.
///
/// A missing binary is treated like a missing peer tool: a panic under CI, otherwise `None`
/// after printing what to build.
pub fn usbmuxd_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let candidates = [deps.join("../usbmuxd"), deps.join("usbmuxd")];
    if let Some(found) = candidates.iter().find(|p| is_executable(p)) {
        return Some(found.clone());
    }
    let hint = format!(
        "the usbmuxd binary is not at {}: run `cargo build -p usbmux-host --bin usbmuxd` \
         (or `cargo test --workspace`, which builds it)",
        candidates[0].display()
    );
    assert!(!in_ci(), "{hint}");
    eprintln!("SKIPPED (not a pass): {hint}");
    None
}

/// Bytes a reader thread collects from a child's pipe, readable while the child runs.
struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Captured {
    fn start(mut pipe: impl Read + Send + 'static, name: &str) -> io::Result<Captured> {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let thread = std::thread::Builder::new()
            .name(format!("capture {name}"))
            .spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => sink
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .extend_from_slice(&chunk[..n]),
                    }
                }
            })?;
        Ok(Captured {
            buf,
            thread: Some(thread),
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// Waits (bounded) for the pipe's end, then returns everything read.
    fn finish(&mut self) -> String {
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + REAP_TIMEOUT;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.text()
    }
}

/// What a finished tool run left behind.
#[derive(Debug, Clone)]
pub struct ToolOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output (lossily decoded).
    pub stdout: String,
    /// Its standard error (lossily decoded).
    pub stderr: String,
}

impl ToolOutput {
    /// The exit code, or `None` if a signal ended it.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Standard output split into lines (without their line ends).
    pub fn stdout_lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// A child process that is killed and reaped when this guard is dropped — at the end of a
/// test, or while a failing test unwinds — so no tool outlives its test.
///
/// Standard output and error, when the command pipes them, can be collected in the background
/// ([`spawn_captured`](Self::spawn_captured)) and looked at while the child runs.
pub struct ChildGuard {
    child: Child,
    name: String,
    stdout: Option<Captured>,
    stderr: Option<Captured>,
}

impl ChildGuard {
    /// Spawns `cmd` exactly as the caller configured it (pipes stay in [`child`](Self::child)).
    pub fn spawn(cmd: &mut Command) -> io::Result<ChildGuard> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd.spawn()?;
        Ok(ChildGuard {
            child,
            name,
            stdout: None,
            stderr: None,
        })
    }

    /// Spawns `cmd` with standard input from /dev/null and its standard output and error
    /// collected by background threads ([`stdout_text`](Self::stdout_text),
    /// [`stderr_text`](Self::stderr_text)).
    pub fn spawn_captured(cmd: &mut Command) -> io::Result<ChildGuard> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ChildGuard::spawn(cmd)?;
        guard.capture_stdout()?;
        guard.capture_stderr()?;
        Ok(guard)
    }

    /// Collects the child's piped standard output in the background from now on (no-op if it
    /// is not piped or already taken).
    pub fn capture_stdout(&mut self) -> io::Result<()> {
        if let Some(pipe) = self.child.stdout.take() {
            self.stdout = Some(Captured::start(pipe, &format!("{} stdout", self.name))?);
        }
        Ok(())
    }

    /// Collects the child's piped standard error in the background from now on (no-op if it
    /// is not piped or already taken).
    pub fn capture_stderr(&mut self) -> io::Result<()> {
        if let Some(pipe) = self.child.stderr.take() {
            self.stderr = Some(Captured::start(pipe, &format!("{} stderr", self.name))?);
        }
        Ok(())
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself (its pid, pipes not yet captured, `try_wait`).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Standard output collected so far (empty if not captured).
    pub fn stdout_text(&self) -> String {
        self.stdout.as_ref().map(Captured::text).unwrap_or_default()
    }

    /// Standard error collected so far (empty if not captured).
    pub fn stderr_text(&self) -> String {
        self.stderr.as_ref().map(Captured::text).unwrap_or_default()
    }

    /// Whether the child has exited (and how), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits at most `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Polls the captured output (stdout, stderr) until `pred` accepts it, at most `timeout`.
    /// Returns whether it did.
    pub fn wait_for_output(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str, &str) -> bool,
    ) -> bool {
        crate::net::poll_until(timeout, || {
            pred(&self.stdout_text(), &self.stderr_text()).then_some(())
        })
        .is_some()
    }

    /// Sends SIGTERM (a polite stop: tools print their goodbye, the daemon cleans up).
    pub fn terminate(&self) -> nix::Result<()> {
        let pid = i32::try_from(self.child.id()).map_err(|_| nix::errno::Errno::ESRCH)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
    }

    /// Waits at most `timeout` for the child to exit and returns its status and output. If it
    /// does not exit in time it is killed and this panics, showing what it printed.
    pub fn finish(mut self, timeout: Duration) -> ToolOutput {
        let status = match self.wait_timeout(timeout) {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => {
                self.kill_and_reap();
                let (stdout, stderr) = (self.take_stdout(), self.take_stderr());
                panic!(
                    "`{}` did not finish within {timeout:?}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
                    self.name
                );
            }
        };
        ToolOutput {
            status,
            stdout: self.take_stdout(),
            stderr: self.take_stderr(),
        }
    }

    fn take_stdout(&mut self) -> String {
        self.stdout
            .as_mut()
            .map(Captured::finish)
            .unwrap_or_default()
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .as_mut()
            .map(Captured::finish)
            .unwrap_or_default()
    }

    /// SIGKILL, then reap (bounded: a killed process exits at once).
    fn kill_and_reap(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.wait_timeout(REAP_TIMEOUT);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// The local TCP ports (IPv4 or IPv6) that process `pid` listens on: its socket inodes
/// (`/proc/PID/fd`) matched against the LISTEN entries of `/proc/net/tcp` and `tcp6`. Lets a
/// test see that a tool is ready without connecting to it (a probe connection would itself be
/// served by the tool).
pub fn listening_tcp_ports(pid: u32) -> io::Result<Vec<u16>> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue; // no IPv6
        };
        // `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout
        // inode ...`; addresses are `HEXADDR:HEXPORT`, state 0A is LISTEN.
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(port) = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Runs `cmd` to completion with standard input from /dev/null, at most `timeout`, and returns
/// its exit status and output; panics (after killing it) if it takes longer.
pub fn run_tool_with_timeout(cmd: &mut Command, timeout: Duration) -> ToolOutput {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let guard =
        ChildGuard::spawn_captured(cmd).unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
    guard.finish(timeout)
}

/// [`run_tool_with_timeout`] with [`TOOL_TIMEOUT`].
pub fn run_tool(cmd: &mut Command) -> ToolOutput {
    run_tool_with_timeout(cmd, TOOL_TIMEOUT)
}
