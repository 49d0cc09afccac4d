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

/// Starts our iproxy forwarding fresh local ports to `device_ports` (with `extra` options
/// first) and waits (bounded) until every local port listens. Tests run in parallel and a
/// free port can be taken between choosing and binding it: then iproxy exits and is started
/// again on other ports (at most 5 times). Returns iproxy and the local ports.
fn start_iproxy(
    d: &TestDaemon,
    extra: &[&str],
    device_ports: &[u16],
) -> Option<(ChildGuard, Vec<u16>)> {
    let bin = ours("iproxy")?;
    for _ in 0..5 {
        let ports = free_local_ports(device_ports.len()).expect("ports");
        let mut cmd = d.command(bin.to_str().expect("utf-8 path"));
        cmd.args(extra);
        for (l, r) in ports.iter().zip(device_ports) {
            cmd.arg(format!("{l}:{r}"));
        }
        let mut child = ChildGuard::spawn_captured(&mut cmd).expect("spawn iproxy");
        let up = poll_until(Duration::from_secs(10), || {
            if child.try_wait().ok().flatten().is_some() {
                return Some(false);
            }
            let listening = listening_tcp_ports(child.pid()).ok()?;
            ports.iter().all(|p| listening.contains(p)).then_some(true)
        });
        match up {
            Some(true) => return Some((child, ports)),
            Some(false) => continue, // lost a port race: try other ports
            None => panic!("iproxy did not listen: {}", child.stderr_text()),
        }
    }
    panic!("iproxy could not bind free ports five times");
}

#[test]
fn iproxy_three_pairs_sixteen_parallel_connections_each() {
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    d.wait_for_devices(&[&sim_udid(1)]);
    let Some((_iproxy, ports)) = start_iproxy(&d, &[], &[7, 7, 7]) else {
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
    // Bound to phone 2 by UDID.
    let udid2 = sim_udid(2);
    let Some((_iproxy, ports)) = start_iproxy(&d, &["-u", &udid2], &[7, 4242]) else {
        return;
    };
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

#[test]
fn inetcat_quiet_wait() {
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    d.wait_for_devices(&[&sim_udid(1)]);
    let Some(bin) = ours("inetcat") else { return };
    let bin = bin.to_str().expect("utf-8").to_owned();
    // -q -1: after its input ends it waits for the device to close. The phone's lockdown resets
    // a connection that announces a 2 MiB message: inetcat then ends, successfully.
    let mut cmd = d.command(&bin);
    cmd.args(["-q", "-1", "62078"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&(2u32 << 20).to_be_bytes())
        .expect("write");
    let t0 = std::time::Instant::now();
    let status = poll_until(Duration::from_secs(10), || child.try_wait().ok().flatten())
        .expect("inetcat ended");
    assert!(status.success());
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Default -q 1: echo keeps the connection open, so inetcat ends about a second after its
    // input, with every reply written.
    let mut cmd = d.command(&bin);
    cmd.arg("7").stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"last words")
        .expect("write");
    let t0 = std::time::Instant::now();
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out)
        .expect("read");
    let status = child.wait().expect("wait");
    assert!(status.success());
    assert_eq!(out, b"last words");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

/// Reads one lockdown message (4-byte big-endian length, then a plist) from `r`.
fn read_lockdown_reply(r: &mut impl Read) -> plist::Dictionary {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).expect("reply length");
    let len = u32::from_be_bytes(len) as usize;
    assert!(len < 1 << 20, "reply of {len} bytes");
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("reply body");
    plist::from_bytes(&body).expect("reply plist")
}

/// One framed lockdown request with `Request` = `name` and the given string fields.
fn lockdown_request(name: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut d = plist::Dictionary::new();
    d.insert("Label".into(), "usbmux-rs-test".into());
    d.insert("Request".into(), name.into());
    for (k, v) in fields {
        d.insert((*k).into(), (*v).into());
    }
    usbmux_sim::lockdown::frame_xml(&d).expect("frame")
}

/// Issue 5's real-client case 2 with our tools in place of ideviceinfo/idevice_id: lockdown's
/// values over `usbmuxctl connect` and `inetcat -u`, the configured ProductVersion exactly.
#[test]
fn lockdown_values_through_usbmuxctl_connect_and_inetcat() {
    let mut phone = PhoneConfig::simulated(2);
    phone.identity.lockdown.product_version = Some("17.5.1".into());
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1), phone]);
    d.wait_for_devices(&[&sim_udid(1), &sim_udid(2)]);
    let Some(ctl) = ours("usbmuxctl") else { return };
    let inetcat = ours("inetcat").expect("inetcat");
    let udid = sim_udid(2);
    for mut cmd in [
        {
            let mut c = d.command(ctl.to_str().expect("utf-8"));
            c.args(["connect", &udid, "62078"]);
            c
        },
        {
            let mut c = d.command(inetcat.to_str().expect("utf-8"));
            c.args(["-u", &udid, "62078"]);
            c
        },
    ] {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd).expect("spawn");
        // A reply that never comes (a tool holding it in a buffer) must fail the test, not
        // hang it: the watchdog kills the tool, and the read below sees EOF.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let (done, pid) = (done.clone(), child.pid().to_string());
            std::thread::spawn(move || {
                for _ in 0..300 {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid])
                    .status();
            })
        };
        let mut stdin = child.child().stdin.take().expect("stdin");
        let mut stdout = child.child().stdout.take().expect("stdout");
        stdin
            .write_all(&lockdown_request("QueryType", &[]))
            .expect("write");
        let r = read_lockdown_reply(&mut stdout);
        assert_eq!(
            r.get("Type").and_then(|v| v.as_string()),
            Some("com.apple.mobile.lockdown")
        );
        for (key, want) in [
            ("ProductVersion", "17.5.1"),
            ("DeviceName", "Simulated iPhone 2"),
            ("UniqueDeviceID", udid.as_str()),
        ] {
            stdin
                .write_all(&lockdown_request("GetValue", &[("Key", key)]))
                .expect("write");
            let r = read_lockdown_reply(&mut stdout);
            assert_eq!(r.get("Key").and_then(|v| v.as_string()), Some(key));
            assert_eq!(
                r.get("Value").and_then(|v| v.as_string()),
                Some(want),
                "{key}: {r:?}"
            );
        }
        // Pairing is refused as by a locked phone (ideviceinfo's "Password protected").
        stdin
            .write_all(&lockdown_request("Pair", &[]))
            .expect("write");
        let r = read_lockdown_reply(&mut stdout);
        assert_eq!(
            r.get("Error").and_then(|v| v.as_string()),
            Some("PasswordProtected")
        );
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watchdog.join().expect("watchdog");
    }
}
