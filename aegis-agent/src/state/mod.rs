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

use std::{borrow::Borrow as _, sync::Arc, time::Duration};

use crate::{
    budget::{BudgetError, BudgetStore, Period},
    policy::RateLimit,
};

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
    /// Takes one request from bucket `key` under `limit` ([`RateStore::take`]).
    ///
    /// # Errors
    /// The store is unreachable.
    pub async fn take_rate(
        &self,
        key: &str,
        limit: RateLimit,
    ) -> Result<Result<(), Duration>, Unavailable> {
        self.call(&self.rates, key, move |rates, key| rates.take(key, limit))
            .await
    }

    /// Records `jti` as used until `exp` ([`ReplayStore::first_use`]).
    ///
    /// # Errors
    /// The store is unreachable, or full.
    pub async fn first_use(&self, jti: &str, exp: u64) -> Result<bool, Unavailable> {
        self.call(&self.replay, jti, move |replay, jti| {
            replay.first_use(jti, exp)
        })
        .await
    }

    /// Charges `amount` micro-USD to every period, or to none ([`BudgetStore::charge`]).
    ///
    /// # Errors
    /// As [`BudgetStore::charge`].
    pub async fn charge(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError> {
        self.call(&self.budgets, periods, move |b, p| b.charge(p, amount))
            .await
    }

    /// Takes `amount` micro-USD back from every period ([`BudgetStore::refund`]).
    ///
    /// # Errors
    /// A store failure.
    pub async fn refund(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError> {
        self.call(&self.budgets, periods, move |b, p| b.refund(p, amount))
            .await
    }

    /// Adds `delta` micro-USD to every period without checking limits ([`BudgetStore::add`]).
    ///
    /// # Errors
    /// A store failure.
    pub async fn add(&self, periods: &[Period], delta: i64) -> Result<(), BudgetError> {
        self.call(&self.budgets, periods, move |b, p| b.add(p, delta))
            .await
    }

    /// Runs `op` on `store` with `arg`: inline for in-memory stores (nothing copied), on the
    /// blocking pool for remote ones (with owned copies of both).
    async fn call<S, A, T>(
        &self,
        store: &Arc<S>,
        arg: &A,
        op: impl FnOnce(&S, &A) -> T + Send + 'static,
    ) -> T
    where
        S: ?Sized + Send + Sync + 'static,
        A: ToOwned + ?Sized,
        A::Owned: Send + 'static,
        T: Send + 'static,
    {
        if !self.remote {
            return op(store, arg);
        }
        let (store, arg) = (Arc::clone(store), arg.to_owned());
        match tokio::task::spawn_blocking(move || op(&store, arg.borrow())).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
