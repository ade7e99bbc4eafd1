//! Clients for tests. Call them inside a namespace with [`Netns::run`](crate::Netns::run):
//! the socket is created there and stays there, even when used later from another thread.
//!
//! Every connect, read and write has a timeout, so a broken data plane fails a test with an
//! error that says what was asked of whom, instead of hanging it.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

/// From inside `ns`, `n` times `GET /` on a new connection each: the bodies (the names of
/// the servers that answered), in order. The error names the request that failed.
pub fn names_from(ns: &crate::Netns, addr: SocketAddr, n: usize) -> Result<Vec<String>> {
    ns.run(|| {
        (0..n)
            .map(|i| {
                http_get(addr, "/", crate::DEFAULT_TIMEOUT)
                    .with_context(|| format!("request {} of {n}", i + 1))
            })
            .collect()
    })
}

/// Sends `GET path` on a new TCP connection (`Connection: close`) and returns the body of a
/// `200` answer; any other status is an error that includes it.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let what = || format!("GET http://{addr}{path} (new connection)");
    let stream = connect(addr, timeout).with_context(what)?;
    let local = stream.local_addr().ok();
    let mut reader = BufReader::new(stream.try_clone().with_context(what)?);
    let mut writer = stream;
    send_get(&mut writer, addr, path, false)
        .and_then(|()| read_response(&mut reader))
        .with_context(|| format!("{} from {local:?}", what()))
}

/// As [`http_get`], from the local address `src` (one of the namespace's addresses): a
/// second client on the same host.
pub fn http_get_from(
    src: Ipv4Addr,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String> {
    let what = || format!("GET http://{addr}{path} from {src} (new connection)");
    let stream = connect_from(src, addr, timeout).with_context(what)?;
    let mut reader = BufReader::new(stream.try_clone().with_context(what)?);
    let mut writer = stream;
    send_get(&mut writer, addr, path, false)
        .and_then(|()| read_response(&mut reader))
        .with_context(what)
}

/// Sends `POST path` with an empty body on a new connection and returns the body of a
/// `200` answer (e.g. to lb's admin endpoint).
pub fn http_post(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let what = || format!("POST http://{addr}{path}");
    let mut stream = connect(addr, timeout).with_context(what)?;
    let mut reader = BufReader::new(stream.try_clone().with_context(what)?);
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .context("sending request")
        .and_then(|()| read_response(&mut reader))
        .with_context(what)
}

/// Sends `POST path` with an empty body and extra `headers` (e.g. lb's admin token,
/// `x-lb-token`) on a new connection and returns the body of a `200` answer; any other
/// status is an error that includes it.
pub fn http_post_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<String> {
    match http_request(addr, "POST", path, headers, timeout)? {
        (200, body) => Ok(body),
        (status, body) => bail!("POST http://{addr}{path}: status {status}, body {body:?}"),
    }
}

/// Sends `METHOD path` (empty body) with extra `headers` on a new connection
/// (`Connection: close`) and returns the status and the body, whatever the status.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, String)> {
    let what = || format!("{method} http://{addr}{path}");
    let mut stream = connect(addr, timeout).with_context(what)?;
    let mut reader = BufReader::new(stream.try_clone().with_context(what)?);
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .context("sending request")
        .and_then(|()| read_status_and_body(&mut reader))
        .with_context(what)
}

/// One TCP connection kept open for several requests, to test that the load balancer keeps a
/// connection on one backend. Create it inside the client's namespace.
#[derive(Debug)]
pub struct KeepAliveClient {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAliveClient {
    /// Opens the connection; `timeout` bounds the connect and every later read and write.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = connect(addr, timeout).with_context(|| format!("connecting to {addr}"))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(KeepAliveClient {
            addr,
            reader,
            writer: stream,
        })
    }

    /// Sends `GET path` on the kept connection and returns the body of a `200` answer.
    pub fn get(&mut self, path: &str) -> Result<String> {
        send_get(&mut self.writer, self.addr, path, true)
            .and_then(|()| read_response(&mut self.reader))
            .with_context(|| {
                format!(
                    "GET http://{}{path} (kept connection from {:?})",
                    self.addr,
                    self.writer.local_addr().ok()
                )
            })
    }

    /// Sends `GET path` on the kept connection and returns the status and body of the
    /// answer, whatever the status (a `503` is an answer here, not an error).
    pub fn get_with_status(&mut self, path: &str) -> Result<(u16, String)> {
        send_get(&mut self.writer, self.addr, path, true)
            .and_then(|()| read_status_and_body(&mut self.reader))
            .with_context(|| {
                format!(
                    "GET http://{}{path} (kept connection from {:?})",
                    self.addr,
                    self.writer.local_addr().ok()
                )
            })
    }

    /// The client's end of the connection (the 5-tuple the load balancer tracks).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }
}

