//! mTLS peer binding (`require_peer: service_account`): the token must be presented by the
//! workload it belongs to.
//!
//! When Envoy terminates mTLS it reports the client certificate's identity in
//! `attributes.source.principal`: the first URI SAN, else the subject. Under Istio that is
//! the workload's SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`. A route that
//! requires its peer refuses a Check without one (`peer_missing`, decided before any
//! TokenReview) and one whose peer is not exactly the token's service account
//! (`peer_mismatch`): a token copied out of one pod and replayed from another workload is
//! refused even though the token itself is valid.
//!
//! The ID is parsed strictly, as the SPIFFE ID specification (and go-spiffe) do: lower-case
//! `spiffe://` scheme, a trust domain of `[a-z0-9._-]`, path segments of `[A-Za-z0-9._-]`,
//! none empty, `.` or `..`, no percent-encoding, query, fragment, port or user info, and
//! exactly the four segments `ns/<namespace>/sa/<name>`. Anything else is not a service
//! account and never matches. The trust domain is `kubernetes.trust_domain` when configured;
//! absent, any trust domain is accepted (the proxy's certificate validation decides which
//! CAs, and so which trust domains, can reach tokengate at all).

use crate::denial::Denial;
use crate::identity::Identity;

/// What a route requires of its mTLS peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBinding {
    /// The one accepted trust domain; `None` accepts any.
    pub trust_domain: Option<String>,
}

/// A SPIFFE ID naming a Kubernetes service account, borrowed from the principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeServiceAccount<'a> {
    /// Trust domain (lower-case).
    pub trust_domain: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Service-account name.
    pub name: &'a str,
}

/// Why a principal is not a service account's SPIFFE ID (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSpiffe {
    /// Does not start with `spiffe://`.
    Scheme,
    /// Empty trust domain or characters outside `[a-z0-9._-]`.
    TrustDomain,
    /// An empty, `.` or `..` segment, or characters outside `[A-Za-z0-9._-]`.
    Segment,
    /// A valid SPIFFE ID, but not `/ns/<namespace>/sa/<name>`.
    NotServiceAccount,
}

impl NotSpiffe {
    /// Short text for logs.
    pub const fn code(self) -> &'static str {
        match self {
            NotSpiffe::Scheme => "not a spiffe:// URI",
            NotSpiffe::TrustDomain => "invalid trust domain",
            NotSpiffe::Segment => "invalid path segment",
            NotSpiffe::NotServiceAccount => "not /ns/<namespace>/sa/<name>",
        }
    }
}

fn trust_domain_ok(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parses `spiffe://<td>/ns/<namespace>/sa/<name>` strictly (see the module comment).
pub fn parse(principal: &str) -> Result<SpiffeServiceAccount<'_>, NotSpiffe> {
    // SPIFFE IDs are at most 2048 bytes.
    if principal.len() > 2048 {
        return Err(NotSpiffe::Segment);
    }
    let rest = principal
        .strip_prefix("spiffe://")
        .ok_or(NotSpiffe::Scheme)?;
    let (trust_domain, path) = rest.split_once('/').ok_or(NotSpiffe::NotServiceAccount)?;
    if !trust_domain_ok(trust_domain) {
        return Err(NotSpiffe::TrustDomain);
    }
    let mut segments = path.split('/');
    let mut next = || -> Result<Option<&str>, NotSpiffe> {
        match segments.next() {
            None => Ok(None),
            Some(s) if segment_ok(s) => Ok(Some(s)),
            Some(_) => Err(NotSpiffe::Segment),
        }
    };
    match (next()?, next()?, next()?, next()?, next()?) {
        (Some("ns"), Some(namespace), Some("sa"), Some(name), None) => Ok(SpiffeServiceAccount {
            trust_domain,
            namespace,
            name,
        }),
        _ => Err(NotSpiffe::NotServiceAccount),
    }
}

/// Parses a `kubernetes.trust_domain` setting (lower-case `[a-z0-9._-]`, as in SPIFFE IDs).
pub fn parse_trust_domain(text: &str) -> Result<String, String> {
    let td = text.trim();
    if trust_domain_ok(td) {
        Ok(td.to_owned())
    } else {
        Err(format!(
            "`{td}` is not a SPIFFE trust domain (lower-case letters, digits, '.', '-', '_')"
        ))
    }
}

impl PeerBinding {
    /// Before the token is verified: the peer the Check must come from. `principal` is
    /// `source.principal` (empty when Envoy saw no client certificate).
    pub fn peer<'p>(&self, principal: &'p str) -> Result<SpiffeServiceAccount<'p>, Denial> {
        if principal.is_empty() {
            return Err(Denial::PeerMissing);
        }
        let sa = parse(principal).map_err(|why| {
            tracing::debug!(
                reason = why.code(),
                "mTLS peer is not a service account's SPIFFE ID"
            );
            Denial::PeerMismatch
        })?;
        match &self.trust_domain {
            Some(td) if td != sa.trust_domain => {
                tracing::debug!(
                    trust_domain = sa.trust_domain,
                    "mTLS peer from another trust domain"
                );
                Err(Denial::PeerMismatch)
            }
            _ => Ok(sa),
        }
    }
}

