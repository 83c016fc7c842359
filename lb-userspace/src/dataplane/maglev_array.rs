//! The `maglev` array, memory-mapped: a whole service's table is written with plain
//! stores instead of one syscall per slot (millions of slots at a cold start).
use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::MapData;

/// Array elements are 8-byte aligned in the kernel: a u32 slot every 8 bytes.
const STRIDE: usize = 8;

pub struct MaglevArray {
    base: NonNull<u8>,
    len: usize,
    slots: u32,
    /// Keeps the map alive as long as the mapping.
    _map: MapData,
}

// SAFETY: the mapping is owned here and only touched through `&mut self` or `&self` reads.
unsafe impl Send for MaglevArray {}

impl MaglevArray {
    pub fn new(map: MapData, slots: u32) -> std::io::Result<Self> {
        let page = 4096;
        let len = (slots as usize * STRIDE).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of a BPF array created with BPF_F_MMAPABLE, `len` bytes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(ptr as *mut u8)
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self {
            base,
            len,
            slots,
            _map: map,
        })
    }

    pub fn set(&mut self, slot: u32, backend_id: u32) {
        assert!(slot < self.slots, "slot {slot} out of {}", self.slots);
        // SAFETY: in bounds (checked above) and aligned; the kernel reads it as a u32.
        unsafe {
            (self.base.as_ptr().add(slot as usize * STRIDE) as *mut u32).write_volatile(backend_id);
        };
    }

    pub fn get(&self, slot: u32) -> u32 {
        assert!(slot < self.slots, "slot {slot} out of {}", self.slots);
        // SAFETY: as in `set`.
        unsafe { (self.base.as_ptr().add(slot as usize * STRIDE) as *const u32).read_volatile() }
    }
}

impl Drop for MaglevArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len) };
    }
}
