//! YAML configuration: parsed once, at the edge, into a typed and validated [`Config`].
//!
//! Parsing is two passes. serde (with `deny_unknown_fields`) turns the text into raw structs
//! whose interesting fields are [`Spanned`] so they remember their line; then one validation
//! function per section (listen, kubernetes, token_sources, each route and its match and
//! allow, cache, identity_headers, log, tracing) checks every field and collects *all* problems, each
//! naming the field path and the line, so an operator fixes a file in one round
//! (`tokengate check-config FILE`). A value is parsed once, by the parser of the type that
//! uses it ([`HostPattern::parse`], [`ServiceAccountPattern::parse`], ...), so [`Config`]
//! carries compiled values. Every default lives, typed, in [`defaults`], and nowhere else.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::policy::{AllowList, Glob, ServiceAccountPattern};
use crate::route::{HostPattern, Matcher};

/// Every default value of the configuration, in one place (the README's reference mirrors it).
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::num::NonZeroUsize;
    use std::time::Duration;

    /// gRPC listen address (ext_authz Check and grpc.health.v1): `0.0.0.0:9001`.
    pub const LISTEN_GRPC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9001);
    /// Admin HTTP listen address (`/healthz`, `/readyz`, `/metrics`): `0.0.0.0:9090`.
    pub const LISTEN_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9090);
    /// After SIGTERM, how long Checks are still served (not ready) before draining begins.
    pub const DRAIN_DELAY: Duration = Duration::from_secs(5);
    /// How often the gRPC listener's TLS certificate and key files are checked for changes.
    pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
    /// Timeout of one TokenReview attempt.
    pub const KUBE_TIMEOUT: Duration = Duration::from_secs(2);
    /// Extra TokenReview attempts on transient failures.
    pub const KUBE_RETRIES: u32 = 2;
    /// Cap on concurrent TokenReviews.
    pub const KUBE_MAX_IN_FLIGHT: usize = 64;
    /// Reviews that may wait for a slot; beyond it the peer with the most waiters is shed at
    /// once (see `slots`).
    pub const KUBE_MAX_QUEUED: usize = 1024;
    /// Retries may add this percentage of first attempts (the retry budget).
    pub const KUBE_RETRY_BUDGET_PERCENT: u32 = 10;
    /// ... plus this many retries per second.
    pub const KUBE_RETRY_BUDGET_MIN_PER_SECOND: u32 = 1;
    /// Token source used when `token_sources` is absent: `Authorization: Bearer`.
    pub const TOKEN_HEADER: &str = "authorization";
    /// Scheme of the default token source.
    pub const TOKEN_SCHEME: &str = "Bearer";
    /// HTTP status for invalid tokens.
    pub const INVALID_TOKEN_STATUS: u16 = 403;
    /// SubjectAccessReview cache capacity (allowed and denied answers each).
    pub const RBAC_CACHE_MAX_ENTRIES: NonZeroUsize = match NonZeroUsize::new(10_000) {
        Some(n) => n,
        None => panic!("not zero"), // evaluated at compile time
    };
    /// How long an allowed SubjectAccessReview answer is reused: a removed RoleBinding takes
    /// effect within this.
    pub const RBAC_TTL: Duration = Duration::from_secs(10);
    /// How long a denied SubjectAccessReview answer is reused: a new grant takes effect
    /// within this.
    pub const RBAC_DENIED_TTL: Duration = Duration::from_secs(5);
    /// Cache capacity (entries).
    pub const CACHE_MAX_ENTRIES: NonZeroUsize = match NonZeroUsize::new(100_000) {
        Some(n) => n,
        None => panic!("not zero"), // evaluated at compile time
    };
    /// Largest `cache.max_entries` accepted: at about 1 KiB per entry (identity, keys, LRU
    /// links) ten million entries is already ~10 GiB.
    pub const CACHE_MAX_ENTRIES_LIMIT: usize = 10_000_000;
    /// Negative cache capacity when `cache.negative_max_entries` is absent: a tenth of
    /// `max_entries` (at least 1), so forged tokens' verdicts cannot evict verified identities.
    pub const fn cache_negative_max_entries(max_entries: NonZeroUsize) -> NonZeroUsize {
        match NonZeroUsize::new(max_entries.get() / 10) {
            Some(n) => n,
            None => NonZeroUsize::MIN,
        }
    }
    /// Positive cache TTL (also capped by the token's `exp`).
    pub const CACHE_TTL: Duration = Duration::from_secs(60);
    /// Negative cache TTL (`authenticated: false` answers).
    pub const CACHE_NEGATIVE_TTL: Duration = Duration::from_secs(5);
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
    /// Which decisions get a line in the decision log.
    pub const LOG_DECISIONS: super::DecisionLogMode = super::DecisionLogMode::Denials;
    /// Decision log lines per second at most (a burst of as many is allowed); the rest are
    /// counted in a periodic summary line.
    pub const LOG_DECISIONS_PER_SECOND: u32 = 100;
    /// Largest `log.decisions_per_second`.
    pub const LOG_DECISIONS_PER_SECOND_LIMIT: u32 = 1_000_000;
    /// OTLP traces: share of Checks without a sampled parent trace that are traced.
    pub const TRACING_SAMPLE_RATIO: f64 = 1.0;
    /// OTLP `service.name` of tokengate's spans.
    pub const TRACING_SERVICE_NAME: &str = "tokengate";
    /// How tokens are verified unless a route says otherwise.
    pub const VERIFICATION: super::Verification = super::Verification::TokenReview;
    /// Local verification: how long the last-known keys and watch caches are trusted without
    /// contact with the API server.
    pub const MAX_STALENESS: Duration = Duration::from_secs(300);
    /// How often the issuer's JWKS is fetched again (a key that left it revokes its tokens).
    pub const JWKS_REFRESH: Duration = Duration::from_secs(60);
    /// Positive cache TTL when watches push revocations: a verdict then lives until the
    /// token's own `exp` (this only bounds tokens without one).
    pub const CACHE_TTL_WATCHED: Duration = Duration::from_secs(24 * 3600);

    // --- listen.limits / listen.admin_limits (connection hygiene, issue 12) ---
    /// Open gRPC connections; more are closed as soon as they are accepted.
    pub const GRPC_MAX_CONNECTIONS: usize = 10_000;
    /// Time for a new gRPC connection to send the 24-byte HTTP/2 preface.
    pub const GRPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// A gRPC connection from which nothing (not even a PING ack) arrives for this long is
    /// closed. Longer than keepalive interval + timeout, so healthy idle Envoys stay.
    pub const GRPC_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
    /// HTTP/2 PING interval on a quiet connection.
    pub const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    /// Time to wait for a PING ack before closing the connection.
    pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: Checks in flight per connection (Envoy opens
    /// another connection beyond it).
    pub const GRPC_MAX_CONCURRENT_STREAMS: u32 = 1024;
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: the gRPC metadata Envoy sends is small (the
    /// request's own headers travel in the message).
    pub const GRPC_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
    /// Largest CheckRequest: Envoy's headers (`max_request_headers_kb`, 60 KiB by default,
    /// at most 8 MiB) plus a buffered body if `with_request_body` is set.
    pub const GRPC_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
    /// Open admin connections (probes and scrapes need few).
    pub const ADMIN_MAX_CONNECTIONS: usize = 64;
    /// Time for an admin client to send its request head.
    pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
    /// An admin connection quiet for this long is closed.
    pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
}

/// How a route's tokens are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Ask the API server (TokenReview) on every cache miss.
    TokenReview,
    /// Check the signature against the cluster's JWKS and the claims against the watch caches,
    /// as the API server would; what cannot be judged locally falls back to TokenReview.
    Local,
}

/// What a route does with its decision (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Denials are enforced.
    Enforce,
    /// Denials are recorded (metric, log, `x-tokengate-audit` header) and the request passes
    /// without identity headers; API-server outages still answer UNAVAILABLE.
    Audit,
}

impl Mode {
    /// `enforce` or `audit`.
    pub fn parse(text: &str) -> Result<Mode, String> {
        match text.trim() {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            other => Err(format!("`{other}` is not `enforce` or `audit`")),
        }
    }
}

/// Parses `require_peer`: `service_account` (the mTLS peer must be the token's service
/// account) or `none`.
fn parse_require_peer(text: &str) -> Result<bool, String> {
    match text.trim() {
        "service_account" => Ok(true),
        "none" => Ok(false),
        other => Err(format!("`{other}` is not `service_account` or `none`")),
    }
}

impl Verification {
    /// `tokenreview` or `local`.
    pub fn parse(text: &str) -> Result<Verification, String> {
        match text.trim() {
            "tokenreview" => Ok(Verification::TokenReview),
            "local" => Ok(Verification::Local),
            other => Err(format!("`{other}` is not `tokenreview` or `local`")),
        }
    }
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
    /// OpenTelemetry traces (OTLP).
    pub tracing: TracingConfig,
}

