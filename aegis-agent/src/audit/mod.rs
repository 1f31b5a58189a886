//! The audit log: one JSON object per line, append-only, one record per decision (L7 calls,
//! kernel denials), tamper-evident.
//!
//! Shape of a line: `{"seq": N, "ts": RFC 3339, "prev": hex SHA-256 of the previous line, ...the
//! record's fields}`. The first line of a log has `seq` 0 and `prev` 64 zeros. After every
//! batch written, the writer appends a signature record (`"kind": "audit_signature"`, see
//! [`chain`]) whose Ed25519 signature, by the node's audit key, covers the hash of the line
//! before it, and so, through the chain, every line up to it. `aegis-agent audit verify` checks
//! the whole file ([`chain::verify`]).
//!
//! Invariants: appending never blocks the request path (records go through a channel to a
//! writer thread, which alone numbers and chains them, so `seq` is file order); the writer
//! flushes and `fdatasync`s at most [`BATCH_INTERVAL`] after a record arrives or every
//! [`BATCH_RECORDS`] records, whichever is first, signing each batch; the file is opened
//! `O_APPEND` and never rewritten; a restarted agent continues the chain from the file's last
//! line. Several processes may append to one log (an upgrade runs the old and the new agent
//! at once): each batch is written under an exclusive `flock(2)` of the file, and a writer
//! whose file grew under another writer continues the chain from the file's last line first,
//! so the file stays one chain.
//!
//! The queue holds at most `capacity` records ([`DEFAULT_QUEUE`], `--audit-queue`). A decision
//! that must not take effect unrecorded first takes a [`Slot`] ([`AuditLog::reserve`]): room
//! for its record, held until the record is queued, so that record is never dropped. When the
//! writer falls behind (a stalled or full disk) and no slot is free, the caller refuses (the
//! L7 enforcer answers 503 `audit_unavailable`, [`OnFull::Closed`]) or, when the operator chose
//! it, lets the call through unrecorded ([`OnFull::Open`]). Records appended without a slot
//! (kernel denials, which have already failed closed) are dropped when there is no room; drops
//! are counted and a warning names how many. Appending never blocks.

pub mod chain;

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, SyncSender, TryRecvError, TrySendError},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use chain::{AuditKey, Chain};

/// Longest a record waits before it is on disk.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How often the writer looks for more records while it gathers a batch.
const GATHER_TICK: Duration = Duration::from_millis(5);
/// Records written between two syncs at most.
pub const BATCH_RECORDS: usize = 512;
/// Records queued for the writer at most, by default (`--audit-queue`): 64 Ki records, about
/// 2.5 s of a saturated enforcer on the CI machine kind (~25,000 decisions/s,
/// docs/benchmarks.md) and ~45 MiB of memory at ~700 bytes a record.
pub const DEFAULT_QUEUE: usize = 65_536;

/// What becomes of a call whose audit record finds no room in the queue (the writer fell
/// behind: a stalled or full disk). `--audit-full`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFull {
    /// Refuse the call (503 `audit_unavailable`) before anything is forwarded: no decision
    /// takes effect without its record.
    #[default]
    Closed,
    /// Let it through; its record is dropped and counted, and the writer warns how many.
    Open,
}

/// Errors opening the audit log.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {message}")]
pub struct AuditError {
    path: PathBuf,
    message: String,
}

/// Longest [`AuditLog::sync`] waits for the writer.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// What the writer thread receives.
enum Msg {
    /// A record's time of arrival and JSON body.
    Record(SystemTime, String),
    /// Sign and sync what is written, then acknowledge.
    Sync(mpsc::Sender<()>),
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    room: Arc<Room>,
}

/// The queue's bookkeeping, shared by the handles, their slots and the writer.
struct Room {
    /// Messages queued or reserved and not yet taken by the writer; at most `capacity`, so a
    /// reserved message always finds room in the channel (whose bound is `capacity`).
    pending: AtomicUsize,
    capacity: usize,
    /// Records dropped for lack of room (or because the writer is gone).
    dropped: AtomicU64,
}

impl Room {
    /// Counts a record dropped (here and in `aegis_audit_records_dropped_total`).
    fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().audit_dropped();
    }

    fn take(self: &Arc<Room>) -> Option<Slot> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            room: Arc::clone(self),
            spent: false,
        })
    }
}

