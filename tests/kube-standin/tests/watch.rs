//! List and watch of pods and service accounts over HTTP, as the API server serves them:
//! resourceVersion continuity, 410 Expired in the stream, bookmarks, timeoutSeconds,
//! metadata-only shapes, graceful pod deletion against TokenReview, service-account
//! recreation, key rotation through the JWKS, RBAC on list/watch, and bulk objects.

mod common;

use std::time::{Duration, Instant};

use common::{call, client, review, review_error};
use http_body_util::BodyExt as _;
use kube_standin::{Bulk, KeyAlg, MintRequest, Options, Standin};
use serde_json::{json, Value};

const META: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
const META_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// A watch response read line by line.
struct Events {
    status: u16,
    body: kube::client::Body,
    buf: Vec<u8>,
    ended: bool,
}

impl Events {
    /// The next event within `within`; `None` on timeout or end of stream.
    async fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).expect("event is one JSON line"));
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => self.ended = true,
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    /// The next event that is not a BOOKMARK.
    async fn next_change(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.next(left).await?;
            if e["type"] != "BOOKMARK" {
                return Some(e);
            }
        }
    }

    /// Whether the server ended the stream within `within`.
    async fn ends_within(&mut self, within: Duration) -> bool {
        while let Some(e) = self.next(within).await {
            if e["type"] != "BOOKMARK" {
                panic!("unexpected event before the end: {e}");
            }
        }
        self.ended
    }
}

async fn watch(c: &kube::Client, path_and_query: &str, accept: Option<&str>) -> Events {
    let mut b = http::Request::builder().method("GET").uri(path_and_query);
    if let Some(a) = accept {
        b = b.header("accept", a);
    }
    let resp = c
        .send(b.body(kube::client::Body::empty()).unwrap())
        .await
        .expect("watch request");
    Events {
        status: resp.status().as_u16(),
        body: resp.into_body(),
        buf: Vec::new(),
        ended: false,
    }
}

