//! HTTP request handling: routing, caller authentication (401) and RBAC (403), then the
//! endpoints: TokenReview, TokenRequest, service accounts, pods, ClusterRoleBindings,
//! OIDC discovery, the discovery documents kubectl reads, and the `/standin/v1` test
//! controls. Every error is a Kubernetes `Status`; nothing a request sends can panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::rfc3339;
use crate::cluster::{
    Attributes, AuthOutcome, BoundObjectRef, Cluster, IssueSpec, Issued, Item, Object, Resource,
    UserInfo,
};
use crate::discovery;
use crate::rbac_api::{rbac_create, rbac_kind, rbac_list, rbac_one};
use crate::status::ApiError;
use crate::{Fault, MetadataStyle};

/// kube-apiserver's `--max-resource-write-bytes` default.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Returned by the handler to make the connection drop without an answer.
#[derive(Debug)]
pub struct CloseConnection;

impl std::fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed by injected fault")
    }
}

impl std::error::Error for CloseConnection {}

/// Response type of every handler: a whole body, or a stream (watches).
pub type Resp = Response<BoxBody<Bytes, std::convert::Infallible>>;

/// State shared by all connections.
pub struct Shared {
    /// Objects, keys and token logic.
    pub cluster: Cluster,
    /// TokenReview POSTs that reached the handler.
    pub reviews: AtomicU64,
    /// SubjectAccessReview POSTs that reached the handler.
    pub access_reviews: AtomicU64,
    /// Fault applied to TokenReview requests.
    pub fault: Mutex<Fault>,
    /// Tells the accept loop to stop (`true`) or resume (`false`) listening.
    pub down: tokio::sync::watch::Sender<bool>,
    /// `https://host:port` the server is reachable at.
    pub url: String,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: std::time::Duration,
}

impl Shared {
    /// Sets the fault; `Fault::Down` stops listening, anything else resumes it.
    pub fn set_fault(&self, fault: Fault) {
        let down = fault == Fault::Down;
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
        self.down.send_replace(down);
    }

    fn fault(&self) -> Fault {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A response with a whole body.
pub fn respond(code: u16, content_type: &str, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

pub(crate) fn json_resp<T: Serialize>(code: u16, v: &T) -> Resp {
    match serde_json::to_vec(v) {
        Ok(b) => respond(code, "application/json", b),
        Err(e) => error_resp(&ApiError::internal(&e.to_string())),
    }
}

/// A `Status` response, with the headers kube-apiserver adds.
pub fn error_resp(e: &ApiError) -> Resp {
    let mut r = respond(e.code(), "application/json", e.body());
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Some(s) = e.retry_after {
        if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

fn not_found_page() -> Resp {
    respond(
        404,
        "text/plain; charset=utf-8",
        b"404 page not found\n".to_vec(),
    )
}

/// The caller, after authentication.
pub(crate) fn authenticate_caller<B>(
    shared: &Shared,
    req: &Request<B>,
) -> Result<UserInfo, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(UserInfo::anonymous());
    };
    let Ok(value) = value.to_str() else {
        return Err(ApiError::unauthorized());
    };
    // bearertoken: scheme "bearer" (case-insensitive), token is the second field.
    let mut parts = value.split(' ');
    let scheme = parts.next().unwrap_or("");
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(UserInfo::anonymous());
    }
    let token = parts.next().unwrap_or("");
    if token.is_empty() {
        return Ok(UserInfo::anonymous());
    }
    match shared.cluster.authenticate(token, &[]) {
        AuthOutcome::Authenticated { user, .. } => Ok(user),
        AuthOutcome::Failed(_) => Err(ApiError::unauthorized()),
    }
}

pub(crate) fn authorize_resource(
    shared: &Shared,
    user: &UserInfo,
    verb: &str,
    group: &str,
    resource: &str,
    name: &str,
    namespace: Option<&str>,
) -> Result<(), ApiError> {
    let attrs = Attributes::Resource {
        verb,
        group,
        resource,
        name,
        namespace,
    };
    if shared.cluster.authorize(user, &attrs) {
        Ok(())
    } else {
        Err(ApiError::forbidden_resource(
            &user.username,
            verb,
            resource,
            group,
            name,
            namespace,
        ))
    }
}

fn authorize_path(shared: &Shared, user: &UserInfo, path: &str) -> Result<(), ApiError> {
    let attrs = Attributes::NonResource { verb: "get", path };
    if shared.cluster.authorize(user, &attrs) {
        Ok(())
    } else {
        Err(ApiError::forbidden_path(&user.username, "get", path))
    }
}

pub(crate) async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::too_large(MAX_BODY_BYTES))
            } else {
                Err(ApiError::bad_request(format!(
                    "error reading request body: {e}"
                )))
            }
        }
    }
}

