//! The echo upstream: an HTTP server that answers every request with what it received.
//!
//! Envoy tests must prove what reached the protected service: that identity headers arrived
//! exactly once, that spoofed values were replaced, that tokens were stripped. The echo answers
//! `200` with JSON:
//!
//! ```json
//! {"message": "authenticated as system:serviceaccount:api:api",
//!  "method": "GET", "path": "/items",
//!  "headers": [["host", "data-store"], ["x-k8s-sa-user", "system:serviceaccount:api:api"]]}
//! ```
//!
//! `headers` keeps every value of every header in arrival order (duplicates are separate
//! entries). `message` is the demo's one-line summary, taken from `x-k8s-sa-user`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};

/// The header whose value the echo reports in `message`.
pub const USER_HEADER: &str = "x-k8s-sa-user";

/// What the echo answers (and what tests parse back).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Echo {
    /// "authenticated as `<x-k8s-sa-user>`", or "no identity (x-k8s-sa-user absent)".
    pub message: String,
    /// Request method.
    pub method: String,
    /// Request path and query.
    pub path: String,
    /// Every header as `[name, value]`, in order, duplicates kept.
    pub headers: Vec<(String, String)>,
}

impl Echo {
    /// All values received for header `name` (case-insensitive).
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether header `name` was received at all.
    pub fn has(&self, name: &str) -> bool {
        !self.values(name).is_empty()
    }
}

/// A running echo server; stops when dropped.
pub struct EchoServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests reached the echo so far (to prove a denied request never did).
    pub fn requests_seen(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the echo on `listener` (HTTP/1.1 and HTTP/2) in a background task.
pub fn spawn_echo(listener: tokio::net::TcpListener) -> std::io::Result<EchoServer> {
    let addr = listener.local_addr()?;
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(answer(req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(EchoServer {
        addr,
        requests,
        task,
    })
}

/// Builds the echo for a request (the body is ignored).
pub fn describe(req: &hyper::Request<Incoming>) -> Echo {
    let headers = crate::http::header_pairs(req.headers());
    let message = match headers.iter().find(|(n, _)| n == USER_HEADER) {
        Some((_, user)) => format!("authenticated as {user}"),
        None => format!("no identity ({USER_HEADER} absent)"),
    };
    Echo {
        message,
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        headers,
    }
}

fn answer(req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let echo = describe(&req);
    let mut body = serde_json::to_vec(&echo).unwrap_or_default();
    body.push(b'\n');
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_duplicate_headers_and_counts_requests() {
        let server = spawn_echo(crate::ports::listener().await.unwrap()).unwrap();
        let resp = crate::http::get(
            server.addr(),
            "/x?y=1",
            &[
                ("x-dup", "one"),
                ("x-dup", "two"),
                ("x-k8s-sa-user", "system:serviceaccount:api:api"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(resp.status, 200);
        let echo: Echo = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(echo.values("x-dup"), vec!["one", "two"]);
        assert_eq!(echo.path, "/x?y=1");
        assert_eq!(
            echo.message,
            "authenticated as system:serviceaccount:api:api"
        );
        assert_eq!(server.requests_seen(), 1);
    }
}
