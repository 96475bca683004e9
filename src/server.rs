//! The gRPC edge: `envoy.service.auth.v3.Authorization/Check` and `grpc.health.v1` on one port.
//!
//! Each Check is read into a [`RequestView`], decided by the [`Checker`] and answered by the
//! [`Responder`]; this is the only place the three meet. On shutdown the health status turns
//! NOT_SERVING first while Checks are still served (the drain delay), then tonic stops
//! accepting, sends GOAWAY and drains in-flight Checks (see [`crate::shutdown`]).

use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::StreamExt as _;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::check::Checker;
use crate::decision::Responder;
use crate::error::Error;
use crate::io::ScalarWrites;
use crate::request::RequestView;
use crate::shutdown::{Phase, Shutdown};

/// The tonic service: reads each Check, hands it to the [`Checker`], answers with the
/// [`Responder`].
pub struct AuthzService {
    checker: Arc<Checker>,
    responder: Responder,
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let outcome = match RequestView::new(request.get_ref()) {
            Some(view) => self.checker.check(&view).await,
            None => self.checker.unreadable(),
        };
        self.responder.respond(&outcome).map(Response::new)
    }
}

/// The gRPC server's listening socket: TCP, or a Unix domain socket (sidecar Envoy in the same
/// pod, through a shared volume: less CPU per Check than loopback TCP, see BENCHMARKS.md).
#[derive(Debug)]
pub enum GrpcListener {
    /// `IP:port`.
    Tcp(tokio::net::TcpListener),
    /// `unix:/path`.
    Unix(tokio::net::UnixListener),
    /// `IP:port` with TLS (`listen.tls`, see [`crate::tls`]).
    Tls(tokio::net::TcpListener, crate::tls::Acceptor),
}

impl From<tokio::net::TcpListener> for GrpcListener {
    fn from(l: tokio::net::TcpListener) -> Self {
        GrpcListener::Tcp(l)
    }
}

impl From<tokio::net::UnixListener> for GrpcListener {
    fn from(l: tokio::net::UnixListener) -> Self {
        GrpcListener::Unix(l)
    }
}

impl GrpcListener {
    /// Binds `addr`. For a Unix socket, a stale socket file left at the path (a previous run
    /// that did not shut down cleanly) is removed first; any other kind of file is left alone
    /// and binding fails.
    pub async fn bind(addr: &crate::config::GrpcAddr) -> std::io::Result<GrpcListener> {
        match addr {
            crate::config::GrpcAddr::Tcp(a) => {
                Ok(GrpcListener::Tcp(tokio::net::TcpListener::bind(a).await?))
            }
            crate::config::GrpcAddr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt as _;
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                Ok(GrpcListener::Unix(tokio::net::UnixListener::bind(path)?))
            }
        }
    }

    /// Adds TLS to a TCP listener when `tls` is set (`listen.tls`): loads the files.
    pub fn with_tls(self, tls: Option<&crate::config::TlsSettings>) -> Result<GrpcListener, Error> {
        match (tls, self) {
            (None, listener) => Ok(listener),
            (Some(tls), GrpcListener::Tcp(l)) => {
                Ok(GrpcListener::Tls(l, crate::tls::Acceptor::new(tls)?))
            }
            (Some(_), GrpcListener::Unix(_)) => Err(Error::TlsOnUnixSocket),
            (Some(_), listener @ GrpcListener::Tls(..)) => Ok(listener),
        }
    }

    /// The socket file of a Unix listener bound to a path.
    pub fn socket_file(&self) -> Option<std::path::PathBuf> {
        match self {
            GrpcListener::Tcp(_) | GrpcListener::Tls(..) => None,
            GrpcListener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.to_path_buf())),
        }
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            GrpcListener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("tcp ({e})"), |a| a.to_string()),
            GrpcListener::Tls(l, _) => l
                .local_addr()
                .map_or_else(|e| format!("tls ({e})"), |a| format!("{a} (TLS)")),
            GrpcListener::Unix(_) => match self.socket_file() {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix (unnamed)".to_owned(),
            },
        }
    }
}

/// Accepted Unix connections as the stream tonic serves.
struct UnixIncoming(tokio::net::UnixListener);

impl Stream for UnixIncoming {
    type Item = std::io::Result<ScalarWrites<tokio::net::UnixStream>>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0
            .poll_accept(cx)
            .map(|r| Some(r.map(|(stream, _)| ScalarWrites(stream))))
    }
}

/// Serves Check and health on `listener`. When `shutdown` reaches [`Phase::Leaving`] health
/// turns NOT_SERVING (so Envoy's active health check steers away) while Checks are still
/// served; at [`Phase::Draining`] tonic stops accepting, sends GOAWAY and drains. The delay
/// and the grace period are the [`Lifecycle`]'s.
///
/// [`Lifecycle`]: crate::shutdown::Lifecycle
pub async fn run(
    checker: Arc<Checker>,
    responder: Responder,
    listener: GrpcListener,
    mut shutdown: Shutdown,
) -> Result<(), Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AuthorizationServer<AuthzService>>()
        .await;
    let authz = AuthorizationServer::new(AuthzService { checker, responder });

    let signal = async move {
        shutdown.reached(Phase::Leaving).await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<AuthorizationServer<AuthzService>>()
            .await;
        shutdown.reached(Phase::Draining).await;
    };
    // One write per batch of responses, not one per response: see `ScalarWrites`.
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(authz);
    let result = match listener {
        GrpcListener::Tcp(listener) => {
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|conn| conn.map(ScalarWrites));
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        GrpcListener::Unix(listener) => {
            router
                .serve_with_incoming_shutdown(UnixIncoming(listener), signal)
                .await
        }
        GrpcListener::Tls(listener, acceptor) => {
            router
                .serve_with_incoming_shutdown(acceptor.incoming(listener), signal)
                .await
        }
    };
    result.map_err(Error::Transport)
}
