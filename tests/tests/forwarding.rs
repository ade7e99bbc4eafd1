//! lb forwards rewritten packets itself. XDP redirects them (XDP_REDIRECT) to the
//! interfaces that can take XDP frames and leaves the rest to the node's stack; the agent
//! keeps the list of those interfaces what the kernel says, as a veth's peer turns GRO on
//! and off. Both hooks reuse a destination's next hop while the node's routing stays as it
//! was, and not on a node whose routing a destination alone does not decide.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, ensure, Result};
use lb::dataplane::{xdp_targets, AttachMode, Dataplane, DataplaneOptions};
use lb_tests::{
    agent_process::{wait_until, write_atomically, AgentProcess, TempDir},
    clients::http_request,
    http_get, require_root,
    topology::{self, vip_http, TestBed},
    veth, Netns, DEFAULT_TIMEOUT,
};

const ADMIN: &str = "127.0.0.1:15000";

/// The test bed with `lb agent` running in its node, ready, its admin endpoint at
/// [`ADMIN`]. (Fields drop in order: the agent stops before the namespaces go.)
struct Balanced {
    _agent: AgentProcess,
    _dir: TempDir,
    bed: TestBed,
}

impl Balanced {
    fn start(mode: AttachMode, prefix: &str) -> Self {
        let bed = TestBed::new(mode).unwrap();
        let dir = TempDir::new(prefix).unwrap();
        let config = dir.0.join("lb.yaml");
        write_atomically(&config, &topology::config_yaml(&[1, 2, 3], "")).unwrap();
        let agent = AgentProcess::start_with(&bed, &config, &["--admin", ADMIN]).unwrap();
        let balanced = Self {
            _agent: agent,
            _dir: dir,
            bed,
        };
        wait_until(&balanced.bed.node, Duration::from_secs(20), || {
            balanced.get("/ready").map(drop)
        })
        .expect("the agent becomes ready");
        balanced
    }

