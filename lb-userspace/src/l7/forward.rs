//! One request: route it, pick a backend, send it there over a pooled connection and
//! stream the answer back; or answer 404/503/502/504 ourselves. Upgrades (WebSocket) are
//! forwarded, and on 101 the two connections are spliced.
use std::sync::Arc;

use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{CONTENT_TYPE, HOST},
    uri::PathAndQuery,
};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use super::{
    Proxy,
    backend::{Backend, Lease, Sender, UpstreamError, pick},
    body::{Downstream, ResponseBody, Sent, UpstreamBody},
    headers,
    server::{Conn, drained},
};

impl Proxy {
    pub(crate) async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &Conn,
    ) -> Response<ResponseBody> {
        let (lease, service) = {
            let table = self.table.load();
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()));
            let path = req.uri().path();
            let Some(target) = table.lookup(host, path) else {
                return self.answer(StatusCode::NOT_FOUND, format!("no route for {path}\n"));
            };
            target
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(lease) = pick(target) else {
                let text = format!("service {} has no healthy backend\n", target.service);
                return self.answer(StatusCode::SERVICE_UNAVAILABLE, text);
            };
            (lease, target.service.clone())
        };

        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        if parts.uri.authority().is_some() {
            // Absolute form (every HTTP/2 request): the backend gets origin form and a Host.
            let missing_host = !parts.headers.contains_key(HOST);
            let authority = parts.uri.authority().filter(|_| missing_host);
            if let Some(Ok(host)) = authority.map(|a| HeaderValue::from_str(a.as_str())) {
                parts.headers.insert(HOST, host);
            }
            let path = parts.uri.path_and_query().cloned();
            parts.uri = Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        }
        headers::add_forwarded(&mut parts.headers, &conn.client_ip);
        parts.version = Version::HTTP_11;
        let (body, sent) = UpstreamBody::new(body);

        let exchanged = self
            .exchange(&lease.backend, Request::from_parts(parts, body), sent)
            .await;
        let (sender, mut resp) = match exchanged {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%service, error = %e, "backend failed");
                let (status, what) = match e.is_timeout() {
                    true => (StatusCode::GATEWAY_TIMEOUT, "timed out"),
                    false => (StatusCode::BAD_GATEWAY, "failed"),
                };
                return self.answer(status, format!("service {service}: backend {what}\n"));
            }
        };

        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let Some(client_upgrade) = client_upgrade.filter(|_| switched) {
            // The backend connection now belongs to the tunnel, not the pool.
            drop(sender);
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let shutdown = conn.shutdown.clone();
            tokio::spawn(tunnel(client_upgrade, backend_upgrade, lease, shutdown));
            let (mut parts, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(parts, ResponseBody::empty());
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        Response::from_parts(
            parts,
            ResponseBody::proxied(Downstream::new(body, sender, lease)),
        )
    }

    /// Sends `req` to `backend` and waits for the response head.
    async fn exchange(
        &self,
        backend: &Backend,
        mut req: Request<UpstreamBody>,
        sent: Option<Arc<Sent>>,
    ) -> Result<(Sender, Response<Incoming>), UpstreamError> {
        let config = &self.config;
        loop {
            let (mut sender, pooled) = backend
                .connection(config.connect_timeout, config.idle_timeout)
                .await?;
            let response = sender.try_send_request(req);
            let deadline = async {
                if let Some(sent) = &sent {
                    sent.wait().await;
                }
                tokio::time::sleep(config.response_header_timeout).await
            };
            tokio::select! {
                biased;
                r = response => match r {
                    Ok(resp) => return Ok((sender, resp)),
                    Err(mut e) => match e.take_message() {
                        // A pooled connection that closed before taking the request (the
                        // backend timed it out): the request is intact, try another.
                        Some(back) if pooled => req = back,
                        _ => return Err(UpstreamError::Request(backend.addr, e.into_error())),
                    },
                },
                () = deadline => return Err(UpstreamError::HeaderTimeout(backend.addr)),
            }
        }
    }

    /// lb's own answer, counted.
    fn answer(&self, status: StatusCode, text: String) -> Response<ResponseBody> {
        self.answers.count(status);
        let mut response = Response::new(ResponseBody::local(Bytes::from(text)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// Splices an upgraded client connection to the upgraded backend connection until either
/// side closes (or the server's shutdown grace ends). The lease keeps the backend's
/// in-flight count up meanwhile.
async fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    lease: Lease,
    mut shutdown: watch::Receiver<bool>,
) {
    let addr = lease.backend.addr;
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(backend = %addr, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
            if let Err(e) = r {
                tracing::debug!(backend = %addr, error = %e, "upgraded connection ended");
            }
        }
        () = drained(&mut shutdown) => {}
    }
    drop(lease);
}
