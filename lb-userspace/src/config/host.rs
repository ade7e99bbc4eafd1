//! Checks of a configuration against this node and the data plane loaded on it, made when
//! the agent applies a configuration (at start and on every reload): a configuration that
//! fails one is refused and the one in force stays.
//!
//! - No VIP is an address of this node: the data plane would take the node's own traffic
//!   to that address (SSH, the kubelet, ...) and send it to backends.
//! - Every service's backends fit its selection table (`dataplane.table_slots`). The
//!   number of services and of backends (`dataplane.max_services`, `max_backends`) is
//!   checked by the programmer before anything is written.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{bail, Result};
use lb_common::maps::FALLBACK_LEN;

use super::Config;
use crate::dataplane::DataplaneOptions;

/// Checks `config` against this node's addresses (`local_addresses`) and the loaded data
/// plane's sizes.
pub fn check(config: &Config, loaded: &DataplaneOptions) -> Result<()> {
    check_against(config, loaded, &local_addresses()?)
}

/// [`check`] with the node's addresses given: address → interface.
pub fn check_against(
    config: &Config,
    loaded: &DataplaneOptions,
    local: &BTreeMap<Ipv4Addr, String>,
) -> Result<()> {
    let mut errors = Vec::new();
    let window = loaded.table_slots.saturating_sub(FALLBACK_LEN) as usize;
    for s in &config.services {
        if let Some(ifname) = local.get(&s.frontend.vip) {
            errors.push(format!(
                "service {} ({}): vip (ServiceEntry spec.addresses): {} is an address of this \
                 node (interface {ifname}): lb would send the node's own traffic to that \
                 address to backends; use an address no interface of the node holds",
                s.name, s.frontend, s.frontend.vip
            ));
        }
        if s.policy.tls.is_some() {
            // Certificate files are read now: a bad one refuses this configuration, and
            // the one in force stays.
            if let Err(e) = crate::tls_origination::TlsFrontend::new(s) {
                errors.push(format!("service {} ({}): {e:#}", s.name, s.frontend));
            }
            // Its VIP becomes a local address, which takes every port of it.
            if let Some(other) = config
                .services
                .iter()
                .find(|o| o.frontend.vip == s.frontend.vip && o.policy.tls.is_none())
            {
                errors.push(format!(
                    "service {} ({}): originates TLS, so its VIP {} is made a local address of \
                     the node, which would take service {} ({}) off the kernel path: give \
                     them different VIPs",
                    s.name, s.frontend, s.frontend.vip, other.name, other.frontend
                ));
            }
        }
        if s.endpoints.len() > window {
            errors.push(format!(
                "service {} ({}): backends (ServiceEntry spec.endpoints): {} backends do not \
                 fit dataplane.table_slots = {} (a table gets {window} slots after its \
                 failover list, one at least per backend)",
                s.name,
                s.frontend,
                s.endpoints.len(),
                loaded.table_slots
            ));
        }
    }
    match errors.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one}"),
        all => bail!(
            "{} errors in the configuration:\n  {}",
            all.len(),
            all.join("\n  ")
        ),
    }
}

/// The IPv4 addresses of this network namespace's interfaces (`getifaddrs(3)`), with the
/// interface holding each.
pub fn local_addresses() -> Result<BTreeMap<Ipv4Addr, String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out pointer; the list is freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error())
            .map_err(|e| anyhow::anyhow!("listing the node's addresses (getifaddrs): {e}"));
    }
    let mut out = BTreeMap::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: checked non-null; the family says which sockaddr it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                // SAFETY: ifa_name is a NUL-terminated string of the list.
                let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                    .to_string_lossy()
                    .into_owned();
                out.entry(addr).or_insert(name);
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn config(vip: &str, backends: usize) -> Config {
        let list: String = (0..backends)
            .map(|i| {
                format!(
                    "      - {{ address: 10.200.{}.{}, port: 8080 }}\n",
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect();
        parse(&format!(
            "services:\n  - name: web\n    vip: {vip}\n    port: 80\n    backends:\n{list}"
        ))
        .unwrap()
    }

    #[test]
    fn a_vip_that_is_a_node_address_is_refused_naming_the_field() {
        let local: BTreeMap<Ipv4Addr, String> =
            [(Ipv4Addr::new(192, 168, 1, 5), "eth0".to_string())].into();
        let opts = DataplaneOptions::default();
        check_against(&config("10.96.0.10", 3), &opts, &local).unwrap();
        let err = check_against(&config("192.168.1.5", 3), &opts, &local)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("service web (192.168.1.5:80/TCP): vip"),
            "{err}"
        );
        assert!(
            err.contains("address of this node (interface eth0)"),
            "{err}"
        );
    }

    /// A TLS-originating frontend's VIP becomes local: another frontend on it is refused.
    #[test]
    fn a_tls_frontend_owns_its_vip() {
        let mut config = config("10.96.0.10", 1);
        let mut tls = config.services[0].clone();
        tls.frontend.port = 443;
        tls.name = "db".into();
        tls.policy.tls = Some(Default::default());
        config.services.push(tls);
        let err = check_against(&config, &DataplaneOptions::default(), &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("service db (10.96.0.10:443/TCP): originates TLS, so its VIP 10.96.0.10"),
            "{err}"
        );
        config.services.remove(0);
        check_against(&config, &DataplaneOptions::default(), &BTreeMap::new()).unwrap();
    }

    #[test]
    fn loopback_is_a_node_address() {
        let local = local_addresses().unwrap();
        assert_eq!(
            local.get(&Ipv4Addr::LOCALHOST).map(String::as_str),
            Some("lo")
        );
        let err = check(&config("127.0.0.1", 1), &DataplaneOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("vip"), "{err}");
    }

    #[test]
    fn more_backends_than_table_slots_are_refused_naming_the_field() {
        let opts = DataplaneOptions {
            table_slots: 2 * FALLBACK_LEN,
            ..Default::default()
        };
        let none = BTreeMap::new();
        check_against(&config("10.96.0.10", 16), &opts, &none).unwrap();
        let err = check_against(&config("10.96.0.10", 17), &opts, &none)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("17 backends do not fit dataplane.table_slots = 32"),
            "{err}"
        );
    }
}
