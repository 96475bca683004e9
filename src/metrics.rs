//! Prometheus metrics (prometheus-client), beside the request path rather than in it.
//!
//! Decision counters are created once per route × outcome × reason at start-up and indexed by
//! position, so counting a decision is one atomic add: no label allocation or map lookup per
//! Check. Reason labels are the [`Denial`] codes, the same as the `x-tokengate-reason` header.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tokengate_decisions_total` | counter | `route`, `outcome` (`allow`/`deny`/`error`), `reason` |
//! | `tokengate_check_duration_seconds` | histogram | |
//! | `tokengate_cache_hits_total`, `tokengate_cache_misses_total` | counter | |
//! | `tokengate_cache_entries` | gauge | |
//! | `tokengate_tokenreview_duration_seconds` | histogram (per attempt) | |
//! | `tokengate_tokenreview_errors_total` | counter (per failed attempt) | `kind` |
//! | `tokengate_tokenreview_in_flight` | gauge | |
//! | `tokengate_tokenreview_queued` | gauge (waiting for a slot) | |
//! | `tokengate_tokenreview_shed_total` | counter (reviews not made or dropped) | `reason` (`queue_full`/`queue_timeout`/`abandoned`/`orphan_dropped`) |
//! | `tokengate_tokenreview_retries_total` | counter | `outcome` (`sent`/`budget_exhausted`/`retry_after_too_long`) |
//! | `tokengate_revocations_total` | counter (cached verdicts dropped) | `cause` (`service_account`/`pod`/`key`) |
//! | `tokengate_local_fallbacks_total` | counter (local verification asked TokenReview) | `reason` |
//! | `tokengate_watch_staleness_seconds` | gauge (time since the watches were last confirmed; -1 before the first list) | |
//! | `tokengate_watch_objects` | gauge | `kind` (`pod`/`service_account`) |
//! | `tokengate_jwks_age_seconds`, `tokengate_jwks_keys` | gauge (-1 / 0 before the first fetch) | |
//! | `tokengate_build_info` | gauge (always 1) | `version` |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::denial::Denial;

/// Route label used when no route matched.
pub const NO_ROUTE_LABEL: &str = "none";
/// Reason label of allowed requests.
pub const ALLOW_REASON: &str = "ok";
/// Reason label of requests answered with gRPC UNAVAILABLE.
pub const ERROR_REASON: &str = "api_unavailable";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    route: String,
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// `reason` labels of `tokengate_tokenreview_shed_total`, exported at 0 from the start.
pub const SHED_REASONS: [&str; 4] = ["queue_full", "queue_timeout", "abandoned", "orphan_dropped"];
/// `outcome` labels of `tokengate_tokenreview_retries_total`, exported at 0 from the start.
pub const RETRY_OUTCOMES: [&str; 3] = ["sent", "budget_exhausted", "retry_after_too_long"];

/// A gauge of seconds.
pub type Seconds = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Pre-built counters for one route.
#[derive(Debug, Clone)]
struct DecisionRow {
    allow: Counter,
    deny: Vec<Counter>,
    error: Counter,
}

/// What happened to a Check, as counted (the `outcome` and `reason` labels of
/// `tokengate_decisions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Allowed.
    Allow,
    /// Denied for this reason.
    Deny(Denial),
    /// Answered with gRPC UNAVAILABLE.
    Error,
}

/// Every metric tokengate exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rows: Vec<DecisionRow>,
    /// Check latency (seconds).
    pub check_duration: Histogram,
    /// Cache hits.
    pub cache_hits: Counter,
    /// Cache misses.
    pub cache_misses: Counter,
    /// Cache entries.
    pub cache_entries: Gauge,
    /// Latency of one TokenReview attempt (seconds).
    pub review_duration: Histogram,
    review_errors: Family<ErrorLabels, Counter>,
    /// TokenReviews in flight.
    pub review_in_flight: Gauge,
    /// Reviews waiting for a slot.
    pub review_queued: Gauge,
    review_shed: Family<ReasonLabels, Counter>,
    review_retries: Family<OutcomeLabels, Counter>,
    revocations: Family<CauseLabels, Counter>,
    local_fallbacks: Family<ReasonLabels, Counter>,
    /// Time since the watches were last confirmed current (-1: never listed).
    pub watch_staleness: Seconds,
    /// Pods in the watch cache.
    pub watch_pods: Gauge,
    /// Service accounts in the watch cache.
    pub watch_service_accounts: Gauge,
    /// Age of the JWKS (-1: never fetched).
    pub jwks_age: Seconds,
    /// Keys in the JWKS.
    pub jwks_keys: Gauge,
}

