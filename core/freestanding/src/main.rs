//! Proof that `usbmux-core` needs nothing but `core`: a `#![no_std]`, `#![no_main]` program
//! with `panic = "abort"` that runs a host and a device against each other and exits 0 only if
//! everything arrived intact.
//!
//! Both sides are what a small MCU would run: an `io::Driver` each, with two connections of
//! 2 KiB + 2 KiB, 2 KiB transfers and (host) a 2 KiB reassembly buffer. The cable between them
//! holds one transfer per direction, so a full endpoint answers `WouldBlock`. The device is
//! plugged into the host's end of the cable and takes a step before every host transfer, so it
//! works while the host spins in a blocking `embedded_io` call. The device runs an echo service
//! on port 7 that checks every byte it receives; the host checks every byte echoed back.
//!
//! libc is linked statically only to start the process (its crt calls `main`), for
//! `memcpy`/`memset`, and for `write`/`_exit`; see `build.rs` and `.cargo/config.toml`.
//! Exit codes: 0 success, 1 panic, 2.. the check that failed (see `Failure`).
#![no_std]
#![no_main]

use core::cell::RefCell;
use core::fmt::{self, Write as _};

use embedded_io::{Error as _, ErrorKind, Read, Write};
use usbmux_core::io::{BulkPipe, Clock, Driver, PipeErrorKind};
use usbmux_core::mux::Phase;
use usbmux_core::{Buffers, ConnId, Device, Event, Host, Instant, Session, SessionConfig};

extern "C" {
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    fn _exit(status: i32) -> !;
}

/// Connection and transfer buffers, as a small MCU would have them.
type Buf = [u8; 2048];
/// Largest mux packet either side sends: fits `Buf` and the host's reassembly buffer.
const MAX_TRANSFER: usize = 2048;
/// Host reassembly buffer: one whole device packet.
const HOST_RX: usize = 2048;
const ECHO_PORT: u16 = 7;
/// Bytes sent through the echo service (and so received back).
const STREAM_LEN: usize = 64 * 1024;
/// Upper bound of pumps for anything that should finish quickly.
const PATIENCE: usize = 100_000;

/// Standard output through libc's `write(2)`.
struct Stdout;

impl fmt::Write for Stdout {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            // SAFETY: `rest` is a valid, initialised byte slice for the length passed.
            let n = unsafe { write(1, rest.as_ptr(), rest.len()) };
            if n <= 0 {
                return Err(fmt::Error);
            }
            rest = rest.get(n as usize..).unwrap_or(&[]);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(Stdout, $($arg)*);
    }};
}

/// The deterministic test stream: byte `i` of it.
fn pattern(i: usize) -> u8 {
    let x = (i as u32).wrapping_mul(2_654_435_761);
    (x >> 24) as u8 ^ (i as u8)
}

/// A fake clock: every reading is 100 µs after the previous one, so timers (delayed ACKs,
/// timeouts) run without a hardware timer.
struct Ticks(u64);

impl Clock for Ticks {
    fn now(&mut self) -> Instant {
        self.0 += 100;
        Instant::from_micros(self.0)
    }
}

/// One direction of the cable: room for one transfer, like an endpoint with one buffer. A full
/// mailbox makes the writer's `write_transfer` answer `WouldBlock`, so back-pressure is real.
struct Mailbox {
    data: [u8; MAX_TRANSFER],
    len: usize,
    full: bool,
}

impl Mailbox {
    const fn new() -> Self {
        Mailbox {
            data: [0; MAX_TRANSFER],
            len: 0,
            full: false,
        }
    }

    fn put(&mut self, transfer: &[u8]) -> nb::Result<(), PipeErrorKind> {
        if self.full {
            return Err(nb::Error::WouldBlock);
        }
        let Some(dst) = self.data.get_mut(..transfer.len()) else {
            return Err(nb::Error::Other(PipeErrorKind::Overflow));
        };
        dst.copy_from_slice(transfer);
        self.len = transfer.len();
        self.full = true;
        Ok(())
    }

    fn take(&mut self, buf: &mut [u8]) -> nb::Result<usize, PipeErrorKind> {
        if !self.full {
            return Err(nb::Error::WouldBlock);
        }
        let Some(dst) = buf.get_mut(..self.len) else {
            return Err(nb::Error::Other(PipeErrorKind::Overflow));
        };
        dst.copy_from_slice(&self.data[..self.len]);
        self.full = false;
        Ok(self.len)
    }
}

/// The USB cable: OUT (host to device) and IN (device to host).
struct Cable {
    h2d: Mailbox,
    d2h: Mailbox,
}

/// The device's end of the cable.
struct DeviceEnd<'c> {
    cable: &'c RefCell<Cable>,
}

