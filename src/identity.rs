//! Who the caller is: the [`Identity`] TokenReview vouched for, and [`TokenHash`], the only
//! way a token may appear in a log line.

use std::collections::BTreeMap;
use std::fmt;

/// A Kubernetes service account that TokenReview vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Full username, `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    /// Service-account namespace.
    pub namespace: String,
    /// Service-account name.
    pub name: String,
    /// Service-account UID, when the API server reported one.
    pub uid: Option<String>,
    /// Groups as reported by TokenReview (order kept).
    pub groups: Vec<String>,
    /// Pod the token is bound to (`authentication.kubernetes.io/pod-name`), if any.
    pub pod_name: Option<String>,
    /// UID of that pod (`authentication.kubernetes.io/pod-uid`), if any.
    pub pod_uid: Option<String>,
    /// The user's `extra` as TokenReview reported it (pod and node name/UID, credential ID),
    /// passed on whole in SubjectAccessReviews (`allow.rbac`).
    pub extra: Extra,
}

/// A user's `extra` (`map[string][]string`), kept as one compact JSON string with sorted keys:
/// one allocation of a few hundred bytes per cached identity instead of a map of a dozen
/// (100,000 cached identities would otherwise carry ~100 MiB of it). Read back only to build
/// a SubjectAccessReview.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extra(Option<Box<str>>);

impl Extra {
    /// From the map (empty: nothing stored).
    pub fn from_map(map: &BTreeMap<String, Vec<String>>) -> Extra {
        if map.is_empty() {
            return Extra(None);
        }
        // A map of strings always serializes.
        Extra(serde_json::to_string(map).ok().map(String::into_boxed_str))
    }

    /// The stored JSON (sorted keys; `""` when empty): one string that identifies the map.
    pub fn as_json(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }

    /// The map again.
    pub fn to_map(&self) -> BTreeMap<String, Vec<String>> {
        self.0
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default()
    }
}

/// Shows a token in logs as a short SHA-256 prefix: enough to correlate lines, useless to
/// replay. Tokens are never logged any other way. Hashing happens only when formatted.
#[derive(Debug, Clone, Copy)]
pub struct TokenHash<'a>(pub &'a str);

impl fmt::Display for TokenHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.0.as_bytes());
        f.write_str("sha256:")?;
        for b in &digest.as_ref()[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_round_trips_and_empty_stores_nothing() {
        let map: BTreeMap<String, Vec<String>> = [
            ("b".to_string(), vec!["2".to_string(), "3".to_string()]),
            ("a".to_string(), vec!["1".to_string()]),
        ]
        .into();
        assert_eq!(Extra::from_map(&map).to_map(), map);
        assert_eq!(Extra::from_map(&BTreeMap::new()), Extra::default());
        assert!(Extra::default().to_map().is_empty());
    }

    #[test]
    fn token_hash_is_short_and_stable() {
        let h = TokenHash("secret.token.value").to_string();
        assert_eq!(h.len(), "sha256:".len() + 12);
        assert_eq!(h, TokenHash("secret.token.value").to_string());
        assert!(!h.contains("secret"));
    }
}
