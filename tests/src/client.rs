//! A minimal usbmuxd client of our own, built on `usbmux_host::proto` and the `plist` crate.
//!
//! The interop tests use it to wait until phones are visible and to see who listens before
//! they run the real tools; what they assert about the daemon comes from the tools.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use usbmux_host::proto::{Header, MessageType, HEADER_LEN, MAX_MESSAGE_LEN};

use crate::net::{poll_until, IO_TIMEOUT, SETTLE_TIMEOUT};

/// A connection to a daemon's client socket: Unix or TCP, with [`IO_TIMEOUT`] on both
/// directions.
#[derive(Debug)]
pub enum ClientStream {
    /// `UNIX:/path`.
    Unix(UnixStream),
    /// `HOST:PORT`.
    Tcp(TcpStream),
}

impl ClientStream {
    /// Connects to a `USBMUXD_SOCKET_ADDRESS` value: `UNIX:/path` or `HOST:PORT`.
    pub fn connect(address: &str) -> io::Result<ClientStream> {
        let s = match address.strip_prefix("UNIX:") {
            Some(path) => ClientStream::Unix(UnixStream::connect(path)?),
            None => {
                let addr = address.parse().map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{address:?}: {e}"))
                })?;
                ClientStream::Tcp(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
            }
        };
        s.set_timeouts(Some(IO_TIMEOUT))?;
        Ok(s)
    }

    /// Sets the read and write timeouts.
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            ClientStream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// A second handle on the same connection (one thread writes, another reads).
    pub fn try_clone(&self) -> io::Result<ClientStream> {
        Ok(match self {
            ClientStream::Unix(s) => ClientStream::Unix(s.try_clone()?),
            ClientStream::Tcp(s) => ClientStream::Tcp(s.try_clone()?),
        })
    }

    /// Reads one whole message: the 16-byte header and the body it announces.
    pub fn read_message(&mut self) -> io::Result<(Header, Vec<u8>)> {
        let mut head = [0u8; HEADER_LEN];
        self.read_exact(&mut head)?;
        let header = Header::parse(&head)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if header.length < HEADER_LEN as u32 || header.length > MAX_MESSAGE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad length in {header:?}"),
            ));
        }
        let mut body = vec![0u8; header.body_len()];
        self.read_exact(&mut body)?;
        Ok((header, body))
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Unix(s) => s.read(buf),
            ClientStream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Unix(s) => s.write(buf),
            ClientStream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => s.flush(),
            ClientStream::Tcp(s) => s.flush(),
        }
    }
}

impl Read for &ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Unix(s) => (&*s).read(buf),
            ClientStream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Unix(s) => (&*s).write(buf),
            ClientStream::Tcp(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => (&*s).flush(),
            ClientStream::Tcp(s) => (&*s).flush(),
        }
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Sends one plist request (`MessageType` = `message_type`, plus libusbmuxd's identification
/// keys with `ProgName` "usbmux-tests") on a fresh connection, as libusbmuxd does, and returns
/// the reply's dictionary.
pub fn plist_request(address: &str, message_type: &str) -> io::Result<plist::Dictionary> {
    let mut req = plist::Dictionary::new();
    req.insert("ClientVersionString".into(), "usbmux-tests".into());
    req.insert("MessageType".into(), message_type.into());
    req.insert("ProgName".into(), "usbmux-tests".into());
    req.insert("kLibUSBMuxVersion".into(), 3.into());
    let mut body = Vec::new();
    plist::Value::Dictionary(req)
        .to_writer_xml(&mut body)
        .map_err(|e| invalid(e.to_string()))?;
    let tag = 1;
    let msg =
        usbmux_host::plist_msg::encode_message(tag, &body).map_err(|e| invalid(e.to_string()))?;
    let mut s = ClientStream::connect(address)?;
    s.write_all(&msg)?;
    let (header, body) = s.read_message()?;
    if header.message != MessageType::Plist || header.tag != tag {
        return Err(invalid(format!("unexpected reply header {header:?}")));
    }
    plist::Value::from_reader(io::Cursor::new(body))
        .map_err(|e| invalid(e.to_string()))?
        .into_dictionary()
        .ok_or_else(|| invalid("reply is not a dictionary".into()))
}

/// A device as a ListDevices reply describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDevice {
    /// `DeviceID`.
    pub device_id: u64,
    /// `Properties.SerialNumber` (the UDID as the tools show it).
    pub serial: String,
    /// `Properties.ProductID`.
    pub product_id: u64,
    /// `Properties.LocationID`.
    pub location_id: u64,
}

