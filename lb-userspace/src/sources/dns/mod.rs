//! Endpoints known by name: a ServiceEntry with `resolution: DNS` (or `DNS_ROUND_ROBIN`)
//! names its endpoints, or its hosts, and the agent resolves them.
//!
//! Each name the configuration has is looked up (A records) with hickory's resolver,
//! through the system's resolver configuration (`/etc/resolv.conf`) or `--resolver ADDR`.
//! An answer holds for its TTL, kept between a floor and a ceiling so that a zero TTL does
//! not become a query per second and a long one does not hide a move for a day. While
//! lookups of a name fail, its last good answer stays in force (marked stale in the
//! views); a name never answered has no endpoints. A changed answer is applied like any
//! endpoint change (`Agent::update_endpoints`): new connections follow it, established
//! ones keep their backend.
//!
//! [`resolved`] turns a service's named endpoints and the answers into endpoints: one per
//! address, with the named endpoint's port, locality, labels and weight, and the name as
//! its `hostname`; with `DNS_ROUND_ROBIN`, one address only (the first, in address order).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use futures::StreamExt;
use hickory_resolver::{
    config::{NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
    TokioResolver,
};
use serde::Serialize;
use tokio::sync::Notify;

use crate::model::{Endpoint, Service};

/// How the agent resolves names.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// A DNS server to ask instead of the system's resolver configuration.
    pub resolver: Option<SocketAddr>,
    /// An answer holds at least this long, whatever its TTL.
    pub min_ttl: Duration,
    /// And at most this long.
    pub max_ttl: Duration,
}

impl Default for DnsOptions {
    fn default() -> Self {
        Self {
            resolver: None,
            // Envoy's `dns_min_refresh_rate` is 5 s; its refresh follows the TTL above it.
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// Lookups of one name in flight at most, across all names.
const CONCURRENT_LOOKUPS: usize = 16;

/// A failed lookup is tried again after this long (then the floor, as for answers).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// What is known of one name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Answer {
    /// Its IPv4 addresses, sorted, from the last lookup that succeeded.
    pub addresses: Vec<Ipv4Addr>,
    /// When that lookup was.
    #[serde(serialize_with = "unix_seconds")]
    pub resolved_at: Option<SystemTime>,
    /// The last lookup failed: `addresses` are from an earlier one (or none yet).
    pub stale: bool,
    /// Why the last lookup failed, while it did.
    pub error: Option<String>,
    /// How many lookups failed in a row.
    pub failures: u32,
}

fn unix_seconds<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_f64(
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        ),
        None => s.serialize_none(),
    }
}

/// The names the configuration has, with their answers and when each is due again.
#[derive(Default)]
struct State {
    names: BTreeMap<String, (Answer, Instant)>,
}

/// What the resolver did since the agent started (for `/metrics`).
#[derive(Debug, Default)]
pub struct LookupCounts {
    /// Lookups answered (an empty answer too).
    pub succeeded: AtomicU64,
    /// Lookups that failed (timeout, SERVFAIL, no such name).
    pub failed: AtomicU64,
    /// Answers whose addresses differed from the name's previous ones.
    pub changed: AtomicU64,
}

struct Shared {
    resolver: TokioResolver,
    options: DnsOptions,
    state: Mutex<State>,
    counts: LookupCounts,
    /// An answer changed (addresses, not only its time).
    changed: Notify,
    /// The set of names changed: the refresh loop looks again.
    names_changed: Notify,
}

/// The agent's resolver of endpoint names; clones share it.
#[derive(Clone)]
pub struct Dns {
    shared: Arc<Shared>,
}

impl Dns {
    /// A resolver from `options` (the system's configuration unless a server is given),
    /// and its refresh loop, which runs as long as the agent.
    pub fn start(options: DnsOptions) -> Result<Self> {
        let mut builder = resolver_builder(options.resolver)?;
        // The agent keeps answers itself (with its own floor and ceiling); the resolver's
        // cache would only hide a changed answer for longer.
        builder.options_mut().cache_size = 0;
        builder.options_mut().timeout = Duration::from_secs(2);
        builder.options_mut().attempts = 2;
        let dns = Self {
            shared: Arc::new(Shared {
                resolver: builder.build(),
                options,
                state: Mutex::default(),
                counts: LookupCounts::default(),
                changed: Notify::new(),
                names_changed: Notify::new(),
            }),
        };
        tokio::spawn(refresh(dns.shared.clone()));
        Ok(dns)
    }

    /// The names to resolve: new ones are due now, gone ones are forgotten.
    pub fn want(&self, names: BTreeSet<String>) {
        let mut state = self.lock();
        let before = state.names.len();
        state.names.retain(|n, _| names.contains(n));
        let mut added = false;
        for name in names {
            state.names.entry(name).or_insert_with(|| {
                added = true;
                (Answer::default(), Instant::now())
            });
        }
        if added || state.names.len() != before {
            self.shared.names_changed.notify_one();
        }
    }

