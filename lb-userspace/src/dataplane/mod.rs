//! The only code that touches BPF: loads lb's XDP program, pins its maps, attaches it to
//! interfaces and applies services to the maps in an order packets can never observe
//! half done.
mod apply;
mod clock;
mod ids;
mod maglev_array;
mod slots;

use std::{
    collections::HashMap as StdHashMap,
    ffi::CString,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    config::{Config, IfaceAddr, NextHop},
    service::{Backend, ServiceInfo, ServiceKey},
    stats::{Counters, DropReason},
};

pub use apply::Installed;
use ids::IdAllocator;
use slots::SlotAllocator;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

/// The forwarding program, and two do-nothing programs the benchmark measures against.
pub const PROGRAM: &str = "lb_xdp";
pub const PASS_PROGRAM: &str = "lb_pass";
pub const TX_PROGRAM: &str = "lb_tx";

/// Every map, by the name it has in the object and under the pin directory.
pub const MAPS: [&str; 14] = [
    "services",
    "vip_filter",
    "backends",
    "backend_hops",
    "maglev",
    "conntrack",
    "nat_reverse",
    "syn_seen",
    "config",
    "iface_addrs",
    "fib_cache",
    "service_stats",
    "backend_stats",
    "drops",
];

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] ProgramError),
    #[error("BPF map: {0}")]
    Map(#[from] MapError),
    #[error("pinning under {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not on a bpffs mount (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs(PathBuf),
    #[error("{0} is in use by another lb (choose another --bpffs)")]
    InUse(PathBuf),
    #[error("attaching XDP to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("the eBPF object has no map or program named {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Full(String),
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("mapping the maglev array: {0}")]
    Mmap(std::io::Error),
}

/// Sizes of the maps, chosen at load time.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_services: u32,
    pub max_backends: u32,
    pub maglev_slots: u32,
    pub conntrack_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: 65536,
            max_backends: 65536,
            maglev_slots: 4_194_304,
            conntrack_entries: 524_288,
        }
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceInfo>,
    vip_filter: Array<MapData, u32>,
    /// What `vip_filter` holds, slot -> count.
    filter_counts: StdHashMap<u32, u32>,
    backends: Array<MapData, Backend>,
    backend_hops: Array<MapData, NextHop>,
    maglev: maglev_array::MaglevArray,
    config: Array<MapData, Config>,
    iface_addrs: HashMap<MapData, u32, IfaceAddr>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    drops: PerCpuArray<MapData, u64>,
    links: Vec<(String, XdpLinkId)>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// Generation last given to each backend id (index = id).
    generations: Vec<u32>,
    slots: SlotAllocator,
    installed: StdHashMap<String, Installed>,
    max_services: u32,
    hz: u32,
    /// An exclusive lock on the pin directory, held while this daemon uses it.
    _lock: std::fs::File,
}

fn is_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(path) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Mounts bpffs on /sys/fs/bpf, as systemd does at boot, when `dir` is under it and
/// nothing is mounted there (containers and minimal hosts).
fn mount_bpffs_if_missing(dir: &Path) -> std::io::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) || is_bpffs(root) || !root.is_dir() {
        return Ok(());
    }
    let (src, fstype, target) = (c"bpf", c"bpf", c"/sys/fs/bpf");
    if unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    tracing::info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    Ok(T::try_from(
        ebpf.take_map(name).ok_or(DataplaneError::Missing(name))?,
    )?)
}

impl Dataplane {
    /// Loads the program and its maps and pins the maps under `pin_dir` (created if
    /// needed; pins left there by an earlier run are replaced). On failure nothing that
    /// was created is left behind.
    pub fn load(pin_dir: &Path, limits: &Limits) -> Result<Self, DataplaneError> {
        let existed = pin_dir.exists();
        let result = Self::load_and_pin(pin_dir, limits);
        // The pins of another daemon are not ours to clean up.
        if result.is_err() && !matches!(result, Err(DataplaneError::InUse(_))) {
            for name in MAPS {
                let _ = std::fs::remove_file(pin_dir.join(name));
            }
            if !existed {
                let _ = std::fs::remove_dir(pin_dir);
            }
        }
        result
    }

