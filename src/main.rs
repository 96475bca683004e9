//! The `tokengate` binary: command line and wiring only (see the library for everything else).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokengate::config::{Config, LogFormat};

/// Envoy/Istio external authorization server that checks Kubernetes service-account tokens
/// with TokenReview.
#[derive(Debug, Parser)]
#[command(name = "tokengate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ext_authz gRPC server and the admin HTTP server.
    Serve {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Tokio worker threads. 0 runs everything on one thread (a current-thread runtime),
        /// which costs the least CPU per Check when one or two Envoy connections feed it; the
        /// default is one worker per CPU.
        #[arg(long)]
        worker_threads: Option<usize>,
        /// How often the configuration file is checked for changes (read and compared; a
        /// Kubernetes ConfigMap's symlink swap is followed); `0s` turns the check off. SIGHUP
        /// reloads either way.
        #[arg(long, default_value = "5s", value_parser = tokengate::config::parse_duration)]
        watch_config: std::time::Duration,
    },
    /// Validate a configuration file; exits non-zero listing every problem with field and line.
    CheckConfig {
        /// Configuration file (YAML).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: OK ({} route{})",
                    file.display(),
                    c.routes.len(),
                    if c.routes.len() == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            config: path,
            worker_threads,
            watch_config,
        } => {
            let reload = tokengate::reload::Source {
                path: path.clone(),
                poll_every: (!watch_config.is_zero()).then_some(watch_config),
                on_sighup: true,
            };
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match runtime(worker_threads).and_then(|rt| rt.block_on(serve(config, reload))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("tokengate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Log output (text or JSON, the `log.level` filter; colour only on a terminal) and, when
/// tracing is on, the OTLP layer for tokengate's spans beside it with its own filter.
fn init_logging(config: &Config) -> anyhow::Result<Option<tokengate::telemetry::Tracing>> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never into a log pipeline.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let output = match config.log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
    };
    let (otlp, tracing) = match tokengate::telemetry::layer(&config.tracing)? {
        Some((layer, tracing)) => (Some(layer), Some(tracing)),
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(otlp)
        .init();
    Ok(tracing)
}

/// The tokio runtime: current-thread for `Some(0)`, else multi-thread (`None`: one worker
/// per CPU).
fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        Some(0) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    Ok(builder.enable_all().build()?)
}

async fn serve(config: Config, reload: tokengate::reload::Source) -> anyhow::Result<()> {
    let tracing = init_logging(&config)?;
    let served = serve_with(config, reload).await;
    if let Some(tracing) = tracing {
        // Blocking, while the runtime keeps driving the exporter's channel.
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    }
    served
}

async fn serve_with(config: Config, reload: tokengate::reload::Source) -> anyhow::Result<()> {
    let grpc = tokengate::GrpcListener::bind(&config.listen.grpc)
        .await
        .with_context(|| format!("binding gRPC listener {}", config.listen.grpc))?;
    let admin = tokio::net::TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("binding admin listener {}", config.listen.admin))?;
    let http = match config.listen.http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding HTTP listener {addr}"))?,
        ),
        None => None,
    };
    // The library's error, with its cause chain printed once (kube's errors repeat theirs).
    tokengate::serve_with_reload(config, Some(reload), grpc, admin, http, shutdown_signal())
        .await
        .map_err(|e| anyhow::anyhow!("{}", tokengate::error::Report(&e)))
}

/// Completes on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
