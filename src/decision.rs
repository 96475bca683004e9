//! Turns a Check's [`Outcome`] into Envoy's answer: a `CheckResponse` (OK with identity
//! headers, or a denial with status, reason header and JSON body), or the gRPC `UNAVAILABLE`
//! used when the API server cannot answer.
//!
//! Identity headers are set with `append: false` *and* `append_action:
//! OVERWRITE_IF_EXISTS_OR_ADD`: Envoy versions disagree on which field wins and on the
//! default (ext-authz.md §4.2), and with both set a client-sent copy is overwritten on every
//! version. Identity headers that do not apply to this caller (no pod, no uid) go in
//! `headers_to_remove`, so a client can never smuggle them through; the set and remove lists
//! never overlap, because older Envoys apply removals last.
//!
//! An allow also carries the identity as Envoy dynamic metadata ([`METADATA_KEYS`], under
//! the filter's namespace `envoy.filters.http.ext_authz`), for access logs
//! (`%DYNAMIC_METADATA(envoy.filters.http.ext_authz:user)%`) and rate-limit descriptors. A
//! `mode: audit` route's would-be denial is an OK without identity: every identity header
//! removed, [`AUDIT_HEADER`] naming the reason, and `audit_reason` in the metadata.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, BoolValue, Struct, Value};
use envoy_types::pb::google::rpc;

use crate::check::Outcome;
use crate::config::{IdentityHeaders, Mode, TokenSource};
use crate::denial::Denial;
use crate::error::Report;
use crate::identity::Identity;
use crate::route::Route;

/// Header carrying the denial reason code.
pub const REASON_HEADER: &str = "x-tokengate-reason";
/// Header telling the upstream, on a `mode: audit` route, which denial was not enforced.
pub const AUDIT_HEADER: &str = "x-tokengate-audit";
/// Dynamic metadata keys of an allow: the identity, and the tokengate route. Optional ones
/// (`uid`, `pod`, `pod_uid`) are absent when they do not apply; a would-be denial on an
/// audit route carries only `route` and `audit_reason`.
pub const METADATA_KEYS: [&str; 7] = [
    "user",
    "namespace",
    "service_account",
    "uid",
    "pod",
    "pod_uid",
    "route",
];

/// RFC 6750 challenge for a missing token.
pub const CHALLENGE: &str = r#"Bearer realm="tokengate""#;
/// RFC 6750 challenge for an invalid token (routes with `invalid_token_status: 401`).
pub const CHALLENGE_INVALID: &str = r#"Bearer realm="tokengate", error="invalid_token""#;

const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// Builds responses; holds the configured header names.
#[derive(Debug, Clone)]
pub struct Responder {
    names: IdentityHeaders,
}

