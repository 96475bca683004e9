//! YAML configuration: parsed once, at the edge, into a typed and validated [`Config`].
//!
//! Parsing is two passes. serde (with `deny_unknown_fields`) turns the text into raw structs
//! whose interesting fields are [`Spanned`] so they remember their line; then `validate`
//! checks every field and collects *all* problems, each naming the field path and the line, so
//! an operator fixes a file in one round (`tokengate check-config FILE`). Every default lives in
//! [`defaults`], and nowhere else.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// Every default value of the configuration, in one place (the README's reference mirrors it).
pub mod defaults {
    /// gRPC listen address (ext_authz Check and grpc.health.v1).
    pub const LISTEN_GRPC: &str = "0.0.0.0:9001";
    /// Admin HTTP listen address (`/healthz`, `/readyz`, `/metrics`).
    pub const LISTEN_ADMIN: &str = "0.0.0.0:9090";
    /// Timeout of one TokenReview attempt.
    pub const KUBE_TIMEOUT: &str = "2s";
    /// Extra TokenReview attempts on transient failures.
    pub const KUBE_RETRIES: u32 = 2;
    /// Cap on concurrent TokenReviews.
    pub const KUBE_MAX_IN_FLIGHT: usize = 64;
    /// Token source used when `token_sources` is absent: `Authorization: Bearer`.
    pub const TOKEN_HEADER: &str = "authorization";
    /// Scheme of the default token source.
    pub const TOKEN_SCHEME: &str = "Bearer";
    /// HTTP status for invalid tokens.
    pub const INVALID_TOKEN_STATUS: u16 = 403;
    /// Cache capacity (entries).
    pub const CACHE_MAX_ENTRIES: usize = 100_000;
    /// Positive cache TTL (also capped by the token's `exp`).
    pub const CACHE_TTL: &str = "60s";
    /// Negative cache TTL (`authenticated: false` answers).
    pub const CACHE_NEGATIVE_TTL: &str = "5s";
    /// Identity header names.
    pub const HEADER_USER: &str = "x-k8s-sa-user";
    /// See [`HEADER_USER`].
    pub const HEADER_NAMESPACE: &str = "x-k8s-sa-namespace";
    /// See [`HEADER_USER`].
    pub const HEADER_NAME: &str = "x-k8s-sa-name";
    /// See [`HEADER_USER`].
    pub const HEADER_UID: &str = "x-k8s-sa-uid";
    /// See [`HEADER_USER`].
    pub const HEADER_GROUPS: &str = "x-k8s-sa-groups";
    /// See [`HEADER_USER`].
    pub const HEADER_POD_NAME: &str = "x-k8s-pod-name";
    /// See [`HEADER_USER`].
    pub const HEADER_POD_UID: &str = "x-k8s-pod-uid";
    /// Log level (an `EnvFilter` directive).
    pub const LOG_LEVEL: &str = "info";
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen addresses.
    pub listen: Listen,
    /// How to reach the Kubernetes API server.
    pub kubernetes: Kubernetes,
    /// Where tokens are looked for, in order.
    pub token_sources: Vec<TokenSource>,
    /// Routes, first match wins.
    pub routes: Vec<RouteConfig>,
    /// TokenReview result cache.
    pub cache: CacheConfig,
    /// Names of the identity headers sent upstream.
    pub identity_headers: IdentityHeaders,
    /// Logging.
    pub log: LogConfig,
}

/// Listen addresses.
#[derive(Debug, Clone)]
pub struct Listen {
    /// Envoy ext_authz gRPC and grpc.health.v1: `IP:port` or `unix:/path/to/socket`.
    pub grpc: GrpcAddr,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin: SocketAddr,
}

/// Where the gRPC server listens: a TCP address or a Unix domain socket (a sidecar Envoy in
/// the same pod can reach tokengate through a socket on a shared volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcAddr {
    /// `IP:port`.
    Tcp(SocketAddr),
    /// `unix:/path/to/socket`: the socket file's path.
    Unix(std::path::PathBuf),
}

impl fmt::Display for GrpcAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrpcAddr::Tcp(a) => write!(f, "{a}"),
            GrpcAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Kubernetes API connection and TokenReview limits.
