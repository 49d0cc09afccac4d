//! Crate-local logging shim.
//!
//! `trace!`, `debug!`, `info!` and `warn!` expand to `defmt` (firmware), to `log` (hosts) or to
//! nothing. When both features are on (a `--all-features` build of a workspace unifies them),
//! `defmt` wins rather than failing the build: the two backends are additive, not exclusive.
//! With neither, the arguments are still type-checked but nothing is formatted, so disabled
//! logging costs nothing at run time.
#![allow(unused_macros)]

macro_rules! log_impl {
    ($level:ident, $($arg:expr),* $(,)?) => {{
        #[cfg(feature = "defmt")]
        { ::defmt::$level!($($arg),*); }
        #[cfg(all(feature = "log", not(feature = "defmt")))]
        { ::log::$level!($($arg),*); }
        #[cfg(not(any(feature = "log", feature = "defmt")))]
        { let _ = ($( & $arg ),*); }
    }};
}

macro_rules! trace {
    ($($arg:expr),* $(,)?) => { log_impl!(trace, $($arg),*) };
}
macro_rules! debug {
    ($($arg:expr),* $(,)?) => { log_impl!(debug, $($arg),*) };
}
macro_rules! info {
    ($($arg:expr),* $(,)?) => { log_impl!(info, $($arg),*) };
}
macro_rules! warn {
    ($($arg:expr),* $(,)?) => { log_impl!(warn, $($arg),*) };
}

/// Hex rendering of a byte slice for log lines (`Bytes(&payload[..16])`).
#[derive(Clone, Copy)]
pub struct Bytes<'a>(pub &'a [u8]);

impl core::fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl core::fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Bytes<'_> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=[u8]:x}", self.0)
    }
}
