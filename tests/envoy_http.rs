//! End to end through a real Envoy speaking the HTTP ext_authz protocol (`http_service`,
//! the published `envoy/sidecar-http.yaml`) to tokengate's HTTP front door
//! (`envoy/tokengate-sidecar-http.yaml`): the same decisions as over gRPC (401 without a token,
//! 403 for bad or wrong-audience tokens, 200 with exactly one true value of each identity
//! header however the client spoofs them, 503 when the API server is down or tokengate is
//! gone), path routing in place of context_extensions, and Envoy's `path_prefix`.

mod common;

use common::envoy::{assert_api_identity, echo_of, with_spoofed, Stack};
use kube_standin::Fault;

const ENVOY: &str = "envoy/sidecar-http.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar-http.yaml";
const HOST: (&str, &str) = ("host", "data-store");

async fn stack() -> Stack {
    Stack::start_http(ENVOY, TOKENGATE)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_401_with_www_authenticate_and_reason() {
    let stack = stack().await;
    let resp = stack.get("/items", &[HOST]).await;
    assert_eq!(resp.status, 401, "{resp:?}\n{}", stack.envoy.diagnostics());
    let challenge = resp
        .header("www-authenticate")
        .expect("401 without WWW-Authenticate");
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert_eq!(resp.header("x-tokengate-reason"), Some("missing_token"));
    assert_eq!(resp.json().unwrap()["reason"], "missing_token");
    assert_eq!(stack.echo.requests_seen(), 0);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_wrong_audience_tokens_are_403() {
    let stack = stack().await;
    let vault = stack.world.api_token("vault");
    let intruder = stack.world.token("default", "intruder", "data-store");
    for (headers, reason) in [
        (vec![HOST, ("x-client-id", "dummy")], "malformed_token"),
        (
            vec![HOST, ("authorization", "Bearer dummy")],
            "malformed_token",
        ),
        (
            vec![HOST, ("x-client-id", vault.as_str())],
            "wrong_audience",
        ),
        (
            vec![HOST, ("x-client-id", intruder.as_str())],
            "not_allowed",
        ),
    ] {
        let resp = stack.get("/items", &headers).await;
        assert_eq!(resp.status, 403, "{headers:?}: {resp:?}");
        assert_eq!(resp.header("x-tokengate-reason"), Some(reason), "{resp:?}");
        assert_eq!(resp.header("www-authenticate"), None);
    }
    assert_eq!(
        stack.echo.requests_seen(),
        0,
        "a denied request reached the upstream"
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_reaches_upstream_with_one_true_identity_despite_spoofing() {
    let stack = stack().await;
    let token = stack.world.api_token("data-store");
    for (name, value) in [
        ("x-client-id", token.clone()),
        ("authorization", format!("Bearer {token}")),
    ] {
        let headers = with_spoofed(&[HOST, (name, &value)]);
        let resp = stack.get("/items?id=7", &headers).await;
        assert_eq!(resp.status, 200, "{resp:?}\n{}", stack.envoy.diagnostics());
        let echo = echo_of(&resp);
        // path_prefix /authz is between Envoy and tokengate only.
        assert_eq!(echo.path, "/items?id=7");
        assert_eq!(
            echo.message,
            "authenticated as system:serviceaccount:api:api"
        );
        assert_api_identity(&echo, &stack.world);
        // strip_token on this route: Envoy removed the header tokengate named.
        assert!(!echo.has(name), "token forwarded: {:?}", echo.headers);
        assert!(
            echo.headers.iter().all(|(_, v)| !v.contains(&token)),
            "token forwarded in some header: {:?}",
            echo.headers
        );
    }
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_path_routes_to_its_own_audience() {
    let stack = stack().await;
    let data_store = stack.world.api_token("data-store");
    let resp = stack
        .get("/internal/stats", &[HOST, ("x-client-id", &data_store)])
        .await;
    assert_eq!(
        resp.status, 403,
        "data-store token accepted on /internal/: {resp:?}"
    );
    assert_eq!(resp.header("x-tokengate-reason"), Some("wrong_audience"));

    let other = stack.world.token("default", "intruder", "other");
    let headers = with_spoofed(&[HOST, ("x-client-id", &other)]);
    let resp = stack.get("/internal/stats", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_eq!(
        echo.values("x-k8s-sa-user"),
        vec!["system:serviceaccount:default:intruder"]
    );
    assert!(
        echo.values("x-k8s-pod-name").is_empty(),
        "spoofed pod name survived"
    );
    // strip_token is off here: the token is forwarded once.
    assert_eq!(echo.values("x-client-id"), vec![other.as_str()]);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_is_503_never_200() {
    let stack = stack().await;
    let token = stack.world.api_token("data-store");
    stack.world.standin.set_fault(Fault::Down);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    stack.world.standin.set_fault(Fault::Status {
        code: 503,
        retry_after: None,
    });
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(
        stack.echo.requests_seen(),
        0,
        "an unchecked request reached the upstream"
    );
    // Envoy's HTTP client takes tokengate's 503 as an authorization *error*, like gRPC
    // UNAVAILABLE: status_on_error answers, and failure_mode_allow would be the operator's
    // choice. Denials are counted apart.
    let errors = stack.counter("http.ingress.ext_authz.error").await;
    assert_eq!(errors, 2, "ext_authz.error counter");
    let denied = stack.counter("http.ingress.ext_authz.denied").await;
    assert_eq!(denied, 0, "ext_authz.denied counter");

    stack.world.standin.set_fault(Fault::None);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "errors must not be cached: {resp:?}");
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokengate_down_fails_closed() {
    let mut stack = stack().await;
    let token = stack.world.api_token("data-store");
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "baseline: {resp:?}");
    stack.stop_tokengate().await;
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(
        resp.status, 503,
        "tokengate down must fail closed: {resp:?}"
    );
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}
