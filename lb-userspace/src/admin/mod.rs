//! The agent's admin endpoint (HTTP). Bind it to a loopback address (`--admin
//! 127.0.0.1:15000`): its views are open to whoever reaches it.
//!
//! Views (open):
//! - `GET /healthz`: 200 `ok` while the agent runs;
//! - `GET /ready`: 200 once the data plane is attached and the configuration applied, 503
//!   before;
//! - `GET /clusters[?format=json]`: Envoy's cluster view (`clusters.rs`);
//! - `GET /metrics`: Prometheus exposition (`metrics.rs`);
//! - `GET /config_dump`: the configuration in force (`config_dump.rs`);
//! - `GET /services`: every service, its priority loads, and per endpoint its locality,
//!   priority, share of new connections and whether it is ejected or draining (JSON).
//!
//! Mutating calls are refused (403) unless they come from a loopback address and carry
//! the header `x-lb-token` with the token the agent wrote to its token file (`token.rs`):
//! - `POST /endpoints/{address:port}/{eject|uneject|drain|undrain}[?service=NAME|VIP:PORT]`:
//!   an operator action on that endpoint in every service that has it (or only the named
//!   one). It goes through outlier detection like an ejection it decided itself, and the
//!   new tables are live when the answer comes back.
//! - `POST /endpoints/{address:port}/events/{connect-failure|timeout|reset|success|<HTTP status>}`:
//!   feeds one outlier-detection event, as the data plane reports them; an ejection it
//!   causes lasts `baseEjectionTime` × its count and ends at a sweep, as in Envoy.
//! - `POST /reload`: reads the configuration files now; on error the configuration in
//!   force stays and the answer (422) says why.

mod clusters;
mod config_dump;
pub mod metrics;
mod snapshot;
pub mod token;

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
};

use axum::{
    extract::{ConnectInfo, Path, Query, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;

use self::snapshot::Snapshot;
use crate::{
    agent::{lock, reload_from_files, Agent, AgentStatus},
    outlier::{Event, OperatorAction},
};

type Shared = Arc<Mutex<Agent>>;

/// The header mutating calls carry the token in.
pub const TOKEN_HEADER: &str = "x-lb-token";

/// What the admin endpoint serves from.
pub struct AdminState {
    /// Set once the data plane is attached and the configuration applied.
    agent: OnceLock<Shared>,
    token: String,
    token_file: PathBuf,
}

impl AdminState {
    pub fn new(token: String, token_file: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            agent: OnceLock::new(),
            token,
            token_file,
        })
    }

    /// The agent is running: the views and calls that need it are served from now on.
    pub fn set_agent(&self, agent: Shared) {
        let _ = self.agent.set(agent);
    }

    fn agent(&self) -> Result<&Shared, (StatusCode, String)> {
        self.agent.get().ok_or_else(|| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is starting: the data plane is not attached yet\n".to_string(),
            )
        })
    }
}

type Admin = State<Arc<AdminState>>;

pub async fn serve(listener: tokio::net::TcpListener, admin: Arc<AdminState>) {
    let mutating = Router::new()
        .route("/endpoints/{endpoint}/{action}", post(endpoint_action))
        .route("/endpoints/{endpoint}/events/{event}", post(endpoint_event))
        .route("/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(admin.clone(), authorize));
    let app = Router::new()
        .route("/", get(help))
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/services", get(services))
        .route("/clusters", get(clusters))
        .route("/metrics", get(metrics))
        .route("/config_dump", get(config_dump))
        .route("/tls_connections", get(tls_connections))
        .merge(mutating)
        .with_state(admin);
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service).await {
        log::error!("admin endpoint stopped: {e}");
    }
}

/// Lets a mutating call through only from a loopback address with the right token.
async fn authorize(
    State(admin): Admin,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let file = admin.token_file.display();
    let refused = |why: String| (StatusCode::FORBIDDEN, why).into_response();
    if !peer.ip().to_canonical().is_loopback() {
        return refused(format!(
            "refused: mutating admin calls are accepted only from a loopback address, \
             not from {peer}\n"
        ));
    }
    match request.headers().get(TOKEN_HEADER) {
        None => refused(format!(
            "refused: mutating admin calls need the header {TOKEN_HEADER}: TOKEN, with the \
             token in {file} (readable by root)\n"
        )),
        Some(t) if !token::matches(t.as_bytes(), &admin.token) => refused(format!(
            "refused: wrong {TOKEN_HEADER}; the agent writes a new token to {file} at each start\n"
        )),
        Some(_) => next.run(request).await,
    }
}

