//! The Kubernetes API server of the integration tests: `tests/apiserver/main.go`, a small
//! program on k8s.io/apiserver's generic server, built from Debian sid's Go source packages,
//! and the etcd it stores into (Debian's `etcd-server`).
//!
//! No registry ships a current kube-apiserver, so the sources come from Debian: a private apt
//! configuration (its own sources list with sid, its own state and cache, via `APT_CONFIG`;
//! nothing is installed into the system) downloads the `-dev` packages the apiserver library
//! needs, Go and etcd, and `dpkg-deb -x` unpacks them under `target/k8s-apiserver/root`. Go
//! then builds in GOPATH mode, offline. Everything is cached there: the unpacked packages
//! until the folder is removed, the binary until `main.go` or the packages change.
//!
//! sid moves and keeps only its newest versions, so nothing is pinned: the build uses what sid
//! carries, prints the versions, and when a move breaks the build, says which package.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

/// The Go minor version to build with; when sid no longer carries it, sid's default Go
/// (what `golang-go` depends on) is used instead.
const GO_VERSION: &str = "1.26";

/// The packages whose `-dev` closure holds every Go source the program imports.
const SOURCE_ROOTS: &[&str] = &[
    "golang-k8s-apiserver-dev",
    "golang-k8s-apiextensions-apiserver-dev",
    // openapi-gen, for the OpenAPI definitions server-side apply needs.
    "golang-k8s-kube-openapi-dev",
];

/// The packages whose versions are printed (and named when the build fails).
const KEY_PACKAGES: &[&str] = &[
    "golang-k8s-apiserver-dev",
    "golang-k8s-apiextensions-apiserver-dev",
    "golang-k8s-api-dev",
    "golang-k8s-client-go-dev",
    "golang-k8s-kube-openapi-dev",
];

/// The API packages whose OpenAPI definitions are generated (the apiextensions apiserver
/// ships its own).
const OPENAPI_PACKAGES: &[&str] = &[
    "k8s.io/api/core/v1",
    "k8s.io/api/discovery/v1",
    "k8s.io/apimachinery/pkg/apis/meta/v1",
    "k8s.io/apimachinery/pkg/runtime",
    "k8s.io/apimachinery/pkg/version",
    "k8s.io/apimachinery/pkg/util/intstr",
    "k8s.io/apimachinery/pkg/api/resource",
];

/// The first line of the stamp file; another one (an older layout) unpacks again.
const STAMP_HEADER: &str = "# lb test apiserver packages, v2: name version go-import-paths...";

/// The Go import path of the program inside the private GOPATH.
const GO_PACKAGE: &str = "lb-test-apiserver";

/// Changes whenever the way the binary is built changes, so such a change rebuilds it.
const RECIPE: &str =
    "4: openapi-gen, GOPATH build, -trimpath, -s -w, version from golang-k8s-apiserver-dev";

/// `target/k8s-apiserver`: everything this module makes.
pub fn cache_dir() -> PathBuf {
    cmd::workspace_root().join("target").join("k8s-apiserver")
}

/// The built apiserver (the tests' harness looks here when `LB_TEST_APISERVER` is unset).
pub fn binary_path() -> PathBuf {
    cache_dir().join("lb-test-apiserver")
}

/// Debian's etcd, unpacked (the harness looks here when `LB_TEST_ETCD` is unset).
pub fn etcd_path() -> PathBuf {
    root_dir().join("usr").join("bin").join("etcd")
}

fn root_dir() -> PathBuf {
    cache_dir().join("root")
}

/// Written once every package is unpacked: `name version import-paths...` per line.
fn packages_stamp() -> PathBuf {
    cache_dir().join("packages.txt")
}

fn main_go() -> PathBuf {
    cmd::workspace_root()
        .join("tests")
        .join("apiserver")
        .join("main.go")
}

