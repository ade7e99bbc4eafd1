//! The `lb agent` binary as an operator runs it: its configuration file is watched, a
//! change is applied while traffic flows, and a configuration that is invalid or does not
//! fit is refused with the last good one kept running.

use std::{collections::BTreeSet, time::Duration};

use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{wait_until, write_atomically, AgentProcess, TempDir},
    http_get, names_from, require_root,
    topology::{self, backend_name, vip_http, TestBed},
    DEFAULT_TIMEOUT,
};

fn names_seen(bed: &TestBed, requests: usize) -> BTreeSet<String> {
    names_from(&bed.client, vip_http(), requests)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn bad_reloads_keep_the_last_good_configuration() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(AttachMode::Tc).unwrap();
    let dir = TempDir::new("lbcfg").unwrap();
    let config = dir.0.join("lb.yaml");
    write_atomically(&config, &topology::config_yaml(&[1, 2, 3], "")).unwrap();
    let mut agent = AgentProcess::start(&bed, &config).unwrap();
    wait_until(&bed.client, Duration::from_secs(20), || {
        http_get(vip_http(), "/", Duration::from_millis(500))
    })
    .expect("the agent programs the VIP");
    let all: BTreeSet<String> = (1..=3).map(backend_name).collect();
    assert_eq!(names_seen(&bed, 60), all);

    // Not YAML, then a value that is invalid, then more services than the data plane was
    // loaded for: each is refused and traffic keeps using all three backends.
    let too_many: String = (0..300)
        .map(|i| {
            format!(
                "  - {{ name: s{i}, vip: 10.96.1.{}, port: {} }}\n",
                i % 250,
                1000 + i
            )
        })
        .collect();
    for bad in [
        "services: [ {".to_string(),
        topology::config_yaml(&[2, 3], "").replace("protocol: UDP", "protocol: SCTP"),
        format!("dataplane:\n  max_services: 256\nservices:\n{too_many}"),
    ] {
        write_atomically(&config, &bad).unwrap();
        // The agent checks the file every second.
        std::thread::sleep(Duration::from_millis(2500));
        assert!(agent.running(), "the agent survived a bad configuration");
        assert_eq!(
            names_seen(&bed, 60),
            all,
            "the last good configuration still runs"
        );
    }

    // A good change is applied: backend-1 leaves the service.
    write_atomically(&config, &topology::config_yaml(&[2, 3], "")).unwrap();
    let rest: BTreeSet<String> = [2, 3].into_iter().map(backend_name).collect();
    wait_until(&bed.client, Duration::from_secs(10), || {
        let seen: BTreeSet<String> = (0..30)
            .map(|_| http_get(vip_http(), "/", DEFAULT_TIMEOUT))
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(seen == rest, "still seeing {seen:?}");
        Ok(())
    })
    .expect("the new configuration takes effect");
}

/// A reload beyond what the data plane was loaded for, or with a VIP that is one of the
/// node's own addresses, is refused with an error that names the field
/// (`dataplane.max_services`, `dataplane.max_backends`, `dataplane.table_slots`, `vip`),
/// through `POST /reload` of the running agent; the configuration in force stays.
#[test]
fn reloads_beyond_capacity_or_onto_a_node_address_are_refused_naming_the_field() {
    if !require_root() {
        return;
    }
    const ADMIN: &str = "127.0.0.1:15001";
    // Loaded with room for 3 services (one id is reserved), 15 backends, and 24 table
    // slots per service (40 minus the failover list's 16).
    let sizes = "  max_services: 4\n  max_backends: 16\n  table_slots: 40\n";
    let bed = TestBed::new(AttachMode::Tc).unwrap();
    let dir = TempDir::new("lbcfg").unwrap();
    let config = dir.0.join("lb.yaml");
    let good = topology::config_yaml(&[1, 2, 3], sizes);
    write_atomically(&config, &good).unwrap();
    let agent = AgentProcess::start_with(&bed, &config, &["--admin", ADMIN]).unwrap();
    wait_until(&bed.client, Duration::from_secs(20), || {
        http_get(vip_http(), "/", Duration::from_millis(500))
    })
    .expect("the agent programs the VIP");
    let all: BTreeSet<String> = (1..=3).map(backend_name).collect();

    let service = |name: &str, vip: &str, port: u16, backends: usize| -> String {
        let list: String = (0..backends)
            .map(|i| {
                format!(
                    "      - {{ address: 10.201.{}.{}, port: 80 }}\n",
                    i / 200,
                    i % 200 + 1
                )
            })
            .collect();
        format!("  - name: {name}\n    vip: {vip}\n    port: {port}\n    backends:\n{list}")
    };
    let cases = [
        (
            format!(
                "{good}{}{}",
                service("s3", "10.96.0.11", 80, 1),
                service("s4", "10.96.0.12", 80, 1)
            ),
            "4 services do not fit dataplane.max_services = 4",
        ),
        (
            format!("{good}{}", service("many", "10.96.0.11", 80, 12)),
            "18 backends do not fit dataplane.max_backends = 16",
        ),
        (
            format!("{good}{}", service("wide", "10.96.0.11", 80, 25)),
            "service wide (10.96.0.11:80/TCP): backends (ServiceEntry spec.endpoints): 25 \
             backends do not fit dataplane.table_slots = 40",
        ),
        (
            format!("{good}{}", service("node", "10.200.0.1", 80, 1)),
            "service node (10.200.0.1:80/TCP): vip (ServiceEntry spec.addresses): 10.200.0.1 \
             is an address of this node",
        ),
    ];
    let token = std::fs::read_to_string(&agent.admin_token_file)
        .unwrap()
        .trim()
        .to_string();
    let admin: std::net::SocketAddr = ADMIN.parse().unwrap();
    for (text, expected) in &cases {
        write_atomically(&config, text).unwrap();
        let (status, body) = bed
            .node
            .run(|| {
                lb_tests::clients::http_request(
                    admin,
                    "POST",
                    "/reload",
                    &[("x-lb-token", &token)],
                    DEFAULT_TIMEOUT,
                )
            })
            .unwrap();
        assert_eq!(status, 422, "{expected}: {body}");
        assert!(body.contains(expected), "expected {expected:?} in: {body}");
        assert_eq!(
            names_seen(&bed, 30),
            all,
            "the last good configuration still runs"
        );
    }
    // The good configuration still loads.
    write_atomically(&config, &good).unwrap();
    let (status, body) = bed
        .node
        .run(|| {
            lb_tests::clients::http_request(
                admin,
                "POST",
                "/reload",
                &[("x-lb-token", &token)],
                DEFAULT_TIMEOUT,
            )
        })
        .unwrap();
    assert_eq!(status, 200, "{body}");
    drop(agent);
}
