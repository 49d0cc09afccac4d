//! The out-of-process phone: `Server` on Unix seqpacket sockets, driven by a host `Session` over
//! `SimLink` — identity, handshake and echo through DATA/ZLP frames, unplug and replug, garbage,
//! several phones, socket file handling, and the `serve` command of the built binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{connect_retry, pattern, Daemon, TempDir};
use usbmux_core::Event;
use usbmux_sim::service::{ECHO, SOURCE};
use usbmux_sim::socket::{
    LinkError, Received, ServeError, Server, SimLink, MSG_DATA, MSG_IDENTITY, RECV_BUFFER_LEN,
};
use usbmux_sim::{Identity, PhoneConfig};

const T: Duration = Duration::from_secs(10);

fn serve(dir: &TempDir, n: u32) -> (usbmux_sim::socket::RunningServer, Vec<std::path::PathBuf>) {
    let phones: Vec<_> = (1..=n)
        .map(|k| {
            (
                dir.path(&format!("phone{k}.sock")),
                PhoneConfig::simulated(k),
            )
        })
        .collect();
    let paths = phones.iter().map(|(p, _)| p.clone()).collect();
    let server = Server::bind(phones).expect("bind").spawn().expect("spawn");
    (server, paths)
}

/// Waits until the server closes the link (it answers a protocol error that way).
fn expect_unplug(link: &mut SimLink) {
    let deadline = std::time::Instant::now() + T;
    loop {
        assert!(std::time::Instant::now() < deadline, "server kept the link");
        match link.recv(Some(Duration::from_millis(100))) {
            Ok(Some(Received::Unplug)) => return,
            Ok(_) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}

#[test]
fn identity_handshake_and_echo() {
    let dir = TempDir::new("echo");
    let (server, paths) = serve(&dir, 1);
    let (id, link) = SimLink::connect(&paths[0], T).expect("connect");
    assert_eq!(id, Identity::simulated(1));
    let mut d = Daemon::new(link, id.max_packet_size);
    d.handshake();
    let c = d.connect(ECHO, 256 * 1024);
    // 476 + 36 = 512: packets that need ZLPs, then a large write cut into 48 KiB packets.
    for data in [pattern(476, 1), pattern(300_000, 2)] {
        let back = d.echo(c, &data, T);
        assert!(
            back == data,
            "echo differs: {} of {} bytes",
            back.len(),
            data.len()
        );
    }
    assert!(
        !d.events
            .iter()
            .any(|e| matches!(e, Event::DeviceMessage(_))),
        "{:?}",
        d.events
    );
    server.stop();
    assert!(!paths[0].exists(), "socket file removed on stop");
}

#[test]
fn missing_zlp_over_the_socket_is_reported() {
    let dir = TempDir::new("nozlp");
    let (server, paths) = serve(&dir, 1);
    let (_, link) = SimLink::connect(&paths[0], T).expect("connect");
    let mut d = Daemon::new(link, 512);
    d.handshake();
    let c = d.connect(ECHO, 64 * 1024);
    // Hand-made: queue 476 bytes, take the 512-byte packet and send it without its ZLP.
    d.host.send(c, &pattern(476, 3)).expect("send");
    let mut buf = vec![0u8; 65536];
    let t = d
        .host
        .poll_transmit(d.now(), &mut buf)
        .expect("transmit")
        .expect("a packet");
    assert_eq!((t.len, t.zlp), (512, true));
    d.link.send_transfer(&buf[..t.len]).expect("send");
    d.host.send(c, b"tail").expect("send");
    let ok = d.run_until(T, |d| {
        d.events.iter().any(|e| match e {
            Event::DeviceMessage(m) => {
                String::from_utf8_lossy(m.text()).contains("message size mismatch")
            }
            _ => false,
        })
    });
    assert!(ok, "no CONTROL error: {:?}", d.events);
    server.stop();
}

#[test]
fn unplug_and_reconnect_gives_a_fresh_phone() {
    let dir = TempDir::new("replug");
    let (server, paths) = serve(&dir, 1);
    for round in 0..3 {
        let (id, link) = SimLink::connect(&paths[0], T).expect("connect");
        assert_eq!(id.udid, Identity::simulated(1).udid);
        let mut d = Daemon::new(link, 512);
        d.handshake();
        let c = d.connect(ECHO, 64 * 1024);
        let data = pattern(1000, round);
        assert!(d.echo(c, &data, T) == data);
        match round {
            // Explicit UNPLUG, abrupt close, and a close in the middle of a transfer.
            0 => d.link.send_unplug().expect("unplug"),
            1 => {}
            _ => d
                .link
                .send_transfer(&[0u8; 512])
                .expect("an undelimited transfer"),
        }
        if round == 0 {
            assert!(matches!(d.link.send_zlp(), Err(LinkError::Unplugged)));
        }
    }
    server.stop();
}

#[test]
fn server_unplug_reaches_the_daemon() {
    let dir = TempDir::new("stop");
    let (server, paths) = serve(&dir, 1);
    let (_, mut link) = SimLink::connect(&paths[0], T).expect("connect");
    server.stop();
    expect_unplug(&mut link);
    assert!(matches!(
        link.recv(Some(Duration::ZERO)),
        Err(LinkError::Unplugged)
    ));
}

#[test]
fn garbage_does_not_kill_the_server() {
    let dir = TempDir::new("garbage");
    let (server, paths) = serve(&dir, 1);
    let too_big = vec![MSG_DATA; RECV_BUFFER_LEN];
    let garbage: [&[u8]; 6] = [
        &[0x77, 1, 2, 3],
        &[MSG_DATA],
        &[0x03, 0],
        &[0x04, 1, 2],
        &[MSG_IDENTITY, 1, 0],
        &too_big,
    ];
    for g in garbage {
        let (_, mut link) = SimLink::connect(&paths[0], T).expect("connect");
        link.send_raw(g).expect("send garbage");
        expect_unplug(&mut link);
    }
    // And the phone still works for a well-behaved daemon.
    let (_, link) = SimLink::connect(&paths[0], T).expect("connect");
    let mut d = Daemon::new(link, 512);
    d.handshake();
    server.stop();
}

#[test]
fn several_phones_at_once() {
    let dir = TempDir::new("many");
    let (server, paths) = serve(&dir, 3);
    let mut daemons: Vec<Daemon> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (id, link) = SimLink::connect(p, T).expect("connect");
            assert_eq!(id, Identity::simulated(i as u32 + 1));
            Daemon::new(link, 512)
        })
        .collect();
    for d in daemons.iter_mut() {
        d.handshake();
    }
    let ids: Vec<_> = daemons
        .iter_mut()
        .map(|d| d.connect(ECHO, 64 * 1024))
        .collect();
    for (k, (d, c)) in daemons.iter_mut().zip(ids).enumerate() {
        let data = pattern(5000 + k, k as u32);
        assert!(d.echo(c, &data, T) == data, "phone {}", k + 1);
    }
    server.stop();
}

