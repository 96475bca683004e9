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
//! misses share one review; errors are never cached. Each answer is also remembered, until the
//! same instant, in the caller's verdict-cache entry ([`Memo`]): a Check whose token is a
//! cache hit then finds its RBAC answer in the entry it already holds, one cache lookup per
//! Check instead of two (rules that review the request's path are too many to remember there
//! and use the answer cache). The HTTP side (retries, timeouts, the
//! in-flight cap, our credentials) is `Reviewer::post`'s, so an API server that cannot
//! answer is a [`ReviewError`]: gRPC UNAVAILABLE, never a silent allow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};

use crate::cache::{Cache, Freshness, Interest};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::review::{json_error, Api, ReviewError, Reviewer};
use crate::revocation::Admitted;

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

/// The verbs HTTP methods map to, in [`Memo`] tag order (after 0, a fixed verb).
const METHOD_VERBS: [&str; 5] = ["get", "create", "update", "patch", "delete"];

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

/// An answer and the instant it stops being usable (its cache entry's expiry, at the latest).
#[derive(Debug, Clone, Copy)]
struct Answer {
    allowed: bool,
    until: Instant,
}

/// Slots in a [`Memo`]: a caller rarely meets more RBAC rules (route and verb pairs) within
/// one verdict's lifetime; a fifth evicts one, which then comes from the answer cache.
const MEMO_SLOTS: usize = 4;

/// RBAC answers remembered with one verified caller, in its verdict-cache entry
/// ([`Admitted`]), so that a cache hit costs no second lookup.
///
/// Each slot is one `AtomicU64`, read without a lock (a hit is a few loads, with no write to
/// a shared cache line): bits 0-31 the expiry in milliseconds since the memo was made
/// (rounded down, so never later than the answer cache's entry), bit 32 the answer, bits
/// 33-63 the tag + 1 (0: empty). The tag is the route's index and the verb (see
/// `Memo::tag`); route indices are stable for a verdict cache's life, since a reload that
/// changes the routes starts a new cache. Writers race benignly: the loser's answer is
/// simply not remembered here.
pub struct Memo {
    born: Instant,
    slots: [AtomicU64; MEMO_SLOTS],
}

impl Default for Memo {
    fn default() -> Memo {
        Memo {
            born: Instant::now(),
            slots: Default::default(),
        }
    }
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memo").finish_non_exhaustive()
    }
}

impl Memo {
    const ALLOWED: u64 = 1 << 32;
    const TAG_SHIFT: u32 = 33;

    /// The tag of `rule` on route `route` for `verb`; `None` for rules not remembered here
    /// (the request's path is part of the review) or a route index too large to encode.
    fn tag(route: usize, rule: &Rule, verb: &str) -> Option<u64> {
        if rule.target == Target::Path(PathSource::Request) {
            return None;
        }
        let verb = match rule.verb {
            Verb::Fixed(_) => 0,
            Verb::FromMethod => METHOD_VERBS.iter().position(|v| *v == verb)? + 1,
        };
        let tag = (route as u64).checked_mul(8)? + verb as u64 + 1;
        (tag < 1 << (64 - Self::TAG_SHIFT)).then_some(tag)
    }

    /// The live answer remembered under `tag`, if any.
    fn get(&self, tag: u64, now: Instant) -> Option<bool> {
        let age = now.saturating_duration_since(self.born);
        self.slots.iter().find_map(|slot| {
            let word = slot.load(Ordering::Relaxed);
            let until = Duration::from_millis(word & u64::from(u32::MAX));
            (word >> Self::TAG_SHIFT == tag && age < until).then_some(word & Self::ALLOWED != 0)
        })
    }

