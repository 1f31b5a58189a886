//! `aegis-agent exec`: becomes an agent workload, then runs the command in place.

use std::{os::unix::process::CommandExt as _, process::ExitCode};

use anyhow::bail;

use crate::{
    cli::ExecArgs,
    control::{self, Reply, Request},
};

pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let request = Request::Exec {
        agent: args.agent.clone(),
        tenant: args.tenant.clone(),
    };
    // During an upgrade the old agent refuses until the new one owns the control socket.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut reply = control::call(&args.control_socket, &request)?;
    while matches!(&reply, Reply::Error { message } if message == control::HANDING_OVER)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
        reply = control::call(&args.control_socket, &request)?;
    }
    match reply {
        Reply::Exec {
            policy_version: None,
            ..
        } => {
            eprintln!(
                "aegis-agent: warning: no policy names agent {:?}; all of its egress is denied",
                args.agent
            );
        }
        Reply::Exec { .. } => {}
        Reply::Error { message } => bail!("the agent refused: {message}"),
        other => bail!("unexpected reply from the agent: {other:?}"),
    }
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let err = std::process::Command::new(program).args(rest).exec();
    bail!("cannot run {program:?}: {err}")
}
