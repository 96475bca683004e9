//! The stand-in driven by real clients: the official Python client, kubectl (the seed's
//! own `kubectl create -f tokenreview.yaml -o yaml`, and `kubectl create token`, which
//! sends protobuf), and the `kube-standin serve` process mode.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{
    call, client, client_from_kubeconfig, mint_seed_token, review, seed_like_standin, status_of,
    wait_for_listener, SeedToken,
};
use kube_standin::{MetadataStyle, Options, Standin};
use serde_json::json;

fn python() -> PathBuf {
    let p = match std::env::var_os("TOKENGATE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    };
    assert!(
        p.exists(),
        "Python with the `kubernetes` package not found at {} (set TOKENGATE_PYTHON, or run scripts/test.sh which creates .venv)",
        p.display()
    );
    p
}

/// kubectl: `$KUBECTL`, else the first `kubectl` on `PATH` (scripts/setup.sh requires it).
fn kubectl() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECTL") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("kubectl"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("kubectl not found on PATH (set KUBECTL); scripts/setup.sh requires it")
    })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn python_client_token_request_and_review() {
    let py = python();
    let s = Standin::start(Options::default()).await.unwrap();
    let sa_uid = s.create_service_account("payments", "api");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/python_client.py");
    let admin_kc = s.admin_kubeconfig_path();
    let reviewer_kc = s.kubeconfig_path();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new(py)
            .arg(script)
            .arg(admin_kc)
            .arg(reviewer_kc)
            .args(["payments", "api"])
            .env("PYTHONWARNINGS", "ignore"))
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("script prints JSON");
    assert_eq!(v["token_request"]["audiences"], json!(["vault"]));
    assert_eq!(v["token_request"]["expiration_seconds"], 3600);
    let review_status = &v["review"];
    assert_eq!(review_status["authenticated"], true);
    assert_eq!(review_status["audiences"], json!(["vault"]));
    assert_eq!(
        review_status["user"]["username"],
        "system:serviceaccount:payments:api"
    );
    assert_eq!(review_status["user"]["uid"], sa_uid.as_str());
    assert_eq!(
        review_status["user"]["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:payments",
            "system:authenticated"
        ])
    );
    assert_eq!(
        v["rejected"],
        json!({"user": {}, "error": r#"[invalid bearer token, token audiences ["vault"] is invalid for the target audiences ["other"]]"#})
    );
    assert_eq!(v["unauthorized"]["status"], 401, "{v}");
    assert_eq!(
        v["unauthorized"]["body"],
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401})
    );
    assert_eq!(v["forbidden"]["status"], 403, "{v}");
    assert_eq!(v["forbidden"]["body"]["reason"], "Forbidden");
    assert_eq!(
        v["forbidden"]["body"]["message"],
        r#"tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:payments:api" cannot create resource "tokenreviews" in API group "authentication.k8s.io" at the cluster scope"#
    );
    s.shutdown().await;
}

/// `kubectl --kubeconfig KUBECONFIG create -f FILE -o OUTPUT`, run off the async runtime
/// (the stand-in serves on it); returns stdout.
async fn kubectl_create_from_file(
    kubectl: &Path,
    kubeconfig: &Path,
    file: &Path,
    output: &str,
) -> String {
    let mut cmd = Command::new(kubectl);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["create", "-f"])
        .arg(file)
        .args(["-o", output]);
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap()
}

