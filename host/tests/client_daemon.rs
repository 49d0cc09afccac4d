//! `usbmux_host::client` against our daemon with simulated phones: every call, every error the
//! daemon can give, Listen events on plug / unplug / pair, UDID lookup in both forms, a TCP
//! daemon socket.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use usbmux_host::client::{
    Client, ClientError, ConnectionType, DeviceEvent, Listener, Protocol, SocketAddress,
    UsbmuxStream,
};
use usbmux_host::daemon::{self, sim::SimLink, DaemonConfig, RunningDaemon, SocketSpec};
use usbmux_sim::PhoneConfig;

const UDID_1: &str = "00008030-0000000000000001";
const UDID_AB: &str = "00008030-00000000000000AB";

fn start(dir: &Path, socket: SocketSpec, phones: Vec<PhoneConfig>) -> RunningDaemon {
    daemon::start(DaemonConfig {
        activated: None,
        socket,
        config_dir: dir.join("lockdown"),
        simulate: phones,
        sim_sockets: vec![],
        session: Default::default(),
        trace: None,
        usb: false,
        usb_on_demand: false,
    })
    .expect("daemon")
}

fn unix_daemon(dir: &Path, phones: Vec<PhoneConfig>) -> (RunningDaemon, Client) {
    let path: PathBuf = dir.join("usbmuxd");
    let d = start(
        dir,
        SocketSpec::Unix {
            path: path.clone(),
            mode: 0o600,
        },
        phones,
    );
    let client =
        Client::with_address(SocketAddress::Unix(path)).with_prog_name(Some("client-test".into()));
    (d, client)
}

/// Waits (bounded) until the daemon lists `n` devices: phones attach asynchronously.
fn wait_for_devices(client: &Client, n: usize) -> Vec<usbmux_host::client::Device> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut list = client.list_devices().expect("list");
        if list.len() == n {
            list.sort_by(|a, b| a.udid.cmp(&b.udid));
            return list;
        }
        assert!(Instant::now() < end, "expected {n} devices, have {list:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn next_event(l: &mut Listener) -> DeviceEvent {
    l.next_timeout(Duration::from_secs(10))
        .expect("event")
        .expect("an event within 10 s")
}

fn echo(stream: &mut UsbmuxStream, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let writer = stream.try_clone().expect("clone");
    let d = data.clone();
    let t = std::thread::spawn(move || {
        let mut w = &writer;
        w.write_all(&d).expect("write");
    });
    let mut back = vec![0u8; len];
    stream.read_exact(&mut back).expect("echo");
    t.join().expect("writer");
    assert!(back == data, "echo differs");
}

#[test]
fn devices_connect_and_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let (d, client) = unix_daemon(
        dir.path(),
        vec![PhoneConfig::simulated(1), PhoneConfig::simulated(0xAB)],
    );
    let devices = wait_for_devices(&client, 2);
    assert_eq!(client.protocol(), Protocol::Plist);
    assert_eq!(devices[0].udid, UDID_1);
    assert_eq!(devices[1].udid, UDID_AB);
    for dev in &devices {
        assert_eq!(dev.product_id, 0x12a8);
        assert_eq!(dev.connection_type, ConnectionType::Usb);
        assert_eq!(dev.connection_speed, Some(480_000_000));
        assert_eq!(
            dev.usb_serial.as_deref(),
            Some(dev.udid.replace('-', "").as_str())
        );
    }
    assert_eq!(devices[0].location_id, 1);

    // Find by UDID in every spelling.
    for spelling in [
        UDID_AB,
        "0000803000000000000000AB",
        "00008030-00000000000000ab",
        "0000803000000000000000ab",
    ] {
        let found = client.find_device(spelling).expect("find").expect(spelling);
        assert_eq!(found.device_id, devices[1].device_id, "{spelling}");
    }
    assert!(client
        .find_device("00008030-00000000000000AC")
        .expect("find")
        .is_none());

    // Connect to the echo service, both directions, then shut down.
    let mut s = client
        .connect(devices[0].device_id, 7)
        .expect("connect echo");
    assert!(s.is_unix());
    assert_eq!(
        s.read_timeout().expect("timeout"),
        None,
        "a raw pipe has no timeouts"
    );
    echo(&mut s, 300_000);
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    s.shutdown(Shutdown::Write).expect("shutdown");

    // The daemon's refusals, typed.
    assert!(matches!(
        client.connect(devices[0].device_id, 4242),
        Err(ClientError::ConnectionRefused)
    ));
    assert!(matches!(
        client.connect(999, 7),
        Err(ClientError::NoSuchDevice)
    ));
    assert_eq!(client.protocol(), Protocol::Plist, "no fallback happened");
    d.stop();
}

