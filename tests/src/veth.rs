//! Veth pairs: the cable between two test hosts.

use anyhow::{Context as _, Result};

use crate::{
    names::unique_name,
    netns::{add_address, Netns},
};

/// Joins `a` and `b` with a veth pair, gives each end its address and sets both up.
///
/// The ends get unique names (`<prefix>-<pid>-<n>`) and are created directly inside the two
/// namespaces, so nothing ever appears in the host's namespace; the pair disappears when
/// either namespace is deleted. Returns `(a_ifname, b_ifname)`.
///
/// An address is a CIDR (`10.200.1.1/24`, `fd00::1/64`); several may be given separated by
/// commas for dual stack, and an empty string leaves that end without an address.
pub fn link(
    a: &Netns,
    a_if_prefix: &str,
    a_addr_cidr: &str,
    b: &Netns,
    b_if_prefix: &str,
    b_addr_cidr: &str,
) -> Result<(String, String)> {
    let a_if = unique_name(a_if_prefix);
    let b_if = unique_name(b_if_prefix);
    a.ip(&[
        "link",
        "add",
        &a_if,
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        b.name(),
    ])?;
    for (ns, ifname, cidrs) in [(a, &a_if, a_addr_cidr), (b, &b_if, b_addr_cidr)] {
        for cidr in cidrs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            add_address(ns, ifname, cidr)?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok((a_if, b_if))
}

/// Turns off transmit checksum offload on `ifname` in `ns` (`ethtool -K IF tx off`).
///
/// With offload on, veth hands the peer packets whose TCP/UDP checksum is only partial
/// (`CHECKSUM_PARTIAL`), and the receiving kernel then never verifies it: a checksum the load
/// balancer rewrote wrongly would go unnoticed. With it off, the sender computes full checksums
/// and the receiver verifies every one, so a bad rewrite shows up as lost packets. Apply it
/// to the sending end of each path the load balancer rewrites.
pub fn disable_tx_checksum_offload(ns: &Netns, ifname: &str) -> Result<()> {
    ns.exec(&["ethtool", "-K", ifname, "tx", "off"])
        .with_context(|| {
            format!("disabling tx checksum offload on {ifname} (is ethtool installed?)")
        })?;
    Ok(())
}

/// Turns receive offload (GRO) on or off on `ifname` in `ns` (`ethtool -K IF gro on|off`).
///
/// A veth with GRO on receives through NAPI, which is also what lets its peer take frames
/// that XDP redirects to the peer (`ndo_xdp_xmit`): without GRO or an XDP program on this
/// end, the kernel drops frames redirected to the other end.
pub fn set_gro(ns: &Netns, ifname: &str, on: bool) -> Result<()> {
    let state = if on { "on" } else { "off" };
    ns.exec(&["ethtool", "-K", ifname, "gro", state])
        .with_context(|| format!("turning GRO {state} on {ifname} (is ethtool installed?)"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::require_root;

    #[test]
    fn pair_lives_in_both_namespaces_and_dies_with_one() {
        if !require_root() {
            return;
        }
        let a = Netns::new("va").unwrap();
        let b = Netns::new("vb").unwrap();
        let (a_if, b_if) = link(&a, "eth", "10.200.1.1/24", &b, "eth", "10.200.1.2/24").unwrap();
        assert!(a.ifindex(&a_if).is_ok());
        assert!(b.ifindex(&b_if).is_ok());
        let addrs = b.ip(&["-o", "addr", "show", "dev", &b_if]).unwrap();
        assert!(addrs.contains("10.200.1.2/24"), "{addrs}");
        drop(a);
        // The kernel tears the pair down with the namespace, asynchronously but quickly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while b.ifindex(&b_if).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{b_if} outlived its peer's namespace"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn checksum_offload_can_be_disabled() {
        if !require_root() {
            return;
        }
        let a = Netns::new("ca").unwrap();
        let b = Netns::new("cb").unwrap();
        let (a_if, _) = link(&a, "eth", "", &b, "eth", "").unwrap();
        disable_tx_checksum_offload(&a, &a_if).unwrap();
        let features = a.exec(&["ethtool", "-k", &a_if]).unwrap();
        assert!(
            features.lines().any(|l| l.trim() == "tx-checksumming: off"),
            "{features}"
        );
    }
}
