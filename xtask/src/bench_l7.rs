//! `cargo xtask bench-l7`: builds the agent and the tests in release mode, then runs the
//! `bench_l7` example of `aegis-tests` (the L7 enforcer against a direct call and an nginx TLS
//! proxy in the same run, and the policy decision alone through `aegis-agent policy bench`).
//! Needs root, wrk, h2load and nginx (`cargo xtask setup` installs them); record the output in
//! `docs/benchmarks.md`.

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result};

use crate::{cmd, setup};

/// Arguments of `cargo xtask bench-l7`.
#[derive(clap::Args)]
pub struct Args {
    /// Don't check or install prerequisites first.
    #[arg(long)]
    no_setup: bool,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
}

/// Runs `cargo xtask bench-l7`; returns only on failure.
pub fn run(args: &Args) -> Result<()> {
    if !args.no_setup {
        setup::run()?;
    }
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "aegis-agent",
        "-p",
        "aegis-tests",
        "--bins",
        "--examples",
    ]))?;
    let target = cmd::target_dir().join("release");
    let mut bench = cmd::cargo();
    bench
        .args([
            "run",
            "-q",
            "--release",
            "-p",
            "aegis-tests",
            "--example",
            "bench_l7",
        ])
        .env("AEGIS_AGENT_BIN", target.join("aegis-agent"))
        .env("AEGIS_BENCH_SECONDS", args.seconds.to_string());
    println!("$ {}", cmd::display(&bench));
    Err(bench.exec()).with_context(|| format!("failed to run `{}`", cmd::display(&bench)))
}
