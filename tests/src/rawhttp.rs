//! A bare HTTP/1.1 client: it sends a request exactly as written (a path with `..` or
//! `%2e%2e`, any `Host`, `Origin` or `Sec-Fetch-Site`), over TCP or a Unix socket, and reads
//! the answer to the end of the connection. Clients such as ureq normalise a path and set
//! their own `Host`, which is what the API's guards and fuzz test must not have done for them.
use std::{
    io::{Read, Write},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

/// Where a request goes.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

/// An answer: status, headers and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON (Null when empty, a string when not JSON).
    pub fn json(&self) -> Value {
        let text = String::from_utf8_lossy(&self.body);
        if text.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
    }

    /// Every value of header `name`.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A request's bytes: `METHOD TARGET HTTP/1.1`, the headers given (no Host unless one of
/// them), `Connection: close`, and the body with its length.
pub fn request(
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n");
    if let Some(body) = body {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    out
}

/// Sends `bytes` to `target` and reads the answer to the end of the connection (call from
/// inside the namespace the target is in). An error when the connection closes without a
/// whole answer.
pub fn exchange(target: &Target, bytes: &[u8], timeout: Duration) -> anyhow::Result<Answer> {
    let received = match target {
        Target::Tcp(addr) => {
            let stream = std::net::TcpStream::connect_timeout(addr, timeout)
                .with_context(|| format!("connecting to {addr}"))?;
            send_and_read(stream, bytes, timeout)
        }
        Target::Unix(path) => {
            let stream = std::os::unix::net::UnixStream::connect(path)
                .with_context(|| format!("connecting to {}", path.display()))?;
            send_and_read(stream, bytes, timeout)
        }
    }?;
    parse(&received, bytes.starts_with(b"HEAD "))
}

trait Timeouts {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}

impl Timeouts for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Timeouts for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

fn send_and_read(
    mut stream: impl Read + Write + Timeouts,
    bytes: &[u8],
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    stream.set_timeouts(timeout)?;
    // A server may answer (400, 414, 431) before it has read all of a request it refuses,
    // and close: a failed write is then no error, the answer is what counts.
    let _ = stream.write_all(bytes);
    let mut received = Vec::new();
    let read = stream.read_to_end(&mut received);
    if let Err(e) = read
        && received.is_empty()
    {
        return Err(e).context("reading the answer");
    }
    Ok(received)
}

/// An answer; to a HEAD request it has no body, whatever its Content-Length says.
fn parse(received: &[u8], head_request: bool) -> anyhow::Result<Answer> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(received) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => bail!(
            "the connection closed before a whole answer ({} bytes: {:?})",
            received.len(),
            String::from_utf8_lossy(&received[..received.len().min(200)])
        ),
        Err(e) => bail!(
            "not an HTTP answer ({e}): {:?}",
            String::from_utf8_lossy(received)
        ),
    };
    let status = response.code.context("no status")?;
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut body = received[head..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    if let Some(length) = length.filter(|_| !head_request) {
        if body.len() < length {
            bail!(
                "the connection closed {} bytes into a {length}-byte body",
                body.len()
            );
        }
        body.truncate(length);
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}
