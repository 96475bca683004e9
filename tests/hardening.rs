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
