//! Kubernetes `Status` objects: the body of every API error (401, 403, 404, 409, 422, 429,
//! 5xx), with the field order and `omitempty` rules of apimachinery's Go types, so clients
//! that parse them (kube-rs, client-go, the Python client) see what a real server sends.

use serde::Serialize;

/// An empty object, written as `{}`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Empty {}

/// `metav1.StatusCause`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Cause {
    /// Machine-readable reason, e.g. `FieldValueInvalid`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable message.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Field path, e.g. `spec.expirationSeconds`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub field: String,
}

/// `metav1.StatusDetails`, field order `name, group, kind, uid, causes, retryAfterSeconds`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Details {
    /// Object name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// API group.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Kind (or resource, for errors built from a resource).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Causes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<Cause>,
    /// Seconds the client should wait before retrying.
    #[serde(rename = "retryAfterSeconds", skip_serializing_if = "is_zero")]
    pub retry_after_seconds: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// `metav1.Status` with `status: "Failure"`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    /// Human-readable message.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Machine-readable reason, e.g. `Forbidden`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Extra details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
    /// HTTP status code.
    pub code: u16,
}

/// An API error: a `Status` body plus the HTTP response details that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The body (boxed: errors travel through many `Result`s).
    pub status: Box<Status>,
    /// `Retry-After` header value in seconds.
    pub retry_after: Option<u32>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.status.message, self.status.code)
    }
}

impl std::error::Error for ApiError {}

/// `qualifiedResource.String()`: `resource.group`, or `resource` in the core group.
fn qualified(resource: &str, group: &str) -> String {
    let base = resource.split('/').next().unwrap_or(resource);
    if group.is_empty() {
        base.to_string()
    } else {
        format!("{base}.{group}")
    }
}

impl ApiError {
    /// A failure Status with the given code, reason, message and details.
    pub fn new(code: u16, reason: &str, message: String, details: Option<Details>) -> ApiError {
        ApiError {
            status: Box::new(Status {
                kind: "Status",
                api_version: "v1",
                metadata: Empty {},
                status: "Failure",
                message,
                reason: reason.to_string(),
                details,
                code,
            }),
            retry_after: None,
        }
    }

    /// HTTP status code.
    pub fn code(&self) -> u16 {
        self.status.code
    }

