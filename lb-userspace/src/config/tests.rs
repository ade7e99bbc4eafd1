//! Loading as a whole: the original format, Istio resources as users write them (the seed
//! task and the external-services blog post), merging, and the messages operators read.

use std::time::Duration;

use super::*;
use crate::{
    dataplane::Protocol,
    model::{Endpoint, Failover, Locality, LocalityLbSetting, OutlierDetection, TrafficPolicy},
};

// ---------------------------------------------------------------------------------------
// The original format.

pub(super) const GOOD: &str = r#"
dataplane:
  max_connections: 1024
  timeouts: { udp: 5s }
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { address: 10.200.1.2, port: 8080 }
      - { address: 10.200.2.2, port: 8080, weight: 3, state: draining }
  - name: dns
    vip: 10.96.0.10
    port: 53
    protocol: UDP
    backends: []
"#;

#[test]
fn parses_services_and_dataplane_settings() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.dataplane.max_connections, 1024);
    assert_eq!(c.dataplane.timeouts.udp_timeout_ns, 5_000_000_000);
    assert_eq!(
        c.dataplane.timeouts.connect_retries, 2,
        "Istio's default retry policy: two retries of a connect failure"
    );
    assert_eq!(
        c.dataplane.max_services,
        DataplaneOptions::default().max_services
    );
    assert_eq!(c.services.len(), 2);
    let web = &c.services[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.frontend.to_string(), "10.96.0.10:80/TCP");
    assert_eq!(web.policy, TrafficPolicy::default());
    assert_eq!(web.endpoints[0].weight, 1);
    assert_eq!(web.endpoints[0].locality, Locality::default());
    assert_eq!(web.endpoints[1].weight, 3);
    let state = |addr: [u8; 4]| c.initial_states.get(&(web.frontend, addr.into(), 8080));
    assert_eq!(
        state([10, 200, 1, 2]),
        None,
        "active backends are not listed"
    );
    assert_eq!(state([10, 200, 2, 2]), Some(&BackendState::Draining));
    assert_eq!(c.services[1].frontend.protocol, Protocol::Udp);
}

#[test]
fn errors_name_the_field_and_the_problem() {
    let cases = [
        (
            GOOD.replace(
                "vip: 10.96.0.10\n    port: 80",
                "vip: 10.96.0.300\n    port: 80",
            ),
            "services[0] (web).vip",
        ),
        (
            GOOD.replace("protocol: UDP", "protocol: SCTP"),
            "services[1] (dns).protocol",
        ),
        (
            GOOD.replace("state: draining", "state: sleepy"),
            "services[0] (web).backends[1].state",
        ),
        (
            GOOD.replace("udp: 5s", "udp: soon"),
            "dataplane.timeouts.udp",
        ),
        (GOOD.replace("udp: 5s", "udp: 0s"), "dataplane.timeouts.udp"),
        (
            GOOD.replace("port: 8080 }", "port: 0 }"),
            "services[0] (web).backends[0].port",
        ),
        (
            GOOD.replace("max_connections", "max_conections"),
            "max_conections",
        ),
        (
            GOOD.replace("max_connections: 1024", "connect_retries: 9"),
            "dataplane.connect_retries",
        ),
    ];
    for (text, field) in cases {
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains(field), "error {err:?} does not name {field}");
    }
}

#[test]
fn empty_file_is_an_empty_configuration() {
    let c = parse("").unwrap();
    assert!(c.services.is_empty());
    assert_eq!(c.node, Node::default());
}

// ---------------------------------------------------------------------------------------
// Istio resources.

/// The DestinationRule the seed task applies (shared/seeds/README.md), as published.
pub(super) const SEED_RULE: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: helloworld
spec:
  host: helloworld.sample.svc.cluster.local
  trafficPolicy:
    connectionPool:
      http:
        maxRequestsPerConnection: 1
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        failover:
          - from: region1
            to: region2
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
"#;

/// HelloWorld in the seed task's four localities, as a ServiceEntry with a VIP.
pub(super) const HELLOWORLD_ENTRY: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: helloworld
  namespace: sample
spec:
  hosts:
  - helloworld.sample.svc.cluster.local
  addresses:
  - 10.96.0.20
  ports:
  - number: 5000
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: 10.200.1.2
    locality: region1/zone1
  - address: 10.200.2.2
    locality: region1/zone2
  - address: 10.200.3.2
    locality: region2/zone3
  - address: 10.200.4.2
    locality: region3/zone4
"#;

fn seed() -> String {
    format!("{HELLOWORLD_ENTRY}---{SEED_RULE}")
}

fn endpoint(address: [u8; 4], port: u16, locality: &str) -> Endpoint {
    Endpoint {
        address: address.into(),
        port,
        locality: Locality::parse(locality),
        labels: Default::default(),
        weight: 1,
        hostname: None,
    }
}

