//! The sandbox `cargo xtask run` starts (`lb-demo`), run non-interactively with a script:
//! Istio's locality failover task with the `lb agent` binary, drained backend by backend
//! while a client calls the VIP 20 times a second. The summary must show the traffic
//! walking region1.zone1 → region1.zone2 → region2.zone3 with no failed call, and the run
//! must leave none of its namespaces or pinned maps behind.

use std::{
    collections::BTreeMap,
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{require_root, run_command};

/// Cargo builds the package's binaries for its integration tests, next to them.
const LB_DEMO: &str = env!("CARGO_BIN_EXE_lb-demo");

const LOCALITIES: [&str; 4] = [
    "region1.zone1",
    "region1.zone2",
    "region2.zone3",
    "region3.zone4",
];

fn netns_list() -> Vec<String> {
    run_command("ip", &["netns", "list"])
        .expect("ip netns list")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// One row of the summary: the phase's action and its calls per locality, then failed.
#[derive(Debug)]
struct PhaseRow {
    action: String,
    served: BTreeMap<String, u64>,
    failed: u64,
}

/// The rows of the summary table (phase 0, 1, ...; not the total).
fn summary_rows(out: &str) -> Vec<PhaseRow> {
    let mut lines = out
        .lines()
        .skip_while(|l| !l.starts_with("summary:"))
        .skip(1);
    let header: Vec<&str> = lines
        .next()
        .expect("a header after `summary:`")
        .split_whitespace()
        .collect();
    assert_eq!(header.last(), Some(&"failed"), "header {header:?}");
    let localities: Vec<&str> =
        header[header.len() - 1 - LOCALITIES.len()..header.len() - 1].to_vec();
    assert_eq!(localities, LOCALITIES, "header {header:?}");
    let mut rows = Vec::new();
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else { break };
        if first.parse::<usize>().is_err() {
            break;
        }
        assert_eq!(first.parse::<usize>().unwrap(), rows.len(), "{line}");
        let n = words.len();
        let numbers: Vec<u64> = words[n - 1 - LOCALITIES.len()..]
            .iter()
            .map(|w| w.parse().unwrap_or_else(|_| panic!("{w:?} in {line:?}")))
            .collect();
        rows.push(PhaseRow {
            // Between the phase number and the seconds.
            action: words[1..n - 2 - LOCALITIES.len()].join(" "),
            served: localities
                .iter()
                .zip(&numbers)
                .map(|(l, n)| (l.to_string(), *n))
                .collect(),
            failed: numbers[LOCALITIES.len()],
        });
    }
    rows
}

/// Every call of the phase was answered by `locality`, and there were enough of them
/// (2 s at 20 calls a second is 40).
fn assert_served_only_by(row: &PhaseRow, locality: &str) {
    let n = row.served[locality];
    assert!(
        n >= 20,
        "phase {:?}: only {n} calls served: {row:?}",
        row.action
    );
    for (other, m) in &row.served {
        if other != locality {
            assert_eq!(*m, 0, "phase {:?}: {other} answered: {row:?}", row.action);
        }
    }
    assert_eq!(
        row.failed, 0,
        "phase {:?}: failed calls: {row:?}",
        row.action
    );
}

#[test]
fn script_walks_the_seed_failover_and_cleans_up() {
    if !require_root() {
        return;
    }
    let before = netns_list();
    let mut child = Command::new(LB_DEMO)
        .args(["--script", "wait 2; drain 1; wait 2; drain 2; wait 2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {LB_DEMO}: {e}"));
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lb-demo did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap();
    println!("{out}");
    assert!(status.success(), "lb-demo exited with {status}");

    // The namespaces it made: named with its pid, listed when it starts.
    // As `lb_tests::unique_name` writes a pid.
    let marker = format!("-{}-", lb_tests::names::base36(pid));
    let made: Vec<String> = out
        .lines()
        .find_map(|l| l.strip_prefix("lb-demo: namespaces: "))
        .expect("lb-demo lists its namespaces")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(made.len(), 6, "client, node and 4 backends: {made:?}");
    for name in &made {
        assert!(
            name.contains(&marker),
            "{name} is not named after pid {pid}"
        );
        assert!(!before.contains(name), "{name} existed before the run");
    }

    // The view ran, and the summary shows the failover walking the seed's localities.
    assert!(out.contains("answering: region2.zone3"), "no view line");
    let rows = summary_rows(&out);
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["start", "drain 1", "drain 2"], "{rows:?}");
    assert_served_only_by(&rows[0], "region1.zone1");
    assert_served_only_by(&rows[1], "region1.zone2");
    assert_served_only_by(&rows[2], "region2.zone3");
    let failed = out
        .lines()
        .find_map(|l| l.strip_prefix("failed calls: "))
        .expect("a failed-calls line");
    assert!(failed.starts_with("0 of "), "failed calls: {failed}");

    // Nothing left behind: namespaces, the agent's pinned maps.
    let after = netns_list();
    let left: Vec<&String> = after
        .iter()
        .filter(|n| n.contains(&marker) && !before.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(&marker))
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "pinned maps left behind: {pins:?}");
}