/// Returns the built apiserver binary, building it (and first fetching and unpacking the
/// Debian packages) when it is missing or stale. [`etcd_path`] is valid afterwards.
pub fn ensure() -> Result<PathBuf> {
    let source = fs::read(main_go()).with_context(|| {
        format!(
            "reading the test apiserver's source {}",
            main_go().display()
        )
    })?;
    let mut packages = Packages::read(&packages_stamp());
    if packages.is_none() {
        let started = Instant::now();
        fetch_and_unpack()?;
        println!(
            "k8s apiserver: Debian packages fetched and unpacked in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        packages = Packages::read(&packages_stamp());
    }
    let packages = packages.with_context(|| {
        format!(
            "{} is missing or unreadable after unpacking",
            packages_stamp().display()
        )
    })?;
    println!(
        "k8s apiserver: built from Debian sid's {}",
        packages.summary()
    );
    if !etcd_path().is_file() {
        bail!(
            "{} is missing although {} says etcd-server is unpacked; remove {} and run again",
            etcd_path().display(),
            packages_stamp().display(),
            cache_dir().display()
        );
    }

    let binary = binary_path();
    let key_file = cache_dir().join("lb-test-apiserver.key");
    let key = format!(
        "{:016x}",
        fnv1a(&[&source, packages.text.as_bytes(), RECIPE.as_bytes()])
    );
    if binary.is_file() && fs::read_to_string(&key_file).is_ok_and(|k| k.trim() == key) {
        println!(
            "k8s apiserver: {} is up to date (key {key})",
            binary.display()
        );
        return Ok(binary);
    }
    let started = Instant::now();
    build(&source, &packages)?;
    fs::write(&key_file, &key)?;
    println!(
        "k8s apiserver: built {} in {:.0} s",
        binary.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(binary)
}

/// The unpacked packages, as recorded in the stamp file.
struct Packages {
    text: String,
    /// name -> (version, Go import paths)
    by_name: BTreeMap<String, (String, Vec<String>)>,
}

impl Packages {
    fn read(path: &Path) -> Option<Self> {
        let text = fs::read_to_string(path).ok()?;
        let mut lines = text.lines();
        if lines.next() != Some(STAMP_HEADER) {
            return None;
        }
        let mut by_name = BTreeMap::new();
        for line in lines {
            let mut words = line.split_whitespace();
            let (Some(name), Some(version)) = (words.next(), words.next()) else {
                continue;
            };
            by_name.insert(
                name.to_string(),
                (version.to_string(), words.map(str::to_string).collect()),
            );
        }
        by_name
            .contains_key("etcd-server")
            .then_some(Self { text, by_name })
    }

    fn version(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(|(v, _)| v.as_str())
    }

    /// The Go toolchain package that was unpacked (`golang-1.NN-go`).
    fn go_package(&self) -> Option<&str> {
        self.by_name
            .keys()
            .map(String::as_str)
            .find(|n| n.starts_with("golang-1.") && n.ends_with("-go"))
    }

    fn goroot(&self) -> Result<PathBuf> {
        let go = self
            .go_package()
            .context("no golang-1.NN-go package was unpacked")?;
        let minor = go.trim_start_matches("golang-").trim_end_matches("-go");
        Ok(root_dir()
            .join("usr")
            .join("lib")
            .join(format!("go-{minor}")))
    }

    /// "golang-k8s-apiserver-dev 0.36.4-2, ..., golang-1.26-go 1.26.10-1, etcd-server 3.5.30-2
    /// (318 packages)".
    fn summary(&self) -> String {
        let mut names: Vec<&str> = KEY_PACKAGES.to_vec();
        names.extend(self.go_package());
        names.push("etcd-server");
        let listed: Vec<String> = names
            .into_iter()
            .filter_map(|name| self.version(name).map(|v| format!("{name} {v}")))
            .collect();
        format!("{} ({} packages)", listed.join(", "), self.by_name.len())
    }

    /// The package that holds Go import path `path`, by the longest `Go-Import-Path` prefix.
    fn owner_of(&self, path: &str) -> Option<(&str, &str)> {
        self.by_name
            .iter()
            .flat_map(|(name, (version, imports))| imports.iter().map(move |i| (name, version, i)))
            .filter(|(_, _, import)| path == *import || path.starts_with(&format!("{import}/")))
            .max_by_key(|(_, _, import)| import.len())
            .map(|(name, version, _)| (name.as_str(), version.as_str()))
    }
}

/// Downloads the closure of the Go sources, Go and etcd from Debian sid with a private apt
/// configuration and unpacks them into `root/`; writes the stamp last.
fn fetch_and_unpack() -> Result<()> {
    let dir = cache_dir();
    let apt = dir.join("apt");
    let root = root_dir();
    let debs = dir.join("debs");
    // Whatever a broken earlier run left is redone from scratch.
    for stale in [&root, &debs, &dir.join("gopath")] {
        if stale.exists() {
            fs::remove_dir_all(stale)
                .with_context(|| format!("removing the stale {}", stale.display()))?;
        }
    }
    let apt_conf = write_apt_config(&apt)?;
    let apt_cmd = |program: &str| {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", &apt_conf);
        c
    };

    let started = Instant::now();
    cmd::run(apt_cmd("apt-get").args(["update", "-q"]))
        .context("reading Debian sid's package list (apt-get update, private configuration)")?;

    let go = go_packages(&apt_cmd)?;
    let mut depends = apt_cmd("apt-cache");
    depends.args([
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
        "--no-pre-depends",
    ]);
    depends.args(SOURCE_ROOTS);
    let closure = capture(&mut depends)?;
    // Go source packages only: their C libraries and tools are not needed (no cgo), and the
    // Go toolchain they pull in is chosen above.
    let mut wanted: Vec<String> = closure
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .filter(|l| l.starts_with("golang-") && l.ends_with("-dev"))
        .map(str::to_string)
        .collect();
    wanted.sort();
    wanted.dedup();
    for root in SOURCE_ROOTS {
        if !wanted.iter().any(|w| w == root) {
            bail!("Debian sid has no package {root} (any more): the test apiserver cannot be built from it");
        }
    }
    wanted.extend(go);
    wanted.push("etcd-server".to_string());

    // Versions and Go import paths, for the stamp and for naming a package that breaks.
    let mut show = apt_cmd("apt-cache");
    show.args(["show", "--no-all-versions"]).args(&wanted);
    let versions = capture(&mut show)?;

    fs::create_dir_all(&debs)?;
    println!(
        "k8s apiserver: downloading {} packages from Debian sid",
        wanted.len()
    );
    cmd::run(
        apt_cmd("apt-get")
            .current_dir(&debs)
            .args(["download", "-q"])
            .args(&wanted),
    )
    .context("downloading the test apiserver's packages from Debian sid")?;
    println!(
        "k8s apiserver: downloaded in {:.0} s; unpacking into {}",
        started.elapsed().as_secs_f64(),
        root.display()
    );

    fs::create_dir_all(&root)?;
    let mut files: Vec<PathBuf> = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    files.sort();
    if files.len() != wanted.len() {
        bail!(
            "apt-get download left {} .deb files in {} for {} packages",
            files.len(),
            debs.display(),
            wanted.len()
        );
    }
    let sources = unpack(&files, &root)?;
    fs::write(packages_stamp(), stamp_lines(&versions, &sources))?;
    fs::remove_dir_all(&debs)?;
    Ok(())
}

/// The private apt configuration: sid on the mirror the system uses, own state and cache.
/// The system's apt.conf.d is still read (proxies, the registry's settings).
fn write_apt_config(apt: &Path) -> Result<PathBuf> {
    for sub in [
        "state/lists/partial",
        "cache/archives/partial",
        "sources.list.d",
        "preferences.d",
    ] {
        fs::create_dir_all(apt.join(sub))?;
    }
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    if !Path::new(keyring).exists() {
        bail!("{keyring} is missing: building the test apiserver needs Debian's archive keyring (apt-get install debian-archive-keyring)");
    }
    let mirror = debian_mirror()?;
    fs::write(
        apt.join("sources.list"),
        format!("deb [signed-by={keyring}] {mirror} sid main\n"),
    )?;
    fs::write(apt.join("status"), "")?;
    let d = apt.display();
    let conf = format!(
        "Dir::State \"{d}/state\";\n\
         Dir::State::status \"{d}/status\";\n\
         Dir::Cache \"{d}/cache\";\n\
         Dir::Etc::SourceList \"{d}/sources.list\";\n\
         Dir::Etc::SourceParts \"{d}/sources.list.d\";\n\
         Dir::Etc::Preferences \"{d}/preferences\";\n\
         Dir::Etc::PreferencesParts \"{d}/preferences.d\";\n\
         APT::Architectures {{ \"amd64\"; }};\n\
         APT::Sandbox::User \"root\";\n\
         Acquire::Languages \"none\";\n\
         Acquire::IndexTargets::deb::DEP-11::DefaultEnabled \"false\";\n\
         Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled \"false\";\n\
         Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled \"false\";\n\
         // A mirror may serve a frozen snapshot of sid, whose Release has expired.\n\
         Acquire::Check-Valid-Until \"false\";\n"
    );
    let path = apt.join("apt.conf");
    fs::write(&path, conf)?;
    Ok(path)
}

/// The Debian archive the system's apt uses (for its own release's `main`), where sid is
/// fetched from too. `LB_DEBIAN_MIRROR` overrides it.
fn debian_mirror() -> Result<String> {
    if let Some(m) = std::env::var_os("LB_DEBIAN_MIRROR") {
        return Ok(m.to_string_lossy().into_owned());
    }
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .context("/etc/os-release names no VERSION_CODENAME: is this Debian?")?;
    let targets = capture(Command::new("apt-get").args([
        "indextargets",
        "--no-release-info",
        "--format",
        "$(SITE) $(RELEASE) $(COMPONENT) $(TARGET_OF)",
    ]))
    .context("building the test apiserver needs Debian's apt-get")?;
    targets
        .lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [site, release, "main", "deb"] if release == codename => Some(site.to_string()),
            _ => None,
        })
        .with_context(|| {
            format!(
                "the system's apt sources have no `{codename} main` archive to fetch sid from \
                 (set LB_DEBIAN_MIRROR to a Debian mirror URL)"
            )
        })
}