/// Checks the request's content type: JSON (or none) is decoded, protobuf is refused.
pub(crate) fn require_json<B>(req: &Request<B>) -> Result<(), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct.split(';').next().unwrap_or("").trim();
    if media.is_empty() || media.eq_ignore_ascii_case("application/json") || media == "*/*" {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type())
    }
}

/// Decodes a JSON body, with the messages the API server's decoder gives.
pub(crate) fn decode<'a, T: Deserialize<'a>>(body: &'a [u8], kind: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        ApiError::bad_request(match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                format!("couldn't get version/kind; json parse error: {e}")
            }
            // serde's data errors quote the offending value, which may be a token; Go's
            // decoder names only the types, so say where, not what.
            Category::Data => format!(
                "{kind} in version \"v1\" cannot be handled as a {kind}: json: cannot unmarshal a value of the wrong type (line {}, column {})",
                e.line(),
                e.column()
            ),
        })
    })
}

/// Entry point for every request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, CloseConnection> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .collect();
    let method = req.method().clone();

    if method == Method::POST && segs == ["apis", "authentication.k8s.io", "v1", "tokenreviews"] {
        return token_review(shared, req).await;
    }
    if method == Method::POST
        && segs == ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]
    {
        return crate::rbac_api::subject_access_review(shared, req).await;
    }

    let user = match authenticate_caller(&shared, &req) {
        Ok(u) => u,
        Err(e) => return Ok(error_resp(&e)),
    };
    let result = route(&shared, &user, &method, &path, &segs, req).await;
    Ok(match result {
        Ok(r) => r,
        Err(e) => error_resp(&e),
    })
}

/// Reads a ServiceAccount or Pod body, JSON or protobuf.
async fn read_object(
    req: Request<hyper::body::Incoming>,
    kind: &str,
) -> Result<crate::protobuf::ObjectBody, ApiError> {
    let proto = is_protobuf(&req);
    if !proto {
        require_json(&req)?;
    }
    let body = read_body(req.into_body()).await?;
    if proto {
        return crate::protobuf::decode_object(&body)
            .map_err(|e| ApiError::bad_request(format!("failed to decode protobuf {kind}: {e}")));
    }
    let obj: ObjectIn = decode(&body, kind)?;
    let spec = obj.spec.unwrap_or_default();
    Ok(crate::protobuf::ObjectBody {
        name: obj.metadata.name,
        service_account_name: spec.service_account_name,
        node_name: spec.node_name,
        termination_grace_seconds: spec.termination_grace_seconds,
    })
}

pub(crate) fn is_protobuf<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/vnd.kubernetes.protobuf"))
}

