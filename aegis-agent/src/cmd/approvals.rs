//! `aegis-agent approvals list|approve|deny`: asks the running agent over its control socket
//! (root only); the caller's uid is recorded as the approver.

use std::process::ExitCode;

use crate::{
    cli::{ApprovalDecideArgs, SocketArgs},
    control::{self, Reply, Request},
};

/// Prints every approval as one JSON object per line; exit 0.
pub fn list(socket: &SocketArgs) -> anyhow::Result<ExitCode> {
    match control::call(&socket.control_socket, &Request::ApprovalsList)? {
        Reply::Approvals { pending, approvals } => {
            eprintln!("{pending} pending, {} in all", approvals.len());
            for a in approvals {
                println!("{a}");
            }
            Ok(ExitCode::SUCCESS)
        }
        other => refused(other),
    }
}

/// Approves or denies; prints the decided approval and, when approved, the override token
/// (the workload's retry finds it by itself; print it for a client that presents it). Exit 0,
/// or 2 when the agent refuses (unknown id, no longer pending).
pub fn decide(args: &ApprovalDecideArgs, approve: bool) -> anyhow::Result<ExitCode> {
    let request = Request::ApprovalDecide {
        id: args.id.clone(),
        approve,
        reason: args.reason.clone(),
    };
    match control::call(&args.socket.control_socket, &request)? {
        Reply::ApprovalDecided {
            approval,
            override_token,
        } => {
            println!("{approval}");
            if let Some(token) = override_token {
                println!("override_token: {token}");
            }
            Ok(ExitCode::SUCCESS)
        }
        other => refused(other),
    }
}

fn refused(reply: Reply) -> anyhow::Result<ExitCode> {
    match reply {
        Reply::Error { message } => {
            eprintln!("aegis-agent: approvals: {message}");
            Ok(ExitCode::from(2))
        }
        other => anyhow::bail!("unexpected reply from the agent: {other:?}"),
    }
}
