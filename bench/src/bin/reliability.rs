//! `reliability`: the reliability harness of RELIABILITY.md (issue 12 item 7).
//!
//! Starts the Kubernetes API stand-in in-process (it counts TokenReviews and injects faults)
//! and the tokengate binary given (`--tokengate`, so any build can be measured the same way)
//! as a child process, then runs these phases against that one process and prints a Markdown
//! report (`--markdown FILE`):
//!
//! 1. `random`: N randomized Checks over gRPC at high concurrency. Each is generated with its
//!    expected verdict (the oracle is how it was made): valid tokens of four service accounts
//!    on allowed and not-allowed routes, expired, wrong audience, the seven forgery shapes,
//!    perfectly shaped forgeries, valid tokens with a swapped payload, malformed and
//!    oversized headers, paths with `//`, `.`/`..` segments, percent-encoding and `%2F`, and
//!    spoofed identity headers. Counts false allows (must be 0), false denies, UNAVAILABLE,
//!    and allows whose identity headers are not the token's.
//! 2. `flood`: the forged flood (unique forgeries of the seven shapes, all in flight) and the
//!    delayed-reset attack (unique perfectly shaped forgeries, each Check's stream reset after
//!    10 ms while the API server is slow): TokenReviews, RSS and in-flight reviews after.
//! 3. `idle`: idle TCP, half HTTP/2 prefaces and slowloris admin requests; how many are closed
//!    by the deadline, and whether Checks and `/healthz` are answered meanwhile.
//! 4. `faults`: an API-server fault cycle (latency above the timeout, 429 with `Retry-After`
//!    seconds and HTTP-date, 503 and 500 storms, closed and reset connections, hangs, down/up):
//!    cached callers' answers, new tokens' answers, API requests per new token, recovery time.
//! 5. `soak`: mixed load for a while, the config rewritten (and SIGHUP sent, when the build
//!    reloads) every `--reload-every`; RSS, FDs and threads sampled.
//!
//! ```text
//! reliability/run.sh            # builds, runs everything, rewrites RELIABILITY.md's figures
//! target/release/reliability --tokengate target/release/tokengate --checks 20000 --soak 20s
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use kube_standin::{Fault, MintRequest, Options, Standin};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokengate_bench::check::check_request_with;
use tokengate_bench::forge;
use tokengate_bench::gate::{free_ports, http_get, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

const AUD: &str = "data-store";
/// Service accounts of the valid tokens, and whether each may use the `data` route.
const ACCOUNTS: [(&str, &str); 4] = [
    ("api", "api"),
    ("api", "worker"),
    ("ops", "admin"),
    ("other", "intruder"),
];
/// Per-attempt TokenReview timeout and retries in the config (the fault cycle depends on them).
const REVIEW_TIMEOUT_MS: u64 = 1000;
const REVIEW_RETRIES: u32 = 2;
/// Connection deadlines in the config (the idle floods wait for them).
const HANDSHAKE_TIMEOUT_S: u64 = 2;
const ADMIN_HEADER_TIMEOUT_S: u64 = 2;

#[derive(Parser, Debug, Clone)]
#[command(about = "The reliability harness of RELIABILITY.md")]
struct Cli {
    /// The tokengate binary to measure.
    #[arg(long)]
    tokengate: PathBuf,
    /// Phases to run, comma-separated: random,flood,idle,faults,soak.
    #[arg(long, default_value = "random,flood,idle,faults,soak")]
    phases: String,
    /// Randomized Checks of phase 1.
    #[arg(long, default_value_t = 1_000_000)]
    checks: u64,
    /// Checks in flight at once (phase 1).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// gRPC connections the load is spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Forged Checks of the flood, all in flight at once.
    #[arg(long, default_value_t = 5000)]
    flood: usize,
    /// Checks of the delayed-reset attack.
    #[arg(long, default_value_t = 5000)]
    resets: usize,
    /// Idle TCP connections to the gRPC port (half as many half prefaces, a quarter as many
    /// slowloris admin requests are added).
    #[arg(long, default_value_t = 400)]
    idle: usize,
    /// How long each API fault lasts (e.g. 8s).
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    fault_window: Duration,
    /// API faults to cycle through, comma-separated:
    /// latency,429,429date,503,500,close,reset,hang,down.
    #[arg(
        long,
        default_value = "latency,429,429date,503,500,close,reset,hang,down"
    )]
    fault_kinds: String,
    /// Soak duration (e.g. 10m, 60s).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    soak: Duration,
    /// Soak: Checks per second (closed loop, paced).
    #[arg(long, default_value_t = 2000)]
    soak_rate: u64,
    /// Soak: config rewrite (+ SIGHUP) interval.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    reload_every: Duration,
    /// Seed of the random generator.
    #[arg(long, default_value_t = 12)]
    seed: u64,
    /// Write the Markdown report here (also printed).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    })
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

// ------------------------------------------------------------------ the process under test

/// Resources of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct Res {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

fn resources(pid: u32) -> Res {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    Res {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
    }
}

impl std::fmt::Display for Res {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB, {} FDs, {} threads",
            self.rss_kib as f64 / 1024.0,
            self.fds,
            self.threads
        )
    }
}

struct Gate {
    /// The process (killed on drop).
    child: Option<tokio::process::Child>,
    pid: u32,
    grpc: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    log: PathBuf,
    kubeconfig: PathBuf,
    issuer: String,
}

impl Gate {
    /// The config; `variant` changes only the cache TTL (a live-reloadable field), so every
    /// variant gives the same verdicts.
    fn render(&self, variant: u32) -> String {
        format!(
            "listen:
  grpc: {grpc}
  admin: {admin}
  limits:
    handshake_timeout: {HANDSHAKE_TIMEOUT_S}s
    idle_timeout: 20s
    keepalive_interval: 5s
    keepalive_timeout: 5s
  admin_limits:
    header_read_timeout: {ADMIN_HEADER_TIMEOUT_S}s
    idle_timeout: 10s
kubernetes:
  kubeconfig: \"{kc}\"
  timeout: {REVIEW_TIMEOUT_MS}ms
  retries: {REVIEW_RETRIES}
  max_in_flight: 64
  issuer: {issuer}
token_sources:
  - header: authorization
    scheme: Bearer
routes:
  - name: admin
    match:
      path_prefix: /admin/
    audiences: [{AUD}]
    allow:
      service_accounts: [ops/admin]
  - name: data
    audiences: [{AUD}]
    allow:
      namespaces: [api, ops]
cache:
  max_entries: 100000
  ttl: {ttl}s
  negative_ttl: 5s
log:
  level: warn
",
            grpc = self.grpc,
            admin = self.admin,
            kc = self.kubeconfig.display(),
            issuer = self.issuer,
            ttl = 60 + variant % 2,
        )
    }

