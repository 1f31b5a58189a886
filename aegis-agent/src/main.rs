//! `aegis-agent`: the Aegis node daemon and CLI.
#![deny(unsafe_code)]

mod approval;
mod audit;
mod budget;
mod cgroup;
mod cli;
mod cmd;
mod control;
#[cfg_attr(
    not(test),
    expect(dead_code, unused_imports, reason = "wired into the L7 enforcer next")
)]
mod dlp;
mod dns;
mod ebpf;
mod egress;
mod handover;
mod identity;
mod killswitch;
mod l7;
mod metrics;
mod policy;
mod state;
mod telemetry;
mod token;

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the enforcer allocates per request on its runtime threads
/// and frees audit records on the writer thread, where glibc's arenas spent ~13 % of the
/// enforcer's CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aegis-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
