//! `forged-flood`: the forged-token flood of RELIABILITY.md.
//!
//! Starts the Kubernetes API stand-in in-process (it counts the TokenReviews it serves) and
//! the tokengate binary given (`--tokengate`, so a build of another commit can be measured
//! the same way), then sends N concurrent Checks carrying forged tokens of seven shapes (empty
//! header and payload, `alg: none`, HS256, a JSON-array payload, a one-byte signature, a wrong
//! issuer, a bad `kid`), each token unique so no cache helps, while a legitimate caller with a
//! new token makes one Check. Prints TokenReviews spent on the flood, the flood's duration,
//! the legitimate caller's latency (and the same caller's latency on an idle server).
//!
//! ```text
//! cargo build --release -p tokengate -p tokengate-bench
//! target/release/forged-flood --tokengate target/release/tokengate --n 2000 [--issuer-known]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use kube_standin::{MintRequest, Options, Standin};
use tokengate_bench::check::check_request;
use tokengate_bench::forge::forged;
use tonic::transport::Channel;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUD: &str = "data-store";

#[derive(Parser, Debug)]
#[command(about = "N concurrent forged-token Checks against a tokengate binary")]
struct Cli {
    /// The tokengate binary to measure.
    #[arg(long)]
    tokengate: PathBuf,
    /// Forged Checks, all in flight at once.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Configure `kubernetes.issuer` (only builds that know the key accept it).
    #[arg(long)]
    issuer_known: bool,
    /// gRPC connections the flood is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

fn reason(r: &CheckResponse) -> String {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "x-tokengate-reason")
            .map_or("deny".into(), |h| h.value.clone()),
        Some(HttpResponse::OkResponse(_)) => "allow".into(),
        Some(HttpResponse::ErrorResponse(_)) | None => "no answer".into(),
    }
}

async fn timed_check(client: &AuthorizationClient<Channel>, token: &str) -> (Duration, String) {
    let started = Instant::now();
    let r = client
        .clone()
        .check(check_request(token, AUD, "/", AUD))
        .await;
    let outcome = match r {
        Ok(r) => reason(&r.into_inner()),
        Err(s) => format!("grpc {:?}", s.code()),
    };
    (started.elapsed(), outcome)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run(cli: Cli) -> Result<()> {
    let standin = Standin::start(Options::default()).await?;
    standin.create_service_account("api", "api");
    standin.create_pod("api", "api-0", "api", Some("node-1"));
    let idle_caller = standin.mint(&MintRequest::new("api", "api").audience(AUD).pod("api-0"))?;
    let new_caller = standin.mint(&MintRequest::new("api", "api").audience(AUD))?;

    let dir = std::env::temp_dir().join(format!("forged-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (grpc, admin) = (free_port()?, free_port()?);
    let issuer = if cli.issuer_known {
        format!("  issuer: {ISSUER}\n")
    } else {
        String::new()
    };
    let config = format!(
        "listen:\n  grpc: 127.0.0.1:{grpc}\n  admin: 127.0.0.1:{admin}\nkubernetes:\n  kubeconfig: \"{}\"\n  timeout: 2s\n{issuer}routes:\n  - name: data-store\n    audiences: [{AUD}]\nlog:\n  level: error\n",
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

    let mut clients = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for _ in 0..cli.connections.max(1) {
        let channel = loop {
            match Channel::from_shared(format!("http://127.0.0.1:{grpc}"))?
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => bail!("tokengate never listened: {e}"),
            }
        };
        clients.push(AuthorizationClient::new(channel));
    }
    let first = &clients[0];
    let (_, warm) = timed_check(first, "").await;
    if warm != "missing_token" {
        bail!("unexpected answer to an empty Check: {warm}");
    }

    // The legitimate caller on an idle server (one TokenReview).
    let (idle_latency, idle_outcome) = timed_check(first, &idle_caller).await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let tokens: Vec<(&str, String)> = (0..cli.n).map(|i| forged(i, now, ISSUER, AUD)).collect();
    let reviews_before = standin.token_reviews_served();
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for (i, (shape, token)) in tokens.into_iter().enumerate() {
        let client = clients[i % clients.len()].clone();
        flood.spawn(async move { (shape, timed_check(&client, &token).await) });
    }
    // The new legitimate caller arrives while the flood is in flight.
    tokio::task::yield_now().await;
    let (loaded_latency, loaded_outcome) = timed_check(first, &new_caller).await;
    let mut outcomes: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    while let Some(done) = flood.join_next().await {
        let (shape, (took, outcome)) = done?;
        slowest = slowest.max(took);
        *outcomes.entry((shape, outcome)).or_default() += 1;
    }
    let flood_time = started.elapsed();
    let reviews = standin.token_reviews_served() - reviews_before;

    println!("tokengate: {}", cli.tokengate.display());
    println!(
        "forged Checks: {} over {} connections",
        cli.n,
        clients.len()
    );
    println!(
        "TokenReviews during the flood: {reviews} (the legitimate caller's included, if it got one: {loaded_outcome})"
    );
    println!("flood wall time: {flood_time:?}; slowest forged Check: {slowest:?}");
    println!("legitimate new caller: {loaded_latency:?} during the flood, {idle_latency:?} idle ({idle_outcome})");
    for ((shape, outcome), n) in outcomes {
        println!("  {shape:>16}: {outcome} x{n}");
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
