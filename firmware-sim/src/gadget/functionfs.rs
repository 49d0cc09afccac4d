//! The real FunctionFS files: `DIR/ep0` gets the descriptors and strings, then the endpoint
//! files appear — `DIR/ep1` (bulk OUT) and `DIR/ep2` (bulk IN), numbered in descriptor order
//! (see [`super::descriptors`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Endpoints;

/// A FunctionFS step that failed: which file, and the system's error.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {source}")]
pub struct FunctionFsError {
    /// The file concerned.
    pub path: PathBuf,
    /// The step ("open", "write descriptors", ...).
    pub what: &'static str,
    /// What the kernel said.
    #[source]
    pub source: io::Error,
}

/// The IN endpoint, shared by the writer thread and the packet-size query.
#[derive(Debug, Clone)]
pub struct InFile(Arc<File>);

impl Write for InFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

mod ioctl {
    nix::ioctl_read!(
        /// `FUNCTIONFS_ENDPOINT_DESC`: `_IOR('g', 130, struct usb_endpoint_descriptor)`, a 9-byte
        /// structure; the kernel copies the endpoint's descriptor for the speed in use.
        ffs_endpoint_desc,
        b'g',
        130,
        [u8; 9]
    );
}

/// The `wMaxPacketSize` the endpoint uses at the current speed; `None` while it is disabled or
/// if the kernel does not answer.
pub fn endpoint_max_packet_size(file: &File) -> Option<u16> {
    let mut desc = [0u8; 9];
    // SAFETY: the ioctl writes at most the 9 bytes its number encodes into `desc`, which lives
    // for the whole call; the descriptor is opened with O_NONBLOCK so the call cannot wait.
    let r = unsafe { ioctl::ffs_endpoint_desc(file.as_raw_fd(), &mut desc) };
    match r {
        Ok(_) if desc[0] >= 7 && desc[1] == super::descriptors::DT_ENDPOINT => {
            Some(u16::from_le_bytes([desc[4], desc[5]]) & 0x07ff)
        }
        _ => None,
    }
}

/// Writes `descriptors` and `strings` to `dir/ep0` (each in one write, as FunctionFS requires)
/// and opens the two endpoint files. From then on the function exists: a gadget linking it can
/// be bound to a UDC. `ep0` must stay open for as long as the function should.
///
/// The IN endpoint is opened with `O_NONBLOCK`, which in FunctionFS only means "fail with
/// `EAGAIN` instead of waiting while the endpoint is disabled": a packet of an unplugged phone is
/// dropped rather than sent to the next host session. Transfers themselves still block until
/// done.
pub fn open(
    dir: &Path,
    descriptors: &[u8],
    strings: &[u8],
    io: IoMode,
) -> Result<Opened, FunctionFsError> {
    let path = dir.join("ep0");
    let err = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| FunctionFsError { path, what, source }
    };
    let mut ep0 = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(err(&path, "open"))?;
    for (blob, what) in [
        (descriptors, "write descriptors"),
        (strings, "write strings"),
    ] {
        let n = ep0.write(blob).map_err(err(&path, what))?;
        if n != blob.len() {
            return Err(FunctionFsError {
                path,
                what,
                source: io::Error::other(format!("short write: {n} of {} bytes", blob.len())),
            });
        }
    }
    let out_path = dir.join("ep1");
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&out_path)
        .map_err(err(&out_path, "open"))?;
    let in_path = dir.join("ep2");
    let inp = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&in_path)
            .map_err(err(&in_path, "open"))?,
    );
    let probe = Arc::clone(&inp);
    let max_packet_size = Box::new(move || endpoint_max_packet_size(&probe));
    #[cfg(all(
        any(target_arch = "x86_64", target_arch = "aarch64"),
        target_endian = "little"
    ))]
    if io == IoMode::Loop {
        let dup = inp.try_clone().map_err(err(&in_path, "duplicate"))?;
        return Ok(Opened::Loop(super::event_loop::LoopEndpoints {
            ep0,
            out: out.into(),
            inp: dup.into(),
            max_packet_size,
        }));
    }
    let (out, inp) = endpoints(out, inp, io, &out_path, &in_path)?;
    Ok(Opened::Threads(Endpoints {
        ep0,
        out,
        inp,
        max_packet_size,
    }))
}

