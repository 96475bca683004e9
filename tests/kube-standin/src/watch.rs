//! List and watch of pods and service accounts, as the API server's watch cache serves
//! them: a global `resourceVersion`, `limit`/`continue` paging, watch events streamed one
//! JSON object per line over chunked HTTP (`ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK` with
//! `allowWatchBookmarks`, and an `ERROR` event with a 410 `Expired` Status when the
//! requested version is older than the bounded history), `timeoutSeconds`, and the
//! metadata-only `PartialObjectMetadata(List)` forms `Accept` can ask for.
//!
//! Semantics follow `staging/src/k8s.io/apiserver/pkg/storage/cacher`: a list without
//! `resourceVersion` (or with any) answers the current state at the current revision; a
//! watch without `resourceVersion` or with `"0"` first sends a synthetic `ADDED` for every
//! current object, then the changes; a watch from `N` sends every change after `N`, or,
//! if the history no longer reaches back to `N`, the `ERROR` event
//! `too old resource version: N (oldest-1)` and ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use serde::Serialize;

use crate::api::{Resp, Shared};
use crate::clock::rfc3339;
use crate::cluster::{Change, Item, Object, Resource};
use crate::status::ApiError;

/// The `Accept` media type kube's `metadata_watcher` (and client-go's metadata client)
/// send for single objects and watches.
pub const META_MIME: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
/// The `Accept` media type for metadata-only lists.
pub const META_LIST_MIME: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// How objects are rendered, from the request's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The full object (`application/json`).
    Full,
    /// `PartialObjectMetadata` / `PartialObjectMetadataList`.
    Metadata,
}

/// What a request may be answered with: `list` is a list request (not a watch or GET).
/// The first acceptable media range wins; `Table` and protobuf are skipped as a server
/// that cannot produce them does. Nothing acceptable (e.g. only `as=PartialObjectMetadata`
/// for a list) is 406.
pub fn negotiate(accept: Option<&str>, list: bool) -> Result<Shape, ApiError> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Shape::Full);
    };
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut as_, mut g, mut v) = (None, None, None);
        for p in parts {
            if let Some((k, val)) = p.split_once('=') {
                match k.trim() {
                    "as" => as_ = Some(val.trim().to_string()),
                    "g" => g = Some(val.trim().to_string()),
                    "v" => v = Some(val.trim().to_string()),
                    _ => {}
                }
            }
        }
        if !matches!(media.as_str(), "application/json" | "*/*" | "application/*") {
            continue;
        }
        match as_.as_deref() {
            None => return Ok(Shape::Full),
            Some(kind) => {
                let meta_gv = g.as_deref() == Some("meta.k8s.io") && v.as_deref() == Some("v1");
                let want = if list {
                    "PartialObjectMetadataList"
                } else {
                    "PartialObjectMetadata"
                };
                if meta_gv && kind == want {
                    return Ok(Shape::Metadata);
                }
            }
        }
    }
    Err(ApiError::new(
        406,
        "NotAcceptable",
        format!(
            "only the following media types are accepted: application/json, {}",
            if list { META_LIST_MIME } else { META_MIME }
        ),
        None,
    ))
}

/// `resourceVersion` semantics of one request.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// `watch=true|1`.
    pub watch: bool,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `timeoutSeconds`.
    pub timeout_seconds: Option<u64>,
    /// `limit`.
    pub limit: Option<usize>,
    /// `continue`.
    pub continue_token: Option<String>,
    /// `labelSelector`.
    pub label_selector: Option<String>,
    /// `fieldSelector`.
    pub field_selector: Option<String>,
    /// `sendInitialEvents`.
    pub send_initial_events: bool,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded `key=value` pairs of a query string.
pub fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn parse_bool(v: &str) -> bool {
    matches!(v, "true" | "1" | "True" | "TRUE" | "t" | "T")
}

