//! `aegis-agent token issue | verify`.

use std::{path::Path, process::ExitCode, time::Duration};

use crate::{audit::chain::AuditKey, token};

/// Prints a new token signed with the key at `key` (created with its `.pub` if absent).
pub fn issue(
    key: &Path,
    org: &str,
    tenant: &str,
    agent: &str,
    scopes: &[String],
    ttl_seconds: u64,
) -> anyhow::Result<ExitCode> {
    AuditKey::load_or_create(key)?;
    let pem = std::fs::read(key)?;
    let t = token::issue(
        &pem,
        org,
        tenant,
        agent,
        scopes,
        Duration::from_secs(ttl_seconds),
    )?;
    println!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// Prints the claims of a valid token, or why it is not; exit 0 or 2.
pub fn verify(t: &str, key: &Path) -> anyhow::Result<ExitCode> {
    let key = token::decoding_key(key)?;
    Ok(match token::decode(t, &key) {
        Ok(claims) => {
            println!("{}", serde_json::to_string(&claims)?);
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::from(2)
        }
    })
}
