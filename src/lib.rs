//! tokengate: an Envoy/Istio external authorization server (`envoy.service.auth.v3.Authorization`)
//! that checks Kubernetes service-account tokens with TokenReview.
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
//! retries, capped concurrency) and the result is cached (positive up to the token's `exp`,
//! negative briefly, errors never); [`policy`] applies the route's allow-list. The sequencer
//! returns a [`check::Outcome`] (allow with identity and token source, deny with a
//! [`denial::Denial`], or unavailable with the [`review::ReviewError`]), and [`decision`]
//! turns it into Envoy's answer: a CheckResponse, or gRPC UNAVAILABLE when the API server
//! cannot answer, so Envoy's `status_on_error` / `failure_mode_allow` decide.
//!
//! # Who owns what
//!
//! | module | owns |
//! |---|---|
//! | [`server`] | the tonic service, [`GrpcListener`] (TCP or Unix socket) |
//! | [`io`] | [`io::ScalarWrites`], the socket wrapper that batches h2 writes |
//! | [`request`] | [`request::RequestView`], [`request::TokenLookup`] |
//! | [`route`] | [`route::Routes`], [`route::Route`], [`route::Matcher`], [`route::HostPattern`] |
//! | [`check`] | [`check::Checker`] (the sequencer), [`check::Outcome`] |
//! | [`cache`] | [`cache::Cache`] (keyed hash, TTL, single-flight) |
//! | [`precheck`] | [`precheck::precheck`] on unverified claims |
//! | [`review`] | [`review::Reviewer`], [`review::Verdict`], [`review::ReviewError`], [`review::SetupError`] |
//! | [`policy`] | [`policy::AllowList`], [`policy::ServiceAccountPattern`], [`policy::Glob`] |
//! | [`decision`] | [`decision::Responder`]: Outcome → CheckResponse / gRPC status |
//! | [`identity`] | [`identity::Identity`], [`identity::TokenHash`] |
//! | [`denial`] | [`denial::Denial`], the reason codes |
//! | [`config`] | [`Config`] and its sections, [`config::defaults`] |
//! | [`shutdown`] | [`shutdown::Lifecycle`], [`shutdown::Shutdown`], the drain grace |
//! | [`metrics`], [`admin`] | metrics; `/healthz`, `/readyz`, `/metrics` (beside the path) |
//! | [`error`] | [`Error`] (what [`serve`] returns), [`error::Report`] (a cause chain, once) |
//!
//! Envoy types appear only in `server`, `request` and `decision`; Kubernetes types only in
//! `review`; the middle speaks [`identity::Identity`], [`denial::Denial`] and
//! [`check::Outcome`]. [`config`] turns YAML into typed, compiled settings once, at start-up.
//! Shutdown is one signal ([`shutdown`]) that the gRPC server and the admin port both
//! observe. Tokens are never logged, only a short hash ([`identity::TokenHash`]).
//!
//! [`serve`] runs everything; `main` and the integration tests both use it.

#![warn(missing_docs)]

pub mod admin;
pub mod cache;
pub mod check;
pub mod config;
pub mod decision;
pub mod denial;
pub mod error;
pub mod identity;
pub mod io;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod precheck;
pub mod request;
pub mod review;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod verify;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use error::Error;
pub use server::GrpcListener;

/// Runs tokengate: Check + health on `grpc` (a TCP listener or a [`GrpcListener`]), admin
/// endpoints on `admin`, until `shutdown` completes; then health goes NOT_SERVING and
/// in-flight Checks drain (see [`shutdown`]). A Unix socket's file is removed when serving
/// ends.
pub async fn serve(
    config: Config,
    grpc: impl Into<GrpcListener>,
    admin: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics = Arc::new(metrics::Metrics::new(
        config.routes.iter().map(|r| r.name.as_str()),
    ));
    let reviewer = review::Reviewer::connect(&config.kubernetes, metrics.clone()).await?;
    let checker = Arc::new(check::Checker::new(&config, reviewer, metrics.clone())?);
    let responder = decision::Responder::new(&config.identity_headers);

    let (mut lifecycle, observer) = shutdown::Lifecycle::new(shutdown::DRAIN_GRACE);
    let admin_task = tokio::spawn(admin::run(
        admin,
        admin::AdminState {
            metrics,
            shutdown: observer.clone(),
        },
        config.listen.admin_limits.clone(),
    ));
    let grpc = grpc.into();
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
                responder,
                grpc,
                config.listen.limits.clone(),
                observer,
            ),
            shutdown,
        )
        .await;
    let _ = admin_task.await;
    // `None`: the grace period ran out; still a clean stop.
    served.unwrap_or(Ok(()))?;
    tracing::info!("tokengate stopped");
    Ok(())
}
