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

use std::net::SocketAddr;

use common::envoy::{assert_api_identity, echo_of, with_spoofed, Stack};
use common::{published_config, world};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use testkit::envoy::{Envoy, Ports};
use testkit::http::{self, Response};

const ENVOY: &str = "envoy/sidecar-mtls.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar-mtls.yaml";
const HOST: (&str, &str) = ("host", "data-store");
/// The header the client-side Envoy routes on: which workload certificate to present.
const AS: &str = "x-test-as";

/// The client workloads: (name, certificate SAN).
const CLIENTS: [(&str, San); 4] = [
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

#[derive(Clone, Copy)]
enum San {
    Uri(&'static str),
    Dns(&'static str),
}

struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn("mesh-test-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca = CertifiedIssuer::self_signed(params, key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        pki.issue(
            "data-store",
            San::Uri("spiffe://cluster.local/ns/data-store/sa/data-store"),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        for (name, san) in CLIENTS {
            pki.issue(name, san, ExtendedKeyUsagePurpose::ClientAuth);
        }
        std::fs::write(pki.dir.path().join("ca.crt"), pki.ca.pem()).unwrap();
        pki
    }

    /// Writes `<name>.crt` / `<name>.key`; the data-store's also as `tls.crt` / `tls.key`.
    fn issue(&self, name: &str, san: San, usage: ExtendedKeyUsagePurpose) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(name);
        params.subject_alt_names = vec![match san {
            San::Uri(uri) => SanType::URI(uri.try_into().unwrap()),
            San::Dns(dns) => SanType::DnsName(dns.try_into().unwrap()),
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let dir = self.dir.path();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        if name == "data-store" {
            std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
            std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// The calling workloads' sidecar: plain HTTP in, and for each client one cluster to the
/// protected Envoy over mTLS presenting that client's certificate, chosen by [`AS`].
fn client_envoy_config(pki: &Pki, ports: &Ports, protected: SocketAddr) -> String {
    let mut routes = String::new();
    let mut clusters = String::new();
    for (name, _) in CLIENTS {
        routes.push_str(&format!(
            "              - match: {{prefix: /, headers: [{{name: {AS}, string_match: {{exact: {name}}}}}]}}\n                route: {{cluster: as-{name}}}\n"
        ));
        clusters.push_str(&format!(
            r#"  - name: as-{name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: as-{name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: {ip}, port_value: {port}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificates:
          - certificate_chain: {{filename: "{crt}"}}
            private_key: {{filename: "{key}"}}
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{exact: "spiffe://cluster.local/ns/data-store/sa/data-store"}}
"#,
            ip = protected.ip(),
            port = protected.port(),
            crt = pki.file(&format!("{name}.crt")),
            key = pki.file(&format!("{name}.key")),
            ca = pki.file("ca.crt"),
        ));
    }
    format!(
        r#"admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: {admin}}}
static_resources:
  listeners:
  - name: outbound
    address:
      socket_address: {{address: 127.0.0.1, port_value: {listener}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{clusters}"#,
        admin = ports.admin,
        listener = ports.listener,
    )
}

struct Mesh {
    stack: Stack,
    client: Envoy,
    _pki: Pki,
}

impl Mesh {
    async fn start() -> Mesh {
        let pki = Pki::new();
        let world = world().await;
        let yaml = published_config(TOKENGATE, &world.standin.kubeconfig_path()).unwrap();
        let dir = format!("{}/", pki.dir.path().display());
        let edit = move |config: String| -> anyhow::Result<String> {
            anyhow::ensure!(
                config.contains("/etc/envoy/mtls/"),
                "{ENVOY}: no cert paths"
            );
            Ok(config.replace("/etc/envoy/mtls/", &dir))
        };
        let stack = Stack::start_world(ENVOY, world, &yaml, None, Some(&edit))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let [listener, admin] = testkit::ports::free_ports::<2>();
        let ports = Ports {
            listener,
            admin,
            authz: 0,
            upstream: stack.envoy.addr().port(),
        };
        let config = client_envoy_config(&pki, &ports, stack.envoy.addr());
        let client = Envoy::start(&config, ports)
            .await
            .unwrap_or_else(|e| panic!("client-side Envoy: {e:#}"));
        Mesh {
            stack,
            client,
            _pki: pki,
        }
    }

    /// GET `path` from workload `who` (its certificate) with `headers`.
    async fn get(&self, who: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut all = vec![(AS, who)];
        all.extend_from_slice(headers);
        http::get(self.client.addr(), path, &all)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GET {path} as {who}: {e:#}\n{}\n{}",
                    self.client.diagnostics(),
                    self.stack.envoy.diagnostics()
                )
            })
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
        assert_eq!(resp.status, 403, "{who}: {resp:?}");
        assert_eq!(
            resp.header("x-tokengate-reason"),
            Some("peer_mismatch"),
            "{who}: {resp:?}"
        );
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
    assert_eq!(resp.header("x-tokengate-reason"), Some("peer_mismatch"));

    let (_, metrics) = mesh.stack.tokengate_admin("/metrics").await;
    let line =
        r#"tokengate_decisions_total{route="data-store",outcome="deny",reason="peer_mismatch"} 3"#;
    assert!(metrics.contains(line), "{line} not in\n{metrics}");

    drop(mesh.client);
    mesh.stack.finish().await;
}
