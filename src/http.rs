//! The HTTP front door (`listen.http`): the same Checks as the gRPC server, asked in plain
//! HTTP by the proxies that speak it.
//!
//! Two request shapes share one listener:
//!
//! - **Envoy `http_service`** (and Istio's `envoyExtAuthzHttp`, which configures the same
//!   filter): Envoy replays the original request line (method, path with query, and
//!   `listen.http_path_prefix` in front when the filter sets `path_prefix`), with `Host` /
//!   `:authority` the original host and the headers its `allowed_headers` let through.
//! - **Forward-auth** (nginx `auth_request`, Traefik `ForwardAuth`): a request to exactly
//!   [`FORWARD_AUTH_PATH`] whose original method, URI and host travel in `X-Original-Method` /
//!   `X-Original-URI` / `X-Original-Host` (nginx, set with `proxy_set_header`) or
//!   `X-Forwarded-Method` / `X-Forwarded-Uri` / `X-Forwarded-Host` (Traefik). Those headers are
//!   read on this path only; everywhere else they are ordinary client headers.
//!
//! Routing is the configured `routes`. Proxies send no `context_extensions` over HTTP, so a
//! route matched by `context_extensions: {route: NAME}` is selected by the
//! [`ROUTE_HEADER`] header instead. The proxy must set it, never pass a client's copy on:
//! Envoy's `authorization_request.headers_to_add` overrides a client's header of the same name
//! (and Envoy forwards only `allowed_headers` anyway); nginx's `proxy_set_header` overwrites;
//! Traefik forwards every client header unless `authRequestHeaders` lists the ones to send.
//!
//! HTTP carries no `source.principal` either. For `require_peer` routes, Envoy can send the
//! client certificate's URI SAN in [`PEER_HEADER`] (`authorization_request.headers_to_add`
//! with `%DOWNSTREAM_PEER_URI_SAN%`, which overrides a client's header of that name); it is
//! read on Envoy-shaped checks only, never on forward-auth (nginx has no URI SAN variable,
//! and Traefik passes client headers on), so there `require_peer` answers `peer_missing`.
//!
//! Answers: 200 with the identity headers (and [`HEADERS_TO_REMOVE`] naming the optional
//! identity headers that do not apply, and the token's header when the route strips it, which
//! Envoy removes from the request); a denial's 401/403 with the JSON body, the reason header
//! and, on 401, `WWW-Authenticate`; 503 when the API server cannot answer (never 200; Envoy
//! takes a 5xx as an authorization error, so `status_on_error` / `failure_mode_allow` decide,
//! as for gRPC UNAVAILABLE). Copying
//! identity headers onto the request and dropping a client's copies is the proxy's job (Envoy
//! `allowed_upstream_headers` overwrite; nginx `auth_request_set` + `proxy_set_header`).
//!
//! Request bodies are never read, request heads are capped ([`MAX_HEAD_BYTES`],
//! [`MAX_HEADERS`]) and must arrive within [`HEAD_TIMEOUT`]. On shutdown the listener stops
//! accepting when draining begins and open connections are closed gracefully.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;

use crate::audit::{Audit, Seen};
use crate::check::{Checker, Outcome};
use crate::decision::{DenialParts, Responder, AUDIT_HEADER, REASON_HEADER};
use crate::shutdown::{Phase, Shutdown};

/// The forward-auth endpoint (nginx `auth_request`, Traefik `ForwardAuth`).
pub const FORWARD_AUTH_PATH: &str = "/forward-auth";
/// Header a proxy sets to select a route matched by `context_extensions: {route: NAME}`.
pub const ROUTE_HEADER: &str = "x-tokengate-route";
/// Header Envoy sets to the client certificate's URI SAN (`%DOWNSTREAM_PEER_URI_SAN%`): the
/// mTLS peer of `require_peer` routes, on Envoy-shaped checks.
pub const PEER_HEADER: &str = "x-tokengate-peer";
/// Envoy's `http_service` removes the headers named here from the allowed request.
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";
/// Reason code of the 503 answered when the API server cannot answer.
pub const UNAVAILABLE_REASON: &str = "review_unavailable";
/// Largest request head (request line and headers) read, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines in one request.
pub const MAX_HEADERS: usize = 128;
/// Time allowed for a request head to arrive.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Stand-in for a header value that is not valid UTF-8: the control byte makes it a
/// malformed credential, never a usable one.
const NOT_UTF8: &str = "\u{0}";

/// What each connection needs.
struct State {
    checker: Arc<Checker>,
    audit: Arc<Audit>,
    path_prefix: Option<String>,
}

/// The original request as the proxy described it.
#[derive(Debug, PartialEq, Eq)]
struct Original<'a> {
    method: &'a str,
    host: &'a str,
    /// Path with query.
    path: &'a str,
}

