//! Human approval of `approval_needed` calls, and the one-time override tokens it yields.
//!
//! When a policy says `approval_needed`, the enforcer files an [`Approval`]: who asked
//! (identity), what (tool, action, method, URL), the parameters that triggered it (redacted by
//! every built-in DLP detector before they leave the node), the rule, and a hash of the exact
//! request ([`request_hash`]). A webhook announces it (Slack- or Teams-shaped, [`webhook`]).
//! Humans decide with `aegis-agent approvals approve|deny ID` (control socket) or the
//! authenticated local HTTP API ([`api`]).
//!
//! Approving mints an **override token**: a JWT signed with the node's Ed25519 approval key
//! (`alg: EdDSA`, RFC 8037) whose claims bind it to the identity and the request hash, with a
//! short expiry. The workload needs no change: its retry of the same request (same method, URL
//! and canonical body) finds the approved token, which is verified like a presented one and
//! then spent: the retry passes once. A token can also be presented in a header (e.g. handed to
//! an operator); a second use, another body, another identity or an expired token is refused.
//!
//! Approvals are kept in memory and written through to disk ([`store`]) when a store is
//! given: a restarted or upgraded agent keeps pending approvals and unspent tokens, and never
//! accepts a spent token again.

pub mod api;
pub mod store;
pub mod webhook;

use std::{
    collections::HashMap,
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{audit::AuditLog, identity::Identity};

/// Approvals kept at most (pending and decided); beyond, the oldest decided ones are dropped
/// first, then new requests are refused (fail closed).
const MAX_APPROVALS: usize = 10_000;
/// Domain separation of [`request_hash`].
const HASH_CONTEXT: &str = "aegis-approval-v1";

/// Lifetimes of approvals and override tokens.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a request waits for a human before it expires.
    pub ttl: Duration,
    /// How long an override token may be used once minted.
    pub token_ttl: Duration,
    /// How long the workload's request is held open waiting for a decision (zero: answered at
    /// once with the approval id; the workload retries).
    pub hold: Duration,
}

/// Where an approval stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved {
        by: String,
        /// Seconds since the epoch.
        at: u64,
        /// `jti` of the override token.
        jti: String,
    },
    Denied {
        by: String,
        at: u64,
        reason: String,
    },
    /// The override token was spent by a retry.
    Used {
        by: String,
        at: u64,
        jti: String,
    },
    Expired,
}

/// One approval request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// 16 random bytes, hex.
    pub id: String,
    pub agent: String,
    pub tenant: String,
    pub tool: Option<String>,
    pub action: Option<String>,
    pub method: String,
    /// `https://host/path?query`, the query redacted by DLP.
    pub url: String,
    /// The request's parameters (JSON body, form fields or text), DLP-redacted.
    pub params: serde_json::Value,
    /// The policy rule that asked for approval.
    pub rule: String,
    /// [`request_hash`] of the request, hex.
    pub request_hash: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub expires: u64,
    #[serde(flatten)]
    pub state: State,
    /// The override token while approved and unused (never serialized: `list` must not hand
    /// out tokens; `approve` returns it once).
    #[serde(skip)]
    token: Option<String>,
    /// When that token expires, seconds since the epoch.
    #[serde(skip)]
    token_exp: u64,
}

/// What the enforcer knows when filing an approval.
pub struct NewApproval<'a> {
    pub identity: &'a Identity,
    pub tool: Option<String>,
    pub action: Option<String>,
    pub method: &'a str,
    pub url: String,
    pub params: serde_json::Value,
    pub rule: String,
    pub request_hash: String,
}

/// A spent override token: the retry it let through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redeemed {
    pub approval_id: String,
    pub approved_by: String,
    pub jti: String,
}

