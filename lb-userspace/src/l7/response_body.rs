//! The response on its way back to the client: a backend's, streamed frame by frame as it
//! comes (nothing is buffered beyond what hyper holds; gzipped frame by frame when the
//! route compresses), or lb's own short answer.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::{backend::BackendConn, compress::Gzip, conn::Active, lease::Lease};

/// A backend's response body while it streams to the client, driving the backend
/// connection as it goes. When it ends, the connection goes back to the pool; dropped
/// before the end, the connection is closed.
pub(crate) struct Downstream {
    inner: Incoming,
    /// None when the connection has a task of its own (after an upgrade attempt).
    conn: Option<BackendConn>,
    lease: Option<Lease>,
}

impl Downstream {
    pub fn new(inner: Incoming, conn: Option<BackendConn>, lease: Lease) -> Self {
        let mut body = Self {
            inner,
            conn,
            lease: Some(lease),
        };
        // No body at all (HEAD, 204, 304, Content-Length: 0): the connection is free now.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let inner = &mut self.inner;
        let polled = match &mut self.conn {
            Some(conn) => conn.poll_driven(cx, |cx| Pin::new(&mut *inner).poll_frame(cx)),
            None => Pin::new(inner).poll_frame(cx),
        };
        match &polled {
            // The end, possibly known from the last frame: hand the connection back now
            // rather than when hyper gets round to dropping the body.
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            _ => {}
        }
        polled
    }

    fn release(&mut self) {
        // The lease ends here either way; the connection goes back if it has no task.
        if let (Some(lease), Some(conn)) = (self.lease.take(), self.conn.take()) {
            lease.backend().put_idle(conn);
        }
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

enum Kind {
    Proxied(Downstream),
    /// A backend's body gzipped, and trailers held until the gzip stream has ended.
    Compressed(Box<(Downstream, Gzip, Option<Frame<Bytes>>)>),
    /// lb's own answer, or a 101's empty body.
    Local(Option<Bytes>),
}

/// What the client receives. It holds the connection's activity mark so that a connection
/// streaming a response is never taken for idle.
pub(crate) struct ResponseBody {
    kind: Kind,
    _active: Option<Active>,
}

impl ResponseBody {
    pub(crate) fn proxied(body: Downstream) -> Self {
        Self {
            kind: Kind::Proxied(body),
            _active: None,
        }
    }

    pub(crate) fn compressed(body: Downstream) -> Self {
        Self {
            kind: Kind::Compressed(Box::new((body, Gzip::new(), None))),
            _active: None,
        }
    }

    pub(crate) fn local(text: Bytes) -> Self {
        Self {
            kind: Kind::Local((!text.is_empty()).then_some(text)),
            _active: None,
        }
    }

    pub(crate) fn empty() -> Self {
        Self::local(Bytes::new())
    }

    pub(crate) fn with_active(mut self, active: Active) -> Self {
        self._active = Some(active);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.kind {
            Kind::Proxied(down) => down.poll_frame(cx),
            Kind::Compressed(state) => {
                let (down, gzip, held) = &mut **state;
                poll_compressed(down, gzip, held, cx)
            }
            Kind::Local(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Proxied(down) => down.inner.is_end_stream(),
            // The gzip trailer is still to come when the backend's body has ended.
            Kind::Compressed(..) => false,
            Kind::Local(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Proxied(down) => down.inner.size_hint(),
            Kind::Compressed(..) => SizeHint::default(),
            Kind::Local(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

/// The next frame of a gzipped body: each data frame compressed and flushed, then the
/// gzip trailer, then the backend's trailers if it sent any.
fn poll_compressed(
    down: &mut Downstream,
    gzip: &mut Gzip,
    held: &mut Option<Frame<Bytes>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
    if let Some(trailers) = held.take() {
        return Poll::Ready(Some(Ok(trailers)));
    }
    loop {
        let frame = match std::task::ready!(down.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => {
                let end = gzip.finish();
                return Poll::Ready((!end.is_empty()).then(|| Ok(Frame::data(end))));
            }
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => return Poll::Ready(Some(Ok(Frame::data(gzip.frame(&data))))),
            Err(trailers) => {
                *held = Some(trailers);
                return Poll::Ready(Some(Ok(Frame::data(gzip.finish()))));
            }
        }
    }
}
