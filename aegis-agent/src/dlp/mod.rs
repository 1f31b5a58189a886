//! Data-loss prevention: deterministic detectors for sensitive data in HTTP request bodies, and
//! the redaction behind the L7 enforcer's `sanitize` decision (each match is rewritten to a typed
//! placeholder such as `[REDACTED:SSN]` and the request is forwarded). Rules, sources and the
//! measured precision/recall are in `docs/dlp.md`.
//!
//! A [`Detectors`] set is built once per policy version from the kinds the policy names and its
//! custom patterns; building it is where every pattern error surfaces. After that, scanning
//! cannot fail.
//!
//! Invariants:
//! - Determinism: the same detector set and input give the same findings and the same output,
//!   byte for byte. No randomness, no clock, no hash-map iteration order on the path.
//! - Findings of one text never overlap, and are sorted by start offset. Offsets are byte
//!   offsets into the scanned `&str`, always on `char` boundaries.
//! - Findings carry kind and position only, never the matched text: they go to events and logs,
//!   the secret must not.
//! - Time is linear in the input: every pattern, custom ones included, runs on the `regex`
//!   crate's finite automata (no backtracking); the checksums are linear passes.

mod body;
mod checks;
mod rules;

#[cfg(test)]
mod corpus;
#[cfg(test)]
mod eval;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc};

use regex::Regex;

pub use body::{BodyFormat, FieldFinding, Redacted};

/// Most bytes a compiled custom pattern may take (`regex` size limit). A policy cannot make the
/// agent build an arbitrarily large automaton.
pub const CUSTOM_PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// The built-in detectors, by their stable policy/event name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Builtin {
    /// `email`: an address `local@domain.tld`.
    Email,
    /// `phone`: E.164 (`+` country code, 8–15 digits) or a separated NANP number.
    Phone,
    /// `ssn`: a US Social Security number outside the never-assigned ranges.
    Ssn,
    /// `card`: a payment card number with a known IIN, a valid length for it, and Luhn check.
    Card,
    /// `iban`: an IBAN of the registered length for its country, with mod-97 check.
    Iban,
    /// `api_key`: a provider credential recognised by prefix and shape, or a high-entropy value
    /// assigned to a key/token/secret-like name.
    ApiKey,
    /// `ipv4`: a dotted-quad IPv4 address not embedded in a longer dotted number or version.
    Ipv4,
}

impl Builtin {
    /// Every built-in kind, in precedence order (see [`Detectors::scan`]).
    pub const ALL: [Builtin; 7] = [
        Builtin::ApiKey,
        Builtin::Iban,
        Builtin::Card,
        Builtin::Ssn,
        Builtin::Email,
        Builtin::Phone,
        Builtin::Ipv4,
    ];

    /// The stable name used in policy YAML and events.
    pub const fn name(self) -> &'static str {
        match self {
            Builtin::Email => "email",
            Builtin::Phone => "phone",
            Builtin::Ssn => "ssn",
            Builtin::Card => "card",
            Builtin::Iban => "iban",
            Builtin::ApiKey => "api_key",
            Builtin::Ipv4 => "ipv4",
        }
    }

    /// Precedence rank: lower wins a tie between equally long overlapping matches.
    fn rank(self) -> usize {
        Builtin::ALL
            .iter()
            .position(|b| *b == self)
            .expect("ALL lists every builtin")
    }
}

impl fmt::Display for Builtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Builtin {
    type Err = DlpError;

    fn from_str(s: &str) -> Result<Builtin, DlpError> {
        Builtin::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| DlpError::UnknownKind(s.to_owned()))
    }
}

/// What a finding is: a built-in kind or a policy-defined pattern (by its name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Builtin(Builtin),
    /// A custom pattern's name (validated: `[a-z][a-z0-9_]{0,31}`, not a built-in name).
    Custom(Arc<str>),
}

impl Kind {
    /// The stable name used in policy YAML and events (`ssn`, `api_key`, `account_id`, …).
    pub fn name(&self) -> &str {
        match self {
            Kind::Builtin(b) => b.name(),
            Kind::Custom(name) => name,
        }
    }

