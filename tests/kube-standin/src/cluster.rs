//! The cluster state and the API server's token logic, independent of HTTP: objects
//! (namespaces, service accounts, pods, nodes, secrets, ClusterRoleBindings), signing keys,
//! issuing tokens (TokenRequest), authenticating bearer tokens (the authenticator chain
//! TokenReview and every API request go through) and RBAC decisions.
//!
//! One `std::sync::Mutex` guards all state: every operation is short and never awaits while
//! holding it, and a single lock makes "delete a pod, then review its token" trivially
//! linearizable, like the API server's informer-backed lookups after they catch up.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::clock::now_unix;
use crate::keys::SigningKey;
use crate::status::{go_quote, go_quote_list, ApiError};
use crate::{KeyAlg, MetadataStyle};

/// Minimum `expirationSeconds` of a TokenRequest (10 minutes).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// Maximum `expirationSeconds` of a TokenRequest (2^32).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// Default `expirationSeconds`.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The kubelet's default projected-token lifetime that triggers extension (§2.4).
pub const WARN_ONLY_EXPIRATION_SECONDS: i64 = 3607;
/// Lifetime of an extended token (`--service-account-max-token-expiration` unset: 1 year).
pub const EXTENDED_EXPIRATION_SECONDS: i64 = 365 * 24 * 3600;
/// go-jose `DefaultLeeway`.
pub const LEEWAY_SECONDS: i64 = 60;
/// Issuer of legacy secret-based tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";
/// Above this many pods plus service accounts, state saves happen in the background.
pub const BACKGROUND_SAVE_OBJECTS: usize = 10_000;

/// The background state writer: the latest snapshot wins.
struct Saver {
    tx: std::sync::mpsc::Sender<(std::path::PathBuf, Snapshot)>,
    thread: std::thread::JoinHandle<()>,
}

impl Saver {
    fn start() -> Saver {
        let (tx, rx) = std::sync::mpsc::channel::<(std::path::PathBuf, Snapshot)>();
        let thread = std::thread::spawn(move || {
            while let Ok(mut job) = rx.recv() {
                while let Ok(newer) = rx.try_recv() {
                    job = newer;
                }
                write_snapshot(&job.0, &job.1);
            }
        });
        Saver { tx, thread }
    }
}

fn write_snapshot(path: &std::path::Path, snap: &Snapshot) {
    let result = serde_json::to_vec(snap)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(crate::kubeconfig::write_atomic(path, &bytes)?));
    if let Err(e) = result {
        tracing::error!(path = %path.display(), error = %e, "saving the stand-in state failed");
    }
}

/// Default capacity of each resource's watch history.
pub const DEFAULT_HISTORY: usize = 1000;
/// Bearer authenticator's error when no token authenticator had an opinion.
pub const INVALID_BEARER_TOKEN: &str = "invalid bearer token";

/// Feature flags and issuer settings, fixed at start.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `--service-account-issuer` (the first and only one).
    pub issuer: String,
    /// `--api-audiences` (already defaulted to `[issuer]`).
    pub api_audiences: Vec<String>,
    /// ServiceAccountTokenJTI.
    pub jti: bool,
    /// ServiceAccountTokenPodNodeInfo.
    pub pod_node_info: bool,
    /// Enforce the 600 s minimum lifetime.
    pub enforce_min_expiration: bool,
    /// TokenReview metadata style.
    pub metadata_style: MetadataStyle,
}

/// An authenticated user (`user.Info`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Username.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    /// UID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Extra, keys sorted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// The anonymous user of a request without credentials.
    pub fn anonymous() -> UserInfo {
        UserInfo {
            username: "system:anonymous".to_string(),
            groups: vec!["system:unauthenticated".to_string()],
            ..Default::default()
        }
    }
}

/// Result of running a bearer token through the authenticator chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Authenticated; `audiences` is the intersection in requested order.
    Authenticated {
        /// The user.
        user: UserInfo,
        /// `status.audiences`.
        audiences: Vec<String>,
    },
    /// Rejected with this `err.Error()` text.
    Failed(String),
}

pub use crate::rbac::{Attributes, Decision, Kind, Object as RbacObject, PolicyRule, Subject};

/// Metadata every stored object has.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// UID.
    pub uid: String,
    /// Creation time (unix seconds).
    pub created: i64,
    /// `metadata.resourceVersion`: the global revision of the object's last change.
    #[serde(default)]
    pub rv: u64,
    /// `metadata.deletionTimestamp` (unix seconds) of an object being deleted gracefully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<i64>,
    /// `metadata.deletionGracePeriodSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_grace_seconds: Option<i64>,
}

/// Default `spec.terminationGracePeriodSeconds` of a pod.
pub const DEFAULT_TERMINATION_GRACE_SECONDS: i64 = 30;

fn default_grace() -> i64 {
    DEFAULT_TERMINATION_GRACE_SECONDS
}

/// A pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    /// Metadata.
    pub meta: Meta,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `spec.terminationGracePeriodSeconds`: the grace period of a DELETE that names none.
    #[serde(default = "default_grace")]
    pub termination_grace_seconds: i64,
}

/// A secret (only what token binding and legacy tokens need).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Secret {
    /// Metadata.
    pub meta: Meta,
    /// `kubernetes.io/service-account.name` annotation.
    pub service_account: Option<String>,
    /// `data.token` of a `kubernetes.io/service-account-token` secret.
    pub token: Option<String>,
}

/// The resources that can be listed and watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `pods`.
    Pods,
    /// `serviceaccounts`.
    ServiceAccounts,
}

impl Resource {
    /// The resource name in URLs and RBAC.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::ServiceAccounts => "serviceaccounts",
        }
    }
    /// The object kind.
    pub fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::ServiceAccounts => "ServiceAccount",
        }
    }
    fn index(self) -> usize {
        match self {
            Resource::Pods => 0,
            Resource::ServiceAccounts => 1,
        }
    }
}

/// A listed or watched object.
#[derive(Debug, Clone)]
pub enum Object {
    /// A pod.
    Pod(Pod),
    /// A service account.
    ServiceAccount(Meta),
}

impl Object {
    /// The object's metadata.
    pub fn meta(&self) -> &Meta {
        match self {
            Object::Pod(p) => &p.meta,
            Object::ServiceAccount(m) => m,
        }
    }
}

/// A namespaced object with its name, as lists and watch events carry it.
#[derive(Debug, Clone)]
pub struct Item {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object.
    pub object: Object,
}

/// Watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// `ADDED`.
    Added,
    /// `MODIFIED`.
    Modified,
    /// `DELETED`.
    Deleted,
}

impl EventType {
    /// The `type` field of the watch event.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change in a resource's event history.
#[derive(Debug, Clone)]
pub struct Change {
    /// Revision of the change (the object's `resourceVersion` in the event).
    pub rv: u64,
    /// Event type.
    pub kind: EventType,
    /// The object after the change (before it, for deletions, with the deletion's RV).
    pub item: Arc<Item>,
}

/// The bounded event history of one resource, like the API server's watch cache.
#[derive(Debug, Default)]
struct History {
    changes: VecDeque<Change>,
    /// Watches from a revision below this fail with 410 (`oldest - 1` of the watch cache).
    floor: u64,
}

/// A watch could not start: the revision is older than the history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooOld {
    /// The requested revision.
    pub requested: u64,
    /// The oldest revision a watch can start from.
    pub oldest: u64,
}

/// How many objects [`Cluster::bulk_create`] made, and the revision after them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BulkCreated {
    /// Namespaces used.
    pub namespaces: usize,
    /// Service accounts created.
    #[serde(rename = "serviceAccounts")]
    pub service_accounts: usize,
    /// Pods created.
    pub pods: usize,
    /// The global resource version after the last object.
    #[serde(rename = "resourceVersion")]
    pub resource_version: String,
}

#[derive(Default)]
struct State {
    /// Verification keys, in publication order.
    keys: Vec<Arc<SigningKey>>,
    /// Kid of the key that signs; `None` means the last key.
    signing_kid: Option<String>,
    /// The global revision counter (etcd's revision): last assigned resourceVersion.
    rv: u64,
    /// Event histories, indexed by [`Resource::index`].
    history: [History; 2],
    /// Capacity of each history.
    history_capacity: usize,
    /// Roles, ClusterRoles and their bindings (bootstrap policy included).
    rbac: crate::rbac::Store,
    namespaces: BTreeMap<String, Meta>,
    service_accounts: BTreeMap<(String, String), Meta>,
    pods: BTreeMap<(String, String), Pod>,
    nodes: BTreeMap<String, Meta>,
    secrets: BTreeMap<(String, String), Secret>,
    /// `--token-auth-file` entries: token -> user.
    static_tokens: BTreeMap<String, UserInfo>,
}

