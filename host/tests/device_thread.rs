//! The device thread against an in-process simulated phone: client sockets relayed byte-exact
//! both ways, refusals, and the ends of connections from either side.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use usbmux_core::SessionConfig;
use usbmux_host::daemon::device::{DeviceCmd, DeviceNote, DeviceThread};
use usbmux_host::daemon::sim::SimLink;
use usbmux_host::daemon::stream::ClientStream;
use usbmux_sim::PhoneConfig;

fn start() -> (DeviceThread, mpsc::Receiver<DeviceNote>) {
    let (tx, rx) = mpsc::channel();
    let link = Box::new(SimLink::new(PhoneConfig::simulated(1)));
    let t = DeviceThread::spawn(
        7,
        link,
        SessionConfig::default(),
        4000,
        Box::new(move |n| {
            let _ = tx.send(n);
        }),
    )
    .expect("spawn");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(DeviceNote::Ready { device_id: 7 })
    );
    (t, rx)
}

/// Hands one end of a socket pair to the device thread; returns the client's end.
fn connect(t: &DeviceThread, port: u16) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().expect("pair");
    theirs.set_nonblocking(true).expect("nonblocking");
    let stream = ClientStream::Unix(mio::net::UnixStream::from_std(theirs));
    assert!(t.send(DeviceCmd::Connect {
        stream,
        port,
        ok: b"OK!".to_vec(),
        refused: b"NO!".to_vec()
    }));
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    ours
}

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read");
    v
}

#[test]
fn echo_through_the_device_thread_is_byte_exact() {
    let (t, _notes) = start();
    let mut c = connect(&t, 7);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + (i >> 11)) as u8).collect();
    let mut writer = c.try_clone().expect("clone");
    let d2 = data.clone();
    let w = std::thread::spawn(move || writer.write_all(&d2).expect("write"));
    let back = read_exact(&mut c, data.len());
    w.join().expect("writer");
    assert!(back == data);
    t.stop();
}

#[test]
fn refused_port_gets_the_refused_message_and_eof() {
    let (t, _notes) = start();
    let mut c = connect(&t, 4242);
    let mut all = Vec::new();
    c.read_to_end(&mut all).expect("read");
    assert_eq!(all, b"NO!");
    // The phone still works.
    let mut c = connect(&t, 7);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
}

#[test]
fn many_parallel_connections() {
    let (t, _notes) = start();
    let mut clients: Vec<UnixStream> = (0..32).map(|_| connect(&t, 7)).collect();
    for c in clients.iter_mut() {
        assert_eq!(read_exact(c, 3), b"OK!");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(&vec![i as u8; 10_000 + i]).expect("write");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(read_exact(c, 10_000 + i), vec![i as u8; 10_000 + i]);
    }
}

#[test]
fn client_close_resets_the_phone_connection_after_delivery() {
    let (t, _notes) = start();
    // digest: write one message, shut down our sending side, the answer still arrives.
    let mut c = connect(&t, 1999);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
    let body = vec![0x5au8; 100_000];
    c.write_all(&(body.len() as u64).to_be_bytes())
        .expect("len");
    c.write_all(&body).expect("body");
    let answer = read_exact(&mut c, 32);
    assert_ne!(answer, vec![0u8; 32]);
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .expect("eof after the phone connection was reset");
    assert!(rest.is_empty());
}

#[test]
fn stop_ends_the_thread_and_reports_gone() {
    let (t, notes) = start();
    let mut c = connect(&t, 7);
    assert_eq!(read_exact(&mut c, 3), b"OK!");
    t.stop();
    assert!(matches!(
        notes.recv_timeout(Duration::from_secs(5)),
        Ok(DeviceNote::Gone { device_id: 7, .. })
    ));
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}
