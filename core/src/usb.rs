//! USB framing. Being written.
