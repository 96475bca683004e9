//! Configuration reload: the file is re-read when it changes and on SIGHUP, and what can
//! change live is swapped whole ([`Checker::reconfigure`]); a file that is invalid, or that
//! changes what only a restart can apply, leaves the running configuration in place and says
//! why (a warning with the same problem list `check-config` prints, and
//! `tokengate_config_last_reload_success` 0).
//!
//! Live: `routes`, `token_sources`, `cache`, `identity_headers`. Restart only: `listen`
//! (sockets, TLS, limits, drain delay), `kubernetes` (the API connection, watches and keys run
//! as background tasks built at start-up, and whether they run depends on the routes'
//! verification), `log`, and any section added later unless it is listed in [`LIVE`] and
//! [`Checker::reconfigure`] applies it. A reload is all or nothing: the running
//! configuration is always one whole file's, so a refused reload keeps the old routes even if
//! only `listen` was wrong.
//!
//! Change detection polls: every interval the file is read (through its path, so a
//! Kubernetes ConfigMap volume's `..data` symlink swap is followed, as is an editor's
//! rename-over) and compared with the last bytes seen; a change is applied once two reads a
//! moment apart agree (a file being written in place settles first). Reading a few KB every
//! few seconds is negligible, and unlike an inotify watch it needs no re-arming when a
//! symlink or the file itself is replaced.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::check::{CacheFate, Checker};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;

/// Default interval of the file poll (`serve --watch-config`).
pub const DEFAULT_POLL: Duration = Duration::from_secs(5);
/// How long a changed file must stay the same before it is applied.
const SETTLE: Duration = Duration::from_millis(200);
/// Most settle rounds before a file that keeps changing is tried anyway.
const SETTLE_ROUNDS: usize = 10;

/// The sections a reload applies; everything else needs a restart.
pub const LIVE: [&str; 4] = ["routes", "token_sources", "cache", "identity_headers"];

/// Where and when the configuration is re-read.
#[derive(Debug, Clone)]
pub struct Source {
    /// The configuration file (re-resolved on every read).
    pub path: PathBuf,
    /// Poll interval; `None`: only SIGHUP reloads.
    pub poll_every: Option<Duration>,
    /// Reload on SIGHUP (Unix).
    pub on_sighup: bool,
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The file could not be read or is invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The file changes settings a running server cannot swap.
    #[error("{} changed; {} only applied at start-up (restart tokengate), the rest of the file is not applied either", .0.join(", "), if .0.len() == 1 { "it is" } else { "they are" })]
    NeedsRestart(Vec<&'static str>),
    /// Building the new snapshot failed.
    #[error(transparent)]
    Setup(#[from] crate::Error),
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The file differs only in ways that do not change the configuration (comments, order
    /// of keys, defaults spelled out).
    Unchanged,
    /// These live sections changed; the verdict cache was kept or emptied.
    Changed {
        /// Names of the sections that changed (from [`LIVE`]).
        sections: Vec<&'static str>,
        /// What happened to the cache.
        cache: CacheFate,
    },
}

/// `Debug` text equality: compares every field, including fields other sections add later,
/// without each section type deriving `PartialEq`; no section holds a hash map, so the text
/// is deterministic.
fn same(a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The live sections that differ between `running` and `new`.
fn live_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let pairs: [(&'static str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 4] = [
        ("routes", &running.routes, &new.routes),
        ("token_sources", &running.token_sources, &new.token_sources),
        ("cache", &running.cache, &new.cache),
        (
            "identity_headers",
            &running.identity_headers,
            &new.identity_headers,
        ),
    ];
    pairs
        .into_iter()
        .filter(|(_, a, b)| !same(*a, *b))
        .map(|(name, _, _)| name)
        .collect()
}

/// The restart-only settings that differ between `running` and `new`, by section.
pub fn restart_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if !same(&running.listen, &new.listen) {
        changed.push("listen");
    }
    if !same(&running.kubernetes, &new.kubernetes) {
        changed.push("kubernetes");
    }
    if !same(&running.log, &new.log) {
        changed.push("log");
    }
    // A section nobody taught the reload about counts as restart-only.
    let mut rest = new.clone();
    rest.routes = running.routes.clone();
    rest.token_sources = running.token_sources.clone();
    rest.cache = running.cache.clone();
    rest.identity_headers = running.identity_headers.clone();
    if changed.is_empty() && !same(running, &rest) {
        changed.push("other settings");
    }
    changed
}

/// Parses `text` (read from `path`) and applies it to `checker` if it may be.
pub fn apply(checker: &Checker, path: &std::path::Path, text: &str) -> Result<Applied, Refused> {
    let new = Config::from_yaml_str(text).map_err(|e| match e {
        ConfigError::Invalid { errors, .. } => ConfigError::Invalid {
            file: Some(path.to_owned()),
            errors,
        },
        other => other,
    })?;
    let running = checker.snapshot();
    let running = running.config();
    let restart = restart_changes(running, &new);
    if !restart.is_empty() {
        return Err(Refused::NeedsRestart(restart));
    }
    let sections = live_changes(running, &new);
    if sections.is_empty() {
        return Ok(Applied::Unchanged);
    }
    let cache = checker.reconfigure(&new)?;
    Ok(Applied::Changed { sections, cache })
}

/// Why a reload was attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The poll saw new bytes.
    Changed,
    /// SIGHUP.
    Hangup,
}

/// The task that re-reads `source` on change and on SIGHUP until `stop` completes, applying
/// each valid file to `checker` and recording every attempt in `metrics` and the log. SIGHUP
/// is listened for from this call on (not from the task's first poll), so a signal sent once
/// `serve` is up is never the default action, which would end the process.
pub fn run(
    source: Source,
    checker: Arc<Checker>,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let hangup = hangups(source.on_sighup);
    watch(source, hangup, checker, metrics, stop)
}

async fn watch(
    source: Source,
    mut hangup: Hangups,
    checker: Arc<Checker>,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(stop);
    let mut poll = source.poll_every.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    tracing::info!(
        path = %source.path.display(),
        poll_every = ?source.poll_every,
        sighup = source.on_sighup,
        "configuration reload on"
    );
    // The bytes the last attempt read. `None` at first: the first poll compares the file with
    // the running configuration (the file may have changed since it was loaded), silently.
    let mut seen: Option<Result<Vec<u8>, String>> = None;
    loop {
        let trigger = tokio::select! {
            () = &mut stop => return,
            Some(()) = recv(&mut hangup) => Trigger::Hangup,
            _ = tick(&mut poll) => Trigger::Changed,
        };
        let mut read = read(&source.path).await;
        if trigger == Trigger::Changed {
            if seen.as_ref() == Some(&read) {
                continue;
            }
            read = settle(&source.path, read).await;
        }
        let first = seen.is_none();
        seen = Some(read.clone());
        let outcome = match read {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => apply(&checker, &source.path, &text),
                Err(_) => Err(Refused::Invalid(ConfigError::Read {
                    path: source.path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
                })),
            },
            Err(e) => Err(Refused::Invalid(ConfigError::Read {
                path: source.path.clone(),
                source: std::io::Error::other(e),
            })),
        };
        if first && trigger == Trigger::Changed && matches!(outcome, Ok(Applied::Unchanged)) {
            continue;
        }
        report(&source, trigger, &outcome, &metrics);
    }
}

/// Logs and counts one attempt.
fn report(source: &Source, trigger: Trigger, outcome: &Result<Applied, Refused>, m: &Metrics) {
    let path = source.path.display();
    let trigger = match trigger {
        Trigger::Changed => "file changed",
        Trigger::Hangup => "SIGHUP",
    };
    match outcome {
        Ok(Applied::Unchanged) => {
            tracing::info!(%path, trigger, "configuration reloaded: nothing that matters changed");
        }
        Ok(Applied::Changed { sections, cache }) => {
            let cache = match cache {
                CacheFate::Kept => "kept",
                CacheFate::Emptied => "emptied",
            };
            tracing::info!(%path, trigger, changed = %sections.join(","), cache, "configuration reloaded");
        }
        Err(e) => {
            tracing::warn!(%path, trigger, "configuration reload refused, the running configuration stays: {e}");
        }
    }
    m.config_reloaded(outcome.is_ok());
}

/// Reads the file whole; an error as text (compared across polls so a missing file is
/// reported once).
async fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    tokio::fs::read(path).await.map_err(|e| e.to_string())
}

