//! RBAC per route (`allow.rbac`): after the token is verified, ask the API server's
//! authorizer, through a SubjectAccessReview, whether the caller may do what the route says.
//!
//! The review carries the caller's whole user info (username, UID, groups, `extra` with the
//! pod and node) and either resource attributes (group, resource, subresource, name,
//! namespace) or a non-resource path (fixed, or the request's canonical path). The verb is
//! fixed, or mapped from the HTTP method as kube-rbac-proxy does (GET/HEAD → `get`, POST →
//! `create`, PUT → `update`, PATCH → `patch`, DELETE → `delete`; any other method is refused
//! without a review).
//!
//! Answers are cached, allowed and denied alike, for short TTLs (`cache.rbac_ttl`,
//! `cache.rbac_denied_ttl`), keyed by a keyed hash of the exact review sent; concurrent
//! misses share one review; errors are never cached. The HTTP side (retries, timeouts, the
//! in-flight cap, our credentials) is [`Reviewer::post`]'s, so an API server that cannot
//! answer is a [`ReviewError`]: gRPC UNAVAILABLE, never a silent allow.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};

use crate::cache::{Cache, Freshness, Interest};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::review::{json_error, Api, ReviewError, Reviewer};

/// Where the review's verb comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// Always this verb.
    Fixed(String),
    /// From the request's HTTP method ([`verb_for_method`]).
    FromMethod,
}

/// What the review asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A resource (`spec.resourceAttributes`); empty fields are sent empty (a namespace of
    /// `""` asks at cluster scope, a name of `""` about every object).
    Resource {
        /// API group (`""`: core).
        group: String,
        /// Resource, e.g. `services`.
        resource: String,
        /// Subresource, e.g. `proxy`.
        subresource: String,
        /// Object name.
        name: String,
        /// Namespace.
        namespace: String,
    },
    /// A non-resource path (`spec.nonResourceAttributes`).
    Path(PathSource),
}

/// Which non-resource path is reviewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSource {
    /// The request's canonical path (query dropped, slashes merged, dot segments removed),
    /// as routes match it.
    Request,
    /// Always this path.
    Fixed(String),
}

/// A route's `allow.rbac` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The verb.
    pub verb: Verb,
    /// Resource or path.
    pub target: Target,
}

/// kube-rbac-proxy's mapping of HTTP methods to verbs; `None` for any other method.
pub fn verb_for_method(method: &str) -> Option<&'static str> {
    Some(match method {
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => return None,
    })
}

/// Cache settings for review answers.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Entries kept (allowed and denied each).
    pub max_entries: std::num::NonZeroUsize,
    /// How long an allowed answer is reused (0: never).
    pub allowed_ttl: Duration,
    /// How long a denied answer is reused (0: never).
    pub denied_ttl: Duration,
}

/// Asks SubjectAccessReview, through a cache.
pub struct Authorizer {
    reviewer: Arc<Reviewer>,
    cache: Arc<Cache<bool, ReviewError>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").finish_non_exhaustive()
    }
}

