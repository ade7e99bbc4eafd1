//! The agent's handle on the kernel side: loads lb's eBPF object with the configured map
//! sizes and timeouts, attaches its programs, writes services and backends, and reads
//! counters and connections back.

mod batch;
mod links;
pub mod memory;
mod mmap;
pub mod pin;
pub mod reader;
pub mod routing;
pub mod selection;
pub mod slots;
pub mod sync;
mod tls_steer;
pub mod xdp_targets;

pub use links::AttachedInterface;

use std::{
    collections::HashMap as StdHashMap,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    config::MAX_CONNECT_RETRIES,
    counters::COUNTER_SLOTS,
    family,
    flow::addr_filter_slot,
    maps::{
        self as names, AddrRole, Affinity, AffinityKey, ConnEntryV1, FALLBACK_LEN,
        MAX_AFFINITY_TIMEOUT_SECS, SERVICE_AFFINITY,
    },
    AddrBe, Backend, BackendState, ConnEntry, Counter, DataplaneConfig, FlowKey, Service,
    ServiceKey, TrafficStats,
};

/// The eBPF object built from `lb-ebpf` by this crate's build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

/// Trivial programs (`baseline_xdp`, `baseline_tc`) whose cost benchmarks subtract.
pub static BASELINE_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_BASELINE_OBJECT"));

/// Program names in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_INGRESS_PROGRAM: &str = "lb_tc_ingress";
pub const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";

/// Map sizes and timeouts fixed when the programs are loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataplaneOptions {
    /// Highest service id + 1.
    pub max_services: u32,
    /// Highest backend id + 1 (id 0 is reserved).
    pub max_backends: u32,
    /// Slots of one selection table (each service has two, active and next).
    pub table_slots: u32,
    /// Entries of the connection table; a connection takes two.
    pub max_connections: u32,
    /// Entries of the session-affinity map: one per client and service with affinity.
    pub max_affinity: u32,
    pub timeouts: DataplaneConfig,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            max_services: names::DEFAULT_MAX_SERVICES,
            max_backends: names::DEFAULT_MAX_BACKENDS,
            table_slots: names::DEFAULT_TABLE_SLOTS,
            max_connections: names::DEFAULT_MAX_CONNECTIONS,
            max_affinity: names::DEFAULT_MAX_AFFINITY,
            timeouts: DataplaneConfig::DEFAULT,
        }
    }
}

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// XDP on ingress (driver mode where the NIC has it, else the kernel's generic mode).
    Xdp,
    /// TC (clsact/tcx) on ingress and egress.
    Tc,
}

impl std::str::FromStr for AttachMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "xdp" => Ok(Self::Xdp),
            "tc" => Ok(Self::Tc),
            other => bail!("unknown attach mode {other:?}: expected \"xdp\" or \"tc\""),
        }
    }
}

/// L4 protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::proto::TCP,
            Self::Udp => lb_common::proto::UDP,
        }
    }
}

/// A service frontend: what clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    /// The frontend a services-map key stands for; `None` for a VIP address marker or an
    /// unknown protocol.
    pub fn from_key(key: &ServiceKey) -> Option<Self> {
        let protocol = match key.proto {
            lb_common::proto::TCP => Protocol::Tcp,
            lb_common::proto::UDP => Protocol::Udp,
            _ => return None,
        };
        (key.family == family::V4).then(|| Self {
            vip: Ipv4Addr::from(key.addr.v4_octets()),
            port: u16::from_be(key.port_be),
            protocol,
        })
    }

    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: AddrBe::v4(self.vip.octets()),
            port_be: self.port.to_be(),
            proto: self.protocol.number(),
            family: family::V4,
        }
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        write!(f, "{}:{}/{p}", self.vip, self.port)
    }
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    options: DataplaneOptions,
    services: HashMap<MapData, ServiceKey, Service>,
    /// Shared with the TLS forwarder's reader (`reader`), which only reads it.
    selection: std::sync::Arc<mmap::MappedU32Array>,
    backends: Array<MapData, Backend>,
    /// Service id of each backend id (for `lb` commands; the programs never read it).
    backend_services: Array<MapData, u32>,
    connections: HashMap<MapData, FlowKey, ConnEntry>,
    addr_filter: Array<MapData, u64>,
    /// What `addr_filter` holds, word by word (read once at load): a bit already set
    /// costs no call.
    addr_words: Vec<u64>,
    counters: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    /// The signal ring buffer, until someone takes it to consume it.
    signals: Option<aya::maps::RingBuf<MapData>>,
    /// Session affinity: (service id, client) → backend, last use.
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    /// Session-affinity timeout (seconds) of each service id.
    affinity_timeouts: Array<MapData, u32>,
    /// What `affinity_timeouts` holds, per service id with a timeout.
    affinity_secs: StdHashMap<u32, u32>,
    /// Each published service's window in the selection array (its table, then its
    /// failover list): service id → (first slot, slots).
    windows: StdHashMap<u32, (u32, u32)>,
    /// Which ranges of the selection array are free, in use or retired.
    ranges: slots::SlotRanges,
    /// Slots of the selection array (its elements × 2).
    selection_slots: u32,
    /// Service ids adopted with their tables and not published since: a first publish
    /// whose table is what the window already holds writes nothing.
    unchecked: std::collections::HashSet<u32>,
    /// How many published frontends share each VIP address (for the address markers).
    vip_users: StdHashMap<Ipv4Addr, usize>,
    /// Where everything is pinned, when it is.
    pin_dir: Option<PathBuf>,
    /// Maps reused from the pin directory with their contents.
    adopted: Vec<&'static str>,
    /// Connection tables whose entries are copied into ours (replaced, or old layout).
    migrations: Vec<Migration>,
    /// The programs' `MIGRATING_*` flags (`lb_common::maps::MIGRATION`).
    migration_flags: Array<MapData, u32>,
    /// The link pins this data plane attached or updated.
    links: Vec<PathBuf>,
    /// Interfaces attached by [`Dataplane::attach_interface`], by name.
    attached: std::collections::BTreeMap<String, AttachedInterface>,
    /// Without a pin directory: the links, by interface (dropping one detaches it).
    owned_links: Vec<(String, links::OwnedLink)>,
    /// `lb_sk_lookup` attached to the agent's network namespace, once a TLS forwarder
    /// listens (`tls_steer`).
    tls_steering: Option<aya::programs::sk_lookup::SkLookupLink>,
    /// Where XDP may redirect (`xdp_targets`), and what it holds.
    xdp_targets: aya::maps::DevMapHash<MapData>,
    xdp_target_set: std::collections::BTreeSet<u32>,
    /// The routing generation cached next hops must carry (`routing`); 0: cache off.
    routing_generation: Array<MapData, u32>,
    routing_generation_now: u32,
}

