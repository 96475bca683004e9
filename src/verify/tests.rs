//! Unit tests for [`super::verify`], with real RSA-2048 and ECDSA P-256 keys (the stand-in's
//! key code) and tokens signed here, so every claim can be shaped at will.

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kube_standin::keys::SigningKey;
use kube_standin::KeyAlg;
use serde_json::{json, Value};

use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const NOW: u64 = 1_800_000_000;
const SA_UID: &str = "5a1f9c2d-7e33-4a88-b2c4-6f9d0e1a3b57";
const POD_UID: &str = "adbcb431-1ba9-4022-b222-a5ba02534005";
const MAX_STALENESS: Duration = Duration::from_secs(300);

struct Keys {
    rsa: SigningKey,
    ec: SigningKey,
    /// Published as P-521 (unusable for tokengate).
    other: SigningKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa: SigningKey::generate(KeyAlg::Rs256).unwrap(),
        ec: SigningKey::generate(KeyAlg::Es256).unwrap(),
        other: SigningKey::generate(KeyAlg::Es256).unwrap(),
    })
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn at(offset: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW.saturating_add_signed(offset))
}

fn snapshot() -> KeySnapshot {
    let k = keys();
    let jwks = json!({"keys": [k.rsa.jwk(), k.ec.jwk()]});
    KeySnapshot::from_jwks(ISSUER, &serde_json::to_vec(&jwks).unwrap(), now()).unwrap()
}

fn objects() -> MemoryObjects {
    let mut o = MemoryObjects::new(now());
    o.add_service_account("payments", "api", SA_UID)
        .add_pod("payments", "api-0", POD_UID, None);
    o
}

fn auds() -> Vec<String> {
    vec!["data-store".to_string()]
}

/// Claims of a pod-bound token as kube-apiserver writes them.
fn claims() -> Value {
    let now = NOW as i64;
    json!({
        "aud": ["data-store"],
        "exp": now + 3600,
        "iat": now - 10,
        "iss": ISSUER,
        "jti": "8f4c1a7e-2b90-4b3d-9d6a-1c0f5b7e4a11",
        "kubernetes.io": {
            "namespace": "payments",
            "node": {"name": "worker-2", "uid": "52c81fbd-d2e9-4c7a-b45f-89df2615076b"},
            "pod": {"name": "api-0", "uid": POD_UID},
            "serviceaccount": {"name": "api", "uid": SA_UID}
        },
        "nbf": now - 10,
        "sub": "system:serviceaccount:payments:api"
    })
}

fn with(mut c: Value, path: &[&str], v: Value) -> Value {
    let mut at = &mut c;
    for p in &path[..path.len() - 1] {
        at = &mut at[*p];
    }
    let last = path[path.len() - 1];
    if v.is_null() {
        if let Some(m) = at.as_object_mut() {
            m.remove(last);
        }
    } else {
        at[last] = v;
    }
    c
}

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn sign_raw(key: &SigningKey, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(&serde_json::to_vec(header).unwrap()),
        b64(&serde_json::to_vec(claims).unwrap())
    );
    let sig = key.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64(&sig))
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    sign_raw(
        key,
        &json!({"alg": key.alg_name(), "kid": key.kid()}),
        claims,
    )
}

fn check(token: &str) -> LocalVerdict {
    verify(
        token,
        &auds(),
        &snapshot(),
        &objects(),
        MAX_STALENESS,
        now(),
    )
}

fn check_at(token: &str, now: SystemTime) -> LocalVerdict {
    let mut o = objects();
    o.set_synced_at(Some(now));
    verify(token, &auds(), &snapshot(), &o, MAX_STALENESS, now)
}

