//! Restarts and upgrades: the data plane outlives the agent. Under steady load (new
//! connections without pause, and keep-alive connections making requests in a loop) the
//! agent is killed (SIGKILL) or stopped (SIGTERM) and started again with the same pin
//! directory: no request fails, no kept connection is reset, and the restarted agent
//! adopts the maps with the same ids. `lb agent --cleanup` then leaves nothing attached
//! or pinned. Upgrades under the same load: from the previous release (whose connection
//! table has the previous layout, `lb_ct_v1`) to this one, and to another table size;
//! the replaced table's memory is freed.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{tc::TcAttachType, SchedClassifier},
};
use lb::dataplane::AttachMode;
use lb_common::{
    maps::{self as names, ConnEntryV1},
    AddrBe, Backend, ConnEntry, FlowKey, Service, ServiceKey,
};
use lb_tests::{
    agent_process::{
        lb_binary, previous_release_binary, wait_until, write_atomically, AgentProcess, TempDir,
    },
    clients::http_request,
    http_get, require_root,
    topology::{self, vip_http, TestBed},
    KeepAliveClient, Netns, DEFAULT_TIMEOUT,
};

const ADMIN: &str = "127.0.0.1:15000";

fn admin() -> SocketAddr {
    ADMIN.parse().unwrap()
}

struct Setup {
    bed: TestBed,
    _dir: TempDir,
    agent: AgentProcess,
}

impl Setup {
    fn new() -> Self {
        Self::with_pin_dir(None)
    }

    fn with_pin_dir(pin_dir: Option<PathBuf>) -> Self {
        Self::in_mode(AttachMode::Tc, pin_dir)
    }

    /// lb attached in `mode` on the client-facing interface (TC on the others).
    fn in_mode(mode: AttachMode, pin_dir: Option<PathBuf>) -> Self {
        let bed = TestBed::new(mode).unwrap();
        let dir = TempDir::new("lbrestart").unwrap();
        let config = dir.0.join("lb.yaml");
        write_atomically(&config, &topology::config_yaml(&[1, 2, 3], "")).unwrap();
        let extra = ["--admin", ADMIN];
        let agent = match pin_dir {
            Some(p) => AgentProcess::start_with_pin_dir(&bed, &config, &extra, p),
            None => AgentProcess::start_with(&bed, &config, &extra),
        }
        .unwrap();
        let s = Self {
            bed,
            _dir: dir,
            agent,
        };
        wait_ready(&s.bed.node);
        wait_until(&s.bed.client, Duration::from_secs(10), || {
            http_get(vip_http(), "/", Duration::from_millis(500))
        })
        .expect("the agent programs the VIP");
        s
    }
}

/// Waits for the agent's `/ready` in `node` (data plane attached, configuration applied).
fn wait_ready(node: &Netns) {
    wait_until(node, Duration::from_secs(20), || {
        match http_request(admin(), "GET", "/ready", &[], Duration::from_millis(500))? {
            (200, _) => Ok(()),
            (status, body) => bail!("/ready: {status} {body}"),
        }
    })
    .expect("the agent becomes ready");
}

/// Services (frontend key → id) and backends (id → address, port, state, service id) as
/// the pinned maps hold them: the ids a restarted agent must keep.
#[derive(Debug, PartialEq, Eq)]
struct Table {
    services: BTreeMap<(u32, u16, u8), u32>,
    backends: BTreeMap<u32, ([u8; 4], u16, u8, u32)>,
}

fn open(pin_dir: &Path, name: &str) -> Map {
    Map::from_map_data(MapData::from_pin(pin_dir.join(name)).unwrap()).unwrap()
}

fn read_table(pin_dir: &Path) -> Table {
    let svc: HashMap<MapData, ServiceKey, Service> =
        open(pin_dir, names::SERVICES).try_into().unwrap();
    let services = svc
        .iter()
        .map(|r| r.unwrap())
        .filter(|(k, _)| k.proto != 0)
        .map(|(k, v)| ((k.addr.0[0], k.port_be, k.proto), v.id))
        .collect();
    let be: Array<MapData, Backend> = open(pin_dir, names::BACKENDS).try_into().unwrap();
    let owners: Array<MapData, u32> = open(pin_dir, names::BACKEND_SERVICES).try_into().unwrap();
    let backends = (1..64u32)
        .filter_map(|id| {
            let b = be.get(&id, 0).unwrap();
            (b.family != 0).then(|| {
                (
                    id,
                    (
                        b.addr.v4_octets(),
                        u16::from_be(b.port_be),
                        b.state,
                        owners.get(&id, 0).unwrap(),
                    ),
                )
            })
        })
        .collect();
    Table { services, backends }
}

