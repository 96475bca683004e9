//! One Check, start to finish: the only place that sequences the steps.
//!
//! request → route → token → cache (hit: done) → precheck → single-flight TokenReview →
//! policy → decision. Each step only returns a value; none calls another. The answer to "why
//! was this request denied?" is the [`Denial`] returned by exactly one of them.
//!
//! Precheck runs on cache misses only: a cache hit proves the token already passed precheck
//! and TokenReview for these audiences, and positive entries never outlive the token's `exp`,
//! so the hit path skips decoding the JWT. Junk tokens never reach the cache, so they cost one
//! keyed hash and one failed probe before precheck refuses them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tokio::time::Instant;

use crate::cache::{Cache, Freshness};
use crate::config::{Config, TokenSource};
use crate::decision::{self, Responder};
use crate::identity::{Denial, Identity, TokenHash};
use crate::metrics::{Metrics, Outcome};
use crate::policy;
use crate::precheck;
use crate::request::{RequestView, TokenLookup};
use crate::review::{ReviewError, Reviewer, Verdict};
use crate::route::{Route, Routes};

/// What the cache remembers about a token for a set of audiences.
pub type Remembered = Result<Arc<Identity>, Denial>;

/// The pipeline, built once from the configuration.
pub struct Checker {
    token_sources: Vec<TokenSource>,
    routes: Routes,
    cache: Arc<Cache<Remembered, ReviewError>>,
    reviewer: Arc<Reviewer>,
    responder: Responder,
    metrics: Arc<Metrics>,
}

/// How a Check ended, before it becomes a response.
enum Step<'r> {
    Allow {
        route: &'r Route,
        identity: Arc<Identity>,
        source: usize,
    },
    Deny {
        route: Option<&'r Route>,
        denial: Denial,
    },
    Unavailable {
        route: &'r Route,
        error: ReviewError,
    },
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Checker {
    /// Builds the pipeline around a connected reviewer.
    pub fn new(
        config: &Config,
        reviewer: Reviewer,
        metrics: Arc<Metrics>,
    ) -> Result<Checker, crate::Error> {
        let capacity = std::num::NonZeroUsize::new(config.cache.max_entries)
            .unwrap_or(std::num::NonZeroUsize::MIN);
        let cache = Cache::new(
            capacity,
            config.cache.ttl,
            config.cache.negative_ttl,
            metrics.cache_entries.clone(),
        )
        .map_err(|_| crate::Error::Random)?;
        Ok(Checker {
            token_sources: config.token_sources.clone(),
            routes: Routes::new(&config.routes),
            cache: Arc::new(cache),
            reviewer: Arc::new(reviewer),
            responder: Responder::new(&config.identity_headers, &config.token_sources),
            metrics,
        })
    }

    /// Answers one Check: a CheckResponse for every decision, or gRPC UNAVAILABLE when the API
    /// server cannot answer.
    pub async fn check(&self, req: &CheckRequest) -> Result<CheckResponse, tonic::Status> {
        let started = Instant::now();
        let step = self.decide(req).await;
        let answer = match step {
            Step::Allow {
                route,
                identity,
                source,
            } => {
                self.metrics.decision(Some(route.index), Outcome::Allow);
                tracing::debug!(route = %route.name, user = %identity.username, "allow");
                Ok(self.responder.allow(&identity, route, source))
            }
            Step::Deny { route, denial } => {
                self.metrics
                    .decision(route.map(|r| r.index), Outcome::Deny(denial));
                Ok(self.responder.deny(denial, route))
            }
            Step::Unavailable { route, error } => {
                self.metrics.decision(Some(route.index), Outcome::Error);
                tracing::warn!(route = %route.name, error = %error, "TokenReview unavailable; answering UNAVAILABLE");
                Err(decision::unavailable(&error))
            }
        };
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    async fn decide<'r>(&'r self, req: &CheckRequest) -> Step<'r> {
        let deny = |route, denial| Step::Deny { route, denial };
        let Some(view) = RequestView::new(req) else {
            return deny(None, Denial::BadRequest);
        };
        let Some(route) = self.routes.select(&view) else {
            tracing::debug!(host = view.host, path = view.path, "no route");
            return deny(None, Denial::NoRoute);
        };
        let (token, source) = match view.token(&self.token_sources) {
            TokenLookup::Found { token, source } => (token, source),
            TokenLookup::Missing => return deny(Some(route), Denial::MissingToken),
            TokenLookup::Malformed => return deny(Some(route), Denial::MalformedToken),
        };

        let key = self.cache.key(token, &route.audiences);
        let remembered = match self.cache.get(&key) {
            Some(r) => {
                self.metrics.cache_hits.inc();
                r
            }
            None => {
                self.metrics.cache_misses.inc();
                let now = unix_now();
                let claims = match precheck::precheck(token, &route.audiences, now) {
                    Ok(c) => c,
                    Err(denial) => {
                        tracing::debug!(route = %route.name, token = %TokenHash(token), reason = denial.code(), "precheck refused");
                        return deny(Some(route), denial);
                    }
                };
                // The review runs in its own task (see `cache`), so it owns its inputs.
                let loaded = self
                    .cache
                    .get_or_load(key, || {
                        let reviewer = Arc::clone(&self.reviewer);
                        let token = token.to_owned();
                        let audiences = route.audiences.clone();
                        async move {
                            let verdict = reviewer.review(&token, &audiences).await?;
                            Ok(match verdict {
                                Verdict::Authenticated(id) => {
                                    let cap = claims.exp.map(|exp| {
                                        std::time::Duration::from_secs((exp - now).max(0) as u64)
                                    });
                                    (Ok(Arc::new(id)), Freshness::Positive { cap })
                                }
                                Verdict::Rejected(denial) => (Err(denial), Freshness::Negative),
                            })
                        }
                    })
                    .await;
                match loaded {
                    Ok(r) => r,
                    Err(error) => return Step::Unavailable { route, error },
                }
            }
        };
        let identity = match remembered {
            Ok(id) => id,
            Err(denial) => {
                tracing::debug!(route = %route.name, token = %TokenHash(token), reason = denial.code(), "TokenReview refused");
                return deny(Some(route), denial);
            }
        };
        if !policy::permits(route.allow.as_ref(), &identity) {
            tracing::debug!(route = %route.name, user = %identity.username, "not on the allow-list");
            return deny(Some(route), Denial::NotAllowed);
        }
        Step::Allow {
            route,
            identity,
            source,
        }
    }
}
