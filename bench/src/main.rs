//! `tokengate-bench`: helpers for `bench/run.sh`, one subcommand each.
//!
//! - `ports N`: N free loopback ports;
//! - `jwt --dir D`: RS256 key → `D/jwks.json` and a signed `D/jwt.txt` for `jwt_authn`;
//! - `standin --dir D ...`: the Kubernetes API stand-in in-process, with pools of pre-minted
//!   service-account tokens written to files (minting in-process is ~100x faster than
//!   TokenRequest over HTTPS, and 100k tokens are needed);
//! - `check-body`: a pre-encoded gRPC CheckRequest for `h2load -d`;
//! - `load`: open-loop fixed-rate latency (HTTP/1.1 through Envoy, or gRPC Check);
//! - `fill`: one Check per token (fills tokengate's cache, e.g. for the RSS measurement);
//! - `burst`: N concurrent Checks with one new token (single-flight);
//! - `report`: the Markdown table from a results directory;
//! - `revocation`, `restart-reviews`, `watch-rss`: issue 9's measurements (see
//!   `tokengate_bench::issue9`).

mod report;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use kube_standin::{KeyAlg, MintRequest, Options, Standin};
use serde_json::json;
use tokengate_bench::check::{check_request_with, grpc_frame};
use tokengate_bench::gate::{self, Mode};
use tokengate_bench::issue9;
use tokengate_bench::jwt::{claims, Signer};
use tokengate_bench::load::{self, Outcome, Spec};

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "tokengate benchmark helpers (see bench/run.sh)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print N free loopback TCP ports, one per line.
    Ports { n: usize },
    /// Write DIR/jwks.json and DIR/jwt.txt (RS256, RSA-2048).
    Jwt {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "https://bench.tokengate.local")]
        issuer: String,
        #[arg(long, default_value = "bench")]
        audience: String,
    },
    /// Run the API stand-in in-process and pre-mint token pools into DIR.
    Standin {
        #[arg(long)]
        dir: PathBuf,
        /// Token audience.
        #[arg(long, default_value = "tokengate-bench")]
        audience: String,
        /// Tokens in DIR/pool.txt (cache-miss scenario).
        #[arg(long, default_value_t = 60_000)]
        pool: usize,
        /// Tokens in DIR/fill.txt (RSS measurement).
        #[arg(long, default_value_t = 100_000)]
        fill: usize,
        /// Tokens in DIR/single.txt (cache-hit token first, then single-flight tokens).
        #[arg(long, default_value_t = 8)]
        single: usize,
        /// Signing key: es256 (fast to mint in bulk) or rs256 (like most clusters).
        #[arg(long, default_value = "es256")]
        alg: String,
        /// Give tokengate's reviewer list/watch on pods and service accounts (watch,
        /// `verification: local`).
        #[arg(long)]
        grant_reviewer_watch: bool,
    },
    /// Write a gRPC-framed CheckRequest carrying line LINE of TOKENS to OUT.
    CheckBody {
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long, default_value_t = 0)]
        line: usize,
        #[arg(long)]
        out: PathBuf,
        /// Only the `authorization` header (what Envoy sends with `allowed_headers`).
        #[arg(long)]
        token_header_only: bool,
        /// The mTLS peer's SPIFFE ID (`source.principal`), on the `require_peer` route.
        #[arg(long)]
        peer: Option<String>,
    },
    /// Fixed-rate load; prints one JSON line with p50/p90/p99/p99.9.
    Load {
        /// Label copied into the JSON output.
        #[arg(long)]
        label: String,
        /// HTTP/1.1 target (Envoy listener), e.g. 127.0.0.1:8080.
        #[arg(long, conflicts_with = "grpc")]
        http: Option<std::net::SocketAddr>,
        /// gRPC target (Check alone), e.g. http://127.0.0.1:9001.
        #[arg(long)]
        grpc: Option<String>,
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Token file (one per line), used round-robin; absent: no Authorization header.
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Use only the first N tokens of the file (1 = one token, cache hits).
        #[arg(long)]
        first: Option<usize>,
        /// gRPC: put all of Envoy's default headers in each CheckRequest, not only the token.
        #[arg(long)]
        all_headers: bool,
        /// gRPC: the mTLS peer's SPIFFE ID (`source.principal`), on the `require_peer` route.
        #[arg(long)]
        peer: Option<String>,
    },
    /// Send one Check per token with bounded concurrency; prints counts and elapsed time.
    Fill {
        #[arg(long)]
        grpc: String,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// N concurrent Checks with the same (new) token: line LINE of TOKENS.
    Burst {
        #[arg(long)]
        grpc: String,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        line: usize,
        #[arg(long, default_value_t = 100)]
        n: usize,
    },
    /// Print the Markdown results table for a results directory written by run.sh.
    Report { dir: PathBuf },
    /// Issue 9: delete→denied latency of pod-bound tokens (cache TTL 10 min, watch on).
    Revocation {
        /// Comma-separated: tokenreview, local.
        #[arg(long, default_value = "tokenreview,local")]
        modes: String,
        /// Deletions per mode.
        #[arg(long, default_value_t = 50)]
        n: usize,
        /// Pause between Checks while waiting for the denial (ms).
        #[arg(long, default_value_t = 2)]
        interval_ms: u64,
        /// Give up on one deletion after this many seconds.
        #[arg(long, default_value_t = 10.0)]
        limit_secs: f64,
        #[command(flatten)]
        common: Issue9Args,
    },
    /// Issue 9: TokenReviews for N distinct new callers against a freshly started tokengate.
    RestartReviews {
        #[arg(long, default_value = "tokenreview,local")]
        modes: String,
        /// Distinct callers (pods, one token each).
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Service accounts the pods run as.
        #[arg(long, default_value_t = 1_000)]
        service_accounts: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[command(flatten)]
        common: Issue9Args,
    },
    /// Issue 9: tokengate's RSS with the watch caches full (and watch off, for comparison).
    WatchRss {
        #[arg(long, default_value_t = 100_000)]
        pods: usize,
        #[arg(long, default_value_t = 10_000)]
        service_accounts: usize,
        #[arg(long, default_value_t = 100)]
        namespaces: usize,
        #[command(flatten)]
        common: Issue9Args,
    },
}