fn load_text(text: &str) -> Loaded {
    match parse_str(text, "lb.yaml") {
        Ok(loaded) => loaded,
        Err(e) => panic!("configuration refused: {e:#}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    let err = parse_str(text, "lb.yaml").expect_err("the configuration is refused");
    match err.downcast::<InvalidConfig>() {
        Ok(invalid) => invalid.errors,
        Err(other) => panic!("not an InvalidConfig: {other:#}"),
    }
}

fn assert_has(messages: &[String], wanted: &str) {
    assert!(
        messages.iter().any(|m| m == wanted),
        "no message {wanted:?} in {messages:#?}"
    );
}

#[test]
fn seed_task_resources_become_the_expected_model() {
    let loaded = load_text(&seed());
    let services = &loaded.config.services;
    assert_eq!(services.len(), 1);
    let s = &services[0];
    assert_eq!(s.name, "helloworld.sample.svc.cluster.local");
    assert_eq!(s.frontend.to_string(), "10.96.0.20:5000/TCP");
    assert!(
        s.http,
        "protocol HTTP: response statuses feed outlier detection"
    );
    assert_eq!(
        *s.endpoints,
        [
            endpoint([10, 200, 1, 2], 5000, "region1/zone1"),
            endpoint([10, 200, 2, 2], 5000, "region1/zone2"),
            endpoint([10, 200, 3, 2], 5000, "region2/zone3"),
            endpoint([10, 200, 4, 2], 5000, "region3/zone4"),
        ]
    );
    assert_eq!(
        s.policy,
        TrafficPolicy {
            locality_lb: Some(LocalityLbSetting {
                enabled: Some(true),
                failover: vec![Failover {
                    from: "region1".into(),
                    to: "region2".into()
                }],
                failover_priority: vec![],
                distribute: vec![],
                force: false,
            }),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: 1,
                interval: Duration::from_secs(1),
                base_ejection_time: Duration::from_secs(600),
                // Envoy: max(300s, baseEjectionTime).
                max_ejection_time: Duration::from_secs(600),
                ..OutlierDetection::default()
            }),
            health_check: None,
            tls: None,
        }
    );
    assert_eq!(
        loaded.warnings,
        [
            "lb.yaml document 2 (DestinationRule default/helloworld): \
             spec.trafficPolicy.connectionPool: ignored, lb does not limit connections or \
             requests yet",
            "lb.yaml document 2 (DestinationRule default/helloworld): \
             spec.trafficPolicy.loadBalancer.simple: ROUND_ROBIN is approximated: lb picks the \
             endpoint of each new connection by a weighted consistent hash (Maglev) of its \
             addresses and ports",
        ]
    );
}

#[test]
fn every_istio_api_version_is_read_alike() {
    let want = load_text(&seed()).config;
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let text = seed().replace(
            "networking.istio.io/v1beta1",
            &format!("networking.istio.io/{version}"),
        );
        assert_eq!(load_text(&text).config, want, "{version}");
    }
}

/// The blog post "Configuring failover for external services", with an address and IP
/// addresses for the DynamoDB names (`BLOG_ENTRY_AS_WRITTEN` is the blog's own).
const BLOG_ENTRY: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-svc-dns
spec:
  hosts:
  - mydb.com
  addresses:
  - 240.0.0.10/32
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  endpoints:
  - address: 52.119.226.80
    locality: us-east1
    ports:
      http: 81 # INVALID - This is purposefully wrong to trigger failover
  - address: 52.94.12.144
    locality: us-west
    ports:
      http: 80
"#;

const BLOG_RULE: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: mydynamodb
spec:
  host: mydb.com
  trafficPolicy:
    tls:
      mode: SIMPLE
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        failover:
          - from: us-east1
            to: us-west
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 15s
      baseEjectionTime: 1m
"#;

#[test]
fn blog_external_service_with_failover() {
    let loaded = load_text(&format!("{BLOG_ENTRY}---{BLOG_RULE}"));
    let s = &loaded.config.services[0];
    // Port protocol HTTP: statuses are read (a TLS-speaking backend shows none, which
    // costs nothing and counts nothing).
    assert!(s.http);
    assert_eq!(s.name, "mydb.com");
    assert_eq!(s.frontend.to_string(), "240.0.0.10:80/TCP");
    // The endpoints' own `ports` win over the service port.
    assert_eq!(
        *s.endpoints,
        [
            endpoint([52, 119, 226, 80], 81, "us-east1"),
            endpoint([52, 94, 12, 144], 80, "us-west"),
        ]
    );
    let od = s
        .policy
        .outlier_detection
        .as_ref()
        .expect("outlier detection");
    assert_eq!(od.consecutive_5xx_errors, 1);
    assert_eq!(od.interval, Duration::from_secs(15));
    assert_eq!(od.base_ejection_time, Duration::from_secs(60));
    assert_eq!(od.max_ejection_time, Duration::from_secs(300));
    assert_eq!(od.max_ejection_percent, 10);
    let lb = s.policy.locality_lb.as_ref().expect("locality lb");
    assert_eq!(lb.failover[0].from, "us-east1");
    assert_eq!(lb.failover[0].to, "us-west");
    // `tls.mode: SIMPLE`: TLS originated, verified against the system's roots and each
    // endpoint's name.
    assert_eq!(s.policy.tls, Some(Default::default()));
}

