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

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it (and their peers).
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// A veth pair from `a` (named `a_if`) to `b` (named `b_if`), both up. Two veth
/// artefacts are turned off, as a physical NIC never has them: GRO is on at both ends (a
/// veth delivers XDP_TX and XDP_REDIRECT frames only when its peer has GRO or an XDP
/// program), and checksum offload is off (a veth otherwise passes packets on with only the
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

/// The do-nothing XDP program attached to a veth end, removed on drop. A veth delivers
/// frames another veth sends back with XDP_TX only when it runs an XDP program itself (GRO
/// is not enough there, unlike for XDP_REDIRECT); a switch port facing a one-armed
/// balancer needs it. Physical NICs need nothing of the kind.
pub struct PeerXdp {
    _ebpf: aya::Ebpf,
}

impl PeerXdp {
    pub fn attach(ns: &Netns, iface: &str) -> anyhow::Result<Self> {
        let iface = iface.to_string();
        let ebpf = ns.run(move || -> anyhow::Result<aya::Ebpf> {
            let mut loader = aya::EbpfLoader::new();
            // Only the program is wanted; keep the maps it brings along tiny.
            for m in lb::dataplane::MAPS {
                loader.map_max_entries(m, 1);
            }
            let mut ebpf = loader.load(lb::dataplane::EBPF_OBJECT)?;
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut(lb::dataplane::PASS_PROGRAM)
                .context("lb_pass")?
                .try_into()?;
            prog.load()?;
            prog.attach(&iface, aya::programs::XdpMode::Default)?;
            Ok(ebpf)
        })?;
        Ok(Self { _ebpf: ebpf })
    }
}
