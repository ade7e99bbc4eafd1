//! Map names, keys and values of the data plane.
//!
//! Names carry a layout version (`_v1`): an agent never reads a pinned map written with a
//! different layout. The kernel keeps 15 characters of a map name.

use crate::{assert_size, flow::AddrBe};

/// Service frontends: `ServiceKey` → `Service`. Also holds one marker entry per VIP address
/// (port 0, protocol 0) so packets that cannot be parsed to a port are still recognised as
/// addressed to a VIP.
pub const SERVICES: &str = "lb_svc_v1";
/// Selection tables of all services in one array of backend ids (two per `[u32; 2]`
/// element, memory-mappable); a service uses the `[table_offset, table_offset + table_len)`
/// window of slots named by its `Service` value, its failover list the `fallback_len`
/// slots after it. Windows are sized to each service's table and placed wherever the
/// agent finds room; only the service entries say where they are, and the array is sized
/// from the configured maximums (`max_backends`, `max_services`, `table_slots`).
pub const SELECTION: &str = "lb_sel_v2";
/// The selection array of the fixed layout (two windows of `table_slots` per service id,
/// at `(id × 2 + half) × table_slots`). Same elements; an agent that finds it pinned
/// renames the pin to `SELECTION` and adopts it, tables and all, since its service entries
/// say where each table is. An older agent never finds `SELECTION`, so it never writes by
/// the fixed layout over windows placed elsewhere.
pub const SELECTION_V1: &str = "lb_sel_v1";
/// Backends by id (`u32` index; id 0 is reserved as "none" so an empty slot never routes).
pub const BACKENDS: &str = "lb_be_v1";
/// Connection table (LRU): `FlowKey` → `ConnEntry`, both directions of each connection.
pub const CONNECTIONS: &str = "lb_ct_v2";
/// The connection table of the previous layout (`ConnEntryV1`, 56 bytes). An agent that
/// finds it pinned migrates its entries into `CONNECTIONS` and removes it (see
/// `MIGRATION`).
pub const CONNECTIONS_V1: &str = "lb_ct_v1";
/// Name inside the programs of a replaced connection table of today's layout (another
/// size): the programs' link to it while its entries are migrated. Never pinned.
pub const CONNECTIONS_PREV: &str = "lb_ct_prev";
/// `u32` flags (`MIGRATING_*`) in a one-element array, set by the agent while the
/// entries of an older connection table are carried over. While set, a packet that misses
/// `CONNECTIONS` is looked up in the older table (and its connection copied over), and a
/// new connection is written to both, so the programs being replaced, still attached to
/// other hooks for a moment, see it too. Never pinned: it belongs to one load.
pub const MIGRATION: &str = "lb_migration";
/// `MIGRATION` flag: `CONNECTIONS_PREV` holds a replaced table of today's layout.
pub const MIGRATING_PREV: u32 = 1;
/// `MIGRATION` flag: `CONNECTIONS_V1` holds the pinned table of the previous layout.
pub const MIGRATING_V1: u32 = 2;
/// Address prefilter: two bitmaps of `u64` words, one of VIP addresses and one of backend
/// addresses (`flow::addr_filter_slot`). Packets of the original direction go to a VIP and
/// replies come from a backend; a packet with neither cannot be lb's and passes without a
/// hash lookup, including traffic lb already translated when it crosses another hook.
/// Bits are only ever set while the agent runs: a stale bit costs one lookup, a missing
/// one would break a connection.
pub const ADDR_FILTER: &str = "lb_addr_v1";
/// Words of each of the two bitmaps (4096 × 64 = 262,144 bits).
pub const ADDR_FILTER_WORDS: u32 = 4096;

