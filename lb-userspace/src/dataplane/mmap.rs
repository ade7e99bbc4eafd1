//! The selection-table array mapped into the agent's memory (`BPF_F_MMAPABLE`), so a
//! table of thousands of slots is written with plain stores instead of one `bpf()` call
//! per slot. Readers in the kernel only look at a table after the service entry naming it
//! is replaced, which is a syscall and so orders the stores before it.

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{bail, Result};

pub struct MappedU32Array {
    ptr: *mut u32,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value. Only the data plane
// that made it writes (publishing tables); readers on other threads (`get`, the TLS forwarder) may see a slot before
// or after a write, as the kernel's programs do: each slot is an aligned u32, read and
// written whole.
unsafe impl Send for MappedU32Array {}
unsafe impl Sync for MappedU32Array {}

impl MappedU32Array {
    /// Maps the `len` `u32` entries of the array map behind `fd`.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (len * 4).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of a BPF array fd; the kernel checks the size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mapping the selection table failed: {} (the kernel needs BPF_F_MMAPABLE arrays, 5.5+)",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            bytes,
        })
    }

    /// Writes `values` starting at `offset` (the data plane's publisher only).
    pub fn write(&self, offset: usize, values: &[u32]) -> Result<()> {
        if offset + values.len() > self.len {
            bail!(
                "selection table write {offset}+{} beyond {}",
                values.len(),
                self.len
            );
        }
        // SAFETY: in bounds (checked above) of a live mapping we own.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(offset), values.len())
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The value at `index`, if in bounds.
    pub fn get(&self, index: usize) -> Option<u32> {
        // SAFETY: in bounds of a live mapping; volatile, since the agent rewrites it.
        (index < self.len).then(|| unsafe { std::ptr::read_volatile(self.ptr.add(index)) })
    }

    /// Reads `len` values starting at `offset`.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u32>> {
        if offset + len > self.len {
            bail!("selection table read {offset}+{len} beyond {}", self.len);
        }
        // SAFETY: in bounds of a live mapping; u32 has no invalid bit patterns.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }.to_vec())
    }
}

impl Drop for MappedU32Array {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}
