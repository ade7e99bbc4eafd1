//! Backends for tests: servers inside a namespace that answer with their name.
//!
//! A test sends traffic through the load balancer and reads which backend answered from the
//! body. Each server runs on background threads and stops on drop: blocked calls are woken
//! by `shutdown(2)` on the sockets (TCP) or a short receive timeout (UDP), and every thread is
//! joined, so nothing outlives the server by more than a fraction of a second.

use std::{
    collections::HashMap,
    io::{self, BufRead as _, BufReader, BufWriter, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::netns::Netns;

/// `GET /slow/N` sends its body in this many chunks...
pub const SLOW_CHUNKS: usize = 100;
/// ...with this pause before each chunk after the first, so the transfer lasts about 2.5 s:
/// long enough for a test to change the load balancer's tables in the middle of it.
pub const SLOW_CHUNK_DELAY: Duration = Duration::from_millis(25);

/// How long the UDP server blocks in `recv` before it looks at its stop flag again.
const UDP_POLL: Duration = Duration::from_millis(100);

/// Bodies of `/bytes/N` and `/slow/N` are written in pieces of at most this size, so a large
/// N needs no large buffer.
const WRITE_CHUNK: usize = 64 * 1024;

/// The body `GET /bytes/N` and `GET /slow/N` answer: the server's name repeated, cut to `len`
/// bytes (`x` repeated for an empty name). Tests compare against it to catch corruption.
pub fn body_pattern(name: &str, len: usize) -> String {
    pattern_at(name, 0, len)
}

/// Bytes `offset..offset + len` of the endless repetition of `name`.
fn pattern_at(name: &str, offset: usize, len: usize) -> String {
    let unit = if name.is_empty() { "x" } else { name }.as_bytes();
    let bytes: Vec<u8> = (offset..offset + len)
        .map(|i| unit[i % unit.len()])
        .collect();
    // A name with multi-byte characters can be cut mid-character; tests use ASCII names.
    String::from_utf8_lossy(&bytes).into_owned()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection thread must not take the server's shutdown down with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A minimal HTTP/1.1 server with keep-alive, one thread per connection:
/// - `GET /` answers `200` with the server's name as body;
/// - `GET /bytes/N` answers N bytes of [`body_pattern`] (a long transfer);
/// - `GET /slow/N` answers the same N bytes in [`SLOW_CHUNKS`] pieces spaced by
///   [`SLOW_CHUNK_DELAY`] (a transfer of about 2.5 s);
/// - anything else answers `404`.
///
/// Every response carries `X-Server: <name>`. [`HttpNameServer::set_status`] makes the
/// server answer every `GET` with another status instead (a failing backend whose
/// listener stays up, e.g. `503`).
#[derive(Debug)]
pub struct HttpNameServer {
    addr: SocketAddr,
    shared: Arc<HttpShared>,
    listener: Arc<TcpListener>,
    accept_thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct HttpShared {
    name: String,
    stop: AtomicBool,
    accepted: AtomicU64,
    /// `200`: the normal routes; anything else: every `GET` answers this status.
    status: AtomicU16,
    /// What `GET /healthz` answers (a health-check path), `200` unless set.
    health: AtomicU16,
    conns: Mutex<Connections>,
}

/// Open connections (a clone of each stream, so drop can shut it down) and their threads.
#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpNameServer {
    /// Binds `addr` inside `ns` and starts serving. Port 0 picks a free port; see
    /// [`HttpNameServer::addr`].
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Result<Self> {
        let listener = ns.run(|| TcpListener::bind(addr)).with_context(|| {
            format!("HTTP server {name}: binding {addr} in netns {}", ns.name())
        })?;
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let shared = Arc::new(HttpShared {
            name: name.to_owned(),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            status: AtomicU16::new(200),
            health: AtomicU16::new(200),
            conns: Mutex::new(Connections::default()),
        });
        let accept_thread = spawn_accept_thread(&listener, &shared)?;
        Ok(HttpNameServer {
            addr,
            shared,
            listener,
            accept_thread: Some(accept_thread),
        })
    }

    /// Serves again after [`HttpNameServer::stop`], as a drained server brought back: binds
    /// the same address in `ns` (the namespace it was started in) and accepts connections
    /// again, with the same name, status and [`HttpNameServer::accepted`] count. Does
    /// nothing while the server is serving.
    pub fn start_again(&mut self, ns: &Netns) -> Result<()> {
        if self.serving() {
            return Ok(());
        }
        let addr = self.addr;
        let listener = ns.run(|| TcpListener::bind(addr)).with_context(|| {
            format!(
                "HTTP server {}: binding {addr} again in netns {}",
                self.shared.name,
                ns.name()
            )
        })?;
        // `stop` joined every thread of the previous run: nothing reads the flag now.
        self.shared.stop.store(false, Ordering::SeqCst);
        self.listener = Arc::new(listener);
        self.accept_thread = Some(spawn_accept_thread(&self.listener, &self.shared)?);
        Ok(())
    }

    /// Whether the server accepts connections: started and not stopped since (or started
    /// again).
    pub fn serving(&self) -> bool {
        self.accept_thread.is_some()
    }

    /// The address the server listens on (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name the server answers with.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// How many TCP connections the server has accepted, to cross-check what the load
    /// balancer sent where (a keep-alive client counts once).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// From the next request on (also on connections already open), answers every `GET`,
    /// whatever its path, with `status` and the server's name as body: `set_status(503)`
    /// is a backend that accepts connections but fails every request. `200` restores the
    /// normal routes.
    ///
    /// # Panics
    /// If `status` is not a three-digit HTTP status (100..=599).
    pub fn set_status(&self, status: u16) {
        assert!(
            (100..=599).contains(&status),
            "{status} is not an HTTP status"
        );
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// Makes `GET /healthz` answer `status` (its other routes stay as they are): an
    /// endpoint whose health check fails while it still serves.
    pub fn set_health_status(&self, status: u16) {
        assert!(
            (100..=599).contains(&status),
            "{status} is not an HTTP status"
        );
        self.shared.health.store(status, Ordering::SeqCst);
    }

    /// The status set by [`HttpNameServer::set_status`] (`200`: the normal routes).
    pub fn status(&self) -> u16 {
        self.shared.status.load(Ordering::SeqCst)
    }
}

impl HttpNameServer {
    /// Closes the listener and every open connection, as a drained server does: from now
    /// on the kernel answers its port's SYNs with RST. Idempotent; dropping also stops.
    pub fn stop(&mut self) {
        if self.accept_thread.is_none() {
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept() on Linux (EINVAL).
        // SAFETY: the fd belongs to `self.listener`, which is alive for the call.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        // No connection can be added now that the accept thread is gone: wake every
        // connection thread blocked in read or write, then wait for all of them.
        let threads = {
            let mut conns = lock(&self.shared.conns);
            for stream in conns.open.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for HttpNameServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_accept_thread(
    listener: &Arc<TcpListener>,
    shared: &Arc<HttpShared>,
) -> Result<JoinHandle<()>> {
    // The socket already lives in its namespace; the accepting thread itself need not.
    thread::Builder::new()
        .name(format!("http-{}", shared.name))
        .spawn({
            let listener = Arc::clone(listener);
            let shared = Arc::clone(shared);
            move || accept_loop(&listener, &shared)
        })
        .context("spawning the accept thread")
}

fn accept_loop(listener: &TcpListener, shared: &Arc<HttpShared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Transient (a connection reset before accept, out of fds): keep serving.
                eprintln!("lb-tests: HTTP server {}: accept: {e}", shared.name);
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = spawn_connection(stream, shared) {
            eprintln!("lb-tests: HTTP server {}: {e:#}", shared.name);
        }
    }
}

fn spawn_connection(stream: TcpStream, shared: &Arc<HttpShared>) -> Result<()> {
    // Responses go out in several writes (headers, chunks); Nagle would hold some back.
    stream.set_nodelay(true)?;
    let handle = stream.try_clone()?;
    let mut conns = lock(&shared.conns);
    conns.threads.retain(|thread| !thread.is_finished());
    let id = conns.next_id;
    conns.next_id += 1;
    conns.open.insert(id, handle);
    let thread = thread::Builder::new()
        .name(format!("http-{}-{id}", shared.name))
        .spawn({
            let shared = Arc::clone(shared);
            move || {
                // A client that hangs up mid-request is normal in tests; nothing to report.
                let _ = serve_connection(stream, &shared);
                lock(&shared.conns).open.remove(&id);
            }
        });
    match thread {
        Ok(thread) => {
            conns.threads.push(thread);
            Ok(())
        }
        Err(e) => {
            conns.open.remove(&id);
            Err(e).context("spawning a connection thread")
        }
    }
}

/// One parsed request: what the server needs to answer it.
struct Request {
    method: String,
    path: String,
    keep_alive: bool,
}

fn serve_connection(stream: TcpStream, shared: &HttpShared) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    while let Some(request) = read_request(&mut reader)? {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        respond(&mut writer, &request, shared)?;
        if !request.keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one request head (and skips a body if one is announced). `None` at a clean EOF.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad request line {line:?}"),
        ));
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let http11 = version.eq_ignore_ascii_case("HTTP/1.1");
    let mut connection = String::new();
    let mut content_length = 0u64;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((key, value)) = header.split_once(':') {
            let value = value.trim();
            if key.eq_ignore_ascii_case("connection") {
                connection = value.to_ascii_lowercase();
            } else if key.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            }
        }
    }
    io::copy(
        &mut io::Read::take(&mut *reader, content_length),
        &mut io::sink(),
    )?;
    // HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked.
    let keep_alive = if http11 {
        connection != "close"
    } else {
        connection == "keep-alive"
    };
    Ok(Some(Request {
        method,
        path,
        keep_alive,
    }))
}

/// What a path asks for.
enum Route {
    Name,
    Health,
    Bytes(usize),
    Slow(usize),
    NotFound,
}

fn route(path: &str) -> Route {
    let number = |rest: &str| rest.parse::<usize>().ok();
    // `/hello` as HelloWorld serves it in Istio's task.
    if path == "/" || path == "/hello" {
        Route::Name
    } else if path == "/healthz" {
        Route::Health
    } else if let Some(n) = path.strip_prefix("/bytes/").and_then(number) {
        Route::Bytes(n)
    } else if let Some(n) = path.strip_prefix("/slow/").and_then(number) {
        Route::Slow(n)
    } else {
        Route::NotFound
    }
}

fn respond(
    writer: &mut BufWriter<TcpStream>,
    request: &Request,
    shared: &HttpShared,
) -> io::Result<()> {
    let name = &shared.name;
    let head = |status: &str, len: usize| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n\
             X-Server: {name}\r\nConnection: {}\r\n\r\n",
            if request.keep_alive {
                "keep-alive"
            } else {
                "close"
            }
        )
    };
    if request.method != "GET" {
        let body = "only GET\n";
        write!(
            writer,
            "{}{body}",
            head("405 Method Not Allowed", body.len())
        )?;
        return writer.flush();
    }
    let status = shared.status.load(Ordering::SeqCst);
    if status != 200 {
        let line = format!("{status} {}", reason_phrase(status));
        write!(writer, "{}{name}", head(&line, name.len()))?;
        return writer.flush();
    }
    match route(&request.path) {
        Route::Name => write!(writer, "{}{name}", head("200 OK", name.len()))?,
        Route::Health => {
            let status = shared.health.load(Ordering::SeqCst);
            let line = format!("{status} {}", reason_phrase(status));
            write!(writer, "{}{name}", head(&line, name.len()))?;
        }
        Route::NotFound => {
            let body = "not found\n";
            write!(writer, "{}{body}", head("404 Not Found", body.len()))?;
        }
        Route::Bytes(len) => {
            writer.write_all(head("200 OK", len).as_bytes())?;
            write_pattern(writer, name, 0, len)?;
        }
        Route::Slow(len) => {
            writer.write_all(head("200 OK", len).as_bytes())?;
            writer.flush()?;
            let chunk = len.div_ceil(SLOW_CHUNKS).max(1);
            let mut offset = 0;
            while offset < len {
                if offset > 0 {
                    thread::sleep(SLOW_CHUNK_DELAY);
                }
                if shared.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let n = chunk.min(len - offset);
                write_pattern(writer, name, offset, n)?;
                // Each chunk goes on the wire now, so the transfer really spans the delay.
                writer.flush()?;
                offset += n;
            }
        }
    }
    writer.flush()
}

/// The reason phrase for a status line (RFC 9110); the status code is what clients and lb
/// read, the phrase only has to be there.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn write_pattern(
    writer: &mut BufWriter<TcpStream>,
    name: &str,
    offset: usize,
    len: usize,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = WRITE_CHUNK.min(len - done);
        writer.write_all(pattern_at(name, offset + done, n).as_bytes())?;
        done += n;
    }
    Ok(())
}

