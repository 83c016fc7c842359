//! The rtnetlink requests lb makes of the kernel (routes, neighbour entries, link kinds), on
//! a blocking socket: its callers (the controller's own thread, `lb down`) have no async
//! runtime, and blocking calls are safe from inside one too.
use std::{io, net::Ipv4Addr};

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REPLACE,
    NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
        NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("opening a netlink socket: {0}")]
    Open(io::Error),
    #[error("sending to netlink: {0}")]
    Send(io::Error),
    #[error("receiving from netlink: {0}")]
    Receive(io::Error),
    #[error("a netlink reply of {0} bytes did not fit the receive buffer")]
    Truncated(usize),
    #[error("decoding a netlink message: {0}")]
    Decode(#[from] DecodeError),
    #[error("{what}: {source}")]
    Kernel {
        what: &'static str,
        source: io::Error,
    },
    #[error("{0}: the table kept changing during the dump")]
    Interrupted(&'static str),
}

/// Requests sent in one `send` before their acks are read: few syscalls for thousands of
/// entries, while the acks (one queued reply each) stay well within the socket's receive
/// buffer, which would otherwise drop them.
const BATCH: usize = 64;
/// Large enough for any dump reply: the kernel fills at most 32 KiB per read.
const RECV_BUF: usize = 64 * 1024;
/// `ndm_state` bits of entries nobody but their maker changes.
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

/// A unicast IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub ifindex: u32,
}

/// An IPv4 neighbour entry, as much of it as lb looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: Ipv4Addr,
    pub ifindex: u32,
    /// `NUD_*` bits.
    pub state: u16,
    pub flags: NeighbourFlags,
    pub ext_flags: NeighbourExtFlags,
}

impl Neighbour {
    /// Set by hand (permanent or no-ARP): never goes stale, so lb leaves it alone.
    pub fn is_fixed(&self) -> bool {
        self.state & (NUD_PERMANENT | NUD_NOARP) != 0
    }
}

/// A change to a neighbour entry, for [`Rtnl::change_neighbours`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeighbourChange {
    /// Create or replace a managed entry the kernel keeps resolved by itself, marked as
    /// added from outside the kernel: `ip neigh replace A dev D managed extern_learn`.
    Manage(Ipv4Addr, u32),
    /// `ip neigh del A dev D`.
    Delete(Ipv4Addr, u32),
}