    async fn start(bin: &Path, dir: &Path, kubeconfig: PathBuf, issuer: &str) -> Result<Gate> {
        let [g, a] = free_ports::<2>()?;
        let mut gate = Gate {
            child: None,
            pid: 0,
            grpc: SocketAddr::from(([127, 0, 0, 1], g)),
            admin: SocketAddr::from(([127, 0, 0, 1], a)),
            config_path: dir.join("tokengate.yaml"),
            log: dir.join("tokengate.log"),
            kubeconfig,
            issuer: issuer.to_owned(),
        };
        std::fs::write(&gate.config_path, gate.render(0))?;
        let out = std::fs::File::create(&gate.log)?;
        let child = tokio::process::Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&gate.config_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        gate.pid = child.id().unwrap_or(0);
        gate.child = Some(child);
        let started = Instant::now();
        loop {
            if !gate.alive() {
                bail!("tokengate exited:\n{}", gate.log_tail());
            }
            if let Ok((200, _)) = http_get(gate.admin, "/readyz").await {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("tokengate not ready in 30 s:\n{}", gate.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(gate)
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn res(&self) -> Res {
        resources(self.pid)
    }

    async fn metrics(&self) -> String {
        match http_get(self.admin, "/metrics").await {
            Ok((200, body)) => body,
            _ => String::new(),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |t| t.lines().count())
    }
}

async fn channels(grpc: SocketAddr, n: usize) -> Result<Vec<AuthorizationClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let ch = Endpoint::from_shared(format!("http://{grpc}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        out.push(AuthorizationClient::new(ch).max_decoding_message_size(16 << 20));
    }
    Ok(out)
}

// ------------------------------------------------------------------ answers

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Allowed, with the `x-k8s-sa-user` header sent upstream.
    Allow(String),
    /// Denied, with `x-tokengate-reason` and the HTTP status.
    Deny(String, i32),
    /// gRPC error code.
    Rpc(tonic::Code),
    /// No answer within the harness's limit.
    Timeout,
}

impl Answer {
    fn label(&self) -> String {
        match self {
            Answer::Allow(_) => "allow".into(),
            Answer::Deny(r, s) => format!("deny {s} {r}"),
            Answer::Rpc(c) => format!("grpc {c:?}"),
            Answer::Timeout => "no answer".into(),
        }
    }
}

fn answer(r: &CheckResponse) -> Answer {
    let header = |hs: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
                  name: &str| {
        hs.iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key.eq_ignore_ascii_case(name))
            .map(|h| {
                if h.value.is_empty() {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                } else {
                    h.value.clone()
                }
            })
    };
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            Answer::Allow(header(&ok.headers, "x-k8s-sa-user").unwrap_or_default())
        }
        Some(HttpResponse::DeniedResponse(d)) => Answer::Deny(
            header(&d.headers, "x-tokengate-reason").unwrap_or_else(|| "?".into()),
            d.status.as_ref().map_or(0, |s| s.code),
        ),
        _ => {
            if r.status.as_ref().is_some_and(|s| s.code == 0) {
                Answer::Allow(String::new())
            } else {
                Answer::Deny("?".into(), 0)
            }
        }
    }
}

async fn check(
    client: &AuthorizationClient<Channel>,
    req: CheckRequest,
    limit: Duration,
) -> Answer {
    match tokio::time::timeout(limit, client.clone().check(req)).await {
        Ok(Ok(r)) => answer(&r.into_inner()),
        Ok(Err(s)) => Answer::Rpc(s.code()),
        Err(_) => Answer::Timeout,
    }
}

fn simple_request(token: &str, path: &str) -> CheckRequest {
    check_request_with(token, AUD, path, "bench", true)
}

fn user(ns: &str, sa: &str) -> String {
    format!("system:serviceaccount:{ns}:{sa}")
}

// ------------------------------------------------------------------ phase 1: the generator

#[derive(Debug, Clone)]
enum Expect {
    Allow(String),
    Deny,
}

struct Pools {
    /// Valid tokens per account (index into ACCOUNTS).
    valid: Vec<Vec<String>>,
    expired: Vec<String>,
    wrong_aud: Vec<String>,
    /// Perfectly shaped forgeries (negative-cached after one TokenReview each).
    perfect: Vec<String>,
    /// Valid tokens of `other/intruder` with the payload swapped to `ops/admin`.
    swapped: Vec<String>,
    issuer: String,
}

impl Pools {
    fn build(standin: &Standin, issuer: &str, per_account: usize) -> Result<Pools> {
        let now = standin.now();
        let mut valid = Vec::new();
        for (ns, sa) in ACCOUNTS {
            let mut v = Vec::new();
            for i in 0..per_account {
                let mut m = MintRequest::new(ns, sa).audience(AUD);
                if i % 2 == 0 {
                    m = m.pod(&format!("{sa}-0"));
                }
                v.push(standin.mint(&m)?);
            }
            valid.push(v);
        }
        let mut expired = Vec::new();
        let mut wrong_aud = Vec::new();
        for i in 0..20 {
            let (ns, sa) = ACCOUNTS[i % 4];
            expired.push(
                standin.mint(
                    &MintRequest::new(ns, sa)
                        .audience(AUD)
                        .issued_at(now - 7200 - i as i64)
                        .expires_in(3600),
                )?,
            );
            wrong_aud.push(standin.mint(&MintRequest::new(ns, sa).audience("other-service"))?);
        }
        let kid = standin.signing_key_id();
        let perfect = (0..50u64)
            .map(|i| forge::perfect(i, &kid, issuer, AUD, now, "ops", "admin"))
            .collect();
        let swapped = valid[3]
            .iter()
            .take(20)
            .map(|t| {
                let mut c = forge::claims(t);
                c["sub"] = user("ops", "admin").into();
                if let Some(k) = c.get_mut("kubernetes.io") {
                    k["namespace"] = "ops".into();
                    k["serviceaccount"]["name"] = "admin".into();
                }
                forge::swap_payload(t, &c)
            })
            .collect();
        Ok(Pools {
            valid,
            expired,
            wrong_aud,
            perfect,
            swapped,
            issuer: issuer.to_owned(),
        })
    }
}

