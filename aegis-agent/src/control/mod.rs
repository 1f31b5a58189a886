//! The agent's local control socket: a Unix stream socket (mode 0600, root only) speaking one
//! JSON request line and one JSON reply line per connection.
//!
//! `exec` asks the agent to put the calling process (identified by `SO_PEERCRED`, never by what
//! it claims) in a fresh cgroup under an identity; `status` reports readiness. A pathname Unix
//! socket is reachable from any network namespace, so workloads in pod-like namespaces can use
//! `aegis-agent exec` too.
//!
//! `handover` is the one exchange of more than two lines: a successor agent asks for the
//! listening sockets ([`crate::handover`]); the reply line is followed by the descriptors
//! (`SCM_RIGHTS`, at most [`FDS_PER_MESSAGE`] per message, each message one byte `F`); the
//! successor then sends `handover_commit` once it serves them (the old agent stops reading
//! them and answers `handed_over`), or closes the connection to abort (the old agent goes on
//! as before). Only root (or the agent's own user) may ask.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    mem::MaybeUninit,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    },
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
/// The error message of requests that change node state while the agent hands over to a
/// successor; clients retry (the control socket then leads to the successor).
pub const HANDING_OVER: &str = "the agent is handing over to a new agent process; retry";
/// Descriptors per `SCM_RIGHTS` message of a hand-over (the kernel's limit is 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// How long a running agent waits for its successor to commit a hand-over before it goes on
/// as before (the successor loads the programs and registers every cgroup in between, which
/// takes seconds; a successor slower than this would find the old agent serving on).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(300);

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
    /// A successor agent asks for the listening sockets (see the module docs).
    Handover,
    /// The successor serves the sockets: the old agent stops serving them.
    HandoverCommit,
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
        /// Process id of the agent that answered.
        #[serde(default)]
        pid: u32,
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
    /// Hand-over accepted: `sockets` descriptors follow (see the module docs); `pid` is the
    /// running agent's.
    Handover {
        sockets: usize,
        pid: u32,
    },
    /// The running agent stopped serving the handed-over sockets.
    HandedOver,
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
    /// Stops changing node state (identities, links, policies) and returns duplicates of the
    /// listening sockets for a successor run by `uid`, until [`Handler::handover_end`].
    ///
    /// # Errors
    /// A message for the client (not allowed, a hand-over already in progress).
    fn handover(&self, uid: u32) -> Result<Vec<OwnedFd>, String> {
        let _ = uid;
        Err("this agent does not hand over its sockets".into())
    }
    /// Ends a hand-over: `committed` (the successor serves the sockets: stop serving them) or
    /// aborted (go on as before).
    fn handover_end(&self, committed: bool) {
        let _ = committed;
    }
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
    #[error("hand-over from the Aegis agent at {path}: {message}")]
    Handover { path: PathBuf, message: String },
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

