//! The issuer's signing keys, for `verification: local`: OIDC discovery and the JWKS, fetched
//! from the API server with tokengate's own credentials and kept as a [`KeySnapshot`].
//!
//! Discovery (`/.well-known/openid-configuration`) names the issuer and the `jwks_uri`. Only
//! the *path* of `jwks_uri` is used, against the API server we already talk to: its host is
//! the API server's external address, which may not be reachable from inside the cluster.
//! Each published key becomes `kid → (DecodingKey, Algorithm)`; the algorithm is the one the
//! key is for (RS256 for RSA unless the JWK says otherwise, ES256/ES384 by curve), never HMAC
//! and never `none`. A key tokengate cannot use (P-521, EdDSA, malformed) is remembered by kid
//! so that its tokens go to TokenReview instead of being refused.
//!
//! [`KeySet`] holds the current snapshot behind a lock that is only held to clone an `Arc`.
//! It is refreshed periodically ([`KeySet::spawn_refresher`]) and on demand when a token
//! names an unknown `kid` ([`KeySet::refresh_for_unknown_kid`], at most once per
//! `unknown_kid_interval`, single-flight). A failed refresh keeps the last-known keys; their
//! age ([`KeySnapshot::age`]) is what `kubernetes.max_staleness` is compared with. A refresh
//! that drops keys announces their kids ([`KeySet::subscribe_removed`]): verdicts for tokens
//! signed with them must be revoked.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::header::{ACCEPT, AUTHORIZATION};
use http::HeaderValue;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::sync::{broadcast, Mutex};
use tokio::time::Instant;

/// Path of the OIDC discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Largest discovery or JWKS document accepted (bytes).
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Why the keys could not be (re)loaded. The last-known keys stay in use.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// The API server could not be reached or answered with an error.
    #[error("fetching {path}: {message}")]
    Fetch {
        /// The path requested.
        path: String,
        /// What went wrong (kube's error text; no token is ever in it).
        message: String,
    },
    /// The discovery document is not what the API server serves.
    #[error("the OIDC discovery document is invalid: {0}")]
    Discovery(String),
    /// The JWKS is not a JSON Web Key Set with at least one key.
    #[error("the JWKS is invalid: {0}")]
    Jwks(String),
}

impl KeyError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyError::Fetch { .. } => "fetch",
            KeyError::Discovery(_) => "discovery",
            KeyError::Jwks(_) => "jwks",
        }
    }
}

/// The two documents a refresh reads.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `issuer` from the discovery document.
    pub issuer: String,
    /// The JWKS document, as served.
    pub jwks: Vec<u8>,
}

/// Boxed future returned by [`KeySource::fetch`].
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Fetched, KeyError>> + Send + 'a>>;

/// Where the documents come from: the API server ([`KubeKeySource`]), or a fake in tests.
pub trait KeySource: Send + Sync + 'static {
    /// Fetches discovery and the JWKS.
    fn fetch(&self) -> FetchFuture<'_>;
}

/// Supplies the `Authorization` header for each request, when the client does not carry
/// credentials itself (review.rs takes over a kubeconfig `tokenFile` and re-reads it).
pub type AuthHeader = Arc<dyn Fn() -> Option<HeaderValue> + Send + Sync>;

/// Fetches discovery and the JWKS through a `kube::Client`.
#[derive(Clone)]
pub struct KubeKeySource {
    client: kube::Client,
    auth: Option<AuthHeader>,
}

