//! `aegis-agent audit verify FILE --key PUB`: checks an audit log's chain and signatures.

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;

use crate::audit::chain;

/// Prints what was verified, or the first broken line; exit 0 or 2.
pub fn verify(file: &Path, key: &Path) -> anyhow::Result<ExitCode> {
    let public = chain::read_public_key(key)?;
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(match chain::verify(&text, &public) {
        Ok(report) => {
            println!(
                "{}: intact: {} lines (seq 0..={}), {} signatures; head {}",
                file.display(),
                report.lines,
                report.last_seq,
                report.signatures,
                report.head
            );
            ExitCode::SUCCESS
        }
        Err(broken) => {
            println!("{}:{broken}", file.display());
            ExitCode::from(2)
        }
    })
}
