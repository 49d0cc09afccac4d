//! The usbmuxd client protocol on arbitrary bytes, as the daemon reads it: the 16-byte header,
//! binary messages (whatever parses re-emits to the same meaning) and plist request bodies
//! (behind the nesting guard; whatever parses re-encodes to the same request). No input may
//! panic. (`USBMUXD_SOCKET_ADDRESS` values have their own target, `socket_address`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_host::plist_msg::PlistRequest;
use usbmux_host::proto::{BinaryMessage, Header};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = PlistRequest::parse(data) {
        // A parsed request encodes back into a body that parses to the same request.
        let again = PlistRequest::parse(&req.to_xml()).expect("re-encoded request parses");
        assert_eq!(again.request, req.request);
    }
    if let Ok(h) = Header::parse(data) {
        assert!(h.total_len() >= 16 && h.total_len() <= 65_536);
        if let Ok((h2, body)) = Header::split(data) {
            assert_eq!(h2, h);
            assert_eq!(body.len() + 16, h.total_len());
        }
    }
    if let Ok((h, m)) = BinaryMessage::parse(data) {
        let bytes = m.to_vec(h.tag).expect("a parsed message re-emits");
        let (h2, m2) = BinaryMessage::parse(&bytes).expect("re-emitted message parses");
        assert_eq!(m, m2);
        assert_eq!(h.tag, h2.tag);
    }
});
