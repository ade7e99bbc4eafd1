//! Which interfaces the agent attaches to: `--interface` names and glob patterns.
//!
//! A name (`eth0`, `lbvip`) must exist when the agent starts, as the node's own
//! interfaces do. A pattern (`'veth*'`, `'lxc*'`, `'cali?*'`: `*`, `?` and `[...]`, as the
//! `glob` crate matches them) selects every interface whose name it matches, now and
//! later: pods' host-side veths appear and go while the agent runs, and [`watch`] follows
//! them through the kernel's link events. Matching nothing is fine.
//!
//! One interface is attached once, in one mode: a name given with `--interface` wins over
//! the patterns, and among patterns the first given wins. Patterns never select `lo`.

mod watch;

pub use watch::watch;
pub(crate) use watch::AbortOnDrop;

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use log::{error, info, warn};

use crate::dataplane::{AttachMode, Dataplane};

/// The kernel's limit on an interface name (`IFNAMSIZ` less the NUL).
const MAX_NAME: usize = 15;

/// An interface, or a glob pattern of interfaces, to attach to and how (`--interface`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// An interface name, or a pattern when it has `*`, `?` or `[`.
    pub name: String,
    pub mode: AttachMode,
}

impl InterfaceSpec {
    /// Whether `name` is a glob pattern rather than an interface name.
    pub fn is_pattern(&self) -> bool {
        self.name.contains(['*', '?', '['])
    }
}

impl std::fmt::Display for InterfaceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, mode_name(self.mode))
    }
}

/// `tc` or `xdp`, as `--interface` spells them.
pub fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Tc => "tc",
        AttachMode::Xdp => "xdp",
    }
}

impl std::str::FromStr for InterfaceSpec {
    type Err = anyhow::Error;
    /// `IFACE` or `PATTERN` (TC), with `:tc` or `:xdp` to choose. Interface names never
    /// hold `:`, so the first one starts the mode.
    fn from_str(s: &str) -> Result<Self> {
        let (name, mode) = match s.split_once(':') {
            Some((n, m)) => (n, m.parse()?),
            None => (s, AttachMode::Tc),
        };
        let spec = Self {
            name: name.to_string(),
            mode,
        };
        if spec.is_pattern() {
            if let Err(e) = glob::Pattern::new(name) {
                bail!("interface pattern {name:?}: {e}");
            }
        } else {
            // As the kernel's `dev_valid_name`.
            if name.is_empty() || name.len() > MAX_NAME {
                bail!("interface name {name:?} must be 1-{MAX_NAME} characters");
            }
            if name == "." || name == ".." || name.contains(['/', ' ', '\t', '\n']) {
                bail!("{name:?} is not a valid interface name");
            }
        }
        Ok(spec)
    }
}

/// `--interface` specs, checked: tells which mode an interface is attached in, if any.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    names: BTreeMap<String, AttachMode>,
    patterns: Vec<(glob::Pattern, AttachMode)>,
}

impl Selector {
    /// Refuses a name or pattern given twice with different modes; the same one given
    /// twice alike counts once.
    pub fn new(specs: &[InterfaceSpec]) -> Result<Self> {
        let mut selector = Self::default();
        for spec in specs {
            let earlier = if spec.is_pattern() {
                selector
                    .patterns
                    .iter()
                    .find(|(p, _)| p.as_str() == spec.name)
                    .map(|(_, m)| *m)
            } else {
                selector.names.get(&spec.name).copied()
            };
            match earlier {
                Some(mode) if mode == spec.mode => continue,
                Some(mode) => bail!(
                    "--interface {} is given twice, as {} and as {}",
                    spec.name,
                    mode_name(mode),
                    mode_name(spec.mode)
                ),
                None => {}
            }
            if spec.is_pattern() {
                let pattern = glob::Pattern::new(&spec.name)?;
                selector.patterns.push((pattern, spec.mode));
            } else {
                selector.names.insert(spec.name.clone(), spec.mode);
            }
        }
        Ok(selector)
    }

    /// The mode `iface` is attached in: its own `--interface` name's, else the first
    /// pattern's that matches it (never `lo`'s); `None` when nothing selects it.
    pub fn mode_for(&self, iface: &str) -> Option<AttachMode> {
        if let Some(mode) = self.names.get(iface) {
            return Some(*mode);
        }
        if iface == "lo" {
            return None;
        }
        self.patterns
            .iter()
            .find(|(p, _)| p.matches(iface))
            .map(|(_, m)| *m)
    }

