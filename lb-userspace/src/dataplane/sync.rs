//! Brings the data plane to a desired set of services, keeping ids stable across
//! updates so tracked connections and counters keep their meaning.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{bail, Context as _, Result};
use lb_common::{
    maps::{FALLBACK_LEN, MAX_AFFINITY_TIMEOUT_SECS, SERVICE_HTTP, SERVICE_TLS},
    BackendState,
};

use super::{
    selection::{maglev_table, table_size, WeightedBackend},
    Dataplane, Frontend,
};

/// A backend as the control plane wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    /// Priority level seen from this node (0 first); `None` when the backend takes no
    /// traffic by configuration (`distribute`). Orders the failover list.
    pub priority: Option<u32>,
}

/// A service as the control plane wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub frontend: Frontend,
    pub backends: Vec<DesiredBackend>,
    /// Cleartext HTTP/1.x: the data plane reads response statuses.
    pub http: bool,
    /// ClientIP session affinity: how long a client keeps its backend after its last
    /// connection (`None`: no affinity).
    pub session_affinity: Option<std::time::Duration>,
    /// TLS is originated to the backends: the frontend's connections go to the agent's
    /// TLS forwarder (`SERVICE_TLS`), which picks from the same table.
    pub tls: bool,
}

/// The backends a refused or timed-out connection attempt may move to, best first:
/// active ones with a priority, by priority, then by weight (the larger share first).
/// `ids[i]` is the id of `s.backends[i]`.
fn failover_list(s: &DesiredService, ids: &[u32]) -> Vec<u32> {
    let mut eligible: Vec<(u32, std::cmp::Reverse<u32>, u32)> = s
        .backends
        .iter()
        .zip(ids)
        .filter(|(b, _)| b.state == BackendState::Active)
        .filter_map(|(b, &id)| Some((b.priority?, std::cmp::Reverse(b.weight), id)))
        .collect();
    eligible.sort();
    eligible
        .into_iter()
        .take(FALLBACK_LEN as usize)
        .map(|(_, _, id)| id)
        .collect()
}

/// A backend of one service: the service's frontend, the backend's address and port.
pub type BackendKey = (Frontend, Ipv4Addr, u16);

/// A backend and the id it has.
type IdOf = (BackendKey, u32);

/// What a published table was built from: backends, size, failover list, HTTP flag,
/// session-affinity timeout (seconds), TLS flag.
type PublishedTable = (Vec<WeightedBackend>, usize, Vec<u32>, bool, u32, bool);

/// A digest of a [`PublishedTable`]: what the programmer keeps per service to tell
/// whether a table must be built again (8 bytes where the inputs take kilobytes; two
/// different inputs share a digest with a chance of 2^-64, SipHash with fixed keys).
fn digest(inputs: &PublishedTable) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    #[expect(
        deprecated,
        reason = "SipHasher's fixed keys make digests stable within a run; any would do"
    )]
    let mut h = std::hash::SipHasher::new();
    inputs.hash(&mut h);
    h.finish()
}

/// The session-affinity timeout the data plane gets, in whole seconds (0: none): rounded
/// up (a timeout is never cut short), at most a day, as Kubernetes allows.
pub fn affinity_secs(timeout: Option<std::time::Duration>) -> u32 {
    timeout.map_or(0, |t| {
        let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
        secs.min(u64::from(MAX_AFFINITY_TIMEOUT_SECS)) as u32
    })
}

/// Remembers which ids the data plane uses for which service and backend, and what it
/// last wrote, so an update writes only what changed: an ejection in one service touches
/// one backend entry and one table, however many services there are.
#[derive(Default)]
pub struct Programmer {
    services: BTreeMap<Frontend, u32>,
    backends: BTreeMap<BackendKey, u32>,
    /// The reverse of `backends`: what an id the data plane reports stands for.
    backend_keys: ById<BackendKey>,
    /// Last state written per backend id.
    written_backends: ById<(Ipv4Addr, u16, BackendState)>,
    /// Digest of the inputs of the last table published per service id.
    written_tables: std::collections::HashMap<u32, u64>,
    /// Service id last written per backend id in the backend → service map.
    written_owners: ById<u32>,
    /// Where the search for the next free backend id starts (after the last one taken).
    backend_cursor: u32,
}

