//! Safe parsing of untrusted property lists: cheap checks before the `plist` crate sees the bytes.
//!
//! The `plist` crate builds a [`plist::Value`] recursively and drops it recursively, so a plist
//! nested a few hundred thousand levels deep overflows the stack — an abort, not an error — and a
//! binary plist can make one collection (or one large string) the child of many parents, which
//! the parser copies once per reference: a chain of such sharing expands exponentially. Every
//! plist that arrives from a peer (lockdown requests in the simulated phone, client requests and
//! pair records in the daemon) therefore goes through [`parse`], which refuses, before parsing:
//!
//! - a body longer than [`Limits::max_len`];
//! - more than [`Limits::max_collections`] arrays and dictionaries — this bounds the nesting
//!   depth the parser can reach, so it is what keeps the stack safe;
//! - in a binary plist, a collection referenced twice, or strings and data whose references
//!   would copy more than [`Limits::max_expanded`] bytes;
//!
//! and after parsing, a value nested deeper than [`Limits::max_depth`] (exact, measured
//! without recursion).
//!
//! The pre-parse checks are conservative: they may refuse a valid plist (one with an unusual
//! amount of structure, or a binary one that shares a collection), never let through one that
//! could make the parser or `Drop` recurse deeply or expand without bound. Only XML and binary
//! (`bplist00`) plists are accepted: the ASCII (OpenStep) reader is never used.
//!
//! ```
//! use usbmux_sim::plist_guard::{self, GuardError, Limits};
//!
//! let limits = Limits { max_len: 1 << 16, max_collections: 64, max_depth: 8, max_expanded: 1 << 18 };
//! let ok = b"<plist version=\"1.0\"><dict><key>A</key><integer>1</integer></dict></plist>";
//! assert!(plist_guard::parse(ok, &limits)?.as_dictionary().is_some());
//!
//! let deep = format!("<plist>{}{}</plist>", "<array>".repeat(100_000), "</array>".repeat(100_000));
//! let limits = Limits { max_len: usize::MAX, ..limits };
//! assert_eq!(
//!     plist_guard::parse(deep.as_bytes(), &limits),
//!     Err(GuardError::TooManyCollections { max: 64 })
//! );
//! # Ok::<(), GuardError>(())
//! ```

use std::io::Cursor;

use plist::Value;
use thiserror::Error;

/// The magic at the start of every binary plist this module accepts.
pub const BINARY_MAGIC: &[u8; 8] = b"bplist00";

/// How much an accepted plist may contain. Pick the bounds per protocol: generous enough for
/// every real message, small enough that a hostile one costs little memory and stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Longest body accepted, in bytes.
    pub max_len: usize,
    /// Most arrays and dictionaries (together) the body may contain. Also bounds the depth the
    /// parser can recurse to, so keep it in the hundreds at most.
    pub max_collections: usize,
    /// Deepest nesting of collections accepted: a scalar root has depth 0, `{}` depth 1,
    /// `{a: [1]}` depth 2.
    pub max_depth: usize,
    /// Most bytes of string and data payload a binary plist may expand to, counting an object
    /// once per reference (binary plists may share one string between several parents).
    pub max_expanded: usize,
}

/// The two encodings [`parse`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// An XML property list (anything that does not start with [`BINARY_MAGIC`]).
    Xml,
    /// A binary property list (`bplist00`).
    Binary,
}

impl Format {
    /// The format of `body`, by its first bytes.
    pub fn of(body: &[u8]) -> Self {
        if body.starts_with(BINARY_MAGIC) {
            Self::Binary
        } else {
            Self::Xml
        }
    }
}