fn valid(v: LocalVerdict) -> Verified {
    match v {
        LocalVerdict::Valid(v) => *v,
        other => panic!("expected Valid, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid(v: LocalVerdict, kind: InvalidKind, reason: &str) {
    assert_eq!(v, LocalVerdict::Invalid(Invalid::new(kind, reason)));
}

#[test]
fn valid_pod_bound_token_gives_tokenreviews_identity() {
    for key in [&keys().rsa, &keys().ec] {
        let v = valid(check(&sign(key, &claims())));
        assert_eq!(
            v.identity,
            Identity {
                username: "system:serviceaccount:payments:api".into(),
                namespace: "payments".into(),
                name: "api".into(),
                uid: Some(SA_UID.into()),
                groups: vec![
                    "system:serviceaccounts".into(),
                    "system:serviceaccounts:payments".into(),
                    "system:authenticated".into()
                ],
                pod_name: Some("api-0".into()),
                pod_uid: Some(POD_UID.into()),
                // As TokenReview's `user.extra` (shared/kubernetes-tokens.md §1.2).
                extra: crate::identity::Extra::from_map(
                    &[
                        ("credential-id", "JTI=8f4c1a7e-2b90-4b3d-9d6a-1c0f5b7e4a11"),
                        ("node-name", "worker-2"),
                        ("node-uid", "52c81fbd-d2e9-4c7a-b45f-89df2615076b"),
                        ("pod-name", "api-0"),
                        ("pod-uid", POD_UID),
                    ]
                    .into_iter()
                    .map(|(k, v)| (
                        format!("authentication.kubernetes.io/{k}"),
                        vec![v.to_owned()]
                    ))
                    .collect()
                ),
            }
        );
        assert_eq!(
            v.pod,
            Some(PodRef {
                namespace: "payments".into(),
                name: "api-0".into(),
                uid: POD_UID.into()
            })
        );
        assert_eq!(v.kid, key.kid());
        assert_eq!(v.exp, Some(NOW as i64 + 3600));
        assert_eq!(v.audiences, auds());
        assert_eq!(v.node_name.as_deref(), Some("worker-2"));
        assert_eq!(
            v.jti.as_deref(),
            Some("8f4c1a7e-2b90-4b3d-9d6a-1c0f5b7e4a11")
        );
    }
}

#[test]
fn valid_unbound_token() {
    let c = with(claims(), &["kubernetes.io", "pod"], Value::Null);
    let c = with(c, &["kubernetes.io", "node"], Value::Null);
    let v = valid(check(&sign(&keys().rsa, &c)));
    assert_eq!(v.identity.pod_name, None);
    assert_eq!(v.identity.pod_uid, None);
    assert_eq!(v.pod, None);
    // The pod need not exist.
    let mut o = objects();
    o.remove_pod("payments", "api-0");
    assert!(matches!(
        verify(
            &sign(&keys().rsa, &c),
            &auds(),
            &snapshot(),
            &o,
            MAX_STALENESS,
            now()
        ),
        LocalVerdict::Valid(_)
    ));
}

#[test]
fn wrong_audience() {
    let c = with(claims(), &["aud"], json!(["vault", "inventory-api"]));
    assert_invalid(
        check(&sign(&keys().rsa, &c)),
        InvalidKind::WrongAudience,
        r#"token audiences ["vault" "inventory-api"] is invalid for the target audiences ["data-store"]"#,
    );
    // A single string audience is read too.
    let c = with(claims(), &["aud"], json!("vault"));
    assert!(matches!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::Invalid(Invalid {
            kind: InvalidKind::WrongAudience,
            ..
        })
    ));
    let c = with(claims(), &["aud"], json!("data-store"));
    assert!(matches!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::Valid(_)
    ));
    // Audience is checked before expiry, as the API server does.
    let c = with(claims(), &["aud"], json!(["vault"]));
    let c = with(c, &["exp"], json!(NOW as i64 - 3600));
    assert!(matches!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::Invalid(Invalid {
            kind: InvalidKind::WrongAudience,
            ..
        })
    ));
    // Without aud the API server would use its own audiences, unknown here.
    let c = with(claims(), &["aud"], Value::Null);
    assert_eq!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::CannotJudge(CannotJudge::NoAudience)
    );
}

