//! Enforcement state that outlives a request: budget spend, rate-limit buckets, spent token
//! ids. Two backends behind the same traits:
//!
//! - **embedded** (default): budgets in redb on the node (durable), rate limits in memory by
//!   `governor` (GCRA), token ids in memory;
//! - **redis** (`--state-backend redis --redis-url ...`): all three in Redis, shared by every
//!   node, each operation one atomic Lua script ([`redis::RedisState`]).
//!
//! When the store cannot be reached, [`OnUnavailable`] decides: `closed` (default) refuses the
//! calls that need it (503); `open` lets them through uncounted and logs each one.

pub mod redis;

use std::{sync::Arc, time::Duration};

use crate::{budget::BudgetStore, policy::RateLimit};

/// The store could not be reached or answered nonsense.
#[derive(Debug, thiserror::Error)]
#[error("state store unavailable: {0}")]
pub struct Unavailable(pub String);

/// What the enforcer does with a call that needs a store it cannot reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnUnavailable {
    /// Refuse the call (503 `state_unavailable`).
    Closed,
    /// Let it through without counting it; every such call is logged.
    Open,
}

/// Which store holds the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Embedded,
    Redis,
}

/// Rate-limit buckets.
pub trait RateStore: Send + Sync {
    /// Takes one request from bucket `key` (`agent@tenant`, or `agent@tenant/tool`) under
    /// `limit`: `Ok(Ok(()))`, or `Ok(Err(wait))` when over the rate, with how long until a
    /// request would pass.
    ///
    /// # Errors
    /// The store is unreachable.
    fn take(&self, key: &str, limit: RateLimit) -> Result<Result<(), Duration>, Unavailable>;
}

/// Token ids already used (replay protection).
pub trait ReplayStore: Send + Sync {
    /// Records `jti` as used until `exp` (seconds since the epoch); false when it already was.
    ///
    /// # Errors
    /// The store is unreachable, or full.
    fn first_use(&self, jti: &str, exp: u64) -> Result<bool, Unavailable>;
}

/// The stores in use and how to reach them.
#[derive(Clone)]
pub struct Backend {
    pub budgets: Arc<dyn BudgetStore>,
    pub rates: Arc<dyn RateStore>,
    pub replay: Arc<dyn ReplayStore>,
    /// Whether operations cross the network (then they run on the blocking pool, off the
    /// enforcer's threads).
    pub remote: bool,
    pub on_unavailable: OnUnavailable,
}

impl Backend {
    /// Runs a store operation: inline for in-memory stores, on the blocking pool for remote
    /// ones.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        if self.remote {
            match tokio::task::spawn_blocking(f).await {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        } else {
            f()
        }
    }
}
