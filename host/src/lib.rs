#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod daemon;
pub mod link;
pub mod pair;
pub mod plist_msg;
pub mod proto;
pub mod tools;
pub mod usb;
