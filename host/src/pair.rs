//! The pair-record store: `SystemConfiguration.plist` (the host's SystemBUID) and one
//! `<UDID>.plist` per paired device in the daemon's config directory (`shared/PROTOCOL.md` §3.8).
//!
//! The layout is libimobiledevice's, so the two daemons can share a directory (the records are
//! written by libimobiledevice's pairing code through SavePairRecord, and read back through
//! ReadPairRecord):
//!
//! - the directory (`/var/lib/lockdown` on Linux, `/var/db/lockdown` on macOS) is created with
//!   mode 02775 when missing — group-writable and setgid, so a daemon running as a service user
//!   and the administrators of its group can both manage records; an existing directory's mode
//!   is left alone;
//! - `SystemConfiguration.plist` holds the string `SystemBUID`, an upper-case UUID the host
//!   identifies itself with to devices, created (from the operating system's random source) on
//!   first use;
//! - `<UDID>.plist` is the record of one device, stored as an XML plist: XML as received, binary
//!   converted. Its bytes are returned unchanged by [`PairRecordStore::read`], so a record
//!   written by libimobiledevice's usbmuxd is served as it is.
//!
//! Unlike libimobiledevice's daemon, this store
//!
//! - accepts only UDIDs as record ids ([`validate_udid`]), since the id becomes a file name: no
//!   client can read or overwrite `SystemConfiguration.plist` or anything outside the directory;
//! - writes every file atomically (a temporary file in the same directory, `fsync`, `rename`,
//!   `fsync` of the directory), so a crash leaves the old record or the new one, never half of
//!   one;
//! - creates records with mode 0600, since they hold the host's private keys;
//! - refuses records larger than [`MAX_RECORD_LEN`], which could not be sent back in one
//!   message.
//!
//! Every failure is a [`PairError`] whose [`errno`](PairError::errno) is the Result number
//! usbmuxd answers with (ENOENT = 2 for a missing record, EINVAL = 22 for a bad id or record).
//!
//! ```
//! use usbmux_host::pair::{PairError, PairRecordStore};
//!
//! # let tmp = tempfile::tempdir()?;
//! # let dir = tmp.path().join("lockdown");
//! let store = PairRecordStore::open(&dir)?; // e.g. /var/lib/lockdown
//! let buid = store.system_buid()?; // created on first use, then stable
//! assert_eq!(buid.len(), 36);
//!
//! let udid = "00008030-001A2B3C4D5E6F70";
//! let record = br#"<plist version="1.0"><dict><key>HostID</key><string>X</string></dict></plist>"#;
//! store.save(udid, record)?;
//! assert_eq!(store.read(udid)?, record);
//!
//! // Ids are UDIDs, never paths: usbmuxd answers EINVAL.
//! assert_eq!(store.read("../SystemConfiguration").unwrap_err().errno(), 22);
//! store.delete(udid)?;
//! assert!(matches!(store.read(udid), Err(PairError::NotFound)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use plist::{Dictionary, Value};
use thiserror::Error;
use usbmux_sim::plist_guard::{self, Format, Limits};

/// The usual config directory of this platform (libimobiledevice's and Apple's choice).
#[cfg(target_os = "macos")]
pub const DEFAULT_CONFIG_DIR: &str = "/var/db/lockdown";
/// The usual config directory of this platform (libimobiledevice's and Apple's choice).
#[cfg(not(target_os = "macos"))]
pub const DEFAULT_CONFIG_DIR: &str = "/var/lib/lockdown";

/// Name of the file that holds the SystemBUID.
pub const SYSTEM_CONFIGURATION: &str = "SystemConfiguration.plist";

/// Largest pair record stored or served, in bytes.
///
/// A ReadPairRecord reply carries the record base64-encoded (4/3 larger, plus line breaks)
/// inside one client-protocol message of at most 64 KiB; 40 KiB is the round number below that
/// limit. Real records (three certificates, two private keys, an escrow bag) are about 10 KiB.
pub const MAX_RECORD_LEN: usize = 40 * 1024;

/// What a pair record may contain (see [`plist_guard`]).
pub const RECORD_LIMITS: Limits = Limits {
    max_len: MAX_RECORD_LEN,
    max_collections: 256,
    max_depth: 32,
    max_expanded: 4 * MAX_RECORD_LEN,
};

/// What `SystemConfiguration.plist` may contain: like a record, but up to 1 MiB, since other
/// programs may keep their own keys there.
const CONFIG_LIMITS: Limits = Limits {
    max_len: 1 << 20,
    max_collections: 256,
    max_depth: 32,
    max_expanded: 4 << 20,
};

/// Shortest record usbmuxd accepts (anything shorter cannot be a plist dictionary).
const MIN_RECORD_LEN: usize = 8;

/// Mode of a newly created config directory: rwxrwsr-x.
const DIR_MODE: u32 = 0o2775;
/// Mode of a pair record: it holds private keys.
const RECORD_MODE: u32 = 0o600;
/// Mode of `SystemConfiguration.plist`: the BUID is no secret (it is sent to every device).
const CONFIG_MODE: u32 = 0o644;