impl Query {
    /// Parses the list/watch parameters; malformed numbers are 400 as on the real server.
    pub fn parse(q: Option<&str>) -> Result<Query, ApiError> {
        let mut out = Query::default();
        for (k, v) in query_pairs(q) {
            let num = |name: &str| -> Result<u64, ApiError> {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid value {} for {name}: must be a non-negative integer",
                        crate::status::go_quote(&v)
                    ))
                })
            };
            match k.as_str() {
                "watch" => out.watch = parse_bool(&v),
                "resourceVersion" => {
                    out.resource_version = Some(v.clone()).filter(|s| !s.is_empty())
                }
                "resourceVersionMatch" => {
                    out.resource_version_match = Some(v.clone()).filter(|s| !s.is_empty())
                }
                "allowWatchBookmarks" => out.bookmarks = parse_bool(&v),
                "timeoutSeconds" => out.timeout_seconds = Some(num("timeoutSeconds")?),
                "limit" => out.limit = Some(num("limit")? as usize),
                "continue" => out.continue_token = Some(v.clone()).filter(|s| !s.is_empty()),
                "labelSelector" => out.label_selector = Some(v.clone()).filter(|s| !s.is_empty()),
                "fieldSelector" => out.field_selector = Some(v.clone()).filter(|s| !s.is_empty()),
                "sendInitialEvents" => out.send_initial_events = parse_bool(&v),
                _ => {}
            }
        }
        Ok(out)
    }

    fn rv_number(&self) -> Result<Option<u64>, ApiError> {
        match self.resource_version.as_deref() {
            None => Ok(None),
            Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid resource version: {}",
                    crate::status::go_quote(s)
                ))
            }),
        }
    }
}

/// A parsed `fieldSelector` / `labelSelector`, applied to the objects served here.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    fields: Vec<(String, bool, String)>,
    /// `false` when the label selector can match no object (they carry no labels).
    labels_match: bool,
}

impl Filter {
    /// Parses the selectors. Field selectors support the fields the API server indexes for
    /// these resources (others are 400 `field label not supported`); since objects here have
    /// no labels, a label selector matches every object iff all its requirements are
    /// negative (`!k`, `k!=v`, `k notin (..)`).
    pub fn parse(res: Resource, q: &Query) -> Result<Filter, ApiError> {
        let mut f = Filter {
            fields: Vec::new(),
            labels_match: true,
        };
        if let Some(sel) = &q.field_selector {
            for term in sel.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                    (k, false, v)
                } else if let Some((k, v)) = term.split_once("==") {
                    (k, true, v)
                } else if let Some((k, v)) = term.split_once('=') {
                    (k, true, v)
                } else {
                    return Err(ApiError::bad_request(format!(
                        "invalid selector: '{sel}'; can't understand '{term}'"
                    )));
                };
                let k = k.trim();
                let supported = match res {
                    Resource::Pods => matches!(
                        k,
                        "metadata.name"
                            | "metadata.namespace"
                            | "spec.nodeName"
                            | "spec.serviceAccountName"
                            | "status.phase"
                    ),
                    Resource::ServiceAccounts => {
                        matches!(k, "metadata.name" | "metadata.namespace")
                    }
                };
                if !supported {
                    return Err(ApiError::bad_request(format!(
                        "field label not supported: {k}"
                    )));
                }
                f.fields.push((k.to_string(), eq, v.trim().to_string()));
            }
        }
        if let Some(sel) = &q.label_selector {
            let mut depth = 0;
            let mut reqs = Vec::new();
            let mut cur = String::new();
            for c in sel.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        reqs.push(std::mem::take(&mut cur));
                        continue;
                    }
                    _ => {}
                }
                cur.push(c);
            }
            reqs.push(cur);
            f.labels_match = reqs
                .iter()
                .map(|r| r.trim())
                .filter(|r| !r.is_empty())
                .all(|r| r.starts_with('!') || r.contains("!=") || r.contains(" notin "));
        }
        Ok(f)
    }

    /// Whether the object matches.
    pub fn matches(&self, item: &Item) -> bool {
        if !self.labels_match {
            return false;
        }
        self.fields.iter().all(|(k, eq, v)| {
            let actual = match (k.as_str(), &item.object) {
                ("metadata.name", _) => item.name.as_str(),
                ("metadata.namespace", _) => item.namespace.as_str(),
                ("spec.nodeName", Object::Pod(p)) => p.node.as_deref().unwrap_or(""),
                ("spec.serviceAccountName", Object::Pod(p)) => p.service_account.as_str(),
                ("status.phase", Object::Pod(_)) => "Running",
                _ => "",
            };
            (actual == v) == *eq
        })
    }
}

// ------------------------------------------------------------------ rendering

