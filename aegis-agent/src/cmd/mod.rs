//! Subcommands, one file each.

mod approvals;
mod audit;
mod exec;
mod killswitch;
mod policy;
mod run;
mod status;
mod token;
mod uninstall;

use std::process::ExitCode;

use crate::cli::{ApprovalsCommand, AuditCommand, Cli, Command, PolicyCommand, TokenCommand};

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
        Command::Token(TokenCommand::Issue {
            key,
            org,
            tenant,
            agent,
            scopes,
            ttl_seconds,
        }) => token::issue(&key, &org, &tenant, &agent, &scopes, ttl_seconds),
        Command::Token(TokenCommand::Verify { token, key }) => token::verify(&token, &key),
        Command::KillSwitch(args) => killswitch::kill_switch(&args),
        Command::Approvals(ApprovalsCommand::List(socket)) => approvals::list(&socket),
        Command::Approvals(ApprovalsCommand::Approve(args)) => approvals::decide(&args, true),
        Command::Approvals(ApprovalsCommand::Deny(args)) => approvals::decide(&args, false),
        Command::Uninstall(args) => uninstall::uninstall(&args),
        Command::Metrics => {
            for family in crate::metrics::Metrics::new().catalogue() {
                println!("{family}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
