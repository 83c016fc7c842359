//! Active health checks, with HAProxy's meaning of rise and fall: a backend starts up,
//! goes down after `fall` failed checks in a row and comes back after `rise` good ones.
//! One task per (service, backend), started at an offset within the interval that depends
//! on the pair, so that thousands of checks are spread over time rather than fired at once.
//! Each node checks for itself; the results are never stored.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    runtime::Handle,
    task::JoinHandle,
};

use crate::model::{Check, CheckKind};

/// A backend of a service changed state.
#[derive(Debug, Clone)]
pub struct HealthEvent {
    pub service: String,
    pub backend: SocketAddrV4,
    pub up: bool,
    /// Why the last check failed (for a backend going down).
    pub reason: String,
}

/// Where a check task reports a state change: false when nobody listens any more (the
/// task then ends).
pub type Report = std::sync::Arc<dyn Fn(HealthEvent) -> bool + Send + Sync>;

/// The check tasks of every service.
pub struct Checker {
    report: Report,
    /// Where the tasks run: the runtime `new` was called on (the checker itself is driven
    /// from the controller's own thread).
    runtime: Handle,
    services: HashMap<String, (Check, HashMap<SocketAddrV4, JoinHandle<()>>)>,
}

impl Checker {
    /// A checker whose tasks run on the current tokio runtime and call `report` on each
    /// state change.
    pub fn new(report: Report) -> Self {
        Self {
            report,
            runtime: Handle::current(),
            services: HashMap::new(),
        }
    }

