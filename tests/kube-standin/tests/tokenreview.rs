//! TokenReview over real HTTPS: response shape, every error string of §4 of
//! kubernetes-tokens.md, audience rules, legacy tokens, caller authentication (401) and
//! RBAC (403), reviewer-token rotation and the review counter.

mod common;

use common::{
    call, claims, client, client_from_kubeconfig, compact, jwt_parts, now, raw_field, review,
    review_error,
};
use kube_standin::{KeyAlg, MintRequest, Options, Standin};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

async fn standin() -> Standin {
    Standin::start(Options::default()).await.expect("start")
}

async fn standin_short() -> Standin {
    Standin::start(Options {
        enforce_min_expiration: false,
        ..Default::default()
    })
    .await
    .expect("start")
}

#[tokio::test]
async fn success_has_exact_shape_and_extra() {
    let s = standin().await;
    let sa_uid = s.create_service_account("payments", "api");
    let pod_uid = s.create_pod("payments", "api-7d9f6c4b58-mk2vq", "api", Some("worker-2"));
    let token = s
        .mint(
            &MintRequest::new("payments", "api")
                .audience("vault")
                .pod("api-7d9f6c4b58-mk2vq"),
        )
        .unwrap();
    let claims = claims(&token);
    let jti = claims["jti"].as_str().unwrap();
    let node_uid = claims["kubernetes.io"]["node"]["uid"].as_str().unwrap();

    let reviewer = client_from_kubeconfig(&s.kubeconfig_path()).await;
    let a = review(&reviewer, &token, &["vault"]).await;
    assert_eq!(a.status, 201);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/json")
    );
    let expected = format!(
        concat!(
            r#"{{"kind":"TokenReview","apiVersion":"authentication.k8s.io/v1","metadata":{{}},"#,
            r#""spec":{{"token":"{token}","audiences":["vault"]}},"#,
            r#""status":{{"authenticated":true,"user":{{"username":"system:serviceaccount:payments:api","#,
            r#""uid":"{sa_uid}","groups":["system:serviceaccounts","system:serviceaccounts:payments","system:authenticated"],"#,
            r#""extra":{{"authentication.kubernetes.io/credential-id":["JTI={jti}"],"#,
            r#""authentication.kubernetes.io/node-name":["worker-2"],"#,
            r#""authentication.kubernetes.io/node-uid":["{node_uid}"],"#,
            r#""authentication.kubernetes.io/pod-name":["api-7d9f6c4b58-mk2vq"],"#,
            r#""authentication.kubernetes.io/pod-uid":["{pod_uid}"]}}}},"audiences":["vault"]}}}}"#
        ),
        token = token,
        sa_uid = sa_uid,
        jti = jti,
        node_uid = node_uid,
        pod_uid = pod_uid
    );
    assert_eq!(a.body, expected);
    s.shutdown().await;
}

