//! `cargo xtask bench-l7`: builds the agent and the tests in release mode, measures the policy
//! decision alone (aegis-agent's ignored `decision_latency` test), then runs the `bench_l7`
//! example of `aegis-tests` (the L7 enforcer against a direct call and an nginx TLS proxy, in
//! the same run). Needs root, wrk, h2load and nginx (`cargo xtask setup` installs them); record
//! the output in `docs/benchmarks.md`.

use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
};

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
    /// Skip the decision-latency measurement (it compiles aegis-agent's tests in release mode).
    #[arg(long)]
    no_decision: bool,
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
    let decision = if args.no_decision {
        String::new()
    } else {
        decision_latency()?
    };
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
    bench.env("AEGIS_BENCH_DECISION", decision);
    Err(bench.exec()).with_context(|| format!("failed to run `{}`", cmd::display(&bench)))
}

/// The lines of aegis-agent's `decision_latency` measurement that carry numbers.
fn decision_latency() -> Result<String> {
    let mut test: Command = cmd::cargo();
    test.args([
        "test",
        "-q",
        "--release",
        "-p",
        "aegis-agent",
        "--bin",
        "aegis-agent",
        "decision_latency",
        "--",
        "--ignored",
        "--nocapture",
    ])
    .stdin(Stdio::null());
    println!("$ {}", cmd::display(&test));
    let out = test
        .output()
        .with_context(|| format!("failed to start `{}`", cmd::display(&test)))?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "`{}` failed ({}):\n{text}{}",
        cmd::display(&test),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text
        .lines()
        .filter(|l| l.contains("p50"))
        .collect::<Vec<_>>()
        .join("\n"))
}
