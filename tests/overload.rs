//! Overload control (issue 12 item 2): TokenReview slots shared fairly by downstream peer
//! from a bounded queue that sheds at once; reviews of cancelled Checks dropped; a retry
//! budget; `Retry-After` honoured in both forms. Counts, never timings: the stand-in counts
//! the TokenReviews it serves, tokengate's metrics count what it shed. SubjectAccessReviews
//! (`allow.rbac`) share the slots, the queue and the shedding: the same counts for them below.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use kube_standin::cluster::PolicyRule;
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

/// A Check of `req`, in its own task.
fn spawn(
    h: &Harness,
    req: CheckRequest,
) -> tokio::task::JoinHandle<Result<CheckResponse, tonic::Status>> {
    let mut client = h.client.clone();
    tokio::spawn(async move { client.check(req).await.map(|r| r.into_inner()) })
}

/// A Check of the data-store route with `token`, from the downstream peer `source`.
fn spawn_check(
    h: &Harness,
    token: &str,
    source: &str,
) -> tokio::task::JoinHandle<Result<CheckResponse, tonic::Status>> {
    spawn(
        h,
        from_source(data_store(&[("x-client-id", token)]), source),
    )
}

/// A Check of `req` the client gives up on after `after` (the stream is reset, as Envoy does
/// when its ext_authz timeout fires).
fn spawn_cancelled(h: &Harness, req: CheckRequest, after: Duration) -> tokio::task::JoinHandle<()> {
    let mut client = h.client.clone();
    tokio::spawn(async move {
        let r = tokio::time::timeout(after, client.check(req)).await;
        assert!(
            r.is_err(),
            "expected the Check to be cancelled first: {r:?}"
        );
    })
}

/// [`spawn_cancelled`] for the data-store route with `token`, from `source`.
fn spawn_cancelled_check(
    h: &Harness,
    token: &str,
    source: &str,
    after: Duration,
) -> tokio::task::JoinHandle<()> {
    spawn_cancelled(
        h,
        from_source(data_store(&[("x-client-id", token)]), source),
        after,
    )
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

// ------------------------------------------------------------------ SubjectAccessReviews
//
// `allow.rbac` asks through the same slots, queue and interest as TokenReview. The token's
// verdict is cached first, so each Check below needs a SubjectAccessReview only, and each path
// is its own review (`non_resource_path: request`).

/// An `allow.rbac` route whose non-resource path is the request's.
const PATHS_ROUTE: &str = "  - name: paths
    match:
      context_extensions: {route: paths}
    audiences: [data-store]
    allow:
      rbac: {verb: get, non_resource_path: request}
";

/// A Check of [`PATHS_ROUTE`] for `path` with `token`, from the downstream peer `source`.
fn paths(token: &str, path: &str, source: &str) -> CheckRequest {
    from_source(
        request(
            "data-store:8080",
            path,
            &[("x-client-id", token)],
            &[("route", "paths")],
        ),
        source,
    )
}

/// tokengate with these `kubernetes:` settings and [`PATHS_ROUTE`]; RBAC grants `get` on
/// `/data/*` (nothing else) to the `api` service account, whose token is returned with its
/// verdict already cached.
async fn start_rbac(kubernetes: &str) -> (Harness, String) {
    let world = world().await;
    let yaml = overload_config(&world, kubernetes).replacen(
        "routes:\n",
        &format!("routes:\n{PATHS_ROUTE}"),
        1,
    );
    assert!(yaml.contains("non_resource_path: request"), "{yaml}");
    world.standin.create_cluster_role(
        "data-reader",
        vec![PolicyRule::urls(&["/data/*"], &["get"])],
    );
    world
        .standin
        .bind_cluster_role("api-data", "data-reader", ("api", "api"));
    let h = Harness::start_with(world, &yaml).await;
    let token = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(paths(&token, "/data/warm", LEGIT)).await);
    (h, token)
}

