//! tokengate as a child process for the issue 9 measurements: its config, start-up (wait for
//! `/readyz`), the admin port (`/metrics`), its memory (`/proc/PID/status`) and stop.
//!
//! The measurements run the release binary as a process, as in production, so its RSS and
//! CPU are its own and not mixed with the stand-in's or the client's.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// `kubernetes.verification` of the bench route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every cache miss asks TokenReview.
    TokenReview,
    /// Signature, claims and bound objects checked locally (watch caches + JWKS).
    Local,
}

impl Mode {
    /// The config value (`tokenreview` | `local`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::TokenReview => "tokenreview",
            Mode::Local => "local",
        }
    }

    /// Parses a comma-separated list such as `tokenreview,local`.
    pub fn parse_list(s: &str) -> Result<Vec<Mode>> {
        s.split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| match m {
                "tokenreview" => Ok(Mode::TokenReview),
                "local" => Ok(Mode::Local),
                other => bail!("mode {other:?}: expected tokenreview or local"),
            })
            .collect()
    }
}

/// What differs between the tokengate instances of the measurements.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// gRPC listener.
    pub grpc: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// The reviewer's kubeconfig (the stand-in's `kubeconfig`).
    pub kubeconfig: PathBuf,
    /// `kubernetes.verification`.
    pub mode: Mode,
    /// `kubernetes.watch` (local mode implies it; written out either way).
    pub watch: bool,
    /// `kubernetes.max_staleness` (written only in local mode).
    pub max_staleness: String,
    /// `cache.ttl`.
    pub ttl: String,
    /// The bench route's audience.
    pub audience: String,
}

impl GateConfig {
    /// Config for free loopback ports, `mode`, watch on, cache TTL 10 minutes (issue 9's
    /// revocation setting).
    pub fn new(kubeconfig: &Path, mode: Mode, audience: &str) -> Result<GateConfig> {
        let [grpc, admin] = free_ports::<2>()?;
        Ok(GateConfig {
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            kubeconfig: kubeconfig.to_path_buf(),
            mode,
            watch: true,
            max_staleness: "5m".into(),
            ttl: "10m".into(),
            audience: audience.into(),
        })
    }

    /// The YAML file.
    pub fn render(&self) -> String {
        let mut k = String::new();
        let _ = writeln!(k, "  kubeconfig: \"{}\"", self.kubeconfig.display());
        k.push_str("  timeout: 2s\n  retries: 0\n  max_in_flight: 64\n");
        let _ = writeln!(k, "  verification: {}", self.mode.as_str());
        let _ = writeln!(k, "  watch: {}", self.watch);
        if self.mode == Mode::Local {
            let _ = writeln!(k, "  max_staleness: {}", self.max_staleness);
        }
        format!(
            "listen:\n  grpc: {grpc}\n  admin: {admin}\nkubernetes:\n{k}\
             token_sources:\n  - header: authorization\n    scheme: Bearer\n\
             routes:\n  - name: bench\n    match:\n      context_extensions: {{route: bench}}\n    audiences: [{aud}]\n\
             cache:\n  max_entries: 100000\n  ttl: {ttl}\n  negative_ttl: 5s\n\
             log:\n  format: text\n  level: warn\n",
            grpc = self.grpc,
            admin = self.admin,
            aud = self.audience,
            ttl = self.ttl,
        )
    }
}

/// `n` distinct free loopback ports (all held until chosen).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let mut out = [0u16; N];
    for (o, l) in out.iter_mut().zip(&listeners) {
        *o = l.local_addr()?.port();
    }
    Ok(out)
}

/// The tokengate binary: `explicit`, else `tokengate` next to this executable
/// (`target/release/`).
pub fn tokengate_bin(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no parent of the current executable")?
            .join("tokengate"),
    };
    anyhow::ensure!(
        path.is_file(),
        "tokengate binary not found at {} (cargo build --release -p tokengate, or --tokengate)",
        path.display()
    );
    Ok(path)
}

/// A running tokengate process; killed when dropped.
pub struct Gate {
    child: Child,
    /// Its config.
    pub config: GateConfig,
    /// Its log file (stdout + stderr).
    pub log: PathBuf,
}

/// Memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS).
    pub hwm_kib: u64,
}

