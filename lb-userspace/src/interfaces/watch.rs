//! Following interfaces as they come and go: the kernel's link events (`RTNLGRP_LINK`:
//! `RTM_NEWLINK`, `RTM_DELLINK`) through rtnetlink, no polling.
//!
//! - An interface the `--interface` specs select appears (created, moved into this
//!   network namespace, or renamed to a matching name): attached. An attach that fails
//!   (the device vanished or moved on meanwhile, as a veth end does when a CNI moves it
//!   into a pod) is logged and tried again at the interface's next event. What it made
//!   before the device left (TC's first link, pinned) is removed by the attach itself:
//!   the device is never recorded, so its `RTM_DELLINK` would find nothing to forget.
//! - An attached interface goes (deleted, or moved to another network namespace): its
//!   links are detached and their pins removed. The kernel detaches the links of a
//!   deleted device itself; one moved away would keep them.
//! - An attached interface is renamed (a `RTM_NEWLINK` with another name for its ifindex):
//!   when the new name is selected in the same mode its links stay and their pins take
//!   the new name; otherwise it is forgotten as if it went, then attached as selected.
//!
//! After subscribing, and whenever events were lost (the socket's buffer overran), the
//! interfaces are listed (`RTM_GETLINK` dump) and the data plane brought in line with
//! the list, so nothing that happened before or meanwhile is missed.

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use futures_util::{StreamExt as _, TryStreamExt as _};
use log::{error, info, warn};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        link::{LinkAttribute, LinkMessage},
        RouteNetlinkMessage,
    },
    MulticastGroup,
};

use super::{log_attached, mode_name, InterfaceSpec, Selector};
use crate::{
    agent::{lock, Agent},
    dataplane::{AttachMode, AttachedInterface, Dataplane},
};

/// Follows the link events of the agent's network namespace for as long as the agent
/// runs, attaching to and forgetting the interfaces `specs` select as they come and go.
/// The interfaces present at start were attached by `Agent::start_pinned`.
pub async fn watch(agent: Arc<Mutex<Agent>>, specs: Vec<InterfaceSpec>) {
    let selector = match Selector::new(&specs) {
        Ok(s) => s,
        Err(e) => return error!("not following interfaces: {e:#}"),
    };
    loop {
        if let Err(e) = follow(&agent, &selector).await {
            warn!("following link events: {e:#}; subscribing again in 1 s");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// One subscription: lists the interfaces, then handles events until the socket closes.
async fn follow(agent: &Mutex<Agent>, selector: &Selector) -> Result<()> {
    let (connection, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .context("subscribing to link events (RTNLGRP_LINK)")?;
    let connection = AbortOnDrop(tokio::spawn(connection));
    let list = |handle: rtnetlink::Handle| async move {
        let links: Vec<LinkMessage> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .context("listing the interfaces (RTM_GETLINK)")?;
        anyhow::Ok(links.iter().filter_map(index_and_name).collect::<Vec<_>>())
    };
    let present = list(handle.clone()).await?;
    reconcile(&mut lock(agent).dataplane, selector, &present);
    while let Some((message, _)) = messages.next().await {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                if let Some((ifindex, name)) = index_and_name(&link) {
                    appeared(&mut lock(agent).dataplane, selector, ifindex, &name);
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                gone(&mut lock(agent).dataplane, link.header.index);
            }
            NetlinkPayload::Overrun(_) => {
                warn!("link events were lost (netlink buffer overrun): listing interfaces");
                let present = list(handle.clone()).await?;
                reconcile(&mut lock(agent).dataplane, selector, &present);
            }
            _ => {}
        }
    }
    drop(connection);
    anyhow::bail!("the netlink socket closed")
}

/// Ends a netlink connection's task when its subscription ends.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn index_and_name(link: &LinkMessage) -> Option<(u32, String)> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some((link.header.index, name.clone())),
        _ => None,
    })
}

/// What the event handling needs of the data plane (a fake in the unit tests).
pub(super) trait Links {
    fn attached(&self) -> Vec<(String, AttachedInterface)>;
    fn attach(&mut self, iface: &str, ifindex: u32, mode: AttachMode) -> Result<()>;
    fn forget(&mut self, iface: &str) -> Result<Vec<String>>;
    fn rename(&mut self, from: &str, to: &str) -> Result<()>;
}

