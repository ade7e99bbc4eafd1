//! The real `lb agent` binary, run inside a test bed's node namespace.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb::dataplane::AttachMode;

use crate::{topology::TestBed, Netns};

/// `target/<profile>/lb`, next to the running test or tool (`cargo xtask build` and
/// `cargo xtask test` build it).
pub fn lb_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // Test binaries live in target/<profile>/deps, tools in target/<profile>.
    for dir in exe.ancestors().skip(1).take(2) {
        let lb = dir.join("lb");
        if lb.is_file() {
            return Ok(lb);
        }
    }
    bail!(
        "the lb binary was not found next to {}: build it with `cargo xtask build`",
        exe.display()
    )
}

/// A running `lb agent`; stopped with SIGTERM (then killed) when dropped, and what it
/// left (programs attached through pinned links, pinned maps) removed with
/// `lb agent --cleanup`'s code.
pub struct AgentProcess {
    child: Child,
    /// The whole command line (`nsenter ... lb agent ...`), to start it again.
    command: Vec<std::ffi::OsString>,
    /// Where this agent pins its maps (unique per agent, so tests run side by side).
    pub pin_dir: PathBuf,
    /// Where this agent writes its admin token.
    pub admin_token_file: PathBuf,
    /// Set once the process was waited for (it must not be signalled again).
    stopped: bool,
    /// Earlier agents stopped by [`AgentProcess::upgrade`], perhaps still finishing.
    previous: Vec<Child>,
    _state: TempDir,
}

impl AgentProcess {
    /// Starts `lb agent --config CONFIG` in the test bed's node, attached to its interfaces.
    pub fn start(bed: &TestBed, config: &Path) -> Result<Self> {
        Self::start_with(bed, config, &[])
    }

    /// Like `start`, with more arguments for `lb agent` (e.g. `--admin`).
    ///
    /// The agent enters only the node's network namespace (`nsenter --net`), not a mount
    /// namespace of its own as `ip netns exec` makes (with a fresh /sys): its BPF
    /// filesystem and pins are then the machine's, where `lb` commands and this harness
    /// see them, and they outlive the agent as on a real node.
    pub fn start_with(bed: &TestBed, config: &Path, extra: &[&str]) -> Result<Self> {
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(crate::unique_name("lbpin"));
        Self::start_with_pin_dir(bed, config, extra, pin_dir)
    }

    /// Like `start_with`, pinning under `pin_dir` (which may hold what the agent is to
    /// adopt); it is cleaned up when the agent is dropped.
    pub fn start_with_pin_dir(
        bed: &TestBed,
        config: &Path,
        extra: &[&str],
        pin_dir: PathBuf,
    ) -> Result<Self> {
        Self::start_binary(&lb_binary()?, bed, config, extra, pin_dir)
    }

    /// Like `start_with_pin_dir`, running the `lb` binary at `lb` (e.g. an earlier
    /// release's, to test an upgrade).
    pub fn start_binary(
        lb: &Path,
        bed: &TestBed,
        config: &Path,
        extra: &[&str],
        pin_dir: PathBuf,
    ) -> Result<Self> {
        let state = TempDir::new("lbstate")?;
        let admin_token_file = state.0.join("admin.token");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", bed.node.name()))
            .arg("--")
            .arg(lb)
            .args(["agent", "--config"])
            .arg(config)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--admin-token-file")
            .arg(&admin_token_file)
            .args(["--watch-interval", "1", "--stats-interval", "5"])
            .args(extra);
        for i in &bed.interfaces {
            let mode = match i.mode {
                AttachMode::Xdp => "xdp",
                AttachMode::Tc => "tc",
            };
            cmd.arg("--interface").arg(format!("{}:{mode}", i.name));
        }
        let command: Vec<std::ffi::OsString> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(Into::into)
            .collect();
        let child = spawn(&command)?;
        Ok(Self {
            child,
            command,
            pin_dir,
            admin_token_file,
            stopped: false,
            previous: Vec::new(),
            _state: state,
        })
    }

