//! Istio's locality failover task (the project's seed) as the tests, the sandbox and the
//! bench build it: HelloWorld in four localities (backend `i` at `10.200.i.2`), the node
//! at region1/zone1, the task's DestinationRule.

use crate::topology::{backend_addr, BACKEND_HTTP_PORT, VIP};

/// The port clients call HelloWorld on.
pub const HELLO_PORT: u16 = 5000;
pub const HOST: &str = "helloworld.sample.svc.cluster.local";

/// The seed's localities, one HelloWorld backend each, in backend order.
pub const LOCALITIES: [(&str, &str); 4] = [
    ("region1", "zone1"),
    ("region1", "zone2"),
    ("region2", "zone3"),
    ("region3", "zone4"),
];

/// The seed's DestinationRule, verbatim.
pub const DESTINATION_RULE: &str = r#"apiVersion: networking.istio.io/v1beta1
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

/// lb's Node document: the node (and its client) at region1/zone1.
pub const NODE: &str = "apiVersion: lb/v1alpha1\nkind: Node\nspec:\n  locality: region1/zone1\n";

/// One endpoint per seed locality: (backend number, `region/zone`).
pub fn endpoints() -> Vec<(u8, String)> {
    (1u8..)
        .zip(LOCALITIES)
        .map(|(i, (region, zone))| (i, format!("{region}/{zone}")))
        .collect()
}

/// A ServiceEntry for helloworld: `endpoints` are (backend number, locality).
pub fn service_entry(endpoints: &[(u8, String)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(i, locality)| {
            format!(
                "  - address: {}\n    locality: {locality}\n",
                backend_addr(*i)
            )
        })
        .collect();
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: helloworld
  namespace: sample
spec:
  hosts:
  - {HOST}
  addresses:
  - {VIP}
  ports:
  - number: {HELLO_PORT}
    name: http
    protocol: HTTP
    targetPort: {BACKEND_HTTP_PORT}
  resolution: STATIC
  endpoints:
{eps}"#
    )
}