/// Re-reads until two reads [`SETTLE`] apart agree (or [`SETTLE_ROUNDS`] pass).
async fn settle(
    path: &std::path::Path,
    mut read: Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    for _ in 0..SETTLE_ROUNDS {
        tokio::time::sleep(SETTLE).await;
        let again = self::read(path).await;
        if again == read {
            break;
        }
        read = again;
    }
    read
}

async fn tick(poll: &mut Option<tokio::time::Interval>) {
    match poll {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

#[cfg(unix)]
fn hangups(on: bool) -> Hangups {
    if !on {
        return None;
    }
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP; reloads follow the file only: {e}");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangups(_: bool) -> Hangups {
    None
}

/// The next SIGHUP; never, when not listening.
async fn recv(hangup: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = hangup {
        return s.recv().await;
    }
    let _ = hangup;
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "routes:\n  - name: a\n    audiences: [a]\n";

    #[test]
    fn restart_only_sections_are_named() {
        let running = Config::from_yaml_str(BASE).unwrap();
        let moved =
            Config::from_yaml_str(&format!("listen: {{grpc: 127.0.0.1:7000}}\n{BASE}")).unwrap();
        assert_eq!(restart_changes(&running, &moved), ["listen"]);
        let both = Config::from_yaml_str(&format!(
            "listen: {{grpc: 127.0.0.1:7000}}\nkubernetes: {{retries: 5}}\nlog: {{level: debug}}\n{BASE}"
        ))
        .unwrap();
        assert_eq!(
            restart_changes(&running, &both),
            ["listen", "kubernetes", "log"]
        );
        // A route turning to local verification starts watches: a restart.
        let local = Config::from_yaml_str(&format!("{BASE}    verification: local\n")).unwrap();
        assert_eq!(restart_changes(&running, &local), ["kubernetes"]);
    }

    #[test]
    fn live_sections_are_named() {
        let running = Config::from_yaml_str(BASE).unwrap();
        let new = Config::from_yaml_str(&format!(
            "{BASE}    allow: {{namespaces: [x]}}\ncache: {{ttl: 10s}}\n"
        ))
        .unwrap();
        assert!(restart_changes(&running, &new).is_empty());
        assert_eq!(live_changes(&running, &new), ["routes", "cache"]);
        // Comments and spelled-out defaults change nothing.
        let same = Config::from_yaml_str(&format!(
            "# a comment\ntoken_sources: [{{header: authorization, scheme: Bearer}}]\n{BASE}"
        ))
        .unwrap();
        assert!(live_changes(&running, &same).is_empty());
        assert!(restart_changes(&running, &same).is_empty());
    }

    #[test]
    fn needs_restart_says_what() {
        let e = Refused::NeedsRestart(vec!["listen"]);
        assert_eq!(
            e.to_string(),
            "listen changed; it is only applied at start-up (restart tokengate), the rest of the file is not applied either"
        );
    }
}