/// What the load saw.
#[derive(Debug, Default)]
struct Load {
    new_ok: AtomicU64,
    kept_ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// Runs `during` while the client makes new connections without pause and `kept`
/// keep-alive connections make a request every 20 ms, each checking it stays on its
/// backend. Returns what the load saw.
fn under_load(bed: &TestBed, kept: usize, during: impl FnOnce(&Load)) -> Load {
    let load = Load::default();
    let stop = AtomicBool::new(false);
    let client: &Netns = &bed.client;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            client.run(|| {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(vip_http(), "/", DEFAULT_TIMEOUT) {
                        Ok(_) => {
                            load.new_ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => load.fail(format!("new connection: {e:#}")),
                    }
                }
            })
        });
        for n in 0..kept {
            let (load, stop) = (&load, &stop);
            scope.spawn(move || {
                client.run(|| {
                    let mut c = match KeepAliveClient::connect(vip_http(), DEFAULT_TIMEOUT) {
                        Ok(c) => c,
                        Err(e) => return load.fail(format!("kept connection {n}: {e:#}")),
                    };
                    let mut first = None;
                    while !stop.load(Ordering::Relaxed) {
                        match c.get("/") {
                            Ok(name) if first.get_or_insert_with(|| name.clone()) == &name => {
                                load.kept_ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(name) => {
                                return load.fail(format!(
                                    "kept connection {n} moved from {first:?} to {name}"
                                ))
                            }
                            // A reset or a timeout: the connection is lost.
                            Err(e) => return load.fail(format!("kept connection {n}: {e:#}")),
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            });
        }
        // Everything under way before the action.
        std::thread::sleep(Duration::from_millis(700));
        during(&load);
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::Relaxed);
    });
    load
}

fn link_pins(pin_dir: &Path) -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(pin_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("link_"))
        .collect();
    links.sort();
    links
}

/// The agent goes away (`kill`: SIGKILL, else SIGTERM) and comes back, under load, with
/// lb attached in `mode` on the client-facing interface.
fn restart_under_load(kill: bool, mode: AttachMode) {
    let mut s = Setup::in_mode(mode, None);
    let pin_dir = s.agent.pin_dir.clone();
    let before = read_table(&pin_dir);
    assert_eq!(before.services.len(), 2, "{before:?}");
    assert_eq!(before.backends.len(), 6, "{before:?}");
    let links = link_pins(&pin_dir);
    match mode {
        // Every interface with TC, ingress and egress each: the client's, one per
        // backend, and lbvip.
        AttachMode::Tc => assert_eq!(links.len(), 2 * s.bed.interfaces.len(), "{links:?}"),
        // The client's interface with an XDP link.
        AttachMode::Xdp => assert!(
            links
                .iter()
                .any(|l| l.contains(&s.bed.interfaces[0].name) && l.contains("xdp")),
            "no XDP link pinned for {}: {links:?}",
            s.bed.interfaces[0].name
        ),
    }

    let kept = 4;
    let mut down = (0, 0);
    let load = under_load(&s.bed, kept, |load| {
        if kill {
            s.agent.kill();
        } else {
            assert!(s.agent.stop(), "the agent exits on SIGTERM");
        }
        assert!(!s.agent.running());
        // Nobody programs the kernel now: it forwards on its own.
        let at_stop = load.new_ok.load(Ordering::Relaxed);
        let kept_at_stop = load.kept_ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1500));
        down = (
            load.new_ok.load(Ordering::Relaxed) - at_stop,
            load.kept_ok.load(Ordering::Relaxed) - kept_at_stop,
        );
        assert_eq!(link_pins(&pin_dir), links, "the links outlive the agent");
        s.agent.restart().unwrap();
        let started = Instant::now();
        wait_ready(&s.bed.node);
        eprintln!("restarted agent ready after {:?}", started.elapsed());
    });
    let failures = load.failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    let (new_down, kept_down) = down;
    assert!(
        new_down > 10 && kept_down > 10,
        "traffic flowed while the agent was down: {new_down} new connections, \
         {kept_down} requests on kept connections"
    );
    assert!(load.kept_ok.load(Ordering::Relaxed) > 100, "{load:?}");
    eprintln!("{load:?}, while down: {down:?}");
    assert!(s.agent.running(), "the restarted agent runs");
    assert_eq!(
        read_table(&pin_dir),
        before,
        "the restarted agent keeps the ids"
    );
    assert_eq!(link_pins(&pin_dir), links, "the same links, updated");
}

