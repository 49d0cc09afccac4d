//! A gateway's side of usbmux, end to end in one process:
//! `cargo run -p usbmux-core --example gateway`.
//!
//! The gateway is a host-role [`Driver`] with the memory a small MCU would give it (two
//! connections with 2 KiB + 2 KiB buffers, 2 KiB transfers). Its bulk pipe is the phone itself:
//! a device-role `Session` that takes every OUT transfer the moment it is written and answers
//! IN reads from its own `poll_transmit`, so both sides run in the same loop — the one the
//! driver spins while a blocking `embedded_io` call waits. The phone runs an echo service on
//! port 7; the gateway connects to it, writes through `embedded_io::Write`, reads the echo back
//! through `embedded_io::Read` and prints it.

use std::error::Error;

use embedded_io::{Read, Write};
use usbmux_core::io::{BulkPipe, Driver, PipeErrorKind};
use usbmux_core::mux::RecvError;
use usbmux_core::{Buffers, ConnId, Device, Event, Host, Instant, Session, SessionConfig};

/// Every transfer buffer and connection buffer of this example.
type Buf = [u8; 2048];
/// Largest mux packet either side sends; fits `Buf` and the host's reassembly buffer.
const MAX_TRANSFER: usize = 2048;
/// The echo service's port (the simulator's convention).
const ECHO_PORT: u16 = 7;

/// The time since `start`, as the `Instant` the core takes.
fn instant_since(start: std::time::Instant) -> Instant {
    Instant::from_micros(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX))
}

/// The phone end of an in-process cable: a device `Session` with an echo service.
struct InProcessPhone {
    session: Session<Device, Buf, 2, 0>,
    start: std::time::Instant,
    /// The last IN transfer needs a ZLP after it (its length is a multiple of wMaxPacketSize).
    zlp_next: bool,
    /// Echoed bytes the connection's send buffer had no room for yet, per connection.
    carry: Vec<(ConnId, Vec<u8>)>,
}

impl InProcessPhone {
    fn new(cfg: SessionConfig, start: std::time::Instant) -> Self {
        InProcessPhone {
            session: Session::<Device, Buf, 2, 0>::new(cfg),
            start,
            zlp_next: false,
            carry: Vec::new(),
        }
    }

    /// Runs the phone's side of the calling contract (timers, events) and its echo service.
    fn serve(&mut self, now: Instant) {
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
        }
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Incoming { id, port } if port == ECHO_PORT => {
                    let bufs = Buffers::new([0; 2048], [0; 2048]);
                    if self.session.accept(id, bufs).is_ok() {
                        println!("  phone: accepted {id} on port {port}");
                        self.carry.push((id, Vec::new()));
                    }
                }
                Event::Incoming { id, port } => {
                    println!("  phone: refusing port {port}");
                    let _ = self.session.refuse(id, b"no service");
                }
                Event::Reset { id, reason } => {
                    println!("  phone: {id} ended: {reason}");
                    self.carry.retain(|(c, _)| *c != id);
                    let _ = self.session.reset(id, "");
                }
                _ => {}
            }
        }
        for (id, carry) in &mut self.carry {
            let mut buf = [0u8; 512];
            loop {
                if carry.is_empty() {
                    match self.session.recv(*id, &mut buf) {
                        Ok(0) | Err(RecvError::Finished | RecvError::InvalidHandle) => break,
                        Ok(n) => carry.extend_from_slice(&buf[..n]),
                    }
                }
                match self.session.send(*id, carry) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        carry.drain(..n);
                    }
                }
            }
        }
    }
}

impl BulkPipe for InProcessPhone {
    type Error = PipeErrorKind;

    /// The gateway's IN endpoint: the phone's next packet, then its ZLP if it needs one.
    fn read_transfer(&mut self, buf: &mut [u8]) -> nb::Result<usize, PipeErrorKind> {
        if std::mem::take(&mut self.zlp_next) {
            return Ok(0);
        }
        let now = instant_since(self.start);
        self.serve(now);
        match self.session.poll_transmit(now, buf) {
            Ok(Some(t)) => {
                self.zlp_next = t.zlp;
                Ok(t.len)
            }
            Ok(None) => Err(nb::Error::WouldBlock),
            Err(_) => Err(nb::Error::Other(PipeErrorKind::Overflow)),
        }
    }

    /// The gateway's OUT endpoint: one transfer is one mux packet (or a ZLP) for the phone.
    fn write_transfer(&mut self, data: &[u8]) -> nb::Result<(), PipeErrorKind> {
        let now = instant_since(self.start);
        self.session.handle_transfer(now, data);
        self.serve(now);
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let cfg = SessionConfig {
        max_transfer: MAX_TRANSFER,
        ..SessionConfig::default()
    };
    let start = std::time::Instant::now();
    let phone = InProcessPhone::new(cfg, start);
    // The first source port should be random; a fixed one keeps the example's output stable.
    let session = Session::<Host, Buf, 2, 4096>::new(cfg, 0xC000);
    let clock = move || instant_since(start);
    let mut driver = Driver::new(session, phone, clock, [0; 2048], [0; 2048]);

    let bufs = Buffers::new([0; 2048], [0; 2048]);
    let id = driver
        .session_mut()
        .connect(ECHO_PORT, bufs)
        .map_err(|(e, _)| e)?;
    println!("gateway: connecting to port {ECHO_PORT} as {id}");
    // Non-blocking use: pump and watch events until the connection is up.
    'connecting: loop {
        driver.poll()?;
        while let Some(event) = driver.next_event() {
            println!("gateway: event {event:?}");
            match event {
                Event::Connected(_) => break 'connecting,
                Event::Refused { reason, .. } => return Err(format!("refused: {reason}").into()),
                _ => {}
            }
        }
    }

    // Blocking use: the connection as an embedded_io stream.
    let mut conn = driver.conn(id);
    for line in [
        "hello, phone",
        "usbmux over one bulk pipe",
        "embedded-io on top",
    ] {
        conn.write_all(line.as_bytes())?;
        conn.flush()?;
        let mut back = vec![0u8; line.len()];
        conn.read_exact(&mut back)?;
        println!(
            "gateway: sent {line:?}, echo says {:?}",
            String::from_utf8_lossy(&back)
        );
    }

    // More than every buffer on the way holds: flow control keeps it moving, byte-exact.
    let blob: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let mut back = vec![0u8; blob.len()];
    for (out, inp) in blob.chunks(1500).zip(back.chunks_mut(1500)) {
        conn.write_all(out)?;
        conn.flush()?;
        conn.read_exact(inp)?;
    }
    if back != blob {
        return Err("echoed blob differs".into());
    }
    println!("gateway: {} bytes echoed byte-exact", blob.len());

    let stats = driver
        .session()
        .conn_stats(id)
        .ok_or("connection vanished")?;
    println!(
        "gateway: {} bytes out and {} in, in {} + {} packets",
        stats.bytes_sent, stats.bytes_received, stats.packets_sent, stats.packets_received
    );
    println!("gateway: closing {id}");
    driver.session_mut().reset(id, "done")?;
    // The RST goes out with this pump; the phone sees it on its next one.
    driver.poll()?;
    driver.poll()?;
    Ok(())
}
