# The cases and measurements of the USB VM harness, sourced by /init (busybox sh) once the
# guest is up. Issue 7 lists what each case must show; README.md here sums them up.
#
# Two programs may claim the phone: Debian's usbmuxd 1.1.1 and ours. Each owns it in turn
# (a daemon claims every Apple device it sees), started as Debian's usbmuxd.service starts it
# (`--user usbmux`) but in the foreground (-f) and without --systemd: there is no systemd here,
# and --systemd's -z would let udev's remove rule (`usbmuxd -x`) end the daemon at the unplug of
# case 3, whose point is to watch the daemon report it.

CFG=/sys/kernel/config/usb_gadget
OURS=/opt/usbmux-rs/bin
SIM=$OURS/usbmux-sim
# The checking client, always under a deadline of its own: a daemon that stops accepting
# connections would otherwise block it (connect on a full Unix socket backlog waits forever).
vmc() { timeout 90 $OURS/usb-vm-client "$@"; }
CLIENT=vmc
# vmc_for SECS ARGS: the same with another deadline.
vmc_for() {
    local t=$1
    shift
    timeout $t $OURS/usb-vm-client "$@"
}
PHONES=/usbvm/phones.toml
UDID1=00008030-0000000000000001
UDID2=00008030-0000000000000002
PV1=17.5.1
# Echo sizes for case 5: 512·k bytes of payload, and 512·k bytes per USB transfer (payload plus
# the 36-byte v2 mux + TCP header), the lengths that need a zero-length packet to end them.
SIZES=512,1024,16384,65536,66048,476,988,4060,16348,65500,66012

pass() { echo "@@RESULT PASS $1"; }
fail() {
    echo "@@RESULT FAIL $1${2:+: $2}"
    FAILS=$((FAILS + 1))
}

# expect NAME CMD...: the case passes when CMD exits 0. Its output goes to a log of its own;
# the last lines of it come with a failure.
CASE_N=0
expect() {
    local name=$1 log
    shift
    CASE_N=$((CASE_N + 1))
    log=/tmp/logs/case-$(printf %02d $CASE_N).log
    echo "== $name" > $log
    if "$@" >> $log 2>&1; then
        pass "$name"
    else
        fail "$name" "$(tail -n 6 $log | tr '\n' '|')"
    fi
}

# until_ok SECS CMD...: runs CMD every 0.3 s until it succeeds; fails after SECS seconds.
until_ok() {
    local end=$(($(date +%s) + $1))
    shift
    while ! "$@"; do
        [ "$(date +%s)" -ge $end ] && return 1
        sleep 0.3
    done
}

# wait_gone SECS PID...: all PIDs exit (or are zombies waiting to be reaped) within SECS
# seconds. One read of the stat file: a process that ends between a test for the file and the
# read is gone.
wait_gone() {
    local secs=$1 p
    shift
    for p in "$@"; do
        until_ok $secs sh -c "! grep -q '^[0-9]* (.*) [^Z]' /proc/$p/stat 2> /dev/null" || return 1
    done
}

# ---------------------------------------------------------------- phones (USB gadgets)

# plug_new K NAME [ARGS]: phone K of phones.toml as configfs gadget NAME, bound to a free UDC.
plug_new() {
    local k=$1 name=$2
    shift 2
    mkdir -p /dev/ffs-$name
    local io=""
    case ${SIM_IO:-loop} in
        threads) io=--threaded-io ;;
        blocking) io=--blocking-io ;;
    esac
    # A gadget made anew (ensure_phone) must not find its predecessor's "bound" line: the
    # background child truncates the log only once it runs, which may be after the first grep.
    [ -e /tmp/logs/sim-$name.log ] && mv -f /tmp/logs/sim-$name.log /tmp/logs/sim-$name-before.log
    $SIM --functionfs /dev/ffs-$name --config $PHONES --phone $k --configfs $name -v $io "$@" \
        > /tmp/logs/sim-$name.log 2>&1 &
    eval "SIM_PID_$name=$!"
    if ! until_ok 20 grep -q "bound to UDC" /tmp/logs/sim-$name.log; then
        info "usbmux-sim for $name did not bind: $(tail -n 3 /tmp/logs/sim-$name.log | tr '\n' '|')"
        return 1
    fi
    eval "UDC_$name=\$(cat $CFG/$name/UDC)"
    if eval "[ -z \"\$UDC_$name\" ]"; then
        info "usbmux-sim for $name said it was bound, but its gadget names no UDC"
        return 1
    fi
    # The host side enumerates the device after the bind returned; then udev handles it.
    until_ok 20 usb_dir "$(printf '00008030-%016X' $k)" > /dev/null \
        || info "$name: no USB device with its serial after 20 s"
    udevadm settle -t 10
    info "$name plugged on $(cat $CFG/$name/UDC)"
}

