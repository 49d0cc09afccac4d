//! Where the daemon is: `USBMUXD_SOCKET_ADDRESS` and the platform default (PROTOCOL.md §3.1,
//! §3.7).

use std::ffi::OsString;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use thiserror::Error;

/// The environment variable libusbmuxd (and this library) read the daemon's address from.
pub const ENV_VAR: &str = "USBMUXD_SOCKET_ADDRESS";

/// The daemon's Unix socket on Linux, the BSDs and macOS.
pub const DEFAULT_UNIX_PATH: &str = "/var/run/usbmuxd";

/// The daemon's TCP address on Windows (Apple Mobile Device Service).
pub const DEFAULT_TCP_HOST: &str = "127.0.0.1";

/// The daemon's TCP port on Windows.
pub const DEFAULT_TCP_PORT: u16 = 27015;

/// Why a string is not a usable daemon address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Error)]
#[non_exhaustive]
pub enum AddressError {
    /// The string is empty (or only a prefix such as `UNIX:` with nothing after it).
    #[error("empty socket address")]
    Empty,
    /// A `unix://` URL whose path is not absolute (`unix://relative`; the URL form needs three
    /// slashes, `unix:///path`).
    #[error("unix:// address needs an absolute path (unix:///path), got {0:?}")]
    RelativeUnixUrl(String),
    /// A path contains a NUL byte, which no socket path can.
    #[error("socket path contains a NUL byte")]
    NulInPath,
    /// A TCP address without `:PORT`.
    #[error("TCP address {0:?} has no :PORT")]
    MissingPort(String),
    /// The port is not a decimal number from 1 to 65535.
    #[error("invalid port {0:?} (expected 1..=65535)")]
    InvalidPort(String),
    /// The host part of `HOST:PORT` is empty (`:27015`).
    #[error("TCP address has an empty host")]
    EmptyHost,
    /// The host part is neither an IP address nor a DNS name (or a bracketed part is not IPv6).
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// The string is none of the accepted forms (e.g. a relative path without `UNIX:`).
    #[error("unrecognised socket address {0:?} (expected UNIX:/path, /path, HOST:PORT or tcp://HOST:PORT)")]
    Unrecognized(String),
    /// The environment variable is set but is not valid Unicode.
    #[error("{ENV_VAR} is not valid Unicode")]
    NotUnicode,
}

/// Where to reach the daemon: a Unix socket or a TCP address.
///
/// Real clients and scripts spell the address in several ways, and a tool built on this library
/// must understand every one of them, since the same variable is read by libusbmuxd's tools
/// and ours side by side:
///
/// | form | example | meaning |
/// |---|---|---|
/// | `UNIX:path` | `UNIX:/var/run/usbmuxd` | libusbmuxd's own form |
/// | `unix://path` | `unix:///tmp/usbmuxd` | URL form (Docker-style `unix://` plus an absolute path) |
/// | a bare absolute path | `/tmp/usbmuxd` | what usbmuxd's `-S PATH` takes |
/// | `HOST:PORT` | `127.0.0.1:27015`, `localhost:27015` | libusbmuxd's TCP form (split at the last `:`) |
/// | `[V6]:PORT` | `[::1]:27015` | IPv6 in brackets |
/// | `tcp://HOST:PORT` | `tcp://127.0.0.1:27015` | URL form |
///
/// The prefixes are matched without regard to case. [`SocketAddress::parse`] never panics and
/// reports what is wrong with a typed [`AddressError`]; its `Display` output is always one of
/// libusbmuxd's two forms (`UNIX:path`, `HOST:PORT`), so it can be handed on to child processes
/// that use libusbmuxd. So that every address prints as something that parses back to it, the
/// leading slashes of a path are collapsed to one, and a TCP host named `unix` is refused
/// (`unix:5` is the path `5`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SocketAddress {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP address. `host` is an IP address (IPv6 without brackets) or a DNS name, resolved
    /// at each connection so a name keeps following its address.
    Tcp {
        /// IP address or host name.
        host: String,
        /// Port, never 0.
        port: u16,
    },
}

