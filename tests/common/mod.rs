//! The one harness of tokengate's integration tests. Everything runs for real on loopback:
//!
//! ```text
//! gRPC client (Harness)  or  HTTP client -> Envoy (envoy::Stack) -> echo upstream
//!            \                                 | ext_authz gRPC
//!             `--------------------------------v
//!                           tokengate::serve (in-process, [`Tokengate`])
//!                              |  TokenReview over HTTPS
//!                              v
//!                           testkit::world::World (the seeded Kubernetes API stand-in)
//! ```
//!
//! [`Tokengate`] is the only place tokengate is started and stopped: stopping awaits the serve
//! task, so a server error or panic fails the test. The seeded world, CheckRequests and
//! responses come from `testkit` ([`testkit::world`], [`testkit::check`]).
#![allow(dead_code)] // each test binary uses a different subset

pub mod envoy;
pub mod forward_auth;
pub mod front_door;
pub mod load;
pub mod mtls;

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use kube_standin::Options;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub use testkit::check::*;
pub use testkit::world::World;

/// The audience of the data-store routes.
pub const AUD: &str = "data-store";

/// tokengate configuration used by the gRPC tests: the data-store's routes, fast failure
/// settings. `{cache}` is substituted; the kubeconfig is added by [`with_kubeconfig`].
pub const BASE_CONFIG: &str = r#"
kubernetes:
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
      service_accounts: ["api/api"]
    strip_token: true
    invalid_token_status: 401
{cache}
"#;

/// Renders [`BASE_CONFIG`] for a kubeconfig and a `cache:` section.
pub fn config(kubeconfig: &Path, cache: &str) -> String {
    with_kubeconfig(&BASE_CONFIG.replace("{cache}", cache), kubeconfig)
        .expect("BASE_CONFIG has a kubernetes block")
}

/// Points a tokengate config at `kubeconfig`: inserts `kubeconfig:` first in its top-level
/// `kubernetes:` block (published configs leave it out: in a pod the in-cluster config applies).
pub fn with_kubeconfig(yaml: &str, kubeconfig: &Path) -> Result<String> {
    let mut out = String::new();
    let mut inserted = false;
    for line in yaml.lines() {
        out.push_str(line);
        out.push('\n');
        if line == "kubernetes:" {
            out.push_str(&format!("  kubeconfig: \"{}\"\n", kubeconfig.display()));
            inserted = true;
        }
    }
    anyhow::ensure!(inserted, "no top-level `kubernetes:` block");
    Ok(out)
}

