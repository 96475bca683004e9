//! Configuration reload against tokengate in-process and the Kubernetes API stand-in: a valid
//! file changes decisions (and verdicts cached under the old routes are not used), an invalid
//! one or one that needs a restart keeps the running configuration and says so in the
//! metrics, a Kubernetes ConfigMap's `..data` symlink swap is followed, and SIGHUP reloads.
//! Every wait is for an observable condition (a decision, a metric) with a deadline.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use tokio::time::Instant;

/// The file poll of these tests (tokengate's default is 5 s).
const POLL: Option<Duration> = Some(Duration::from_millis(100));
/// Longest wait for a reload to show.
const WITHIN: Duration = Duration::from_secs(20);

/// [`BASE_CONFIG`] as a file would hold it: stops at once, `strict.data-store` admits
/// `allowed` (a `namespace/name` pattern).
fn file_config(world: &World, allowed: &str) -> String {
    let yaml = format!(
        "listen:\n  drain_delay: 0s\n{}",
        config(&world.standin.kubeconfig_path(), "")
    );
    yaml.replace(
        r#"service_accounts: ["api/api"]"#,
        &format!("service_accounts: [{allowed:?}]"),
    )
}

/// Replaces `path` atomically (write aside, rename over), as editors and `kubectl cp` do.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A Check of the `data-store-strict` route (allow-list, selected by host).
fn strict(token: &str) -> CheckRequest {
    request(
        "strict.data-store",
        "/items",
        &[("x-client-id", token)],
        &[],
    )
}

/// The value of the sample `name` (with labels, if any) in an OpenMetrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn metrics(h: &Harness) -> String {
    h.admin_get("/metrics").await.1
}

/// Waits until the sample `name` reads `value`.
async fn wait_metric(h: &Harness, name: &str, value: f64) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let text = metrics(h).await;
        if metric(&text, name) == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `req` is answered with `reason` (`None`: allowed).
async fn wait_decision(h: &Harness, req: &CheckRequest, want: Option<&str>) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let r = h.check_ok(req.clone()).await;
        let got = reason(&r);
        if got.as_deref() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "decision never became {want:?}; still {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const SUCCESS: &str = "tokengate_config_last_reload_success";
