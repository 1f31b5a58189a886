//! The audit log: one JSON object per line, append-only, one record per decision (L7 calls,
//! kernel denials). Records carry a sequence number so a later chain (hash of the previous
//! record) and batch signatures can be added without changing the file's shape.
//!
//! Invariants: appending never blocks the request path (records go through a channel to a
//! writer thread); the writer flushes and `fdatasync`s at most [`BATCH_INTERVAL`] after a
//! record arrives or every [`BATCH_RECORDS`] records, whichever is first; the file is opened
//! `O_APPEND` and never rewritten. If the channel is full (the disk stalls), records are
//! counted as dropped and a warning names how many: the decision itself is never delayed.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, SystemTime},
};

use serde::Serialize;

/// Longest a record waits before it is on disk.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Records written between two syncs at most.
pub const BATCH_RECORDS: usize = 512;
/// Records queued for the writer at most.
const QUEUE: usize = 65_536;

/// Errors opening the audit log.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<String>,
    seq: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    seq: u64,
    ts: String,
    #[serde(flatten)]
    record: &'a T,
}

impl AuditLog {
    /// Opens (creating) `path` for appending and starts the writer thread.
    ///
    /// # Errors
    /// The directory or file cannot be created or opened.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let err = |source| AuditError {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let path = path.to_owned();
        let writer_dropped = dropped.clone();
        thread::Builder::new()
            .name("aegis-audit".into())
            .spawn(move || write_loop(&path, file, &rx, &writer_dropped))
            .map_err(|source| AuditError {
                path: PathBuf::from("audit writer thread"),
                source,
            })?;
        Ok(AuditLog {
            tx,
            seq: Arc::new(AtomicU64::new(0)),
            dropped,
        })
    }

    /// Queues one record (any serializable struct; its fields become the line's fields next
    /// to `seq` and `ts`).
    pub fn append<T: Serialize>(&self, record: &T) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let ts = humantime_rfc3339(SystemTime::now());
        let line = match serde_json::to_string(&Envelope { seq, ts, record }) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(target: "aegis::audit", error = %e, "audit record not serializable");
                return;
            }
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn write_loop(path: &Path, file: File, rx: &mpsc::Receiver<String>, dropped: &AtomicU64) {
    let mut out = BufWriter::new(file);
    let mut pending = 0usize;
    let mut reported_drops = 0u64;
    loop {
        let timeout = if pending > 0 {
            BATCH_INTERVAL
        } else {
            Duration::from_secs(3600)
        };
        match rx.recv_timeout(timeout) {
            Ok(line) => {
                let written = out
                    .write_all(line.as_bytes())
                    .and_then(|()| out.write_all(b"\n"));
                if let Err(e) = written {
                    tracing::error!(target: "aegis::audit", path = %path.display(), error = %e, "audit write failed");
                }
                pending += 1;
                if pending < BATCH_RECORDS {
                    continue;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = sync(&mut out);
                return;
            }
        }
        if let Err(e) = sync(&mut out) {
            tracing::error!(target: "aegis::audit", path = %path.display(), error = %e, "audit sync failed");
        }
        pending = 0;
        let drops = dropped.load(Ordering::Relaxed);
        if drops > reported_drops {
            tracing::warn!(target: "aegis::audit", dropped = drops - reported_drops, "audit records dropped: the writer fell behind");
            reported_drops = drops;
        }
    }
}

fn sync(out: &mut BufWriter<File>) -> io::Result<()> {
    out.flush()?;
    out.get_ref().sync_data()
}

/// RFC 3339 UTC timestamp with microseconds.
fn humantime_rfc3339(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Rec {
        kind: &'static str,
        n: u32,
    }

    #[test]
    fn records_reach_the_file_in_order_within_a_batch_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for n in 0..3 {
            log.append(&Rec { kind: "test", n });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let lines = loop {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 3 || std::time::Instant::now() > deadline {
                break text;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let parsed: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed.len(), 3, "{lines}");
        for (i, v) in parsed.iter().enumerate() {
            assert_eq!(v["seq"], i as u64);
            assert_eq!(v["n"], i as u64);
            assert_eq!(v["kind"], "test");
            assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        }
        // A second handle appends; nothing is rewritten.
        drop(log);
        let log = AuditLog::open(&path).unwrap();
        log.append(&Rec {
            kind: "again",
            n: 9,
        });
        thread::sleep(BATCH_INTERVAL * 3);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 4);
    }
}
