//! Which interfaces the data plane is attached to, by name and ifindex, so that an
//! interface can be attached while the agent runs, forgotten when it goes and followed
//! when it is renamed (see `crate::interfaces`). The links themselves are pinned
//! (`pin::link_path`) or, without a pin directory, owned here.

use anyhow::{Context as _, Result};
use aya::programs::{tc::SchedClassifierLink, xdp::XdpLink};

use super::{pin, AttachMode, Dataplane};

/// An interface the data plane is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachedInterface {
    /// Its index when it was attached: a device of the same name with another index is
    /// another device.
    pub ifindex: u32,
    pub mode: AttachMode,
}

/// A link without a pin: detached when dropped.
pub(super) enum OwnedLink {
    Tc(#[expect(dead_code, reason = "held for its Drop, which detaches")] SchedClassifierLink),
    Xdp(#[expect(dead_code, reason = "held for its Drop, which detaches")] XdpLink),
}

/// The index of the interface named `iface` in this network namespace, 0 when none is.
fn ifindex_of(iface: &str) -> u32 {
    std::ffi::CString::new(iface)
        // SAFETY: a valid NUL-terminated string.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) })
        .unwrap_or(0)
}

/// The hooks a link pin may name.
const HOOKS: [&str; 3] = ["xdp", "tc_ingress", "tc_egress"];

impl Dataplane {
    /// Attaches to `iface` (index `ifindex`) in `mode`, as [`Dataplane::attach`], and
    /// records it, so it can be forgotten or renamed later. When the attach fails and the
    /// device is no longer `iface` at `ifindex` here (moved away, deleted or renamed
    /// meanwhile), the links made for it before it left are detached and unpinned.
    pub fn attach_interface(&mut self, iface: &str, ifindex: u32, mode: AttachMode) -> Result<()> {
        if let Err(e) = self.attach(iface, mode) {
            // TC makes two links, each pinned as it is made. When a CNI moves a veth end
            // into its pod between the two, the first stays attached (in the pod) and
            // pinned while the second fails. The device is not recorded, so its
            // RTM_DELLINK, handled next, finds nothing to forget: the pin would stay for
            // good. (A device recorded, i.e. attached before it left, is forgotten then.)
            if ifindex_of(iface) != ifindex {
                let undone = match self.forget_interface(iface) {
                    Ok(pins) if pins.is_empty() => String::new(),
                    Ok(pins) => format!("; removed {}", pins.join(" ")),
                    Err(e) => format!("; removing its links: {e:#}"),
                };
                return Err(e.context(format!(
                    "{iface} is no longer ifindex {ifindex} in this network namespace \
                     (moved away, deleted or renamed while being attached){undone}"
                )));
            }
            return Err(e);
        }
        self.attached
            .insert(iface.to_string(), AttachedInterface { ifindex, mode });
        Ok(())
    }

    /// The interfaces attached by [`Dataplane::attach_interface`] and not forgotten.
    pub fn attached_interfaces(&self) -> &std::collections::BTreeMap<String, AttachedInterface> {
        &self.attached
    }

    /// Forgets `iface` (gone, moved to another network namespace, or no longer selected):
    /// its links are detached (`BPF_LINK_DETACH`; the kernel already did when the device
    /// was deleted) and their pins removed. Returns the pins removed.
    pub fn forget_interface(&mut self, iface: &str) -> Result<Vec<String>> {
        self.attached.remove(iface);
        // Dropped: detached.
        self.owned_links.retain(|(name, _)| name != iface);
        let mut removed = Vec::new();
        if let Some(dir) = self.pin_dir.clone() {
            for hook in HOOKS {
                let path = pin::link_path(&dir, iface, hook);
                self.links.retain(|p| p != &path);
                if path.exists() {
                    pin::detach_link_pin(&path)?;
                    removed.push(path.display().to_string());
                }
            }
        }
        Ok(removed)
    }

    /// Follows a rename of an attached interface: its links (attached to the device, not
    /// the name) stay, and their pins take the new name.
    pub fn rename_interface(&mut self, from: &str, to: &str) -> Result<()> {
        if let Some(attached) = self.attached.remove(from) {
            self.attached.insert(to.to_string(), attached);
        }
        for (name, _) in &mut self.owned_links {
            if name == from {
                *name = to.to_string();
            }
        }
        if let Some(dir) = self.pin_dir.clone() {
            for hook in HOOKS {
                let old = pin::link_path(&dir, from, hook);
                if !old.exists() {
                    continue;
                }
                let new = pin::link_path(&dir, to, hook);
                // Over a stale pin of the new name, which is then released.
                std::fs::rename(&old, &new)
                    .with_context(|| format!("renaming {} to {}", old.display(), new.display()))?;
                self.links.retain(|p| p != &new);
                for p in &mut self.links {
                    if p == &old {
                        *p = new.clone();
                    }
                }
            }
        }
        Ok(())
    }
}
