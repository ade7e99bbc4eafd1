//! Every map of the data plane. Names and layouts are shared with userspace through
//! `lb_common::maps`; sizes here are defaults the agent overrides at load.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    counters::COUNTER_SLOTS,
    maps::{
        Affinity, AffinityKey, ConnEntryV1, NextHop, ADDR_FILTER_WORDS, DEFAULT_MAX_AFFINITY,
        DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_SERVICES, DEFAULT_TABLE_SLOTS,
        MAX_XDP_TARGETS, NEXTHOP_SLOTS, SIGNALS_BYTES,
    },
    Backend, ConnEntry, DataplaneConfig, FlowKey, Service, ServiceKey, TrafficStats,
};

/// Frontends (VIP, port, protocol) → service, plus one marker entry per VIP address.
#[map(name = "lb_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES * 2, 0);

/// Selection tables of all services: backend ids, each service's table in the window its
/// `Service` value names (`offset + hash % len`). Slot `g` is lane `g % 2` of element
/// `g / 2`: array elements take 8 bytes, so packing two `u32`s makes the memory a dense
/// `u32` array. Memory-mappable, so the agent writes a table with plain stores, not a
/// syscall per slot. Sized by the agent at load from its configured maximums.
#[map(name = "lb_sel_v2")]
pub static SELECTION: Array<[u32; 2]> =
    Array::with_max_entries(DEFAULT_MAX_SERVICES * DEFAULT_TABLE_SLOTS, BPF_F_MMAPABLE);

/// The backend id in selection slot `slot`.
#[inline(always)]
pub fn selection_slot_id(slot: u32) -> Option<u32> {
    SELECTION
        .get(slot / 2)
        .map(|pair| pair[(slot % 2) as usize])
}

/// Backend id → address, port and state. Id 0 is never written: it means "none".
#[map(name = "lb_be_v1")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Backend id → service id, written by the agent: which frontend a draining or ejected
/// backend (in no table) belongs to, for `lb` commands; here, whether a backend a client's
/// session affinity names is still one of the service's.
#[map(name = "lb_be_svc_v1")]
pub static BACKEND_SERVICES: Array<u32> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Connection table, both directions of each balanced connection (LRU: when full, the
/// least recently used entries make room).
#[map(name = "lb_ct_v2")]
pub static CONNECTIONS: LruHashMap<FlowKey, ConnEntry> =
    LruHashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// While the agent migrates connections (`lb_common::maps::MIGRATION`): a replaced
/// connection table of today's layout. Otherwise a one-entry placeholder, never read.
#[map(name = "lb_ct_prev")]
pub static CONNECTIONS_PREV: HashMap<FlowKey, ConnEntry> = HashMap::with_max_entries(1, 0);

/// While the agent migrates connections: the pinned table of the previous layout.
/// Otherwise a one-entry placeholder, never read.
#[map(name = "lb_ct_v1")]
pub static CONNECTIONS_V1: HashMap<FlowKey, ConnEntryV1> = HashMap::with_max_entries(1, 0);

/// `MIGRATING_*` flags, written by the agent: which older table to consult.
#[map(name = "lb_migration")]
pub static MIGRATION: Array<u32> = Array::with_max_entries(1, 0);

/// Bitmaps of VIP and of backend addresses: let unrelated packets skip every hash lookup.
#[map(name = "lb_addr_v1")]
pub static ADDR_FILTER: Array<u64> = Array::with_max_entries(2 * ADDR_FILTER_WORDS, 0);

/// Failures the agent must see at once (`lb_common::Signal`).
#[map(name = "lb_sig_v1")]
pub static SIGNALS: RingBuf = RingBuf::with_byte_size(SIGNALS_BYTES, 0);

/// Verdict, drop-reason and event counters, indexed by `lb_common::Counter`.
#[map(name = "lb_cnt_v1")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Traffic per service id.
#[map(name = "lb_svc_st_v1")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Traffic per backend id.
#[map(name = "lb_be_st_v1")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Session affinity: (service id, client address) → backend and last use (LRU: when full,
/// the least recently used clients are forgotten and balanced afresh).
#[map(name = "lb_aff_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);

/// Session-affinity timeout per service id, in seconds (0: none).
#[map(name = "lb_svc_aff_v1")]
pub static AFFINITY_TIMEOUTS: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Load-time settings; the agent overrides this read-only global when it loads the object.
#[no_mangle]
static LB_CONFIG: DataplaneConfig = DataplaneConfig::DEFAULT;

/// Reads one setting. Volatile, so the compiler cannot fold in the default value.
#[inline(always)]
pub fn config() -> &'static DataplaneConfig {
    // SAFETY: LB_CONFIG is a valid static; the read is volatile only to defeat folding.
    unsafe { &*core::ptr::read_volatile(&&raw const LB_CONFIG) }
}

/// The interfaces XDP may redirect a rewritten packet to (ifindex → ifindex), filled by
/// the agent with the node's interfaces that can take XDP frames. A packet routed
/// anywhere else goes through the stack (`event_stack_xdp_target`).
#[map(name = "lb_xdp_tx")]
pub static XDP_TARGETS: DevMapHash = DevMapHash::with_max_entries(MAX_XDP_TARGETS, 0);

/// Where recent destinations were routed (per CPU, direct-mapped; see `route`).
#[map(name = "lb_nh_cache")]
pub static NEXTHOP_CACHE: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(NEXTHOP_SLOTS, 0);

/// The routing generation the cached next hops must carry; 0: the cache is off.
#[map(name = "lb_route_gen")]
pub static ROUTING_GENERATION: Array<u32> = Array::with_max_entries(1, 0);
