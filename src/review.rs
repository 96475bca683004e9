//! TokenReview through `kube`, and the HTTP plumbing every review shares (`Reviewer::post`:
//! retries, timeouts, the in-flight cap, our own credentials), which [`crate::rbac`] uses
//! for SubjectAccessReview.
//!
//! One review is a `POST /apis/authentication.k8s.io/v1/tokenreviews` with
//! `spec.audiences` = the route's audiences. The answer is accepted only if
//! `status.authenticated` is true, `status.audiences` intersects the requested audiences (an
//! empty list means "the API server's own audience", which is not ours), and the username is
//! `system:serviceaccount:NS:NAME`. Any definitive "no" becomes a [`Verdict::Rejected`]
//! (cacheable); anything that is not an answer (connect error, timeout, 5xx, 429, our own
//! credentials refused) becomes a [`ReviewError`], which the caller turns into gRPC
//! UNAVAILABLE and never caches.
//!
//! Connection settings come from kube's own config loading (in-cluster, or a kubeconfig and
//! context). The reviewer's own token is normally a projected token file that the kubelet
//! rotates. kube 5 re-reads a `tokenFile` only about once a minute (`TokenFile` in
//! kube-client's `client/auth/mod.rs` caches it for 60 s), which leaves a window where a
//! rotated-and-revoked token is still sent. So when the config names a token file, this module
//! takes it over: it sends the header itself, re-reads the file whenever its mtime/size/inode
//! changes, and on an HTTP 401 re-reads it and retries once.
//!
//! Transient failures are retried a bounded number of times, within a retry budget, after a
//! jittered backoff or the server's `Retry-After` (see [`crate::retry`]). Reviews in flight
//! (TokenReviews and SubjectAccessReviews alike) are capped by [`Slots`], handed out fairly per
//! downstream peer from a bounded queue (see [`crate::slots`]). A review whose Checks were all cancelled leaves the queue;
//! one already sent (or retried) keeps a slot only while nobody else waits for one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::HeaderValue;
use http_body_util::BodyExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::time::Instant;

use crate::cache::Interest;
use crate::config::Kubernetes;
use crate::denial::Denial;
use crate::error::Report;
use crate::identity::{Identity, TokenHash};
use crate::metrics::Metrics;
use crate::retry::{self, RetryBudget};
use crate::slots::{Shed, Slot, Slots};

const TOKENREVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const SA_PREFIX: &str = "system:serviceaccount:";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Largest TokenReview response read (the API server echoes the token, at most 16 KiB).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// TokenReview's answer about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A service account, with its identity.
    Authenticated(Identity),
    /// A definitive refusal.
    Rejected(Denial),
}

