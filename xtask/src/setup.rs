//! `cargo xtask setup`: make sure everything needed to build and test `lb` is installed.
//!
//! The eBPF programs are compiled by Debian's rustc (which ships a prebuilt `core` for
//! `bpfel-unknown-none`) and linked by `bpf-linker`, which must be built against the same
//! LLVM (22) as that rustc. The tests additionally need `ip`/`tc`, `ethtool` and `bpftool`.
//! Every check is cheap, so the other subcommands run this first and only say something
//! when a need is missing.

use std::{cell::OnceCell, path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{cmd, root};

/// LLVM 22's tools; bpf-linker's build script must find *this* `llvm-config` first, not
/// Debian's default (LLVM 14) one in /usr/bin.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// The command that builds bpf-linker against LLVM 22 (installs into `$CARGO_HOME/bin`).
const BPF_LINKER_INSTALL: &[&str] = &[
    "install",
    "bpf-linker",
    "--locked",
    "--no-default-features",
    "--features",
    "llvm-22",
];

/// How a Debian package can be recognised where there is no dpkg to ask.
enum Fallback {
    /// Debian's rustc with a prebuilt BPF `core`, as lb-userspace/build.rs looks for it.
    DebianBpfCore,
    /// This file exists.
    File(&'static str),
    /// This command runs successfully.
    Runs(&'static str, &'static [&'static str]),
}

struct Package {
    name: &'static str,
    purpose: &'static str,
    /// Part of the Debian Rust toolchain for BPF, which a rustup nightly with `rust-src`
    /// can replace (lb-userspace/build.rs accepts either).
    rust_toolchain: bool,
    fallback: Fallback,
}

const PACKAGES: &[Package] = &[
    Package {
        name: "rustc-web",
        purpose: "Debian's rustc (LLVM 22) that compiles the eBPF programs",
        rust_toolchain: true,
        fallback: Fallback::DebianBpfCore,
    },
    Package {
        name: "cargo-web",
        purpose: "the cargo matching rustc-web",
        rust_toolchain: true,
        fallback: Fallback::DebianBpfCore,
    },
    Package {
        name: "libstd-rust-web-dev-bpf",
        purpose: "prebuilt `core` for bpfel-unknown-none",
        rust_toolchain: true,
        fallback: Fallback::DebianBpfCore,
    },
    Package {
        name: "llvm-22-dev",
        purpose: "LLVM 22, which bpf-linker is built against",
        rust_toolchain: false,
        fallback: Fallback::File("/usr/lib/llvm-22/bin/llvm-config"),
    },
    Package {
        name: "bpftool",
        purpose: "inspecting loaded programs and maps",
        rust_toolchain: false,
        fallback: Fallback::Runs("bpftool", &["version"]),
    },
    Package {
        name: "iproute2",
        purpose: "`ip`/`tc` for the test network namespaces",
        rust_toolchain: false,
        fallback: Fallback::Runs("ip", &["-V"]),
    },
    Package {
        name: "ethtool",
        purpose: "NIC/veth offload settings in tests",
        rust_toolchain: false,
        fallback: Fallback::Runs("ethtool", &["--version"]),
    },
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo xtask setup`: one line per need, always.
    Report,
    /// Before build/test/...: a single summary line when everything is there; the full
    /// report (and the installs) only when something is missing.
    Quiet,
}

enum State {
    Present,
    /// Missing, but something else covers it; the text says what.
    NotNeeded(&'static str),
    Missing,
}

/// Checks every need, installs what is missing when it can, and fails with the exact
/// commands to run by hand when it cannot.
pub fn ensure(mode: Mode) -> Result<()> {
    let probes = Probes::new();
    let states: Vec<(&Package, State)> = PACKAGES
        .iter()
        .map(|p| (p, package_state(p, &probes)))
        .collect();
    let linker_present = bpf_linker_present();
    let missing: Vec<&str> = states
        .iter()
        .filter(|(_, s)| matches!(s, State::Missing))
        .map(|(p, _)| p.name)
        .collect();

    if missing.is_empty() && linker_present && mode == Mode::Quiet {
        println!(
            "setup: all {} needs present (run `cargo xtask setup` for details)",
            PACKAGES.len() + 1
        );
        return Ok(());
    }

    for (package, state) in &states {
        match state {
            State::Present => line(package.name, "already present", package.purpose),
            State::NotNeeded(why) => line(package.name, why, package.purpose),
            // Reported below, once we know whether it could be installed.
            State::Missing => {}
        }
    }
    if linker_present {
        line("bpf-linker", "already present", "links the eBPF object");
    }

    // Commands the user has to run because we could not.
    let mut manual: Vec<String> = Vec::new();
    let mut blocker = None;

    if !missing.is_empty() {
        match apt_blocker() {
            None => {
                install_packages(&missing)?;
                for name in &missing {
                    line(name, "installed", "");
                }
            }
            Some(reason) => {
                for name in &missing {
                    line(name, "MISSING", "");
                }
                manual.push(apt_instructions(&missing, &reason));
                blocker = Some(reason);
            }
        }
    }

    if !linker_present {
        // Building bpf-linker needs no root, only LLVM 22, so do it even when some other
        // package could not be installed.
        if Path::new(LLVM_BIN).join("llvm-config").exists() {
            install_bpf_linker()?;
            line("bpf-linker", "installed", "");
        } else {
            line("bpf-linker", "MISSING", "needs llvm-22-dev first");
            manual.push(format!(
                "PATH={LLVM_BIN}:$PATH cargo {}",
                BPF_LINKER_INSTALL.join(" ")
            ));
        }
    }

    if manual.is_empty() {
        if mode == Mode::Report {
            println!("setup: everything is in place");
        }
        return Ok(());
    }
    eprintln!();
    if let Some(reason) = &blocker {
        eprintln!("setup cannot install packages here: {reason}.");
    }
    eprintln!("Run these yourself, then re-run `cargo xtask setup`:");
    for command in &manual {
        eprintln!("    {command}");
    }
    bail!("setup incomplete: required tools are missing (see the commands above)")
}

/// Checks that are slow-ish or shared between packages, computed at most once.
struct Probes {
    dpkg: OnceCell<bool>,
    nightly_rust_src: OnceCell<bool>,
}

impl Probes {
    fn new() -> Self {
        Self {
            dpkg: OnceCell::new(),
            nightly_rust_src: OnceCell::new(),
        }
    }

    fn has_dpkg(&self) -> bool {
        *self
            .dpkg
            .get_or_init(|| cmd::probe("dpkg-query", &["--version"]).is_some())
    }

    /// The alternative eBPF toolchain route of lb-userspace/build.rs.
    fn nightly_rust_src(&self) -> bool {
        *self.nightly_rust_src.get_or_init(|| {
            cmd::probe("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
                .map(|sysroot| {
                    Path::new(sysroot.trim())
                        .join("lib/rustlib/src/rust/library/core")
                        .exists()
                })
                .unwrap_or(false)
        })
    }
}

fn package_state(package: &Package, probes: &Probes) -> State {
    let installed = if probes.has_dpkg() {
        dpkg_installed(package.name)
    } else {
        match package.fallback {
            Fallback::DebianBpfCore => debian_bpf_core_present(),
            Fallback::File(path) => Path::new(path).exists(),
            Fallback::Runs(program, args) => cmd::probe(program, args).is_some(),
        }
    };
    if installed {
        State::Present
    } else if package.rust_toolchain && probes.nightly_rust_src() {
        State::NotNeeded("not needed (rustup nightly with rust-src is used instead)")
    } else if package.name == "llvm-22-dev" && !probes.has_dpkg() && bpf_linker_present() {
        // Off Debian, LLVM 22 only matters for building bpf-linker.
        State::NotNeeded("not needed (bpf-linker is already installed)")
    } else {
        State::Missing
    }
}

fn dpkg_installed(name: &str) -> bool {
    cmd::probe("dpkg-query", &["-W", "-f=${Status}", name])
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// Same test as lb-userspace/build.rs: Debian's rustc plus a prebuilt BPF `core`.
fn debian_bpf_core_present() -> bool {
    let core_dir = Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib");
    let has_core = std::fs::read_dir(core_dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
    });
    has_core && Path::new("/usr/bin/rustc").exists()
}

fn bpf_linker_present() -> bool {
    cmd::probe("bpf-linker", &["--version"]).is_some()
}

/// Why apt-get cannot be used here, if it cannot.
fn apt_blocker() -> Option<String> {
    if !Path::new("/etc/debian_version").exists() {
        return Some("this is not a Debian system (no /etc/debian_version)".into());
    }
    if cmd::probe("apt-get", &["--version"]).is_none() {
        return Some("apt-get is not available".into());
    }
    if !root::is_root() {
        return Some("not running as root".into());
    }
    None
}

fn apt_instructions(missing: &[&str], reason: &str) -> String {
    let packages = missing.join(" ");
    if reason.starts_with("not running as root") {
        format!(
            "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y \
             {packages}\n    (or let xtask do it: sudo -E env PATH=$PATH cargo xtask setup)"
        )
    } else {
        format!("install your system's equivalent of these Debian packages: {packages}")
    }
}

fn install_packages(missing: &[&str]) -> Result<()> {
    println!(
        "setup: installing {} with apt-get (downloads; a minute or more)",
        missing.join(" ")
    );
    // One `apt-get update`, and only because something is missing: a fresh machine has no
    // package lists, and an up-to-date machine should not touch the network at all.
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(missing),
    )?;
    let still_missing: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|name| !dpkg_installed(name))
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "apt-get succeeded but these packages are still not installed: {}",
            still_missing.join(" ")
        );
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    println!("setup: building bpf-linker against LLVM 22 (takes a few minutes)");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![Path::new(LLVM_BIN).to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(dirs)?;
    cmd::run(cmd::cargo(BPF_LINKER_INSTALL).env("PATH", path))?;
    // main() put the cargo bin directories on PATH, so the new binary must be found now.
    if !bpf_linker_present() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails; \
             is $CARGO_HOME/bin (usually ~/.cargo/bin) on PATH?"
        );
    }
    Ok(())
}

fn line(name: &str, state: &str, purpose: &str) {
    if purpose.is_empty() {
        println!("setup: {name:<24} {state}");
    } else {
        println!("setup: {name:<24} {state:<16} ({purpose})");
    }
}

/// The peers `cargo xtask bench` measures lb against, as Debian packages, with the file
/// that shows each one is there.
const BENCH_PEERS: &[(&str, &str, &str)] = &[
    (
        "wrk",
        "/usr/bin/wrk",
        "HTTP load generator (keep-alive runs)",
    ),
    (
        "iptables",
        "/usr/sbin/iptables",
        "kube-proxy's iptables mode (statistic DNAT)",
    ),
    (
        "nftables",
        "/usr/sbin/nft",
        "kube-proxy's nftables mode (numgen DNAT)",
    ),
    (
        "conntrack",
        "/usr/sbin/conntrack",
        "flushing conntrack between netfilter runs",
    ),
    (
        "haproxy",
        "/usr/sbin/haproxy",
        "userspace L4 proxy (mode tcp)",
    ),
    (
        "nginx",
        "/usr/sbin/nginx",
        "userspace L4 proxy (stream) and the backends' web server",
    ),
    (
        "libnginx-mod-stream",
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "nginx's stream module",
    ),
    (
        "dnsmasq-base",
        "/usr/sbin/dnsmasq",
        "DNS forwarder and cache, beside lb's DNS responder",
    ),
];

/// Installs the peers `cargo xtask bench` measures (`BENCH_PEERS`) when missing. Their
/// services must not start on the machine: Debian's `policy-rc.d` convention (exit 101 =
/// "do not start") is put in place for the install when the machine has none.
pub fn ensure_bench_peers() -> Result<()> {
    let missing: Vec<&str> = BENCH_PEERS
        .iter()
        .filter(|(_, file, _)| !Path::new(file).exists())
        .map(|(name, _, _)| *name)
        .collect();
    if missing.is_empty() {
        println!(
            "setup: all {} benchmark peers present (wrk, iptables, nftables, conntrack, \
             haproxy, nginx + stream, dnsmasq)",
            BENCH_PEERS.len()
        );
        return Ok(());
    }
    for (name, _, purpose) in BENCH_PEERS.iter().filter(|p| missing.contains(&p.0)) {
        line(name, "missing", purpose);
    }
    if let Some(reason) = apt_blocker() {
        bail!(
            "the benchmark needs {}; it cannot install them: {reason}. {}",
            missing.join(" "),
            apt_instructions(&missing, &reason)
        );
    }
    const POLICY: &str = "/usr/sbin/policy-rc.d";
    let placed = !Path::new(POLICY).exists();
    if placed {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(
            POLICY,
            "#!/bin/sh\n# lb bench: do not start services\nexit 101\n",
        )?;
        std::fs::set_permissions(POLICY, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = install_packages(&missing);
    if placed {
        let _ = std::fs::remove_file(POLICY);
    }
    installed
}