    fn load_and_pin(pin_dir: &Path, limits: &Limits) -> Result<Self, DataplaneError> {
        let pin_err = |source| DataplaneError::Pin {
            path: pin_dir.to_path_buf(),
            source,
        };
        mount_bpffs_if_missing(pin_dir).map_err(pin_err)?;
        std::fs::create_dir_all(pin_dir).map_err(pin_err)?;
        if !is_bpffs(pin_dir) {
            return Err(DataplaneError::NotBpffs(pin_dir.to_path_buf()));
        }
        // One daemon per pin directory: a second one would unpin the first one's maps.
        let lock = std::fs::File::open(pin_dir).map_err(pin_err)?;
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(DataplaneError::InUse(pin_dir.to_path_buf()));
        }
        for name in MAPS {
            let pin = pin_dir.join(name);
            if pin.exists() {
                tracing::warn!(pin = %pin.display(), "replacing a pin left by an earlier run");
                std::fs::remove_file(&pin).map_err(pin_err)?;
            }
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("services", limits.max_services)
            // Ids start at 1 (0 means "none"): arrays indexed by id get one more entry.
            .map_max_entries("service_stats", limits.max_services + 1)
            .map_max_entries("backends", limits.max_backends + 1)
            .map_max_entries("backend_stats", limits.max_backends + 1)
            .map_max_entries("backend_hops", limits.max_backends + 1)
            .map_max_entries("maglev", limits.maglev_slots)
            .map_max_entries("conntrack", limits.conntrack_entries)
            .map_max_entries("nat_reverse", limits.conntrack_entries)
            .load(EBPF_OBJECT)?;
        for name in [PROGRAM, PASS_PROGRAM, TX_PROGRAM] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Missing(name))?
                .try_into()?;
            prog.load()?;
        }
        for name in MAPS {
            let map = ebpf.map(name).ok_or(DataplaneError::Missing(name))?;
            map.pin(pin_dir.join(name))
                .map_err(|e| pin_err(std::io::Error::other(e.to_string())))?;
        }
        Ok(Self {
            services: take(&mut ebpf, "services")?,
            vip_filter: take(&mut ebpf, "vip_filter")?,
            filter_counts: StdHashMap::new(),
            backends: take(&mut ebpf, "backends")?,
            backend_hops: take(&mut ebpf, "backend_hops")?,
            maglev: match ebpf.take_map("maglev") {
                Some(aya::maps::Map::Array(data)) => {
                    maglev_array::MaglevArray::new(data, limits.maglev_slots)
                        .map_err(DataplaneError::Mmap)?
                }
                _ => return Err(DataplaneError::Missing("maglev")),
            },
            config: take(&mut ebpf, "config")?,
            iface_addrs: take(&mut ebpf, "iface_addrs")?,
            service_stats: take(&mut ebpf, "service_stats")?,
            backend_stats: take(&mut ebpf, "backend_stats")?,
            drops: take(&mut ebpf, "drops")?,
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            links: Vec::new(),
            service_ids: IdAllocator::new(limits.max_services + 1),
            backend_ids: IdAllocator::new(limits.max_backends + 1),
            generations: vec![0; limits.max_backends as usize + 1],
            slots: SlotAllocator::new(limits.maglev_slots),
            installed: StdHashMap::new(),
            max_services: limits.max_services,
            hz: clock::kernel_hz(),
            _lock: lock,
        })
    }

    /// Writes the balancer-wide settings: the SNAT source port range (inclusive), and the
    /// kernel's tick rate that the program's timeouts are counted in.
    pub fn configure(&mut self, min: u16, max: u16) -> Result<(), DataplaneError> {
        self.config.set(
            0,
            Config {
                snat_port_min: min,
                snat_port_max: max,
                hz: self.hz,
            },
            0,
        )?;
        Ok(())
    }

    /// Makes `addrs` (ifindex -> IPv4) the SNAT source addresses, removing others.
    pub fn set_iface_addrs(
        &mut self,
        addrs: &StdHashMap<u32, [u8; 4]>,
    ) -> Result<(), DataplaneError> {
        // Stale ones first, so that interface churn never fills the map.
        let stale: Vec<u32> = self
            .iface_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !addrs.contains_key(k))
            .collect();
        for k in stale {
            self.iface_addrs.remove(&k)?;
        }
        for (&ifindex, &addr) in addrs {
            if self.iface_addrs.get(&ifindex, 0).ok().map(|a| a.addr) != Some(addr) {
                self.iface_addrs.insert(ifindex, IfaceAddr { addr }, 0)?;
            }
        }
        Ok(())
    }

    /// Attaches the program to `iface` (native XDP where the driver has it).
    pub fn attach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::Missing(PROGRAM))?
            .try_into()?;
        let link =
            prog.attach(iface, XdpMode::Default)
                .map_err(|source| DataplaneError::Attach {
                    iface: iface.to_string(),
                    source,
                })?;
        self.links.push((iface.to_string(), link));
        Ok(())
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&self, name: &str) -> Option<&Xdp> {
        self.ebpf.program(name)?.try_into().ok()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn installed(&self, name: &str) -> Option<&Installed> {
        self.installed.get(name)
    }

    /// A service's Maglev table as the kernel sees it (backend id per slot), read back
    /// from the map.
    pub fn table_in_map(&self, name: &str) -> Option<Vec<u32>> {
        let inst = self.installed.get(name)?;
        Some(
            (0..inst.table_size)
                .map(|i| self.maglev.get(inst.table_offset + i))
                .collect(),
        )
    }

    /// Kernel memory charged to each map (`memlock` in its fdinfo), in bytes.
    pub fn map_memory(&self) -> Vec<(&'static str, u64)> {
        let memlock = |fd: std::os::fd::BorrowedFd<'_>| -> u64 {
            use std::os::fd::AsRawFd;
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
                .ok()
                .and_then(|t| {
                    t.lines().find_map(|l| {
                        l.strip_prefix("memlock:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                })
                .unwrap_or(0)
        };
        MAPS.iter()
            .filter_map(|&name| {
                let map = aya::maps::MapData::from_pin(self.pin_dir.join(name)).ok()?;
                Some((name, memlock(std::os::fd::AsFd::as_fd(map.fd()))))
            })
            .collect()
    }

    fn sum(values: PerCpuValues<Counters>) -> Counters {
        values.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        })
    }

    /// Packets and bytes of a service, and of each of its backends, summed over CPUs.
    pub fn counters(&self, name: &str) -> Option<(Counters, Vec<(SocketAddrV4, Counters)>)> {
        let inst = self.installed.get(name)?;
        let service = self
            .service_stats
            .get(&inst.id, 0)
            .map(Self::sum)
            .unwrap_or_default();
        let backends = inst
            .backends
            .iter()
            .map(|&(addr, id)| {
                (
                    addr,
                    self.backend_stats
                        .get(&id, 0)
                        .map(Self::sum)
                        .unwrap_or_default(),
                )
            })
            .collect();
        Some((service, backends))
    }

    /// Dropped packets by reason, summed over CPUs.
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|&r| {
                (
                    r,
                    self.drops
                        .get(&(r as u32), 0)
                        .map(|v| v.iter().sum())
                        .unwrap_or(0),
                )
            })
            .collect()
    }
}

impl Drop for Dataplane {
    /// Detaches (links are closed with the program) and removes the pins.
    fn drop(&mut self) {
        self.links.clear();
        for name in MAPS {
            let _ = std::fs::remove_file(self.pin_dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}