# unplug NAME / replug NAME: what pulling the cable and putting it back does to the host.
unplug() {
    echo "" > $CFG/$1/UDC
    udevadm settle -t 10
}
replug() {
    eval "echo \$UDC_$1" > $CFG/$1/UDC
    sleep 0.5
    udevadm settle -t 10
}

# usb_dir UDID: the phone's /sys/bus/usb/devices entry (matched by the USB serial).
usb_dir() {
    local serial d
    serial=$(echo "$1" | tr -d -)
    for d in /sys/bus/usb/devices/*; do
        [ "$(cat $d/serial 2>/dev/null)" = "$serial" ] && echo $d && return 0
    done
    return 1
}

# ---------------------------------------------------------------- daemons

# use_daemon debian|ours: what /usr/sbin/usbmuxd is, as if that package were installed (udev's
# remove rule runs `/usr/sbin/usbmuxd -x`).
use_daemon() {
    case $1 in
        debian) ln -sfn /usr/sbin/usbmuxd.debian /usr/sbin/usbmuxd ;;
        ours) ln -sfn $OURS/usbmuxd /usr/sbin/usbmuxd ;;
    esac
}

# start_daemon debian|ours|ours-thread|ours-events-thread|ours-sync|ours-heap: the daemon as
# usbmuxd.service runs it (see the top); the others are ours with USB options changed from the
# defaults (asynchronous transfers both ways, libusb's events handled on the phone's own thread,
# buffers mapped from usbfs): ours-thread reads USB IN with one reader thread (OUT completions
# then on an event thread), ours-events-thread handles libusb's events on an event thread per
# phone, ours-sync uses only rusb's synchronous calls (a reader and a writer thread), ours-heap
# gives the transfers heap buffers, ours-traced records every transfer (--trace).
DAEMON_N=0
# traced_daemons: each daemon of $DAEMONS once more, for $REPS transfers each way with its CPU
# also counted without the softirqs that ran on top of it (dummy_hcd's bus work among them;
# usb-vm-client traced), after the measurements, which run untraced. The two softirq events are
# enabled while no daemon runs and disabled after the last: enabling or disabling an event
# patches the kernel's code at its tracepoint — here inside the softirq loop — and doing that
# while dummy_hcd's timer fired 8 000 times a second (a daemon keeps IN transfers posted) hung
# the guest in 3 of 7 boots (both CPUs in soft lockup); the client only sets filters and
# switches recording.
traced_daemons() {
    local T=/sys/kernel/tracing d e
    grep -q " $T " /proc/mounts || mount -t tracefs nodev $T
    if [ ! -w $T/events/irq/softirq_entry/enable ]; then
        info "measurements: no tracefs, so no CPU figures without softirqs"
        return
    fi
    echo 0 > $T/tracing_on
    # Per CPU; a 16 MiB transfer brings a few thousand events at most.
    echo 8192 > $T/buffer_size_kb
    for e in softirq_entry softirq_exit; do echo 1 > $T/events/irq/$e/enable; done
    for d in $DAEMONS; do
        if ! start_daemon $d; then
            fail "traced $d: usbmuxd starts"
            continue
        fi
        $CLIENT wait --udid $UDID1 --timeout 45 > /dev/null 2>&1 \
            || info "traced $d: the phone is not listed after 45 s"
        sleep 1
        if vmc_for 300 traced --udid $UDID1 --pid $DPID --daemon $d --reps $REPS \
            --up-mib $UP_MIB --down-mib $DOWN_MIB --softirqs $T \
            > /tmp/logs/traced-$d.log 2>&1; then
            grep '^@@BENCH' /tmp/logs/traced-$d.log | tee -a /tmp/bench.txt
        else
            fail "traced $d" "$(tail -n 3 /tmp/logs/traced-$d.log | tr '\n' '|')"
        fi
        stop_daemon $d
    done
    for e in softirq_entry softirq_exit; do echo 0 > $T/events/irq/$e/enable; done
}

start_daemon() {
    local extra=
    case $1 in
        debian) use_daemon debian ;;
        ours) use_daemon ours ;;
        ours-thread) use_daemon ours; extra="--usb-in thread" ;;
        ours-events-thread) use_daemon ours; extra="--usb-events thread" ;;
        ours-sync) use_daemon ours; extra="--usb-in thread --usb-out thread" ;;
        ours-heap) use_daemon ours; extra="--usb-heap-buffers" ;;
        ours-traced) use_daemon ours; extra="--trace /tmp/logs/usbmuxd-$DAEMON_N.trace" ;;
    esac
    DAEMON_N=$((DAEMON_N + 1))
    DLOG=/tmp/logs/usbmuxd-$(printf %02d $DAEMON_N)-$1.log
    /usr/sbin/usbmuxd -f -v -U usbmux $extra > $DLOG 2>&1 &
    DPID=$!
    if ! until_ok 15 $OURS/usbmuxctl list > /dev/null 2>&1; then
        info "usbmuxd ($1) does not answer: $(tail -n 3 $DLOG | tr '\n' '|')"
        return 1
    fi
}

stop_daemon() {
    kill $DPID 2> /dev/null
    if ! wait_gone 10 $DPID; then
        kill -9 $DPID
        if [ $1 = debian ]; then
            info "Debian's usbmuxd was still running 10 s after SIGTERM (killed)"
        else
            fail "$1 usbmuxd exits on SIGTERM" "still running 10 s later"
        fi
    fi
    wait $DPID 2> /dev/null
}

# profile_daemons: for each daemon of $DAEMONS, one transfer each way under `strace -f -c`
# (system calls per MiB) and one under `perf record` (where the CPU goes), summaries as info
# lines (USB_VM_PROFILE=1).
profile_daemons() {
    local d dir tracer mib
    for d in $DAEMONS; do
        start_daemon $d || { info "profile $d: usbmuxd does not start"; continue; }
        $CLIENT wait --udid $UDID1 --timeout 45 > /dev/null 2>&1
        sleep 1
        for dir in up down; do
            [ $dir = up ] && mib=$UP_MIB || mib=$DOWN_MIB
            strace -f -c -o /tmp/logs/strace-$d-$dir.txt -p $DPID 2> /dev/null &
            tracer=$!
            sleep 1
            info "profile $d strace $dir: $($CLIENT $dir --udid $UDID1 --mib $mib 2>&1)"
            kill -INT $tracer; wait $tracer 2> /dev/null
            head -n 14 /tmp/logs/strace-$d-$dir.txt | sed "s/^/  profile $d strace $dir | /" | while IFS= read -r l; do info "$l"; done
            tail -n 1 /tmp/logs/strace-$d-$dir.txt | sed "s/^/  profile $d strace $dir | /" | while IFS= read -r l; do info "$l"; done
            grep -E '^(voluntary|nonvoluntary)' /proc/$DPID/status | tr '\n' ' ' | sed "s/^/  profile $d after $dir: /" | while IFS= read -r l; do info "$l"; done
            perf record -q -e cpu-clock -F 2000 -g -p $DPID -o /tmp/perf-$d-$dir.data > /dev/null 2>&1 &
            tracer=$!
            sleep 1
            info "profile $d perf $dir: $($CLIENT $dir --udid $UDID1 --mib $mib 2>&1)"
            kill -INT $tracer; wait $tracer 2> /dev/null
            perf report -q -i /tmp/perf-$d-$dir.data --stdio --no-children --sort dso,symbol -g none --percent-limit 1.5 2> /dev/null \
                | grep -v '^$' | head -n 30 | sed "s/^/  profile $d perf $dir | /" | while IFS= read -r l; do info "$l"; done
            # The whole guest for exactly the client's run (no idle lead-in): which process
            # (phone, daemon, client, kernel threads) spends it, and on what.
            info "profile $d perf-all $dir: $(perf record -q -e cpu-clock -F 1000 -a -o /tmp/perf-all-$d-$dir.data -- \
                timeout 90 $OURS/usb-vm-client $dir --udid $UDID1 --mib $mib 2> /dev/null)"
            perf report -q -i /tmp/perf-all-$d-$dir.data --stdio --no-children --sort comm -g none --percent-limit 1 2> /dev/null \
                | grep -v '^$' | head -n 14 | sed "s/^/  profile $d perf-all $dir | /" | while IFS= read -r l; do info "$l"; done
            perf report -q -i /tmp/perf-all-$d-$dir.data --stdio --no-children --sort comm,dso,symbol -g none --percent-limit 1.5 2> /dev/null \
                | grep -v '^$' | head -n 30 | sed "s/^/  profile $d perf-all-sym $dir | /" | while IFS= read -r l; do info "$l"; done
        done
        stop_daemon $d
    done
}

# timeline_daemons: for each daemon of $DAEMONS, one transfer each way with the kernel's stamp
# on every USB transfer — the host's submission and completion of each URB (usbmon) and the
# phone's controller queueing and giving back each request (the gadget trace events) — and the
# scheduler's switches, all on the monotonic clock, as @@TL lines (USB_VM_PROFILE=timeline; the
# host's tests/usb-vm/timeline.py reads them from the console log).
timeline_daemons() {
    local d dir mon bus filter t T=/sys/kernel/debug/tracing
    modprobe usbmon || { info "timeline: no usbmon"; return; }
    grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs none /sys/kernel/debug
    bus=$(cat "$(usb_dir $UDID1)/busnum")
    echo mono > $T/trace_clock
    # Which CPUs the scheduler may move a woken task between at once (one LLC domain) or only
    # by balancing later.
    info "timeline: sched domains of cpu0: $(cat /sys/kernel/debug/sched/domains/cpu0/domain*/name 2> /dev/null | tr '\n' ' ')flags: $(cat /sys/kernel/debug/sched/domains/cpu0/domain*/flags 2> /dev/null | tr '\n' ' ')"
    info "timeline: cpu0 caches shared with: $(cat /sys/devices/system/cpu/cpu0/cache/index*/shared_cpu_list 2> /dev/null | tr '\n' ' ')"
    echo 16384 > $T/buffer_size_kb
    # Enabled once, before any daemon runs (see the measurements: toggling an event patches the
    # kernel's code, which hung the guest when done during USB traffic); recorded only while
    # tracing_on is 1.
    echo 0 > $T/tracing_on
    for e in gadget/usb_ep_queue gadget/usb_gadget_giveback_request sched/sched_switch sched/sched_wakeup raw_syscalls irq/softirq_entry irq/softirq_exit; do
        echo 1 > $T/events/$e/enable
    done
    for d in $DAEMONS; do
        start_daemon $d || { info "timeline $d: usbmuxd does not start"; continue; }
        $CLIENT wait --udid $UDID1 --timeout 45 > /dev/null 2>&1
        sleep 1
        # System calls of the daemon's and the phone's threads only (each side's own work
        # between two wake-ups).
        filter=$(for t in /proc/$DPID/task/* /proc/$SIM_PID_phone1/task/*; do
            printf 'common_pid == %s || ' ${t##*/}
        done)
        echo "${filter% || }" > $T/events/raw_syscalls/filter
        # Softirqs run on top of whichever task they interrupt and, without the kernel's irq
        # time accounting (CONFIG_IRQ_TIME_ACCOUNTING is not set in Debian's kernel), count as
        # that task's run time: dummy_hcd's timer, which moves every transfer's bytes, is one.
        echo "${filter% || }" > $T/events/irq/softirq_entry/filter
        echo "${filter% || }" > $T/events/irq/softirq_exit/filter
        for dir in up down; do
            echo > $T/trace
            cat /sys/kernel/debug/usb/usbmon/${bus}u > /tmp/usbmon.txt &
            mon=$!
            sleep 0.5
            echo 1 > $T/tracing_on
            info "timeline $d $dir: $($CLIENT $dir --udid $UDID1 --mib 4 2>&1)"
            echo 0 > $T/tracing_on
            sleep 0.2
            kill $mon
            wait $mon 2> /dev/null
            sed "s/^/@@TL $d $dir trace|/" $T/trace
            sed "s/^/@@TL $d $dir mon|/" /tmp/usbmon.txt
        done
        stop_daemon $d
    done
}

