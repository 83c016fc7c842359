//! Balancer-wide settings the XDP program reads from the one-entry `config` array.
use crate::assert_layout;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// SNAT source ports are taken from `snat_port_min ..= snat_port_max`; replies to
    /// ports in this range are looked up in `nat_reverse`. 0/0 disables forwarding.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub flags: u32,
}
assert_layout!(Config, size = 8, align = 4);

/// Value of `iface_addrs`, keyed by ifindex: the IPv4 address lb uses as SNAT source
/// on that egress interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceAddr {
    pub addr: [u8; 4],
}
assert_layout!(IfaceAddr, size = 4, align = 1);
