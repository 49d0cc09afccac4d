//! Shared helpers of the usbmux-rs end-to-end tests.
//!
//! This crate holds the workspace's cross-crate tests: byte vectors from `shared/PROTOCOL.md`
//! checked through the public APIs (`tests/vectors.rs`), and — as the daemon and the simulated
//! phone land — end-to-end runs of the daemon with simulated phones, fault injection, and
//! interoperability with real peer tools (iproxy, idevice_id, ideviceinfo). Helpers those tests
//! share (spawning a daemon on a temporary socket, attaching simulated phones, hex dumps) will
//! live here.
//!
//! # Interoperability tests (`tests/interop_*.rs`)
//!
//! They run clients nobody here wrote — Debian 12's libimobiledevice-utils 1.3.0 and
//! libusbmuxd-tools 2.0.2 — against our daemon, pointing them at it with
//! `USBMUXD_SOCKET_ADDRESS` (`UNIX:/path` or `127.0.0.1:PORT`, PROTOCOL.md §3.7):
//!
//! - [`daemon::TestDaemon`] starts the in-process daemon on a socket in its own temporary
//!   directory, with its own config dir and simulated phones, and builds tool commands aimed
//!   at it;
//! - [`tools`] finds the tools ([`tools::require_tool`]: a missing tool fails the test under CI
//!   and skips it with an install hint otherwise), runs them with a deadline and kills them on
//!   the way out ([`tools::ChildGuard`]);
//! - [`client`] is a small plist/binary usbmuxd client of our own, used to wait until phones
//!   are visible and to look at listeners — never to replace the tool under test;
//! - [`net`] has bounded polling, deterministic test data, free local ports and byte-pipe
//!   round trips.
//!
//! Every wait is bounded, every path and port is private to its test, and tests run in
//! parallel. `interop_usbmuxd_bin.rs` runs the built `usbmuxd` binary itself: `cargo test
//! --workspace` builds it (usbmux-host has integration tests, so cargo builds its binaries);
//! after `cargo test -p usbmux-tests` alone, build it first with `cargo build -p usbmux-host
//! --bin usbmuxd` (see [`tools::usbmuxd_binary`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod daemon;
pub mod faulty;
pub mod hostile;
pub mod net;
pub mod tools;
