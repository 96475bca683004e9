//! End to end through a real nginx (Debian's package, `auth_request`) running the published
//! `deploy/nginx/data-store.conf` against tokengate's HTTP front door in forward-auth shape
//! (`deploy/nginx/tokengate.yaml`): 401 without a token, 403 for bad or wrong-audience tokens,
//! 200 with exactly one true value of each identity header however the client spoofs them,
//! no route choice by the client (X-Tokengate-Route, X-Original-URI), 503 when the API
//! server is down or tokengate is gone.
//!
//! nginx runs as a foreground, single-process server with every path (pid, logs, temp files)
//! in a temp dir and on free ports; the binary is `$NGINX_BIN`, else `nginx` on the PATH or in
//! /usr/sbin (`scripts/setup.sh` installs it). A missing nginx fails the tests.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::envoy::{assert_identity, echo_of, with_spoofed};
use common::forward_auth::{Proxied, Proxy};
use common::front_door;
use kube_standin::Fault;
use testkit::process::ChildGuard;

const SITE: &str = "deploy/nginx/data-store.conf";
const TOKENGATE: &str = "deploy/nginx/tokengate.yaml";

fn nginx_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .context("nginx not found: run scripts/setup.sh (apt-get install nginx) or set NGINX_BIN")
}

/// nginx running the published site, sending `auth_request`s to `http_port` and allowed
/// requests to `echo_port`.
async fn start_nginx(http_port: u16, echo_port: u16) -> Result<Proxy> {
    let [port] = testkit::ports::free_ports::<1>();
    let site = std::fs::read_to_string(testkit::workspace_root().join(SITE))?;
    let mut rendered = site.clone();
    for (fixed, port) in [
        ("127.0.0.1:8080", port),
        ("127.0.0.1:9002", http_port),
        ("127.0.0.1:8081", echo_port),
    ] {
        anyhow::ensure!(
            site.matches(fixed).count() == 1,
            "{SITE}: expected `{fixed}` exactly once"
        );
        rendered = rendered.replace(fixed, &format!("127.0.0.1:{port}"));
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    std::fs::write(dir.path().join("site.conf"), rendered)?;
    // Foreground, one process (no privilege drop: temp dirs stay ours), all paths private.
    let main = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
        );
    std::fs::write(dir.path().join("nginx.conf"), main)?;
    let mut cmd = Command::new(nginx_bin()?);
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(dir.path().join("nginx.conf"));
    let mut nginx = ChildGuard::spawn("nginx", cmd)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Err(e) = nginx.ensure_running() {
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            bail!("nginx exited: {e:#}\n{log}");
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "nginx not listening on {addr} within 10 s\n{}",
                nginx.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Proxy {
        name: "nginx",
        child: nginx,
        addr,
        log: Some(dir.path().join("error.log")),
        dir,
        host: None,
    })
}

async fn stack() -> Proxied {
    Proxied::start(TOKENGATE, start_nginx)
        .await
        .unwrap_or_else(|e| panic!("starting the nginx stack: {e:#}"))
}

const HOST: (&str, &str) = ("host", "data-store");

/// The front doors' shared case table (tests/common/front_door.rs): 401/403 with reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_401_or_403_with_the_reason() {
    let stack = stack().await;
    front_door::assert_denials(&stack).await;
    stack.finish().await;
}

/// The shared table: 200 with one true identity despite spoofing, token stripped, in either
/// token header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_reaches_upstream_with_one_true_identity_despite_spoofing() {
    let stack = stack().await;
    front_door::assert_allowed_with_true_identity(&stack).await;
    // Without auth_request (/healthz), spoofed identity headers are cleared too.
    let resp = stack.get("/healthz", &with_spoofed(&[HOST])).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_identity(&echo_of(&resp), &[]);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cannot_choose_the_route_or_the_original_request() {
    let stack = stack().await;
    // A token for the route nginx never selects: the client asks for that route itself.
    let other = stack.world.token("api", "api", "other");
    let resp = stack
        .get(
            "/items",
            &[
                HOST,
                ("x-client-id", &other),
                ("x-tokengate-route", "data-store-internal"),
                ("x-original-uri", "/internal/x"),
                ("x-forwarded-uri", "/internal/x"),
            ],
        )
        .await;
    assert_eq!(resp.status, 403, "client picked the route: {resp:?}");
    assert_eq!(resp.header("x-tokengate-reason"), Some("wrong_audience"));
    assert_eq!(stack.echo.requests_seen(), 0);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_or_tokengate_down_is_503_never_200() {
    let mut stack = stack().await;
    let token = stack.world.api_token("data-store");
    stack.world.standin.set_fault(Fault::Down);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(
        resp.header("x-tokengate-reason"),
        Some("review_unavailable")
    );
    assert_eq!(stack.echo.requests_seen(), 0);
    stack.world.standin.set_fault(Fault::None);
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(resp.status, 200, "errors must not be cached: {resp:?}");

    stack.gate.stop().await;
    let resp = stack.get("/items", &[HOST, ("x-client-id", &token)]).await;
    assert_eq!(
        resp.status, 503,
        "tokengate down must fail closed: {resp:?}"
    );
    assert_eq!(stack.echo.requests_seen(), 1);
    stack.finish().await;
}
