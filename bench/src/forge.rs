//! Forged tokens for the reliability measurements: the seven cheap shapes precheck refuses
//! (RELIABILITY.md, forged-token flood) and perfectly shaped forgeries (right `alg`, `kid`,
//! issuer, audience and signature length; only the signature is wrong), which only the API
//! server (or local verification) can refuse.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// A `kid` of the derived shape (43 base64url characters) that no cluster key has.
pub const FOREIGN_KID: &str = "Yq2mQ3rD0-1x_ZsQe9sYv7u0pKqL6m7hR1cX2wY3z4A";

/// base64url without padding.
pub fn b64(s: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// Forged token number `i`: shape `i % 7` (named by the first element), unique per `i`.
pub fn forged(i: usize, now: i64, issuer: &str, aud: &str) -> (&'static str, String) {
    let payload = |iss: &str| {
        b64(format!(
            r#"{{"aud":["{aud}"],"exp":{},"iss":"{iss}","jti":"{i}","sub":"system:serviceaccount:api:api"}}"#,
            now + 600
        ))
    };
    let rs256 = b64(format!(r#"{{"alg":"RS256","kid":"{FOREIGN_KID}"}}"#));
    let sig = b64([(i % 251) as u8; 256]);
    match i % 7 {
        0 => ("e30.e30", format!("e30.e30.{}", b64(i.to_le_bytes()))),
        1 => (
            "alg none",
            format!("{}.{}.{sig}", b64(r#"{"alg":"none"}"#), payload(issuer)),
        ),
        2 => (
            "HS256",
            format!(
                "{}.{}.{}",
                b64(format!(r#"{{"alg":"HS256","kid":"{FOREIGN_KID}"}}"#)),
                payload(issuer),
                b64([1u8; 32])
            ),
        ),
        3 => (
            "payload array",
            format!("{rs256}.{}.{sig}", b64(format!(r#"["{i}"]"#))),
        ),
        4 => (
            "1-byte signature",
            format!("{rs256}.{}.{}", payload(issuer), b64([1u8])),
        ),
        5 => (
            "wrong issuer",
            format!("{rs256}.{}.{sig}", payload("https://evil.example")),
        ),
        _ => (
            "bad kid",
            format!(
                "{}.{}.{sig}",
                b64(r#"{"alg":"RS256","kid":"k"}"#),
                payload(issuer)
            ),
        ),
    }
}

/// A perfectly shaped RS256 forgery number `i` claiming `ns/sa`: the cluster's `kid`,
/// issuer and audience, a future `exp`, a 256-byte signature of junk. Unique per `i`.
pub fn perfect(i: u64, kid: &str, issuer: &str, aud: &str, now: i64, ns: &str, sa: &str) -> String {
    let header = b64(format!(r#"{{"alg":"RS256","kid":"{kid}"}}"#));
    let payload = b64(format!(
        r#"{{"aud":["{aud}"],"exp":{},"iat":{now},"iss":"{issuer}","jti":"forged-{i}","nbf":{now},"sub":"system:serviceaccount:{ns}:{sa}"}}"#,
        now + 3600
    ));
    let mut sig = [0u8; 256];
    for (j, b) in sig.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31).wrapping_add(j as u64) % 251) as u8;
    }
    format!("{header}.{payload}.{}", b64(sig))
}

/// `token` with its payload replaced by `claims` (signature kept): a privilege-escalation
/// attempt that only a signature check can refuse.
pub fn swap_payload(token: &str, claims: &serde_json::Value) -> String {
    let mut parts = token.split('.');
    let (h, _, s) = (
        parts.next().unwrap_or(""),
        parts.next(),
        parts.next().unwrap_or(""),
    );
    format!("{h}.{}.{s}", b64(claims.to_string()))
}

/// The claims of `token`'s payload (unverified), `Null` if unreadable.
pub fn claims(token: &str) -> serde_json::Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_unique_and_perfect_forgeries_look_right() {
        let a = forged(1, 0, "iss", "aud").1;
        let b = forged(8, 0, "iss", "aud").1;
        assert_ne!(a, b);
        let p = perfect(3, "kid", "iss", "aud", 100, "ops", "admin");
        let c = claims(&p);
        assert_eq!(c["iss"], "iss");
        assert_eq!(c["sub"], "system:serviceaccount:ops:admin");
        assert_eq!(p.split('.').count(), 3);
        let swapped = swap_payload(&p, &serde_json::json!({"x": 1}));
        assert_eq!(claims(&swapped)["x"], 1);
        assert_eq!(swapped.split('.').nth(2), p.split('.').nth(2));
    }
}
