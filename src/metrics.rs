//! Prometheus metrics (prometheus-client), beside the request path rather than in it.
//!
//! Decision counters are created once per route × outcome × reason at start-up and indexed by
//! position, so counting a decision is one atomic add: no label allocation or map lookup per
//! Check. Reason labels are the [`Denial`] codes, the same as the `x-tokengate-reason` header.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tokengate_decisions_total` | counter | `route`, `outcome` (`allow`/`deny`/`error`, and `would_deny` on `mode: audit` routes), `reason` |
//! | `tokengate_check_duration_seconds` | histogram | |
//! | `tokengate_cache_hits_total`, `tokengate_cache_misses_total` | counter | |
//! | `tokengate_cache_entries` | gauge | |
//! | `tokengate_tokenreview_duration_seconds` | histogram (per attempt) | |
//! | `tokengate_tokenreview_errors_total` | counter (per failed attempt) | `kind` |
//! | `tokengate_tokenreview_in_flight` | gauge | |
//! | `tokengate_tokenreview_queued` | gauge (reviews waiting for a slot: TokenReviews and SubjectAccessReviews share `kubernetes.max_in_flight`) | |
//! | `tokengate_tokenreview_shed_total` | counter (reviews not made or dropped) | `reason` (`queue_full`/`queue_timeout`/`abandoned`/`orphan_dropped`) |
//! | `tokengate_tokenreview_retries_total` | counter | `outcome` (`sent`/`budget_exhausted`/`retry_after_too_long`) |
//! | `tokengate_revocations_total` | counter (cached verdicts dropped) | `cause` (`service_account`/`pod`/`key`) |
//! | `tokengate_local_fallbacks_total` | counter (local verification asked TokenReview) | `reason` |
//! | `tokengate_watch_staleness_seconds` | gauge (time since the watches were last confirmed; -1 before the first list) | |
//! | `tokengate_watch_objects` | gauge | `kind` (`pod`/`service_account`) |
//! | `tokengate_jwks_age_seconds`, `tokengate_jwks_keys` | gauge (-1 / 0 before the first fetch) | |
//! | `tokengate_build_info` | gauge (always 1) | `version` |
//! | `tokengate_subjectaccessreview_duration_seconds` | histogram (per attempt) | |
//! | `tokengate_subjectaccessreview_errors_total` | counter (per failed attempt) | `kind` |
//! | `tokengate_subjectaccessreview_in_flight` | gauge | |
//! | `tokengate_subjectaccessreview_shed_total` | counter | `reason` (as `tokengate_tokenreview_shed_total`) |
//! | `tokengate_subjectaccessreview_retries_total` | counter | `outcome` (as `tokengate_tokenreview_retries_total`) |
//! | `tokengate_subjectaccessreviews_total` | counter (answers from the API server) | `allowed` (`true`/`false`) |
//! | `tokengate_rbac_cache_hits_total`, `tokengate_rbac_cache_misses_total` | counter | |
//! | `tokengate_rbac_cache_entries` | gauge | |
//! | `tokengate_config_last_reload_success` | gauge (1: the last reload, or the start, applied the file) | |
//! | `tokengate_config_last_reload_success_timestamp_seconds` | gauge (Unix time of the last successful reload or start) | |
//! | `tokengate_config_reloads_total` | counter | `result` (`success`/`failure`) |
//!
//! A reload can rename, add or remove routes: [`Metrics::route_counters`] builds the rows for
//! the new routes (a route keeps its series across reloads while its name stays), and each
//! configuration snapshot counts its Checks with its own [`RouteCounters`], so a Check decided
//! under the old routes is never counted against a new route at the same position.

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
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Pre-built counters for one route.
#[derive(Debug, Clone)]
struct DecisionRow {
    route: String,
    allow: Counter,
    deny: Vec<Counter>,
    error: Counter,
    /// `outcome="would_deny"`, created on the route's first audited denial (only
    /// `mode: audit` routes ever export it).
    would_deny: std::sync::OnceLock<Vec<Counter>>,
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
    /// Would have been denied for this reason, and passed (`mode: audit`).
    WouldDeny(Denial),
}

/// The decision counters of one set of routes, by route index (the last row: no route).
#[derive(Debug, Clone)]
pub struct RouteCounters {
    rows: Vec<DecisionRow>,
    decisions: Family<DecisionLabels, Counter>,
}

impl RouteCounters {
    /// Counts a decision; `route` is the route's index, `None` when no route matched.
    pub fn count(&self, route: Option<usize>, outcome: Counted) {
        let last = self.rows.len() - 1;
        let row = &self.rows[route.unwrap_or(last).min(last)];
        match outcome {
            Counted::Allow => row.allow.inc(),
            Counted::Deny(d) => row.deny[d.index()].inc(),
            Counted::Error => row.error.inc(),
            Counted::WouldDeny(d) => row.would_deny.get_or_init(|| {
                Denial::ALL
                    .iter()
                    .map(|d| {
                        self.decisions
                            .get_or_create(&DecisionLabels {
                                route: row.route.clone(),
                                outcome: "would_deny",
                                reason: d.code(),
                            })
                            .clone()
                    })
                    .collect()
            })[d.index()]
            .inc(),
        };
    }
}