    /// Looks up every wanted name that has no answer yet, waiting at most `timeout`: the
    /// first configuration then starts with its names resolved.
    pub async fn resolve_unanswered(&self, timeout: Duration) {
        let names: Vec<String> = self
            .lock()
            .names
            .iter()
            .filter(|(_, (a, _))| a.resolved_at.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        let _ = tokio::time::timeout(timeout, lookup_all(&self.shared, names)).await;
    }

    /// Every wanted name's answer.
    pub fn answers(&self) -> BTreeMap<String, Answer> {
        self.lock()
            .names
            .iter()
            .map(|(n, (a, _))| (n.clone(), a.clone()))
            .collect()
    }

    /// What the resolver did so far.
    pub fn counts(&self) -> &LookupCounts {
        &self.shared.counts
    }

    /// Waits for an answer's addresses to change.
    pub async fn changed(&self) {
        self.shared.changed.notified().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.shared)
    }
}

/// A resolver asking `server`, else the system's configuration (`/etc/resolv.conf`): the
/// agent's lookups and the DNS responder's forwarding use the same upstream.
pub fn resolver_builder(
    server: Option<SocketAddr>,
) -> Result<hickory_resolver::ResolverBuilder<TokioConnectionProvider>> {
    Ok(match server {
        Some(server) => TokioResolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                Vec::new(),
                NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true),
            ),
            TokioConnectionProvider::default(),
        ),
        None => TokioResolver::builder_tokio()
            .context("reading the system's resolver configuration (/etc/resolv.conf)")?,
    })
}

