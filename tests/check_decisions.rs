//! Check over real gRPC against tokengate in-process and the Kubernetes API stand-in: the
//! seeds' scenario (api → data-store via `x-client-id`), allow-lists, expiry, revocation,
//! spoofed identity headers, single-flight and junk-token amplification.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use kube_standin::{Fault, MintRequest, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_scenario_api_to_data_store() {
    let h = Harness::start().await;

    // No token: 401 with the Bearer challenge.
    let r = h.check_ok(data_store(&[])).await;
    assert_eq!(denied_status(&r), Some(401));
    assert_eq!(reason(&r).as_deref(), Some("missing_token"));
    assert_eq!(
        denied_header(&r, "www-authenticate").as_deref(),
        Some(r#"Bearer realm="tokengate""#)
    );
    assert_eq!(r.status.as_ref().unwrap().code, 16);

    // The seeds' dummy token: 403, and no TokenReview spent on it.
    let before = h.world.standin.token_reviews_served();
    let r = h.check_ok(data_store(&[("x-client-id", "dummy")])).await;
    assert_eq!(denied_status(&r), Some(403));
    assert_eq!(reason(&r).as_deref(), Some("malformed_token"));
    let body: serde_json::Value = serde_json::from_str(denied_body(&r).unwrap()).unwrap();
    assert_eq!(body["reason"], "malformed_token");
    assert!(body["error"].as_str().is_some_and(|e| !e.contains("dummy")));
    assert_eq!(h.world.standin.token_reviews_served(), before);

    // A valid data-store token: allowed, with identity headers.
    let token = h.world.api_token(AUD);
    let before = h.world.standin.token_reviews_served();
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
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
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);

    // Same token again: from the cache.
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    allowed_headers(&r);
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);

    // Authorization: Bearer works too, scheme case-insensitive.
    let r = h
        .check_ok(data_store(&[("authorization", &format!("bearer {token}"))]))
        .await;
    allowed_headers(&r);

    // A token for the vault audience: 403, refused before TokenReview.
    let vault = h.world.api_token("vault");
    let before = h.world.standin.token_reviews_served();
    let r = h.check_ok(data_store(&[("x-client-id", &vault)])).await;
    assert_eq!(denied_status(&r), Some(403));
    assert_eq!(reason(&r).as_deref(), Some("wrong_audience"));
    assert_eq!(h.world.standin.token_reviews_served(), before);

    // No route for this request: fail closed.
    let r = h
        .check_ok(request("elsewhere", "/", &[("x-client-id", &token)], &[]))
        .await;
    assert_eq!(reason(&r).as_deref(), Some("no_route"));
    assert_eq!(denied_status(&r), Some(403));

    // Metrics reflect the decisions.
    let (status, metrics) = h.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            r#"tokengate_decisions_total{route="data-store",outcome="allow",reason="ok"} 3"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"tokengate_decisions_total{route="data-store",outcome="deny",reason="missing_token"} 1"#
    ));
    assert!(
        metrics.contains("tokengate_cache_hits_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains("tokengate_check_duration_seconds_count"));
    assert!(metrics.contains("tokengate_tokenreview_duration_seconds_count 1"));
    assert_eq!(h.admin_get("/healthz").await.0, 200);
    assert_eq!(h.admin_get("/readyz").await.0, 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_and_invalid_token_status_401() {
    let h = Harness::start().await;
    let strict = |headers: &[(&str, &str)]| request("strict.data-store", "/", headers, &[]);

    // api/api is on the list; the token header is stripped before the upstream.
    let api = h.world.api_token(AUD);
    let r = h.check_ok(strict(&[("x-client-id", &api)])).await;
    allowed_headers(&r);
    assert!(removed_headers(&r).contains(&"x-client-id".to_string()));

    // default/intruder is a valid service account but not on the list.
    let intruder = h.world.token("default", "intruder", AUD);
    let r = h.check_ok(strict(&[("x-client-id", &intruder)])).await;
    assert_eq!(denied_status(&r), Some(403));
    assert_eq!(reason(&r).as_deref(), Some("not_allowed"));
    // ... while the open route admits it.
    let r = h.check_ok(data_store(&[("x-client-id", &intruder)])).await;
    allowed_headers(&r);

    // The strict route answers invalid tokens with 401 + error="invalid_token".
    let r = h.check_ok(strict(&[("x-client-id", "dummy")])).await;
    assert_eq!(denied_status(&r), Some(401));
    assert_eq!(
        denied_header(&r, "www-authenticate").as_deref(),
        Some(r#"Bearer realm="tokengate", error="invalid_token""#)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_refused_without_token_review() {
    let s = world_with(Options {
        enforce_min_expiration: false,
        ..Options::default()
    })
    .await;
    let yaml = config(&s.standin.kubeconfig_path(), "");
    let h = Harness::start_with(s, &yaml).await;
    let token = h.world.mint(
        MintRequest::new("api", "api")
            .audience(AUD)
            .pod("api-0")
            .issued_at(unix_now() - 7200)
            .expires_in(600),
    );
    let before = h.world.standin.token_reviews_served();
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    assert_eq!(denied_status(&r), Some(403));
    assert_eq!(reason(&r).as_deref(), Some("token_expired"));
    assert_eq!(h.world.standin.token_reviews_served(), before);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pod_is_refused_once_the_cache_allows() {
    // No positive caching, so the pod's deletion is seen at the next Check.
    let s = world().await;
    let yaml = config(
        &s.standin.kubeconfig_path(),
        "cache:\n  ttl: 0s\n  negative_ttl: 5s\n",
    );
    let h = Harness::start_with(s, &yaml).await;
    let token = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &token)])).await);
    h.world.standin.delete_pod("api", "api-0");
    let before = h.world.standin.token_reviews_served();
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    assert_eq!(denied_status(&r), Some(403));
    assert_eq!(reason(&r).as_deref(), Some("token_rejected"));
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);
    // The refusal is cached (negative_ttl): no second TokenReview.
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    assert_eq!(reason(&r).as_deref(), Some("token_rejected"));
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);

    // A deleted service account likewise.
    let intruder = h.world.token("default", "intruder", AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &intruder)])).await);
    h.world
        .standin
        .delete_service_account("default", "intruder");
    let r = h.check_ok(data_store(&[("x-client-id", &intruder)])).await;
    assert_eq!(reason(&r).as_deref(), Some("token_rejected"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_are_overwritten_or_removed() {
    let h = Harness::start().await;
    // A token not bound to a pod: the pod headers do not apply and must be removed.
    let token = h.world.token("api", "api", AUD);
    let spoofed = [
        ("x-client-id", token.as_str()),
        ("x-k8s-sa-user", "system:serviceaccount:kube-system:admin"),
        ("x-k8s-sa-namespace", "kube-system"),
        ("x-k8s-sa-name", "admin"),
        ("x-k8s-sa-groups", "system:masters"),
        ("x-k8s-pod-name", "evil"),
        ("x-k8s-pod-uid", "evil-uid"),
    ];
    let r = h.check_ok(data_store(&spoofed)).await;
    let headers = allowed_headers(&r);
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(
        get("x-k8s-sa-user").as_deref(),
        Some("system:serviceaccount:api:api")
    );
    assert_eq!(get("x-k8s-sa-namespace").as_deref(), Some("api"));
    assert_eq!(get("x-k8s-sa-name").as_deref(), Some("api"));
    assert!(!get("x-k8s-sa-groups").unwrap().contains("system:masters"));
    let removed = removed_headers(&r);
    assert!(
        removed.contains(&"x-k8s-pod-name".to_string()),
        "{removed:?}"
    );
    assert!(
        removed.contains(&"x-k8s-pod-uid".to_string()),
        "{removed:?}"
    );
    // Never both set and removed.
    for (name, _) in &headers {
        assert!(!removed.contains(name), "{name} both set and removed");
    }
    // Every identity header overwrites on every Envoy version.
    let set = &ok_response(&r).headers;
    assert_eq!(set.len(), 5, "the five service-account headers: {set:?}");
    for h in set {
        #[allow(deprecated)]
        let append = h.append.as_ref().map(|b| b.value);
        assert_eq!(append, Some(false), "{h:?}");
        assert_eq!(h.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD: {h:?}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_checks_share_one_token_review() {
    // A generous timeout: a retry would be a second TokenReview.
    let h = Harness::start_with_timeout("5s").await;
    let token = h.world.api_token(AUD);
    // Slow the API server down so all 50 Checks are in flight together.
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_millis(200)));
    let before = h.world.standin.token_reviews_served();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut client = h.client.clone();
        let req = data_store(&[("x-client-id", &token)]);
        tasks.push(tokio::spawn(async move { client.check(req).await }));
    }
    for t in tasks {
        let r = t.await.unwrap().expect("Check").into_inner();
        allowed_headers(&r);
    }
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tokens_cause_no_token_review() {
    let h = Harness::start().await;
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    // The API server's kid shape (43 base64url characters), so only the signature is wrong.
    let header = b64(r#"{"alg":"RS256","kid":"Yq2mQ3rD0-1x_ZsQe9sYv7u0pKqL6m7hR1cX2wY3z4A"}"#);
    let junk = [
        "dummy".to_string(),
        "a.b.c".to_string(),
        "....".to_string(),
        format!("{header}.{}.sig", b64("not json")),
        format!("{header}.{}.sig", b64(r#"{"aud":["vault"]}"#)),
        format!(
            "{header}.{}.sig",
            b64(&format!(
                r#"{{"aud":["data-store"],"exp":{}}}"#,
                unix_now() - 3600
            ))
        ),
        format!("{header}.{}.sig", "A".repeat(20_000)),
        "Bearer x".to_string(),
    ];
    let before = h.world.standin.token_reviews_served();
    for (i, t) in junk.iter().enumerate() {
        let r = h.check_ok(data_store(&[("x-client-id", t)])).await;
        assert_eq!(denied_status(&r), Some(403), "junk #{i}");
    }
    // Empty and duplicated token headers.
    let r = h
        .check_ok(data_store(&[("authorization", "Bearer ")]))
        .await;
    assert_eq!(reason(&r).as_deref(), Some("malformed_token"));
    let r = h
        .check_ok(data_store(&[(
            "authorization",
            "Bearer a.b.c, Bearer d.e.f",
        )]))
        .await;
    assert_eq!(reason(&r).as_deref(), Some("malformed_token"));
    assert_eq!(h.world.standin.token_reviews_served(), before);

    // A well-formed token signed by nobody the API server trusts does cost one review,
    // then is remembered briefly.
    let forged = format!(
        "{header}.{}.{}",
        b64(&format!(
            r#"{{"aud":["data-store"],"exp":{},"iss":"https://kubernetes.default.svc.cluster.local","sub":"system:serviceaccount:api:api"}}"#,
            unix_now() + 600
        )),
        URL_SAFE_NO_PAD.encode([7u8; 256])
    );
    for _ in 0..3 {
        let r = h.check_ok(data_store(&[("x-client-id", &forged)])).await;
        assert_eq!(reason(&r).as_deref(), Some("token_rejected"));
    }
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_secret_token_is_reviewed() {
    // Legacy tokens carry the API audiences implicitly: give the route one.
    let s = world().await;
    let yaml = config(&s.standin.kubeconfig_path(), "").replace(
        "    audiences: [data-store]\n  - name: data-store-strict",
        "    audiences: [data-store, \"https://kubernetes.default.svc.cluster.local\"]\n  - name: data-store-strict",
    );
    let h = Harness::start_with(s, &yaml).await;
    let token = h
        .world
        .standin
        .mint_legacy("api", "api", "api-token")
        .unwrap();
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    let headers = allowed_headers(&r);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "x-k8s-sa-user" && v == "system:serviceaccount:api:api"));
    assert!(removed_headers(&r).contains(&"x-k8s-pod-name".to_string()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_not_ready_and_drains_in_flight_checks() {
    let mut h = Harness::start_with_timeout("5s").await;
    assert_eq!(h.admin_get("/readyz").await.0, 200);
    let token = h.world.api_token(AUD);
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_millis(200)));
    let before = h.world.standin.token_reviews_served();
    let mut client = h.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .check(data_store(&[("x-client-id", &token)]))
            .await
            .map(|r| r.into_inner())
    });
    // Wait until the Check is inside TokenReview.
    tokio::time::timeout(Duration::from_secs(10), async {
        while h.world.standin.token_reviews_served() == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the Check did not reach TokenReview within 10 s");
    h.gate.begin_shutdown();
    let mut not_ready = false;
    for _ in 0..100 {
        if h.admin_get("/readyz").await.0 == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(not_ready, "/readyz stayed 200 after shutdown began");
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight Check was cut off");
    allowed_headers(&r);
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_abandoned_by_envoy_still_caches_its_token_review() {
    let h = Harness::start_with_timeout("5s").await;
    let token = h.world.api_token(AUD);
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_millis(400)));
    let before = h.world.standin.token_reviews_served();
    // Envoy's ext_authz timeout fires while TokenReview is slow: the Check is cancelled.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        h.check(data_store(&[("x-client-id", &token)])),
    )
    .await;
    assert!(abandoned.is_err(), "the Check should still be waiting");
    // The client's retry joins the TokenReview already under way instead of starting one.
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    allowed_headers(&r);
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}