impl State {
    /// A new object's metadata, at the next revision.
    fn fresh(&mut self, now: i64) -> Meta {
        self.rv += 1;
        Meta {
            uid: uuid::Uuid::new_v4().to_string(),
            created: now,
            rv: self.rv,
            deletion_timestamp: None,
            deletion_grace_seconds: None,
        }
    }

    /// Appends a change to the resource's history, evicting the oldest beyond capacity.
    fn record(&mut self, res: Resource, kind: EventType, ns: &str, name: &str, object: Object) {
        let rv = object.meta().rv;
        let cap = self.history_capacity.max(1);
        let h = &mut self.history[res.index()];
        h.changes.push_back(Change {
            rv,
            kind,
            item: Arc::new(Item {
                namespace: ns.to_string(),
                name: name.to_string(),
                object,
            }),
        });
        let mut evicted = false;
        while h.changes.len() > cap {
            h.changes.pop_front();
            evicted = true;
        }
        if evicted {
            if let Some(front) = h.changes.front() {
                h.floor = front.rv - 1;
            }
        }
    }

    fn insert_sa(&mut self, ns: &str, name: &str, meta: Meta) {
        if let Some(old) = self.service_accounts.remove(&ns_key(ns, name)) {
            self.delete_recorded(
                Resource::ServiceAccounts,
                ns,
                name,
                Object::ServiceAccount(old),
            );
        }
        self.service_accounts.insert(ns_key(ns, name), meta.clone());
        self.record(
            Resource::ServiceAccounts,
            EventType::Added,
            ns,
            name,
            Object::ServiceAccount(meta),
        );
    }

    fn insert_pod(&mut self, ns: &str, name: &str, pod: Pod) {
        if let Some(old) = self.pods.remove(&ns_key(ns, name)) {
            self.delete_recorded(Resource::Pods, ns, name, Object::Pod(old));
        }
        self.pods.insert(ns_key(ns, name), pod.clone());
        self.record(Resource::Pods, EventType::Added, ns, name, Object::Pod(pod));
    }

    /// Records the DELETED event of an object already removed from its map.
    fn delete_recorded(&mut self, res: Resource, ns: &str, name: &str, mut object: Object) {
        self.rv += 1;
        match &mut object {
            Object::Pod(p) => p.meta.rv = self.rv,
            Object::ServiceAccount(m) => m.rv = self.rv,
        }
        self.record(res, EventType::Deleted, ns, name, object);
    }

    fn remove_pod(&mut self, ns: &str, name: &str) -> Option<Pod> {
        let pod = self.pods.remove(&ns_key(ns, name))?;
        self.delete_recorded(Resource::Pods, ns, name, Object::Pod(pod.clone()));
        Some(pod)
    }

    fn remove_sa(&mut self, ns: &str, name: &str) -> Option<Meta> {
        let sa = self.service_accounts.remove(&ns_key(ns, name))?;
        self.delete_recorded(
            Resource::ServiceAccounts,
            ns,
            name,
            Object::ServiceAccount(sa.clone()),
        );
        Some(sa)
    }
}

/// The cluster: configuration plus state.
pub struct Cluster {
    /// Fixed configuration.
    pub cfg: ClusterConfig,
    state: Mutex<State>,
    /// Where every change is saved (process mode), with the notes saved along.
    persist: Mutex<Option<(std::path::PathBuf, BTreeMap<String, String>)>>,
    /// Background writer of large states ([`BACKGROUND_SAVE_OBJECTS`]).
    saver: Mutex<Option<Saver>>,
    /// Seconds added to the wall clock ([`Cluster::advance_clock`]).
    clock_offset: AtomicI64,
    /// Whether terminating pods are removed when their grace period ends (the kubelet).
    reaping: AtomicBool,
    /// The latest revision, for watches to wait on.
    revision: tokio::sync::watch::Sender<u64>,
}

/// A saved signing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedKey {
    alg: String,
    pkcs8: String,
}

/// Everything needed to resume a cluster after a restart: keys, objects, static tokens
/// and free-form notes of the embedding [`crate::Standin`] (TLS material, reviewer).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Issuer the state was written for.
    pub issuer: String,
    keys: Vec<SavedKey>,
    namespaces: Vec<(String, Meta)>,
    service_accounts: Vec<(String, String, Meta)>,
    pods: Vec<(String, String, Pod)>,
    nodes: Vec<(String, Meta)>,
    secrets: Vec<(String, String, Secret)>,
    static_tokens: Vec<(String, UserInfo)>,
    #[serde(default)]
    signing_kid: Option<String>,
    #[serde(default)]
    rv: u64,
    #[serde(default)]
    rbac: crate::rbac::Store,
    #[serde(default)]
    clock_offset: i64,
    /// Values the embedding server keeps with the state.
    pub notes: BTreeMap<String, String>,
}

/// What a TokenRequest asks for (the parts of the object the server reads).
#[derive(Debug, Clone, Default)]
pub struct IssueSpec {
    /// `metadata.name` from the body, if set.
    pub meta_name: Option<String>,
    /// `metadata.namespace` from the body, if set.
    pub meta_namespace: Option<String>,
    /// Namespace from the URL.
    pub namespace: String,
    /// Service account name from the URL.
    pub service_account: String,
    /// `spec.audiences`.
    pub audiences: Vec<String>,
    /// `spec.expirationSeconds`.
    pub expiration_seconds: Option<i64>,
    /// `spec.boundObjectRef`.
    pub bound: Option<BoundObjectRef>,
    /// Issue time override (test-only).
    pub issued_at: Option<i64>,
}

/// `spec.boundObjectRef`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BoundObjectRef {
    /// Kind.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// API version.
    #[serde(
        rename = "apiVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub api_version: String,
    /// Name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// UID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// A minted token and what the TokenRequest response reports.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The JWT.
    pub token: String,
    /// Request time (for `metadata.creationTimestamp`).
    pub now: i64,
    /// `status.expirationTimestamp` (unix seconds).
    pub expiration_timestamp: i64,
    /// `spec.audiences` after defaulting.
    pub audiences: Vec<String>,
    /// `spec.expirationSeconds` after defaulting.
    pub expiration_seconds: i64,
}

// ---- JWT claim shapes. Fields are declared in alphabetical order because go-jose writes
// ---- the merged claims as a Go map, whose JSON keys are sorted.

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Ref {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    uid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct KubeClaims {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<Ref>,
    #[serde(default)]
    serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warnafter: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
struct BoundClaims {
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    iss: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubeClaims,
    nbf: i64,
    sub: String,
}

#[derive(Debug, Clone, Serialize)]
struct LegacyClaims {
    iss: &'static str,
    #[serde(rename = "kubernetes.io/serviceaccount/namespace")]
    namespace: String,
    #[serde(rename = "kubernetes.io/serviceaccount/secret.name")]
    secret_name: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.name")]
    sa_name: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.uid")]
    sa_uid: String,
    sub: String,
}

#[derive(Debug, Serialize)]
struct JwsHeader<'a> {
    alg: &'a str,
    kid: &'a str,
}

/// go-jose `jwt.Audience`: a string or an array of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum AudClaim {
    One(String),
    Many(Vec<String>),
}

/// go-jose `NumericDate` accepts any JSON number and truncates to seconds.
fn de_numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v: Option<f64> = Option::deserialize(d)?;
    Ok(v.map(|f| f as i64))
}

