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

/// `rate_limit`: the identity's L7 request rate, enforced by GCRA (a token bucket that earns
/// one request every [`RateLimit::interval`] and holds at most [`RateLimit::burst`]).
///
/// Written as `{requests_per_second: N}` or `{requests_per_minute: N}` (exactly one; LLM
/// providers publish per-minute limits), with an optional `burst: M` (default `N`: one period's
/// worth back to back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Time to earn one request: 1 s / `requests_per_second`, or 60 s / `requests_per_minute`
    /// (at least 1 µs; nanoseconds are truncated).
    pub interval: std::time::Duration,
    /// Requests allowed back to back after a quiet period.
    pub burst: std::num::NonZeroU32,
}

impl RateLimit {
    /// `n` requests per second, `burst` back to back (default `n`).
    #[must_use]
    pub fn per_second(n: std::num::NonZeroU32, burst: Option<std::num::NonZeroU32>) -> RateLimit {
        RateLimit::per(std::time::Duration::from_secs(1), n, burst)
    }

    /// `n` requests per minute, `burst` back to back (default `n`).
    #[must_use]
    pub fn per_minute(n: std::num::NonZeroU32, burst: Option<std::num::NonZeroU32>) -> RateLimit {
        RateLimit::per(std::time::Duration::from_secs(60), n, burst)
    }

    fn per(
        period: std::time::Duration,
        n: std::num::NonZeroU32,
        burst: Option<std::num::NonZeroU32>,
    ) -> RateLimit {
        let micros = (period.as_micros() / u128::from(n.get())).max(1);
        RateLimit {
            interval: std::time::Duration::from_micros(micros as u64),
            burst: burst.unwrap_or(n),
        }
    }
}

/// By hand rather than serde's `try_from`, so that a bad combination is reported at the
/// `rate_limit` mapping's own line (`try_from` reports the enclosing mapping's).
impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RateLimit, D::Error> {
        const FIELDS: &[&str] = &["requests_per_second", "requests_per_minute", "burst"];
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RateLimit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("{requests_per_second: N} or {requests_per_minute: N}, optionally with burst: M")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RateLimit, A::Error> {
                use serde::de::Error as _;
                let (mut per_second, mut per_minute, mut burst) = (None, None, None);
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "requests_per_second" => &mut per_second,
                        "requests_per_minute" => &mut per_minute,
                        "burst" => &mut burst,
                        other => return Err(A::Error::unknown_field(other, FIELDS)),
                    };
                    if slot.is_some() {
                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    *slot = Some(map.next_value::<std::num::NonZeroU32>()?);
                }
                match (per_second, per_minute) {
                    (Some(n), None) => Ok(RateLimit::per_second(n, burst)),
                    (None, Some(n)) => Ok(RateLimit::per_minute(n, burst)),
                    _ => Err(A::Error::custom(
                        "needs exactly one of requests_per_second, requests_per_minute",
                    )),
                }
            }
        }
        d.deserialize_map(Visitor)
    }
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
