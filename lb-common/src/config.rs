//! Load-time settings of the data plane, written into the programs' read-only global.

use crate::assert_size;

/// Idle timeouts of tracked connections (nanoseconds) and the connect-retry budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    pub tcp_syn_timeout_ns: u64,
    pub tcp_established_timeout_ns: u64,
    pub tcp_closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    /// How many times one connection attempt may be moved to another backend after a
    /// refusal or a connect timeout (0 turns re-steering off). Istio's default retry
    /// policy retries a connect failure twice.
    pub connect_retries: u32,
    pub _pad: u32,
}
assert_size!(DataplaneConfig, 40);

/// Most re-steers one connection attempt may make, whatever the configuration.
pub const MAX_CONNECT_RETRIES: u32 = 8;

/// A client's SYN seen again at least this long after the one sent to the current
/// backend is a retransmission for want of an answer: a connect timeout. Linux
/// retransmits an unanswered SYN after 1 s; earlier duplicates are not timeouts.
pub const SYN_RETRANSMIT_MIN_NS: u64 = 200_000_000;

const SEC: u64 = 1_000_000_000;

impl DataplaneConfig {
    /// Defaults in the range of Linux conntrack and Cilium: short while a handshake or a
    /// close is in progress, long once established.
    pub const DEFAULT: Self = Self {
        tcp_syn_timeout_ns: 60 * SEC,
        tcp_established_timeout_ns: 6 * 3600 * SEC,
        tcp_closing_timeout_ns: 10 * SEC,
        udp_timeout_ns: 60 * SEC,
        connect_retries: 2,
        _pad: 0,
    };
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}
