//! End to end through a real Envoy running the published `envoy/sidecar.yaml`, with tokengate
//! (`envoy/tokengate-sidecar.yaml`) and the Kubernetes API stand-in: the seeds' scenario and
//! the ways it must not break open (spoofed identity headers, the ext_authz-disabled route,
//! path tricks, API server down, tokengate down).

mod common;

use common::envoy::{assert_api_identity, assert_identity, echo_of, with_spoofed, Stack};
use kube_standin::Fault;

const ENVOY: &str = "envoy/sidecar.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar.yaml";
const HOST: (&str, &str) = ("host", "data-store");

async fn stack() -> Stack {
    Stack::start(ENVOY, TOKENGATE)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"))
}

/// GET /items with `headers` is denied with 403 and never reaches the upstream.
async fn assert_forbidden(stack: &Stack, headers: &[(&str, &str)]) {
    let resp = stack.get("/items", headers).await;
    assert_eq!(resp.status, 403, "{headers:?}: {resp:?}");
    assert_eq!(
        stack.echo.requests_seen(),
        0,
        "{headers:?} reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_401_with_www_authenticate() {
    let stack = stack().await;
    let resp = stack.get("/items", &[HOST]).await;
    assert_eq!(resp.status, 401, "{resp:?}");
    let challenge = resp
        .header("www-authenticate")
        .expect("401 without WWW-Authenticate");
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert!(resp.header("x-tokengate-reason").is_some(), "{resp:?}");
    assert_eq!(
        stack.echo.requests_seen(),
        0,
        "a denied request reached the upstream"
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dummy_token_is_403() {
    let stack = stack().await;
    assert_forbidden(&stack, &[HOST, ("x-client-id", "dummy")]).await;
    assert_forbidden(&stack, &[HOST, ("authorization", "Bearer dummy")]).await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_another_audience_is_403() {
    let stack = stack().await;
    let vault = stack.world.api_token("vault");
    assert_forbidden(&stack, &[HOST, ("x-client-id", &vault)]).await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_not_allowed_is_403() {
    let stack = stack().await;
    // Valid token, right audience, but the data-store route allows only api/api.
    let intruder = stack.world.token("default", "intruder", "data-store");
    assert_forbidden(&stack, &[HOST, ("x-client-id", &intruder)]).await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_x_client_id_reaches_upstream_with_one_true_identity() {
    let stack = stack().await;
    let token = stack.world.api_token("data-store");
    let headers = with_spoofed(&[HOST, ("x-client-id", &token)]);
    let resp = stack.get("/items?id=7", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", stack.envoy.diagnostics());
    let echo = echo_of(&resp);
    assert_eq!(echo.path, "/items?id=7");
    assert_eq!(
        echo.message,
        "authenticated as system:serviceaccount:api:api"
    );
    assert_api_identity(&echo, &stack.world);
    // strip_token: true on this route: the data-store never sees the caller's token.
    assert!(
        !echo.has("x-client-id"),
        "token forwarded: {:?}",
        echo.headers
    );
    assert!(
        echo.headers.iter().all(|(_, v)| !v.contains(&token)),
        "token forwarded in some header: {:?}",
        echo.headers
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_bearer_token_reaches_upstream_and_is_stripped() {
    let stack = stack().await;
    let token = stack.world.api_token("data-store");
    let bearer = format!("Bearer {token}");
    let headers = with_spoofed(&[HOST, ("authorization", &bearer)]);
    let resp = stack.get("/", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_api_identity(&echo, &stack.world);
    assert!(
        !echo.has("authorization"),
        "token forwarded: {:?}",
        echo.headers
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_is_503_not_200() {
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
    // The 503s came from Envoy's error path (gRPC UNAVAILABLE -> status_on_error), which is
    // what failure_mode_allow would act on, not from a tokengate denial.
    let errors = stack.counter("http.ingress.ext_authz.error").await;
    assert_eq!(errors, 2, "ext_authz.error counter");
    let denied = stack.counter("http.ingress.ext_authz.denied").await;
    assert_eq!(denied, 0, "ext_authz.denied counter");

    // Recovery: the same token works once the API server answers again (errors not cached).
    stack.world.standin.set_fault(Fault::None);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokengate_down_fails_closed() {
    let mut stack = stack().await;
    let token = stack.world.api_token("data-store");
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "baseline: {resp:?}");

    stack.stop_tokengate().await;
    let fresh = stack.world.api_token("data-store");
    for t in [&token, &fresh] {
        let resp = stack.get("/items", &[HOST, ("x-client-id", t)]).await;
        assert_eq!(
            resp.status, 503,
            "tokengate down must fail closed: {resp:?}"
        );
    }
    let errors = stack.counter("http.ingress.ext_authz.error").await;
    assert_eq!(errors, 2, "ext_authz.error counter");
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}
