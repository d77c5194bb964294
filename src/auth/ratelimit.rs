//! Token buckets in memory, keyed by client IP or machine. A bucket holds `per_minute` tokens
//! and refills continuously; an empty bucket answers with the seconds until the next token.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

pub struct RateLimiter<K> {
    capacity: f64,
    per_second: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn per_minute(n: u32) -> Self {
        let n = f64::from(n.max(1));
        RateLimiter {
            capacity: n,
            per_second: n / 60.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`, or says how many whole seconds to wait (≥ 1).
    pub fn check(&self, key: &K) -> Result<(), u64> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), u64> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if buckets.len() > 100_000 {
            // Full buckets carry no information; dropping them bounds memory under IP churn.
            let (cap, rate) = (self.capacity, self.per_second);
            buckets.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < cap);
        }
        let (tokens, at) = buckets.entry(key.clone()).or_insert((self.capacity, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn eleventh_in_a_minute_waits_then_refills() {
        let rl = RateLimiter::per_minute(10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(rl.check_at(&"ip", t0).is_ok());
        }
        assert_eq!(rl.check_at(&"ip", t0), Err(6));
        assert!(rl.check_at(&"other", t0).is_ok());
        assert!(rl.check_at(&"ip", t0 + Duration::from_secs(6)).is_ok());
        assert!(rl.check_at(&"ip", t0 + Duration::from_secs(6)).is_err());
    }
}
