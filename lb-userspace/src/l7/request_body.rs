//! A client's request body on its way to a backend, passed on frame by frame as it comes,
//! and the signal that it has been sent in full.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;

/// Tells the response-header timeout when the request body has been sent in full: the
/// backend's clock starts then, so a long upload is not taken for a slow backend.
#[derive(Default)]
pub(crate) struct Sent {
    done: AtomicBool,
    notify: Notify,
}

impl Sent {
    fn mark(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    pub async fn wait(&self) {
        let notified = self.notify.notified();
        if !self.done.load(Ordering::Acquire) {
            notified.await;
        }
    }
}

/// A client's request body, forwarded to the backend.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    sent: Option<Arc<Sent>>,
}

impl UpstreamBody {
    /// Wraps `inner`, with a completion signal unless it is empty already.
    pub fn new(inner: Incoming) -> (Self, Option<Arc<Sent>>) {
        let sent = (!inner.is_end_stream()).then(Arc::<Sent>::default);
        let body = Self {
            inner,
            sent: sent.clone(),
        };
        (body, sent)
    }

    fn mark_sent(&mut self) {
        if let Some(sent) = self.sent.take() {
            sent.mark();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.mark_sent();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped before its end (the backend answered early, or failed): either way no
        // more is coming, and the wait for the response must not outlast it.
        self.mark_sent();
    }
}
