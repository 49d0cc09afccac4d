//! The simulated phone. Being built.
