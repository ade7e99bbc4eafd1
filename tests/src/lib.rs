//! Test harness for `lb`: hosts as network namespaces joined by veth pairs, servers that
//! answer with their name, and clients with timeouts, all inside one test process.
//!
//! Traffic only ever flows between namespaces a test created (or on loopback). Everything
//! is removed on drop, also when a test panics, and every namespace and interface name holds
//! the pid and a counter, so parallel tests and leftovers of a crashed run never collide.
//!
//! ```no_run
//! use lb_tests::{http_get, require_root, veth, HttpNameServer, Netns, DEFAULT_TIMEOUT};
//! # fn main() -> anyhow::Result<()> {
//! if !require_root() {
//!     return Ok(());
//! }
//! let client = Netns::new("cli")?;
//! let backend = Netns::new("be")?;
//! veth::link(&client, "eth", "10.200.1.1/24", &backend, "eth", "10.200.1.2/24")?;
//! let server = HttpNameServer::start(&backend, "10.200.1.2:8080".parse()?, "be1")?;
//! let body = client.run(|| http_get(server.addr(), "/", DEFAULT_TIMEOUT))?;
//! assert_eq!(body, "be1");
//! # Ok(())
//! # }
//! ```

pub mod agent_process;
pub mod apiserver;
pub mod clients;
pub mod cmd;
pub mod dns_server;
pub mod fixture_services;
pub mod names;
pub mod netns;
pub mod packets;
pub mod seed;
pub mod servers;
pub mod test_run;
pub mod tls_server;
pub mod topology;
pub mod veth;

#[cfg(test)]
mod selftest;

use std::{io::Write as _, time::Duration};

pub use clients::{http_get, http_get_from, http_post, names_from, udp_request, KeepAliveClient};
pub use cmd::run_command;
pub use names::unique_name;
pub use netns::{add_address, add_dummy, add_route, Netns};
pub use servers::{body_pattern, HttpNameServer, UdpNameServer};

/// A timeout for one network operation: generous for a loaded 2-core CI machine, short
/// enough that a broken data plane fails a test quickly instead of hanging it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether the test can create namespaces (needs root). When not, prints
/// `skipped: needs root` with the test's name, so a developer sees why nothing ran:
///
/// ```no_run
/// if !lb_tests::require_root() {
///     return;
/// }
/// ```
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    report_skip("needs root (network namespaces)");
    false
}

/// Prints `TEST: skipped: WHY` for the running test, which then returns without
/// checking anything, so a developer sees why nothing ran.
pub fn report_skip(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    // Written to the stderr handle, not with `eprintln!`: the test harness captures the
    // macros' output of passing tests, and this line must be seen.
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
}