/// The underlying error of a [`ReviewError`], shared (hence `Arc`) so the error stays `Clone`
/// for single-flight waiters while keeping its whole cause chain (say, the TLS certificate
/// error under "client error (Connect)"). Print it with [`crate::error::Report`].
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// No answer could be had from the API server. Shared with single-flight waiters, hence `Clone`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReviewError {
    /// Connection (TCP, TLS, HTTP/2) failed or was reset before an answer.
    #[error("cannot reach the Kubernetes API server")]
    Connect(#[source] Cause),
    /// The connection failed while the answer was being read (or it exceeded 1 MiB).
    #[error("reading the API server's answer failed")]
    ReadResponse(#[source] Cause),
    /// The attempt exceeded `kubernetes.timeout`.
    #[error("the API server did not answer within kubernetes.timeout")]
    Timeout,
    /// The API server answered with this HTTP status (5xx, 429 or unexpected).
    #[error("the API server answered HTTP {0}")]
    Status(u16),
    /// Our own credentials were refused, even after re-reading the token file.
    #[error("the API server refused tokengate's credentials (HTTP 401)")]
    Unauthorized,
    /// We may not create TokenReviews or SubjectAccessReviews (RBAC: bind
    /// `system:auth-delegator`, or grant `create` on the one refused).
    #[error("tokengate may not create this review (HTTP 403); bind it to system:auth-delegator")]
    Forbidden,
    /// The review request could not be built (a bug; never the token's fault).
    #[error("building the review request failed: {0}")]
    BuildRequest(String),
    /// The response was not the review asked for.
    #[error("unexpected review response: {0}")]
    Decode(String),
    /// Waited longer than `kubernetes.timeout` for a free review slot.
    #[error("too many reviews in flight")]
    Overloaded,
    /// Refused at once: the queue for review slots was full, and this Check's peer had the
    /// most waiters in it (see [`crate::slots`]).
    #[error("review queue full (kubernetes.max_queued); shed")]
    Shed,
    /// Every Check waiting for this review was cancelled, so it was dropped.
    #[error("every Check waiting for this review was cancelled")]
    Abandoned,
    /// The task running the review ended without an answer (a bug; logged).
    #[error("the review task ended without an answer")]
    Aborted,
    /// Local verification: the keys or watch caches have not been confirmed by the API
    /// server for longer than `kubernetes.max_staleness`.
    #[error("local verification cannot vouch: {0}")]
    Stale(String),
}

impl From<crate::cache::FlightLost> for ReviewError {
    fn from(_: crate::cache::FlightLost) -> Self {
        ReviewError::Aborted
    }
}

impl ReviewError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ReviewError::Connect(_) | ReviewError::ReadResponse(_) => "connect",
            ReviewError::Timeout => "timeout",
            ReviewError::Status(429) => "throttled",
            ReviewError::Status(s) if *s >= 500 => "server_error",
            ReviewError::Status(_) => "unexpected_status",
            ReviewError::Unauthorized => "unauthorized",
            ReviewError::Forbidden => "forbidden",
            ReviewError::BuildRequest(_) => "build_request",
            ReviewError::Decode(_) => "decode",
            ReviewError::Overloaded => "overloaded",
            ReviewError::Shed => "shed",
            ReviewError::Abandoned => "abandoned",
            ReviewError::Aborted => "aborted",
            ReviewError::Stale(_) => "stale",
        }
    }
}

/// Failure to set up the Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// Neither in-cluster config nor a kubeconfig was found.
    #[error("no Kubernetes configuration found (not in a cluster, no kubeconfig)")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built (TLS settings, ...).
    #[error("Kubernetes client")]
    Client(#[from] kube::Error),
    /// The reviewer token file could not be read.
    #[error("cannot read the reviewer token file {path}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The reviewer's own bearer token, re-read when its file changes.
#[derive(Debug)]
struct ReviewerToken {
    path: PathBuf,
    state: Mutex<TokenState>,
}

#[derive(Debug)]
struct TokenState {
    header: HeaderValue,
    stamp: Option<FileStamp>,
}

/// What identifies a version of the file: an atomic rename changes the inode, an in-place
/// write the mtime or size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        ino,
    })
}

fn read_token(path: &Path) -> std::io::Result<HeaderValue> {
    let text = std::fs::read_to_string(path)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "token file is empty",
        ));
    }
    let mut value = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    value.set_sensitive(true);
    Ok(value)
}

impl ReviewerToken {
    fn load(path: PathBuf) -> Result<ReviewerToken, SetupError> {
        let stamp = stamp(&path);
        let header = read_token(&path).map_err(|source| SetupError::TokenFile {
            path: path.clone(),
            source,
        })?;
        Ok(ReviewerToken {
            path,
            state: Mutex::new(TokenState { header, stamp }),
        })
    }

    /// The current header, re-reading the file if it changed since the last read.
    fn header(&self) -> HeaderValue {
        let now = stamp(&self.path);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_some() && now != st.stamp {
            Self::reload(&self.path, &mut st, now);
        }
        st.header.clone()
    }

    /// Re-reads the file regardless of its stamp (after a 401).
    fn force_reload(&self) {
        let now = stamp(&self.path);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::reload(&self.path, &mut st, now);
    }