/// Binds the control socket at `path` with mode 0600, replacing an existing one atomically
/// (bound under a temporary name, then renamed over it): a client always finds an agent's
/// socket there, a predecessor's until the rename, this one's after.
///
/// # Errors
/// The directory cannot be created or the socket bound.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".{}.new", std::process::id()));
    let staged = PathBuf::from(staged);
    match std::fs::remove_file(&staged) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&staged)?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staged, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
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
        Ok(Request::Handover) => {
            // The client sends nothing more before our reply: nothing is left buffered.
            let stream = reader
                .into_inner()
                .into_inner()
                .reunite(write)
                .map_err(io::Error::other)?
                .into_std()?;
            stream.set_nonblocking(false)?;
            return tokio::task::spawn_blocking(move || serve_handover(&stream, &*handler, uid))
                .await
                .map_err(io::Error::other)?;
        }
        Ok(Request::HandoverCommit) => Reply::Error {
            message: "no hand-over in progress on this connection".into(),
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

/// The running agent's side of a hand-over (blocking; see the module docs).
fn serve_handover(stream: &StdUnixStream, handler: &dyn Handler, uid: u32) -> io::Result<()> {
    let fds = match handler.handover(uid) {
        Ok(fds) => fds,
        Err(message) => return write_line(stream, &Reply::Error { message }),
    };
    let committed = (|| {
        write_line(
            stream,
            &Reply::Handover {
                sockets: fds.len(),
                pid: std::process::id(),
            },
        )?;
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        send_fds(stream, &borrowed)?;
        drop(fds);
        stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new((&*stream).take(MAX_REQUEST as u64)).read_line(&mut line)?;
        Ok::<_, io::Error>(matches!(
            serde_json::from_str::<Request>(&line),
            Ok(Request::HandoverCommit)
        ))
    })();
    let committed = committed.unwrap_or_else(|e| {
        tracing::warn!(target: "aegis::control", error = %e, "hand-over connection failed");
        false
    });
    handler.handover_end(committed);
    if committed {
        write_line(stream, &Reply::HandedOver)?;
    }
    Ok(())
}

fn write_line(mut stream: &StdUnixStream, value: &impl Serialize) -> io::Result<()> {
    let mut out = serde_json::to_string(value).map_err(io::Error::other)?;
    out.push('\n');
    stream.write_all(out.as_bytes())
}

/// Sends `fds` in messages of at most [`FDS_PER_MESSAGE`], each one byte `F`.
fn send_fds(stream: &StdUnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(chunk)) {
            return Err(io::Error::other("SCM_RIGHTS buffer too small"));
        }
        let sent = sendmsg(
            stream,
            &[io::IoSlice::new(b"F")],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != 1 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// A running agent that is handing its sockets over to this process.
pub struct Predecessor {
    stream: StdUnixStream,
    path: PathBuf,
    /// Its process id.
    pub pid: u32,
    /// The listening sockets it passed.
    pub fds: Vec<OwnedFd>,
}

impl Predecessor {
    /// Tells the predecessor that this process now serves the sockets; it stops serving
    /// them. Dropping a `Predecessor` without committing aborts the hand-over.
    ///
    /// # Errors
    /// The predecessor did not confirm (it may have exited: its sockets are served here
    /// anyway).
    pub fn commit(self) -> Result<(), ControlError> {
        let err = |message: String| ControlError::Handover {
            path: self.path.clone(),
            message,
        };
        write_line(&self.stream, &Request::HandoverCommit).map_err(|e| err(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut line)
            .map_err(|e| err(e.to_string()))?;
        match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::HandedOver) => Ok(()),
            _ => Err(err(format!("unexpected reply {:?}", line.trim_end()))),
        }
    }
}

/// Asks the agent at `path`, if one runs, for its listening sockets (see the module docs).
/// `Ok(None)`: no agent answers there (nothing to take over), or it does not hand over (an
/// older version: its reason is logged); this process then binds its own sockets.
///
/// # Errors
/// The exchange failed half-way (the hand-over is aborted on the other side).
pub fn take_over(path: &Path) -> Result<Option<Predecessor>, ControlError> {
    let err = |message: String| ControlError::Handover {
        path: path.to_owned(),
        message,
    };
    let stream = match StdUnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => {
            return Err(ControlError::Connect {
                path: path.to_owned(),
                source,
            });
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| err(e.to_string()))?;
    write_line(&stream, &Request::Handover).map_err(|e| err(e.to_string()))?;
    let (line, fds) = receive_handover(&stream).map_err(|e| err(e.to_string()))?;
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Handover { sockets, pid }) if sockets == fds.len() => Ok(Some(Predecessor {
            stream,
            path: path.to_owned(),
            pid,
            fds,
        })),
        Ok(Reply::Handover { sockets, .. }) => Err(err(format!(
            "announced {sockets} sockets, passed {}",
            fds.len()
        ))),
        Ok(Reply::Error { message }) => {
            tracing::warn!(target: "aegis::control", path = %path.display(), reason = %message, "the running agent does not hand over; binding new sockets");
            Ok(None)
        }
        _ => Err(err(format!("unexpected reply {:?}", line.trim_end()))),
    }
}

