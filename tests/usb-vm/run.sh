#!/usr/bin/env bash
# The real-kernel USB harness of usbmux-rs (issue 7; README.md in this directory).
#
# Boots Debian's own kernel in QEMU with an initramfs holding the simulated phone (usbmux-sim
# --functionfs, a real USB gadget on dummy_hcd), our daemon and tools, and Debian's usbmuxd
# 1.1.1 with libimobiledevice's tools, then runs the cases and measurements of tests/usb-vm/
# cases.sh in that one boot. Prints PASS/FAIL per case, the measurements table and a summary;
# exits non-zero on any failure, on a guest that did not finish, or on a timeout.
#
# Run as root on Debian 12 (it installs packages with apt-get). Knobs (environment):
#   USB_VM_CACHE    downloads, unpacked kernel and udev, the last run's files
#                   (default ~/.cache/usbmux-rs/usb-vm)
#   USB_VM_BIN_DIR  use the binaries in this directory instead of building them (every
#                   executable in it goes into the guest's /opt/usbmux-rs/bin)
#   USB_VM_TIMEOUT  seconds the guest may run (default 600)
#   USB_VM_ACCEL    tcg or kvm (default: kvm only with vmx/svm and no paravirtual kvm_pvm)
#   USB_VM_REPS     measurement repetitions per daemon (default 3; 0 skips the measurements)
#   USB_VM_UP_MIB, USB_VM_DOWN_MIB, USB_VM_PAR_UP_MIB, USB_VM_PAR_DOWN_MIB, USB_VM_DIGEST_MIB
#                   MiB per measured transfer (defaults 16, 8, 16, 8; digest cases 16)
#   USB_VM_DAEMONS  daemons measured, comma-separated (default debian,ours,ours-thread;
#                   ours-thread = our usbmuxd with --usb-in thread; more in cases.sh's
#                   start_daemon)
#   USB_VM_VERBOSE  1: show the whole guest console while it runs
#   USB_VM_LOGLEVEL the guest kernel's console loglevel (default 3; 5 adds the stacks of a
#                   soft lockup, 7 everything)
#   USB_VM_KERNEL_ARGS  more guest kernel arguments (experiments)
#   USB_VM_SIM_IO   how the simulated phones drive their endpoints: loop (default: one thread,
#                   AIO completions on an eventfd), threads (a reader and a writer thread,
#                   usbmux-sim --threaded-io) or blocking (usbmux-sim --blocking-io)
#   USB_VM_PROFILE  1: after the measurements, watch each daemon of USB_VM_DAEMONS through one
#                   transfer each way with `strace -f -c` and one with `perf record` (cpu-clock),
#                   and print the summaries; needs strace and perf on the host (their binaries
#                   and libraries go into the guest). timeline: instead, one 4 MiB transfer
#                   each way per daemon with the kernel's stamp on every USB transfer (usbmon,
#                   the gadget trace events), every scheduler switch and the daemon's and
#                   phone's system calls, as @@TL lines of the console log;
#                   `tests/usb-vm/timeline.py LOG` says where the round trip goes
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${USB_VM_CACHE:-$HOME/.cache/usbmux-rs/usb-vm}
WORK=$CACHE/run
TIMEOUT=${USB_VM_TIMEOUT:-600}
REPS=${USB_VM_REPS:-3}
T0=$(date +%s.%N)

ts() { printf '[%6.1fs] %s\n' "$(echo "$(date +%s.%N) $T0" | awk '{print $1 - $2}')" "$*"; }
die() {
    echo "usb-vm: $*" >&2
    exit 1
}

mkdir -p "$CACHE/debs"
rm -rf "$WORK"
mkdir -p "$WORK"

# ---------------------------------------------------------------- 1. host packages
# qemu + initramfs tools; the peers (Debian usbmuxd, libimobiledevice's tools) whose files go
# into the guest; usbutils for lsusb in the guest log. udev and the kernel are only downloaded.
PKGS="qemu-system-x86 busybox-static kmod cpio usbmuxd libimobiledevice-utils libusbmuxd-tools usbutils"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}\n' "$p" 2> /dev/null | grep -q '^install ok installed' || missing="$missing $p"
done
apt_updated=""
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "packages missing ($missing) and not root: run as root"
    ts "apt-get install$missing"
    apt-get update -qq
    apt_updated=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
        > "$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log"; die "apt-get install failed"; }
