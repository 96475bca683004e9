//! `verification: local`: judge a service-account token without a TokenReview, as the API
//! server's service-account authenticator would, and build the same [`Identity`].
//!
//! [`verify`] is pure: the token, the route's audiences, a [`KeySnapshot`], an
//! [`ObjectLookup`] (the watch caches of service accounts and pods) and the time in, a
//! [`LocalVerdict`] out. It follows kube-apiserver's order (`pkg/serviceaccount/jwt.go`,
//! `claims.go`; `shared/kubernetes-tokens.md` §4) and words every refusal as the API server
//! would, so logs read the same in both modes:
//!
//! 1. issuer pre-check on the unverified payload (not ours → [`CannotJudge`]);
//! 2. signature with the key named by `kid` (all keys without one), algorithm fixed by the
//!    key (never `none`, never HMAC);
//! 3. issuer again, then audiences ∩ route audiences (before time, as the API server does);
//! 4. `nbf`, `exp`, `iat` with go-jose's 60 s leeway;
//! 5. service account by name and UID, then the bound pod by name and UID (deleted more than
//!    60 s ago counts as gone).
//!
//! What it cannot judge goes to TokenReview ([`LocalVerdict::CannotJudge`]): legacy
//! secret-based tokens, secret- and node-bound tokens, other issuers, keys it cannot use,
//! objects outside the watch caches. When the keys or the caches have not been confirmed by
//! the API server for longer than `max_staleness`, the answer is [`LocalVerdict::Stale`] (gRPC
//! UNAVAILABLE), never a guess.
//!
//! Denial categories match TokenReview mode: no shared audience is `wrong_audience`, expiry
//! beyond the leeway `token_expired`, everything else `token_rejected`. In both modes
//! precheck runs first, so an expired token with a wrong audience is `token_expired` there;
//! here (API-server order) the audience is reported.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::Deserialize;

use crate::identity::{Identity, TokenHash};
use crate::keys::{KeySet, KeySnapshot, VerifyingKey};
use crate::precheck::MAX_TOKEN_BYTES;

/// go-jose `DefaultLeeway`, used by the API server for `exp`, `nbf`, `iat` and deletion
/// timestamps.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// Issuer of legacy secret-based tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";
/// The text of a refusal nobody had an opinion about.
pub const INVALID_BEARER_TOKEN: &str = "invalid bearer token";

/// Go's `base64.RawURLEncoding`: no padding, non-zero trailing bits accepted. The API server
/// decodes with it, so a non-canonical encoding of a valid signature still verifies there.
const GO_RAW_URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// What local verification concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalVerdict {
    /// Signature, claims and objects check out.
    Valid(Box<Verified>),
    /// The API server would refuse this token.
    Invalid(Invalid),
    /// Only TokenReview can judge this token; ask it.
    CannotJudge(CannotJudge),
    /// Keys or object caches are older than `max_staleness`: answer UNAVAILABLE.
    Stale(Stale),
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The identity TokenReview would have produced.
    pub identity: Identity,
    /// Bound pod (namespace, name, UID), if pod-bound.
    pub pod: Option<PodRef>,
    /// `kubernetes.io.node.name`, if present (copied, not checked, for pod-bound tokens).
    pub node_name: Option<String>,
    /// Kid of the key that verified the signature: if it leaves the JWKS, revoke.
    pub kid: String,
    /// `exp` (unix seconds), if present; the verdict must not outlive it (+ leeway).
    pub exp: Option<i64>,
    /// The audiences ∩ route audiences, in route order (TokenReview's `status.audiences`).
    pub audiences: Vec<String>,
    /// `jti`, if present (TokenReview's credential-id is `JTI=<jti>`).
    pub jti: Option<String>,
}

/// A pod a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace (the service account's).
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID from the claim (checked against the cache).
    pub uid: String,
}

/// A refusal: its category and the API server's words for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Which denial it becomes.
    pub kind: InvalidKind,
    /// The service-account authenticator's error, as kube-apiserver words it (for example
    /// `service account token has expired`).
    pub reason: String,
}

