//! Pinning the data plane in the BPF filesystem, so it outlives the agent: `lb` commands
//! read the maps while the agent runs and after it stopped or crashed, the programs keep
//! forwarding while no agent runs, and the next agent adopts what it finds.
//!
//! The agent pins every map by its name (`lb_common::maps::PINNED`) in its pin directory
//! (`/sys/fs/bpf/lb` by default), mounting the BPF filesystem at `/sys/fs/bpf` first when
//! nothing is mounted there, and every bpf link that attaches a program to an interface
//! (`link_IFACE_xdp`, `link_IFACE_tc_ingress`, `link_IFACE_tc_egress`). A later agent
//! reuses a pinned map whose type, key and value sizes, entries and flags are exactly its
//! own ([`check_pinned`]); a map that differs is replaced by a new one pinned over it in
//! one step (pinned under a temporary name, then renamed), so a reader never finds a name
//! missing. [`cleanup`] removes it all.

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
    // Root only: the pins themselves get mode 0600 from the kernel.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("making the pin directory {} root-only", dir.display()))?;
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

/// What a map of this agent's layout and sizes looks like in the kernel: a pinned map is
/// adopted only when it matches exactly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: aya::maps::MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// What the pin directory holds under a map's name.
#[derive(Debug)]
pub enum PinnedMap {
    /// Nothing: the map is created and pinned.
    Absent,
    /// A map of the same type, layout and size: adopted, with its contents.
    Compatible,
    /// Something else (the reason): a new map is created and pinned over it.
    Incompatible(String),
}

/// Compares the map pinned as `dir/spec.name` with `spec`.
pub fn check_pinned(dir: &Path, spec: &MapSpec) -> PinnedMap {
    let path = dir.join(spec.name);
    if !path.exists() {
        return PinnedMap::Absent;
    }
    let info = match aya::maps::MapInfo::from_pin(&path) {
        Ok(info) => info,
        Err(e) => return PinnedMap::Incompatible(format!("not a readable map ({e})")),
    };
    let found = (
        info.map_type().ok(),
        info.key_size(),
        info.value_size(),
        info.max_entries(),
        info.map_flags(),
    );
    let wanted = (
        Some(spec.map_type),
        spec.key_size,
        spec.value_size,
        spec.max_entries,
        spec.flags,
    );
    if found == wanted {
        PinnedMap::Compatible
    } else {
        PinnedMap::Incompatible(format!(
            "pinned (type, key size, value size, entries, flags) {found:?}, this agent needs {wanted:?}"
        ))
    }
}

/// Renames an earlier release's selection array (`lb_sel_v1`, the fixed layout) to
/// today's name when today's is not pinned: its elements are today's, and its service
/// entries say where each table is, so it is adopted with the other id maps (or replaced
/// with them). An agent of that release then finds no `lb_sel_v1` and never writes by the
/// fixed layout into windows placed elsewhere.
pub fn rename_fixed_layout_selection(dir: &Path) -> Result<()> {
    let old = dir.join(names::SELECTION_V1);
    let new = dir.join(names::SELECTION);
    if old.exists() && !new.exists() {
        std::fs::rename(&old, &new)
            .with_context(|| format!("renaming {} to {}", old.display(), new.display()))?;
        info!(
            "{} (the fixed layout's selection array) is now pinned as {}",
            names::SELECTION_V1,
            names::SELECTION
        );
    }
    Ok(())
}

/// The entries of the selection array pinned in `dir` when it has this agent's type,
/// element size and flags and more than `wanted` entries: it can be adopted at its size.
pub fn larger_selection(dir: &Path, wanted: u32) -> Option<u32> {
    let info = aya::maps::MapInfo::from_pin(dir.join(names::SELECTION)).ok()?;
    let layout_fits = info.map_type().ok() == Some(aya::maps::MapType::Array)
        && info.key_size() == 4
        && info.value_size() == 8
        && info.map_flags() == 1 << 10;
    (layout_fits && info.max_entries() > wanted).then(|| info.max_entries())
}

/// Pins `map` as `dir/name`, replacing whatever is pinned there in one step.
pub fn pin_map_replacing(map: &aya::maps::Map, dir: &Path, name: &str) -> Result<()> {
    pin_replacing(map, dir, name)
}

/// Pins the read-only global holding exactly `timeouts` as `lb_config_v1` (replacing an
/// earlier agent's: the timeouts may have changed), and warns about maps of `PINNED` the
/// object does not have.
pub fn pin_config(ebpf: &Ebpf, dir: &Path, timeouts: &DataplaneConfig) -> Result<()> {
    for (name, map) in ebpf.maps() {
        let holds_config = name.starts_with(".rodata")
            && matches!(map, aya::maps::Map::Array(_))
            && Array::<&aya::maps::MapData, DataplaneConfig>::try_from(map)
                .and_then(|a| a.get(&0, 0))
                .is_ok_and(|c| c == *timeouts);
        if holds_config {
            return pin_replacing(map, dir, names::CONFIG_PIN);
        }
    }
    warn!("the configuration global was not pinned: no .rodata map holds it");
    Ok(())
}

