#![doc = include_str!("../README.md")]

pub mod demo;
pub mod identity;
pub mod phone;
pub mod service;

pub use identity::Identity;
pub use phone::{Phone, PhoneConfig};
