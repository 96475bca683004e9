//! One Check, start to finish: the only place that sequences the steps.
//!
//! route → token → cache (hit: done) → precheck → single-flight TokenReview → policy. Each
//! step only returns a value; none calls another. The answer to "why was this request
//! denied?" is the [`Denial`] returned by exactly one of them. The sequencer reads a
//! [`RequestView`] and returns an [`Outcome`]; it never sees Envoy's protobufs (`server` reads
//! the CheckRequest, `decision` writes the CheckResponse), so it is unit-tested below with
//! plain values.
//!
//! Precheck runs on cache misses only: a cache hit proves the token already passed precheck
//! and verification for these audiences, and positive entries never outlive the token's `exp`,
//! so the hit path skips decoding the JWT. Junk tokens never reach the cache, so they cost one
//! keyed hash and one failed probe before precheck refuses them.
//!
//! With watches on, a hit is first put to [`Revocation::vouch`] (is the pod, service account
//! or signing key gone?), and a route with `verification: local` verifies misses itself
//! ([`verify`]) before, only for what it cannot judge, asking TokenReview.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::cache::{Cache, Freshness, Interest};
use crate::config::{Config, TokenSource, Verification};
use crate::denial::Denial;
use crate::error::{Error, Report};
use crate::identity::{Identity, TokenHash};
use crate::keys::KeySet;
use crate::metrics::{Counted, Metrics};
use crate::policy;
use crate::precheck;
use crate::request::{RequestView, TokenLookup};
use crate::review::{ReviewError, Reviewer, Verdict};
use crate::revocation::{Admitted, Revocation, Vouch};
use crate::route::{Route, Routes};
use crate::verify::{self, InvalidKind, LocalVerdict, Stale};
use crate::watch::Objects;

/// What the cache remembers about a token for a set of audiences.
pub type Remembered = Result<Arc<Admitted>, Denial>;

/// What watches provide: the object caches and the cluster's keys (both kept current by
/// their own tasks, see `lib.rs`), and the kids that left the JWKS.
pub struct Watched {
    /// Pods and service accounts.
    pub objects: Arc<Objects>,
    /// The issuer's verification keys.
    pub keys: KeySet,
    /// Kids removed from the JWKS since start.
    pub removed_kids: Arc<std::sync::Mutex<std::collections::HashSet<Box<str>>>>,
}

/// Local verification's inputs, cloned into each load task.
#[derive(Clone)]
struct Local {
    keys: KeySet,
    objects: Arc<Objects>,
    max_staleness: std::time::Duration,
}

/// The pipeline, built once from the configuration.
pub struct Checker {
    token_sources: Vec<TokenSource>,
    routes: Routes,
    cache: Arc<Cache<Remembered, ReviewError>>,
    reviewer: Arc<Reviewer>,
    revocation: Option<Revocation>,
    local: Option<Local>,
    metrics: Arc<Metrics>,
    /// The cluster's issuer, when configured (`kubernetes.issuer`): precheck refuses others.
    /// Without it, the issuer OIDC discovery reported is used once the keys are fetched.
    issuer: Option<String>,
}

