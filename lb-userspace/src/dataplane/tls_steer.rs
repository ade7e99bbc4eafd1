//! Handing the connections of TLS-originating frontends to the agent's TLS forwarder:
//! `lb_sk_lookup` (lb-ebpf `tls_steer`) attached to the agent's network namespace, and
//! the forwarder's listening socket in its SOCKMAP.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context as _, Result};
use aya::{maps::SockMap, programs::SkLookup};
use lb_common::maps as names;

use super::Dataplane;

/// The `sk_lookup` program's name in the eBPF object.
pub const SK_LOOKUP_PROGRAM: &str = "lb_sk_lookup";

impl Dataplane {
    /// Attaches `lb_sk_lookup` to the network namespace the agent runs in and gives it
    /// `listener`: from then on, a SYN to a `SERVICE_TLS` frontend is delivered to
    /// `listener`, whatever address it is bound to, and the accepted socket's local
    /// address is the frontend the client called. Called again, it only replaces the
    /// listener.
    pub fn steer_tls<L: AsRawFd>(&mut self, listener: &L) -> Result<()> {
        let mut map: SockMap<_> = SockMap::try_from(
            self.ebpf
                .map_mut(names::TLS_LISTENER)
                .with_context(|| format!("map {} is missing", names::TLS_LISTENER))?,
        )?;
        map.set(0, listener, 0)
            .context("putting the TLS forwarder's listener in its SOCKMAP")?;
        if self.tls_steering.is_some() {
            return Ok(());
        }
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(SK_LOOKUP_PROGRAM)
            .with_context(|| format!("program {SK_LOOKUP_PROGRAM} is missing"))?
            .try_into()?;
        // The calling thread's namespace (`/proc/self` would be the main thread's, which
        // differs in a thread that entered another namespace).
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening this network namespace (/proc/thread-self/ns/net)")?;
        let id = prog
            .attach(netns.as_fd())
            .context("attaching lb_sk_lookup to this network namespace")?;
        self.tls_steering = Some(prog.take_link(id)?);
        Ok(())
    }

    /// This agent stopping: its listener leaves the SOCKMAP (TC and XDP then hold new SYNs
    /// back until a listener is there again) and `lb_sk_lookup` is detached (the next
    /// agent's program places the TLS frontends' connections).
    pub fn stop_tls_steering(&mut self) {
        if let Some(map) = self.ebpf.map_mut(names::TLS_LISTENER) {
            if let Ok(mut map) = SockMap::try_from(map) {
                let _ = map.clear_index(&0);
            }
        }
        self.tls_steering = None;
    }
}
