//! A faithful stand-in for kube-apiserver's token APIs, for tokengate's tests and demo.
//!
//! No real API server can run on the test machines, so this crate reproduces the parts of
//! one that tokengate talks to, over real HTTPS, as documented in
//! `shared/kubernetes-tokens.md`:
//!
//! * **TokenRequest** (`POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`) mints
//!   real RS256/ES256 JWTs with the claims, `kid` and error statuses of kube-apiserver.
//!   [`Standin::mint`] goes through the same code.
//! * **TokenReview** (`POST /apis/authentication.k8s.io/v1/tokenreviews`) runs a token
//!   through the same authenticator chain order as the real server (issuer pre-check,
//!   signature by `kid`, issuer, audience before expiry, 60 s leeway, service-account and
//!   pod/secret lookups by name and UID) and answers with the exact JSON shape and error
//!   strings (`[invalid bearer token, ...]`).
//! * **Caller authentication and RBAC**: a bad token gets the 401 `Status`, a caller not
//!   bound to `system:auth-delegator` the 403 `Status` with the real message. RBAC is the
//!   API server's authorizer ([`rbac`]) over Roles, ClusterRoles, RoleBindings and
//!   ClusterRoleBindings created and deleted through the API (kubectl included, [`rbac_api`]).
//! * **SubjectAccessReview** (`POST /apis/authorization.k8s.io/v1/subjectaccessreviews`)
//!   answers `status.allowed` and the RBAC authorizer's reason for any user info.
//! * **OIDC discovery** (`/.well-known/openid-configuration`, `/openid/v1/jwks`) with key
//!   rotation ([`Standin::add_signing_key`], [`Standin::retire_key`]).
//! * **Objects and controls**: service accounts, pods (deleting one revokes its tokens),
//!   RBAC objects, TokenReview and SubjectAccessReview counters and run-time [`Fault`]s.
//! * **Discovery documents** (`/api`, `/apis`, `/api/v1`, `/apis/<group>/v1`, `/version`)
//!   so `kubectl create -f tokenreview.yaml -o yaml` works. `/openapi/v3` is 404 and
//!   `/openapi/v2` is a valid document without definitions, so kubectl skips client-side
//!   schema validation (as for any kind a server does not describe) instead of failing.
//!   `kubectl create token` (and `kubectl create sa`) send protobuf; those endpoints
//!   decode the few protobuf fields they need (see [`protobuf`]) and answer JSON, which
//!   kubectl accepts. Other endpoints answer protobuf bodies with 415.
//!
//! Layout: [`cluster`] holds objects, keys and the token logic without HTTP; [`api`]
//! routes requests and renders Kubernetes objects and `Status` errors ([`status`]);
//! [`server`] is the TLS accept loop (with down/up); [`tls`] and [`kubeconfig`] write what
//! clients need to connect; [`keys`] signs and verifies. The binary (`kube-standin serve`)
//! runs the same server as a process for the demo and the Envoy tests.
//!
//! * **List and watch** of pods and service accounts ([`watch`]): global resourceVersion,
//!   bounded history with 410 `Expired`, bookmarks, metadata-only `PartialObjectMetadata`
//!   answers, graceful pod deletion on the server's clock ([`Standin::advance_clock`]).
//!
//! Deliberate simplifications: one issuer; no token cache (the real server caches
//! successes for 10 s, see §7 of the doc); terminating pods are removed exactly at their
//! `deletionTimestamp`; namespaces are created on first use with their `default` service
//! account.

#![warn(missing_docs)]

pub mod api;
pub mod clock;
pub mod cluster;
pub mod discovery;
pub mod keys;
pub mod kubeconfig;
pub mod protobuf;
pub mod rbac;
pub mod rbac_api;
pub mod server;
pub mod status;
pub mod tls;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

use crate::api::Shared;
use crate::cluster::{BoundObjectRef, Cluster, ClusterConfig, IssueSpec, Subject, UserInfo};

/// Signing key algorithm for service-account tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSA-2048 with SHA-256 (`RS256`).
    Rs256,
    /// ECDSA P-256 with SHA-256 (`ES256`).
    Es256,
}

/// How `metadata` of a TokenReview response is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataStyle {
    /// v1.33+: `"metadata":{}`.
    V133,
    /// Up to v1.32: `"metadata":{"creationTimestamp":null}`.
    PreV133,
}

