//! TLS origination: a client calls a frontend in plain text, and the node opens TLS to
//! the backend (a DestinationRule's `trafficPolicy.tls.mode: SIMPLE` or `MUTUAL`), as
//! Istio's sidecar does for an egress ServiceEntry.
//!
//! The path of a connection:
//! 1. the frontend is published with `SERVICE_TLS` and its VIP is made a local address
//!    (`routes`): TC and XDP pass its packets, and `lb_sk_lookup` hands its connections to
//!    the forwarder's one listener (`Dataplane::steer_tls`); the accepted socket's local
//!    address is the frontend the client called;
//! 2. the forwarder picks the backend as the kernel does, from the same published table
//!    and with the same code (`lb_common::selection` over a `SelectionReader`);
//! 3. it connects and completes the TLS handshake under one deadline; a refusal, a
//!    timeout or a failed handshake (a wrong certificate, say) moves the connection to the
//!    next backend of the failover list, up to `connect_retries`: no byte of the client
//!    has gone upstream yet, so this is safe for any protocol;
//! 4. then bytes are copied both ways; on HTTP ports the responses' status lines are read
//!    from the decrypted stream, so `consecutive5xxErrors` works under TLS too.
//!
//! Each attempt's outcome feeds outlier detection like the kernel's signals do
//! ([`ForwarderEvent`], applied by the agent). The connections live in this process: an
//! agent stopped by SIGKILL loses them (clients see a reset); SYNs that arrive while no
//! agent runs are held back by the kernel until the next one listens.

mod client_config;
pub mod routes;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context as _, Result};
use lb_common::{family, flow_hash, proto, AddrBe, FlowKey};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

pub use client_config::client_config;

use crate::{
    dataplane::{reader::SelectionReader, Frontend, Protocol},
    model::Service,
    outlier::Event,
};

/// One attempt (TCP connect and TLS handshake) takes at most this long.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections forwarded at once unless told otherwise (`--tls-max-connections`);
/// beyond, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 16_384;

/// After its listener left the SOCKMAP, a stopping forwarder still accepts for this long:
/// a handshake the kernel began with it just before ends in its accept queue, not in a
/// reset (a lost final ACK is sent again within a second).
const HANDOFF: Duration = Duration::from_millis(1200);

/// What the forwarder needs of one TLS frontend.
pub struct TlsFrontend {
    /// The service's name, for messages.
    pub name: String,
    pub connector: TlsConnector,
    /// The DestinationRule's `sni`: sent and checked instead of each endpoint's name.
    pub sni: Option<ServerName<'static>>,
    /// Each endpoint's DNS name (endpoints known by name), for SNI and the name check.
    pub hostnames: HashMap<SocketAddrV4, String>,
    /// HTTP/1.x: response statuses are read for outlier detection.
    pub http: bool,
    /// The settings `connector` was built from.
    settings: crate::model::TlsOrigination,
}

impl TlsFrontend {
    pub fn new(svc: &Service) -> Result<Option<Self>> {
        Self::reusing(svc, None)
    }

    /// Like `new`, taking `earlier`'s client configuration when its settings are the
    /// same: an endpoint change (a new DNS answer) then reads no certificate file and no
    /// system CA bundle again.
    pub fn reusing(svc: &Service, earlier: Option<&TlsFrontend>) -> Result<Option<Self>> {
        let Some(tls) = &svc.policy.tls else {
            return Ok(None);
        };
        let connector = match earlier.filter(|e| e.settings == *tls) {
            Some(e) => e.connector.clone(),
            None => TlsConnector::from(
                client_config(tls).with_context(|| format!("{}: trafficPolicy.tls", svc.name))?,
            ),
        };
        let sni = tls
            .sni
            .as_ref()
            .map(|s| ServerName::try_from(s.clone()))
            .transpose()
            .with_context(|| format!("{}: trafficPolicy.tls.sni is not a DNS name", svc.name))?;
        Ok(Some(Self {
            name: svc.name.clone(),
            connector,
            sni,
            hostnames: svc
                .endpoints
                .iter()
                .filter_map(|e| {
                    let name = e.hostname.clone()?;
                    Some((SocketAddrV4::new(e.address, e.port), name.to_string()))
                })
                .collect(),
            http: svc.http,
            settings: tls.clone(),
        }))
    }

