//! The audit log's hash chain and batch signatures, and their verification.
//!
//! Each line is `{"seq": N, "ts": ..., "prev": H, ...}` where `H` is the lowercase hex SHA-256
//! of the previous line's bytes (without its newline), 64 zeros on the first line (`seq` 0).
//! A signature record closes each batch:
//!
//! ```json
//! {"seq": 8, "ts": "...", "prev": "<hash of line seq 7>", "kind": "audit_signature",
//!  "signs_seq": 7, "key_id": "<first 16 hex digits of SHA-256 of the public key>",
//!  "signature": "<base64 Ed25519 signature of \"aegis-audit-v1\n\" + prev>"}
//! ```
//!
//! Because `prev` chains every line to the one before it, a signature over the hash of line
//! `seq - 1` covers every line up to it. Ed25519 is RFC 8032; keys are stored as PEM: the
//! private key PKCS#8 (`PRIVATE KEY`, mode 0600), the public key SubjectPublicKeyInfo
//! (`PUBLIC KEY`, RFC 8410), which `openssl pkey -pubin` reads.
//!
//! What verification cannot see: a file cut exactly after a signature record is a valid, shorter
//! log. [`Report::head`] names the last line's hash, to compare with a copy kept elsewhere.

use std::{
    fs::{self, File},
    io::{self, Read as _, Seek as _, SeekFrom},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use ring::{
    digest,
    rand::SystemRandom,
    signature::{self, Ed25519KeyPair, KeyPair as _},
};

/// `prev` of the first line of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// `kind` of signature records.
pub const SIGNATURE_KIND: &str = "audit_signature";
/// Prefix of the signed message (domain separation), followed by the signed hash in hex.
const SIGNED_PREFIX: &[u8] = b"aegis-audit-v1\n";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 section 4), before the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// How much of a log's end is read to find its last line when resuming.
const TAIL: u64 = 1 << 20;

/// Errors loading or creating the audit key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not an Ed25519 {what} in PEM: {message}", path.display())]
    Format {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
}

/// The node's audit signing key (Ed25519).
pub struct AuditKey {
    pair: Ed25519KeyPair,
}

impl AuditKey {
    /// Loads the PKCS#8 PEM key at `path`, or creates one (mode 0600) with its public key next
    /// to it (`<path>.pub`) when the file does not exist.
    ///
    /// # Errors
    /// The file cannot be read or written, or does not hold an Ed25519 PKCS#8 key.
    pub fn load_or_create(path: &Path) -> Result<AuditKey, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        match fs::read(path) {
            Ok(text) => {
                let format = |message: String| KeyError::Format {
                    path: path.to_owned(),
                    what: "private key (PKCS#8)",
                    message,
                };
                let pem = pem::parse(&text).map_err(|e| format(e.to_string()))?;
                if pem.tag() != "PRIVATE KEY" {
                    return Err(format(format!("PEM block is {}", pem.tag())));
                }
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pem.contents())
                    .map_err(|e| format(e.to_string()))?;
                Ok(AuditKey { pair })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let rng = SystemRandom::new();
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|e| io_err(io::Error::other(e.to_string())))?;
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).map_err(io_err)?;
                }
                let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref()));
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io_err)?;
                io::Write::write_all(&mut file, pem.as_bytes()).map_err(io_err)?;
                let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                    .map_err(|e| io_err(io::Error::other(e.to_string())))?;
                let key = AuditKey { pair };
                let public = public_path(path);
                fs::write(&public, key.public_pem()).map_err(|source| KeyError::Io {
                    path: public,
                    source,
                })?;
                Ok(key)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// A fresh key held in memory only.
    #[cfg(test)]
    pub fn generate() -> AuditKey {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("the OS has randomness");
        AuditKey {
            pair: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a key ring just made"),
        }
    }

    /// The public key as a PEM SubjectPublicKeyInfo (`PUBLIC KEY`).
    pub fn public_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        pem::encode(&pem::Pem::new("PUBLIC KEY", der))
    }

    /// The 32 bytes of the public key.
    pub fn public_raw(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }
}

