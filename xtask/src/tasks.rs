//! The build/run/test/bench/lint flows. Each one first makes sure the toolchain is complete
//! (lb-userspace's build script compiles the eBPF programs, so even clippy needs it).

use anyhow::{Context as _, Result};

use crate::{apiserver, cmd, previous_release, root, setup};

/// The binaries the other flows run: the agent (`lb`) and the demo/bench drivers.
const BINARY_PACKAGES: &[&str] = &["--package", "lb-userspace", "--package", "lb-tests"];

/// Prints a step header, so a CI log reads as a list of steps.
fn step(title: &str) {
    println!();
    println!("==> {title}");
}

fn setup_check() -> Result<()> {
    step(
        "setup: checking the toolchain, installing what is missing (the first time this \
         takes a few minutes: Debian packages, then bpf-linker is built)",
    );
    setup::ensure(setup::Mode::Quiet)
}

pub fn build(release: bool) -> Result<()> {
    setup_check()?;
    build_binaries(release)
}

fn build_binaries(release: bool) -> Result<()> {
    let profile = if release { "release" } else { "debug" };
    step(&format!(
        "build: the lb agent, its eBPF programs and the lb-tests binaries ({profile}); the \
         first build takes a few minutes, cargo shows its progress below"
    ));
    let mut cargo = cmd::cargo(["build"]);
    if release {
        cargo.arg("--release");
    }
    cmd::run(cargo.args(BINARY_PACKAGES).arg("--bins"))
}

pub fn run(args: &[String]) -> Result<()> {
    // Before the (long) build, so a forgotten sudo costs nothing.
    root::require_root("run")?;
    setup_check()?;
    build_binaries(true)?;
    // Ctrl-C reaches the child too: xtask waits for it to clean up (the sandbox removes
    // its namespaces and agent) instead of returning to the shell in the middle of that.
    let _wait_for_child = cmd::InterruptsGoToChild::install();
    if args.is_empty() {
        step(
            "run: lb-demo, a live sandbox of Istio's locality failover task (starting takes \
             a few seconds; keys: d1..d4 drain, r1..r4 restore, e1..e4 / u1..u4 eject / \
             un-eject, q quits; Ctrl-C quits too, and everything is removed)",
        );
        cmd::run(&mut cmd::cargo([
            "run",
            "--release",
            "--package",
            "lb-tests",
            "--bin",
            "lb-demo",
        ]))
    } else {
        step("run: lb");
        cmd::run(
            cmd::cargo([
                "run",
                "--release",
                "--package",
                "lb-userspace",
                "--bin",
                "lb",
                "--",
            ])
            .args(args),
        )
    }
}

pub fn lint() -> Result<()> {
    setup_check()?;
    lint_steps()
}

fn lint_steps() -> Result<()> {
    step("lint: cargo fmt --check");
    cmd::run(&mut cmd::cargo(["fmt", "--all", "--", "--check"]))?;
    // lb-ebpf only builds for the BPF target; lb-userspace's build script compiles it.
    step("lint: cargo clippy -D warnings");
    cmd::run(&mut cmd::cargo([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate is checked for the host target: its no_std/no_main attributes apply
    // only to the BPF target, and clippy cannot load the BPF target's prebuilt core.
    step("lint: cargo clippy -D warnings (lb-ebpf, host target)");
    cmd::run(&mut cmd::cargo([
        "clippy",
        "--package",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// `soak`: seconds for the soak test (`LB_SOAK_SECS`), `None` for its default.
pub fn test(lint: bool, soak: Option<u64>, cargo_test_args: &[String]) -> Result<()> {
    root::require_root("test")?;
    setup_check()?;
    if lint {
        lint_steps()?;
    }
    // Tests may start the `lb` agent and the demo binaries as separate processes, and
    // `cargo test` only builds binaries of the package under test; build them all first.
    build_binaries(true)?;
    step(&format!(
        "build: lb of the previous release ({}), which the upgrade test replaces under load; \
         built once, from the git history",
        &previous_release::COMMIT[..12]
    ));
    // Empty: the upgrade test says it is skipped, and why (printed here too).
    let previous = match previous_release::ensure()? {
        Ok(binary) => binary.into_os_string(),
        Err(previous_release::Unavailable(why)) => {
            println!("WARNING: the upgrade test will be skipped: {why}");
            Default::default()
        }
    };
    step(
        "build: the Kubernetes API server of the integration tests, from Debian sid's Go \
         sources, and etcd; cached in target/k8s-apiserver (the first time: about 35 s of \
         downloads, then a few minutes of Go build)",
    );
    // Required: the Kubernetes tests must run, so a failure here fails the whole run.
    let k8s_apiserver = apiserver::ensure().context(
        "the Kubernetes API server of the integration tests could not be built (the tests \
         that need a real API server cannot run without it)",
    )?;
    // Release: the tests push real traffic through the datapath and time it.
    step("test: cargo test --release");
    let mut cargo_test = cmd::cargo(["test", "--workspace", "--exclude", "lb-ebpf", "--release"]);
    cargo_test.args(cargo_test_args);
    cargo_test.env("LB_PREVIOUS_RELEASE", previous);
    cargo_test.env("LB_TEST_APISERVER", k8s_apiserver);
    cargo_test.env("LB_TEST_ETCD", apiserver::etcd_path());
    if let Some(secs) = soak {
        println!("soak test: {secs} s (LB_SOAK_SECS)");
        cargo_test.env("LB_SOAK_SECS", secs.to_string());
    }
    let (result, totals) = cmd::run_tests(&mut cargo_test);
    println!();
    if result.is_ok() {
        println!("==> all steps passed");
    }
    // One closing line for the whole run (every test binary summed), last in the log.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    result
}

pub fn bench(args: &[String]) -> Result<()> {
    if !root::is_root() {
        // Not fatal: lb-bench decides what it can do, but most benchmarks load eBPF.
        println!(
            "note: lb-bench usually needs root (eBPF, network namespaces); if it fails, use \
             `sudo -E env PATH=$PATH cargo xtask bench`"
        );
    }
    setup_check()?;
    // The end-to-end section measures lb beside these; they come from Debian's packages.
    if !args.iter().any(|a| a == "--no-end-to-end") {
        setup::ensure_bench_peers()?;
    }
    // The failover section runs the agent binary: build it too, so it is never stale.
    build_binaries(true)?;
    step("bench: lb-bench");
    cmd::run(
        cmd::cargo([
            "run",
            "--release",
            "--package",
            "lb-tests",
            "--bin",
            "lb-bench",
            "--",
        ])
        .args(args),
    )
}
