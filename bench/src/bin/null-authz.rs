//! `null-authz`: an Envoy ext_authz gRPC server that allows every request.
//!
//! It does the least any tonic Check server must do (decode the CheckRequest, encode an OK
//! CheckResponse), so "Envoy + null-authz" is the ceiling for every ext_authz server on this
//! stack; tokengate's cache-hit path is measured against it. The runtime and HTTP/2 knobs are
//! flags so the same binary can show what server-side settings are worth.
//!
//! Prints `ready <addr>` on stdout once listening.

use std::net::SocketAddr;

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "ext_authz Check server that allows everything (benchmark ceiling)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Listen on this Unix domain socket path instead (what a sidecar sharing a volume with
    /// Envoy could use: no TCP/IP stack on either side).
    #[arg(long)]
    uds: Option<std::path::PathBuf>,
    /// Tokio worker threads; 0 runs a current-thread runtime.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Add seven identity headers to the OK response (the size of tokengate's answer).
    #[arg(long)]
    identity_headers: bool,
    /// HTTP/2 initial stream window (bytes); default: h2's 64 KiB.
    #[arg(long)]
    stream_window: Option<u32>,
    /// HTTP/2 initial connection window (bytes).
    #[arg(long)]
    conn_window: Option<u32>,
    /// Enable HTTP/2 adaptive flow control (BDP probing).
    #[arg(long)]
    adaptive_window: bool,
    /// Print the first CheckRequest received (to see exactly what Envoy sends).
    #[arg(long)]
    dump_first: bool,
    /// Hide vectored writes from h2: h2 then copies DATA payloads under 1 KiB into its write
    /// buffer instead of chaining any payload over 256 bytes, and a chained payload forces a
    /// write per response (so responses over 256 bytes never share a syscall).
    #[arg(long)]
    no_vectored: bool,
    /// Leave Nagle's algorithm on for accepted sockets (tonic's default with a
    /// caller-supplied listener).
    #[arg(long)]
    nagle: bool,
}

/// The allow-everything service.
struct NullAuthz {
    ok: CheckResponse,
    dump_first: std::sync::atomic::AtomicBool,
}

#[tonic::async_trait]
impl Authorization for NullAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        if self
            .dump_first
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("{request:#?}");
        }
        Ok(Response::new(self.ok.clone()))
    }
}

fn ok_response(identity_headers: bool) -> CheckResponse {
    let headers = if identity_headers {
        [
            ("x-k8s-sa-user", "system:serviceaccount:bench:client"),
            ("x-k8s-sa-namespace", "bench"),
            ("x-k8s-sa-name", "client"),
            ("x-k8s-sa-uid", "0b1f9a34-6f0e-4b43-9a3c-1c2d3e4f5a6b"),
            (
                "x-k8s-sa-groups",
                "system:serviceaccounts,system:serviceaccounts:bench,system:authenticated",
            ),
            ("x-k8s-pod-name", "client-0"),
            ("x-k8s-pod-uid", "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"),
        ]
        .into_iter()
        .map(|(k, v)| {
            #[allow(deprecated)]
            HeaderValueOption {
                header: Some(HeaderValue {
                    key: k.into(),
                    value: v.into(),
                    ..Default::default()
                }),
                append: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
                append_action: 2, // OVERWRITE_IF_EXISTS_OR_ADD
                ..Default::default()
            }
        })
        .collect()
    } else {
        Vec::new()
    };
    CheckResponse {
        status: Some(RpcStatus {
            code: 0,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = if args.workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()?
    };
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let svc = AuthorizationServer::new(NullAuthz {
        ok: ok_response(args.identity_headers),
        dump_first: args.dump_first.into(),
    });
    let mut server = tonic::transport::Server::builder()
        .initial_stream_window_size(args.stream_window)
        .initial_connection_window_size(args.conn_window)
        .http2_adaptive_window(Some(args.adaptive_window));
    let router = server.add_service(svc);
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Some(path) = &args.uds {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        println!("ready unix:{}", path.display());
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        router.serve_with_incoming_shutdown(incoming, stop).await?;
    } else {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!("ready {}", listener.local_addr()?);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(!args.nagle));
        if args.no_vectored {
            use tokio_stream::StreamExt;
            let incoming = incoming.map(|conn| conn.map(tokengate::io::ScalarWrites));
            router.serve_with_incoming_shutdown(incoming, stop).await?;
        } else {
            router.serve_with_incoming_shutdown(incoming, stop).await?;
        }
    }
    Ok(())
}