/// Which bitmap of the address prefilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrRole {
    Vip = 0,
    Backend = 1,
}
/// Ring buffer of `Signal`s: failures the agent's outlier detection must see at once.
pub const SIGNALS: &str = "lb_sig_v1";
/// Bytes of the signal ring buffer (a power of two, a multiple of the page size).
pub const SIGNALS_BYTES: u32 = 256 * 1024;
/// Per-CPU scratch buffer of the programs (a SYN's options, a re-sent SYN's headers).
pub const SCRATCH: &str = "lb_scratch_v1";
/// Per-CPU `u64` counters indexed by `Counter`.
pub const COUNTERS: &str = "lb_cnt_v1";
/// Per-CPU `TrafficStats` indexed by service id.
pub const SERVICE_STATS: &str = "lb_svc_st_v1";
/// Per-CPU `TrafficStats` indexed by backend id.
pub const BACKEND_STATS: &str = "lb_be_st_v1";
/// SOCKMAP with one slot: the TLS forwarder's listening socket, which the `sk_lookup`
/// program gives the connections of `SERVICE_TLS` frontends. Not pinned: a socket lives
/// as long as its agent, and the next agent puts its own there.
pub const TLS_LISTENER: &str = "lb_tls_lsn_v1";
/// Name of the read-only global holding `DataplaneConfig`.
pub const CONFIG_GLOBAL: &str = "LB_CONFIG";
/// Service id of each backend id (`u32` index → `u32`), written by the agent and never
/// read by the programs: which frontend a backend belongs to, also while it is draining or
/// ejected and so in no selection table, for `lb` commands and a later agent.
pub const BACKEND_SERVICES: &str = "lb_be_svc_v1";
/// Name under which the agent pins the read-only global's map (`.rodata`, which holds
/// exactly one `DataplaneConfig`), so `lb` commands know the idle timeouts.
pub const CONFIG_PIN: &str = "lb_config_v1";

/// Session affinity (Kubernetes `sessionAffinity: ClientIP`), LRU: `AffinityKey` (service
/// id, client address) → `Affinity` (backend id, last use). A client's new connections to
/// a service with affinity go to the backend remembered here while it is usable and the
/// client was not silent for the service's timeout (Cilium's `cilium_lb4_affinity`).
pub const AFFINITY: &str = "lb_aff_v1";
/// Session-affinity timeout of each service id in seconds (`u32` index → `u32`; 0: no
/// affinity). Read only for services flagged `SERVICE_AFFINITY`.
pub const AFFINITY_TIMEOUTS: &str = "lb_svc_aff_v1";
/// XDP_REDIRECT targets (a `DEVMAP_HASH`, ifindex → ifindex): the node's interfaces that
/// can take XDP frames, kept by the agent. Not pinned: each agent fills its own.
pub const XDP_TARGETS: &str = "lb_xdp_tx";
/// Room in `XDP_TARGETS`: a node's interfaces, pods' veths included.
pub const MAX_XDP_TARGETS: u32 = 4096;
/// The next-hop cache (a per-CPU array of `NextHop`): where recent destinations were
/// routed, so most packets skip the FIB lookup. Not pinned.
pub const NEXTHOP_CACHE: &str = "lb_nh_cache";
/// Slots of `NEXTHOP_CACHE` per CPU (a power of two; direct-mapped by destination).
pub const NEXTHOP_SLOTS: u32 = 1024;
/// The routing generation (an array of one `u32`): bumped by the agent at every change of
/// the node's links, routes, neighbours or rules, which makes every cached next hop stale;
/// 0 turns the cache off (no agent following the changes, or routing the cache cannot
/// hold: policy rules, multipath routes). Not pinned.
pub const ROUTING_GENERATION: &str = "lb_route_gen";

/// A cached FIB result: the route of `dst` for packets arriving on `ingress_ifindex`,
/// valid while `generation` is the current routing generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// IPv4 destination, as in the packet.
    pub dst: u32,
    pub ingress_ifindex: u32,
    /// 0: empty.
    pub generation: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// The route's MTU: a longer packet takes the full lookup (which fragments-needed or
    /// GSO decide).
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}
assert_size!(NextHop, 32);

/// The slot of `NEXTHOP_CACHE` for (`dst`, `ingress_ifindex`).
#[inline(always)]
pub const fn nexthop_slot(dst: u32, ingress_ifindex: u32) -> u32 {
    (dst ^ ingress_ifindex.wrapping_mul(0x9E37_79B1)).wrapping_mul(0x85EB_CA6B)
        >> (32 - NEXTHOP_SLOTS.trailing_zeros())
}