/// Options shared by the issue 9 subcommands.
#[derive(clap::Args, Debug)]
struct Issue9Args {
    /// Work directory (stand-in files, tokengate configs and logs).
    #[arg(long)]
    dir: PathBuf,
    /// tokengate binary; default: `tokengate` next to this executable.
    #[arg(long)]
    tokengate: Option<PathBuf>,
    /// Signing key of the stand-in: es256 or rs256 (most clusters).
    #[arg(long, default_value = "rs256")]
    alg: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Load generators get one core: the machine under test has two.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Ports { n } => ports(n),
        Cmd::Jwt {
            dir,
            issuer,
            audience,
        } => jwt(&dir, &issuer, &audience),
        Cmd::Standin {
            dir,
            audience,
            pool,
            fill,
            single,
            alg,
            grant_reviewer_watch,
        } => {
            // The stand-in serves TokenReview for the cache-miss scenario: give it two workers.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(standin(
                dir,
                audience,
                pool,
                fill,
                single,
                alg,
                grant_reviewer_watch,
            ))
        }
        Cmd::CheckBody {
            tokens,
            line,
            out,
            token_header_only,
            peer,
        } => {
            let token = read_tokens(&tokens)?
                .into_iter()
                .nth(line)
                .context("no such line")?;
            let req = check_request_with(&token, "bench", "/", "bench", !token_header_only);
            let body = match peer {
                Some(p) => grpc_frame(&tokengate_bench::check::with_peer(req, &p)),
                None => grpc_frame(&req),
            };
            std::fs::write(&out, body)?;
            Ok(())
        }
        Cmd::Load {
            label,
            http,
            grpc,
            rate,
            duration,
            warmup,
            connections,
            tokens,
            first,
            all_headers,
            peer,
        } => {
            let mut list = match tokens {
                Some(p) => read_tokens(&p)?,
                None => Vec::new(),
            };
            if let Some(n) = first {
                list.truncate(n);
            }
            let spec = Spec {
                rate,
                duration: Duration::from_secs_f64(duration),
                warmup: Duration::from_secs_f64(warmup),
                connections,
                tokens: Arc::new(list),
                host: "bench".into(),
                path: "/".into(),
                all_headers,
                peer,
            };
            let mut summary = rt.block_on(async {
                match (http, grpc) {
                    (Some(addr), _) => load::http(addr, spec).await,
                    (None, Some(uri)) => load::grpc(&uri, spec).await,
                    (None, None) => bail!("give --http or --grpc"),
                }
            })?;
            println!("{}", summary.to_json(&label, rate));
            Ok(())
        }
        Cmd::Fill {
            grpc,
            tokens,
            concurrency,
        } => rt.block_on(fill(&grpc, read_tokens(&tokens)?, concurrency)),
        Cmd::Burst {
            grpc,
            tokens,
            line,
            n,
        } => {
            let token = read_tokens(&tokens)?
                .into_iter()
                .nth(line)
                .context("no such line")?;
            rt.block_on(burst(&grpc, token, n))
        }
        Cmd::Report { dir } => report::print(&dir),
        Cmd::Revocation {
            modes,
            n,
            interval_ms,
            limit_secs,
            common,
        } => issue9_runtime()?.block_on(issue9::revocation(issue9::Revocation {
            modes: Mode::parse_list(&modes)?,
            n,
            interval: Duration::from_millis(interval_ms),
            limit: Duration::from_secs_f64(limit_secs),
            bin: gate::tokengate_bin(common.tokengate)?,
            dir: common.dir,
            alg: issue9::key_alg(&common.alg)?,
        })),
        Cmd::RestartReviews {
            modes,
            n,
            service_accounts,
            concurrency,
            common,
        } => issue9_runtime()?.block_on(issue9::restart_reviews(issue9::RestartReviews {
            modes: Mode::parse_list(&modes)?,
            n,
            service_accounts,
            concurrency,
            bin: gate::tokengate_bin(common.tokengate)?,
            dir: common.dir,
            alg: issue9::key_alg(&common.alg)?,
        })),
        Cmd::WatchRss {
            pods,
            service_accounts,
            namespaces,
            common,
        } => issue9_runtime()?.block_on(issue9::watch_rss(issue9::WatchRss {
            pods,
            service_accounts,
            namespaces,
            bin: gate::tokengate_bin(common.tokengate)?,
            dir: common.dir,
        })),
    }
}

