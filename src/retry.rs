//! When a failed TokenReview is tried again: a retry budget, jittered backoff, and the API
//! server's `Retry-After`.
//!
//! - **Budget** ([`RetryBudget`]): retries may not exceed a fraction of first attempts
//!   (`kubernetes.retry_budget_percent`, 10 % by default) plus a small floor
//!   (`kubernetes.retry_budget_min_per_second`), as gRPC's retry throttling and Finagle's and
//!   Envoy's retry budgets do. Without it, an API server that answers just after the attempt
//!   timeout receives `1 + retries` requests per token exactly when it is slowest. A token
//!   bucket: each first attempt deposits `percent / 100` tokens, time deposits the floor,
//!   each retry withdraws one; the balance is capped at ten seconds' worth of the floor (at
//!   least 10), and starts full.
//! - **Backoff** ([`backoff`]): "full jitter" (a uniform wait between zero and an exponential
//!   cap: 50 ms, 100 ms, ... 1.6 s), so callers that failed together do not retry together.
//! - **`Retry-After`** ([`retry_after`]): both forms of RFC 9110 §10.2.3, delta-seconds and
//!   an HTTP-date. It is honoured, not shortened: when the server asks for longer than one
//!   attempt's timeout, tokengate does not retry at all (the Check answers UNAVAILABLE now,
//!   rather than hammering a server that said when it would be ready).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use tokio::time::Instant;

/// First backoff cap; doubles per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Largest backoff cap.
const BACKOFF_MAX: Duration = Duration::from_millis(1600);

/// A token bucket of retries, shared by every TokenReview.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    cap: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    /// Retries up to `percent` % of first attempts plus `min_per_second`.
    pub fn new(percent: u32, min_per_second: u32) -> RetryBudget {
        let min_per_second = f64::from(min_per_second);
        let cap = (10.0 * min_per_second).max(10.0);
        RetryBudget {
            ratio: f64::from(percent) / 100.0,
            min_per_second,
            cap,
            state: Mutex::new((cap, Instant::now())),
        }
    }

    fn refill(&self, st: &mut (f64, Instant)) {
        let now = Instant::now();
        let secs = now.duration_since(st.1).as_secs_f64();
        st.0 = (st.0 + secs * self.min_per_second).min(self.cap);
        st.1 = now;
    }

    /// A first attempt: deposits its share.
    pub fn first_attempt(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut st);
        st.0 = (st.0 + self.ratio).min(self.cap);
    }

    /// Whether a retry may be made now (withdraws one token if so).
    pub fn try_retry(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut st);
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The wait before retry number `retry` (0 for the first retry): uniform in
/// `[0, min(BACKOFF_MAX, BACKOFF_BASE × 2^retry)]`.
pub fn backoff(retry: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_MAX);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

/// The wait a `Retry-After` value asks for at `now`: delta-seconds, or an HTTP-date (IMF
/// fixdate, RFC 850 or asctime, as RFC 9110 requires recipients to accept); a date in the
/// past means "now". `None` for anything else.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_both_forms() {
        let now = httpdate::parse_http_date("Wed, 02 Dec 2026 09:00:00 GMT").unwrap();
        assert_eq!(retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Wed, 02 Dec 2026 09:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // The obsolete forms, which recipients must accept.
        assert_eq!(
            retry_after("Wednesday, 02-Dec-26 09:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            retry_after("Wed Dec  2 09:00:05 2026", now),
            Some(Duration::from_secs(5))
        );
        // A date in the past: retry now.
        assert_eq!(
            retry_after("Wed, 02 Dec 2026 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for junk in ["", "-1", "1.5", "soon", "Wed, 32 Dec 2026 09:00:00 GMT"] {
            assert_eq!(retry_after(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_growing_cap() {
        for (retry, cap) in [
            (0, 50),
            (1, 100),
            (2, 200),
            (5, 1600),
            (9, 1600),
            (40, 1600),
        ] {
            let waits: Vec<u128> = (0..500).map(|_| backoff(retry).as_millis()).collect();
            assert!(waits.iter().all(|w| *w <= cap), "retry {retry}: {waits:?}");
            // Spread over the range, not a fixed value: some in the lower, some in the upper
            // quarter (each misses with probability 0.75^500).
            assert!(waits.iter().any(|w| *w <= cap / 4), "retry {retry}");
            assert!(waits.iter().any(|w| *w >= cap * 3 / 4), "retry {retry}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_a_fraction_of_first_attempts_plus_a_floor() {
        // 10 %, no floor: starts with 10, then one retry per ten first attempts.
        let b = RetryBudget::new(10, 0);
        let mut retries = 0;
        for _ in 0..1000 {
            b.first_attempt();
            if b.try_retry() {
                retries += 1;
            }
        }
        assert!((107..=111).contains(&retries), "{retries}");
        // The floor refills with time, capped.
        let b = RetryBudget::new(0, 2);
        let drained = (0..100).take_while(|_| b.try_retry()).count();
        assert_eq!(drained, 20, "starts full: 10 s of the floor");
        assert!(!b.try_retry());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_retry());
        assert!(b.try_retry());
        assert!(!b.try_retry());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!((0..100).take_while(|_| b.try_retry()).count(), 20);
    }
}
