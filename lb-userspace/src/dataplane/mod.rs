//! The only code that touches BPF: loads lb's XDP program, pins its maps, attaches it to
//! interfaces through pinned links and applies services to the maps in an order packets can
//! never observe half done. A restarted daemon adopts what an earlier one pinned (see
//! `pins`), so forwarding never stops for a control-plane restart.
mod adopt;
mod apply;
mod clock;
mod drain;
mod ids;
mod maglev_array;
pub mod names;
pub(crate) mod pins;
mod slots;
mod sweep;

use std::{
    collections::{BTreeSet, HashMap as StdHashMap, HashSet},
    ffi::CString,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{
    config::{Config, IFACE_TX_BY_REDIRECT, IfaceAddrs, LAYOUT_VERSION, MAX_SNAT_ADDRS, NextHop},
    flood::Flood,
    hash::SipKey,
    ports::{BackendState, PortTable, PortTableKey},
    service::{Backend, FilterSlot, ServiceInfo, ServiceKey},
    stats::{Counters, DropReason},
};

pub use apply::Installed;
pub use drain::Draining;
use ids::IdAllocator;
use slots::SlotAllocator;
pub use sweep::{FloodView, PortUse};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

/// The forwarding program, and two do-nothing programs the benchmark measures against.
pub const PROGRAM: &str = "lb_xdp";
pub const PASS_PROGRAM: &str = "lb_pass";
pub const TX_PROGRAM: &str = "lb_tx";
/// The sweep the daemon runs once a second (see `sweep`).
pub const SWEEP_PROGRAM: &str = "lb_sweep";
/// tc ingress beside the XDP program: sends the frames XDP hands up for want of a next
/// hop's MAC through the kernel's neighbour layer.
pub const KERNEL_HOP_PROGRAM: &str = "lb_kernel_hop";

/// Every map, by the name it has in the object and under the pin directory.
pub use names::ALL as MAPS;

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
    #[error("attaching lb's programs to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("a link on {iface}: {source}")]
    Link { iface: String, source: LinkError },
    #[error("no interface named {0}")]
    NoInterface(String),
    #[error("the eBPF object has no map or program named {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Full(String),
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("mapping the maglev array: {0}")]
    Mmap(std::io::Error),
    #[error("reading the kernel's random source: {0}")]
    Random(std::io::Error),
}

/// Sizes of the maps, chosen at load time.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_services: u32,
    pub max_backends: u32,
    pub maglev_slots: u32,
    pub conntrack_entries: u32,
}

/// When lb answers SYNs with cookies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieMode {
    /// Above `rate` new SYNs a second, or while a backend's ports are `occupancy` per mille
    /// full (0: never for that reason).
    Auto {
        rate: u32,
        occupancy: u32,
    },
    Always,
    Never,
}

/// The balancer-wide settings the program reads.
#[derive(Debug, Clone)]
pub struct Settings {
    /// SNAT source ports, inclusive.
    pub snat_ports: (u16, u16),
    pub flow_key: SipKey,
    pub cookie_key: SipKey,
    pub cookies: CookieMode,
    /// Seconds a backend holds a tuple it closed first in TIME_WAIT.
    pub time_wait_s: u32,
}

