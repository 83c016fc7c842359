//! HTTP load with wrk (Debian's `wrk`) from inside a namespace, and what it measured.
//!
//! A Lua script of wrk's makes the requests cycle through a list of paths (so one load
//! covers several routes) and, when the run ends, prints one line with the exact figures:
//! requests, duration, latency percentiles in microseconds and every error count. wrk's
//! own summary rounds to two decimals of its unit; the script line does not.
//!
//! With `Connection: close` sent, the server answers `Connection: close` and wrk opens a
//! new connection for the next request; [`WrkReport::opened`] counts the TCP connections
//! the namespace accepted during the run, which shows it.
use std::{
    fmt,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::netns::Netns;

/// The marker of the script's result line.
const MARK: &str = "lb-bench-wrk ";

/// How to load.
#[derive(Debug, Clone)]
pub struct WrkOptions {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    /// Sends `Connection: close`: one connection a request.
    pub close: bool,
    /// Over TLS (`https://`): with `close`, a full handshake a request.
    pub tls: bool,
}

/// wrk's error counts: sockets (connect, read, write, timeout) and responses that were
/// not 2xx or 3xx.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct WrkErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    pub status: u64,
}

impl WrkErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.status
    }

    pub fn add(&mut self, o: &WrkErrors) {
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.timeout += o.timeout;
        self.status += o.status;
    }
}

impl fmt::Display for WrkErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.total() == 0 {
            return f.write_str("0");
        }
        let parts: Vec<String> = [
            ("connect", self.connect),
            ("read", self.read),
            ("write", self.write),
            ("timeout", self.timeout),
            ("non-2xx/3xx", self.status),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
        f.write_str(&parts.join(", "))
    }
}

/// One wrk run.
#[derive(Debug, Clone)]
pub struct WrkReport {
    /// Completed requests (answered, whatever the status).
    pub requests: u64,
    pub duration: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub errors: WrkErrors,
    /// TCP connections accepted in the namespace during the run (`TcpPassiveOpens`):
    /// wrk's, the proxy's to its backends, health checks.
    pub opened: u64,
    /// wrk's own output.
    pub output: String,
}

impl WrkReport {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// Connections accepted in the namespace per completed request.
    pub fn opened_per_request(&self) -> f64 {
        self.opened as f64 / self.requests.max(1) as f64
    }
}

#[derive(Deserialize)]
struct ScriptLine {
    requests: u64,
    duration_us: u64,
    p50_us: u64,
    p99_us: u64,
    errors: WrkErrors,
}

/// Reads the script's line out of wrk's output.
pub fn parse_output(output: &str, opened: u64) -> anyhow::Result<WrkReport> {
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix(MARK))
        .with_context(|| format!("no result line in wrk's output:\n{output}"))?;
    let s: ScriptLine =
        serde_json::from_str(line).with_context(|| format!("wrk's result line {line:?}"))?;
    Ok(WrkReport {
        requests: s.requests,
        duration: Duration::from_micros(s.duration_us),
        p50: Duration::from_micros(s.p50_us),
        p99: Duration::from_micros(s.p99_us),
        errors: s.errors,
        opened,
        output: output.to_string(),
    })
}

/// The script: requests cycle through `paths`; `done` prints the result line.
fn script(paths: &[&str]) -> String {
    let list: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    format!(
        r#"-- Written by lb's test kit (tests/src/wrk.rs).
local paths = {{ {} }}
local requests = {{}}
local n = 0

function init(args)
   for i, path in ipairs(paths) do
      requests[i] = wrk.format(nil, path)
   end
end

function request()
   n = n % #requests + 1
   return requests[n]
end

function done(summary, latency, _)
   local e = summary.errors
   io.write(string.format(
      '{MARK}{{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
      '"errors":{{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d}}}}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      e.connect, e.read, e.write, e.timeout, e.status))
end
"#,
        list.join(", ")
    )
}

/// A wrk load over a list of paths; its script lives in a scratch directory removed on
/// drop.
pub struct Wrk {
    dir: PathBuf,
}

impl Wrk {
    pub fn new(paths: &[&str]) -> anyhow::Result<Self> {
        if paths.is_empty() {
            bail!("wrk needs at least one path");
        }
        let dir = std::env::temp_dir().join(crate::unique("lbt-wrk"));
        std::fs::create_dir_all(&dir)?;
        let wrk = Self { dir };
        std::fs::write(wrk.script(), script(paths))?;
        Ok(wrk)
    }

    fn script(&self) -> PathBuf {
        self.dir.join("paths.lua")
    }

    /// Loads `http://to` (`https://` with `tls`) from inside `ns` and returns what wrk
    /// measured.
    pub fn run(&self, ns: &Netns, to: SocketAddr, o: &WrkOptions) -> anyhow::Result<WrkReport> {
        let secs = o.duration.as_secs().max(1);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path()))
            .arg("wrk")
            .arg(format!("-t{}", o.threads))
            .arg(format!("-c{}", o.connections))
            .arg(format!("-d{secs}s"))
            .arg("--latency")
            .arg("-s")
            .arg(self.script());
        if o.close {
            cmd.args(["-H", "Connection: close"]);
        }
        let scheme = if o.tls { "https" } else { "http" };
        cmd.arg(format!("{scheme}://{to}/"));
        let before = ns.tcp_counter("PassiveOpens")?;
        let started = Instant::now();
        let out = cmd.output().context("running wrk (Debian package wrk)")?;
        let opened = ns.tcp_counter("PassiveOpens")?.saturating_sub(before);
        let text = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
        if !out.status.success() {
            bail!(
                "wrk failed ({}) after {:.1} s: {text}",
                out.status,
                started.elapsed().as_secs_f64()
            );
        }
        parse_output(&text, opened)
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_script_line() {
        let out = "Running 1s test @ http://127.0.0.1:8001/\n  2 threads and 64 connections\n\
            Requests/sec:  50000.00\n\
            lb-bench-wrk {\"requests\":50000,\"duration_us\":1000500,\"p50_us\":1100,\"p99_us\":3210,\
            \"errors\":{\"connect\":0,\"read\":2,\"write\":0,\"timeout\":1,\"status\":7}}\n";
        let r = parse_output(out, 64).unwrap();
        assert_eq!(r.requests, 50_000);
        assert_eq!(r.p50, Duration::from_micros(1100));
        assert_eq!(r.p99, Duration::from_micros(3210));
        assert_eq!(r.errors.total(), 10);
        assert_eq!(r.errors.to_string(), "read 2, timeout 1, non-2xx/3xx 7");
        assert!((r.rps() - 49_975.0).abs() < 1.0);
        assert!(parse_output("Requests/sec: 1\n", 0).is_err());
    }

    #[test]
    fn script_cycles_through_the_paths() {
        let s = script(&["/a/x", "/b/x"]);
        assert!(s.contains(r#"local paths = { "/a/x", "/b/x" }"#), "{s}");
        assert!(s.contains(MARK));
    }
}
