//! The digest service (port [`PORT`], 1999): the host sends messages, the phone answers each
//! with its SHA-256.
//!
//! A message is an 8-byte big-endian length `N` followed by `N` bytes; the answer is the 32-byte
//! SHA-256 of those `N` bytes. Messages follow each other on the same connection for as long as
//! the host likes. `N = 0` is answered with the hash of nothing
//! (`e3b0c442…b855`). Any `N` up to `u64::MAX` is accepted: the bytes are hashed as they arrive
//! and never buffered, so only time bounds a message.
//!
//! It exists to check integrity end to end: a host that sends random data through usbmux and
//! compares the hashes catches any byte lost, duplicated, reordered or corrupted on the way.

use sha2::{Digest as _, Sha256};

use crate::service::Responder;

/// The digest service's port.
pub const PORT: u16 = 1999;

/// Length of one answer (a SHA-256).
pub const HASH_LEN: usize = 32;

/// Where the parser is.
#[derive(Clone)]
enum State {
    /// Reading the 8-byte length: `have` bytes of it so far.
    Length { buf: [u8; 8], have: usize },
    /// Hashing the body: `remaining` bytes still to come.
    Body { remaining: u64, hasher: Sha256 },
}

/// The digest service's state machine (see the module docs). One per connection.
#[derive(Clone)]
pub struct Digest {
    state: State,
    /// Answers produced so far.
    answered: u64,
}

impl core::fmt::Debug for Digest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let state = match &self.state {
            State::Length { have, .. } => format!("Length({have}/8)"),
            State::Body { remaining, .. } => format!("Body({remaining} left)"),
        };
        f.debug_struct("Digest")
            .field("state", &state)
            .field("answered", &self.answered)
            .finish()
    }
}

impl Default for Digest {
    fn default() -> Self {
        Digest::new()
    }
}

impl Digest {
    /// A digest service waiting for the first length.
    pub fn new() -> Self {
        Digest {
            state: State::Length {
                buf: [0; 8],
                have: 0,
            },
            answered: 0,
        }
    }

    /// How many messages were answered so far.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// Appends the hash of a finished message and goes back to reading a length.
    fn finish(&mut self, hasher: Sha256, out: &mut Vec<u8>) {
        out.extend_from_slice(&hasher.finalize());
        self.answered += 1;
        self.state = State::Length {
            buf: [0; 8],
            have: 0,
        };
    }
}

impl Responder for Digest {
    /// Consumes input up to the end of at most one message, so the runner sends each 32-byte
    /// answer before more input is read; never fails (every byte sequence is a valid stream).
    fn on_input(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            match &mut self.state {
                State::Length { buf, have } => {
                    let n = (8 - *have).min(rest.len());
                    buf[*have..*have + n].copy_from_slice(&rest[..n]);
                    *have += n;
                    used += n;
                    if *have == 8 {
                        let len = u64::from_be_bytes(*buf);
                        if len == 0 {
                            self.finish(Sha256::new(), out);
                            return Ok(used);
                        }
                        self.state = State::Body {
                            remaining: len,
                            hasher: Sha256::new(),
                        };
                    }
                }
                State::Body { remaining, hasher } => {
                    // `remaining` may exceed usize on 32-bit targets: compare in u64.
                    let n = if (rest.len() as u64) < *remaining {
                        rest.len()
                    } else {
                        // Fits: it is at most rest.len().
                        *remaining as usize
                    };
                    hasher.update(&rest[..n]);
                    *remaining -= n as u64;
                    used += n;
                    if *remaining == 0 {
                        let hasher = core::mem::take(hasher);
                        self.finish(hasher, out);
                        return Ok(used);
                    }
                }
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u64).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// Feeds `input` in chunks of the sizes `chunks` yields (cycled), checking that every
    /// non-empty call consumes something, and returns all answers.
    fn feed(d: &mut Digest, input: &[u8], chunks: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < input.len() {
            let end = (pos + chunks[i % chunks.len()]).min(input.len());
            i += 1;
            let mut at = pos;
            while at < end {
                let n = d.on_input(&input[at..end], &mut out).unwrap();
                assert!(n >= 1 && n <= end - at, "consumed {n} of {}", end - at);
                at += n;
            }
            pos = end;
        }
        out
    }

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const TWO_BLOCKS: &str = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
    const TWO_BLOCKS_MSG: &[u8] = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";

    #[test]
    fn known_vectors() {
        let mut d = Digest::new();
        assert_eq!(hex(&feed(&mut d, &frame(b"abc"), &[100])), ABC);
        assert_eq!(hex(&feed(&mut d, &frame(b""), &[100])), EMPTY);
        assert_eq!(
            hex(&feed(&mut d, &frame(TWO_BLOCKS_MSG), &[100])),
            TWO_BLOCKS
        );
        assert_eq!(d.answered(), 3);
    }

    #[test]
    fn one_message_per_call() {
        // Two messages in one slice: the first call stops after the first answer.
        let mut input = frame(b"abc");
        input.extend(frame(b""));
        let mut d = Digest::new();
        let mut out = Vec::new();
        let n = d.on_input(&input, &mut out).unwrap();
        assert_eq!(n, 11);
        assert_eq!(hex(&out), ABC);
        out.clear();
        assert_eq!(d.on_input(&input[n..], &mut out).unwrap(), 8);
        assert_eq!(hex(&out), EMPTY);
    }

    #[test]
    fn back_to_back_split_at_every_boundary() {
        let mut input = frame(b"abc");
        input.extend(frame(b""));
        input.extend(frame(TWO_BLOCKS_MSG));
        input.extend(frame(b"abc"));
        let expected = [ABC, EMPTY, TWO_BLOCKS, ABC].concat();
        // Every single split point, then every pair of split points.
        for a in 0..=input.len() {
            let mut d = Digest::new();
            let mut out = feed(&mut d, &input[..a], &[input.len()]);
            out.extend(feed(&mut d, &input[a..], &[input.len()]));
            assert_eq!(hex(&out), expected, "split at {a}");
        }
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let mut d = Digest::new();
                let mut out = feed(&mut d, &input[..a], &[usize::MAX]);
                out.extend(feed(&mut d, &input[a..b], &[usize::MAX]));
                out.extend(feed(&mut d, &input[b..], &[usize::MAX]));
                assert_eq!(hex(&out), expected, "split at {a}, {b}");
            }
        }
        // One byte at a time.
        let mut d = Digest::new();
        assert_eq!(hex(&feed(&mut d, &input, &[1])), expected);
    }

    #[test]
    fn one_mebibyte_in_odd_chunks() {
        let body: Vec<u8> = (0..1u64 << 20).map(crate::service::source_byte).collect();
        let expected = Sha256::digest(&body);
        let input = frame(&body);
        for chunks in [&[1usize, 7, 4093][..], &[65_537], &[3, 1 << 20, 5]] {
            let mut d = Digest::new();
            let out = feed(&mut d, &input, chunks);
            assert_eq!(out, expected.as_slice(), "chunks {chunks:?}");
        }
    }

    #[test]
    fn huge_length_is_accepted_and_streams() {
        let mut d = Digest::new();
        let mut out = Vec::new();
        assert_eq!(d.on_input(&u64::MAX.to_be_bytes(), &mut out), Ok(8));
        let chunk = [0xA5u8; 4096];
        for _ in 0..16 {
            assert_eq!(d.on_input(&chunk, &mut out), Ok(chunk.len()));
        }
        assert!(out.is_empty());
        assert_eq!(d.answered(), 0);
        assert!(format!("{d:?}").contains("left"));
    }
}