async fn route(
    shared: &Arc<Shared>,
    user: &UserInfo,
    method: &Method,
    path: &str,
    segs: &[&str],
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, ApiError> {
    let get = *method == Method::GET;
    let query = req.uri().query().map(str::to_string);
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let accept = accept.as_deref();
    match segs {
        ["api", "v1", res @ ("pods" | "serviceaccounts")] if get => {
            let res = resource_of(res);
            list_or_watch(shared, user, res, None, query.as_deref(), accept)
        }
        ["api", "v1", "namespaces", ns, res @ ("pods" | "serviceaccounts")] if get => {
            let res = resource_of(res);
            list_or_watch(shared, user, res, Some(ns), query.as_deref(), accept)
        }
        ["healthz"] | ["livez"] | ["readyz"] if get => {
            authorize_path(shared, user, path)?;
            Ok(respond(200, "text/plain; charset=utf-8", b"ok".to_vec()))
        }
        ["version"] if get => {
            authorize_path(shared, user, "/version")?;
            Ok(json_resp(200, &discovery::version()))
        }
        [".well-known", "openid-configuration"] if get => oidc(shared, user, path, false),
        ["openid", "v1", "jwks"] if get => oidc(shared, user, path, true),
        ["openapi", "v2"] if get => {
            authorize_path(shared, user, path)?;
            // An OpenAPI v2 document (gnostic protobuf) with only `swagger: "2.0"` and no
            // definitions: kubectl then skips client-side schema validation, as it does for
            // any kind a server does not describe.
            Ok(respond(
                200,
                "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                b"\x0a\x032.0".to_vec(),
            ))
        }
        ["api"] if get => {
            authorize_path(shared, user, "/api")?;
            Ok(json_resp(200, &discovery::api_versions(&shared.url)))
        }
        ["apis"] if get => {
            authorize_path(shared, user, "/apis")?;
            Ok(json_resp(200, &discovery::api_group_list()))
        }
        ["api", "v1"] if get => {
            authorize_path(shared, user, path)?;
            Ok(json_resp(200, &discovery::core_v1_resources()))
        }
        ["apis", group] if get => {
            authorize_path(shared, user, path)?;
            Ok(discovery::api_group(group)
                .map(|g| json_resp(200, &g))
                .unwrap_or_else(not_found_page))
        }
        ["apis", group, "v1"] if get => {
            authorize_path(shared, user, path)?;
            Ok(discovery::group_v1_resources(group)
                .map(|g| json_resp(200, &g))
                .unwrap_or_else(not_found_page))
        }
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => {
            Err(ApiError::method_not_allowed())
        }
        ["api", "v1", "namespaces", ns, "serviceaccounts", name, "token"] => {
            if *method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            token_request(shared, user, ns, name, req).await
        }
        ["api", "v1", "namespaces", ns, "serviceaccounts"] if *method == Method::POST => {
            let (name, _) =
                read_new_object(shared, user, ("serviceaccounts", ns), "ServiceAccount", req)
                    .await?;
            let meta = shared.cluster.create_service_account(ns, &name)?;
            Ok(crate::watch::object_resp(
                201,
                &item(ns, &name, Object::ServiceAccount(meta)),
                crate::watch::Shape::Full,
            ))
        }
        ["api", "v1", "namespaces", ns, "serviceaccounts", name] => {
            let shape = single_shape(method, accept)?;
            let meta = get_or_delete(
                shared,
                user,
                method,
                ("serviceaccounts", ns, name),
                |c| c.get_service_account(ns, name),
                |c| c.delete_service_account(ns, name),
            )?;
            Ok(crate::watch::object_resp(
                200,
                &item(ns, name, Object::ServiceAccount(meta)),
                shape,
            ))
        }
        ["api", "v1", "namespaces", ns, "pods"] if *method == Method::POST => {
            let (name, obj) = read_new_object(shared, user, ("pods", ns), "Pod", req).await?;
            let sa = obj
                .service_account_name
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string());
            shared.cluster.ensure_namespace(ns);
            if shared.cluster.get_service_account(ns, &sa).is_none() {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "pods \"{name}\" is forbidden: error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
                    ),
                    Some(crate::status::Details {
                        name: name.clone(),
                        kind: "pods".to_string(),
                        ..Default::default()
                    }),
                ));
            }
            let node = obj.node_name.filter(|n| !n.is_empty());
            let grace = obj
                .termination_grace_seconds
                .unwrap_or(crate::cluster::DEFAULT_TERMINATION_GRACE_SECONDS);
            if grace < 0 {
                return Err(ApiError::invalid(
                    "Pod",
                    "",
                    &name,
                    "spec.terminationGracePeriodSeconds",
                    &grace.to_string(),
                    "must be greater than or equal to 0",
                ));
            }
            let pod =
                shared
                    .cluster
                    .create_pod_with_grace(ns, &name, &sa, node.as_deref(), grace)?;
            Ok(crate::watch::object_resp(
                201,
                &item(ns, &name, Object::Pod(pod)),
                crate::watch::Shape::Full,
            ))
        }
        ["api", "v1", "namespaces", ns, "pods", name] if *method == Method::DELETE => {
            authorize_resource(shared, user, "delete", "", "pods", name, Some(ns))?;
            let shape = single_shape(method, accept)?;
            let grace = grace_period(query.as_deref(), req).await?;
            let pod = shared
                .cluster
                .delete_pod_graceful(ns, name, grace)
                .ok_or_else(|| ApiError::not_found("pods", "", name))?;
            Ok(crate::watch::object_resp(
                200,
                &item(ns, name, Object::Pod(pod)),
                shape,
            ))
        }
        ["api", "v1", "namespaces", ns, "pods", name] => {
            let shape = single_shape(method, accept)?;
            let pod = get_or_delete(
                shared,
                user,
                method,
                ("pods", ns, name),
                |c| c.get_pod(ns, name),
                |c| c.delete_pod(ns, name),
            )?;
            Ok(crate::watch::object_resp(
                200,
                &item(ns, name, Object::Pod(pod)),
                shape,
            ))
        }
        ["apis", "rbac.authorization.k8s.io", "v1", res] => {
            let kind = rbac_kind(res)?;
            if kind.namespaced() || !get {
                // Namespaced kinds: list across namespaces only; cluster kinds: create too.
                if !kind.namespaced() && *method == Method::POST {
                    return rbac_create(shared, user, kind, None, req).await;
                }
                if !get {
                    return Err(ApiError::method_not_allowed());
                }
            }
            rbac_list(shared, user, kind, None, query.as_deref())
        }
        ["apis", "rbac.authorization.k8s.io", "v1", "namespaces", ns, res] => {
            let kind = rbac_kind(res).ok().filter(|k| k.namespaced());
            let Some(kind) = kind else {
                return Ok(not_found_page());
            };
            match *method {
                Method::POST => rbac_create(shared, user, kind, Some(ns), req).await,
                Method::GET => rbac_list(shared, user, kind, Some(ns), query.as_deref()),
                _ => Err(ApiError::method_not_allowed()),
            }
        }
        ["apis", "rbac.authorization.k8s.io", "v1", res, name] => {
            let kind = rbac_kind(res).ok().filter(|k| !k.namespaced());
            let Some(kind) = kind else {
                return Ok(not_found_page());
            };
            rbac_one(shared, user, method, kind, None, name)
        }
        ["apis", "rbac.authorization.k8s.io", "v1", "namespaces", ns, res, name] => {
            let kind = rbac_kind(res).ok().filter(|k| k.namespaced());
            let Some(kind) = kind else {
                return Ok(not_found_page());
            };
            rbac_one(shared, user, method, kind, Some(ns), name)
        }
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"] => {
            Err(ApiError::method_not_allowed())
        }
        ["standin", "v1", "fault"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            let body = read_body(req.into_body()).await?;
            let f: FaultIn = decode(&body, "fault")?;
            if f.kind == "down" {
                // Down for `ms`, then up again on the same port. It starts a moment later
                // so that this answer still reaches the caller.
                let ms = f.ms.unwrap_or(1000);
                let shared = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    shared.set_fault(Fault::Down);
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    shared.set_fault(Fault::None);
                });
            } else {
                shared.set_fault(f.into_fault()?);
            }
            Ok(json_resp(200, &json!({"ok": true})))
        }
        ["standin", "v1", "keys"] if get => {
            require_admin(shared, user, path)?;
            Ok(json_resp(200, &keys_json(shared)))
        }
        ["standin", "v1", "keys"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            let body = read_body(req.into_body()).await?;
            let k: KeyIn = if body.is_empty() {
                KeyIn::default()
            } else {
                decode(&body, "key")?
            };
            let alg = match k
                .alg
                .as_deref()
                .unwrap_or("rs256")
                .to_ascii_lowercase()
                .as_str()
            {
                "rs256" => crate::KeyAlg::Rs256,
                "es256" => crate::KeyAlg::Es256,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "key: unknown alg {other:?} (rs256|es256)"
                    )))
                }
            };
            let kid = if k.sign {
                shared.cluster.add_key(alg)
            } else {
                shared.cluster.publish_key(alg)
            }
            .map_err(|e| ApiError::internal(&e.to_string()))?;
            Ok(json_resp(
                201,
                &json!({"kid": kid, "keys": keys_json(shared)}),
            ))
        }
        ["standin", "v1", "keys", kid, "sign"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            if !shared.cluster.sign_with(kid) {
                return Err(ApiError::not_found("keys", "", kid));
            }
            Ok(json_resp(200, &keys_json(shared)))
        }
        ["standin", "v1", "keys", kid] if *method == Method::DELETE => {
            require_admin(shared, user, path)?;
            if !shared.cluster.retire_key(kid) {
                return Err(ApiError::not_found("keys", "", kid));
            }
            Ok(json_resp(200, &keys_json(shared)))
        }
        ["standin", "v1", "bulk"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            let body = read_body(req.into_body()).await?;
            let b: crate::Bulk = decode(&body, "bulk")?;
            let cluster = shared.clone();
            let created = tokio::task::spawn_blocking(move || cluster.cluster.bulk_create_spec(&b))
                .await
                .map_err(|e| ApiError::internal(&e.to_string()))?;
            Ok(json_resp(201, &created))
        }
        ["standin", "v1", "clock"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            let body = read_body(req.into_body()).await?;
            let c: ClockIn = decode(&body, "clock")?;
            let now = shared.cluster.advance_clock(c.advance_seconds);
            Ok(json_resp(200, &json!({"now": now, "time": rfc3339(now)})))
        }
        ["standin", "v1", "reaper"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            let body = read_body(req.into_body()).await?;
            let r: ReaperIn = decode(&body, "reaper")?;
            shared.cluster.set_reaping(r.enabled);
            Ok(json_resp(200, &json!({"enabled": r.enabled})))
        }
        ["standin", "v1", "history"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            let body = read_body(req.into_body()).await?;
            let h: HistoryIn = decode(&body, "history")?;
            shared.cluster.set_history_capacity(h.capacity);
            Ok(json_resp(200, &json!({"capacity": h.capacity.max(1)})))
        }
        ["standin", "v1", "sync"] if *method == Method::POST => {
            require_admin(shared, user, path)?;
            let cluster = shared.clone();
            tokio::task::spawn_blocking(move || cluster.cluster.flush())
                .await
                .map_err(|e| ApiError::internal(&e.to_string()))?;
            Ok(json_resp(200, &json!({"ok": true})))
        }
        ["standin", "v1", "counters"] if get => {
            require_admin(shared, user, path)?;
            Ok(json_resp(
                200,
                &json!({"token_reviews": shared.reviews.load(Ordering::SeqCst),
                        "subject_access_reviews": shared.access_reviews.load(Ordering::SeqCst)}),
            ))
        }
        _ => Ok(not_found_page()),
    }
}

