//! The two blobs a FunctionFS function writes to `ep0` before it exists for the host: the
//! descriptors (format v2) and the strings, built from typed values.
//!
//! The layouts are those of the Linux uapi header `include/uapi/linux/usb/functionfs.h`; every
//! number is little-endian.
//!
//! ```text
//! descriptors v2: magic = 3 (u32) | length (u32, whole blob) | flags (u32)
//!                 | fs_count (u32, if HAS_FS_DESC) | hs_count (u32, if HAS_HS_DESC)
//!                 | fs descriptors | hs descriptors
//! strings:        magic = 2 (u32) | length (u32) | str_count (u32) | lang_count (u32)
//!                 | per language: code (u16) then str_count NUL-terminated strings
//! ```
//!
//! The kernel numbers the endpoint files `ep1`, `ep2`, ... in the order the endpoints first
//! appear in the full-speed descriptors, which is why [`usbmux_function`] lists OUT before IN
//! (as an iPhone does): `ep1` is bulk OUT, `ep2` is bulk IN. The endpoint addresses written here
//! only have to be distinct; the device controller picks the real ones.

/// `FUNCTIONFS_STRINGS_MAGIC`: first word of the strings blob.
pub const STRINGS_MAGIC: u32 = 2;
/// `FUNCTIONFS_DESCRIPTORS_MAGIC_V2`: first word of the v2 descriptors blob (carries flags).
pub const DESCRIPTORS_MAGIC_V2: u32 = 3;
/// `FUNCTIONFS_HAS_FS_DESC`: full-speed descriptors (and their count) are present.
pub const HAS_FS_DESC: u32 = 1;
/// `FUNCTIONFS_HAS_HS_DESC`: high-speed descriptors (and their count) are present.
pub const HAS_HS_DESC: u32 = 2;

/// `USB_DT_INTERFACE`.
pub const DT_INTERFACE: u8 = 4;
/// `USB_DT_ENDPOINT`.
pub const DT_ENDPOINT: u8 = 5;
/// `USB_ENDPOINT_XFER_BULK` in `bmAttributes`.
pub const XFER_BULK: u8 = 2;
/// `USB_DIR_IN` bit of `bEndpointAddress` (and of `bRequestType`).
pub const DIR_IN: u8 = 0x80;

/// Interface class of Apple's usbmux interface (vendor specific).
pub const USBMUX_CLASS: u8 = 0xff;
/// Interface subclass of Apple's usbmux interface; hosts match on it (tests change it to see
/// that they do).
pub const USBMUX_SUBCLASS: u8 = 0xfe;
/// Interface protocol of Apple's usbmux interface.
pub const USBMUX_PROTOCOL: u8 = 0x02;
/// The interface string real phones report for the usbmux interface.
pub const USBMUX_INTERFACE_NAME: &str = "Apple USB Multiplexor";
/// US English, the one language of the strings blob.
pub const LANG_EN_US: u16 = 0x0409;

/// Bulk `wMaxPacketSize` at full speed.
pub const FS_BULK_PACKET: u16 = 64;
/// Bulk `wMaxPacketSize` at high speed.
pub const HS_BULK_PACKET: u16 = 512;

/// A standard interface descriptor (9 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceDescriptor {
    /// `bInterfaceNumber` (FunctionFS renumbers it within the configuration).
    pub number: u8,
    /// `bAlternateSetting`.
    pub alternate: u8,
    /// `bNumEndpoints`.
    pub num_endpoints: u8,
    /// `bInterfaceClass`.
    pub class: u8,
    /// `bInterfaceSubClass`.
    pub subclass: u8,
    /// `bInterfaceProtocol`.
    pub protocol: u8,
    /// `iInterface`: 1-based index into the strings blob (FunctionFS remaps it), 0 for none.
    pub string: u8,
}

/// A bulk/interrupt endpoint descriptor without the audio fields (7 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointDescriptor {
    /// `bEndpointAddress`: number plus [`DIR_IN`] for IN.
    pub address: u8,
    /// `bmAttributes` ([`XFER_BULK`]).
    pub attributes: u8,
    /// `wMaxPacketSize`.
    pub max_packet_size: u16,
    /// `bInterval` (0 for bulk).
    pub interval: u8,
}

