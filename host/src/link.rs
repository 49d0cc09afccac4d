//! [`Link`]: one phone's pair of bulk pipes as the daemon's device thread sees it.
//!
//! USB (rusb), the in-process simulated phone (`usbmuxd --simulate`) and a phone served by
//! `usbmux-sim serve` over a Unix socket are three implementations of this one trait, so the
//! device thread — the owner of the phone's `usbmux_core::Session` — is the same code for all.
//!
//! The contract follows the engine's: the device thread calls [`Link::send`] for every packet
//! `Session::poll_transmit` produced (one mux packet = one OUT transfer, then a ZLP when
//! `Transmit::zlp` says so — the link must keep that framing), and [`Link::recv`] until it returns
//! `Ok(None)` whenever it was woken, and [`Link::end_turn`] once per turn after the turn's
//! packets were handed over. Links that receive on a thread of their own wake the device
//! thread through the [`mio::Waker`] handed to [`Link::start`]; links that are polled in place (the
//! in-process simulator) have timers of their own, reported by [`Link::poll_timeout`].

use std::sync::Arc;

use usbmux_core::Instant;

/// What a phone says about itself before any usbmux traffic: USB descriptors, or the simulator's
/// IDENTITY message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The UDID as clients see it (new-style UDIDs with the hyphen after 8 characters).
    pub udid: String,
    /// The iSerialNumber string as read from USB (new-style UDIDs without the hyphen).
    pub usb_serial: String,
    /// USB product id.
    pub product_id: u16,
    /// Location id reported to clients.
    pub location_id: u32,
    /// Link speed in bit/s (ConnectionSpeed).
    pub speed: u64,
    /// wMaxPacketSize of the bulk OUT endpoint (the ZLP rule).
    pub max_packet_size: u16,
}

/// Why a link stopped working. Any error ends the device: its connections are torn down without
/// RSTs (there is no one to send them to) and listeners hear Detached.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The phone was unplugged or the peer closed the link.
    #[error("device disconnected")]
    Disconnected,
    /// An I/O error on the transport (with what it was doing).
    #[error("{what}: {source}")]
    Io {
        /// The operation that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A USB error from libusb.
    #[error("USB: {0}")]
    Usb(String),
    /// The transport broke its own framing (e.g. a truncated datagram).
    #[error("protocol: {0}")]
    Protocol(String),
}

/// One phone's bulk pipes. See the module docs for the calling contract.
pub trait Link: Send {
    /// Who the phone is.
    fn identity(&self) -> &DeviceIdentity;

    /// Begins delivering IN data; `waker` must be woken whenever [`Link::recv`] may have
    /// something new (or the link failed). Called once, on the device thread, before any other
    /// call but `identity`.
    fn start(&mut self, waker: Arc<mio::Waker>) -> Result<(), LinkError>;

    /// Sends one OUT transfer (one whole mux packet), then a zero-length transfer if `zlp`.
    /// May queue, must keep order, should not block for long.
    fn send(&mut self, now: Instant, transfer: &[u8], zlp: bool) -> Result<(), LinkError>;

    /// The next IN transfer (any size; it may hold part of a mux packet or several), without
    /// blocking: `Ok(None)` when there is nothing now.
    fn recv(&mut self, now: Instant, buf: &mut [u8]) -> Result<Option<usize>, LinkError>;