/// Serves the HTTP front door on `listener` until `shutdown` reaches [`Phase::Draining`]; then
/// stops accepting, closes connections gracefully and returns once they are closed or the
/// phase reaches [`Phase::Stopped`] (connections still open then are aborted: none answers
/// after `run` returns). `path_prefix` is `listen.http_path_prefix`.
pub async fn run(
    checker: Arc<Checker>,
    audit: Arc<Audit>,
    path_prefix: Option<String>,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) {
    let state = Arc::new(State {
        checker,
        audit,
        path_prefix,
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let graceful = GracefulShutdown::new();
    // Connection tasks live in a set owned by this function, so none outlives it: a
    // connection still open when the grace period ends is aborted, not left answering.
    let mut connections = tokio::task::JoinSet::new();
    let mut draining = shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    // Out of file descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = draining.reached(Phase::Draining) => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        // The proxy's address: review slots are shared fairly between peers.
        let peer_ip: Arc<str> = Arc::from(peer.ip().to_string());
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (state, peer_ip) = (state.clone(), peer_ip.clone());
            async move { Ok::<_, Infallible>(handle(&state, req, peer, &peer_ip).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    let mut stopped = shutdown;
    tokio::select! {
        () = graceful.shutdown() => {}
        () = stopped.reached(Phase::Stopped) => {}
    }
    connections.shutdown().await;
}

/// One check: read the original request, run the pipeline, answer.
async fn handle(
    state: &State,
    req: Request<Incoming>,
    peer: SocketAddr,
    peer_ip: &str,
) -> Response<Full<Bytes>> {
    let started = tokio::time::Instant::now();
    // The body is never read: nothing in a check depends on it.
    let (parts, _body) = req.into_parts();
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or(NOT_UTF8)))
        .collect();
    let snapshot = state.checker.snapshot();
    let read = read(state, &parts);
    let view = read.as_ref().map(|(original, context_extensions, peer)| {
        crate::request::RequestView::from_parts(
            original.host,
            original.path,
            original.method,
            context_extensions,
            &headers,
        )
        .with_source_principal(peer)
        .or_source(peer_ip)
    });
    // Envoy's http_service client puts its own span's context in the request's headers.
    let outcome = state
        .checker
        .check_traced(&snapshot, view.as_ref(), &parts.headers)
        .await;
    state.audit.record(
        &outcome,
        Seen {
            front: "http",
            view: view.as_ref(),
            peer: Some(&peer),
            started,
            token_sources: snapshot.token_sources(),
        },
    );
    answer(snapshot.responder(), &outcome)
}

/// The original request, the context extensions and the mTLS peer (Envoy shape only), or
/// `None` when the request does not describe one (wrong prefix, missing or repeated
/// forward-auth header, repeated route or peer header).
fn read<'a>(
    state: &State,
    parts: &'a http::request::Parts,
) -> Option<(Original<'a>, HashMap<String, String>, &'a str)> {
    let (original, peer) = if parts.uri.path() == FORWARD_AUTH_PATH {
        (forwarded(&parts.headers)?, "")
    } else {
        let peer = one(&parts.headers, PEER_HEADER).ok()?.unwrap_or("");
        (envoy(parts, state.path_prefix.as_deref())?, peer)
    };
    let mut context_extensions = HashMap::new();
    match one(&parts.headers, ROUTE_HEADER) {
        Ok(None) => {}
        Ok(Some(route)) => {
            context_extensions.insert("route".to_owned(), route.to_owned());
        }
        Err(()) => return None,
    }
    Some((original, context_extensions, peer))
}

/// Envoy `http_service`: the request line is the original's, after the configured prefix.
fn envoy<'a>(parts: &'a http::request::Parts, prefix: Option<&str>) -> Option<Original<'a>> {
    let full = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = match prefix {
        None => full,
        // Envoy joins prefix and original path, which starts with '/'.
        Some(prefix) => full.strip_prefix(prefix).filter(|p| p.starts_with('/'))?,
    };
    let host = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => one(&parts.headers, "host").ok()??,
    };
    Some(Original {
        method: parts.method.as_str(),
        host,
        path,
    })
}

/// Forward-auth: the original request in `X-Original-*` (nginx) or `X-Forwarded-*`
/// (Traefik) headers. The URI is required; without a method or host, routes that name one do
/// not match. Each proxy overwrites its own family but passes the client's copies of the
/// other on, so when both are present they must agree: a client cannot redescribe its
/// request through the family its proxy does not set.
fn forwarded(headers: &HeaderMap) -> Option<Original<'_>> {
    let pick = |nginx: &str, traefik: &str| -> Result<Option<&str>, ()> {
        match (one(headers, nginx)?, one(headers, traefik)?) {
            (Some(a), Some(b)) if a != b => Err(()),
            (a, b) => Ok(a.or(b)),
        }
    };
    let path = pick("x-original-uri", "x-forwarded-uri")
        .ok()?
        .filter(|p| p.starts_with('/'))?;
    let method = pick("x-original-method", "x-forwarded-method").ok()?;
    let host = pick("x-original-host", "x-forwarded-host").ok()?;
    Some(Original {
        method: method.unwrap_or(""),
        host: host.unwrap_or(""),
        path,
    })
}

