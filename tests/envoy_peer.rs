//! Peer binding (`require_peer: service_account`) through real Envoy with real mTLS:
//!
//! ```text
//! HTTP client -> client-side Envoy --mTLS, SPIFFE client certificate--> protected Envoy
//!                (one upstream cluster per       (envoy/sidecar-mtls.yaml: client
//!                 workload certificate)           certificates required)  -> echo
//!                                                  | ext_authz: source.principal
//!                                                  v
//!                                                tokengate (envoy/tokengate-sidecar-mtls.yaml)
//! ```
//!
//! Certificates come from a test CA (rcgen), written where the published file expects them.
//! A token presented by its own workload passes; the same token replayed through another
//! workload's certificate, a certificate of another trust domain, or one without a SPIFFE ID
//! is refused `peer_mismatch`.

mod common;

use common::envoy::{assert_api_identity, assert_refused, echo_of, with_spoofed, Stack};
use common::mtls::{Client, ClientSidecar, Pki, San};
use common::{published_config, world};
use testkit::http::Response;

const ENVOY: &str = "envoy/sidecar-mtls.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar-mtls.yaml";
const HOST: (&str, &str) = ("host", "data-store");

/// The client workloads: (name, certificate SAN).
const CLIENTS: [Client; 4] = [
    ("api", San::Uri("spiffe://cluster.local/ns/api/sa/api")),
    (
        "intruder",
        San::Uri("spiffe://cluster.local/ns/default/sa/intruder"),
    ),
    // The right account in another trust domain (the CA here signs for both).
    (
        "elsewhere",
        San::Uri("spiffe://other.example/ns/api/sa/api"),
    ),
    // No SPIFFE ID: Envoy reports the DNS SAN as the principal.
    ("dns", San::Dns("api.api.svc")),
];

struct Mesh {
    stack: Stack,
    client: ClientSidecar,
    _pki: Pki,
}

impl Mesh {
    async fn start() -> Mesh {
        let pki = Pki::new(&CLIENTS);
        let world = world().await;
        let yaml = published_config(TOKENGATE, &world.standin.kubeconfig_path()).unwrap();
        let edit = |config: String| pki.cert_paths(config);
        let stack = Stack::start_world(ENVOY, world, &yaml, None, Some(&edit))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let client = ClientSidecar::start(&pki, stack.envoy.addr())
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        Mesh {
            stack,
            client,
            _pki: pki,
        }
    }

    /// GET `path` from workload `who` (its certificate) with `headers`.
    async fn get(&self, who: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        self.client.get(&self.stack.envoy, who, path, headers).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_passes_only_from_its_own_workload() {
    let mesh = Mesh::start().await;
    let world = &mesh.stack.world;
    let api = world.api_token("data-store");

    // The api workload with its own token: allowed, identity upstream, spoofs overwritten.
    let headers = with_spoofed(&[HOST, ("x-client-id", &api)]);
    let resp = mesh.get("api", "/items", &headers).await;
    assert_eq!(
        resp.status,
        200,
        "{resp:?}\n{}",
        mesh.stack.envoy.diagnostics()
    );
    assert_api_identity(&echo_of(&resp), world);

    // The same token replayed from other peers: refused, whatever the token says.
    for who in ["intruder", "elsewhere", "dns"] {
        let resp = mesh
            .get(who, "/items", &[HOST, ("x-client-id", &api)])
            .await;
        assert_refused(&resp, 403, "peer_mismatch", who);
    }
    assert_eq!(
        mesh.stack.echo.requests_seen(),
        1,
        "a replayed token reached the upstream"
    );

    // The intruder with its own token on a route it may call: allowed. With api's token for
    // that route: refused.
    let intruder_other = world.token("default", "intruder", "other");
    let resp = mesh
        .get(
            "intruder",
            "/internal/x",
            &[HOST, ("x-client-id", &intruder_other)],
        )
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(echo_of(&resp).values("x-k8s-sa-name"), vec!["intruder"]);
    let api_other = world.token("api", "api", "other");
    let resp = mesh
        .get(
            "intruder",
            "/internal/x",
            &[HOST, ("x-client-id", &api_other)],
        )
        .await;
    assert_refused(&resp, 403, "peer_mismatch", "api's token from the intruder");

    let (_, metrics) = mesh.stack.tokengate_admin("/metrics").await;
    let line =
        r#"tokengate_decisions_total{route="data-store",outcome="deny",reason="peer_mismatch"} 3"#;
    assert!(metrics.contains(line), "{line} not in\n{metrics}");

    drop(mesh.client);
    mesh.stack.finish().await;
}
