//! A real Kubernetes API server for tests: etcd and the test apiserver
//! (`tests/apiserver/main.go`, built by `cargo xtask test` from Debian's sources of
//! k8s.io/apiserver), both on loopback ports of their own, with a kubeconfig for kubectl
//! and Kubernetes clients.
//!
//! ```no_run
//! use lb_tests::apiserver::{skip_reason, TestApiServer};
//! # fn main() -> anyhow::Result<()> {
//! if let Some(why) = skip_reason() {
//!     lb_tests::report_skip(&why);
//!     return Ok(());
//! }
//! let k8s = TestApiServer::start()?;
//! k8s.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n")?;
//! let json = k8s.kubectl(&["get", "namespace", "demo", "-o", "json"])?;
//! # let _ = json;
//! # Ok(())
//! # }
//! ```
//!
//! What the server does not do (tests must not rely on it): defaulting (set `clusterIP`,
//! `protocol` and `targetPort` in fixtures), validation, ClusterIP allocation, admission,
//! RBAC, garbage collection and controllers (nobody writes EndpointSlices but the test).
//! Writing an object's main resource writes its status too.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};

/// kubectl as the machine image ships it.
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// Istio's DestinationRule and ServiceEntry CRDs (networking.istio.io; v1 stored, v1beta1
/// and v1alpha3 served; every field kept), for tests that write Istio config.
pub const ISTIO_CRDS_YAML: &str = include_str!("../fixtures/istio-crds.yaml");

/// How long starting (or restarting) the apiserver may take before it is an error.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Log lines shown in an error about a process that did not come up.
const LOG_TAIL_LINES: usize = 25;

/// Where `cargo xtask test` caches the build (`target/k8s-apiserver`).
fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("k8s-apiserver")
}

/// The apiserver and etcd binaries: `LB_TEST_APISERVER` and `LB_TEST_ETCD` (set by
/// `cargo xtask test`), else the xtask cache, so `cargo test` works after one
/// `cargo xtask test`.
pub fn binaries() -> Result<(PathBuf, PathBuf)> {
    let find = |var: &str, cached: PathBuf| -> Result<PathBuf> {
        match std::env::var_os(var).filter(|v| !v.is_empty()) {
            Some(path) => {
                let path = PathBuf::from(path);
                if !path.is_file() {
                    bail!("{var} names {}, which does not exist", path.display());
                }
                Ok(path)
            }
            None if cached.is_file() => Ok(cached),
            None => bail!(
                "{var} is not set and {} is not built: run `cargo xtask test` once (it builds \
                 the test apiserver and unpacks etcd into target/k8s-apiserver)",
                cached.display()
            ),
        }
    };
    let apiserver = find("LB_TEST_APISERVER", cache_dir().join("lb-test-apiserver"))?;
    let etcd = find(
        "LB_TEST_ETCD",
        cache_dir()
            .join("root")
            .join("usr")
            .join("bin")
            .join("etcd"),
    )?;
    Ok((apiserver, etcd))
}

/// Why a test that needs the API server cannot run here, if it cannot: a binary (or kubectl)
/// is missing. Under `cargo xtask test` the binaries are always there.
pub fn skip_reason() -> Option<String> {
    if let Err(e) = binaries() {
        return Some(format!("no test apiserver: {e:#}"));
    }
    if !Path::new(KUBECTL).is_file() {
        return Some(format!("{KUBECTL} is not installed"));
    }
    None
}

/// etcd and the test apiserver, running until dropped; everything they write lives in a
/// temporary directory that is removed then.
pub struct TestApiServer {
    dir: PathBuf,
    apiserver_binary: PathBuf,
    etcd: Child,
    apiserver: Option<Child>,
    etcd_url: String,
    port: u16,
    token: String,
    kubeconfig: PathBuf,
    /// The network namespace etcd, the apiserver and kubectl run in (`None`: the host's).
    netns: Option<String>,
}

