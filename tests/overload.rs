//! Overload control (issue 12 item 2): TokenReview slots shared fairly by downstream peer
//! from a bounded queue that sheds at once; reviews of cancelled Checks dropped; a retry
//! budget; `Retry-After` honoured in both forms. Counts, never timings: the stand-in counts
//! the TokenReviews it serves, tokengate's metrics count what it shed.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use kube_standin::Fault;

/// BASE_CONFIG with these `kubernetes:` settings instead of its own.
fn overload_config(world: &World, kubernetes: &str) -> String {
    config(&world.standin.kubeconfig_path(), "").replace(
        "  timeout: 2s\n  retries: 1\n  max_in_flight: 16\n",
        kubernetes,
    )
}

/// The value of a metric line (`name{labels}` exactly), 0 if absent.
async fn metric(h: &Harness, series: &str) -> f64 {
    let (_, text) = h.admin_get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until a metric reads `want` (polling; the event it waits for is not a timing).
async fn until_metric(h: &Harness, series: &str, want: f64) {
    for _ in 0..1500 {
        if metric(h, series).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{series} never reached {want} (is {})",
        metric(h, series).await
    );
}

fn spawn_check(
    h: &Harness,
    token: &str,
    source: &str,
) -> tokio::task::JoinHandle<Result<CheckResponse, tonic::Status>> {
    let mut client = h.client.clone();
    let req = from_source(data_store(&[("x-client-id", token)]), source);
    tokio::spawn(async move { client.check(req).await.map(|r| r.into_inner()) })
}

/// A Check the client gives up on after `after` (the stream is reset, as Envoy does when its
/// ext_authz timeout fires).
fn spawn_cancelled_check(
    h: &Harness,
    token: &str,
    source: &str,
    after: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut client = h.client.clone();
    let req = from_source(data_store(&[("x-client-id", token)]), source);
    tokio::spawn(async move {
        let r = tokio::time::timeout(after, client.check(req)).await;
        assert!(
            r.is_err(),
            "expected the Check to be cancelled first: {r:?}"
        );
    })
}

const FLOOD: &str = "10.66.0.1";
const LEGIT: &str = "10.1.0.7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_at_once_and_spares_other_peers() {
    let world = world().await;
    let yaml = overload_config(
        &world,
        "  timeout: 20s\n  retries: 0\n  max_in_flight: 1\n  max_queued: 2\n",
    );
    let h = Harness::start_with(world, &yaml).await;
    let tokens: Vec<String> = (0..7).map(|_| h.world.api_token(AUD)).collect();
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_secs(2)));
    let before = h.world.standin.token_reviews_served();

    // The flood's peer takes the one slot and fills the queue.
    let holder = spawn_check(&h, &tokens[0], FLOOD);
    until_metric(&h, "tokengate_tokenreview_in_flight", 1.0).await;
    let mut queued = Vec::new();
    for (i, t) in tokens[1..3].iter().enumerate() {
        queued.push(spawn_check(&h, t, FLOOD));
        until_metric(&h, "tokengate_tokenreview_queued", (i + 1) as f64).await;
    }

    // More from the same peer: UNAVAILABLE at once, while the slot is still taken.
    for t in &tokens[3..6] {
        let r = spawn_check(&h, t, FLOOD).await.unwrap();
        let status = r.expect_err("a full queue must shed");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    assert!(!holder.is_finished(), "shed before the slot came free");
    assert_eq!(
        metric(
            &h,
            r#"tokengate_tokenreview_shed_total{reason="queue_full"}"#
        )
        .await,
        3.0
    );

    // Another peer's new token: the flood's oldest waiter makes room for it, and it is
    // served before the flood's remaining one.
    let legit = spawn_check(&h, &tokens[6], LEGIT);
    until_metric(
        &h,
        r#"tokengate_tokenreview_shed_total{reason="queue_full"}"#,
        4.0,
    )
    .await;
    allowed_headers(&holder.await.unwrap().expect("the slot holder is served"));
    allowed_headers(&legit.await.unwrap().expect("the other peer is admitted"));
    let mut outcomes = Vec::new();
    for q in queued {
        outcomes.push(q.await.unwrap().map_err(|s| s.code()));
    }
    assert!(
        matches!(outcomes.as_slice(), [Err(tonic::Code::Unavailable), Ok(_)]),
        "the flood's oldest waiter was shed, the other served: {outcomes:?}"
    );
    // Holder, legit, one flood waiter: nothing shed ever reached the API server.
    assert_eq!(h.world.standin.token_reviews_served(), before + 3);
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_checks_do_not_make_token_reviews() {
    let world = world().await;
    let yaml = overload_config(&world, "  timeout: 20s\n  retries: 0\n  max_in_flight: 1\n");
    let h = Harness::start_with(world, &yaml).await;
    let tokens: Vec<String> = (0..23).map(|_| h.world.api_token(AUD)).collect();
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_secs(2)));
    let before = h.world.standin.token_reviews_served();

    // A Check whose client gives up while its review is in flight...
    let first = spawn_cancelled_check(&h, &tokens[0], FLOOD, Duration::from_millis(500));
    until_metric(&h, "tokengate_tokenreview_in_flight", 1.0).await;
    // ... and 20 that give up while queued behind it: each leaves the queue.
    let cancelled: Vec<_> = tokens[1..21]
        .iter()
        .map(|t| spawn_cancelled_check(&h, t, FLOOD, Duration::from_millis(100)))
        .collect();
    for c in cancelled {
        c.await.unwrap();
    }
    first.await.unwrap();
    until_metric(
        &h,
        r#"tokengate_tokenreview_shed_total{reason="abandoned"}"#,
        20.0,
    )
    .await;
    assert_eq!(metric(&h, "tokengate_tokenreview_queued").await, 0.0);
    // The orphaned review finishes (nobody needs its slot) and fills the cache.
    until_metric(&h, "tokengate_tokenreview_in_flight", 0.0).await;
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &tokens[0])])).await);
    assert_eq!(
        h.world.standin.token_reviews_served(),
        before + 1,
        "a cache hit: the orphan's answer was kept"
    );

    // An orphan gives its slot up as soon as a live Check queues for one.
    let orphan = spawn_cancelled_check(&h, &tokens[21], FLOOD, Duration::from_millis(300));
    until_metric(&h, "tokengate_tokenreview_in_flight", 1.0).await;
    orphan.await.unwrap();
    let live = spawn_check(&h, &tokens[22], LEGIT);
    until_metric(
        &h,
        r#"tokengate_tokenreview_shed_total{reason="orphan_dropped"}"#,
        1.0,
    )
    .await;
    allowed_headers(&live.await.unwrap().expect("the live Check is served"));
    assert_eq!(h.world.standin.token_reviews_served(), before + 3);
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_api_requests_when_the_api_server_is_slow() {
    // Every TokenReview answers after the attempt timeout; 2 retries allowed per token.
    // Without a budget: 3 requests per token. With 10 % and no floor: first attempts, plus a
    // tenth of them, plus the 10 the bucket starts with.
    const N: u64 = 40;
    let world = world().await;
    let yaml = overload_config(
        &world,
        "  timeout: 300ms\n  retries: 2\n  max_in_flight: 64\n  retry_budget_percent: 10\n  retry_budget_min_per_second: 0\n",
    );
    let h = Harness::start_with(world, &yaml).await;
    let tokens: Vec<String> = (0..N).map(|_| h.world.api_token(AUD)).collect();
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_secs(1)));
    let before = h.world.standin.token_reviews_served();
    let checks: Vec<_> = tokens.iter().map(|t| spawn_check(&h, t, LEGIT)).collect();
    for c in checks {
        let status = c.await.unwrap().expect_err("the API server is too slow");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let requests = h.world.standin.token_reviews_served() - before;
    assert!(
        requests <= N + N / 10 + 10,
        "{requests} TokenReviews for {N} tokens"
    );
    assert!(
        metric(
            &h,
            r#"tokengate_tokenreview_retries_total{outcome="budget_exhausted"}"#
        )
        .await
            > 0.0
    );
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_in_both_forms() {
    let world = world().await;
    let yaml = overload_config(&world, "  timeout: 2s\n  retries: 2\n  max_in_flight: 4\n");
    let h = Harness::start_with(world, &yaml).await;
    let unavailable = |r: Result<CheckResponse, tonic::Status>| {
        let status = r.expect_err("the API server refuses");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    };

    // Asked to come back in 30 s (longer than an attempt may take): no retry at all.
    for fault in [
        Fault::StatusRetryDate {
            code: 503,
            retry_after: 30,
        },
        Fault::Status {
            code: 429,
            retry_after: Some(30),
        },
    ] {
        h.world.standin.set_fault(fault.clone());
        let before = h.world.standin.token_reviews_served();
        unavailable(
            h.check(data_store(&[("x-client-id", &h.world.api_token(AUD))]))
                .await,
        );
        assert_eq!(
            h.world.standin.token_reviews_served(),
            before + 1,
            "{fault:?}"
        );
    }
    assert_eq!(
        metric(
            &h,
            r#"tokengate_tokenreview_retries_total{outcome="retry_after_too_long"}"#
        )
        .await,
        2.0
    );

    // A date that has come (the header has whole seconds): both retries are made.
    h.world.standin.set_fault(Fault::StatusRetryDate {
        code: 503,
        retry_after: 0,
    });
    let before = h.world.standin.token_reviews_served();
    unavailable(
        h.check(data_store(&[("x-client-id", &h.world.api_token(AUD))]))
            .await,
    );
    assert_eq!(h.world.standin.token_reviews_served(), before + 3);
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}