#[test]
fn sigkill_and_restart_under_load_loses_nothing() {
    if !require_root() {
        return;
    }
    restart_under_load(true, AttachMode::Tc);
}

/// The same with the client-facing interface in XDP mode: its XDP link is pinned, kept
/// while the agent is down and updated by the restarted agent.
#[test]
fn sigkill_and_restart_in_xdp_mode_loses_nothing() {
    if !require_root() {
        return;
    }
    restart_under_load(true, AttachMode::Xdp);
}

#[test]
fn sigterm_and_restart_under_load_loses_nothing() {
    if !require_root() {
        return;
    }
    restart_under_load(false, AttachMode::Tc);
}

/// Ids of the programs attached with tcx (ingress and egress) to lb's interfaces in the
/// node (this bpftool lists no tcx attachments, so the kernel is asked directly).
fn attached_programs(bed: &TestBed) -> Vec<u32> {
    let names: Vec<String> = bed.interfaces.iter().map(|i| i.name.clone()).collect();
    let mut ids: Vec<u32> = bed.node.run(|| {
        let mut ids = Vec::new();
        for iface in &names {
            for at in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, programs) = SchedClassifier::query_tcx(iface, at).unwrap();
                ids.extend(programs.iter().map(|p| p.id()));
            }
        }
        ids
    });
    ids.sort_unstable();
    ids
}

/// `lb agent --cleanup` after a stop: no program left on any interface of the node, no
/// pin left, and the VIP is no longer balanced.
#[test]
fn cleanup_detaches_and_unpins_everything() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new();
    assert!(s.agent.stop());
    let programs = attached_programs(&s.bed);
    assert!(
        !programs.is_empty(),
        "the programs stay attached after a stop"
    );
    http_get_in(&s.bed.client).expect("the VIP is still balanced after a stop");

    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", s.bed.node.name()))
        .arg("--")
        .arg(lb_binary().unwrap())
        .args(["agent", "--cleanup", "--pin-dir"])
        .arg(&s.agent.pin_dir)
        .arg("--admin-token-file")
        .arg(&s.agent.admin_token_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!s.agent.pin_dir.exists(), "the pin directory is gone");
    assert_eq!(
        attached_programs(&s.bed),
        Vec::<u32>::new(),
        "no program is attached in the node"
    );
    for id in programs {
        let show = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(!show.status.success(), "program {id} is still loaded");
    }
    assert!(
        http_get_in(&s.bed.client).is_err(),
        "without lb the VIP answers nothing"
    );
}

/// A restart without one of the interfaces (here the third backend's, with that backend
/// gone from the configuration) detaches lb from it: its link pins are removed and no
/// program is left on it, once the other links are switched; the VIP is still served.
#[test]
fn restart_without_an_interface_detaches_it() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new();
    let pin_dir = s.agent.pin_dir.clone();
    let dropped = s.bed.interfaces[3].name.clone();
    assert!(
        dropped.starts_with("nb3"),
        "{dropped}: the third backend's interface"
    );
    let pinned_for = |iface: &str| -> Vec<String> {
        link_pins(&pin_dir)
            .into_iter()
            .filter(|l| l.contains(iface))
            .collect()
    };
    assert_eq!(pinned_for(&dropped).len(), 2, "{:?}", link_pins(&pin_dir));
    let on_dropped = || {
        s.bed.node.run(|| {
            [TcAttachType::Ingress, TcAttachType::Egress]
                .into_iter()
                .map(|at| SchedClassifier::query_tcx(&dropped, at).unwrap().1.len())
                .sum::<usize>()
        })
    };
    assert_eq!(on_dropped(), 2, "lb on {dropped}, ingress and egress");

    assert!(s.agent.stop());
    let config = s._dir.0.join("lb.yaml");
    write_atomically(&config, &topology::config_yaml(&[1, 2], "")).unwrap();
    s.agent.restart_without_interface(&dropped).unwrap();
    wait_ready(&s.bed.node);
    assert_eq!(
        pinned_for(&dropped),
        Vec::<String>::new(),
        "its link pins are gone"
    );
    assert_eq!(on_dropped(), 0, "no program left on {dropped}");
    assert_eq!(
        link_pins(&pin_dir).len(),
        2 * (s.bed.interfaces.len() - 1),
        "the other links stay: {:?}",
        link_pins(&pin_dir)
    );
    for _ in 0..20 {
        let name = http_get_in(&s.bed.client).unwrap();
        assert!(
            ["backend-1", "backend-2"].contains(&name.as_str()),
            "{name}"
        );
    }
}