#[derive(Debug, Clone)]
pub struct Kubernetes {
    /// Kubeconfig file; `None` means in-cluster, then kube's usual `KUBECONFIG` inference.
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context; `None` means the current context.
    pub context: Option<String>,
    /// Timeout of one TokenReview attempt.
    pub timeout: Duration,
    /// Extra attempts on connect errors, timeouts, 5xx and 429.
    pub retries: u32,
    /// Cap on TokenReviews in flight.
    pub max_in_flight: usize,
}

/// One place a token may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    /// Header name, lower-case.
    pub header: String,
    /// Required auth scheme (`Bearer`), compared case-insensitively; `None` = the whole value.
    pub scheme: Option<String>,
}

/// One route as configured.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name, used in logs and metrics.
    pub name: String,
    /// Conditions; `None` matches every request (a default route).
    pub matcher: Option<MatchConfig>,
    /// Audiences sent in TokenReview `spec.audiences`.
    pub audiences: Vec<String>,
    /// Allow-list; `None` admits any authenticated service account.
    pub allow: Option<AllowConfig>,
    /// Remove the token's header before the request goes upstream.
    pub strip_token: bool,
    /// 403 or 401 for invalid tokens.
    pub invalid_token_status: u16,
}

/// Route conditions; all given conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct MatchConfig {
    /// Envoy per-route `context_extensions` entries that must be present with these values.
    pub context_extensions: BTreeMap<String, String>,
    /// Hosts, exact or `*.suffix`, lower-case; empty means any host.
    pub hosts: Vec<String>,
    /// Path prefix (query string ignored).
    pub path_prefix: Option<String>,
    /// Methods, upper-case; empty means any method.
    pub methods: Vec<String>,
}

/// Allow-list: a caller is admitted if *any* entry of *any* list matches.
#[derive(Debug, Clone, Default)]
pub struct AllowConfig {
    /// `namespace/name`, each side may use `*` wildcards.
    pub service_accounts: Vec<String>,
    /// Namespaces.
    pub namespaces: Vec<String>,
    /// Groups.
    pub groups: Vec<String>,
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Capacity in entries.
    pub max_entries: usize,
    /// Positive TTL (also capped by the token's `exp`); zero disables positive caching.
    pub ttl: Duration,
    /// Negative TTL; zero disables negative caching.
    pub negative_ttl: Duration,
}

/// Identity header names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    /// `system:serviceaccount:ns:name`.
    pub user: String,
    /// Namespace.
    pub namespace: String,
    /// Service-account name.
    pub name: String,
    /// Service-account UID.
    pub uid: String,
    /// Groups, comma-joined.
    pub groups: String,
    /// Pod name (pod-bound tokens).
    pub pod_name: String,
    /// Pod UID (pod-bound tokens).
    pub pod_uid: String,
}