/// Options for [`Standin::start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The service-account issuer (`--service-account-issuer`).
    pub issuer: String,
    /// `--api-audiences`; empty means `[issuer]`.
    pub api_audiences: Vec<String>,
    /// Algorithm of the initial signing key.
    pub key_alg: KeyAlg,
    /// ServiceAccountTokenJTI feature gate.
    pub jti: bool,
    /// ServiceAccountTokenPodNodeInfo feature gate.
    pub pod_node_info: bool,
    /// Enforce the 600 s minimum of `expirationSeconds`.
    pub enforce_min_expiration: bool,
    /// How TokenReview `metadata` is written.
    pub metadata_style: MetadataStyle,
    /// Where kubeconfigs, the CA and token files are written; `None` uses a temp dir.
    pub dir: Option<PathBuf>,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// How many changes each resource's (pods, serviceaccounts) watch history keeps; a
    /// watch from an older `resourceVersion` gets a 410 `Expired` ERROR event.
    pub watch_history: usize,
    /// Interval of BOOKMARK events on watches with `allowWatchBookmarks=true` (the real
    /// server sends about one a minute).
    pub bookmark_interval: Duration,
    /// How often terminating pods whose grace period ended are removed (the kubelet's
    /// confirmation). The clock is the server's ([`Standin::advance_clock`]).
    pub reap_interval: Duration,
}

/// Objects for [`Standin::bulk_create`] and `POST /standin/v1/bulk`: `service_accounts`
/// SAs `sa-{j}` spread round-robin over `namespaces` namespaces `{prefix}-{i}`, and `pods`
/// pods `pod-{k}` running as SA `sa-{k % service_accounts}` in that SA's namespace (as
/// `default` when there are no SAs), on `node` if given.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Bulk {
    /// Namespace name prefix.
    pub prefix: String,
    /// Number of namespaces.
    pub namespaces: usize,
    /// Number of service accounts.
    pub service_accounts: usize,
    /// Number of pods.
    pub pods: usize,
    /// `spec.nodeName` of the pods.
    pub node: Option<String>,
}

impl Default for Bulk {
    fn default() -> Self {
        Bulk {
            prefix: "bulk".to_string(),
            namespaces: 10,
            service_accounts: 0,
            pods: 0,
            node: Some("bulk-node".to_string()),
        }
    }
}

impl Cluster {
    /// [`Cluster::bulk_create`] from a [`Bulk`].
    pub fn bulk_create_spec(&self, b: &Bulk) -> cluster::BulkCreated {
        self.bulk_create(
            &b.prefix,
            b.namespaces,
            b.service_accounts,
            b.pods,
            b.node.as_deref(),
        )
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            issuer: "https://kubernetes.default.svc.cluster.local".to_string(),
            api_audiences: Vec::new(),
            key_alg: KeyAlg::Rs256,
            jti: true,
            pod_node_info: true,
            enforce_min_expiration: true,
            metadata_style: MetadataStyle::V133,
            dir: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            watch_history: cluster::DEFAULT_HISTORY,
            bookmark_interval: Duration::from_secs(60),
            reap_interval: Duration::from_millis(100),
        }
    }
}

/// Fault injected into review requests: TokenReviews and SubjectAccessReviews alike, as the
/// real API server's latency or errors would meet both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Normal service.
    None,
    /// Delay every review (TokenReview and SubjectAccessReview) by this long.
    Latency(Duration),
    /// Answer with this HTTP status (a k8s `Status` body), optionally with `Retry-After`.
    Status {
        /// HTTP status code.
        code: u16,
        /// `Retry-After` seconds.
        retry_after: Option<u32>,
    },
    /// Like `Status`, with `Retry-After` as an HTTP-date (RFC 9110 §10.2.3) this many seconds
    /// from now, as a proxy or load balancer in front of the API server may send it
    /// (kube-apiserver itself sends seconds).
    StatusRetryDate {
        /// HTTP status code.
        code: u16,
        /// Seconds from now the date names.
        retry_after: u32,
    },
    /// Never answer.
    Hang,
    /// Close the connection without answering.
    CloseConnection,
    /// Reset connections: new ones are accepted and reset at once (TCP RST, no TLS
    /// handshake); requests on open ones close their connection without an answer.
    Reset,
    /// Stop listening entirely until the fault is set back to `None`.
    Down,
}