impl Authorizer {
    /// An authorizer using `reviewer`'s connection and credentials.
    pub fn new(
        reviewer: Arc<Reviewer>,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Authorizer, aws_lc_rs::error::Unspecified> {
        let cache = Cache::new(
            settings.max_entries,
            settings.max_entries,
            settings.allowed_ttl,
            settings.denied_ttl,
            metrics.rbac.cache_entries.clone(),
        )?;
        Ok(Authorizer {
            reviewer,
            cache: Arc::new(cache),
            metrics,
        })
    }

    /// Whether `rule` allows the caller `id` for a request with this method and canonical
    /// path. `Ok(false)` for a method with no verb; an error when the API server cannot answer.
    /// A review not cached waits for a slot as `flow` (the downstream peer, see
    /// [`crate::slots`]), and is dropped if every Check waiting for it is cancelled.
    pub async fn allows(
        &self,
        rule: &Rule,
        id: &Identity,
        method: &str,
        path: &str,
        flow: &str,
    ) -> Result<bool, ReviewError> {
        let Some(verb) = verb(rule, method) else {
            tracing::debug!(method, "allow.rbac: no verb for this method");
            return Ok(false);
        };
        // The key is every field the review would send, without building it: a hit costs
        // one HMAC, not a request object and its JSON.
        let request_path = match &rule.target {
            Target::Path(PathSource::Request) => Some(crate::route::canonical_path(path)),
            _ => None,
        };
        let target: [&str; 6] = match &rule.target {
            Target::Resource {
                group,
                resource,
                subresource,
                name,
                namespace,
            } => ["resource", group, resource, subresource, name, namespace],
            Target::Path(PathSource::Fixed(p)) => ["path", p, "", "", "", ""],
            Target::Path(PathSource::Request) => [
                "path",
                request_path.as_deref().unwrap_or(""),
                "",
                "",
                "",
                "",
            ],
        };
        let fixed = [
            id.username.as_str(),
            id.uid.as_deref().unwrap_or(""),
            id.extra.as_json(),
            verb,
        ];
        // Groups last: the parts before them are a fixed number, so the key is unambiguous.
        let key = self.cache.key_of(
            fixed
                .into_iter()
                .chain(target)
                .chain(id.groups.iter().map(String::as_str)),
        );
        if let Some(allowed) = self.cache.get(&key) {
            self.metrics.rbac.cache_hits.inc();
            return Ok(allowed);
        }
        self.metrics.rbac.cache_misses.inc();
        let review = build(rule, id, verb, path);
        let body =
            serde_json::to_vec(&review).map_err(|e| ReviewError::BuildRequest(json_error(&e)))?;
        let load = |interest: Interest| {
            let reviewer = Arc::clone(&self.reviewer);
            let metrics = Arc::clone(&self.metrics);
            let user = id.username.clone();
            let body = body.clone();
            let flow = flow.to_owned();
            async move {
                let bytes = reviewer
                    .post(Api::SubjectAccessReview, body, &flow, &interest)
                    .await?;
                let answer: SubjectAccessReview = serde_json::from_slice(&bytes).map_err(|e| {
                    let e = ReviewError::Decode(json_error(&e));
                    metrics.api_error(Api::SubjectAccessReview, e.kind());
                    e
                })?;
                let status = answer.status.unwrap_or_default();
                // `denied: true` (an authorizer's explicit deny) is never an allow.
                let allowed = status.allowed && status.denied != Some(true);
                metrics.rbac.answer(allowed);
                tracing::debug!(
                    %user,
                    allowed,
                    reason = status.reason.as_deref().unwrap_or(""),
                    "SubjectAccessReview"
                );
                let freshness = if allowed {
                    Freshness::Positive { cap: None }
                } else {
                    Freshness::Negative
                };
                Ok((allowed, freshness))
            }
        };
        let loaded = self.cache.get_or_load(key, load).await;
        // This Check joined a load in the instant its other waiters were cancelled and it
        // gave up: ours is still wanted, so load again (once).
        if matches!(loaded, Err(ReviewError::Abandoned)) {
            return self.cache.get_or_load(key, load).await;
        }
        loaded
    }
}

/// The rule's verb for a request, or `None` when it comes from a method with no verb.
fn verb<'r>(rule: &'r Rule, method: &str) -> Option<&'r str> {
    match &rule.verb {
        Verb::Fixed(v) => Some(v),
        Verb::FromMethod => verb_for_method(method),
    }
}