#[test]
fn several_audiences_intersect_in_route_order() {
    let c = with(claims(), &["aud"], json!(["a", "data-store", "b"]));
    let route = vec!["x".to_string(), "data-store".into(), "a".into()];
    let v = verify(
        &sign(&keys().ec, &c),
        &route,
        &snapshot(),
        &objects(),
        MAX_STALENESS,
        now(),
    );
    assert_eq!(
        valid(v).audiences,
        vec!["data-store".to_string(), "a".into()]
    );
}

#[test]
fn expiry_with_leeway() {
    let token = sign(
        &keys().rsa,
        &with(claims(), &["exp"], json!(NOW as i64 - 60)),
    );
    assert!(
        matches!(check(&token), LocalVerdict::Valid(_)),
        "exactly at the leeway"
    );
    let token = sign(
        &keys().rsa,
        &with(claims(), &["exp"], json!(NOW as i64 - 61)),
    );
    assert_invalid(
        check(&token),
        InvalidKind::Expired,
        "service account token has expired",
    );
    // Fractional seconds are truncated, as go-jose does.
    let token = sign(
        &keys().rsa,
        &with(claims(), &["exp"], json!((NOW - 60) as f64 + 0.9)),
    );
    assert!(matches!(check(&token), LocalVerdict::Valid(_)));
    let token = sign(
        &keys().rsa,
        &with(claims(), &["exp"], json!((NOW - 61) as f64 + 0.9)),
    );
    assert!(matches!(
        check(&token),
        LocalVerdict::Invalid(Invalid {
            kind: InvalidKind::Expired,
            ..
        })
    ));
}

#[test]
fn not_before_and_issued_at_in_the_future() {
    let c = with(claims(), &["nbf"], json!(NOW as i64 + 60));
    assert!(matches!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::Valid(_)
    ));
    let c = with(claims(), &["nbf"], json!(NOW as i64 + 61));
    assert_invalid(
        check(&sign(&keys().rsa, &c)),
        InvalidKind::Rejected,
        "service account token is not valid yet",
    );
    let c = with(claims(), &["iat"], json!(NOW as i64 + 60));
    assert!(matches!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::Valid(_)
    ));
    let c = with(claims(), &["iat"], json!(NOW as i64 + 61));
    assert_invalid(
        check(&sign(&keys().rsa, &c)),
        InvalidKind::Rejected,
        "service account token is issued in the future",
    );
    // go-jose checks nbf before exp.
    let c = with(claims(), &["nbf"], json!(NOW as i64 + 600));
    let c = with(c, &["exp"], json!(NOW as i64 - 600));
    assert_invalid(
        check(&sign(&keys().rsa, &c)),
        InvalidKind::Rejected,
        "service account token is not valid yet",
    );
}

#[test]
fn tampered_payload_and_signature() {
    for key in [&keys().rsa, &keys().ec] {
        let token = sign(key, &claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = with(
            claims(),
            &["kubernetes.io", "serviceaccount", "name"],
            json!("admin"),
        );
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::to_vec(&forged).unwrap()),
            parts[2]
        );
        assert_invalid(check(&tampered), InvalidKind::Rejected, CRYPTO_ERROR);

        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[7] ^= 1;
        let tampered = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
        assert_invalid(check(&tampered), InvalidKind::Rejected, CRYPTO_ERROR);

        let truncated = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..10]);
        assert!(matches!(
            check(&truncated),
            LocalVerdict::Invalid(Invalid {
                kind: InvalidKind::Rejected,
                ..
            })
        ));
    }
}

#[test]
fn non_canonical_signature_encoding_is_accepted_like_go() {
    // ES256 signatures are 64 bytes: the last base64url character carries 4 unused bits.
    let token = sign(&keys().ec, &claims());
    let (rest, last) = token.split_at(token.len() - 1);
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let i = alphabet.find(last).unwrap();
    let twin = &alphabet[(i ^ 1)..(i ^ 1) + 1];
    let twin_token = format!("{rest}{twin}");
    assert!(matches!(check(&twin_token), LocalVerdict::Valid(_)));
}

