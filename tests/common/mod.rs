//! Shared helpers for tokengate's integration tests: the Kubernetes API stand-in in-process,
//! tokengate in-process on 127.0.0.1:0 (via `tokengate::serve`), a real gRPC client, and the
//! built binary's `check-config` for published config files.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{attribute_context, AttributeContext};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use kube_standin::{MintRequest, Options, Standin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The seeds' audience.
pub const AUD: &str = "data-store";

/// tokengate configuration used by most tests: the seeds' routes, fast failure settings.
/// `{kubeconfig}` and `{cache}` are substituted.
pub const BASE_CONFIG: &str = r#"
kubernetes:
  kubeconfig: "{kubeconfig}"
  timeout: 2s
  retries: 1
  max_in_flight: 16
token_sources:
  - header: authorization
    scheme: Bearer
  - header: x-client-id
routes:
  - name: data-store
    match:
      context_extensions: {route: data-store}
    audiences: [data-store]
  - name: data-store-strict
    match:
      hosts: [strict.data-store]
    audiences: [data-store]
    allow:
      service_accounts: ["default/api"]
    strip_token: true
    invalid_token_status: 401
{cache}
"#;

/// Renders [`BASE_CONFIG`] for a kubeconfig and a `cache:` section.
pub fn config(kubeconfig: &Path, cache: &str) -> String {
    BASE_CONFIG
        .replace("{kubeconfig}", &kubeconfig.to_string_lossy())
        .replace("{cache}", cache)
}

/// Runs the built `tokengate check-config PATH` and fails with its output if it rejects the
/// file; `label` names the file in the failure.
pub fn check_config(label: &str, path: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("check-config")
        .arg(path)
        .output()
        .expect("run tokengate check-config");
    assert!(
        out.status.success(),
        "tokengate check-config rejected {label}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running stand-in + tokengate + gRPC client.
pub struct Harness {
    pub standin: Standin,
    pub client: AuthorizationClient<Channel>,
    pub grpc_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tokengate::Error>>>,
}

/// Starts the stand-in with default options.
pub async fn standin() -> Standin {
    standin_with(Options::default()).await
}

/// Starts the stand-in with these options, plus the seeds' objects: service accounts
/// `default/api` and `default/web`, pods `api-1` and `web-1`.
pub async fn standin_with(opts: Options) -> Standin {
    let s = Standin::start(opts).await.expect("starting kube-standin");
    s.create_service_account("default", "api");
    s.create_service_account("default", "web");
    s.create_pod("default", "api-1", "api", Some("node-1"));
    s.create_pod("default", "web-1", "web", Some("node-1"));
    s
}

impl Harness {
    /// Stand-in with defaults and tokengate with [`BASE_CONFIG`] and default cache settings.
    pub async fn start() -> Harness {
        let s = standin().await;
        let yaml = config(&s.kubeconfig_path(), "");
        Harness::start_with(s, &yaml).await
    }

    /// Like [`Harness::start`], with `kubernetes.timeout` (per TokenReview attempt) set to
    /// `timeout` instead of [`BASE_CONFIG`]'s 2 s.
    pub async fn start_with_timeout(timeout: &str) -> Harness {
        let s = standin().await;
        let yaml =
            config(&s.kubeconfig_path(), "").replace("timeout: 2s", &format!("timeout: {timeout}"));
        Harness::start_with(s, &yaml).await
    }

    /// tokengate with the given configuration text against `standin`.
    pub async fn start_with(standin: Standin, yaml: &str) -> Harness {
        let config = tokengate::Config::from_yaml_str(yaml).expect("test config is valid");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(tokengate::serve(config, grpc, admin, async move {
            let _ = rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connecting to tokengate");
        wait_serving(channel.clone()).await;
        Harness {
            standin,
            client: AuthorizationClient::new(channel),
            grpc_addr,
            admin_addr,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// One Check.
    pub async fn check(&self, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        self.client.clone().check(req).await.map(|r| r.into_inner())
    }

    /// One Check that must produce a CheckResponse (not a gRPC error).
    pub async fn check_ok(&self, req: CheckRequest) -> CheckResponse {
        self.check(req)
            .await
            .unwrap_or_else(|s| panic!("Check failed with gRPC status {s:?}"))
    }

    /// A pod-bound token of `default/api` for `audience`.
    pub fn api_token(&self, audience: &str) -> String {
        self.standin
            .mint(
                &MintRequest::new("default", "api")
                    .audience(audience)
                    .pod("api-1"),
            )
            .expect("minting")
    }

    /// GET on the admin port; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_addr, path).await
    }

    /// Signals shutdown without waiting (see [`Harness::stop`]).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts tokengate down and awaits it, so a server panic or error fails the test.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let result = tokio::time::timeout(Duration::from_secs(20), server)
                .await
                .expect("tokengate did not stop within 20 s")
                .expect("tokengate task panicked");
            result.expect("tokengate returned an error");
        }
        self.standin.shutdown().await;
    }
}

/// Waits until grpc.health.v1 reports SERVING.
pub async fn wait_serving(channel: Channel) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut health = HealthClient::new(channel);
    for _ in 0..200 {
        let r = health
            .check(HealthCheckRequest {
                service: "envoy.service.auth.v3.Authorization".into(),
            })
            .await;
        if let Ok(r) = r {
            if r.into_inner().status == ServingStatus::Serving as i32 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("tokengate never reported SERVING");
}

/// Minimal HTTP/1.0 GET.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A CheckRequest as Envoy sends it.
pub fn request(
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    context_extensions: &[(&str, &str)],
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "req-1".into(),
                    method: "GET".into(),
                    host: host.into(),
                    path: path.into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: context_extensions
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    }
}

/// A request for the `data-store` route (as Envoy's per-route context_extensions select it).
pub fn data_store(headers: &[(&str, &str)]) -> CheckRequest {
    request(
        "data-store:8080",
        "/items?x=1",
        headers,
        &[("route", "data-store")],
    )
}

/// The denied HTTP status, or `None` for OK.
pub fn denied_status(r: &CheckResponse) -> Option<u16> {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map(|s| s.code as u16),
        _ => None,
    }
}

/// The `x-tokengate-reason` of a denial.
pub fn reason(r: &CheckResponse) -> Option<String> {
    denied_header(r, "x-tokengate-reason")
}

/// A header of a denial.
pub fn denied_header(r: &CheckResponse, name: &str) -> Option<String> {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key.eq_ignore_ascii_case(name))
            .map(|h| h.value.clone()),
        _ => None,
    }
}

/// Asserts an OK answer and returns its upstream headers as (name, value).
pub fn allowed_headers(r: &CheckResponse) -> Vec<(String, String)> {
    assert_eq!(
        r.status.as_ref().map(|s| s.code),
        Some(0),
        "expected OK, got {r:?}"
    );
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect(),
        other => panic!("expected an ok_response, got {other:?}"),
    }
}

/// `headers_to_remove` of an OK answer.
pub fn removed_headers(r: &CheckResponse) -> Vec<String> {
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok.headers_to_remove.clone(),
        _ => Vec::new(),
    }
}

/// Unix time now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