const SUCCESS_AT: &str = "tokengate_config_last_reload_success_timestamp_seconds";
const RELOADED: &str = r#"tokengate_config_reloads_total{result="success"}"#;
const REFUSED: &str = r#"tokengate_config_reloads_total{result="failure"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_reload_changes_decisions_and_no_cached_verdict_outlives_it() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.yaml");
    std::fs::write(&path, file_config(&world, "api/api")).unwrap();
    let h = Harness::start_reloading(world, &path, POLL, false).await;

    let token = h.world.api_token(AUD);
    let r = h.check_ok(strict(&token)).await;
    assert_eq!(reason(&r), None, "api/api is on the allow-list");
    let reviews = h.world.standin.token_reviews_served();
    let r = h.check_ok(strict(&token)).await;
    assert_eq!(reason(&r), None);
    assert_eq!(
        h.world.standin.token_reviews_served(),
        reviews,
        "the verdict is cached"
    );
    let text = metrics(&h).await;
    assert_eq!(metric(&text, SUCCESS), Some(1.0), "{text}");
    assert_eq!(metric(&text, RELOADED), Some(0.0), "{text}");

    // The caller leaves the allow-list (written in place: the poll lets it settle first).
    std::fs::write(&path, file_config(&h.world, "web/*")).unwrap();
    wait_decision(&h, &strict(&token), Some("not_allowed")).await;
    let r = h.check_ok(strict(&token)).await;
    assert_eq!(denied_status(&r), Some(403));
    let text = metrics(&h).await;
    assert_eq!(metric(&text, SUCCESS), Some(1.0), "{text}");
    assert_eq!(metric(&text, RELOADED), Some(1.0), "{text}");
    assert_eq!(metric(&text, REFUSED), Some(0.0), "{text}");

    // The routes changed, so the verdict remembered under the old ones was not used: the
    // first Check under the new routes cost a TokenReview (Checks before the swap were
    // cache hits), and its verdict serves the other route with the same audience.
    assert_eq!(h.world.standin.token_reviews_served(), reviews + 1);
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    assert_eq!(reason(&r), None);
    assert_eq!(h.world.standin.token_reviews_served(), reviews + 1);

    // And back: admitted again.
    replace(&path, &file_config(&h.world, "api/*"));
    wait_decision(&h, &strict(&token), None).await;
    wait_metric(&h, RELOADED, 2.0).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_running_configuration() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.yaml");
    std::fs::write(&path, file_config(&world, "api/api")).unwrap();
    let h = Harness::start_reloading(world, &path, POLL, false).await;
    let token = h.world.api_token(AUD);
    let intruder = h.world.token("default", "intruder", AUD);
    assert_eq!(reason(&h.check_ok(strict(&token)).await), None);
    let started_at = metric(&metrics(&h).await, SUCCESS_AT).unwrap();

    // An invalid file that would also have let the intruder in: refused whole.
    let invalid =
        file_config(&h.world, "default/*").replace("audiences: [data-store]", "audiences: []");
    replace(&path, &invalid);
    wait_metric(&h, SUCCESS, 0.0).await;
    let text = metrics(&h).await;
    assert_eq!(metric(&text, REFUSED), Some(1.0), "{text}");
    assert_eq!(metric(&text, SUCCESS_AT), Some(started_at), "{text}");
    assert_eq!(reason(&h.check_ok(strict(&token)).await), None);
    assert_eq!(
        reason(&h.check_ok(strict(&intruder)).await).as_deref(),
        Some("not_allowed")
    );

    // A valid file that moves the gRPC port needs a restart: refused whole as well.
    let moved =
        file_config(&h.world, "default/*").replace("listen:\n", "listen:\n  grpc: 127.0.0.1:1\n");
    replace(&path, &moved);
    wait_metric(&h, REFUSED, 2.0).await;
    let text = metrics(&h).await;
    assert_eq!(metric(&text, SUCCESS), Some(0.0), "{text}");
    assert_eq!(
        reason(&h.check_ok(strict(&intruder)).await).as_deref(),
        Some("not_allowed")
    );

    // Then a valid one: applied, and the gauge says so.
    replace(&path, &file_config(&h.world, "default/*"));
    wait_metric(&h, SUCCESS, 1.0).await;
    let text = metrics(&h).await;
    assert!(metric(&text, SUCCESS_AT).unwrap() >= started_at, "{text}");
    assert_eq!(metric(&text, RELOADED), Some(1.0), "{text}");
    assert_eq!(reason(&h.check_ok(strict(&intruder)).await), None);
    assert_eq!(
        reason(&h.check_ok(strict(&token)).await).as_deref(),
        Some("not_allowed")
    );
    h.stop().await;
}

/// Lays out `dir` as the kubelet does a ConfigMap volume: the data in a timestamped
/// directory, `..data` pointing at it, and `config.yaml -> ..data/config.yaml`; each call
/// publishes a new version by swapping `..data` (a new symlink renamed over the old one).
fn publish_configmap(dir: &Path, version: &str, text: &str) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("config.yaml"), text).unwrap();
    let next = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &next).unwrap();
    std::fs::rename(&next, dir.join("..data")).unwrap();
    let link = dir.join("config.yaml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/config.yaml", &link).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_followed() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    publish_configmap(
        dir.path(),
        "2026_12_02_08_00_00.1",
        &file_config(&world, "api/api"),
    );
    let path = dir.path().join("config.yaml");
    let h = Harness::start_reloading(world, &path, POLL, false).await;
    let token = h.world.api_token(AUD);
    assert_eq!(reason(&h.check_ok(strict(&token)).await), None);

    publish_configmap(
        dir.path(),
        "2026_12_02_08_01_00.2",
        &file_config(&h.world, "web/web"),
    );
    // The kubelet removes the old version once `..data` points at the new one.
    std::fs::remove_dir_all(dir.path().join("..2026_12_02_08_00_00.1")).unwrap();
    wait_decision(&h, &strict(&token), Some("not_allowed")).await;

    publish_configmap(
        dir.path(),
        "2026_12_02_08_02_00.3",
        &file_config(&h.world, "api/api"),
    );
    wait_decision(&h, &strict(&token), None).await;
    let text = metrics(&h).await;
    assert_eq!(metric(&text, RELOADED), Some(2.0), "{text}");
    assert_eq!(metric(&text, REFUSED), Some(0.0), "{text}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.yaml");
    std::fs::write(&path, file_config(&world, "api/api")).unwrap();
    // No poll: only SIGHUP reloads. (nextest runs each test in its own process, so the
    // signal reaches this tokengate only.)
    let h = Harness::start_reloading(world, &path, None, true).await;
    let token = h.world.api_token(AUD);
    assert_eq!(reason(&h.check_ok(strict(&token)).await), None);

    replace(&path, &file_config(&h.world, "web/web"));
    assert_eq!(
        reason(&h.check_ok(strict(&token)).await),
        None,
        "without a poll the file is not re-read until SIGHUP"
    );
    hangup(std::process::id());
    wait_metric(&h, RELOADED, 1.0).await;
    assert_eq!(
        reason(&h.check_ok(strict(&token)).await).as_deref(),
        Some("not_allowed")
    );

    // SIGHUP with the file unchanged: a successful reload that changes nothing.
    hangup(std::process::id());
    wait_metric(&h, RELOADED, 2.0).await;
    assert_eq!(metric(&metrics(&h).await, SUCCESS), Some(1.0));
    h.stop().await;
}