impl Invalid {
    fn new(kind: InvalidKind, reason: impl Into<String>) -> Invalid {
        Invalid {
            kind,
            reason: reason.into(),
        }
    }

    /// What TokenReview's `status.error` would say:
    /// `[invalid bearer token, <reason>]`, or bare `invalid bearer token`.
    pub fn token_review_error(&self) -> String {
        if self.reason == INVALID_BEARER_TOKEN {
            INVALID_BEARER_TOKEN.to_owned()
        } else {
            format!("[{INVALID_BEARER_TOKEN}, {}]", self.reason)
        }
    }
}

/// Category of a refusal; each maps to one tokengate denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidKind {
    /// Not a compact JWS with a JSON payload (`malformed_token`).
    Malformed,
    /// Over the 16 KiB limit (`token_too_large`).
    TooLarge,
    /// No audience in common with the route (`wrong_audience`).
    WrongAudience,
    /// `exp` passed beyond the leeway (`token_expired`).
    Expired,
    /// The `kid` is not in the JWKS even after a refresh (`token_rejected`). From [`verify`],
    /// a hint to refresh the keys and try again; [`verify_with_keys`] does that.
    UnknownKey,
    /// Anything else the API server refuses (`token_rejected`).
    Rejected,
}

impl InvalidKind {
    /// The tokengate denial code this becomes (see `Denial::code`).
    pub const fn denial_code(self) -> &'static str {
        match self {
            InvalidKind::Malformed => "malformed_token",
            InvalidKind::TooLarge => "token_too_large",
            InvalidKind::WrongAudience => "wrong_audience",
            InvalidKind::Expired => "token_expired",
            InvalidKind::UnknownKey | InvalidKind::Rejected => "token_rejected",
        }
    }
}

/// Why a token goes to TokenReview. The code is a metric label and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CannotJudge {
    /// `iss: kubernetes/serviceaccount`: secret-based; its Secret is not watched.
    LegacyToken,
    /// Another issuer (or none): another authenticator of the API server may accept it.
    UnknownIssuer,
    /// Bound to a Secret, which is not watched.
    SecretBound,
    /// Bound to a Node only, which is not watched.
    NodeBound,
    /// No `aud`: the API server would use its API audiences, which tokengate does not know.
    NoAudience,
    /// Signed (or possibly signed) with a published key tokengate cannot verify with.
    UnusableKey,
    /// The caches do not hold the service account or pod (not synced, namespace not watched).
    ObjectsUnknown,
    /// Validly signed, but the claims are not shaped as tokengate expects.
    UnexpectedClaims,
}

impl CannotJudge {
    /// Fixed snake_case code (metric label).
    pub const fn code(self) -> &'static str {
        match self {
            CannotJudge::LegacyToken => "legacy_token",
            CannotJudge::UnknownIssuer => "unknown_issuer",
            CannotJudge::SecretBound => "secret_bound",
            CannotJudge::NodeBound => "node_bound",
            CannotJudge::NoAudience => "no_audience",
            CannotJudge::UnusableKey => "unusable_key",
            CannotJudge::ObjectsUnknown => "objects_unknown",
            CannotJudge::UnexpectedClaims => "unexpected_claims",
        }
    }
}

impl fmt::Display for CannotJudge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// What is too old to trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// No keys were ever fetched.
    NoKeys,
    /// The keys were last confirmed this long ago.
    Keys(Duration),
    /// The object caches were last in sync this long ago.
    Objects(Duration),
}

/// An object as the watch cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Present, with its UID and `metadata.deletionTimestamp`.
    Found {
        /// `metadata.uid`.
        uid: String,
        /// `metadata.deletionTimestamp` (terminating objects).
        deletion_timestamp: Option<SystemTime>,
    },
    /// Not in a synced cache: it does not exist.
    Missing,
    /// The cache cannot tell (not synced, namespace not watched).
    Unknown,
}

