//! A read-only view of the published selection state (services, selection tables and
//! failover lists, backends) for the TLS forwarder, which picks backends as the kernel
//! does (`lb_common::selection`) without taking the agent's lock per connection.

use std::os::fd::AsFd;

use anyhow::Result;
use aya::maps::{Array, HashMap, IterableMap as _, MapData};
use lb_common::{Backend, Service, ServiceKey};

use super::{mmap::MappedU32Array, Dataplane, Frontend};

pub struct SelectionReader {
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    selection: std::sync::Arc<MappedU32Array>,
}

impl SelectionReader {
    /// The service entry the kernel reads for `frontend`.
    pub fn service(&self, frontend: &Frontend) -> Option<Service> {
        self.services.get(&frontend.key(), 0).ok()
    }

    /// `pick`'s answer from the service entry of `frontend`, kept only when the entry is
    /// unchanged after it: the selection window a replaced entry named is retired and
    /// may, after a grace a preempted thread can outlast, hold another service's table.
    pub fn consistent<T>(
        &self,
        frontend: &Frontend,
        pick: impl Fn(&Service) -> Option<T>,
    ) -> Option<(Service, T)> {
        for _ in 0..4 {
            let svc = self.service(frontend)?;
            let got = pick(&svc);
            if self.service(frontend)? == svc {
                return got.map(|g| (svc, g));
            }
        }
        None
    }

    /// The backend id in selection slot `slot`.
    pub fn slot(&self, slot: u32) -> Option<u32> {
        self.selection.get(slot as usize)
    }

    /// Backend `id`'s entry.
    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id, 0).ok()
    }
}

impl Dataplane {
    /// A reader of what this data plane publishes, with descriptors of its own.
    pub fn selection_reader(&self) -> Result<SelectionReader> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<MapData> {
            Ok(MapData::from_fd(fd.try_clone_to_owned()?)?)
        };
        let services = dup(self.services.map().fd().as_fd())?;
        let backends = dup(self.backends.map().fd().as_fd())?;
        Ok(SelectionReader {
            services: HashMap::try_from(aya::maps::Map::HashMap(services))?,
            backends: Array::try_from(aya::maps::Map::Array(backends))?,
            selection: self.selection.clone(),
        })
    }
}
