//! What each Check leaves in the log, written where the front doors (`server`, `http`) turn an
//! [`Outcome`] into an answer, so both log alike.
//!
//! - **The decision log** (`log.decisions`: `off`, `denials`, `all`): one `info` line per
//!   decision on the [`DECISION_TARGET`] target, with flat fields (route, outcome, reason,
//!   caller, token hash, latency, peer, the request's method, host and path without query).
//!   Never the token: [`TokenHash`] only. Lines are rate-limited by a token bucket
//!   (`log.decisions_per_second`, with a burst of as many); what the bucket refuses is counted
//!   and reported in one summary line per [`SUMMARY_EVERY`], and once more when serving ends.
//! - **Outages**: UNAVAILABLE answers are logged as one warning per [`SUMMARY_EVERY`] with a
//!   count and the latest cause ([`OutageLog`]), never a line per Check.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::check::Outcome;
use crate::config::{DecisionLogMode, LogConfig, TokenSource};
use crate::error::Report;
use crate::identity::TokenHash;
use crate::metrics::{ALLOW_REASON, ERROR_REASON, NO_ROUTE_LABEL};
use crate::request::{RequestView, TokenLookup};
use crate::review::ReviewError;

/// Target of decision log lines (filter on it, e.g. `RUST_LOG=info,tokengate::decision=off`).
pub const DECISION_TARGET: &str = "tokengate::decision";
/// At most one outage warning, and one "lines suppressed" summary, per this interval.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The decision log and the outage summary, shared by the front doors.
#[derive(Debug)]
pub struct Audit {
    decisions: DecisionLog,
    outages: OutageLog,
}

/// What the front door saw of one Check, besides its outcome.
#[derive(Clone, Copy)]
pub struct Seen<'a> {
    /// `grpc` or `http`.
    pub front: &'static str,
    /// The request, when it could be read.
    pub view: Option<&'a RequestView<'a>>,
    /// The caller's address: Envoy's `attributes.source.address` over gRPC, the proxy's TCP
    /// address over HTTP.
    pub peer: Option<&'a dyn fmt::Display>,
    /// When the front door received the Check.
    pub started: Instant,
    /// The token sources the Check was decided with (to find the token whose hash is logged).
    pub token_sources: &'a [TokenSource],
}

/// `(route, outcome, reason)` of an outcome, as logged, traced and counted.
pub fn describe<'o>(outcome: &'o Outcome<'_>) -> (&'o str, &'static str, &'static str) {
    match outcome {
        Outcome::Allow { route, .. } => (&route.name, "allow", ALLOW_REASON),
        Outcome::Deny { route, denial } => (
            route.map_or(NO_ROUTE_LABEL, |r| r.name.as_str()),
            "deny",
            denial.code(),
        ),
        Outcome::Audited { route, denial, .. } => (&route.name, "would_deny", denial.code()),
        Outcome::Unavailable { route, .. } => (&route.name, "unavailable", ERROR_REASON),
    }
}

impl Audit {
    /// From `log`.
    pub fn new(log: &LogConfig) -> Audit {
        Audit {
            decisions: DecisionLog::new(log.decisions, log.decisions_per_second),
            outages: OutageLog::new(SUMMARY_EVERY),
        }
    }

    /// Logs one answered Check (as configured, and rate-limited).
    pub fn record(&self, outcome: &Outcome<'_>, seen: Seen<'_>) {
        if let Outcome::Unavailable { route, error } = outcome {
            self.outages.record(&route.name, error);
        }
        self.decisions.record(outcome, seen);
    }

    /// Reports decision log lines suppressed since the last summary (when serving ends).
    pub fn flush(&self) {
        self.decisions.flush();
    }
}

/// The decision log: which outcomes, and the rate limit.
#[derive(Debug)]
pub struct DecisionLog {
    mode: DecisionLogMode,
    bucket: Mutex<Bucket>,
}

/// A token bucket (`per_second` tokens a second, as many at most) and the lines it refused.
#[derive(Debug)]
struct Bucket {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    summarised: Instant,
}

/// What the bucket says about one line.
#[derive(Debug, PartialEq, Eq)]
struct Admit {
    /// Write the line.
    line: bool,
    /// Write a summary of this many suppressed lines first.
    summary: Option<u64>,
}

impl Bucket {
    fn new(per_second: u32, now: Instant) -> Bucket {
        Bucket {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            refilled: now,
            suppressed: 0,
            summarised: now,
        }
    }

    fn admit(&mut self, now: Instant) -> Admit {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        self.refilled = now;
        let line = self.tokens >= 1.0;
        if line {
            self.tokens -= 1.0;
        } else {
            self.suppressed += 1;
        }
        let due = now.saturating_duration_since(self.summarised) >= SUMMARY_EVERY;
        let summary = (due && self.suppressed > 0).then(|| {
            self.summarised = now;
            std::mem::take(&mut self.suppressed)
        });
        Admit { line, summary }
    }

