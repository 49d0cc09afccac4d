//! What every row shares: the report (table + JSON), process figures from `/proc`, child
//! processes that die with the bench, and small statistics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One line of the report: a measured value, the baseline it is compared with in the same run
/// (if any), and the target it is checked against (if any).
#[derive(Debug, Clone)]
pub struct Row {
    /// The row group of the issue (`core`, `ack`, `daemon`, ...).
    pub group: &'static str,
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The same-run baseline: what it is and its figure (same unit).
    pub baseline: Option<(String, f64)>,
    /// The target, as text, and whether it is met.
    pub target: Option<(String, bool)>,
}

impl Row {
    /// A row without baseline or target.
    pub fn new(
        group: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            group,
            name: name.into(),
            value,
            unit,
            baseline: None,
            target: None,
        }
    }

    /// Adds the same-run baseline.
    pub fn baseline(mut self, what: impl Into<String>, value: f64) -> Row {
        self.baseline = Some((what.into(), value));
        self
    }

    /// Adds a target and whether it is met.
    pub fn target(mut self, what: impl Into<String>, met: bool) -> Row {
        self.target = Some((what.into(), met));
        self
    }

    /// value / baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .filter(|b| b.1 != 0.0 && b.1.is_finite() && self.value.is_finite())
            .map(|b| self.value / b.1)
    }
}

/// Formats a figure with a sensible number of digits.
pub fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() < 1e15) {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Prints the rows as a Markdown table (so it pastes into BENCHMARKS.md as is).
pub fn print_table(rows: &[Row]) {
    println!("\n| row | measurement | value | unit | same-run baseline | ratio | target |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let base = r
            .baseline
            .as_ref()
            .map_or("-".to_string(), |(w, v)| format!("{w}: {}", fmt(*v)));
        let ratio = r.ratio().map_or("-".to_string(), |x| format!("{x:.3}"));
        let target = r.target.as_ref().map_or("-".to_string(), |(w, met)| {
            format!("{w}: {}", if *met { "met" } else { "**not met**" })
        });
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.group,
            r.name,
            fmt(r.value),
            r.unit,
            base,
            ratio,
            target
        );
    }
}

/// The rows as JSON.
pub fn to_json(rows: &[Row], meta: serde_json::Value) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "group": r.group,
                "name": r.name,
                "value": r.value,
                "unit": r.unit,
                "baseline": r.baseline.as_ref().map(|b| serde_json::json!({"what": b.0, "value": b.1})),
                "ratio": r.ratio(),
                "target": r.target.as_ref().map(|t| serde_json::json!({"what": t.0, "met": t.1})),
            })
        })
        .collect();
    serde_json::json!({"machine": meta, "rows": rows})
}

/// user + system CPU seconds of a process (from `/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's open-file limit to its hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

/// Median (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `p`-th percentile (0..=100) by nearest rank; NaN for none.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let k = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[k.clamp(1, v.len()) - 1]
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// Spawns `cmd` with stdout and stderr discarded.
    pub fn spawn(cmd: &mut Command) -> Proc {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc(child)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary next to the bench (target/release), if built.
pub fn sibling(name: &str) -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.with_file_name(name);
    p.exists().then_some(p)
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "bench: timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path as a `USBMUXD_SOCKET_ADDRESS` value.
pub fn unix_address(path: &Path) -> String {
    format!("UNIX:{}", path.display())
}
