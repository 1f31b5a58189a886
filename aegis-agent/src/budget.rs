//! Spend budgets per identity: the policy's `budget` (USD per UTC day and per UTC month),
//! charged with the price of each call before it is forwarded.
//!
//! Amounts are integer micro-USD. A charge is all-or-nothing across the periods it counts
//! against and is checked and written in one transaction of the store, so N concurrent calls
//! never spend past the limit (with fixed prices the reservation is the cost; a call that
//! fails upstream is refunded). State lives behind [`BudgetStore`]; the embedded backend is
//! redb, durable across agent restarts (charges are checked in memory and group-committed
//! behind, see [`RedbStore`]).

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, OnceLock},
};

use chrono::{DateTime, Utc};
use redb::{Database, TableDefinition};

/// Spent micro-USD by `"<agent>@<tenant>|day:YYYY-MM-DD"` or `"...|month:YYYY-MM"`.
const SPENT: TableDefinition<&str, u64> = TableDefinition::new("spent_micro_usd");

/// A USD amount in micro-USD (rounded up: a price is never under-charged).
pub fn micros(usd: f64) -> u64 {
    (usd * 1e6).ceil().max(0.0) as u64
}

/// One budget period a charge counts against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Period {
    /// Store key (identity and period).
    pub key: String,
    /// Limit in micro-USD.
    pub limit: u64,
    /// `day` or `month`, for messages.
    pub name: &'static str,
    /// Whether a call over this period's limit asks for approval instead of being refused.
    pub approval_needed: bool,
}

/// The periods of `identity` (its `Display`, `agent@tenant`) at `now` under the policy limits.
pub fn periods(
    identity: &str,
    daily_usd: Option<f64>,
    monthly_usd: Option<f64>,
    now: DateTime<Utc>,
) -> Vec<Period> {
    use chrono::Datelike as _;
    // Plain integer formatting: this runs for every priced call (strftime parsing is slower).
    let (year, month, day) = (now.year(), now.month(), now.day());
    let mut out = Vec::new();
    if let Some(d) = daily_usd {
        out.push(Period {
            key: format!("{identity}|day:{year:04}-{month:02}-{day:02}"),
            limit: micros(d),
            name: "day",
            approval_needed: false,
        });
    }
    if let Some(m) = monthly_usd {
        out.push(Period {
            key: format!("{identity}|month:{year:04}-{month:02}"),
            limit: micros(m),
            name: "month",
            approval_needed: false,
        });
    }
    out
}

/// Why a charge did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "{period} budget exceeded: spent {spent} of {limit} micro-USD, this call costs {amount}"
    )]
    Exceeded {
        period: &'static str,
        spent: u64,
        limit: u64,
        amount: u64,
        /// The period's budget asks for approval instead.
        approval_needed: bool,
    },
    #[error("budget store: {0}")]
    Store(String),
}