#[test]
fn buid_and_pair_records() {
    let dir = tempfile::tempdir().expect("tmp");
    let (d, client) = unix_daemon(dir.path(), vec![]);

    let buid = client.read_buid().expect("buid");
    assert_eq!(buid.len(), 36);
    assert_eq!(client.read_buid().expect("buid again"), buid, "stable");
    let config = plist::Value::from_file(dir.path().join("lockdown/SystemConfiguration.plist"))
        .expect("cfg");
    assert_eq!(
        config
            .as_dictionary()
            .and_then(|d| d.get("SystemBUID"))
            .and_then(plist::Value::as_string),
        Some(buid.as_str())
    );

    let udid = "00008030-001A2B3C4D5E6F70";
    assert!(matches!(
        client.read_pair_record(udid),
        Err(ClientError::NotFound)
    ));
    let record = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict><key>HostID</key><string>ABC</string></dict></plist>\n";
    // Saved in the unhyphenated form, read back in the hyphenated one: the same record.
    client
        .save_pair_record("00008030001A2B3C4D5E6F70", record)
        .expect("save");
    assert!(dir.path().join(format!("lockdown/{udid}.plist")).exists());
    assert_eq!(client.read_pair_record(udid).expect("read"), record);
    client.delete_pair_record(udid).expect("delete");
    assert!(matches!(
        client.delete_pair_record(udid),
        Err(ClientError::NotFound)
    ));
    assert!(matches!(
        client.read_pair_record(udid),
        Err(ClientError::NotFound)
    ));

    // Ids that are not UDIDs and records that are not plists: EINVAL.
    for bad in ["../SystemConfiguration", "", "x"] {
        assert!(
            matches!(
                client.read_pair_record(bad),
                Err(ClientError::InvalidArgument)
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        client.save_pair_record(udid, b"not a plist at all"),
        Err(ClientError::InvalidArgument)
    ));
    assert!(matches!(
        client.delete_pair_record("a/b"),
        Err(ClientError::InvalidArgument)
    ));
    d.stop();
}

#[test]
fn listen_attach_detach_pair_and_listeners() {
    let dir = tempfile::tempdir().expect("tmp");
    let (d, client) = unix_daemon(dir.path(), vec![PhoneConfig::simulated(1)]);
    wait_for_devices(&client, 1);

    let mut l = client.listen().expect("listen");
    assert_eq!(l.protocol(), Protocol::Plist);
    let DeviceEvent::Attached(first) = next_event(&mut l) else {
        panic!("expected the present device first")
    };
    assert_eq!(first.udid, UDID_1);
    assert_eq!(
        l.next_timeout(Duration::from_millis(100)).expect("quiet"),
        None,
        "nothing else yet"
    );

    // ListListeners shows us, with the ProgName we sent.
    let listeners = client.list_listeners().expect("listeners");
    assert!(
        listeners
            .iter()
            .any(|x| x.prog_name.as_deref() == Some("client-test")
                && x.lib_usbmux_version == Some(3)),
        "{listeners:?}"
    );

    // Plug in phone 2.
    d.attach(Box::new(SimLink::new(PhoneConfig::simulated(2))));
    let DeviceEvent::Attached(second) = next_event(&mut l) else {
        panic!("expected Attached")
    };
    assert_eq!(second.udid, "00008030-0000000000000002");

    // A pair record saved for a connected device: Paired.
    client
        .save_pair_record_for_device(
            &second.udid,
            second.device_id,
            b"<plist version=\"1.0\"><dict/></plist>",
        )
        .expect("save");
    assert_eq!(
        next_event(&mut l),
        DeviceEvent::Paired {
            device_id: second.device_id
        }
    );

    // Unplug phone 1.
    d.detach(UDID_1);
    assert_eq!(
        next_event(&mut l),
        DeviceEvent::Detached {
            device_id: first.device_id
        }
    );

    // Another thread ends the blocking iterator.
    let stopper = l.stopper().expect("stopper");
    let t = std::thread::spawn(move || l.count());
    std::thread::sleep(Duration::from_millis(50));
    stopper.stop();
    assert_eq!(t.join().expect("listener thread"), 0);

    // The daemon going away ends a listener: None, not a hang.
    let l2 = client.listen().expect("listen again");
    d.stop();
    let events: Vec<_> = l2.collect();
    assert!(events.iter().all(|e| e.is_ok()), "{events:?}");
}

#[test]
fn tcp_daemon_socket() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = start(
        dir.path(),
        SocketSpec::Tcp("127.0.0.1:0".parse().expect("addr")),
        vec![PhoneConfig::simulated(3)],
    );
    let addr = SocketAddress::parse(&format!("tcp://{}", d.socket().client_address()))
        .expect("tcp address");
    assert!(matches!(addr, SocketAddress::Tcp { .. }));
    let client = Client::with_address(addr);
    let devices = wait_for_devices(&client, 1);
    let mut s = client.connect(devices[0].device_id, 7).expect("connect");
    assert!(!s.is_unix());
    echo(&mut s, 100_000);
    d.stop();
}