/// Canonical request paths and whether each is under the `admin` route's `/admin/`.
const TARGETS: [(&str, bool); 8] = [
    ("/admin/users", true),
    ("/admin/", true),
    ("/admin/a/b/c", true),
    ("/data/items/1", false),
    ("/", false),
    ("/admin", false),
    ("/administrator/x", false),
    ("/public/admin/", false),
];

/// `path` (canonical) disguised so that it canonicalizes back to itself.
fn obfuscate(rng: &mut StdRng, path: &str) -> String {
    let mut p = path.to_owned();
    for _ in 0..rng.random_range(0..3) {
        p = match rng.random_range(0..7) {
            0 => format!("/{p}"),
            1 => format!("/.{p}"),
            2 => format!("/zz/..{p}"),
            3 => format!("/..{p}"),
            4 => {
                // Percent-encode the first letter after a slash.
                match p
                    .char_indices()
                    .find(|(i, c)| *i > 0 && c.is_ascii_alphanumeric())
                {
                    Some((i, c)) if p.as_bytes()[i - 1] == b'/' => {
                        format!("{}%{:02X}{}", &p[..i], c as u32, &p[i + 1..])
                    }
                    _ => p,
                }
            }
            5 => {
                // Encode an inner slash as %2F (or %2f).
                match p[1..].find('/') {
                    Some(i) if i + 2 < p.len() => {
                        let enc = if rng.random_bool(0.5) { "%2F" } else { "%2f" };
                        format!("{}{enc}{}", &p[..i + 1], &p[i + 2..])
                    }
                    _ => p,
                }
            }
            _ => p.replacen('/', "//", 1),
        };
    }
    if rng.random_bool(0.2) {
        p.push_str("?next=/admin/&x=%2e%2e");
    }
    p
}

/// One generated Check: the request, its expected verdict and a kind for the tables.
fn generate(rng: &mut StdRng, pools: &Pools, n: u64) -> (CheckRequest, Expect, &'static str) {
    let (target, admin_route) = TARGETS[rng.random_range(0..TARGETS.len())];
    let path = obfuscate(rng, target);
    let mut expect = Expect::Deny;
    let pick = |rng: &mut StdRng, v: &[String]| v[rng.random_range(0..v.len())].clone();
    let roll = rng.random_range(0..100);
    let (kind, header): (&'static str, Option<String>) = match roll {
        0..=44 => {
            let a = rng.random_range(0..ACCOUNTS.len());
            let (ns, sa) = ACCOUNTS[a];
            let allowed = if admin_route {
                (ns, sa) == ("ops", "admin")
            } else {
                ns == "api" || ns == "ops"
            };
            if allowed {
                expect = Expect::Allow(user(ns, sa));
            }
            (
                if allowed {
                    "valid, allowed"
                } else {
                    "valid, not allowed"
                },
                Some(format!("Bearer {}", pick(rng, &pools.valid[a]))),
            )
        }
        45..=51 => (
            "expired",
            Some(format!("Bearer {}", pick(rng, &pools.expired))),
        ),
        52..=58 => (
            "wrong audience",
            Some(format!("Bearer {}", pick(rng, &pools.wrong_aud))),
        ),
        59..=70 => {
            let (_, t) = forge::forged(n as usize, now_unix(), &pools.issuer, AUD);
            ("forged shape (unique)", Some(format!("Bearer {t}")))
        }
        71..=75 => (
            "perfect forgery",
            Some(format!("Bearer {}", pick(rng, &pools.perfect))),
        ),
        76..=80 => (
            "swapped payload",
            Some(format!("Bearer {}", pick(rng, &pools.swapped))),
        ),
        81..=95 => {
            let good = pick(rng, &pools.valid[2]);
            let h = match rng.random_range(0..9) {
                0 => String::new(),
                1 => "Bearer".into(),
                2 => "Bearer ".into(),
                3 => format!("Bearer {good},Bearer {good}"),
                4 => format!("Bearer {good} {good}"),
                5 => format!("Basic {good}"),
                6 => format!("Bearer {}", "A".repeat(17 * 1024)),
                7 => {
                    let bytes: Vec<u8> = (0..rng.random_range(1..60))
                        .map(|_| rng.random_range(0x21..0x7f))
                        .collect();
                    format!("Bearer {}", String::from_utf8_lossy(&bytes))
                }
                _ => format!("Bearer {}é{}", &good[..10], &good[10..]),
            };
            ("malformed header", Some(h))
        }
        _ => ("missing token", None),
    };
    let mut req = check_request_with("", AUD, &path, "bench", true);
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        if let Some(h) = header {
            http.headers.insert("authorization".into(), h);
        }
        if rng.random_bool(0.3) {
            // Spoofed identity headers: must never reach the verdict or survive an allow.
            for (k, v) in [
                ("x-k8s-sa-user", user("ops", "admin")),
                ("x-k8s-sa-namespace", "ops".into()),
                ("x-k8s-sa-name", "admin".into()),
                ("x-forwarded-user", "admin".into()),
            ] {
                http.headers.insert(k.into(), v);
            }
        }
        http.method = ["GET", "POST", "DELETE"][rng.random_range(0..3)].into();
    }
    (req, expect, kind)
}

