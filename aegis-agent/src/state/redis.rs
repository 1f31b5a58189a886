//! The shared state backend: Redis (or anything speaking its protocol with Lua scripting,
//! Redis 5 or later: scripts read the server clock with `TIME`).
//!
//! Every operation is one Lua script, so it is atomic against every node's concurrent calls:
//! - budgets: check every period of a charge, then add to all of them, or to none
//!   (keys `aegis:budget:<agent@tenant>|day:YYYY-MM-DD` and `...|month:YYYY-MM`, integer
//!   micro-USD, expiring 3 and 62 days after their last write);
//! - rate limits: GCRA (the generic cell rate algorithm, as `governor` and `redis-cell`
//!   implement it) on the server's clock; key `aegis:rate:<bucket>:<interval_us>:<burst>` holds
//!   the theoretical arrival time in microseconds;
//! - token ids: `SET aegis:jti:<jti> 1 NX EXAT <exp>`.
//!
//! Connections are pooled; each has connect, read and write timeouts
//! ([`Settings::timeout`]) so an unreachable Redis fails a call quickly instead of hanging it.

use std::{sync::Mutex, time::Duration};

use redis::{Client, Connection, Script};

use super::{RateStore, ReplayStore, Unavailable};
use crate::{
    budget::{BudgetError, BudgetStore, Period},
    policy::RateLimit,
};

/// Idle connections kept at most.
const POOL: usize = 16;
/// Key prefix of everything Aegis writes.
const PREFIX: &str = "aegis:";

const CHARGE: &str = r"
local amount = tonumber(ARGV[1])
local n = #KEYS
for i = 1, n do
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0')
  if spent + amount > tonumber(ARGV[1 + i]) then
    return {i, spent}
  end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[i], amount)
  redis.call('EXPIRE', KEYS[i], ARGV[1 + n + i])
end
return {0, 0}
";

/// Unchecked add (ARGV[1] > 0) or take back (< 0, floored at zero).
const ADD: &str = r"
local delta = tonumber(ARGV[1])
local n = #KEYS
for i = 1, n do
  local v = redis.call('INCRBY', KEYS[i], delta)
  if v < 0 then redis.call('SET', KEYS[i], 0) end
  redis.call('EXPIRE', KEYS[i], ARGV[1 + i])
end
return 0
";

/// GCRA: ARGV[1] emission interval (µs), ARGV[2] burst. Returns {1, 0} when the request
/// conforms, {0, wait_us} when not.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
";

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `redis://[user:password@]host:port/db` (or `rediss://` where TLS is built in).
    pub url: String,
    /// Connect, read and write timeout of each operation.
    pub timeout: Duration,
}

/// Budgets, rate limits and token ids in Redis.
pub struct RedisState {
    client: Client,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    charge: Script,
    add: Script,
    gcra: Script,
}

fn unavailable(e: impl std::fmt::Display) -> Unavailable {
    Unavailable(e.to_string())
}

impl RedisState {
    /// A client for `settings.url`; no connection is made until the first operation (an agent
    /// starts, and enforces by `--state-unavailable`, while Redis is down).
    ///
    /// # Errors
    /// The URL does not parse.
    pub fn new(settings: &Settings) -> Result<RedisState, Unavailable> {
        Ok(RedisState {
            client: Client::open(settings.url.as_str()).map_err(unavailable)?,
            timeout: settings.timeout,
            idle: Mutex::new(Vec::new()),
            charge: Script::new(CHARGE),
            add: Script::new(ADD),
            gcra: Script::new(GCRA),
        })
    }