    /// The text that replaces a match: `[REDACTED:` + upper-cased name + `]`, e.g.
    /// `[REDACTED:SSN]`, `[REDACTED:API_KEY]`. It contains no character that JSON, form or
    /// header encodings would need to escape.
    pub fn placeholder(&self) -> String {
        format!("[REDACTED:{}]", self.name().to_ascii_uppercase())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One match in a scanned text: `text[start..end]` is sensitive.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Finding {
    pub kind: Kind,
    /// Byte offset of the first byte of the match.
    pub start: usize,
    /// Byte offset one past the last byte of the match.
    pub end: usize,
}

/// A policy-defined detector: a name (the finding's kind) and a `regex` pattern.
///
/// The whole match is redacted; when the pattern has a capture group named `redact`, only that
/// group is (so `account: (?P<redact>[0-9]{8})` keeps the label).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomPattern {
    pub name: String,
    pub pattern: String,
}

/// Errors building a detector set or reading a body.
#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    #[error(
        "unknown DLP kind {0:?} (known: email, phone, ssn, card, iban, api_key, ipv4; custom \
         patterns go under `custom`)"
    )]
    UnknownKind(String),
    #[error(
        "invalid custom DLP pattern name {name:?}: {reason} (names are 1-32 characters of \
         a-z 0-9 _, starting with a letter)"
    )]
    InvalidName { name: String, reason: &'static str },
    #[error("custom DLP pattern {name:?} is defined twice")]
    DuplicateName { name: String },
    #[error("custom DLP pattern {name:?} does not compile")]
    InvalidPattern {
        name: String,
        #[source]
        source: regex::Error,
    },
    #[error(
        "custom DLP pattern {name:?} matches the empty string, so it would match everywhere and \
         redact nothing"
    )]
    EmptyMatch { name: String },
    #[error("request body declared as JSON ({content_type}) is not valid JSON")]
    Json {
        content_type: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A compiled custom pattern.
#[derive(Debug)]
struct Custom {
    kind: Kind,
    regex: Regex,
    /// Index of the `redact` capture group, if the pattern has one.
    group: Option<usize>,
}

/// A set of detectors, built once per policy version and shared (it is `Send + Sync`; cloning
/// is cheap: built-in patterns are process-wide statics, custom ones are reference-counted).
#[derive(Clone, Debug, Default)]
pub struct Detectors {
    /// Enabled built-ins, deduplicated, in precedence order.
    builtins: Vec<Builtin>,
    /// Custom patterns in policy order (their precedence order, after every built-in).
    custom: Arc<[Custom]>,
}

/// A candidate match before overlap resolution.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    start: usize,
    end: usize,
    /// Precedence rank: built-ins by [`Builtin::ALL`] order, then customs in policy order.
    rank: usize,
}

// === impl Detectors ===

impl Detectors {
    /// Builds a set from the built-in `kinds` (duplicates ignored) and `custom` patterns.
    ///
    /// # Errors
    /// A custom pattern whose name is invalid, collides with a built-in or another custom name,
    /// that does not compile (or exceeds [`CUSTOM_PATTERN_SIZE_LIMIT`]), or that matches the
    /// empty string.
    pub fn new(kinds: &[Builtin], custom: &[CustomPattern]) -> Result<Detectors, DlpError> {
        let mut builtins: Vec<Builtin> = kinds.to_vec();
        builtins.sort_by_key(|b| b.rank());
        builtins.dedup();

        let mut compiled: Vec<Custom> = Vec::with_capacity(custom.len());
        for c in custom {
            check_custom_name(&c.name)?;
            if compiled.iter().any(|d| d.kind.name() == c.name) {
                return Err(DlpError::DuplicateName {
                    name: c.name.clone(),
                });
            }
            let regex = regex::RegexBuilder::new(&c.pattern)
                .size_limit(CUSTOM_PATTERN_SIZE_LIMIT)
                .build()
                .map_err(|source| DlpError::InvalidPattern {
                    name: c.name.clone(),
                    source,
                })?;
            if regex.is_match("") {
                return Err(DlpError::EmptyMatch {
                    name: c.name.clone(),
                });
            }
            let group = regex.capture_names().position(|n| n == Some("redact"));
            compiled.push(Custom {
                kind: Kind::Custom(Arc::from(c.name.as_str())),
                regex,
                group,
            });
        }
        Ok(Detectors {
            builtins,
            custom: compiled.into(),
        })
    }

    /// A set with every built-in kind and no custom pattern.
    pub fn all_builtins() -> Detectors {
        Detectors {
            builtins: Builtin::ALL.to_vec(),
            custom: Arc::from([]),
        }
    }

    /// Whether the set detects nothing (scanning is then skipped entirely).
    pub fn is_empty(&self) -> bool {
        self.builtins.is_empty() && self.custom.is_empty()
    }

