//! tokengate: an Envoy/Istio external authorization server (`envoy.service.auth.v3.Authorization`)
//! that checks Kubernetes service-account tokens with TokenReview, or locally against the
//! cluster's keys, and revokes cached verdicts as soon as the API server's watch stream says
//! a pod, service account or signing key is gone.
//!
//! # Architecture
//!
//! A Check flows one way through modules named after the steps:
//!
//! ```text
//! server  →  request  →  route  →  precheck  →  cache ⇄ review  →  policy  →  decision  →  server
//! (tonic)   (view of a   (which    (cheap,      (keyed hash,    (TokenReview (allow-list  (CheckResponse:
//!            CheckRequest, route,   unverified   TTL, single-   via kube →   on the      OK + identity
//!            token found)  audiences) rejection)  flight)        Identity)    Identity)   headers, or denial)
//! ```
//!
//! [`server`] receives the gRPC call, reads it into a [`request::RequestView`] and hands that to
//! [`check`], the one module that sequences the steps: [`route`] picks the first matching
//! route and so the audiences; [`request`] finds the token; the [`cache`] is probed with a
//! keyed hash of token and audiences; on a miss [`precheck`] refuses junk on unverified claims
//! (no TokenReview spent), then [`review`] asks the API server (single-flight per key, bounded
//! retries within a budget, capped concurrency shared fairly by downstream peer, see
//! [`slots`]) and the result is cached (positive up to the token's `exp`, negative briefly,
//! errors never); [`policy`] applies the route's allow-list, then, on routes with
//! `allow.rbac`, [`rbac`] asks a (cached) SubjectAccessReview through the same slots (on a
//! hit, usually the answer kept with the cached verdict). On a route with `verification:
//! local`, [`verify`] judges the token first, as the API server would (the issuer's keys from
//! [`keys`], bound objects from [`watch`]), and only what it cannot judge goes to TokenReview. With watches on, every cache hit is first put to
//! [`revocation`]: a verdict whose pod, service account or key is gone is dropped. The
//! sequencer returns a [`check::Outcome`] (allow with identity and token source, deny with a
//! [`denial::Denial`], or unavailable with the [`review::ReviewError`]), and [`decision`]
//! turns it into Envoy's answer: a CheckResponse, or gRPC UNAVAILABLE when the API server
//! cannot answer, so Envoy's `status_on_error` / `failure_mode_allow` decide.
//!
//! # Who owns what
//!
//! | module | owns |
//! |---|---|
//! | [`server`] | the tonic service, [`GrpcListener`] (TCP or Unix socket) |
//! | [`http`] | the HTTP front door (`listen.http`): Envoy `http_service`, forward-auth |
//! | [`io`] | [`io::ScalarWrites`], the socket wrapper that batches h2 writes |
//! | [`request`] | [`request::RequestView`], [`request::TokenLookup`] |
//! | [`route`] | [`route::Routes`], [`route::Route`], [`route::Matcher`], [`route::HostPattern`] |
//! | [`check`] | [`check::Checker`] (the sequencer), [`check::Outcome`] |
//! | [`cache`] | [`cache::Cache`] (keyed hash, TTL, single-flight) |
//! | [`precheck`] | [`precheck::precheck`] on unverified claims |
//! | [`review`] | [`review::Reviewer`], [`review::Verdict`], [`review::ReviewError`], [`review::SetupError`] |
//! | [`slots`] | [`slots::Slots`]: review slots (TokenReview, SubjectAccessReview), fair per downstream peer, bounded queue, shed at once |
//! | [`retry`] | [`retry::RetryBudget`], jittered backoff, `Retry-After` (both forms) |
//! | [`verify`] | [`verify::verify`] (local verification in the API server's order), [`verify::LocalVerdict`], [`verify::ObjectLookup`] |
//! | [`keys`] | [`keys::KeySet`] (OIDC discovery + JWKS, refreshed; removed kids), [`keys::KeySnapshot`] |
//! | [`watch`] | [`watch::Objects`]: metadata-only watch caches of pods and service accounts |
//! | [`revocation`] | [`revocation::Revocation`] (does a cached verdict still hold?), [`revocation::Admitted`] |
//! | [`policy`] | [`policy::AllowList`], [`policy::ServiceAccountPattern`], [`policy::Glob`] |
//! | [`rbac`] | [`rbac::Authorizer`] (SubjectAccessReview per route, cached), [`rbac::Rule`], [`rbac::Memo`] (answers kept with a cached verdict) |
//! | [`peer`] | [`peer::PeerBinding`]: `require_peer`, the mTLS peer's SPIFFE ID against the token |
//! | [`decision`] | [`decision::Responder`]: Outcome → CheckResponse / gRPC status |
//! | [`identity`] | [`identity::Identity`], [`identity::TokenHash`] |
//! | [`denial`] | [`denial::Denial`], the reason codes |
//! | [`config`] | [`Config`] and its sections, [`config::defaults`] |
//! | [`reload`] | [`reload::Source`]: re-reading the file on change and SIGHUP, what may change live |
//! | [`shutdown`] | [`shutdown::Lifecycle`], [`shutdown::Shutdown`], the drain delay and grace |
//! | [`tls`] | [`tls::Acceptor`]: TLS/mTLS on the gRPC listener, certificate reload |
//! | [`metrics`], [`admin`] | metrics; `/healthz`, `/readyz`, `/metrics` (beside the path) |
//! | [`audit`] | [`audit::Audit`]: the decision log and the outage summary (beside the path) |
//! | [`telemetry`] | OTLP traces: the exporter layer, the `check` span and its parent context |
//! | [`error`] | [`Error`] (what [`serve`] returns), [`error::Report`] (a cause chain, once) |
//!
//! Envoy types appear only in `server`, `request` and `decision`; Kubernetes types only in
//! `review`, `keys` and `watch` (the three that talk to the API server); the middle speaks [`identity::Identity`], [`denial::Denial`] and
//! [`check::Outcome`]. [`config`] turns YAML into typed, compiled settings, at start-up and
//! on each [`reload`]; what a reload may change (routes, token sources, cache settings,
//! identity header names) is one [`check::Snapshot`] that each Check reads whole.
//! Shutdown is one signal ([`shutdown`]) that the gRPC server and the admin port both
//! observe. Tokens are never logged, only a short hash ([`identity::TokenHash`]).
//!
//! [`serve`] runs everything; `main` and the integration tests both use it.

