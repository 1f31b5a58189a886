//! Subcommands, one file each.

mod audit;
mod exec;
mod killswitch;
mod policy;
mod run;
mod status;
mod uninstall;

use std::process::ExitCode;

use crate::cli::{AuditCommand, Cli, Command, PolicyCommand};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Exec(args) => exec::exec(args),
        Command::Status(args) => status::status(&args),
        Command::Policy(PolicyCommand::Check { dir }) => policy::check(&dir),
        Command::Policy(PolicyCommand::Compile { dir, out }) => policy::compile(&dir, out),
        Command::Policy(PolicyCommand::Test { dir }) => policy::test(&dir),
        Command::Policy(PolicyCommand::Bench { dir, iterations }) => {
            policy::bench(&dir, iterations)
        }
        Command::Audit(AuditCommand::Verify { file, key }) => audit::verify(&file, &key),
        Command::KillSwitch(args) => killswitch::kill_switch(&args),
        Command::Uninstall(args) => uninstall::uninstall(&args),
    }
}
