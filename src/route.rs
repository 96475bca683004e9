//! Which route a request belongs to, and so which audiences its token must carry.
//!
//! Routes are tried in order and the first whose conditions all hold wins. Conditions are
//! Envoy `context_extensions` entries (set per route in Envoy), host (exact or `*.suffix`, port
//! ignored, case-insensitive), path prefix (query ignored) and method. Host and path matter
//! because Istio's CUSTOM provider sends no context_extensions. No match means deny
//! (`no_route`) unless a route without `match` acts as the default.
//!
//! The condition parsers ([`HostPattern::parse`], [`Matcher::parse_path_prefix`],
//! [`Matcher::parse_method`]) live here; `config` calls them, so the configuration already
//! carries compiled [`Matcher`]s.

use std::collections::BTreeMap;

use crate::config::{Mode, RouteConfig, Verification};
use crate::peer::PeerBinding;
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
    /// TokenReview or local verification.
    pub verification: Verification,
    /// The mTLS peer must be the token's service account.
    pub require_peer: Option<PeerBinding>,
    /// Enforce or audit.
    pub mode: Mode,
}

/// Route conditions; all given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    /// Envoy per-route `context_extensions` entries that must be present with these values.
    pub context_extensions: BTreeMap<String, String>,
    /// Hosts; empty means any host.
    pub hosts: Vec<HostPattern>,
    /// Path prefix (query string ignored); `None` means any path.
    pub path_prefix: Option<String>,
    /// Methods, upper-case; empty means any method.
    pub methods: Vec<String>,
}

/// A host condition: exact, or `*.suffix`; compared case-insensitively, port ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `example.com`, stored lower-case.
    Exact(String),
    /// `*.example.com` stored as `.example.com`; matches any deeper name, not the apex.
    Suffix(String),
}

impl HostPattern {
    /// Parses an exact host or `*.suffix` (no port, no other wildcard); surrounding whitespace
    /// is ignored and case folded.
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let host = s.trim().to_ascii_lowercase();
        let (rest, suffix) = match host.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (host.as_str(), false),
        };
        if rest.is_empty() || rest.contains(['*', ':', '/']) {
            return Err(format!(
                "`{s}` must be an exact host or `*.suffix` (no port)"
            ));
        }
        Ok(if suffix {
            HostPattern::Suffix(format!(".{rest}"))
        } else {
            HostPattern::Exact(host)
        })
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
    /// Parses a path prefix: it must start with `/`; `/` itself matches every path (`None`).
    /// It must also be canonical (see [`canonical_path`]), since requests are matched in
    /// canonical form.
    pub fn parse_path_prefix(s: &str) -> Result<Option<String>, String> {
        match s {
            "/" => Ok(None),
            p if p.starts_with('/') => match canonical_path(p) {
                c if c == p => Ok(Some(p.to_owned())),
                c => Err(format!(
                    "`{p}` is not in canonical form; write it as `{c}` (requests are matched after merging slashes, decoding and removing dot segments)"
                )),
            },
            _ => Err("must start with `/`".to_owned()),
        }
    }

    /// Parses an HTTP method (letters only), upper-cased.
    pub fn parse_method(s: &str) -> Result<String, String> {
        let m = s.trim().to_ascii_uppercase();
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("`{s}` is not an HTTP method"));
        }
        Ok(m)
    }

    /// Whether every request matches (no condition is set): a default route.
    pub fn matches_everything(&self) -> bool {
        self.context_extensions.is_empty()
            && self.hosts.is_empty()
            && self.path_prefix.is_none()
            && self.methods.is_empty()
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.context_extensions
            .iter()
            .all(|(k, v)| req.context_extensions.get(k) == Some(v))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(req.host)))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| canonical_path(req.path).starts_with(p))
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(req.method)))
    }
}