/// Prefix of the pins of the agent's bpf links.
pub const LINK_PREFIX: &str = "link_";

/// Where the link of `hook` (`xdp`, `tc_ingress`, `tc_egress`) on `iface` is pinned. bpffs
/// refuses names with dots, which interface names may have: they become `:`, which
/// interface names never have.
pub fn link_path(dir: &Path, iface: &str, hook: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{}_{hook}", iface.replace('.', ":")))
}

/// The interface and hook a link pin's file name stands for.
pub fn parse_link_name(file: &str) -> Option<(String, &str)> {
    let rest = file.strip_prefix(LINK_PREFIX)?;
    ["_tc_ingress", "_tc_egress", "_xdp"]
        .into_iter()
        .find_map(|suffix| {
            rest.strip_suffix(suffix)
                .map(|iface| (iface.replace(':', "."), &suffix[1..]))
        })
}

/// `bpf(2)` with a zeroed attribute block whose first bytes are `attr`.
fn bpf_syscall(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<libc::c_long> {
    let mut block = [0u64; 16];
    // SAFETY: `block` has 128 bytes, more than any `attr` passed here.
    unsafe {
        std::ptr::copy_nonoverlapping(attr.as_ptr(), block.as_mut_ptr().cast::<u8>(), attr.len())
    };
    // SAFETY: a valid command and a valid, fully initialised attribute block of that size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            block.as_ptr(),
            std::mem::size_of_val(&block),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
fn open_pin(path: &Path) -> Result<std::os::fd::OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u8; 16];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf_syscall(BPF_OBJ_GET, &attr)
        .with_context(|| format!("opening the pinned link {}", path.display()))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// The interface index an XDP or tcx link pinned at `path` is attached to: 0 once its
/// device is gone (the kernel detached it); `None` when unknown (another link type, or
/// unreadable).
pub fn link_ifindex(path: &Path) -> Option<u32> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let fd = open_pin(path).ok()?;
    // `struct bpf_link_info`: type, id, prog_id, then a union whose `xdp` and `tcx`
    // members both start with the ifindex (offset 16).
    let mut info = [0u64; 16];
    let mut attr = [0u8; 16];
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
    attr[..4].copy_from_slice(&raw.to_ne_bytes());
    attr[4..8].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &attr).ok()?;
    let word = |i: usize| {
        let b = info[i].to_ne_bytes();
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    };
    let (link_type, ifindex) = (word(0), word(2));
    matches!(link_type, BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX).then_some(ifindex)
}

/// Whether the link pinned at `path` may be switched to a new program for `iface`: not
/// when it is attached to another device (the name's earlier device, renamed) or to none
/// (its device was deleted). A new link is then attached and pinned over it.
pub fn link_follows(path: &Path, iface: &str) -> bool {
    let Some(pinned) = link_ifindex(path) else {
        return true;
    };
    let current = CString::new(iface)
        // SAFETY: a valid NUL-terminated string.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) })
        .unwrap_or(0);
    if pinned == current {
        return true;
    }
    info!(
        "{} is attached to {}, not to {iface} (ifindex {current}): replaced by a new link",
        path.display(),
        match pinned {
            0 => "no device any more".to_string(),
            i => format!("ifindex {i}"),
        }
    );
    false
}

/// Detaches the link pinned at `path` from its hook (`BPF_LINK_DETACH`, whoever else holds
/// it) and removes the pin.
pub fn detach_link_pin(path: &Path) -> Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let fd = open_pin(path)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
    if let Err(e) = bpf_syscall(BPF_LINK_DETACH, &raw.to_ne_bytes()) {
        // Already detached (its device is gone): removing the pin is all that is left.
        debug!("detaching {}: {e}", path.display());
    }
    drop(fd);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Link pins detached and removed (interface, hook).
    pub links: Vec<(String, String)>,
    /// Map pins removed.
    pub maps: Vec<String>,
    /// Files left in the pin directory (not lb's).
    pub left: Vec<String>,
}

/// Removes everything an agent leaves in `dir`: detaches and unpins every link (so its
/// program leaves the interface), removes every map pin (the maps are freed once no
/// program uses them), then the directory when it is empty.
pub fn cleanup(dir: &Path) -> Result<Cleanup> {
    let mut done = Cleanup::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut files: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    files.sort();
    // Links first: the programs leave the interfaces before their maps go.
    for file in &files {
        if let Some((iface, hook)) = parse_link_name(file) {
            detach_link_pin(&dir.join(file))?;
            done.links.push((iface, hook.to_string()));
        }
    }
    for file in &files {
        if parse_link_name(file).is_some() {
            continue;
        }
        let ours = names::PINNED.contains(&file.as_str())
            || file == names::CONNECTIONS_V1
            || file == names::SELECTION_V1
            || file.starts_with(TMP_PREFIX);
        if ours {
            std::fs::remove_file(dir.join(file))
                .with_context(|| format!("removing {}", dir.join(file).display()))?;
            done.maps.push(file.clone());
        } else {
            done.left.push(file.clone());
        }
    }
    if done.left.is_empty() {
        std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(done)
}
