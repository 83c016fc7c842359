//! One request: route it, pick a backend, send it there over a pooled connection and
//! stream the answer back; or answer 404/503/502/504 ourselves. Upgrades (WebSocket) are
//! forwarded, and on 101 the two connections are spliced.
use std::{future::poll_fn, sync::Arc};

use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{CONTENT_TYPE, HOST},
    uri::PathAndQuery,
};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;

use super::{
    Proxy,
    backend::{Backend, BackendConn, UpstreamError},
    conn::Conn,
    headers,
    lease::{Lease, pick},
    limits::{Refusal, splice_until_idle},
    request_body::{Sent, UpstreamBody},
    response_body::{Downstream, ResponseBody},
};

impl Proxy {
    pub(crate) async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &Conn,
    ) -> Response<ResponseBody> {
        let lease = {
            let table = self.table();
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(http::uri::Authority::as_str));
            let path = req.uri().path();
            let Some(t) = table.lookup(host, path) else {
                return self.answer(StatusCode::NOT_FOUND, format!("no route for {path}\n"));
            };
            let target = table.target(t);
            target.requests.add(1);
            let Some(b) = pick(target) else {
                let text = format!("service {} has no healthy backend\n", target.service);
                return self.answer(StatusCode::SERVICE_UNAVAILABLE, text);
            };
            Lease::new(table, t, b)
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
        let (body, sent) = UpstreamBody::new(body, self.config.limits.body_timeout);
        let body_stalled = sent.clone();

        let exchanged = self
            .exchange(
                lease.backend(),
                Request::from_parts(parts, body),
                sent,
                upgrade,
            )
            .await;
        let (upstream, mut resp) = match exchanged {
            Ok(r) => r,
            Err(e) => {
                let service = lease.service();
                if body_stalled.is_some_and(|s| s.stalled()) {
                    tracing::debug!(%service, error = %e, "request body stalled");
                    self.refusals.count(Refusal::BodyTimeout);
                    let text = "the request body stopped coming\n".to_string();
                    return self.answer(StatusCode::REQUEST_TIMEOUT, text);
                }
                tracing::debug!(%service, error = %e, "backend failed");
                let (status, what) = if e.is_timeout() {
                    (StatusCode::GATEWAY_TIMEOUT, "timed out")
                } else {
                    (StatusCode::BAD_GATEWAY, "failed")
                };
                return self.answer(status, format!("service {service}: backend {what}\n"));
            }
        };

        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let Some(client_upgrade) = client_upgrade.filter(|_| switched) {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let proxy = conn.proxy.clone();
            conn.set_tunnel(tunnel(client_upgrade, backend_upgrade, lease, proxy));
            let (mut parts, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(parts, ResponseBody::empty());
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        Response::from_parts(
            parts,
            ResponseBody::proxied(Downstream::new(body, upstream, lease)),
        )
    }

    /// Sends `req` to `backend` and waits for the response head. The connection comes
    /// back with the response (to be driven while its body streams), except for an upgrade
    /// request, whose connection runs in a task of its own.
    async fn exchange(
        &self,
        backend: &Backend,
        mut req: Request<UpstreamBody>,
        sent: Option<Arc<Sent>>,
        upgrade: bool,
    ) -> Result<(Option<BackendConn>, Response<Incoming>), UpstreamError> {
        let config = &self.config;
        loop {
            let (mut conn, pooled) = backend.connection(config.connect_timeout).await?;
            let deadline = async {
                if let Some(sent) = &sent {
                    sent.wait().await;
                }
                tokio::time::sleep(config.response_header_timeout).await;
            };
            let answered = if upgrade {
                let response = conn.into_upgradeable().try_send_request(req);
                tokio::select! {
                    biased;
                    r = response => r.map(|resp| (None, resp)),
                    () = deadline => return Err(UpstreamError::HeaderTimeout(backend.addr)),
                }
            } else {
                let mut response = std::pin::pin!(conn.send(req));
                let driven = poll_fn(|cx| conn.poll_driven(cx, |cx| response.as_mut().poll(cx)));
                let r = tokio::select! {
                    biased;
                    r = driven => r,
                    () = deadline => return Err(UpstreamError::HeaderTimeout(backend.addr)),
                };
                r.map(|resp| (Some(conn), resp))
            };
            match answered {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    // A pooled connection that closed before taking the request (the
                    // backend timed it out): the request is intact, try another.
                    Some(back) if pooled => req = back,
                    _ => return Err(UpstreamError::Request(backend.addr, e.into_error())),
                },
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
/// side closes or both are idle for the tunnel timeout. The lease keeps the backend's
/// in-flight count up meanwhile.
async fn tunnel(client: OnUpgrade, backend: OnUpgrade, lease: Lease, proxy: Arc<Proxy>) {
    let addr = lease.backend().addr;
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(backend = %addr, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    let idle = proxy.config.limits.tunnel_timeout;
    if splice_until_idle(&mut client, &mut backend, idle).await {
        tracing::debug!(backend = %addr, "upgraded connection idle: closed");
        proxy.refusals.count(Refusal::TunnelTimeout);
    }
    drop(lease);
}
