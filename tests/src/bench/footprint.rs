//! Row 7: code size of `usbmux-core` from the freestanding build, and RAM per connection of the
//! engine configurations the daemon, the simulated phone and a small MCU use.

use std::mem::size_of;
use std::path::Path;
use std::process::Command;

use usbmux_core::{Device, Host, Session};
use usbmux_host::daemon::device::{CONN_RX, CONN_TX, MAX_CONNECTIONS};

use crate::util::Row;

/// Bytes one more connection slot adds to a session type (`size_of` at N and at 1).
macro_rules! per_slot {
    ($role:ty, $buf:ty, $n:expr, $rx:expr) => {
        (size_of::<Session<$role, $buf, { $n }, { $rx }>>()
            - size_of::<Session<$role, $buf, 1, { $rx }>>()) as f64
            / ($n - 1) as f64
    };
}

/// Runs `core/freestanding/check.sh` and parses its size line.
fn code_size(workspace: &Path) -> Option<(u64, u64, u64)> {
    let out = Command::new("bash")
        .arg(workspace.join("core/freestanding/check.sh"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("usbmux_core code size:"))?;
    // "usbmux_core code size: T bytes = Host H + Device D + shared S (...)"
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // T, H, D, S (digits in "x86_64" come after)
    match nums.as_slice() {
        [_, h, d, s, ..] => Some((*h, *d, *s)),
        _ => None,
    }
}

/// Row 7.
pub fn run(workspace: &Path, rows: &mut Vec<Row>) {
    match code_size(workspace) {
        Some((h, d, s)) => {
            rows.push(Row::new(
                "footprint",
                "core code, host role (Host + shared), freestanding x86_64 opt-level s",
                (h + s) as f64,
                "bytes",
            ));
            rows.push(Row::new(
                "footprint",
                "core code, device role (Device + shared)",
                (d + s) as f64,
                "bytes",
            ));
            rows.push(Row::new(
                "footprint",
                "core code, both roles",
                (h + d + s) as f64,
                "bytes",
            ));
        }
        None => eprintln!("bench: core/freestanding/check.sh printed no size line"),
    }
    // The daemon: Session<Host, Box<[u8]>, MAX_CONNECTIONS>, buffers lent per connection.
    const N: usize = MAX_CONNECTIONS;
    let slot = per_slot!(Host, Box<[u8]>, N, 65536);
    rows.push(Row::new(
        "footprint",
        format!("daemon: engine state per connection (Session<Host, Box<[u8]>, {N}> slot)"),
        slot,
        "bytes",
    ));
    rows.push(Row::new(
        "footprint",
        format!("daemon: Session<Host, Box<[u8]>, {N}> total (per phone)"),
        size_of::<Session<Host, Box<[u8]>, N>>() as f64,
        "bytes",
    ));
    rows.push(Row::new(
        "footprint",
        "daemon: connection buffers (rx + tx, allocated at connect, touched as used)",
        (CONN_RX + CONN_TX) as f64,
        "bytes",
    ));
    // The simulated phone: Session<Device, Vec<u8>, PHONE_N, 0>.
    const PHONE_N: usize = usbmux_sim::phone::MAX_CONNECTIONS;
    rows.push(Row::new(
        "footprint",
        format!("phone (usbmux-sim): engine state per connection (Session<Device, Vec<u8>, {PHONE_N}, 0> slot)"),
        per_slot!(Device, Vec<u8>, PHONE_N, 0),
        "bytes",
    ));
    // A small MCU (core/freestanding's profile): 2 connections with inline 2 KiB + 2 KiB
    // buffers, 2 KiB reassembly buffer (host) or none (device).
    type Buf = [u8; 2048];
    rows.push(Row::new(
        "footprint",
        "MCU profile: per connection incl. inline 2 × 2 KiB buffers (Session<Host, [u8; 2048], 2, 2048> slot)",
        per_slot!(Host, Buf, 2, 2048),
        "bytes",
    ));
    rows.push(Row::new(
        "footprint",
        "MCU profile: Session<Host, [u8; 2048], 2, 2048> total",
        size_of::<Session<Host, Buf, 2, 2048>>() as f64,
        "bytes",
    ));
    rows.push(Row::new(
        "footprint",
        "MCU profile: Session<Device, [u8; 2048], 2, 0> total",
        size_of::<Session<Device, Buf, 2, 0>>() as f64,
        "bytes",
    ));
}
