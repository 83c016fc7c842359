//! Backends and clients for the tests and the demo. A backend answers every HTTP request
//! (keep-alive) and every UDP datagram with its own name, so a client sees where the
//! balancer sent it.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, bail};

use crate::netns::Netns;

/// An HTTP and UDP "who am I" server in a namespace; stops on drop.
pub struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Reads one CRLF-terminated line; `None` at the end of the stream. A read timeout only
/// serves to notice the stop.
fn read_line(
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
    stop: &AtomicBool,
) -> Option<()> {
    line.clear();
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        match reader.read_line(line) {
            Ok(0) => return None,
            Ok(_) if line.ends_with('\n') => return Some(()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return None,
        }
    }
}

/// Reads a request body (by length or chunked) and returns its size and a checksum, without
/// keeping it.
fn drain_body(
    reader: &mut BufReader<TcpStream>,
    length: usize,
    chunked: bool,
    stop: &AtomicBool,
) -> Option<(u64, u64)> {
    let (mut total, mut sum) = (0u64, 0u64);
    let mut take = |reader: &mut BufReader<TcpStream>, mut n: usize| -> Option<()> {
        let mut buf = [0u8; 65536];
        while n > 0 {
            let want = n.min(buf.len());
            match reader.read(&mut buf[..want]) {
                Ok(0) => return None,
                Ok(got) => {
                    for &b in &buf[..got] {
                        sum = sum.wrapping_mul(31).wrapping_add(b as u64);
                    }
                    total += got as u64;
                    n -= got;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && !stop.load(Ordering::Relaxed) => {}
                Err(_) => return None,
            }
        }
        Some(())
    };
    if !chunked {
        take(reader, length)?;
        return Some((total, sum));
    }
    let mut line = String::new();
    loop {
        read_line(reader, &mut line, stop)?;
        let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                read_line(reader, &mut line, stop)?;
                if line == "\r\n" || line == "\n" {
                    return Some((total, sum));
                }
            }
        }
        take(reader, size)?;
        read_line(reader, &mut line, stop)?;
    }
}

/// Answers HTTP/1.1 requests on one connection (keep-alive) until the client closes or
/// the server stops. Every answer's body is the server's name, except:
/// `GET .../headers` answers with the request head as received; `GET .../big/N` with N bytes;
/// a request with a body answers "NAME LENGTH CHECKSUM" after reading it all; an
/// `Upgrade` request is switched (101) and then every byte is echoed back.
fn serve_http(stream: TcpStream, name: String, stop: Arc<AtomicBool>) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // One request head.
        let mut head = String::new();
        let (mut length, mut chunked, mut upgrade) = (0usize, false, false);
        loop {
            if read_line(&mut reader, &mut line, &stop).is_none() {
                return;
            }
            if head.is_empty() && (line == "\r\n" || line == "\n") {
                continue;
            }
            head.push_str(&line);
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if lower.starts_with("upgrade:") {
                upgrade = true;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        if upgrade {
            let _ = writer.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            );
            // Echo whatever follows, including bytes already read.
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if writer.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) && !stop.load(Ordering::Relaxed) => {}
                    Err(_) => return,
                }
            }
        }
        let body: Vec<u8> = if length > 0 || chunked {
            match drain_body(&mut reader, length, chunked, &stop) {
                Some((n, sum)) => format!("{name} {n} {sum}").into_bytes(),
                None => return,
            }
        } else if target.split('?').next().unwrap_or("").ends_with("/headers") {
            head.clone().into_bytes()
        } else if let Some(n) = target.rsplit_once("/big/").map(|(_, n)| n) {
            let n: usize = n.parse().unwrap_or(0);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
            if writer.write_all(head.as_bytes()).is_err() {
                return;
            }
            let chunk = vec![b'x'; 65536];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if writer.write_all(&chunk[..k]).is_err() {
                    return;
                }
                left -= k;
            }
            continue;
        } else {
            name.clone().into_bytes()
        };
        // Head and body in one write, as servers do (writev): two small writes would wait
        // on the client's delayed ACK (Nagle), 40 ms a request, and tests measuring a rate
        // would measure that timer.
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nX-Backend: {name}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        resp.extend_from_slice(&body);
        if writer.write_all(&resp).is_err() {
            return;
        }
    }
}