/// The watch caches of service accounts and pods.
pub trait ObjectLookup: Send + Sync {
    /// Service account `namespace/name`.
    fn service_account(&self, namespace: &str, name: &str) -> Lookup;
    /// Pod `namespace/name`.
    fn pod(&self, namespace: &str, name: &str) -> Lookup;
    /// When the caches were last known to match the API server (now, while the watches are
    /// connected); `None` if they never synced.
    fn synced_at(&self) -> Option<SystemTime>;
}

/// An [`ObjectLookup`] over fixed maps, for tests and for callers that fetched the objects
/// themselves. Namespaces not listed by [`MemoryObjects::watch_only`] are all watched.
#[derive(Debug, Clone, Default)]
pub struct MemoryObjects {
    service_accounts: std::collections::HashMap<(String, String), Lookup>,
    pods: std::collections::HashMap<(String, String), Lookup>,
    watched: Option<Vec<String>>,
    synced_at: Option<SystemTime>,
}

impl MemoryObjects {
    /// Empty caches, in sync as of `synced_at`.
    pub fn new(synced_at: SystemTime) -> MemoryObjects {
        MemoryObjects {
            synced_at: Some(synced_at),
            ..Default::default()
        }
    }

    /// Sets when the caches were last in sync (`None`: never).
    pub fn set_synced_at(&mut self, at: Option<SystemTime>) -> &mut Self {
        self.synced_at = at;
        self
    }

    /// Only these namespaces are watched; lookups elsewhere are [`Lookup::Unknown`].
    pub fn watch_only(&mut self, namespaces: &[&str]) -> &mut Self {
        self.watched = Some(namespaces.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Adds (or replaces) a service account.
    pub fn add_service_account(&mut self, ns: &str, name: &str, uid: &str) -> &mut Self {
        self.service_accounts
            .insert(key(ns, name), found(uid, None));
        self
    }

    /// Adds (or replaces) a pod; `deleting` is its deletion timestamp, if terminating.
    pub fn add_pod(
        &mut self,
        ns: &str,
        name: &str,
        uid: &str,
        deleting: Option<SystemTime>,
    ) -> &mut Self {
        self.pods.insert(key(ns, name), found(uid, deleting));
        self
    }

    /// Marks a service account as terminating.
    pub fn set_service_account_deleting(&mut self, ns: &str, name: &str, at: SystemTime) {
        if let Some(Lookup::Found {
            deletion_timestamp, ..
        }) = self.service_accounts.get_mut(&key(ns, name))
        {
            *deletion_timestamp = Some(at);
        }
    }

    /// Removes a service account.
    pub fn remove_service_account(&mut self, ns: &str, name: &str) {
        self.service_accounts.remove(&key(ns, name));
    }

    /// Removes a pod.
    pub fn remove_pod(&mut self, ns: &str, name: &str) {
        self.pods.remove(&key(ns, name));
    }

    fn get(
        &self,
        map: &std::collections::HashMap<(String, String), Lookup>,
        ns: &str,
        name: &str,
    ) -> Lookup {
        if self.synced_at.is_none()
            || self
                .watched
                .as_ref()
                .is_some_and(|w| !w.iter().any(|n| n == ns))
        {
            return Lookup::Unknown;
        }
        map.get(&key(ns, name)).cloned().unwrap_or(Lookup::Missing)
    }
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), name.to_owned())
}

fn found(uid: &str, deletion_timestamp: Option<SystemTime>) -> Lookup {
    Lookup::Found {
        uid: uid.to_owned(),
        deletion_timestamp,
    }
}

impl ObjectLookup for MemoryObjects {
    fn service_account(&self, namespace: &str, name: &str) -> Lookup {
        self.get(&self.service_accounts, namespace, name)
    }
    fn pod(&self, namespace: &str, name: &str) -> Lookup {
        self.get(&self.pods, namespace, name)
    }
    fn synced_at(&self) -> Option<SystemTime> {
        self.synced_at
    }
}

