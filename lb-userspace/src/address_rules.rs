//! Where lb may send traffic. A backend, or the port its checks go to, is never lb itself:
//! not a loopback, unspecified, multicast, broadcast or link-local address, not one of the
//! host's own addresses, VIPs or SNAT sources, and never one of lb's own listeners (its API
//! and its HTTP listener). An HTTP service, served by the proxy through the kernel's stack,
//! may name an app on the same host at a loopback address when `--allow-loopback-backends`
//! says so, but still never lb's own listeners.
//!
//! The rules are pure: the daemon hands them the host's addresses as they change.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

/// The host's own IPv4 addresses, in the network namespace lb runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddresses {
    /// Every address of every interface (loopback's included).
    pub local: HashSet<Ipv4Addr>,
    /// The broadcast address of every interface that has one.
    pub broadcast: HashSet<Ipv4Addr>,
}

/// One of lb's own listening sockets, with what it is called in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub what: &'static str,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Default)]
pub struct AddressRules {
    host: HostAddresses,
    /// `--snat-address`: the sources of forwarded flows.
    snat: Vec<Ipv4Addr>,
    listeners: Vec<Listener>,
    allow_loopback_backends: bool,
}

impl AddressRules {
    pub fn new(
        snat: Vec<Ipv4Addr>,
        listeners: Vec<Listener>,
        allow_loopback_backends: bool,
    ) -> Self {
        Self {
            host: HostAddresses::default(),
            snat,
            listeners,
            allow_loopback_backends,
        }
    }

    /// The host's addresses now (they change: the daemon follows them).
    pub fn set_host(&mut self, host: HostAddresses) {
        self.host = host;
    }

    pub fn host(&self) -> &HostAddresses {
        &self.host
    }