impl TestApiServer {
    /// Starts etcd and the apiserver on free loopback ports, waits until the apiserver is
    /// ready (at most 30 s; the error then shows the end of both logs), makes sure the
    /// `default` namespace exists and writes the kubeconfig.
    pub fn start() -> Result<Self> {
        Self::start_netns(None)
    }

    /// Like [`TestApiServer::start`], inside `ns`: etcd, the apiserver and kubectl all run
    /// there, on its loopback, where an agent in that namespace reaches them.
    pub fn start_in(ns: &crate::Netns) -> Result<Self> {
        Self::start_netns(Some(ns.name().to_string()))
    }

    fn start_netns(netns: Option<String>) -> Result<Self> {
        let (apiserver_binary, etcd_binary) = binaries()?;
        let dir = std::env::temp_dir().join(crate::unique_name("lb-k8s"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (etcd, etcd_url, port) = match spawn_etcd(&etcd_binary, &dir, netns.as_deref()) {
            Ok(started) => started,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut server = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            apiserver_binary,
            etcd,
            apiserver: None,
            etcd_url,
            port,
            token: format!("lb-test-{}-{nanos:x}", std::process::id()),
            netns,
        };
        server.write_kubeconfig()?;
        server.wait_for_etcd()?;
        server.start_apiserver()?;
        // The server creates the system namespaces before it reports ready; this only
        // makes sure, for the tests' sake.
        if server.kubectl(&["get", "namespace", "default"]).is_err() {
            server.kubectl(&["create", "namespace", "default"])?;
        }
        Ok(server)
    }

    /// The kubeconfig: the server's URL (TLS not verified: the certificate is
    /// self-signed) and the bearer token.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The static bearer token every request must carry (`Authorization: Bearer ...`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// etcd's client URL (`http://127.0.0.1:PORT`).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The directory of this server's logs (`apiserver.log`, `etcd.log`), data and
    /// kubeconfig; removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs kubectl against this server and returns its stdout; the error carries the
    /// command and kubectl's stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_stdin(args, None)
    }

    /// `kubectl apply -f -` of `yaml` (one or more documents); returns kubectl's output.
    pub fn apply_yaml(&self, yaml: &str) -> Result<String> {
        self.kubectl_with_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// Applies [`ISTIO_CRDS_YAML`] and waits until both CRDs are established, so Istio
    /// objects can be written right after.
    pub fn install_istio_crds(&self) -> Result<()> {
        self.apply_yaml(ISTIO_CRDS_YAML)?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/destinationrules.networking.istio.io",
            "crd/serviceentries.networking.istio.io",
        ])?;
        Ok(())
    }