#[derive(Default)]
struct Tally {
    total: u64,
    false_allow: u64,
    false_deny: u64,
    wrong_identity: u64,
    unavailable: u64,
    other_error: u64,
    /// (kind, answer label) -> count.
    by_kind: BTreeMap<(&'static str, String), u64>,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn add(&mut self, kind: &'static str, expect: &Expect, got: &Answer, took: Duration) {
        self.total += 1;
        self.latencies_us
            .push(took.as_micros().min(u32::MAX as u128) as u32);
        match (expect, got) {
            (Expect::Allow(u), Answer::Allow(h)) => {
                if u != h {
                    self.wrong_identity += 1;
                }
            }
            (Expect::Deny, Answer::Allow(_)) => self.false_allow += 1,
            (Expect::Allow(_), Answer::Deny(..)) => self.false_deny += 1,
            (_, Answer::Rpc(tonic::Code::Unavailable)) => self.unavailable += 1,
            (_, Answer::Rpc(_) | Answer::Timeout) => self.other_error += 1,
            (Expect::Deny, Answer::Deny(..)) => {}
        }
        let label = match got {
            Answer::Allow(_) => "allow".to_owned(),
            other => other.label(),
        };
        *self.by_kind.entry((kind, label)).or_default() += 1;
    }

    fn merge(&mut self, o: Tally) {
        self.total += o.total;
        self.false_allow += o.false_allow;
        self.false_deny += o.false_deny;
        self.wrong_identity += o.wrong_identity;
        self.unavailable += o.unavailable;
        self.other_error += o.other_error;
        for (k, v) in o.by_kind {
            *self.by_kind.entry(k).or_default() += v;
        }
        self.latencies_us.extend(o.latencies_us);
    }

