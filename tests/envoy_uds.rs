//! The sidecar stack with Envoy reaching tokengate over a Unix domain socket
//! (`listen.grpc: unix:/path`; Envoy's `tokengate` cluster address `pipe: {path: ...}`), as a
//! sidecar pair sharing an emptyDir would: a valid token passes with the identity headers,
//! no token is 401, a stale socket file is replaced at start and the file is removed on
//! shutdown.

mod common;

use common::envoy::{assert_api_identity, echo_of, with_spoofed, Stack};

const ENVOY: &str = "envoy/sidecar.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar.yaml";
const HOST: (&str, &str) = ("host", "data-store");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_reaches_tokengate_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("grpc.sock");
    // A previous run that died left its socket file behind: binding must replace it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let stack = Stack::start_uds(ENVOY, TOKENGATE, &socket)
        .await
        .unwrap_or_else(|e| panic!("starting the stack: {e:#}"));

    let resp = stack.get("/items", &[HOST]).await;
    assert_eq!(resp.status, 401, "{resp:?}\n{}", stack.envoy.diagnostics());
    assert_eq!(
        stack.echo.requests_seen(),
        0,
        "a denied request reached the upstream"
    );

    let token = stack.world.api_token("data-store");
    let headers = with_spoofed(&[HOST, ("x-client-id", &token)]);
    let resp = stack.get("/items?id=7", &headers).await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", stack.envoy.diagnostics());
    let echo = echo_of(&resp);
    assert_eq!(
        echo.message,
        "authenticated as system:serviceaccount:api:api"
    );
    assert_api_identity(&echo, &stack.world);
    // Both answers came from tokengate over the socket, not from Envoy's error path.
    assert_eq!(stack.counter("http.ingress.ext_authz.error").await, 0);
    assert_eq!(stack.counter("http.ingress.ext_authz.denied").await, 1);
    assert_eq!(stack.counter("http.ingress.ext_authz.ok").await, 1);

    stack.finish().await;
    assert!(!socket.exists(), "socket file left after shutdown");
}
