//! Bounded waiting, deterministic test data, local TCP ports and byte-pipe round trips.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen quickly (a phone becoming visible,
/// a listener appearing, a tool printing a line).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Read and write timeout of test sockets: long enough for tens of MiB on a loaded 2-core
/// machine, short enough that a stuck pipe fails the test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls `f` every 10 ms until it returns `Some`, at most `timeout`; the last call happens at or
/// after the deadline, so a condition that holds at the end is always seen.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `len` deterministic pseudo-random bytes (xorshift64* seeded with `seed`): not periodic, so a
/// dropped, duplicated or reordered chunk cannot go unnoticed, and different seeds give
/// different streams.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `n` distinct TCP ports, free on 127.0.0.1 (and on ::1 where the host has IPv6) a moment ago,
/// for daemons and tools a test starts on fixed ports.
///
/// They are drawn from *below* the kernel's ephemeral range (`ip_local_port_range`): a port the
/// kernel handed out for `bind(0)` and took back would go on to be handed out as the source port
/// of some other test's `connect`, which then makes the daemon's bind fail with `EADDRINUSE`
/// (this happened in CI). Below the range only explicit binds compete; within this process no
/// port is handed out twice, so parallel tests of one binary cannot collide either.
pub fn free_local_ports(n: usize) -> io::Result<Vec<u16>> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let (low, _) = ephemeral_range();
    let first = 10_000u16.min(low.saturating_sub(1_000));
    let span = u64::from(low.saturating_sub(first)).max(1);
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    let mut x = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut out = Vec::with_capacity(n);
    for _ in 0..20_000 {
        if out.len() == n {
            break;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = first + (x % span) as u16;
        if given.contains(&port) || !bindable(port) {
            continue;
        }
        given.push(port);
        out.push(port);
    }
    if out.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no free TCP ports below the ephemeral range",
        ));
    }
    Ok(out)
}

/// The kernel's ephemeral port range (Linux `ip_local_port_range`; IANA's 49152–65535 elsewhere).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(str::parse::<u16>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((49_152, 65_535))
}

/// Whether `port` can be bound on 127.0.0.1 and, if the host has IPv6 loopback, on ::1 (tools
/// such as iproxy listen on both).
fn bindable(port: u16) -> bool {
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        return false;
    }
    match TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, port)) {
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::AddrNotAvailable,
    }
}

/// Connects to 127.0.0.1:`port` (bounded) and sets [`IO_TIMEOUT`] on reads and writes.
pub fn connect_local(port: u16) -> io::Result<TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `data` through a byte pipe and reads `expect_len` bytes back, writing from a second
/// thread so neither direction can stall the other (an echo service returns data while more
/// is being written). Both halves must have timeouts for this to be bounded.
pub fn round_trip<R: Read, W: Write + Send>(
    mut reader: R,
    mut writer: W,
    data: &[u8],
    expect_len: usize,
) -> io::Result<Vec<u8>> {
    std::thread::scope(|s| {
        let w = s.spawn(move || writer.write_all(data).and_then(|()| writer.flush()));
        let mut back = vec![0u8; expect_len];
        let read = reader.read_exact(&mut back);
        let written = w
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
        read?;
        written?;
        Ok(back)
    })
}

/// Like [`round_trip`] for an echo-like pipe, but the writer never has more than `window` bytes
/// in flight (written but not yet read back). Returns the `data.len()` bytes read back.
///
/// This is for relays that are single-threaded and lose data when they block: Debian's
/// `inetcat` (libusbmuxd 2.0.2) writes to its non-blocking usbmuxd socket with a plain
/// `write()` whose result it ignores, so a 4 KiB chunk vanishes whenever the socket's send
/// buffer is full; `iproxy` waits at most 1 s for its usbmuxd socket to become writable while it
/// reads nothing from it, and then drops the rest of its 32 KiB chunk — which an echo whose
/// whole return path is full never allows. A window below the pipe's buffering (socket buffers
/// of 128 KiB each way, the daemon's and the phone's connection buffers) keeps every buffer of
/// the pipe from filling, so nothing depends on those paths. The writer is not given up to the
/// pipe's own flow control, which is what the daemon is tested for elsewhere.
///
/// Waiting is bounded: a writer that sees no progress for [`IO_TIMEOUT`] gives up; `reader`
/// must have its own timeout, or the caller must bound the whole call (e.g. by killing the
/// process whose pipe it is).
pub fn paced_round_trip<R: Read, W: Write + Send>(
    mut reader: R,
    writer: &mut W,
    data: &[u8],
    window: usize,
) -> io::Result<Vec<u8>> {
    let chunk_max = window.clamp(1, 16 * 1024);
    // (bytes read back so far, reader failed)
    let progress = (Mutex::new((0usize, false)), Condvar::new());
    std::thread::scope(|s| {
        let progress = &progress;
        let w = s.spawn(move || -> io::Result<()> {
            let mut sent = 0;
            while sent < data.len() {
                let chunk = chunk_max.min(data.len() - sent);
                let mut state = progress.0.lock().unwrap_or_else(PoisonError::into_inner);
                let mut last = (state.0, Instant::now());
                while sent + chunk > state.0 + window {
                    if state.1 {
                        return Err(io::Error::other("the reader failed"));
                    }
                    if state.0 != last.0 {
                        last = (state.0, Instant::now());
                    } else if last.1.elapsed() > IO_TIMEOUT {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "nothing came back for {IO_TIMEOUT:?} ({} of {} bytes)",
                                state.0,
                                data.len()
                            ),
                        ));
                    }
                    state = progress
                        .1
                        .wait_timeout(state, Duration::from_millis(100))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                drop(state);
                writer.write_all(&data[sent..sent + chunk])?;
                writer.flush()?;
                sent += chunk;
            }
            Ok(())
        });
        let mut back = vec![0u8; data.len()];
        let mut got = 0;
        let read = loop {
            if got == back.len() {
                break Ok(());
            }
            match reader.read(&mut back[got..]) {
                Ok(0) => {
                    break Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("EOF after {got} bytes"),
                    ))
                }
                Ok(n) => {
                    got += n;
                    progress.0.lock().unwrap_or_else(PoisonError::into_inner).0 = got;
                    progress.1.notify_all();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if read.is_err() {
            progress.0.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
            progress.1.notify_all();
        }
        let written = w
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
        read?;
        written?;
        Ok(back)
    })
}

/// Reads until the peer closes the connection (EOF, or a reset, which also means closed),
/// bounded by the socket's read timeout. Returns the bytes that arrived before; an error only
/// for a timeout or another failure.
pub fn read_until_closed(mut stream: impl Read) -> io::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
