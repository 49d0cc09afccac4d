#!/usr/bin/env bash
# Freestanding proof of usbmux-core (run by .ci/run; works from a clean clone with only the
# stable toolchain, a C compiler and static glibc, i.e. Debian's gcc + libc6-dev):
#   1. builds the #![no_std] #![no_main] panic = "abort" program in release;
#   2. runs it: host and device sessions against each other, which must exit 0;
#   3. fails if any Rust std or allocator symbol was linked, or if the binary needs a shared
#      library (libc is linked statically, only for process start, memcpy/memset and write);
#   4. prints, as its last line, the code size of usbmux_core's own functions, per role.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

# The link depends on the rustflags in .cargo/config.toml; RUSTFLAGS would replace them.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

fail() {
    echo "check.sh: FAILED: $*" >&2
    exit 1
}

host="$(rustc -vV | sed -n 's/^host: //p')"
case "$host" in
    *-linux-gnu) ;;
    *) fail "needs a *-linux-gnu host toolchain to link against static glibc (host is $host)" ;;
esac
for tool in cc nm readelf timeout; do
    command -v "$tool" >/dev/null || fail "$tool not found"
done
libc_a="$(cc -print-file-name=libc.a)"
[[ -f "$libc_a" ]] || fail "static glibc (libc.a) not found: install libc6-dev"

echo "==> cargo build --release (core/freestanding)"
cargo build --release --target-dir "$here/target"
bin="$here/target/release/usbmux-freestanding"

echo "==> run"
status=0
timeout 300 "$bin" || status=$?
[[ $status -eq 0 ]] || fail "$bin exited with status $status"

echo "==> symbols"
raw="$(nm "$bin")"
demangled="$(nm -C "$bin")"
bad="$(
    {
        grep -E '_ZN3std|_ZN5alloc|__rust_alloc|__rust_dealloc|__rust_realloc|__rg_alloc|__rdl_alloc|__rust_alloc_error_handler' <<<"$raw" || true
        # A path that starts with std:: or alloc:: (core::alloc::Layout is fine).
        grep -E '(^|[^:A-Za-z0-9_])(std|alloc)::' <<<"$demangled" || true
    } | sort -u
)"
if [[ -n "$bad" ]]; then
    echo "$bad" | head -20 >&2
    fail "Rust std or allocator symbols are linked"
fi
if readelf -d "$bin" | grep -q NEEDED; then
    readelf -d "$bin" | grep NEEDED >&2
    fail "the binary needs shared libraries; it should be fully static"
fi
echo "no std, no alloc, no shared libraries"

# Sum the sizes of text symbols whose own path is in usbmux_core (not the program's code that
# calls it, not libc, not core). v0 symbol names keep generic arguments, so code generic over
# the role is attributed to Host or Device; the rest (wire, tcp, storage, usb) serves both.
# Functions inlined into the program are not counted.
nm --size-sort -C "$bin" | awk '
    function hex(s,    i, n) {
        n = 0
        s = tolower(s)
        for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
        return n
    }
    $2 ~ /^[Tt]$/ {
        name = $0
        sub(/^[^ ]+ [^ ]+ /, "", name)
        own = name
        sub(/^[<&]+/, "", own)
        if (own !~ /^usbmux_core::/) next
        size = hex($1)
        if (name ~ /usbmux_core::mux::Host/) host += size
        else if (name ~ /usbmux_core::mux::Device/) device += size
        else shared += size
    }
    END {
        total = host + device + shared
        if (total == 0) { print "check.sh: no usbmux_core symbols found" > "/dev/stderr"; exit 1 }
        printf "usbmux_core code size: %d bytes = Host %d + Device %d + shared %d (x86_64, opt-level s, out-of-line functions only)\n", total, host, device, shared
    }
'
