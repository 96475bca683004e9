//! The deployment artefacts in `deploy/`, checked the way a cluster would see them.
//!
//! Each kustomization is rendered with `kubectl kustomize` and every object is validated
//! against the Kubernetes OpenAPI schemas with `kubernetes-validate --strict` (from the
//! workspace venv). Istio's CRDs (AuthorizationPolicy, EnvoyFilter, IstioOperator) have no
//! schema there, so their structure is checked here field by field. The security settings and
//! probes of the tokengate Deployment, the Envoy sidecar copies and the compose demo are
//! asserted directly, and every embedded tokengate config must pass `tokengate check-config`.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::check_config;
use serde_json::Value;
use testkit::yaml::{at, load, parse, parse_all};
use testkit::IDENTITY_HEADERS;

fn root() -> PathBuf {
    testkit::workspace_root()
}

/// `kubectl kustomize deploy/<dir>` as text.
fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy").join(dir))
        .output()
        .expect("kubectl is required (it is on the machine image; see scripts/setup.sh)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn objects(dir: &str) -> Vec<Value> {
    parse_all(&kustomize(dir)).unwrap()
}

fn find<'a>(objs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    objs.iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} named {name_prefix}*"))
}

/// Kinds kubernetes-validate has no schema for (Istio, Gateway API, Envoy Gateway CRDs);
/// checked by hand below.
const CRD_KINDS: [&str; 9] = [
    "Certificate",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "EnvoyFilter",
    "Gateway",
    "HTTPRoute",
    "ReferenceGrant",
    "SecurityPolicy",
    "ClientTrafficPolicy",
];

