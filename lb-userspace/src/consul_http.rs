//! A small client for Consul's HTTP API, shared by the Consul store and the health watcher,
//! over HTTP or HTTPS.
//!
//! It knows several agent addresses and sticks to the last one that answered: a request
//! that cannot connect, times out or gets a 5xx moves on to the next address. A write that
//! must not be sent twice (a compare-and-set) moves on only when it could not connect;
//! after any other failure its caller reads to learn whether it took effect. An ACL token,
//! when given, goes with every request as `X-Consul-Token`; a 403 is reported at once (every
//! agent of a datacenter judges a token alike).
use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use reqwest::{Method, StatusCode};

use crate::store::access::Access;

/// How long an ordinary (not blocking) request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// No address gave a usable answer; the message names each address tried and why.
    #[error("{0}")]
    Unreachable(String),
    /// Consul refused the request's token (403).
    #[error(
        "consul at {addr}: 403 Forbidden: the ACL token was refused or lacks permission ({body})"
    )]
    Refused { addr: String, body: String },
}

/// Why a write got no answer to trust.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// No address could be connected to: the write was sent nowhere.
    #[error("{0}")]
    NotSent(String),
    /// The write was sent, but what became of it is unknown: it timed out, the connection
    /// dropped before the answer was whole, or the agent answered with a 5xx (Consul's
    /// servers may have applied it). Only a read can tell.
    #[error("{0}")]
    Unknown(String),
    #[error(transparent)]
    Refused(ConsulError),
}

/// Why a client cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no Consul address given")]
    NoAddress,
    #[error("building the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

/// One answer from an agent.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// `X-Consul-Index`, when the answer carried one.
    pub index: Option<u64>,
    pub body: Vec<u8>,
    /// The agent that answered (`host:port`).
    pub addr: String,
}

impl Reply {
    /// The body as text, shortened for error messages.
    pub fn body_text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        match text.char_indices().nth(200) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text.to_string(),
        }
    }

    /// "consul at ADDR: STATUS: BODY", for an answer the caller did not expect.
    pub fn unexpected(&self) -> String {
        format!(
            "consul at {}: {}: {}",
            self.addr,
            self.status,
            self.body_text()
        )
    }
}

pub struct ConsulClient {
    http: reqwest::Client,
    /// `http` or `https`.
    scheme: &'static str,
    addrs: Vec<String>,
    /// The address that answered last; requests start there.
    current: AtomicUsize,
    token: Option<String>,
}

impl ConsulClient {
    /// A client for the agents at `addrs` (`host:port`, at least one), over HTTP, sending
    /// `token` if given.
    pub fn new(addrs: Vec<String>, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_tls(addrs, token, None)
    }

