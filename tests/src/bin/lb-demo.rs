//! `cargo xtask run`: a live local sandbox of Istio's locality failover task.
//!
//! Builds the seed's topology as network namespaces: a client at region1/zone1, a node
//! running the real `lb agent` binary (with the seed's DestinationRule verbatim and the
//! admin endpoint on 127.0.0.1:15000), and one HelloWorld backend in each of region1/zone1,
//! region1/zone2, region2/zone3 and region3/zone4. A background thread calls the VIP's
//! `/hello` on a new connection each time (20 calls per second); once a second the view
//! shows which locality answers, each locality's share of the last seconds, the failed
//! calls, and the endpoint states from the agent's `GET /services`.
//!
//! Keys (stdin, or the control FIFO from another terminal): `d1`..`d4` drains a backend
//! (its listener closes, so its kernel refuses new connections, as Envoy's
//! `drain_listeners` in the task), `r1`..`r4` restores it, `e1`..`e4` / `u1`..`u4` ejects
//! or un-ejects it through the admin endpoint, `q` quits. `--script "drain 1; wait 2"`
//! runs steps instead and prints a summary. Ctrl-C, `q` and the end of a script remove
//! everything the sandbox made (namespaces, agent, files).

use std::{
    collections::VecDeque,
    fmt::Write as _,
    fs::File,
    io::{self, IsTerminal as _, Read as _, Write as _},
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{write_atomically, AgentProcess, TempDir},
    clients::http_post_with,
    http_get,
    seed::{self, service_entry, DESTINATION_RULE, HELLO_PORT, HOST, LOCALITIES, NODE},
    topology::{backend_addr, TestBed, BACKEND_HTTP_PORT, VIP},
    Netns, DEFAULT_TIMEOUT,
};

#[derive(Parser)]
#[command(
    about = "A live sandbox of Istio's locality failover task, with lb as the load balancer",
    long_about = "A live sandbox of Istio's locality failover task, with lb as the load \
        balancer.\n\n\
        Builds a client (region1/zone1), a node running `lb agent` with the task's \
        DestinationRule, and HelloWorld in region1/zone1, region1/zone2, region2/zone3 and \
        region3/zone4, as network namespaces. The client calls the VIP's /hello on a new \
        connection 20 times a second; the view shows which locality answers and lb's \
        endpoint states, refreshed every second.\n\n\
        Keys: d1..d4 drain a backend (its listener closes), r1..r4 restore it, e1..e4 / \
        u1..u4 eject / un-eject it through lb's admin endpoint, q quits (Ctrl-C too). \
        Everything is removed at the end. Needs root."
)]
struct Args {
    /// Run these steps instead of reading keys, print the view as plain lines and a
    /// summary, then exit: steps separated by `;`, each `drain N`, `restore N`, `eject N`,
    /// `uneject N` (or the keys `dN`, `rN`, `eN`, `uN`) or `wait SECONDS`.
    /// Example: "wait 2; drain 1; wait 2; drain 2; wait 2; restore 1; wait 2"
    #[arg(long, value_name = "STEPS")]
    script: Option<String>,
    /// Attach lb with XDP instead of TC (client side and backend-facing interfaces).
    #[arg(long)]
    xdp: bool,
    /// Calls per second the client makes (each on a new connection).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rate: u32,
    /// Seconds each locality's share is computed over.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    window: u64,
}

// ---- the seed scenario (as tests/tests/locality_failover.rs builds it) ----

const ADMIN: &str = "127.0.0.1:15000";

/// The name a locality goes by in the view: `region1.zone1`, as HelloWorld's version.
fn locality_name(i: usize) -> String {
    let (region, zone) = LOCALITIES[i];
    format!("{region}.{zone}")
}

/// What HelloWorld in backend `i` (from 0) answers.
fn hello(i: usize) -> String {
    let (region, zone) = LOCALITIES[i];
    format!("Hello version: {region}.{zone}, instance: helloworld-{region}.{zone}")
}

fn vip() -> SocketAddr {
    (VIP, HELLO_PORT).into()
}

/// `IP:PORT` of backend `i` (from 0), as the admin endpoint names it.
fn endpoint(i: usize) -> String {
    format!("{}:{BACKEND_HTTP_PORT}", backend_addr(i as u8 + 1))
}

/// The ServiceEntry for helloworld with one endpoint per locality, the node document and
/// the seed's DestinationRule.
fn seed_config() -> String {
    format!(
        "{NODE}---\n{}---\n{DESTINATION_RULE}",
        service_entry(&seed::endpoints())
    )
}

