//! Egress policy: YAML files in a directory, one policy per file, each for one agent (and
//! optionally one tenant). The schema is documented in `docs/policy.md`.
//!
//! Loading is all-or-nothing: [`PolicySet::load_dir`] returns either a complete, validated set or
//! every error found, each naming file, line and column. The running agent swaps a new set in
//! only when it loaded cleanly, so a broken file never weakens (or widens) enforcement.
//!
//! Raw serde types (`raw`) reject unknown fields; values that carry syntax (FQDN patterns, CIDRs,
//! names, ports, regexes, time zones) are checked while deserializing, so their errors point at
//! the offending line.
//!
//! The same files carry the L7 (parameter-level) policy: `inspect: true` on egress entries, and
//! `tools` and `dlp` sections (`l7`). [`L7Engine`] compiles them to Rego (`rego`) and evaluates
//! requests with regorus; raw `*.rego` modules next to the YAML hook extra rules in.

mod cases;
mod engine;
pub(crate) mod input;
mod l7;
mod raw;
mod rego;

use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;

pub use cases::{run_cases, run_cases_timed, time_mix};
// The L7 enforcer's API; a caller names the types it needs.
#[allow(
    unused_imports,
    reason = "API of the L7 enforcer: callers name what they need"
)]
pub use engine::{Backend, DEFAULT_EVAL_LIMIT, L7Decision, L7Engine, L7Error, L7Request};
pub use l7::{CustomDetector, DLP_KINDS, L7Verdict, LlmPricing, Tool};
pub use raw::{Budget, FqdnPattern, Name, OnExceed, RateLimit};
pub use rego::compile_bundle;

/// Most distinct ports an identity's egress rules may name together: the kernel's allowlist
/// value holds [`aegis_common::MAX_PORTS`] ports.
pub const MAX_DISTINCT_PORTS: usize = aegis_common::MAX_PORTS;

/// Enforcement mode of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Denials are enforced.
    Enforce,
    /// Would-be denials are reported and the call is allowed.
    Shadow,
}

/// Ports a rule allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Every port.
    Any,
    /// Only these ports (sorted, deduplicated, at most [`MAX_DISTINCT_PORTS`]).
    Only(BTreeSet<u16>),
}

impl Ports {
    /// Union of two port sets.
    pub fn union(&self, other: &Ports) -> Ports {
        match (self, other) {
            (Ports::Only(a), Ports::Only(b)) => Ports::Only(a.union(b).copied().collect()),
            _ => Ports::Any,
        }
    }
}

/// Where an egress rule allows traffic to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Addresses learned from DNS answers to names matching the pattern.
    Fqdn(FqdnPattern),
    /// A literal network.
    Cidr(IpNet),
}

/// One entry of a policy's `egress` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRule {
    pub destination: Destination,
    pub ports: Ports,
    /// TLS connections to this name go through the L7 enforcer (fqdn rules only).
    pub inspect: bool,
}

/// A validated policy for one agent (and optionally one tenant).
#[derive(Clone, Debug)]
pub struct Policy {
    /// File the policy came from.
    pub source: PathBuf,
    pub agent: Name,
    /// `None`: applies to every tenant of the agent without a tenant-specific policy.
    pub tenant: Option<Name>,
    /// Policy version reported with every verdict.
    pub version: u32,
    pub mode: Mode,
    pub egress: Vec<EgressRule>,
    /// Whether raw and packet sockets are refused (default: yes).
    pub deny_raw_sockets: bool,
    /// L7 tools (host + method + path → action), in file order (the first match wins).
    pub tools: Vec<Tool>,
    /// Policy-defined DLP detectors, by name.
    pub dlp_custom: Vec<CustomDetector>,
    /// Rate of the identity's L7 requests, if limited.
    pub rate_limit: Option<RateLimit>,
    /// Spend limits of the identity's priced calls, if any.
    pub budget: Option<Budget>,
    /// Name of the policy's Rego package below `data.aegis.policy` (see [`rego_id`]).
    pub rego_id: String,
}

