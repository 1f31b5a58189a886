//! The approvals HTTP API, for humans and their tools (chat bots, consoles), on a local
//! address (`--approvals-listen`, loopback by default).
//!
//! Every request carries `Authorization: Bearer <token>`; the token's SHA-256 must be listed in
//! the approvers file (`--approvers`), which names the approver recorded in the audit log:
//!
//! ```yaml
//! approvers:
//!   - name: alice@acme.example
//!     token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! ```
//!
//! Routes (JSON in, JSON out):
//! - `GET /v1/approvals`: every approval (`{"approvals": [...]}`), newest first;
//! - `POST /v1/approvals/{id}/approve`: `{"approval": {...}, "override_token": "<jwt>"}`;
//! - `POST /v1/approvals/{id}/deny` with an optional body `{"reason": "..."}`.
//!
//! A missing or unknown token gets 401; an unknown approval 404; one no longer pending 409.

use std::{net::SocketAddr, path::Path, sync::Arc};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;

use super::{Approvals, DecideError};

/// Largest request body read, in bytes.
const MAX_BODY: usize = 16 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproversFile {
    approvers: Vec<Approver>,
}

/// One person (or system) allowed to decide approvals.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approver {
    pub name: String,
    /// SHA-256 of the bearer token, 64 hex digits.
    pub token_sha256: String,
}

/// Reads the approvers file.
///
/// # Errors
/// Unreadable, not the documented YAML (with line and column), a hash that is not 64 hex
/// digits, or no approver at all.
pub fn load_approvers(path: &Path) -> anyhow::Result<Vec<Approver>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let file: ApproversFile = serde_norway::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        anyhow::anyhow!("{}{at}: {e}", path.display())
    })?;
    for a in &file.approvers {
        let ok =
            a.token_sha256.len() == 64 && a.token_sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok || a.name.trim().is_empty() {
            anyhow::bail!(
                "{}: approver {:?}: needs a name and token_sha256 of 64 hex digits",
                path.display(),
                a.name
            );
        }
    }
    if file.approvers.is_empty() {
        anyhow::bail!("{}: no approvers", path.display());
    }
    Ok(file.approvers)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    approvals: Arc<Approvals>,
    approvers: Arc<[Approver]>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(target: "aegis::approval", error = %e, "approvals API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (approvals, approvers) = (approvals.clone(), approvers.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (approvals, approvers) = (approvals.clone(), approvers.clone());
                async move { Ok::<_, hyper::Error>(handle(&approvals, &approvers, peer, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message }))
}

/// The approver whose token the request bears.
fn authenticate<'a>(approvers: &'a [Approver], req: &Request<Incoming>) -> Option<&'a Approver> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex = hex::encode(digest);
    // Compare every entry in full, whatever matched: timing says nothing of the hashes.
    let mut found = None;
    for a in approvers {
        let same = a
            .token_sha256
            .to_ascii_lowercase()
            .bytes()
            .zip(hex.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0;
        if same && found.is_none() {
            found = Some(a);
        }
    }
    found
}

async fn handle(
    approvals: &Approvals,
    approvers: &[Approver],
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let Some(approver) = authenticate(approvers, &req) else {
        tracing::warn!(target: "aegis::approval", %peer, path = %req.uri().path(), "approvals API: unauthenticated request refused");
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "a listed approver's bearer token is required",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return resp;
    };
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, segments.as_slice()) {
        (Method::GET, ["v1", "approvals"]) => json(
            StatusCode::OK,
            serde_json::json!({ "approvals": approvals.list() }),
        ),
        (Method::POST, ["v1", "approvals", id, verb @ ("approve" | "deny")]) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let reason = if body.is_empty() {
                None
            } else {
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(v) => v.get("reason").and_then(|r| r.as_str()).map(str::to_owned),
                    Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
                }
            };
            let by = format!("api:{}", approver.name);
            match approvals.decide(id, *verb == "approve", &by, reason.as_deref()) {
                Ok((approval, token)) => json(
                    StatusCode::OK,
                    serde_json::json!({ "approval": approval, "override_token": token }),
                ),
                Err(e @ DecideError::NotFound(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
                Err(e @ DecideError::NotPending { .. }) => {
                    error(StatusCode::CONFLICT, &e.to_string())
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}
