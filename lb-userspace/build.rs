//! Builds the eBPF object (lb-ebpf) for the BPF target and hands its path to the crate
//! as `LB_EBPF_OBJECT`, so the agent embeds exactly the programs it was built with.
//!
//! Two toolchain routes, whichever is present:
//! - Debian's rustc with a prebuilt BPF `core` (`libstd-rust-web-dev-bpf`), run with
//!   `RUSTC_BOOTSTRAP=1` because aya-ebpf uses unstable features;
//! - a rustup nightly with `rust-src`, building `core` with `-Z build-std=core`.
//!
//! Both need `bpf-linker` on PATH. `cargo xtask setup` installs what is missing.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

enum Route {
    DebianPrebuiltCore,
    NightlyBuildStd,
}

fn debian_core_present() -> bool {
    let dir = Path::new("/usr/lib/rustlib").join(TARGET).join("lib");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false)
        && Path::new(DEBIAN_RUSTC).exists()
}

fn nightly_rust_src_present() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    out.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib/src/rust/library/core")
            .exists()
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    for dir in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_ROUTE");

    let route = match env::var("LB_EBPF_ROUTE").as_deref() {
        Ok("debian") => Route::DebianPrebuiltCore,
        Ok("nightly") => Route::NightlyBuildStd,
        _ if debian_core_present() => Route::DebianPrebuiltCore,
        _ if nightly_rust_src_present() => Route::NightlyBuildStd,
        _ => fail(
            "no toolchain can build the eBPF programs: neither Debian's rustc with a BPF core \
             (apt-get install rustc-web libstd-rust-web-dev-bpf) nor a rustup nightly with \
             rust-src (rustup component add rust-src --toolchain nightly) is present. \
             Run `cargo xtask setup`.",
        ),
    };
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        fail(
            "bpf-linker is not on PATH. Run `cargo xtask setup` (it builds bpf-linker \
             against LLVM 22).",
        );
    }

    let target_dir = workspace.join("target").join("ebpf");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    // Nothing of the outer (host) build may leak into the BPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--package",
            "lb-ebpf",
            "--release",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    match route {
        Route::DebianPrebuiltCore => {
            cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
        }
        Route::NightlyBuildStd => {
            cmd.env("RUSTUP_TOOLCHAIN", "nightly")
                .args(["-Z", "build-std=core"]);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("could not run {cargo}: {e}")));
    if !status.success() {
        fail(&format!(
            "building lb-ebpf failed ({status}): see the compiler output above"
        ));
    }
    let out = target_dir.join(TARGET).join("release");
    println!(
        "cargo:rustc-env=LB_EBPF_OBJECT={}",
        out.join("lb").display()
    );
    println!(
        "cargo:rustc-env=LB_EBPF_BASELINE_OBJECT={}",
        out.join("baseline").display()
    );
}

fn fail(msg: &str) -> ! {
    println!("cargo:warning={msg}");
    eprintln!("error: {msg}");
    std::process::exit(1);
}
