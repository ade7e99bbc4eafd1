//! The agent's side at scale, for each size (services × endpoints): publishing every
//! service from scratch, an ejection decision to its table being live in the kernel, the
//! memory the agent's state takes, and the memory of the data plane's maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb::dataplane::{memory, DataplaneOptions, Frontend, Protocol};

/// Ejections measured per size.
const EJECTIONS: usize = 100;

/// The memory figures of `/proc/self/status`, in kB.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Status {
    /// Resident set size.
    pub rss: u64,
    /// Peak resident set size since the process started or the peak was last reset.
    pub hwm: u64,
    /// Of `rss`: anonymous pages (the heap).
    pub anon: u64,
    /// Of `rss`: file and shared-memory pages. The agent maps the selection map
    /// (`BPF_F_MMAPABLE`) into the process: the kernel inserts its pages at `mmap`, so the
    /// whole map shows up here, though it is the kernel's map memory (counted below too).
    pub mapped: u64,
}

fn status() -> Result<Status> {
    status_of("/proc/self/status")
}

/// The memory figures of a process's `status` file (`/proc/PID/status`).
pub(crate) fn status_of(path: &str) -> Result<Status> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .with_context(|| format!("no {name} in {path}"))?;
        line[name.len() + 1..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {name} line {line:?}"))
    };
    Ok(Status {
        rss: field("VmRSS")?,
        hwm: field("VmHWM")?,
        anon: field("RssAnon")?,
        mapped: field("RssFile")? + field("RssShmem")?,
    })
}

/// Resets the process's peak resident set size (`VmHWM`) to its current one
/// (`proc_pid_clear_refs(5)`: writing 5). Returns whether the kernel did.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One BPF map this process holds a descriptor of.
#[derive(Clone, Debug)]
struct MapMemory {
    /// The kernel's name (at most 15 characters).
    name: String,
    /// The kernel's figure (`memlock` in the fd's fdinfo: the map's memory use on kernels
    /// since 6.2), or an estimate from the sizes as `lb maps` makes one.
    bytes: u64,
    estimated: bool,
}

