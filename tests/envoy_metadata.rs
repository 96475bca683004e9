//! The identity as Envoy dynamic metadata, used by Envoy itself: the published
//! `envoy/sidecar.yaml` logs the caller (`%DYNAMIC_METADATA(envoy.filters.http.ext_authz:user)%`)
//! in its access log, and a local rate limit keyed on the same metadata (the README's snippet)
//! gives each service account its own bucket.

mod common;

use std::time::{Duration, Instant};

use common::envoy::{echo_of, Stack};

const ENVOY: &str = "envoy/sidecar.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar.yaml";
const HOST: (&str, &str) = ("host", "data-store");

/// Waits (up to 30 s: Envoy flushes its access log on a timer) for an access-log line of
/// Envoy's stdout containing every one of `parts`; returns it.
async fn access_log_line(stack: &Stack, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = stack.envoy.stdout();
        if let Some(line) = out.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no access-log line with {parts:?} in Envoy's stdout:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_names_the_caller() {
    let stack = Stack::start(ENVOY, TOKENGATE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let token = stack.world.api_token("data-store");
    let resp = stack
        .get("/items/logged", &[HOST, ("x-client-id", &token)])
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let line = access_log_line(
        &stack,
        &["/items/logged", "caller=system:serviceaccount:api:api"],
    )
    .await;
    assert!(line.contains("\" 200 "), "{line}");
    // A denial has no identity: the access log says so (`-`), and names the reason.
    let intruder = stack.world.token("default", "intruder", "data-store");
    let resp = stack
        .get("/items/refused", &[HOST, ("x-client-id", &intruder)])
        .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    let line = access_log_line(&stack, &["/items/refused", "reason=not_allowed"]).await;
    assert!(line.contains("caller=- "), "{line}");
    stack.finish().await;
}

/// The route's `typed_per_filter_config` of the README snippet, on
/// `/internal/` (any service account with an `other` token may call it), with a bucket of
/// two requests for `default/intruder` and a large default bucket for everyone else.
const RATE_LIMIT_ROUTE: &str = r#"                route: {cluster: data-store}
                typed_per_filter_config:
                  envoy.filters.http.local_ratelimit:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                    stat_prefix: per_service_account
                    token_bucket: {max_tokens: 1000, tokens_per_fill: 1000, fill_interval: 3600s}
                    filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
                    filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}
                    rate_limits:
                    - actions:
                      - metadata:
                          descriptor_key: service_account
                          metadata_key: {key: envoy.filters.http.ext_authz, path: [{key: user}]}
                          source: DYNAMIC
                    descriptors:
                    - entries: [{key: service_account, value: "system:serviceaccount:default:intruder"}]
                      token_bucket: {max_tokens: 2, tokens_per_fill: 2, fill_interval: 3600s}
"#;
// (The route's existing `typed_per_filter_config` entries, ext_authz's, follow.)

const RATE_LIMIT_FILTER: &str = r#"          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: per_service_account
          - name: envoy.filters.http.router
"#;

/// `envoy/sidecar.yaml` with the local rate limit: the filter after ext_authz, the route
/// settings on `/internal/`.
fn with_rate_limit(yaml: String) -> anyhow::Result<String> {
    let route = "                match: {prefix: /internal/}\n                route: {cluster: data-store}\n                typed_per_filter_config:\n";
    let router = "          - name: envoy.filters.http.router\n";
    anyhow::ensure!(yaml.matches(route).count() == 1, "no /internal/ route");
    anyhow::ensure!(yaml.matches(router).count() == 1, "no router filter");
    Ok(yaml
        .replace(
            route,
            &format!("                match: {{prefix: /internal/}}\n{RATE_LIMIT_ROUTE}"),
        )
        .replace(router, RATE_LIMIT_FILTER))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limit_per_service_account() {
    let stack = Stack::start_edited(ENVOY, TOKENGATE, &with_rate_limit)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let intruder = stack.world.token("default", "intruder", "other");
    let api = stack.world.token("api", "api", "other");
    for i in 0..2 {
        let resp = stack
            .get("/internal/x", &[HOST, ("x-client-id", &intruder)])
            .await;
        assert_eq!(resp.status, 200, "request {i}: {resp:?}");
        assert_eq!(
            echo_of(&resp).values("x-k8s-sa-name"),
            vec!["intruder"],
            "{resp:?}"
        );
    }
    let resp = stack
        .get("/internal/x", &[HOST, ("x-client-id", &intruder)])
        .await;
    assert_eq!(
        resp.status, 429,
        "intruder's bucket should be empty: {resp:?}"
    );
    // Another service account has its own bucket.
    for i in 0..3 {
        let resp = stack
            .get("/internal/x", &[HOST, ("x-client-id", &api)])
            .await;
        assert_eq!(resp.status, 200, "api request {i}: {resp:?}");
        assert_eq!(echo_of(&resp).values("x-k8s-sa-name"), vec!["api"]);
    }
    assert_eq!(
        stack
            .counter("per_service_account.http_local_rate_limit.rate_limited")
            .await,
        1
    );
    stack.finish().await;
}
