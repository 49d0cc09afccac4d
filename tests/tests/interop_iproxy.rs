//! Interoperability with Debian 12's libusbmuxd-tools 2.0.2: `iproxy` (local TCP ports forwarded
//! to device ports) and `inetcat` (stdin/stdout to a device port), run against our in-process
//! daemon with simulated phones (`shared/PROTOCOL.md` §4). The phones serve 7 echo and 1999
//! digest (8-byte big-endian length N, N bytes → their 32-byte SHA-256); 4242 is refused.
//!
//! Two bugs of these tool versions shape the tests. Both are the tools', not the daemon's: they
//! were seen with strace against our daemon and match libusbmuxd's `tools/iproxy.c` and
//! `tools/inetcat.c`, and the same tools would hit them with any usbmuxd.
//!
//! - **iproxy** relays each connection in a thread with `select(usbmux_fd + 1, {local_fd,
//!   usbmux_fd})`, so when the usbmuxd socket gets a lower descriptor number than the accepted
//!   local socket — which happens when another connection's thread closed a descriptor in
//!   between — the local socket is never watched and that connection is dead one way. Tests
//!   therefore open their iproxy connections one after the other, each checked with a round
//!   trip, detect readiness without probe connections ([`listening_tcp_ports`]), and only then
//!   move data on several connections at once.
//! - **inetcat** and, after 1 s, **iproxy** drop data when their non-blocking usbmuxd socket is
//!   full (see [`paced_round_trip`]): echo writers keep a bounded amount in flight.

use std::io::Read;
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use usbmux_sim::PhoneConfig;
use usbmux_tests::daemon::{sim_udid, TestDaemon};
use usbmux_tests::net::{
    connect_local, free_local_ports, paced_round_trip, pattern, poll_until, read_until_closed,
    round_trip, IO_TIMEOUT,
};
use usbmux_tests::tools::{listening_tcp_ports, require_tool, ChildGuard};

const TOOLS: &str = "libusbmuxd-tools";
const ECHO: u16 = 7;
const DIGEST: u16 = 1999;
const REFUSED: u16 = 4242;
const MIB: usize = 1 << 20;
/// Bytes an echo writer keeps in flight through iproxy (see the module docs).
const IPROXY_WINDOW: usize = 256 * 1024;
/// Bytes the writer keeps in flight through inetcat: far below its usbmuxd socket's buffer.
const INETCAT_WINDOW: usize = 64 * 1024;

/// A running `iproxy LOCAL:DEVICE ...` and the local ports it listens on, in the order of the
/// device ports it was given.
struct Iproxy {
    tool: ChildGuard,
    ports: Vec<u16>,
}

/// Starts one iproxy process forwarding a fresh local port to each of `device_ports` (2.0.2
/// takes up to 16 `LOCAL_PORT:DEVICE_PORT` pairs, see `iproxy --help`) on the phone `udid`.
///
/// The local ports are picked free a moment before iproxy binds them; if another process wins
/// one of them, iproxy exits ("Error creating socket for listen port") and this retries with
/// new ports. Readiness is read from /proc (iproxy buffers its stdout when it is a pipe).
fn start_iproxy(d: &TestDaemon, udid: &str, device_ports: &[u16]) -> Iproxy {
    for _attempt in 0..5 {
        let ports = free_local_ports(device_ports.len()).expect("free local ports");
        let mut cmd = d.command("iproxy");
        cmd.args(["-u", udid]);
        for (local, device) in ports.iter().zip(device_ports) {
            cmd.arg(format!("{local}:{device}"));
        }
        let mut tool = ChildGuard::spawn_captured(&mut cmd).expect("spawn iproxy");
        let mut want = ports.clone();
        want.sort_unstable();
        let ready = poll_until(Duration::from_secs(10), || {
            if !matches!(tool.try_wait(), Ok(None)) {
                return Some(false);
            }
            let listening = listening_tcp_ports(tool.pid()).unwrap_or_default();
            want.iter().all(|p| listening.contains(p)).then_some(true)
        });
        match ready {
            Some(true) => return Iproxy { tool, ports },
            Some(false) => eprintln!(
                "iproxy on {ports:?} exited ({}), retrying",
                tool.stderr_text()
            ),
            None => panic!("iproxy never listened on {ports:?}: {}", tool.stderr_text()),
        }
    }
    panic!("could not start iproxy on free local ports");
}

