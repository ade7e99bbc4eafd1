//! `lb agent --dns-listen ADDR:PORT`: a DNS responder for the node's pods, as Istio's DNS
//! proxy is for a sidecar's application. A client that calls `http://mydb.com` needs
//! `mydb.com` to resolve to the VIP lb balances; nothing else in the cluster knows it.
//!
//! - A queries for a host the configuration has (a ServiceEntry's hosts, a Kubernetes
//!   Service's `NAME.NAMESPACE.svc.DOMAIN`, `NAME.NAMESPACE.svc` and `NAME.NAMESPACE`) are
//!   answered with its VIPs; a wildcard host (`*.example.com`) answers the names under it,
//!   the most specific wildcard first, as Istio matches hosts. Other types for such a name
//!   get an empty answer (the name exists, with only A records).
//! - Every other name is forwarded to the upstream resolvers (the system's, or
//!   `--resolver`) through hickory's caching resolver: answers are cached by TTL.
//! - UDP and TCP. Messages are read and written with hickory's protocol library; a
//!   message that does not parse gets FORMERR (when its header can be read). lb's own
//!   names and malformed queries are answered as they are read, one at a time per
//!   socket; at most [`IN_FLIGHT`] forwarded queries wait on the upstream at once:
//!   beyond, UDP queries are dropped (the client retries) and TCP connections wait, so a
//!   flood costs the agent a bounded amount of work and never touches the data plane.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use hickory_resolver::{
    proto::{
        op::{Message, MessageType, ResponseCode},
        rr::{rdata::A, Name, RData, Record, RecordType},
        ProtoErrorKind,
    },
    TokioResolver,
};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
    sync::Semaphore,
};

use crate::{config::Config, model::Source};

/// Queries handled at once, at most.
pub const IN_FLIGHT: usize = 256;

/// Forwarded answers cached, at most.
const FORWARD_CACHE: usize = 10_000;

/// The TTL of lb's own answers (Istio's DNS proxy answers with 30 s too).
const OWN_TTL: u32 = 30;

/// How long a TCP client may take to send its query.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The names lb answers for, from the configuration in force.
#[derive(Debug, Default)]
pub struct NameTable {
    exact: BTreeMap<String, Vec<Ipv4Addr>>,
    /// `*.example.com` as `.example.com`, longest (most specific) first.
    wildcards: Vec<(String, Vec<Ipv4Addr>)>,
}

impl NameTable {
    pub fn from_config(config: &Config) -> Self {
        let mut exact: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        let mut wildcards: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for (host, vips) in &config.hosts {
            match host.strip_prefix('*') {
                Some(suffix) => wildcards.entry(suffix.to_string()).or_default(),
                None => exact.entry(host.clone()).or_default(),
            }
            .extend(vips);
        }
        // The forms a Kubernetes Service is called by (a pod's search list turns `NAME`
        // into `NAME.NAMESPACE.svc.DOMAIN`, which the hosts have).
        for s in &config.services {
            if let Source::Kubernetes { namespace, name } = &s.source {
                for form in [
                    format!("{name}.{namespace}"),
                    format!("{name}.{namespace}.svc"),
                ] {
                    exact.entry(form).or_default().insert(s.frontend.vip);
                }
            }
        }
        let mut wildcards: Vec<(String, Vec<Ipv4Addr>)> = wildcards
            .into_iter()
            .map(|(s, v)| (s, v.into_iter().collect()))
            .collect();
        wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Self {
            exact: exact
                .into_iter()
                .map(|(h, v)| (h, v.into_iter().collect()))
                .collect(),
            wildcards,
        }
    }

