//! Soak (issue 7, "Reliability"): the seed topology (client at region1/zone1, HelloWorld
//! in four localities, the real `lb agent` attached in TC mode) under steady traffic while
//! a chaos loop drains, kills, restores and fails backends, for a bounded time.
//!
//! Traffic: `NEW_CONN_THREADS` clients calling `GET /hello` on a new connection each time,
//! and `KEEPALIVE_CLIENTS` clients calling it in a loop on one kept connection (reopened
//! every `KEEPALIVE_REQUESTS` calls, or after a break).
//!
//! Chaos, one action at a time, picked by a seeded RNG (`LB_SOAK_SEED`, printed):
//! - **drain** a backend: its listener closes (and its open connections), so its kernel
//!   refuses new connections (RST); **restore** it: listening again (`start_again`);
//! - **kill** a backend: its listener closes *and* its replies to the client are
//!   black-holed, so SYNs to it time out (a dead host); **revive** it;
//! - **503**: a backend answers every request `503` for 1–3 s, then `200` again;
//! - **restart the agent**: SIGKILL, start again on the same pins (see [`restart_agent`];
//!   `LB_SOAK_AGENT_RESTARTS=0` turns it off).
//!
//! The loop keeps, at every moment, at least one backend eligible (fully healthy: listening,
//! reachable, answering 200, for `SETTLE`; and active in lb's own view, `GET /services`:
//! see [`Chaos::eligible`]) and at most `MAX_CONNECT_FAILING` backends failing connects
//! (drained or killed): lb re-steers a failed connection attempt at most
//! `dataplane.connect_retries` times (default 2, docs/locality.md), so with at most two
//! backends failing connects, every attempt reaches a listening backend within its budget
//! whatever the table's first pick, even before outlier detection has ejected anything.
//! That is what "an eligible backend existed" means below; by construction it always
//! holds, so every failed connect of a new connection is a failure of lb.
//!
//! Duration: `LB_SOAK_SECS` (default 30; `cargo xtask test --soak` sets 300).
//!
//! Asserted at the end, with a timeline of every unexpected failure:
//! 1. no new connection failed to connect (refused, timed out, reset in the handshake);
//! 2. a new-connection call that failed *after* its connect succeeded did so while a
//!    backend was being drained or killed (its connection was closed under it: an
//!    established-connection break, not a failed connection attempt);
//! 3. 5xx answers came only from the backend of a 503 episode, during it; on new
//!    connections, once `consecutive5xxErrors` + a reordering allowance of 503s were
//!    answered in an episode and seen by one running agent (none is seen while the agent
//!    restarts, and a restarted agent counts anew), none on a connection opened more than
//!    [`EJECTION_GRACE`] later (outlier detection has ejected the backend by then); on
//!    kept connections any
//!    number (lb balances connections: an ejection does not move an established one);
//! 4. a kept connection broke only when the backend it was on (known from the response
//!    bodies) was drained or killed during its life;
//! 5. the data plane's counters add up with what the clients did (`lb stats -o json` on
//!    the agent's pins): `forward_new` is the number of connection attempts, the service's
//!    new connections are `forward_new`, HTTP responses counted in the kernel are those
//!    the clients read, every packet through an attached interface has one verdict, and
//!    nothing was dropped for want of a backend.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{lb_binary, wait_until, write_atomically, AgentProcess, TempDir},
    clients::{http_request, read_status_and_body},
    http_get, require_root,
    seed::{self, service_entry, HELLO_PORT, LOCALITIES, NODE},
    topology::{backend_addr, TestBed, BACKEND_HTTP_PORT, CLIENT_ADDR, VIP},
    KeepAliveClient,
};
use serde_json::Value;

const ADMIN: &str = "127.0.0.1:15000";

/// Clients making a new connection per call, and clients on kept connections.
const NEW_CONN_THREADS: usize = 4;
const KEEPALIVE_CLIENTS: usize = 3;
/// A kept connection is closed and opened again after this many calls, so kept
/// connections also follow failovers.
const KEEPALIVE_REQUESTS: u64 = 200;
/// Pause between two calls of one client.
const CALL_PAUSE: Duration = Duration::from_millis(2);
/// Connect and read timeout of every call. A SYN black-holed by a killed backend is
/// re-steered when the client retransmits it (1 s, then 3 s after the first SYN); with
/// two backends failing connects a call may need both re-steers, so it is served a little
/// after 3 s. 7 s is the next retransmission: a call that fails with this timeout was not
/// re-steered when it should have been.
const CALL_TIMEOUT: Duration = Duration::from_secs(7);

/// At most this many backends fail connects at once (lb's default `connect_retries`).
const MAX_CONNECT_FAILING: usize = 2;
/// A 503 episode lasts this long (shorter than `baseEjectionTime`, so outlier detection
/// ejects the backend at most once per episode).
const EPISODE_MS: (u64, u64) = (1000, 3000);
/// A backend counts as eligible only after being healthy this long (see
/// [`Chaos::eligible`]).
const SETTLE: Duration = Duration::from_secs(8);
/// Pause between two chaos actions.
const ACTION_PAUSE_MS: (u64, u64) = (300, 1500);

/// From the seed's DestinationRule: `consecutive5xxErrors` (3 here, see [`rule`]).
const CONSECUTIVE_5XX: usize = 3;
/// 503s an episode may need beyond `consecutive5xxErrors` before the ejection is decided:
/// a 200 the backend sent just before the episode and the kernel counted after the
/// episode's first 503 resets the consecutive count (the agent orders successes before a
/// failure when the success count grew): one per client.
const REORDERED_5XX: usize = NEW_CONN_THREADS + KEEPALIVE_CLIENTS;
/// Once an episode's backend has answered `consecutive5xxErrors + REORDERED_5XX` 503s,
/// a new connection opened this much later must not meet it. The agent takes about
/// 0.1 ms from the kernel's signal to the new table (`cargo xtask bench`); the grace is
/// that with room for a loaded two-core machine's scheduling, and still a small part of
/// an episode (at least `ACTION_PAUSE_MS.0`), so a backend that is never ejected is
/// caught. Calls opened before it (already connected, or racing the publication) may
/// still be answered 503.
const EJECTION_GRACE: Duration = Duration::from_millis(100);

fn hello(region: &str, zone: &str) -> String {
    format!("Hello version: {region}.{zone}, instance: helloworld-{region}-{zone}")
}

fn vip() -> SocketAddr {
    (VIP, HELLO_PORT).into()
}