#[derive(Serialize)]
struct MetaOut<'a> {
    name: &'a str,
    namespace: &'a str,
    uid: &'a str,
    #[serde(rename = "resourceVersion")]
    resource_version: String,
    #[serde(rename = "creationTimestamp")]
    creation_timestamp: String,
    #[serde(rename = "deletionTimestamp", skip_serializing_if = "Option::is_none")]
    deletion_timestamp: Option<String>,
    #[serde(
        rename = "deletionGracePeriodSeconds",
        skip_serializing_if = "Option::is_none"
    )]
    deletion_grace_period_seconds: Option<i64>,
}

#[derive(Serialize)]
struct PodSpecOut<'a> {
    #[serde(rename = "serviceAccountName")]
    service_account_name: &'a str,
    #[serde(rename = "nodeName", skip_serializing_if = "Option::is_none")]
    node_name: Option<&'a str>,
    #[serde(rename = "terminationGracePeriodSeconds")]
    termination_grace_period_seconds: i64,
}

#[derive(Serialize)]
struct ObjOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(rename = "apiVersion", skip_serializing_if = "Option::is_none")]
    api_version: Option<&'static str>,
    metadata: MetaOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<PodSpecOut<'a>>,
}

fn obj_out(item: &Item, shape: Shape, with_type: bool) -> ObjOut<'_> {
    let m = item.object.meta();
    let metadata = MetaOut {
        name: &item.name,
        namespace: &item.namespace,
        uid: &m.uid,
        resource_version: m.rv.to_string(),
        creation_timestamp: rfc3339(m.created),
        deletion_timestamp: m.deletion_timestamp.map(rfc3339),
        deletion_grace_period_seconds: m.deletion_grace_seconds,
    };
    let (kind, api_version) = match (shape, &item.object) {
        (Shape::Metadata, _) => ("PartialObjectMetadata", "meta.k8s.io/v1"),
        (Shape::Full, Object::Pod(_)) => ("Pod", "v1"),
        (Shape::Full, Object::ServiceAccount(_)) => ("ServiceAccount", "v1"),
    };
    let spec = match (shape, &item.object) {
        (Shape::Full, Object::Pod(p)) => Some(PodSpecOut {
            service_account_name: &p.service_account,
            node_name: p.node.as_deref(),
            termination_grace_period_seconds: p.termination_grace_seconds,
        }),
        _ => None,
    };
    ObjOut {
        kind: with_type.then_some(kind),
        api_version: with_type.then_some(api_version),
        metadata,
        spec,
    }
}

/// One object as JSON (single GET, DELETE answers, watch events).
pub fn object_json(item: &Item, shape: Shape) -> Vec<u8> {
    serde_json::to_vec(&obj_out(item, shape, true)).unwrap_or_default()
}

fn content_type(shape: Shape, list: bool) -> &'static str {
    match (shape, list) {
        (Shape::Full, _) => "application/json",
        (Shape::Metadata, false) => META_MIME,
        (Shape::Metadata, true) => META_LIST_MIME,
    }
}

/// A single-object answer.
pub fn object_resp(code: u16, item: &Item, shape: Shape) -> Resp {
    crate::api::respond(code, content_type(shape, false), object_json(item, shape))
}

#[derive(Serialize)]
struct ListMetaOut {
    #[serde(rename = "resourceVersion")]
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_: Option<String>,
}

#[derive(Serialize)]
struct ListOut<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: ListMetaOut,
    items: Vec<ObjOut<'a>>,
}

#[derive(Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: u64,
    start: String,
}