# ---------------------------------------------------------------- checks

lists_udid() { # UDID: Debian's idevice_id -l shows it
    idevice_id -l > /tmp/idevice_id.out 2>&1
    grep -qx "$1" /tmp/idevice_id.out
}

check_udev_rule() {
    local d node
    d=$(usb_dir $UDID1) || { echo "no USB device with the phone's serial"; return 1; }
    node=/dev/bus/usb/$(printf %03d "$(cat $d/busnum)")/$(printf %03d "$(cat $d/devnum)")
    if [ -n "$(cat $d/bConfigurationValue)" ]; then
        # The kernel emits a new device's add event and then configures it; if udevd's write
        # of 0 lands before that (a stalled vCPU between the two: seen once in ~20 boots under
        # TCG, and possible on a real system), the kernel's configuration wins. Replaying the
        # add event applies the rule again, so the daemons meet the state they meet on a real
        # system (each must configure the phone itself).
        echo "bConfigurationValue='$(cat $d/bConfigurationValue)' after the add event: the kernel's configuration raced the rule's write; replaying the event"
        touch /tmp/logs/udev-raced
        udevadm trigger --action=add $d
        udevadm settle -t 10
    fi
    ls -l $node
    echo "bConfigurationValue='$(cat $d/bConfigurationValue)' (the rule writes 0: unconfigured)"
    udevadm info -q property $d | grep '^USBMUX_SUPPORTED='
    [ "$(stat -c %U $node)" = usbmux ] && [ -z "$(cat $d/bConfigurationValue)" ] \
        && udevadm info -q property $d | grep -q '^USBMUX_SUPPORTED=1$'
}