/// Every map the agent pins, by the name of its file in the pin directory.
pub const PINNED: &[&str] = &[
    SERVICES,
    SELECTION,
    BACKENDS,
    BACKEND_SERVICES,
    CONNECTIONS,
    ADDR_FILTER,
    SIGNALS,
    SCRATCH,
    COUNTERS,
    SERVICE_STATS,
    BACKEND_STATS,
    CONFIG_PIN,
    AFFINITY,
    AFFINITY_TIMEOUTS,
];

/// Default sizes; the agent overrides them at load from its configuration.
pub const DEFAULT_MAX_SERVICES: u32 = 256;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// The largest window of one service (its table and failover list). 8192 fits a Maglev
/// table (prime ≥ 64 per backend) for up to 127 backends; a service with more gets this
/// many, each backend fewer slots.
pub const DEFAULT_TABLE_SLOTS: u32 = 8192;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 262_144;
/// Session-affinity entries: one per client and service with affinity.
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Longest session-affinity timeout (Kubernetes' `timeoutSeconds` maximum, one day).
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// How many table slots a new connection may try when the first pick is not active.
pub const MAX_RESELECT: u32 = 8;

/// Longest failover list of a service: the backends a refused or timed-out connection
/// attempt may be moved to, in priority order. It follows the selection table in the
/// same window of `SELECTION`, so both are published in one step.
pub const FALLBACK_LEN: u32 = 16;

/// Key of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: AddrBe,
    /// 0 together with `proto` 0 marks the VIP-address entry.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
assert_size!(ServiceKey, 20);

impl ServiceKey {
    /// The marker key that says "this address is a VIP", whatever the port.
    #[inline(always)]
    pub const fn address_marker(addr: AddrBe, family: u8) -> Self {
        Self {
            addr,
            port_be: 0,
            proto: 0,
            family,
        }
    }
}

/// Value of the services map. Replaced as a whole, so the kernel sees either the old or
/// the new table window, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service stats map; 0 for address markers.
    pub id: u32,
    /// First slot of the active table in `SELECTION`.
    pub table_offset: u32,
    /// Number of slots in the active table; 0 means no backend (new connections dropped).
    pub table_len: u32,
    /// Length of the failover list that follows the table (at most `FALLBACK_LEN`).
    pub fallback_len: u16,
    /// `SERVICE_*` flags.
    pub flags: u16,
}
assert_size!(Service, 16);

/// The service speaks cleartext HTTP/1.x: the status of responses is parsed and counted.
pub const SERVICE_HTTP: u16 = 1;
/// The service has session affinity: new connections look up `AFFINITY`, with the timeout
/// in `AFFINITY_TIMEOUTS`. Services without it pay only this flag's test.
pub const SERVICE_AFFINITY: u16 = 2;
/// The service originates TLS to its backends (a DestinationRule's `tls.mode`): its VIP is
/// a local address, TC and XDP pass its packets to the stack untouched, and the
/// `sk_lookup` program hands its connections to the agent's TLS forwarder.
pub const SERVICE_TLS: u16 = 4;

/// Key of the session-affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client's (source) address.
    pub client: AddrBe,
    pub service_id: u32,
}
assert_size!(AffinityKey, 20);

/// Value of the session-affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    /// The backend the client's new connections go to.
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the client's last new connection that used it; the
    /// entry stands until `last_used_ns + timeout`.
    pub last_used_ns: u64,
}
assert_size!(Affinity, 16);

/// Lifecycle state of a backend. Only `Active` backends receive new connections;
/// established connections stay on their backend in every state.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Unused id.
    Unset = 0,
    Active = 1,
    /// Being removed: keeps its connections, takes no new ones.
    Draining = 2,
    /// Removed by outlier detection or an operator: takes no new connections.
    Ejected = 3,
}

impl BackendState {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Active,
            2 => Self::Draining,
            3 => Self::Ejected,
            _ => Self::Unset,
        }
    }
}

/// Value of the backends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: AddrBe,
    pub port_be: u16,
    pub family: u8,
    /// A `BackendState` as `u8`.
    pub state: u8,
}
assert_size!(Backend, 20);

/// Which way a tracked packet travels.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnDirection {
    /// Client → VIP: destination is rewritten to the backend.
    Original = 1,
    /// Backend → client: source is rewritten back to the VIP.
    Reply = 2,
}

/// State of a tracked connection (per direction entry); selects its idle timeout.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// TCP: SYN seen, handshake not complete.
    TcpSyn = 1,
    TcpEstablished = 2,
    /// TCP: FIN or RST seen.
    TcpClosing = 3,
    Udp = 4,
}

