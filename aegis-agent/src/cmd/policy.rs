//! `aegis-agent policy check | compile | test`: validate a policy directory (YAML and the L7
//! Rego built from it), write its Rego bundle, run its data-driven test cases.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;

use crate::policy::{L7Engine, PolicyErrors, PolicySet, compile_bundle, run_cases};

/// Loads the directory and builds the L7 engine; prints the errors and returns `None` when
/// either fails.
fn load(dir: &Path) -> Option<(PolicySet, L7Engine)> {
    let report = |errors: PolicyErrors| {
        eprintln!("{errors}");
        eprintln!(
            "aegis-agent: {} error(s) in {}",
            errors.0.len(),
            dir.display()
        );
    };
    let set = PolicySet::load_dir(dir).map_err(report).ok()?;
    let engine = L7Engine::build(&set).map_err(report).ok()?;
    Some((set, engine))
}

pub fn check(dir: &Path) -> anyhow::Result<ExitCode> {
    match load(dir) {
        Some((set, _)) => {
            println!("{}: {} policies OK", dir.display(), set.len());
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::from(2)),
    }
}

pub fn compile(dir: &Path, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let Some((set, _)) = load(dir) else {
        return Ok(ExitCode::from(2));
    };
    let out = out.unwrap_or_else(|| dir.join("compiled"));
    let bundle = compile_bundle(&set);
    // Replace the previous bundle's modules, so a removed policy does not linger.
    if out.is_dir() {
        remove_rego(&out)?;
    }
    for (name, text) in &bundle.modules {
        let path = out.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "{}: {} Rego module(s) written to {}",
        dir.display(),
        bundle.modules.len(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Removes the `*.rego` files below `dir` (a previous bundle).
fn remove_rego(dir: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_rego(&path)?;
        } else if path.extension().is_some_and(|e| e == "rego") {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

pub fn test(dir: &Path) -> anyhow::Result<ExitCode> {
    let Some((_, engine)) = load(dir) else {
        return Ok(ExitCode::from(2));
    };
    let outcomes = match run_cases(&engine, dir) {
        Ok(o) => o,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut failed = 0;
    for o in &outcomes {
        let file = o.file.file_name().map_or_else(
            || o.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        match &o.failure {
            None => println!("PASS {file}: {}", o.name),
            Some(why) => {
                failed += 1;
                println!("FAIL {file}: {}\n     {why}", o.name);
            }
        }
    }
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// `aegis-agent policy bench`: decision latency per test case, and over all cases.
pub fn bench(dir: &Path, iterations: u32) -> anyhow::Result<ExitCode> {
    let Some((_, engine)) = load(dir) else {
        return Ok(ExitCode::from(2));
    };
    let outcomes = match crate::policy::run_cases_timed(&engine, dir, iterations.max(1)) {
        Ok(o) => o,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    println!("| case | p50 µs | p99 µs |\n|---|---|---|");
    let mut p99s = Vec::new();
    for o in &outcomes {
        match (&o.failure, o.timing) {
            (None, Some(t)) => {
                println!(
                    "| {} | {:.1} | {:.1} |",
                    o.name,
                    micros(t.p50),
                    micros(t.p99)
                );
                p99s.push(t.p99);
            }
            (Some(why), _) => println!("| {} | failed: {why} | |", o.name),
            (None, None) => {}
        }
    }
    p99s.sort();
    if let Some(worst) = p99s.last() {
        let median = p99s[p99s.len() / 2];
        println!(
            "\n{} cases, {iterations} decisions each: median of per-case p99 {:.1} µs, worst p99 {:.1} µs",
            p99s.len(),
            micros(median),
            micros(*worst)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn micros(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