/// Every metric tokengate exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
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
    /// 1 when the last reload (or the start) applied the file, 0 when it was refused.
    pub config_reload_success: Gauge,
    /// Unix time of the last successful reload (or of the start).
    pub config_reload_success_timestamp: Seconds,
    config_reloads: Family<ResultLabels, Counter>,
    /// SubjectAccessReviews and their cache (`allow.rbac`).
    pub rbac: RbacMetrics,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AllowedLabels {
    allowed: &'static str,
}

/// SubjectAccessReview metrics (`allow.rbac`).
#[derive(Debug)]
pub struct RbacMetrics {
    /// Latency of one SubjectAccessReview attempt (seconds).
    pub duration: Histogram,
    errors: Family<ErrorLabels, Counter>,
    /// SubjectAccessReviews in flight.
    pub in_flight: Gauge,
    shed: Family<ReasonLabels, Counter>,
    retries: Family<OutcomeLabels, Counter>,
    answers: Family<AllowedLabels, Counter>,
    /// Cache hits.
    pub cache_hits: Counter,
    /// Cache misses.
    pub cache_misses: Counter,
    /// Cache entries (allowed and denied).
    pub cache_entries: Gauge,
}

impl RbacMetrics {
    fn register(registry: &mut Registry) -> RbacMetrics {
        let m = RbacMetrics {
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            errors: Family::default(),
            in_flight: Gauge::default(),
            shed: Family::default(),
            retries: Family::default(),
            answers: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
        };
        registry.register(
            "tokengate_subjectaccessreview_duration_seconds",
            "Latency of one SubjectAccessReview attempt",
            m.duration.clone(),
        );
        registry.register(
            "tokengate_subjectaccessreview_errors",
            "Failed SubjectAccessReview attempts by kind",
            m.errors.clone(),
        );
        registry.register(
            "tokengate_subjectaccessreview_in_flight",
            "SubjectAccessReviews in flight",
            m.in_flight.clone(),
        );
        for reason in SHED_REASONS {
            drop(m.shed.get_or_create(&ReasonLabels { reason }));
        }
        registry.register(
            "tokengate_subjectaccessreview_shed",
            "SubjectAccessReviews not made or dropped (the reasons of tokengate_tokenreview_shed)",
            m.shed.clone(),
        );
        for outcome in RETRY_OUTCOMES {
            drop(m.retries.get_or_create(&OutcomeLabels { outcome }));
        }
        registry.register(
            "tokengate_subjectaccessreview_retries",
            "SubjectAccessReview retries (the outcomes of tokengate_tokenreview_retries)",
            m.retries.clone(),
        );
        for allowed in ["true", "false"] {
            drop(m.answers.get_or_create(&AllowedLabels { allowed }));
        }
        registry.register(
            "tokengate_subjectaccessreviews",
            "SubjectAccessReview answers from the API server",
            m.answers.clone(),
        );
        registry.register(
            "tokengate_rbac_cache_hits",
            "SubjectAccessReview cache hits",
            m.cache_hits.clone(),
        );
        registry.register(
            "tokengate_rbac_cache_misses",
            "SubjectAccessReview cache misses",
            m.cache_misses.clone(),
        );
        registry.register(
            "tokengate_rbac_cache_entries",
            "Entries in the SubjectAccessReview cache",
            m.cache_entries.clone(),
        );
        m
    }

