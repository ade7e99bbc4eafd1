//! `lb` commands for operators: what the data plane holds and what the agent decided.
//!
//! Read commands (`services`, `endpoints`, `conntrack`, `stats`, `maps`) read the maps the
//! agent pinned (`--pin-dir`, `/sys/fs/bpf/lb` by default) first, so they work while the
//! agent is down or after it crashed, and ask the agent's admin endpoint (`--admin`) for
//! what only it knows (service names, localities, priorities, shares, outlier state). When
//! the agent cannot be reached they say so on stderr and show what the maps give; when the
//! maps and the agent disagree they show the maps' view and a note.
//!
//! Operator actions (`eject`, `uneject`, `drain`, `undrain`) go through the admin endpoint,
//! with the token from `--admin-token-file` in the `x-lb-token` header.
//!
//! Exit codes, for scripts: 0 success; 1 error; 2 usage error; 3 not root, no BPF
//! filesystem, or the maps are not pinned; 4 the agent is not reachable for a command that
//! needs it.

mod actions;
mod client;
mod conntrack;
mod maps;
mod pins;
mod services;
mod stats;
mod table;
mod view;

use std::{
    io::Write as _,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use clap::{Args, Subcommand, ValueEnum};

pub use pins::Pins;

/// Success.
pub const EXIT_OK: i32 = 0;
/// Any other error (the agent refused an action, a map could not be read, ...).
pub const EXIT_ERROR: i32 = 1;
/// Usage error (clap's own exit code).
pub const EXIT_USAGE: i32 = 2;
/// Not root, no BPF filesystem, or the agent's maps are not pinned where expected.
pub const EXIT_NO_PINS: i32 = 3;
/// The agent is not reachable and the command needs it.
pub const EXIT_NO_AGENT: i32 = 4;

/// Default address of the agent's admin endpoint.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

/// An error with the exit code it stands for.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// An error that exits with `code`.
pub fn fail(code: i32, message: impl Into<String>) -> anyhow::Error {
    Failure {
        code,
        message: message.into(),
    }
    .into()
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Flags every command takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Directory in the BPF filesystem where the agent pins its maps.
    #[arg(long, default_value = crate::agent::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Address of the agent's admin endpoint.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of an operator action.
#[derive(Args, Clone, Debug)]
pub struct ActionArgs {
    /// The endpoint, IP:PORT.
    pub endpoint: SocketAddrV4,
    /// Only in this service (its name or VIP:PORT); every service that has the endpoint
    /// otherwise.
    #[arg(long)]
    pub service: Option<String>,
    /// File holding the agent's admin token (sent as `x-lb-token`).
    #[arg(long, default_value = crate::agent::DEFAULT_ADMIN_TOKEN_FILE)]
    pub admin_token_file: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

/// The operator commands of `lb` (flattened into the binary's subcommands).
#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Services: each frontend with its backends, their state in the data plane, table
    /// slots, priority, locality and share of new connections.
    Services {
        #[command(flatten)]
        common: Common,
    },
    /// Endpoints as `istioctl proxy-config endpoints` shows them: status, outlier check,
    /// cluster, priority, locality, connections, errors.
    Endpoints {
        /// Only this service (its name, VIP:PORT or VIP:PORT/PROTO).
        service: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Tracked connections: client → VIP → backend, state, idle time.
    Conntrack {
        /// Only connections of this service (name, VIP:PORT, VIP:PORT/PROTO or id).
        #[arg(long)]
        service: Option<String>,
        /// Only connections to this backend (IP:PORT, IP or id).
        #[arg(long)]
        backend: Option<String>,
        /// Also entries past their idle timeout (the data plane treats them as absent).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Counters per verdict and drop reason, traffic per service and per backend.
    Stats {
        #[command(flatten)]
        common: Common,
    },
    /// Every pinned map: type, sizes, fill and memory.
    Maps {
        #[command(flatten)]
        common: Common,
    },
    /// Eject an endpoint (outlier detection's ejection, by hand).
    Eject(ActionArgs),
    /// Return an ejected endpoint.
    Uneject(ActionArgs),
    /// Drain an endpoint: it keeps its connections and takes no new ones.
    Drain(ActionArgs),
    /// End draining an endpoint.
    Undrain(ActionArgs),
}

/// Runs `command` and returns the process's exit code; errors are reported on stderr.
pub fn run(command: Command) -> i32 {
    let result = match command {
        Command::Services { common } => services::services(&common),
        Command::Endpoints { service, common } => services::endpoints(&common, service.as_deref()),
        Command::Conntrack {
            service,
            backend,
            all,
            common,
        } => conntrack::conntrack(&common, service.as_deref(), backend.as_deref(), all),
        Command::Stats { common } => stats::stats(&common),
        Command::Maps { common } => maps::maps(&common),
        Command::Eject(a) => actions::action(&a, "eject"),
        Command::Uneject(a) => actions::action(&a, "uneject"),
        Command::Drain(a) => actions::action(&a, "drain"),
        Command::Undrain(a) => actions::action(&a, "undrain"),
    };
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let code = e.downcast_ref::<Failure>().map_or(EXIT_ERROR, |f| f.code);
            let _ = writeln!(std::io::stderr(), "lb: {e:#}");
            code
        }
    }
}

/// Writes `text` to stdout; a closed pipe (`lb ... | head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes `value` as pretty JSON and a newline.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print(&text)
}

/// Tells the user on stderr.
fn warn(message: &str) {
    let _ = writeln!(std::io::stderr(), "lb: {message}");
}