/// A connection through iproxy to the echo service, checked with a 1-byte round trip (so
/// iproxy's relay thread for it is running before the next connection is opened).
fn echo_connection(port: u16) -> TcpStream {
    let stream = connect_local(port).expect("connect to iproxy (echo)");
    let back = round_trip(&stream, &stream, b"!", 1).expect("first echo byte");
    assert_eq!(back, b"!");
    stream
}

/// A connection through iproxy to the digest service, checked with an empty request.
fn digest_connection(port: u16) -> TcpStream {
    let stream = connect_local(port).expect("connect to iproxy (digest)");
    assert_eq!(
        digest_request(&stream, &[]),
        <[u8; 32]>::from(Sha256::digest([]))
    );
    stream
}

/// Sends `data` as one digest request on `stream` and returns the 32-byte answer; the payload
/// is written from a second thread while the answer is awaited.
fn digest_request(stream: &TcpStream, data: &[u8]) -> [u8; 32] {
    let mut request = Vec::with_capacity(8 + data.len());
    request.extend_from_slice(&(data.len() as u64).to_be_bytes());
    request.extend_from_slice(data);
    let back = round_trip(stream, stream, &request, 32).expect("digest round trip");
    back.try_into().expect("32 bytes")
}

/// Echoes `data` through `stream` with [`IPROXY_WINDOW`] in flight.
fn echo_through(stream: &TcpStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream;
    paced_round_trip(stream, &mut writer, data, IPROXY_WINDOW).expect("echo round trip")
}

#[test]
fn iproxy_forwards_32_mib_through_digest_and_echo_on_one_process() {
    if !require_tool("iproxy", TOOLS) {
        return;
    }
    let udid = sim_udid(1);
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    d.wait_for_devices(&[&udid]);
    let proxy = start_iproxy(&d, &udid, &[DIGEST, ECHO]);
    let digest_stream = digest_connection(proxy.ports[0]);
    let echo_stream = echo_connection(proxy.ports[1]);

    let started = Instant::now();
    std::thread::scope(|s| {
        // 32 MiB through the digest service: the phone's SHA-256 must equal ours. (iproxy waits
        // for its usbmuxd socket to be writable before each send, and the digest service never
        // stops reading, so this direction needs no pacing.)
        let digest = s.spawn(|| {
            let data = pattern(1999, 32 * MIB);
            let got = digest_request(&digest_stream, &data);
            assert_eq!(
                got,
                <[u8; 32]>::from(Sha256::digest(&data)),
                "SHA-256 of 32 MiB"
            );
            // The service takes request after request on one connection.
            let small = pattern(2, 1000);
            assert_eq!(
                digest_request(&digest_stream, &small),
                <[u8; 32]>::from(Sha256::digest(&small))
            );
        });
        // Meanwhile, through the second pair of the same iproxy process: 1 MiB through echo.
        let data = pattern(7, MIB);
        assert!(
            echo_through(&echo_stream, &data) == data,
            "echo through the second pair came back different"
        );
        digest.join().expect("digest thread");
    });
    eprintln!(
        "32 MiB digest + 1 MiB echo through iproxy: {:?}",
        started.elapsed()
    );
    drop(proxy);
}

