//! Active health checks (lb's `HealthCheck` document), as Envoy runs them: each endpoint of
//! a checked service is checked on its own schedule (the interval, plus up to the jitter at
//! random), a check that does not finish within the timeout fails, and an endpoint turns
//! unhealthy after `unhealthy_threshold` failures in a row and healthy again after
//! `healthy_threshold` passes in a row. At most [`CONCURRENT_CHECKS`] checks run at once,
//! across all endpoints. Endpoints start healthy, and are first checked at once: a node
//! whose agent starts does not stop sending to endpoints it has not checked yet.
//!
//! The agent takes an unhealthy endpoint as it takes one ejected by outlier detection: out
//! of the plan (its level's load moves on, as Envoy's priority load does); and a passing
//! check ends an outlier ejection (Envoy's `successful_active_health_check_uneject_host`).
//!
//! Checks are made from the agent's network namespace straight to the endpoint (not
//! through a VIP): TCP (a connection is opened) or HTTP/1.1 `GET` with hyper.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, Hasher},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpStream, sync::Notify, sync::Semaphore, task::JoinHandle};

use crate::{
    dataplane::Frontend,
    model::{HealthCheck, HealthCheckKind},
};

/// Checks running at once, at most.
pub const CONCURRENT_CHECKS: usize = 64;

/// One checked endpoint: the service's frontend, the endpoint's address and port.
pub type Target = (Frontend, Ipv4Addr, u16);

/// What the checks of one endpoint found.
#[derive(Clone, Debug, Serialize)]
pub struct TargetStatus {
    pub healthy: bool,
    pub checks: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// Why the last check failed, while checks fail.
    pub last_error: Option<String>,
}

impl Default for TargetStatus {
    fn default() -> Self {
        Self {
            healthy: true,
            checks: 0,
            failures: 0,
            consecutive_failures: 0,
            consecutive_successes: 0,
            last_error: None,
        }
    }
}

struct Entry {
    check: HealthCheck,
    status: TargetStatus,
    task: JoinHandle<()>,
}

struct Shared {
    entries: Mutex<HashMap<Target, Entry>>,
    /// An endpoint turned healthy or unhealthy.
    changed: Notify,
    permits: Semaphore,
}

/// The agent's health checker; clones share it.
#[derive(Clone)]
pub struct HealthChecker {
    shared: Arc<Shared>,
}

impl Default for HealthChecker {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                entries: Mutex::default(),
                changed: Notify::new(),
                permits: Semaphore::new(CONCURRENT_CHECKS),
            }),
        }
    }
}

impl HealthChecker {
    /// Checks exactly `targets` from now on: new ones (or with another check) start, gone
    /// ones stop; the others go on with their state.
    pub fn sync(&self, targets: impl IntoIterator<Item = (Target, HealthCheck)>) {
        let wanted: HashMap<Target, HealthCheck> = targets.into_iter().collect();
        let mut entries = self.lock();
        entries.retain(|target, entry| {
            let keep = wanted.get(target) == Some(&entry.check);
            if !keep {
                entry.task.abort();
            }
            keep
        });
        for (target, check) in wanted {
            if entries.contains_key(&target) {
                continue;
            }
            let task = tokio::spawn(run(self.shared.clone(), target, check.clone()));
            entries.insert(
                target,
                Entry {
                    check,
                    status: TargetStatus::default(),
                    task,
                },
            );
        }
    }

    /// Every checked endpoint's status.
    pub fn statuses(&self) -> BTreeMap<Target, TargetStatus> {
        self.lock()
            .iter()
            .map(|(t, e)| (*t, e.status.clone()))
            .collect()
    }

    /// Whether `target` fails its checks now.
    pub fn failing(&self, target: &Target) -> bool {
        self.lock().get(target).is_some_and(|e| !e.status.healthy)
    }

    /// Waits for an endpoint to turn healthy or unhealthy.
    pub async fn changed(&self) {
        self.shared.changed.notified().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Entry>> {
        lock(&self.shared)
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, HashMap<Target, Entry>> {
    shared
        .entries
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Up to `max`, at random.
fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_nanos(random % (max.as_nanos() as u64).max(1))
}

/// Checks `target` until it is no longer wanted (its task is aborted).
async fn run(shared: Arc<Shared>, target: Target, check: HealthCheck) {
    let (_, address, port) = target;
    let addr = SocketAddr::from((address, port));
    loop {
        let result = {
            let Ok(_permit) = shared.permits.acquire().await else {
                return;
            };
            match tokio::time::timeout(check.timeout, check_once(&check.kind, addr)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {:?}", check.timeout)),
            }
        };
        let turned = {
            let mut entries = lock(&shared);
            let Some(entry) = entries.get_mut(&target) else {
                return;
            };
            let s = &mut entry.status;
            s.checks += 1;
            let was = s.healthy;
            match result {
                Ok(()) => {
                    s.consecutive_successes += 1;
                    s.consecutive_failures = 0;
                    s.last_error = None;
                    if !s.healthy && s.consecutive_successes >= check.healthy_threshold {
                        s.healthy = true;
                    }
                }
                Err(e) => {
                    s.failures += 1;
                    s.consecutive_failures += 1;
                    s.consecutive_successes = 0;
                    s.last_error = Some(e);
                    if s.healthy && s.consecutive_failures >= check.unhealthy_threshold {
                        s.healthy = false;
                    }
                }
            }
            (was != s.healthy).then(|| (s.healthy, s.last_error.clone()))
        };
        if let Some((healthy, error)) = turned {
            if healthy {
                log::info!("health check of {addr} ({}): passing again", target.0);
            } else {
                log::warn!(
                    "health check of {addr} ({}): failing ({}); it takes no new connections",
                    target.0,
                    error.unwrap_or_default()
                );
            }
            shared.changed.notify_one();
        }
        tokio::time::sleep(check.interval + jitter(check.interval_jitter)).await;
    }
}

/// One check of the endpoint at `addr`.
async fn check_once(kind: &HealthCheckKind, addr: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let HealthCheckKind::Http {
        path,
        host,
        expected_statuses,
    } = kind
    else {
        return Ok(());
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path.as_str())
        .header(
            hyper::header::HOST,
            host.clone().unwrap_or_else(|| addr.to_string()),
        )
        .header(hyper::header::USER_AGENT, "lb-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let response = sender.send_request(request).await;
    driver.abort();
    let status = response
        .map_err(|e| format!("HTTP: {e}"))?
        .status()
        .as_u16();
    if expected_statuses
        .iter()
        .any(|(low, high)| (*low..=*high).contains(&status))
    {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}
