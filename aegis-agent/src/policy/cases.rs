//! Data-driven policy tests (`aegis-agent policy test DIR`, and one unit test over
//! `policies/tests/`): YAML files under `DIR/tests/`, each a list of cases — a request and the
//! decision expected for it. The format is documented in `docs/policy.md`.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Deserialize;

use super::{Backend, L7Engine, L7Request, L7Verdict, PolicyError, PolicyErrors, yaml_message};

/// Request time of cases that give none: Monday 2025-01-06 15:00 UTC.
pub const DEFAULT_TIME: &str = "2025-01-06T15:00:00Z";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    agent: String,
    #[serde(default = "default_tenant")]
    tenant: String,
    request: CaseRequest,
    expect: Expect,
}

fn default_tenant() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseRequest {
    host: String,
    method: String,
    path: String,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    /// A string is sent as is; a mapping or list is sent as JSON.
    #[serde(default)]
    body: Option<serde_json::Value>,
    /// RFC 3339.
    #[serde(default)]
    time: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    verdict: L7Verdict,
    #[serde(default)]
    would: Option<L7Verdict>,
    /// A substring of the reason.
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    sanitize: Option<Vec<String>>,
    #[serde(default)]
    estimated_cost_usd: Option<f64>,
}

/// The result of one case.
#[derive(Clone, Debug)]
pub struct CaseOutcome {
    pub file: PathBuf,
    pub name: String,
    /// `None`: passed; otherwise what differed.
    pub failure: Option<String>,
    /// Decision latency ([`L7Engine::decide_with`]: input document, evaluation, decision), when
    /// timed.
    pub timing: Option<Timing>,
}

/// Latency percentiles of decisions.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub p50: std::time::Duration,
    pub p99: std::time::Duration,
    pub p999: std::time::Duration,
}

impl Timing {
    /// Nearest-rank percentiles of sorted, non-empty samples.
    fn of_sorted(samples: &[std::time::Duration]) -> Timing {
        let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        Timing {
            p50: pct(0.50),
            p99: pct(0.99),
            p999: pct(0.999),
        }
    }
}

/// Runs every case file (`*.yaml`/`*.yml`) in `dir/tests/` against `engine`.
///
/// # Errors
/// A case file that cannot be read or parsed (with file and line), or no case file at all.
pub fn run_cases(engine: &L7Engine, dir: &Path) -> Result<Vec<CaseOutcome>, PolicyErrors> {
    run_cases_timed(engine, dir, 0, Backend::Vm)
}

/// [`run_cases`], and when `iterations > 0` each case's request is decided that many more
/// times and its latency percentiles recorded in [`CaseOutcome::timing`]. Decisions are made by
/// `backend`.
pub fn run_cases_timed(
    engine: &L7Engine,
    dir: &Path,
    iterations: u32,
    backend: Backend,
) -> Result<Vec<CaseOutcome>, PolicyErrors> {
    let mut outcomes = Vec::new();
    for (file, case) in load_cases(dir)? {
        let failure = run_case(engine, &case, backend).err();
        let timing = (iterations > 0 && failure.is_none())
            .then(|| time_case(engine, &case, iterations, backend))
            .flatten();
        outcomes.push(CaseOutcome {
            file,
            name: case.name,
            failure,
            timing,
        });
    }
    Ok(outcomes)
}

/// Latency percentiles over the shipped mix of requests: every case's request decided in
/// turn, `rounds` times (cases whose request cannot be decided are left out).
///
/// # Errors
/// As [`run_cases`].
pub fn time_mix(
    engine: &L7Engine,
    dir: &Path,
    rounds: u32,
    backend: Backend,
) -> Result<Timing, PolicyErrors> {
    let cases: Vec<Case> = load_cases(dir)?.into_iter().map(|(_, c)| c).collect();
    let prepared: Vec<Prepared> = cases.iter().filter_map(|c| prepare(c).ok()).collect();
    let requests: Vec<L7Request<'_>> = cases
        .iter()
        .zip(&prepared)
        .map(|(c, p)| request(c, p))
        .filter(|r| engine.decide_with(r, backend).is_ok())
        .collect();
    let mut samples = Vec::with_capacity(requests.len() * rounds as usize);
    for round in 0..rounds.saturating_add(rounds / 10) {
        for req in &requests {
            let t = std::time::Instant::now();
            std::hint::black_box(engine.decide_with(req, backend).ok());
            // The first tenth of the rounds warms up.
            if round >= rounds / 10 {
                samples.push(t.elapsed());
            }
        }
    }
    samples.sort();
    Ok(Timing::of_sorted(&samples))
}