#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod cache;
pub mod check;
pub mod config;
pub mod decision;
pub mod denial;
pub mod error;
pub mod http;
pub mod identity;
pub mod io;
pub mod keys;
pub mod metrics;
pub mod peer;
pub mod policy;
pub mod precheck;
pub mod rbac;
pub mod reload;
pub mod request;
pub mod retry;
pub mod review;
pub mod revocation;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod slots;
pub mod telemetry;
pub mod tls;
pub mod verify;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use error::Error;
pub use server::GrpcListener;

/// Runs tokengate: Check + health on `grpc` (a TCP listener or a [`GrpcListener`]), admin
/// endpoints on `admin`, until `shutdown` completes; then health goes NOT_SERVING while Checks
/// are still served for `listen.drain_delay`, and then in-flight Checks drain (see
/// [`shutdown`]). A Unix socket's file is removed when serving
/// ends. The HTTP front door, when `listen.http` is set, is bound here (see
/// [`serve_with_http`] to pass a bound listener instead).
pub async fn serve(
    config: Config,
    grpc: impl Into<GrpcListener>,
    admin: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let http = match config.listen.http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind {
                    what: "listen.http",
                    source,
                })?,
        ),
        None => None,
    };
    serve_with_http(config, grpc, admin, http, shutdown).await
}

/// [`serve`], with the HTTP front door ([`http`]) on `http` when given (`listen.http` is
/// then ignored).
pub async fn serve_with_http(
    config: Config,
    grpc: impl Into<GrpcListener>,
    admin: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    serve_with_reload(config, None, grpc, admin, http, shutdown).await
}

