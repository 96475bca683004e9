//! tokengate's HTTP front door spoken to directly, over raw TCP: the shapes a proxy sends
//! (Envoy `http_service`, forward-auth) and the things no proxy should send (a broken request
//! line, an oversized head, bytes that are not UTF-8, a large body, repeated headers). Every
//! request gets an answer that is not an allow, the server keeps serving, and stopping it
//! surfaces any panic.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{config, world, Tokengate};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Gate {
    world: testkit::world::World,
    gate: Tokengate,
    http: SocketAddr,
}

async fn start() -> Gate {
    start_with("").await
}

/// Like [`start`], with `extra` appended to BASE_CONFIG (after its routes).
async fn start_with(extra: &str) -> Gate {
    let world = world().await;
    let yaml = config(&world.standin.kubeconfig_path(), extra);
    let grpc = testkit::ports::listener().await.unwrap();
    let http = testkit::ports::listener().await.unwrap();
    let addr = http.local_addr().unwrap();
    let gate = Tokengate::start_with_http(&yaml, grpc.into(), Some(http))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    Gate {
        world,
        gate,
        http: addr,
    }
}

/// Writes `raw` on a fresh connection and reads until the server closes it or 5 s pass;
/// returns the status code of the first response (0 when there was none) and the text.
async fn send(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything: ignore write errors.
    let _ = s.write_all(raw).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        // One response head is enough.
                        break;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn get(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nhost: data-store\r\nconnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn reason(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("x-tokengate-reason: "))
        .map(str::trim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_forward_auth_shapes_decide_like_grpc() {
    let mut g = start().await;
    let token = g.world.api_token("data-store");
    let route = ("x-tokengate-route", "data-store");

    let (status, text) = send(g.http, &get("/items", &[route])).await;
    assert_eq!(
        (status, reason(&text)),
        (401, Some("missing_token")),
        "{text}"
    );
    assert!(text.contains("www-authenticate: Bearer"), "{text}");

    let (status, text) = send(
        g.http,
        &get("/items?x=1", &[route, ("x-client-id", &token)]),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("x-k8s-sa-user: system:serviceaccount:api:api"),
        "{text}"
    );
    assert!(text.contains("x-k8s-pod-name: api-0"), "{text}");
    assert!(!text.contains(&token), "token echoed: {text}");
    // No pod binding: the optional pod headers are named for Envoy to remove.
    let unbound = g.world.token("default", "intruder", "data-store");
    let (status, text) = send(g.http, &get("/items", &[route, ("x-client-id", &unbound)])).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("x-envoy-auth-headers-to-remove: x-k8s-pod-name,x-k8s-pod-uid"),
        "{text}"
    );

    // Without the route header no route matches (BASE_CONFIG's routes need it or a host).
    let (status, text) = send(g.http, &get("/items", &[("x-client-id", &token)])).await;
    assert_eq!((status, reason(&text)), (403, Some("no_route")), "{text}");

    // Forward-auth: the original URI in X-Original-URI / X-Forwarded-Uri.
    let fa = [("x-original-uri", "/items"), ("x-forwarded-uri", "/items")];
    let (status, text) = send(
        g.http,
        &get(
            "/forward-auth",
            &[fa[0], fa[1], route, ("x-client-id", &token)],
        ),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    g.gate.stop().await;
    g.world.shutdown().await;
}

/// `require_peer` over HTTP: the peer comes from `x-tokengate-peer`, which Envoy sets from
/// the client certificate (`%DOWNSTREAM_PEER_URI_SAN%`); on forward-auth it is never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_header_binds_envoy_shaped_checks_only() {
    let mut g = start_with(
        "  - name: bound\n    match: {hosts: [bound.data-store]}\n    audiences: [data-store]\n    require_peer: service_account\n",
    )
    .await;
    let token = g.world.api_token("data-store");
    let get_bound = |path: &str, headers: &[(&str, &str)]| {
        String::from_utf8(get(path, headers))
            .unwrap()
            .replace("host: data-store\r\n", "host: bound.data-store\r\n")
            .into_bytes()
    };
    let id = ("x-client-id", token.as_str());
    let (status, text) = send(g.http, &get_bound("/items", &[id])).await;
    assert_eq!(
        (status, reason(&text)),
        (403, Some("peer_missing")),
        "{text}"
    );
    let other = (
        "x-tokengate-peer",
        "spiffe://cluster.local/ns/default/sa/intruder",
    );
    let (status, text) = send(g.http, &get_bound("/items", &[id, other])).await;
    assert_eq!(
        (status, reason(&text)),
        (403, Some("peer_mismatch")),
        "{text}"
    );
    let api = ("x-tokengate-peer", "spiffe://cluster.local/ns/api/sa/api");
    let (status, text) = send(g.http, &get_bound("/items", &[id, api])).await;
    assert_eq!(status, 200, "{text}");
    // Sent twice: not a description of one request.
    let (status, text) = send(g.http, &get_bound("/items", &[id, api, api])).await;
    assert_eq!(
        (status, reason(&text)),
        (403, Some("bad_request")),
        "{text}"
    );
    // Forward-auth never reads it: a client could have sent it.
    let fa = [
        ("x-original-uri", "/items"),
        ("x-original-host", "bound.data-store"),
    ];
    let (status, text) = send(
        g.http,
        &get_bound("/forward-auth", &[fa[0], fa[1], id, api]),
    )
    .await;
    assert_eq!(
        (status, reason(&text)),
        (403, Some("peer_missing")),
        "{text}"
    );
    g.gate.stop().await;
    g.world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_the_server_keeps_serving() {
    let mut g = start().await;
    let token = g.world.api_token("data-store");
    let route = ("x-tokengate-route", "data-store");
    let bad_request = |t: &str| reason(t) == Some("bad_request");

    // Forward-auth without a URI, with a relative one, with the two families disagreeing.
    for headers in [
        vec![route],
        vec![route, ("x-original-uri", "items")],
        vec![
            route,
            ("x-original-uri", "/items"),
            ("x-forwarded-uri", "/healthz"),
        ],
        vec![route, ("x-original-uri", "/a"), ("x-original-uri", "/b")],
    ] {
        let mut headers = headers;
        headers.push(("x-client-id", &token));
        let (status, text) = send(g.http, &get("/forward-auth", &headers)).await;
        assert!(status == 403 && bad_request(&text), "{headers:?}: {text}");
    }
    // A repeated route header.
    let (status, text) = send(
        g.http,
        &get(
            "/items",
            &[route, ("x-tokengate-route", "x"), ("x-client-id", &token)],
        ),
    )
    .await;
    assert!(status == 403 && bad_request(&text), "{text}");

    // A token header that is not UTF-8: malformed, never a credential.
    let mut raw = b"GET /items HTTP/1.1\r\nhost: data-store\r\nconnection: close\r\nx-tokengate-route: data-store\r\nx-client-id: \xff\xfe\r\n\r\n".to_vec();
    let (status, text) = send(g.http, &raw).await;
    assert_eq!(
        (status, reason(&text)),
        (403, Some("malformed_token")),
        "{text}"
    );

    // Not HTTP at all, and a head far over the cap: hyper refuses (4xx or closes).
    for junk in [
        b"\x00\x01\x02 garbage\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        {
            raw = b"GET /items HTTP/1.1\r\nhost: h\r\nx-big: ".to_vec();
            raw.extend(std::iter::repeat_n(b'a', 200 * 1024));
            raw.extend(b"\r\n\r\n");
            raw.clone()
        },
        {
            let mut many = b"GET /items HTTP/1.1\r\nhost: h\r\n".to_vec();
            for i in 0..1000 {
                many.extend(format!("x-h{i}: v\r\n").as_bytes());
            }
            many.extend(b"\r\n");
            many
        },
    ] {
        let (status, text) = send(g.http, &junk).await;
        assert!(
            status == 0 || (400..500).contains(&status),
            "{status}: {text}"
        );
    }

    // A large declared body is never read: the answer comes without it.
    let head = format!(
        "POST /items HTTP/1.1\r\nhost: data-store\r\nx-tokengate-route: data-store\r\nx-client-id: {token}\r\ncontent-length: 104857600\r\n\r\n"
    );
    let (status, text) = send(g.http, head.as_bytes()).await;
    assert_eq!(status, 200, "{text}");

    // Still serving.
    let (status, text) = send(g.http, &get("/items", &[route, ("x-client-id", &token)])).await;
    assert_eq!(status, 200, "{text}");
    g.gate.stop().await;
    g.world.shutdown().await;
}
