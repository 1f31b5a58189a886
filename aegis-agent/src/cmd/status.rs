//! `aegis-agent status`: asks the running agent whether it is ready.

use std::process::ExitCode;

use crate::{
    cli::SocketArgs,
    control::{self, Reply, Request},
};

pub fn status(args: &SocketArgs) -> anyhow::Result<ExitCode> {
    let reply = control::call(&args.control_socket, &Request::Status)?;
    println!("{}", serde_json::to_string(&reply)?);
    Ok(match reply {
        Reply::Status { ready: true, .. } => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}