#[derive(Debug, Clone, Deserialize)]
struct VerifiedClaims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<AudClaim>,
    #[serde(default, deserialize_with = "de_numeric_date")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "de_numeric_date")]
    nbf: Option<i64>,
    #[serde(default, deserialize_with = "de_numeric_date")]
    iat: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubeClaims>,
    #[serde(rename = "kubernetes.io/serviceaccount/namespace", default)]
    legacy_namespace: Option<String>,
    #[serde(rename = "kubernetes.io/serviceaccount/secret.name", default)]
    legacy_secret_name: Option<String>,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.name", default)]
    legacy_sa_name: Option<String>,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.uid", default)]
    legacy_sa_uid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IssOnly {
    #[serde(default)]
    iss: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HeaderIn {
    #[serde(default)]
    alg: String,
    #[serde(default)]
    kid: String,
}

/// apimachinery `utilerrors.NewAggregate(..).Error()`: de-duplicated, one error bare,
/// several in `[a, b]`.
pub fn aggregate(errs: &[String]) -> String {
    let mut seen = BTreeSet::new();
    let mut uniq: Vec<&str> = Vec::new();
    for e in errs {
        if seen.insert(e.as_str()) {
            uniq.push(e);
        }
    }
    match uniq.len() {
        0 => String::new(),
        1 => uniq[0].to_string(),
        _ => format!("[{}]", uniq.join(", ")),
    }
}

/// Walks `requested` and keeps the entries `token` also has (`Audiences.Intersect`).
fn intersect(requested: &[String], token: &[String]) -> Vec<String> {
    requested
        .iter()
        .filter(|a| token.contains(a))
        .cloned()
        .collect()
}

/// An object a token is bound to (`kind` is `secret`, `pod` or `node`) must still exist,
/// not be deleted for longer than the 60 s leeway (a `deletionTimestamp` before `now - 60`),
/// and have the UID the token claims; the errors are kube-apiserver's.
fn check_bound_object(
    kind: &str,
    found: Option<&Meta>,
    claimed_uid: &str,
    now: i64,
) -> Result<(), String> {
    let invalidated = || "service account token has been invalidated".to_string();
    let meta = found.ok_or_else(invalidated)?;
    if meta
        .deletion_timestamp
        .is_some_and(|t| t < now - LEEWAY_SECONDS)
    {
        return Err(invalidated());
    }
    if meta.uid != claimed_uid {
        return Err(format!(
            "{kind} UID ({}) does not match service account {kind} ref claim ({claimed_uid})",
            meta.uid
        ));
    }
    Ok(())
}

/// A map of namespaced objects as the snapshot saves it: `(namespace, name, object)`
/// triples, since JSON object keys can only be strings.
fn save_namespaced<T: Clone>(map: &BTreeMap<(String, String), T>) -> Vec<(String, String, T)> {
    map.iter()
        .map(|((ns, n), v)| (ns.clone(), n.clone(), v.clone()))
        .collect()
}

/// The inverse of [`save_namespaced`].
fn restore_namespaced<T: Clone>(list: &[(String, String, T)]) -> BTreeMap<(String, String), T> {
    list.iter()
        .map(|(ns, n, v)| (ns_key(ns, n), v.clone()))
        .collect()
}

/// The map key of a namespaced object.
fn ns_key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `system:serviceaccount:<ns>:<name>` split back into its parts.
fn split_sa_username(sub: &str) -> Option<(&str, &str)> {
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    if ns.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some((ns, name))
}

fn sa_user(ns: &str, name: &str, uid: &str) -> UserInfo {
    UserInfo {
        username: format!("system:serviceaccount:{ns}:{name}"),
        uid: uid.to_string(),
        groups: vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{ns}"),
        ],
        extra: BTreeMap::new(),
    }
}

/// Token-authenticator result: `Ok(None)` is "no opinion".
type TokenResult = Result<Option<(UserInfo, Vec<String>)>, String>;

impl Cluster {
    /// A new, empty cluster with one signing key.
    pub fn new(cfg: ClusterConfig, alg: KeyAlg) -> anyhow::Result<Cluster> {
        let key = SigningKey::generate(alg)?;
        let state = State {
            keys: vec![Arc::new(key)],
            history_capacity: DEFAULT_HISTORY,
            ..Default::default()
        };
        let c = Cluster::with_state(cfg, state);
        // The bootstrap policy (plugin/pkg/auth/authorizer/rbac/bootstrappolicy), as objects.
        let now = c.now();
        c.change(|st| {
            st.rbac = crate::rbac::Store::bootstrap(|name| {
                Self::rbac_meta(st_rv(&mut st.rv), now, "", name)
            });
        });
        Ok(c)
    }

    fn with_state(cfg: ClusterConfig, state: State) -> Cluster {
        let rv = state.rv;
        Cluster {
            cfg,
            state: Mutex::new(state),
            persist: Mutex::new(None),
            saver: Mutex::new(None),
            clock_offset: AtomicI64::new(0),
            reaping: AtomicBool::new(true),
            revision: tokio::sync::watch::channel(rv).0,
        }
    }

    /// Sets how many changes each resource's history keeps (at least 1); older watches
    /// get 410 Expired.
    pub fn set_history_capacity(&self, n: usize) {
        let mut st = lock(&self.state);
        st.history_capacity = n.max(1);
        let cap = st.history_capacity;
        for h in &mut st.history {
            let mut evicted = false;
            while h.changes.len() > cap {
                h.changes.pop_front();
                evicted = true;
            }
            if let (true, Some(front)) = (evicted, h.changes.front()) {
                h.floor = front.rv - 1;
            }
        }
    }

    // ---------------------------------------------------------------- clock

    /// The server's clock in unix seconds: the wall clock plus [`Cluster::advance_clock`]s.
    pub fn now(&self) -> i64 {
        now_unix() + self.clock_offset.load(Ordering::SeqCst)
    }

    /// Moves the server's clock forward (or back) by `secs`, then removes pods whose grace
    /// period has ended.
    pub fn advance_clock(&self, secs: i64) -> i64 {
        self.clock_offset.fetch_add(secs, Ordering::SeqCst);
        if self.reap() == 0 {
            // Saved with the state, so a restarted process keeps the advanced clock.
            self.save();
        }
        self.now()
    }

    /// Turns the removal of terminating pods at their `deletionTimestamp` on or off (off is
    /// a kubelet that never confirms: the pod stays, terminating, past its deadline).
    pub fn set_reaping(&self, on: bool) {
        self.reaping.store(on, Ordering::SeqCst);
        if on {
            self.reap();
        }
    }

