//! Where XDP may redirect a rewritten packet: the `lb_xdp_tx` device map, which holds the
//! node's interfaces that can take XDP frames.
//!
//! An XDP_REDIRECT to a device that cannot take XDP frames is not refused by the
//! program's helper: the frame is dropped later, by the device (a veth drops it with
//! `-ENXIO` unless its peer has an XDP program or GRO on). So the program redirects only
//! to interfaces in the map, and everything else goes through the stack, counted
//! `event_stack_xdp_target`. The kernel says which devices take XDP frames: the `netdev`
//! generic-netlink family's `xdp-features` of a device include `ndo-xmit` exactly then
//! (for a veth, the kernel updates it as its peer gains or loses XDP or GRO). The agent
//! lists the devices when the data plane loads and again at every change the kernel
//! announces (the family's `mgmt` multicast group: devices added, removed, changed).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context as _, Result};
use aya::maps::{DevMapHash, MapData};
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkMessage, NetlinkPayload, Nla, NlasIterator,
    Parseable, ParseableParametrized, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::{
    ctrl::{
        nlas::{GenlCtrlAttrs, McastGrpAttrs},
        GenlCtrl, GenlCtrlCmd,
    },
    GenlFamily, GenlHeader, GenlMessage,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use super::Dataplane;

/// `include/uapi/linux/netdev.h`.
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// The device's driver transmits frames other devices redirect to it (`ndo_xdp_xmit`).
const NETDEV_XDP_ACT_NDO_XMIT: u64 = 1 << 2;
/// The family's multicast group announcing device changes.
const MGMT_GROUP: &str = "mgmt";

/// A message of the `netdev` family: its command and attributes, kept raw.
#[derive(Clone, Debug)]
struct NetdevMessage {
    cmd: u8,
    attributes: Vec<DefaultNla>,
}

impl GenlFamily for NetdevMessage {
    fn family_name() -> &'static str {
        "netdev"
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevMessage {
    fn buffer_len(&self) -> usize {
        self.attributes.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attributes.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attributes = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DefaultNla::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cmd: header.cmd,
            attributes,
        })
    }
}

/// The generic-netlink socket of the `netdev` family, its id resolved.
struct Netdev {
    socket: Socket,
    family: u16,
    mgmt_group: Option<u32>,
}

impl Netdev {
    fn open() -> Result<Self> {
        let mut socket =
            Socket::new(NETLINK_GENERIC).context("opening a generic-netlink socket")?;
        socket
            .bind_auto()
            .context("binding the generic-netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the generic-netlink socket")?;
        let mut resolve = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(
                NetdevMessage::family_name().into(),
            )],
        });
        resolve.finalize();
        let replies = exchange(&socket, resolve, NLM_F_REQUEST)
            .context("resolving the netdev generic-netlink family (kernel 6.3 or later)")?;
        let attrs: Vec<GenlCtrlAttrs> = replies.into_iter().flat_map(|m| m.payload.nlas).collect();
        let family = attrs
            .iter()
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .context("the kernel named no id for the netdev family")?;
        let mgmt_group = attrs.iter().find_map(|a| match a {
            GenlCtrlAttrs::McastGroups(groups) => groups.iter().find_map(|g| {
                g.iter()
                    .any(|a| matches!(a, McastGrpAttrs::Name(n) if n == MGMT_GROUP))
                    .then(|| {
                        g.iter().find_map(|a| match a {
                            McastGrpAttrs::Id(id) => Some(*id),
                            _ => None,
                        })
                    })
                    .flatten()
            }),
            _ => None,
        });
        Ok(Self {
            socket,
            family,
            mgmt_group,
        })
    }

    /// Every device of this network namespace: ifindex → its XDP features.
    fn xdp_features(&self) -> Result<BTreeMap<u32, u64>> {
        let mut request = GenlMessage::from_payload(NetdevMessage {
            cmd: NETDEV_CMD_DEV_GET,
            attributes: Vec::new(),
        });
        request.set_resolved_family_id(self.family);
        request.finalize();
        let replies = exchange(&self.socket, request, NLM_F_REQUEST | NLM_F_DUMP)
            .context("listing the devices' XDP features (netdev DEV_GET)")?;
        Ok(replies
            .iter()
            .filter_map(|m| device_features(&m.payload))
            .collect())
    }
}