async fn help() -> &'static str {
    "lb agent admin endpoint\n\
     GET  /healthz                 200 while the agent runs\n\
     GET  /ready                   200 once the data plane is attached and configured\n\
     GET  /clusters[?format=json]  endpoints as Envoy's /clusters shows them\n\
     GET  /metrics                 Prometheus metrics\n\
     GET  /config_dump             the configuration in force (JSON)\n\
     GET  /services                services, priority loads and shares (JSON)\n\
     GET  /tls_connections         the connections the TLS forwarder carries now (JSON)\n\
     POST /endpoints/IP:PORT/{eject|uneject|drain|undrain}[?service=NAME|VIP:PORT]\n\
     POST /endpoints/IP:PORT/events/{connect-failure|timeout|reset|success|STATUS}\n\
     POST /reload                  read the configuration files now\n\
     POST calls: from a loopback address, with header x-lb-token (see --admin-token-file)\n"
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn ready(State(admin): Admin) -> (StatusCode, &'static str) {
    match admin.agent.get() {
        Some(_) => (StatusCode::OK, "ready\n"),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the data plane is not attached or the configuration not applied yet\n",
        ),
    }
}

async fn services(State(admin): Admin) -> Result<Json<AgentStatus>, (StatusCode, String)> {
    Ok(Json(lock(admin.agent()?).status()))
}

#[derive(Deserialize)]
struct Format {
    format: Option<String>,
}

fn pretty_json(value: &serde_json::Value) -> Response {
    let body = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn clusters(
    State(admin): Admin,
    Query(format): Query<Format>,
) -> Result<Response, (StatusCode, String)> {
    let snapshot = Snapshot::take(admin.agent()?, true);
    Ok(match format.format.as_deref() {
        Some("json") => pretty_json(&clusters::json(&snapshot)),
        _ => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            clusters::text(&snapshot),
        )
            .into_response(),
    })
}

async fn metrics(State(admin): Admin) -> Result<Response, (StatusCode, String)> {
    let snapshot = Snapshot::take_for_metrics(admin.agent()?);
    // Encoded on a blocking thread and sent as it is written, a chunk at a time, so the
    // whole text (10 MiB at 10,000 services) is never held at once; a client that goes
    // away stops the encoding.
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(2);
    tokio::task::spawn_blocking(move || {
        let mut out = ChunkWriter {
            tx,
            chunk: String::with_capacity(CHUNK),
        };
        if metrics::render_into(snapshot, &mut out).is_ok() && !out.chunk.is_empty() {
            let _ = out.tx.blocking_send(out.chunk);
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// Bytes of exposition text per chunk of a `/metrics` response.
const CHUNK: usize = 64 * 1024;

/// Hands the text written to it to a response body, `CHUNK` bytes at a time.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<String>,
    chunk: String,
}

impl std::fmt::Write for ChunkWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.chunk.push_str(s);
        if self.chunk.len() >= CHUNK {
            let full = std::mem::replace(&mut self.chunk, String::with_capacity(CHUNK));
            // The client went away: stop encoding.
            self.tx.blocking_send(full).map_err(|_| std::fmt::Error)?;
        }
        Ok(())
    }
}

async fn config_dump(State(admin): Admin) -> Result<Response, (StatusCode, String)> {
    let snapshot = Snapshot::take(admin.agent()?, false);
    Ok(pretty_json(&config_dump::json(&snapshot)))
}

/// The TLS forwarder's connections now (for `lb conntrack`): they are not in the
/// connection table, which holds the kernel path's.
async fn tls_connections(State(admin): Admin) -> Result<Response, (StatusCode, String)> {
    let agent = admin.agent()?;
    let counts = crate::agent::lock(agent)
        .tls
        .as_ref()
        .map(|t| t.counts.clone());
    let live: Vec<serde_json::Value> = counts
        .map(|c| c.live())
        .unwrap_or_default()
        .into_iter()
        .map(|(c, age)| {
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            v["age_seconds"] = serde_json::json!(age);
            v
        })
        .collect();
    Ok(pretty_json(&serde_json::json!(live)))
}

async fn reload(State(admin): Admin) -> (StatusCode, String) {
    let agent = match admin.agent() {
        Ok(agent) => agent.clone(),
        Err(answer) => return answer,
    };
    match tokio::task::spawn_blocking(move || reload_from_files(&agent)).await {
        Ok(Ok(services)) => (
            StatusCode::OK,
            format!("configuration reloaded: {services} services\n"),
        ),
        Ok(Err(e)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("configuration not applied, the previous one stays in force: {e:#}\n"),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the reload did not finish: {e}\n"),
        ),
    }
}

#[derive(Deserialize)]
struct Target {
    service: Option<String>,
}

/// Parses the `IP:PORT` of a request path.
fn parse_endpoint(endpoint: &str) -> Result<SocketAddrV4, (StatusCode, String)> {
    endpoint.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            format!("endpoint {endpoint:?} is not an IPv4 address:port\n"),
        )
    })
}

