//! What lb needs from the host's network stack: interface indexes and addresses, IPv4
//! forwarding on the interfaces it serves (`bpf_fib_lookup` refuses to route for an
//! interface without it), and next-hop MAC addresses of backends kept resolved.
use std::{collections::HashMap, net::Ipv4Addr, process::Command};

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

/// Keeps the MAC addresses of backends' next hops resolved, as "managed" neighbour
/// entries the kernel refreshes by itself, so that the first packet of a flow to a
/// backend never meets an unresolved neighbour in XDP (which can not wait for ARP).
#[derive(Default)]
pub struct Neighbors {
    /// Backend -> the next hop and device it is reached through.
    backends: HashMap<Ipv4Addr, (Ipv4Addr, String)>,
}

impl Neighbors {
    fn users(&self, hop: &(Ipv4Addr, String)) -> usize {
        self.backends.values().filter(|h| *h == hop).count()
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
            if self.users(&hop) == 0 {
                let ok = Command::new("ip")
                    .args([
                        "neigh",
                        "replace",
                        &hop.0.to_string(),
                        "dev",
                        &hop.1,
                        "managed",
                        "extern_learn",
                    ])
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
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
            if self.users(&hop) == 0 {
                let _ = Command::new("ip")
                    .args(["neigh", "del", &hop.0.to_string(), "dev", &hop.1])
                    .status();
            }
        }
    }
}