impl Policy {
    /// Ports allowed towards addresses learned for `qname` (lowercase, no trailing dot), or
    /// `None` when no FQDN rule matches the name.
    pub fn fqdn_ports(&self, qname: &str) -> Option<Ports> {
        self.egress
            .iter()
            .filter_map(|rule| match &rule.destination {
                Destination::Fqdn(pattern) if pattern.matches(qname) => Some(&rule.ports),
                _ => None,
            })
            .fold(None, |acc: Option<Ports>, ports| {
                Some(acc.map_or_else(|| ports.clone(), |acc| acc.union(ports)))
            })
    }

    /// Whether requests to `host` (any case, trailing dot ignored) go through the L7 enforcer:
    /// an `inspect: true` fqdn rule matches it.
    pub fn inspects(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host);
        self.egress.iter().any(|rule| match &rule.destination {
            Destination::Fqdn(pattern) => rule.inspect && pattern.matches(host),
            Destination::Cidr(_) => false,
        })
    }

    /// The policy-defined DLP detector named `name`.
    pub fn dlp_detector(&self, name: &str) -> Option<&regex::Regex> {
        self.dlp_custom
            .iter()
            .find(|d| d.name.as_str() == name)
            .map(|d| &d.regex.regex)
    }

    /// The literal CIDR rules.
    pub fn cidrs(&self) -> impl Iterator<Item = (IpNet, &Ports)> {
        self.egress
            .iter()
            .filter_map(|rule| match rule.destination {
                Destination::Cidr(net) => Some((net, &rule.ports)),
                Destination::Fqdn(_) => None,
            })
    }
}

/// One problem found while loading policies, located in its file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem concerns the whole file.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in a policy directory; displayed one per line.
#[derive(Debug, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// All policies of a directory, indexed by (agent, tenant).
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    by_identity: HashMap<(String, Option<String>), Arc<Policy>>,
    /// Raw Rego modules (`*.rego` next to the YAML), sorted by file name.
    rego_modules: Vec<RegoModule>,
}

/// A raw Rego module placed next to the policies; its package must be
/// `aegis.ext.<policy rego id>` (checked by [`L7Engine::build`]).
#[derive(Clone, Debug)]
pub struct RegoModule {
    pub source: PathBuf,
    pub text: String,
}

// === impl PolicySet ===