/// `trafficPolicy.tls` as Istio's ClientTLSSettings: SIMPLE and MUTUAL with files and
/// their checks; DISABLE is no TLS; what lb cannot do is an error naming the field.
#[test]
fn tls_origination_settings() {
    let rule = |tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: db }}
spec:
  hosts: [db.example]
  addresses: [240.0.0.9]
  ports: [{{ number: 80, name: http, protocol: HTTP, targetPort: 443 }}]
  resolution: STATIC
  endpoints: [{{ address: 10.1.0.1 }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: db }}
spec:
  host: db.example
  trafficPolicy:
    tls: {tls}
"
        )
    };
    let tls_of = |tls: &str| load_text(&rule(tls)).config.services[0].policy.tls.clone();
    let full = tls_of(
        "{ mode: MUTUAL, clientCertificate: /etc/lb/c.pem, privateKey: /etc/lb/k.pem, \
         caCertificates: /etc/lb/ca.pem, sni: db.internal, subjectAltNames: [a.internal] }",
    )
    .unwrap();
    assert_eq!(
        full.client_certificate,
        Some(("/etc/lb/c.pem".into(), "/etc/lb/k.pem".into()))
    );
    assert_eq!(full.ca_certificates, Some("/etc/lb/ca.pem".into()));
    assert_eq!(full.sni.as_deref(), Some("db.internal"));
    assert_eq!(full.subject_alt_names, ["a.internal"]);
    assert_eq!(tls_of("{ mode: DISABLE }"), None);
    let skip = load_text(&rule("{ mode: SIMPLE, insecureSkipVerify: true }"));
    assert!(
        skip.config.services[0]
            .policy
            .tls
            .as_ref()
            .unwrap()
            .insecure_skip_verify
    );
    assert_has(
        &skip.warnings,
        "lb.yaml document 2 (DestinationRule default/db): spec.trafficPolicy.tls.insecureSkipVerify: \
         endpoint certificates are not verified at all: anyone on the path can read and change \
         this traffic",
    );
    for (tls, error) in [
        (
            "{ mode: ISTIO_MUTUAL }",
            "spec.trafficPolicy.tls.mode: ISTIO_MUTUAL needs the mesh's workload certificates, \
             which lb does not have: use SIMPLE, or MUTUAL with certificate files",
        ),
        (
            "{ mode: MUTUAL }",
            "spec.trafficPolicy.tls.mode: MUTUAL needs spec.trafficPolicy.tls.clientCertificate \
             and spec.trafficPolicy.tls.privateKey (PEM files)",
        ),
        (
            "{ mode: SIMPLE, credentialName: db-secret }",
            "spec.trafficPolicy.tls.credentialName: lb reads certificates from files \
             (clientCertificate, privateKey, caCertificates), not from Kubernetes secrets",
        ),
        (
            "{ mode: STRICT }",
            "spec.trafficPolicy.tls.mode: \"STRICT\" is not one of DISABLE, SIMPLE, MUTUAL, \
             ISTIO_MUTUAL",
        ),
    ] {
        let wanted = format!("lb.yaml document 2 (DestinationRule default/db): {error}");
        assert_has(&errors(&rule(tls)), &wanted);
    }
}

/// The blog's ServiceEntry exactly as written: no addresses, endpoints by name.
const BLOG_ENTRY_AS_WRITTEN: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-svc-dns
spec:
  hosts:
  - mydb.com
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  endpoints:
  - address: dynamodb.us-east-1.amazonaws.com
    locality: us-east1
    ports:
      http: 80
  - address: dynamodb.us-west-1.amazonaws.com
    locality: us-west
    ports:
      http: 80
"#;

