//! The watcher on whatever USB this machine has (usually none, maybe no `/dev/bus/usb` at all):
//! starting must never fail hard or hang, and stopping must join promptly.

// Test helpers outside #[test] fns: a failed lock or poll is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use usbmux_host::usb::{UsbEvent, Watcher, WatcherOptions};

fn run(options: WatcherOptions) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    match Watcher::start(options, move |event| {
        let description = match &event {
            UsbEvent::Arrived(link) => format!("arrived at {}", link.location()),
            UsbEvent::Left(location) => format!("left {location}"),
        };
        sink.lock().unwrap().push(description);
    }) {
        Ok(watcher) => {
            std::thread::sleep(Duration::from_millis(300));
            let started = Instant::now();
            watcher.stop();
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "stop took {:?}",
                started.elapsed()
            );
        }
        // No USB here: logged by the watcher, and not an error for the caller.
        Err(e) => eprintln!("{e}"),
    }
    // Phones plugged into a developer's machine may show up; nothing else may.
    for event in events.lock().unwrap().iter() {
        eprintln!("event: {event}");
    }
}

#[test]
fn polling_watcher_starts_and_stops() {
    run(WatcherOptions {
        force_poll: true,
        poll_interval: Duration::from_millis(50),
        ..WatcherOptions::default()
    });
}

#[test]
fn default_watcher_starts_and_stops() {
    run(WatcherOptions::default());
}

#[test]
fn dropping_the_watcher_joins_it() {
    if let Ok(watcher) = Watcher::start(WatcherOptions::default(), |_| {}) {
        let started = Instant::now();
        drop(watcher);
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
