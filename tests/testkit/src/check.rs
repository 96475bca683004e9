//! Envoy's ext_authz wire types for tests: a [`CheckRequest`] as Envoy sends it, and the parts
//! of a [`CheckResponse`] a test asserts on (denied status, reason, headers set or removed).
//!
//! The one place tests build a CheckRequest, so a change to what Envoy sends is made once.

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{attribute_context, AttributeContext};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};

fn pairs<C: FromIterator<(String, String)>>(kv: &[(&str, &str)]) -> C {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A CheckRequest as Envoy sends it: `GET host path` with `headers` and the route's
/// `context_extensions`.
pub fn request(
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    context_extensions: &[(&str, &str)],
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "req-1".into(),
                    method: "GET".into(),
                    host: host.into(),
                    path: path.into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: pairs(headers),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: pairs(context_extensions),
            ..Default::default()
        }),
    }
}

/// `req` as Envoy sends it for a downstream peer at `ip` (`attributes.source.address`).
pub fn from_source(mut req: CheckRequest, ip: &str) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{
        address, socket_address, Address, SocketAddress,
    };
    if let Some(attrs) = req.attributes.as_mut() {
        attrs.source = Some(attribute_context::Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        });
    }
    req
}

/// The denied HTTP status, or `None` for OK.
pub fn denied_status(r: &CheckResponse) -> Option<u16> {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map(|s| s.code as u16),
        _ => None,
    }
}

/// The body of a denial, or `None` for OK.
pub fn denied_body(r: &CheckResponse) -> Option<&str> {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => Some(&d.body),
        _ => None,
    }
}

/// The `x-tokengate-reason` of a denial.
pub fn reason(r: &CheckResponse) -> Option<String> {
    denied_header(r, "x-tokengate-reason")
}

/// A header of a denial.
pub fn denied_header(r: &CheckResponse, name: &str) -> Option<String> {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => find(&d.headers, name),
        _ => None,
    }
}

fn find(headers: &[HeaderValueOption], name: &str) -> Option<String> {
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.clone())
}

/// Asserts an OK answer (gRPC status 0 with an `ok_response`) and returns that response.
pub fn ok_response(r: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(
        r.status.as_ref().map(|s| s.code),
        Some(0),
        "expected OK, got {r:?}"
    );
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("expected an ok_response, got {other:?}"),
    }
}

/// Asserts an OK answer and returns its upstream headers as (name, value).
pub fn allowed_headers(r: &CheckResponse) -> Vec<(String, String)> {
    ok_response(r)
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

/// Asserts an OK answer and returns its `headers_to_remove`.
pub fn removed_headers(r: &CheckResponse) -> Vec<String> {
    ok_response(r).headers_to_remove.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::DeniedHttpResponse;

    #[test]
    fn request_puts_each_part_where_envoy_does() {
        let r = request(
            "data-store:8080",
            "/items?x=1",
            &[("x-client-id", "t")],
            &[("route", "data-store")],
        );
        let attrs = r.attributes.unwrap();
        let http = attrs.request.unwrap().http.unwrap();
        assert_eq!(
            (http.host.as_str(), http.path.as_str()),
            ("data-store:8080", "/items?x=1")
        );
        assert_eq!(http.headers["x-client-id"], "t");
        assert_eq!(attrs.context_extensions["route"], "data-store");
    }

    #[test]
    #[should_panic(expected = "expected OK")]
    fn ok_response_refuses_a_denial() {
        let denied = CheckResponse {
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse::default())),
            ..Default::default()
        };
        assert_eq!(denied_status(&denied), None);
        removed_headers(&denied);
    }
}
