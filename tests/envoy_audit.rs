//! `mode: audit` through a real Envoy running the published `envoy/sidecar.yaml`, with
//! `envoy/tokengate-sidecar.yaml`'s data-store route switched to audit: would-be denials pass
//! without any identity (spoofed copies included) and with `x-tokengate-audit: <reason>`,
//! are counted as `would_deny`, allows are unchanged, and an API-server outage is still
//! Envoy's `status_on_error` (503).

mod common;

use common::envoy::{assert_api_identity, assert_identity, echo_of, with_spoofed, Stack};
use common::{published_config, world};
use kube_standin::Fault;

const ENVOY: &str = "envoy/sidecar.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar.yaml";
const HOST: (&str, &str) = ("host", "data-store");

async fn stack() -> Stack {
    let world = world().await;
    let yaml = published_config(TOKENGATE, &world.standin.kubeconfig_path()).unwrap();
    let strip = "    strip_token: true";
    assert_eq!(yaml.matches(strip).count(), 1, "{TOKENGATE}");
    let yaml = yaml.replace(strip, "    strip_token: true\n    mode: audit");
    Stack::start_world(ENVOY, world, &yaml, None, None)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_passes_would_be_denials_without_identity() {
    let stack = stack().await;

    // Not on the allow-list: passes, with no identity at all and the reason named.
    let intruder = stack.world.token("default", "intruder", "data-store");
    let headers = with_spoofed(&[
        HOST,
        ("x-client-id", &intruder),
        ("x-tokengate-audit", "forged"),
    ]);
    let resp = stack.get("/items", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_eq!(echo.values("x-tokengate-audit"), vec!["not_allowed"]);
    assert_identity(&echo, &[]);
    assert!(
        !echo.has("x-client-id"),
        "strip_token route forwarded the token: {:?}",
        echo.headers
    );

    // No token at all: also passes, named.
    let resp = stack.get("/items", &with_spoofed(&[HOST])).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_eq!(echo.values("x-tokengate-audit"), vec!["missing_token"]);
    assert_identity(&echo, &[]);

    // Allowed: the identity as in enforce mode, and a client's audit header is removed.
    let token = stack.world.api_token("data-store");
    let headers = with_spoofed(&[
        HOST,
        ("x-client-id", &token),
        ("x-tokengate-audit", "forged"),
    ]);
    let resp = stack.get("/items", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_api_identity(&echo, &stack.world);
    assert!(!echo.has("x-tokengate-audit"), "{:?}", echo.headers);

    let (_, metrics) = stack.tokengate_admin("/metrics").await;
    for line in [
        r#"tokengate_decisions_total{route="data-store",outcome="would_deny",reason="not_allowed"} 1"#,
        r#"tokengate_decisions_total{route="data-store",outcome="would_deny",reason="missing_token"} 1"#,
        r#"tokengate_decisions_total{route="data-store",outcome="allow",reason="ok"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }

    // An outage is not a denial: still status_on_error, never a pass.
    stack.world.standin.set_fault(Fault::Down);
    let fresh = stack.world.token("data-store", "data-store", "data-store");
    let resp = stack.get("/items", &[HOST, ("x-client-id", &fresh)]).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    stack.world.standin.set_fault(Fault::None);
    stack.finish().await;
}
