//! Conformance with the seed: a real kube-apiserver's TokenReview answer for a pod-bound
//! projected token (`fixtures/seed-tokenreview-response.json`, see fixtures/README.md).
//! The stand-in, configured like that cluster, must mint an equivalent token and answer
//! with the same `status`, key for key and in the same order.

mod common;

use common::{
    client, compact, jwt_parts, mint_seed_token, raw_field, review, seed_like_standin, SeedToken,
};
use kube_standin::{MetadataStyle, MintRequest};

const SEED_SA_UID: &str = "78653ab3-6566-4374-8fd1-15edc70bfda7";
const SEED_POD_UID: &str = "d0d0f6d1-81b2-4246-b195-2637c8165217";

fn seed() -> (String, serde_json::Value) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seed-tokenreview-response.json"
    );
    let raw = std::fs::read_to_string(path).expect("seed fixture");
    let v = serde_json::from_str(&raw).expect("seed fixture is JSON");
    (raw, v)
}

#[tokio::test]
async fn seed_status_matches_key_for_key() {
    let s = seed_like_standin(MetadataStyle::V133).await;
    let SeedToken {
        sa_uid,
        pod_uid,
        token,
    } = mint_seed_token(&s);

    // The seed's curl sent no spec.audiences.
    let admin = client(&s, Some(&s.admin_token())).await;
    let a = review(&admin, &token, &[]).await;
    assert_eq!(a.status, 201, "{}", a.body);

    let (seed_raw, _) = seed();
    let seed_compact = compact(&seed_raw);
    let expected_status = raw_field(&seed_compact, "status")
        .replace(SEED_SA_UID, &sa_uid)
        .replace(SEED_POD_UID, &pod_uid);
    let body = compact(&a.body);
    assert_eq!(raw_field(&body, "status"), expected_status);

    // The spec is echoed with the token and without defaulted audiences, like the seed.
    assert_eq!(
        raw_field(&body, "spec"),
        format!("{{\"token\":\"{token}\"}}")
    );
    // Today's metadata (v1.33+).
    assert_eq!(raw_field(&body, "metadata"), "{}");
    s.shutdown().await;
}

#[tokio::test]
async fn seed_token_claims_have_the_same_shape() {
    let s = seed_like_standin(MetadataStyle::V133).await;
    let SeedToken {
        sa_uid,
        pod_uid,
        token,
    } = mint_seed_token(&s);
    let (_, seed) = seed();
    let seed_token = seed["spec"]["token"].as_str().unwrap();
    let (seed_header, seed_payload) = jwt_parts(seed_token);
    let (header, payload) = jwt_parts(&token);

    let p: serde_json::Value = serde_json::from_str(&payload).unwrap();
    let sp: serde_json::Value = serde_json::from_str(&seed_payload).unwrap();
    let iat = p["iat"].as_i64().unwrap();
    assert_eq!(p["exp"].as_i64().unwrap() - iat, 7200);
    assert_eq!(p["nbf"].as_i64().unwrap(), iat);
    // Same keys, same order, same values apart from times and UIDs.
    let expected = seed_payload
        .replace(&sp["exp"].to_string(), &p["exp"].to_string())
        .replace(&sp["iat"].to_string(), &iat.to_string())
        .replace(SEED_SA_UID, &sa_uid)
        .replace(SEED_POD_UID, &pod_uid);
    assert_eq!(payload, expected);

    let h: serde_json::Value = serde_json::from_str(&header).unwrap();
    let sh: serde_json::Value = serde_json::from_str(&seed_header).unwrap();
    assert_eq!(
        seed_header.replace(sh["kid"].as_str().unwrap(), h["kid"].as_str().unwrap()),
        header
    );
    assert_eq!(h["kid"].as_str().unwrap().len(), 43);
    s.shutdown().await;
}

#[tokio::test]
async fn seed_token_itself_is_rejected_for_want_of_its_key() {
    let s = seed_like_standin(MetadataStyle::V133).await;
    let (_, seed) = seed();
    let seed_token = seed["spec"]["token"].as_str().unwrap();
    let admin = client(&s, Some(&s.admin_token())).await;
    assert_eq!(
        common::review_error(&admin, seed_token, &[]).await,
        "[invalid bearer token, invalid signature, no keys found]"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn pre_v133_metadata_matches_the_seed_era() {
    let s = seed_like_standin(MetadataStyle::PreV133).await;
    s.create_service_account("test", "nginx");
    let token = s
        .mint(&MintRequest::new("test", "nginx").audience("vault"))
        .unwrap();
    let admin = client(&s, Some(&s.admin_token())).await;
    let a = review(&admin, &token, &[]).await;
    let body = compact(&a.body);
    assert_eq!(
        raw_field(&body, "metadata"),
        r#"{"creationTimestamp":null}"#
    );
    assert!(
        body.starts_with(
            r#"{"kind":"TokenReview","apiVersion":"authentication.k8s.io/v1","metadata""#
        ),
        "{body}"
    );
    s.shutdown().await;
}
