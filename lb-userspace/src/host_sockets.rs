//! The sockets the host listens on, read from the kernel's tables in `/proc/net` (those of
//! the network namespace lb runs in): a layer-4 VIP on one of the host's addresses takes
//! every packet to its port before the kernel sees it, so a program listening there
//! (sshd on 22) would lose its traffic.
//!
//! `/proc/net/{tcp,udp}{,6}` rather than sock_diag: four small text tables, read only when
//! a service is written, with no new dependency.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
};

use crate::model::Protocol;

/// TCP's LISTEN state in the tables.
const TCP_LISTEN: &str = "0A";
/// An unconnected UDP socket (TCP_CLOSE): it takes datagrams from anyone.
const UDP_UNCONNECTED: &str = "07";

/// A socket of another program listening where `vip` would take its traffic: on the VIP's
/// address, or on a wildcard (IPv4, or IPv6 that also takes IPv4), with its port and
/// protocol. lb's own sockets (its API and HTTP listener) do not count: taking their
/// traffic hijacks nobody else's.
pub fn listener_at(vip: SocketAddrV4, protocol: Protocol) -> std::io::Result<Option<SocketAddr>> {
    let (tables, state) = match protocol {
        Protocol::Tcp => (["/proc/net/tcp", "/proc/net/tcp6"], TCP_LISTEN),
        Protocol::Udp => (["/proc/net/udp", "/proc/net/udp6"], UDP_UNCONNECTED),
    };
    let own = own_socket_inodes();
    for table in tables {
        let text = std::fs::read_to_string(table)?;
        let found = parse_table(&text)
            .filter(|s| s.state == state && !own.contains(&s.inode))
            .map(|s| s.local)
            .find(|local| takes(*local, vip));
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Whether a socket bound to `local` receives what is sent to `vip`.
fn takes(local: SocketAddr, vip: SocketAddrV4) -> bool {
    local.port() == vip.port()
        && match local.ip() {
            IpAddr::V4(ip) => ip.is_unspecified() || ip == *vip.ip(),
            // Whether an IPv6 wildcard is v6-only cannot be read here; by default it is
            // not, so it counts.
            IpAddr::V6(ip) => ip.is_unspecified() || ip.to_ipv4_mapped() == Some(*vip.ip()),
        }
}

struct Row {
    local: SocketAddr,
    state: String,
    inode: u64,
}

/// The rows of a `/proc/net/{tcp,udp}{,6}` table (the header and rows it cannot read
/// skipped).
fn parse_table(text: &str) -> impl Iterator<Item = Row> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        let local = parse_endpoint(fields.get(1)?)?;
        let state = fields.get(3)?.to_string();
        let inode = fields.get(9)?.parse().ok()?;
        Some(Row {
            local,
            state,
            inode,
        })
    })
}

/// `0100007F:1F90` (the kernel prints each 32-bit word of the address as a native-endian
/// number, the port in host order) as an address.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The inodes of this process's sockets (`/proc/self/fd/N -> socket:[INODE]`).
fn own_socket_inodes() -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let link = std::fs::read_link(e.ok()?.path()).ok()?;
        let link = link.to_str()?;
        link.strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_read_as_the_kernel_prints_them() {
        let v4 = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(
            parse_endpoint(&format!("{v4:08X}:1F90")),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        let mapped: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        let hex: String = mapped
            .octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes(c.try_into().unwrap())))
            .collect();
        assert_eq!(
            parse_endpoint(&format!("{hex}:0016")),
            Some("[::ffff:10.0.0.1]:22".parse().unwrap())
        );
        assert_eq!(parse_endpoint("nonsense"), None);
    }

    #[test]
    fn wildcards_and_exact_addresses_take_a_vip() {
        let vip: SocketAddrV4 = "10.0.0.1:22".parse().unwrap();
        for local in [
            "0.0.0.0:22",
            "10.0.0.1:22",
            "[::]:22",
            "[::ffff:10.0.0.1]:22",
        ] {
            assert!(takes(local.parse().unwrap(), vip), "{local}");
        }
        for local in ["0.0.0.0:23", "10.0.0.2:22", "127.0.0.1:22", "[::1]:22"] {
            assert!(!takes(local.parse().unwrap(), vip), "{local}");
        }
    }

    #[test]
    fn a_listening_socket_is_found_and_our_own_are_not_counted() {
        // Our own listener does not count; the table is read as the kernel writes it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let vip = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        assert_eq!(listener_at(vip, Protocol::Tcp).unwrap(), None);
        let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert!(
            parse_table(&text).any(|r| r.local == SocketAddr::V4(vip) && r.state == TCP_LISTEN),
            "{text}"
        );
    }
}
