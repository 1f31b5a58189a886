//! Serde shapes of a policy file, checked while deserializing so that errors carry the YAML
//! location. Unknown fields are errors (a typo must not silently widen or narrow a policy).

use std::{collections::BTreeSet, fmt};

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    Destination, EgressRule, MAX_DISTINCT_PORTS, Mode, Ports,
    l7::{CustomDetector, Tool},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub agent: Name,
    #[serde(default)]
    pub tenant: Option<Name>,
    pub version: u32,
    #[serde(default)]
    pub mode: RawMode,
    #[serde(default)]
    pub egress: Vec<RawEgress>,
    #[serde(default)]
    pub sockets: RawSockets,
    #[serde(default)]
    pub tools: Vec<Tool>,
    #[serde(default)]
    pub dlp: RawDlp,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

/// `budget`: USD the identity (or a tool) may spend on priced calls (actions' `price_usd` or
/// `llm` pricing) per UTC day and per UTC month. Over it, calls are refused (402) until the
/// period turns, or held for a human approval (`on_exceed: approval_needed`).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default)]
    pub daily_usd: Option<f64>,
    #[serde(default)]
    pub monthly_usd: Option<f64>,
    #[serde(default)]
    pub on_exceed: OnExceed,
}

/// What a call over budget gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// 402 `BudgetExceeded`.
    #[default]
    Deny,
    /// An approval request; once approved, the exact retry passes (and is charged) once.
    ApprovalNeeded,
}

/// `rate_limit`: the identity's L7 request rate, enforced by GCRA (a token bucket refilled at
/// `requests_per_second`, holding at most `burst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, requests per second (1 or more).
    pub requests_per_second: std::num::NonZeroU32,
    /// Requests allowed back to back after a quiet period (default: `requests_per_second`).
    #[serde(default)]
    pub burst: Option<std::num::NonZeroU32>,
}

/// The `dlp` section: policy-defined detectors, named by actions' `sanitize` lists.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDlp {
    #[serde(default)]
    pub custom: Vec<CustomDetector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawMode {
    #[default]
    Enforce,
    Shadow,
}

impl From<RawMode> for Mode {
    fn from(m: RawMode) -> Mode {
        match m {
            RawMode::Enforce => Mode::Enforce,
            RawMode::Shadow => Mode::Shadow,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSockets {
    #[serde(default)]
    pub raw: SocketRule,
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum SocketRule {
    #[default]
    Deny,
    Allow,
}

/// One egress entry: exactly one of `fqdn` and `cidr`, and optional `ports`.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawEgressFields")]
pub(super) struct RawEgress {
    pub destination: Destination,
    pub ports: Ports,
    pub inspect: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgressFields {
    #[serde(default)]
    fqdn: Option<FqdnPattern>,
    #[serde(default)]
    cidr: Option<IpNet>,
    #[serde(default)]
    ports: Option<Vec<u16>>,
    #[serde(default)]
    inspect: bool,
}

impl TryFrom<RawEgressFields> for RawEgress {
    type Error = String;

    fn try_from(f: RawEgressFields) -> Result<Self, String> {
        let destination = match (f.fqdn, f.cidr) {
            (Some(p), None) => Destination::Fqdn(p),
            (None, Some(net)) => Destination::Cidr(net.trunc()),
            _ => return Err("an egress entry needs exactly one of `fqdn` and `cidr`".into()),
        };
        let ports = match f.ports {
            None => Ports::Any,
            Some(list) if list.is_empty() => {
                return Err("`ports` is empty; omit it to allow every port".into());
            }
            Some(list) => {
                if let Some(0) = list.iter().find(|p| **p == 0) {
                    return Err("port 0 is not a destination port".into());
                }
                let set: BTreeSet<u16> = list.into_iter().collect();
                if set.len() > MAX_DISTINCT_PORTS {
                    return Err(format!("at most {MAX_DISTINCT_PORTS} ports per entry"));
                }
                Ports::Only(set)
            }
        };
        if f.inspect && !matches!(destination, Destination::Fqdn(_)) {
            return Err("`inspect` applies to `fqdn` entries only".into());
        }
        Ok(RawEgress {
            destination,
            ports,
            inspect: f.inspect,
        })
    }
}

impl From<RawEgress> for EgressRule {
    fn from(r: RawEgress) -> EgressRule {
        EgressRule {
            destination: r.destination,
            ports: r.ports,
            inspect: r.inspect,
        }
    }
}

/// An agent or tenant name: 1 to 63 characters of `a-z`, `0-9`, `-`, `.`, `_`, starting and
/// ending with a letter or digit (the shape of a Kubernetes label value).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl Name {
    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;

    fn try_from(s: String) -> Result<Name, String> {
        let ok_edge =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')
            })
            && ok_edge(s.chars().next())
            && ok_edge(s.chars().last());
        if ok {
            Ok(Name(s))
        } else {
            Err(format!(
                "invalid name {s:?}: use 1-63 of a-z 0-9 - . _, starting and ending with a-z or 0-9"
            ))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A domain name pattern: an exact FQDN (`api.stripe.com`) or a wildcard (`*.slack.com`) that
/// matches every name below the suffix, at any depth, but not the suffix itself. Stored
/// lowercase without the trailing dot; labels follow RFC 1035 section 2.3.4 (1-63 octets, name
/// at most 253 characters in text form), with `_` allowed as in service names (RFC 2782).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum FqdnPattern {
    Exact(String),
    /// The suffix, with its leading dot (`.slack.com`).
    Wildcard(String),
}

impl FqdnPattern {
    /// Whether `name` (lowercase, no trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            FqdnPattern::Exact(n) => n == name,
            FqdnPattern::Wildcard(suffix) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
        }
    }
}

impl TryFrom<String> for FqdnPattern {
    type Error = String;

    fn try_from(s: String) -> Result<FqdnPattern, String> {
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, base) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        if base.contains('*') {
            return Err(format!(
                "invalid fqdn {s:?}: `*` is only allowed as the whole first label (`*.example.com`)"
            ));
        }
        if base.len() > 253 {
            return Err(format!("invalid fqdn {s:?}: longer than 253 characters"));
        }
        let labels: Vec<&str> = base.split('.').collect();
        for label in &labels {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!("invalid fqdn {s:?}: bad label {label:?}"));
            }
        }
        if wildcard && labels.len() < 2 {
            return Err(format!(
                "invalid fqdn {s:?}: a wildcard needs at least two labels after `*.`"
            ));
        }
        Ok(if wildcard {
            FqdnPattern::Wildcard(format!(".{base}"))
        } else {
            FqdnPattern::Exact(base.to_owned())
        })
    }
}

impl fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FqdnPattern::Exact(n) => f.write_str(n),
            FqdnPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}