impl BulkPipe for DeviceEnd<'_> {
    type Error = PipeErrorKind;

    fn read_transfer(&mut self, buf: &mut [u8]) -> nb::Result<usize, PipeErrorKind> {
        self.cable.borrow_mut().h2d.take(buf)
    }

    fn write_transfer(&mut self, data: &[u8]) -> nb::Result<(), PipeErrorKind> {
        self.cable.borrow_mut().d2h.put(data)
    }
}

/// The host's end of the cable. The phone is plugged into it: it runs one step before every
/// transfer, so it works while the host's blocking calls spin.
struct HostEnd<'c> {
    cable: &'c RefCell<Cable>,
    phone: Phone<'c>,
}

impl BulkPipe for HostEnd<'_> {
    type Error = PipeErrorKind;

    fn read_transfer(&mut self, buf: &mut [u8]) -> nb::Result<usize, PipeErrorKind> {
        self.phone.step();
        self.cable.borrow_mut().d2h.take(buf)
    }

    fn write_transfer(&mut self, data: &[u8]) -> nb::Result<(), PipeErrorKind> {
        self.phone.step();
        self.cable.borrow_mut().h2d.put(data)
    }
}

/// The device: its own `io::Driver` with an echo service on port 7 that checks every byte it
/// receives against `pattern`.
struct Phone<'c> {
    driver: Driver<DeviceEnd<'c>, Ticks, Device, Buf, 2, 0>,
    echo: Option<ConnId>,
    carry: [u8; 512],
    carry_at: usize,
    carry_len: usize,
    received: usize,
    mismatches: usize,
    resets_seen: usize,
    pipe_errors: usize,
}

impl Phone<'_> {
    fn step(&mut self) {
        if self.driver.poll().is_err() {
            self.pipe_errors += 1;
        }
        while let Some(event) = self.driver.next_event() {
            let session = self.driver.session_mut();
            match event {
                Event::Incoming { id, port } => {
                    let wanted = port == ECHO_PORT && self.echo.is_none();
                    let bufs = Buffers::new([0; 2048], [0; 2048]);
                    if wanted && session.accept(id, bufs).is_ok() {
                        self.echo = Some(id);
                    } else {
                        let _ = session.refuse(id, b"no service");
                    }
                }
                Event::Reset { id, .. } => {
                    self.resets_seen += 1;
                    if self.echo == Some(id) {
                        self.echo = None;
                        self.carry_len = 0;
                        self.carry_at = 0;
                    }
                    let _ = session.reset(id, "");
                }
                _ => {}
            }
        }
        let Some(id) = self.echo else {
            return;
        };
        let session = self.driver.session_mut();
        loop {
            if self.carry_at == self.carry_len {
                // Err: the stream ended or was released; nothing more to echo.
                let n = session.recv(id, &mut self.carry).unwrap_or(0);
                if n == 0 {
                    return;
                }
                for (k, b) in self.carry[..n].iter().enumerate() {
                    if *b != pattern(self.received + k) {
                        self.mismatches += 1;
                    }
                }
                self.received += n;
                self.carry_at = 0;
                self.carry_len = n;
            }
            match session.send(id, &self.carry[self.carry_at..self.carry_len]) {
                Ok(n) if n > 0 => self.carry_at += n,
                _ => return,
            }
        }
    }
}

/// What went wrong; the discriminant is the exit code.
#[derive(Clone, Copy, Debug)]
enum Failure {
    Handshake = 2,
    Connect = 3,
    Io = 4,
    EchoMismatch = 5,
    DeviceSawMismatch = 6,
    Refusal = 7,
    Close = 8,
    Stats = 9,
}

fn fail(what: Failure, detail: fmt::Arguments<'_>) -> i32 {
    say!("freestanding: FAILED {:?}: {}", what, detail);
    what as i32
}

type HostDriver<'c> = Driver<HostEnd<'c>, Ticks, Host, Buf, 2, HOST_RX>;

/// Pumps until `done` says so (bounded).
fn pump_until(d: &mut HostDriver<'_>, mut done: impl FnMut(&Event) -> bool) -> Option<Event> {
    for _ in 0..PATIENCE {
        if d.poll().is_err() {
            return None;
        }
        while let Some(e) = d.next_event() {
            if done(&e) {
                return Some(e);
            }
        }
    }
    None
}