/// `<key>.pub`: where [`AuditKey::load_or_create`] writes the public key.
pub fn public_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Reads a PEM `PUBLIC KEY` (Ed25519 SubjectPublicKeyInfo) and returns the 32 key bytes.
///
/// # Errors
/// The file cannot be read or is not such a key.
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    let text = fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    let format = |message: String| KeyError::Format {
        path: path.to_owned(),
        what: "public key (SubjectPublicKeyInfo)",
        message,
    };
    let pem = pem::parse(&text).map_err(|e| format(e.to_string()))?;
    let der = pem.contents();
    if pem.tag() != "PUBLIC KEY" || der.len() != 44 || der[..12] != SPKI_PREFIX {
        return Err(format(format!(
            "expected an Ed25519 PUBLIC KEY block, found {} ({} bytes)",
            pem.tag(),
            der.len()
        )));
    }
    Ok(der[12..].to_vec())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

fn key_id(public: &[u8]) -> String {
    sha256_hex(public)[..16].to_owned()
}

/// The writer's position in the chain: the next `seq` and the hash of the last line.
#[derive(Debug)]
pub struct Chain {
    next_seq: u64,
    prev: String,
}

impl Chain {
    /// A new log's chain.
    pub fn genesis() -> Chain {
        Chain {
            next_seq: 0,
            prev: GENESIS.to_owned(),
        }
    }

    /// The chain continuing `file`'s last line (genesis for an empty file), and whether the
    /// file ends in the middle of a line.
    ///
    /// # Errors
    /// The file cannot be read, or its last complete line is not a record with a `seq`.
    pub fn resume(file: &File) -> io::Result<(Chain, bool)> {
        let mut file = file;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok((Chain::genesis(), false));
        }
        let start = len.saturating_sub(TAIL);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        let unterminated = tail.last() != Some(&b'\n');
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        // The last complete line: after an unterminated tail, the one before it.
        let complete = if unterminated {
            match body.iter().rposition(|b| *b == b'\n') {
                Some(i) => &body[..i],
                None => &[][..],
            }
        } else {
            body
        };
        let last = match complete.iter().rposition(|b| *b == b'\n') {
            Some(i) => &complete[i + 1..],
            None if start == 0 => complete,
            None => {
                return Err(io::Error::other(format!(
                    "no line break in the last {TAIL} bytes"
                )));
            }
        };
        if last.is_empty() {
            return Ok((Chain::genesis(), unterminated));
        }
        let seq = serde_json::from_slice::<serde_json::Value>(last)
            .ok()
            .and_then(|v| v["seq"].as_u64())
            .ok_or_else(|| io::Error::other("the last line is not an audit record with a seq"))?;
        // After a cut line, the chain continues from it: `audit verify` names the cut line.
        let prev_line = if unterminated { body } else { last };
        let prev_line = match prev_line.iter().rposition(|b| *b == b'\n') {
            Some(i) => &prev_line[i + 1..],
            None => prev_line,
        };
        Ok((
            Chain {
                next_seq: seq + 1 + u64::from(unterminated),
                prev: sha256_hex(prev_line),
            },
            unterminated,
        ))
    }

    /// The line for a record whose fields are the JSON object `body` (`{...}`), chained.
    pub fn next_line(&mut self, ts: &str, body: &str) -> String {
        let rest = body.strip_prefix('{').unwrap_or(body);
        let sep = if rest.trim_start().starts_with('}') {
            ""
        } else {
            ","
        };
        let line = format!(
            "{{\"seq\":{},\"ts\":\"{ts}\",\"prev\":\"{}\"{sep}{rest}",
            self.next_seq, self.prev
        );
        self.advance(&line);
        line
    }

    /// The signature record covering every line so far, chained.
    pub fn signature_line(&mut self, ts: &str, key: &AuditKey) -> String {
        let mut message = SIGNED_PREFIX.to_vec();
        message.extend_from_slice(self.prev.as_bytes());
        let sig = key.pair.sign(&message);
        let body = format!(
            "{{\"kind\":\"{SIGNATURE_KIND}\",\"signs_seq\":{},\"key_id\":\"{}\",\"signature\":\"{}\"}}",
            self.next_seq.saturating_sub(1),
            key_id(key.public_raw()),
            base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
        );
        self.next_line(ts, &body)
    }

    fn advance(&mut self, line: &str) {
        self.prev = sha256_hex(line.as_bytes());
        self.next_seq += 1;
    }
}