    /// The agent's pid (nsenter execs lb: the child is the agent itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `lb ARGS --admin ADMIN --pin-dir PIN_DIR` against this agent, run in `ns` as an
    /// operator would on the node: its standard output (a failing command panics).
    pub fn lb(&self, ns: &crate::Netns, admin: &str, args: &[&str]) -> String {
        let output = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name()))
            .arg("--")
            .arg(lb_binary().unwrap())
            .args(args)
            .args(["--admin", admin, "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .unwrap_or_else(|e| panic!("running lb {args:?}: {e}"));
        assert!(output.status.success(), "lb {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Kills the agent with SIGKILL, as a crash or an OOM kill would, and waits for it.
    /// Its pins stay (the data plane keeps forwarding): see [`AgentProcess::restart`].
    pub fn kill(&mut self) {
        if !self.stopped && self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.stopped = true;
    }

    /// Starts the agent again with the same command line: same configuration, interfaces,
    /// pin directory and admin token file, so it adopts what the previous one left. The
    /// previous process must be gone ([`AgentProcess::kill`] or [`AgentProcess::stop`]).
    pub fn restart(&mut self) -> Result<()> {
        self.restart_as(None)
    }

    /// Like `restart`, without `--interface IFACE:...` for `iface`: the agent no longer
    /// attaches there.
    pub fn restart_without_interface(&mut self, iface: &str) -> Result<()> {
        let prefix = format!("{iface}:");
        let at = self
            .command
            .windows(2)
            .position(|w| w[0] == "--interface" && w[1].to_string_lossy().starts_with(&prefix))
            .with_context(|| format!("the agent is not started with --interface {iface}:..."))?;
        self.command.drain(at..at + 2);
        self.restart()
    }

    /// Like `restart`, running the `lb` binary at `lb` when given: an upgrade (or a
    /// downgrade) with the same configuration, interfaces and pin directory.
    pub fn restart_as(&mut self, lb: Option<&Path>) -> Result<()> {
        if let Some(lb) = lb {
            // nsenter --net=... -- LB agent ...
            let at = self
                .command
                .iter()
                .position(|a| a == "--")
                .context("the agent's command line has no `--`")?;
            self.command[at + 1] = lb.into();
        }
        if !self.stopped {
            bail!("the agent is still running: kill or stop it first");
        }
        self.child = spawn(&self.command)?;
        self.stopped = false;
        Ok(())
    }

    /// An upgrade as an operator makes it: SIGTERM to the agent, and at once the next one
    /// started (same command line); the stopping one may still finish its connections
    /// ([`AgentProcess::wait_previous`]).
    pub fn upgrade(&mut self) -> Result<()> {
        if self.stopped || !self.running() {
            bail!("the agent is not running");
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let next = spawn(&self.command)?;
        self.previous.push(std::mem::replace(&mut self.child, next));
        Ok(())
    }

    /// Waits up to `timeout` for the agents stopped by [`AgentProcess::upgrade`] to exit;
    /// whether they all did.
    pub fn wait_previous(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.previous
                .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
            if self.previous.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the agent as an operator does (SIGTERM) and waits for it; kills it when it
    /// has not exited after 3 s. Returns whether it exited by itself.
    pub fn stop(&mut self) -> bool {
        if self.stopped {
            return true;
        }
        self.stopped = true;
        if !self.running() {
            return true;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut exited = false;
        while !exited && Instant::now() < deadline {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if !exited {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        exited
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        for mut previous in self.previous.drain(..) {
            let _ = previous.kill();
            let _ = previous.wait();
        }
        // The agent leaves its programs attached and its pins for a restart; a test's are
        // removed with it (links detached first, as `lb agent --cleanup` does).
        let _ = lb::dataplane::pin::cleanup(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn spawn(command: &[std::ffi::OsString]) -> Result<Child> {
    Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {command:?}"))
}

/// A temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique_name(prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` with `text` in one step (write, then rename), as an operator's tooling
/// should, so the agent never reads a half-written file.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Retries `f` in `ns` until it succeeds or `timeout` passes.
pub fn wait_until<T>(
    ns: &Netns,
    timeout: Duration,
    f: impl Fn() -> Result<T> + Send + Sync,
) -> Result<T>
where
    T: Send,
{
    let deadline = Instant::now() + timeout;
    loop {
        match ns.run(&f) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The `lb` binary of the previous release, built by `cargo xtask test` from the git
/// history (`target/previous-release/lb`; `LB_PREVIOUS_RELEASE` names another), for
/// upgrade tests. `None` when `LB_PREVIOUS_RELEASE` is set but empty: `cargo xtask test`
/// could not build it (a clone without that commit), and said why.
pub fn previous_release_binary() -> Result<Option<PathBuf>> {
    if let Some(path) = std::env::var_os("LB_PREVIOUS_RELEASE") {
        return Ok((!path.is_empty()).then(|| PathBuf::from(path)));
    }
    let exe = std::env::current_exe()?;
    // Test binaries live in target/<profile>/deps.
    for dir in exe.ancestors().skip(1).take(3) {
        let lb = dir.join("previous-release").join("lb");
        if lb.is_file() {
            return Ok(Some(lb));
        }
    }
    bail!(
        "the previous release's lb binary was not found (target/previous-release/lb): \
         `cargo xtask test` builds it from the git history"
    )
}
