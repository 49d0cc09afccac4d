//! The simulator's request/response framing on arbitrary host bytes: lockdown (4-byte
//! big-endian length + XML or binary plist) and, as a second service on the same runner
//! contract, digest (8-byte length + body, answered with its SHA-256).
//!
//! Input format: one byte — bit 7 selects digest instead of lockdown, bits 0..7 the chunk size
//! the stream is fed in (0: all at once) — then the byte stream the host sends.
//!
//! Invariants: no panic; every `on_input` on non-empty input consumes at least one byte and no
//! more than it was given (the runner's contract: otherwise it spins or skips); lockdown answers
//! at most one request per call, each reply is a length-prefixed XML plist dictionary that
//! echoes the request or carries an `Error`, and there is exactly one reply per complete frame
//! up to the first oversize length (which, and only which, is an error); digest answers every
//! complete message with the SHA-256 of its body; and feeding the stream in chunks gives the
//! same output bytes as feeding it at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};
use usbmux_sim::digest::Digest;
use usbmux_sim::lockdown::{Lockdown, MAX_MESSAGE};
use usbmux_sim::service::Responder;
use usbmux_sim::Identity;

/// Feeds `stream` in chunks of `chunk` bytes (all at once for 0), checking the runner contract.
/// Returns the output and whether the responder reported a protocol violation.
fn feed(
    resp: &mut dyn Responder,
    stream: &[u8],
    chunk: usize,
    one_reply_per_call: bool,
) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let size = if chunk == 0 {
        stream.len().max(1)
    } else {
        chunk
    };
    for piece in stream.chunks(size) {
        let mut rest = piece;
        // Each call consumes at least one byte, so this ends within piece.len() calls.
        for _ in 0..=piece.len() {
            if rest.is_empty() {
                break;
            }
            let before = out.len();
            match resp.on_input(rest, &mut out) {
                Ok(n) => {
                    assert!(n >= 1 && n <= rest.len(), "consumed {n} of {}", rest.len());
                    rest = &rest[n..];
                }
                Err(_) => return (out, true),
            }
            if one_reply_per_call && out.len() > before {
                let len = u32::from_be_bytes([
                    out[before],
                    out[before + 1],
                    out[before + 2],
                    out[before + 3],
                ]);
                assert_eq!(
                    out.len() - before,
                    4 + len as usize,
                    "more than one reply per call"
                );
            }
        }
        assert!(rest.is_empty(), "a responder stopped consuming");
    }
    (out, false)
}

/// The complete lockdown frames of `stream`, and whether an oversize length comes first.
fn lockdown_frames(stream: &[u8]) -> (usize, bool) {
    let mut rest = stream;
    let mut n = 0;
    while let Some(b) = rest.get(..4) {
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len > MAX_MESSAGE {
            return (n, true);
        }
        match rest.get(4..4 + len) {
            Some(_) => {
                n += 1;
                rest = &rest[4 + len..];
            }
            None => break,
        }
    }
    (n, false)
}

/// The digest answers `stream` must get.
fn digests(stream: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = stream;
    while let Some(b) = rest.get(..8) {
        let len = u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
        let Some(body) = usize::try_from(len)
            .ok()
            .and_then(|l| rest.get(8..8usize.checked_add(l)?))
        else {
            break;
        };
        out.extend_from_slice(&Sha256::digest(body));
        rest = &rest[8 + body.len()..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(sel & 0x7f);
    if sel & 0x80 != 0 {
        let (whole, err) = feed(&mut Digest::new(), stream, 0, false);
        assert!(!err, "digest accepts any length");
        assert_eq!(whole, digests(stream));
        let (chunked, _) = feed(&mut Digest::new(), stream, chunk, false);
        assert_eq!(chunked, whole);
        return;
    }
    let id = Identity::simulated(1);
    let mut reference = Lockdown::new(&id);
    let (whole, err) = feed(&mut reference, stream, 0, true);
    let (frames, oversize) = lockdown_frames(stream);
    assert_eq!(err, oversize, "error iff an oversize length");
    assert_eq!(reference.requests() as usize, frames);
    let mut rest = &whole[..];
    let mut replies = 0;
    while !rest.is_empty() {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let body = &rest[4..4 + len];
        let v = plist::Value::from_reader_xml(body).expect("a reply is an XML plist");
        let d = v.as_dictionary().expect("a reply is a dictionary");
        assert!(
            d.contains_key("Error") || d.contains_key("Request"),
            "{d:?}"
        );
        rest = &rest[4 + len..];
        replies += 1;
    }
    assert_eq!(replies, frames);
    let mut chunked = Lockdown::new(&id);
    let (out, err2) = feed(&mut chunked, stream, chunk, true);
    assert_eq!(err2, err);
    assert_eq!(out, whole, "chunking changed the replies");
});
