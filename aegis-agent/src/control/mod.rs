//! The agent's local control socket: a Unix stream socket (mode 0600, root only) speaking one
//! JSON request line and one JSON reply line per connection.
//!
//! `exec` asks the agent to put the calling process (identified by `SO_PEERCRED`, never by what
//! it claims) in a fresh cgroup under an identity; `status` reports readiness. A pathname Unix
//! socket is reachable from any network namespace, so workloads in pod-like namespaces can use
//! `aegis-agent exec` too.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};

/// Longest request line accepted, in bytes.
const MAX_REQUEST: usize = 4096;

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Put the calling process in a new cgroup under identity (agent, tenant).
    Exec {
        agent: String,
        tenant: Option<String>,
    },
    /// Report whether the agent is up.
    Status,
    /// Turn a kill switch on or off: `agent` by name (every tenant), or every agent when
    /// `None`.
    KillSwitch { on: bool, agent: Option<String> },
    /// List approvals.
    ApprovalsList,
    /// Approve or deny a pending approval.
    ApprovalDecide {
        id: String,
        approve: bool,
        reason: Option<String>,
    },
}

/// The agent's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Exec {
        /// The cgroup the process now lives in.
        cgroup: PathBuf,
        /// Numeric identity.
        identity: u32,
        /// Version of the policy in force; `None`: no policy names this identity, so all its
        /// egress is denied.
        policy_version: Option<u32>,
    },
    Status {
        ready: bool,
        /// Registered identity cgroups.
        cgroups: usize,
        /// Loaded policies.
        policies: usize,
        /// Addresses learned from DNS, all identities together.
        learned: usize,
    },
    /// The kill switches on after the change.
    KillSwitch {
        all: bool,
        agents: Vec<String>,
    },
    /// Approvals, newest first (each as [`crate::approval::Approval`] serializes).
    Approvals {
        /// How many still wait for a human.
        pending: usize,
        approvals: Vec<serde_json::Value>,
    },
    /// A decided approval, with its override token when approved.
    ApprovalDecided {
        approval: serde_json::Value,
        override_token: Option<String>,
    },
    Error {
        message: String,
    },
}