impl Settings {
    /// Settings for tests and benchmarks: fixed keys, cookies never.
    pub fn with_ports(min: u16, max: u16) -> Self {
        Self {
            snat_ports: (min, max),
            flow_key: SipKey { k0: 1, k1: 2 },
            cookie_key: SipKey { k0: 3, k1: 4 },
            cookies: CookieMode::Never,
            time_wait_s: 60,
        }
    }
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
    vip_filter: Array<MapData, FilterSlot>,
    /// The service keys on each `vip_filter` slot (a slot's count is their number).
    filter_keys: StdHashMap<u32, Vec<ServiceKey>>,
    backends: Array<MapData, Backend>,
    backend_hops: Array<MapData, NextHop>,
    backend_state: Array<MapData, BackendState>,
    maglev: maglev_array::MaglevArray,
    config: Array<MapData, Config>,
    iface_addrs: HashMap<MapData, u32, IfaceAddrs>,
    /// What `iface_addrs` is made from: SNAT addresses by ifindex, and the interfaces
    /// sent back out of by redirect.
    snat_addrs: StdHashMap<u32, Vec<[u8; 4]>>,
    tx_by_redirect: HashSet<u32>,
    port_tables: HashMap<MapData, PortTableKey, PortTable>,
    flood: Array<MapData, Flood>,
    cookie_stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    drops: PerCpuArray<MapData, u64>,
    /// Our descriptors of the XDP links (pinned: closing them detaches nothing).
    links: Vec<(u32, FdLink)>,
    /// Services found in adopted maps and not yet claimed by a restored service, by key.
    adopted: StdHashMap<ServiceKey, Installed>,
    /// Whether dropping this leaves the program attached and the maps pinned (a daemon's
    /// normal exit) or removes them (tests, and a start that failed).
    keep_on_drop: bool,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// Generation last given to each backend id (index = id).
    generations: Vec<u32>,
    slots: SlotAllocator,
    installed: StdHashMap<String, Installed>,
    max_services: u32,
    hz: u32,
    /// Slots of `conntrack` (`flowtab::flow_slots` of the flows it is sized for).
    flow_slots: u32,
    /// The settings last written to `config`.
    settings: Option<Settings>,
    /// An exclusive lock on the pin directory, held while this daemon uses it.
    _lock: std::fs::File,
}

pub(crate) fn is_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(path) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data, valid all zero; the kernel fills it from a
    // NUL-terminated path that lives across the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Mounts bpffs on /sys/fs/bpf, as systemd does at boot, when `dir` is under it and
