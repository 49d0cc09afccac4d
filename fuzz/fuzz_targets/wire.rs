//! Every wire view and Repr on arbitrary bytes: no panic, and whatever parses re-emits to a
//! packet that parses to the same Repr (parse → emit → parse).
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_core::wire::{
    mux, ControlPacket, ControlRepr, HeaderKind, MuxPacket, MuxRepr, Summary, TcpPacket, TcpRepr,
    VersionPacket, VersionRepr,
};

fuzz_target!(|data: &[u8]| {
    for kind in [HeaderKind::V1, HeaderKind::V2] {
        let _ = format!("{}", Summary { bytes: data, kind });
        if let Ok(p) = MuxPacket::new_checked(data, kind) {
            let _ = (
                p.protocol(),
                p.total_len(),
                p.magic(),
                p.tx_seq(),
                p.rx_seq(),
                p.payload(),
            );
            if let Ok(r) = MuxRepr::parse(&p) {
                let mut buf = vec![0xa5u8; r.buffer_len()];
                let mut q = MuxPacket::new_unchecked(&mut buf[..], r.kind());
                r.emit(&mut q);
                q.payload_mut().copy_from_slice(p.payload());
                let q = MuxPacket::new_checked(&buf[..], r.kind()).expect("emitted header checks");
                assert_eq!(MuxRepr::parse(&q).expect("emitted header parses"), r);
                assert_eq!(q.payload(), p.payload());
            }
        }
    }
    let _ = mux::detect_kind(data);
    if let Ok(p) = TcpPacket::new_checked(data) {
        if let Ok(r) = TcpRepr::parse(&p) {
            let mut buf = vec![0xa5u8; r.buffer_len()];
            r.emit(&mut TcpPacket::new_unchecked(&mut buf[..]));
            let q = TcpPacket::new_checked(&buf[..]).expect("emitted TCP checks");
            assert_eq!(TcpRepr::parse(&q).expect("emitted TCP parses"), r);
        }
    }
    if let Ok(p) = VersionPacket::new_checked(data) {
        if let Ok(r) = VersionRepr::parse(&p) {
            let mut buf = vec![0xa5u8; r.buffer_len()];
            r.emit(&mut VersionPacket::new_unchecked(&mut buf[..]));
            let q = VersionPacket::new_checked(&buf[..]).expect("emitted VERSION checks");
            assert_eq!(VersionRepr::parse(&q).expect("emitted VERSION parses"), r);
        }
    }
    if let Ok(p) = ControlPacket::new_checked(data) {
        if let Ok(r) = ControlRepr::parse(&p) {
            let mut buf = vec![0xa5u8; r.buffer_len()];
            r.emit(&mut ControlPacket::new_unchecked(&mut buf[..]));
            let q = ControlPacket::new_checked(&buf[..]).expect("emitted CONTROL checks");
            assert_eq!(ControlRepr::parse(&q).expect("emitted CONTROL parses"), r);
        }
    }
});