// ---- claims, as go-jose reads them

/// `jwt.Audience`: a string or an array of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Aud {
    One(String),
    Many(Vec<String>),
}

/// `NumericDate`: any JSON number, truncated to seconds. Numbers outside `i64` (Go's
/// conversion is undefined there) make the claims unreadable, so TokenReview decides.
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(f) = Option::<f64>::deserialize(d)? else {
        return Ok(None);
    };
    // 2^63 is exact as f64; anything at or beyond it does not fit.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if f.is_finite() && f.trunc() < LIMIT && f.trunc() >= -LIMIT {
        Ok(Some(f as i64))
    } else {
        Err(serde::de::Error::custom("numeric date out of range"))
    }
}

#[derive(Debug, Default, Deserialize)]
struct Ref {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
}

#[derive(Debug, Default, Deserialize)]
struct KubeClaims {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    serviceaccount: Option<Ref>,
    #[serde(default)]
    pod: Option<Ref>,
    #[serde(default)]
    secret: Option<Ref>,
    #[serde(default)]
    node: Option<Ref>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Aud>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubeClaims>,
}

#[derive(Deserialize)]
struct IssOnly {
    #[serde(default)]
    iss: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    alg: Option<serde_json::Value>,
    #[serde(default)]
    kid: Option<serde_json::Value>,
}

/// Go's `%q` of a string, as far as names and audiences need it.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\u{0b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%q` of a `[]string`: `["a" "b"]`.
fn go_quote_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", inner.join(" "))
}

