//! End to end through a real Envoy running `envoy/istio.yaml`: the ext_authz filter exactly as
//! istiod generates it for an `envoyExtAuthzGrpc` provider (shadow RBAC gating, no
//! context_extensions, no validate_mutations), with tokengate routing on host and path
//! (`envoy/tokengate-istio.yaml`).

mod common;

use common::envoy::{assert_api_identity, assert_identity, echo_of, with_spoofed, Stack};
use kube_standin::Fault;

const ENVOY: &str = "envoy/istio.yaml";
const TOKENGATE: &str = "envoy/tokengate-istio.yaml";
/// What an in-mesh client sends: the Service's FQDN with the port.
const HOST: (&str, &str) = ("host", "data-store.data-store.svc.cluster.local:8080");

async fn stack() -> Stack {
    Stack::start(ENVOY, TOKENGATE)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_scenario_without_context_extensions() {
    let stack = stack().await;

    let resp = stack.get("/", &[HOST]).await;
    assert_eq!(resp.status, 401, "no token: {resp:?}");
    assert!(resp.header("www-authenticate").is_some(), "{resp:?}");

    let resp = stack.get("/", &[HOST, ("x-client-id", "dummy")]).await;
    assert_eq!(resp.status, 403, "dummy: {resp:?}");

    let vault = stack.world.api_token("vault");
    let resp = stack.get("/", &[HOST, ("x-client-id", &vault)]).await;
    assert_eq!(resp.status, 403, "audience vault: {resp:?}");
    assert_eq!(stack.echo.requests_seen(), 0);

    let token = stack.world.api_token("data-store");
    let bearer = format!("Bearer {token}");
    for auth in [
        ("x-client-id", token.as_str()),
        ("authorization", bearer.as_str()),
    ] {
        let resp = stack.get("/items", &with_spoofed(&[HOST, auth])).await;
        assert_eq!(resp.status, 200, "{auth:?}: {resp:?}");
        let echo = echo_of(&resp);
        // Without validate_mutations (istiod does not set it) the headers must still be
        // overwritten, never appended.
        assert_api_identity(&echo, &stack.world);
        assert!(
            !echo.has(auth.0),
            "token header not stripped: {:?}",
            echo.headers
        );
    }
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_chosen_by_host_and_path() {
    let stack = stack().await;
    let data_store = stack.world.api_token("data-store");
    let other = stack.world.api_token("other");

    // Every spelling of the data-store host reaches the data-store route.
    for host in [
        "data-store",
        "data-store:8080",
        "data-store.data-store",
        "DATA-STORE.data-store.svc.cluster.local",
    ] {
        let resp = stack
            .get("/items", &[("host", host), ("x-client-id", &data_store)])
            .await;
        assert_eq!(resp.status, 200, "host {host}: {resp:?}");
    }
    // /internal/ on the same host wants audience `other` and keeps the token.
    let resp = stack
        .get("/internal/x", &[HOST, ("x-client-id", &data_store)])
        .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    let resp = stack
        .get("/internal/x", &[HOST, ("x-client-id", &other)])
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(echo_of(&resp).values("x-client-id"), vec![other.as_str()]);

    // A host tokengate has no route for is denied, even with a valid token.
    let before = stack.echo.requests_seen();
    for host in [
        "vault",
        "data-store.evil.example",
        "evil-data-store.data-store.svc.cluster.local",
    ] {
        let resp = stack
            .get("/items", &[("host", host), ("x-client-id", &data_store)])
            .await;
        assert_eq!(resp.status, 403, "host {host}: {resp:?}");
    }
    assert_eq!(stack.echo.requests_seen(), before);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_policy_skip_authz_without_spoofed_identity() {
    let stack = stack().await;
    // The AuthorizationPolicy (shadow RBAC, notPaths [/healthz, /readyz] as istiod emits
    // them: and[not(or[..])]) selects everything but those two paths. In the pre-fix shape
    // and[or[not(..)]] each path is "not the other one", so both would be checked (401).
    for path in ["/healthz", "/readyz"] {
        let resp = stack.get(path, &with_spoofed(&[HOST])).await;
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
        let echo = echo_of(&resp);
        assert_identity(&echo, &[]);
    }
    // And paths like them are still checked.
    for path in [
        "/healthz/../items",
        "/healthz/x",
        "/healthzz",
        "/readyz/../items",
        "/readyzz",
        "//healthz/../items",
    ] {
        let resp = stack.get(path, &[HOST]).await;
        assert_eq!(resp.status, 401, "{path}: {resp:?}");
    }
    assert_eq!(stack.echo.requests_seen(), 2);
    stack.finish().await;
}

/// The doubled-slash spellings of /internal/x. An app that merges slashes serves each of them
/// as /internal/x, so each must get the /internal/ route's decision (audience `other`), never
/// the broad data-store route's.
const DOUBLED_SLASHES: [&str; 3] = ["//internal/x", "/internal//x", "///internal/x"];

/// GET each of [`DOUBLED_SLASHES`] with a token for the broad route (must be 403) and with one
/// for the /internal/ route (must be 200); nothing else reaches the upstream.
async fn assert_doubled_slashes_get_the_internal_decision(stack: &Stack) {
    let data_store = stack.world.api_token("data-store");
    let other = stack.world.api_token("other");
    let before = stack.echo.requests_seen();
    for path in DOUBLED_SLASHES {
        let resp = stack.get(path, &[HOST, ("x-client-id", &data_store)]).await;
        assert_eq!(
            resp.status, 403,
            "{path}: the broad route's token reached /internal/: {resp:?}"
        );
        assert_eq!(
            resp.header("x-tokengate-reason"),
            Some("wrong_audience"),
            "{path}: {resp:?}"
        );
    }
    assert_eq!(stack.echo.requests_seen(), before);
    for path in DOUBLED_SLASHES {
        let resp = stack.get(path, &[HOST, ("x-client-id", &other)]).await;
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubled_slashes_do_not_reach_internal_with_the_broad_token() {
    // As deployed: meshConfig.pathNormalization MERGE_SLASHES, so Envoy merges before the
    // RBAC shadow rules, ext_authz and routing.
    let stack = stack().await;
    assert_doubled_slashes_get_the_internal_decision(&stack).await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubled_slashes_under_istio_default_normalization() {
    // Istio's default (BASE): normalize_path only, so tokengate receives "//internal/x" as is.
    // Its own path matching must not be fooled into the broad route (issue 11; needs the
    // route.rs change: match path prefixes on the path with runs of '/' merged).
    let base = |config: String| -> anyhow::Result<String> {
        const MERGE: &str = "          merge_slashes: true\n";
        anyhow::ensure!(
            config.matches(MERGE).count() == 1,
            "envoy/istio.yaml: expected one `merge_slashes: true`"
        );
        Ok(config.replace(MERGE, ""))
    };
    let stack = Stack::start_edited(ENVOY, TOKENGATE, &base)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"));
    assert_doubled_slashes_get_the_internal_decision(&stack).await;
    stack.finish().await;
}

/// envoy/istio.yaml without the EnvoyFilter's header-stripping filter: what an ambient waypoint
/// runs (EnvoyFilter is not applied there), ext_authz generated by istiod alone.
fn without_strip_filter(config: String) -> anyhow::Result<String> {
    const FIRST: &str =
        "          # Added by deploy/istio/strip-identity-headers.yaml (EnvoyFilter), not by istiod.\n";
    const NEXT: &str = "          # Generated by istiod for the CUSTOM AuthorizationPolicy";
    anyhow::ensure!(config.matches(FIRST).count() == 1, "no strip filter block");
    let start = config.find(FIRST).unwrap();
    let end = start
        + config[start..]
            .find(NEXT)
            .ok_or_else(|| anyhow::anyhow!("no RBAC filter after the strip filter"))?;
    anyhow::ensure!(config[start..end].contains("tokengate.strip-identity-headers"));
    Ok(format!("{}{}", &config[..start], &config[end..]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_requests_never_pass_spoofed_identity_without_the_envoy_filter() {
    // deploy/istio-ambient relies on this: every request goes through tokengate, which
    // overwrites each identity header it has a value for and removes the others.
    let stack = Stack::start_edited(ENVOY, TOKENGATE, &without_strip_filter)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"));
    // The variant is real: on the unchecked path the spoofed headers now pass.
    let resp = stack.get("/healthz", &with_spoofed(&[HOST])).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        !echo_of(&resp).values("x-k8s-sa-user").is_empty(),
        "the strip filter is still there"
    );

    // A pod-bound token: every header overwritten.
    let api = stack.world.api_token("data-store");
    let resp = stack
        .get("/items", &with_spoofed(&[HOST, ("x-client-id", &api)]))
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_api_identity(&echo_of(&resp), &stack.world);
    // No pod binding: the pod headers a client sent must be removed, not left standing.
    let other = stack.world.token("default", "intruder", "other");
    let resp = stack
        .get(
            "/internal/x",
            &with_spoofed(&[HOST, ("x-client-id", &other)]),
        )
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_eq!(
        echo.values("x-k8s-sa-user"),
        vec!["system:serviceaccount:default:intruder"]
    );
    for name in ["x-k8s-pod-name", "x-k8s-pod-uid"] {
        assert!(
            echo.values(name).is_empty(),
            "spoofed {name}: {:?}",
            echo.headers
        );
    }
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_is_503_and_tokengate_down_fails_closed() {
    let mut stack = stack().await;
    let token = stack.world.api_token("data-store");
    stack.world.standin.set_fault(Fault::Down);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 503, "statusOnError: {resp:?}");
    stack.world.standin.set_fault(Fault::None);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "{resp:?}");

    stack.stop_tokengate().await;
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 503, "failOpen false: {resp:?}");
    let errors = stack
        .counter("http.inbound_0.0.0.0_8080.ext_authz.error")
        .await;
    assert_eq!(errors, 2, "both 503s took Envoy's error path");
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}

/// `allow.rbac` behind Istio (`envoy/tokengate-istio-rbac.yaml`, deployed by
/// `deploy/istio-rbac`): the same Envoy, and access granted and taken away with a
/// RoleBinding made by kubectl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_route_follows_kubectl_rolebindings() {
    let stack = Stack::start(ENVOY, "envoy/tokengate-istio-rbac.yaml")
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"));
    let admin = stack.world.standin.admin_kubeconfig_path();
    let token = stack.world.api_token("data-store");
    let headers = [HOST, ("x-client-id", token.as_str())];
    let call = || stack.get("/items", &headers);

    let resp = call().await;
    assert_eq!(resp.status, 403, "no RoleBinding yet: {resp:?}");
    assert_eq!(
        resp.header("x-tokengate-reason"),
        Some("rbac_denied"),
        "{resp:?}"
    );
    assert_eq!(stack.echo.requests_seen(), 0);

    // deploy/istio-rbac's grant, made the kubectl way.
    let role = std::fs::read_to_string(
        testkit::workspace_root().join("deploy/istio-rbac/data-store-access.yaml"),
    )
    .unwrap();
    let role = role.split("\n---\n").next().unwrap().to_owned();
    common::kubectl(&admin, &["create"], Some(&role)).await;
    common::kubectl(
        &admin,
        &[
            "create",
            "rolebinding",
            "data-store-api",
            "-n",
            "data-store",
            "--role=data-store-callers",
            "--serviceaccount=api:api",
        ],
        None,
    )
    .await;
    // The denial is cached for cache.rbac_denied_ttl (5 s): wait it out.
    let mut resp = call().await;
    for _ in 0..200 {
        if resp.status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        resp = call().await;
    }
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_api_identity(&echo_of(&resp), &stack.world);
    stack.finish().await;
}
