//! The test Kubernetes API server (lb_tests::apiserver): what the agent reads (Nodes,
//! Services, EndpointSlices, Istio DestinationRules through their CRD) round-trips through
//! it, label selectors and watches work, and objects outlive an apiserver restart.

use std::thread;

use anyhow::{ensure, Context as _, Result};
use lb_tests::apiserver::{skip_reason, TestApiServer};
use serde_json::Value;

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    topology.kubernetes.io/region: region1
    topology.kubernetes.io/zone: zone1
"#;

// No defaulting on the test server: clusterIP, protocol and targetPort are set here.
const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels: {app: web}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080}
"#;

const ENDPOINT_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: [10.200.1.2]
  nodeName: node-a
  zone: zone1
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.200.2.2]
  nodeName: node-b
  zone: zone2
  conditions: {ready: false, serving: true, terminating: true}
"#;

const DESTINATION_RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
  namespace: default
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        failover:
        - {from: region1, to: region2}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 1m
"#;

/// Starts the server, or says why the test is skipped.
fn start() -> Result<Option<TestApiServer>> {
    if let Some(why) = skip_reason() {
        lb_tests::report_skip(&why);
        return Ok(None);
    }
    Ok(Some(TestApiServer::start()?))
}

fn get_json(k8s: &TestApiServer, args: &[&str]) -> Result<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = k8s.kubectl(&all)?;
    serde_json::from_str(&out).with_context(|| format!("kubectl {all:?} printed no JSON: {out}"))
}

