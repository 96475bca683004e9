//! Why a request was refused: [`Denial`], one enum with three faces.
//!
//! A client-facing text (`Display`), an HTTP status, and a fixed snake_case [`Denial::code`]
//! used in the `x-tokengate-reason` header, the JSON body, the `reason` metric label and the
//! README's decision table (a unit test keeps the README in sync), so they cannot drift apart.

use std::fmt;

/// Why a request was denied. Every variant maps to one HTTP status and one snake_case code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// No configured token source carried a token.
    MissingToken,
    /// A token header was present but empty, duplicated or not `<scheme> <token>`, or the token
    /// is not a JWT (three base64url parts with a JSON payload).
    MalformedToken,
    /// The token is longer than the 16 KiB limit.
    TokenTooLarge,
    /// The token's unverified `exp` is in the past (beyond the API server's 60 s leeway).
    TokenExpired,
    /// The token's `aud` (unverified, or as confirmed by TokenReview) shares nothing with the
    /// route's audiences.
    WrongAudience,
    /// TokenReview answered `authenticated: false` (bad signature, expired, deleted pod or
    /// service account, unknown issuer, ...).
    TokenRejected,
    /// TokenReview authenticated a user that is not a service account.
    NotServiceAccount,
    /// Valid service account, but not on the route's allow-list.
    NotAllowed,
    /// On the allow-list, but the route's `allow.rbac` SubjectAccessReview did not allow it.
    RbacDenied,
    /// The route requires the caller's mTLS peer identity (`require_peer`), and the Check
    /// carried none (plaintext connection, or HTTP mode).
    PeerMissing,
    /// The mTLS peer is not the token's service account (another account, another trust
    /// domain, or not a SPIFFE service-account ID at all).
    PeerMismatch,
    /// No route matched the request and no default route is configured.
    NoRoute,
    /// The CheckRequest carried no HTTP attributes (for example, the network ext_authz filter).
    BadRequest,
}

impl Denial {
    /// Every reason, in decision-table order.
    pub const ALL: [Denial; 13] = [
        Denial::MissingToken,
        Denial::MalformedToken,
        Denial::TokenTooLarge,
        Denial::TokenExpired,
        Denial::WrongAudience,
        Denial::TokenRejected,
        Denial::NotServiceAccount,
        Denial::NotAllowed,
        Denial::RbacDenied,
        Denial::PeerMissing,
        Denial::PeerMismatch,
        Denial::NoRoute,
        Denial::BadRequest,
    ];

    /// Fixed snake_case code: reason header, JSON `reason`, metric label.
    pub const fn code(self) -> &'static str {
        match self {
            Denial::MissingToken => "missing_token",
            Denial::MalformedToken => "malformed_token",
            Denial::TokenTooLarge => "token_too_large",
            Denial::TokenExpired => "token_expired",
            Denial::WrongAudience => "wrong_audience",
            Denial::TokenRejected => "token_rejected",
            Denial::NotServiceAccount => "not_service_account",
            Denial::NotAllowed => "not_allowed",
            Denial::RbacDenied => "rbac_denied",
            Denial::PeerMissing => "peer_missing",
            Denial::PeerMismatch => "peer_mismatch",
            Denial::NoRoute => "no_route",
            Denial::BadRequest => "bad_request",
        }
    }

    /// Whether this is an "invalid token" denial, whose status the route may set to 401.
    pub const fn is_invalid_token(self) -> bool {
        matches!(
            self,
            Denial::MalformedToken
                | Denial::TokenTooLarge
                | Denial::TokenExpired
                | Denial::WrongAudience
                | Denial::TokenRejected
                | Denial::NotServiceAccount
        )
    }

    /// HTTP status sent to the client. `invalid_token_status` is the route's choice (403 or
    /// 401) for invalid-token denials; without a route it is 403.
    pub const fn http_status(self, invalid_token_status: u16) -> u16 {
        match self {
            Denial::MissingToken => 401,
            d if d.is_invalid_token() => invalid_token_status,
            _ => 403,
        }
    }

    /// Position in [`Denial::ALL`]; used to index pre-built metric handles.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denial::MissingToken => "a bearer token is required",
            Denial::MalformedToken => "the token is malformed",
            Denial::TokenTooLarge => "the token is too large",
            Denial::TokenExpired => "the token has expired",
            Denial::WrongAudience => "the token is not meant for this service",
            Denial::TokenRejected => "the token is invalid",
            Denial::NotServiceAccount => "the token does not belong to a service account",
            Denial::NotAllowed => "this service account is not allowed here",
            Denial::RbacDenied => "RBAC does not allow this service account here",
            Denial::PeerMissing => "the caller presented no mTLS peer identity",
            Denial::PeerMismatch => "the token was presented by another workload",
            Denial::NoRoute => "no route is configured for this request",
            Denial::BadRequest => "the request has no HTTP attributes",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_position_in_all() {
        for (i, d) in Denial::ALL.iter().enumerate() {
            assert_eq!(d.index(), i, "{d:?}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(Denial::MissingToken.http_status(403), 401);
        assert_eq!(Denial::TokenRejected.http_status(403), 403);
        assert_eq!(Denial::TokenRejected.http_status(401), 401);
        assert_eq!(Denial::NotAllowed.http_status(401), 403);
        assert_eq!(Denial::NoRoute.http_status(401), 403);
    }

    /// The README's decision table must list every reason code, with its status.
    #[test]
    fn readme_decision_table_lists_every_reason() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## Decision table")
            .expect("README has a Decision table section");
        let section = &readme[start..];
        let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
        let section = &section[..end];
        for d in Denial::ALL {
            let needle = format!("`{}`", d.code());
            let row = section
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&needle))
                .unwrap_or_else(|| panic!("README decision table lacks {needle}"));
            // | situation | status | reason | TokenReview? |
            let status = row.split('|').nth(2).unwrap_or("").trim();
            assert!(
                status.starts_with(&d.http_status(403).to_string()),
                "README says {status:?} for {needle}, code says {}",
                d.http_status(403)
            );
            if d.is_invalid_token() {
                assert!(
                    status.contains("401"),
                    "{needle}: README should mention 401"
                );
            }
        }
    }
}