fi
ts "host packages ready"

# ---------------------------------------------------------------- 2. kernel and udev (unpacked, never installed)
# download PKG DIR: PKG's .deb unpacked into DIR (kept in the cache).
fetch() {
    local pkg=$1 dir=$2
    [ -d "$dir" ] && return 0
    if ! ls "$CACHE/debs/${pkg}_"*.deb > /dev/null 2>&1; then
        (cd "$CACHE/debs" && apt-get download "$pkg" 2>&1 | grep -v 'unsandboxed' || true)
    fi
    local deb
    deb=$(ls "$CACHE/debs/${pkg}_"*.deb 2> /dev/null | head -n 1)
    [ -n "$deb" ] || die "apt-get download $pkg failed"
    rm -rf "$dir.tmp"
    dpkg -x "$deb" "$dir.tmp"
    mv "$dir.tmp" "$dir"
}
resolve_kernel() {
    apt-cache depends linux-image-amd64 2> /dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
KPKG=$(resolve_kernel)
if [ -z "$KPKG" ] && [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
    KPKG=$(resolve_kernel)
fi
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 (apt-cache depends)"
KVER=${KPKG#linux-image-}
KDIR=$CACHE/$KPKG
fetch "$KPKG" "$KDIR"
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "no $VMLINUZ in $KPKG"
for c in USB_DUMMY_HCD USB_F_FS USB_CONFIGFS USB_LIBCOMPOSITE CONFIGFS_FS; do
    grep -qE "^CONFIG_$c=[my]" "$KDIR/boot/config-$KVER" || die "kernel $KVER lacks CONFIG_$c"
done
UDEV_VER=$(apt-cache policy udev | awk '/Candidate:/ {print $2}')
[ -n "$UDEV_VER" ] && [ "$UDEV_VER" != "(none)" ] || die "no udev package candidate"
UDEV_DIR=$CACHE/udev-${UDEV_VER//[:~]/_}
fetch udev "$UDEV_DIR"
[ -x "$UDEV_DIR/bin/udevadm" ] || die "no udevadm in the udev package"
ts "kernel $KVER and udev $UDEV_VER unpacked in $CACHE"

# ---------------------------------------------------------------- 3. our binaries
OUR_BINS="usbmuxd iproxy inetcat usbmuxctl usbmux-sim usb-vm-client"
if [ -n "${USB_VM_BIN_DIR:-}" ]; then
    BIN_DIR=$USB_VM_BIN_DIR
    ts "using binaries from $BIN_DIR"
else
    command -v cargo > /dev/null || die "cargo not found (or set USB_VM_BIN_DIR)"
    (
        cd "$ROOT"
        cargo build --release -q -p usbmux-host --bins
        cargo build --release -q -p usbmux-sim --features functionfs --bin usbmux-sim
        cargo build --release -q -p usbmux-tests --bin usb-vm-client
    ) || die "cargo build failed"
    BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
    ts "release binaries built"
fi
for b in $OUR_BINS; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing"
done
"$BIN_DIR/usbmux-sim" --help 2>&1 | grep -q -- --functionfs \
    || die "$BIN_DIR/usbmux-sim has no --functionfs (built without the functionfs feature?)"

# ---------------------------------------------------------------- 4. initramfs
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,var/lib/usbmux,opt/usbmux-rs/bin,usbvm}
mkdir -p "$R"/etc/udev/rules.d "$R"/lib/udev/rules.d "$R"/lib/systemd
cp /bin/busybox "$R/bin/busybox"
# (ldd fails on a static executable)
if ldd /bin/busybox > /dev/null 2>&1; then die "/bin/busybox is not the static one (busybox-static)"; fi
install -m 755 "$HERE/init" "$R/init"
install -m 644 "$HERE/cases.sh" "$R/usbvm/cases.sh"
install -m 644 "$HERE/phones.toml" "$R/usbvm/phones.toml"

# libs_of FILE: the shared libraries FILE needs, copied to the same paths.
libs_of() {
    local l
    for l in $(ldd "$1" 2> /dev/null | grep -oE '/[^ ]+' || true); do
        [ -e "$R$l" ] && continue
        mkdir -p "$R$(dirname "$l")"
        cp -L "$l" "$R$l"
    done
}
# put SRC DEST: a program into the guest with its libraries.
put() {
    mkdir -p "$R$(dirname "$2")"
    cp -L "$1" "$R$2"
    chmod 755 "$R$2"
    libs_of "$1"
}
# Debian's programs (the peers).
put /usr/sbin/usbmuxd /usr/sbin/usbmuxd.debian
for p in idevice_id ideviceinfo iproxy inetcat lsusb; do put "/usr/bin/$p" "/usr/bin/$p"; done
# Profilers for USB_VM_PROFILE=1 (the host's own; perf's cpu-clock events work under TCG).
if [ "${USB_VM_PROFILE:-0}" = 1 ]; then
    for p in strace perf; do
        command -v $p > /dev/null || die "USB_VM_PROFILE=1 needs $p on the host"
        put "$(command -v $p)" "/usr/bin/$p"
    done
fi
# udevd from the udev package: systemd-udevd is udevadm under another name.
put "$UDEV_DIR/bin/udevadm" /usr/bin/udevadm
ln -s /usr/bin/udevadm "$R/lib/systemd/systemd-udevd"
# Debian's usbmuxd rule, as the usbmuxd package installs it.
cp /lib/udev/rules.d/39-usbmuxd.rules "$R/lib/udev/rules.d/"
# Ours: stripped (the release profile keeps debug info), with their libraries.
if [ -n "${USB_VM_BIN_DIR:-}" ]; then
    bins=$(cd "$BIN_DIR" && find . -maxdepth 1 -type f -perm -u+x -printf '%f\n')
else
    bins=$OUR_BINS
fi
for b in $bins; do
    put "$BIN_DIR/$b" "/opt/usbmux-rs/bin/$b"
    if command -v strip > /dev/null && head -c 4 "$BIN_DIR/$b" | grep -q ELF; then
        strip --strip-debug "$R/opt/usbmux-rs/bin/$b"
    fi
done
cat > "$R/etc/passwd" << 'EOF'
root:x:0:0:root:/root:/bin/sh
usbmux:x:100:46:usbmux daemon,,,:/var/lib/usbmux:/usr/sbin/nologin
EOF
cat > "$R/etc/group" << 'EOF'
root:x:0:
plugdev:x:46:usbmux
EOF
echo 'passwd: files' > "$R/etc/nsswitch.conf"
echo 'group: files' >> "$R/etc/nsswitch.conf"

# Kernel modules: the wanted ones and everything they depend on, then depmod for modprobe.
MD=$KDIR/lib/modules/$KVER
declare -A seen
add_mod() {
    local m=$1 f d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    f=$(find "$MD/kernel" \( -name "$m.ko" -o -name "${m//_/-}.ko" -o -name "${m//-/_}.ko" \) | head -n 1)
    [ -n "$f" ] || die "module $m not found in $KPKG"
    mkdir -p "$R/lib/modules/$KVER/$(dirname "${f#"$MD"/}")"
    cp "$f" "$R/lib/modules/$KVER/${f#"$MD"/}"
    for d in $(modinfo -F depends "$f" | tr ',' ' '); do add_mod "$d"; done
}
MODS="configfs libcomposite usb_f_fs dummy_hcd"
# USB_VM_PROFILE=timeline: usbmon stamps the host's side of every transfer.
[ "${USB_VM_PROFILE:-0}" = timeline ] && MODS="$MODS usbmon"
for m in $MODS; do add_mod $m; done
cp "$MD"/modules.order "$MD"/modules.builtin "$MD"/modules.builtin.modinfo "$R/lib/modules/$KVER/"
depmod -b "$R" "$KVER"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initramfs.gz"
ts "initramfs built ($(du -h "$WORK/initramfs.gz" | cut -f1); modules: ${!seen[*]})"

# ---------------------------------------------------------------- 5. boot
# KVM only on real hardware virtualisation: on a paravirtual /dev/kvm (kvm_pvm, no vmx/svm in
# the CPU flags) Debian's kernel hangs early. TCG otherwise.
kvm_ok() {
    [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo \
        && ! grep -q '^kvm_pvm ' /proc/modules 2> /dev/null && [ ! -d /sys/module/kvm_pvm ]
}
case ${USB_VM_ACCEL:-auto} in
    kvm) ACCEL=(-enable-kvm -cpu host) ;;
    tcg) ACCEL=(-accel tcg,thread=multi -cpu max) ;;
    *) if kvm_ok; then ACCEL=(-enable-kvm -cpu host); else ACCEL=(-accel tcg,thread=multi -cpu max); fi ;;
esac
APPEND="console=ttyS0 panic=-1 softlockup_panic=1 quiet loglevel=${USB_VM_LOGLEVEL:-3} usbvm.watchdog=$((TIMEOUT > 90 ? TIMEOUT - 60 : TIMEOUT * 2 / 3)) usbvm.reps=$REPS usbvm.bench=$([ "$REPS" -gt 0 ] && echo 1 || echo 0)"
APPEND="$APPEND usbvm.up_mib=${USB_VM_UP_MIB:-16} usbvm.down_mib=${USB_VM_DOWN_MIB:-8}"
APPEND="$APPEND usbvm.par_up_mib=${USB_VM_PAR_UP_MIB:-16} usbvm.par_down_mib=${USB_VM_PAR_DOWN_MIB:-8}"
APPEND="$APPEND usbvm.profile=${USB_VM_PROFILE:-0} usbvm.sim_io=${USB_VM_SIM_IO:-loop}"
APPEND="$APPEND usbvm.digest_mib=${USB_VM_DIGEST_MIB:-16} usbvm.daemons=${USB_VM_DAEMONS:-debian,ours,ours-thread}"
APPEND="$APPEND ${USB_VM_KERNEL_ARGS:-}"
LOG=$WORK/guest.log
ts "booting: qemu ${ACCEL[*]}, timeout ${TIMEOUT}s; console in $LOG"

# show: the guest's progress lines while it runs (everything goes to $LOG).
show() {
    local line
    while IFS= read -r line; do
        case $line in
            "@@RESULT "*) echo "${line#@@RESULT }" ;;
            "@@INFO "*) echo "  ${line#@@INFO }" ;;
            "@@TABLE "*) echo "${line#@@TABLE }" ;;
            "@@BENCH "*) echo "  bench: ${line#@@BENCH }" ;;
            *) [ "${USB_VM_VERBOSE:-0}" = 1 ] && echo "  guest| $line" ;;
        esac
    done
    return 0
}
TB=$(date +%s.%N)
set +e
timeout -k 10 "$TIMEOUT" qemu-system-x86_64 "${ACCEL[@]}" -smp 2 -m 1024 \
    -nodefaults -no-user-config -nic none -display none -serial stdio -no-reboot \
    -kernel "$VMLINUZ" -initrd "$WORK/initramfs.gz" -append "$APPEND" < /dev/null \
    | tr -d '\r' | tee "$LOG" | show
