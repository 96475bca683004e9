//! The published Envoy configs (`envoy/`) and their tokengate configs, checked without traffic:
//! Envoy itself validates every file (as published and as the test harness renders it), and the
//! security-relevant settings are asserted field by field, so an edit that opens a door (fail
//! open, a route without stripping, a misspelt per-route key) fails here before it fails in
//! `envoy_sidecar.rs` / `envoy_istio.rs`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::check_config;
use serde_json::Value;
use testkit::envoy::{render, validate_file, validate_str, Ports};
use testkit::yaml::{at, load};
use testkit::IDENTITY_HEADERS;

const EXT_AUTHZ: &str = "envoy.filters.http.ext_authz";

fn hcm(config: &Value) -> &Value {
    let filter = at(
        config,
        "static_resources.listeners.0.filter_chains.0.filters.0",
    );
    assert_eq!(
        filter["name"], "envoy.filters.network.http_connection_manager",
        "first network filter must be the HCM"
    );
    &filter["typed_config"]
}

fn http_filter<'a>(hcm: &'a Value, name: &str) -> &'a Value {
    hcm["http_filters"]
        .as_array()
        .expect("http_filters")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no http filter {name}"))
}

fn http_filter_names(hcm: &Value) -> Vec<String> {
    hcm["http_filters"]
        .as_array()
        .expect("http_filters")
        .iter()
        .map(|f| f["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn routes(hcm: &Value) -> &Vec<Value> {
    at(hcm, "route_config.virtual_hosts.0.routes")
        .as_array()
        .expect("routes")
}

/// The authz cluster must speak HTTP/2 (gRPC) and point at the fixed tokengate port.
fn assert_authz_cluster(config: &Value, name: &str) {
    let cluster = at(config, "static_resources.clusters")
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}"));
    // The key contains dots, so index it directly rather than through `at`.
    let opts = &cluster["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert!(
        opts["explicit_http_config"]["http2_protocol_options"].is_object(),
        "cluster {name} must use HTTP/2: {cluster}"
    );
    assert_eq!(
        at(
            cluster,
            "load_assignment.endpoints.0.lb_endpoints.0.endpoint.address.socket_address.port_value"
        ),
        9001
    );
}

fn sample_ports() -> Ports {
    Ports {
        listener: 18080,
        admin: 19901,
        authz: 19001,
        upstream: 18081,
    }
}

#[test]
fn published_envoy_configs_pass_envoy_validate() {
    let root = testkit::workspace_root();
    for file in ["envoy/sidecar.yaml", "envoy/istio.yaml"] {
        validate_file(&root.join(file)).unwrap_or_else(|e| panic!("{e:#}"));
        // What the tests actually run must be valid too.
        let rendered = render(file, &sample_ports()).unwrap();
        validate_str(&rendered).unwrap_or_else(|e| panic!("{file} rendered: {e:#}"));
    }
}

#[test]
fn envoy_validate_rejects_a_broken_config() {
    // Proves the validation above can fail: a typo in a field name.
    let broken = std::fs::read_to_string(testkit::workspace_root().join("envoy/sidecar.yaml"))
        .unwrap()
        .replace("failure_mode_allow: false", "failure_mode_alow: false");
    let err = validate_str(&broken).expect_err("envoy accepted an unknown field");
    assert!(format!("{err:#}").contains("failure_mode_alow"), "{err:#}");
}

#[test]
fn sidecar_fails_closed_and_cannot_be_spoofed() {
    let config = load("envoy/sidecar.yaml").unwrap();
    let hcm = hcm(&config);

    // ext_authz comes before the router, and the settings ext-authz.md §4 requires.
    assert_eq!(
        http_filter_names(hcm),
        vec![EXT_AUTHZ, "envoy.filters.http.router"]
    );
    let authz = &http_filter(hcm, EXT_AUTHZ)["typed_config"];
    assert_eq!(authz["transport_api_version"], "V3");
    assert_eq!(authz["failure_mode_allow"], false);
    assert_eq!(authz["status_on_error"]["code"], 503);
    assert_eq!(authz["validate_mutations"], true);
    assert_eq!(
        authz["grpc_service"]["envoy_grpc"]["cluster_name"],
        "tokengate"
    );
    let timeout = authz["grpc_service"]["timeout"].as_str().unwrap();
    let secs: f64 = timeout.trim_end_matches('s').parse().unwrap();
    assert!((0.2..=1.0).contains(&secs), "timeout {timeout}");
    // A Check that meets a tokengate going away is retried on another one; never on gRPC
    // UNAVAILABLE (the API server's outage: tokengate already retried it).
    let retry = &authz["grpc_service"]["retry_policy"];
    let on: BTreeSet<&str> = retry["retry_on"]
        .as_str()
        .expect("grpc_service.retry_policy.retry_on")
        .split(',')
        .collect();
    assert_eq!(on, ["connect-failure", "refused-stream", "reset"].into());
    assert!(retry["num_retries"].as_u64().unwrap() >= 1);
    assert_eq!(
        retry["retry_host_predicate"][0]["name"],
        "envoy.retry_host_predicates.previous_hosts"
    );
    assert_authz_cluster(&config, "tokengate");

    // HCM-level stripping of every identity header, before routing and filters.
    let early = &hcm["early_header_mutation_extensions"][0];
    assert_eq!(
        early["name"],
        "envoy.http.early_header_mutation.header_mutation"
    );
    let removed: BTreeSet<&str> = early["typed_config"]["mutations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["remove"].as_str())
        .collect();
    assert_eq!(removed, IDENTITY_HEADERS.into_iter().collect());
    assert_eq!(hcm["normalize_path"], true);
    assert_eq!(hcm["merge_slashes"], true);

    // Every route either names its tokengate route or disables ext_authz and strips headers.
    let tokengate = load("envoy/tokengate-sidecar.yaml").unwrap();
    let route_names: BTreeSet<&str> = tokengate["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["match"]["context_extensions"]["route"].as_str())
        .collect();
    let mut disabled = 0;
    for route in routes(hcm) {
        let per_route = route["typed_per_filter_config"]
            .get(EXT_AUTHZ)
            .unwrap_or_else(|| {
                panic!(
                    "route {} lacks typed_per_filter_config.{EXT_AUTHZ}",
                    route["name"]
                )
            });
        assert_eq!(
            per_route["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
        );
        if per_route["disabled"] == true {
            disabled += 1;
            let stripped: BTreeSet<&str> = route["request_headers_to_remove"]
                .as_array()
                .unwrap_or_else(|| panic!("disabled route {} strips nothing", route["name"]))
                .iter()
                .filter_map(|h| h.as_str())
                .collect();
            assert_eq!(stripped, IDENTITY_HEADERS.into_iter().collect());
        } else {
            let name = per_route["check_settings"]["context_extensions"]["route"]
                .as_str()
                .unwrap_or_else(|| {
                    panic!("route {} has no context_extensions.route", route["name"])
                });
            assert!(
                route_names.contains(name),
                "context_extensions.route {name} matches no route in envoy/tokengate-sidecar.yaml"
            );
            // Route-level removal would run in the router, after ext_authz, and delete the
            // identity tokengate just set.
            assert!(route["request_headers_to_remove"].is_null());
        }
    }
    assert_eq!(
        disabled, 1,
        "exactly one route (healthz) bypasses ext_authz"
    );

    // The headers stripped are the headers tokengate sets.
    let configured: BTreeSet<&str> = tokengate["identity_headers"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(configured, IDENTITY_HEADERS.into_iter().collect());
}

#[test]
fn istio_config_matches_what_istiod_generates() {
    let config = load("envoy/istio.yaml").unwrap();
    let hcm = hcm(&config);
    assert_eq!(
        http_filter_names(hcm),
        vec![
            "tokengate.strip-identity-headers",
            "envoy.filters.http.rbac",
            EXT_AUTHZ,
            "envoy.filters.http.router"
        ]
    );
    let authz = &http_filter(hcm, EXT_AUTHZ)["typed_config"];
    assert_eq!(authz["transport_api_version"], "V3");
    assert_eq!(authz["failure_mode_allow"], false);
    assert_eq!(authz["status_on_error"]["code"], 503);
    // istiod sets neither of these for envoyExtAuthzGrpc providers.
    assert!(authz["validate_mutations"].is_null());
    assert!(authz.get("with_request_body").is_none());
    let cluster = authz["grpc_service"]["envoy_grpc"]["cluster_name"]
        .as_str()
        .unwrap();
    assert_eq!(
        cluster,
        "outbound|9001||tokengate.tokengate.svc.cluster.local"
    );
    // Since Istio 1.20 the authority is the service host; before, it was derived from the
    // cluster name (`outbound_.9001_._.<host>`), which this file no longer reproduces.
    let host = cluster.rsplit('|').next().unwrap();
    assert_eq!(host, "tokengate.tokengate.svc.cluster.local");
    assert_eq!(authz["grpc_service"]["envoy_grpc"]["authority"], host);
    assert_ne!(
        authz["grpc_service"]["envoy_grpc"]["authority"],
        cluster.replace('|', "_."),
        "the pre-1.20 authority"
    );
    // MERGE_SLASHES (deploy/istio/mesh-config.yaml): normalize_path and merge_slashes.
    assert_eq!(hcm["normalize_path"], true);
    assert_eq!(hcm["merge_slashes"], true);
    // Only tokengate's token_sources travel in a Check (deploy/istio/check-headers.yaml).
    let allowed: Vec<&str> = authz["allowed_headers"]["patterns"]
        .as_array()
        .expect("allowed_headers")
        .iter()
        .map(|p| p["exact"].as_str().expect("exact header names"))
        .collect();
    let sources: Vec<String> = load("envoy/tokengate-istio.yaml").unwrap()["token_sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["header"].as_str().unwrap().to_ascii_lowercase())
        .collect();
    assert_eq!(allowed, sources, "allowed_headers vs token_sources");
    assert_eq!(
        authz["filter_enabled_metadata"]["path"][0]["key"],
        "istio_ext_authz_shadow_effective_policy_id"
    );
    assert_eq!(
        authz["filter_enabled_metadata"]["value"]["string_match"]["prefix"],
        "istio-ext-authz"
    );
    assert_authz_cluster(&config, cluster);

    // Shadow RBAC only: it must never deny on its own.
    let rbac = &http_filter(hcm, "envoy.filters.http.rbac")["typed_config"];
    assert!(rbac.get("rules").is_none());
    assert_eq!(rbac["shadow_rules_stat_prefix"], "istio_ext_authz_");
    let policies = rbac["shadow_rules"]["policies"].as_object().unwrap();
    assert!(policies.keys().all(|k| k.starts_with("istio-ext-authz")));
    // The policy's notPaths, in the shape istiod emits (model.go `permission`): one and_rules
    // holding not(or[paths]). `and[or[not(path)]]` would select every request once there are
    // two paths (each path is "not the other one").
    let ap = load("deploy/istio/authorization-policy.yaml").unwrap();
    let not_paths = ap["spec"]["rules"][0]["to"][0]["operation"]["notPaths"]
        .as_array()
        .unwrap();
    assert!(not_paths.len() >= 2, "two notPaths tell the shapes apart");
    let url_paths: Vec<Value> = not_paths
        .iter()
        .map(|p| serde_json::json!({"url_path": {"path": {"exact": p}}}))
        .collect();
    let expected = serde_json::json!([{"and_rules": {"rules": [
        {"not_rule": {"or_rules": {"rules": url_paths}}}
    ]}}]);
    let policy = &policies["istio-ext-authz-ns[data-store]-policy[tokengate]-rule[0]"];
    assert_eq!(policy["permissions"], expected);
    assert_eq!(
        policy["principals"],
        serde_json::json!([{"and_ids": {"ids": [{"any": true}]}}])
    );

    // No context_extensions anywhere: Istio cannot set them.
    for route in routes(hcm) {
        assert!(route.get("typed_per_filter_config").is_none());
    }
    // Every route in envoy/tokengate-istio.yaml matches on hosts, not context_extensions.
    let tokengate = load("envoy/tokengate-istio.yaml").unwrap();
    for route in tokengate["routes"].as_array().unwrap() {
        assert!(route["match"]["context_extensions"].is_null(), "{route}");
        assert!(route["match"]["hosts"].is_array(), "{route}");
    }
}

#[test]
fn check_config_rejects_a_misspelt_field() {
    // Proves `check_config` can fail: without this, a stub binary would pass every config.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let text =
        std::fs::read_to_string(testkit::workspace_root().join("envoy/tokengate-sidecar.yaml"))
            .unwrap()
            .replace("strip_token:", "strip_tokens:");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check-config accepted an unknown field"
    );
    assert!(
        stderr.contains("strip_tokens"),
        "error does not name the field: {stderr}"
    );
}

#[test]
fn published_tokengate_configs_pass_check_config() {
    let root = testkit::workspace_root();
    for file in [
        "envoy/tokengate-sidecar.yaml",
        "envoy/tokengate-istio.yaml",
        "envoy/tokengate-sidecar-mtls.yaml",
    ] {
        check_config(file, &root.join(file));
    }
}
