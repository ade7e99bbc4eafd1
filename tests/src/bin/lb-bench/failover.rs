//! Failover end to end: a refused connection re-steered to the next backend, what the
//! client sees and how soon the agent's table avoids the refusing backend.

use std::time::Instant;

use anyhow::{Context as _, Result};

/// The admin endpoint of the agent in the failover measurements (in the node namespace).
const ADMIN: &str = "127.0.0.1:15000";
/// The service's port in the failover measurements (backends listen on 8080).
const FAILOVER_PORT: u16 = lb_tests::seed::HELLO_PORT;

/// The test bed's two backends: (name they answer with, locality).
const FAILOVER_BACKENDS: [(&str, &str); 2] = [
    ("region1.zone1", "region1/zone1"),
    ("region1.zone2", "region1/zone2"),
];

/// The agent's configuration: the seed's node (region1/zone1) and ServiceEntry with one
/// endpoint per test-bed backend, and a DestinationRule whose outlier detection ejects at
/// the first failure and may eject every endpoint.
fn failover_config() -> String {
    use lb_tests::seed::{service_entry, HOST, NODE};
    let endpoints: Vec<(u8, String)> = (1u8..)
        .zip(FAILOVER_BACKENDS)
        .map(|(i, (_, locality))| (i, locality.to_string()))
        .collect();
    format!(
        r#"{NODE}---
{}---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: failover-bench
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
      maxEjectionPercent: 100
"#,
        service_entry(&endpoints)
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

/// The seed's HelloWorld answer of the backend in `region`/`zone`.
fn hello(region: &str, zone: &str) -> String {
    format!("Hello version: {region}.{zone}, instance: helloworld-{region}-{zone}")
}

/// The locality (`region1.zone1`) a HelloWorld answer names, or the answer itself.
fn answered_by(answer: &str) -> String {
    answer
        .strip_prefix("Hello version: ")
        .and_then(|rest| rest.split(',').next())
        .unwrap_or(answer)
        .to_string()
}

/// One call of the timeline's client, with its error.
struct Call {
    at_ms: f64,
    /// When the call ended, in ms from the start.
    end_ms: f64,
    answer: std::result::Result<String, String>,
}

/// How long the timeline's client waits for one call (connect and answer): a call that
/// long is a failure, and the timeline moves on.
const TIMELINE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Istio's locality failover task, recorded call by call: the seed's HelloWorld in four
/// localities (backend `i` at `10.200.i.2`), the node and its client at region1/zone1,
/// the seed's ServiceEntry and DestinationRule verbatim (as the `seed_task_exactly_tc`
/// test runs them), lb attached in TC mode, the `lb agent` binary. A client in the
/// client namespace calls the VIP on a new connection per call, back to back, for the
/// whole run. After `steady`, region1.zone1 is drained (its listener closed, so its kernel
/// refuses connections: `HttpNameServer::stop`), then region1.zone2 `interval` later, then
/// region2.zone3 another `interval` later; the run ends `interval` after the last drain.
/// Every call (start, who answered or that it failed) and each drain moment (when the
/// drain began) are recorded.
pub fn timeline(
    steady: std::time::Duration,
    interval: std::time::Duration,
) -> Result<(String, crate::results::Timeline)> {
    use std::{
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
        time::Duration,
    };

    use lb::dataplane::AttachMode;
    use lb_tests::{
        agent_process::{lb_binary, write_atomically, AgentProcess, TempDir},
        http_get,
        seed::{self, service_entry, DESTINATION_RULE, HELLO_PORT, LOCALITIES, NODE},
        topology::{backend_addr, TestBed, BACKEND_HTTP_PORT, VIP},
        DEFAULT_TIMEOUT,
    };

    use crate::results::{Timeline, TimelineCall};

    let mut md = String::new();
    let started = Instant::now();
    let lb = lb_binary().context("the failover timeline runs the agent (or pass --no-failover)")?;
    let localities: Vec<String> = LOCALITIES.iter().map(|(r, z)| format!("{r}.{z}")).collect();
    let names: Vec<String> = LOCALITIES.iter().map(|(r, z)| hello(r, z)).collect();
    let mut bed = TestBed::with_backends(AttachMode::Tc, &names)?;
    let dir = TempDir::new("lbtimeline")?;
    let config = dir.0.join("helloworld.yaml");
    write_atomically(
        &config,
        &format!(
            "{NODE}---\n{}---\n{DESTINATION_RULE}",
            service_entry(&seed::endpoints())
        ),
    )?;
    let mut agent = AgentProcess::start_with(&bed, &config, &["--admin", ADMIN])?;
    let vip = std::net::SocketAddr::from((VIP, HELLO_PORT));

    // The VIP answers from region1.zone1 (priority 0) and the admin endpoint is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = bed.client.run(|| http_get(vip, "/", DEFAULT_TIMEOUT));
        let admin = bed.node.run(admin_view);
        match (ready, admin) {
            (Ok(name), Ok(_)) if name == names[0] => break,
            (ready, admin) if Instant::now() > deadline => anyhow::bail!(
                "the agent did not program the VIP or serve its admin endpoint: call \
                 {ready:?}, admin {:?}",
                admin.map(|_| ())
            ),
            _ => {}
        }
        anyhow::ensure!(agent.running(), "the agent exited");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The client: back to back, one new connection per call, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let client = bed.client.spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut calls = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let at = t0.elapsed();
                let answer =
                    http_get(vip, "/", TIMELINE_CALL_TIMEOUT).map_err(|e| format!("{e:#}"));
                calls.push(Call {
                    at_ms: at.as_secs_f64() * 1000.0,
                    end_ms: t0.elapsed().as_secs_f64() * 1000.0,
                    answer,
                });
            }
            calls
        }
    })?;
    // The drains, each at its moment: (began, ended) in ms from the start.
    let mut drains: Vec<(f64, f64)> = Vec::new();
    let sleep_until = |at: Duration| {
        if let Some(left) = at.checked_sub(t0.elapsed()) {
            std::thread::sleep(left);
        }
    };
    for i in 0..3 {
        sleep_until(steady + interval * i as u32);
        let began = t0.elapsed().as_secs_f64() * 1000.0;
        bed.backends[i].http.stop();
        drains.push((began, t0.elapsed().as_secs_f64() * 1000.0));
    }
    sleep_until(steady + interval * 3);
    stop.store(true, Ordering::Relaxed);
    let calls = client
        .join()
        .map_err(|_| anyhow::anyhow!("the timeline's client panicked"))?;
    let run_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Which drained endpoints outlier detection ejected (the seed's rule allows 10%: one
    // of the four), the others being re-steered in the kernel call by call.
    let view = bed.node.run(admin_view)?;
    let ejected: Vec<bool> = (1u8..=3)
        .map(|i| shown_ejected(&view, &format!("{}:{BACKEND_HTTP_PORT}", backend_addr(i))))
        .collect::<Result<_>>()?;
    anyhow::ensure!(agent.running(), "the agent exited during the timeline");
    drop(agent);
    drop(bed);

    let timeline = Timeline {
        calls: calls
            .iter()
            .map(|c| TimelineCall {
                at_ms: c.at_ms,
                served_by: c.answer.as_ref().ok().map(|a| answered_by(a)),
            })
            .collect(),
        drains: drains
            .iter()
            .zip(&localities)
            .map(|(&(began, _), l)| (began, l.clone()))
            .collect(),
        localities: localities.clone(),
    };
    let served = |c: &Call| c.answer.as_ref().ok().map(|a| answered_by(a));

    emit!(md, "");
    emit!(
        md,
        "failover timeline (Istio's locality failover task: HelloWorld in {}; node and client \
         at region1/zone1; the seed's DestinationRule verbatim; TC; agent {}; one client \
         calling the VIP back to back, a new connection per call; a drain closes the \
         backend's listener, so its kernel refuses connections)",
        localities.join(", "),
        lb.display()
    );
    emit!(md, "");
    emit!(
        md,
        "| interval | calls | failed | cut by the drain | served by the next locality | first call served by the next locality, after the drain | call p50 / p99 | drained endpoint ejected at the end |"
    );
    emit!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    // A failed call that overlapped a drain (started before `stop` returned, ended after
    // it began) was cut by the server closing the connections it had accepted: the client
    // saw it fail, but no balancer could have saved it. It is counted apart, at its drain.
    let cut_by = |c: &Call| {
        if c.answer.is_ok() {
            return None;
        }
        drains
            .iter()
            .position(|&(began, ended)| c.at_ms < ended && c.end_ms >= began)
    };
    let durations = |v: &[&Call]| -> String {
        let mut us: Vec<u64> = v
            .iter()
            .map(|c| ((c.end_ms - c.at_ms) * 1000.0) as u64)
            .collect();
        if us.is_empty() {
            return "-".into();
        }
        us.sort_unstable();
        let ms = |p| rank(&us, p) as f64 / 1000.0;
        format!("{:.2} / {:.2} ms", ms(50), ms(99))
    };
    let mut bounds = vec![(0.0, drains[0].0)];
    for (k, &(began, _)) in drains.iter().enumerate() {
        bounds.push((began, drains.get(k + 1).map_or(run_ms, |d| d.0)));
    }
    let (mut failed_total, mut cut_total) = (0, 0);
    for (k, &(from, until)) in bounds.iter().enumerate() {
        let in_interval: Vec<&Call> = calls
            .iter()
            .filter(|c| c.at_ms >= from && c.at_ms < until)
            .collect();
        let failed = in_interval
            .iter()
            .filter(|c| c.answer.is_err() && cut_by(c).is_none())
            .count();
        failed_total += failed;
        if k == 0 {
            emit!(
                md,
                "| steady, 0 to {until:.0} ms: {} serving | {} | {failed} | - | - | - | {} | - |",
                localities[0],
                in_interval.len(),
                durations(&in_interval)
            );
            continue;
        }
        let drain = k - 1;
        let (began, ended) = drains[drain];
        let next = &localities[k];
        let cut = calls.iter().filter(|c| cut_by(c) == Some(drain)).count();
        cut_total += cut;
        let by_next = in_interval
            .iter()
            .filter(|c| served(c).as_deref() == Some(next.as_str()))
            .count();
        let first = in_interval
            .iter()
            .find(|c| served(c).as_deref() == Some(next.as_str()))
            .map_or("never".to_string(), |c| {
                format!("{:.2} ms", c.at_ms - began)
            });
        emit!(
            md,
            "| {} drained at {began:.0} ms (closing took {:.2} ms), to {until:.0} ms: {next} next | {} | {failed} | {cut} | {by_next} | {first} | {} | {} |",
            localities[drain],
            ended - began,
            in_interval.len(),
            durations(&in_interval),
            if ejected[drain] { "yes" } else { "no: re-steered in the kernel, call by call" }
        );
    }
    let all: Vec<&Call> = calls.iter().collect();
    emit!(
        md,
        "| total, 0 to {run_ms:.0} ms | {} | {failed_total} | {cut_total} | | | {} | |",
        calls.len(),
        durations(&all)
    );
    emit!(md, "");
    emit!(
        md,
        "timeline measured in {:.1} s (test bed and agent start included)",
        started.elapsed().as_secs_f64()
    );
    for c in calls.iter().filter(|c| c.answer.is_err()).take(5) {
        println!(
            "  failed call at {:.2} ms: {}",
            c.at_ms,
            c.answer.as_ref().err().map_or("", |e| e.as_str())
        );
    }
    Ok((md, timeline))
}
