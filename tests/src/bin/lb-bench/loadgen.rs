//! The bench's own load generator for one new TCP connection per request, and `wrk` for
//! keep-alive requests.
//!
//! New connections: `concurrency` threads in the client's namespace, each in a loop: start
//! the timer, connect, send `GET /` with `Connection: close`, read the response to EOF (the
//! server closes first, so the TIME_WAIT state is the server's and the client's port is
//! free again at once), check the `200`, stop the timer. A request's latency therefore
//! includes the TCP handshake and the close. `wrk` keeps its connections open and is
//! better at that than blocking threads would be.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb_tests::Netns;

use crate::results::RunFigures;

/// Every request of the new-connection generator.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// Connect, read and write timeout of one measured request: a lost SYN is retransmitted
/// after 1 s, so a request that needed one retransmission still completes (and shows in
/// p99).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `f` on the calling thread with its CPU affinity set to `cpu` (when given), then
/// restores the previous affinity. Threads and processes started in `f` inherit it: this
/// is how the bench pins the servers, proxies and the agent.
pub fn on_cpu<T>(cpu: Option<usize>, f: impl FnOnce() -> T) -> T {
    let Some(cpu) = cpu else {
        return f();
    };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread.
    let mut previous: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `previous` is a valid, writable cpu_set_t of `size` bytes.
    let saved = unsafe { libc::sched_getaffinity(0, size, &mut previous) } == 0;
    pin_current_thread(cpu);
    let out = f();
    if saved {
        // SAFETY: `previous` is the set read above.
        unsafe { libc::sched_setaffinity(0, size, &previous) };
    }
    out
}

/// Pins the calling thread to `cpu` (best effort: a machine without that CPU keeps the
/// thread where it was).
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, CPU_SET writes within it, and sched_setaffinity
    // reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Why one request failed.
#[derive(Debug)]
enum Failure {
    /// The step (connect, send, read) and its error.
    Io(&'static str, std::io::Error),
    /// The first bytes of an answer that is not a 200.
    Status(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Io(step, e) => write!(f, "{step}: {e}"),
            Failure::Status(head) => write!(f, "answered {head:?}"),
        }
    }
}

/// One request on a new connection, `timeout` for each step; `Ok` after a `200` response
/// read to EOF.
fn one_request(
    addr: SocketAddr,
    buf: &mut [u8],
    timeout: Duration,
) -> std::result::Result<(), Failure> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| Failure::Io("connect", e))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.write_all(REQUEST))
        .map_err(|e| Failure::Io("send", e))?;
    // The status line is in the first segment; keep its first bytes, read the rest to EOF.
    let mut head = [0u8; 12];
    let mut head_len = 0;
    loop {
        let n = stream.read(buf).map_err(|e| Failure::Io("read", e))?;
        if n == 0 {
            break;
        }
        let take = (head.len() - head_len).min(n);
        head[head_len..head_len + take].copy_from_slice(&buf[..take]);
        head_len += take;
    }
    let head = &head[..head_len];
    if head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200") {
        Ok(())
    } else {
        Err(Failure::Status(String::from_utf8_lossy(head).into_owned()))
    }
}

/// One request from the calling thread (which must be in the client's namespace): the
/// readiness check of a target, with `timeout` for each step. The error says what went
/// wrong.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let mut buf = [0u8; 4096];
    match one_request(addr, &mut buf, timeout) {
        Ok(()) => Ok(()),
        Err(Failure::Io(step, e)) => Err(e).with_context(|| format!("GET http://{addr}/: {step}")),
        Err(Failure::Status(s)) => bail!("GET http://{addr}/ answered {s:?}, not 200"),
    }
}

/// What one generator thread saw.
struct ThreadFigures {
    latencies_ns: Vec<u64>,
    errors: u64,
    /// The first few failures, as the generator saw them (printed with the run).
    first_errors: Vec<String>,
}

/// Nearest-rank percentile `p` of sorted nanoseconds, in µs (0 for no sample).
fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_ns.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1000.0
}

/// Failures each generator thread keeps the text of, to say why requests failed.
const FIRST_ERRORS_KEPT: usize = 3;

