//! `cargo xtask bench`: builds the agent and the connect bench in release mode and runs the
//! `bench` example of `aegis-tests` (connect() and DNS proxy, each against a baseline in the
//! same run). Needs root; record the output in `docs/benchmarks.md`.

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result};

use crate::{cmd, setup};

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Don't check or install prerequisites first.
    #[arg(long)]
    no_setup: bool,
    /// Seconds per DNS run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
}

/// Runs `cargo xtask bench`; returns only on failure.
pub fn run(args: &Args) -> Result<()> {
    run_example("bench", args.no_setup, args.seconds)
}

/// Sets up (unless `no_setup`), builds the agent and the test binaries and examples in release
/// mode, and replaces this process with `example` of `aegis-tests`, which finds the agent and
/// the connect bench through `AEGIS_AGENT_BIN` / `AEGIS_CONNECT_BENCH_BIN` and the length of a
/// run through `AEGIS_BENCH_SECONDS`. Returns only on failure.
pub fn run_example(example: &str, no_setup: bool, seconds: u32) -> Result<()> {
    if !no_setup {
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
            example,
        ])
        .env("AEGIS_AGENT_BIN", target.join("aegis-agent"))
        .env(
            "AEGIS_CONNECT_BENCH_BIN",
            target.join("aegis-connect-bench"),
        )
        .env("AEGIS_BENCH_SECONDS", seconds.to_string());
    println!("$ {}", cmd::display(&bench));
    Err(bench.exec()).with_context(|| format!("failed to run `{}`", cmd::display(&bench)))
}