/// Value of the connection table.
///
/// The `syn_*` fields are kept in the original-direction entry while the handshake is in
/// progress: they are what lb needs to send the client's SYN again, to another backend,
/// when the first one refuses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    /// Address written into the packet: the backend (original direction) or the VIP (reply).
    pub nat_addr: AddrBe,
    pub nat_port_be: u16,
    /// A `ConnDirection` as `u8`.
    pub direction: u8,
    /// A `ConnState` as `u8`.
    pub state: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// The backend the selection table first gave (a re-steer never goes back to it).
    pub first_backend_id: u32,
    /// `bpf_ktime_get_coarse_ns` of the last refresh (refreshed at most once a second),
    /// and of the SYN sent to the current backend while in `TcpSyn`.
    pub last_seen_ns: u64,
    /// Original direction: the client's initial sequence number (host order). Reply
    /// direction of an HTTP service, with `CONN_RESPONSE_SEQ`: the sequence number of the
    /// last response start whose status was counted, so a retransmitted one is not
    /// counted twice.
    pub syn_isn: u32,
    /// The client's timestamp value (host order), when `SYN_OPT_TIMESTAMPS`.
    pub syn_tsval: u32,
    /// The SYN's window (host order).
    pub syn_window: u16,
    /// MSS option (host order); 0 when the SYN had none.
    pub syn_mss: u16,
    /// Window-scale shift, when `SYN_OPT_WSCALE`.
    pub syn_wscale: u8,
    /// `SYN_OPT_*` and `CONN_*` flags.
    pub flags: u8,
    /// Re-steers done for this connection attempt.
    pub retries: u8,
    /// Next position to try in the service's failover list.
    pub fallback_cursor: u8,
    /// `bpf_ktime_get_coarse_ns` when lb first saw the connection (0: unknown, carried
    /// over from a table that did not record it). `lb conntrack` shows the age.
    pub created_ns: u64,
}
assert_size!(ConnEntry, 64);

/// The connection table's value before `created_ns` was added (56 bytes, `lb_ct_v1`).
/// Kept to migrate a pinned table of that layout, in userspace and in the programs. Its
/// fields are exactly the first ones of `ConnEntry`, at the same offsets: the programs
/// convert by copying bytes (checked below and in the tests).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntryV1 {
    pub nat_addr: AddrBe,
    pub nat_port_be: u16,
    pub direction: u8,
    pub state: u8,
    pub backend_id: u32,
    pub service_id: u32,
    pub first_backend_id: u32,
    pub last_seen_ns: u64,
    pub syn_isn: u32,
    pub syn_tsval: u32,
    pub syn_window: u16,
    pub syn_mss: u16,
    pub syn_wscale: u8,
    pub flags: u8,
    pub retries: u8,
    pub fallback_cursor: u8,
}
assert_size!(ConnEntryV1, 56);
const _: () = assert!(core::mem::offset_of!(ConnEntry, created_ns) == 56);
const _: () = assert!(core::mem::offset_of!(ConnEntryV1, fallback_cursor) == 55);
const _: () = assert!(core::mem::offset_of!(ConnEntry, fallback_cursor) == 55);

impl ConnEntry {
    /// The same connection in today's layout; its creation time is unknown (0).
    pub fn from_v1(v1: &ConnEntryV1) -> Self {
        Self {
            nat_addr: v1.nat_addr,
            nat_port_be: v1.nat_port_be,
            direction: v1.direction,
            state: v1.state,
            backend_id: v1.backend_id,
            service_id: v1.service_id,
            first_backend_id: v1.first_backend_id,
            last_seen_ns: v1.last_seen_ns,
            syn_isn: v1.syn_isn,
            syn_tsval: v1.syn_tsval,
            syn_window: v1.syn_window,
            syn_mss: v1.syn_mss,
            syn_wscale: v1.syn_wscale,
            flags: v1.flags,
            retries: v1.retries,
            fallback_cursor: v1.fallback_cursor,
            created_ns: 0,
        }
    }