    /// The name sent as SNI and checked on `endpoint`'s certificate: the rule's `sni`,
    /// else the endpoint's DNS name, else its address.
    fn server_name(&self, endpoint: SocketAddrV4) -> ServerName<'static> {
        if let Some(sni) = &self.sni {
            return sni.clone();
        }
        self.hostnames
            .get(&endpoint)
            .and_then(|h| ServerName::try_from(h.clone()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(std::net::IpAddr::V4(*endpoint.ip()).into()))
    }
}

/// The TLS frontends in force; the agent replaces the table at each change.
pub type Frontends = Arc<RwLock<Arc<HashMap<Frontend, Arc<TlsFrontend>>>>>;

/// An attempt's outcome, for outlier detection: applied by the agent as it applies the
/// kernel's signals.
#[derive(Clone, Debug)]
pub struct ForwarderEvent {
    /// `VIP:PORT` of the frontend.
    pub service: String,
    pub endpoint: SocketAddrV4,
    pub event: Event,
}

/// What the forwarder did per endpoint, for the views.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EndpointCounts {
    /// Connections forwarded to it (handshake completed).
    pub connections: u64,
    /// Connects refused or unreachable.
    pub connect_failures: u64,
    /// Attempts that took longer than the deadline.
    pub timeouts: u64,
    /// TLS handshakes that failed, by reason (a bad certificate, a protocol error).
    pub tls_errors: std::collections::BTreeMap<String, u64>,
    /// Bytes from the client to it, and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Successes: HTTP responses below 500 on HTTP ports, else connections forwarded.
    pub successes: u64,
    /// The services (`VIP:PORT`) whose last outcome reported for it was a failure.
    #[serde(skip)]
    failing_in: std::collections::BTreeSet<String>,
}

/// The forwarder's counters, shared with the admin views.
#[derive(Default)]
pub struct Counts {
    pub endpoints: Mutex<std::collections::BTreeMap<SocketAddrV4, EndpointCounts>>,
    /// Connections closed because no backend could be reached (all attempts failed, or
    /// none was eligible).
    pub unserved: std::sync::atomic::AtomicU64,
    /// Connections in progress now.
    pub active: std::sync::atomic::AtomicU64,
    /// Connections closed after no byte went either way for the idle timeout.
    pub idle_closed: std::sync::atomic::AtomicU64,
    /// Connections refused because `--tls-max-connections` were in progress (also in
    /// `unserved`).
    pub over_limit: std::sync::atomic::AtomicU64,
    /// The connections being forwarded now, for `lb conntrack`.
    pub live: Mutex<HashMap<u64, LiveConnection>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// One connection the forwarder carries now.
#[derive(Clone, Debug, Serialize)]
pub struct LiveConnection {
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    /// The backend it was forwarded to.
    pub backend: SocketAddrV4,
    pub service: String,
    #[serde(skip)]
    pub since: std::time::Instant,
}

/// A connection's place in [`Counts::live`], left when dropped (however the connection
/// ends).
struct LiveEntry<'a> {
    counts: &'a Counts,
    id: u64,
}

impl Drop for LiveEntry<'_> {
    fn drop(&mut self) {
        self.counts
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl EndpointCounts {
    /// Every attempt made to it: forwarded, or failed.
    pub fn attempts(&self) -> u64 {
        self.connections
            + self.connect_failures
            + self.timeouts
            + self.tls_errors.values().sum::<u64>()
    }
}

impl Counts {
    fn enter(&self, connection: LiveConnection) -> LiveEntry<'_> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, connection);
        LiveEntry { counts: self, id }
    }

    /// The connections carried now, oldest first, with their age in seconds.
    pub fn live(&self) -> Vec<(LiveConnection, f64)> {
        let mut all: Vec<_> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| (c.clone(), c.since.elapsed().as_secs_f64()))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all
    }

    /// `endpoint`'s counters (zero when the forwarder never tried it).
    pub fn of(&self, endpoint: SocketAddrV4) -> EndpointCounts {
        self.endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&endpoint)
            .cloned()
            .unwrap_or_default()
    }

    fn with(&self, endpoint: SocketAddrV4, f: impl FnOnce(&mut EndpointCounts)) {
        let mut all = self
            .endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(all.entry(endpoint).or_default());
    }
}

