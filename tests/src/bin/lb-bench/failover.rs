//! Failover end to end: a refused connection re-steered to the next backend, what the
//! client sees and how soon the agent's table avoids the refusing backend.

use std::time::Instant;

use anyhow::{Context as _, Result};

/// The admin endpoint of the agent in the failover measurements (in the node namespace).
const ADMIN: &str = "127.0.0.1:15000";
/// The service's port in the failover measurements (backends listen on 8080).
const FAILOVER_PORT: u16 = 5000;

/// The test bed's two backends: (name they answer with, locality).
const FAILOVER_BACKENDS: [(&str, &str); 2] = [
    ("region1.zone1", "region1/zone1"),
    ("region1.zone2", "region1/zone2"),
];

/// The agent's configuration: the node at region1/zone1, a ServiceEntry with one endpoint
/// per locality, and a DestinationRule whose outlier detection ejects at the first
/// failure and may eject every endpoint.
fn failover_config() -> String {
    use lb_tests::topology::{backend_addr, BACKEND_HTTP_PORT, VIP};
    let endpoints: String = (1u8..)
        .zip(FAILOVER_BACKENDS)
        .map(|(i, (_, locality))| {
            format!(
                "  - address: {}\n    locality: {locality}\n",
                backend_addr(i)
            )
        })
        .collect();
    format!(
        r#"apiVersion: lb/v1alpha1
kind: Node
spec:
  locality: region1/zone1
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: failover-bench
spec:
  hosts:
  - failover-bench.bench.svc.cluster.local
  addresses:
  - {VIP}
  ports:
  - number: {FAILOVER_PORT}
    name: http
    protocol: HTTP
    targetPort: {BACKEND_HTTP_PORT}
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: failover-bench
spec:
  host: failover-bench.bench.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
      maxEjectionPercent: 100
"#
    )
}

/// From the node: the agent's `GET /services`.
fn admin_view() -> Result<String> {
    lb_tests::http_get(ADMIN.parse()?, "/services", lb_tests::DEFAULT_TIMEOUT)
}

/// Whether the admin view shows `endpoint` (`IP:PORT`) as ejected. Endpoint entries hold
/// no nested objects: an entry ends at the next `}`.
fn shown_ejected(view: &str, endpoint: &str) -> Result<bool> {
    let at = view
        .find(&format!("\"address\":\"{endpoint}\""))
        .with_context(|| format!("{endpoint} not in the admin view {view}"))?;
    let end = view[at..].find('}').map_or(view.len(), |e| at + e);
    Ok(view[at..end].contains("\"ejected\":true"))
}

/// The agent's `failover_reaction` summary (`count`, `p50_us`, `p99_us`, `max_us`; the
/// percentiles are `null` before the first failover).
#[derive(Debug, Clone, Copy)]
struct Reaction {
    count: u64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
}

