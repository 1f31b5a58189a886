//! The L7 (parameter-level) part of a policy: `tools` (host + method + path → action), each
//! action's decision, parameter constraints, business hours and price, and the `dlp` detectors
//! actions may name. The schema is documented in `docs/policy.md`.
//!
//! Everything that carries syntax (regexes, time zones, path patterns, times of day) is checked
//! while deserializing, so an error points at the offending line. The model is compiled to Rego
//! by [`super::rego`]; nothing here evaluates requests.

use std::{collections::BTreeMap, fmt, str::FromStr};

use chrono_tz::Tz;
use serde::Deserialize;

use super::FqdnPattern;

/// Implements `Deserialize` through `TryFrom<String>` with a visitor, so that a rejected value
/// is reported at its own line (serde's `try_from` attribute reports the enclosing mapping's).
macro_rules! deserialize_from_str {
    ($($t:ty),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                struct V;

                impl serde::de::Visitor<'_> for V {
                    type Value = $t;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }

                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$t, E> {
                        <$t>::try_from(s.to_owned()).map_err(E::custom)
                    }
                }

                d.deserialize_str(V)
            }
        }
    )*};
}

deserialize_from_str!(
    Pattern,
    Ident,
    Method,
    PathPattern,
    ParamPath,
    TimeZone,
    DaySpan,
    TimeOfDay
);

/// The decision an action, a constraint or the whole policy yields for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L7Verdict {
    /// Forward the request as is.
    #[default]
    Allow,
    /// Refuse the request.
    Deny,
    /// Forward the request with the DLP detectors of [`Action::sanitize`] redacting the body.
    Sanitize,
    /// Hold or refuse the request until a human approves it.
    ApprovalNeeded,
}

impl L7Verdict {
    /// The name used in YAML, Rego and events.
    pub fn as_str(self) -> &'static str {
        match self {
            L7Verdict::Allow => "allow",
            L7Verdict::Deny => "deny",
            L7Verdict::Sanitize => "sanitize",
            L7Verdict::ApprovalNeeded => "approval_needed",
        }
    }
}

impl FromStr for L7Verdict {
    type Err = String;

    fn from_str(s: &str) -> Result<L7Verdict, String> {
        Ok(match s {
            "allow" => L7Verdict::Allow,
            "deny" => L7Verdict::Deny,
            "sanitize" => L7Verdict::Sanitize,
            "approval_needed" => L7Verdict::ApprovalNeeded,
            _ => return Err(format!("unknown verdict {s:?}")),
        })
    }
}

impl fmt::Display for L7Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a violated constraint yields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnViolation {
    #[default]
    Deny,
    ApprovalNeeded,
}

impl OnViolation {
    pub fn as_str(self) -> &'static str {
        match self {
            OnViolation::Deny => "deny",
            OnViolation::ApprovalNeeded => "approval_needed",
        }
    }
}

/// A tool: the actions an agent may take on one API host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub name: Ident,
    /// Exact host or `*.` wildcard; must be covered by an `inspect: true` egress entry.
    pub host: FqdnPattern,
    pub actions: Vec<Action>,
    /// Spend limit of this tool's priced calls, on top of the identity's `budget`.
    #[serde(default)]
    pub budget: Option<super::Budget>,
    /// Rate of the identity's requests routed to this tool, on top of its `rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<super::RateLimit>,
}

/// Token-based pricing of an LLM API action (see [`crate::l7::usage`]): a reservation from
/// the request before the call, settled to the response's reported `usage`.
///
/// ```yaml
/// llm:
///   max_output_tokens: 4096          # reserved when the request sets no max_tokens
///   models:
///     gpt-4o-mini: { input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60 }
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmPricing {
    /// Output tokens reserved when the request sets no `max_tokens`.
    pub max_output_tokens: u32,
    /// USD per million tokens by model name (the request's `model`); a model not listed is
    /// priced as the most expensive one listed.
    pub models: BTreeMap<String, ModelPrice>,
}

/// Prices of one model, USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

/// One action of a tool: the requests it covers and what to do with them.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawAction")]
pub struct Action {
    pub name: Ident,
    pub methods: Methods,
    pub path: PathPattern,
    pub decision: L7Verdict,
    /// DLP detectors applied when the decision is `sanitize` (built-in kinds or `dlp.custom`
    /// names).
    pub sanitize: Vec<Ident>,
    /// Fixed price of one call, reported as the decision's estimated cost.
    pub price_usd: Option<f64>,
    /// Token-based price (LLM APIs).
    pub llm: Option<LlmPricing>,
    /// Constraints by parameter path (dotted for nested fields).
    pub params: BTreeMap<ParamPath, ParamRule>,
    pub hours: Option<Hours>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    name: Ident,
    method: Methods,
    path: PathPattern,
    #[serde(default)]
    decision: L7Verdict,
    #[serde(default)]
    sanitize: Vec<Ident>,
    #[serde(default)]
    price_usd: Option<f64>,
    #[serde(default)]
    llm: Option<LlmPricing>,
    #[serde(default)]
    params: BTreeMap<ParamPath, ParamRule>,
    #[serde(default)]
    hours: Option<Hours>,
}