/// Listen addresses.
#[derive(Debug, Clone)]
pub struct Listen {
    /// Envoy ext_authz gRPC and grpc.health.v1: `IP:port` or `unix:/path/to/socket`.
    pub grpc: GrpcAddr,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin: SocketAddr,
    // --- HTTP mode (issue 11 item 4; see `crate::http`) ---
    /// The HTTP front door (Envoy `http_service`, Istio `envoyExtAuthzHttp`, forward-auth);
    /// `None`: off.
    pub http: Option<SocketAddr>,
    /// Envoy's `http_service.path_prefix`, stripped from the path of Envoy-shaped checks;
    /// `None`: the request path is the original path.
    pub http_path_prefix: Option<String>,
    /// After the shutdown signal, how long Checks are still served while health reports
    /// NOT_SERVING and `/readyz` 503, before the listener closes and in-flight Checks drain.
    pub drain_delay: Duration,
    /// TLS on the gRPC listener (TCP only); `None`: plaintext.
    pub tls: Option<TlsSettings>,
    /// Limits of the gRPC port.
    pub limits: GrpcLimits,
    /// Limits of the admin port.
    pub admin_limits: AdminLimits,
}

/// Connection limits of the gRPC port (`listen.limits`): what keeps idle, half-open and
/// greedy clients from holding sockets, memory or tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcLimits {
    /// Open connections; more are closed on accept.
    pub max_connections: usize,
    /// Time for a new connection to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Close a connection from which nothing arrives for this long.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval on a quiet connection.
    pub keepalive_interval: Duration,
    /// Time to wait for a PING ack.
    pub keepalive_timeout: Duration,
    /// Concurrent streams (Checks) per connection.
    pub max_concurrent_streams: u32,
    /// Largest header list (gRPC metadata) per request.
    pub max_header_list_bytes: u32,
    /// Largest CheckRequest message.
    pub max_message_bytes: usize,
}

/// Connection limits of the admin port (`listen.admin_limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminLimits {
    /// Open connections; more are closed on accept.
    pub max_connections: usize,
    /// Time for a client to send its request head (also the time to send anything at all).
    pub header_read_timeout: Duration,
    /// Close a connection quiet for this long.
    pub idle_timeout: Duration,
}

/// `listen.tls`: the gRPC listener's certificate, key and optional client CA, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first (cert-manager's `tls.crt`).
    pub cert_file: PathBuf,
    /// PEM private key of the leaf (`tls.key`).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate they signed.
    pub client_ca_file: Option<PathBuf>,
    /// How often the certificate and key files are checked for changes.
    pub reload_interval: Duration,
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
    /// Cap on reviews waiting for a slot (0: none wait).
    pub max_queued: usize,
    /// Retries may add this percentage of first attempts ...
    pub retry_budget_percent: u32,
    /// ... plus this many per second.
    pub retry_budget_min_per_second: u32,
    /// Default verification of routes that do not set their own.
    pub verification: Verification,
    /// Watch pods and service accounts (metadata only) and the JWKS, and revoke cached
    /// verdicts whose object or key went away. On when asked for, or when any route verifies
    /// locally.
    pub watch: bool,
    /// Namespaces to watch; empty means all.
    pub watch_namespaces: Vec<String>,
    /// Local verification answers UNAVAILABLE once keys or watch caches have gone this long
    /// without contact with the API server; cached verdicts are then re-verified.
    pub max_staleness: Duration,
    /// Period of the JWKS refresh (with watches on).
    pub jwks_refresh: Duration,
    /// The service-account issuer (the API server's first `--service-account-issuer`), if
    /// configured: precheck refuses tokens of any other issuer without a TokenReview.
    pub issuer: Option<String>,
    /// SPIFFE trust domain of `require_peer` routes' peers; `None` accepts any.
    pub trust_domain: Option<String>,
}

/// One place a token may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    /// Header name, lower-case.
    pub header: String,
    /// Required auth scheme (`Bearer`), compared case-insensitively; `None` = the whole value.
    pub scheme: Option<String>,
}

/// One route as configured (compiled; [`crate::route::Routes`] numbers them).
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name, used in logs and metrics.
    pub name: String,
    /// Conditions; `None` matches every request (a default route).
    pub matcher: Option<Matcher>,
    /// Audiences sent in TokenReview `spec.audiences`.
    pub audiences: Vec<String>,
    /// Allow-list; `None` admits any authenticated service account.
    pub allow: Option<AllowList>,
    /// Remove the token's header before the request goes upstream.
    pub strip_token: bool,
    /// 403 or 401 for invalid tokens.
    pub invalid_token_status: u16,
    /// How this route's tokens are verified.
    pub verification: Verification,
    /// `require_peer: service_account`: the mTLS peer must be the token's service account.
    pub require_peer: Option<crate::peer::PeerBinding>,
    /// Enforce or audit.
    pub mode: Mode,
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Capacity in entries (positive answers).
    pub max_entries: NonZeroUsize,
    /// Capacity of the separate LRU of negative answers, so forgeries cannot evict verified
    /// identities.
    pub negative_max_entries: NonZeroUsize,
    /// Positive TTL (also capped by the token's `exp`); zero disables positive caching.
    pub ttl: Duration,
    /// Negative TTL; zero disables negative caching.
    pub negative_ttl: Duration,
    /// SubjectAccessReview answers (`allow.rbac`): capacity and TTLs.
    pub rbac: crate::rbac::CacheSettings,
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
    /// Which decisions are logged (target `tokengate::decision`, level info).
    pub decisions: DecisionLogMode,
    /// Decision log lines per second at most; the rest are counted in a summary line.
    pub decisions_per_second: u32,
}

/// Which Checks get a line in the decision log (`log.decisions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionLogMode {
    /// None.
    Off,
    /// Denials and UNAVAILABLE answers.
    Denials,
    /// Every decision.
    All,
}

impl DecisionLogMode {
    /// `off`, `denials` or `all`.
    pub fn parse(text: &str) -> Result<DecisionLogMode, String> {
        match text.trim() {
            "off" => Ok(DecisionLogMode::Off),
            "denials" => Ok(DecisionLogMode::Denials),
            "all" => Ok(DecisionLogMode::All),
            other => Err(format!("`{other}` is not `off`, `denials` or `all`")),
        }
    }
}

/// OpenTelemetry traces (`tracing`): off unless an OTLP endpoint is configured here or in the
/// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` variables.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector.observability:4317`.
    pub otlp_endpoint: Option<String>,
    /// Share (0..=1) of Checks without a parent trace context that are traced; a Check whose
    /// proxy forwarded a trace context follows that context's sampled flag.
    pub sample_ratio: f64,
    /// `service.name` resource attribute.
    pub service_name: String,
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
    #[serde(default)]
    tracing: RawTracing,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    grpc: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    http_path_prefix: Option<Spanned<String>>,
    drain_delay: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    limits: RawGrpcLimits,
    #[serde(default)]
    admin_limits: RawAdminLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpcLimits {
    max_connections: Option<Spanned<usize>>,
    handshake_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    keepalive_interval: Option<Spanned<String>>,
    keepalive_timeout: Option<Spanned<String>>,
    max_concurrent_streams: Option<Spanned<u32>>,
    max_header_list_bytes: Option<Spanned<u32>>,
    max_message_bytes: Option<Spanned<usize>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminLimits {
    max_connections: Option<Spanned<usize>>,
    header_read_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Spanned<String>,
    key_file: Spanned<String>,
    client_ca_file: Option<Spanned<String>>,
    reload_interval: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    kubeconfig: Option<Spanned<String>>,
    context: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    max_in_flight: Option<Spanned<usize>>,
    max_queued: Option<Spanned<usize>>,
    retry_budget_percent: Option<Spanned<u32>>,
    retry_budget_min_per_second: Option<Spanned<u32>>,
    verification: Option<Spanned<String>>,
    watch: Option<Spanned<bool>>,
    #[serde(default)]
    watch_namespaces: Vec<Spanned<String>>,
    max_staleness: Option<Spanned<String>>,
    jwks_refresh: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    trust_domain: Option<Spanned<String>>,
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
    verification: Option<Spanned<String>>,
    require_peer: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
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
    rbac: Option<Spanned<RawRbac>>,
}

/// `allow.rbac`: exactly one of `resource` and `non_resource_path`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRbac {
    verb: Option<Spanned<String>>,
    resource: Option<Spanned<RawRbacResource>>,
    non_resource_path: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRbacResource {
    #[serde(default)]
    group: String,
    resource: Spanned<String>,
    #[serde(default)]
    subresource: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_entries: Option<Spanned<usize>>,
    negative_max_entries: Option<Spanned<usize>>,
    ttl: Option<Spanned<String>>,
    negative_ttl: Option<Spanned<String>>,
    rbac_max_entries: Option<Spanned<usize>>,
    rbac_ttl: Option<Spanned<String>>,
    rbac_denied_ttl: Option<Spanned<String>>,
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
    decisions: Option<Spanned<String>>,
    decisions_per_second: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracing {
    otlp_endpoint: Option<Spanned<String>>,
    sample_ratio: Option<Spanned<f64>>,
    service_name: Option<Spanned<String>>,
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
// Validation layer: one function per section, each pushing into the same problem list and
// returning `None` for a value it could not accept (never a placeholder such as a zero
// duration). Parsers of values another module compiles live in that module
// (`HostPattern::parse`, `ServiceAccountPattern::parse`, ...).

/// Collects problems instead of stopping at the first.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, line: usize, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            line,
            message: message.into(),
        });
    }

    /// An optional field: `default` when absent, else `parse`d, or `None` with a problem.
    fn field<T, U>(
        &mut self,
        field: impl Into<String>,
        value: &Option<Spanned<T>>,
        default: U,
        parse: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        match value {
            None => Some(default),
            Some(v) => self.parsed(field, v, parse),
        }
    }

    /// A present value, `parse`d, or `None` with a problem.
    fn parsed<T, U>(
        &mut self,
        field: impl Into<String>,
        value: &Spanned<T>,
        parse: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        parse(&value.value)
            .map_err(|e| self.push(field, line(value), e))
            .ok()
    }

    /// Every element of a list, `parse`d; `None` if any was refused (all are reported).
    fn list<T, U>(
        &mut self,
        field: &str,
        values: &[Spanned<T>],
        mut parse: impl FnMut(&T) -> Result<U, String>,
    ) -> Option<Vec<U>> {
        let parsed: Vec<Option<U>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| self.parsed(format!("{field}[{i}]"), v, &mut parse))
            .collect();
        parsed.into_iter().collect()
    }
}

