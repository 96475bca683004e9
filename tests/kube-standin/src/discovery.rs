//! The discovery documents clients read before they make a request: `/version`, `/api`,
//! `/apis`, `/api/v1` and `/apis/<group>/v1`, listing only what this stand-in serves.
//! kubectl falls back from aggregated discovery to these legacy documents when the server
//! answers plain `application/json`.

use serde_json::{json, Value};

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kube-standin",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `/api`.
pub fn api_versions(url: &str) -> Value {
    let addr = url.trim_start_matches("https://");
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]
    })
}

const GROUPS: [&str; 3] = [
    "authentication.k8s.io",
    "authorization.k8s.io",
    "rbac.authorization.k8s.io",
];

fn group_json(name: &str) -> Value {
    let gv = format!("{name}/v1");
    json!({
        "name": name,
        "versions": [{"groupVersion": gv, "version": "v1"}],
        "preferredVersion": {"groupVersion": gv, "version": "v1"}
    })
}

/// `/apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = GROUPS.iter().map(|g| group_json(g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`.
pub fn api_group(group: &str) -> Option<Value> {
    if !GROUPS.contains(&group) {
        return None;
    }
    let mut g = group_json(group);
    if let Some(m) = g.as_object_mut() {
        m.insert("kind".into(), json!("APIGroup"));
        m.insert("apiVersion".into(), json!("v1"));
    }
    Some(g)
}

fn resource(
    name: &str,
    kind: &str,
    namespaced: bool,
    verbs: &[&str],
    group: Option<&str>,
) -> Value {
    let singular = if name.contains('/') {
        String::new()
    } else {
        kind.to_lowercase()
    };
    let mut r = json!({
        "name": name,
        "singularName": singular,
        "namespaced": namespaced,
        "kind": kind,
        "verbs": verbs,
    });
    if let (Some(g), Some(m)) = (group, r.as_object_mut()) {
        m.insert("group".into(), json!(g));
        m.insert("version".into(), json!("v1"));
    }
    r
}

/// `/api/v1`.
pub fn core_v1_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            resource("namespaces", "Namespace", false, &["get"], None),
            resource("pods", "Pod", true, &["create", "delete", "get", "list", "watch"], None),
            resource("serviceaccounts", "ServiceAccount", true,
                     &["create", "delete", "get", "list", "watch"], None),
            resource("serviceaccounts/token", "TokenRequest", true, &["create"],
                     Some("authentication.k8s.io")),
        ]
    })
}

/// `/apis/<group>/v1`.
pub fn group_v1_resources(group: &str) -> Option<Value> {
    let resources = match group {
        "authentication.k8s.io" => vec![resource(
            "tokenreviews",
            "TokenReview",
            false,
            &["create"],
            None,
        )],
        "authorization.k8s.io" => vec![resource(
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
            &["create"],
            None,
        )],
        "rbac.authorization.k8s.io" => {
            const VERBS: [&str; 4] = ["create", "delete", "get", "list"];
            vec![
                resource(
                    "clusterrolebindings",
                    "ClusterRoleBinding",
                    false,
                    &VERBS,
                    None,
                ),
                resource("clusterroles", "ClusterRole", false, &VERBS, None),
                resource("rolebindings", "RoleBinding", true, &VERBS, None),
                resource("roles", "Role", true, &VERBS, None),
            ]
        }
        _ => return None,
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{group}/v1"),
        "resources": resources
    }))
}
