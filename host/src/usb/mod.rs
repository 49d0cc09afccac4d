//! USB transport (being written).