/// One descriptor of a speed's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// An interface.
    Interface(InterfaceDescriptor),
    /// An endpoint of the interface before it.
    Endpoint(EndpointDescriptor),
}

impl Descriptor {
    /// Appends the descriptor's wire bytes.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Descriptor::Interface(i) => out.extend_from_slice(&[
                9,
                DT_INTERFACE,
                i.number,
                i.alternate,
                i.num_endpoints,
                i.class,
                i.subclass,
                i.protocol,
                i.string,
            ]),
            Descriptor::Endpoint(e) => {
                let [lo, hi] = e.max_packet_size.to_le_bytes();
                out.extend_from_slice(&[
                    7,
                    DT_ENDPOINT,
                    e.address,
                    e.attributes,
                    lo,
                    hi,
                    e.interval,
                ]);
            }
        }
    }
}

/// A function's descriptors for full and high speed (FunctionFS v2 without SuperSpeed: a
/// SuperSpeed controller falls back to the high-speed list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionDescriptors {
    /// The full-speed list.
    pub full_speed: Vec<Descriptor>,
    /// The high-speed list.
    pub high_speed: Vec<Descriptor>,
}

impl FunctionDescriptors {
    /// The v2 descriptors blob (see the module docs), to be written to `ep0` in one `write`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for d in self.full_speed.iter().chain(&self.high_speed) {
            d.encode(&mut body);
        }
        // magic, length, flags, fs_count, hs_count
        let header_len = 5 * 4;
        let len = header_len + body.len();
        let mut out = Vec::with_capacity(len);
        for word in [
            DESCRIPTORS_MAGIC_V2,
            u32::try_from(len).unwrap_or(u32::MAX),
            HAS_FS_DESC | HAS_HS_DESC,
            u32::try_from(self.full_speed.len()).unwrap_or(u32::MAX),
            u32::try_from(self.high_speed.len()).unwrap_or(u32::MAX),
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&body);
        out
    }
}

/// The descriptors of an iPhone's usbmux function: one interface class 0xff / `subclass` /
/// protocol 2 named by string 1, with a bulk OUT then a bulk IN endpoint, 64-byte packets at full
/// speed and 512 at high speed. Pass [`USBMUX_SUBCLASS`] unless testing a host's matching.
pub fn usbmux_function(subclass: u8) -> FunctionDescriptors {
    let list = |mps: u16| {
        vec![
            Descriptor::Interface(InterfaceDescriptor {
                number: 0,
                alternate: 0,
                num_endpoints: 2,
                class: USBMUX_CLASS,
                subclass,
                protocol: USBMUX_PROTOCOL,
                string: 1,
            }),
            Descriptor::Endpoint(EndpointDescriptor {
                address: 1,
                attributes: XFER_BULK,
                max_packet_size: mps,
                interval: 0,
            }),
            Descriptor::Endpoint(EndpointDescriptor {
                address: 2 | DIR_IN,
                attributes: XFER_BULK,
                max_packet_size: mps,
                interval: 0,
            }),
        ]
    };
    FunctionDescriptors {
        full_speed: list(FS_BULK_PACKET),
        high_speed: list(HS_BULK_PACKET),
    }
}

/// A string the strings blob cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StringsError {
    /// The blob's strings are NUL-terminated, so a string may not contain NUL.
    #[error("string {0:?} contains a NUL byte")]
    Nul(String),
    /// Every language must have the same number of strings.
    #[error("language {lang:#06x} has {got} strings, expected {expected}")]
    Count {
        /// The language code.
        lang: u16,
        /// Its number of strings.
        got: usize,
        /// The first language's number.
        expected: usize,
    },
}

