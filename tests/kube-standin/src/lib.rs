//! A faithful stand-in for kube-apiserver's token APIs (TokenRequest, TokenReview, OIDC
//! discovery), served over HTTPS, for tokengate's tests and demo.
//!
//! This is the public API contract from PLAN.md; the implementation is being filled in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
        }
    }
}

/// Fault injected into TokenReview requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Normal service.
    None,
    /// Delay every TokenReview by this long.
    Latency(Duration),
    /// Answer with this HTTP status (a k8s `Status` body), optionally with `Retry-After`.
    Status {
        /// HTTP status code.
        code: u16,
        /// `Retry-After` seconds.
        retry_after: Option<u32>,
    },
    /// Never answer.
    Hang,
    /// Close the connection without answering.
    CloseConnection,
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

/// A running stand-in API server.
pub struct Standin {
    addr: SocketAddr,
}

impl Standin {
    /// Starts the server.
    pub async fn start(opts: Options) -> anyhow::Result<Standin> {
        let _ = opts;
        anyhow::bail!("kube-standin: not implemented yet")
    }
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Kubeconfig of the reviewer (SA tokengate/tokengate, bound to system:auth-delegator).
    pub fn kubeconfig_path(&self) -> PathBuf {
        PathBuf::new()
    }
    /// Kubeconfig of a cluster-admin user.
    pub fn admin_kubeconfig_path(&self) -> PathBuf {
        PathBuf::new()
    }
    /// File holding the reviewer token.
    pub fn reviewer_token_path(&self) -> PathBuf {
        PathBuf::new()
    }
    /// PEM of the CA that signed the serving certificate.
    pub fn ca_pem(&self) -> String {
        String::new()
    }
    /// Creates (or recreates) a service account; returns its uid.
    pub fn create_service_account(&self, ns: &str, name: &str) -> String {
        let _ = (ns, name);
        String::new()
    }
    /// Deletes a service account.
    pub fn delete_service_account(&self, ns: &str, name: &str) {
        let _ = (ns, name);
    }
    /// Creates a pod running as `service_account`, optionally on `node`; returns its uid.
    pub fn create_pod(
        &self,
        ns: &str,
        name: &str,
        service_account: &str,
        node: Option<&str>,
    ) -> String {
        let _ = (ns, name, service_account, node);
        String::new()
    }
    /// Deletes a pod (its tokens stop validating).
    pub fn delete_pod(&self, ns: &str, name: &str) {
        let _ = (ns, name);
    }
    /// Creates a ClusterRoleBinding of `cluster_role` to service account `(ns, name)`.
    pub fn bind_cluster_role(&self, binding: &str, cluster_role: &str, subject_sa: (&str, &str)) {
        let _ = (binding, cluster_role, subject_sa);
    }
    /// Deletes a ClusterRoleBinding.
    pub fn delete_cluster_role_binding(&self, binding: &str) {
        let _ = binding;
    }
    /// Mints a token through the same code path as the TokenRequest endpoint.
    pub fn mint(&self, req: &MintRequest) -> anyhow::Result<String> {
        let _ = req;
        anyhow::bail!("kube-standin: not implemented yet")
    }
    /// Number of TokenReview POSTs that reached the handler.
    pub fn token_reviews_served(&self) -> u64 {
        0
    }
    /// Sets the fault applied to TokenReview requests.
    pub fn set_fault(&self, fault: Fault) {
        let _ = fault;
    }
    /// Mints a new reviewer token, writes it atomically and revokes the old one.
    pub fn rotate_reviewer_token(&self) {}
    /// Adds a signing key that signs from now on; returns its kid.
    pub fn add_signing_key(&self, alg: KeyAlg) -> String {
        let _ = alg;
        String::new()
    }
    /// Retires a key: removed from JWKS and no longer verifies.
    pub fn retire_key(&self, kid: &str) {
        let _ = kid;
    }
    /// Stops the server.
    pub async fn shutdown(self) {}
}
