//! Who the caller is: the [`Identity`] TokenReview vouched for, and [`TokenHash`], the only
//! way a token may appear in a log line.

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
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
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
    fn token_hash_is_short_and_stable() {
        let h = TokenHash("secret.token.value").to_string();
        assert_eq!(h.len(), "sha256:".len() + 12);
        assert_eq!(h, TokenHash("secret.token.value").to_string());
        assert!(!h.contains("secret"));
    }
}
