//! Writing many entries of an array map in one `bpf()` call (`BPF_MAP_UPDATE_BATCH`,
//! Linux 5.6): publishing ten thousand services writes a million backend entries, and a
//! call per entry costs more than everything else the publish does.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::Result;

/// `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries per call: the kernel copies keys and values in, and holds no lock across them,
/// so this only bounds the buffers.
const CHUNK: usize = 4096;

/// The `batch` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `values[i]` at index `keys[i]` of the array map behind `fd`, in as few calls as
/// fit. `what` names the map. On a kernel without batch operations, or one that refuses
/// an entry, it falls back to `single` per entry, whose error names the entry.
pub fn update_array<V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[u32],
    values: &[V],
    what: &str,
    mut single: impl FnMut(u32, &V) -> Result<()>,
) -> Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix the size passed; `keys` and `values`
        // hold `count` entries of the map's key and value sizes, alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc != 0 {
            // No batch operations here, or an entry refused (how many went in before it
            // is not reported the same way by every kernel): one call per entry, which
            // rewrites the same values and names the entry that fails.
            log::debug!(
                "batch write of {what} failed ({}); writing entry by entry",
                std::io::Error::last_os_error()
            );
            for (k, v) in keys.iter().zip(values) {
                single(*k, v)?;
            }
        }
    }
    Ok(())
}