impl std::fmt::Debug for KubeKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeKeySource")
            .field("auth_header", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl KubeKeySource {
    /// Uses `client` as it is (its own credentials).
    pub fn new(client: kube::Client) -> KubeKeySource {
        KubeKeySource { client, auth: None }
    }

    /// Sends `auth()` as the `Authorization` header of every request.
    pub fn with_auth_header(mut self, auth: AuthHeader) -> KubeKeySource {
        self.auth = Some(auth);
        self
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>, KeyError> {
        let fail = |message: String| KeyError::Fetch {
            path: path.to_owned(),
            message,
        };
        let mut request = http::Request::get(path)
            .header(ACCEPT, "application/json, application/jwk-set+json")
            .body(Vec::new())
            .map_err(|e| fail(e.to_string()))?;
        if let Some(header) = self.auth.as_ref().and_then(|a| a()) {
            request.headers_mut().insert(AUTHORIZATION, header);
        }
        let text = self
            .client
            .request_text(request)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(fail(format!("larger than {MAX_DOCUMENT_BYTES} bytes")));
        }
        Ok(text.into_bytes())
    }
}

/// The path (and query) of `jwks_uri`, to be requested from the API server itself.
pub fn jwks_path(jwks_uri: &str) -> Result<String, KeyError> {
    let uri: http::Uri = jwks_uri
        .parse()
        .map_err(|e| KeyError::Discovery(format!("jwks_uri {jwks_uri:?}: {e}")))?;
    match uri.path_and_query().map(|p| p.as_str()) {
        Some(p) if p.starts_with('/') && p != "/" => Ok(p.to_owned()),
        _ => Err(KeyError::Discovery(format!(
            "jwks_uri {jwks_uri:?} has no path"
        ))),
    }
}

impl KeySource for KubeKeySource {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let raw = self.get(DISCOVERY_PATH).await?;
            let doc: Discovery = serde_json::from_slice(&raw).map_err(|e| {
                KeyError::Discovery(format!("not JSON with issuer and jwks_uri: {e}"))
            })?;
            if doc.issuer.is_empty() {
                return Err(KeyError::Discovery("empty issuer".into()));
            }
            let jwks = self.get(&jwks_path(&doc.jwks_uri)?).await?;
            Ok(Fetched {
                issuer: doc.issuer,
                jwks,
            })
        })
    }
}

/// One key tokens can be verified with.
#[derive(Clone)]
pub struct VerifyingKey {
    kid: String,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// The key id (empty if the JWK had none).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// JWS name of [`VerifyingKey::alg`].
    pub fn alg_name(&self) -> &'static str {
        alg_name(self.alg)
    }

    /// Whether `signature` (base64url) is this key's signature over `message` with the key's
    /// algorithm. Any error (bad encoding, wrong length) is `false`.
    pub fn verifies(&self, message: &[u8], signature: &str) -> bool {
        jsonwebtoken::crypto::verify(signature, message, &self.key, self.alg).unwrap_or(false)
    }
}

/// JWS `alg` names of the algorithms a [`VerifyingKey`] can have.
fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        // Never chosen by `key_algorithm`.
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 | Algorithm::EdDSA => "unsupported",
    }
}

/// The algorithm a published key verifies, or `None` if tokengate will not use the key:
/// asymmetric signature algorithms matching the key type only.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let declared = jwk.common.key_algorithm;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match declared {
            None | Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
            Some(KeyAlgorithm::RS512) => Some(Algorithm::RS512),
            Some(KeyAlgorithm::PS256) => Some(Algorithm::PS256),
            Some(KeyAlgorithm::PS384) => Some(Algorithm::PS384),
            Some(KeyAlgorithm::PS512) => Some(Algorithm::PS512),
            Some(_) => None,
        },
        AlgorithmParameters::EllipticCurve(ec) => match (&ec.curve, declared) {
            (EllipticCurve::P256, None | Some(KeyAlgorithm::ES256)) => Some(Algorithm::ES256),
            (EllipticCurve::P384, None | Some(KeyAlgorithm::ES384)) => Some(Algorithm::ES384),
            _ => None,
        },
        // HMAC secrets and EdDSA: the API server never publishes them for SA tokens.
        AlgorithmParameters::OctetKey(_) | AlgorithmParameters::OctetKeyPair(_) => None,
    }
}

