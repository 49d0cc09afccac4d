//! `USBMUXD_SOCKET_ADDRESS` values (`usbmux_host::client::SocketAddress`) on arbitrary bytes.
//!
//! Invariants: no panic; a value that is not UTF-8 is refused by `from_env_value` (never
//! guessed around); an empty value means the platform default; whatever parses prints (in
//! libusbmuxd's `UNIX:path` / `host:port` / `[v6]:port` forms) as something that parses back
//! to the same address, and printing that again gives the same text.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;
use usbmux_host::client::{AddressError, SocketAddress};

fuzz_target!(|data: &[u8]| {
    let env = SocketAddress::from_env_value(Some(OsString::from_vec(data.to_vec())));
    let Ok(text) = std::str::from_utf8(data) else {
        assert_eq!(env, Err(AddressError::NotUnicode));
        return;
    };
    let parsed = SocketAddress::parse(text);
    if text.is_empty() {
        assert_eq!(env, Ok(SocketAddress::platform_default()));
        assert_eq!(parsed, Err(AddressError::Empty));
        return;
    }
    assert_eq!(env, parsed);
    if let Ok(addr) = parsed {
        let printed = addr.to_string();
        assert!(
            printed.starts_with("UNIX:") || printed.contains(':'),
            "{printed}"
        );
        let again = SocketAddress::parse(&printed);
        assert_eq!(
            again.as_ref().ok(),
            Some(&addr),
            "{text:?} printed as {printed:?}"
        );
        assert_eq!(
            again.map(|a| a.to_string()).ok().as_deref(),
            Some(printed.as_str())
        );
    }
});