impl SocketAddress {
    /// The platform's default: `/var/run/usbmuxd`, or `127.0.0.1:27015` on Windows.
    pub fn platform_default() -> SocketAddress {
        if cfg!(windows) {
            SocketAddress::Tcp {
                host: DEFAULT_TCP_HOST.to_owned(),
                port: DEFAULT_TCP_PORT,
            }
        } else {
            SocketAddress::Unix(PathBuf::from(DEFAULT_UNIX_PATH))
        }
    }

    /// Parses an address in any of the forms listed on [`SocketAddress`].
    ///
    /// Leading and trailing whitespace is not removed: a path may legitimately contain it, and
    /// a stray space in an environment variable is better reported than guessed around.
    pub fn parse(s: &str) -> Result<SocketAddress, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        if let Some(rest) = strip_prefix_ignore_case(s, "unix://") {
            if !rest.starts_with('/') {
                return Err(AddressError::RelativeUnixUrl(rest.to_owned()));
            }
            return unix_path(rest);
        }
        if let Some(rest) = strip_prefix_ignore_case(s, "unix:") {
            return unix_path(rest);
        }
        if let Some(rest) = strip_prefix_ignore_case(s, "tcp://") {
            // A URL may end with a '/' (`tcp://host:port/`); nothing else may follow.
            let rest = rest.strip_suffix('/').unwrap_or(rest);
            return host_port(rest);
        }
        if s.starts_with('/') {
            return unix_path(s);
        }
        if s.contains(':') {
            return host_port(s);
        }
        Err(AddressError::Unrecognized(s.to_owned()))
    }

    /// The address from `USBMUXD_SOCKET_ADDRESS`, or the [platform
    /// default](Self::platform_default) when the variable is unset or empty.
    ///
    /// Unlike libusbmuxd, which silently falls back to the default on a value it cannot parse,
    /// an unusable value is an error: talking to a different daemon than the one the user named
    /// would be a confusing way to fail.
    pub fn from_env() -> Result<SocketAddress, AddressError> {
        Self::from_env_value(std::env::var_os(ENV_VAR))
    }

    /// [`from_env`](Self::from_env) with the variable's value given (testable without touching
    /// the process environment).
    pub fn from_env_value(value: Option<OsString>) -> Result<SocketAddress, AddressError> {
        match value {
            None => Ok(Self::platform_default()),
            Some(v) if v.is_empty() => Ok(Self::platform_default()),
            Some(v) => Self::parse(v.to_str().ok_or(AddressError::NotUnicode)?),
        }
    }

    /// The address a tool should use: `explicit` (e.g. a `--socket` option) when given, else
    /// [`from_env`](Self::from_env).
    pub fn resolve(explicit: Option<&str>) -> Result<SocketAddress, AddressError> {
        match explicit {
            Some(s) => Self::parse(s),
            None => Self::from_env(),
        }
    }
}

impl fmt::Display for SocketAddress {
    /// libusbmuxd's forms: `UNIX:/path`, `host:port` or `[v6]:port`, so the result can be put
    /// in `USBMUXD_SOCKET_ADDRESS` for any client.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddress::Unix(path) => write!(f, "UNIX:{}", path.display()),
            SocketAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "[{host}]:{port}")
            }
            SocketAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl std::str::FromStr for SocketAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

/// A Unix socket path. Leading slashes are collapsed to one (`//tmp/s` names `/tmp/s` on every
/// system this runs on), so that the `UNIX:` form printed by `Display` never reads as a URL.
fn unix_path(path: &str) -> Result<SocketAddress, AddressError> {
    let path = match path.trim_start_matches('/') {
        rest if rest.len() + 1 < path.len() => &path[path.len() - rest.len() - 1..],
        _ => path,
    };
    if path.is_empty() {
        Err(AddressError::Empty)
    } else if path.contains('\0') {
        Err(AddressError::NulInPath)
    } else {
        Ok(SocketAddress::Unix(PathBuf::from(path)))
    }
}