fn line<T>(s: &Spanned<T>) -> usize {
    s.referenced.line() as usize
}

/// Parses a duration as Envoy and Go users write it: `500ms`, `0.5s`, `60s`, `1m30s`, `2h`
/// (units ns, us, ms, s, m, h; fractions allowed). The parsing is jiff's (its "friendly"
/// format); this only narrows the input to that compact, unsigned form, so `5 seconds`,
/// `-1s` or a bare `60` are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const EXAMPLES: &str = r#"e.g. "250ms", "0.5s", "60s", "1m30s", "1h""#;
    let s = s.trim();
    let compact = !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
    if !compact {
        return Err(format!("`{s}` is not a duration; write {EXAMPLES}"));
    }
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("`{s}` is not a duration ({e}); write {EXAMPLES}"))?;
    Duration::try_from(d).map_err(|e| format!("`{s}`: {e}"))
}

/// A socket address; `alternatives` names other accepted forms in the message.
fn parse_addr(text: &str, alternatives: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("`{text}` is not an IP:port address (e.g. \"0.0.0.0:9001\"){alternatives}")
    })
}

/// `listen.grpc`: `IP:port` or `unix:/path` (a non-empty path).
fn parse_grpc_addr(text: &str) -> Result<GrpcAddr, String> {
    match text.strip_prefix("unix:") {
        Some("") => {
            Err("`unix:` needs a socket path (e.g. \"unix:/run/tokengate/grpc.sock\")".to_owned())
        }
        Some(path) => Ok(GrpcAddr::Unix(path.into())),
        None => parse_addr(text, " or unix:/path/to/socket").map(GrpcAddr::Tcp),
    }
}

/// `listen.http_path_prefix`: `/` followed by path characters, no trailing `/` (Envoy joins
/// it to the original path, which starts with `/`), no query.
fn parse_http_path_prefix(text: &str) -> Result<Option<String>, String> {
    let ok = text.len() > 1
        && text.starts_with('/')
        && !text.ends_with('/')
        && !text.contains("//")
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b));
    if ok {
        Ok(Some(text.to_owned()))
    } else {
        Err(format!(
            "`{text}` must be a path like \"/authz\" (starts with `/`, no trailing `/`, letters, digits, `-._~`)"
        ))
    }
}

/// A header name tokengate may emit or read: lower-case token characters only, not a pseudo
/// header and not `host` (Envoy and gRFC A92 ignore those). Returns the trimmed name.
fn parse_header_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err("header name is empty".to_owned());
    }
    if name.starts_with(':') || name == "host" {
        return Err(format!("`{name}` cannot be used (pseudo-header or host)"));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b));
    if !ok {
        return Err(format!(
            "`{name}` is not a valid lower-case header name (letters, digits, '-')"
        ));
    }
    Ok(name.to_owned())
}

fn validate(raw: RawConfig) -> Result<Config, Vec<FieldError>> {
    let mut p = Problems::default();
    let listen = listen(&raw.listen, &mut p);
    let mut kubernetes = kubernetes(&raw.kubernetes, &mut p);
    let token_sources = token_sources(raw.token_sources.as_ref(), &mut p);
    let default_verification = kubernetes
        .as_ref()
        .map_or(defaults::VERIFICATION, |k| k.verification);
    let routes = routes(&raw.routes, default_verification, &mut p);
    // Local verification needs the watch caches (bound objects) and the keys.
    if let (Some(k), Some(routes)) = (kubernetes.as_mut(), routes.as_ref()) {
        k.watch |= routes.iter().any(|r| r.verification == Verification::Local);
    }
    let mut routes = routes;
    if let (Some(k), Some(routes)) = (kubernetes.as_ref(), routes.as_mut()) {
        for binding in routes.iter_mut().filter_map(|r| r.require_peer.as_mut()) {
            binding.trust_domain.clone_from(&k.trust_domain);
        }
    }
    let watched = kubernetes.as_ref().is_some_and(|k| k.watch);
    let cache = cache(&raw.cache, watched, &mut p);
    let identity_headers =
        identity_headers(&raw.identity_headers, token_sources.as_deref(), &mut p);
    let log = log(&raw.log, &mut p);
    let tracing = tracing(&raw.tracing, &mut p);
    match (
        listen,
        kubernetes,
        token_sources,
        routes,
        cache,
        identity_headers,
        (log, tracing),
    ) {
        (
            Some(listen),
            Some(kubernetes),
            Some(token_sources),
            Some(routes),
            Some(cache),
            Some(identity_headers),
            (Some(log), Some(tracing)),
        ) if p.0.is_empty() => Ok(Config {
            listen,
            kubernetes,
            token_sources,
            routes,
            cache,
            identity_headers,
            log,
            tracing,
        }),
        _ => {
            p.0.sort_by_key(|e| e.line);
            Err(p.0)
        }
    }
}

fn listen(raw: &RawListen, p: &mut Problems) -> Option<Listen> {
    let grpc = p.field(
        "listen.grpc",
        &raw.grpc,
        GrpcAddr::Tcp(defaults::LISTEN_GRPC),
        |g| parse_grpc_addr(g),
    );
    let admin = p.field("listen.admin", &raw.admin, defaults::LISTEN_ADMIN, |a| {
        parse_addr(a, "")
    });
    let limits = grpc_limits(&raw.limits, p);
    let admin_limits = admin_limits(&raw.admin_limits, p);
    let drain_delay = p.field(
        "listen.drain_delay",
        &raw.drain_delay,
        defaults::DRAIN_DELAY,
        |d| parse_duration(d),
    );
    let tls = match &raw.tls {
        None => Some(None),
        Some(t) => listen_tls(t, grpc.as_ref(), p).map(Some),
    };
    // HTTP mode: off unless `listen.http` is set.
    let http = p.field("listen.http", &raw.http, None, |a| {
        parse_addr(a, "").map(Some)
    });
    let http_path_prefix = p.field(
        "listen.http_path_prefix",
        &raw.http_path_prefix,
        None,
        |s| parse_http_path_prefix(s),
    );
    Some(Listen {
        grpc: grpc?,
        admin: admin?,
        limits: limits?,
        admin_limits: admin_limits?,
        drain_delay: drain_delay?,
        tls: tls?,
        http: http?,
        http_path_prefix: http_path_prefix?,
    })
}

/// A duration that must not be zero (takes `&String`: it is passed as `Problems::field`'s
/// parser of a `Spanned<String>`).
#[allow(clippy::ptr_arg)]
fn positive_duration(t: &String) -> Result<Duration, String> {
    match parse_duration(t)? {
        Duration::ZERO => Err("must be greater than zero".to_owned()),
        d => Ok(d),
    }
}

/// A number no greater than `max`.
fn at_most<T: Copy + PartialOrd + fmt::Display>(max: T) -> impl Fn(&T) -> Result<T, String> {
    move |&n| {
        if n > max {
            Err(format!("must be at most {max}"))
        } else {
            Ok(n)
        }
    }
}

/// A number no smaller than `min`.
fn at_least<T: Copy + PartialOrd + fmt::Display>(min: T) -> impl Fn(&T) -> Result<T, String> {
    move |&n| {
        if n < min {
            Err(format!("must be at least {min}"))
        } else {
            Ok(n)
        }
    }
}