check_idevice_id() {
    until_ok 20 lists_udid $UDID1
    local rc=$?
    echo "idevice_id -l:"
    cat /tmp/idevice_id.out
    return $rc
}

check_product_version() {
    local v
    v=$(timeout 30 ideviceinfo -s -u $UDID1 -k ProductVersion 2>&1)
    echo "ideviceinfo -s -k ProductVersion: '$v' (phones.toml: '$PV1')"
    [ "$v" = "$PV1" ]
}

# digest_via IPROXY PORT: /tmp/data through the proxy into the phone's digest service; the
# phone's SHA-256 must equal sha256sum's.
digest_via() {
    local proxy=$1 port=$2 pid want got rc
    $proxy $port:1999 -u $UDID1 > /tmp/logs/iproxy-$port.log 2>&1 &
    pid=$!
    want=$(sha256sum /tmp/data | cut -d' ' -f1)
    got=$(vmc_for 180 digest --tcp 127.0.0.1:$port --file /tmp/data)
    rc=$?
    kill $pid 2> /dev/null
    wait $pid 2> /dev/null
    echo "sha256sum: $want"
    echo "phone:     $got"
    [ $rc = 0 ] && [ "${got%% *}" = "$want" ]
}

# inetcat_echo INETCAT: 64 KiB through the echo service come back the same.
inetcat_echo() {
    head -c 65536 /dev/urandom > /tmp/echo.in
    timeout 60 $1 -u $UDID1 7 < /tmp/echo.in > /tmp/echo.out
    echo "inetcat exit $?, $(wc -c < /tmp/echo.out) bytes back"
    cmp /tmp/echo.in /tmp/echo.out
}