/// `kill -HUP pid` (the test's own process, or the tokengate it started).
fn hangup(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}

/// The built binary as a pod runs it: `tokengate serve --config FILE`, SIGHUP only
/// (`--watch-config 0s`), its log in a file. A refused file is logged with the problem list
/// `tokengate check-config` prints for it, the process keeps serving the old configuration,
/// and the next SIGHUP with a good file changes the decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_on_sighup_and_logs_why_it_refused() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.yaml");
    let [grpc, admin] = testkit::ports::free_ports::<2>();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let with_ports = |allowed: &str| {
        file_config(&world, allowed).replace(
            "listen:\n",
            &format!("listen:\n  grpc: 127.0.0.1:{grpc}\n  admin: {admin_addr}\n"),
        )
    };
    std::fs::write(&path, with_ports("api/api")).unwrap();
    let log_path = dir.path().join("tokengate.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["serve", "--watch-config", "0s", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("starting tokengate");
    let pid = child.id().unwrap();

    let metrics = || async {
        testkit::http::get(admin_addr, "/metrics", &[])
            .await
            .map(|r| r.body)
            .unwrap_or_default()
    };
    let wait = |name: &'static str, value: f64| {
        let metrics = &metrics;
        let log_path = &log_path;
        async move {
            let deadline = Instant::now() + WITHIN;
            while metric(&metrics().await, name) != Some(value) {
                assert!(
                    Instant::now() < deadline,
                    "{name} never became {value}; log:\n{}",
                    std::fs::read_to_string(log_path).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    };
    wait(SUCCESS, 1.0).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .expect("connecting to tokengate");
    let client = AuthorizationClient::new(channel);
    let token = world.api_token(AUD);
    let decide = |req: CheckRequest| {
        let mut client = client.clone();
        async move { reason(&client.check(req).await.expect("Check").into_inner()) }
    };
    assert_eq!(decide(strict(&token)).await, None);

    // A bad file: refused, logged with check-config's own words, old decisions stand.
    let bad = with_ports("web/web").replace("audiences: [data-store]", "audiences: []");
    std::fs::write(&path, &bad).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let problems: Vec<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .filter(|l| l.trim_start().starts_with("line "))
        .map(|l| l.trim().to_owned())
        .collect();
    assert!(!problems.is_empty(), "{check:?}");
    hangup(pid);
    wait(SUCCESS, 0.0).await;
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("configuration reload refused"), "{logged}");
    for p in &problems {
        assert!(
            logged.contains(p.as_str()),
            "{p:?} not in the log:\n{logged}"
        );
    }
    assert_eq!(decide(strict(&token)).await, None);

    // A good one: applied on the next SIGHUP.
    std::fs::write(&path, with_ports("web/web")).unwrap();
    hangup(pid);
    wait(SUCCESS, 1.0).await;
    assert_eq!(decide(strict(&token)).await.as_deref(), Some("not_allowed"));
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("configuration reloaded"), "{logged}");

    // SIGTERM: a clean exit.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("tokengate did not exit within 30 s")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    world.shutdown().await;
}