/// `golang-1.NN-go` and `golang-1.NN-src` for [`GO_VERSION`], or for sid's default Go when
/// sid no longer has that one.
fn go_packages(apt_cmd: &dyn Fn(&str) -> Command) -> Result<Vec<String>> {
    let has = |name: &str| {
        apt_cmd("apt-cache")
            .args(["show", "--no-all-versions", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut minor = GO_VERSION.to_string();
    if !has(&format!("golang-{minor}-go")) {
        let default = capture(apt_cmd("apt-cache").args(["depends", "golang-go"]))?;
        minor = default
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Depends: golang-")
                    .and_then(|rest| rest.strip_suffix("-go"))
                    .map(str::to_string)
            })
            .context(
                "Debian sid has neither golang-{GO_VERSION}-go nor a golang-go that names its Go",
            )?;
        println!(
            "k8s apiserver: Debian sid no longer has golang-{GO_VERSION}-go; using its default, golang-{minor}-go"
        );
    }
    Ok(vec![
        format!("golang-{minor}-go"),
        format!("golang-{minor}-src"),
    ])
}

/// `name version import-paths...` lines: versions from `apt-cache show` paragraphs, the Go
/// import paths each package ships from what it unpacked.
fn stamp_lines(show: &str, sources: &BTreeMap<String, Vec<String>>) -> String {
    let mut out = format!("{STAMP_HEADER}\n");
    for paragraph in show.split("\n\n") {
        let field = |key: &str| {
            paragraph
                .lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        };
        let (Some(name), Some(version)) = (field("Package:"), field("Version:")) else {
            continue;
        };
        let imports = sources.get(&name).map(|i| i.join(" ")).unwrap_or_default();
        let _ = writeln!(out, "{name} {version} {imports}");
    }
    out
}

/// The outermost directories under /usr/share/gocode/src of the files `dpkg-deb -X` listed:
/// the Go import paths a package provides.
fn go_import_roots(listing: &str) -> Vec<String> {
    let mut dirs: Vec<&str> = listing
        .lines()
        // Files only: directories (listed as `./a/b/`) would make `a` a root.
        .filter(|l| !l.ends_with('/'))
        .filter_map(|l| l.split_once("usr/share/gocode/src/").map(|(_, p)| p))
        .filter_map(|p| p.rsplit_once('/').map(|(dir, _)| dir))
        .collect();
    dirs.sort_unstable();
    dirs.dedup();
    let mut roots: Vec<String> = Vec::new();
    for dir in dirs {
        // Sorted, so an ancestor comes before its descendants.
        if !roots
            .iter()
            .any(|r| dir == r || dir.starts_with(&format!("{r}/")))
        {
            roots.push(dir.to_string());
        }
    }
    roots
}

/// `dpkg-deb -X` (unpack and list) of every file, two at a time (the machines have two
/// cores); returns each package's Go import paths.
fn unpack(files: &[PathBuf], root: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let mut sources = BTreeMap::new();
    for pair in files.chunks(2) {
        let children: Vec<_> = pair
            .iter()
            .map(|f| {
                Command::new("dpkg-deb")
                    .arg("-X")
                    .arg(f)
                    .arg(root)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map(|c| (f, c))
                    .context("running dpkg-deb (from Debian's dpkg)")
            })
            .collect::<Result<_>>()?;
        for (file, child) in children {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "dpkg-deb -X {} {} failed ({}): {}",
                    file.display(),
                    root.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            // name_version_arch.deb
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split('_').next())
                .unwrap_or_default()
                .to_string();
            sources.insert(name, go_import_roots(&String::from_utf8_lossy(&out.stdout)));
        }
    }
    Ok(sources)
}

