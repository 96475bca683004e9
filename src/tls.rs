//! TLS (and mTLS) on the gRPC listener: rustls with the aws-lc-rs provider, as everywhere else
//! in tokengate.
//!
//! The certificate and key are read from files (`listen.tls`), as cert-manager and Kubernetes
//! Secret volumes provide them, and re-read when they change: a background task compares the
//! files' modification time, inode and length every `reload_interval` and swaps the
//! [`CertifiedKey`] that [`ReloadingCert`] hands to each new handshake. Existing connections
//! keep the certificate they were opened with. A pair that does not load (a half-written
//! rotation, a key that does not match) is reported and the previous one stays in use. With
//! `client_ca_file`, clients must present a certificate signed by one of its CAs (only the
//! proxies may ask); that file is watched the same way, so a CA rotation (old and new CA side
//! by side, then the new one alone) needs no restart: new handshakes use the new CA set,
//! established connections keep the verification they passed. A CA file that does not load
//! keeps the previous set in use.
//!
//! Handshakes run on their own tasks, so a slow or silent client never holds up `accept`.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::TlsSettings;
use crate::io::ScalarWrites;

/// Longest a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS files could not be used; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) found", .path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no usable PEM private key.
    #[error("{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {reason}", .path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The key is of a kind rustls cannot sign with.
    #[error("{}: unsupported private key: {reason}", .path.display())]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("{} does not match the certificate in {}", .key.display(), .cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The client CA file holds no usable CA certificate.
    #[error("{}: no usable CA certificate: {reason}", .path.display())]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the settings (should not happen with the aws-lc-rs provider).
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// Which `listen.tls` field the problem belongs to (for `check-config`).
    pub fn field(&self) -> &'static str {
        match self {
            TlsError::Read { .. } | TlsError::NoCertificate { .. } | TlsError::Rustls(_) => {
                "cert_file"
            }
            TlsError::NoKey { .. }
            | TlsError::UnsupportedKey { .. }
            | TlsError::Mismatch { .. } => "key_file",
            TlsError::ClientCa { .. } => "client_ca_file",
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a certificate chain and its key, and checks that they belong together.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read(cert_file)?;
    let key_pem = read(key_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: key_file.to_owned(),
        reason: e.to_string(),
    })?;
    let signing_key =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::UnsupportedKey {
                path: key_file.to_owned(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
    })?;
    Ok(certified)
}

fn client_verifier(
    ca_file: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let pem = read(ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
        roots.add(cert).map_err(|e| TlsError::ClientCa {
            path: ca_file.to_owned(),
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::ClientCa {
            path: ca_file.to_owned(),
            reason: "no PEM certificate found".to_owned(),
        });
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: ca_file.to_owned(),
            reason: e.to_string(),
        })
}

/// Checks that the files of `settings` load (what `check-config` and start-up report).
pub fn check(settings: &TlsSettings) -> Result<(), TlsError> {
    load_certified_key(&settings.cert_file, &settings.key_file)?;
    if let Some(ca) = &settings.client_ca_file {
        client_verifier(ca)?;
    }
    Ok(())
}

/// What identifies a version of a file without reading it: Secret volumes swap a symlink, so
/// the inode changes; an in-place rewrite changes the modification time or the length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(SystemTime, u64, u64)>);

impl Stamp {
    fn of(path: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp(
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.ino(), m.len()))),
        )
    }
}

/// The client CA file, re-read when it changes.
#[derive(Debug)]
struct ReloadingCa {
    file: PathBuf,
    stamp: std::sync::Mutex<Stamp>,
}

impl ReloadingCa {
    fn load(
        file: &Path,
    ) -> Result<
        (
            ReloadingCa,
            Arc<dyn rustls::server::danger::ClientCertVerifier>,
        ),
        TlsError,
    > {
        let stamp = Stamp::of(file);
        let verifier = client_verifier(file)?;
        let ca = ReloadingCa {
            file: file.to_owned(),
            stamp: std::sync::Mutex::new(stamp),
        };
        Ok((ca, verifier))
    }