/// apimachinery's aggregate: de-duplicated, one error bare, several `[a, b]`.
fn aggregate(errs: &[&str]) -> String {
    let mut uniq: Vec<&str> = Vec::new();
    for e in errs {
        if !uniq.contains(e) {
            uniq.push(e);
        }
    }
    match uniq.as_slice() {
        [one] => (*one).to_owned(),
        _ => format!("[{}]", uniq.join(", ")),
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Deleted before `now − 60 s`: gone for the API server.
fn deleted_for_good(deletion: Option<SystemTime>, now: SystemTime) -> bool {
    match (deletion, now.checked_sub(LEEWAY)) {
        (Some(at), Some(cutoff)) => at < cutoff,
        _ => false,
    }
}

const CRYPTO_ERROR: &str = "go-jose/go-jose: error in cryptographic primitive";
const UNSUPPORTED_ALG: &str = "go-jose/go-jose: unknown/unsupported algorithm";

fn invalid(kind: InvalidKind, reason: impl Into<String>) -> LocalVerdict {
    LocalVerdict::Invalid(Invalid::new(kind, reason))
}

fn rejected(reason: impl Into<String>) -> LocalVerdict {
    invalid(InvalidKind::Rejected, reason)
}

/// Judges `token` for a route with `audiences`, at `now`, as kube-apiserver would (see the
/// module doc for the order). Never panics, whatever the input.
pub fn verify(
    token: &str,
    audiences: &[String],
    keys: &KeySnapshot,
    objects: &dyn ObjectLookup,
    max_staleness: Duration,
    now: SystemTime,
) -> LocalVerdict {
    if token.len() > MAX_TOKEN_BYTES {
        return invalid(
            InvalidKind::TooLarge,
            format!("the token is longer than {MAX_TOKEN_BYTES} bytes"),
        );
    }
    // 1. Issuer pre-check, unverified (`hasCorrectIssuer`).
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return invalid(InvalidKind::Malformed, INVALID_BEARER_TOKEN);
    };
    if token.starts_with('{') {
        return invalid(InvalidKind::Malformed, INVALID_BEARER_TOKEN);
    }
    let Ok(payload) = GO_RAW_URL.decode(payload_b64) else {
        return invalid(InvalidKind::Malformed, INVALID_BEARER_TOKEN);
    };
    let Ok(unverified) = serde_json::from_slice::<IssOnly>(&payload) else {
        return invalid(InvalidKind::Malformed, INVALID_BEARER_TOKEN);
    };
    match unverified.iss.as_ref().and_then(|i| i.as_str()) {
        Some(LEGACY_ISSUER) => return LocalVerdict::CannotJudge(CannotJudge::LegacyToken),
        Some(iss) if iss == keys.issuer() => {}
        _ => return LocalVerdict::CannotJudge(CannotJudge::UnknownIssuer),
    }
    let age = keys.age(now);
    if age > max_staleness {
        return LocalVerdict::Stale(Stale::Keys(age));
    }

    // 2. Parse: a failure is "no opinion" for the API server.
    let header = GO_RAW_URL
        .decode(header_b64)
        .ok()
        .and_then(|h| serde_json::from_slice::<Header>(&h).ok());
    let Some(header) = header else {
        return rejected(INVALID_BEARER_TOKEN);
    };
    let Some(alg) = header.alg.as_ref().and_then(|a| a.as_str()) else {
        return rejected(INVALID_BEARER_TOKEN);
    };
    let kid = match &header.kid {
        None | Some(serde_json::Value::Null) => "",
        Some(serde_json::Value::String(k)) => k.as_str(),
        Some(_) => return rejected(INVALID_BEARER_TOKEN),
    };
    if alg.is_empty() {
        return rejected(INVALID_BEARER_TOKEN);
    }
    let Ok(signature) = GO_RAW_URL.decode(signature_b64) else {
        return rejected(INVALID_BEARER_TOKEN);
    };
    // jsonwebtoken decodes strictly; hand it the canonical encoding of the same bytes.
    let signature = URL_SAFE_NO_PAD.encode(signature);

    // 3. Signature: the keys named by kid, or all of them.
    let candidates: Vec<&VerifyingKey> = if kid.is_empty() {
        keys.keys().iter().collect()
    } else {
        keys.keys_with_kid(kid).collect()
    };
    let unusable_may_apply = if kid.is_empty() {
        !keys.unusable().is_empty()
    } else {
        keys.unusable().iter().any(|k| k == kid)
    };
    if candidates.is_empty() {
        if unusable_may_apply {
            return LocalVerdict::CannotJudge(CannotJudge::UnusableKey);
        }
        return invalid(InvalidKind::UnknownKey, "invalid signature, no keys found");
    }
    let signing_input = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
    let mut errors = Vec::new();
    let mut verified_by = None;
    for key in candidates {
        // The algorithm is the key's; `none`, HS* and anything else never reach the crypto.
        if alg != key.alg_name() {
            errors.push(UNSUPPORTED_ALG);
        } else if key.verifies(signing_input, &signature) {
            verified_by = Some(key);
            break;
        } else {
            errors.push(CRYPTO_ERROR);
        }
    }
    let Some(key) = verified_by else {
        if unusable_may_apply {
            return LocalVerdict::CannotJudge(CannotJudge::UnusableKey);
        }
        return rejected(aggregate(&errors));
    };

    // From here on the payload was written by the API server.
    // Claims of an unexpected shape (signed by the API server, so odd but genuine): let
    // TokenReview decide rather than guess how Go would read them.
    let Ok(claims) = serde_json::from_slice::<Claims>(&payload) else {
        return LocalVerdict::CannotJudge(CannotJudge::UnexpectedClaims);
    };
    // 4. Issuer re-check on the verified claims.
    let iss = claims.iss.as_deref().unwrap_or_default();
    if iss != keys.issuer() {
        return rejected(format!("token issuer {} is invalid", go_quote(iss)));
    }
    // 5. Audience, before time.
    let token_audiences = match claims.aud {
        Some(Aud::One(a)) if !a.is_empty() => vec![a],
        Some(Aud::Many(list)) if !list.is_empty() => list,
        _ => return LocalVerdict::CannotJudge(CannotJudge::NoAudience),
    };
    let shared: Vec<String> = audiences
        .iter()
        .filter(|a| token_audiences.contains(a))
        .cloned()
        .collect();
    if shared.is_empty() {
        return invalid(
            InvalidKind::WrongAudience,
            format!(
                "token audiences {} is invalid for the target audiences {}",
                go_quote_list(&token_audiences),
                go_quote_list(audiences)
            ),
        );
    }
    // 6. Time, in go-jose's order, with its leeway.
    let now_s = unix_seconds(now);
    let leeway = LEEWAY.as_secs() as i64;
    if claims
        .nbf
        .is_some_and(|nbf| now_s.saturating_add(leeway) < nbf)
    {
        return rejected("service account token is not valid yet");
    }
    if claims
        .exp
        .is_some_and(|exp| now_s.saturating_sub(leeway) > exp)
    {
        return invalid(InvalidKind::Expired, "service account token has expired");
    }
    if claims
        .iat
        .is_some_and(|iat| now_s.saturating_add(leeway) < iat)
    {
        return rejected("service account token is issued in the future");
    }
    // 7. Service account, by name and UID.
    let Some(kube) = claims.kubernetes else {
        return LocalVerdict::CannotJudge(CannotJudge::UnexpectedClaims);
    };
    let namespace = kube.namespace;
    let Some(sa) = kube.serviceaccount else {
        return LocalVerdict::CannotJudge(CannotJudge::UnexpectedClaims);
    };
    if namespace.is_empty()
        || sa.name.is_empty()
        || namespace.contains(':')
        || sa.name.contains(':')
    {
        return LocalVerdict::CannotJudge(CannotJudge::UnexpectedClaims);
    }
    match objects.synced_at() {
        None => return LocalVerdict::CannotJudge(CannotJudge::ObjectsUnknown),
        Some(at) => {
            let age = now.duration_since(at).unwrap_or_default();
            if age > max_staleness {
                return LocalVerdict::Stale(Stale::Objects(age));
            }
        }
    }
    match objects.service_account(&namespace, &sa.name) {
        Lookup::Unknown => return LocalVerdict::CannotJudge(CannotJudge::ObjectsUnknown),
        Lookup::Missing => {
            return rejected(format!("serviceaccounts {} not found", go_quote(&sa.name)))
        }
        Lookup::Found {
            uid,
            deletion_timestamp,
        } => {
            if uid != sa.uid {
                return rejected(format!(
                    "service account UID ({uid}) does not match claim ({})",
                    sa.uid
                ));
            }
            if deleted_for_good(deletion_timestamp, now) {
                return rejected(format!(
                    "service account {namespace}/{} has been deleted",
                    sa.name
                ));
            }
        }
    }
    // 8. Secret-bound: not watched.
    if kube.secret.is_some() {
        return LocalVerdict::CannotJudge(CannotJudge::SecretBound);
    }
    // 9. Pod-bound.
    if let Some(pod) = &kube.pod {
        match objects.pod(&namespace, &pod.name) {
            Lookup::Unknown => return LocalVerdict::CannotJudge(CannotJudge::ObjectsUnknown),
            Lookup::Missing => return rejected("service account token has been invalidated"),
            Lookup::Found {
                uid,
                deletion_timestamp,
            } => {
                if uid != pod.uid {
                    return rejected(format!(
                        "pod UID ({uid}) does not match service account pod ref claim ({})",
                        pod.uid
                    ));
                }
                if deleted_for_good(deletion_timestamp, now) {
                    return rejected("service account token has been invalidated");
                }
            }
        }
    }
    // 10. Node-only binding: not watched.
    if kube.node.is_some() && kube.pod.is_none() {
        return LocalVerdict::CannotJudge(CannotJudge::NodeBound);
    }

    // The user TokenReview returns, field for field (review.rs keeps the pod only when both
    // its name and UID are non-empty; so does the API server).
    let pod = kube
        .pod
        .filter(|p| !p.name.is_empty() && !p.uid.is_empty())
        .map(|p| PodRef {
            namespace: namespace.clone(),
            name: p.name,
            uid: p.uid,
        });
    // `extra` as the API server builds it (pkg/serviceaccount/claims.go): the bound pod,
    // the node named in the token, the credential ID.
    let mut extra = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        extra.insert(
            format!("authentication.kubernetes.io/{k}"),
            vec![v.to_owned()],
        );
    };
    if let Some(p) = &pod {
        put("pod-name", &p.name);
        put("pod-uid", &p.uid);
    }
    if let Some(n) = kube.node.as_ref().filter(|n| !n.name.is_empty()) {
        put("node-name", &n.name);
        if !n.uid.is_empty() {
            put("node-uid", &n.uid);
        }
    }
    if let Some(jti) = claims.jti.as_deref().filter(|j| !j.is_empty()) {
        put("credential-id", &format!("JTI={jti}"));
    }
    let identity = Identity {
        username: format!("system:serviceaccount:{namespace}:{}", sa.name),
        groups: vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".to_owned(),
        ],
        namespace,
        name: sa.name,
        uid: Some(sa.uid).filter(|u| !u.is_empty()),
        pod_name: pod.as_ref().map(|p| p.name.clone()),
        pod_uid: pod.as_ref().map(|p| p.uid.clone()),
        extra: crate::identity::Extra::from_map(&extra),
    };
    LocalVerdict::Valid(Box::new(Verified {
        identity,
        pod,
        node_name: kube.node.map(|n| n.name).filter(|n| !n.is_empty()),
        kid: key.kid().to_owned(),
        exp: claims.exp,
        audiences: shared,
        jti: claims.jti.filter(|j| !j.is_empty()),
    }))
}