/// The keys and issuer as of one successful refresh. Immutable; shared as `Arc`.
#[derive(Debug, Clone)]
pub struct KeySnapshot {
    issuer: String,
    keys: Vec<VerifyingKey>,
    unusable: Vec<String>,
    refreshed_at: SystemTime,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

impl KeySnapshot {
    /// Parses a JWKS document. Keys tokengate cannot use are kept by kid only; a key whose
    /// `use` is not `sig` is ignored. A document with no key at all is an error.
    pub fn from_jwks(
        issuer: &str,
        jwks: &[u8],
        refreshed_at: SystemTime,
    ) -> Result<KeySnapshot, KeyError> {
        let raw: RawSet = serde_json::from_slice(jwks)
            .map_err(|e| KeyError::Jwks(format!("not a JSON Web Key Set: {e}")))?;
        let mut keys = Vec::new();
        let mut unusable = Vec::new();
        for value in raw.keys {
            let kid = value
                .get("kid")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            let jwk = match serde_json::from_value::<Jwk>(value) {
                Ok(jwk) => jwk,
                Err(e) => {
                    tracing::debug!(kid, error = %e, "JWKS: cannot parse a key");
                    unusable.push(kid);
                    continue;
                }
            };
            if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            let key = key_algorithm(&jwk)
                .and_then(|alg| DecodingKey::from_jwk(&jwk).ok().map(|key| (alg, key)));
            match key {
                Some((alg, key)) => keys.push(VerifyingKey { kid, alg, key }),
                None => unusable.push(kid),
            }
        }
        if keys.is_empty() && unusable.is_empty() {
            return Err(KeyError::Jwks("no signing keys".into()));
        }
        Ok(KeySnapshot {
            issuer: issuer.to_owned(),
            keys,
            unusable,
            refreshed_at,
        })
    }

    /// The issuer (`iss`) of the service-account tokens these keys sign.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The usable keys, in JWKS order.
    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// Usable keys with this kid.
    pub fn keys_with_kid<'a>(&'a self, kid: &'a str) -> impl Iterator<Item = &'a VerifyingKey> {
        self.keys.iter().filter(move |k| k.kid == kid)
    }

    /// Kids of published keys tokengate cannot verify with.
    pub fn unusable(&self) -> &[String] {
        &self.unusable
    }

    /// Whether the JWKS lists this kid at all (usable or not).
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid == kid) || self.unusable.iter().any(|k| k == kid)
    }

    /// All published kids, usable or not.
    pub fn kids(&self) -> BTreeSet<String> {
        self.keys
            .iter()
            .map(|k| k.kid.clone())
            .chain(self.unusable.iter().cloned())
            .collect()
    }

    /// Number of usable keys (the key-count metric).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// When these keys were last confirmed by a successful refresh.
    pub fn refreshed_at(&self) -> SystemTime {
        self.refreshed_at
    }

    /// Time since the last successful refresh (zero if the clock went backwards): the JWKS
    /// age metric, compared with `kubernetes.max_staleness`.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.refreshed_at).unwrap_or_default()
    }
}

/// What a successful refresh changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Kids published now but not before.
    pub added: Vec<String>,
    /// Kids published before but not now: verdicts of tokens signed with them are revoked.
    pub removed: Vec<String>,
}

/// Refresh timing.
#[derive(Debug, Clone, Copy)]
pub struct KeySettings {
    /// Period of [`KeySet::spawn_refresher`].
    pub refresh_every: Duration,
    /// Least time between two refreshes caused by unknown kids (and between retries of a
    /// failed periodic refresh).
    pub unknown_kid_interval: Duration,
}

impl Default for KeySettings {
    fn default() -> Self {
        KeySettings {
            refresh_every: Duration::from_secs(60),
            unknown_kid_interval: Duration::from_secs(5),
        }
    }
}

struct Inner {
    source: Box<dyn KeySource>,
    settings: KeySettings,
    current: RwLock<Option<Arc<KeySnapshot>>>,
    /// Held for the duration of a fetch, with the last outcome: concurrent refreshes become one.
    fetching: Mutex<Option<Result<Refreshed, KeyError>>>,
    /// Completed fetches, readable without waiting for the one in flight.
    generation: AtomicU64,
    /// When the last unknown-kid refresh started.
    unknown_kid_gate: Mutex<Option<Instant>>,
    removed: broadcast::Sender<Arc<[String]>>,
}

/// The issuer's keys, refreshed in the background and on unknown kids. Cheap to clone.
#[derive(Clone)]
pub struct KeySet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("settings", &self.inner.settings)
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