/// The path an application would serve for `path` (query already removed): `%2F`/`%5C` and
/// percent-encoded unreserved characters decoded, runs of `/` merged, `.` and `..` segments
/// removed (RFC 3986 §5.2.4). Routes match on this form, so `//internal/x`,
/// `/a/../internal/x` or `/%69nternal/x` cannot fall through to a broader route when the
/// proxy in front did not normalize them (Istio's default `BASE` normalization does not merge
/// slashes; the CVE-2021-31920 class). Paths already canonical are borrowed, not copied.
pub fn canonical_path(path: &str) -> std::borrow::Cow<'_, str> {
    let suspicious =
        path.contains("//") || path.contains('%') || path.contains("/.") || path.contains('\\');
    if !suspicious {
        return std::borrow::Cow::Borrowed(path);
    }
    // 1. Decode what an application would: encoded slashes and unreserved characters.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h * 16 + l;
                if c == b'/' || c == b'\\' {
                    decoded.push(b'/');
                    i += 3;
                    continue;
                }
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(if b == b'\\' { b'/' } else { b });
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded);
    // 2 and 3. Merge slashes and remove dot segments, segment by segment.
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut canonical = String::with_capacity(decoded.len());
    for s in &out {
        canonical.push('/');
        canonical.push_str(s);
    }
    if trailing || out.is_empty() {
        canonical.push('/');
    }
    std::borrow::Cow::Owned(canonical)
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
                    matcher: r.matcher.clone(),
                    audiences: r.audiences.clone(),
                    allow: r.allow.clone(),
                    strip_token: r.strip_token,
                    invalid_token_status: r.invalid_token_status,
                    verification: r.verification,
                    require_peer: r.require_peer.clone(),
                    mode: r.mode,
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

    #[test]
    fn paths_are_matched_as_the_application_would_serve_them() {
        for p in [
            "//internal/x",
            "///internal/x",
            "/./internal/x",
            "/a/../internal/x",
            "/%2finternal/x",
            "/%2Finternal/x",
            "/%69nternal/x",
            "/internal//x",
            "/internal/./x",
            "\\internal/x",
            "/%5cinternal/x",
            "/../internal/x",
        ] {
            assert!(
                canonical_path(p).starts_with("/internal/"),
                "{p} -> {}",
                canonical_path(p)
            );
        }
        assert_eq!(canonical_path("/internal/x/"), "/internal/x/");
        assert_eq!(canonical_path("/a/b/.."), "/a/");
        assert_eq!(canonical_path("/%25"), "/%25");
        assert_eq!(canonical_path("/%zz/x"), "/%zz/x");
        assert_eq!(canonical_path("/.well-known/x"), "/.well-known/x");
        assert!(matches!(
            canonical_path("/plain/path"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn path_prefixes_must_be_canonical() {
        assert!(Matcher::parse_path_prefix("/internal/").is_ok());
        let e = Matcher::parse_path_prefix("//internal/").unwrap_err();
        assert!(e.contains("`/internal/`"), "{e}");
        assert!(Matcher::parse_path_prefix("/a/../b").is_err());
    }

    #[test]
    fn a_doubled_slash_gets_the_narrow_route() {
        let r = routes(
            "routes:\n  - name: internal\n    match: {path_prefix: /internal/}\n    audiences: [internal]\n  - name: broad\n    audiences: [broad]\n",
        );
        for path in ["/internal/x", "//internal/x", "/x/../internal/x"] {
            let c = req("h", path, "GET", &[]);
            let view = RequestView::new(&c).unwrap();
            assert_eq!(r.select(&view).unwrap().name, "internal", "{path}");
        }
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
    fn host_pattern_parse() {
        assert_eq!(
            HostPattern::parse(" Vault "),
            Ok(HostPattern::Exact("vault".into()))
        );
        for bad in ["", "*.", "a*b", "*", "host:80", "a/b", "*.*.x"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Matcher::parse_path_prefix("/"), Ok(None));
        assert!(Matcher::parse_path_prefix("api").is_err());
        assert_eq!(Matcher::parse_method(" get"), Ok("GET".into()));
        assert!(Matcher::parse_method("GE T").is_err());
    }

    #[test]
    fn suffix_does_not_match_apex_or_partial_label() {
        let p = HostPattern::parse("*.example.com").unwrap();
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.EXAMPLE.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
    }
}
