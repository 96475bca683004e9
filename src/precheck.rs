//! Cheap rejection on *unverified* claims, before any TokenReview is spent on a token.
//!
//! A flood of junk tokens must not become a flood of TokenReviews (each one an API-server
//! call; see ai-dynamo/modelexpress#530). So precheck refuses, without verifying anything,
//! what the API server itself would refuse before looking up a key
//! (`/work/shared/kubernetes-tokens.md` §2 and §4):
//!
//! - not a compact JWS (three base64url parts), or over 16 KiB: `malformed_token` /
//!   `token_too_large`;
//! - a header that is not a JSON object with a string `alg`, or a payload that is not a JSON
//!   object with a string `iss`: `malformed_token`;
//! - an `alg` the cluster does not sign with (`none`, `HS256`, ...; the API server signs with
//!   RS256 or ES256/384/512), a `kid` that is not the shape the API server derives (43
//!   base64url characters, or empty/absent on very old legacy tokens), a signature whose
//!   length cannot come from a key of that algorithm, or an `iss` other than the cluster's
//!   issuer (when one is known) or the legacy `kubernetes/serviceaccount`: `token_rejected`,
//!   the answer TokenReview would give, so precheck is no oracle;
//! - an `exp` in the past (with the API server's own 60 s leeway): `token_expired`;
//! - an `aud` that shares nothing with the route's audiences: `wrong_audience`.
//!
//! Nothing is trusted: a token that passes still goes to TokenReview. A legacy secret-based
//! token has neither `aud` nor `exp` and passes. [`Expect`] carries what is known about the
//! cluster (its issuer, the algorithms it signs with, the shape of its key ids), learned from
//! the API server's OIDC discovery or configured; [`Expect::default`] assumes only what every
//! cluster does.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;

use crate::denial::Denial;

/// Longest token accepted (bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The API server's clock leeway for `exp` (go-jose `DefaultLeeway`).
pub const EXP_LEEWAY_SECS: i64 = 60;
/// The issuer of legacy secret-based tokens, accepted by its own authenticator whatever the
/// cluster's `--service-account-issuer`.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";
/// Length of a `kid` as the API server derives it: base64url (no padding) of a SHA-256.
pub const DERIVED_KID_LEN: usize = 43;
/// Longest `kid` accepted under [`KidShape::Any`].
pub const MAX_KID_LEN: usize = 256;

/// A JWS algorithm the API server signs service-account tokens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// RSA keys.
    Rs256,
    /// ECDSA P-256.
    Es256,
    /// ECDSA P-384.
    Es384,
    /// ECDSA P-521.
    Es512,
}

impl Alg {
    /// Every algorithm a cluster may sign with (`pkg/serviceaccount/jwt.go`).
    pub const ALL: [Alg; 4] = [Alg::Rs256, Alg::Es256, Alg::Es384, Alg::Es512];

    /// The JWS name (`RS256`, ...), as in a header or in OIDC discovery's
    /// `id_token_signing_alg_values_supported`.
    pub const fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::Es512 => "ES512",
        }
    }

    /// The algorithm named `name` (exact, case-sensitive as in JWS), if a cluster may sign with
    /// it.
    pub fn parse(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Signature lengths (bytes) a key of this algorithm produces: the RSA modulus size
    /// (1024 to 8192 bits; Go refuses smaller keys), or R‖S for ECDSA.
    const fn signature_bytes(self) -> (usize, usize) {
        match self {
            Alg::Rs256 => (128, 1024),
            Alg::Es256 => (64, 64),
            Alg::Es384 => (96, 96),
            Alg::Es512 => (132, 132),
        }
    }
}

/// Which `kid` values are plausible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KidShape {
    /// What the API server derives from its keys: 43 base64url characters (SHA-256 of the
    /// public key), or empty or absent (very old legacy tokens).
    #[default]
    Derived,
    /// Any string of up to [`MAX_KID_LEN`] visible ASCII characters, or absent: for key ids
    /// chosen elsewhere (an external signer, `--service-account-signing-endpoint`).
    Any,
}