impl SpiffeServiceAccount<'_> {
    /// Whether this peer is the token's service account.
    pub fn is(&self, identity: &Identity) -> bool {
        self.namespace == identity.namespace && self.name == identity.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_ids() {
        assert_eq!(
            parse("spiffe://cluster.local/ns/api/sa/api-sa"),
            Ok(SpiffeServiceAccount {
                trust_domain: "cluster.local",
                namespace: "api",
                name: "api-sa"
            })
        );
    }

    #[test]
    fn refuses_everything_else() {
        for (bad, why) in [
            ("", NotSpiffe::Scheme),
            ("CN=api", NotSpiffe::Scheme),
            ("SPIFFE://cluster.local/ns/a/sa/b", NotSpiffe::Scheme),
            ("https://cluster.local/ns/a/sa/b", NotSpiffe::Scheme),
            ("spiffe://cluster.local", NotSpiffe::NotServiceAccount),
            ("spiffe:///ns/a/sa/b", NotSpiffe::TrustDomain),
            ("spiffe://Cluster.Local/ns/a/sa/b", NotSpiffe::TrustDomain),
            ("spiffe://td:443/ns/a/sa/b", NotSpiffe::TrustDomain),
            ("spiffe://u@td/ns/a/sa/b", NotSpiffe::TrustDomain),
            ("spiffe://td/ns/a/sa/b/", NotSpiffe::Segment),
            ("spiffe://td/ns/a/sa/b/c", NotSpiffe::NotServiceAccount),
            ("spiffe://td/ns//sa/b", NotSpiffe::Segment),
            ("spiffe://td//ns/a/sa/b", NotSpiffe::Segment),
            ("spiffe://td/ns/a/sa/", NotSpiffe::Segment),
            ("spiffe://td/ns/a/sa", NotSpiffe::NotServiceAccount),
            ("spiffe://td/ns/../sa/b", NotSpiffe::Segment),
            ("spiffe://td/ns/./sa/b", NotSpiffe::Segment),
            ("spiffe://td/ns/a%2Fb/sa/c", NotSpiffe::Segment),
            ("spiffe://td/ns/a/sa/%62", NotSpiffe::Segment),
            ("spiffe://td/ns/a/sa/b?x=1", NotSpiffe::Segment),
            ("spiffe://td/ns/a/sa/b#f", NotSpiffe::Segment),
            ("spiffe://td/NS/a/sa/b", NotSpiffe::NotServiceAccount),
            ("spiffe://td/sa/b/ns/a", NotSpiffe::NotServiceAccount),
            ("spiffe://td/ns/a b/sa/c", NotSpiffe::Segment),
            ("spiffe://td/ns/ä/sa/c", NotSpiffe::Segment),
        ] {
            assert_eq!(parse(bad), Err(why), "{bad:?}");
        }
        assert_eq!(
            parse(&format!("spiffe://td/ns/a/sa/{}", "b".repeat(2100))),
            Err(NotSpiffe::Segment)
        );
    }

    fn identity(ns: &str, name: &str) -> Identity {
        Identity {
            username: format!("system:serviceaccount:{ns}:{name}"),
            namespace: ns.into(),
            name: name.into(),
            uid: None,
            groups: vec![],
            pod_name: None,
            pod_uid: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn binding_decides_missing_and_mismatch() {
        let any = PeerBinding { trust_domain: None };
        assert_eq!(any.peer(""), Err(Denial::PeerMissing));
        assert_eq!(any.peer("CN=api"), Err(Denial::PeerMismatch));
        let peer = any.peer("spiffe://other.td/ns/api/sa/api").unwrap();
        assert!(peer.is(&identity("api", "api")));
        assert!(!peer.is(&identity("api", "other")));
        assert!(!peer.is(&identity("other", "api")));
        let fixed = PeerBinding {
            trust_domain: Some("cluster.local".into()),
        };
        assert_eq!(
            fixed.peer("spiffe://other.td/ns/api/sa/api"),
            Err(Denial::PeerMismatch)
        );
        assert!(fixed.peer("spiffe://cluster.local/ns/api/sa/api").is_ok());
    }

    #[test]
    fn trust_domain_setting() {
        assert_eq!(
            parse_trust_domain(" cluster.local "),
            Ok("cluster.local".into())
        );
        for bad in ["", "Cluster.local", "td:443", "spiffe://td", "a/b"] {
            assert!(parse_trust_domain(bad).is_err(), "{bad:?}");
        }
    }
}
