//! Issue 9's "must show" measurements, each a `tokengate-bench` subcommand with the API
//! stand-in in-process and tokengate (release build) as a process ([`crate::gate`]):
//!
//! - [`revocation`]: N times: create a pod, mint a token bound to it, Check (allowed, now
//!   cached for the 10-minute TTL), delete the pod through the API (`gracePeriodSeconds=0`),
//!   then Check every ~2 ms until denied; delete→denied latency p50/p99/max, per mode;
//! - [`restart_reviews`]: one Check per token of N distinct pods against a freshly started
//!   tokengate (its cache lives in memory: a restart starts empty); TokenReviews counted by
//!   the stand-in, per mode;
//! - [`watch_rss`]: tokengate's RSS with the watch caches holding 100,000 pods and 10,000
//!   service accounts, before and after the first lists, against watch off.
//!
//! Each prints one JSON line per mode/variant on stdout and a readable line on stderr.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube_standin::{Bulk, KeyAlg, MintRequest, Options, Standin};
use serde_json::json;

use crate::gate::{metric, metric_by_label, Gate, GateConfig, Mode};
use crate::load::{self, Outcome, Spec};
use crate::stats::Summary;

/// The bench route's audience.
pub const AUDIENCE: &str = "tokengate-bench";

/// Starts the stand-in in `dir` with `alg` signing keys and the reviewer's list/watch grant.
async fn standin(dir: &Path, alg: KeyAlg) -> Result<Standin> {
    std::fs::create_dir_all(dir)?;
    let s = Standin::start(Options {
        dir: Some(dir.to_path_buf()),
        key_alg: alg,
        ..Options::default()
    })
    .await?;
    s.grant_reviewer_watch();
    Ok(s)
}

/// Parses `es256` / `rs256`.
pub fn key_alg(s: &str) -> Result<KeyAlg> {
    match s {
        "es256" => Ok(KeyAlg::Es256),
        "rs256" => Ok(KeyAlg::Rs256),
        other => bail!("--alg {other}: expected es256 or rs256"),
    }
}

/// A kube client with the stand-in's admin credentials ("through the API").
async fn admin_client(s: &Standin) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(s.admin_kubeconfig_path())?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn check(client: &mut AuthorizationClient<tonic::transport::Channel>, t: &str) -> Outcome {
    load::check_once(client, t, &Spec::one_off()).await
}

/// Counters read from tokengate's `/metrics` (absent metrics are `null`).
fn gate_counters(text: &str) -> serde_json::Value {
    json!({
        "tokenreview_attempts": metric(text, "tokengate_tokenreview_duration_seconds_count", &[]),
        "revocations": metric_by_label(text, "tokengate_revocations_total", "cause"),
        "local_fallbacks": metric_by_label(text, "tokengate_local_fallbacks_total", "reason"),
        "watch_objects": metric_by_label(text, "tokengate_watch_objects", "kind"),
        "cache_hits": metric(text, "tokengate_cache_hits_total", &[]),
        "cache_misses": metric(text, "tokengate_cache_misses_total", &[]),
    })
}

