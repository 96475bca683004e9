//! Which pods and service accounts exist right now, as the API server's watch stream says:
//! the knowledge that revokes cached verdicts and lets local verification check bindings.
//!
//! A bound token dies with the object it is bound to (shared/kubernetes-tokens.md §4, steps 7
//! and 9): the service account must exist with the claimed UID, the pod too, and a terminating
//! object's tokens stay valid until its `deletionTimestamp` + 60 s or until it is gone. This
//! module keeps, per kind, only `namespace → name → (uid, deletionTimestamp)`, fed by
//! kube-runtime's [`watcher`] over metadata-only requests (`Api<PartialObjectMeta<K>>`): a list,
//! then a watch from its `resourceVersion`, resumed after disconnects and re-listed after
//! `410 Gone`. Labels, annotations and managed fields are dropped on arrival, so 100,000 pods
//! cost a few MiB rather than the hundreds a full reflector store would.
//!
//! Absence is ambiguous (the watch may lag the API server by a few milliseconds, or a
//! namespace may be outside `watch_namespaces`), deletion is not: UIDs are never reused. So the
//! UIDs of deleted objects are remembered for a while ([`TOMBSTONES`]), and [`Objects::judge`]
//! answers [`Presence::Gone`] only on that definite knowledge, [`Presence::Unknown`] when it
//! cannot tell (the caller then asks TokenReview, as the API server itself falls back from its
//! informer to a live GET).
//!
//! Staleness: kube-runtime hides bookmarks and quiet reconnects, so a watch that is healthy
//! and a watch that is silently retrying look alike from its event stream. A probe (a
//! metadata list with `limit=1`, every [`PROBE_EVERY`]) proves the API server reachable;
//! [`Objects::staleness`] is the time since the last proof, and the watch catches up from its
//! `resourceVersion` within kube-runtime's backoff (≤ 30 s) of the API server's return.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{ListParams, PartialObjectMeta};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::verify::{Lookup, ObjectLookup};

/// A terminating object's tokens stay valid this long past its `deletionTimestamp`
/// (the API server's go-jose leeway, §4 step 9).
pub const DELETION_LEEWAY_SECS: i64 = 60;
/// How many deleted UIDs are remembered per kind (FIFO). Beyond that, a token bound to a long
/// deleted object is judged by TokenReview instead: slower, never wrong.
pub const TOMBSTONES: usize = 65_536;
/// How often reachability of the API server is proven.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// What the cache knows of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    uid: Box<str>,
    /// `metadata.deletionTimestamp`, Unix seconds.
    deleting_at: Option<i64>,
}

/// Whether a token's bound object is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// The object exists with the claimed UID (and is not past its deletion window).
    Live,
    /// Definitely gone: deleted, replaced by an object with another UID, or past
    /// `deletionTimestamp` + 60 s.
    Gone,
    /// Cannot tell: not listed yet, namespace not watched, or not (yet) seen.
    Unknown,
}

/// The two kinds tokens are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `v1/Pod`.
    Pod,
    /// `v1/ServiceAccount`.
    ServiceAccount,
}

/// Objects of one namespace, by name.
type Names = HashMap<Box<str>, Meta>;
/// Objects of one kind, by namespace.
type Namespaces = HashMap<Box<str>, Names>;

/// Objects of one kind.
#[derive(Default)]
struct Store {
    by_namespace: RwLock<Namespaces>,
    /// UIDs of deleted objects.
    tombstones: Mutex<Tombstones>,
    /// `namespace/name` of deleted objects not (yet) recreated.
    gone_names: Mutex<Tombstones>,
}

/// Recently deleted keys (UIDs, or `namespace/name`), bounded, oldest forgotten first.
#[derive(Default)]
struct Tombstones {
    set: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
}