#[tokio::test]
async fn kubectl_create_tokenreview_from_yaml() {
    let kubectl = kubectl();
    let s = seed_like_standin(MetadataStyle::V133).await;
    let SeedToken {
        sa_uid,
        pod_uid,
        token,
    } = mint_seed_token(&s);
    let yaml = s.dir().join("tokenreview.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec:\n  token: {token}\n"
        ),
    )
    .unwrap();
    let out = kubectl_create_from_file(&kubectl, &s.admin_kubeconfig_path(), &yaml, "yaml").await;
    let expected = format!(
        "apiVersion: authentication.k8s.io/v1
kind: TokenReview
metadata: {{}}
spec:
  token: {token}
status:
  audiences:
  - vault
  authenticated: true
  user:
    extra:
      authentication.kubernetes.io/pod-name:
      - nginx
      authentication.kubernetes.io/pod-uid:
      - {pod_uid}
    groups:
    - system:serviceaccounts
    - system:serviceaccounts:test
    - system:authenticated
    uid: {sa_uid}
    username: system:serviceaccount:test:nginx
"
    );
    assert_eq!(out, expected);

    // The reviewer kubeconfig (tokenFile) works for kubectl too, with the same answer.
    let out = kubectl_create_from_file(&kubectl, &s.kubeconfig_path(), &yaml, "json").await;
    let via_kubectl: serde_json::Value = serde_json::from_str(&out).unwrap();
    let admin = client(&s, Some(&s.admin_token())).await;
    let direct = review(&admin, &token, &[]).await.json();
    assert_eq!(via_kubectl["status"], direct["status"]);
    s.shutdown().await;
}

#[tokio::test]
async fn kubectl_create_token_sends_protobuf() {
    let kubectl = kubectl();
    let s = Standin::start(Options::default()).await.unwrap();
    s.create_service_account("payments", "api");
    let pod_uid = s.create_pod("payments", "api-0", "api", Some("worker-1"));
    let kc = s.admin_kubeconfig_path();
    let k = kubectl.clone();
    let token = tokio::task::spawn_blocking(move || {
        run(Command::new(k).arg("--kubeconfig").arg(kc).args([
            "create",
            "token",
            "api",
            "-n",
            "payments",
            "--audience",
            "vault",
            "--audience",
            "db",
            "--duration",
            "20m",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "api-0",
        ]))
    })
    .await
    .unwrap();
    let token = token.trim();
    let c = common::claims(token);
    assert_eq!(c["aud"], json!(["vault", "db"]));
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        1200
    );
    assert_eq!(c["kubernetes.io"]["pod"]["uid"], pod_uid.as_str());
    assert_eq!(c["kubernetes.io"]["node"]["name"], "worker-1");

    // Errors come back as Status objects kubectl prints.
    let kc = s.admin_kubeconfig_path();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(kc)
            .args([
                "create",
                "token",
                "api",
                "-n",
                "payments",
                "--duration",
                "5m",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        r#"error: failed to create token: TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: 300: may not specify a duration less than 10 minutes"#
    );
    s.shutdown().await;
}

