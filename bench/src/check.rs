//! A `CheckRequest` shaped like the ones Envoy sends, and gRPC length-prefixed framing.
//!
//! Envoy's ext_authz filter copies every request header, pseudo-headers included, into
//! `attributes.request.http.headers` and adds the route's `context_extensions`; a benchmark of
//! the Check RPC alone should decode the same amount of protobuf, so we mirror that shape.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use prost::Message;

/// Builds a `CheckRequest` for `GET path` on `host` carrying `Authorization: Bearer token`
/// (no header when `token` is empty), with `context_extensions = {route: <route>}`, and the
/// other headers Envoy sends by default.
pub fn check_request(token: &str, host: &str, path: &str, route: &str) -> CheckRequest {
    check_request_with(token, host, path, route, true)
}

/// The route of [`with_peer`] Checks: `require_peer: service_account` in run.sh's config.
pub const PEER_ROUTE: &str = "bench-peer";

/// `req` as Envoy sends it over mTLS: `source.principal` is the client certificate's SPIFFE
/// ID, and the route is [`PEER_ROUTE`].
pub fn with_peer(mut req: CheckRequest, principal: &str) -> CheckRequest {
    if let Some(attrs) = req.attributes.as_mut() {
        if let Some(source) = attrs.source.as_mut() {
            source.principal = principal.to_owned();
        }
        attrs
            .context_extensions
            .insert("route".into(), PEER_ROUTE.into());
    }
    req
}

/// Like [`check_request`]; with `all_headers == false` only `authorization` is sent, as Envoy
/// does when the filter sets `allowed_headers` to the token headers.
pub fn check_request_with(
    token: &str,
    host: &str,
    path: &str,
    route: &str,
    all_headers: bool,
) -> CheckRequest {
    let defaults: &[(&str, &str)] = if all_headers {
        &[
            (":authority", host),
            (":method", "GET"),
            (":path", path),
            (":scheme", "http"),
            ("user-agent", "wrk"),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "7b9f3c1e-2a4d-4f8e-9c1b-5d6e7f8a9b0c"),
        ]
    } else {
        &[]
    };
    let mut headers: HashMap<String, String> = defaults
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !token.is_empty() {
        headers.insert("authorization".into(), format!("Bearer {token}"));
    }
    let peer = |port: u32| {
        Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                        port,
                    ),
                ),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(40000)),
            destination: Some(peer(8080)),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "1234567890".into(),
                    method: "GET".into(),
                    headers,
                    path: path.into(),
                    host: host.into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
            }),
            context_extensions: [("route".to_string(), route.to_string())].into(),
            ..Default::default()
        }),
    }
}

/// Encodes `msg` as one gRPC message: flag byte 0 (uncompressed), 4-byte big-endian length,
/// then the protobuf bytes. This is the whole request body of a unary call.
pub fn grpc_frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips() {
        let req = check_request("abc", "bench", "/", "bench");
        let framed = grpc_frame(&req);
        assert_eq!(framed[0], 0);
        let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
        assert_eq!(len, framed.len() - 5);
        let back = CheckRequest::decode(&framed[5..]).unwrap();
        let http = back.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.headers["authorization"], "Bearer abc");
    }
}