    fn quantile_ms(&mut self, q: f64) -> f64 {
        self.latencies_us.sort_unstable();
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// Runs `total` generated Checks with `workers` workers over `clients`; `pace` (if any) is
/// the interval each worker keeps between its Checks.
async fn random_load(
    clients: &[AuthorizationClient<Channel>],
    pools: Arc<Pools>,
    total: u64,
    workers: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    pace: Option<Duration>,
) -> Tally {
    let next = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers.max(1) {
        let client = clients[w % clients.len()].clone();
        let (pools, next, stop) = (pools.clone(), next.clone(), stop.clone());
        set.spawn(async move {
            let mut rng =
                StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(w as u64));
            let mut tally = Tally::default();
            let mut tick = pace.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let (req, expect, kind) = generate(&mut rng, &pools, n);
                let started = Instant::now();
                let got = check(&client, req, Duration::from_secs(15)).await;
                tally.add(kind, &expect, &got, started.elapsed());
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(t) = set.join_next().await {
        if let Ok(t) = t {
            all.merge(t);
        }
    }
    all
}

// ------------------------------------------------------------------ the report

struct Report {
    md: String,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        self.md.push_str(s.as_ref());
        self.md.push('\n');
        eprintln!("{}", s.as_ref());
    }
}

struct World {
    cli: Cli,
    standin: Standin,
    gate: Gate,
    pools: Arc<Pools>,
    clients: Vec<AuthorizationClient<Channel>>,
    report: Report,
    /// Fresh tokens minted so far (each new to tokengate).
    fresh: u64,
    /// Verdict failures that must fail the run (false allows, wrong identities).
    violations: u64,
}

impl World {
    fn fresh_token(&mut self) -> Result<String> {
        self.fresh += 1;
        self.standin
            .mint(&MintRequest::new("api", "api").audience(AUD))
    }

    fn reviews(&self) -> u64 {
        self.standin.token_reviews_served()
    }
}

// ------------------------------------------------------------------ phase 1

async fn phase_random(w: &mut World) -> Result<()> {
    let r0 = w.reviews();
    let res0 = w.gate.res();
    let started = Instant::now();
    let mut t = random_load(
        &w.clients,
        w.pools.clone(),
        w.cli.checks,
        w.cli.concurrency,
        w.cli.seed,
        Arc::new(AtomicBool::new(false)),
        None,
    )
    .await;
    let took = started.elapsed();
    let reviews = w.reviews() - r0;
    let res1 = w.gate.res();
    w.violations += t.false_allow + t.wrong_identity;
    let (p50, p99, pmax) = (t.quantile_ms(0.5), t.quantile_ms(0.99), t.quantile_ms(1.0));
    let rep = &mut w.report;
    rep.line("### 1. Randomized Checks\n");
    rep.line(format!(
        "{} Checks over {} connections, {} in flight, in {:.1} s ({:.0}/s); p50 {:.2} ms, p99 {:.2} ms, max {:.0} ms; {} TokenReviews.\n",
        t.total,
        w.clients.len(),
        w.cli.concurrency,
        took.as_secs_f64(),
        t.total as f64 / took.as_secs_f64(),
        p50,
        p99,
        pmax,
        reviews
    ));
    rep.line("| false allows | allows with another identity | false denies | UNAVAILABLE | other errors / no answer |");
    rep.line("|---|---|---|---|---|");
    rep.line(format!(
        "| **{}** | **{}** | {} | {} | {} |\n",
        t.false_allow, t.wrong_identity, t.false_deny, t.unavailable, t.other_error
    ));
    rep.line("| input kind | answer | Checks |");
    rep.line("|---|---|---|");
    for ((kind, label), n) in &t.by_kind {
        rep.line(format!("| {kind} | {label} | {n} |"));
    }
    rep.line(format!("\ntokengate before → after: {res0} → {res1}.\n"));
    Ok(())
}

// ------------------------------------------------------------------ phase 2

async fn phase_flood(w: &mut World) -> Result<()> {
    w.report
        .line("### 2. Forged flood and delayed-reset attack\n");
    // The forged flood: unique forgeries of the seven shapes, all in flight at once.
    let now = now_unix();
    let r0 = w.reviews();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..w.cli.flood {
        let client = w.clients[i % w.clients.len()].clone();
        let (shape, token) = forge::forged(i, now, &w.pools.issuer, AUD);
        set.spawn(async move {
            (
                shape,
                check(
                    &client,
                    simple_request(&token, "/data"),
                    Duration::from_secs(30),
                )
                .await,
            )
        });
    }
    let legit = w.fresh_token()?;
    let l0 = Instant::now();
    let legit_answer = check(
        &w.clients[0],
        simple_request(&legit, "/data"),
        Duration::from_secs(30),
    )
    .await;
    let legit_took = l0.elapsed();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut allowed = 0;
    while let Some(Ok((_, a))) = set.join_next().await {
        if matches!(a, Answer::Allow(_)) {
            allowed += 1;
        }
        *outcomes.entry(a.label()).or_default() += 1;
    }
    w.violations += allowed;
    let flood_time = started.elapsed();
    let reviews = w.reviews() - r0;
    let rep = &mut w.report;
    rep.line(format!(
        "Forged flood: {} unique forgeries (seven shapes) in flight at once: **{} TokenReview(s)** (the legitimate caller's included), {} allowed, answered in {:.2} s; a legitimate new caller during it: {} in {:.0} ms. Answers: {}.\n",
        w.cli.flood,
        reviews,
        allowed,
        flood_time.as_secs_f64(),
        legit_answer.label(),
        legit_took.as_secs_f64() * 1000.0,
        outcomes.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ")
    ));

    // Delayed reset: perfectly shaped unique forgeries (each costs a TokenReview), the API
    // server slow (300 ms), each Check's stream reset after 10 ms.
    let kid = w.standin.signing_key_id();
    let res0 = w.gate.res();
    let r0 = w.reviews();
    w.standin
        .set_fault(Fault::Latency(Duration::from_millis(300)));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let mut reset = 0u64;
    for i in 0..w.cli.resets {
        let permit = in_flight.clone().acquire_owned().await?;
        let client = w.clients[i % w.clients.len()].clone();
        let token = forge::perfect(
            1_000_000 + i as u64,
            &kid,
            &w.pools.issuer,
            AUD,
            now,
            "ops",
            "admin",
        );
        set.spawn(async move {
            let a = check(
                &client,
                simple_request(&token, "/admin/x"),
                Duration::from_millis(10),
            )
            .await;
            drop(permit);
            a
        });
        while let Some(Ok(a)) = set.try_join_next() {
            if a == Answer::Timeout {
                reset += 1;
            }
        }
    }
    while let Some(Ok(a)) = set.join_next().await {
        if a == Answer::Timeout {
            reset += 1;
        }
    }
    let sent_in = started.elapsed();
    let res_during = w.gate.res();
    // Reviews already started run to completion; wait for none in flight.
    let drain_start = Instant::now();
    let mut drained = None;
    while drain_start.elapsed() < Duration::from_secs(60) {
        let m = w.gate.metrics().await;
        if metric(&m, "tokengate_tokenreview_in_flight", &[]) == Some(0.0) {
            drained = Some(drain_start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.standin.set_fault(Fault::None);
    let reviews = w.reviews() - r0;
    let m = w.gate.metrics().await;
    let overloaded = metric(
        &m,
        "tokengate_tokenreview_errors_total",
        &[("kind", "overloaded")],
    )
    .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let res1 = w.gate.res();
    let legit = w.fresh_token()?;
    let l0 = Instant::now();
    let legit_answer = check(
        &w.clients[0],
        simple_request(&legit, "/data"),
        Duration::from_secs(10),
    )
    .await;
    let legit_took = l0.elapsed();
    let rep = &mut w.report;
    rep.line(format!(
        "Delayed reset: {} Checks with unique perfectly shaped forgeries, API server answering in 300 ms, each stream reset by the client after 10 ms ({} reset, the rest answered first), sent in {:.1} s: **{} TokenReviews** (at most `max_in_flight` = 64 at once; `overloaded` errors so far: {:.0}); reviews in flight back to 0 {} after the last reset; tokengate before → during → 1 s after: {res0} → {res_during} → {res1}; a legitimate new caller afterwards: {} in {:.0} ms.\n",
        w.cli.resets,
        reset,
        sent_in.as_secs_f64(),
        reviews,
        overloaded,
        drained.map_or("not within 60 s".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        legit_answer.label(),
        legit_took.as_secs_f64() * 1000.0,
    ));
    Ok(())
}

// ------------------------------------------------------------------ phase 3

/// Opens a connection to `addr`, sends `first` (and, if `trickle`, one header line every
/// 500 ms), and returns how long until the server closed it (None: still open at `limit`).
async fn held_connection(
    addr: SocketAddr,
    first: &'static [u8],
    trickle: bool,
    limit: Duration,
) -> Option<Option<Duration>> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let started = Instant::now();
    if !first.is_empty() && s.write_all(first).await.is_err() {
        return Some(Some(started.elapsed()));
    }
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Some(None);
        }
        let wait = if trickle {
            left.min(Duration::from_millis(500))
        } else {
            left
        };
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Some(started.elapsed())),
            Ok(Ok(_)) => {} // e.g. the server's SETTINGS; keep waiting for the close
            Err(_) if started.elapsed() >= limit => return Some(None),
            Err(_) => {
                if trickle && s.write_all(b"x-slow: 1\r\n").await.is_err() {
                    return Some(Some(started.elapsed()));
                }
            }
        }
    }
}

/// A connection flood: label, address, first bytes, trickle header lines, count, deadline (s).
type Flood = (&'static str, SocketAddr, &'static [u8], bool, usize, u64);

#[derive(Default)]
struct Closed {
    opened: u64,
    failed_to_open: u64,
    closed_by_deadline: u64,
    closed_early: u64,
    still_open: u64,
    max: Duration,
}

async fn phase_idle(w: &mut World) -> Result<()> {
    let limit = Duration::from_secs(HANDSHAKE_TIMEOUT_S.max(ADMIN_HEADER_TIMEOUT_S) + 3);
    let res0 = w.gate.res();
    let cached = w.pools.valid[0][0].clone();
    let floods: Vec<Flood> = vec![
        (
            "gRPC: idle TCP (nothing sent)",
            w.gate.grpc,
            b"".as_slice(),
            false,
            w.cli.idle,
            HANDSHAKE_TIMEOUT_S,
        ),
        (
            "gRPC: half HTTP/2 preface",
            w.gate.grpc,
            b"PRI * HTTP/2.0\r\n".as_slice(),
            false,
            w.cli.idle / 2,
            HANDSHAKE_TIMEOUT_S,
        ),
        (
            "admin: slowloris (a header line every 500 ms)",
            w.gate.admin,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n".as_slice(),
            true,
            (w.cli.idle / 4).max(1),
            ADMIN_HEADER_TIMEOUT_S,
        ),
    ];
    let mut sets = Vec::new();
    for (_, addr, first, trickle, n, _) in &floods {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..*n {
            set.spawn(held_connection(*addr, first, *trickle, limit));
        }
        sets.push(set);
    }
    // Meanwhile: a cached Check every 100 ms on an open channel, a new gRPC connection and
    // an admin /healthz every 500 ms.
    let probe_until = Instant::now() + limit;
    let (mut checks_ok, mut checks) = (0u64, 0u64);
    let (mut conns_ok, mut conns) = (0u64, 0u64);
    let (mut health_ok, mut health) = (0u64, 0u64);
    let mut res_max = Res::default();
    let mut i = 0u64;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while Instant::now() < probe_until {
        checks += 1;
        if matches!(
            check(
                &w.clients[0],
                simple_request(&cached, "/data"),
                Duration::from_secs(2)
            )
            .await,
            Answer::Allow(_)
        ) {
            checks_ok += 1;
        }
        if i.is_multiple_of(5) {
            conns += 1;
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_secs(2), channels(w.gate.grpc, 1)).await
            {
                if matches!(
                    check(
                        &c[0],
                        simple_request(&cached, "/data"),
                        Duration::from_secs(2)
                    )
                    .await,
                    Answer::Allow(_)
                ) {
                    conns_ok += 1;
                }
            }
            health += 1;
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(2), http_get(w.gate.admin, "/healthz"))
                    .await
            {
                health_ok += 1;
            }
            let r = w.gate.res();
            res_max.rss_kib = res_max.rss_kib.max(r.rss_kib);
            res_max.fds = res_max.fds.max(r.fds);
            res_max.threads = res_max.threads.max(r.threads);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut results = Vec::new();
    for ((label, _, _, _, _, deadline), mut set) in floods.into_iter().zip(sets) {
        let deadline = Duration::from_secs(deadline);
        let mut c = Closed::default();
        while let Some(Ok(r)) = set.join_next().await {
            match r {
                None => c.failed_to_open += 1,
                Some(None) => {
                    c.opened += 1;
                    c.still_open += 1
                }
                Some(Some(d)) => {
                    c.opened += 1;
                    c.max = c.max.max(d);
                    if d + Duration::from_millis(100) >= deadline {
                        c.closed_by_deadline += 1;
                    } else {
                        c.closed_early += 1;
                    }
                }
            }
        }
        results.push((label, deadline, c));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res1 = w.gate.res();
    let rep = &mut w.report;
    rep.line("### 3. Idle and slow connection floods\n");
    rep.line(format!(
        "All opened at once; deadlines in the config: gRPC `handshake_timeout` {HANDSHAKE_TIMEOUT_S} s, admin `header_read_timeout` {ADMIN_HEADER_TIMEOUT_S} s (admin `max_connections` 64).\n"
    ));
    rep.line("| flood | deadline | connected | closed at the deadline | closed sooner (over a cap) | still open after 5 s | last closed after |");
    rep.line("|---|---|---|---|---|---|---|");
    for (label, deadline, c) in &results {
        rep.line(format!(
            "| {label} | {} s | {} (+{} refused) | {} | {} | {} | {:.2} s |",
            deadline.as_secs(),
            c.opened,
            c.failed_to_open,
            c.closed_by_deadline,
            c.closed_early,
            c.still_open,
            c.max.as_secs_f64()
        ));
    }
    rep.line(format!(
        "\nDuring the floods: cached Checks on an open connection {checks_ok}/{checks} allowed; Checks on a new gRPC connection {conns_ok}/{conns}; admin `/healthz` {health_ok}/{health} answered 200. tokengate before → peak → after: {res0} → {res_max} → {res1}.\n"
    ));
    Ok(())
}

// ------------------------------------------------------------------ phase 4

struct FaultRow {
    name: &'static str,
    cached_ok: u64,
    cached: u64,
    new: u64,
    new_unavailable: u64,
    new_allow_after_clear: u64,
    new_allow_during: u64,
    new_deny: u64,
    new_other: u64,
    reviews: u64,
    recovery: Option<Duration>,
    new_latency_max: Duration,
}

async fn phase_faults(w: &mut World) -> Result<()> {
    let all: Vec<(&str, &'static str, Fault)> = vec![
        (
            "latency",
            "latency 1.5 s (timeout 1 s)",
            Fault::Latency(Duration::from_millis(1500)),
        ),
        (
            "429",
            "429, `Retry-After: 1`",
            Fault::Status {
                code: 429,
                retry_after: Some(1),
            },
        ),
        (
            "429date",
            "429, `Retry-After:` HTTP-date 2 s ahead",
            Fault::StatusRetryDate {
                code: 429,
                retry_after: 2,
            },
        ),
        (
            "503",
            "503 storm, `Retry-After: 1`",
            Fault::Status {
                code: 503,
                retry_after: Some(1),
            },
        ),
        (
            "500",
            "500 storm",
            Fault::Status {
                code: 500,
                retry_after: None,
            },
        ),
        (
            "close",
            "connections closed mid-request",
            Fault::CloseConnection,
        ),
        ("reset", "connections reset (TCP RST)", Fault::Reset),
        ("hang", "hang (never answers)", Fault::Hang),
        ("down", "down (not listening), then up", Fault::Down),
    ];
    let wanted: Vec<&str> = w.cli.fault_kinds.split(',').map(str::trim).collect();
    if let Some(bad) = wanted
        .iter()
        .find(|k| !all.iter().any(|(key, ..)| key == *k))
    {
        bail!("unknown fault kind {bad:?}");
    }
    let faults: Vec<(&'static str, Fault)> = all
        .into_iter()
        .filter(|(key, ..)| wanted.contains(key))
        .map(|(_, name, f)| (name, f))
        .collect();
    let mut rows = Vec::new();
    let limit = Duration::from_secs(20);
    for (name, fault) in faults {
        // Callers verified just before the fault: cached for `cache.ttl` (60 s), longer than
        // the fault (tokengate has no serve-stale: after the TTL they would need the API).
        let mut cached = Vec::new();
        for _ in 0..4 {
            let t = w.fresh_token()?;
            let a = check(
                &w.clients[0],
                simple_request(&t, "/data"),
                Duration::from_secs(5),
            )
            .await;
            anyhow::ensure!(
                matches!(a, Answer::Allow(_)),
                "warm-up before {name}: {a:?}"
            );
            cached.push(t);
        }
        let r0 = w.reviews();
        w.standin.set_fault(fault);
        let started = Instant::now();
        let cleared = Arc::new(Mutex::new(None::<Instant>));
        let mut set = tokio::task::JoinSet::new();
        let (mut cached_ok, mut cached_n) = (0, 0);
        let mut new_n = 0;
        while started.elapsed() < w.cli.fault_window {
            for t in &cached {
                cached_n += 1;
                let a = check(
                    &w.clients[1 % w.clients.len()],
                    simple_request(t, "/data"),
                    Duration::from_secs(2),
                )
                .await;
                if matches!(a, Answer::Allow(_)) {
                    cached_ok += 1;
                }
            }
            new_n += 1;
            let token = w.fresh_token()?;
            let client = w.clients[2 % w.clients.len()].clone();
            let cleared = cleared.clone();
            set.spawn(async move {
                let t0 = Instant::now();
                let a = check(&client, simple_request(&token, "/data"), limit).await;
                let after_clear = cleared.lock().map(|c| c.is_some()).unwrap_or(false);
                (a, after_clear, t0.elapsed())
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Clear the fault; recovery = until a new token is allowed.
        w.standin.set_fault(Fault::None);
        let clear_at = Instant::now();
        if let Ok(mut c) = cleared.lock() {
            *c = Some(clear_at);
        }
        let mut recovery = None;
        while clear_at.elapsed() < Duration::from_secs(30) {
            let token = w.fresh_token()?;
            if matches!(
                check(
                    &w.clients[3 % w.clients.len()],
                    simple_request(&token, "/data"),
                    Duration::from_secs(10)
                )
                .await,
                Answer::Allow(_)
            ) {
                recovery = Some(clear_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut row = FaultRow {
            name,
            cached_ok,
            cached: cached_n,
            new: new_n,
            new_unavailable: 0,
            new_allow_after_clear: 0,
            new_allow_during: 0,
            new_deny: 0,
            new_other: 0,
            reviews: 0,
            recovery,
            new_latency_max: Duration::ZERO,
        };
        while let Some(Ok((a, after_clear, took))) = set.join_next().await {
            row.new_latency_max = row.new_latency_max.max(took);
            match a {
                Answer::Rpc(tonic::Code::Unavailable) => row.new_unavailable += 1,
                Answer::Allow(_) if after_clear => row.new_allow_after_clear += 1,
                Answer::Allow(_) => row.new_allow_during += 1,
                Answer::Deny(..) => row.new_deny += 1,
                _ => row.new_other += 1,
            }
        }
        row.reviews = w.reviews() - r0;
        eprintln!("fault {name}: done");
        rows.push(row);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rep = &mut w.report;
    rep.line("### 4. API-server fault cycle\n");
    rep.line(format!(
        "Each fault lasts {:.0} s; `kubernetes.timeout` {REVIEW_TIMEOUT_MS} ms, `retries` {REVIEW_RETRIES}. Meanwhile four callers verified just before the fault (so cached) Check continuously and a never-seen valid token arrives every 200 ms. API requests per new token = TokenReviews the stand-in received during the fault and its recovery probe ÷ new tokens (a reset or refused connection never reaches it, so those rows count only what got through). Recovery = fault cleared → first new token allowed.\n",
        w.cli.fault_window.as_secs_f64()
    ));
    rep.line("| fault | cached callers allowed | new tokens: UNAVAILABLE | allowed (answer after the fault cleared) | allowed during the fault | denied | other | slowest new-token answer | API requests per new token | recovery |");
    rep.line("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        rep.line(format!(
            "| {} | {}/{} | {}/{} | {} | {} | {} | {} | {:.1} s | {:.1} | {} |",
            r.name,
            r.cached_ok,
            r.cached,
            r.new_unavailable,
            r.new,
            r.new_allow_after_clear,
            r.new_allow_during,
            r.new_deny,
            r.new_other,
            r.new_latency_max.as_secs_f64(),
            r.reviews as f64 / r.new.max(1) as f64,
            r.recovery.map_or("not within 30 s".into(), |d| format!(
                "{:.0} ms",
                d.as_secs_f64() * 1000.0
            )),
        ));
    }
    let denies: u64 = rows.iter().map(|r| r.new_deny).sum();
    rep.line(format!(
        "\nValid new tokens denied (401/403) during faults: **{denies}** (must be 0: an outage is UNAVAILABLE, never a verdict).\n"
    ));
    w.violations += denies;
    Ok(())
}

// ------------------------------------------------------------------ phase 5

async fn reload_counts(gate: &Gate) -> Option<(f64, f64)> {
    let m = gate.metrics().await;
    metric(&m, "tokengate_config_last_reload_success", &[])?;
    Some((
        metric(
            &m,
            "tokengate_config_reloads_total",
            &[("result", "success")],
        )
        .unwrap_or(0.0),
        metric(
            &m,
            "tokengate_config_reloads_total",
            &[("result", "failure")],
        )
        .unwrap_or(0.0),
    ))
}

async fn phase_soak(w: &mut World) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 32usize;
    let pace = Duration::from_secs_f64(workers as f64 / w.cli.soak_rate.max(1) as f64);
    let load = {
        let clients = w.clients.clone();
        let pools = w.pools.clone();
        let stop = stop.clone();
        let seed = w.cli.seed ^ 0x50a4;
        tokio::spawn(async move {
            random_load(&clients, pools, u64::MAX, workers, seed, stop, Some(pace)).await
        })
    };
    let supported = reload_counts(&w.gate).await.is_some();
    let res0 = w.gate.res();
    let log0 = w.gate.log_lines();
    let r0 = w.reviews();
    let started = Instant::now();
    let mut samples = vec![(Duration::ZERO, res0)];
    let mut next_reload = w.cli.reload_every;
    let mut next_sample = Duration::from_secs(5);
    let mut rewrites = 0u32;
    let mut fresh_ok = 0u64;
    let mut fresh_n = 0u64;
    let (mut reload_ok, mut reload_fail) = (0.0, 0.0);
    let base = reload_counts(&w.gate).await.unwrap_or((0.0, 0.0));
    let mut died = false;
    while started.elapsed() < w.cli.soak {
        // A never-seen token every 250 ms keeps TokenReviews going.
        fresh_n += 1;
        let token = w.fresh_token()?;
        if matches!(
            check(
                &w.clients[0],
                simple_request(&token, "/data"),
                Duration::from_secs(10)
            )
            .await,
            Answer::Allow(_)
        ) {
            fresh_ok += 1;
        }
        let t = started.elapsed();
        if t >= next_reload {
            rewrites += 1;
            std::fs::write(&w.gate.config_path, w.gate.render(rewrites))?;
            if supported {
                let _ = std::process::Command::new("kill")
                    .arg("-HUP")
                    .arg(w.gate.pid.to_string())
                    .status();
            }
            next_reload += w.cli.reload_every;
        }
        if t >= next_sample {
            samples.push((t, w.gate.res()));
            next_sample += Duration::from_secs(5);
        }
        if !w.gate.alive() {
            died = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut t: Tally = load.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some((ok, fail)) = reload_counts(&w.gate).await {
        reload_ok = ok - base.0;
        reload_fail = fail - base.1;
    }
    let res1 = w.gate.res();
    samples.push((started.elapsed(), res1));
    let max = samples.iter().fold(Res::default(), |m, (_, r)| Res {
        rss_kib: m.rss_kib.max(r.rss_kib),
        fds: m.fds.max(r.fds),
        threads: m.threads.max(r.threads),
    });
    // RSS after the first minute (warm) vs the end: the drift a leak would show.
    let warm = samples
        .iter()
        .find(|(t, _)| *t >= Duration::from_secs(60).min(w.cli.soak / 2))
        .map_or(res0, |(_, r)| *r);
    w.violations += t.false_allow + t.wrong_identity + u64::from(died);
    let took = started.elapsed();
    let log_lines = w.gate.log_lines() - log0;
    let reviews = w.reviews() - r0;
    let (p50, p99) = (t.quantile_ms(0.5), t.quantile_ms(0.99));
    let rep = &mut w.report;
    rep.line("### 5. Soak\n");
    rep.line(format!(
        "{:.0} s of randomized Checks (the generator of phase 1, 32 workers paced to {} Checks/s) plus a never-seen valid token every 250 ms; the config file rewritten every {} s ({} times, the cache TTL alternating 60 s / 61 s). Reload: {}.\n",
        took.as_secs_f64(),
        w.cli.soak_rate,
        w.cli.reload_every.as_secs(),
        rewrites,
        if supported {
            format!("SIGHUP sent each time; `tokengate_config_reloads_total` success +{reload_ok:.0}, failure +{reload_fail:.0}")
        } else {
            "unsupported by this build (no `tokengate_config_last_reload_success` metric; no SIGHUP sent)".into()
        }
    ));
    rep.line(format!(
        "{} Checks ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms; **{} false allows**, {} allows with another identity, {} false denies, {} UNAVAILABLE, {} other errors; never-seen tokens allowed {fresh_ok}/{fresh_n}; {reviews} TokenReviews; {log_lines} log lines; process {}.\n",
        t.total,
        t.total as f64 / took.as_secs_f64(),
        p50,
        p99,
        t.false_allow,
        t.wrong_identity,
        t.false_deny,
        t.unavailable,
        t.other_error,
        if died { "DIED" } else { "alive at the end" },
    ));
    rep.line("| | RSS | FDs | threads |");
    rep.line("|---|---|---|---|");
    for (label, r) in [
        ("start", res0),
        ("after warm-up", warm),
        ("end", res1),
        ("max", max),
    ] {
        rep.line(format!(
            "| {label} | {:.1} MiB | {} | {} |",
            r.rss_kib as f64 / 1024.0,
            r.fds,
            r.threads
        ));
    }
    rep.line("");
    Ok(())
}

// ------------------------------------------------------------------ main

async fn run(cli: Cli) -> Result<()> {
    let phases: Vec<String> = cli.phases.split(',').map(|s| s.trim().to_owned()).collect();
    let standin = Standin::start(Options::default()).await?;
    let issuer = Options::default().issuer;
    for (ns, sa) in ACCOUNTS {
        standin.create_service_account(ns, sa);
        standin.create_pod(ns, &format!("{sa}-0"), sa, Some("node-1"));
    }
    let pools = Arc::new(Pools::build(&standin, &issuer, 25)?);
    let dir = std::env::temp_dir().join(format!("reliability-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let gate = Gate::start(&cli.tokengate, &dir, standin.kubeconfig_path(), &issuer).await?;
    let clients = channels(gate.grpc, cli.connections).await?;
    let mut w = World {
        cli: cli.clone(),
        standin,
        gate,
        pools,
        clients,
        report: Report { md: String::new() },
        fresh: 0,
        violations: 0,
    };
    let res_start = w.gate.res();
    let started = Instant::now();
    for p in &phases {
        let t = Instant::now();
        match p.as_str() {
            "random" => phase_random(&mut w).await?,
            "flood" => phase_flood(&mut w).await?,
            "idle" => phase_idle(&mut w).await?,
            "faults" => phase_faults(&mut w).await?,
            "soak" => phase_soak(&mut w).await?,
            other => bail!("unknown phase {other:?} (random,flood,idle,faults,soak)"),
        }
        eprintln!("phase {p}: {:.1} s", t.elapsed().as_secs_f64());
        if !w.gate.alive() {
            bail!("tokengate died during {p}:\n{}", w.gate.log_tail());
        }
    }
    let res_end = w.gate.res();
    let total_reviews = w.reviews();
    let mut head = String::new();
    let _ = writeln!(
        head,
        "One tokengate process through all phases ({}; {:.0} s in all): {res_start} at the start, {res_end} at the end; {total_reviews} TokenReviews served by the stand-in; {} fresh tokens minted. Verdict violations (false allows, allows with another identity, valid tokens denied during faults): **{}**.\n",
        phases.join(", "),
        started.elapsed().as_secs_f64(),
        w.fresh,
        w.violations,
    );
    let md = format!("{head}\n{}", w.report.md);
    match &w.cli.markdown {
        Some(path) => std::fs::write(path, &md)?,
        None => println!("{md}"),
    }
    let violations = w.violations;
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
    if violations > 0 {
        bail!("{violations} verdict violations");
    }
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