/// Kills the child process on drop (by its own handle), so a failing test leaves nothing.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn process_mode_serves_and_takes_controls() {
    let dir = tempfile::tempdir().unwrap();
    let (guard, url) = serve(
        dir.path(),
        &["--api-audience", "api", "--api-audience", "vault"],
    )
    .await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    for f in [
        "ca.crt",
        "kubeconfig",
        "admin.kubeconfig",
        "reviewer-token",
        "url",
    ] {
        assert!(dir.path().join(f).exists(), "{f} written");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("url"))
            .unwrap()
            .trim(),
        url
    );

    let admin = client_from_kubeconfig(&dir.path().join("admin.kubeconfig")).await;
    let reviewer = client_from_kubeconfig(&dir.path().join("kubeconfig")).await;
    let token = create_demo_app_token(&admin).await;
    let v = review(&reviewer, &token, &["vault"]).await.json();
    assert_eq!(v["status"]["authenticated"], true);

    // Controls are for admins only.
    let a = post_fault(&reviewer, json!({"kind":"hang"})).await;
    assert_eq!(a.status, 403);
    let a = post_fault(&admin, json!({"kind":"status","code":503,"retry_after":1})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // kube's default client retries 503s; a raw request shows the first answer.
    let a = call(
        &admin_no_retry(&dir).await,
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        Some(&json!({"spec":{"token":token}})),
    )
    .await;
    assert_eq!(a.status, 503);
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
    let a = post_fault(&admin, json!({"kind":"none"})).await;
    assert_eq!(a.status, 200);
    let a = post_fault(&admin, json!({"kind":"bogus"})).await;
    assert_eq!(a.status, 400);
    let a = call(&admin, "GET", "/standin/v1/counters", None).await;
    assert_eq!(a.body, r#"{"subject_access_reviews":0,"token_reviews":2}"#);

    // Down for a while, then back on the same port (process-mode down/up).
    let addr: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let a = post_fault(&admin, json!({"kind":"down","ms":700})).await;
    assert_eq!(a.status, 200);
    let every = std::time::Duration::from_millis(10);
    let went_down = wait_for_listener(addr, false, 50, every).await;
    assert!(went_down, "the listener must close");
    let came_back = wait_for_listener(addr, true, 300, every).await;
    assert!(came_back, "the listener must come back on {addr}");
    let fresh = client_from_kubeconfig(&dir.path().join("kubeconfig")).await;
    assert_eq!(
        review(&fresh, &token, &["vault"]).await.json()["status"]["authenticated"],
        true
    );
    drop(guard);
}

/// Over the API, as an admin: creates service account `demo/app` and requests a token for
/// audience `vault` (both must answer 201).
async fn create_demo_app_token(admin: &kube::Client) -> String {
    let a = call(
        admin,
        "POST",
        "/api/v1/namespaces/demo/serviceaccounts",
        Some(&json!({"metadata":{"name":"app"}})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = call(
        admin,
        "POST",
        "/api/v1/namespaces/demo/serviceaccounts/app/token",
        Some(&json!({"spec":{"audiences":["vault"]}})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.json()["status"]["token"].as_str().unwrap().to_string()
}

/// POSTs `fault` to the control endpoint of a process-mode stand-in.
async fn post_fault(c: &kube::Client, fault: serde_json::Value) -> common::Answer {
    call(c, "POST", "/standin/v1/fault", Some(&fault)).await
}

async fn admin_no_retry(dir: &tempfile::TempDir) -> kube::Client {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kc = Kubeconfig::read_from(dir.path().join("admin.kubeconfig")).unwrap();
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    cfg.default_retry = false;
    kube::Client::try_from(cfg).unwrap()
}

/// Starts `kube-standin serve` and returns its guard and URL.
async fn serve(dir: &Path, extra: &[&str]) -> (ChildGuard, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-standin"))
        .args(["serve", "--dir"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kube-standin");
    let stdout = child.stdout.take().unwrap();
    let guard = ChildGuard(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("expected a ready line, got {line:?}"))
        .to_string();
    (guard, url)
}

#[tokio::test]
async fn process_restart_keeps_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (guard, url) = serve(dir.path(), &[]).await;
    let port = url.rsplit(':').next().unwrap().to_string();
    let admin = client_from_kubeconfig(&dir.path().join("admin.kubeconfig")).await;
    let reviewer = client_from_kubeconfig(&dir.path().join("kubeconfig")).await;
    let token = create_demo_app_token(&admin).await;
    let before = review(&reviewer, &token, &["vault"]).await.json();
    assert_eq!(before["status"]["authenticated"], true);
    drop(guard);

    // Same directory and port: same CA, keys, objects and tokens, so the clients built
    // before the restart keep working once it is back.
    let (_guard, url2) = serve(dir.path(), &["--listen", &format!("127.0.0.1:{port}")]).await;
    assert_eq!(url2, url);
    let mut after = None;
    for _ in 0..50 {
        let a = review(&reviewer, &token, &["vault"]).await;
        if a.status == 201 {
            after = Some(a.json());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = after.expect("reviews work after the restart");
    assert_eq!(after["status"], before["status"]);
    assert_eq!(
        status_of(&admin, "GET", "/api/v1/namespaces/demo/serviceaccounts/app").await,
        200
    );
}

/// Reads a child's stdout lines on a thread, for tests that follow a long-running command.
fn lines_of(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_line(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    for _ in 0..200 {
        if let Ok(l) = rx.try_recv() {
            return l;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no output line for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_pods_all_namespaces_watch() {
    let s = Standin::start(Options::default()).await.unwrap();
    s.create_pod("a", "p0", "default", None);
    let mut child = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(s.admin_kubeconfig_path())
        .args(["get", "pods", "-A", "-w", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kubectl");
    let rx = lines_of(child.stdout.take().unwrap());
    let guard = ChildGuard(child);
    assert_eq!(next_line(&rx, "the listed pod").await, "pod/p0");
    s.create_pod("b", "p1", "default", Some("n1"));
    assert_eq!(next_line(&rx, "the added pod").await, "pod/p1");
    // Graceful deletion: the MODIFIED (terminating) and the DELETED event.
    assert!(s.delete_pod_graceful("b", "p1", Some(30)));
    assert_eq!(next_line(&rx, "the terminating pod").await, "pod/p1");
    s.advance_clock(31);
    assert_eq!(next_line(&rx, "the deleted pod").await, "pod/p1");
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_mode_watch_bulk_clock_keys_and_restart() {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Pod;
    use kube::core::PartialObjectMeta;
    use kube::runtime::{reflector, watcher, WatchStreamExt as _};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let (guard, url) = serve(
        dir.path(),
        &["--grant-reviewer-watch", "--bookmark-interval-ms", "200"],
    )
    .await;
    let port = url.rsplit(':').next().unwrap().to_string();
    let admin = client_from_kubeconfig(&dir.path().join("admin.kubeconfig")).await;
    let reviewer = client_from_kubeconfig(&dir.path().join("kubeconfig")).await;

    // Bulk objects through the control.
    let t = Instant::now();
    let a = call(
        &admin,
        "POST",
        "/standin/v1/bulk",
        Some(&json!({"namespaces": 4, "serviceAccounts": 2000, "pods": 20000})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json()["pods"], 20000);
    let bulk_time = t.elapsed();
    // A change after the bulk (the state file is rewritten on every change).
    let t = Instant::now();
    let a = call(
        &admin,
        "POST",
        "/api/v1/namespaces/bulk-0/pods",
        Some(&json!({"metadata":{"name":"extra"},"spec":{"serviceAccountName":"sa-0","nodeName":"n1"}})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let change_time = t.elapsed();
    eprintln!("process bulk {bulk_time:?}, one change after it {change_time:?}");
    assert!(change_time < Duration::from_secs(3), "{change_time:?}");

    // The reviewer (granted by --grant-reviewer-watch) runs the reflector tokengate runs.
    let (store, writer) = reflector::store::<PartialObjectMeta<Pod>>();
    let events = watcher(
        kube::Api::<PartialObjectMeta<Pod>>::all(reviewer.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let task = tokio::spawn(reflector(writer, events).for_each(|_| futures::future::ready(())));
    tokio::time::timeout(Duration::from_secs(60), store.wait_until_ready())
        .await
        .expect("store ready")
        .unwrap();
    let has = |name: &str| {
        store
            .state()
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(name))
    };
    let converge = |what: &'static str, f: &dyn Fn() -> bool| {
        let ok = (0..400).any(|_| {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
            false
        });
        assert!(ok, "store did not converge: {what}");
    };
    tokio::task::block_in_place(|| converge("all pods", &|| store.len() == 20001));

    // Graceful deletion over HTTP, ended with the clock control.
    let a = call(
        &admin,
        "DELETE",
        "/api/v1/namespaces/bulk-0/pods/extra",
        None,
    )
    .await;
    assert_eq!(a.json()["metadata"]["deletionGracePeriodSeconds"], 30);
    let a = call(
        &admin,
        "POST",
        "/standin/v1/clock",
        Some(&json!({"advance_seconds": 31})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        status_of(&admin, "GET", "/api/v1/namespaces/bulk-0/pods/extra").await,
        404
    );
    tokio::task::block_in_place(|| converge("extra deleted", &|| !has("extra")));

    // Key controls.
    let a = call(
        &admin,
        "POST",
        "/standin/v1/keys",
        Some(&json!({"alg":"es256"})),
    )
    .await;
    let kid = a.json()["kid"].as_str().unwrap().to_string();
    let jwks = call(&admin, "GET", "/openid/v1/jwks", None).await.json();
    assert!(jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == kid.as_str()));
    let a = call(&admin, "GET", "/standin/v1/keys", None).await.json();
    assert_ne!(a["signing"], kid.as_str(), "published, not signing");

    // Restart on the same dir and port: the reflector carries on. A large state is saved
    // in the background; /standin/v1/sync waits for it before the kill.
    assert_eq!(
        call(&admin, "POST", "/standin/v1/sync", None).await.status,
        200
    );
    drop(guard);
    let (_guard, url2) = serve(dir.path(), &["--listen", &format!("127.0.0.1:{port}")]).await;
    assert_eq!(url2, url);
    let mut created = false;
    for _ in 0..50 {
        let a = call(
            &admin,
            "POST",
            "/api/v1/namespaces/bulk-1/pods",
            Some(
                &json!({"metadata":{"name":"after-restart"},"spec":{"serviceAccountName":"sa-1"}}),
            ),
        )
        .await;
        if a.status == 201 {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(created);
    tokio::task::block_in_place(|| converge("pod after restart", &|| has("after-restart")));
    assert_eq!(store.len(), 20001);
    let a = call(&admin, "GET", "/standin/v1/keys", None).await.json();
    assert!(
        a["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| *k == kid.as_str()),
        "keys persist"
    );
    // The advanced clock persists too: the pod deleted at +31 s stays gone and new tokens
    // are not "issued in the future" relative to old ones.
    let a = call(
        &admin,
        "POST",
        "/standin/v1/clock",
        Some(&json!({"advance_seconds": 0})),
    )
    .await;
    let now = a.json()["now"].as_i64().unwrap();
    assert!(
        now >= common::now() + 30,
        "clock offset survives the restart: {now}"
    );
    task.abort();
}

/// RBAC objects made and removed with kubectl (protobuf creates, JSON `create -f`, get, list,
/// `delete --wait`), and SubjectAccessReview answering from them as the RBAC authorizer does.
#[tokio::test]
async fn kubectl_rbac_objects_drive_subject_access_review() {
    let s = Standin::start(Options::default()).await.unwrap();
    s.create_service_account("web", "api");
    let admin_kc = s.admin_kubeconfig_path();
    let k = move |args: &[&str]| {
        let mut cmd = Command::new(kubectl());
        cmd.arg("--kubeconfig").arg(&admin_kc).args(args);
        tokio::task::spawn_blocking(move || run(&mut cmd))
    };
    let reviewer = client_from_kubeconfig(&s.kubeconfig_path()).await;
    let sar = |verb: &str, ns: &str| {
        json!({"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview",
            "spec":{"user":"system:serviceaccount:web:api","uid":"u",
                "groups":["system:serviceaccounts","system:serviceaccounts:web","system:authenticated"],
                "extra":{"authentication.kubernetes.io/pod-name":["api-0"]},
                "resourceAttributes":{"namespace":ns,"verb":verb,"resource":"pods","subresource":"log","name":"db-0"}}})
    };
    const PATH: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

    // Nothing grants it: allowed false, no reason; the review echoes its spec.
    let a = call(&reviewer, "POST", PATH, Some(&sar("get", "data"))).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let v = a.json();
    assert_eq!(v["status"], json!({"allowed": false}));
    assert_eq!(v["spec"], sar("get", "data")["spec"]);

    k(&[
        "create",
        "role",
        "logs",
        "-n",
        "data",
        "--verb=get,list",
        "--resource=pods/log",
        "--resource-name=db-0",
    ])
    .await
    .unwrap();
    k(&[
        "create",
        "rolebinding",
        "api-logs",
        "-n",
        "data",
        "--role=logs",
        "--serviceaccount=web:api",
    ])
    .await
    .unwrap();
    let out = k(&["get", "rolebinding", "api-logs", "-n", "data", "-o", "json"])
        .await
        .unwrap();
    let rb: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        rb["roleRef"],
        json!({"apiGroup":"rbac.authorization.k8s.io","kind":"Role","name":"logs"})
    );
    assert_eq!(
        rb["subjects"],
        json!([{"kind":"ServiceAccount","name":"api","namespace":"web"}])
    );
    let out = k(&["get", "roles,rolebindings", "-n", "data", "-o", "name"])
        .await
        .unwrap();
    assert_eq!(
        out,
        "role.rbac.authorization.k8s.io/logs\nrolebinding.rbac.authorization.k8s.io/api-logs\n"
    );

    let v = call(&reviewer, "POST", PATH, Some(&sar("get", "data")))
        .await
        .json();
    assert_eq!(
        v["status"],
        json!({"allowed": true, "reason": "RBAC: allowed by RoleBinding \"api-logs/data\" of Role \"logs\" to ServiceAccount \"api/web\""})
    );
    for (verb, ns) in [("delete", "data"), ("get", "other")] {
        let v = call(&reviewer, "POST", PATH, Some(&sar(verb, ns)))
            .await
            .json();
        assert_eq!(v["status"], json!({"allowed": false}), "{verb} in {ns}");
    }

    // Non-resource URLs with a trailing `*`, granted to a group by a ClusterRoleBinding.
    k(&[
        "create",
        "clusterrole",
        "metrics",
        "--verb=get",
        "--non-resource-url=/metrics/*",
    ])
    .await
    .unwrap();
    k(&[
        "create",
        "clusterrolebinding",
        "web-metrics",
        "--clusterrole=metrics",
        "--group=system:serviceaccounts:web",
    ])
    .await
    .unwrap();
    let nr = |path: &str| {
        json!({"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview",
            "spec":{"user":"system:serviceaccount:web:api","groups":["system:serviceaccounts:web"],
                "nonResourceAttributes":{"path":path,"verb":"get"}}})
    };
    let v = call(&reviewer, "POST", PATH, Some(&nr("/metrics/cpu")))
        .await
        .json();
    assert_eq!(v["status"]["allowed"], true, "{v}");
    let v = call(&reviewer, "POST", PATH, Some(&nr("/metrics")))
        .await
        .json();
    assert_eq!(v["status"]["allowed"], false, "{v}");

    // `kubectl delete rolebinding` (waits for the object to go): the grant is gone.
    let out = k(&["delete", "rolebinding", "api-logs", "-n", "data"])
        .await
        .unwrap();
    assert!(out.contains("deleted"), "{out}");
    let v = call(&reviewer, "POST", PATH, Some(&sar("get", "data")))
        .await
        .json();
    assert_eq!(v["status"], json!({"allowed": false}));

    // Validation (422) and the caller's own authorization (403).
    let mut bad = sar("get", "data");
    bad["spec"]["nonResourceAttributes"] = json!({"path": "/x", "verb": "get"});
    assert_eq!(call(&reviewer, "POST", PATH, Some(&bad)).await.status, 422);
    let mut bad = sar("get", "data");
    bad["spec"]["user"] = json!("");
    bad["spec"]["groups"] = json!([]);
    assert_eq!(call(&reviewer, "POST", PATH, Some(&bad)).await.status, 422);
    let web = s
        .mint(&kube_standin::MintRequest::new("web", "api"))
        .unwrap();
    let a = call(
        &client(&s, Some(&web)).await,
        "POST",
        PATH,
        Some(&sar("get", "data")),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains(r#"cannot create resource \"subjectaccessreviews\" in API group \"authorization.k8s.io\" at the cluster scope"#), "{}", a.body);
    assert_eq!(s.subject_access_reviews_served(), 10);
    s.shutdown().await;
}