/// Runs kubernetes-validate --strict on `yaml`; returns (success, combined output).
fn kubernetes_validate(yaml: &str) -> (bool, String) {
    let bin = root().join(".venv/bin/kubernetes-validate");
    assert!(
        bin.is_file(),
        "{} missing: run ./scripts/setup.sh (pip install kubernetes-validate)",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(bin)
        .arg("--strict")
        .arg(&file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Validates every rendered object: core kinds must pass the schema; the CRD kinds above are
/// the only ones allowed to lack one.
fn validate_rendered(dir: &str) -> Vec<Value> {
    let yaml = kustomize(dir);
    let objs = parse_all(&yaml).unwrap();
    let (ok, out) = kubernetes_validate(&yaml);
    assert!(ok, "kubernetes-validate rejected deploy/{dir}:\n{out}");
    for obj in &objs {
        let kind = obj["kind"].as_str().unwrap();
        let name = obj["metadata"]["name"].as_str().unwrap();
        if CRD_KINDS.contains(&kind) {
            assert!(
                out.contains(&format!("Couldn't find schema for kind {kind}")),
                "{out}"
            );
        } else {
            let line = format!("passed for resource {}/{name}", kind.to_lowercase());
            assert!(out.contains(&line), "deploy/{dir}: no `{line}` in:\n{out}");
        }
    }
    objs
}

fn check_config_text(label: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.yaml");
    std::fs::write(&path, text).unwrap();
    check_config(label, &path);
}

fn configmap_file<'a>(objs: &'a [Value], name_prefix: &str, key: &str) -> &'a str {
    find(objs, "ConfigMap", name_prefix)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {name_prefix}* has no {key}"))
}

#[test]
fn every_kustomization_renders_and_validates() {
    for dir in [
        "base",
        "istio",
        "istio-http",
        "istio-ambient",
        "istio-peer",
        "envoy-sidecar",
        "envoy-gateway",
        "local-verification",
        "grpc-tls",
        "istio-rbac",
    ] {
        let objs = validate_rendered(dir);
        assert!(!objs.is_empty(), "deploy/{dir} rendered nothing");
    }
}

#[test]
fn kubernetes_validate_catches_schema_errors() {
    // Proves the validation above can fail: a Deployment with a string replica count and a
    // misspelt field.
    let yaml = kustomize("base")
        .replace("replicas: 2", "replicas: two")
        .replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:");
    let (ok, out) = kubernetes_validate(&yaml);
    assert!(
        !ok,
        "kubernetes-validate accepted a broken Deployment:\n{out}"
    );
}

#[test]
fn base_is_complete_and_hardened() {
    let objs = objects("base");
    let kinds: BTreeSet<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(kind), "deploy/base lacks a {kind}");
    }

    // RBAC: the pod's service account may create TokenReviews, and nothing else
    // (system:auth-delegator would add SubjectAccessReviews).
    let crb = find(&objs, "ClusterRoleBinding", "tokengate");
    let role = find(&objs, "ClusterRole", "tokengate");
    assert_eq!(crb["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        role["rules"],
        serde_json::json!([{
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"]
        }])
    );
    for kind in ["Role", "RoleBinding"] {
        assert!(
            !kinds.contains(kind),
            "deploy/base grants more through a {kind}"
        );
    }
    assert_eq!(
        objs.iter()
            .filter(|o| o["kind"] == "ClusterRoleBinding")
            .count(),
        1
    );
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(crb["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(crb["subjects"][0]["name"], "tokengate");
    assert_eq!(crb["subjects"][0]["namespace"], "tokengate");
    let sa = find(&objs, "ServiceAccount", "tokengate");
    assert_eq!(sa["metadata"]["namespace"], "tokengate");

    let deploy = find(&objs, "Deployment", "tokengate");
    assert_eq!(deploy["metadata"]["namespace"], "tokengate");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tokengate");
    assert_ne!(
        pod["automountServiceAccountToken"], false,
        "needs its token for TokenReview"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let spread = pod["topologySpreadConstraints"]
        .as_array()
        .expect("topology spread");
    assert!(spread
        .iter()
        .any(|c| c["topologyKey"] == "kubernetes.io/hostname"));
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for c in spread {
        for (k, v) in c["labelSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "topology spread selects other pods");
        }
    }

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null());
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    for r in ["cpu", "memory"] {
        assert!(c["resources"]["requests"][r].is_string(), "no {r} request");
    }
    assert!(
        c["resources"]["limits"]["memory"].is_string(),
        "no memory limit"
    );

    // Probes on the admin port's health endpoints.
    let ports: Vec<(&str, u64)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        ports.contains(&("grpc", 9001)) && ports.contains(&("admin", 9090)),
        "{ports:?}"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");

    // Rollouts: a preStop the distroless image can run (the kubelet's sleep action, no exec),
    // then tokengate's drain delay and drain (at most tokengate::shutdown::DRAIN_GRACE), all
    // inside the grace period.
    let pre_stop = &c["lifecycle"]["preStop"];
    assert!(
        pre_stop["exec"].is_null(),
        "no shell in the image: {pre_stop}"
    );
    let sleep = pre_stop["sleep"]["seconds"]
        .as_u64()
        .expect("lifecycle.preStop.sleep.seconds");
    assert!(sleep >= 5, "endpoints and DNS need seconds to drop the pod");
    let drain = tokengate::shutdown::DRAIN_GRACE.as_secs();
    // ... and before draining, the config's drain delay (serving, not ready).
    let config = tokengate::Config::from_yaml_str(configmap_file(
        &objs,
        "tokengate-config",
        "tokengate.yaml",
    ))
    .unwrap();
    let delay = config.listen.drain_delay.as_secs();
    assert!(
        delay >= 2,
        "Envoy's health checks need seconds to see NOT_SERVING"
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        sleep + delay + drain < grace,
        "preStop {sleep} s + drain delay {delay} s + drain {drain} s must end before SIGKILL at {grace} s"
    );

    // The config: mounted from the generated ConfigMap, read where the args say.
    let cm = find(&objs, "ConfigMap", "tokengate-config");
    let cm_name = cm["metadata"]["name"].as_str().unwrap();
    assert_ne!(
        cm_name, "tokengate-config",
        "configMapGenerator adds a content hash"
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm_name)
        .expect("the generated ConfigMap is mounted");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("config volume mount");
    assert_eq!(mount["readOnly"], true);
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let config_path = format!("{}/tokengate.yaml", mount["mountPath"].as_str().unwrap());
    assert!(
        args.contains(&config_path.as_str()),
        "args {args:?} do not read {config_path}"
    );
    let listen = parse(cm["data"]["tokengate.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(listen["listen"]["grpc"], "0.0.0.0:9001");
    assert_eq!(listen["listen"]["admin"], "0.0.0.0:9090");

    // Service: gRPC port for Envoy, selecting the Deployment's pods.
    let svc = find(&objs, "Service", "tokengate");
    let grpc = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("grpc port");
    assert_eq!(grpc["port"], 9001);
    assert_eq!(grpc["appProtocol"], "grpc");
    assert!(svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["port"] == 9090));
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "Service selects other pods");
    }

    let pdb = find(&objs, "PodDisruptionBudget", "tokengate");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn grpc_tls_overlay_mounts_the_certificate_where_the_config_reads_it() {
    let objs = objects("grpc-tls");
    let config: Value =
        testkit::yaml::parse(configmap_file(&objs, "tokengate-config", "tokengate.yaml")).unwrap();
    // The listen.tls block tested with real files and Envoy (tests/envoy_tls.rs) ...
    let sample = testkit::yaml::load("envoy/tokengate-sidecar-tls.yaml").unwrap();
    let tls = &config["listen"]["tls"];
    assert_eq!(tls, &sample["listen"]["tls"]);
    // ... on top of exactly the base config.
    let mut without_tls = config.clone();
    without_tls["listen"].as_object_mut().unwrap().remove("tls");
    let base: Value = testkit::yaml::parse(configmap_file(
        &objects("base"),
        "tokengate-config",
        "tokengate.yaml",
    ))
    .unwrap();
    assert_eq!(
        without_tls, base,
        "deploy/components/grpc-tls/tokengate.yaml drifted from base"
    );

    // The Certificate's Secret is mounted where the files are read.
    let cert = find(&objs, "Certificate", "tokengate-grpc");
    let secret = cert["spec"]["secretName"].as_str().unwrap();
    let names: Vec<&str> = cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(names.contains(&"tokengate-grpc.tokengate.svc"), "{names:?}");
    let pod = &find(&objs, "Deployment", "tokengate")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret)
        .unwrap_or_else(|| panic!("no volume from Secret {secret}"));
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the Secret volume is mounted");
    let dir = mount["mountPath"].as_str().unwrap();
    for (key, file) in [
        ("cert_file", "tls.crt"),
        ("key_file", "tls.key"),
        ("client_ca_file", "ca.crt"),
    ] {
        assert_eq!(tls[key], format!("{dir}/{file}"), "listen.tls.{key}");
    }
    assert!(
        mount.get("subPath").is_none(),
        "subPath mounts never see renewals"
    );
}

#[test]
fn configmap_configs_pass_check_config_and_match_the_tested_ones() {
    let base = objects("base");
    let base_cfg = configmap_file(&base, "tokengate-config", "tokengate.yaml");
    check_config_text("deploy/base ConfigMap", base_cfg);
    let istio = objects("istio");
    let istio_cfg = configmap_file(&istio, "tokengate-config", "tokengate.yaml");
    check_config_text("deploy/istio ConfigMap", istio_cfg);
    assert_eq!(
        istio.iter().filter(|o| o["kind"] == "ConfigMap").count(),
        1,
        "the Istio overlay replaces the base config, it does not add one"
    );

    // The routes deployed are the routes the Envoy end-to-end tests exercise.
    let sidecar = load("envoy/tokengate-sidecar.yaml").unwrap();
    let istio_tested = load("envoy/tokengate-istio.yaml").unwrap();
    assert_eq!(parse(base_cfg).unwrap()["routes"], sidecar["routes"]);
    assert_eq!(parse(istio_cfg).unwrap()["routes"], istio_tested["routes"]);
    assert_eq!(
        parse(base_cfg).unwrap()["token_sources"],
        sidecar["token_sources"]
    );
}

#[test]
fn network_policy_admits_only_the_proxies_and_monitoring() {
    let objs = objects("base");
    let np = find(&objs, "NetworkPolicy", "tokengate");
    let deploy = find(&objs, "Deployment", "tokengate");
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let selector = np["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&pod_labels[k], v, "the policy selects other pods");
    }
    assert_eq!(np["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    let container_ports: BTreeSet<&str> = deploy["spec"]["template"]["spec"]["containers"][0]
        ["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let rules = np["spec"]["ingress"].as_array().unwrap();
    let mut admitted = BTreeSet::new();
    for rule in rules {
        // Every rule names its sources and its ports: no rule admits everyone.
        let from = rule["from"].as_array().expect("ingress rule without from");
        assert!(!from.is_empty());
        for peer in from {
            assert!(peer["ipBlock"].is_null(), "{peer}");
            let ns = peer["namespaceSelector"]["matchLabels"].as_object();
            assert!(
                ns.is_some_and(|m| !m.is_empty()),
                "a peer from every namespace: {peer}"
            );
        }
        let ports = rule["ports"]
            .as_array()
            .expect("ingress rule without ports");
        for port in ports {
            let name = port["port"].as_str().unwrap();
            assert!(container_ports.contains(name), "unknown port {name}");
            admitted.insert((name.to_string(), from[0]["namespaceSelector"].to_string()));
        }
    }
    let grpc_from = serde_json::json!({"matchLabels": {"tokengate.io/authz-client": "true"}});
    let admin_from =
        serde_json::json!({"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}});
    assert_eq!(
        admitted,
        [
            ("grpc".to_string(), grpc_from.to_string()),
            ("admin".to_string(), admin_from.to_string()),
        ]
        .into(),
        "gRPC from the labelled proxy namespaces, admin from monitoring, nothing else"
    );
    // The sample's proxies are admitted.
    let sample = objects("envoy-sidecar");
    let ns = find(&sample, "Namespace", "data-store");
    assert_eq!(
        ns["metadata"]["labels"]["tokengate.io/authz-client"],
        "true"
    );
}

#[test]
fn local_verification_reads_pods_service_accounts_and_keys_only() {
    let objs = validate_rendered("local-verification");
    let roles: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "ClusterRole").collect();
    assert_eq!(roles.len(), 2, "base's tokenreview role + the component's");
    let role = find(&objs, "ClusterRole", "tokengate-local-verification");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["pods", "serviceaccounts"],
             "verbs": ["get", "list", "watch"]},
            {"nonResourceURLs": ["/.well-known/openid-configuration", "/openid/v1/jwks"],
             "verbs": ["get"]}
        ])
    );
    let crb = find(&objs, "ClusterRoleBinding", "tokengate-local-verification");
    assert_eq!(crb["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        crb["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "tokengate", "namespace": "tokengate"}])
    );
    // Nothing rendered grants anything on secrets.
    for obj in &objs {
        for rule in obj["rules"].as_array().into_iter().flatten() {
            assert!(
                !rule["resources"].to_string().contains("secrets"),
                "{}: {rule}",
                obj["metadata"]["name"]
            );
        }
    }
    // Otherwise exactly deploy/base.
    let base = objects("base");
    assert_eq!(objs.len(), base.len() + 2);
}

