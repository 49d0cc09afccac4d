//! Rows 1 (core engine) and 2 (ACK policy), measured by the code `cargo bench -p usbmux-core`
//! runs (`core/benches/common/mod.rs`, included by `bench.rs`).

use usbmux_core::AckPolicy;

use crate::common::{self, ack, engine_run, mb_per_s, memcpy_run, Api, Dir};
use crate::util::Row;

fn dir_name(d: Dir) -> &'static str {
    match d {
        Dir::HostToDevice => "host→device",
        Dir::DeviceToHost => "device→host",
    }
}

/// Row 1: MB/s of a host and a device session back to back (one connection, 49 152-byte
/// packets, 1 MiB buffers) against `memcpy` of the same bytes, best of `runs` interleaved;
/// heap allocations per packet in the timed loops.
pub fn core_rows(quick: bool, rows: &mut Vec<Row>) {
    let (run_bytes, runs) = if quick {
        (512u64 << 20, 3)
    } else {
        (common::RUN_BYTES, common::RUNS)
    };
    let src = common::source();
    let buf = 1 << 20;
    println!(
        "core: {} MiB per run, best of {runs} interleaved with memcpy",
        run_bytes >> 20
    );
    let (mut allocs, mut packets) = (0u64, 0u64);
    for dir in [Dir::HostToDevice, Dir::DeviceToHost] {
        for api in [Api::Copy, Api::ZeroCopy, Api::EngineOnly, Api::Source] {
            let (mut best, mut best_memcpy) = (f64::MAX, f64::MAX);
            for _ in 0..runs {
                best_memcpy = best_memcpy.min(memcpy_run(&src, run_bytes));
                let m = engine_run(dir, api, &src, buf, run_bytes);
                allocs += m.allocations;
                packets += m.packets;
                best = best.min(m.secs);
            }
            let (core, base) = (mb_per_s(run_bytes, best), mb_per_s(run_bytes, best_memcpy));
            let (api_name, goal) = match api {
                Api::Copy => ("send/recv (4 copies)", 0.25),
                Api::ZeroCopy => ("send_buffer/peek, app copies in (3 copies)", 0.5),
                Api::EngineOnly => ("commit/consume only (engine's 2 copies)", 0.5),
                Api::Source => (
                    "transmit_with/peek, app copies into the packet (2 copies)",
                    0.5,
                ),
            };
            rows.push(
                Row::new(
                    "core",
                    format!("{}, {api_name}", dir_name(dir)),
                    core,
                    "MB/s",
                )
                .baseline("memcpy", base)
                .target(format!("≥ {goal} × memcpy"), core / base >= goal),
            );
        }
    }
    let per = allocs as f64 / packets.max(1) as f64;
    rows.push(
        Row::new(
            "core",
            format!("heap allocations per packet ({allocs} in {packets} packets)"),
            per,
            "allocs",
        )
        .target("0", allocs == 0),
    );
}

/// Row 2: our `Drain` policy against usbmuxd's (immediate ACK, 30 ms window-update timer) over
/// the simulated link of `common::ack` (125 µs per transfer + 40 MB/s, one transfer in flight
/// per direction), same buffers. Deterministic: the simulated clock, not the machine.
pub fn ack_rows(rows: &mut Vec<Row>) {
    for dir in [Dir::HostToDevice, Dir::DeviceToHost] {
        for reader in [ack::Reader::AsItArrives, ack::Reader::FixedRate] {
            let ours = ack::run(dir, reader, AckPolicy::Drain);
            let theirs = ack::run(dir, reader, AckPolicy::Usbmuxd);
            let what = format!(
                "Drain, {}, reader {}",
                dir_name(dir),
                match reader {
                    ack::Reader::AsItArrives => "drains as it arrives".to_string(),
                    ack::Reader::FixedRate => format!("{} MB/s", ack::SLOW_READER / 1_000_000),
                }
            );
            rows.push(
                Row::new(
                    "ack",
                    format!("{what}: packets/MiB"),
                    ours.packets_per_mib,
                    "pkt/MiB",
                )
                .baseline("usbmuxd policy", theirs.packets_per_mib),
            );
            rows.push(
                Row::new(
                    "ack",
                    format!("{what}: throughput"),
                    ours.mb_per_s,
                    "MB/s (sim.)",
                )
                .baseline("usbmuxd policy", theirs.mb_per_s),
            );
        }
    }
}
