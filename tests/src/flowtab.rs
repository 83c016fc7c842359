//! Reads lb's pinned `conntrack` table (an mmapable array of one-line slots) the way a
//! test wants it: the live flows, from a read-only mapping of the whole table (a syscall
//! per slot would take seconds over a million slots, and bpftool's dump longer).
use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::Context;
use lb_common::flowtab::{FlowSlot, slot};

/// Every live slot of the `conntrack` table pinned at `pin`.
pub fn live_flows(pin: &Path) -> anyhow::Result<Vec<FlowSlot>> {
    Ok(slots(pin)?
        .into_iter()
        .filter(|s| s.state == slot::LIVE)
        .collect())
}

/// Every slot of the `conntrack` table pinned at `pin`, in order.
pub fn slots(pin: &Path) -> anyhow::Result<Vec<FlowSlot>> {
    let map =
        aya::maps::MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let slots = map.info().context("map info")?.max_entries() as usize;
    let len = (slots * size_of::<FlowSlot>()).div_ceil(4096) * 4096;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: a shared read-only mapping of a BPF_F_MMAPABLE array of `slots` slots.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mmap conntrack");
    }
    let table = ptr as *const FlowSlot;
    // SAFETY: in bounds; slots are plain data (a torn read of a changing slot is possible,
    // as for any reader, and harmless to a test that reads a settled table).
    let all = (0..slots)
        .map(|i| unsafe { table.add(i).read_volatile() })
        .collect();
    unsafe { libc::munmap(ptr, len) };
    Ok(all)
}