impl IdentityHeaders {
    /// All names, in a fixed order.
    pub fn all(&self) -> [&str; 7] {
        [
            &self.user,
            &self.namespace,
            &self.name,
            &self.uid,
            &self.groups,
            &self.pod_name,
            &self.pod_uid,
        ]
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Format.
    pub format: LogFormat,
    /// `EnvFilter` directive, e.g. `info` or `tokengate=debug,info`.
    pub level: String,
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field path, e.g. `routes[0].audiences`.
    pub field: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is invalid; every problem found is listed.
    #[error("invalid configuration{}:{}", source_name(.file), list(.errors))]
    Invalid {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        /// All problems, in file order.
        errors: Vec<FieldError>,
    },
}

fn source_name(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

fn list(errors: &[FieldError]) -> String {
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

impl ConfigError {
    /// The individual problems (empty for read errors).
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { errors, .. } => errors,
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml_str(&text).map_err(|e| match e {
            ConfigError::Invalid { errors, .. } => ConfigError::Invalid {
                file: Some(path.to_owned()),
                errors,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(text).map_err(|e| ConfigError::Invalid {
            file: None,
            errors: vec![e],
        })?;
        validate(raw).map_err(|errors| ConfigError::Invalid { file: None, errors })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw (serde) layer.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    kubernetes: RawKubernetes,
    #[serde(default)]
    token_sources: Option<Spanned<Vec<RawTokenSource>>>,
    routes: Spanned<Vec<RawRoute>>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    identity_headers: RawIdentityHeaders,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    grpc: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    kubeconfig: Option<Spanned<String>>,
    context: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    max_in_flight: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenSource {
    header: Spanned<String>,
    scheme: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    #[serde(rename = "match")]
    matcher: Option<Spanned<RawMatch>>,
    audiences: Spanned<Vec<Spanned<String>>>,
    allow: Option<RawAllow>,
    #[serde(default)]
    strip_token: bool,
    invalid_token_status: Option<Spanned<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    context_extensions: BTreeMap<String, String>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    #[serde(default)]
    service_accounts: Vec<Spanned<String>>,
    #[serde(default)]
    namespaces: Vec<Spanned<String>>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_entries: Option<Spanned<usize>>,
    ttl: Option<Spanned<String>>,
    negative_ttl: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityHeaders {
    user: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    uid: Option<Spanned<String>>,
    groups: Option<Spanned<String>>,
    pod_name: Option<Spanned<String>>,
    pod_uid: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<Spanned<String>>,
}

/// serde pass: structure, types, unknown fields. Stops at the first problem (serde cannot go
/// on), but names the field path and line.
fn parse_raw(text: &str) -> Result<RawConfig, FieldError> {
    let mut track = serde_path_to_error::Track::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        let de = serde_path_to_error::Deserializer::new(de, &mut track);
        RawConfig::deserialize(de)
    });
    result.map_err(|e| {
        let line = e.location().map_or(0, |l| l.line() as usize);
        let mut message = e.render_with_options(serde_saphyr::render_options! {
            snippets: serde_saphyr::SnippetMode::Off,
        });
        // The renderer appends " at line L, column C"; we print the line ourselves.
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        // `Spanned<T>` shows up as a `.value` segment; our schema has no field called `value`.
        let mut field = track
            .path()
            .to_string()
            .replace(".value[", "[")
            .replace(".value.", ".");
        if let Some(f) = field.strip_suffix(".value") {
            field = f.to_owned();
        }
        // For a missing field serde points at the enclosing mapping; name the field itself.
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            field = if field == "." || field.is_empty() {
                missing.to_owned()
            } else {
                format!("{field}.{missing}")
            };
        }
        if field == "." || field.is_empty() {
            field = "(document)".to_owned();
        }
        FieldError {
            field,
            line,
            message,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Validation layer.

/// Collects problems instead of stopping at the first.
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, line: usize, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            line,
            message: message.into(),
        });
    }
}

fn line<T>(s: &Spanned<T>) -> usize {
    s.referenced.line() as usize
}

/// Parses `"500ms"`, `"60s"`, `"5m"`, `"1h"` (a non-negative integer and one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("`{s}` has no unit; write e.g. \"500ms\", \"60s\", \"5m\", \"1h\"")
    })?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like \"500ms\", \"60s\", \"5m\", \"1h\""))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit; use ms, s, m or h (e.g. \"60s\")"
            ))
        }
    };
    Ok(d)
}

fn duration_field(
    p: &mut Problems,
    field: &str,
    value: &Option<Spanned<String>>,
    default: &str,
) -> Duration {
    match value {
        None => parse_duration(default).unwrap_or_default(),
        Some(v) => parse_duration(&v.value).unwrap_or_else(|e| {
            p.push(field, line(v), e);
            Duration::ZERO
        }),
    }
}

fn addr_field(
    p: &mut Problems,
    field: &str,
    value: &Option<Spanned<String>>,
    default: &str,
    alternatives: &str,
) -> SocketAddr {
    let (text, ln) = match value {
        None => (default, 0),
        Some(v) => (v.value.as_str(), line(v)),
    };
    text.parse().unwrap_or_else(|_| {
        p.push(
            field,
            ln,
            format!("`{text}` is not an IP:port address (e.g. \"0.0.0.0:9001\"){alternatives}"),
        );
        SocketAddr::from(([0, 0, 0, 0], 0))
    })
}

