//! What the command-line tools (`iproxy`, `inetcat`, `usbmuxctl`) share: picking a device the
//! way libusbmuxd's tools do, and copying between sockets.

use std::io::{self, Read, Write};

use crate::client::{Client, ClientError, ConnectionType, Device, SocketAddress};

/// The client a tool talks through: the `--socket` address when given, else
/// `USBMUXD_SOCKET_ADDRESS`, else the platform default; requests carry `prog_name`.
pub fn client(socket: Option<&str>, prog_name: &str) -> Result<Client, String> {
    let address = SocketAddress::resolve(socket).map_err(|e| e.to_string())?;
    Ok(Client::with_address(address).with_prog_name(Some(prog_name.into())))
}

/// Which devices a tool may use (`-u`, `-l`, `-n` of libusbmuxd's tools).
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    /// Only the device with this UDID (either form).
    pub udid: Option<String>,
    /// Only USB devices (`-l/--local`).
    pub usb_only: bool,
    /// Only network devices (`-n/--network`).
    pub network_only: bool,
}

/// Why no device could be used.
#[derive(Debug, thiserror::Error)]
pub enum PickError {
    /// The daemon could not be asked.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// No device matches.
    #[error("{0}")]
    NoDevice(String),
}

impl DeviceFilter {
    fn allows(&self, d: &Device) -> bool {
        let is_usb = d.connection_type == ConnectionType::Usb;
        if self.usb_only && !is_usb {
            return false;
        }
        if self.network_only && d.connection_type != ConnectionType::Network {
            return false;
        }
        self.udid.as_deref().is_none_or(|u| d.matches_udid(u))
    }

    /// Looks the device up now (a replugged phone has a new DeviceID, so tools look it up for
    /// every connection): the named one, else the first USB device, else the first device.
    pub fn pick(&self, client: &Client) -> Result<Device, PickError> {
        let devices = client.list_devices()?;
        let mut ok: Vec<Device> = devices.into_iter().filter(|d| self.allows(d)).collect();
        ok.sort_by_key(|d| (d.connection_type != ConnectionType::Usb, d.device_id));
        ok.into_iter().next().ok_or_else(|| {
            PickError::NoDevice(match &self.udid {
                Some(u) => format!("device {u} not found"),
                None => "no device connected".into(),
            })
        })
    }
}

/// Copies `from` → `to` until `from` ends; returns the bytes copied. Large buffer: the phone's
/// packets carry up to 48 KiB, and fewer system calls matter at hundreds of MB/s.
///
/// Every chunk is flushed as it is written: `to` may be a buffered writer such as a locked
/// stdout, and an interactive peer (a lockdown reply without a final newline) must see the
/// bytes now, not when more arrive. On sockets `flush` is free.
pub fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
        total += n as u64;
    }
}

/// How a tool copies between two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMethod {
    /// `read` into a 256 KiB buffer, `write` it out ([`pump`]).
    #[default]
    Buffer,
    /// `splice(2)` through a pipe ([`pump_splice`]; Linux only, [`pump`] elsewhere): the bytes
    /// go socket → pipe → socket inside the kernel, never through our address space.
    Splice,
}

/// Copies `from` → `to` (sockets) with `method` until `from` ends; returns the bytes copied.
pub fn pump_with<F, T>(method: CopyMethod, from: &mut F, to: &mut T) -> io::Result<u64>
where
    F: Read + std::os::fd::AsFd,
    T: Write + std::os::fd::AsFd,
{
    match method {
        CopyMethod::Buffer => pump(from, to),
        #[cfg(target_os = "linux")]
        CopyMethod::Splice => pump_splice(&*from, &*to),
        #[cfg(not(target_os = "linux"))]
        CopyMethod::Splice => pump(from, to),
    }
}

/// Pipe capacity asked for by [`pump_splice`]: as large as an unprivileged process may set by
/// default (`/proc/sys/fs/pipe-max-size`), so one splice moves up to 1 MiB.
#[cfg(target_os = "linux")]
const SPLICE_PIPE: usize = 1 << 20;

/// Copies `from` → `to` with `splice(2)` through a pipe until `from` ends; returns the bytes
/// copied. Both must be blocking file descriptors that support splice (sockets do).
#[cfg(target_os = "linux")]
pub fn pump_splice(from: impl std::os::fd::AsFd, to: impl std::os::fd::AsFd) -> io::Result<u64> {
    use nix::errno::Errno;
    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

    let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    // A smaller pipe (the 64 KiB default) still works, in more calls.
    let cap = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(SPLICE_PIPE as i32))
        .ok()
        .and_then(|c| usize::try_from(c).ok())
        .unwrap_or(64 * 1024);
    let flags = SpliceFFlags::SPLICE_F_MOVE;
    let mut total = 0u64;
    loop {
        let n = match splice(from.as_fd(), None, &pipe_w, None, cap, flags) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut left = n;
        while left > 0 {
            match splice(&pipe_r, None, to.as_fd(), None, left, flags) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        total += n as u64;
    }
}
