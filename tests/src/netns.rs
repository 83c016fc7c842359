//! Network namespaces as guards: made with `ip netns add`, removed on drop (also when a
//! test panics). Code runs inside one on a thread of its own that enters only the network
//! namespace, so sockets made there belong to it while the test keeps the host's mounts.
use std::{fs::File, os::fd::AsFd, process::Command};

use anyhow::{Context, bail};

pub fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| cmd.to_string())?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a new thread that has entered the network namespace at `path`.
pub fn in_netns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_string();
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        sh(&format!("ip netns add {name}"))?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip ARGS` in this namespace.
    pub fn ip(&self, args: &str) -> anyhow::Result<String> {
        sh(&format!("ip -n {} {args}", self.name))
    }

    /// A counter of the `Tcp:` lines of `/proc/net/snmp` in this namespace
    /// (`PassiveOpens`, `RetransSegs`...).
    pub fn tcp_counter(&self, name: &str) -> anyhow::Result<u64> {
        let snmp = self.sh("cat /proc/net/snmp")?;
        counter_in(&snmp, "Tcp:", name).with_context(|| format!("no Tcp {name} in /proc/net/snmp"))
    }

    /// A counter of the `TcpExt:` lines of `/proc/net/netstat` in this namespace
    /// (`TCPSynRetrans`...).
    pub fn tcp_ext_counter(&self, name: &str) -> anyhow::Result<u64> {
        let netstat = self.sh("cat /proc/net/netstat")?;
        counter_in(&netstat, "TcpExt:", name)
            .with_context(|| format!("no TcpExt {name} in /proc/net/netstat"))
    }

    /// The SYNs sent again so far from this namespace (`TcpExt TCPSynRetrans`): each one a
    /// connection that waited for its answer.
    pub fn syn_retransmits(&self) -> u64 {
        self.tcp_ext_counter("TCPSynRetrans").unwrap()
    }

    /// Runs a shell command in this namespace (network only; host mounts and bpffs).
    pub fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        sh(&format!("nsenter --net={} sh -c '{cmd}'", self.path()))
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.path(), f)
    }

    /// The ifindex of `iface` in this namespace.
    pub fn ifindex(&self, iface: &str) -> anyhow::Result<u32> {
        let out = self.ip(&format!("-j link show {iface}"))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["ifindex"]
            .as_u64()
            .map(|i| i as u32)
            .context("ifindex")
    }

    pub fn mac(&self, iface: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.ip(&format!("-j link show {iface}"))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let s = v[0]["address"].as_str().context("mac")?;
        let mut mac = [0u8; 6];
        for (i, part) in s.split(':').enumerate() {
            mac[i] = u8::from_str_radix(part, 16)?;
        }
        Ok(mac)
    }
}

/// Counter `name` of a `/proc/net/snmp` or `netstat` table: the pair of lines (names,
/// values) that begin with `table`.
fn counter_in(text: &str, table: &str, name: &str) -> Option<u64> {
    let mut rows = text.lines().filter(|l| l.starts_with(table));
    let (names, values) = (rows.next()?, rows.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it (and their peers).
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// A veth pair from `a` (named `a_if`) to `b` (named `b_if`), both up. Two veth
/// artefacts are turned off, as a physical NIC never has them: GRO is on at both ends (a
/// veth delivers redirected frames only when its peer has GRO or an XDP program; lb sends
/// by redirect on a veth, never XDP_TX), and checksum offload is off (a veth otherwise passes packets on with only the
/// pseudo-header checksum filled in, which XDP cannot finish).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    sh(&format!(
        "ip link add {a_if} netns {} type veth peer name {b_if} netns {}",
        a.name, b.name
    ))?;
    a.ip(&format!("link set {a_if} up"))?;
    b.ip(&format!("link set {b_if} up"))?;
    a.sh(&format!("ethtool -K {a_if} gro on tx off >/dev/null"))?;
    b.sh(&format!("ethtool -K {b_if} gro on tx off >/dev/null"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_tcp_counters() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n\
            Tcp: 1 200 120000 -1 12 21096 0\n";
        assert_eq!(
            super::counter_in(snmp, "Tcp:", "PassiveOpens"),
            Some(21_096)
        );
        assert_eq!(super::counter_in(snmp, "Tcp:", "ActiveOpens"), Some(12));
        assert_eq!(super::counter_in(snmp, "Tcp:", "RetransSegs"), None);
        assert_eq!(super::counter_in(snmp, "Ip:", "DefaultTTL"), Some(64));
    }
}