/// An rtnetlink socket bound to the network namespace of the thread that opened it.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn open() -> Result<Self, RtnlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Open)?;
        socket.bind_auto().map_err(RtnlError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Open)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Unicast IPv4 routes of the main table (a dump is not filtered by the kernel).
    pub fn main_routes(&mut self) -> Result<Vec<Route>, RtnlError> {
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        let replies = self.dump("dumping routes", RouteNetlinkMessage::GetRoute(request))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => main_route(&r),
                _ => None,
            })
            .collect())
    }

    /// Every IPv4 neighbour entry.
    pub fn neighbours(&mut self) -> Result<Vec<Neighbour>, RtnlError> {
        let mut request = NeighbourMessage::default();
        request.header.family = AddressFamily::Inet;
        let replies = self.dump(
            "dumping neighbours",
            RouteNetlinkMessage::GetNeighbour(request),
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => neighbour(&n),
                _ => None,
            })
            .collect())
    }

    /// The link's kind (`IFLA_INFO_KIND`: "veth", "bridge", ...), if it has one.
    pub fn link_kind(&mut self, ifindex: u32) -> Result<Option<InfoKind>, RtnlError> {
        let mut request = LinkMessage::default();
        request.header.index = ifindex;
        let reply = self.request("reading the link", RouteNetlinkMessage::GetLink(request))?;
        let RouteNetlinkMessage::NewLink(link) = reply else {
            return Ok(None);
        };
        Ok(link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.into_iter().find_map(|i| match i {
                LinkInfo::Kind(kind) => Some(kind),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// Applies `changes`, each on its own: the kernel's answer to each, in order. Fails as a
    /// whole only when the socket does.
    pub fn change_neighbours(
        &mut self,
        changes: &[NeighbourChange],
    ) -> Result<Vec<Result<(), io::Error>>, RtnlError> {
        let mut results = Vec::with_capacity(changes.len());
        for chunk in changes.chunks(BATCH) {
            let mut out = Vec::new();
            let first = self.seq.wrapping_add(1);
            for change in chunk {
                let (message, flags) = neighbour_request(*change);
                self.seq = self.seq.wrapping_add(1);
                append(&mut out, message, flags | NLM_F_ACK, self.seq);
            }
            self.socket.send(&out, 0).map_err(RtnlError::Send)?;
            let mut acks: Vec<Option<Result<(), io::Error>>> =
                std::iter::repeat_with(|| None).take(chunk.len()).collect();
            let mut pending = chunk.len();
            while pending > 0 {
                for message in self.receive()? {
                    let index = message.header.sequence_number.wrapping_sub(first) as usize;
                    let NetlinkPayload::Error(e) = message.payload else {
                        continue;
                    };
                    if let Some(slot @ None) = acks.get_mut(index) {
                        *slot = Some(e.code.map_or(Ok(()), |_| Err(e.to_io())));
                        pending -= 1;
                    }
                }
            }
            results.extend(acks.into_iter().flatten());
        }
        Ok(results)
    }

    /// Sends a dump request and collects the replies; starts over if the table changed
    /// meanwhile (`NLM_F_DUMP_INTR`), a few times.
    fn dump(
        &mut self,
        what: &'static str,
        request: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        'attempt: for _ in 0..3 {
            let seq = self.send(request.clone(), NLM_F_DUMP)?;
            let mut replies = Vec::new();
            let mut interrupted = false;
            loop {
                for message in self.receive()? {
                    if message.header.sequence_number != seq {
                        continue;
                    }
                    interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
                    match message.payload {
                        NetlinkPayload::InnerMessage(m) => replies.push(m),
                        NetlinkPayload::Error(e) if e.code.is_some() => {
                            return Err(RtnlError::Kernel {
                                what,
                                source: e.to_io(),
                            });
                        }
                        NetlinkPayload::Done(d) if d.code < 0 => {
                            return Err(RtnlError::Kernel {
                                what,
                                source: io::Error::from_raw_os_error(-d.code),
                            });
                        }
                        NetlinkPayload::Done(_) if interrupted => continue 'attempt,
                        NetlinkPayload::Done(_) => return Ok(replies),
                        _ => {}
                    }
                }
            }
        }
        Err(RtnlError::Interrupted(what))
    }

    /// Sends a request that has one reply (or an error) and returns that reply.
    fn request(
        &mut self,
        what: &'static str,
        request: RouteNetlinkMessage,
    ) -> Result<RouteNetlinkMessage, RtnlError> {
        let seq = self.send(request, 0)?;
        loop {
            for message in self.receive()? {
                if message.header.sequence_number != seq {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(m) => return Ok(m),
                    NetlinkPayload::Error(e) => {
                        return Err(RtnlError::Kernel {
                            what,
                            source: e.to_io(),
                        });
                    }
                    _ => {}
                }
            }
        }
    }

    fn send(&mut self, request: RouteNetlinkMessage, flags: u16) -> Result<u32, RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        append(&mut out, request, flags, self.seq);
        self.socket.send(&out, 0).map_err(RtnlError::Send)?;
        Ok(self.seq)
    }

    /// One datagram's messages. Replies of a type this crate can not decode are skipped
    /// (lb asks for none of them).
    fn receive(&mut self) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, RtnlError> {
        self.buf.clear();
        // MSG_TRUNC: the datagram's whole length, to tell a truncated one.
        let n = self
            .socket
            .recv(&mut self.buf, libc::MSG_TRUNC)
            .map_err(RtnlError::Receive)?;
        if n > self.buf.len() {
            return Err(RtnlError::Truncated(n));
        }
        let mut messages = Vec::new();
        let mut rest = &self.buf[..];
        while !rest.is_empty() {
            let len = NetlinkBuffer::new_checked(rest)?.length() as usize;
            match NetlinkMessage::deserialize(&rest[..len]) {
                Ok(m) => messages.push(m),
                Err(e) => tracing::debug!(error = %e, "skipping an undecodable netlink message"),
            }
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
        Ok(messages)
    }
}

/// Serializes `message` with `flags` and `seq` at the end of `out`.
fn append(out: &mut Vec<u8>, message: RouteNetlinkMessage, flags: u16, seq: u32) {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    message.finalize();
    let start = out.len();
    out.resize(start + message.buffer_len().next_multiple_of(4), 0);
    message.serialize(&mut out[start..]);
}

/// The message and flags of a change, as iproute2 sends them.
fn neighbour_request(change: NeighbourChange) -> (RouteNetlinkMessage, u16) {
    let (NeighbourChange::Manage(addr, ifindex) | NeighbourChange::Delete(addr, ifindex)) = change;
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = ifindex;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            addr,
        )));
    match change {
        NeighbourChange::Manage(..) => {
            // A managed entry has no state of its own to give (the kernel refuses one that
            // is permanent); NTF_EXT_MANAGED lives in NDA_FLAGS_EXT (Linux 5.16).
            m.header.state = NeighbourState::None;
            m.header.flags = NeighbourFlags::ExtLearned;
            m.attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            (
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
        }
        NeighbourChange::Delete(..) => (RouteNetlinkMessage::DelNeighbour(m), 0),
    }
}