/// A count between 1 and `max`; `why` says why the ceiling is there.
fn bounded<T: Copy + TryInto<u64>>(
    max: u64,
    why: &'static str,
) -> impl Fn(&T) -> Result<T, String> {
    move |&n| match n.try_into().unwrap_or(u64::MAX) {
        0 => Err("must be at least 1".to_owned()),
        v if v > max => Err(format!("must be at most {max} ({why})")),
        _ => Ok(n),
    }
}

fn grpc_limits(raw: &RawGrpcLimits, p: &mut Problems) -> Option<GrpcLimits> {
    let f = |name: &str| format!("listen.limits.{name}");
    let max_connections = p.field(
        f("max_connections"),
        &raw.max_connections,
        defaults::GRPC_MAX_CONNECTIONS,
        bounded(
            1_000_000,
            "each connection holds a file descriptor and buffers",
        ),
    );
    let handshake_timeout = p.field(
        f("handshake_timeout"),
        &raw.handshake_timeout,
        defaults::GRPC_HANDSHAKE_TIMEOUT,
        positive_duration,
    );
    let idle_timeout = p.field(
        f("idle_timeout"),
        &raw.idle_timeout,
        defaults::GRPC_IDLE_TIMEOUT,
        positive_duration,
    );
    let keepalive_interval = p.field(
        f("keepalive_interval"),
        &raw.keepalive_interval,
        defaults::GRPC_KEEPALIVE_INTERVAL,
        positive_duration,
    );
    let keepalive_timeout = p.field(
        f("keepalive_timeout"),
        &raw.keepalive_timeout,
        defaults::GRPC_KEEPALIVE_TIMEOUT,
        positive_duration,
    );
    let max_concurrent_streams = p.field(
        f("max_concurrent_streams"),
        &raw.max_concurrent_streams,
        defaults::GRPC_MAX_CONCURRENT_STREAMS,
        bounded(1_000_000, "each stream is a Check in flight"),
    );
    let max_header_list_bytes = p.field(
        f("max_header_list_bytes"),
        &raw.max_header_list_bytes,
        defaults::GRPC_MAX_HEADER_LIST_BYTES,
        bounded(16 << 20, "hyper's own ceiling"),
    );
    let max_message_bytes = p.field(
        f("max_message_bytes"),
        &raw.max_message_bytes,
        defaults::GRPC_MAX_MESSAGE_BYTES,
        bounded(
            64 << 20,
            "Envoy sends at most 8 MiB of headers plus the buffered body",
        ),
    );
    let (idle, interval, timeout) = (idle_timeout?, keepalive_interval?, keepalive_timeout?);
    if idle <= interval + timeout {
        p.push(
            f("idle_timeout"),
            raw.idle_timeout.as_ref().map_or(0, line),
            format!(
                "must be longer than keepalive_interval + keepalive_timeout ({:?}), or healthy idle connections are closed",
                interval + timeout
            ),
        );
        return None;
    }
    Some(GrpcLimits {
        max_connections: max_connections?,
        handshake_timeout: handshake_timeout?,
        idle_timeout: idle,
        keepalive_interval: interval,
        keepalive_timeout: timeout,
        max_concurrent_streams: max_concurrent_streams?,
        max_header_list_bytes: max_header_list_bytes?,
        max_message_bytes: max_message_bytes?,
    })
}

fn admin_limits(raw: &RawAdminLimits, p: &mut Problems) -> Option<AdminLimits> {
    let max_connections = p.field(
        "listen.admin_limits.max_connections",
        &raw.max_connections,
        defaults::ADMIN_MAX_CONNECTIONS,
        bounded(
            100_000,
            "each connection holds a file descriptor and buffers",
        ),
    );
    let header_read_timeout = p.field(
        "listen.admin_limits.header_read_timeout",
        &raw.header_read_timeout,
        defaults::ADMIN_HEADER_READ_TIMEOUT,
        positive_duration,
    );
    let idle_timeout = p.field(
        "listen.admin_limits.idle_timeout",
        &raw.idle_timeout,
        defaults::ADMIN_IDLE_TIMEOUT,
        positive_duration,
    );
    Some(AdminLimits {
        max_connections: max_connections?,
        header_read_timeout: header_read_timeout?,
        idle_timeout: idle_timeout?,
    })
}

/// `listen.tls`: paths and interval, then the files themselves (readable, a certificate, a
/// key that matches it, a client CA), so `check-config` catches what start-up would.
fn listen_tls(
    raw: &Spanned<RawTls>,
    grpc: Option<&GrpcAddr>,
    p: &mut Problems,
) -> Option<TlsSettings> {
    if let Some(GrpcAddr::Unix(_)) = grpc {
        p.push(
            "listen.tls",
            line(raw),
            "TLS applies to a TCP listener; a Unix socket is reachable only inside the pod",
        );
        return None;
    }
    let t = &raw.value;
    let path = |p: &mut Problems, field: &str, v: &Spanned<String>| {
        p.parsed(format!("listen.tls.{field}"), v, |s| match s.trim() {
            "" => Err("must name a file".to_owned()),
            s => Ok(PathBuf::from(s)),
        })
    };
    let cert_file = path(p, "cert_file", &t.cert_file);
    let key_file = path(p, "key_file", &t.key_file);
    let client_ca_file = match &t.client_ca_file {
        None => Some(None),
        Some(v) => path(p, "client_ca_file", v).map(Some),
    };
    let reload_interval = p.field(
        "listen.tls.reload_interval",
        &t.reload_interval,
        defaults::TLS_RELOAD_INTERVAL,
        positive_duration,
    );
    let settings = TlsSettings {
        cert_file: cert_file?,
        key_file: key_file?,
        client_ca_file: client_ca_file?,
        reload_interval: reload_interval?,
    };
    if let Err(e) = crate::tls::check(&settings) {
        let at = match e.field() {
            "key_file" => line(&t.key_file),
            "client_ca_file" => t.client_ca_file.as_ref().map_or(line(raw), line),
            _ => line(&t.cert_file),
        };
        p.push(format!("listen.tls.{}", e.field()), at, e.to_string());
        return None;
    }
    Some(settings)
}

fn kubernetes(raw: &RawKubernetes, p: &mut Problems) -> Option<Kubernetes> {
    let timeout = p.field(
        "kubernetes.timeout",
        &raw.timeout,
        defaults::KUBE_TIMEOUT,
        positive_duration,
    );
    let retries = p.field(
        "kubernetes.retries",
        &raw.retries,
        defaults::KUBE_RETRIES,
        at_most(10),
    );
    let max_in_flight = p.field(
        "kubernetes.max_in_flight",
        &raw.max_in_flight,
        defaults::KUBE_MAX_IN_FLIGHT,
        at_least(1),
    );
    let max_queued = p.field(
        "kubernetes.max_queued",
        &raw.max_queued,
        defaults::KUBE_MAX_QUEUED,
        at_most(1_000_000),
    );
    let retry_budget_percent = p.field(
        "kubernetes.retry_budget_percent",
        &raw.retry_budget_percent,
        defaults::KUBE_RETRY_BUDGET_PERCENT,
        at_most(100),
    );
    let retry_budget_min_per_second = p.field(
        "kubernetes.retry_budget_min_per_second",
        &raw.retry_budget_min_per_second,
        defaults::KUBE_RETRY_BUDGET_MIN_PER_SECOND,
        at_most(10_000),
    );
    let verification = p.field(
        "kubernetes.verification",
        &raw.verification,
        defaults::VERIFICATION,
        |v| Verification::parse(v),
    );
    let watch_namespaces = p.list("kubernetes.watch_namespaces", &raw.watch_namespaces, |n| {
        let n = n.trim();
        let dns_label = !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !n.starts_with('-')
            && !n.ends_with('-');
        if dns_label {
            Ok(n.to_owned())
        } else {
            Err(format!("`{n}` is not a namespace name (a DNS label)"))
        }
    });
    let max_staleness = p.field(
        "kubernetes.max_staleness",
        &raw.max_staleness,
        defaults::MAX_STALENESS,
        positive_duration,
    );
    let jwks_refresh = p.field(
        "kubernetes.jwks_refresh",
        &raw.jwks_refresh,
        defaults::JWKS_REFRESH,
        |t| match parse_duration(t)? {
            d if d < Duration::from_secs(1) => Err("must be at least 1s".to_owned()),
            d => Ok(d),
        },
    );
    let kubeconfig = p.field("kubernetes.kubeconfig", &raw.kubeconfig, None, |c| {
        if c.trim().is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(Some(PathBuf::from(c)))
        }
    });
    let issuer = p.field("kubernetes.issuer", &raw.issuer, None, |i| {
        if i.is_empty() || i.contains(char::is_whitespace) {
            Err("must be the API server's --service-account-issuer, e.g. https://kubernetes.default.svc.cluster.local".to_owned())
        } else {
            Ok(Some(i.clone()))
        }
    });
    Some(Kubernetes {
        issuer: issuer?,
        kubeconfig: kubeconfig?,
        context: raw.context.as_ref().map(|c| c.value.clone()),
        timeout: timeout?,
        retries: retries?,
        max_in_flight: max_in_flight?,
        max_queued: max_queued?,
        retry_budget_percent: retry_budget_percent?,
        retry_budget_min_per_second: retry_budget_min_per_second?,
        verification: verification?,
        watch: raw.watch.as_ref().is_some_and(|w| w.value),
        watch_namespaces: watch_namespaces?,
        max_staleness: max_staleness?,
        jwks_refresh: jwks_refresh?,
        trust_domain: p.field("kubernetes.trust_domain", &raw.trust_domain, None, |t| {
            crate::peer::parse_trust_domain(t).map(Some)
        })?,
    })
}

