//! The token that mutating admin calls carry (`x-lb-token`).
//!
//! The agent makes a new one at each start (32 random bytes from the kernel, as 64 hex
//! digits) and writes it to a root-only file: whoever can read that file may change what
//! the agent does; a browser page or another user on the node cannot. The file is replaced
//! in one step (written beside it, then renamed), so a reader sees the old token or the
//! new one, never part of one, and it is removed when the agent stops.

use std::{
    fs::{self, DirBuilder, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 32;

/// A token written to its file; the file is removed on drop if it still holds this token
/// (a newer agent may have replaced it).
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    token: String,
}

impl TokenFile {
    /// Makes a new token and writes it to `path` (mode 0600; the parent directory is
    /// created with mode 0700 if missing).
    pub fn create(path: &Path) -> Result<Self> {
        let token = new_token()?;
        write_token(path, &token)
            .with_context(|| format!("writing the admin token to {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            token,
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let ours = fs::read_to_string(&self.path).is_ok_and(|t| t.trim() == self.token);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!("removing the admin token {}: {e}", self.path.display());
            }
        }
    }
}

/// 32 bytes from getrandom(2), as lowercase hex.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled part of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom(2) for the admin token");
        }
        filled += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_token(path: &Path, token: &str) -> Result<()> {
    let Some(name) = path.file_name() else {
        bail!("not a file path");
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {} and renaming it", tmp.display()))
}

/// Compares a presented token with the agent's in time independent of where they differ.
pub fn matches(presented: &[u8], token: &str) -> bool {
    let token = token.as_bytes();
    presented.len() == token.len()
        && presented
            .iter()
            .zip(token)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn token_file_is_private_replaced_and_removed() {
        let base = std::env::temp_dir().join(format!("lb-token-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let path = base.join("run/lb/admin.token");
        let first = TokenFile::create(&path).unwrap();
        assert_eq!(first.token().len(), 64);
        assert!(first.token().bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), first.token());

        // A second agent replaces it; the first one's drop leaves the newer token alone.
        let second = TokenFile::create(&path).unwrap();
        assert_ne!(first.token(), second.token());
        drop(first);
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), second.token());
        drop(second);
        assert!(!path.exists());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(matches(b"abc", "abc"));
        assert!(!matches(b"abd", "abc"));
        assert!(!matches(b"ab", "abc"));
        assert!(!matches(b"", "abc"));
    }
}
