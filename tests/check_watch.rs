//! Watch-driven revocation and `verification: local`, over gRPC against the API stand-in:
//! a cached verdict dies with its pod, local mode admits without a TokenReview and refuses
//! what the API server would, and `/readyz` waits for the first lists.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kube_standin::MintRequest;

/// [`BASE_CONFIG`] with a long cache TTL (so only revocation can end a verdict early) and
/// `extra` added to the `kubernetes:` block.
fn config_with(world: &World, kubernetes_extra: &str) -> String {
    config(&world.standin.kubeconfig_path(), "cache: {ttl: 10m}")
        .replace("kubernetes:\n", &format!("kubernetes:\n{kubernetes_extra}"))
}

async fn wait_ready(h: &Harness) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while h.admin_get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "/readyz never became 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric line starting with {line_start:?} in:\n{text}"))
}

/// Checks `token` until it is denied; panics after `within`.
async fn denied_within(h: &Harness, token: &str, within: Duration) -> (Duration, String) {
    let started = Instant::now();
    loop {
        let r = h.check_ok(data_store(&[("x-client-id", token)])).await;
        if let Some(reason) = reason(&r) {
            return (started.elapsed(), reason);
        }
        assert!(
            started.elapsed() < within,
            "still allowed {within:?} after the deletion"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_deleted_pod_revokes_its_cached_verdict_in_tokenreview_mode() {
    let world = world().await;
    world.standin.grant_reviewer_watch();
    let yaml = config_with(&world, "  watch: true\n");
    let h = Harness::start_with(world, &yaml).await;
    wait_ready(&h).await;

    h.world.standin.create_pod("api", "api-1", "api", None);
    let token = h
        .world
        .mint(MintRequest::new("api", "api").audience(AUD).pod("api-1"));
    let first = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    ok_response(&first);
    let reviews = h.world.standin.token_reviews_served();
    ok_response(&h.check_ok(data_store(&[("x-client-id", &token)])).await);
    assert_eq!(
        h.world.standin.token_reviews_served(),
        reviews,
        "the second Check must be a cache hit"
    );

    h.world.standin.delete_pod("api", "api-1");
    let (after, why) = denied_within(&h, &token, Duration::from_secs(5)).await;
    assert_eq!(why, "token_rejected", "after {after:?}");
    let (_, metrics) = h.admin_get("/metrics").await;
    assert_eq!(
        metric(&metrics, r#"tokengate_revocations_total{cause="pod"} "#),
        1.0
    );
    // The caller whose pod still exists is untouched.
    let api = h.world.api_token(AUD);
    ok_response(&h.check_ok(data_store(&[("x-client-id", &api)])).await);
    h.stop().await;
}

#[tokio::test]
async fn local_mode_admits_without_tokenreview_and_refuses_what_the_api_server_would() {
    let world = world().await;
    world.standin.grant_reviewer_watch();
    let yaml = config_with(&world, "  verification: local\n");
    let h = Harness::start_with(world, &yaml).await;
    wait_ready(&h).await;
    let reviews = h.world.standin.token_reviews_served();

    // A valid pod-bound token: the same identity headers as TokenReview mode gives.
    let api = h.world.api_token(AUD);
    let r = h.check_ok(data_store(&[("x-client-id", &api)])).await;
    let mut got = allowed_headers(&r);
    got.sort();
    let mut want: Vec<(String, String)> = h
        .world
        .api_identity()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    want.sort();
    assert_eq!(got, want);

    // Another audience: refused as in TokenReview mode.
    let vault = h.world.api_token("vault");
    let r = h.check_ok(data_store(&[("x-client-id", &vault)])).await;
    assert_eq!(reason(&r).as_deref(), Some("wrong_audience"));
    assert_eq!(
        h.world.standin.token_reviews_served(),
        reviews,
        "local mode sent TokenReviews for tokens it can judge"
    );

    // A pod deleted before its token was ever seen: refused locally.
    h.world.standin.create_pod("api", "api-2", "api", None);
    let orphan = h
        .world
        .mint(MintRequest::new("api", "api").audience(AUD).pod("api-2"));
    h.world.standin.delete_pod("api", "api-2");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = h.check_ok(data_store(&[("x-client-id", &orphan)])).await;
        match reason(&r) {
            Some(why) => {
                assert_eq!(why, "token_rejected");
                break;
            }
            // The deletion had not reached the watch yet (the pod was unknown, TokenReview
            // admitted it); the next hit revokes it.
            None => assert!(Instant::now() < deadline, "deleted pod still admitted"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A cached caller is revoked when its pod goes.
    h.world.standin.create_pod("api", "api-3", "api", None);
    let doomed = h
        .world
        .mint(MintRequest::new("api", "api").audience(AUD).pod("api-3"));
    let deadline = Instant::now() + Duration::from_secs(5);
    // The new pod must reach the watch cache before local mode can vouch for it.
    while reason(&h.check_ok(data_store(&[("x-client-id", &doomed)])).await).is_some() {
        assert!(Instant::now() < deadline, "new pod never admitted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.world.standin.delete_pod("api", "api-3");
    let (_, why) = denied_within(&h, &doomed, Duration::from_secs(5)).await;
    assert_eq!(why, "token_rejected");
    let (_, metrics) = h.admin_get("/metrics").await;
    assert!(metric(&metrics, "tokengate_jwks_keys ") >= 0.0);
    h.stop().await;
}

#[tokio::test]
async fn readyz_waits_for_the_first_lists_and_checks_still_work_without_them() {
    // No list/watch grant: the watches are refused (403) and never list.
    let world = world().await;
    let yaml = config_with(&world, "  watch: true\n");
    let h = Harness::start_with(world, &yaml).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.admin_get("/readyz").await.0, 503);
    // TokenReview mode does not depend on the watches: a valid caller still gets in.
    let api = h.world.api_token(AUD);
    ok_response(&h.check_ok(data_store(&[("x-client-id", &api)])).await);
    h.stop().await;
}
