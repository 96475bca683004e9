//! A borrowed view of Envoy's `CheckRequest`: the few attributes routing needs, and the token.
//!
//! Envoy sends headers either in the `headers` map (lower-cased keys, duplicates merged with
//! commas) or, with `encode_raw_headers: true`, in `header_map` (raw, one entry per header line);
//! both are read. Nothing here allocates: the view borrows from the request. The rest of the
//! pipeline sees only the view; [`RequestView::from_parts`] builds one without a protobuf
//! (unit tests, or another front end).

use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use std::collections::HashMap;

use crate::config::TokenSource;

/// The IP address of an Envoy `Peer` with a socket address (a pipe or none: empty).
fn source_ip(peer: Option<&Peer>) -> &str {
    match peer
        .and_then(|p| p.address.as_ref())
        .and_then(|a| a.address.as_ref())
    {
        Some(address::Address::SocketAddress(s)) => &s.address,
        _ => "",
    }
}

/// What routing and token extraction need from a CheckRequest.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Host (`:authority`) without port.
    pub host: &'a str,
    /// Path without query string or fragment.
    pub path: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Envoy per-route `context_extensions`.
    pub context_extensions: &'a HashMap<String, String>,
    /// The mTLS peer's identity (`source.principal`: its certificate's URI SAN, else its
    /// subject); empty without a client certificate.
    pub source_principal: &'a str,
    /// The downstream peer's IP address (Envoy's `attributes.source.address`), or, when Envoy
    /// sends none, what the front end sets (the connection's peer); empty if unknown. Only
    /// used to share review slots fairly between peers (see `slots`).
    pub source: &'a str,
    headers: Headers<'a>,
}

/// Where a view's headers come from.
#[derive(Debug, Clone, Copy)]
enum Headers<'a> {
    /// Envoy's HTTP attributes: the `headers` map, then `header_map`.
    Envoy(&'a HttpRequest),
    /// Plain `(name, value)` pairs, one per header line.
    Pairs(&'a [(&'a str, &'a str)]),
}

/// A header's presence in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header<'a> {
    /// Not sent.
    Absent,
    /// Sent once (the value).
    One(&'a str),
    /// Sent more than once, or not valid UTF-8: never a usable credential.
    Unusable,
}

/// The outcome of looking for a token: `'a` borrows from the request, `'s` from the sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLookup<'a, 's> {
    /// No configured source carried a token.
    Missing,
    /// A source header was present but empty, duplicated or `<scheme>` without a token.
    Malformed,
    /// A token, and the source it came from.
    Found {
        /// The token (scheme and surrounding whitespace removed).
        token: &'a str,
        /// The configured source that carried it.
        source: &'s TokenSource,
    },
}

impl<'a> RequestView<'a> {
    /// Builds the view; `None` when the request carries no HTTP attributes.
    pub fn new(req: &'a CheckRequest) -> Option<RequestView<'a>> {
        let attrs = req.attributes.as_ref()?;
        let http = attrs.request.as_ref()?.http.as_ref()?;
        Some(RequestView {
            host: strip_port(&http.host),
            path: strip_query(&http.path),
            method: &http.method,
            context_extensions: &attrs.context_extensions,
            source_principal: attrs.source.as_ref().map_or("", |s| s.principal.as_str()),
            source: source_ip(attrs.source.as_ref()),
            headers: Headers::Envoy(http),
        })
    }

    /// Builds a view from plain values: `host` may carry a port and `path` a query, as on the
    /// wire; `headers` are `(name, value)` pairs, one per header line, names in any case.
    pub fn from_parts(
        host: &'a str,
        path: &'a str,
        method: &'a str,
        context_extensions: &'a HashMap<String, String>,
        headers: &'a [(&'a str, &'a str)],
    ) -> RequestView<'a> {
        RequestView {
            host: strip_port(host),
            path: strip_query(path),
            method,
            context_extensions,
            source_principal: "",
            source: "",
            headers: Headers::Pairs(headers),
        }
    }

