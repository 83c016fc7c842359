//! Real etcd servers for the store tests (Debian's etcd-server), each with a data directory
//! of its own; stopped by PID and removed on drop. On loopback for tests that talk to etcd
//! themselves, or inside a test namespace for lb processes in other namespaces. A secure
//! cluster serves clients over TLS only, asks them for a certificate from the test's CA,
//! and has auth enabled with a `root` user.
use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{netns::Netns, pki::Pki};

/// What makes a cluster secure: its certificates, and the password of its `root` user.
pub struct Secure<'a> {
    pub pki: &'a Pki,
    pub root_password: &'a str,
}

/// `n` distinct free ports, taken from the kernel and released together for etcd to bind
/// (held until all are chosen: one released at a time, the kernel may hand it out again).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

struct Member {
    child: Option<Child>,
    client: String,
}

/// An etcd cluster of one or more members.
pub struct EtcdCluster {
    members: Vec<Member>,
    data: PathBuf,
    /// Clients must speak TLS.
    tls: bool,
}

impl EtcdCluster {
    /// etcd in a namespace of its own (returned: it must outlive the cluster), on a bridge
    /// every site's balancer is linked to (as `st0`, 10.210.0.10 up; etcd at 10.210.0.1).
    pub fn for_sites(sites: &[crate::topology::Topology]) -> anyhow::Result<(Netns, Self)> {
        let control = Netns::new(&crate::unique("lbt-etcd"))?;
        control.ip("link add br0 type bridge")?;
        control.ip("link set br0 up")?;
        control.ip("addr add 10.210.0.1/24 dev br0")?;
        for (i, topo) in sites.iter().enumerate() {
            crate::netns::veth(&topo.lb, "st0", &control, &format!("p-st{i}"))?;
            control.ip(&format!("link set p-st{i} master br0"))?;
            topo.lb
                .ip(&format!("addr add 10.210.0.{}/24 dev st0", 10 + i))?;
        }
        let etcd = Self::start_in(&control, "10.210.0.1")?;
        Ok((control, etcd))
    }

    /// Starts `n` members on loopback and waits until the cluster takes writes.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        Self::start_at(None, "127.0.0.1", n, None)
    }

    /// Starts one member inside `ns`, listening on `ip` (an address of `ns`).
    pub fn start_in(ns: &Netns, ip: &str) -> anyhow::Result<Self> {
        Self::start_at(Some(ns), ip, 1, None)
    }

    /// Starts one secure member on loopback: TLS with client certificates, and auth
    /// enabled with user `root`.
    pub fn start_secure(secure: &Secure<'_>) -> anyhow::Result<Self> {
        Self::start_at(None, "127.0.0.1", 1, Some(secure))
    }

    /// Starts one secure member inside `ns`, listening on `ip` (which the server
    /// certificate must name).
    pub fn start_secure_in(ns: &Netns, ip: &str, secure: &Secure<'_>) -> anyhow::Result<Self> {
        Self::start_at(Some(ns), ip, 1, Some(secure))
    }

    fn start_at(
        ns: Option<&Netns>,
        ip: &str,
        n: usize,
        secure: Option<&Secure<'_>>,
    ) -> anyhow::Result<Self> {
        let client_scheme = if secure.is_some() { "https" } else { "http" };
        let data = std::env::temp_dir().join(crate::unique("lbt-etcd"));
        let free = free_ports(2 * n)?;
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|p| (p[0], p[1])).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{ip}:{peer}"))
            .collect();
        let enter = ns.map(|ns| format!("--net={}", ns.path()));
        let command = |program: &str| {
            let mut c = Command::new("nsenter");
            if let Some(e) = &enter {
                c.arg(e);
            }
            c.arg(program);
            c
        };
        let mut cluster = Self {
            members: Vec::new(),
            data,
            tls: secure.is_some(),
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let dir = cluster.data.join(format!("m{i}"));
            std::fs::create_dir_all(&dir)?;
            let client_url = format!("{client_scheme}://{ip}:{client}");
            let mut etcd = command("etcd");
            if let Some(s) = secure {
                etcd.arg("--cert-file")
                    .arg(s.pki.server_cert())
                    .arg("--key-file")
                    .arg(s.pki.server_key())
                    .arg("--trusted-ca-file")
                    .arg(s.pki.ca())
                    .args(["--client-cert-auth", "--auth-token", "simple"]);
            }
            let child = etcd
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(&dir)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &format!("http://{ip}:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{ip}:{peer}"),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new", "--log-level", "error"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(
                    cluster.data.join(format!("m{i}.log")),
                )?)
                .spawn()
                .context("starting etcd (Debian package etcd-server)")?;
            cluster.members.push(Member {
                child: Some(child),
                client: format!("{ip}:{client}"),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoints: Vec<String> = cluster
            .endpoints()
            .iter()
            .map(|e| format!("{client_scheme}://{e}"))
            .collect();
        let endpoints = endpoints.join(",");
        let etcdctl = |args: &[&str]| {
            let mut c = command("etcdctl");
            c.env("ETCDCTL_API", "3").args(["--endpoints", &endpoints]);
            if let Some(s) = secure {
                c.arg("--cacert")
                    .arg(s.pki.ca())
                    .arg("--cert")
                    .arg(s.pki.client_cert())
                    .arg("--key")
                    .arg(s.pki.client_key());
            }
            c.args(args).output()
        };
        let ok = |args: &[&str]| etcdctl(args).is_ok_and(|o| o.status.success());
        loop {
            // Up means every member: a write needs only a quorum (two of three), and a
            // test that kills a member expects the others to carry on.
            if ok(&["put", "lbt-probe", "1"]) && ok(&["endpoint", "health"]) {
                if let Some(s) = secure {
                    for args in [
                        &[
                            "user",
                            "add",
                            "root",
                            "--new-user-password",
                            s.root_password,
                        ][..],
                        &["auth", "enable"][..],
                    ] {
                        let out = etcdctl(args)?;
                        if !out.status.success() {
                            bail!(
                                "etcdctl {}: {}",
                                args.join(" "),
                                String::from_utf8_lossy(&out.stderr)
                            );
                        }
                    }
                }
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(cluster.data.join("m0.log")).unwrap_or_default();
                bail!("etcd did not come up: {log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// The `--store` URL of the whole cluster (`etcds://` for a secure one).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints().join(","))
    }

    /// Kills member `i` (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// `etcdctl ARGS` against `url`'s members (an `etcd://` URL), from inside `ns`.
pub fn etcdctl(ns: &Netns, url: &str, args: &str) -> String {
    let endpoints = url.trim_start_matches("etcd://");
    ns.sh(&format!(
        "ETCDCTL_API=3 etcdctl --endpoints {endpoints} {args}"
    ))
    .unwrap()
}
