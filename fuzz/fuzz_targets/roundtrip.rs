//! Emit first: a header representation built from fuzzer input is emitted and parsed back, and
//! must come out equal — the other half of `wire`'s parse → emit → parse. Covers the mux
//! header (v1 and v2), TCP, VERSION and CONTROL (each inside the mux packet that carries it,
//! parsed as the session parses it: mux first, then the body), the client protocol's binary
//! messages and its plist requests.
//!
//! Input format: a sequence of items, each a selector byte then its fields (`usbmux_fuzz::Reader`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbmux_core::wire::{
    ControlPacket, ControlRepr, ControlType, MuxPacket, MuxRepr, MuxSeq, Protocol, TcpFlags,
    TcpPacket, TcpRepr, VersionPacket, VersionRepr,
};
use usbmux_fuzz::Reader;
use usbmux_host::plist_msg::{ClientInfo, PlistRequest, Request};
use usbmux_host::proto::{BinaryMessage, ConnectRequest, DeviceRecord, ResultCode};

/// Emits `mux` with `body` written by `fill`, parses the packet back and returns its payload.
fn mux_round(mux: MuxRepr, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut buf = vec![0x5au8; mux.buffer_len()];
    let mut p = MuxPacket::new_unchecked(&mut buf[..], mux.kind());
    mux.emit(&mut p);
    fill(p.payload_mut());
    let p = MuxPacket::new_checked(&buf[..], mux.kind()).expect("emitted mux packet checks");
    assert_eq!(MuxRepr::parse(&p).expect("emitted mux header parses"), mux);
    p.payload().to_vec()
}

/// A string the XML plist format can carry unchanged (no control characters: XML forbids most
/// and normalises CR).
fn text(r: &mut Reader<'_>) -> String {
    String::from_utf8_lossy(r.bytes())
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

fn opt_text(r: &mut Reader<'_>) -> Option<String> {
    (r.u8() & 1 == 1).then(|| text(r))
}

fn request(r: &mut Reader<'_>) -> Request {
    match r.u8() % 9 {
        0 => Request::Listen,
        1 => Request::Connect {
            device_id: r.u32(),
            port: r.u16(),
        },
        2 => Request::ListDevices,
        3 => Request::ListListeners,
        4 => Request::ReadBUID,
        5 => Request::ReadPairRecord { id: text(r) },
        6 => Request::SavePairRecord {
            id: text(r),
            data: r.bytes().to_vec(),
            device_id: Some(r.u32()).filter(|&d| d != 0),
        },
        7 => Request::DeletePairRecord { id: text(r) },
        // Prefixed so it is no known MessageType.
        _ => Request::Unknown(format!("X-{}", text(r))),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut items = 0;
    while !r.is_empty() && items < 64 {
        items += 1;
        match r.u8() % 7 {
            0 | 1 => {
                let seq = if r.u8() & 1 == 1 {
                    Some(MuxSeq {
                        tx: r.u16(),
                        rx: r.u16(),
                    })
                } else {
                    None
                };
                let protocol = Protocol::from(r.u32());
                let payload = r.bytes();
                let mux = MuxRepr {
                    protocol,
                    payload_len: payload.len(),
                    seq,
                };
                if mux.buffer_len() <= 65535 {
                    assert_eq!(mux_round(mux, |b| b.copy_from_slice(payload)), payload);
                }
            }
            2 => {
                let tcp = TcpRepr {
                    src_port: r.u16(),
                    dst_port: r.u16(),
                    seq: r.u32(),
                    ack: r.u32(),
                    flags: TcpFlags::from_bits(r.u8()),
                    window: r.u16(),
                    payload: r.bytes(),
                };
                let seq = Some(MuxSeq {
                    tx: r.u16(),
                    rx: r.u16(),
                });
                let mux = MuxRepr {
                    protocol: Protocol::Tcp,
                    payload_len: tcp.buffer_len(),
                    seq,
                };
                if mux.buffer_len() <= 65535 {
                    let body = mux_round(mux, |b| tcp.emit(&mut TcpPacket::new_unchecked(b)));
                    let p = TcpPacket::new_checked(&body[..]).expect("emitted TCP checks");
                    assert_eq!(TcpRepr::parse(&p).expect("emitted TCP parses"), tcp);
                }
            }
            3 => {
                let v = VersionRepr {
                    major: r.u32(),
                    minor: r.u32(),
                };
                let mux = MuxRepr {
                    protocol: Protocol::Version,
                    payload_len: v.buffer_len(),
                    seq: None,
                };
                let body = mux_round(mux, |b| v.emit(&mut VersionPacket::new_unchecked(b)));
                let p = VersionPacket::new_checked(&body[..]).expect("emitted VERSION checks");
                assert_eq!(VersionRepr::parse(&p).expect("emitted VERSION parses"), v);
            }
            4 => {
                let c = ControlRepr {
                    kind: ControlType::from(r.u8()),
                    text: r.bytes(),
                };
                let seq = Some(MuxSeq {
                    tx: r.u16(),
                    rx: r.u16(),
                });
                let mux = MuxRepr {
                    protocol: Protocol::Control,
                    payload_len: c.buffer_len(),
                    seq,
                };
                if mux.buffer_len() <= 65535 {
                    let body = mux_round(mux, |b| c.emit(&mut ControlPacket::new_unchecked(b)));
                    let p = ControlPacket::new_checked(&body[..]).expect("emitted CONTROL checks");
                    assert_eq!(ControlRepr::parse(&p).expect("emitted CONTROL parses"), c);
                }
            }
            5 => {
                let m = match r.u8() % 6 {
                    0 => BinaryMessage::Result(ResultCode::from(r.u32())),
                    1 => BinaryMessage::Connect(ConnectRequest {
                        device_id: r.u32(),
                        port: r.u16(),
                    }),
                    2 => BinaryMessage::Listen,
                    3 => BinaryMessage::DeviceAdd(DeviceRecord {
                        device_id: r.u32(),
                        product_id: r.u16(),
                        serial: String::from_utf8_lossy(r.bytes()).into_owned(),
                        location: r.u32(),
                    }),
                    4 => BinaryMessage::DeviceRemove { device_id: r.u32() },
                    _ => BinaryMessage::DevicePaired { device_id: r.u32() },
                };
                let tag = r.u32();
                match m.to_vec(tag) {
                    Ok(bytes) => {
                        let (h, back) =
                            BinaryMessage::parse(&bytes).expect("emitted message parses");
                        assert_eq!(back, m);
                        assert_eq!(h.tag, tag);
                        assert_eq!(h.total_len(), bytes.len());
                    }
                    // Only a serial the binary record cannot hold may refuse to emit.
                    Err(_) => match &m {
                        BinaryMessage::DeviceAdd(d) => assert!(d.check_serial().is_err()),
                        other => panic!("{other:?} did not emit"),
                    },
                }
            }
            _ => {
                let req = PlistRequest {
                    request: request(&mut r),
                    client: ClientInfo {
                        bundle_id: opt_text(&mut r),
                        client_version: opt_text(&mut r),
                        prog_name: opt_text(&mut r),
                        lib_usbmux_version: (r.u8() & 1 == 1).then(|| u64::from(r.u32())),
                    },
                };
                let xml = req.to_xml();
                let back = PlistRequest::parse(&xml)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&xml)));
                assert_eq!(back, req);
            }
        }
    }
});