impl Gate {
    /// Spawns tokengate with `config` (written to `dir/NAME.yaml`, log `dir/NAME.log`) and
    /// returns once its admin port answers `/healthz`; [`Gate::wait_ready`] waits for `/readyz`.
    pub async fn spawn(bin: &Path, dir: &Path, name: &str, config: GateConfig) -> Result<Gate> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join(format!("{name}.yaml"));
        std::fs::write(&conf, config.render())?;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut gate = Gate { child, config, log };
        gate.wait_for("/healthz", Duration::from_secs(30)).await?;
        Ok(gate)
    }

    /// [`Gate::spawn`] then [`Gate::wait_ready`].
    pub async fn start(bin: &Path, dir: &Path, name: &str, config: GateConfig) -> Result<Gate> {
        let mut gate = Gate::spawn(bin, dir, name, config).await?;
        gate.wait_ready(Duration::from_secs(300)).await?;
        Ok(gate)
    }

    /// Waits until `/readyz` answers 200 (with watch on: after the first lists and JWKS).
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Duration> {
        self.wait_for("/readyz", limit).await
    }

    async fn wait_for(&mut self, path: &str, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "tokengate exited ({status}) before {path} answered 200:\n{}",
                    self.log_tail()
                );
            }
            if let Ok((200, _)) = http_get(self.config.admin, path).await {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!(
                    "tokengate: {path} not 200 within {limit:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The gRPC endpoint as a URI.
    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.config.grpc)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Current and peak RSS.
    pub fn memory(&self) -> Result<Memory> {
        memory(self.pid())
    }

    /// CPU time used so far (user + system), from `/proc/PID/stat`.
    pub fn cpu(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(self.config.admin, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// Kills the process and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// The last lines of the log, for errors.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// `VmRSS` and `VmHWM` of `pid`.
pub fn memory(pid: u32) -> Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_status(&text))
}

fn parse_status(text: &str) -> Memory {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

/// utime + stime of `pid`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // CLK_TCK is 100 on every Linux we run on.
    Ok(Duration::from_millis(ticks * 10))
}

/// GET `path` on `addr` over plain HTTP/1.1; (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sum of the samples of metric `name` whose labels include every `labels` pair; `None` when
/// no sample matches (a metric that does not exist must not read as 0).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // a longer name with this prefix
        };
        if !labels
            .iter()
            .all(|(k, v)| label_part.split(',').any(|p| p == format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The `{label="..."}` values of `name` with their sample values (e.g. reasons of a counter).
pub fn metric_by_label(text: &str, name: &str, label: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let key = format!("{label}=\"");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Some(v) = labels
            .split(',')
            .find_map(|p| p.strip_prefix(&key))
            .map(|v| v.trim_end_matches('"').to_string())
        else {
            continue;
        };
        if let Some(x) = value.split_whitespace().next().and_then(|x| x.parse().ok()) {
            out.push((v, x));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x\n\
        tokengate_watch_objects{kind=\"pod\"} 100000\n\
        tokengate_watch_objects{kind=\"serviceaccount\"} 10011\n\
        tokengate_watch_objects_total 3\n\
        tokengate_tokenreview_duration_seconds_count 12\n\
        tokengate_local_fallbacks_total{reason=\"unknown_object\"} 2\n\
        tokengate_local_fallbacks_total{reason=\"legacy\"} 1\n";

    #[test]
    fn metrics_by_name_and_labels() {
        assert_eq!(
            metric(TEXT, "tokengate_watch_objects", &[("kind", "pod")]),
            Some(100000.0)
        );
        assert_eq!(metric(TEXT, "tokengate_watch_objects", &[]), Some(110011.0));
        assert_eq!(
            metric(TEXT, "tokengate_tokenreview_duration_seconds_count", &[]),
            Some(12.0)
        );
        assert_eq!(metric(TEXT, "tokengate_revocations_total", &[]), None);
        assert_eq!(
            metric_by_label(TEXT, "tokengate_local_fallbacks_total", "reason"),
            vec![("unknown_object".into(), 2.0), ("legacy".into(), 1.0)]
        );
    }

    #[test]
    fn status_and_config() {
        let m = parse_status("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n");
        assert_eq!((m.rss_kib, m.hwm_kib), (1024, 2048));
        let mut c = GateConfig::new(Path::new("/k"), Mode::Local, "aud").unwrap();
        let y = c.render();
        assert!(
            y.contains("verification: local\n  watch: true\n  max_staleness: 5m"),
            "{y}"
        );
        assert!(
            y.contains("ttl: 10m") && y.contains("audiences: [aud]"),
            "{y}"
        );
        c.mode = Mode::TokenReview;
        c.watch = false;
        let y = c.render();
        assert!(
            y.contains("verification: tokenreview\n  watch: false\n"),
            "{y}"
        );
        assert!(!y.contains("max_staleness"), "{y}");
        assert_eq!(
            Mode::parse_list("tokenreview, local").unwrap(),
            vec![Mode::TokenReview, Mode::Local]
        );
        assert!(Mode::parse_list("tr").is_err());
    }
}
