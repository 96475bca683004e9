//! TLS and mTLS on tokengate's gRPC listener (`listen.tls`): real Envoy running the published
//! `envoy/sidecar-tls.yaml` against tokengate running `envoy/tokengate-sidecar-tls.yaml`, with
//! certificates from a test CA (rcgen) written where the samples expect cert-manager's files.
//!
//! What must hold: Envoy reaches tokengate over TLS, verifying its certificate and presenting
//! its own; a client without a certificate (or with one from another CA) is refused; swapping
//! the certificate and key files under load loses no request and new connections present the
//! new certificate; rotating the proxies' CA under load (tokengate's client CA file re-read,
//! Envoy's client certificate replaced through its file-based SDS) loses no request either;
//! `check-config` names the file and the problem of a bad TLS setting.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::Load;
use common::{published_config, Tokengate};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::echo::spawn_echo;
use testkit::envoy::{render, Envoy, Ports};
use testkit::world::World;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const ENVOY: &str = "envoy/sidecar-tls.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar-tls.yaml";
/// The name tokengate's certificate is issued for and Envoy checks (SNI and SAN).
const NAME: &str = "tokengate-grpc.tokengate.svc";
const HOST: (&str, &str) = ("host", "data-store");

/// A test CA and the files the samples read: `tokengate/{tls.crt,tls.key,ca.crt}` for
/// tokengate and `envoy/{tls.crt,tls.key,ca.crt}` for Envoy's client side.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn("tokengate-test-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca = CertifiedIssuer::self_signed(params, key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for sub in ["tokengate", "envoy"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
            std::fs::write(dir.path().join(sub).join("ca.crt"), ca.pem()).unwrap();
        }
        let pki = Pki { dir, ca };
        let (cert, key) = pki.issue(NAME, 1, ExtendedKeyUsagePurpose::ServerAuth);
        pki.install("tokengate", &cert, &key);
        let (cert, key) = pki.issue("envoy", 2, ExtendedKeyUsagePurpose::ClientAuth);
        pki.install("envoy", &cert, &key);
        pki
    }

    /// A certificate (PEM) for `name` with `serial`, and its new key (PEM).
    fn issue(&self, name: &str, serial: u64, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name = dn(name);
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Replaces `who`'s tls.crt and tls.key, each by a rename (as the kubelet swaps a Secret
    /// volume's files: new inodes), the certificate first.
    fn install(&self, who: &str, cert: &str, key: &str) {
        for (file, text) in [("tls.crt", cert), ("tls.key", key)] {
            let path = self.dir.path().join(who).join(file);
            let tmp = path.with_extension("new");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }

    fn path(&self, who: &str) -> PathBuf {
        self.dir.path().join(who)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// The published tokengate config with the test's files and a fast reload.
fn tokengate_config(pki: &Pki, world: &World) -> String {
    let yaml = published_config(TOKENGATE, &world.standin.kubeconfig_path()).unwrap();
    assert!(yaml.contains("/etc/tokengate-tls/"), "{TOKENGATE}: {yaml}");
    assert!(yaml.contains("reload_interval: 10s"), "{TOKENGATE}");
    yaml.replace(
        "/etc/tokengate-tls/",
        &format!("{}/", pki.path("tokengate").display()),
    )
    .replace("reload_interval: 10s", "reload_interval: 100ms")
}

/// A TLS client: trusts the test CA, checks [`NAME`], offers h2, presents `client` if given.
async fn handshake(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(&Path, &Path)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
}

/// The certificate the server presented.
fn presented(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .to_vec()
}

/// Writes `text` to `path` by a rename (a new inode, as the kubelet swaps Secret files).
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Whether tokengate serves a health Check over a new TLS connection presenting `client`.
async fn served(addr: SocketAddr, ca_pem: &str, client: (&Path, &Path)) -> bool {
    match handshake(addr, ca_pem, Some(client)).await {
        Ok(tls) => health_over(tls).await == Ok(ServingStatus::Serving as i32),
        Err(_) => false,
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after 15 s.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The published Envoy TLS config for `pki`: the SDS files (`envoy/sds/*.yaml`) copied into
/// the test's directory with the certificate directory rewritten, the main config pointing at
/// them, and `max_connection_duration` set to `connection_duration`.
fn envoy_config(pki: &Pki, ports: &Ports, connection_duration: &str) -> String {
    let sds = pki.dir.path().join("sds");
    std::fs::create_dir_all(&sds).unwrap();
    for name in ["tokengate-client.yaml", "tokengate-ca.yaml"] {
        let text = std::fs::read_to_string(testkit::workspace_root().join("envoy/sds").join(name))
            .unwrap();
        assert!(text.contains("{path: /etc/envoy/tokengate-tls}"), "{name}");
        std::fs::write(
            sds.join(name),
            text.replace(
                "/etc/envoy/tokengate-tls",
                &pki.path("envoy").display().to_string(),
            ),
        )
        .unwrap();
    }
    let config = render(ENVOY, ports).unwrap();
    assert!(
        !config.contains("filename: /etc/envoy/tokengate-tls/"),
        "{ENVOY} names certificate files itself instead of through SDS"
    );
    assert!(config.contains("path: /etc/envoy/sds/tokengate-client.yaml"));
    assert!(config.contains("max_connection_duration: 600s"));
    config
        .replace("/etc/envoy/sds", &sds.display().to_string())
        .replace(
            "max_connection_duration: 600s",
            &format!("max_connection_duration: {connection_duration}"),
        )
}

/// An HTTP/2 connection as a tonic client transport.
#[derive(Clone)]
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// grpc.health.v1 Check for the Authorization service over an established TLS stream.
async fn health_over(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Result<i32, String> {
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .map_err(|e| format!("h2 handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let mut client =
        HealthClient::with_origin(H2(send), http::Uri::from_static("https://tokengate"));
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        client.check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        }),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_owned())
    .and_then(|r| r.map_err(|s| format!("{s:?}")))
    .map(|r| r.into_inner().status);
    driver.abort();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let pki = Pki::new();
    let world = World::start().await.unwrap();
    let listener = testkit::ports::listener().await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut gate = Tokengate::start(&tokengate_config(&pki, &world), listener.into())
        .await
        .unwrap();
    let ca = pki.ca.pem();
    let envoy = pki.path("envoy");
    let (cert, key) = (envoy.join("tls.crt"), envoy.join("tls.key"));

    // With the proxies' client certificate: served over TLS, and the certificate is ours.
    let tls = handshake(addr, &ca, Some((&cert, &key))).await.unwrap();
    let expected = std::fs::read(pki.path("tokengate").join("tls.crt")).unwrap();
    let expected = CertificateDer::from_pem_slice(&expected).unwrap();
    assert_eq!(presented(&tls), expected.to_vec());
    assert_eq!(health_over(tls).await, Ok(ServingStatus::Serving as i32));

    // Without a client certificate: refused (TLS 1.3 reports it after the client's Finished,
    // so either the handshake or the first request fails).
    let refused = match handshake(addr, &ca, None).await {
        Err(e) => Err(e.to_string()),
        Ok(tls) => health_over(tls).await,
    };
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );

    // With a certificate from another CA: refused too.
    let other = Pki::new();
    let other_envoy = other.path("envoy");
    let refused = match handshake(
        addr,
        &ca,
        Some((&other_envoy.join("tls.crt"), &other_envoy.join("tls.key"))),
    )
    .await
    {
        Err(e) => Err(e.to_string()),
        Ok(tls) => health_over(tls).await,
    };
    assert!(
        refused.is_err(),
        "a client certificate from another CA was accepted"
    );

    // Plaintext gRPC gets nowhere.
    let plain = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await;
        assert!(r.is_err(), "plaintext gRPC was answered: {r:?}");
    }

    gate.stop().await;
    world.shutdown().await;
}

/// World, tokengate over TLS, echo and Envoy running the TLS sample.
struct Stack {
    world: World,
    gate: Tokengate,
    grpc: SocketAddr,
    echo: testkit::echo::EchoServer,
    envoy: Envoy,
}

impl Stack {
    /// `connection_duration`: Envoy's max_connection_duration to tokengate (600s published).
    async fn start(pki: &Pki, connection_duration: &str) -> Stack {
        let world = World::start().await.unwrap();
        let listener = testkit::ports::listener().await.unwrap();
        let grpc = listener.local_addr().unwrap();
        let gate = Tokengate::start(&tokengate_config(pki, &world), listener.into())
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let echo = spawn_echo(testkit::ports::listener().await.unwrap()).unwrap();
        let ports = Ports::new(grpc.port(), echo.addr().port());
        let config = envoy_config(pki, &ports, connection_duration);
        let envoy = Envoy::start(&config, ports)
            .await
            .unwrap_or_else(|e| panic!("starting envoy: {e:#}"));
        Stack {
            world,
            gate,
            grpc,
            echo,
            envoy,
        }
    }

    async fn finish(mut self) {
        self.gate.stop().await;
        self.world.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_mtls_survives_a_certificate_rotation_under_load() {
    let pki = Pki::new();
    let stack = Stack::start(&pki, "600s").await;
    let token = stack.world.api_token("data-store");

    // Envoy → tokengate over mTLS: allowed with identity, a bad token denied by tokengate.
    let r = testkit::http::get(
        stack.envoy.addr(),
        "/items",
        &[HOST, ("x-client-id", &token)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}\n{}", stack.envoy.diagnostics());
    let r = testkit::http::get(stack.envoy.addr(), "/items", &[HOST])
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        stack
            .envoy
            .stat("cluster.tokengate.ssl.handshake")
            .await
            .unwrap()
            .is_some_and(|n| n >= 1),
        "Envoy made no TLS handshake to tokengate"
    );

    let ca = pki.ca.pem();
    let client = pki.path("envoy");
    let (cert, key) = (client.join("tls.crt"), client.join("tls.key"));
    let first = presented(
        &handshake(stack.grpc, &ca, Some((&cert, &key)))
            .await
            .unwrap(),
    );

    let load = Load::start(
        stack.envoy.addr(),
        "/items",
        &[HOST, ("x-client-id", &token)],
        4,
    );
    load.wait_ok(0, 50).await;

    // Rotate: new key, new certificate (serial 3), as cert-manager renews.
    let (new_cert, new_key) = pki.issue(NAME, 3, ExtendedKeyUsagePurpose::ServerAuth);
    pki.install("tokengate", &new_cert, &new_key);
    let new_der = CertificateDer::from_pem_slice(new_cert.as_bytes())
        .unwrap()
        .to_vec();
    assert_ne!(new_der, first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = presented(
            &handshake(stack.grpc, &ca, Some((&cert, &key)))
                .await
                .unwrap(),
        );
        if now == new_der {
            break;
        }
        assert_eq!(now, first, "neither the old nor the new certificate");
        assert!(
            Instant::now() < deadline,
            "new connections still get the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.wait_ok(load.ok(), 50).await;

    // Envoy kept its connection (existing connections continue with the old certificate);
    // the direct handshakes above show what new connections get.
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the rotation, e.g. {:?}\n{}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)],
        stack.envoy.diagnostics()
    );
    assert_eq!(stack.echo.requests_seen(), ok + 1);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_ca_rotation_through_sds_and_the_client_ca_file_loses_nothing() {
    let pki = Pki::new();
    // Connections re-made every second, so the rotation reaches the connections in use.
    let stack = Stack::start(&pki, "1s").await;
    let token = stack.world.api_token("data-store");
    let r = testkit::http::get(
        stack.envoy.addr(),
        "/items",
        &[HOST, ("x-client-id", &token)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}\n{}", stack.envoy.diagnostics());
    let ca = pki.ca.pem();
    // A client certificate of the old CA, to probe tokengate directly.
    let old = pki.dir.path().join("old-client");
    std::fs::create_dir(&old).unwrap();
    let (cert, key) = pki.issue("probe", 5, ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(old.join("tls.crt"), cert).unwrap();
    std::fs::write(old.join("tls.key"), key).unwrap();
    let old_client = (old.join("tls.crt"), old.join("tls.key"));
    // The new CA, with a client certificate of its own for probing.
    let next = Pki::new();
    let new_client = (
        next.path("envoy").join("tls.crt"),
        next.path("envoy").join("tls.key"),
    );
    assert!(served(stack.grpc, &ca, (&old_client.0, &old_client.1)).await);
    assert!(!served(stack.grpc, &ca, (&new_client.0, &new_client.1)).await);

    let load = Load::start(
        stack.envoy.addr(),
        "/items",
        &[HOST, ("x-client-id", &token)],
        4,
    );
    load.wait_ok(0, 50).await;
    let stat = |name: &'static str| {
        let envoy = &stack.envoy;
        async move { envoy.stat(name).await.unwrap().unwrap_or(0) }
    };

    // 1. tokengate trusts the old and the new CA (its client_ca_file re-read).
    let ca_file = pki.path("tokengate").join("ca.crt");
    replace_file(&ca_file, &format!("{}{}", pki.ca.pem(), next.ca.pem()));
    eventually("tokengate accepts the new CA's client certificates", || {
        served(stack.grpc, &ca, (&new_client.0, &new_client.1))
    })
    .await;
    assert!(served(stack.grpc, &ca, (&old_client.0, &old_client.1)).await);

    // 2. Envoy's client certificate from the new CA, through SDS: the Secret's files replaced
    // in the watched directory, nothing else touched.
    let serial: u64 = 0x7a11_5eed_c0ff_ee01;
    let (cert, key) = {
        let mut params = CertificateParams::new(vec!["envoy".to_owned()]).unwrap();
        params.distinguished_name = dn("envoy");
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &next.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    pki.install("envoy", &cert, &key);
    let admin = stack.envoy.admin_addr();
    eventually(
        "Envoy loads the new client certificate from SDS",
        || async move {
            testkit::http::get(admin, "/certs", &[])
                .await
                .is_ok_and(|r| r.body.contains(&format!("{serial:x}")))
        },
    )
    .await;

    // 3. tokengate drops the old CA: a client certificate of the old CA is refused from now on.
    replace_file(&ca_file, &next.ca.pem());
    eventually(
        "tokengate refuses the old CA's client certificates",
        || async { !served(stack.grpc, &ca, (&old_client.0, &old_client.1)).await },
    )
    .await;
    assert!(served(stack.grpc, &ca, (&new_client.0, &new_client.1)).await);

    // Envoy keeps making new connections (max_connection_duration), now only with the new
    // certificate: they succeed, and Checks keep flowing.
    let handshakes = stat("cluster.tokengate.ssl.handshake").await;
    eventually(
        "Envoy reconnects to tokengate after the old CA is gone",
        || async { stat("cluster.tokengate.ssl.handshake").await >= handshakes + 2 },
    )
    .await;
    load.wait_ok(load.ok(), 50).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the CA rotation, e.g. {:?}\n{}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)],
        stack.envoy.diagnostics()
    );
    // No handshake failed on Envoy's side either (retries could hide one from the load).
    assert_eq!(stat("cluster.tokengate.ssl.connection_error").await, 0);
    assert_eq!(stack.echo.requests_seen(), ok + 1);
    stack.finish().await;
}

/// `tokengate check-config FILE` on `yaml`: (success, stderr).
fn check_config(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_the_tls_file_and_its_problem() {
    let pki = Pki::new();
    let dir = pki.path("tokengate");
    let base = std::fs::read_to_string(testkit::workspace_root().join(TOKENGATE))
        .unwrap()
        .replace("/etc/tokengate-tls/", &format!("{}/", dir.display()));
    let (ok, err) = check_config(&base);
    assert!(ok, "the sample with real files: {err}");

    // A key that belongs to another certificate.
    let (_, other_key) = pki.issue(NAME, 9, ExtendedKeyUsagePurpose::ServerAuth);
    let wrong = dir.join("other.key");
    std::fs::write(&wrong, other_key).unwrap();
    let (ok, err) = check_config(&base.replace(
        &format!("{}/tls.key", dir.display()),
        &wrong.display().to_string(),
    ));
    assert!(!ok);
    assert!(err.contains("listen.tls.key_file"), "{err}");
    assert!(err.contains("does not match the certificate"), "{err}");
    assert!(err.contains(&wrong.display().to_string()), "{err}");

    // A missing certificate file.
    let missing = dir.join("missing.crt");
    let (ok, err) = check_config(&base.replace(
        &format!("{}/tls.crt", dir.display()),
        &missing.display().to_string(),
    ));
    assert!(!ok);
    assert!(err.contains("listen.tls.cert_file"), "{err}");
    assert!(
        err.contains(&format!("cannot read {}", missing.display())),
        "{err}"
    );

    // A client CA file without a certificate.
    let empty = dir.join("empty.crt");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let (ok, err) = check_config(&base.replace(
        &format!("{}/ca.crt", dir.display()),
        &empty.display().to_string(),
    ));
    assert!(!ok);
    assert!(err.contains("listen.tls.client_ca_file"), "{err}");
    assert!(err.contains(&empty.display().to_string()), "{err}");
}

#[test]
fn tls_sample_is_the_sidecar_sample_plus_a_verified_transport_socket() {
    let plain = testkit::yaml::load("envoy/sidecar.yaml").unwrap();
    let mut tls = testkit::yaml::load(ENVOY).unwrap();
    // SDS needs a node identity.
    let node = tls.as_object_mut().unwrap().remove("node").expect("node");
    assert!(node["id"].is_string() && node["cluster"].is_string());
    let clusters = tls["static_resources"]["clusters"].as_array_mut().unwrap();
    let tokengate = clusters
        .iter_mut()
        .find(|c| c["name"] == "tokengate")
        .expect("a tokengate cluster");
    let socket = tokengate
        .as_object_mut()
        .unwrap()
        .remove("transport_socket")
        .expect("the tokengate cluster has a transport_socket");
    // Connections re-made, so rotated files reach every connection.
    let options = &mut tokengate["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    let common_http = options
        .as_object_mut()
        .unwrap()
        .remove("common_http_protocol_options")
        .expect("common_http_protocol_options");
    assert_eq!(common_http["max_connection_duration"], "600s");
    let context = &socket["typed_config"];
    assert_eq!(context["sni"], NAME);
    let common = &context["common_tls_context"];
    // tokengate's name checked; its CA and Envoy's client certificate through file-based SDS
    // with a watched directory.
    let validation = &common["combined_validation_context"];
    assert_eq!(
        validation["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"]
            ["exact"],
        NAME
    );
    let sds = [
        &common["tls_certificate_sds_secret_configs"][0],
        &validation["validation_context_sds_secret_config"],
    ];
    for (secret, (name, file)) in sds.into_iter().zip([
        ("tokengate-client", "envoy/sds/tokengate-client.yaml"),
        ("tokengate-ca", "envoy/sds/tokengate-ca.yaml"),
    ]) {
        assert_eq!(secret["name"], name);
        let source = &secret["sds_config"]["path_config_source"];
        assert_eq!(
            source["path"],
            format!("/etc/envoy/sds/{}", file.rsplit('/').next().unwrap())
        );
        assert_eq!(source["watched_directory"]["path"], "/etc/envoy/sds");
        // The SDS file holds exactly that secret, naming the mounted Secret's files and
        // watching their directory.
        let doc = testkit::yaml::load(file).unwrap();
        let resources = doc["resources"].as_array().unwrap();
        assert_eq!(resources.len(), 1, "{file}: SDS takes one secret per file");
        assert_eq!(resources[0]["name"], name);
        let inner = if name == "tokengate-client" {
            &resources[0]["tls_certificate"]
        } else {
            &resources[0]["validation_context"]
        };
        assert_eq!(
            inner["watched_directory"]["path"],
            "/etc/envoy/tokengate-tls"
        );
    }
    // Apart from TLS, exactly envoy/sidecar.yaml: the tested security settings carry over.
    assert_eq!(tls, plain, "{ENVOY} drifted from envoy/sidecar.yaml");

    // Envoy accepts it (with the SDS and certificate files present).
    let pki = Pki::new();
    let rendered = envoy_config(&pki, &Ports::new(19001, 18081), "600s");
    testkit::envoy::validate_str(&rendered).unwrap_or_else(|e| panic!("{e:#}"));
}