impl TryFrom<RawAction> for Action {
    type Error = String;

    fn try_from(r: RawAction) -> Result<Action, String> {
        let name = &r.name;
        match (r.decision, r.sanitize.is_empty()) {
            (L7Verdict::Sanitize, true) => {
                return Err(format!(
                    "action {name}: `decision: sanitize` needs a `sanitize` list of DLP detectors"
                ));
            }
            (L7Verdict::Sanitize, false) => {}
            (_, false) => {
                return Err(format!(
                    "action {name}: `sanitize` is only used with `decision: sanitize`"
                ));
            }
            (_, true) => {}
        }
        if let Some(p) = r.price_usd
            && !(p.is_finite() && p >= 0.0)
        {
            return Err(format!(
                "action {name}: `price_usd` must be a non-negative number"
            ));
        }
        if let Some(llm) = &r.llm {
            if r.price_usd.is_some() {
                return Err(format!(
                    "action {name}: give either `price_usd` or `llm` pricing, not both"
                ));
            }
            if llm.models.is_empty() || llm.max_output_tokens == 0 {
                return Err(format!(
                    "action {name}: `llm` needs `models` and a positive `max_output_tokens`"
                ));
            }
            let bad = llm.models.iter().find(|(_, p)| {
                ![p.input_usd_per_mtok, p.output_usd_per_mtok]
                    .iter()
                    .all(|x| x.is_finite() && *x >= 0.0)
            });
            if let Some((model, _)) = bad {
                return Err(format!(
                    "action {name}: model {model}: prices must be non-negative numbers"
                ));
            }
        }
        Ok(Action {
            name: r.name,
            methods: r.method,
            path: r.path,
            decision: r.decision,
            sanitize: r.sanitize,
            price_usd: r.price_usd,
            llm: r.llm,
            params: r.params,
            hours: r.hours,
        })
    }
}

/// Built-in DLP detector kinds.
pub const DLP_KINDS: [&str; 7] = ["email", "phone", "ssn", "card", "iban", "api_key", "ipv4"];

/// A policy-defined DLP detector.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDetector {
    pub name: Ident,
    pub regex: Pattern,
}

/// A validated regular expression (the `regex` crate's syntax, which is also regorus's).
#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    pub regex: regex::Regex,
}

impl TryFrom<String> for Pattern {
    type Error = String;

    fn try_from(source: String) -> Result<Pattern, String> {
        let regex = regex::Regex::new(&source)
            .map_err(|e| format!("invalid regex {source:?}: {}", one_line(&e.to_string())))?;
        Ok(Pattern { source, regex })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A tool, action or detector name: 1-63 of `A-Z a-z 0-9 _ - .`, starting with a letter or
/// digit (`chat.postMessage`, `create_payment`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

impl Ident {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Ident {
    type Error = String;

    fn try_from(s: String) -> Result<Ident, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            Ok(Ident(s))
        } else {
            Err(format!(
                "invalid name {s:?}: use 1-63 of A-Z a-z 0-9 _ - ., starting with a letter or digit"
            ))
        }
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// HTTP methods an action covers: one (`POST`), a list (`[GET, HEAD]`) or every one (`"*"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Methods {
    Any,
    Only(Vec<String>),
}

/// One upper-case method name.
struct Method(String);

impl TryFrom<String> for Method {
    type Error = String;

    fn try_from(m: String) -> Result<Method, String> {
        if m.is_empty() || m.len() > 16 || !m.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(format!(
                "invalid method {m:?}: use an upper-case HTTP method (GET, POST, ...) or \"*\""
            ));
        }
        Ok(Method(m))
    }
}

// A visitor rather than an untagged enum, so that errors keep the YAML location.
impl<'de> Deserialize<'de> for Methods {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Methods, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Methods;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an HTTP method, a list of them, or \"*\"")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Methods, E> {
                if s == "*" {
                    return Ok(Methods::Any);
                }
                Method::try_from(s.to_owned())
                    .map(|m| Methods::Only(vec![m.0]))
                    .map_err(E::custom)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Methods, A::Error> {
                let mut list = Vec::new();
                while let Some(Method(m)) = seq.next_element()? {
                    list.push(m);
                }
                if list.is_empty() {
                    return Err(serde::de::Error::custom(
                        "`method` is empty; use \"*\" for every method",
                    ));
                }
                Ok(Methods::Only(list))
            }
        }

        d.deserialize_any(Visitor)
    }
}