    /// This connection in the previous layout (its creation time dropped).
    pub fn to_v1(&self) -> ConnEntryV1 {
        ConnEntryV1 {
            nat_addr: self.nat_addr,
            nat_port_be: self.nat_port_be,
            direction: self.direction,
            state: self.state,
            backend_id: self.backend_id,
            service_id: self.service_id,
            first_backend_id: self.first_backend_id,
            last_seen_ns: self.last_seen_ns,
            syn_isn: self.syn_isn,
            syn_tsval: self.syn_tsval,
            syn_window: self.syn_window,
            syn_mss: self.syn_mss,
            syn_wscale: self.syn_wscale,
            flags: self.flags,
            retries: self.retries,
            fallback_cursor: self.fallback_cursor,
        }
    }
}

/// The SYN offered selective acknowledgements.
pub const SYN_OPT_SACK: u8 = 1;
/// The SYN carried a timestamp option.
pub const SYN_OPT_TIMESTAMPS: u8 = 2;
/// The SYN carried a window-scale option.
pub const SYN_OPT_WSCALE: u8 = 4;
/// The SYN asked for ECN (ECE and CWR set).
pub const SYN_ECN: u8 = 8;
/// The connection belongs to an HTTP service: parse the status of responses.
pub const CONN_HTTP: u8 = 16;
/// A refusal was held back and the entry already points to the next backend: the
/// client's retransmitted SYN goes there and is not a timeout.
pub const CONN_AWAIT_RETRANSMIT: u8 = 32;
/// Reply direction: `syn_isn` holds the sequence number of the last response counted.
pub const CONN_RESPONSE_SEQ: u8 = 64;
/// Reply direction: the backend answered the SYN with a SYN-ACK, so its later ACKs belong
/// to this connection (not to an older one on the same ports).
pub const CONN_SYNACK_SEEN: u8 = 128;

/// What the data plane saw go wrong with a backend.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalKind {
    /// The backend answered a connection's SYN with RST: connect refused.
    ConnectRefused = 1,
    /// The backend reset an established connection.
    EstablishedReset = 2,
    /// The client sent its SYN again: the backend did not answer in time.
    ConnectTimeout = 3,
    /// The backend answered with an HTTP 5xx status (in `Signal::status`).
    HttpError = 4,
    /// ICMP destination unreachable about a connection's SYN.
    Unreachable = 5,
}

impl SignalKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::ConnectRefused),
            2 => Some(Self::EstablishedReset),
            3 => Some(Self::ConnectTimeout),
            4 => Some(Self::HttpError),
            5 => Some(Self::Unreachable),
            _ => None,
        }
    }
}

/// One entry of the signal ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signal {
    /// A `SignalKind` as `u32`.
    pub kind: u32,
    pub backend_id: u32,
    pub service_id: u32,
    /// HTTP status for `HttpError`, 0 otherwise.
    pub status: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the kernel saw the failure, so the agent
    /// can measure failure-to-failover time.
    pub ktime_ns: u64,
}
assert_size!(Signal, 24);

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> &[u8] {
        // SAFETY: plain `repr(C)` values of integers, read as bytes.
        unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    /// The programs convert between the layouts by copying bytes: a `ConnEntryV1` must be
    /// the first bytes of the same `ConnEntry`, field for field.
    #[test]
    fn previous_layout_is_the_prefix_of_todays() {
        let entry = ConnEntry {
            nat_addr: AddrBe::v4([10, 1, 2, 3]),
            nat_port_be: 0x1234,
            direction: 2,
            state: 3,
            backend_id: 0x0102_0304,
            service_id: 0x0506_0708,
            first_backend_id: 0x090a_0b0c,
            last_seen_ns: 0x1122_3344_5566_7788,
            syn_isn: 0x99aa_bbcc,
            syn_tsval: 0xddee_ff01,
            syn_window: 0x2345,
            syn_mss: 0x6789,
            syn_wscale: 7,
            flags: 0xa5,
            retries: 2,
            fallback_cursor: 9,
            created_ns: 0x0123_4567_89ab_cdef,
        };
        let v1 = entry.to_v1();
        assert_eq!(bytes(&v1), &bytes(&entry)[..size_of::<ConnEntryV1>()]);
        let back = ConnEntry::from_v1(&v1);
        assert_eq!(
            back,
            ConnEntry {
                created_ns: 0,
                ..entry
            }
        );
    }
}