#[test]
fn istio_rbac_grants_subjectaccessreviews_and_runs_the_tested_config() {
    let objs = validate_rendered("istio-rbac");
    let role = find(&objs, "ClusterRole", "tokengate-subjectaccessreviews");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": ["authorization.k8s.io"],
            "resources": ["subjectaccessreviews"], "verbs": ["create"]}])
    );
    let crb = find(
        &objs,
        "ClusterRoleBinding",
        "tokengate-subjectaccessreviews",
    );
    assert_eq!(crb["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        crb["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "tokengate", "namespace": "tokengate"}])
    );
    // The sample grant names what the config's rule asks about.
    let cfg_text = configmap_file(&objs, "tokengate-config", "tokengate.yaml");
    check_config_text("deploy/istio-rbac ConfigMap", cfg_text);
    let cfg = parse(cfg_text).unwrap();
    let tested = load("envoy/tokengate-istio-rbac.yaml").unwrap();
    assert_eq!(
        cfg["routes"], tested["routes"],
        "deploy/istio-rbac drifted from the tested config"
    );
    let rule = &cfg["routes"][1]["allow"]["rbac"];
    assert_eq!(rule["verb"], "from_method");
    let res = &rule["resource"];
    let grant = find(&objs, "Role", "data-store-callers");
    assert_eq!(grant["metadata"]["namespace"], res["namespace"]);
    assert_eq!(
        grant["rules"][0]["resources"][0],
        serde_json::json!(format!(
            "{}/{}",
            res["resource"].as_str().unwrap(),
            res["subresource"].as_str().unwrap()
        ))
    );
    assert_eq!(grant["rules"][0]["resourceNames"][0], res["name"]);
    let rb = find(&objs, "RoleBinding", "data-store-api");
    assert_eq!(rb["roleRef"]["name"], grant["metadata"]["name"]);
    // Otherwise exactly deploy/istio, with its config replaced (still one ConfigMap).
    let istio = objects("istio");
    assert_eq!(objs.len(), istio.len() + 4);
    assert_eq!(objs.iter().filter(|o| o["kind"] == "ConfigMap").count(), 1);
}

