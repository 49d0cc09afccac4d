//! Transfer traces: every USB transfer a simulated phone sends or receives, with a timestamp and
//! direction, recorded to a file and printed back decoded (`usbmux-sim serve --trace FILE`,
//! `usbmux-sim dump FILE`).
//!
//! # File format (version [`TRACE_VERSION`])
//!
//! A trace file is a sequence of records and nothing else (no file header). Each record is
//!
//! ```text
//! COBS( version: u8 ‖ postcard(Record) ) ‖ 0x00
//! ```
//!
//! - **Framing**: COBS (consistent overhead byte stuffing), so the encoded record contains no zero
//!   byte and a single `0x00` ends it. A reader can always find the next record boundary, and a
//!   file cut short shows up as a last record without its `0x00`.
//! - **version**: one byte, [`TRACE_VERSION`] (1), first in every record, so a reader rejects
//!   records of a format it does not know instead of misreading them.
//! - **body**: the postcard encoding of [`Record`]: `phone` (varint), `micros` (varint), then
//!   [`Entry`] as a varint variant index (0 `Transfer`, 1 `Zlp`, 2 `Plug`, 3 `Unplug`) followed
//!   by its fields: [`Direction`] as a varint (0 `Out` host → phone, 1 `In` phone → host),
//!   `data` as varint length + bytes, `reason` as varint length + UTF-8. Varints are postcard's
//!   unsigned LEB128.
//!
//! Decoding never panics: a record that ends without `0x00`, breaks COBS, carries another
//! version or does not decode as a `Record` is a [`TraceError`] naming its index (from 0).

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use usbmux_core::wire::{HeaderKind, MuxPacket, Summary, VersionPacket, VersionRepr};

/// The format version written first in every record.
pub const TRACE_VERSION: u8 = 1;

/// Which way a transfer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Bulk OUT: host → phone.
    Out,
    /// Bulk IN: phone → host.
    In,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Out => "host->phone",
            Direction::In => "phone->host",
        })
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A non-empty bulk transfer, as submitted by its sender.
    Transfer {
        /// Which way.
        direction: Direction,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// A zero-length packet.
    Zlp {
        /// Which way.
        direction: Direction,
    },
    /// A host connected: the phone is plugged in and starts afresh.
    Plug,
    /// The phone was unplugged (the host closed the link, sent UNPLUG, broke the protocol, or
    /// the server stopped).
    Unplug {
        /// Why, for people.
        reason: String,
    },
}

/// One trace record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Which phone (1-based, the order of the socket paths of `usbmux-sim serve`).
    pub phone: u32,
    /// Microseconds since the trace started (a monotonic clock).
    pub micros: u64,
    /// What happened.
    pub entry: Entry,
}

impl Entry {
    /// A transfer entry; an empty `data` makes it a ZLP.
    pub fn transfer(direction: Direction, data: &[u8]) -> Entry {
        if data.is_empty() {
            Entry::Zlp { direction }
        } else {
            Entry::Transfer {
                direction,
                data: data.to_vec(),
            }
        }
    }
}

impl Record {
    /// A transfer record; an empty `data` makes it a ZLP record.
    pub fn transfer(phone: u32, micros: u64, direction: Direction, data: &[u8]) -> Record {
        Record {
            phone,
            micros,
            entry: Entry::transfer(direction, data),
        }
    }

    /// The record as it is stored: COBS-framed version byte and postcard body, with its `0x00`.
    pub fn encode(&self) -> Vec<u8> {
        match postcard::to_stdvec(&(TRACE_VERSION, self)) {
            Ok(raw) => cobs_encode(&raw),
            // Serializing plain data into a Vec cannot fail; keep the file well-formed anyway.
            Err(_) => cobs_encode(&[TRACE_VERSION]),
        }
    }
}

/// Writes trace records to any `Write` (a file, a `Vec<u8>`).
#[derive(Debug)]
pub struct TraceWriter<W: Write> {
    out: W,
    records: u64,
}

impl TraceWriter<BufWriter<File>> {
    /// Creates (or truncates) a trace file, mode 0600 when created: traces hold everything the
    /// host sent.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(TraceWriter::new(BufWriter::new(file)))
    }
}