fn require_admin(shared: &Shared, user: &UserInfo, path: &str) -> Result<(), ApiError> {
    // Test controls are only for callers RBAC lets do anything (cluster-admin).
    let attrs = Attributes::Resource {
        verb: "*",
        group: "*",
        resource: "*",
        name: "",
        namespace: None,
    };
    if shared.cluster.authorize(user, &attrs) {
        Ok(())
    } else {
        Err(ApiError::forbidden_path(&user.username, "post", path))
    }
}

fn resource_of(name: &str) -> Resource {
    if name == "pods" {
        Resource::Pods
    } else {
        Resource::ServiceAccounts
    }
}

fn item(ns: &str, name: &str, object: Object) -> Item {
    Item {
        namespace: ns.to_string(),
        name: name.to_string(),
        object,
    }
}

/// The shape a GET or DELETE of one object is answered in (methods other than those are
/// left to the 405 that follows).
fn single_shape(method: &Method, accept: Option<&str>) -> Result<crate::watch::Shape, ApiError> {
    if *method == Method::GET || *method == Method::DELETE {
        crate::watch::negotiate(accept, false)
    } else {
        Ok(crate::watch::Shape::Full)
    }
}

/// `GET` of a collection: RBAC `list` or `watch`, then the list or the event stream.
fn list_or_watch(
    shared: &Arc<Shared>,
    user: &UserInfo,
    res: Resource,
    ns: Option<&str>,
    query: Option<&str>,
    accept: Option<&str>,
) -> Result<Resp, ApiError> {
    let q = crate::watch::Query::parse(query)?;
    let verb = if q.watch { "watch" } else { "list" };
    authorize_resource(shared, user, verb, "", res.name(), "", ns)?;
    if q.watch {
        if q.send_initial_events {
            // As kube-apiserver with the WatchList feature gate off (kube-runtime's default
            // ListWatch strategy never asks for it).
            let why = "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled";
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: {why}"
                ),
                Some(crate::status::Details {
                    group: "meta.k8s.io".to_string(),
                    kind: "ListOptions".to_string(),
                    causes: vec![crate::status::Cause {
                        reason: "FieldValueForbidden".to_string(),
                        message: format!("Forbidden: {why}"),
                        field: "sendInitialEvents".to_string(),
                    }],
                    ..Default::default()
                }),
            ));
        }
        let shape = crate::watch::negotiate(accept, false)?;
        crate::watch::watch(shared.clone(), res, ns.map(str::to_string), &q, shape)
    } else {
        let shape = crate::watch::negotiate(accept, true)?;
        crate::watch::list(shared, res, ns, &q, shape)
    }
}