/// The review for one request, asking about `verb`.
fn build(rule: &Rule, id: &Identity, verb: &str, path: &str) -> SubjectAccessReview {
    let verb = verb.to_owned();
    let some = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    let (resource_attributes, non_resource_attributes) = match &rule.target {
        Target::Resource {
            group,
            resource,
            subresource,
            name,
            namespace,
        } => (
            Some(ResourceAttributes {
                group: some(group),
                resource: some(resource),
                subresource: some(subresource),
                name: some(name),
                namespace: some(namespace),
                verb: Some(verb),
                ..Default::default()
            }),
            None,
        ),
        Target::Path(source) => (
            None,
            Some(NonResourceAttributes {
                path: Some(match source {
                    PathSource::Request => crate::route::canonical_path(path).into_owned(),
                    PathSource::Fixed(p) => p.clone(),
                }),
                verb: Some(verb),
            }),
        ),
    };
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(id.username.clone()),
            uid: id.uid.clone(),
            groups: Some(id.groups.clone()).filter(|g| !g.is_empty()),
            extra: Some(id.extra.to_map()).filter(|e| !e.is_empty()),
            resource_attributes,
            non_resource_attributes,
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    /// The review a request would send, as `Authorizer::allows` builds it on a miss.
    fn review(rule: &Rule, id: &Identity, method: &str, path: &str) -> Option<SubjectAccessReview> {
        verb(rule, method).map(|v| build(rule, id, v, path))
    }

    use super::*;

    fn id() -> Identity {
        Identity {
            username: "system:serviceaccount:web:api".into(),
            namespace: "web".into(),
            name: "api".into(),
            uid: Some("u-1".into()),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:authenticated".into(),
            ],
            pod_name: Some("api-0".into()),
            pod_uid: Some("p-1".into()),
            extra: crate::identity::Extra::from_map(
                &[(
                    "authentication.kubernetes.io/pod-name".to_string(),
                    vec!["api-0".to_string()],
                )]
                .into(),
            ),
        }
    }

    #[test]
    fn methods_map_like_kube_rbac_proxy() {
        for (m, v) in [
            ("GET", Some("get")),
            ("HEAD", Some("get")),
            ("POST", Some("create")),
            ("PUT", Some("update")),
            ("PATCH", Some("patch")),
            ("DELETE", Some("delete")),
            ("OPTIONS", None),
            ("CONNECT", None),
            ("get", None),
        ] {
            assert_eq!(verb_for_method(m), v, "{m}");
        }
    }

    #[test]
    fn reviews_carry_the_whole_user_and_the_attributes() {
        let rule = Rule {
            verb: Verb::FromMethod,
            target: Target::Resource {
                group: String::new(),
                resource: "services".into(),
                subresource: "proxy".into(),
                name: "data-store".into(),
                namespace: "data".into(),
            },
        };
        let r = review(&rule, &id(), "PATCH", "/x").unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["apiVersion"], "authorization.k8s.io/v1");
        assert_eq!(v["kind"], "SubjectAccessReview");
        assert_eq!(v["spec"]["user"], "system:serviceaccount:web:api");
        assert_eq!(v["spec"]["uid"], "u-1");
        assert_eq!(v["spec"]["groups"][1], "system:authenticated");
        assert_eq!(
            v["spec"]["extra"]["authentication.kubernetes.io/pod-name"][0],
            "api-0"
        );
        let ra = &v["spec"]["resourceAttributes"];
        assert_eq!(ra["verb"], "patch");
        assert_eq!(ra["resource"], "services");
        assert_eq!(ra["subresource"], "proxy");
        assert_eq!(ra["name"], "data-store");
        assert_eq!(ra["namespace"], "data");
        assert!(ra.get("group").is_none(), "core group is sent empty");
        assert!(review(&rule, &id(), "OPTIONS", "/x").is_none());

        let rule = Rule {
            verb: Verb::Fixed("get".into()),
            target: Target::Path(PathSource::Request),
        };
        let v = serde_json::to_value(review(&rule, &id(), "POST", "/a//b/../c").unwrap()).unwrap();
        assert_eq!(v["spec"]["nonResourceAttributes"]["path"], "/a/c");
        assert_eq!(v["spec"]["nonResourceAttributes"]["verb"], "get");
        assert!(v["spec"].get("resourceAttributes").is_none());
    }
}
