//! Ring buffers. Being written.
