//! The gRPC edge: `envoy.service.auth.v3.Authorization/Check` and `grpc.health.v1` on one port.
//!
//! Each Check is read into a [`RequestView`], decided by the [`Checker`] and answered by the
//! [`Responder`](crate::decision::Responder); this is the only place the three meet. On shutdown the health status turns
//! NOT_SERVING first while Checks are still served (the drain delay), then tonic stops
//! accepting, sends GOAWAY and drains in-flight Checks (see [`crate::shutdown`]).
//!
//! Connection hygiene (`listen.limits`, [`GrpcLimits`]): a cap on open connections (more are
//! closed on accept), a deadline for the HTTP/2 preface and an idle deadline ([`Guarded`]),
//! HTTP/2 keepalive PINGs, and caps on concurrent streams, header list and message size, so
//! idle, half-open or greedy clients cannot hold sockets, tasks or memory.
//!
//! Each Check runs in a `check` span that continues the trace context Envoy forwarded (see
//! [`crate::telemetry`]), and its answer is logged by [`Audit`] (the decision log, and one
//! warning per interval during an API-server outage instead of a line per Check).

use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tokio::time::Instant;
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::StreamExt as _;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::audit::{Audit, Seen};
use crate::check::Checker;
use crate::config::GrpcLimits;
use crate::error::Error;
use crate::io::{Admission, Guarded, ScalarWrites};
use crate::request::RequestView;
use crate::shutdown::{Phase, Shutdown};
use crate::telemetry;

/// Length of the HTTP/2 connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const HTTP2_PREFACE_LEN: usize = 24;
/// The tonic service: reads each Check, hands it to the [`Checker`], answers with the
/// [`Responder`](crate::decision::Responder) of the configuration snapshot it was decided under.
pub struct AuthzService {
    checker: Arc<Checker>,
    audit: Arc<Audit>,
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let snapshot = self.checker.snapshot();
        let metadata = Metadata(request.metadata());
        let view = RequestView::new(request.get_ref());
        // The connection's peer, for fair review slots when Envoy did not name the downstream
        // one (formatted only then).
        let connection_peer = view
            .as_ref()
            .filter(|v| v.source.is_empty())
            .and(request.remote_addr())
            .map(|a| a.ip().to_string());
        let view = view.map(|v| v.or_source(connection_peer.as_deref().unwrap_or("")));
        let outcome = self
            .checker
            .check_traced(&snapshot, view.as_ref(), &metadata)
            .await;
        let peer = source_address(request.get_ref());
        self.audit.record(
            &outcome,
            Seen {
                front: "grpc",
                view: view.as_ref(),
                peer: peer.as_ref().map(|p| p as &dyn std::fmt::Display),
                started,
                token_sources: snapshot.token_sources(),
            },
        );
        snapshot.responder().respond(&outcome).map(Response::new)
    }
}

/// The gRPC call's metadata, where Envoy's ext_authz client puts its trace context.
struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl telemetry::Carrier for Metadata<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The downstream client's address as Envoy reports it (`attributes.source.address`),
/// formatted only when a decision line is written.
struct SourceAddress<'a>(&'a envoy_types::pb::envoy::config::core::v3::address::Address);

impl std::fmt::Display for SourceAddress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use envoy_types::pb::envoy::config::core::v3::address::Address;
        use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
        match self.0 {
            Address::SocketAddress(a) => match a.port_specifier {
                Some(PortSpecifier::PortValue(port)) if a.address.contains(':') => {
                    write!(f, "[{}]:{port}", a.address)
                }
                Some(PortSpecifier::PortValue(port)) => write!(f, "{}:{port}", a.address),
                _ => f.write_str(&a.address),
            },
            Address::Pipe(p) => write!(f, "unix:{}", p.path),
            Address::EnvoyInternalAddress(_) => f.write_str("envoy-internal"),
        }
    }
}

fn source_address(req: &CheckRequest) -> Option<SourceAddress<'_>> {
    let address = req.attributes.as_ref()?.source.as_ref()?.address.as_ref()?;
    address.address.as_ref().map(SourceAddress)
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
struct UnixIncoming(tokio::net::UnixListener, Admission);

impl Stream for UnixIncoming {
    type Item = std::io::Result<ScalarWrites<Guarded<tokio::net::UnixStream>>>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            match self.0.poll_accept(cx) {
                std::task::Poll::Ready(Ok((stream, _))) => {
                    if let Some(g) = self.1.admit(stream) {
                        return std::task::Poll::Ready(Some(Ok(ScalarWrites(g))));
                    }
                }
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Some(Err(e))),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
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
    audit: Arc<Audit>,
    listener: GrpcListener,
    limits: GrpcLimits,
    mut shutdown: Shutdown,
) -> Result<(), Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AuthorizationServer<AuthzService>>()
        .await;
    let authz = AuthorizationServer::new(AuthzService { checker, audit })
        .max_decoding_message_size(limits.max_message_bytes);
    let admission = Admission::new(
        limits.max_connections,
        limits.handshake_timeout,
        HTTP2_PREFACE_LEN,
        limits.idle_timeout,
        "grpc",
    );

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
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .add_service(health_service)
        .add_service(authz);
    let result = match listener {
        GrpcListener::Tcp(listener) => {
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .filter_map(move |conn| match conn {
                    Ok(stream) => admission.admit(stream).map(|g| Ok(ScalarWrites(g))),
                    Err(e) => Some(Err(e)),
                });
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        GrpcListener::Unix(listener) => {
            router
                .serve_with_incoming_shutdown(UnixIncoming(listener, admission), signal)
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
