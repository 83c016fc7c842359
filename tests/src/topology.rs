//! The two topologies lb must serve, built from namespaces, veth pairs and a bridge.
//!
//! One-armed: client, balancer and backends on one segment (a bridge); the VIP is the
//! balancer's own address. Routed two-armed: the client reaches the VIP through a route via
//! the balancer's first interface; backends sit behind a bridge on its second interface.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::{
    netns::{Netns, veth},
    servers::Backend,
    unique,
};

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub backend_addrs: Vec<Ipv4Addr>,
    /// The balancer's address the backends see (SNAT source).
    pub lb_backend_side: Ipv4Addr,
    /// Suggested VIP address for services.
    pub vip: Ipv4Addr,
    pub lb_ifaces: Vec<&'static str>,
    /// The segment the backends hang on; dropped last.
    _segment: Netns,
}

fn bridge(seg: &Netns) -> anyhow::Result<()> {
    seg.ip("link add br0 type bridge")?;
    seg.ip("link set br0 up")?;
    Ok(())
}

/// `n` backend hosts on the bridge in `seg`, addressed `prefix.11` up (in a /24).
fn backends_on(
    seg: &Netns,
    n: usize,
    prefix: [u8; 3],
) -> anyhow::Result<(Vec<Netns>, Vec<Ipv4Addr>)> {
    let mut nss = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..n {
        let ns = Netns::new(&unique("lbt-be"))?;
        let addr = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 11 + i as u8);
        plug(seg, &ns, &format!("p-b{i}"), &format!("{addr}/24"))?;
        nss.push(ns);
        addrs.push(addr);
    }
    Ok((nss, addrs))
}

/// Plugs `ns` into the bridge in `seg` (its `eth0`, port `port`), addressed `addr`.
pub fn plug(seg: &Netns, ns: &Netns, port: &str, addr: &str) -> anyhow::Result<()> {
    veth(ns, "eth0", seg, port)?;
    seg.ip(&format!("link set {port} master br0"))?;
    ns.ip(&format!("addr add {addr} dev eth0"))?;
    Ok(())
}

impl Topology {
    /// Everything on 10.201.0.0/24: lb .1 (also the VIP), client .10, backends .11 up.
    pub fn one_armed(backends: usize) -> anyhow::Result<Self> {
        let seg = Netns::new(&unique("lbt-seg"))?;
        bridge(&seg)?;
        let lb = Netns::new(&unique("lbt-lb"))?;
        plug(&seg, &lb, "p-lb", "10.201.0.1/24")?;
        let client = Netns::new(&unique("lbt-cl"))?;
        plug(&seg, &client, "p-cl", "10.201.0.10/24")?;
        let (nss, addrs) = backends_on(&seg, backends, [10, 201, 0])?;
        Ok(Self {
            client,
            lb,
            backends: nss,
            backend_addrs: addrs,
            lb_backend_side: Ipv4Addr::new(10, 201, 0, 1),
            vip: Ipv4Addr::new(10, 201, 0, 1),
            lb_ifaces: vec!["eth0"],
            _segment: seg,
        })
    }

    /// Client 10.202.1.10 -- 10.202.1.1 lb 10.202.2.1 -- bridge -- backends 10.202.2.11 up;
    /// the client routes 10.202.9.0/24 (VIPs) via the balancer.
    pub fn two_armed(backends: usize) -> anyhow::Result<Self> {
        let seg = Netns::new(&unique("lbt-seg"))?;
        bridge(&seg)?;
        let lb = Netns::new(&unique("lbt-lb"))?;
        let client = Netns::new(&unique("lbt-cl"))?;
        veth(&client, "eth0", &lb, "eth0")?;
        client.ip("addr add 10.202.1.10/24 dev eth0")?;
        lb.ip("addr add 10.202.1.1/24 dev eth0")?;
        client.ip("route add 10.202.9.0/24 via 10.202.1.1")?;
        veth(&lb, "eth1", &seg, "p-lb")?;
        seg.ip("link set p-lb master br0")?;
        lb.ip("addr add 10.202.2.1/24 dev eth1")?;
        let (nss, addrs) = backends_on(&seg, backends, [10, 202, 2])?;
        Ok(Self {
            client,
            lb,
            backends: nss,
            backend_addrs: addrs,
            lb_backend_side: Ipv4Addr::new(10, 202, 2, 1),
            vip: Ipv4Addr::new(10, 202, 9, 100),
            lb_ifaces: vec!["eth0", "eth1"],
            _segment: seg,
        })
    }

    pub fn vip(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, port)
    }

    pub fn backend(&self, i: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.backend_addrs[i], port)
    }

    /// Starts a test backend named `be{i}` in backend namespace `i` on its address and
    /// `port`: TCP, and with `udp` a UDP echo on the same port too.
    pub fn start_backend(&self, i: usize, port: u16, udp: bool) -> anyhow::Result<Backend> {
        let a = SocketAddr::from(self.backend(i, port));
        Backend::start(&self.backends[i], &format!("be{i}"), a, udp.then_some(a))
    }

    /// Backends `0..n`, each as [`start_backend`](Self::start_backend).
    pub fn start_backends(&self, n: usize, port: u16, udp: bool) -> anyhow::Result<Vec<Backend>> {
        (0..n).map(|i| self.start_backend(i, port, udp)).collect()
    }
}