/// Runs `act` on the agent and turns its result into an answer.
fn respond(
    agent: &Shared,
    what: String,
    act: impl FnOnce(&mut Agent) -> anyhow::Result<usize>,
) -> (StatusCode, String) {
    let mut agent = lock(agent);
    match act(&mut agent) {
        Ok(n) => (
            StatusCode::OK,
            format!(
                "{what}: {n} endpoint(s); tables live after {} µs\n",
                agent.last_publish.map_or(0, |d| d.as_micros())
            ),
        ),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e:#}\n")),
    }
}

async fn endpoint_action(
    State(admin): Admin,
    Path((endpoint, action)): Path<(String, String)>,
    Query(target): Query<Target>,
) -> (StatusCode, String) {
    let (agent, endpoint) = match admin
        .agent()
        .and_then(|agent| Ok((agent, parse_endpoint(&endpoint)?)))
    {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let action = match action.as_str() {
        "eject" => OperatorAction::Eject,
        "uneject" => OperatorAction::Uneject,
        "drain" => OperatorAction::Drain,
        "undrain" => OperatorAction::Undrain,
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("action {other:?} is not one of eject, uneject, drain, undrain\n"),
            )
        }
    };
    respond(agent, format!("{action:?} {endpoint}"), |a| {
        a.operator(endpoint, target.service.as_deref(), action)
    })
}

async fn endpoint_event(
    State(admin): Admin,
    Path((endpoint, event)): Path<(String, String)>,
    Query(target): Query<Target>,
) -> (StatusCode, String) {
    let (agent, endpoint) = match admin
        .agent()
        .and_then(|agent| Ok((agent, parse_endpoint(&endpoint)?)))
    {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let event = match event.as_str() {
        "connect-failure" => Event::ConnectFailure,
        "timeout" => Event::Timeout,
        "reset" => Event::Reset,
        "success" => Event::Success,
        status => match status.parse::<u16>() {
            Ok(code) if (100..600).contains(&code) => Event::HttpStatus(code),
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "event {status:?} is not one of connect-failure, timeout, reset, \
                         success or an HTTP status\n"
                    ),
                )
            }
        },
    };
    respond(agent, format!("{event:?} {endpoint}"), |a| {
        a.record(endpoint, target.service.as_deref(), event)
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// `METHOD path` with `headers` on a new connection: status and body.
    fn call(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
        let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    /// Before the agent has started: alive, not ready, views unavailable; mutating calls
    /// are still checked for the token first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starting_agent_is_alive_not_ready() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = AdminState::new("t0k3n".into(), "/run/lb/admin.token".into());
        tokio::spawn(serve(listener, admin));
        let answers = tokio::task::spawn_blocking(move || {
            [
                call(addr, "GET", "/healthz", ""),
                call(addr, "GET", "/ready", ""),
                call(addr, "GET", "/clusters", ""),
                call(addr, "POST", "/reload", ""),
                call(addr, "POST", "/reload", "x-lb-token: t0k3n\r\n"),
                call(
                    addr,
                    "POST",
                    "/endpoints/10.0.0.1:80/drain",
                    "x-lb-token: nope\r\n",
                ),
            ]
        })
        .await
        .unwrap();
        let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
        assert_eq!(statuses, [200, 503, 503, 403, 503, 403], "{answers:?}");
        assert_eq!(answers[0].1, "ok\n");
        assert!(answers[3].1.contains("/run/lb/admin.token"), "{answers:?}");
    }
}
