//! How much memory a BPF map takes: the kernel's own figure where it gives one, an
//! estimate from the sizes otherwise. Used by `lb maps` and the benchmark.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
};

/// The key-value lines of `/proc/self/fdinfo/FD` for a map descriptor: the kernel's own
/// figures (`map_type`, `max_entries`, `memlock`, `map_id`, ...). Empty when unreadable.
pub fn fdinfo(fd: BorrowedFd<'_>) -> HashMap<String, String> {
    fdinfo_raw(fd.as_raw_fd())
}

/// The same for a descriptor number of this process (e.g. from `/proc/self/fd`).
pub fn fdinfo_raw(fd: RawFd) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The map's memory in bytes from its fdinfo: `memlock` (the kernel's figure on kernels
/// since 6.2), and whether it had to be estimated from the sizes instead.
pub fn map_bytes(fdinfo: &HashMap<String, String>) -> (u64, bool) {
    let get = |k: &str| fdinfo.get(k).and_then(|v| v.parse::<u64>().ok());
    match get("memlock") {
        Some(m) => (m, false),
        None => (
            estimate(
                get("map_type").unwrap_or(0),
                get("max_entries").unwrap_or(0),
                get("key_size").unwrap_or(0),
                get("value_size").unwrap_or(0),
            ),
            true,
        ),
    }
}

/// Memory estimate when the kernel gives none: values rounded up to 8 bytes (per CPU for
/// per-CPU maps), hash entries with the kernel's per-element header (about 48 bytes).
pub fn estimate(map_type: u64, max: u64, key: u64, value: u64) -> u64 {
    let round = |n: u64| n.div_ceil(8) * 8;
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
    match map_type {
        // array
        2 => max * round(value),
        // per-CPU array
        6 => max * round(value) * cpus,
        // hash, LRU hash
        1 | 9 => max * (48 + round(key) + round(value)),
        // per-CPU hash, LRU per-CPU hash
        5 | 10 => max * (48 + round(key) + 8) + max * round(value) * cpus,
        // ring buffer: max_entries is its size in bytes
        27 => max,
        _ => max * (key + value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_kernels_memlock_is_used_when_given() {
        let fd = info(&[
            ("map_type", "2"),
            ("max_entries", "10"),
            ("memlock", "4096"),
        ]);
        assert_eq!(map_bytes(&fd), (4096, false));
    }

    #[test]
    fn without_memlock_the_sizes_give_an_estimate() {
        // An array of 10 values of 12 bytes: each rounded up to 16.
        let array = info(&[
            ("map_type", "2"),
            ("max_entries", "10"),
            ("value_size", "12"),
        ]);
        assert_eq!(map_bytes(&array), (160, true));
        // A hash of 4 entries, 13-byte keys and 40-byte values: 48 + 16 + 40 each.
        let hash = info(&[
            ("map_type", "1"),
            ("max_entries", "4"),
            ("key_size", "13"),
            ("value_size", "40"),
        ]);
        assert_eq!(map_bytes(&hash), (4 * (48 + 16 + 40), true));
    }

    #[test]
    fn fdinfo_of_a_descriptor_that_is_not_open_is_empty() {
        assert!(fdinfo_raw(-1).is_empty());
    }
}