/// What bounds the forwarder's work.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections forwarded at once.
    pub max_connections: usize,
    /// A connection idle (no byte either way) for this long is closed.
    pub idle_timeout: Duration,
}

pub struct Forwarder {
    pub frontends: Frontends,
    reader: SelectionReader,
    events: mpsc::UnboundedSender<ForwarderEvent>,
    pub counts: Arc<Counts>,
    connect_retries: u32,
    slots: Arc<tokio::sync::Semaphore>,
    /// A connection with no byte either way for this long is closed (the data plane's
    /// `tcp_established` timeout, which forgets idle connections of the kernel path).
    idle_timeout: Duration,
    /// Notified when the agent stops: the listener is closed, connections go on.
    stop_accepting: tokio::sync::Notify,
}

impl Forwarder {
    pub fn new(
        reader: SelectionReader,
        connect_retries: u32,
        limits: Limits,
        events: mpsc::UnboundedSender<ForwarderEvent>,
    ) -> Self {
        Self {
            frontends: Arc::default(),
            reader,
            events,
            counts: Arc::default(),
            connect_retries,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1))),
            idle_timeout: limits.idle_timeout,
            stop_accepting: tokio::sync::Notify::new(),
        }
    }

    /// Stops taking connections: the listener, already out of the SOCKMAP
    /// (`Dataplane::stop_tls_steering`), accepts what the kernel had begun for it, then is
    /// closed. The connections in progress go on.
    pub fn stop_accepting(&self) {
        self.stop_accepting.notify_one();
    }

    /// Waits, up to `timeout`, for the connections in progress to end; returns how many
    /// were still open.
    pub async fn drain(&self, timeout: Duration) -> u64 {
        let active = || {
            self.counts
                .active
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let deadline = tokio::time::Instant::now() + timeout;
        while active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        active()
    }

    /// Accepts the connections `lb_sk_lookup` hands to `listener`, until the agent stops.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let stopping = self.stop_accepting.notified();
        tokio::pin!(stopping);
        let mut handoff_ends = None;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = &mut stopping, if handoff_ends.is_none() => {
                    handoff_ends = Some(tokio::time::Instant::now() + HANDOFF);
                    continue;
                }
                _ = tokio::time::sleep_until(handoff_ends.unwrap_or_else(tokio::time::Instant::now)),
                    if handoff_ends.is_some() => return,
            };
            let (client, _) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    log::warn!("TLS forwarder: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                // Full: dropped at once (the client sees a reset), counted.
                let _ = client.set_zero_linger();
                for counter in [&self.counts.unserved, &self.counts.over_limit] {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                continue;
            };
            let forwarder = self.clone();
            tokio::spawn(async move {
                forwarder
                    .counts
                    .active
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = forwarder.forward(client).await {
                    log::debug!("TLS forwarder: {e:#}");
                }
                forwarder
                    .counts
                    .active
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                drop(permit);
            });
        }
    }

    /// Passes an outcome to outlier detection. A success matters to it only after a
    /// failure (it resets the consecutive counts; success rates are not computed), so
    /// successes are counted here and only the first one after a failure is sent: the
    /// agent then does no work per request on a healthy endpoint.
    fn report(&self, service: &str, endpoint: SocketAddrV4, event: Event) {
        let success = match event {
            Event::Success => true,
            Event::HttpStatus(status) => status < 500,
            Event::ConnectFailure | Event::Timeout | Event::Reset => false,
        };
        let mut send = true;
        self.counts.with(endpoint, |c| {
            if success {
                c.successes += 1;
                send = c.failing_in.remove(service);
            } else if !c.failing_in.contains(service) {
                c.failing_in.insert(service.to_string());
            }
        });
        if !send {
            return;
        }
        let _ = self.events.send(ForwarderEvent {
            service: service.to_string(),
            endpoint,
            event,
        });
    }

    /// One client connection: a backend chosen, connected over TLS (the next backend of
    /// the failover list after a failed attempt), then bytes copied both ways.
    async fn forward(&self, client: TcpStream) -> Result<()> {
        let (SocketAddr::V4(local), SocketAddr::V4(peer)) =
            (client.local_addr()?, client.peer_addr()?)
        else {
            anyhow::bail!("not IPv4");
        };
        let frontend = Frontend {
            vip: *local.ip(),
            port: local.port(),
            protocol: Protocol::Tcp,
        };
        let target = self
            .frontends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&frontend)
            .cloned()
            .with_context(|| format!("{frontend} is not a TLS frontend (any more)"))?;
        let service = format!("{}:{}", frontend.vip, frontend.port);
        let (upstream, endpoint) = match self.connect(&frontend, &target, &service, peer).await {
            Some(connected) => connected,
            None => {
                self.counts
                    .unserved
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // A reset, as the kernel path gives when no backend answers.
                let _ = client.set_zero_linger();
                anyhow::bail!("{}: no backend reachable for {peer}", target.name);
            }
        };
        let _ = client.set_nodelay(true);
        let _live = self.counts.enter(LiveConnection {
            client: peer,
            frontend: local,
            backend: endpoint,
            service: target.name.clone(),
            since: std::time::Instant::now(),
        });
        self.copy(client, upstream, endpoint, &target, &service)
            .await
    }

    /// Picks and connects a backend: the table's pick, then the failover list's.
    async fn connect(
        &self,
        frontend: &Frontend,
        target: &TlsFrontend,
        service: &str,
        client: SocketAddrV4,
    ) -> Option<(TlsStream<TcpStream>, SocketAddrV4)> {
        let flow = FlowKey {
            src: AddrBe::v4(client.ip().octets()),
            dst: AddrBe::v4(frontend.vip.octets()),
            src_port_be: client.port().to_be(),
            dst_port_be: frontend.port.to_be(),
            proto: proto::TCP,
            family: family::V4,
            ..FlowKey::default()
        };
        let slot = |s| self.reader.slot(s);
        let backend = |id| self.reader.backend(id);
        let (_, (first, mut chosen, _)) = self.reader.consistent(frontend, |svc| {
            lb_common::selection::select(
                svc.table_offset,
                svc.table_len,
                flow_hash(&flow),
                slot,
                backend,
            )
        })?;
        let mut id = first;
        let mut cursor = 0;
        for attempt in 0..=self.connect_retries {
            let endpoint = SocketAddrV4::new(
                Ipv4Addr::from(chosen.addr.v4_octets()),
                u16::from_be(chosen.port_be),
            );
            match self.attempt(target, endpoint).await {
                Ok(tls) => {
                    self.counts.with(endpoint, |c| c.connections += 1);
                    if !target.http {
                        // As the kernel counts a completed handshake; on HTTP ports the
                        // response decides.
                        self.report(service, endpoint, Event::Success);
                    }
                    return Some((tls, endpoint));
                }
                Err(failure) => {
                    log::info!(
                        "{}: {endpoint} failed ({failure}){}",
                        target.name,
                        if attempt < self.connect_retries {
                            ", trying the next backend"
                        } else {
                            ""
                        }
                    );
                    self.counts.with(endpoint, |c| match &failure {
                        Failure::Connect(_) => c.connect_failures += 1,
                        Failure::Timeout => c.timeouts += 1,
                        Failure::Tls(kind) => *c.tls_errors.entry(kind.clone()).or_default() += 1,
                    });
                    let event = match failure {
                        Failure::Timeout => Event::Timeout,
                        // Envoy counts a failed upstream TLS handshake as a connect failure.
                        Failure::Connect(_) | Failure::Tls(_) => Event::ConnectFailure,
                    };
                    self.report(service, endpoint, event);
                }
            }
            if attempt == self.connect_retries {
                break;
            }
            // The service as published now: an ejection may have changed its list.
            let (_, (next, pos)) = self.reader.consistent(frontend, |svc| {
                lb_common::selection::next_in_failover_list(
                    svc.table_offset + svc.table_len,
                    u32::from(svc.fallback_len),
                    cursor,
                    [id, first],
                    slot,
                    backend,
                )
            })?;
            id = next;
            cursor = pos + 1;
            chosen = self.reader.backend(id)?;
        }
        None
    }

    /// One TCP connect and TLS handshake, under one deadline.
    async fn attempt(
        &self,
        target: &TlsFrontend,
        endpoint: SocketAddrV4,
    ) -> Result<TlsStream<TcpStream>, Failure> {
        let name = target.server_name(endpoint);
        let work = async {
            let tcp = TcpStream::connect(endpoint)
                .await
                .map_err(|e| Failure::Connect(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            target
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| Failure::Tls(tls_error_kind(&e)))
        };
        tokio::time::timeout(ATTEMPT_TIMEOUT, work)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// Copies both ways until both sides are done; on HTTP ports, each response's status
    /// is reported.
    async fn copy(
        &self,
        client: TcpStream,
        upstream: TlsStream<TcpStream>,
        endpoint: SocketAddrV4,
        target: &TlsFrontend,
        service: &str,
    ) -> Result<()> {
        let (mut client_read, mut client_write) = client.into_split();
        let (mut up_read, mut up_write) = tokio::io::split(upstream);
        // Each direction's bytes are counted as they pass: a connection that ends in an
        // error (a backend closing without close_notify, a reset) carried them too.
        let last_active = std::sync::atomic::AtomicU64::new(crate::clock::monotonic_coarse_ns());
        let active = || {
            last_active.store(
                crate::clock::monotonic_coarse_ns(),
                std::sync::atomic::Ordering::Relaxed,
            )
        };
        let to_upstream = async {
            let mut buf = vec![0u8; 16 * 1024];
            let mut sent = 0u64;
            let result = loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                active();
                if let Err(e) = up_write.write_all(&buf[..n]).await {
                    break Err(e);
                }
                sent += n as u64;
            };
            // The client is done sending: close_notify, then FIN.
            let _ = up_write.shutdown().await;
            (sent, result)
        };
        let to_client = async {
            let mut buf = vec![0u8; 16 * 1024];
            let mut received = 0u64;
            let result = loop {
                let n = match up_read.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                if target.http {
                    if let Some(status) = crate::tls_origination::http_status(&buf[..n]) {
                        let event = Event::HttpStatus(status);
                        self.report(service, endpoint, event);
                    }
                }
                active();
                if let Err(e) = client_write.write_all(&buf[..n]).await {
                    break Err(e);
                }
                received += n as u64;
            };
            let _ = client_write.shutdown().await;
            (received, result)
        };
        let both = async { tokio::join!(to_upstream, to_client) };
        let idle = async {
            loop {
                let quiet = Duration::from_nanos(
                    crate::clock::monotonic_coarse_ns()
                        .saturating_sub(last_active.load(std::sync::atomic::Ordering::Relaxed)),
                );
                if quiet >= self.idle_timeout {
                    return;
                }
                tokio::time::sleep(self.idle_timeout - quiet).await;
            }
        };
        let ((sent, sending), (received, receiving)) = tokio::select! {
            done = both => done,
            () = idle => {
                self.counts
                    .idle_closed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Both sides closed when the halves drop: the client sees a reset.
                anyhow::bail!("{}: idle for {:?}, closed", target.name, self.idle_timeout);
            }
        };
        self.counts.with(endpoint, |c| {
            c.bytes_sent += sent;
            c.bytes_received += received;
        });
        sending?;
        receiving?;
        Ok(())
    }
}

