//! The programs lb is compared with, from Debian's packages, run inside a namespace: nginx
//! as an HTTP backend and HAProxy as an HTTP proxy. Each has a scratch directory of its own
//! (configuration, pid file, log) and is stopped by its PID on drop, which also removes the
//! directory.
use std::{
    ffi::OsStr,
    fmt::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::netns::Netns;

/// A foreground program in a namespace (`nsenter --net` execs it, so the child's PID is
/// the program's), with its scratch directory; on drop SIGTERM (SIGKILL after 5 s) to that
/// PID, and the directory removed.
pub struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    what: &'static str,
}

impl Daemon {
    /// A daemon yet to start, with a fresh scratch directory (removed on drop) to write
    /// its configuration into.
    pub fn new(prefix: &str, what: &'static str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique(prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            child: None,
            dir,
            what,
        })
    }

    /// Starts `program ARGS` in `ns`, stderr to `DIR/stderr.log`.
    pub fn start(&mut self, ns: &Netns, program: &str, args: &[&OsStr]) -> anyhow::Result<()> {
        let stderr = std::fs::File::create(self.dir.join("stderr.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", self.what))?;
        self.child = Some(child);
        Ok(())
    }

    /// The program's process ID; None before `start`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the daemon wrote to stderr.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Waits until `addr` accepts a connection from inside `ns`; fails early if the
    /// daemon exits.
    pub fn wait_listening(
        &mut self,
        ns: &Netns,
        addr: SocketAddr,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let connected = ns
                .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok());
            if connected {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("{} exited ({status}): {}", self.what, self.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} is not listening on {addr}: {}",
                    self.what,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::stop_child(&mut child, Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first line of `program ARGS`' output (stdout or stderr): its version banner.
pub fn version(program: &str, args: &[&str]) -> String {
    Command::new(program).args(args).output().map_or_else(
        |_| format!("{program} not found"),
        |o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        },
    )
}

/// An nginx (Debian's `nginx`) with one worker answering `GET /a/...` and `GET /b/...` on
/// `addr` with `body`, keeping connections alive (a million requests or a minute idle).
pub struct Nginx {
    daemon: Daemon,
}

impl Nginx {
    pub fn start(ns: &Netns, addr: SocketAddr, body: &str) -> anyhow::Result<Self> {
        let mut daemon = Daemon::new("lbt-nginx", "nginx (Debian package nginx)")?;
        let dir = daemon.dir().to_path_buf();
        let d = dir.display();
        let conf = format!(
            "daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen {addr} backlog=4096;
        default_type text/plain;
        location /a/ {{ return 200 \"{body}\\n\"; }}
        location /b/ {{ return 200 \"{body}\\n\"; }}
        location / {{ return 404; }}
    }}
}}
"
        );
        let (conf_path, err) = (dir.join("nginx.conf"), dir.join("error.log"));
        std::fs::write(&conf_path, conf)?;
        let args: [&OsStr; 6] = [
            "-p".as_ref(),
            dir.as_os_str(),
            "-c".as_ref(),
            conf_path.as_os_str(),
            "-e".as_ref(),
            err.as_os_str(),
        ];
        daemon.start(ns, "nginx", &args)?;
        daemon.wait_listening(ns, addr, Duration::from_secs(10))?;
        Ok(Self { daemon })
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }
}

/// A route both proxies are given: requests whose path is `prefix` or starts with
/// `prefix/` go to `backends`, round robin.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub prefix: String,
    pub backends: Vec<SocketAddr>,
}

/// One HAProxy frontend on `bind` routing by path prefix as lb does, and setting the
/// X-Forwarded-* headers lb sets (`proto`: how the client came).
fn frontend(c: &mut String, name: &str, bind: &str, proto: &str, routes: &[Route]) {
    let _ = write!(
        c,
        "
frontend {name}
    bind {bind}
    http-request set-header X-Forwarded-Proto {proto}
    http-request set-header X-Forwarded-Host %[req.hdr(host)] if {{ req.hdr(host) -m found }}
    http-request del-header X-Forwarded-Host unless {{ req.hdr(host) -m found }}
"
    );
    for r in routes {
        let _ = writeln!(c, "    acl route_{} path {}", r.name, r.prefix);
        let _ = writeln!(c, "    acl route_{} path_beg {}/", r.name, r.prefix);
    }
    c.push_str("    http-request return status 404 content-type text/plain string \"no route\" if");
    for r in routes {
        let _ = write!(c, " !route_{}", r.name);
    }
    c.push('\n');
    for r in routes {
        let _ = writeln!(c, "    use_backend {0} if route_{0}", r.name);
    }
}

/// An HAProxy (Debian's `haproxy`) in HTTP mode on `listen`, one backend section a route,
/// with lb's timeouts (`ProxyConfig::default()`: connect, a backend's answer, idle
/// keep-alive) and checks (TCP connect every 2 s, rise 2, fall 3).
pub struct Haproxy {
    daemon: Daemon,
}