/// The maps indexed by service or backend id: adopted together or not at all.
const ID_GROUP: &[&str] = &[
    names::SERVICES,
    names::SELECTION,
    names::BACKENDS,
    names::BACKEND_SERVICES,
    names::SERVICE_STATS,
    names::BACKEND_STATS,
];

/// Maps keyed by service or backend ids that are adopted only with `ID_GROUP` (their
/// contents mean nothing under other ids), but may be missing: an agent of a release
/// without them leaves none, and they start empty.
const ID_FOLLOWERS: &[&str] = &[names::AFFINITY, names::AFFINITY_TIMEOUTS];

/// `BPF_NOEXIST`: insert only when the key is absent.
const BPF_NOEXIST: u64 = 1;

/// A connection table whose entries are carried over into the current one. The programs
/// are loaded linked to it (`lb_ct_prev` or `lb_ct_v1`), so they read it on a miss and
/// write new connections to it while the migration runs (see lb-ebpf's `migration`).
struct Migration {
    source: OldConnections,
    /// The pin removed once migrated (a previous-layout table's).
    pin: Option<PathBuf>,
}

enum OldConnections {
    /// Today's layout, another size (or type).
    Current(HashMap<MapData, FlowKey, ConnEntry>),
    /// `lb_ct_v1`: `ConnEntryV1` values.
    V1(HashMap<MapData, FlowKey, ConnEntryV1>),
}

/// Whether the connection table pinned at `path` has `FlowKey` keys and values of
/// `value_size` bytes: only then may the programs be linked to it (they read it with that
/// layout). The reason otherwise.
fn older_table_fits(path: &Path, value_size: usize) -> Result<(), String> {
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| format!("unreadable ({e})"))?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    let wanted = (std::mem::size_of::<FlowKey>(), value_size);
    if found == wanted {
        Ok(())
    } else {
        Err(format!(
            "(key, value) sizes {found:?}, a connection table of this layout has {wanted:?}"
        ))
    }
}

/// All entries of a hash map, each key once, with a bounded walk (a key removed while it
/// is walked makes the kernel start over).
fn iterate_bounded<V: aya::Pod>(map: &HashMap<MapData, FlowKey, V>) -> Result<Vec<(FlowKey, V)>> {
    let mut out = StdHashMap::new();
    let limit = 4 * (1 << 20);
    for (steps, key) in map.keys().enumerate() {
        if steps > limit {
            break;
        }
        let Ok(key) = key else { break };
        if let Ok(v) = map.get(&key, 0) {
            out.insert(key, v);
        }
    }
    Ok(out.into_iter().collect())
}

/// The type, layout and size of every map the agent pins (the read-only global aside).
fn map_specs(o: &DataplaneOptions, selection_elements: u32) -> Vec<pin::MapSpec> {
    use aya::maps::MapType;
    use std::mem::size_of;
    let spec = |name, map_type, key: usize, value: usize, max_entries, flags| pin::MapSpec {
        name,
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
        flags,
    };
    let stats = size_of::<TrafficStats>();
    vec![
        spec(
            names::SERVICES,
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            o.max_services * 2,
            0,
        ),
        spec(
            names::SELECTION,
            MapType::Array,
            4,
            8,
            selection_elements,
            BPF_F_MMAPABLE,
        ),
        spec(
            names::BACKENDS,
            MapType::Array,
            4,
            size_of::<Backend>(),
            o.max_backends,
            0,
        ),
        spec(
            names::BACKEND_SERVICES,
            MapType::Array,
            4,
            4,
            o.max_backends,
            0,
        ),
        spec(
            names::CONNECTIONS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<ConnEntry>(),
            o.max_connections,
            0,
        ),
        spec(
            names::ADDR_FILTER,
            MapType::Array,
            4,
            8,
            2 * names::ADDR_FILTER_WORDS,
            0,
        ),
        spec(
            names::SIGNALS,
            MapType::RingBuf,
            0,
            0,
            names::SIGNALS_BYTES,
            0,
        ),
        spec(names::SCRATCH, MapType::PerCpuArray, 4, 64, 1, 0),
        spec(
            names::COUNTERS,
            MapType::PerCpuArray,
            4,
            8,
            COUNTER_SLOTS,
            0,
        ),
        spec(
            names::SERVICE_STATS,
            MapType::PerCpuArray,
            4,
            stats,
            o.max_services,
            0,
        ),
        spec(
            names::BACKEND_STATS,
            MapType::PerCpuArray,
            4,
            stats,
            o.max_backends,
            0,
        ),
        spec(
            names::AFFINITY,
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<Affinity>(),
            o.max_affinity,
            0,
        ),
        spec(
            names::AFFINITY_TIMEOUTS,
            MapType::Array,
            4,
            4,
            o.max_services,
            0,
        ),
    ]
}

/// `BPF_F_MMAPABLE`.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Slots of the selection array for `options`: one window per service (its table, then
/// its failover list) of the size `sync` gives it, for any split of `max_backends - 1`
/// backends over `max_services - 1` services, and room for windows being replaced; never
/// more than the two windows of `table_slots` per service a fixed layout takes.
///
/// A window of a service with `n` backends is at most `SLOTS_PER_BACKEND × n + extra`
/// slots, `extra` (the smallest table's minimum and the prime above `64 n`, plus the
/// failover list) computed below, so the sum over services is at most
/// `SLOTS_PER_BACKEND × backends + extra × services`.
pub fn selection_slots(options: &DataplaneOptions) -> Result<u32> {
    let per = selection::SLOTS_PER_BACKEND as u64;
    let table_slots = u64::from(options.table_slots);
    let window = |n: u64| {
        selection::table_size(n as usize, (table_slots - u64::from(FALLBACK_LEN)) as usize) as u64
            + u64::from(FALLBACK_LEN)
    };
    // Beyond `table_slots / 64` backends a window is capped, so `window(n) - 64 n` only
    // falls; below, it is the prime gap above `64 n` (at most 336 for any `u32`) once the
    // minimum no longer applies.
    let exact = table_slots.div_ceil(per).min(1024) + 1;
    let mut extra = (1..=exact)
        .map(|n| window(n).saturating_sub(per * n))
        .max()
        .unwrap_or(0);
    if exact <= table_slots.div_ceil(per) {
        extra = extra.max(336 + u64::from(FALLBACK_LEN));
    }
    let services = u64::from(options.max_services.saturating_sub(1));
    let backends = u64::from(options.max_backends.saturating_sub(1));
    let need = per * backends + extra * services;
    // Windows retired and not yet free again (`slots::GRACE`): 64 of the largest, and
    // 1/64 of the rest, so a burst of ejections does not wait for one.
    let room = 64 * table_slots + need / 64;
    let fixed = 2 * table_slots * u64::from(options.max_services);
    let slots = (need + room).min(fixed).max(2 * table_slots);
    u32::try_from(slots.next_multiple_of(2)).map_err(|_| {
        anyhow::anyhow!(
            "the selection array would need {slots} slots, more than 2^32: lower \
             dataplane.max_backends, max_services or table_slots"
        )
    })
}

