//! Cheap rejection on *unverified* claims, before any TokenReview is spent on a token.
//!
//! A flood of junk tokens must not become a flood of TokenReviews (each one an API-server
//! call; see ai-dynamo/modelexpress#530). So a token that is not a compact JWS (three base64url
//! parts with a JSON payload), is over 16 KiB, whose `exp` is past (with the API server's own
//! 60 s leeway), or whose `aud` shares nothing with the route's audiences is refused here.
//! Nothing is trusted: a token that passes still goes to TokenReview. A legacy secret-based
//! token has neither `aud` nor `exp` and passes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;

use crate::denial::Denial;

/// Longest token accepted (bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The API server's clock leeway for `exp` (go-jose `DefaultLeeway`).
pub const EXP_LEEWAY_SECS: i64 = 60;

/// What precheck learned from the unverified payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// `exp` (unix seconds), if present; caps the cache TTL.
    pub exp: Option<i64>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    aud: Option<Aud>,
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

/// Checks `token` against the route's `audiences` at `now` (unix seconds).
pub fn precheck(token: &str, audiences: &[String], now: i64) -> Result<Claims, Denial> {
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
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Denial::MalformedToken)?;
    if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header).is_err() {
        return Err(Denial::MalformedToken);
    }
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| Denial::MalformedToken)?;
    let claims: Payload = serde_json::from_slice(&payload).map_err(|_| Denial::MalformedToken)?;

    let exp = match claims.exp {
        Some(e) if e.is_finite() => Some(e as i64),
        Some(_) => return Err(Denial::MalformedToken),
        None => None,
    };
    if let Some(exp) = exp {
        if now - EXP_LEEWAY_SECS > exp {
            return Err(Denial::TokenExpired);
        }
    }
    let overlaps = |a: &str| audiences.iter().any(|r| r == a);
    match &claims.aud {
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

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    fn auds() -> Vec<String> {
        vec!["data-store".into()]
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn valid_bound_token_passes() {
        let t = jwt(&format!(r#"{{"aud":["data-store"],"exp":{}}}"#, NOW + 600));
        assert_eq!(
            precheck(&t, &auds(), NOW),
            Ok(Claims {
                exp: Some(NOW + 600)
            })
        );
    }

    #[test]
    fn legacy_token_without_aud_or_exp_passes() {
        let t =
            jwt(r#"{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:default:x"}"#);
        assert_eq!(precheck(&t, &auds(), NOW), Ok(Claims { exp: None }));
    }

    #[test]
    fn string_aud_is_accepted() {
        let t = jwt(r#"{"aud":"data-store"}"#);
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
            &jwt("not json"),
            &jwt("[1,2]"),
            &jwt(r#"{"exp":"tomorrow"}"#),
            &format!(
                "{}.{}.sig",
                URL_SAFE_NO_PAD.encode("nope"),
                URL_SAFE_NO_PAD.encode("{}")
            ),
        ] {
            assert_eq!(
                precheck(t, &auds(), NOW),
                Err(Denial::MalformedToken),
                "{t}"
            );
        }
    }

    #[test]
    fn too_large() {
        let t = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::TokenTooLarge));
    }

    #[test]
    fn expiry_with_leeway() {
        let t = jwt(&format!(r#"{{"exp":{}}}"#, NOW - 30));
        assert!(precheck(&t, &auds(), NOW).is_ok(), "within leeway");
        let t = jwt(&format!(r#"{{"exp":{}}}"#, NOW - 61));
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::TokenExpired));
    }

    #[test]
    fn disjoint_audience() {
        let t = jwt(r#"{"aud":["vault"]}"#);
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::WrongAudience));
        let t = jwt(r#"{"aud":["vault","data-store"]}"#);
        assert!(precheck(&t, &auds(), NOW).is_ok());
        let t = jwt(r#"{"aud":[]}"#);
        assert_eq!(precheck(&t, &auds(), NOW), Err(Denial::WrongAudience));
    }
}