/// Reads a published tokengate config (e.g. `envoy/tokengate-sidecar.yaml`) and points it at
/// `kubeconfig`.
pub fn published_config(relative: &str, kubeconfig: &Path) -> Result<String> {
    let text = std::fs::read_to_string(testkit::workspace_root().join(relative))
        .with_context(|| format!("reading {relative}"))?;
    with_kubeconfig(&text, kubeconfig).with_context(|| relative.to_string())
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

/// tokengate running in-process: the serve task, its shutdown trigger and its admin address.
pub struct Tokengate {
    /// Where the admin endpoints (`/healthz`, `/readyz`, `/metrics`) listen.
    pub admin_addr: std::net::SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Tokengate {
    /// Starts tokengate with the configuration text `yaml`, serving Check on `grpc` and the
    /// admin endpoints on a fresh `127.0.0.1:0`. Without an explicit `listen.drain_delay` in
    /// `yaml` the delay is zero: stopping drains at once.
    ///
    /// With [`Tokengate::start_reloading`], the only calls of `tokengate::serve_with_reload`
    /// and `Config::from_yaml_str` / `Config::load` in the tests: their errors are turned into
    /// text here, so a change of their error types stops here.
    pub async fn start(yaml: &str, grpc: tokengate::GrpcListener) -> Result<Tokengate> {
        Tokengate::start_with_http(yaml, grpc, None).await
    }

    /// Like [`Tokengate::start`], with the HTTP front door on `http` when given.
    pub async fn start_with_http(
        yaml: &str,
        grpc: tokengate::GrpcListener,
        http: Option<tokio::net::TcpListener>,
    ) -> Result<Tokengate> {
        let mut config = tokengate::Config::from_yaml_str(yaml)
            .map_err(|e| anyhow!("tokengate rejected the test config: {e}\n{yaml}"))?;
        // Tests stop at once unless they ask for the drain delay (the published configs leave
        // it at its default, which is right for pods and slow for a test suite).
        if !yaml.contains("drain_delay:") {
            config.listen.drain_delay = Duration::ZERO;
        }
        Tokengate::spawn(config, None, grpc, http).await
    }

    /// tokengate serving the configuration file `path` as `tokengate serve` does: re-read
    /// every `poll` (`None`: never) and on SIGHUP when `sighup`. The file is used as written
    /// (a reload compares it with the running configuration, so nothing is patched in):
    /// give it `listen: {drain_delay: 0s}` to stop at once.
    pub async fn start_reloading(
        path: &Path,
        poll: Option<Duration>,
        sighup: bool,
        grpc: tokengate::GrpcListener,
    ) -> Result<Tokengate> {
        let config = tokengate::Config::load(path)
            .map_err(|e| anyhow!("tokengate rejected the test config: {e}"))?;
        let source = tokengate::reload::Source {
            path: path.to_owned(),
            poll_every: poll,
            on_sighup: sighup,
        };
        Tokengate::spawn(config, Some(source), grpc, None).await
    }

    async fn spawn(
        config: tokengate::Config,
        reload: Option<tokengate::reload::Source>,
        grpc: tokengate::GrpcListener,
        http: Option<tokio::net::TcpListener>,
    ) -> Result<Tokengate> {
        let admin = testkit::ports::listener().await?;
        let admin_addr = admin.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.await;
            };
            tokengate::serve_with_reload(config, reload, grpc, admin, http, stopped)
                .await
                .map_err(|e| anyhow!("tokengate::serve: {e:#}"))
        });
        Ok(Tokengate {
            admin_addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Signals shutdown without waiting (see [`Tokengate::stop`]).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts tokengate down and awaits it: fails the test if it does not stop within 30 s,
    /// panicked or returned an error. Stopping twice is a no-op.
    pub async fn stop(&mut self) {
        self.begin_shutdown();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("tokengate did not stop within 30 s")
                .expect("tokengate task panicked")
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    /// GET on the admin port; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = testkit::http::get(self.admin_addr, path, &[])
            .await
            .unwrap_or_else(|e| panic!("GET {path} on tokengate's admin port: {e:#}"));
        (resp.status, resp.body)
    }
}

impl Drop for Tokengate {
    /// A test must end with [`Tokengate::stop`] (through `Harness::stop` or `Stack::finish`):
    /// only awaiting the serve task reveals a server error or panic.
    fn drop(&mut self) {
        if self.task.is_some() && !std::thread::panicking() {
            panic!("tokengate dropped without stop(): its errors and panics went unchecked");
        }
    }
}

/// The seeded world + tokengate in-process on `127.0.0.1:0` + a gRPC client.
pub struct Harness {
    /// The seeded Kubernetes API stand-in.
    pub world: World,
    /// tokengate.
    pub gate: Tokengate,
    /// A client of tokengate's Check service.
    pub client: AuthorizationClient<Channel>,
}

impl Harness {
    /// The seeded world with defaults and tokengate with [`BASE_CONFIG`] and default cache
    /// settings.
    pub async fn start() -> Harness {
        let world = world().await;
        let yaml = config(&world.standin.kubeconfig_path(), "");
        Harness::start_with(world, &yaml).await
    }

    /// Like [`Harness::start`], with `kubernetes.timeout` (per TokenReview attempt) set to
    /// `timeout` instead of [`BASE_CONFIG`]'s 2 s.
    pub async fn start_with_timeout(timeout: &str) -> Harness {
        let world = world().await;
        let yaml = config(&world.standin.kubeconfig_path(), "")
            .replace("timeout: 2s", &format!("timeout: {timeout}"));
        Harness::start_with(world, &yaml).await
    }

    /// tokengate with the configuration text `yaml` (kubeconfig included) against `world`.
    pub async fn start_with(world: World, yaml: &str) -> Harness {
        let grpc = testkit::ports::listener().await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let gate = Tokengate::start(yaml, grpc.into())
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        Harness::connect(world, gate, grpc_addr).await
    }

    /// tokengate serving the file `path` against `world`, reloading it as
    /// [`Tokengate::start_reloading`] does.
    pub async fn start_reloading(
        world: World,
        path: &Path,
        poll: Option<Duration>,
        sighup: bool,
    ) -> Harness {
        let grpc = testkit::ports::listener().await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let gate = Tokengate::start_reloading(path, poll, sighup, grpc.into())
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        Harness::connect(world, gate, grpc_addr).await
    }

    async fn connect(world: World, gate: Tokengate, grpc_addr: std::net::SocketAddr) -> Harness {
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connecting to tokengate");
        wait_serving(channel.clone()).await;
        Harness {
            world,
            gate,
            client: AuthorizationClient::new(channel),
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

    /// GET on tokengate's admin port; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        self.gate.admin_get(path).await
    }

    /// Shuts tokengate down and awaits it (see [`Tokengate::stop`]), then the stand-in.
    pub async fn stop(mut self) {
        self.gate.stop().await;
        self.world.shutdown().await;
    }
}

/// The seeded world with default stand-in options.
pub async fn world() -> World {
    world_with(Options::default()).await
}

/// The seeded world with these stand-in options.
pub async fn world_with(options: Options) -> World {
    World::start_with(options)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
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

/// A request for the `data-store` route (as Envoy's per-route context_extensions select it).
pub fn data_store(headers: &[(&str, &str)]) -> CheckRequest {
    request(
        "data-store:8080",
        "/items?x=1",
        headers,
        &[("route", "data-store")],
    )
}

/// `kubectl --kubeconfig KUBECONFIG ARGS... [-f FILE]` (the file holding `input`, if given),
/// off the async runtime; panics with kubectl's output if it fails, else returns it.
pub async fn kubectl(kubeconfig: &Path, args: &[&str], input: Option<&str>) -> String {
    let kubeconfig = kubeconfig.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let input = input.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let mut cmd = std::process::Command::new(kubectl);
        cmd.arg("--kubeconfig").arg(&kubeconfig).args(&args);
        if let Some(text) = input {
            let file = dir.path().join("object.yaml");
            std::fs::write(&file, text).unwrap();
            cmd.arg("-f").arg(&file);
        }
        let out = cmd
            .output()
            .expect("kubectl is required (it is on the machine image; see scripts/setup.sh)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubectl {args:?} failed:\n{text}");
        text
    })
    .await
    .unwrap()
}

/// Unix time now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