/// A request path pattern: `/`-separated segments, where a `*` segment matches exactly one
/// segment and a final `**` matches the rest of the path (zero or more segments). Matching is
/// exact and case-sensitive; the query string is not part of the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    pub pattern: String,
    /// The anchored regex the pattern compiles to.
    pub regex: String,
}

impl TryFrom<String> for PathPattern {
    type Error = String;

    fn try_from(pattern: String) -> Result<PathPattern, String> {
        let bad = |why: &str| Err(format!("invalid path pattern {pattern:?}: {why}"));
        if !pattern.starts_with('/') {
            return bad("it must start with `/`");
        }
        if pattern.contains('?') || pattern.contains('#') {
            return bad("the query string is matched with `params`, not in the path");
        }
        let segments: Vec<&str> = pattern[1..].split('/').collect();
        let mut regex = String::from("^");
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match *seg {
                "**" if last => {
                    // `/a/**` matches `/a`, `/a/` and everything below.
                    regex.push_str("(/.*)?");
                    continue;
                }
                "**" => return bad("`**` is only allowed as the last segment"),
                "*" => regex.push_str("/[^/]+"),
                "." | ".." => return bad("`.` and `..` segments are not allowed"),
                s if s.contains('*') => {
                    return bad("`*` must be a whole segment (`/a/*/b`)");
                }
                s => {
                    regex.push('/');
                    regex.push_str(&regex::escape(s));
                }
            }
        }
        regex.push('$');
        Ok(PathPattern { pattern, regex })
    }
}

/// A parameter path: a name, or dotted names for nested JSON fields (`customer.address.city`)
/// and bracketed form fields (`metadata[order_id]` is `metadata.order_id`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ParamPath(String);

impl ParamPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ParamPath {
    type Error = String;

    fn try_from(s: String) -> Result<ParamPath, String> {
        let ok = !s.is_empty()
            && s.len() <= 256
            && s.split('.').all(|seg| {
                !seg.is_empty() && !seg.chars().any(|c| c.is_whitespace() || c.is_control())
            });
        if ok {
            Ok(ParamPath(s))
        } else {
            Err(format!(
                "invalid parameter path {s:?}: use names separated by `.` (no empty names, no spaces)"
            ))
        }
    }
}

impl fmt::Display for ParamPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Constraints on one parameter. Every value the request carries for the parameter (query
/// string, body, repeated fields, array elements) must satisfy all of them.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawParamRule")]
pub struct ParamRule {
    pub required: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Values above this need approval (values above `max`, if set, are still violations).
    pub approval_needed_over: Option<f64>,
    /// Allowed values (strings, numbers, booleans), compared exactly.
    pub one_of: Option<Vec<serde_json::Value>>,
    /// The whole value must match (the pattern is anchored).
    pub regex: Option<Pattern>,
    /// What a violation of `required`, `min`, `max`, `enum` or `regex` yields.
    pub on_violation: OnViolation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParamRule {
    #[serde(default)]
    required: bool,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(default)]
    approval_needed_over: Option<f64>,
    #[serde(default, rename = "enum")]
    one_of: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    regex: Option<Pattern>,
    #[serde(default)]
    on_violation: OnViolation,
}

impl TryFrom<RawParamRule> for ParamRule {
    type Error = String;

    fn try_from(r: RawParamRule) -> Result<ParamRule, String> {
        for (field, v) in [
            ("min", r.min),
            ("max", r.max),
            ("approval_needed_over", r.approval_needed_over),
        ] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(format!("`{field}` must be a finite number"));
            }
        }
        if let (Some(min), Some(max)) = (r.min, r.max)
            && min > max
        {
            return Err(format!("`min` ({min}) is greater than `max` ({max})"));
        }
        if let (Some(over), Some(max)) = (r.approval_needed_over, r.max)
            && over >= max
        {
            return Err(format!(
                "`approval_needed_over` ({over}) must be below `max` ({max}); to need approval above `max`, use `on_violation: approval_needed`"
            ));
        }
        if let Some(values) = &r.one_of {
            if values.is_empty() {
                return Err("`enum` is empty".into());
            }
            if let Some(v) = values
                .iter()
                .find(|v| v.is_array() || v.is_object() || v.is_null())
            {
                return Err(format!(
                    "`enum` values must be strings, numbers or booleans, not {v}"
                ));
            }
        }
        // The whole value must match. A valid pattern stays valid inside `^(?:...)$`.
        let regex = r.regex.map(|p| Pattern {
            regex: regex::Regex::new(&format!("^(?:{})$", p.source))
                .expect("a valid pattern in an anchored group"),
            source: p.source,
        });
        let any = r.required
            || r.min.is_some()
            || r.max.is_some()
            || r.approval_needed_over.is_some()
            || r.one_of.is_some()
            || regex.is_some();
        if !any {
            return Err(
                "no constraint: use one or more of required, min, max, approval_needed_over, enum, regex"
                    .into(),
            );
        }
        Ok(ParamRule {
            required: r.required,
            min: r.min,
            max: r.max,
            approval_needed_over: r.approval_needed_over,
            one_of: r.one_of,
            regex,
            on_violation: r.on_violation,
        })
    }
}

