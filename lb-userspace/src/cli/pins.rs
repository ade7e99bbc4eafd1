//! The agent's pinned maps, read with the layouts of `lb_common`.

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    maps as names, Backend, ConnEntry, Counter, DataplaneConfig, FlowKey, Service, ServiceKey,
    TrafficStats,
};

use super::{fail, EXIT_NO_PINS};
use crate::dataplane::pin::{existing_ancestor, on_bpffs, BPF_FS_ROOT};

/// `BPF_F_MMAPABLE`: the array can be mapped into memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The pin directory of a running (or stopped) agent.
pub struct Pins {
    pub dir: PathBuf,
}

/// What the pin directory lacks, as the user should read it.
fn missing(dir: &Path, what: &str) -> anyhow::Error {
    fail(
        EXIT_NO_PINS,
        format!(
            "{what}: is the agent running? It pins its maps in its --pin-dir (default {}); \
             give lb the same --pin-dir (here {})",
            crate::agent::DEFAULT_PIN_DIR,
            dir.display()
        ),
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Pins {
    /// Checks that `dir` holds the agent's pins and that they can be read: root, a BPF
    /// filesystem, the directory, and the services map in it. Errors exit with 3.
    pub fn open(dir: &Path) -> Result<Self> {
        if !is_root() {
            return Err(fail(
                EXIT_NO_PINS,
                "reading the data plane's pinned maps needs root (CAP_BPF and CAP_SYS_ADMIN; \
                 the agent also needs CAP_NET_ADMIN to attach): run lb with sudo",
            ));
        }
        if !dir.exists() {
            let ancestor = existing_ancestor(dir).unwrap_or(Path::new("/"));
            if on_bpffs(ancestor).unwrap_or(false) {
                return Err(missing(
                    dir,
                    &format!("pin directory {} does not exist", dir.display()),
                ));
            }
            let root = if dir.starts_with(BPF_FS_ROOT) {
                Path::new(BPF_FS_ROOT)
            } else {
                ancestor
            };
            return Err(fail(
                EXIT_NO_PINS,
                format!(
                    "no BPF filesystem is mounted at {} (the agent mounts one when it starts \
                     and pins its maps under {}): is the agent running on this node?",
                    root.display(),
                    dir.display()
                ),
            ));
        }
        if !on_bpffs(dir).unwrap_or(false) {
            return Err(fail(
                EXIT_NO_PINS,
                format!(
                    "{} is not on a BPF filesystem: pass the agent's --pin-dir (default {})",
                    dir.display(),
                    crate::agent::DEFAULT_PIN_DIR
                ),
            ));
        }
        if !dir.join(names::SERVICES).exists() {
            return Err(missing(
                dir,
                &format!("no lb maps are pinned in {}", dir.display()),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The pinned map `name`.
    pub fn data(&self, name: &str) -> Result<MapData> {
        let path = self.dir.join(name);
        if !path.exists() {
            return Err(missing(
                &self.dir,
                &format!("map {name} is not pinned in {}", self.dir.display()),
            ));
        }
        MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))
    }

    /// Whether `name` is pinned.
    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }

    fn typed<T>(&self, name: &str) -> Result<T>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = Map::from_map_data(self.data(name)?)
            .with_context(|| format!("map {name} has a type lb does not know"))?;
        T::try_from(map).with_context(|| {
            format!(
                "map {name} has another layout than this lb expects (an agent of another version?)"
            )
        })
    }

    /// Every frontend (address markers left out), by service id.
    pub fn services(&self) -> Result<Vec<(ServiceKey, Service)>> {
        let map: HashMap<MapData, ServiceKey, Service> = self.typed(names::SERVICES)?;
        let mut out: Vec<(ServiceKey, Service)> = iterate(&map, names::SERVICES)?
            .into_iter()
            .filter(|(k, _)| k.port_be != 0 || k.proto != 0)
            .collect();
        out.sort_by_key(|(_, s)| s.id);
        Ok(out)
    }

    /// Every backend entry by id (index = id), unset ones included.
    pub fn backends(&self) -> Result<Vec<Backend>> {
        let map: Array<MapData, Backend> = self.typed(names::BACKENDS)?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading the backends map")
    }

    /// Service id of every backend id, when the agent pinned that map.
    pub fn backend_services(&self) -> Result<Option<Vec<u32>>> {
        if !self.has(names::BACKEND_SERVICES) {
            return Ok(None);
        }
        let map: Array<MapData, u32> = self.typed(names::BACKEND_SERVICES)?;
        let ids = map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading the backend → service map")?;
        Ok(Some(ids))
    }

    /// Session-affinity timeout (seconds, 0: none) of every service id, when the agent
    /// pinned that map.
    pub fn affinity_timeouts(&self) -> Result<Option<Vec<u32>>> {
        if !self.has(names::AFFINITY_TIMEOUTS) {
            return Ok(None);
        }
        let map: Array<MapData, u32> = self.typed(names::AFFINITY_TIMEOUTS)?;
        let secs = map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading the session-affinity timeouts")?;
        Ok(Some(secs))
    }

    /// The selection-table array, to read windows of it.
    pub fn selection(&self) -> Result<Selection> {
        Selection::open(self.data(names::SELECTION)?)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<MapData, u64> = self.typed(names::COUNTERS)?;
        // An agent of an earlier release pinned fewer slots: its counters only.
        let slots = map.len();
        Counter::ALL
            .iter()
            .filter(|&&c| (c as u32) < slots)
            .map(|&c| {
                let values = map
                    .get(&(c as u32), 0)
                    .with_context(|| format!("reading counter {}", c.label()))?;
                Ok((c, values.iter().sum()))
            })
            .collect()
    }

    /// Traffic of every service id (index = id), summed over CPUs.
    pub fn service_stats(&self) -> Result<Vec<TrafficStats>> {
        self.stats(names::SERVICE_STATS)
    }

    /// Traffic of every backend id (index = id), summed over CPUs.
    pub fn backend_stats(&self) -> Result<Vec<TrafficStats>> {
        self.stats(names::BACKEND_STATS)
    }

    fn stats(&self, name: &str) -> Result<Vec<TrafficStats>> {
        let map: PerCpuArray<MapData, TrafficStats> = self.typed(name)?;
        map.iter()
            .map(|values| {
                let values = values.with_context(|| format!("reading {name}"))?;
                let mut total = TrafficStats::default();
                for v in values.iter() {
                    total.add(v);
                }
                Ok(total)
            })
            .collect()
    }

    /// Every connection-table entry (both directions).
    pub fn connections(&self) -> Result<Vec<(FlowKey, ConnEntry)>> {
        let map: HashMap<MapData, FlowKey, ConnEntry> = self.typed(names::CONNECTIONS)?;
        iterate(&map, names::CONNECTIONS)
    }

    /// The idle timeouts and retry budget the programs were loaded with, when pinned.
    pub fn config(&self) -> Result<Option<DataplaneConfig>> {
        if !self.has(names::CONFIG_PIN) {
            return Ok(None);
        }
        let map: Array<MapData, DataplaneConfig> = self.typed(names::CONFIG_PIN)?;
        Ok(Some(
            map.get(&0, 0)
                .context("reading the data plane's settings")?,
        ))
    }

    /// The names of the maps pinned in the pin directory, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(crate::dataplane::pin::TMP_PREFIX))
            // The agent's bpf links, not maps.
            .filter(|n| !n.starts_with(crate::dataplane::pin::LINK_PREFIX))
            .collect();
        names.sort();
        Ok(names)
    }
}

/// All entries of a hash map, each key once. The walk is bounded: a key removed while it
/// is walked makes the kernel start over, which must not loop forever on a busy table.
fn iterate<K, V>(map: &HashMap<MapData, K, V>, name: &str) -> Result<Vec<(K, V)>>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let max = map_max_entries(map).unwrap_or(u32::MAX) as usize;
    let mut seen: StdHashMap<K, V> = StdHashMap::new();
    let mut steps = 0usize;
    for key in map.keys() {
        let key = key.with_context(|| format!("walking {name}"))?;
        steps += 1;
        if steps > max.saturating_mul(2).max(1024) {
            break;
        }
        match map.get(&key, 0) {
            Ok(v) => {
                seen.insert(key, v);
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    Ok(seen.into_iter().collect())
}

fn map_max_entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Option<u32> {
    use aya::maps::IterableMap as _;
    map.map().info().ok().map(|i| i.max_entries())
}

/// The selection-table array, mapped read-only when the kernel allows it (one slot per
/// `u32`, two per array element).
pub struct Selection {
    map: Array<MapData, [u32; 2]>,
    mapped: Option<(*const u32, usize, usize)>,
}

impl Selection {
    fn open(data: MapData) -> Result<Self> {
        let info = data.info().context("reading the selection map's info")?;
        let slots = info.max_entries() as usize * 2;
        let mut mapped = None;
        if info.map_flags() & BPF_F_MMAPABLE != 0 {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
            let bytes = (slots * 4).div_ceil(page) * page;
            // SAFETY: a fresh read-only shared mapping of a BPF array fd; the kernel checks
            // the size against the map.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    data.fd().as_fd().as_raw_fd(),
                    0,
                )
            };
            if ptr != libc::MAP_FAILED {
                mapped = Some((ptr as *const u32, slots, bytes));
            }
        }
        let map = Array::try_from(Map::Array(data)).context("map lb_sel_v2 has another layout")?;
        Ok(Self { map, mapped })
    }

    /// Slots `offset..offset + len`.
    pub fn read(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        let (offset, len) = (offset as usize, len as usize);
        if let Some((ptr, slots, _)) = self.mapped {
            anyhow::ensure!(
                offset + len <= slots,
                "table window beyond the selection map"
            );
            // SAFETY: in bounds of the mapping (checked); plain u32 loads of shared memory
            // the agent may be writing: a torn table is possible only while it changes.
            return Ok((offset..offset + len)
                .map(|i| unsafe { std::ptr::read_volatile(ptr.add(i)) })
                .collect());
        }
        let mut out = Vec::with_capacity(len);
        let mut element = None;
        for slot in offset..offset + len {
            let index = (slot / 2) as u32;
            let pair = match element {
                Some((i, pair)) if i == index => pair,
                _ => {
                    let pair = self.map.get(&index, 0).context("reading lb_sel_v2")?;
                    element = Some((index, pair));
                    pair
                }
            };
            out.push(pair[slot % 2]);
        }
        Ok(out)
    }
}

impl Drop for Selection {
    fn drop(&mut self) {
        if let Some((ptr, _, bytes)) = self.mapped {
            // SAFETY: the mapping made in `open`, unmapped once.
            unsafe { libc::munmap(ptr as *mut libc::c_void, bytes) };
        }
    }
}
