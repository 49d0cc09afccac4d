#![doc = include_str!("../README.md")]
// `deny`, not `forbid`: the exceptions are `usb::libusb_pool` (libusb's asynchronous transfers,
// for `usb::libusb_in` and `usb::libusb_out`), `usb::libusb_mem` (usbfs-mapped transfer
// buffers) and `usb::libusb_events` (libusb's poll descriptors), which rusb does not wrap;
// allowed there alone and documented there.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod daemon;
pub mod link;
pub mod pair;
pub mod plist_msg;
pub mod proto;
pub mod tools;
pub mod usb;
