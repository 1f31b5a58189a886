//! Project tasks that cargo alone can't express, run as `cargo xtask <command>`: installing the
//! machine prerequisites, refreshing and checking the committed eBPF object, the root-only
//! integration tests, and the demo.
//!
//! Invariants: every command that does work is printed before it runs; commands run from the
//! repository root whatever the caller's working directory; the preinstalled `nightly` toolchain
//! is used as-is and never installed or updated.

mod bench;
mod bench_l7;
mod cmd;
mod demo;
mod ebpf;
mod elf;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Aegis project tasks.
#[derive(Parser)]
#[command(bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the system tools, eBPF toolchain and bpffs mount the project needs (idempotent).
    Setup,
    /// Build the kernel programs from source into `aegis-ebpf/prebuilt/aegis.bpf.o`.
    Ebpf(ebpf::Args),
    /// Run everything CI runs: setup, fmt, clippy, eBPF object check, unit and root integration tests.
    Test(test::Args),
    /// Build the agent and run the demo.
    Demo(demo::Args),
    /// Benchmark connect() overhead and the DNS proxy against baselines (root).
    Bench(bench::Args),
    /// Benchmark the L7 enforcer against a direct call and an nginx TLS proxy (root).
    BenchL7(bench_l7::Args),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Setup => setup::run(),
        Command::Ebpf(args) => ebpf::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::BenchL7(args) => bench_l7::run(&args),
    }
}
