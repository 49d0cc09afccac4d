//! What can go wrong talking to the daemon, as one typed error.

use std::io;

use thiserror::Error;

use super::address::AddressError;

/// `ENOENT`: ReadPairRecord / DeletePairRecord found no record.
const ENOENT: u32 = 2;
/// `EINVAL`: a pair-record request with an unusable id or record.
const EINVAL: u32 = 22;

/// Why a call to the daemon failed.
///
/// The daemon's Result numbers become the variants from [`ConnectionRefused`](Self::ConnectionRefused)
/// to [`Errno`](Self::Errno); which variant a number maps to depends on the request, since the
/// protocol reuses numbers (2 is "no such device" for Connect but `ENOENT` for pair records).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon's address (an argument or `USBMUXD_SOCKET_ADDRESS`) is unusable.
    #[error("invalid usbmuxd socket address: {0}")]
    Address(#[from] AddressError),
    /// The daemon's socket could not be reached (no daemon running, no permission, …).
    #[error("cannot reach usbmuxd at {address}: {source}")]
    DaemonUnreachable {
        /// The address tried, in `USBMUXD_SOCKET_ADDRESS` form.
        address: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// Connect: nothing listens on that port of the device (Result 3, CONNREFUSED).
    #[error("the device refused the connection (nothing listens on that port)")]
    ConnectionRefused,
    /// Connect: the daemon has no device with that id (Result 2, BADDEV) — it was unplugged, or
    /// the id is from before a replug.
    #[error("no such device")]
    NoSuchDevice,
    /// The daemon does not know the request or refused it in this state (Result 1, BADCOMMAND).
    #[error("the daemon refused the command (BADCOMMAND)")]
    BadCommand,
    /// The daemon does not speak the protocol version of the request (Result 6, BADVERSION).
    /// The client falls back to the binary protocol by itself; this surfaces only if the binary
    /// protocol is refused too.
    #[error("the daemon does not speak this protocol version (BADVERSION)")]
    BadVersion,
    /// The request does not exist in the protocol the daemon speaks: the binary protocol has
    /// only Listen and Connect (and ListDevices is emulated with Listen).
    #[error("{request} is not available with a binary-protocol-only daemon")]
    Unsupported {
        /// The request's name, e.g. "ReadBUID".
        request: &'static str,
    },
    /// No pair record is stored under that id (`ENOENT`).
    #[error("no such pair record")]
    NotFound,
    /// The daemon found the arguments unusable (`EINVAL`): a record id that is not a UDID, or a
    /// record that is not a plist dictionary.
    #[error("invalid argument (EINVAL)")]
    InvalidArgument,
    /// A pair-record or BUID request failed with this other errno value (e.g. 13 EACCES, 27
    /// EFBIG).
    #[error("the daemon answered with errno {0}")]
    Errno(u32),
    /// Listen or Connect got a Result number this library has no name for (e.g. 4, which some
    /// daemons use for "no such service").
    #[error("the daemon answered with unknown result code {0}")]
    UnknownResult(u32),
    /// The daemon sent something that does not follow the protocol (unparsable message,
    /// missing key, wrong type).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The daemon closed the connection where a message was expected.
    #[error("the daemon closed the connection")]
    Disconnected,
    /// The call did not complete within its timeout.
    #[error("timed out waiting for usbmuxd")]
    Timeout,
    /// Any other I/O error on the daemon's socket.
    #[error("I/O error talking to usbmuxd: {0}")]
    Io(io::Error),
}

impl From<io::Error> for ClientError {
    /// A socket timeout (`WouldBlock` / `TimedOut`, what a read or write timeout yields) becomes
    /// [`ClientError::Timeout`]; an unexpected end of stream [`ClientError::Disconnected`].
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
            io::ErrorKind::UnexpectedEof => ClientError::Disconnected,
            _ => ClientError::Io(e),
        }
    }
}

impl ClientError {
    /// Whether this is [`ClientError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout)
    }
}

/// How a request's Result numbers read: as usbmuxd result codes or as errno values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultKind {
    /// Listen and Connect: 2 BADDEV, 3 CONNREFUSED.
    Device,
    /// Pair records, ReadBUID, the lists: 2 ENOENT, 22 EINVAL, other errno values.
    Errno,
}

/// The error for a non-zero Result `number` of a request of `kind` (`None` for 0, success).
pub(crate) fn result_error(number: u32, kind: ResultKind) -> Option<ClientError> {
    Some(match (number, kind) {
        (0, _) => return None,
        (1, _) => ClientError::BadCommand,
        (6, _) => ClientError::BadVersion,
        (2, ResultKind::Device) => ClientError::NoSuchDevice,
        (3, ResultKind::Device) => ClientError::ConnectionRefused,
        (n, ResultKind::Device) => ClientError::UnknownResult(n),
        (ENOENT, ResultKind::Errno) => ClientError::NotFound,
        (EINVAL, ResultKind::Errno) => ClientError::InvalidArgument,
        (n, ResultKind::Errno) => ClientError::Errno(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_numbers_by_kind() {
        use ResultKind::*;
        assert!(result_error(0, Device).is_none());
        assert!(result_error(0, Errno).is_none());
        assert!(matches!(
            result_error(1, Device),
            Some(ClientError::BadCommand)
        ));
        assert!(matches!(
            result_error(1, Errno),
            Some(ClientError::BadCommand)
        ));
        assert!(matches!(
            result_error(2, Device),
            Some(ClientError::NoSuchDevice)
        ));
        assert!(matches!(
            result_error(2, Errno),
            Some(ClientError::NotFound)
        ));
        assert!(matches!(
            result_error(3, Device),
            Some(ClientError::ConnectionRefused)
        ));
        assert!(matches!(
            result_error(3, Errno),
            Some(ClientError::Errno(3))
        ));
        assert!(matches!(
            result_error(4, Device),
            Some(ClientError::UnknownResult(4))
        ));
        assert!(matches!(
            result_error(6, Device),
            Some(ClientError::BadVersion)
        ));
        assert!(matches!(
            result_error(6, Errno),
            Some(ClientError::BadVersion)
        ));
        assert!(matches!(
            result_error(22, Errno),
            Some(ClientError::InvalidArgument)
        ));
        assert!(matches!(
            result_error(13, Errno),
            Some(ClientError::Errno(13))
        ));
    }

    #[test]
    fn io_errors_map_timeouts() {
        let e = |k| ClientError::from(io::Error::from(k));
        assert!(e(io::ErrorKind::WouldBlock).is_timeout());
        assert!(e(io::ErrorKind::TimedOut).is_timeout());
        assert!(matches!(
            e(io::ErrorKind::UnexpectedEof),
            ClientError::Disconnected
        ));
        assert!(matches!(e(io::ErrorKind::BrokenPipe), ClientError::Io(_)));
    }
}
