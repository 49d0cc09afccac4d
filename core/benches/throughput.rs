//! Benchmarks of `usbmux-core` (plain `main`, std timing): `cargo bench -p usbmux-core`.
//!
//! (a) Throughput of a host and a device `Session` back to back in memory, one connection,
//!     maximum-size packets (`max_transfer` 49 152), 1 MiB buffers, both directions, next to a
//!     `memcpy` of the same bytes in the same chunk sizes in the same run: with the copying
//!     `send`/`recv` (4 copies per byte), with the zero-copy `send_buffer`/`commit` and
//!     `peek`/`consume` (3: the application still copies its source into the send buffer), with
//!     `commit`/`consume` only (the engine's own 2 copies, for reference), and with
//!     `poll_transmit_with` and `peek`/`consume` (2: the application copies its source straight
//!     into the packet, as the daemon does with a client socket).
//! (b) Heap allocations per packet in those steady-state loops, counted by a `#[global_allocator]`
//!     wrapper around `System` (the target is 0).
//! (c) The ACK policy over a simulated USB link (see `common::ack`): `AckPolicy::Drain` against
//!     `AckPolicy::Usbmuxd` (30 ms delayed ACK), simulated MB/s and packets per MiB.
//!
//! The measuring code is in `common/mod.rs`, shared with the benchmark suite
//! (`cargo run --release -p usbmux-tests --bin bench`, rows `core` and `ack`).
//!
//! Results and targets are kept in `BENCHMARKS.md` at the workspace root.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant as Wall;

use common::{ack, engine_run, mb_per_s, memcpy_run, Api, Counting, Dir, Measured};
use common::{APP_CHUNK, RUNS, RUN_BYTES};
use usbmux_core::{AckPolicy, SessionConfig};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations seen inside the timed loops of (a), all runs.
static ALLOCS_IN_LOOPS: AtomicU64 = AtomicU64::new(0);

fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cores} cores (available_parallelism), CPU: {cpu}");
}

/// Lowest ratio to memcpy per API, and whether no allocation was seen.
struct Verdicts {
    copy: f64,
    zero_copy: f64,
    engine_only: f64,
    source: f64,
    no_allocations: bool,
}

fn throughput() -> Verdicts {
    let src = common::source();
    let buf = 1 << 20;
    println!(
        "\n(a) in-memory throughput: 1 connection, max_transfer {}, {} KiB buffers, {} KiB app chunks, {} MiB per run, best of {}",
        SessionConfig::default().max_transfer,
        buf >> 10,
        APP_CHUNK >> 10,
        RUN_BYTES >> 20,
        RUNS
    );
    println!(
        "{:<15} {:<22} {:>10} {:>12} {:>8} {:>10} {:>12}",
        "direction", "api", "core MB/s", "memcpy MB/s", "ratio", "packets", "allocations"
    );
    let mut all_zero = true;
    let mut total_packets = 0;
    let mut worst = [f64::MAX; 4];
    for dir in [Dir::HostToDevice, Dir::DeviceToHost] {
        for api in [Api::Copy, Api::ZeroCopy, Api::EngineOnly, Api::Source] {
            let mut best: Option<Measured> = None;
            let mut best_memcpy = f64::MAX;
            let mut allocs = 0;
            for _ in 0..RUNS {
                // Interleaved, so both see the same machine state.
                best_memcpy = best_memcpy.min(memcpy_run(&src, RUN_BYTES));
                let m = engine_run(dir, api, &src, buf, RUN_BYTES);
                allocs += m.allocations;
                ALLOCS_IN_LOOPS.fetch_add(m.allocations, Ordering::Relaxed);
                if best.as_ref().is_none_or(|b| m.secs < b.secs) {
                    best = Some(m);
                }
            }
            let m = best.expect("at least one run");
            let core = mb_per_s(RUN_BYTES, m.secs);
            let base = mb_per_s(RUN_BYTES, best_memcpy);
            all_zero &= allocs == 0;
            let k = api as usize;
            worst[k] = worst[k].min(core / base);
            total_packets += m.packets * RUNS as u64;
            println!(
                "{:<15} {:<22} {:>10.0} {:>12.0} {:>8.3} {:>10} {:>12}",
                match dir {
                    Dir::HostToDevice => "host->device",
                    Dir::DeviceToHost => "device->host",
                },
                match api {
                    Api::Copy => "send/recv",
                    Api::ZeroCopy => "send_buffer/peek",
                    Api::EngineOnly => "commit/consume only",
                    Api::Source => "transmit_with/peek",
                },
                core,
                base,
                core / base,
                m.packets,
                allocs,
            );
        }
    }
    println!(
        "(b) heap allocations in the steady-state loops: {} over ~{} packets ({} per packet)",
        ALLOCS_IN_LOOPS.load(Ordering::Relaxed),
        total_packets,
        ALLOCS_IN_LOOPS.load(Ordering::Relaxed) as f64 / total_packets.max(1) as f64
    );
    Verdicts {
        copy: worst[Api::Copy as usize],
        zero_copy: worst[Api::ZeroCopy as usize],
        engine_only: worst[Api::EngineOnly as usize],
        source: worst[Api::Source as usize],
        no_allocations: all_zero,
    }
}