/// `r` if it is a unicast IPv4 route of the main table through one device.
fn main_route(r: &RouteMessage) -> Option<Route> {
    let header = &r.header;
    if header.address_family != AddressFamily::Inet || header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(header.table);
    let (mut dst, mut gateway, mut ifindex) = (Ipv4Addr::UNSPECIFIED, None, None);
    for attribute in &r.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            _ => {}
        }
    }
    // Multipath routes (no single output device) are left out.
    (table == u32::from(RouteHeader::RT_TABLE_MAIN)).then_some(())?;
    Some(Route {
        dst,
        len: header.destination_prefix_length,
        gateway,
        ifindex: ifindex?,
    })
}

fn neighbour(n: &NeighbourMessage) -> Option<Neighbour> {
    let addr = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(*a),
        _ => None,
    })?;
    let ext_flags = n
        .attributes
        .iter()
        .find_map(|a| match a {
            NeighbourAttribute::ExtFlags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_default();
    Some(Neighbour {
        addr,
        ifindex: n.header.ifindex,
        state: n.header.state.into(),
        flags: n.header.flags,
        ext_flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes iproute2 6.1 sends for `ip neigh replace 10.9.0.5 dev IF managed
    /// extern_learn` (IF's index 3), as strace shows them, but for the sequence number.
    #[test]
    fn manage_is_what_iproute2_sends() {
        let (message, flags) =
            neighbour_request(NeighbourChange::Manage(Ipv4Addr::new(10, 9, 0, 5), 3));
        let mut out = Vec::new();
        append(&mut out, message, flags | NLM_F_ACK, 7);
        #[rustfmt::skip]
        let expected: [u8; 44] = [
            44, 0, 0, 0, // length
            28, 0, // RTM_NEWNEIGH
            0x05, 0x05, // NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
            7, 0, 0, 0, 0, 0, 0, 0, // sequence, port
            2, 0, 0, 0, // AF_INET, padding
            3, 0, 0, 0, // ifindex
            0, 0, // NUD_NONE
            0x10, // NTF_EXT_LEARNED
            0, // RTN_UNSPEC
            8, 0, 1, 0, 10, 9, 0, 5, // NDA_DST
            8, 0, 15, 0, 1, 0, 0, 0, // NDA_FLAGS_EXT: NTF_EXT_MANAGED
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn delete_names_address_and_device() {
        let (message, flags) =
            neighbour_request(NeighbourChange::Delete(Ipv4Addr::new(10, 9, 0, 5), 3));
        let mut out = Vec::new();
        append(&mut out, message, flags | NLM_F_ACK, 1);
        assert_eq!(out.len(), 36);
        assert_eq!(&out[4..8], &[29, 0, 0x05, 0x00]); // RTM_DELNEIGH, REQUEST | ACK
        assert_eq!(&out[16..24], &[2, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&out[28..36], &[8, 0, 1, 0, 10, 9, 0, 5]);
    }

    #[test]
    fn routes_of_other_tables_and_kinds_are_left_out() {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.kind = RouteType::Unicast;
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.destination_prefix_length = 16;
        r.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 20, 0, 0))),
            RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 9, 0, 254))),
            RouteAttribute::Oif(3),
        ];
        assert_eq!(
            main_route(&r),
            Some(Route {
                dst: Ipv4Addr::new(10, 20, 0, 0),
                len: 16,
                gateway: Some(Ipv4Addr::new(10, 9, 0, 254)),
                ifindex: 3,
            })
        );
        let mut other_table = r.clone();
        other_table.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(main_route(&other_table), None);
        let mut local = r.clone();
        local.header.kind = RouteType::Local;
        assert_eq!(main_route(&local), None);
        let mut multipath = r;
        multipath
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        assert_eq!(main_route(&multipath), None);
    }
}

