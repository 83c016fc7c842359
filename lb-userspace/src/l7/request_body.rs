//! A client's request body on its way to a backend, passed on frame by frame as it comes,
//! given up when the client stops sending it, and the signal that it has been sent in
//! full.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::{
    sync::Notify,
    time::{Instant, Sleep},
};

/// Tells the response-header timeout when the request body has been sent in full: the
/// backend's clock starts then, so a long upload is not taken for a slow backend.
#[derive(Default)]
pub(crate) struct Sent {
    done: AtomicBool,
    notify: Notify,
    /// The client stopped sending the body, and it was given up.
    stalled: AtomicBool,
}

impl Sent {
    fn mark(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    /// Whether the body was given up for the client's silence (then the request's answer
    /// is 408).
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        let notified = self.notify.notified();
        if !self.done.load(Ordering::Acquire) {
            notified.await;
        }
    }
}

/// The error a request body ends with when the client stopped sending it.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for {0:?}")]
pub(crate) struct BodyStalled(Duration);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body, forwarded to the backend.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    sent: Option<Arc<Sent>>,
    /// How long the client may send nothing, and the timer of that (armed while waiting;
    /// made at the first wait, so a body that never waits costs no timer).
    idle: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl UpstreamBody {
    /// Wraps `inner`, with a completion signal unless it is empty already; given up when
    /// no byte of it comes for `idle`.
    pub fn new(inner: Incoming, idle: Duration) -> (Self, Option<Arc<Sent>>) {
        let sent = (!inner.is_end_stream()).then(Arc::<Sent>::default);
        let body = Self {
            inner,
            sent: sent.clone(),
            idle,
            stall: None,
            waiting: false,
        };
        (body, sent)
    }

    /// Whether the client has been silent for the idle time, counted from the first poll
    /// that found nothing; arms the timer then.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.idle;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let stall = self.stall.as_mut().expect("armed above");
        stall.as_mut().poll(cx).is_ready()
    }

    fn mark_sent(&mut self) {
        if let Some(sent) = self.sent.take() {
            sent.mark();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => self.mark_sent(),
            Poll::Ready(Some(_)) => self.waiting = false,
            Poll::Pending => {
                if self.stalled(cx) {
                    if let Some(sent) = &self.sent {
                        sent.stalled.store(true, Ordering::Release);
                    }
                    let idle = self.idle;
                    return Poll::Ready(Some(Err(BodyStalled(idle).into())));
                }
            }
        }
        polled.map(|frame| frame.map(|f| f.map_err(BoxError::from)))
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