impl Haproxy {
    /// The configuration: path ACLs with lb's meaning of a prefix (`/a` matches `/a` and
    /// `/a/...`, not `/ab`), round robin, the X-Forwarded-For, -Proto and -Host headers
    /// lb sets (so that the backends get the same requests from both), keep-alive on both
    /// sides with idle backend connections reused as `reuse` says (`http-reuse`: `safe`,
    /// HAProxy's default, gives the first request of every client connection a backend
    /// connection of its own; `always` lets it take an idle one), one thread a CPU, no
    /// logging (nor has lb).
    /// With `tls` (an address and a PEM file with the chain and key), the same routes are
    /// also served over TLS there (ALPN h2 and http/1.1, X-Forwarded-Proto https).
    pub fn config(
        listen: SocketAddr,
        tls: Option<(SocketAddr, &std::path::Path)>,
        routes: &[Route],
        threads: usize,
        reuse: &str,
    ) -> String {
        let lb = lb::l7::ProxyConfig::default();
        let (connect, answer, idle) = (
            lb.connect_timeout.as_secs(),
            lb.response_header_timeout.as_secs(),
            lb.idle_timeout.as_secs(),
        );
        let mut c = format!(
            "global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse {reuse}
    timeout connect {connect}s
    timeout server {answer}s
    timeout client {idle}s
    timeout http-keep-alive {idle}s
    timeout http-request {idle}s
"
        );
        frontend(&mut c, "http", &listen.to_string(), "http", routes);
        if let Some((addr, pem)) = tls {
            let bind = format!("{addr} ssl crt {} alpn h2,http/1.1", pem.display());
            frontend(&mut c, "https", &bind, "https", routes);
        }
        for r in routes {
            let _ = write!(c, "\nbackend {}\n    balance roundrobin\n", r.name);
            for (i, b) in r.backends.iter().enumerate() {
                let _ = writeln!(
                    c,
                    "    server {}{} {b} check inter 2s rise 2 fall 3",
                    r.name,
                    i + 1
                );
            }
        }
        c
    }

    /// HAProxy serving `routes` on `listen`, and over TLS on `tls` with the chain and key
    /// in that PEM (written next to its configuration).
    pub fn start(
        ns: &Netns,
        listen: SocketAddr,
        tls: Option<(SocketAddr, &str)>,
        routes: &[Route],
        reuse: &str,
    ) -> anyhow::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut daemon = Daemon::new("lbt-haproxy", "haproxy (Debian package haproxy)")?;
        let conf = daemon.dir().join("haproxy.cfg");
        let pem = daemon.dir().join("cert.pem");
        if let Some((_, text)) = tls {
            std::fs::write(&pem, text)?;
        }
        let tls = tls.map(|(addr, _)| (addr, pem.as_path()));
        std::fs::write(&conf, Self::config(listen, tls, routes, threads, reuse))?;
        let check = Command::new("haproxy")
            .args(["-c", "-f"])
            .arg(&conf)
            .output()
            .context("running haproxy (Debian package haproxy)")?;
        if !check.status.success() {
            bail!(
                "haproxy rejects its configuration: {}",
                String::from_utf8_lossy(&[check.stdout, check.stderr].concat())
            );
        }
        daemon.start(
            ns,
            "haproxy",
            &["-db".as_ref(), "-f".as_ref(), conf.as_os_str()],
        )?;
        daemon.wait_listening(ns, listen, Duration::from_secs(10))?;
        Ok(Self { daemon })
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_config_routes_by_prefix() {
        let routes = [
            Route {
                name: "a".into(),
                prefix: "/a".into(),
                backends: vec![
                    "127.0.0.1:9001".parse().unwrap(),
                    "127.0.0.1:9002".parse().unwrap(),
                ],
            },
            Route {
                name: "b".into(),
                prefix: "/b".into(),
                backends: vec!["127.0.0.1:9003".parse().unwrap()],
            },
        ];
        let pem = std::path::Path::new("/tmp/cert.pem");
        let tls = Some(("127.0.0.1:8444".parse().unwrap(), pem));
        let c = Haproxy::config("127.0.0.1:8001".parse().unwrap(), tls, &routes, 2, "safe");
        for line in [
            "nbthread 2",
            "bind 127.0.0.1:8001",
            "acl route_a path /a\n",
            "acl route_a path_beg /a/\n",
            "use_backend b if route_b",
            "\"no route\" if !route_a !route_b\n",
            "server a2 127.0.0.1:9002 check inter 2s rise 2 fall 3",
            "server b1 127.0.0.1:9003 check",
            "http-reuse safe",
            "timeout connect 3s",
            "timeout server 60s",
            "timeout http-keep-alive 60s",
            "option forwardfor",
            "set-header X-Forwarded-Proto http\n",
            "frontend https\n    bind 127.0.0.1:8444 ssl crt /tmp/cert.pem alpn h2,http/1.1\n",
            "set-header X-Forwarded-Proto https\n",
        ] {
            assert!(c.contains(line), "{line:?} missing from:\n{c}");
        }
    }
}