/// The forwarder and the threads it runs on: a runtime of its own, so that the agent's
/// work (a reload, a burst of cluster changes) does not delay forwarding, and so that a
/// stopping agent can finish its connections after the rest of it has stopped.
pub struct Running {
    pub forwarder: Arc<Forwarder>,
    runtime: tokio::runtime::Runtime,
}

impl Running {
    /// Starts serving `listener` (the one in `lb_sk_lookup`'s SOCKMAP).
    pub fn start(forwarder: Arc<Forwarder>, listener: std::net::TcpListener) -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("lb-tls")
            .enable_all()
            .build()
            .context("the TLS forwarder's runtime")?;
        listener.set_nonblocking(true)?;
        let serving = forwarder.clone();
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serving.serve(listener).await,
                Err(e) => log::error!("TLS forwarder: its listener: {e}"),
            }
        });
        Ok(Self { forwarder, runtime })
    }

    /// The agent stopped (SIGTERM) and the rest of it is gone: the connections in
    /// progress are finished, for `grace` at most; those still open then are cut.
    pub fn finish(self, grace: Duration) {
        let active = self
            .forwarder
            .counts
            .active
            .load(std::sync::atomic::Ordering::Relaxed);
        if active > 0 {
            log::info!("finishing {active} TLS-originated connections ({grace:?} at most)");
        }
        let left = self.runtime.block_on(self.forwarder.drain(grace));
        if left > 0 {
            log::warn!(
                "{left} TLS-originated connections cut: still open after {grace:?} \
                 (--drain-timeout)"
            );
        } else if active > 0 {
            log::info!("every TLS-originated connection finished");
        }
        self.runtime.shutdown_timeout(Duration::from_millis(100));
    }
}

