//! What lb needs from the host's network stack: interface indexes and addresses, IPv4
//! forwarding on the interfaces it serves (`bpf_fib_lookup` refuses to route for an
//! interface without it), and next-hop MAC addresses of backends kept resolved.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    process::Command,
};

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

/// The first IPv4 address of every interface that has one: ifindex -> address.
pub fn interface_addresses() -> Result<HashMap<u32, [u8; 4]>, NetError> {
    let mut out = HashMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(NetError::Addresses)? {
        let Some(addr) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|s| s.ip())
        else {
            continue;
        };
        let Ok(index) = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()) else {
            continue;
        };
        out.entry(index).or_insert(addr.octets());
    }
    Ok(out)
}

/// The next hop (gateway or the address itself) and device the kernel routes `dst` by.
fn next_hop(dst: Ipv4Addr) -> Option<(Ipv4Addr, String)> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &dst.to_string()])
        .output()
        .ok()?;
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let route = routes.get(0)?;
    let dev = route.get("dev")?.as_str()?.to_string();
    let hop = match route.get("gateway").and_then(|g| g.as_str()) {
        Some(g) => g.parse().ok()?,
        None => dst,
    };
    Some((hop, dev))
}

/// Runs `ip ARGS`, quietly; whether it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A next hop: its address and the device it is on.
type Hop = (Ipv4Addr, String);

/// Whether the kernel already has a neighbour entry for `hop` that never goes stale
/// (configured by hand: permanent or no-ARP); lb leaves such entries alone.
fn fixed_entry(hop: &Hop) -> bool {
    let Ok(out) = Command::new("ip")
        .args(["-j", "neigh", "show", &hop.0.to_string(), "dev", &hop.1])
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("PERMANENT") || text.contains("NOARP")
}

/// Keeps the MAC addresses of backends' next hops resolved, as "managed" neighbour
/// entries the kernel refreshes by itself, so that the first packet of a flow to a
/// backend never meets an unresolved neighbour in XDP (which can not wait for ARP).
/// Entries lb added are removed when no backend needs them, and when lb stops.
#[derive(Default)]
pub struct Neighbors {
    /// Backend -> the next hop it is reached through.
    backends: HashMap<Ipv4Addr, Hop>,
    /// The entries lb added (and so may delete).
    owned: HashSet<Hop>,
}

impl Neighbors {
    fn used(&self, hop: &Hop) -> bool {
        self.backends.values().any(|h| h == hop)
    }

    /// Starts keeping the next hops of `backends` resolved (those not already kept).
    pub fn add(&mut self, backends: impl IntoIterator<Item = Ipv4Addr>) {
        for b in backends {
            if self.backends.contains_key(&b) {
                continue;
            }
            let Some(hop) = next_hop(b) else {
                tracing::warn!(backend = %b, "no route to backend");
                continue;
            };
            if !self.used(&hop) && !self.owned.contains(&hop) && !fixed_entry(&hop) {
                let addr = hop.0.to_string();
                if ip(&[
                    "neigh",
                    "replace",
                    &addr,
                    "dev",
                    &hop.1,
                    "managed",
                    "extern_learn",
                ]) {
                    self.owned.insert(hop.clone());
                } else {
                    tracing::warn!(hop = %hop.0, dev = %hop.1, "could not add a managed neighbour entry");
                }
            }
            self.backends.insert(b, hop);
        }
    }

    /// Stops keeping next hops that only `backends` used.
    pub fn remove(&mut self, backends: impl IntoIterator<Item = Ipv4Addr>) {
        for b in backends {
            let Some(hop) = self.backends.remove(&b) else {
                continue;
            };
            if !self.used(&hop) && self.owned.remove(&hop) {
                ip(&["neigh", "del", &hop.0.to_string(), "dev", &hop.1]);
            }
        }
    }
}

impl Drop for Neighbors {
    fn drop(&mut self) {
        for (addr, dev) in self.owned.drain() {
            ip(&["neigh", "del", &addr.to_string(), "dev", &dev]);
        }
    }
}