echo_sizes() {
    vmc_for 120 echo --udid $UDID1 --sizes $SIZES
}

# ids_in LOG EVENT: the DeviceIDs of the phone's EVENT (attached|detached) lines of a
# `usbmuxctl listen` log, one per line.
ids_in() {
    awk -v e="$2" -v u="$UDID1" '$1 == e && ($3 == u || $3 == "") { print $2 }' $1
}

replugged_echoes() {
    $CLIENT wait --udid $UDID1 --timeout 20 && $CLIENT echo --udid $UDID1 --sizes 1000
}

# ensure_phone: the phone is listed again; if not, its gadget is made anew (usbmux-sim removes
# it on SIGTERM), so that one failed replug does not fail every later case too.
ensure_phone() {
    $CLIENT wait --udid $UDID1 --timeout 15 > /dev/null 2>&1 && return 0
    info "the phone did not come back: making its gadget anew"
    eval "kill \$SIM_PID_phone1"
    eval "wait_gone 10 \$SIM_PID_phone1"
    plug_new 1 phone1 && $CLIENT wait --udid $UDID1 --timeout 20 > /dev/null 2>&1
}

# ---------------------------------------------------------------- case 3: unplug and replug

# check_or_record D NAME CMD...: for our daemon a case (PASS/FAIL); for Debian's only a record of
# what it did. Debian's 1.1.1 sometimes misses the unplug altogether (no Detached, the same
# DeviceID after the replug: its libusb hotplug never reported the departure, seen in about one
# run in three here) — a peer's flaw to document, not a failure of this project.
check_or_record() {
    local d=$1 name=$2
    shift 2
    if [ $d = ours ]; then
        expect "$name" "$@"
    elif "$@" > /dev/null 2>&1; then
        info "case 3 (debian) did: $name"
    else
        info "case 3 (debian) did NOT: $name"
        return 1
    fi
}

