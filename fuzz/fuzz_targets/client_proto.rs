//! The usbmuxd client-protocol header and binary messages on arbitrary bytes: no panic, and
//! whatever parses re-emits to the same bytes' meaning.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_host::proto::{BinaryMessage, Header};

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data);
    let _ = Header::split(data);
    if let Ok((h, m)) = BinaryMessage::parse(data) {
        let bytes = m.to_vec(h.tag).expect("a parsed message re-emits");
        let (h2, m2) = BinaryMessage::parse(&bytes).expect("re-emitted message parses");
        assert_eq!(m, m2);
        assert_eq!(h.tag, h2.tag);
    }
});