fn http_get_in(ns: &Netns) -> Result<String> {
    ns.run(|| http_get(vip_http(), "/", Duration::from_millis(700)))
}

/// A connection table of the previous layout (`lb_ct_v1`, 56-byte values), pinned before
/// the agent starts: its entries are in `lb_ct_v2` afterwards, converted, and its pin is
/// gone.
#[test]
fn previous_layout_connection_table_is_migrated() {
    if !require_root() {
        return;
    }
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(lb_tests::unique_name("lbpin"));
    std::fs::create_dir_all(&pin_dir).unwrap();
    let v1 = pin_dir.join(names::CONNECTIONS_V1);
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&v1)
        .args([
            "type", "lru_hash", "key", "40", "value", "56", "entries", "1024", "name", "lb_ct_v1",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "bpftool map create");
    let entries: Vec<(FlowKey, ConnEntryV1)> = (0..5u16)
        .map(|i| {
            let key = FlowKey {
                src: AddrBe::v4([10, 200, 0, 2]),
                dst: AddrBe::v4([10, 96, 0, 10]),
                src_port_be: (40000 + i).to_be(),
                dst_port_be: 80u16.to_be(),
                proto: 6,
                family: 4,
                _pad: [0; 2],
            };
            let value = ConnEntryV1 {
                nat_addr: AddrBe::v4([10, 200, 1, 2]),
                nat_port_be: 8080u16.to_be(),
                direction: 1,
                state: 2,
                backend_id: 1,
                service_id: 1,
                first_backend_id: 1,
                last_seen_ns: 1_000_000 + u64::from(i),
                syn_isn: 7 + u32::from(i),
                flags: 16,
                ..ConnEntryV1::default()
            };
            (key, value)
        })
        .collect();
    {
        let mut map: HashMap<MapData, FlowKey, ConnEntryV1> =
            open(&pin_dir, names::CONNECTIONS_V1).try_into().unwrap();
        for (k, v) in &entries {
            map.insert(k, v, 0).unwrap();
        }
    }
    let v1_id = aya::maps::MapInfo::from_pin(&v1).unwrap().id();
    let s = Setup::with_pin_dir(Some(pin_dir.clone()));
    assert!(!v1.exists(), "the old table's pin is removed once migrated");
    let ct: HashMap<MapData, FlowKey, ConnEntry> =
        open(&pin_dir, names::CONNECTIONS).try_into().unwrap();
    for (k, v) in &entries {
        let now = ct
            .get(k, 0)
            .with_context(|| format!("{k:?} not migrated"))
            .unwrap();
        assert_eq!(now, ConnEntry::from_v1(v));
        assert_eq!(now.to_v1(), *v, "nothing lost in the conversion");
        assert_eq!(now.created_ns, 0, "creation time unknown");
    }
    wait_for_map_freed(v1_id, "the previous-layout table");
    drop(s);
}

/// Whether a map with this id exists in the kernel.
fn map_exists(id: u32) -> bool {
    aya::maps::loaded_maps()
        .flatten()
        .any(|info| info.id() == id)
}