impl Backend {
    /// Serves HTTP on `tcp` and answers datagrams on `udp` (if given), inside `ns`.
    pub fn start(
        ns: &Netns,
        name: &str,
        tcp: SocketAddr,
        udp: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let (listener, socket) = ns.run(move || -> anyhow::Result<_> {
            let l = TcpListener::bind(tcp)?;
            let u = match udp {
                Some(a) => Some(UdpSocket::bind(a)?),
                None => None,
            };
            Ok((l, u))
        })?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (stop, name) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let (stop, name) = (stop.clone(), name.clone());
                            conns.push(std::thread::spawn(move || serve_http(s, name, stop)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            }));
        }
        if let Some(sock) = socket {
            let (stop, name) = (stop.clone(), name.to_string());
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(name.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A keep-alive HTTP connection made from inside a namespace.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn connect(ns: &Netns, to: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let stream = ns
            .run(move || TcpStream::connect_timeout(&to, timeout))
            .with_context(|| format!("connecting to {to}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// Sends `METHOD path` (with `Host: host`, and `body` if not empty) and returns the
    /// status and body of the answer (which must have a Content-Length).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, String)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut line = String::new();
        let mut len = 0usize;
        let mut status = 0u16;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed before the response");
            }
            if status == 0 {
                status = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .context("no status line")?;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut answer = vec![0u8; len];
        self.reader.read_exact(&mut answer)?;
        Ok((status, String::from_utf8_lossy(&answer).into_owned()))
    }

    /// The underlying connection (for upgrades and large bodies).
    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    /// The reader over the connection.
    pub fn reader(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.reader
    }

    /// Sends `GET /` and returns the body (the backend's name).
    pub fn get(&mut self) -> anyhow::Result<String> {
        self.get_path("/")
    }

    /// Sends `GET path` and returns the body of a 200 answer.
    pub fn get_path(&mut self, path: &str) -> anyhow::Result<String> {
        self.reader
            .get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes())?;
        let mut line = String::new();
        let mut len = None;
        let mut status = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed before the response");
            }
            if status.is_empty() {
                status = line.trim().to_string();
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = Some(v.trim().parse::<usize>()?);
            }
            if line == "\r\n" {
                break;
            }
        }
        if !status.contains(" 200 ") {
            bail!("unexpected status {status:?}");
        }
        let mut body = vec![0u8; len.context("no content-length")?];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8(body)?)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.reader.get_ref().local_addr().expect("local addr")
    }
}

/// One request on a new connection: which backend answered.
pub fn http_get_once(ns: &Netns, to: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    HttpConn::connect(ns, to, timeout)?.get()
}

/// Sends one datagram from a new socket in `ns` and returns the answer.
pub fn udp_ask(ns: &Netns, to: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let sock = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(b"who", to)?;
    let mut buf = [0u8; 256];
    let (n, _) = sock.recv_from(&mut buf).context("no UDP answer")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A request of a [`ClientLoad`] that got no answer (connection refused, reset, timed out).
#[derive(Debug)]
pub struct LoadFailure {
    /// On the long-lived connection, not a new one.
    pub kept: bool,
    /// When it failed.
    pub at: std::time::Instant,
    pub error: String,
}

/// What a [`ClientLoad`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests on new connections that got their answer.
    pub answered: usize,
    /// Requests that did not.
    pub failures: Vec<LoadFailure>,
    /// Requests on the one long-lived connection that got their answer, and which
    /// backends answered it (one, if the flow never moved).
    pub kept_answered: usize,
    pub kept_backends: std::collections::BTreeSet<String>,
}

/// A client in a namespace that keeps opening connections to `to` (one request each)
/// and keeps one keep-alive connection busy, until stopped.
pub struct ClientLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests on new connections answered so far.
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<LoadReport>>,
}

impl ClientLoad {
    pub fn start(ns: &Netns, to: SocketAddr) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = ns.path();
        let flag = stop.clone();
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let progress = answered.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&file),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .expect("setns");
            let timeout = Duration::from_secs(2);
            let mut report = LoadReport::default();
            let failed = |kept, e: anyhow::Error| LoadFailure {
                kept,
                at: std::time::Instant::now(),
                error: format!("{e:#}"),
            };
            let once = || -> anyhow::Result<String> {
                let stream = TcpStream::connect_timeout(&to, timeout)?;
                stream.set_read_timeout(Some(timeout))?;
                HttpConn {
                    reader: BufReader::new(stream),
                }
                .get()
            };
            let mut kept = TcpStream::connect_timeout(&to, timeout).map(|s| {
                let _ = s.set_read_timeout(Some(timeout));
                HttpConn {
                    reader: BufReader::new(s),
                }
            });
            let _ = ready_tx.send(());
            while !flag.load(Ordering::Relaxed) {
                match once() {
                    Ok(_) => {
                        report.answered += 1;
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => report.failures.push(failed(false, e)),
                }
                match kept
                    .as_mut()
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .and_then(HttpConn::get)
                {
                    Ok(backend) => {
                        report.kept_answered += 1;
                        report.kept_backends.insert(backend);
                    }
                    Err(e) => report.failures.push(failed(true, e)),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            report
        });
        ready_rx.recv()?;
        Ok(Self {
            stop,
            answered,
            thread: Some(thread),
        })
    }

    /// Waits until `n` requests on new connections have been answered: the load is
    /// flowing. False if that takes longer than `within`.
    pub fn wait_answered(&self, n: usize, within: Duration) -> bool {
        crate::eventually(within, || {
            self.answered.load(std::sync::atomic::Ordering::Relaxed) >= n
        })
    }

    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("client thread")
    }
}

impl Drop for ClientLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An HTTPS backend inside a namespace: answers every request with
/// `tls NAME PATH proto=X-Forwarded-Proto`, over TLS with `config`'s certificate.
pub struct TlsBackend {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsBackend {
    pub fn start(
        ns: &Netns,
        name: &str,
        addr: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let name = name.to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = axum::Router::new().fallback(
                    move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
                        let proto = headers
                            .get("x-forwarded-proto")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let name = name.clone();
                        async move { format!("tls {name} {} proto={proto}\n", uri.path()) }
                    },
                );
                let listener = crate::pki::TlsListener::new(listener, config);
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