/// The blog's YAML as written loads: the host gets a VIP from Istio's auto-allocation
/// range, the same each time; the endpoints are names for the agent to resolve, with
/// their localities and ports.
#[test]
fn the_blogs_service_entry_loads_as_written() {
    let loaded = load_text(&format!("{BLOG_ENTRY_AS_WRITTEN}---{BLOG_RULE}"));
    let s = &loaded.config.services[0];
    let vip = istio::auto_vip("mydb.com", 0);
    assert_eq!(s.frontend.to_string(), format!("{vip}:80/TCP"));
    assert_eq!(vip.octets()[..2], [240, 240]);
    assert!(s.endpoints.is_empty(), "names are resolved by the agent");
    let named: Vec<(String, u16, String)> = s
        .named
        .iter()
        .map(|n| (n.hostname.to_string(), n.port, n.locality.to_string()))
        .collect();
    assert_eq!(
        named,
        [
            (
                "dynamodb.us-east-1.amazonaws.com".into(),
                80,
                "us-east1//".into()
            ),
            (
                "dynamodb.us-west-1.amazonaws.com".into(),
                80,
                "us-west//".into()
            ),
        ]
    );
    assert!(s.named.iter().all(|n| !n.one_at_a_time));
    // The same VIP on the next load, and with another entry loaded before it.
    let again = load_text(&format!("{HELLOWORLD_ENTRY}---\n{BLOG_ENTRY_AS_WRITTEN}"));
    let mydb = again
        .config
        .services
        .iter()
        .find(|s| s.name == "mydb.com")
        .unwrap();
    assert_eq!(mydb.frontend.vip, vip);
    // Where its VIP is another's configured address, it takes the next choice.
    let taken = BLOG_ENTRY
        .replace("240.0.0.10/32", &vip.to_string())
        .replace("mydb.com", "other.com");
    let moved = load_text(&format!("{taken}---\n{BLOG_ENTRY_AS_WRITTEN}"));
    let mydb = moved
        .config
        .services
        .iter()
        .find(|s| s.name == "mydb.com")
        .unwrap();
    assert_eq!(mydb.frontend.vip, istio::auto_vip("mydb.com", 1));
    assert_ne!(istio::auto_vip("mydb.com", 1), vip);
    // DNS_ROUND_ROBIN: one address at a time; no endpoints: the host itself is resolved.
    let round_robin =
        BLOG_ENTRY_AS_WRITTEN.replace("resolution: DNS", "resolution: DNS_ROUND_ROBIN");
    assert!(load_text(&round_robin).config.services[0]
        .named
        .iter()
        .all(|n| n.one_at_a_time));
    let hosts_only = BLOG_ENTRY_AS_WRITTEN
        .split("  endpoints:")
        .next()
        .unwrap()
        .to_string();
    let s = &load_text(&hosts_only).config.services[0];
    assert_eq!(s.named.len(), 1);
    assert_eq!(&*s.named[0].hostname, "mydb.com");
    assert_eq!(s.named[0].port, 80);
}

#[test]
fn target_port_applies_unless_the_endpoint_names_its_port() {
    // The blog's HTTPS variant: port 80 to the endpoints' 443.
    let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: external-svc-dns }
spec:
  hosts: [mydb.com]
  addresses: [240.0.0.10, 240.0.0.11]
  ports:
  - { number: 80, name: http-port, protocol: HTTP, targetPort: 443 }
  - { number: 53, name: dns, protocol: UDP }
  resolution: STATIC
  endpoints:
  - { address: 52.119.226.80, locality: us-east1 }
  - { address: 52.94.12.144, locality: us-west, ports: { dns: 5353 }, weight: 3 }
"#;
    let services = load_text(text).config.services;
    let shown: Vec<String> = services
        .iter()
        .map(|s| {
            let eps: Vec<String> = s
                .endpoints
                .iter()
                .map(|e| format!("{}:{}*{}", e.address, e.port, e.weight))
                .collect();
            format!("{} -> {}", s.frontend, eps.join(" "))
        })
        .collect();
    assert_eq!(
        shown,
        [
            "240.0.0.10:80/TCP -> 52.119.226.80:443*1 52.94.12.144:443*3",
            "240.0.0.10:53/UDP -> 52.119.226.80:53*1 52.94.12.144:5353*3",
            "240.0.0.11:80/TCP -> 52.119.226.80:443*1 52.94.12.144:443*3",
            "240.0.0.11:53/UDP -> 52.119.226.80:53*1 52.94.12.144:5353*3",
        ]
    );
}

#[test]
fn the_node_document_sets_locality_labels_and_dataplane() {
    let text = r#"
apiVersion: lb/v1alpha1
kind: Node
metadata: { name: node-a }
spec:
  locality: region1/zone1
  labels: { topology.istio.io/subzone: rack1 }
  dataplane: { max_connections: 2048 }
"#;
    let c = load_text(text).config;
    assert_eq!(c.node.locality, Locality::parse("region1/zone1"));
    assert_eq!(c.node.labels["topology.istio.io/subzone"], "rack1");
    assert_eq!(c.dataplane.max_connections, 2048);
}

#[test]
fn rules_pick_the_most_specific_host_then_the_first_loaded() {
    let entry = HELLOWORLD_ENTRY;
    let rule = |name: &str, host: &str, errors: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: {name}, namespace: sample }}\nspec:\n  host: \"{host}\"\n  trafficPolicy:\n    outlierDetection: {{ consecutive5xxErrors: {errors} }}\n"
        )
    };
    let text = [
        entry.to_string(),
        rule("everything", "*", 7),
        rule("short", "helloworld", 2),
        rule("again", "helloworld.sample.svc.cluster.local", 3),
        rule("nothing", "other.example.com", 4),
    ]
    .join("---\n");
    let loaded = load_text(&text);
    let od = loaded.config.services[0].policy.outlier_detection.clone();
    // `helloworld` in namespace sample is the entry's host exactly, and was loaded first.
    assert_eq!(od.map(|o| o.consecutive_5xx_errors), Some(2));
    assert_eq!(
        loaded.warnings,
        [
            "lb.yaml document 4 (DestinationRule sample/again): spec.host: \
             \"helloworld.sample.svc.cluster.local\" also matches lb.yaml document 1 \
             (ServiceEntry sample/helloworld), which takes lb.yaml document 3 (DestinationRule \
             sample/short) instead (the first in load order; Istio would take the oldest)",
            "lb.yaml document 5 (DestinationRule sample/nothing): spec.host: \
             \"other.example.com\" matches no ServiceEntry host: the rule has no effect",
        ]
    );
}