rc=${PIPESTATUS[0]}
set -e
TE=$(date +%s.%N)
ts "guest finished: qemu exit $rc after $(echo "$TE $TB" | awk '{printf "%.1f", $1 - $2}') s"

# ---------------------------------------------------------------- 6. verdict
grep '^@@TABLE ' "$LOG" | sed 's/^@@TABLE //' > "$WORK/table.md" || true
npass=$(grep -c '^@@RESULT PASS ' "$LOG" || true)
nfail=$(grep -c '^@@RESULT FAIL ' "$LOG" || true)
problem=""
[ "$rc" = 124 ] || [ "$rc" = 137 ] && problem="the guest timed out after ${TIMEOUT}s"
# softlockup_panic: a guest whose CPUs stopped scheduling ends at once (QEMU exits on the
# panic's reboot) instead of at the timeout.
grep -q 'soft lockup\|softlockup: hung tasks' "$LOG" \
    && problem="the guest kernel locked up (soft lockup; USB_VM_LOGLEVEL=5 prints its stacks)"
[ -z "$problem" ] && ! grep -q '^@@DONE ' "$LOG" && problem="the guest did not finish (qemu exit $rc)"
[ -z "$problem" ] && [ "$nfail" -gt 0 ] && problem="$nfail case(s) failed"
[ -z "$problem" ] && [ "$npass" -eq 0 ] && problem="no case ran"
echo
echo "usb-vm: $npass passed, $nfail failed"
grep '^@@RESULT FAIL ' "$LOG" | sed 's/^@@RESULT /  /' || true
[ -s "$WORK/table.md" ] && echo "measurements: $WORK/table.md"
if [ -n "$problem" ]; then
    echo
    echo "================ guest log ($LOG)"
    cat "$LOG"
    echo "================ end of guest log"
    ts "usb-vm: FAILED: $problem"
    exit 1
fi
ts "usb-vm: all cases passed"
