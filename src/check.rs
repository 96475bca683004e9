//! One Check, start to finish: the only place that sequences the steps.
//!
//! route → token → cache (hit: done) → precheck → single-flight TokenReview → policy → rbac
//! (a cached SubjectAccessReview, for routes with `allow.rbac`; on a hit, usually the answer
//! remembered in the verdict's own entry). Each
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
//! A route with `require_peer` refuses a Check without an mTLS peer before the cache, and one
//! whose peer is not the token's service account after the allow-list ([`crate::peer`]). On
//! a `mode: audit` route a denial becomes [`Outcome::Audited`]: counted and logged as the
//! would-be decision, and answered as a pass without identity.
//!
//! With watches on, a hit is first put to [`Revocation::vouch`] (is the pod, service account
//! or signing key gone?), and a route with `verification: local` verifies misses itself
//! ([`verify`]) before, only for what it cannot judge, asking TokenReview.
//!
//! What a configuration reload may change (routes, token sources, cache settings, identity
//! header names) is one [`Snapshot`], swapped whole ([`Checker::reconfigure`]); a Check reads
//! one snapshot from start to finish, so it never sees half of a reload. A reload that
//! changes the routes or the cache settings gets a new, empty cache: a verdict remembered
//! under the old routes is never used, nor stored, under the new ones (a load still in flight
//! fills the old cache, which goes away with the last Check holding it).
//!
//! The steps run in `cache`, `precheck`, `verify` and `review` spans under the `check` span
//! that [`Checker::check_traced`] opens for the front doors (exported as OpenTelemetry traces
//! when tracing is on, see [`crate::telemetry`]).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument as _;

use arc_swap::ArcSwap;

use crate::cache::{Cache, Freshness, Interest};
use crate::config::{Config, Mode, TokenSource, Verification};
use crate::decision::Responder;
use crate::denial::Denial;
use crate::error::{Error, Report};
use crate::identity::{Identity, TokenHash};
use crate::keys::KeySet;
use crate::metrics::{Counted, Metrics, RouteCounters};
use crate::policy;
use crate::precheck;
use crate::rbac::Authorizer;
use crate::request::{RequestView, TokenLookup};
use crate::review::{ReviewError, Reviewer, Verdict};
use crate::revocation::{Admitted, Revocation, Vouch};
use crate::route::{Route, Routes};
use crate::telemetry::{self, Carrier, SPAN_TARGET};
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

/// The remembered verdicts.
type VerdictCache = Cache<Remembered, ReviewError>;

/// The pipeline. Its connection to the API server and its watches are built once; the
/// [`Snapshot`] of what a reload may change is swapped whole by [`Checker::reconfigure`].
pub struct Checker {
    live: ArcSwap<Snapshot>,
    reviewer: Arc<Reviewer>,
    revocation: Option<Revocation>,
    local: Option<Local>,
    metrics: Arc<Metrics>,
    /// The cluster's issuer, when configured (`kubernetes.issuer`): precheck refuses others.
    /// Without it, the issuer OIDC discovery reported is used once the keys are fetched.
    issuer: Option<String>,
}

/// The part of the configuration a reload replaces, compiled: what one Check reads, from its
/// route to its answer's header names.
pub struct Snapshot {
    token_sources: Vec<TokenSource>,
    routes: Routes,
    cache: Arc<VerdictCache>,
    /// SubjectAccessReviews (and their cache) for routes with `allow.rbac`.
    authorizer: Arc<Authorizer>,
    responder: Responder,
    counters: RouteCounters,
    /// The configuration it was built from (to tell what the next reload changes).
    config: Config,
}

impl Snapshot {
    /// Writes the answers of Checks decided under this snapshot (its identity header names).
    pub fn responder(&self) -> &Responder {
        &self.responder
    }

    /// Where tokens are looked for under this snapshot.
    pub fn token_sources(&self) -> &[TokenSource] {
        &self.token_sources
    }

    /// The configuration this snapshot was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Entries in its verdict cache (positive and negative).
    pub fn cached_verdicts(&self) -> usize {
        self.cache.len() + self.cache.negative_len()
    }
}

/// What [`Checker::reconfigure`] did with the verdict cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheFate {
    /// Kept: neither the routes nor the cache settings changed.
    Kept,
    /// Replaced by an empty cache with the new settings.
    Emptied,
}

