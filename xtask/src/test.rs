//! `cargo xtask test`: the README's and CI's test command. Runs, in order and stopping at the
//! first failure (named in the error): setup, rustfmt, clippy, the eBPF object check (skipped,
//! with the reason, without the eBPF toolchain), unit tests, and the root integration tests in
//! `tests/` against a freshly built agent.

use anyhow::{Context as _, Result, ensure};

use crate::{
    cmd::{self, cargo},
    ebpf, setup,
    setup::EbpfToolchain,
};

/// Arguments of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Args {
    /// Don't check or install prerequisites first.
    #[arg(long)]
    no_setup: bool,
    /// Filter (and other arguments) passed to the integration test harness.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    filter: Vec<String>,
}

/// Runs `cargo xtask test`.
pub fn run(args: &Args) -> Result<()> {
    if args.no_setup {
        println!("==> setup: skipped (--no-setup)");
    } else {
        step("setup", setup::run)?;
    }
    step("fmt", || {
        cmd::run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        cmd::run(
            cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "aegis-ebpf",
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"]),
        )
    })?;
    match EbpfToolchain::probe().unavailable() {
        Some(why) => println!("==> ebpf object check: skipped, {why}"),
        None => step("ebpf object check", ebpf::check)?,
    }
    step("unit tests", || {
        cmd::run(cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "aegis-ebpf",
            "--exclude",
            "aegis-tests",
        ]))
    })?;
    step("integration tests", || {
        ensure!(
            setup::is_root(),
            "the integration tests need root (cgroups, network namespaces, BPF): rerun as root, \
             e.g. `sudo -E cargo xtask test`"
        );
        let agent = build_agent()?;
        cmd::run(
            cargo()
                .args(["test", "-p", "aegis-tests", "--", "--test-threads=1"])
                .args(&args.filter)
                .env("AEGIS_AGENT_BIN", agent),
        )
    })?;
    println!("==> all steps passed");
    Ok(())
}

/// Builds the agent (debug) and returns the absolute path of its binary.
pub fn build_agent() -> Result<std::path::PathBuf> {
    cmd::run(cargo().args(["build", "-p", "aegis-agent"]))?;
    Ok(cmd::target_dir().join("debug").join("aegis-agent"))
}

/// Prints a header for the step `name`, runs it, and names it if it fails.
fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> {name}");
    f().with_context(|| format!("step `{name}` failed"))
}
