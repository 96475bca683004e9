//! Issue 12, over real sockets against the Kubernetes API stand-in (which counts the
//! TokenReviews it serves): forgeries refused before any TokenReview, a cache that forged
//! tokens' verdicts cannot poison, and ports that close idle and half-open connections.

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Limits small enough to test: handshake 1 s, idle 3 s (PINGs every 1 s keep real clients).
const LIMITS: &str = "listen:
  limits:
    handshake_timeout: 1s
    idle_timeout: 3s
    keepalive_interval: 1s
    keepalive_timeout: 1s
  admin_limits:
    max_connections: 3
    header_read_timeout: 1s
    idle_timeout: 3s
";

/// Connects, sends `bytes`, and returns how long the server took to close the connection
/// (`None`: still open after 10 s).
async fn closed_after(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<Duration> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            // The server may say something first (an HTTP/2 SETTINGS or GOAWAY frame).
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_connections_are_closed() {
    let world = world().await;
    let yaml = format!("{LIMITS}{}", config_with(&world, ""));
    let grpc = testkit::ports::listener().await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let mut gate = Tokengate::start(&yaml, grpc.into()).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    wait_serving(channel.clone()).await;

    let within = |what: &str, took: Option<Duration>, limit: Duration| {
        let took = took.unwrap_or_else(|| panic!("{what}: still open after 10 s"));
        assert!(
            took >= limit - Duration::from_millis(100) && took < limit + Duration::from_secs(2),
            "{what}: closed after {took:?}, the limit is {limit:?}"
        );
    };
    let (silent, half_preface, admin_silent, admin_half) = tokio::join!(
        closed_after(grpc_addr, b""),
        closed_after(grpc_addr, b"PRI * HTTP/2.0\r\n"),
        closed_after(gate.admin_addr, b""),
        closed_after(gate.admin_addr, b"GET /metr"),
    );
    within("gRPC, nothing sent", silent, Duration::from_secs(1));
    within("gRPC, half a preface", half_preface, Duration::from_secs(1));
    within("admin, nothing sent", admin_silent, Duration::from_secs(1));
    within(
        "admin, half a request line",
        admin_half,
        Duration::from_secs(1),
    );

    // The whole preface, then silence (no SETTINGS, no PING ack): the unanswered keepalive
    // PING closes it after keepalive_interval + keepalive_timeout (2 s), the idle timeout (3 s)
    // at the latest.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let took = closed_after(grpc_addr, preface)
        .await
        .expect("gRPC, preface then silence: still open after 10 s");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3500),
        "gRPC, preface then silence: closed after {took:?}"
    );

    // A well-behaved client idle for longer than idle_timeout keeps working (its h2 stack
    // acks the server's PINGs).
    let mut client =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        );
    client.check(data_store(&[])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    client.check(data_store(&[])).await.unwrap();

    // The admin connection cap: 3 held open, the 4th is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tokio::net::TcpStream::connect(gate.admin_addr)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let took = closed_after(gate.admin_addr, b"").await.expect("refused");
    assert!(took < Duration::from_millis(500), "over the cap: {took:?}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gate.admin_get("/healthz").await.0, 200);

    gate.stop().await;
    world.shutdown().await;
}

/// The other side of precheck: every kind of token the cluster issues passes it, with the
/// issuer known (RS256 and, after a key rotation, ES256; pod-bound and unbound; legacy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genuine_tokens_pass_precheck() {
    let world = world().await;
    let mut tokens = vec![
        world.api_token(AUD),
        world.token("default", "intruder", AUD),
        world
            .standin
            .mint_legacy("api", "api", "api-token")
            .expect("legacy token"),
    ];
    world.standin.add_signing_key(kube_standin::KeyAlg::Es256);
    tokens.push(world.api_token(AUD));
    tokens.push(world.token("default", "intruder", AUD));
    let expect = tokengate::precheck::Expect {
        issuer: Some(ISSUER),
        ..Default::default()
    };
    for t in &tokens {
        let r = tokengate::precheck::precheck_with(t, &[AUD.to_owned()], unix_now(), &expect);
        assert!(r.is_ok(), "{r:?} for a genuine token");
    }
    world.shutdown().await;
}
