//! The HTTP side of RBAC: `rbac.authorization.k8s.io/v1` Roles, ClusterRoles, RoleBindings
//! and ClusterRoleBindings (create, get, list, delete; JSON or kubectl's protobuf), and
//! `authorization.k8s.io/v1` SubjectAccessReview, answered by [`crate::rbac`] as
//! kube-apiserver's authorizer chain would (`pkg/registry/authorization/subjectaccessreview`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Method, Request};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::api::{
    apply_fault, authenticate_caller, authorize_resource, check_type, decode, error_resp,
    is_protobuf, json_resp, read_body, require_json, CloseConnection, Resp, Shared,
};
use crate::cluster::{Attributes, Kind, RbacObject, UserInfo};
use crate::rbac::{Binding, Role, GROUP};
use crate::status::ApiError;

/// The kind served at `resource`, or 404.
pub fn rbac_kind(resource: &str) -> Result<Kind, ApiError> {
    Kind::from_resource(resource).ok_or_else(|| ApiError::not_found(resource, GROUP, ""))
}

/// `POST` of a new object: the caller needs `create`; the body (JSON, or protobuf as kubectl
/// sends it) must name the object, in the URL's namespace if it gives one.
pub async fn rbac_create(
    shared: &Shared,
    user: &UserInfo,
    kind: Kind,
    ns: Option<&str>,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, ApiError> {
    authorize_resource(shared, user, "create", GROUP, kind.resource(), "", ns)?;
    let proto = is_protobuf(&req);
    if !proto {
        require_json(&req)?;
    }
    let body = read_body(req.into_body()).await?;
    let mut obj = if proto {
        crate::protobuf::decode_rbac(&body, kind).map_err(|e| {
            ApiError::bad_request(format!("failed to decode protobuf {}: {e}", kind.kind()))
        })?
    } else {
        let (av, k) = type_of(&body);
        check_type(&av, &k, &format!("{GROUP}/v1"), kind.kind())?;
        match kind {
            Kind::Role | Kind::ClusterRole => RbacObject::Role(decode::<Role>(&body, kind.kind())?),
            Kind::RoleBinding | Kind::ClusterRoleBinding => {
                RbacObject::Binding(decode::<Binding>(&body, kind.kind())?)
            }
        }
    };
    let meta = match &mut obj {
        RbacObject::Role(r) => &mut r.metadata,
        RbacObject::Binding(b) => &mut b.metadata,
    };
    if meta.name.is_empty() {
        return Err(ApiError::invalid(
            kind.kind(),
            GROUP,
            "",
            "metadata.name",
            "\"\"",
            "name or generateName is required",
        ));
    }
    if let Some(ns) = ns {
        if !meta.namespace.is_empty() && meta.namespace != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
                    .to_string(),
            ));
        }
        meta.namespace = ns.to_string();
        shared.cluster.ensure_namespace(ns);
    }
    let name = meta.name.clone();
    if let RbacObject::Binding(b) = &obj {
        let allowed: &[&str] = match kind {
            Kind::RoleBinding => &["Role", "ClusterRole"],
            _ => &["ClusterRole"],
        };
        if !allowed.contains(&b.role_ref.kind.as_str()) {
            return Err(ApiError::invalid(
                kind.kind(),
                GROUP,
                &name,
                "roleRef.kind",
                &crate::status::go_quote(&b.role_ref.kind),
                &format!(
                    "supported values: {}",
                    allowed
                        .iter()
                        .map(|k| format!("\"{k}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if b.role_ref.name.is_empty() {
            return Err(ApiError::invalid(
                kind.kind(),
                GROUP,
                &name,
                "roleRef.name",
                "\"\"",
                "Required value",
            ));
        }
    }
    match shared.cluster.rbac_create(kind, obj) {
        Some(created) => Ok(json_resp(201, &created.to_json(kind))),
        None => Err(ApiError::already_exists(kind.resource(), GROUP, &name)),
    }
}

/// `GET` of a list, with `fieldSelector` on `metadata.name` / `metadata.namespace` (what
/// `kubectl delete --wait` and `kubectl get` send).
pub fn rbac_list(
    shared: &Shared,
    user: &UserInfo,
    kind: Kind,
    ns: Option<&str>,
    query: Option<&str>,
) -> Result<Resp, ApiError> {
    authorize_resource(shared, user, "list", GROUP, kind.resource(), "", ns)?;
    let mut want: Vec<(String, String)> = Vec::new();
    for (k, v) in crate::watch::query_pairs(query) {
        match k.as_str() {
            "watch" if v == "true" || v == "1" => {
                return Err(ApiError::bad_request(format!(
                    "watch is not supported for {} by this stand-in",
                    kind.resource()
                )))
            }
            "fieldSelector" => {
                for term in v.split(',').filter(|t| !t.is_empty()) {
                    let (f, val) = term
                        .split_once("==")
                        .or_else(|| term.split_once('='))
                        .unwrap_or((term, ""));
                    if f != "metadata.name" && f != "metadata.namespace" {
                        return Err(ApiError::bad_request(format!(
                            "\"{f}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
                        )));
                    }
                    want.push((f.to_string(), val.to_string()));
                }
            }
            _ => {}
        }
    }
    let (objects, rv) = shared.cluster.rbac_list(kind, ns);
    let items: Vec<serde_json::Value> = objects
        .iter()
        .filter(|o| {
            let m = o.meta();
            want.iter().all(|(f, v)| match f.as_str() {
                "metadata.name" => m.name == *v,
                _ => m.namespace == *v,
            })
        })
        .map(|o| {
            let mut v = o.to_json(kind);
            if let Some(m) = v.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            v
        })
        .collect();
    Ok(json_resp(
        200,
        &json!({"kind": format!("{}List", kind.kind()), "apiVersion": format!("{GROUP}/v1"),
                "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    ))
}

/// `GET` or `DELETE` of one object.
pub fn rbac_one(
    shared: &Shared,
    user: &UserInfo,
    method: &Method,
    kind: Kind,
    ns: Option<&str>,
    name: &str,
) -> Result<Resp, ApiError> {
    let ns_str = ns.unwrap_or("");
    match *method {
        Method::GET => {
            authorize_resource(shared, user, "get", GROUP, kind.resource(), name, ns)?;
            shared
                .cluster
                .rbac_get(kind, ns_str, name)
                .map(|o| json_resp(200, &o.to_json(kind)))
                .ok_or_else(|| ApiError::not_found(kind.resource(), GROUP, name))
        }
        Method::DELETE => {
            authorize_resource(shared, user, "delete", GROUP, kind.resource(), name, ns)?;
            let gone = shared
                .cluster
                .rbac_delete(kind, ns_str, name)
                .ok_or_else(|| ApiError::not_found(kind.resource(), GROUP, name))?;
            Ok(json_resp(
                200,
                &json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success",
                    "details":{"name":name,"group":GROUP,"kind":kind.resource(),"uid":gone.meta().uid}}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn type_of(body: &[u8]) -> (String, String) {
    #[derive(Deserialize, Default)]
    struct TypeMeta {
        #[serde(rename = "apiVersion", default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    let t: TypeMeta = serde_json::from_slice(body).unwrap_or_default();
    (t.api_version, t.kind)
}

// ------------------------------------------------------------------ SubjectAccessReview

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceAttributes {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    verb: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    resource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    subresource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
struct NonResourceAttributes {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    verb: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct SarSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resource_attributes: Option<ResourceAttributes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    non_resource_attributes: Option<NonResourceAttributes>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    user: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    extra: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    uid: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SarIn {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    spec: SarSpec,
}

#[derive(Debug, Serialize)]
struct SarStatus {
    allowed: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    denied: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
}

/// `POST /apis/authorization.k8s.io/v1/subjectaccessreviews`: counted, then faults as for
/// TokenReview, then the caller's `create subjectaccessreviews`, validation (422), and the
/// decision for the user in `spec`. 201 with the review and its `status`.
pub async fn subject_access_review(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, CloseConnection> {
    shared.access_reviews.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = apply_fault(&shared).await? {
        return Ok(r);
    }
    Ok(match sar_inner(&shared, req).await {
        Ok(r) => r,
        Err(e) => error_resp(&e),
    })
}

async fn sar_inner(shared: &Shared, req: Request<hyper::body::Incoming>) -> Result<Resp, ApiError> {
    const AUTHZ: &str = "authorization.k8s.io";
    let caller = authenticate_caller(shared, &req)?;
    authorize_resource(
        shared,
        &caller,
        "create",
        AUTHZ,
        "subjectaccessreviews",
        "",
        None,
    )?;
    require_json(&req)?;
    let body = read_body(req.into_body()).await?;
    let sar: SarIn = decode(&body, "SubjectAccessReview")?;
    check_type(
        &sar.api_version,
        &sar.kind,
        "authorization.k8s.io/v1",
        "SubjectAccessReview",
    )?;
    let spec = sar.spec;
    // ValidateSubjectAccessReviewSpec, in its order.
    let invalid = |field: &str, value: &str, detail: &str| {
        ApiError::invalid("SubjectAccessReview", AUTHZ, "", field, value, detail)
    };
    match (&spec.resource_attributes, &spec.non_resource_attributes) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "spec.nonResourceAttributes",
                "{}",
                "cannot be specified in combination with resourceAttributes",
            ))
        }
        (None, None) => {
            return Err(invalid(
                "spec.resourceAttributes",
                "null",
                "exactly one of nonResourceAttributes or resourceAttributes must be specified",
            ))
        }
        _ => {}
    }
    if spec.user.is_empty() && spec.groups.is_empty() {
        return Err(invalid(
            "spec.user",
            "\"\"",
            "at least one of user or group must be specified",
        ));
    }
    let user = UserInfo {
        username: spec.user.clone(),
        uid: spec.uid.clone(),
        groups: spec.groups.clone(),
        extra: spec.extra.clone(),
    };
    let decision = if let Some(r) = &spec.resource_attributes {
        let combined = if r.subresource.is_empty() {
            r.resource.clone()
        } else {
            format!("{}/{}", r.resource, r.subresource)
        };
        let attrs = Attributes::Resource {
            verb: &r.verb,
            group: &r.group,
            resource: &combined,
            name: &r.name,
            namespace: Some(r.namespace.as_str()).filter(|n| !n.is_empty()),
        };
        shared.cluster.authorize_decision(&user, &attrs)
    } else {
        let n = spec.non_resource_attributes.clone().unwrap_or_default();
        let attrs = Attributes::NonResource {
            verb: &n.verb,
            path: &n.path,
        };
        shared.cluster.authorize_decision(&user, &attrs)
    };
    let metadata = match shared.cluster.cfg.metadata_style {
        crate::MetadataStyle::V133 => json!({}),
        crate::MetadataStyle::PreV133 => json!({"creationTimestamp": null}),
    };
    Ok(json_resp(
        201,
        &json!({
            "kind": "SubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": metadata,
            "spec": spec,
            "status": SarStatus { allowed: decision.allowed, denied: false, reason: decision.reason },
        }),
    ))
}
