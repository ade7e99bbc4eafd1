//! What the sections measured, as data: the plots (`plots`) and `--write-docs`
//! (`report`) are made from these.

/// How the load generator uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoadMode {
    /// Requests on long-lived connections (HTTP/1.1 keep-alive).
    KeepAlive,
    /// One new TCP connection per request, closed after the response: every request pays
    /// a handshake and a new flow in each balancer (the failover case of the seed).
    NewConnection,
}

impl LoadMode {
    pub fn label(self) -> &'static str {
        match self {
            LoadMode::KeepAlive => "keep-alive",
            LoadMode::NewConnection => "new connection per request",
        }
    }
}

/// One measured run of one target in one mode.
#[derive(Clone, Debug, Default)]
pub struct RunFigures {
    /// Completed requests per second (for `NewConnection`, also connections per second).
    pub requests_per_s: f64,
    /// Request latency percentiles in microseconds. For `NewConnection` they include the
    /// TCP handshake (connect start to the last byte of the response).
    pub p50_us: f64,
    pub p99_us: f64,
    /// Requests that failed (connect error, reset, timeout, non-200).
    pub errors: u64,
    /// Requests that completed.
    pub requests: u64,
}

/// Every round of one target in one mode.
#[derive(Clone, Debug)]
pub struct TargetFigures {
    /// Short name shown in tables and plots: `direct`, `lb TC`, `lb XDP`,
    /// `iptables`, `nftables`, `HAProxy`, `nginx`.
    pub target: String,
    pub mode: LoadMode,
    /// One entry per round, in round order.
    pub rounds: Vec<RunFigures>,
}

/// One call of the failover timeline.
#[derive(Clone, Debug)]
pub struct TimelineCall {
    /// When the call started, in ms from the start of the timeline.
    pub at_ms: f64,
    /// The locality that answered (`region1.zone1`, ...), `None` for a failed call.
    pub served_by: Option<String>,
}

/// The failover timeline: a client calling on new connections while the localities are
/// drained one after another.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub calls: Vec<TimelineCall>,
    /// When each drain happened (ms from the start), with the drained locality.
    pub drains: Vec<(f64, String)>,
    /// The localities in priority order (the plot's rows, top to bottom).
    pub localities: Vec<String>,
}