/// Generates the OpenAPI definitions and builds the program, offline, in GOPATH mode.
fn build(source: &[u8], packages: &Packages) -> Result<()> {
    let dir = cache_dir();
    let gopath = dir.join("gopath");
    let package_dir = gopath.join("src").join(GO_PACKAGE);
    fs::create_dir_all(&package_dir)?;
    fs::write(package_dir.join("main.go"), source)?;
    // In GOPATH mode Go resolves `.../v3` imports (go-restful/v3, ...) to the unversioned
    // directory only for code inside a module tree, so the program gets a go.mod.
    fs::write(
        package_dir.join("go.mod"),
        format!("module {GO_PACKAGE}\n\ngo {GO_VERSION}\n"),
    )?;
    let goroot = packages.goroot()?;
    let go_env = |cmd: &mut Command| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![goroot.join("bin")];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOENV", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOTELEMETRY", "off")
            .env("CGO_ENABLED", "0")
            .env("GOROOT", &goroot)
            .env(
                "GOPATH",
                std::env::join_paths([gopath.clone(), root_dir().join("usr/share/gocode")])
                    .expect("cache paths hold no ':'"),
            )
            .env("GOCACHE", dir.join("gocache"))
            .env("PATH", std::env::join_paths(dirs).unwrap_or(path));
    };
    let go = goroot.join("bin").join("go");

    let openapi_gen = gopath.join("bin").join("openapi-gen");
    if !openapi_gen.is_file() {
        let mut c = Command::new(&go);
        go_env(&mut c);
        c.args(["build", "-trimpath"])
            .arg("-o")
            .arg(&openapi_gen)
            .arg("k8s.io/kube-openapi/cmd/openapi-gen");
        go_build(&mut c, packages, "building openapi-gen")?;
    }
    let header = gopath.join("boilerplate.go.txt");
    fs::write(&header, "")?;
    let mut c = Command::new(&openapi_gen);
    go_env(&mut c);
    c.arg("--output-dir")
        .arg(package_dir.join("openapi"))
        .args(["--output-pkg", &format!("{GO_PACKAGE}/openapi")])
        .args(["--output-file", "zz_generated.openapi.go"])
        .arg("--go-header-file")
        .arg(&header)
        // API rule violations (list types, names) of upstream types are not ours to fix.
        .arg("--report-filename")
        .arg(gopath.join("api-rule-violations.txt"))
        .args(OPENAPI_PACKAGES);
    go_build(
        &mut c,
        packages,
        "generating the OpenAPI definitions (openapi-gen)",
    )?;

    let temp = dir.join("lb-test-apiserver.tmp");
    let mut c = Command::new(&go);
    go_env(&mut c);
    // -trimpath: no machine paths in the binary, and Go's build cache stays valid when
    // the checkout moves.
    c.args(["build", "-trimpath"]);
    // No symbol table and DWARF (-s -w): a third smaller and quicker to link; stack traces
    // keep their file:line. /version reports what clients parse: k8s.io/apiserver 0.X.Y is
    // Kubernetes 1.X.Y.
    let mut ldflags = String::from("-s -w");
    if let Some((minor, patch)) = packages
        .version("golang-k8s-apiserver-dev")
        .and_then(kubernetes_version)
    {
        let var = "k8s.io/component-base/version";
        let _ = write!(
            ldflags,
            " -X {var}.gitVersion=v1.{minor}.{patch} -X {var}.gitMajor=1 -X {var}.gitMinor={minor}"
        );
    }
    c.arg("-ldflags").arg(ldflags);
    c.arg("-o").arg(&temp).arg(GO_PACKAGE);
    go_build(&mut c, packages, "building the test apiserver")?;
    fs::rename(&temp, binary_path())?;
    Ok(())
}

