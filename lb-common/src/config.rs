//! Load-time settings of the data plane, written into the programs' read-only global.

use crate::assert_size;

/// Idle timeouts of tracked connections, in nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    pub tcp_syn_timeout_ns: u64,
    pub tcp_established_timeout_ns: u64,
    pub tcp_closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
}
assert_size!(DataplaneConfig, 32);

const SEC: u64 = 1_000_000_000;

impl DataplaneConfig {
    /// Defaults in the range of Linux conntrack and Cilium: short while a handshake or a
    /// close is in progress, long once established.
    pub const DEFAULT: Self = Self {
        tcp_syn_timeout_ns: 60 * SEC,
        tcp_established_timeout_ns: 6 * 3600 * SEC,
        tcp_closing_timeout_ns: 10 * SEC,
        udp_timeout_ns: 60 * SEC,
    };
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}
