//! What one client may cost the proxy: how long it may take to send a request head or a
//! body, or to read a response; how large a head may be; how many connections all
//! clients and one client may hold; how many streams an h2 connection may
//! run. Each refusal is counted ([`Refusals`]).
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// The limits of the proxy; see each flag's help in main.rs for the why.
#[derive(Debug, Clone)]
pub struct Limits {
    /// To receive a request head in full, counted from the connection's accept for the
    /// first request and from the end of the one before for each next (HTTP/1.1): it also
    /// bounds the wait for the next request on a keep-alive connection. Checked at the
    /// connection's looks: a late head is closed within half a timeout more at most.
    pub header_timeout: Duration,
    /// How long a request body may send nothing before the request is given up (408) and
    /// its backend connection closed.
    pub body_timeout: Duration,
    /// How long a response may wait for the client to take more of it before the client
    /// connection (and the backend's) is closed.
    pub response_timeout: Duration,
    /// How long an upgraded connection (WebSocket) may carry nothing either way.
    pub tunnel_timeout: Duration,
    /// A request head's largest size (HTTP/1.1: the head; h2: the header list), beyond
    /// which it is refused with 431.
    pub max_header_bytes: usize,
    /// Client connections served at once; 0: half of the file descriptors the process
    /// may open, less a reserve (each client connection may hold a backend connection).
    pub max_connections: usize,
    /// Client connections from one address (IPv6: one /64) at once; 0: no limit.
    pub max_connections_per_client: usize,
    /// Connections open to one backend at once (pooled, in use, upgraded); 0: no limit.
    pub max_connections_per_backend: usize,
    /// Streams an h2 connection may have open at once.
    pub h2_max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(30),
            tunnel_timeout: Duration::from_secs(3600),
            max_header_bytes: 64 << 10,
            max_connections: 0,
            max_connections_per_client: 256,
            max_connections_per_backend: 1024,
            h2_max_streams: 100,
        }
    }
}

/// File descriptors kept out of the client connection budget: the daemon's own (API,
/// store, health checks, BPF objects) and room for backend connections beyond one per
/// client connection.
const FD_RESERVE: u64 = 1024;

/// The h2 resets a client may cause before its connection is closed (GOAWAY
/// ENHANCE_YOUR_CALM): streams it opens and resets before they are served (rapid reset,
/// CVE-2023-44487), and streams lb has to reset for its errors (opened above the
/// concurrency cap, for one).
pub(crate) const H2_MAX_PENDING_RESETS: usize = 20;
pub(crate) const H2_MAX_ERROR_RESETS: usize = 100;

/// HTTP/1.1 keeps at least this much read buffer (hyper's minimum).
pub(crate) const MIN_HEADER_BUFFER: usize = 8192;

impl Limits {
    /// The connection cap, with 0 resolved from the process's file descriptor limit.
    pub fn connection_cap(&self) -> usize {
        if self.max_connections != 0 {
            return self.max_connections;
        }
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        (soft.saturating_sub(FD_RESERVE) / 2).clamp(64, usize::MAX as u64) as usize
    }
}

/// Raises the process's soft file descriptor limit to its hard limit (often 1024 and
/// 524288 under systemd): client connections are capped below it rather than by it.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "raising the file descriptor limit");
    }
}

/// Why the proxy refused or cut a client, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A request head not received in full in time (connection closed).
    HeaderTimeout,
    /// A request head too large (431).
    HeaderTooLarge,
    /// A request body that stopped coming (408, backend connection closed).
    BodyTimeout,
    /// A response the client stopped reading (connection closed).
    ResponseTimeout,
    /// An upgraded connection idle for too long (closed).
    TunnelTimeout,
    /// A connection above the cap of all connections (closed at accept).
    Connections,
    /// A connection above the cap of one client's (closed at accept).
    ClientConnections,
    /// An h2 connection closed for resetting too many streams (GOAWAY).
    H2Resets,
    /// A request whose backends all had their most connections open (503).
    BackendConnections,
    /// A TLS handshake that failed, or did not finish within the header timeout (closed).
    TlsHandshake,
}

impl Refusal {
    const ALL: [Refusal; 10] = [
        Self::HeaderTimeout,
        Self::HeaderTooLarge,
        Self::BodyTimeout,
        Self::ResponseTimeout,
        Self::TunnelTimeout,
        Self::Connections,
        Self::ClientConnections,
        Self::H2Resets,
        Self::BackendConnections,
        Self::TlsHandshake,
    ];

