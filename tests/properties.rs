//! Property tests (issue 12 item 7) over the request edge: reading a CheckRequest (host, path,
//! headers from Envoy's `headers` map or `header_map` with raw bytes) and finding the token,
//! then precheck on whatever was found. Bounded (256 cases each) so they run in the suite.
//! Properties: never a panic; never a token that is empty, holds whitespace or a comma, or
//! came from a header other than a configured source; precheck never passes junk.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, AttributeContext, CheckRequest,
};
use proptest::prelude::*;
use tokengate::config::TokenSource;
use tokengate::request::{RequestView, TokenLookup};

fn sources() -> Vec<TokenSource> {
    vec![
        TokenSource {
            header: "authorization".into(),
            scheme: Some("Bearer".into()),
        },
        TokenSource {
            header: "x-client-id".into(),
            scheme: None,
        },
    ]
}

/// Header names: mostly the interesting ones, in any case, sometimes anything.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("authorization".to_owned()),
        Just("Authorization".to_owned()),
        Just("AUTHORIZATION".to_owned()),
        Just("x-client-id".to_owned()),
        Just("X-Client-Id".to_owned()),
        "[a-zA-Z0-9-]{0,12}",
        ".{0,8}",
    ]
}

/// Header values: bearer-ish, token-ish, or anything.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "(Bearer|bearer|BEARER|Basic|)[ \t]{0,3}[A-Za-z0-9._~+/=, -]{0,40}",
        "[A-Za-z0-9._-]{0,60}",
        ".{0,60}",
    ]
}

fn check_found(lookup: &TokenLookup<'_, '_>) -> Result<(), TestCaseError> {
    if let TokenLookup::Found { token, source } = lookup {
        prop_assert!(!token.is_empty());
        prop_assert!(!token.bytes().any(|b| b == b',' || b <= b' '), "{token:?}");
        prop_assert!(sources().contains(source));
    }
    Ok(())
}

fn request(
    host: &str,
    path: &str,
    map: &[(String, String)],
    raw: &[(String, Vec<u8>)],
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    host: host.to_owned(),
                    path: path.to_owned(),
                    method: "GET".to_owned(),
                    headers: map.iter().cloned().collect(),
                    header_map: (!raw.is_empty()).then(|| HeaderMap {
                        headers: raw
                            .iter()
                            .map(|(k, v)| HeaderValue {
                                key: k.clone(),
                                value: String::new(),
                                raw_value: v.clone(),
                            })
                            .collect(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Plain header lines (duplicates included): never a panic; a found token is clean, and
    /// precheck on it never panics.
    #[test]
    fn header_lines(
        host in ".{0,30}",
        path in ".{0,40}",
        headers in proptest::collection::vec((name(), value()), 0..6),
    ) {
        let ext = HashMap::new();
        let pairs: Vec<(&str, &str)> =
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let view = RequestView::from_parts(&host, &path, "GET", &ext, &pairs);
        prop_assert!(!view.path.contains('?'));
        let sources = sources();
        let lookup = view.token(&sources);
        check_found(&lookup)?;
        if let TokenLookup::Found { token, .. } = lookup {
            let _ = tokengate::precheck::precheck(token, &["a".to_owned()], 1_800_000_000);
        }
    }

    /// Envoy's two header encodings, raw bytes included (not always UTF-8).
    #[test]
    fn envoy_check_requests(
        host in ".{0,30}",
        path in ".{0,40}",
        map in proptest::collection::vec(
            (prop_oneof![Just("authorization".to_owned()), Just("x-client-id".to_owned()), "[a-z-]{1,8}"], value()),
            0..4,
        ),
        raw in proptest::collection::vec(
            (name(), proptest::collection::vec(any::<u8>(), 0..40)),
            0..4,
        ),
    ) {
        let req = request(&host, &path, &map, &raw);
        let view = RequestView::new(&req).expect("has HTTP attributes");
        let sources = sources();
        check_found(&view.token(&sources))?;
    }

    /// A token found in a header always round-trips: `Bearer <t>` yields exactly `t` when `t`
    /// is clean.
    #[test]
    fn bearer_round_trip(t in "[A-Za-z0-9._~+/=-]{1,80}", spaces in "[ \t]{1,3}") {
        let ext = HashMap::new();
        let value = format!("Bearer{spaces}{t}");
        let pairs = [("authorization", value.as_str())];
        let view = RequestView::from_parts("h", "/", "GET", &ext, &pairs);
        let sources = sources();
        match view.token(&sources) {
            TokenLookup::Found { token, source } => {
                prop_assert_eq!(token, t.as_str());
                prop_assert_eq!(&source.header, "authorization");
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }
}
