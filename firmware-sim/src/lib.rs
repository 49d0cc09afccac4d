#![doc = include_str!("../README.md")]

pub mod demo;
pub mod phone;
pub mod service;

pub use phone::{Phone, PhoneConfig};
