//! The admin HTTP port, beside the request path: `/healthz` (the process is up), `/readyz`
//! (the gRPC server is serving and not shutting down, and, with watches on, the first lists
//! and key fetch are done) and `/metrics` (OpenMetrics text).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::metrics::Metrics;
use crate::shutdown::{Phase, Shutdown};

/// A further condition for readiness (the watches' first lists and the first key fetch).
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    /// Ready while the gRPC server is serving and shutdown has not begun.
    pub shutdown: Shutdown,
    /// And, when set, while this holds.
    pub also_ready: Option<ReadyCheck>,
}

impl AdminState {
    fn ready(&self) -> bool {
        self.shutdown.is_ready() && self.also_ready.as_ref().is_none_or(|ready| ready())
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" if state.ready() => respond(StatusCode::OK, TEXT, "ready\n"),
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// Serves the admin endpoints until the gRPC server has stopped ([`Phase::Stopped`]): while
/// it drains, `/readyz` answers 503.
pub async fn run(listener: tokio::net::TcpListener, state: AdminState) {
    let mut shutdown = state.shutdown.clone();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            () = shutdown.reached(Phase::Stopped) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = handle(&state, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}