/// [`serve_with_http`], re-reading the configuration from `reload` (the file `config` was
/// loaded from) when it changes or on SIGHUP, as [`reload`] describes.
pub async fn serve_with_reload(
    config: Config,
    reload: Option<reload::Source>,
    grpc: impl Into<GrpcListener>,
    admin: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics = Arc::new(metrics::Metrics::new(
        config.routes.iter().map(|r| r.name.as_str()),
    ));
    let reviewer = review::Reviewer::connect(&config.kubernetes, metrics.clone()).await?;
    let (mut lifecycle, observer) = shutdown::Lifecycle::new(shutdown::DRAIN_GRACE);
    lifecycle.delay_drain(config.listen.drain_delay);
    let watched = config
        .kubernetes
        .watch
        .then(|| start_watches(&config, &reviewer, &metrics, &observer));
    let watches_ready = watched.as_ref().map(|w| {
        let (objects, keys) = (w.objects.clone(), w.keys.clone());
        Arc::new(move || objects.synced() && keys.snapshot().is_some()) as admin::ReadyCheck
    });
    let checker = Arc::new(check::Checker::new(
        &config,
        reviewer,
        watched,
        metrics.clone(),
    )?);
    if let Some(source) = reload {
        tokio::spawn(reload::run(
            source,
            checker.clone(),
            metrics.clone(),
            stopped(&observer),
        ));
    }
    let audit = Arc::new(audit::Audit::new(&config.log));

    let admin_task = tokio::spawn(admin::run(
        admin,
        admin::AdminState {
            metrics,
            shutdown: observer.clone(),
            also_ready: watches_ready,
        },
        config.listen.admin_limits.clone(),
    ));
    // HTTP mode (issue 11 item 4): same checker and responder, own listener.
    let http_task = http.map(|listener| {
        tracing::info!(http = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "HTTP front door on");
        tokio::spawn(http::run(
            checker.clone(),
            audit.clone(),
            config.listen.http_path_prefix.clone(),
            listener,
            observer.clone(),
        ))
    });
    let grpc = grpc.into().with_tls(config.listen.tls.as_ref())?;
    if let Some(path) = grpc.socket_file() {
        lifecycle.remove_when_stopped(path);
    }
    tracing::info!(
        grpc = %grpc.describe(),
        routes = config.routes.len(),
        "tokengate serving"
    );
    let served = lifecycle
        .run(
            server::run(
                checker,
                audit.clone(),
                grpc,
                config.listen.limits.clone(),
                observer,
            ),
            shutdown,
        )
        .await;
    let _ = admin_task.await;
    if let Some(task) = http_task {
        let _ = task.await;
    }
    audit.flush();
    // `None`: the grace period ran out; still a clean stop.
    served.unwrap_or(Ok(()))?;
    tracing::info!("tokengate stopped");
    Ok(())
}

/// Resolves once serving has stopped: the end of the background tasks' lives.
fn stopped(observer: &shutdown::Shutdown) -> impl Future<Output = ()> + Send + 'static {
    let mut observer = observer.clone();
    async move { observer.reached(shutdown::Phase::Stopped).await }
}

/// Starts what `kubernetes.watch` asks for: the pod and service-account watch caches, the
/// issuer's keys (fetched now, then refreshed; kids that leave the JWKS are remembered for
/// revocation), and a task that copies their state into gauges once a second.
fn start_watches(
    config: &Config,
    reviewer: &review::Reviewer,
    metrics: &Arc<metrics::Metrics>,
    observer: &shutdown::Shutdown,
) -> check::Watched {
    let client = reviewer.api_client();
    let objects = watch::Objects::spawn(
        client.clone(),
        &config.kubernetes.watch_namespaces,
        stopped(observer),
    );
    let key_settings = keys::KeySettings {
        refresh_every: config.kubernetes.jwks_refresh,
        ..keys::KeySettings::default()
    };
    let keys = keys::KeySet::new(keys::KubeKeySource::new(client), key_settings);
    let removed_kids: Arc<std::sync::Mutex<std::collections::HashSet<Box<str>>>> = Arc::default();

    let mut removed = keys.subscribe_removed();
    let (first, refresher) = (keys.clone(), stopped(observer));
    let into = removed_kids.clone();
    tokio::spawn(async move {
        if let Err(e) = first.refresh().await {
            tracing::warn!(error = %error::Report(&e), "fetching the issuer's keys failed; retrying");
        }
        let _refresher = first.spawn_refresher(refresher);
        loop {
            match removed.recv().await {
                Ok(kids) => {
                    tracing::info!(kids = ?kids, "signing keys left the JWKS; their tokens' verdicts are revoked");
                    into.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(kids.iter().map(|k| Box::from(k.as_str())));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    let (gauge_objects, gauge_keys, m) = (objects.clone(), keys.clone(), metrics.clone());
    let stop = stopped(observer);
    tokio::spawn(async move {
        let update = async {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                m.watch_staleness.set(
                    gauge_objects
                        .staleness()
                        .map_or(-1.0, |age| age.as_secs_f64()),
                );
                m.watch_pods.set(gauge_objects.len(watch::Kind::Pod) as i64);
                m.watch_service_accounts
                    .set(gauge_objects.len(watch::Kind::ServiceAccount) as i64);
                if let Some(snapshot) = gauge_keys.snapshot() {
                    m.jwks_age
                        .set(snapshot.age(std::time::SystemTime::now()).as_secs_f64());
                    m.jwks_keys.set(snapshot.len() as i64);
                }
            }
        };
        tokio::select! {
            () = update => {}
            () = stop => {}
        }
    });

    check::Watched {
        objects,
        keys,
        removed_kids,
    }
}