/// Values by id, in a vector: backend ids are dense (handed out from 1 up), so a million
/// backends' entries take a vector's bytes rather than a tree's nodes and allocations.
struct ById<T> {
    values: Vec<Option<T>>,
}

impl<T> Default for ById<T> {
    fn default() -> Self {
        Self { values: Vec::new() }
    }
}

impl<T> ById<T> {
    fn get(&self, id: &u32) -> Option<&T> {
        self.values.get(*id as usize)?.as_ref()
    }

    fn insert(&mut self, id: u32, value: T) {
        let i = id as usize;
        if i >= self.values.len() {
            self.values.resize_with(i + 1, || None);
        }
        self.values[i] = Some(value);
    }

    fn remove(&mut self, id: &u32) -> Option<T> {
        self.values.get_mut(*id as usize)?.take()
    }

    fn contains_key(&self, id: &u32) -> bool {
        self.get(id).is_some()
    }

    fn clear(&mut self) {
        self.values.clear();
    }
}

/// Finds a free id in `1..limit`, searching from `cursor` (where the last one was found)
/// and wrapping, so allocating many ids in a row costs O(1) each.
fn allocate(used: impl Fn(u32) -> bool, cursor: &mut u32, limit: u32) -> Option<u32> {
    let start = (*cursor).clamp(1, limit.max(2) - 1);
    let id = (start..limit).chain(1..start).find(|&id| !used(id))?;
    *cursor = id + 1;
    Some(id)
}

/// Every backend of `frontend`, as a range of [`BackendKey`]s (of the programmer's ids, or
/// of the configuration's states, which have the same keys).
pub fn backends_of(frontend: Frontend) -> std::ops::RangeInclusive<BackendKey> {
    (frontend, Ipv4Addr::UNSPECIFIED, 0)..=(frontend, Ipv4Addr::BROADCAST, u16::MAX)
}

