//! Issue 9 end to end through a real Envoy (`envoy/sidecar.yaml`, `status_on_error: 503`):
//! tokengate with `kubernetes.verification: local` (watch on, cache TTL 10 minutes,
//! `max_staleness: 75s`) keeps admitting a known-valid caller through a 60 s API-server
//! outage, keeps refusing a pod deleted before the outage, answers 503 once `max_staleness`
//! is exceeded, and admits again when the API server is back.
//!
//! The outage is the stand-in's `Fault::Down`: its listener closes and every open connection
//! (watches included) is dropped, so tokengate cannot reach the API server at all. Nothing
//! here asserts a latency; the waits are bounded polls (revocation within 1 s is measured by
//! `tokengate-bench revocation`, BENCHMARKS.md).

mod common;

use std::time::{Duration, Instant};

use common::envoy::{echo_of, Stack};
use common::with_kubeconfig;
use kube_standin::{Fault, MintRequest};
use testkit::world::World;

const ENVOY: &str = "envoy/sidecar.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar.yaml";
const HOST: (&str, &str) = ("host", "data-store");
/// `kubernetes.max_staleness` of the test: above the 60 s outage that must be ridden out.
const MAX_STALENESS: Duration = Duration::from_secs(75);
/// The outage tokengate must ride out on its local knowledge.
const RIDE_OUT: Duration = Duration::from_secs(60);

/// The published sidecar config, pointed at the stand-in, switched to local verification
/// with the watch on and the 10-minute cache TTL.
fn local_config(kubeconfig: &std::path::Path) -> String {
    let published =
        std::fs::read_to_string(testkit::workspace_root().join(TOKENGATE)).expect("read config");
    let yaml = with_kubeconfig(&published, kubeconfig).expect("kubeconfig inserted");
    let local = format!(
        "kubernetes:\n  verification: local\n  watch: true\n  max_staleness: {}s\n",
        MAX_STALENESS.as_secs()
    );
    let yaml = yaml.replacen("kubernetes:\n", &local, 1);
    assert!(
        yaml.contains("  ttl: 60s\n"),
        "published cache ttl changed:\n{yaml}"
    );
    yaml.replacen("  ttl: 60s\n", "  ttl: 10m\n", 1)
}

/// GET /items through Envoy with `token` in X-Client-Id: (status, reason header).
async fn call(stack: &Stack, token: &str) -> (u16, Option<String>) {
    let resp = stack.get("/items", &[HOST, ("x-client-id", token)]).await;
    let reason = resp.header("x-tokengate-reason").map(str::to_string);
    (resp.status, reason)
}

/// Polls `call(token)` every 20 ms until it answers `want`, for at most `bound`; returns the
/// time it took, or panics with the last answer.
async fn poll_until(
    stack: &Stack,
    token: &str,
    want: u16,
    bound: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let (status, reason) = call(stack, token).await;
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "{what}: still {status} ({reason:?}) after {bound:?}, expected {want}\n{}",
            stack.envoy.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_route_rides_out_an_api_server_outage_until_max_staleness() {
    let world = World::start().await.expect("world");
    world.standin.grant_reviewer_watch();
    // A second pod of the api service account: its caller is revoked before the outage.
    world
        .standin
        .create_pod("api", "api-1", "api", Some("node-1"));
    let yaml = local_config(&world.standin.kubeconfig_path());
    let stack = Stack::start_world(ENVOY, world, &yaml, None, None)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"));

    // Ready only once the first lists of pods and service accounts and the JWKS are in.
    let started = Instant::now();
    loop {
        let (status, body) = stack.tokengate_admin("/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "tokengate not ready after 30 s: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let known = stack.world.api_token("data-store");
    let resp = stack.get("/items", &[HOST, ("x-client-id", &known)]).await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", stack.envoy.diagnostics());
    assert_eq!(
        echo_of(&resp).message,
        "authenticated as system:serviceaccount:api:api"
    );

    let doomed = stack.world.mint(
        MintRequest::new("api", "api")
            .audience("data-store")
            .pod("api-1"),
    );
    assert_eq!(
        call(&stack, &doomed).await.0,
        200,
        "api-1's caller before deletion"
    );
    assert!(stack
        .world
        .standin
        .delete_pod_graceful("api", "api-1", Some(0)));
    let took = poll_until(
        &stack,
        &doomed,
        403,
        Duration::from_secs(10),
        "token of the deleted pod api-1",
    )
    .await;
    eprintln!("deleted pod's token refused after {took:?} (cached verdict revoked by the watch)");
    let metrics = stack.tokengate_admin("/metrics").await.1;
    let tokenreviews_before = tokenreview_attempts(&metrics);

    // The API server goes away: listener closed, watches and pooled connections dropped.
    stack.world.standin.set_fault(Fault::Down);
    let outage = Instant::now();
    let mut checks = 0;
    while outage.elapsed() < RIDE_OUT {
        let (status, reason) = call(&stack, &known).await;
        assert_eq!(
            status,
            200,
            "known caller refused {:?} into the outage ({reason:?})\n{}",
            outage.elapsed(),
            stack.envoy.diagnostics()
        );
        let (status, reason) = call(&stack, &doomed).await;
        assert_eq!(
            status,
            403,
            "deleted pod's token answered {status} ({reason:?}) {:?} into the outage",
            outage.elapsed()
        );
        checks += 1;
        let left = RIDE_OUT.saturating_sub(outage.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
    }
    assert!(checks >= 10, "only {checks} checks during the outage");
    let metrics = stack.tokengate_admin("/metrics").await.1;
    assert_eq!(
        tokenreview_attempts(&metrics),
        tokenreviews_before,
        "local mode tried TokenReview during the outage"
    );

    // Past max_staleness without API-server contact: no more guessing, 503 from Envoy.
    let bound = MAX_STALENESS + Duration::from_secs(15) - outage.elapsed();
    poll_until(
        &stack,
        &known,
        503,
        bound,
        "known caller past max_staleness",
    )
    .await;
    eprintln!(
        "503 after {:?} of outage (max_staleness {MAX_STALENESS:?})",
        outage.elapsed()
    );

    // The API server is back: the watches and keys catch up and the caller is admitted again.
    stack.world.standin.set_fault(Fault::None);
    let took = poll_until(
        &stack,
        &known,
        200,
        Duration::from_secs(40),
        "known caller after the outage",
    )
    .await;
    eprintln!("admitted again {took:?} after the API server came back");
    assert_eq!(
        call(&stack, &doomed).await.0,
        403,
        "deleted pod after the outage"
    );
    stack.finish().await;
}

/// `tokengate_tokenreview_duration_seconds_count` (0 when no TokenReview was made yet).
fn tokenreview_attempts(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tokengate_tokenreview_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