/// Waits (≤ `limit`) until tokengate's watch cache holds at least `n` pods; false on timeout
/// or when the metric does not exist.
async fn wait_pods_seen(gate: &Gate, n: f64, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        match gate.metrics().await {
            Ok(text) => match metric(&text, "tokengate_watch_objects", &[("kind", "pod")]) {
                Some(v) if v >= n => return true,
                Some(_) => {}
                None => return false,
            },
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

fn percentiles_ms(samples: &[Duration]) -> serde_json::Value {
    let mut us: Vec<u32> = samples
        .iter()
        .map(|d| d.as_micros().min(u32::MAX as u128) as u32)
        .collect();
    us.sort_unstable();
    let ms = |q: f64| Summary::quantile(&us, q) as f64 / 1000.0;
    json!({
        "n": us.len(),
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "max_ms": us.last().map_or(0.0, |v| *v as f64 / 1000.0),
    })
}

/// Settings of [`revocation`].
#[derive(Debug, Clone)]
pub struct Revocation {
    /// Modes to measure, in order.
    pub modes: Vec<Mode>,
    /// Deletions per mode.
    pub n: usize,
    /// Pause between Checks while waiting for the denial.
    pub interval: Duration,
    /// Give up on one deletion after this long (recorded as a miss).
    pub limit: Duration,
    /// The tokengate binary.
    pub bin: PathBuf,
    /// Work directory (stand-in files, configs, logs).
    pub dir: PathBuf,
    /// Signing key algorithm.
    pub alg: KeyAlg,
}

/// Delete→denied latency per mode.
pub async fn revocation(r: Revocation) -> Result<()> {
    let s = standin(&r.dir.join("standin"), r.alg).await?;
    s.create_service_account("rev", "client");
    let pods: Api<Pod> = Api::namespaced(admin_client(&s).await?, "rev");
    for mode in &r.modes {
        let gate = Gate::start(
            &r.bin,
            &r.dir,
            &format!("revocation-{}", mode.as_str()),
            GateConfig::new(&s.kubeconfig_path(), *mode, AUDIENCE)?,
        )
        .await?;
        let mut client = AuthorizationClient::new(load::channel(&gate.grpc_uri()).await?);
        let reviews0 = s.token_reviews_served();
        let mut latencies = Vec::new();
        let mut delete_calls = Vec::new();
        let (mut timeouts, mut rpc_errors, mut checks, mut not_seen) = (0, 0u64, 0u64, 0);
        let base_pods = metric(
            &gate.metrics().await?,
            "tokengate_watch_objects",
            &[("kind", "pod")],
        );
        for i in 0..r.n {
            let name = format!("{}-{i}", mode.as_str());
            s.create_pod("rev", &name, "client", Some("node-1"));
            // Let the watch see the pod first, so local mode judges it locally (otherwise the
            // first Check falls back to TokenReview, which is also correct, just not this path).
            // Only a coarse guard: the gauge is refreshed once a second and may still show the
            // previous pod. Whether the first Checks were local shows in `token_reviews_served`
            // (0 in local mode) and `local_fallbacks`.
            if let Some(b) = base_pods {
                if !wait_pods_seen(&gate, b + 1.0, Duration::from_secs(5)).await {
                    not_seen += 1;
                }
            }
            let token = s.mint(
                &MintRequest::new("rev", "client")
                    .audience(AUDIENCE)
                    .pod(&name)
                    .expires_in(3600),
            )?;
            for _ in 0..2 {
                match check(&mut client, &token).await {
                    Outcome::Allowed => {}
                    other => bail!(
                        "{}: pod {name}'s token not allowed before deletion: {other:?}\n{}",
                        mode.as_str(),
                        gate.log_tail()
                    ),
                }
            }
            let t0 = Instant::now();
            pods.delete(
                &name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await
            .with_context(|| format!("deleting pod rev/{name}"))?;
            delete_calls.push(t0.elapsed());
            loop {
                checks += 1;
                match check(&mut client, &token).await {
                    Outcome::Denied => {
                        latencies.push(t0.elapsed());
                        break;
                    }
                    Outcome::RpcError => rpc_errors += 1,
                    Outcome::Allowed => {}
                }
                if t0.elapsed() > r.limit {
                    timeouts += 1;
                    break;
                }
                tokio::time::sleep(r.interval).await;
            }
        }
        let reviews = s.token_reviews_served() - reviews0;
        let counters = gate_counters(&gate.metrics().await?);
        gate.stop().await?;
        let lat = percentiles_ms(&latencies);
        let line = json!({
            "measurement": "revocation",
            "mode": mode.as_str(),
            "deletions": r.n,
            "denied_within_limit": latencies.len(),
            "timeouts": timeouts,
            "limit_s": r.limit.as_secs_f64(),
            "delete_to_denied": lat,
            "delete_call": percentiles_ms(&delete_calls),
            "checks_while_waiting": checks,
            "rpc_errors": rpc_errors,
            "pods_not_seen_by_watch_before_first_check": not_seen,
            "token_reviews_served": reviews,
            "tokengate": counters,
        });
        eprintln!(
            "revocation {}: {} deletions, delete→denied p50 {} ms, p99 {} ms, max {} ms; {} not denied within {:?}; {} TokenReviews",
            mode.as_str(),
            r.n,
            lat["p50_ms"],
            lat["p99_ms"],
            lat["max_ms"],
            timeouts,
            r.limit,
            reviews
        );
        println!("{line}");
    }
    s.shutdown().await;
    Ok(())
}

/// Settings of [`restart_reviews`].
#[derive(Debug, Clone)]
pub struct RestartReviews {
    /// Modes to measure.
    pub modes: Vec<Mode>,
    /// Distinct pods (callers).
    pub n: usize,
    /// Service accounts they run as.
    pub service_accounts: usize,
    /// Checks in flight.
    pub concurrency: usize,
    /// The tokengate binary.
    pub bin: PathBuf,
    /// Work directory.
    pub dir: PathBuf,
    /// Signing key algorithm.
    pub alg: KeyAlg,
}

/// TokenReviews for N distinct new callers after a (re)start, per mode.
pub async fn restart_reviews(r: RestartReviews) -> Result<()> {
    let s = standin(&r.dir.join("standin"), r.alg).await?;
    let namespaces = 10;
    let sas = r.service_accounts.max(1);
    s.bulk_create(&Bulk {
        prefix: "callers".into(),
        namespaces,
        service_accounts: sas,
        pods: r.n,
        node: Some("node-1".into()),
    });
    let started = Instant::now();
    let tokens: Vec<String> = tokio::task::block_in_place(|| {
        (0..r.n)
            .map(|k| {
                let j = k % sas;
                s.mint(
                    &MintRequest::new(&format!("callers-{}", j % namespaces), &format!("sa-{j}"))
                        .audience(AUDIENCE)
                        .pod(&format!("pod-{k}"))
                        .expires_in(3600),
                )
            })
            .collect::<Result<_>>()
    })?;
    eprintln!(
        "minted {} pod-bound tokens in {:.1}s",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );
    let tokens = Arc::new(tokens);
    for mode in &r.modes {
        let mut gate = Gate::spawn(
            &r.bin,
            &r.dir,
            &format!("restart-{}", mode.as_str()),
            GateConfig::new(&s.kubeconfig_path(), *mode, AUDIENCE)?,
        )
        .await?;
        let ready_after = gate.wait_ready(Duration::from_secs(300)).await?;
        let reviews0 = s.token_reviews_served();
        let m0 = gate.metrics().await?;
        let cpu0 = gate.cpu()?;
        let t0 = Instant::now();
        let counts = fill(&gate.grpc_uri(), tokens.clone(), r.concurrency).await?;
        let secs = t0.elapsed().as_secs_f64();
        let cpu = gate.cpu()? - cpu0;
        let reviews = s.token_reviews_served() - reviews0;
        let m1 = gate.metrics().await?;
        gate.stop().await?;
        let attempts = |m: &str| metric(m, "tokengate_tokenreview_duration_seconds_count", &[]);
        let line = json!({
            "measurement": "restart_reviews",
            "mode": mode.as_str(),
            "callers": r.n,
            "ready_after_s": ready_after.as_secs_f64(),
            "allowed": counts[0], "denied": counts[1], "rpc_errors": counts[2],
            "token_reviews_served": reviews,
            "tokenreview_attempts_metric": attempts(&m1).map(|a| a - attempts(&m0).unwrap_or(0.0)),
            "seconds": secs,
            "checks_per_s": r.n as f64 / secs,
            "tokengate_cpu_us_per_check": cpu.as_secs_f64() * 1e6 / r.n as f64,
            "tokengate": gate_counters(&m1),
        });
        eprintln!(
            "restart-reviews {}: {} distinct callers → {} TokenReviews ({} allowed, {} denied, {} errors; {:.0} Checks/s)",
            mode.as_str(),
            r.n,
            reviews,
            counts[0],
            counts[1],
            counts[2],
            r.n as f64 / secs
        );
        println!("{line}");
    }
    s.shutdown().await;
    Ok(())
}

/// One Check per token, `concurrency` in flight: [allowed, denied, rpc errors].
pub async fn fill(uri: &str, tokens: Arc<Vec<String>>, concurrency: usize) -> Result<[u64; 3]> {
    let client = AuthorizationClient::new(load::channel(uri).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (mut client, tokens, next) = (client.clone(), tokens.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut counts = [0u64; 3];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(t) = tokens.get(i) else { break };
                let k = match check(&mut client, t).await {
                    Outcome::Allowed => 0,
                    Outcome::Denied => 1,
                    Outcome::RpcError => 2,
                };
                counts[k] += 1;
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
    Ok(counts)
}

/// Settings of [`watch_rss`].
#[derive(Debug, Clone)]
pub struct WatchRss {
    /// Pods in the stand-in.
    pub pods: usize,
    /// Service accounts in the stand-in.
    pub service_accounts: usize,
    /// Namespaces they are spread over.
    pub namespaces: usize,
    /// The tokengate binary.
    pub bin: PathBuf,
    /// Work directory.
    pub dir: PathBuf,
}

/// tokengate's RSS: watch off; watch on before/after the first lists; local mode.
pub async fn watch_rss(w: WatchRss) -> Result<()> {
    let s = standin(&w.dir.join("standin"), KeyAlg::Es256).await?;
    let started = Instant::now();
    let created = s.bulk_create(&Bulk {
        prefix: "rss".into(),
        namespaces: w.namespaces,
        service_accounts: w.service_accounts,
        pods: w.pods,
        node: Some("node-1".into()),
    });
    eprintln!(
        "stand-in: {} pods, {} service accounts in {} namespaces created in {:.1}s",
        created.pods,
        created.service_accounts,
        created.namespaces,
        started.elapsed().as_secs_f64()
    );
    let variants = [
        ("watch_off", Mode::TokenReview, false),
        ("tokenreview_watch", Mode::TokenReview, true),
        ("local", Mode::Local, true),
    ];
    for (label, mode, watch) in variants {
        let mut config = GateConfig::new(&s.kubeconfig_path(), mode, AUDIENCE)?;
        config.watch = watch;
        let t0 = Instant::now();
        let mut gate = Gate::spawn(&w.bin, &w.dir, &format!("rss-{label}"), config).await?;
        // First sample: the admin port answers, the first lists are (at best) in flight.
        let first = gate.memory()?;
        let first_at = t0.elapsed();
        let ready = gate.wait_ready(Duration::from_secs(300)).await?;
        // With watch on, /readyz means the first lists are in; also wait for the gauge.
        let mut objects = serde_json::Value::Null;
        if watch {
            let limit = Instant::now() + Duration::from_secs(120);
            loop {
                let m = gate.metrics().await?;
                let pods = metric(&m, "tokengate_watch_objects", &[("kind", "pod")]);
                objects = json!(metric_by_label(&m, "tokengate_watch_objects", "kind"));
                if pods.is_some_and(|p| p >= w.pods as f64) || Instant::now() > limit {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let synced_at = t0.elapsed();
        let synced = gate.memory()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let settled = gate.memory()?;
        let cpu = gate.cpu()?;
        gate.stop().await?;
        let mib = |k: u64| (k as f64 / 1024.0 * 10.0).round() / 10.0;
        let line = json!({
            "measurement": "watch_rss",
            "variant": label,
            "pods": w.pods, "service_accounts": w.service_accounts,
            "rss_first_mib": mib(first.rss_kib), "first_sample_s": first_at.as_secs_f64(),
            "ready_s": ready.as_secs_f64() + first_at.as_secs_f64(),
            "rss_synced_mib": mib(synced.rss_kib), "synced_s": synced_at.as_secs_f64(),
            "rss_settled_mib": mib(settled.rss_kib),
            "peak_mib": mib(settled.hwm_kib),
            "cpu_s_to_settle": cpu.as_secs_f64(),
            "watch_objects": objects,
        });
        eprintln!(
            "watch-rss {label}: RSS {} MiB at start → {} MiB synced ({:.1}s) → {} MiB settled; peak {} MiB; objects {objects}",
            mib(first.rss_kib),
            mib(synced.rss_kib),
            synced_at.as_secs_f64(),
            mib(settled.rss_kib),
            mib(settled.hwm_kib)
        );
        println!("{line}");
    }
    s.shutdown().await;
    Ok(())
}