/// A verified log.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// Lines (records and signatures).
    pub lines: usize,
    pub signatures: usize,
    /// `seq` of the last line.
    pub last_seq: u64,
    /// Hash of the last line: the chain's head.
    pub head: String,
}

/// Where and why a log fails verification.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct Broken {
    /// 1-based line number of the first broken record.
    pub line: usize,
    pub message: String,
}

/// Verifies the whole log `text` against the Ed25519 public key `public` (32 bytes): every
/// line chained to the one before, `seq` from 0 without gaps, every signature valid, and the
/// last line a signature.
///
/// # Errors
/// The first broken record: edited (its hash no longer matches the next line's `prev`),
/// deleted or reordered (`seq` out of sequence), an invalid signature, a cut line, or records
/// after the last signature.
pub fn verify(text: &[u8], public: &[u8]) -> Result<Report, Broken> {
    let key = signature::UnparsedPublicKey::new(&signature::ED25519, public);
    let broken = |line: usize, message: String| Broken { line, message };
    let mut lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    match lines.pop() {
        Some([]) | None => {}
        Some(_) => {
            return Err(broken(
                lines.len() + 1,
                "the line is cut (no line break at the end of the file): truncated".into(),
            ));
        }
    }
    if lines.is_empty() {
        return Err(broken(1, "the log is empty".into()));
    }
    let mut prev_hash = GENESIS.to_owned();
    let mut last_signature = 0usize;
    let mut signatures = 0usize;
    let mut last_seq = 0u64;
    for (i, raw) in lines.iter().enumerate() {
        let n = i + 1;
        let v: serde_json::Value = serde_json::from_slice(raw)
            .map_err(|e| broken(n, format!("not a JSON record ({e}): edited or cut")))?;
        let seq = v["seq"]
            .as_u64()
            .ok_or_else(|| broken(n, "no seq".into()))?;
        let expected = i as u64;
        if seq != expected {
            let why = if seq > expected {
                format!(
                    "seq {seq} where {expected} was expected: record(s) {expected}..{} deleted, or records reordered",
                    seq - 1
                )
            } else {
                format!("seq {seq} where {expected} was expected: records reordered or duplicated")
            };
            return Err(broken(n, why));
        }
        let prev = v["prev"].as_str().unwrap_or("");
        if prev != prev_hash {
            return Err(if n == 1 {
                broken(1, "the first record's prev is not the genesis hash".into())
            } else {
                broken(
                    n - 1,
                    format!(
                        "seq {} was modified: its hash no longer matches the prev recorded by the next line",
                        seq - 1
                    ),
                )
            });
        }
        if v["kind"] == SIGNATURE_KIND {
            let sig = v["signature"]
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .ok_or_else(|| broken(n, "signature record without a base64 signature".into()))?;
            let mut message = SIGNED_PREFIX.to_vec();
            message.extend_from_slice(prev.as_bytes());
            if key.verify(&message, &sig).is_err() {
                return Err(broken(
                    n,
                    format!(
                        "signature does not verify with this key (key_id of the key given: {}, in the record: {})",
                        key_id(public),
                        v["key_id"].as_str().unwrap_or("none")
                    ),
                ));
            }
            if v["signs_seq"].as_u64() != seq.checked_sub(1) {
                return Err(broken(n, "signs_seq is not the previous seq".into()));
            }
            signatures += 1;
            last_signature = n;
        }
        prev_hash = sha256_hex(raw);
        last_seq = seq;
    }
    if last_signature != lines.len() {
        return Err(broken(
            last_signature + 1,
            format!(
                "lines {}..{} are not covered by a signature: the file was cut inside a batch, or the agent stopped before signing it",
                last_signature + 1,
                lines.len()
            ),
        ));
    }
    Ok(Report {
        lines: lines.len(),
        signatures,
        last_seq,
        head: prev_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of `n` records in batches of 3, as the writer produces it.
    fn log(key: &AuditKey, n: u32) -> String {
        let mut chain = Chain::genesis();
        let mut out = String::new();
        for i in 0..n {
            out.push_str(&chain.next_line("t", &format!("{{\"kind\":\"test\",\"n\":{i}}}")));
            out.push('\n');
            if i % 3 == 2 || i + 1 == n {
                out.push_str(&chain.signature_line("t", key));
                out.push('\n');
            }
        }
        out
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    fn join(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn an_untouched_log_verifies() {
        let key = AuditKey::generate();
        let text = log(&key, 7);
        let report = verify(text.as_bytes(), key.public_raw()).unwrap();
        assert_eq!(report.lines, 10);
        assert_eq!(report.signatures, 3);
        assert_eq!(report.last_seq, 9);
    }

    #[test]
    fn tampering_names_the_first_broken_record() {
        let key = AuditKey::generate();
        let good = lines(&log(&key, 7));
        let check = |text: String, line: usize, words: &str| {
            let e = verify(text.as_bytes(), key.public_raw()).expect_err("tampered");
            assert_eq!(e.line, line, "{e}");
            assert!(e.message.contains(words), "{e}");
        };
        // Edit: record 1 (line 2) says n 99.
        let mut edited = good.clone();
        edited[1] = edited[1].replace("\"n\":1", "\"n\":99");
        check(join(&edited), 2, "modified");
        // Edit of the last record before a signature: the signature's prev no longer matches.
        let mut edited = good.clone();
        edited[2] = edited[2].replace("\"n\":2", "\"n\":3");
        check(join(&edited), 3, "modified");
        // Deletion of line 3.
        let mut deleted = good.clone();
        deleted.remove(2);
        check(join(&deleted), 3, "deleted");
        // Reordering of lines 2 and 3.
        let mut swapped = good.clone();
        swapped.swap(1, 2);
        check(join(&swapped), 2, "seq 2 where 1");
        // Truncation inside a batch: the tail is unsigned.
        check(join(&good[..5]), 5, "not covered by a signature");
        // Truncation inside a line.
        let text = join(&good);
        check(text[..text.len() - 10].to_owned(), 10, "cut");
        // Deleting the first record.
        check(join(&good[1..]), 1, "deleted");
        // Another key cannot vouch for the log, and a forged signature fails.
        let other = AuditKey::generate();
        let e = verify(join(&good).as_bytes(), other.public_raw()).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        // A whole log re-chained by someone without the key: signatures do not verify.
        let forged = log(&other, 7);
        assert!(verify(forged.as_bytes(), key.public_raw()).is_err());
    }

    #[test]
    fn resume_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let key = AuditKey::generate();
        let first = log(&key, 4);
        fs::write(&path, &first).unwrap();
        let (mut chain, cut) = Chain::resume(&File::open(&path).unwrap()).unwrap();
        assert!(!cut);
        let mut text = first;
        text.push_str(&chain.next_line("t", "{\"kind\":\"later\"}"));
        text.push('\n');
        text.push_str(&chain.signature_line("t", &key));
        text.push('\n');
        let report = verify(text.as_bytes(), key.public_raw()).unwrap();
        assert_eq!(report.lines, 8);
    }

    #[test]
    fn keys_round_trip_through_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/audit.key");
        let key = AuditKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let again = AuditKey::load_or_create(&path).unwrap();
        assert_eq!(key.public_raw(), again.public_raw());
        let public = read_public_key(&public_path(&path)).unwrap();
        assert_eq!(public, key.public_raw());
        let text = log(&again, 2);
        assert!(verify(text.as_bytes(), &public).is_ok());
        assert!(
            read_public_key(&path).is_err(),
            "a private key is not a public key"
        );
    }
}