    /// Runs `f` on a pooled connection; a connection that failed is not returned to the pool.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, Unavailable> {
        let pooled = self.idle.lock().expect("lock poisoned").pop();
        let mut con = match pooled {
            Some(c) => c,
            None => {
                let c = self
                    .client
                    .get_connection_with_timeout(self.timeout)
                    .map_err(unavailable)?;
                c.set_read_timeout(Some(self.timeout))
                    .map_err(unavailable)?;
                c.set_write_timeout(Some(self.timeout))
                    .map_err(unavailable)?;
                c
            }
        };
        let result = f(&mut con).map_err(unavailable)?;
        let mut idle = self.idle.lock().expect("lock poisoned");
        if idle.len() < POOL {
            idle.push(con);
        }
        Ok(result)
    }

    /// Checks the connection (`PING`).
    ///
    /// # Errors
    /// Redis is unreachable.
    pub fn ping(&self) -> Result<(), Unavailable> {
        self.with(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }
}

/// Seconds a period's key outlives its last write.
fn ttl(p: &Period) -> u64 {
    if p.name == "day" {
        3 * 86_400
    } else {
        62 * 86_400
    }
}

impl BudgetStore for RedisState {
    fn charge(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError> {
        if periods.is_empty() {
            return Ok(());
        }
        let mut invocation = self.charge.prepare_invoke();
        for p in periods {
            invocation.key(format!("{PREFIX}budget:{}", p.key));
        }
        invocation.arg(amount);
        for p in periods {
            invocation.arg(p.limit);
        }
        for p in periods {
            invocation.arg(ttl(p));
        }
        let (index, spent): (usize, u64) = self
            .with(|c| invocation.invoke(c))
            .map_err(|e| BudgetError::Store(e.to_string()))?;
        match index {
            0 => Ok(()),
            i => {
                let p = &periods[(i - 1).min(periods.len() - 1)];
                Err(BudgetError::Exceeded {
                    period: p.name,
                    spent,
                    limit: p.limit,
                    amount,
                    approval_needed: p.approval_needed,
                })
            }
        }
    }

    fn refund(&self, periods: &[Period], amount: u64) -> Result<(), BudgetError> {
        self.add(periods, -i64::try_from(amount).unwrap_or(i64::MAX))
    }

    fn add(&self, periods: &[Period], delta: i64) -> Result<(), BudgetError> {
        if periods.is_empty() || delta == 0 {
            return Ok(());
        }
        let mut invocation = self.add.prepare_invoke();
        for p in periods {
            invocation.key(format!("{PREFIX}budget:{}", p.key));
        }
        invocation.arg(delta);
        for p in periods {
            invocation.arg(ttl(p));
        }
        self.with(|c| invocation.invoke::<i64>(c))
            .map(|_| ())
            .map_err(|e| BudgetError::Store(e.to_string()))
    }

    #[cfg(test)]
    fn spent(&self, period: &Period) -> Result<u64, BudgetError> {
        let key = format!("{PREFIX}budget:{}", period.key);
        self.with(|c| redis::cmd("GET").arg(&key).query::<Option<u64>>(c))
            .map(|v| v.unwrap_or(0))
            .map_err(|e| BudgetError::Store(e.to_string()))
    }
}

impl RateStore for RedisState {
    fn take(&self, bucket: &str, limit: RateLimit) -> Result<Result<(), Duration>, Unavailable> {
        let interval_us = u64::try_from(limit.interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = u64::from(limit.burst.get());
        let key = format!("{PREFIX}rate:{bucket}:{interval_us}:{burst}");
        let mut invocation = self.gcra.prepare_invoke();
        invocation.key(key).arg(interval_us).arg(burst);
        let (ok, wait_us): (u8, u64) = self.with(|c| invocation.invoke(c))?;
        Ok(if ok == 1 {
            Ok(())
        } else {
            Err(Duration::from_micros(wait_us))
        })
    }
}

impl ReplayStore for RedisState {
    fn first_use(&self, jti: &str, exp: u64) -> Result<bool, Unavailable> {
        let key = format!("{PREFIX}jti:{jti}");
        let set: Option<String> = self.with(|c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("NX")
                .arg("EXAT")
                .arg(exp.max(1))
                .query(c)
        })?;
        Ok(set.is_some())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::TcpListener,
        process::{Child, Command, Stdio},
        sync::Arc,
    };

    use super::*;
    use crate::budget::{micros, periods};