    /// The same view with `principal` as the mTLS peer's identity (for a front end that
    /// learns it from its proxy rather than from `source.principal`).
    pub fn with_source_principal(self, principal: &'a str) -> RequestView<'a> {
        RequestView {
            source_principal: principal,
            ..self
        }
    }

    /// The same view with `source` as the peer when the request named none.
    pub fn or_source(mut self, source: &'a str) -> RequestView<'a> {
        if self.source.is_empty() {
            self.source = source;
        }
        self
    }

    /// Looks a header up (name lower-case): for Envoy, in the `headers` map, then in
    /// `header_map`.
    pub fn header(&self, name: &str) -> Header<'a> {
        match self.headers {
            Headers::Envoy(http) => {
                if let Some(v) = http.headers.get(name) {
                    return Header::One(v.as_str());
                }
                let Some(map) = &http.header_map else {
                    return Header::Absent;
                };
                one_of(
                    map.headers
                        .iter()
                        .filter(|h| h.key.eq_ignore_ascii_case(name))
                        .map(|h| {
                            if h.raw_value.is_empty() {
                                Some(h.value.as_str())
                            } else {
                                std::str::from_utf8(&h.raw_value).ok()
                            }
                        }),
                )
            }
            Headers::Pairs(pairs) => one_of(
                pairs
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| Some(*v)),
            ),
        }
    }

    /// Finds the token: the first configured source whose header is present wins. A header
    /// with a different scheme (say `Authorization: Basic`) is not a bearer credential and is
    /// skipped; an empty, duplicated (comma-merged) or token-less header is malformed.
    pub fn token<'s>(&self, sources: &'s [TokenSource]) -> TokenLookup<'a, 's> {
        for source in sources {
            let value = match self.header(&source.header) {
                Header::Absent => continue,
                Header::Unusable => return TokenLookup::Malformed,
                Header::One(v) => v.trim(),
            };
            let token = match &source.scheme {
                None => value,
                Some(scheme) => match split_scheme(value) {
                    Some((s, rest)) if s.eq_ignore_ascii_case(scheme) => rest,
                    Some(_) => continue,
                    None if value.eq_ignore_ascii_case(scheme) => "",
                    None => continue,
                },
            };
            // A comma means Envoy merged repeated headers; whitespace, a stray second word.
            // Bytes, not chars: this runs on every Check over ~1 KB, and anything non-ASCII
            // is refused by precheck before it could ever be cached.
            if token.is_empty() || token.bytes().any(|b| b == b',' || b <= b' ') {
                return TokenLookup::Malformed;
            }
            return TokenLookup::Found { token, source };
        }
        TokenLookup::Missing
    }
}

/// The one value among a header's lines (`None`: not valid UTF-8).
fn one_of<'a>(mut lines: impl Iterator<Item = Option<&'a str>>) -> Header<'a> {
    match (lines.next(), lines.next()) {
        (None, _) => Header::Absent,
        (Some(Some(v)), None) => Header::One(v),
        _ => Header::Unusable,
    }
}