fn token_sources(
    raw: Option<&Spanned<Vec<RawTokenSource>>>,
    p: &mut Problems,
) -> Option<Vec<TokenSource>> {
    let Some(list) = raw else {
        return Some(vec![TokenSource {
            header: defaults::TOKEN_HEADER.to_owned(),
            scheme: Some(defaults::TOKEN_SCHEME.to_owned()),
        }]);
    };
    if list.value.is_empty() {
        p.push(
            "token_sources",
            line(list),
            "at least one token source is required",
        );
    }
    let mut seen = HashSet::new();
    let mut sources = Vec::new();
    let mut ok = true;
    for (i, s) in list.value.iter().enumerate() {
        let field = format!("token_sources[{i}].header");
        let header = p.parsed(&field, &s.header, |h| {
            let h = parse_header_name(&h.to_ascii_lowercase())?;
            if seen.contains(&h) {
                return Err(format!("`{h}` is listed twice"));
            }
            seen.insert(h.clone());
            Ok(h)
        });
        let scheme = p.field(
            format!("token_sources[{i}].scheme"),
            &s.scheme,
            None,
            |sc| {
                let v = sc.trim();
                if v.is_empty() || v.contains(char::is_whitespace) {
                    Err("must be one word, e.g. Bearer".to_owned())
                } else {
                    Ok(Some(v.to_owned()))
                }
            },
        );
        match (header, scheme) {
            (Some(header), Some(scheme)) => sources.push(TokenSource { header, scheme }),
            _ => ok = false,
        }
    }
    (ok && !sources.is_empty()).then_some(sources)
}

fn routes(
    raw: &Spanned<Vec<RawRoute>>,
    default_verification: Verification,
    p: &mut Problems,
) -> Option<Vec<RouteConfig>> {
    if raw.value.is_empty() {
        p.push(
            "routes",
            line(raw),
            "at least one route is required (every request would be denied)",
        );
    }
    let mut names = HashSet::new();
    let mut catch_all: Option<&str> = None;
    let mut routes = Vec::new();
    for (i, r) in raw.value.iter().enumerate() {
        let name = r.name.value.trim();
        if name.is_empty() {
            p.push(
                format!("routes[{i}].name"),
                line(&r.name),
                "must not be empty",
            );
        } else if !names.insert(name) {
            p.push(
                format!("routes[{i}].name"),
                line(&r.name),
                format!("route `{name}` is defined twice"),
            );
        }
        if let Some(earlier) = catch_all {
            p.push(
                format!("routes[{i}].name"),
                line(&r.name),
                format!("unreachable: route `{earlier}` before it has no `match` and catches every request"),
            );
        }
        let route = route(&format!("routes[{i}]"), r, default_verification, p);
        let matches_all = match &route {
            Some(route) => route
                .matcher
                .as_ref()
                .is_none_or(|m| m.matches_everything()),
            None => r.matcher.is_none(),
        };
        if matches_all && catch_all.is_none() {
            catch_all = Some(name);
        }
        routes.extend(route);
    }
    (routes.len() == raw.value.len() && !routes.is_empty()).then_some(routes)
}

/// One route, `f` its field path (`routes[3]`).
fn route(
    f: &str,
    r: &RawRoute,
    default_verification: Verification,
    p: &mut Problems,
) -> Option<RouteConfig> {
    if r.audiences.value.is_empty() {
        p.push(
            format!("{f}.audiences"),
            line(&r.audiences),
            "at least one audience is required",
        );
    }
    let audiences = p.list(&format!("{f}.audiences"), &r.audiences.value, |a| {
        if a.trim().is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(a.clone())
        }
    });
    let matcher = match &r.matcher {
        None => Some(None),
        Some(m) => matcher(&format!("{f}.match"), &m.value, p).map(Some),
    };
    let allow = match &r.allow {
        None => Some(None),
        Some(a) => allow(&format!("{f}.allow"), a, p).map(Some),
    };
    let invalid_token_status = p.field(
        format!("{f}.invalid_token_status"),
        &r.invalid_token_status,
        defaults::INVALID_TOKEN_STATUS,
        |&s| match s {
            401 | 403 => Ok(s),
            _ => Err("must be 401 or 403".to_owned()),
        },
    );
    let verification = p.field(
        format!("{f}.verification"),
        &r.verification,
        default_verification,
        |v| Verification::parse(v),
    );
    let require_peer = p.field(format!("{f}.require_peer"), &r.require_peer, false, |v| {
        parse_require_peer(v)
    });
    let mode = p.field(format!("{f}.mode"), &r.mode, Mode::Enforce, |m| {
        Mode::parse(m)
    });
    Some(RouteConfig {
        require_peer: require_peer?.then_some(crate::peer::PeerBinding { trust_domain: None }),
        mode: mode?,
        name: r.name.value.trim().to_owned(),
        matcher: matcher?,
        audiences: audiences?,
        allow: allow?,
        strip_token: r.strip_token,
        invalid_token_status: invalid_token_status?,
        verification: verification?,
    })
}

fn matcher(f: &str, m: &RawMatch, p: &mut Problems) -> Option<Matcher> {
    let hosts = p.list(&format!("{f}.hosts"), &m.hosts, |h| HostPattern::parse(h));
    let path_prefix = p.field(format!("{f}.path_prefix"), &m.path_prefix, None, |pp| {
        Matcher::parse_path_prefix(pp)
    });
    let methods = p.list(&format!("{f}.methods"), &m.methods, |me| {
        Matcher::parse_method(me)
    });
    Some(Matcher {
        context_extensions: m.context_extensions.clone(),
        hosts: hosts?,
        path_prefix: path_prefix?,
        methods: methods?,
    })
}

fn allow(f: &str, a: &RawAllow, p: &mut Problems) -> Option<AllowList> {
    let service_accounts = p.list(&format!("{f}.service_accounts"), &a.service_accounts, |s| {
        ServiceAccountPattern::parse(s)
    });
    let namespaces = p.list(&format!("{f}.namespaces"), &a.namespaces, |n| {
        Glob::parse(n)
    });
    let groups = p.list(&format!("{f}.groups"), &a.groups, |g| Glob::parse(g));
    let rbac = match &a.rbac {
        None => Some(None),
        Some(r) => rbac_rule(&format!("{f}.rbac"), r, p).map(Some),
    };
    Some(AllowList {
        service_accounts: service_accounts?,
        namespaces: namespaces?,
        groups: groups?,
        rbac: rbac?,
    })
}

/// `allow.rbac`: the verb (`from_method` or a fixed lower-case verb) and exactly one of a
/// resource and a non-resource path (`request` or a fixed absolute path).
fn rbac_rule(f: &str, r: &Spanned<RawRbac>, p: &mut Problems) -> Option<crate::rbac::Rule> {
    use crate::rbac::{PathSource, Rule, Target, Verb};
    let verb = p.field(format!("{f}.verb"), &r.value.verb, Verb::FromMethod, |v| {
        match v.trim() {
            "from_method" => Ok(Verb::FromMethod),
            v if !v.is_empty() && v.bytes().all(|b| b.is_ascii_lowercase() || b == b'*') => {
                Ok(Verb::Fixed(v.to_owned()))
            }
            v => Err(format!(
                "`{v}` is not `from_method` or a Kubernetes verb (get, list, create, update, patch, delete, ...)"
            )),
        }
    });
    let name_like = |what: &str, v: &str| {
        if v.contains('/') || v.trim() != v {
            Err(format!("{what} `{v}` must not contain `/` or spaces"))
        } else {
            Ok(v.to_owned())
        }
    };
    let target = match (&r.value.resource, &r.value.non_resource_path) {
        (Some(res), None) => {
            let x = &res.value;
            let checked = [
                ("group", &x.group),
                ("subresource", &x.subresource),
                ("name", &x.name),
                ("namespace", &x.namespace),
            ]
            .map(|(k, v)| p.parsed(format!("{f}.resource.{k}"), res, |_| name_like(k, v)));
            let resource = p.parsed(format!("{f}.resource.resource"), &x.resource, |v| {
                if v.is_empty() {
                    Err("must not be empty (e.g. `services`)".to_owned())
                } else {
                    name_like("resource", v)
                }
            });
            match (checked, resource) {
                ([Some(group), Some(subresource), Some(name), Some(namespace)], Some(resource)) => {
                    Some(Target::Resource {
                        group,
                        resource,
                        subresource,
                        name,
                        namespace,
                    })
                }
                _ => None,
            }
        }
        (None, Some(path)) => p.parsed(format!("{f}.non_resource_path"), path, |v| {
            match v.as_str() {
                "request" => Ok(Target::Path(PathSource::Request)),
                v if v.starts_with('/') && !v.contains(char::is_whitespace) => {
                    Ok(Target::Path(PathSource::Fixed(v.to_owned())))
                }
                v => Err(format!(
                    "`{v}` is not `request` or an absolute path such as `/data-store`"
                )),
            }
        }),
        _ => {
            p.push(
                f,
                line(r),
                "give exactly one of `resource` and `non_resource_path`",
            );
            None
        }
    };
    Some(Rule {
        verb: verb?,
        target: target?,
    })
}