#[test]
fn istio_objects_are_well_formed() {
    let objs = validate_rendered("istio");
    let mesh = load("deploy/istio/mesh-config.yaml").unwrap();
    assert_eq!(mesh["apiVersion"], "install.istio.io/v1alpha1");
    assert_eq!(mesh["kind"], "IstioOperator");
    let providers = at(&mesh, "spec.meshConfig.extensionProviders")
        .as_array()
        .expect("extensionProviders");
    assert_eq!(providers.len(), 1);
    let provider = &providers[0];
    let grpc = &provider["envoyExtAuthzGrpc"];
    assert!(grpc.is_object(), "a gRPC provider: {provider}");
    // The provider points at the base Service's gRPC port.
    let svc = find(&objs, "Service", "tokengate");
    assert_eq!(
        grpc["service"],
        format!(
            "{}.{}.svc.cluster.local",
            svc["metadata"]["name"].as_str().unwrap(),
            svc["metadata"]["namespace"].as_str().unwrap()
        )
    );
    assert_eq!(grpc["port"], 9001);
    assert_eq!(grpc["failOpen"], false);
    assert_eq!(grpc["statusOnError"], "503");
    // Slashes merged before any path-based decision (CVE-2021-31920 class); envoy/istio.yaml
    // runs the Envoy settings this produces.
    assert_eq!(
        at(&mesh, "spec.meshConfig.pathNormalization.normalization"),
        "MERGE_SLASHES"
    );
    // The gRPC provider takes none of the HTTP provider's header fields.
    let known: BTreeSet<&str> = [
        "service",
        "port",
        "timeout",
        "failOpen",
        "statusOnError",
        "clearRouteCache",
        "includeRequestBodyInCheck",
    ]
    .into();
    for key in grpc.as_object().unwrap().keys() {
        assert!(
            known.contains(key.as_str()),
            "unknown envoyExtAuthzGrpc field {key}"
        );
    }
    // envoy/istio.yaml reproduces these settings; the tests run that file.
    let envoy = load("envoy/istio.yaml").unwrap();
    let filters = at(
        &envoy,
        "static_resources.listeners.0.filter_chains.0.filters.0.typed_config.http_filters",
    )
    .as_array()
    .unwrap()
    .clone();
    let authz = filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ext_authz")
        .unwrap();
    assert_eq!(
        authz["typed_config"]["grpc_service"]["timeout"],
        grpc["timeout"]
    );
    assert_eq!(
        authz["typed_config"]["status_on_error"]["code"].to_string(),
        grpc["statusOnError"].as_str().unwrap()
    );

    // AuthorizationPolicy: CUSTOM with the provider above, on the data-store workload.
    let ap = find(&objs, "AuthorizationPolicy", "tokengate");
    assert_eq!(ap["apiVersion"], "security.istio.io/v1");
    assert_eq!(ap["metadata"]["namespace"], "data-store");
    assert_eq!(ap["spec"]["action"], "CUSTOM");
    assert_eq!(ap["spec"]["provider"]["name"], provider["name"]);
    assert_eq!(ap["spec"]["selector"]["matchLabels"]["app"], "data-store");
    let rules = ap["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["to"][0]["operation"]["notPaths"],
        serde_json::json!(["/healthz", "/readyz"]),
        "envoy/istio.yaml's shadow RBAC rule mirrors this (tests/envoy_configs.rs)"
    );
    let known: BTreeSet<&str> = ["selector", "action", "provider", "rules"].into();
    for key in ap["spec"].as_object().unwrap().keys() {
        assert!(
            known.contains(key.as_str()),
            "unknown AuthorizationPolicy field {key}"
        );
    }

    // EnvoyFilter: strips identity headers first on the data-store's inbound chain, with the
    // very filter envoy/istio.yaml runs.
    let ef = find(&objs, "EnvoyFilter", "tokengate-strip-identity-headers");
    assert_eq!(ef["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(ef["metadata"]["namespace"], "data-store");
    assert_eq!(
        ef["spec"]["workloadSelector"]["labels"]["app"],
        "data-store"
    );
    let patch = &ef["spec"]["configPatches"][0];
    assert_eq!(patch["applyTo"], "HTTP_FILTER");
    assert_eq!(patch["match"]["context"], "SIDECAR_INBOUND");
    assert_eq!(patch["patch"]["operation"], "INSERT_FIRST");
    assert_eq!(&patch["patch"]["value"], &filters[0]);
    let removed: BTreeSet<&str> = patch["patch"]["value"]["typed_config"]["mutations"]
        ["request_mutations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["remove"].as_str())
        .collect();
    assert_eq!(removed, IDENTITY_HEADERS.into_iter().collect());

    // EnvoyFilter: merges into istiod's ext_authz filter exactly the allowed_headers that
    // envoy/istio.yaml runs, which are the token_sources of the deployed tokengate config.
    let ef = find(&objs, "EnvoyFilter", "tokengate-check-headers");
    assert_eq!(ef["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(ef["metadata"]["namespace"], "data-store");
    assert_eq!(
        ef["spec"]["workloadSelector"]["labels"]["app"],
        "data-store"
    );
    let patch = &ef["spec"]["configPatches"][0];
    assert_eq!(patch["applyTo"], "HTTP_FILTER");
    assert_eq!(patch["match"]["context"], "SIDECAR_INBOUND");
    assert_eq!(
        at(
            &patch["match"],
            "listener.filterChain.filter.subFilter.name"
        ),
        "envoy.filters.http.ext_authz"
    );
    assert_eq!(patch["patch"]["operation"], "MERGE");
    let merged = &patch["patch"]["value"]["typed_config"];
    assert_eq!(merged["@type"], authz["typed_config"]["@type"]);
    assert_eq!(
        merged["allowed_headers"],
        authz["typed_config"]["allowed_headers"]
    );
    let deployed = parse(configmap_file(&objs, "tokengate-config", "tokengate.yaml")).unwrap();
    let sources: Vec<Value> = deployed["token_sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::json!({"exact": s["header"]}))
        .collect();
    assert_eq!(merged["allowed_headers"]["patterns"], Value::Array(sources));
}

#[test]
fn istio_http_provider_matches_tokengate_http_listener() {
    let objs = validate_rendered("istio-http");
    let mesh = load("deploy/istio-http/mesh-config.yaml").unwrap();
    assert_eq!(mesh["apiVersion"], "install.istio.io/v1alpha1");
    assert_eq!(mesh["kind"], "IstioOperator");
    assert_eq!(
        at(&mesh, "spec.meshConfig.pathNormalization.normalization"),
        "MERGE_SLASHES"
    );
    let providers = at(&mesh, "spec.meshConfig.extensionProviders")
        .as_array()
        .expect("extensionProviders");
    assert_eq!(providers.len(), 1);
    let provider = &providers[0];
    assert_known_keys(
        "extension provider",
        provider,
        &["name", "envoyExtAuthzHttp"],
    );
    let http = &provider["envoyExtAuthzHttp"];
    // Fields of istio/api's EnvoyExternalAuthorizationHttpProvider only (a misspelt one is
    // refused by istiod's install validation or silently dropped).
    assert_known_keys(
        "envoyExtAuthzHttp",
        http,
        &[
            "service",
            "port",
            "timeout",
            "pathPrefix",
            "failOpen",
            "statusOnError",
            "includeRequestHeadersInCheck",
            "includeAdditionalHeadersInCheck",
            "includeRequestBodyInCheck",
            "headersToUpstreamOnAllow",
            "headersToDownstreamOnDeny",
            "headersToDownstreamOnAllow",
        ],
    );
    assert_eq!(http["failOpen"], false);
    assert_eq!(http["statusOnError"], "503");
    // Envoy is told nothing it could take a client's word for: no added route header.
    assert!(http["includeAdditionalHeadersInCheck"].is_null());

    // service:port is the ClusterIP Service's `http` port, which reaches the container port
    // tokengate's listen.http binds, and the NetworkPolicy admits it from the proxies.
    let svc = objs
        .iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "tokengate")
        .expect("Service tokengate");
    assert_eq!(
        http["service"],
        format!(
            "tokengate.{}.svc.cluster.local",
            svc["metadata"]["namespace"].as_str().unwrap()
        )
    );
    let svc_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == http["port"])
        .unwrap_or_else(|| panic!("the Service has no port {}", http["port"]));
    assert_eq!(svc_port["appProtocol"], "http");
    let target = svc_port["targetPort"].as_str().unwrap();
    let deployment = find(&objs, "Deployment", "tokengate");
    let container_port = at(deployment, "spec.template.spec.containers.0.ports")
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == target)
        .unwrap_or_else(|| panic!("no container port named {target}"))["containerPort"]
        .clone();
    let config = configmap_file(&objs, "tokengate-config", "tokengate.yaml");
    check_config_text("deploy/istio-http ConfigMap", config);
    let config = parse(config).unwrap();
    assert_eq!(
        config["listen"]["http"],
        format!("0.0.0.0:{container_port}"),
        "listen.http is the container port the Service targets"
    );
    let np = find(&objs, "NetworkPolicy", "tokengate");
    let proxies = np["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["from"][0]["namespaceSelector"]["matchLabels"]["tokengate.io/authz-client"] == "true"
        })
        .expect("the proxies' ingress rule");
    assert!(
        proxies["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == target),
        "the NetworkPolicy does not admit the proxies to port {target}: {proxies}"
    );

    // pathPrefix is tokengate's listen.http_path_prefix (Envoy prepends it; tokengate strips
    // it and refuses requests without it).
    assert_eq!(http["pathPrefix"], config["listen"]["http_path_prefix"]);
    // Exactly the token headers travel.
    let sent: BTreeSet<String> = http["includeRequestHeadersInCheck"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_ascii_lowercase())
        .collect();
    assert_eq!(sent, token_headers(&config).into_iter().collect());
    assert!(!sent.contains(tokengate::http::ROUTE_HEADER));
    // Every identity header is copied upstream (overwriting a client's copy); the denial's
    // challenge and reason reach the client.
    let upstream: BTreeSet<&str> = http["headersToUpstreamOnAllow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(upstream, IDENTITY_HEADERS.into_iter().collect());
    let downstream: BTreeSet<&str> = http["headersToDownstreamOnDeny"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    for h in ["www-authenticate", "x-tokengate-reason"] {
        assert!(
            downstream.contains(h),
            "{h} not passed to the client on deny"
        );
    }
    // Same routes as the gRPC overlay (and so as the tested envoy/tokengate-istio.yaml).
    assert_eq!(
        config["routes"],
        load("deploy/istio/tokengate.yaml").unwrap()["routes"]
    );

    // The policy names this provider; identity headers are still stripped first (for the
    // paths that skip the check); the gRPC-only header patch is gone.
    let ap = find(&objs, "AuthorizationPolicy", "tokengate");
    assert_eq!(ap["spec"]["provider"]["name"], provider["name"]);
    assert_eq!(ap["spec"]["action"], "CUSTOM");
    find(&objs, "EnvoyFilter", "tokengate-strip-identity-headers");
    assert!(
        !objs
            .iter()
            .any(|o| o["metadata"]["name"] == "tokengate-check-headers"),
        "the gRPC provider's allowed_headers patch does not apply to the HTTP provider"
    );
}

/// The keys of `obj` must all be in `known` (a misspelt CRD field would be pruned or refused by
/// the API server, silently changing what the object means).
fn assert_known_keys(label: &str, obj: &Value, known: &[&str]) {
    for key in obj
        .as_object()
        .unwrap_or_else(|| panic!("{label}: not an object"))
        .keys()
    {
        assert!(
            known.contains(&key.as_str()),
            "{label}: unknown field {key}"
        );
    }
}

/// The header names of a tokengate config's token_sources, lower-cased.
fn token_headers(config: &Value) -> Vec<String> {
    config["token_sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["header"].as_str().unwrap().to_ascii_lowercase())
        .collect()
}

#[test]
fn istio_ambient_checks_every_request_at_the_waypoint() {
    let objs = validate_rendered("istio-ambient");
    // The same host/path routing as the sidecar overlay.
    let config = configmap_file(&objs, "tokengate-config", "tokengate.yaml");
    assert_eq!(
        parse(config).unwrap()["routes"],
        load("deploy/istio/tokengate.yaml").unwrap()["routes"]
    );
    check_config_text("deploy/istio-ambient/tokengate.yaml", config);
    // No peer binding at a waypoint: its Checks carry no source.principal, so require_peer
    // would refuse every request (tests/envoy_waypoint.rs).
    let routes = parse(config).unwrap()["routes"].clone();
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("require_peer").is_none()),
        "require_peer at the waypoint: {routes}"
    );

    // The waypoint: Istio's waypoint class, the HBONE listener.
    let waypoint = find(&objs, "Gateway", "waypoint");
    assert_eq!(waypoint["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(waypoint["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(
        waypoint["spec"]["listeners"],
        serde_json::json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );
    let ns_name = waypoint["metadata"]["namespace"].as_str().unwrap();
    let ns = objs
        .iter()
        .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == ns_name)
        .expect("the data-store Namespace");
    let labels = &ns["metadata"]["labels"];
    assert_eq!(labels["istio.io/dataplane-mode"], "ambient");
    assert_eq!(
        labels["istio.io/use-waypoint"],
        waypoint["metadata"]["name"]
    );
    assert_eq!(labels["tokengate.io/authz-client"], "true", "NetworkPolicy");

    // CUSTOM at the waypoint, bound by targetRefs (selector is for sidecars and ztunnel).
    let mesh = load("deploy/istio/mesh-config.yaml").unwrap();
    let provider = at(&mesh, "spec.meshConfig.extensionProviders.0.name");
    let ap = find(&objs, "AuthorizationPolicy", "tokengate");
    assert_eq!(ap["apiVersion"], "security.istio.io/v1");
    assert_eq!(ap["metadata"]["namespace"], ns_name);
    assert_known_keys(
        "AuthorizationPolicy tokengate",
        &ap["spec"],
        &["targetRefs", "action", "provider", "rules"],
    );
    assert_eq!(
        ap["spec"]["targetRefs"],
        serde_json::json!([{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                            "name": waypoint["metadata"]["name"]}])
    );
    assert_eq!(ap["spec"]["action"], "CUSTOM");
    assert_eq!(&ap["spec"]["provider"]["name"], provider);
    // Every request: no EnvoyFilter strips identity headers on a waypoint, so no request may
    // skip tokengate's overwrite.
    assert_eq!(ap["spec"]["rules"], serde_json::json!([{}]));
    assert!(
        !objs.iter().any(|o| o["kind"] == "EnvoyFilter"),
        "EnvoyFilter is not applied on waypoints"
    );

    // ztunnel admits only the waypoint into the data-store pods.
    let l4 = find(&objs, "AuthorizationPolicy", "data-store-via-waypoint-only");
    assert_eq!(l4["spec"]["action"], "ALLOW");
    assert_eq!(l4["spec"]["selector"]["matchLabels"]["app"], "data-store");
    assert_eq!(
        l4["spec"]["rules"],
        serde_json::json!([{"from": [{"source": {"principals": [format!(
            "cluster.local/ns/{ns_name}/sa/{}",
            waypoint["metadata"]["name"].as_str().unwrap()
        )]}}]}])
    );
}

#[test]
fn envoy_gateway_security_policies_send_checks_to_tokengate() {
    let objs = validate_rendered("envoy-gateway");
    let base = objects("base");
    let config = parse(configmap_file(&base, "tokengate-config", "tokengate.yaml")).unwrap();
    let route_names: BTreeSet<&str> = config["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["match"]["context_extensions"]["route"].as_str())
        .collect();
    let svc = find(&base, "Service", "tokengate");
    let grpc_port = &svc["spec"]["ports"][0];
    assert_eq!(grpc_port["name"], "grpc");

    let gateway = find(&objs, "Gateway", "data-store");
    let routes: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "HTTPRoute").collect();
    assert!(routes.len() >= 2);
    for route in &routes {
        assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(
            route["spec"]["parentRefs"][0]["name"],
            gateway["metadata"]["name"]
        );
        assert_eq!(
            route["metadata"]["namespace"],
            gateway["metadata"]["namespace"]
        );
    }
    let policies: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "SecurityPolicy")
        .collect();
    let mut checked = BTreeSet::new();
    for sp in &policies {
        let name = sp["metadata"]["name"].as_str().unwrap();
        assert_eq!(sp["apiVersion"], "gateway.envoyproxy.io/v1alpha1");
        assert_known_keys(name, &sp["spec"], &["targetRefs", "extAuth"]);
        let target = &sp["spec"]["targetRefs"][0];
        assert_eq!(target["group"], "gateway.networking.k8s.io");
        assert_eq!(target["kind"], "HTTPRoute");
        assert!(
            routes
                .iter()
                .any(|r| r["metadata"]["name"] == target["name"]
                    && r["metadata"]["namespace"] == sp["metadata"]["namespace"]),
            "{name} targets no rendered HTTPRoute"
        );
        checked.insert(target["name"].as_str().unwrap().to_string());
        // Field names as in envoyproxy/gateway api/v1alpha1/ext_auth_types.go (v1.8+).
        let ext = &sp["spec"]["extAuth"];
        assert_known_keys(
            name,
            ext,
            &[
                "grpc",
                "http",
                "headersToExtAuth",
                "bodyToExtAuth",
                "timeout",
                "failOpen",
                "recomputeRoute",
                "includeRouteMetadata",
                "contextExtensions",
                "statusOnError",
            ],
        );
        assert!(ext["http"].is_null(), "{name}: tokengate speaks gRPC");
        assert_known_keys(
            name,
            &ext["grpc"],
            &["backendRef", "backendRefs", "backendSettings"],
        );
        assert_eq!(
            ext["grpc"]["backendRefs"],
            serde_json::json!([{"name": svc["metadata"]["name"],
                                "namespace": svc["metadata"]["namespace"],
                                "port": grpc_port["port"]}])
        );
        let retry = &ext["grpc"]["backendSettings"]["retry"];
        assert_eq!(
            retry["retryOn"]["triggers"],
            serde_json::json!(["connect-failure", "refused-stream", "reset"])
        );
        assert!(retry["numRetries"].as_u64().unwrap() >= 1);
        assert_eq!(ext["failOpen"], false);
        assert_eq!(ext["statusOnError"], 503);
        assert_eq!(ext["timeout"], "500ms");
        let headers: Vec<String> = ext["headersToExtAuth"]
            .as_array()
            .expect("headersToExtAuth: without it Envoy sends every header")
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect();
        assert_eq!(headers, token_headers(&config));
        let ce = ext["contextExtensions"].as_array().unwrap();
        assert_eq!(ce.len(), 1);
        assert_eq!(ce[0]["name"], "route");
        assert_eq!(ce[0]["type"], "Value");
        let route = ce[0]["value"].as_str().unwrap();
        assert!(
            route_names.contains(route),
            "{name}: no tokengate route {route}"
        );
    }
    assert_eq!(
        checked.len(),
        policies.len(),
        "one SecurityPolicy per HTTPRoute"
    );
    // Every HTTPRoute is checked, or strips the identity headers itself.
    for route in &routes {
        let name = route["metadata"]["name"].as_str().unwrap();
        if checked.contains(name) {
            continue;
        }
        for rule in route["spec"]["rules"].as_array().unwrap() {
            let removed: BTreeSet<&str> = rule["filters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["type"] == "RequestHeaderModifier")
                .flat_map(|f| f["requestHeaderModifier"]["remove"].as_array().unwrap())
                .filter_map(|h| h.as_str())
                .collect();
            assert_eq!(
                removed,
                IDENTITY_HEADERS.into_iter().collect(),
                "unchecked HTTPRoute {name} passes client identity headers"
            );
        }
    }
    // Gateway-wide: identity headers stripped before routing, slashes merged.
    let ctp = find(&objs, "ClientTrafficPolicy", "data-store");
    assert_eq!(ctp["apiVersion"], "gateway.envoyproxy.io/v1alpha1");
    assert_eq!(ctp["spec"]["targetRefs"][0]["kind"], "Gateway");
    assert_eq!(
        ctp["spec"]["targetRefs"][0]["name"],
        gateway["metadata"]["name"]
    );
    let early: BTreeSet<&str> = ctp["spec"]["headers"]["earlyRequestHeaders"]["remove"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    assert_eq!(early, IDENTITY_HEADERS.into_iter().collect());
    assert_ne!(ctp["spec"]["path"]["disableMergeSlashes"], true);
    assert_eq!(ctp["spec"]["path"]["escapedSlashesAction"], "RejectRequest");
    // The cross-namespace backendRefs are granted.
    let grant = find(&objs, "ReferenceGrant", "data-store-security-policies");
    assert_eq!(grant["metadata"]["namespace"], svc["metadata"]["namespace"]);
    assert_eq!(
        grant["spec"]["from"],
        serde_json::json!([{"group": "gateway.envoyproxy.io", "kind": "SecurityPolicy",
                            "namespace": gateway["metadata"]["namespace"]}])
    );
    assert_eq!(
        grant["spec"]["to"],
        serde_json::json!([{"group": "", "kind": "Service", "name": svc["metadata"]["name"]}])
    );
}

/// The listener (HCM, routes, filters) of a copy must equal envoy/sidecar.yaml's exactly; only
/// cluster addresses may differ.
fn assert_same_listener_as_published(label: &str, copy: &Value) {
    let published = load("envoy/sidecar.yaml").unwrap();
    assert_eq!(
        copy["static_resources"]["listeners"], published["static_resources"]["listeners"],
        "{label}: listeners differ from envoy/sidecar.yaml"
    );
    assert_eq!(copy["admin"], published["admin"], "{label}: admin differs");
    let names = |v: &Value| -> Vec<String> {
        v["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(copy), names(&published), "{label}: clusters differ");
    for (c, p) in copy["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .zip(
            published["static_resources"]["clusters"]
                .as_array()
                .unwrap(),
        )
    {
        assert_eq!(
            c["typed_extension_protocol_options"], p["typed_extension_protocol_options"],
            "{label}: cluster {} protocol options differ",
            c["name"]
        );
    }
}

#[test]
fn envoy_sidecar_sample_matches_the_published_config() {
    let objs = validate_rendered("envoy-sidecar");
    let envoy_yaml = configmap_file(&objs, "data-store-envoy", "envoy.yaml");
    testkit::envoy::validate_str(envoy_yaml).unwrap_or_else(|e| panic!("{e:#}"));
    let envoy = parse(envoy_yaml).unwrap();
    assert_same_listener_as_published("deploy/envoy-sidecar/envoy.yaml", &envoy);
    let authz = envoy["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tokengate")
        .unwrap();
    // The sidecar reaches deploy/base's headless Service: one host per ready pod, each
    // health-checked over grpc.health.v1 (tests/envoy_headless.rs runs this file against two
    // tokengates behind one DNS name).
    let address = at(
        authz,
        "load_assignment.endpoints.0.lb_endpoints.0.endpoint.address.socket_address",
    );
    assert_eq!(
        address["address"],
        "tokengate-grpc.tokengate.svc.cluster.local"
    );
    assert_eq!(authz["type"], "STRICT_DNS");
    let base = objects("base");
    let headless = base
        .iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "tokengate-grpc")
        .expect("deploy/base has the headless Service tokengate-grpc");
    assert_eq!(headless["metadata"]["namespace"], "tokengate");
    assert_eq!(headless["spec"]["clusterIP"], "None", "headless");
    assert_ne!(headless["spec"]["publishNotReadyAddresses"], true);
    let tokengate_pods =
        &find(&base, "Deployment", "tokengate")["spec"]["template"]["metadata"]["labels"];
    for (k, v) in headless["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&tokengate_pods[k], v, "headless Service selects other pods");
    }
    assert_eq!(headless["spec"]["ports"][0]["port"], address["port_value"]);
    assert_eq!(headless["spec"]["ports"][0]["targetPort"], "grpc");
    let hc = &authz["health_checks"][0];
    assert_eq!(
        hc["grpc_health_check"]["service_name"],
        "envoy.service.auth.v3.Authorization"
    );
    for key in [
        "timeout",
        "interval",
        "unhealthy_threshold",
        "healthy_threshold",
    ] {
        assert!(!hc[key].is_null(), "health check without {key}: {hc}");
    }
    // The ClusterIP Service stays for Istio (its sidecars balance over endpoints themselves).
    let cluster_ip = find(&base, "Service", "tokengate");
    assert!(cluster_ip["spec"]["clusterIP"].is_null());

    let deploy = find(&objs, "Deployment", "data-store");
    let pod = &deploy["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    let app = containers.iter().find(|c| c["name"] == "app").unwrap();
    // The app must be reachable only through Envoy: loopback listen address, no ports.
    let args: Vec<&str> = app["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args, ["--listen", "127.0.0.1:8081"]);
    assert!(app["ports"].is_null());
    let envoy_c = containers.iter().find(|c| c["name"] == "envoy").unwrap();
    assert_eq!(envoy_c["ports"][0]["containerPort"], 8080);
    assert_eq!(envoy_c["readinessProbe"]["httpGet"]["path"], "/healthz");
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let svc = find(&objs, "Service", "data-store");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "envoy");
    assert_eq!(svc["metadata"]["namespace"], "data-store");
}

#[test]
fn dockerfile_is_multi_stage_and_non_root() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 3, "builder + runtime stages: {froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].contains(" AS build"));
    for runtime in &froms[1..] {
        assert!(
            runtime.contains("distroless") && runtime.contains(":nonroot"),
            "{runtime}"
        );
    }
    // The default (last) stage is tokengate, running as the non-root uid.
    assert!(froms.last().unwrap().ends_with("AS tokengate"));
    let last_stage = text.rsplit("FROM ").next().unwrap();
    assert!(last_stage.contains("USER 65532:65532"));
    assert!(last_stage.contains("ENTRYPOINT [\"/usr/local/bin/tokengate\"]"));
    assert!(text.contains("--locked"));
    // The Deployment's uid matches the image's.
    let objs = objects("base");
    let deploy = find(&objs, "Deployment", "tokengate");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
        65532
    );
}

#[test]
fn compose_demo_is_wired_like_the_local_demo() {
    let compose = load("deploy/compose/docker-compose.yaml").unwrap();
    let services = compose["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        [
            "api",
            "data-store",
            "data-store-app",
            "k3s",
            "setup",
            "tokengate"
        ]
        .into()
    );
    // Pinned images only.
    for (name, svc) in services {
        let image = svc["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no image"));
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "{name}: unpinned image {image}"
        );
    }
    let dep = |svc: &str, on: &str| services[svc]["depends_on"][on]["condition"].clone();

    // A real API server, healthy before anything talks to it.
    let k3s = &services["k3s"];
    assert!(k3s["image"].as_str().unwrap().starts_with("rancher/k3s:"));
    assert_eq!(k3s["command"][0], "server");
    assert_eq!(k3s["privileged"], true);
    assert!(k3s["healthcheck"]["test"].is_array());
    // The healthcheck's kubectl reads the kubeconfig k3s writes, and setup reads it too.
    let written = k3s["command"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--write-kubeconfig="))
        .expect("k3s --write-kubeconfig");
    assert_eq!(k3s["environment"]["KUBECONFIG"], written);
    assert_eq!(dep("setup", "k3s"), "service_healthy");
    assert_eq!(dep("tokengate", "setup"), "service_completed_successfully");
    assert_eq!(dep("api", "setup"), "service_completed_successfully");
    assert_eq!(dep("data-store", "tokengate"), "service_started");

    // tokengate and the echo are built from deploy/Dockerfile's stages.
    for (svc, target) in [("tokengate", "tokengate"), ("data-store-app", "echo")] {
        assert_eq!(services[svc]["build"]["dockerfile"], "deploy/Dockerfile");
        assert_eq!(services[svc]["build"]["target"], target);
        assert_eq!(services[svc]["build"]["context"], "../..");
    }
    assert!(services["data-store"]["image"]
        .as_str()
        .unwrap()
        .starts_with("envoyproxy/envoy:v1.40"));
    assert_eq!(services["data-store"]["ports"][0], "8080:8080");
    assert_eq!(services["api"]["ports"][0], "8000:8000");

    // Config files the services mount exist and are the right ones.
    let compose_dir = root().join("deploy/compose");
    for (svc, svc_value) in services {
        for v in svc_value["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap();
            if let Some(src) = v.strip_prefix("./") {
                let file = src.split(':').next().unwrap();
                assert!(
                    compose_dir.join(file).is_file(),
                    "{svc} mounts missing ./{file}"
                );
            }
        }
    }

    // The api requests its token for audience data-store via TokenRequest, refreshes at 80%.
    let api = &services["api"];
    assert_eq!(api["environment"]["AUDIENCE"], "data-store");
    assert_eq!(api["environment"]["NAMESPACE"], "api");
    assert_eq!(api["environment"]["SERVICE_ACCOUNT"], "api");
    assert_eq!(
        api["environment"]["DATA_STORE_URL"],
        "http://data-store:8080/"
    );
    let expiration: u64 = api["environment"]["EXPIRATION_SECONDS"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        expiration >= 600,
        "the API server rejects TokenRequests under 10 minutes"
    );
    let api_py = std::fs::read_to_string(compose_dir.join("api.py")).unwrap();
    assert!(api_py.contains("/serviceaccounts/{SERVICE_ACCOUNT}/token"));
    assert!(api_py.contains("REFRESH_FRACTION = 0.8"));
    assert!(api_py.contains("\"X-Client-Id\""));
    let py = Command::new(root().join(".venv/bin/python"))
        .args(["-m", "py_compile"])
        .arg(compose_dir.join("api.py"))
        .env("PYTHONPYCACHEPREFIX", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );

    // setup.sh: valid shell; lets tokengate create tokenreviews; scopes the minter to api/api.
    let setup = std::fs::read_to_string(compose_dir.join("setup.sh")).unwrap();
    let sh = Command::new("sh")
        .arg("-n")
        .arg(compose_dir.join("setup.sh"))
        .output()
        .unwrap();
    assert!(
        sh.status.success(),
        "{}",
        String::from_utf8_lossy(&sh.stderr)
    );
    // The reviewer's role is deploy/base's: create tokenreviews, nothing else.
    assert!(!setup.contains("name: system:auth-delegator"));
    assert!(setup.contains(written), "setup.sh must read {written}");
    assert!(setup.contains("resources: [serviceaccounts/token]"));
    assert!(setup.contains("resourceNames: [api]"));
    let setup_objs = parse_all(
        setup
            .split("<<'YAML'\n")
            .nth(1)
            .and_then(|s| s.split("\nYAML\n").next())
            .unwrap(),
    )
    .unwrap();
    let base_role = find(&objects("base"), "ClusterRole", "tokengate-tokenreview").clone();
    let role = find(&setup_objs, "ClusterRole", "tokengate-tokenreview");
    assert_eq!(role["rules"], base_role["rules"]);
    let crb = find(&setup_objs, "ClusterRoleBinding", "tokengate");
    assert_eq!(crb["roleRef"]["name"], "tokengate-tokenreview");
    assert_eq!(crb["subjects"][0]["name"], "tokengate");
    let stream: Vec<String> = setup_objs.iter().map(|o| o.to_string()).collect();
    let (ok, out) = kubernetes_validate(&stream.join("\n---\n"));
    assert!(ok, "setup.sh objects invalid:\n{out}");
    assert_eq!(
        out.matches("passed for resource").count(),
        setup_objs.len(),
        "{out}"
    );

    // tokengate's compose config: valid, same routes as the tested sidecar config, reads the
    // kubeconfig setup.sh writes.
    let tg_path = compose_dir.join("tokengate.yaml");
    check_config("deploy/compose/tokengate.yaml", &tg_path);
    let tg = testkit::yaml::load_path(&tg_path).unwrap();
    assert_eq!(
        tg["routes"],
        load("envoy/tokengate-sidecar.yaml").unwrap()["routes"]
    );
    assert_eq!(
        tg["kubernetes"]["kubeconfig"],
        "/creds/tokengate.kubeconfig"
    );
    assert!(setup.contains("/creds/tokengate.kubeconfig"));

    // Envoy's compose config: valid and the published listener.
    let envoy_path = compose_dir.join("envoy.yaml");
    testkit::envoy::validate_file(&envoy_path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_same_listener_as_published(
        "deploy/compose/envoy.yaml",
        &testkit::yaml::load_path(&envoy_path).unwrap(),
    );
}

/// deploy/istio-peer: deploy/istio's routes with `require_peer` on each (the tested
/// envoy/tokengate-sidecar-mtls.yaml binds the same way), the mesh's trust domain, STRICT mTLS
/// on the workloads the CUSTOM policy protects, and still one ConfigMap.
#[test]
fn istio_peer_binds_tokens_to_their_workload() {
    let objs = validate_rendered("istio-peer");
    assert_eq!(
        objs.iter().filter(|o| o["kind"] == "ConfigMap").count(),
        1,
        "the overlay replaces the config, it does not add one"
    );
    let text = configmap_file(&objs, "tokengate-config", "tokengate.yaml");
    check_config_text("deploy/istio-peer ConfigMap", text);
    let config = parse(text).unwrap();
    assert_eq!(config["kubernetes"]["trust_domain"], "cluster.local");
    let mut expected = load("deploy/istio/tokengate.yaml").unwrap()["routes"].clone();
    for route in expected.as_array_mut().unwrap() {
        route
            .as_object_mut()
            .unwrap()
            .insert("require_peer".into(), "service_account".into());
    }
    assert_eq!(config["routes"], expected);
    let mtls = load("envoy/tokengate-sidecar-mtls.yaml").unwrap();
    assert_eq!(mtls["kubernetes"]["trust_domain"], "cluster.local");

    let pa = find(&objs, "PeerAuthentication", "data-store");
    assert_eq!(pa["apiVersion"], "security.istio.io/v1");
    assert_eq!(pa["spec"]["mtls"]["mode"], "STRICT");
    let ap = find(&objs, "AuthorizationPolicy", "tokengate");
    assert_eq!(pa["metadata"]["namespace"], ap["metadata"]["namespace"]);
    assert_eq!(pa["spec"]["selector"], ap["spec"]["selector"]);
}
