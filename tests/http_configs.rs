//! The published HTTP-mode samples, checked without traffic: the Traefik ForwardAuth
//! middleware (its structure field by field; tests/traefik_forward_auth.rs runs it), the
//! Envoy `http_service` config (validated by Envoy, security settings asserted) and every
//! HTTP-mode tokengate config (accepted by `tokengate check-config`, with `listen.http` set and
//! agreeing with the proxy's address).

mod common;

use std::collections::BTreeSet;

use common::check_config;
use serde_json::Value;
use testkit::envoy::validate_file;
use testkit::yaml::{at, load, parse_all};
use testkit::IDENTITY_HEADERS;

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_ascii_lowercase())
        .collect()
}

fn token_headers(tokengate: &Value) -> BTreeSet<String> {
    strings(&Value::Array(
        tokengate["token_sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["header"].clone())
            .collect(),
    ))
    .into_iter()
    .collect()
}

#[test]
fn http_mode_tokengate_configs_pass_check_config() {
    let root = testkit::workspace_root();
    for file in [
        "envoy/tokengate-sidecar-http.yaml",
        "deploy/nginx/tokengate.yaml",
        "deploy/traefik/tokengate.yaml",
    ] {
        check_config(file, &root.join(file));
        assert!(
            load(file).unwrap()["listen"]["http"].is_string(),
            "{file}: listen.http not set"
        );
    }
}

#[test]
fn traefik_forward_auth_sends_the_token_only_and_copies_every_identity_header() {
    let text =
        std::fs::read_to_string(testkit::workspace_root().join("deploy/traefik/middleware.yaml"))
            .unwrap();
    let docs = parse_all(&text).unwrap();
    let fa = docs
        .iter()
        .find(|d| d["kind"] == "Middleware" && d["spec"]["forwardAuth"].is_object())
        .expect("a ForwardAuth Middleware")["spec"]["forwardAuth"]
        .clone();
    let tokengate = load("deploy/traefik/tokengate.yaml").unwrap();

    // The address is tokengate's forward-auth path on its HTTP port.
    let address = fa["address"].as_str().unwrap();
    let http_port = tokengate["listen"]["http"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    assert!(
        address.ends_with(&format!(
            ":{http_port}{}",
            tokengate::http::FORWARD_AUTH_PATH
        )),
        "{address} is not tokengate's forward-auth endpoint on port {http_port}"
    );
    let service = load("deploy/traefik/service.yaml").unwrap();
    assert_eq!(at(&service, "spec.ports.0.port").to_string(), http_port);
    assert!(address.contains(&format!(
        "//{}.",
        service["metadata"]["name"].as_str().unwrap()
    )));

    assert_eq!(
        fa["trustForwardHeader"], false,
        "client X-Forwarded-* trusted"
    );
    // Only the token headers go to tokengate: never the route header or X-Original-*.
    let sent: BTreeSet<String> = strings(&fa["authRequestHeaders"]).into_iter().collect();
    assert_eq!(
        sent,
        token_headers(&tokengate),
        "authRequestHeaders vs token_sources"
    );
    // Every identity header is deleted from the client's request and copied from tokengate.
    let copied: BTreeSet<String> = strings(&fa["authResponseHeaders"]).into_iter().collect();
    let identity: BTreeSet<String> = IDENTITY_HEADERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(copied, identity, "authResponseHeaders vs identity headers");

    // Traefik cannot set X-Tokengate-Route: its routes must not depend on it.
    for route in tokengate["routes"].as_array().unwrap() {
        assert!(
            route["match"]["context_extensions"].is_null(),
            "route {} needs context_extensions, which Traefik cannot send",
            route["name"]
        );
    }
    // The middleware chain puts ForwardAuth on the route.
    let ingress = docs.iter().find(|d| d["kind"] == "IngressRoute").unwrap();
    let names: Vec<&str> = at(ingress, "spec.routes.0.middlewares")
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"tokengate"), "{names:?}");
}

#[test]
fn envoy_http_service_config_is_valid_and_closed() {
    let root = testkit::workspace_root();
    validate_file(&root.join("envoy/sidecar-http.yaml")).unwrap();
    let config = load("envoy/sidecar-http.yaml").unwrap();
    let hcm = &at(
        &config,
        "static_resources.listeners.0.filter_chains.0.filters.0",
    )["typed_config"];
    let authz = hcm["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ext_authz")
        .unwrap()["typed_config"]
        .clone();
    assert_eq!(authz["failure_mode_allow"], false);
    assert_eq!(at(&authz, "status_on_error.code"), 503);
    let upstream: BTreeSet<String> = authz["http_service"]["authorization_response"]
        ["allowed_upstream_headers"]["patterns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["exact"].as_str().unwrap().to_owned())
        .collect();
    let identity: BTreeSet<String> = IDENTITY_HEADERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        upstream, identity,
        "allowed_upstream_headers vs identity headers"
    );
    // The route header and the identity headers are never forwarded from the client.
    for p in authz["allowed_headers"]["patterns"].as_array().unwrap() {
        let name = p["exact"].as_str().expect("exact header patterns only");
        assert!(
            name != tokengate::http::ROUTE_HEADER && !identity.contains(name),
            "allowed_headers forwards {name}"
        );
    }
    // tokengate strips the prefix Envoy adds.
    let tokengate = load("envoy/tokengate-sidecar-http.yaml").unwrap();
    assert_eq!(
        authz["http_service"]["path_prefix"],
        tokengate["listen"]["http_path_prefix"]
    );
}
