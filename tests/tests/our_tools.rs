//! Our `iproxy`, `inetcat` and `usbmuxctl` against our daemon with simulated phones: real
//! processes, real sockets, bytes checked (SHA-256 or byte-exact).
//!
//! The binaries are found beside `usbmuxd` (`cargo test --workspace` builds them all).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use usbmux_sim::PhoneConfig;
use usbmux_tests::daemon::{sim_udid, TestDaemon};
use usbmux_tests::net::{connect_local, free_local_ports, pattern, poll_until, round_trip};
use usbmux_tests::tools::{listening_tcp_ports, run_tool, usbmuxd_binary, ChildGuard};

/// Connects to a port whose connection iproxy is expected to end at once; true if it ended
/// (EOF or reset — also a reset that wins the race against setting up the socket).
fn ended_at_once(port: u16) -> bool {
    match connect_local(port) {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(mut s) => {
            let mut buf = [0u8; 16];
            matches!(s.read(&mut buf), Ok(0) | Err(_))
        }
    }
}

/// One of our tools, built beside usbmuxd.
fn ours(name: &str) -> Option<PathBuf> {
    let p = usbmuxd_binary()?.with_file_name(name);
    assert!(p.exists(), "{} is not built", p.display());
    Some(p)
}

/// Starts our iproxy with `pairs` and waits (bounded) until every local port listens.
fn start_iproxy(d: &TestDaemon, pairs: &[(u16, u16)]) -> Option<ChildGuard> {
    let bin = ours("iproxy")?;
    let mut cmd = d.command(bin.to_str().expect("utf-8 path"));
    for (l, r) in pairs {
        cmd.arg(format!("{l}:{r}"));
    }
    let child = ChildGuard::spawn_captured(&mut cmd).expect("spawn iproxy");
    let want: Vec<u16> = pairs.iter().map(|p| p.0).collect();
    let up = poll_until(Duration::from_secs(10), || {
        let ports = listening_tcp_ports(child.pid()).ok()?;
        want.iter().all(|p| ports.contains(p)).then_some(())
    });
    assert!(
        up.is_some(),
        "iproxy did not listen: {}",
        child.stderr_text()
    );
    Some(child)
}

#[test]
fn iproxy_three_pairs_sixteen_parallel_connections_each() {
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    d.wait_for_devices(&[&sim_udid(1)]);
    let ports = free_local_ports(3).expect("ports");
    let Some(_iproxy) = start_iproxy(&d, &[(ports[0], 7), (ports[1], 7), (ports[2], 7)]) else {
        return;
    };
    // 3 pairs × 16 connections, 8 MiB each through echo, SHA-256 compared.
    std::thread::scope(|s| {
        for (pi, &port) in ports.iter().enumerate() {
            for c in 0..16 {
                s.spawn(move || {
                    let data = pattern((pi * 16 + c) as u64, 8 << 20);
                    let conn = connect_local(port).expect("connect");
                    let back =
                        round_trip(conn.try_clone().expect("clone"), conn, &data, data.len())
                            .expect("echo");
                    assert_eq!(
                        Sha256::digest(&back),
                        Sha256::digest(&data),
                        "pair {pi} connection {c}"
                    );
                });
            }
        }
    });
}

#[test]
fn iproxy_refusal_and_unplug_keep_it_serving() {
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1), PhoneConfig::simulated(2)]);
    d.wait_for_devices(&[&sim_udid(1), &sim_udid(2)]);
    let ports = free_local_ports(2).expect("ports");
    let bin = match ours("iproxy") {
        Some(b) => b,
        None => return,
    };
    // Bound to phone 2 by UDID.
    let mut cmd = d.command(bin.to_str().expect("utf-8"));
    cmd.args(["-u", &sim_udid(2)])
        .arg(format!("{}:7", ports[0]))
        .arg(format!("{}:4242", ports[1]));
    let iproxy = ChildGuard::spawn_captured(&mut cmd).expect("spawn");
    assert!(poll_until(Duration::from_secs(10), || listening_tcp_ports(
        iproxy.pid()
    )
    .ok()
    .filter(|p| p.contains(&ports[0]) && p.contains(&ports[1])))
    .is_some());
    // Only loopback: nothing listens on another address.
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let hex = format!(":{:04X} ", ports[0]);
    for line in tcp
        .lines()
        .filter(|l| l.contains(&hex) && l.contains(" 0A "))
    {
        assert!(
            line.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.starts_with("0100007F")),
            "{line}"
        );
    }
    // Refused port: the local connection ends at once, with a reset.
    assert!(ended_at_once(ports[1]));
    // An open echo connection, then phone 2 is unplugged under it: the connection ends.
    let conn = connect_local(ports[0]).expect("connect");
    let data = pattern(9, 100_000);
    let back = round_trip(
        conn.try_clone().expect("clone"),
        conn.try_clone().expect("clone"),
        &data,
        data.len(),
    )
    .expect("echo");
    assert!(back == data);
    d.detach(&sim_udid(2));
    let mut c = conn;
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    // iproxy keeps running; with phone 2 gone a new connection is closed (no device)...
    assert!(ended_at_once(ports[0]));
    // ...and works again when it is back (a new DeviceID, looked up per connection).
    d.attach(PhoneConfig::simulated(2));
    d.wait_for_devices(&[&sim_udid(1), &sim_udid(2)]);
    let conn = connect_local(ports[0]).expect("connect");
    let back = round_trip(conn.try_clone().expect("clone"), conn, &data, data.len())
        .expect("echo after replug");
    assert!(back == data);
}

