#![doc = include_str!("../README.md")]

pub mod cable;
pub mod config;
pub mod demo;
pub mod digest;
pub mod faults;
#[cfg(all(feature = "functionfs", target_os = "linux"))]
pub mod gadget;
pub mod identity;
pub mod lockdown;
pub mod phone;
pub mod plist_guard;
pub mod service;
pub mod socket;
pub mod trace;

pub use identity::Identity;
pub use phone::{Phone, PhoneConfig};