/// "0.36.4-2" (golang-k8s-apiserver-dev) -> (36, 4), for Kubernetes v1.36.4.
fn kubernetes_version(debian: &str) -> Option<(u32, u32)> {
    let upstream = debian.split_once(':').map_or(debian, |(_, v)| v);
    let upstream = upstream.split(['-', '~', '+']).next()?;
    let mut parts = upstream.split('.');
    let (Some("0"), Some(minor), Some(patch)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    Some((minor.parse().ok()?, patch.parse().ok()?))
}

/// Runs a Go build step, showing its output; when it fails, names the Debian packages whose
/// sources the errors point into.
fn go_build(c: &mut Command, packages: &Packages, what: &str) -> Result<()> {
    println!("k8s apiserver: {what} (Go in GOPATH mode, offline)");
    println!("+ {c:?}");
    let mut child = c
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {}", c.get_program().to_string_lossy()))?;
    let mut errors = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            errors.push_str(&line);
            errors.push('\n');
        }
    }
    let status = child.wait()?;
    if status.success() {
        return Ok(());
    }
    let failed = failed_packages(&errors);
    let ours = failed.iter().any(|p| p.starts_with(GO_PACKAGE));
    let mut culprits: Vec<String> = Vec::new();
    for path in failed.iter().filter(|p| !p.starts_with(GO_PACKAGE)) {
        let culprit = match packages.owner_of(path) {
            Some((name, version)) => format!("{name} {version}"),
            None => format!("no unpacked package provides {path}"),
        };
        if !culprits.contains(&culprit) {
            culprits.push(culprit);
        }
    }
    let mut message = format!(
        "{what} failed ({status}) with Debian sid's {}.",
        packages.summary()
    );
    if !culprits.is_empty() {
        let _ = write!(
            message,
            " The errors are in Debian's Go sources of: {}. sid moved and these no longer build \
             together: adapt xtask/src/apiserver.rs (e.g. the Go version) or wait for sid to \
             settle.",
            culprits.join(", ")
        );
    }
    if ours {
        message.push_str(
            " The errors are in tests/apiserver/main.go (Go package lb-test-apiserver): the \
             apiserver library's API changed in sid; adapt main.go to it.",
        );
    }
    if culprits.is_empty() && !ours {
        message.push_str(" See Go's output above.");
    }
    let _ = write!(
        message,
        " Every package's version is in {}.",
        packages_stamp().display()
    );
    bail!(message)
}