/// What is known about the cluster's tokens. The default assumes only what every cluster
/// does: some issuer, the algorithms of [`Alg::ALL`], derived key ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect<'a> {
    /// The cluster's issuer (the first `--service-account-issuer`, as OIDC discovery
    /// reports it, or `kubernetes.issuer`); `None` when unknown, and then any non-empty `iss`
    /// passes. [`LEGACY_ISSUER`] always passes.
    pub issuer: Option<&'a str>,
    /// Algorithms the cluster signs with (discovery's `id_token_signing_alg_values_supported`).
    pub algs: &'a [Alg],
    /// Plausible key ids.
    pub kid: KidShape,
}

impl Default for Expect<'_> {
    fn default() -> Self {
        Expect {
            issuer: None,
            algs: &Alg::ALL,
            kid: KidShape::Derived,
        }
    }
}

/// What precheck learned from the unverified payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// `exp` (unix seconds), if present; caps the cache TTL.
    pub exp: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Aud {
    One(String),
    Many(Vec<String>),
}

fn is_b64url(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Decoded length of unpadded base64url text of `chars` characters; `None` for a length no
/// encoder produces.
fn decoded_len(chars: usize) -> Option<usize> {
    match chars % 4 {
        1 => None,
        r => Some(chars / 4 * 3 + r.saturating_sub(1)),
    }
}

type Object = serde_json::Map<String, serde_json::Value>;

/// A base64url part that decodes to a JSON object (not an array, number, ...).
fn object(part: &str) -> Result<Object, Denial> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Denial::MalformedToken)?;
    serde_json::from_slice::<Object>(&bytes).map_err(|_| Denial::MalformedToken)
}

fn kid_is_plausible(kid: &str, shape: KidShape) -> bool {
    match shape {
        KidShape::Derived => kid.is_empty() || (kid.len() == DERIVED_KID_LEN && is_b64url(kid)),
        KidShape::Any => kid.len() <= MAX_KID_LEN && kid.bytes().all(|b| b.is_ascii_graphic()),
    }
}

/// Checks `token` against the route's `audiences` at `now` (unix seconds), assuming only
/// what every cluster does ([`Expect::default`]).
pub fn precheck(token: &str, audiences: &[String], now: i64) -> Result<Claims, Denial> {
    precheck_with(token, audiences, now, &Expect::default())
}

