//! The agent's side at scale: publishing a large configuration from scratch, and an
//! ejection decision to its table being live in the kernel.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result};
use lb::dataplane::{DataplaneOptions, Frontend, Protocol};

/// The agent's side: how long publishing a large configuration from scratch takes, and
/// how long from an ejection decision to the new table being live in the kernel.
pub fn run(services: usize, endpoints: usize) -> Result<String> {
    let mut md = String::new();
    use lb::{
        agent::Agent,
        config::Config,
        model::{
            Endpoint, Failover, Locality, LocalityLbSetting, Node, OutlierDetection, Service,
            TrafficPolicy,
        },
        outlier::Event,
    };
    let localities = [
        "region1/zone1",
        "region1/zone2",
        "region2/zone3",
        "region3/zone4",
    ];
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
    };
    let svcs: Vec<Service> = (0..services)
        .map(|i| Service {
            name: format!("svc-{i}"),
            frontend: Frontend {
                vip: Ipv4Addr::from(0x0a60_0000 + i as u32),
                port: 80,
                protocol: Protocol::Tcp,
            },
            endpoints: (0..endpoints)
                .map(|j| Endpoint {
                    address: Ipv4Addr::from(0x0ac8_0000 + (i * endpoints + j) as u32),
                    port: 8080,
                    locality: Locality::parse(localities[j % localities.len()]),
                    labels: Default::default(),
                    weight: 1,
                })
                .collect(),
            policy: policy.clone(),
            http: false,
        })
        .collect();
    let dataplane = DataplaneOptions {
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
        dataplane: dataplane.clone(),
        node: node.clone(),
        ..Default::default()
    };
    let full = Config {
        dataplane,
        node,
        services: svcs.clone(),
        ..Default::default()
    };
    let mut agent = Agent::start(empty, &[], None)?;
    let t = Instant::now();
    agent.reload(full)?;
    let from_scratch = t.elapsed();

    // Eject the first endpoint (region1/zone1, priority 0) of services in turn.
    let mut latencies = Vec::new();
    for svc in svcs.iter().take(100) {
        let e = &svc.endpoints[0];
        let frontend = format!("{}:80", svc.frontend.vip);
        agent.record(
            std::net::SocketAddrV4::new(e.address, e.port),
            Some(&frontend),
            Event::HttpStatus(503),
        )?;
        latencies.push(agent.last_publish.context("no publish")?.as_micros() as u64);
    }
    latencies.sort_unstable();
    emit!(md, "");
    emit!(md, "control plane ({services} services x {endpoints} endpoints, 4 localities, failover, outlier detection)");
    emit!(md, "");
    emit!(md, "| measurement | figure |");
    emit!(md, "| --- | ---: |");
    emit!(
        md,
        "| publish every service from scratch (plans, Maglev tables, map writes) | {:.0} ms |",
        from_scratch.as_secs_f64() * 1000.0
    );
    emit!(
        md,
        "| ejection decision to new table live, median of 100 | {} µs |",
        latencies[latencies.len() / 2]
    );
    emit!(
        md,
        "| ejection decision to new table live, max of 100 | {} µs |",
        latencies[latencies.len() - 1]
    );
    Ok(md)
}