/// `gracePeriodSeconds` of a DELETE: from the `DeleteOptions` body if it has it, else the
/// query parameter.
async fn grace_period(
    query: Option<&str>,
    req: Request<hyper::body::Incoming>,
) -> Result<Option<i64>, ApiError> {
    let body = read_body(req.into_body()).await?;
    if !body.is_empty() {
        let opts: DeleteOptionsIn = decode(&body, "DeleteOptions")?;
        if opts.grace_period_seconds.is_some() {
            return Ok(opts.grace_period_seconds);
        }
    }
    for (k, v) in crate::watch::query_pairs(query) {
        if k == "gracePeriodSeconds" {
            return v.parse::<i64>().map(Some).map_err(|_| {
                ApiError::bad_request(format!("invalid value for gracePeriodSeconds: {v:?}"))
            });
        }
    }
    Ok(None)
}

#[derive(Debug, Default, Deserialize)]
struct DeleteOptionsIn {
    #[serde(rename = "gracePeriodSeconds", default)]
    grace_period_seconds: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct KeyIn {
    #[serde(default)]
    alg: Option<String>,
    /// Publish and sign at once (the old `add_signing_key`).
    #[serde(default)]
    sign: bool,
}

#[derive(Debug, Deserialize)]
struct ClockIn {
    advance_seconds: i64,
}

#[derive(Debug, Deserialize)]
struct ReaperIn {
    enabled: bool,
}

#[derive(Debug, Deserialize)]
struct HistoryIn {
    capacity: usize,
}

fn keys_json(shared: &Shared) -> serde_json::Value {
    let kids: Vec<String> = shared
        .cluster
        .keys()
        .iter()
        .map(|k| k.kid().to_string())
        .collect();
    json!({"keys": kids, "signing": shared.cluster.signing_kid()})
}

/// The body of a create (POST) of one namespaced core object, `(resource, namespace)`:
/// the caller needs the `create` verb, the body must decode as `kind`, and it must name
/// the object (422 otherwise). Returns the name and the decoded body.
async fn read_new_object(
    shared: &Shared,
    user: &UserInfo,
    (resource, ns): (&str, &str),
    kind: &str,
    req: Request<hyper::body::Incoming>,
) -> Result<(String, crate::protobuf::ObjectBody), ApiError> {
    authorize_resource(shared, user, "create", "", resource, "", Some(ns))?;
    let obj = read_object(req, kind).await?;
    let name = obj.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(required_name(kind, ""));
    }
    Ok((name, obj))
}

