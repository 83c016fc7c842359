//! `lb backend`: lb's decapsulation program on a backend of `dsr` services, for hosts
//! whose kernel has no `ipip` module (or where a tunnel device is unwanted). It strips
//! the outer header of the IPIP packets lb sends for the given VIPs and hands the client's
//! packet to the stack, which delivers it to the VIP held on a local device.
//!
//! Like `lb run`, it pins what it sets up under a bpffs directory and exits: the program
//! stays attached without any process. Run again, it swaps in a program with the new VIP
//! list atomically (through the pinned links) and detaches from interfaces no longer
//! named; `--down` removes it all.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{Xdp, XdpMode, links::FdLink, xdp::XdpLink},
};

use crate::dataplane::{
    self,
    pins::{self, LinkKind},
};

/// The object built by `cargo xtask build-ebpf` (its own, so that a backend loads none of
/// the balancer's maps).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_DECAP_OBJECT"));
const PROGRAM: &str = "lb_decap";
const VIPS: &str = "decap_vips";

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("loading the decapsulation program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the decapsulation program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("its VIP map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("{0} is missing from the decapsulation object")]
    Missing(&'static str),
    #[error("no interface named {0}")]
    NoInterface(String),
    #[error("attaching to {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not on a bpffs mount (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs(PathBuf),
    #[error("give at most {max} VIPs (got {got})")]
    TooManyVips { max: usize, got: usize },
}

/// At most this many VIPs (the map's size in the program).
pub const MAX_VIPS: usize = 1024;

/// Attaches the program to `ifaces` for `vips`, pinned under `dir`, replacing what an
/// earlier run pinned there. The interfaces it was attached to before and no longer is.
pub fn install(dir: &Path, ifaces: &[String], vips: &[Ipv4Addr]) -> Result<usize, DecapError> {
    if vips.len() > MAX_VIPS {
        return Err(DecapError::TooManyVips {
            max: MAX_VIPS,
            got: vips.len(),
        });
    }
    let pin_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DecapError::Pin { path, source }
    };
    dataplane::mount_bpffs_if_missing(dir).map_err(pin_err(dir))?;
    std::fs::create_dir_all(dir).map_err(pin_err(dir))?;
    if !dataplane::is_bpffs(dir) {
        return Err(DecapError::NotBpffs(dir.to_path_buf()));
    }
    let indexes = ifaces
        .iter()
        .map(|i| {
            nix::net::if_::if_nametoindex(i.as_str())
                .map_err(|_| DecapError::NoInterface(i.clone()))
        })
        .collect::<Result<Vec<u32>, _>>()?;

    let mut ebpf = Ebpf::load(DECAP_OBJECT)?;
    let mut map: HashMap<_, [u8; 4], u32> =
        HashMap::try_from(ebpf.take_map(VIPS).ok_or(DecapError::Missing(VIPS))?)?;
    for vip in vips {
        map.insert(vip.octets(), 1, 0)?;
    }
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or(DecapError::Missing(PROGRAM))?
        .try_into()?;
    prog.load()?;
    for (iface, &ifindex) in ifaces.iter().zip(&indexes) {
        let attach_err = |e: &dyn std::fmt::Display| DecapError::Attach {
            iface: iface.clone(),
            message: e.to_string(),
        };
        let pin = pins::link_pin(dir, ifindex);
        if let Some(link) = pins::open_link(&pin, LinkKind::Xdp, ifindex) {
            // Swapped in place: no packet meets the interface without a program.
            let link = XdpLink::try_from(link).map_err(|e| attach_err(&e))?;
            prog.attach_to_link(link).map_err(|e| attach_err(&e))?;
        } else {
            let _ = std::fs::remove_file(&pin);
            let id = prog
                .attach(iface, XdpMode::Default)
                .map_err(|e| attach_err(&e))?;
            let link = FdLink::try_from(prog.take_link(id)?).map_err(|e| attach_err(&e))?;
            link.pin(&pin).map_err(|e| DecapError::Pin {
                path: pin.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
    }
    // The new map replaces the old one's pin (the old program goes with its last link).
    let map_pin = dir.join(VIPS);
    let _ = std::fs::remove_file(&map_pin);
    map.pin(&map_pin).map_err(|e| DecapError::Pin {
        path: map_pin.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut left = 0;
    for (ifindex, pin) in pins::link_pins(dir) {
        if !indexes.contains(&ifindex) {
            let _ = std::fs::remove_file(pin);
            left += 1;
        }
    }
    Ok(left)
}

/// Detaches the program and removes everything pinned under `dir`: how many pins.
pub fn remove(dir: &Path) -> Result<usize, DecapError> {
    let mut removed = 0;
    for (_, pin) in pins::link_pins(dir) {
        // Unpinned, a link no process holds is released, and detaches.
        std::fs::remove_file(&pin).map_err(|source| DecapError::Pin {
            path: pin.clone(),
            source,
        })?;
        removed += 1;
    }
    let map_pin = dir.join(VIPS);
    if map_pin.exists() {
        std::fs::remove_file(&map_pin).map_err(|source| DecapError::Pin {
            path: map_pin.clone(),
            source,
        })?;
        removed += 1;
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// Which of `vips` no interface of this host holds: the stack would not take their
/// packets once decapsulated.
pub fn vips_not_held(vips: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let held: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| {
                    a.address?
                        .as_sockaddr_in()
                        .map(nix::sys::socket::SockaddrIn::ip)
                })
                .collect()
        })
        .unwrap_or_default();
    vips.iter().copied().filter(|v| !held.contains(v)).collect()
}
