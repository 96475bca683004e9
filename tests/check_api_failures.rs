//! When the API server cannot answer, Check fails with gRPC UNAVAILABLE (never an allow,
//! never a 401) and nothing is cached; the reviewer's own rotating token is picked up without
//! a restart.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kube_standin::Fault;

async fn assert_unavailable(h: &Harness, token: &str) {
    let started = Instant::now();
    match h.check(data_store(&[("x-client-id", token)])).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(r) => panic!("expected UNAVAILABLE, got a CheckResponse: {r:?}"),
    }
    // Bounded: at most 2 attempts × the attempt timeout + backoff, with slack for a loaded
    // machine.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_failures_are_unavailable_and_not_cached() {
    // A short attempt timeout so Hang fails fast: 2 attempts × 500 ms + backoff.
    let h = Harness::start_with_timeout("500ms").await;
    let token = h.world.api_token(AUD);

    for fault in [
        Fault::Status {
            code: 503,
            retry_after: Some(1),
        },
        Fault::Status {
            code: 429,
            retry_after: None,
        },
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        Fault::Hang,
        Fault::CloseConnection,
        Fault::Down,
    ] {
        h.world.standin.set_fault(fault.clone());
        let before = h.world.standin.token_reviews_served();
        assert_unavailable(&h, &token).await;
        match fault {
            // Retry-After (1 s) is longer than an attempt's timeout (500 ms): honoured by not
            // retrying, rather than retrying early.
            Fault::Status {
                retry_after: Some(_),
                ..
            } => assert_eq!(h.world.standin.token_reviews_served(), before + 1),
            // One retry (retries: 1).
            Fault::Status { .. } => assert_eq!(
                h.world.standin.token_reviews_served(),
                before + 2,
                "{fault:?}"
            ),
            _ => {}
        }
    }

    // Back up: the same token is allowed (the errors were not cached).
    h.world.standin.set_fault(Fault::None);
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    allowed_headers(&r);

    let (_, metrics) = h.admin_get("/metrics").await;
    assert!(metrics.contains(
        r#"tokengate_decisions_total{route="data-store",outcome="error",reason="api_unavailable"} 6"#
    ), "{metrics}");
    assert!(metrics.contains(r#"tokengate_tokenreview_errors_total{kind="server_error"}"#));
    assert!(metrics.contains(r#"tokengate_tokenreview_errors_total{kind="timeout"}"#));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviewer_without_rbac_is_unavailable_not_a_denial() {
    let h = Harness::start().await;
    let token = h.world.api_token(AUD);
    h.world
        .standin
        .delete_cluster_role_binding("tokengate-auth-delegator");
    assert_unavailable(&h, &token).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviewer_token_rotation_is_picked_up_without_restart() {
    let h = Harness::start().await;
    let first = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &first)])).await);

    // The stand-in writes a new token file (atomic rename) and revokes the old token.
    h.world.standin.rotate_reviewer_token();
    let second = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &second)])).await);

    h.world.standin.rotate_reviewer_token();
    let third = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &third)])).await);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_makes_tokengate_reread_its_token_file_and_retry() {
    // tokengate reads its own copy of the token file, which we update in place keeping size,
    // inode and mtime, so only the 401 path can notice the change. The copy is padded with
    // whitespace (which tokengate trims) to a width any rotated token fits in.
    const WIDTH: usize = 8192;
    let pad = |token: &str| {
        assert!(token.len() < WIDTH, "token longer than the padding");
        format!("{token:<WIDTH$}")
    };
    let s = world().await;
    let dir = tempfile::tempdir().unwrap();
    let token_copy = dir.path().join("token");
    let original = std::fs::read_to_string(s.standin.reviewer_token_path()).unwrap();
    std::fs::write(&token_copy, pad(&original)).unwrap();
    let kubeconfig = std::fs::read_to_string(s.standin.kubeconfig_path())
        .unwrap()
        .replace(
            &s.standin
                .reviewer_token_path()
                .to_string_lossy()
                .into_owned(),
            &token_copy.to_string_lossy(),
        );
    assert!(kubeconfig.contains(&*token_copy.to_string_lossy()));
    let kubeconfig_path = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig).unwrap();
    let yaml = config(&kubeconfig_path, "");
    let h = Harness::start_with(s, &yaml).await;

    let first = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &first)])).await);

    h.world.standin.rotate_reviewer_token();
    let rotated = std::fs::read_to_string(h.world.standin.reviewer_token_path()).unwrap();
    let before = std::fs::metadata(&token_copy).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&token_copy)
        .unwrap();
    use std::io::Write as _;
    (&file).write_all(pad(&rotated).as_bytes()).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
    drop(file);
    let after = std::fs::metadata(&token_copy).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        (after.len(), after.ino(), after.modified().unwrap()),
        (before.len(), before.ino(), before.modified().unwrap()),
        "the token file must look unchanged"
    );

    let second = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &second)])).await);
    let (_, metrics) = h.admin_get("/metrics").await;
    assert!(
        metrics.contains(r#"tokengate_tokenreview_errors_total{kind="unauthorized"} 1"#),
        "expected exactly one 401 before the re-read: {metrics}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reviews_in_flight_are_capped() {
    // One TokenReview at a time, each taking 1.5 s; a Check that cannot get a slot within the
    // 2 s attempt timeout is UNAVAILABLE (the API server never sees it).
    let s = world().await;
    let yaml = config(&s.standin.kubeconfig_path(), "")
        .replace("max_in_flight: 16", "max_in_flight: 1")
        .replace("retries: 1", "retries: 0");
    let h = Harness::start_with(s, &yaml).await;
    let tokens: Vec<String> = (0..3).map(|_| h.world.api_token(AUD)).collect();
    h.world
        .standin
        .set_fault(Fault::Latency(Duration::from_millis(1500)));
    let before = h.world.standin.token_reviews_served();
    let mut tasks = Vec::new();
    for t in tokens {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            client.check(data_store(&[("x-client-id", &t)])).await
        }));
    }
    let mut ok = 0;
    let mut unavailable = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                allowed_headers(&r.into_inner());
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                unavailable += 1;
            }
        }
    }
    assert_eq!((ok, unavailable), (2, 1));
    assert_eq!(h.world.standin.token_reviews_served(), before + 2);
    let (_, metrics) = h.admin_get("/metrics").await;
    assert!(
        metrics.contains(r#"tokengate_tokenreview_errors_total{kind="overloaded"} 1"#),
        "{metrics}"
    );
    h.world.standin.set_fault(Fault::None);
    h.stop().await;
}