/// The `kid` in a token's header, if any (for refreshing on an unknown kid).
/// The `kid` of a token's (unverified) header, if it names one as a string.
pub fn header_kid(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let header: Header = serde_json::from_slice(&GO_RAW_URL.decode(header).ok()?).ok()?;
    match header.kid? {
        serde_json::Value::String(k) => Some(k),
        _ => None,
    }
}

/// [`verify`] with the current keys of `keys` and the wall clock; on an unknown kid, asks for
/// a (rate-limited) refresh and verifies once more. Logs the outcome (token as a hash only).
pub async fn verify_with_keys(
    token: &str,
    audiences: &[String],
    keys: &KeySet,
    objects: &dyn ObjectLookup,
    max_staleness: Duration,
) -> LocalVerdict {
    let Some(snapshot) = keys.snapshot() else {
        return LocalVerdict::Stale(Stale::NoKeys);
    };
    let mut verdict = verify(
        token,
        audiences,
        &snapshot,
        objects,
        max_staleness,
        SystemTime::now(),
    );
    if let LocalVerdict::Invalid(Invalid {
        kind: InvalidKind::UnknownKey,
        ..
    }) = &verdict
    {
        if let Some(kid) = header_kid(token) {
            if let Some(fresh) = keys.refresh_for_unknown_kid(&kid).await {
                if !Arc::ptr_eq(&fresh, &snapshot) {
                    verdict = verify(
                        token,
                        audiences,
                        &fresh,
                        objects,
                        max_staleness,
                        SystemTime::now(),
                    );
                }
            }
        }
    }
    match &verdict {
        LocalVerdict::Valid(v) => {
            tracing::debug!(token = %TokenHash(token), user = %v.identity.username, kid = %v.kid, "local verification: valid")
        }
        LocalVerdict::Invalid(i) => {
            tracing::debug!(token = %TokenHash(token), error = %i.token_review_error(), "local verification: invalid")
        }
        LocalVerdict::CannotJudge(why) => {
            tracing::debug!(token = %TokenHash(token), reason = why.code(), "local verification cannot judge this token; falling back to TokenReview")
        }
        LocalVerdict::Stale(what) => {
            // Per request, so debug: the refresher and the caches warn once about the outage.
            tracing::debug!(token = %TokenHash(token), stale = ?what, "local verification: keys or caches too old")
        }
    }
    verdict
}

#[cfg(test)]
mod tests;