#[test]
fn unsupported_fields_are_warnings_naming_document_and_field() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: helloworld, namespace: sample }
spec:
  host: helloworld
  subsets:
  - name: v1
    labels: { version: v1 }
  trafficPolicy:
    portLevelSettings:
    - port: { number: 5000 }
      connectionPool: { tcp: { maxConnections: 10 } }
    connectionPool: { tcp: { maxConnections: 100 } }
    outlierDetection: { consecutiveErrors: 3, sweepInterval: 1s }
  unknownThing: 1
"#;
    let loaded = load_text(&format!("{HELLOWORLD_ENTRY}---{text}"));
    let at = "lb.yaml document 2 (DestinationRule sample/helloworld)";
    for wanted in [
        format!("{at}: spec.subsets: ignored, lb balances over every endpoint of the host (subsets are picked by VirtualService routes, which lb does not read)"),
        format!("{at}: spec.trafficPolicy.portLevelSettings: ignored, not supported yet: the rule's top-level trafficPolicy applies to every port"),
        format!("{at}: spec.trafficPolicy.connectionPool: ignored, lb does not limit connections or requests yet"),
        format!("{at}: spec.trafficPolicy.outlierDetection.consecutiveErrors: deprecated, and ignored as current Istio ignores it: use consecutiveGatewayErrors or consecutive5xxErrors (it is 3)"),
        format!("{at}: spec.trafficPolicy.outlierDetection.sweepInterval: unknown field, ignored"),
        format!("{at}: spec.unknownThing: unknown field, ignored"),
    ] {
        assert_has(&loaded.warnings, &wanted);
    }
    assert_eq!(loaded.warnings.len(), 6, "{:#?}", loaded.warnings);
}

#[test]
fn invalid_values_are_errors_naming_document_field_and_reason() {
    let bad_interval = seed().replace("interval: 1s", "interval: soon");
    assert_eq!(
        errors(&bad_interval),
        ["lb.yaml document 2 (DestinationRule default/helloworld): \
          spec.trafficPolicy.outlierDetection.interval: \"soon\" is not a duration (e.g. 1s, \
          1.5s, 500ms, 10m, 1h)"]
    );

    let static_name = BLOG_ENTRY
        .replace("52.119.226.80", "dynamodb.us-east-1.amazonaws.com")
        .replace("resolution: DNS", "resolution: STATIC");
    assert_eq!(
        errors(&static_name),
        ["lb.yaml document 1 (ServiceEntry default/external-svc-dns): spec.endpoints[0].address: \
          \"dynamodb.us-east-1.amazonaws.com\" is not an IP address (resolution STATIC takes IP \
          addresses)"]
    );
    let bad_name = BLOG_ENTRY.replace("52.119.226.80", "dynamodb..amazonaws.com");
    assert_eq!(
        errors(&bad_name),
        ["lb.yaml document 1 (ServiceEntry default/external-svc-dns): spec.endpoints[0].address: \
          \"dynamodb..amazonaws.com\" is not a DNS name: each dot-separated label has 1 to 63 \
          characters"]
    );
    let wildcard = BLOG_ENTRY_AS_WRITTEN
        .replace("  - mydb.com\n", "  - \"*.mydb.com\"\n")
        .replace(
            "  endpoints:\n  - address: dynamodb.us-east-1.amazonaws.com\n    locality: us-east1\n    ports:\n      http: 80\n  - address: dynamodb.us-west-1.amazonaws.com\n    locality: us-west\n    ports:\n      http: 80\n",
            "",
        );
    assert_eq!(
        errors(&wildcard),
        [
            "lb.yaml document 1 (ServiceEntry default/external-svc-dns): spec.hosts[0]: \
          \"*.mydb.com\" is a wildcard: with resolution DNS and no endpoints the hosts are \
          resolved, and a wildcard cannot be"
        ]
    );

    let gateway =
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: { name: gw }\nspec: {}\n";
    assert_eq!(
        errors(&format!("{HELLOWORLD_ENTRY}---\n{gateway}")),
        [
            "lb.yaml document 2 (Gateway default/gw): kind: Gateway (networking.istio.io/v1) is \
          not supported: lb reads ServiceEntry and DestinationRule (networking.istio.io/v1, \
          networking.istio.io/v1beta1, networking.istio.io/v1alpha3), and Node and \
          HealthCheck (lb/v1alpha1)"
        ]
    );

    let node = "apiVersion: lb/v1alpha1\nkind: Node\nspec: { locality: region1/zone1 }\n";
    assert_eq!(
        errors(&format!("{node}---\n{node}")),
        [
            "lb.yaml document 2 (Node): kind: a second Node document: lb.yaml document 1 (Node) \
          already describes this node"
        ]
    );
}