/// Why a plist was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Error)]
#[non_exhaustive]
pub enum GuardError {
    /// The body is longer than [`Limits::max_len`].
    #[error("plist of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Length of the body.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body contains more arrays and dictionaries than [`Limits::max_collections`].
    #[error("plist has more than {max} arrays and dictionaries")]
    TooManyCollections {
        /// The limit.
        max: usize,
    },
    /// The parsed value is nested deeper than [`Limits::max_depth`].
    #[error("plist is nested {depth} collections deep, more than {max}")]
    TooDeep {
        /// Depth of the value.
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// A binary plist references one collection from two places (or the root from inside).
    #[error("binary plist shares a collection between two parents")]
    SharedCollection,
    /// A binary plist's references would copy more string and data bytes than
    /// [`Limits::max_expanded`].
    #[error("binary plist expands to more than {max} bytes of strings and data")]
    TooMuchExpansion {
        /// The limit.
        max: usize,
    },
    /// A binary plist's trailer, offset table or references point outside the file or make no
    /// sense.
    #[error("malformed binary plist")]
    MalformedBinary,
    /// The checks passed but the `plist` crate could not parse the body; its message.
    #[error("not a valid plist: {0}")]
    Parse(String),
}

/// Checks `body` against `limits` without parsing it and returns its format.
///
/// Passing this check is what makes handing the bytes to the `plist` crate safe; [`parse`] does
/// both (and the depth check, which needs the parsed value).
pub fn check(body: &[u8], limits: &Limits) -> Result<Format, GuardError> {
    if body.len() > limits.max_len {
        return Err(GuardError::TooLarge {
            len: body.len(),
            max: limits.max_len,
        });
    }
    let format = Format::of(body);
    match format {
        Format::Xml => check_xml(body, limits)?,
        Format::Binary => check_binary(body, limits)?,
    }
    Ok(format)
}

/// Checks and parses an XML or binary plist; see the [module documentation](self).
pub fn parse(body: &[u8], limits: &Limits) -> Result<Value, GuardError> {
    let value = match check(body, limits)? {
        Format::Xml => Value::from_reader_xml(body),
        Format::Binary => Value::from_reader(Cursor::new(body)),
    }
    .map_err(|e| GuardError::Parse(e.to_string()))?;
    let depth = depth(&value);
    if depth > limits.max_depth {
        return Err(GuardError::TooDeep {
            depth,
            max: limits.max_depth,
        });
    }
    Ok(value)
}

/// How deeply `value` nests collections (0 for a scalar), measured with an explicit stack so
/// that no value, however deep, can overflow the call stack here.
pub fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, above)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Dictionary(dict) => Box::new(dict.values()),
            _ => {
                deepest = deepest.max(above);
                continue;
            }
        };
        let here = above + 1;
        deepest = deepest.max(here);
        stack.extend(children.map(|child| (child, here)));
    }
    deepest
}

/// Counts XML start tags whose (local) name is `array` or `dict`: an upper bound of the
/// collections the XML reader builds, hence of the nesting depth it can reach. Comments, CDATA
/// and attribute values are not skipped, which can only over-count. Only UTF-8 is considered,
/// which is all the `plist` crate's XML reader decodes.
pub fn check_xml(body: &[u8], limits: &Limits) -> Result<(), GuardError> {
    let mut count = 0usize;
    let mut i = 0;
    while let Some(off) = body[i..].iter().position(|&b| b == b'<') {
        let start = i + off + 1;
        // The name ends at the first byte that cannot be part of an XML name (whitespace, '/',
        // '>', '<', ...): never later than where the XML reader ends it, and each byte is
        // scanned at most twice.
        let end = body[start..]
            .iter()
            .position(|&b| {
                !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':') || b >= 0x80)
            })
            .map_or(body.len(), |p| start + p);
        let name = &body[start..end];
        let is = |local: &[u8]| {
            name == local
                || (name.len() > local.len()
                    && name.ends_with(local)
                    && name[name.len() - local.len() - 1] == b':')
        };
        if is(b"array") || is(b"dict") {
            count += 1;
            if count > limits.max_collections {
                return Err(GuardError::TooManyCollections {
                    max: limits.max_collections,
                });
            }
        }
        i = start;
    }
    Ok(())
}

/// A big-endian unsigned integer of up to 8 bytes.
fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |n, &b| n << 8 | u64::from(b))
}

/// Reads the length of the object whose marker is at `pos`: the marker's low nibble, or, when
/// that is 0xF, the integer object (marker 0x1n, 2^n bytes) that follows. Returns the length and
/// the position after it.
fn object_len(body: &[u8], pos: usize) -> Result<(usize, usize), GuardError> {
    const BAD: GuardError = GuardError::MalformedBinary;
    let marker = *body.get(pos).ok_or(BAD)?;
    let nibble = usize::from(marker & 0x0f);
    if nibble != 0x0f {
        return Ok((nibble, pos + 1));
    }
    let int = *body.get(pos + 1).ok_or(BAD)?;
    if int >> 4 != 0x1 {
        return Err(BAD);
    }
    let size = 1usize << (int & 0x03);
    let bytes = body.get(pos + 2..pos + 2 + size).ok_or(BAD)?;
    let len = usize::try_from(be(bytes)).map_err(|_| BAD)?;
    Ok((len, pos + 2 + size))
}