impl PolicySet {
    /// Loads every `*.yaml`/`*.yml` file directly in `dir`, and the raw `*.rego` modules beside
    /// them (subdirectories, such as test cases and the compiled bundle, are ignored). Files
    /// may be symbolic links; names starting with `..` are kubelet's own in a mounted ConfigMap
    /// (`..data`, `..<timestamp>/`, `..data_tmp` during a swap) and are skipped.
    ///
    /// # Errors
    /// Every unreadable file, YAML or schema error, and duplicate (agent, tenant), each with
    /// file, line and column.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
        let whole = |message: String| {
            PolicyErrors(vec![PolicyError {
                file: dir.to_owned(),
                line: 0,
                column: 0,
                message,
            }])
        };
        let entries =
            fs::read_dir(dir).map_err(|e| whole(format!("cannot read policy directory: {e}")))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b".."))
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "rego")
                    )
            })
            .collect();
        files.sort();
        let (rego_files, files): (Vec<PathBuf>, Vec<PathBuf>) = files
            .into_iter()
            .partition(|p| p.extension().is_some_and(|e| e == "rego"));

        let mut set = PolicySet::default();
        let mut errors = Vec::new();
        for file in rego_files {
            match fs::read_to_string(&file) {
                Ok(text) => set.rego_modules.push(RegoModule { source: file, text }),
                Err(e) => errors.push(PolicyError {
                    file,
                    line: 0,
                    column: 0,
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        let mut rego_ids: HashMap<String, PathBuf> = HashMap::new();
        for file in files {
            let text = match fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(PolicyError {
                        file,
                        line: 0,
                        column: 0,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            match parse(&file, &text) {
                Ok(policy) => {
                    let key = (
                        policy.agent.to_string(),
                        policy.tenant.as_ref().map(ToString::to_string),
                    );
                    if let Some(first) = rego_ids.get(&policy.rego_id)
                        && !set.by_identity.contains_key(&key)
                    {
                        errors.push(PolicyError {
                            file: file.clone(),
                            line: line_of(&text, "agent:"),
                            column: 1,
                            message: format!(
                                "this policy and {} both compile to Rego package aegis.policy.{}; rename the agent or tenant",
                                first.display(),
                                policy.rego_id
                            ),
                        });
                        continue;
                    }
                    if let Some(first) = set.by_identity.get(&key) {
                        errors.push(PolicyError {
                            file: file.clone(),
                            line: line_of(&text, "agent:"),
                            column: 1,
                            message: format!(
                                "agent {:?} tenant {:?} already has a policy in {}",
                                key.0,
                                key.1.as_deref().unwrap_or("*"),
                                first.source.display()
                            ),
                        });
                        continue;
                    }
                    rego_ids.insert(policy.rego_id.clone(), file.clone());
                    set.by_identity.insert(key, Arc::new(policy));
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(PolicyErrors(errors))
        }
    }

    /// The policy in force for (agent, tenant): the tenant-specific one, else the agent's
    /// tenant-independent one.
    pub fn for_identity(&self, agent: &str, tenant: &str) -> Option<&Arc<Policy>> {
        self.by_identity
            .get(&(agent.to_owned(), Some(tenant.to_owned())))
            .or_else(|| self.by_identity.get(&(agent.to_owned(), None)))
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.by_identity.len()
    }

    /// Whether the set holds no policy.
    pub fn is_empty(&self) -> bool {
        self.by_identity.is_empty()
    }

    /// Every policy, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_identity.values()
    }

    /// Every policy, sorted by source file.
    pub fn sorted(&self) -> Vec<&Arc<Policy>> {
        let mut all: Vec<_> = self.by_identity.values().collect();
        all.sort_by(|a, b| a.source.cmp(&b.source));
        all
    }

    /// The raw Rego modules of the directory.
    pub fn rego_modules(&self) -> &[RegoModule] {
        &self.rego_modules
    }
}

/// The Rego package name (below `data.aegis.policy` and `data.aegis.ext`) of the policy for
/// (agent, tenant): the names with `-` and `.` turned into `_`, joined by `__`.
pub fn rego_id(agent: &str, tenant: Option<&str>) -> String {
    let clean = |s: &str| s.replace(['-', '.'], "_");
    match tenant {
        Some(t) => format!("{}__{}", clean(agent), clean(t)),
        None => clean(agent),
    }
}

/// Parses and validates one policy file.
fn parse(file: &Path, text: &str) -> Result<Policy, PolicyError> {
    let raw: raw::RawPolicy = serde_norway::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        PolicyError {
            file: file.to_owned(),
            line,
            column,
            message: yaml_message(&e),
        }
    })?;
    let mut distinct = BTreeSet::new();
    for rule in &raw.egress {
        if let Ports::Only(ports) = &rule.ports {
            distinct.extend(ports.iter().copied());
        }
    }
    if distinct.len() > MAX_DISTINCT_PORTS {
        return Err(PolicyError {
            file: file.to_owned(),
            line: line_of(text, "egress:"),
            column: 1,
            message: format!(
                "egress: {} distinct ports across rules; at most {MAX_DISTINCT_PORTS} are supported",
                distinct.len()
            ),
        });
    }
    let egress: Vec<EgressRule> = raw.egress.into_iter().map(Into::into).collect();
    check_l7(&egress, &raw.tools, &raw.dlp.custom).map_err(|(needle, message)| PolicyError {
        file: file.to_owned(),
        line: needle.map_or(1, |(key, value)| line_of_value(text, key, &value)),
        column: 1,
        message,
    })?;
    let rego_id = rego_id(raw.agent.as_str(), raw.tenant.as_ref().map(Name::as_str));
    Ok(Policy {
        source: file.to_owned(),
        agent: raw.agent,
        tenant: raw.tenant,
        version: raw.version,
        mode: raw.mode.into(),
        egress,
        deny_raw_sockets: raw.sockets.raw == raw::SocketRule::Deny,
        tools: raw.tools,
        dlp_custom: raw.dlp.custom,
        rate_limit: raw.rate_limit,
        budget: raw.budget,
        rego_id,
    })
}

/// Where a cross-field error is: the first line with this key and value.
type Needle = Option<(&'static str, String)>;

/// Checks what spans several fields of the L7 part: every tool host is an inspected egress
/// name, action names are unique, `sanitize` names exist.
fn check_l7(
    egress: &[EgressRule],
    tools: &[Tool],
    custom: &[CustomDetector],
) -> Result<(), (Needle, String)> {
    let mut detectors = BTreeSet::new();
    for d in custom {
        if DLP_KINDS.contains(&d.name.as_str()) {
            return Err((
                Some(("name:", d.name.to_string())),
                format!(
                    "dlp.custom: {:?} is a built-in detector; pick another name",
                    d.name.as_str()
                ),
            ));
        }
        if !detectors.insert(d.name.as_str()) {
            return Err((
                Some(("name:", d.name.to_string())),
                format!(
                    "dlp.custom: detector {:?} is defined twice",
                    d.name.as_str()
                ),
            ));
        }
    }
    let mut actions = BTreeSet::new();
    for tool in tools {
        let covered = egress.iter().any(|rule| match &rule.destination {
            Destination::Fqdn(p) => rule.inspect && covers(p, &tool.host),
            Destination::Cidr(_) => false,
        });
        if !covered {
            return Err((
                Some(("host:", tool.host.to_string())),
                format!(
                    "tool {}: host {} is not covered by an egress entry with `inspect: true`",
                    tool.name, tool.host
                ),
            ));
        }
        if tool.actions.is_empty() {
            return Err((
                Some(("name:", tool.name.to_string())),
                format!("tool {}: no actions", tool.name),
            ));
        }
        for action in &tool.actions {
            if !actions.insert(action.name.as_str()) {
                return Err((
                    Some(("name:", action.name.to_string())),
                    format!(
                        "action {}: defined twice (action names are unique in a policy)",
                        action.name
                    ),
                ));
            }
            for name in &action.sanitize {
                let n = name.as_str();
                if !DLP_KINDS.contains(&n) && !detectors.contains(n) {
                    return Err((
                        Some(("sanitize:", n.to_owned())),
                        format!(
                            "action {}: unknown DLP detector {n:?}: use one of {} or a `dlp.custom` name",
                            action.name,
                            DLP_KINDS.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether every name `inner` matches is matched by `outer`.
fn covers(outer: &FqdnPattern, inner: &FqdnPattern) -> bool {
    match (outer, inner) {
        (_, FqdnPattern::Exact(name)) => outer.matches(name),
        (FqdnPattern::Wildcard(o), FqdnPattern::Wildcard(i)) => i.ends_with(o.as_str()),
        (FqdnPattern::Exact(_), FqdnPattern::Wildcard(_)) => false,
    }
}

/// The message of a YAML error without the " at line L column C" suffix (the location is
/// reported separately, as `file:line:column`).
pub fn yaml_message(e: &serde_norway::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) if e.location().is_some() => text[..i].to_owned(),
        _ => text,
    }
}

/// 1-based line of the first line holding `key` followed by `value`, or 1.
fn line_of_value(text: &str, key: &str, value: &str) -> usize {
    text.lines()
        .position(|l| {
            l.find(key)
                .is_some_and(|i| l[i + key.len()..].contains(value))
        })
        .map_or(1, |i| i + 1)
}

/// 1-based line of the first line starting with `key` (after indentation), or 1.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests;
