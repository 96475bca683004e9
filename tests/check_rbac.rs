//! `allow.rbac`: a SubjectAccessReview per route, answered by the stand-in's RBAC authorizer
//! from Roles and bindings that kubectl creates and deletes through the API, as on a real
//! cluster. Grants take effect, removed bindings are refused once the cached answer expires,
//! denials are cached, the verb follows the HTTP method, the static lists narrow first, and
//! an API server that cannot answer is UNAVAILABLE, never an allow (after the retry rules
//! TokenReviews follow too).

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use kube_standin::Fault;

const CONFIG: &str = r#"
kubernetes:
  timeout: 1s
  retries: 1
token_sources:
  - header: x-client-id
routes:
  - name: proxy
    match:
      context_extensions: {route: proxy}
    audiences: [data-store]
    allow:
      namespaces: [api]
      rbac:
        verb: from_method
        resource: {resource: services, subresource: proxy, name: data-store, namespace: data-store}
  - name: paths
    match:
      context_extensions: {route: paths}
    audiences: [data-store]
    allow:
      rbac: {verb: get, non_resource_path: request}
cache:
  rbac_ttl: 2s
  rbac_denied_ttl: 2s
"#;

const ROLE: &str = r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: data-store-proxy, namespace: data-store}
rules:
- apiGroups: [""]
  resources: [services/proxy]
  resourceNames: [data-store]
  verbs: [get]
"#;

async fn start() -> Harness {
    let world = world().await;
    let yaml = with_kubeconfig(CONFIG, &world.standin.kubeconfig_path()).unwrap();
    Harness::start_with(world, &yaml).await
}

fn req(route: &str, method: &str, path: &str, token: &str) -> CheckRequest {
    let mut r = request(
        "data-store:8080",
        path,
        &[("x-client-id", token)],
        &[("route", route)],
    );
    if let Some(http) = r
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.method = method.into();
    }
    r
}

/// The reason of a Check that must answer (allow: `None`).
async fn answer(h: &Harness, r: CheckRequest) -> Option<String> {
    reason(&h.check_ok(r).await)
}

