//! lb's userspace: the agent that loads and programs the data plane, and its CLI.
//!
//! - `config`: the configuration file and its validation;
//! - `dataplane`: loading and attaching the eBPF programs, writing their maps
//!   (`selection` builds tables, `sync` applies a desired state);
//! - `locality`: which share of new connections each endpoint gets (Istio locality
//!   priorities, Envoy priority load and panic);
//! - `agent`: the long-running process;
//! - `interfaces`: which interfaces it attaches to (`--interface` names and patterns),
//!   followed as they come and go;
//! - `clock`: the kernel's clocks, to compare with the data plane's timestamps;
//! - `cli`: the operator commands (`lb services`, `lb endpoints`, `lb conntrack`, ...);
//! - `check`: `lb check`, what a configuration does (with endpoints taken as unhealthy);
//! - `sources`: where services come from besides the files (the cluster, DNS names);
//! - `dns_responder`: `--dns-listen`, answers pods' queries for lb's hosts with their VIPs;
//! - `health`: active health checks (lb's `HealthCheck` document).

pub mod admin;
pub mod agent;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod dns_responder;
pub mod health;
pub mod interfaces;
pub mod locality;
pub mod model;
pub mod outlier;
pub mod sources;
pub mod tls_origination;
