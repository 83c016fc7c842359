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

/// Whether frames lb sends back out of `iface` must go by `XDP_REDIRECT`: true of a veth,
/// whose peer gets `XDP_TX` frames only when it runs an XDP program itself (see
/// `lb_common::config::IFACE_TX_BY_REDIRECT`).
pub fn tx_by_redirect(iface: &str) -> bool {
    ip_json(&["-d", "link", "show", "dev", iface])
        .first()
        .and_then(|l| l["linkinfo"]["info_kind"].as_str().map(|k| k == "veth"))
        .unwrap_or(false)
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

/// Runs `ip -force -batch -` with `commands` (one per line) and `extra` options: one
/// process however many commands, which is what keeps thousands of backends quick. Its
/// standard output.
fn ip_batch(extra: &[&str], commands: &str) -> String {
    use std::io::Write;
    let child = Command::new("ip")
        .args(extra)
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return String::new();
    };
    // Fed from another thread: with many commands, `ip` blocks on a full stdout pipe
    // until its output is read.
    let writer = child.stdin.take().map(|mut stdin| {
        let commands = commands.to_string();
        std::thread::spawn(move || {
            let _ = stdin.write_all(commands.as_bytes());
        })
    });
    let out = child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if let Some(w) = writer {
        let _ = w.join();
    }
    out
}

/// A next hop: its address and the device it is on.
type Hop = (Ipv4Addr, String);

/// A route of the main table: the prefix it covers, its gateway (if any) and device.
struct Route {
    net: u32,
    len: u32,
    gateway: Option<Ipv4Addr>,
    dev: String,
}

/// What `ip -j ARGS` prints, as JSON objects (none if it fails).
fn ip_json(args: &[&str]) -> Vec<serde_json::Value> {
    Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice(&out.stdout).ok())
        .unwrap_or_default()
}

/// The main routing table, read once (`ip -j route show table main`).
fn routes() -> Vec<Route> {
    ip_json(&["route", "show", "table", "main"])
        .iter()
        .filter(|r| {
            r.get("type")
                .and_then(|t| t.as_str())
                .is_none_or(|t| t == "unicast")
        })
        .filter_map(|r| {
            let dst = r.get("dst")?.as_str()?;
            let (net, len) = match dst {
                "default" => (0, 0),
                d => match d.split_once('/') {
                    Some((a, l)) => (u32::from(a.parse::<Ipv4Addr>().ok()?), l.parse().ok()?),
                    None => (u32::from(d.parse::<Ipv4Addr>().ok()?), 32),
                },
            };
            let gateway = r
                .get("gateway")
                .and_then(|g| g.as_str())
                .and_then(|g| g.parse().ok());
            Some(Route {
                net,
                len,
                gateway,
                dev: r.get("dev")?.as_str()?.to_string(),
            })
        })
        .collect()
}

/// The next hop (gateway or the address itself) and device the main table routes each of
/// `dsts` by, by longest prefix; those without a route are left out. One read of the table
/// however many backends (policy routing rules are not consulted).
fn next_hops(dsts: &[Ipv4Addr]) -> HashMap<Ipv4Addr, Hop> {
    let mut table = routes();
    table.sort_by_key(|r| std::cmp::Reverse(r.len));
    let mask = |len: u32| if len == 0 { 0 } else { u32::MAX << (32 - len) };
    dsts.iter()
        .filter_map(|&dst| {
            let d = u32::from(dst);
            let route = table
                .iter()
                .find(|r| d & mask(r.len) == r.net & mask(r.len))?;
            Some((dst, (route.gateway.unwrap_or(dst), route.dev.clone())))
        })
        .collect()
}

/// Neighbour entries that never go stale (configured by hand: permanent or no-ARP); lb
/// leaves them alone.
fn fixed_entries() -> HashSet<Hop> {
    ip_json(&["neigh", "show"])
        .iter()
        .filter(|e| {
            e.get("state")
                .and_then(|s| s.as_array())
                .is_some_and(|states| {
                    states
                        .iter()
                        .any(|s| s.as_str().is_some_and(|s| s == "PERMANENT" || s == "NOARP"))
                })
        })
        .filter_map(|e| {
            Some((
                e.get("dst")?.as_str()?.parse().ok()?,
                e.get("dev")?.as_str()?.to_string(),
            ))
        })
        .collect()
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
}

/// Deletes the neighbour entries of `backends`' next hops, except hand-made ones: what
/// `lb down` does for the backends a stopped daemon left in the maps.
pub fn release_next_hops(backends: &[Ipv4Addr]) -> usize {
    let fixed = fixed_entries();
    let hops: HashSet<Hop> = next_hops(backends)
        .into_values()
        .filter(|h| !fixed.contains(h))
        .collect();
    let commands: String = hops
        .iter()
        .map(|(addr, dev)| format!("neigh del {addr} dev {dev}\n"))
        .collect();
    ip_batch(&[], &commands);
    hops.len()
}

impl Neighbors {
    /// Leave the entries in place on drop: a data plane that outlives the daemon needs them.
    pub fn keep_on_exit(&mut self) {
        self.keep_on_drop = true;
    }

    fn used(&self, hop: &Hop) -> bool {
        self.backends.values().any(|h| h == hop)
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
        let hops = next_hops(&new);
        let fixed = fixed_entries();
        let in_use: HashSet<Hop> = self.backends.values().cloned().collect();
        let mut commands = String::new();
        let mut adding = HashSet::new();
        for b in &new {
            let Some(hop) = hops.get(b) else {
                tracing::warn!(backend = %b, "no route to backend");
                continue;
            };
            if !in_use.contains(hop)
                && !self.owned.contains(hop)
                && !fixed.contains(hop)
                && adding.insert(hop.clone())
            {
                commands.push_str(&format!(
                    "neigh replace {} dev {} managed extern_learn\n",
                    hop.0, hop.1
                ));
            }
            self.backends.insert(*b, hop.clone());
        }
        if !commands.is_empty() {
            ip_batch(&[], &commands);
            self.owned.extend(adding);
        }
    }

    /// Stops keeping next hops that only `backends` used.
    pub fn remove(&mut self, backends: impl IntoIterator<Item = Ipv4Addr>) {
        let mut commands = String::new();
        for b in backends {
            let Some(hop) = self.backends.remove(&b) else {
                continue;
            };
            if !self.used(&hop) && self.owned.remove(&hop) {
                commands.push_str(&format!("neigh del {} dev {}\n", hop.0, hop.1));
            }
        }
        if !commands.is_empty() {
            ip_batch(&[], &commands);
        }
    }
}

impl Drop for Neighbors {
    fn drop(&mut self) {
        if self.keep_on_drop {
            return;
        }
        let commands: String = self
            .owned
            .drain()
            .map(|(addr, dev)| format!("neigh del {addr} dev {dev}\n"))
            .collect();
        ip_batch(&[], &commands);
    }
}
