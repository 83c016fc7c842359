//! Packets for BPF_PROG_TEST_RUN: a builder (etherparse, so checksums come from an
//! implementation independent of lb's) and a lab in which the XDP program runs against a
//! known routing table and neighbour set, so its output can be predicted byte for byte.
use std::{collections::HashMap, net::Ipv4Addr};

use anyhow::Context;
use aya::programs::{TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use lb::{
    dataplane::{Dataplane, Limits, PASS_PROGRAM, PROGRAM, Settings},
    model::{Service, ServiceSpec},
};
use lb_common::{
    flow::{Conn, FlowKey, NatReverse},
    flowtab::FlowSlot,
    service::{FilterSlot, ServiceInfo, ServiceKey},
};

use crate::{netns::Netns, unique};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with SYN, ACK, FIN, RST flags.
    Tcp {
        syn: bool,
        ack: bool,
        fin: bool,
        rst: bool,
    },
    /// UDP; `checksum: false` sends a zero ("none") checksum.
    Udp { checksum: bool },
}

pub const SYN: L4 = L4::Tcp {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const UDP: L4 = L4::Udp { checksum: true };

/// Everything a test packet is made of.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn bytes(&self) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac).ipv4(
            self.src.octets(),
            self.dst.octets(),
            self.ttl,
        );
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { syn, ack, fin, rst } => {
                let mut t = b.tcp(self.sport, self.dport, 1000, 64240);
                if syn {
                    t = t.syn();
                }
                if ack {
                    t = t.ack(2000);
                }
                if fin {
                    t = t.fin();
                }
                if rst {
                    t = t.rst();
                }
                t.write(&mut out, &self.payload).unwrap();
            }
            L4::Udp { checksum } => {
                b.udp(self.sport, self.dport)
                    .write(&mut out, &self.payload)
                    .unwrap();
                if !checksum {
                    out[14 + 20 + 6] = 0;
                    out[14 + 20 + 7] = 0;
                }
            }
        }
        out
    }
}

pub fn mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, last]
}

/// A namespace with two veth pairs and static neighbours (a neighbour's MAC ends in the
/// last byte of its address), and lb's program loaded:
///
/// - `v0` 10.70.0.1/24 (MAC ..:01): client 10.70.0.10, backends 10.70.0.11-13. The VIP
///   10.70.0.100 is on this segment too. Egress = ingress: XDP_TX.
/// - `v2` 10.71.0.1/24 (MAC ..:02): backend 10.71.0.21. Egress != ingress: XDP_REDIRECT.
pub struct PacketLab {
    pub dataplane: Dataplane,
    pub v0: u32,
    pub v2: u32,
    /// The thread that made the lab has entered `ns`; it must be the one that runs packets.
    pub ns: Netns,
}

pub const LB0: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 1);
pub const LB2: Ipv4Addr = Ipv4Addr::new(10, 71, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 10);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 100);
pub const FAR_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 71, 0, 21);

impl PacketLab {
    /// Builds the lab and moves the calling thread into its network namespace.
    pub fn new(limits: &Limits, snat: (u16, u16)) -> anyhow::Result<Self> {
        Self::with_settings(limits, &Settings::with_ports(snat.0, snat.1))
    }