/// The endpoints as [`open`] prepared them for the chosen [`IoMode`].
#[derive(Debug)]
pub enum Opened {
    /// For [`Runner::run`](super::Runner::run) (reader and writer threads).
    Threads(Endpoints<File, OutEndpoint, InEndpoint>),
    /// For [`Runner::run_loop`](super::Runner::run_loop) (one thread).
    #[cfg(all(
        any(target_arch = "x86_64", target_arch = "aarch64"),
        target_endian = "little"
    ))]
    Loop(super::event_loop::LoopEndpoints),
}

/// How the bulk endpoints are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// One thread for ep0 and both endpoints, transfers queued through Linux AIO with their
    /// completions on an eventfd (`super::event_loop`), where this build has AIO; otherwise as
    /// [`IoMode::Queued`].
    #[default]
    Loop,
    /// A thread per endpoint, several transfers queued per endpoint through Linux AIO
    /// (`super::aio`), where this build has it; blocking otherwise.
    Queued,
    /// A thread per endpoint, one blocking `read`/`write` at a time (one request queued per
    /// endpoint: slower, simpler).
    Blocking,
}

#[cfg(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_endian = "little"
))]
fn endpoints(
    out: File,
    inp: Arc<File>,
    io: IoMode,
    out_path: &Path,
    in_path: &Path,
) -> Result<(OutEndpoint, InEndpoint), FunctionFsError> {
    use super::aio::{AioIn, AioOut};
    use crate::cable::DEVICE_READ_LEN;
    use usbmux_core::usb::MAX_PACKET;
    if io == IoMode::Blocking {
        return Ok((
            OutEndpoint::Blocking(out),
            InEndpoint::Blocking(InFile(inp)),
        ));
    }
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FunctionFsError {
            path,
            what: "set up AIO",
            source,
        }
    };
    let out = AioOut::new(out.into(), DEVICE_READ_LEN).map_err(err(out_path))?;
    let dup = inp.try_clone().map_err(err(in_path))?;
    let inp = AioIn::new(dup.into(), MAX_PACKET).map_err(err(in_path))?;
    Ok((OutEndpoint::Queued(out), InEndpoint::Queued(inp)))
}

#[cfg(not(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_endian = "little"
)))]
fn endpoints(
    out: File,
    inp: Arc<File>,
    _io: IoMode,
    _out_path: &Path,
    _in_path: &Path,
) -> Result<(OutEndpoint, InEndpoint), FunctionFsError> {
    Ok((
        OutEndpoint::Blocking(out),
        InEndpoint::Blocking(InFile(inp)),
    ))
}

/// The bulk OUT endpoint as opened by [`open`].
pub enum OutEndpoint {
    /// One blocking read at a time.
    Blocking(File),
    /// Several reads queued.
    #[cfg(all(
        any(target_arch = "x86_64", target_arch = "aarch64"),
        target_endian = "little"
    ))]
    Queued(super::aio::AioOut),
}

impl Read for OutEndpoint {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            OutEndpoint::Blocking(f) => f.read(buf),
            #[cfg(all(
                any(target_arch = "x86_64", target_arch = "aarch64"),
                target_endian = "little"
            ))]
            OutEndpoint::Queued(a) => a.read(buf),
        }
    }
}

/// The bulk IN endpoint as opened by [`open`].
pub enum InEndpoint {
    /// One blocking write at a time.
    Blocking(InFile),
    /// Several writes in flight.
    #[cfg(all(
        any(target_arch = "x86_64", target_arch = "aarch64"),
        target_endian = "little"
    ))]
    Queued(super::aio::AioIn),
}

impl Write for InEndpoint {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            InEndpoint::Blocking(f) => f.write(buf),
            #[cfg(all(
                any(target_arch = "x86_64", target_arch = "aarch64"),
                target_endian = "little"
            ))]
            InEndpoint::Queued(a) => a.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
