//! The next-hop cache's validity: the routing generation (`lb_route_gen`).
//!
//! After a rewrite the programs forward the packet themselves, which takes a FIB lookup
//! (`bpf_fib_lookup`: the route, then the neighbour). They keep what the lookup found per
//! destination and ingress interface in a small per-CPU cache (`lb_nh_cache`), each entry
//! stamped with the routing generation it was found under; an entry of an older generation
//! is never used. The agent follows the node's link, route, neighbour and rule changes
//! (rtnetlink) and bumps the generation at each, so a change reaches the data plane as soon
//! as the kernel announces it. Until the agent follows them, the generation is 0 and every
//! packet is looked up.
//!
//! A destination and an interface do not always determine the route: policy rules can
//! route by source, mark or more, and a multipath route spreads flows over next hops by
//! their addresses. On a node with either, the cache stays off.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use futures_util::TryStreamExt as _;
use log::{info, warn};
use rtnetlink::packet_route::{
    route::{RouteAttribute, RouteMessage},
    rule::RuleMessage,
    AddressFamily,
};

use super::Dataplane;

/// The rules every IPv4 routing setup has: `local` (priority 0), `main` (32766) and
/// `default` (32767), each looking up its table.
const DEFAULT_RULES: [(u32, u32); 3] = [(0, 255), (32766, 254), (32767, 253)];

impl Dataplane {
    /// Turns the next-hop cache on (a new generation: nothing cached before counts) or
    /// off (every packet looked up).
    pub fn set_nexthop_cache(&mut self, on: bool) -> Result<()> {
        let generation = if on {
            next_generation(self.routing_generation_now)
        } else {
            0
        };
        self.write_generation(generation)
    }

    /// The node's routing changed: every cached next hop is stale (when the cache is on).
    pub fn routing_changed(&mut self) -> Result<()> {
        if self.routing_generation_now == 0 {
            return Ok(());
        }
        self.write_generation(next_generation(self.routing_generation_now))
    }

    /// Whether the next-hop cache is on.
    pub fn nexthop_cache_on(&self) -> bool {
        self.routing_generation_now != 0
    }

    fn write_generation(&mut self, generation: u32) -> Result<()> {
        self.routing_generation
            .set(0, generation, 0)
            .context("writing the routing generation")?;
        self.routing_generation_now = generation;
        Ok(())
    }
}

/// The generation after `g`, never 0 (which means "off").
fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

/// Why a destination and an ingress interface may not determine the route here (IPv4
/// policy rules beyond the defaults, multipath routes), or `None` when they do.
pub async fn uncacheable_routing(handle: &rtnetlink::Handle) -> Result<Option<String>> {
    let rules: Vec<RuleMessage> = handle
        .rule()
        .get(rtnetlink::IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context("listing the IPv4 policy rules (RTM_GETRULE)")?;
    for rule in &rules {
        use rtnetlink::packet_route::rule::RuleAttribute as A;
        let priority = rule
            .attributes
            .iter()
            .find_map(|a| match a {
                A::Priority(p) => Some(*p),
                _ => None,
            })
            .unwrap_or(0);
        let table = rule
            .attributes
            .iter()
            .find_map(|a| match a {
                A::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(rule.header.table));
        // The defaults look a table up for every packet: no selector in the header or
        // among the attributes.
        let selects = rule.header.src_len != 0
            || rule.header.dst_len != 0
            || rule.header.tos != 0
            || rule.attributes.iter().any(|a| {
                !matches!(
                    a,
                    A::Priority(_)
                            | A::Table(_)
                            | A::Protocol(_)
                            // Unset (the kernel reports "none" as all ones).
                            | A::SuppressPrefixLen(u32::MAX)
                            | A::SuppressIfGroup(u32::MAX)
                )
            });
        if selects || !DEFAULT_RULES.contains(&(priority, table)) {
            return Ok(Some(format!(
                "policy rule at priority {priority} (table {table})"
            )));
        }
    }
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(
            rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(0)
                .build(),
        )
        .execute()
        .try_collect()
        .await
        .context("listing the IPv4 routes (RTM_GETROUTE)")?;
    for route in routes
        .iter()
        .filter(|r| r.header.address_family == AddressFamily::Inet)
    {
        if route
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::MultiPath(_)))
        {
            let dst = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => Some(format!("{d:?}")),
                _ => None,
            });
            return Ok(Some(format!(
                "multipath route to {}/{}",
                dst.unwrap_or_else(|| "default".into()),
                route.header.destination_prefix_length
            )));
        }
    }
    Ok(None)
}

/// Follows the node's routing for as long as the agent runs: turns the next-hop cache on
/// where it can hold the routing, and makes it stale at every change.
pub async fn follow(agent: std::sync::Weak<std::sync::Mutex<crate::agent::Agent>>) {
    use rtnetlink::MulticastGroup as G;
    loop {
        let result: Result<()> = async {
            let (connection, handle, mut messages) = rtnetlink::new_multicast_connection(&[
                G::Link,
                G::Ipv4Route,
                G::Neigh,
                G::Ipv4Rule,
            ])
            .context("subscribing to routing changes")?;
            let connection = tokio::spawn(connection);
            let _abort = crate::interfaces::AbortOnDrop(connection);
            let mut cacheable = uncacheable_routing(&handle).await?;
            report(&cacheable);
            if !apply(&agent, &cacheable) {
                return Ok(());
            }
            while let Some((message, _)) = futures_util::StreamExt::next(&mut messages).await {
                use rtnetlink::packet_core::NetlinkPayload::InnerMessage;
                use rtnetlink::packet_route::RouteNetlinkMessage as M;
                let recheck = matches!(
                    message.payload,
                    InnerMessage(M::NewRule(_) | M::DelRule(_) | M::NewRoute(_) | M::DelRoute(_))
                );
                if recheck {
                    let now = uncacheable_routing(&handle).await?;
                    if now != cacheable {
                        report(&now);
                        cacheable = now;
                    }
                }
                if !apply(&agent, &cacheable) {
                    return Ok(());
                }
            }
            anyhow::bail!("the netlink socket closed")
        }
        .await;
        let Some(strong) = agent.upgrade() else {
            return;
        };
        // Changes may be missed until subscribed again: nothing cached counts meanwhile.
        let _ = crate::agent::lock(&strong)
            .dataplane
            .set_nexthop_cache(false);
        drop(strong);
        match result {
            Ok(()) => return,
            Err(e) => warn!("following routing changes: {e:#}; subscribing again in 1 s"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// After a routing change (or at the start): the cache off while the routing is one it
/// cannot hold, else on, with nothing cached before counting. `false`: the agent is gone.
fn apply(
    agent: &std::sync::Weak<std::sync::Mutex<crate::agent::Agent>>,
    uncacheable: &Option<String>,
) -> bool {
    let Some(agent) = agent.upgrade() else {
        return false;
    };
    let dataplane = &mut crate::agent::lock(&agent).dataplane;
    let outcome = match (uncacheable, dataplane.nexthop_cache_on()) {
        (Some(_), _) => dataplane.set_nexthop_cache(false),
        (None, true) => dataplane.routing_changed(),
        (None, false) => dataplane.set_nexthop_cache(true),
    };
    if let Err(e) = outcome {
        warn!("{e:#}");
    }
    true
}

fn report(uncacheable: &Option<String>) {
    match uncacheable {
        None => info!("next-hop cache on: routes follow from destination and interface"),
        Some(why) => {
            info!("next-hop cache off ({why}): every forwarded packet is looked up in the FIB")
        }
    }
}