/// `HOST:PORT` split at the last ':', `[V6]:PORT`, or a bare IPv6 address followed by `:PORT`
/// (libusbmuxd's split at the last ':' accepts that too).
fn host_port(s: &str) -> Result<SocketAddress, AddressError> {
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let (v6, after) = inner
            .split_once(']')
            .ok_or_else(|| AddressError::InvalidHost(s.to_owned()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| AddressError::MissingPort(s.to_owned()))?;
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(AddressError::InvalidHost(v6.to_owned()));
        }
        (v6, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| AddressError::MissingPort(s.to_owned()))?;
        if host.contains(':') && host.parse::<Ipv6Addr>().is_err() {
            return Err(AddressError::InvalidHost(host.to_owned()));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(AddressError::EmptyHost);
    }
    if host.eq_ignore_ascii_case("unix") {
        // `unix:1` reads as a Unix socket path: a host of that name could not be written down.
        return Err(AddressError::InvalidHost(host.to_owned()));
    }
    if !host.contains(':') && host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
        return Err(AddressError::InvalidHost(host.to_owned()));
    }
    Ok(SocketAddress::Tcp {
        host: host.to_owned(),
        port: parse_port(port)?,
    })
}

/// 1..=65535 in decimal digits only (no sign, no spaces, no hex).
fn parse_port(s: &str) -> Result<u16, AddressError> {
    let bad = || AddressError::InvalidPort(s.to_owned());
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

/// A host name: dot-separated labels of letters, digits, '-' and '_' (the last for the odd
/// container name), each 1..=63 characters, 253 at most in all; a trailing dot is allowed.
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> SocketAddress {
        SocketAddress::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn display_round_trips() {
        for addr in [
            SocketAddress::Unix("/var/run/usbmuxd".into()),
            SocketAddress::Unix("relative/sock".into()),
            tcp("127.0.0.1", 27015),
            tcp("::1", 27015),
            tcp("localhost", 65535),
        ] {
            assert_eq!(SocketAddress::parse(&addr.to_string()), Ok(addr.clone()));
        }
        assert_eq!(tcp("::1", 5).to_string(), "[::1]:5");
    }

    #[test]
    fn from_env_value_defaults() {
        assert_eq!(
            SocketAddress::from_env_value(None),
            Ok(SocketAddress::platform_default())
        );
        assert_eq!(
            SocketAddress::from_env_value(Some(OsString::new())),
            Ok(SocketAddress::platform_default())
        );
        assert_eq!(
            SocketAddress::from_env_value(Some("UNIX:/x".into())),
            Ok(SocketAddress::Unix("/x".into()))
        );
        assert_eq!(
            SocketAddress::from_env_value(Some("nonsense".into())),
            Err(AddressError::Unrecognized("nonsense".into()))
        );
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            assert_eq!(
                SocketAddress::from_env_value(Some(OsString::from_vec(vec![b'/', 0xFF]))),
                Err(AddressError::NotUnicode)
            );
        }
    }

    #[test]
    fn no_panic_on_arbitrary_strings() {
        let pieces = [
            "", ":", "[", "]", "/", "unix:", "UNIX:", "unix://", "tcp://", "tcp:", "::", "1",
            "65536", "0", "é", "\0", "a", "-", ".", "[::1]", "%", " ",
        ];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let s = format!("{a}{b}{c}");
                    if let Ok(addr) = SocketAddress::parse(&s) {
                        // Whatever parses prints as something that parses to the same.
                        assert_eq!(SocketAddress::parse(&addr.to_string()), Ok(addr), "{s:?}");
                    }
                }
            }
        }
    }
}