/// nothing is mounted there (containers and minimal hosts).
pub(crate) fn mount_bpffs_if_missing(dir: &Path) -> std::io::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) || is_bpffs(root) || !root.is_dir() {
        return Ok(());
    }
    let (src, fstype, target) = (c"bpf", c"bpf", c"/sys/fs/bpf");
    // SAFETY: NUL-terminated static strings, and no mount data.
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
    /// Loads the program with its maps pinned under `pin_dir` (created if needed). Pinned
    /// maps an earlier daemon left are adopted when their layout matches, with every
    /// service and tracked flow in them; otherwise they are replaced by fresh ones. On
    /// failure nothing this call created is left behind, and adopted pins stay as they were.
    pub fn load(pin_dir: &Path, limits: &Limits) -> Result<Self, DataplaneError> {
        let existed = pin_dir.exists();
        let lock = Self::lock_pin_dir(pin_dir)?;
        let adopt = match pins::inspect(pin_dir, limits) {
            pins::Pinned::Nothing => false,
            pins::Pinned::Adoptable => true,
            pins::Pinned::Incompatible(why) => {
                tracing::warn!(
                    "not adopting the maps pinned under {}: {why}; starting with fresh maps (tracked flows are balanced again)",
                    pin_dir.display()
                );
                Self::remove_map_pins(pin_dir);
                false
            }
        };
        let result = Self::load_maps(pin_dir, limits, lock, adopt);
        if result.is_err() && !adopt {
            Self::remove_map_pins(pin_dir);
            if !existed {
                let _ = std::fs::remove_dir(pin_dir);
            }
        }
        result
    }

    /// Creates `pin_dir` on bpffs and takes its lock: one daemon per pin directory.
    fn lock_pin_dir(pin_dir: &Path) -> Result<std::fs::File, DataplaneError> {
        let pin_err = |source| DataplaneError::Pin {
            path: pin_dir.to_path_buf(),
            source,
        };
        mount_bpffs_if_missing(pin_dir).map_err(pin_err)?;
        std::fs::create_dir_all(pin_dir).map_err(pin_err)?;
        if !is_bpffs(pin_dir) {
            return Err(DataplaneError::NotBpffs(pin_dir.to_path_buf()));
        }
        let lock = std::fs::File::open(pin_dir).map_err(pin_err)?;
        // SAFETY: flock on a descriptor held open here; no memory is passed.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(DataplaneError::InUse(pin_dir.to_path_buf()));
        }
        Ok(lock)
    }

    fn remove_map_pins(pin_dir: &Path) {
        for name in MAPS {
            let _ = std::fs::remove_file(pin_dir.join(name));
        }
    }

    /// Detaches and removes everything an lb pinned under `pin_dir` (`lb down`): the XDP
    /// links, then the maps. Refused while a daemon uses the directory.
    pub fn remove_pins(pin_dir: &Path) -> Result<usize, DataplaneError> {
        let lock = Self::lock_pin_dir(pin_dir)?;
        let removed = Self::unpin_all(pin_dir);
        drop(lock);
        Ok(removed)
    }

    /// The addresses of the backends in the maps pinned under `pin_dir` (active, or down
    /// after a failed health check; retired ones have no address).
    pub fn pinned_backends(pin_dir: &Path) -> Vec<std::net::Ipv4Addr> {
        let Ok(data) = MapData::from_pin(pin_dir.join(names::BACKENDS)) else {
            return Vec::new();
        };
        let Ok(backends) = Array::<MapData, Backend>::try_from(aya::maps::Map::Array(data)) else {
            return Vec::new();
        };
        let mut addrs: Vec<std::net::Ipv4Addr> = (1..backends.len())
            .filter_map(|id| backends.get(&id, 0).ok())
            .filter(|b| b.addr != [0; 4])
            .map(|b| b.addr.into())
            .collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    fn unpin_all(pin_dir: &Path) -> usize {
        let mut removed = 0;
        for (_, pin) in pins::link_pins(pin_dir) {
            // Held across the unpin and closed after it: the kernel frees a link whose last
            // reference an unpin drops later, from a workqueue, but detaches it at once when
            // that reference goes with a close. So the program is off the interface when
            // this returns.
            let held = aya::programs::links::PinnedLink::from_pin(&pin)
                .ok()
                .map(FdLink::from);
            removed += std::fs::remove_file(&pin).is_ok() as usize;
            drop(held);
        }
        for name in MAPS {
            removed += std::fs::remove_file(pin_dir.join(name)).is_ok() as usize;
        }
        let _ = std::fs::remove_dir(pin_dir);
        removed
    }

    fn load_maps(
        pin_dir: &Path,
        limits: &Limits,
        lock: std::fs::File,
        adopt: bool,
    ) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        for (name, entries) in pins::max_entries(limits) {
            loader.map_max_entries(name, entries);
        }
        // Opened when pinned (adopted), else created and pinned.
        for name in MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [PROGRAM, PASS_PROGRAM, TX_PROGRAM, SWEEP_PROGRAM] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Missing(name))?
                .try_into()?;
            prog.load()?;
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut(KERNEL_HOP_PROGRAM)
            .ok_or(DataplaneError::Missing(KERNEL_HOP_PROGRAM))?
            .try_into()?;
        prog.load()?;
        let mut dataplane = Self {
            services: take(&mut ebpf, names::SERVICES)?,
            vip_filter: take(&mut ebpf, names::VIP_FILTER)?,
            filter_keys: StdHashMap::new(),
            backends: take(&mut ebpf, names::BACKENDS)?,
            backend_hops: take(&mut ebpf, names::BACKEND_HOPS)?,
            backend_state: take(&mut ebpf, names::BACKEND_STATE)?,
            maglev: match ebpf.take_map(names::MAGLEV) {
                Some(aya::maps::Map::Array(data)) => {
                    maglev_array::MaglevArray::new(data, limits.maglev_slots)
                        .map_err(DataplaneError::Mmap)?
                }
                _ => return Err(DataplaneError::Missing(names::MAGLEV)),
            },
            config: take(&mut ebpf, names::CONFIG)?,
            iface_addrs: take(&mut ebpf, names::IFACE_ADDRS)?,
            snat_addrs: StdHashMap::new(),
            tx_by_redirect: HashSet::new(),
            port_tables: take(&mut ebpf, names::PORT_TABLES)?,
            flood: take(&mut ebpf, names::FLOOD)?,
            cookie_stats: take(&mut ebpf, names::COOKIE_STATS)?,
            service_stats: take(&mut ebpf, names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            drops: take(&mut ebpf, names::DROPS)?,
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            links: Vec::new(),
            adopted: StdHashMap::new(),
            keep_on_drop: false,
            service_ids: IdAllocator::new(limits.max_services + 1),
            backend_ids: IdAllocator::new(limits.max_backends + 1),
            generations: vec![0; limits.max_backends as usize + 1],
            slots: SlotAllocator::new(limits.maglev_slots),
            installed: StdHashMap::new(),
            max_services: limits.max_services,
            hz: clock::kernel_hz(),
            flow_slots: lb_common::flowtab::flow_slots(limits.conntrack_entries),
            settings: None,
            _lock: lock,
        };
        if adopt {
            // The pins are an earlier daemon's state, serving traffic: neither a failure
            // here nor a daemon that fails to start later may remove them.
            dataplane.keep_on_drop = true;
            dataplane.read_adopted(limits)?;
        }
        Ok(dataplane)
    }

    /// Whether the maps came from an earlier daemon, and how many of its services are not
    /// yet restored (see [`Dataplane::finish_adoption`]).
    pub fn adopted_services(&self) -> usize {
        self.adopted.len()
    }

    /// Leave the program attached and the maps pinned when this is dropped, so that the
    /// next daemon takes over without a lost packet (always so for adopted maps). `lb down`
    /// removes them.
    pub fn keep_on_exit(&mut self) {
        self.keep_on_drop = true;
    }

    /// Writes the balancer-wide settings: the SNAT source port range, the group's secrets,
    /// when to answer SYNs with cookies, and the kernel's tick rate that the program's
    /// timeouts are counted in.
    pub fn configure(&mut self, s: &Settings) -> Result<(), DataplaneError> {
        let (flags, rate, occupancy) = match s.cookies {
            CookieMode::Auto { rate, occupancy } => (0, rate, occupancy),
            CookieMode::Always => (lb_common::config::COOKIES_ALWAYS, 0, 0),
            CookieMode::Never => (lb_common::config::COOKIES_NEVER, 0, 0),
        };
        // The table's key lives as long as the table: kept from the config pinned with it.
        let table_key = match self.config.get(&0, 0) {
            Ok(c) if c.table_key != SipKey::default() => c.table_key,
            _ => {
                crate::secret::GroupKeys::random()
                    .map_err(DataplaneError::Random)?
                    .flow
            }
        };
        self.config.set(
            0,
            Config {
                snat_port_min: s.snat_ports.0,
                snat_port_max: s.snat_ports.1,
                hz: self.hz,
                layout: LAYOUT_VERSION,
                flags,
                flow_key: s.flow_key,
                cookie_key: s.cookie_key,
                cookie_syn_rate: rate,
                cookie_occupancy: occupancy,
                time_wait_s: s.time_wait_s,
                nr_cpus: aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))? as u32,
                flow_slots: self.flow_slots,
                _reserved: 0,
                table_key,
            },
            0,
        )?;
        self.settings = Some(s.clone());
        Ok(())
    }

    /// The secrets in the pinned `config` an earlier daemon left, if any (a restart keeps
    /// the flow hash, so tracked and new flows agree).
    pub fn pinned_keys(&self) -> Option<(SipKey, SipKey)> {
        let c = self.config.get(&0, 0).ok()?;
        (c.flow_key != SipKey::default()).then_some((c.flow_key, c.cookie_key))
    }

    /// Makes `addrs` (ifindex -> IPv4 addresses, the first one the default) the SNAT source
    /// addresses, removing others. At most `MAX_SNAT_ADDRS` an interface are used.
    pub fn set_iface_addrs(
        &mut self,
        addrs: &StdHashMap<u32, Vec<[u8; 4]>>,
    ) -> Result<(), DataplaneError> {
        self.snat_addrs = addrs.clone();
        self.write_ifaces()
    }

    /// Frames that leave `ifindex` where they came in go by redirect (a veth).
    pub fn set_tx_by_redirect(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.tx_by_redirect.insert(ifindex);
        self.write_ifaces()
    }

    /// Writes `iface_addrs`: an entry for every interface with SNAT addresses or a flag.
    fn write_ifaces(&mut self) -> Result<(), DataplaneError> {
        let wanted = |k: &u32| {
            self.snat_addrs.get(k).is_some_and(|a| !a.is_empty()) || self.tx_by_redirect.contains(k)
        };
        // Stale ones first, so that interface churn never fills the map.
        let stale: Vec<u32> = self
            .iface_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted(k))
            .collect();
        for k in stale {
            self.iface_addrs.remove(&k)?;
        }
        let ifindexes: BTreeSet<u32> = self
            .snat_addrs
            .keys()
            .chain(self.tx_by_redirect.iter())
            .copied()
            .filter(|k| wanted(k))
            .collect();
        for ifindex in ifindexes {
            let list = self
                .snat_addrs
                .get(&ifindex)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut value = IfaceAddrs::default();
            for (slot, addr) in value.addrs.iter_mut().zip(list.iter().take(MAX_SNAT_ADDRS)) {
                *slot = *addr;
            }
            value.count = list.len().min(MAX_SNAT_ADDRS) as u8;
            if self.tx_by_redirect.contains(&ifindex) {
                value.flags |= IFACE_TX_BY_REDIRECT;
            }
            if self.iface_addrs.get(&ifindex, 0).ok() != Some(value) {
                self.iface_addrs.insert(ifindex, value, 0)?;
            }
        }
        Ok(())
    }

    /// Attaches the program to `iface` (native XDP where the driver has it) through a
    /// pinned link. When an earlier daemon's link is pinned for it, the program is swapped
    /// in through that link instead: atomically, so no packet goes unhandled. The tc
    /// ingress program that sends what XDP hands up for want of a neighbour
    /// ([`KERNEL_HOP_PROGRAM`]) is attached beside it the same way.
    pub fn attach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|_| DataplaneError::NoInterface(iface.to_string()))?;
        let link_err = |source| DataplaneError::Link {
            iface: iface.to_string(),
            source,
        };
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_string(),
            source,
        };
        let pin_err = |path: &Path, e: aya::pin::PinError| DataplaneError::Pin {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        };

        let pin = pins::link_pin(&self.pin_dir, ifindex);
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::Missing(PROGRAM))?
            .try_into()?;
        if let Some(link) = pins::open_link(&pin, pins::LinkKind::Xdp, ifindex) {
            let link = XdpLink::try_from(link).map_err(link_err)?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            let link = FdLink::try_from(prog.take_link(id)?).map_err(link_err)?;
            tracing::info!(iface, "replaced the program on the pinned XDP link");
            self.links.push((ifindex, link));
        } else {
            // A pin for a device that is gone (the index was reused) holds a dead link.
            let _ = std::fs::remove_file(&pin);
            let id = prog.attach(iface, XdpMode::Default).map_err(attach_err)?;
            let link = FdLink::try_from(prog.take_link(id)?).map_err(link_err)?;
            let pinned = link.pin(&pin).map_err(|e| pin_err(&pin, e))?;
            self.links.push((ifindex, pinned.into()));
        }

        let pin = pins::tc_link_pin(&self.pin_dir, ifindex);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(KERNEL_HOP_PROGRAM)
            .ok_or(DataplaneError::Missing(KERNEL_HOP_PROGRAM))?
            .try_into()?;
        if let Some(link) = pins::open_link(&pin, pins::LinkKind::Tcx, ifindex) {
            let link = SchedClassifierLink::try_from(link).map_err(link_err)?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            let link = FdLink::try_from(prog.take_link(id)?).map_err(link_err)?;
            self.links.push((ifindex, link));
        } else {
            let _ = std::fs::remove_file(&pin);
            let id = prog
                .attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_err)?;
            let link = FdLink::try_from(prog.take_link(id)?).map_err(link_err)?;
            let pinned = link.pin(&pin).map_err(|e| pin_err(&pin, e))?;
            self.links.push((ifindex, pinned.into()));
        }
        Ok(())
    }

    /// Detaches from interfaces an earlier daemon served and this one does not.
    pub fn detach_others(&mut self) {
        for (ifindex, pin) in pins::link_pins(&self.pin_dir) {
            if !self.links.iter().any(|(i, _)| *i == ifindex) {
                tracing::info!(ifindex, "detaching from an interface no --iface names");
                let _ = std::fs::remove_file(pin);
            }
        }
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
        let draining = inst.draining.iter().map(|d| (d.addr, d.id));
        let backends = inst
            .backends
            .iter()
            .copied()
            .chain(draining)
            .map(|(addr, id)| {
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
                    self.drops.get(&(r as u32), 0).map_or(0, |v| v.iter().sum()),
                )
            })
            .collect()
    }
}

impl Drop for Dataplane {
    /// Leaves everything attached and pinned after [`Dataplane::keep_on_exit`]; otherwise
    /// detaches and removes the pins.
    fn drop(&mut self) {
        self.links.clear();
        if !self.keep_on_drop {
            Self::unpin_all(&self.pin_dir);
        }
    }
}