async fn get_with(c: &kube::Client, path: &str, accept: &str) -> common::Answer {
    let req = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("accept", accept)
        .body(kube::client::Body::empty())
        .unwrap();
    let resp = c.send(req).await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    common::Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no resourceVersion string in {v}"))
        .parse()
        .unwrap()
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["metadata"]["namespace"].as_str().unwrap(),
                i["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

async fn start(opts: Options) -> (Standin, kube::Client) {
    let s = Standin::start(opts).await.expect("start");
    let admin = client(&s, Some(&s.admin_token())).await;
    (s, admin)
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn list_then_watch_from_its_resource_version_sees_every_later_change() {
    let (s, admin) = start(Options::default()).await;
    s.create_service_account("a", "api");
    s.create_pod("a", "p1", "api", Some("n1"));
    s.create_pod("a", "p2", "api", Some("n1"));
    s.create_pod("b", "p3", "default", Some("n1"));

    let a = call(&admin, "GET", "/api/v1/pods", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let list = a.json();
    assert_eq!(list["kind"], "PodList");
    assert_eq!(names(&list), ["a/p1", "a/p2", "b/p3"]);
    let list_rv = rv(&list);
    assert_eq!(list_rv, s.resource_version());
    let item_rvs: Vec<u64> = list["items"].as_array().unwrap().iter().map(rv).collect();
    assert!(item_rvs.windows(2).all(|w| w[0] < w[1]), "{item_rvs:?}");
    assert!(item_rvs.iter().all(|r| *r <= list_rv));
    // Typed list items carry no kind; the pod fields are there.
    assert!(list["items"][0].get("kind").is_none());
    assert_eq!(list["items"][0]["spec"]["serviceAccountName"], "api");

    // Namespaced list.
    let ns_list = call(&admin, "GET", "/api/v1/namespaces/a/pods", None)
        .await
        .json();
    assert_eq!(names(&ns_list), ["a/p1", "a/p2"]);
    let sas = call(&admin, "GET", "/api/v1/serviceaccounts", None)
        .await
        .json();
    assert_eq!(sas["kind"], "ServiceAccountList");
    assert_eq!(
        names(&sas),
        [
            "a/api",
            "a/default",
            "b/default",
            "tokengate/default",
            "tokengate/tokengate"
        ]
    );

    // Changes made between the list and the watch are not lost.
    s.create_pod("a", "p4", "api", Some("n1"));
    let mut w = watch(
        &admin,
        &format!("/api/v1/pods?watch=true&resourceVersion={list_rv}"),
        None,
    )
    .await;
    assert_eq!(w.status, 200);
    let e = w.next_change(T).await.expect("ADDED p4");
    assert_eq!(e["type"], "ADDED");
    assert_eq!(e["object"]["kind"], "Pod");
    assert_eq!(e["object"]["metadata"]["name"], "p4");
    let mut last = rv(&e["object"]);
    assert!(last > list_rv);
    s.delete_pod("a", "p1");
    s.create_pod("c", "p5", "default", None);
    for (ty, name) in [("DELETED", "p1"), ("ADDED", "p5")] {
        let e = w.next_change(T).await.expect("event");
        assert_eq!(
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap()
            ),
            (ty, name)
        );
        let r = rv(&e["object"]);
        assert!(r > last, "resourceVersion must increase: {r} after {last}");
        last = r;
    }
    // A namespaced watch sees only its namespace; watch=1 is accepted.
    let mut wa = watch(
        &admin,
        &format!("/api/v1/namespaces/a/pods?watch=1&resourceVersion={list_rv}"),
        None,
    )
    .await;
    let e = wa.next_change(T).await.unwrap();
    assert_eq!(e["object"]["metadata"]["name"], "p4");
    let e = wa.next_change(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("p1"))
    );
    assert!(
        wa.next_change(Duration::from_millis(300)).await.is_none(),
        "c/p5 is not in namespace a"
    );

    // Without resourceVersion (and with "0") a watch starts with the current state.
    for q in ["watch=true", "watch=true&resourceVersion=0"] {
        let mut w0 = watch(&admin, &format!("/api/v1/pods?{q}"), None).await;
        let mut got = Vec::new();
        for _ in 0..4 {
            let e = w0.next_change(T).await.expect("synthetic ADDED");
            assert_eq!(e["type"], "ADDED");
            got.push(format!(
                "{}/{}",
                e["object"]["metadata"]["namespace"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap()
            ));
        }
        assert_eq!(got, ["a/p2", "a/p4", "b/p3", "c/p5"], "{q}");
        s.create_pod("d", format!("x{}", got.len()).as_str(), "default", None);
        let e = w0.next_change(T).await.unwrap();
        assert_eq!(e["object"]["metadata"]["namespace"], "d");
        s.delete_pod("d", "x4");
    }
}

#[tokio::test]
async fn paged_list_keeps_its_resource_version_and_covers_everything() {
    let (s, admin) = start(Options::default()).await;
    for i in 0..7 {
        s.create_pod("p", &format!("pod-{i}"), "default", None);
    }
    let mut seen = Vec::new();
    let mut cont: Option<String> = None;
    let mut first_rv = None;
    let mut pages = 0;
    loop {
        let mut path = "/api/v1/namespaces/p/pods?limit=3".to_string();
        if let Some(c) = &cont {
            path.push_str(&format!("&continue={c}"));
        }
        let v = call(&admin, "GET", &path, None).await.json();
        pages += 1;
        assert!(v["items"].as_array().unwrap().len() <= 3);
        let r = rv(&v);
        assert_eq!(
            *first_rv.get_or_insert(r),
            r,
            "every page reports the first page's RV"
        );
        seen.extend(names(&v));
        if pages == 1 {
            // A change between pages does not change the pages' resourceVersion.
            s.create_pod("q", "other", "default", None);
        }
        match v["metadata"]["continue"].as_str() {
            Some(c) => cont = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 7);
    let a = call(&admin, "GET", "/api/v1/pods?limit=2&continue=garbage", None).await;
    assert_eq!(a.status, 400, "{}", a.body);

    // resourceVersion semantics of a list: "0" and any RV up to now are served (current
    // state); an exact older RV is 410 (no snapshots kept); a future RV is 504.
    let now = s.resource_version();
    for q in [
        "resourceVersion=0".to_string(),
        "resourceVersion=1&resourceVersionMatch=NotOlderThan".to_string(),
        format!("resourceVersion={now}&resourceVersionMatch=Exact"),
    ] {
        let a = call(&admin, "GET", &format!("/api/v1/pods?{q}"), None).await;
        assert_eq!((a.status, rv(&a.json())), (200, now), "{q}");
    }
    let a = call(
        &admin,
        "GET",
        "/api/v1/pods?resourceVersion=1&resourceVersionMatch=Exact",
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.json()["reason"].as_str()),
        (410, Some("Expired"))
    );
    let future = now + 100;
    let a = call(
        &admin,
        "GET",
        &format!("/api/v1/pods?resourceVersion={future}"),
        None,
    )
    .await;
    assert_eq!(a.status, 504);
    assert_eq!(
        a.json()["message"],
        format!("Too large resource version: {future}, current: {now}")
    );
    let a = watch(
        &admin,
        "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
        None,
    )
    .await;
    assert_eq!(a.status, 422, "WatchList is off");
    let mut w = watch(
        &admin,
        &format!("/api/v1/pods?watch=true&resourceVersion={future}"),
        None,
    )
    .await;
    let e = w.next(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["code"].as_u64()),
        (Some("ERROR"), Some(504))
    );
}

#[tokio::test]
async fn watch_from_a_version_older_than_the_history_gets_410_expired() {
    let (s, admin) = start(Options {
        watch_history: 3,
        ..Options::default()
    })
    .await;
    let start_rv = s.resource_version();
    for i in 0..6 {
        s.create_pod("h", &format!("p{i}"), "default", None);
    }
    let list = call(&admin, "GET", "/api/v1/pods", None).await.json();
    // Only the last 3 pod changes are kept: the oldest watchable RV is the 4th pod's - 1.
    let item_rvs: Vec<u64> = list["items"].as_array().unwrap().iter().map(rv).collect();
    let oldest = item_rvs[3] - 1;
    let mut w = watch(
        &admin,
        &format!("/api/v1/pods?watch=true&resourceVersion={start_rv}"),
        None,
    )
    .await;
    assert_eq!(w.status, 200, "the error comes inside the stream");
    let e = w.next(T).await.expect("ERROR event");
    assert_eq!(
        e,
        json!({"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},
            "status":"Failure",
            "message": format!("too old resource version: {start_rv} ({oldest})"),
            "reason":"Expired","code":410}})
    );
    assert!(w.ends_within(T).await, "the stream ends after the ERROR");

    // From exactly the oldest kept revision it works, and replays the kept changes.
    let mut w = watch(
        &admin,
        &format!("/api/v1/pods?watch=true&resourceVersion={oldest}"),
        None,
    )
    .await;
    for name in ["p3", "p4", "p5"] {
        let e = w.next_change(T).await.unwrap();
        assert_eq!(
            (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
            (Some("ADDED"), Some(name))
        );
    }
    // Service accounts have their own history: the pod flood did not expire it.
    let a = watch(
        &admin,
        &format!("/api/v1/serviceaccounts?watch=true&resourceVersion={start_rv}"),
        None,
    )
    .await
    .next(Duration::from_millis(500))
    .await;
    assert!(
        a.is_none() || a.as_ref().unwrap()["type"] != "ERROR",
        "{a:?}"
    );
}

#[tokio::test]
async fn bookmarks_arrive_only_when_allowed_and_timeout_seconds_ends_the_watch() {
    let (s, admin) = start(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    s.create_pod("b", "p", "default", None);
    let now_rv = s.resource_version();
    let mut w = watch(
        &admin,
        &format!("/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={now_rv}"),
        None,
    )
    .await;
    let e = w.next(T).await.expect("a BOOKMARK");
    assert_eq!(
        e,
        json!({"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion": now_rv.to_string()}}})
    );
    s.create_pod("b", "q", "default", None);
    let e = w.next_change(T).await.unwrap();
    assert_eq!(e["object"]["metadata"]["name"], "q");
    let e = w.next(T).await.unwrap();
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(
        rv(&e["object"]),
        s.resource_version(),
        "a bookmark carries the latest RV"
    );

    // Metadata-only bookmarks are PartialObjectMetadata.
    let mut wm = watch(
        &admin,
        &format!(
            "/api/v1/serviceaccounts?watch=true&allowWatchBookmarks=true&resourceVersion={now_rv}"
        ),
        Some(META),
    )
    .await;
    let e = wm.next(T).await.unwrap();
    assert_eq!(e["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(e["object"]["apiVersion"], "meta.k8s.io/v1");

    // Without allowWatchBookmarks: no bookmarks; timeoutSeconds=1 ends the stream.
    let started = Instant::now();
    let mut w = watch(
        &admin,
        &format!(
            "/api/v1/pods?watch=true&timeoutSeconds=1&resourceVersion={}",
            s.resource_version()
        ),
        None,
    )
    .await;
    assert!(
        w.next(Duration::from_millis(700)).await.is_none(),
        "no bookmark unasked"
    );
    assert!(
        w.ends_within(T).await,
        "timeoutSeconds=1 must end the watch"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test]
async fn metadata_only_shapes_for_list_watch_and_get() {
    let (s, admin) = start(Options::default()).await;
    let uid = s.create_pod("m", "p", "default", Some("n1"));
    let a = get_with(&admin, "/api/v1/pods", META_LIST).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("content-type").as_deref(), Some(META_LIST));
    let v = a.json();
    assert_eq!(v["kind"], "PartialObjectMetadataList");
    assert_eq!(v["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(rv(&v), s.resource_version());
    let item = &v["items"][0];
    assert_eq!(item["kind"], "PartialObjectMetadata");
    assert_eq!(item["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(item["metadata"]["uid"], uid.as_str());
    assert_eq!(item["metadata"]["name"], "p");
    assert!(item["metadata"]["creationTimestamp"].is_string());
    assert!(item.get("spec").is_none(), "metadata only: {item}");

    let a = get_with(&admin, "/api/v1/namespaces/m/pods/p", META).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["kind"], "PartialObjectMetadata");
    assert_eq!(v["metadata"]["uid"], uid.as_str());
    assert!(v.get("spec").is_none());
    let a = get_with(&admin, "/api/v1/namespaces/m/serviceaccounts/default", META).await;
    assert_eq!(a.json()["kind"], "PartialObjectMetadata");

    // A list asked for as single-object metadata is not acceptable, as on the real server.
    assert_eq!(get_with(&admin, "/api/v1/pods", META).await.status, 406);
    // Plain JSON is still the default.
    assert_eq!(
        call(&admin, "GET", "/api/v1/namespaces/m/pods/p", None)
            .await
            .json()["kind"],
        "Pod"
    );

    let mut w = watch(&admin, "/api/v1/pods?watch=true", Some(META)).await;
    let e = w.next_change(T).await.unwrap();
    assert_eq!(e["type"], "ADDED");
    assert_eq!(e["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(e["object"]["apiVersion"], "meta.k8s.io/v1");
    assert!(e["object"].get("spec").is_none());
    assert_eq!(e["object"]["metadata"]["uid"], uid.as_str());
}

#[tokio::test]
async fn graceful_pod_deletion_keeps_tokens_valid_until_deletion_timestamp_plus_60s() {
    let (s, admin) = start(Options::default()).await;
    s.create_service_account("g", "api");
    s.create_pod("g", "p", "api", Some("n1"));
    let token = s
        .mint(&MintRequest::new("g", "api").audience("x").pod("p"))
        .unwrap();
    let authenticated = |a: common::Answer| a.json()["status"]["authenticated"] == true;
    assert!(authenticated(review(&admin, &token, &["x"]).await));
    let mut w = watch(
        &admin,
        &format!(
            "/api/v1/namespaces/g/pods?watch=true&resourceVersion={}",
            s.resource_version()
        ),
        None,
    )
    .await;

    // DELETE with the pod's default grace (30 s): MODIFIED with deletionTimestamp.
    let before = s.now();
    let a = call(&admin, "DELETE", "/api/v1/namespaces/g/pods/p", None).await;
    assert_eq!(a.status, 200);
    let e = w.next_change(T).await.unwrap();
    assert_eq!(e["type"], "MODIFIED");
    let m = &e["object"]["metadata"];
    assert_eq!(m["deletionGracePeriodSeconds"], 30);
    let dt = m["deletionTimestamp"].as_str().unwrap().to_string();
    assert!(
        [before + 30, before + 31]
            .map(kube_standin::clock::rfc3339)
            .contains(&dt),
        "deletionTimestamp {dt} is now + 30 s"
    );
    assert!(
        authenticated(review(&admin, &token, &["x"]).await),
        "terminating: still valid"
    );
    // The grace period ends on the server's clock: the pod is gone, DELETED, token invalid.
    s.advance_clock(31);
    let e = w.next_change(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("p"))
    );
    assert_eq!(
        review_error(&admin, &token, &["x"]).await,
        "[invalid bearer token, service account token has been invalidated]"
    );

    // A pod that lingers past its deletionTimestamp (kubelet not confirming): its token is
    // valid up to deletionTimestamp + 60 s, invalid after, while the object still exists.
    s.set_pod_reaping(false);
    s.create_pod("g", "p", "api", Some("n1"));
    let token = s
        .mint(&MintRequest::new("g", "api").audience("x").pod("p"))
        .unwrap();
    assert!(s.delete_pod_graceful("g", "p", Some(10)));
    s.advance_clock(10 + 60 - 1);
    assert!(
        authenticated(review(&admin, &token, &["x"]).await),
        "inside deletionTimestamp + 60 s"
    );
    s.advance_clock(3);
    assert_eq!(
        review_error(&admin, &token, &["x"]).await,
        "[invalid bearer token, service account token has been invalidated]"
    );
    let a = call(&admin, "GET", "/api/v1/namespaces/g/pods/p", None).await;
    assert_eq!(a.status, 200, "the pod is still there, terminating");
    assert!(a.json()["metadata"]["deletionTimestamp"].is_string());
    s.set_pod_reaping(true);
    assert_eq!(
        call(&admin, "GET", "/api/v1/namespaces/g/pods/p", None)
            .await
            .status,
        404
    );

    // gracePeriodSeconds=0 deletes at once; a short grace ends in real time.
    s.create_pod("g", "now", "api", Some("n1"));
    s.create_pod("g", "soon", "api", Some("n1"));
    let rv0 = s.resource_version();
    let mut w = watch(
        &admin,
        &format!("/api/v1/namespaces/g/pods?watch=true&resourceVersion={rv0}"),
        None,
    )
    .await;
    let a = call(
        &admin,
        "DELETE",
        "/api/v1/namespaces/g/pods/now?gracePeriodSeconds=0",
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    let e = w.next_change(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("now"))
    );
    let a = call(
        &admin,
        "DELETE",
        "/api/v1/namespaces/g/pods/soon",
        Some(&json!({"kind":"DeleteOptions","apiVersion":"v1","gracePeriodSeconds":1})),
    )
    .await;
    assert_eq!(a.json()["metadata"]["deletionGracePeriodSeconds"], 1);
    let e = w.next_change(T).await.unwrap();
    assert_eq!(e["type"], "MODIFIED");
    let e = w.next_change(T).await.expect("DELETED after the 1 s grace");
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("soon"))
    );
}

#[tokio::test]
async fn recreated_service_account_is_deleted_then_added_with_a_new_uid() {
    let (s, admin) = start(Options::default()).await;
    let old_uid = s.create_service_account("r", "api");
    let token = s.mint(&MintRequest::new("r", "api")).unwrap();
    let mut w = watch(
        &admin,
        &format!(
            "/api/v1/serviceaccounts?watch=true&resourceVersion={}",
            s.resource_version()
        ),
        Some(META),
    )
    .await;
    let new_uid = s.create_service_account("r", "api");
    assert_ne!(old_uid, new_uid);
    let e = w.next_change(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["uid"].as_str()),
        (Some("DELETED"), Some(old_uid.as_str()))
    );
    let e = w.next_change(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["uid"].as_str()),
        (Some("ADDED"), Some(new_uid.as_str()))
    );
    assert_eq!(
        review_error(&admin, &token, &[]).await,
        format!("[invalid bearer token, service account UID ({new_uid}) does not match claim ({old_uid})]")
    );
    // Deleted over HTTP: a DELETED event, and the token names the missing SA.
    assert_eq!(
        call(
            &admin,
            "DELETE",
            "/api/v1/namespaces/r/serviceaccounts/api",
            None
        )
        .await
        .status,
        200
    );
    let e = w.next_change(T).await.unwrap();
    assert_eq!(e["type"], "DELETED");
    assert_eq!(
        review_error(&admin, &token, &[]).await,
        "[invalid bearer token, serviceaccounts \"api\" not found]"
    );
}

fn jwks_kids(v: &Value) -> Vec<String> {
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

fn kid_of(token: &str) -> String {
    let (h, _) = common::jwt_parts(token);
    serde_json::from_str::<Value>(&h).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn key_rotation_publishes_before_signing_and_retiring_unpublishes() {
    let (s, admin) = start(Options::default()).await;
    s.create_service_account("k", "api");
    let old = s.signing_key_id();
    let old_token = s.mint(&MintRequest::new("k", "api")).unwrap();
    assert_eq!(kid_of(&old_token), old);

    // 1. Publish: in the JWKS, not yet used.
    let new = s.publish_key(KeyAlg::Es256);
    let jwks = call(&admin, "GET", "/openid/v1/jwks", None).await.json();
    assert_eq!(jwks_kids(&jwks), [old.clone(), new.clone()]);
    assert_eq!(s.signing_key_id(), old);
    assert_eq!(kid_of(&s.mint(&MintRequest::new("k", "api")).unwrap()), old);
    // 2. Sign with it.
    assert!(s.sign_with_key(&new));
    assert!(!s.sign_with_key("no-such-kid"));
    let new_token = s.mint(&MintRequest::new("k", "api")).unwrap();
    assert_eq!(kid_of(&new_token), new);
    assert_eq!(
        review(&admin, &old_token, &[]).await.json()["status"]["authenticated"],
        true
    );
    assert_eq!(
        review(&admin, &new_token, &[]).await.json()["status"]["authenticated"],
        true
    );
    // 3. Retire the old key: gone from the JWKS, its tokens fail as on the real server.
    assert!(s.retire_key(&old));
    let jwks = call(&admin, "GET", "/openid/v1/jwks", None).await.json();
    assert_eq!(jwks_kids(&jwks), std::slice::from_ref(&new));
    assert_eq!(
        review_error(&admin, &old_token, &[]).await,
        "[invalid bearer token, invalid signature, no keys found]"
    );
    assert_eq!(
        review(&admin, &new_token, &[]).await.json()["status"]["authenticated"],
        true
    );

    // The same through the HTTP controls (process mode uses these).
    let a = call(
        &admin,
        "POST",
        "/standin/v1/keys",
        Some(&json!({"alg":"rs256"})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let third = a.json()["kid"].as_str().unwrap().to_string();
    assert_eq!(a.json()["keys"]["signing"], new.as_str());
    assert_eq!(
        jwks_kids(&call(&admin, "GET", "/openid/v1/jwks", None).await.json()),
        [new.clone(), third.clone()]
    );
    let a = call(
        &admin,
        "POST",
        &format!("/standin/v1/keys/{third}/sign"),
        None,
    )
    .await;
    assert_eq!(a.json()["signing"], third.as_str());
    assert_eq!(
        kid_of(&s.mint(&MintRequest::new("k", "api")).unwrap()),
        third
    );
    let a = call(&admin, "DELETE", &format!("/standin/v1/keys/{new}"), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["keys"], json!([third.clone()]));
    assert_eq!(
        call(&admin, "DELETE", &format!("/standin/v1/keys/{third}"), None)
            .await
            .status,
        404,
        "the last key stays"
    );
    assert_eq!(
        review_error(&admin, &new_token, &[]).await,
        "[invalid bearer token, invalid signature, no keys found]"
    );
}

#[tokio::test]
async fn list_and_watch_need_rbac_grants() {
    let (s, admin) = start(Options::default()).await;
    let reviewer = common::client_from_kubeconfig(&s.kubeconfig_path()).await;
    let a = call(&reviewer, "GET", "/api/v1/pods", None).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.json()["message"],
        "pods is forbidden: User \"system:serviceaccount:tokengate:tokengate\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
    );
    let a = watch(&reviewer, "/api/v1/serviceaccounts?watch=true", None).await;
    assert_eq!(a.status, 403);
    let a = call(&reviewer, "GET", "/api/v1/namespaces/x/pods", None).await;
    assert_eq!(
        a.json()["message"],
        "pods is forbidden: User \"system:serviceaccount:tokengate:tokengate\" cannot list resource \"pods\" in API group \"\" in the namespace \"x\""
    );

    // A custom ClusterRole created and bound through the API grants it.
    let a = call(
        &admin,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        Some(&json!({
        "metadata":{"name":"pod-reader"},
        "rules":[{"apiGroups":[""],"resources":["pods"],"verbs":["list","watch"]}]})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = call(
        &admin,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        Some(&json!({
        "metadata":{"name":"pod-reader"},
        "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"pod-reader"},
        "subjects":[{"kind":"ServiceAccount","name":"tokengate","namespace":"tokengate"}]})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(
        call(&reviewer, "GET", "/api/v1/pods", None).await.status,
        200
    );
    assert_eq!(
        watch(&reviewer, "/api/v1/pods?watch=true", None)
            .await
            .status,
        200
    );
    assert_eq!(
        call(&reviewer, "GET", "/api/v1/serviceaccounts", None)
            .await
            .status,
        403,
        "pods only"
    );
    assert_eq!(
        call(
            &admin,
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/pod-reader",
            None
        )
        .await
        .status,
        200
    );
    assert_eq!(
        call(&reviewer, "GET", "/api/v1/pods", None).await.status,
        403
    );

    // The helper other tests use.
    s.grant_reviewer_watch();
    assert_eq!(
        call(&reviewer, "GET", "/api/v1/serviceaccounts", None)
            .await
            .status,
        200
    );
    assert_eq!(
        watch(&reviewer, "/api/v1/namespaces/a/pods?watch=true", None)
            .await
            .status,
        200
    );
    // Selectors: supported fields filter, unsupported ones are refused, labels match none.
    s.create_pod("a", "on-n1", "default", Some("n1"));
    s.create_pod("a", "on-n2", "default", Some("n2"));
    let v = call(
        &reviewer,
        "GET",
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dn2",
        None,
    )
    .await
    .json();
    assert_eq!(names(&v), ["a/on-n2"]);
    let a = call(
        &reviewer,
        "GET",
        "/api/v1/pods?fieldSelector=spec.foo%3Dx",
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.json()["message"].as_str()),
        (400, Some("field label not supported: spec.foo"))
    );
    let v = call(
        &reviewer,
        "GET",
        "/api/v1/pods?labelSelector=app%3Dweb",
        None,
    )
    .await
    .json();
    assert_eq!(names(&v).len(), 0);
    let v = call(
        &reviewer,
        "GET",
        "/api/v1/pods?labelSelector=app%21%3Dweb",
        None,
    )
    .await
    .json();
    assert_eq!(names(&v).len(), 2);
    // Watches filter with the same selector.
    let mut w = watch(
        &reviewer,
        "/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dn2",
        None,
    )
    .await;
    let e = w.next_change(T).await.unwrap();
    assert_eq!(e["object"]["metadata"]["name"], "on-n2");
    s.create_pod("a", "n1-again", "default", Some("n1"));
    s.create_pod("a", "n2-again", "default", Some("n2"));
    let e = w.next_change(T).await.unwrap();
    assert_eq!(
        e["object"]["metadata"]["name"], "n2-again",
        "n1 pods are filtered out"
    );
}

#[tokio::test]
async fn test_controls_are_admin_only_and_drive_clock_reaper_and_history() {
    let (s, admin) = start(Options::default()).await;
    s.grant_reviewer_watch();
    let reviewer = common::client_from_kubeconfig(&s.kubeconfig_path()).await;
    for (path, body) in [
        ("/standin/v1/clock", json!({"advance_seconds": 1})),
        ("/standin/v1/reaper", json!({"enabled": false})),
        ("/standin/v1/history", json!({"capacity": 1})),
        ("/standin/v1/bulk", json!({"pods": 1})),
        ("/standin/v1/keys", json!({})),
        ("/standin/v1/sync", json!({})),
    ] {
        assert_eq!(
            call(&reviewer, "POST", path, Some(&body)).await.status,
            403,
            "{path}"
        );
    }
    s.create_pod("c", "p", "default", Some("n1"));
    let t0 = s.now();
    let a = call(
        &admin,
        "POST",
        "/standin/v1/reaper",
        Some(&json!({"enabled": false})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    call(
        &admin,
        "DELETE",
        "/api/v1/namespaces/c/pods/p?gracePeriodSeconds=5",
        None,
    )
    .await;
    let a = call(
        &admin,
        "POST",
        "/standin/v1/clock",
        Some(&json!({"advance_seconds": 100})),
    )
    .await;
    let now = a.json()["now"].as_i64().unwrap();
    assert!((t0 + 100..t0 + 103).contains(&now), "{now} vs {t0}");
    assert_eq!(
        call(&admin, "GET", "/api/v1/namespaces/c/pods/p", None)
            .await
            .status,
        200,
        "reaping off: the pod lingers"
    );
    call(
        &admin,
        "POST",
        "/standin/v1/reaper",
        Some(&json!({"enabled": true})),
    )
    .await;
    assert_eq!(
        call(&admin, "GET", "/api/v1/namespaces/c/pods/p", None)
            .await
            .status,
        404
    );

    let before = s.resource_version();
    let a = call(
        &admin,
        "POST",
        "/standin/v1/history",
        Some(&json!({"capacity": 1})),
    )
    .await;
    assert_eq!(a.json()["capacity"], 1);
    s.create_pod("c", "x", "default", None);
    s.create_pod("c", "y", "default", None);
    let mut w = watch(
        &admin,
        &format!("/api/v1/pods?watch=true&resourceVersion={before}"),
        None,
    )
    .await;
    let e = w.next(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410))
    );
}

#[tokio::test]
async fn bulk_objects_are_created_fast_and_listed_within_seconds() {
    let (s, admin) = start(Options::default()).await;
    let t = Instant::now();
    let made = s.bulk_create(&Bulk {
        service_accounts: 10_000,
        pods: 100_000,
        ..Bulk::default()
    });
    let create_time = t.elapsed();
    assert_eq!(
        (made.pods, made.service_accounts, made.namespaces),
        (100_000, 10_000, 10)
    );
    assert_eq!(made.resource_version, s.resource_version().to_string());
    assert!(
        create_time < Duration::from_secs(20),
        "bulk create took {create_time:?}"
    );

    let t = Instant::now();
    let a = get_with(&admin, "/api/v1/pods", META_LIST).await;
    let list_time = t.elapsed();
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 100_000);
    // About 2 s unoptimised on a shared 2-core machine; well under 1 s in release.
    assert!(
        list_time < Duration::from_secs(10),
        "metadata list of 100k pods took {list_time:?}"
    );
    let sas = get_with(&admin, "/api/v1/serviceaccounts", META_LIST)
        .await
        .json();
    // 10,000 plus each namespace's `default`, plus tokengate's `default` and `tokengate`.
    assert_eq!(sas["items"].as_array().unwrap().len(), 10_012);
    // Tokens of bulk objects work like any other.
    let token = s
        .mint(&MintRequest::new("bulk-3", "sa-3").pod("pod-3"))
        .unwrap();
    assert_eq!(
        review(&admin, &token, &[]).await.json()["status"]["authenticated"],
        true
    );
    // The HTTP control.
    let a = call(
        &admin,
        "POST",
        "/standin/v1/bulk",
        Some(&json!({"prefix":"more","namespaces":2,"serviceAccounts":4,"pods":10})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json()["pods"], 10);
    let v = call(&admin, "GET", "/api/v1/namespaces/more-1/pods", None)
        .await
        .json();
    assert_eq!(names(&v).len(), 5);
    eprintln!("bulk create {create_time:?}, metadata list {list_time:?}");
}
