//! Agent identity tokens: short-lived JWTs signed with Ed25519 (`alg: EdDSA`, RFC 8037) that
//! carry who an agent claims to be. The enforcer verifies a presented token, refuses a replayed
//! `jti`, refuses a token whose `agent_id` (or tenant) differs from the workload identity of the
//! calling cgroup — a token copied into another pod is useless — and strips it before
//! forwarding upstream.
//!
//! Claims: `{"org", "tenant", "agent_id", "scopes": [...], "jti", "iat", "exp"}` (seconds since
//! the epoch). Keys are the PEM files of [`crate::audit::chain::AuditKey`]: PKCS#8 private key,
//! SubjectPublicKeyInfo public key.

use std::{
    collections::HashMap,
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{
    identity::Identity,
    state::{ReplayStore, Unavailable},
};

/// Longest lifetime `issue` accepts.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// `jti`s remembered at most; when full, expired ones are dropped, then new tokens refused.
const MAX_SEEN: usize = 1 << 20;

/// The claims of an agent token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub org: String,
    pub tenant: String,
    pub agent_id: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token jti {0} was already used (replay)")]
    Replayed(String),
    #[error("token is for agent {claimed}, the calling workload is {actual} (stolen token)")]
    WrongIdentity { claimed: String, actual: String },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs a token for `claims` minus the times, valid for `ttl`, with a random `jti`.
///
/// # Errors
/// The key file is not an Ed25519 PKCS#8 PEM, or `ttl` is zero or over [`MAX_TTL`].
pub fn issue(
    key_pem: &[u8],
    org: &str,
    tenant: &str,
    agent_id: &str,
    scopes: &[String],
    ttl: Duration,
) -> Result<String, TokenError> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(TokenError::Invalid(format!(
            "ttl must be between 1 s and {} s",
            MAX_TTL.as_secs()
        )));
    }
    let key = EncodingKey::from_ed_pem(key_pem).map_err(|e| TokenError::Invalid(e.to_string()))?;
    let iat = now();
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| TokenError::Invalid("no randomness".into()))?;
    let claims = Claims {
        org: org.to_owned(),
        tenant: tenant.to_owned(),
        agent_id: agent_id.to_owned(),
        scopes: scopes.to_vec(),
        jti: hex::encode(jti),
        iat,
        exp: iat + ttl.as_secs(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key)
        .map_err(|e| TokenError::Invalid(e.to_string()))
}

/// Verifies signature, algorithm and expiry (no leeway); does not check replay or identity.
///
/// # Errors
/// [`TokenError::Invalid`] with the reason.
pub fn decode(token: &str, key: &DecodingKey) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp"]);
    jsonwebtoken::decode::<Claims>(token, key, &validation)
        .map(|d| d.claims)
        .map_err(|e| TokenError::Invalid(e.to_string()))
}

/// Reads an Ed25519 public key (PEM SubjectPublicKeyInfo) for verification.
///
/// # Errors
/// The file cannot be read or is not such a key.
pub fn decoding_key(path: &Path) -> Result<DecodingKey, crate::audit::chain::KeyError> {
    let raw = crate::audit::chain::read_public_key(path)?;
    Ok(DecodingKey::from_ed_der(&raw))
}

/// The enforcer's token check: signature, expiry and identity binding. Replay of a `jti` is
/// checked separately, in the node's [`crate::state::ReplayStore`].
pub struct TokenVerifier {
    key: DecodingKey,
    /// Lowercase header the token arrives in (`authorization` takes `Bearer <jwt>`).
    pub header: String,
}

impl TokenVerifier {
    pub fn new(key: DecodingKey, header: &str) -> TokenVerifier {
        TokenVerifier {
            key,
            header: header.to_ascii_lowercase(),
        }
    }

    /// Checks the header's value presented by a workload of `identity`.
    ///
    /// # Errors
    /// Invalid or expired, or for another identity.
    pub fn verify(&self, value: &str, identity: &Identity) -> Result<Claims, TokenError> {
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value)
            .trim();
        let claims = decode(token, &self.key)?;
        if claims.agent_id != identity.agent.as_str() || claims.tenant != identity.tenant.as_str() {
            return Err(TokenError::WrongIdentity {
                claimed: format!("{}@{}", claims.agent_id, claims.tenant),
                actual: identity.to_string(),
            });
        }
        Ok(claims)
    }
}

/// Used token ids in memory (the embedded backend): each remembered until its `exp`.
#[derive(Default)]
pub struct MemoryReplay {
    /// `jti` → `exp`.
    seen: Mutex<HashMap<String, u64>>,
}

impl ReplayStore for MemoryReplay {
    fn first_use(&self, jti: &str, exp: u64) -> Result<bool, Unavailable> {
        let mut seen = self.seen.lock().expect("lock poisoned");
        if seen.len() >= MAX_SEEN {
            let t = now();
            seen.retain(|_, e| *e >= t);
            if seen.len() >= MAX_SEEN {
                return Err(Unavailable(format!(
                    "{MAX_SEEN} live token ids remembered; refusing more"
                )));
            }
        }
        Ok(seen.insert(jti.to_owned(), exp).is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{AuditKey, public_path};

    #[test]
    fn tokens_are_bound_one_time_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("token.key");
        AuditKey::load_or_create(&key_path).unwrap();
        let pem = std::fs::read(&key_path).unwrap();
        let replay = MemoryReplay::default();
        let verifier = TokenVerifier::new(
            decoding_key(&public_path(&key_path)).unwrap(),
            "X-Aegis-Agent-Token",
        );
        let me = Identity::new("finance-agent", Some("acme")).unwrap();
        let other = Identity::new("support-agent", Some("acme")).unwrap();
        let scopes = vec!["payments:write".to_owned()];
        // A finance-agent@acme token signed with `pem`, valid for `secs`.
        let mint = |pem: &[u8], secs: u64| {
            issue(
                pem,
                "org1",
                "acme",
                "finance-agent",
                &scopes,
                Duration::from_secs(secs),
            )
            .unwrap()
        };
        // A check as the enforcer does it: verified, then its jti used up.
        let check = |value: &str, who: &Identity| {
            let claims = verifier.verify(value, who)?;
            match replay.first_use(&claims.jti, claims.exp) {
                Ok(true) => Ok(claims),
                Ok(false) => Err(TokenError::Replayed(claims.jti)),
                Err(e) => Err(TokenError::Invalid(e.to_string())),
            }
        };
        let t = mint(&pem, 60);
        let claims = check(&format!("Bearer {t}"), &me).unwrap();
        assert_eq!(
            (claims.org.as_str(), claims.scopes.clone()),
            ("org1", scopes.clone())
        );
        assert!(matches!(check(&t, &me), Err(TokenError::Replayed(_))));
        let t = mint(&pem, 60);
        assert!(matches!(
            check(&t, &other),
            Err(TokenError::WrongIdentity { .. })
        ));
        // Tampered payload, another key, expired.
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(matches!(
            check(&parts.join("."), &me),
            Err(TokenError::Invalid(_))
        ));
        let other_key = dir.path().join("other.key");
        AuditKey::load_or_create(&other_key).unwrap();
        let forged = mint(&std::fs::read(&other_key).unwrap(), 60);
        assert!(matches!(check(&forged, &me), Err(TokenError::Invalid(_))));
        let short = mint(&pem, 1);
        std::thread::sleep(Duration::from_millis(2100));
        assert!(matches!(check(&short, &me), Err(TokenError::Invalid(_))));
    }
}
