#!/usr/bin/env python3
"""Where one connection's round trip goes, from a USB_VM_PROFILE=timeline console log.

Usage: timeline.py GUEST_LOG

The guest (cases.sh, `timeline_daemons`) records one transfer each way per daemon with the
kernel's stamps on every USB transfer: usbmon gives the host's side (each URB's submission `S`
and completion `C`, with the first 32 bytes — the 16-byte v2 mux header and the TCP header's
ports, seq, ack, flags and window), the gadget trace events give the phone's side (each request
queued by the phone and given back by its controller), and the scheduler's switches say who
ran. All on the monotonic clock.

One connection moves at most the receiver's window per data round trip, so what matters is
where that round trip goes. For every round this prints, in medians over the transfer:

- window: the share of the transfer during which the sender had the whole window in flight
  (it could send nothing until an ACK came);
- for each ACK, the path from the last data transfer before it to the sender's next data
  transfer, split at each stamp: the receiver's reaction (data given back -> its ACK queued),
  the bus (ACK queued -> given back), the sender's reaction (ACK completed -> next data
  submitted / queued);
- stretches with no event on any CPU, the daemon's and the phone's system calls, and how long
  each woken task waited for a CPU.

Why a script on the host: busybox's awk in the guest has no floating-point formatting to
speak of, and the raw lines stay in the console log for other questions.
"""

import re
import statistics
import sys
from collections import defaultdict

WRAP_US = 4096 * 1_000_000  # usbmon's stamp: monotonic microseconds modulo 4096 s
HEADERS = 16 + 20  # the v2 mux header and the TCP header in front of every payload

# x86-64 system call numbers the daemons and the phone use on their data paths.
SYSCALLS = {0: "read", 1: "write", 7: "poll", 16: "ioctl", 20: "writev", 44: "sendto",
            45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 202: "futex", 208: "io_getevents",
            209: "io_submit", 228: "clock_gettime", 232: "epoll_wait", 233: "epoll_ctl",
            271: "ppoll", 281: "epoll_pwait", 284: "eventfd", 19: "readv", 17: "pread64",
            18: "pwrite64"}


def parse(path):
    """{(daemon, dir): {"mon": [...], "trace": [...]}} from the @@TL lines."""
    runs = defaultdict(lambda: {"mon": [], "trace": []})
    for line in open(path, errors="replace"):
        m = re.match(r"@@TL (\S+) (\S+) (mon|trace)\|(.*)", line.rstrip("\n"))
        if m:
            runs[(m.group(1), m.group(2))][m.group(3)].append(m.group(4))
    return runs


def mon_events(lines):
    """usbmon text lines -> dicts with t (µs, unwrapped later), kind S/C, ep 'Bo'/'Bi',
    length, and the mux/TCP fields when 32 data bytes were captured."""
    out = []
    for l in lines:
        f = l.split()
        if len(f) < 6 or f[2] not in ("S", "C"):
            continue
        addr = f[3]
        if not addr.startswith(("Bo:", "Bi:")):
            continue
        ev = {"t": int(f[1]), "kind": f[2], "ep": addr[:2], "len": int(f[5]) if f[5].lstrip("-").isdigit() else 0}
        if "=" in f:
            words = f[f.index("=") + 1 :]
            data = bytes.fromhex("".join(w for w in words if re.fullmatch(r"[0-9a-f]+", w)))
            if len(data) >= 32 and int.from_bytes(data[0:4], "big") == 6:
                # v2 mux header (16 bytes), then TCP: ports, seq, ack, offset, flags, window
                tcp = data[16:]
                ev["seq"] = int.from_bytes(tcp[4:8], "big")
                ev["ack"] = int.from_bytes(tcp[8:12], "big")
                ev["flags"] = tcp[13]
                ev["win"] = int.from_bytes(tcp[14:16], "big") << 8
                ev["mux_len"] = int.from_bytes(data[4:8], "big")
        out.append(ev)
    return out


def trace_events(lines):
    """ftrace lines -> dicts with t (µs), what, comm, and for gadget events ep/actual/length."""
    out = []
    for l in lines:
        m = re.match(r"\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)", l)
        if not m:
            continue
        comm, cpu, t, what, rest = m.group(1), m.group(3), float(m.group(4)), m.group(5), m.group(6)
        ev = {"t": int(round(t * 1e6)) % WRAP_US, "what": what, "comm": comm.strip(),
              "pid": m.group(2), "cpu": cpu, "raw": rest}
        g = re.match(r"(\S+): req (\S+) length (\d+)/(\d+)", rest)
        if g:
            ev["ep"] = "in" if "in" in g.group(1) else "out"
            ev["req"] = g.group(2)
            ev["actual"] = int(g.group(3))
            ev["length"] = int(g.group(4))
        s = re.search(r"next_comm=(\S+) next_pid=(\d+)", rest)
        if s:
            ev["next"], ev["next_pid"] = s.group(1), s.group(2)
        out.append(ev)
    return out