    /// Removes the terminating pods whose `deletionTimestamp` has passed (DELETED events);
    /// returns how many. Runs periodically and after every clock change.
    pub fn reap(&self) -> usize {
        if !self.reaping.load(Ordering::SeqCst) {
            return 0;
        }
        let now = self.now();
        let mut st = lock(&self.state);
        let due: Vec<(String, String)> = st
            .pods
            .iter()
            .filter(|(_, p)| p.meta.deletion_timestamp.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for (ns, name) in &due {
            st.remove_pod(ns, name);
        }
        drop(st);
        if !due.is_empty() {
            self.save();
        }
        due.len()
    }

    // ---------------------------------------------------------------- list and watch

    /// The last assigned resource version.
    pub fn resource_version(&self) -> u64 {
        lock(&self.state).rv
    }

    /// A receiver of the latest revision, for watches to wait on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// One page of a list: objects of `res` (in `namespace`, or all) in key order after
    /// `after`, at most `limit`; returns the current revision, the objects and whether more
    /// follow.
    pub fn list(
        &self,
        res: Resource,
        namespace: Option<&str>,
        after: Option<&(String, String)>,
        limit: Option<usize>,
    ) -> (u64, Vec<Item>, bool) {
        use std::ops::Bound;
        let st = lock(&self.state);
        let lower = match (after, namespace) {
            (Some(k), _) => Bound::Excluded(k.clone()),
            (None, Some(ns)) => Bound::Included(ns_key(ns, "")),
            (None, None) => Bound::Unbounded,
        };
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let in_ns = |k: &(String, String)| namespace.is_none_or(|ns| k.0 == ns);
        let mut items = Vec::new();
        let mut more = false;
        macro_rules! collect {
            ($map:expr, $wrap:expr) => {
                for (k, v) in $map.range((lower, Bound::Unbounded)) {
                    if !in_ns(k) {
                        break;
                    }
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(Item {
                        namespace: k.0.clone(),
                        name: k.1.clone(),
                        object: $wrap(v.clone()),
                    });
                }
            };
        }
        match res {
            Resource::Pods => collect!(st.pods, Object::Pod),
            Resource::ServiceAccounts => collect!(st.service_accounts, Object::ServiceAccount),
        }
        (st.rv, items, more)
    }

    /// The changes of `res` after revision `since`, and the current revision; `Err` when
    /// the history no longer reaches back to `since`.
    pub fn changes_since(&self, res: Resource, since: u64) -> Result<(Vec<Change>, u64), TooOld> {
        let st = lock(&self.state);
        let h = &st.history[res.index()];
        if since < h.floor {
            return Err(TooOld {
                requested: since,
                oldest: h.floor,
            });
        }
        let start = h.changes.partition_point(|c| c.rv <= since);
        Ok((h.changes.range(start..).cloned().collect(), st.rv))
    }

    /// Creates `service_accounts` service accounts and `pods` pods spread over `namespaces`
    /// namespaces `{prefix}-{i}` (SA `sa-{j}` in namespace `j % namespaces`, pod `pod-{k}`
    /// running as SA `k % service_accounts` in that SA's namespace, on `node` if given),
    /// under one lock and with one save. Existing objects of those names are replaced.
    pub fn bulk_create(
        &self,
        prefix: &str,
        namespaces: usize,
        service_accounts: usize,
        pods: usize,
        node: Option<&str>,
    ) -> BulkCreated {
        let namespaces = namespaces.max(1);
        let now = self.now();
        let mut st = lock(&self.state);
        let ns_names: Vec<String> = (0..namespaces).map(|i| format!("{prefix}-{i}")).collect();
        for ns in &ns_names {
            Self::ensure_namespace_locked(&mut st, ns, now);
        }
        if let Some(n) = node {
            if !st.nodes.contains_key(n) {
                let meta = st.fresh(now);
                st.nodes.insert(n.to_string(), meta);
            }
        }
        for j in 0..service_accounts {
            let meta = st.fresh(now);
            st.insert_sa(&ns_names[j % namespaces], &format!("sa-{j}"), meta);
        }
        for k in 0..pods {
            let (ns, sa) = if service_accounts == 0 {
                (&ns_names[k % namespaces], "default".to_string())
            } else {
                let j = k % service_accounts;
                (&ns_names[j % namespaces], format!("sa-{j}"))
            };
            let pod = Pod {
                meta: st.fresh(now),
                service_account: sa,
                node: node.map(str::to_string),
                termination_grace_seconds: DEFAULT_TERMINATION_GRACE_SECONDS,
            };
            st.insert_pod(ns, &format!("pod-{k}"), pod);
        }
        let rv = st.rv;
        drop(st);
        self.save();
        BulkCreated {
            namespaces,
            service_accounts,
            pods,
            resource_version: rv.to_string(),
        }
    }

    // ---------------------------------------------------------------- persistence

    /// Rebuilds a cluster from a snapshot.
    pub fn restore(cfg: ClusterConfig, snap: &Snapshot) -> anyhow::Result<Cluster> {
        let mut keys = Vec::new();
        for k in &snap.keys {
            let alg = match k.alg.as_str() {
                "RS256" => KeyAlg::Rs256,
                "ES256" => KeyAlg::Es256,
                other => anyhow::bail!("saved key has unknown algorithm {other:?}"),
            };
            let der = base64::engine::general_purpose::STANDARD.decode(&k.pkcs8)?;
            keys.push(Arc::new(SigningKey::from_pkcs8(alg, &der)?));
        }
        anyhow::ensure!(!keys.is_empty(), "saved state has no signing key");
        let mut state = State {
            keys,
            signing_kid: snap.signing_kid.clone(),
            history_capacity: DEFAULT_HISTORY,
            rbac: snap.rbac.clone(),
            namespaces: snap.namespaces.iter().cloned().collect(),
            service_accounts: restore_namespaced(&snap.service_accounts),
            pods: restore_namespaced(&snap.pods),
            nodes: snap.nodes.iter().cloned().collect(),
            secrets: restore_namespaced(&snap.secrets),
            static_tokens: snap.static_tokens.iter().cloned().collect(),
            ..Default::default()
        };
        // The revision goes on from where it was (as etcd's does); the watch history starts
        // empty, so watches from before the restart get 410, as from a new watch cache.
        let max_rv = state
            .pods
            .values()
            .map(|p| p.meta.rv)
            .chain(state.service_accounts.values().map(|m| m.rv))
            .max()
            .unwrap_or(0);
        state.rv = snap.rv.max(max_rv);
        for h in &mut state.history {
            h.floor = state.rv;
        }
        let c = Cluster::with_state(cfg, state);
        c.clock_offset.store(snap.clock_offset, Ordering::SeqCst);
        Ok(c)
    }

    /// The current state as a snapshot, with `notes` attached.
    pub fn snapshot(&self, notes: BTreeMap<String, String>) -> anyhow::Result<Snapshot> {
        let st = lock(&self.state);
        let mut keys = Vec::new();
        for k in &st.keys {
            keys.push(SavedKey {
                alg: k.alg_name().to_string(),
                pkcs8: base64::engine::general_purpose::STANDARD.encode(k.to_pkcs8()?),
            });
        }
        Ok(Snapshot {
            issuer: self.cfg.issuer.clone(),
            keys,
            namespaces: st.namespaces.clone().into_iter().collect(),
            service_accounts: save_namespaced(&st.service_accounts),
            pods: save_namespaced(&st.pods),
            nodes: st.nodes.clone().into_iter().collect(),
            secrets: save_namespaced(&st.secrets),
            static_tokens: st.static_tokens.clone().into_iter().collect(),
            signing_kid: st.signing_kid.clone(),
            rv: st.rv,
            rbac: st.rbac.clone(),
            clock_offset: self.clock_offset.load(Ordering::SeqCst),
            notes,
        })
    }

    /// From now on, saves the state (with `notes`) to `path` after every change.
    pub fn persist_to(&self, path: std::path::PathBuf, notes: BTreeMap<String, String>) {
        *self.persist.lock().unwrap_or_else(|e| e.into_inner()) = Some((path, notes));
        self.save();
    }

    /// Replaces one note and saves.
    pub fn set_note(&self, key: &str, value: String) {
        if let Some((_, notes)) = self
            .persist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            notes.insert(key.to_string(), value);
        }
        self.save();
    }

