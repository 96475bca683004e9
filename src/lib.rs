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
//! [`server`] receives the gRPC call and hands it to [`check`], the one module that sequences
//! the steps: [`request`] reads host, path, method, headers and context extensions and finds
//! the token; [`route`] picks the first matching route and so the audiences; the [`cache`] is
//! probed with a keyed hash of token and audiences; on a miss [`precheck`] refuses junk on
//! unverified claims (no TokenReview spent), then [`review`] asks the API server (single-flight
//! per key, bounded retries, capped concurrency) and the result is cached (positive up to the
//! token's `exp`, negative briefly, errors never); [`policy`] applies the route's allow-list;
//! [`decision`] builds the CheckResponse. When the API server cannot answer, Check returns gRPC
//! UNAVAILABLE so Envoy's `status_on_error` / `failure_mode_allow` decide.
//!
//! Envoy types appear only in `server`, `request` and `decision`; Kubernetes types only in
//! `review`; the middle speaks [`identity::Identity`] and [`identity::Denial`]. [`config`] turns
//! YAML into typed settings once, at start-up. [`metrics`] and [`admin`] (`/healthz`,
//! `/readyz`, `/metrics`) sit beside the path. Tokens are never logged, only a short hash
//! ([`identity::TokenHash`]).
//!
//! [`serve`] runs everything; `main` and the integration tests both use it.

#![warn(missing_docs)]

pub mod admin;
pub mod cache;
pub mod check;
pub mod config;
pub mod decision;
pub mod identity;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod precheck;
pub mod request;
pub mod review;
pub mod route;
pub mod server;
pub mod verify;
pub mod watch;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use config::Config;
pub use server::GrpcListener;

/// Library errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Setting up the Kubernetes client failed.
    #[error(transparent)]
    Setup(#[from] review::SetupError),
    /// The system random number generator failed (cache key).
    #[error("the system random number generator failed")]
    Random,
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(tonic::transport::Error),
}

/// Runs tokengate: Check + health on `grpc` (a TCP listener or a [`GrpcListener`]), admin
/// endpoints on `admin`, until `shutdown` completes; then health goes NOT_SERVING and
/// in-flight Checks drain. A Unix socket's file is removed when serving ends.
pub async fn serve(
    config: Config,
    grpc: impl Into<GrpcListener>,
    admin: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new(
        config.routes.iter().map(|r| r.name.as_str()),
    ));
    let reviewer = review::Reviewer::connect(&config.kubernetes, metrics.clone())
        .await
        .map_err(Error::from)?;
    let checker = Arc::new(check::Checker::new(&config, reviewer, metrics.clone())?);

    let ready = Arc::new(AtomicBool::new(false));
    let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_task = tokio::spawn(admin::run(
        admin,
        admin::AdminState {
            metrics,
            ready: ready.clone(),
        },
        admin_stopped,
    ));
    let grpc = grpc.into();
    let socket_file = grpc.socket_file();
    tracing::info!(
        grpc = %grpc.describe(),
        routes = config.routes.len(),
        "tokengate serving"
    );
    let result = server::run(checker, grpc, ready, shutdown).await;
    if let Some(path) = socket_file {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "removing the gRPC socket file: {e}");
        }
    }
    let _ = stop_admin.send(true);
    let _ = admin_task.await;
    result?;
    tracing::info!("tokengate stopped");
    Ok(())
}
