//! The previous release's `lb`, built from the git history, for the upgrade test
//! (tests/tests/restart.rs): an agent of that release runs under load and this tree's
//! agent takes over from it, migrating what changed layout.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

/// The commit of the previous release: the last one whose pinned maps a node may hold
/// when it is upgraded to this tree. Move it forward with each release.
pub const COMMIT: &str = "c3c0d50bf3281efb325f8a8c431cc2baf8ed3e8e";

/// Where the binary ends up (the upgrade test looks here): `target/previous-release/lb`.
pub fn binary_path() -> PathBuf {
    cmd::workspace_root()
        .join("target")
        .join("previous-release")
        .join("lb")
}

/// Why the previous release cannot be built here (its commit is not in this clone and
/// cannot be fetched): the upgrade test is then skipped, and says so.
#[derive(Debug)]
pub struct Unavailable(pub String);

/// Builds `lb` at `COMMIT` unless the binary of that commit is there already. The sources
/// come from `git archive` (no worktree to clean up), the build has its own target
/// directory next to them.
pub fn ensure() -> Result<Result<PathBuf, Unavailable>> {
    let root = cmd::workspace_root();
    let dir = root.join("target").join("previous-release");
    let binary = binary_path();
    let stamp = dir.join("lb.commit");
    if binary.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == COMMIT) {
        println!("previous release {COMMIT}: {} is built", binary.display());
        return Ok(Ok(binary));
    }
    if let Err(e) = have_commit(&root) {
        return Ok(Err(Unavailable(format!("{e:#}"))));
    }
    let src = dir.join(&COMMIT[..12]);
    if src.exists() {
        std::fs::remove_dir_all(&src)
            .with_context(|| format!("removing the stale sources {}", src.display()))?;
    }
    std::fs::create_dir_all(&src)?;
    let archive = dir.join("src.tar");
    cmd::run(
        std::process::Command::new("git")
            .current_dir(&root)
            .args(["archive", "--format=tar", "-o"])
            .arg(&archive)
            .arg(COMMIT),
    )?;
    cmd::run(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&src),
    )?;
    let _ = std::fs::remove_file(&archive);
    let target = dir.join("target");
    let mut cargo = cmd::cargo([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bin",
        "lb",
    ]);
    cargo
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        // This tree's build settings must not leak into the old one's.
        .env_remove("RUSTFLAGS");
    cmd::run(&mut cargo)?;
    std::fs::copy(target.join("release").join("lb"), &binary)
        .with_context(|| format!("copying the previous release's lb to {}", binary.display()))?;
    std::fs::write(&stamp, COMMIT)?;
    Ok(Ok(binary))
}

/// Makes sure `COMMIT` is in the repository, fetching it when the clone is shallow.
fn have_commit(root: &Path) -> Result<()> {
    let present = |root: &Path| {
        std::process::Command::new("git")
            .current_dir(root)
            .args(["cat-file", "-e", &format!("{COMMIT}^{{commit}}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if present(root) {
        return Ok(());
    }
    println!("previous release {COMMIT} is not in this clone; fetching it from origin");
    let _ = std::process::Command::new("git")
        .current_dir(root)
        .args(["fetch", "--quiet", "origin", COMMIT])
        .status();
    if !present(root) {
        bail!(
            "the previous release (commit {COMMIT}) is not in this clone and could not be \
             fetched: the upgrade test needs it (clone with history, or `git fetch origin \
             {COMMIT}`)"
        );
    }
    Ok(())
}