/// Checks `token` against the route's `audiences` at `now` (unix seconds) and what is known
/// about the cluster (`expect`).
pub fn precheck_with(
    token: &str,
    audiences: &[String],
    now: i64,
    expect: &Expect<'_>,
) -> Result<Claims, Denial> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Denial::TokenTooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Denial::MalformedToken);
    };
    if !is_b64url(header) || !is_b64url(payload) || !is_b64url(signature) {
        return Err(Denial::MalformedToken);
    }
    let signature_bytes = decoded_len(signature.len()).ok_or(Denial::MalformedToken)?;

    // Header: {"alg":"RS256","kid":"<43 chars>"}.
    let header = object(header)?;
    let Some(serde_json::Value::String(alg)) = header.get("alg") else {
        return Err(Denial::MalformedToken);
    };
    let alg = match Alg::parse(alg) {
        Some(a) if expect.algs.contains(&a) => a,
        // `none`, HS256 (a forger's shared secret), or an algorithm this cluster does not use.
        _ => return Err(Denial::TokenRejected),
    };
    match header.get("kid") {
        None => {}
        Some(serde_json::Value::String(kid)) if kid_is_plausible(kid, expect.kid) => {}
        Some(_) => return Err(Denial::TokenRejected),
    }
    let (min, max) = alg.signature_bytes();
    if !(min..=max).contains(&signature_bytes) {
        return Err(Denial::TokenRejected);
    }

    // Payload: an object with the issuer's `iss`.
    let claims = object(payload)?;
    let Some(serde_json::Value::String(iss)) = claims.get("iss") else {
        return Err(Denial::MalformedToken);
    };
    let issuer_ok = match expect.issuer {
        _ if iss == LEGACY_ISSUER => true,
        Some(expected) => iss == expected,
        None => !iss.is_empty(),
    };
    if !issuer_ok {
        return Err(Denial::TokenRejected);
    }
    let exp = match claims.get("exp") {
        None => None,
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(e) if e.is_finite() => Some(e as i64),
            _ => return Err(Denial::MalformedToken),
        },
        Some(_) => return Err(Denial::MalformedToken),
    };
    if let Some(exp) = exp {
        if now.saturating_sub(EXP_LEEWAY_SECS) > exp {
            return Err(Denial::TokenExpired);
        }
    }
    let aud = match claims.get("aud") {
        None => None,
        Some(v) => Some(Aud::deserialize(v).map_err(|_| Denial::MalformedToken)?),
    };
    let overlaps = |a: &str| audiences.iter().any(|r| r == a);
    match &aud {
        None => {}
        Some(Aud::One(a)) if overlaps(a) => {}
        Some(Aud::Many(list)) if list.iter().any(|a| overlaps(a)) => {}
        Some(_) => return Err(Denial::WrongAudience),
    }
    Ok(Claims { exp })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const KID: &str = "Yq2mQ3rD0-1x_ZsQe9sYv7u0pKqL6m7hR1cX2wY3z4A";

    fn b64(s: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// A token with this header and payload and a signature of `sig_bytes` bytes.
    fn token(header: &str, payload: &str, sig_bytes: usize) -> String {
        format!(
            "{}.{}.{}",
            b64(header),
            b64(payload),
            b64(vec![7u8; sig_bytes])
        )
    }

    fn header(alg: &str) -> String {
        format!(r#"{{"alg":"{alg}","kid":"{KID}"}}"#)
    }

    /// An RS256 token (2048-bit signature) with this payload.
    fn jwt(payload: &str) -> String {
        token(&header("RS256"), payload, 256)
    }

    fn auds() -> Vec<String> {
        vec!["data-store".into()]
    }

    const NOW: i64 = 1_800_000_000;

    fn bound(extra: &str) -> String {
        format!(
            r#"{{"aud":["data-store"],"exp":{},"iss":"{ISS}","sub":"system:serviceaccount:a:b"{extra}}}"#,
            NOW + 600
        )
    }

    fn knowing_issuer() -> Expect<'static> {
        Expect {
            issuer: Some(ISS),
            ..Expect::default()
        }
    }

    #[test]
    fn valid_bound_token_passes() {
        let t = jwt(&bound(""));
        assert_eq!(
            precheck(&t, &auds(), NOW),
            Ok(Claims {
                exp: Some(NOW + 600)
            })
        );
        assert!(precheck_with(&t, &auds(), NOW, &knowing_issuer()).is_ok());
    }

    #[test]
    fn every_cluster_algorithm_with_its_signature_length_passes() {
        for (alg, len) in [
            ("RS256", 128),
            ("RS256", 256),
            ("RS256", 512),
            ("RS256", 1024),
            ("ES256", 64),
            ("ES384", 96),
            ("ES512", 132),
        ] {
            let t = token(&header(alg), &bound(""), len);
            assert!(precheck(&t, &auds(), NOW).is_ok(), "{alg} {len}");
        }
    }

    #[test]
    fn legacy_token_without_aud_or_exp_passes() {
        let payload =
            r#"{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:default:x"}"#;
        assert_eq!(
            precheck(&jwt(payload), &auds(), NOW),
            Ok(Claims { exp: None })
        );
        // Whatever the cluster's issuer, and with the empty kid of very old tokens.
        let t = token(r#"{"alg":"RS256","kid":""}"#, payload, 256);
        assert!(precheck_with(&t, &auds(), NOW, &knowing_issuer()).is_ok());
        let t = token(r#"{"alg":"RS256"}"#, payload, 256);
        assert!(precheck_with(&t, &auds(), NOW, &knowing_issuer()).is_ok());
    }

    #[test]
    fn string_aud_is_accepted() {
        let t = jwt(&format!(r#"{{"aud":"data-store","iss":"{ISS}"}}"#));
        assert!(precheck(&t, &auds(), NOW).is_ok());
    }

    #[test]
    fn junk_is_malformed() {
        for t in [
            "dummy",
            "a.b",
            "a.b.c.d",
            "..",
            "a..c",
            "a.b.",
            "eyJ.eyJ.sig=",
            "a b.c.d",
            // `e30` is `{}`: no alg.
            "e30.e30.x",
            &format!("e30.{}.{}", b64(bound("")), b64([0u8; 256])),
            &jwt("not json"),
            &jwt("[1,2]"),
            &jwt("[]"),
            &jwt("null"),
            &jwt(r#""a string""#),
            &jwt("{}"),
            &jwt(r#"{"iss":7}"#),
            &jwt(&format!(r#"{{"iss":"{ISS}","exp":"tomorrow"}}"#)),
            &jwt(&format!(r#"{{"iss":"{ISS}","aud":7}}"#)),
            &token("[]", &bound(""), 256),
            &token(r#"{"alg":7}"#, &bound(""), 256),
            &format!("{}.{}.sig", b64("nope"), b64(bound(""))),
            // `alg: none` with the empty signature it calls for.
            &format!("{}.{}.", b64(header("none")), b64(bound(""))),
            // A signature length no encoder produces.
            &format!("{}.{}.AAAAA", b64(header("RS256")), b64(bound(""))),
        ] {
            assert_eq!(
                precheck(t, &auds(), NOW),
                Err(Denial::MalformedToken),
                "{t}"
            );
        }
    }

    /// Well-formed, but not something this cluster could have signed: the answer TokenReview
    /// would give, without asking it.
    #[test]
    fn forgeries_are_rejected() {
        let wrong_kids = [
            r#"{"alg":"RS256","kid":"k"}"#.to_owned(),
            format!(r#"{{"alg":"RS256","kid":"{KID}x"}}"#),
            format!(r#"{{"alg":"RS256","kid":"{}"}}"#, "+".repeat(43)),
            r#"{"alg":"RS256","kid":7}"#.to_owned(),
            r#"{"alg":"RS256","kid":null}"#.to_owned(),
        ];
        let mut forged: Vec<String> = wrong_kids
            .iter()
            .map(|h| token(h, &bound(""), 256))
            .collect();
        forged.extend([
            token(&header("none"), &bound(""), 256),
            token(&header("HS256"), &bound(""), 32),
            token(&header("rs256"), &bound(""), 256),
            token(&header("PS256"), &bound(""), 256),
            token(&header("RS256"), &bound(""), 1),
            token(&header("RS256"), &bound(""), 64),
            token(&header("RS256"), &bound(""), 1025),
            token(&header("ES256"), &bound(""), 256),
            token(&header("ES512"), &bound(""), 64),
            jwt(&bound("").replace(ISS, "")),
        ]);
        for t in &forged {
            assert_eq!(precheck(t, &auds(), NOW), Err(Denial::TokenRejected), "{t}");
        }
        // The wrong issuer, once the cluster's is known.
        let t = jwt(&bound("").replace(ISS, "https://evil.example"));
        assert!(precheck(&t, &auds(), NOW).is_ok());
        assert_eq!(
            precheck_with(&t, &auds(), NOW, &knowing_issuer()),
            Err(Denial::TokenRejected)
        );
        // An algorithm this cluster does not sign with.
        let es = token(&header("ES256"), &bound(""), 64);
        let rsa_only = Expect {
            algs: &[Alg::Rs256],
            ..Expect::default()
        };
        assert_eq!(
            precheck_with(&es, &auds(), NOW, &rsa_only),
            Err(Denial::TokenRejected)
        );
    }

    #[test]
    fn kid_shapes() {
        let odd = token(
            r#"{"alg":"RS256","kid":"signer-key-2025"}"#,
            &bound(""),
            256,
        );
        assert_eq!(precheck(&odd, &auds(), NOW), Err(Denial::TokenRejected));
        let any = Expect {
            kid: KidShape::Any,
            ..Expect::default()
        };
        assert!(precheck_with(&odd, &auds(), NOW, &any).is_ok());
        let spaced = token(r#"{"alg":"RS256","kid":"a b"}"#, &bound(""), 256);
        assert_eq!(
            precheck_with(&spaced, &auds(), NOW, &any),
            Err(Denial::TokenRejected)
        );
    }

    #[test]
    fn too_large() {
        let t = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::TokenTooLarge));
    }

    #[test]
    fn expiry_with_leeway() {
        let t = jwt(&format!(r#"{{"exp":{},"iss":"{ISS}"}}"#, NOW - 30));
        assert!(precheck(&t, &auds(), NOW).is_ok(), "within leeway");
        let t = jwt(&format!(r#"{{"exp":{},"iss":"{ISS}"}}"#, NOW - 61));
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::TokenExpired));
    }

    #[test]
    fn disjoint_audience() {
        let with_aud = |aud: &str| jwt(&format!(r#"{{"aud":{aud},"iss":"{ISS}"}}"#));
        let t = with_aud(r#"["vault"]"#);
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::WrongAudience));
        let t = with_aud(r#"["vault","data-store"]"#);
        assert!(precheck(&t, &auds(), NOW).is_ok());
        let t = with_aud("[]");
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::WrongAudience));
    }

    #[test]
    fn decoded_lengths() {
        for n in 0..300usize {
            let text = b64(vec![0u8; n]);
            assert_eq!(decoded_len(text.len()), Some(n), "{n}");
        }
        assert_eq!(decoded_len(5), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 256,
                ..ProptestConfig::default()
            }
        }

        proptest! {
            #![proptest_config(config())]

            /// Arbitrary text never panics, and whatever passes is a three-part JWS.
            #[test]
            fn arbitrary_text_never_panics(t in ".{0,300}") {
                if precheck(&t, &auds(), NOW).is_ok() {
                    prop_assert_eq!(t.split('.').count(), 3);
                }
            }

            /// Arbitrary bytes in each part, base64url-encoded: never a panic, and nothing
            /// passes unless header and payload are JSON objects with `alg` and `iss`.
            #[test]
            fn arbitrary_parts_are_refused(
                h in proptest::collection::vec(any::<u8>(), 0..64),
                p in proptest::collection::vec(any::<u8>(), 0..64),
                s in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let t = format!("{}.{}.{}", b64(&h), b64(&p), b64(&s));
                prop_assert!(precheck(&t, &auds(), NOW).is_err());
            }

            /// Mutating one character of a token that passes never panics; a mutated header
            /// or payload that still passes still has the cluster's issuer.
            #[test]
            fn mutations_never_panic(i in 0usize..2000, c in any::<char>()) {
                let good = jwt(&bound(""));
                let mut chars: Vec<char> = good.chars().collect();
                let i = i % chars.len();
                chars[i] = c;
                let t: String = chars.into_iter().collect();
                let _ = precheck_with(&t, &auds(), NOW, &knowing_issuer());
            }

            /// JSON payloads of any shape: only objects with a string `iss` may pass.
            #[test]
            fn json_payloads(v in json_value()) {
                let t = jwt(&v.to_string());
                if precheck(&t, &auds(), NOW).is_ok() {
                    prop_assert!(v.get("iss").is_some_and(|i| i.is_string()));
                }
            }
        }

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            use serde_json::Value;
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                "[a-z:/.]{0,20}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("iss".to_owned()),
                            Just("aud".to_owned()),
                            Just("exp".to_owned()),
                            "[a-z]{1,4}"
                        ],
                        inner,
                        0..5
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }
    }
}
