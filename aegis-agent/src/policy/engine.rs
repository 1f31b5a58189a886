//! The L7 decision engine: the policy set compiled to Rego and loaded into regorus once
//! ([`L7Engine::build`]); each policy's `decision` rule is then compiled to a program for
//! regorus's register VM (RVM). Per request, the calling thread's VM runs that program on the
//! request's input document, under an instruction and a wall-clock limit ([`L7Engine::decide`]);
//! regorus resets a VM's evaluation state (rule results, registers, caches) at every execution,
//! so nothing of one request reaches the next (the tests decide thousands of requests in a row
//! on one thread and compare each with the interpreter's decision).
//!
//! The tree-walking interpreter stays available as [`Backend::Interpreter`]: tests run every
//! shipped case through both and require the same decisions, and `policy bench` reports both.
//!
//! Invariants: a build either yields an engine that has compiled and prepared every module and
//! program or every error with file and line; `decide` never blocks on another request (each
//! thread owns its VM); an error from `decide` (evaluation failure, limit exceeded) must be
//! treated by the caller as a deny — it is an `Err`, never an `Allow`.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use regorus::{
    Engine, Value,
    languages::rego::compiler::Compiler,
    rvm::{RegoVM, program::Program, vm::VmError},
    utils::limits::ExecutionTimerConfig,
};

use super::{
    L7Verdict, Mode, PolicyError, PolicyErrors, PolicySet, input,
    rego::{self, LIB_FILE},
};

/// Default wall-clock limit on one evaluation.
pub const DEFAULT_EVAL_LIMIT: Duration = Duration::from_millis(50);

/// Most RVM instructions one evaluation may execute. The shipped policies need a few hundred to
/// a few thousand (a constraint costs a handful per parameter value, and values are bounded by
/// [`super::input::MAX_VALUES`]); regorus's own default is 25,000.
pub const MAX_INSTRUCTIONS: usize = 1_000_000;

/// Which regorus evaluator runs a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The policy's `decision` rule compiled once to an RVM program, run by a per-thread VM.
    /// What the enforcer uses.
    Vm,
    /// The tree-walking interpreter on a clone of the prepared engine. Kept as the reference
    /// the VM is checked against.
    Interpreter,
}

/// One HTTP request as the L7 enforcer sees it, after TLS termination.
#[derive(Clone, Debug)]
pub struct L7Request<'a> {
    pub agent: &'a str,
    pub tenant: &'a str,
    /// The SNI / `Host` (any case; a `:port` suffix and trailing dot are ignored).
    pub host: &'a str,
    /// As sent (`POST`); matched case-sensitively.
    pub method: &'a str,
    /// The request path; a `?query` suffix is ignored (pass the query in `query`).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// The whole request body (the enforcer bounds its size).
    pub body: &'a [u8],
    /// `body` already parsed as JSON by the caller (`serde_json::from_slice(body)`), when its
    /// content type is one the parameters are read from as JSON ([`super::input::is_json`]):
    /// it is then not parsed again. `None`: parsed here if needed.
    pub json: Option<&'a serde_json::Value>,
    /// When the request arrived; business hours are evaluated against it.
    pub time: SystemTime,
}

/// The policy decision for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct L7Decision {
    /// What the enforcer does. In shadow mode always `Allow`.
    pub verdict: L7Verdict,
    /// Shadow mode only: what enforce mode would have done, when that is not `Allow`.
    pub would: Option<L7Verdict>,
    /// The matched tool and action (`None` when no action matched).
    pub tool: Option<String>,
    pub action: Option<String>,
    /// Why: `allowed`, `no_matching_action`, `constraint_violated: amount > max 5000`, ...
    /// (several violations are joined with `; `).
    pub reason: String,
    /// Version of the policy that decided (0 when the identity has no policy).
    pub policy_version: u32,
    pub mode: Mode,
    /// The action's DLP detectors (built-in kinds or the policy's `dlp.custom` names); applied
    /// to the forwarded body when `verdict` is `Sanitize`.
    pub sanitize: Vec<String>,
    /// The action's `price_usd`, when it has one.
    pub estimated_cost_usd: Option<f64>,
}

impl L7Decision {
    /// A decision made before Rego (no policy, host not inspected, malformed request).
    fn early(verdict: L7Verdict, reason: String, version: u32, mode: Mode) -> L7Decision {
        let (verdict, would) = match mode {
            Mode::Shadow if verdict != L7Verdict::Allow => (L7Verdict::Allow, Some(verdict)),
            _ => (verdict, None),
        };
        L7Decision {
            verdict,
            would,
            tool: None,
            action: None,
            reason,
            policy_version: version,
            mode,
            sanitize: Vec::new(),
            estimated_cost_usd: None,
        }
    }
}

