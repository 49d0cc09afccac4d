//! `cargo run --release -p usbmux-tests --bin bench -- [--quick] [--json FILE] [--rows a,b,...]`:
//! the benchmark suite of usbmux-rs (issue 9). Every row is measured next to a baseline in the
//! same run, so the ratios hold on a noisy machine; targets are reported, never asserted.
//!
//! Rows (`--rows` picks some, by these names):
//! - `core`: host↔device sessions in memory against `memcpy`; heap allocations per packet;
//! - `ack`: our ACK policy against usbmuxd's over a simulated link;
//! - `daemon`: client → our usbmuxd → simulated phone (discard, source, echo), 1 and 64
//!   connections, phones out of process (`usbmux-sim serve`) and in process (`--simulate`),
//!   against a bare Unix socket; CPU seconds per GB of the daemon process;
//! - `tools`: our iproxy and inetcat against libusbmuxd's C ones (also the `splice` row: our
//!   iproxy's `--copy splice` against `--copy buffer`);
//! - `latency`: Connect round trip and 1-byte echo round trip, p50/p99;
//! - `scale`: 10 000 idle connections over 16 phones: daemon RSS, fds, time to open;
//! - `footprint`: core code size (freestanding build), RAM per connection;
//! - `splice` (only when asked for): our iproxy's `--copy splice` against `--copy buffer`
//!   alone, with three times the repetitions.
//!
//! The daemon, phones and tools it runs are the release binaries next to this one: build them
//! first (`cargo build --release -p usbmux-host -p usbmux-sim --bins`). Results and the
//! analysis are in BENCHMARKS.md.

#[path = "../../../core/benches/common/mod.rs"]
mod common;
#[path = "../bench/daemon.rs"]
mod daemon;
#[path = "../bench/engine.rs"]
mod engine;
#[path = "../bench/footprint.rs"]
mod footprint;
#[path = "../bench/latency.rs"]
mod latency;
#[path = "../bench/scale.rs"]
mod scale;
#[path = "../bench/tools.rs"]
mod tools;
#[path = "../bench/util.rs"]
mod util;

use std::path::PathBuf;
use std::time::Instant;

/// The allocator that counts heap allocations for the core row.
#[global_allocator]
static GLOBAL: common::Counting = common::Counting;

/// Rows in the order they run; `splice` (row 8 alone, more repetitions) is not in the default
/// set, since `tools` measures it too.
const ALL_ROWS: [&str; 8] = [
    "core",
    "ack",
    "daemon",
    "tools",
    "latency",
    "scale",
    "footprint",
    "splice",
];

struct Args {
    quick: bool,
    reps: usize,
    json: Option<PathBuf>,
    rows: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        reps: 3,
        json: None,
        rows: ALL_ROWS[..7].iter().map(|s| s.to_string()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--bench" => {} // `cargo bench` style invocations pass it
            "--reps" => a.reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(3).max(1),
            "--json" => a.json = it.next().map(PathBuf::from),
            "--rows" => {
                a.rows = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = a.rows.iter().find(|r| !ALL_ROWS.contains(&r.as_str())) {
                    eprintln!("bench: unknown row {bad:?} (rows: {})", ALL_ROWS.join(","));
                    std::process::exit(2);
                }
            }
            other => {
                eprintln!(
                    "bench: unknown argument {other:?} (--quick, --reps N, --json FILE, --rows {})",
                    ALL_ROWS.join(",")
                );
                std::process::exit(2);
            }
        }
    }
    a
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let a = args();
    let t0 = Instant::now();
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = cpu_model();
    println!(
        "machine: {cores} cores, CPU {cpu}; {} run; rows {}",
        if a.quick { "quick" } else { "full" },
        a.rows.join(",")
    );
    let mut rows = Vec::new();
    let want = |r: &str| a.rows.iter().any(|x| x == r);
    if want("core") {
        engine::core_rows(a.quick, &mut rows);
    }
    if want("ack") {
        engine::ack_rows(&mut rows);
    }
    if want("daemon") {
        daemon::run(a.quick, &mut rows);
    }
    if want("tools") {
        tools::run(a.quick, a.reps, false, &mut rows);
    }
    if want("latency") {
        latency::run(a.quick, &mut rows);
    }
    if want("scale") {
        scale::run(a.quick, &mut rows);
    }
    if want("footprint") {
        footprint::run(&workspace, &mut rows);
    }
    if want("splice") {
        tools::run(a.quick, a.reps * 3, true, &mut rows);
    }
    util::print_table(&rows);
    println!("\ntotal bench time {:.0} s", t0.elapsed().as_secs_f64());
    if let Some(path) = a.json {
        let meta = serde_json::json!({
            "nproc": cores,
            "cpu": cpu,
            "quick": a.quick,
            "reps": a.reps,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        std::fs::write(&path, util::to_json(&rows, meta).to_string()).expect("write json");
    }
}
