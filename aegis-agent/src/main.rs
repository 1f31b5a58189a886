//! `aegis-agent`: the Aegis node daemon and CLI.
#![deny(unsafe_code)]

mod cgroup;
mod cli;
mod cmd;
mod control;
mod dns;
mod ebpf;
mod egress;
mod identity;
mod policy;
mod telemetry;

use std::process::ExitCode;

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