    fn reload(path: &Path, st: &mut TokenState, now: Option<FileStamp>) {
        match read_token(path) {
            Ok(h) => {
                st.header = h;
                st.stamp = now;
                tracing::info!(path = %path.display(), "re-read the reviewer token file");
            }
            // Like client-go: keep the last token if the file is briefly unreadable.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot re-read the reviewer token file; keeping the previous token")
            }
        }
    }
}

/// Calls TokenReview (and, for [`crate::rbac`], posts SubjectAccessReviews).
pub struct Reviewer {
    client: kube::Client,
    /// The same connection settings with kube's own credential handling (it re-reads a
    /// token file about once a minute): for the watches and the JWKS, whose requests are
    /// long-lived or rare, where our per-request header logic would not fit.
    api_client: kube::Client,
    token: Option<ReviewerToken>,
    timeout: Duration,
    retries: u32,
    slots: Arc<Slots>,
    budget: RetryBudget,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("token_file", &self.token.as_ref().map(|t| &t.path))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// How one attempt ended.
enum AttemptError {
    /// Worth another attempt (after `retry_after`, if the server said so).
    Transient(ReviewError, Option<Duration>),
    /// 401: our credentials.
    Unauthorized,
    /// Not worth retrying.
    Fatal(ReviewError),
    /// Nobody waits for the answer and the slot is wanted (or too many orphans run).
    Abandoned,
}

impl Reviewer {
    /// Loads kube's configuration (kubeconfig + context if given, else in-cluster, else
    /// `KUBECONFIG`/`~/.kube/config`) and builds the client.
    pub async fn connect(cfg: &Kubernetes, metrics: Arc<Metrics>) -> Result<Reviewer, SetupError> {
        let options = KubeConfigOptions {
            context: cfg.context.clone(),
            ..Default::default()
        };
        let mut config = match &cfg.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
            }
            None if cfg.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
            None => match kube::Config::incluster() {
                Ok(c) => c,
                Err(_) => kube::Config::infer().await?,
            },
        };
        // We retry ourselves, with our own bounds; kube's retry layer would multiply them.
        config.default_retry = false;
        config.connect_timeout = Some(cfg.timeout);
        let api_client = kube::Client::try_from(config.clone())?;
        let token = match (&config.auth_info.token, config.auth_info.token_file.take()) {
            (None, Some(file)) => Some(ReviewerToken::load(PathBuf::from(file))?),
            _ => None,
        };
        let client = kube::Client::try_from(config)?;
        Ok(Reviewer {
            client,
            api_client,
            token,
            timeout: cfg.timeout,
            retries: cfg.retries,
            slots: Slots::new(
                cfg.max_in_flight,
                cfg.max_queued,
                metrics.review_queued.clone(),
            ),
            budget: RetryBudget::new(cfg.retry_budget_percent, cfg.retry_budget_min_per_second),
            metrics,
        })
    }

    /// A client for other reads from the API server (watches, OIDC discovery), with the
    /// reviewer's credentials.
    pub fn api_client(&self) -> kube::Client {
        self.api_client.clone()
    }

    /// Reviews `token` for `audiences`, queued for a slot as `flow` (the downstream peer),
    /// for as long as `interest` says a Check waits.
    pub async fn review(
        &self,
        token: &str,
        audiences: &[String],
        flow: &str,
        interest: &Interest,
    ) -> Result<Verdict, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(audiences.to_vec()),
            },
            ..Default::default()
        };
        let body =
            serde_json::to_vec(&review).map_err(|e| ReviewError::BuildRequest(json_error(&e)))?;
        let bytes = self.post(Api::TokenReview, body, flow, interest).await?;
        let review: TokenReview = serde_json::from_slice(&bytes).map_err(|e| {
            let e = ReviewError::Decode(json_error(&e));
            self.metrics.review_error(e.kind());
            e
        })?;
        Ok(verdict(review.status, audiences, token))
    }

    /// POSTs a review (`body`, JSON) and returns the answer's bytes (HTTP 200/201): a slot
    /// from the ones every review shares, queued as `flow` (the downstream peer) for as long
    /// as `interest` says a Check waits; the attempt timeout; retries within the budget.
    pub(crate) async fn post(
        &self,
        api: Api,
        body: Vec<u8>,
        flow: &str,
        interest: &Interest,
    ) -> Result<bytes::Bytes, ReviewError> {
        self.budget.first_attempt();
        let mut attempt = 0u32;
        let mut reauthenticated = false;
        loop {
            let slot = self.slot(api, flow, interest).await?;
            let in_flight = self.metrics.in_flight(api);
            in_flight.inc();
            let started = Instant::now();
            let result = self.attempt_while_wanted(api, body.clone(), interest).await;
            self.metrics
                .duration(api)
                .observe(started.elapsed().as_secs_f64());
            in_flight.dec();
            drop(slot);

            let status = match result {
                Ok(bytes) => return Ok(bytes),
                Err(e) => e,
            };
            match status {
                AttemptError::Abandoned => return Err(ReviewError::Abandoned),
                AttemptError::Unauthorized => {
                    self.metrics
                        .api_error(api, ReviewError::Unauthorized.kind());
                    match &self.token {
                        // A credential refresh, not a retry: outside the budget.
                        Some(t) if !reauthenticated => {
                            reauthenticated = true;
                            t.force_reload();
                        }
                        _ => return Err(ReviewError::Unauthorized),
                    }
                }
                AttemptError::Transient(e, retry_after) => {
                    self.metrics.api_error(api, e.kind());
                    if attempt >= self.retries {
                        return Err(e);
                    }
                    let wait = match retry_after {
                        // Honoured, not shortened: asked to wait longer than an attempt may
                        // take, give up now.
                        Some(d) if d > self.timeout => {
                            self.metrics.retry(api, "retry_after_too_long");
                            return Err(e);
                        }
                        Some(d) => d,
                        None => retry::backoff(attempt),
                    };
                    if !self.budget.try_retry() {
                        self.metrics.retry(api, "budget_exhausted");
                        return Err(e);
                    }
                    self.metrics.retry(api, "sent");
                    tracing::debug!(api = api.path(), error = %Report(&e), attempt, ?wait, "review failed; retrying");
                    attempt += 1;
                    // A review whose Checks went away may still retry (its answer is what
                    // Envoy's retry will find in the cache), but only into a free slot:
                    // see `slot`.
                    tokio::time::sleep(wait).await;
                }
                AttemptError::Fatal(e) => {
                    self.metrics.api_error(api, e.kind());
                    return Err(e);
                }
            }
        }
    }

    /// A slot for `flow`: shed at once when the queue is full, `Overloaded` after
    /// `kubernetes.timeout` in the queue, `Abandoned` as soon as no Check waits.
    async fn slot(&self, api: Api, flow: &str, interest: &Interest) -> Result<Slot, ReviewError> {
        if interest.gone() {
            // An orphan (a retry nobody waits for) never queues: a free slot or nothing.
            return self.slots.try_acquire().ok_or_else(|| {
                self.metrics.shed(api, "abandoned");
                ReviewError::Abandoned
            });
        }
        let acquire = tokio::time::timeout(self.timeout, self.slots.acquire(flow));
        tokio::pin!(acquire);
        let outcome = tokio::select! {
            biased;
            () = interest.abandoned() => Err(ReviewError::Abandoned),
            r = &mut acquire => match r {
                Ok(Ok(slot)) => Ok(slot),
                Ok(Err(Shed::QueueFull)) => Err(ReviewError::Shed),
                Err(_) => Err(ReviewError::Overloaded),
            },
        };
        match &outcome {
            Ok(_) => {}
            Err(ReviewError::Abandoned) => self.metrics.shed(api, "abandoned"),
            Err(ReviewError::Shed) => self.metrics.shed(api, "queue_full"),
            Err(e) => {
                self.metrics.shed(api, "queue_timeout");
                self.metrics.api_error(api, e.kind());
            }
        }
        outcome
    }

    /// One attempt, within `kubernetes.timeout`. If every Check waiting for it goes away
    /// meanwhile, it goes on (its answer is cached for Envoy's retry) only as an orphan the
    /// slots allow, and only until a waiter queues for a slot.
    async fn attempt_while_wanted(
        &self,
        api: Api,
        body: Vec<u8>,
        interest: &Interest,
    ) -> Result<bytes::Bytes, AttemptError> {
        let attempt = async {
            match tokio::time::timeout(self.timeout, self.attempt(api, body)).await {
                Ok(r) => r,
                Err(_) => Err(AttemptError::Transient(ReviewError::Timeout, None)),
            }
        };
        tokio::pin!(attempt);
        tokio::select! {
            biased;
            r = &mut attempt => return r,
            () = interest.abandoned() => {}
        }
        let pressure = self.slots.pressure().notified();
        tokio::pin!(pressure);
        pressure.as_mut().enable();
        let Some(_orphan) = self.slots.adopt_orphan() else {
            self.metrics.shed(api, "orphan_dropped");
            return Err(AttemptError::Abandoned);
        };
        tokio::select! {
            biased;
            r = &mut attempt => r,
            () = pressure => {
                self.metrics.shed(api, "orphan_dropped");
                Err(AttemptError::Abandoned)
            }
        }
    }

    async fn attempt(&self, api: Api, body: Vec<u8>) -> Result<bytes::Bytes, AttemptError> {
        let mut request = http::Request::post(api.path())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(kube::client::Body::from(body))
            .map_err(|e| AttemptError::Fatal(ReviewError::BuildRequest(e.to_string())))?;
        if let Some(t) = &self.token {
            request.headers_mut().insert(AUTHORIZATION, t.header());
        }
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| AttemptError::Transient(ReviewError::Connect(Arc::new(e)), None))?;
        let code = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::retry_after(v, SystemTime::now()));
        match code {
            200 | 201 => {}
            401 => return Err(AttemptError::Unauthorized),
            403 => return Err(AttemptError::Fatal(ReviewError::Forbidden)),
            429 | 500..=599 => {
                return Err(AttemptError::Transient(
                    ReviewError::Status(code),
                    retry_after,
                ))
            }
            _ => return Err(AttemptError::Fatal(ReviewError::Status(code))),
        }
        Ok(
            http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    AttemptError::Transient(ReviewError::ReadResponse(Cause::from(e)), None)
                })?
                .to_bytes(),
        )
    }
}