    /// [`PacketLab::new`] with the program configured by `settings`.
    pub fn with_settings(limits: &Limits, settings: &Settings) -> anyhow::Result<Self> {
        let ns = Netns::new(&unique("lbt-pkt"))?;
        ns.ip("link add v0 type veth peer name v1")?;
        ns.ip("link add v2 type veth peer name v3")?;
        ns.ip("link set v0 address 02:00:00:00:00:01")?;
        ns.ip("link set v2 address 02:00:00:00:00:02")?;
        for i in ["v0", "v1", "v2", "v3"] {
            ns.ip(&format!("link set {i} up"))?;
        }
        ns.ip("addr add 10.70.0.1/24 dev v0")?;
        ns.ip("addr add 10.71.0.1/24 dev v2")?;
        for (addr, dev) in [
            (CLIENT, "v0"),
            ([10, 70, 0, 11].into(), "v0"),
            ([10, 70, 0, 12].into(), "v0"),
            ([10, 70, 0, 13].into(), "v0"),
            (FAR_BACKEND, "v2"),
        ] {
            let m = mac(addr.octets()[3]).map(|b| format!("{b:02x}")).join(":");
            ns.ip(&format!(
                "neigh replace {addr} lladdr {m} dev {dev} nud permanent"
            ))?;
        }
        ns.sh("echo 1 > /proc/sys/net/ipv4/conf/v0/forwarding; echo 1 > /proc/sys/net/ipv4/conf/v2/forwarding")?;
        let (v0, v2) = (ns.ifindex("v0")?, ns.ifindex("v2")?);

        let file = std::fs::File::open(ns.path())?;
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&file),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )?;

        let pins = std::path::PathBuf::from("/sys/fs/bpf").join(unique("lbt-pkt"));
        let mut dataplane = Dataplane::load(&pins, limits)?;
        dataplane.configure(settings)?;
        dataplane.set_iface_addrs(&HashMap::from([
            (v0, vec![LB0.octets()]),
            (v2, vec![LB2.octets()]),
        ]))?;
        Ok(Self {
            dataplane,
            v0,
            v2,
            ns,
        })
    }

    pub fn service(&mut self, name: &str, vip: &str, protocol: &str, backends: &[&str]) -> Service {
        self.service_as(
            name,
            ServiceSpec {
                vip: Some(vip.into()),
                protocol: Some(protocol.into()),
                backends: Some(backends.iter().map(|&b| b.into()).collect()),
                ..Default::default()
            },
        )
    }

    /// Installs the service `spec` describes.
    pub fn service_as(&mut self, name: &str, spec: ServiceSpec) -> Service {
        let svc = spec.validate(name).expect("valid service");
        self.dataplane
            .upsert(&svc, &Default::default())
            .expect("upsert");
        svc
    }

    /// Runs `program` once on `packet` as if it arrived on ifindex `ingress`: verdict,
    /// the packet as the program left it, and the run time the kernel measured (ns).
    pub fn run_on(
        &self,
        program: &str,
        ingress: u32,
        packet: &[u8],
    ) -> anyhow::Result<(u32, Vec<u8>, u64)> {
        let prog = self.dataplane.program(program).context("program")?;
        test_run(prog, ingress, packet)
    }

    pub fn run(&self, ingress: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        let (v, out, _) = self
            .run_on(PROGRAM, ingress, packet)
            .expect("BPF_PROG_TEST_RUN");
        (v, out)
    }

    pub fn run_pass(&self, packet: &[u8]) -> u64 {
        self.run_on(PASS_PROGRAM, self.v0, packet)
            .expect("BPF_PROG_TEST_RUN")
            .2
    }

    /// The tracked state of a client flow, read from the pinned conntrack map.
    pub fn conn(
        &self,
        client: Ipv4Addr,
        cport: u16,
        vip: Ipv4Addr,
        vport: u16,
        proto: u8,
    ) -> Option<Conn> {
        let key = FlowKey::new(client.octets(), cport, vip.octets(), vport, proto);
        let live: Vec<Conn> = self
            .flow_slots()
            .into_iter()
            .filter(|s| s.key() == key)
            .map(|s| s.conn)
            .collect();
        assert!(live.len() <= 1, "{key:?} is tracked twice: {live:?}");
        live.first().copied()
    }

    /// The balancer-wide settings in the pinned `config` map.
    pub fn config(&self) -> lb_common::config::Config {
        let map =
            aya::maps::MapData::from_pin(self.dataplane.pin_dir().join("config")).expect("config");
        let map: aya::maps::Array<_, lb_common::config::Config> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("config");
        map.get(&0, 0).expect("config")
    }

    /// Every slot of the pinned conntrack table, in order.
    pub fn all_flow_slots(&self) -> Vec<FlowSlot> {
        crate::flowtab::slots(&self.dataplane.pin_dir().join("conntrack")).expect("conntrack")
    }

    /// Every live slot of the pinned conntrack table (the test walks the whole table
    /// rather than probing it as the program does).
    pub fn flow_slots(&self) -> Vec<FlowSlot> {
        crate::flowtab::live_flows(&self.dataplane.pin_dir().join("conntrack")).expect("conntrack")
    }

    /// The reverse-NAT entry of a client flow (found by its client side), with its key.
    pub fn reverse(&self, client: Ipv4Addr, cport: u16) -> Option<(FlowKey, NatReverse)> {
        let map =
            aya::maps::MapData::from_pin(self.dataplane.pin_dir().join("nat_reverse")).ok()?;
        let map: aya::maps::HashMap<_, FlowKey, NatReverse> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).ok()?;
        map.iter()
            .filter_map(Result::ok)
            .find(|(_, r)| r.client_addr == client.octets() && r.client_port == cport)
    }

    /// The reverse-NAT entry at `key` (a backend's address and port, lb's SNAT address and
    /// port).
    pub fn reverse_at(&self, key: &FlowKey) -> Option<NatReverse> {
        let map =
            aya::maps::MapData::from_pin(self.dataplane.pin_dir().join("nat_reverse")).ok()?;
        let map: aya::maps::HashMap<_, FlowKey, NatReverse> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).ok()?;
        map.get(key, 0).ok()
    }

    /// Every reverse-NAT entry (every SNAT port held), with its key.
    pub fn reverse_entries(&self) -> Vec<(FlowKey, NatReverse)> {
        let Ok(map) = aya::maps::MapData::from_pin(self.dataplane.pin_dir().join("nat_reverse"))
        else {
            return Vec::new();
        };
        let map: aya::maps::HashMap<_, FlowKey, NatReverse> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("nat_reverse");
        map.iter().filter_map(Result::ok).collect()
    }

    /// The `vip_filter` slot of `key`, read from the pinned map.
    pub fn filter_slot(&self, key: &ServiceKey) -> FilterSlot {
        let map = aya::maps::MapData::from_pin(self.dataplane.pin_dir().join("vip_filter"))
            .expect("vip_filter");
        let map: aya::maps::Array<_, FilterSlot> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("vip_filter");
        map.get(&key.filter_slot(), 0).expect("filter slot")
    }

    /// The `services` entry of `key`, read from the pinned map.
    pub fn service_entry(&self, key: &ServiceKey) -> Option<ServiceInfo> {
        let map = aya::maps::MapData::from_pin(self.dataplane.pin_dir().join("services"))
            .expect("services");
        let map: aya::maps::HashMap<_, ServiceKey, ServiceInfo> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("services");
        map.get(key, 0).ok()
    }

    /// How many client flows are tracked.
    pub fn conn_count(&self) -> usize {
        self.flow_slots().len()
    }

    pub fn drops(&self, reason: lb_common::stats::DropReason) -> u64 {
        self.dataplane
            .drops()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n)
    }
}

/// Runs XDP program `prog` once on `packet` as if it arrived on ifindex `ingress`: verdict,
/// the packet as the program left it, and the run time the kernel measured (ns).
pub fn test_run(
    prog: &aya::programs::Xdp,
    ingress: u32,
    packet: &[u8],
) -> anyhow::Result<(u32, Vec<u8>, u64)> {
    let mut out = vec![0u8; packet.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    // The kernel wants data_end to be the packet's length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    opts.repeat = 1;
    let r = prog.test_run(opts)?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out, r.duration.as_nanos() as u64))
}
