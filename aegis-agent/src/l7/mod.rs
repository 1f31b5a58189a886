//! The L7 enforcer: TLS-bearing calls to *inspected* domains, redirected here by the kernel,
//! are terminated with the node CA, decided by policy (parameter constraints, DLP sanitize,
//! approval), and re-originated to the real upstream.
//!
//! `proxy` holds the whole request path; `ca` the node CA; the policy decision is behind
//! [`Decider`] so the proxy does not depend on how policies are evaluated.

pub mod ca;
pub mod decide;
pub mod limits;
pub mod proxy;
mod upstream;
pub mod usage;

use crate::identity::Identity;

/// What the proxy knows of a request when asking for a decision.
#[derive(Debug)]
pub struct DecisionRequest<'a> {
    pub identity: &'a Identity,
    /// The SNI (equal to the Host), lowercase.
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// The whole request body (bounded by the enforcer's size limit).
    pub body: &'a [u8],
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward unchanged.
    Allow,
    /// Forward `body` instead of the original (DLP matches redacted); `findings` matches.
    Sanitize { body: Vec<u8>, findings: usize },
    /// Refuse with 403 and a JSON body naming the rule.
    Deny,
    /// Hold for a human: the proxy files an approval (or spends the override token of an
    /// approved one) — see [`crate::approval`].
    ApprovalNeeded,
}

impl Verdict {
    /// Stable name, as it appears in events.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Sanitize { .. } => "sanitize",
            Verdict::Deny => "deny",
            Verdict::ApprovalNeeded => "approval_needed",
        }
    }
}

/// A decision with what explains it.
#[derive(Clone, Debug)]
pub struct Decision {
    pub verdict: Verdict,
    /// Shadow mode: what enforcement would have done (`would_deny`, ...); the verdict is then
    /// `Allow`.
    pub would: Option<String>,
    /// The rule that decided, e.g. `constraint_violated: amount > max 5000`.
    pub reason: String,
    pub tool: Option<String>,
    pub action: Option<String>,
    pub policy_version: u32,
    /// `enforce` or `shadow`.
    pub mode: &'static str,
    /// The call's price when the policy sets one.
    pub estimated_cost_usd: Option<f64>,
}

/// Decides L7 requests.
pub trait Decider: Send + Sync {
    /// The decision for `req`.
    ///
    /// # Errors
    /// The policy cannot be evaluated (the proxy then refuses: fail closed).
    fn decide(&self, req: &DecisionRequest<'_>) -> Result<Decision, String>;
}
