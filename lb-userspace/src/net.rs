//! What lb needs from the host's network stack: interface indexes and addresses, IPv4
//! forwarding on the interfaces it serves (`bpf_fib_lookup` refuses to route for an
//! interface without it), and next-hop MAC addresses of backends kept resolved.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use netlink_packet_route::link::InfoKind;

use crate::rtnl::{NeighbourChange, Route, Rtnl};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("enabling IPv4 forwarding on {iface}: {source}")]
    Forwarding {
        iface: String,
        source: std::io::Error,
    },
    #[error("reading interface addresses: {0}")]
    Addresses(nix::Error),
}

pub fn ifindex(iface: &str) -> Result<u32, NetError> {
    nix::net::if_::if_nametoindex(iface).map_err(|_| NetError::NoSuchInterface(iface.to_string()))
}

/// Turns on `net.ipv4.conf.IFACE.forwarding` (in the current network namespace).
pub fn enable_forwarding(iface: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current.trim() != "1" {
        std::fs::write(&path, "1").map_err(|source| NetError::Forwarding {
            iface: iface.to_string(),
            source,
        })?;
        tracing::info!(%iface, "enabled IPv4 forwarding");
    }
    Ok(())
}

/// Whether frames lb sends back out of `iface` must go by `XDP_REDIRECT`: true of a veth,
/// whose peer gets `XDP_TX` frames only when it runs an XDP program itself (see
/// `lb_common::config::IFACE_TX_BY_REDIRECT`).
pub fn tx_by_redirect(iface: &str) -> bool {
    let kind = ifindex(iface).map_err(|e| e.to_string()).and_then(|index| {
        let mut rtnl = Rtnl::open().map_err(|e| e.to_string())?;
        rtnl.link_kind(index).map_err(|e| e.to_string())
    });
    match kind {
        Ok(kind) => kind == Some(InfoKind::Veth),
        Err(error) => {
            tracing::warn!(%iface, %error, "reading the link's kind");
            false
        }
    }
}

/// The first IPv4 address of every interface that has one: ifindex -> address.
pub fn interface_addresses() -> Result<HashMap<u32, Vec<[u8; 4]>>, NetError> {
    let mut out = HashMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(NetError::Addresses)? {
        let Some(addr) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(nix::sys::socket::SockaddrIn::ip)
        else {
            continue;
        };
        let Ok(index) = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()) else {
            continue;
        };
        let list: &mut Vec<[u8; 4]> = out.entry(index).or_default();
        if !list.contains(&addr.octets()) {
            list.push(addr.octets());
        }
    }
    Ok(out)
}

/// The SNAT addresses on each interface: the ones `wanted` (`--snat-address`) names that
/// the interface has, in that order, else its first IPv4 address. An address in `wanted`
/// that no interface has is an error.
pub fn snat_addresses(
    all: &HashMap<u32, Vec<[u8; 4]>>,
    wanted: &[std::net::Ipv4Addr],
) -> Result<HashMap<u32, Vec<[u8; 4]>>, String> {
    for w in wanted {
        if !all.values().any(|l| l.contains(&w.octets())) {
            return Err(format!(
                "--snat-address {w}: no interface has this address (add it with `ip addr add {w}/32 dev IF`)"
            ));
        }
    }
    Ok(all
        .iter()
        .map(|(&ifindex, list)| {
            let chosen: Vec<[u8; 4]> = wanted
                .iter()
                .map(std::net::Ipv4Addr::octets)
                .filter(|w| list.contains(w))
                .collect();
            let addrs = if chosen.is_empty() {
                list.iter().take(1).copied().collect()
            } else {
                chosen
            };
            (ifindex, addrs)
        })
        .collect())
}

/// A next hop: its address and the index of the device it is on.
type Hop = (Ipv4Addr, u32);

/// The device's name for logs (its index if it has none any more).
fn dev_name(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex).map_or_else(
        |_| format!("#{ifindex}"),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// The next hop (gateway or the address itself) and device `table` routes each of `dsts` by,
/// by longest prefix; those without a route are left out.
fn route_by(table: &[Route], dsts: &[Ipv4Addr]) -> HashMap<Ipv4Addr, Hop> {
    let mut table: Vec<&Route> = table.iter().collect();
    table.sort_by_key(|r| std::cmp::Reverse(r.len));
    let mask = |len: u8| u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    dsts.iter()
        .filter_map(|&dst| {
            let d = u32::from(dst);
            let route = table
                .iter()
                .find(|r| d & mask(r.len) == u32::from(r.dst) & mask(r.len))?;
            Some((dst, (route.gateway.unwrap_or(dst), route.ifindex)))
        })
        .collect()
}

/// The next hops of `dsts` by the main table, read once however many backends (policy
/// routing rules are not consulted), and the neighbour entries lb must leave alone.
fn next_hops(rtnl: &mut Rtnl, dsts: &[Ipv4Addr]) -> (HashMap<Ipv4Addr, Hop>, HashSet<Hop>) {
    let hops = rtnl.main_routes().map_or_else(
        |e| {
            tracing::warn!(error = %e, "reading the routing table");
            HashMap::new()
        },
        |table| route_by(&table, dsts),
    );
    (hops, fixed_entries(rtnl))
}

/// Neighbour entries that never go stale (configured by hand: permanent or no-ARP).
fn fixed_entries(rtnl: &mut Rtnl) -> HashSet<Hop> {
    match rtnl.neighbours() {
        Ok(entries) => entries
            .iter()
            .filter(|n| n.is_fixed())
            .map(|n| (n.addr, n.ifindex))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the neighbour table");
            HashSet::new()
        }
    }
}

