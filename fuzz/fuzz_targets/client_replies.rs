//! What the client library reads from a daemon (`usbmux_host::client`), on arbitrary bytes:
//! the 16-byte header, Result / plist / binary bodies, and the devices, listeners and events
//! taken out of them (ListDevices, ListListeners, Listen). A daemon is outside input too: a
//! broken or hostile one must get typed errors from the library, never a panic.
//!
//! Invariant: no panic, and decoding is deterministic (the same bytes understood the same).
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_host::client::fuzzing::decode_reply;

fuzz_target!(|data: &[u8]| {
    assert_eq!(decode_reply(data), decode_reply(data));
});