/// Why an attempt failed.
#[derive(Debug)]
enum Failure {
    Connect(String),
    Timeout,
    /// The TLS handshake failed; the kind is a short stable name for the counters.
    Tls(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Timeout => write!(f, "no connection and handshake within {ATTEMPT_TIMEOUT:?}"),
            Failure::Tls(kind) => write!(f, "TLS handshake: {kind}"),
        }
    }
}

/// A short name for a failed handshake: the certificate's fault, or the protocol's.
fn tls_error_kind(e: &std::io::Error) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "closed_during_handshake".into(),
            _ => "io".into(),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => "certificate_wrong_name",
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "certificate_expired"
            }
            rustls::CertificateError::UnknownIssuer => "certificate_unknown_issuer",
            _ => "certificate_invalid",
        }
        .into(),
        rustls::Error::AlertReceived(_) => "alert_received".into(),
        _ => "protocol".into(),
    }
}

/// The status of an HTTP/1.x response whose status line starts `segment`, as the kernel
/// reads it (`HTTP/1.x NNN`); `None` for anything else.
pub fn http_status(segment: &[u8]) -> Option<u16> {
    let rest = segment.strip_prefix(b"HTTP/1.")?;
    let digits = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unusable certificate files are errors naming the field and the file.
    #[test]
    fn unreadable_or_bad_files_are_named() {
        let config = crate::config::parse(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: db }
spec:
  hosts: [db.example]
  addresses: [240.0.0.9]
  ports: [{ number: 80, name: http, protocol: HTTP, targetPort: 443 }]
  resolution: STATIC
  endpoints: [{ address: 10.1.0.1 }]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db }
spec:
  host: db.example
  trafficPolicy:
    tls: { mode: SIMPLE, caCertificates: /nonexistent/ca.pem }
",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            TlsFrontend::new(&config.services[0])
                .err()
                .expect("refused")
        );
        assert!(err.contains("caCertificates /nonexistent/ca.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("lb-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "not a certificate\n").unwrap();
        let mut svc = config.services[0].clone();
        svc.policy.tls.as_mut().unwrap().ca_certificates = Some(bad.clone());
        let err = format!("{:#}", TlsFrontend::new(&svc).err().expect("refused"));
        assert!(err.contains("no certificate in it"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_status_lines_as_the_kernel_does() {
        assert_eq!(
            http_status(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(http_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(http_status(b"HTTP/1.1 20"), None);
        assert_eq!(http_status(b"HTTP/2 200"), None);
        assert_eq!(http_status(b"body HTTP/1.1 500"), None);
    }
}
