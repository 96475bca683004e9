//! The gRPC edge: `envoy.service.auth.v3.Authorization/Check` and `grpc.health.v1` on one port.
//!
//! On shutdown the health status turns NOT_SERVING first (so Envoy's active health check and
//! Kubernetes probes steer away), then tonic stops accepting and drains in-flight Checks,
//! bounded by [`DRAIN_GRACE`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::StreamExt as _;
use tonic::transport::server::{Connected, TcpIncoming};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::check::Checker;

/// Longest wait for in-flight Checks after shutdown begins.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The tonic service: hands each Check to the [`Checker`].
pub struct AuthzService {
    checker: Arc<Checker>,
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.checker
            .check(request.get_ref())
            .await
            .map(Response::new)
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

    /// The socket file of a Unix listener bound to a path.
    pub fn socket_file(&self) -> Option<std::path::PathBuf> {
        match self {
            GrpcListener::Tcp(_) => None,
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

/// Serves Check and health on `listener` until `shutdown` completes, then drains.
/// `ready` is raised while serving (read by the admin `/readyz`).
pub async fn run(
    checker: Arc<Checker>,
    listener: GrpcListener,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AuthorizationServer<AuthzService>>()
        .await;
    let authz = AuthorizationServer::new(AuthzService { checker });

    let (draining_tx, mut draining_rx) = tokio::sync::watch::channel(false);
    let ready_flag = ready.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: health NOT_SERVING, draining in-flight checks");
        ready_flag.store(false, Ordering::SeqCst);
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<AuthorizationServer<AuthzService>>()
            .await;
        let _ = draining_tx.send(true);
    };
    // One write per batch of responses, not one per response: see `ScalarWrites`.
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(authz);
    let mut server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match listener {
        GrpcListener::Tcp(listener) => {
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|conn| conn.map(ScalarWrites));
            Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
        }
        GrpcListener::Unix(listener) => {
            Box::pin(router.serve_with_incoming_shutdown(UnixIncoming(listener), signal))
        }
    };
    ready.store(true, Ordering::SeqCst);
    let grace = async {
        while !*draining_rx.borrow_and_update() {
            if draining_rx.changed().await.is_err() {
                // The signal future was dropped without firing: the server ended on its own.
                std::future::pending::<()>().await;
            }
        }
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::select! {
        result = &mut server => result.map_err(crate::Error::Transport),
        () = grace => {
            tracing::warn!(grace = ?DRAIN_GRACE, "in-flight checks did not finish in time; stopping anyway");
            Ok(())
        }
    }
}

/// An accepted connection that tells h2 it has no vectored writes (also used by the bench's
/// null server, `null-authz --no-vectored`, to measure the same effect).
///
/// h2 copies a DATA frame's payload into its write buffer only below a "chain threshold":
/// 256 bytes when the socket supports vectored writes, 1 KiB when it does not. A larger
/// payload is chained instead, and while a chained frame is pending h2 accepts no other frame
/// until it has written to the socket. An allow answer with the identity headers is ~400
/// bytes, so with vectored writes every Check cost its own `writev` (about a third of
/// tokengate's CPU on a cache hit, ~6 µs per Check on loopback); without them the answers of
/// concurrent Checks leave in one write. Frames over 1 KiB (rare here) are written in two
/// plain writes instead of one vectored write. Measured in BENCHMARKS.md. Wraps TCP and Unix
/// streams alike (tokio's `UnixStream` writes vectored too).
pub struct ScalarWrites<S = tokio::net::TcpStream>(pub S);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ScalarWrites<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ScalarWrites<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    // `is_write_vectored` keeps its default, `false`: that is the point of this type.
}

impl<S: Connected> Connected for ScalarWrites<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}