#[test]
fn unreachable_daemon_is_typed() {
    let dir = tempfile::tempdir().expect("tmp");
    let client = Client::with_address(SocketAddress::Unix(dir.path().join("nobody-here")));
    match client.list_devices() {
        Err(ClientError::DaemonUnreachable { address, source }) => {
            assert!(address.starts_with("UNIX:"), "{address}");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_traced_phone_records_the_transfers_that_carried_a_connection() {
    // `usbmuxd --trace FILE` wraps the phone's link; the wrapper must keep the link's own data
    // path (transfers built in place) and record what actually went over it.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("usbmuxd");
    let trace = dir.path().join("trace.bin");
    let d = daemon::start(DaemonConfig {
        activated: None,
        socket: SocketSpec::Unix {
            path: path.clone(),
            mode: 0o600,
        },
        config_dir: dir.path().join("lockdown"),
        simulate: vec![PhoneConfig::simulated(1)],
        sim_sockets: vec![],
        session: Default::default(),
        trace: Some(trace.clone()),
        usb: false,
        usb_on_demand: false,
    })
    .expect("daemon");
    let client = Client::with_address(SocketAddress::Unix(path));
    let devices = wait_for_devices(&client, 1);
    let mut s = client.connect(devices[0].device_id, 7).expect("connect");
    echo(&mut s, 100_000);
    drop(s);
    d.stop();

    let bytes = std::fs::read(&trace).expect("trace file");
    let records = usbmux_sim::trace::read_records(&bytes).expect("trace decodes");
    use usbmux_sim::trace::{Direction, Entry};
    assert!(matches!(
        records.first().map(|r| &r.entry),
        Some(Entry::Plug)
    ));
    let moved = |dir: Direction| -> Vec<&[u8]> {
        records
            .iter()
            .filter_map(|r| match &r.entry {
                Entry::Transfer { direction, data } if *direction == dir => Some(&data[..]),
                _ => None,
            })
            .collect()
    };
    // The start of what the client wrote sits right after the headers of the first data packet
    // out, and of the first one back (echo).
    let data: Vec<u8> = (0..100_000).map(|i| (i * 7 % 251) as u8).collect();
    let head = &data[..1000];
    for dir in [Direction::Out, Direction::In] {
        let transfers = moved(dir);
        let total: usize = transfers.iter().map(|t| t.len()).sum();
        assert!(total > 100_000, "{dir}: only {total} bytes traced");
        assert!(
            transfers
                .iter()
                .any(|t| t.windows(head.len()).any(|w| w == head)),
            "{dir}: the client's first bytes are in no traced transfer"
        );
    }
}