impl<W: Write> TraceWriter<W> {
    /// A writer appending records to `out`.
    pub fn new(out: W) -> Self {
        TraceWriter { out, records: 0 }
    }

    /// Appends one record. Records are buffered as far as `W` buffers: call
    /// [`TraceWriter::flush`] before anyone reads the file.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        self.out.write_all(&record.encode())?;
        self.records += 1;
        Ok(())
    }

    /// Flushes `W`.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The underlying writer (not flushed).
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Why a trace could not be read past record `index`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index}: {kind}")]
pub struct TraceError {
    /// Index (from 0) of the first record that could not be read; all records before it were good.
    pub index: usize,
    /// What was wrong with it.
    pub kind: TraceErrorKind,
}

/// What was wrong with a trace record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceErrorKind {
    /// The file ends inside this record (no terminating `0x00`): it was cut short, e.g. by a
    /// writer that was killed. The records before it are complete.
    #[error("truncated ({0} bytes without a terminator)")]
    Truncated(usize),
    /// The COBS framing is broken (an empty record or a block running past the terminator).
    #[error("bad COBS framing")]
    Framing,
    /// The record is of another format version.
    #[error("unsupported format version {0} (this tool reads version {TRACE_VERSION})")]
    Version(u8),
    /// The body is not a valid [`Record`].
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// Iterates the records of a trace file's bytes, oldest first. After the first error it yields
/// nothing more.
#[derive(Debug)]
pub struct Records<'a> {
    rest: &'a [u8],
    index: usize,
    failed: bool,
}

/// The records of a whole trace file.
pub fn records(bytes: &[u8]) -> Records<'_> {
    Records {
        rest: bytes,
        index: 0,
        failed: false,
    }
}

/// Every record of a trace file, or the first error.
pub fn read_records(bytes: &[u8]) -> Result<Vec<Record>, TraceError> {
    records(bytes).collect()
}

impl Iterator for Records<'_> {
    type Item = Result<Record, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let index = self.index;
        self.index += 1;
        let fail = |s: &mut Self, kind| {
            s.failed = true;
            Some(Err(TraceError { index, kind }))
        };
        let Some(end) = self.rest.iter().position(|&b| b == 0) else {
            return fail(self, TraceErrorKind::Truncated(self.rest.len()));
        };
        let frame = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        let Some(raw) = cobs_decode(frame) else {
            return fail(self, TraceErrorKind::Framing);
        };
        match raw.split_first() {
            Some((&TRACE_VERSION, body)) => match postcard::take_from_bytes::<Record>(body) {
                Ok((rec, [])) => Some(Ok(rec)),
                Ok((_, extra)) => fail(
                    self,
                    TraceErrorKind::Corrupt(format!("{} trailing bytes", extra.len())),
                ),
                Err(e) => fail(self, TraceErrorKind::Corrupt(e.to_string())),
            },
            Some((&v, _)) => fail(self, TraceErrorKind::Version(v)),
            None => fail(self, TraceErrorKind::Framing),
        }
    }
}

