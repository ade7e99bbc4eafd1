//! Types shared by lb's eBPF programs and its userspace agent.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, has explicit padding fields and a
//! compile-time size check, so the kernel and userspace agree byte for byte. Addresses
//! and ports are kept in network byte order (`_be` suffix); userspace converts at the
//! boundary. Addresses are 16 bytes wide with a family tag so IPv6 needs no new layout.
#![no_std]

pub mod config;
pub mod counters;
pub mod csum;
pub mod flow;
pub mod maps;
pub mod selection;

pub use config::DataplaneConfig;
pub use counters::{Counter, TrafficStats};
pub use flow::{flow_hash, AddrBe, FlowKey};
pub use maps::{
    Backend, BackendState, ConnDirection, ConnEntry, ConnState, Service, ServiceKey, Signal,
    SignalKind,
};

/// IP protocol numbers as carried in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Address family tag used in keys (values of `AF_INET` / `AF_INET6`).
pub mod family {
    pub const V4: u8 = 2;
    pub const V6: u8 = 10;
}

/// Asserts at compile time that a shared type has the size the other side expects.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

/// Marks types as plain old data for aya's userspace map API.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConnEntry {}
    unsafe impl aya::Pod for crate::maps::ConnEntryV1 {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for Signal {}
    unsafe impl aya::Pod for crate::maps::AffinityKey {}
    unsafe impl aya::Pod for crate::maps::NextHop {}
    unsafe impl aya::Pod for crate::maps::Affinity {}
}
