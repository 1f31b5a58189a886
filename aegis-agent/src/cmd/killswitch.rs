//! `aegis-agent kill-switch on|off --agent NAME | --all`: asks the running agent.

use std::process::ExitCode;

use crate::{
    cli::{KillSwitchArgs, OnOff},
    control::{self, Reply, Request},
};

/// Sends the switch to the agent and prints the switches now on; exit 0, or 2 on a refusal.
pub fn kill_switch(args: &KillSwitchArgs) -> anyhow::Result<ExitCode> {
    let request = Request::KillSwitch {
        on: args.state == OnOff::On,
        agent: if args.all { None } else { args.agent.clone() },
    };
    match control::call(&args.socket.control_socket, &request)? {
        Reply::KillSwitch { all, agents } => {
            println!(
                "kill switches on: {}",
                if all {
                    "all agents".to_owned()
                } else if agents.is_empty() {
                    "none".to_owned()
                } else {
                    agents.join(", ")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Reply::Error { message } => {
            eprintln!("aegis-agent: kill switch refused: {message}");
            Ok(ExitCode::from(2))
        }
        other => anyhow::bail!("unexpected reply from the agent: {other:?}"),
    }
}
