//! The agent's admin endpoint (HTTP).
//!
//! - `GET /services`: every service, its priority loads, and per endpoint its locality,
//!   priority, share of new connections and whether it is ejected or draining (JSON).
//! - `POST /endpoints/{address:port}/{eject|uneject|drain|undrain}[?service=NAME|VIP:PORT]`:
//!   an operator action on that endpoint in every service that has it (or only the named
//!   one). It goes through outlier detection like an ejection it decided itself, and the
//!   new tables are live when the answer comes back.
//! - `POST /endpoints/{address:port}/events/{connect-failure|timeout|reset|success|<HTTP status>}`:
//!   feeds one outlier-detection event, as the data plane reports them; an ejection it
//!   causes lasts `baseEjectionTime` × its count and ends at a sweep, as in Envoy.

use std::{
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;

use crate::{
    agent::{lock, Agent, AgentStatus},
    outlier::{Event, OperatorAction},
};

type Shared = Arc<Mutex<Agent>>;

pub async fn serve(listener: tokio::net::TcpListener, agent: Shared) {
    let app = Router::new()
        .route("/services", get(services))
        .route("/endpoints/{endpoint}/{action}", post(endpoint_action))
        .route("/endpoints/{endpoint}/events/{event}", post(endpoint_event))
        .with_state(agent);
    if let Err(e) = axum::serve(listener, app).await {
        log::error!("admin endpoint stopped: {e}");
    }
}

async fn services(State(agent): State<Shared>) -> Json<AgentStatus> {
    Json(lock(&agent).status())
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
    State(agent): State<Shared>,
    Path((endpoint, action)): Path<(String, String)>,
    Query(target): Query<Target>,
) -> (StatusCode, String) {
    let endpoint = match parse_endpoint(&endpoint) {
        Ok(e) => e,
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
    respond(&agent, format!("{action:?} {endpoint}"), |a| {
        a.operator(endpoint, target.service.as_deref(), action)
    })
}

async fn endpoint_event(
    State(agent): State<Shared>,
    Path((endpoint, event)): Path<(String, String)>,
    Query(target): Query<Target>,
) -> (StatusCode, String) {
    let endpoint = match parse_endpoint(&endpoint) {
        Ok(e) => e,
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
    respond(&agent, format!("{event:?} {endpoint}"), |a| {
        a.record(endpoint, target.service.as_deref(), event)
    })
}