#[test]
fn iproxy_parallel_echo_and_refused_port() {
    if !require_tool("iproxy", TOOLS) {
        return;
    }
    let udid = sim_udid(1);
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1), PhoneConfig::simulated(2)]);
    d.wait_for_devices(&[&udid, &sim_udid(2)]);
    let mut proxy = start_iproxy(&d, &udid, &[ECHO, REFUSED]);
    let (echo_port, refused_port) = (proxy.ports[0], proxy.ports[1]);

    // 8 connections at once, 1 MiB each, each with its own data: every byte back, in order.
    // (Opened one by one: see the module docs.)
    let streams: Vec<TcpStream> = (0..8).map(|_| echo_connection(echo_port)).collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, stream)| {
                s.spawn(move || {
                    let data = pattern(100 + i as u64, MIB);
                    assert!(
                        echo_through(stream, &data) == data,
                        "echo connection {i} came back different"
                    );
                })
            })
            .collect();
        for w in workers {
            w.join().expect("echo worker");
        }
    });
    eprintln!("8 x 1 MiB echo through iproxy: {:?}", started.elapsed());
    // Nothing more than was sent; closing our side ends each connection.
    for (i, stream) in streams.iter().enumerate() {
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        assert_eq!(
            read_until_closed(stream).expect("close"),
            b"",
            "connection {i}"
        );
    }

    // A port the phone refuses: iproxy's Connect gets CONNREFUSED and it closes the local
    // connection, promptly and without a byte.
    let refused = connect_local(refused_port).expect("connect to iproxy (refused)");
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let got = read_until_closed(&refused)
        .expect("the refused connection must be closed, not left hanging");
    assert_eq!(got, b"", "bytes from a refused port");

    // And iproxy keeps serving.
    assert!(
        matches!(proxy.tool.try_wait(), Ok(None)),
        "iproxy exited: {}",
        proxy.tool.stderr_text()
    );
    let stream = echo_connection(echo_port);
    let data = pattern(99, 64 * 1024);
    assert!(
        echo_through(&stream, &data) == data,
        "echo after the refusal came back different"
    );
}

#[test]
fn inetcat_pipes_8_mib_through_echo() {
    if !require_tool("inetcat", TOOLS) {
        return;
    }
    const LEN: usize = 8 * MIB;
    let udid = sim_udid(1);
    let d = TestDaemon::start(vec![PhoneConfig::simulated(1)]);
    d.wait_for_devices(&[&udid]);
    let mut tool = ChildGuard::spawn(
        d.command("inetcat")
            .arg(ECHO.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("spawn inetcat");
    tool.capture_stderr().expect("capture stderr");
    let mut stdin = tool.child().stdin.take().expect("stdin");
    let mut stdout = tool.child().stdout.take().expect("stdout");
    let data = pattern(8, LEN);
    let started = Instant::now();

    // inetcat exits at stdin EOF, possibly before the echo is back: stdin stays open until all
    // 8 MiB have come back. Pipes have no timeouts: the round trip runs in a thread and the
    // test bounds it (on timeout the guard kills inetcat, which ends the thread).
    let (tx, rx) = mpsc::channel();
    let to_send = data.clone();
    std::thread::spawn(move || {
        let back = paced_round_trip(&mut stdout, &mut stdin, &to_send, INETCAT_WINDOW);
        let _ = tx.send((back, stdin, stdout));
    });
    let (back, stdin, mut stdout) = rx.recv_timeout(IO_TIMEOUT).unwrap_or_else(|_| {
        panic!(
            "8 MiB did not come back within {IO_TIMEOUT:?}: {}",
            tool.stderr_text()
        )
    });
    let back =
        back.unwrap_or_else(|e| panic!("inetcat round trip: {e}; stderr: {}", tool.stderr_text()));
    let elapsed = started.elapsed();
    assert!(back == data, "inetcat's echo came back different");

    // Now stdin EOF: inetcat exits cleanly, having printed nothing more.
    drop(stdin);
    let status = tool
        .wait_timeout(Duration::from_secs(10))
        .expect("wait")
        .expect("inetcat did not exit at stdin EOF");
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("rest of stdout");
    assert_eq!(rest, b"", "inetcat printed more than the echo");
    assert!(
        status.success(),
        "inetcat: {status:?}, stderr {}",
        tool.stderr_text()
    );
    eprintln!("8 MiB echo through inetcat: {elapsed:?}");
}
