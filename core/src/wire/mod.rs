//! Wire formats. Being written.
