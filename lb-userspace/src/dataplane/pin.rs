//! Pinning the data plane's maps in the BPF filesystem, so `lb` commands can read them
//! while the agent runs, and after it stopped or crashed.
//!
//! The agent pins every map by its name (`lb_common::maps::PINNED`) in its pin directory
//! (`/sys/fs/bpf/lb` by default), mounting the BPF filesystem at `/sys/fs/bpf` first when
//! nothing is mounted there. Each pin replaces one of the same name left by an earlier
//! agent in one step (pinned under a temporary name, then renamed over it), so a reader
//! never finds a name missing. Pins outlive the agent: the maps stay in the kernel, with
//! their last contents, until a later agent replaces them or someone removes the files.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{maps::Array, Ebpf};
use lb_common::{maps as names, DataplaneConfig};
use log::{debug, info, warn};

/// `statfs(2)` magic of the BPF filesystem.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Prefix of the temporary name a map is pinned under before it is renamed over its pin.
pub const TMP_PREFIX: &str = "tmp_";

/// Where the BPF filesystem is mounted by convention.
pub const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Whether `path` (which must exist) is on a BPF filesystem.
pub fn on_bpffs(path: &Path) -> std::io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The nearest ancestor of `path` (itself included) that exists.
pub fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
}

/// Whether `/proc/mounts` shows a BPF filesystem mounted at `mount_point`.
fn bpffs_mounted_at(mount_point: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .or_else(|_| std::fs::read_to_string("/proc/mounts"))
        .map(|mounts| {
            mounts.lines().any(|line| {
                let mut fields = line.split_whitespace();
                let (_, at, fstype) = (fields.next(), fields.next(), fields.next());
                at.map(Path::new) == Some(mount_point) && fstype == Some("bpf")
            })
        })
        .unwrap_or(false)
}

/// Makes sure `dir` exists on a BPF filesystem: mounts one at `/sys/fs/bpf` when `dir` is
/// below it and nothing is mounted there, then creates `dir`.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    let root = Path::new(BPF_FS_ROOT);
    let ancestor = existing_ancestor(dir).unwrap_or(Path::new("/"));
    let on_bpf = on_bpffs(ancestor).unwrap_or(false);
    if !on_bpf {
        if dir.starts_with(root) && !bpffs_mounted_at(root) {
            mount_bpffs(root)?;
            info!("mounted a BPF filesystem at {BPF_FS_ROOT}");
        } else {
            bail!(
                "pin directory {} is not on a BPF filesystem (mount one: mount -t bpf bpf DIR)",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the pin directory {}", dir.display()))?;
    if !on_bpffs(dir).unwrap_or(false) {
        bail!(
            "pin directory {} is not on a BPF filesystem (mount one: mount -t bpf bpf DIR)",
            dir.display()
        );
    }
    Ok(())
}

fn mount_bpffs(at: &Path) -> Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "mounting a BPF filesystem at {} (needs root; or mount it yourself: \
                 mount -t bpf bpf {})",
                at.display(),
                at.display()
            )
        });
    }
    Ok(())
}

/// Pins `map` as `dir/name`, replacing a pin of that name in one step.
fn pin_replacing(map: &aya::maps::Map, dir: &Path, name: &str) -> Result<()> {
    let target = dir.join(name);
    // bpffs reserves names with dots (EPERM).
    let tmp: PathBuf = dir.join(format!("{TMP_PREFIX}{}_{name}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    map.pin(&tmp)
        .with_context(|| format!("pinning map {name} at {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, &target) {
        // Not expected on bpffs; fall back to remove and pin.
        let _ = std::fs::remove_file(&tmp);
        debug!("renaming a pin over {}: {e}", target.display());
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing the stale pin {}", target.display()))
            }
        }
        map.pin(&target)
            .with_context(|| format!("pinning map {name} at {}", target.display()))?;
    }
    Ok(())
}

/// Pins every map of the loaded object in `dir` (created, on a BPF filesystem), by name.
/// The read-only global's map is pinned as `lb_config_v1` once checked to hold exactly
/// the `DataplaneConfig` loaded (`timeouts`). Returns the names pinned.
pub fn pin_maps(ebpf: &Ebpf, dir: &Path, timeouts: &DataplaneConfig) -> Result<Vec<String>> {
    prepare_dir(dir)?;
    let mut pinned = Vec::new();
    for (name, map) in ebpf.maps() {
        let pin_name = if name.starts_with('.') {
            // Global data. Only `.rodata` holding exactly LB_CONFIG is useful to readers.
            let holds_config = name.starts_with(".rodata")
                && matches!(map, aya::maps::Map::Array(_))
                && Array::<&aya::maps::MapData, DataplaneConfig>::try_from(map)
                    .and_then(|a| a.get(&0, 0))
                    .is_ok_and(|c| c == *timeouts);
            if !holds_config {
                debug!("not pinning global data map {name}");
                continue;
            }
            names::CONFIG_PIN
        } else {
            name
        };
        pin_replacing(map, dir, pin_name)?;
        pinned.push(pin_name.to_string());
    }
    for expected in names::PINNED {
        if !pinned.iter().any(|p| p == expected) {
            warn!("map {expected} was not pinned: the eBPF object has no such map");
        }
    }
    Ok(pinned)
}