/// Waits until nothing references map `id` any more (the programs linked to it for a
/// migration were replaced and its pin removed): its memory is freed.
fn wait_for_map_freed(id: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while map_exists(id) {
        assert!(
            Instant::now() < deadline,
            "{what} (map id {id}) is still in the kernel 10 s after the migration"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The failures of a load, printed, then asserted to be none.
fn assert_nothing_lost(load: &Load) {
    let failures = load.failures.lock().unwrap();
    eprintln!("{load:?}; failures: {failures:#?}");
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(load.new_ok.load(Ordering::Relaxed) > 100, "{load:?}");
    assert!(load.kept_ok.load(Ordering::Relaxed) > 100, "{load:?}");
}

/// A restart with another connection-table size replaces the table. Under load, no
/// request fails and no kept connection is reset: the new programs look up the old table
/// on a miss and write new connections to both until the agent has copied everything
/// over; then the old table is freed.
#[test]
fn resized_connection_table_keeps_connections() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new();
    let config = s._dir.0.join("lb.yaml");
    let table = s.agent.pin_dir.join(names::CONNECTIONS);
    let old_id = aya::maps::MapInfo::from_pin(&table).unwrap().id();
    let load = under_load(&s.bed, 3, |_| {
        assert!(s.agent.stop());
        write_atomically(
            &config,
            &topology::config_yaml(&[1, 2, 3], "").replace("65536", "32768"),
        )
        .unwrap();
        s.agent.restart().unwrap();
        wait_ready(&s.bed.node);
    });
    assert_nothing_lost(&load);
    let info = aya::maps::MapInfo::from_pin(&table).unwrap();
    assert_eq!(info.max_entries(), 32768, "the table was replaced");
    wait_for_map_freed(old_id, "the replaced table");
}

/// An upgrade from the previous release (built from the git history by `cargo xtask
/// test`), whose connection table has the previous layout: under load, its agent stops
/// (SIGTERM, as a DaemonSet rollout does) and this release's agent takes over the pinned
/// maps and links. No request fails, no kept connection is reset or moved, the ids stay,
/// the connection table is migrated to the new layout and the old one freed.
#[test]
fn upgrade_from_previous_release_under_load_loses_nothing() {
    if !require_root() {
        return;
    }
    upgrade_from_previous_release(AttachMode::Tc);
}

/// The same with the client-facing interface in XDP mode: its XDP link is switched to
/// the migrating programs, then to the final ones.
#[test]
fn upgrade_from_previous_release_in_xdp_mode_loses_nothing() {
    if !require_root() {
        return;
    }
    upgrade_from_previous_release(AttachMode::Xdp);
}

/// The previous release's agent runs under load with the client-facing interface in
/// `mode`, then this release's agent takes over (see the tests above).
fn upgrade_from_previous_release(mode: AttachMode) {
    let Some(previous) = previous_release_binary().unwrap() else {
        lb_tests::report_skip(
            "the previous release could not be built (see cargo xtask test's warning)",
        );
        return;
    };
    let bed = TestBed::new(mode).unwrap();
    let dir = TempDir::new("lbupgrade").unwrap();
    let config = dir.0.join("lb.yaml");
    write_atomically(&config, &topology::config_yaml(&[1, 2, 3], "")).unwrap();
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(lb_tests::unique_name("lbpin"));
    let mut agent = AgentProcess::start_binary(
        &previous,
        &bed,
        &config,
        &["--admin", ADMIN],
        pin_dir.clone(),
    )
    .unwrap();
    wait_ready(&bed.node);
    wait_until(&bed.client, Duration::from_secs(10), || {
        http_get(vip_http(), "/", Duration::from_millis(500))
    })
    .expect("the previous release programs the VIP");
    let v1 = pin_dir.join(names::CONNECTIONS_V1);
    assert!(
        v1.exists() && !pin_dir.join(names::CONNECTIONS).exists(),
        "the previous release pins lb_ct_v1 only"
    );
    let v1_id = aya::maps::MapInfo::from_pin(&v1).unwrap().id();
    // The fixed layout's selection array, which the kernel reads the tables from.
    let selection_v1 = pin_dir.join(names::SELECTION_V1);
    assert!(
        selection_v1.exists() && !pin_dir.join(names::SELECTION).exists(),
        "the previous release pins lb_sel_v1 only"
    );
    let selection_id = aya::maps::MapInfo::from_pin(&selection_v1).unwrap().id();
    let before = read_table(&pin_dir);
    let links = link_pins(&pin_dir);

    let load = under_load(&bed, 4, |_| {
        assert!(agent.stop(), "the previous release exits on SIGTERM");
        agent.restart_as(Some(&lb_binary().unwrap())).unwrap();
        let started = Instant::now();
        wait_ready(&bed.node);
        eprintln!("upgraded agent ready after {:?}", started.elapsed());
    });
    assert_nothing_lost(&load);
    assert!(agent.running(), "the upgraded agent runs");
    assert!(
        !v1.exists(),
        "the previous layout's pin is removed once migrated"
    );
    let info = aya::maps::MapInfo::from_pin(pin_dir.join(names::CONNECTIONS)).unwrap();
    assert_eq!(info.value_size() as usize, std::mem::size_of::<ConnEntry>());
    assert_eq!(
        read_table(&pin_dir),
        before,
        "the upgraded agent keeps the ids"
    );
    assert!(
        !selection_v1.exists(),
        "lb_sel_v1 is pinned as lb_sel_v2 now, so the previous release never finds it"
    );
    assert_eq!(
        aya::maps::MapInfo::from_pin(pin_dir.join(names::SELECTION))
            .unwrap()
            .id(),
        selection_id,
        "the selection array is adopted with its tables, not replaced"
    );
    assert_eq!(link_pins(&pin_dir), links, "the same links, updated");
    wait_for_map_freed(v1_id, "the previous-layout table");
    drop(agent);
}