/// Reads a hand-over reply line and the descriptors after it. Every read is a `recvmsg`
/// (a plain read would discard descriptors); the kernel returns at most one message's
/// descriptors per call, in stream order.
fn receive_handover(stream: &StdUnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, recvmsg};
    let mut bytes: Vec<u8> = Vec::new();
    let mut fds = Vec::new();
    let mut expected: Option<(String, usize)> = None;
    loop {
        let want = match &expected {
            None => 512,
            Some((_, chunks)) => {
                let line_end = bytes.iter().position(|b| *b == b'\n').unwrap_or(0) + 1;
                let have = bytes.len() - line_end;
                if have >= *chunks {
                    break;
                }
                chunks - have
            }
        };
        let mut buf = vec![0u8; want];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            stream,
            &mut [io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if got.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::other("descriptors truncated"));
        }
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        bytes.extend_from_slice(&buf[..got.bytes]);
        if expected.is_none()
            && let Some(end) = bytes.iter().position(|b| *b == b'\n')
        {
            let line = String::from_utf8_lossy(&bytes[..end]).into_owned();
            let sockets = match serde_json::from_str::<Reply>(&line) {
                Ok(Reply::Handover { sockets, .. }) => sockets,
                _ => 0,
            };
            expected = Some((line, sockets.div_ceil(FDS_PER_MESSAGE)));
        }
        if bytes.len() > MAX_REQUEST * 4 {
            return Err(io::Error::other("reply line too long"));
        }
    }
    let (line, _) = expected.expect("loop ends once the line is read");
    Ok((line, fds))
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
                pid: 1,
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

    /// Hands over one UDP socket; records how the hand-over ended.
    struct Handing {
        socket: std::net::UdpSocket,
        ended: std::sync::Mutex<Vec<bool>>,
    }

    impl Handler for Handing {
        fn exec(&self, _: u32, _: &str, _: Option<&str>) -> Result<Reply, String> {
            Err("not here".into())
        }
        fn status(&self) -> Reply {
            Fake.status()
        }
        fn kill_switch(
            &self,
            _: bool,
            _: Option<&str>,
            _: u32,
            _: Option<u32>,
        ) -> Result<Reply, String> {
            Err("not here".into())
        }
        fn approvals(&self) -> Reply {
            Fake.approvals()
        }
        fn decide_approval(
            &self,
            _: &str,
            _: bool,
            _: Option<&str>,
            _: u32,
        ) -> Result<Reply, String> {
            Err("not here".into())
        }
        fn handover(&self, _uid: u32) -> Result<Vec<OwnedFd>, String> {
            Ok(vec![OwnedFd::from(
                self.socket.try_clone().map_err(|e| e.to_string())?,
            )])
        }
        fn handover_end(&self, committed: bool) {
            self.ended.lock().unwrap().push(committed);
        }
    }

    /// The successor receives the very socket (a datagram queued on it before the hand-over
    /// is read through the passed descriptor); commit and abort reach the handler.
    #[tokio::test(flavor = "multi_thread")]
    async fn handover_passes_the_sockets_and_ends_with_commit_or_abort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let handler = Arc::new(Handing {
            socket,
            ended: std::sync::Mutex::new(Vec::new()),
        });
        tokio::spawn(serve(bind(&path).unwrap(), handler.clone()));
        let p = path.clone();
        let received = tokio::task::spawn_blocking(move || {
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            client.send_to(b"queued", addr).unwrap();
            let mut predecessor = take_over(&p).unwrap().expect("an agent answers");
            assert_eq!(predecessor.pid, std::process::id());
            let fd = predecessor.fds.pop().expect("one socket");
            let inherited = std::net::UdpSocket::from(fd);
            assert_eq!(inherited.local_addr().unwrap(), addr);
            let mut buf = [0u8; 16];
            let (n, _) = inherited.recv_from(&mut buf).unwrap();
            predecessor.commit().unwrap();
            // A second successor gives up half-way: the hand-over is aborted.
            drop(take_over(&p).unwrap());
            buf[..n].to_vec()
        })
        .await
        .unwrap();
        assert_eq!(received, b"queued");
        for _ in 0..100 {
            if handler.ended.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*handler.ended.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn no_agent_means_nothing_to_take_over() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take_over(&dir.path().join("none.sock")).unwrap().is_none());
    }
}
