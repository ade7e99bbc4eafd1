//! A DNS server of the tests' own: it answers A queries for the names it is given, over
//! UDP, in a namespace, and can change an answer or stop answering mid-test. Messages are
//! read and written with hickory's protocol library; only the table of names is here.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata::A, Name, RData, Record, RecordType},
};

use crate::netns::Netns;

#[derive(Default)]
struct Shared {
    /// Name (lower case, no trailing dot) → addresses and TTL (seconds).
    records: Mutex<HashMap<String, (Vec<Ipv4Addr>, u32)>>,
    /// While set, queries are read and dropped: a resolver that stopped answering.
    silent: AtomicBool,
    stop: AtomicBool,
    queries: AtomicU64,
}

/// A running server; stops when dropped.
pub struct TestDnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TestDnsServer {
    /// Binds `addr` (UDP) inside `ns` and serves.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let socket = ns
            .run(|| UdpSocket::bind(addr))
            .with_context(|| format!("DNS server: binding {addr} in netns {}", ns.name()))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = socket.local_addr()?;
        let shared = Arc::new(Shared::default());
        let serving = shared.clone();
        let thread = std::thread::spawn(move || serve(&socket, &serving));
        Ok(Self {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `name` with `addresses` (none: NXDOMAIN) and `ttl` seconds from now on.
    pub fn set(&self, name: &str, addresses: &[Ipv4Addr], ttl: u32) {
        let mut records = self.shared.records.lock().unwrap();
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if addresses.is_empty() {
            records.remove(&key);
        } else {
            records.insert(key, (addresses.to_vec(), ttl));
        }
    }

    /// Stops answering (queries are dropped) while `silent`.
    pub fn set_silent(&self, silent: bool) {
        self.shared.silent.store(silent, Ordering::Relaxed);
    }

    /// Queries received since the start.
    pub fn queries(&self) -> u64 {
        self.shared.queries.load(Ordering::Relaxed)
    }
}

impl Drop for TestDnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, shared: &Shared) {
    let mut buf = [0u8; 1500];
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        shared.queries.fetch_add(1, Ordering::Relaxed);
        if shared.silent.load(Ordering::Relaxed) {
            continue;
        }
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        if let Ok(bytes) = answer(&query, shared).to_vec() {
            let _ = socket.send_to(&bytes, from);
        }
    }
}

fn answer(query: &Message, shared: &Shared) -> Message {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    response.add_queries(query.queries().to_vec());
    let records = shared.records.lock().unwrap();
    let mut known = false;
    for q in query.queries() {
        let key = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let Some((addresses, ttl)) = records.get(&key) else {
            continue;
        };
        known = true;
        if q.query_type() != RecordType::A {
            continue;
        }
        for a in addresses {
            let name: Name = q.name().clone();
            response.add_answer(Record::from_rdata(name, *ttl, RData::A(A(*a))));
        }
    }
    if !known {
        response.set_response_code(ResponseCode::NXDomain);
    }
    response
}
