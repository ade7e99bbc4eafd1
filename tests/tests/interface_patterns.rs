//! `lb agent --interface 'PATTERN'`: pods whose host-side veth appears while the agent
//! runs are balanced without a restart, a veth that goes takes its pins with it, a renamed
//! one is attached under its new name, and a restarted agent keeps what still exists.
//!
//! Each "pod" is a network namespace whose veth pair is made as a CNI plugin makes it:
//! both ends created in the node, then one moved into the pod. Both ends match the
//! pattern, so the agent also sees an interface it attached to leave the namespace.
//! The node's `lbvip` is left out of the agent's interfaces: its TC egress program would
//! otherwise balance whatever the node routes to a VIP, a pod's traffic included, and
//! the test could not tell whether the pod's own veth is attached.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use lb::dataplane::{pin, AttachMode};
use lb_tests::{
    add_route,
    agent_process::{wait_until, write_atomically, AgentProcess, TempDir},
    clients::http_request,
    http_get,
    names::base36,
    names_from, require_root,
    topology::{self, vip_http, TestBed},
    unique_name, veth, Netns,
};

const ADMIN: &str = "127.0.0.1:15000";

/// Prefix of every pod interface this test process makes, matched by the pattern.
fn pod_prefix() -> String {
    format!("lbp-{}-", base36(std::process::id()))
}

/// A pod: a namespace with a veth to the node, made after the agent started.
struct Pod {
    ns: Netns,
    /// The node's end.
    host: String,
}

impl Pod {
    /// Creates the pair in `node` with names matching the pattern (`host_name` for the
    /// node's end, when given), moves the peer into a new namespace and addresses both
    /// ends as `10.200.SUBNET.1` (node) and `.2` (pod, default route via the node).
    fn new(node: &Netns, subnet: u8, host_name: Option<String>) -> Result<Self> {
        let ns = Netns::new("pod")?;
        let host = host_name.unwrap_or_else(|| unique_name("lbp"));
        let peer = unique_name("lbp");
        node.ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
        node.ip(&["link", "set", &peer, "netns", ns.name()])?;
        lb_tests::add_address(node, &host, &format!("10.200.{subnet}.1/24"))?;
        lb_tests::add_address(&ns, &peer, &format!("10.200.{subnet}.2/24"))?;
        ns.ip(&["link", "set", &peer, "up"])?;
        node.ip(&["link", "set", &host, "up"])?;
        add_route(&ns, &format!("default via 10.200.{subnet}.1"))?;
        // Full checksums from both sides, so a wrong rewrite is dropped, not accepted.
        veth::disable_tx_checksum_offload(node, &host)?;
        veth::disable_tx_checksum_offload(&ns, &peer)?;
        Ok(Self { ns, host })
    }

    /// Backends seen by `n` new connections to the VIP from the pod.
    fn backends(&self, n: usize) -> Result<BTreeSet<String>> {
        Ok(names_from(&self.ns, vip_http(), n)?.into_iter().collect())
    }

    /// Waits until a connection from the pod to the VIP is answered.
    fn wait_served(&self) -> Result<()> {
        wait_until(&self.ns, Duration::from_secs(10), || {
            http_get(vip_http(), "/", Duration::from_millis(500))
        })?;
        Ok(())
    }
}

/// The hooks the agent pinned a link for on `iface`.
fn link_pins(pin_dir: &Path, iface: &str) -> BTreeSet<String> {
    std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let (name, hook) = pin::parse_link_name(&file)?;
            (name == iface).then(|| hook.to_string())
        })
        .collect()
}

/// The link pins of an interface attached in `mode`.
fn hook_pins(mode: AttachMode) -> BTreeSet<String> {
    match mode {
        AttachMode::Tc => ["tc_egress", "tc_ingress"].map(String::from).into(),
        AttachMode::Xdp => ["xdp".to_string()].into(),
    }
}