impl KeySet {
    /// A key set with no keys yet; call [`KeySet::refresh`] (start-up) and
    /// [`KeySet::spawn_refresher`].
    pub fn new(source: impl KeySource, settings: KeySettings) -> KeySet {
        let (removed, _) = broadcast::channel(16);
        KeySet {
            inner: Arc::new(Inner {
                source: Box::new(source),
                settings,
                current: RwLock::new(None),
                fetching: Mutex::new(None),
                generation: AtomicU64::new(0),
                unknown_kid_gate: Mutex::new(None),
                removed,
            }),
        }
    }

    /// The current keys; `None` until the first successful refresh.
    pub fn snapshot(&self) -> Option<Arc<KeySnapshot>> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Kids removed by refreshes, as they happen.
    pub fn subscribe_removed(&self) -> broadcast::Receiver<Arc<[String]>> {
        self.inner.removed.subscribe()
    }

    /// Fetches discovery and the JWKS now. Callers that arrive while a fetch is running wait
    /// for it and share its outcome instead of fetching again. On error the last-known keys
    /// stay.
    pub async fn refresh(&self) -> Result<Refreshed, KeyError> {
        let seen = self.inner.generation.load(Ordering::Acquire);
        let mut last = self.inner.fetching.lock().await;
        if self.inner.generation.load(Ordering::Acquire) != seen {
            // A fetch completed while we waited: share its outcome.
            if let Some(outcome) = last.as_ref() {
                return outcome.clone();
            }
        }
        let outcome = self.fetch_and_swap().await;
        *last = Some(outcome.clone());
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        outcome
    }

