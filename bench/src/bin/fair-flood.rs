//! `fair-flood`: issue 12 item 2's target, measured (RELIABILITY.md, "Fairness and shedding").
//!
//! Starts the Kubernetes API stand-in in-process and the tokengate binary given, with
//! `kubernetes.issuer` set and no watches (TokenReview mode). Then, twice for `--secs`
//! seconds, once on a quiet server and once during a flood:
//!
//! - **cached callers**: `--cached` loops, each sending one already-verified token over and
//!   over (peer 10.2.0.1);
//! - **new legitimate tokens**: `--legit` callers (peers 10.1.0.x), each presenting a token
//!   never seen before every 200 ms;
//! - **the flood** (second run only): `--n` Checks in flight at all times (closed loop, over
//!   `--connections` connections, peer 10.66.0.1), each a unique *perfectly shaped*
//!   forgery: the cluster's `alg`, `kid` and issuer, a payload like a real token's, a
//!   256-byte signature that is wrong. Precheck cannot refuse it; each costs a TokenReview.
//!
//! Prints p50/p99/max and gRPC errors per class, and TokenReviews served.
//!
//! ```text
//! cargo build -p tokengate -p tokengate-bench
//! target/debug/fair-flood --tokengate target/debug/tokengate [--n 2000 --legit 16 --cached 8 --secs 5 --max-in-flight 64]
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use kube_standin::{MintRequest, Options, Standin};
use tokengate_bench::check::check_request;
use tonic::transport::Channel;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUD: &str = "data-store";
const LEGIT_EVERY: Duration = Duration::from_millis(200);

#[derive(Parser, Debug)]
#[command(about = "new and cached callers' latency with and without a flood of shaped forgeries")]
struct Cli {
    /// The tokengate binary to measure.
    #[arg(long)]
    tokengate: PathBuf,
    /// Forged Checks kept in flight during the flood.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Callers presenting new tokens.
    #[arg(long, default_value_t = 16)]
    legit: usize,
    /// Callers looping on a cached token.
    #[arg(long, default_value_t = 8)]
    cached: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// gRPC connections the flood is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// `kubernetes.max_in_flight` (tokengate's default when absent).
    #[arg(long)]
    max_in_flight: Option<usize>,
}

fn from(mut req: CheckRequest, ip: &str) -> CheckRequest {
    if let Some(a) = req.attributes.as_mut() {
        a.source = Some(Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        });
    }
    req
}

#[derive(Debug, Default)]
struct Samples {
    ok: Vec<Duration>,
    errors: u64,
    unavailable: u64,
}

impl Samples {
    fn line(&mut self, label: &str) -> String {
        self.ok.sort();
        let q = |p: f64| {
            if self.ok.is_empty() {
                Duration::ZERO
            } else {
                self.ok[((self.ok.len() - 1) as f64 * p).round() as usize]
            }
        };
        format!(
            "{label:<22} n={:<6} p50={:>9.2?} p99={:>9.2?} max={:>9.2?} UNAVAILABLE={} other errors={}",
            self.ok.len(),
            q(0.5),
            q(0.99),
            self.ok.last().copied().unwrap_or_default(),
            self.unavailable,
            self.errors
        )
    }
}

async fn timed(
    client: &AuthorizationClient<Channel>,
    req: CheckRequest,
) -> Result<Duration, tonic::Code> {
    let started = Instant::now();
    match client.clone().check(req).await {
        Ok(r) => match r.into_inner().http_response {
            Some(HttpResponse::OkResponse(_)) => Ok(started.elapsed()),
            _ => Err(tonic::Code::PermissionDenied),
        },
        Err(s) => Err(s.code()),
    }
}

fn record(s: &mut Samples, r: Result<Duration, tonic::Code>) {
    match r {
        Ok(d) => s.ok.push(d),
        Err(tonic::Code::Unavailable) => s.unavailable += 1,
        Err(_) => s.errors += 1,
    }
}

async fn connect(url: &str) -> Result<AuthorizationClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Channel::from_shared(url.to_owned())?.connect().await {
            Ok(c) => return Ok(AuthorizationClient::new(c)),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => bail!("tokengate never listened: {e}"),
        }
    }
}

