//! Starting child processes.
//!
//! Everything that does work (apt-get, cargo, ...) goes through [`run`], so the log always
//! shows the exact command before it runs and, when it fails, an error naming that command
//! and its exit status. [`probe`] is only for silent yes/no checks ("is bpftool installed?")
//! whose failure is an answer, not an error.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Runs `cmd` with the terminal's stdin/stdout/stderr, printing it first as `+ cmd args`.
///
/// Fails if the program cannot be started or exits unsuccessfully; the error carries the full
/// command line (with any environment overrides) and the exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("command failed ({status}): {line}");
    }
    Ok(())
}

/// While it lives, SIGINT (Ctrl-C) does not end xtask: the terminal sends it to the
/// child as well, which decides what to do, and xtask keeps waiting for it. The handler
/// is a no-op rather than `SIG_IGN`, because an ignored signal stays ignored in children
/// (exec resets handlers, not `SIG_IGN`).
pub struct InterruptsGoToChild {
    previous: usize,
}

/// `SIGINT` and `signal(2)` (libc is linked anyway; no crate needed for one call).
const SIGINT: i32 = 2;
extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

extern "C" fn on_sigint(_: i32) {}

impl InterruptsGoToChild {
    pub fn install() -> Self {
        let handler = on_sigint as extern "C" fn(i32) as usize;
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        let previous = unsafe { signal(SIGINT, handler) };
        Self { previous }
    }
}

impl Drop for InterruptsGoToChild {
    fn drop(&mut self) {
        // SAFETY: restores the disposition `signal` returned.
        unsafe { signal(SIGINT, self.previous) };
    }
}

/// Totals of the `test result:` lines of a `cargo test` run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds one libtest summary line (`test result: ok. 5 passed; 0 failed; 1 ignored; ...`).
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Like [`run`] for `cargo test`: passes its output through and adds up the summary lines
/// of every test binary, so the caller can print one total for the whole run.
pub fn run_tests(cmd: &mut Command) -> (Result<()>, TestTotals) {
    use std::io::{BufRead, BufReader, Write};
    let line = display(cmd);
    println!("+ {line}");
    let mut totals = TestTotals::default();
    let mut child = match cmd.stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                Err(anyhow::anyhow!("could not start `{line}`: {e}")),
                totals,
            )
        }
    };
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout();
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            totals.add_line(&l);
            let _ = writeln!(stdout, "{l}");
        }
    }
    let result = match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(anyhow::anyhow!("command failed ({status}): {line}")),
        Err(e) => Err(anyhow::anyhow!("waiting for `{line}`: {e}")),
    };
    (result, totals)
}

/// Runs `program args` silently and returns its stdout if it started and exited 0.
///
/// `None` means "not available or not working", which is what the setup checks want to know.
pub fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace root: xtask lives one level below it. Children run there so that
/// `cargo xtask ...` works from any directory inside the repository.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.join(".."), Path::to_path_buf)
}

/// A `cargo` command in the workspace root, using the same cargo that runs xtask
/// (cargo sets `$CARGO`), so `cargo +nightly xtask ...` stays on nightly throughout.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()).args(args);
    cmd
}

/// Renders a command as a shell line that could be pasted to reproduce it.
fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        // `None` means the variable is removed for the child; `env -u` is how a shell says it.
        match value {
            Some(value) => parts.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            )),
            None => parts.push(format!("env -u {}", key.to_string_lossy())),
        }
    }
    parts.push(quote(&cmd.get_program().to_string_lossy()));
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

/// Single-quotes a word for a POSIX shell unless it is made only of harmless characters.
fn quote(word: &str) -> String {
    let harmless = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(harmless) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_totals_add_up_summary_lines() {
        let mut t = TestTotals::default();
        t.add_line("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add_line(
            "test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("test foo ... ok");
        assert_eq!(
            t,
            TestTotals {
                passed: 7,
                failed: 3,
                ignored: 1
            }
        );
    }

    #[test]
    fn display_shows_env_program_and_quoted_args() {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "a b", "it's"]);
        assert_eq!(
            display(&cmd),
            r"DEBIAN_FRONTEND=noninteractive apt-get install -y 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn quote_leaves_plain_words_alone() {
        assert_eq!(quote("--features"), "--features");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("$PATH"), "'$PATH'");
    }
}
