//! `cargo xtask ebpf [--check]`: builds the kernel programs from source exactly as
//! `aya-build` 0.2.0 does in `aegis-agent/build.rs` and refreshes (or checks) the committed
//! fallback object that the agent embeds when the eBPF toolchain is missing.
//!
//! Invariants: the build uses the preinstalled `nightly` and its own target directory
//! (`target/xtask-ebpf`), so it never invalidates the agent's build; the check compares objects
//! with [`crate::elf::differences`], which ignores the BTF and DWARF that carry absolute paths.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, elf, setup::EbpfToolchain};

/// The committed object, relative to the workspace root.
pub const PREBUILT: &str = "aegis-ebpf/prebuilt/aegis.bpf.o";

const PACKAGE: &str = "aegis-ebpf";
const BIN: &str = "aegis";
const TARGET: &str = "bpfel-unknown-none";

/// Arguments of `cargo xtask ebpf`.
#[derive(clap::Args)]
pub struct Args {
    /// Don't write the object: fail if the committed one differs from a fresh build.
    #[arg(long)]
    check: bool,
}

/// Runs `cargo xtask ebpf`.
pub fn run(args: &Args) -> Result<()> {
    if let Some(why) = EbpfToolchain::probe().unavailable() {
        bail!("can't build the kernel programs: {why}");
    }
    if args.check { check() } else { refresh() }
}

/// Builds the object and copies it over [`PREBUILT`].
fn refresh() -> Result<()> {
    let built = build()?;
    let dest = cmd::root().join(PREBUILT);
    fs::create_dir_all(dest.parent().expect("PREBUILT has a parent"))?;
    fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    println!("wrote {PREBUILT}");
    Ok(())
}

/// Builds the object and fails if [`PREBUILT`] differs from it in anything but debug info.
pub fn check() -> Result<()> {
    let built = build()?;
    let committed_path = cmd::root().join(PREBUILT);
    let committed = fs::read(&committed_path).with_context(|| {
        format!("reading {PREBUILT}; create it with `cargo xtask ebpf` and commit it")
    })?;
    let fresh = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    let diffs = elf::differences(&committed, &fresh)
        .with_context(|| format!("comparing {PREBUILT} with {}", built.display()))?;
    if !diffs.is_empty() {
        bail!(
            "{PREBUILT} is stale: it differs from a build of the current aegis-ebpf source:\n  \
             {}\nrun `cargo xtask ebpf` and commit the result",
            diffs.join("\n  ")
        );
    }
    println!("{PREBUILT} is up to date");
    Ok(())
}

/// `cargo +nightly build` of the kernel programs with aya-build 0.2.0's flags; returns the
/// path of the built object.
fn build() -> Result<PathBuf> {
    let target_dir = cmd::target_dir().join("xtask-ebpf");
    let mut build = cmd::nightly("cargo");
    build
        .args([
            "build",
            "--package",
            PACKAGE,
            "--bins",
            "--release",
            "--target",
            TARGET,
        ])
        .args(["-Z", "build-std=core", "--features", ""])
        .arg("--target-dir")
        .arg(&target_dir)
        // aya-build: `--cfg=bpf_target_arch="<agent's arch>"`, and BTF for CO-RE and aya-log.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                &format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH),
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        // aya-build: make sure the nightly toolchain's rustc is the one used.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    cmd::run(&mut build)?;
    Ok(target_dir.join(TARGET).join("release").join(BIN))
}
