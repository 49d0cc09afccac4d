//! Events read from a FunctionFS `ep0`: each is a 12-byte `struct usb_functionfs_event` — the
//! 8-byte `struct usb_ctrlrequest` (meaningful for SETUP only), a type byte, 3 bytes of padding.
//!
//! A read of `ep0` returns as many whole events as fit the buffer. The kernel's event types, in
//! order from 0: BIND, UNBIND, ENABLE, DISABLE, SETUP, SUSPEND, RESUME.

/// Bytes of one event.
pub const EVENT_SIZE: usize = 12;

/// A control request addressed to the function (`struct usb_ctrlrequest`, fields decoded from
/// little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupRequest {
    /// `bRequestType`: direction (bit 7, set = device to host), type, recipient.
    pub request_type: u8,
    /// `bRequest`.
    pub request: u8,
    /// `wValue`.
    pub value: u16,
    /// `wIndex`.
    pub index: u16,
    /// `wLength`: bytes of the data stage.
    pub length: u16,
}

impl SetupRequest {
    /// True for a device-to-host request: the host waits for data, so stalling it means reading
    /// `ep0` (the "wrong" direction); for a host-to-device request it means writing.
    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }
}

/// One FunctionFS event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The function was bound to a gadget (the UDC was set): nothing flows yet.
    Bind,
    /// The function was unbound (UDC cleared, gadget removed): an unplug.
    Unbind,
    /// The host selected the configuration: endpoints are enabled, a fresh session starts.
    Enable,
    /// The host deconfigured or reset the device, or the cable went: an unplug.
    Disable,
    /// A control request for the function; answer or stall it before reading `ep0` again.
    Setup(SetupRequest),
    /// The bus was suspended: nothing flows until [`Event::Resume`].
    Suspend,
    /// The bus resumed.
    Resume,
}

/// Bytes read from `ep0` that are not events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ep0Error {
    /// A type byte this code does not know (a newer kernel's event); skip it.
    #[error("unknown FunctionFS event type {0}")]
    UnknownType(u8),
    /// A read whose length is not a multiple of [`EVENT_SIZE`]: these trailing bytes are left.
    #[error("{0} trailing bytes after the last whole FunctionFS event")]
    Truncated(usize),
}

/// Decodes one 12-byte event.
pub fn parse_event(raw: &[u8; EVENT_SIZE]) -> Result<Event, Ep0Error> {
    let word = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
    Ok(match raw[8] {
        0 => Event::Bind,
        1 => Event::Unbind,
        2 => Event::Enable,
        3 => Event::Disable,
        4 => Event::Setup(SetupRequest {
            request_type: raw[0],
            request: raw[1],
            value: word(2),
            index: word(4),
            length: word(6),
        }),
        5 => Event::Suspend,
        6 => Event::Resume,
        other => return Err(Ep0Error::UnknownType(other)),
    })
}

/// Decodes every event of one `ep0` read, in order; trailing bytes that make no whole event
/// give one [`Ep0Error::Truncated`] at the end. Never panics.
pub fn parse_events(buf: &[u8]) -> impl Iterator<Item = Result<Event, Ep0Error>> + '_ {
    let chunks = buf.chunks_exact(EVENT_SIZE);
    let rest = chunks.remainder().len();
    chunks
        .map(|c| {
            let mut raw = [0u8; EVENT_SIZE];
            raw.copy_from_slice(c);
            parse_event(&raw)
        })
        .chain((rest > 0).then_some(Err(Ep0Error::Truncated(rest))))
}

/// The 12 wire bytes of `event` (for tests and fakes of `ep0`).
pub fn encode_event(event: &Event) -> [u8; EVENT_SIZE] {
    let mut raw = [0u8; EVENT_SIZE];
    raw[8] = match event {
        Event::Bind => 0,
        Event::Unbind => 1,
        Event::Enable => 2,
        Event::Disable => 3,
        Event::Setup(r) => {
            raw[0] = r.request_type;
            raw[1] = r.request;
            raw[2..4].copy_from_slice(&r.value.to_le_bytes());
            raw[4..6].copy_from_slice(&r.index.to_le_bytes());
            raw[6..8].copy_from_slice(&r.length.to_le_bytes());
            4
        }
        Event::Suspend => 5,
        Event::Resume => 6,
    };
    raw
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn simple_events() {
        let kinds = [
            Event::Bind,
            Event::Unbind,
            Event::Enable,
            Event::Disable,
            Event::Suspend,
            Event::Resume,
        ];
        let types = [0u8, 1, 2, 3, 5, 6];
        for (ev, ty) in kinds.iter().zip(types) {
            let mut raw = [0u8; 12];
            raw[8] = ty;
            assert_eq!(parse_event(&raw), Ok(*ev));
            assert_eq!(encode_event(ev), raw);
        }
    }

    #[test]
    fn setup_fields_are_little_endian() {
        // GET_DESCRIPTOR-like: IN, vendor, interface; wValue 0x0302, wIndex 0x0001, wLength 0x00ff
        let raw = [
            0xc1, 0x06, 0x02, 0x03, 0x01, 0x00, 0xff, 0x00, 4, 0xaa, 0xbb, 0xcc,
        ];
        let want = SetupRequest {
            request_type: 0xc1,
            request: 0x06,
            value: 0x0302,
            index: 0x0001,
            length: 0x00ff,
        };
        assert_eq!(parse_event(&raw), Ok(Event::Setup(want)));
        assert!(want.is_in());
        let out = SetupRequest {
            request_type: 0x41,
            ..want
        };
        assert!(!out.is_in());
        // Padding is not part of the event: encoding writes zeros there.
        let mut back = raw;
        back[9..].fill(0);
        assert_eq!(encode_event(&Event::Setup(want)), back);
    }

    #[test]
    fn several_events_and_leftovers() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&encode_event(&Event::Bind));
        buf.extend_from_slice(&encode_event(&Event::Enable));
        buf.extend_from_slice(&[0; 5]);
        let got: Vec<_> = parse_events(&buf).collect();
        assert_eq!(
            got,
            vec![
                Ok(Event::Bind),
                Ok(Event::Enable),
                Err(Ep0Error::Truncated(5))
            ]
        );
        let mut unknown = [0u8; 12];
        unknown[8] = 7;
        assert_eq!(parse_event(&unknown), Err(Ep0Error::UnknownType(7)));
        assert_eq!(parse_events(&[]).count(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic xorshift stream: every length 0..100, many contents.
        let mut x: u32 = 0x9e37_79b9;
        for len in 0..100usize {
            for _ in 0..50 {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        (x >> 24) as u8
                    })
                    .collect();
                let n = parse_events(&buf).count();
                assert_eq!(n, len / 12 + usize::from(len % 12 != 0));
                for ev in parse_events(&buf).flatten() {
                    // Whatever parsed re-encodes to the same type and request bytes.
                    let raw = encode_event(&ev);
                    assert_eq!(parse_event(&raw), Ok(ev));
                }
            }
        }
    }
}
