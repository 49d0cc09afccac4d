//! Link the freestanding program against static glibc.
//!
//! `#![no_std]` binaries are linked with `-nodefaultlibs`, so the C libraries are named here:
//! libc (process start via its crt, `memcpy`/`memset`, `write`, `_exit`) and libgcc/libgcc_eh,
//! which static libc itself needs. `-Bstatic` because rustc switches back to `-Bdynamic` before
//! these arguments; `.cargo/config.toml` adds `+crt-static` so the result is a static PIE.
fn main() {
    for arg in [
        "-Wl,-Bstatic",
        "-Wl,--start-group",
        "-lc",
        "-lgcc",
        "-lgcc_eh",
        "-Wl,--end-group",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