/// `listen.grpc`: `IP:port` or `unix:/path` (a non-empty path).
fn grpc_addr_field(p: &mut Problems, value: &Option<Spanned<String>>) -> GrpcAddr {
    match value {
        Some(v) if v.value.starts_with("unix:") => {
            let path = &v.value["unix:".len()..];
            if path.is_empty() {
                p.push(
                    "listen.grpc",
                    line(v),
                    "`unix:` needs a socket path (e.g. \"unix:/run/tokengate/grpc.sock\")",
                );
            }
            GrpcAddr::Unix(path.into())
        }
        _ => GrpcAddr::Tcp(addr_field(
            p,
            "listen.grpc",
            value,
            defaults::LISTEN_GRPC,
            " or unix:/path/to/socket",
        )),
    }
}

/// A header name tokengate may emit or read: lower-case token characters only, not a pseudo
/// header and not `host` (Envoy and gRFC A92 ignore those).
fn header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("header name is empty".to_owned());
    }
    if name.starts_with(':') || name == "host" {
        return Some(format!("`{name}` cannot be used (pseudo-header or host)"));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b));
    if !ok {
        return Some(format!(
            "`{name}` is not a valid lower-case header name (letters, digits, '-')"
        ));
    }
    None
}

/// `*` may appear anywhere in an allow-list pattern; a pattern must not be empty.
fn pattern_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        Some("empty pattern".to_owned())
    } else {
        None
    }
}