impl Metrics {
    /// Registers all metrics; `routes` are the route names in configuration order.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a str>) -> Metrics {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "tokengate_decisions",
            "Check decisions by route, outcome and reason",
            decisions.clone(),
        );
        let row = |route: &str| {
            let get = |outcome: &'static str, reason: &'static str| {
                decisions
                    .get_or_create(&DecisionLabels {
                        route: route.to_owned(),
                        outcome,
                        reason,
                    })
                    .clone()
            };
            DecisionRow {
                allow: get("allow", ALLOW_REASON),
                deny: Denial::ALL.iter().map(|d| get("deny", d.code())).collect(),
                error: get("error", ERROR_REASON),
            }
        };
        let mut rows: Vec<DecisionRow> = routes.into_iter().map(row).collect();
        rows.push(row(NO_ROUTE_LABEL));

        let check_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "tokengate_check_duration_seconds",
            "Time to answer a Check",
            check_duration.clone(),
        );
        let cache_hits = Counter::default();
        registry.register("tokengate_cache_hits", "Cache hits", cache_hits.clone());
        let cache_misses = Counter::default();
        registry.register(
            "tokengate_cache_misses",
            "Cache misses",
            cache_misses.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "tokengate_cache_entries",
            "Entries in the TokenReview cache",
            cache_entries.clone(),
        );
        let review_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "tokengate_tokenreview_duration_seconds",
            "Latency of one TokenReview attempt",
            review_duration.clone(),
        );
        let review_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "tokengate_tokenreview_errors",
            "Failed TokenReview attempts by kind",
            review_errors.clone(),
        );
        let review_in_flight = Gauge::default();
        registry.register(
            "tokengate_tokenreview_in_flight",
            "TokenReviews in flight",
            review_in_flight.clone(),
        );
        let review_queued = Gauge::default();
        registry.register(
            "tokengate_tokenreview_queued",
            "TokenReviews waiting for a slot (kubernetes.max_in_flight)",
            review_queued.clone(),
        );
        let review_shed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tokengate_tokenreview_shed",
            "TokenReviews not made or dropped: queue full, no slot within kubernetes.timeout, every waiting Check cancelled, orphan giving its slot up",
            review_shed.clone(),
        );
        for reason in SHED_REASONS {
            drop(review_shed.get_or_create(&ReasonLabels { reason }));
        }
        let review_retries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "tokengate_tokenreview_retries",
            "TokenReview retries: sent, or not sent because the retry budget was spent or Retry-After was longer than kubernetes.timeout",
            review_retries.clone(),
        );
        for outcome in RETRY_OUTCOMES {
            drop(review_retries.get_or_create(&OutcomeLabels { outcome }));
        }
        let revocations = Family::<CauseLabels, Counter>::default();
        registry.register(
            "tokengate_revocations",
            "Cached verdicts dropped because their pod, service account or key went away",
            revocations.clone(),
        );
        for cause in crate::revocation::Cause::ALL {
            // Created up front so every cause is exported, at 0, from the start.
            drop(revocations.get_or_create(&CauseLabels {
                cause: cause.code(),
            }));
        }
        let local_fallbacks = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tokengate_local_fallbacks",
            "Tokens local verification could not judge and sent to TokenReview, by reason",
            local_fallbacks.clone(),
        );
        let watch_staleness = Seconds::default();
        watch_staleness.set(-1.0);
        registry.register(
            "tokengate_watch_staleness_seconds",
            "Time since the pod and service-account watches were last confirmed current (-1: not listed yet)",
            watch_staleness.clone(),
        );
        let watch_objects = Family::<KindLabels, Gauge>::default();
        registry.register(
            "tokengate_watch_objects",
            "Objects in the watch caches",
            watch_objects.clone(),
        );
        let watch_pods = watch_objects
            .get_or_create(&KindLabels { kind: "pod" })
            .clone();
        let watch_service_accounts = watch_objects
            .get_or_create(&KindLabels {
                kind: "service_account",
            })
            .clone();
        let jwks_age = Seconds::default();
        jwks_age.set(-1.0);
        registry.register(
            "tokengate_jwks_age_seconds",
            "Time since the issuer's JWKS was last fetched (-1: never)",
            jwks_age.clone(),
        );
        let jwks_keys = Gauge::default();
        registry.register(
            "tokengate_jwks_keys",
            "Verification keys in the JWKS",
            jwks_keys.clone(),
        );
        // --- build info (issue 12) ---
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "tokengate_build_info",
            "tokengate's version (always 1)",
            build_info,
        );
        // --- end build info ---
        Metrics {
            registry,
            revocations,
            local_fallbacks,
            watch_staleness,
            watch_pods,
            watch_service_accounts,
            jwks_age,
            jwks_keys,
            rows,
            check_duration,
            cache_hits,
            cache_misses,
            cache_entries,
            review_duration,
            review_errors,
            review_in_flight,
            review_queued,
            review_shed,
            review_retries,
        }
    }

    /// Counts a decision; `route` is the route's index, `None` when no route matched.
    pub fn decision(&self, route: Option<usize>, outcome: Counted) {
        let last = self.rows.len() - 1;
        let row = &self.rows[route.unwrap_or(last).min(last)];
        match outcome {
            Counted::Allow => row.allow.inc(),
            Counted::Deny(d) => row.deny[d.index()].inc(),
            Counted::Error => row.error.inc(),
        };
    }

    /// Counts a failed TokenReview attempt.
    pub fn review_error(&self, kind: &'static str) {
        self.review_errors
            .get_or_create(&ErrorLabels { kind })
            .inc();
    }

    /// Counts a TokenReview not made or dropped (a [`SHED_REASONS`] label).
    pub fn shed(&self, reason: &'static str) {
        self.review_shed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a retry decision (a [`RETRY_OUTCOMES`] label).
    pub fn retry(&self, outcome: &'static str) {
        self.review_retries
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts a cached verdict dropped by revocation.
    pub fn revocation(&self, cause: crate::revocation::Cause) {
        self.revocations
            .get_or_create(&CauseLabels {
                cause: cause.code(),
            })
            .inc();
    }

    /// Counts a token local verification sent to TokenReview.
    pub fn local_fallback(&self, reason: &'static str) {
        self.local_fallbacks
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_labelled() {
        let m = Metrics::new(["data-store"]);
        m.decision(Some(0), Counted::Allow);
        m.decision(Some(0), Counted::Deny(Denial::NotAllowed));
        m.decision(None, Counted::Deny(Denial::NoRoute));
        m.decision(Some(0), Counted::Error);
        let text = m.encode();
        assert!(text.contains(
            r#"tokengate_decisions_total{route="data-store",outcome="allow",reason="ok"} 1"#
        ));
        assert!(text.contains(
            r#"tokengate_decisions_total{route="data-store",outcome="deny",reason="not_allowed"} 1"#
        ));
        assert!(text.contains(
            r#"tokengate_decisions_total{route="none",outcome="deny",reason="no_route"} 1"#
        ));
        assert!(text.contains(
            r#"tokengate_decisions_total{route="data-store",outcome="error",reason="api_unavailable"} 1"#
        ));
    }

    #[test]
    fn build_info_carries_the_version() {
        let text = Metrics::new(["r"]).encode();
        let line = format!(
            r#"tokengate_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&line), "{text}");
    }
}