/// Walks a binary plist's offset table and collections, reading only bytes inside the file: at
/// most [`Limits::max_collections`] collections, none referenced twice (the root counts as
/// referenced once), no more references than bytes, and at most [`Limits::max_expanded`] bytes
/// of strings and data once every reference is counted.
pub fn check_binary(body: &[u8], limits: &Limits) -> Result<(), GuardError> {
    const BAD: GuardError = GuardError::MalformedBinary;
    if body.len() < BINARY_MAGIC.len() + 32 || !body.starts_with(BINARY_MAGIC) {
        return Err(BAD);
    }
    let trailer_start = body.len() - 32;
    let t = &body[trailer_start..];
    let offset_size = usize::from(t[6]);
    let ref_size = usize::from(t[7]);
    if !matches!(offset_size, 1 | 2 | 3 | 4 | 8) || !matches!(ref_size, 1 | 2 | 3 | 4 | 8) {
        return Err(BAD);
    }
    let num = usize::try_from(be(&t[8..16])).map_err(|_| BAD)?;
    let top = usize::try_from(be(&t[16..24])).map_err(|_| BAD)?;
    let table = usize::try_from(be(&t[24..32])).map_err(|_| BAD)?;
    let table_end = num
        .checked_mul(offset_size)
        .and_then(|n| n.checked_add(table))
        .ok_or(BAD)?;
    if table_end > trailer_start || top >= num {
        return Err(BAD);
    }
    let offsets: Vec<usize> = body[table..table_end]
        .chunks(offset_size)
        .map(|c| usize::try_from(be(c)).unwrap_or(usize::MAX))
        .collect();
    if offsets.iter().any(|&o| o >= trailer_start) {
        return Err(BAD);
    }
    let is_collection = |marker: u8| matches!(marker >> 4, 0xA | 0xC | 0xD);
    let collections: Vec<usize> = (0..num)
        .filter(|&i| is_collection(body[offsets[i]]))
        .collect();
    if collections.len() > limits.max_collections {
        return Err(GuardError::TooManyCollections {
            max: limits.max_collections,
        });
    }

    // Bytes of payload the parser copies for one reference to object `i`: strings and data
    // (UTF-16 strings may grow to 3 UTF-8 bytes per unit); everything else is small and fixed.
    let payload = |i: usize| -> Result<usize, GuardError> {
        let pos = offsets[i];
        match body[pos] >> 4 {
            0x4 | 0x5 => Ok(object_len(body, pos)?.0),
            0x6 => object_len(body, pos)?.0.checked_mul(3).ok_or(BAD),
            _ => Ok(0),
        }
    };
    let too_much = GuardError::TooMuchExpansion {
        max: limits.max_expanded,
    };
    let mut expanded = payload(top)?;
    if expanded > limits.max_expanded {
        return Err(too_much);
    }

    let mut referenced = vec![false; num];
    referenced[top] = true;
    let mut total_refs = 0usize;
    for &i in &collections {
        let marker = body[offsets[i]];
        let (len, pos) = object_len(body, offsets[i])?;
        let refs = if marker >> 4 == 0xD {
            len.checked_mul(2).ok_or(BAD)?
        } else {
            len
        };
        total_refs = total_refs.checked_add(refs).ok_or(BAD)?;
        if total_refs > body.len() {
            return Err(BAD);
        }
        let end = refs
            .checked_mul(ref_size)
            .and_then(|n| n.checked_add(pos))
            .ok_or(BAD)?;
        if end > trailer_start {
            return Err(BAD);
        }
        for r in body[pos..end].chunks(ref_size) {
            let r = usize::try_from(be(r)).map_err(|_| BAD)?;
            if r >= num {
                return Err(BAD);
            }
            if is_collection(body[offsets[r]]) {
                if referenced[r] {
                    return Err(GuardError::SharedCollection);
                }
                referenced[r] = true;
            } else {
                expanded = expanded.saturating_add(payload(r)?);
                if expanded > limits.max_expanded {
                    return Err(too_much);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_len: 1 << 16,
        max_collections: 256,
        max_depth: 32,
        max_expanded: 1 << 18,
    };

    fn nested(open: &str, close: &str, n: usize) -> Vec<u8> {
        let mut x = String::from("<plist version=\"1.0\"><dict><key>X</key>");
        x.push_str(&open.repeat(n));
        x.push_str(&close.repeat(n));
        x.push_str("</dict></plist>");
        x.into_bytes()
    }

    /// A binary plist from a list of objects (offsets two bytes wide, refs one).
    fn bplist(objects: &[&[u8]], top: u8) -> Vec<u8> {
        let mut out = BINARY_MAGIC.to_vec();
        let mut offsets = Vec::new();
        for object in objects {
            offsets.extend_from_slice(&u16::try_from(out.len()).unwrap().to_be_bytes());
            out.extend_from_slice(object);
        }
        let table = out.len() as u64;
        out.extend_from_slice(&offsets);
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 1]);
        out.extend_from_slice(&(objects.len() as u64).to_be_bytes());
        out.extend_from_slice(&u64::from(top).to_be_bytes());
        out.extend_from_slice(&table.to_be_bytes());
        out
    }

    #[test]
    fn accepts_ordinary_plists() {
        let mut dict = plist::Dictionary::new();
        dict.insert("MessageType".into(), Value::String("Listen".into()));
        dict.insert("List".into(), Value::Array(vec![Value::Integer(1.into())]));
        let value = Value::Dictionary(dict);
        let mut xml = Vec::new();
        value.to_writer_xml(&mut xml).unwrap();
        let mut binary = Vec::new();
        value.to_writer_binary(&mut binary).unwrap();
        assert_eq!(check(&xml, &LIMITS), Ok(Format::Xml));
        assert_eq!(check(&binary, &LIMITS), Ok(Format::Binary));
        assert_eq!(parse(&xml, &LIMITS), Ok(value.clone()));
        assert_eq!(parse(&binary, &LIMITS), Ok(value));
    }

    #[test]
    fn depth_is_exact() {
        assert_eq!(depth(&Value::Boolean(true)), 0);
        assert_eq!(depth(&Value::Array(vec![])), 1);
        let inner = Value::Array(vec![Value::Array(vec![]), Value::Integer(1.into())]);
        let mut dict = plist::Dictionary::new();
        dict.insert("a".into(), inner);
        dict.insert("b".into(), Value::Integer(2.into()));
        assert_eq!(depth(&Value::Dictionary(dict)), 3);

        // dict + 31 arrays = 32 levels: accepted; one more is too deep.
        assert!(parse(&nested("<array>", "</array>", 31), &LIMITS).is_ok());
        assert_eq!(
            parse(&nested("<array>", "</array>", 32), &LIMITS),
            Err(GuardError::TooDeep { depth: 33, max: 32 })
        );
    }

    #[test]
    fn too_large_is_refused_before_anything_else() {
        let body = vec![b'<'; LIMITS.max_len + 1];
        assert_eq!(
            check(&body, &LIMITS),
            Err(GuardError::TooLarge {
                len: LIMITS.max_len + 1,
                max: LIMITS.max_len
            })
        );
    }

    #[test]
    fn deep_xml_is_refused_without_recursion() {
        let unlimited = Limits {
            max_len: usize::MAX,
            ..LIMITS
        };
        for body in [
            nested("<array>", "</array>", 100_000),
            nested("<p:array>", "</p:array>", 50_000),
            nested("<dict >", "</dict>", 50_000),
            nested("<array\n>", "</array>", 50_000),
            nested("<array/>", "", 50_000),
        ] {
            assert_eq!(
                parse(&body, &unlimited),
                Err(GuardError::TooManyCollections { max: 256 })
            );
        }
        // Exactly the limit passes the pre-check (the depth check then refuses it).
        assert_eq!(
            check(&nested("<array>", "</array>", 255), &unlimited),
            Ok(Format::Xml)
        );
        assert_eq!(
            check(&nested("<array>", "</array>", 256), &unlimited),
            Err(GuardError::TooManyCollections { max: 256 })
        );
    }

    #[test]
    fn deep_binary_is_refused_without_recursion() {
        // 100 000 nested one-element arrays, with 4-byte offsets and refs.
        let n: u32 = 100_000;
        let mut body = BINARY_MAGIC.to_vec();
        let mut offsets = Vec::new();
        for i in 0..n {
            offsets.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
            if i + 1 < n {
                body.push(0xA1);
                body.extend_from_slice(&(i + 1).to_be_bytes());
            } else {
                body.push(0xA0);
            }
        }
        let table = body.len() as u64;
        body.extend_from_slice(&offsets);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 4, 4]);
        body.extend_from_slice(&u64::from(n).to_be_bytes());
        body.extend_from_slice(&0u64.to_be_bytes());
        body.extend_from_slice(&table.to_be_bytes());
        let unlimited = Limits {
            max_len: usize::MAX,
            ..LIMITS
        };
        assert_eq!(
            parse(&body, &unlimited),
            Err(GuardError::TooManyCollections { max: 256 })
        );
    }

    #[test]
    fn shared_collections_are_refused() {
        // [A, A] where A = []: valid, but A has two parents.
        let shared = bplist(&[&[0xA2, 1, 1], &[0xA0]], 0);
        assert!(Value::from_reader(Cursor::new(&shared)).is_ok(), "valid");
        assert_eq!(
            check_binary(&shared, &LIMITS),
            Err(GuardError::SharedCollection)
        );
        // A root that contains itself.
        let cycle = bplist(&[&[0xA1, 0]], 0);
        assert_eq!(
            check_binary(&cycle, &LIMITS),
            Err(GuardError::SharedCollection)
        );
        // A chain that would expand to 2^200 nodes.
        let objects: Vec<Vec<u8>> = (0..200u8)
            .map(|i| {
                if i < 199 {
                    vec![0xA2, i + 1, i + 1]
                } else {
                    vec![0xA0]
                }
            })
            .collect();
        let refs: Vec<&[u8]> = objects.iter().map(Vec::as_slice).collect();
        assert_eq!(
            check_binary(&bplist(&refs, 0), &LIMITS),
            Err(GuardError::SharedCollection)
        );
    }

    #[test]
    fn shared_strings_are_bounded() {
        // One 1000-byte string referenced by a 250-element array: 250 000 bytes when parsed.
        let mut string = vec![0x5F, 0x11, 0x03, 0xE8];
        string.extend(std::iter::repeat_n(b'x', 1000));
        let mut array = vec![0xAF, 0x10, 250];
        array.extend(std::iter::repeat_n(1u8, 250));
        let body = bplist(&[&array, &string], 0);
        assert!(Value::from_reader(Cursor::new(&body)).is_ok(), "valid");
        let small = Limits {
            max_expanded: 200_000,
            ..LIMITS
        };
        assert_eq!(
            check_binary(&body, &small),
            Err(GuardError::TooMuchExpansion { max: 200_000 })
        );
        assert_eq!(check_binary(&body, &LIMITS), Ok(()));
        // A lying length counts as what it claims.
        let mut lying = string.clone();
        lying[1] = 0x13;
        lying.splice(2..4, u64::MAX.to_be_bytes());
        let body = bplist(&[&[0xA1, 1], &lying], 0);
        assert!(check_binary(&body, &LIMITS).is_err());
    }

    #[test]
    fn truncated_or_lying_binary_plists_are_refused() {
        let shared = bplist(&[&[0xA2, 1, 2], &[0xA0], &[0x09]], 0);
        assert_eq!(check_binary(&shared, &LIMITS), Ok(()));
        for cut in 0..shared.len() {
            assert!(check_binary(&shared[..cut], &LIMITS).is_err(), "cut {cut}");
            // Whatever the guard lets through, parsing must not panic.
            let _ = parse(&shared[..cut], &LIMITS);
        }
        let mut lying = shared.clone();
        let at = lying.len() - 16;
        lying[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes()); // root out of range
        assert_eq!(
            check_binary(&lying, &LIMITS),
            Err(GuardError::MalformedBinary)
        );
        let mut lying = shared.clone();
        lying[8] = 0xAF; // extended length that runs past the end
        lying[9] = 0x13;
        assert_eq!(
            check_binary(&lying, &LIMITS),
            Err(GuardError::MalformedBinary)
        );
        let mut lying = shared;
        lying[10] = 9; // reference to an object that does not exist
        assert_eq!(
            check_binary(&lying, &LIMITS),
            Err(GuardError::MalformedBinary)
        );
    }

    #[test]
    fn ascii_plists_are_not_parsed() {
        assert!(matches!(
            parse(b"{ MessageType = Listen; }", &LIMITS),
            Err(GuardError::Parse(_))
        ));
    }

    #[test]
    fn no_panic_on_mutated_inputs() {
        let mut dict = plist::Dictionary::new();
        dict.insert("Key".into(), Value::String("value".into()));
        dict.insert(
            "List".into(),
            Value::Array(vec![Value::Data(vec![1, 2, 3]), Value::Boolean(false)]),
        );
        let value = Value::Dictionary(dict);
        let mut binary = Vec::new();
        value.to_writer_binary(&mut binary).unwrap();
        let mut xml = Vec::new();
        value.to_writer_xml(&mut xml).unwrap();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for seed in [&binary, &xml] {
            for _ in 0..5_000 {
                let mut bytes = seed.clone();
                for _ in 0..=next() % 4 {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = next() as u8;
                }
                let _ = parse(&bytes, &LIMITS);
            }
        }
    }
}