    /// The Status message.
    pub fn message(&self) -> &str {
        &self.status.message
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.status).unwrap_or_default()
    }

    /// 401 for invalid or (with anonymous auth off) missing credentials.
    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized".to_string(), None)
    }

    /// 403 for a resource request RBAC denied.
    pub fn forbidden_resource(
        user: &str,
        verb: &str,
        resource: &str,
        group: &str,
        name: &str,
        namespace: Option<&str>,
    ) -> ApiError {
        let scope = match namespace {
            Some(ns) => format!("in the namespace {}", go_quote(ns)),
            None => "at the cluster scope".to_string(),
        };
        let why = format!(
            "User {} cannot {verb} resource {} in API group {} {scope}",
            go_quote(user),
            go_quote(resource),
            go_quote(group)
        );
        let qr = qualified(resource, group);
        let message = if name.is_empty() {
            format!("{qr} is forbidden: {why}")
        } else {
            format!("{qr} {} is forbidden: {why}", go_quote(name))
        };
        let kind = resource.split('/').next().unwrap_or(resource).to_string();
        ApiError::new(
            403,
            "Forbidden",
            message,
            Some(Details {
                name: name.to_string(),
                group: group.to_string(),
                kind,
                ..Default::default()
            }),
        )
    }

    /// 403 for a non-resource request (e.g. `/openid/v1/jwks`) RBAC denied.
    pub fn forbidden_path(user: &str, verb: &str, path: &str) -> ApiError {
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "forbidden: User {} cannot {verb} path {}",
                go_quote(user),
                go_quote(path)
            ),
            Some(Details::default()),
        )
    }

    /// 400 BadRequest.
    pub fn bad_request(message: String) -> ApiError {
        ApiError::new(400, "BadRequest", message, None)
    }

    /// 404 NotFound for `resource "name"`.
    pub fn not_found(resource: &str, group: &str, name: &str) -> ApiError {
        Self::about_object(404, "NotFound", (resource, group, name), "not found")
    }

    /// 409 AlreadyExists for `resource "name"`.
    pub fn already_exists(resource: &str, group: &str, name: &str) -> ApiError {
        Self::about_object(
            409,
            "AlreadyExists",
            (resource, group, name),
            "already exists",
        )
    }

    /// `<resource> "<name>" <what>`, with the object named in `details`.
    fn about_object(
        code: u16,
        reason: &str,
        (resource, group, name): (&str, &str, &str),
        what: &str,
    ) -> ApiError {
        ApiError::new(
            code,
            reason,
            format!("{} {} {what}", qualified(resource, group), go_quote(name)),
            Some(Details {
                name: name.to_string(),
                group: group.to_string(),
                kind: resource.to_string(),
                ..Default::default()
            }),
        )
    }

    /// 409 Conflict: `Operation cannot be fulfilled on <resource> "<name>": <msg>`.
    pub fn conflict(resource: &str, group: &str, name: &str, msg: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {}: {msg}",
                qualified(resource, group),
                go_quote(name)
            ),
            Some(Details {
                name: name.to_string(),
                group: group.to_string(),
                kind: resource.to_string(),
                ..Default::default()
            }),
        )
    }

    /// 422 Invalid for one field of kind `kind` in `group`.
    pub fn invalid(
        kind: &str,
        group: &str,
        name: &str,
        field: &str,
        value: &str,
        detail: &str,
    ) -> ApiError {
        let cause_msg = format!("Invalid value: {value}: {detail}");
        ApiError::new(
            422,
            "Invalid",
            format!(
                "{} {} is invalid: {field}: {cause_msg}",
                qualified(kind, group),
                go_quote(name)
            ),
            Some(Details {
                name: name.to_string(),
                group: group.to_string(),
                kind: kind.to_string(),
                causes: vec![Cause {
                    reason: "FieldValueInvalid".to_string(),
                    message: cause_msg,
                    field: field.to_string(),
                }],
                ..Default::default()
            }),
        )
    }

    /// 500 InternalError.
    pub fn internal(msg: &str) -> ApiError {
        ApiError::new(
            500,
            "InternalError",
            format!("Internal error occurred: {msg}"),
            Some(Details {
                causes: vec![Cause {
                    message: msg.to_string(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        )
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".to_string(),
            Some(Details::default()),
        )
    }

    /// 415 UnsupportedMediaType, listing the media types this stand-in decodes.
    pub fn unsupported_media_type() -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json"
                .to_string(),
            None,
        )
    }

    /// 413 RequestEntityTooLarge.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
            None,
        )
    }

    /// An injected fault with the given HTTP code, shaped like the Status a real server
    /// sends for that code.
    pub fn injected(code: u16, retry_after: Option<u32>) -> ApiError {
        let mut e = match code {
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.".to_string(),
                Some(Details {
                    retry_after_seconds: retry_after.unwrap_or(0),
                    ..Default::default()
                }),
            ),
            503 => ApiError::new(
                503,
                "ServiceUnavailable",
                "The server is currently unable to handle the request (injected fault)".to_string(),
                retry_after.map(|s| Details {
                    retry_after_seconds: s,
                    ..Default::default()
                }),
            ),
            500 => ApiError::internal("injected fault"),
            504 => ApiError::new(
                504,
                "Timeout",
                "Timeout: request did not complete within requested timeout (injected fault)"
                    .to_string(),
                None,
            ),
            other => ApiError::new(
                other,
                "InternalError",
                format!("injected fault with status {other}"),
                None,
            ),
        };
        e.retry_after = retry_after;
        e
    }
}

/// Go's `%q` for a string (`strconv.Quote`): double quotes, with `"`, `\` and control
/// characters escaped.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\u{0b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%q` for a `[]string`: `["a" "b"]`.
pub fn go_quote_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", inner.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_tokenreview_matches_doc() {
        let e = ApiError::forbidden_resource(
            "system:serviceaccount:default:foo",
            "create",
            "tokenreviews",
            "authentication.k8s.io",
            "",
            None,
        );
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:default:foo\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope","reason":"Forbidden","details":{"group":"authentication.k8s.io","kind":"tokenreviews"},"code":403}"#
        );
    }

    #[test]
    fn unauthorized_matches_doc() {
        assert_eq!(
            String::from_utf8(ApiError::unauthorized().body()).unwrap(),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#
        );
    }

    #[test]
    fn quote_list() {
        assert_eq!(
            go_quote_list(&["a".into(), "b\"c".into()]),
            r#"["a" "b\"c"]"#
        );
    }
}
