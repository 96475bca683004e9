//! Issue 12, over real sockets against the Kubernetes API stand-in (which counts the
//! TokenReviews it serves): forgeries refused before any TokenReview, a cache that forged
//! tokens' verdicts cannot poison, and ports that close idle and half-open connections.

mod common;



use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// A kid of the API server's shape (43 base64url characters) that no key has.
const KID: &str = "Yq2mQ3rD0-1x_ZsQe9sYv7u0pKqL6m7hR1cX2wY3z4A";

fn b64(s: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn claims(iss: &str, sub: &str) -> String {
    format!(
        r#"{{"aud":["data-store"],"exp":{},"iat":{},"iss":"{iss}","nbf":{},"sub":"{sub}"}}"#,
        unix_now() + 600,
        unix_now(),
        unix_now()
    )
}

/// A token shaped exactly like the cluster's (RS256, derived-kid shape, 2048-bit signature,
/// the cluster's issuer) but signed by nobody: only TokenReview can tell.
fn shaped_forgery(n: usize) -> String {
    format!(
        "{}.{}.{}",
        b64(format!(r#"{{"alg":"RS256","kid":"{KID}"}}"#)),
        b64(claims(
            ISSUER,
            &format!("system:serviceaccount:api:forged-{n}")
        )),
        b64([n as u8; 256])
    )
}

/// The config of the gRPC tests with the cluster's issuer known and `extra` top-level YAML.
fn config_with(world: &World, cache: &str) -> String {
    config(&world.standin.kubeconfig_path(), cache).replace(
        "  max_in_flight: 16\n",
        &format!("  max_in_flight: 16\n  issuer: {ISSUER}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgery_shapes_cost_no_token_review() {
    let world = world().await;
    let yaml = config_with(&world, "");
    let h = Harness::start_with(world, &yaml).await;
    let payload = b64(claims(ISSUER, "system:serviceaccount:api:api"));
    let header = |h: &str| b64(h);
    let rs256 = header(&format!(r#"{{"alg":"RS256","kid":"{KID}"}}"#));
    let sig = b64([1u8; 256]);
    let forgeries = [
        (
            "empty header and payload",
            "e30.e30.x".to_owned(),
            "malformed_token",
        ),
        (
            "alg none",
            format!("{}.{payload}.", header(r#"{"alg":"none"}"#)),
            "malformed_token",
        ),
        (
            "alg none, with a signature",
            format!("{}.{payload}.{sig}", header(r#"{"alg":"none"}"#)),
            "token_rejected",
        ),
        (
            "HS256",
            format!(
                "{}.{payload}.{}",
                header(&format!(r#"{{"alg":"HS256","kid":"{KID}"}}"#)),
                b64([1u8; 32])
            ),
            "token_rejected",
        ),
        (
            "payload is a JSON array",
            format!(
                "{rs256}.{}.{sig}",
                b64(r#"["system:serviceaccount:api:api"]"#)
            ),
            "malformed_token",
        ),
        (
            "one-byte signature",
            format!("{rs256}.{payload}.{}", b64([1u8])),
            "token_rejected",
        ),
        (
            "wrong issuer",
            format!(
                "{rs256}.{}.{sig}",
                b64(claims(
                    "https://evil.example",
                    "system:serviceaccount:api:api"
                ))
            ),
            "token_rejected",
        ),
        (
            "bad kid shape",
            format!("{}.{payload}.{sig}", header(r#"{"alg":"RS256","kid":"x"}"#)),
            "token_rejected",
        ),
        (
            "no issuer",
            format!(
                "{rs256}.{}.{sig}",
                b64(format!(
                    r#"{{"aud":["data-store"],"exp":{}}}"#,
                    unix_now() + 600
                ))
            ),
            "malformed_token",
        ),
    ];
    let before = h.world.standin.token_reviews_served();
    for (what, token, code) in &forgeries {
        let r = h.check_ok(data_store(&[("x-client-id", token)])).await;
        assert_eq!(denied_status(&r), Some(403), "{what}");
        assert_eq!(reason(&r).as_deref(), Some(*code), "{what}");
    }
    assert_eq!(
        h.world.standin.token_reviews_served(),
        before,
        "no TokenReview for any forgery shape"
    );

    // The cluster's own token still passes.
    let token = h.world.api_token(AUD);
    let r = h.check_ok(data_store(&[("x-client-id", &token)])).await;
    allowed_headers(&r);
    assert_eq!(h.world.standin.token_reviews_served(), before + 1);
    h.stop().await;
}

/// A flood of well-shaped forgeries (each costs one TokenReview and leaves a negative entry)
/// cannot evict a verified identity: its next Check is still a cache hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_verdicts_cannot_evict_verified_identities() {
    let world = world().await;
    let yaml = config_with(
        &world,
        "cache:\n  max_entries: 100\n  negative_max_entries: 10\n  negative_ttl: 60s\n",
    );
    let h = Harness::start_with(world, &yaml).await;
    let token = h.world.api_token(AUD);
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &token)])).await);
    let before = h.world.standin.token_reviews_served();

    const FORGED: usize = 300; // 30 times the negative capacity
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..FORGED {
        let client = h.client.clone();
        tasks.spawn(async move {
            let req = data_store(&[("x-client-id", &shaped_forgery(n))]);
            client.clone().check(req).await.map(|r| r.into_inner())
        });
        if tasks.len() >= 16 {
            let r = tasks.join_next().await.unwrap().unwrap().unwrap();
            assert_eq!(reason(&r).as_deref(), Some("token_rejected"));
        }
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(
            reason(&r.unwrap().unwrap()).as_deref(),
            Some("token_rejected")
        );
    }
    assert_eq!(
        h.world.standin.token_reviews_served(),
        before + FORGED as u64,
        "each shaped forgery costs exactly one TokenReview"
    );
    let (_, metrics) = h.admin_get("/metrics").await;
    assert!(metrics.contains("tokengate_cache_entries 11"), "{metrics}");

    // The verified caller: still a hit, no TokenReview.
    allowed_headers(&h.check_ok(data_store(&[("x-client-id", &token)])).await);
    assert_eq!(
        h.world.standin.token_reviews_served(),
        before + FORGED as u64
    );
    h.stop().await;
}