/// `concurrency` threads in `ns`, each pinned to `cpu`, making requests on new
/// connections to `addr` for `duration`. A thread starts no request after the deadline;
/// the rate is the completed requests over the time until the last thread finished.
pub fn new_connections(
    ns: &Netns,
    addrs: &[SocketAddr],
    concurrency: usize,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<RunFigures> {
    let concurrency = concurrency.max(1);
    let start = Arc::new(Barrier::new(concurrency + 1));
    let mut threads = Vec::with_capacity(concurrency);
    anyhow::ensure!(!addrs.is_empty(), "no address to send requests to");
    for i in 0..concurrency {
        let start = Arc::clone(&start);
        // Thread i sends to the i-th address, round robin: an even spread.
        let addr = addrs[i % addrs.len()];
        threads.push(ns.spawn(move || {
            if let Some(cpu) = cpu {
                pin_current_thread(cpu);
            }
            let mut figures = ThreadFigures {
                latencies_ns: Vec::with_capacity(64 * 1024),
                errors: 0,
                first_errors: Vec::new(),
            };
            let mut buf = vec![0u8; 16 * 1024];
            start.wait();
            let deadline = Instant::now() + duration;
            loop {
                let t = Instant::now();
                if t >= deadline {
                    break;
                }
                match one_request(addr, &mut buf, REQUEST_TIMEOUT) {
                    Ok(()) => figures.latencies_ns.push(t.elapsed().as_nanos() as u64),
                    Err(e) => {
                        figures.errors += 1;
                        if figures.first_errors.len() < FIRST_ERRORS_KEPT {
                            figures.first_errors.push(format!("{addr}: {e}"));
                        }
                    }
                }
            }
            figures
        })?);
    }
    start.wait();
    let began = Instant::now();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let figures = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a load generator thread panicked"))?;
        latencies.extend(figures.latencies_ns);
        errors += figures.errors;
        for e in figures.first_errors {
            println!("    failed request to {e}");
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(RunFigures {
        requests_per_s: latencies.len() as f64 / elapsed,
        p50_us: percentile_us(&latencies, 50.0),
        p99_us: percentile_us(&latencies, 99.0),
        errors,
        requests: latencies.len() as u64,
    })
}

/// `wrk -t1 -c{concurrency} -d{secs}s --latency -s SCRIPT` in `ns`, pinned to `cpu`: keep-alive
/// requests, over `scheme` (`http`, or `https`: wrk's TLS, which checks no certificate).
/// wrk takes whole seconds: `duration` is rounded (at least 1 s).
pub fn wrk(
    wrk: &Path,
    ns: &Netns,
    scheme: &str,
    addrs: &[SocketAddr],
    concurrency: usize,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<RunFigures> {
    let secs = duration.as_secs_f64().round().max(1.0) as u64;
    let first = *addrs.first().context("no address to send requests to")?;
    let url = format!("{scheme}://{first}/");
    // One wrk thread per address (one for every target measured with keep-alive), each
    // with its share of the connections; a script gives thread i the i-th address.
    let script = std::env::temp_dir().join(format!(
        "lb-bench-wrk-{}-{}.lua",
        std::process::id(),
        ns.name()
    ));
    let list: Vec<String> = addrs
        .iter()
        .map(|a| format!("wrk.lookup(\"{}\", \"{}\")[1]", a.ip(), a.port()))
        .collect();
    std::fs::write(
        &script,
        format!(
            "local addrs = nil\nlocal n = 0\nfunction setup(thread)\n  \
             if addrs == nil then addrs = {{ {} }} end\n  \
             thread.addr = addrs[(n % #addrs) + 1]\n  n = n + 1\nend\n",
            list.join(", ")
        ),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    let threads = addrs.len().min(concurrency.max(1));
    let args = [
        "netns".to_string(),
        "exec".to_string(),
        ns.name().to_string(),
        wrk.display().to_string(),
        format!("-t{threads}"),
        format!("-c{}", concurrency.max(1)),
        format!("-d{secs}s"),
        "--timeout".to_string(),
        format!("{}s", REQUEST_TIMEOUT.as_secs()),
        "--latency".to_string(),
        "-s".to_string(),
        script.display().to_string(),
        url.clone(),
    ];
    let output = on_cpu(cpu, || Command::new("ip").args(&args).output());
    let _ = std::fs::remove_file(&script);
    let output = output.with_context(|| format!("starting wrk in netns {}", ns.name()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk {url} in netns {} failed ({}): {}{stdout}",
            ns.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&stdout).with_context(|| format!("reading wrk's output for {url}:\n{stdout}"))
}

/// A wrk duration (`123.45us`, `1.23ms`, `1.00s`, `2.00m`) in µs.
fn wrk_time_us(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("not a number: {text:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(number * scale)
}

/// The figures in wrk's `--latency` report. Errors are its socket errors (connect, read,
/// write, timeout) and its non-2xx/3xx responses; those responses are not counted as
/// completed requests.
fn parse_wrk(out: &str) -> Result<RunFigures> {
    let (mut rate, mut p50, mut p99, mut total) = (None, None, None, None);
    let (mut socket_errors, mut non_2xx) = (0u64, 0u64);
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", r] => rate = Some(r.parse::<f64>()?),
            ["50%", t] => p50 = Some(wrk_time_us(t)?),
            ["99%", t] => p99 = Some(wrk_time_us(t)?),
            [n, "requests", "in", ..] => total = Some(n.parse::<u64>()?),
            ["Non-2xx", "or", "3xx", "responses:", n] => non_2xx = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                // `connect 0, read 0, write 0, timeout 0`
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        socket_errors += n.trim_end_matches(',').parse::<u64>()?;
                    }
                }
            }
            _ => {}
        }
    }
    let (Some(rate), Some(p50), Some(p99), Some(total)) = (rate, p50, p99, total) else {
        bail!("no Requests/sec, 50%, 99% or request count line");
    };
    // wrk's rate counts every response; keep only the good ones.
    let good = total.saturating_sub(non_2xx);
    Ok(RunFigures {
        requests_per_s: if total > 0 {
            rate * good as f64 / total as f64
        } else {
            0.0
        },
        p50_us: p50,
        p99_us: p99,
        errors: socket_errors + non_2xx,
        requests: good,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_report() {
        let out = "Running 1s test @ http://10.200.1.2:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   411.12us  120.31us   3.21ms   90.00%
    Req/Sec    38.51k     1.20k   40.00k    80.00%
  Latency Distribution
     50%  390.00us
     75%  420.00us
     90%  500.00us
     99%    1.02ms
  40000 requests in 1.00s, 5.92MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  40000.00
Transfer/sec:      5.91MB
";
        let f = parse_wrk(out).unwrap();
        assert_eq!(f.requests_per_s, 39996.0);
        assert_eq!(f.p50_us, 390.0);
        assert_eq!(f.p99_us, 1020.0);
        assert_eq!(f.errors, 7);
        assert_eq!(f.requests, 39996);
    }

    #[test]
    fn percentiles_by_rank() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&v, 50.0), 50.0);
        assert_eq!(percentile_us(&v, 99.0), 99.0);
        assert_eq!(percentile_us(&[], 99.0), 0.0);
    }
}