#[test]
fn more_invalid_values() {
    let cases = [
        (
            seed().replace("baseEjectionTime: 10m", "baseEjectionTime: 10"),
            "spec.trafficPolicy.outlierDetection.baseEjectionTime: 10 is not a duration: give a unit, e.g. \"10s\"",
        ),
        (
            seed().replace("to: region2", "to: region1"),
            "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0]: from and to are both \"region1\": name two regions",
        ),
        (
            seed().replace("consecutive5xxErrors: 1", "consecutive5xxErrors: -1"),
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors: -1 is not a whole number 0-4294967295",
        ),
        (
            seed().replace("      baseEjectionTime: 10m", "      baseEjectionTime: 10m\n      maxEjectionPercent: 150"),
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is not a whole number 0-100",
        ),
        (
            seed().replace("resolution: STATIC", "resolution: NONE"),
            "spec.resolution: NONE forwards each connection to the address the client asked for, with no balancing: lb balances over endpoints, use STATIC (or DNS with IP endpoints)",
        ),
        (
            seed().replace("- 10.96.0.20", "- 10.96.0.0/24"),
            "spec.addresses[0]: \"10.96.0.0/24\" is a range of addresses: lb balances connections to one VIP, give a single address (or /32)",
        ),
        (
            seed().replace("- address: 10.200.4.2", "- address: 10.200.4.2\n    ports: { grpc: 9000 }"),
            "spec.endpoints[3].ports.grpc: no port named \"grpc\" in spec.ports",
        ),
        (
            seed().replace("protocol: HTTP", "protocol: QUIC"),
            "spec.ports[0].protocol: \"QUIC\" is not one of Istio's protocols (HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, HTTP_PROXY, TLS, TCP, UDP, MONGO, MYSQL, REDIS)",
        ),
        (
            seed().replace("- address: 10.200.4.2", "- address: 10.200.1.2"),
            "spec.endpoints[3]: 10.200.1.2:5000 (port http) is already spec.endpoints[0]: list each endpoint once",
        ),
        (
            seed().replace("failover:\n          - from: region1\n            to: region2", "distribute:\n          - from: region1/*\n            to: { region1/*: 70, region2/*: 20 }"),
            "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: weights add up to 90, not 100",
        ),
    ];
    for (text, wanted) in cases {
        let errors = errors(&text);
        assert!(
            errors.iter().any(|e| e.ends_with(wanted)),
            "no error ending {wanted:?} in {errors:#?}"
        );
    }
}

#[test]
fn a_frontend_defined_twice_names_both_documents() {
    let native = "services:\n  - { name: web, vip: 10.96.0.20, port: 5000 }\n";
    assert_eq!(
        errors(&format!("{native}---{HELLOWORLD_ENTRY}")),
        [
            "lb.yaml document 2 (ServiceEntry sample/helloworld): spec.addresses[0], \
          spec.ports[0]: frontend 10.96.0.20:5000/TCP is already defined by lb.yaml document 1 \
          (services[0] (web)): each VIP, port and protocol is defined once"
        ]
    );
}

#[test]
fn every_error_of_every_document_is_reported_at_once() {
    let text = seed()
        .replace("interval: 1s", "interval: soon")
        .replace("- address: 10.200.2.2", "- address: 10.200.2.300");
    let errors = errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    let err = parse_str(&text, "lb.yaml").unwrap_err().to_string();
    assert!(
        err.starts_with("2 errors in the configuration:\n  lb.yaml document 1"),
        "{err}"
    );
}

#[test]
fn yaml_syntax_errors_name_the_source_and_line() {
    let errors = errors("services: [\n");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("lb.yaml: not valid YAML: ") && errors[0].contains("line 1"),
        "{errors:?}"
    );
}

/// The configuration without where each service was defined: the same services read from
/// other documents compare equal.
fn without_sources(mut config: Config) -> Config {
    for s in &mut config.services {
        s.source = Default::default();
    }
    config
}

#[test]
fn a_kubectl_list_is_read_item_by_item() {
    let indent = |doc: &str| doc.trim().replace('\n', "\n    ");
    let text = format!(
        "apiVersion: v1\nkind: List\nitems:\n  - {}\n  - {}\n",
        indent(HELLOWORLD_ENTRY),
        indent(SEED_RULE)
    );
    let loaded = load_text(&text);
    assert_eq!(
        without_sources(loaded.config.clone()),
        without_sources(load_text(&seed()).config)
    );
    assert!(
        loaded.warnings[0]
            .starts_with("lb.yaml document 1 item 2 (DestinationRule default/helloworld): "),
        "{:?}",
        loaded.warnings
    );
}