/// `watched`: revocations are pushed by watches, so positive verdicts may live to `exp`.
fn cache(raw: &RawCache, watched: bool, p: &mut Problems) -> Option<CacheConfig> {
    let max_entries = p.field(
        "cache.max_entries",
        &raw.max_entries,
        defaults::CACHE_MAX_ENTRIES,
        |&m| capacity(m),
    );
    let default_ttl = if watched {
        defaults::CACHE_TTL_WATCHED
    } else {
        defaults::CACHE_TTL
    };
    let ttl = p.field("cache.ttl", &raw.ttl, default_ttl, |t| parse_duration(t));
    let negative_max_entries = match (&raw.negative_max_entries, max_entries) {
        (None, Some(m)) => Some(defaults::cache_negative_max_entries(m)),
        (None, None) => None,
        (Some(n), _) => p.parsed("cache.negative_max_entries", n, |&n| capacity(n)),
    };
    let negative_ttl = p.field(
        "cache.negative_ttl",
        &raw.negative_ttl,
        defaults::CACHE_NEGATIVE_TTL,
        |t| parse_duration(t),
    );
    let rbac_max_entries = p.field(
        "cache.rbac_max_entries",
        &raw.rbac_max_entries,
        defaults::RBAC_CACHE_MAX_ENTRIES,
        |&m| capacity(m),
    );
    let rbac_ttl = p.field("cache.rbac_ttl", &raw.rbac_ttl, defaults::RBAC_TTL, |t| {
        parse_duration(t)
    });
    let rbac_denied_ttl = p.field(
        "cache.rbac_denied_ttl",
        &raw.rbac_denied_ttl,
        defaults::RBAC_DENIED_TTL,
        |t| parse_duration(t),
    );
    Some(CacheConfig {
        max_entries: max_entries?,
        negative_max_entries: negative_max_entries?,
        ttl: ttl?,
        negative_ttl: negative_ttl?,
        rbac: crate::rbac::CacheSettings {
            max_entries: rbac_max_entries?,
            allowed_ttl: rbac_ttl?,
            denied_ttl: rbac_denied_ttl?,
        },
    })
}

/// A cache capacity: at least 1, at most [`defaults::CACHE_MAX_ENTRIES_LIMIT`]. Memory is
/// allocated as entries arrive, but a capacity is a promise of memory.
fn capacity(m: usize) -> Result<NonZeroUsize, String> {
    match NonZeroUsize::new(m) {
        None => Err("must be at least 1 (set ttl: 0s to disable caching)".to_owned()),
        Some(_) if m > defaults::CACHE_MAX_ENTRIES_LIMIT => Err(format!(
            "must be at most {} (each entry takes about 1 KiB, so {m} entries could need {} GiB)",
            defaults::CACHE_MAX_ENTRIES_LIMIT,
            m / (1 << 20)
        )),
        Some(m) => Ok(m),
    }
}

fn identity_headers(
    raw: &RawIdentityHeaders,
    token_sources: Option<&[TokenSource]>,
    p: &mut Problems,
) -> Option<IdentityHeaders> {
    let fields = [
        ("user", &raw.user, defaults::HEADER_USER),
        ("namespace", &raw.namespace, defaults::HEADER_NAMESPACE),
        ("name", &raw.name, defaults::HEADER_NAME),
        ("uid", &raw.uid, defaults::HEADER_UID),
        ("groups", &raw.groups, defaults::HEADER_GROUPS),
        ("pod_name", &raw.pod_name, defaults::HEADER_POD_NAME),
        ("pod_uid", &raw.pod_uid, defaults::HEADER_POD_UID),
    ];
    let mut names: Vec<String> = Vec::with_capacity(fields.len());
    let mut ok = true;
    for (field, value, default) in fields {
        let field = format!("identity_headers.{field}");
        let ln = value.as_ref().map_or(0, line);
        let Some(name) = p.field(&field, value, default.to_owned(), |v| parse_header_name(v))
        else {
            ok = false;
            continue;
        };
        if names.contains(&name) {
            p.push(
                &field,
                ln,
                format!("`{name}` is used for two identity headers"),
            );
            ok = false;
        }
        if token_sources
            .unwrap_or_default()
            .iter()
            .any(|s| s.header == name)
        {
            p.push(&field, ln, format!("`{name}` is also a token source"));
            ok = false;
        }
        names.push(name);
    }
    let [user, namespace, name, uid, groups, pod_name, pod_uid] =
        <[String; 7]>::try_from(names).ok()?;
    ok.then_some(IdentityHeaders {
        user,
        namespace,
        name,
        uid,
        groups,
        pod_name,
        pod_uid,
    })
}

fn log(raw: &RawLog, p: &mut Problems) -> Option<LogConfig> {
    let level = p.field(
        "log.level",
        &raw.level,
        defaults::LOG_LEVEL.to_owned(),
        |l| {
            let level = l.trim();
            if level.is_empty() || tracing_subscriber::EnvFilter::try_new(level).is_err() {
                Err(format!(
                "`{level}` is not a level (trace, debug, info, warn, error) or filter directive"
            ))
            } else {
                Ok(level.to_owned())
            }
        },
    );
    let decisions = p.field(
        "log.decisions",
        &raw.decisions,
        defaults::LOG_DECISIONS,
        |d| DecisionLogMode::parse(d),
    );
    let decisions_per_second = p.field(
        "log.decisions_per_second",
        &raw.decisions_per_second,
        defaults::LOG_DECISIONS_PER_SECOND,
        |&n| {
            if (1..=defaults::LOG_DECISIONS_PER_SECOND_LIMIT).contains(&n) {
                Ok(n)
            } else {
                Err(format!(
                    "must be 1..={} (set `decisions: off` to log none)",
                    defaults::LOG_DECISIONS_PER_SECOND_LIMIT
                ))
            }
        },
    );
    Some(LogConfig {
        format: raw.format.unwrap_or_default(),
        level: level?,
        decisions: decisions?,
        decisions_per_second: decisions_per_second?,
    })
}

fn tracing(raw: &RawTracing, p: &mut Problems) -> Option<TracingConfig> {
    let otlp_endpoint = p.field("tracing.otlp_endpoint", &raw.otlp_endpoint, None, |e| {
        parse_otlp_endpoint(e).map(Some)
    });
    let sample_ratio = p.field(
        "tracing.sample_ratio",
        &raw.sample_ratio,
        defaults::TRACING_SAMPLE_RATIO,
        |&r| {
            if (0.0..=1.0).contains(&r) {
                Ok(r)
            } else {
                Err(format!("`{r}` is not a ratio between 0 and 1"))
            }
        },
    );
    let service_name = p.field(
        "tracing.service_name",
        &raw.service_name,
        defaults::TRACING_SERVICE_NAME.to_owned(),
        |n| match n.trim() {
            "" => Err("is empty".to_owned()),
            n => Ok(n.to_owned()),
        },
    );
    Some(TracingConfig {
        otlp_endpoint: otlp_endpoint?,
        sample_ratio: sample_ratio?,
        service_name: service_name?,
    })
}

