//! Open-loop load at a fixed rate, over HTTP/1.1 (through Envoy) or gRPC (Check alone).
//!
//! `wrk` is closed-loop: a slow response delays the next request, so the tool measures less
//! waiting than a real client would see. Here every request has an intended send time on a
//! fixed schedule. HTTP/1.1 workers each own one keep-alive connection and a slice of the
//! schedule; when a worker is behind (its previous response came back after the next send
//! time), the latency is counted from the intended time, which charges the server for the
//! queueing it caused. When the worker is on time we measure from the actual send, so tokio's
//! 1 ms timer granularity does not leak into the numbers. gRPC requests are independent
//! streams on one HTTP/2 connection (as Envoy's ext_authz client uses), so they are sent on
//! schedule without waiting for each other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tonic::transport::{Channel, Endpoint};

use crate::check::check_request_with;
use crate::stats::Summary;

/// What to send and how fast.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Requests per second, total.
    pub rate: f64,
    /// Measured duration (after warm-up).
    pub duration: Duration,
    /// Unrecorded warm-up before the measured phase.
    pub warmup: Duration,
    /// HTTP/1.1 connections (ignored for gRPC).
    pub connections: usize,
    /// Bearer tokens, used round-robin; empty means no `Authorization` header.
    pub tokens: Arc<Vec<String>>,
    /// `Host` / `:authority` to send.
    pub host: String,
    /// Request path.
    pub path: String,
    /// gRPC only: send every default Envoy header in the CheckRequest, not just the token
    /// header (our published Envoy config sends only the token headers).
    pub all_headers: bool,
    /// gRPC only: the mTLS peer's SPIFFE ID in `source.principal`, on the `require_peer`
    /// route ([`crate::check::PEER_ROUTE`]).
    pub peer: Option<String>,
}

impl Spec {
    /// The request shape of one-off Checks (`fill`, `burst`): host `bench`, path `/`, only
    /// the token header; the token is passed per call, so `tokens` is empty.
    pub fn one_off() -> Spec {
        Spec {
            rate: 0.0,
            duration: Duration::ZERO,
            warmup: Duration::ZERO,
            connections: 1,
            tokens: Arc::new(Vec::new()),
            host: "bench".into(),
            path: "/".into(),
            all_headers: false,
            peer: None,
        }
    }

    fn token(&self, next: &AtomicUsize) -> Option<&str> {
        if self.tokens.is_empty() {
            return None;
        }
        let i = next.fetch_add(1, Ordering::Relaxed) % self.tokens.len();
        Some(&self.tokens[i])
    }
}

/// Per-worker tally merged into one [`Summary`].
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    samples: Vec<u32>,
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// Runs fixed-rate HTTP/1.1 GETs against `addr`, expecting status 200.
pub async fn http(addr: SocketAddr, spec: Spec) -> Result<Summary> {
    let spec = Arc::new(spec);
    let next_token = Arc::new(AtomicUsize::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let k = spec.connections.max(1);
    let mut workers = Vec::with_capacity(k);
    for w in 0..k {
        let spec = spec.clone();
        let next_token = next_token.clone();
        workers.push(tokio::spawn(async move {
            let interval = Duration::from_secs_f64(k as f64 / spec.rate);
            let mut due = start + Duration::from_secs_f64(w as f64 / spec.rate);
            let mut tally = Tally::default();
            let mut sender = None;
            while due < end {
                let now = Instant::now();
                let t0 = if now > due {
                    due
                } else {
                    sleep_until(due).await;
                    Instant::now()
                };
                if sender.is_none() {
                    sender = connect(addr).await.ok();
                }
                let ok = match sender.as_mut() {
                    Some(s) => one_get(s, &spec, spec.token(&next_token)).await,
                    None => false,
                };
                if !ok {
                    sender = None;
                }
                if due >= measure_from {
                    if ok {
                        tally.ok += 1;
                        tally.samples.push(micros(t0.elapsed()));
                    } else {
                        tally.errors += 1;
                    }
                }
                due += interval;
            }
            tally
        }));
    }
    merge(workers, spec.duration).await
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn one_get(sender: &mut Sender, spec: &Spec, token: Option<&str>) -> bool {
    let mut req = http::Request::get(spec.path.as_str()).header(http::header::HOST, &spec.host);
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let Ok(req) = req.body(Empty::new()) else {
        return false;
    };
    if sender.ready().await.is_err() {
        return false;
    }
    match sender.send_request(req).await {
        Ok(resp) => {
            let ok = resp.status() == http::StatusCode::OK;
            resp.into_body().collect().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

/// Opens one HTTP/2 gRPC channel to `uri` (e.g. `http://127.0.0.1:9001`).
pub async fn channel(uri: &str) -> Result<Channel> {
    Endpoint::from_shared(uri.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))
}

/// Outcome of one Check call: allowed, denied, or a gRPC error (e.g. UNAVAILABLE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `CheckResponse.status.code == 0`.
    Allowed,
    /// A CheckResponse with a non-OK status.
    Denied,
    /// The RPC itself failed.
    RpcError,
}

/// One Check call with `token` (route `bench`).
pub async fn check_once(
    client: &mut AuthorizationClient<Channel>,
    token: &str,
    spec: &Spec,
) -> Outcome {
    let req = check_request_with(token, &spec.host, &spec.path, "bench", spec.all_headers);
    let req = match &spec.peer {
        Some(p) => crate::check::with_peer(req, p),
        None => req,
    };
    match client.check(req).await {
        Ok(resp) => match resp.into_inner().status {
            Some(s) if s.code != 0 => Outcome::Denied,
            _ => Outcome::Allowed,
        },
        Err(_) => Outcome::RpcError,
    }
}

/// Runs fixed-rate Check RPCs on one HTTP/2 connection, expecting "allowed".
pub async fn grpc(uri: &str, spec: Spec) -> Result<Summary> {
    let client = AuthorizationClient::new(channel(uri).await?);
    let spec = Arc::new(spec);
    let next_token = AtomicUsize::new(0);
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut i: u64 = 0;
    loop {
        let due = start + Duration::from_secs_f64(i as f64 / spec.rate);
        if due >= end {
            break;
        }
        i += 1;
        sleep_until(due).await;
        let t0 = Instant::now();
        let mut client = client.clone();
        let spec = spec.clone();
        let token = spec.token(&next_token).unwrap_or("").to_string();
        let tx = tx.clone();
        let record = due >= measure_from;
        tokio::spawn(async move {
            let outcome = check_once(&mut client, &token, &spec).await;
            if record {
                let _ = tx.send((outcome, micros(t0.elapsed())));
            }
        });
    }
    drop(tx);
    let mut tally = Tally::default();
    while let Some((outcome, us)) = rx.recv().await {
        if outcome == Outcome::Allowed {
            tally.ok += 1;
            tally.samples.push(us);
        } else {
            tally.errors += 1;
        }
    }
    Ok(into_summary(vec![tally], spec.duration))
}

async fn merge(
    workers: Vec<tokio::task::JoinHandle<Tally>>,
    duration: Duration,
) -> Result<Summary> {
    let mut tallies = Vec::with_capacity(workers.len());
    for w in workers {
        tallies.push(w.await?);
    }
    Ok(into_summary(tallies, duration))
}

fn into_summary(tallies: Vec<Tally>, duration: Duration) -> Summary {
    let mut s = Summary {
        seconds: duration.as_secs_f64(),
        ..Default::default()
    };
    for t in tallies {
        s.ok += t.ok;
        s.errors += t.errors;
        s.samples_us.extend(t.samples);
    }
    s
}