/// `GET` of a collection without `watch`.
pub fn list(
    shared: &Shared,
    res: Resource,
    namespace: Option<&str>,
    q: &Query,
    shape: Shape,
) -> Result<Resp, ApiError> {
    let filter = Filter::parse(res, q)?;
    if let Some(n) = q.rv_number()?.filter(|n| *n > 0) {
        let current = shared.cluster.resource_version();
        if n > current {
            return Err(too_large(n, current));
        }
        // No snapshots are kept: an exact read of an older revision is answered as etcd
        // answers a compacted one.
        if q.resource_version_match.as_deref() == Some("Exact") && n != current {
            return Err(ApiError::new(
                410,
                "Expired",
                "The resourceVersion for the provided list is too old.".to_string(),
                None,
            ));
        }
    }
    let after = match &q.continue_token {
        None => None,
        Some(t) => {
            let bad = || {
                ApiError::bad_request(
                    "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"
                        .to_string(),
                )
            };
            let raw = URL_SAFE_NO_PAD
                .decode(t.trim_end_matches('='))
                .map_err(|_| bad())?;
            let tok: ContinueToken = serde_json::from_slice(&raw).map_err(|_| bad())?;
            let (ns, name) = tok.start.split_once('/').ok_or_else(bad)?;
            Some((tok.rv, (ns.to_string(), name.to_string())))
        }
    };
    // Filtering happens before the limit, as the API server applies it while paging.
    let limit = q.limit.filter(|l| *l > 0);
    let mut items = Vec::new();
    let mut cursor = after.as_ref().map(|(_, k)| k.clone());
    let mut rv = after.as_ref().map(|(rv, _)| *rv);
    let mut more;
    loop {
        let want = limit.map(|l| l - items.len());
        let (now_rv, page, m) = shared.cluster.list(res, namespace, cursor.as_ref(), want);
        rv.get_or_insert(now_rv);
        more = m;
        if let Some(last) = page.last() {
            cursor = Some((last.namespace.clone(), last.name.clone()));
        }
        items.extend(page.into_iter().filter(|i| filter.matches(i)));
        if !more || limit.is_none_or(|l| items.len() >= l) {
            break;
        }
    }
    let rv = rv.unwrap_or(0);
    let continue_ = match (more, &cursor) {
        (true, Some((ns, name))) => Some(
            URL_SAFE_NO_PAD.encode(
                serde_json::to_vec(&ContinueToken {
                    v: "meta.k8s.io/v1".to_string(),
                    rv,
                    start: format!("{ns}/{name}"),
                })
                .unwrap_or_default(),
            ),
        ),
        _ => None,
    };
    let (kind, api_version) = match (shape, res) {
        (Shape::Metadata, _) => ("PartialObjectMetadataList", "meta.k8s.io/v1"),
        (Shape::Full, Resource::Pods) => ("PodList", "v1"),
        (Shape::Full, Resource::ServiceAccounts) => ("ServiceAccountList", "v1"),
    };
    let out = ListOut {
        kind,
        api_version,
        metadata: ListMetaOut {
            resource_version: rv.to_string(),
            continue_,
        },
        // Typed lists carry no per-item kind; PartialObjectMetadataList items do.
        items: items
            .iter()
            .map(|i| obj_out(i, shape, shape == Shape::Metadata))
            .collect(),
    };
    let body = serde_json::to_vec(&out).map_err(|e| ApiError::internal(&e.to_string()))?;
    Ok(crate::api::respond(200, content_type(shape, true), body))
}

// ------------------------------------------------------------------ watch

/// A response body fed by a channel: one chunk per watch event.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn event_line(kind: &str, object: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(object.len() + 32);
    v.extend_from_slice(b"{\"type\":\"");
    v.extend_from_slice(kind.as_bytes());
    v.extend_from_slice(b"\",\"object\":");
    v.extend_from_slice(object);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

fn bookmark_json(shared: &Shared, res: Resource, shape: Shape, rv: u64) -> Vec<u8> {
    let (kind, av) = match shape {
        Shape::Metadata => ("PartialObjectMetadata", "meta.k8s.io/v1"),
        Shape::Full => (res.kind(), "v1"),
    };
    let meta = match shared.cluster.cfg.metadata_style {
        crate::MetadataStyle::V133 => serde_json::json!({"resourceVersion": rv.to_string()}),
        crate::MetadataStyle::PreV133 => {
            serde_json::json!({"resourceVersion": rv.to_string(), "creationTimestamp": null})
        }
    };
    serde_json::to_vec(&serde_json::json!({"kind": kind, "apiVersion": av, "metadata": meta}))
        .unwrap_or_default()
}

/// The cacher's answer to a revision it has not reached (after its 3 s wait).
fn too_large(requested: u64, current: u64) -> ApiError {
    let mut e = ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {requested}, current: {current}"),
        Some(crate::status::Details {
            causes: vec![crate::status::Cause {
                reason: "ResourceVersionTooLarge".to_string(),
                message: "Too large resource version".to_string(),
                field: String::new(),
            }],
            retry_after_seconds: 1,
            ..Default::default()
        }),
    );
    e.retry_after = Some(1);
    e
}

