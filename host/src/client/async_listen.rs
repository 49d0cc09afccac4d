//! [`EventStream`]: Listen as an async [`Stream`] (cargo feature `async`).
//!
//! The events come from a [`Listener`](super::Listener) running on a thread of its own and
//! cross to the async side through a bounded tokio channel. A listener receives a few messages
//! per plug or unplug, so one thread per subscription costs nothing worth avoiding, and the
//! decoding stays the one the blocking listener has (and its tests cover); the async side never
//! blocks — setting up the subscription (connect, request, Result) happens on that thread too.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::{mpsc, oneshot};

use super::{Client, ClientError, DeviceEvent, ListenStopper};

/// Events buffered between the listening thread and the stream's reader.
const CHANNEL_DEPTH: usize = 64;

/// Device events as an async [`Stream`]; see [`Client::listen_async`].
///
/// The stream ends when the daemon closes the connection, after an error, or never otherwise.
/// Dropping it ends the subscription (and its thread).
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Result<DeviceEvent, ClientError>>,
    stopper: ListenStopper,
}

impl EventStream {
    /// The next event, for callers without a `StreamExt`; `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<Result<DeviceEvent, ClientError>> {
        self.rx.recv().await
    }
}

impl Stream for EventStream {
    type Item = Result<DeviceEvent, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // The thread's blocked read returns, its iterator ends, the thread exits.
        self.stopper.stop();
    }
}

impl Client {
    /// [`listen`](Client::listen) for async code: resolves once the daemon has accepted the
    /// Listen (within the client's timeout), to a stream of the same events. Works with any
    /// executor; nothing here needs a tokio runtime.
    pub async fn listen_async(&self) -> Result<EventStream, ClientError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let client = self.clone();
        std::thread::Builder::new()
            .name("usbmux-listen".into())
            .spawn(move || {
                let listener = match client.listen() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                match listener.stopper() {
                    Ok(stopper) => {
                        if ready_tx.send(Ok(stopper)).is_err() {
                            return; // nobody waits any more
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                for event in listener {
                    if tx.blocking_send(event).is_err() {
                        break; // the stream was dropped
                    }
                }
            })?;
        let stopper = ready_rx.await.map_err(|_| ClientError::Disconnected)??;
        Ok(EventStream { rx, stopper })
    }
}
