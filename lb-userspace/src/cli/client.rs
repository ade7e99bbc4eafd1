//! A small HTTP/1.1 client for the agent's admin endpoint (plain TCP on the node, so no
//! HTTP library is needed), and the answers `lb` reads from it.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// How long `lb` waits for the agent.
const TIMEOUT: Duration = Duration::from_secs(5);

/// An answer of the admin endpoint.
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// The agent could not be reached at all (as opposed to an error answer).
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Sends `method path` with `headers` to `addr`. An error downcasts to [`Unreachable`]
/// when no answer came (refused, timed out, closed early).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response> {
    let unreachable = |e: std::io::Error| anyhow::Error::new(Unreachable(e.to_string()));
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-cli\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(unreachable)?;
    parse_response(&raw).map_err(|e| anyhow::Error::new(Unreachable(format!("{e:#}"))))
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer ended inside its headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("not an HTTP answer: {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = &raw[split + 4..];
    let decoded;
    if chunked {
        decoded = dechunk(body)?;
        body = &decoded;
    } else if let Some(n) = length {
        body = &body[..n.min(body.len())];
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk size line is cut short")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("a chunk is cut short");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /services` as the agent answers it (fields lb does not know are ignored, missing
/// ones take defaults, so an agent of another version still reads).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AgentServices {
    #[serde(default)]
    pub node_locality: Option<String>,
    #[serde(default)]
    pub services: Vec<AgentService>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AgentService {
    #[serde(default)]
    pub name: String,
    /// `VIP:PORT/PROTO`, as `lb` prints frontends.
    #[serde(default)]
    pub frontend: String,
    /// The document or cluster object that defined it.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub priority_loads: Vec<u32>,
    #[serde(default)]
    pub endpoints: Vec<AgentEndpoint>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AgentEndpoint {
    /// `IP:PORT`.
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub locality: String,
    #[serde(default)]
    pub priority: Option<u32>,
    #[serde(default)]
    pub share: f64,
    #[serde(default)]
    pub ejected: bool,
    #[serde(default)]
    pub draining: bool,
    /// `passing` or `failing` under an active health check; absent without one.
    #[serde(default)]
    pub health_check: Option<String>,
}

/// What the agent said (`GET /services`, and `GET /clusters` when it has it), or why it
/// could not be asked.
pub enum Agent {
    Answered(AgentServices, Option<ClusterFacts>),
    Unreachable(String),
}

/// Asks the agent for its services and clusters. Errors other than "not reachable" (a bad
/// answer) are reported as unreachable too: the maps are shown either way.
pub fn services(addr: SocketAddr) -> Agent {
    let answer = request(addr, "GET", "/services", &[]).and_then(|r| {
        if r.status != 200 {
            bail!("GET /services answered {}: {}", r.status, r.body.trim());
        }
        serde_json::from_str::<AgentServices>(&r.body)
            .context("GET /services answered JSON lb cannot read")
    });
    match answer {
        Ok(s) => Agent::Answered(s, clusters(addr)),
        Err(e) => Agent::Unreachable(format!("{e:#}")),
    }
}

/// Per-endpoint facts from `GET /clusters`, in Envoy's text form
/// (`CLUSTER::IP:PORT::NAME::VALUE`), by (cluster, endpoint) and name: counters
/// (`cx_connect_fail`, `rq_error`, ...), `health_flags`, `priority`, ...
pub type ClusterFacts = BTreeMap<(String, String), BTreeMap<String, String>>;

/// `GET /clusters` when the agent has it; `None` otherwise.
pub fn clusters(addr: SocketAddr) -> Option<ClusterFacts> {
    let r = request(addr, "GET", "/clusters", &[]).ok()?;
    if r.status != 200 {
        return None;
    }
    let facts = parse_clusters(&r.body);
    (!facts.is_empty()).then_some(facts)
}

fn parse_clusters(text: &str) -> ClusterFacts {
    let mut out = ClusterFacts::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.splitn(4, "::").collect();
        let [cluster, host, name, value] = parts[..] else {
            continue;
        };
        // Endpoint lines only (`CLUSTER::outlier::...` is about the cluster).
        if host.parse::<std::net::SocketAddrV4>().is_err() {
            continue;
        }
        out.entry((cluster.to_string(), host.to_string()))
            .or_default()
            .insert(name.to_string(), value.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_chunked_answers() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hi"));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "abcde"));
    }

    #[test]
    fn reads_envoy_cluster_text() {
        let facts = parse_clusters(
            "outbound|80||web::outlier::success_rate_average::-1\n\
             outbound|80||web::10.0.0.1:8080::rq_error::3\n\
             outbound|80||web::10.0.0.1:8080::health_flags::/failed_outlier_check\n",
        );
        let e = &facts[&("outbound|80||web".to_string(), "10.0.0.1:8080".to_string())];
        assert_eq!(e["rq_error"], "3");
        assert_eq!(e["health_flags"], "/failed_outlier_check");
        assert_eq!(facts.len(), 1);
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("10.96.0.10:80"), "10.96.0.10:80");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