/// Looks up every one of `names`, at most [`CONCURRENT_LOOKUPS`] at once.
async fn lookup_all(shared: &Arc<Shared>, names: Vec<String>) {
    futures::stream::iter(names)
        .map(|name| {
            let shared = shared.clone();
            async move { lookup(&shared, name).await }
        })
        .buffer_unordered(CONCURRENT_LOOKUPS)
        .collect::<Vec<_>>()
        .await;
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Looks `name` up and records the answer; wakes the agent when its addresses changed.
async fn lookup(shared: &Shared, name: String) {
    // A trailing dot: the name is absolute, not tried under the search domains.
    let result = shared.resolver.ipv4_lookup(format!("{name}.")).await;
    let now = Instant::now();
    let mut state = lock(shared);
    let Some((answer, due)) = state.names.get_mut(&name) else {
        return; // No longer wanted.
    };
    let before = answer.addresses.clone();
    match result {
        Ok(found) => {
            shared.counts.succeeded.fetch_add(1, Ordering::Relaxed);
            let mut addresses: Vec<Ipv4Addr> =
                found.iter().map(|a| a.0).filter(|&a| usable(a)).collect();
            addresses.sort();
            addresses.dedup();
            let ttl = found.valid_until().saturating_duration_since(now);
            *due = now + ttl.clamp(shared.options.min_ttl, shared.options.max_ttl);
            *answer = Answer {
                addresses,
                resolved_at: Some(SystemTime::now()),
                stale: false,
                error: None,
                failures: 0,
            };
        }
        Err(e) => {
            shared.counts.failed.fetch_add(1, Ordering::Relaxed);
            answer.failures += 1;
            if answer.error.is_none() {
                log::warn!(
                    "resolving {name}: {e}; {}",
                    if answer.addresses.is_empty() {
                        "it has no endpoints until it resolves".to_string()
                    } else {
                        format!(
                            "its last answer ({} addresses) stays in force",
                            answer.addresses.len()
                        )
                    }
                );
            }
            answer.stale = true;
            answer.error = Some(e.to_string());
            let backoff = RETRY_AFTER_FAILURE * answer.failures.min(5);
            *due = now + backoff.min(shared.options.min_ttl.max(RETRY_AFTER_FAILURE));
        }
    }
    if answer.addresses != before {
        shared.counts.changed.fetch_add(1, Ordering::Relaxed);
        log::info!("{name} resolves to {:?}", answer.addresses);
        shared.changed.notify_one();
    }
}

/// Looks up each name when it is due.
async fn refresh(shared: Arc<Shared>) {
    loop {
        // Armed before the due names are read: a name added meanwhile wakes the loop.
        let names_changed = shared.names_changed.notified();
        let now = Instant::now();
        let due: Vec<String> = lock(&shared)
            .names
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        lookup_all(&shared, due).await;
        // When the next name is due, after the lookups just made.
        let next = lock(&shared).names.values().map(|(_, at)| *at).min();
        let wait = next.map_or(Duration::from_secs(3600), |n| {
            n.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = names_changed => {}
        }
    }
}

/// Every name `services` want resolved.
pub fn names_of<'a>(services: impl IntoIterator<Item = &'a Service>) -> BTreeSet<String> {
    services
        .into_iter()
        .flat_map(|s| s.named.iter().map(|n| n.hostname.to_string()))
        .collect()
}

/// How far each `DNS_ROUND_ROBIN` name of a service has moved on: the name's address in
/// use is its `offset`-th (in address order, wrapping), by frontend and name.
pub type RoundRobin = BTreeMap<(crate::dataplane::Frontend, Arc<str>), usize>;

/// `service`'s endpoints with its named ones resolved by `answers`: the endpoints given by
/// address, then one per address of each name (with `DNS_ROUND_ROBIN`, only the one
/// `round_robin` says). An address already there (two names for one host, or a name for a
/// listed address) is taken once, the first time.
pub fn resolved(
    service: &Service,
    answers: &BTreeMap<String, Answer>,
    round_robin: &RoundRobin,
) -> Arc<[Endpoint]> {
    if service.named.is_empty() {
        return service.endpoints.clone();
    }
    let mut endpoints: Vec<Endpoint> = service
        .endpoints
        .iter()
        .filter(|e| e.hostname.is_none())
        .cloned()
        .collect();
    let mut seen: BTreeSet<(Ipv4Addr, u16)> =
        endpoints.iter().map(|e| (e.address, e.port)).collect();
    for named in service.named.iter() {
        let Some(answer) = answers.get(&*named.hostname) else {
            continue;
        };
        let chosen: Vec<Ipv4Addr> = if named.one_at_a_time {
            let offset = round_robin
                .get(&(service.frontend, named.hostname.clone()))
                .copied()
                .unwrap_or(0);
            let n = answer.addresses.len();
            (n > 0)
                .then(|| answer.addresses[offset % n])
                .into_iter()
                .collect()
        } else {
            answer.addresses.clone()
        };
        for address in chosen {
            if !seen.insert((address, named.port)) {
                continue;
            }
            endpoints.push(Endpoint {
                address,
                port: named.port,
                locality: named.locality.clone(),
                labels: named.labels.clone(),
                weight: named.weight,
                hostname: Some(named.hostname.clone()),
            });
        }
    }
    endpoints.into()
}

/// Whether an answer's `address` is one lb balances to: not a loopback, multicast,
/// broadcast or unspecified address, which a broken or hostile answer could hold.
fn usable(address: Ipv4Addr) -> bool {
    !(address.is_loopback()
        || address.is_multicast()
        || address.is_broadcast()
        || address.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Locality, NamedEndpoint};

    fn service(named: &[(&str, u16, bool)]) -> Service {
        use crate::locality::tests as t;
        let mut s = t::service(vec![t::endpoint("r1/z1")], t::policy(None, false));
        s.named = named
            .iter()
            .map(|(h, port, one)| NamedEndpoint {
                hostname: (*h).into(),
                port: *port,
                locality: Locality::parse("r2/z2"),
                labels: Default::default(),
                weight: 3,
                one_at_a_time: *one,
            })
            .collect();
        s
    }

    fn answers(of: &[(&str, &[[u8; 4]])]) -> BTreeMap<String, Answer> {
        of.iter()
            .map(|(n, a)| {
                (
                    n.to_string(),
                    Answer {
                        addresses: a.iter().map(|o| Ipv4Addr::from(*o)).collect(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// Each address of a name is an endpoint with the named endpoint's fields and the
    /// name as hostname; one only with DNS_ROUND_ROBIN; an address met twice counts once;
    /// a name without an answer has none.
    #[test]
    fn names_become_one_endpoint_per_address() {
        let s = service(&[
            ("a.example", 80, false),
            ("b.example", 80, true),
            ("c.example", 80, false),
        ]);
        let got = resolved(
            &s,
            &answers(&[
                ("a.example", &[[10, 1, 0, 1], [10, 1, 0, 2]]),
                ("b.example", &[[10, 2, 0, 1], [10, 2, 0, 2]]),
            ]),
            &RoundRobin::new(),
        );
        let shown: Vec<String> = got
            .iter()
            .map(|e| {
                format!(
                    "{}:{} {} w{} {}",
                    e.address,
                    e.port,
                    e.locality,
                    e.weight,
                    e.hostname.as_deref().unwrap_or("-")
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "10.0.0.1:8080 r1/z1/ w1 -",
                "10.1.0.1:80 r2/z2/ w3 a.example",
                "10.1.0.2:80 r2/z2/ w3 a.example",
                "10.2.0.1:80 r2/z2/ w3 b.example",
            ]
        );
        // Resolved again from its own output: the same (no endpoint twice).
        let mut again = s.clone();
        again.endpoints = got.clone();
        assert_eq!(
            resolved(
                &again,
                &answers(&[
                    ("a.example", &[[10, 1, 0, 1], [10, 1, 0, 2]]),
                    ("b.example", &[[10, 2, 0, 1]]),
                ]),
                &RoundRobin::new(),
            ),
            got
        );
        // DNS_ROUND_ROBIN moved on by one: the name's next address.
        let moved: RoundRobin = [((s.frontend, "b.example".into()), 1)].into();
        let b: Vec<Ipv4Addr> = resolved(
            &s,
            &answers(&[("b.example", &[[10, 2, 0, 1], [10, 2, 0, 2]])]),
            &moved,
        )
        .iter()
        .filter(|e| e.hostname.as_deref() == Some("b.example"))
        .map(|e| e.address)
        .collect();
        assert_eq!(b, [Ipv4Addr::new(10, 2, 0, 2)]);
    }
}