/// A token to mint, as a TokenRequest would ask for it.
#[derive(Debug, Clone, Default)]
pub struct MintRequest {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Audiences; empty means the API audiences.
    pub audiences: Vec<String>,
    /// Lifetime; `None` means 3600 s.
    pub expiration_seconds: Option<i64>,
    /// Pod to bind the token to (same namespace).
    pub pod: Option<String>,
    /// Issue time override in unix seconds (test-only backdating).
    pub issued_at: Option<i64>,
}

impl MintRequest {
    /// A request for a token of service account `ns/sa`.
    pub fn new(ns: &str, sa: &str) -> Self {
        MintRequest {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
            ..Default::default()
        }
    }
    /// Adds an audience.
    pub fn audience(mut self, a: &str) -> Self {
        self.audiences.push(a.to_string());
        self
    }
    /// Binds the token to pod `p` in the same namespace.
    pub fn pod(mut self, p: &str) -> Self {
        self.pod = Some(p.to_string());
        self
    }
    /// Sets `expirationSeconds`.
    pub fn expires_in(mut self, secs: i64) -> Self {
        self.expiration_seconds = Some(secs);
        self
    }
    /// Backdates (or postdates) the issue time to unix seconds `t`.
    pub fn issued_at(mut self, t: i64) -> Self {
        self.issued_at = Some(t);
        self
    }
}

/// Namespace and name of the reviewer service account written to the kubeconfig.
pub const REVIEWER_SA: (&str, &str) = ("tokengate", "tokengate");
/// Name of the ClusterRole and ClusterRoleBinding [`Standin::grant_reviewer_watch`] creates.
pub const WATCH_ROLE: &str = "tokengate-watch";
/// Username of the admin kubeconfig's static token (group `system:masters`).
pub const ADMIN_USER: &str = "kubernetes-admin";
/// Lifetime of reviewer tokens (one year, as for a long-lived credential).
const REVIEWER_TOKEN_SECONDS: i64 = 365 * 24 * 3600;

struct Reviewer {
    generation: u64,
    secret: String,
}

/// A running stand-in API server. Dropping it stops the server; [`Standin::shutdown`]
/// also waits for it.
pub struct Standin {
    shared: Arc<Shared>,
    addr: SocketAddr,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    ca_pem: String,
    admin_token: String,
    reviewer: Mutex<Reviewer>,
    shutdown_tx: signal::Sender<bool>,
    task: Option<JoinHandle<()>>,
    reaper: Option<JoinHandle<()>>,
}

fn random_token() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

impl Standin {
    /// Starts the server: generates the CA and signing key, binds `opts.bind`, writes
    /// `ca.crt`, `kubeconfig`, `admin.kubeconfig`, `reviewer-token` and `url` into the
    /// directory, and serves on the current tokio runtime.
    pub async fn start(opts: Options) -> anyhow::Result<Standin> {
        Self::start_inner(opts, false).await
    }

    /// Like [`Standin::start`], but keeps the whole state (CA and serving certificate,
    /// signing keys, objects, admin and reviewer tokens) in `DIR/state.json` and resumes
    /// from it when that file exists, so a restarted process is the same cluster, as a
    /// restarted kube-apiserver is (the process mode's down/up). Requires `opts.dir`.
    pub async fn start_persistent(opts: Options) -> anyhow::Result<Standin> {
        anyhow::ensure!(opts.dir.is_some(), "start_persistent needs Options::dir");
        Self::start_inner(opts, true).await
    }