fn validate(raw: RawConfig) -> Result<Config, Vec<FieldError>> {
    let mut p = Problems(Vec::new());

    let listen = Listen {
        grpc: grpc_addr_field(&mut p, &raw.listen.grpc),
        admin: addr_field(
            &mut p,
            "listen.admin",
            &raw.listen.admin,
            defaults::LISTEN_ADMIN,
            "",
        ),
    };

    let k = &raw.kubernetes;
    let timeout = duration_field(
        &mut p,
        "kubernetes.timeout",
        &k.timeout,
        defaults::KUBE_TIMEOUT,
    );
    if let Some(t) = &k.timeout {
        if timeout.is_zero() && parse_duration(&t.value).is_ok() {
            p.push("kubernetes.timeout", line(t), "must be greater than zero");
        }
    }
    let retries = k
        .retries
        .as_ref()
        .map_or(defaults::KUBE_RETRIES, |r| r.value);
    if let Some(r) = &k.retries {
        if r.value > 10 {
            p.push("kubernetes.retries", line(r), "must be at most 10");
        }
    }
    let max_in_flight = k
        .max_in_flight
        .as_ref()
        .map_or(defaults::KUBE_MAX_IN_FLIGHT, |m| m.value);
    if let Some(m) = &k.max_in_flight {
        if m.value == 0 {
            p.push("kubernetes.max_in_flight", line(m), "must be at least 1");
        }
    }
    if let Some(c) = &k.kubeconfig {
        if c.value.trim().is_empty() {
            p.push("kubernetes.kubeconfig", line(c), "must not be empty");
        }
    }
    let kubernetes = Kubernetes {
        kubeconfig: k.kubeconfig.as_ref().map(|c| PathBuf::from(&c.value)),
        context: k.context.as_ref().map(|c| c.value.clone()),
        timeout,
        retries,
        max_in_flight,
    };

    let mut token_sources = Vec::new();
    match &raw.token_sources {
        None => token_sources.push(TokenSource {
            header: defaults::TOKEN_HEADER.to_owned(),
            scheme: Some(defaults::TOKEN_SCHEME.to_owned()),
        }),
        Some(list) => {
            if list.value.is_empty() {
                p.push(
                    "token_sources",
                    line(list),
                    "at least one token source is required",
                );
            }
            let mut seen = HashSet::new();
            for (i, s) in list.value.iter().enumerate() {
                let field = format!("token_sources[{i}].header");
                let header = s.header.value.trim().to_ascii_lowercase();
                if let Some(e) = header_name_problem(&header) {
                    p.push(&field, line(&s.header), e);
                } else if !seen.insert(header.clone()) {
                    p.push(
                        &field,
                        line(&s.header),
                        format!("`{header}` is listed twice"),
                    );
                }
                let scheme = s.scheme.as_ref().map(|sc| {
                    let v = sc.value.trim();
                    if v.is_empty() || v.contains(|c: char| c.is_whitespace()) {
                        p.push(
                            format!("token_sources[{i}].scheme"),
                            line(sc),
                            "must be one word, e.g. Bearer",
                        );
                    }
                    v.to_owned()
                });
                token_sources.push(TokenSource { header, scheme });
            }
        }
    }

    let mut routes = Vec::new();
    if raw.routes.value.is_empty() {
        p.push(
            "routes",
            line(&raw.routes),
            "at least one route is required (every request would be denied)",
        );
    }
    let mut names = HashSet::new();
    let mut catch_all: Option<String> = None;
    for (i, r) in raw.routes.value.iter().enumerate() {
        let f = |s: &str| format!("routes[{i}].{s}");
        let name = r.name.value.trim().to_owned();
        if name.is_empty() {
            p.push(f("name"), line(&r.name), "must not be empty");
        } else if !names.insert(name.clone()) {
            p.push(
                f("name"),
                line(&r.name),
                format!("route `{name}` is defined twice"),
            );
        }
        if let Some(earlier) = &catch_all {
            p.push(
                f("name"),
                line(&r.name),
                format!("unreachable: route `{earlier}` before it has no `match` and catches every request"),
            );
        }
        let audiences: Vec<String> = r.audiences.value.iter().map(|a| a.value.clone()).collect();
        if audiences.is_empty() {
            p.push(
                f("audiences"),
                line(&r.audiences),
                "at least one audience is required",
            );
        }
        for (j, a) in r.audiences.value.iter().enumerate() {
            if a.value.trim().is_empty() {
                p.push(f(&format!("audiences[{j}]")), line(a), "must not be empty");
            }
        }
        let matcher = r.matcher.as_ref().map(|m| {
            let mm = &m.value;
            let mut hosts = Vec::new();
            for (j, h) in mm.hosts.iter().enumerate() {
                let host = h.value.trim().to_ascii_lowercase();
                let rest = host.strip_prefix("*.").unwrap_or(&host);
                if rest.is_empty() || rest.contains('*') || rest.contains(':') || rest.contains('/')
                {
                    p.push(
                        f(&format!("match.hosts[{j}]")),
                        line(h),
                        format!(
                            "`{}` must be an exact host or `*.suffix` (no port)",
                            h.value
                        ),
                    );
                }
                hosts.push(host);
            }
            let path_prefix = mm.path_prefix.as_ref().map(|pp| {
                if !pp.value.starts_with('/') {
                    p.push(f("match.path_prefix"), line(pp), "must start with `/`");
                }
                pp.value.clone()
            });
            let mut methods = Vec::new();
            for (j, me) in mm.methods.iter().enumerate() {
                let v = me.value.trim().to_ascii_uppercase();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_uppercase()) {
                    p.push(
                        f(&format!("match.methods[{j}]")),
                        line(me),
                        format!("`{}` is not an HTTP method", me.value),
                    );
                }
                methods.push(v);
            }
            MatchConfig {
                context_extensions: mm.context_extensions.clone(),
                hosts,
                path_prefix,
                methods,
            }
        });
        let matches_all = matcher.as_ref().is_none_or(|m| {
            m.context_extensions.is_empty()
                && m.hosts.is_empty()
                && m.path_prefix.as_deref().is_none_or(|pp| pp == "/")
                && m.methods.is_empty()
        });
        if matches_all && catch_all.is_none() {
            catch_all = Some(name.clone());
        }
        let allow = r.allow.as_ref().map(|a| {
            let mut service_accounts = Vec::new();
            for (j, s) in a.service_accounts.iter().enumerate() {
                let v = s.value.trim();
                match v.split_once('/') {
                    Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {}
                    _ => p.push(
                        f(&format!("allow.service_accounts[{j}]")),
                        line(s),
                        format!("`{v}` must be `namespace/name` (`*` wildcards allowed)"),
                    ),
                }
                service_accounts.push(v.to_owned());
            }
            let mut simple = |list: &[Spanned<String>], what: &str| -> Vec<String> {
                list.iter()
                    .enumerate()
                    .map(|(j, s)| {
                        if let Some(e) = pattern_problem(s.value.trim()) {
                            p.push(f(&format!("allow.{what}[{j}]")), line(s), e);
                        }
                        s.value.trim().to_owned()
                    })
                    .collect()
            };
            let namespaces = simple(&a.namespaces, "namespaces");
            let groups = simple(&a.groups, "groups");
            AllowConfig {
                service_accounts,
                namespaces,
                groups,
            }
        });
        let invalid_token_status = match &r.invalid_token_status {
            None => defaults::INVALID_TOKEN_STATUS,
            Some(s) if s.value == 401 || s.value == 403 => s.value,
            Some(s) => {
                p.push(f("invalid_token_status"), line(s), "must be 401 or 403");
                defaults::INVALID_TOKEN_STATUS
            }
        };
        routes.push(RouteConfig {
            name,
            matcher,
            audiences,
            allow,
            strip_token: r.strip_token,
            invalid_token_status,
        });
    }

    let c = &raw.cache;
    let max_entries = c
        .max_entries
        .as_ref()
        .map_or(defaults::CACHE_MAX_ENTRIES, |m| m.value);
    if let Some(m) = &c.max_entries {
        if m.value == 0 {
            p.push(
                "cache.max_entries",
                line(m),
                "must be at least 1 (set ttl: 0s to disable caching)",
            );
        }
    }
    let cache = CacheConfig {
        max_entries,
        ttl: duration_field(&mut p, "cache.ttl", &c.ttl, defaults::CACHE_TTL),
        negative_ttl: duration_field(
            &mut p,
            "cache.negative_ttl",
            &c.negative_ttl,
            defaults::CACHE_NEGATIVE_TTL,
        ),
    };

    let ih = &raw.identity_headers;
    let mut header = |field: &str, v: &Option<Spanned<String>>, default: &str| -> String {
        match v {
            None => default.to_owned(),
            Some(s) => {
                let name = s.value.trim().to_owned();
                if let Some(e) = header_name_problem(&name) {
                    p.push(format!("identity_headers.{field}"), line(s), e);
                }
                name
            }
        }
    };
    let identity_headers = IdentityHeaders {
        user: header("user", &ih.user, defaults::HEADER_USER),
        namespace: header("namespace", &ih.namespace, defaults::HEADER_NAMESPACE),
        name: header("name", &ih.name, defaults::HEADER_NAME),
        uid: header("uid", &ih.uid, defaults::HEADER_UID),
        groups: header("groups", &ih.groups, defaults::HEADER_GROUPS),
        pod_name: header("pod_name", &ih.pod_name, defaults::HEADER_POD_NAME),
        pod_uid: header("pod_uid", &ih.pod_uid, defaults::HEADER_POD_UID),
    };
    {
        let fields = [
            "user",
            "namespace",
            "name",
            "uid",
            "groups",
            "pod_name",
            "pod_uid",
        ];
        let raws = [
            &ih.user,
            &ih.namespace,
            &ih.name,
            &ih.uid,
            &ih.groups,
            &ih.pod_name,
            &ih.pod_uid,
        ];
        let names = identity_headers.all();
        for i in 0..names.len() {
            let ln = raws[i].as_ref().map_or(0, line);
            if names[..i].contains(&names[i]) {
                p.push(
                    format!("identity_headers.{}", fields[i]),
                    ln,
                    format!("`{}` is used for two identity headers", names[i]),
                );
            }
            if token_sources.iter().any(|s| s.header == names[i]) {
                p.push(
                    format!("identity_headers.{}", fields[i]),
                    ln,
                    format!("`{}` is also a token source", names[i]),
                );
            }
        }
    }

    let level = raw
        .log
        .level
        .as_ref()
        .map_or(defaults::LOG_LEVEL.to_owned(), |l| {
            l.value.trim().to_owned()
        });
    if let Some(l) = &raw.log.level {
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() || level.is_empty() {
            p.push(
                "log.level",
                line(l),
                format!("`{level}` is not a level (trace, debug, info, warn, error) or filter directive"),
            );
        }
    }
    let log = LogConfig {
        format: raw.log.format.unwrap_or_default(),
        level,
    };

    if !p.0.is_empty() {
        p.0.sort_by_key(|e| e.line);
        return Err(p.0);
    }
    Ok(Config {
        listen,
        kubernetes,
        token_sources,
        routes,
        cache,
        identity_headers,
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
listen:
  grpc: 127.0.0.1:9001
  admin: 127.0.0.1:9090
kubernetes:
  kubeconfig: /tmp/kubeconfig
  context: ctx
  timeout: 500ms
  retries: 1
  max_in_flight: 8
token_sources:
  - header: Authorization
    scheme: Bearer
  - header: x-client-id
routes:
  - name: data-store
    match:
      context_extensions: {route: data-store}
      hosts: [data-store, "*.data-store.svc.cluster.local"]
      path_prefix: /
      methods: [get, POST]
    audiences: [data-store]
    allow:
      service_accounts: ["default/api", "payments/*"]
      namespaces: [default]
      groups: []
    strip_token: true
    invalid_token_status: 401
  - name: default
    audiences: [other]
cache:
  max_entries: 10
  ttl: 2m
  negative_ttl: 1s
identity_headers:
  user: x-user
log:
  format: json
  level: debug
"#;

    #[test]
    fn full_example_parses() {
        let c = Config::from_yaml_str(FULL).unwrap();
        assert_eq!(
            c.listen.grpc,
            GrpcAddr::Tcp("127.0.0.1:9001".parse().unwrap())
        );
        assert_eq!(c.kubernetes.timeout, Duration::from_millis(500));
        assert_eq!(c.kubernetes.retries, 1);
        assert_eq!(c.token_sources[0].header, "authorization");
        assert_eq!(c.token_sources[1].scheme, None);
        let r = &c.routes[0];
        let m = r.matcher.as_ref().unwrap();
        assert_eq!(m.methods, vec!["GET", "POST"]);
        assert_eq!(m.context_extensions.get("route").unwrap(), "data-store");
        assert!(r.strip_token);
        assert_eq!(r.invalid_token_status, 401);
        assert_eq!(c.routes[1].invalid_token_status, 403);
        assert_eq!(c.cache.ttl, Duration::from_secs(120));
        assert_eq!(c.identity_headers.user, "x-user");
        assert_eq!(c.identity_headers.pod_uid, defaults::HEADER_POD_UID);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn minimal_gets_defaults() {
        let c = Config::from_yaml_str("routes:\n  - name: all\n    audiences: [a]\n").unwrap();
        assert_eq!(
            c.listen.grpc,
            GrpcAddr::Tcp("0.0.0.0:9001".parse().unwrap())
        );
        assert_eq!(c.listen.admin.port(), 9090);
        assert_eq!(c.kubernetes.timeout, Duration::from_secs(2));
        assert_eq!(c.kubernetes.retries, 2);
        assert_eq!(c.kubernetes.max_in_flight, 64);
        assert_eq!(
            c.token_sources,
            vec![TokenSource {
                header: "authorization".into(),
                scheme: Some("Bearer".into())
            }]
        );
        assert_eq!(c.cache.max_entries, 100_000);
        assert_eq!(c.cache.ttl, Duration::from_secs(60));
        assert_eq!(c.cache.negative_ttl, Duration::from_secs(5));
        assert!(c.routes[0].matcher.is_none());
    }

    fn errors(yaml: &str) -> Vec<FieldError> {
        Config::from_yaml_str(yaml)
            .unwrap_err()
            .field_errors()
            .to_vec()
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = errors("routes:\n  - name: a\n    audiences: [a]\n    audience: [b]\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "routes[0].audience");
        assert_eq!(e[0].line, 4);
        assert!(e[0].message.contains("unknown field"), "{}", e[0].message);
    }

    #[test]
    fn missing_field_names_the_field() {
        let e = errors("routes:\n  - name: a\n");
        assert_eq!(e[0].field, "routes[0].audiences");
        assert_eq!(e[0].line, 2);
    }

    #[test]
    fn wrong_type_names_field_and_line() {
        let e = errors("kubernetes:\n  retries: -1\nroutes: []\n");
        assert_eq!(e[0].field, "kubernetes.retries");
        assert_eq!(e[0].line, 2);
    }

    #[test]
    fn grpc_listens_on_a_unix_socket() {
        let c = Config::from_yaml_str(
            "listen:\n  grpc: unix:/run/tokengate/grpc.sock\nroutes:\n  - name: all\n    audiences: [a]\n",
        )
        .unwrap();
        assert_eq!(
            c.listen.grpc,
            GrpcAddr::Unix("/run/tokengate/grpc.sock".into())
        );
        assert_eq!(c.listen.grpc.to_string(), "unix:/run/tokengate/grpc.sock");

        for bad in ["unix:", "/run/tokengate/grpc.sock", "localhost:9001"] {
            let e = errors(&format!(
                "routes:\n  - name: all\n    audiences: [a]\nlisten:\n  grpc: \"{bad}\"\n"
            ));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert_eq!(
                (e[0].field.as_str(), e[0].line),
                ("listen.grpc", 5),
                "{bad}"
            );
        }
    }

    #[test]
    fn all_semantic_errors_reported_at_once() {
        let yaml = "\
listen:
  grpc: nope
kubernetes:
  timeout: 5 seconds
cache:
  ttl: 10x
routes:
  - name: a
    audiences: []
    match:
      hosts: [\"a*b\"]
      path_prefix: api
    invalid_token_status: 500
    allow:
      service_accounts: [justname]
";
        let e = errors(yaml);
        let got: Vec<(&str, usize)> = e.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert!(got.contains(&("listen.grpc", 2)), "{got:?}");
        assert!(got.contains(&("kubernetes.timeout", 4)), "{got:?}");
        assert!(got.contains(&("cache.ttl", 6)), "{got:?}");
        assert!(got.contains(&("routes[0].audiences", 9)), "{got:?}");
        assert!(got.contains(&("routes[0].match.hosts[0]", 11)), "{got:?}");
        assert!(
            got.contains(&("routes[0].match.path_prefix", 12)),
            "{got:?}"
        );
        assert!(
            got.contains(&("routes[0].invalid_token_status", 13)),
            "{got:?}"
        );
        assert!(
            got.contains(&("routes[0].allow.service_accounts[0]", 15)),
            "{got:?}"
        );
        // Sorted by line.
        assert!(e.windows(2).all(|w| w[0].line <= w[1].line));
    }

    #[test]
    fn unreachable_route_after_catch_all() {
        let e =
            errors("routes:\n  - name: a\n    audiences: [a]\n  - name: b\n    audiences: [b]\n");
        assert_eq!(e[0].field, "routes[1].name");
        assert_eq!(e[0].line, 4);
    }

    #[test]
    fn duplicate_and_conflicting_headers() {
        let yaml = "\
token_sources:
  - header: x-client-id
identity_headers:
  user: x-client-id
  name: x-k8s-sa-namespace
routes:
  - name: a
    audiences: [a]
";
        let e = errors(yaml);
        assert!(e
            .iter()
            .any(|e| e.field == "identity_headers.user" && e.line == 4));
        assert!(e
            .iter()
            .any(|e| e.field == "identity_headers.name" && e.line == 5));
    }

    /// The README's complete example must stay valid, and show the defaults.
    #[test]
    fn readme_example_is_valid() {
        let readme = include_str!("../README.md");
        let section = &readme[readme
            .find("## Configuration reference")
            .expect("README has a Configuration reference")..];
        let start = section.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
        let end = start + section[start..].find("```").expect("closed yaml block");
        let c = Config::from_yaml_str(&section[start..end])
            .unwrap_or_else(|e| panic!("README example: {e}"));
        assert_eq!(c.listen.grpc.to_string(), defaults::LISTEN_GRPC);
        assert_eq!(c.listen.admin.to_string(), defaults::LISTEN_ADMIN);
        assert_eq!(c.kubernetes.retries, defaults::KUBE_RETRIES);
        assert_eq!(c.kubernetes.max_in_flight, defaults::KUBE_MAX_IN_FLIGHT);
        assert_eq!(c.cache.max_entries, defaults::CACHE_MAX_ENTRIES);
        assert_eq!(c.cache.ttl, parse_duration(defaults::CACHE_TTL).unwrap());
        assert_eq!(
            c.cache.negative_ttl,
            parse_duration(defaults::CACHE_NEGATIVE_TTL).unwrap()
        );
        assert_eq!(
            c.routes[0].invalid_token_status,
            defaults::INVALID_TOKEN_STATUS
        );
        assert_eq!(c.identity_headers.user, defaults::HEADER_USER);
        assert_eq!(c.log.level, defaults::LOG_LEVEL);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("60").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn display_is_compiler_like() {
        let err = Config::from_yaml_str("routes:\n  - name: a\n    audiences: [a]\n    bogus: 1\n")
            .unwrap_err();
        let s = err.to_string();
        assert!(s.contains("line 4: routes[0].bogus: unknown field"), "{s}");
    }
}