/// COBS-encodes `raw` and appends the `0x00` terminator.
fn cobs_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 254 + 2);
    let mut code_at = out.len();
    out.push(0);
    let mut code = 1u8;
    for &b in raw {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            if code == 0xFF {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
    out.push(0);
    out
}

/// Decodes one COBS frame (without its terminator); `None` if it is not valid COBS.
fn cobs_decode(frame: &[u8]) -> Option<Vec<u8>> {
    if frame.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(frame.len());
    let mut i = 0;
    while i < frame.len() {
        let code = usize::from(frame[i]);
        if code == 0 {
            return None;
        }
        let block = frame.get(i + 1..i + code)?;
        out.extend_from_slice(block);
        i += code;
        if code < 0xFF && i < frame.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// Renders records as text, one line each, following each phone's header form.
///
/// The mux header form is negotiated, so the dumper watches the handshake per phone: VERSION from
/// the host (re)starts it (host packets in 8-byte headers), the phone's VERSION reply with major
/// 2 switches both directions to 16-byte headers (major 1: 8-byte), and a plug or unplug starts
/// over. Lines look like
///
/// ```text
///      4    0.001032 phone 1 phone->host    20 B  v1 VERSION 2.0
/// ```
#[derive(Debug, Default)]
pub struct Dumper {
    kinds: HashMap<u32, [HeaderKind; 2]>,
}

impl Dumper {
    /// A dumper that has seen no handshake yet.
    pub fn new() -> Self {
        Dumper::default()
    }

    /// One line (without newline) for record `index`.
    pub fn line(&mut self, index: usize, rec: &Record) -> String {
        let t = format!(
            "{index:>6} {:>4}.{:06} phone {}",
            rec.micros / 1_000_000,
            rec.micros % 1_000_000,
            rec.phone
        );
        let kinds = self
            .kinds
            .entry(rec.phone)
            .or_insert([HeaderKind::V1, HeaderKind::V1]);
        match &rec.entry {
            Entry::Plug => {
                *kinds = [HeaderKind::V1, HeaderKind::V1];
                format!("{t} plugged in")
            }
            Entry::Unplug { reason } => {
                *kinds = [HeaderKind::V1, HeaderKind::V1];
                format!("{t} unplugged ({reason})")
            }
            Entry::Zlp { direction } => format!("{t} {direction}     0 B  ZLP"),
            Entry::Transfer { direction, data } => {
                let slot = match direction {
                    Direction::Out => 0,
                    Direction::In => 1,
                };
                let line = format!(
                    "{t} {direction} {:>5} B  {}",
                    data.len(),
                    Summary {
                        bytes: data,
                        kind: kinds[slot],
                    }
                );
                if let Some(major) = version_major(data) {
                    match direction {
                        Direction::Out => kinds[0] = HeaderKind::V1,
                        Direction::In if major >= 2 => *kinds = [HeaderKind::V2, HeaderKind::V2],
                        Direction::In => *kinds = [HeaderKind::V1, HeaderKind::V1],
                    }
                }
                line
            }
        }
    }
}

/// The major version of a VERSION packet (either header form), `None` for anything else.
fn version_major(bytes: &[u8]) -> Option<u32> {
    if bytes.get(0..4)? != [0, 0, 0, 0] {
        return None;
    }
    let kind = usbmux_core::wire::mux::detect_kind(bytes);
    let packet = MuxPacket::new_checked(bytes, kind).ok()?;
    let body = VersionPacket::new_checked(packet.payload()).ok()?;
    VersionRepr::parse(&body).ok().map(|v| v.major)
}

/// Why `dump` stopped.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The trace is truncated or corrupt at some record (those before it were printed).
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// Writing the output failed.
    #[error("writing the dump: {0}")]
    Io(#[from] io::Error),
}

/// Prints every record of a trace file's bytes to `out`, one line each; returns how many. On a
/// bad record, the lines before it are printed and its error is returned.
pub fn dump(bytes: &[u8], out: &mut dyn Write) -> Result<usize, DumpError> {
    let mut dumper = Dumper::new();
    let mut n = 0;
    for (i, rec) in records(bytes).enumerate() {
        let rec = rec?;
        writeln!(out, "{}", dumper.line(i, &rec))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn cobs_round_trip() {
        for raw in [
            vec![],
            vec![0],
            vec![0, 0],
            vec![1, 2, 3],
            (0..=255u8).collect::<Vec<_>>(),
            vec![7; 254],
            vec![7; 255],
            vec![7; 600],
            [vec![7; 254], vec![0], vec![9; 3]].concat(),
        ] {
            let enc = cobs_encode(&raw);
            assert_eq!(enc.last(), Some(&0));
            let frame = &enc[..enc.len() - 1];
            assert!(!frame.contains(&0), "{raw:?}");
            assert_eq!(cobs_decode(frame), Some(raw.clone()), "{raw:?}");
        }
    }

    #[test]
    fn our_cobs_matches_postcards() {
        let rec = Record::transfer(3, 123_456, Direction::In, &[0, 1, 0, 0, 5]);
        let theirs = postcard::to_stdvec_cobs(&(TRACE_VERSION, &rec)).expect("encode");
        assert_eq!(rec.encode(), theirs);
    }

    #[test]
    fn cobs_decode_rejects_nonsense() {
        assert_eq!(cobs_decode(&[]), None);
        assert_eq!(cobs_decode(&[5, 1, 2]), None);
        assert_eq!(cobs_decode(&[1, 0]), None);
    }
}