/// A weekly time window in a time zone: on `days`, from `from` (inclusive) to `to` (exclusive).
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawHours")]
pub struct Hours {
    pub tz: Tz,
    /// Monday = 0 .. Sunday = 6, sorted, deduplicated.
    pub days: Vec<u8>,
    /// Minutes after midnight.
    pub from: u16,
    pub to: u16,
    pub on_violation: OnViolation,
}

/// Day names as regorus's `time.weekday` returns them, Monday first.
pub const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

impl Hours {
    /// A human-readable description, used in violation reasons: `Mon-Fri 09:00-18:00
    /// Europe/Paris`.
    pub fn describe(&self) -> String {
        let short = |d: u8| &WEEKDAYS[d as usize][..3];
        let contiguous = self.days.windows(2).all(|w| w[1] == w[0] + 1);
        let days = match self.days.as_slice() {
            [] => String::new(),
            [one] => short(*one).to_owned(),
            all if all.len() == 7 => "every day".to_owned(),
            [first, .., last] if contiguous => format!("{}-{}", short(*first), short(*last)),
            many => many.iter().map(|d| short(*d)).collect::<Vec<_>>().join(","),
        };
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        format!(
            "{days} {}-{} {}",
            hm(self.from),
            hm(self.to),
            self.tz.name()
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHours {
    tz: TimeZone,
    #[serde(default)]
    days: Option<Vec<DaySpan>>,
    from: TimeOfDay,
    to: TimeOfDay,
    #[serde(default)]
    on_violation: OnViolation,
}

/// An IANA time zone name, checked while deserializing (so errors point at it).
#[derive(Debug)]
struct TimeZone(Tz);

impl TryFrom<String> for TimeZone {
    type Error = String;

    fn try_from(s: String) -> Result<TimeZone, String> {
        s.parse().map(TimeZone).map_err(|_| {
            format!("unknown time zone {s:?}: use an IANA name such as Europe/Paris or UTC")
        })
    }
}

/// `mon` or `mon-fri`: days, Monday = 0.
#[derive(Debug)]
struct DaySpan(u8, u8);

impl TryFrom<String> for DaySpan {
    type Error = String;

    fn try_from(spec: String) -> Result<DaySpan, String> {
        let day = |s: &str| -> Result<u8, String> {
            WEEKDAYS
                .iter()
                .position(|d| d[..3].eq_ignore_ascii_case(s.trim()))
                .map(|i| i as u8)
                .ok_or_else(|| format!("unknown day {s:?}: use mon, tue, wed, thu, fri, sat, sun"))
        };
        let (a, b) = match spec.split_once('-') {
            Some((a, b)) => (day(a)?, day(b)?),
            None => (day(&spec)?, day(&spec)?),
        };
        if a > b {
            return Err(format!(
                "day range {spec:?} runs backwards (weeks start on Monday)"
            ));
        }
        Ok(DaySpan(a, b))
    }
}

/// `HH:MM` (00:00 to 24:00) as minutes after midnight.
#[derive(Debug)]
struct TimeOfDay(u16);

impl TryFrom<String> for TimeOfDay {
    type Error = String;

    fn try_from(s: String) -> Result<TimeOfDay, String> {
        let parsed = s.split_once(':').and_then(|(h, m)| {
            let ok = h.len() == 2 && m.len() == 2;
            let (h, m) = (h.parse::<u16>().ok()?, m.parse::<u16>().ok()?);
            (ok && m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        });
        parsed
            .map(TimeOfDay)
            .ok_or_else(|| format!("invalid time of day {s:?}: use HH:MM, 00:00 to 24:00"))
    }
}

impl TryFrom<RawHours> for Hours {
    type Error = String;

    fn try_from(r: RawHours) -> Result<Hours, String> {
        let mut days: Vec<u8> = match r.days {
            None => (0..7).collect(),
            Some(spans) => spans.iter().flat_map(|s| s.0..=s.1).collect(),
        };
        days.sort_unstable();
        days.dedup();
        if days.is_empty() {
            return Err("`days` is empty".into());
        }
        let (from, to) = (r.from.0, r.to.0);
        if from >= to {
            let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
            return Err(format!(
                "`from` ({}) must be before `to` ({}); windows across midnight are not supported",
                hm(from),
                hm(to)
            ));
        }
        Ok(Hours {
            tz: r.tz.0,
            days,
            from,
            to,
            on_violation: r.on_violation,
        })
    }
}