fn reaction(view: &str) -> Result<Reaction> {
    let at = view
        .find("\"failover_reaction\":{")
        .with_context(|| format!("no failover_reaction in the admin view {view}"))?;
    let obj = &view[at..];
    let obj = &obj[..obj.find('}').map_or(obj.len(), |e| e + 1)];
    let number = |key: &str| -> Option<u64> {
        let rest = &obj[obj.find(&format!("\"{key}\":"))? + key.len() + 3..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Ok(Reaction {
        count: number("count").with_context(|| format!("no count in {obj}"))?,
        p50_us: number("p50_us"),
        p99_us: number("p99_us"),
        max_us: number("max_us"),
    })
}

/// Nearest-rank percentile of sorted `v` (as the agent computes its own).
fn rank(v: &[u64], p: usize) -> u64 {
    v[(v.len() * p).div_ceil(100).max(1) - 1]
}

/// Failover end to end, as a client sees it and as the agent measures it. A test bed (client,
/// node running the `lb agent` binary, two backends at region1/zone1 and region1/zone2,
/// the node at region1/zone1) where backend 1's listener is closed, so its kernel refuses
/// connections with RST. Each trial un-ejects backend 1 (admin API; the answer comes back
/// when the tables are live), so the next new connection is sent to it; lb sees the refusal,
/// re-sends the client's SYN to backend 2 and reports the failure, and outlier detection
/// ejects backend 1 again. A trial counts as re-steered when backend 2 answered the call
/// and the agent recorded exactly one more failover (backend 1 refused that call's SYN).
/// Each trial then makes a baseline call with backend 1 ejected, which goes straight to
/// backend 2: interleaved, so both kinds of calls see the same machine.
pub fn run(trials: usize) -> Result<String> {
    let mut md = String::new();
    use std::time::Duration;

    use lb::dataplane::AttachMode;
    use lb_tests::{
        agent_process::{lb_binary, write_atomically, AgentProcess, TempDir},
        clients::http_post_with,
        http_get,
        topology::{backend_addr, TestBed, BACKEND_HTTP_PORT, VIP},
        DEFAULT_TIMEOUT,
    };

    let trials = trials.max(1);
    let started = Instant::now();
    let lb =
        lb_binary().context("the failover measurements run the agent (or pass --no-failover)")?;
    let names: Vec<String> = FAILOVER_BACKENDS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    let mut bed = TestBed::with_backends(AttachMode::Tc, &names)?;
    let dir = TempDir::new("lbbench")?;
    let config = dir.0.join("failover.yaml");
    write_atomically(&config, &failover_config())?;
    let mut agent = AgentProcess::start_with(&bed, &config, &["--admin", ADMIN])?;
    let vip = std::net::SocketAddr::from((VIP, FAILOVER_PORT));
    let (zone1, zone2) = (FAILOVER_BACKENDS[0].0, FAILOVER_BACKENDS[1].0);
    let endpoint1 = format!("{}:{BACKEND_HTTP_PORT}", backend_addr(1));

    // The VIP answers from backend 1 (priority 0) and the admin endpoint is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = bed.client.run(|| http_get(vip, "/", DEFAULT_TIMEOUT));
        let admin = bed.node.run(admin_view);
        match (ready, admin) {
            (Ok(name), Ok(_)) if name == zone1 => break,
            (ready, admin) if Instant::now() > deadline => {
                anyhow::bail!(
                    "the agent did not program the VIP or serve its admin endpoint: \
                     call {ready:?}, admin {:?}",
                    admin.map(|_| ())
                )
            }
            _ => {}
        }
        anyhow::ensure!(agent.running(), "the agent exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    bed.backends[0].http.stop();

    let uneject = format!("/endpoints/{endpoint1}/uneject");
    let admin: std::net::SocketAddr = ADMIN.parse()?;
    // One call from the client namespace: its duration (connect to the last byte of the
    // response, timed in the namespace's thread) and who answered.
    let call = || {
        bed.client.run(|| {
            let t = Instant::now();
            let answer = http_get(vip, "/", DEFAULT_TIMEOUT);
            (answer, t.elapsed())
        })
    };
    let mut resteered_us = Vec::with_capacity(trials);
    let mut baseline_us = Vec::with_capacity(trials);
    let (mut failed, mut baseline_failed) = (0, 0);
    // No failover yet (backend 1 served until now): the agent's summary will cover the
    // trials' failovers only.
    let mut reactions = bed.node.run(admin_view).and_then(|v| reaction(&v))?.count;
    anyhow::ensure!(
        reactions == 0,
        "{reactions} failover(s) before the first trial"
    );
    // Mutating admin calls carry the token the agent wrote.
    let token = std::fs::read_to_string(&agent.admin_token_file)
        .context("reading the agent's admin token")?;
    let token = token.trim();
    for trial in 1..=trials {
        let answer = bed
            .node
            .run(|| http_post_with(admin, &uneject, &[("x-lb-token", token)], DEFAULT_TIMEOUT))
            .with_context(|| format!("trial {trial}: un-ejecting backend 1"))?;
        anyhow::ensure!(
            answer.contains("1 endpoint(s)"),
            "trial {trial}: un-eject answered {answer:?}"
        );
        let (answer, took) = call();
        // Backend 1 ejected again, by a failover the agent measured: the kernel saw the
        // refusal. Waits for it, so the baseline call and the next trial start from there.
        let seen = bed.node.run(|| -> Result<Option<u64>> {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let view = admin_view()?;
                let count = reaction(&view)?.count;
                if shown_ejected(&view, &endpoint1)? && count > reactions {
                    return Ok(Some(count));
                }
                if Instant::now() > deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })?;
        let resteered = seen == Some(reactions + 1);
        match &answer {
            Ok(name) if name == zone2 && resteered => resteered_us.push(took.as_micros() as u64),
            // Served, but more than one failover: not counted as a confirmed re-steer.
            Ok(name) if name == zone2 => {}
            Ok(name) => anyhow::bail!("trial {trial}: answered by {name:?}, its listener closed"),
            Err(_) => failed += 1,
        }
        match seen {
            Some(count) => reactions = count,
            None => anyhow::bail!(
                "trial {trial}: backend 1 not ejected again within 2 s (call: {answer:?})"
            ),
        }
        let (answer, took) = call();
        match answer {
            Ok(name) if name == zone2 => baseline_us.push(took.as_micros() as u64),
            Ok(name) => anyhow::bail!("trial {trial}: baseline call answered by {name:?}"),
            Err(_) => baseline_failed += 1,
        }
    }
    let view = bed.node.run(admin_view)?;
    let summary = reaction(&view)?;
    anyhow::ensure!(
        summary.count == reactions,
        "the baseline calls caused failovers: {} recorded, {reactions} after the last trial",
        summary.count
    );
    anyhow::ensure!(agent.running(), "the agent exited during the measurements");
    drop(agent);
    drop(bed);
    anyhow::ensure!(
        !resteered_us.is_empty() && !baseline_us.is_empty(),
        "no successful call to measure: {failed} re-steered and {baseline_failed} baseline \
         calls failed"
    );
    resteered_us.sort_unstable();
    baseline_us.sort_unstable();
    let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} µs"));

    emit!(md, "");
    emit!(
        md,
        "failover (2 backends: region1/zone1, region1/zone2; node at region1/zone1; TC; \
         backend 1's listener closed, so its kernel refuses with RST; {trials} trials: \
         un-eject backend 1, one call on a new connection; agent {})",
        lb.display()
    );
    emit!(md, "");
    emit!(md, "| measurement | figure |");
    emit!(md, "| --- | ---: |");
    emit!(
        md,
        "| failed client calls (re-steered) | {failed} of {trials} |"
    );
    emit!(
        md,
        "| re-steers confirmed (backend 2 answered, backend 1's refusal ejected it) | {} of {trials} |",
        resteered_us.len()
    );
    emit!(
        md,
        "| agent failover reaction (kernel's signal to table live), count | {} |",
        summary.count
    );
    emit!(
        md,
        "| agent failover reaction, p50 | {} |",
        us(summary.p50_us)
    );
    emit!(
        md,
        "| agent failover reaction, p99 | {} |",
        us(summary.p99_us)
    );
    emit!(
        md,
        "| agent failover reaction, max | {} |",
        us(summary.max_us)
    );
    for (p, label) in [(50, "p50"), (99, "p99")] {
        let (r, b) = (rank(&resteered_us, p), rank(&baseline_us, p));
        emit!(md, "| client call re-steered (refused by backend 1, served by backend 2), {label} | {r} µs |");
        emit!(
            md,
            "| client call straight to backend 2 (backend 1 ejected), {label} | {b} µs |"
        );
        emit!(
            md,
            "| re-steered / straight, {label} | {:.2} |",
            r as f64 / b as f64
        );
    }
    if baseline_failed > 0 {
        emit!(
            md,
            "| failed client calls (straight) | {baseline_failed} of {trials} |"
        );
    }
    emit!(md, "");
    emit!(
        md,
        "failover measured in {:.1} s (test bed and agent start included)",
        started.elapsed().as_secs_f64()
    );
    Ok(md)
}
