//! Shared helpers of the usbmux-rs end-to-end tests.
//!
//! This crate holds the workspace's cross-crate tests: byte vectors from `shared/PROTOCOL.md`
//! checked through the public APIs (`tests/vectors.rs`), and — as the daemon and the simulated
//! phone land — end-to-end runs of the daemon with simulated phones, fault injection, and
//! interoperability with real peer tools (iproxy, idevice_id, ideviceinfo). Helpers those tests
//! share (spawning a daemon on a temporary socket, attaching simulated phones, hex dumps) will
//! live here.
#![forbid(unsafe_code)]