/// Every case of every case file (`*.yaml`/`*.yml`) in `dir/tests/`, in file order.
fn load_cases(dir: &Path) -> Result<Vec<(PathBuf, Case)>, PolicyErrors> {
    let tests = dir.join("tests");
    let whole = |file: &Path, message: String| {
        PolicyErrors(vec![PolicyError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            message,
        }])
    };
    let mut files: Vec<PathBuf> = fs::read_dir(&tests)
        .map_err(|e| whole(&tests, format!("cannot read test directory: {e}")))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(whole(&tests, "no test case files (*.yaml)".into()));
    }
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let text =
            fs::read_to_string(&file).map_err(|e| whole(&file, format!("cannot read: {e}")))?;
        match serde_norway::from_str::<Vec<Case>>(&text) {
            Ok(cases) => all.extend(cases.into_iter().map(|c| (file.clone(), c))),
            Err(e) => {
                let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
                errors.push(PolicyError {
                    file: file.clone(),
                    line,
                    column,
                    message: yaml_message(&e),
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(all)
    } else {
        Err(PolicyErrors(errors))
    }
}

/// The case's request, owned: body bytes, content type and arrival time.
struct Prepared {
    body: Vec<u8>,
    content_type: Option<String>,
    time: SystemTime,
}

fn prepare(case: &Case) -> Result<Prepared, String> {
    let r = &case.request;
    let (body, content_type) = match &r.body {
        None => (Vec::new(), r.content_type.clone()),
        Some(serde_json::Value::String(s)) => (s.clone().into_bytes(), r.content_type.clone()),
        Some(v) => (
            serde_json::to_vec(v).map_err(|e| e.to_string())?,
            r.content_type
                .clone()
                .or_else(|| Some("application/json".into())),
        ),
    };
    let time = r.time.as_deref().unwrap_or(DEFAULT_TIME);
    let time: SystemTime = chrono::DateTime::parse_from_rfc3339(time)
        .map_err(|e| format!("bad request.time {time:?}: {e}"))?
        .into();
    Ok(Prepared {
        body,
        content_type,
        time,
    })
}

fn request<'a>(case: &'a Case, p: &'a Prepared) -> L7Request<'a> {
    let r = &case.request;
    L7Request {
        agent: &case.agent,
        tenant: &case.tenant,
        host: &r.host,
        method: &r.method,
        path: &r.path,
        query: r.query.as_deref(),
        content_type: p.content_type.as_deref(),
        body: &p.body,
        json: None,
        time: p.time,
    }
}

/// Latency percentiles of `iterations` decisions of the case's request (built once, outside
/// the timed section: what is timed is [`L7Engine::decide_with`], input document included).
fn time_case(engine: &L7Engine, case: &Case, iterations: u32, backend: Backend) -> Option<Timing> {
    let prepared = prepare(case).ok()?;
    let req = request(case, &prepared);
    for _ in 0..iterations.min(1000) {
        std::hint::black_box(engine.decide_with(&req, backend).ok()?);
    }
    let mut samples = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let t = std::time::Instant::now();
        std::hint::black_box(engine.decide_with(&req, backend).ok()?);
        samples.push(t.elapsed());
    }
    samples.sort();
    Some(Timing::of_sorted(&samples))
}

/// Decides the case's request and compares the decision with the expectation.
fn run_case(engine: &L7Engine, case: &Case, backend: Backend) -> Result<(), String> {
    let prepared = prepare(case)?;
    let req = request(case, &prepared);
    let d = engine
        .decide_with(&req, backend)
        .map_err(|e| format!("error: {e}"))?;
    let e = &case.expect;
    let mut diffs = Vec::new();
    if d.verdict != e.verdict {
        diffs.push(format!("verdict {} (expected {})", d.verdict, e.verdict));
    }
    if e.would.is_some() && d.would != e.would {
        diffs.push(format!("would {:?} (expected {:?})", d.would, e.would));
    }
    if let Some(reason) = &e.reason
        && !d.reason.contains(reason.as_str())
    {
        diffs.push(format!(
            "reason {:?} (expected to contain {reason:?})",
            d.reason
        ));
    }
    if e.tool.is_some() && d.tool != e.tool {
        diffs.push(format!("tool {:?} (expected {:?})", d.tool, e.tool));
    }
    if e.action.is_some() && d.action != e.action {
        diffs.push(format!("action {:?} (expected {:?})", d.action, e.action));
    }
    if let Some(s) = &e.sanitize
        && &d.sanitize != s
    {
        diffs.push(format!("sanitize {:?} (expected {s:?})", d.sanitize));
    }
    if e.estimated_cost_usd.is_some() && d.estimated_cost_usd != e.estimated_cost_usd {
        diffs.push(format!(
            "estimated_cost_usd {:?} (expected {:?})",
            d.estimated_cost_usd, e.estimated_cost_usd
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} [decision: {} / {}]",
            diffs.join("; "),
            d.verdict,
            d.reason
        ))
    }
}