fn run() -> i32 {
    let cfg = SessionConfig {
        max_transfer: MAX_TRANSFER,
        ..SessionConfig::default()
    };
    let cable = RefCell::new(Cable {
        h2d: Mailbox::new(),
        d2h: Mailbox::new(),
    });
    let phone = Phone {
        driver: Driver::new(
            Session::<Device, Buf, 2, 0>::new(cfg),
            DeviceEnd { cable: &cable },
            Ticks(0),
            [0; 2048],
            [0; 2048],
        ),
        echo: None,
        carry: [0; 512],
        carry_at: 0,
        carry_len: 0,
        received: 0,
        mismatches: 0,
        resets_seen: 0,
        pipe_errors: 0,
    };
    let host_end = HostEnd {
        cable: &cable,
        phone,
    };
    let host = Session::<Host, Buf, 2, HOST_RX>::new(cfg, 0xC001);
    let mut d: HostDriver<'_> = Driver::new(host, host_end, Ticks(0), [0; 2048], [0; 2048]);

    // Handshake and connect.
    let Ok(id) = d
        .session_mut()
        .connect(ECHO_PORT, Buffers::new([0; 2048], [0; 2048]))
    else {
        return fail(Failure::Connect, format_args!("connect refused locally"));
    };
    if pump_until(&mut d, |e| matches!(e, Event::HandshakeDone { .. })).is_none()
        || d.session().version() != Some(2)
    {
        return fail(Failure::Handshake, format_args!("no v2 handshake"));
    }
    match pump_until(&mut d, |e| {
        matches!(e, Event::Connected(_) | Event::Refused { .. })
    }) {
        Some(Event::Connected(c)) if c == id => {}
        other => return fail(Failure::Connect, format_args!("{:?}", other)),
    }

    // Data both ways through embedded-io, in uneven chunks.
    let mut conn = d.conn(id);
    let mut out = [0u8; 1500];
    let mut back = [0u8; 1500];
    let (mut off, mut k) = (0usize, 0usize);
    while off < STREAM_LEN {
        let n = (1 + (k * 577) % out.len()).min(STREAM_LEN - off);
        for (j, b) in out[..n].iter_mut().enumerate() {
            *b = pattern(off + j);
        }
        if let Err(e) = conn.write_all(&out[..n]).and_then(|()| conn.flush()) {
            return fail(
                Failure::Io,
                format_args!("write at {}: {:?}", off, e.kind()),
            );
        }
        if let Err(e) = conn.read_exact(&mut back[..n]) {
            return fail(Failure::Io, format_args!("read at {}: {:?}", off, e));
        }
        if back[..n] != out[..n] {
            return fail(
                Failure::EchoMismatch,
                format_args!("echo differs at {}", off),
            );
        }
        off += n;
        k += 1;
    }
    let phone = &d.pipe().phone;
    if phone.received != STREAM_LEN || phone.mismatches != 0 || phone.pipe_errors != 0 {
        return fail(
            Failure::DeviceSawMismatch,
            format_args!(
                "{} bytes, {} wrong, {} pipe errors",
                phone.received, phone.mismatches, phone.pipe_errors
            ),
        );
    }

    // A port nobody serves: refused, reported as ConnectionRefused.
    let Ok(other) = d
        .session_mut()
        .connect(9, Buffers::new([0; 2048], [0; 2048]))
    else {
        return fail(Failure::Refusal, format_args!("connect refused locally"));
    };
    match d.conn(other).read(&mut back) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        r => return fail(Failure::Refusal, format_args!("{:?}", r)),
    }
    if d.session_mut().reset(other, "").is_err() {
        return fail(Failure::Refusal, format_args!("release failed"));
    }

    // Close the echo connection; the device sees the RST.
    if d.session_mut().reset(id, "done").is_err() {
        return fail(Failure::Close, format_args!("reset failed"));
    }
    for _ in 0..PATIENCE {
        if d.pipe().phone.resets_seen > 0 {
            break;
        }
        if d.poll().is_err() {
            break;
        }
    }
    if d.pipe().phone.resets_seen != 1 || d.session().connection_count() != 0 {
        return fail(Failure::Close, format_args!("device saw no RST"));
    }

    // Both sides are quiet: one more pump each sends nothing and leaves nothing pending.
    let device = &mut d.pipe_mut().phone.driver;
    let device_quiet = device.poll().is_ok() && device.is_flushed();
    let host_quiet = d.poll().is_ok() && d.is_flushed();
    let hs = d.session().stats();
    let ds = d.pipe().phone.driver.session().stats();
    if !device_quiet
        || !host_quiet
        || d.session().phase() != Phase::Active
        || hs.seq_anomalies + ds.seq_anomalies != 0
        || hs.reassembly_errors + ds.reassembly_errors != 0
        || hs.dropped_malformed + ds.dropped_malformed != 0
    {
        return fail(
            Failure::Stats,
            format_args!("host {:?} device {:?}", hs, ds),
        );
    }
    say!(
        "freestanding: handshake v2, {} bytes each way verified through embedded-io, \
         refusal and close seen; {} packets out, {} in",
        STREAM_LEN,
        hs.packets_out,
        hs.packets_in
    );
    0
}

#[no_mangle]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    run()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    say!("freestanding: panic: {}", info);
    // SAFETY: `_exit` ends the process at once; nothing runs after it.
    unsafe { _exit(1) }
}

/// The precompiled `core` of the host target is built for unwinding and names this symbol;
/// with `panic = "abort"` nothing ever unwinds, so it is never called. (On an embedded target
/// `core` is built with `panic = "abort"` and needs none.)
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
