//! The Envoy end-to-end stack on loopback: the seeded world, tokengate in-process (a published
//! `envoy/tokengate-*.yaml`, started by [`super::Tokengate`]), the echo upstream and a real Envoy
//! running a published `envoy/*.yaml`. Everything is stopped when the [`Stack`] drops;
//! [`Stack::stop_tokengate`] stops tokengate alone and surfaces a server error or panic.

use std::path::Path;

use anyhow::{Context, Result};
use kube_standin::{Fault, Options};
use testkit::echo::{spawn_echo, Echo, EchoServer};
use testkit::envoy::{Envoy, Ports};
use testkit::http::{self, Response};
use testkit::world::World;
use testkit::IDENTITY_HEADERS;

use super::{published_config, Tokengate};

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

/// World + tokengate + echo + Envoy.
pub struct Stack {
    /// The seeded Kubernetes API stand-in.
    pub world: World,
    /// The protected upstream.
    pub echo: EchoServer,
    /// Envoy running the published config.
    pub envoy: Envoy,
    gate: Tokengate,
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
        Stack::start_inner(envoy_file, tokengate_file, options, None, None).await
    }

    /// Like [`Stack::start`] for Envoy's HTTP ext_authz protocol: tokengate also serves its
    /// HTTP front door, and the Envoy config's authz port (9001) is that port.
    pub async fn start_http(envoy_file: &str, tokengate_file: &str) -> Result<Stack> {
        let world = World::start_with(Options::default()).await?;
        let yaml = published_config(tokengate_file, &world.standin.kubeconfig_path())?;
        let grpc = testkit::ports::listener().await?;
        let http = testkit::ports::listener().await?;
        let http_port = http.local_addr()?.port();
        let gate = Tokengate::start_with_http(&yaml, grpc.into(), Some(http)).await?;
        let echo = spawn_echo(testkit::ports::listener().await?)?;
        let ports = Ports::new(http_port, echo.addr().port());
        let envoy_config = testkit::envoy::render(envoy_file, &ports)?;
        let envoy = Envoy::start(&envoy_config, ports)
            .await
            .context("starting envoy")?;
        Ok(Stack {
            world,
            echo,
            envoy,
            gate,
        })
    }

    /// Like [`Stack::start`], with the rendered Envoy config passed through `edit` first (a
    /// variant of a published file, e.g. Istio's default path normalization). `edit` must
    /// fail when the text it changes is missing, so a variant cannot silently equal the file.
    pub async fn start_edited(
        envoy_file: &str,
        tokengate_file: &str,
        edit: &dyn Fn(String) -> Result<String>,
    ) -> Result<Stack> {
        Stack::start_inner(
            envoy_file,
            tokengate_file,
            Options::default(),
            None,
            Some(edit),
        )
        .await
    }

    /// Like [`Stack::start`], but tokengate listens on the Unix socket `socket` and the
    /// published Envoy config's `tokengate` cluster is rewritten to reach it through
    /// `pipe: {path: socket}` instead of loopback TCP.
    pub async fn start_uds(envoy_file: &str, tokengate_file: &str, socket: &Path) -> Result<Stack> {
        Stack::start_inner(
            envoy_file,
            tokengate_file,
            Options::default(),
            Some(socket),
            None,
        )
        .await
    }

    async fn start_inner(
        envoy_file: &str,
        tokengate_file: &str,
        options: Options,
        socket: Option<&Path>,
        edit: Option<&dyn Fn(String) -> Result<String>>,
    ) -> Result<Stack> {
        let world = World::start_with(options).await?;
        let yaml = published_config(tokengate_file, &world.standin.kubeconfig_path())?;
        Stack::start_world(envoy_file, world, &yaml, socket, edit).await
    }

    /// Starts tokengate with the configuration text `yaml` (kubeconfig included) against an
    /// already prepared `world` (e.g. with the reviewer's list/watch grant), the echo upstream
    /// and Envoy running `envoy_file`; over the Unix socket `socket` when given (see
    /// [`Stack::start_uds`]), with the rendered Envoy config passed through `edit` when given
    /// (see [`Stack::start_edited`]).
    pub async fn start_world(
        envoy_file: &str,
        world: World,
        yaml: &str,
        socket: Option<&Path>,
        edit: Option<&dyn Fn(String) -> Result<String>>,
    ) -> Result<Stack> {
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
        let gate = Tokengate::start(yaml, grpc).await?;

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
        if let Some(edit) = edit {
            envoy_config = edit(envoy_config).with_context(|| format!("editing {envoy_file}"))?;
        }
        let envoy = Envoy::start(&envoy_config, ports)
            .await
            .context("starting envoy")?;
        Ok(Stack {
            world,
            echo,
            envoy,
            gate,
        })
    }

    /// Sends GET `path` through Envoy with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http::get(self.envoy.addr(), path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}\n{}", self.envoy.diagnostics()))
    }

    /// One Envoy counter, which must exist: a misspelt or never-created counter fails the
    /// test instead of reading as 0.
    pub async fn counter(&self, name: &str) -> u64 {
        self.envoy
            .stat(name)
            .await
            .unwrap_or_else(|e| panic!("reading Envoy stat {name}: {e:#}"))
            .unwrap_or_else(|| panic!("Envoy has no stat {name}\n{}", self.envoy.diagnostics()))
    }

    /// GET on tokengate's admin port (`/readyz`, `/metrics`); returns (status, body).
    pub async fn tokengate_admin(&self, path: &str) -> (u16, String) {
        self.gate.admin_get(path).await
    }

    /// Stops tokengate (graceful shutdown) and fails if it ended with an error or panic.
    pub async fn stop_tokengate(&mut self) {
        self.gate.stop().await;
    }

    /// The API server down, then answering 503: a Check with a valid new token is 503 from
    /// Envoy's error path (counted as ext_authz errors, not denials), never 200, and the same
    /// token works once the API server is back (errors are not cached). The sample routes
    /// `/items` on host `data-store` to a route the `api/api` token in `x-client-id` passes.
    pub async fn assert_api_server_down_is_503(&self) {
        let host = ("host", "data-store");
        let token = self.world.api_token("data-store");
        self.world.standin.set_fault(Fault::Down);
        let resp = self.get("/items", &[host, ("x-client-id", &token)]).await;
        assert_eq!(resp.status, 503, "{resp:?}");
        self.world.standin.set_fault(Fault::Status {
            code: 503,
            retry_after: None,
        });
        let resp = self.get("/items", &[host, ("x-client-id", &token)]).await;
        assert_eq!(resp.status, 503, "{resp:?}");
        assert_eq!(
            self.echo.requests_seen(),
            0,
            "an unchecked request reached the upstream"
        );
        // The 503s came from Envoy's error path (gRPC UNAVAILABLE or an HTTP 5xx ->
        // status_on_error), which is what failure_mode_allow would act on, not a denial.
        let errors = self.counter("http.ingress.ext_authz.error").await;
        assert_eq!(errors, 2, "ext_authz.error counter");
        let denied = self.counter("http.ingress.ext_authz.denied").await;
        assert_eq!(denied, 0, "ext_authz.denied counter");

        self.world.standin.set_fault(Fault::None);
        let resp = self.get("/items", &[host, ("x-client-id", &token)]).await;
        assert_eq!(resp.status, 200, "errors must not be cached: {resp:?}");
    }

    /// tokengate stopped: a cached and a new token both get 503 (Envoy's error path), and
    /// nothing more reaches the upstream.
    pub async fn assert_tokengate_down_fails_closed(&mut self) {
        let host = ("host", "data-store");
        let token = self.world.api_token("data-store");
        let resp = self.get("/items", &[host, ("x-client-id", &token)]).await;
        assert_eq!(resp.status, 200, "baseline: {resp:?}");
        let seen = self.echo.requests_seen();
        let errors = self.counter("http.ingress.ext_authz.error").await;

        self.stop_tokengate().await;
        let fresh = self.world.api_token("data-store");
        for t in [&token, &fresh] {
            let resp = self.get("/items", &[host, ("x-client-id", t)]).await;
            assert_eq!(
                resp.status, 503,
                "tokengate down must fail closed: {resp:?}"
            );
        }
        assert_eq!(
            self.counter("http.ingress.ext_authz.error").await,
            errors + 2,
            "ext_authz.error counter"
        );
        assert_eq!(self.echo.requests_seen(), seen);
    }

    /// Stops everything, surfacing tokengate errors.
    pub async fn finish(mut self) {
        self.gate.stop().await;
        self.world.shutdown().await;
    }
}

impl super::front_door::FrontDoor for Stack {
    fn world(&self) -> &World {
        &self.world
    }

    fn upstream_requests(&self) -> u64 {
        self.echo.requests_seen()
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        Stack::get(self, path, headers).await
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

/// Asserts the upstream saw exactly [`World::api_identity`]: each identity header once, with
/// tokengate's value (see [`assert_identity`]).
pub fn assert_api_identity(echo: &Echo, world: &World) {
    let id = world.api_identity();
    let expected: Vec<(&str, &str)> = id.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_identity(echo, &expected);
}

/// Asserts the answer was `status` with tokengate's `x-tokengate-reason: reason` (`what` says
/// which request, in the failure message).
pub fn assert_refused(resp: &Response, status: u16, reason: &str, what: &str) {
    assert_eq!(
        (resp.status, resp.header("x-tokengate-reason")),
        (status, Some(reason)),
        "{what}: {resp:?}"
    );
}

/// Headers `extra` plus every spoofed identity header.
pub fn with_spoofed<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = extra.to_vec();
    h.extend(SPOOFED);
    h
}