/// Retries `check` for up to 10 s.
fn eventually(what: &str, check: impl Fn() -> Result<()>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn pins_are(pin_dir: &Path, iface: &str, expected: &BTreeSet<String>) -> Result<()> {
    let found = link_pins(pin_dir, iface);
    ensure!(
        &found == expected,
        "{iface}: pins {found:?}, expected {expected:?}"
    );
    Ok(())
}

/// `lb_interfaces_attached{mode="MODE"}` from the agent's `/metrics`.
fn attached(node: &Netns, mode: AttachMode) -> Result<u64> {
    let mode = mode_arg(mode);
    let admin: SocketAddr = ADMIN.parse()?;
    let (status, body) =
        node.run(|| http_request(admin, "GET", "/metrics", &[], Duration::from_secs(2)))?;
    ensure!(status == 200, "/metrics: {status}");
    let line = body
        .lines()
        .find(|l| l.starts_with(&format!("lb_interfaces_attached{{mode=\"{mode}\"}}")))
        .ok_or_else(|| anyhow::anyhow!("no lb_interfaces_attached in /metrics"))?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

/// Renames `from` to `to` in `node` (a device is renamed while down).
fn rename(node: &Netns, from: &str, to: &str) {
    node.ip(&["link", "set", from, "down"])
        .and_then(|_| node.ip(&["link", "set", from, "name", to]))
        .and_then(|_| node.ip(&["link", "set", to, "up"]))
        .unwrap();
}

fn wait_ready(node: &Netns) {
    let admin: SocketAddr = ADMIN.parse().unwrap();
    wait_until(node, Duration::from_secs(20), || {
        match http_request(admin, "GET", "/ready", &[], Duration::from_millis(500))? {
            (200, _) => Ok(()),
            (status, body) => bail!("/ready: {status} {body}"),
        }
    })
    .expect("the agent becomes ready");
}

fn mode_arg(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Tc => "tc",
        AttachMode::Xdp => "xdp",
    }
}

#[test]
fn pods_that_appear_later_are_balanced_and_forgotten_when_they_go_tc() {
    pods_come_and_go(AttachMode::Tc);
}

#[test]
fn pods_that_appear_later_are_balanced_and_forgotten_when_they_go_xdp() {
    pods_come_and_go(AttachMode::Xdp);
}

/// Pods' veths matched by a pattern in `mode` (the node's own interfaces in TC).
fn pods_come_and_go(mode: AttachMode) {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new(AttachMode::Tc).unwrap();
    // Without lbvip (see the top of the file): the client and backend interfaces stay.
    bed.interfaces.retain(|i| !i.name.starts_with("lbvip"));
    let fixed = bed.interfaces.len() as u64;
    // What /metrics counts in `mode` besides the pods.
    let base = if mode == AttachMode::Tc { fixed } else { 0 };
    let pins = hook_pins(mode);
    let dir = TempDir::new("lbpat").unwrap();
    let config = dir.0.join("lb.yaml");
    write_atomically(&config, &topology::config_yaml(&[1, 2, 3], "")).unwrap();
    let pattern = format!("{}*:{}", pod_prefix(), mode_arg(mode));
    let mut agent = AgentProcess::start_with(
        &bed,
        &config,
        &["--admin", ADMIN, "--interface", pattern.as_str()],
    )
    .unwrap();
    wait_ready(&bed.node);
    let pin_dir = agent.pin_dir.clone();
    assert_eq!(attached(&bed.node, mode).unwrap(), base);

    // A pod made after the agent is ready: balanced over the backends, no restart.
    let pod1 = Pod::new(&bed.node, 21, None).unwrap();
    pod1.wait_served().unwrap();
    let seen = pod1.backends(30).unwrap();
    assert!(seen.len() >= 2, "pod 1's connections all went to {seen:?}");
    eventually("pod 1's veth is pinned, its moved peer is not", || {
        pins_are(&pin_dir, &pod1.host, &pins)?;
        let all = std::fs::read_dir(&pin_dir)?.count();
        let expected = 2 * fixed as usize + pins.len();
        let links = std::fs::read_dir(&pin_dir)?
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(pin::LINK_PREFIX)
            })
            .count();
        ensure!(
            links == expected,
            "{links} link pins of {all} pins, expected {expected}"
        );
        Ok(())
    });

    // A second one later works too.
    let pod2 = Pod::new(&bed.node, 22, None).unwrap();
    pod2.wait_served().unwrap();
    assert!(pod2.backends(30).unwrap().len() >= 2);
    eventually("two pods attached, as /metrics says", || {
        ensure!(attached(&bed.node, mode)? == base + 2);
        Ok(())
    });

    // A veth created under a name the pattern does not match is not attached: its pod
    // reaches no backend (the node routes the VIP to lbvip, which drops it). Renamed to
    // a matching name, it is attached.
    let temporary = unique_name("tmpp");
    let pod3 = Pod::new(&bed.node, 23, Some(temporary.clone())).unwrap();
    let refused = pod3
        .ns
        .run(|| http_get(vip_http(), "/", Duration::from_millis(700)));
    assert!(refused.is_err(), "a pod on {temporary} reached {refused:?}");
    assert!(link_pins(&pin_dir, &temporary).is_empty());
    let renamed = unique_name("lbp");
    rename(&bed.node, &temporary, &renamed);
    pod3.wait_served().unwrap();
    // The hooks' links are pinned one after the other: the pod may be served before the
    // last pin is written.
    eventually("the renamed pod's links are pinned", || {
        pins_are(&pin_dir, &renamed, &pins)
    });
    // Renamed again, to another matching name: the same links, their pins renamed.
    let (before, renamed) = (renamed, unique_name("lbp"));
    rename(&bed.node, &before, &renamed);
    eventually("the pins follow the rename", || {
        pins_are(&pin_dir, &before, &BTreeSet::new())?;
        pins_are(&pin_dir, &renamed, &pins)
    });
    pod3.wait_served().unwrap();

    // Pod 1's veth deleted: its pins go, the others keep being served.
    bed.node.ip(&["link", "del", &pod1.host]).unwrap();
    eventually("pod 1's pins are removed", || {
        pins_are(&pin_dir, &pod1.host, &BTreeSet::new())
    });
    assert!(pod2.backends(30).unwrap().len() >= 2);
    eventually("/metrics counts the pods left", || {
        ensure!(attached(&bed.node, mode)? == base + 2);
        Ok(())
    });

    // Restarted while pod 2 connects in a loop: no connection attempt is lost. Pod 3's
    // veth is deleted while no agent runs: the restarted agent removes its pins.
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let errors = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            pod2.ns.run(|| {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(vip_http(), "/", Duration::from_secs(2)) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(format!("{e:#}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(agent.stop(), "the agent stops on SIGTERM");
        bed.node.ip(&["link", "del", &renamed]).unwrap();
        agent.restart().unwrap();
        wait_ready(&bed.node);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    assert_eq!(
        failed,
        0,
        "{ok} answered; failed: {:?}",
        errors.lock().unwrap()
    );
    assert!(ok > 10, "only {ok} connections during the restart");
    pins_are(&pin_dir, &pod2.host, &pins).unwrap();
    pins_are(&pin_dir, &renamed, &BTreeSet::new()).unwrap();
    pins_are(&pin_dir, &pod1.host, &BTreeSet::new()).unwrap();
    assert_eq!(attached(&bed.node, mode).unwrap(), base + 1);
    assert!(pod2.backends(30).unwrap().len() >= 2);

    // And the restarted agent follows new pods as well.
    let pod4 = Pod::new(&bed.node, 24, None).unwrap();
    pod4.wait_served().unwrap();
    drop(agent);
}

/// An interface with IPv4 forwarding off cannot pass balanced packets on: the agent says
/// so at attach time, `/metrics` counts it (`lb_interfaces_forwarding_off`) and
/// `/config_dump` shows it, so an operator finds why those clients' calls fail.
#[test]
fn interfaces_with_forwarding_off_are_reported() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(AttachMode::Tc).unwrap();
    let client_side = bed.interfaces[0].name.clone();
    bed.node
        .set_sysctl(&format!("net/ipv4/conf/{client_side}/forwarding"), "0")
        .unwrap();
    let dir = TempDir::new("lbfwd").unwrap();
    let config = dir.0.join("lb.yaml");
    write_atomically(&config, &topology::config_yaml(&[1, 2, 3], "")).unwrap();
    let _agent = AgentProcess::start_with(&bed, &config, &["--admin", ADMIN]).unwrap();
    wait_ready(&bed.node);
    let admin: SocketAddr = ADMIN.parse().unwrap();
    let get = |path: &str| {
        let (status, body) = bed
            .node
            .run(|| http_request(admin, "GET", path, &[], Duration::from_secs(2)))
            .unwrap();
        assert_eq!(status, 200, "{path}");
        body
    };
    assert!(
        get("/metrics").contains("lb_interfaces_forwarding_off 1\n"),
        "one interface with forwarding off"
    );
    let dump: serde_json::Value = serde_json::from_str(&get("/config_dump")).unwrap();
    let off: Vec<&str> = dump["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["ipv4_forwarding"] == false)
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(off, [client_side.as_str()], "{dump:#}");
}