def unwrap(evs, base):
    """Stamps as signed microseconds from `base` (usbmon's wrap at 4096 s undone)."""
    for e in evs:
        d = (e["t"] - base) % WRAP_US
        e["t"] = d - WRAP_US if d > WRAP_US // 2 else d
    return evs


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def analyse(daemon, direction, run):
    mon = mon_events(run["mon"])
    tr = trace_events(run["trace"])
    if not mon:
        print(f"{daemon} {direction}: no usbmon lines")
        return
    base = mon[0]["t"]
    unwrap(mon, base)
    unwrap(tr, base)
    up = direction == "up"
    # Data goes OUT (Bo) on up, IN (Bi) on down; ACKs the other way.
    data_ep, ack_ep = ("Bo", "Bi") if up else ("Bi", "Bo")
    # Data packets as the sender hands them over (host: submission; phone: seen at completion,
    # its queueing is in the trace) and ACKs as the sender learns of them.
    data = [e for e in mon if e["ep"] == data_ep and "seq" in e and e["mux_len"] > HEADERS + 48
            and (e["kind"] == "S" if up else e["kind"] == "C")]
    acks = [e for e in mon if e["ep"] == ack_ep and "ack" in e
            and (e["kind"] == "C" if up else e["kind"] == "S")]
    if not data or not acks:
        print(f"{daemon} {direction}: no data or no ACKs found ({len(data)}, {len(acks)})")
        return
    t0, t1 = data[0]["t"], data[-1]["t"]
    payload = sum(e["mux_len"] - HEADERS for e in data)
    # The sender's view: bytes sent past the last ACK, against the last window.
    evs = sorted([(e["t"], 0, e) for e in data] + [(e["t"], 1, e) for e in acks], key=lambda x: (x[0], x[1]))
    snd_end = None
    ack = win = None
    closed_since = None
    closed_total = 0
    closed_spans = []
    for t, k, e in evs:
        if k == 0:
            snd_end = (e["seq"] + e["mux_len"] - HEADERS) & 0xFFFFFFFF
        else:
            ack, win = e["ack"], e["win"]
        if snd_end is None or ack is None:
            continue
        inflight = (snd_end - ack) & 0xFFFFFFFF
        full = inflight + 1024 > win  # less than 1 KiB of window left counts as closed
        if full and closed_since is None:
            closed_since = t
        elif not full and closed_since is not None:
            closed_spans.append(t - closed_since)
            closed_total += t - closed_since
            closed_since = None
    span = max(1, t1 - t0)
    print(f"== {daemon} {direction}: {payload / 1e6:.2f} MB of payload in {span / 1000:.1f} ms "
          f"({payload / span:.1f} MB/s between the first and last data transfer), "
          f"{len(data)} data transfers, {len(acks)} ACK-carrying transfers")
    print(f"   window closed {100 * closed_total / span:.0f} % of the time, "
          f"{len(closed_spans)} times, median {median(closed_spans):.0f} µs")
    # Stretches with no event at all on any CPU: everyone waiting for a timer, a task computing
    # without system calls (only the daemon's and the phone's are traced), or the whole guest
    # standing still (the emulator or its host) — the log around a gap tells which.
    stamps = sorted([e["t"] for e in tr if t0 <= e["t"] <= t1] + [e["t"] for e in mon if t0 <= e["t"] <= t1])
    silent = [b - a for a, b in zip(stamps, stamps[1:]) if b - a > 1000]
    print(f"   no event for over 1 ms: {len(silent)} times, {sum(silent) / 1000:.1f} ms in all "
          f"({100 * sum(silent) / span:.0f} % of the time)")
    # Gadget-side stamps: given back OUT (phone received data / ACK), IN queued by the phone.
    g_out_done = [e["t"] for e in tr if e["what"] == "usb_gadget_giveback_request" and e.get("ep") == "out" and e["actual"] > 0]
    g_in_queue = [(e["t"], e["length"]) for e in tr if e["what"] == "usb_ep_queue" and e.get("ep") == "in"]
    g_in_done = [(e["t"], e["actual"]) for e in tr if e["what"] == "usb_gadget_giveback_request" and e.get("ep") == "in"]
    # Host-side stamps: OUT submitted (all, and data only), IN and OUT completed.
    host_out = [e["t"] for e in mon if e["ep"] == "Bo" and e["kind"] == "S"]
    host_out_data = [e["t"] for e in mon if e["ep"] == "Bo" and e["kind"] == "S" and e["len"] > 200]
    host_c = {ep: [(e["t"], e["len"]) for e in mon if e["ep"] == ep and e["kind"] == "C"] for ep in ("Bo", "Bi")}

    def last_before(ts, t):
        best = None
        for x in ts:
            if x <= t:
                best = x
            else:
                break
        return best

    def first_after(ts, t):
        for x in ts:
            if x >= t:
                return x
        return None

    reactions = []  # (the sender learns of the ACK, the sender's next data)
    if up:
        # Phone: OUT data given back -> its next IN queued (the ACK); bus: -> IN given back;
        # host: IN completed -> next OUT submitted.
        phone, bus, host, whole = [], [], [], []
        for (tq, ln) in g_in_queue:
            if ln > 200:
                continue
            prev = last_before(g_out_done, tq)
            done = next((t for t, a in g_in_done if t >= tq), None)
            if prev is None or done is None:
                continue
            hc = next((t for t, l in host_c["Bi"] if t >= done - 5), None)
            # The next data transfer (not a ZLP ending an earlier one, nor a pure ACK).
            nxt = first_after(host_out_data, hc) if hc is not None else None
            if nxt is None:
                continue
            phone.append(tq - prev)
            bus.append(done - tq)
            host.append(nxt - hc)
            whole.append(nxt - prev)
            reactions.append((hc, nxt))
        # One endpoint completes in submission order.
        out_bus = [c - s for s, (c, _) in zip(host_out, host_c["Bo"])]
    else:
        # Host: IN data completed -> next OUT submitted (its ACK); bus: -> given back to the
        # phone; phone: OUT given back -> its next IN queued.
        phone, bus, host, whole = [], [], [], []
        in_data_done = [t for t, l in host_c["Bi"] if l > 200]
        phone_in_queued = [t for t, _ in g_in_queue]
        for t_s in host_out:
            prev = last_before(in_data_done, t_s)
            got = first_after(g_out_done, t_s)
            nxt = first_after(phone_in_queued, got) if got is not None else None
            if prev is None or got is None or nxt is None:
                continue
            host.append(t_s - prev)
            bus.append(got - t_s)
            phone.append(nxt - got)
            whole.append(nxt - prev)
            reactions.append((got, nxt))
        # Each data request from its queueing to its giveback (the same request; dummy_hcd
        # gives requests of up to 64 bytes back at once and sends a copy later, so only
        # larger ones say when the bus took them).
        out_bus = []
        queued_at = {}
        for e in tr:
            if e.get("ep") != "in" or e.get("length", 0) <= 64:
                continue
            if e["what"] == "usb_ep_queue":
                queued_at[e["req"]] = e["t"]
            elif e["what"] == "usb_gadget_giveback_request" and e["req"] in queued_at:
                out_bus.append(e["t"] - queued_at.pop(e["req"]))
    def row(name, xs):
        print(f"   {name:<58} median {median(xs):6.0f} µs  p90 {pct(xs, 0.9):6.0f}  n={len(xs)}")
    if up:
        row("phone: data given back -> ACK queued", phone)
        row("bus: ACK queued -> given back", bus)
        row("daemon: ACK completed -> next data submitted", host)
        row("data given back -> next data submitted (the ACK's loop)", whole)
        row("OUT URB submitted -> completed", out_bus)
    else:
        row("daemon: data completed -> ACK submitted", host)
        row("bus: ACK submitted -> given back to the phone", bus)
        row("phone: ACK given back -> next data queued", phone)
        row("data completed -> next data queued (the ACK's loop)", whole)
        row("IN request queued by the phone -> given back", out_bus)
        # Data moves only while the host has an IN transfer posted and the phone a request
        # queued: how long each side had how many (usbmon's submissions and completions, the
        # phone's requests of more than 64 bytes queued and given back).
        steps = sorted([(e["t"], 0, 1 if e["kind"] == "S" else -1) for e in mon if e["ep"] == "Bi"]
                       + [(e["t"], 1, 1 if e["what"] == "usb_ep_queue" else -1) for e in tr
                          if e.get("ep") == "in" and e.get("length", 0) > 64
                          and e["what"] in ("usb_ep_queue", "usb_gadget_giveback_request")])
        # usbmon starts with transfers already posted: count from the lowest level reached.
        level, lowest = 0, 0
        for _, side, d in steps:
            if side == 0:
                level += d
                lowest = min(lowest, level)
        counts, last = [-lowest, 0], None
        held = [defaultdict(int), defaultdict(int)]
        both = 0
        for t, side, d in steps:
            if last is not None and t0 <= t <= t1:
                dt = t - max(last, t0)
                held[0][counts[0]] += dt
                held[1][counts[1]] += dt
                both += dt if counts[0] > 0 and counts[1] > 0 else 0
            counts[side] += d
            last = t
        for name, h in (("host IN transfers posted", held[0]), ("phone IN requests queued", held[1])):
            total = max(1, sum(h.values()))
            print(f"   {name}: " + ", ".join(f"{k} for {100 * v / total:.0f} %" for k, v in sorted(h.items())))
        print(f"   both at once (data can move): {100 * both / span:.0f} % of the time")
    # Who ran: the share of switches-in per command (a rough picture of the wake-ups), and how
    # long each woken task waited for a CPU (woken -> switched in), by where it was sent: onto an
    # idle CPU (the emulated CPU comes out of its halt: the host must run its thread again),
    # onto a busy CPU while the other idled (the scheduler's placement), or with both busy.
    # A wake-up aimed at another CPU is stamped there, when that CPU takes the request
    # (`ttwu_queue`): the time the request took to arrive is not in these waits, it is in
    # "woken" of the sender's reaction below.
    ins = defaultdict(int)
    waits = defaultdict(list)
    wait_kind = defaultdict(lambda: defaultdict(int))
    woken = {}
    running = {}  # CPU -> pid running there ("0": idle)
    wakeups = defaultdict(list)  # comm -> stamps of its wake-ups
    switched_in = defaultdict(list)  # comm -> stamps of its switches in
    for e in tr:
        if e["what"] == "sched_switch" and "next_pid" in e:
            running[e["cpu"]] = e["next_pid"]
        if not t0 <= e["t"] <= t1:
            continue
        if e["what"] == "sched_wakeup":
            w = re.search(r"comm=(\S+) pid=(\d+).*target_cpu=(\d+)", e.get("raw", ""))
            if w:
                target = str(int(w.group(3))).zfill(len(e["cpu"]))
                others = [c for c in running if c != target]
                if running.get(target, "0") == "0":
                    kind = "onto an idle CPU"
                elif any(running[c] == "0" for c in others):
                    kind = "behind a task with the other CPU idle"
                else:
                    kind = "with both CPUs busy"
                woken.setdefault(w.group(2), (e["t"], w.group(1), kind))
                wakeups[w.group(1)].append(e["t"])
        elif e["what"] == "sched_switch":
            name = re.sub(r"/\d+$", "", e.get("next", "?"))
            ins[name] += 1
            switched_in[name].append(e["t"])
            if e.get("next_pid") in woken:
                t, comm, kind = woken.pop(e["next_pid"])
                waits[comm].append(e["t"] - t)
                wait_kind[comm][kind] += e["t"] - t
    # System calls of the daemon's and the phone's threads (the guest traces only theirs):
    # count and time inside the kernel per call, over the transfer.
    calls = defaultdict(lambda: defaultdict(list))
    entered = {}
    for e in tr:
        if e["what"] not in ("sys_enter", "sys_exit") or not t0 <= e["t"] <= t1:
            continue
        nr = re.match(r"NR (\d+)", e["raw"])
        if not nr:
            continue
        key = (e["comm"], e["pid"])
        if e["what"] == "sys_enter":
            entered[key] = (int(nr.group(1)), e["t"])
        elif key in entered:
            n, t = entered.pop(key)
            calls[e["comm"]][n].append(e["t"] - t)
    for comm, per in sorted(calls.items()):
        total = sum(sum(v) for v in per.values())
        count = sum(len(v) for v in per.values())
        top_calls = sorted(per.items(), key=lambda x: -sum(x[1]))[:7]
        print(f"   {comm} system calls: {count} ({count * 1e6 / max(1, payload) * 1.048576:.0f} per MiB), "
              f"{total / 1000:.1f} ms inside: " + ", ".join(
                  f"{SYSCALLS.get(n, n)} {len(v)}×{median(v):.0f}" for n, v in top_calls))
    # Time on a CPU of the traced tasks (the daemon's threads, the phone) over the transfer, and
    # how much of it went to softirqs that interrupted them: those count as the task's run time
    # (Debian's kernel has no irq time accounting), and dummy_hcd's timer (the HRTIMER softirq)
    # moves every transfer's bytes in one — the emulated bus's work, not the task's.
    traced = {e["pid"]: e["comm"] for e in tr if e["what"] in ("sys_enter", "softirq_entry")}
    on_cpu, soft, soft_timer = defaultdict(int), defaultdict(int), defaultdict(int)
    since, soft_since = {}, {}
    for e in tr:
        if e["what"] == "sched_switch":
            prev = re.search(r"prev_pid=(\d+)", e["raw"])
            if prev and prev.group(1) in since:
                start = since.pop(prev.group(1))
                on_cpu[traced[prev.group(1)]] += max(0, min(e["t"], t1) - max(start, t0))
            if e.get("next_pid") in traced:
                since[e["next_pid"]] = e["t"]
        elif e["what"] == "softirq_entry" and e["pid"] in traced:
            soft_since[e["pid"]] = (e["t"], "HRTIMER" in e["raw"])
        elif e["what"] == "softirq_exit" and e["pid"] in soft_since:
            start, timer = soft_since.pop(e["pid"])
            d = max(0, min(e["t"], t1) - max(start, t0))
            soft[traced[e["pid"]]] += d
            if timer:
                soft_timer[traced[e["pid"]]] += d
    mib = max(1, payload) / 1048576
    for comm in sorted(on_cpu):
        if on_cpu[comm] and any(e["what"] == "softirq_entry" for e in tr):
            own = on_cpu[comm] - soft[comm]
            print(f"   {comm} on a CPU {on_cpu[comm] / 1000:.1f} ms, of which softirqs {soft[comm] / 1000:.1f} ms "
                  f"(the hrtimer one, dummy_hcd's bus work among it: {soft_timer[comm] / 1000:.1f} ms); "
                  f"its own {own / 1000:.1f} ms = {own / mib / 1000:.2f} ms per MiB")
    top = sorted(ins.items(), key=lambda x: -x[1])[:8]
    print("   switches in, per command: " + ", ".join(f"{c} {n}" for c, n in top))
    # The sender's reaction to an ACK, split: until its thread is woken (the completion's
    # wake-up, sent to another CPU, arriving), until it runs, and its own work until the next
    # data (the reads of the client among it). The sender's thread is the one whose system call
    # submitted that data (the call in progress at the stamp).
    enters = [(e["t"], e["comm"], e["raw"]) for e in tr if e["what"] == "sys_enter"]
    exits = {}
    for e in tr:
        if e["what"] == "sys_exit":
            exits.setdefault(e["comm"], []).append(e["t"])
    split = defaultdict(list)
    who = defaultdict(int)
    for got, nxt in reactions:
        # The system call the stamp fell in: the last one entered before it and not left yet.
        comm = next((c for t, c, _ in reversed([x for x in enters if x[0] <= nxt])
                     if next((x for x in exits.get(c, []) if x >= t), nxt) >= nxt), None)
        if comm is None:
            continue
        who[comm] += 1
        w = next((t for t in wakeups.get(comm, []) if got <= t <= nxt), None)
        r = next((t for t in switched_in.get(comm, []) if w is not None and w <= t <= nxt), None)
        if w is None or r is None:
            split["awake already: ACK -> next data"].append(nxt - got)
            continue
        split["ACK -> thread woken"].append(w - got)
        split["woken -> running"].append(r - w)
        split["running -> next data"].append(nxt - r)
        reads = 0
        for t, c, raw in enters:
            if c == comm and r <= t <= nxt and re.match(r"NR (0|45|17|19|47) ", raw):
                out = next((x for x in exits.get(comm, []) if x >= t), t)
                reads += min(out, nxt) - t
        split["  of which in read or recvfrom"].append(reads)
    if split:
        sender = max(who, key=who.get)
        print(f"   the sender's reaction ({sender}; {len(split['ACK -> thread woken'])} asleep at the ACK, "
              f"{len(split['awake already: ACK -> next data'])} awake):")
        for name in ("ACK -> thread woken", "woken -> running", "running -> next data",
                     "  of which in read or recvfrom", "awake already: ACK -> next data"):
            if split[name]:
                row("  " + name, split[name])
    for comm, xs in sorted(waits.items(), key=lambda x: -sum(x[1]))[:5]:
        kinds = ", ".join(f"{v / 1000:.1f} ms {k}" for k, v in
                          sorted(wait_kind[comm].items(), key=lambda x: -x[1]))
        print(f"   {comm:<16} waited for a CPU {sum(xs) / 1000:6.1f} ms in all ({100 * sum(xs) / span:.0f} % of "
              f"the transfer: {kinds}), median {median(xs):.0f} µs, p90 {pct(xs, 0.9):.0f}, n={len(xs)}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = parse(sys.argv[1])
    if not runs:
        sys.exit("no @@TL lines (run with USB_VM_PROFILE=timeline)")
    for (daemon, direction), run in runs.items():
        analyse(daemon, direction, run)


if __name__ == "__main__":
    main()
