//! `cargo xtask bench-l7`: builds the agent and the tests in release mode, then runs the
//! `bench_l7` example of `aegis-tests` (the L7 enforcer against a direct call and an nginx TLS
//! proxy in the same run, and the policy decision alone through `aegis-agent policy bench`).
//! Needs root, wrk, h2load and nginx (`cargo xtask setup` installs them); record the output in
//! `docs/benchmarks.md`.

use anyhow::Result;

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
    crate::bench::run_example("bench_l7", args.no_setup, args.seconds)
}