/// Why an override token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("invalid override token: {0}")]
    Invalid(String),
    #[error("override token of approval {0} was already used")]
    Used(String),
    #[error("override token is for {claimed}, the calling workload is {actual}")]
    WrongIdentity { claimed: String, actual: String },
    #[error("override token was approved for another request (method, URL or body differ)")]
    RequestMismatch,
    #[error("override token names approval {0}, which is not approved")]
    NotApproved(String),
    #[error("recording the token's use failed (refused: fail closed): {0}")]
    Store(String),
}

impl OverrideError {
    /// Stable reason code, as it appears in events.
    pub fn reason(&self) -> &'static str {
        match self {
            OverrideError::Invalid(_) => "override_invalid",
            OverrideError::Used(_) => "override_used",
            OverrideError::WrongIdentity { .. } => "override_wrong_identity",
            OverrideError::RequestMismatch => "override_request_mismatch",
            OverrideError::NotApproved(_) => "override_not_approved",
            OverrideError::Store(_) => "approvals_unavailable",
        }
    }
}

/// Why a decision was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no approval {0}")]
    NotFound(String),
    #[error("approval {id} is not pending (it is {state})")]
    NotPending { id: String, state: &'static str },
    #[error("signing the override token: {0}")]
    Sign(String),
}

/// Claims of an override token.
#[derive(Debug, Serialize, Deserialize)]
struct OverrideClaims {
    /// Approval id.
    aid: String,
    agent: String,
    tenant: String,
    /// [`request_hash`], hex.
    req: String,
    jti: String,
    iat: u64,
    exp: u64,
}

/// The node's approvals.
pub struct Approvals {
    settings: Settings,
    encoding: EncodingKey,
    decoding: DecodingKey,
    inner: Mutex<HashMap<String, Approval>>,
    /// Bumped on every decision; held requests wait on it.
    decided: tokio::sync::watch::Sender<u64>,
    audit: AuditLog,
    webhook: Option<webhook::Webhook>,
    store: Option<store::ApprovalStore>,
    /// Whether the store's approvals are in `inner` (false while a predecessor holds it).
    loaded: std::sync::atomic::AtomicBool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_hex() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// SHA-256 (hex) of the exact request an approval covers: `aegis-approval-v1`, the method,
/// `host` + path + `?query`, and the body, newline-separated. A JSON body is canonicalized first
/// (object keys sorted, no insignificant whitespace) so a client re-serializing the same
/// document still matches; any other body counts byte for byte.
pub fn request_hash(
    method: &str,
    host: &str,
    path_and_query: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> String {
    let canonical = content_type
        .filter(|ct| ct.to_ascii_lowercase().contains("json"))
        .and_then(|_| serde_json::from_slice::<serde_json::Value>(body).ok())
        .map(|v| canonical_json(&v).into_bytes());
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [HASH_CONTEXT.as_bytes(), method.as_bytes(), host.as_bytes()] {
        ctx.update(part);
        ctx.update(b"\n");
    }
    ctx.update(path_and_query.as_bytes());
    ctx.update(b"\n");
    ctx.update(canonical.as_deref().unwrap_or(body));
    hex::encode(ctx.finish())
}

/// `v` serialized with object keys in sorted order and no whitespace.
fn canonical_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let members: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::Value::String(k.clone()),
                        canonical_json(&map[k])
                    )
                })
                .collect();
            format!("{{{}}}", members.join(","))
        }
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

/// Loads (or creates, mode 0600, with `<path>.pub`) the node's approval signing key: the same
/// PEM formats as the audit key (PKCS#8 private, SubjectPublicKeyInfo public).
///
/// # Errors
/// The file cannot be read or created, or holds no Ed25519 key.
pub fn load_key(path: &Path) -> anyhow::Result<(EncodingKey, DecodingKey)> {
    use anyhow::Context as _;
    let key = crate::audit::chain::AuditKey::load_or_create(path)?;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let encoding = EncodingKey::from_ed_pem(&pem)
        .with_context(|| format!("{}: not an Ed25519 PKCS#8 key", path.display()))?;
    Ok((encoding, DecodingKey::from_ed_der(key.public_raw())))
}