/// What the control socket asks of the agent.
pub trait Handler: Send + Sync + 'static {
    /// Puts process `pid` under (agent, tenant).
    ///
    /// # Errors
    /// A message for the client.
    fn exec(&self, pid: u32, agent: &str, tenant: Option<&str>) -> Result<Reply, String>;
    /// The agent's status.
    fn status(&self) -> Reply;
    /// Turns a kill switch on or off, on behalf of the peer `uid`/`pid` (as the kernel
    /// reports them), for the audit log.
    ///
    /// # Errors
    /// A message for the client.
    fn kill_switch(
        &self,
        on: bool,
        agent: Option<&str>,
        uid: u32,
        pid: Option<u32>,
    ) -> Result<Reply, String>;
    /// Every approval.
    fn approvals(&self) -> Reply;
    /// Decides approval `id` on behalf of the peer `uid` (the approver in the audit log).
    ///
    /// # Errors
    /// A message for the client.
    fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        reason: Option<&str>,
        uid: u32,
    ) -> Result<Reply, String>;
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the Aegis agent at {path} (is `aegis-agent run` running?): {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the Aegis agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the Aegis agent at {path} sent an unreadable reply: {source}")]
    Reply {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Sends one request and waits for the reply (blocking).
///
/// # Errors
/// The agent is not running or the exchange fails.
pub fn call(path: &Path, request: &Request) -> Result<Reply, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    serde_json::from_str(&reply).map_err(|source| ControlError::Reply {
        path: path.to_owned(),
        source,
    })
}

/// Binds the control socket at `path` (replacing a stale one) with mode 0600.
///
/// # Errors
/// The directory cannot be created or the socket bound.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests forever.
pub async fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(stream, handler).await {
                        tracing::debug!(target: "aegis::control", error = %e, "control connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(target: "aegis::control", error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn(stream: UnixStream, handler: Arc<dyn Handler>) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    let uid = cred.uid();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::Error {
            message: format!("bad request: {e}"),
        },
        Ok(Request::Status) => handler.status(),
        Ok(Request::KillSwitch { on, agent }) => {
            let handler = handler.clone();
            tokio::task::spawn_blocking(move || handler.kill_switch(on, agent.as_deref(), uid, pid))
                .await
                .map_err(io::Error::other)?
                .unwrap_or_else(|message| Reply::Error { message })
        }
        Ok(Request::ApprovalsList) => handler.approvals(),
        Ok(Request::ApprovalDecide {
            id,
            approve,
            reason,
        }) => handler
            .decide_approval(&id, approve, reason.as_deref(), uid)
            .unwrap_or_else(|message| Reply::Error { message }),
        Ok(Request::Exec { agent, tenant }) => match pid {
            None => Reply::Error {
                message: "the kernel gave no peer pid".into(),
            },
            Some(pid) => {
                let handler = handler.clone();
                tokio::task::spawn_blocking(move || handler.exec(pid, &agent, tenant.as_deref()))
                    .await
                    .map_err(io::Error::other)?
                    .unwrap_or_else(|message| Reply::Error { message })
            }
        },
    };
    let mut out = serde_json::to_string(&reply).expect("replies serialize");
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;

    impl Handler for Fake {
        fn exec(&self, pid: u32, agent: &str, _tenant: Option<&str>) -> Result<Reply, String> {
            if agent == "bad" {
                return Err("no".into());
            }
            Ok(Reply::Exec {
                cgroup: PathBuf::from(format!("/cg/{agent}.{pid}")),
                identity: 1,
                policy_version: Some(2),
            })
        }
        fn status(&self) -> Reply {
            Reply::Status {
                ready: true,
                cgroups: 0,
                policies: 3,
                learned: 0,
            }
        }
        fn kill_switch(
            &self,
            _on: bool,
            _agent: Option<&str>,
            _uid: u32,
            _pid: Option<u32>,
        ) -> Result<Reply, String> {
            Err("not here".into())
        }
        fn approvals(&self) -> Reply {
            Reply::Approvals {
                pending: 0,
                approvals: vec![],
            }
        }
        fn decide_approval(
            &self,
            _id: &str,
            _approve: bool,
            _reason: Option<&str>,
            _uid: u32,
        ) -> Result<Reply, String> {
            Err("not here".into())
        }
    }

    #[tokio::test]
    async fn exec_uses_the_kernel_reported_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = bind(&path).unwrap();
        tokio::spawn(serve(listener, Arc::new(Fake)));
        let p = path.clone();
        let reply = tokio::task::spawn_blocking(move || {
            call(
                &p,
                &Request::Exec {
                    agent: "a".into(),
                    tenant: None,
                },
            )
        })
        .await
        .unwrap()
        .unwrap();
        let me = std::process::id();
        assert_eq!(
            reply,
            Reply::Exec {
                cgroup: PathBuf::from(format!("/cg/a.{me}")),
                identity: 1,
                policy_version: Some(2)
            }
        );
        let p = path.clone();
        let reply = tokio::task::spawn_blocking(move || {
            call(
                &p,
                &Request::Exec {
                    agent: "bad".into(),
                    tenant: None,
                },
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            reply,
            Reply::Error {
                message: "no".into()
            }
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn garbage_gets_an_error_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        tokio::spawn(serve(bind(&path).unwrap(), Arc::new(Fake)));
        let p = path.clone();
        let reply = tokio::task::spawn_blocking(move || {
            let mut s = StdUnixStream::connect(&p).unwrap();
            s.write_all(b"{\"op\":\"format_disk\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        assert!(reply.contains("bad request"), "{reply}");
    }
}