#[tokio::test]
async fn claims_are_written_as_kubernetes_writes_them() {
    let s = standin().await;
    let sa_uid = s.create_service_account("payments", "api");
    let pod_uid = s.create_pod("payments", "p", "api", Some("worker-2"));
    let token = s
        .mint(
            &MintRequest::new("payments", "api")
                .pod("p")
                .expires_in(3600),
        )
        .unwrap();
    let (header, payload) = jwt_parts(&token);
    let h: serde_json::Value = serde_json::from_str(&header).unwrap();
    let kid = h["kid"].as_str().unwrap();
    assert_eq!(header, format!(r#"{{"alg":"RS256","kid":"{kid}"}}"#));
    assert_eq!(kid.len(), 43);
    let c: serde_json::Value = serde_json::from_str(&payload).unwrap();
    let iat = c["iat"].as_i64().unwrap();
    let expected = format!(
        concat!(
            r#"{{"aud":["{iss}"],"exp":{exp},"iat":{iat},"iss":"{iss}","jti":"{jti}","#,
            r#""kubernetes.io":{{"namespace":"payments","node":{{"name":"worker-2","uid":"{node_uid}"}},"#,
            r#""pod":{{"name":"p","uid":"{pod_uid}"}},"serviceaccount":{{"name":"api","uid":"{sa_uid}"}}}},"#,
            r#""nbf":{iat},"sub":"system:serviceaccount:payments:api"}}"#
        ),
        iss = ISSUER,
        exp = iat + 3600,
        iat = iat,
        jti = c["jti"].as_str().unwrap(),
        node_uid = c["kubernetes.io"]["node"]["uid"].as_str().unwrap(),
        pod_uid = pod_uid,
        sa_uid = sa_uid
    );
    assert_eq!(payload, expected);
    assert!((iat - now()).abs() < 5);

    // Extended token (§2.4): 3607 s, pod-bound, API audiences only.
    let ext = s
        .mint(
            &MintRequest::new("payments", "api")
                .pod("p")
                .expires_in(3607),
        )
        .unwrap();
    let c = claims(&ext);
    let iat = c["iat"].as_i64().unwrap();
    assert_eq!(c["exp"].as_i64().unwrap(), iat + 365 * 24 * 3600);
    assert_eq!(
        c["kubernetes.io"]["warnafter"].as_i64().unwrap(),
        iat + 3607
    );

    // Unbound: only namespace and serviceaccount.
    let unbound = s.mint(&MintRequest::new("payments", "api")).unwrap();
    let c = claims(&unbound);
    assert_eq!(
        c["kubernetes.io"],
        serde_json::json!({"namespace":"payments","serviceaccount":{"name":"api","uid":sa_uid}})
    );
    s.shutdown().await;
}

#[tokio::test]
async fn es256_and_feature_flags() {
    let s = Standin::start(Options {
        key_alg: KeyAlg::Es256,
        jti: false,
        pod_node_info: false,
        ..Default::default()
    })
    .await
    .unwrap();
    s.create_service_account("ns", "sa");
    s.create_pod("ns", "p", "sa", Some("node-1"));
    let token = s
        .mint(&MintRequest::new("ns", "sa").audience("x").pod("p"))
        .unwrap();
    let (header, payload) = jwt_parts(&token);
    assert!(header.starts_with(r#"{"alg":"ES256","kid":""#), "{header}");
    assert!(!payload.contains("\"jti\""), "{payload}");
    assert!(!payload.contains("\"node\""), "{payload}");
    let admin = client(&s, Some(&s.admin_token())).await;
    let v = review(&admin, &token, &["x"]).await.json();
    assert_eq!(v["status"]["authenticated"], true);
    let extra = v["status"]["user"]["extra"].as_object().unwrap();
    let keys: Vec<&str> = extra.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "authentication.kubernetes.io/pod-name",
            "authentication.kubernetes.io/pod-uid"
        ]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn error_strings_follow_the_validation_order() {
    let s = standin_short().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    s.create_service_account("payments", "api");
    s.create_pod("payments", "p", "api", None);
    let t = now();

    // Expired beyond the 60 s leeway, and within it.
    let expired = s
        .mint(
            &MintRequest::new("payments", "api")
                .audience("a")
                .issued_at(t - 4000)
                .expires_in(3600),
        )
        .unwrap();
    assert_eq!(
        review_error(&admin, &expired, &["a"]).await,
        "[invalid bearer token, service account token has expired]"
    );
    let in_leeway = s
        .mint(
            &MintRequest::new("payments", "api")
                .audience("a")
                .issued_at(t - 630)
                .expires_in(600),
        )
        .unwrap();
    let v = review(&admin, &in_leeway, &["a"]).await.json();
    assert_eq!(v["status"]["authenticated"], true, "{v}");

    // Audience is checked before expiry.
    let expired_inventory = s
        .mint(
            &MintRequest::new("payments", "api")
                .audience("inventory-api")
                .issued_at(t - 4000)
                .expires_in(3600),
        )
        .unwrap();
    assert_eq!(
        review_error(&admin, &expired_inventory, &["payments-api"]).await,
        r#"[invalid bearer token, token audiences ["inventory-api"] is invalid for the target audiences ["payments-api"]]"#
    );

    // nbf / iat in the future.
    let future = s
        .mint(
            &MintRequest::new("payments", "api")
                .audience("a")
                .issued_at(t + 600)
                .expires_in(600),
        )
        .unwrap();
    assert_eq!(
        review_error(&admin, &future, &["a"]).await,
        "[invalid bearer token, service account token is not valid yet]"
    );
    let slightly_future = s
        .mint(
            &MintRequest::new("payments", "api")
                .audience("a")
                .issued_at(t + 30)
                .expires_in(600),
        )
        .unwrap();
    assert_eq!(
        review(&admin, &slightly_future, &["a"]).await.json()["status"]["authenticated"],
        true
    );

    // Pod deleted, then recreated with a new UID.
    let bound = s
        .mint(&MintRequest::new("payments", "api").audience("a").pod("p"))
        .unwrap();
    let old_pod_uid = s
        .mint(&MintRequest::new("payments", "api").audience("a").pod("p"))
        .map(|t| {
            let c = claims(&t);
            c["kubernetes.io"]["pod"]["uid"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .unwrap();
    s.delete_pod("payments", "p");
    assert_eq!(
        review_error(&admin, &bound, &["a"]).await,
        "[invalid bearer token, service account token has been invalidated]"
    );
    let new_pod_uid = s.create_pod("payments", "p", "api", None);
    assert_eq!(
        review_error(&admin, &bound, &["a"]).await,
        format!("[invalid bearer token, pod UID ({new_pod_uid}) does not match service account pod ref claim ({old_pod_uid})]")
    );

    // Service account recreated, then deleted.
    let unbound = s
        .mint(&MintRequest::new("payments", "api").audience("a"))
        .unwrap();
    let c = claims(&unbound);
    let old_sa_uid = c["kubernetes.io"]["serviceaccount"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let new_sa_uid = s.create_service_account("payments", "api");
    assert_eq!(
        review_error(&admin, &unbound, &["a"]).await,
        format!("[invalid bearer token, service account UID ({new_sa_uid}) does not match claim ({old_sa_uid})]")
    );
    s.delete_service_account("payments", "api");
    assert_eq!(
        review_error(&admin, &unbound, &["a"]).await,
        r#"[invalid bearer token, serviceaccounts "api" not found]"#
    );
    s.shutdown().await;
}

#[tokio::test]
async fn garbage_foreign_and_tampered_tokens() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    s.create_service_account("ns", "sa");
    for garbage in [
        "not-a-jwt",
        "a.b.c",
        "{\"alg\":\"none\"}.x.y",
        "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln",
    ] {
        assert_eq!(
            review_error(&admin, garbage, &[]).await,
            "invalid bearer token",
            "{garbage}"
        );
    }
    // Another cluster with another issuer: no opinion.
    let other = Standin::start(Options {
        issuer: "https://other.example".to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    other.create_service_account("ns", "sa");
    let foreign = other.mint(&MintRequest::new("ns", "sa")).unwrap();
    assert_eq!(
        review_error(&admin, &foreign, &[]).await,
        "invalid bearer token"
    );
    other.shutdown().await;

    // Same issuer, another key: no key with that kid.
    let twin = standin().await;
    twin.create_service_account("ns", "sa");
    let twin_token = twin.mint(&MintRequest::new("ns", "sa")).unwrap();
    assert_eq!(
        review_error(&admin, &twin_token, &[]).await,
        "[invalid bearer token, invalid signature, no keys found]"
    );
    twin.shutdown().await;

    // Our kid, tampered payload: the signature fails.
    let good = s.mint(&MintRequest::new("ns", "sa")).unwrap();
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    let (_, payload) = jwt_parts(&good);
    use base64::Engine as _;
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload.replace(
        "\"sub\":\"system:serviceaccount:ns:sa\"",
        "\"sub\":\"system:serviceaccount:ns:sb\"",
    ));
    let tampered = parts.join(".");
    assert_eq!(
        review_error(&admin, &tampered, &[]).await,
        "[invalid bearer token, go-jose/go-jose: error in cryptographic primitive]"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn audiences_default_intersect_and_echo() {
    let s = Standin::start(Options {
        api_audiences: vec!["api".to_string(), "vault".to_string()],
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = client(&s, Some(&s.admin_token())).await;
    s.create_service_account("ns", "sa");
    // No requested audiences: the API audiences, and the token defaults to them too.
    let default_aud = s.mint(&MintRequest::new("ns", "sa")).unwrap();
    let c = claims(&default_aud);
    assert_eq!(c["aud"], serde_json::json!(["api", "vault"]));
    let a = review(&admin, &default_aud, &[]).await;
    let body = compact(&a.body);
    assert!(
        !raw_field(&body, "spec").contains("audiences"),
        "not defaulted in spec: {body}"
    );
    assert_eq!(
        a.json()["status"]["audiences"],
        serde_json::json!(["api", "vault"])
    );

    // Intersection in requested order, duplicates kept.
    let t = s
        .mint(&MintRequest::new("ns", "sa").audience("a").audience("b"))
        .unwrap();
    let v = review(&admin, &t, &["b", "x", "a", "b"]).await.json();
    assert_eq!(v["status"]["audiences"], serde_json::json!(["b", "a", "b"]));
    assert_eq!(
        v["spec"]["audiences"],
        serde_json::json!(["b", "x", "a", "b"])
    );
    assert_eq!(
        review_error(&admin, &t, &["c", "d"]).await,
        r#"[invalid bearer token, token audiences ["a" "b"] is invalid for the target audiences ["c" "d"]]"#
    );
    assert_eq!(
        review_error(&admin, &t, &[]).await,
        r#"[invalid bearer token, token audiences ["a" "b"] is invalid for the target audiences ["api" "vault"]]"#
    );
    s.shutdown().await;
}

#[tokio::test]
async fn legacy_secret_tokens() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    let sa_uid = s.create_service_account("default", "build-robot");
    let token = s
        .mint_legacy("default", "build-robot", "build-robot-secret")
        .unwrap();
    let (header, payload) = jwt_parts(&token);
    assert!(header.starts_with(r#"{"alg":"RS256","kid":""#));
    assert_eq!(
        payload,
        format!(
            concat!(
                r#"{{"iss":"kubernetes/serviceaccount","kubernetes.io/serviceaccount/namespace":"default","#,
                r#""kubernetes.io/serviceaccount/secret.name":"build-robot-secret","#,
                r#""kubernetes.io/serviceaccount/service-account.name":"build-robot","#,
                r#""kubernetes.io/serviceaccount/service-account.uid":"{uid}","#,
                r#""sub":"system:serviceaccount:default:build-robot"}}"#
            ),
            uid = sa_uid
        )
    );
    let a = review(&admin, &token, &[]).await;
    assert_eq!(
        raw_field(&compact(&a.body), "status"),
        format!(
            r#"{{"authenticated":true,"user":{{"username":"system:serviceaccount:default:build-robot","uid":"{sa_uid}","groups":["system:serviceaccounts","system:serviceaccounts:default","system:authenticated"]}},"audiences":["{ISSUER}"]}}"#
        )
    );
    assert_eq!(
        review_error(&admin, &token, &["vault"]).await,
        format!(
            r#"[invalid bearer token, token audiences ["{ISSUER}"] is invalid for the target audiences ["vault"]]"#
        )
    );
    s.delete_secret("default", "build-robot-secret");
    assert_eq!(
        review_error(&admin, &token, &[]).await,
        "[invalid bearer token, Token has been invalidated]"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn empty_token_is_a_400() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    let a = review(&admin, "", &["x"]).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"token is required for TokenReview in authentication","reason":"BadRequest","code":400}"#
    );
    // Undecodable bodies are 400s that never quote the document (it holds a token).
    let a = call(
        &admin,
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        Some(&serde_json::json!({"spec":{"token":"secret-one","audiences":"secret-two"}})),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.json()["reason"], "BadRequest");
    assert!(!a.body.contains("secret-"), "{}", a.body);
    s.shutdown().await;
}

#[tokio::test]
async fn caller_authentication_and_rbac() {
    let s = standin().await;
    s.create_service_account("default", "foo");
    let foo = s.mint(&MintRequest::new("default", "foo")).unwrap();
    let target = s
        .mint(&MintRequest::new("default", "foo").audience("x"))
        .unwrap();

    // Invalid credentials: 401, no WWW-Authenticate.
    let bad = client(&s, Some("garbage")).await;
    let a = review(&bad, &target, &["x"]).await;
    assert_eq!(a.status, 401);
    assert_eq!(
        a.body,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#
    );
    assert!(a.header("www-authenticate").is_none());

    // A caller token without an API audience is invalid as a credential too.
    let wrong_aud = client(&s, Some(&target)).await;
    assert_eq!(review(&wrong_aud, &target, &["x"]).await.status, 401);

    // Authenticated but not bound to system:auth-delegator: 403.
    let foo_client = client(&s, Some(&foo)).await;
    let a = review(&foo_client, &target, &["x"]).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(
        a.body,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:default:foo\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope","reason":"Forbidden","details":{"group":"authentication.k8s.io","kind":"tokenreviews"},"code":403}"#
    );
    // No credentials: system:anonymous, 403.
    let anon = client(&s, None).await;
    let a = review(&anon, &target, &["x"]).await;
    assert_eq!(a.status, 403);
    assert!(
        a.body
            .contains(r#"User \"system:anonymous\" cannot create resource"#),
        "{}",
        a.body
    );

    // Binding foo to system:auth-delegator allows it; unbinding forbids again.
    s.bind_cluster_role("foo-delegator", "system:auth-delegator", ("default", "foo"));
    assert_eq!(review(&foo_client, &target, &["x"]).await.status, 201);
    s.delete_cluster_role_binding("foo-delegator");
    assert_eq!(review(&foo_client, &target, &["x"]).await.status, 403);
    // A binding to another role does not help.
    s.bind_cluster_role("foo-view", "view", ("default", "foo"));
    assert_eq!(review(&foo_client, &target, &["x"]).await.status, 403);

    // The reviewer kubeconfig, loaded by kube::Config, through the typed API.
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let reviewer = client_from_kubeconfig(&s.kubeconfig_path()).await;
    let api: kube::Api<TokenReview> = kube::Api::all(reviewer);
    let tr = api
        .create(
            &kube::api::PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: target.clone(),
                    audiences: Some(vec!["x".to_string()]),
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let st = tr.status.unwrap();
    assert_eq!(st.authenticated, Some(true));
    assert_eq!(
        st.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:default:foo")
    );

    // Removing the reviewer's own binding makes kube report the 403 Status.
    s.delete_cluster_role_binding("tokengate-auth-delegator");
    let err = api
        .create(&kube::api::PostParams::default(), &TokenReview::default())
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403);
            assert_eq!(status.reason, "Forbidden");
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    s.shutdown().await;
}

#[tokio::test]
async fn reviewer_token_rotation_revokes_the_old_token() {
    let s = standin().await;
    let old = std::fs::read_to_string(s.reviewer_token_path()).unwrap();
    let old_client = client(&s, Some(&old)).await;
    s.create_service_account("ns", "sa");
    let t = s.mint(&MintRequest::new("ns", "sa")).unwrap();
    assert_eq!(review(&old_client, &t, &[]).await.status, 201);

    // A client from the kubeconfig re-reads tokenFile, so it keeps working.
    let from_file = client_from_kubeconfig(&s.kubeconfig_path()).await;
    s.rotate_reviewer_token();
    let new = std::fs::read_to_string(s.reviewer_token_path()).unwrap();
    assert_ne!(old, new);
    assert_eq!(review(&old_client, &t, &[]).await.status, 401);
    assert_eq!(
        review(&client(&s, Some(&new)).await, &t, &[]).await.status,
        201
    );
    // kube re-reads token files about once a minute; a fresh client sees the new one.
    let fresh = client_from_kubeconfig(&s.kubeconfig_path()).await;
    assert_eq!(review(&fresh, &t, &[]).await.status, 201);
    drop(from_file);
    // And the old token, reviewed, says why.
    let admin = client(&s, Some(&s.admin_token())).await;
    assert_eq!(
        review_error(&admin, &old, &[]).await,
        "[invalid bearer token, service account token has been invalidated]"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn counter_counts_every_review_post() {
    let s = standin().await;
    let admin = client(&s, Some(&s.admin_token())).await;
    assert_eq!(s.token_reviews_served(), 0);
    review(&admin, "x", &[]).await;
    review(&admin, "", &[]).await;
    review(&client(&s, Some("bad")).await, "x", &[]).await;
    assert_eq!(s.token_reviews_served(), 3);
    // Other endpoints do not count.
    call(&admin, "GET", "/version", None).await;
    assert_eq!(s.token_reviews_served(), 3);
    s.shutdown().await;
}
