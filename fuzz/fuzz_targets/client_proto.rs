//! The usbmuxd client protocol on arbitrary bytes: the header and binary messages (whatever
//! parses re-emits to the same meaning), plist request bodies (behind the nesting guard), and
//! `USBMUXD_SOCKET_ADDRESS` values (whatever parses prints back to the same address). No input
//! may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_host::client::SocketAddress;
use usbmux_host::plist_msg::PlistRequest;
use usbmux_host::proto::{BinaryMessage, Header};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = PlistRequest::parse(data) {
        // A parsed request encodes back into a body that parses to the same request.
        let again = PlistRequest::parse(&req.to_xml()).expect("re-encoded request parses");
        assert_eq!(again.request, req.request);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(addr) = SocketAddress::parse(text) {
            let printed = addr.to_string();
            assert_eq!(SocketAddress::parse(&printed).ok(), Some(addr), "{printed}");
        }
    }
    let _ = Header::parse(data);
    let _ = Header::split(data);
    if let Ok((h, m)) = BinaryMessage::parse(data) {
        let bytes = m.to_vec(h.tag).expect("a parsed message re-emits");
        let (h2, m2) = BinaryMessage::parse(&bytes).expect("re-emitted message parses");
        assert_eq!(m, m2);
        assert_eq!(h.tag, h2.tag);
    }
});