/// How a Check ended: what [`crate::decision`] turns into Envoy's answer. Borrows the route
/// and token source from the [`Snapshot`] it was decided under.
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
    /// A `mode: audit` route would have denied: the request passes, without identity.
    Audited {
        /// The route that matched.
        route: &'c Route,
        /// What enforcing would have answered.
        denial: Denial,
        /// Where the token was found, if anywhere (its header is removed when the route
        /// strips tokens).
        source: Option<&'c TokenSource>,
        /// The verified caller, when the denial came after verification (for the decision log).
        caller: Option<Arc<Identity>>,
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
        let cache = new_cache(config, &metrics)?;
        let reviewer = Arc::new(reviewer);
        let authorizer = new_authorizer(config, &reviewer, &metrics)?;
        let live = ArcSwap::from_pointee(snapshot(config, cache, authorizer, &metrics));
        Ok(Checker {
            live,
            reviewer,
            revocation,
            local,
            metrics,
            issuer: config.kubernetes.issuer.clone(),
        })
    }

    /// The current configuration snapshot: hold it for one Check, from [`Checker::check`] to
    /// writing the answer with its [`Snapshot::responder`].
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// Replaces the snapshot with one built from `config` (a reload; the caller has checked
    /// that nothing outside the snapshot changed). The verdict cache is kept unless the routes
    /// or the cache settings changed. Checks already running finish under the old snapshot.
    pub fn reconfigure(&self, config: &Config) -> Result<CacheFate, Error> {
        let old = self.live.load();
        // `Debug` compares every field, including ones added later, without asking each
        // section type for `PartialEq`; the output is deterministic (no hash maps).
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        let (cache, authorizer, fate) =
            if same(&old.config.routes, &config.routes) && same(&old.config.cache, &config.cache) {
                (
                    Arc::clone(&old.cache),
                    Arc::clone(&old.authorizer),
                    CacheFate::Kept,
                )
            } else {
                (
                    new_cache(config, &self.metrics)?,
                    new_authorizer(config, &self.reviewer, &self.metrics)?,
                    CacheFate::Emptied,
                )
            };
        self.live
            .store(Arc::new(snapshot(config, cache, authorizer, &self.metrics)));
        if fate == CacheFate::Emptied {
            // The gauge follows the new cache from its first insert; until then it is empty.
            self.metrics.cache_entries.set(0);
        }
        Ok(fate)
    }

    /// Decides one Check under `snapshot` (see [`Checker::snapshot`]), and counts it.
    pub async fn check<'s>(&self, snapshot: &'s Snapshot, view: &RequestView<'_>) -> Outcome<'s> {
        let started = Instant::now();
        let mut caller = None;
        let outcome = self.decide(snapshot, view, &mut caller).await;
        let outcome = match outcome {
            Outcome::Deny {
                route: Some(route),
                denial,
            } if route.mode == Mode::Audit => Self::audited(snapshot, view, route, denial, caller),
            other => other,
        };
        self.count(snapshot, &outcome, started);
        outcome
    }

    /// A front door's Check: [`Checker::check`] in a `check` span whose parent is the first
    /// trace context found in `call` (the call's own headers or metadata), then in the checked
    /// request's headers, the outcome recorded on the span; or [`Checker::unreadable`] when the
    /// front door could not read a request (`view` is `None`).
    pub async fn check_traced<'s>(
        &self,
        snapshot: &'s Snapshot,
        view: Option<&RequestView<'_>>,
        call: &(dyn Carrier + Sync),
    ) -> Outcome<'s> {
        let Some(view) = view else {
            return self.unreadable(snapshot);
        };
        let span = telemetry::check_span(&[call, view]);
        let outcome = self.check(snapshot, view).instrument(span.clone()).await;
        telemetry::record(&span, &outcome);
        outcome
    }

    /// A denial on a `mode: audit` route: logged (the decision log of audit mode) and turned
    /// into a pass without identity.
    fn audited<'s>(
        snapshot: &'s Snapshot,
        view: &RequestView<'_>,
        route: &'s Route,
        denial: Denial,
        caller: Option<Arc<Identity>>,
    ) -> Outcome<'s> {
        let source = match view.token(&snapshot.token_sources) {
            TokenLookup::Found { source, .. } => Some(source),
            _ => None,
        };
        // Logged by the front door's decision log (`outcome=would_deny`), like every decision.
        Outcome::Audited {
            route,
            denial,
            source,
            caller,
        }
    }

    /// The outcome for a CheckRequest without HTTP attributes (say, from Envoy's network
    /// ext_authz filter), counted like any other.
    pub fn unreadable<'s>(&self, snapshot: &'s Snapshot) -> Outcome<'s> {
        let outcome = Outcome::Deny {
            route: None,
            denial: Denial::BadRequest,
        };
        self.count(snapshot, &outcome, Instant::now());
        outcome
    }

    fn count(&self, snapshot: &Snapshot, outcome: &Outcome<'_>, started: Instant) {
        let counters = &snapshot.counters;
        match outcome {
            Outcome::Allow {
                route, identity, ..
            } => {
                counters.count(Some(route.index), Counted::Allow);
                tracing::debug!(route = %route.name, user = %identity.username, "allow");
            }
            Outcome::Deny { route, denial } => {
                counters.count(route.map(|r| r.index), Counted::Deny(*denial));
            }
            Outcome::Audited { route, denial, .. } => {
                counters.count(Some(route.index), Counted::WouldDeny(*denial));
            }
            Outcome::Unavailable { route, error } => {
                counters.count(Some(route.index), Counted::Error);
                // At debug: `server` logs one summary per interval during an outage.
                tracing::debug!(route = %route.name, error = %Report(error), "TokenReview unavailable; answering UNAVAILABLE");
            }
        }
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Decides; `caller` receives the verified identity on `mode: audit` routes (for the
    /// audit log of a denial after verification).
    async fn decide<'s>(
        &self,
        snapshot: &'s Snapshot,
        view: &RequestView<'_>,
        caller: &mut Option<Arc<Identity>>,
    ) -> Outcome<'s> {
        let deny = |route, denial| Outcome::Deny { route, denial };
        let Some(route) = snapshot.routes.select(view) else {
            tracing::debug!(host = view.host, path = view.path, "no route");
            return deny(None, Denial::NoRoute);
        };
        let (token, source) = match view.token(&snapshot.token_sources) {
            TokenLookup::Found { token, source } => (token, source),
            TokenLookup::Missing => return deny(Some(route), Denial::MissingToken),
            TokenLookup::Malformed => return deny(Some(route), Denial::MalformedToken),
        };
        // Without the required peer no token can pass: refuse before spending a TokenReview.
        let peer = match route
            .require_peer
            .as_ref()
            .map(|b| b.peer(view.source_principal))
        {
            None => None,
            Some(Ok(peer)) => Some(peer),
            Some(Err(denial)) => return deny(Some(route), denial),
        };

        let cache = &snapshot.cache;
        let key = cache.key(token, &route.audiences);
        let cached = {
            let span = tracing::debug_span!(target: SPAN_TARGET, "cache", hit = Empty).entered();
            let cached = match cache.get(&key) {
                Some(r) if !self.still_holds(&r, token) => {
                    cache.remove(&key);
                    None
                }
                other => other,
            };
            span.record("hit", cached.is_some());
            cached
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
                let claims = match tracing::debug_span!(target: SPAN_TARGET, "precheck")
                    .in_scope(|| precheck::precheck_with(token, &route.audiences, now, &expect))
                {
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
                    // The load runs in another task: its spans hang under this Check's.
                    let check_span = tracing::Span::current();
                    async move {
                        if let Some(local) = local {
                            if let Some(known) =
                                verify_locally(&local, &token, &audiences, &metrics)
                                    .instrument(tracing::debug_span!(target: SPAN_TARGET, "verify"))
                                    .await?
                            {
                                return Ok(remember(known, cap));
                            }
                        }
                        let verdict = reviewer
                            .review(&token, &audiences, &flow, &interest)
                            .instrument(tracing::debug_span!(target: SPAN_TARGET, "review"))
                            .await?;
                        Ok(remember(
                            match verdict {
                                Verdict::Authenticated(id) => Ok(Arc::new(Admitted::new(
                                    Arc::new(id),
                                    verify::header_kid(&token).map(Into::into),
                                ))),
                                Verdict::Rejected(denial) => Err(denial),
                            },
                            cap,
                        ))
                    }
                    .instrument(check_span)
                };
                let mut loaded = cache.get_or_load(key, load).await;
                // This Check joined a load in the instant its other waiters were cancelled and
                // it gave up: ours is still wanted, so load again (once).
                if matches!(loaded, Err(ReviewError::Abandoned)) {
                    loaded = cache.get_or_load(key, load).await;
                }
                match loaded {
                    Ok(r) => r,
                    Err(error) => return Outcome::Unavailable { route, error },
                }
            }
        };
        let admitted = match remembered {
            Ok(admitted) => admitted,
            Err(denial) => {
                tracing::debug!(route = %route.name, token = %TokenHash(token), reason = denial.code(), "TokenReview refused");
                return deny(Some(route), denial);
            }
        };
        let identity = Arc::clone(&admitted.identity);
        if route.mode == Mode::Audit {
            *caller = Some(Arc::clone(&identity));
        }
        if !policy::permits(route.allow.as_ref(), &identity) {
            tracing::debug!(route = %route.name, user = %identity.username, "not on the allow-list");
            return deny(Some(route), Denial::NotAllowed);
        }
        if peer.is_some_and(|p| !p.is(&identity)) {
            tracing::debug!(route = %route.name, user = %identity.username, peer = view.source_principal, "token presented by another workload");
            return deny(Some(route), Denial::PeerMismatch);
        }
        // allow.rbac: after the static lists, a SubjectAccessReview must also allow.
        if let Some(rule) = route.allow.as_ref().and_then(|a| a.rbac.as_ref()) {
            match snapshot
                .authorizer
                .allows(
                    rule,
                    route.index,
                    &admitted,
                    view.method,
                    view.path,
                    view.source,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(route = %route.name, user = %identity.username, "RBAC denied");
                    return deny(Some(route), Denial::RbacDenied);
                }
                Err(error) => return Outcome::Unavailable { route, error },
            }
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
        match revocation.vouch(admitted, unix_now()) {
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

/// An empty verdict cache with the configured sizes and TTLs.
fn new_cache(config: &Config, metrics: &Metrics) -> Result<Arc<VerdictCache>, Error> {
    let cache = Cache::new(
        config.cache.max_entries,
        config.cache.negative_max_entries,
        config.cache.ttl,
        config.cache.negative_ttl,
        metrics.cache_entries.clone(),
    )
    .map_err(|_| Error::Random)?;
    Ok(Arc::new(cache))
}

/// The SubjectAccessReview client and its answer cache, with `config`'s cache settings.
fn new_authorizer(
    config: &Config,
    reviewer: &Arc<Reviewer>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<Authorizer>, Error> {
    let authorizer = Authorizer::new(Arc::clone(reviewer), config.cache.rbac, Arc::clone(metrics))
        .map_err(|_| Error::Random)?;
    Ok(Arc::new(authorizer))
}

/// The snapshot of `config` around `cache` and `authorizer`.
fn snapshot(
    config: &Config,
    cache: Arc<VerdictCache>,
    authorizer: Arc<Authorizer>,
    metrics: &Metrics,
) -> Snapshot {
    Snapshot {
        token_sources: config.token_sources.clone(),
        routes: Routes::new(&config.routes),
        cache,
        authorizer,
        responder: Responder::new(&config.identity_headers),
        counters: metrics.route_counters(config.routes.iter().map(|r| r.name.as_str())),
        config: config.clone(),
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
        LocalVerdict::Valid(v) => Ok(Arc::new(Admitted::new(
            Arc::new(v.identity),
            Some(v.kid.into()),
        ))),
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
        let config = config(dir, extra);
        let metrics = Arc::new(Metrics::new(config.routes.iter().map(|r| r.name.as_str())));
        let reviewer = Reviewer::connect(&config.kubernetes, metrics.clone())
            .await
            .unwrap();
        Checker::new(&config, reviewer, None, metrics).unwrap()
    }

    /// The configuration of [`checker`], with `extra` appended to its one route.
    fn config(dir: &tempfile::TempDir, extra: &str) -> Config {
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
        Config::from_yaml_str(&yaml).unwrap()
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
            extra: Default::default(),
        }
    }

    fn admitted(identity: Identity) -> Arc<Admitted> {
        Arc::new(Admitted::new(Arc::new(identity), None))
    }

    /// Puts a TokenReview answer in the cache, as a completed review would.
    async fn remember(c: &Checker, token: &str, answer: Remembered) {
        let cache = Arc::clone(&c.snapshot().cache);
        let key = cache.key(token, &["api".to_owned()]);
        let _ = cache
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
        let s = c.snapshot();
        let ext = HashMap::new();
        let view = |path, headers| RequestView::from_parts("h", path, "GET", &ext, headers);

        let o = c.check(&s, &view("/other", &[])).await;
        assert_eq!(denial(&o), Some(Denial::NoRoute));
        assert!(matches!(o, Outcome::Deny { route: None, .. }));

        let o = c.check(&s, &view("/api", &[])).await;
        assert_eq!(denial(&o), Some(Denial::MissingToken));
        let o = c
            .check(&s, &view("/api", &[("Authorization", "Bearer")]))
            .await;
        assert_eq!(denial(&o), Some(Denial::MalformedToken));
        let o = c
            .check(&s, &view("/api", &[("x-client-id", "not-a-jwt")]))
            .await;
        assert_eq!(denial(&o), Some(Denial::MalformedToken));
        let expired = jwt(unix_now() - 3600);
        let header = format!("Bearer {expired}");
        let o = c
            .check(&s, &view("/api", &[("authorization", header.as_str())]))
            .await;
        assert_eq!(denial(&o), Some(Denial::TokenExpired));

        assert_eq!(denial(&c.unreadable(&s)), Some(Denial::BadRequest));
    }

    #[tokio::test]
    async fn unreachable_api_server_is_unavailable_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let c = checker(&dir, "").await;
        let s = c.snapshot();
        let ext = HashMap::new();
        let token = jwt(unix_now() + 3600);
        let headers = [("x-client-id", token.as_str())];
        let o = c
            .check(
                &s,
                &RequestView::from_parts("h", "/api", "GET", &ext, &headers),
            )
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
        let s = c.snapshot();
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
            .check(
                &s,
                &RequestView::from_parts("h", "/api/x", "GET", &ext, &headers),
            )
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
            .check(
                &s,
                &RequestView::from_parts("h", "/api", "GET", &ext, &headers),
            )
            .await;
        assert_eq!(denial(&o), Some(Denial::NotAllowed));

        let headers = [("x-client-id", rejected.as_str())];
        let o = c
            .check(
                &s,
                &RequestView::from_parts("h", "/api", "GET", &ext, &headers),
            )
            .await;
        assert_eq!(denial(&o), Some(Denial::TokenRejected));
    }

    #[tokio::test]
    async fn a_reload_swaps_the_snapshot_and_empties_the_cache_when_routes_change() {
        let dir = tempfile::tempdir().unwrap();
        let c = checker(&dir, "    allow: {service_accounts: [default/api]}\n").await;
        let ext = HashMap::new();
        let token = jwt(unix_now() + 3600);
        remember(&c, &token, Ok(admitted(identity("default", "api")))).await;
        let headers = [("x-client-id", token.as_str())];
        let view = RequestView::from_parts("h", "/api", "GET", &ext, &headers);
        let before = c.snapshot();
        assert!(matches!(
            c.check(&before, &view).await,
            Outcome::Allow { .. }
        ));

        // Same routes and cache settings, another header name: the verdicts stay.
        let mut same_routes = config(&dir, "    allow: {service_accounts: [default/api]}\n");
        same_routes.identity_headers.user = "x-user".into();
        assert_eq!(c.reconfigure(&same_routes).unwrap(), CacheFate::Kept);
        let kept = c.snapshot();
        assert_eq!(kept.cached_verdicts(), 1);
        assert!(matches!(c.check(&kept, &view).await, Outcome::Allow { .. }));

        // The caller leaves the allow-list: a new, empty cache, and the decision changes.
        let narrower = config(&dir, "    allow: {service_accounts: [default/web]}\n");
        assert_eq!(c.reconfigure(&narrower).unwrap(), CacheFate::Emptied);
        let after = c.snapshot();
        assert_eq!(after.cached_verdicts(), 0);
        remember(&c, &token, Ok(admitted(identity("default", "api")))).await;
        assert_eq!(
            denial(&c.check(&after, &view).await),
            Some(Denial::NotAllowed)
        );
        // A Check that began before the reload finishes under the snapshot it started with.
        assert!(matches!(
            c.check(&before, &view).await,
            Outcome::Allow { .. }
        ));
    }

    #[tokio::test]
    async fn require_peer_binds_the_token_to_its_workload() {
        let dir = tempfile::tempdir().unwrap();
        let c = checker(&dir, "    require_peer: service_account\n").await;
        let snap = c.snapshot();
        let ext = HashMap::new();
        let token = jwt(unix_now() + 3600);
        remember(&c, &token, Ok(admitted(identity("default", "api")))).await;
        let headers = [("x-client-id", token.as_str())];
        let view = RequestView::from_parts("h", "/api", "GET", &ext, &headers);
        let o = c.check(&snap, &view).await;
        assert_eq!(denial(&o), Some(Denial::PeerMissing));
        let o = c
            .check(
                &snap,
                &view.with_source_principal("spiffe://td/ns/default/sa/web"),
            )
            .await;
        assert_eq!(denial(&o), Some(Denial::PeerMismatch));
        let o = c
            .check(
                &snap,
                &view.with_source_principal("spiffe://td/ns/default/sa/api/x"),
            )
            .await;
        assert_eq!(denial(&o), Some(Denial::PeerMismatch));
        let o = c
            .check(
                &snap,
                &view.with_source_principal("spiffe://td/ns/default/sa/api"),
            )
            .await;
        assert!(matches!(o, Outcome::Allow { .. }), "{o:?}");
        // Missing peer is decided before the token: no TokenReview for an unverifiable token.
        let junk = [("x-client-id", "not-a-jwt")];
        let o = c
            .check(
                &snap,
                &RequestView::from_parts("h", "/api", "GET", &ext, &junk),
            )
            .await;
        assert_eq!(denial(&o), Some(Denial::PeerMissing));
    }

    #[tokio::test]
    async fn audit_mode_passes_denials_but_not_outages() {
        let dir = tempfile::tempdir().unwrap();
        let c = checker(
            &dir,
            "    mode: audit\n    allow: {service_accounts: [default/api]}\n",
        )
        .await;
        let snap = c.snapshot();
        let ext = HashMap::new();
        let (good, other) = (jwt(unix_now() + 3600), jwt(unix_now() + 3601));
        remember(&c, &good, Ok(admitted(identity("default", "api")))).await;
        remember(&c, &other, Ok(admitted(identity("default", "web")))).await;
        let check = |headers: &'static [(&'static str, &'static str)]| {
            let ext = &ext;
            let c = &c;
            let snap = &snap;
            async move {
                c.check(
                    snap,
                    &RequestView::from_parts("h", "/api", "GET", ext, headers),
                )
                .await
            }
        };
        let o = check(&[]).await;
        assert!(
            matches!(
                o,
                Outcome::Audited {
                    denial: Denial::MissingToken,
                    source: None,
                    ..
                }
            ),
            "{o:?}"
        );
        let headers = [("x-client-id", other.as_str())];
        let o = c
            .check(
                &snap,
                &RequestView::from_parts("h", "/api", "GET", &ext, &headers),
            )
            .await;
        let Outcome::Audited {
            denial: Denial::NotAllowed,
            source: Some(source),
            ..
        } = o
        else {
            panic!("expected Audited not_allowed, got {o:?}");
        };
        assert_eq!(source.header, "x-client-id");
        let headers = [("x-client-id", good.as_str())];
        let o = c
            .check(
                &snap,
                &RequestView::from_parts("h", "/api", "GET", &ext, &headers),
            )
            .await;
        assert!(matches!(o, Outcome::Allow { .. }), "{o:?}");
        // The API server cannot answer: still UNAVAILABLE (Envoy's status_on_error).
        let unknown = jwt(unix_now() + 3602);
        let headers = [("x-client-id", unknown.as_str())];
        let o = c
            .check(
                &snap,
                &RequestView::from_parts("h", "/api", "GET", &ext, &headers),
            )
            .await;
        assert!(matches!(o, Outcome::Unavailable { .. }), "{o:?}");
        let text = c.metrics.encode();
        assert!(
            text.contains(
                r#"tokengate_decisions_total{route="api",outcome="would_deny",reason="not_allowed"} 1"#
            ),
            "{text}"
        );
    }
}