/// GET or DELETE of one namespaced core object, `(resource, namespace, name)`: any other
/// method is 405, answered before authorization; otherwise the caller needs the `get` or
/// `delete` verb, and an absent object is 404. Returns the object found or removed.
fn get_or_delete<T>(
    shared: &Shared,
    user: &UserInfo,
    method: &Method,
    (resource, ns, name): (&str, &str, &str),
    get: impl FnOnce(&Cluster) -> Option<T>,
    delete: impl FnOnce(&Cluster) -> Option<T>,
) -> Result<T, ApiError> {
    let found = match *method {
        Method::GET => {
            authorize_resource(shared, user, "get", "", resource, name, Some(ns))?;
            get(&shared.cluster)
        }
        Method::DELETE => {
            authorize_resource(shared, user, "delete", "", resource, name, Some(ns))?;
            delete(&shared.cluster)
        }
        _ => return Err(ApiError::method_not_allowed()),
    };
    found.ok_or_else(|| ApiError::not_found(resource, "", name))
}

fn required_name(kind: &str, group: &str) -> ApiError {
    let mut e = ApiError::invalid(
        kind,
        group,
        "",
        "metadata.name",
        "\"\"",
        "name or generateName is required",
    );
    e.status.message = format!(
        "{kind}{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
        if group.is_empty() {
            String::new()
        } else {
            format!(".{group}")
        }
    );
    if let Some(d) = e.status.details.as_mut() {
        for c in &mut d.causes {
            c.reason = "FieldValueRequired".to_string();
            c.message = "Required value: name or generateName is required".to_string();
        }
    }
    e
}

// ------------------------------------------------------------------ object JSON

#[derive(Debug, Default, Deserialize)]
struct MetaIn {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PodSpecIn {
    #[serde(rename = "serviceAccountName", default)]
    service_account_name: Option<String>,
    #[serde(rename = "nodeName", default)]
    node_name: Option<String>,
    #[serde(rename = "terminationGracePeriodSeconds", default)]
    termination_grace_seconds: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct ObjectIn {
    #[serde(default)]
    metadata: MetaIn,
    #[serde(default)]
    spec: Option<PodSpecIn>,
}

// ------------------------------------------------------------------ faults

#[derive(Debug, Deserialize)]
struct FaultIn {
    kind: String,
    #[serde(default)]
    ms: Option<u64>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    retry_after: Option<u32>,
}

impl FaultIn {
    fn into_fault(self) -> Result<Fault, ApiError> {
        Ok(match self.kind.as_str() {
            "none" => Fault::None,
            "latency" => Fault::Latency(std::time::Duration::from_millis(self.ms.unwrap_or(0))),
            "status" => {
                let code = self
                    .code
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| ApiError::bad_request("fault: code must be 100..=599".into()))?;
                Fault::Status {
                    code,
                    retry_after: self.retry_after,
                }
            }
            "hang" => Fault::Hang,
            "close" => Fault::CloseConnection,
            other => {
                return Err(ApiError::bad_request(format!(
                    "fault: unknown kind {other:?} (none|latency|status|hang|close|down)"
                )))
            }
        })
    }
}

/// Applies the current fault. `Ok(None)` means "go on serving".
pub(crate) async fn apply_fault(shared: &Shared) -> Result<Option<Resp>, CloseConnection> {
    match shared.fault() {
        Fault::None => Ok(None),
        Fault::Latency(d) => {
            tokio::time::sleep(d).await;
            Ok(None)
        }
        Fault::Status { code, retry_after } => {
            Ok(Some(error_resp(&ApiError::injected(code, retry_after))))
        }
        Fault::StatusRetryAt { code, after } => {
            let mut r = error_resp(&ApiError::injected(code, None));
            let at = httpdate::fmt_http_date(std::time::SystemTime::now() + after);
            if let Ok(v) = HeaderValue::from_str(&at) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Ok(Some(r))
        }
        Fault::Hang => {
            std::future::pending::<()>().await;
            Ok(None)
        }
        Fault::CloseConnection | Fault::Down => Err(CloseConnection),
    }
}

// ------------------------------------------------------------------ TokenReview

#[derive(Debug, Default, Deserialize, Serialize)]
struct ReviewSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    token: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    audiences: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ReviewIn {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: MetaIn,
    #[serde(default)]
    spec: ReviewSpec,
}

#[derive(Debug, Serialize)]
struct ReviewMeta {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(rename = "creationTimestamp", skip_serializing_if = "Option::is_none")]
    creation_timestamp: Option<()>,
}