/// Room for one record in the audit queue ([`AuditLog::reserve`]); the record appended with it
/// ([`AuditLog::append_in`]) is queued whatever else has been appended since. Dropped unspent,
/// the room is given back.
#[must_use = "a slot holds room in the audit queue until it is spent or dropped"]
pub struct Slot {
    room: Arc<Room>,
    spent: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.spent {
            self.room.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl AuditLog {
    /// Opens (creating) `path` for appending, continues the chain of its last line, and starts
    /// the writer thread, which signs with `key`; the queue has room for `capacity` records (at
    /// least 1).
    ///
    /// # Errors
    /// The directory or file cannot be created, opened or read.
    pub fn open(path: &Path, key: AuditKey, capacity: usize) -> Result<AuditLog, AuditError> {
        let capacity = capacity.max(1);
        let err = |e: io::Error| AuditError {
            path: path.to_owned(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(err)?;
        let (chain, unterminated) = Chain::resume(&file).map_err(err)?;
        let mut out = BufWriter::new(file);
        if unterminated {
            // A line cut by a crash: end it, so new records start on a line of their own (the
            // cut line stays, and `audit verify` names it).
            out.write_all(b"\n").map_err(err)?;
        }
        out.flush().map_err(err)?;
        let end = out.get_ref().metadata().map_err(err)?.len();
        let (tx, rx) = mpsc::sync_channel::<Msg>(capacity);
        let room = Arc::new(Room {
            pending: AtomicUsize::new(0),
            capacity,
            dropped: AtomicU64::new(0),
        });
        let path = path.to_owned();
        let writer_room = room.clone();
        thread::Builder::new()
            .name("aegis-audit".into())
            .spawn(move || {
                let mut writer = Writer {
                    path,
                    out,
                    chain,
                    key,
                    batch: Vec::new(),
                    end,
                };
                writer.run(&rx, &writer_room);
            })
            .map_err(|e| AuditError {
                path: PathBuf::from("audit writer thread"),
                message: e.to_string(),
            })?;
        Ok(AuditLog { tx, room })
    }

    /// Room for one record, or `None` when the queue is full (the writer fell behind).
    pub fn reserve(&self) -> Option<Slot> {
        self.room.take()
    }

    /// Records dropped so far for lack of room.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.room.dropped.load(Ordering::Relaxed)
    }

    /// Queues one record if there is room, else drops and counts it. See
    /// [`AuditLog::append_in`] for the record's shape.
    pub fn append<T: Serialize>(&self, record: &T) {
        match self.reserve() {
            Some(slot) => self.append_in(slot, record),
            None => self.room.dropped(),
        }
    }

    /// Queues one record in the room `slot` holds (any struct serializing to a JSON object; its
    /// fields become the line's fields next to `seq`, `ts` and `prev`, which it must not have).
    /// `slot` must come from this log.
    pub fn append_in<T: Serialize>(&self, mut slot: Slot, record: &T) {
        debug_assert!(
            Arc::ptr_eq(&slot.room, &self.room),
            "slot of another audit log"
        );
        let body = match serde_json::to_string(record) {
            Ok(body) if body.starts_with('{') => body,
            Ok(other) => {
                tracing::error!(target: "aegis::audit", record = %other, "audit record is not a JSON object");
                return;
            }
            Err(e) => {
                tracing::error!(target: "aegis::audit", error = %e, "audit record not serializable");
                return;
            }
        };
        // Never `Full`: the slot's room is counted in `pending`, which bounds what the channel
        // holds. `Disconnected`: the writer is gone.
        match self.tx.try_send(Msg::Record(SystemTime::now(), body)) {
            Ok(()) => slot.spent = true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.room.dropped(),
        }
    }

    /// Blocks until every record appended before is signed and on disk (for decisions a human
    /// is told about: an approval, a kill switch). False when the writer did not confirm within
    /// 2 s (the records stay queued) or the queue is full.
    pub fn sync(&self) -> bool {
        let Some(mut slot) = self.reserve() else {
            return false;
        };
        let (ack, done) = mpsc::channel();
        if self.tx.try_send(Msg::Sync(ack)).is_err() {
            return false;
        }
        slot.spent = true;
        done.recv_timeout(SYNC_TIMEOUT).is_ok()
    }
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    chain: Chain,
    key: AuditKey,
    /// Records of the batch being gathered: (timestamp at arrival, JSON body).
    batch: Vec<(String, String)>,
    /// Length of the file after this writer's last batch: another length means another
    /// process appended since.
    end: u64,
}

impl Writer {
    /// Waits for a record, then gathers the batch by polling the queue every [`GATHER_TICK`]
    /// rather than blocking on it: a sender then finds no sleeping receiver to wake, so
    /// appending costs the request path no futex wake-up and the writer one wake-up per tick,
    /// not one per record.
    ///
    /// Each message taken gives its room in the queue back: the batch being written holds up
    /// to [`BATCH_RECORDS`] records beyond the queue's capacity.
    fn run(&mut self, rx: &mpsc::Receiver<Msg>, room: &Room) {
        let mut reported_drops = 0u64;
        let taken = |msg: Msg| {
            room.pending.fetch_sub(1, Ordering::AcqRel);
            msg
        };
        loop {
            let mut ack = None;
            let mut closed = false;
            match rx.recv().map(taken) {
                Ok(Msg::Sync(to)) => ack = Some(to),
                Ok(Msg::Record(at, body)) => self.batch.push((humantime_rfc3339(at), body)),
                Err(mpsc::RecvError) => return,
            }
            let deadline = Instant::now() + BATCH_INTERVAL;
            while ack.is_none() && self.batch.len() < BATCH_RECORDS {
                match rx.try_recv().map(taken) {
                    Ok(Msg::Sync(to)) => ack = Some(to),
                    Ok(Msg::Record(at, body)) => {
                        self.batch.push((humantime_rfc3339(at), body));
                    }
                    Err(TryRecvError::Empty) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        thread::sleep(GATHER_TICK.min(deadline - now));
                    }
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if !self.batch.is_empty() {
                self.sign_and_sync();
            }
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
            if closed {
                return;
            }
            let drops = room.dropped.load(Ordering::Relaxed);
            if drops > reported_drops {
                tracing::warn!(target: "aegis::audit", dropped = drops - reported_drops, "audit records dropped: the writer fell behind");
                reported_drops = drops;
            }
        }
    }

    fn write(&mut self, line: &str) {
        let written = self
            .out
            .write_all(line.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = written {
            tracing::error!(target: "aegis::audit", path = %self.path.display(), error = %e, "audit write failed");
        }
    }

    /// Appends the batch and its signature record under the file lock, then flushes and
    /// syncs.
    fn sign_and_sync(&mut self) {
        use rustix::fs::{FlockOperation, flock};
        if let Err(e) = flock(self.out.get_ref(), FlockOperation::LockExclusive) {
            tracing::error!(target: "aegis::audit", path = %self.path.display(), error = %e, "audit lock failed; writing unlocked");
        }
        match self.out.get_ref().metadata() {
            Ok(m) if m.len() != self.end => match Chain::resume(self.out.get_ref()) {
                Ok((chain, unterminated)) => {
                    self.chain = chain;
                    if unterminated {
                        self.write("");
                    }
                }
                Err(e) => {
                    tracing::error!(target: "aegis::audit", path = %self.path.display(), error = %e, "cannot continue the chain another writer extended");
                }
            },
            Ok(_) => {}
            Err(e) => {
                tracing::error!(target: "aegis::audit", path = %self.path.display(), error = %e, "audit log unreadable");
            }
        }
        for (ts, body) in std::mem::take(&mut self.batch) {
            let line = self.chain.next_line(&ts, &body);
            self.write(&line);
        }
        let line = self
            .chain
            .signature_line(&humantime_rfc3339(SystemTime::now()), &self.key);
        self.write(&line);
        let synced = self
            .out
            .flush()
            .and_then(|()| self.out.get_ref().sync_data());
        if let Err(e) = synced {
            tracing::error!(target: "aegis::audit", path = %self.path.display(), error = %e, "audit sync failed");
        }
        if let Ok(m) = self.out.get_ref().metadata() {
            self.end = m.len();
        }
        let _ = flock(self.out.get_ref(), FlockOperation::Unlock);
    }
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

    fn wait_lines(path: &Path, n: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= n || std::time::Instant::now() > deadline {
                return text;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Records reach the file in order within a batch interval, each batch signed, and a
    /// second writer (a restarted agent) continues the same chain: the whole file verifies.
    #[test]
    fn records_are_chained_signed_and_continued_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.jsonl");
        let key_path = dir.path().join("audit.key");
        let log = AuditLog::open(
            &path,
            AuditKey::load_or_create(&key_path).unwrap(),
            DEFAULT_QUEUE,
        )
        .unwrap();
        for n in 0..3 {
            log.append(&Rec { kind: "test", n });
        }
        let text = wait_lines(&path, 4);
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed.len(), 4, "{text}");
        for (i, v) in parsed[..3].iter().enumerate() {
            assert_eq!(v["seq"], i as u64);
            assert_eq!(v["n"], i as u64);
            assert_eq!(v["kind"], "test");
            assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        }
        assert_eq!(parsed[3]["kind"], chain::SIGNATURE_KIND);
        drop(log);
        thread::sleep(BATCH_INTERVAL);
        let log = AuditLog::open(
            &path,
            AuditKey::load_or_create(&key_path).unwrap(),
            DEFAULT_QUEUE,
        )
        .unwrap();
        log.append(&Rec {
            kind: "again",
            n: 9,
        });
        let text = wait_lines(&path, 6);
        let public = chain::read_public_key(&chain::public_path(&key_path)).unwrap();
        let report =
            chain::verify(text.as_bytes(), &public).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!((report.lines, report.signatures), (6, 2));
    }

    /// With the writer stalled (another process holds the file's lock), the queue fills: no
    /// reservation past its capacity, an append without a slot is dropped and counted, an
    /// unspent slot gives its room back, and every record appended in a slot reaches the file
    /// once the writer resumes.
    #[test]
    fn a_full_queue_refuses_reservations_and_loses_no_reserved_record() {
        use rustix::fs::{FlockOperation, flock};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let key_path = dir.path().join("audit.key");
        let log = AuditLog::open(&path, AuditKey::load_or_create(&key_path).unwrap(), 4).unwrap();
        let holder = File::open(&path).unwrap();
        flock(&holder, FlockOperation::LockExclusive).unwrap();
        // The writer takes this record, gathers for a batch interval, then waits for the lock.
        log.append(&Rec {
            kind: "first",
            n: 0,
        });
        thread::sleep(BATCH_INTERVAL * 3);
        let mut slots: Vec<Slot> = (0..4).map(|_| log.reserve().expect("room")).collect();
        assert!(log.reserve().is_none(), "a reservation past the capacity");
        let exported = || {
            crate::metrics::global()
                .encode()
                .lines()
                .find_map(|l| l.strip_prefix("aegis_audit_records_dropped_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .expect("the counter is exported")
        };
        let before = exported();
        log.append(&Rec {
            kind: "unreserved",
            n: 9,
        });
        assert_eq!(log.dropped(), 1);
        // Other tests of this process may drop records too: at least this one is counted.
        assert!(exported() >= before + 1.0);
        drop(slots.pop());
        slots.push(log.reserve().expect("the room an unspent slot gave back"));
        for (n, slot) in (1..).zip(slots) {
            log.append_in(
                slot,
                &Rec {
                    kind: "reserved",
                    n,
                },
            );
        }
        assert!(log.reserve().is_none(), "4 records queued");
        assert!(!log.sync(), "a sync with the queue full");
        flock(&holder, FlockOperation::Unlock).unwrap();
        // first + its signature, then the 4 reserved + their signature.
        let text = wait_lines(&path, 7);
        let kinds: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].to_string())
            .filter(|k| !k.contains(chain::SIGNATURE_KIND))
            .collect();
        assert_eq!(
            kinds,
            [
                "\"first\"",
                "\"reserved\"",
                "\"reserved\"",
                "\"reserved\"",
                "\"reserved\""
            ],
            "{text}"
        );
        assert!(log.sync(), "the writer took the queue: room again");
        assert_eq!(log.dropped(), 1);
    }

    /// Two writers on one file at once (an upgrade's old and new agent) interleave whole
    /// batches, each continuing the chain the other extended: the file verifies.
    #[test]
    fn concurrent_writers_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let key_path = dir.path().join("audit.key");
        let old = AuditLog::open(
            &path,
            AuditKey::load_or_create(&key_path).unwrap(),
            DEFAULT_QUEUE,
        )
        .unwrap();
        let new = AuditLog::open(
            &path,
            AuditKey::load_or_create(&key_path).unwrap(),
            DEFAULT_QUEUE,
        )
        .unwrap();
        for n in 0..3 {
            old.append(&Rec { kind: "old", n });
            new.append(&Rec { kind: "new", n });
            thread::sleep(BATCH_INTERVAL * 2);
        }
        // 6 records, each batch signed: at least 8 lines once both writers are done.
        let text = wait_lines(&path, 12);
        let public = chain::read_public_key(&chain::public_path(&key_path)).unwrap();
        let report =
            chain::verify(text.as_bytes(), &public).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(report.lines - report.signatures, 6, "{text}");
    }
}
