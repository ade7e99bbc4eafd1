//! The real `lb agent` binary run by a section in a namespace of its own, with what the
//! sections read of it: its CPU time and memory, its log, its pinned maps.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb_tests::{agent_process::TempDir, Netns};

use crate::control_plane::{status_of, Status};

/// The agent's admin endpoint, on its namespace's loopback.
pub const ADMIN: &str = "127.0.0.1:15000";

/// `lb agent` in a node namespace; stopped (SIGTERM, then SIGKILL) and its pins removed
/// with `lb agent --cleanup` when dropped.
pub struct AgentGuard {
    lb: PathBuf,
    child: Child,
    pub pin_dir: PathBuf,
    token_file: PathBuf,
    log: PathBuf,
    _state: TempDir,
}

impl AgentGuard {
    /// Starts `lb agent --config CONFIG --interface IFACE:tc --admin ADMIN` and `extra`
    /// in `node`, its pins under a unique folder, its log (`RUST_LOG=log_filter`) in
    /// `state`, which it keeps until dropped.
    pub fn start(
        node: &Netns,
        state: TempDir,
        config: &Path,
        iface: &str,
        extra: &[OsString],
        log_filter: &str,
    ) -> Result<Self> {
        let lb = lb_tests::agent_process::lb_binary()
            .context("this section runs the agent (or skip the section)")?;
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(lb_tests::unique_name("lbbench"));
        let token_file = state.0.join("admin.token");
        let log = state.0.join("agent.log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.name()))
            .arg("--")
            .arg(&lb)
            .arg("agent")
            .args(extra)
            .arg("--config")
            .arg(config)
            .args(["--interface", &format!("{iface}:tc"), "--admin", ADMIN])
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--admin-token-file")
            .arg(&token_file)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} agent", lb.display()))?;
        Ok(Self {
            lb,
            child,
            pin_dir,
            token_file,
            log,
            _state: state,
        })
    }

    /// nsenter execs lb: this is lb's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn check_running(&mut self) -> Result<()> {
        if let Some(exit) = self.child.try_wait()? {
            bail!("the agent exited ({exit}); its log:\n{}", self.log_tail(40));
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Its memory figures (`/proc/PID/status`, kB).
    pub fn status(&self) -> Result<Status> {
        status_of(&format!("/proc/{}/status", self.pid()))
    }

    /// The CPU time it has used (user + system).
    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    /// Waits until `GET /ready` answers 200, and returns how long that took; called from
    /// a thread in the agent's namespace.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let admin: std::net::SocketAddr = ADMIN.parse()?;
        let started = Instant::now();
        loop {
            if lb_tests::http_get(admin, "/ready", Duration::from_millis(500)).is_ok() {
                return Ok(started.elapsed());
            }
            self.check_running()?;
            if started.elapsed() > timeout {
                bail!(
                    "the agent is not ready after {timeout:?}; its log:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let cleaned = Command::new(&self.lb)
            .args(["agent", "--cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--admin-token-file")
            .arg(&self.token_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !cleaned {
            let _ = lb::dataplane::pin::cleanup(&self.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The CPU time process `pid` has used (user + system, `/proc/PID/stat`).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = text
        .rsplit_once(')')
        .with_context(|| format!("bad {path}"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no field {i} in {path}"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let t = ticks(14)? + ticks(15)?;
    Ok(Duration::from_nanos(t * 1_000_000_000 / hz))
}

/// The CPU time process `pid` and every process descending from it have used: a server's
/// master and its workers.
pub fn tree_cpu_time(pid: u32) -> Result<Duration> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Some(p) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and this read.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state is field 3, the parent's pid 4.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parents.push((p, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut at = 0;
    while at < tree.len() {
        let parent = tree[at];
        tree.extend(
            parents
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        at += 1;
    }
    let mut total = cpu_time(pid)?;
    for &p in &tree[1..] {
        // A worker that exited in between counts no more (its time went to its parent's
        // children's time, not read here).
        total += cpu_time(p).unwrap_or_default();
    }
    Ok(total)
}