/// The fields every stored object gets from the server, as a real one sets them.
fn check_server_metadata(object: &Value, generation: Option<i64>) -> Result<()> {
    let meta = &object["metadata"];
    ensure!(
        meta["resourceVersion"]
            .as_str()
            .is_some_and(|rv| rv.parse::<u64>().is_ok_and(|n| n > 0)),
        "resourceVersion: {meta}"
    );
    ensure!(
        meta["uid"].as_str().is_some_and(|u| u.len() == 36),
        "uid: {meta}"
    );
    ensure!(
        meta["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "creationTimestamp: {meta}"
    );
    ensure!(
        meta["generation"].as_i64() == generation,
        "generation {:?}, expected {generation:?}: {meta}",
        meta["generation"]
    );
    Ok(())
}

#[test]
fn objects_round_trip_and_label_selectors_select() -> Result<()> {
    let Some(k8s) = start()? else { return Ok(()) };
    k8s.apply_yaml(NODE)?;
    k8s.apply_yaml(SERVICE)?;
    k8s.apply_yaml(ENDPOINT_SLICE)?;
    k8s.install_istio_crds()?;
    k8s.apply_yaml(DESTINATION_RULE)?;

    let node = get_json(&k8s, &["node", "node-a"])?;
    check_server_metadata(&node, None)?;
    assert_eq!(
        node["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "zone1"
    );
    assert_eq!(
        node["metadata"]["labels"]["topology.kubernetes.io/region"],
        "region1"
    );

    let service = get_json(&k8s, &["service", "web"])?;
    check_server_metadata(&service, None)?;
    assert_eq!(service["spec"]["clusterIP"], "10.96.0.10");
    let port = &service["spec"]["ports"][0];
    assert_eq!(
        (
            &port["name"],
            &port["port"],
            &port["protocol"],
            &port["targetPort"]
        ),
        (&"http".into(), &80.into(), &"TCP".into(), &8080.into()),
        "{port}"
    );

    let slice = get_json(&k8s, &["endpointslice", "web-1"])?;
    check_server_metadata(&slice, Some(1))?;
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );
    assert_eq!(slice["ports"][0]["port"], 8080);
    let endpoints = slice["endpoints"].as_array().context("endpoints")?;
    assert_eq!(endpoints.len(), 2, "{slice}");
    assert_eq!(endpoints[0]["addresses"][0], "10.200.1.2");
    assert_eq!(endpoints[0]["nodeName"], "node-a");
    assert_eq!(endpoints[0]["zone"], "zone1");
    assert_eq!(
        endpoints[0]["conditions"],
        serde_json::json!({"ready": true, "serving": true, "terminating": false})
    );
    assert_eq!(endpoints[1]["zone"], "zone2");
    assert_eq!(
        endpoints[1]["conditions"],
        serde_json::json!({"ready": false, "serving": true, "terminating": true})
    );

    // Through the CRD, by every served version and the short name.
    let rule = get_json(&k8s, &["destinationrules.v1.networking.istio.io", "web"])?;
    check_server_metadata(&rule, Some(1))?;
    assert_eq!(rule["spec"]["host"], "web.default.svc.cluster.local");
    let lb = &rule["spec"]["trafficPolicy"]["loadBalancer"];
    assert_eq!(lb["simple"], "ROUND_ROBIN");
    assert_eq!(lb["localityLbSetting"]["enabled"], true);
    assert_eq!(
        lb["localityLbSetting"]["failover"],
        serde_json::json!([{"from": "region1", "to": "region2"}])
    );
    assert_eq!(
        rule["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"],
        1
    );
    for name in ["destinationrules.v1alpha3.networking.istio.io", "dr"] {
        let same = get_json(&k8s, &[name, "web"])?;
        assert_eq!(same["spec"], rule["spec"], "{name}");
    }

    // A change of the endpoints (not of metadata) bumps the generation.
    k8s.kubectl(&[
        "patch",
        "endpointslice",
        "web-1",
        "--type=merge",
        "-p",
        r#"{"endpoints":[{"addresses":["10.200.1.3"],"conditions":{"ready":true}}]}"#,
    ])?;
    k8s.kubectl(&["label", "endpointslice", "web-1", "extra=1"])?;
    let slice = get_json(&k8s, &["endpointslice", "web-1"])?;
    assert_eq!(slice["metadata"]["generation"], 2, "{slice}");

    // Label selectors, on built-in and custom resources.
    let count = |args: &[&str]| -> Result<usize> {
        let list = get_json(&k8s, args)?;
        Ok(list["items"].as_array().map_or(0, Vec::len))
    };
    assert_eq!(
        count(&["endpointslices", "-l", "kubernetes.io/service-name=web"])?,
        1
    );
    assert_eq!(
        count(&["endpointslices", "-l", "kubernetes.io/service-name=other"])?,
        0
    );
    assert_eq!(
        count(&["nodes", "-l", "topology.kubernetes.io/zone=zone1"])?,
        1
    );
    assert_eq!(
        count(&["nodes", "-l", "topology.kubernetes.io/zone=zone2"])?,
        0
    );
    assert_eq!(count(&["services", "-A", "-l", "app=web"])?, 1);
    k8s.kubectl(&["label", "dr", "web", "team=lb"])?;
    assert_eq!(count(&["dr", "-l", "team=lb"])?, 1);
    assert_eq!(count(&["dr", "-l", "team=other"])?, 0);

    // Deletion, and a namespace's deletion takes what it holds.
    k8s.kubectl(&["create", "namespace", "scratch"])?;
    k8s.apply_yaml(&SERVICE.replace("namespace: default", "namespace: scratch"))?;
    k8s.apply_yaml(&DESTINATION_RULE.replace("namespace: default", "namespace: scratch"))?;
    k8s.kubectl(&["delete", "namespace", "scratch"])?;
    assert_eq!(count(&["services", "-n", "scratch"])?, 0);
    assert_eq!(count(&["dr", "-n", "scratch"])?, 0);
    k8s.kubectl(&["delete", "endpointslice", "web-1"])?;
    assert_eq!(count(&["endpointslices"])?, 0);
    Ok(())
}

#[test]
fn watches_see_changes_with_bookmarks_and_initial_events() -> Result<()> {
    let Some(k8s) = start()? else { return Ok(()) };
    k8s.apply_yaml(SERVICE)?;
    k8s.apply_yaml(ENDPOINT_SLICE)?;
    // The list as the server returns it (`kubectl get -o json` drops its resourceVersion).
    let list: Value = serde_json::from_str(&k8s.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/services",
    ])?)?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
        .with_context(|| format!("no resourceVersion in the list: {list}"))?
        .to_owned();

    // A watch from the list's resourceVersion sees the change whenever it connects.
    let path = format!(
        "/api/v1/namespaces/default/services?watch=1&labelSelector=app%3Dweb&resourceVersion={rv}&timeoutSeconds=2"
    );
    let events = thread::scope(|s| {
        let watch = s.spawn(|| k8s.kubectl(&["get", "--raw", &path]));
        let labelled = k8s.kubectl(&["label", "service", "web", "changed=yes"]);
        (watch.join(), labelled)
    });
    let (watch, labelled) = events;
    labelled?;
    let watched = watch.map_err(|_| anyhow::anyhow!("the watch thread panicked"))??;
    let events: Vec<Value> = watched
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("watch events: {watched}"))?;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "MODIFIED"
                && e["object"]["metadata"]["labels"]["changed"] == "yes"),
        "no MODIFIED event with the new label: {watched}"
    );

    // kubectl's own watch.
    let out = k8s.kubectl(&[
        "get",
        "services",
        "--watch-only",
        "--request-timeout=1s",
        "-o",
        "name",
    ]);
    // It ends at the timeout, which kubectl may report as an error; nothing changed, so
    // nothing is printed either way.
    if let Ok(out) = out {
        assert!(out.trim().is_empty(), "{out}");
    }

    // Streaming list (WatchList, sendInitialEvents): the current objects, then the
    // bookmark that ends the initial events.
    let streamed = k8s.kubectl(&[
        "get",
        "--raw",
        "/apis/discovery.k8s.io/v1/endpointslices?watch=1&sendInitialEvents=true\
         &allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1",
    ])?;
    let events: Vec<Value> = streamed
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("streamed list: {streamed}"))?;
    assert_eq!(events[0]["type"], "ADDED", "{streamed}");
    assert_eq!(events[0]["object"]["metadata"]["name"], "web-1");
    assert!(
        events.iter().any(|e| e["type"] == "BOOKMARK"
            && e["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"] == "true"),
        "no initial-events-end bookmark: {streamed}"
    );
    Ok(())
}

#[test]
fn objects_survive_an_apiserver_restart() -> Result<()> {
    let Some(mut k8s) = start()? else {
        return Ok(());
    };
    k8s.apply_yaml(SERVICE)?;
    k8s.install_istio_crds()?;
    k8s.apply_yaml(DESTINATION_RULE)?;
    let before = get_json(&k8s, &["service", "web"])?;
    let rule_before = get_json(&k8s, &["dr", "web"])?;

    k8s.stop_apiserver()?;
    assert!(
        k8s.kubectl(&["get", "services", "--request-timeout=2s"])
            .is_err(),
        "the apiserver still answers after it was killed"
    );
    k8s.start_apiserver()?;

    let after = get_json(&k8s, &["service", "web"])?;
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    assert_eq!(after["spec"], before["spec"]);
    let rule_after = get_json(&k8s, &["dr", "web"])?;
    assert_eq!(
        rule_after["metadata"]["uid"],
        rule_before["metadata"]["uid"]
    );
    assert_eq!(rule_after["spec"], rule_before["spec"]);

    // And it takes writes again.
    k8s.kubectl(&["label", "service", "web", "after=restart"])?;
    let labelled = get_json(&k8s, &["service", "web"])?;
    assert_eq!(labelled["metadata"]["labels"]["after"], "restart");
    Ok(())
}
