//! Developer and CI tasks for `lb`: `cargo xtask <setup|build|run|test|bench|lint>`.
//!
//! xtask depends on no other workspace crate on purpose: it has to compile on a bare machine
//! before the eBPF toolchain exists, because installing that toolchain is its first job.

mod apiserver;
mod cmd;
mod previous_release;
mod root;
mod setup;
mod tasks;

use std::{env, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test the lb eBPF load balancer",
    long_about = "Build, run and test the lb eBPF load balancer.\n\n\
        Every subcommand first checks the toolchain (Debian's rustc with a BPF core, \
        bpf-linker built against LLVM 22, iproute2, ethtool, bpftool) and installs what is \
        missing. `run` and `test` need root."
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check the toolchain and install whatever is missing
    #[command(
        long_about = "Check the toolchain and install whatever is missing.\n\n\
        Checks the Debian packages rustc-web, cargo-web, libstd-rust-web-dev-bpf, llvm-22-dev, \
        bpftool, iproute2 and ethtool, and bpf-linker (built with `cargo install` against \
        LLVM 22). Prints one line per need. Safe to run again: only missing things are \
        installed, and `apt-get update` runs only if a package is missing.\n\n\
        Installing packages needs root on Debian. Otherwise it prints the commands to run \
        yourself and exits non-zero."
    )]
    Setup,

    /// Build the agent (lb) and the demo/bench binaries (release unless --debug)
    Build {
        /// Build the debug profile instead of release
        #[arg(long)]
        debug: bool,
    },

    /// Build, then run the live sandbox, or `lb` with ARGS (needs root)
    #[command(long_about = "Build, then run.\n\n\
        Without ARGS runs the sandbox (`lb-demo` from lb-tests): Istio's locality failover \
        task live on network namespaces, a client at region1/zone1, HelloWorld in four \
        localities and the `lb agent` with the task's DestinationRule. The view shows which \
        locality answers and lb's endpoint states every second; keys d1..d4 drain a \
        backend, r1..r4 restore it, e1..e4 / u1..u4 eject / un-eject it through lb's admin \
        endpoint, q quits. Ctrl-C and q remove everything it made.\n\n\
        With ARGS runs `lb`: `cargo xtask run -- agent --config lb.yaml` (or without the \
        `--`) is `lb agent --config lb.yaml`.\n\n\
        Needs root (eBPF, network namespaces): sudo -E env PATH=$PATH cargo xtask run")]
    Run {
        /// Arguments for the `lb` binary; with none, the sandbox runs instead
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },

    /// Lint, then run the whole test suite in release mode (needs root)
    #[command(
        long_about = "Lint, then run the whole test suite in release mode.\n\n\
        Steps: setup check; `cargo fmt --all -- --check`; `cargo clippy --workspace \
        --exclude lb-ebpf --all-targets -- -D warnings`; build the binaries; build the \
        Kubernetes API server of the tests and unpack etcd (from Debian sid's packages, \
        cached in target/k8s-apiserver); `cargo test --workspace --exclude lb-ebpf \
        --release [CARGO_TEST_ARGS]`. Stops at the first \
        failing step and exits non-zero. `--soak` runs the soak test \
        (tests/tests/soak.rs) for 300 s, or SECS, instead of its default 30 s.\n\n\
        Needs root: the tests load eBPF programs and send traffic between network \
        namespaces. Example: sudo -E env PATH=$PATH cargo xtask test -- --test e2e -- \
        --nocapture"
    )]
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`
        #[arg(long)]
        no_lint: bool,

        /// Run the soak test (tests/tests/soak.rs) for SECS seconds instead of its default
        /// 30 (sets LB_SOAK_SECS; 300 when given without a value)
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "300")]
        soak: Option<u64>,

        /// Extra arguments for `cargo test`, after `--`
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        cargo_test_args: Vec<String>,
    },

    /// Run the benchmarks (`lb-bench` from lb-tests, release) with ARGS
    Bench {
        /// Arguments for lb-bench
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },

    /// Check formatting (cargo fmt) and lints (cargo clippy -D warnings)
    Lint,
}

fn main() -> ExitCode {
    put_cargo_bin_on_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::ensure(setup::Mode::Report),
        Task::Build { debug } => tasks::build(!debug),
        Task::Run { args } => tasks::run(&args),
        Task::Test {
            no_lint,
            soak,
            cargo_test_args,
        } => tasks::test(!no_lint, soak, &cargo_test_args),
        Task::Bench { args } => tasks::bench(&args),
        Task::Lint => tasks::lint(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nerror: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prepends cargo's bin directories to PATH (for this process and so for every child):
/// `cargo install bpf-linker` puts it there, and the nested builds must find it even on a
/// machine whose login PATH lacks it (e.g. root under sudo, or CI).
fn put_cargo_bin_on_path() {
    let mut wanted: Vec<PathBuf> = Vec::new();
    if let Some(cargo_home) = env::var_os("CARGO_HOME") {
        wanted.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        wanted.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    let current: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for dir in wanted {
        if !current.contains(&dir) && !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    if dirs.is_empty() {
        return;
    }
    dirs.extend(current);
    // A directory containing ':' cannot go on PATH; then leave PATH as it was.
    if let Ok(path) = env::join_paths(dirs) {
        // Safe here: still single-threaded, before any child or thread starts.
        env::set_var("PATH", path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_passes_hyphenated_args_through() {
        let cli = Cli::parse_from(["xtask", "run", "agent", "--config", "x.yaml"]);
        let Task::Run { args } = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args, ["agent", "--config", "x.yaml"]);

        // Once the first ARG is seen, even --help belongs to `lb`, not to xtask.
        let cli = Cli::parse_from(["xtask", "run", "agent", "--help"]);
        let Task::Run { args } = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args, ["agent", "--help"]);

        // `--` first: everything after it is for `lb`.
        let cli = Cli::parse_from(["xtask", "run", "--", "agent", "--config", "x.yaml"]);
        let Task::Run { args } = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args, ["agent", "--config", "x.yaml"]);

        // No ARGS: the sandbox.
        let cli = Cli::parse_from(["xtask", "run"]);
        let Task::Run { args } = cli.command else {
            panic!("expected run");
        };
        assert!(args.is_empty());
    }

    #[test]
    fn test_takes_cargo_test_args_after_double_dash() {
        let cli = Cli::parse_from([
            "xtask",
            "test",
            "--no-lint",
            "--",
            "--test",
            "e2e",
            "--",
            "--nocapture",
        ]);
        let Task::Test {
            no_lint,
            soak,
            cargo_test_args,
        } = cli.command
        else {
            panic!("expected test");
        };
        assert!(no_lint);
        assert_eq!(soak, None);
        assert_eq!(cargo_test_args, ["--test", "e2e", "--", "--nocapture"]);
    }

    #[test]
    fn test_soak_defaults_to_300_seconds() {
        let soak = |args: &[&str]| {
            let Task::Test { soak, .. } = Cli::parse_from(args).command else {
                panic!("expected test");
            };
            soak
        };
        assert_eq!(soak(&["xtask", "test", "--soak"]), Some(300));
        assert_eq!(soak(&["xtask", "test", "--soak", "120"]), Some(120));
        assert_eq!(
            soak(&["xtask", "test", "--soak", "--", "--test", "soak"]),
            Some(300)
        );
    }
}
