//! Latency percentiles from raw samples (microseconds).
//!
//! A run at 2000 rps for 10 s keeps 20,000 `u32`s: sorting them is cheaper and more honest
//! than a bucketed histogram, and p99 then rests on 200 real samples.

use serde_json::json;

/// Summary of one load run.
#[derive(Debug, Default)]
pub struct Summary {
    /// Requests that completed with the expected status.
    pub ok: u64,
    /// Requests that failed (transport error or unexpected status).
    pub errors: u64,
    /// Wall-clock length of the measured phase in seconds.
    pub seconds: f64,
    /// Latency samples of successful requests, in microseconds.
    pub samples_us: Vec<u32>,
}

impl Summary {
    /// The `q`-quantile (0..=1) of the samples, nearest-rank; 0 when there are none.
    pub fn quantile(sorted: &[u32], q: f64) -> u32 {
        if sorted.is_empty() {
            return 0;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    /// One line of JSON: counts, achieved rate and p50/p90/p99/p99.9/max in microseconds.
    pub fn to_json(&mut self, label: &str, target_rate: f64) -> serde_json::Value {
        self.samples_us.sort_unstable();
        let s = &self.samples_us;
        json!({
            "label": label,
            "target_rps": target_rate,
            "achieved_rps": if self.seconds > 0.0 { (self.ok + self.errors) as f64 / self.seconds } else { 0.0 },
            "ok": self.ok,
            "errors": self.errors,
            "p50_us": Self::quantile(s, 0.50),
            "p90_us": Self::quantile(s, 0.90),
            "p99_us": Self::quantile(s, 0.99),
            "p999_us": Self::quantile(s, 0.999),
            "max_us": s.last().copied().unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(Summary::quantile(&v, 0.5), 50);
        assert_eq!(Summary::quantile(&v, 0.99), 99);
        assert_eq!(Summary::quantile(&v, 1.0), 100);
        assert_eq!(Summary::quantile(&[], 0.5), 0);
    }
}