/// The seed's DestinationRule (tests/tests/locality_failover.rs), with three changes for a
/// soak that fails and restores backends over and over:
/// - `consecutive5xxErrors: 3` (seed: 1), as in `backend_answering_503_is_ejected`, so a
///   503 episode has a meaningful bound and one stray signal does not eject a backend;
/// - `baseEjectionTime: 5s` (seed: 10m), so a restored backend comes back within the soak;
/// - `maxEjectionPercent: 100` (seed: the default 10%, which with four hosts allows only
///   the first ejection), so every failing backend is ejected and the 503 bound holds.
fn rule() -> String {
    let rule = seed::DESTINATION_RULE
        .replace("consecutive5xxErrors: 1", "consecutive5xxErrors: 3")
        .replace(
            "baseEjectionTime: 10m\n",
            "baseEjectionTime: 5s\n      maxEjectionPercent: 100\n",
        );
    assert_eq!(rule.matches("consecutive5xxErrors: 3").count(), 1);
    assert_eq!(rule.matches("maxEjectionPercent: 100").count(), 1);
    rule
}

// ---------------------------------------------------------------------------------------
// Seeded RNG (splitmix64): the chaos schedule is reproducible from the printed seed.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn millis(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

// ---------------------------------------------------------------------------------------
// Chaos: backend states and the action log.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Up,
    Drained,
    Killed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Drain,
    Restore,
    Kill,
    Revive,
    Start503,
    End503,
    RestartAgent,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Drain => "drain",
            Action::Restore => "restore",
            Action::Kill => "kill",
            Action::Revive => "revive",
            Action::Start503 => "start 503",
            Action::End503 => "end 503",
            Action::RestartAgent => "restart agent",
        }
    }
}

/// One action, from the moment it started to the moment it was done.
#[derive(Clone, Debug)]
struct Done {
    action: Action,
    backend: Option<usize>,
    start: Instant,
    end: Instant,
}

/// A 503 episode of one backend: from `set_status(503)` to `set_status(200)`.
#[derive(Clone, Debug)]
struct Episode {
    backend: usize,
    start: Instant,
    end: Instant,
}

struct Chaos {
    listener: [Listener; 4],
    /// Since when each backend has been fully healthy (listening, reachable, 200).
    healthy_since: [Instant; 4],
    /// lb's view at the last look (`GET /services`): active (neither ejected nor
    /// draining).
    lb_active: [bool; 4],
    /// lb's views over time, for the failure timeline: (when, backends not active).
    lb_views: Vec<(Instant, Vec<usize>)>,
    /// The running 503 episode: backend, start, planned end.
    episode: Option<(usize, Instant, Instant)>,
    log: Vec<Done>,
    episodes: Vec<Episode>,
}

impl Chaos {
    fn up_200(&self, i: usize) -> bool {
        self.listener[i] == Listener::Up && self.episode.map(|e| e.0) != Some(i)
    }

    fn healthy(&self) -> usize {
        (0..4).filter(|&i| self.up_200(i)).count()
    }

    /// Backend `i` is eligible: healthy for at least `SETTLE`, and active in lb's view.
    ///
    /// lb's view matters: an ejected backend gets no new connection however healthy it is,
    /// and with `maxEjectionPercent: 100` and `minHealthPercent` 0 (no panic mode, as in
    /// Istio) a service whose endpoints are all ejected has no backend at all. The settle
    /// time matters because a revived backend still receives, until the calls that were
    /// pending on it when it was killed have timed out (`CALL_TIMEOUT`), retransmissions
    /// of their requests, which its kernel answers with RST: resets of established
    /// connections, which count toward its ejection like a 503.
    fn eligible(&self, i: usize, now: Instant) -> bool {
        self.up_200(i) && self.lb_active[i] && now.duration_since(self.healthy_since[i]) >= SETTLE
    }

    fn connect_failing(&self) -> usize {
        self.listener.iter().filter(|l| **l != Listener::Up).count()
    }

    /// The (action, backend) pairs allowed now.
    fn choices(&self, agent_restarts: bool) -> Vec<(Action, Option<usize>)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for i in 0..4 {
            let up_200 = self.up_200(i);
            // Taking a backend down must leave another one eligible, and at most
            // MAX_CONNECT_FAILING backends failing connects.
            let other_eligible = (0..4).any(|j| j != i && self.eligible(j, now));
            if up_200 && other_eligible && self.connect_failing() < MAX_CONNECT_FAILING {
                out.push((Action::Drain, Some(i)));
                out.push((Action::Kill, Some(i)));
            }
            if up_200 && other_eligible && self.episode.is_none() {
                out.push((Action::Start503, Some(i)));
            }
            match self.listener[i] {
                Listener::Drained => out.push((Action::Restore, Some(i))),
                Listener::Killed => out.push((Action::Revive, Some(i))),
                Listener::Up => {}
            }
        }
        // A restart only while one backend is eligible, so that its own effects are seen.
        if agent_restarts && (0..4).any(|j| self.eligible(j, now)) {
            out.push((Action::RestartAgent, None));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Clients and what they saw.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Refused,
    Timeout,
    Reset,
    /// The peer closed the connection before a complete response.
    Closed,
    Other,
}

fn classify(e: &anyhow::Error) -> Kind {
    for cause in e.chain() {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::ConnectionRefused => Kind::Refused,
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Kind::Timeout,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => Kind::Reset,
                io::ErrorKind::UnexpectedEof => Kind::Closed,
                _ => Kind::Other,
            };
        }
    }
    let text = format!("{e:#}");
    if text.contains("closed") {
        Kind::Closed
    } else {
        Kind::Other
    }
}

/// A call that did not end with a `200`.
#[derive(Clone, Debug)]
struct Odd {
    client: String,
    start: Instant,
    /// When the connection was established (`None`: the connect itself failed).
    connected: Option<Instant>,
    end: Instant,
    /// `Ok(status, body)` for an answer that is not 200, `Err` for no answer.
    outcome: std::result::Result<(u16, String), (Kind, String)>,
    /// Kept connections: the backend the connection was on (from earlier bodies) and when
    /// the connection was opened.
    kept_on: Option<(String, Instant)>,
}

