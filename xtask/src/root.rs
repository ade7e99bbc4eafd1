//! Root checks. Loading eBPF programs and creating network namespaces need root, so the
//! subcommands that do either fail up front with instructions instead of deep inside a test.

use anyhow::{bail, Result};

use crate::cmd;

/// Whether the effective user is root.
///
/// std has no `geteuid`; rather than adding libc for one call, read it from
/// /proc/self/status (`Uid: real effective saved fs`), falling back to `id -u`.
pub fn is_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(uids) = status.lines().find_map(|l| l.strip_prefix("Uid:")) {
            return uids.split_whitespace().nth(1) == Some("0");
        }
    }
    cmd::probe("id", &["-u"]).is_some_and(|uid| uid.trim() == "0")
}

/// Fails with a clear message unless running as root.
pub fn require_root(subcommand: &str) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    bail!(
        "`cargo xtask {subcommand}` must run as root: it loads eBPF programs and creates \
         network namespaces.\n\
         Re-run it with sudo. To keep your Rust toolchain and bpf-linker on PATH, use:\n    \
         sudo -E env PATH=$PATH cargo xtask {subcommand}"
    )
}