    fn take(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

impl DecisionLog {
    /// A log of `mode`'s decisions, at most `per_second` lines a second.
    pub fn new(mode: DecisionLogMode, per_second: u32) -> Self {
        DecisionLog {
            mode,
            bucket: Mutex::new(Bucket::new(per_second.max(1), Instant::now())),
        }
    }

    fn wanted(&self, outcome: &Outcome<'_>) -> bool {
        match self.mode {
            DecisionLogMode::Off => false,
            DecisionLogMode::Denials => !matches!(outcome, Outcome::Allow { .. }),
            DecisionLogMode::All => true,
        }
    }

    /// Writes the line for `outcome` if the mode wants it and the bucket allows it; returns
    /// whether it did.
    pub fn record(&self, outcome: &Outcome<'_>, seen: Seen<'_>) -> bool {
        if !self.wanted(outcome) {
            return false;
        }
        let admit = self
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        if let Some(n) = admit.summary {
            summary(n);
        }
        if admit.line {
            self.write(outcome, seen);
        }
        admit.line
    }

    /// Writes the summary of lines suppressed since the last one, if any.
    pub fn flush(&self) {
        let n = self.bucket.lock().unwrap_or_else(|p| p.into_inner()).take();
        if n > 0 {
            summary(n);
        }
    }

    fn write(&self, outcome: &Outcome<'_>, seen: Seen<'_>) {
        let (route, kind, reason) = describe(outcome);
        let token = seen.view.and_then(|v| match v.token(seen.token_sources) {
            TokenLookup::Found { token, .. } => Some(tracing::field::display(TokenHash(token))),
            TokenLookup::Missing | TokenLookup::Malformed => None,
        });
        let caller = match outcome {
            Outcome::Allow { identity, .. }
            | Outcome::Audited {
                caller: Some(identity),
                ..
            } => Some(format!("{}/{}", identity.namespace, identity.name)),
            _ => None,
        };
        let error = match outcome {
            Outcome::Unavailable { error, .. } => Some(error.kind()),
            _ => None,
        };
        let latency_us = u64::try_from(seen.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::info!(
            target: DECISION_TARGET,
            front = seen.front,
            route,
            outcome = kind,
            reason,
            error,
            caller,
            token,
            latency_us,
            peer = seen.peer.map(tracing::field::display),
            method = seen.view.map(|v| v.method),
            host = seen.view.map(|v| v.host),
            path = seen.view.map(|v| v.path),
            "decision"
        );
    }
}

fn summary(suppressed: u64) {
    tracing::info!(
        target: DECISION_TARGET,
        suppressed,
        "decision log: {suppressed} line(s) suppressed by log.decisions_per_second since the last summary"
    );
}

/// Rate-limited logging of UNAVAILABLE answers: the first one is logged at once, then at most
/// one line per interval, with the number of UNAVAILABLE answers since the previous line and
/// the latest cause.
#[derive(Debug)]
pub struct OutageLog {
    every: Duration,
    state: Mutex<OutageState>,
}

#[derive(Debug, Default)]
struct OutageState {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl OutageLog {
    /// A log that writes at most one line per `every`.
    pub fn new(every: Duration) -> OutageLog {
        OutageLog {
            every,
            state: Mutex::new(OutageState::default()),
        }
    }

    /// Counts one UNAVAILABLE answer; returns how many it summarised if it logged a line.
    pub fn record(&self, route: &str, error: &ReviewError) -> Option<u64> {
        let now = Instant::now();
        let count = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.unlogged += 1;
            if st
                .last_logged
                .is_some_and(|t| now.duration_since(t) < self.every)
            {
                return None;
            }
            st.last_logged = Some(now);
            std::mem::take(&mut st.unlogged)
        };
        tracing::warn!(
            unavailable = count,
            route,
            kind = error.kind(),
            error = %Report(error),
            "TokenReview unavailable: {count} Check(s) answered UNAVAILABLE since the last summary (at most one summary per {:?})",
            self.every
        );
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn outages_are_summarised_once_per_interval() {
        let log = OutageLog::new(Duration::from_secs(10));
        let e = ReviewError::Timeout;
        assert_eq!(
            log.record("r", &e),
            Some(1),
            "the first one is logged at once"
        );
        for _ in 0..999 {
            assert_eq!(log.record("r", &e), None);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(log.record("r", &e), Some(1000));
        assert_eq!(log.record("r", &e), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_the_rate_and_summarises_the_rest() {
        let mut b = Bucket::new(5, Instant::now());
        let admitted = |b: &mut Bucket, n| (0..n).filter(|_| b.admit(Instant::now()).line).count();
        assert_eq!(admitted(&mut b, 8), 5, "a burst of per_second lines");
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(admitted(&mut b, 8), 2, "then per_second a second");
        assert_eq!(b.suppressed, 9);
        // The summary comes with the first line after SUMMARY_EVERY, counting all refused.
        tokio::time::advance(SUMMARY_EVERY).await;
        assert_eq!(
            b.admit(Instant::now()),
            Admit {
                line: true,
                summary: Some(9)
            }
        );
        assert_eq!(b.take(), 0);
        // Over 30 s at 1 line/s with 3+ offers a second: every refused line is summarised
        // once, periodically or by the final take.
        let mut b = Bucket::new(1, Instant::now());
        let (mut refused, mut summarised) = (0, 0);
        for _ in 0..100 {
            let a = b.admit(Instant::now());
            refused += u64::from(!a.line);
            summarised += a.summary.unwrap_or(0);
            tokio::time::advance(Duration::from_millis(300)).await;
        }
        assert!(summarised > 0 && refused > summarised);
        assert_eq!(summarised + b.take(), refused);
    }
}