/// Elements of the selection array: two slots per element (see lb-ebpf's SELECTION).
fn selection_elements(options: &DataplaneOptions) -> Result<u32> {
    Ok(selection_slots(options)? / 2)
}

fn loader(options: &DataplaneOptions, selection_elements: u32) -> EbpfLoader<'_> {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(names::SERVICES, options.max_services * 2)
        .map_max_entries(names::SELECTION, selection_elements)
        .map_max_entries(names::BACKENDS, options.max_backends)
        .map_max_entries(names::BACKEND_SERVICES, options.max_backends)
        .map_max_entries(names::CONNECTIONS, options.max_connections)
        .map_max_entries(names::SERVICE_STATS, options.max_services)
        .map_max_entries(names::BACKEND_STATS, options.max_backends)
        .map_max_entries(names::AFFINITY, options.max_affinity)
        .map_max_entries(names::AFFINITY_TIMEOUTS, options.max_services)
        .override_global(names::CONFIG_GLOBAL, &options.timeouts, true);
    loader
}

/// Creates (or opens) the maps and loads every program into the kernel, verifying it.
fn load_programs(loader: &mut EbpfLoader<'_>) -> Result<Ebpf> {
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading lb's eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
    for name in [
        XDP_PROGRAM,
        TC_INGRESS_PROGRAM,
        TC_EGRESS_PROGRAM,
        tls_steer::SK_LOOKUP_PROGRAM,
    ] {
        let prog = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing from the eBPF object"))?;
        let loaded = match prog {
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::SkLookup(p) => p.load(),
            _ => bail!("program {name} has an unexpected type"),
        };
        loaded.with_context(|| format!("the kernel rejected program {name}"))?;
    }
    Ok(ebpf)
}

/// Switches the link pinned at `path` to `prog` (`BPF_LINK_UPDATE`: one atomic switch).
fn update_pinned_link(prog: &mut aya::programs::Program, path: &Path) -> Result<()> {
    let link: FdLink = PinnedLink::from_pin(path)?.into();
    match prog {
        aya::programs::Program::SchedClassifier(p) => {
            let id = p.attach_to_link(SchedClassifierLink::try_from(link)?)?;
            // The pin keeps it attached; our descriptor can go.
            drop(p.take_link(id)?);
        }
        aya::programs::Program::Xdp(p) => {
            let id = p.attach_to_link(XdpLink::try_from(link)?)?;
            drop(p.take_link(id)?);
        }
        _ => bail!("a program of an unexpected type"),
    }
    Ok(())
}