    /// Checks exactly `backends` of `service` with `check` from now on: tasks for new
    /// backends start (their backend counts as up, unless in `down`), tasks for gone ones
    /// stop, and all restart when the check changed.
    pub fn sync(
        &mut self,
        service: &str,
        backends: &[SocketAddrV4],
        down: &[SocketAddrV4],
        check: &Check,
    ) {
        let entry = self
            .services
            .entry(service.to_string())
            .or_insert_with(|| (check.clone(), HashMap::new()));
        if entry.0 != *check {
            for (_, task) in entry.1.drain() {
                task.abort();
            }
            entry.0 = check.clone();
        }
        entry.1.retain(|addr, task| {
            let keep = backends.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        if check.kind == CheckKind::None {
            return;
        }
        for &addr in backends {
            entry.1.entry(addr).or_insert_with(|| {
                self.runtime.spawn(watch(
                    service.to_string(),
                    addr,
                    check.clone(),
                    !down.contains(&addr),
                    self.report.clone(),
                ))
            });
        }
    }

    /// Stops checking `service`.
    pub fn stop(&mut self, service: &str) {
        if let Some((_, tasks)) = self.services.remove(service) {
            for (_, task) in tasks {
                task.abort();
            }
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, (_, tasks)) in self.services.drain() {
            for (_, task) in tasks {
                task.abort();
            }
        }
    }
}

/// Where in the interval the checks of this pair fall.
fn offset(service: &str, addr: SocketAddrV4, interval: Duration) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (service, addr).hash(&mut h);
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(h.finish() % ms)
}

async fn watch(service: String, backend: SocketAddrV4, check: Check, mut up: bool, report: Report) {
    let interval = Duration::from_millis(check.interval_ms);
    tokio::time::sleep(offset(&service, backend, interval)).await;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = 0u32;
    loop {
        ticks.tick().await;
        let result = probe(&check, backend).await;
        let flips = match (&result, up) {
            (Ok(()), true) | (Err(_), false) => {
                streak = 0;
                false
            }
            (Err(_), true) => {
                streak += 1;
                streak >= check.fall
            }
            (Ok(()), false) => {
                streak += 1;
                streak >= check.rise
            }
        };
        if flips {
            up = !up;
            streak = 0;
            let event = HealthEvent {
                service: service.clone(),
                backend,
                up,
                reason: result.err().map(|e| e.to_string()).unwrap_or_default(),
            };
            if !report(event) {
                return;
            }
        }
    }
}

/// Why a check of a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect {target}: {source}")]
    Connect {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("sending to {target}: {source}")]
    Send {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading from {target}: {source}")]
    Read {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("{target} closed the connection without an answer")]
    NoAnswer { target: SocketAddr },
    /// The HTTP status is not the one expected.
    #[error("{target}{path} answered {status}, not {expect}")]
    Status {
        target: SocketAddr,
        path: String,
        status: u16,
        expect: u16,
    },
    #[error("{target}{path} did not answer HTTP")]
    NotHttp { target: SocketAddr, path: String },
    #[error("no answer from {target} within {timeout:?}")]
    Timeout {
        target: SocketAddr,
        timeout: Duration,
    },
}

/// One check of `backend`: Ok, or why it failed.
pub async fn probe(check: &Check, backend: SocketAddrV4) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(check.timeout_ms);
    let target = SocketAddr::V4(SocketAddrV4::new(
        *backend.ip(),
        check.port.unwrap_or(backend.port()),
    ));
    let attempt = async {
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|source| ProbeError::Connect { target, source })?;
        if check.kind != CheckKind::Http {
            return Ok(());
        }
        let path = check.path.as_deref().unwrap_or("/");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|source| ProbeError::Send { target, source })?;
        // The status line is all that is needed: "HTTP/1.1 200 OK".
        let mut head = [0u8; 32];
        let mut got = 0;
        while got < 12 {
            let n = stream
                .read(&mut head[got..])
                .await
                .map_err(|source| ProbeError::Read { target, source })?;
            if n == 0 {
                return Err(ProbeError::NoAnswer { target });
            }
            got += n;
        }
        let line = String::from_utf8_lossy(&head[..got]);
        let status: Option<u16> = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse().ok());
        let expect = check.expect.unwrap_or(200);
        let path = path.to_string();
        match status {
            Some(status) if status == expect => Ok(()),
            Some(status) => Err(ProbeError::Status {
                target,
                path,
                status,
                expect,
            }),
            None => Err(ProbeError::NotHttp { target, path }),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout { target, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CheckSpec;

    fn check(kind: &str, path: Option<&str>) -> Check {
        CheckSpec {
            kind: Some(kind.into()),
            path: path.map(Into::into),
            interval_ms: Some(100),
            timeout_ms: Some(100),
            rise: Some(2),
            fall: Some(2),
            ..CheckSpec::default()
        }
        .validate()
        .unwrap()
    }

    /// A server answering every connection with `status`.
    async fn http_server(status: u16) -> SocketAddrV4 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn probes_tell_good_from_bad() {
        let ok = http_server(200).await;
        let failing = http_server(503).await;
        probe(&check("http", Some("/health")), ok).await.unwrap();
        probe(&check("tcp", None), ok).await.unwrap();
        let e = probe(&check("http", Some("/health")), failing)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{failing}/health answered 503, not 200")
        );
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let SocketAddr::V4(a) = l.local_addr().unwrap() else {
                unreachable!()
            };
            a
        };
        let e = probe(&check("tcp", None), closed).await.unwrap_err();
        assert!(matches!(e, ProbeError::Connect { .. }), "{e}");
        assert!(
            e.to_string().starts_with(&format!("connect {closed}: ")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_backend_falls_after_fall_failures_and_rises_after_rise_successes() {
        use std::sync::atomic::{AtomicU16, AtomicU32, Ordering::Relaxed};
        // A server whose answer the test switches, counting the answers of each kind.
        let status = std::sync::Arc::new(AtomicU16::new(200));
        let served = std::sync::Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let (answer, count) = (status.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let code = answer.load(Relaxed);
                count[usize::from(code != 200)].fetch_add(1, Relaxed);
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\n\r\n").as_bytes())
                    .await;
            }
        });
        // Fall and rise differ, so that one counted for the other shows.
        let spec = CheckSpec {
            kind: Some("http".into()),
            path: Some("/".into()),
            interval_ms: Some(100),
            timeout_ms: Some(100),
            rise: Some(2),
            fall: Some(3),
            ..CheckSpec::default()
        }
        .validate()
        .unwrap();
        let (events_in, mut events) = tokio::sync::mpsc::unbounded_channel();
        let mut checker = Checker::new(std::sync::Arc::new(move |e| events_in.send(e).is_ok()));
        checker.sync("web", &[addr], &[], &spec);
        // Healthy: no event for a while.
        assert!(
            tokio::time::timeout(Duration::from_millis(400), events.recv())
                .await
                .is_err()
        );
        let failed_before = served[1].load(Relaxed);
        status.store(500, Relaxed);
        let down = tokio::time::timeout(Duration::from_secs(2), events.recv())
            .await
            .unwrap()
            .unwrap();
        // The next check is an interval away: the counts are those that decided.
        let failures = served[1].load(Relaxed) - failed_before;
        assert!(!down.up && down.backend == addr && down.reason.contains("500"));
        assert_eq!(
            failures, 3,
            "down after {failures} failed checks, not fall (3)"
        );
        let ok_before = served[0].load(Relaxed);
        status.store(200, Relaxed);
        let up = tokio::time::timeout(Duration::from_secs(2), events.recv())
            .await
            .unwrap()
            .unwrap();
        let successes = served[0].load(Relaxed) - ok_before;
        assert!(up.up);
        assert_eq!(
            successes, 2,
            "up after {successes} good checks, not rise (2)"
        );
        // Removing the backend stops its checks.
        checker.sync("web", &[], &[], &spec);
        status.store(500, Relaxed);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), events.recv())
                .await
                .is_err()
        );
    }

    #[test]
    fn offsets_spread_over_the_interval() {
        let interval = Duration::from_millis(1000);
        let offsets: std::collections::HashSet<u128> = (0..100u16)
            .map(|i| {
                offset(
                    "web",
                    SocketAddrV4::new([10, 0, 0, 1].into(), 8000 + i),
                    interval,
                )
                .as_millis()
                    / 100
            })
            .collect();
        assert!(offsets.len() >= 8, "{offsets:?}");
    }
}