/// Applies `changes` in one batch; each one the kernel refuses is logged, the rest stand.
/// The hops whose change took effect.
fn apply(rtnl: &mut Rtnl, changes: &[NeighbourChange]) -> Vec<Hop> {
    let results = match rtnl.change_neighbours(changes) {
        Ok(results) => results,
        Err(e) => {
            tracing::warn!(error = %e, entries = changes.len(), "changing neighbour entries");
            return Vec::new();
        }
    };
    changes
        .iter()
        .zip(results)
        .filter_map(|(change, result)| {
            let (verb, addr, ifindex) = match *change {
                NeighbourChange::Manage(a, i) => ("adding", a, i),
                NeighbourChange::Delete(a, i) => ("deleting", a, i),
            };
            match result {
                Ok(()) => Some((addr, ifindex)),
                Err(error) => {
                    tracing::warn!(%addr, dev = %dev_name(ifindex), %error, "{verb} neighbour entry");
                    None
                }
            }
        })
        .collect()
}

fn open() -> Option<Rtnl> {
    Rtnl::open()
        .inspect_err(|e| tracing::warn!(error = %e, "netlink"))
        .ok()
}

/// Keeps the MAC addresses of backends' next hops resolved, as "managed" neighbour
/// entries the kernel refreshes by itself, so that the first packet of a flow to a
/// backend never meets an unresolved neighbour in XDP (which can not wait for ARP).
/// Entries lb added are removed when no backend needs them, and when lb stops, unless the
/// data plane stays behind to keep forwarding (then `lb down` removes them).
#[derive(Default)]
pub struct Neighbors {
    /// Backend -> the next hop it is reached through.
    backends: HashMap<Ipv4Addr, Hop>,
    /// The entries lb added (and so may delete).
    owned: HashSet<Hop>,
    keep_on_drop: bool,
    /// Opened on first use, in the network namespace of the thread that first uses it.
    rtnl: Option<Rtnl>,
}

/// Deletes the neighbour entries of `backends`' next hops, except hand-made ones: what
/// `lb down` does for the backends a stopped daemon left in the maps. How many it deleted.
pub fn release_next_hops(backends: &[Ipv4Addr]) -> usize {
    let Some(mut rtnl) = open() else {
        return 0;
    };
    let (hops, fixed) = next_hops(&mut rtnl, backends);
    let changes: Vec<NeighbourChange> = hops
        .into_values()
        .filter(|h| !fixed.contains(h))
        .collect::<HashSet<Hop>>()
        .into_iter()
        .map(|(addr, ifindex)| NeighbourChange::Delete(addr, ifindex))
        .collect();
    apply(&mut rtnl, &changes).len()
}

impl Neighbors {
    /// Leave the entries in place on drop: a data plane that outlives the daemon needs them.
    pub fn keep_on_exit(&mut self) {
        self.keep_on_drop = true;
    }

    fn rtnl(slot: &mut Option<Rtnl>) -> Option<&mut Rtnl> {
        if slot.is_none() {
            *slot = open();
        }
        slot.as_mut()
    }

    /// Starts keeping the next hops of `backends` resolved (those not already kept).
    pub fn add(&mut self, backends: impl IntoIterator<Item = Ipv4Addr>) {
        let new: Vec<Ipv4Addr> = backends
            .into_iter()
            .filter(|b| !self.backends.contains_key(b))
            .collect();
        if new.is_empty() {
            return;
        }
        let Some(rtnl) = Self::rtnl(&mut self.rtnl) else {
            return;
        };
        let (hops, fixed) = next_hops(rtnl, &new);
        let in_use: HashSet<Hop> = self.backends.values().copied().collect();
        let mut changes = Vec::new();
        let mut adding = HashSet::new();
        for b in &new {
            let Some(&hop) = hops.get(b) else {
                tracing::warn!(backend = %b, "no route to backend");
                continue;
            };
            if !in_use.contains(&hop)
                && !self.owned.contains(&hop)
                && !fixed.contains(&hop)
                && adding.insert(hop)
            {
                changes.push(NeighbourChange::Manage(hop.0, hop.1));
            }
            self.backends.insert(*b, hop);
        }
        if !changes.is_empty() {
            self.owned.extend(apply(rtnl, &changes));
        }
    }

    /// Stops keeping next hops that only `backends` used.
    pub fn remove(&mut self, backends: impl IntoIterator<Item = Ipv4Addr>) {
        let released: HashSet<Hop> = backends
            .into_iter()
            .filter_map(|b| self.backends.remove(&b))
            .collect();
        if released.is_empty() {
            return;
        }
        let in_use: HashSet<&Hop> = self.backends.values().collect();
        let changes: Vec<NeighbourChange> = released
            .into_iter()
            .filter(|hop| !in_use.contains(hop) && self.owned.remove(hop))
            .map(|(addr, ifindex)| NeighbourChange::Delete(addr, ifindex))
            .collect();
        if changes.is_empty() {
            return;
        }
        if let Some(rtnl) = Self::rtnl(&mut self.rtnl) {
            apply(rtnl, &changes);
        }
    }
}

impl Drop for Neighbors {
    fn drop(&mut self) {
        if self.keep_on_drop || self.owned.is_empty() {
            return;
        }
        let changes: Vec<NeighbourChange> = self
            .owned
            .drain()
            .map(|(addr, ifindex)| NeighbourChange::Delete(addr, ifindex))
            .collect();
        if let Some(rtnl) = Self::rtnl(&mut self.rtnl) {
            apply(rtnl, &changes);
        }
    }
}