    /// Patterns other than the one that wins for `iface` that match it in another mode
    /// (which `mode_for` does not use: worth a warning).
    fn overruled(&self, iface: &str) -> Vec<&str> {
        let Some(mode) = self.mode_for(iface) else {
            return Vec::new();
        };
        self.patterns
            .iter()
            .filter(|(p, m)| *m != mode && p.matches(iface))
            .map(|(p, _)| p.as_str())
            .collect()
    }

    /// The interface names given (not patterns): they must exist at start.
    pub fn names(&self) -> impl Iterator<Item = (&str, AttachMode)> {
        self.names.iter().map(|(n, m)| (n.as_str(), *m))
    }

    /// Whether any pattern was given.
    pub fn has_patterns(&self) -> bool {
        !self.patterns.is_empty()
    }
}

/// The interfaces of the calling thread's network namespace: (ifindex, name).
pub fn present() -> Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns an array ending with a zeroed entry, or null on error;
    // it is read before being freed with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut out = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*entry).if_name);
            out.push(((*entry).if_index, name.to_string_lossy().into_owned()));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// At start: attaches `dataplane` to every present interface `specs` select. A name that
/// does not exist, or cannot be attached to, is an error; an interface a pattern selects
/// that cannot be attached to is logged (it may have vanished meanwhile; [`watch`] tries
/// again at its next event).
pub fn attach_present(dataplane: &mut Dataplane, specs: &[InterfaceSpec]) -> Result<()> {
    let selector = Selector::new(specs)?;
    let present = present()?;
    for (name, _) in selector.names() {
        if !present.iter().any(|(_, n)| n == name) {
            bail!(
                "interface {name} does not exist in this network namespace (an --interface \
                 name must exist at start; a pattern, e.g. '{name}*', may match nothing)"
            );
        }
    }
    for (ifindex, name) in &present {
        let Some(mode) = selector.mode_for(name) else {
            continue;
        };
        let named = selector.names.contains_key(name.as_str());
        match dataplane.attach_interface(name, *ifindex, mode) {
            Ok(()) => log_attached(&selector, name, *ifindex, mode),
            Err(e) if named => return Err(e),
            Err(e) => error!("{name} (ifindex {ifindex}) not attached: {e:#}"),
        }
    }
    Ok(())
}

/// Whether IPv4 forwarding is on for packets arriving on `name`
/// (`net.ipv4.conf.NAME.forwarding`); `None` when it cannot be read.
pub fn ipv4_forwarding(name: &str) -> Option<bool> {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
    Some(std::fs::read_to_string(path).ok()?.trim() != "0")
}

fn log_attached(selector: &Selector, name: &str, ifindex: u32, mode: AttachMode) {
    info!(
        "attached to {name} (ifindex {ifindex}, {})",
        mode_name(mode)
    );
    if ipv4_forwarding(name) == Some(false) {
        warn!(
            "IPv4 forwarding is off on {name} (net.ipv4.conf.{name}.forwarding = 0): balanced \
             packets that arrive on it cannot be forwarded to backends or clients on other \
             interfaces (each is counted event_stack_not_forwarded and left to the stack, \
             which drops it); set net.ipv4.ip_forward=1 as on any router"
        );
    }
    if mode == AttachMode::Xdp {
        log_xdp_redirect_targets(name);
    }
    let overruled = selector.overruled(name);
    if !overruled.is_empty() {
        warn!(
            "{name} also matches {} in another mode; the first --interface that selects \
             it is used",
            overruled.join(", ")
        );
    }
}

