//! Row 6: many idle connections over 16 phones served out of process (`usbmux-sim serve`), so
//! the daemon's memory and descriptors are its own: resident memory (VmRSS now, VmHWM peak) and
//! open fds of the daemon with all connections open, against the same daemon with the phones
//! and no connection (the baseline); time to open them all, one after the other from one
//! client. Every 97th connection then echoes a byte, to show they are alive.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::daemon::{Rig, ECHO};
use crate::util::{fd_count, raise_nofile, status_kb, Row};

const PHONES: usize = 16;
const TARGET_CONNS: usize = 10_000;
const TARGET_MB: f64 = 300.0;

/// Row 6.
pub fn run(quick: bool, rows: &mut Vec<Row>) {
    let want = if quick { 2_000 } else { TARGET_CONNS };
    let limit = raise_nofile();
    // This process holds one socket per connection, the daemon one more.
    let n = want.min(limit.saturating_sub(200) as usize);
    if n < want {
        eprintln!("bench: open-file limit {limit}: {n} connections instead of {want}");
    }
    let rig = Rig::start(PHONES, true);
    let pid = rig.daemon.pid();
    let client = rig.client();
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = status_kb(pid, "VmRSS").unwrap_or(0);
    let fds0 = fd_count(pid);
    println!(
        "scale: {n} connections over {PHONES} phones (daemon at {rss0} kB RSS, {fds0} fds before)"
    );
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for k in 0..n {
        match client.connect(rig.devices[k % PHONES], ECHO) {
            Ok(s) => conns.push(s),
            Err(e) => {
                eprintln!("bench: scale: connection {k} failed: {e}");
                break;
            }
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss = status_kb(pid, "VmRSS").unwrap_or(0);
    let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
    let fds = fd_count(pid);
    let mut alive = 0;
    let mut probed = 0;
    for s in conns.iter_mut().step_by(97) {
        probed += 1;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut b = [7u8];
        if s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() && b[0] == 7 {
            alive += 1;
        }
    }
    let opened = conns.len();
    drop(conns);
    let mb = rss as f64 / 1024.0;
    let per_conn = (rss.saturating_sub(rss0)) as f64 * 1024.0 / opened.max(1) as f64;
    let projected = (rss0 as f64 * 1024.0 + per_conn * TARGET_CONNS as f64) / (1 << 20) as f64;
    rows.push(Row::new(
        "scale",
        format!("connections open (of {n}); alive of {probed} probed: {alive}"),
        opened as f64,
        "conns",
    ));
    rows.push(
        Row::new(
            "scale",
            format!("daemon VmRSS with {opened} idle connections"),
            mb,
            "MiB",
        )
        .baseline(
            "daemon with the phones, no connection",
            rss0 as f64 / 1024.0,
        ),
    );
    rows.push(Row::new(
        "scale",
        "daemon VmHWM (peak RSS)",
        hwm as f64 / 1024.0,
        "MiB",
    ));
    rows.push(
        Row::new("scale", "daemon RSS per connection", per_conn, "bytes").target(
            format!("≤ {TARGET_MB} MB at {TARGET_CONNS} (projected: {projected:.0} MiB)"),
            projected * 1.048_576 <= TARGET_MB,
        ),
    );
    rows.push(
        Row::new("scale", "daemon open fds", fds as f64, "fds").baseline("before", fds0 as f64),
    );
    rows.push(Row::new(
        "scale",
        format!("time to open {opened} connections, one client, one after the other"),
        open_secs,
        "s",
    ));
}