    /// The VIPs of `name` (lower case, no trailing dot), if lb answers for it.
    pub fn lookup(&self, name: &str) -> Option<&[Ipv4Addr]> {
        if let Some(vips) = self.exact.get(name) {
            return Some(vips);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix.as_str()) && name.len() > suffix.len())
            .map(|(_, vips)| vips.as_slice())
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The table the responder reads; the agent replaces it at each configuration.
pub type SharedNames = Arc<RwLock<Arc<NameTable>>>;

/// What the responder did, for `/config_dump` and `/metrics`.
#[derive(Debug, Default, Serialize)]
pub struct ResponderCounts {
    /// Answered from lb's own names.
    pub own: AtomicU64,
    /// Forwarded to the upstream resolvers.
    pub forwarded: AtomicU64,
    /// Unreadable: FORMERR, or nothing when even the header could not be read.
    pub malformed: AtomicU64,
    /// Dropped: too many in flight (UDP).
    pub dropped: AtomicU64,
}

struct Responder {
    names: SharedNames,
    upstream: TokioResolver,
    counts: Arc<ResponderCounts>,
    in_flight: Arc<Semaphore>,
}

/// The responder answers while this lives; dropped, it stops and its port is free (for
/// the next agent, when this one stops).
pub struct Serving {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Binds `addr` (UDP and TCP) and starts answering, until the returned [`Serving`] is
/// dropped. `upstream`: the DNS server to forward to, or the system's resolver
/// configuration. While `addr` is taken, binding is tried again for a few seconds (a
/// previous agent stopping lets it go).
///
/// The responder runs on a thread and runtime of its own: a flood of queries keeps that
/// thread busy, not the agent's (health decisions, publishing, the admin endpoint), and
/// the agent's work does not delay answers.
pub fn serve(
    addr: SocketAddr,
    names: SharedNames,
    upstream: Option<SocketAddr>,
    counts: Arc<ResponderCounts>,
) -> Result<Serving> {
    let mut builder = crate::sources::dns::resolver_builder(upstream)
        .context("the upstream resolvers of --dns-listen")?;
    // Answers are cached by TTL; the default cache (32 answers) would send most of a
    // node's names upstream again. dnsmasq's largest cache is as big.
    builder.options_mut().cache_size = FORWARD_CACHE;
    // Bound here, so that a taken port is the agent's start error.
    let udp = crate::agent::bind_retrying(|| std::net::UdpSocket::bind(addr))
        .with_context(|| format!("--dns-listen: binding UDP {addr}"))?;
    let tcp = crate::agent::bind_retrying(|| std::net::TcpListener::bind(addr))
        .with_context(|| format!("--dns-listen: binding TCP {addr}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("--dns-listen: the responder's runtime")?;
    std::thread::Builder::new()
        .name("dns-responder".into())
        .spawn(move || {
            runtime.block_on(async move {
                let (udp, tcp) = match (UdpSocket::from_std(udp), TcpListener::from_std(tcp)) {
                    (Ok(udp), Ok(tcp)) => (udp, tcp),
                    (Err(e), _) | (_, Err(e)) => {
                        log::error!("DNS responder on {addr}: {e}; it does not answer");
                        return;
                    }
                };
                let responder = Arc::new(Responder {
                    names,
                    upstream: builder.build(),
                    counts,
                    in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
                });
                log::info!("DNS responder on {addr} (UDP and TCP)");
                tokio::spawn(serve_tcp(tcp, responder.clone()));
                tokio::select! {
                    _ = serve_udp(Arc::new(udp), responder) => {}
                    _ = stopped => {}
                }
            })
        })
        .context("--dns-listen: starting the responder's thread")?;
    Ok(Serving { _stop: stop })
}

async fn serve_udp(socket: Arc<UdpSocket>, responder: Arc<Responder>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        // lb's own names (and malformed queries) are answered here, without a task: they
        // need no waiting, and they are most of what a node's pods ask.
        let query = match responder.answer_locally(&buf[..len]) {
            Local::Answer(answer) => {
                let _ = socket.send_to(&answer, from).await;
                continue;
            }
            Local::Unanswerable => continue,
            Local::Forward(query) => query,
        };
        let Ok(permit) = responder.in_flight.clone().try_acquire_owned() else {
            responder.counts.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (socket, responder) = (socket.clone(), responder.clone());
        tokio::spawn(async move {
            if let Some(answer) = responder.forward(&query).await {
                let _ = socket.send_to(&answer, from).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: TcpListener, responder: Arc<Responder>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            // Each message is preceded by its length (RFC 1035, 4.2.2); a connection may
            // carry several.
            loop {
                let read = async {
                    let len = stream.read_u16().await? as usize;
                    let mut query = vec![0u8; len];
                    stream.read_exact(&mut query).await?;
                    Ok::<_, std::io::Error>(query)
                };
                let Ok(Ok(query)) = tokio::time::timeout(TCP_READ_TIMEOUT, read).await else {
                    return;
                };
                let answer = match responder.answer_locally(&query) {
                    Local::Answer(answer) => answer,
                    Local::Unanswerable => return,
                    Local::Forward(query) => {
                        let Ok(_permit) = responder.in_flight.acquire().await else {
                            return;
                        };
                        let Some(answer) = responder.forward(&query).await else {
                            return;
                        };
                        answer
                    }
                };
                let Ok(len) = u16::try_from(answer.len()) else {
                    return;
                };
                if stream.write_u16(len).await.is_err() || stream.write_all(&answer).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

/// What can be done with a query without waiting.
enum Local {
    /// Its answer, encoded: lb's own name, or FORMERR.
    Answer(Vec<u8>),
    /// Nothing: not even the header could be read.
    Unanswerable,
    /// A name lb does not own: for the upstream resolvers.
    Forward(Message),
}

impl Responder {
    /// Answers a query for one of lb's own names, or a malformed one; else hands it on.
    fn answer_locally(&self, bytes: &[u8]) -> Local {
        let query = match Message::from_vec(bytes) {
            Ok(q) if q.message_type() == MessageType::Query && q.queries().len() == 1 => q,
            _ => {
                self.counts.malformed.fetch_add(1, Ordering::Relaxed);
                let (Some(&high), Some(&low)) = (bytes.first(), bytes.get(1)) else {
                    return Local::Unanswerable;
                };
                let mut formerr = Message::new();
                formerr
                    .set_id(u16::from_be_bytes([high, low]))
                    .set_message_type(MessageType::Response)
                    .set_response_code(ResponseCode::FormErr);
                return formerr.to_vec().map_or(Local::Unanswerable, Local::Answer);
            }
        };
        let q = &query.queries()[0];
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let own = self.names.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(vips) = own.lookup(&name) else {
            return Local::Forward(query);
        };
        self.counts.own.fetch_add(1, Ordering::Relaxed);
        let mut response = response_to(&query);
        response.set_authoritative(true);
        if q.query_type() == RecordType::A {
            for vip in vips {
                let owner: Name = q.name().clone();
                response.add_answer(Record::from_rdata(owner, OWN_TTL, RData::A(A(*vip))));
            }
        }
        response.to_vec().map_or(Local::Unanswerable, Local::Answer)
    }

    /// The upstream's answer to `query` (its cached one while its TTL lasts), encoded.
    async fn forward(&self, query: &Message) -> Option<Vec<u8>> {
        self.counts.forwarded.fetch_add(1, Ordering::Relaxed);
        let q = &query.queries()[0];
        let mut response = response_to(query);
        match self.upstream.lookup(q.name().clone(), q.query_type()).await {
            Ok(found) => {
                response.add_answers(found.records().iter().cloned());
            }
            Err(e) => {
                let code = match e.proto().map(|p| p.kind()) {
                    Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => *response_code,
                    _ => ResponseCode::ServFail,
                };
                response.set_response_code(code);
            }
        }
        response.to_vec().ok()
    }
}

/// A response to `query`: its ID, opcode, question and recursion flags.
fn response_to(query: &Message) -> Message {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true);
    response.add_queries(query.queries().to_vec());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact hosts, wildcards (the most specific first, never the bare suffix) and a
    /// Kubernetes Service's short forms.
    #[test]
    fn names_are_matched_as_istio_matches_hosts() {
        let config = crate::config::parse(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: a }
spec:
  hosts: [mydb.com, db.example.com]
  addresses: [10.96.1.1]
  ports: [{ number: 80, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 10.200.0.1 }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: b }
spec:
  hosts: ['*.example.com']
  addresses: [10.96.1.2]
  ports: [{ number: 80, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 10.200.0.2 }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: c }
spec:
  hosts: ['*.eu.example.com']
  addresses: [10.96.1.3]
  ports: [{ number: 80, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 10.200.0.3 }]
",
        )
        .unwrap();
        let t = NameTable::from_config(&config);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(t.lookup("mydb.com"), Some(&[ip("10.96.1.1")][..]));
        assert_eq!(t.lookup("db.example.com"), Some(&[ip("10.96.1.1")][..]));
        assert_eq!(t.lookup("api.example.com"), Some(&[ip("10.96.1.2")][..]));
        assert_eq!(t.lookup("api.eu.example.com"), Some(&[ip("10.96.1.3")][..]));
        assert_eq!(t.lookup("example.com"), None);
        assert_eq!(t.lookup("other.org"), None);
    }
}