impl Programmer {
    /// Updates one service already applied, whose backends are unchanged but whose
    /// weights or states changed (a health decision): writes only its changed backends and
    /// its table. Much cheaper than `apply` when there are many services.
    pub fn update_service(&mut self, dp: &mut Dataplane, s: &DesiredService) -> Result<()> {
        let Some(&id) = self.services.get(&s.frontend) else {
            bail!("service {} ({}) was never applied", s.name, s.frontend);
        };
        let ids = s
            .backends
            .iter()
            .map(|b| {
                self.backends
                    .get(&(s.frontend, b.addr, b.port))
                    .copied()
                    .with_context(|| {
                        format!(
                            "service {}: backend {}:{} was never applied",
                            s.name, b.addr, b.port
                        )
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        // Backends coming back are made active before the table that names them, and
        // backends leaving are marked after the table that no longer names them: a new
        // connection never meets a table whose every slot holds an inactive backend.
        self.write_backends(dp, s, &ids, |state| state == BackendState::Active)?;
        self.publish_table(dp, id, s, &ids)?;
        self.write_backends(dp, s, &ids, |state| state != BackendState::Active)
    }

    /// Writes the backends of `s` whose desired state passes `which` and changed.
    fn write_backends(
        &mut self,
        dp: &mut Dataplane,
        s: &DesiredService,
        ids: &[u32],
        which: impl Fn(BackendState) -> bool,
    ) -> Result<()> {
        let mut changed = Vec::new();
        for (b, &bid) in s.backends.iter().zip(ids).filter(|(b, _)| which(b.state)) {
            let value = (b.addr, b.port, b.state);
            if self.written_backends.get(&bid) != Some(&value) {
                changed.push((bid, b.addr, b.port, b.state));
            }
        }
        self.write_backend_entries(dp, &changed)
    }

    /// Writes backend entries (in few calls) and records them as written.
    fn write_backend_entries(
        &mut self,
        dp: &mut Dataplane,
        entries: &[(u32, Ipv4Addr, u16, BackendState)],
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        dp.set_backends(entries)?;
        for &(bid, addr, port, state) in entries {
            self.written_backends.insert(bid, (addr, port, state));
        }
        Ok(())
    }

    /// Builds and publishes service `id`'s Maglev table if its inputs changed (`ids[i]`:
    /// the id of `s.backends[i]`).
    fn publish_table(
        &mut self,
        dp: &mut Dataplane,
        id: u32,
        s: &DesiredService,
        ids: &[u32],
    ) -> Result<()> {
        let table_slots = dp.options().table_slots as usize;
        // Only active backends get slots; the kernel also re-checks each pick's state,
        // which covers a state change that reaches it before the next table does.
        let weighted: Vec<WeightedBackend> = s
            .backends
            .iter()
            .zip(ids)
            .filter(|(b, _)| b.state == BackendState::Active)
            .map(|(b, &id)| WeightedBackend {
                id,
                key: (u64::from(u32::from(b.addr)) << 16) | u64::from(b.port),
                weight: u64::from(b.weight),
            })
            .collect();
        // The failover list shares the table's window.
        let size = table_size(s.backends.len(), table_slots - FALLBACK_LEN as usize);
        let fallback = failover_list(s, ids);
        let inputs = (
            weighted,
            size,
            fallback,
            s.http,
            affinity_secs(s.session_affinity),
            s.tls,
        );
        let digest = digest(&inputs);
        if self.written_tables.get(&id) != Some(&digest) {
            let table = maglev_table(&inputs.0, size);
            let flags = if s.http { SERVICE_HTTP } else { 0 } | if s.tls { SERVICE_TLS } else { 0 };
            dp.publish_service(id, &s.frontend, &table, &inputs.2, flags, inputs.4)?;
            self.written_tables.insert(id, digest);
        }
        Ok(())
    }

    /// Rebuilds the ids an earlier agent gave services and backends from the maps it left
    /// (services map, backends map, backend → service map), so they stay the same: tracked
    /// connections, statistics and the `lb` commands keep their meaning across a restart.
    /// What each backend entry holds counts as written (an unchanged backend is not written
    /// again); every table is published once more (same contents, other half). Backend
    /// entries of no known service are cleared. Returns each backend's state as found, for
    /// the caller to carry over ejections and drains.
    pub fn adopt(dp: &mut Dataplane) -> Result<(Self, BTreeMap<BackendKey, BackendState>)> {
        let mut p = Self::default();
        let mut frontends = BTreeMap::new();
        for (key, svc) in dp.service_entries()? {
            if let Some(frontend) = Frontend::from_key(&key) {
                p.services.insert(frontend, svc.id);
                frontends.insert(svc.id, frontend);
            }
        }
        let mut states = BTreeMap::new();
        for id in 1..dp.options().max_backends {
            let backend = dp.backend(id)?;
            if backend.family != lb_common::family::V4 {
                continue;
            }
            let owner = dp.backend_service(id)?;
            let Some(&frontend) = frontends.get(&owner) else {
                dp.clear_backend(id)?;
                dp.set_backend_service(id, 0)?;
                continue;
            };
            let addr = Ipv4Addr::from(backend.addr.v4_octets());
            let port = u16::from_be(backend.port_be);
            let state = BackendState::from_u8(backend.state);
            let key = (frontend, addr, port);
            p.backends.insert(key, id);
            p.backend_keys.insert(id, key);
            p.written_backends.insert(id, (addr, port, state));
            p.written_owners.insert(id, owner);
            states.insert(key, state);
        }
        Ok((p, states))
    }

    /// Forgets what was written, so the next `apply` writes every backend and table again
    /// (after the maps were changed by other means).
    pub fn forget_written(&mut self) {
        self.written_backends.clear();
        self.written_tables.clear();
        self.written_owners.clear();
    }

    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.services.get(frontend).copied()
    }

    /// The service frontend, address and port that backend `id` stands for.
    pub fn backend_key(&self, id: u32) -> Option<(Frontend, Ipv4Addr, u16)> {
        self.backend_keys.get(&id).copied()
    }

    pub fn backend_id(&self, frontend: &Frontend, addr: Ipv4Addr, port: u16) -> Option<u32> {
        self.backends.get(&(*frontend, addr, port)).copied()
    }

    /// Applies `desired`. Checks capacity first, so a configuration that does not fit is
    /// refused before anything in the kernel changes.
    pub fn apply(&mut self, dp: &mut Dataplane, desired: &[DesiredService]) -> Result<()> {
        let opts = dp.options().clone();
        let mut frontends = BTreeSet::new();
        for s in desired {
            if !frontends.insert(s.frontend) {
                bail!(
                    "service {}: frontend {} is defined twice",
                    s.name,
                    s.frontend
                );
            }
        }
        if desired.len() as u32 >= opts.max_services {
            bail!(
                "{} services do not fit dataplane.max_services = {} (one id is reserved)",
                desired.len(),
                opts.max_services
            );
        }
        let wanted_backends: usize = desired.iter().map(|s| s.backends.len()).sum();
        if wanted_backends as u32 >= opts.max_backends {
            bail!(
                "{wanted_backends} backends do not fit dataplane.max_backends = {} (id 0 is reserved)",
                opts.max_backends
            );
        }

        // Services no longer wanted go first: their ids and their backends' are then free
        // for the others. Each wanted service is then brought up on its own (its new
        // backends, its table in one step, then its gone backends cleared), those that
        // give ids back before those that need more, so that a configuration that fits
        // also fits on the way (a service that grows while another shrinks).
        let stale_services: Vec<(Frontend, u32)> = self
            .services
            .iter()
            .filter(|(f, _)| !frontends.contains(f))
            .map(|(f, id)| (*f, *id))
            .collect();
        let mut steps: Vec<(&DesiredService, usize, Vec<IdOf>)> = desired
            .iter()
            .map(|s| {
                let (new, stale) = self.changes_of(s);
                (s, new, stale)
            })
            .collect();
        steps.sort_by_key(|(_, new, stale)| *new as i64 - stale.len() as i64);
        let freed: usize = stale_services
            .iter()
            .map(|(f, _)| self.backends.range(backends_of(*f)).count())
            .sum();
        let mut in_use = self.backends.len() - freed;
        for (s, new, stale) in &steps {
            if (in_use + new) as u32 >= opts.max_backends {
                bail!(
                    "service {}: {new} more backends do not fit dataplane.max_backends = {} \
                     while the configuration is applied ({in_use} in use at that point; id 0 \
                     is reserved)",
                    s.name,
                    opts.max_backends
                );
            }
            in_use = in_use + new - stale.len();
        }

        for (frontend, id) in stale_services {
            dp.remove_service(id, &frontend)?;
            self.services.remove(&frontend);
            self.written_tables.remove(&id);
            let gone: Vec<(BackendKey, u32)> = self
                .backends
                .range(backends_of(frontend))
                .map(|(k, id)| (*k, *id))
                .collect();
            for (key, id) in gone {
                self.remove_backend(dp, key, id)?;
            }
        }
        let mut used: BTreeSet<u32> = self.services.values().copied().collect();
        let mut cursor = 1;
        for (s, _, stale) in steps {
            let id = match self.services.get(&s.frontend) {
                Some(&id) => id,
                None => {
                    let id = allocate(|id| used.contains(&id), &mut cursor, opts.max_services)
                        .expect("capacity checked above");
                    used.insert(id);
                    self.services.insert(s.frontend, id);
                    id
                }
            };
            self.bring_up(dp, id, s, stale)?;
        }
        Ok(())
    }

    /// How many backends of `s` are new (need an id), and which of the backends applied
    /// for its frontend it no longer has.
    fn changes_of(&self, s: &DesiredService) -> (usize, Vec<(BackendKey, u32)>) {
        let wanted: std::collections::HashSet<(Ipv4Addr, u16)> =
            s.backends.iter().map(|b| (b.addr, b.port)).collect();
        let stale = self
            .backends
            .range(backends_of(s.frontend))
            .filter(|((_, addr, port), _)| !wanted.contains(&(*addr, *port)))
            .map(|(k, id)| (*k, *id))
            .collect();
        let new = s
            .backends
            .iter()
            .filter(|b| !self.backends.contains_key(&(s.frontend, b.addr, b.port)))
            .count();
        (new, stale)
    }

    /// Brings service `id` to `s`: its new backends first (every id its table names is
    /// valid before the table), its table in one step, then its `stale` backends cleared.
    fn bring_up(
        &mut self,
        dp: &mut Dataplane,
        id: u32,
        s: &DesiredService,
        stale: Vec<(BackendKey, u32)>,
    ) -> Result<()> {
        let ids = self.write_all_backends(dp, s)?;
        self.write_owners_and_table(dp, id, s, &ids)?;
        for (key, bid) in stale {
            self.remove_backend(dp, key, bid)?;
        }
        Ok(())
    }

    /// Applies one service already applied whose backends may have changed (new ones,
    /// gone ones, other weights and states), without looking at any other service: the
    /// path of a cluster's endpoint changes, which costs the same however many services
    /// there are. Checks capacity first.
    pub fn apply_service(&mut self, dp: &mut Dataplane, s: &DesiredService) -> Result<()> {
        let Some(&id) = self.services.get(&s.frontend) else {
            bail!("service {} ({}) was never applied", s.name, s.frontend);
        };
        let distinct: std::collections::HashSet<(Ipv4Addr, u16)> =
            s.backends.iter().map(|b| (b.addr, b.port)).collect();
        if distinct.len() != s.backends.len() {
            bail!(
                "service {} ({}): a backend is listed twice",
                s.name,
                s.frontend
            );
        }
        let (new, stale) = self.changes_of(s);
        let max_backends = dp.options().max_backends;
        if (self.backends.len() + new) as u32 >= max_backends {
            bail!(
                "service {}: {} more backends do not fit dataplane.max_backends = {} (id 0 \
                 is reserved; {} are in use)",
                s.name,
                new,
                max_backends,
                self.backends.len()
            );
        }
        self.bring_up(dp, id, s, stale)
    }

    /// Gives every backend of `s` an id (new ones the next free id) and writes those
    /// whose entry changed. Returns the ids, in the order of `s.backends`.
    fn write_all_backends(&mut self, dp: &mut Dataplane, s: &DesiredService) -> Result<Vec<u32>> {
        let max_backends = dp.options().max_backends;
        let mut changed = Vec::new();
        let mut ids = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            let key = (s.frontend, b.addr, b.port);
            let id = match self.backends.entry(key) {
                std::collections::btree_map::Entry::Occupied(e) => *e.get(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let keys = &self.backend_keys;
                    let id = allocate(
                        |id| keys.contains_key(&id),
                        &mut self.backend_cursor,
                        max_backends,
                    )
                    .context("no free backend id (capacity is checked before)")?;
                    e.insert(id);
                    self.backend_keys.insert(id, key);
                    id
                }
            };
            ids.push(id);
            let value = (b.addr, b.port, b.state);
            if self.written_backends.get(&id) != Some(&value) {
                changed.push((id, b.addr, b.port, b.state));
            }
        }
        self.write_backend_entries(dp, &changed)?;
        Ok(ids)
    }

    /// Records which service each backend of `s` belongs to, for `lb` commands and
    /// session affinity (which follows a client's backend only while it is the
    /// service's), then publishes its table: the owners before the table that names them.
    fn write_owners_and_table(
        &mut self,
        dp: &mut Dataplane,
        id: u32,
        s: &DesiredService,
        ids: &[u32],
    ) -> Result<()> {
        let changed: Vec<(u32, u32)> = ids
            .iter()
            .filter(|bid| self.written_owners.get(bid) != Some(&id))
            .map(|&bid| (bid, id))
            .collect();
        if !changed.is_empty() {
            dp.set_backend_services(&changed)?;
            for (bid, _) in changed {
                self.written_owners.insert(bid, id);
            }
        }
        self.publish_table(dp, id, s, ids)
    }

    /// Clears backend `id` (`key`) in the data plane and forgets it; its id is free again.
    fn remove_backend(&mut self, dp: &mut Dataplane, key: BackendKey, id: u32) -> Result<()> {
        dp.clear_backend(id)?;
        dp.set_backend_service(id, 0)?;
        self.written_owners.remove(&id);
        self.backends.remove(&key);
        self.backend_keys.remove(&id);
        self.written_backends.remove(&id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Protocol;

    fn backend(
        last: u8,
        weight: u32,
        state: BackendState,
        priority: Option<u32>,
    ) -> DesiredBackend {
        DesiredBackend {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 80,
            weight,
            state,
            priority,
        }
    }

    /// The failover list: active backends with a priority, by priority, then by weight
    /// (larger first); never ejected, draining or `distribute`-excluded ones.
    #[test]
    fn failover_list_is_by_priority_then_weight() {
        let s = DesiredService {
            name: "svc".into(),
            frontend: Frontend {
                vip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                protocol: Protocol::Tcp,
            },
            backends: vec![
                backend(1, 10, BackendState::Active, Some(1)),
                backend(2, 30, BackendState::Active, Some(0)),
                backend(3, 50, BackendState::Ejected, Some(0)),
                backend(4, 60, BackendState::Active, Some(0)),
                backend(5, 90, BackendState::Draining, Some(0)),
                backend(6, 0, BackendState::Active, None),
                backend(7, 5, BackendState::Active, Some(2)),
            ],
            http: false,
            session_affinity: None,
            tls: false,
        };
        let ids: Vec<u32> = s
            .backends
            .iter()
            .map(|b| u32::from(b.addr.octets()[3]))
            .collect();
        let list = failover_list(&s, &ids);
        assert_eq!(list, vec![4, 2, 1, 7]);
    }

    /// Timeouts become whole seconds, rounded up and capped at Kubernetes' maximum.
    #[test]
    fn affinity_timeouts_are_whole_seconds() {
        use std::time::Duration;
        assert_eq!(affinity_secs(None), 0);
        assert_eq!(affinity_secs(Some(Duration::from_secs(10800))), 10800);
        assert_eq!(affinity_secs(Some(Duration::from_millis(1500))), 2);
        assert_eq!(affinity_secs(Some(Duration::from_millis(1))), 1);
        assert_eq!(affinity_secs(Some(Duration::from_secs(100_000))), 86_400);
    }

    #[test]
    fn failover_list_is_bounded() {
        let s = DesiredService {
            name: "svc".into(),
            frontend: Frontend {
                vip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                protocol: Protocol::Tcp,
            },
            backends: (1..=40)
                .map(|i| backend(i, 1, BackendState::Active, Some(0)))
                .collect(),
            http: false,
            session_affinity: None,
            tls: false,
        };
        assert_eq!(
            failover_list(&s, &(1..=40).collect::<Vec<u32>>()).len(),
            FALLBACK_LEN as usize
        );
    }
}
