//! Data-plane counters: one per verdict and per drop or pass reason, and traffic per
//! service and backend. All per-CPU; userspace sums the CPUs.

use crate::assert_size;

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident = $idx:literal, $label:literal; )*) => {
        /// Index into the `COUNTERS` map. Every packet increments exactly one verdict
        /// counter (`Pass*`, `Forward*`, `Reply*`, `Drop*`); `Event*` counters come on top.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $( $(#[doc = $doc])* $name = $idx, )* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// Stable name used in metrics and the CLI.
            pub const fn label(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }
        }
    };
}

counters! {
    /// Not IPv4 (ARP, IPv6, ...): passed.
    PassNotIpv4 = 0, "pass_not_ipv4";
    /// IPv4 but neither TCP nor UDP, or ICMP that is not an error about a tracked
    /// connection: passed.
    PassOtherProtocol = 1, "pass_other_protocol";
    /// TCP/UDP not addressed to a service and not a reply of a tracked flow: passed.
    PassNotService = 2, "pass_not_service";
    /// Ethernet header cut short: passed (the stack discards it).
    PassTruncatedEthernet = 3, "pass_truncated_ethernet";
    /// IPv4 header cut short or invalid IHL: passed (the stack discards it).
    PassTruncatedIpv4 = 4, "pass_truncated_ipv4";
    /// IPv4 options, not to a VIP address: passed.
    PassIpOptions = 5, "pass_ip_options";
    /// IPv4 fragment, not to a VIP address: passed.
    PassFragment = 6, "pass_fragment";
    /// TCP/UDP header cut short, not to a VIP address: passed.
    PassTruncatedL4 = 7, "pass_truncated_l4";
    /// New connection: backend chosen, destination rewritten.
    ForwardNew = 8, "forward_new";
    /// Packet of a tracked connection: destination rewritten.
    ForwardTracked = 9, "forward_tracked";
    /// Reply of a tracked connection: source rewritten to the VIP.
    ReplyTracked = 10, "reply_tracked";
    /// IPv4 options to a VIP address: dropped (lb does not rewrite them).
    DropIpOptions = 11, "drop_ip_options";
    /// IPv4 fragment to a VIP address: dropped (later fragments carry no ports).
    DropFragment = 12, "drop_fragment";
    /// TCP/UDP header cut short to a VIP address: dropped.
    DropTruncatedL4 = 13, "drop_truncated_l4";
    /// Service has no backend in its table: new connection dropped.
    DropNoBackend = 14, "drop_no_backend";
    /// No active backend within the bounded re-selection: new connection dropped.
    DropNoActiveBackend = 15, "drop_no_active_backend";
    /// A packet rewrite failed in the kernel helper: dropped.
    DropRewriteFailed = 16, "drop_rewrite_failed";
    /// The first pick was not active and another slot was used.
    EventReselected = 17, "event_reselected";
    /// A TCP packet without SYN had no table entry (evicted or expired): re-selected by
    /// flow hash, which gives the same backend while the table is unchanged.
    EventMidflowMiss = 18, "event_midflow_miss";
    /// Writing a connection table entry failed.
    EventTrackFailed = 19, "event_track_failed";
    /// Connection table entries created (two per connection).
    EventTracked = 20, "event_tracked";
    /// Egress: after DNAT, the route to the backend was not found; left to the stack.
    EventEgressNoRoute = 21, "event_egress_no_route";
    /// ICMP error about a tracked connection, sent towards the VIP (about a reply the
    /// client side could not take): translated and passed on to the backend.
    ForwardIcmpError = 22, "forward_icmp_error";
    /// ICMP error about a tracked connection, from the backend side (about a packet the
    /// backend side could not take): translated so the client sees it about the VIP.
    ReplyIcmpError = 23, "reply_icmp_error";
    /// A failure signal for the agent was lost: the signal ring buffer was full.
    EventSignalLost = 24, "event_signal_lost";
    /// A backend refused a connection's SYN (RST) and lb sent the SYN to another backend
    /// at once: the refusal became a forwarded SYN.
    ForwardResteered = 25, "forward_resteered";
    /// A refusal was held back (dropped) and the connection moved to another backend:
    /// the client's retransmitted SYN goes there.
    DropRefusalHeld = 26, "drop_refusal_held";
    /// A refusal reached the client: no other eligible backend, or the retry budget of the
    /// connection was used up (clients fail fast in a total outage).
    EventRefusalPassed = 27, "event_refusal_passed";
    /// A retransmitted SYN (connect timeout) was sent to another backend.
    EventTimeoutResteered = 28, "event_timeout_resteered";
    /// A backend segment starting `HTTP/1.` had no readable status (too short, split
    /// across segments, or not three digits): not counted either way.
    EventHttpUnparsed = 29, "event_http_unparsed";
    /// A connection was found only in the older table of a migration (a restart that
    /// replaced the connection table) and copied into the current one.
    EventMigrated = 30, "event_migrated";
    /// A new connection to a service with session affinity went to the backend the
    /// client's affinity entry named (and refreshed it).
    EventAffinityHit = 31, "event_affinity_hit";
    /// A new connection to a service with session affinity found no usable entry (none,
    /// expired, or its backend no longer active or of the service): selected normally,
    /// and the choice remembered.
    EventAffinityMiss = 32, "event_affinity_miss";
    /// A packet to a TLS-originating frontend (`SERVICE_TLS`): passed to the stack, which
    /// delivers it to the agent's TLS forwarder (its VIP is local; `lb_sk_lookup`).
    PassTlsOrigination = 33, "pass_tls_origination";
    /// A SYN to a TLS-originating frontend while no TLS forwarder listens (no agent
    /// running): dropped, so the client retransmits it to the next agent instead of being
    /// refused.
    DropTlsNoForwarder = 34, "drop_tls_no_forwarder";
    /// A rewritten packet forwarded by lb itself (FIB lookup, then a redirect to the
    /// egress interface), not routed again by the node's stack.
    EventRedirected = 35, "event_redirected";
    /// A rewritten packet left to the stack: larger than the egress MTU.
    EventStackFragNeeded = 36, "event_stack_frag_needed";
    /// A rewritten packet left to the stack: its TTL would expire here (the stack sends
    /// ICMP time exceeded).
    EventStackTtl = 37, "event_stack_ttl";
    /// A rewritten packet left to the stack: a route lb does not follow (blackhole,
    /// unreachable, prohibit, a tunnel, forwarding disabled, no route).
    EventStackNotForwarded = 38, "event_stack_not_forwarded";
    /// A rewritten packet left to the stack: its route is not a unicast one to forward
    /// on: delivery on this node (a reply to a connection the node itself made to a VIP),
    /// broadcast, multicast, or no route at all.
    EventStackNotUnicast = 39, "event_stack_not_unicast";
    /// XDP: a rewritten packet left to the stack because its egress interface cannot
    /// take XDP frames (not in the agent's list of XDP_REDIRECT targets: a driver without
    /// `ndo_xdp_xmit`, or a veth whose peer has neither an XDP program nor GRO).
    EventStackXdpTarget = 40, "event_stack_xdp_target";
    /// XDP: a rewritten packet left to the stack because the next hop's MAC address is
    /// not known yet (XDP cannot resolve it; the stack does, and later packets redirect).
    EventStackNoNeigh = 41, "event_stack_no_neigh";
    /// A rewritten packet forwarded by the next hop cached for its destination (no FIB
    /// lookup; counted on top of `event_redirected`).
    EventNexthopCached = 42, "event_nexthop_cached";
}

/// Number of slots of the `COUNTERS` map (room to grow: a new size replaces the pinned
/// map, and its counts, at the next restart).
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);

/// Traffic of a service or a backend (per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    /// Completed handshakes (SYN-ACK from the backend): connect successes. Counted here,
    /// not signalled, so success costs a per-CPU add; the agent reads it to order
    /// successes before a reported failure.
    pub handshakes: u64,
    /// HTTP responses with a status below 500 (successes for outlier detection).
    pub http_ok: u64,
    /// HTTP responses with a 5xx status (each also signalled).
    pub http_5xx: u64,
}
assert_size!(TrafficStats, 48);

impl TrafficStats {
    pub fn add(&mut self, o: &TrafficStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_connections += o.new_connections;
        self.handshakes += o.handshakes;
        self.http_ok += o.http_ok;
        self.http_5xx += o.http_5xx;
    }
}