/// How a Check ended: what [`crate::decision`] turns into Envoy's answer. Borrows the route
/// and token source from the [`Checker`].
#[derive(Debug)]
pub enum Outcome<'c> {
    /// Admitted: the identity goes upstream in headers.
    Allow {
        /// The route that matched.
        route: &'c Route,
        /// Who the caller is.
        identity: Arc<Identity>,
        /// Where the token was found (its header is removed when the route strips tokens).
        source: &'c TokenSource,
    },
    /// Refused, for this reason.
    Deny {
        /// The route, when one matched (it decides 401 vs 403 for invalid tokens).
        route: Option<&'c Route>,
        /// Why.
        denial: Denial,
    },
    /// The API server could not answer: gRPC UNAVAILABLE, so Envoy's `status_on_error` /
    /// `failure_mode_allow` decide.
    Unavailable {
        /// The route that matched.
        route: &'c Route,
        /// What went wrong (with its cause chain).
        error: ReviewError,
    },
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Checker {
    /// Builds the pipeline around a connected reviewer and, when `kubernetes.watch` is on, the
    /// watches.
    pub fn new(
        config: &Config,
        reviewer: Reviewer,
        watched: Option<Watched>,
        metrics: Arc<Metrics>,
    ) -> Result<Checker, Error> {
        let max_staleness = config.kubernetes.max_staleness;
        let revocation = watched
            .as_ref()
            .map(|w| Revocation::new(w.objects.clone(), w.removed_kids.clone(), max_staleness));
        let local = watched.map(|w| Local {
            keys: w.keys,
            objects: w.objects,
            max_staleness,
        });
        let cache = Cache::new(
            config.cache.max_entries,
            config.cache.negative_max_entries,
            config.cache.ttl,
            config.cache.negative_ttl,
            metrics.cache_entries.clone(),
        )
        .map_err(|_| Error::Random)?;
        Ok(Checker {
            token_sources: config.token_sources.clone(),
            routes: Routes::new(&config.routes),
            cache: Arc::new(cache),
            reviewer: Arc::new(reviewer),
            revocation,
            local,
            metrics,
            issuer: config.kubernetes.issuer.clone(),
        })
    }

    /// Decides one Check, and counts it.
    pub async fn check(&self, view: &RequestView<'_>) -> Outcome<'_> {
        let started = Instant::now();
        let outcome = self.decide(view).await;
        self.count(&outcome, started);
        outcome
    }

    /// The outcome for a CheckRequest without HTTP attributes (say, from Envoy's network
    /// ext_authz filter), counted like any other.
    pub fn unreadable(&self) -> Outcome<'_> {
        let outcome = Outcome::Deny {
            route: None,
            denial: Denial::BadRequest,
        };
        self.count(&outcome, Instant::now());
        outcome
    }

    fn count(&self, outcome: &Outcome<'_>, started: Instant) {
        match outcome {
            Outcome::Allow {
                route, identity, ..
            } => {
                self.metrics.decision(Some(route.index), Counted::Allow);
                tracing::debug!(route = %route.name, user = %identity.username, "allow");
            }
            Outcome::Deny { route, denial } => {
                self.metrics
                    .decision(route.map(|r| r.index), Counted::Deny(*denial));
            }
            Outcome::Unavailable { route, error } => {
                self.metrics.decision(Some(route.index), Counted::Error);
                // At debug: `server` logs one summary per interval during an outage.
                tracing::debug!(route = %route.name, error = %Report(error), "TokenReview unavailable; answering UNAVAILABLE");
            }
        }
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
    }

    async fn decide<'c>(&'c self, view: &RequestView<'_>) -> Outcome<'c> {
        let deny = |route, denial| Outcome::Deny { route, denial };
        let Some(route) = self.routes.select(view) else {
            tracing::debug!(host = view.host, path = view.path, "no route");
            return deny(None, Denial::NoRoute);
        };
        let (token, source) = match view.token(&self.token_sources) {
            TokenLookup::Found { token, source } => (token, source),
            TokenLookup::Missing => return deny(Some(route), Denial::MissingToken),
            TokenLookup::Malformed => return deny(Some(route), Denial::MalformedToken),
        };

        let key = self.cache.key(token, &route.audiences);
        let cached = self.cache.get(&key);
        let cached = match cached {
            Some(r) if !self.still_holds(&r, token) => {
                self.cache.remove(&key);
                None
            }
            other => other,
        };
        let remembered = match cached {
            Some(r) => {
                self.metrics.cache_hits.inc();
                r
            }
            None => {
                self.metrics.cache_misses.inc();
                let now = unix_now();
                // The configured issuer, else the one OIDC discovery reported (watches on).
                let keys = self.local.as_ref().and_then(|l| l.keys.snapshot());
                let expect = precheck::Expect {
                    issuer: self
                        .issuer
                        .as_deref()
                        .or_else(|| keys.as_deref().map(|k| k.issuer())),
                    ..precheck::Expect::default()
                };
                let claims = match precheck::precheck_with(token, &route.audiences, now, &expect) {
                    Ok(c) => c,
                    Err(denial) => {
                        tracing::debug!(route = %route.name, token = %TokenHash(token), reason = denial.code(), "precheck refused");
                        return deny(Some(route), denial);
                    }
                };
                let cap = claims
                    .exp
                    .map(|exp| std::time::Duration::from_secs((exp - now).max(0) as u64));
                let local = self
                    .local
                    .clone()
                    .filter(|_| route.verification == Verification::Local);
                // The load runs in its own task (see `cache`), so it owns its inputs.
                let load = |interest: Interest| {
                    let reviewer = Arc::clone(&self.reviewer);
                    let metrics = Arc::clone(&self.metrics);
                    let token = token.to_owned();
                    let audiences = route.audiences.clone();
                    let flow = view.source.to_owned();
                    let local = local.clone();
                    async move {
                        if let Some(local) = local {
                            if let Some(known) =
                                verify_locally(&local, &token, &audiences, &metrics).await?
                            {
                                return Ok(remember(known, cap));
                            }
                        }
                        let verdict = reviewer
                            .review(&token, &audiences, &flow, &interest)
                            .await?;
                        Ok(remember(
                            match verdict {
                                Verdict::Authenticated(id) => Ok(Arc::new(Admitted {
                                    identity: Arc::new(id),
                                    kid: verify::header_kid(&token).map(Into::into),
                                })),
                                Verdict::Rejected(denial) => Err(denial),
                            },
                            cap,
                        ))
                    }
                };
                let mut loaded = self.cache.get_or_load(key, load).await;
                // This Check joined a load in the instant its other waiters were cancelled and
                // it gave up: ours is still wanted, so load again (once).
                if matches!(loaded, Err(ReviewError::Abandoned)) {
                    loaded = self.cache.get_or_load(key, load).await;
                }
                match loaded {
                    Ok(r) => r,
                    Err(error) => return Outcome::Unavailable { route, error },
                }
            }
        };
        let identity = match remembered {
            Ok(admitted) => Arc::clone(&admitted.identity),
            Err(denial) => {
                tracing::debug!(route = %route.name, token = %TokenHash(token), reason = denial.code(), "TokenReview refused");
                return deny(Some(route), denial);
            }
        };
        if !policy::permits(route.allow.as_ref(), &identity) {
            tracing::debug!(route = %route.name, user = %identity.username, "not on the allow-list");
            return deny(Some(route), Denial::NotAllowed);
        }
        Outcome::Allow {
            route,
            identity,
            source,
        }
    }
}

