//! Per-identity L7 request rate limits (the policy's `rate_limit`), GCRA by `governor`.
//!
//! One limiter per bucket (`agent@tenant`, or `agent@tenant/tool` for a tool's own limit), created on its first request and replaced when
//! its policy's quota changes (a reload starts the new quota with a full bucket). Every request
//! counts, refused ones included, so a client hammering a denied endpoint is slowed down too.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock as _, DefaultClock},
};

use crate::{
    policy::RateLimit,
    state::{RateStore, Unavailable},
};

/// Limiters kept at most; beyond, the map is cleared (buckets start full again).
const MAX_LIMITERS: usize = 65_536;

/// The node's rate limiters: each identity's quota and bucket.
#[derive(Default)]
pub struct RateLimits {
    limiters: Mutex<HashMap<String, (RateLimit, Arc<DefaultDirectRateLimiter>)>>,
}

impl RateLimits {
    /// Takes one request from bucket `key` under `limit`: `Ok`, or `Err(wait)` when over the
    /// rate, with how long until a request would pass.
    pub fn check(&self, key: &str, limit: RateLimit) -> Result<(), Duration> {
        let limiter = {
            let mut map = self.limiters.lock().expect("lock poisoned");
            match map.get(key) {
                Some((l, limiter)) if *l == limit => limiter.clone(),
                _ => {
                    if map.len() >= MAX_LIMITERS {
                        map.clear();
                    }
                    // At least 1 µs, as the Redis store's: `with_period` has a quota then, even
                    // for a `RateLimit` built by hand with a zero interval.
                    let period = limit.interval.max(Duration::from_micros(1));
                    let quota = Quota::with_period(period)
                        .expect("a non-zero period")
                        .allow_burst(limit.burst);
                    let limiter = Arc::new(RateLimiter::direct(quota));
                    map.insert(key.to_owned(), (limit, limiter.clone()));
                    limiter
                }
            }
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

impl RateStore for RateLimits {
    fn take(&self, key: &str, limit: RateLimit) -> Result<Result<(), Duration>, Unavailable> {
        Ok(self.check(key, limit))
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_identity() {
        let limits = RateLimits::default();
        let limit = RateLimit::per_second(NonZeroU32::new(1).unwrap(), NonZeroU32::new(3));
        let (a, b) = ("a@default", "b@default");
        for _ in 0..3 {
            assert!(limits.check(a, limit).is_ok());
        }
        let wait = limits.check(a, limit).expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limits.check(b, limit).is_ok(),
            "another identity has its own bucket"
        );
        std::thread::sleep(Duration::from_millis(1100));
        assert!(limits.check(a, limit).is_ok(), "refilled at 1/s");
    }
}