#[test]
fn alg_none_and_hmac_with_the_public_key_are_refused() {
    let k = &keys().rsa;
    let payload = b64(&serde_json::to_vec(&claims()).unwrap());
    for header in [
        json!({"alg": "none", "kid": k.kid()}),
        json!({"alg": "none"}),
        json!({"alg": "None", "kid": k.kid()}),
    ] {
        let h = b64(&serde_json::to_vec(&header).unwrap());
        for sig in ["", "c2ln"] {
            let v = check(&format!("{h}.{payload}.{sig}"));
            assert!(
                matches!(&v, LocalVerdict::Invalid(Invalid { kind: InvalidKind::Rejected, reason }) if reason.contains("unsupported algorithm")),
                "{header}: {v:?}"
            );
        }
    }
    // HS256 keyed with every public form of the RSA key: the JWK's n, the JWK JSON, the
    // PKCS#1 DER the JWK encodes.
    let jwk = serde_json::to_value(k.jwk()).unwrap();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let secrets: Vec<Vec<u8>> = vec![
        n,
        serde_json::to_vec(&jwk).unwrap(),
        k.kid().as_bytes().to_vec(),
    ];
    for kid in [Some(k.kid()), None] {
        let header = match kid {
            Some(kid) => json!({"alg": "HS256", "kid": kid}),
            None => json!({"alg": "HS256"}),
        };
        let input = format!("{}.{payload}", b64(&serde_json::to_vec(&header).unwrap()));
        for secret in &secrets {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
            let v = check(&format!("{input}.{}", b64(tag.as_ref())));
            assert!(
                matches!(&v, LocalVerdict::Invalid(Invalid { kind: InvalidKind::Rejected, reason }) if reason.contains("unsupported algorithm")),
                "{v:?}"
            );
        }
    }
    // The right key with the other key type's algorithm.
    let token = sign_raw(
        &keys().ec,
        &json!({"alg": "RS256", "kid": keys().ec.kid()}),
        &claims(),
    );
    assert_invalid(check(&token), InvalidKind::Rejected, UNSUPPORTED_ALG);
}

#[test]
fn unknown_kid_and_no_kid() {
    let token = sign_raw(
        &keys().rsa,
        &json!({"alg": "RS256", "kid": "nope"}),
        &claims(),
    );
    assert_invalid(
        check(&token),
        InvalidKind::UnknownKey,
        "invalid signature, no keys found",
    );
    // A key that signs but is not published.
    let token = sign(&keys().other, &claims());
    assert_invalid(
        check(&token),
        InvalidKind::UnknownKey,
        "invalid signature, no keys found",
    );
    // Without kid every key is tried.
    for key in [&keys().rsa, &keys().ec] {
        let token = sign_raw(key, &json!({"alg": key.alg_name()}), &claims());
        assert_eq!(valid(check(&token)).kid, key.kid());
        let token = sign_raw(key, &json!({"alg": key.alg_name(), "kid": ""}), &claims());
        assert_eq!(valid(check(&token)).kid, key.kid());
    }
    let token = sign_raw(&keys().other, &json!({"alg": "ES256"}), &claims());
    assert_invalid(
        check(&token),
        InvalidKind::Rejected,
        &format!("[{UNSUPPORTED_ALG}, {CRYPTO_ERROR}]"),
    );
}

#[test]
fn unusable_published_key_goes_to_tokenreview() {
    let k = keys();
    let mut p521 = serde_json::to_value(k.other.jwk()).unwrap();
    p521["crv"] = json!("P-521");
    p521["alg"] = json!("ES512");
    let jwks = json!({"keys": [k.rsa.jwk(), p521]});
    let snap = KeySnapshot::from_jwks(ISSUER, &serde_json::to_vec(&jwks).unwrap(), now()).unwrap();
    let run = |t: &str| verify(t, &auds(), &snap, &objects(), MAX_STALENESS, now());
    let token = sign(&k.other, &claims());
    assert_eq!(
        run(&token),
        LocalVerdict::CannotJudge(CannotJudge::UnusableKey)
    );
    let token = sign_raw(&k.other, &json!({"alg": "ES512"}), &claims());
    assert_eq!(
        run(&token),
        LocalVerdict::CannotJudge(CannotJudge::UnusableKey)
    );
    assert!(matches!(
        run(&sign(&k.rsa, &claims())),
        LocalVerdict::Valid(_)
    ));
}