/// Where spend is kept. Implementations make [`BudgetStore::charge`] atomic.
pub trait BudgetStore: Send + Sync {
    /// Adds `amount` to every period if none would pass its limit; otherwise changes nothing.
    ///
    /// # Errors
    /// [`BudgetError::Exceeded`] naming the first period that would pass, or a store failure.
    fn charge(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError>;
    /// Takes `amount` back from every period (a call that was not delivered).
    ///
    /// # Errors
    /// A store failure.
    fn refund(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError>;
    /// Adds `delta` (negative: takes back, never below zero) to every period without checking
    /// limits: settles a call that already happened to its actual cost.
    ///
    /// # Errors
    /// A store failure.
    fn add(&self, periods: &[Period], delta: i64) -> Result<(), BudgetError>;
    /// Micro-USD spent in `period` so far (tests read the stores with it).
    ///
    /// # Errors
    /// A store failure.
    #[cfg(test)]
    fn spent(&self, period: &Period) -> Result<u64, BudgetError>;
}

/// The embedded, durable store: spend kept in memory, where charges are checked and added
/// under one lock (atomic, so concurrent calls never overspend), and written behind to redb by a
/// flusher thread that commits every changed key in one fsync'd transaction at most every
/// [`COMMIT_INTERVAL`] (group commit). A crash loses at most the charges of the last interval
/// (10 ms) and of the commit in progress; a clean shutdown (drop) flushes everything.
///
/// redb allows one process at a time: while a predecessor agent still holds the file (an
/// upgrade's overlap), the store opens on the first call after it let go, and calls before
/// fail as a store failure (`--state-unavailable`).
pub struct RedbStore {
    inner: Arc<Inner>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    path: PathBuf,
    db: OnceLock<Database>,
    opening: Mutex<()>,
    state: Mutex<Cache>,
    wake: Condvar,
}

#[derive(Default)]
struct Cache {
    /// Spend by key: the authority for every key loaded.
    spent: HashMap<String, u64>,
    /// Keys changed since the last commit.
    dirty: HashSet<String>,
    /// The last commit failed with this (reported by the next charge: fail closed).
    failed: Option<String>,
    stop: bool,
}

/// Keys kept in memory at most; beyond, committed keys are dropped (they reload from redb).
const MAX_CACHED: usize = 100_000;
/// Shortest time between two commits: under load, charges are grouped into at most 100 fsync'd
/// commits a second; a crash loses at most this much (plus the commit in progress). 100 ms was
/// measured too (docs/benchmarks.md): no throughput gain beyond the run-to-run noise, so the
/// shorter crash window stays.
const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

fn store_err(e: impl std::fmt::Display) -> BudgetError {
    BudgetError::Store(e.to_string())
}

impl RedbStore {
    /// Opens (creating) the database at `path` and starts its flusher thread.
    ///
    /// # Errors
    /// The file cannot be created or is not a redb database.
    pub fn open(path: &Path) -> Result<RedbStore, BudgetError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store_err)?;
        }
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            db: OnceLock::new(),
            opening: Mutex::new(()),
            state: Mutex::new(Cache::default()),
            wake: Condvar::new(),
        });
        match Database::create(path) {
            Ok(db) => {
                let _ = inner.db.set(db);
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                tracing::warn!(target: "aegis::agent", path = %path.display(), "budget store held by the previous agent process; it opens once that process exits");
            }
            Err(e) => return Err(BudgetError::Store(format!("{}: {e}", path.display()))),
        }
        let flusher = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("aegis-budget".into())
                .spawn(move || inner.flush_loop())
                .map_err(store_err)?
        };
        Ok(RedbStore {
            inner,
            flusher: Some(flusher),
        })
    }

    /// Applies `f` (new value from current value and period) to every period under the lock:
    /// all or nothing.
    fn update(
        &self,
        periods: &[Period],
        f: impl Fn(u64, &Period) -> Result<u64, BudgetError>,
    ) -> Result<(), BudgetError> {
        let mut cache = self.inner.state.lock().expect("budget lock poisoned");
        if let Some(e) = &cache.failed {
            return Err(BudgetError::Store(format!("the last commit failed: {e}")));
        }
        let mut next = Vec::with_capacity(periods.len());
        for p in periods {
            let spent = match cache.spent.get(&p.key) {
                Some(v) => *v,
                None => {
                    let v = self.inner.load(&p.key)?;
                    cache.spent.insert(p.key.clone(), v);
                    v
                }
            };
            next.push(f(spent, p)?);
        }
        // The flusher is woken when the first change of a batch arrives; later ones join it.
        let wake = cache.dirty.is_empty();
        for (p, value) in periods.iter().zip(next) {
            if let Some(v) = cache.spent.get_mut(&p.key) {
                *v = value;
            }
            if !cache.dirty.contains(&p.key) {
                cache.dirty.insert(p.key.clone());
            }
        }
        drop(cache);
        if wake {
            self.inner.wake.notify_one();
        }
        Ok(())
    }
}

impl Inner {
    /// The database, opening it if a predecessor held it so far.
    fn db(&self) -> Result<&Database, BudgetError> {
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let _opening = self.opening.lock().map_err(store_err)?;
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let db = Database::create(&self.path)
            .map_err(|e| BudgetError::Store(format!("{}: {e}", self.path.display())))?;
        Ok(self.db.get_or_init(|| db))
    }

