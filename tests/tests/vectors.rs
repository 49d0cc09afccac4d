//! The client-protocol byte vectors of `shared/PROTOCOL.md` §6.1, §6.2 and §6.6, checked through
//! the public API of `usbmux_host::proto`.

use usbmux_host::proto::{
    plist_port, BinaryMessage, ConnectRequest, Header, MessageType, ProtoError, ProtocolVersion,
    ResultCode, HEADER_LEN,
};

/// §6.1: binary CONNECT request, device id 1, port 22, tag 1, header version 0.
const CONNECT: [u8; 24] = [
    0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x00, 0x16, 0x00, 0x00,
];

/// §6.2: binary RESULT OK reply to tag 1.
const RESULT_OK: [u8; 20] = [
    0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

#[test]
fn connect_vector_6_1() -> Result<(), ProtoError> {
    let (header, message) = BinaryMessage::parse(&CONNECT)?;
    assert_eq!(
        header,
        Header {
            length: 24,
            version: ProtocolVersion::Binary,
            message: MessageType::Connect,
            tag: 1,
        }
    );
    let expected = BinaryMessage::Connect(ConnectRequest {
        device_id: 1,
        port: 22,
    });
    assert_eq!(message, expected);
    assert_eq!(expected.to_vec(1)?, CONNECT);
    Ok(())
}

#[test]
fn result_ok_vector_6_2() -> Result<(), ProtoError> {
    let (header, message) = BinaryMessage::parse(&RESULT_OK)?;
    assert_eq!(header.length, 20);
    assert_eq!(header.version, ProtocolVersion::Binary);
    assert_eq!(header.message, MessageType::Result);
    assert_eq!(header.tag, 1);
    assert_eq!(message, BinaryMessage::Result(ResultCode::Ok));
    assert_eq!(BinaryMessage::Result(ResultCode::Ok).to_vec(1)?, RESULT_OK);
    Ok(())
}

#[test]
fn a_client_reads_exactly_the_result_and_nothing_more() -> Result<(), ProtoError> {
    // After Result OK the socket carries raw device bytes, which may follow at once (§3.5).
    let mut stream = RESULT_OK.to_vec();
    stream.extend_from_slice(b"SSH-2.0-");
    let (header, body) = Header::split(&stream)?;
    assert_eq!(body, [0, 0, 0, 0]);
    assert_eq!(&stream[header.total_len()..], b"SSH-2.0-");
    assert_eq!(header.total_len(), HEADER_LEN + 4);
    Ok(())
}

#[test]
fn plist_connect_port_vector_6_6() {
    assert_eq!(plist_port(62078), 32498);
    assert_eq!(plist_port(32498), 62078);
}