// ---- signals: Ctrl-C, SIGTERM and SIGHUP end the main loop, so everything drops ----

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const QUIT_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for signal in QUIT_SIGNALS {
        // SAFETY: the handler only stores to an atomic; `signal` has no other precondition.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// Keeps the quit signals away from the calling thread (they go to the main thread).
fn block_quit_signals() {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in QUIT_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---- the client: calls the VIP's /hello on a new connection, `rate` times a second ----

#[derive(Clone, Debug)]
enum Outcome {
    /// Answered by backend i (from 0).
    Served(usize),
    Failed(String),
}

#[derive(Clone, Debug)]
struct Call {
    /// When the call started.
    at: Instant,
    /// The phase it started in (a phase begins at each action).
    phase: usize,
    outcome: Outcome,
}

#[derive(Default)]
struct ClientShared {
    stop: AtomicBool,
    phase: AtomicUsize,
    /// Held by the client during each call and by an action while it changes a backend
    /// or lb, so an action happens between calls: no call is cut by a drain (Envoy's
    /// `drain_listeners` lets open requests finish too), and each call belongs to exactly
    /// one phase.
    gate: Mutex<()>,
    calls: Mutex<Vec<Call>>,
}

struct Client {
    shared: Arc<ClientShared>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    fn start(ns: &Netns, rate: u32) -> Result<Self> {
        let shared = Arc::new(ClientShared::default());
        let interval = Duration::from_secs(1) / rate;
        let thread = ns.spawn({
            let shared = Arc::clone(&shared);
            move || call_loop(&shared, interval)
        })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Every call so far.
    fn calls(&self) -> Vec<Call> {
        lock(&self.shared.calls).clone()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

fn call_loop(shared: &ClientShared, interval: Duration) {
    // Ctrl-C is for the main thread: here it would interrupt a call (EINTR), which would
    // count as failed.
    block_quit_signals();
    let names: Vec<String> = (0..LOCALITIES.len()).map(hello).collect();
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now < next {
            thread::sleep((next - now).min(Duration::from_millis(50)));
            continue;
        }
        // Late (a slow call): go on from now rather than catch up in a burst.
        next = (next + interval).max(now);
        let (at, phase, answer) = {
            let _gate = lock(&shared.gate);
            let phase = shared.phase.load(Ordering::SeqCst);
            let at = Instant::now();
            (at, phase, http_get(vip(), "/hello", DEFAULT_TIMEOUT))
        };
        let outcome = match answer {
            Ok(body) => match names.iter().position(|n| *n == body) {
                Some(i) => Outcome::Served(i),
                None => Outcome::Failed(format!("unexpected answer {body:?}")),
            },
            Err(e) => Outcome::Failed(e.root_cause().to_string()),
        };
        lock(&shared.calls).push(Call { at, phase, outcome });
    }
}

// ---- actions: keys, script steps ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Close backend i's listener (from 0): its kernel refuses new connections.
    Drain(usize),
    /// Open it again.
    Restore(usize),
    /// `POST /endpoints/IP:PORT/eject` on lb's admin endpoint.
    Eject(usize),
    /// `POST /endpoints/IP:PORT/uneject`.
    Uneject(usize),
    Quit,
}

impl Action {
    /// `d1`, `r2`, `e3`, `u4`, `q`.
    fn key(self) -> String {
        match self {
            Action::Drain(i) => format!("d{}", i + 1),
            Action::Restore(i) => format!("r{}", i + 1),
            Action::Eject(i) => format!("e{}", i + 1),
            Action::Uneject(i) => format!("u{}", i + 1),
            Action::Quit => "q".into(),
        }
    }

    /// `drain 1`, as the summary names a phase.
    fn label(self) -> String {
        match self {
            Action::Drain(i) => format!("drain {}", i + 1),
            Action::Restore(i) => format!("restore {}", i + 1),
            Action::Eject(i) => format!("eject {}", i + 1),
            Action::Uneject(i) => format!("uneject {}", i + 1),
            Action::Quit => "quit".into(),
        }
    }

    /// The action of a verb's first letter and a backend number (1..4).
    fn of(verb: char, backend: char) -> Option<Action> {
        let i = backend.to_digit(10)? as usize;
        if !(1..=LOCALITIES.len()).contains(&i) {
            return None;
        }
        let i = i - 1;
        Some(match verb.to_ascii_lowercase() {
            'd' => Action::Drain(i),
            'r' => Action::Restore(i),
            'e' => Action::Eject(i),
            'u' => Action::Uneject(i),
            _ => return None,
        })
    }
}

/// What the key readers send the main loop.
#[derive(Debug, PartialEq)]
enum Input {
    Action(Action),
    /// Typed so far (a verb waiting for its number), to echo.
    Pending(String),
    Invalid(String),
    Closed(&'static str),
}

/// Turns keys into actions: a verb letter then a backend number (`d1`), or `q`. Enter,
/// spaces and `;` separate; no Enter is needed.
#[derive(Default)]
struct KeyParser {
    verb: Option<char>,
}

impl KeyParser {
    fn feed(&mut self, c: char) -> Option<Input> {
        let verb = self.verb.take();
        match (verb, c) {
            // Backspace, DEL: forget the verb.
            (_, '\u{8}' | '\u{7f}') => Some(Input::Pending(String::new())),
            (None, c) if c.is_whitespace() || c == ';' => None,
            (Some(v), c) if c.is_whitespace() || c == ';' => Some(Input::Invalid(format!(
                "{v}: add a backend number 1..{}",
                LOCALITIES.len()
            ))),
            (None, 'q' | 'Q') => Some(Input::Action(Action::Quit)),
            (None, 'd' | 'r' | 'e' | 'u' | 'D' | 'R' | 'E' | 'U') => {
                self.verb = Some(c);
                Some(Input::Pending(c.to_string()))
            }
            (None, c) => Some(Input::Invalid(format!(
                "{}: not a key (d1..d4, r1..r4, e1..e4, u1..u4, q)",
                c.escape_default()
            ))),
            (Some(v), c) => Some(match Action::of(v, c) {
                Some(action) => Input::Action(action),
                None => Input::Invalid(format!(
                    "{v}{}: not a key (backends are 1..{})",
                    c.escape_default(),
                    LOCALITIES.len()
                )),
            }),
        }
    }
}

/// Reads keys from `from` until it ends or the main loop is gone.
fn read_keys(mut from: impl io::Read, tx: &mpsc::Sender<Input>, what: &'static str) {
    let mut parser = KeyParser::default();
    let mut buf = [0u8; 64];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Input::Closed(what));
                return;
            }
            Ok(n) => n,
        };
        for c in String::from_utf8_lossy(&buf[..n]).chars() {
            if let Some(input) = parser.feed(c) {
                if tx.send(input).is_err() {
                    return;
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Act(Action),
    Wait(Duration),
}

/// `drain 1; wait 2; restore 1` (also `d1`, `wait 1.5s`; `;` or newlines between steps).
fn parse_script(script: &str) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for step in script.split([';', '\n']).map(str::trim) {
        if step.is_empty() {
            continue;
        }
        let words: Vec<&str> = step.split_whitespace().collect();
        let parsed = match words.as_slice() {
            ["wait" | "sleep", secs] => {
                let secs: f64 = secs
                    .trim_end_matches('s')
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
                    .with_context(|| format!("step {step:?}: not a number of seconds"))?;
                Step::Wait(Duration::from_secs_f64(secs))
            }
            [verb @ ("drain" | "restore" | "eject" | "uneject"), n] => {
                let c = n.chars().next().filter(|_| n.len() == 1);
                let action = c.and_then(|c| Action::of(verb.chars().next().unwrap(), c));
                Step::Act(action.with_context(|| {
                    format!(
                        "step {step:?}: the backend is a number 1..{}",
                        LOCALITIES.len()
                    )
                })?)
            }
            [key] if key.len() == 2 => {
                let mut c = key.chars();
                let action = Action::of(c.next().unwrap(), c.next().unwrap());
                Step::Act(action.with_context(|| format!("step {step:?}: not a step"))?)
            }
            _ => bail!(
                "step {step:?}: expected drain N, restore N, eject N, uneject N or wait SECONDS"
            ),
        };
        steps.push(parsed);
    }
    ensure!(!steps.is_empty(), "the script has no steps");
    Ok(steps)
}

// ---- lb's admin endpoint, from inside the node ----

/// One endpoint as `GET /services` shows it.
#[derive(Clone, Debug, Default)]
struct EndpointView {
    priority: Option<u64>,
    share: f64,
    ejected: bool,
    draining: bool,
}

impl EndpointView {
    fn state(&self) -> &'static str {
        match (self.ejected, self.draining) {
            (true, true) => "ejected+draining",
            (true, false) => "ejected",
            (false, true) => "draining",
            (false, false) => "active",
        }
    }
}

/// What the view shows of `GET /services`.
#[derive(Clone, Debug, Default)]
struct AdminView {
    /// Per backend, its entry (none if the agent does not list it).
    endpoints: Vec<Option<EndpointView>>,
    priority_loads: Vec<u64>,
    /// Failover reactions (kernel saw the failure → table live): count, p50, max (µs).
    reactions: (u64, Option<u64>, Option<u64>),
}

fn fetch_admin_view(node: &Netns) -> Result<AdminView> {
    let admin: SocketAddr = ADMIN.parse().expect("a socket address");
    let text = node.run(|| http_get(admin, "/services", Duration::from_secs(1)))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).context("GET /services is not JSON")?;
    let services = json["services"].as_array().cloned().unwrap_or_default();
    let service = services
        .iter()
        .find(|s| s["name"].as_str().is_some_and(|n| n.contains(HOST)))
        .or_else(|| services.first());
    let mut view = AdminView {
        endpoints: vec![None; LOCALITIES.len()],
        ..AdminView::default()
    };
    if let Some(service) = service {
        view.priority_loads = service["priority_loads"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        for e in service["endpoints"].as_array().into_iter().flatten() {
            let Some(i) = (0..LOCALITIES.len()).find(|&i| e["address"] == endpoint(i)) else {
                continue;
            };
            view.endpoints[i] = Some(EndpointView {
                priority: e["priority"].as_u64(),
                share: e["share"].as_f64().unwrap_or(0.0),
                ejected: e["ejected"].as_bool().unwrap_or(false),
                draining: e["draining"].as_bool().unwrap_or(false),
            });
        }
    }
    let r = &json["failover_reaction"];
    view.reactions = (
        r["count"].as_u64().unwrap_or(0),
        r["p50_us"].as_u64(),
        r["max_us"].as_u64(),
    );
    Ok(view)
}

/// `POST path` to the admin endpoint from inside the node, with the agent's token
/// (`x-lb-token`, read from its token file when there is one); the answer's body.
fn admin_post(node: &Netns, path: &str, token_file: &Path) -> Result<String> {
    let token = std::fs::read_to_string(token_file)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let headers: Vec<(&str, &str)> = token.iter().map(|t| ("x-lb-token", t.as_str())).collect();
    let admin: SocketAddr = ADMIN.parse().expect("a socket address");
    let answer = node.run(|| http_post_with(admin, path, &headers, DEFAULT_TIMEOUT))?;
    Ok(answer.trim().to_owned())
}

// ---- the agent's log, in a file next to the configuration ----

/// Runs `f` (which starts the agent) with this process's stdout and stderr going to
/// `log`, so the agent, which inherits them, writes its log there instead of over the
/// view; they are restored before returning.
fn with_output_to<T>(log: &File, f: impl FnOnce() -> T) -> Result<T> {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    let mut saved = Vec::new();
    for fd in [1, 2] {
        // A close-on-exec copy, so the agent does not inherit the real terminal too.
        // SAFETY: fcntl on a descriptor number; failure is reported as -1.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        ensure!(copy >= 0, "saving fd {fd}: {}", io::Error::last_os_error());
        saved.push((fd, copy));
        // SAFETY: both descriptors are open.
        if unsafe { libc::dup2(log.as_raw_fd(), fd) } < 0 {
            let e = io::Error::last_os_error();
            restore_fds(&saved);
            bail!("redirecting fd {fd}: {e}");
        }
    }
    let result = f();
    restore_fds(&saved);
    Ok(result)
}

fn restore_fds(saved: &[(i32, i32)]) {
    for &(fd, copy) in saved {
        // SAFETY: `copy` is a descriptor this process opened and owns.
        unsafe {
            libc::dup2(copy, fd);
            libc::close(copy);
        }
    }
}

/// The agent's log lines as they come.
struct LogTail {
    file: File,
    partial: String,
    last: VecDeque<String>,
}

impl LogTail {
    fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            file: File::open(path).with_context(|| format!("opening {}", path.display()))?,
            partial: String::new(),
            last: VecDeque::new(),
        })
    }

    /// Lines written since the last call (without env_logger's timestamp).
    fn new_lines(&mut self) -> Vec<String> {
        let mut text = String::new();
        let _ = self.file.read_to_string(&mut text);
        // At the end of the file, a later read gets what the agent writes meanwhile.
        if text.is_empty() {
            return Vec::new();
        }
        self.partial.push_str(&text);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            let line = short_log_line(line.trim_end());
            // The periodic counters (--stats-interval) would push the events out.
            if line.contains("] counters:") {
                continue;
            }
            if self.last.len() == 4 {
                self.last.pop_front();
            }
            self.last.push_back(line.clone());
            lines.push(line);
        }
        lines
    }
}