impl Links for Dataplane {
    fn attached(&self) -> Vec<(String, AttachedInterface)> {
        self.attached_interfaces()
            .iter()
            .map(|(n, a)| (n.clone(), *a))
            .collect()
    }
    fn attach(&mut self, iface: &str, ifindex: u32, mode: AttachMode) -> Result<()> {
        self.attach_interface(iface, ifindex, mode)
    }
    fn forget(&mut self, iface: &str) -> Result<Vec<String>> {
        self.forget_interface(iface)
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        self.rename_interface(from, to)
    }
}

/// Brings the attached interfaces in line with the full list `present` (ifindex, name):
/// forgets those gone, handles every present one as if it had just appeared.
pub(super) fn reconcile(links: &mut impl Links, selector: &Selector, present: &[(u32, String)]) {
    for (name, a) in links.attached() {
        if !present.iter().any(|(i, _)| *i == a.ifindex) {
            forget(links, &name, "is gone");
        }
    }
    for (ifindex, name) in present {
        appeared(links, selector, *ifindex, name);
    }
}

/// `RTM_NEWLINK` (or a listed interface): `ifindex` is named `name` now.
pub(super) fn appeared(links: &mut impl Links, selector: &Selector, ifindex: u32, name: &str) {
    let wanted = selector.mode_for(name);
    let attached = links.attached();
    let same_device = attached.iter().find(|(_, a)| a.ifindex == ifindex);
    match same_device {
        Some((known, a)) if known == name && Some(a.mode) == wanted => return,
        Some((known, a)) if known != name && Some(a.mode) == wanted => {
            // Renamed, still selected alike: the links are the device's; the pins follow.
            match links.rename(known, name) {
                Ok(()) => info!("{known} was renamed {name}: its links stay, pinned as {name}"),
                Err(e) => {
                    warn!("{known} was renamed {name}: {e:#}; attaching anew");
                    forget(links, known, "was renamed");
                    attach(links, selector, ifindex, name, a.mode);
                }
            }
            return;
        }
        Some((known, _)) => {
            // Renamed to a name no spec selects, or selected in another mode.
            let why = if known == name {
                "is selected in another mode".to_string()
            } else {
                format!("was renamed {name}")
            };
            forget(links, known, &why);
        }
        None => {}
    }
    // A record of this name for another ifindex is an earlier device's, gone unnoticed.
    if let Some((_, a)) = attached
        .iter()
        .find(|(n, a)| n == name && a.ifindex != ifindex)
    {
        let why = format!("(ifindex {}) was replaced by ifindex {ifindex}", a.ifindex);
        forget(links, name, &why);
    }
    if let Some(mode) = wanted {
        attach(links, selector, ifindex, name, mode);
    }
}

/// `RTM_DELLINK`: the device `ifindex` was deleted or moved to another network namespace.
pub(super) fn gone(links: &mut impl Links, ifindex: u32) {
    let attached = links.attached();
    if let Some((name, _)) = attached.iter().find(|(_, a)| a.ifindex == ifindex) {
        forget(links, name, "is gone");
    }
}

fn attach(links: &mut impl Links, selector: &Selector, ifindex: u32, name: &str, mode: AttachMode) {
    match links.attach(name, ifindex, mode) {
        Ok(()) => log_attached(selector, name, ifindex, mode),
        // Vanished or moved on meanwhile, most likely: its next event tries again.
        Err(e) => warn!(
            "{name} (ifindex {ifindex}) not attached ({}), tried again at its next event: {e:#}",
            mode_name(mode)
        ),
    }
}