    /// `GET path` on the admin endpoint: the body of a 200.
    fn get(&self, path: &str) -> Result<String> {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        match self
            .bed
            .node
            .run(|| http_request(admin, "GET", path, &[], Duration::from_secs(2)))?
        {
            (200, body) => Ok(body),
            (status, body) => bail!("{path}: {status} {body}"),
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/config_dump").unwrap()).unwrap()
    }

    /// One of lb's event counters, from `/metrics`.
    fn event(&self, name: &str) -> u64 {
        event(&self.get("/metrics").unwrap(), name)
    }

    /// `n` calls through the VIP, each answered by a backend.
    fn calls(&self, n: usize) {
        for i in 0..n {
            let answer = self
                .bed
                .client
                .run(|| http_get(vip_http(), "/", DEFAULT_TIMEOUT))
                .unwrap_or_else(|e| panic!("call {i} through the VIP: {e:#}"));
            assert!(answer.starts_with("backend-"), "{answer}");
        }
    }
}

/// A veth can take frames redirected to it only while its peer receives through NAPI (GRO
/// on, or an XDP program): the kernel's `xdp-features` say so, lb's listing follows, and
/// a data plane loaded then has it in its map.
#[test]
fn a_veth_takes_xdp_frames_only_while_its_peer_has_gro() {
    if !require_root() {
        return;
    }
    let a = Netns::new("xga").unwrap();
    let b = Netns::new("xgb").unwrap();
    let (a_if, b_if) = veth::link(&a, "x", "10.200.9.1/24", &b, "y", "10.200.9.2/24").unwrap();
    let a_index = a.ifindex(&a_if).unwrap();
    let is_target = || a.run(|| xdp_targets::list().unwrap().contains(&a_index));

    veth::set_gro(&b, &b_if, false).unwrap();
    assert!(!is_target(), "{a_if}: a target while its peer has no GRO");
    veth::set_gro(&b, &b_if, true).unwrap();
    assert!(is_target(), "{a_if}: not a target with GRO on its peer");
    let dp = a
        .run(|| Dataplane::load(&DataplaneOptions::default()))
        .unwrap();
    assert!(
        dp.xdp_targets().contains(&a_index),
        "a data plane loaded now redirects to {a_if}"
    );
    let devices = a.run(|| xdp_targets::devices().unwrap());
    assert!(
        devices
            .iter()
            .any(|d| d.name == a_if && d.ifindex == a_index && d.xdp_target),
        "{devices:?}"
    );
    veth::set_gro(&b, &b_if, false).unwrap();
    assert!(!is_target(), "{a_if}: still a target after GRO went off");
}

/// The node's count of datagrams its stack forwarded (`Ip: ForwDatagrams`).
fn forwarded_by_stack(node: &Netns) -> u64 {
    let snmp = node.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// One of lb's event counters, from `/metrics`.
fn event(metrics: &str, name: &str) -> u64 {
    let prefix = format!("lb_dataplane_events_total{{event=\"{name}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Through lb in XDP mode, the client's packets reach the backends without the node's
/// stack forwarding them (its forwarding counter stays still but for the first packets,
/// whose next hop is not resolved yet); when a backend's link can no longer take XDP
/// frames (its end's GRO off), the agent takes it out of the targets and its packets go
/// through the stack, counted, every call still answered; GRO on again, and XDP
/// redirects there again.
#[test]
fn xdp_redirects_to_backends_and_follows_their_links() {
    if !require_root() {
        return;
    }
    let lb = Balanced::start(AttachMode::Xdp, "lbxdp");
    let bed = &lb.bed;
    let targets = || -> Vec<String> {
        lb.config_dump()["xdp_redirect_targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    let backend_links: Vec<String> = bed.interfaces[1..=3]
        .iter()
        .map(|i| i.name.clone())
        .collect();
    for link in &backend_links {
        assert!(
            targets().contains(link),
            "{link} not a target: {:?}",
            targets()
        );
    }
    // Resolves each backend's neighbour entry (XDP cannot; the stack does).
    lb.calls(12);

    let (stack_before, metrics_before) =
        (forwarded_by_stack(&bed.node), lb.get("/metrics").unwrap());
    lb.calls(30);
    let (stack_after, metrics) = (forwarded_by_stack(&bed.node), lb.get("/metrics").unwrap());
    let fallbacks = event(&metrics, "event_stack_xdp_target")
        + event(&metrics, "event_stack_no_neigh")
        - event(&metrics_before, "event_stack_xdp_target")
        - event(&metrics_before, "event_stack_no_neigh");
    assert_eq!(fallbacks, 0, "every rewritten packet redirected");
    // 30 connections are at least 5 client packets each; the node's own ARP and the like
    // are not forwarded either.
    assert!(
        stack_after - stack_before < 5,
        "the stack forwarded {} datagrams during 30 calls through XDP",
        stack_after - stack_before
    );

    // Backend 1's end loses GRO: its link cannot take XDP frames any more.
    veth::set_gro(&bed.backends[0].ns, &bed.backends[0].ifname, false).unwrap();
    wait_until(&bed.node, Duration::from_secs(5), || {
        ensure!(!targets().contains(&backend_links[0]), "still a target");
        Ok(())
    })
    .expect("the agent takes the link out of the XDP targets");
    let before = lb.get("/metrics").unwrap();
    let stack_before = forwarded_by_stack(&bed.node);
    lb.calls(30);
    let metrics = lb.get("/metrics").unwrap();
    assert!(
        event(&metrics, "event_stack_xdp_target") > event(&before, "event_stack_xdp_target"),
        "packets to backend 1 counted as going through the stack"
    );
    assert!(
        forwarded_by_stack(&bed.node) - stack_before >= 5,
        "the stack forwarded backend 1's packets"
    );

    veth::set_gro(&bed.backends[0].ns, &bed.backends[0].ifname, true).unwrap();
    wait_until(&bed.node, Duration::from_secs(5), || {
        ensure!(targets().contains(&backend_links[0]), "not a target yet");
        Ok(())
    })
    .expect("the agent puts the link back in the XDP targets");
    let before = lb.event("event_stack_xdp_target");
    lb.calls(30);
    assert_eq!(
        lb.event("event_stack_xdp_target"),
        before,
        "every packet redirected again"
    );
}

/// The agent turns the next-hop cache on where a destination and an interface decide the
/// route, so balanced packets reuse their next hop (`event_nexthop_cached`), and off while
/// the node has a policy rule (routing by source, mark, ...), which it follows as it comes
/// and goes.
#[test]
fn the_nexthop_cache_follows_the_nodes_policy_rules() {
    if !require_root() {
        return;
    }
    let lb = Balanced::start(AttachMode::Tc, "lbnh");
    let bed = &lb.bed;
    let cache_on = || lb.config_dump()["nexthop_cache"].as_bool().unwrap();
    let wait_cache = |on: bool| {
        wait_until(&bed.node, Duration::from_secs(5), || {
            ensure!(cache_on() == on, "next-hop cache not {on} yet");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    };
    let cached_during = |n: usize| {
        let before = lb.event("event_nexthop_cached");
        lb.calls(n);
        lb.event("event_nexthop_cached") - before
    };
    wait_cache(true);
    assert!(cached_during(10) > 0, "packets reuse their next hop");

    bed.node
        .ip(&[
            "rule",
            "add",
            "from",
            "10.99.0.0/16",
            "table",
            "100",
            "priority",
            "100",
        ])
        .unwrap();
    wait_cache(false);
    assert_eq!(
        cached_during(10),
        0,
        "every packet looked up under a policy rule"
    );

    bed.node
        .ip(&[
            "rule",
            "del",
            "from",
            "10.99.0.0/16",
            "table",
            "100",
            "priority",
            "100",
        ])
        .unwrap();
    wait_cache(true);
    assert!(cached_during(10) > 0, "the cache is back without the rule");
}
