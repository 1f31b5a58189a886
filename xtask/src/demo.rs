//! `cargo xtask demo`: sets up the machine, builds the agent, and replaces itself with the demo
//! (the `demo` example of `aegis-tests`), which finds the agent through `AEGIS_AGENT_BIN`.

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result};

use crate::{cmd, setup, test::build_agent};

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Don't check or install prerequisites first.
    #[arg(long)]
    no_setup: bool,
    /// Arguments passed to the demo.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Runs `cargo xtask demo`; returns only on failure.
pub fn run(args: &Args) -> Result<()> {
    if !args.no_setup {
        setup::run()?;
    }
    let agent = build_agent()?;
    let mut demo = cmd::cargo();
    demo.args(["run", "-q", "-p", "aegis-tests", "--example", "demo", "--"])
        .args(&args.args)
        .env("AEGIS_AGENT_BIN", agent);
    println!("$ {}", cmd::display(&demo));
    Err(demo.exec()).with_context(|| format!("failed to run `{}`", cmd::display(&demo)))
}