    /// The committed value of `key` (0 when absent).
    fn load(&self, key: &str) -> Result<u64, BudgetError> {
        let txn = self.db()?.begin_read().map_err(store_err)?;
        let table = match txn.open_table(SPENT) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(store_err(e)),
        };
        Ok(table.get(key).map_err(store_err)?.map_or(0, |v| v.value()))
    }

    /// Commits dirty keys until stopped (and once more after).
    fn flush_loop(&self) {
        loop {
            let started = std::time::Instant::now();
            let (batch, stop) = {
                let mut cache = self.state.lock().expect("budget lock poisoned");
                while cache.dirty.is_empty() && !cache.stop {
                    cache = self.wake.wait(cache).expect("budget lock poisoned");
                }
                let keys: Vec<String> = cache.dirty.drain().collect();
                let batch: Vec<(String, u64)> = keys
                    .into_iter()
                    .map(|k| {
                        let v = cache.spent.get(&k).copied().unwrap_or(0);
                        (k, v)
                    })
                    .collect();
                (batch, cache.stop)
            };
            if !batch.is_empty() {
                let committed = self.commit(&batch);
                let mut cache = self.state.lock().expect("budget lock poisoned");
                match committed {
                    Ok(()) => {
                        if cache.spent.len() > MAX_CACHED {
                            let dirty = std::mem::take(&mut cache.dirty);
                            cache.spent.retain(|k, _| dirty.contains(k));
                            cache.dirty = dirty;
                        }
                    }
                    Err(e) => {
                        tracing::error!(target: "aegis::budget", error = %e, "committing budget spend failed; refusing priced calls");
                        cache.failed = Some(e.to_string());
                    }
                }
            }
            if stop {
                return;
            }
            if let Some(rest) = COMMIT_INTERVAL.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }

    fn commit(&self, batch: &[(String, u64)]) -> Result<(), BudgetError> {
        let txn = self.db()?.begin_write().map_err(store_err)?;
        {
            let mut table = txn.open_table(SPENT).map_err(store_err)?;
            for (k, v) in batch {
                table.insert(k.as_str(), *v).map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.inner.state.lock().expect("budget lock poisoned").stop = true;
        self.inner.wake.notify_one();
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
    }
}

impl BudgetStore for RedbStore {
    fn charge(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError> {
        // An error inside `update` changes nothing.
        self.update(periods, |spent, p| {
            let total = spent.saturating_add(amount);
            if total > p.limit {
                Err(BudgetError::Exceeded {
                    period: p.name,
                    spent,
                    limit: p.limit,
                    amount,
                    approval_needed: p.approval_needed,
                })
            } else {
                Ok(total)
            }
        })
    }

    fn refund(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError> {
        self.update(periods, |spent, _| Ok(spent.saturating_sub(amount)))
    }

    fn add(&self, periods: &[Period], delta: i64) -> Result<(), BudgetError> {
        self.update(periods, |spent, _| Ok(spent.saturating_add_signed(delta)))
    }

    #[cfg(test)]
    fn spent(&self, period: &Period) -> Result<u64, BudgetError> {
        let cached = self
            .inner
            .state
            .lock()
            .expect("budget lock poisoned")
            .spent
            .get(&period.key)
            .copied();
        cached.map_or_else(|| self.inner.load(&period.key), Ok)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn concurrent_charges_never_pass_the_limit_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = Arc::new(RedbStore::open(&path).unwrap());
        let now = "2026-11-22T10:00:00Z".parse().unwrap();
        let today = periods("a@default", Some(5.0), Some(100.0), now);
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (store, today) = (store.clone(), today.clone());
                std::thread::spawn(move || store.charge(&today, micros(1.0)).is_ok())
            })
            .collect();
        let passed = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(passed, 5);
        store.refund(&today, micros(1.0)).unwrap();
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert!(
            store.charge(&today, micros(1.0)).is_ok(),
            "the refund freed one"
        );
        match store.charge(&today, micros(0.5)) {
            Err(BudgetError::Exceeded { period, spent, .. }) => {
                assert_eq!((period, spent), ("day", 5_000_000));
            }
            other => panic!("{other:?}"),
        }
        // The next day starts empty; the month keeps counting.
        let tomorrow = periods(
            "a@default",
            Some(5.0),
            Some(100.0),
            "2026-11-23T00:00:01Z".parse().unwrap(),
        );
        assert!(store.charge(&tomorrow, micros(1.0)).is_ok());
    }

    /// A second process's store (an upgrade's new agent) opens while the first holds the file,
    /// fails calls as a store failure meanwhile, and works once the first lets go (its last
    /// charges flushed on drop).
    #[test]
    fn a_store_held_elsewhere_opens_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let periods = periods("a@t", Some(1.0), None, Utc::now());
        let old = RedbStore::open(&path).unwrap();
        old.charge(&periods, 10).unwrap();
        let new = RedbStore::open(&path).unwrap();
        assert!(matches!(
            new.charge(&periods, 10),
            Err(BudgetError::Store(_))
        ));
        drop(old);
        new.charge(&periods, 10).unwrap();
        assert_eq!(new.spent(&periods[0]).unwrap(), 20);
    }
}