const ENOENT: u32 = 2;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const EFBIG: u32 = 27;

/// Why a pair-record operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PairError {
    /// The record id is not a UDID (see [`validate_udid`]); it is never used as a file name.
    #[error("pair record id is not a UDID")]
    InvalidId,
    /// No record is stored under that id.
    #[error("no such pair record")]
    NotFound,
    /// The data to save is not a plist dictionary (or is refused by [`plist_guard`]).
    #[error("invalid pair record: {0}")]
    InvalidRecord(String),
    /// The record (to save, or found on disk) is larger than [`MAX_RECORD_LEN`].
    #[error("pair record of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its length in bytes (at least `max + 1` when read from disk).
        len: usize,
        /// The limit, [`MAX_RECORD_LEN`].
        max: usize,
    },
    /// The operating system's random source failed while generating a SystemBUID.
    #[error("no random numbers for a new SystemBUID: {0}")]
    Random(String),
    /// A file-system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
}

impl PairError {
    /// The errno value usbmuxd puts in the Result `Number` for this failure: ENOENT (2) for a
    /// missing record, EINVAL (22) for an invalid id or record, EFBIG (27) for an oversized one,
    /// the operating system's code for I/O errors (EIO, 5, when there is none).
    pub fn errno(&self) -> u32 {
        match self {
            Self::InvalidId | Self::InvalidRecord(_) => EINVAL,
            Self::NotFound => ENOENT,
            Self::TooLarge { .. } => EFBIG,
            Self::Random(_) => EIO,
            Self::Io { source, .. } => source
                .raw_os_error()
                .and_then(|code| u32::try_from(code).ok())
                .filter(|&code| code != 0)
                .unwrap_or(EIO),
        }
    }

    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Checks that `id` is a UDID, the only thing a pair record may be filed under: 24 hex digits
/// with a hyphen after the eighth (modern devices, as tools show them), the same without the
/// hyphen, or 40 hex digits (devices before the A12). Hex digits may be of either case.
///
/// Anything else — empty, too long, with `/`, `..`, NUL or any other character — is
/// [`PairError::InvalidId`], so an id can never name a file other than its own record.
pub fn validate_udid(id: &str) -> Result<(), PairError> {
    let bytes = id.as_bytes();
    let hex = |digits: &[u8]| digits.iter().all(u8::is_ascii_hexdigit);
    let valid = match bytes.len() {
        24 | 40 => hex(bytes),
        25 => bytes[8] == b'-' && hex(&bytes[..8]) && hex(&bytes[9..]),
        _ => false,
    };
    if valid {
        Ok(())
    } else {
        Err(PairError::InvalidId)
    }
}

/// Checks that `data` is a pair record worth storing — a plist dictionary (XML or binary) that
/// passes [`plist_guard`] with [`RECORD_LIMITS`] — and returns the XML bytes to store: `data`
/// itself when it is XML (trailing NULs removed), the converted dictionary when it is binary.
pub fn validate_record(data: &[u8]) -> Result<Cow<'_, [u8]>, PairError> {
    let data = match Format::of(data) {
        Format::Xml => {
            let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            &data[..end]
        }
        Format::Binary => data,
    };
    if data.len() < MIN_RECORD_LEN {
        return Err(PairError::InvalidRecord(format!(
            "{} bytes cannot be a plist dictionary",
            data.len()
        )));
    }
    if data.len() > MAX_RECORD_LEN {
        return Err(PairError::TooLarge {
            len: data.len(),
            max: MAX_RECORD_LEN,
        });
    }
    let value = plist_guard::parse(data, &RECORD_LIMITS)
        .map_err(|e| PairError::InvalidRecord(e.to_string()))?;
    if value.as_dictionary().is_none() {
        return Err(PairError::InvalidRecord("not a dictionary".into()));
    }
    match Format::of(data) {
        Format::Xml => Ok(Cow::Borrowed(data)),
        Format::Binary => {
            let mut xml = Vec::new();
            value
                .to_writer_xml(&mut xml)
                .map_err(|e| PairError::InvalidRecord(e.to_string()))?;
            if xml.len() > MAX_RECORD_LEN {
                return Err(PairError::TooLarge {
                    len: xml.len(),
                    max: MAX_RECORD_LEN,
                });
            }
            Ok(Cow::Owned(xml))
        }
    }
}

/// The pair records and SystemBUID in one config directory.
///
/// Operations on different records may run concurrently (each write replaces its file
/// atomically); the SystemBUID is created at most once per store.
#[derive(Debug)]
pub struct PairRecordStore {
    dir: PathBuf,
    /// The SystemBUID once read or created: it never changes while the daemon runs.
    buid: Mutex<Option<String>>,
}

