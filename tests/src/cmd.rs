//! One way to run a subprocess, so every failure names the command and shows its stderr.

use std::{io, process::Command};

use anyhow::{bail, Context as _, Result};

/// Runs `program args...` and returns its stdout.
///
/// A test that fails on setup should say exactly which command failed and why, so the error
/// carries the full command line, the exit status and stderr.
pub fn run_command(program: &str, args: &[&str]) -> Result<String> {
    let line = command_line(program, args);
    let output = match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("`{line}` failed: `{program}` is not installed or not on PATH")
        }
        Err(e) => return Err(e).with_context(|| format!("`{line}` could not be started")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "`{line}` failed ({}): {}{}",
            output.status,
            stderr.trim(),
            if stdout.trim().is_empty() {
                String::new()
            } else {
                format!(" (stdout: {})", stdout.trim())
            }
        );
    }
    Ok(stdout)
}

/// The command as a person would type it, for error messages.
fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_command_and_stderr() {
        let err = run_command("sh", &["-c", "echo oops >&2; exit 3"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c echo oops >&2; exit 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn missing_program_is_named() {
        let err = run_command("lb-tests-no-such-program", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("not installed"));
    }

    #[test]
    fn returns_stdout() {
        assert_eq!(run_command("echo", &["hi"]).unwrap(), "hi\n");
    }
}
