//! The compose demo's `api` service (`deploy/compose/api.py`) run for real: against the
//! Kubernetes API stand-in instead of k3s, and the published Envoy sidecar + tokengate instead
//! of the compose containers. Docker cannot run here, so this is how the one piece of the
//! compose demo that is our own code gets exercised: it must obtain its token through the
//! TokenRequest API, refresh it at 80% of its lifetime, and be let through by tokengate.

mod common;

use std::process::Command;
use std::time::Duration;

use common::envoy::Stack;
use kube_standin::Options;
use testkit::process::ChildGuard;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_service_mints_refreshes_and_is_authenticated() {
    // Short tokens so the 80% refresh happens within the test (k3s itself enforces 10 min,
    // which is why the compose file asks for 600 s).
    let options = Options {
        enforce_min_expiration: false,
        ..Options::default()
    };
    let stack = Stack::start_with(
        "envoy/sidecar.yaml",
        "envoy/tokengate-sidecar.yaml",
        options,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));

    let dir = tempfile::tempdir().unwrap();
    let minter = dir.path().join("minter.token");
    std::fs::write(&minter, stack.world.standin.admin_token()).unwrap();
    let token_path = dir.path().join("tokens/api-token");
    let python = testkit::workspace_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing: run ./scripts/setup.sh",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.arg("-u")
        .arg(testkit::workspace_root().join("deploy/compose/api.py"))
        .env("APISERVER", stack.world.standin.url())
        .env("CA_FILE", stack.world.standin.dir().join("ca.crt"))
        .env("MINTER_TOKEN_FILE", &minter)
        .env("NAMESPACE", "api")
        .env("SERVICE_ACCOUNT", "api")
        .env("AUDIENCE", "data-store")
        .env("EXPIRATION_SECONDS", "3")
        .env("TOKEN_PATH", &token_path)
        .env("DATA_STORE_URL", format!("http://{}/", stack.envoy.addr()))
        .env("LISTEN", "127.0.0.1:0");
    let mut api = ChildGuard::spawn("api.py", cmd).unwrap();

    let ready = api
        .wait_for_stdout_line("ready http://", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let addr: std::net::SocketAddr = ready.trim_start_matches("ready http://").parse().unwrap();
    let first = std::fs::read_to_string(&token_path).unwrap();
    assert!(api
        .stdout()
        .contains("token: minted for api/api audience=data-store"));

    // "One curl shows authenticated": the api calls the data-store with its token.
    let resp = testkit::http::get(addr, "/", &[]).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}\n{}", api.diagnostics());
    let echo = common::envoy::echo_of(&resp);
    assert_eq!(
        echo.message,
        "authenticated as system:serviceaccount:api:api"
    );
    assert!(!echo.has("x-client-id"), "tokengate strips the token");

    // The refresh: a second TokenRequest at 80% of the 3 s lifetime, a new token on disk.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while api.stdout().matches("token: minted").count() < 2 {
        api.ensure_running().unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "no refresh within 20s:\n{}",
            api.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = std::fs::read_to_string(&token_path).unwrap();
    assert_ne!(first, second, "refresh did not replace the token file");
    let resp = testkit::http::get(addr, "/", &[]).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");

    drop(api);
    stack.finish().await;
}