/// Default `timeoutSeconds` of a watch that names none (the server picks 30–60 min).
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// `GET` of a collection with `watch=true`: answers 200 at once and streams events.
pub fn watch(
    shared: Arc<Shared>,
    res: Resource,
    namespace: Option<String>,
    q: &Query,
    shape: Shape,
) -> Result<Resp, ApiError> {
    let filter = Filter::parse(res, q)?;
    let start = q.rv_number()?.filter(|rv| *rv > 0);
    let timeout = q
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let bookmarks = q.bookmarks;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        run_watch(
            &shared, res, namespace, filter, start, bookmarks, timeout, shape, tx,
        )
        .await;
    });
    let mut r = http::Response::new(ChannelBody(rx).boxed());
    if let Ok(v) = http::HeaderValue::from_str(content_type(shape, false)) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn run_watch(
    shared: &Shared,
    res: Resource,
    namespace: Option<String>,
    filter: Filter,
    start: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
    shape: Shape,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut revisions = shared.cluster.subscribe();
    let ns = namespace.as_deref();
    let visible = |i: &Item| ns.is_none_or(|n| i.namespace == n) && filter.matches(i);
    let mut last = match start {
        Some(rv) if rv > shared.cluster.resource_version() => {
            let e = too_large(rv, shared.cluster.resource_version());
            let _ = tx.send(event_line("ERROR", &e.body())).await;
            return;
        }
        Some(rv) => rv,
        None => {
            // Synthetic ADDED events for the current state, then changes after it.
            let (rv, items, _) = shared.cluster.list(res, ns, None, None);
            for i in items.iter().filter(|i| visible(i)) {
                if tx
                    .send(event_line("ADDED", &object_json(i, shape)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            rv
        }
    };
    let interval = shared.bookmark_interval;
    let mut next_bookmark = tokio::time::Instant::now() + interval;
    let mut bookmark_due = false;
    loop {
        revisions.borrow_and_update();
        match shared.cluster.changes_since(res, last) {
            Err(too_old) => {
                let e = ApiError::new(
                    410,
                    "Expired",
                    format!(
                        "too old resource version: {} ({})",
                        too_old.requested, too_old.oldest
                    ),
                    None,
                );
                let _ = tx.send(event_line("ERROR", &e.body())).await;
                return;
            }
            Ok((changes, current)) => {
                for c in changes.iter().filter(|c| visible(&c.item)) {
                    if send_change(&tx, c, shape).await.is_err() {
                        return;
                    }
                }
                last = last.max(current);
            }
        }
        if bookmark_due && bookmarks {
            bookmark_due = false;
            let line = event_line("BOOKMARK", &bookmark_json(shared, res, shape, last));
            if tx.send(line).await.is_err() {
                return;
            }
        }
        tokio::select! {
            r = revisions.changed() => { if r.is_err() { return; } }
            _ = tokio::time::sleep_until(next_bookmark) => {
                bookmark_due = true;
                next_bookmark = tokio::time::Instant::now() + interval;
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tx.closed() => return,
        }
    }
}

async fn send_change(
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    c: &Change,
    shape: Shape,
) -> Result<(), ()> {
    tx.send(event_line(c.kind.as_str(), &object_json(&c.item, shape)))
        .await
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_kube_metadata_mimes() {
        assert_eq!(negotiate(None, true).unwrap(), Shape::Full);
        assert_eq!(
            negotiate(Some(META_LIST_MIME), true).unwrap(),
            Shape::Metadata
        );
        assert_eq!(negotiate(Some(META_MIME), false).unwrap(), Shape::Metadata);
        assert_eq!(negotiate(Some(META_MIME), true).unwrap_err().code(), 406);
        // kubectl: Table first, plain JSON as the fallback.
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(Some(kubectl), true).unwrap(), Shape::Full);
    }

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some(
            "watch=1&resourceVersion=12&allowWatchBookmarks=true&timeoutSeconds=5&fieldSelector=spec.nodeName%3Dn1",
        ))
        .unwrap();
        assert!(q.watch && q.bookmarks);
        assert_eq!(q.resource_version.as_deref(), Some("12"));
        assert_eq!(q.timeout_seconds, Some(5));
        assert_eq!(q.field_selector.as_deref(), Some("spec.nodeName=n1"));
        assert_eq!(Query::parse(Some("limit=x")).unwrap_err().code(), 400);
    }
}