impl PairRecordStore {
    /// Opens the store in `dir`, creating the directory (mode 02775, missing parents 0755) if
    /// it does not exist. An existing directory is used as it is.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, PairError> {
        let dir = dir.into();
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(PairError::io(
                    &dir,
                    io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_dir(&dir)?,
            Err(e) => return Err(PairError::io(&dir, e)),
        }
        Ok(Self {
            dir,
            buid: Mutex::new(None),
        })
    }

    /// The config directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host's SystemBUID: the string `SystemBUID` of `SystemConfiguration.plist`.
    ///
    /// When the file or the key is missing, a random version-4 UUID in upper case
    /// ("XXXXXXXX-XXXX-4XXX-YXXX-XXXXXXXXXXXX") is generated and written (atomically, keeping
    /// any other keys of the file). A file that is not a plist dictionary is replaced, as
    /// libimobiledevice's usbmuxd does: clients need a BUID, and a corrupt file cannot give
    /// one. Read errors other than "not found" are reported, never papered over.
    pub fn system_buid(&self) -> Result<String, PairError> {
        let mut cached = self.buid.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(buid) = cached.as_ref() {
            return Ok(buid.clone());
        }
        let path = self.dir.join(SYSTEM_CONFIGURATION);
        let mut config = match read_file(&path, CONFIG_LIMITS.max_len) {
            Ok(bytes) => match plist_guard::parse(&bytes, &CONFIG_LIMITS) {
                Ok(Value::Dictionary(dict)) => dict,
                _ => Dictionary::new(),
            },
            Err(ReadError::NotFound | ReadError::TooLarge(_)) => Dictionary::new(),
            Err(ReadError::Io(e)) => return Err(PairError::io(&path, e)),
        };
        if let Some(Value::String(buid)) = config.get("SystemBUID") {
            if !buid.is_empty() {
                *cached = Some(buid.clone());
                return Ok(buid.clone());
            }
        }
        let buid = new_buid()?;
        config.insert("SystemBUID".into(), Value::String(buid.clone()));
        let mut xml = Vec::new();
        if Value::Dictionary(config).to_writer_xml(&mut xml).is_err() {
            // Another program's key cannot be written as XML (a binary-only UID): keep the BUID.
            xml.clear();
            let mut only = Dictionary::new();
            only.insert("SystemBUID".into(), Value::String(buid.clone()));
            Value::Dictionary(only)
                .to_writer_xml(&mut xml)
                .map_err(|e| PairError::InvalidRecord(e.to_string()))?;
        }
        write_atomically(&self.dir, SYSTEM_CONFIGURATION, &xml, CONFIG_MODE)?;
        *cached = Some(buid.clone());
        Ok(buid)
    }

    /// The stored record of device `id`, as the bytes of its file.
    pub fn read(&self, id: &str) -> Result<Vec<u8>, PairError> {
        let path = self.record_path(id)?;
        read_file(&path, MAX_RECORD_LEN).map_err(|e| match e {
            ReadError::NotFound => PairError::NotFound,
            ReadError::TooLarge(len) => PairError::TooLarge {
                len,
                max: MAX_RECORD_LEN,
            },
            ReadError::Io(e) => PairError::io(&path, e),
        })
    }

    /// Stores `data` as the record of device `id`, replacing any previous one atomically.
    ///
    /// `data` must pass [`validate_record`]; it is stored as XML, mode 0600.
    pub fn save(&self, id: &str, data: &[u8]) -> Result<(), PairError> {
        validate_udid(id)?;
        let xml = validate_record(data)?;
        write_atomically(&self.dir, &record_name(id), &xml, RECORD_MODE)
    }

    /// Removes the record of device `id` ([`PairError::NotFound`] if there is none).
    pub fn delete(&self, id: &str) -> Result<(), PairError> {
        let path = self.record_path(id)?;
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(PairError::NotFound),
            Err(e) => Err(PairError::io(&path, e)),
        }
    }

    /// The file of device `id`'s record, once `id` is known to be a UDID.
    fn record_path(&self, id: &str) -> Result<PathBuf, PairError> {
        validate_udid(id)?;
        Ok(self.dir.join(record_name(id)))
    }
}

/// The file of a (validated) id. A new-style UDID sent without its hyphen (the USB serial
/// form, as some clients do) names the same record as the hyphenated form every tool shows.
fn record_name(id: &str) -> String {
    match id.len() {
        24 => format!("{}-{}.plist", &id[..8], &id[8..]),
        _ => format!("{id}.plist"),
    }
}

/// A fresh SystemBUID: a random (version 4, RFC 4122 variant) UUID in upper-case hex.
fn new_buid() -> Result<String, PairError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| PairError::Random(e.to_string()))?;
    b[6] = b[6] & 0x0f | 0x40;
    b[8] = b[8] & 0x3f | 0x80;
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|x| format!("{x:02X}")).collect() };
    Ok(format!(
        "{}-{}-{}-{}-{}",
        hex(&b[0..4]),
        hex(&b[4..6]),
        hex(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..16])
    ))
}