fn forget(links: &mut impl Links, name: &str, why: &str) {
    match links.forget(name) {
        Ok(pins) if pins.is_empty() => info!("{name} {why}: detached"),
        Ok(pins) => info!("{name} {why}: detached, removed {}", pins.join(" ")),
        Err(e) => warn!("{name} {why}: removing its links: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The data plane's interface records; `vanished` interfaces fail to attach.
    #[derive(Default)]
    struct Fake {
        attached: BTreeMap<String, AttachedInterface>,
        vanished: Vec<String>,
        log: Vec<String>,
    }

    impl Links for Fake {
        fn attached(&self) -> Vec<(String, AttachedInterface)> {
            self.attached.iter().map(|(n, a)| (n.clone(), *a)).collect()
        }
        fn attach(&mut self, iface: &str, ifindex: u32, mode: AttachMode) -> Result<()> {
            if self.vanished.iter().any(|v| v == iface) {
                anyhow::bail!("no such device");
            }
            assert!(
                !self.attached.values().any(|a| a.ifindex == ifindex),
                "ifindex {ifindex} attached twice"
            );
            self.attached
                .insert(iface.into(), AttachedInterface { ifindex, mode });
            self.log
                .push(format!("attach {iface} {ifindex} {}", mode_name(mode)));
            Ok(())
        }
        fn forget(&mut self, iface: &str) -> Result<Vec<String>> {
            self.attached.remove(iface);
            self.log.push(format!("forget {iface}"));
            Ok(Vec::new())
        }
        fn rename(&mut self, from: &str, to: &str) -> Result<()> {
            let a = self.attached.remove(from).unwrap();
            self.attached.insert(to.into(), a);
            self.log.push(format!("rename {from} {to}"));
            Ok(())
        }
    }

    fn selector(specs: &[&str]) -> Selector {
        let specs: Vec<InterfaceSpec> = specs.iter().map(|s| s.parse().unwrap()).collect();
        Selector::new(&specs).unwrap()
    }

    fn take(f: &mut Fake) -> Vec<String> {
        std::mem::take(&mut f.log)
    }

    #[test]
    fn new_matching_interfaces_are_attached_once() {
        let s = selector(&["veth*", "eth0:xdp"]);
        let mut f = Fake::default();
        appeared(&mut f, &s, 7, "veth7");
        appeared(&mut f, &s, 8, "lxc8");
        appeared(&mut f, &s, 2, "eth0");
        // Repeated NEWLINKs (up, carrier, addresses) change nothing.
        appeared(&mut f, &s, 7, "veth7");
        appeared(&mut f, &s, 2, "eth0");
        assert_eq!(take(&mut f), ["attach veth7 7 tc", "attach eth0 2 xdp"]);
    }

    #[test]
    fn a_failed_attach_is_tried_again_at_the_next_event() {
        let s = selector(&["veth*"]);
        let mut f = Fake {
            vanished: vec!["veth7".into()],
            ..Fake::default()
        };
        appeared(&mut f, &s, 7, "veth7");
        assert!(take(&mut f).is_empty());
        f.vanished.clear();
        appeared(&mut f, &s, 7, "veth7");
        assert_eq!(take(&mut f), ["attach veth7 7 tc"]);
    }

    #[test]
    fn gone_interfaces_are_forgotten_by_ifindex() {
        let s = selector(&["veth*"]);
        let mut f = Fake::default();
        appeared(&mut f, &s, 7, "veth7");
        gone(&mut f, 9);
        gone(&mut f, 7);
        gone(&mut f, 7);
        assert_eq!(take(&mut f), ["attach veth7 7 tc", "forget veth7"]);
    }

    #[test]
    fn renames_keep_links_while_selected_alike() {
        let s = selector(&["veth*", "tmp*:xdp"]);
        let mut f = Fake::default();
        appeared(&mut f, &s, 7, "veth7");
        // Still selected, same mode: the pins follow.
        appeared(&mut f, &s, 7, "vethpod");
        // No longer selected: forgotten.
        appeared(&mut f, &s, 7, "eth1");
        // Selected again, in another mode: attached in that mode.
        appeared(&mut f, &s, 7, "tmp7");
        appeared(&mut f, &s, 7, "veth7");
        assert_eq!(
            take(&mut f),
            [
                "attach veth7 7 tc",
                "rename veth7 vethpod",
                "forget vethpod",
                "attach tmp7 7 xdp",
                "forget tmp7",
                "attach veth7 7 tc"
            ]
        );
    }

    #[test]
    fn a_name_taken_by_a_new_device_is_attached_anew() {
        let s = selector(&["veth*"]);
        let mut f = Fake::default();
        appeared(&mut f, &s, 7, "veth0");
        // The DELLINK of ifindex 7 was lost.
        appeared(&mut f, &s, 9, "veth0");
        assert_eq!(
            take(&mut f),
            ["attach veth0 7 tc", "forget veth0", "attach veth0 9 tc"]
        );
    }

    #[test]
    fn reconcile_forgets_the_missing_and_attaches_the_new() {
        let s = selector(&["veth*", "lbvip"]);
        let mut f = Fake::default();
        reconcile(
            &mut f,
            &s,
            &[(1, "lo".into()), (3, "lbvip".into()), (7, "veth7".into())],
        );
        assert_eq!(take(&mut f), ["attach lbvip 3 tc", "attach veth7 7 tc"]);
        reconcile(&mut f, &s, &[(3, "lbvip".into()), (8, "veth8".into())]);
        assert_eq!(take(&mut f), ["forget veth7", "attach veth8 8 tc"]);
        reconcile(&mut f, &s, &[(3, "lbvip".into()), (8, "veth8".into())]);
        assert!(take(&mut f).is_empty());
    }
}