#[derive(Debug, Serialize)]
struct ReviewStatus {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    authenticated: bool,
    user: UserInfo,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    audiences: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

#[derive(Debug, Serialize)]
struct ReviewOut {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: ReviewMeta,
    spec: ReviewSpec,
    status: ReviewStatus,
}

async fn token_review(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, CloseConnection> {
    shared.reviews.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = apply_fault(&shared).await? {
        return Ok(r);
    }
    Ok(match token_review_inner(&shared, req).await {
        Ok(r) => r,
        Err(e) => error_resp(&e),
    })
}

async fn token_review_inner(
    shared: &Shared,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, ApiError> {
    let user = authenticate_caller(shared, &req)?;
    authorize_resource(
        shared,
        &user,
        "create",
        "authentication.k8s.io",
        "tokenreviews",
        "",
        None,
    )?;
    require_json(&req)?;
    let body = read_body(req.into_body()).await?;
    let review: ReviewIn = decode(&body, "TokenReview")?;
    check_type(
        &review.api_version,
        &review.kind,
        "authentication.k8s.io/v1",
        "TokenReview",
    )?;
    if review.spec.token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication".to_string(),
        ));
    }
    let outcome = shared
        .cluster
        .authenticate(&review.spec.token, &review.spec.audiences);
    let status = match outcome {
        AuthOutcome::Authenticated { user, audiences } => ReviewStatus {
            authenticated: true,
            user,
            audiences,
            error: String::new(),
        },
        AuthOutcome::Failed(error) => ReviewStatus {
            authenticated: false,
            user: UserInfo::default(),
            audiences: Vec::new(),
            error,
        },
    };
    let out = ReviewOut {
        kind: "TokenReview",
        api_version: "authentication.k8s.io/v1",
        metadata: ReviewMeta {
            name: review.metadata.name.filter(|s| !s.is_empty()),
            namespace: review.metadata.namespace.filter(|s| !s.is_empty()),
            creation_timestamp: match shared.cluster.cfg.metadata_style {
                MetadataStyle::V133 => None,
                MetadataStyle::PreV133 => Some(()),
            },
        },
        spec: review.spec,
        status,
    };
    Ok(json_resp(201, &out))
}

/// Rejects a body whose `apiVersion`/`kind` name another type (empty ones are defaulted).
pub(crate) fn check_type(
    api_version: &str,
    kind: &str,
    want_av: &str,
    want_kind: &str,
) -> Result<(), ApiError> {
    if !api_version.is_empty() && api_version != want_av {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({want_av})"
        )));
    }
    if !kind.is_empty() && kind != want_kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({want_kind})"
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------ TokenRequest

#[derive(Debug, Default, Deserialize)]
struct TokenRequestSpecIn {
    #[serde(default)]
    audiences: Option<Vec<String>>,
    #[serde(rename = "expirationSeconds", default)]
    expiration_seconds: Option<i64>,
    #[serde(rename = "boundObjectRef", default)]
    bound_object_ref: Option<BoundObjectRef>,
}

#[derive(Debug, Default, Deserialize)]
struct TokenRequestIn {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: MetaIn,
    #[serde(default)]
    spec: TokenRequestSpecIn,
}

/// A decoded TokenRequest body, from JSON or protobuf.
#[derive(Debug, Default)]
pub struct TokenRequestBody {
    /// `metadata.name`.
    pub name: Option<String>,
    /// `metadata.namespace`.
    pub namespace: Option<String>,
    /// `spec.audiences`.
    pub audiences: Vec<String>,
    /// `spec.expirationSeconds`.
    pub expiration_seconds: Option<i64>,
    /// `spec.boundObjectRef`.
    pub bound: Option<BoundObjectRef>,
}

#[derive(Debug, Serialize)]
struct TokenRequestOut {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: TokenRequestMeta,
    spec: TokenRequestSpecOut,
    status: TokenRequestStatusOut,
}

#[derive(Debug, Serialize)]
struct TokenRequestMeta {
    name: String,
    namespace: String,
    #[serde(rename = "creationTimestamp")]
    creation_timestamp: String,
}

#[derive(Debug, Serialize)]
struct TokenRequestSpecOut {
    audiences: Vec<String>,
    #[serde(rename = "expirationSeconds")]
    expiration_seconds: i64,
    #[serde(rename = "boundObjectRef")]
    bound_object_ref: Option<BoundObjectRef>,
}

