//! The full stack of the Envoy end-to-end tests, on loopback:
//!
//! ```text
//! client (testkit::http) -> Envoy (published envoy/*.yaml, real binary) -> echo upstream
//!                              |  ext_authz gRPC
//!                              v
//!                           tokengate::serve (in-process, published envoy/tokengate-*.yaml)
//!                              |  TokenReview over HTTPS
//!                              v
//!                           kube_standin::Standin (in-process)
//! ```
//!
//! The seeds' identities exist: service account `api/api` with pod `api/api-0` on `node-1`,
//! `data-store/data-store`, and `default/intruder` (a valid identity the data-store does not
//! allow). Everything is stopped when the [`Stack`] drops; [`Stack::stop_tokengate`] stops
//! tokengate alone and surfaces a server error or panic.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;

use anyhow::{Context, Result};
use kube_standin::{MintRequest, Options, Standin};
use testkit::echo::{spawn_echo, Echo, EchoServer};
use testkit::envoy::{Envoy, Ports};
use testkit::http::{self, Response};
use testkit::IDENTITY_HEADERS;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Values a malicious client sends in the identity headers.
pub const SPOOFED: [(&str, &str); 8] = [
    ("x-k8s-sa-user", "system:serviceaccount:kube-system:admin"),
    ("x-k8s-sa-namespace", "kube-system"),
    ("x-k8s-sa-name", "admin"),
    ("x-k8s-sa-uid", "00000000-0000-0000-0000-000000000000"),
    ("x-k8s-sa-groups", "system:masters"),
    ("x-k8s-pod-name", "evil-pod"),
    ("x-k8s-pod-uid", "11111111-1111-1111-1111-111111111111"),
    // The same header twice, to catch append-instead-of-overwrite.
    ("x-k8s-sa-user", "system:serviceaccount:kube-system:admin2"),
];

/// A running tokengate: the serve task and its shutdown trigger.
struct Tokengate {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tokengate::Error>>>,
}

/// Standin + tokengate + echo + Envoy.
pub struct Stack {
    /// The Kubernetes API stand-in.
    pub standin: Standin,
    /// The protected upstream.
    pub echo: EchoServer,
    /// Envoy running the published config.
    pub envoy: Envoy,
    tokengate: Tokengate,
    /// UID of service account api/api.
    pub api_uid: String,
    /// UID of pod api/api-0.
    pub api_pod_uid: String,
}

/// Reads a published tokengate config and points it at the stand-in.
pub fn tokengate_config(relative: &str, kubeconfig: &std::path::Path) -> Result<String> {
    let path = testkit::workspace_root().join(relative);
    let text = std::fs::read_to_string(&path)?;
    let mut out = String::new();
    let mut inserted = false;
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line == "kubernetes:" {
            out.push_str(&format!("  kubeconfig: {}\n", kubeconfig.display()));
            inserted = true;
        }
    }
    anyhow::ensure!(inserted, "{relative} has no top-level `kubernetes:` block");
    Ok(out)
}

impl Stack {
    /// Starts everything: `envoy_file` from envoy/, `tokengate_file` likewise.
    pub async fn start(envoy_file: &str, tokengate_file: &str) -> Result<Stack> {
        Stack::start_with(envoy_file, tokengate_file, Options::default()).await
    }

    /// Like [`Stack::start`] with stand-in options (e.g. short tokens allowed).
    pub async fn start_with(
        envoy_file: &str,
        tokengate_file: &str,
        options: Options,
    ) -> Result<Stack> {
        Stack::start_inner(envoy_file, tokengate_file, options, None).await
    }

    /// Like [`Stack::start`], but tokengate listens on the Unix socket `socket` and the
    /// published Envoy config's `tokengate` cluster is rewritten to reach it through
    /// `pipe: {path: socket}` instead of loopback TCP.
    pub async fn start_uds(
        envoy_file: &str,
        tokengate_file: &str,
        socket: &std::path::Path,
    ) -> Result<Stack> {
        Stack::start_inner(envoy_file, tokengate_file, Options::default(), Some(socket)).await
    }

    async fn start_inner(
        envoy_file: &str,
        tokengate_file: &str,
        options: Options,
        socket: Option<&std::path::Path>,
    ) -> Result<Stack> {
        let standin = Standin::start(options).await?;
        let api_uid = standin.create_service_account("api", "api");
        let api_pod_uid = standin.create_pod("api", "api-0", "api", Some("node-1"));
        standin.create_service_account("data-store", "data-store");
        standin.create_service_account("default", "intruder");

        let text = tokengate_config(tokengate_file, &standin.kubeconfig_path())?;
        let config = tokengate::config::Config::from_yaml_str(&text)
            .map_err(|e| anyhow::anyhow!("{tokengate_file}: {e}"))?;
        let (grpc, grpc_port) = match socket {
            None => {
                let l = testkit::ports::listener().await?;
                let port = l.local_addr()?.port();
                (tokengate::GrpcListener::from(l), port)
            }
            Some(path) => {
                let addr = tokengate::config::GrpcAddr::Unix(path.to_path_buf());
                // Any free port: it only marks the cluster address to replace below.
                let [port] = testkit::ports::free_ports::<1>();
                (tokengate::GrpcListener::bind(&addr).await?, port)
            }
        };
        let admin = testkit::ports::listener().await?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tokengate::serve(config, grpc, admin, async move {
            let _ = rx.await;
        }));