    /// Whether `ip` is one of the host's own addresses.
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        ip.is_loopback() || self.host.local.contains(&ip)
    }

    /// Why `backend` cannot be a backend of a service (`http`: one served by the HTTP
    /// proxy) whose checks go to `check_port` (None: the backend's own); `is_vip` tells
    /// the addresses of lb's layer-4 VIPs. None when it can.
    pub fn refuse_backend(
        &self,
        backend: SocketAddrV4,
        http: bool,
        check_port: Option<u16>,
        is_vip: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Option<Refusal> {
        if let Some(why) = self.refuse_ip(*backend.ip(), http, is_vip) {
            return Some(Refusal::Address(why));
        }
        if let Some(why) = self.own_listener(backend) {
            return Some(Refusal::Address(why));
        }
        let port = check_port?;
        self.own_listener(SocketAddrV4::new(*backend.ip(), port))
            .map(Refusal::CheckPort)
    }

    fn refuse_ip(
        &self,
        ip: Ipv4Addr,
        http: bool,
        is_vip: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Option<String> {
        let octets = ip.octets();
        if ip.is_unspecified() || octets[0] == 0 {
            // Linux delivers 0.0.0.0 to the host itself; the rest of 0/8 is "this network".
            return Some(format!("{ip} is not a host's address (0.0.0.0/8)"));
        }
        if ip.is_loopback() {
            if http && self.allow_loopback_backends {
                return None;
            }
            return Some(if http {
                format!(
                    "{ip} is a loopback address: it reaches this host, not a backend (an HTTP service may name an app on this host with --allow-loopback-backends)"
                )
            } else {
                format!(
                    "{ip} is a loopback address: it reaches this host, not a backend (and XDP never sees it)"
                )
            });
        }
        if ip.is_multicast() || ip.is_broadcast() || self.host.broadcast.contains(&ip) {
            return Some(format!("{ip} is a multicast or broadcast address"));
        }
        if ip.is_link_local() {
            // 169.254.169.254 is where clouds serve instance metadata and credentials.
            return Some(format!(
                "{ip} is link-local (169.254.0.0/16: cloud metadata services live there)"
            ));
        }
        if self.snat.contains(&ip) {
            return Some(format!(
                "{ip} is one of lb's SNAT addresses (--snat-address)"
            ));
        }
        if self.host.local.contains(&ip) {
            return Some(format!(
                "{ip} is an address of this host: lb would forward to itself"
            ));
        }
        if is_vip(ip) {
            return Some(format!("{ip} is the VIP of a service of this lb"));
        }
        None
    }

    /// The listener of lb's own that a connection to `target` would reach.
    fn own_listener(&self, target: SocketAddrV4) -> Option<String> {
        let l = self.listeners.iter().find(|l| {
            l.addr.port() == target.port()
                && match l.addr.ip() {
                    IpAddr::V4(ip) if ip.is_unspecified() => self.is_local(*target.ip()),
                    IpAddr::V4(ip) => ip == *target.ip(),
                    // A dual-stack wildcard takes IPv4 connections too.
                    IpAddr::V6(ip) if ip.is_unspecified() => self.is_local(*target.ip()),
                    IpAddr::V6(ip) => ip.to_ipv4_mapped() == Some(*target.ip()),
                }
        })?;
        Some(format!("{target} is {} ({})", l.what, l.addr))
    }
}

/// Why a backend was refused: its address, or the port its checks would go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Address(String),
    CheckPort(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::Address(m) | Refusal::CheckPort(m) => m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow_loopback: bool) -> AddressRules {
        let mut r = AddressRules::new(
            vec!["10.0.2.5".parse().unwrap()],
            vec![
                Listener {
                    what: "lb's API",
                    addr: "127.0.0.1:9090".parse().unwrap(),
                },
                Listener {
                    what: "lb's HTTP listener",
                    addr: "0.0.0.0:80".parse().unwrap(),
                },
            ],
            allow_loopback,
        );
        r.set_host(HostAddresses {
            local: ["127.0.0.1", "10.0.2.1", "10.0.2.5"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            broadcast: ["10.0.2.255".parse().unwrap()].into(),
        });
        r
    }

    fn refused(r: &AddressRules, backend: &str, http: bool, check: Option<u16>) -> Option<Refusal> {
        let vip: Ipv4Addr = "10.0.9.100".parse().unwrap();
        r.refuse_backend(backend.parse().unwrap(), http, check, &|ip| ip == vip)
    }

    #[test]
    fn a_backend_is_never_lb_itself() {
        let r = rules(false);
        for bad in [
            "127.0.0.1:8080",
            "127.9.9.9:8080",
            "0.0.0.0:80",
            "0.1.2.3:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "10.0.2.255:80",
            "169.254.169.254:80",
            "10.0.2.1:8080",
            "10.0.2.5:8080",
            "10.0.9.100:8080",
        ] {
            for http in [false, true] {
                assert!(
                    matches!(refused(&r, bad, http, None), Some(Refusal::Address(_))),
                    "{bad} http={http}"
                );
            }
        }
        for good in ["10.0.1.11:8080", "192.168.1.1:80", "10.0.2.7:80"] {
            assert_eq!(refused(&r, good, false, None), None, "{good}");
            assert_eq!(refused(&r, good, true, Some(8081)), None, "{good}");
        }
        let why = refused(&r, "127.0.0.1:8080", true, None).unwrap();
        assert!(
            why.message().contains("--allow-loopback-backends"),
            "{why:?}"
        );
        let why = refused(&r, "10.0.2.5:8080", false, None).unwrap();
        assert!(why.message().contains("SNAT"), "{why:?}");
    }

    #[test]
    fn loopback_is_for_http_services_with_the_flag_and_never_lbs_own_ports() {
        let r = rules(true);
        assert_eq!(refused(&r, "127.0.0.1:8080", true, None), None);
        assert_eq!(refused(&r, "127.0.0.2:8080", true, Some(8081)), None);
        // Never layer 4: XDP does not see loopback traffic.
        assert!(refused(&r, "127.0.0.1:8080", false, None).is_some());
        // The API, on its own address; the HTTP listener on every local address.
        let why = refused(&r, "127.0.0.1:9090", true, None).unwrap();
        assert!(why.message().contains("lb's API"), "{why:?}");
        assert_eq!(refused(&r, "127.0.0.2:9090", true, None), None);
        for listener in ["127.0.0.1:80", "127.0.0.3:80"] {
            let why = refused(&r, listener, true, None).unwrap();
            assert!(why.message().contains("HTTP listener"), "{why:?}");
        }
        // The host's other addresses stay refused, flag or not.
        assert!(refused(&r, "10.0.2.1:8080", true, None).is_some());
        // Checks follow the same rules on the port they go to.
        assert!(matches!(
            refused(&r, "127.0.0.1:8080", true, Some(9090)),
            Some(Refusal::CheckPort(_))
        ));
        assert!(matches!(
            refused(&r, "127.0.0.1:8080", true, Some(80)),
            Some(Refusal::CheckPort(_))
        ));
    }

    #[test]
    fn a_dual_stack_wildcard_listener_covers_every_local_address() {
        let mut r = AddressRules::new(
            Vec::new(),
            vec![Listener {
                what: "lb's API",
                addr: "[::]:9090".parse().unwrap(),
            }],
            true,
        );
        r.set_host(HostAddresses::default());
        let none = |_| false;
        assert!(
            r.refuse_backend("127.0.0.1:9090".parse().unwrap(), true, None, &none)
                .is_some()
        );
        assert!(
            r.refuse_backend("127.0.0.1:9091".parse().unwrap(), true, None, &none)
                .is_none()
        );
    }
}