/// A header set to exactly `value`, replacing anything the client sent.
#[allow(deprecated)] // `append` is deprecated but older Envoys read only it.
fn overwrite(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            ..Default::default()
        }),
        append: Some(BoolValue { value: false }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

impl Responder {
    /// A responder for these identity header names.
    pub fn new(names: &IdentityHeaders) -> Responder {
        Responder {
            names: names.clone(),
        }
    }

    /// Envoy's answer to a Check: a CheckResponse for every allow and deny, gRPC UNAVAILABLE
    /// when the API server could not answer.
    pub fn respond(&self, outcome: &Outcome<'_>) -> Result<CheckResponse, tonic::Status> {
        match outcome {
            Outcome::Allow {
                route,
                identity,
                source,
            } => Ok(self.allow(identity, route, source)),
            Outcome::Deny { route, denial } => Ok(self.deny(*denial, *route)),
            Outcome::Audited {
                route,
                denial,
                source,
                ..
            } => Ok(self.audited(*denial, route, *source)),
            Outcome::Unavailable { error, .. } => Err(unavailable(&Report(error))),
        }
    }

    /// OK, with the caller's identity in headers. `token_source` is where the token was found
    /// (its header is removed when the route strips tokens).
    pub fn allow(&self, id: &Identity, route: &Route, token_source: &TokenSource) -> CheckResponse {
        let mut headers = Vec::with_capacity(7);
        let mut remove = Vec::new();
        for (name, value) in self.identity(id) {
            match value {
                Some(v) => headers.push(overwrite(name, v)),
                None => remove.push(name.to_owned()),
            }
        }
        if route.strip_token {
            remove.push(token_source.header.clone());
        }
        if route.mode == Mode::Audit {
            remove.push(AUDIT_HEADER.to_owned());
        }
        let [user, namespace, service_account, uid, pod, pod_uid, route_key] = METADATA_KEYS;
        let metadata = [
            (user, Some(&id.username)),
            (namespace, Some(&id.namespace)),
            (service_account, Some(&id.name)),
            (uid, id.uid.as_ref()),
            (pod, id.pod_name.as_ref()),
            (pod_uid, id.pod_uid.as_ref()),
            (route_key, Some(&route.name)),
        ];
        ok(headers, remove, metadata)
    }

    /// A would-be denial on a `mode: audit` route: OK, every identity header removed (client
    /// copies included), the reason in [`AUDIT_HEADER`] and the metadata's `audit_reason`.
    pub fn audited(
        &self,
        denial: Denial,
        route: &Route,
        token_source: Option<&TokenSource>,
    ) -> CheckResponse {
        let mut remove: Vec<String> = self.names().map(str::to_owned).collect();
        if let Some(source) = token_source.filter(|_| route.strip_token) {
            remove.push(source.header.clone());
        }
        let reason = denial.code().to_owned();
        ok(
            vec![overwrite(AUDIT_HEADER, reason.clone())],
            remove,
            [
                ("route", Some(&route.name)),
                ("audit_reason", Some(&reason)),
            ],
        )
    }

    /// The configured identity header names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let n = &self.names;
        [
            &n.user,
            &n.namespace,
            &n.name,
            &n.uid,
            &n.groups,
            &n.pod_name,
            &n.pod_uid,
        ]
        .into_iter()
        .map(String::as_str)
    }

    /// The identity headers for `id`, in a fixed order: `(name, Some(value))` to set,
    /// `(name, None)` for the optional ones that do not apply to this caller (to remove, so a
    /// client-sent copy never survives). Shared by the gRPC answer and [`crate::http`].
    pub fn identity<'n>(&'n self, id: &Identity) -> [(&'n str, Option<String>); 7] {
        let n = &self.names;
        [
            (&n.user, Some(id.username.clone())),
            (&n.namespace, Some(id.namespace.clone())),
            (&n.name, Some(id.name.clone())),
            (&n.uid, id.uid.clone()),
            (
                &n.groups,
                (!id.groups.is_empty()).then(|| id.groups.join(",")),
            ),
            (&n.pod_name, id.pod_name.clone()),
            (&n.pod_uid, id.pod_uid.clone()),
        ]
    }

    /// A denial; `route` decides 401 vs 403 for invalid tokens (403 without a route).
    pub fn deny(&self, denial: Denial, route: Option<&Route>) -> CheckResponse {
        deny(denial, route.map_or(403, |r| r.invalid_token_status))
    }
}

/// An OK answer: `headers` set, `remove` removed, `metadata` (the present values) as dynamic
/// metadata.
fn ok<const N: usize>(
    headers: Vec<HeaderValueOption>,
    remove: Vec<String>,
    metadata: [(&str, Option<&String>); N],
) -> CheckResponse {
    let fields = metadata
        .into_iter()
        .filter_map(|(k, v)| {
            let value = Value {
                kind: Some(Kind::StringValue(v?.clone())),
            };
            Some((k.to_owned(), value))
        })
        .collect();
    CheckResponse {
        status: Some(rpc::Status {
            code: GRPC_OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: remove,
            ..Default::default()
        })),
        dynamic_metadata: Some(Struct { fields }),
    }
}

/// What a denial says, whatever the protocol: HTTP status, JSON body, and the
/// `WWW-Authenticate` challenge on 401. Shared by the gRPC answer and [`crate::http`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenialParts {
    /// 401 or 403.
    pub status: u16,
    /// `{"error": ..., "reason": ...}`.
    pub body: String,
    /// RFC 6750 challenge, on 401 only.
    pub challenge: Option<&'static str>,
}

impl DenialParts {
    /// The parts of `denial` for a route answering `invalid_token_status` to invalid tokens.
    pub fn new(denial: Denial, invalid_token_status: u16) -> DenialParts {
        let status = denial.http_status(invalid_token_status);
        let body = serde_json::json!({ "error": denial.to_string(), "reason": denial.code() });
        let challenge = (status == 401).then_some(if denial == Denial::MissingToken {
            CHALLENGE
        } else {
            CHALLENGE_INVALID
        });
        DenialParts {
            status,
            body: body.to_string(),
            challenge,
        }
    }
}

/// A denial with the given status for invalid tokens.
pub fn deny(denial: Denial, invalid_token_status: u16) -> CheckResponse {
    let DenialParts {
        status,
        body,
        challenge,
    } = DenialParts::new(denial, invalid_token_status);
    let mut headers = vec![
        overwrite("content-type", "application/json".to_owned()),
        overwrite(REASON_HEADER, denial.code().to_owned()),
    ];
    if let Some(challenge) = challenge {
        headers.push(overwrite("www-authenticate", challenge.to_owned()));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: if status == 401 {
                GRPC_UNAUTHENTICATED
            } else {
                GRPC_PERMISSION_DENIED
            },
            message: denial.code().to_owned(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body,
        })),
        ..Default::default()
    }
}

