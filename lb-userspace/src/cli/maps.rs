//! `lb maps`: every map in the pin directory with its type, sizes, fill and memory.
//!
//! Fill is what is present: entries of hash maps (walked), set entries of arrays (non-zero
//! values, or non-unset backends), and for the selection array the slots of the active
//! tables and failover lists. Memory is the kernel's own figure (`memlock` in the map fd's
//! `/proc/self/fdinfo`, the map's memory use on kernels since 6.2); when the kernel does not
//! give it, an estimate from the sizes (`~`).

use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use lb_common::{maps as names, Backend, BackendState, TrafficStats};
use serde::Serialize;

use super::{
    print, print_json,
    table::{bytes, Table},
    Common, Output, Pins,
};
use crate::dataplane::memory;

#[derive(Serialize)]
struct MapRow {
    name: String,
    /// Kernel map type (`hash`, `array`, `lru_hash`, `percpu_array`, `ringbuf`, ...).
    r#type: String,
    id: u32,
    max_entries: u32,
    key_size: u32,
    value_size: u32,
    flags: u32,
    /// Entries present (see the module's notes); `None` where it does not apply.
    entries: Option<u64>,
    /// What `entries` counts.
    fill: String,
    /// Bytes: the kernel's memlock figure, or an estimate.
    memory_bytes: u64,
    memory_estimated: bool,
}

fn type_name(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        10 => "lru_percpu_hash".into(),
        27 => "ringbuf".into(),
        other => format!("type {other}"),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Entries present in map `name`, and what they are.
fn fill(pins: &Pins, name: &str, data: MapData) -> Result<(Option<u64>, String)> {
    let count = |n: usize| Some(n as u64);
    Ok(match name {
        names::SERVICES => {
            let frontends = pins.services()?.len();
            let map: aya::maps::HashMap<MapData, lb_common::ServiceKey, lb_common::Service> =
                aya::maps::HashMap::try_from(Map::from_map_data(data)?)?;
            let all = map.keys().filter(|k| k.is_ok()).count();
            (
                count(all),
                format!(
                    "{frontends} frontend{}, {} VIP marker{}",
                    plural(frontends),
                    all - frontends,
                    plural(all - frontends)
                ),
            )
        }
        names::CONNECTIONS => {
            let n = pins.connections()?.len();
            (count(n), format!("{n} entries, two per connection"))
        }
        names::AFFINITY => {
            let map: aya::maps::HashMap<
                MapData,
                lb_common::maps::AffinityKey,
                lb_common::maps::Affinity,
            > = aya::maps::HashMap::try_from(Map::from_map_data(data)?)?;
            let n = map.keys().filter(|k| k.is_ok()).count();
            (count(n), "clients remembered (expired ones too)".into())
        }
        names::SELECTION => {
            let slots: u64 = pins
                .services()?
                .iter()
                .map(|(_, s)| u64::from(s.table_len) + u64::from(s.fallback_len))
                .sum();
            (
                Some(slots),
                "slots of active tables and failover lists (two per element)".into(),
            )
        }
        names::BACKENDS => {
            let map: Array<MapData, Backend> = Array::try_from(Map::from_map_data(data)?)?;
            let n = map
                .iter()
                .filter(|b| {
                    b.as_ref()
                        .is_ok_and(|b| b.state != BackendState::Unset as u8)
                })
                .count();
            (count(n), "backends set".into())
        }
        names::BACKEND_SERVICES
        | names::ADDR_FILTER
        | names::CONFIG_PIN
        | names::AFFINITY_TIMEOUTS => {
            let info = data.info()?;
            let n = match info.value_size() {
                4 => {
                    let map: Array<MapData, u32> = Array::try_from(Map::from_map_data(data)?)?;
                    map.iter()
                        .filter(|v| v.as_ref().is_ok_and(|v| *v != 0))
                        .count()
                }
                8 => {
                    let map: Array<MapData, u64> = Array::try_from(Map::from_map_data(data)?)?;
                    map.iter()
                        .filter(|v| v.as_ref().is_ok_and(|v| *v != 0))
                        .count()
                }
                _ => info.max_entries() as usize,
            };
            (count(n), "non-zero entries".into())
        }
        names::COUNTERS => {
            let n = pins.counters()?.iter().filter(|(_, v)| *v > 0).count();
            (count(n), "non-zero counters".into())
        }
        names::SERVICE_STATS | names::BACKEND_STATS => {
            let map: PerCpuArray<MapData, TrafficStats> =
                PerCpuArray::try_from(Map::from_map_data(data)?)?;
            let n = map
                .iter()
                .filter(|v| {
                    v.as_ref()
                        .is_ok_and(|v| v.iter().any(|s| *s != TrafficStats::default()))
                })
                .count();
            (count(n), "ids with traffic".into())
        }
        names::SIGNALS => (None, "ring buffer (bytes)".into()),
        names::SCRATCH => (None, "per-CPU scratch".into()),
        _ => (None, "-".into()),
    })
}

pub fn maps(common: &Common) -> Result<()> {
    let pins = Pins::open(&common.pin_dir)?;
    let mut rows = Vec::new();
    for name in pins.names()? {
        let data = pins.data(&name)?;
        let info = data
            .info()
            .with_context(|| format!("reading the info of {name}"))?;
        let fd = memory::fdinfo(data.fd().as_fd());
        let map_type: u32 = fd.get("map_type").and_then(|v| v.parse().ok()).unwrap_or(0);
        let (memory_bytes, memory_estimated) = memory::map_bytes(&fd);
        let (entries, what) = fill(&pins, &name, data).unwrap_or((None, "unreadable".into()));
        rows.push(MapRow {
            r#type: type_name(map_type),
            id: info.id(),
            max_entries: info.max_entries(),
            key_size: info.key_size(),
            value_size: info.value_size(),
            flags: info.map_flags(),
            entries,
            fill: what,
            memory_bytes,
            memory_estimated,
            name,
        });
    }
    for expected in names::PINNED {
        if !rows.iter().any(|r| r.name == *expected) {
            super::warn(&format!(
                "map {expected} is not pinned in {} (pinned by an agent of another version?)",
                pins.dir.display()
            ));
        }
    }
    if common.output == Output::Json {
        return print_json(&rows);
    }
    let mut t = Table::new(&[
        "NAME",
        "TYPE",
        "ID",
        "MAX ENTRIES",
        "KEY",
        "VALUE",
        "ENTRIES",
        "MEMORY",
        "FILL",
    ]);
    let mut total = 0;
    for r in &rows {
        total += r.memory_bytes;
        t.row(vec![
            r.name.clone(),
            r.r#type.clone(),
            r.id.to_string(),
            r.max_entries.to_string(),
            format!("{} B", r.key_size),
            format!("{} B", r.value_size),
            r.entries.map_or("-".into(), |n| n.to_string()),
            format!(
                "{}{}",
                if r.memory_estimated { "~" } else { "" },
                bytes(r.memory_bytes)
            ),
            r.fill.clone(),
        ]);
    }
    let mut out = t.render("");
    out.push_str(&format!(
        "{} maps pinned in {}, {} in all\n",
        rows.len(),
        pins.dir.display(),
        bytes(total)
    ));
    print(&out)
}