/// Why [`read_file`] found nothing usable.
enum ReadError {
    NotFound,
    /// The file is longer than allowed; the length seen (at least the limit + 1).
    TooLarge(usize),
    Io(io::Error),
}

/// Reads a whole regular file of at most `max` bytes.
///
/// Anything but a regular file is refused before it is opened (opening a FIFO would block the
/// daemon) and checked again once open.
fn read_file(path: &Path, max: usize) -> Result<Vec<u8>, ReadError> {
    let not_found = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => ReadError::NotFound,
        _ => ReadError::Io(e),
    };
    let not_regular = || {
        ReadError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    };
    if !fs::metadata(path).map_err(not_found)?.is_file() {
        return Err(not_regular());
    }
    let file = File::open(path).map_err(not_found)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() > max {
        let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
        return Err(ReadError::TooLarge(len.max(bytes.len())));
    }
    Ok(bytes)
}

/// Creates the config directory: missing parents with mode 0755, the directory itself with
/// [`DIR_MODE`] (set explicitly, since the umask would strip group write and `mkdir` ignores the
/// setgid bit).
fn create_dir(dir: &Path) -> Result<(), PairError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o755);
        builder
            .create(parent)
            .map_err(|e| PairError::io(parent, e))?;
    }
    match fs::create_dir(dir) {
        Ok(()) => set_mode(dir, DIR_MODE),
        // Created by someone else in the meantime: use theirs as it is.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(PairError::io(dir, e)),
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), PairError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| PairError::io(path, e))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<(), PairError> {
    Ok(())
}

/// Gives an open file exactly `mode` (creation modes are reduced by the umask).
#[cfg(unix)]
fn set_file_mode(file: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_file_mode(_file: &File, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Makes a rename or removal in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), PairError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PairError::io(dir, e))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), PairError> {
    Ok(())
}

/// Creates a new, empty temporary file for `name` in `dir` (never an existing one: the name
/// carries the process id and a counter, and creation fails rather than open a file or follow a
/// link that is already there).
fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    for _ in 0..64 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.{pid}.{n}.tmp"));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        match options.open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary file name",
    ))
}

