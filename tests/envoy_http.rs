//! End to end through a real Envoy speaking the HTTP ext_authz protocol (`http_service`,
//! the published `envoy/sidecar-http.yaml`) to tokengate's HTTP front door
//! (`envoy/tokengate-sidecar-http.yaml`): the same decisions as over gRPC (401 without a token,
//! 403 for bad or wrong-audience tokens, 200 with exactly one true value of each identity
//! header however the client spoofs them, 503 when the API server is down or tokengate is
//! gone), path routing in place of context_extensions, and Envoy's `path_prefix`.

mod common;

use common::envoy::{echo_of, with_spoofed, Stack};
use common::front_door;

const ENVOY: &str = "envoy/sidecar-http.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar-http.yaml";
const HOST: (&str, &str) = ("host", "data-store");

async fn stack() -> Stack {
    Stack::start_http(ENVOY, TOKENGATE)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"))
}

/// The front doors' shared case table (tests/common/front_door.rs): 401/403 with reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_401_or_403_with_the_reason() {
    let stack = stack().await;
    front_door::assert_denials(&stack).await;
    // Envoy passes tokengate's JSON body on to the client.
    let resp = stack.get("/items", &[HOST]).await;
    assert_eq!(resp.json().unwrap()["reason"], "missing_token");
    stack.finish().await;
}

/// The shared table: 200 with one true identity despite spoofing, token stripped (Envoy
/// removes the header tokengate names), in either token header; `path_prefix` /authz stays
/// between Envoy and tokengate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_reaches_upstream_with_one_true_identity_despite_spoofing() {
    let stack = stack().await;
    front_door::assert_allowed_with_true_identity(&stack).await;
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

/// Envoy's HTTP client takes tokengate's 503 as an authorization *error*, like gRPC
/// UNAVAILABLE: status_on_error answers, and failure_mode_allow would be the operator's
/// choice; denials are counted apart (shared with tests/envoy_sidecar.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_is_503_never_200() {
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