/// `"Bearer   abc"` → `("Bearer", "abc")`.
fn split_scheme(value: &str) -> Option<(&str, &str)> {
    let i = value.find([' ', '\t'])?;
    Some((&value[..i], value[i..].trim_start()))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split_once(']').map_or(host, |(h, _)| h);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn strip_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::auth::v3::{attribute_context, AttributeContext};

    fn req(host: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(HttpRequest {
                        host: host.into(),
                        path: path.into(),
                        method: "GET".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    /// The HTTP attributes of a request built by [`req`], for tests that edit them.
    fn http_mut(r: &mut CheckRequest) -> &mut HttpRequest {
        r.attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap()
    }

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

    #[test]
    fn host_and_path() {
        let r = req("Data-Store:8080", "/a/b?x=1#f", &[]);
        let v = RequestView::new(&r).unwrap();
        assert_eq!(v.host, "Data-Store");
        assert_eq!(v.path, "/a/b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }

    #[test]
    fn no_http_attributes() {
        assert!(RequestView::new(&CheckRequest::default()).is_none());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let r = req("h", "/", &[("authorization", "bEaReR  abc.def.ghi ")]);
        let v = RequestView::new(&r).unwrap();
        assert_eq!(
            v.token(&sources()),
            TokenLookup::Found {
                token: "abc.def.ghi",
                source: &sources()[0]
            }
        );
    }

    #[test]
    fn named_header_and_order() {
        let r = req("h", "/", &[("x-client-id", "tok")]);
        let v = RequestView::new(&r).unwrap();
        assert_eq!(
            v.token(&sources()),
            TokenLookup::Found {
                token: "tok",
                source: &sources()[1]
            }
        );
        let r = req(
            "h",
            "/",
            &[("x-client-id", "b"), ("authorization", "Bearer a")],
        );
        let v = RequestView::new(&r).unwrap();
        assert_eq!(
            v.token(&sources()),
            TokenLookup::Found {
                token: "a",
                source: &sources()[0]
            }
        );
    }

    #[test]
    fn other_scheme_is_skipped() {
        let r = req("h", "/", &[("authorization", "Basic dXNlcjpwdw==")]);
        assert_eq!(
            RequestView::new(&r).unwrap().token(&sources()),
            TokenLookup::Missing
        );
        let r = req(
            "h",
            "/",
            &[
                ("authorization", "Basic dXNlcjpwdw=="),
                ("x-client-id", "t"),
            ],
        );
        assert_eq!(
            RequestView::new(&r).unwrap().token(&sources()),
            TokenLookup::Found {
                token: "t",
                source: &sources()[1]
            }
        );
    }

    #[test]
    fn malformed() {
        for hs in [
            &[("authorization", "Bearer")][..],
            &[("authorization", "Bearer ")],
            &[("authorization", "Bearer a, Bearer b")],
            &[("x-client-id", "")],
            &[("x-client-id", "  ")],
            &[("x-client-id", "a,b")],
            &[("x-client-id", "a b")],
        ] {
            let r = req("h", "/", hs);
            assert_eq!(
                RequestView::new(&r).unwrap().token(&sources()),
                TokenLookup::Malformed,
                "{hs:?}"
            );
        }
        let r = req("h", "/", &[]);
        assert_eq!(
            RequestView::new(&r).unwrap().token(&sources()),
            TokenLookup::Missing
        );
    }

    #[test]
    fn from_parts_reads_like_envoy() {
        let ext = HashMap::new();
        let headers = [("Authorization", "Bearer a.b.c"), ("x-client-id", "t")];
        let v = RequestView::from_parts("Data-Store:8080", "/a?x", "GET", &ext, &headers);
        assert_eq!((v.host, v.path), ("Data-Store", "/a"));
        assert_eq!(
            v.token(&sources()),
            TokenLookup::Found {
                token: "a.b.c",
                source: &sources()[0]
            }
        );
        let twice = [("x-client-id", "a"), ("X-Client-Id", "b")];
        let v = RequestView::from_parts("h", "/", "GET", &ext, &twice);
        assert_eq!(v.header("x-client-id"), Header::Unusable);
        assert_eq!(v.token(&sources()), TokenLookup::Malformed);
    }

    #[test]
    fn raw_header_map() {
        let mut r = req("h", "/", &[]);
        http_mut(&mut r).header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "Authorization".into(),
                raw_value: b"Bearer raw.tok.en".to_vec(),
                ..Default::default()
            }],
        });
        assert_eq!(
            RequestView::new(&r).unwrap().token(&sources()),
            TokenLookup::Found {
                token: "raw.tok.en",
                source: &sources()[0]
            }
        );
        if let Some(m) = http_mut(&mut r).header_map.as_mut() {
            m.headers.push(HeaderValue {
                key: "authorization".into(),
                value: "Bearer other".into(),
                ..Default::default()
            });
        }
        assert_eq!(
            RequestView::new(&r).unwrap().token(&sources()),
            TokenLookup::Malformed
        );
    }
}