#[test]
fn other_issuers_go_to_tokenreview() {
    let c = with(claims(), &["iss"], json!("https://accounts.example.com"));
    assert_eq!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::CannotJudge(CannotJudge::UnknownIssuer)
    );
    let c = with(claims(), &["iss"], Value::Null);
    assert_eq!(
        check(&sign(&keys().rsa, &c)),
        LocalVerdict::CannotJudge(CannotJudge::UnknownIssuer)
    );
    // Unsigned garbage with another issuer: not ours to refuse either.
    let junk = format!(
        "{}.{}.sig",
        b64(br#"{"alg":"RS256"}"#),
        b64(br#"{"iss":"https://other"}"#)
    );
    assert_eq!(
        check(&junk),
        LocalVerdict::CannotJudge(CannotJudge::UnknownIssuer)
    );
}

#[test]
fn legacy_secret_node_bound_tokens_go_to_tokenreview() {
    let legacy = json!({
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "payments",
        "kubernetes.io/serviceaccount/secret.name": "api-token",
        "kubernetes.io/serviceaccount/service-account.name": "api",
        "kubernetes.io/serviceaccount/service-account.uid": SA_UID,
        "sub": "system:serviceaccount:payments:api"
    });
    assert_eq!(
        check(&sign(&keys().rsa, &legacy)),
        LocalVerdict::CannotJudge(CannotJudge::LegacyToken)
    );
    let c = with(claims(), &["kubernetes.io", "pod"], Value::Null);
    let c = with(c, &["kubernetes.io", "node"], Value::Null);
    let secret = with(
        c.clone(),
        &["kubernetes.io", "secret"],
        json!({"name": "s", "uid": "u"}),
    );
    assert_eq!(
        check(&sign(&keys().rsa, &secret)),
        LocalVerdict::CannotJudge(CannotJudge::SecretBound)
    );
    let node = with(
        c,
        &["kubernetes.io", "node"],
        json!({"name": "worker-2", "uid": "n"}),
    );
    assert_eq!(
        check(&sign(&keys().rsa, &node)),
        LocalVerdict::CannotJudge(CannotJudge::NodeBound)
    );
    // Checks before the binding still answer locally (SA first, as the API server does).
    let mut o = objects();
    o.remove_service_account("payments", "api");
    assert_invalid(
        verify(
            &sign(&keys().rsa, &secret),
            &auds(),
            &snapshot(),
            &o,
            MAX_STALENESS,
            now(),
        ),
        InvalidKind::Rejected,
        r#"serviceaccounts "api" not found"#,
    );
}

#[test]
fn pod_deleted_recreated_or_terminating() {
    let token = sign(&keys().rsa, &claims());
    let run = |o: &MemoryObjects| verify(&token, &auds(), &snapshot(), o, MAX_STALENESS, now());
    let mut o = objects();
    o.remove_pod("payments", "api-0");
    assert_invalid(
        run(&o),
        InvalidKind::Rejected,
        "service account token has been invalidated",
    );
    o.add_pod("payments", "api-0", "new-uid", None);
    assert_invalid(
        run(&o),
        InvalidKind::Rejected,
        &format!("pod UID (new-uid) does not match service account pod ref claim ({POD_UID})"),
    );
    // Graceful deletion: deletionTimestamp = now + grace; valid until 60 s past it.
    for (deleting, ok) in [
        (30, true),
        (0, true),
        (-60, true),
        (-61, false),
        (-3600, false),
    ] {
        o.add_pod("payments", "api-0", POD_UID, Some(at(deleting)));
        let v = run(&o);
        if ok {
            assert!(matches!(v, LocalVerdict::Valid(_)), "{deleting}: {v:?}");
        } else {
            assert_invalid(
                v,
                InvalidKind::Rejected,
                "service account token has been invalidated",
            );
        }
    }
}

#[test]
fn service_account_missing_recreated_or_deleted() {
    let token = sign(&keys().ec, &claims());
    let run = |o: &MemoryObjects| verify(&token, &auds(), &snapshot(), o, MAX_STALENESS, now());
    let mut o = objects();
    o.remove_service_account("payments", "api");
    assert_invalid(
        run(&o),
        InvalidKind::Rejected,
        r#"serviceaccounts "api" not found"#,
    );
    o.add_service_account("payments", "api", "other-uid");
    assert_invalid(
        run(&o),
        InvalidKind::Rejected,
        &format!("service account UID (other-uid) does not match claim ({SA_UID})"),
    );
    o.add_service_account("payments", "api", SA_UID);
    o.set_service_account_deleting("payments", "api", at(-30));
    assert!(matches!(run(&o), LocalVerdict::Valid(_)));
    o.set_service_account_deleting("payments", "api", at(-61));
    assert_invalid(
        run(&o),
        InvalidKind::Rejected,
        "service account payments/api has been deleted",
    );
}

#[test]
fn stale_keys_or_caches_and_unknown_objects() {
    let token = sign(&keys().rsa, &claims());
    // Keys fetched at NOW; 5 min later still fine, a second more is stale.
    let later = at(300);
    let mut o = objects();
    o.set_synced_at(Some(later));
    let run = |o: &MemoryObjects, t: SystemTime| {
        verify(&token, &auds(), &snapshot(), o, MAX_STALENESS, t)
    };
    assert!(matches!(run(&o, later), LocalVerdict::Valid(_)));
    o.set_synced_at(Some(at(301)));
    assert_eq!(
        run(&o, at(301)),
        LocalVerdict::Stale(Stale::Keys(Duration::from_secs(301)))
    );
    // Caches out of touch for too long.
    let mut o = objects();
    o.set_synced_at(Some(at(-400)));
    assert_eq!(
        run(&o, now()),
        LocalVerdict::Stale(Stale::Objects(Duration::from_secs(400)))
    );
    // Never synced, or a namespace that is not watched: TokenReview decides.
    o.set_synced_at(None);
    assert_eq!(
        run(&o, now()),
        LocalVerdict::CannotJudge(CannotJudge::ObjectsUnknown)
    );
    let mut o = objects();
    o.watch_only(&["other"]);
    assert_eq!(
        run(&o, now()),
        LocalVerdict::CannotJudge(CannotJudge::ObjectsUnknown)
    );
    // Legacy and foreign tokens fall back even with stale keys.
    assert_eq!(
        check_at(
            &sign(
                &keys().rsa,
                &with(claims(), &["iss"], json!("kubernetes/serviceaccount"))
            ),
            at(3600)
        ),
        LocalVerdict::CannotJudge(CannotJudge::LegacyToken)
    );
}

#[test]
fn oversize_and_junk_tokens_never_panic() {
    let big = format!(
        "{}.{}.{}",
        "a".repeat(8000),
        "b".repeat(8000),
        "c".repeat(400)
    );
    assert_invalid(
        check(&big),
        InvalidKind::TooLarge,
        &format!("the token is longer than {MAX_TOKEN_BYTES} bytes"),
    );
    let good = sign(&keys().rsa, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    for junk in [
        "",
        ".",
        "..",
        "...",
        "a.b.c",
        "{}.{}.{}",
        "é.é.é",
        "\u{0}.\u{0}.\u{0}",
        &format!("{}..{}", parts[0], parts[2]),
        &format!("{}.{}.", parts[0], parts[1]),
        &format!(".{}.{}", parts[1], parts[2]),
        &format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        &format!("{}.{}.{}", b64(b"[]"), parts[1], parts[2]),
        &format!("{}.{}.{}", b64(b"{\"alg\":5}"), parts[1], parts[2]),
        &format!(
            "{}.{}.{}",
            b64(b"{\"alg\":\"RS256\",\"kid\":[]}"),
            parts[1],
            parts[2]
        ),
        &format!("{}.{}.{}", parts[0], b64(b"{\"iss\":5}"), parts[2]),
        &format!("{}.{}.{}", parts[0], b64(b"null"), parts[2]),
        &format!("{}.{}.{}", parts[0], b64(b"{\"exp\":1e400}"), parts[2]),
    ] {
        let v = check(junk);
        assert!(
            matches!(v, LocalVerdict::Invalid(_) | LocalVerdict::CannotJudge(_)),
            "{junk:?}: {v:?}"
        );
    }
}

#[test]
fn claims_with_huge_or_odd_values_do_not_panic() {
    for (path, value) in [
        (&["exp"][..], json!(1e300)),
        (&["exp"][..], json!(-1e300)),
        (&["nbf"][..], json!(i64::MAX)),
        (&["iat"][..], json!(u64::MAX)),
        (&["exp"][..], json!("tomorrow")),
        (&["kubernetes.io"][..], json!("x")),
        (&["kubernetes.io", "namespace"][..], json!("")),
        (&["kubernetes.io", "serviceaccount"][..], Value::Null),
        (&["kubernetes.io", "namespace"][..], json!("a:b")),
        (&["kubernetes.io", "pod", "name"][..], json!("")),
    ] {
        let v = check(&sign(&keys().rsa, &with(claims(), path, value.clone())));
        assert!(
            !matches!(v, LocalVerdict::Valid(_)),
            "{path:?}={value}: {v:?}"
        );
    }
}

#[test]
fn token_review_error_wording() {
    assert_eq!(
        Invalid::new(InvalidKind::Expired, "service account token has expired")
            .token_review_error(),
        "[invalid bearer token, service account token has expired]"
    );
    assert_eq!(
        Invalid::new(InvalidKind::Malformed, INVALID_BEARER_TOKEN).token_review_error(),
        "invalid bearer token"
    );
    assert_eq!(aggregate(&["a", "a"]), "a");
    assert_eq!(aggregate(&["a", "b", "a"]), "[a, b]");
    assert_eq!(
        go_quote_list(&["a".into(), "b\"c".into()]),
        r#"["a" "b\"c"]"#
    );
    assert_eq!(InvalidKind::WrongAudience.denial_code(), "wrong_audience");
}

#[test]
fn header_kid_reads_the_header_only() {
    let token = sign(&keys().rsa, &claims());
    assert_eq!(header_kid(&token).as_deref(), Some(keys().rsa.kid()));
    assert_eq!(header_kid("x"), None);
    assert_eq!(header_kid(""), None);
}

/// Random strings shaped like tokens (three parts, base64url-ish, sometimes JSON inside):
/// whatever comes in, `verify` answers and never says Valid.
#[test]
fn random_inputs_never_panic_nor_pass() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let snap = snapshot();
    let objects = objects();
    let genuine = sign(&keys().ec, &claims());
    let pieces: Vec<&str> = genuine.split('.').collect();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.={}\":,[] \\";
    for _ in 0..5000 {
        let token: String = match rng.random_range(0..3) {
            0 => (0..rng.random_range(0..200))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
                .collect(),
            1 => {
                let json: String = (0..rng.random_range(0..60))
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
                    .collect();
                let replace: [bool; 3] = rng.random();
                let part = |i: usize| -> String {
                    if replace[i] {
                        b64(json.as_bytes())
                    } else {
                        pieces[i].to_string()
                    }
                };
                format!("{}.{}.{}", part(0), part(1), part(2))
            }
            _ => {
                let bytes: Vec<u8> = (0..rng.random_range(0..300))
                    .map(|_| rng.random())
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        if token == genuine {
            continue;
        }
        let v = verify(&token, &auds(), &snap, &objects, MAX_STALENESS, now());
        assert!(!matches!(v, LocalVerdict::Valid(_)), "{token:?}");
    }
}