/// The daemon's ListDevices answer.
pub fn list_devices(address: &str) -> io::Result<Vec<ListedDevice>> {
    let reply = plist_request(address, "ListDevices")?;
    let list = reply
        .get("DeviceList")
        .and_then(plist::Value::as_array)
        .ok_or_else(|| invalid(format!("no DeviceList in {reply:?}")))?;
    list.iter()
        .map(|entry| {
            let d = entry
                .as_dictionary()
                .ok_or_else(|| invalid(format!("entry {entry:?}")))?;
            let props = d
                .get("Properties")
                .and_then(plist::Value::as_dictionary)
                .ok_or_else(|| invalid(format!("no Properties in {d:?}")))?;
            let int = |dict: &plist::Dictionary, k: &str| {
                dict.get(k)
                    .and_then(plist::Value::as_unsigned_integer)
                    .ok_or_else(|| invalid(format!("no integer {k} in {dict:?}")))
            };
            Ok(ListedDevice {
                device_id: int(d, "DeviceID")?,
                serial: props
                    .get("SerialNumber")
                    .and_then(plist::Value::as_string)
                    .ok_or_else(|| invalid(format!("no SerialNumber in {props:?}")))?
                    .to_owned(),
                product_id: int(props, "ProductID")?,
                location_id: int(props, "LocationID")?,
            })
        })
        .collect()
}

/// The `ProgName`s of the daemon's clients in Listen mode (ListListeners).
pub fn listener_names(address: &str) -> io::Result<Vec<String>> {
    let reply = plist_request(address, "ListListeners")?;
    let list = reply
        .get("ListenerList")
        .and_then(plist::Value::as_array)
        .ok_or_else(|| invalid(format!("no ListenerList in {reply:?}")))?;
    Ok(list
        .iter()
        .filter_map(|l| {
            l.as_dictionary()?
                .get("ProgName")?
                .as_string()
                .map(str::to_owned)
        })
        .collect())
}

/// Waits (at most [`SETTLE_TIMEOUT`]) until the daemon at `address` lists exactly the devices
/// with these serial numbers (in any order) and returns them; panics with what it saw last
/// otherwise. Phones finish their handshake a little after being plugged in.
pub fn wait_for_devices(address: &str, serials: &[&str]) -> Vec<ListedDevice> {
    let mut want: Vec<&str> = serials.to_vec();
    want.sort_unstable();
    let mut last = None;
    let found = poll_until(SETTLE_TIMEOUT, || {
        let listed = list_devices(address);
        let ok = listed.as_ref().is_ok_and(|l| {
            let mut have: Vec<&str> = l.iter().map(|d| d.serial.as_str()).collect();
            have.sort_unstable();
            have == want
        });
        let result = if ok {
            listed.as_ref().ok().cloned()
        } else {
            None
        };
        last = Some(listed);
        result
    });
    found.unwrap_or_else(|| {
        panic!("daemon at {address} never listed exactly {want:?}; last answer: {last:?}")
    })
}

/// Waits (at most [`SETTLE_TIMEOUT`]) until a client with this `ProgName` is in Listen mode on
/// the daemon at `address`; panics otherwise.
pub fn wait_for_listener(address: &str, prog_name: &str) {
    let mut last = None;
    let found = poll_until(SETTLE_TIMEOUT, || {
        let names = listener_names(address);
        let ok = names
            .as_ref()
            .is_ok_and(|n| n.iter().any(|n| n == prog_name));
        last = Some(names);
        ok.then_some(())
    });
    assert!(
        found.is_some(),
        "no listener {prog_name:?} on {address}; last answer: {last:?}"
    );
}