    /// Counts a SubjectAccessReview answer.
    pub fn answer(&self, allowed: bool) {
        let allowed = if allowed { "true" } else { "false" };
        self.answers.get_or_create(&AllowedLabels { allowed }).inc();
    }
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
        // The start-up routes' series exist from the start, at 0 (each configuration snapshot
        // counts with its own `route_counters`).
        drop(route_counters(&decisions, routes));

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
            "Reviews (TokenReview and SubjectAccessReview) waiting for a slot (kubernetes.max_in_flight)",
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
        // --- config reload (issue 12 item 5; see `crate::reload`) ---
        let config_reload_success = Gauge::default();
        config_reload_success.set(1);
        registry.register(
            "tokengate_config_last_reload_success",
            "Whether the last configuration reload (or the start) applied the file",
            config_reload_success.clone(),
        );
        let config_reload_success_timestamp = Seconds::default();
        config_reload_success_timestamp.set(unix_now());
        registry.register(
            "tokengate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration reload (or of the start)",
            config_reload_success_timestamp.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        for result in ["success", "failure"] {
            drop(config_reloads.get_or_create(&ResultLabels { result }));
        }
        registry.register(
            "tokengate_config_reloads",
            "Configuration reloads by result",
            config_reloads.clone(),
        );
        // --- end config reload ---
        let rbac = RbacMetrics::register(&mut registry);
        Metrics {
            rbac,
            registry,
            decisions,
            config_reload_success,
            config_reload_success_timestamp,
            config_reloads,
            revocations,
            local_fallbacks,
            watch_staleness,
            watch_pods,
            watch_service_accounts,
            jwks_age,
            jwks_keys,
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

    /// The decision counters of these routes (names in configuration order), for a new
    /// configuration snapshot; series of routes that keep their name are shared.
    pub fn route_counters<'a>(&self, routes: impl IntoIterator<Item = &'a str>) -> RouteCounters {
        route_counters(&self.decisions, routes)
    }

    /// Records a configuration reload: the gauge, the timestamp on success, the counter.
    pub fn config_reloaded(&self, success: bool) {
        self.config_reload_success.set(i64::from(success));
        if success {
            self.config_reload_success_timestamp.set(unix_now());
        }
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: if success { "success" } else { "failure" },
            })
            .inc();
    }

    /// Counts a failed TokenReview attempt.
    pub fn review_error(&self, kind: &'static str) {
        self.review_errors
            .get_or_create(&ErrorLabels { kind })
            .inc();
    }

    /// Counts a failed attempt of a review API.
    pub fn api_error(&self, api: crate::review::Api, kind: &'static str) {
        match api {
            crate::review::Api::TokenReview => self.review_error(kind),
            crate::review::Api::SubjectAccessReview => {
                self.rbac.errors.get_or_create(&ErrorLabels { kind }).inc();
            }
        }
    }

    /// The in-flight gauge of a review API.
    pub fn in_flight(&self, api: crate::review::Api) -> &Gauge {
        match api {
            crate::review::Api::TokenReview => &self.review_in_flight,
            crate::review::Api::SubjectAccessReview => &self.rbac.in_flight,
        }
    }

    /// The per-attempt latency histogram of a review API.
    pub fn duration(&self, api: crate::review::Api) -> &Histogram {
        match api {
            crate::review::Api::TokenReview => &self.review_duration,
            crate::review::Api::SubjectAccessReview => &self.rbac.duration,
        }
    }

    /// Counts a review not made or dropped (a [`SHED_REASONS`] label).
    pub fn shed(&self, api: crate::review::Api, reason: &'static str) {
        let family = match api {
            crate::review::Api::TokenReview => &self.review_shed,
            crate::review::Api::SubjectAccessReview => &self.rbac.shed,
        };
        family.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a retry decision (a [`RETRY_OUTCOMES`] label).
    pub fn retry(&self, api: crate::review::Api, outcome: &'static str) {
        let family = match api {
            crate::review::Api::TokenReview => &self.review_retries,
            crate::review::Api::SubjectAccessReview => &self.rbac.retries,
        };
        family.get_or_create(&OutcomeLabels { outcome }).inc();
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

fn route_counters<'a>(
    decisions: &Family<DecisionLabels, Counter>,
    routes: impl IntoIterator<Item = &'a str>,
) -> RouteCounters {
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
            route: route.to_owned(),
            would_deny: std::sync::OnceLock::new(),
            allow: get("allow", ALLOW_REASON),
            deny: Denial::ALL.iter().map(|d| get("deny", d.code())).collect(),
            error: get("error", ERROR_REASON),
        }
    };
    let mut rows: Vec<DecisionRow> = routes.into_iter().map(row).collect();
    rows.push(row(NO_ROUTE_LABEL));
    RouteCounters {
        rows,
        decisions: decisions.clone(),
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_labelled() {
        let m = Metrics::new(["data-store"]);
        let c = m.route_counters(["data-store"]);
        c.count(Some(0), Counted::Allow);
        c.count(Some(0), Counted::Deny(Denial::NotAllowed));
        c.count(None, Counted::Deny(Denial::NoRoute));
        c.count(Some(0), Counted::Error);
        let text = m.encode();
        assert!(!text.contains("would_deny"), "{text}");
        c.count(Some(0), Counted::WouldDeny(Denial::PeerMismatch));
        let text = m.encode();
        assert!(text.contains(
            r#"tokengate_decisions_total{route="data-store",outcome="would_deny",reason="peer_mismatch"} 1"#
        ));
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
    fn route_counters_follow_names_not_positions() {
        let m = Metrics::new(["a", "b"]);
        let before = m.route_counters(["a", "b"]);
        // After a reload that removed `a`, `b` is at index 0 and keeps its series.
        let after = m.route_counters(["b"]);
        before.count(Some(1), Counted::Allow);
        after.count(Some(0), Counted::Allow);
        let text = m.encode();
        assert!(
            text.contains(r#"tokengate_decisions_total{route="b",outcome="allow",reason="ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tokengate_decisions_total{route="a",outcome="allow",reason="ok"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn reloads_are_recorded() {
        let m = Metrics::new(["r"]);
        assert!(m
            .encode()
            .contains("tokengate_config_last_reload_success 1\n"));
        m.config_reloaded(false);
        let text = m.encode();
        assert!(
            text.contains("tokengate_config_last_reload_success 0\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"tokengate_config_reloads_total{result="failure"} 1"#),
            "{text}"
        );
        m.config_reloaded(true);
        let text = m.encode();
        assert!(
            text.contains("tokengate_config_last_reload_success 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tokengate_config_last_reload_success_timestamp_seconds "),
            "{text}"
        );
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