/// The BPF maps of this process's data planes, by map id: every map it holds a descriptor
/// of, and every map the programs it holds use (the agent keeps the selection map only
/// as a mapping, its descriptor closed). Sizes and memory come from a descriptor's fdinfo
/// as `lb maps` reads them, the name from the kernel's map info.
fn held_maps() -> Result<BTreeMap<u32, MapMemory>> {
    use std::os::fd::AsFd as _;
    let id = |fd: &str, key: &str| {
        let fd = fd.parse().ok()?;
        memory::fdinfo_raw(fd)
            .get(key)
            .and_then(|v| v.parse::<u32>().ok())
    };
    let (mut map_ids, mut prog_ids) = (BTreeSet::new(), BTreeSet::new());
    for entry in std::fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let fd = entry.file_name().to_string_lossy().into_owned();
        match target.to_string_lossy().as_ref() {
            "anon_inode:bpf-map" => map_ids.extend(id(&fd, "map_id")),
            "anon_inode:bpf-prog" => prog_ids.extend(id(&fd, "prog_id")),
            _ => {}
        }
    }
    if !prog_ids.is_empty() {
        for program in aya::programs::loaded_programs().flatten() {
            if prog_ids.contains(&program.id()) {
                if let Ok(Some(ids)) = program.map_ids() {
                    map_ids.extend(ids);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for id in map_ids {
        let info = aya::maps::MapInfo::from_id(id).with_context(|| format!("map id {id}"))?;
        let fd = info
            .fd()
            .with_context(|| format!("a descriptor of map {id}"))?;
        let (bytes, estimated) = memory::map_bytes(&memory::fdinfo(fd.as_fd()));
        let name = info
            .name_as_str()
            .map_or_else(|| format!("map {id}"), str::to_string);
        out.insert(
            id,
            MapMemory {
                name,
                bytes,
                estimated,
            },
        );
    }
    Ok(out)
}

/// What one size measured.
struct Figures {
    services: usize,
    endpoints: usize,
    options: DataplaneOptions,
    /// Building the configuration (the model a parsed file gives), not the agent's work.
    build: Duration,
    /// Loading the programs and creating the maps (`Agent::start` with no service).
    load: Duration,
    /// Publishing every service from scratch (`Agent::reload` from the empty one).
    from_scratch: Duration,
    /// Ejection decision to table live, sorted, µs.
    ejections_us: Vec<u64>,
    before: Status,
    after: Status,
    /// Whether the peak could be reset before the size (else `VmHWM` growth is a floor).
    peak_reset: bool,
    /// The data plane's maps, largest first.
    maps: Vec<MapMemory>,
    /// The whole size: configuration, load, publish, ejections, teardown.
    took: Duration,
}

/// Nearest-rank percentile of sorted `v`.
fn rank(v: &[u64], p: usize) -> u64 {
    v[(v.len() * p).div_ceil(100).max(1) - 1]
}

/// The services of one size: `services` services of `endpoints` endpoints, spread over the
/// seed's four localities, with failover and outlier detection that ejects at the first
/// 5xx and may eject every endpoint.
fn services_of(services: usize, endpoints: usize) -> Vec<lb::model::Service> {
    use lb::model::{
        Endpoint, Failover, Locality, LocalityLbSetting, OutlierDetection, Service, TrafficPolicy,
    };
    let localities: Vec<Locality> = [
        "region1/zone1",
        "region1/zone2",
        "region2/zone3",
        "region3/zone4",
    ]
    .iter()
    .map(|l| Locality::parse(l))
    .collect();
    let policy = TrafficPolicy {
        locality_lb: Some(LocalityLbSetting {
            failover: vec![Failover {
                from: "region1".into(),
                to: "region2".into(),
            }],
            ..Default::default()
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx_errors: 1,
            max_ejection_percent: 100,
            ..Default::default()
        }),
        health_check: None,
        tls: None,
    };
    (0..services)
        .map(|i| Service {
            name: format!("svc-{i}"),
            frontend: Frontend {
                vip: Ipv4Addr::from(0x0a60_0000 + i as u32),
                port: 80,
                protocol: Protocol::Tcp,
            },
            endpoints: (0..endpoints)
                .map(|j| Endpoint {
                    // 10.200.0.0 up: a million endpoints end at 10.215.66.63.
                    address: Ipv4Addr::from(0x0ac8_0000 + (i * endpoints + j) as u32),
                    port: 8080,
                    locality: localities[j % localities.len()].clone(),
                    // As a parsed configuration shares them.
                    labels: lb::model::no_labels(),
                    weight: 1,
                    hostname: None,
                })
                .collect(),
            named: Default::default(),
            policy: policy.clone(),
            http: false,
            session_affinity: None,
            source: Default::default(),
        })
        .collect()
}

/// Measures one size. Everything it creates (agent, data plane, maps, configuration) is
/// freed when it returns.
fn measure(services: usize, endpoints: usize) -> Result<Figures> {
    use lb::{agent::Agent, config::Config, model::Locality, model::Node, outlier::Event};

    let started = Instant::now();
    // The maps this process held before (none, normally): not the data plane's.
    let earlier: BTreeSet<u32> = held_maps()?.into_keys().collect();
    // The bench process is the agent here: `lb::agent::Agent` runs in it as a library,
    // exactly as in `lb agent`, with no other state of the bench's alive during the
    // measurement. So the process's resident memory growth from before the configuration
    // is built to after the full publish is the agent's: its configuration (the model a
    // parsed file gives; built here rather than parsed), outlier detectors, locality
    // plans, the programmer's ids and written state, and the data plane's user-space side
    // (the loaded object, map handles, the mapped selection map; see `Status::mapped`).
    // An earlier size's state was freed and trimmed from the heap (`malloc_trim`); each
    // size measures from its own starting point anyway.
    let peak_reset = reset_peak();
    let before = status()?;

    let t = Instant::now();
    let svcs = services_of(services, endpoints);
    let build = t.elapsed();
    // The ejections: endpoint 0 (region1/zone1, priority 0) of services spread over the
    // whole range of ids, each its own service's first decision.
    let step = (services / EJECTIONS).max(1);
    let targets: Vec<(SocketAddrV4, String)> = svcs
        .iter()
        .step_by(step)
        .take(EJECTIONS)
        .map(|s| {
            let e = &s.endpoints[0];
            (
                SocketAddrV4::new(e.address, e.port),
                format!("{}:{}", s.frontend.vip, s.frontend.port),
            )
        })
        .collect();
    // Room for every service and backend (id 0 of each is reserved); the default
    // selection table (8192 slots per half: a table of 64 slots per backend, 6421 for 100,
    // and the failover list fit); a small connection table, since nothing connects.
    let options = DataplaneOptions {
        max_services: services as u32 + 1,
        max_backends: (services * endpoints) as u32 + 1,
        max_connections: 1024,
        ..Default::default()
    };
    let node = Node {
        locality: Locality::parse("region1/zone1"),
        ..Default::default()
    };
    let empty = Config {
        dataplane: options.clone(),
        node: node.clone(),
        ..Default::default()
    };
    let full = Config {
        dataplane: options.clone(),
        node,
        services: svcs,
        ..Default::default()
    };

    let t = Instant::now();
    let mut agent = Agent::start(empty, &[], None)
        .with_context(|| format!("loading the data plane for {services} x {endpoints}"))?;
    let load = t.elapsed();
    let t = Instant::now();
    agent
        .reload(full)
        .with_context(|| format!("publishing {services} x {endpoints}"))?;
    let from_scratch = t.elapsed();
    let after = status()?;
    let mut maps: Vec<MapMemory> = held_maps()?
        .into_iter()
        .filter(|(id, _)| !earlier.contains(id))
        .map(|(_, m)| m)
        .collect();
    maps.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));

    let mut ejections_us = Vec::with_capacity(targets.len());
    for (endpoint, frontend) in &targets {
        let before = agent.publishes();
        agent.record(*endpoint, Some(frontend), Event::HttpStatus(503))?;
        anyhow::ensure!(
            agent.publishes() > before,
            "ejecting {endpoint} of {frontend} published no table"
        );
        ejections_us.push(agent.last_publish.context("no publish")?.as_micros() as u64);
    }
    ejections_us.sort_unstable();
    drop(agent);
    // Return what the allocator kept of the freed state to the kernel, so the next size
    // starts from about where this one did.
    // SAFETY: malloc_trim only releases free memory of glibc's heap.
    unsafe { libc::malloc_trim(0) };
    Ok(Figures {
        services,
        endpoints,
        options,
        build,
        load,
        from_scratch,
        ejections_us,
        before,
        after,
        peak_reset,
        maps,
        took: started.elapsed(),
    })
}

fn mib_kb(kb: i64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn duration(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    }
}

/// The agent's side at each size of `sizes` (services, each of `endpoints` endpoints in
/// four localities, with failover and outlier detection): how long publishing every
/// service from scratch takes, how long from an ejection decision to the new table being
/// live in the kernel (100 ejections), how much resident memory the agent's state takes,
/// and how much memory the data plane's maps take. One size's agent and data plane are
/// freed before the next is built.
pub fn run(sizes: &[usize], endpoints: usize) -> Result<String> {
    let mut md = String::new();
    anyhow::ensure!(
        !sizes.is_empty() && sizes.iter().all(|&s| s > 0) && endpoints > 0,
        "control plane: sizes {sizes:?} x {endpoints} endpoints"
    );
    let started = Instant::now();
    let mut all = Vec::new();
    for &services in sizes {
        println!(
            "control plane: {services} services x {endpoints} endpoints ({} backends)...",
            services * endpoints
        );
        let f = measure(services, endpoints)
            .with_context(|| format!("control plane at {services} x {endpoints}"))?;
        let left = status()?;
        println!(
            "control plane: {services} x {endpoints} took {:.1} s (publish {:.1} s); \
             slowest ejections {:?} µs; VmRSS after freeing it {} (was {} before it)",
            f.took.as_secs_f64(),
            f.from_scratch.as_secs_f64(),
            &f.ejections_us[f.ejections_us.len().saturating_sub(5)..],
            mib_kb(left.rss as i64),
            mib_kb(f.before.rss as i64)
        );
        all.push(f);
    }

    let first = &all[0];
    emit!(md, "");
    emit!(
        md,
        "control plane (services x {endpoints} endpoints in 4 localities, failover, outlier \
         detection ejecting at the first 5xx; dataplane.table_slots = {}, max_connections = {}; \
         max_services and max_backends sized to each configuration)",
        first.options.table_slots,
        first.options.max_connections
    );
    emit!(md, "");
    let header: Vec<String> = all
        .iter()
        .map(|f| format!("{} x {}", f.services, f.endpoints))
        .collect();
    emit!(md, "| measurement | {} |", header.join(" | "));
    emit!(md, "| --- |{}", " ---: |".repeat(all.len()));
    let mut row = |label: &str, cell: &dyn Fn(&Figures) -> String| {
        let cells: Vec<String> = all.iter().map(cell).collect();
        emit!(md, "| {label} | {} |", cells.join(" | "));
    };
    row("backends", &|f| (f.services * f.endpoints).to_string());
    row(
        "publish every service from scratch (plans, Maglev tables, map writes)",
        &|f| duration(f.from_scratch),
    );
    row("ejection decision to new table live, median of 100", &|f| {
        format!("{} µs", rank(&f.ejections_us, 50))
    });
    row("ejection decision to new table live, p99 of 100", &|f| {
        format!("{} µs", rank(&f.ejections_us, 99))
    });
    row("ejection decision to new table live, max of 100", &|f| {
        format!("{} µs", f.ejections_us[f.ejections_us.len() - 1])
    });
    row(
        "agent memory: VmRSS growth, before the configuration to after the publish",
        &|f| mib_kb(f.after.rss as i64 - f.before.rss as i64),
    );
    row("of which anonymous (RssAnon: the agent's heap)", &|f| {
        mib_kb(f.after.anon as i64 - f.before.anon as i64)
    });
    row(
        "of which mapped (RssFile + RssShmem: the selection map, mmapped)",
        &|f| mib_kb(f.after.mapped as i64 - f.before.mapped as i64),
    );
    row("agent memory: VmHWM growth (peak)", &|f| {
        format!(
            "{}{}",
            if f.peak_reset { "" } else { "≥ " },
            mib_kb(f.after.hwm as i64 - f.before.hwm as i64)
        )
    });
    row(
        "map memory: sum over the data plane's maps (kernel's memlock per map)",
        &|f| {
            let total: u64 = f.maps.iter().map(|m| m.bytes).sum();
            let estimated = f.maps.iter().any(|m| m.estimated);
            format!(
                "{}{} ({} maps)",
                if estimated { "~" } else { "" },
                mib(total),
                f.maps.len()
            )
        },
    );
    // Each map with over 1% of the total at some size, largest first at the last size.
    let last = &all[all.len() - 1];
    let total = |f: &Figures| f.maps.iter().map(|m| m.bytes).sum::<u64>().max(1);
    let mut listed: Vec<&str> = Vec::new();
    for m in &last.maps {
        if all.iter().any(|f| {
            f.maps
                .iter()
                .any(|x| x.name == m.name && x.bytes * 100 >= total(f))
        }) {
            listed.push(&m.name);
        }
    }
    for name in listed {
        row(&format!("of which {name}"), &|f| {
            f.maps
                .iter()
                .filter(|m| m.name == name)
                .map(|m| format!("{}{}", if m.estimated { "~" } else { "" }, mib(m.bytes)))
                .next()
                .unwrap_or_else(|| "-".into())
        });
    }
    row("loading the programs and creating the maps", &|f| {
        duration(f.load)
    });
    row(
        "size measured in (configuration built, load, publish, ejections, teardown)",
        &|f| duration(f.took),
    );
    emit!(md, "");
    emit!(
        md,
        "The agent runs in the bench process as a library (the code of `lb agent`), so the \
         process's resident memory growth is the agent's state: its configuration (built, \
         {} for the largest size, not parsed), outlier detectors, locality plans, the \
         programmer's state and the data plane's user-space side. The mapped part is the \
         selection map's pages, inserted at mmap: kernel map memory, counted in the map \
         memory too. Map memory is the kernel's memlock figure per map, as `lb maps` shows it.",
        duration(last.build)
    );
    emit!(
        md,
        "control plane measured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(md)
}