        let echo = spawn_echo(testkit::ports::listener().await?)?;
        let ports = Ports::new(grpc_port, echo.addr().port());
        let mut envoy_config = testkit::envoy::render(envoy_file, &ports)?;
        if let Some(path) = socket {
            let tcp = format!("socket_address: {{address: 127.0.0.1, port_value: {grpc_port}}}");
            anyhow::ensure!(
                envoy_config.matches(&tcp).count() == 1,
                "{envoy_file}: expected exactly one `{tcp}` (the tokengate cluster)"
            );
            envoy_config =
                envoy_config.replace(&tcp, &format!("pipe: {{path: {}}}", path.display()));
        }
        let envoy = Envoy::start(&envoy_config, ports)
            .await
            .context("starting envoy")?;
        Ok(Stack {
            standin,
            echo,
            envoy,
            tokengate: Tokengate {
                shutdown: Some(tx),
                task: Some(task),
            },
            api_uid,
            api_pod_uid,
        })
    }

    /// A token for api/api (bound to pod api-0) with `audience`.
    pub fn api_token(&self, audience: &str) -> String {
        self.standin
            .mint(
                &MintRequest::new("api", "api")
                    .audience(audience)
                    .pod("api-0"),
            )
            .expect("mint api token")
    }

    /// A token for `ns`/`sa` with `audience`.
    pub fn token(&self, ns: &str, sa: &str, audience: &str) -> String {
        self.standin
            .mint(&MintRequest::new(ns, sa).audience(audience))
            .expect("mint token")
    }

    /// Sends GET `path` through Envoy with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http::get(self.envoy.addr(), path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}\n{}", self.envoy.diagnostics()))
    }

    /// Stops tokengate (graceful shutdown) and fails if it ended with an error or panic.
    pub async fn stop_tokengate(&mut self) {
        if let Some(tx) = self.tokengate.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.tokengate.task.take() {
            let result = tokio::time::timeout(std::time::Duration::from_secs(30), task)
                .await
                .expect("tokengate did not stop within 30s")
                .expect("tokengate task panicked");
            result.expect("tokengate::serve returned an error");
        }
    }

    /// Stops everything, surfacing tokengate errors.
    pub async fn finish(mut self) {
        self.stop_tokengate().await;
        self.standin.shutdown().await;
    }
}

/// Parses the echo upstream's answer.
pub fn echo_of(resp: &Response) -> Echo {
    serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("not an echo answer ({e}): {:?}", resp.body))
}

/// Asserts the upstream saw exactly one value of every identity header, equal to `expected`
/// (name, value) pairs, and none of the spoofed values.
pub fn assert_identity(echo: &Echo, expected: &[(&str, &str)]) {
    for name in IDENTITY_HEADERS {
        let values = echo.values(name);
        match expected.iter().find(|(n, _)| *n == name) {
            Some((_, want)) => assert_eq!(
                values,
                vec![*want],
                "upstream saw {name} = {values:?}; all headers: {:?}",
                echo.headers
            ),
            None => assert!(
                values.is_empty(),
                "upstream saw unexpected {name} = {values:?}"
            ),
        }
        for (spoofed_name, spoofed) in SPOOFED {
            if spoofed_name == name {
                assert!(
                    !values.contains(&spoofed),
                    "spoofed {name}: {spoofed} reached the upstream"
                );
            }
        }
    }
}

/// The full identity of api/api-0 as tokengate should report it.
pub fn api_identity(stack: &Stack) -> Vec<(&'static str, String)> {
    vec![
        ("x-k8s-sa-user", "system:serviceaccount:api:api".to_string()),
        ("x-k8s-sa-namespace", "api".to_string()),
        ("x-k8s-sa-name", "api".to_string()),
        ("x-k8s-sa-uid", stack.api_uid.clone()),
        (
            "x-k8s-sa-groups",
            "system:serviceaccounts,system:serviceaccounts:api,system:authenticated".to_string(),
        ),
        ("x-k8s-pod-name", "api-0".to_string()),
        ("x-k8s-pod-uid", stack.api_pod_uid.clone()),
    ]
}

/// Asserts the upstream saw exactly [`api_identity`]: each identity header once, with
/// tokengate's value (see [`assert_identity`]).
pub fn assert_api_identity(echo: &Echo, stack: &Stack) {
    let id = api_identity(stack);
    let expected: Vec<(&str, &str)> = id.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_identity(echo, &expected);
}

/// Headers `extra` plus every spoofed identity header.
pub fn with_spoofed<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = extra.to_vec();
    h.extend(SPOOFED);
    h
}

/// The address Envoy listens on (for messages).
pub fn addr(stack: &Stack) -> SocketAddr {
    stack.envoy.addr()
}