    async fn fetch_and_swap(&self) -> Result<Refreshed, KeyError> {
        let fetched = match self.inner.source.fetch().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the last-known keys");
                return Err(e);
            }
        };
        let next = KeySnapshot::from_jwks(&fetched.issuer, &fetched.jwks, SystemTime::now())
            .inspect_err(|e| tracing::warn!(error = %e, "JWKS refresh: invalid document; keeping the last-known keys"))?;
        let after = next.kids();
        let previous = {
            let mut current = self
                .inner
                .current
                .write()
                .unwrap_or_else(|p| p.into_inner());
            current.replace(Arc::new(next))
        };
        let before = previous.as_ref().map(|p| p.kids()).unwrap_or_default();
        let changes = Refreshed {
            added: after.difference(&before).cloned().collect(),
            removed: before.difference(&after).cloned().collect(),
        };
        if previous
            .as_ref()
            .is_some_and(|p| p.issuer() != fetched.issuer)
        {
            tracing::warn!(issuer = %fetched.issuer, "the service-account issuer changed");
        }
        if !changes.added.is_empty() || !changes.removed.is_empty() {
            tracing::info!(added = ?changes.added, removed = ?changes.removed, "JWKS changed");
        }
        let current = self.snapshot();
        for kid in current.iter().flat_map(|s| s.unusable()) {
            if changes.added.contains(kid) {
                tracing::warn!(kid, "JWKS: a key tokengate cannot verify with; tokens signed with it go to TokenReview");
            }
        }
        if !changes.removed.is_empty() {
            // No receiver is fine: nothing to revoke then.
            let _ = self.inner.removed.send(changes.removed.clone().into());
        }
        Ok(changes)
    }

    /// Called when a token names `kid` and the current snapshot does not list it. Refreshes at
    /// most once per `unknown_kid_interval` across all callers (waiting callers share the
    /// refresh), then returns the snapshot to verify with. Unknown kids in a flood of forged
    /// tokens thus cost one JWKS fetch per interval. A genuine new kid is normally known well
    /// before it is seen: the API server publishes a key at least its `max-age` (1 h) before
    /// signing with it, and the periodic refresh is shorter.
    pub async fn refresh_for_unknown_kid(&self, kid: &str) -> Option<Arc<KeySnapshot>> {
        if let Some(s) = self.snapshot().filter(|s| s.knows(kid)) {
            return Some(s);
        }
        let mut last = self.inner.unknown_kid_gate.lock().await;
        if let Some(s) = self.snapshot().filter(|s| s.knows(kid)) {
            return Some(s);
        }
        if last.is_some_and(|t| t.elapsed() < self.inner.settings.unknown_kid_interval) {
            tracing::debug!(kid, "unknown kid; JWKS refresh rate-limited");
            return self.snapshot();
        }
        *last = Some(Instant::now());
        tracing::info!(kid, "unknown kid; refreshing the JWKS");
        let _ = self.refresh().await;
        drop(last);
        self.snapshot()
    }

    /// Refreshes every `refresh_every` until `shutdown` completes; after a failure, retries
    /// every `unknown_kid_interval` until a refresh succeeds.
    pub fn spawn_refresher(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let keys = self.clone();
        tokio::spawn(async move {
            let run = async {
                let mut wait = keys.inner.settings.refresh_every;
                loop {
                    tokio::time::sleep(wait).await;
                    wait = match keys.refresh().await {
                        Ok(_) => keys.inner.settings.refresh_every,
                        Err(_) => keys
                            .inner
                            .settings
                            .unknown_kid_interval
                            .min(keys.inner.settings.refresh_every),
                    };
                }
            };
            tokio::select! {
                () = run => {}
                () = shutdown => {}
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use kube_standin::keys::SigningKey;
    use kube_standin::KeyAlg;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    fn jwks(keys: &[&SigningKey]) -> Vec<u8> {
        let keys: Vec<_> = keys.iter().map(|k| k.jwk()).collect();
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    /// A source serving whatever JWKS the test put in, counting fetches.
    #[derive(Clone, Default)]
    struct Fake {
        jwks: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
        fetches: Arc<AtomicUsize>,
    }

    impl Fake {
        fn serve(&self, doc: Option<Vec<u8>>) {
            *self.jwks.lock().unwrap() = doc;
        }
    }

    impl KeySource for Fake {
        fn fetch(&self) -> FetchFuture<'_> {
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                match self.jwks.lock().unwrap().clone() {
                    Some(jwks) => Ok(Fetched {
                        issuer: ISSUER.into(),
                        jwks,
                    }),
                    None => Err(KeyError::Fetch {
                        path: "/openid/v1/jwks".into(),
                        message: "down".into(),
                    }),
                }
            })
        }
    }

    #[test]
    fn parses_rsa_and_ec_keys_with_their_algorithms() {
        let rsa = SigningKey::generate(KeyAlg::Rs256).unwrap();
        let ec = SigningKey::generate(KeyAlg::Es256).unwrap();
        let snap = KeySnapshot::from_jwks(ISSUER, &jwks(&[&rsa, &ec]), SystemTime::now()).unwrap();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap.issuer(), ISSUER);
        let r = snap.keys_with_kid(rsa.kid()).next().unwrap();
        assert_eq!(r.alg(), Algorithm::RS256);
        let e = snap.keys_with_kid(ec.kid()).next().unwrap();
        assert_eq!(e.alg(), Algorithm::ES256);
        // A real signature verifies with the right key only.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let sig = b64.encode(rsa.sign(b"a.b").unwrap());
        assert!(r.verifies(b"a.b", &sig));
        assert!(!r.verifies(b"a.c", &sig));
        assert!(!e.verifies(b"a.b", &sig));
        assert!(!r.verifies(b"a.b", "not base64!"));
    }

    #[test]
    fn unusable_and_foreign_keys() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
            {"kty":"EC","kid":"p521","crv":"P-521","alg":"ES512","x":"AA","y":"AA"},
            {"kty":"RSA","kid":"rsa-alg-hs","alg":"HS256","n":"AQAB","e":"AQAB"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"weird","kid":"weird"}
        ]}"#;
        let snap = KeySnapshot::from_jwks(ISSUER, doc, SystemTime::now()).unwrap();
        assert!(snap.is_empty());
        assert!(snap.knows("hmac") && snap.knows("p521") && snap.knows("weird"));
        assert!(snap.knows("rsa-alg-hs"));
        assert!(!snap.knows("enc"), "encryption keys are ignored");
        for bad in [&b"{}"[..], b"[]", b"{\"keys\":[]}", b"not json"] {
            assert!(KeySnapshot::from_jwks(ISSUER, bad, SystemTime::now()).is_err());
        }
    }

    #[test]
    fn jwks_path_is_the_path_of_the_uri() {
        assert_eq!(
            jwks_path("https://172.18.0.2:6443/openid/v1/jwks").unwrap(),
            "/openid/v1/jwks"
        );
        assert_eq!(jwks_path("/openid/v1/jwks").unwrap(), "/openid/v1/jwks");
        assert!(jwks_path("https://example.com").is_err());
        assert!(jwks_path("::").is_err());
    }

    #[test]
    fn age_is_time_since_refresh() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let rsa = SigningKey::generate(KeyAlg::Es256).unwrap();
        let snap = KeySnapshot::from_jwks(ISSUER, &jwks(&[&rsa]), t).unwrap();
        assert_eq!(snap.age(t + Duration::from_secs(7)), Duration::from_secs(7));
        assert_eq!(snap.age(t - Duration::from_secs(7)), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_reports_removed_kids_and_keeps_keys_on_failure() {
        let a = SigningKey::generate(KeyAlg::Es256).unwrap();
        let b = SigningKey::generate(KeyAlg::Es256).unwrap();
        let fake = Fake::default();
        let keys = KeySet::new(fake.clone(), KeySettings::default());
        assert!(keys.snapshot().is_none());
        assert!(keys.refresh().await.is_err());
        fake.serve(Some(jwks(&[&a])));
        let r = keys.refresh().await.unwrap();
        assert_eq!(r.added, vec![a.kid().to_string()]);
        let mut removed = keys.subscribe_removed();
        fake.serve(Some(jwks(&[&b])));
        let r = keys.refresh().await.unwrap();
        assert_eq!(r.removed, vec![a.kid().to_string()]);
        assert_eq!(&*removed.recv().await.unwrap(), &[a.kid().to_string()]);
        // API server down: last-known keys stay.
        fake.serve(None);
        assert!(keys.refresh().await.is_err());
        assert!(keys.snapshot().unwrap().knows(b.kid()));
        // Garbage: same.
        fake.serve(Some(b"{}".to_vec()));
        assert!(keys.refresh().await.is_err());
        assert!(keys.snapshot().unwrap().knows(b.kid()));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kid_refresh_is_rate_limited_and_single_flight() {
        let a = SigningKey::generate(KeyAlg::Es256).unwrap();
        let fake = Fake::default();
        fake.serve(Some(jwks(&[&a])));
        let settings = KeySettings::default();
        let keys = KeySet::new(fake.clone(), settings);
        keys.refresh().await.unwrap();
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
        // Known kid: no fetch.
        keys.refresh_for_unknown_kid(a.kid()).await.unwrap();
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
        // A burst of unknown kids: one fetch.
        let burst: Vec<_> = (0..20)
            .map(|i| {
                let keys = keys.clone();
                tokio::spawn(
                    async move { keys.refresh_for_unknown_kid(&format!("forged-{i}")).await },
                )
            })
            .collect();
        for t in burst {
            assert!(t.await.unwrap().is_some());
        }
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
        // Still inside the interval: no fetch.
        keys.refresh_for_unknown_kid("forged").await;
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
        // A new key appears; after the interval its kid triggers a fetch and is found.
        let b = SigningKey::generate(KeyAlg::Rs256).unwrap();
        fake.serve(Some(jwks(&[&a, &b])));
        tokio::time::advance(settings.unknown_kid_interval).await;
        let snap = keys.refresh_for_unknown_kid(b.kid()).await.unwrap();
        assert!(snap.knows(b.kid()));
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_refresher_refreshes_and_stops() {
        let a = SigningKey::generate(KeyAlg::Es256).unwrap();
        let fake = Fake::default();
        fake.serve(Some(jwks(&[&a])));
        let settings = KeySettings::default();
        let keys = KeySet::new(fake.clone(), settings);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = keys.spawn_refresher(async move {
            let _ = stopped.await;
        });
        tokio::time::sleep(settings.refresh_every * 3 + Duration::from_millis(1)).await;
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 3);
        assert!(keys.snapshot().is_some());
        // Failures retry at the shorter interval.
        fake.serve(None);
        tokio::time::sleep(settings.refresh_every + settings.unknown_kid_interval * 2).await;
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 6);
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