/// Checks until the answer is `want` (each Check may be a cache hit), at most 30 s; returns
/// how many SubjectAccessReviews the stand-in saw meanwhile.
async fn until(h: &Harness, r: impl Fn() -> CheckRequest, want: Option<&str>) -> u64 {
    let before = h.world.standin.subject_access_reviews_served();
    for _ in 0..300 {
        if answer(h, r()).await.as_deref() == want {
            return h.world.standin.subject_access_reviews_served() - before;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the answer never became {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rolebinding_grants_and_its_deletion_refuses_after_the_ttl() {
    let h = start().await;
    let admin = h.world.standin.admin_kubeconfig_path();
    let token = h.world.api_token(AUD);
    let get = || req("proxy", "GET", "/items", &token);

    // No binding yet: RBAC denies (403 rbac_denied), and the denial is cached.
    let sars = h.world.standin.subject_access_reviews_served();
    let r = h.check_ok(get()).await;
    assert_eq!(reason(&r).as_deref(), Some("rbac_denied"));
    assert_eq!(denied_status(&r), Some(403));
    assert_eq!(h.world.standin.subject_access_reviews_served(), sars + 1);
    assert_eq!(answer(&h, get()).await.as_deref(), Some("rbac_denied"));
    assert_eq!(
        h.world.standin.subject_access_reviews_served(),
        sars + 1,
        "the second denial came from the cache"
    );

    // The grant: a Role and `kubectl create rolebinding` to the service account.
    kubectl(&admin, &["create"], Some(ROLE)).await;
    kubectl(
        &admin,
        &[
            "create",
            "rolebinding",
            "api-proxy",
            "-n",
            "data-store",
            "--role=data-store-proxy",
            "--serviceaccount=api:api",
        ],
        None,
    )
    .await;
    until(&h, get, None).await;
    let r = h.check_ok(get()).await;
    let mut headers = allowed_headers(&r);
    headers.sort();
    let mut expected: Vec<(String, String)> = h
        .world
        .api_identity()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    expected.sort();
    assert_eq!(headers, expected);

    // Verb from the method: the Role grants `get` only (GET and HEAD), not create/delete.
    assert_eq!(
        answer(&h, req("proxy", "HEAD", "/items", &token)).await,
        None
    );
    for method in ["POST", "DELETE", "PUT", "PATCH", "OPTIONS"] {
        assert_eq!(
            answer(&h, req("proxy", method, "/items", &token))
                .await
                .as_deref(),
            Some("rbac_denied"),
            "{method}"
        );
    }

    // `kubectl delete rolebinding`: refused once the cached allow expires, by the one new
    // SubjectAccessReview made then (the Checks before it were cache hits).
    kubectl(
        &admin,
        &["delete", "rolebinding", "api-proxy", "-n", "data-store"],
        None,
    )
    .await;
    let reviews = until(&h, get, Some("rbac_denied")).await;
    assert_eq!(
        reviews, 1,
        "allowed from the cache until the TTL, then one review"
    );

    let (_, metrics) = h.admin_get("/metrics").await;
    for line in [
        r#"tokengate_decisions_total{route="proxy",outcome="deny",reason="rbac_denied"}"#,
        r#"tokengate_subjectaccessreviews_total{allowed="true"}"#,
        r#"tokengate_subjectaccessreviews_total{allowed="false"}"#,
        "tokengate_rbac_cache_hits_total",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_lists_narrow_first_and_paths_follow_the_request() {
    let h = start().await;
    let admin = h.world.standin.admin_kubeconfig_path();
    // Every service account may use the proxy; GET on /data/* for namespace api's.
    kubectl(
        &admin,
        &["create"],
        Some(&ROLE.replace("verbs: [get]", "verbs: [\"*\"]")),
    )
    .await;
    kubectl(
        &admin,
        &[
            "create",
            "rolebinding",
            "all-proxy",
            "-n",
            "data-store",
            "--role=data-store-proxy",
            "--group=system:serviceaccounts",
        ],
        None,
    )
    .await;
    kubectl(
        &admin,
        &[
            "create",
            "clusterrole",
            "data-reader",
            "--verb=get",
            "--non-resource-url=/data/*",
        ],
        None,
    )
    .await;
    kubectl(
        &admin,
        &[
            "create",
            "clusterrolebinding",
            "api-data",
            "--clusterrole=data-reader",
            "--group=system:serviceaccounts:api",
        ],
        None,
    )
    .await;

    let api = h.world.api_token(AUD);
    let intruder = h.world.token("default", "intruder", AUD);
    assert_eq!(answer(&h, req("proxy", "POST", "/x", &api)).await, None);
    // RBAC would allow the intruder, but `namespaces: [api]` refuses it first, without a review.
    let sars = h.world.standin.subject_access_reviews_served();
    assert_eq!(
        answer(&h, req("proxy", "GET", "/x", &intruder))
            .await
            .as_deref(),
        Some("not_allowed")
    );
    assert_eq!(h.world.standin.subject_access_reviews_served(), sars);

    // Non-resource path from the request (canonical: slashes merged, dot segments removed).
    assert_eq!(answer(&h, req("paths", "GET", "/data/a", &api)).await, None);
    assert_eq!(
        answer(&h, req("paths", "POST", "//data/./b", &api)).await,
        None,
        "fixed verb get"
    );
    assert_eq!(
        answer(&h, req("paths", "GET", "/data/../other", &api))
            .await
            .as_deref(),
        Some("rbac_denied")
    );
    assert_eq!(
        answer(&h, req("paths", "GET", "/data/a", &intruder))
            .await
            .as_deref(),
        Some("rbac_denied"),
        "no static lists: RBAC alone decides"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_trouble_is_unavailable_never_an_allow() {
    let h = start().await;
    let admin = h.world.standin.admin_kubeconfig_path();
    kubectl(
        &admin,
        &[
            "create",
            "clusterrole",
            "data-reader",
            "--verb=get",
            "--non-resource-url=/data/*",
        ],
        None,
    )
    .await;
    kubectl(
        &admin,
        &[
            "create",
            "clusterrolebinding",
            "api-data",
            "--clusterrole=data-reader",
            "--serviceaccount=api:api",
        ],
        None,
    )
    .await;
    let api = h.world.api_token(AUD);
    // The token's verdict is cached; the next paths need new reviews.
    assert_eq!(answer(&h, req("paths", "GET", "/data/0", &api)).await, None);

    for (i, fault) in [
        Fault::Status {
            code: 503,
            retry_after: None,
        },
        Fault::Status {
            code: 429,
            retry_after: None,
        },
        Fault::Hang,
        Fault::CloseConnection,
    ]
    .into_iter()
    .enumerate()
    {
        h.world.standin.set_fault(fault.clone());
        match h
            .check(req("paths", "GET", &format!("/data/{}", i + 1), &api))
            .await
        {
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{fault:?}: {s:?}"),
            Ok(r) => panic!("{fault:?}: expected UNAVAILABLE, got {r:?}"),
        }
    }
    // Errors are not cached: the same request is allowed once the API server answers.
    h.world.standin.set_fault(Fault::None);
    assert_eq!(answer(&h, req("paths", "GET", "/data/1", &api)).await, None);

    // tokengate's own RBAC no longer lets it create SubjectAccessReviews: UNAVAILABLE too.
    h.world
        .standin
        .delete_cluster_role_binding("tokengate-auth-delegator");
    match h.check(req("paths", "GET", "/data/9", &api)).await {
        Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        Ok(r) => panic!("expected UNAVAILABLE, got {r:?}"),
    }
    let (_, metrics) = h.admin_get("/metrics").await;
    for line in [
        r#"tokengate_subjectaccessreview_errors_total{kind="server_error"}"#,
        r#"tokengate_subjectaccessreview_errors_total{kind="forbidden"}"#,
        r#"tokengate_decisions_total{route="paths",outcome="error",reason="api_unavailable"} 5"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_review() {
    let h = start().await;
    let api = h.world.api_token(AUD);
    // The token's verdict first, so that only the SubjectAccessReview is missing.
    assert_eq!(
        answer(&h, req("paths", "GET", "/warm", &api))
            .await
            .as_deref(),
        Some("rbac_denied")
    );
    let before = h.world.standin.subject_access_reviews_served();
    let checks: Vec<_> = (0..32)
        .map(|_| h.check(req("paths", "GET", "/same", &api)))
        .collect();
    for r in futures::future::join_all(checks).await {
        assert_eq!(reason(&r.unwrap()).as_deref(), Some("rbac_denied"));
    }
    assert_eq!(h.world.standin.subject_access_reviews_served(), before + 1);
    h.stop().await;
}

/// `verification: local`: the identity comes from the token and the watches, not TokenReview,
/// and RBAC still decides, for the same user (UID, groups and `extra` as TokenReview has them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_verification_routes_ask_rbac_too() {
    let world = world().await;
    world.standin.grant_reviewer_watch();
    let yaml = with_kubeconfig(
        &CONFIG.replace(
            "    allow:\n      namespaces: [api]",
            "    verification: local\n    allow:\n      namespaces: [api]",
        ),
        &world.standin.kubeconfig_path(),
    )
    .unwrap();
    assert!(yaml.contains("verification: local"));
    let h = Harness::start_with(world, &yaml).await;
    for _ in 0..300 {
        if h.admin_get("/readyz").await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.admin_get("/readyz").await.0, 200, "watches never synced");
    let admin = h.world.standin.admin_kubeconfig_path();
    kubectl(&admin, &["create"], Some(ROLE)).await;
    let token = h.world.api_token(AUD);
    let get = || req("proxy", "GET", "/items", &token);
    let reviews = h.world.standin.token_reviews_served();
    assert_eq!(answer(&h, get()).await.as_deref(), Some("rbac_denied"));
    kubectl(
        &admin,
        &[
            "create",
            "rolebinding",
            "api-proxy",
            "-n",
            "data-store",
            "--role=data-store-proxy",
            "--user=system:serviceaccount:api:api",
        ],
        None,
    )
    .await;
    until(&h, get, None).await;
    assert_eq!(
        h.world.standin.token_reviews_served(),
        reviews,
        "verified locally, no TokenReview"
    );
    h.stop().await;
}

/// SubjectAccessReviews go through the same retry rules as TokenReviews (`retries`, the retry
/// budget, `Retry-After` honoured or no retry at all), counted under their own metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_reviews_follow_the_shared_retry_rules() {
    let h = start().await;
    let api = h.world.api_token(AUD);
    // The token's verdict first, so that only SubjectAccessReviews meet the faults.
    assert_eq!(
        answer(&h, req("paths", "GET", "/warm", &api))
            .await
            .as_deref(),
        Some("rbac_denied")
    );
    let unavailable = |r: Result<_, tonic::Status>, what: &str| match r {
        Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{what}: {s:?}"),
        Ok(r) => panic!("{what}: expected UNAVAILABLE, got {r:?}"),
    };

    // Asked to come back in 30 s, longer than an attempt may take (1 s): no retry.
    h.world.standin.set_fault(Fault::Status {
        code: 503,
        retry_after: Some(30),
    });
    let before = h.world.standin.subject_access_reviews_served();
    unavailable(
        h.check(req("paths", "GET", "/a", &api)).await,
        "retry-after",
    );
    assert_eq!(h.world.standin.subject_access_reviews_served(), before + 1);

    // No Retry-After: one retry (retries: 1), after a jittered backoff.
    h.world.standin.set_fault(Fault::Status {
        code: 503,
        retry_after: None,
    });
    let before = h.world.standin.subject_access_reviews_served();
    unavailable(h.check(req("paths", "GET", "/b", &api)).await, "503");
    assert_eq!(h.world.standin.subject_access_reviews_served(), before + 2);
    h.world.standin.set_fault(Fault::None);

    let (_, metrics) = h.admin_get("/metrics").await;
    for line in [
        r#"tokengate_subjectaccessreview_retries_total{outcome="retry_after_too_long"} 1"#,
        r#"tokengate_subjectaccessreview_retries_total{outcome="sent"} 1"#,
        r#"tokengate_subjectaccessreview_shed_total{reason="queue_full"} 0"#,
        // TokenReview's own counters are untouched.
        r#"tokengate_tokenreview_retries_total{outcome="retry_after_too_long"} 0"#,
        r#"tokengate_tokenreview_retries_total{outcome="sent"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    h.stop().await;
}
