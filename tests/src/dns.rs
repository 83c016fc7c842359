//! A real DNS server for the DNS discovery tests: dnsmasq (Debian's dnsmasq-base) inside a
//! test namespace, answering only for the names it is given (no upstream, no /etc/hosts),
//! with a TTL of 0, as Docker's embedded DNS serves Swarm names. Names change with
//! [`DnsServer::set`], which rewrites its hosts file and tells dnsmasq to read it again.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::netns::Netns;

pub struct DnsServer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    ns: String,
}

impl DnsServer {
    /// Starts dnsmasq in `ns` on `ip`, port 53 (the namespace is the test's own).
    pub fn start_in(ns: &Netns, ip: Ipv4Addr) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique("lbt-dns"));
        std::fs::create_dir_all(&dir)?;
        let port = 53;
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "")?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg("dnsmasq")
            .args(["--keep-in-foreground", "--conf-file=/dev/null"])
            .args(["--no-resolv", "--no-hosts", "--no-poll", "--local-ttl=0"])
            .args(["--bind-interfaces", "--user=root", "--pid-file"])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--log-facility={}", dir.join("log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        let server = Self {
            child,
            addr: SocketAddr::from((ip, port)),
            dir,
            ns: ns.name.clone(),
        };
        server.wait_up()?;
        Ok(server)
    }

    /// Where it answers: lb's `--dns`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `name` resolve to `addrs` (none: the name no longer exists), other names
    /// kept; dnsmasq reads its hosts file again on SIGHUP.
    pub fn set(&self, name: &str, addrs: &[Ipv4Addr]) -> anyhow::Result<()> {
        let hosts = self.dir.join("hosts");
        let kept: Vec<String> = std::fs::read_to_string(&hosts)?
            .lines()
            .filter(|l| l.split_whitespace().nth(1) != Some(name))
            .map(str::to_string)
            .collect();
        let mut text = kept.join("\n");
        for a in addrs {
            text.push_str(&format!("\n{a} {name}"));
        }
        text.push('\n');
        std::fs::write(&hosts, text)?;
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }

    /// Waits until it answers a query (for a name it has no record of).
    fn wait_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = self.addr;
        while Instant::now() < deadline {
            if crate::netns::in_netns(&format!("/run/netns/{}", self.ns), move || probe(addr)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        bail!("dnsmasq did not answer on {addr}: {log}")
    }
}

/// Sends one DNS query (an A record of `probe.invalid.`) and tells whether any answer came.
fn probe(addr: SocketAddr) -> bool {
    let Ok(socket) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "invalid"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    if socket.send_to(&query, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    socket
        .recv_from(&mut buf)
        .is_ok_and(|(n, _)| n >= 12 && buf[..2] == [0x12, 0x34])
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