    /// Saves the state if persistence is on. Failures are logged, not fatal: the server
    /// keeps serving from memory. Small states are written before this returns; once the
    /// cluster holds more than [`BACKGROUND_SAVE_OBJECTS`] pods and service accounts (bulk
    /// benchmarks), snapshots go to a background writer that keeps only the latest, so a
    /// change does not wait for a many-megabyte write ([`Cluster::flush`] waits for it).
    fn save(&self) {
        let (rv, big) = {
            let st = lock(&self.state);
            (
                st.rv,
                st.pods.len() + st.service_accounts.len() > BACKGROUND_SAVE_OBJECTS,
            )
        };
        self.revision.send_replace(rv);
        let target = self
            .persist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((path, notes)) = target else { return };
        let snap = match self.snapshot(notes) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "snapshotting the stand-in state failed");
                return;
            }
        };
        let mut saver = self.saver.lock().unwrap_or_else(|e| e.into_inner());
        if big || saver.is_some() {
            let s = saver.get_or_insert_with(Saver::start);
            if s.tx.send((path, snap)).is_ok() {
                return;
            }
            tracing::error!("the background state writer is gone");
        } else {
            drop(saver);
            write_snapshot(&path, &snap);
        }
    }

    /// Waits until the background writer (if any) has saved the latest state.
    pub fn flush(&self) {
        let saver = self.saver.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = saver {
            drop(s.tx);
            let _ = s.thread.join();
        }
    }

    /// Applies one change to the state under the lock, then saves. The lock is released
    /// first: [`Cluster::save`] takes it again for the snapshot.
    fn change<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut lock(&self.state));
        self.save();
        r
    }

    // ---------------------------------------------------------------- objects

    /// Ensures a namespace exists, with its `default` service account.
    pub fn ensure_namespace(&self, ns: &str) {
        let now = self.now();
        self.change(|st| Self::ensure_namespace_locked(st, ns, now));
    }

    fn ensure_namespace_locked(st: &mut State, ns: &str, now: i64) {
        if !st.namespaces.contains_key(ns) {
            let meta = st.fresh(now);
            st.namespaces.insert(ns.to_string(), meta);
            if !st.service_accounts.contains_key(&ns_key(ns, "default")) {
                let meta = st.fresh(now);
                st.insert_sa(ns, "default", meta);
            }
        }
    }

    /// Creates a service account; `Err` if it exists.
    pub fn create_service_account(&self, ns: &str, name: &str) -> Result<Meta, ApiError> {
        let now = self.now();
        let mut st = lock(&self.state);
        Self::ensure_namespace_locked(&mut st, ns, now);
        if st.service_accounts.contains_key(&ns_key(ns, name)) {
            return Err(ApiError::already_exists("serviceaccounts", "", name));
        }
        let meta = st.fresh(now);
        st.insert_sa(ns, name, meta.clone());
        drop(st);
        self.save();
        Ok(meta)
    }

    /// Creates or replaces a service account (new UID; a replacement is a DELETED then an
    /// ADDED event, as delete-and-recreate is).
    pub fn recreate_service_account(&self, ns: &str, name: &str) -> Meta {
        let now = self.now();
        self.change(|st| {
            Self::ensure_namespace_locked(st, ns, now);
            let meta = st.fresh(now);
            st.insert_sa(ns, name, meta.clone());
            meta
        })
    }

    /// Looks up a service account.
    pub fn get_service_account(&self, ns: &str, name: &str) -> Option<Meta> {
        lock(&self.state)
            .service_accounts
            .get(&ns_key(ns, name))
            .cloned()
    }

    /// Deletes a service account; returns it if it existed.
    pub fn delete_service_account(&self, ns: &str, name: &str) -> Option<Meta> {
        self.change(|st| st.remove_sa(ns, name))
    }

    /// Creates a pod (and its node object, if named and new); `Err` if it exists.
    pub fn create_pod(
        &self,
        ns: &str,
        name: &str,
        service_account: &str,
        node: Option<&str>,
    ) -> Result<Pod, ApiError> {
        self.create_pod_with_grace(
            ns,
            name,
            service_account,
            node,
            DEFAULT_TERMINATION_GRACE_SECONDS,
        )
    }

    /// [`Cluster::create_pod`] with `spec.terminationGracePeriodSeconds`.
    pub fn create_pod_with_grace(
        &self,
        ns: &str,
        name: &str,
        service_account: &str,
        node: Option<&str>,
        termination_grace_seconds: i64,
    ) -> Result<Pod, ApiError> {
        let now = self.now();
        let mut st = lock(&self.state);
        Self::ensure_namespace_locked(&mut st, ns, now);
        if st.pods.contains_key(&ns_key(ns, name)) {
            return Err(ApiError::already_exists("pods", "", name));
        }
        if let Some(n) = node {
            if !st.nodes.contains_key(n) {
                let meta = st.fresh(now);
                st.nodes.insert(n.to_string(), meta);
            }
        }
        let pod = Pod {
            meta: st.fresh(now),
            service_account: service_account.to_string(),
            node: node.map(str::to_string),
            termination_grace_seconds,
        };
        st.insert_pod(ns, name, pod.clone());
        drop(st);
        self.save();
        Ok(pod)
    }

    /// Looks up a pod.
    pub fn get_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        lock(&self.state).pods.get(&ns_key(ns, name)).cloned()
    }

    /// Deletes a pod immediately (grace period 0); returns it if it existed.
    pub fn delete_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.change(|st| st.remove_pod(ns, name))
    }

    /// Deletes a pod as `DELETE` with `gracePeriodSeconds` does (`None`: the pod's
    /// `terminationGracePeriodSeconds`). A pod not scheduled to a node, or a grace of 0, is
    /// removed at once; otherwise the pod gets `deletionTimestamp` = now + grace and
    /// `deletionGracePeriodSeconds` (a MODIFIED event) and is removed when that time comes.
    /// A second delete can only shorten the grace. Returns the pod as the DELETE answers it.
    pub fn delete_pod_graceful(&self, ns: &str, name: &str, grace: Option<i64>) -> Option<Pod> {
        let now = self.now();
        let r = self.change(|st| {
            let pod = st.pods.get(&ns_key(ns, name))?.clone();
            let grace = grace.unwrap_or(pod.termination_grace_seconds).max(0);
            if grace == 0 || pod.node.is_none() {
                return st.remove_pod(ns, name);
            }
            let deadline = now + grace;
            if pod.meta.deletion_timestamp.is_some_and(|t| t <= deadline) {
                return Some(pod);
            }
            st.rv += 1;
            let rv = st.rv;
            let p = st.pods.get_mut(&ns_key(ns, name))?;
            p.meta.rv = rv;
            p.meta.deletion_timestamp = Some(deadline);
            p.meta.deletion_grace_seconds = Some(grace);
            let p = p.clone();
            st.record(
                Resource::Pods,
                EventType::Modified,
                ns,
                name,
                Object::Pod(p.clone()),
            );
            Some(p)
        });
        self.reap();
        r
    }

    /// Creates or replaces a secret.
    pub fn put_secret(
        &self,
        ns: &str,
        name: &str,
        service_account: Option<&str>,
        token: Option<String>,
    ) -> Meta {
        let now = self.now();
        self.change(|st| {
            Self::ensure_namespace_locked(st, ns, now);
            let meta = st.fresh(now);
            st.secrets.insert(
                ns_key(ns, name),
                Secret {
                    meta: meta.clone(),
                    service_account: service_account.map(str::to_string),
                    token,
                },
            );
            meta
        })
    }

    /// Deletes a secret; returns it if it existed.
    pub fn delete_secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.change(|st| st.secrets.remove(&ns_key(ns, name)))
    }

    /// Metadata of a new RBAC object at the next revision.
    fn rbac_meta(rv: u64, now: i64, ns: &str, name: &str) -> crate::rbac::ObjectMeta {
        crate::rbac::ObjectMeta {
            name: name.to_string(),
            namespace: ns.to_string(),
            uid: uuid::Uuid::new_v4().to_string(),
            resource_version: rv.to_string(),
            creation_timestamp: Some(crate::clock::rfc3339(now)),
            ..Default::default()
        }
    }

    /// Creates an RBAC object (server-set metadata filled in); `None` if the name is taken.
    pub fn rbac_create(&self, kind: Kind, mut obj: RbacObject) -> Option<RbacObject> {
        let now = self.now();
        self.change(|st| {
            let m = obj.meta();
            let (ns, name) = (m.namespace.clone(), m.name.clone());
            if st.rbac.get(kind, &ns, &name).is_some() {
                return None;
            }
            let fresh = Self::rbac_meta(st_rv(&mut st.rv), now, &ns, &name);
            let m = match &mut obj {
                RbacObject::Role(r) => &mut r.metadata,
                RbacObject::Binding(b) => &mut b.metadata,
            };
            m.uid = fresh.uid;
            m.resource_version = fresh.resource_version;
            m.creation_timestamp = fresh.creation_timestamp;
            if !kind.namespaced() {
                m.namespace.clear();
            }
            st.rbac.create(kind, obj.clone());
            Some(obj)
        })
    }

    /// Reads an RBAC object.
    pub fn rbac_get(&self, kind: Kind, ns: &str, name: &str) -> Option<RbacObject> {
        lock(&self.state).rbac.get(kind, ns, name)
    }

    /// Lists RBAC objects of a kind (in `ns`, or everywhere), with the current revision.
    pub fn rbac_list(&self, kind: Kind, ns: Option<&str>) -> (Vec<RbacObject>, u64) {
        let st = lock(&self.state);
        (st.rbac.list(kind, ns), st.rv)
    }

    /// Deletes an RBAC object, returning it.
    pub fn rbac_delete(&self, kind: Kind, ns: &str, name: &str) -> Option<RbacObject> {
        self.change(|st| {
            let gone = st.rbac.delete(kind, ns, name);
            if gone.is_some() {
                st.rv += 1;
            }
            gone
        })
    }

    /// Creates or replaces a ClusterRoleBinding with one subject.
    pub fn bind(&self, binding: &str, role: &str, subject: Subject) {
        self.bind_all(binding, role, vec![subject]);
    }

    /// Creates or replaces a ClusterRoleBinding of ClusterRole `role`.
    pub fn bind_all(&self, binding: &str, role: &str, subjects: Vec<Subject>) {
        let now = self.now();
        self.change(|st| {
            let metadata = Self::rbac_meta(st_rv(&mut st.rv), now, "", binding);
            st.rbac.put(
                Kind::ClusterRoleBinding,
                RbacObject::Binding(crate::rbac::Binding {
                    metadata,
                    role_ref: crate::rbac::RoleRef {
                        api_group: crate::rbac::GROUP.to_string(),
                        kind: "ClusterRole".to_string(),
                        name: role.to_string(),
                    },
                    subjects,
                }),
            )
        });
    }

    /// Whether a ClusterRoleBinding exists.
    pub fn has_binding(&self, binding: &str) -> bool {
        self.rbac_get(Kind::ClusterRoleBinding, "", binding)
            .is_some()
    }

    /// Deletes a ClusterRoleBinding.
    pub fn unbind(&self, binding: &str) -> bool {
        self.rbac_delete(Kind::ClusterRoleBinding, "", binding)
            .is_some()
    }

    /// Creates or replaces a ClusterRole with these rules.
    pub fn put_cluster_role(&self, name: &str, rules: Vec<PolicyRule>) {
        let now = self.now();
        self.change(|st| {
            let metadata = Self::rbac_meta(st_rv(&mut st.rv), now, "", name);
            st.rbac.put(
                Kind::ClusterRole,
                RbacObject::Role(crate::rbac::Role {
                    metadata,
                    rules,
                    aggregation_rule: None,
                }),
            )
        });
    }

    /// Whether a ClusterRole exists.
    pub fn has_cluster_role(&self, name: &str) -> bool {
        self.rbac_get(Kind::ClusterRole, "", name).is_some()
    }

    /// Deletes a ClusterRole.
    pub fn delete_cluster_role(&self, name: &str) -> bool {
        self.rbac_delete(Kind::ClusterRole, "", name).is_some()
    }

    /// Registers a static token (`--token-auth-file`).
    pub fn add_static_token(&self, token: &str, user: UserInfo) {
        self.change(|st| st.static_tokens.insert(token.to_string(), user));
    }

    // ---------------------------------------------------------------- keys

    /// Adds a key that signs from now on; returns its kid.
    pub fn add_key(&self, alg: KeyAlg) -> anyhow::Result<String> {
        let key = SigningKey::generate(alg)?;
        let kid = key.kid().to_string();
        self.change(|st| {
            st.keys.push(Arc::new(key));
            st.signing_kid = Some(kid.clone());
        });
        Ok(kid)
    }

    /// Publishes a new key (JWKS, verification) without signing with it; returns its kid.
    pub fn publish_key(&self, alg: KeyAlg) -> anyhow::Result<String> {
        let key = SigningKey::generate(alg)?;
        let kid = key.kid().to_string();
        self.change(|st| {
            if st.signing_kid.is_none() {
                st.signing_kid = st.keys.last().map(|k| k.kid().to_string());
            }
            st.keys.push(Arc::new(key));
        });
        Ok(kid)
    }

    /// Signs with the published key `kid` from now on; `false` if no such key.
    pub fn sign_with(&self, kid: &str) -> bool {
        self.change(|st| {
            let known = st.keys.iter().any(|k| k.kid() == kid);
            if known {
                st.signing_kid = Some(kid.to_string());
            }
            known
        })
    }

    /// Kid of the key that signs.
    pub fn signing_kid(&self) -> Option<String> {
        self.signing_key().ok().map(|k| k.kid().to_string())
    }

    /// Removes a key from verification and publication. The last remaining key cannot be
    /// retired (the server needs a signing key); retiring the signing key makes the newest
    /// remaining key sign. Returns whether a key was removed.
    pub fn retire_key(&self, kid: &str) -> bool {
        let mut st = lock(&self.state);
        let before = st.keys.len();
        let remaining: Vec<_> = st.keys.iter().filter(|k| k.kid() != kid).cloned().collect();
        if remaining.is_empty() {
            return false;
        }
        st.keys = remaining;
        if st.signing_kid.as_deref() == Some(kid) {
            st.signing_kid = None;
        }
        let removed = st.keys.len() != before;
        drop(st);
        self.save();
        removed
    }

    /// All verification keys (publication order: oldest first).
    pub fn keys(&self) -> Vec<Arc<SigningKey>> {
        lock(&self.state).keys.clone()
    }

    fn signing_key(&self) -> Result<Arc<SigningKey>, ApiError> {
        let st = lock(&self.state);
        let by_kid = st
            .signing_kid
            .as_deref()
            .and_then(|kid| st.keys.iter().find(|k| k.kid() == kid));
        by_kid
            .or(st.keys.last())
            .cloned()
            .ok_or_else(|| ApiError::internal("no signing key"))
    }

    fn sign_jws<T: Serialize>(&self, claims: &T) -> Result<String, ApiError> {
        let key = self.signing_key()?;
        let header = serde_json::to_vec(&JwsHeader {
            alg: key.alg_name(),
            kid: key.kid(),
        })
        .map_err(|e| ApiError::internal(&e.to_string()))?;
        let payload = serde_json::to_vec(claims).map_err(|e| ApiError::internal(&e.to_string()))?;
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let sig = key
            .sign(signing_input.as_bytes())
            .map_err(|e| ApiError::internal(&e.to_string()))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    // ---------------------------------------------------------------- TokenRequest

    /// Issues a token as `POST .../serviceaccounts/{name}/token` does
    /// (`pkg/registry/core/serviceaccount/storage/token.go`), checks in the same order.
    pub fn issue(&self, spec: &IssueSpec) -> Result<Issued, ApiError> {
        const KIND: &str = "TokenRequest";
        const GROUP: &str = "authentication.k8s.io";
        let name = spec.service_account.as_str();
        let ns = spec.namespace.as_str();
        if let Some(n) = spec.meta_name.as_deref().filter(|n| !n.is_empty()) {
            if n != name {
                return Err(ApiError::invalid(
                    KIND,
                    GROUP,
                    name,
                    "metadata.name",
                    &go_quote(n),
                    "must match the service account name if specified",
                ));
            }
        }
        if let Some(n) = spec.meta_namespace.as_deref().filter(|n| !n.is_empty()) {
            if n != ns {
                return Err(ApiError::invalid(
                    KIND,
                    GROUP,
                    name,
                    "metadata.namespace",
                    &go_quote(n),
                    "must match the service account namespace if specified",
                ));
            }
        }
        let sa = self
            .get_service_account(ns, name)
            .ok_or_else(|| ApiError::not_found("serviceaccounts", "", name))?;
        let audiences = if spec.audiences.is_empty() {
            self.cfg.api_audiences.clone()
        } else {
            spec.audiences.clone()
        };
        let expiration_seconds = spec
            .expiration_seconds
            .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
        if self.cfg.enforce_min_expiration && expiration_seconds < MIN_EXPIRATION_SECONDS {
            return Err(ApiError::invalid(
                KIND,
                GROUP,
                "",
                "spec.expirationSeconds",
                &expiration_seconds.to_string(),
                "may not specify a duration less than 10 minutes",
            ));
        }
        if expiration_seconds > MAX_EXPIRATION_SECONDS {
            return Err(ApiError::invalid(
                KIND,
                GROUP,
                "",
                "spec.expirationSeconds",
                &expiration_seconds.to_string(),
                "may not specify a duration larger than 2^32 seconds",
            ));
        }

        let mut kube = KubeClaims {
            namespace: ns.to_string(),
            serviceaccount: Ref {
                name: name.to_string(),
                uid: sa.uid.clone(),
            },
            ..Default::default()
        };
        let mut pod_bound = false;
        if let Some(r) = &spec.bound {
            let (group, _version) = match r.api_version.split_once('/') {
                Some((g, v)) => (g, v),
                None => ("", r.api_version.as_str()),
            };
            let uid = match (group, r.kind.as_str()) {
                ("", "Pod") => {
                    let pod = self
                        .get_pod(ns, &r.name)
                        .ok_or_else(|| ApiError::not_found("pods", "", &r.name))?;
                    if pod.service_account != name {
                        return Err(ApiError::bad_request(format!(
                            "cannot bind token for serviceaccount {} to pod running with different serviceaccount name.",
                            go_quote(name)
                        )));
                    }
                    if self.cfg.pod_node_info {
                        if let Some(node) = &pod.node {
                            let node_uid = lock(&self.state)
                                .nodes
                                .get(node)
                                .map(|m| m.uid.clone())
                                .unwrap_or_default();
                            kube.node = Some(Ref {
                                name: node.clone(),
                                uid: node_uid,
                            });
                        }
                    }
                    kube.pod = Some(Ref {
                        name: r.name.clone(),
                        uid: pod.meta.uid.clone(),
                    });
                    pod_bound = true;
                    pod.meta.uid
                }
                ("", "Secret") => {
                    let secret = lock(&self.state)
                        .secrets
                        .get(&ns_key(ns, &r.name))
                        .cloned()
                        .ok_or_else(|| ApiError::not_found("secrets", "", &r.name))?;
                    kube.secret = Some(Ref {
                        name: r.name.clone(),
                        uid: secret.meta.uid.clone(),
                    });
                    secret.meta.uid
                }
                ("", "Node") => {
                    let node = lock(&self.state)
                        .nodes
                        .get(&r.name)
                        .cloned()
                        .ok_or_else(|| ApiError::not_found("nodes", "", &r.name))?;
                    kube.node = Some(Ref {
                        name: r.name.clone(),
                        uid: node.uid.clone(),
                    });
                    node.uid
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token to object of type {}/{}, Kind={}",
                        group,
                        r.api_version.rsplit('/').next().unwrap_or(""),
                        r.kind
                    )))
                }
            };
            if !r.uid.is_empty() && r.uid != uid {
                return Err(ApiError::conflict(
                    &r.kind,
                    group,
                    &r.name,
                    &format!(
                        "the UID in the bound object reference ({}) does not match the UID in record. The object might have been deleted and then recreated",
                        r.uid
                    ),
                ));
            }
        }

        let now = self.now();
        let iat = spec.issued_at.unwrap_or(now);
        let mut exp = iat + expiration_seconds;
        // --service-account-extend-token-expiration (default true), §2.4.
        if pod_bound
            && expiration_seconds == WARN_ONLY_EXPIRATION_SECONDS
            && audiences.iter().all(|a| self.cfg.api_audiences.contains(a))
        {
            kube.warnafter = Some(iat + WARN_ONLY_EXPIRATION_SECONDS);
            exp = iat + EXTENDED_EXPIRATION_SECONDS;
        }
        let claims = BoundClaims {
            aud: audiences.clone(),
            exp,
            iat,
            iss: self.cfg.issuer.clone(),
            jti: self.cfg.jti.then(|| uuid::Uuid::new_v4().to_string()),
            kubernetes: kube,
            nbf: iat,
            sub: format!("system:serviceaccount:{ns}:{name}"),
        };
        let token = self.sign_jws(&claims)?;
        Ok(Issued {
            token,
            now,
            expiration_timestamp: now + expiration_seconds,
            audiences,
            expiration_seconds,
        })
    }

    /// Creates a `kubernetes.io/service-account-token` secret for `ns/sa` and fills it
    /// with a legacy token, as the token controller does.
    pub fn mint_legacy(&self, ns: &str, sa: &str, secret_name: &str) -> Result<String, ApiError> {
        let sa_meta = self
            .get_service_account(ns, sa)
            .ok_or_else(|| ApiError::not_found("serviceaccounts", "", sa))?;
        let claims = LegacyClaims {
            iss: LEGACY_ISSUER,
            namespace: ns.to_string(),
            secret_name: secret_name.to_string(),
            sa_name: sa.to_string(),
            sa_uid: sa_meta.uid,
            sub: format!("system:serviceaccount:{ns}:{sa}"),
        };
        let token = self.sign_jws(&claims)?;
        self.put_secret(ns, secret_name, Some(sa), Some(token.clone()));
        Ok(token)
    }

    // ---------------------------------------------------------------- authentication

    /// Runs a bearer token through the request authenticator chain with the given
    /// requested audiences (empty means the API audiences), like TokenReview does.
    pub fn authenticate(&self, token: &str, spec_audiences: &[String]) -> AuthOutcome {
        let requested: Vec<String> = if spec_audiences.is_empty() {
            self.cfg.api_audiences.clone()
        } else {
            spec_audiences.to_vec()
        };
        // union(tokenfile, legacySA, boundSA): first success wins, errors are collected.
        let results = [
            self.auth_static(token, &requested),
            self.auth_sa(token, &requested, true),
            self.auth_sa(token, &requested, false),
        ];
        let mut errs = Vec::new();
        for r in results {
            match r {
                Ok(Some((mut user, audiences))) => {
                    // AuthenticatedGroupAdder.
                    if !user.groups.iter().any(|g| g == "system:authenticated") {
                        user.groups.push("system:authenticated".to_string());
                    }
                    return AuthOutcome::Authenticated { user, audiences };
                }
                Ok(None) => {}
                Err(e) => errs.push(e),
            }
        }
        // The loopback authenticator comes first in the outer union and always says
        // "invalid bearer token"; bearertoken says the same when nobody had an opinion.
        let mut all = vec![INVALID_BEARER_TOKEN.to_string()];
        if errs.is_empty() {
            all.push(INVALID_BEARER_TOKEN.to_string());
        } else {
            all.extend(errs);
        }
        AuthOutcome::Failed(aggregate(&all))
    }

    /// `--token-auth-file`, wrapped audience-agnostic: it only answers when the requested
    /// audiences include an API audience.
    fn auth_static(&self, token: &str, requested: &[String]) -> TokenResult {
        let user = lock(&self.state).static_tokens.get(token).cloned();
        match user {
            Some(u) => {
                let auds = intersect(requested, &self.cfg.api_audiences);
                if auds.is_empty() {
                    Ok(None)
                } else {
                    Ok(Some((u, auds)))
                }
            }
            None => Ok(None),
        }
    }

    /// The legacy (`legacy == true`) or bound service-account JWT authenticator
    /// (`pkg/serviceaccount/jwt.go`).
    fn auth_sa(&self, token: &str, requested: &[String], legacy: bool) -> TokenResult {
        // 1. Issuer pre-check without verifying.
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3 || token.starts_with('{') {
            return Ok(None);
        }
        let Ok(payload) = URL_SAFE_NO_PAD.decode(parts[1]) else {
            return Ok(None);
        };
        let Ok(iss) = serde_json::from_slice::<IssOnly>(&payload) else {
            return Ok(None);
        };
        let iss_ok = match iss.iss.as_deref() {
            Some(i) if legacy => i == LEGACY_ISSUER,
            Some(i) => i == self.cfg.issuer,
            None => false,
        };
        if !iss_ok {
            return Ok(None);
        }
        // 2. Parse.
        let Ok(header_raw) = URL_SAFE_NO_PAD.decode(parts[0]) else {
            return Ok(None);
        };
        let Ok(header) = serde_json::from_slice::<HeaderIn>(&header_raw) else {
            return Ok(None);
        };
        let Ok(sig) = URL_SAFE_NO_PAD.decode(parts[2]) else {
            return Ok(None);
        };
        if header.alg.is_empty() {
            return Ok(None);
        }
        // 3. Signature.
        let keys: Vec<Arc<SigningKey>> = self
            .keys()
            .into_iter()
            .filter(|k| header.kid.is_empty() || k.kid() == header.kid)
            .collect();
        if keys.is_empty() {
            return Err("invalid signature, no keys found".to_string());
        }
        let signing_input = &token[..parts[0].len() + 1 + parts[1].len()];
        let mut key_errs = Vec::new();
        let mut verified = false;
        for k in &keys {
            if !matches!(header.alg.as_str(), "RS256" | "ES256") || k.alg_name() != header.alg {
                key_errs.push("go-jose/go-jose: unknown/unsupported algorithm".to_string());
            } else if k.verify(&header.alg, signing_input.as_bytes(), &sig) {
                verified = true;
                break;
            } else {
                key_errs.push("go-jose/go-jose: error in cryptographic primitive".to_string());
            }
        }
        if !verified {
            return Err(aggregate(&key_errs));
        }
        let claims: VerifiedClaims = serde_json::from_slice(&payload)
            .map_err(|_| "go-jose/go-jose/jwt: failed to unmarshal JWT claims".to_string())?;
        // 4. Issuer re-check.
        let claim_iss = claims.iss.clone().unwrap_or_default();
        let expected_iss = if legacy {
            LEGACY_ISSUER
        } else {
            self.cfg.issuer.as_str()
        };
        if claim_iss != expected_iss {
            return Err(format!("token issuer {} is invalid", go_quote(&claim_iss)));
        }
        // 5. Audience.
        let token_auds = match &claims.aud {
            Some(AudClaim::One(a)) if !a.is_empty() => vec![a.clone()],
            Some(AudClaim::Many(v)) if !v.is_empty() => v.clone(),
            _ => self.cfg.api_audiences.clone(),
        };
        let auds = intersect(requested, &token_auds);
        if auds.is_empty() && !self.cfg.api_audiences.is_empty() {
            return Err(format!(
                "token audiences {} is invalid for the target audiences {}",
                go_quote_list(&token_auds),
                go_quote_list(requested)
            ));
        }
        // 6.. Validator.
        let user = if legacy {
            self.validate_legacy(token, &claims)?
        } else {
            self.validate_bound(&claims)?
        };
        Ok(Some((user, auds)))
    }

    /// `pkg/serviceaccount/claims.go` `validator.Validate`.
    fn validate_bound(&self, c: &VerifiedClaims) -> Result<UserInfo, String> {
        let now = self.now();
        if let Some(nbf) = c.nbf {
            if now + LEEWAY_SECONDS < nbf {
                return Err("service account token is not valid yet".to_string());
            }
        }
        if let Some(exp) = c.exp {
            if now - LEEWAY_SECONDS > exp {
                return Err("service account token has expired".to_string());
            }
        }
        if let Some(iat) = c.iat {
            if now + LEEWAY_SECONDS < iat {
                return Err("service account token is issued in the future".to_string());
            }
        }
        let k = c.kubernetes.clone().unwrap_or_default();
        let ns = k.namespace.as_str();
        let st = lock(&self.state);
        let sa = st
            .service_accounts
            .get(&ns_key(ns, &k.serviceaccount.name))
            .ok_or_else(|| {
                format!(
                    "serviceaccounts {} not found",
                    go_quote(&k.serviceaccount.name)
                )
            })?;
        if sa.uid != k.serviceaccount.uid {
            return Err(format!(
                "service account UID ({}) does not match claim ({})",
                sa.uid, k.serviceaccount.uid
            ));
        }
        if sa
            .deletion_timestamp
            .is_some_and(|t| t < now - LEEWAY_SECONDS)
        {
            return Err(format!(
                "service account {ns}/{} has been deleted",
                k.serviceaccount.name
            ));
        }
        if let Some(sref) = &k.secret {
            let secret = st.secrets.get(&ns_key(ns, &sref.name));
            check_bound_object("secret", secret.map(|s| &s.meta), &sref.uid, now)?;
        }
        if let Some(pref) = &k.pod {
            let pod = st.pods.get(&ns_key(ns, &pref.name));
            check_bound_object("pod", pod.map(|p| &p.meta), &pref.uid, now)?;
        }
        if let (Some(nref), None) = (&k.node, &k.pod) {
            check_bound_object("node", st.nodes.get(&nref.name), &nref.uid, now)?;
        }
        drop(st);
        let mut user = sa_user(ns, &k.serviceaccount.name, &k.serviceaccount.uid);
        let mut extra = BTreeMap::new();
        if let Some(p) = &k.pod {
            if !p.name.is_empty() && !p.uid.is_empty() {
                extra.insert(
                    "authentication.kubernetes.io/pod-name".to_string(),
                    vec![p.name.clone()],
                );
                extra.insert(
                    "authentication.kubernetes.io/pod-uid".to_string(),
                    vec![p.uid.clone()],
                );
            }
        }
        if let Some(n) = &k.node {
            if self.cfg.pod_node_info && !n.name.is_empty() {
                extra.insert(
                    "authentication.kubernetes.io/node-name".to_string(),
                    vec![n.name.clone()],
                );
                if !n.uid.is_empty() {
                    extra.insert(
                        "authentication.kubernetes.io/node-uid".to_string(),
                        vec![n.uid.clone()],
                    );
                }
            }
        }
        if let Some(jti) = c.jti.as_deref().filter(|j| !j.is_empty()) {
            if self.cfg.jti {
                extra.insert(
                    "authentication.kubernetes.io/credential-id".to_string(),
                    vec![format!("JTI={jti}")],
                );
            }
        }
        user.extra = extra;
        Ok(user)
    }

    /// `pkg/serviceaccount/legacy.go` `validator.Validate` with `--service-account-lookup`.
    fn validate_legacy(&self, token: &str, c: &VerifiedClaims) -> Result<UserInfo, String> {
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        let sub = nonempty(&c.sub).ok_or("sub claim is missing")?;
        let ns = nonempty(&c.legacy_namespace).ok_or("namespace claim is missing")?;
        let secret_name = nonempty(&c.legacy_secret_name).ok_or("secretName claim is missing")?;
        let sa_name = nonempty(&c.legacy_sa_name).ok_or("serviceAccountName claim is missing")?;
        let sa_uid = nonempty(&c.legacy_sa_uid).ok_or("serviceAccountUID claim is missing")?;
        match split_sa_username(&sub) {
            Some((sns, sname)) if sns == ns && sname == sa_name => {}
            _ => return Err("sub claim is invalid".to_string()),
        }
        let st = lock(&self.state);
        let secret = st
            .secrets
            .get(&(ns.clone(), secret_name.clone()))
            .ok_or("Token has been invalidated")?;
        let stored = secret.token.as_deref().unwrap_or("");
        if !constant_time_eq(stored.as_bytes(), token.as_bytes()) {
            return Err("Token does not match server's copy".to_string());
        }
        let sa = st
            .service_accounts
            .get(&(ns.clone(), sa_name.clone()))
            .ok_or_else(|| format!("serviceaccounts {} not found", go_quote(&sa_name)))?;
        if sa.uid != sa_uid {
            return Err(format!(
                "ServiceAccount UID ({}) does not match claim ({})",
                sa.uid, sa_uid
            ));
        }
        Ok(sa_user(&ns, &sa_name, &sa_uid))
    }

    // ---------------------------------------------------------------- authorization

    /// RBAC: is `user` allowed to do `attrs`?
    pub fn authorize(&self, user: &UserInfo, attrs: &Attributes<'_>) -> bool {
        self.authorize_decision(user, attrs).allowed
    }

    /// The authorizer's decision and reason, as SubjectAccessReview reports them.
    pub fn authorize_decision(&self, user: &UserInfo, attrs: &Attributes<'_>) -> Decision {
        lock(&self.state).rbac.authorize(user, attrs)
    }
}

