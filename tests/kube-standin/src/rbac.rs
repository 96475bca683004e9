//! RBAC as kube-apiserver's RBAC authorizer does it: the four `rbac.authorization.k8s.io/v1`
//! kinds (Role, ClusterRole, RoleBinding, ClusterRoleBinding) in their JSON shapes, the
//! bootstrap ClusterRoles and bindings this stand-in serves, and [`Store::authorize`], a port
//! of `plugin/pkg/auth/authorizer/rbac` (`rbac.go`: `Authorize`, `RuleAllows`;
//! `pkg/registry/rbac/validation/rule.go`: `VisitRulesFor`, `appliesToUser`, the describers
//! that word the `RBAC: allowed by ...` reason; `pkg/apis/rbac/v1/evaluation_helpers.go`:
//! the verb, group, resource, resourceName and non-resource URL matchers).
//!
//! It backs the API's own authorization (401/403 for the stand-in's endpoints) and the
//! SubjectAccessReview endpoint. ClusterRoles with an `aggregationRule` get the rules of the
//! ClusterRoles their selectors' `matchLabels` pick, computed at evaluation time (the
//! aggregation controller's result, without its delay). The API server's privileged-group
//! authorizer (allow `system:masters`, reason empty) runs before RBAC, as in kube-apiserver.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::UserInfo;

/// `rbac.authorization.k8s.io`.
pub const GROUP: &str = "rbac.authorization.k8s.io";

/// One rule of a Role or ClusterRole (`rbacv1.PolicyRule`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// `verbs` (`*` any).
    #[serde(default)]
    pub verbs: Vec<String>,
    /// `apiGroups` (`""` is core, `*` any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    /// `resources` (`*` any, `pods/log` a subresource, `*/scale` a subresource of any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    /// `resourceNames` (empty: any name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    /// `nonResourceURLs` (`*` any; a trailing `*` is a prefix match).
    #[serde(
        default,
        rename = "nonResourceURLs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub non_resource_urls: Vec<String>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl PolicyRule {
    /// A rule for `verbs` on core-group `resources`.
    pub fn core(resources: &[&str], verbs: &[&str]) -> PolicyRule {
        PolicyRule::resources(&[""], resources, verbs)
    }

    /// A rule for `verbs` on `resources` of `groups`.
    pub fn resources(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
        PolicyRule {
            verbs: strings(verbs),
            api_groups: strings(groups),
            resources: strings(resources),
            ..Default::default()
        }
    }

    /// A rule for `verbs` on non-resource `urls`.
    pub fn urls(urls: &[&str], verbs: &[&str]) -> PolicyRule {
        PolicyRule {
            verbs: strings(verbs),
            non_resource_urls: strings(urls),
            ..Default::default()
        }
    }

    /// `RuleAllows` (`rbac.go`).
    pub fn allows(&self, attrs: &Attributes<'_>) -> bool {
        let verb_matches = |verb: &str| self.verbs.iter().any(|v| v == "*" || v == verb);
        match attrs {
            Attributes::Resource {
                verb,
                group,
                resource,
                name,
                ..
            } => {
                let subresource = resource.split_once('/').map_or("", |(_, s)| s);
                verb_matches(verb)
                    && self.api_groups.iter().any(|g| g == "*" || g == group)
                    && self.resources.iter().any(|r| {
                        r == "*"
                            || r == resource
                            // `*/subresource` matches that subresource of any resource.
                            || (!subresource.is_empty()
                                && r.len() == subresource.len() + 2
                                && r.starts_with("*/")
                                && r.ends_with(subresource))
                    })
                    && (self.resource_names.is_empty()
                        || self.resource_names.iter().any(|n| n == name))
            }
            Attributes::NonResource { verb, path } => {
                verb_matches(verb)
                    && self.non_resource_urls.iter().any(|u| {
                        u == "*"
                            || u == path
                            || (u.ends_with('*') && path.starts_with(u.trim_end_matches('*')))
                    })
            }
        }
    }
}