fn ack_policies() {
    println!(
        "\n(c) ACK policy over a simulated link: one transfer in flight per direction (a ZLP too), each taking {} us + n / {} MB/s; rx buffers: host 256 KiB, device 128 KiB; tx buffers 256 KiB; {} MiB per run; Usbmuxd with ack_delay 30 ms, Drain with the default",
        ack::LATENCY.total_micros(),
        ack::BANDWIDTH / 1_000_000,
        ack::PAYLOAD >> 20
    );
    println!(
        "{:<15} {:<22} {:<9} {:>12} {:>10} {:>12} {:>13} {:>10} {:>14} {:>6}",
        "direction",
        "receiver",
        "policy",
        "MB/s (sim.)",
        "link busy",
        "packets/MiB",
        "mean segment",
        "pure ACKs",
        "window stalls",
        "ZLPs"
    );
    for dir in [Dir::HostToDevice, Dir::DeviceToHost] {
        for reader in [ack::Reader::AsItArrives, ack::Reader::FixedRate] {
            for policy in [AckPolicy::Drain, AckPolicy::Usbmuxd] {
                let o = ack::run(dir, reader, policy);
                println!(
                    "{:<15} {:<22} {:<9} {:>12.1} {:>9.1}% {:>12.1} {:>13.0} {:>10} {:>14} {:>6}",
                    match dir {
                        Dir::HostToDevice => "host->device",
                        Dir::DeviceToHost => "device->host",
                    },
                    match reader {
                        ack::Reader::AsItArrives => "drains as it arrives".to_string(),
                        ack::Reader::FixedRate =>
                            format!("reads {} MB/s", ack::SLOW_READER / 1_000_000),
                    },
                    match policy {
                        AckPolicy::Drain => "Drain",
                        AckPolicy::Usbmuxd => "Usbmuxd",
                    },
                    o.mb_per_s,
                    o.data_pipe_busy * 100.0,
                    o.packets_per_mib,
                    o.mean_segment,
                    o.pure_acks,
                    o.window_stalls,
                    o.zlps,
                );
            }
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would too. Nothing to parse.
    let t0 = Wall::now();
    machine();
    let v = throughput();
    ack_policies();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\ntargets (worst direction):");
    println!(
        "  core >= 0.25 x memcpy with send/recv: {:.3} -> {}",
        v.copy,
        met(v.copy >= 0.25)
    );
    println!(
        "  core >= 0.5 x memcpy with zero-copy send/recv: {:.3} with the application copying into send_buffer -> {}; {:.3} counting the engine's copies only -> {}",
        v.zero_copy,
        met(v.zero_copy >= 0.5),
        v.engine_only,
        met(v.engine_only >= 0.5)
    );
    println!(
        "  the same with the application copying straight into the packet (poll_transmit_with): {:.3} -> {}",
        v.source,
        met(v.source >= 0.5)
    );
    println!("  0 heap allocations per packet: {}", met(v.no_allocations));
    println!("total bench time {:.1} s", t0.elapsed().as_secs_f64());
}
