//! A TLS frontend's VIP made a local address of the node (`local VIP/32 dev lo` in the
//! local table), so its connections are delivered to this host, where `lb_sk_lookup`
//! hands them to the forwarder; removed when the frontend goes.
//!
//! The route is the kernel's only state for it: TC and XDP pass the frontend's packets,
//! and the node's own connections to the VIP go over loopback. A VIP with a local route
//! takes every port of it on this node, so a TLS frontend should own its VIP (an
//! auto-allocated one does).

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    packet_route::route::{RouteScope, RouteType},
    RouteMessageBuilder,
};

/// The kernel's local routing table.
const LOCAL_TABLE: u32 = 255;

fn route(vip: Ipv4Addr, lo: u32) -> rtnetlink::packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(vip, 32)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(LOCAL_TABLE)
        .output_interface(lo)
        .build()
}

async fn loopback(handle: &rtnetlink::Handle) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name("lo".to_string())
        .execute()
        .try_next()
        .await
        .context("finding the loopback device")?
        .context("no loopback device")?;
    Ok(link.header.index)
}

/// Makes each of `add` a local address and each of `remove` not one any more.
pub async fn update(add: &[Ipv4Addr], remove: &[Ipv4Addr]) -> Result<()> {
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket for routes")?;
    tokio::spawn(connection);
    let lo = loopback(&handle).await?;
    for vip in add {
        handle
            .route()
            .add(route(*vip, lo))
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the local route of TLS frontend VIP {vip}"))?;
    }
    for vip in remove {
        // Already gone is fine.
        let _ = handle.route().del(route(*vip, lo)).execute().await;
    }
    Ok(())
}