/// Replaces `dir/name` with `bytes` so that a crash at any point leaves either the old file or
/// the complete new one: write a temporary file in the same directory, give it `mode`, flush it
/// to disk, rename it over the target, flush the directory. The temporary file is removed if
/// anything fails.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), PairError> {
    let target = dir.join(name);
    let (temp, mut file) = create_temp(dir, name, mode).map_err(|e| PairError::io(dir, e))?;
    let written = set_file_mode(&file, mode)
        .and_then(|()| file.write_all(bytes))
        .and_then(|()| file.sync_all())
        .map_err(|e| PairError::io(&temp, e))
        .and_then(|()| {
            drop(file);
            fs::rename(&temp, &target).map_err(|e| PairError::io(&target, e))
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    use std::os::unix::fs::PermissionsExt;

    /// A pair record as libimobiledevice writes it (libplist's XML layout, PEM text as data),
    /// with invented keys and certificates.
    const LIBIMOBILEDEVICE_RECORD: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>DeviceCertificate</key>
	<data>
	LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tClV2SW1aYVlNRXRLSkdGMlZEdWlCTmdr
	V2Iyc1JQUmVOYkEvVGtCL3lPYUdnbGZJUGs1VmxEUGs0QzQ3YklrcHIKSklvZWtrNlAw
	SzR1R3BTU296QmZHSXkyRUpBUG5qUi9yb2h0eGxCM2xleDBYRXcveXk2eXh6NFVrMHlH
	ZnVCWAp1bkpKbS9vU0hvTnJLc0ZYSnU1OWF3cjJxeFBEanBMSzRORlFWN0ZabUgrVXpI
	UVIxeGZ4UlhteXFoQVB1N05QCnBaUCtydEp5U0xkaTQ2dFlCZkIyV2l1Y0hYNFBOOFJK
	SWIwL1pXVHEzMzhVS25KbQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==
	</data>
	<key>EscrowBag</key>
	<data>
	jEfiI9Fu3YxHtGr8W67iYfU7JhUtJjuoOwN81JYuQ0gBJWuIXpyQUfMgsNuD856nrb0N
	dObex/PfrsyPZGVmZBp7omYPMBH8NXApHFeZDRoAkSaJGfJdnQYS3zWdYCaiQPRYml15
	Hx3ZfP76d3p7TxUkGr9XvUN6
	</data>
	<key>HostCertificate</key>
	<data>
	LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCjFMRXBoQVUwOC9PSFhDV3dpK29Hd29k
	TStxVGRGN0xZUW9SZDZDcGJ4VG1JaXNlQVZLSTVuTS9KL01MYU1jNDkKMFdhOXpUb3po
	SDVidXdmOUI4cEhlRUl4c1pyMFdITE83N244V2ZUNVhSUTRHanA0TWxZMGU1Lzg1cHpY
	QUhybwpwMWpNcEJYVnFSN29ZOGkyd0RONjR5MXZ5cUpWRnMzeStMaGxkbWErOGhXNUtD
	ditJQWNtbCtkM3pxY2xuTk9ZCitubW83MWtuakl3aEJRUE0rTG1tR29hLzd5TnYvTjh4
	MDk4MkIwQTJTb0E5dzVaVAotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==
	</data>
	<key>HostID</key>
	<string>5D3A1F0C-8E2B-4C71-9A46-0B7E2D9C13F8</string>
	<key>HostPrivateKey</key>
	<data>
	LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpRb3RyMVNFUDZMMWE1WFdwbGRE
	bmhHdlQ2dUNBSVlnbWhvSUUzM0RHTHBzQnhzd21MQ1I1bnJrZWpnOVRyb1NICmpudkl4
	aHZpanc0L01FWUt4Um1CYzQ4SHd1VHBFSEZUblBtQm00TXpzVVp6Z29qT2VvSHhQN0tG
	NE9EeDdVTHMKaitUeE05ZHlJMm9mWkhGUUVxczliUkkycTAzSUgrWEdKL0MzcEtsZEpF
	RGlJL2QzT0wvekdHWGlmQ245cXRVNQpLYlJ1L29OblZtc3lXMUVYdUYwRVZvMTFjTFFF
	WWxTRW4wdUQ5UkFjL092Sk92amdHaFZEUlFybnh5NUZ3U0hSCmJObnByZEh5UW1jbWll
	dURrbjZ6VXhaSERzeXdMbXpsRWtUd0JLSVd6VUlWbTlzNEVVUGNIM1FDVnY2TmF1M3EK
	LS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K
	</data>
	<key>RootCertificate</key>
	<data>
	LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tClJKOGhDNGExUGZBYytDbEREQzR6N2sr
	Z1RvZkNORXB5Z0t3dFJWak5CUDVBQ1FNRXU0R04rakNEZVQ3dmNodW8KMGFadXFINkwx
	ZU5rK0lGT3NEZjdPbGN5MWVHMHVxSWpaLzFZK3czV0lRTVNvTDNoUVc0cERoV3ExMkhl
	Z2F2NApTSmsrc1VzTGRTOG9SSElBUTEzMlZQajhqRkkrQ1BmaFR6ZGJMZ0JWWVJWNVI0
	Q25NeitCeGdFWFE5RVdKR2FXCkNtUUZURTJoT3hXVjlZZmF3Q2VvNUxmSTRaaGp3MU80
	L0g0bVNMbWVwQ1VMMDlXMwotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==
	</data>
	<key>RootPrivateKey</key>
	<data>
	LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQo1SU9nYmJ1eno0RWo2SWJBZ1pI
	VjBNMEUwNitWek9TMnJ2U3hwRG9WQndvaW8xejFHbURWYzQ0TW9BU2dpSzQrCmZVTUFk
	TXdSdis2QTVZa1hxSVlRdnJ4NVFNOFQyRU04dXNFME83Mm0rWFYrMkdFVGV1bXZTY1FM
	bmFHa01oT1oKSlZSQnByNnhUWitSSWdON0QzeEUrS3dac1Rlc2ZVcTFoRWwyZDNmRUh2
	N2tqRE5QK2hYdmVRUktkUlBSZ2ZmKwpjLzVFWXpYcTh1NDFFNVFYSkwrR1EvTmNJWnJS
	b1lKSDR4eTBYVHQvNWVCOFpBWW9BUE45cm5OblRib2thbGhnClVCN1hWQUJUd0ZiV1pS
	N3c3VEsyQSthOVNrQmZFR1JqLzk2V0UxenNiY0ZHMmd4SEdnM1ZxVW1pN3lZLytFUnYK
	LS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K
	</data>
	<key>SystemBUID</key>
	<string>0E1F2A3B-4C5D-4E6F-8A9B-0C1D2E3F4A5B</string>
	<key>WiFiMACAddress</key>
	<string>a4:c3:f0:12:34:56</string>
</dict>
</plist>
"#;

    const UDID: &str = "00008030-001A2B3C4D5E6F70";

    fn store() -> (tempfile::TempDir, PairRecordStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = PairRecordStore::open(tmp.path().join("lockdown")).unwrap();
        (tmp, store)
    }

    fn record(host_id: &str) -> Vec<u8> {
        let mut d = Dictionary::new();
        d.insert("HostID".into(), Value::String(host_id.into()));
        d.insert(
            "HostCertificate".into(),
            Value::Data(b"-----BEGIN".to_vec()),
        );
        let mut out = Vec::new();
        Value::Dictionary(d).to_writer_xml(&mut out).unwrap();
        out
    }

    /// Names in the store's directory, sorted.
    fn listing(store: &PairRecordStore) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn open_creates_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/lib/lockdown");
        let store = PairRecordStore::open(&dir).unwrap();
        assert!(dir.is_dir());
        assert_eq!(store.dir(), dir);
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir), 0o2775);
            // Parents: 0755 less the umask, never group-writable or setgid.
            assert_eq!(mode(&tmp.path().join("var/lib")) & !0o755, 0);
        }
        // Opening again keeps the directory and whatever is in it.
        store.save(UDID, &record("A")).unwrap();
        let again = PairRecordStore::open(&dir).unwrap();
        assert_eq!(again.read(UDID).unwrap(), record("A"));
    }

    #[cfg(unix)]
    #[test]
    fn open_leaves_an_existing_directory_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lockdown");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        PairRecordStore::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn open_refuses_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("lockdown");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            PairRecordStore::open(&file),
            Err(PairError::Io { .. })
        ));
    }

    #[test]
    fn save_read_delete_round_trip() {
        let (_tmp, store) = store();
        assert!(matches!(store.read(UDID), Err(PairError::NotFound)));
        store.save(UDID, &record("A")).unwrap();
        assert_eq!(store.read(UDID).unwrap(), record("A"));
        store.save(UDID, &record("B")).unwrap();
        assert_eq!(store.read(UDID).unwrap(), record("B"));
        assert_eq!(listing(&store), [format!("{UDID}.plist")]);
        store.delete(UDID).unwrap();
        assert!(matches!(store.read(UDID), Err(PairError::NotFound)));
        let err = store.delete(UDID).unwrap_err();
        assert!(matches!(err, PairError::NotFound));
        assert_eq!(err.errno(), 2);
        assert!(listing(&store).is_empty());
    }

    #[test]
    fn binary_records_are_stored_as_xml() {
        let (_tmp, store) = store();
        let xml = record("C");
        let value = Value::from_reader_xml(xml.as_slice()).unwrap();
        let mut binary = Vec::new();
        value.to_writer_binary(&mut binary).unwrap();
        store.save(UDID, &binary).unwrap();
        let stored = store.read(UDID).unwrap();
        assert!(stored.starts_with(b"<?xml"));
        assert_eq!(Value::from_reader_xml(stored.as_slice()).unwrap(), value);
    }

    #[test]
    fn trailing_nuls_are_dropped() {
        let (_tmp, store) = store();
        let mut data = record("D");
        data.push(0);
        store.save(UDID, &data).unwrap();
        assert_eq!(store.read(UDID).unwrap(), record("D"));
    }

    #[cfg(unix)]
    #[test]
    fn records_are_private() {
        let (_tmp, store) = store();
        store.save(UDID, &record("A")).unwrap();
        assert_eq!(mode(&store.dir().join(format!("{UDID}.plist"))), 0o600);
        store.system_buid().unwrap();
        assert_eq!(mode(&store.dir().join(SYSTEM_CONFIGURATION)), 0o644);
    }

    #[test]
    fn writes_leave_no_temporary_files() {
        let (_tmp, store) = store();
        let ids = [
            "00008030-001A2B3C4D5E6F70",
            "00008030001A2B3C4D5E6F71",
            "0123456789abcdef0123456789abcdef01234567",
        ];
        for (i, id) in ids.iter().enumerate() {
            for round in 0..3 {
                store.save(id, &record(&format!("{i}-{round}"))).unwrap();
            }
        }
        store.system_buid().unwrap();
        // The unhyphenated UDID is filed under its hyphenated form.
        let mut expected: Vec<String> = ids.iter().map(|id| record_name(id)).collect();
        assert_eq!(expected[1], "00008030-001A2B3C4D5E6F71.plist");
        expected.push(SYSTEM_CONFIGURATION.into());
        expected.sort();
        assert_eq!(listing(&store), expected);

        // A write that fails at the rename (the target is a non-empty directory) leaves the
        // old state and no temporary file.
        let blocked = "1111111111111111111111111111111111111111";
        let dir = store.dir().join(format!("{blocked}.plist"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("x"), b"x").unwrap();
        assert!(matches!(
            store.save(blocked, &record("E")),
            Err(PairError::Io { .. })
        ));
        expected.push(format!("{blocked}.plist"));
        expected.sort();
        assert_eq!(listing(&store), expected);
        // Reading it is an error, not a directory's contents.
        assert!(matches!(store.read(blocked), Err(PairError::Io { .. })));
    }

    #[test]
    fn concurrent_saves_all_land() {
        let (_tmp, store) = store();
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..10u8 {
                        let id = format!("{:024X}", u32::from(t) * 100 + u32::from(i));
                        store.save(&id, &record(&id)).unwrap();
                    }
                });
            }
        });
        assert_eq!(listing(&store).len(), 40);
        assert!(listing(&store).iter().all(|n| n.ends_with(".plist")));
    }

    #[test]
    fn udid_forms() {
        for good in [
            "00008030-001A2B3C4D5E6F70",
            "00008030-001a2b3c4d5e6f70",
            "00008030001A2B3C4D5E6F70",
            "0123456789abcdef0123456789abcdef01234567",
            "0123456789ABCDEF0123456789ABCDEF01234567",
        ] {
            assert!(validate_udid(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "a/b",
            "/etc/passwd",
            "\0",
            "00008030-001A2B3C4D5E6F7\0",
            "SystemConfiguration",
            "00008030-001A2B3C4D5E6F7",
            "00008030-001A2B3C4D5E6F701",
            "0000803-0001A2B3C4D5E6F70",
            "00008030_001A2B3C4D5E6F70",
            "00008030-001A2B3C4D5E6F7G",
            "0123456789abcdef0123456789abcdef0123456",
            "0123456789abcdef0123456789abcdef012345678",
            "0123456789abcdef0123456789abcdef0123456/",
            "00008030-001A2B3C4D5E6F70.plist",
            " 00008030001A2B3C4D5E6F70",
            "٠٠٠٠٨٠٣٠-٠٠١A2B3C4D5E6F70",
        ] {
            assert!(
                matches!(validate_udid(bad), Err(PairError::InvalidId)),
                "{bad:?}"
            );
        }
        assert!(validate_udid(&"a".repeat(1000)).is_err());
    }

    #[test]
    fn invalid_ids_touch_nothing() {
        let (tmp, store) = store();
        fs::write(tmp.path().join("x.plist"), record("outside")).unwrap();
        let long = "0".repeat(1000);
        for id in [
            "../x",
            "a/b",
            "\0",
            "",
            long.as_str(),
            "..",
            "SystemConfiguration",
        ] {
            for err in [
                store.read(id).unwrap_err(),
                store.save(id, &record("A")).unwrap_err(),
                store.delete(id).unwrap_err(),
            ] {
                assert!(matches!(err, PairError::InvalidId), "{id:?}: {err}");
                assert_eq!(err.errno(), 22);
            }
        }
        assert!(tmp.path().join("x.plist").exists());
        assert!(listing(&store).is_empty());
    }

    #[test]
    fn invalid_records_are_refused() {
        let (_tmp, store) = store();
        let deep = format!(
            "<plist><dict><key>X</key>{}{}</dict></plist>",
            "<array>".repeat(1000),
            "</array>".repeat(1000)
        );
        let array = b"<plist version=\"1.0\"><array><string>x</string></array></plist>";
        for bad in [
            &b""[..],
            b"<dict/>",
            b"\0\0\0\0\0\0\0\0\0\0",
            b"not a plist at all",
            array,
            b"<plist version=\"1.0\"><string>x</string></plist>",
            deep.as_bytes(),
        ] {
            let err = store.save(UDID, bad).unwrap_err();
            let shown = String::from_utf8_lossy(&bad[..bad.len().min(40)]);
            assert!(matches!(err, PairError::InvalidRecord(_)), "{shown}: {err}");
            assert_eq!(err.errno(), 22);
        }
        let mut huge = record("A");
        huge.extend(std::iter::repeat_n(b' ', MAX_RECORD_LEN));
        let err = store.save(UDID, &huge).unwrap_err();
        assert!(matches!(err, PairError::TooLarge { .. }));
        assert_eq!(err.errno(), 27);
        assert!(listing(&store).is_empty());
    }

    #[test]
    fn oversized_files_on_disk_are_not_served() {
        let (_tmp, store) = store();
        let path = store.dir().join(format!("{UDID}.plist"));
        fs::write(&path, vec![b' '; MAX_RECORD_LEN + 1]).unwrap();
        assert!(matches!(
            store.read(UDID),
            Err(PairError::TooLarge { len, max: MAX_RECORD_LEN }) if len == MAX_RECORD_LEN + 1
        ));
        fs::write(&path, vec![b' '; MAX_RECORD_LEN]).unwrap();
        assert_eq!(store.read(UDID).unwrap().len(), MAX_RECORD_LEN);
    }

    #[test]
    fn libimobiledevice_records_are_served_as_they_are() {
        let (_tmp, store) = store();
        let path = store.dir().join(format!("{UDID}.plist"));
        fs::write(&path, LIBIMOBILEDEVICE_RECORD).unwrap();
        let bytes = store.read(UDID).unwrap();
        assert_eq!(bytes, LIBIMOBILEDEVICE_RECORD.as_bytes());
        // It is a valid record by our own rules too, stored unchanged if saved back.
        let record = plist_guard::parse(&bytes, &RECORD_LIMITS).unwrap();
        let record = record.as_dictionary().unwrap();
        let keys: Vec<&str> = record.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "DeviceCertificate",
                "EscrowBag",
                "HostCertificate",
                "HostID",
                "HostPrivateKey",
                "RootCertificate",
                "RootPrivateKey",
                "SystemBUID",
                "WiFiMACAddress"
            ]
        );
        assert!(record["HostCertificate"]
            .as_data()
            .unwrap()
            .starts_with(b"-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(
            record["HostID"].as_string(),
            Some("5D3A1F0C-8E2B-4C71-9A46-0B7E2D9C13F8")
        );
        store.save(UDID, &bytes).unwrap();
        assert_eq!(store.read(UDID).unwrap(), bytes);
    }

    fn assert_uuid_form(buid: &str) {
        let b = buid.as_bytes();
        assert_eq!(b.len(), 36, "{buid}");
        for (i, &c) in b.iter().enumerate() {
            if [8, 13, 18, 23].contains(&i) {
                assert_eq!(c, b'-', "{buid}");
            } else {
                assert!(c.is_ascii_digit() || (b'A'..=b'F').contains(&c), "{buid}");
            }
        }
        assert_eq!(b[14], b'4', "version 4: {buid}");
        assert!(
            matches!(b[19], b'8' | b'9' | b'A' | b'B'),
            "variant: {buid}"
        );
    }

    #[test]
    fn system_buid_is_created_once_and_persists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lockdown");
        let store = PairRecordStore::open(&dir).unwrap();
        let buid = store.system_buid().unwrap();
        assert_uuid_form(&buid);
        assert_eq!(store.system_buid().unwrap(), buid);
        let file = fs::read(dir.join(SYSTEM_CONFIGURATION)).unwrap();
        let config = Value::from_reader_xml(file.as_slice()).unwrap();
        assert_eq!(
            config.as_dictionary().unwrap()["SystemBUID"].as_string(),
            Some(buid.as_str())
        );
        drop(store);
        let reopened = PairRecordStore::open(&dir).unwrap();
        assert_eq!(reopened.system_buid().unwrap(), buid);
        // A second store sees a different BUID: it is random.
        let (_other_tmp, other) = self::store();
        assert_ne!(other.system_buid().unwrap(), buid);
    }

    #[test]
    fn existing_system_configuration_is_used_unchanged() {
        let (_tmp, store) = store();
        let path = store.dir().join(SYSTEM_CONFIGURATION);
        let existing = concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" ",
            "\"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n",
            "<plist version=\"1.0\">\n<dict>\n",
            "\t<key>SystemBUID</key>\n\t<string>8A9B1C2D-3E4F-5061-7283-94A5B6C7D8E9</string>\n",
            "</dict>\n</plist>\n"
        );
        fs::write(&path, existing).unwrap();
        assert_eq!(
            store.system_buid().unwrap(),
            "8A9B1C2D-3E4F-5061-7283-94A5B6C7D8E9"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), existing);
    }

    #[test]
    fn system_configuration_without_buid_keeps_its_keys() {
        let (_tmp, store) = store();
        let path = store.dir().join(SYSTEM_CONFIGURATION);
        fs::write(
            &path,
            "<plist version=\"1.0\"><dict><key>Other</key><integer>5</integer></dict></plist>",
        )
        .unwrap();
        let buid = store.system_buid().unwrap();
        assert_uuid_form(&buid);
        let config = Value::from_file(&path).unwrap();
        let config = config.as_dictionary().unwrap();
        assert_eq!(config["Other"], Value::Integer(5.into()));
        assert_eq!(config["SystemBUID"].as_string(), Some(buid.as_str()));
    }

    #[test]
    fn corrupt_system_configuration_is_replaced() {
        for corrupt in [
            &b"garbage"[..],
            b"<plist><array/></plist>",
            b"<plist><dict><key>SystemBUID</key><integer>1</integer></dict></plist>",
            b"<plist><dict><key>SystemBUID</key><string/></dict></plist>",
        ] {
            let (_tmp, store) = store();
            let path = store.dir().join(SYSTEM_CONFIGURATION);
            fs::write(&path, corrupt).unwrap();
            let buid = store.system_buid().unwrap();
            assert_uuid_form(&buid);
            let reopened = PairRecordStore::open(store.dir()).unwrap();
            assert_eq!(reopened.system_buid().unwrap(), buid);
        }
    }

    #[test]
    fn errno_of_io_errors() {
        let err = PairError::io(Path::new("/x"), io::Error::from_raw_os_error(13));
        assert_eq!(err.errno(), 13);
        let err = PairError::io(Path::new("/x"), io::Error::other("no code"));
        assert_eq!(err.errno(), 5);
        assert_eq!(PairError::Random("x".into()).errno(), 5);
        assert!(err.to_string().starts_with("/x: "));
    }
}

#[cfg(test)]
mod record_name_test {
    #[test]
    fn both_forms_of_a_new_style_udid_name_one_record() {
        assert_eq!(
            super::record_name("00008030001A2B3C4D5E6F70"),
            "00008030-001A2B3C4D5E6F70.plist"
        );
        assert_eq!(
            super::record_name("00008030-001A2B3C4D5E6F70"),
            "00008030-001A2B3C4D5E6F70.plist"
        );
        let legacy = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(super::record_name(legacy), format!("{legacy}.plist"));
    }
}