    /// Every sensitive span of `text`, sorted by start, non-overlapping.
    ///
    /// Each detector proposes candidates independently. Overlaps are resolved greedily: the
    /// **longest** candidate wins; between equally long ones, the kind earlier in precedence
    /// order wins — `api_key`, `iban`, `card`, `ssn`, `email`, `phone`, `ipv4`, then custom
    /// patterns in policy order; then the earlier start. A losing candidate is dropped whole,
    /// never trimmed. Longest-first keeps containers whole (an IBAN or an email address that
    /// embeds a card-like or phone-like digit run is redacted as one unit).
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        self.scan_in(None, text)
    }

    /// `text` with every finding replaced by its kind's [`Kind::placeholder`], and the findings
    /// (offsets into the original `text`).
    pub fn redact(&self, text: &str) -> (String, Vec<Finding>) {
        let findings = self.scan(text);
        (apply(text, &findings), findings)
    }

    /// [`Detectors::redact`] for the value of a named field (JSON member, form field). The name
    /// adds what the value alone cannot show: a whole value under a credential-like name
    /// (`password`, `client_secret`, `apiKey`) that passes the generic secret test is an
    /// `api_key`; nine bare digits under an SSN-like name are an `ssn`.
    pub fn redact_field(&self, field: &str, value: &str) -> (String, Vec<Finding>) {
        let findings = self.scan_in(Some(field), value);
        (apply(value, &findings), findings)
    }

    fn scan_in(&self, field: Option<&str>, text: &str) -> Vec<Finding> {
        if self.is_empty() || text.is_empty() {
            return Vec::new();
        }
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut spans = Vec::new();
        let shape = rules::Shape::of(text);
        for &b in &self.builtins {
            spans.clear();
            rules::find(b, text, &shape, &mut spans);
            if let Some(field) = field {
                rules::find_in_field(b, field, text, &mut spans);
            }
            let rank = b.rank();
            candidates.extend(
                spans
                    .iter()
                    .map(|&(start, end)| Candidate { start, end, rank }),
            );
        }
        for (i, c) in self.custom.iter().enumerate() {
            let rank = Builtin::ALL.len() + i;
            for caps in c.regex.captures_iter(text) {
                let m = match c.group {
                    Some(g) => caps.get(g),
                    None => caps.get(0),
                };
                if let Some(m) = m.filter(|m| !m.is_empty()) {
                    candidates.push(Candidate {
                        start: m.start(),
                        end: m.end(),
                        rank,
                    });
                }
            }
        }
        resolve(candidates)
            .into_iter()
            .map(|c| Finding {
                kind: self.kind_of(c.rank),
                start: c.start,
                end: c.end,
            })
            .collect()
    }

    fn kind_of(&self, rank: usize) -> Kind {
        match Builtin::ALL.get(rank) {
            Some(b) => Kind::Builtin(*b),
            None => self.custom[rank - Builtin::ALL.len()].kind.clone(),
        }
    }
}

/// `text` with each of `findings` (sorted, non-overlapping) replaced by its placeholder.
fn apply(text: &str, findings: &[Finding]) -> String {
    if findings.is_empty() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&text[at..f.start]);
        out.push_str(&f.kind.placeholder());
        at = f.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Overlap resolution (see [`Detectors::scan`]): longest first, then rank, then start.
fn resolve(mut candidates: Vec<Candidate>) -> Vec<Candidate> {
    candidates.sort_by_key(|c| (std::cmp::Reverse(c.end - c.start), c.rank, c.start));
    // Accepted spans by start; they never overlap, so the one starting last before `end` is the
    // only one that can overlap `[start, end)` from the left.
    let mut accepted: BTreeMap<usize, Candidate> = BTreeMap::new();
    for c in candidates {
        let overlaps = accepted
            .range(..c.end)
            .next_back()
            .is_some_and(|(_, a)| a.end > c.start);
        if !overlaps {
            accepted.insert(c.start, c);
        }
    }
    accepted.into_values().collect()
}

fn check_custom_name(name: &str) -> Result<(), DlpError> {
    let invalid = |reason| DlpError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 32 {
        return Err(invalid("length must be 1-32"));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid("must start with a lowercase letter"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid("only a-z, 0-9 and _ are allowed"));
    }
    if name.parse::<Builtin>().is_ok() {
        return Err(invalid("it is the name of a built-in kind"));
    }
    Ok(())
}