    /// A verifier for the file's new contents if it changed since the last look and loads.
    fn reload_if_changed(&self) -> Option<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
        let now = Stamp::of(&self.file);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return None;
            }
            // Reported once per version; a fixed file is a new version.
            *seen = now;
        }
        match client_verifier(&self.file) {
            Ok(verifier) => {
                tracing::info!(client_ca_file = %self.file.display(), "TLS client CA reloaded; new connections are verified against it");
                Some(verifier)
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS client CA file changed but does not load; keeping the previous CAs");
                None
            }
        }
    }
}

/// The serving certificate, replaced when its files change; each handshake takes the current
/// one.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: std::sync::Mutex<(Stamp, Stamp)>,
}

impl ReloadingCert {
    fn load(cert_file: &Path, key_file: &Path) -> Result<ReloadingCert, TlsError> {
        let stamps = (Stamp::of(cert_file), Stamp::of(key_file));
        let key = load_certified_key(cert_file, key_file)?;
        Ok(ReloadingCert {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(Arc::new(key)),
            stamps: std::sync::Mutex::new(stamps),
        })
    }

    /// Re-reads the files if they changed since the last look. Returns whether a new
    /// certificate is now in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = (Stamp::of(&self.cert_file), Stamp::of(&self.key_file));
        {
            let mut seen = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return false;
            }
            // Remember this version either way: a broken pair is reported once, and tried
            // again when either file changes (the other half of a rotation arriving).
            *seen = now;
        }
        match load_certified_key(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                tracing::info!(cert_file = %self.cert_file.display(), "TLS certificate reloaded; new connections use it");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate files changed but do not load; keeping the previous certificate");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The TLS side of the gRPC listener: the rustls configuration, the reloading certificate and
/// the reloading client CA.
#[derive(Clone)]
pub struct Acceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    cert: Arc<ReloadingCert>,
    client_ca: Option<Arc<ReloadingCa>>,
    reload_interval: Duration,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("cert", &self.cert.cert_file)
            .field("reload_interval", &self.reload_interval)
            .finish()
    }
}

impl Acceptor {
    /// Loads the files of `settings`; HTTP/2 only (gRPC), client certificates required when a
    /// client CA is given.
    pub fn new(settings: &TlsSettings) -> Result<Acceptor, TlsError> {
        let cert = Arc::new(ReloadingCert::load(
            &settings.cert_file,
            &settings.key_file,
        )?);
        let (client_ca, verifier) = match &settings.client_ca_file {
            Some(file) => {
                let (ca, verifier) = ReloadingCa::load(file)?;
                (Some(Arc::new(ca)), Some(verifier))
            }
            None => (None, None),
        };
        Ok(Acceptor {
            acceptor: server_config(cert.clone(), verifier)?,
            cert,
            client_ca,
            reload_interval: settings.reload_interval,
        })
    }