/// What a request wants to do (`authorizer.Attributes`).
#[derive(Debug, Clone)]
pub enum Attributes<'a> {
    /// A resource request.
    Resource {
        /// Verb, e.g. `create`.
        verb: &'a str,
        /// API group (`""` for core).
        group: &'a str,
        /// Resource, with `/subresource` if any.
        resource: &'a str,
        /// Object name (`""`: none, as for create and list).
        name: &'a str,
        /// Namespace, if namespaced.
        namespace: Option<&'a str>,
    },
    /// A non-resource request.
    NonResource {
        /// Verb, e.g. `get`.
        verb: &'a str,
        /// URL path.
        path: &'a str,
    },
}

impl Attributes<'_> {
    fn namespace(&self) -> &str {
        match self {
            Attributes::Resource { namespace, .. } => namespace.unwrap_or(""),
            Attributes::NonResource { .. } => "",
        }
    }
}

/// `metadata` of an RBAC object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace (Role, RoleBinding).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// UID (set by the server).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Resource version (set by the server).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// Creation time, RFC 3339 (set by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Labels (ClusterRole aggregation selects on them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `aggregationRule` of a ClusterRole: only `matchLabels` selectors are evaluated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AggregationRule {
    /// `clusterRoleSelectors`.
    #[serde(default)]
    pub cluster_role_selectors: Vec<LabelSelector>,
}

/// A label selector (`matchLabels` only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// `matchLabels`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// A Role or ClusterRole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Role {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
    /// ClusterRoles only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation_rule: Option<AggregationRule>,
}

/// `roleRef` of a binding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleRef {
    /// `rbac.authorization.k8s.io`.
    #[serde(default)]
    pub api_group: String,
    /// `Role` or `ClusterRole`.
    #[serde(default)]
    pub kind: String,
    /// Role name.
    #[serde(default)]
    pub name: String,
}

/// A binding subject (`rbacv1.Subject`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// `ServiceAccount`, `User` or `Group`.
    #[serde(default)]
    pub kind: String,
    /// `rbac.authorization.k8s.io` for users and groups, `""` for service accounts.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_group: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Service accounts: namespace (empty: the RoleBinding's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl Subject {
    /// ServiceAccount `ns/name`.
    pub fn service_account(ns: &str, name: &str) -> Subject {
        Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: ns.into(),
            ..Default::default()
        }
    }

    /// A group.
    pub fn group(name: &str) -> Subject {
        Subject {
            kind: "Group".into(),
            api_group: GROUP.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    /// A user.
    pub fn user(name: &str) -> Subject {
        Subject {
            kind: "User".into(),
            api_group: GROUP.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    /// `appliesToUser` (`rule.go`): a ServiceAccount subject without a namespace takes the
    /// RoleBinding's (never matches in a ClusterRoleBinding).
    fn applies_to(&self, user: &UserInfo, binding_ns: &str) -> bool {
        match self.kind.as_str() {
            "User" => user.username == self.name,
            "Group" => user.groups.contains(&self.name),
            "ServiceAccount" => {
                let ns = if self.namespace.is_empty() {
                    binding_ns
                } else {
                    &self.namespace
                };
                !ns.is_empty()
                    && user.username == format!("system:serviceaccount:{ns}:{}", self.name)
            }
            _ => false,
        }
    }

    /// `describeSubject` (`rule.go`).
    fn describe(&self, binding_ns: &str) -> String {
        match self.kind.as_str() {
            "ServiceAccount" => {
                let ns = if self.namespace.is_empty() {
                    binding_ns
                } else {
                    &self.namespace
                };
                format!("{} {}", self.kind, go_q(&format!("{}/{ns}", self.name)))
            }
            _ => format!("{} {}", self.kind, go_q(&self.name)),
        }
    }
}

/// A RoleBinding or ClusterRoleBinding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Role reference.
    #[serde(default)]
    pub role_ref: RoleRef,
    /// Subjects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<Subject>,
}

/// The four kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Namespaced `roles`.
    Role,
    /// `clusterroles`.
    ClusterRole,
    /// Namespaced `rolebindings`.
    RoleBinding,
    /// `clusterrolebindings`.
    ClusterRoleBinding,
}

impl Kind {
    /// From the URL's resource name.
    pub fn from_resource(resource: &str) -> Option<Kind> {
        Some(match resource {
            "roles" => Kind::Role,
            "clusterroles" => Kind::ClusterRole,
            "rolebindings" => Kind::RoleBinding,
            "clusterrolebindings" => Kind::ClusterRoleBinding,
            _ => return None,
        })
    }
    /// The resource name.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Role => "roles",
            Kind::ClusterRole => "clusterroles",
            Kind::RoleBinding => "rolebindings",
            Kind::ClusterRoleBinding => "clusterrolebindings",
        }
    }
    /// The kind name.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Role => "Role",
            Kind::ClusterRole => "ClusterRole",
            Kind::RoleBinding => "RoleBinding",
            Kind::ClusterRoleBinding => "ClusterRoleBinding",
        }
    }
    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Role | Kind::RoleBinding)
    }
}

