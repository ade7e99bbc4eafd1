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
/// window of slots named by its `Service` value.
pub const SELECTION: &str = "lb_sel_v1";
/// Backends by id (`u32` index; id 0 is reserved as "none" so an empty slot never routes).
pub const BACKENDS: &str = "lb_be_v1";
/// Connection table (LRU): `FlowKey` → `ConnEntry`, both directions of each connection.
pub const CONNECTIONS: &str = "lb_ct_v1";
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
/// Name of the read-only global holding `DataplaneConfig`.
pub const CONFIG_GLOBAL: &str = "LB_CONFIG";
/// Service id of each backend id (`u32` index → `u32`), written by the agent and never
/// read by the programs: which frontend a backend belongs to, also while it is draining or
/// ejected and so in no selection table, for `lb` commands and a later agent.
pub const BACKEND_SERVICES: &str = "lb_be_svc_v1";
/// Name under which the agent pins the read-only global's map (`.rodata`, which holds
/// exactly one `DataplaneConfig`), so `lb` commands know the idle timeouts.
pub const CONFIG_PIN: &str = "lb_config_v1";

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
];

/// Default sizes; the agent overrides them at load from its configuration.
pub const DEFAULT_MAX_SERVICES: u32 = 256;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Each service has two table halves (active and next) of up to this many slots.
/// 8192 fits a Maglev table (prime ≥ 64 per backend) for up to 127 backends.
pub const DEFAULT_TABLE_SLOTS: u32 = 8192;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 262_144;

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
}
assert_size!(ConnEntry, 56);

/// Name of the connection table of the previous layout (`ConnEntryV0`). An agent that
/// finds it pinned copies its entries into `lb_ct_v1`, converted, and removes it.
pub const CONNECTIONS_V0: &str = "lb_ct_v0";

/// The connection table's value before the handshake fields (`syn_*`, retries, failover
/// position) were added: 40 bytes. Kept to migrate a pinned table of that layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntryV0 {
    pub nat_addr: AddrBe,
    pub nat_port_be: u16,
    pub direction: u8,
    pub state: u8,
    pub backend_id: u32,
    pub service_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}
assert_size!(ConnEntryV0, 40);

impl From<ConnEntryV0> for ConnEntry {
    /// The same connection in today's layout: no handshake in progress to re-send, so the
    /// `syn_*` fields stay empty and the first backend is the current one.
    fn from(v0: ConnEntryV0) -> Self {
        Self {
            nat_addr: v0.nat_addr,
            nat_port_be: v0.nat_port_be,
            direction: v0.direction,
            state: v0.state,
            backend_id: v0.backend_id,
            service_id: v0.service_id,
            first_backend_id: v0.backend_id,
            last_seen_ns: v0.last_seen_ns,
            ..Self::default()
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
