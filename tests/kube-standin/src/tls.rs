//! The stand-in's PKI: a fresh self-signed CA per start and a serving certificate for
//! `127.0.0.1`, `::1`, `localhost` and the in-cluster names, plus the rustls server config
//! (HTTP/2 and HTTP/1.1 via ALPN, as kube-apiserver offers).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The generated CA and serving certificate.
pub struct Pki {
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// Serving certificate chain (leaf first), DER.
    pub chain_der: Vec<Vec<u8>>,
    /// Serving key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// rustls server configuration presenting the serving certificate.
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Rebuilds the server configuration from saved parts.
pub fn from_parts(
    ca_pem: String,
    chain_der: Vec<Vec<u8>>,
    key_der: Vec<u8>,
) -> anyhow::Result<Pki> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            chain_der
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.clone())),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Pki {
        ca_pem,
        chain_der,
        key_der,
        server_config: Arc::new(cfg),
    })
}

/// Generates the CA and the serving certificate.
pub fn generate() -> anyhow::Result<Pki> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-standin-ca");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer)?;

    from_parts(
        ca_pem,
        vec![server_cert.der().to_vec(), ca_cert.der().to_vec()],
        server_key.serialize_der(),
    )
}