impl Approvals {
    /// Approvals signing override tokens with `keys` ([`load_key`]), recording to `audit`,
    /// announcing through `webhook` when set, kept in `store` when given (loaded from it).
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn new(
        settings: Settings,
        keys: (EncodingKey, DecodingKey),
        audit: AuditLog,
        webhook: Option<webhook::Webhook>,
        store: Option<store::ApprovalStore>,
    ) -> Result<Approvals, String> {
        let approvals = Approvals {
            settings,
            encoding: keys.0,
            decoding: keys.1,
            inner: Mutex::new(HashMap::new()),
            loaded: std::sync::atomic::AtomicBool::new(store.is_none()),
            decided: tokio::sync::watch::channel(0).0,
            audit,
            webhook,
            store,
        };
        // A store held by a predecessor (an upgrade's overlap) is loaded on a later use.
        if let Some(store) = &approvals.store
            && let Err(e) = store.load()
            && !e.contains("already open")
        {
            return Err(e);
        }
        drop(approvals.lock());
        Ok(approvals)
    }

    /// Writes the `changed` approvals through to the store; a failure is logged and returned.
    fn persist(&self, all: &HashMap<String, Approval>, changed: &[String]) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        store.sync(all, changed).inspect_err(|e| {
            tracing::error!(target: "aegis::approval", error = %e, "writing approvals to disk failed");
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The approvals, with the stored ones merged in on the first use the store allows.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Approval>> {
        use std::sync::atomic::Ordering;
        let mut all = self.inner.lock().expect("approvals lock poisoned");
        if !self.loaded.load(Ordering::Acquire)
            && let Some(store) = &self.store
            && let Ok(stored) = store.load()
        {
            for (id, a) in stored {
                all.entry(id).or_insert(a);
            }
            self.loaded.store(true, Ordering::Release);
            publish_pending(&all);
        }
        all
    }

    /// Files an approval for a request, or returns the pending one of the same identity and
    /// request hash (a workload retrying before a decision does not file another).
    ///
    /// # Errors
    /// Too many approvals are kept (the request is refused, not let through).
    pub fn request(&self, new: NewApproval<'_>) -> Result<Approval, String> {
        let t = now();
        let mut all = self.lock();
        let mut changed = expire(&mut all, t);
        if let Some(pending) = all.values().find(|a| {
            a.state == State::Pending
                && a.request_hash == new.request_hash
                && a.agent == new.identity.agent.as_str()
                && a.tenant == new.identity.tenant.as_str()
        }) {
            return Ok(pending.clone());
        }
        if all.len() >= MAX_APPROVALS {
            let mut decided: Vec<(u64, String)> = all
                .values()
                .filter(|a| a.state != State::Pending && a.token.is_none())
                .map(|a| (a.created, a.id.clone()))
                .collect();
            decided.sort();
            for (_, id) in decided.iter().take(all.len() + 1 - MAX_APPROVALS) {
                all.remove(id);
                changed.push(id.clone());
            }
            if all.len() >= MAX_APPROVALS {
                return Err(format!("{MAX_APPROVALS} approvals pending; refusing more"));
            }
        }
        let approval = Approval {
            id: random_hex(),
            agent: new.identity.agent.to_string(),
            tenant: new.identity.tenant.to_string(),
            tool: new.tool,
            action: new.action,
            method: new.method.to_owned(),
            url: new.url,
            params: new.params,
            rule: new.rule,
            request_hash: new.request_hash,
            created: t,
            expires: t + self.settings.ttl.as_secs(),
            state: State::Pending,
            token: None,
            token_exp: 0,
        };
        all.insert(approval.id.clone(), approval.clone());
        changed.push(approval.id.clone());
        // Not durable when the write fails (logged), but the request is still held: fail closed.
        let _ = self.persist(&all, &changed);
        publish_pending(&all);
        drop(all);
        self.audit.append(&AuditRecord {
            kind: "approval_requested",
            approval: &approval,
        });
        tracing::info!(target: crate::telemetry::EVENT_TARGET, kind = "approval_requested", approval_id = %approval.id, agent = %approval.agent, tenant = %approval.tenant, tool = approval.tool.as_deref(), action = approval.action.as_deref(), rule = %approval.rule, "approval requested");
        if let Some(hook) = &self.webhook {
            hook.announce(&approval);
        }
        Ok(approval)
    }

    /// Every approval not yet dropped, newest first (tokens are never listed).
    pub fn list(&self) -> Vec<Approval> {
        let mut all = self.lock();
        let changed = expire(&mut all, now());
        let _ = self.persist(&all, &changed);
        let mut out: Vec<Approval> = all.values().cloned().collect();
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        out
    }

    /// Approvals still waiting for a human.
    pub fn pending(&self) -> usize {
        let mut all = self.lock();
        let changed = expire(&mut all, now());
        let _ = self.persist(&all, &changed);
        publish_pending(&all);
        all.values().filter(|a| a.state == State::Pending).count()
    }

    /// Approves (minting the override token, returned with the approval) or denies pending
    /// approval `id` on behalf of `by`.
    ///
    /// # Errors
    /// No such approval, or it is no longer pending.
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        reason: Option<&str>,
    ) -> Result<(Approval, Option<String>), DecideError> {
        let t = now();
        let mut all = self.lock();
        let mut changed = expire(&mut all, t);
        let Some(approval) = all.get_mut(id) else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        if approval.state != State::Pending {
            return Err(DecideError::NotPending {
                id: id.to_owned(),
                state: state_name(&approval.state),
            });
        }
        let token = if approve {
            let claims = OverrideClaims {
                aid: approval.id.clone(),
                agent: approval.agent.clone(),
                tenant: approval.tenant.clone(),
                req: approval.request_hash.clone(),
                jti: random_hex(),
                iat: t,
                exp: t + self.settings.token_ttl.as_secs().max(1),
            };
            let token =
                jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
                    .map_err(|e| DecideError::Sign(e.to_string()))?;
            approval.state = State::Approved {
                by: by.to_owned(),
                at: t,
                jti: claims.jti,
            };
            approval.token = Some(token.clone());
            approval.token_exp = claims.exp;
            Some(token)
        } else {
            approval.state = State::Denied {
                by: by.to_owned(),
                at: t,
                reason: reason.unwrap_or("").to_owned(),
            };
            None
        };
        let approval = approval.clone();
        changed.push(approval.id.clone());
        let _ = self.persist(&all, &changed);
        publish_pending(&all);
        drop(all);
        self.audit.append(&AuditRecord {
            kind: "approval_decided",
            approval: &approval,
        });
        // On disk before the approver is told it is done.
        if !self.audit.sync() {
            tracing::error!(target: "aegis::approval", approval_id = %approval.id, "the audit log did not confirm the decision within 2 s (its writer is stalled, or its queue full)");
        }
        tracing::info!(target: crate::telemetry::EVENT_TARGET, kind = "approval_decided", approval_id = %approval.id, outcome = state_name(&approval.state), by, "approval decided");
        self.decided.send_modify(|n| *n = n.wrapping_add(1));
        Ok((approval, token))
    }

    /// Spends an override token for a request of `identity` with `request_hash`: the one
    /// presented in a header, or else the one an approval of this very request holds. `None`:
    /// no token applies (the request needs approval).
    ///
    /// # Errors
    /// A presented token that is invalid, expired, spent, another identity's or another
    /// request's (refused: a presented token is never silently ignored).
    pub fn redeem(
        &self,
        identity: &Identity,
        request_hash: &str,
        presented: Option<&str>,
    ) -> Result<Option<Redeemed>, OverrideError> {
        let mut all = self.lock();
        let t = now();
        let mut changed = expire(&mut all, t);
        let token = match presented {
            Some(token) => token.to_owned(),
            None => {
                let found = all.values().find(|a| {
                    a.token.is_some()
                        && a.request_hash == request_hash
                        && a.agent == identity.agent.as_str()
                        && a.tenant == identity.tenant.as_str()
                });
                match found.and_then(|a| a.token.clone()) {
                    Some(token) => token,
                    None => return Ok(None),
                }
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let claims = jsonwebtoken::decode::<OverrideClaims>(&token, &self.decoding, &validation)
            .map_err(|e| OverrideError::Invalid(e.to_string()))?
            .claims;
        if claims.agent != identity.agent.as_str() || claims.tenant != identity.tenant.as_str() {
            return Err(OverrideError::WrongIdentity {
                claimed: format!("{}@{}", claims.agent, claims.tenant),
                actual: identity.to_string(),
            });
        }
        if claims.req != request_hash {
            return Err(OverrideError::RequestMismatch);
        }
        let Some(approval) = all.get_mut(&claims.aid) else {
            return Err(OverrideError::NotApproved(claims.aid));
        };
        let by = match &approval.state {
            State::Approved { by, jti, .. } if *jti == claims.jti => by.clone(),
            State::Used { .. } => return Err(OverrideError::Used(claims.aid)),
            _ => return Err(OverrideError::NotApproved(claims.aid)),
        };
        approval.state = State::Used {
            by: by.clone(),
            at: t,
            jti: claims.jti.clone(),
        };
        approval.token = None;
        let approval = approval.clone();
        changed.push(approval.id.clone());
        // The use is on disk before the call goes out: a restart never accepts it again.
        self.persist(&all, &changed).map_err(OverrideError::Store)?;
        drop(all);
        self.audit.append(&AuditRecord {
            kind: "approval_used",
            approval: &approval,
        });
        Ok(Some(Redeemed {
            approval_id: claims.aid,
            approved_by: by,
            jti: claims.jti,
        }))
    }

    /// Waits until approval `id` is decided or `timeout` passes; true when it was approved.
    pub async fn wait(&self, id: &str, timeout: Duration) -> bool {
        let mut rx = self.decided.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let state = self.lock().get(id).map(|a| a.state.clone());
            match state {
                Some(State::Approved { .. }) => return true,
                Some(State::Pending) => {}
                _ => return false,
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

/// Publishes the number of pending approvals (`aegis_approvals_pending`).
fn publish_pending(all: &HashMap<String, Approval>) {
    let n = all.values().filter(|a| a.state == State::Pending).count();
    crate::metrics::global().set_approvals_pending(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Marks pending approvals and unspent override tokens past their expiry as expired, and
/// drops approvals decided over a day ago; returns the ids changed or dropped.
fn expire(all: &mut HashMap<String, Approval>, t: u64) -> Vec<String> {
    let mut changed = Vec::new();
    for a in all.values_mut() {
        let token_gone = a.token.is_some() && a.token_exp <= t;
        if (a.state == State::Pending && a.expires <= t) || token_gone {
            a.state = State::Expired;
            a.token = None;
            changed.push(a.id.clone());
        }
    }
    all.retain(|id, a| {
        let keep = a.state == State::Pending || a.token.is_some() || a.expires + 86_400 > t;
        if !keep {
            changed.push(id.clone());
        }
        keep
    });
    changed
}

fn state_name(s: &State) -> &'static str {
    match s {
        State::Pending => "pending",
        State::Approved { .. } => "approved",
        State::Denied { .. } => "denied",
        State::Used { .. } => "used",
        State::Expired => "expired",
    }
}

#[derive(Serialize)]
struct AuditRecord<'a> {
    kind: &'static str,
    approval: &'a Approval,
}

#[cfg(test)]
mod tests;
