//! Conformance with the client tokengate uses for local verification: kube-runtime's
//! `metadata_watcher` feeding a `reflector` store, with the reviewer's kubeconfig (RBAC
//! granted by `grant_reviewer_watch`). The store must converge on the stand-in's objects,
//! follow graceful deletion and service-account recreation, ride out a down/up of the
//! server by resuming from its resourceVersion (no re-list), and recover from a 410
//! (history overflow while it was away) by re-listing.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kube_standin::{Fault, Options, Standin};

#[derive(Default)]
struct Seen {
    /// `Event::Init`: the start of a (re-)list.
    inits: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

type Meta<K> = PartialObjectMeta<K>;

/// How the metadata-only watch is built: kube 5's recommended
/// `watcher(Api::<PartialObjectMeta<K>>)`, or the deprecated `metadata_watcher(Api<K>)`;
/// both send the same `Accept` headers.
#[derive(Clone, Copy)]
enum Flavor {
    WatcherOfPartial,
    MetadataWatcher,
}

fn spawn_reflector<K>(
    client: kube::Client,
    flavor: Flavor,
) -> (Store<Meta<K>>, Arc<Seen>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<Meta<K>>();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let cfg = watcher::Config::default();
    let events = match flavor {
        Flavor::WatcherOfPartial => watcher(Api::<Meta<K>>::all(client), cfg).boxed(),
        #[allow(deprecated)]
        Flavor::MetadataWatcher => {
            kube::runtime::metadata_watcher(Api::<K>::all(client), cfg).boxed()
        }
    };
    let stream = reflector(writer, events.default_backoff());
    let task = tokio::spawn(async move {
        stream
            .for_each(|ev| {
                match ev {
                    Ok(watcher::Event::Init) => {
                        s.inits.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => s.errors.lock().unwrap().push(e.to_string()),
                }
                futures::future::ready(())
            })
            .await
    });
    (reader, seen, task)
}

fn names<K>(store: &Store<Meta<K>>) -> BTreeSet<String>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default()
            )
        })
        .collect()
}

/// Waits until `cond` holds for the store, or panics with what it saw.
async fn converge<K, F>(store: &Store<Meta<K>>, what: &str, cond: F)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
    F: Fn(&Store<Meta<K>>) -> bool,
{
    for _ in 0..300 {
        if cond(store) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("store did not converge ({what}): {:?}", names(store));
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_reflector_converges_follows_deletes_survives_restart_and_410() {
    let s = Standin::start(Options {
        watch_history: 50,
        bookmark_interval: Duration::from_millis(300),
        ..Options::default()
    })
    .await
    .unwrap();
    s.grant_reviewer_watch();
    s.create_service_account("a", "api");
    for i in 0..5 {
        s.create_pod("a", &format!("p{i}"), "api", Some("n1"));
    }
    // Exactly as tokengate connects: its kubeconfig, the reviewer's token file.
    let client = common::client_from_kubeconfig(&s.kubeconfig_path()).await;
    let (pods, pod_seen, pod_task) =
        spawn_reflector::<Pod>(client.clone(), Flavor::WatcherOfPartial);
    let (sas, _sa_seen, sa_task) =
        spawn_reflector::<ServiceAccount>(client, Flavor::MetadataWatcher);
    tokio::time::timeout(Duration::from_secs(15), pods.wait_until_ready())
        .await
        .expect("pod store ready")
        .unwrap();
    assert_eq!(names(&pods), set(&["a/p0", "a/p1", "a/p2", "a/p3", "a/p4"]));
    converge(&sas, "service accounts listed", |st| {
        names(st).contains("a/api")
    })
    .await;
    let first = pods
        .state()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("p0"))
        .unwrap();
    assert!(first.metadata.uid.is_some() && first.metadata.resource_version.is_some());
    assert_eq!(pod_seen.inits.load(Ordering::SeqCst), 1);

    // Changes arrive by watch.
    s.create_pod("a", "p5", "api", Some("n1"));
    converge(&pods, "p5 added", |st| names(st).contains("a/p5")).await;
    // Graceful deletion: first terminating (deletionTimestamp), then gone.
    assert!(s.delete_pod_graceful("a", "p1", Some(30)));
    converge(&pods, "p1 terminating", |st| {
        st.state().iter().any(|p| {
            p.metadata.name.as_deref() == Some("p1") && p.metadata.deletion_timestamp.is_some()
        })
    })
    .await;
    s.advance_clock(31);
    converge(&pods, "p1 deleted", |st| !names(st).contains("a/p1")).await;
    // Service-account recreation: the store ends with the new UID.
    let new_uid = s.create_service_account("a", "api");
    converge(&sas, "SA recreated", |st| {
        st.state().iter().any(|sa| {
            sa.metadata.name.as_deref() == Some("api")
                && sa.metadata.uid.as_deref() == Some(new_uid.as_str())
        })
    })
    .await;

    // Down/up: changes made while the server is away arrive after it is back, by resuming
    // the watch from the last resourceVersion: no re-list.
    s.set_fault(Fault::Down);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.create_pod("a", "p6", "api", Some("n1"));
    s.delete_pod("a", "p2");
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.set_fault(Fault::None);
    converge(&pods, "after down/up", |st| {
        names(st) == set(&["a/p0", "a/p3", "a/p4", "a/p5", "a/p6"])
    })
    .await;
    assert_eq!(
        pod_seen.inits.load(Ordering::SeqCst),
        1,
        "a down/up resumes the watch, it does not re-list: {:?}",
        pod_seen.errors.lock().unwrap()
    );

    // History overflow while away: the resumed watch gets 410 Expired, the watcher
    // re-lists and the store converges.
    s.set_watch_history(3);
    s.set_fault(Fault::Down);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        s.create_pod("b", &format!("q{i}"), "default", None);
    }
    s.delete_pod("a", "p0");
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.set_fault(Fault::None);
    let mut want = set(&["a/p3", "a/p4", "a/p5", "a/p6"]);
    want.extend((0..10).map(|i| format!("b/q{i}")));
    converge(&pods, "after 410 and re-list", |st| names(st) == want).await;
    assert_eq!(
        pod_seen.inits.load(Ordering::SeqCst),
        2,
        "exactly one re-list"
    );
    let errors = pod_seen.errors.lock().unwrap().clone();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too old resource version") || e.contains("Expired")),
        "the 410 reached the watcher: {errors:?}"
    );

    // And it keeps watching after the re-list.
    s.create_pod("a", "p7", "api", Some("n1"));
    converge(&pods, "p7 after re-list", |st| names(st).contains("a/p7")).await;
    pod_task.abort();
    sa_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_watcher_without_the_grant_gets_403() {
    let s = Standin::start(Options::default()).await.unwrap();
    let client = common::client_from_kubeconfig(&s.kubeconfig_path()).await;
    let api = Api::<Pod>::all(client);
    let err = api
        .list_metadata(&Default::default())
        .await
        .expect_err("no list grant");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403);
            assert_eq!(
                status.message,
                "pods is forbidden: User \"system:serviceaccount:tokengate:tokengate\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
            );
        }
        other => panic!("expected a 403 Status, got {other:?}"),
    }
}
