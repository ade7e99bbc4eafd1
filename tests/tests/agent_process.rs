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
