//! The agent's handle on the kernel side: loads lb's eBPF object with the configured map
//! sizes and timeouts, attaches its programs, writes services and backends, and reads
//! counters and connections back.

mod mmap;
pub mod pin;
pub mod selection;
pub mod sync;

use std::{collections::HashMap as StdHashMap, net::Ipv4Addr, os::fd::AsFd as _, path::Path};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{tc::TcAttachType, SchedClassifier, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    config::MAX_CONNECT_RETRIES,
    counters::COUNTER_SLOTS,
    family,
    flow::addr_filter_slot,
    maps::{self as names, AddrRole, FALLBACK_LEN},
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
    pub timeouts: DataplaneConfig,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            max_services: names::DEFAULT_MAX_SERVICES,
            max_backends: names::DEFAULT_MAX_BACKENDS,
            table_slots: names::DEFAULT_TABLE_SLOTS,
            max_connections: names::DEFAULT_MAX_CONNECTIONS,
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
    selection: mmap::MappedU32Array,
    backends: Array<MapData, Backend>,
    /// Service id of each backend id (for `lb` commands; the programs never read it).
    backend_services: Array<MapData, u32>,
    connections: HashMap<MapData, FlowKey, ConnEntry>,
    addr_filter: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    /// The signal ring buffer, until someone takes it to consume it.
    signals: Option<aya::maps::RingBuf<MapData>>,
    /// Which half of each service's table is active (0 or 1).
    active_half: StdHashMap<u32, u32>,
    /// How many published frontends share each VIP address (for the address markers).
    vip_users: StdHashMap<Ipv4Addr, usize>,
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

    /// Like [`Dataplane::load`], and with `pin_dir` pins every map there by name (see
    /// [`pin`]): the BPF filesystem is mounted at `/sys/fs/bpf` if needed, the directory
    /// created, and pins of the same names left by an earlier agent replaced. The pins stay
    /// when `self` is dropped.
    pub fn load_pinned(options: &DataplaneOptions, pin_dir: Option<&Path>) -> Result<Self> {
        validate(options)?;
        let selection_len = options
            .max_services
            .checked_mul(2 * options.table_slots)
            .context("max_services × 2 × table_slots overflows 32 bits")?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::SERVICES, options.max_services * 2)
            // Two slots per array element (see lb-ebpf's SELECTION).
            .map_max_entries(names::SELECTION, selection_len.div_ceil(2))
            .map_max_entries(names::BACKENDS, options.max_backends)
            .map_max_entries(names::BACKEND_SERVICES, options.max_backends)
            .map_max_entries(names::CONNECTIONS, options.max_connections)
            .map_max_entries(names::SERVICE_STATS, options.max_services)
            .map_max_entries(names::BACKEND_STATS, options.max_backends)
            .override_global(names::CONFIG_GLOBAL, &options.timeouts, true)
            .load(EBPF_OBJECT)
            .context("loading lb's eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
        for name in [XDP_PROGRAM, TC_INGRESS_PROGRAM, TC_EGRESS_PROGRAM] {
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} is missing from the eBPF object"))?;
            let loaded = match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            };
            loaded.with_context(|| format!("the kernel rejected program {name}"))?;
        }
        if let Some(dir) = pin_dir {
            let pinned = pin::pin_maps(&ebpf, dir, &options.timeouts)
                .with_context(|| format!("pinning the maps under {}", dir.display()))?;
            log::info!("{} maps pinned under {}", pinned.len(), dir.display());
        }
        Ok(Self {
            services: take(&mut ebpf, names::SERVICES)?,
            selection: {
                let map = ebpf
                    .take_map(names::SELECTION)
                    .context("map lb_sel_v1 is missing from the eBPF object")?;
                let aya::maps::Map::Array(data) = &map else {
                    bail!("map {} has an unexpected type", names::SELECTION);
                };
                // The mapping keeps the map alive on its own; `map` can go.
                mmap::MappedU32Array::new(
                    data.fd().as_fd(),
                    selection_len.div_ceil(2) as usize * 2,
                )?
            },
            backends: take(&mut ebpf, names::BACKENDS)?,
            backend_services: take(&mut ebpf, names::BACKEND_SERVICES)?,
            connections: take(&mut ebpf, names::CONNECTIONS)?,
            addr_filter: take(&mut ebpf, names::ADDR_FILTER)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            service_stats: take(&mut ebpf, names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            signals: Some(take(&mut ebpf, names::SIGNALS)?),
            ebpf,
            options: options.clone(),
            active_half: StdHashMap::new(),
            vip_users: StdHashMap::new(),
        })
    }

    pub fn options(&self) -> &DataplaneOptions {
        &self.options
    }

    /// Attaches to `iface` in `mode`. With TC, both ingress (clients and replies) and
    /// egress (connections the node opens) are attached. Links live as long as `self`.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        match mode {
            AttachMode::Xdp => {
                let prog: &mut Xdp = self.program_mut(XDP_PROGRAM)?.try_into()?;
                prog.attach(iface, XdpMode::default())
                    .with_context(|| format!("attaching XDP to {iface}"))?;
            }
            AttachMode::Tc => {
                for (name, at) in [
                    (TC_INGRESS_PROGRAM, TcAttachType::Ingress),
                    (TC_EGRESS_PROGRAM, TcAttachType::Egress),
                ] {
                    let prog: &mut SchedClassifier = self.program_mut(name)?.try_into()?;
                    prog.attach(iface, at)
                        .with_context(|| format!("attaching {name} to {iface} ({at:?})"))?;
                }
            }
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
        let word = self.addr_filter.get(&index, 0)?;
        let marked = word | 1u64 << bit;
        if marked != word {
            self.addr_filter
                .set(index, marked, 0)
                .with_context(|| format!("marking {addr} in the address prefilter"))?;
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
    /// The table is written into the half the kernel is not reading, then the service
    /// entry is replaced in one map update that names the new half: a packet sees either
    /// the whole old table or the whole new one.
    ///
    /// `fallback` (at most `FALLBACK_LEN` backend ids, in priority order) is where a
    /// refused or timed-out connection attempt goes next; it follows the table in the same
    /// half, so both change together. `flags` are `lb_common::maps::SERVICE_*`.
    pub fn publish_service(
        &mut self,
        id: u32,
        frontend: &Frontend,
        table: &[u32],
        fallback: &[u32],
        flags: u16,
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
        self.mark_address(frontend.vip, AddrRole::Vip)?;
        let half = self.active_half.get(&id).map_or(0, |h| 1 - h);
        let offset = (id * 2 + half) * self.options.table_slots;
        self.selection
            .write(offset as usize, table)
            .with_context(|| format!("writing selection table of {frontend}"))?;
        self.selection
            .write(offset as usize + table.len(), fallback)
            .with_context(|| format!("writing failover list of {frontend}"))?;
        let value = Service {
            id,
            table_offset: offset,
            table_len: table.len() as u32,
            fallback_len: fallback.len() as u16,
            flags,
        };
        self.services
            .insert(frontend.key(), value, 0)
            .with_context(|| format!("publishing service {frontend}"))?;
        if !self.active_half.contains_key(&id) {
            *self.vip_users.entry(frontend.vip).or_default() += 1;
            let marker = ServiceKey::address_marker(AddrBe::v4(frontend.vip.octets()), family::V4);
            self.services
                .insert(marker, Service::default(), 0)
                .with_context(|| format!("marking {} as a VIP address", frontend.vip))?;
        }
        self.active_half.insert(id, half);
        Ok(())
    }

    /// Removes service `id` at `frontend`: new connections to it pass untouched;
    /// tracked connections keep their backend until they close or expire.
    pub fn remove_service(&mut self, id: u32, frontend: &Frontend) -> Result<()> {
        self.services
            .remove(&frontend.key())
            .with_context(|| format!("removing service {frontend}"))?;
        if self.active_half.remove(&id).is_some() {
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
        timeouts,
    } = o;
    for (name, v, min) in [
        ("dataplane.max_services", *max_services, 2),
        ("dataplane.max_backends", *max_backends, 2),
        // Room for a small table and the failover list that follows it.
        ("dataplane.table_slots", *table_slots, 2 * FALLBACK_LEN),
        ("dataplane.max_connections", *max_connections, 2),
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