case3() {
    local d=$1 tools listen ip pmux pcat pproxy id1 id2 n
    if [ $d = ours ]; then tools=$OURS; else tools=/usr/bin; fi
    listen=/tmp/logs/listen-$d.log
    $OURS/usbmuxctl listen > $listen 2>&1 &
    local plisten=$!
    until_ok 10 grep -q '^attached' $listen
    id1=$(ids_in $listen attached | tail -n 1)
    info "case 3 ($d): phone has DeviceID '$id1'; starting transfers, then unplugging"

    # Three connections in flight on the endless source service: ours straight on the daemon's
    # socket, the project's inetcat (stdin a FIFO held open, so only the device can end it),
    # and the project's iproxy with a client behind it.
    timeout 60 $OURS/usb-vm-client drain --udid $UDID1 --port 19 --timeout 40 > /tmp/logs/drain-mux-$d.log 2>&1 &
    pmux=$!
    rm -f /tmp/hold
    mkfifo /tmp/hold
    $tools/inetcat -u $UDID1 19 0<> /tmp/hold > /dev/null 2> /tmp/logs/inetcat-$d.log &
    pcat=$!
    $tools/iproxy 27030:19 -u $UDID1 > /tmp/logs/iproxy-unplug-$d.log 2>&1 &
    ip=$!
    timeout 60 $OURS/usb-vm-client drain --tcp 127.0.0.1:27030 --timeout 40 > /tmp/logs/drain-tcp-$d.log 2>&1 &
    pproxy=$!
    until_ok 15 grep -q connected /tmp/logs/drain-mux-$d.log
    until_ok 15 grep -q connected /tmp/logs/drain-tcp-$d.log
    sleep 1
    unplug phone1

    check_or_record $d "3 $d: Listen client gets Detached for DeviceID $id1" \
        until_ok 15 sh -c "awk '\$1 == \"detached\" && \$2 == \"$id1\"' $listen | grep -q ."
    if [ $d = ours ]; then
        expect "3 ours: client connection on the daemon socket ends" wait_gone 15 $pmux
        expect "3 ours: our inetcat ends" wait_gone 15 $pcat
        expect "3 ours: connection through our iproxy ends" wait_gone 15 $pproxy
    else
        wait_gone 15 $pmux && r1=ends || r1="still open after 15 s"
        wait_gone 1 $pcat && r2=ends || r2="still running"
        wait_gone 1 $pproxy && r3=ends || r3="still open"
        info "case 3 (debian) after unplug: connection on the daemon socket $r1; Debian inetcat $r2; connection through Debian iproxy $r3"
    fi
    cat /tmp/logs/drain-mux-$d.log /tmp/logs/drain-tcp-$d.log | grep ended | sed "s/^/@@INFO case 3 ($d) /"

    replug phone1
    local nfail=$FAILS attached=yes
    check_or_record $d "3 $d: Listen client gets Attached after the replug" \
        until_ok 20 sh -c "[ \$(awk '\$1 == \"attached\"' $listen | wc -l) -ge 2 ]" || attached=no
    id2=$(ids_in $listen attached | tail -n 1)
    info "case 3 ($d): DeviceID before unplug '$id1', after replug '$id2'"
    # Without the Attached, the next two would only fail again (and slowly).
    if [ $FAILS = $nfail ] && [ $attached = yes ]; then
        if [ $d = ours ]; then
            expect "3 ours: the replugged phone has a new DeviceID ($id1 -> $id2)" \
                test -n "$id2" -a "$id2" != "$id1"
        fi
        check_or_record $d "3 $d: the replugged phone echoes" replugged_echoes
    fi

    for p in $pmux $pcat $pproxy $ip $plisten; do kill $p 2> /dev/null; done
    for p in $pmux $pcat $pproxy $ip $plisten; do wait $p 2> /dev/null; done
    echo "@@INFO case 3 ($d) Listen events: $(tr '\n' ';' < $listen)"
    ensure_phone
}

