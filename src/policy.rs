//! The route's allow-list, applied to an [`Identity`] that TokenReview already vouched for.
//!
//! A caller is admitted when any entry of any list matches: a service account (`ns/name`, `*`
//! matches any run of characters on either side), a namespace, or a group. A route without an
//! allow-list admits every authenticated service account; an allow-list whose lists are all
//! empty admits nobody. Patterns are compiled once at start-up; matching does not allocate.

use crate::config::AllowConfig;
use crate::identity::Identity;

/// A `*` wildcard pattern (no other metacharacters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Wraps a pattern.
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_owned())
    }

    /// Whether `text` matches; `*` matches any (possibly empty) sequence.
    pub fn matches(&self, text: &str) -> bool {
        let (p, t) = (self.0.as_bytes(), text.as_bytes());
        let (mut pi, mut ti) = (0, 0);
        // Position of the last `*` and the text position it is currently absorbing up to.
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, ti));
                pi += 1;
            } else if pi < p.len() && p[pi] == t[ti] {
                pi += 1;
                ti += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&b| b == b'*')
    }
}

/// A compiled allow-list.
#[derive(Debug, Clone)]
pub struct AllowList {
    service_accounts: Vec<(Glob, Glob)>,
    namespaces: Vec<Glob>,
    groups: Vec<Glob>,
}

impl AllowList {
    /// Compiles the configured lists (validated by `config`).
    pub fn new(cfg: &AllowConfig) -> AllowList {
        AllowList {
            service_accounts: cfg
                .service_accounts
                .iter()
                .filter_map(|s| s.split_once('/'))
                .map(|(ns, name)| (Glob::new(ns), Glob::new(name)))
                .collect(),
            namespaces: cfg.namespaces.iter().map(|n| Glob::new(n)).collect(),
            groups: cfg.groups.iter().map(|g| Glob::new(g)).collect(),
        }
    }

    /// Whether the identity is admitted.
    pub fn allows(&self, id: &Identity) -> bool {
        self.service_accounts
            .iter()
            .any(|(ns, name)| ns.matches(&id.namespace) && name.matches(&id.name))
            || self.namespaces.iter().any(|n| n.matches(&id.namespace))
            || self
                .groups
                .iter()
                .any(|g| id.groups.iter().any(|ig| g.matches(ig)))
    }
}

/// Applies a route's optional allow-list.
pub fn permits(allow: Option<&AllowList>, id: &Identity) -> bool {
    allow.is_none_or(|a| a.allows(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, name: &str, groups: &[&str]) -> Identity {
        Identity {
            username: format!("system:serviceaccount:{ns}:{name}"),
            namespace: ns.into(),
            name: name.into(),
            uid: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            pod_name: None,
            pod_uid: None,
        }
    }

    fn list(sas: &[&str], nss: &[&str], groups: &[&str]) -> AllowList {
        AllowList::new(&AllowConfig {
            service_accounts: sas.iter().map(|s| s.to_string()).collect(),
            namespaces: nss.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn glob() {
        let g = |p: &str, t: &str| Glob::new(p).matches(t);
        assert!(g("*", ""));
        assert!(g("*", "anything"));
        assert!(g("api", "api"));
        assert!(!g("api", "api2"));
        assert!(g("api-*", "api-7d9f"));
        assert!(!g("api-*", "web-1"));
        assert!(g("*-worker", "batch-worker"));
        assert!(g("a*b*c", "aXXbYYc"));
        assert!(!g("a*b*c", "aXXbYY"));
        assert!(g("a**", "a"));
        assert!(g("*ab", "aab"));
    }

    #[test]
    fn service_accounts_namespaces_groups() {
        let l = list(&["default/api", "payments/*"], &["batch"], &["team:*"]);
        assert!(l.allows(&id("default", "api", &[])));
        assert!(!l.allows(&id("default", "web", &[])));
        assert!(l.allows(&id("payments", "anything", &[])));
        assert!(l.allows(&id("batch", "x", &[])));
        assert!(l.allows(&id("other", "x", &["system:serviceaccounts", "team:blue"])));
        assert!(!l.allows(&id("other", "x", &["system:serviceaccounts"])));
    }

    #[test]
    fn absent_allows_all_and_empty_allows_none() {
        assert!(permits(None, &id("a", "b", &[])));
        assert!(!permits(Some(&list(&[], &[], &[])), &id("a", "b", &[])));
    }
}
