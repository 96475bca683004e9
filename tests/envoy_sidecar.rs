//! End to end through a real Envoy running the published `envoy/sidecar.yaml`, with tokengate
//! (`envoy/tokengate-sidecar.yaml`) and the Kubernetes API stand-in: the seeds' scenario and
//! the ways it must not break open (spoofed identity headers, the ext_authz-disabled route,
//! path tricks, API server down, tokengate down).

mod common;

use common::envoy::{assert_identity, echo_of, with_spoofed, Stack};
use common::front_door;

const ENVOY: &str = "envoy/sidecar.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar.yaml";
const HOST: (&str, &str) = ("host", "data-store");

async fn stack() -> Stack {
    Stack::start(ENVOY, TOKENGATE)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"))
}

/// The front doors' shared case table (tests/common/front_door.rs): 401/403 with reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_401_or_403_with_the_reason() {
    let stack = stack().await;
    front_door::assert_denials(&stack).await;
    stack.finish().await;
}

/// The shared table: 200 with one true identity despite spoofing, token stripped, in either
/// token header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_reaches_upstream_with_one_true_identity_and_is_stripped() {
    let stack = stack().await;
    front_door::assert_allowed_with_true_identity(&stack).await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_route_has_its_own_audience_and_keeps_the_token() {
    let stack = stack().await;
    // context_extensions {route: data-store-internal} => audience `other`.
    let data_store = stack.world.api_token("data-store");
    let resp = stack
        .get("/internal/stats", &[HOST, ("x-client-id", &data_store)])
        .await;
    assert_eq!(
        resp.status, 403,
        "data-store token accepted on /internal/: {resp:?}"
    );

    let other = stack.world.token("default", "intruder", "other");
    let headers = with_spoofed(&[HOST, ("x-client-id", &other)]);
    let resp = stack.get("/internal/stats", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_eq!(
        echo.message,
        "authenticated as system:serviceaccount:default:intruder"
    );
    assert_eq!(echo.values("x-k8s-sa-namespace"), vec!["default"]);
    assert_eq!(echo.values("x-k8s-sa-name"), vec!["intruder"]);
    assert!(
        echo.values("x-k8s-pod-name").is_empty(),
        "no pod binding, no pod header"
    );
    // strip_token is off for this route: the token is forwarded unchanged, once.
    assert_eq!(echo.values("x-client-id"), vec![other.as_str()]);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_bypasses_authz_but_never_passes_spoofed_identity() {
    let stack = stack().await;
    let headers = with_spoofed(&[HOST]);
    let resp = stack.get("/healthz", &headers).await;
    assert_eq!(resp.status, 200, "/healthz needs no token: {resp:?}");
    let echo = echo_of(&resp);
    assert_eq!(echo.path, "/healthz");
    assert_identity(&echo, &[]);
    assert_eq!(echo.message, "no identity (x-k8s-sa-user absent)");

    // The bypass is exactly /healthz: path tricks normalise to a checked route.
    for path in [
        "/healthz/../items",
        "/healthz/",
        "/x/../healthz/../items",
        "//healthz/../items",
    ] {
        let resp = stack.get(path, &headers).await;
        assert_ne!(resp.status, 200, "{path} bypassed ext_authz: {resp:?}");
    }
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}

/// API server down: 503 from Envoy's error path, never 200 (shared with tests/envoy_http.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_is_503_not_200() {
    let stack = stack().await;
    stack.assert_api_server_down_is_503().await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokengate_down_fails_closed() {
    let mut stack = stack().await;
    stack.assert_tokengate_down_fails_closed().await;
    stack.finish().await;
}
