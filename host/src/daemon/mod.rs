//! The `usbmuxd` daemon: a control thread for the client protocol and one device thread per
//! phone (see `device`). Concurrency model and why: `host/README.md`.

pub mod device;
pub mod sim;
pub mod stream;
