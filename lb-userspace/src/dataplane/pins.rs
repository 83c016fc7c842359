//! What lives under the pin directory, and whether a restarted daemon may adopt it.
//!
//! The maps and one XDP link per interface are pinned, so forwarding carries on while no
//! daemon runs. A new daemon adopts pinned maps when their kinds, sizes and the layout
//! version in `config` match its own, and always swaps its program in through the pinned
//! links (an atomic replace: no packet meets an interface without a program).
use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, Map, MapData, MapError, MapInfo},
    programs::links::{FdLink, PinnedLink},
};
use lb_common::config::{Config, LAYOUT_VERSION};

use super::{EBPF_OBJECT, Limits, MAPS, names};

/// The pin of the XDP link on interface `ifindex`. Keyed by index, not name: a renamed
/// interface keeps its link, a re-created one (new index) does not inherit a dead one.
pub fn link_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join(format!("xdp_link_if{ifindex}"))
}

/// The pin of the tc ingress link beside it (see `lb_kernel_hop` in the XDP program).
pub fn tc_link_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join(format!("tc_link_if{ifindex}"))
}

/// Every link pin under `dir` (XDP and tc), with its interface index.
pub fn link_pins(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ifindex = ["xdp_link_if", "tc_link_if"]
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))?
                .parse()
                .ok()?;
            Some((ifindex, e.path()))
        })
        .collect()
}

/// The map sizes a daemon with `limits` creates (ids start at 1: arrays indexed by id get
/// one more entry).
pub fn max_entries(limits: &Limits) -> [(&'static str, u32); 10] {
    [
        (names::SERVICES, limits.max_services),
        (names::SERVICE_STATS, limits.max_services + 1),
        (names::BACKENDS, limits.max_backends + 1),
        (names::BACKEND_STATS, limits.max_backends + 1),
        (names::BACKEND_HOPS, limits.max_backends + 1),
        (names::BACKEND_STATE, limits.max_backends + 1),
        // One bitmap per (backend, SNAT address) in use; memory only for those.
        (names::PORT_TABLES, limits.max_backends.saturating_mul(2)),
        (names::MAGLEV, limits.maglev_slots),
        (
            names::CONNTRACK,
            lb_common::flowtab::flow_slots(limits.conntrack_entries),
        ),
        (names::NAT_REVERSE, limits.conntrack_entries),
    ]
}

/// Why pinned maps cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("the eBPF object: {0}")]
    Object(#[source] aya_obj::ParseError),
    #[error("the program has no map {0}")]
    NoMap(&'static str),
    /// A pinned map that cannot be read.
    #[error("{name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    /// A pinned map of another shape than this lb makes, as (type, key size, value size,
    /// entries, flags).
    #[error("{name} is (type, key, value, entries, flags) {found:?}, this lb makes {want:?}")]
    Shape {
        name: &'static str,
        found: MapShape,
        want: MapShape,
    },
    #[error("layout version {0}, this lb has {LAYOUT_VERSION}")]
    Layout(u32),
}

/// A map's (type, key size, value size, max entries, flags).
pub type MapShape = (u32, u32, u32, u32, u32);

/// What the pin directory holds.
#[derive(Debug)]
pub enum Pinned {
    /// No maps (a first start, or after a reboot).
    Nothing,
    /// Maps this daemon can use as they are.
    Adoptable,
    /// Maps it cannot use, and why.
    Incompatible(PinError),
}

/// Compares the pinned maps with the ones this daemon would create.
pub fn inspect(dir: &Path, limits: &Limits) -> Pinned {
    let present = MAPS.iter().filter(|m| dir.join(m).exists()).count();
    if present == 0 {
        return Pinned::Nothing;
    }
    match check(dir, limits) {
        Ok(()) => Pinned::Adoptable,
        Err(why) => Pinned::Incompatible(why),
    }
}

fn check(dir: &Path, limits: &Limits) -> Result<(), PinError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(PinError::Object)?;
    let sizes = max_entries(limits);
    for name in MAPS {
        let def = object.maps.get(name).ok_or(PinError::NoMap(name))?;
        let unreadable = |source| PinError::Map { name, source };
        let info = MapInfo::from_pin(dir.join(name)).map_err(unreadable)?;
        let want_entries = sizes
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(def.max_entries(), |&(_, n)| n);
        let kind = info.map_type().map_err(unreadable)? as u32;
        let found = (
            kind,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let want = (
            def.map_type(),
            def.key_size(),
            def.value_size(),
            want_entries,
            def.map_flags(),
        );
        if found != want {
            return Err(PinError::Shape { name, found, want });
        }
    }
    let unreadable = |source| PinError::Map {
        name: names::CONFIG,
        source,
    };
    let config: Array<MapData, Config> = Array::try_from(Map::Array(
        MapData::from_pin(dir.join(names::CONFIG)).map_err(unreadable)?,
    ))
    .map_err(unreadable)?;
    let layout = config.get(&0, 0).map_err(unreadable)?.layout;
    if layout != LAYOUT_VERSION {
        return Err(PinError::Layout(layout));
    }
    Ok(())
}

/// The kinds of link lb pins, as `bpf_link_info.type` numbers them.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum LinkKind {
    Xdp = 6,
    Tcx = 11,
}

/// The interface index the link of `kind` pinned at `pin` is attached to (from
/// `bpf_link_info.xdp.ifindex` or `.tcx.ifindex`, which aya does not expose), or `None`
/// when it is another kind of link or its device is gone.
fn pinned_link_ifindex(pin: &Path, kind: LinkKind) -> Option<u32> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose
    // xdp and tcx members both start with ifindex.
    #[allow(dead_code)]
    #[repr(C, align(8))]
    struct LinkInfo {
        kind: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        ifindex: u32,
        rest: [u32; 15],
    }
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).ok()?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET reads an attribute block of the size passed, whose path is
    // NUL-terminated and outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut get as *mut ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just gave us this descriptor; the OwnedFd closes it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: LinkInfo is plain data, valid all zero.
    let mut info: LinkInfo = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the
    // call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoByFd,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    (rc == 0 && info.kind == kind as u32 && info.ifindex != 0).then_some(info.ifindex)
}

/// Opens the link pinned at `pin` if it is a link of `kind` still attached to `ifindex`.
pub fn open_link(pin: &Path, kind: LinkKind, ifindex: u32) -> Option<FdLink> {
    if pinned_link_ifindex(pin, kind) != Some(ifindex) {
        return None;
    }
    Some(PinnedLink::from_pin(pin).ok()?.into())
}