/// An RBAC object of any of the four kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// Role or ClusterRole.
    Role(Role),
    /// RoleBinding or ClusterRoleBinding.
    Binding(Binding),
}

impl Object {
    /// Metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Role(r) => &r.metadata,
            Object::Binding(b) => &b.metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Role(r) => &mut r.metadata,
            Object::Binding(b) => &mut b.metadata,
        }
    }
    /// The object as the API writes it, with `kind` and `apiVersion`.
    pub fn to_json(&self, kind: Kind) -> serde_json::Value {
        let mut v = match self {
            Object::Role(r) => serde_json::to_value(r),
            Object::Binding(b) => serde_json::to_value(b),
        }
        .unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("kind".into(), kind.kind().into());
            m.insert("apiVersion".into(), format!("{GROUP}/v1").into());
        }
        v
    }
}

/// The answer of [`Store::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed.
    pub allowed: bool,
    /// `RBAC: allowed by ...` when allowed; on a denial empty, or the role lookups that
    /// failed (`RBAC: clusterrole.rbac.authorization.k8s.io "x" not found`).
    pub reason: String,
}

/// All RBAC objects, keyed `namespace/name` (namespaced kinds) or `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Store {
    /// Roles by `ns/name`.
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
    /// ClusterRoles by name.
    #[serde(default)]
    pub cluster_roles: BTreeMap<String, Role>,
    /// RoleBindings by `ns/name`.
    #[serde(default)]
    pub role_bindings: BTreeMap<String, Binding>,
    /// ClusterRoleBindings by name.
    #[serde(default)]
    pub cluster_role_bindings: BTreeMap<String, Binding>,
}

fn key(kind: Kind, ns: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{ns}/{name}")
    } else {
        name.to_string()
    }
}

/// Go's `%q` for the strings RBAC quotes.
fn go_q(s: &str) -> String {
    crate::status::go_quote(s)
}

