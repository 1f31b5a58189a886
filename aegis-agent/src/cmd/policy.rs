//! `aegis-agent policy check | compile | test | bench`: validate a policy directory (YAML and the
//! L7 Rego built from it), write its Rego bundle, run its data-driven test cases, time them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;

use crate::policy::{Backend, L7Engine, PolicyErrors, PolicySet, compile_bundle, run_cases};

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

/// `aegis-agent policy bench`: decision latency per test case, and over all cases, on the RVM
/// (what the enforcer runs) and on the interpreter in the same process, as a baseline.
pub fn bench(dir: &Path, iterations: u32) -> anyhow::Result<ExitCode> {
    let Some((_, engine)) = load(dir) else {
        return Ok(ExitCode::from(2));
    };
    let mut runs = Vec::new();
    for backend in [Backend::Vm, Backend::Interpreter] {
        match crate::policy::run_cases_timed(&engine, dir, iterations.max(1), backend) {
            Ok(o) => runs.push(o),
            Err(errors) => {
                eprintln!("{errors}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let (vm, interp) = (&runs[0], &runs[1]);
    println!(
        "| case | RVM p50 µs | RVM p99 µs | interpreter p50 µs | interpreter p99 µs |\n|---|---|---|---|---|"
    );
    let mut failed = false;
    for (v, i) in vm.iter().zip(interp) {
        match (&v.failure, v.timing, i.timing) {
            (None, Some(t), Some(u)) => println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                v.name,
                micros(t.p50),
                micros(t.p99),
                micros(u.p50),
                micros(u.p99)
            ),
            (Some(why), _, _) => {
                failed = true;
                println!("| {} | failed: {why} | | | |", v.name);
            }
            _ => {
                failed = true;
                println!("| {} | | | failed: {:?} | |", v.name, i.failure);
            }
        }
    }
    let mix = |backend| crate::policy::time_mix(&engine, dir, (iterations / 10).max(10), backend);
    match (mix(Backend::Vm), mix(Backend::Interpreter)) {
        (Ok(v), Ok(i)) => println!(
            "\nAll {} cases' requests in turn, {} rounds: RVM p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs; interpreter p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs; RVM/interpreter p50 {:.2}×, p99 {:.2}×",
            vm.len(),
            (iterations / 10).max(10),
            micros(v.p50),
            micros(v.p99),
            micros(v.p999),
            micros(i.p50),
            micros(i.p99),
            micros(i.p999),
            micros(v.p50) / micros(i.p50),
            micros(v.p99) / micros(i.p99),
        ),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    }
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn micros(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