/// What the clients did, summed over all of them (read at checkpoints, when no call is in
/// flight).
#[derive(Default)]
struct Totals {
    /// Connection attempts (connect() calls) to the VIP.
    attempts: AtomicU64,
    /// Answers by status class.
    ok: AtomicU64,
    five_xx: AtomicU64,
    other_status: AtomicU64,
    /// SYN retransmissions the clients' kernels can have sent: 1 for a connect that took
    /// 1 s or more (Linux's first retransmission), 2 for 3 s or more (the second).
    syn_retransmits: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ClientCounts {
    attempts: u64,
    ok: u64,
    five_xx: u64,
    syn_retransmits: u64,
}

impl Totals {
    fn read(&self) -> ClientCounts {
        ClientCounts {
            attempts: self.attempts.load(Ordering::SeqCst),
            ok: self.ok.load(Ordering::SeqCst),
            five_xx: self.five_xx.load(Ordering::SeqCst),
            syn_retransmits: self.syn_retransmits.load(Ordering::SeqCst),
        }
    }

    /// Counts the SYN retransmissions a connect that took `took` can have needed.
    fn connect_took(&self, took: Duration) {
        let n = if took >= Duration::from_millis(2900) {
            2
        } else {
            u64::from(took >= Duration::from_millis(900))
        };
        self.syn_retransmits.fetch_add(n, Ordering::SeqCst);
    }

