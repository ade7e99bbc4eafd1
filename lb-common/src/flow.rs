//! Flow identity: the 5-tuple key of the connection table and the hash that picks a
//! backend. The hash lives here so tests can predict the kernel's choice exactly.

use crate::{
    assert_size,
    maps::{AddrRole, ADDR_FILTER_WORDS},
};

/// An IP address in network byte order. IPv4 uses word 0 and leaves words 1..3 zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrBe(pub [u32; 4]);
assert_size!(AddrBe, 16);

impl AddrBe {
    /// From the four octets of an IPv4 address as they appear on the wire.
    #[inline(always)]
    pub const fn v4(octets: [u8; 4]) -> Self {
        Self([u32::from_ne_bytes(octets), 0, 0, 0])
    }

    /// The IPv4 octets (meaningful only when the family is IPv4).
    #[inline(always)]
    pub const fn v4_octets(&self) -> [u8; 4] {
        self.0[0].to_ne_bytes()
    }
}

/// Key of the connection table: a packet's 5-tuple exactly as it is on the wire.
///
/// Both directions of a balanced connection have an entry, each under the tuple its own
/// packets carry (client → VIP for the original direction, backend → client for replies),
/// so one lookup classifies any packet of a tracked flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: AddrBe,
    pub dst: AddrBe,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
assert_size!(FlowKey, 40);

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    // murmur3's finaliser: every input bit affects every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a flow used to pick its slot in the service's selection table.
///
/// Deterministic and independent of CPU, so a flow whose table entry was evicted is
/// re-selected to the same backend while the selection table is unchanged.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    let mut i = 0;
    while i < 4 {
        h = fmix32(h ^ key.src.0[i]).wrapping_add(key.dst.0[i]);
        i += 1;
    }
    let ports = ((key.src_port_be as u32) << 16) | key.dst_port_be as u32;
    fmix32(h ^ ports ^ ((key.proto as u32) << 8))
}

/// Slot in a selection table of `len` entries for the `attempt`-th try (0 = first pick).
/// Later attempts walk forward, which is cheap and bounded; tables interleave backends.
#[inline(always)]
pub const fn selection_slot(hash: u32, attempt: u32, len: u32) -> u32 {
    (hash % len + attempt) % len
}

/// Word index and bit of `addr` in the `role` bitmap of the address prefilter
/// (`maps::ADDR_FILTER`, which holds the VIP bitmap, then the backend bitmap).
#[inline(always)]
pub const fn addr_filter_slot(addr: &AddrBe, role: AddrRole) -> (u32, u32) {
    let a = addr.0;
    let h = fmix32(a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24));
    let bit = h & (ADDR_FILTER_WORDS * 64 - 1);
    (role as u32 * ADDR_FILTER_WORDS + bit / 64, bit % 64)
}
