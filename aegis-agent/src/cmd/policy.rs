//! `aegis-agent policy check`: validates a policy directory.

use std::{path::Path, process::ExitCode};

use crate::policy::PolicySet;

pub fn check(dir: &Path) -> anyhow::Result<ExitCode> {
    match PolicySet::load_dir(dir) {
        Ok(set) => {
            println!("{}: {} policies OK", dir.display(), set.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "aegis-agent: {} error(s) in {}",
                errors.0.len(),
                dir.display()
            );
            Ok(ExitCode::from(2))
        }
    }
}