/// The program behind a link pin's hook (`xdp`, `tc_ingress`, `tc_egress`).
fn hook_program(hook: &str) -> Option<&'static str> {
    match hook {
        "xdp" => Some(XDP_PROGRAM),
        "tc_ingress" => Some(TC_INGRESS_PROGRAM),
        "tc_egress" => Some(TC_EGRESS_PROGRAM),
        _ => None,
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} is missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Dataplane {
    /// Loads the programs into the kernel (verifying them) without attaching anything.
    /// Nothing is pinned (see [`Dataplane::load_pinned`]).
    pub fn load(options: &DataplaneOptions) -> Result<Self> {
        Self::load_pinned(options, None)
    }

    /// Like [`Dataplane::load`], and with `pin_dir` everything is pinned there (see
    /// [`pin`]): the BPF filesystem is mounted at `/sys/fs/bpf` if needed and the directory
    /// created. A map an earlier agent pinned with exactly this layout and these sizes is
    /// adopted, contents and all ([`Dataplane::adopted`]); one that differs is replaced by
    /// a new map pinned over it, the connection table's entries copied into it (and those
    /// of a `lb_ct_v1` table of the previous layout, converted; see
    /// [`Dataplane::finish_attach`] for how no connection is lost meanwhile). The services, selection,
    /// backends, backend → service and per-id statistics maps are adopted together or not
    /// at all, since their ids must agree. Links made by [`Dataplane::attach`] are pinned
    /// too. The pins stay when `self` is dropped.
    pub fn load_pinned(options: &DataplaneOptions, pin_dir: Option<&Path>) -> Result<Self> {
        validate(options)?;
        let mut selection_elements = selection_elements(options)?;
        if let Some(dir) = pin_dir {
            pin::prepare_dir(dir)?;
            pin::rename_fixed_layout_selection(dir)?;
            // A pinned selection array larger than this agent would make holds the tables
            // the kernel reads now: adopted at its size with the other id maps, as long as
            // they are all adopted (the windows are wherever its service entries say).
            if let Some(pinned) = pin::larger_selection(dir, selection_elements) {
                let others_fit = map_specs(options, selection_elements)
                    .iter()
                    .filter(|spec| ID_GROUP.contains(&spec.name) && spec.name != names::SELECTION)
                    .all(|spec| matches!(pin::check_pinned(dir, spec), pin::PinnedMap::Compatible));
                if others_fit {
                    selection_elements = pinned;
                }
            }
        }
        let specs = map_specs(options, selection_elements);
        // Which pinned maps are reused as they are, and which are replaced.
        let mut reuse: Vec<&'static str> = Vec::new();
        let mut adopted: Vec<&'static str> = Vec::new();
        let mut replace: Vec<&'static str> = Vec::new();
        if let Some(dir) = pin_dir {
            let checks: Vec<(&pin::MapSpec, pin::PinnedMap)> = specs
                .iter()
                .map(|spec| (spec, pin::check_pinned(dir, spec)))
                .collect();
            let group_whole = checks
                .iter()
                .filter(|(spec, _)| ID_GROUP.contains(&spec.name))
                .all(|(_, c)| matches!(c, pin::PinnedMap::Compatible));
            for (spec, check) in checks {
                let in_group = ID_GROUP.contains(&spec.name) || ID_FOLLOWERS.contains(&spec.name);
                match check {
                    pin::PinnedMap::Absent => reuse.push(spec.name),
                    pin::PinnedMap::Compatible if !in_group || group_whole => {
                        reuse.push(spec.name);
                        adopted.push(spec.name);
                    }
                    pin::PinnedMap::Compatible => {
                        log::warn!(
                            "map {} is replaced: the maps of service and backend ids are \
                             adopted together, and another of them differs",
                            spec.name
                        );
                        replace.push(spec.name);
                    }
                    pin::PinnedMap::Incompatible(why) => {
                        log::warn!("map {} is replaced: {why}", spec.name);
                        replace.push(spec.name);
                    }
                }
            }
        }
        // Older connection tables the programs read while their entries are migrated.
        let mut migrating = 0;
        let mut linked: Vec<(&'static str, PathBuf)> = Vec::new();
        if let Some(dir) = pin_dir {
            let replaced = dir.join(names::CONNECTIONS);
            if replace.contains(&names::CONNECTIONS) {
                match older_table_fits(&replaced, std::mem::size_of::<ConnEntry>()) {
                    Ok(()) => {
                        linked.push((names::CONNECTIONS_PREV, replaced));
                        migrating |= names::MIGRATING_PREV;
                    }
                    Err(why) => log::warn!("the old connection table is not copied: {why}"),
                }
            }
            let v1 = dir.join(names::CONNECTIONS_V1);
            if v1.exists() {
                match older_table_fits(&v1, std::mem::size_of::<ConnEntryV1>()) {
                    Ok(()) => {
                        linked.push((names::CONNECTIONS_V1, v1));
                        migrating |= names::MIGRATING_V1;
                    }
                    Err(why) => log::warn!("{} is not migrated: {why}", v1.display()),
                }
            }
        }
        let mut loader = loader(options, selection_elements);
        if let Some(dir) = pin_dir {
            // Adopted when pinned, else created and pinned by name.
            for name in &reuse {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        for (name, path) in &linked {
            loader.map_pin_path(name, path.clone());
        }
        let mut ebpf = load_programs(&mut loader)?;
        let mut migrations = Vec::new();
        if migrating & names::MIGRATING_PREV != 0 {
            migrations.push(Migration {
                source: OldConnections::Current(take(&mut ebpf, names::CONNECTIONS_PREV)?),
                pin: None,
            });
        }
        if migrating & names::MIGRATING_V1 != 0 {
            migrations.push(Migration {
                source: OldConnections::V1(take(&mut ebpf, names::CONNECTIONS_V1)?),
                pin: pin_dir.map(|d| d.join(names::CONNECTIONS_V1)),
            });
        }
        if let Some(dir) = pin_dir {
            for name in &replace {
                let map = ebpf
                    .map(name)
                    .with_context(|| format!("map {name} is missing from the eBPF object"))?;
                pin::pin_map_replacing(map, dir, name)?;
            }
            pin::pin_config(&ebpf, dir, &options.timeouts)?;
            log::info!(
                "maps pinned under {}: {} adopted ({}), {} replaced, {} new",
                dir.display(),
                adopted.len(),
                adopted.join(" "),
                replace.len(),
                reuse.len() - adopted.len()
            );
        }
        let mut dp = Self {
            services: take(&mut ebpf, names::SERVICES)?,
            selection: {
                let map = ebpf
                    .take_map(names::SELECTION)
                    .context("map lb_sel_v2 is missing from the eBPF object")?;
                let aya::maps::Map::Array(data) = &map else {
                    bail!("map {} has an unexpected type", names::SELECTION);
                };
                // The mapping keeps the map alive on its own; `map` can go.
                std::sync::Arc::new(mmap::MappedU32Array::new(
                    data.fd().as_fd(),
                    selection_elements as usize * 2,
                )?)
            },
            backends: take(&mut ebpf, names::BACKENDS)?,
            backend_services: take(&mut ebpf, names::BACKEND_SERVICES)?,
            connections: take(&mut ebpf, names::CONNECTIONS)?,
            addr_filter: take(&mut ebpf, names::ADDR_FILTER)?,
            addr_words: Vec::new(),
            counters: take(&mut ebpf, names::COUNTERS)?,
            service_stats: take(&mut ebpf, names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            signals: Some(take(&mut ebpf, names::SIGNALS)?),
            affinity: take(&mut ebpf, names::AFFINITY)?,
            affinity_timeouts: take(&mut ebpf, names::AFFINITY_TIMEOUTS)?,
            affinity_secs: StdHashMap::new(),
            migration_flags: take(&mut ebpf, names::MIGRATION)?,
            xdp_targets: take(&mut ebpf, names::XDP_TARGETS)?,
            xdp_target_set: Default::default(),
            routing_generation: take(&mut ebpf, names::ROUTING_GENERATION)?,
            routing_generation_now: 0,
            ebpf,
            options: options.clone(),
            windows: StdHashMap::new(),
            ranges: slots::SlotRanges::new(selection_elements * 2),
            selection_slots: selection_elements * 2,
            unchecked: Default::default(),
            vip_users: StdHashMap::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            adopted,
            migrations,
            links: Vec::new(),
            attached: Default::default(),
            owned_links: Vec::new(),
            tls_steering: None,
        };
        dp.addr_words = (0..2 * names::ADDR_FILTER_WORDS)
            .map(|i| dp.addr_filter.get(&i, 0))
            .collect::<Result<_, _>>()
            .context("reading the address prefilter")?;
        if dp.adopted.contains(&names::SERVICES) {
            dp.adopt_services()?;
        }
        // Before any program is attached, so XDP redirects from its first packet on;
        // without the list, XDP leaves every rewritten packet to the stack (counted).
        if let Err(e) = dp.refresh_xdp_targets() {
            log::warn!("XDP will not redirect (the stack forwards instead): {e:#}");
        }
        // First pass: the new programs find the old connections once attached. Until the
        // last pass they also look up the older table on a miss and write new connections
        // to it, for the old programs still attached to hooks not yet switched.
        let migrated = dp.migrate_connections(false)?;
        if migrated > 0 {
            log::info!("{migrated} connection-table entries copied from the old table");
        }
        if migrating != 0 {
            dp.migration_flags
                .set(0, migrating, 0)
                .context("starting the connection-table migration")?;
        }
        Ok(dp)
    }

    /// Maps adopted from the pin directory (an earlier agent's, contents and all).
    pub fn adopted(&self) -> &[&'static str] {
        &self.adopted
    }

    /// Rebuilds each service's window in the selection array (so no table is written over
    /// one the kernel reads), and how many frontends use each VIP address, from an adopted
    /// services map.
    fn adopt_services(&mut self) -> Result<()> {
        for (key, svc) in self.service_entries()? {
            let Some(frontend) = Frontend::from_key(&key) else {
                continue;
            };
            let len = svc.table_len + u32::from(svc.fallback_len);
            self.ranges
                .reserve(svc.table_offset, len)
                .with_context(|| {
                    format!(
                        "adopting service {frontend} (id {}): its window {}+{len} in the pinned \
                     selection array {}",
                        svc.id,
                        svc.table_offset,
                        names::SELECTION
                    )
                })?;
            self.windows.insert(svc.id, (svc.table_offset, len));
            self.unchecked.insert(svc.id);
            // Absent in pins of a release without affinity: then 0, as created.
            let secs = self.affinity_timeouts.get(&svc.id, 0).unwrap_or(0);
            if secs != 0 {
                self.affinity_secs.insert(svc.id, secs);
            }
            *self.vip_users.entry(frontend.vip).or_default() += 1;
        }
        Ok(())
    }

    /// Copies the connections of replaced or previous-layout tables into the connection
    /// table, each entry unless the key is there already (then the programs wrote it, and
    /// theirs is newer). The first pass runs before the programs are switched; the last
    /// one (`finish`), once they are, adds what the old programs tracked meanwhile, then
    /// lets the old tables go (removing a previous-layout table's pin). Returns the
    /// entries copied.
    fn migrate_connections(&mut self, finish: bool) -> Result<usize> {
        let (mut copied, mut failed) = (0, 0);
        let mut last_error = None;
        for m in &self.migrations {
            let entries: Vec<(FlowKey, ConnEntry)> = match &m.source {
                OldConnections::Current(map) => iterate_bounded(map)?,
                OldConnections::V1(map) => iterate_bounded(map)?
                    .into_iter()
                    .map(|(k, v)| (k, ConnEntry::from_v1(&v)))
                    .collect(),
            };
            for (key, value) in entries {
                match self.connections.insert(key, value, BPF_NOEXIST) {
                    Ok(()) => copied += 1,
                    Err(aya::maps::MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => {
                        failed += 1;
                        last_error = Some(e);
                    }
                }
            }
        }
        if let Some(e) = last_error {
            log::warn!("{failed} connection-table entries not copied, the last because: {e}");
        }
        if finish {
            for m in self.migrations.drain(..) {
                if let Some(pin) = m.pin {
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                    log::info!("{} migrated and removed", pin.display());
                }
            }
        }
        Ok(copied)
    }

    /// Ends an adoption once every interface is attached: detaches links pinned for
    /// interfaces or hooks this agent no longer uses (after the new ones are attached, so
    /// no packet goes unbalanced), then ends a connection-table migration: copies what
    /// the old programs tracked since the first copy, and loads the programs once more,
    /// without the link to the older table, so its memory is freed. Returns the stale
    /// links removed.
    pub fn finish_attach(&mut self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        if let Some(dir) = self.pin_dir.clone() {
            for entry in std::fs::read_dir(&dir)?.flatten() {
                let path = entry.path();
                let Some(file) = entry.file_name().into_string().ok() else {
                    continue;
                };
                if pin::parse_link_name(&file).is_some() && !self.links.contains(&path) {
                    pin::detach_link_pin(&path)?;
                    log::info!("detached {file}: not an interface or hook of this agent");
                    removed.push(file);
                }
            }
        }
        if self.migrations.is_empty() {
            return Ok(removed);
        }
        // No old program is attached any more; one already running when its link was
        // switched ends within microseconds.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let late = self.migrate_connections(true)?;
        log::info!("{late} more connection-table entries copied after the switch");
        self.migration_flags
            .set(0, 0, 0)
            .context("ending the connection-table migration")?;
        if let Err(e) = self.relink_without_older_tables() {
            log::warn!(
                "the programs stay linked to the replaced connection table (its memory is \
                 freed at the next restart): {e:#}"
            );
        }
        Ok(removed)
    }

    /// Loads the programs again with every map from the pin directory, and switches each
    /// of this agent's links to them: the older connection table the first programs were
    /// linked to for the migration is then referenced by nothing and freed.
    fn relink_without_older_tables(&mut self) -> Result<()> {
        let dir = self.pin_dir.clone().context("no pin directory")?;
        let selection_elements = self.selection_slots / 2;
        let mut loader = loader(&self.options, selection_elements);
        for spec in map_specs(&self.options, selection_elements) {
            loader.map_pin_path(spec.name, dir.join(spec.name));
        }
        let mut ebpf = load_programs(&mut loader)?;
        for path in &self.links {
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default();
            let name = pin::parse_link_name(file)
                .and_then(|(_, hook)| hook_program(hook))
                .with_context(|| format!("{} is not a link pin", path.display()))?;
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} is missing"))?;
            update_pinned_link(prog, path)
                .with_context(|| format!("switching {} again", path.display()))?;
        }
        pin::pin_config(&ebpf, &dir, &self.options.timeouts)?;
        self.ebpf = ebpf;
        log::info!("connection-table migration done; the older table is released");
        Ok(())
    }

    /// Every entry of the services map (frontends and VIP address markers).
    pub fn service_entries(&self) -> Result<Vec<(ServiceKey, Service)>> {
        self.services
            .iter()
            .map(|r| r.context("reading the services map"))
            .collect()
    }

    /// The service id recorded for backend `id` (0: none).
    pub fn backend_service(&self, id: u32) -> Result<u32> {
        Ok(self.backend_services.get(&id, 0)?)
    }

    pub fn options(&self) -> &DataplaneOptions {
        &self.options
    }

    /// Attaches to `iface` in `mode`. With TC, both ingress (clients and replies) and
    /// egress (connections the node opens) are attached. Without a pin directory the links
    /// live as long as `self`. With one, each link is pinned (`link_IFACE_HOOK`) and stays
    /// after the agent exits, so the programs keep forwarding; a link an earlier agent
    /// pinned there is updated in place to this agent's program (`BPF_LINK_UPDATE`: one
    /// atomic switch, no packet without a program).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        match mode {
            AttachMode::Xdp => self.attach_hook(iface, XDP_PROGRAM, "xdp", None),
            AttachMode::Tc => {
                self.attach_hook(
                    iface,
                    TC_INGRESS_PROGRAM,
                    "tc_ingress",
                    Some(TcAttachType::Ingress),
                )?;
                self.attach_hook(
                    iface,
                    TC_EGRESS_PROGRAM,
                    "tc_egress",
                    Some(TcAttachType::Egress),
                )
            }
        }
    }

    fn attach_hook(
        &mut self,
        iface: &str,
        name: &str,
        hook: &str,
        tc: Option<TcAttachType>,
    ) -> Result<()> {
        let path = self
            .pin_dir
            .as_ref()
            .map(|d| pin::link_path(d, iface, hook));
        let prog = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing"))?;
        // An earlier agent's link: switch it to this program.
        if let Some(path) = path
            .as_ref()
            .filter(|p| p.exists() && pin::link_follows(p, iface))
        {
            match update_pinned_link(prog, path) {
                Ok(()) => {
                    log::info!("{name} on {iface}: pinned link updated to the new program");
                    self.links.push(path.clone());
                    return Ok(());
                }
                // Attached anew below, then pinned over the old link (detaching it).
                Err(e) => log::warn!(
                    "{name} on {iface}: the pinned link {} cannot be updated ({e:#}); \
                     attaching a new one",
                    path.display()
                ),
            }
        }
        let prog = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing"))?;
        let link: Option<FdLink> =
            match (prog, tc) {
                (aya::programs::Program::SchedClassifier(p), Some(at)) => {
                    let id = p
                        .attach(iface, at)
                        .with_context(|| format!("attaching {name} to {iface} ({at:?})"))?;
                    match path {
                        Some(_) => Some(p.take_link(id)?.try_into().context(
                            "a TC attachment that is not a bpf link (tcx) cannot be pinned",
                        )?),
                        None => {
                            let link = links::OwnedLink::Tc(p.take_link(id)?);
                            self.owned_links.push((iface.to_string(), link));
                            None
                        }
                    }
                }
                (aya::programs::Program::Xdp(p), None) => {
                    let id = p
                        .attach(iface, XdpMode::default())
                        .with_context(|| format!("attaching XDP to {iface}"))?;
                    match path {
                        Some(_) => Some(p.take_link(id)?.try_into().context(
                            "an XDP attachment that is not a bpf link cannot be pinned",
                        )?),
                        None => {
                            let link = links::OwnedLink::Xdp(p.take_link(id)?);
                            self.owned_links.push((iface.to_string(), link));
                            None
                        }
                    }
                }
                _ => bail!("program {name} has an unexpected type"),
            };
        if let (Some(link), Some(path)) = (link, path) {
            let dir = path.parent().expect("a link path has a directory");
            let tmp = dir.join(format!("{}{}_link", pin::TMP_PREFIX, std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let pinned = link
                .pin(&tmp)
                .with_context(|| format!("pinning the link of {name} on {iface}"))?;
            // Over a stale link (e.g. of a program that could not be updated): that one is
            // detached once its pin is gone, after this one is attached.
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("pinning the link of {name} at {}", path.display()))?;
            drop(pinned);
            self.links.push(path);
        }
        Ok(())
    }

    /// A loaded program, e.g. for BPF_PROG_TEST_RUN.
    pub fn program_mut(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing"))
    }

    fn check_backend_id(&self, id: u32) -> Result<()> {
        if id == 0 || id >= self.options.max_backends {
            bail!(
                "backend id {id} is out of range 1..{} (raise dataplane.max_backends)",
                self.options.max_backends
            );
        }
        Ok(())
    }

    /// Sets `addr`'s bit in the `role` bitmap of the address prefilter. Never cleared:
    /// connections of a removed service or backend may still need translating.
    fn mark_address(&mut self, addr: Ipv4Addr, role: AddrRole) -> Result<()> {
        let (index, bit) = addr_filter_slot(&AddrBe::v4(addr.octets()), role);
        let word = self.addr_words[index as usize];
        let marked = word | 1u64 << bit;
        if marked != word {
            self.addr_filter
                .set(index, marked, 0)
                .with_context(|| format!("marking {addr} in the address prefilter"))?;
            self.addr_words[index as usize] = marked;
        }
        Ok(())
    }

    /// Writes backend `id` (address, port, state).
    pub fn set_backend(
        &mut self,
        id: u32,
        addr: Ipv4Addr,
        port: u16,
        state: BackendState,
    ) -> Result<()> {
        self.check_backend_id(id)?;
        self.mark_address(addr, AddrRole::Backend)?;
        let value = Backend {
            addr: AddrBe::v4(addr.octets()),
            port_be: port.to_be(),
            family: family::V4,
            state: state as u8,
        };
        self.backends
            .set(id, value, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    /// Writes many backends (id, address, port, state) in few calls, as
    /// [`Dataplane::set_backend`] writes one.
    pub fn set_backends(&mut self, entries: &[(u32, Ipv4Addr, u16, BackendState)]) -> Result<()> {
        let mut keys = Vec::with_capacity(entries.len());
        let mut values = Vec::with_capacity(entries.len());
        for &(id, addr, port, state) in entries {
            self.check_backend_id(id)?;
            self.mark_address(addr, AddrRole::Backend)?;
            keys.push(id);
            values.push(Backend {
                addr: AddrBe::v4(addr.octets()),
                port_be: port.to_be(),
                family: family::V4,
                state: state as u8,
            });
        }
        let fd = fd_clone(self.backends.map().fd().as_fd())?;
        let backends = &mut self.backends;
        batch::update_array(fd.as_fd(), &keys, &values, names::BACKENDS, |id, v| {
            backends
                .set(id, *v, 0)
                .with_context(|| format!("writing backend {id}"))
        })
    }

    /// Records the service of many backends (backend id, service id) in few calls, as
    /// [`Dataplane::set_backend_service`] does one.
    pub fn set_backend_services(&mut self, entries: &[(u32, u32)]) -> Result<()> {
        for &(id, _) in entries {
            self.check_backend_id(id)?;
        }
        let keys: Vec<u32> = entries.iter().map(|e| e.0).collect();
        let values: Vec<u32> = entries.iter().map(|e| e.1).collect();
        let fd = fd_clone(self.backend_services.map().fd().as_fd())?;
        let owners = &mut self.backend_services;
        batch::update_array(
            fd.as_fd(),
            &keys,
            &values,
            names::BACKEND_SERVICES,
            |id, v| {
                owners
                    .set(id, *v, 0)
                    .with_context(|| format!("writing the service of backend {id}"))
            },
        )
    }

    /// Clears backend `id`: it can no longer be chosen.
    pub fn clear_backend(&mut self, id: u32) -> Result<()> {
        self.check_backend_id(id)?;
        self.backends
            .set(id, Backend::default(), 0)
            .with_context(|| format!("clearing backend {id}"))
    }

    /// Records that backend `id` belongs to service `service_id` (0: to none), for `lb`
    /// commands: the programs never read it.
    pub fn set_backend_service(&mut self, id: u32, service_id: u32) -> Result<()> {
        self.check_backend_id(id)?;
        self.backend_services
            .set(id, service_id, 0)
            .with_context(|| format!("writing the service of backend {id}"))
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        Ok(self.backends.get(&id, 0)?)
    }

    /// Publishes `table` (backend ids) for service `id` at `frontend`.
    ///
    /// The table is written into a new window of the selection array, sized to it (see
    /// [`slots`]), then the service entry is replaced in one map update that names the new
    /// window: a packet sees either the whole old table or the whole new one. The old
    /// window is retired, and handed out again only after [`slots::GRACE`].
    ///
    /// `fallback` (at most `FALLBACK_LEN` backend ids, in priority order) is where a
    /// refused or timed-out connection attempt goes next; it follows the table in the same
    /// window, so both change together. `flags` are `lb_common::maps::SERVICE_*`.
    ///
    /// `affinity_secs` (0: none, at most `MAX_AFFINITY_TIMEOUT_SECS`) is the service's
    /// session-affinity timeout: written before the service entry that flags it
    /// (`SERVICE_AFFINITY`, set here), cleared after the one that no longer does. The
    /// programs read the timeout only under the flag and treat 0 as none, so each step
    /// between is consistent.
    pub fn publish_service(
        &mut self,
        id: u32,
        frontend: &Frontend,
        table: &[u32],
        fallback: &[u32],
        flags: u16,
        affinity_secs: u32,
    ) -> Result<()> {
        if id == 0 || id >= self.options.max_services {
            bail!(
                "service id {id} is out of range 1..{} (raise dataplane.max_services)",
                self.options.max_services
            );
        }
        if fallback.len() > FALLBACK_LEN as usize {
            bail!(
                "failover list of {} backends exceeds {FALLBACK_LEN}",
                fallback.len()
            );
        }
        if table.len() + fallback.len() > self.options.table_slots as usize {
            bail!(
                "selection table of {} slots and failover list of {} exceed dataplane.table_slots = {}",
                table.len(),
                fallback.len(),
                self.options.table_slots
            );
        }
        if affinity_secs > MAX_AFFINITY_TIMEOUT_SECS {
            bail!(
                "session affinity of {frontend}: {affinity_secs} s is more than \
                 {MAX_AFFINITY_TIMEOUT_SECS} s"
            );
        }
        let flags = if affinity_secs != 0 {
            self.set_affinity_timeout(id, affinity_secs)?;
            flags | SERVICE_AFFINITY
        } else {
            flags & !SERVICE_AFFINITY
        };
        let len = (table.len() + fallback.len()) as u32;
        self.mark_address(frontend.vip, AddrRole::Vip)?;
        if self.unchecked.remove(&id) && self.holds(id, frontend, table, fallback, flags)? {
            // Adopted as it is: the kernel already reads exactly this.
            return Ok(());
        }
        let offset = if len == 0 {
            0
        } else {
            self.ranges.allocate(len).map_err(|e| {
                anyhow::anyhow!(
                    "no room for the selection table of {frontend} ({} slots and a failover \
                     list of {}) in {} ({} slots, sized from dataplane.max_services, \
                     max_backends and table_slots): {e}",
                    table.len(),
                    fallback.len(),
                    names::SELECTION,
                    self.selection_slots
                )
            })?
        };
        let written = self
            .selection
            .write(offset as usize, table)
            .with_context(|| format!("writing selection table of {frontend}"))
            .and_then(|()| {
                self.selection
                    .write(offset as usize + table.len(), fallback)
                    .with_context(|| format!("writing failover list of {frontend}"))
            });
        let value = Service {
            id,
            table_offset: offset,
            table_len: table.len() as u32,
            fallback_len: fallback.len() as u16,
            flags,
        };
        let published = written.and_then(|()| {
            self.services
                .insert(frontend.key(), value, 0)
                .with_context(|| format!("publishing service {frontend}"))
        });
        if let Err(e) = published {
            // The kernel never read the new window.
            self.ranges.retire(offset, len);
            return Err(e);
        }
        match self.windows.insert(id, (offset, len)) {
            // The old window is written again only once no program can still be in it.
            Some((old, old_len)) => self.ranges.retire(old, old_len),
            None => {
                *self.vip_users.entry(frontend.vip).or_default() += 1;
                let marker =
                    ServiceKey::address_marker(AddrBe::v4(frontend.vip.octets()), family::V4);
                self.services
                    .insert(marker, Service::default(), 0)
                    .with_context(|| format!("marking {} as a VIP address", frontend.vip))?;
            }
        }
        if affinity_secs == 0 {
            self.set_affinity_timeout(id, 0)?;
        }
        Ok(())
    }

    /// Whether the kernel reads exactly `table`, `fallback` and `flags` for service `id`
    /// at `frontend` already (an adopted service whose configuration did not change).
    fn holds(
        &self,
        id: u32,
        frontend: &Frontend,
        table: &[u32],
        fallback: &[u32],
        flags: u16,
    ) -> Result<bool> {
        let Ok(svc) = self.service(frontend) else {
            return Ok(false);
        };
        if svc.id != id
            || svc.flags != flags
            || svc.table_len as usize != table.len()
            || svc.fallback_len as usize != fallback.len()
        {
            return Ok(false);
        }
        let start = svc.table_offset as usize;
        Ok(self.selection.read(start, table.len())? == table
            && self.selection.read(start + table.len(), fallback.len())? == fallback)
    }

    /// Slots of the selection array: in all, in use by published windows, and retired
    /// (free again once no program can still read them).
    pub fn selection_usage(&self) -> (u32, u64, u64) {
        let used = self.windows.values().map(|w| u64::from(w.1)).sum();
        (self.selection_slots, used, self.ranges.retired_slots())
    }

    /// Writes service `id`'s session-affinity timeout when it changed.
    fn set_affinity_timeout(&mut self, id: u32, secs: u32) -> Result<()> {
        if self.affinity_secs.get(&id).copied().unwrap_or(0) == secs {
            return Ok(());
        }
        self.affinity_timeouts
            .set(id, secs, 0)
            .with_context(|| format!("writing the session-affinity timeout of service {id}"))?;
        if secs == 0 {
            self.affinity_secs.remove(&id);
        } else {
            self.affinity_secs.insert(id, secs);
        }
        Ok(())
    }

    /// The session-affinity timeout the programs read for service `id` (0: none).
    pub fn affinity_timeout(&self, id: u32) -> Result<u32> {
        Ok(self.affinity_timeouts.get(&id, 0)?)
    }

    /// Every session-affinity entry: (service id, client) → backend, last use.
    pub fn affinity_entries(&self) -> Result<Vec<(AffinityKey, Affinity)>> {
        self.affinity
            .iter()
            .map(|r| r.context("reading the session-affinity map"))
            .collect()
    }

    /// Removes service `id` at `frontend`: new connections to it pass untouched;
    /// tracked connections keep their backend until they close or expire.
    pub fn remove_service(&mut self, id: u32, frontend: &Frontend) -> Result<()> {
        self.services
            .remove(&frontend.key())
            .with_context(|| format!("removing service {frontend}"))?;
        // Its clients' entries are left to age out (walking the map would cost more): the
        // programs follow one only while the backend it names belongs to the service id.
        self.set_affinity_timeout(id, 0)?;
        self.unchecked.remove(&id);
        if let Some((start, len)) = self.windows.remove(&id) {
            self.ranges.retire(start, len);
            let users = self.vip_users.entry(frontend.vip).or_default();
            *users = users.saturating_sub(1);
            if *users == 0 {
                self.vip_users.remove(&frontend.vip);
                let marker =
                    ServiceKey::address_marker(AddrBe::v4(frontend.vip.octets()), family::V4);
                let _ = self.services.remove(&marker);
            }
        }
        Ok(())
    }

    /// The service entry the kernel currently reads for `frontend`.
    pub fn service(&self, frontend: &Frontend) -> Result<Service> {
        Ok(self.services.get(&frontend.key(), 0)?)
    }

    /// The active selection table of `frontend`.
    pub fn selection_table(&self, frontend: &Frontend) -> Result<Vec<u32>> {
        let svc = self.service(frontend)?;
        self.selection
            .read(svc.table_offset as usize, svc.table_len as usize)
    }

    /// The failover list the kernel currently reads for `frontend` (it follows the active
    /// selection table in the same window).
    pub fn failover_list(&self, frontend: &Frontend) -> Result<Vec<u32>> {
        let svc = self.service(frontend)?;
        self.selection.read(
            (svc.table_offset + svc.table_len) as usize,
            svc.fallback_len as usize,
        )
    }

    /// The ring buffer of failure signals (`lb_common::Signal`), for its one consumer.
    pub fn take_signals(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.signals.take()
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&c| Ok((c, self.counter(c)?)))
            .collect()
    }

    pub fn counter(&self, counter: Counter) -> Result<u64> {
        debug_assert!((counter as u32) < COUNTER_SLOTS);
        Ok(self.counters.get(&(counter as u32), 0)?.iter().sum())
    }

    pub fn service_stats(&self, id: u32) -> Result<TrafficStats> {
        sum_stats(&self.service_stats, id)
    }

    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats> {
        sum_stats(&self.backend_stats, id)
    }

    /// All tracked connection entries (both directions).
    pub fn connections(&self) -> Result<Vec<(FlowKey, ConnEntry)>> {
        self.connections
            .iter()
            .map(|r| r.context("reading the connection table"))
            .collect()
    }
}

/// A descriptor of its own for a map, so it can be used while the map's handle is
/// borrowed mutably.
fn fd_clone(fd: std::os::fd::BorrowedFd<'_>) -> Result<std::os::fd::OwnedFd> {
    fd.try_clone_to_owned()
        .context("duplicating a map descriptor")
}

fn sum_stats(map: &PerCpuArray<MapData, TrafficStats>, id: u32) -> Result<TrafficStats> {
    let mut total = TrafficStats::default();
    for s in map.get(&id, 0)?.iter() {
        total.add(s);
    }
    Ok(total)
}

fn validate(o: &DataplaneOptions) -> Result<()> {
    let DataplaneOptions {
        max_services,
        max_backends,
        table_slots,
        max_connections,
        max_affinity,
        timeouts,
    } = o;
    for (name, v, min) in [
        ("dataplane.max_services", *max_services, 2),
        ("dataplane.max_backends", *max_backends, 2),
        // Room for a small table and the failover list that follows it.
        ("dataplane.table_slots", *table_slots, 2 * FALLBACK_LEN),
        ("dataplane.max_connections", *max_connections, 2),
        ("dataplane.max_affinity", *max_affinity, 2),
    ] {
        if v < min {
            bail!("{name} must be at least {min}, got {v}");
        }
    }
    let DataplaneConfig {
        tcp_syn_timeout_ns,
        tcp_established_timeout_ns,
        tcp_closing_timeout_ns,
        udp_timeout_ns,
        connect_retries,
        _pad,
    } = timeouts;
    if *connect_retries > MAX_CONNECT_RETRIES {
        bail!(
            "dataplane.connect_retries must be at most {MAX_CONNECT_RETRIES}, got {connect_retries}"
        );
    }
    for (name, v) in [
        ("dataplane.timeouts.tcp_syn", tcp_syn_timeout_ns),
        (
            "dataplane.timeouts.tcp_established",
            tcp_established_timeout_ns,
        ),
        ("dataplane.timeouts.tcp_closing", tcp_closing_timeout_ns),
        ("dataplane.timeouts.udp", udp_timeout_ns),
    ] {
        if *v == 0 {
            bail!("{name} must be greater than zero");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(services: u32, backends: u32, table_slots: u32) -> DataplaneOptions {
        DataplaneOptions {
            max_services: services + 1,
            max_backends: backends + 1,
            table_slots,
            ..Default::default()
        }
    }

    /// The array holds every split of the backends over the services (each service's
    /// window as `sync` sizes it) with room to spare, and is sized to that, not to two
    /// windows of `table_slots` per service.
    #[test]
    fn the_selection_array_is_sized_to_what_the_tables_need() {
        let window = |n: usize, t: u32| {
            selection::table_size(n, (t - FALLBACK_LEN) as usize) as u64 + FALLBACK_LEN as u64
        };
        for (services, per_service, table_slots) in [
            (10_000u32, 100u32, 8192u32),
            (1000, 100, 8192),
            (256, 16, 8192),
            (40, 3, 1024),
        ] {
            let o = options(services, services * per_service, table_slots);
            let slots = u64::from(selection_slots(&o).unwrap());
            let even = u64::from(services) * window(per_service as usize, table_slots);
            // One service with all but one backend each of the others: the most uneven.
            let uneven = window(
                (services * per_service - (services - 1)) as usize,
                table_slots,
            ) + u64::from(services - 1) * window(1, table_slots);
            for need in [even, uneven] {
                assert!(
                    need + 2 * u64::from(table_slots) <= slots,
                    "{services} x {per_service}: {need} needed, {slots} slots"
                );
            }
            let fixed = 2 * u64::from(table_slots) * u64::from(o.max_services);
            assert!(slots <= fixed);
            if services >= 1000 {
                // Within 10% of the tables of an even split, and the room for 64 retired
                // windows of the largest size, where two windows of table_slots per
                // service would be 2.5 times as many.
                assert!(
                    slots * 100 <= even * 110 + 6400 * u64::from(table_slots),
                    "{slots} slots for {even} needed"
                );
            }
        }
    }

    #[test]
    fn a_selection_array_beyond_32_bits_is_refused_naming_the_fields() {
        let err = selection_slots(&options(1 << 20, u32::MAX - 1, 65536))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dataplane.max_backends"), "{err}");
    }
}