// ---------------------------------------------------------------------------------------
// Files and directories.

/// A directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temporary directory");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn directories_are_read_in_name_order_and_merged_with_files() {
    let dir = TempDir::new("dir");
    // Written out of order: the rule must still find the entry loaded before it.
    dir.write("20-rule.yml", SEED_RULE);
    dir.write("10-entry.yaml", HELLOWORLD_ENTRY);
    dir.write("notes.txt", "not configuration");
    dir.write(".#10-entry.yaml", "an editor's lock file");
    let node = dir.write(
        "node.conf",
        "apiVersion: lb/v1alpha1\nkind: Node\nspec: { locality: region1/zone1 }\n",
    );
    let loaded = load_paths(&[dir.0.clone(), node]).expect("the directory loads");
    assert_eq!(
        without_sources(loaded.config.clone()).services,
        without_sources(load_text(&seed()).config).services
    );
    assert_eq!(loaded.config.node.locality.region, "region1");
    let rule_file = dir.0.join("20-rule.yml");
    assert!(
        loaded.warnings[0].starts_with(&format!(
            "{} document 1 (DestinationRule default/helloworld): ",
            rule_file.display()
        )),
        "{:?}",
        loaded.warnings
    );

    let config = load(&dir.0).expect("load reads directories too");
    assert_eq!(config.services.len(), 1);
}

#[test]
fn missing_files_and_empty_directories_are_reported() {
    let dir = TempDir::new("empty");
    let loaded = load_paths(std::slice::from_ref(&dir.0)).expect("an empty directory loads");
    assert_eq!(
        loaded.warnings,
        [format!(
            "{}: no *.yaml or *.yml files in this directory",
            dir.0.display()
        )]
    );
    let missing = dir.0.join("missing.yaml");
    let err = load_paths(std::slice::from_ref(&missing))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: cannot read: ", missing.display())),
        "{err}"
    );
}

/// A cluster's service as `sources::kubernetes` gives it: `web.default` on 10.96.0.30:80.
fn cluster_web(vip: [u8; 4], distribution: Option<LocalityLbSetting>) -> ClusterService {
    let frontend = Frontend {
        vip: std::net::Ipv4Addr::from(vip),
        port: 80,
        protocol: Protocol::Tcp,
    };
    ClusterService {
        label: "Kubernetes Service default/web".into(),
        hosts: vec!["web.default.svc.cluster.local".into()],
        services: vec![(
            "spec.ports[0]".into(),
            Service {
                name: "web.default.svc.cluster.local".into(),
                frontend,
                endpoints: Default::default(),
                named: Default::default(),
                policy: TrafficPolicy::default(),
                http: false,
                session_affinity: None,
                source: Source::Kubernetes {
                    namespace: "default".into(),
                    name: "web".into(),
                },
            },
        )],
        default_locality_lb: distribution,
        auto_vip: false,
    }
}

fn documents(text: &str) -> Vec<(String, Value)> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("cluster object {}", i + 1), v))
        .collect()
}

const WEB_RULE: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: web, namespace: default }
spec:
  host: web
  trafficPolicy:
    outlierDetection: { consecutive5xxErrors: 2 }
";

/// A DestinationRule (from a file or the cluster) applies to a Kubernetes Service by its
/// short name; a Service's trafficDistribution applies only where no rule sets a locality
/// setting.
#[test]
fn cluster_services_take_rules_from_files_and_the_cluster() {
    let zone = LocalityLbSetting {
        failover_priority: vec!["topology.kubernetes.io/zone".into()],
        force: true,
        ..Default::default()
    };
    let (files, _) = {
        let dir = TempDir::new("join-rule");
        let path = dir.write("rule.yaml", WEB_RULE);
        load_files(&[path]).unwrap()
    };
    let cluster = ClusterInput {
        services: vec![cluster_web([10, 96, 0, 30], Some(zone.clone()))],
        ..Default::default()
    };
    let joined = join(&files, &cluster).unwrap();
    let web = &joined.config.services[0];
    assert_eq!(
        web.policy
            .outlier_detection
            .as_ref()
            .unwrap()
            .consecutive_5xx_errors,
        2
    );
    assert_eq!(web.policy.locality_lb, Some(zone.clone()));
    assert_eq!(
        web.source,
        Source::Kubernetes {
            namespace: "default".into(),
            name: "web".into()
        }
    );

    // The same rule from the cluster, now with a locality setting of its own: it wins.
    let rule = format!(
        "{WEB_RULE}    loadBalancer:\n      localityLbSetting:\n        failover: [{{from: r1, to: r2}}]\n"
    );
    let cluster = ClusterInput {
        documents: documents(&rule),
        services: vec![cluster_web([10, 96, 0, 30], Some(zone))],
        ..Default::default()
    };
    let joined = join(&FileDocuments::default(), &cluster).unwrap();
    let setting = joined.config.services[0]
        .policy
        .locality_lb
        .clone()
        .unwrap();
    assert!(!setting.force);
    assert_eq!(setting.failover.len(), 1);
}

