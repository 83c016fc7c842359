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

/// Every IPv4 address of every interface, and their broadcast addresses: what a backend
/// may not be (see `address_rules`).
pub fn host_addresses() -> Result<crate::address_rules::HostAddresses, NetError> {
    let mut host = crate::address_rules::HostAddresses::default();
    let v4 = |a: Option<&nix::sys::socket::SockaddrStorage>| {
        a.and_then(|a| a.as_sockaddr_in())
            .map(nix::sys::socket::SockaddrIn::ip)
    };
    for ifa in nix::ifaddrs::getifaddrs().map_err(NetError::Addresses)? {
        if let Some(addr) = v4(ifa.address.as_ref()) {
            host.local.insert(addr);
        }
        if let Some(brd) = v4(ifa.broadcast.as_ref()) {
            host.broadcast.insert(brd);
        }
    }
    Ok(host)
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

#[cfg(test)]
pub(crate) mod tests {
    use std::process::Command;

    use super::*;

    /// Runs `f` on a thread of its own in a new network namespace, which goes away with the
    /// thread: the test touches no namespace but its own. Skipped (false) only without root.
    pub(crate) fn in_new_netns(f: impl FnOnce() + Send + 'static) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a network namespace needs root");
            return false;
        }
        let thread = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            f();
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
        true
    }

    /// Runs `ip ARGS` in the calling thread's namespace (a child inherits it).
    pub(crate) fn ip(args: &str) {
        let status = Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .expect("running ip");
        assert!(status.success(), "ip {args}: {status}");
    }

    /// `ip -j -d neigh show`, as seen by iproute2: address -> the entry's JSON object.
    fn neigh_show() -> HashMap<Ipv4Addr, serde_json::Value> {
        let out = Command::new("ip")
            .args(["-j", "-d", "-4", "neigh", "show"])
            .output()
            .expect("running ip");
        assert!(out.status.success());
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        entries
            .into_iter()
            .map(|e| (e["dst"].as_str().unwrap().parse().unwrap(), e))
            .collect()
    }

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Asserts that `addr` has an entry on `dev` just like `ip neigh replace ADDR dev DEV
    /// managed extern_learn` makes.
    fn assert_managed(table: &HashMap<Ipv4Addr, serde_json::Value>, addr: &str, dev: &str) {
        let e = table
            .get(&a(addr))
            .unwrap_or_else(|| panic!("no entry for {addr}: {table:?}"));
        assert_eq!(e["dev"], dev, "{e}");
        assert!(e.get("managed").is_some(), "{addr} is not managed: {e}");
        assert!(
            e.get("extern_learn").is_some(),
            "{addr} is not extern_learn: {e}"
        );
    }

    fn assert_permanent_untouched(table: &HashMap<Ipv4Addr, serde_json::Value>) {
        let e = &table[&a("10.9.0.7")];
        assert_eq!(e["state"], serde_json::json!(["PERMANENT"]), "{e}");
        assert_eq!(e["lladdr"], "02:00:00:00:00:07", "{e}");
        assert!(
            e.get("managed").is_none() && e.get("extern_learn").is_none(),
            "{e}"
        );
    }

    /// Two veths (v0 with 10.9.0.1/24 and a gateway 10.9.0.254 to 10.20.0.0/16, v1 with
    /// 10.20.7.0/24 on the link) and a permanent entry for 10.9.0.7.
    fn setup() {
        ip("link set lo up");
        ip("link add v0 type veth peer name v1");
        ip("link set v0 up");
        ip("link set v1 up");
        ip("addr add 10.9.0.1/24 dev v0");
        ip("route add 10.20.0.0/16 via 10.9.0.254 dev v0");
        ip("route add 10.20.7.0/24 dev v1");
        ip("neigh add 10.9.0.7 lladdr 02:00:00:00:00:07 dev v0 nud permanent");
    }

    #[test]
    fn neighbours_are_added_shared_and_removed() {
        in_new_netns(|| {
            setup();
            let mut n = Neighbors::default();
            n.add(
                [
                    "10.9.0.5",
                    "10.9.0.6",
                    "10.20.1.1",
                    "10.20.1.2",
                    "10.20.7.9",
                ]
                .into_iter()
                .chain(["10.9.0.7", "192.168.99.1"])
                .map(a),
            );
            let t = neigh_show();
            assert_managed(&t, "10.9.0.5", "v0");
            assert_managed(&t, "10.9.0.6", "v0");
            // Behind the gateway: its entry, not theirs; the longer prefix wins for .7.9.
            assert_managed(&t, "10.9.0.254", "v0");
            assert_managed(&t, "10.20.7.9", "v1");
            for absent in ["10.20.1.1", "10.20.1.2", "192.168.99.1"] {
                assert!(!t.contains_key(&a(absent)), "{absent}: {t:?}");
            }
            assert_permanent_untouched(&t);
            assert_eq!(t.len(), 5, "{t:?}");

            // The gateway's entry stays while a backend behind it is left.
            n.remove([a("10.20.1.1")]);
            assert_managed(&neigh_show(), "10.9.0.254", "v0");
            n.remove([a("10.20.1.2"), a("10.9.0.5"), a("10.9.0.7")]);
            let t = neigh_show();
            assert!(!t.contains_key(&a("10.9.0.254")), "{t:?}");
            assert!(!t.contains_key(&a("10.9.0.5")), "{t:?}");
            assert_managed(&t, "10.9.0.6", "v0");
            assert_permanent_untouched(&t);

            // Back again after removal.
            n.add([a("10.9.0.5")]);
            assert_managed(&neigh_show(), "10.9.0.5", "v0");

            drop(n);
            let t = neigh_show();
            assert_eq!(t.keys().collect::<Vec<_>>(), [&a("10.9.0.7")], "{t:?}");
            assert_permanent_untouched(&t);
        });
    }

    #[test]
    fn kept_on_exit_until_released() {
        in_new_netns(|| {
            setup();
            let mut n = Neighbors::default();
            n.add([a("10.9.0.8"), a("10.20.1.1")]);
            n.keep_on_exit();
            drop(n);
            let t = neigh_show();
            assert_managed(&t, "10.9.0.8", "v0");
            assert_managed(&t, "10.9.0.254", "v0");
            let backends = [a("10.9.0.8"), a("10.20.1.1"), a("10.20.1.2"), a("10.9.0.7")];
            assert_eq!(release_next_hops(&backends), 2);
            let t = neigh_show();
            assert_eq!(t.keys().collect::<Vec<_>>(), [&a("10.9.0.7")], "{t:?}");
            assert_permanent_untouched(&t);
        });
    }

    #[test]
    fn thousands_of_backends_in_one_add() {
        in_new_netns(|| {
            setup();
            ip("route add 10.30.0.0/16 dev v1");
            let backends: Vec<Ipv4Addr> = (0..5000u32)
                .map(|i| Ipv4Addr::from(u32::from(a("10.30.0.1")) + i))
                .collect();
            let mut n = Neighbors::default();
            let start = std::time::Instant::now();
            n.add(backends.iter().copied());
            let took = start.elapsed();
            let t = neigh_show();
            for b in &backends {
                assert_managed(&t, &b.to_string(), "v1");
            }
            assert!(took < std::time::Duration::from_secs(5), "{took:?}");
            n.remove(backends[..2500].iter().copied());
            let t = neigh_show();
            assert!(backends[..2500].iter().all(|b| !t.contains_key(b)));
            assert!(backends[2500..].iter().all(|b| t.contains_key(b)));
            drop(n);
            assert_eq!(neigh_show().len(), 1);
        });
    }

    #[test]
    fn veths_go_by_redirect() {
        in_new_netns(|| {
            setup();
            assert!(tx_by_redirect("v0"));
            assert!(!tx_by_redirect("lo"));
            assert!(!tx_by_redirect("no-such-link"));
        });
    }

    #[test]
    fn longest_prefix_wins() {
        let route = |dst: &str, len, gateway: Option<&str>, ifindex| Route {
            dst: a(dst),
            len,
            gateway: gateway.map(a),
            ifindex,
        };
        let table = [
            route("0.0.0.0", 0, Some("192.0.2.1"), 1),
            route("10.0.0.0", 8, None, 2),
            route("10.1.0.0", 16, Some("10.0.0.254"), 2),
            route("10.1.2.3", 32, None, 3),
        ];
        let hops = route_by(
            &table,
            &[a("8.8.8.8"), a("10.9.9.9"), a("10.1.9.9"), a("10.1.2.3")],
        );
        assert_eq!(hops[&a("8.8.8.8")], (a("192.0.2.1"), 1));
        assert_eq!(hops[&a("10.9.9.9")], (a("10.9.9.9"), 2));
        assert_eq!(hops[&a("10.1.9.9")], (a("10.0.0.254"), 2));
        assert_eq!(hops[&a("10.1.2.3")], (a("10.1.2.3"), 3));
        assert!(route_by(&table[1..], &[a("8.8.8.8")]).is_empty());
    }
}