    /// Remembers `answer` under `tag`: in its own slot, else an empty or expired one, else the
    /// slot the tag hashes to.
    fn put(&self, tag: u64, answer: Answer) {
        let Ok(until) = u32::try_from(
            answer
                .until
                .saturating_duration_since(self.born)
                .as_millis(),
        ) else {
            return;
        };
        let word = tag << Self::TAG_SHIFT
            | if answer.allowed { Self::ALLOWED } else { 0 }
            | u64::from(until);
        let age = Instant::now().saturating_duration_since(self.born);
        let words = self.slots.each_ref().map(|s| s.load(Ordering::Relaxed));
        let free = |w: &u64| {
            w >> Self::TAG_SHIFT == 0 || Duration::from_millis(w & u64::from(u32::MAX)) <= age
        };
        let index = words
            .iter()
            .position(|w| w >> Self::TAG_SHIFT == tag)
            .or_else(|| words.iter().position(free))
            .unwrap_or(tag as usize % MEMO_SLOTS);
        self.slots[index].store(word, Ordering::Relaxed);
    }
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
    cache: Arc<Cache<Answer, ReviewError>>,
    /// How long answers live (to tell the [`Memo`] when each one ends).
    settings: CacheSettings,
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
            settings,
            metrics,
        })
    }

    /// Whether `rule`, on the route with index `route`, allows the `caller` for a request
    /// with this method and canonical path: from the caller's [`Memo`], else the answer
    /// cache, else a review. `Ok(false)` for a method with no verb; an error when the API
    /// server cannot answer. A review not cached waits for a slot as `flow` (the downstream
    /// peer, see [`crate::slots`]), and is dropped if every Check waiting for it is cancelled.
    pub async fn allows(
        &self,
        rule: &Rule,
        route: usize,
        caller: &Admitted,
        method: &str,
        path: &str,
        flow: &str,
    ) -> Result<bool, ReviewError> {
        let Some(verb) = verb(rule, method) else {
            tracing::debug!(method, "allow.rbac: no verb for this method");
            return Ok(false);
        };
        let tag = Memo::tag(route, rule, verb);
        if let Some(allowed) = tag.and_then(|t| caller.rbac.get(t, Instant::now())) {
            self.metrics.rbac.cache_hits.inc();
            return Ok(allowed);
        }
        let answer = self
            .answer(rule, &caller.identity, verb, path, flow)
            .await?;
        if let Some(tag) = tag {
            caller.rbac.put(tag, answer);
        }
        Ok(answer.allowed)
    }

    /// The answer cache's answer, or a review's.
    async fn answer(
        &self,
        rule: &Rule,
        id: &Identity,
        verb: &str,
        path: &str,
        flow: &str,
    ) -> Result<Answer, ReviewError> {
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
        if let Some(answer) = self.cache.get(&key) {
            self.metrics.rbac.cache_hits.inc();
            return Ok(answer);
        }
        self.metrics.rbac.cache_misses.inc();
        let review = build(rule, id, verb, path);
        let body =
            serde_json::to_vec(&review).map_err(|e| ReviewError::BuildRequest(json_error(&e)))?;
        let settings = self.settings;
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
                // The cache keeps the answer from a moment later, so `until` is never after
                // its entry's expiry.
                let (freshness, ttl) = if allowed {
                    (Freshness::Positive { cap: None }, settings.allowed_ttl)
                } else {
                    (Freshness::Negative, settings.denied_ttl)
                };
                let until = Instant::now() + ttl;
                Ok((Answer { allowed, until }, freshness))
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

    fn fixed(route_target: Target) -> Rule {
        Rule {
            verb: Verb::Fixed("get".into()),
            target: route_target,
        }
    }

    fn services() -> Target {
        Target::Resource {
            group: String::new(),
            resource: "services".into(),
            subresource: String::new(),
            name: String::new(),
            namespace: "data".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_memo_answers_until_the_answer_ends_and_not_after() {
        let memo = Memo::default();
        let tag = Memo::tag(0, &fixed(services()), "get").unwrap();
        assert_eq!(memo.get(tag, Instant::now()), None, "empty");
        let until = Instant::now() + Duration::from_millis(2500);
        memo.put(
            tag,
            Answer {
                allowed: true,
                until,
            },
        );
        assert_eq!(memo.get(tag, Instant::now()), Some(true));
        tokio::time::advance(Duration::from_millis(2499)).await;
        assert_eq!(memo.get(tag, Instant::now()), Some(true));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            memo.get(tag, Instant::now()),
            None,
            "expired with its answer"
        );

        // A denial is remembered as one; a zero TTL is never served.
        let until = Instant::now() + Duration::from_secs(1);
        memo.put(
            tag,
            Answer {
                allowed: false,
                until,
            },
        );
        assert_eq!(memo.get(tag, Instant::now()), Some(false));
        let until = Instant::now();
        memo.put(
            tag,
            Answer {
                allowed: true,
                until,
            },
        );
        assert_eq!(memo.get(tag, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn memo_tags_keep_routes_and_verbs_apart() {
        let from_method = Rule {
            verb: Verb::FromMethod,
            target: services(),
        };
        let get = Memo::tag(3, &from_method, "get").unwrap();
        let create = Memo::tag(3, &from_method, "create").unwrap();
        let other_route = Memo::tag(4, &from_method, "get").unwrap();
        let fixed_same_route = Memo::tag(3, &fixed(services()), "get").unwrap();
        let tags = [get, create, other_route, fixed_same_route];
        for (i, a) in tags.iter().enumerate() {
            for b in &tags[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Reviews of the request's path are not remembered here.
        assert_eq!(
            Memo::tag(3, &fixed(Target::Path(PathSource::Request)), "get"),
            None
        );
        assert!(Memo::tag(
            3,
            &fixed(Target::Path(PathSource::Fixed("/x".into()))),
            "get"
        )
        .is_some());

        let memo = Memo::default();
        let until = Instant::now() + Duration::from_secs(60);
        memo.put(
            get,
            Answer {
                allowed: true,
                until,
            },
        );
        memo.put(
            create,
            Answer {
                allowed: false,
                until,
            },
        );
        assert_eq!(memo.get(get, Instant::now()), Some(true));
        assert_eq!(memo.get(create, Instant::now()), Some(false));
        assert_eq!(memo.get(other_route, Instant::now()), None);

        // More tags than slots: the newest is kept, and at most one older one is lost.
        let many: Vec<u64> = (10..10 + MEMO_SLOTS + 1)
            .map(|route| Memo::tag(route, &fixed(services()), "get").unwrap())
            .collect();
        let memo = Memo::default();
        for tag in &many {
            memo.put(
                *tag,
                Answer {
                    allowed: true,
                    until,
                },
            );
        }
        let kept = many
            .iter()
            .filter(|t| memo.get(**t, Instant::now()).is_some())
            .count();
        assert_eq!(kept, MEMO_SLOTS);
        assert_eq!(memo.get(*many.last().unwrap(), Instant::now()), Some(true));
        // An expired slot is reused before a live one is evicted.
        let memo = Memo::default();
        let soon = Instant::now() + Duration::from_millis(10);
        memo.put(
            many[0],
            Answer {
                allowed: true,
                until: soon,
            },
        );
        for tag in &many[1..MEMO_SLOTS] {
            memo.put(
                *tag,
                Answer {
                    allowed: true,
                    until,
                },
            );
        }
        tokio::time::advance(Duration::from_millis(20)).await;
        memo.put(
            many[MEMO_SLOTS],
            Answer {
                allowed: true,
                until,
            },
        );
        for tag in &many[1..] {
            assert_eq!(memo.get(*tag, Instant::now()), Some(true));
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