/// `[2026-01-01T00:00:00Z INFO  lb::agent] text` → `INFO  lb::agent] text`.
fn short_log_line(line: &str) -> String {
    match line.strip_prefix('[').and_then(|rest| rest.split_once(' ')) {
        Some((stamp, rest)) if stamp.contains('T') => rest.to_owned(),
        _ => line.to_owned(),
    }
}

// ---- the terminal ----

/// The terminal width, if stdout is one.
fn terminal_width() -> Option<usize> {
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a `winsize` into `size`, which outlives the call.
    let rc = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(size.ws_col as usize)
}

/// Keys act as they are typed: stdin's terminal without line buffering and echo while it
/// lives (Ctrl-C still interrupts).
struct RawKeys {
    saved: libc::termios,
}

impl RawKeys {
    fn enter() -> Option<Self> {
        if !io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: `t` is a valid termios for fd 0.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawKeys {
    fn drop(&mut self) {
        // SAFETY: `saved` came from tcgetattr on the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Redraws the view in place on a terminal (cursor hidden while it lives), or appends
/// plain lines.
struct Screen {
    tty: bool,
}

impl Screen {
    fn new(tty: bool) -> Self {
        if tty {
            print!("\x1b[?25l\x1b[2J");
        }
        Self { tty }
    }

    fn draw(&self, lines: &[String]) {
        let width = terminal_width().unwrap_or(usize::MAX);
        let mut out = String::from("\x1b[H");
        for line in lines {
            out.extend(line.chars().take(width));
            out.push_str("\x1b[K\n");
        }
        out.push_str("\x1b[J");
        let mut stdout = io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        if self.tty {
            print!("\x1b[?25h");
            let _ = io::stdout().flush();
        }
    }
}

// ---- the sandbox ----

struct Phase {
    label: String,
    started: Instant,
}

/// Counts of calls per backend and failed calls.
#[derive(Clone, Debug, Default)]
struct Tally {
    served: [usize; LOCALITIES.len()],
    failed: usize,
}

impl Tally {
    fn add(&mut self, call: &Call) {
        match call.outcome {
            Outcome::Served(i) => self.served[i] += 1,
            Outcome::Failed(_) => self.failed += 1,
        }
    }

    fn total(&self) -> usize {
        self.served.iter().sum::<usize>() + self.failed
    }
}

/// Field order is drop order: the client stops calling, the agent stops, then the test
/// bed (servers, namespaces) and the files go.
struct Sandbox {
    client: Client,
    agent: AgentProcess,
    bed: TestBed,
    dir: TempDir,
    log: LogTail,
    mode: AttachMode,
    window: Duration,
    rate: u32,
    started: Instant,
    phases: Vec<Phase>,
    messages: VecDeque<String>,
    typed: String,
    admin: Result<AdminView, String>,
}

impl Sandbox {
    fn start(args: &Args) -> Result<Self> {
        let mode = if args.xdp {
            AttachMode::Xdp
        } else {
            AttachMode::Tc
        };
        let names: Vec<String> = (0..LOCALITIES.len()).map(hello).collect();
        println!(
            "lb-demo: creating the namespaces: client (region1/zone1), node, and HelloWorld \
             in {} ...",
            (0..LOCALITIES.len())
                .map(locality_name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut bed = TestBed::with_backends(mode, &names)?;
        // As in the seed test: lb also on every backend-facing interface in this mode,
        // where refusals arrive and are re-sent as SYNs.
        for i in &mut bed.interfaces {
            if i.name.starts_with("nb") {
                i.mode = mode;
            }
        }
        println!("lb-demo: namespaces: {}", namespace_names(&bed).join(" "));
        let dir = TempDir::new("lb-demo")?;
        let config = dir.0.join("helloworld.yaml");
        write_atomically(&config, &seed_config())?;
        let log_path = dir.0.join("agent.log");
        let log_file =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        println!(
            "lb-demo: starting `lb agent` in {} ({mode:?}), admin on {ADMIN}, log in {}",
            bed.node.name(),
            log_path.display()
        );
        let mut agent = with_output_to(&log_file, || {
            AgentProcess::start_with(&bed, &config, &["--admin", ADMIN])
        })??;
        let mut log = LogTail::open(&log_path)?;

        println!(
            "lb-demo: waiting for the agent to program the VIP {} ...",
            vip()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = bed
                .client
                .run(|| http_get(vip(), "/hello", Duration::from_millis(500)));
            if answer.is_ok() {
                break;
            }
            if interrupted() {
                bail!("interrupted");
            }
            let exited = !agent.running();
            if exited || Instant::now() > deadline {
                log.new_lines();
                bail!(
                    "{}; the agent's log ends with:\n  {}",
                    if exited {
                        "the agent exited".to_string()
                    } else {
                        format!("the VIP {} did not answer within 30 s", vip())
                    },
                    Vec::from(log.last.clone()).join("\n  ")
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        let client = Client::start(&bed.client, args.rate)?;
        let now = Instant::now();
        Ok(Self {
            client,
            agent,
            bed,
            dir,
            log,
            mode,
            window: Duration::from_secs(args.window),
            rate: args.rate,
            started: now,
            phases: vec![Phase {
                label: "start".into(),
                started: now,
            }],
            messages: VecDeque::new(),
            typed: String::new(),
            admin: Err("not fetched yet".into()),
        })
    }

    fn control_fifo(&self) -> PathBuf {
        self.dir.0.join("control")
    }

    fn note(&mut self, message: String) {
        if self.messages.len() == 4 {
            self.messages.pop_front();
        }
        self.messages.push_back(message);
    }

    fn refresh_admin(&mut self) {
        self.admin = fetch_admin_view(&self.bed.node).map_err(|e| format!("{e:#}"));
    }

    /// Does `action` between two calls and starts a new phase; what happened, in words.
    fn act(&mut self, action: Action) -> Result<String> {
        let shared = Arc::clone(&self.client.shared);
        let _gate = lock(&shared.gate);
        let result = match action {
            Action::Drain(i) => {
                let backend = &mut self.bed.backends[i];
                if !backend.http.serving() {
                    return Ok(format!("backend {} is drained already", i + 1));
                }
                backend.http.stop();
                Ok(format!(
                    "drained backend {} ({}): its listener is closed, its kernel refuses \
                     new connections",
                    i + 1,
                    locality_name(i)
                ))
            }
            Action::Restore(i) => {
                let backend = &mut self.bed.backends[i];
                if backend.http.serving() {
                    return Ok(format!("backend {} is serving already", i + 1));
                }
                backend.http.start_again(&backend.ns).map(|()| {
                    format!(
                        "restored backend {} ({}): listening again (lb sends it traffic \
                             again once it is not ejected: u{})",
                        i + 1,
                        locality_name(i),
                        i + 1
                    )
                })
            }
            Action::Eject(i) | Action::Uneject(i) => {
                let verb = if matches!(action, Action::Eject(_)) {
                    "eject"
                } else {
                    "uneject"
                };
                let path = format!("/endpoints/{}/{verb}", endpoint(i));
                admin_post(&self.bed.node, &path, &self.agent.admin_token_file)
                    .map(|answer| format!("admin POST {path}: {answer}"))
            }
            Action::Quit => return Ok("quit".into()),
        };
        if result.is_ok() {
            let phase = self.phases.len();
            self.phases.push(Phase {
                label: action.label(),
                started: Instant::now(),
            });
            shared.phase.store(phase, Ordering::SeqCst);
        }
        result
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Tallies of the last `window` and of the last second, the total, and the last
    /// failure.
    fn recent(&self, calls: &[Call]) -> (Tally, Tally, Tally, Option<(f64, String)>) {
        let now = Instant::now();
        let (mut window, mut second, mut total) =
            (Tally::default(), Tally::default(), Tally::default());
        let mut last_failure = None;
        for call in calls {
            let age = now.saturating_duration_since(call.at);
            total.add(call);
            if age <= self.window {
                window.add(call);
            }
            if age <= Duration::from_secs(1) {
                second.add(call);
            }
            if let Outcome::Failed(e) = &call.outcome {
                last_failure = Some((age.as_secs_f64(), e.clone()));
            }
        }
        (window, second, total, last_failure)
    }

    fn answering(second: &Tally) -> String {
        let names: Vec<String> = (0..LOCALITIES.len())
            .filter(|&i| second.served[i] > 0)
            .map(locality_name)
            .collect();
        match (names.is_empty(), second.failed) {
            (true, 0) => "nobody yet".into(),
            (true, _) => "nobody: calls are failing".into(),
            _ => names.join(" + "),
        }
    }

    fn endpoint_columns(&self, i: usize) -> (String, String, String) {
        match &self.admin {
            Ok(view) => match &view.endpoints[i] {
                Some(e) => (
                    e.priority.map_or("-".into(), |p| p.to_string()),
                    format!("{:.1}%", e.share * 100.0),
                    e.state().into(),
                ),
                None => ("-".into(), "-".into(), "not listed".into()),
            },
            Err(_) => ("?".into(), "?".into(), "?".into()),
        }
    }

    /// For a drained backend lb still sends new connections to: what happens to them.
    fn resteer_note(&self, i: usize) -> Option<String> {
        let view = self.admin.as_ref().ok()?.endpoints[i].as_ref()?;
        (!self.bed.backends[i].http.serving() && !view.ejected && view.share > 0.0).then(|| {
            format!(
                "{}: drained but not ejected (not yet, or maxEjectionPercent): lb still picks \
                 it, and the kernel re-sends each SYN it refuses to the next backend",
                i + 1
            )
        })
    }

    /// The view for a terminal.
    fn view(&self) -> Vec<String> {
        let calls = self.client.calls();
        let (window, second, total, last_failure) = self.recent(&calls);
        let secs = self.started.elapsed().as_secs();
        let mut v = Vec::new();
        v.push(format!(
            "lb sandbox: Istio's locality failover task, live{:>30}",
            format!("up {}m{:02}s", secs / 60, secs % 60)
        ));
        v.push(format!(
            "client ({}, region1/zone1) → helloworld {}  GET /hello, a new connection each, \
             {}/s",
            self.bed.client.name(),
            vip(),
            self.rate
        ));
        v.push(format!(
            "lb agent in {} ({:?}), the task's DestinationRule verbatim, admin {ADMIN}",
            self.bed.node.name(),
            self.mode
        ));
        v.push(String::new());
        v.push(format!(
            "answering now: {:<30} calls: {} answered, {} failed",
            Self::answering(&second),
            total.total() - total.failed,
            total.failed
        ));
        v.push(String::new());
        let window_title = format!("LAST {} S", self.window.as_secs());
        v.push(format!(
            " #  {:<14} {:<16} {:<9} {window_title:<29} {:>8} {:>7}  STATE (lb)",
            "LOCALITY", "BACKEND", "LISTENER", "PRIORITY", "SHARE"
        ));
        for i in 0..LOCALITIES.len() {
            let pct = percent(window.served[i], window.total());
            let bar = "█".repeat((pct / 5.0).round() as usize);
            let now = if second.served[i] > 0 { "◀" } else { " " };
            let listener = if self.bed.backends[i].http.serving() {
                "up"
            } else {
                "drained"
            };
            let (priority, share, state) = self.endpoint_columns(i);
            v.push(format!(
                " {}  {:<14} {:<16} {listener:<9} {pct:>5.1}% {bar:<20} {now} {priority:>8} \
                 {share:>7}  {state}",
                i + 1,
                locality_name(i),
                endpoint(i)
            ));
        }
        if window.failed > 0 {
            v.push(format!(
                "    {:<14} {:<16} {:<9} {:>5.1}%",
                "failed",
                "",
                "",
                percent(window.failed, window.total())
            ));
        }
        for i in 0..LOCALITIES.len() {
            if let Some(note) = self.resteer_note(i) {
                v.push(format!("    {note}"));
            }
        }
        v.push(String::new());
        match &self.admin {
            Ok(view) => {
                let (n, p50, max) = view.reactions;
                let ms = |us: Option<u64>| {
                    us.map_or("-".into(), |us| format!("{:.2} ms", us as f64 / 1000.0))
                };
                v.push(format!(
                    "lb: priority loads {:?}; failover reactions (kernel saw the failure → new \
                     table live): {n}, p50 {}, max {}",
                    view.priority_loads,
                    ms(p50),
                    ms(max)
                ));
            }
            Err(e) => v.push(format!("lb admin GET /services: {e}")),
        }
        v.push(match &last_failure {
            Some((ago, e)) => format!("last failed call: {ago:.1} s ago: {e}"),
            None => "failed calls: none".into(),
        });
        v.push(String::new());
        for m in &self.messages {
            v.push(format!("  {m}"));
        }
        v.push(format!("> {}", self.typed));
        v.push(String::new());
        v.push(
            "keys: d1..d4 drain a backend · r1..r4 restore it · e1..e4 eject · u1..u4 \
             un-eject (lb admin) · q quit (Ctrl-C too)"
                .into(),
        );
        v.push("from another terminal, as root:".into());
        v.push(format!(
            "  echo d2 > {}    # any key above",
            self.control_fifo().display()
        ));
        v.push(format!(
            "  ip netns exec {} curl -s {}/hello    # a call",
            self.bed.client.name(),
            vip()
        ));
        v.push(format!(
            "  ip netns exec {} curl -s {ADMIN}/services    # lb's view",
            self.bed.node.name()
        ));
        v.push(format!(
            "  ip netns exec {} curl -s -X POST -H \"x-lb-token: $(cat {})\" \\",
            self.bed.node.name(),
            self.agent.admin_token_file.display(),
        ));
        v.push(format!(
            "      {ADMIN}/endpoints/{}/uneject    # or eject, drain, undrain",
            endpoint(0)
        ));
        v.push(String::new());
        v.push(format!(
            "agent log ({}):",
            self.dir.0.join("agent.log").display()
        ));
        for line in &self.log.last {
            v.push(format!("  {line}"));
        }
        v
    }

    /// The view as plain lines, for logs and pipes.
    fn plain_view(&self) -> Vec<String> {
        let calls = self.client.calls();
        let (window, second, total, _) = self.recent(&calls);
        let shares: Vec<String> = (0..LOCALITIES.len())
            .map(|i| {
                format!(
                    "{} {:.0}%",
                    locality_name(i),
                    percent(window.served[i], window.total())
                )
            })
            .collect();
        let endpoints: Vec<String> = (0..LOCALITIES.len())
            .map(|i| {
                let (priority, share, state) = self.endpoint_columns(i);
                let listener = if self.bed.backends[i].http.serving() {
                    "up"
                } else {
                    "drained"
                };
                format!(
                    "{} {} listener {listener}, lb {state} priority {priority} share {share}",
                    i + 1,
                    locality_name(i)
                )
            })
            .collect();
        let mut v = vec![
            format!(
                "[{:6.1}s] answering: {} | last {} s: {} | calls {}, failed {}",
                self.elapsed(),
                Self::answering(&second),
                self.window.as_secs(),
                shares.join(", "),
                total.total(),
                total.failed
            ),
            format!("          endpoints: {}", endpoints.join("; ")),
        ];
        if let Err(e) = &self.admin {
            v.push(format!("          lb admin GET /services: {e}"));
        }
        for i in 0..LOCALITIES.len() {
            if let Some(note) = self.resteer_note(i) {
                v.push(format!("          {note}"));
            }
        }
        v
    }

    /// Calls per locality per phase, and the failed calls.
    fn summary(&self) -> Vec<String> {
        let calls = self.client.calls();
        let mut per_phase = vec![Tally::default(); self.phases.len()];
        let mut total = Tally::default();
        for call in &calls {
            per_phase[call.phase].add(call);
            total.add(call);
        }
        let end = calls.last().map_or_else(Instant::now, |c| c.at);
        let mut v = vec![
            "summary: calls per locality in each phase (a phase starts at each action)".into(),
        ];
        let mut header = format!("  {:<6} {:<12} {:>6}", "phase", "action", "secs");
        for i in 0..LOCALITIES.len() {
            let _ = write!(header, " {:>14}", locality_name(i));
        }
        header.push_str("  failed");
        v.push(header);
        let row = |label: String, secs: f64, t: &Tally| {
            let mut row = format!("{label} {secs:>6.1}");
            for n in t.served {
                let _ = write!(row, " {n:>14}");
            }
            let _ = write!(row, "  {:>6}", t.failed);
            row
        };
        for (n, (phase, t)) in self.phases.iter().zip(&per_phase).enumerate() {
            let until = self.phases.get(n + 1).map_or(end, |p| p.started);
            let secs = until.saturating_duration_since(phase.started).as_secs_f64();
            v.push(row(format!("  {n:<6} {:<12}", phase.label), secs, t));
        }
        let secs = end.saturating_duration_since(self.started).as_secs_f64();
        v.push(row(format!("  {:<6} {:<12}", "total", ""), secs, &total));
        v.push(format!(
            "failed calls: {} of {}",
            total.failed,
            total.total()
        ));
        for call in calls
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .take(5)
        {
            if let Outcome::Failed(e) = &call.outcome {
                v.push(format!(
                    "  at {:.1} s (phase {}): {e}",
                    call.at
                        .saturating_duration_since(self.started)
                        .as_secs_f64(),
                    call.phase
                ));
            }
        }
        v
    }

    /// Runs the script's steps, printing the view as plain lines every second.
    fn run_script(&mut self, steps: &[Step]) -> Result<()> {
        let mut next_view = Instant::now();
        for step in steps {
            match step {
                Step::Act(action) => {
                    let message = self
                        .act(*action)
                        .with_context(|| format!("step {}", action.label()))?;
                    println!("[{:6.1}s] {}: {message}", self.elapsed(), action.label());
                }
                Step::Wait(d) => {
                    let until = Instant::now() + *d;
                    loop {
                        if interrupted() {
                            println!("interrupted");
                            return Ok(());
                        }
                        for line in self.log.new_lines() {
                            println!("          agent: {line}");
                        }
                        let now = Instant::now();
                        if now >= next_view {
                            self.refresh_admin();
                            for line in self.plain_view() {
                                println!("{line}");
                            }
                            next_view = now + Duration::from_secs(1);
                        }
                        if now >= until {
                            break;
                        }
                        thread::sleep(
                            (until - now)
                                .min(next_view - now)
                                .min(Duration::from_millis(100)),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads keys from stdin and the control FIFO and redraws every second until `q`,
    /// Ctrl-C or SIGTERM.
    fn run_interactive(&mut self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        // Neither reader is joined: each blocks in read(2) until the process ends.
        thread::Builder::new().name("keys".into()).spawn({
            let tx = tx.clone();
            move || read_keys(io::stdin(), &tx, "stdin")
        })?;
        let fifo = self.control_fifo();
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
        // SAFETY: `c_path` is a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
            bail!("mkfifo {}: {}", fifo.display(), io::Error::last_os_error());
        }
        // Read and write: opening does not wait for a writer, and writers coming and
        // going never end the stream.
        let control = File::options().read(true).write(true).open(&fifo)?;
        thread::Builder::new().name("control".into()).spawn({
            let tx = tx.clone();
            move || read_keys(control, &tx, "the control FIFO")
        })?;

        let tty = io::stdout().is_terminal();
        let _keys = if tty { RawKeys::enter() } else { None };
        let screen = Screen::new(tty);
        if !tty {
            println!(
                "keys (then Enter): d1..d4 drain · r1..r4 restore · e1..e4 eject · u1..u4 \
                 un-eject · q quit; or `echo d2 > {}`",
                fifo.display()
            );
        }
        let mut next_frame = Instant::now();
        loop {
            if interrupted() {
                break;
            }
            let new_log = self.log.new_lines();
            if !tty {
                for line in new_log {
                    println!("          agent: {line}");
                }
            }
            let now = Instant::now();
            if now >= next_frame {
                self.refresh_admin();
                self.show(&screen);
                next_frame = now + Duration::from_secs(1);
            }
            let wait = next_frame
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            match rx.recv_timeout(wait) {
                Ok(Input::Action(Action::Quit)) => break,
                Ok(Input::Action(action)) => {
                    self.typed.clear();
                    let message = match self.act(action) {
                        Ok(m) => format!("{}: {m}", action.key()),
                        Err(e) => format!("{}: failed: {e:#}", action.key()),
                    };
                    if !tty {
                        println!("[{:6.1}s] {message}", self.elapsed());
                    }
                    self.note(message);
                    if tty {
                        self.refresh_admin();
                        self.show(&screen);
                    }
                }
                Ok(Input::Pending(typed)) => {
                    self.typed = typed;
                    if tty {
                        self.show(&screen);
                    }
                }
                Ok(Input::Invalid(message)) => {
                    self.typed.clear();
                    if !tty {
                        println!("[{:6.1}s] {message}", self.elapsed());
                    }
                    self.note(message);
                    if tty {
                        self.show(&screen);
                    }
                }
                Ok(Input::Closed(what)) => {
                    let message = format!("{what} closed (q in the control FIFO or Ctrl-C quits)");
                    if what == "stdin" {
                        if !tty {
                            println!("[{:6.1}s] {message}", self.elapsed());
                        }
                        self.note(message);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if tty {
            // The last frame stays on screen; the summary follows it.
            self.show(&screen);
        }
        Ok(())
    }

    fn show(&self, screen: &Screen) {
        if screen.tty {
            screen.draw(&self.view());
        } else {
            for line in self.plain_view() {
                println!("{line}");
            }
        }
    }
}

fn percent(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

fn namespace_names(bed: &TestBed) -> Vec<String> {
    let mut names = vec![bed.client.name().to_owned(), bed.node.name().to_owned()];
    names.extend(bed.backends.iter().map(|b| b.ns.name().to_owned()));
    names
}

fn run(args: &Args) -> Result<()> {
    // Before anything is built, so a typo costs nothing.
    let script = args.script.as_deref().map(parse_script).transpose()?;
    if !lb_tests::require_root() {
        bail!("the sandbox creates network namespaces and loads eBPF programs: run it as root");
    }
    let mut sandbox = Sandbox::start(args)?;
    let namespaces = namespace_names(&sandbox.bed);
    let outcome = match &script {
        Some(steps) => sandbox.run_script(steps),
        None => sandbox.run_interactive(),
    };
    sandbox.client.stop();
    println!();
    for line in sandbox.summary() {
        println!("{line}");
    }
    println!(
        "lb-demo: removing the sandbox (agent, namespaces {}, {}) ...",
        namespaces.join(" "),
        sandbox.dir.0.display()
    );
    drop(sandbox);
    let left: Vec<String> = lb_tests::run_command("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| namespaces.iter().any(|ours| ours == n))
        .map(str::to_owned)
        .collect();
    if left.is_empty() {
        println!("lb-demo: removed");
    } else {
        println!("lb-demo: still there: {}", left.join(" "));
    }
    outcome
}

fn main() -> ExitCode {
    let args = Args::parse();
    install_signal_handlers();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_make_actions() {
        let mut p = KeyParser::default();
        let inputs: Vec<Input> = "d1\nr2 e3u4 q".chars().filter_map(|c| p.feed(c)).collect();
        assert_eq!(
            inputs,
            vec![
                Input::Pending("d".into()),
                Input::Action(Action::Drain(0)),
                Input::Pending("r".into()),
                Input::Action(Action::Restore(1)),
                Input::Pending("e".into()),
                Input::Action(Action::Eject(2)),
                Input::Pending("u".into()),
                Input::Action(Action::Uneject(3)),
                Input::Action(Action::Quit),
            ]
        );
        let mut p = KeyParser::default();
        assert!(matches!(p.feed('x'), Some(Input::Invalid(_))));
        p.feed('d');
        assert!(matches!(p.feed('5'), Some(Input::Invalid(_))));
        p.feed('d');
        assert!(matches!(p.feed('\n'), Some(Input::Invalid(_))));
        assert_eq!(p.feed('\n'), None);
    }

    #[test]
    fn scripts_parse() {
        assert_eq!(
            parse_script("drain 1; wait 2; d2;\nwait 0.5s; restore 4; uneject 1; eject 3").unwrap(),
            vec![
                Step::Act(Action::Drain(0)),
                Step::Wait(Duration::from_secs(2)),
                Step::Act(Action::Drain(1)),
                Step::Wait(Duration::from_millis(500)),
                Step::Act(Action::Restore(3)),
                Step::Act(Action::Uneject(0)),
                Step::Act(Action::Eject(2)),
            ]
        );
        for bad in ["drain 5", "drain", "wait x", "fly 1", "", " ; ", "wait -1"] {
            assert!(parse_script(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn seed_config_has_the_rule_verbatim() {
        let config = seed_config();
        assert!(config.contains(DESTINATION_RULE));
        assert!(config.contains("locality: region3/zone4"));
        let parsed = lb::config::parse(&config).unwrap();
        assert_eq!(parsed.services.len(), 1);
        assert_eq!(parsed.services[0].endpoints.len(), 4);
    }

    #[test]
    fn log_lines_lose_their_timestamp() {
        assert_eq!(
            short_log_line("[2026-01-01T00:00:00Z INFO  lb::agent] attached"),
            "INFO  lb::agent] attached"
        );
        assert_eq!(short_log_line("plain"), "plain");
    }
}