# ---------------------------------------------------------------- case 4: another subclass

serves_phone1_only() {
    timeout 30 $OURS/usbmuxctl list > /tmp/list.out 2>&1
    cat /tmp/list.out
    grep -q $UDID1 /tmp/list.out && ! grep -q $UDID2 /tmp/list.out
}

case4() {
    local d=$1 s
    if [ -e $CFG/phone2 ]; then replug phone2; else plug_new 2 phone2 --subclass 0x42; fi
    s=$(usb_dir $UDID2) && info "case 4: gadget $UDID2 has interface $(cat $s/*:1.0/bInterfaceClass 2>/dev/null)/$(cat $s/*:1.0/bInterfaceSubClass 2>/dev/null)/$(cat $s/*:1.0/bInterfaceProtocol 2>/dev/null) (empty: unconfigured by udev's rule)"
    # The daemon had time to take it: the other phone was attached within seconds everywhere.
    sleep 4
    if [ $d = ours ]; then
        expect "4 ours: a class 0xff / subclass 0x42 interface is not served" \
            serves_phone1_only
    else
        info "case 4 (debian): idevice_id -l with the subclass 0x42 gadget plugged: $(idevice_id -l | tr '\n' ' ')"
        grep -iE "$(echo $UDID2 | tr -d -)|interface|2-1" $DLOG | tail -n 8 | sed 's/^/@@INFO case 4 (debian) log: /'
    fi
    unplug phone2
}

# ---------------------------------------------------------------- the run

info "generating ${DIGEST_MIB} MiB of test data"
head -c $((DIGEST_MIB * 1024 * 1024)) /dev/urandom > /tmp/data

if ! plug_new 1 phone1; then
    fail "boot: usbmux-sim plugs phone 1 in as a USB gadget" "$(tail -n 5 /tmp/logs/sim-phone1.log | tr '\n' '|')"
