//! Types and pure logic shared by the lb XDP program (`lb-ebpf`) and its control plane
//! (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding and a compile-time size
//! check, so that the kernel, the daemon and `bpftool` agree on the layout byte for byte.
//! Addresses are kept as `[u8; 4]` in network order (bpftool prints them as four numbers);
//! ports are kept in host order (bpftool prints them as plain numbers).
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod config;
pub mod cookie;
pub mod csum;
pub mod flood;
pub mod flow;
pub mod flowtab;
pub mod hash;
pub mod kernel_hop;
#[cfg(any(feature = "user", test))]
pub mod maglev;
pub mod ports;
pub mod service;
pub mod stats;
#[cfg(feature = "user")]
mod user;

/// IP protocol numbers lb balances.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Fails the build when a shared type's size or alignment is not what both sides expect.
macro_rules! assert_layout {
    ($t:ty, size = $size:expr, align = $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
    };
}
pub(crate) use assert_layout;