/// A frontend both a file and the cluster define: the file's is kept, the cluster's left
/// out with a warning naming both.
#[test]
fn files_win_a_frontend_the_cluster_defines_too() {
    let file = "services:\n  - name: pinned\n    vip: 10.96.0.30\n    port: 80\n    backends: []\n";
    let dir = TempDir::new("join-precedence");
    let path = dir.write("lb.yaml", file);
    let (files, _) = load_files(&[path]).unwrap();
    let cluster = ClusterInput {
        services: vec![
            cluster_web([10, 96, 0, 30], None),
            cluster_web([10, 96, 0, 31], None),
        ],
        ..Default::default()
    };
    let joined = join(&files, &cluster).unwrap();
    let names: Vec<&str> = joined
        .config
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["pinned", "web.default.svc.cluster.local"]);
    let warning = joined
        .warnings
        .iter()
        .find(|w| w.contains("10.96.0.30:80/TCP"))
        .expect("a warning about the shared frontend");
    assert!(warning.starts_with("Kubernetes Service default/web: spec.ports[0]: "));
    assert!(warning.contains("lb.yaml document 1"), "{warning}");
}

/// An invalid DestinationRule from the cluster is left out alone, with its error among the
/// warnings; the other objects apply.
#[test]
fn a_bad_cluster_object_is_left_out_alone() {
    let bad = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: bad, namespace: default }
spec:
  host: web
  trafficPolicy:
    outlierDetection: { interval: soon }
";
    let cluster = ClusterInput {
        documents: documents(&format!("{bad}---{WEB_RULE}")),
        services: vec![cluster_web([10, 96, 0, 30], None)],
        ..Default::default()
    };
    let joined = join(&FileDocuments::default(), &cluster).unwrap();
    assert_eq!(joined.config.services.len(), 1);
    let od = joined.config.services[0].policy.outlier_detection.as_ref();
    assert_eq!(
        od.unwrap().consecutive_5xx_errors,
        2,
        "the good rule applies"
    );
    let rejected: Vec<&String> = joined
        .warnings
        .iter()
        .filter(|w| w.starts_with("rejected: "))
        .collect();
    assert_eq!(rejected.len(), 1, "{:?}", joined.warnings);
    assert!(
        rejected[0].contains("cluster object 1")
            && rejected[0].contains("spec.trafficPolicy.outlierDetection.interval"),
        "{}",
        rejected[0]
    );
}

/// A HealthCheck applies to its host's services (the port-specific one first), with
/// Envoy's defaults for what it leaves out; mistakes name the field; a check of a host no
/// service has is a warning.
#[test]
fn health_checks_apply_by_host_and_port() {
    let check = "apiVersion: lb/v1alpha1
kind: HealthCheck
metadata: { name: mydb }
spec:
  host: mydb.com
  http: { path: /healthz, expectedStatuses: [200, \"300-399\"] }
  interval: 2s
  timeout: 500ms
  unhealthyThreshold: 3
";
    let loaded = load_text(&format!("{BLOG_ENTRY_AS_WRITTEN}---\n{check}"));
    let hc = loaded.config.services[0]
        .policy
        .health_check
        .clone()
        .expect("checked");
    assert_eq!(
        hc.kind,
        crate::model::HealthCheckKind::Http {
            path: "/healthz".into(),
            host: None,
            expected_statuses: vec![(200, 200), (300, 399)],
        }
    );
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(hc.timeout, Duration::from_millis(500));
    assert_eq!((hc.unhealthy_threshold, hc.healthy_threshold), (3, 1));

    let label = "lb.yaml document 2 (HealthCheck default/mydb)";
    let bad = check
        .replace("path: /healthz", "path: healthz")
        .replace("\"300-399\"", "\"300-\"")
        .replace("timeout: 500ms", "timeout: 5s");
    let errs = errors(&format!("{BLOG_ENTRY_AS_WRITTEN}---\n{bad}"));
    assert_has(
        &errs,
        &format!("{label}: spec.http.path: a path starts with /"),
    );
    assert_has(
        &errs,
        &format!(
            "{label}: spec.http.expectedStatuses[1]: \"300-\" is not a status (100-599) or \
             a range of them (\"200-399\")"
        ),
    );
    assert_has(
        &errs,
        &format!(
            "{label}: spec.timeout: 5s is not shorter than the interval (2s): checks would overlap"
        ),
    );
    let elsewhere = check.replace("host: mydb.com", "host: other.com");
    let loaded = load_text(&format!("{BLOG_ENTRY_AS_WRITTEN}---\n{elsewhere}"));
    assert_has(
        &loaded.warnings,
        &format!("{label}: spec.host: no service has host other.com: nothing is checked"),
    );
}