#[derive(Debug, Serialize)]
struct TokenRequestStatusOut {
    token: String,
    #[serde(rename = "expirationTimestamp")]
    expiration_timestamp: String,
}

async fn token_request(
    shared: &Shared,
    user: &UserInfo,
    ns: &str,
    name: &str,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, ApiError> {
    authorize_resource(
        shared,
        user,
        "create",
        "",
        "serviceaccounts/token",
        name,
        Some(ns),
    )?;
    let is_proto = is_protobuf(&req);
    if !is_proto {
        require_json(&req)?;
    }
    let body = read_body(req.into_body()).await?;
    let parsed = if is_proto {
        crate::protobuf::decode_token_request(&body).map_err(|e| {
            ApiError::bad_request(format!("failed to decode protobuf TokenRequest: {e}"))
        })?
    } else {
        let tr: TokenRequestIn = decode(&body, "TokenRequest")?;
        check_type(
            &tr.api_version,
            &tr.kind,
            "authentication.k8s.io/v1",
            "TokenRequest",
        )?;
        TokenRequestBody {
            name: tr.metadata.name,
            namespace: tr.metadata.namespace,
            audiences: tr.spec.audiences.unwrap_or_default(),
            expiration_seconds: tr.spec.expiration_seconds,
            bound: tr.spec.bound_object_ref,
        }
    };
    let bound = parsed.bound.clone();
    let spec = IssueSpec {
        meta_name: parsed.name,
        meta_namespace: parsed.namespace,
        namespace: ns.to_string(),
        service_account: name.to_string(),
        audiences: parsed.audiences,
        expiration_seconds: parsed.expiration_seconds,
        bound: parsed.bound,
        issued_at: None,
    };
    let issued = shared.cluster.issue(&spec)?;
    Ok(json_resp(201, &token_request_out(ns, name, bound, issued)))
}

fn token_request_out(
    ns: &str,
    name: &str,
    bound: Option<BoundObjectRef>,
    issued: Issued,
) -> TokenRequestOut {
    TokenRequestOut {
        kind: "TokenRequest",
        api_version: "authentication.k8s.io/v1",
        metadata: TokenRequestMeta {
            name: name.to_string(),
            namespace: ns.to_string(),
            creation_timestamp: rfc3339(issued.now),
        },
        spec: TokenRequestSpecOut {
            audiences: issued.audiences,
            expiration_seconds: issued.expiration_seconds,
            bound_object_ref: bound,
        },
        status: TokenRequestStatusOut {
            token: issued.token,
            expiration_timestamp: rfc3339(issued.expiration_timestamp),
        },
    }
}

// ------------------------------------------------------------------ OIDC discovery

#[derive(Debug, Serialize)]
struct Jwks {
    keys: Vec<crate::keys::Jwk>,
}

#[derive(Debug, Serialize)]
struct OidcConfig {
    issuer: String,
    jwks_uri: String,
    response_types_supported: [&'static str; 1],
    subject_types_supported: [&'static str; 1],
    id_token_signing_alg_values_supported: Vec<&'static str>,
}

fn oidc(shared: &Shared, user: &UserInfo, path: &str, jwks: bool) -> Result<Resp, ApiError> {
    let issuer = &shared.cluster.cfg.issuer;
    // Installed only for an https issuer without query or fragment.
    if !issuer.starts_with("https://") || issuer.contains('?') || issuer.contains('#') {
        return Ok(not_found_page());
    }
    authorize_path(shared, user, path)?;
    let keys = shared.cluster.keys();
    let (ct, body) = if jwks {
        let jwks: Vec<_> = keys.iter().map(|k| k.jwk()).collect();
        (
            "application/jwk-set+json",
            serde_json::to_vec(&Jwks { keys: jwks }),
        )
    } else {
        let mut algs: Vec<&'static str> = keys.iter().map(|k| k.alg_name()).collect();
        algs.sort_unstable();
        algs.dedup();
        let cfg = OidcConfig {
            issuer: issuer.clone(),
            jwks_uri: format!("{}/openid/v1/jwks", shared.url),
            response_types_supported: ["id_token"],
            subject_types_supported: ["public"],
            id_token_signing_alg_values_supported: algs,
        };
        ("application/json", serde_json::to_vec(&cfg))
    };
    let body = body.map_err(|e| ApiError::internal(&e.to_string()))?;
    let mut r = respond(200, ct, body);
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    Ok(r)
}

/// Mints through the TokenRequest code path and renders the response object, for
/// [`crate::Standin::mint`].
pub fn issue(shared: &Shared, spec: &IssueSpec) -> Result<Issued, ApiError> {
    shared.cluster.issue(spec)
}
