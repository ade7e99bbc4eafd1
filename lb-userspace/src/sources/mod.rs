//! Where services come from, beside the configuration files (`config`): each source
//! produces a [`config::ClusterInput`](crate::config::ClusterInput), and `config::join`
//! merges it with the files into the one `Config` the agent applies. One path from any
//! source to the data plane: source → `config::join` → `Agent::reload`.
//!
//! - `kubernetes`: Services, EndpointSlices, Nodes, Pods' locality labels and Istio's
//!   resources, watched from the API server.
//! - `dns`: the addresses of endpoints known by name (`resolution: DNS`), resolved by the
//!   agent; they fill in the services' endpoints after the join (`dns::resolved`).

pub mod dns;
pub mod kubernetes;