/// A header sent at most once, as text: `Err` when repeated or not UTF-8.
fn one<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ()> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => v.to_str().map(Some).map_err(|_| ()),
        _ => Err(()),
    }
}

/// The HTTP answer to an [`Outcome`].
fn answer(responder: &Responder, outcome: &Outcome<'_>) -> Response<Full<Bytes>> {
    match outcome {
        Outcome::Allow {
            route,
            identity,
            source,
        } => {
            let mut r = Response::new(Full::new(Bytes::new()));
            let mut remove = Vec::new();
            for (name, value) in responder.identity(identity) {
                match value.and_then(|v| HeaderValue::try_from(v).ok()) {
                    Some(v) => insert(r.headers_mut(), name, v),
                    None => remove.push(name),
                }
            }
            if route.strip_token {
                remove.push(source.header.as_str());
            }
            if !remove.is_empty() {
                if let Ok(v) = HeaderValue::try_from(remove.join(",")) {
                    insert(r.headers_mut(), HEADERS_TO_REMOVE, v);
                }
            }
            r
        }
        Outcome::Audited {
            route,
            denial,
            source,
            ..
        } => {
            let mut r = Response::new(Full::new(Bytes::new()));
            insert(
                r.headers_mut(),
                AUDIT_HEADER,
                HeaderValue::from_static(denial.code()),
            );
            let mut remove: Vec<&str> = responder.names().collect();
            if let Some(source) = source.filter(|_| route.strip_token) {
                remove.push(source.header.as_str());
            }
            if let Ok(v) = HeaderValue::try_from(remove.join(",")) {
                insert(r.headers_mut(), HEADERS_TO_REMOVE, v);
            }
            r
        }
        Outcome::Deny { route, denial } => {
            let parts = DenialParts::new(*denial, route.map_or(403, |r| r.invalid_token_status));
            let mut r = json(parts.status, parts.body, denial.code());
            if let Some(challenge) = parts.challenge {
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            }
            r
        }
        Outcome::Unavailable { .. } => {
            let body = serde_json::json!({
                "error": "the Kubernetes API server could not review the token",
                "reason": UNAVAILABLE_REASON,
            });
            json(503, body.to_string(), UNAVAILABLE_REASON)
        }
    }
}

/// A JSON answer with the reason header.
fn json(status: u16, body: String, reason: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(REASON_HEADER, HeaderValue::from_static(reason));
    r
}

/// Sets `name` (a configured, validated header name) to `value`.
fn insert(headers: &mut HeaderMap, name: &str, value: HeaderValue) {
    if let Ok(name) = HeaderName::try_from(name) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn envoy_shape_strips_the_prefix() {
        let p = parts("/authz/items?x=1", &[("host", "data-store:8080")]);
        assert_eq!(
            envoy(&p, Some("/authz")),
            Some(Original {
                method: "GET",
                host: "data-store:8080",
                path: "/items?x=1"
            })
        );
        // Not under the prefix, or the prefix only as part of a segment: not a check.
        assert_eq!(
            envoy(&parts("/items", &[("host", "h")]), Some("/authz")),
            None
        );
        assert_eq!(
            envoy(&parts("/authzx/y", &[("host", "h")]), Some("/authz")),
            None
        );
        assert_eq!(
            envoy(&parts("/authz", &[("host", "h")]), Some("/authz")),
            None
        );
        let p = parts("/items", &[("host", "h")]);
        assert_eq!(envoy(&p, None).map(|o| o.path), Some("/items"));
    }

    #[test]
    fn forwarded_reads_either_family_and_needs_a_uri() {
        let p = parts(
            "/forward-auth",
            &[
                ("x-original-uri", "/a?b"),
                ("x-forwarded-uri", "/a?b"),
                ("x-forwarded-method", "POST"),
                ("x-forwarded-host", "h:1"),
            ],
        );
        assert_eq!(
            forwarded(&p.headers),
            Some(Original {
                method: "POST",
                host: "h:1",
                path: "/a?b"
            })
        );
        assert_eq!(forwarded(&parts("/forward-auth", &[]).headers), None);
        assert_eq!(
            forwarded(&parts("/", &[("x-original-uri", "relative")]).headers),
            None
        );
        let twice = parts(
            "/forward-auth",
            &[("x-original-uri", "/a"), ("x-original-uri", "/b")],
        );
        assert_eq!(forwarded(&twice.headers), None);
        // The family the proxy did not set, sent by the client, disagrees: no check.
        let spoofed = parts(
            "/forward-auth",
            &[
                ("x-forwarded-uri", "/items"),
                ("x-original-uri", "/healthz"),
            ],
        );
        assert_eq!(forwarded(&spoofed.headers), None);
    }

    #[test]
    fn one_refuses_repeats() {
        let p = parts("/", &[("a", "1"), ("a", "2"), ("b", "x")]);
        assert_eq!(one(&p.headers, "a"), Err(()));
        assert_eq!(one(&p.headers, "b"), Ok(Some("x")));
        assert_eq!(one(&p.headers, "c"), Ok(None));
    }
}