/// A UDP server that answers every datagram with its name, from the socket the datagram
/// arrived on, so the reply's source is the server's address.
#[derive(Debug)]
pub struct UdpNameServer {
    addr: SocketAddr,
    name: String,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpNameServer {
    /// Binds `addr` inside `ns` and starts answering. Port 0 picks a free port.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Result<Self> {
        let socket = ns
            .run(|| UdpSocket::bind(addr))
            .with_context(|| format!("UDP server {name}: binding {addr} in netns {}", ns.name()))?;
        let addr = socket.local_addr()?;
        // Wakes the loop regularly to notice the stop flag.
        socket.set_read_timeout(Some(UDP_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = thread::Builder::new()
            .name(format!("udp-{name}"))
            .spawn({
                let (stop, received, name) =
                    (Arc::clone(&stop), Arc::clone(&received), name.to_owned());
                move || udp_loop(&socket, &name, &stop, &received)
            })
            .context("spawning the UDP server thread")?;
        Ok(UdpNameServer {
            addr,
            name: name.to_owned(),
            stop,
            received,
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name the server answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many datagrams the server has received.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpNameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn udp_loop(socket: &UdpSocket, name: &str, stop: &AtomicBool, received: &AtomicU64) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                received.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = socket.send_to(name.as_bytes(), peer) {
                    eprintln!("lb-tests: UDP server {name}: reply to {peer}: {e}");
                }
            }
            // A signal handled by this thread (a tool's Ctrl-C handler): just go on.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // An ICMP error for an earlier reply surfaces here; keep serving.
            Err(e) => eprintln!("lb-tests: UDP server {name}: recv: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_repeats_name() {
        assert_eq!(body_pattern("ab", 5), "ababa");
        assert_eq!(body_pattern("", 3), "xxx");
        assert_eq!(pattern_at("abc", 4, 4), "bcab");
    }

    #[test]
    fn routes() {
        assert!(matches!(route("/"), Route::Name));
        assert!(matches!(route("/bytes/10"), Route::Bytes(10)));
        assert!(matches!(route("/slow/7"), Route::Slow(7)));
        assert!(matches!(route("/bytes/x"), Route::NotFound));
        assert!(matches!(route("/other"), Route::NotFound));
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(503), "Service Unavailable");
        assert_eq!(reason_phrase(504), "Gateway Timeout");
        assert_eq!(reason_phrase(599), "Status");
    }

    /// Over loopback in a fresh namespace: a stopped server's port refuses connections,
    /// and `start_again` serves on it again under the same name, counting on.
    #[test]
    fn stop_then_start_again() {
        if !crate::require_root() {
            return;
        }
        let ns = Netns::new("sta").unwrap();
        let mut server = HttpNameServer::start(&ns, "127.0.0.1:0".parse().unwrap(), "be1").unwrap();
        let addr = server.addr();
        let get = || ns.run(|| crate::http_get(addr, "/", Duration::from_secs(3)));
        assert_eq!(get().unwrap(), "be1");
        assert!(server.serving());
        server.stop();
        assert!(!server.serving());
        let err = ns.run(|| TcpStream::connect(addr)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        server.start_again(&ns).unwrap();
        assert!(server.serving());
        assert_eq!(server.addr(), addr);
        assert_eq!(get().unwrap(), "be1");
        assert_eq!(server.accepted(), 2);
        // Serving already: nothing to do.
        server.start_again(&ns).unwrap();
        assert_eq!(get().unwrap(), "be1");
        server.stop();
        server.stop();
    }

    /// Over loopback in a fresh namespace: `set_status` changes what every path answers,
    /// on new connections and on one kept open, and `200` restores the routes.
    #[test]
    fn set_status_answers_every_get() {
        use std::io::Read as _;

        if !crate::require_root() {
            return;
        }
        let ns = Netns::new("sts").unwrap();
        let server = HttpNameServer::start(&ns, "127.0.0.1:0".parse().unwrap(), "be1").unwrap();
        let get = |stream: &mut TcpStream, path: &str, close: bool| -> String {
            let connection = if close { "close" } else { "keep-alive" };
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\r\n"
            )
            .unwrap();
            let mut answer = vec![0u8; 4096];
            let n = if close {
                // The server closes after its answer.
                answer.clear();
                stream.read_to_end(&mut answer).unwrap()
            } else {
                // One small answer, written with one flush.
                stream.read(&mut answer).unwrap()
            };
            String::from_utf8_lossy(&answer[..n]).into_owned()
        };
        let connect = || {
            let stream = ns.run(|| TcpStream::connect(server.addr())).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            stream
        };
        let mut kept = connect();
        assert!(get(&mut kept, "/", false).starts_with("HTTP/1.1 200 OK\r\n"));
        assert_eq!(server.status(), 200);
        server.set_status(503);
        assert_eq!(server.status(), 503);
        for path in ["/", "/bytes/10", "/nope"] {
            let answer = get(&mut connect(), path, true);
            assert!(
                answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{path}: {answer:?}"
            );
            assert!(answer.ends_with("\r\n\r\nbe1"), "{path}: {answer:?}");
        }
        let answer = get(&mut kept, "/", false);
        assert!(answer.starts_with("HTTP/1.1 503 "), "kept: {answer:?}");
        server.set_status(200);
        let answer = get(&mut connect(), "/", true);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(answer.ends_with("be1"), "{answer:?}");
    }
}