    /// Accepts on `listener` until the returned stream is dropped (tonic drops it when it
    /// stops accepting), handshaking each connection on its own task. Also polls the
    /// certificate files for changes meanwhile.
    pub fn incoming(self, listener: tokio::net::TcpListener) -> TlsIncoming {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.accept_loop(listener, tx));
        TlsIncoming(rx)
    }

    async fn accept_loop(
        mut self,
        listener: tokio::net::TcpListener,
        tx: mpsc::Sender<std::io::Result<ScalarWrites<TlsConnection>>>,
    ) {
        let mut reload = tokio::time::interval(self.reload_interval);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (tcp, peer) = tokio::select! {
                () = tx.closed() => return, // the server stopped accepting: close the port
                _ = reload.tick() => {
                    let (cert, ca) = (self.cert.clone(), self.client_ca.clone());
                    // File metadata and PEM parsing are blocking calls.
                    let new_ca = tokio::task::spawn_blocking(move || {
                        cert.reload_if_changed();
                        ca.and_then(|ca| ca.reload_if_changed())
                    })
                    .await;
                    if let Ok(Some(verifier)) = new_ca {
                        // The verifier is fixed per rustls configuration: build a new one
                        // (same certificate resolver) for the handshakes from now on.
                        match server_config(self.cert.clone(), Some(verifier)) {
                            Ok(acceptor) => self.acceptor = acceptor,
                            Err(e) => tracing::warn!(error = %e, "TLS client CA reload failed; keeping the previous CAs"),
                        }
                    }
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed");
                        // e.g. out of file descriptors: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (self.acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(ScalarWrites(TlsConnection(tls)))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    }
}

/// The rustls configuration: HTTP/2 only (gRPC), the reloading certificate, and client
/// certificates required when a verifier is given.
fn server_config(
    cert: Arc<ReloadingCert>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Connections that completed their handshake, as the stream tonic serves.
pub struct TlsIncoming(mpsc::Receiver<std::io::Result<ScalarWrites<TlsConnection>>>);

impl tonic::codegen::tokio_stream::Stream for TlsIncoming {
    type Item = std::io::Result<ScalarWrites<TlsConnection>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// A server-side TLS connection over TCP (a local type, so it can tell tonic its peer).
pub struct TlsConnection(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, as PEM.
    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        for (path, text) in [(&c, cert), (&k, key)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (c, k)
    }

    fn leaf(cert: &ReloadingCert) -> Vec<u8> {
        cert.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn errors_name_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pair("a"), pair("b"));
        let (cert, _) = write(dir.path(), &a);
        let other_key = dir.path().join("other.key");
        std::fs::write(&other_key, &b.1).unwrap();
        let e = load_certified_key(&cert, &other_key).unwrap_err();
        assert_eq!(e.field(), "key_file");
        let text = e.to_string();
        assert!(
            text.contains("other.key") && text.contains("tls.crt"),
            "{text}"
        );

        let e = load_certified_key(&dir.path().join("nope.crt"), &other_key).unwrap_err();
        assert_eq!(e.field(), "cert_file");
        assert!(e.to_string().contains("nope.crt"), "{e}");

        let e = load_certified_key(&other_key, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = load_certified_key(&cert, &cert).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
    }

    #[test]
    fn a_changed_client_ca_is_reloaded_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.crt");
        let replace = |text: &str| {
            let tmp = dir.path().join("ca.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        };
        let (a, b) = (pair("ca-a"), pair("ca-b"));
        replace(&a.0);
        let (ca, first) = ReloadingCa::load(&file).unwrap();
        let subjects = |v: &Arc<dyn rustls::server::danger::ClientCertVerifier>| {
            v.root_hint_subjects()
                .iter()
                .map(|dn| dn.as_ref().to_vec())
                .collect::<Vec<Vec<u8>>>()
        };
        assert_eq!(subjects(&first).len(), 1);
        assert!(ca.reload_if_changed().is_none(), "nothing changed");

        // Both CAs (the first step of a rotation): a verifier trusting both.
        replace(&format!("{}{}", a.0, b.0));
        let both = ca.reload_if_changed().expect("the new CA set");
        assert_eq!(subjects(&both).len(), 2);
        assert!(subjects(&both).contains(&subjects(&first)[0]));

        // A broken file is refused (the caller keeps what it has), once.
        replace("not a certificate\n");
        assert!(ca.reload_if_changed().is_none());
        assert!(ca.reload_if_changed().is_none());

        // The new CA alone.
        replace(&b.0);
        let last = ca.reload_if_changed().expect("the new CA alone");
        assert_eq!(subjects(&last).len(), 1);
        assert_ne!(subjects(&last), subjects(&first));
    }

    #[test]
    fn a_changed_pair_is_reloaded_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pair("a"), pair("b"));
        let (cert, key) = write(dir.path(), &a);
        let reloading = ReloadingCert::load(&cert, &key).unwrap();
        let first = leaf(&reloading);
        assert!(!reloading.reload_if_changed(), "nothing changed");

        write(dir.path(), &b);
        assert!(reloading.reload_if_changed());
        let second = leaf(&reloading);
        assert_ne!(first, second);

        // Half a rotation: a's certificate with b's key. Refused, b stays.
        let tmp = dir.path().join("half");
        std::fs::write(&tmp, &a.0).unwrap();
        std::fs::rename(&tmp, &cert).unwrap();
        assert!(!reloading.reload_if_changed());
        assert_eq!(leaf(&reloading), second);
        // The other half arrives: a is in use.
        std::fs::write(&tmp, &a.1).unwrap();
        std::fs::rename(&tmp, &key).unwrap();
        assert!(reloading.reload_if_changed());
        assert_eq!(leaf(&reloading), first);
    }
}
