//! Property tests (issue 12 item 7) over the request edge: reading a CheckRequest (host, path,
//! headers from Envoy's `headers` map or `header_map` with raw bytes) and finding the token,
//! then precheck on whatever was found. Bounded (256 cases each) so they run in the suite.
//! Properties: never a panic; never a token that is empty, holds whitespace or a comma, or
//! came from a header other than a configured source; precheck never passes junk. Route
//! selection: the canonical path is idempotent and clean, and a path disguised with `//`,
//! dot segments, percent-encoding or `%2F` selects the same route as the plain path.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, AttributeContext, CheckRequest,
};
use proptest::prelude::*;
use tokengate::config::TokenSource;
use tokengate::request::{RequestView, TokenLookup};
use tokengate::route::{canonical_path, Routes};

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

/// A canonical path: `/`, or `/seg` repeated (segments of safe characters), maybe with a
/// trailing slash.
fn clean_path() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec("[a-zA-Z0-9_~-][a-zA-Z0-9._~-]{0,7}", 0..5),
        any::<bool>(),
    )
        .prop_filter("no dot segments", |(segs, _)| {
            segs.iter().all(|s| s != "." && s != "..")
        })
        .prop_map(|(segs, trailing)| {
            let mut p: String = segs.iter().map(|s| format!("/{s}")).collect();
            if p.is_empty() || trailing {
                p.push('/');
            }
            p
        })
}

/// `path` disguised by one of the tricks a proxy may pass through unnormalized.
fn disguise(path: &str, trick: u8, at: usize) -> String {
    let slashes: Vec<usize> = path.match_indices('/').map(|(i, _)| i).collect();
    let i = slashes[at % slashes.len()];
    match trick % 6 {
        0 => format!("{}/{}", &path[..i], &path[i..]),
        1 => format!("{}/.{}", &path[..i], &path[i..]),
        2 => format!("{}/zz/..{}", &path[..i], &path[i..]),
        3 if i > 0 => format!("{}%2F{}", &path[..i], &path[i + 1..]),
        4 => match path[i + 1..].chars().next() {
            Some(c) if c.is_ascii_alphanumeric() => {
                format!("{}/%{:02x}{}", &path[..i], c as u32, &path[i + 2..])
            }
            _ => format!("/..{path}"),
        },
        _ => format!("/..{path}"),
    }
}

fn routes() -> Routes {
    let cfg = tokengate::Config::from_yaml_str(
        "routes:\n  - name: admin\n    match:\n      path_prefix: /admin/\n    audiences: [a]\n  - name: rest\n    audiences: [a]\n",
    )
    .expect("config");
    Routes::new(&cfg.routes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any path: never a panic; the canonical form starts with `/`, has no empty, `.` or `..`
    /// segment, and is its own canonical form.
    #[test]
    fn canonical_paths_are_clean(path in "/[a-z/.%2fF5cC\\\\]{0,30}") {
        let c = canonical_path(&path).into_owned();
        prop_assert!(c.starts_with('/'), "{path:?} -> {c:?}");
        prop_assert!(!c.contains("//"), "{path:?} -> {c:?}");
        prop_assert!(!c.split('/').any(|s| s == "." || s == ".."), "{path:?} -> {c:?}");
        prop_assert_eq!(canonical_path(&c).into_owned(), c);
    }

    /// A disguised path canonicalizes to the plain one and selects the same route.
    #[test]
    fn disguised_paths_select_the_same_route(
        admin in any::<bool>(),
        path in clean_path(),
        tricks in proptest::collection::vec((any::<u8>(), any::<usize>()), 1..4),
    ) {
        let path = if admin { format!("/admin{path}") } else { path };
        let mut disguised = path.clone();
        for (t, at) in tricks {
            disguised = disguise(&disguised, t, at);
        }
        prop_assert_eq!(canonical_path(&disguised).into_owned(), path.clone(), "{}", disguised);
        let routes = routes();
        let ext = HashMap::new();
        let plain = RequestView::from_parts("h", &path, "GET", &ext, &[]);
        let tricky = RequestView::from_parts("h", &disguised, "GET", &ext, &[]);
        let name = |v: &RequestView<'_>| routes.select(v).map(|r| r.name.clone());
        prop_assert_eq!(name(&plain), name(&tricky), "{} vs {}", path, disguised);
        let expected = if path.starts_with("/admin/") { "admin" } else { "rest" };
        prop_assert_eq!(name(&plain), Some(expected.to_owned()));
    }
}