/// Why an evaluation produced no decision. The caller denies the request.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error("{}: policy evaluation failed: {message}", policy.display())]
    Eval { policy: PathBuf, message: String },
    #[error("{}: policy evaluation exceeded its limit: {message}", policy.display())]
    Limit { policy: PathBuf, message: String },
    #[error("{}: policy produced a malformed decision: {detail}", policy.display())]
    Output { policy: PathBuf, detail: String },
}

/// The compiled L7 policies, ready to evaluate. Cheap to share behind an `Arc`.
pub struct L7Engine {
    /// Every module added and prepared; cloned per interpreter evaluation.
    prepared: Engine,
    set: PolicySet,
    /// Rule path of each policy's decision, by rego id.
    rules: HashMap<String, String>,
    /// Each policy's decision rule as an RVM program, by rego id.
    programs: HashMap<String, Arc<Program>>,
    /// The parameters each policy's Rego reads, by rego id: the names its constraints check,
    /// or `None` (every parameter) when a raw module may read any.
    params_read: HashMap<String, Option<HashSet<String>>>,
    limit: ExecutionTimerConfig,
}

// === impl L7Engine ===

impl L7Engine {
    /// Compiles the set's L7 policies and raw modules into one regorus engine and prepares it.
    ///
    /// # Errors
    /// Every raw module that does not parse or compile (with its file and line), declares a
    /// package other than `aegis.ext.<rego id of a policy>`, or a generated module regorus
    /// rejects (a bug, reported against the YAML file).
    pub fn build(set: &PolicySet) -> Result<L7Engine, PolicyErrors> {
        Self::build_with_limit(set, DEFAULT_EVAL_LIMIT)
    }