#[cfg(test)]
mod netns_tests {
    use super::*;
    use crate::net::tests::{in_new_netns, ip};

    /// One refused change among others: reported on its own, the rest take effect.
    #[test]
    fn each_change_gets_its_own_answer() {
        in_new_netns(|| {
            ip("link set lo up");
            ip("link add v0 type veth peer name v1");
            ip("link set v0 up");
            ip("neigh add 10.9.0.7 lladdr 02:00:00:00:00:07 dev v0 nud permanent");
            let v0 = nix::net::if_::if_nametoindex("v0").unwrap();
            let mut rtnl = Rtnl::open().unwrap();
            let ok = Ipv4Addr::new(10, 9, 0, 5);
            let results = rtnl
                .change_neighbours(&[
                    NeighbourChange::Manage(ok, v0),
                    NeighbourChange::Manage(Ipv4Addr::new(10, 9, 0, 6), 9999),
                    NeighbourChange::Delete(Ipv4Addr::new(10, 9, 0, 8), v0),
                    NeighbourChange::Manage(Ipv4Addr::new(10, 9, 0, 9), v0),
                ])
                .unwrap();
            let errnos: Vec<Option<i32>> = results
                .iter()
                .map(|r| r.as_ref().err().map(|e| e.raw_os_error().unwrap()))
                .collect();
            assert_eq!(errnos, [None, Some(libc::ENODEV), Some(libc::ENOENT), None]);

            let mut entries = rtnl.neighbours().unwrap();
            entries.sort_by_key(|n| n.addr);
            let summary: Vec<_> = entries
                .iter()
                .map(|n| {
                    (
                        n.addr.to_string(),
                        n.ifindex == v0,
                        n.is_fixed(),
                        n.flags.contains(NeighbourFlags::ExtLearned),
                        n.ext_flags.contains(NeighbourExtFlags::Managed),
                    )
                })
                .collect();
            assert_eq!(
                summary,
                [
                    ("10.9.0.5".to_string(), true, false, true, true),
                    ("10.9.0.7".to_string(), true, true, false, false),
                    ("10.9.0.9".to_string(), true, false, true, true),
                ]
            );
        });
    }

    #[test]
    fn main_table_routes() {
        in_new_netns(|| {
            ip("link set lo up");
            ip("link add v0 type veth peer name v1");
            ip("link set v0 up");
            ip("addr add 10.9.0.1/24 dev v0");
            ip("route add 10.20.0.0/16 via 10.9.0.254 dev v0");
            ip("route add 10.40.0.0/16 via 10.9.0.254 dev v0 table 100");
            let v0 = nix::net::if_::if_nametoindex("v0").unwrap();
            let mut routes = Rtnl::open().unwrap().main_routes().unwrap();
            routes.sort_by_key(|r| r.dst);
            assert_eq!(
                routes,
                [
                    Route {
                        dst: Ipv4Addr::new(10, 9, 0, 0),
                        len: 24,
                        gateway: None,
                        ifindex: v0
                    },
                    Route {
                        dst: Ipv4Addr::new(10, 20, 0, 0),
                        len: 16,
                        gateway: Some(Ipv4Addr::new(10, 9, 0, 254)),
                        ifindex: v0
                    },
                ]
            );
        });
    }
}