/// The stand-in and the client share this process: two workers, as for `standin`.
fn issue9_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn ports(n: usize) -> Result<()> {
    // Hold all listeners until every port is chosen so the N ports are distinct.
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    for l in &listeners {
        println!("{}", l.local_addr()?.port());
    }
    Ok(())
}

fn jwt(dir: &Path, issuer: &str, audience: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let signer = Signer::generate("bench-1")?;
    std::fs::write(dir.join("jwks.json"), signer.jwks())?;
    let token = signer.sign(&claims(issuer, audience, 24 * 3600))?;
    std::fs::write(dir.join("jwt.txt"), format!("{token}\n"))?;
    Ok(())
}

fn read_tokens(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

async fn standin(
    dir: PathBuf,
    audience: String,
    pool: usize,
    fill: usize,
    single: usize,
    alg: String,
    grant_reviewer_watch: bool,
) -> Result<()> {
    std::fs::create_dir_all(&dir)?;
    let key_alg = match alg.as_str() {
        "es256" => KeyAlg::Es256,
        "rs256" => KeyAlg::Rs256,
        other => bail!("--alg {other}: expected es256 or rs256"),
    };
    let standin = Standin::start(Options {
        dir: Some(dir.clone()),
        key_alg,
        ..Options::default()
    })
    .await?;
    if grant_reviewer_watch {
        standin.grant_reviewer_watch();
    }
    standin.create_service_account("bench", "client");
    // The `bench-peer` route's `allow.rbac` (check_tokengate_peer): `get` on /bench.
    standin.create_cluster_role(
        "bench-client",
        vec![kube_standin::cluster::PolicyRule::urls(
            &["/bench"],
            &["get"],
        )],
    );
    standin.bind_cluster_role("bench-client", "bench-client", ("bench", "client"));
    let started = Instant::now();
    for (name, n) in [("single", single), ("pool", pool), ("fill", fill)] {
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{name}.txt")))?);
        tokio::task::block_in_place(|| -> Result<()> {
            for _ in 0..n {
                let req = MintRequest::new("bench", "client")
                    .audience(&audience)
                    .expires_in(6 * 3600);
                writeln!(out, "{}", standin.mint(&req)?)?;
            }
            Ok(())
        })?;
        out.flush()?;
    }
    eprintln!(
        "minted {} tokens in {:.1}s",
        single + pool + fill,
        started.elapsed().as_secs_f64()
    );
    // The admin token lets run.sh use the stand-in's control API (faults, counters).
    let admin = std::fs::read_to_string(standin.admin_kubeconfig_path())?;
    let token = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("token:"))
        .map(|t| t.trim().trim_matches('"').to_string())
        .context("no token in admin kubeconfig")?;
    std::fs::write(dir.join("admin-token"), token)?;
    println!("ready {}", standin.url());
    tokio::signal::ctrl_c().await?;
    standin.shutdown().await;
    Ok(())
}

async fn fill(uri: &str, tokens: Vec<String>, concurrency: usize) -> Result<()> {
    let client = AuthorizationClient::new(load::channel(uri).await?);
    let spec = Arc::new(Spec::one_off());
    let tokens = Arc::new(tokens);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (mut client, spec, tokens, next) =
            (client.clone(), spec.clone(), tokens.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut counts = [0u64; 3];
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(t) = tokens.get(i) else { break };
                counts[outcome_index(load::check_once(&mut client, t, &spec).await)] += 1;
            }
            counts
        }));
    }
    let mut counts = [0u64; 3];
    for w in workers {
        for (c, v) in counts.iter_mut().zip(w.await?) {
            *c += v;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"allowed": counts[0], "denied": counts[1], "rpc_errors": counts[2],
               "seconds": secs, "rate": tokens.len() as f64 / secs})
    );
    Ok(())
}

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Allowed => 0,
        Outcome::Denied => 1,
        Outcome::RpcError => 2,
    }
}

async fn burst(uri: &str, token: String, n: usize) -> Result<()> {
    let client = AuthorizationClient::new(load::channel(uri).await?);
    let spec = Arc::new(Spec::one_off());
    let token = Arc::new(token);
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (mut client, spec, token, barrier) =
            (client.clone(), spec.clone(), token.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            load::check_once(&mut client, &token, &spec).await
        }));
    }
    let mut counts = [0u64; 3];
    for t in tasks {
        counts[outcome_index(t.await?)] += 1;
    }
    println!(
        "{}",
        json!({"n": n, "allowed": counts[0], "denied": counts[1], "rpc_errors": counts[2]})
    );
    Ok(())
}