    /// As [`ConsulClient::new`], over HTTPS when `tls` is given: the agents' certificates
    /// checked as it says, its client certificate presented to agents that ask for one.
    pub fn with_tls(
        addrs: Vec<String>,
        token: Option<String>,
        tls: Option<&Access>,
    ) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddress);
        }
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(access) = tls {
            builder = access
                .http_tls(builder.https_only(true))
                .map_err(ClientError::Http)?;
        }
        let http = builder.build().map_err(ClientError::Http)?;
        Ok(Self {
            http,
            scheme: if tls.is_some() { "https" } else { "http" },
            addrs,
            current: AtomicUsize::new(0),
            token,
        })
    }

    /// Over HTTPS, when no agent answers because TLS failed with one of them (a certificate
    /// refused, or an agent that speaks no TLS): why, naming the agents. Retrying cannot
    /// mend that. `None` when an agent answers (whatever its status), or none can be
    /// reached, or the client speaks plain HTTP.
    pub async fn tls_refusal(&self) -> Option<String> {
        if self.scheme != "https" {
            return None;
        }
        let mut refusals = Vec::new();
        for addr in &self.addrs {
            // Answered without a token by every agent: only the handshake matters here.
            let url = format!("https://{addr}/v1/status/leader");
            match self.http.get(url).timeout(REQUEST_TIMEOUT).send().await {
                Ok(_) => return None,
                Err(e) => {
                    if let Some(tls) = crate::store::access::tls_failure(&e) {
                        refusals.push(format!("consul at {addr}: TLS: {tls}"));
                    }
                }
            }
        }
        (!refusals.is_empty()).then(|| refusals.join("; "))
    }

    /// Every address, joined with commas.
    pub fn addrs(&self) -> String {
        self.addrs.join(",")
    }

    /// Sends `method path_and_query` (a path starting with `/v1/`), trying each address in
    /// turn from the one that answered last, until one answers with anything but a 5xx.
    /// `timeout` bounds each attempt. For reads, and writes that may be sent twice: a
    /// compare-and-set goes through [`ConsulClient::write`].
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Reply, ConsulError> {
        let first = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for step in 0..self.addrs.len() {
            let i = (first + step) % self.addrs.len();
            match self
                .attempt(i, &method, path_and_query, body, timeout)
                .await
            {
                Attempt::Answered(reply) => return self.answered(i, reply),
                Attempt::NotSent(why) | Attempt::Unknown(why) => failures.push(why),
            }
        }
        Err(ConsulError::Unreachable(failures.join("; ")))
    }

    /// Sends a write that must not be sent twice (a compare-and-set: sent again after it
    /// took effect, it fails, and a write that succeeded would be reported as a conflict).
    /// Moves on to the next address only while the write certainly reached no agent (the
    /// connection could not be made); once sent, a timeout, a dropped connection or a 5xx
    /// is [`WriteError::Unknown`], and the next request starts at the next address.
    pub async fn write(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Reply, WriteError> {
        let first = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for step in 0..self.addrs.len() {
            let i = (first + step) % self.addrs.len();
            match self
                .attempt(i, &method, path_and_query, body, timeout)
                .await
            {
                Attempt::Answered(reply) => {
                    return self.answered(i, reply).map_err(WriteError::Refused);
                }
                Attempt::NotSent(why) => failures.push(why),
                Attempt::Unknown(why) => {
                    self.current
                        .store((i + 1) % self.addrs.len(), Ordering::Relaxed);
                    failures.push(why);
                    return Err(WriteError::Unknown(failures.join("; ")));
                }
            }
        }
        Err(WriteError::NotSent(failures.join("; ")))
    }

    /// One request to address `i`.
    async fn attempt(
        &self,
        i: usize,
        method: &Method,
        path_and_query: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Attempt {
        let addr = &self.addrs[i];
        let mut req = self
            .http
            .request(
                method.clone(),
                format!("{}://{addr}{path_and_query}", self.scheme),
            )
            .timeout(timeout);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        if let Some(b) = body {
            req = req.body(b.to_vec());
        }
        let failed = |e: &reqwest::Error| format!("consul at {addr}: {}", reason(e, timeout));
        let resp = match req.send().await {
            Ok(r) => r,
            // A connection that could not be made carried nothing.
            Err(e) if e.is_connect() => return Attempt::NotSent(failed(&e)),
            Err(e) => return Attempt::Unknown(failed(&e)),
        };
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => return Attempt::Unknown(failed(&e)),
        };
        let reply = Reply {
            status,
            index,
            body,
            addr: addr.clone(),
        };
        if status.is_server_error() {
            return Attempt::Unknown(reply.unexpected());
        }
        Attempt::Answered(reply)
    }

    /// An answer from address `i`, which later requests start at; a 403 as an error.
    fn answered(&self, i: usize, reply: Reply) -> Result<Reply, ConsulError> {
        self.current.store(i, Ordering::Relaxed);
        if reply.status == StatusCode::FORBIDDEN {
            return Err(ConsulError::Refused {
                body: reply.body_text(),
                addr: reply.addr,
            });
        }
        Ok(reply)
    }
}

/// What became of one request to one address.
enum Attempt {
    /// An answer other than a 5xx.
    Answered(Reply),
    /// Certainly not sent: the connection could not be made.
    NotSent(String),
    /// Sent, but no answer to trust.
    Unknown(String),
}

/// Why a request failed, in a few words: reqwest's own message names only the URL, the
/// cause is at the bottom of the chain.
fn reason(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {timeout:?}");
    }
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    if e.is_connect() {
        format!("cannot connect ({root})")
    } else {
        root.to_string()
    }
}

/// The `wait` parameter of a blocking query (whole seconds, or milliseconds below one
/// second).
pub fn wait_param(wait: Duration) -> String {
    if wait.as_millis().is_multiple_of(1000) {
        format!("{}s", wait.as_secs())
    } else {
        format!("{}ms", wait.as_millis())
    }
}

/// How long to let a blocking query with this `wait` run before giving up on it: Consul
/// adds up to wait/16 of its own, and the answer needs time to travel.
pub fn blocking_timeout(wait: Duration) -> Duration {
    wait + wait / 16 + REQUEST_TIMEOUT
}

/// The index for the next blocking query after an answer at `answered`, when the last one
/// was `previous`, following Consul's rules for blocking queries: an index that went
/// backwards starts the loop over (0: the next query does not block), and an index below
/// 1 is never waited on (1 always is safe).
pub fn next_index(previous: u64, answered: u64) -> u64 {
    if answered < previous {
        0
    } else {
        answered.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_index_rules() {
        assert_eq!(next_index(0, 0), 1, "never wait on index 0");
        assert_eq!(next_index(5, 9), 9);
        assert_eq!(next_index(5, 5), 5, "no change: wait again");
        assert_eq!(next_index(9, 5), 0, "backwards: start over");
    }

    #[test]
    fn wait_parameter() {
        assert_eq!(wait_param(Duration::from_secs(30)), "30s");
        assert_eq!(wait_param(Duration::from_millis(250)), "250ms");
        assert_eq!(
            blocking_timeout(Duration::from_secs(32)),
            Duration::from_secs(39)
        );
    }

    #[tokio::test]
    async fn every_address_is_named_when_none_answers() {
        // Two distinct ports nothing listens on (both held until both are chosen).
        let held: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(held);
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let client = ConsulClient::new(addrs.clone(), None).unwrap();
        let err = client
            .request(Method::GET, "/v1/kv/x", None, REQUEST_TIMEOUT)
            .await
            .unwrap_err()
            .to_string();
        for a in &addrs {
            assert!(
                err.contains(&format!("consul at {a}: cannot connect")),
                "{err}"
            );
        }
    }
}
