//! The route's allow-list, applied to an [`Identity`] that TokenReview already vouched for.
//!
//! A caller is admitted when any entry of any list matches: a service account (`ns/name`, `*`
//! matches any run of characters on either side), a namespace, or a group. A route without an
//! allow-list admits every authenticated service account; an allow-list whose lists are all
//! empty admits nobody, unless it has an `rbac` rule: then empty lists do not narrow and the
//! SubjectAccessReview alone decides (`check` asks it after these lists). The patterns' parsers live here and `config` calls them, so a pattern
//! is checked and compiled once, at start-up; matching does not allocate.

use crate::identity::Identity;

/// A `*` wildcard pattern (no other metacharacters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Parses a pattern: surrounding whitespace is ignored; it must not be empty.
    pub fn parse(pattern: &str) -> Result<Glob, String> {
        match pattern.trim() {
            "" => Err("empty pattern".to_owned()),
            p => Ok(Glob(p.to_owned())),
        }
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

/// A service-account pattern, `namespace/name`, either side a [`Glob`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountPattern {
    namespace: Glob,
    name: Glob,
}

impl ServiceAccountPattern {
    /// Parses `namespace/name` (`*` wildcards allowed on either side; both sides non-empty,
    /// exactly one `/`).
    pub fn parse(s: &str) -> Result<ServiceAccountPattern, String> {
        let v = s.trim();
        match v.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {
                Ok(ServiceAccountPattern {
                    namespace: Glob(ns.to_owned()),
                    name: Glob(n.to_owned()),
                })
            }
            _ => Err(format!(
                "`{v}` must be `namespace/name` (`*` wildcards allowed)"
            )),
        }
    }

    /// Whether the identity's service account matches.
    pub fn matches(&self, id: &Identity) -> bool {
        self.namespace.matches(&id.namespace) && self.name.matches(&id.name)
    }
}

/// A compiled allow-list (built by `config` from the route's `allow`).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    /// `namespace/name` patterns.
    pub service_accounts: Vec<ServiceAccountPattern>,
    /// Namespace patterns.
    pub namespaces: Vec<Glob>,
    /// Group patterns.
    pub groups: Vec<Glob>,
    /// `allow.rbac`: a SubjectAccessReview must also allow the caller (see `check`).
    pub rbac: Option<crate::rbac::Rule>,
}

impl AllowList {
    /// Whether the identity is admitted by the static lists. With `rbac`, lists that are all
    /// empty do not narrow (RBAC alone decides); without it they admit nobody.
    pub fn allows(&self, id: &Identity) -> bool {
        let no_lists = self.service_accounts.is_empty()
            && self.namespaces.is_empty()
            && self.groups.is_empty();
        (no_lists && self.rbac.is_some())
            || self.service_accounts.iter().any(|sa| sa.matches(id))
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
            extra: Default::default(),
        }
    }

    fn list(sas: &[&str], nss: &[&str], groups: &[&str]) -> AllowList {
        AllowList {
            service_accounts: sas
                .iter()
                .map(|s| ServiceAccountPattern::parse(s).unwrap())
                .collect(),
            namespaces: nss.iter().map(|s| Glob::parse(s).unwrap()).collect(),
            groups: groups.iter().map(|s| Glob::parse(s).unwrap()).collect(),
            rbac: None,
        }
    }

    #[test]
    fn glob() {
        let g = |p: &str, t: &str| Glob::parse(p).unwrap().matches(t);
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
    fn service_account_pattern_parse() {
        assert!(ServiceAccountPattern::parse(" default/api ").is_ok());
        assert!(ServiceAccountPattern::parse("*/*").is_ok());
        for bad in ["justname", "/api", "default/", "a/b/c", ""] {
            assert!(ServiceAccountPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(Glob::parse("  ").is_err());
    }

    #[test]
    fn absent_allows_all_and_empty_allows_none() {
        assert!(permits(None, &id("a", "b", &[])));
        assert!(!permits(Some(&list(&[], &[], &[])), &id("a", "b", &[])));
    }
}