impl Checker {
    /// A cached answer may be used: denials always, positive verdicts unless revocation says
    /// their object or key is gone (dropped from the cache, counted) or the watches are too
    /// stale to vouch (verified again).
    fn still_holds(&self, remembered: &Remembered, token: &str) -> bool {
        let (Some(revocation), Ok(admitted)) = (&self.revocation, remembered) else {
            return true;
        };
        match revocation.vouch(admitted) {
            Vouch::Holds => true,
            Vouch::Stale => false,
            Vouch::Revoked(cause) => {
                self.metrics.revocation(cause);
                tracing::info!(
                    token = %TokenHash(token),
                    user = %admitted.identity.username,
                    cause = cause.code(),
                    "cached verdict revoked"
                );
                false
            }
        }
    }
}

/// How a verdict is cached: admitted until the token's `exp` (`cap`) at most, refusals briefly.
fn remember(verdict: Remembered, cap: Option<std::time::Duration>) -> (Remembered, Freshness) {
    match verdict {
        Ok(admitted) => (Ok(admitted), Freshness::Positive { cap }),
        Err(denial) => (Err(denial), Freshness::Negative),
    }
}

/// Local verification of one token: `Some` verdict, `None` when it cannot judge the token
/// (TokenReview decides; counted by reason), or an error when keys or caches are too stale.
async fn verify_locally(
    local: &Local,
    token: &str,
    audiences: &[String],
    metrics: &Metrics,
) -> Result<Option<Remembered>, ReviewError> {
    let verdict = verify::verify_with_keys(
        token,
        audiences,
        &local.keys,
        local.objects.as_ref(),
        local.max_staleness,
    )
    .await;
    Ok(Some(match verdict {
        LocalVerdict::Valid(v) => Ok(Arc::new(Admitted {
            identity: Arc::new(v.identity),
            kid: Some(v.kid.into()),
        })),
        LocalVerdict::Invalid(invalid) => Err(match invalid.kind {
            InvalidKind::Malformed => Denial::MalformedToken,
            InvalidKind::TooLarge => Denial::TokenTooLarge,
            InvalidKind::WrongAudience => Denial::WrongAudience,
            InvalidKind::Expired => Denial::TokenExpired,
            InvalidKind::UnknownKey | InvalidKind::Rejected => Denial::TokenRejected,
        }),
        LocalVerdict::CannotJudge(why) => {
            metrics.local_fallback(why.code());
            tracing::debug!(token = %TokenHash(token), reason = why.code(), "local verification cannot judge; asking TokenReview");
            return Ok(None);
        }
        LocalVerdict::Stale(stale) => {
            return Err(ReviewError::Stale(match stale {
                Stale::NoKeys => "no keys fetched from the API server yet".to_owned(),
                Stale::Keys(age) => format!(
                    "keys last confirmed {}s ago (max_staleness {}s)",
                    age.as_secs(),
                    local.max_staleness.as_secs()
                ),
                Stale::Objects(age) => format!(
                    "watch caches last confirmed {}s ago (max_staleness {}s)",
                    age.as_secs(),
                    local.max_staleness.as_secs()
                ),
            }))
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    use super::*;

    /// A checker whose API server is a closed port: every TokenReview fails to connect.
    async fn checker(dir: &tempfile::TempDir, extra: &str) -> Checker {
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
             users: [{name: u, user: {token: reviewer}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\n",
        )
        .unwrap();
        let yaml = format!(
            "kubernetes: {{kubeconfig: '{}', retries: 0, timeout: 2s}}\n\
             token_sources:\n  - header: authorization\n    scheme: Bearer\n  - header: x-client-id\n\
             routes:\n  - name: api\n    match: {{path_prefix: /api}}\n    audiences: [api]\n{extra}",
            kubeconfig.display()
        );
        let config = Config::from_yaml_str(&yaml).unwrap();
        let metrics = Arc::new(Metrics::new(config.routes.iter().map(|r| r.name.as_str())));
        let reviewer = Reviewer::connect(&config.kubernetes, metrics.clone())
            .await
            .unwrap();
        Checker::new(&config, reviewer, None, metrics).unwrap()
    }

    fn jwt(exp: i64) -> String {
        // Shaped like a real one (issuer, RS256 signature length) so precheck passes it.
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(format!(
                r#"{{"aud":["api"],"exp":{exp},"iss":"https://kubernetes.default.svc"}}"#
            )),
            URL_SAFE_NO_PAD.encode([0u8; 256])
        )
    }

    fn denial(outcome: &Outcome<'_>) -> Option<Denial> {
        match outcome {
            Outcome::Deny { denial, .. } => Some(*denial),
            _ => None,
        }
    }

    fn identity(namespace: &str, name: &str) -> Identity {
        Identity {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            namespace: namespace.into(),
            name: name.into(),
            uid: None,
            groups: vec![],
            pod_name: None,
            pod_uid: None,
        }
    }

    fn admitted(identity: Identity) -> Arc<Admitted> {
        Arc::new(Admitted {
            identity: Arc::new(identity),
            kid: None,
        })
    }

    /// Puts a TokenReview answer in the cache, as a completed review would.
    async fn remember(c: &Checker, token: &str, answer: Remembered) {
        let key = c.cache.key(token, &["api".to_owned()]);
        let _ = c
            .cache
            .get_or_load(key, |_| async move {
                Ok((answer, Freshness::Positive { cap: None }))
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn refusals_before_any_token_review() {
        let dir = tempfile::tempdir().unwrap();
        let c = checker(&dir, "").await;
        let ext = HashMap::new();
        let view = |path, headers| RequestView::from_parts("h", path, "GET", &ext, headers);

        let o = c.check(&view("/other", &[])).await;
        assert_eq!(denial(&o), Some(Denial::NoRoute));
        assert!(matches!(o, Outcome::Deny { route: None, .. }));

        let o = c.check(&view("/api", &[])).await;
        assert_eq!(denial(&o), Some(Denial::MissingToken));
        let o = c.check(&view("/api", &[("Authorization", "Bearer")])).await;
        assert_eq!(denial(&o), Some(Denial::MalformedToken));
        let o = c
            .check(&view("/api", &[("x-client-id", "not-a-jwt")]))
            .await;
        assert_eq!(denial(&o), Some(Denial::MalformedToken));
        let expired = jwt(unix_now() - 3600);
        let header = format!("Bearer {expired}");
        let o = c
            .check(&view("/api", &[("authorization", header.as_str())]))
            .await;
        assert_eq!(denial(&o), Some(Denial::TokenExpired));

        assert_eq!(denial(&c.unreadable()), Some(Denial::BadRequest));
    }

    #[tokio::test]
    async fn unreachable_api_server_is_unavailable_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let c = checker(&dir, "").await;
        let ext = HashMap::new();
        let token = jwt(unix_now() + 3600);
        let headers = [("x-client-id", token.as_str())];
        let o = c
            .check(&RequestView::from_parts("h", "/api", "GET", &ext, &headers))
            .await;
        let Outcome::Unavailable { route, error } = o else {
            panic!("expected Unavailable, got {o:?}");
        };
        assert_eq!(route.name, "api");
        assert_eq!(error.kind(), "connect");
        assert!(std::error::Error::source(&error).is_some(), "{error:?}");
    }

    #[tokio::test]
    async fn remembered_answers_allow_or_deny_with_the_token_source() {
        let dir = tempfile::tempdir().unwrap();
        let c = checker(&dir, "    allow: {service_accounts: [default/api]}\n").await;
        let ext = HashMap::new();
        let (good, other, rejected) = (
            jwt(unix_now() + 3600),
            jwt(unix_now() + 3601),
            jwt(unix_now() + 3602),
        );
        remember(&c, &good, Ok(admitted(identity("default", "api")))).await;
        remember(&c, &other, Ok(admitted(identity("default", "web")))).await;
        remember(&c, &rejected, Err(Denial::TokenRejected)).await;

        let headers = [("x-client-id", good.as_str())];
        let o = c
            .check(&RequestView::from_parts(
                "h", "/api/x", "GET", &ext, &headers,
            ))
            .await;
        let Outcome::Allow {
            route,
            identity,
            source,
        } = o
        else {
            panic!("expected Allow, got {o:?}");
        };
        assert_eq!(route.name, "api");
        assert_eq!(identity.name, "api");
        assert_eq!(source.header, "x-client-id");

        let headers = [("x-client-id", other.as_str())];
        let o = c
            .check(&RequestView::from_parts("h", "/api", "GET", &ext, &headers))
            .await;
        assert_eq!(denial(&o), Some(Denial::NotAllowed));

        let headers = [("x-client-id", rejected.as_str())];
        let o = c
            .check(&RequestView::from_parts("h", "/api", "GET", &ext, &headers))
            .await;
        assert_eq!(denial(&o), Some(Denial::TokenRejected));
    }
}