#[test]
fn inetcat_pipes_32_mib_through_echo() {
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    d.wait_for_devices(&[&sim_udid(1)]);
    let Some(bin) = ours("inetcat") else { return };
    let mut cmd = d.command(bin.to_str().expect("utf-8"));
    cmd.arg("7").stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn inetcat");
    let data = pattern(5, 32 << 20);
    let mut stdin = child.stdin.take().expect("stdin");
    let d2 = data.clone();
    // Our inetcat does not lose data at its stdin's end: close it right after writing.
    let writer = std::thread::spawn(move || stdin.write_all(&d2));
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out)
        .expect("read");
    writer.join().expect("writer").expect("write");
    let status = child.wait().expect("wait");
    assert!(status.success());
    assert_eq!(out.len(), data.len());
    assert!(out == data);
    // A refused port: non-zero with a message.
    let out = run_tool(d.command(bin.to_str().expect("utf-8")).arg("4242"));
    assert_ne!(out.code(), Some(0));
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
}

#[test]
fn usbmuxctl_list_listen_buid_pair_records() {
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    d.wait_for_devices(&[&sim_udid(1)]);
    let Some(bin) = ours("usbmuxctl") else { return };
    let bin = bin.to_str().expect("utf-8").to_owned();
    let out = run_tool(d.command(&bin).args(["list", "--json"]));
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(v[0]["udid"], sim_udid(1));
    assert_eq!(v[0]["product_id"], 0x12a8);
    assert_eq!(v[0]["connection_type"], "USB");
    let buid = run_tool(d.command(&bin).arg("buid"));
    assert_eq!(buid.code(), Some(0));
    let conf =
        plist::Value::from_file(d.config_dir().join("SystemConfiguration.plist")).expect("conf");
    assert_eq!(
        Some(buid.stdout.trim()),
        conf.as_dictionary()
            .and_then(|c| c.get("SystemBUID"))
            .and_then(|b| b.as_string())
    );
    // listen --json: attached now, detached on unplug (with the remembered UDID).
    let mut cmd = d.command(&bin);
    cmd.args(["listen", "--json"]);
    let listen = ChildGuard::spawn_captured(&mut cmd).expect("spawn");
    assert!(listen.wait_for_output(Duration::from_secs(10), |o, _| o.contains("\"attached\"")));
    d.detach(&sim_udid(1));
    assert!(listen.wait_for_output(Duration::from_secs(10), |o, _| o.contains("\"detached\"")));
    let lines: Vec<serde_json::Value> = listen
        .stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines[1]["event"], "detached");
    assert_eq!(lines[1]["udid"], sim_udid(1));
    // Pair records: save from a file, read back, delete, read → not found.
    let dir = tempfile::tempdir().expect("dir");
    let rec = dir.path().join("rec.plist");
    std::fs::write(&rec, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict><key>HostID</key><string>X</string></dict></plist>\n").expect("write");
    let udid = sim_udid(1);
    assert_eq!(
        run_tool(
            d.command(&bin)
                .args(["pair-record", "save", &udid])
                .arg(&rec)
        )
        .code(),
        Some(0)
    );
    let read = run_tool(d.command(&bin).args(["pair-record", "read", &udid]));
    assert!(
        read.stdout.contains("<string>X</string>"),
        "{}",
        read.stdout
    );
    assert_eq!(
        run_tool(d.command(&bin).args(["pair-record", "delete", &udid])).code(),
        Some(0)
    );
    let gone = run_tool(d.command(&bin).args(["pair-record", "read", &udid]));
    assert_ne!(gone.code(), Some(0));
    assert!(
        gone.stderr.contains("no such pair record"),
        "{}",
        gone.stderr
    );
    let bad = run_tool(
        d.command(&bin)
            .args(["pair-record", "read", "../../etc/passwd"]),
    );
    assert_ne!(bad.code(), Some(0));
}