/// An OTLP/gRPC endpoint: `http://` or `https://`, a host, an optional port, no path.
pub fn parse_otlp_endpoint(text: &str) -> Result<String, String> {
    let text = text.trim();
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("`{text}` is not a URL like \"http://otel-collector:4317\""))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let path_ok = uri.path_and_query().is_none_or(|p| p.as_str() == "/");
    if !scheme_ok || uri.host().is_none_or(str::is_empty) || !path_ok {
        return Err(format!(
            "`{text}` is not an OTLP/gRPC endpoint like \"http://otel-collector:4317\" (http or https, host, optional port, no path)"
        ));
    }
    Ok(text.to_owned())
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
        assert_eq!(c.cache.max_entries.get(), 100_000);
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
    fn decision_log_and_tracing_settings() {
        let c = Config::from_yaml_str(
            "routes: [{name: a, audiences: [a]}]\n\
             log: {decisions: off, decisions_per_second: 5}\n\
             tracing: {otlp_endpoint: 'http://collector.observability:4317', sample_ratio: 0.25}\n",
        )
        .unwrap();
        assert_eq!(c.log.decisions, DecisionLogMode::Off);
        assert_eq!(c.log.decisions_per_second, 5);
        assert_eq!(
            c.tracing.otlp_endpoint.as_deref(),
            Some("http://collector.observability:4317")
        );
        assert_eq!(c.tracing.sample_ratio, 0.25);
        let c =
            Config::from_yaml_str("routes: [{name: a, audiences: [a]}]\nlog: {decisions: all}\n")
                .unwrap();
        assert_eq!(c.log.decisions, DecisionLogMode::All);

        // Every problem at once, each with its field and line.
        let e = errors(
            "routes: [{name: a, audiences: [a]}]\n\
             log:\n  decisions: some\n  decisions_per_second: 0\n\
             tracing:\n  otlp_endpoint: collector:4317\n  sample_ratio: 1.5\n  service_name: ' '\n",
        );
        let fields: Vec<(&str, usize)> = e.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            fields,
            [
                ("log.decisions", 3),
                ("log.decisions_per_second", 4),
                ("tracing.otlp_endpoint", 6),
                ("tracing.sample_ratio", 7),
                ("tracing.service_name", 8),
            ],
            "{e:?}"
        );
        for bad in ["ftp://c:4317", "http://c:4317/v1/traces", "http://", "c"] {
            assert!(parse_otlp_endpoint(bad).is_err(), "{bad}");
        }
        for good in ["http://c:4317", "https://c.example", "http://[::1]:4317/"] {
            assert!(parse_otlp_endpoint(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn missing_field_names_the_field() {
        let e = errors("routes:\n  - name: a\n");
        assert_eq!(e[0].field, "routes[0].audiences");
        assert_eq!(e[0].line, 2);
    }

    #[test]
    fn allow_rbac_parses_and_names_its_problems() {
        use crate::rbac::{PathSource, Rule, Target, Verb};
        let route = |rbac: &str| {
            format!("routes:\n  - name: a\n    audiences: [a]\n    allow:\n      rbac: {rbac}\n")
        };
        let c = Config::from_yaml_str(&route(
            "{resource: {resource: services, subresource: proxy, name: s, namespace: n}}",
        ))
        .unwrap();
        let allow = c.routes[0].allow.as_ref().unwrap();
        assert_eq!(
            allow.rbac,
            Some(Rule {
                verb: Verb::FromMethod,
                target: Target::Resource {
                    group: String::new(),
                    resource: "services".into(),
                    subresource: "proxy".into(),
                    name: "s".into(),
                    namespace: "n".into(),
                },
            })
        );
        assert!(
            allow.service_accounts.is_empty(),
            "rbac alone: no static lists"
        );
        let c = Config::from_yaml_str(&route("{verb: get, non_resource_path: request}")).unwrap();
        assert_eq!(
            c.routes[0]
                .allow
                .as_ref()
                .unwrap()
                .rbac
                .as_ref()
                .unwrap()
                .target,
            Target::Path(PathSource::Request)
        );
        assert_eq!(c.cache.rbac.allowed_ttl, Duration::from_secs(10));
        assert_eq!(c.cache.rbac.denied_ttl, Duration::from_secs(5));
        for (rbac, field) in [
            ("{verb: get}", "routes[0].allow.rbac"),
            (
                "{non_resource_path: /x, resource: {resource: s}}",
                "routes[0].allow.rbac",
            ),
            (
                "{verb: GET, non_resource_path: /x}",
                "routes[0].allow.rbac.verb",
            ),
            (
                "{non_resource_path: x}",
                "routes[0].allow.rbac.non_resource_path",
            ),
            (
                "{resource: {resource: \"\"}}",
                "routes[0].allow.rbac.resource.resource",
            ),
            (
                "{resource: {resource: pods/log}}",
                "routes[0].allow.rbac.resource.resource",
            ),
            (
                "{resource: {resource: pods, namespace: a/b}}",
                "routes[0].allow.rbac.resource.namespace",
            ),
        ] {
            let e = errors(&route(rbac));
            assert_eq!(e.len(), 1, "{rbac}: {e:?}");
            assert_eq!(e[0].field, field, "{rbac}");
            assert_eq!(e[0].line, 5, "{rbac}");
        }
        let e = errors(&route("{non_resource_path: /x, verbs: [get]}"));
        assert!(e[0].message.contains("unknown field"), "{e:?}");
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
    fn drain_delay_is_a_duration() {
        let c = Config::from_yaml_str(
            "listen:\n  drain_delay: 0s\nroutes:\n  - name: all\n    audiences: [a]\n",
        )
        .unwrap();
        assert_eq!(c.listen.drain_delay, Duration::ZERO);
        let e = errors("routes:\n  - name: all\n    audiences: [a]\nlisten:\n  drain_delay: 5\n");
        assert_eq!(
            (e[0].field.as_str(), e[0].line),
            ("listen.drain_delay", 5),
            "{e:?}"
        );
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
    fn peer_binding_and_audit_mode() {
        let c = Config::from_yaml_str(
            "kubernetes:\n  trust_domain: cluster.local\nroutes:\n  - name: a\n    audiences: [a]\n    require_peer: service_account\n    mode: audit\n",
        )
        .unwrap();
        let r = &c.routes[0];
        assert_eq!(r.mode, Mode::Audit);
        assert_eq!(
            r.require_peer.as_ref().unwrap().trust_domain.as_deref(),
            Some("cluster.local")
        );
        let c = Config::from_yaml_str("routes:\n  - name: a\n    audiences: [a]\n").unwrap();
        assert_eq!(
            (c.routes[0].mode, c.routes[0].require_peer.as_ref()),
            (Mode::Enforce, None)
        );
        let e = errors(
            "kubernetes:\n  trust_domain: Cluster.Local\nroutes:\n  - name: a\n    audiences: [a]\n    require_peer: pod\n    mode: dry-run\n",
        );
        let fields: Vec<_> = e.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            fields,
            vec![
                ("kubernetes.trust_domain", 2),
                ("routes[0].require_peer", 6),
                ("routes[0].mode", 7)
            ]
        );
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
        assert_eq!(c.listen.grpc, GrpcAddr::Tcp(defaults::LISTEN_GRPC));
        assert_eq!(c.log.decisions, defaults::LOG_DECISIONS);
        assert_eq!(
            c.log.decisions_per_second,
            defaults::LOG_DECISIONS_PER_SECOND
        );
        assert_eq!(c.tracing.otlp_endpoint, None, "tracing is off by default");
        assert_eq!(c.tracing.sample_ratio, defaults::TRACING_SAMPLE_RATIO);
        assert_eq!(c.tracing.service_name, defaults::TRACING_SERVICE_NAME);
        assert_eq!(c.listen.admin, defaults::LISTEN_ADMIN);
        assert_eq!(c.listen.drain_delay, defaults::DRAIN_DELAY);
        assert_eq!(c.kubernetes.retries, defaults::KUBE_RETRIES);
        assert_eq!(c.kubernetes.max_in_flight, defaults::KUBE_MAX_IN_FLIGHT);
        assert_eq!(c.cache.max_entries, defaults::CACHE_MAX_ENTRIES);
        assert_eq!(c.cache.ttl, defaults::CACHE_TTL);
        assert_eq!(c.cache.negative_ttl, defaults::CACHE_NEGATIVE_TTL);
        assert_eq!(
            c.routes[0].invalid_token_status,
            defaults::INVALID_TOKEN_STATUS
        );
        assert_eq!(c.identity_headers.user, defaults::HEADER_USER);
        assert_eq!(c.log.level, defaults::LOG_LEVEL);
        assert_eq!(c.log.decisions, defaults::LOG_DECISIONS);
        assert_eq!(
            c.log.decisions_per_second,
            defaults::LOG_DECISIONS_PER_SECOND
        );
        assert_eq!(c.tracing.otlp_endpoint, None);
        assert_eq!(c.tracing.sample_ratio, defaults::TRACING_SAMPLE_RATIO);
        let limits = &c.listen.limits;
        assert_eq!(limits.max_connections, defaults::GRPC_MAX_CONNECTIONS);
        assert_eq!(limits.handshake_timeout, defaults::GRPC_HANDSHAKE_TIMEOUT);
        assert_eq!(limits.idle_timeout, defaults::GRPC_IDLE_TIMEOUT);
        assert_eq!(limits.keepalive_interval, defaults::GRPC_KEEPALIVE_INTERVAL);
        assert_eq!(limits.keepalive_timeout, defaults::GRPC_KEEPALIVE_TIMEOUT);
        assert_eq!(
            limits.max_concurrent_streams,
            defaults::GRPC_MAX_CONCURRENT_STREAMS
        );
        assert_eq!(
            limits.max_header_list_bytes,
            defaults::GRPC_MAX_HEADER_LIST_BYTES
        );
        assert_eq!(limits.max_message_bytes, defaults::GRPC_MAX_MESSAGE_BYTES);
        let admin = &c.listen.admin_limits;
        assert_eq!(admin.max_connections, defaults::ADMIN_MAX_CONNECTIONS);
        assert_eq!(
            admin.header_read_timeout,
            defaults::ADMIN_HEADER_READ_TIMEOUT
        );
        assert_eq!(admin.idle_timeout, defaults::ADMIN_IDLE_TIMEOUT);
        assert_eq!(
            c.cache.negative_max_entries,
            defaults::cache_negative_max_entries(defaults::CACHE_MAX_ENTRIES)
        );
    }

    // --- issue 12: cache bounds, listen limits, issuer ---

    const ROUTE: &str = "routes:\n  - name: a\n    audiences: [a]\n";

    #[test]
    fn cache_capacity_is_bounded_with_the_reason() {
        let e = errors(&format!("cache:\n  max_entries: 1000000000000\n{ROUTE}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].field.as_str(), e[0].line), ("cache.max_entries", 2));
        assert!(
            e[0].message.contains("at most 10000000"),
            "{}",
            e[0].message
        );
        assert!(e[0].message.contains("GiB"), "{}", e[0].message);
        let c =
            Config::from_yaml_str(&format!("cache:\n  max_entries: 10000000\n{ROUTE}")).unwrap();
        assert_eq!(c.cache.max_entries.get(), 10_000_000);
        assert_eq!(c.cache.negative_max_entries.get(), 1_000_000);
        let e = errors(&format!("cache:\n  negative_max_entries: 0\n{ROUTE}"));
        assert_eq!(e[0].field, "cache.negative_max_entries");
    }

    #[test]
    fn negative_capacity_defaults_to_a_tenth() {
        let c = Config::from_yaml_str(&format!("cache:\n  max_entries: 5\n{ROUTE}")).unwrap();
        assert_eq!(c.cache.negative_max_entries.get(), 1);
        let c = Config::from_yaml_str(&format!(
            "cache:\n  max_entries: 50\n  negative_max_entries: 7\n{ROUTE}"
        ))
        .unwrap();
        assert_eq!(c.cache.negative_max_entries.get(), 7);
    }

    #[test]
    fn listen_limits_are_validated() {
        let yaml = format!(
            "listen:\n  limits:\n    max_connections: 0\n    handshake_timeout: 0s\n    idle_timeout: 30s\n    max_message_bytes: 1000000000\n  admin_limits:\n    header_read_timeout: soon\n{ROUTE}"
        );
        let got: Vec<(String, usize)> = errors(&yaml)
            .into_iter()
            .map(|e| (e.field, e.line))
            .collect();
        for want in [
            ("listen.limits.max_connections", 3),
            ("listen.limits.handshake_timeout", 4),
            ("listen.limits.idle_timeout", 5),
            ("listen.limits.max_message_bytes", 6),
            ("listen.admin_limits.header_read_timeout", 8),
        ] {
            assert!(
                got.contains(&(want.0.to_owned(), want.1)),
                "{want:?} in {got:?}"
            );
        }
        let c = Config::from_yaml_str(&format!(
            "listen:\n  limits:\n    handshake_timeout: 1s\n    idle_timeout: 3s\n    keepalive_interval: 1s\n    keepalive_timeout: 1s\n{ROUTE}"
        ))
        .unwrap();
        assert_eq!(c.listen.limits.idle_timeout, Duration::from_secs(3));
    }

    #[test]
    fn kubernetes_bounds_name_their_limit() {
        let e = errors(&format!(
            "kubernetes:\n  retries: 11\n  max_in_flight: 0\n  max_queued: 1000001\n  retry_budget_percent: 101\n  retry_budget_min_per_second: 10001\n{ROUTE}"
        ));
        let got: Vec<(&str, usize, &str)> = e
            .iter()
            .map(|e| (e.field.as_str(), e.line, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("kubernetes.retries", 2, "must be at most 10"),
                ("kubernetes.max_in_flight", 3, "must be at least 1"),
                ("kubernetes.max_queued", 4, "must be at most 1000000"),
                ("kubernetes.retry_budget_percent", 5, "must be at most 100"),
                (
                    "kubernetes.retry_budget_min_per_second",
                    6,
                    "must be at most 10000"
                ),
            ]
        );
        let c = Config::from_yaml_str(&format!(
            "kubernetes:\n  retries: 10\n  max_in_flight: 1\n  max_queued: 1000000\n  retry_budget_percent: 100\n  retry_budget_min_per_second: 10000\n{ROUTE}"
        ))
        .unwrap();
        let k = &c.kubernetes;
        assert_eq!(
            (k.retries, k.max_in_flight, k.max_queued),
            (10, 1, 1_000_000)
        );
        assert_eq!(
            (k.retry_budget_percent, k.retry_budget_min_per_second),
            (100, 10_000)
        );
    }

    #[test]
    fn issuer() {
        let c = Config::from_yaml_str(&format!(
            "kubernetes:\n  issuer: https://kubernetes.default.svc\n{ROUTE}"
        ))
        .unwrap();
        assert_eq!(
            c.kubernetes.issuer.as_deref(),
            Some("https://kubernetes.default.svc")
        );
        assert_eq!(
            Config::from_yaml_str(ROUTE).unwrap().kubernetes.issuer,
            None
        );
        let e = errors(&format!("kubernetes:\n  issuer: \"\"\n{ROUTE}"));
        assert_eq!((e[0].field.as_str(), e[0].line), ("kubernetes.issuer", 2));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Arbitrary text never panics the parser.
            #[test]
            fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
                let _ = Config::from_yaml_str(&text);
            }

            /// Arbitrary values in the number and duration fields: never a panic, and what is
            /// accepted is within bounds.
            #[test]
            fn numbers_and_durations(
                max in any::<u64>(),
                neg in any::<u64>(),
                conns in any::<u64>(),
                idle in "[0-9]{1,6}(ms|s|m|h|)",
                ttl in "[0-9.]{0,8}[a-z]{0,2}",
            ) {
                let yaml = format!(
                    "listen:\n  limits:\n    max_connections: {conns}\n    idle_timeout: {idle}\ncache:\n  max_entries: {max}\n  negative_max_entries: {neg}\n  ttl: \"{ttl}\"\n{ROUTE}"
                );
                if let Ok(c) = Config::from_yaml_str(&yaml) {
                    prop_assert!(c.cache.max_entries.get() <= defaults::CACHE_MAX_ENTRIES_LIMIT);
                    prop_assert!(c.cache.negative_max_entries.get() <= defaults::CACHE_MAX_ENTRIES_LIMIT);
                    prop_assert!(c.listen.limits.max_connections >= 1);
                    prop_assert!(c.listen.limits.idle_timeout > c.listen.limits.keepalive_interval + c.listen.limits.keepalive_timeout);
                }
            }

            /// A valid file with one line deleted or duplicated: never a panic; a file that
            /// loads still has routes.
            #[test]
            fn edited_files(line in 0usize..64, dup in any::<bool>()) {
                let mut lines: Vec<&str> = FULL.lines().collect();
                let i = line % lines.len();
                if dup {
                    lines.insert(i, lines[i]);
                } else {
                    lines.remove(i);
                }
                if let Ok(c) = Config::from_yaml_str(&lines.join("\n")) {
                    prop_assert!(!c.routes.is_empty());
                }
            }
        }
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

    /// What Envoy (`0.5s`) and Go (`1m30s`) users write.
    #[test]
    fn envoy_and_go_durations() {
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["5 seconds", "-1s", "", "1h 30m", "1,5s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// A duration that fails to parse is reported once, not also as "must be greater than
    /// zero"; and zero is refused where it makes no sense.
    #[test]
    fn bad_duration_is_one_problem() {
        let e =
            errors("kubernetes:\n  timeout: 5 seconds\nroutes:\n  - name: a\n    audiences: [a]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].field.as_str(), e[0].line), ("kubernetes.timeout", 2));
        let e = errors("kubernetes:\n  timeout: 0s\nroutes:\n  - name: a\n    audiences: [a]\n");
        assert_eq!(e[0].message, "must be greater than zero");
        let c = Config::from_yaml_str(
            "kubernetes:\n  timeout: 0.5s\ncache:\n  ttl: 1m30s\nroutes:\n  - name: a\n    audiences: [a]\n",
        )
        .unwrap();
        assert_eq!(c.kubernetes.timeout, Duration::from_millis(500));
        assert_eq!(c.cache.ttl, Duration::from_secs(90));
    }

    #[test]
    fn display_is_compiler_like() {
        let err = Config::from_yaml_str("routes:\n  - name: a\n    audiences: [a]\n    bogus: 1\n")
            .unwrap_err();
        let s = err.to_string();
        assert!(s.contains("line 4: routes[0].bogus: unknown field"), "{s}");
    }
}