/// At an XDP attach: which interfaces XDP can redirect rewritten packets to, and which it
/// cannot (the stack forwards to those), with what makes a veth a target.
fn log_xdp_redirect_targets(name: &str) {
    let devices = match crate::dataplane::xdp_targets::devices() {
        Ok(d) => d,
        Err(e) => {
            return warn!(
                "XDP on {name}: the interfaces that can take XDP frames cannot be listed \
                 ({e:#}); rewritten packets go through the stack"
            )
        }
    };
    let (can, cannot): (Vec<_>, Vec<_>) = devices
        .iter()
        .filter(|d| d.name != "lo")
        .partition(|d| d.xdp_target);
    let names = |list: &[&crate::dataplane::xdp_targets::Device]| {
        let mut s: Vec<_> = list.iter().take(8).map(|d| d.name.as_str()).collect();
        if list.len() > 8 {
            s.push("...");
        }
        s.join(", ")
    };
    info!(
        "XDP on {name}: rewritten packets are redirected to {} interface(s) that can take \
         XDP frames ({})",
        can.len(),
        names(&can)
    );
    if !cannot.is_empty() {
        warn!(
            "XDP on {name}: packets balanced to {} other interface(s) ({}) go through the \
             node's stack (counted event_stack_xdp_target): their drivers cannot take XDP \
             frames; a veth can when its peer has GRO on (`ethtool -K PEER gro on` in the \
             peer's network namespace) or an XDP program",
            cannot.len(),
            names(&cannot)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> InterfaceSpec {
        s.parse().unwrap()
    }

    fn selector(specs: &[&str]) -> Selector {
        Selector::new(&specs.iter().map(|s| spec(s)).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn names_and_patterns_parse() {
        assert_eq!(
            spec("eth0"),
            InterfaceSpec {
                name: "eth0".into(),
                mode: AttachMode::Tc
            }
        );
        assert_eq!(spec("eth0:xdp").mode, AttachMode::Xdp);
        assert!(!spec("eth0").is_pattern());
        for p in ["veth*", "lxc*:tc", "cali?*", "eth[0-3]", "vlan[!0]*:xdp"] {
            assert!(spec(p).is_pattern(), "{p}");
        }
        assert_eq!(spec("lxc*:xdp").to_string(), "lxc*:xdp");
        // A pattern may be longer than a name: it only has to match names.
        assert!("[abcdefghijklmnop]*".parse::<InterfaceSpec>().is_ok());
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            "",
            ":tc",
            "sixteen-chars-xx",
            "eth0:bpf",
            "eth 0",
            "a/b",
            "eth[0",
            "veth***",
        ] {
            assert!(
                bad.parse::<InterfaceSpec>().is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn patterns_match_as_globs() {
        let s = selector(&["veth*", "cali?*", "eth[0-1]:xdp"]);
        assert_eq!(s.mode_for("veth1a2b"), Some(AttachMode::Tc));
        assert_eq!(s.mode_for("veth"), Some(AttachMode::Tc));
        assert_eq!(s.mode_for("calic0ffee"), Some(AttachMode::Tc));
        assert_eq!(s.mode_for("cali"), None, "? needs one character");
        assert_eq!(s.mode_for("eth1"), Some(AttachMode::Xdp));
        assert_eq!(s.mode_for("eth2"), None);
        assert_eq!(s.mode_for("lxc123"), None);
        assert_eq!(s.mode_for("myveth0"), None, "patterns match whole names");
    }

    #[test]
    fn a_name_wins_over_patterns_and_the_first_pattern_over_later_ones() {
        let s = selector(&["v*:xdp", "veth0:tc", "ve*:tc"]);
        assert_eq!(s.mode_for("veth0"), Some(AttachMode::Tc));
        assert_eq!(s.mode_for("veth1"), Some(AttachMode::Xdp));
        assert_eq!(s.overruled("veth1"), vec!["ve*"]);
        assert_eq!(s.overruled("veth0"), vec!["v*"]);
        assert_eq!(
            s.names().collect::<Vec<_>>(),
            vec![("veth0", AttachMode::Tc)]
        );
        assert!(s.has_patterns());
    }

    #[test]
    fn patterns_never_select_lo_but_a_name_may() {
        assert_eq!(selector(&["*"]).mode_for("lo"), None);
        assert_eq!(selector(&["l?"]).mode_for("lo"), None);
        assert_eq!(selector(&["*", "lo"]).mode_for("lo"), Some(AttachMode::Tc));
    }

    #[test]
    fn the_same_spec_twice_counts_once_and_conflicting_modes_are_refused() {
        let s = selector(&["eth0", "eth0:tc", "veth*", "veth*"]);
        assert_eq!(s.names().count(), 1);
        assert_eq!(s.patterns.len(), 1);
        for conflict in [["eth0:tc", "eth0:xdp"], ["veth*", "veth*:xdp"]] {
            let specs: Vec<InterfaceSpec> = conflict.iter().map(|s| spec(s)).collect();
            let err = Selector::new(&specs).unwrap_err().to_string();
            assert!(err.contains("given twice"), "{err}");
        }
    }

    #[test]
    fn present_lists_loopback() {
        let all = present().unwrap();
        assert!(all.iter().any(|(i, n)| *i > 0 && n == "lo"), "{all:?}");
    }
}