#[test]
fn source_through_a_small_window_uses_timers() {
    let dir = TempDir::new("source");
    let (server, paths) = serve(&dir, 1);
    let (_, link) = SimLink::connect(&paths[0], T).expect("connect");
    let mut d = Daemon::new(link, 512);
    d.handshake();
    let c = d.connect(SOURCE, 16 * 1024);
    let mut got = 0u64;
    let mut buf = vec![0u8; 4096];
    let ok = d.run_until(Duration::from_secs(20), |d| {
        while let Ok(n) = d.host.recv(c, &mut buf) {
            if n == 0 {
                break;
            }
            for (i, &b) in buf[..n].iter().enumerate() {
                assert_eq!(b, usbmux_sim::service::source_byte(got + i as u64));
            }
            got += n as u64;
        }
        got >= 512 * 1024
    });
    assert!(ok, "only {got} bytes from the source");
    server.stop();
}

#[test]
fn socket_files() {
    let dir = TempDir::new("files");
    let path = dir.path("p.sock");
    // A stale socket file (nobody listening) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).expect("stale");
    drop(stale);
    assert!(path.exists());
    let server = Server::bind([(path.clone(), PhoneConfig::simulated(1))])
        .expect("replaces a stale socket")
        .spawn()
        .expect("spawn");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A live one is not.
    assert!(matches!(
        Server::bind([(path.clone(), PhoneConfig::simulated(1))]),
        Err(ServeError::InUse(_))
    ));
    server.stop();
    // Nor is a regular file.
    let file = dir.path("f");
    std::fs::write(&file, b"keep me").expect("write");
    assert!(matches!(
        Server::bind([(file.clone(), PhoneConfig::simulated(1))]),
        Err(ServeError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
    // No paths, a bad identity.
    assert!(matches!(
        Server::bind(Vec::<(std::path::PathBuf, PhoneConfig)>::new()),
        Err(ServeError::NoPhones)
    ));
    let mut bad = PhoneConfig::simulated(1);
    bad.identity.udid = "nope".into();
    assert!(matches!(
        Server::bind([(dir.path("b.sock"), bad)]),
        Err(ServeError::BadIdentity { .. })
    ));
    // Nothing there: a connect fails fast.
    assert!(matches!(
        SimLink::connect(&dir.path("none.sock"), T),
        Err(LinkError::Io(_))
    ));
}

/// Kills the spawned binary (by its handle) however the test ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_serves() {
    let dir = TempDir::new("bin");
    let a = dir.path("a.sock");
    let b = dir.path("b.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_usbmux-sim"))
        .args(["serve", "--quiet"])
        .arg(&a)
        .arg(&b)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn usbmux-sim");
    let _kill = Kill(child);
    let (id, link) = connect_retry(&b, T);
    assert_eq!(id, Identity::simulated(2));
    let mut d = Daemon::new(link, 512);
    d.handshake();
    let c = d.connect(ECHO, 64 * 1024);
    let data = pattern(2048 - 36, 9);
    assert!(d.echo(c, &data, T) == data);
}

#[test]
fn the_binary_takes_a_config() {
    let dir = TempDir::new("cfg");
    let cfg = dir.path("phones.toml");
    std::fs::write(
        &cfg,
        "[[phone]]\nudid = \"0123456789abcdef0123456789abcdef01234567\"\nmax_packet_size = 1024\n",
    )
    .expect("write config");
    let a = dir.path("a.sock");
    let b = dir.path("b.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_usbmux-sim"))
        .args(["serve", "--quiet", "--config"])
        .arg(&cfg)
        .arg(&a)
        .arg(&b)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn usbmux-sim");
    let _kill = Kill(child);
    let (id, link) = connect_retry(&a, T);
    assert_eq!(id.udid, "0123456789abcdef0123456789abcdef01234567");
    assert_eq!(id.max_packet_size, 1024);
    let mut d = Daemon::new(link, 1024);
    d.handshake();
    let c = d.connect(ECHO, 64 * 1024);
    let data = pattern(3 * 1024 - 36, 4);
    assert!(d.echo(c, &data, T) == data);
    let (id, _) = connect_retry(&b, T);
    assert_eq!(id, Identity::simulated(2));

    // More phones in the file than paths, or a bad file: the command fails at once.
    std::fs::write(&cfg, "count = 3\n").expect("write config");
    let o = Command::new(env!("CARGO_BIN_EXE_usbmux-sim"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg(dir.path("c.sock"))
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 phones"));
    std::fs::write(&cfg, "nonsense = [").expect("write config");
    let o = Command::new(env!("CARGO_BIN_EXE_usbmux-sim"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg(dir.path("c.sock"))
        .output()
        .expect("run");
    assert!(!o.status.success());
}