const SAR_QUEUE_FULL: &str = r#"tokengate_subjectaccessreview_shed_total{reason="queue_full"}"#;
const SAR_IN_FLIGHT: &str = "tokengate_subjectaccessreview_in_flight";
/// Reviews waiting for a slot, of either kind (they share `kubernetes.max_in_flight`).
const QUEUED: &str = "tokengate_tokenreview_queued";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_subject_access_reviews_at_once_and_spares_other_peers() {
    let (h, token) =
        start_rbac("  timeout: 20s\n  retries: 0\n  max_in_flight: 1\n  max_queued: 2\n").await;
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_secs(2)));
    let sars = h.world.standin.subject_access_reviews_served();
    let token_reviews = h.world.standin.token_reviews_served();
    let check = |path: &str, source: &str| spawn(&h, paths(&token, path, source));

    // The flood's peer takes the one slot and fills the queue.
    let holder = check("/data/0", FLOOD);
    until_metric(&h, SAR_IN_FLIGHT, 1.0).await;
    let mut queued = Vec::new();
    for i in 1..3 {
        queued.push(check(&format!("/data/{i}"), FLOOD));
        until_metric(&h, QUEUED, i as f64).await;
    }

    // More from the same peer: UNAVAILABLE at once (never an allow), while the slot is
    // still taken, and none of them reached the API server.
    for i in 3..6 {
        let r = check(&format!("/data/{i}"), FLOOD).await.unwrap();
        let status = r.expect_err("a full queue must shed");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    assert!(!holder.is_finished(), "shed before the slot came free");
    assert_eq!(metric(&h, SAR_QUEUE_FULL).await, 3.0);
    assert_eq!(
        metric(
            &h,
            r#"tokengate_tokenreview_shed_total{reason="queue_full"}"#
        )
        .await,
        0.0,
        "counted as SubjectAccessReviews"
    );
    assert_eq!(h.world.standin.subject_access_reviews_served(), sars + 1);

    // Another peer's new path: the flood's oldest waiter makes room for it, and it is served
    // before the flood's remaining one.
    let legit = check("/data/6", LEGIT);
    until_metric(&h, SAR_QUEUE_FULL, 4.0).await;
    allowed_headers(&holder.await.unwrap().expect("the slot holder is served"));
    let mut queued = queued.into_iter();
    let oldest = queued.next().unwrap().await.unwrap();
    assert_eq!(
        oldest
            .map_err(|s| s.code())
            .expect_err("the flood's oldest waiter was shed"),
        tonic::Code::Unavailable
    );
    // One review at a time, 2 s each: the first of the two to answer had the slot first.
    let waiter = queued.next().unwrap();
    match futures::future::select(legit, waiter).await {
        futures::future::Either::Left((legit, waiter)) => {
            allowed_headers(&legit.unwrap().expect("the other peer is admitted"));
            allowed_headers(&waiter.await.unwrap().expect("the flood's waiter is served"));
        }
        futures::future::Either::Right(_) => {
            panic!("the flood's waiter went before the other peer")
        }
    }
    // Holder, legit, one flood waiter: nothing shed ever reached the API server, and no
    // TokenReview was needed.
    assert_eq!(h.world.standin.subject_access_reviews_served(), sars + 3);
    assert_eq!(h.world.standin.token_reviews_served(), token_reviews);
    for (series, want) in [
        // The warm-up Check, then holder, legit and the flood's served waiter.
        (
            r#"tokengate_decisions_total{route="paths",outcome="allow",reason="ok"}"#,
            4.0,
        ),
        (
            r#"tokengate_decisions_total{route="paths",outcome="error",reason="api_unavailable"}"#,
            4.0,
        ),
        (
            r#"tokengate_subjectaccessreviews_total{allowed="true"}"#,
            4.0,
        ),
    ] {
        assert_eq!(metric(&h, series).await, want, "{series}");
    }
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_checks_do_not_make_subject_access_reviews() {
    let (h, token) = start_rbac("  timeout: 20s\n  retries: 0\n  max_in_flight: 1\n").await;
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_secs(2)));
    let sars = h.world.standin.subject_access_reviews_served();
    let token_reviews = h.world.standin.token_reviews_served();
    let cancelled = |path: &str, after_ms: u64| {
        spawn_cancelled(
            &h,
            paths(&token, path, FLOOD),
            Duration::from_millis(after_ms),
        )
    };

    // A Check whose client gives up while its review is in flight...
    let first = cancelled("/data/0", 500);
    until_metric(&h, SAR_IN_FLIGHT, 1.0).await;
    // ... and 20 that give up while queued behind it: each leaves the queue.
    let waiters: Vec<_> = (1..21)
        .map(|i| cancelled(&format!("/data/{i}"), 100))
        .collect();
    for c in waiters {
        c.await.unwrap();
    }
    first.await.unwrap();
    until_metric(
        &h,
        r#"tokengate_subjectaccessreview_shed_total{reason="abandoned"}"#,
        20.0,
    )
    .await;
    assert_eq!(metric(&h, QUEUED).await, 0.0);
    // The orphaned review finishes (nobody needs its slot) and fills the answer cache.
    until_metric(&h, SAR_IN_FLIGHT, 0.0).await;
    assert_eq!(h.world.standin.subject_access_reviews_served(), sars + 1);
    allowed_headers(&h.check_ok(paths(&token, "/data/0", LEGIT)).await);
    assert_eq!(
        h.world.standin.subject_access_reviews_served(),
        sars + 1,
        "a cache hit: the orphan's answer was kept"
    );

    // An orphan gives its slot up as soon as a live Check queues for one.
    let orphan = cancelled("/data/21", 300);
    until_metric(&h, SAR_IN_FLIGHT, 1.0).await;
    orphan.await.unwrap();
    let live = spawn(&h, paths(&token, "/data/22", LEGIT));
    until_metric(
        &h,
        r#"tokengate_subjectaccessreview_shed_total{reason="orphan_dropped"}"#,
        1.0,
    )
    .await;
    allowed_headers(&live.await.unwrap().expect("the live Check is served"));
    assert_eq!(h.world.standin.subject_access_reviews_served(), sars + 3);
    assert_eq!(h.world.standin.token_reviews_served(), token_reviews);
    // Nothing of this was counted against TokenReview.
    for reason in ["abandoned", "orphan_dropped"] {
        let series = format!(r#"tokengate_tokenreview_shed_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&h, &series).await, 0.0, "{series}");
    }
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}

