//! TokenRequest, OIDC discovery with key rotation, object endpoints and fault injection,
//! over real HTTPS.

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::{
    call, claims, client, compact, jwt_parts, raw_field, review, review_error, status_of,
    wait_for_listener, Answer,
};
use kube_standin::{Fault, KeyAlg, MintRequest, Options, Standin};
use serde_json::json;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

async fn standin() -> Standin {
    Standin::start(Options::default()).await.expect("start")
}

fn token_path(ns: &str, sa: &str) -> String {
    format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token")
}

#[tokio::test]
async fn token_request_response_and_errors() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    s.create_service_account("payments", "api");
    s.create_service_account("payments", "other");
    let pod_uid = s.create_pod("payments", "api-xyz", "api", None);
    s.create_pod("payments", "other-pod", "other", None);

    let a = call(
        &admin,
        "POST",
        &token_path("payments", "api"),
        Some(
            &json!({"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest",
            "spec":{"audiences":["vault"],"expirationSeconds":3600}}),
        ),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let body = compact(&a.body);
    assert!(body.starts_with(r#"{"kind":"TokenRequest","apiVersion":"authentication.k8s.io/v1","metadata":{"name":"api","namespace":"payments","creationTimestamp":""#), "{body}");
    assert_eq!(
        raw_field(&body, "spec"),
        r#"{"audiences":["vault"],"expirationSeconds":3600,"boundObjectRef":null}"#
    );
    let v = a.json();
    let token = v["status"]["token"].as_str().unwrap();
    assert!(raw_field(&body, "status").starts_with(r#"{"token":""#));
    let c = claims(token);
    assert_eq!(c["aud"], json!(["vault"]));
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    let created = v["metadata"]["creationTimestamp"].as_str().unwrap();
    let expires = v["status"]["expirationTimestamp"].as_str().unwrap();
    assert!(created.ends_with('Z') && expires.ends_with('Z') && created.len() == 20);
    assert!(expires > created);

    // Defaults: API audiences and 3600 s; a bound pod is echoed.
    let a = call(
        &admin,
        "POST",
        &token_path("payments", "api"),
        Some(&json!({"spec":{"boundObjectRef":{"kind":"Pod","apiVersion":"v1","name":"api-xyz","uid":pod_uid}}})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(
        raw_field(&compact(&a.body), "spec"),
        format!(
            r#"{{"audiences":["{ISSUER}"],"expirationSeconds":3600,"boundObjectRef":{{"kind":"Pod","apiVersion":"v1","name":"api-xyz","uid":"{pod_uid}"}}}}"#
        )
    );

    let cases: Vec<(&str, serde_json::Value, u16, String)> = vec![
        ("api", json!({"spec":{"expirationSeconds":300}}), 422,
         r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 300: may not specify a duration less than 10 minutes","reason":"Invalid","details":{"group":"authentication.k8s.io","kind":"TokenRequest","causes":[{"reason":"FieldValueInvalid","message":"Invalid value: 300: may not specify a duration less than 10 minutes","field":"spec.expirationSeconds"}]},"code":422}"#.to_string()),
        ("api", json!({"spec":{"expirationSeconds":4294967297i64}}), 422,
         r#"may not specify a duration larger than 2^32 seconds"#.to_string()),
        ("nope", json!({"spec":{}}), 404,
         r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"serviceaccounts \"nope\" not found","reason":"NotFound","details":{"name":"nope","kind":"serviceaccounts"},"code":404}"#.to_string()),
        ("api", json!({"spec":{"boundObjectRef":{"kind":"Pod","apiVersion":"v1","name":"gone"}}}), 404,
         r#"pods \"gone\" not found"#.to_string()),
        ("api", json!({"spec":{"boundObjectRef":{"kind":"Pod","apiVersion":"v1","name":"other-pod"}}}), 400,
         r#"cannot bind token for serviceaccount \"api\" to pod running with different serviceaccount name."#.to_string()),
        ("api", json!({"spec":{"boundObjectRef":{"kind":"Pod","apiVersion":"v1","name":"api-xyz","uid":"0000"}}}), 409,
         r#""message":"Operation cannot be fulfilled on Pod \"api-xyz\": the UID in the bound object reference (0000) does not match the UID in record. The object might have been deleted and then recreated","reason":"Conflict""#.to_string()),
        ("api", json!({"spec":{"boundObjectRef":{"kind":"ConfigMap","apiVersion":"v1","name":"x"}}}), 400,
         r#""message":"cannot bind token to object of type /v1, Kind=ConfigMap","reason":"BadRequest","code":400"#.to_string()),
        ("api", json!({"metadata":{"name":"other"},"spec":{}}), 422,
         r#"TokenRequest.authentication.k8s.io \"api\" is invalid: metadata.name: Invalid value: \"other\": must match the service account name if specified"#.to_string()),
    ];
    for (sa, req, code, want) in cases {
        let a = call(&admin, "POST", &token_path("payments", sa), Some(&req)).await;
        assert_eq!(a.status, code, "{req}: {}", a.body);
        assert!(
            a.body.contains(&want),
            "{req}:\n got {}\nwant {want}",
            a.body
        );
    }

    // The Rust helper uses the same path and reports the same Status message.
    let err = s
        .mint(&MintRequest::new("payments", "api").expires_in(60))
        .unwrap_err();
    assert!(format!("{err:#}").contains("may not specify a duration less than 10 minutes"));

    // A service account may not mint tokens.
    let sa_token = s.mint(&MintRequest::new("payments", "api")).unwrap();
    let sa_client = client(&s, Some(&sa_token)).await;
    let a = call(
        &sa_client,
        "POST",
        &token_path("payments", "api"),
        Some(&json!({"spec":{}})),
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(a.body.contains(r#""message":"serviceaccounts \"api\" is forbidden: User \"system:serviceaccount:payments:api\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"payments\"""#), "{}", a.body);
    s.shutdown().await;
}

/// DER length.
fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else if n < 0x100 {
        vec![0x81, n as u8]
    } else {
        vec![0x82, (n >> 8) as u8, n as u8]
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(der_len(content.len()));
    v.extend_from_slice(content);
    v
}

fn der_uint(b: &[u8]) -> Vec<u8> {
    let mut c = Vec::new();
    if b[0] & 0x80 != 0 {
        c.push(0);
    }
    c.extend_from_slice(b);
    der(0x02, &c)
}

/// The kid a JWK should have: base64url(SHA-256(SPKI DER)), SPKI rebuilt from the JWK.
fn expected_kid(jwk: &serde_json::Value) -> String {
    let b = |k: &str| URL_SAFE_NO_PAD.decode(jwk[k].as_str().unwrap()).unwrap();
    let spki = match jwk["kty"].as_str().unwrap() {
        "RSA" => {
            let alg = der(
                0x30,
                &[
                    &der(
                        0x06,
                        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
                    )[..],
                    &[0x05, 0x00],
                ]
                .concat(),
            );
            let rsa = der(0x30, &[der_uint(&b("n")), der_uint(&b("e"))].concat());
            let mut bits = vec![0u8];
            bits.extend(rsa);
            der(0x30, &[alg, der(0x03, &bits)].concat())
        }
        "EC" => {
            let mut v = hex_decode("3059301306072a8648ce3d020106082a8648ce3d030107034200");
            v.push(0x04);
            v.extend(b("x"));
            v.extend(b("y"));
            v
        }
        other => panic!("unexpected kty {other}"),
    };
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki);
    URL_SAFE_NO_PAD.encode(d.as_ref())
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A discovery document as kube-apiserver serves it: 200, `content_type`, and public
/// caching for an hour.
fn assert_discovery_answer(a: &Answer, content_type: &str) {
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type").as_deref(), Some(content_type));
    assert_eq!(
        a.header("cache-control").as_deref(),
        Some("public, max-age=3600")
    );
}

#[tokio::test]
async fn oidc_discovery_access_shape_and_key_rotation() {
    let s = standin().await;
    s.create_service_account("ns", "sa");
    let sa_token = s.mint(&MintRequest::new("ns", "sa")).unwrap();
    let sa_client = client(&s, Some(&sa_token)).await;

    let anon = client(&s, None).await;
    let a = call(&anon, "GET", "/openid/v1/jwks", None).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.body,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"forbidden: User \"system:anonymous\" cannot get path \"/openid/v1/jwks\"","reason":"Forbidden","details":{},"code":403}"#
    );
    let a = call(&anon, "GET", "/.well-known/openid-configuration", None).await;
    assert_eq!(a.status, 403);

    let a = call(&sa_client, "GET", "/.well-known/openid-configuration", None).await;
    assert_discovery_answer(&a, "application/json");
    assert_eq!(
        a.body,
        format!(
            r#"{{"issuer":"{ISSUER}","jwks_uri":"{}/openid/v1/jwks","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["RS256"]}}"#,
            s.url()
        )
    );

    let a = call(&sa_client, "GET", "/openid/v1/jwks", None).await;
    assert_discovery_answer(&a, "application/jwk-set+json");
    assert!(
        a.body
            .starts_with(r#"{"keys":[{"use":"sig","kty":"RSA","kid":""#),
        "{}",
        a.body
    );
    assert!(
        a.body.contains(r#"","alg":"RS256","n":""#) && a.body.ends_with(r#"","e":"AQAB"}]}"#),
        "{}",
        a.body
    );
    let jwks = a.json();
    let old_kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    assert_eq!(expected_kid(&jwks["keys"][0]), old_kid);
    let h: serde_json::Value = serde_json::from_str(&jwt_parts(&sa_token).0).unwrap();
    assert_eq!(h["kid"], old_kid.as_str());

    // Add an ES256 key: published, signs from now on; old tokens still verify.
    let new_kid = s.add_signing_key(KeyAlg::Es256);
    let jwks = call(&sa_client, "GET", "/openid/v1/jwks", None).await;
    let v = jwks.json();
    assert_eq!(v["keys"].as_array().unwrap().len(), 2);
    let ec = &v["keys"][1];
    assert_eq!(ec["kid"], new_kid.as_str());
    assert_eq!(expected_kid(ec), new_kid);
    assert!(
        jwks.body.contains(&format!(
            r#"{{"use":"sig","kty":"EC","kid":"{new_kid}","crv":"P-256","alg":"ES256","x":""#
        )),
        "{}",
        jwks.body
    );
    let cfg = call(&sa_client, "GET", "/.well-known/openid-configuration", None)
        .await
        .json();
    assert_eq!(
        cfg["id_token_signing_alg_values_supported"],
        json!(["ES256", "RS256"])
    );
    let new_token = s.mint(&MintRequest::new("ns", "sa")).unwrap();
    assert!(jwt_parts(&new_token).0.contains(&new_kid));
    let admin = client(&s, Some(&s.admin_token())).await;
    assert_eq!(
        review(&admin, &sa_token, &[]).await.json()["status"]["authenticated"],
        true
    );
    assert_eq!(
        review(&admin, &new_token, &[]).await.json()["status"]["authenticated"],
        true
    );

    // Retire the old key: gone from JWKS, old tokens no longer verify.
    s.retire_key(&old_kid);
    let v = call(&sa_client, "GET", "/openid/v1/jwks", None).await;
    // sa_client's own token was signed by the retired key: it is now rejected (401).
    assert_eq!(v.status, 401);
    let new_client = client(&s, Some(&new_token)).await;
    let v = call(&new_client, "GET", "/openid/v1/jwks", None)
        .await
        .json();
    assert_eq!(v["keys"].as_array().unwrap().len(), 1);
    assert_eq!(v["keys"][0]["kid"], new_kid.as_str());
    assert_eq!(
        review_error(&admin, &sa_token, &[]).await,
        "[invalid bearer token, invalid signature, no keys found]"
    );
    s.shutdown().await;

    // A non-https issuer has no discovery endpoints.
    let plain = Standin::start(Options {
        issuer: "kubernetes.default.svc".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = client(&plain, Some(&plain.admin_token())).await;
    assert_eq!(status_of(&admin, "GET", "/openid/v1/jwks").await, 404);
    plain.shutdown().await;
}

#[tokio::test]
async fn objects_over_http() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    let a = call(
        &admin,
        "POST",
        "/api/v1/namespaces/shop/serviceaccounts",
        Some(&json!({"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"cart"}})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let sa_uid = a.json()["metadata"]["uid"].as_str().unwrap().to_string();
    let a = call(
        &admin,
        "POST",
        "/api/v1/namespaces/shop/serviceaccounts",
        Some(&json!({"metadata":{"name":"cart"}})),
    )
    .await;
    assert_eq!(a.status, 409);
    assert!(
        a.body.contains(
            r#""message":"serviceaccounts \"cart\" already exists","reason":"AlreadyExists""#
        ),
        "{}",
        a.body
    );
    // Pods need their service account; "default" exists in every namespace.
    let a = call(&admin, "POST", "/api/v1/namespaces/shop/pods",
        Some(&json!({"metadata":{"name":"p0"},"spec":{"serviceAccountName":"ghost","containers":[{"name":"c","image":"x"}]}}))).await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = call(&admin, "POST", "/api/v1/namespaces/shop/pods",
        Some(&json!({"metadata":{"name":"p1"},"spec":{"serviceAccountName":"cart","nodeName":"n1","containers":[{"name":"c","image":"x"}]}}))).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let pod_uid = a.json()["metadata"]["uid"].as_str().unwrap().to_string();
    let a = call(
        &admin,
        "POST",
        "/api/v1/namespaces/shop/pods",
        Some(&json!({"metadata":{"name":"p2"},"spec":{}})),
    )
    .await;
    assert_eq!(a.json()["spec"]["serviceAccountName"], "default");

    let a = call(&admin, "POST", &token_path("shop", "cart"),
        Some(&json!({"spec":{"audiences":["shop"],"boundObjectRef":{"kind":"Pod","apiVersion":"v1","name":"p1"}}}))).await;
    let token = a.json()["status"]["token"].as_str().unwrap().to_string();
    let v = review(&admin, &token, &["shop"]).await.json();
    assert_eq!(v["status"]["user"]["uid"], sa_uid.as_str());
    assert_eq!(
        v["status"]["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([pod_uid])
    );
    assert_eq!(
        v["status"]["user"]["extra"]["authentication.kubernetes.io/node-name"],
        json!(["n1"])
    );

    // A DELETE without a grace period is graceful (30 s, the pod's default): the pod is
    // terminating and its token still valid; gracePeriodSeconds=0 removes it at once.
    let a = call(&admin, "DELETE", "/api/v1/namespaces/shop/pods/p1", None).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["metadata"]["deletionGracePeriodSeconds"],
        30,
        "{}",
        a.body
    );
    assert!(
        a.json()["metadata"]["deletionTimestamp"].is_string(),
        "{}",
        a.body
    );
    assert_eq!(
        review(&admin, &token, &["shop"]).await.json()["status"]["authenticated"],
        true
    );
    let a = call(
        &admin,
        "DELETE",
        "/api/v1/namespaces/shop/pods/p1",
        Some(&json!({"kind":"DeleteOptions","apiVersion":"v1","gracePeriodSeconds":0})),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        review_error(&admin, &token, &["shop"]).await,
        "[invalid bearer token, service account token has been invalidated]"
    );
    assert_eq!(
        status_of(&admin, "DELETE", "/api/v1/namespaces/shop/pods/p1").await,
        404
    );
    assert_eq!(
        status_of(
            &admin,
            "GET",
            "/api/v1/namespaces/shop/serviceaccounts/cart"
        )
        .await,
        200
    );
    assert_eq!(
        status_of(
            &admin,
            "DELETE",
            "/api/v1/namespaces/shop/serviceaccounts/cart"
        )
        .await,
        200
    );
    assert_eq!(
        status_of(
            &admin,
            "GET",
            "/api/v1/namespaces/shop/serviceaccounts/cart"
        )
        .await,
        404
    );

    // ClusterRoleBindings.
    s.create_service_account("shop", "checker");
    let checker = s.mint(&MintRequest::new("shop", "checker")).unwrap();
    let checker_client = client(&s, Some(&checker)).await;
    assert_eq!(review(&checker_client, &checker, &[]).await.status, 403);
    let a = call(&admin, "POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        Some(&json!({"metadata":{"name":"checker"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"system:auth-delegator"},
            "subjects":[{"kind":"ServiceAccount","name":"checker","namespace":"shop"}]}))).await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(review(&checker_client, &checker, &[]).await.status, 201);
    assert_eq!(
        status_of(
            &admin,
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/checker"
        )
        .await,
        200
    );
    assert_eq!(review(&checker_client, &checker, &[]).await.status, 403);

    // Only admins manage objects.
    let a = call(
        &checker_client,
        "POST",
        "/api/v1/namespaces/shop/serviceaccounts",
        Some(&json!({"metadata":{"name":"x"}})),
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(a.body.contains(r#"serviceaccounts is forbidden: User \"system:serviceaccount:shop:checker\" cannot create resource \"serviceaccounts\" in API group \"\" in the namespace \"shop\""#), "{}", a.body);
    s.shutdown().await;
}

#[tokio::test]
async fn injected_status_faults_look_like_real_statuses() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    s.set_fault(Fault::Status {
        code: 503,
        retry_after: Some(2),
    });
    let a = review(&admin, "x", &[]).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.header("retry-after").as_deref(), Some("2"));
    let v = a.json();
    assert_eq!(
        (v["kind"].as_str(), v["reason"].as_str(), v["code"].as_u64()),
        (Some("Status"), Some("ServiceUnavailable"), Some(503))
    );
    assert_eq!(v["details"]["retryAfterSeconds"], 2);

    s.set_fault(Fault::Status {
        code: 429,
        retry_after: Some(1),
    });
    let a = review(&admin, "x", &[]).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        a.body,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Too many requests, please try again later.","reason":"TooManyRequests","details":{"retryAfterSeconds":1},"code":429}"#
    );
    s.set_fault(Fault::Status {
        code: 500,
        retry_after: None,
    });
    let a = review(&admin, "x", &[]).await;
    assert_eq!(a.status, 500);
    assert_eq!(a.json()["reason"], "InternalError");
    assert!(a.header("retry-after").is_none());
    // Retry-After as an HTTP-date, about 30 s from now.
    s.set_fault(Fault::StatusRetryDate {
        code: 429,
        retry_after: 30,
    });
    let a = review(&admin, "x", &[]).await;
    assert_eq!(a.status, 429);
    let date = a.header("retry-after").expect("Retry-After");
    let at = httpdate::parse_http_date(&date).expect(&date);
    let ahead = at
        .duration_since(std::time::SystemTime::now())
        .expect("in the future");
    assert!(
        ahead > Duration::from_secs(20) && ahead <= Duration::from_secs(30),
        "{date}"
    );
    assert_eq!(a.json()["details"]["retryAfterSeconds"], 30);
    // Faults apply to TokenReview only.
    assert_eq!(status_of(&admin, "GET", "/version").await, 200);
    assert_eq!(s.token_reviews_served(), 4);

    s.set_fault(Fault::Latency(Duration::from_millis(300)));
    let t = Instant::now();
    assert_eq!(review(&admin, "x", &[]).await.status, 201);
    assert!(t.elapsed() >= Duration::from_millis(300));
    s.set_fault(Fault::None);
    let t = Instant::now();
    assert_eq!(review(&admin, "x", &[]).await.status, 201);
    assert!(t.elapsed() < Duration::from_millis(300));
    s.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    let big = "a".repeat(3 * 1024 * 1024 + 1);
    let a = review(&admin, &big, &[]).await;
    assert_eq!(a.status, 413);
    assert_eq!(
        a.body,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Request entity too large: limit is 3145728","reason":"RequestEntityTooLarge","code":413}"#
    );
    s.shutdown().await;
}

async fn try_review(c: &kube::Client) -> Result<u16, String> {
    let req = http::Request::builder()
        .method("POST")
        .uri("/apis/authentication.k8s.io/v1/tokenreviews")
        .header("content-type", "application/json")
        .body(kube::client::Body::from(
            br#"{"spec":{"token":"x"}}"#.to_vec(),
        ))
        .unwrap();
    c.send(req)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn hang_close_and_down_up() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;

    s.set_fault(Fault::Hang);
    let r = tokio::time::timeout(Duration::from_millis(500), try_review(&admin)).await;
    assert!(r.is_err(), "a hanging request must not answer: {r:?}");

    s.set_fault(Fault::CloseConnection);
    let fresh = client(&s, Some(&s.admin_token())).await;
    let r = tokio::time::timeout(Duration::from_secs(5), try_review(&fresh))
        .await
        .expect("closing must be quick");
    assert!(r.is_err(), "a closed connection must be an error: {r:?}");

    // Reset: a new TCP connection is reset before any TLS byte.
    s.set_fault(Fault::Reset);
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await
    .expect("reset must be quick");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let r = tokio::time::timeout(Duration::from_secs(5), try_review(&fresh))
        .await
        .expect("quick");
    assert!(r.is_err(), "{r:?}");

    s.set_fault(Fault::Down);
    // Let the accept loop close the socket.
    let addr = s.addr();
    let refused = wait_for_listener(addr, false, 50, Duration::from_millis(20)).await;
    assert!(refused, "connections must be refused while down");
    let r = tokio::time::timeout(Duration::from_secs(5), try_review(&fresh))
        .await
        .expect("quick");
    assert!(r.is_err(), "{r:?}");

    s.set_fault(Fault::None);
    let up = wait_for_listener(addr, true, 100, Duration::from_millis(20)).await;
    assert!(up, "the listener must come back on the same port");
    let again = client(&s, Some(&s.admin_token())).await;
    assert_eq!(try_review(&again).await, Ok(201));
    s.shutdown().await;
}
