//! [`UsbmuxStream`]: the daemon's socket, Unix or TCP, as one `Read + Write` type.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connection to the daemon: a Unix stream socket or a TCP stream, depending on the
/// [`SocketAddress`](super::SocketAddress).
///
/// After a successful [`Client::connect`](super::Client::connect) it is a plain byte pipe to
/// the device port, with no timeouts set; before that the client uses it for one request.
/// Both `UsbmuxStream` and `&UsbmuxStream` are `Read + Write`, so two threads can copy both
/// directions of one connection (as iproxy does) without cloning the socket.
#[derive(Debug)]
pub enum UsbmuxStream {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TCP stream (Nagle disabled: requests and small device messages go out at once).
    Tcp(TcpStream),
}

/// Forwards a method to whichever socket the stream holds.
macro_rules! both {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            UsbmuxStream::Unix($s) => $e,
            UsbmuxStream::Tcp($s) => $e,
        }
    };
}

impl UsbmuxStream {
    /// A second handle to the same socket (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<UsbmuxStream> {
        Ok(match self {
            UsbmuxStream::Unix(s) => UsbmuxStream::Unix(s.try_clone()?),
            UsbmuxStream::Tcp(s) => UsbmuxStream::Tcp(s.try_clone()?),
        })
    }

    /// Shuts down reading, writing or both. Shutting down writing tells the daemon this side
    /// is done (it resets the device connection: usbmuxd has no half-close towards phones).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        both!(self, s => s.shutdown(how))
    }

    /// Sets the read timeout (`None`: block forever). A read that times out fails with
    /// `WouldBlock` or `TimedOut`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_read_timeout(timeout))
    }

    /// Sets the write timeout (`None`: block forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_write_timeout(timeout))
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        both!(self, s => s.read_timeout())
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        both!(self, s => s.write_timeout())
    }

    /// Switches non-blocking mode (for use with a poll loop such as mio's).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        both!(self, s => s.set_nonblocking(nonblocking))
    }

    /// The pending socket error, if any (`SO_ERROR`).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        both!(self, s => s.take_error())
    }

    /// Whether this is a Unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self, UsbmuxStream::Unix(_))
    }

    /// The socket as an owned file descriptor, e.g. to hand it to an event loop. Match on the
    /// variants instead to keep the typed std socket.
    pub fn into_inner(self) -> OwnedFd {
        both!(self, s => OwnedFd::from(s))
    }
}

impl From<UnixStream> for UsbmuxStream {
    fn from(s: UnixStream) -> Self {
        UsbmuxStream::Unix(s)
    }
}

impl From<TcpStream> for UsbmuxStream {
    fn from(s: TcpStream) -> Self {
        UsbmuxStream::Tcp(s)
    }
}

impl AsFd for UsbmuxStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        both!(self, s => s.as_fd())
    }
}

impl AsRawFd for UsbmuxStream {
    fn as_raw_fd(&self) -> RawFd {
        both!(self, s => s.as_raw_fd())
    }
}

impl Read for &UsbmuxStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(*self, s => (&*s).read(buf))
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        both!(*self, s => (&*s).read_vectored(bufs))
    }
}

impl Write for &UsbmuxStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        both!(*self, s => (&*s).write(buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        both!(*self, s => (&*s).write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        both!(*self, s => (&*s).flush())
    }
}

impl Read for UsbmuxStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for UsbmuxStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}