/// The Go packages a failed build names: `# import/path` headers, source paths inside the
/// unpacked tree (Go prints them relative to the working directory), and imports Go could
/// not find.
fn failed_packages(errors: &str) -> Vec<String> {
    let mut failed: Vec<String> = Vec::new();
    for line in errors.lines() {
        let header = line.strip_prefix("# ").map(|p| p.trim().to_string());
        let sources = line.split_whitespace().filter_map(|w| {
            let (_, path) = w.split_once("usr/share/gocode/src/")?;
            Some(
                path.rsplit_once('/')
                    .map_or(path, |(dir, _)| dir)
                    .to_string(),
            )
        });
        let missing = line
            .contains("cannot find package")
            .then(|| line.split('"').nth(1).map(str::to_string))
            .flatten();
        for path in header.into_iter().chain(sources).chain(missing) {
            if !failed.contains(&path) {
                failed.push(path);
            }
        }
    }
    failed
}

/// Runs `cmd` silently and returns its stdout; on failure, the error carries stderr.
fn capture(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// 64-bit FNV-1a over the parts (each followed by a 0 byte): the build key. Not
/// cryptographic; it only has to change when an input does.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0u8]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_version_from_the_library_version() {
        assert_eq!(kubernetes_version("0.36.4-2"), Some((36, 4)));
        assert_eq!(kubernetes_version("1:0.37.0~rc1-1"), Some((37, 0)));
        assert_eq!(kubernetes_version("2.0-1"), None);
    }

    #[test]
    fn stamp_lines_keep_name_version_and_import_paths() {
        let show = "Package: golang-k8s-api-dev\nVersion: 0.36.4-1\nSource: x\n\n\
                    Package: golang-foo-dev\nVersion: 1.0-1\n\n\
                    Package: etcd-server\nVersion: 3.5.30-2\n";
        let listing = "./\n./usr/share/gocode/src/\n./usr/share/gocode/src/a.io/\n./usr/share/gocode/src/a.io/x/go.mod\n./usr/share/gocode/src/a.io/x/sub/s.go\n\
                       ./usr/share/gocode/src/a.io/y/y.go\n./usr/share/doc/golang-foo-dev/copyright\n";
        assert_eq!(go_import_roots(listing), ["a.io/x", "a.io/y"]);
        let sources = BTreeMap::from([
            (
                "golang-k8s-api-dev".to_string(),
                vec!["k8s.io/api".to_string()],
            ),
            ("golang-foo-dev".to_string(), go_import_roots(listing)),
        ]);
        let stamp = stamp_lines(show, &sources);
        assert_eq!(
            stamp.strip_prefix(STAMP_HEADER).unwrap(),
            "\ngolang-k8s-api-dev 0.36.4-1 k8s.io/api\ngolang-foo-dev 1.0-1 a.io/x a.io/y\netcd-server 3.5.30-2 \n"
        );
        let dir = std::env::temp_dir().join(format!("xtask-stamp-{}", std::process::id()));
        fs::write(&dir, &stamp).unwrap();
        let packages = Packages::read(&dir).unwrap();
        let _ = fs::remove_file(&dir);
        assert_eq!(
            packages.owner_of("k8s.io/api/core/v1"),
            Some(("golang-k8s-api-dev", "0.36.4-1"))
        );
        assert_eq!(
            packages.owner_of("a.io/y"),
            Some(("golang-foo-dev", "1.0-1"))
        );
        assert_eq!(
            packages.owner_of("a.io/x/sub"),
            Some(("golang-foo-dev", "1.0-1"))
        );
        assert_eq!(packages.owner_of("k8s.io/apimachinery"), None);
    }

    #[test]
    fn failed_packages_from_go_output() {
        let errors = "# k8s.io/apiextensions-apiserver/pkg/apiserver\n\
            target/k8s-apiserver/root/usr/share/gocode/src/k8s.io/apiextensions-apiserver/pkg/apiserver/apiserver.go:286:26: undefined: x\n\
            main.go:3:2: cannot find package \"k8s.io/gone\" in any of:\n\
            # lb-test-apiserver\n\
            ./main.go:10:2: undefined: y\n";
        assert_eq!(
            failed_packages(errors),
            [
                "k8s.io/apiextensions-apiserver/pkg/apiserver",
                "k8s.io/gone",
                "lb-test-apiserver"
            ]
        );
    }

    #[test]
    fn fnv1a_separates_parts() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"x"]), fnv1a(&[b"x"]));
    }
}
