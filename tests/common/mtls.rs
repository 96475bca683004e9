//! Mesh-style mutual TLS for the peer-binding tests (tests/envoy_peer.rs,
//! tests/envoy_waypoint.rs): a test CA (rcgen) issuing the data-store's server certificate and
//! one client certificate per calling workload, and the calling workloads' sidecar, a
//! client-side Envoy that presents the certificate of the workload named in [`AS`].
//!
//! The certificates are written where the published `envoy/sidecar-mtls.yaml` expects them:
//! [`Pki::cert_paths`] rewrites its `/etc/envoy/mtls/` into the test's directory.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use testkit::envoy::{Envoy, Ports};
use testkit::http::{self, Response};

/// The header the client-side Envoy routes on: which workload certificate to present.
pub const AS: &str = "x-test-as";

/// The data-store's SPIFFE ID (its server certificate; clients verify it).
pub const DATA_STORE_ID: &str = "spiffe://cluster.local/ns/data-store/sa/data-store";

/// A certificate's subject alternative name.
#[derive(Clone, Copy)]
pub enum San {
    /// A URI SAN (a SPIFFE ID).
    Uri(&'static str),
    /// A DNS SAN (no SPIFFE ID).
    Dns(&'static str),
}

/// A client workload: (name, certificate SAN).
pub type Client = (&'static str, San);

/// The test CA and its certificates, in a temporary directory: `ca.crt`, `<name>.crt` /
/// `<name>.key` for the data-store and every client, and the data-store's again as
/// `tls.crt` / `tls.key` (the names envoy/sidecar-mtls.yaml uses).
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    clients: Vec<Client>,
}

impl Pki {
    /// A fresh CA, the data-store's server certificate and one client certificate per entry.
    pub fn new(clients: &[Client]) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn("mesh-test-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca = CertifiedIssuer::self_signed(params, key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            clients: clients.to_vec(),
        };
        pki.issue(
            "data-store",
            San::Uri(DATA_STORE_ID),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        for &(name, san) in clients {
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

    /// The path of one of the files above.
    pub fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Rewrites a rendered envoy/sidecar-mtls.yaml (or a variant) to read its certificates
    /// from this PKI instead of `/etc/envoy/mtls/`; fails when the file names no such path.
    pub fn cert_paths(&self, config: String) -> Result<String> {
        anyhow::ensure!(
            config.contains("/etc/envoy/mtls/"),
            "no /etc/envoy/mtls/ cert paths"
        );
        let dir = format!("{}/", self.dir.path().display());
        Ok(config.replace("/etc/envoy/mtls/", &dir))
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// The calling workloads' sidecar: plain HTTP in, and for each client of `pki` one cluster to
/// `protected` over mTLS presenting that client's certificate, chosen by [`AS`]. It verifies
/// the server's certificate is the data-store's ([`DATA_STORE_ID`]).
pub fn client_envoy_config(pki: &Pki, ports: &Ports, protected: SocketAddr) -> String {
    let mut routes = String::new();
    let mut clusters = String::new();
    for &(name, _) in &pki.clients {
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
              matcher: {{exact: "{DATA_STORE_ID}"}}
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

/// A running client-side Envoy ([`client_envoy_config`]) calling one protected address.
pub struct ClientSidecar {
    /// The client-side Envoy.
    pub envoy: Envoy,
}

impl ClientSidecar {
    /// Starts the client-side Envoy for `pki`'s clients, calling `protected`.
    pub async fn start(pki: &Pki, protected: SocketAddr) -> Result<ClientSidecar> {
        let [listener, admin] = testkit::ports::free_ports::<2>();
        let ports = Ports {
            listener,
            admin,
            authz: 0,
            upstream: protected.port(),
        };
        let config = client_envoy_config(pki, &ports, protected);
        let envoy = Envoy::start(&config, ports)
            .await
            .context("client-side Envoy")?;
        Ok(ClientSidecar { envoy })
    }

    /// GET `path` from workload `who` (its certificate) with `headers`; a failure panics with
    /// this Envoy's and the `protected` Envoy's diagnostics.
    pub async fn get(
        &self,
        protected: &Envoy,
        who: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut all = vec![(AS, who)];
        all.extend_from_slice(headers);
        http::get(self.envoy.addr(), path, &all)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GET {path} as {who}: {e:#}\n{}\n{}",
                    self.envoy.diagnostics(),
                    protected.diagnostics()
                )
            })
    }
}