/// The API server could not answer: a gRPC error, so Envoy applies `status_on_error` /
/// `failure_mode_allow` as the operator chose. Never an allow, never a 401.
pub fn unavailable(detail: &dyn std::fmt::Display) -> tonic::Status {
    tonic::Status::unavailable(format!("token review unavailable: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::route::Routes;

    fn setup(strip: bool) -> (Responder, Routes, Vec<TokenSource>) {
        let yaml = format!(
            "token_sources:\n  - header: authorization\n    scheme: Bearer\n  - header: x-client-id\nroutes:\n  - name: r\n    audiences: [a]\n    strip_token: {strip}\n"
        );
        let c = Config::from_yaml_str(&yaml).unwrap();
        (
            Responder::new(&c.identity_headers),
            Routes::new(&c.routes),
            c.token_sources,
        )
    }

    fn id(pod: bool) -> Identity {
        Identity {
            username: "system:serviceaccount:default:api".into(),
            namespace: "default".into(),
            name: "api".into(),
            uid: Some("u".into()),
            groups: vec!["g1".into(), "g2".into()],
            pod_name: pod.then(|| "p".into()),
            pod_uid: pod.then(|| "pu".into()),
            extra: Default::default(),
        }
    }

    fn ok(r: &CheckResponse) -> &OkHttpResponse {
        match &r.http_response {
            Some(HttpResponse::OkResponse(ok)) => ok,
            other => panic!("not ok: {other:?}"),
        }
    }

    #[test]
    #[allow(deprecated)]
    fn allow_sets_both_append_fields_and_removes_absent() {
        let (resp, routes, sources) = setup(false);
        let route = routes.iter().next().unwrap();
        let r = resp.allow(&id(false), route, &sources[1]);
        assert_eq!(r.status.as_ref().unwrap().code, 0);
        let ok = ok(&r);
        for h in &ok.headers {
            assert_eq!(h.append, Some(BoolValue { value: false }));
            assert_eq!(
                h.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            );
        }
        let get = |k: &str| {
            ok.headers
                .iter()
                .find(|h| h.header.as_ref().unwrap().key == k)
                .map(|h| h.header.as_ref().unwrap().value.as_str())
        };
        assert_eq!(
            get("x-k8s-sa-user"),
            Some("system:serviceaccount:default:api")
        );
        assert_eq!(get("x-k8s-sa-groups"), Some("g1,g2"));
        assert_eq!(get("x-k8s-pod-name"), None);
        assert_eq!(
            ok.headers_to_remove,
            vec!["x-k8s-pod-name", "x-k8s-pod-uid"]
        );
    }

    #[test]
    fn strip_token_removes_its_header() {
        let (resp, routes, sources) = setup(true);
        let route = routes.iter().next().unwrap();
        let r = resp.allow(&id(true), route, &sources[1]);
        assert_eq!(ok(&r).headers_to_remove, vec!["x-client-id"]);
    }

    fn denied(r: &CheckResponse) -> &DeniedHttpResponse {
        match &r.http_response {
            Some(HttpResponse::DeniedResponse(d)) => d,
            other => panic!("not denied: {other:?}"),
        }
    }

    fn header<'a>(d: &'a DeniedHttpResponse, k: &str) -> Option<&'a str> {
        d.headers
            .iter()
            .find(|h| h.header.as_ref().unwrap().key == k)
            .map(|h| h.header.as_ref().unwrap().value.as_str())
    }

    #[test]
    fn missing_token_is_401_with_challenge() {
        let r = deny(Denial::MissingToken, 403);
        assert_eq!(r.status.as_ref().unwrap().code, GRPC_UNAUTHENTICATED);
        let d = denied(&r);
        assert_eq!(d.status.as_ref().unwrap().code, 401);
        assert_eq!(header(d, "www-authenticate"), Some(CHALLENGE));
        assert_eq!(header(d, REASON_HEADER), Some("missing_token"));
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["reason"], "missing_token");
        assert!(body["error"].is_string());
    }

    #[test]
    fn invalid_token_403_or_401() {
        let d403 = deny(Denial::TokenRejected, 403);
        let d = denied(&d403);
        assert_eq!(d.status.as_ref().unwrap().code, 403);
        assert_eq!(header(d, "www-authenticate"), None);
        let d401 = deny(Denial::TokenRejected, 401);
        let d = denied(&d401);
        assert_eq!(d.status.as_ref().unwrap().code, 401);
        assert_eq!(header(d, "www-authenticate"), Some(CHALLENGE_INVALID));
        let na = deny(Denial::NotAllowed, 401);
        assert_eq!(denied(&na).status.as_ref().unwrap().code, 403);
    }

    /// tokengate's own mapping: an API server that cannot answer is gRPC UNAVAILABLE (so
    /// Envoy's `status_on_error` / `failure_mode_allow` decide), never a CheckResponse, and
    /// the message carries the cause.
    #[test]
    fn unavailable_is_grpc_unavailable() {
        let (resp, routes, _) = setup(false);
        let route = routes.iter().next().unwrap();
        let cause = std::io::Error::other("certificate signed by unknown authority");
        let outcome = Outcome::Unavailable {
            route,
            error: crate::review::ReviewError::Connect(std::sync::Arc::new(cause)),
        };
        let status = resp.respond(&outcome).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("unknown authority"),
            "{}",
            status.message()
        );
        let timeout = Outcome::Unavailable {
            route,
            error: crate::review::ReviewError::Timeout,
        };
        assert_eq!(
            resp.respond(&timeout).unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn outcomes_map_to_responses() {
        let (resp, routes, sources) = setup(true);
        let route = routes.iter().next().unwrap();
        let allow = Outcome::Allow {
            route,
            identity: std::sync::Arc::new(id(true)),
            source: &sources[0],
        };
        let r = resp.respond(&allow).unwrap();
        assert_eq!(ok(&r).headers_to_remove, vec!["authorization"]);
        let deny = Outcome::Deny {
            route: None,
            denial: Denial::BadRequest,
        };
        let r = resp.respond(&deny).unwrap();
        assert_eq!(denied(&r).status.as_ref().unwrap().code, 403);
        assert_eq!(header(denied(&r), REASON_HEADER), Some("bad_request"));
    }

    fn metadata(r: &CheckResponse) -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = r
            .dynamic_metadata
            .as_ref()
            .expect("dynamic metadata")
            .fields
            .iter()
            .map(|(k, v)| match &v.kind {
                Some(Kind::StringValue(s)) => (k.clone(), s.clone()),
                other => panic!("{k}: {other:?}"),
            })
            .collect();
        m.sort();
        m
    }

    #[test]
    fn allow_carries_the_identity_as_dynamic_metadata() {
        let (resp, routes, sources) = setup(false);
        let route = routes.iter().next().unwrap();
        let r = resp.allow(&id(true), route, &sources[0]);
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            metadata(&r),
            pairs(&[
                ("namespace", "default"),
                ("pod", "p"),
                ("pod_uid", "pu"),
                ("route", "r"),
                ("service_account", "api"),
                ("uid", "u"),
                ("user", "system:serviceaccount:default:api"),
            ])
        );
        let r = resp.allow(&id(false), route, &sources[0]);
        assert!(metadata(&r)
            .iter()
            .all(|(k, _)| k != "pod" && k != "pod_uid"));
        // Not an audit route: nothing about audits.
        assert!(!ok(&r).headers_to_remove.contains(&AUDIT_HEADER.to_owned()));
    }

    #[test]
    fn audited_passes_without_any_identity() {
        let yaml = "token_sources:\n  - header: x-client-id\nroutes:\n  - name: r\n    audiences: [a]\n    mode: audit\n    strip_token: true\n";
        let c = Config::from_yaml_str(yaml).unwrap();
        let (resp, routes) = (Responder::new(&c.identity_headers), Routes::new(&c.routes));
        let route = routes.iter().next().unwrap();
        let r = resp.audited(Denial::NotAllowed, route, Some(&c.token_sources[0]));
        assert_eq!(r.status.as_ref().unwrap().code, 0);
        let ok = ok(&r);
        assert_eq!(ok.headers.len(), 1);
        let h = ok.headers[0].header.as_ref().unwrap();
        assert_eq!(
            (h.key.as_str(), h.value.as_str()),
            (AUDIT_HEADER, "not_allowed")
        );
        for name in resp.names() {
            assert!(ok.headers_to_remove.iter().any(|n| n == name), "{name}");
        }
        assert!(ok.headers_to_remove.iter().any(|n| n == "x-client-id"));
        assert_eq!(
            metadata(&r),
            vec![
                ("audit_reason".to_owned(), "not_allowed".to_owned()),
                ("route".to_owned(), "r".to_owned())
            ]
        );
        // An allow on an audit route removes a client's copy of the audit header.
        let allow = resp.allow(&id(false), route, &c.token_sources[0]);
        assert!(self::ok(&allow)
            .headers_to_remove
            .contains(&AUDIT_HEADER.to_owned()));
    }
}
