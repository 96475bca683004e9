//! Which route a request belongs to, and so which audiences its token must carry.
//!
//! Routes are tried in order and the first whose conditions all hold wins. Conditions are
//! Envoy `context_extensions` entries (set per route in Envoy), host (exact or `*.suffix`, port
//! ignored, case-insensitive), path prefix (query ignored) and method. Host and path matter
//! because Istio's CUSTOM provider sends no context_extensions. No match means deny
//! (`no_route`) unless a route without `match` acts as the default.

use crate::config::{MatchConfig, RouteConfig};
use crate::policy::AllowList;
use crate::request::RequestView;

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the configuration (indexes per-route metric handles).
    pub index: usize,
    /// Name, for logs and metrics.
    pub name: String,
    matcher: Option<Matcher>,
    /// TokenReview `spec.audiences`.
    pub audiences: Vec<String>,
    /// Allow-list; `None` admits any authenticated service account.
    pub allow: Option<AllowList>,
    /// Remove the token's header before the upstream.
    pub strip_token: bool,
    /// 403 or 401 for invalid tokens.
    pub invalid_token_status: u16,
}

#[derive(Debug, Clone)]
struct Matcher {
    context_extensions: Vec<(String, String)>,
    hosts: Vec<HostPattern>,
    path_prefix: Option<String>,
    methods: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com` stored as `.example.com`; matches any deeper name, not the apex.
    Suffix(String),
}

impl HostPattern {
    fn parse(s: &str) -> HostPattern {
        match s.strip_prefix('*') {
            Some(suffix) => HostPattern::Suffix(suffix.to_ascii_lowercase()),
            None => HostPattern::Exact(s.to_ascii_lowercase()),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => host.eq_ignore_ascii_case(h),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

impl Matcher {
    fn new(m: &MatchConfig) -> Matcher {
        Matcher {
            context_extensions: m
                .context_extensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            hosts: m.hosts.iter().map(|h| HostPattern::parse(h)).collect(),
            path_prefix: m.path_prefix.clone().filter(|p| p != "/"),
            methods: m.methods.clone(),
        }
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.context_extensions
            .iter()
            .all(|(k, v)| req.context_extensions.get(k) == Some(v))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(req.host)))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| req.path.starts_with(p))
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(req.method)))
    }
}

/// All routes, in configuration order.
#[derive(Debug, Clone)]
pub struct Routes(Vec<Route>);

impl Routes {
    /// Compiles the configured routes.
    pub fn new(cfg: &[RouteConfig]) -> Routes {
        Routes(
            cfg.iter()
                .enumerate()
                .map(|(index, r)| Route {
                    index,
                    name: r.name.clone(),
                    matcher: r.matcher.as_ref().map(Matcher::new),
                    audiences: r.audiences.clone(),
                    allow: r.allow.as_ref().map(AllowList::new),
                    strip_token: r.strip_token,
                    invalid_token_status: r.invalid_token_status,
                })
                .collect(),
        )
    }

    /// The first route whose conditions all hold.
    pub fn select(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.0
            .iter()
            .find(|r| r.matcher.as_ref().is_none_or(|m| m.matches(req)))
    }

    /// The routes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
    use envoy_types::pb::envoy::service::auth::v3::{
        attribute_context, AttributeContext, CheckRequest,
    };

    fn routes(yaml: &str) -> Routes {
        Routes::new(&Config::from_yaml_str(yaml).unwrap().routes)
    }

    fn req(host: &str, path: &str, method: &str, ext: &[(&str, &str)]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(HttpRequest {
                        host: host.into(),
                        path: path.into(),
                        method: method.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: ext
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
        }
    }

    fn pick<'a>(rs: &'a Routes, r: &CheckRequest) -> Option<&'a str> {
        rs.select(&RequestView::new(r).unwrap())
            .map(|r| r.name.as_str())
    }

    const YAML: &str = r#"
routes:
  - name: by-ext
    match: {context_extensions: {route: data-store}}
    audiences: [data-store]
  - name: by-host
    match:
      hosts: [vault, "*.vault.svc.cluster.local"]
    audiences: [vault]
  - name: admin-write
    match: {path_prefix: /admin, methods: [POST, delete]}
    audiences: [admin]
"#;

    #[test]
    fn first_match_wins_and_no_match_is_none() {
        let rs = routes(YAML);
        assert_eq!(
            pick(&rs, &req("vault", "/", "GET", &[("route", "data-store")])),
            Some("by-ext")
        );
        assert_eq!(
            pick(&rs, &req("VAULT:8200", "/", "GET", &[])),
            Some("by-host")
        );
        assert_eq!(
            pick(&rs, &req("a.vault.svc.cluster.local", "/", "GET", &[])),
            Some("by-host")
        );
        assert_eq!(
            pick(&rs, &req("vault.svc.cluster.local", "/", "GET", &[])),
            None
        );
        assert_eq!(
            pick(&rs, &req("x", "/admin/users?a=b", "POST", &[])),
            Some("admin-write")
        );
        assert_eq!(
            pick(&rs, &req("x", "/admin/users", "delete", &[])),
            Some("admin-write")
        );
        assert_eq!(pick(&rs, &req("x", "/admin/users", "GET", &[])), None);
        assert_eq!(pick(&rs, &req("x", "/public?/admin", "POST", &[])), None);
        assert_eq!(
            pick(&rs, &req("x", "/", "GET", &[("route", "other")])),
            None
        );
    }

    #[test]
    fn default_route_catches_the_rest() {
        let rs = routes(&format!("{YAML}  - name: fallback\n    audiences: [any]\n"));
        assert_eq!(pick(&rs, &req("x", "/", "GET", &[])), Some("fallback"));
    }

    #[test]
    fn suffix_does_not_match_apex_or_partial_label() {
        let p = HostPattern::parse("*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.EXAMPLE.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
    }
}
