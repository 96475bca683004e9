//! `kube-standin serve --dir DIR [--listen ADDR] [--issuer URL] [--api-audience A]...`:
//! runs the stand-in API server as a process (for the demo and the Envoy tests). It writes
//! `DIR/{ca.crt, kubeconfig, admin.kubeconfig, reviewer-token, url}`, prints
//! `ready <url>` on stdout once it serves, and runs until SIGINT or SIGTERM.
//!
//! Test controls (admin token only): `POST /standin/v1/fault` with
//! `{"kind":"latency","ms":50}`, `{"kind":"status","code":503,"retry_after":1}` (add
//! `"retry_after_date":true` for an HTTP-date `Retry-After`), `{"kind":"hang"}`,
//! `{"kind":"close"}`, `{"kind":"reset"}`, `{"kind":"down","ms":2000}` (stop listening for
//! that long, then listen again on the same port) or `{"kind":"none"}`; and
//! `GET /standin/v1/counters` → `{"token_reviews":N}`; key rotation, bulk objects, the
//! clock, pod reaping and the watch history (see the README).
//!
//! The whole state (CA, keys, objects, tokens) is kept in `DIR/state.json`: a process
//! restarted on the same `--dir` (and `--listen` port) is the same cluster, so a stop and
//! restart is a down/up that clients ride out. `--fresh` starts a new cluster instead.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use kube_standin::{KeyAlg, MetadataStyle, Options, Standin};

#[derive(Parser)]
#[command(
    name = "kube-standin",
    about = "A stand-in for kube-apiserver's token APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Alg {
    Rs256,
    Es256,
}

#[derive(Clone, Copy, ValueEnum)]
enum Style {
    V133,
    PreV133,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until interrupted.
    Serve {
        /// Directory for ca.crt, kubeconfig, admin.kubeconfig, reviewer-token and url.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Service-account issuer.
        #[arg(long, default_value = "https://kubernetes.default.svc.cluster.local")]
        issuer: String,
        /// API audience (repeatable); none means the issuer.
        #[arg(long = "api-audience")]
        api_audiences: Vec<String>,
        /// Signing key algorithm.
        #[arg(long, value_enum, default_value = "rs256")]
        key_alg: Alg,
        /// Leave out `jti` (ServiceAccountTokenJTI off, like clusters before 1.29).
        #[arg(long)]
        no_jti: bool,
        /// Leave out node info in pod-bound tokens (ServiceAccountTokenPodNodeInfo off).
        #[arg(long)]
        no_pod_node_info: bool,
        /// Allow TokenRequests shorter than 10 minutes.
        #[arg(long)]
        allow_short_tokens: bool,
        /// TokenReview `metadata` style.
        #[arg(long, value_enum, default_value = "v133")]
        metadata_style: Style,
        /// Ignore (and overwrite) DIR/state.json instead of resuming from it.
        #[arg(long)]
        fresh: bool,
        /// Changes kept per resource for watches; older resourceVersions get 410 Expired.
        #[arg(long, default_value_t = kube_standin::cluster::DEFAULT_HISTORY)]
        watch_history: usize,
        /// Interval of watch BOOKMARK events, in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        bookmark_interval_ms: u64,
        /// Grant the reviewer get/list/watch on pods and service accounts (ClusterRole and
        /// ClusterRoleBinding `tokengate-watch`), as tokengate's local verification needs.
        #[arg(long)]
        grant_reviewer_watch: bool,
    },
}

fn dir_state(opts: &Options) -> PathBuf {
    opts.dir.clone().unwrap_or_default().join("state.json")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let Command::Serve {
        dir,
        listen,
        issuer,
        api_audiences,
        key_alg,
        no_jti,
        no_pod_node_info,
        allow_short_tokens,
        metadata_style,
        fresh,
        watch_history,
        bookmark_interval_ms,
        grant_reviewer_watch,
    } = Cli::parse().command;
    let opts = Options {
        issuer,
        api_audiences,
        key_alg: match key_alg {
            Alg::Rs256 => KeyAlg::Rs256,
            Alg::Es256 => KeyAlg::Es256,
        },
        jti: !no_jti,
        pod_node_info: !no_pod_node_info,
        enforce_min_expiration: !allow_short_tokens,
        metadata_style: match metadata_style {
            Style::V133 => MetadataStyle::V133,
            Style::PreV133 => MetadataStyle::PreV133,
        },
        dir: Some(dir),
        bind: listen,
        watch_history,
        bookmark_interval: std::time::Duration::from_millis(bookmark_interval_ms),
        ..Options::default()
    };
    if fresh {
        let state = dir_state(&opts);
        if state.exists() {
            std::fs::remove_file(&state)?;
        }
    }
    let standin = Standin::start_persistent(opts).await?;
    if grant_reviewer_watch {
        standin.grant_reviewer_watch();
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready {}", standin.url())?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    standin.shutdown().await;
    Ok(())
}