impl Store {
    /// The bootstrap policy this stand-in serves (a subset of
    /// `plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go`), stamped with `meta`.
    pub fn bootstrap(mut meta: impl FnMut(&str) -> ObjectMeta) -> Store {
        let mut s = Store::default();
        let mut role = |name: &str, rules: Vec<PolicyRule>| {
            let mut m = meta(name);
            m.labels
                .insert("kubernetes.io/bootstrapping".into(), "rbac-defaults".into());
            (
                name.to_string(),
                Role {
                    metadata: m,
                    rules,
                    aggregation_rule: None,
                },
            )
        };
        let roles = vec![
            role(
                "cluster-admin",
                vec![
                    PolicyRule::resources(&["*"], &["*"], &["*"]),
                    PolicyRule::urls(&["*"], &["*"]),
                ],
            ),
            role(
                "system:auth-delegator",
                vec![
                    PolicyRule::resources(
                        &["authentication.k8s.io"],
                        &["tokenreviews"],
                        &["create"],
                    ),
                    PolicyRule::resources(
                        &["authorization.k8s.io"],
                        &["subjectaccessreviews"],
                        &["create"],
                    ),
                ],
            ),
            role(
                "system:basic-user",
                vec![PolicyRule::resources(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                )],
            ),
            role(
                "system:discovery",
                vec![PolicyRule::urls(
                    &[
                        "/api",
                        "/api/*",
                        "/apis",
                        "/apis/*",
                        "/healthz",
                        "/livez",
                        "/openapi",
                        "/openapi/*",
                        "/readyz",
                        "/version",
                        "/version/",
                    ],
                    &["get"],
                )],
            ),
            role(
                "system:public-info-viewer",
                vec![PolicyRule::urls(
                    &["/healthz", "/livez", "/readyz", "/version", "/version/"],
                    &["get"],
                )],
            ),
            role(
                "system:service-account-issuer-discovery",
                vec![PolicyRule::urls(
                    &[
                        "/.well-known/openid-configuration",
                        "/.well-known/openid-configuration/",
                        "/openid/v1/jwks",
                        "/openid/v1/jwks/",
                    ],
                    &["get"],
                )],
            ),
            // The read part of the default `view` role, for the resources served here.
            role(
                "view",
                vec![PolicyRule::core(
                    &["pods", "serviceaccounts", "namespaces"],
                    &["get", "list", "watch"],
                )],
            ),
        ];
        s.cluster_roles = roles.into_iter().collect();
        let mut bind = |name: &str, role: &str, subjects: Vec<Subject>| {
            let mut m = meta(name);
            m.labels
                .insert("kubernetes.io/bootstrapping".into(), "rbac-defaults".into());
            s.cluster_role_bindings.insert(
                name.to_string(),
                Binding {
                    metadata: m,
                    role_ref: RoleRef {
                        api_group: GROUP.into(),
                        kind: "ClusterRole".into(),
                        name: role.into(),
                    },
                    subjects,
                },
            );
        };
        bind(
            "cluster-admin",
            "cluster-admin",
            vec![Subject::group("system:masters")],
        );
        bind(
            "system:basic-user",
            "system:basic-user",
            vec![Subject::group("system:authenticated")],
        );
        bind(
            "system:discovery",
            "system:discovery",
            vec![Subject::group("system:authenticated")],
        );
        bind(
            "system:public-info-viewer",
            "system:public-info-viewer",
            vec![
                Subject::group("system:authenticated"),
                Subject::group("system:unauthenticated"),
            ],
        );
        bind(
            "system:service-account-issuer-discovery",
            "system:service-account-issuer-discovery",
            vec![Subject::group("system:serviceaccounts")],
        );
        s
    }