else
    pass "boot: usbmux-sim plugs phone 1 in as a USB gadget"
    expect "0: Debian's udev rule leaves the phone unconfigured and owned by usbmux" check_udev_rule
    [ -e /tmp/logs/udev-raced ] \
        && info "case 0: the kernel's configuration of the phone raced the rule's write; the add event was replayed"

    info "case 1: Debian usbmuxd 1.1.1"
    if start_daemon debian; then
        expect "1 debian: idevice_id -l lists $UDID1" check_idevice_id
        expect "1 debian: ideviceinfo -s -k ProductVersion is $PV1" check_product_version
        expect "1 debian: Debian iproxy moves ${DIGEST_MIB} MiB through digest, SHA-256 matches" digest_via /usr/bin/iproxy 27010
        expect "1 debian: our inetcat echo round trip" inetcat_echo $OURS/inetcat
        expect "5 debian: echo of 512·k-byte payloads and transfers intact" echo_sizes
        case3 debian
        case4 debian
        stop_daemon debian
    else
        fail "1 debian: usbmuxd starts" "$(tail -n 5 $DLOG | tr '\n' '|')"
    fi

    info "case 2: usbmux-rs usbmuxd (started first; the phone is plugged in afterwards)"
    unplug phone1
    if start_daemon ours; then
        replug phone1
        expect "2 ours: hotplug: the daemon lists $UDID1 after the plug" $CLIENT wait --udid $UDID1 --timeout 20
        expect "2 ours: idevice_id -l lists $UDID1" check_idevice_id
        expect "2 ours: ideviceinfo -s -k ProductVersion is $PV1" check_product_version
        expect "2 ours: Debian iproxy moves ${DIGEST_MIB} MiB through digest, SHA-256 matches" digest_via /usr/bin/iproxy 27011
        expect "2 ours: our iproxy moves ${DIGEST_MIB} MiB through digest, SHA-256 matches" digest_via $OURS/iproxy 27012
        expect "2 ours: our inetcat echo round trip" inetcat_echo $OURS/inetcat
        expect "5 ours: echo of 512·k-byte payloads and transfers intact" echo_sizes
        case3 ours
        case4 ours
        stop_daemon ours
    else
        replug phone1
        fail "2 ours: usbmuxd starts" "$(tail -n 5 $DLOG | tr '\n' '|')"
    fi

    # ------------------------------------------------------------ measurements
    if [ "$BENCH" = 1 ]; then
        info "measurements: $REPS interleaved repetitions of: $DAEMONS"
        # What every wake-up and system call costs in this guest depends on these.
        info "measurements: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource), meltdown: $(cat /sys/devices/system/cpu/vulnerabilities/meltdown), $(dmesg | grep -iE 'tsc|sched_clock' | head -n 4 | cut -c16- | tr '\n' '|')"
        : > /tmp/bench.txt
        rep=1
        while [ $rep -le $REPS ]; do
            # Odd repetitions in the given order, even ones reversed: drift hits all alike.
            order=$DAEMONS
            [ $((rep % 2)) = 0 ] && order=$(echo $DAEMONS | tr ' ' '\n' | tac | tr '\n' ' ')
            for d in $order; do
                if ! start_daemon $d; then
                    fail "bench $d rep $rep: usbmuxd starts"
                    continue
                fi
                # Debian's lists the phone only once its preflight (lockdown) is through.
                $CLIENT wait --udid $UDID1 --timeout 45 > /dev/null 2>&1 \
                    || info "bench $d rep $rep: the phone is not listed after 45 s"
                sleep 1
                if vmc_for 300 bench --udid $UDID1 --pid $DPID --daemon $d --rep $rep \
                    --up-mib $UP_MIB --down-mib $DOWN_MIB --par 8 \
                    --par-up-mib $PAR_UP_MIB --par-down-mib $PAR_DOWN_MIB \
                    > /tmp/logs/bench-$d-$rep.log 2>&1; then
                    grep '^@@BENCH' /tmp/logs/bench-$d-$rep.log | tee -a /tmp/bench.txt
                else
                    fail "bench $d rep $rep" "$(tail -n 3 /tmp/logs/bench-$d-$rep.log | tr '\n' '|')"
                fi
                stop_daemon $d
            done
            rep=$((rep + 1))
        done
        traced_daemons
        $OURS/usb-vm-client table /tmp/bench.txt 2>&1 | sed 's/^/@@TABLE /'
    fi
    if [ "$PROFILE" = 1 ]; then profile_daemons; fi
    if [ "$PROFILE" = timeline ]; then timeline_daemons; fi
fi