/// Cached and legit callers for `secs`; returns (cached, legit).
async fn measure(
    cli: &Cli,
    url: &str,
    cached_token: &str,
    legit_tokens: &mut Vec<String>,
) -> Result<(Samples, Samples)> {
    let cached_client = connect(url).await?;
    let legit_client = connect(url).await?;
    let until = Instant::now() + Duration::from_secs(cli.secs);
    let mut cached = tokio::task::JoinSet::new();
    for _ in 0..cli.cached {
        let (client, token) = (cached_client.clone(), cached_token.to_owned());
        cached.spawn(async move {
            let mut s = Samples::default();
            while Instant::now() < until {
                let req = from(check_request(&token, AUD, "/", AUD), "10.2.0.1");
                record(&mut s, timed(&client, req).await);
                // A modest rate per caller, so the quiet run is not CPU-bound.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            s
        });
    }
    let mut legit = tokio::task::JoinSet::new();
    let per_caller = (cli.secs * 1000 / LEGIT_EVERY.as_millis() as u64) as usize;
    for i in 0..cli.legit {
        let client = legit_client.clone();
        let tokens: Vec<String> = legit_tokens.split_off(legit_tokens.len() - per_caller);
        let peer = format!("10.1.0.{}", i + 1);
        legit.spawn(async move {
            let mut s = Samples::default();
            let mut tick = tokio::time::interval(LEGIT_EVERY);
            for token in tokens {
                tick.tick().await;
                if Instant::now() >= until {
                    break;
                }
                record(
                    &mut s,
                    timed(&client, from(check_request(&token, AUD, "/", AUD), &peer)).await,
                );
            }
            s
        });
    }
    let (mut c, mut l) = (Samples::default(), Samples::default());
    while let Some(s) = cached.join_next().await {
        let s = s?;
        c.ok.extend(s.ok);
        c.unavailable += s.unavailable;
        c.errors += s.errors;
    }
    while let Some(s) = legit.join_next().await {
        let s = s?;
        l.ok.extend(s.ok);
        l.unavailable += s.unavailable;
        l.errors += s.errors;
    }
    Ok((c, l))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run(cli: Cli) -> Result<()> {
    let standin = Standin::start(Options::default()).await?;
    standin.create_service_account("api", "api");
    let mint = || standin.mint(&MintRequest::new("api", "api").audience(AUD));
    let cached_token = mint()?;
    let per_run = cli.legit * (cli.secs * 1000 / LEGIT_EVERY.as_millis() as u64) as usize;
    let mut legit_tokens = (0..2 * per_run)
        .map(|_| mint())
        .collect::<Result<Vec<_>>>()?;

    // The forgeries' template: a real token's header and payload.
    let mut parts = cached_token.split('.');
    let (header, payload) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;
    let header = header.to_owned();

    let dir = std::env::temp_dir().join(format!("fair-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (grpc, admin) = (free_port()?, free_port()?);
    let max_in_flight = cli
        .max_in_flight
        .map_or(String::new(), |m| format!("  max_in_flight: {m}\n"));
    let config = format!(
        "listen:\n  grpc: 127.0.0.1:{grpc}\n  admin: 127.0.0.1:{admin}\nkubernetes:\n  kubeconfig: \"{}\"\n  timeout: 2s\n  issuer: {ISSUER}\n{max_in_flight}routes:\n  - name: data-store\n    audiences: [{AUD}]\nlog:\n  level: error\n",
        standin.kubeconfig_path().display()
    );
    let config_path = dir.join("tokengate.yaml");
    std::fs::write(&config_path, config)?;
    let mut child = tokio::process::Command::new(&cli.tokengate)
        .args(["serve", "--config"])
        .arg(&config_path)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", cli.tokengate.display()))?;
    let url = format!("http://127.0.0.1:{grpc}");
    let warm = connect(&url).await?;
    if timed(&warm, check_request(&cached_token, AUD, "/", AUD))
        .await
        .is_err()
    {
        bail!("the cached caller's token was not admitted");
    }

    let reviews = standin.token_reviews_served();
    let (mut quiet_cached, mut quiet_legit) =
        measure(&cli, &url, &cached_token, &mut legit_tokens).await?;
    let quiet_reviews = standin.token_reviews_served() - reviews;

    // The flood: `n` forgeries always in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood_unavailable = Arc::new(AtomicU64::new(0));
    let mut flood_clients = Vec::new();
    for _ in 0..cli.connections.max(1) {
        flood_clients.push(connect(&url).await?);
    }
    let mut flood = tokio::task::JoinSet::new();
    for w in 0..cli.n {
        let client = flood_clients[w % flood_clients.len()].clone();
        let (stop, sent, unavailable) = (stop.clone(), sent.clone(), flood_unavailable.clone());
        let (header, mut claims) = (header.clone(), claims.clone());
        flood.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                claims["jti"] = serde_json::json!(format!("forged-{w}-{i}"));
                let sig: Vec<u8> = (0..256).map(|b| (b as u64 ^ i ^ w as u64) as u8).collect();
                let token = format!(
                    "{header}.{}.{}",
                    URL_SAFE_NO_PAD.encode(claims.to_string()),
                    URL_SAFE_NO_PAD.encode(sig)
                );
                i += 1;
                sent.fetch_add(1, Ordering::Relaxed);
                let req = from(check_request(&token, AUD, "/", AUD), "10.66.0.1");
                if let Err(tonic::Code::Unavailable) = timed(&client, req).await {
                    unavailable.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reviews = standin.token_reviews_served();
    let sent_before = sent.load(Ordering::Relaxed);
    let (mut flood_cached, mut flood_legit) =
        measure(&cli, &url, &cached_token, &mut legit_tokens).await?;
    let flood_reviews = standin.token_reviews_served() - reviews;
    let flood_sent = sent.load(Ordering::Relaxed) - sent_before;
    stop.store(true, Ordering::Relaxed);
    while flood.join_next().await.is_some() {}

    println!("tokengate: {}", cli.tokengate.display());
    println!(
        "{}s per run; {} cached callers, {} new-token callers (one new token each per {:?})",
        cli.secs, cli.cached, cli.legit, LEGIT_EVERY
    );
    println!("-- quiet: {quiet_reviews} TokenReviews");
    println!("{}", quiet_cached.line("cached"));
    println!("{}", quiet_legit.line("new token"));
    println!(
        "-- flood of {} in flight: {flood_sent} forged Checks sent while measuring ({} UNAVAILABLE in all), {flood_reviews} TokenReviews",
        cli.n,
        flood_unavailable.load(Ordering::Relaxed)
    );
    println!("{}", flood_cached.line("cached"));
    println!("{}", flood_legit.line("new token"));
    let p99 = |s: &Samples| {
        s.ok.get(((s.ok.len().max(1) - 1) as f64 * 0.99).round() as usize)
            .copied()
    };
    if let (Some(a), Some(b)) = (p99(&flood_cached), p99(&quiet_cached)) {
        println!(
            "cached p99 flood/quiet: {:.2}x",
            a.as_secs_f64() / b.as_secs_f64()
        );
    }
    child.kill().await.ok();
    standin.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(cli))
}