    fn answer(&self, status: u16) {
        let counter = match status {
            200 => &self.ok,
            500..=599 => &self.five_xx,
            _ => &self.other_status,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// Shared by the clients and the chaos loop.
struct Shared {
    stop: AtomicBool,
    /// Clients hold it (read) for each call; a checkpoint holds it (write) so no call is in
    /// flight while counters are read on both sides.
    gate: RwLock<()>,
    totals: Totals,
}

/// What one client thread reports when it ends.
#[derive(Default)]
struct ClientReport {
    /// 200 answers per backend name.
    served: BTreeMap<String, u64>,
    odd: Vec<Odd>,
    /// Kept connections opened (keep-alive clients).
    kept_opened: u64,
    /// 200 answers that took `SLOW` or more: (start, end, backend name).
    slow_ok: Vec<(Instant, Instant, String)>,
}

/// A call this slow met a lost segment (the first retransmission timeout is 200 ms).
const SLOW: Duration = Duration::from_millis(150);

/// `GET /hello` on a new connection (`Connection: close`), with the time the connect
/// completed.
fn new_connection_call(
    totals: &Totals,
) -> (
    Option<Instant>,
    std::result::Result<(u16, String), anyhow::Error>,
) {
    totals.attempts.fetch_add(1, Ordering::SeqCst);
    let start = Instant::now();
    let connect = TcpStream::connect_timeout(&vip(), CALL_TIMEOUT);
    totals.connect_took(start.elapsed());
    let stream = match connect {
        Ok(s) => s,
        Err(e) => return (None, Err(anyhow::Error::from(e).context("connect"))),
    };
    let connected = Instant::now();
    let result = (|| -> Result<(u16, String)> {
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        stream.set_write_timeout(Some(CALL_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        write!(
            writer,
            "GET /hello HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            vip()
        )
        .context("sending the request")?;
        read_status_and_body(&mut BufReader::new(stream))
    })();
    (Some(connected), result)
}

fn new_connection_client(id: usize, shared: Arc<Shared>) -> ClientReport {
    let mut report = ClientReport::default();
    let client = format!("new-{id}");
    while !shared.stop.load(Ordering::SeqCst) {
        {
            let _gate = shared.gate.read().unwrap();
            let start = Instant::now();
            let (connected, result) = new_connection_call(&shared.totals);
            let end = Instant::now();
            match result {
                Ok((200, body)) => {
                    shared.totals.answer(200);
                    if end.duration_since(start) >= SLOW {
                        report.slow_ok.push((start, end, body.clone()));
                    }
                    *report.served.entry(body).or_default() += 1;
                }
                Ok((status, body)) => {
                    shared.totals.answer(status);
                    report.odd.push(Odd {
                        client: client.clone(),
                        start,
                        connected,
                        end,
                        outcome: Ok((status, body)),
                        kept_on: None,
                    });
                }
                Err(e) => report.odd.push(Odd {
                    client: client.clone(),
                    start,
                    connected,
                    end,
                    outcome: Err((classify(&e), format!("{e:#}"))),
                    kept_on: None,
                }),
            }
        }
        thread::sleep(CALL_PAUSE);
    }
    report
}

fn keepalive_client(id: usize, shared: Arc<Shared>) -> ClientReport {
    let mut report = ClientReport::default();
    let client = format!("kept-{id}");
    // The open connection: client, backend name once known, when it was opened, calls made
    // on it.
    let mut conn: Option<(KeepAliveClient, Option<String>, Instant, u64)> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        {
            let _gate = shared.gate.read().unwrap();
            if conn.is_none() {
                let start = Instant::now();
                shared.totals.attempts.fetch_add(1, Ordering::SeqCst);
                let connect = KeepAliveClient::connect(vip(), CALL_TIMEOUT);
                shared.totals.connect_took(start.elapsed());
                match connect {
                    Ok(c) => {
                        report.kept_opened += 1;
                        conn = Some((c, None, Instant::now(), 0));
                    }
                    Err(e) => report.odd.push(Odd {
                        client: client.clone(),
                        start,
                        connected: None,
                        end: Instant::now(),
                        outcome: Err((classify(&e), format!("{e:#}"))),
                        kept_on: None,
                    }),
                }
            }
            if let Some((c, backend, opened, calls)) = conn.as_mut() {
                let start = Instant::now();
                let result = c.get_with_status("/hello");
                let end = Instant::now();
                *calls += 1;
                let mut close = *calls >= KEEPALIVE_REQUESTS;
                match result {
                    Ok((status, body)) => {
                        shared.totals.answer(status);
                        if status == 200 {
                            *report.served.entry(body.clone()).or_default() += 1;
                            if end.duration_since(start) >= SLOW {
                                report.slow_ok.push((start, end, body.clone()));
                            }
                        } else {
                            report.odd.push(Odd {
                                client: client.clone(),
                                start,
                                connected: Some(*opened),
                                end,
                                outcome: Ok((status, body.clone())),
                                kept_on: backend.clone().map(|b| (b, *opened)),
                            });
                        }
                        if backend.as_ref().is_some_and(|b| *b != body) {
                            // A kept connection moved to another backend: never allowed.
                            report.odd.push(Odd {
                                client: client.clone(),
                                start,
                                connected: Some(*opened),
                                end,
                                outcome: Err((
                                    Kind::Other,
                                    format!("kept connection answered by {body}"),
                                )),
                                kept_on: backend.clone().map(|b| (b, *opened)),
                            });
                        }
                        *backend = Some(body);
                    }
                    Err(e) => {
                        report.odd.push(Odd {
                            client: client.clone(),
                            start,
                            connected: Some(*opened),
                            end,
                            outcome: Err((classify(&e), format!("{e:#}"))),
                            kept_on: Some((backend.clone().unwrap_or_else(|| "?".into()), *opened)),
                        });
                        close = true;
                    }
                }
                if close {
                    conn = None;
                }
            }
        }
        thread::sleep(CALL_PAUSE);
    }
    report
}

/// lb's view from the admin endpoint (`GET /services`, from inside the node): for each
/// backend, whether it is active (neither ejected nor draining).
fn lb_view(bed: &TestBed) -> Result<[bool; 4]> {
    let admin: SocketAddr = ADMIN.parse()?;
    let text = bed
        .node
        .run(|| http_get(admin, "/services", Duration::from_secs(3)))?;
    let view: Value = serde_json::from_str(&text).context("GET /services")?;
    let mut active = [false; 4];
    for (i, a) in active.iter_mut().enumerate() {
        let address = format!("{}:{BACKEND_HTTP_PORT}", backend_addr(i as u8 + 1));
        let e = find_endpoint(&view, &address)
            .with_context(|| format!("{address} not in GET /services: {text}"))?;
        *a = e["ejected"] != true && e["draining"] != true;
    }
    Ok(active)
}

/// The first JSON object with `"address": address` in `v`.
fn find_endpoint<'a>(v: &'a Value, address: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) if m.get("address").and_then(Value::as_str) == Some(address) => Some(v),
        Value::Object(m) => m.values().find_map(|x| find_endpoint(x, address)),
        Value::Array(a) => a.iter().find_map(|x| find_endpoint(x, address)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// The data plane's counters.

/// `lb ARGS... --pin-dir PIN --admin ADMIN` in the node's network namespace (as
/// tests/tests/cli.rs runs it).
fn lb_json(node: &str, pin_dir: &str, args: &[&str]) -> Result<Value> {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node}"))
        .arg("--")
        .arg(lb_binary()?)
        .args(args)
        .args(["-o", "json", "--pin-dir", pin_dir, "--admin", ADMIN])
        .stdin(Stdio::null())
        .output()
        .context("running lb")?;
    if !output.status.success() {
        bail!(
            "lb {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("lb's JSON")
}

#[derive(Clone, Debug, Default)]
struct Kernel {
    counters: BTreeMap<String, u64>,
    verdicts: u64,
    svc_packets: u64,
    svc_new: u64,
    backend_packets: u64,
    backend_new: u64,
    http_ok: u64,
    http_5xx: u64,
    /// rx + tx packets of the node's interfaces lb is attached to.
    iface_packets: u64,
    /// The connection table (`lb_ct_v2`): entries and capacity.
    ct_entries: u64,
    ct_capacity: u64,
}

impl Kernel {
    fn c(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

fn read_kernel(bed: &TestBed, pin_dir: &str) -> Result<Kernel> {
    let stats = lb_json(bed.node.name(), pin_dir, &["stats"])?;
    let links: Value = serde_json::from_str(&bed.node.ip(&["-s", "-j", "link", "show"])?)?;
    let mut k = Kernel::default();
    for c in stats["counters"].as_array().context("counters")? {
        let value = c["value"].as_u64().unwrap_or(0);
        if c["kind"] == "verdict" {
            k.verdicts += value;
        }
        k.counters
            .insert(c["name"].as_str().unwrap_or("?").to_string(), value);
    }
    let frontend = format!("{VIP}:{HELLO_PORT}/TCP");
    for s in stats["services"].as_array().context("services")? {
        if s["frontend"] == frontend.as_str() {
            k.svc_packets += s["packets"].as_u64().unwrap_or(0);
            k.svc_new += s["new_connections"].as_u64().unwrap_or(0);
        }
    }
    for b in stats["backends"].as_array().context("backends")? {
        let n = |f: &str| b[f].as_u64().unwrap_or(0);
        k.backend_packets += n("packets");
        k.backend_new += n("new_connections");
        k.http_ok += n("http_ok");
        k.http_5xx += n("http_5xx");
    }
    let maps = lb_json(bed.node.name(), pin_dir, &["maps"])?;
    if let Some(ct) = maps
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "lb_ct_v2"))
    {
        k.ct_entries = ct["entries"].as_u64().unwrap_or(0);
        k.ct_capacity = ct["max_entries"].as_u64().unwrap_or(0);
    }
    let attached: Vec<&str> = bed.interfaces.iter().map(|i| i.name.as_str()).collect();
    for l in links.as_array().context("ip -j link")? {
        if attached.contains(&l["ifname"].as_str().unwrap_or("")) {
            let s = &l["stats64"];
            k.iface_packets +=
                s["rx"]["packets"].as_u64().unwrap_or(0) + s["tx"]["packets"].as_u64().unwrap_or(0);
        }
    }
    Ok(k)
}

/// Client and kernel counts read together while no call was in flight.
struct Checkpoint {
    /// Agent generation (a restart may start the counters again).
    epoch: u32,
    at: Instant,
    clients: ClientCounts,
    kernel: Kernel,
}

// ---------------------------------------------------------------------------------------
// The soak.

struct Soak {
    bed: TestBed,
    _dir: TempDir,
    agent: AgentProcess,
    epoch: u32,
}

impl Soak {
    fn start() -> Self {
        let bed = TestBed::with_backends(
            AttachMode::Tc,
            &LOCALITIES
                .iter()
                .map(|(r, z)| hello(r, z))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let dir = TempDir::new("lbsoak").unwrap();
        let path = dir.0.join("helloworld.yaml");
        let config = format!(
            "{NODE}---\n{}---\n{}",
            service_entry(&seed::endpoints()),
            rule()
        );
        write_atomically(&path, &config).unwrap();
        let agent = AgentProcess::start_with(&bed, &path, &["--admin", ADMIN]).unwrap();
        wait_until(&bed.client, Duration::from_secs(20), || {
            http_get(vip(), "/", Duration::from_millis(500))
        })
        .expect("the agent programs the VIP");
        Self {
            bed,
            _dir: dir,
            agent,
            epoch: 0,
        }
    }

    fn pin_dir(&self) -> String {
        self.agent.pin_dir.to_string_lossy().into_owned()
    }

    fn checkpoint(&self, shared: &Shared) -> Checkpoint {
        let _quiet = shared.gate.write().unwrap();
        // Let the last segments of finished calls (FIN, ACK) pass the node.
        thread::sleep(Duration::from_millis(200));
        Checkpoint {
            epoch: self.epoch,
            at: Instant::now(),
            clients: shared.totals.read(),
            kernel: read_kernel(&self.bed, &self.pin_dir()).unwrap_or_else(|e| panic!("{e:#}")),
        }
    }

    /// Carries out one chaos action on backend `i`.
    fn act(&mut self, action: Action, i: Option<usize>) -> Result<()> {
        match (action, i) {
            (Action::Drain, Some(i)) => self.bed.backends[i].http.stop(),
            (Action::Restore, Some(i)) => {
                let b = &mut self.bed.backends[i];
                b.http.start_again(&b.ns)?;
            }
            (Action::Kill, Some(i)) => {
                // Black-hole first: the dead host neither answers SYNs nor closes its
                // connections visibly (no FIN, no RST reaches the client).
                let b = &mut self.bed.backends[i];
                b.black_hole_replies_to(CLIENT_ADDR)?;
                b.http.stop();
            }
            (Action::Revive, Some(i)) => {
                let b = &mut self.bed.backends[i];
                b.http.start_again(&b.ns)?;
                b.restore_replies_to(CLIENT_ADDR)?;
            }
            (Action::Start503, Some(i)) => self.bed.backends[i].http.set_status(503),
            (Action::End503, Some(i)) => self.bed.backends[i].http.set_status(200),
            (Action::RestartAgent, None) => match restart_agent(self) {
                Some(result) => result?,
                None => bail!("agent restarts are not available"),
            },
            other => bail!("bad action {other:?}"),
        }
        Ok(())
    }
}

/// The "restart the agent" chaos action: SIGKILL the agent (a crash, an OOM kill), start
/// it again with the same command line (configuration, interfaces, pin directory, admin
/// token), and wait until its admin endpoint says `/ready`. The programs stay attached and
/// the maps pinned while no agent runs, and the new agent adopts them
/// (`AgentProcess::kill` / `restart`): traffic is to go on without loss, so every check
/// of the soak holds during restarts too (no failed new connection, no broken kept
/// connection). `None` where agent restarts are off (`LB_SOAK_AGENT_RESTARTS=0`).
fn restart_agent(s: &mut Soak) -> Option<Result<()>> {
    if !agent_restarts() {
        return None;
    }
    s.agent.kill();
    let restarted = s.agent.restart().and_then(|()| {
        s.epoch += 1;
        let admin: SocketAddr = ADMIN.parse()?;
        wait_until(&s.bed.node, Duration::from_secs(20), || {
            let (status, body) = http_request(admin, "GET", "/ready", &[], Duration::from_secs(1))?;
            anyhow::ensure!(status == 200, "/ready: {status} {body}");
            Ok(())
        })
        .context("the restarted agent is not ready")
    });
    Some(restarted)
}

/// Whether the chaos loop picks "restart the agent" (see [`restart_agent`]): on unless
/// `LB_SOAK_AGENT_RESTARTS=0`.
fn agent_restarts() -> bool {
    std::env::var("LB_SOAK_AGENT_RESTARTS").map_or(true, |v| v != "0")
}

fn soak_secs() -> u64 {
    std::env::var("LB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

fn seed() -> u64 {
    std::env::var("LB_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1b07)
}

/// Whether `[a0, a1]` and `[b0, b1]` overlap.
fn overlaps(a0: Instant, a1: Instant, b0: Instant, b1: Instant) -> bool {
    a0 <= b1 && b0 <= a1
}

#[test]
fn soak_seed_topology_under_chaos() {
    if !require_root() {
        return;
    }
    let secs = soak_secs();
    let seed = seed();
    println!("soak: {secs} s, seed {seed} (LB_SOAK_SECS, LB_SOAK_SEED)");
    let mut soak = Soak::start();
    let names: Vec<String> = LOCALITIES.iter().map(|(r, z)| hello(r, z)).collect();
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        gate: RwLock::new(()),
        totals: Totals::default(),
    });
    let mut checkpoints = vec![soak.checkpoint(&shared)];

    let mut clients = Vec::new();
    for id in 0..NEW_CONN_THREADS {
        let shared = Arc::clone(&shared);
        clients.push(
            soak.bed
                .client
                .spawn(move || new_connection_client(id, shared))
                .unwrap(),
        );
    }
    for id in 0..KEEPALIVE_CLIENTS {
        let shared = Arc::clone(&shared);
        clients.push(
            soak.bed
                .client
                .spawn(move || keepalive_client(id, shared))
                .unwrap(),
        );
    }

    // The chaos loop.
    let mut rng = Rng(seed);
    let mut chaos = Chaos {
        listener: [Listener::Up; 4],
        healthy_since: [t0 - SETTLE; 4],
        lb_active: [true; 4],
        lb_views: Vec::new(),
        episode: None,
        log: Vec::new(),
        episodes: Vec::new(),
    };
    let deadline = t0 + Duration::from_secs(secs);
    let do_action =
        |soak: &mut Soak, chaos: &mut Chaos, rng: &mut Rng, action: Action, i: Option<usize>| {
            let start = Instant::now();
            soak.act(action, i)
                .unwrap_or_else(|e| panic!("chaos {} {i:?}: {e:#}", action.label()));
            let end = Instant::now();
            match (action, i) {
                (Action::Drain, Some(i)) => chaos.listener[i] = Listener::Drained,
                (Action::Kill, Some(i)) => chaos.listener[i] = Listener::Killed,
                (Action::Restore | Action::Revive, Some(i)) => {
                    chaos.listener[i] = Listener::Up;
                    chaos.healthy_since[i] = end;
                }
                (Action::Start503, Some(i)) => {
                    chaos.episode = Some((i, start, start + rng.millis(EPISODE_MS)))
                }
                (Action::End503, Some(i)) => {
                    let (b, s, _) = chaos.episode.take().expect("an episode");
                    assert_eq!(b, i);
                    chaos.episodes.push(Episode {
                        backend: i,
                        start: s,
                        end,
                    });
                    chaos.healthy_since[i] = end;
                }
                _ => {}
            }
            assert!(chaos.healthy() >= 1, "chaos left no healthy backend");
            assert!(chaos.connect_failing() <= MAX_CONNECT_FAILING);
            chaos.log.push(Done {
                action,
                backend: i,
                start,
                end,
            });
        };
    while Instant::now() < deadline {
        thread::sleep(rng.millis(ACTION_PAUSE_MS));
        // lb's view, for eligibility. Unreadable (an agent restarting): nothing is eligible.
        chaos.lb_active = lb_view(&soak.bed).unwrap_or([false; 4]);
        let inactive: Vec<usize> = (0..4).filter(|&i| !chaos.lb_active[i]).collect();
        if chaos.lb_views.last().map(|v| &v.1) != Some(&inactive) {
            chaos.lb_views.push((Instant::now(), inactive));
        }
        if let Some((i, _, until)) = chaos.episode {
            if Instant::now() >= until {
                do_action(&mut soak, &mut chaos, &mut rng, Action::End503, Some(i));
                continue;
            }
        }
        let choices = chaos.choices(agent_restarts());
        let (action, i) = choices[rng.below(choices.len())];
        do_action(&mut soak, &mut chaos, &mut rng, action, i);
    }
    // Back to normal before the traffic stops, so the last actions are judged too.
    if let Some((i, _, _)) = chaos.episode {
        do_action(&mut soak, &mut chaos, &mut rng, Action::End503, Some(i));
    }
    for i in 0..4 {
        match chaos.listener[i] {
            Listener::Drained => {
                do_action(&mut soak, &mut chaos, &mut rng, Action::Restore, Some(i))
            }
            Listener::Killed => do_action(&mut soak, &mut chaos, &mut rng, Action::Revive, Some(i)),
            Listener::Up => {}
        }
    }
    thread::sleep(Duration::from_secs(1));
    shared.stop.store(true, Ordering::SeqCst);
    let reports: Vec<ClientReport> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let elapsed = t0.elapsed();
    checkpoints.push(soak.checkpoint(&shared));

    // --- Judge every call that did not end with a 200.
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept_opened = 0;
    let mut odd: Vec<Odd> = Vec::new();
    let mut slow_ok: Vec<(Instant, Instant, String)> = Vec::new();
    for r in reports {
        for (name, n) in r.served {
            *served.entry(name).or_default() += n;
        }
        kept_opened += r.kept_opened;
        odd.extend(r.odd);
        slow_ok.extend(r.slow_ok);
    }
    odd.sort_by_key(|o| o.start);
    let disruptive = |backend: Option<usize>, from: Instant, to: Instant| {
        chaos.log.iter().any(|d| {
            // A drain or kill closes every connection of the backend; an agent restart
            // is to close none, so it excuses nothing.
            matches!(d.action, Action::Drain | Action::Kill)
                && (backend.is_none() || d.backend == backend)
                && overlaps(d.start, d.end, from, to)
        })
    };
    let backend_of = |name: &str| names.iter().position(|n| n == name);
    let mut failures_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut violations: Vec<String> = Vec::new();
    let mut new_5xx_per_episode = vec![0usize; chaos.episodes.len()];
    // Per episode, the 503s on new connections: (connection opened, answer read).
    let mut new_5xx_calls: Vec<Vec<(Instant, Instant)>> = vec![Vec::new(); chaos.episodes.len()];
    let (mut new_5xx, mut kept_5xx, mut kept_breaks, mut new_breaks) = (0u64, 0u64, 0u64, 0u64);
    let mut kept_breaks_by_backend: BTreeMap<String, u64> = BTreeMap::new();
    let at = |t: Instant| format!("{:9.3}s", t.duration_since(t0).as_secs_f64());
    for o in &odd {
        let what = format!(
            "{} {} call {}..{} (connected {}): {:?}",
            at(o.start),
            o.client,
            at(o.start),
            at(o.end),
            o.connected.map_or("never".into(), at),
            o.outcome
        );
        match &o.outcome {
            Ok((status, body)) if (500..600).contains(status) => {
                // 5xx served: only by the backend of a 503 episode, during it.
                *failures_by_kind.entry("5xx served".into()).or_default() += 1;
                let b = backend_of(body);
                let episode = chaos
                    .episodes
                    .iter()
                    .position(|e| Some(e.backend) == b && overlaps(e.start, e.end, o.start, o.end));
                match (episode, &o.kept_on) {
                    (None, _) => violations.push(format!("5xx outside a 503 episode: {what}")),
                    (Some(_), Some(_)) => kept_5xx += 1,
                    (Some(e), None) => {
                        new_5xx += 1;
                        new_5xx_per_episode[e] += 1;
                        new_5xx_calls[e].push((o.connected.unwrap_or(o.start), o.end));
                    }
                }
            }
            Ok(_) => {
                *failures_by_kind.entry("other status".into()).or_default() += 1;
                violations.push(format!("unexpected status: {what}"));
            }
            Err((kind, _)) => {
                *failures_by_kind
                    .entry(format!("{kind:?}").to_lowercase())
                    .or_default() += 1;
                match (&o.kept_on, o.connected) {
                    // `connect()` failing with ECONNRESET: the handshake had completed
                    // (an RST in SYN_SENT is ECONNREFUSED) and the connection was reset
                    // before the client ran again. A backend whose listener closes resets
                    // the connections it has accepted but not handed out: allowed only
                    // while a backend was being drained or killed, like any break of an
                    // established connection.
                    (None, None) if *kind == Kind::Reset && what.contains("connect:") => {
                        new_breaks += 1;
                        if !disruptive(None, o.start, o.end) {
                            violations.push(format!(
                                "new connection reset as its connect completed, with no \
                                 backend drained or killed meanwhile: {what}"
                            ));
                        }
                    }
                    // No connection: a failed new connection, with an eligible backend
                    // (the chaos loop always keeps one; asserted at each action).
                    (_, None) => violations.push(format!("failed new connection: {what}")),
                    // A kept connection broke: only when its backend was drained or
                    // killed during its life (since its last 200). Unknown backend (no
                    // answer yet on it): any drain or kill in that time.
                    (Some((name, since)), Some(_)) => {
                        kept_breaks += 1;
                        *kept_breaks_by_backend.entry(name.clone()).or_default() += 1;
                        let b = backend_of(name);
                        if (b.is_none() && name != "?") || !disruptive(b, *since, o.end) {
                            violations.push(format!(
                                "kept connection on {name} broke, its backend was neither \
                                 drained nor killed: {what}"
                            ));
                        }
                    }
                    // A new connection broke after its connect succeeded: its backend is
                    // not known (no answer), so allowed only when some backend was being
                    // drained or killed meanwhile (its connection closed under it).
                    (None, Some(connected)) => {
                        new_breaks += 1;
                        if !disruptive(None, connected, o.end) {
                            violations.push(format!(
                                "established new connection broke with no backend drained \
                                 or killed meanwhile: {what}"
                            ));
                        }
                    }
                }
            }
        }
    }
    // Outlier detection runs in the agent: a 503 answered while the agent was restarting
    // (killed, not yet ready) is seen by none, and a restarted agent counts anew. So the
    // rule applies per agent generation: once that agent has seen enough 503s.
    let restarts: Vec<(Instant, Instant)> = chaos
        .log
        .iter()
        .filter(|d| d.action == Action::RestartAgent)
        .map(|d| (d.start, d.end))
        .collect();
    let agent_down = |t: Instant| restarts.iter().any(|&(down, up)| t >= down && t <= up);
    let generation = |t: Instant| restarts.iter().filter(|&&(down, _)| down <= t).count();
    for (e, calls) in chaos.episodes.iter().zip(&mut new_5xx_calls) {
        calls.sort_by_key(|&(_, answered)| answered);
        let mut by_generation: BTreeMap<usize, Vec<(Instant, Instant)>> = BTreeMap::new();
        for &(opened, answered) in calls.iter() {
            if !agent_down(answered) {
                by_generation
                    .entry(generation(answered))
                    .or_default()
                    .push((opened, answered));
            }
        }
        for (g, seen) in by_generation {
            let Some(&(_, enough)) = seen.get(CONSECUTIVE_5XX + REORDERED_5XX - 1) else {
                continue;
            };
            let late = seen
                .iter()
                .filter(|&&(opened, _)| opened > enough + EJECTION_GRACE && generation(opened) == g)
                .count();
            if late > 0 {
                violations.push(format!(
                    "503 episode of backend {} ({}..{}): {late} 503s on connections opened \
                     more than {EJECTION_GRACE:?} after the {}th 503 the same agent saw \
                     ({}), when consecutive5xxErrors {CONSECUTIVE_5XX} + reordering \
                     allowance {REORDERED_5XX} had ejected it",
                    e.backend + 1,
                    at(e.start),
                    at(e.end),
                    CONSECUTIVE_5XX + REORDERED_5XX,
                    at(enough),
                ));
            }
        }
    }

    // --- The data plane's counters, between checkpoints (no call in flight at either).
    // 200s the kernel cannot have parsed: a response sent by a backend that was killed
    // while it was on the way (black-holed) is retransmitted after the revival together
    // with the FIN that closed the connection; lb reads the status line of such a segment
    // too, so this allowance should stay unused.
    let late_ok = slow_ok
        .iter()
        .filter(|(start, end, name)| {
            let b = backend_of(name);
            chaos.log.iter().any(|d| {
                d.action == Action::Kill && d.backend == b && overlaps(d.start, d.end, *start, *end)
            })
        })
        .count() as u64;
    let mut counter_report = String::new();
    for pair in checkpoints.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.kernel.c("forward_new") < a.kernel.c("forward_new") {
            let _ = writeln!(
                counter_report,
                "  window {}..{}: the counters started again (agent generation {} -> {}): \
                 not compared",
                at(a.at),
                at(b.at),
                a.epoch,
                b.epoch
            );
            continue;
        }
        let d = |f: fn(&Kernel) -> u64| f(&b.kernel) - f(&a.kernel);
        let dc = |name: &str| b.kernel.c(name) - a.kernel.c(name);
        let attempts = b.clients.attempts - a.clients.attempts;
        let ok = b.clients.ok - a.clients.ok;
        let five = b.clients.five_xx - a.clients.five_xx;
        let forward_new = dc("forward_new");
        let midflow = dc("event_midflow_miss");
        let moved =
            dc("forward_resteered") + dc("drop_refusal_held") + dc("event_timeout_resteered");
        let translated =
            forward_new + dc("forward_tracked") + dc("reply_tracked") + dc("forward_resteered");
        let (verdicts, ifaces) = (d(|k| k.verdicts), d(|k| k.iface_packets));
        let (svc_new, backend_new) = (d(|k| k.svc_new), d(|k| k.backend_new));
        let (http_ok, http_5xx) = (d(|k| k.http_ok), d(|k| k.http_5xx));
        let (svc_packets, backend_packets) = (d(|k| k.svc_packets), d(|k| k.backend_packets));
        let _ = writeln!(
            counter_report,
            "  window {}..{} (agent generations {}..{}):\n\
             \x20   connection attempts {attempts:>9}   forward_new {forward_new} (midflow {midflow}), \
             service new connections {svc_new}\n\
             \x20   backends' new connections {backend_new} = service {svc_new} + moved by lb {moved} \
             (refusals re-sent {}, held {}, timeouts re-steered {})\n\
             \x20   HTTP 200 read {ok:>9}   kernel http_ok {http_ok} (late after a kill: {late_ok})\n\
             \x20   HTTP 5xx read {five:>9}   kernel http_5xx {http_5xx}\n\
             \x20   service packets {svc_packets} = translated {translated}, backends {backend_packets}\n\
             \x20   verdicts {verdicts}, interface packets (rx + tx) {ifaces}",
            at(a.at),
            at(b.at),
            a.epoch,
            b.epoch,
            dc("forward_resteered"),
            dc("drop_refusal_held"),
            dc("event_timeout_resteered"),
        );
        let mut check = |ok: bool, what: String| {
            if !ok {
                violations.push(format!("counters {}..{}: {what}", at(a.at), at(b.at)));
            }
        };
        // Every connect() is one SYN that finds no entry: one forward_new (its
        // retransmissions find the entry). A packet of a connection whose entry was lost
        // is also a forward_new, counted as midflow. Once the connection table is full
        // (an LRU map), it evicts, and a retransmitted SYN whose entry was evicted is a
        // forward_new again (not a midflow: it is a SYN): only then may there be more.
        let ct_full = b.kernel.ct_capacity > 0 && b.kernel.ct_entries >= b.kernel.ct_capacity;
        let _ = writeln!(
            counter_report,
            "    connection table {} of {} entries{}",
            b.kernel.ct_entries,
            b.kernel.ct_capacity,
            if ct_full { " (full: LRU evicting)" } else { "" }
        );
        //
        // Every extra forward_new must be a retransmitted SYN that found no entry, so at
        // most the retransmissions the clients can have sent. (Runs used to show a few
        // dozen more, and that was lb: a late packet of an older connection moved the
        // new connection's entries to closing, and its retransmitted SYN then started a
        // new connection; and a new attempt on ports whose abandoned attempt was still
        // in its handshake was forwarded on the old entry, with no forward_new. Both
        // fixed, each with a fixture.)
        let retransmits = b.clients.syn_retransmits - a.clients.syn_retransmits;
        let extra = (forward_new - midflow).wrapping_sub(attempts) as i64;
        let _ = writeln!(
            counter_report,
            "    forward_new beyond attempts: {extra} (SYN retransmissions possible: \
             {retransmits})"
        );
        // Not yet explained: since those fixes, two 300 s runs of three ended one
        // forward_new *short* of the attempts (of ~345,000; the 30 s run in CI has not
        // shown it). The tolerance admits that much either way and the report shows it;
        // more fails.
        let unexplained = 2 + attempts / 10_000;
        check(
            forward_new - midflow + unexplained >= attempts
                && (forward_new - midflow <= attempts + retransmits + unexplained || ct_full),
            format!(
                "forward_new {forward_new} - midflow {midflow} vs attempts {attempts}, \
                 SYN retransmissions possible {retransmits} (connection table full: \
                 {ct_full})"
            ),
        );
        check(
            svc_new == forward_new,
            format!("service new connections {svc_new} != forward_new {forward_new}"),
        );
        // A connection attempt lb moves to another backend counts once more, for that
        // backend (the service still has one connection).
        check(
            backend_new == svc_new + moved,
            format!("backends' new connections {backend_new} != {svc_new} + moved {moved}"),
        );
        // Every translated packet is accounted to the service and to one backend.
        check(
            svc_packets == translated && backend_packets == svc_packets,
            format!(
                "service packets {svc_packets}, translated {translated}, backends \
                 {backend_packets}"
            ),
        );
        // Every answer the clients read passed the node once and its status line was
        // read, except the late ones above. The kernel may also have read answers no
        // client read: a killed backend's response retransmitted after its revival, to a
        // client that had given up on the call, or an answer on its way when a kept
        // connection broke (the calls of this window that got no answer).
        let unread = odd
            .iter()
            .filter(|o| o.outcome.is_err() && o.end >= a.at && o.end <= b.at)
            .count() as u64;
        check(
            ok <= http_ok + late_ok && http_ok <= ok + unread && http_5xx == five,
            format!(
                "kernel http_ok/http_5xx {http_ok}/{http_5xx}, clients read 200/5xx \
                 {ok}/{five} (late 200s {late_ok})"
            ),
        );
        // Every packet through an attached interface (each hook: ingress and egress) has
        // exactly one verdict. The counters and the interfaces are read one after the
        // other, and closed connections (orphaned sockets) may still retransmit a FIN in
        // between: a few packets either way.
        check(
            verdicts.abs_diff(ifaces) <= 20,
            format!("verdicts {verdicts} vs interface packets {ifaces}"),
        );
        // An eligible backend always existed and nothing else may drop or lose.
        for bad in [
            "drop_no_backend",
            "drop_no_active_backend",
            "drop_rewrite_failed",
            "event_track_failed",
            "event_signal_lost",
            "event_refusal_passed",
        ] {
            check(dc(bad) == 0, format!("{bad} = {}", dc(bad)));
        }
    }

    // --- Summary.
    let total_ok: u64 = served.values().sum();
    let mut actions: BTreeMap<Action, u64> = BTreeMap::new();
    for d in &chaos.log {
        *actions.entry(d.action).or_default() += 1;
    }
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "\n==== soak summary: {:.1} s, seed {seed}, {NEW_CONN_THREADS} new-connection + \
         {KEEPALIVE_CLIENTS} keep-alive clients ====",
        elapsed.as_secs_f64()
    );
    let _ = writeln!(summary, "requests served (200)      {total_ok:>10}");
    for (name, n) in &served {
        let _ = writeln!(summary, "  {name:<66} {n:>8}");
    }
    let _ = writeln!(
        summary,
        "kept connections opened    {kept_opened:>10}\n\
         5xx served, new conns      {new_5xx:>10}   (per episode: {new_5xx_per_episode:?}, \
         none opened {EJECTION_GRACE:?} after the {}th)\n\
         5xx served, kept conns     {kept_5xx:>10}\n\
         kept connections broken    {kept_breaks:>10}   {kept_breaks_by_backend:?}\n\
         new conns broken after connect {new_breaks:>6}",
        CONSECUTIVE_5XX + REORDERED_5XX
    );
    let _ = writeln!(summary, "non-200 calls by kind:");
    for (kind, n) in &failures_by_kind {
        let _ = writeln!(summary, "  {kind:<24} {n:>10}");
    }
    let _ = writeln!(summary, "chaos actions:");
    for (a, n) in &actions {
        let _ = writeln!(summary, "  {:<24} {n:>10}", a.label());
    }
    if !agent_restarts() {
        let _ = writeln!(summary, "  (restart agent: off, LB_SOAK_AGENT_RESTARTS=0)");
    }
    let _ = writeln!(summary, "data plane counters:\n{counter_report}");
    let _ = writeln!(summary, "unexpected failures: {}", violations.len());
    println!("{summary}");

    if !violations.is_empty() {
        // Actions, lb's view (backends not active) and the calls that did not end with a
        // 200 (5xx of episodes left out), in time order.
        let mut events: Vec<(Instant, String)> = Vec::new();
        for d in &chaos.log {
            events.push((
                d.start,
                format!(
                    "action {} backend {} (done at {})",
                    d.action.label(),
                    d.backend.map_or("-".into(), |b| (b + 1).to_string()),
                    at(d.end)
                ),
            ));
        }
        for (t, inactive) in &chaos.lb_views {
            let list: Vec<usize> = inactive.iter().map(|i| i + 1).collect();
            events.push((*t, format!("lb: backends not active {list:?}")));
        }
        for o in odd.iter().filter(|o| o.outcome.is_err()) {
            events.push((
                o.start,
                format!(
                    "call {} until {} (connected {}): {:?}",
                    o.client,
                    at(o.end),
                    o.connected.map_or("never".into(), at),
                    o.outcome
                ),
            ));
        }
        events.sort_by_key(|e| e.0);
        let mut timeline = String::new();
        for (t, e) in &events {
            let _ = writeln!(timeline, "  {} {e}", at(*t));
        }
        panic!(
            "{} unexpected failure(s) (seed {seed}):\n{}\nchaos timeline:\n{timeline}",
            violations.len(),
            violations
                .iter()
                .take(50)
                .map(|v| format!("  {v}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