/// A burst from two peers while the one slot is taken and the queue fills: each Check is
/// answered by its own SubjectAccessReview or is UNAVAILABLE (Envoy's `status_on_error`), never
/// an allow without a review. Half the paths are outside the grant: none of those is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_subject_access_reviews_are_unavailable_never_an_allow() {
    const BURST: usize = 40;
    let (h, token) =
        start_rbac("  timeout: 20s\n  retries: 0\n  max_in_flight: 1\n  max_queued: 2\n").await;
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_millis(500)));
    let sars = h.world.standin.subject_access_reviews_served();
    let holder = spawn(&h, paths(&token, "/data/holder", FLOOD));
    until_metric(&h, SAR_IN_FLIGHT, 1.0).await;
    let burst: Vec<_> = (0..BURST)
        .map(|i| {
            let (path, source) = match i % 4 {
                0 => (format!("/data/{i}"), FLOOD),
                1 => (format!("/other/{i}"), FLOOD),
                2 => (format!("/data/{i}"), LEGIT),
                _ => (format!("/other/{i}"), LEGIT),
            };
            let granted = path.starts_with("/data/");
            (granted, spawn(&h, paths(&token, &path, source)))
        })
        .collect();
    allowed_headers(&holder.await.unwrap().expect("the slot holder is served"));
    let (mut allowed, mut denied, mut unavailable) = (1u64, 0u64, 0u64);
    for (granted, check) in burst {
        match check.await.unwrap() {
            Ok(r) if granted => {
                allowed_headers(&r);
                allowed += 1;
            }
            Ok(r) => {
                assert_eq!(reason(&r).as_deref(), Some("rbac_denied"), "{r:?}");
                assert_eq!(denied_status(&r), Some(403));
                denied += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                unavailable += 1;
            }
        }
    }
    // Every answer came from its own review; every other Check was shed by the queue, and
    // its review never reached the API server.
    assert_eq!(
        h.world.standin.subject_access_reviews_served() - sars,
        allowed + denied
    );
    assert_eq!(metric(&h, SAR_QUEUE_FULL).await, unavailable as f64);
    assert!(
        unavailable >= (BURST - 2) as u64 / 2,
        "{unavailable} shed of {BURST} (one slot, two queued, a burst while it is taken)"
    );
    for (series, want) in [
        (
            r#"tokengate_subjectaccessreviews_total{allowed="true"}"#,
            allowed + 1,
        ),
        (
            r#"tokengate_subjectaccessreviews_total{allowed="false"}"#,
            denied,
        ),
        (
            r#"tokengate_decisions_total{route="paths",outcome="error",reason="api_unavailable"}"#,
            unavailable,
        ),
    ] {
        assert_eq!(metric(&h, series).await, want as f64, "{series}");
    }
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}