    /// A throwaway `redis-server` on a free loopback port (installed by `cargo xtask setup`).
    struct Server {
        child: Child,
        url: String,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn server() -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (run `cargo xtask setup`)");
        let url = format!("redis://127.0.0.1:{port}/0");
        let probe = RedisState::new(&Settings {
            url: url.clone(),
            timeout: Duration::from_millis(200),
        })
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while probe.ping().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, url }
    }

    fn node(url: &str) -> Arc<RedisState> {
        Arc::new(
            RedisState::new(&Settings {
                url: url.to_owned(),
                timeout: Duration::from_millis(500),
            })
            .unwrap(),
        )
    }

    #[test]
    fn two_nodes_share_one_budget_without_overspending() {
        let redis = server();
        let (a, b) = (node(&redis.url), node(&redis.url));
        let now = "2026-11-22T10:00:00Z".parse().unwrap();
        let today = periods("llm-agent@acme", Some(5.0), Some(100.0), now);
        let handles: Vec<_> = (0..24)
            .map(|i| {
                let store: Arc<dyn BudgetStore> = if i % 2 == 0 { a.clone() } else { b.clone() };
                let today = today.clone();
                std::thread::spawn(move || store.charge(&today, micros(0.5)).is_ok())
            })
            .collect();
        let passed = handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .filter(|ok| *ok)
            .count();
        assert_eq!(passed, 10, "5 USD at 0.50 a call, across both nodes");
        assert_eq!(a.spent(&today[0]).unwrap(), 5_000_000);
        match b.charge(&today, 1) {
            Err(BudgetError::Exceeded { period, .. }) => assert_eq!(period, "day"),
            other => panic!("{other:?}"),
        }
        // Settling: take back part of a reservation, add an overshoot; never below zero.
        a.add(&today, -1_500_000).unwrap();
        assert_eq!(b.spent(&today[0]).unwrap(), 3_500_000);
        assert_eq!(b.spent(&today[1]).unwrap(), 3_500_000);
        a.add(&today, 200).unwrap();
        a.refund(&today, 10_000_000).unwrap();
        assert_eq!(a.spent(&today[0]).unwrap(), 0);
    }

    #[test]
    fn rate_limit_passes_the_burst_across_nodes_then_waits() {
        let redis = server();
        let (a, b) = (node(&redis.url), node(&redis.url));
        let who = "support-agent@default";
        let limit = RateLimit::per_second(2.try_into().unwrap(), Some(4.try_into().unwrap()));
        let mut passed = 0;
        let mut waits = Vec::new();
        for i in 0..8 {
            let store = if i % 2 == 0 { &a } else { &b };
            match store.take(who, limit).unwrap() {
                Ok(()) => passed += 1,
                Err(wait) => waits.push(wait),
            }
        }
        assert_eq!(passed, 4, "the burst, shared by both nodes");
        assert!(
            waits
                .iter()
                .all(|w| *w > Duration::ZERO && *w <= Duration::from_millis(500)),
            "{waits:?}"
        );
        std::thread::sleep(Duration::from_millis(550));
        assert!(a.take(who, limit).unwrap().is_ok(), "one more after 1/rate");
    }

    #[test]
    fn a_token_id_is_used_once_across_nodes_and_a_dead_redis_is_an_error() {
        let redis = server();
        let (a, b) = (node(&redis.url), node(&redis.url));
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        assert!(a.first_use("jti-1", exp).unwrap());
        assert!(
            !b.first_use("jti-1", exp).unwrap(),
            "replayed on the other node"
        );
        assert!(b.first_use("jti-2", exp).unwrap());
        drop(redis);
        let who = "support-agent@default";
        let limit = RateLimit::per_second(1.try_into().unwrap(), None);
        assert!(a.first_use("jti-3", exp).is_err());
        assert!(a.take(who, limit).is_err());
        let now = "2026-11-22T10:00:00Z".parse().unwrap();
        assert!(matches!(
            a.charge(&periods("x@y", Some(1.0), None, now), 1),
            Err(BudgetError::Store(_))
        ));
    }
}
