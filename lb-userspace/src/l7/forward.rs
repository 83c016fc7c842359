//! One request: route it, pick a backend, send it there over a pooled connection and
//! stream the answer back; or answer 400/404/503/502/504 ourselves. Upgrades (WebSocket)
//! are forwarded, and on 101 the two connections are spliced.
//!
//! A request the backend never took is sent to another backend of the route, once (as
//! HAProxy's `option redispatch` with `retries 1`): the connection could not be opened
//! (refused, reset, timed out), or it closed before the request was handed to it, which
//! hyper tells by giving the request back. Once a request has started out it is never sent
//! again: a POST must not reach two backends. (A stale pooled connection is no backend
//! failure: the request tries that backend's next connection, or a new one, first.) A
//! backend at its connection cap does not take the request either; when the other is full
//! too, the answer is 503.
use std::{future::poll_fn, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{
        AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST, LOCATION, SET_COOKIE, WWW_AUTHENTICATE,
    },
    uri::PathAndQuery,
};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;

use super::{
    Proxy,
    backend::{Backend, BackendConn, ConnSlot, UpstreamError},
    compress::Compress,
    conn::Conn,
    headers,
    lease::{Lease, pick},
    limits::{Refusal, splice_until_idle},
    path,
    request_body::{Sent, UpstreamBody},
    response_body::{Downstream, ResponseBody},
    routes::PlainHttp,
};