    /// Its name in the stats.
    pub fn name(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::HeaderTooLarge => "header_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::ResponseTimeout => "response_timeout",
            Self::TunnelTimeout => "tunnel_timeout",
            Self::Connections => "connections",
            Self::ClientConnections => "client_connections",
            Self::H2Resets => "h2_resets",
            Self::BackendConnections => "backend_connections",
            Self::TlsHandshake => "tls_handshake",
        }
    }
}

/// Refusals by kind.
#[derive(Default)]
pub(crate) struct Refusals([AtomicU64; Refusal::ALL.len()]);

impl Refusals {
    pub fn count(&self, why: Refusal) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        Refusal::ALL
            .iter()
            .map(|&r| {
                (
                    r.name().to_string(),
                    self.0[r as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// Client connections held, in all and per client, against their caps.
pub(crate) struct ConnectionCaps {
    max: usize,
    max_per_client: usize,
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted client connection; its place is given back on drop.
pub(crate) struct Admitted {
    caps: Arc<ConnectionCaps>,
    client: IpAddr,
}

impl ConnectionCaps {
    pub fn new(max: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            max_per_client,
            open: AtomicUsize::new(0),
            per_client: Mutex::default(),
        })
    }

    /// Admits a connection from `client`, or tells which cap it is above.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, Refusal> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Connections);
        }
        let client = client_key(client);
        if self.max_per_client != 0 {
            let mut per_client = self.per_client.lock().unwrap();
            let held = per_client.entry(client).or_default();
            if *held >= self.max_per_client {
                drop(per_client);
                self.open.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::ClientConnections);
            }
            *held += 1;
        }
        Ok(Admitted {
            caps: self.clone(),
            client,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let caps = &self.caps;
        if caps.max_per_client != 0 {
            let mut per_client = caps.per_client.lock().unwrap();
            if let Some(held) = per_client.get_mut(&self.client) {
                *held -= 1;
                if *held == 0 {
                    per_client.remove(&self.client);
                }
            }
        }
        caps.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What counts as one client: an IPv4 address, or an IPv6 /64 (what one host is usually
/// given, so that it cannot step round the cap by changing addresses).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Bytes a client must take of its responses per response timeout while its socket is
/// full, or be taken for one that stopped reading. A few bytes taken now and then
/// (window probes, a reader that trickles) are no progress.
pub(crate) const MIN_PROGRESS: u64 = 16 << 10;

/// What went through a socket: bytes read and written, and since when its writes have
/// found it full without the peer taking [`MIN_PROGRESS`] bytes (the peer not reading).
pub(crate) struct IoCounters {
    pub read: AtomicU64,
    pub written: AtomicU64,
    /// Whether the last write found the socket full.
    write_blocked: AtomicBool,
    /// `written` when the peer last took [`MIN_PROGRESS`] bytes.
    progress_mark: AtomicU64,
    /// When a write first found the socket full since `progress_mark`, as milliseconds
    /// after `epoch` plus one; 0: not since. The clock is read once per stall, not per
    /// write.
    stalled_at: AtomicU64,
    epoch: Instant,
}

impl Default for IoCounters {
    fn default() -> Self {
        Self {
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            progress_mark: AtomicU64::new(0),
            stalled_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl IoCounters {
    /// Since when the socket has been full with the peer taking next to nothing of it;
    /// None while it takes what is written, or while there is nothing to write (a slow
    /// backend leaves the socket with room).
    pub fn stalled_since(&self) -> Option<Instant> {
        if !self.write_blocked.load(Ordering::Relaxed) {
            return None;
        }
        match self.stalled_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.epoch + Duration::from_millis(at - 1)),
        }
    }

    fn wrote(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) => {
                let written = self.written.fetch_add(*n as u64, Ordering::Relaxed) + *n as u64;
                if written >= self.progress_mark.load(Ordering::Relaxed) + MIN_PROGRESS {
                    self.progress_mark.store(written, Ordering::Relaxed);
                    self.stalled_at.store(0, Ordering::Relaxed);
                }
                self.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                self.write_blocked.store(true, Ordering::Relaxed);
                if self.stalled_at.load(Ordering::Relaxed) == 0 {
                    let at = self.epoch.elapsed().as_millis() as u64 + 1;
                    self.stalled_at.store(at, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A socket that keeps [`IoCounters`]: what tells a request head in progress from a
/// keep-alive connection waiting for its next request, and a client that stopped reading
/// from a backend that is slow to answer.
pub(crate) struct CountedIo<T> {
    inner: T,
    counters: Arc<IoCounters>,
}

impl<T> CountedIo<T> {
    pub fn new(inner: T, counters: Arc<IoCounters>) -> Self {
        Self { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counters.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.counters.wrote(&polled);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.counters.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Splices two upgraded connections until either side closes or neither carries a byte
/// for `idle`; tells whether it ended for being idle.
pub(crate) async fn splice_until_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> bool
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let moved = Arc::new(IoCounters::default());
    let (mut a, mut b) = (
        CountedIo::new(a, moved.clone()),
        CountedIo::new(b, moved.clone()),
    );
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    // Looked at four times per idle period: closed after between 1 and 1.25 of them.
    let look = (idle / 4).max(Duration::from_millis(10));
    let mut looks = tokio::time::interval_at(tokio::time::Instant::now() + look, look);
    let (mut seen, mut quiet) = (0, 0);
    loop {
        tokio::select! {
            done = &mut copy => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
                return false;
            }
            _ = looks.tick() => {
                // Every byte either way is read from one side.
                let now = moved.read.load(Ordering::Relaxed);
                if now != seen {
                    (seen, quiet) = (now, 0);
                    continue;
                }
                quiet += 1;
                if quiet >= 4 {
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_cap_refuses_the_next_and_frees_on_drop() {
        let caps = ConnectionCaps::new(10, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = caps.admit(a).unwrap();
        let _second = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).err(), Some(Refusal::ClientConnections));
        let _other = caps.admit(b).unwrap();
        drop(first);
        let _again = caps.admit(a).unwrap();
        assert_eq!(caps.open.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn total_cap_refuses_above_it() {
        let caps = ConnectionCaps::new(2, 0);
        let held: Vec<_> = (1..=2)
            .map(|i| caps.admit(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(
            caps.admit("10.0.0.9".parse().unwrap()).err(),
            Some(Refusal::Connections)
        );
        drop(held);
        assert!(caps.admit("10.0.0.9".parse().unwrap()).is_ok());
        assert!(caps.per_client.lock().unwrap().is_empty());
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let caps = ConnectionCaps::new(10, 1);
        let _one = caps.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            caps.admit("2001:db8::2:3".parse().unwrap()).err(),
            Some(Refusal::ClientConnections)
        );
        assert!(caps.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
        let _v4 = caps.admit("10.1.1.1".parse().unwrap()).unwrap();
        assert_eq!(
            caps.admit("::ffff:10.1.1.1".parse().unwrap()).err(),
            Some(Refusal::ClientConnections)
        );
    }

    #[test]
    fn the_automatic_cap_leaves_descriptors_for_backends() {
        let cap = Limits::default().connection_cap() as u64;
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert!(cap * 2 < soft.max(128 + FD_RESERVE), "{cap} of {soft}");
    }

    #[test]
    fn a_stall_lasts_from_the_first_full_write_until_real_progress() {
        let io = IoCounters::default();
        let wrote = |n: usize| io.wrote(&Poll::Ready(Ok(n)));
        let full = || io.wrote(&Poll::Pending);
        wrote(100_000);
        assert_eq!(io.stalled_since(), None, "taking what is written");
        full();
        let since = io.stalled_since().expect("full: stalled");
        // Window probes and a trickling reader: a few bytes taken, the stall goes on from
        // its first moment.
        std::thread::sleep(Duration::from_millis(5));
        for _ in 0..10 {
            wrote(1000);
            full();
        }
        assert_eq!(io.stalled_since(), Some(since));
        // Written, not full again: nothing to write (a slow backend) is no stall.
        wrote(1000);
        assert_eq!(io.stalled_since(), None);
        full();
        assert_eq!(io.stalled_since(), Some(since));
        // MIN_PROGRESS taken: a new stall starts at the next full write.
        wrote(MIN_PROGRESS as usize);
        full();
        assert!(io.stalled_since().unwrap() > since);
    }
}
