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
    // Only the commands whose sole peer is their stdout: those that talk to the agent's
    // control socket report a closed socket as an error.
    if matches!(
        cli.command,
        cli::Command::Policy(_)
            | cli::Command::Audit(_)
            | cli::Command::Token(_)
            | cli::Command::Metrics
    ) {
        die_of_sigpipe();
    }
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aegis-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A command-line tool whose reader goes away (`aegis-agent policy test DIR | head`) ends
/// quietly of SIGPIPE, as Unix tools do: Rust ignores SIGPIPE, which makes `println!` panic on
/// the broken pipe instead. The daemon, `exec` and the control-socket commands keep it
/// ignored: a peer closing a socket must cost them a write error, not their life.
#[allow(unsafe_code, reason = "signal(2), to restore a default disposition")]
fn die_of_sigpipe() {
    // SAFETY: signal(2) installing SIG_DFL runs no handler code; called once, before any
    // thread of ours starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