    /// Like [`Link::recv`], but lends the next IN bytes to `f` where they lie when the link
    /// can (a USB transfer's own buffer), saving a copy: `Ok(Some(n))` after exactly one call
    /// of `f` with `n` bytes, `Ok(None)` when there is nothing now. The default receives into
    /// `scratch` with [`Link::recv`].
    fn recv_with(
        &mut self,
        now: Instant,
        scratch: &mut [u8],
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<usize>, LinkError> {
        recv_via_scratch(self, now, scratch, f)
    }

    /// Whether [`Link::out_buffer`] can return buffers (it may still return `None` while all
    /// of them are in flight). The device thread then reads client sockets straight into
    /// them (`usbmux_core::Session::poll_transmit_with`) instead of through the connections'
    /// send buffers. The default: no.
    fn lends_out_buffers(&self) -> bool {
        false
    }

    /// A buffer of the link's own to build the next OUT transfer in, in place (a free USB
    /// transfer's buffer), or `None` when it has none free right now — then the caller builds
    /// the transfer elsewhere and uses [`Link::send`]. Asking twice without sending returns the
    /// same buffer. The default has none.
    fn out_buffer(&mut self) -> Option<&mut [u8]> {
        None
    }

    /// Sends the first `len` bytes of the buffer [`Link::out_buffer`] returned as one OUT
    /// transfer, then a zero-length transfer if `zlp`; same ordering as [`Link::send`].
    fn send_out_buffer(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        let _ = (now, len, zlp);
        Err(LinkError::Protocol(
            "send_out_buffer without an out_buffer".into(),
        ))
    }

    /// Sets aside one of the link's OUT transfer buffers for the caller (`None` when the link
    /// lends none, or cannot spare one now: it keeps at least one other for everything else).
    /// [`Link::out_buffer`] and [`Link::send`] leave it alone until [`Link::send_held`] or
    /// [`Link::release_held`]; asking again returns the same buffer, contents unchanged. Why:
    /// the device thread reads a client's next bytes into it while the phone's window is
    /// closed, so the ACK that opens the window finds the packet's payload already in place
    /// (the client read was a tenth of the round trip in the VM harness). The default holds
    /// none.
    fn hold_out_buffer(&mut self) -> Option<&mut [u8]> {
        None
    }

    /// Sends the first `len` bytes of the held buffer as one OUT transfer (then a ZLP if
    /// `zlp`), in order after everything sent before; the buffer is no longer held.
    fn send_held(&mut self, now: Instant, len: usize, zlp: bool) -> Result<(), LinkError> {
        let _ = (now, len, zlp);
        Err(LinkError::Protocol(
            "send_held without a held buffer".into(),
        ))
    }

    /// Gives the held buffer back unsent (its bytes are dropped). Harmless when none is held.
    fn release_held(&mut self) {}

    /// Registers, with `token`, the event sources the device thread must watch for this link;
    /// when one fires, the device thread calls [`Link::handle_ready`]. Called once, right after
    /// [`Link::start`]. Default: none — the link wakes the device thread through `start`'s
    /// waker instead (a USB link whose libusb events are handled inline registers libusb's
    /// file descriptors here).
    fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> std::io::Result<()> {
        let _ = (registry, token);
        Ok(())
    }

    /// Handles what the sources registered by [`Link::register`] signalled, without blocking
    /// (new data then shows in [`Link::recv`]). Spurious calls are harmless.
    fn handle_ready(&mut self) {}

    /// When [`Link::handle_timeout`] is due (links with timers of their own, such as the
    /// in-process simulator).
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Fires the link's own timers.
    fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
    }

    /// Ends one turn of the device thread (called after the turn's OUT transfers were handed
    /// over): does what the link put off until then. A USB link with asynchronous IN submits
    /// here the IN transfers [`Link::recv_with`] emptied during the turn, so the OUT transfer
    /// that the phone's ACK let go is on the bus before them: an IN transfer's submission
    /// costs ≈ 20–80 µs in the VM harness's guest, and the ACK's round trip bounds one
    /// connection's throughput. Required, not defaulted: a wrapper that did not pass it on
    /// would leave those transfers unsubmitted for good.
    fn end_turn(&mut self);
}

/// [`Link::recv_with`] for a link that cannot lend its bytes: [`Link::recv`] into `scratch`,
/// then `f` over what arrived.
pub(crate) fn recv_via_scratch<L: Link + ?Sized>(
    link: &mut L,
    now: Instant,
    scratch: &mut [u8],
    f: &mut dyn FnMut(&[u8]),
) -> Result<Option<usize>, LinkError> {
    let got = link.recv(now, scratch)?;
    if let Some(n) = got {
        f(scratch.get(..n).unwrap_or(scratch));
    }
    Ok(got)
}
