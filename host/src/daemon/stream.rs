//! [`ClientStream`]: a client socket of the daemon, Unix or TCP, as one type.

use std::io::{self, Read, Write};

use mio::event::Source;
use mio::{Interest, Registry, Token};

/// A connected client: usbmuxd listens on a Unix socket by default and on TCP with `-S`.
#[derive(Debug)]
pub enum ClientStream {
    /// A Unix stream socket.
    Unix(mio::net::UnixStream),
    /// A TCP socket (loopback unless the administrator chose otherwise).
    Tcp(mio::net::TcpStream),
}

impl ClientStream {
    /// Ends the connection so the client sees a reset, not an orderly close: on TCP an RST
    /// (`SO_LINGER` 0), so a phone's reset stays visible through iproxy-style forwarders. Unix
    /// sockets have no such signal; they are just closed.
    pub fn abort(self) {
        if let ClientStream::Tcp(s) = &self {
            let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
        drop(self);
    }

    /// Writes all of `data`, waiting (bounded by `limit`) while the socket is full. For the
    /// few small replies the daemon writes outside the data path.
    pub fn write_all_bounded(
        &mut self,
        mut data: &[u8],
        limit: std::time::Duration,
    ) -> io::Result<()> {
        let deadline = std::time::Instant::now() + limit;
        while !data.is_empty() {
            match self.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
        Ok(())
    }
}

impl Source for ClientStream {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => s.register(registry, token, interests),
            ClientStream::Tcp(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => s.reregister(registry, token, interests),
            ClientStream::Tcp(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => s.deregister(registry),
            ClientStream::Tcp(s) => s.deregister(registry),
        }
    }
}