    async fn start_inner(opts: Options, persistent: bool) -> anyhow::Result<Standin> {
        let api_audiences = if opts.api_audiences.is_empty() {
            vec![opts.issuer.clone()]
        } else {
            opts.api_audiences.clone()
        };
        let cfg = ClusterConfig {
            issuer: opts.issuer.clone(),
            api_audiences,
            jti: opts.jti,
            pod_node_info: opts.pod_node_info,
            enforce_min_expiration: opts.enforce_min_expiration,
            metadata_style: opts.metadata_style,
        };

        let (tempdir, dir) = match &opts.dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new().prefix("kube-standin-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::fs::canonicalize(&dir)?;
        let state_path = dir.join("state.json");

        let saved: Option<cluster::Snapshot> = if persistent && state_path.exists() {
            let raw = std::fs::read(&state_path)
                .with_context(|| format!("reading {}", state_path.display()))?;
            let snap: cluster::Snapshot = serde_json::from_slice(&raw)
                .with_context(|| format!("parsing {}", state_path.display()))?;
            anyhow::ensure!(
                snap.issuer == opts.issuer,
                "{} was written for issuer {:?}, not {:?}; remove it to start afresh",
                state_path.display(),
                snap.issuer,
                opts.issuer
            );
            Some(snap)
        } else {
            None
        };
        let note = |k: &str| saved.as_ref().and_then(|s| s.notes.get(k).cloned());

        let (cluster, pki) = match &saved {
            Some(snap) => {
                let cluster = Cluster::restore(cfg, snap)?;
                let b64 = |k: &str| -> anyhow::Result<Vec<u8>> {
                    let v = note(k).with_context(|| format!("saved state lacks {k}"))?;
                    Ok(base64::engine::general_purpose::STANDARD.decode(v)?)
                };
                let pki = tls::from_parts(
                    note("ca_pem").context("saved state lacks ca_pem")?,
                    vec![b64("server_cert")?, b64("ca_cert")?],
                    b64("server_key")?,
                )?;
                (cluster, pki)
            }
            None => (Cluster::new(cfg, opts.key_alg)?, tls::generate()?),
        };

        let listener = tokio::net::TcpListener::bind(opts.bind)
            .await
            .with_context(|| format!("binding {}", opts.bind))?;
        let addr = listener.local_addr()?;
        let url = format!("https://{addr}");

        let admin_token = match note("admin_token") {
            Some(t) => t,
            None => {
                let t = random_token();
                cluster.add_static_token(
                    &t,
                    UserInfo {
                        username: ADMIN_USER.to_string(),
                        uid: String::new(),
                        groups: vec!["system:masters".to_string()],
                        extra: Default::default(),
                    },
                );
                t
            }
        };
        let (rns, rname) = REVIEWER_SA;
        if saved.is_none() {
            cluster.recreate_service_account(rns, rname);
            cluster.bind(
                "tokengate-auth-delegator",
                "system:auth-delegator",
                Subject::service_account(rns, rname),
            );
        }
        let reviewer = Reviewer {
            generation: note("reviewer_generation")
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
            secret: note("reviewer_secret").unwrap_or_default(),
        };
        let resume_reviewer = reviewer.generation > 0;

        if persistent {
            let mut notes = std::collections::BTreeMap::new();
            let std = &base64::engine::general_purpose::STANDARD;
            notes.insert("ca_pem".to_string(), pki.ca_pem.clone());
            if let [server, ca, ..] = pki.chain_der.as_slice() {
                notes.insert("server_cert".to_string(), std.encode(server));
                notes.insert("ca_cert".to_string(), std.encode(ca));
            }
            notes.insert("server_key".to_string(), std.encode(&pki.key_der));
            notes.insert("admin_token".to_string(), admin_token.clone());
            notes.insert(
                "reviewer_generation".to_string(),
                reviewer.generation.to_string(),
            );
            notes.insert("reviewer_secret".to_string(), reviewer.secret.clone());
            cluster.persist_to(state_path, notes);
        }

        cluster.set_history_capacity(opts.watch_history);
        let (down_tx, down_rx) = signal::channel(false);
        let shared = Arc::new(Shared {
            cluster,
            reviews: AtomicU64::new(0),
            access_reviews: AtomicU64::new(0),
            fault: Mutex::new(Fault::None),
            down: down_tx,
            url: url.clone(),
            bookmark_interval: opts.bookmark_interval,
        });
        let (shutdown_tx, shutdown_rx) = signal::channel(false);
        let mut standin = Standin {
            shared: shared.clone(),
            addr,
            dir,
            _tempdir: tempdir,
            ca_pem: pki.ca_pem.clone(),
            admin_token,
            reviewer: Mutex::new(reviewer),
            shutdown_tx,
            task: None,
            reaper: None,
        };
        if !(resume_reviewer && standin.reviewer_token_path().exists()) {
            standin.issue_reviewer_token()?;
        }
        standin.write_files()?;
        let reap_every = opts.reap_interval.max(Duration::from_millis(10));
        let reaper_shared = shared.clone();
        standin.reaper = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(reap_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                reaper_shared.cluster.reap();
            }
        }));
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config);
        standin.task = Some(tokio::spawn(server::run(
            shared,
            listener,
            addr,
            acceptor,
            down_rx,
            shutdown_rx,
        )));
        Ok(standin)
    }

    fn write_files(&self) -> anyhow::Result<()> {
        let url = self.url();
        kubeconfig::write_atomic(&self.dir.join("ca.crt"), self.ca_pem.as_bytes())?;
        let token_path = self.reviewer_token_path();
        kubeconfig::write_atomic(
            &self.kubeconfig_path(),
            kubeconfig::render(
                &url,
                &self.ca_pem,
                "tokengate",
                &kubeconfig::Credential::TokenFile(&token_path),
            )
            .as_bytes(),
        )?;
        kubeconfig::write_atomic(
            &self.admin_kubeconfig_path(),
            kubeconfig::render(
                &url,
                &self.ca_pem,
                "admin",
                &kubeconfig::Credential::Token(&self.admin_token),
            )
            .as_bytes(),
        )?;
        kubeconfig::write_atomic(&self.dir.join("url"), format!("{url}\n").as_bytes())?;
        Ok(())
    }

    /// Mints a reviewer token bound to a fresh secret, writes it, and deletes the previous
    /// secret (which revokes the previous token, as deleting a bound Secret does).
    fn issue_reviewer_token(&self) -> anyhow::Result<()> {
        let (rns, rname) = REVIEWER_SA;
        let mut rev = self.reviewer.lock().unwrap_or_else(|e| e.into_inner());
        let generation = rev.generation + 1;
        let secret = format!("{rname}-reviewer-{generation}");
        self.shared
            .cluster
            .put_secret(rns, &secret, Some(rname), None);
        let issued = self
            .shared
            .cluster
            .issue(&IssueSpec {
                namespace: rns.to_string(),
                service_account: rname.to_string(),
                expiration_seconds: Some(REVIEWER_TOKEN_SECONDS),
                bound: Some(BoundObjectRef {
                    kind: "Secret".to_string(),
                    api_version: "v1".to_string(),
                    name: secret.clone(),
                    uid: String::new(),
                }),
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("minting the reviewer token: {e}"))?;
        kubeconfig::write_atomic(&self.reviewer_token_path(), issued.token.as_bytes())?;
        if !rev.secret.is_empty() {
            self.shared.cluster.delete_secret(rns, &rev.secret);
        }
        rev.generation = generation;
        rev.secret = secret.clone();
        drop(rev);
        self.shared
            .cluster
            .set_note("reviewer_generation", generation.to_string());
        self.shared.cluster.set_note("reviewer_secret", secret);
        Ok(())
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory holding `ca.crt`, `kubeconfig`, `admin.kubeconfig`, `reviewer-token`
    /// and `url`.
    pub fn dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Kubeconfig of the reviewer: user `tokenFile` = [`Standin::reviewer_token_path`], a
    /// token of SA `tokengate/tokengate`, which is bound to `system:auth-delegator`.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Kubeconfig of a cluster-admin user (static token, group `system:masters`).
    pub fn admin_kubeconfig_path(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The admin user's bearer token.
    pub fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    /// File holding the current reviewer token (no trailing newline).
    pub fn reviewer_token_path(&self) -> PathBuf {
        self.dir.join("reviewer-token")
    }

    /// PEM of the CA that signed the serving certificate.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Creates a service account, or replaces it with a new UID if it exists (which
    /// invalidates its existing tokens, as delete-and-recreate does); returns its UID.
    pub fn create_service_account(&self, ns: &str, name: &str) -> String {
        self.shared.cluster.recreate_service_account(ns, name).uid
    }

    /// Deletes a service account (its tokens then fail with `serviceaccounts "<name>" not found`).
    pub fn delete_service_account(&self, ns: &str, name: &str) {
        self.shared.cluster.delete_service_account(ns, name);
    }

    /// Creates a pod running as `service_account`, on `node` if given (a Node object is
    /// created on first use); an existing pod of that name is replaced with a new UID.
    /// Returns the pod UID.
    pub fn create_pod(
        &self,
        ns: &str,
        name: &str,
        service_account: &str,
        node: Option<&str>,
    ) -> String {
        self.shared.cluster.delete_pod(ns, name);
        match self
            .shared
            .cluster
            .create_pod(ns, name, service_account, node)
        {
            Ok(p) => p.meta.uid,
            // Unreachable: the pod was just removed under the same name.
            Err(e) => panic!("kube-standin: create_pod {ns}/{name}: {e}"),
        }
    }

    /// Deletes a pod at once; tokens bound to it then fail with
    /// `service account token has been invalidated`.
    pub fn delete_pod(&self, ns: &str, name: &str) {
        self.shared.cluster.delete_pod(ns, name);
    }

    /// Deletes a pod gracefully, as `DELETE` with `gracePeriodSeconds` does (`None`: the
    /// pod's `terminationGracePeriodSeconds`, 30 s): it gets `deletionTimestamp` = now +
    /// grace (MODIFIED) and is removed at that time (DELETED); tokens bound to it stay
    /// valid until then, and past it only while the object lingers for at most 60 s more.
    /// A grace of 0, or a pod without a node, is deleted at once. Returns whether it existed.
    pub fn delete_pod_graceful(&self, ns: &str, name: &str, grace_seconds: Option<i64>) -> bool {
        self.shared
            .cluster
            .delete_pod_graceful(ns, name, grace_seconds)
            .is_some()
    }

    /// The server's clock (unix seconds), which token times and deletion deadlines use.
    pub fn now(&self) -> i64 {
        self.shared.cluster.now()
    }

    /// Moves the server's clock by `secs` (tokens age, grace periods end; terminating pods
    /// past their deadline are removed at once). Returns the new time.
    pub fn advance_clock(&self, secs: i64) -> i64 {
        self.shared.cluster.advance_clock(secs)
    }

    /// Whether terminating pods are removed when their grace period ends (default on). Off
    /// models a kubelet that never confirms: the pod stays past its `deletionTimestamp`.
    pub fn set_pod_reaping(&self, on: bool) {
        self.shared.cluster.set_reaping(on);
    }

    /// The global `resourceVersion` (last assigned revision).
    pub fn resource_version(&self) -> u64 {
        self.shared.cluster.resource_version()
    }

    /// Sets the capacity of each watch history (at least 1), evicting older changes.
    pub fn set_watch_history(&self, capacity: usize) {
        self.shared.cluster.set_history_capacity(capacity);
    }

    /// Creates many service accounts and pods quickly (one lock, one save), for memory and
    /// scale benchmarks; see [`Bulk`].
    pub fn bulk_create(&self, spec: &Bulk) -> cluster::BulkCreated {
        self.shared.cluster.bulk_create_spec(spec)
    }

    /// Creates or replaces a ClusterRole (as `POST .../clusterroles` does).
    pub fn create_cluster_role(&self, name: &str, rules: Vec<cluster::PolicyRule>) {
        self.shared.cluster.put_cluster_role(name, rules);
    }

    /// Grants the reviewer service account `get`/`list`/`watch` on pods and service
    /// accounts (ClusterRole and ClusterRoleBinding [`WATCH_ROLE`]), as tokengate's
    /// deployment does for local verification with watch-driven revocation.
    pub fn grant_reviewer_watch(&self) {
        self.create_cluster_role(
            WATCH_ROLE,
            vec![cluster::PolicyRule::core(
                &["pods", "serviceaccounts"],
                &["get", "list", "watch"],
            )],
        );
        self.bind_cluster_role(WATCH_ROLE, WATCH_ROLE, REVIEWER_SA);
    }

    /// Creates (or replaces) ClusterRoleBinding `binding` of `cluster_role` to the service
    /// account `subject_sa = (namespace, name)`.
    pub fn bind_cluster_role(&self, binding: &str, cluster_role: &str, subject_sa: (&str, &str)) {
        self.shared.cluster.bind(
            binding,
            cluster_role,
            Subject::service_account(subject_sa.0, subject_sa.1),
        );
    }

    /// Deletes a ClusterRoleBinding (the reviewer's is `tokengate-auth-delegator`).
    pub fn delete_cluster_role_binding(&self, binding: &str) {
        self.shared.cluster.unbind(binding);
    }

    /// Mints a token through the same code path as the TokenRequest endpoint; the error
    /// carries the `Status` message the endpoint would return.
    pub fn mint(&self, req: &MintRequest) -> anyhow::Result<String> {
        let spec = IssueSpec {
            namespace: req.namespace.clone(),
            service_account: req.service_account.clone(),
            audiences: req.audiences.clone(),
            expiration_seconds: req.expiration_seconds,
            bound: req.pod.as_ref().map(|p| BoundObjectRef {
                kind: "Pod".to_string(),
                api_version: "v1".to_string(),
                name: p.clone(),
                uid: String::new(),
            }),
            issued_at: req.issued_at,
            ..Default::default()
        };
        api::issue(&self.shared, &spec)
            .map(|i| i.token)
            .map_err(|e| anyhow::Error::new(e).context("TokenRequest failed"))
    }

    /// Creates Secret `ns/secret_name` of type `kubernetes.io/service-account-token` for
    /// service account `ns/sa` and returns its legacy token (`iss: kubernetes/serviceaccount`).
    /// Deleting the secret ([`Standin::delete_secret`]) revokes it.
    pub fn mint_legacy(&self, ns: &str, sa: &str, secret_name: &str) -> anyhow::Result<String> {
        self.shared
            .cluster
            .mint_legacy(ns, sa, secret_name)
            .map_err(|e| anyhow::Error::new(e).context("legacy token"))
    }

    /// Deletes a secret.
    pub fn delete_secret(&self, ns: &str, name: &str) {
        self.shared.cluster.delete_secret(ns, name);
    }

    /// Number of `POST subjectaccessreviews` requests that reached the handler, counted
    /// before faults, authentication and validation.
    pub fn subject_access_reviews_served(&self) -> u64 {
        self.shared.access_reviews.load(Ordering::SeqCst)
    }

    /// Number of `POST tokenreviews` requests that reached the handler, counted before
    /// faults, authentication and validation.
    pub fn token_reviews_served(&self) -> u64 {
        self.shared.reviews.load(Ordering::SeqCst)
    }

    /// Sets the fault applied to review requests (TokenReviews and SubjectAccessReviews).
    /// `Fault::Down` stops listening and drops open connections; any other value brings the
    /// listener back on the same port.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.set_fault(fault);
    }

    /// Mints a new reviewer token, writes it atomically (temp file + rename) and revokes the
    /// old one: requests with it get 401 from then on.
    pub fn rotate_reviewer_token(&self) {
        if let Err(e) = self.issue_reviewer_token() {
            panic!("kube-standin: rotating the reviewer token failed: {e:#}");
        }
    }

    /// Adds a key that is published and signs from now on (older keys still verify);
    /// returns its kid. For the real rotation order use [`Standin::publish_key`], then
    /// [`Standin::sign_with_key`].
    pub fn add_signing_key(&self, alg: KeyAlg) -> String {
        match self.shared.cluster.add_key(alg) {
            Ok(kid) => kid,
            Err(e) => panic!("kube-standin: key generation failed: {e:#}"),
        }
    }

    /// Publishes a new key in `/openid/v1/jwks` (and for verification) without signing
    /// with it; returns its kid.
    pub fn publish_key(&self, alg: KeyAlg) -> String {
        match self.shared.cluster.publish_key(alg) {
            Ok(kid) => kid,
            Err(e) => panic!("kube-standin: key generation failed: {e:#}"),
        }
    }

    /// Signs new tokens with the published key `kid`; `false` if it is not published.
    pub fn sign_with_key(&self, kid: &str) -> bool {
        self.shared.cluster.sign_with(kid)
    }

    /// Kid of the key that signs new tokens.
    pub fn signing_key_id(&self) -> String {
        self.shared.cluster.signing_kid().unwrap_or_default()
    }

    /// Retires a key: removed from JWKS and no longer verifies (its tokens then fail with
    /// `invalid signature, no keys found`). The last key is kept; retiring the signing key
    /// makes the newest remaining key sign. Returns whether a key was removed.
    pub fn retire_key(&self, kid: &str) -> bool {
        self.shared.cluster.retire_key(kid)
    }

    /// Kids of the current keys, in publication order (see [`Standin::signing_key_id`]).
    pub fn key_ids(&self) -> Vec<String> {
        self.shared
            .cluster
            .keys()
            .iter()
            .map(|k| k.kid().to_string())
            .collect()
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.reaper.take() {
            r.abort();
        }
        self.shared.cluster.flush();
        self.shutdown_tx.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Some(r) = self.reaper.take() {
            r.abort();
        }
        self.shared.cluster.flush();
        self.shutdown_tx.send_replace(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    /// Tests share one stand-in across tasks and threads.
    #[test]
    fn standin_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Standin>();
        check::<super::Options>();
        check::<super::Fault>();
        check::<super::MintRequest>();
    }
}