    /// Reads one object.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Object> {
        let k = key(kind, ns, name);
        match kind {
            Kind::Role => self.roles.get(&k).cloned().map(Object::Role),
            Kind::ClusterRole => self
                .cluster_roles
                .get(&k)
                .cloned()
                .map(|r| Object::Role(self.aggregated(r))),
            Kind::RoleBinding => self.role_bindings.get(&k).cloned().map(Object::Binding),
            Kind::ClusterRoleBinding => self
                .cluster_role_bindings
                .get(&k)
                .cloned()
                .map(Object::Binding),
        }
    }

    /// Objects of a kind, in `ns` (namespaced kinds; `None` for all namespaces).
    pub fn list(&self, kind: Kind, ns: Option<&str>) -> Vec<Object> {
        let in_ns = |m: &ObjectMeta| ns.is_none_or(|n| m.namespace == n);
        match kind {
            Kind::Role => self
                .roles
                .values()
                .filter(|r| in_ns(&r.metadata))
                .cloned()
                .map(Object::Role)
                .collect(),
            Kind::ClusterRole => self
                .cluster_roles
                .values()
                .cloned()
                .map(|r| Object::Role(self.aggregated(r)))
                .collect(),
            Kind::RoleBinding => self
                .role_bindings
                .values()
                .filter(|b| in_ns(&b.metadata))
                .cloned()
                .map(Object::Binding)
                .collect(),
            Kind::ClusterRoleBinding => self
                .cluster_role_bindings
                .values()
                .cloned()
                .map(Object::Binding)
                .collect(),
        }
    }

    /// Stores a new object (its metadata already stamped); `false` if the name is taken.
    pub fn create(&mut self, kind: Kind, mut obj: Object) -> bool {
        let m = obj.meta_mut();
        if !kind.namespaced() {
            m.namespace.clear();
        }
        let k = key(kind, &m.namespace, &m.name);
        let taken = match kind {
            Kind::Role => self.roles.contains_key(&k),
            Kind::ClusterRole => self.cluster_roles.contains_key(&k),
            Kind::RoleBinding => self.role_bindings.contains_key(&k),
            Kind::ClusterRoleBinding => self.cluster_role_bindings.contains_key(&k),
        };
        if taken {
            return false;
        }
        self.put(kind, obj);
        true
    }

    /// Creates or replaces an object.
    pub fn put(&mut self, kind: Kind, obj: Object) {
        let m = obj.meta();
        let k = key(kind, &m.namespace, &m.name);
        match (kind, obj) {
            (Kind::Role, Object::Role(r)) => {
                self.roles.insert(k, r);
            }
            (Kind::ClusterRole, Object::Role(r)) => {
                self.cluster_roles.insert(k, r);
            }
            (Kind::RoleBinding, Object::Binding(b)) => {
                self.role_bindings.insert(k, b);
            }
            (Kind::ClusterRoleBinding, Object::Binding(b)) => {
                self.cluster_role_bindings.insert(k, b);
            }
            _ => {}
        }
    }

    /// Deletes an object, returning it.
    pub fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> Option<Object> {
        let k = key(kind, ns, name);
        match kind {
            Kind::Role => self.roles.remove(&k).map(Object::Role),
            Kind::ClusterRole => self.cluster_roles.remove(&k).map(Object::Role),
            Kind::RoleBinding => self.role_bindings.remove(&k).map(Object::Binding),
            Kind::ClusterRoleBinding => self.cluster_role_bindings.remove(&k).map(Object::Binding),
        }
    }

    /// A ClusterRole with an `aggregationRule` carries the rules of every ClusterRole one of
    /// its selectors matches (as the aggregation controller writes them).
    fn aggregated(&self, mut role: Role) -> Role {
        let Some(agg) = &role.aggregation_rule else {
            return role;
        };
        let mut rules = Vec::new();
        for (name, other) in &self.cluster_roles {
            if *name == role.metadata.name {
                continue;
            }
            let selected = agg.cluster_role_selectors.iter().any(|sel| {
                sel.match_labels
                    .iter()
                    .all(|(k, v)| other.metadata.labels.get(k) == Some(v))
            });
            if selected {
                for r in &other.rules {
                    if !rules.contains(r) {
                        rules.push(r.clone());
                    }
                }
            }
        }
        role.rules = rules;
        role
    }

    /// The rules a role reference grants (`GetRoleReferenceRules`), or the lister's error.
    fn role_rules(&self, role_ref: &RoleRef, binding_ns: &str) -> Result<Vec<PolicyRule>, String> {
        match role_ref.kind.as_str() {
            "ClusterRole" => self
                .cluster_roles
                .get(&role_ref.name)
                .map(|r| self.aggregated(r.clone()).rules)
                .ok_or_else(|| format!("clusterrole.{GROUP} {} not found", go_q(&role_ref.name))),
            "Role" => self
                .roles
                .get(&format!("{binding_ns}/{}", role_ref.name))
                .map(|r| r.rules.clone())
                .ok_or_else(|| format!("role.{GROUP} {} not found", go_q(&role_ref.name))),
            other => Err(format!("unsupported role reference kind: {}", go_q(other))),
        }
    }

    /// kube-apiserver's authorizer chain for a user: the privileged group `system:masters`,
    /// then RBAC (`VisitRulesFor`: ClusterRoleBindings, then the namespace's RoleBindings;
    /// the first rule that allows decides, and names its binding in the reason).
    pub fn authorize(&self, user: &UserInfo, attrs: &Attributes<'_>) -> Decision {
        if user.groups.iter().any(|g| g == "system:masters") {
            return Decision {
                allowed: true,
                reason: String::new(),
            };
        }
        let mut errors: Vec<String> = Vec::new();
        for b in self.cluster_role_bindings.values() {
            let Some(subject) = b.subjects.iter().find(|s| s.applies_to(user, "")) else {
                continue;
            };
            match self.role_rules(&b.role_ref, "") {
                Ok(rules) => {
                    if rules.iter().any(|r| r.allows(attrs)) {
                        return Decision {
                            allowed: true,
                            reason: format!(
                                "RBAC: allowed by ClusterRoleBinding {} of {} {} to {}",
                                go_q(&b.metadata.name),
                                b.role_ref.kind,
                                go_q(&b.role_ref.name),
                                subject.describe("")
                            ),
                        };
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let ns = attrs.namespace();
        if !ns.is_empty() {
            for b in self.role_bindings.values() {
                if b.metadata.namespace != ns {
                    continue;
                }
                let Some(subject) = b.subjects.iter().find(|s| s.applies_to(user, ns)) else {
                    continue;
                };
                match self.role_rules(&b.role_ref, ns) {
                    Ok(rules) => {
                        if rules.iter().any(|r| r.allows(attrs)) {
                            return Decision {
                                allowed: true,
                                reason: format!(
                                    "RBAC: allowed by RoleBinding {} of {} {} to {}",
                                    go_q(&format!("{}/{ns}", b.metadata.name)),
                                    b.role_ref.kind,
                                    go_q(&b.role_ref.name),
                                    subject.describe(ns)
                                ),
                            };
                        }
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        Decision {
            allowed: false,
            reason: if errors.is_empty() {
                String::new()
            } else {
                format!("RBAC: {}", crate::cluster::aggregate(&errors))
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            ..Default::default()
        }
    }

    fn sa_user(ns: &str, name: &str) -> UserInfo {
        UserInfo {
            username: format!("system:serviceaccount:{ns}:{name}"),
            uid: "u".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            extra: BTreeMap::new(),
        }
    }

    fn res<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &'a str,
        name: &'a str,
        ns: Option<&'a str>,
    ) -> Attributes<'a> {
        Attributes::Resource {
            verb,
            group,
            resource,
            name,
            namespace: ns,
        }
    }

    fn role(ns: &str, name: &str, rules: Vec<PolicyRule>) -> Object {
        Object::Role(Role {
            metadata: ObjectMeta {
                namespace: ns.into(),
                ..meta(name)
            },
            rules,
            aggregation_rule: None,
        })
    }

    fn binding(ns: &str, name: &str, kind: &str, role: &str, subjects: Vec<Subject>) -> Object {
        Object::Binding(Binding {
            metadata: ObjectMeta {
                namespace: ns.into(),
                ..meta(name)
            },
            role_ref: RoleRef {
                api_group: GROUP.into(),
                kind: kind.into(),
                name: role.into(),
            },
            subjects,
        })
    }

    #[test]
    fn rule_allows_like_evaluation_helpers() {
        let r = PolicyRule {
            verbs: strings(&["get", "list"]),
            api_groups: strings(&[""]),
            resources: strings(&["services", "pods/log", "*/scale"]),
            resource_names: strings(&["data-store"]),
            ..Default::default()
        };
        assert!(r.allows(&res("get", "", "services", "data-store", Some("a"))));
        assert!(
            !r.allows(&res("get", "", "services", "other", Some("a"))),
            "resourceNames"
        );
        assert!(
            !r.allows(&res("get", "", "services", "", Some("a"))),
            "no name with resourceNames"
        );
        assert!(
            !r.allows(&res("create", "", "services", "data-store", None)),
            "verb"
        );
        assert!(
            !r.allows(&res("get", "apps", "services", "data-store", None)),
            "group"
        );
        assert!(r.allows(&res("get", "", "pods/log", "data-store", None)));
        assert!(
            !r.allows(&res("get", "", "pods", "data-store", None)),
            "pods/log is not pods"
        );
        assert!(
            !r.allows(&res("get", "", "services/proxy", "data-store", None)),
            "subresource"
        );
        assert!(
            r.allows(&res("get", "", "deployments/scale", "data-store", None)),
            "*/scale"
        );
        assert!(!r.allows(&res("get", "", "deployments/status", "data-store", None)));
        // `*` everywhere: subresources included.
        let all = PolicyRule::resources(&["*"], &["*"], &["*"]);
        assert!(all.allows(&res("escalate", "x.io", "things/sub", "n", None)));
        assert!(
            !all.allows(&Attributes::NonResource {
                verb: "get",
                path: "/x"
            }),
            "no URLs"
        );
        // Non-resource URLs: exact, `*`, trailing `*` prefix.
        let u = PolicyRule::urls(&["/metrics", "/data/*"], &["get"]);
        let nr = |verb, path| Attributes::NonResource { verb, path };
        assert!(u.allows(&nr("get", "/metrics")));
        assert!(!u.allows(&nr("get", "/metrics/x")));
        assert!(u.allows(&nr("get", "/data/")));
        assert!(u.allows(&nr("get", "/data/a/b")));
        assert!(!u.allows(&nr("get", "/data")));
        assert!(!u.allows(&nr("post", "/metrics")));
        assert!(
            !u.allows(&res("get", "", "metrics", "", None)),
            "URLs grant no resources"
        );
        assert!(PolicyRule::urls(&["*"], &["*"]).allows(&nr("delete", "/anything")));
    }

    #[test]
    fn role_binding_to_service_account_with_reason() {
        let mut s = Store::default();
        s.create(
            Kind::Role,
            role(
                "data",
                "reader",
                vec![PolicyRule::core(&["services"], &["get"])],
            ),
        );
        s.create(
            Kind::RoleBinding,
            binding(
                "data",
                "api-reads",
                "Role",
                "reader",
                vec![Subject::service_account("web", "api")],
            ),
        );
        let d = s.authorize(
            &sa_user("web", "api"),
            &res("get", "", "services", "x", Some("data")),
        );
        assert_eq!(
            d,
            Decision {
                allowed: true,
                reason: r#"RBAC: allowed by RoleBinding "api-reads/data" of Role "reader" to ServiceAccount "api/web""#.into()
            }
        );
        // Another namespace, another verb, another service account: denied, empty reason.
        for (user, attrs) in [
            (
                sa_user("web", "api"),
                res("get", "", "services", "x", Some("other")),
            ),
            (sa_user("web", "api"), res("get", "", "services", "x", None)),
            (
                sa_user("web", "api"),
                res("delete", "", "services", "x", Some("data")),
            ),
            (
                sa_user("web", "other"),
                res("get", "", "services", "x", Some("data")),
            ),
        ] {
            assert_eq!(
                s.authorize(&user, &attrs),
                Decision {
                    allowed: false,
                    reason: String::new()
                },
                "{attrs:?}"
            );
        }
        // Deleting the binding takes the grant away.
        assert!(s.delete(Kind::RoleBinding, "data", "api-reads").is_some());
        assert!(
            !s.authorize(
                &sa_user("web", "api"),
                &res("get", "", "services", "x", Some("data"))
            )
            .allowed
        );
    }

    #[test]
    fn subjects_groups_users_and_namespace_defaulting() {
        let mut s = Store::default();
        s.create(
            Kind::ClusterRole,
            role("", "svc", vec![PolicyRule::core(&["services"], &["get"])]),
        );
        // A namespace-less ServiceAccount subject takes the RoleBinding's namespace...
        s.create(
            Kind::RoleBinding,
            binding(
                "data",
                "local",
                "ClusterRole",
                "svc",
                vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "api".into(),
                    ..Default::default()
                }],
            ),
        );
        let get = |ns| res("get", "", "services", "", Some(ns));
        assert!(s.authorize(&sa_user("data", "api"), &get("data")).allowed);
        assert!(!s.authorize(&sa_user("web", "api"), &get("data")).allowed);
        // ...and never matches in a ClusterRoleBinding.
        s.create(
            Kind::ClusterRoleBinding,
            binding(
                "",
                "nsless",
                "ClusterRole",
                "svc",
                vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "api".into(),
                    ..Default::default()
                }],
            ),
        );
        assert!(!s.authorize(&sa_user("web", "api"), &get("x")).allowed);
        // Groups: every service account of a namespace, and of the cluster.
        s.create(
            Kind::RoleBinding,
            binding(
                "g",
                "ns-group",
                "ClusterRole",
                "svc",
                vec![Subject::group("system:serviceaccounts:batch")],
            ),
        );
        assert!(s.authorize(&sa_user("batch", "any"), &get("g")).allowed);
        assert!(!s.authorize(&sa_user("web", "any"), &get("g")).allowed);
        s.create(
            Kind::ClusterRoleBinding,
            binding(
                "",
                "all-sas",
                "ClusterRole",
                "svc",
                vec![Subject::group("system:serviceaccounts")],
            ),
        );
        let d = s.authorize(&sa_user("web", "any"), &get("h"));
        assert_eq!(
            d.reason,
            r#"RBAC: allowed by ClusterRoleBinding "all-sas" of ClusterRole "svc" to Group "system:serviceaccounts""#
        );
        // Users by exact name.
        s.create(
            Kind::RoleBinding,
            binding(
                "u",
                "alice",
                "ClusterRole",
                "svc",
                vec![Subject::user("alice")],
            ),
        );
        let alice = UserInfo {
            username: "alice".into(),
            ..Default::default()
        };
        assert!(s.authorize(&alice, &get("u")).allowed);
        assert!(!s.authorize(&alice, &get("v")).allowed);
    }

    #[test]
    fn missing_roles_are_named_in_the_denial() {
        let mut s = Store::default();
        s.create(
            Kind::RoleBinding,
            binding(
                "a",
                "b",
                "Role",
                "gone",
                vec![Subject::service_account("a", "x")],
            ),
        );
        s.create(
            Kind::ClusterRoleBinding,
            binding(
                "",
                "c",
                "ClusterRole",
                "gone-too",
                vec![Subject::service_account("a", "x")],
            ),
        );
        let d = s.authorize(&sa_user("a", "x"), &res("get", "", "pods", "", Some("a")));
        assert_eq!(
            d,
            Decision {
                allowed: false,
                reason: r#"RBAC: [clusterrole.rbac.authorization.k8s.io "gone-too" not found, role.rbac.authorization.k8s.io "gone" not found]"#.into()
            }
        );
    }

    #[test]
    fn aggregation_and_bootstrap() {
        let mut s = Store::bootstrap(meta);
        let mut agg = role("", "aggregate", vec![]);
        if let Object::Role(r) = &mut agg {
            r.aggregation_rule = Some(AggregationRule {
                cluster_role_selectors: vec![LabelSelector {
                    match_labels: [("team".to_string(), "data".to_string())].into(),
                }],
            });
        }
        s.create(Kind::ClusterRole, agg);
        let mut part = role(
            "",
            "part",
            vec![PolicyRule::resources(&["*"], &["widgets"], &["*"])],
        );
        if let Object::Role(r) = &mut part {
            r.metadata.labels.insert("team".into(), "data".into());
        }
        s.create(Kind::ClusterRole, part);
        s.create(
            Kind::ClusterRoleBinding,
            binding(
                "",
                "agg",
                "ClusterRole",
                "aggregate",
                vec![Subject::service_account("a", "x")],
            ),
        );
        assert!(
            s.authorize(
                &sa_user("a", "x"),
                &res("patch", "x.io", "widgets", "w", Some("n"))
            )
            .allowed
        );
        assert!(
            !s.authorize(
                &sa_user("a", "x"),
                &res("patch", "x.io", "gadgets", "w", Some("n"))
            )
            .allowed
        );
        let Some(Object::Role(r)) = s.get(Kind::ClusterRole, "", "aggregate") else {
            panic!()
        };
        assert_eq!(r.rules.len(), 1, "GET shows the aggregated rules");
        // Bootstrap: masters allowed with no reason, discovery for every authenticated user.
        let admin = UserInfo {
            username: "admin".into(),
            groups: vec!["system:masters".into()],
            ..Default::default()
        };
        assert_eq!(
            s.authorize(&admin, &res("delete", "x", "y", "", None)),
            Decision {
                allowed: true,
                reason: String::new()
            }
        );
        assert!(
            s.authorize(
                &sa_user("a", "x"),
                &Attributes::NonResource {
                    verb: "get",
                    path: "/apis/rbac.authorization.k8s.io/v1"
                }
            )
            .allowed
        );
        assert!(
            !s.authorize(
                &UserInfo::anonymous(),
                &Attributes::NonResource {
                    verb: "get",
                    path: "/apis"
                }
            )
            .allowed
        );
        assert!(
            s.authorize(
                &UserInfo::anonymous(),
                &Attributes::NonResource {
                    verb: "get",
                    path: "/healthz"
                }
            )
            .allowed
        );
    }
}
