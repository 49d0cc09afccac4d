//! `Client::listen_async` (cargo feature `async`) against our daemon: the same events as the
//! blocking listener, through the `Stream` trait and `recv`, driven by a minimal executor (the
//! stream needs no tokio runtime). Run with `cargo test -p usbmux-host --features async`.
#![cfg(feature = "async")]

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use futures_core::Stream;
use usbmux_host::client::{Client, ClientError, DeviceEvent, SocketAddress};
use usbmux_host::daemon::{self, sim::SimLink, DaemonConfig, SocketSpec};
use usbmux_sim::PhoneConfig;

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` to completion on this thread, failing the test if it takes over 10 s.
fn block_on<F: Future>(fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        let now = Instant::now();
        assert!(now < end, "future did not complete within 10 s");
        std::thread::park_timeout(end - now);
    }
}

#[test]
fn async_listen_stream() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("usbmuxd");
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
        trace: None,
        usb: false,
        usb_on_demand: false,
    })
    .expect("daemon");
    let client = Client::with_address(SocketAddress::Unix(path));

    let mut events = block_on(client.listen_async()).expect("listen");
    let first = block_on(events.recv()).expect("event").expect("ok");
    let DeviceEvent::Attached(first) = first else {
        panic!("{first:?}")
    };
    assert_eq!(first.udid, "00008030-0000000000000001");

    d.attach(Box::new(SimLink::new(PhoneConfig::simulated(2))));
    // Through the Stream trait this time.
    let second = block_on(std::future::poll_fn(|cx| {
        Pin::new(&mut events).poll_next(cx)
    }))
    .expect("event")
    .expect("ok");
    assert!(matches!(&second, DeviceEvent::Attached(d) if d.udid.ends_with("0002")));

    d.detach("00008030-0000000000000001");
    assert_eq!(
        block_on(events.recv()).expect("event").expect("ok"),
        DeviceEvent::Detached {
            device_id: first.device_id
        }
    );

    // Dropping the stream ends the subscription: the daemon stops listing the listener.
    assert_eq!(client.list_listeners().expect("listeners").len(), 1);
    drop(events);
    let end = Instant::now() + Duration::from_secs(5);
    while !client.list_listeners().expect("listeners").is_empty() {
        assert!(Instant::now() < end, "listener still registered after drop");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The daemon stopping ends the stream.
    let mut events = block_on(client.listen_async()).expect("listen");
    d.stop();
    while let Some(e) = block_on(events.recv()) {
        assert!(e.is_ok(), "{e:?}");
    }

    // Errors setting up come back from the future.
    assert!(matches!(
        block_on(client.listen_async()),
        Err(ClientError::DaemonUnreachable { .. })
    ));
}