impl Tombstones {
    fn add(&mut self, uid: Box<str>) {
        if self.set.insert(uid.clone()) {
            self.order.push_back(uid);
            if self.order.len() > TOMBSTONES {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    /// Forgets `key` (a name that exists again); its slot in `order` ages out harmlessly.
    fn forget(&mut self, key: &str) {
        self.set.remove(key);
    }
}

fn name_key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into()
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    fn judge(&self, namespace: &str, name: &str, uid: &str, now_unix: i64) -> Presence {
        let found = read(&self.by_namespace)
            .get(namespace)
            .and_then(|names| names.get(name))
            .map(|m| (m.uid.as_ref() == uid, m.deleting_at));
        match found {
            Some((true, Some(at))) if now_unix > at + DELETION_LEEWAY_SECS => Presence::Gone,
            Some((true, _)) => Presence::Live,
            _ if lock(&self.tombstones).set.contains(uid) => Presence::Gone,
            // Another UID under this name: ours was replaced, unless the watch is behind a
            // recreate; TokenReview settles it.
            _ => Presence::Unknown,
        }
    }

    /// The object `namespace/name` as local verification sees it: present, deleted (a
    /// definite "not found"), or not known here.
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        let found = read(&self.by_namespace)
            .get(namespace)
            .and_then(|names| names.get(name))
            .cloned();
        match found {
            Some(m) => Lookup::Found {
                uid: m.uid.into(),
                deletion_timestamp: m
                    .deleting_at
                    .and_then(|t| u64::try_from(t).ok())
                    .map(|t| UNIX_EPOCH + Duration::from_secs(t)),
            },
            None if lock(&self.gone_names)
                .set
                .contains(&*name_key(namespace, name)) =>
            {
                Lookup::Missing
            }
            None => Lookup::Unknown,
        }
    }

    fn apply(&self, namespace: &str, name: &str, meta: Meta) {
        lock(&self.gone_names).forget(&name_key(namespace, name));
        let mut all = write(&self.by_namespace);
        let names = all.entry(namespace.into()).or_default();
        if let Some(old) = names.insert(name.into(), meta) {
            let new_uid = &names[name].uid;
            if old.uid != *new_uid {
                lock(&self.tombstones).add(old.uid);
            }
        }
    }

    fn delete(&self, namespace: &str, name: &str, uid: &str) {
        let mut all = write(&self.by_namespace);
        if let Some(names) = all.get_mut(namespace) {
            if names.get(name).is_some_and(|m| m.uid.as_ref() == uid) {
                names.remove(name);
                lock(&self.gone_names).add(name_key(namespace, name));
            }
        }
        lock(&self.tombstones).add(uid.into());
    }

    /// Replaces everything in `scope` (one namespace, or all) with a fresh list; objects that
    /// vanished while the watch was away become tombstones.
    fn replace(&self, scope: Option<&str>, fresh: Namespaces) {
        let mut all = write(&self.by_namespace);
        let mut tombstones = lock(&self.tombstones);
        let old: Vec<(Box<str>, Names)> = match scope {
            Some(ns) => all.remove(ns).map(|m| (ns.into(), m)).into_iter().collect(),
            None => std::mem::take(&mut *all).into_iter().collect(),
        };
        for (ns, names) in &old {
            for (name, meta) in names {
                let still = fresh
                    .get(ns)
                    .and_then(|n| n.get(name))
                    .is_some_and(|m| m.uid == meta.uid);
                if !still {
                    tombstones.add(meta.uid.clone());
                    if fresh.get(ns).and_then(|n| n.get(name)).is_none() {
                        lock(&self.gone_names).add(name_key(ns, name));
                    }
                }
            }
        }
        all.extend(fresh);
    }

    fn len(&self) -> usize {
        read(&self.by_namespace).values().map(HashMap::len).sum()
    }
}

/// Health of the watches, for staleness and readiness.
struct Health {
    /// Watch streams that have not completed their first list yet.
    unsynced: usize,
    /// Last proof that the API server was reachable and the watches current.
    fresh_at: Option<Instant>,
}

/// The watch caches of pods and service accounts, shared by every Check.
pub struct Objects {
    pods: Store,
    service_accounts: Store,
    health: Mutex<Health>,
}

impl Objects {
    /// Starts watching pods and service accounts in `namespaces` (all when empty) and returns
    /// at once; [`Objects::synced`] says when the first lists are in. The watch tasks run
    /// until `stop` resolves.
    pub fn spawn(
        client: Client,
        namespaces: &[String],
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Arc<Objects> {
        let scopes: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
        };
        let objects = Arc::new(Objects {
            pods: Store::default(),
            service_accounts: Store::default(),
            health: Mutex::new(Health {
                unsynced: scopes.len() * 2,
                fresh_at: None,
            }),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for scope in &scopes {
            tasks.spawn(follow::<Pod>(
                objects.clone(),
                client.clone(),
                Kind::Pod,
                scope.clone(),
            ));
            tasks.spawn(follow::<ServiceAccount>(
                objects.clone(),
                client.clone(),
                Kind::ServiceAccount,
                scope.clone(),
            ));
        }
        tasks.spawn(probe(objects.clone(), client, scopes[0].clone()));
        tokio::spawn(async move {
            stop.await;
            tasks.shutdown().await;
        });
        objects
    }

    /// An empty cache that never learns anything (every answer [`Presence::Unknown`]); for
    /// configurations without watches, and tests.
    pub fn disabled() -> Arc<Objects> {
        Arc::new(Objects {
            pods: Store::default(),
            service_accounts: Store::default(),
            health: Mutex::new(Health {
                unsynced: 1,
                fresh_at: None,
            }),
        })
    }

    fn store(&self, kind: Kind) -> &Store {
        match kind {
            Kind::Pod => &self.pods,
            Kind::ServiceAccount => &self.service_accounts,
        }
    }

    /// Is the `kind` object `namespace/name` with this `uid` still there at `now_unix`?
    pub fn judge(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        uid: &str,
        now_unix: i64,
    ) -> Presence {
        self.store(kind).judge(namespace, name, uid, now_unix)
    }

    /// Whether every watch has completed its first list.
    pub fn synced(&self) -> bool {
        lock(&self.health).unsynced == 0
    }

    /// Time since the watches were last known current; `None` before the first list.
    pub fn staleness(&self) -> Option<Duration> {
        let health = lock(&self.health);
        if health.unsynced > 0 {
            return None;
        }
        health.fresh_at.map(|t| t.elapsed())
    }

    /// Objects cached, per kind.
    pub fn len(&self, kind: Kind) -> usize {
        self.store(kind).len()
    }

    fn mark_fresh(&self) {
        lock(&self.health).fresh_at = Some(Instant::now());
    }
}

impl ObjectLookup for Objects {
    fn service_account(&self, namespace: &str, name: &str) -> Lookup {
        self.service_accounts.lookup(namespace, name)
    }

    fn pod(&self, namespace: &str, name: &str) -> Lookup {
        self.pods.lookup(namespace, name)
    }

    fn synced_at(&self) -> Option<SystemTime> {
        let age = self.staleness()?;
        SystemTime::now().checked_sub(age)
    }
}

/// Namespace, name, uid and deletion time of a watched object, if it has them.
fn meta_of<K: Resource>(obj: &PartialObjectMeta<K>) -> Option<(&str, &str, Meta)> {
    let m = &obj.metadata;
    let uid = m.uid.as_deref()?;
    Some((
        m.namespace.as_deref()?,
        m.name.as_deref()?,
        Meta {
            uid: uid.into(),
            deleting_at: m.deletion_timestamp.as_ref().map(|t| t.0.as_second()),
        },
    ))
}

/// Feeds one store from one watch stream until the task is cancelled.
async fn follow<K>(objects: Arc<Objects>, client: Client, kind: Kind, scope: Option<String>)
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<PartialObjectMeta<K>> = match &scope {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<Namespaces> = None;
    let mut synced = false;
    let store = objects.store(kind);
    let what = match kind {
        Kind::Pod => "pods",
        Kind::ServiceAccount => "serviceaccounts",
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing = Some(HashMap::new()),
            Ok(Event::InitApply(obj)) => {
                if let (Some(list), Some((ns, name, meta))) = (listing.as_mut(), meta_of(&obj)) {
                    list.entry(ns.into()).or_default().insert(name.into(), meta);
                }
            }
            Ok(Event::InitDone) => {
                let fresh = listing.take().unwrap_or_default();
                store.replace(scope.as_deref(), fresh);
                objects.mark_fresh();
                if !synced {
                    synced = true;
                    let mut health = lock(&objects.health);
                    health.unsynced = health.unsynced.saturating_sub(1);
                }
                tracing::info!(
                    kind = what,
                    namespace = scope.as_deref().unwrap_or("*"),
                    objects = store.len(),
                    "watch cache listed"
                );
            }
            Ok(Event::Apply(obj)) => {
                if let Some((ns, name, meta)) = meta_of(&obj) {
                    store.apply(ns, name, meta);
                }
                objects.mark_fresh();
            }
            Ok(Event::Delete(obj)) => {
                if let Some((ns, name, meta)) = meta_of(&obj) {
                    store.delete(ns, name, &meta.uid);
                }
                objects.mark_fresh();
            }
            Err(e) => {
                tracing::warn!(kind = what, "watch: {e}; retrying with backoff");
            }
        }
    }
}

/// Proves the API server reachable every [`PROBE_EVERY`] (see the module docs).
async fn probe(objects: Arc<Objects>, client: Client, scope: Option<String>) {
    let api: Api<ServiceAccount> = match &scope {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !objects.synced() {
            continue;
        }
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => objects.mark_fresh(),
            Err(e) => tracing::debug!("watch probe: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uid: &str, deleting_at: Option<i64>) -> Meta {
        Meta {
            uid: uid.into(),
            deleting_at,
        }
    }

    #[test]
    fn live_gone_unknown() {
        let s = Store::default();
        assert_eq!(s.judge("ns", "p", "u1", 0), Presence::Unknown);
        s.apply("ns", "p", meta("u1", None));
        assert_eq!(s.judge("ns", "p", "u1", 0), Presence::Live);
        assert_eq!(s.judge("ns", "p", "u0", 0), Presence::Unknown);
        s.delete("ns", "p", "u1");
        assert_eq!(s.judge("ns", "p", "u1", 0), Presence::Gone);
    }

    #[test]
    fn terminating_objects_live_until_deletion_plus_leeway() {
        let s = Store::default();
        s.apply("ns", "p", meta("u1", Some(1000)));
        assert_eq!(s.judge("ns", "p", "u1", 1000), Presence::Live);
        assert_eq!(s.judge("ns", "p", "u1", 1060), Presence::Live);
        assert_eq!(s.judge("ns", "p", "u1", 1061), Presence::Gone);
    }

    #[test]
    fn recreate_with_new_uid_tombstones_the_old() {
        let s = Store::default();
        s.apply("ns", "sa", meta("old", None));
        s.apply("ns", "sa", meta("new", None));
        assert_eq!(s.judge("ns", "sa", "old", 0), Presence::Gone);
        assert_eq!(s.judge("ns", "sa", "new", 0), Presence::Live);
    }

    #[test]
    fn relist_tombstones_what_vanished_while_away() {
        let s = Store::default();
        s.apply("a", "p1", meta("u1", None));
        s.apply("a", "p2", meta("u2", None));
        s.apply("b", "p3", meta("u3", None));
        let mut fresh = Namespaces::new();
        fresh
            .entry("a".into())
            .or_default()
            .insert("p2".into(), meta("u2", None));
        s.replace(Some("a"), fresh);
        assert_eq!(s.judge("a", "p1", "u1", 0), Presence::Gone);
        assert_eq!(s.judge("a", "p2", "u2", 0), Presence::Live);
        // Another namespace's scope is untouched.
        assert_eq!(s.judge("b", "p3", "u3", 0), Presence::Live);
        s.replace(None, HashMap::new());
        assert_eq!(s.judge("b", "p3", "u3", 0), Presence::Gone);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn delete_of_an_older_object_keeps_the_newer() {
        let s = Store::default();
        s.apply("ns", "p", meta("new", None));
        s.delete("ns", "p", "old");
        assert_eq!(s.judge("ns", "p", "new", 0), Presence::Live);
        assert_eq!(s.judge("ns", "p", "old", 0), Presence::Gone);
    }

    #[test]
    fn lookup_tells_deleted_from_never_seen() {
        let s = Store::default();
        assert_eq!(s.lookup("ns", "p"), Lookup::Unknown);
        s.apply("ns", "p", meta("u1", Some(1000)));
        assert_eq!(
            s.lookup("ns", "p"),
            Lookup::Found {
                uid: "u1".into(),
                deletion_timestamp: Some(UNIX_EPOCH + Duration::from_secs(1000)),
            }
        );
        s.delete("ns", "p", "u1");
        assert_eq!(s.lookup("ns", "p"), Lookup::Missing);
        s.apply("ns", "p", meta("u2", None));
        assert!(matches!(s.lookup("ns", "p"), Lookup::Found { uid, .. } if uid == "u2"));
        s.replace(None, Namespaces::new());
        assert_eq!(s.lookup("ns", "p"), Lookup::Missing);
    }

    #[test]
    fn tombstones_are_bounded() {
        let mut t = Tombstones::default();
        for i in 0..TOMBSTONES + 10 {
            t.add(i.to_string().into());
        }
        assert_eq!(t.set.len(), TOMBSTONES);
        assert!(!t.set.contains("0"));
        assert!(t.set.contains(&*(TOMBSTONES + 9).to_string()));
    }
}