/// Sends `payload` from a new socket on an ephemeral port and returns the first reply as text.
///
/// A reply whose source is not `addr` is an error that names the source: behind a load
/// balancer that means the reply was not translated back to the service address.
pub fn udp_request(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Result<String> {
    let what = || format!("UDP request to {addr}");
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).with_context(what)?;
    socket.send_to(payload, addr).with_context(what)?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{}: no reply within {timeout:?}", what());
        }
        socket.set_read_timeout(Some(left)).with_context(what)?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == addr => {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
            Ok((_, from)) => bail!("{}: reply came from {from}, expected {addr}", what()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("{}: no reply within {timeout:?}", what())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(what),
        }
    }
}

/// A TCP connection to `addr` (no request sent), reads and writes bounded by `timeout`.
pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A TCP connection to `addr` from the local address `src` (bound before connecting, which
/// `TcpStream` cannot do), with `timeout` on the connect and on every read and write.
fn connect_from(src: Ipv4Addr, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(dst) = addr else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an IPv4 source needs an IPv4 destination",
        ));
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the stream closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let local = sockaddr(src, 0);
    // SAFETY: a valid `sockaddr_in` of `len` bytes.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Linux bounds a blocking connect(2) by the send timeout.
    stream.set_write_timeout(Some(timeout))?;
    let remote = sockaddr(*dst.ip(), dst.port());
    // SAFETY: a valid `sockaddr_in` of `len` bytes.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EINPROGRESS) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect: no answer within {timeout:?}"),
            )
        } else {
            e
        });
    }
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn send_get(writer: &mut TcpStream, addr: SocketAddr, path: &str, keep_alive: bool) -> Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\r\n");
    writer
        .write_all(request.as_bytes())
        .context("sending request")
}

/// Reads one response and returns its body if the status is `200`.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<String> {
    let (status, body) = read_status_and_body(reader)?;
    if status != 200 {
        bail!("status {status}, body {body:?}");
    }
    Ok(body)
}

/// Reads one response: its status and body (any status).
pub fn read_status_and_body(reader: &mut BufReader<TcpStream>) -> Result<(u16, String)> {
    let mut status_line = String::new();
    if reader
        .read_line(&mut status_line)
        .context("reading status line")?
        == 0
    {
        bail!("connection closed before a response");
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).context("reading headers")? == 0 {
            bail!("connection closed inside the response headers");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((key, value)) = header.split_once(':') {
            if key.eq_ignore_ascii_case("content-length") {
                let len = value.trim().parse::<usize>();
                content_length = Some(len.with_context(|| format!("bad header {header:?}"))?);
            }
            if key.eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    match content_length {
        _ if chunked => read_chunked(reader, &mut body)?,
        Some(len) => {
            body.resize(len, 0);
            reader
                .read_exact(&mut body)
                .with_context(|| format!("reading a {len}-byte body"))?;
        }
        // Without a length the body ends with the connection.
        None => {
            reader.read_to_end(&mut body).context("reading the body")?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Reads a chunked body (RFC 9112, section 7.1) into `body`: each chunk is its size in
/// hex (maybe with extensions after `;`), CRLF, the data, CRLF; a size of 0 ends it, after
/// optional trailer fields and an empty line.
fn read_chunked(reader: &mut BufReader<TcpStream>, body: &mut Vec<u8>) -> Result<()> {
    loop {
        let mut line = String::new();
        if reader
            .read_line(&mut line)
            .context("reading a chunk size")?
            == 0
        {
            bail!("connection closed inside a chunked body");
        }
        let size = line.trim_end().split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            // Trailer fields, up to the empty line.
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer).context("reading trailers")? == 0
                    || trailer.trim_end().is_empty()
                {
                    return Ok(());
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .with_context(|| format!("reading a {size}-byte chunk"))?;
        let mut crlf = [0u8; 2];
        reader
            .read_exact(&mut crlf)
            .context("reading a chunk's end")?;
        ensure!(&crlf == b"\r\n", "a chunk does not end with CRLF");
    }
}