/// Which review API a request goes to (its path and its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `authentication.k8s.io/v1` TokenReview.
    TokenReview,
    /// `authorization.k8s.io/v1` SubjectAccessReview (`allow.rbac`).
    SubjectAccessReview,
}

impl Api {
    /// The collection's path.
    pub const fn path(self) -> &'static str {
        match self {
            Api::TokenReview => TOKENREVIEWS_PATH,
            Api::SubjectAccessReview => "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        }
    }
}

/// Describes a JSON error without quoting the document: serde_json's messages may embed
/// string values, and a TokenReview echoes the token.
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// Turns a TokenReview status into our verdict.
fn verdict(status: Option<TokenReviewStatus>, requested: &[String], token: &str) -> Verdict {
    let Some(status) = status else {
        return Verdict::Rejected(Denial::TokenRejected);
    };
    if status.authenticated != Some(true) {
        tracing::debug!(
            token = %TokenHash(token),
            error = status.error.as_deref().unwrap_or(""),
            "TokenReview: not authenticated"
        );
        return Verdict::Rejected(Denial::TokenRejected);
    }
    let confirmed = status
        .audiences
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|a| requested.contains(a));
    if !confirmed {
        tracing::debug!(token = %TokenHash(token), audiences = ?status.audiences, "TokenReview: audiences not confirmed");
        return Verdict::Rejected(Denial::WrongAudience);
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, name)) = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains(':'))
        .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
    else {
        tracing::debug!(token = %TokenHash(token), username, "TokenReview: not a service account");
        return Verdict::Rejected(Denial::NotServiceAccount);
    };
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let pod_name = first(EXTRA_POD_NAME);
    let pod_uid = first(EXTRA_POD_UID);
    Verdict::Authenticated(Identity {
        username,
        namespace,
        name,
        uid: user.uid.filter(|u| !u.is_empty()),
        groups: user.groups.unwrap_or_default(),
        pod_name,
        pod_uid,
        extra: crate::identity::Extra::from_map(&extra),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn status(json: &str) -> Option<TokenReviewStatus> {
        Some(serde_json::from_str(json).unwrap())
    }

    fn req() -> Vec<String> {
        vec!["data-store".to_string()]
    }

    #[test]
    fn authenticated_pod_bound_token() {
        let s = status(
            r#"{"authenticated":true,"user":{"username":"system:serviceaccount:default:api",
            "uid":"u-1","groups":["system:serviceaccounts","system:serviceaccounts:default","system:authenticated"],
            "extra":{"authentication.kubernetes.io/pod-name":["api-1"],"authentication.kubernetes.io/pod-uid":["p-1"]}},
            "audiences":["data-store"]}"#,
        );
        let Verdict::Authenticated(id) = verdict(s, &req(), "t") else {
            panic!("not authenticated")
        };
        assert_eq!(id.namespace, "default");
        assert_eq!(id.name, "api");
        assert_eq!(id.uid.as_deref(), Some("u-1"));
        assert_eq!(id.groups.len(), 3);
        assert_eq!(id.pod_name.as_deref(), Some("api-1"));
        assert_eq!(id.pod_uid.as_deref(), Some("p-1"));
    }

    #[test]
    fn legacy_token_has_no_pod() {
        let s = Some(TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(req()),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:ns:build".into()),
                extra: Some(BTreeMap::new()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let Verdict::Authenticated(id) = verdict(s, &req(), "t") else {
            panic!()
        };
        assert_eq!(id.pod_name, None);
        assert_eq!(id.uid, None);
    }

    #[test]
    fn rejections() {
        assert_eq!(
            verdict(
                status(
                    r#"{"user":{},"error":"[invalid bearer token, service account token has expired]"}"#
                ),
                &req(),
                "t"
            ),
            Verdict::Rejected(Denial::TokenRejected)
        );
        assert_eq!(
            verdict(None, &req(), "t"),
            Verdict::Rejected(Denial::TokenRejected)
        );
        // Authenticated, but for the API server's audience only.
        assert_eq!(
            verdict(
                status(r#"{"authenticated":true,"user":{"username":"system:serviceaccount:a:b"}}"#),
                &req(),
                "t"
            ),
            Verdict::Rejected(Denial::WrongAudience)
        );
        assert_eq!(
            verdict(
                status(
                    r#"{"authenticated":true,"user":{"username":"system:serviceaccount:a:b"},"audiences":["vault"]}"#
                ),
                &req(),
                "t"
            ),
            Verdict::Rejected(Denial::WrongAudience)
        );
        for user in [
            "alice",
            "system:serviceaccount:a",
            "system:serviceaccount::b",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
        ] {
            let s = status(&format!(
                r#"{{"authenticated":true,"user":{{"username":"{user}"}},"audiences":["data-store"]}}"#
            ));
            assert_eq!(
                verdict(s, &req(), "t"),
                Verdict::Rejected(Denial::NotServiceAccount),
                "{user}"
            );
        }
    }

    #[test]
    fn reviewer_token_rereads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").unwrap();
        let t = ReviewerToken::load(path.clone()).unwrap();
        assert_eq!(t.header(), "Bearer one");
        // Atomic replace, as kubelet and the stand-in do.
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(t.header(), "Bearer two");
        // Unreadable file: keep the last token.
        std::fs::remove_file(&path).unwrap();
        t.force_reload();
        assert_eq!(t.header(), "Bearer two");
    }
}
