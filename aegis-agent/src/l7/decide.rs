//! The enforcer's [`Decider`]: the Rego policy engine for the verdict, the DLP detectors for
//! `sanitize`. The engine is swapped whole on a policy reload (built and validated first).

use std::{
    collections::HashMap,
    str::FromStr as _,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;

use super::{Decider, Decision, DecisionRequest, Verdict};
use crate::{
    dlp::{Builtin, CustomPattern, Detectors},
    policy::{L7Engine, L7Request, L7Verdict, Mode, PolicySet, input},
};

/// Detector sets compiled for (agent, tenant, policy version, kinds); beyond this many the
/// cache is cleared.
const MAX_CACHED_DETECTORS: usize = 1024;

type DetectorKey = (String, String, u32, Vec<String>);

/// Decides with the policies in force.
pub struct PolicyDecider {
    engine: ArcSwap<L7Engine>,
    policies: Arc<ArcSwap<PolicySet>>,
    detectors: Mutex<HashMap<DetectorKey, Arc<Detectors>>>,
}

impl PolicyDecider {
    /// A decider over `engine`, built from the set in `policies`.
    pub fn new(engine: L7Engine, policies: Arc<ArcSwap<PolicySet>>) -> PolicyDecider {
        PolicyDecider {
            engine: ArcSwap::from_pointee(engine),
            policies,
            detectors: Mutex::new(HashMap::new()),
        }
    }

    /// Puts a newly built engine in force.
    pub fn replace(&self, engine: L7Engine) {
        self.engine.store(Arc::new(engine));
        self.detectors.lock().expect("lock poisoned").clear();
    }

    fn detectors(
        &self,
        req: &DecisionRequest<'_>,
        version: u32,
        kinds: &[String],
    ) -> Result<Arc<Detectors>, String> {
        let key = (
            req.identity.agent.to_string(),
            req.identity.tenant.to_string(),
            version,
            kinds.to_vec(),
        );
        if let Some(d) = self.detectors.lock().expect("lock poisoned").get(&key) {
            return Ok(d.clone());
        }
        let policies = self.policies.load();
        let policy =
            policies.for_identity(req.identity.agent.as_str(), req.identity.tenant.as_str());
        let mut builtins = Vec::new();
        let mut custom = Vec::new();
        for kind in kinds {
            if let Ok(b) = Builtin::from_str(kind) {
                builtins.push(b);
            } else if let Some(re) = policy.and_then(|p| p.dlp_detector(kind)) {
                custom.push(CustomPattern {
                    name: kind.clone(),
                    pattern: re.as_str().to_owned(),
                });
            } else {
                return Err(format!("sanitize names an unknown DLP detector {kind:?}"));
            }
        }
        let detectors = Arc::new(Detectors::new(&builtins, &custom).map_err(|e| e.to_string())?);
        let mut cache = self.detectors.lock().expect("lock poisoned");
        if cache.len() >= MAX_CACHED_DETECTORS {
            cache.clear();
        }
        cache.insert(key, detectors.clone());
        Ok(detectors)
    }
}

impl Decider for PolicyDecider {
    fn decide(&self, req: &DecisionRequest<'_>) -> Result<Decision, String> {
        // A JSON body is parsed once, for the policy's parameters and for DLP. One that does
        // not parse is left to each: the policy reports it (`malformed_body`), DLP refuses it.
        let mut json = input::is_json(req.content_type)
            .then(|| serde_json::from_slice::<serde_json::Value>(req.body).ok())
            .flatten();
        let l7 = L7Request {
            agent: req.identity.agent.as_str(),
            tenant: req.identity.tenant.as_str(),
            host: req.host,
            method: req.method,
            path: req.path,
            query: req.query,
            content_type: req.content_type,
            body: req.body,
            json: json.as_ref(),
            time: SystemTime::now(),
        };
        let d = self.engine.load().decide(&l7).map_err(|e| e.to_string())?;
        let mut reason = d.reason.clone();
        let verdict = match d.verdict {
            L7Verdict::Allow => Verdict::Allow,
            L7Verdict::Deny => Verdict::Deny,
            L7Verdict::ApprovalNeeded => Verdict::ApprovalNeeded,
            L7Verdict::Sanitize => {
                let detectors = self.detectors(req, d.policy_version, &d.sanitize)?;
                match detectors.redact_body_parsed(req.content_type, req.body, json.take()) {
                    Ok(r) => Verdict::Sanitize {
                        findings: r.findings.len(),
                        body: r.body,
                    },
                    Err(e) => {
                        // A body the detectors cannot read is not forwarded unread.
                        reason = format!("dlp: {e}");
                        Verdict::Deny
                    }
                }
            }
        };
        Ok(Decision {
            verdict,
            would: d.would.map(|w| format!("would_{}", w.as_str())),
            reason,
            tool: d.tool,
            action: d.action,
            policy_version: d.policy_version,
            mode: match d.mode {
                Mode::Enforce => "enforce",
                Mode::Shadow => "shadow",
            },
            estimated_cost_usd: d.estimated_cost_usd,
        })
    }
}