impl Proxy {
    pub(crate) async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &Conn,
    ) -> Response<ResponseBody> {
        // A CA validating a certificate lb orders: answered before any route (and over
        // plain HTTP even for HTTPS-only services), as RFC 8555 has it. Other tokens go
        // to the routes, whose backends may order their own.
        if let Some(answer) = self.config.acme_challenges.answer(req.uri().path()) {
            let mut response = self.answer(StatusCode::OK, answer);
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return response;
        }
        // Routed by its normalised path, and forwarded with it: the backend is asked for
        // what lb matched, whatever spelling the client used.
        let normalized = match path::normalize(req.uri().path()) {
            Ok(std::borrow::Cow::Borrowed(_)) => None,
            Ok(std::borrow::Cow::Owned(p)) => Some(p),
            Err(e) => return self.answer(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let (table, t) = {
            let table = self.table();
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(http::uri::Authority::as_str));
            let path = normalized.as_deref().unwrap_or(req.uri().path());
            if let Some(to) = table.redirect(conn.port, host) {
                return self.redirect(StatusCode::MOVED_PERMANENTLY, conn.https, to, req.uri());
            }
            let Some(t) = table.lookup(conn.port, host, path, req.headers()) else {
                return self.answer(StatusCode::NOT_FOUND, format!("no route for {path}\n"));
            };
            let target = table.target(t);
            target.requests.add(1);
            if !target.permits(req.method()) {
                let text = format!(
                    "method {} is not allowed for service {}\n",
                    req.method(),
                    target.service
                );
                return self.answer(StatusCode::FORBIDDEN, text);
            }
            if !conn.https {
                match target.plain_http {
                    PlainHttp::Serve => {}
                    PlainHttp::Deny => {
                        let text =
                            format!("service {} is served over HTTPS only\n", target.service);
                        return self.answer(StatusCode::FORBIDDEN, text);
                    }
                    PlainHttp::Redirect(code) => return self.to_https(code, host, req.uri()),
                }
            }
            (table, t)
        };
        let target = table.target(t);
        if let Some(auth) = &target.auth
            && !auth.admits(req.headers().get(AUTHORIZATION)).await
        {
            let text = format!(
                "service {} needs a user name and password\n",
                target.service
            );
            let mut response = self.answer(StatusCode::UNAUTHORIZED, text);
            if let Some(challenge) = auth.challenge.clone() {
                response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
            }
            return response;
        }
        // A client's sticky cookie names its backend while that one is healthy.
        let stuck_to = target.sticky.as_ref().and_then(|s| s.chosen(req.headers()));
        let Some(b) = stuck_to.or_else(|| pick(target)) else {
            let text = format!("service {} has no healthy backend\n", target.service);
            return self.answer(StatusCode::SERVICE_UNAVAILABLE, text);
        };
        let rewrite = target.rewrite.clone();
        let timeouts = target.timeouts;
        let gzip_accepted =
            target.compress.is_some() && Compress::accepted(req.method(), req.headers());
        let mut lease = Lease::new(table, t, b);

        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let h2 = lease.backend().is_h2();
        // gRPC needs `TE: trailers` through to an HTTP/2 backend; it is hop-by-hop.
        let trailers = h2 && headers::asks_for_trailers(&parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(sticky) = &lease.target().sticky {
            sticky.strip(&mut parts.headers);
        }
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
        let rewritten = rewrite
            .as_ref()
            .and_then(|r| r.path(normalized.as_deref().unwrap_or(parts.uri.path())));
        if let Some(path) = rewritten.or(normalized) {
            let Some(uri) = with_path(&parts.uri, &path) else {
                let text = format!("the path {path:?} cannot be forwarded\n");
                return self.answer(StatusCode::BAD_REQUEST, text);
            };
            parts.uri = uri;
        }
        headers::add_forwarded(
            &mut parts.headers,
            &conn.client_ip,
            conn.client_trusted,
            conn.https,
        );
        if let Some(r) = &rewrite {
            r.request.apply(&mut parts.headers);
        }
        if h2 {
            if upgrade {
                let text = format!(
                    "service {}: its backends speak HTTP/2, which takes no protocol switch\n",
                    lease.service()
                );
                return self.answer(StatusCode::BAD_GATEWAY, text);
            }
            if let Err(text) = headers::to_h2_request(&mut parts, lease.backend(), trailers) {
                return self.answer(StatusCode::BAD_REQUEST, text);
            }
        } else {
            parts.version = Version::HTTP_11;
        }
        let (body, sent) = UpstreamBody::new(body, self.config.limits.body_timeout);
        let body_stalled = sent.clone();

        let mut req = Request::from_parts(parts, body);
        let mut redispatched = false;
        let exchanged = loop {
            let exchange = self.exchange(lease.backend(), req, &sent, upgrade, timeouts.server);
            let failed = match exchange.await {
                Ok(r) => break Ok(r),
                Err(failed) => failed,
            };
            let Failed { error, unsent } = failed;
            let Some(unsent) = unsent.filter(|_| !redispatched) else {
                break Err(error);
            };
            let failed_addr = lease.backend().addr;
            let Some(other) = lease.redispatch() else {
                break Err(error);
            };
            lease = other;
            tracing::debug!(
                service = %lease.service(), error = %error, to = %lease.backend().addr,
                "backend {failed_addr} did not take the request: sent to another"
            );
            self.redispatched
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (req, redispatched) = (unsent, true);
        };
        let (upstream, mut resp, slot) = match exchanged {
            Ok(r) => r,
            Err(e) => {
                let service = lease.service();
                if body_stalled.is_some_and(|s| s.stalled()) {
                    tracing::debug!(%service, error = %e, "request body stalled");
                    self.refusals.count(Refusal::BodyTimeout);
                    let text = "the request body stopped coming\n".to_string();
                    return self.answer(StatusCode::REQUEST_TIMEOUT, text);
                }
                if matches!(e, UpstreamError::Full(_)) {
                    tracing::debug!(%service, error = %e, "backend connections full");
                    self.refusals.count(Refusal::BackendConnections);
                    let text = format!("service {service}: backends at their connection cap\n");
                    return self.answer(StatusCode::SERVICE_UNAVAILABLE, text);
                }
                if matches!(e, UpstreamError::Tls(..)) {
                    // A setting to mend (a certificate lb does not trust): said loudly,
                    // but not once per request.
                    if let Some(unsaid) = tls_failures_to_say() {
                        tracing::warn!(%service, error = %e, more_since_last_said = unsaid, "backend TLS failed");
                    }
                } else {
                    tracing::debug!(%service, error = %e, "backend failed");
                }
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
            let idle = timeouts
                .tunnel
                .unwrap_or(proxy.config.limits.tunnel_timeout);
            conn.set_tunnel(tunnel(
                client_upgrade,
                backend_upgrade,
                lease,
                slot,
                proxy,
                idle,
            ));
            let (mut parts, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(parts, ResponseBody::empty());
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        if let Some(r) = &rewrite {
            r.response.apply(&mut parts.headers);
        }
        // A client not yet (or no longer) stuck to the backend that answered is now; as
        // HAProxy's `nocache`, a response that sets it is for this client only.
        if let Some(sticky) = &lease.target().sticky
            && stuck_to != Some(lease.index())
            && let Some(cookie) = sticky.set_cookie(lease.index())
        {
            parts.headers.append(SET_COOKIE, cookie);
            if !parts.headers.contains_key(CACHE_CONTROL) {
                parts
                    .headers
                    .insert(CACHE_CONTROL, HeaderValue::from_static("private"));
            }
        }
        let compress = lease
            .target()
            .compress
            .as_ref()
            .is_some_and(|c| gzip_accepted && c.applies(parts.status, &parts.headers));
        if compress {
            Compress::mark(&mut parts.headers);
        }
        let body = Downstream::new(body, upstream, lease);
        let body = if compress {
            ResponseBody::compressed(body)
        } else {
            ResponseBody::proxied(body)
        };
        Response::from_parts(parts, body)
    }

    /// Sends `req` to `backend` and waits for the response head. The connection comes
    /// back with the response (to be driven while its body streams), except for an upgrade
    /// request, whose connection runs in a task of its own and whose place under the
    /// backend's cap comes back instead. A failure gives the request back if the backend
    /// never took it. `timeout`: the route's own for the response head.
    async fn exchange(
        &self,
        backend: &Backend,
        mut req: Request<UpstreamBody>,
        sent: &Option<Arc<Sent>>,
        upgrade: bool,
        timeout: Option<Duration>,
    ) -> Result<Exchanged, Failed> {
        let config = &self.config;
        if backend.is_h2() {
            return self.exchange_h2(backend, req, sent, timeout).await;
        }
        loop {
            let (mut conn, pooled) = match backend.connection(config.connect_timeout).await {
                Ok(c) => c,
                Err(error) => {
                    return Err(Failed {
                        error,
                        unsent: Some(req),
                    });
                }
            };
            let deadline = self.response_deadline(sent, timeout);
            let answered = if upgrade {
                let (mut sender, slot) = conn.into_upgradeable();
                let response = sender.try_send_request(req);
                tokio::select! {
                    biased;
                    r = response => r.map(|resp| (None, resp, Some(slot))),
                    () = deadline => return Err(Failed::sent(UpstreamError::HeaderTimeout(backend.addr))),
                }
            } else {
                let mut response = std::pin::pin!(conn.send(req));
                let driven = poll_fn(|cx| conn.poll_driven(cx, |cx| response.as_mut().poll(cx)));
                let r = tokio::select! {
                    biased;
                    r = driven => r,
                    () = deadline => return Err(Failed::sent(UpstreamError::HeaderTimeout(backend.addr))),
                };
                r.map(|resp| (Some(conn), resp, None))
            };
            match answered {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    // A pooled connection that closed before taking the request (the
                    // backend timed it out): the request is intact, try another.
                    Some(back) if pooled => req = back,
                    // A new one that closed before taking it: the backend failed.
                    unsent => {
                        let error = UpstreamError::Request(backend.addr, e.into_error());
                        return Err(Failed { error, unsent });
                    }
                },
            }
        }
    }

    /// When a backend that has not answered is given up on: the response-head timeout
    /// (the route's own, else the proxy's coarse one), counted from when the request body
    /// has been sent in full.
    async fn response_deadline(&self, sent: &Option<Arc<Sent>>, timeout: Option<Duration>) {
        if let Some(sent) = sent {
            sent.wait().await;
        }
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => self.response_head.expired().await,
        }
    }

    /// As `exchange`, with a backend that speaks HTTP/2: the request goes as one more
    /// stream of the worker's connection to it, which a task of its own drives.
    async fn exchange_h2(
        &self,
        backend: &Backend,
        req: Request<UpstreamBody>,
        sent: &Option<Arc<Sent>>,
        timeout: Option<Duration>,
    ) -> Result<Exchanged, Failed> {
        let mut sender = match backend.h2_sender(self.config.connect_timeout).await {
            Ok(s) => s,
            Err(error) => {
                return Err(Failed {
                    error,
                    unsent: Some(req),
                });
            }
        };
        let deadline = self.response_deadline(sent, timeout);
        let answered = tokio::select! {
            biased;
            r = async {
                // Ready: the connection takes one more stream (its peer's limit).
                if let Err(e) = sender.ready().await {
                    return Err(Failed { error: UpstreamError::Request(backend.addr, e), unsent: Some(req) });
                }
                sender.try_send_request(req).await.map_err(|mut e| {
                    let unsent = e.take_message();
                    Failed { error: UpstreamError::Request(backend.addr, e.into_error()), unsent }
                })
            } => r,
            () = deadline => return Err(Failed::sent(UpstreamError::HeaderTimeout(backend.addr))),
        };
        answered.map(|mut resp| {
            // Told to the client in its own version.
            *resp.version_mut() = Version::HTTP_11;
            (None, resp, None)
        })
    }

    /// lb's own answer, counted.
    /// `code` to the same URL over HTTPS: the Host without its port (an HTTP port is never
    /// the HTTPS one), with the HTTPS listener's port unless it is 443.
    fn to_https(&self, code: StatusCode, host: Option<&str>, uri: &Uri) -> Response<ResponseBody> {
        let Some(host) = host.map(host_without_port).filter(|h| !h.is_empty()) else {
            let text = "this service is served over HTTPS only; send a Host to be redirected\n";
            return self.answer(StatusCode::BAD_REQUEST, text.into());
        };
        let port = match self.config.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        self.redirect(code, true, &format!("{host}{port}"), uri)
    }

    /// `code` to the same path and query on `authority`, over HTTPS or plain HTTP.
    fn redirect(
        &self,
        code: StatusCode,
        https: bool,
        authority: &str,
        uri: &Uri,
    ) -> Response<ResponseBody> {
        let scheme = if https { "https" } else { "http" };
        let target = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let location = format!("{scheme}://{authority}{target}");
        let Ok(location) = HeaderValue::from_str(&location) else {
            return self.answer(
                StatusCode::BAD_REQUEST,
                "a Host that cannot be redirected to\n".into(),
            );
        };
        let mut response = self.answer(
            code,
            format!("moved to {}\n", location.to_str().unwrap_or("")),
        );
        response.headers_mut().insert(LOCATION, location);
        response
    }

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

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
fn host_without_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// A response head, with the connection its body comes on, or (an upgrade) the place the
/// connection holds under its backend's cap.
type Exchanged = (Option<BackendConn>, Response<Incoming>, Option<ConnSlot>);

/// Why `exchange` got no response, and the request if the backend never took it.
struct Failed {
    error: UpstreamError,
    unsent: Option<Request<UpstreamBody>>,
}

impl Failed {
    /// A failure after the request had started out: it cannot be sent again.
    fn sent(error: UpstreamError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

/// `uri` in origin form with `path` for its path, the query as it was. (A normalised path
/// is made of the characters of the one hyper parsed, so this does not fail in practice.)
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    target.parse::<PathAndQuery>().ok().map(Uri::from)
}

/// Splices an upgraded client connection to the upgraded backend connection until either
/// side closes or both are idle for `idle`. The lease keeps the backend's
/// in-flight count up meanwhile, and the slot its connection count.
async fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    lease: Lease,
    slot: Option<ConnSlot>,
    proxy: Arc<Proxy>,
    idle: Duration,
) {
    let addr = lease.backend().addr;
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(backend = %addr, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    if splice_until_idle(&mut client, &mut backend, idle).await {
        tracing::debug!(backend = %addr, "upgraded connection idle: closed");
        proxy.refusals.count(Refusal::TunnelTimeout);
    }
    drop((lease, slot));
}

/// At most one warning of failed backend TLS per this long: a route whose backends lb
/// does not trust fails every request, and a line each would flood the log.
const TLS_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether a backend TLS failure is to be warned of now, and how many were not since the
/// last warning.
fn tls_failures_to_say() -> Option<u64> {
    use std::sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    };
    static START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    // Milliseconds since START of the last warning, plus one (0: none yet).
    static SAID: AtomicU64 = AtomicU64::new(0);
    static UNSAID: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
    let said = SAID.load(Relaxed);
    let due = said == 0 || now.saturating_sub(said) >= TLS_WARN_EVERY.as_millis() as u64;
    if due && SAID.compare_exchange(said, now, Relaxed, Relaxed).is_ok() {
        Some(UNSAID.swap(0, Relaxed))
    } else {
        UNSAID.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_tls_failures_are_warned_of_once_in_a_while_with_the_count_between() {
        assert_eq!(tls_failures_to_say(), Some(0));
        assert_eq!(tls_failures_to_say(), None);
        assert_eq!(tls_failures_to_say(), None);
    }
}