    /// Kills the apiserver (SIGKILL: no graceful shutdown, as in a crash); etcd and its
    /// data stay. Does nothing when it is not running.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            child.wait().context("waiting for the killed apiserver")?;
        }
        Ok(())
    }

    /// Starts the apiserver (again) on the same port, against the same etcd, and waits until
    /// it is ready. Does nothing when it is running.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let log = self.dir.join("apiserver.log");
        let child = command_in(self.netns.as_deref(), &self.apiserver_binary)
            .args(["--etcd-servers", &self.etcd_url])
            .args(["--bind-address", "127.0.0.1"])
            .args(["--secure-port", &self.port.to_string()])
            .args(["--token", &self.token])
            .arg("--cert-dir")
            .arg(self.dir.join("certs"))
            .stdin(Stdio::null())
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.apiserver_binary.display()))?;
        self.apiserver = Some(child);
        self.wait_until_ready()
    }

    /// Polls `/readyz` until it says ok; fails early when a process exits.
    fn wait_until_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let last = match self.kubectl(&["get", "--raw", "/readyz", "--request-timeout=2s"]) {
                Ok(out) if out.trim() == "ok" => return Ok(()),
                Ok(out) => out,
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "the test apiserver was not ready after {} s (last answer: {}){}",
                    READY_TIMEOUT.as_secs(),
                    last.trim(),
                    self.log_tails()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_for_etcd(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            if etcd_healthy(&self.etcd_url, self.netns.as_deref()) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "etcd was not healthy after {} s{}",
                    READY_TIMEOUT.as_secs(),
                    self.log_tails()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails (with the logs) when etcd or the apiserver has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.etcd.try_wait()? {
            bail!("etcd exited ({status}){}", self.log_tails());
        }
        if let Some(child) = &mut self.apiserver {
            if let Some(status) = child.try_wait()? {
                self.apiserver = None;
                bail!("the test apiserver exited ({status}){}", self.log_tails());
            }
        }
        Ok(())
    }

    /// The last lines of both logs, for an error message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for name in ["apiserver.log", "etcd.log"] {
            let path = self.dir.join(name);
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            out.push_str(&format!(
                "\n--- last {} lines of {} ---\n{}",
                tail.len(),
                path.display(),
                tail.join("\n")
            ));
        }
        out
    }

    fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut command = command_in(self.netns.as_deref(), Path::new(KUBECTL));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            // Its own discovery cache: another server may have had this port before.
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let line = format!("kubectl {}", args.join(" "));
        let mut child = command
            .spawn()
            .with_context(|| format!("`{line}` could not be started ({KUBECTL})"))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A writer thread: kubectl may fill its output pipes before reading all input.
            let input = input.to_owned();
            thread::spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            });
        }
        let output = child
            .wait_with_output()
            .with_context(|| format!("waiting for `{line}`"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(stdout)
    }

    fn write_kubeconfig(&self) -> Result<()> {
        let config = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: lb-test\n  \
               cluster:\n    \
                 server: {server}\n    \
                 insecure-skip-tls-verify: true\n\
             users:\n\
             - name: lb-test\n  \
               user:\n    \
                 token: {token}\n\
             contexts:\n\
             - name: lb-test\n  \
               context:\n    \
                 cluster: lb-test\n    \
                 user: lb-test\n    \
                 namespace: default\n\
             current-context: lb-test\n",
            server = self.server_url(),
            token = self.token,
        );
        fs::write(&self.kubeconfig, config)
            .with_context(|| format!("writing {}", self.kubeconfig.display()))
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if thread::panicking() {
            // The test failed: what the servers said may be why.
            let _ = writeln!(
                std::io::stderr(),
                "test apiserver logs:{}",
                self.log_tails()
            );
        }
        let _ = self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts etcd with its data and log in `dir`; returns it, its client URL and the port
/// left for the apiserver.
fn spawn_etcd(etcd_binary: &Path, dir: &Path, netns: Option<&str>) -> Result<(Child, String, u16)> {
    let [client_port, peer_port, apiserver_port] = free_ports()?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lb-k8s".into());
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let log = dir.join("etcd.log");
    let etcd = command_in(netns, etcd_binary)
        .arg("--name")
        .arg(&name)
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("{name}={peer_url}")])
        .args(["--initial-cluster-token", &name])
        // A test's data need not survive a power cut; fsync only slows a busy machine.
        .arg("--unsafe-no-fsync")
        .stdin(Stdio::null())
        .stdout(log_file(&log)?)
        .stderr(log_file(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", etcd_binary.display()))?;
    Ok((etcd, client_url, apiserver_port))
}

/// Three distinct free loopback ports. The listeners are held until all are chosen, so
/// the three differ; another process could still take one before it is used.
fn free_ports() -> Result<[u16; 3]> {
    let listeners = (0..3)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding loopback ports to pick free ones")?;
    let mut ports = [0u16; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

fn log_file(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// etcd's `/health` at `url` (`http://127.0.0.1:PORT`) says `"health":"true"`.
/// `program`, run in network namespace `netns` when given (`nsenter` execs it, so the
/// child is the program itself and killing it kills the program).
fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn etcd_healthy(url: &str, netns: Option<&str>) -> bool {
    if let Some(ns) = netns {
        // From inside the namespace, where etcd listens.
        return command_in(Some(ns), Path::new("curl"))
            .args(["-s", "--max-time", "2", &format!("{url}/health")])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""));
    }
    let Some(Ok(addr)) = url.strip_prefix("http://").map(str::parse::<SocketAddr>) else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}