/// (ifindex, XDP features) of a `netdev` device message.
fn device_features(message: &NetdevMessage) -> Option<(u32, u64)> {
    let value = |kind: u16| {
        message
            .attributes
            .iter()
            .find(|a| a.kind() == kind)
            .map(|a| {
                let mut value = vec![0; a.value_len()];
                a.emit_value(&mut value);
                value
            })
    };
    let ifindex = value(NETDEV_A_DEV_IFINDEX)?;
    let features = value(NETDEV_A_DEV_XDP_FEATURES)?;
    Some((
        u32::from_ne_bytes(ifindex.get(..4)?.try_into().ok()?),
        u64::from_ne_bytes(features.get(..8)?.try_into().ok()?),
    ))
}

/// Sends `request` and collects the replies (one, or every part of a dump).
fn exchange<F>(socket: &Socket, request: GenlMessage<F>, flags: u16) -> Result<Vec<GenlMessage<F>>>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    let mut message = NetlinkMessage::from(request);
    message.header.flags = flags;
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0).context("sending")?;
    let dump = flags & NLM_F_DUMP != 0;
    let mut replies = Vec::new();
    let mut received = Vec::with_capacity(64 * 1024);
    loop {
        received.clear();
        let len = socket.recv(&mut received, 0).context("receiving")?;
        let mut offset = 0;
        while offset < len {
            let reply = NetlinkMessage::<GenlMessage<F>>::deserialize(&received[offset..len])
                .context("parsing a reply")?;
            let length = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    bail!("the kernel answered {}", e.to_io())
                }
                NetlinkPayload::InnerMessage(m) => {
                    replies.push(m);
                    if !dump {
                        return Ok(replies);
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// An interface of this network namespace, and whether it can take XDP frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub ifindex: u32,
    /// Empty when the device went between the listing and the name's lookup.
    pub name: String,
    pub xdp_target: bool,
}

/// Every interface of this network namespace.
pub fn devices() -> Result<Vec<Device>> {
    Ok(Netdev::open()?
        .xdp_features()?
        .into_iter()
        .map(|(ifindex, features)| Device {
            ifindex,
            name: name_of(ifindex),
            xdp_target: features & NETDEV_XDP_ACT_NDO_XMIT != 0,
        })
        .collect())
}

/// The interfaces of this network namespace that can take XDP frames (ifindexes).
pub fn list() -> Result<BTreeSet<u32>> {
    Ok(Netdev::open()?
        .xdp_features()?
        .into_iter()
        .filter(|(_, features)| features & NETDEV_XDP_ACT_NDO_XMIT != 0)
        .map(|(ifindex, _)| ifindex)
        .collect())
}

/// The name of interface `ifindex` in this thread's network namespace ("" if none).
pub fn name_of(ifindex: u32) -> String {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes the call writes at most.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if found.is_null() {
        return String::new();
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Calls `changed` after every device change the kernel announces (devices added,
/// removed, or whose features changed), for as long as it returns `true`. Blocks: run it
/// on a thread of its own.
pub fn on_changes(changed: impl Fn() -> bool) -> Result<()> {
    let netdev = Netdev::open()?;
    let group = netdev
        .mgmt_group
        .context("the netdev family has no mgmt multicast group")?;
    let socket = netdev.socket;
    socket
        .add_membership(group)
        .context("subscribing to the netdev family's device changes")?;
    let mut received = Vec::with_capacity(64 * 1024);
    loop {
        received.clear();
        socket
            .recv(&mut received, 0)
            .context("receiving device changes")?;
        if !changed() {
            return Ok(());
        }
    }
}

impl Dataplane {
    /// Makes `lb_xdp_tx` hold exactly `targets` (ifindexes). Returns whether it changed.
    pub fn set_xdp_targets(&mut self, targets: &BTreeSet<u32>) -> Result<bool> {
        if *targets == self.xdp_target_set {
            return Ok(false);
        }
        let map: &mut DevMapHash<MapData> = &mut self.xdp_targets;
        for gone in self.xdp_target_set.difference(targets) {
            // The kernel removes a device's entry itself when the device goes.
            let _ = map.remove(*gone);
        }
        for new in targets.difference(&self.xdp_target_set) {
            map.insert(*new, *new, None, 0)
                .with_context(|| format!("adding ifindex {new} to the XDP redirect targets"))?;
        }
        self.xdp_target_set = targets.clone();
        Ok(true)
    }

    /// Lists the node's interfaces that can take XDP frames and makes them the targets.
    pub fn refresh_xdp_targets(&mut self) -> Result<bool> {
        let targets = list()?;
        self.set_xdp_targets(&targets)
    }

    /// The interfaces (ifindexes) XDP may redirect to.
    pub fn xdp_targets(&self) -> &BTreeSet<u32> {
        &self.xdp_target_set
    }
}