    /// [`L7Engine::build`] with another evaluation time limit.
    pub fn build_with_limit(set: &PolicySet, limit: Duration) -> Result<L7Engine, PolicyErrors> {
        let mut engine = Engine::new();
        let mut errors = Vec::new();
        let lib_path = PathBuf::from(LIB_FILE);
        if let Err(e) = engine.add_policy(LIB_FILE.to_owned(), rego::LIB.to_owned()) {
            errors.push(regorus_error(&lib_path, &e));
        }
        let ext_packages: Vec<String> = set.sorted().iter().map(|p| rego::ext_package(p)).collect();
        for m in set.rego_modules() {
            let name = m.source.display().to_string();
            match engine.add_policy(name, m.text.clone()) {
                Ok(package) => {
                    let package = package.strip_prefix("data.").unwrap_or(&package);
                    if !ext_packages.iter().any(|p| p == package) {
                        errors.push(PolicyError {
                            file: m.source.clone(),
                            line: line_of_package(&m.text),
                            column: 1,
                            message: format!(
                                "raw Rego modules must declare `package aegis.ext.<policy>`, one of: {}; found `package {package}`",
                                ext_packages.join(", ")
                            ),
                        });
                    }
                }
                Err(e) => errors.push(regorus_error(&m.source, &e)),
            }
        }
        let mut rules = HashMap::new();
        let mut params_read = HashMap::new();
        for policy in set.sorted() {
            let has_ext = set
                .rego_modules()
                .iter()
                .any(|m| declared_package(&m.text) == Some(rego::ext_package(policy)));
            params_read.insert(
                policy.rego_id.clone(),
                (!has_ext).then(|| {
                    policy
                        .tools
                        .iter()
                        .flat_map(|t| &t.actions)
                        .flat_map(|a| a.params.keys())
                        .map(|p| p.as_str().to_owned())
                        .collect()
                }),
            );
            let text = rego::compile_policy(policy, has_ext);
            let name = format!("{}.rego", policy.source.display());
            if let Err(e) = engine.add_policy(name, text) {
                errors.push(regorus_error(&policy.source, &e));
            }
            rules.insert(policy.rego_id.clone(), rego::decision_rule(policy));
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        let limit = ExecutionTimerConfig {
            limit,
            check_interval: NonZeroU32::new(32).expect("non-zero"),
        };
        engine.set_execution_timer_config(limit);
        // Preparing (analysis, scheduling, rule gathering) happens at the first evaluation;
        // do it here, once, so every clone starts prepared and compile errors surface now.
        engine.set_input(Value::new_object());
        for policy in set.sorted() {
            if let Err(e) = engine.eval_rule(rules[&policy.rego_id].clone()) {
                errors.push(regorus_error(&policy.source, &e));
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        let mut programs = HashMap::new();
        for policy in set.sorted() {
            let rule = &rules[&policy.rego_id];
            match compile_program(&engine, rule) {
                Ok(program) => {
                    programs.insert(policy.rego_id.clone(), program);
                }
                Err(message) => errors.push(PolicyError {
                    file: policy.source.clone(),
                    line: 0,
                    column: 0,
                    message: format!("cannot compile {rule} to an RVM program: {message}"),
                }),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Ok(L7Engine {
            prepared: engine,
            set: set.clone(),
            rules,
            programs,
            params_read,
            limit,
        })
    }

    /// The policy set the engine was built from.
    #[cfg(test)]
    pub fn policies(&self) -> &PolicySet {
        &self.set
    }

    /// Decides one request.
    ///
    /// Before Rego: an identity without a policy is denied (`no_policy`, version 0); a host the
    /// policy does not inspect is denied (`host_not_inspected`, whatever the mode: such a
    /// request should never reach the enforcer); a path that could resolve elsewhere upstream
    /// is denied (`malformed_request: ...`, subject to shadow mode).
    ///
    /// # Errors
    /// Evaluation failed or exceeded the limit; the caller must deny.
    pub fn decide(&self, req: &L7Request<'_>) -> Result<L7Decision, L7Error> {
        self.decide_with(req, Backend::Vm)
    }

    /// [`L7Engine::decide`] on a chosen evaluator.
    ///
    /// # Errors
    /// As [`L7Engine::decide`].
    pub fn decide_with(
        &self,
        req: &L7Request<'_>,
        backend: Backend,
    ) -> Result<L7Decision, L7Error> {
        self.decide_input(req, backend, true)
    }

    /// [`L7Engine::decide_with`] on an input holding every parameter, whatever the policy
    /// reads: what the parameter filter is checked against.
    #[cfg(test)]
    pub fn decide_with_every_param(
        &self,
        req: &L7Request<'_>,
        backend: Backend,
    ) -> Result<L7Decision, L7Error> {
        self.decide_input(req, backend, false)
    }

    fn decide_input(
        &self,
        req: &L7Request<'_>,
        backend: Backend,
        filter_params: bool,
    ) -> Result<L7Decision, L7Error> {
        let Some(policy) = self.set.for_identity(req.agent, req.tenant) else {
            return Ok(L7Decision::early(
                L7Verdict::Deny,
                "no_policy".into(),
                0,
                Mode::Enforce,
            ));
        };
        let host = input::normalize_host(req.host);
        if !policy.inspects(&host) {
            return Ok(L7Decision::early(
                L7Verdict::Deny,
                format!("host_not_inspected: {host}"),
                policy.version,
                Mode::Enforce,
            ));
        }
        let path = match input::normalize_path(req.path) {
            Ok(p) => p,
            Err(why) => {
                return Ok(L7Decision::early(
                    L7Verdict::Deny,
                    format!("malformed_request: {why}"),
                    policy.version,
                    policy.mode,
                ));
            }
        };
        let only = self
            .params_read
            .get(&policy.rego_id)
            .filter(|_| filter_params)
            .and_then(Option::as_ref);
        let input = input::build(req, &host, &path, only);
        let out = match backend {
            Backend::Vm => self.run_program(policy, input)?,
            Backend::Interpreter => self.interpret(policy, input)?,
        };
        parse_decision(&out).map_err(|detail| L7Error::Output {
            policy: policy.source.clone(),
            detail,
        })
    }

    fn run_program(&self, policy: &super::Policy, input: Value) -> Result<Value, L7Error> {
        let program = &self.programs[&policy.rego_id];
        let result = VM.with_borrow_mut(|vms| {
            let index = match vms
                .iter()
                .position(|(loaded, _)| Arc::ptr_eq(loaded, program))
            {
                Some(i) => i,
                None => {
                    if vms.len() >= MAX_THREAD_VMS {
                        vms.remove(0);
                    }
                    let mut vm = RegoVM::new();
                    vm.load_program(Arc::clone(program));
                    vm.set_max_instructions(MAX_INSTRUCTIONS);
                    vm.set_execution_timer_config(Some(self.limit));
                    vms.push((Arc::clone(program), vm));
                    vms.len() - 1
                }
            };
            let vm = &mut vms[index].1;
            vm.set_input(input);
            let result = vm.execute();
            vm.set_input(Value::Null);
            result
        });
        result.map_err(|e| {
            let message = e.to_string();
            match e {
                VmError::InstructionLimitExceeded { .. }
                | VmError::TimeLimitExceeded { .. }
                | VmError::MemoryLimitExceeded { .. }
                | VmError::MemoryBudgetExceeded { .. } => L7Error::Limit {
                    policy: policy.source.clone(),
                    message,
                },
                _ => L7Error::Eval {
                    policy: policy.source.clone(),
                    message,
                },
            }
        })
    }

    fn interpret(&self, policy: &super::Policy, input: Value) -> Result<Value, L7Error> {
        let mut engine = self.prepared.clone();
        engine.set_execution_timer_config(self.limit);
        engine.set_input(input);
        engine
            .eval_rule(self.rules[&policy.rego_id].clone())
            .map_err(|e| {
                let message = format!("{e:#}");
                if e.downcast_ref::<regorus::LimitError>().is_some() {
                    L7Error::Limit {
                        policy: policy.source.clone(),
                        message,
                    }
                } else {
                    L7Error::Eval {
                        policy: policy.source.clone(),
                        message,
                    }
                }
            })
    }
}

/// VMs kept per thread (see `VM`).
const MAX_THREAD_VMS: usize = 64;

thread_local! {
    /// This thread's VMs, one per program (policy) it ran, with the program each holds: VMs
    /// reset their evaluation state at every `execute`, and reusing one saves its setup per
    /// request, also when requests of several policies interleave. At most [`MAX_THREAD_VMS`]
    /// (then the oldest programs' VMs are dropped: after a reload, those of replaced engines).
    static VM: std::cell::RefCell<Vec<(Arc<Program>, RegoVM)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Compiles one decision rule of a prepared engine to an RVM program.
fn compile_program(engine: &Engine, rule: &str) -> Result<Arc<Program>, String> {
    let mut engine = engine.clone();
    let compiled = engine
        .compile_with_entrypoint(&rule.into())
        .map_err(|e| one_line(&format!("{e:#}")))?;
    Compiler::compile_from_policy(&compiled, &[rule]).map_err(|e| one_line(&e.to_string()))
}

/// Reads the decision document the generated `decision` rule returns.
fn parse_decision(v: &Value) -> Result<L7Decision, String> {
    let text = |k: &str| -> Result<Option<String>, String> {
        match &v[k] {
            Value::String(s) => Ok(Some(s.to_string())),
            Value::Null | Value::Undefined => Ok(None),
            other => Err(format!("`{k}` is {other}")),
        }
    };
    let verdict = |k: &str| -> Result<Option<L7Verdict>, String> {
        text(k)?.map(|s| s.parse::<L7Verdict>()).transpose()
    };
    let verdict_now = verdict("verdict")?.ok_or("no `verdict`")?;
    let would = verdict("would")?.filter(|w| *w != L7Verdict::Allow);
    let mode = match text("mode")?.as_deref() {
        Some("enforce") => Mode::Enforce,
        Some("shadow") => Mode::Shadow,
        other => return Err(format!("bad `mode` {other:?}")),
    };
    let policy_version = v["version"]
        .as_u32()
        .map_err(|_| "bad `version`".to_owned())?;
    let sanitize = match &v["sanitize"] {
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_string().map(|s| s.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "bad `sanitize`".to_owned())?,
        _ => return Err("no `sanitize`".into()),
    };
    let estimated_cost_usd = match &v["price_usd"] {
        Value::Null | Value::Undefined => None,
        n => Some(n.as_f64().map_err(|_| "bad `price_usd`".to_owned())?),
    };
    Ok(L7Decision {
        verdict: verdict_now,
        would,
        tool: text("tool")?,
        action: text("action")?,
        reason: text("reason")?.ok_or("no `reason`")?,
        policy_version,
        mode,
        sanitize,
        estimated_cost_usd,
    })
}

/// The package a Rego module declares (`package a.b` → `a.b`).
pub fn declared_package(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("package "))
        .map(|p| p.trim().to_owned())
}

fn line_of_package(text: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with("package "))
        .map_or(1, |i| i + 1)
}

/// A regorus error as a located policy error. Regorus shows the location as
/// `--> file:line:col` above a source excerpt, and the message after `error: `.
fn regorus_error(file: &Path, e: &anyhow::Error) -> PolicyError {
    let text = format!("{e:#}");
    let marker = format!("--> {}:", file.display());
    let location = text.find(&marker).and_then(|i| {
        let mut parts = text[i + marker.len()..].splitn(3, ':');
        let line = parts.next()?.trim().parse::<usize>().ok()?;
        let column = parts
            .next()?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<usize>()
            .ok()?;
        Some((line, column))
    });
    let message = text.find("error: ").map_or_else(
        || one_line(&text),
        |i| one_line(&text[i + "error: ".len()..]),
    );
    let (line, column) = location.unwrap_or((0, 0));
    PolicyError {
        file: file.to_owned(),
        line,
        column,
        message,
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