/// Takes the next revision.
fn st_rv(rv: &mut u64) -> u64 {
    *rv += 1;
    *rv
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_object_errors_are_kube_apiservers() {
        let mut meta = Meta {
            uid: "now".to_string(),
            created: 0,
            rv: 1,
            deletion_timestamp: None,
            deletion_grace_seconds: None,
        };
        assert_eq!(check_bound_object("pod", Some(&meta), "now", 1000), Ok(()));
        // Terminating: valid up to deletionTimestamp + 60 s, invalidated after.
        meta.deletion_timestamp = Some(940);
        assert_eq!(check_bound_object("pod", Some(&meta), "now", 1000), Ok(()));
        assert_eq!(
            check_bound_object("pod", Some(&meta), "now", 1001),
            Err("service account token has been invalidated".to_string())
        );
        meta.deletion_timestamp = None;
        assert_eq!(
            check_bound_object("pod", None, "then", 1000),
            Err("service account token has been invalidated".to_string())
        );
        for (kind, message) in [
            (
                "secret",
                "secret UID (now) does not match service account secret ref claim (then)",
            ),
            (
                "pod",
                "pod UID (now) does not match service account pod ref claim (then)",
            ),
            (
                "node",
                "node UID (now) does not match service account node ref claim (then)",
            ),
        ] {
            assert_eq!(
                check_bound_object(kind, Some(&meta), "then", 1000),
                Err(message.to_string())
            );
        }
    }

    #[test]
    fn aggregate_rules() {
        assert_eq!(aggregate(&["a".into()]), "a");
        assert_eq!(aggregate(&["a".into(), "a".into()]), "a");
        assert_eq!(aggregate(&["a".into(), "b".into()]), "[a, b]");
    }

    #[test]
    fn intersect_follows_requested_order() {
        let r = intersect(
            &["b".into(), "a".into(), "b".into(), "c".into()],
            &["a".into(), "b".into()],
        );
        assert_eq!(r, vec!["b", "a", "b"]);
    }

    #[test]
    fn split_username() {
        assert_eq!(
            split_sa_username("system:serviceaccount:ns:name"),
            Some(("ns", "name"))
        );
        assert_eq!(split_sa_username("system:serviceaccount:ns"), None);
    }
}