/// The strings blob for `langs` (code, strings), every language with the same number of strings
/// (string `i` of every language is index `i + 1` in the descriptors).
pub fn strings_blob(langs: &[(u16, &[&str])]) -> Result<Vec<u8>, StringsError> {
    let count = langs.first().map_or(0, |(_, s)| s.len());
    let mut body = Vec::new();
    for (lang, strings) in langs {
        if strings.len() != count {
            return Err(StringsError::Count {
                lang: *lang,
                got: strings.len(),
                expected: count,
            });
        }
        body.extend_from_slice(&lang.to_le_bytes());
        for s in *strings {
            if s.as_bytes().contains(&0) {
                return Err(StringsError::Nul((*s).to_owned()));
            }
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
    }
    let len = 16 + body.len();
    let mut out = Vec::with_capacity(len);
    for word in [
        STRINGS_MAGIC,
        u32::try_from(len).unwrap_or(u32::MAX),
        u32::try_from(count).unwrap_or(u32::MAX),
        u32::try_from(langs.len()).unwrap_or(u32::MAX),
    ] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&body);
    Ok(out)
}

/// The strings of the usbmux function: its interface name in US English.
pub fn usbmux_strings() -> Vec<u8> {
    // A constant without NUL in one language: cannot fail.
    strings_blob(&[(LANG_EN_US, &[USBMUX_INTERFACE_NAME])]).unwrap_or_default()
}

#[cfg(test)]
mod test {
    use super::*;

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn usbmux_descriptors_are_byte_exact() {
        let b = usbmux_function(USBMUX_SUBCLASS).to_bytes();
        // 20-byte header + 2 x (9 + 7 + 7)
        assert_eq!(b.len(), 66);
        assert_eq!(le32(&b, 0), 3, "FUNCTIONFS_DESCRIPTORS_MAGIC_V2");
        assert_eq!(le32(&b, 4), 66, "length");
        assert_eq!(le32(&b, 8), 1 | 2, "HAS_FS_DESC | HAS_HS_DESC");
        assert_eq!(le32(&b, 12), 3, "fs_count");
        assert_eq!(le32(&b, 16), 3, "hs_count");
        let iface = [9, 4, 0, 0, 2, 0xff, 0xfe, 0x02, 1];
        let fs = [
            &iface[..],
            &[7, 5, 0x01, 2, 64, 0, 0],
            &[7, 5, 0x82, 2, 64, 0, 0],
        ]
        .concat();
        let hs = [
            &iface[..],
            &[7, 5, 0x01, 2, 0x00, 0x02, 0],
            &[7, 5, 0x82, 2, 0x00, 0x02, 0],
        ]
        .concat();
        assert_eq!(&b[20..43], &fs[..]);
        assert_eq!(&b[43..66], &hs[..]);
    }

    #[test]
    fn subclass_is_overridable() {
        let b = usbmux_function(0x42).to_bytes();
        assert_eq!(b[20 + 6], 0x42);
        assert_eq!(b[43 + 6], 0x42);
        assert_eq!(b[20 + 5], 0xff, "class stays");
        assert_eq!(b[20 + 7], 0x02, "protocol stays");
    }

    #[test]
    fn strings_blob_is_byte_exact() {
        let b = usbmux_strings();
        let mut want = Vec::new();
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&40u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&[0x09, 0x04]);
        want.extend_from_slice(b"Apple USB Multiplexor\0");
        assert_eq!(b, want);
    }

    #[test]
    fn strings_blob_checks_its_input() {
        assert_eq!(
            strings_blob(&[(LANG_EN_US, &["a\0b"])]),
            Err(StringsError::Nul("a\0b".into()))
        );
        assert!(matches!(
            strings_blob(&[(LANG_EN_US, &["a", "b"]), (0x0407, &["c"])]),
            Err(StringsError::Count {
                lang: 0x0407,
                got: 1,
                expected: 2
            })
        ));
        let two =
            strings_blob(&[(LANG_EN_US, &["a", "bc"]), (0x0407, &["d", "e"])]).expect("valid");
        assert_eq!(le32(&two, 4) as usize, two.len());
        assert_eq!(le32(&two, 8), 2);
        assert_eq!(le32(&two, 12), 2);
        assert_eq!(&two[16..], b"\x09\x04a\0bc\0\x07\x04d\0e\0");
        let empty = strings_blob(&[]).expect("valid");
        assert_eq!(empty.len(), 16);
        assert_eq!(le32(&empty, 8), 0);
    }
}
