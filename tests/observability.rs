//! Observability of the real binary (issue 12 item 6): the decision log (fields, no token,
//! `denials` mode, the rate limit and its summary), no colour codes when stdout is not a
//! terminal, and OpenTelemetry traces exported over OTLP/gRPC to a real receiver, continuing
//! the trace context of the CheckRequest's headers or of the gRPC call's metadata.
//!
//! `tokengate serve` runs as a child process (the log and the tracer are process-global), its
//! stdout captured to a file; the Kubernetes API stand-in runs in the test.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::Value;
use testkit::process::ChildGuard;
use tonic::transport::Channel;

/// `tokengate serve` as a child process with a gRPC client.
struct Served {
    process: ChildGuard,
    client: AuthorizationClient<Channel>,
    grpc: u16,
    /// The HTTP front door.
    http: SocketAddr,
}

impl Served {
    /// Writes `BASE_CONFIG` (for `world`) plus `extra` sections, starts the binary and waits
    /// until it serves.
    async fn start(world: &World, extra: &str) -> Served {
        let [grpc, admin, http] = testkit::ports::free_ports::<3>();
        let yaml = format!(
            "listen:\n  grpc: 127.0.0.1:{grpc}\n  admin: 127.0.0.1:{admin}\n  http: 127.0.0.1:{http}\n  drain_delay: 0s\n{}{extra}",
            config(&world.standin.kubeconfig_path(), "")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokengate.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let mut process = ChildGuard::spawn("tokengate", cmd).unwrap();
        let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
        for attempt in 0.. {
            process.ensure_running().unwrap();
            if let Ok(r) = testkit::http::get(admin, "/readyz", &[]).await {
                if r.status == 200 {
                    break;
                }
            }
            assert!(
                attempt < 1500,
                "tokengate never got ready\n{}",
                process.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(dir); // read at start only
        let channel = Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Served {
            process,
            client: AuthorizationClient::new(channel),
            grpc,
            http: ([127, 0, 0, 1], http).into(),
        }
    }

    async fn check(&self, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        self.client.clone().check(req).await.map(|r| r.into_inner())
    }

    /// SIGTERM, then the whole stdout once the process has exited cleanly. The test runs on a
    /// multi-thread runtime: the client's connection and the OTLP receiver must keep running
    /// while this thread waits.
    fn stop(mut self) -> String {
        drop(self.client);
        let status = self.process.terminate(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "tokengate did not exit cleanly: {status:?}\n{}",
            self.process.diagnostics()
        );
        self.process.stdout() + &self.process.stderr()
    }
}

/// The JSON lines of the decision log target.
fn decision_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tokengate::decision")
        .collect()
}

/// A data-store Check from `peer` as Envoy reports it.
fn from_peer(headers: &[(&str, &str)], ip: &str, port: u32) -> CheckRequest {
    let mut req = data_store(headers);
    req.attributes.as_mut().unwrap().source = Some(Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_log_lines_carry_the_decision_never_the_token() {
    let world = world().await;
    let gate = Served::start(&world, "log: {format: json, decisions: all}\n").await;
    let good = world.api_token(AUD);
    let wrong_audience = world.api_token("other");
    let intruder = world.token("default", "intruder", AUD);

    let bearer = format!("Bearer {good}");
    let r = gate
        .check(from_peer(&[("authorization", &bearer)], "10.1.2.3", 41000))
        .await
        .unwrap();
    assert_eq!(denied_status(&r), None, "allowed");
    let r = gate
        .check(data_store(&[("x-client-id", &wrong_audience)]))
        .await
        .unwrap();
    assert_eq!(reason(&r).as_deref(), Some("wrong_audience"));
    let strict = request(
        "strict.data-store",
        "/admin?secret=1",
        &[("authorization", &format!("Bearer {intruder}"))],
        &[],
    );
    assert_eq!(
        reason(&gate.check(strict).await.unwrap()).as_deref(),
        Some("not_allowed")
    );
    let r = gate.check(data_store(&[])).await.unwrap();
    assert_eq!(reason(&r).as_deref(), Some("missing_token"));
    // The HTTP front door logs alike (forward-auth, as nginx asks).
    let r = testkit::http::get(
        gate.http,
        "/forward-auth",
        &[
            ("x-original-uri", "/items?token=x"),
            ("x-original-method", "POST"),
            ("x-tokengate-route", "data-store"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let out = gate.stop();
    world.shutdown().await;

    for token in [&good, &wrong_audience, &intruder] {
        // Not the token, nor its signature, anywhere in the output.
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !out.contains(signature),
            "a token leaked into the log:\n{out}"
        );
    }
    assert!(!out.contains('\x1b'), "colour codes in a JSON log:\n{out}");

    let lines = decision_lines(&out);
    assert_eq!(lines.len(), 5, "one line per Check:\n{out}");
    let allow = &lines[0];
    assert_eq!(allow["level"], "INFO");
    assert_eq!(allow["message"], "decision");
    assert_eq!(allow["front"], "grpc");
    assert_eq!(allow["route"], "data-store");
    assert_eq!(allow["outcome"], "allow");
    assert_eq!(allow["reason"], "ok");
    assert_eq!(allow["caller"], "api/api");
    assert_eq!(
        allow["token"],
        tokengate::identity::TokenHash(&good).to_string()
    );
    assert_eq!(allow["peer"], "10.1.2.3:41000");
    assert_eq!(allow["method"], "GET");
    assert_eq!(allow["host"], "data-store");
    assert_eq!(allow["path"], "/items", "the query is not logged");
    assert!(allow["latency_us"].as_u64().is_some(), "{allow}");

    let wrong = &lines[1];
    assert_eq!(
        (&wrong["outcome"], &wrong["reason"]),
        (&"deny".into(), &"wrong_audience".into())
    );
    assert_eq!(
        wrong["token"],
        tokengate::identity::TokenHash(&wrong_audience).to_string()
    );
    assert!(wrong.get("caller").is_none() && wrong.get("peer").is_none());
    let strict = &lines[2];
    assert_eq!(strict["route"], "data-store-strict");
    assert_eq!(strict["reason"], "not_allowed");
    assert_eq!(strict["path"], "/admin");
    let missing = &lines[3];
    assert_eq!(missing["reason"], "missing_token");
    assert!(missing.get("token").is_none());
    let http = &lines[4];
    assert_eq!(http["front"], "http");
    assert_eq!(http["reason"], "missing_token");
    assert_eq!(http["method"], "POST");
    assert_eq!(http["path"], "/items");
    assert!(
        http["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{http}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_mode_skips_allows_and_the_rate_limit_summarises_the_rest() {
    let world = world().await;
    let gate = Served::start(
        &world,
        "log: {format: json, decisions: denials, decisions_per_second: 3}\n",
    )
    .await;
    let good = world.api_token(AUD);
    let r = gate
        .check(data_store(&[("x-client-id", &good)]))
        .await
        .unwrap();
    assert_eq!(denied_status(&r), None);
    const DENIALS: u64 = 40;
    let checks = (0..DENIALS).map(|_| gate.check(data_store(&[("x-client-id", "junk")])));
    for r in futures::future::join_all(checks).await {
        assert_eq!(reason(&r.unwrap()).as_deref(), Some("malformed_token"));
    }
    let out = gate.stop();
    world.shutdown().await;

    let lines = decision_lines(&out);
    assert!(
        lines.iter().all(|l| l["outcome"] != "allow"),
        "denials mode logged an allow:\n{out}"
    );
    let logged = lines.iter().filter(|l| l["message"] == "decision").count() as u64;
    let suppressed: u64 = lines.iter().filter_map(|l| l["suppressed"].as_u64()).sum();
    assert!(
        logged >= 1 && suppressed >= 1,
        "{logged} logged, {suppressed} suppressed:\n{out}"
    );
    assert_eq!(
        logged + suppressed,
        DENIALS,
        "every denial is either a line or counted in a summary:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_file_carry_no_colour_codes() {
    let world = world().await;
    let gate = Served::start(&world, "log: {format: text, level: debug}\n").await;
    let r = gate.check(data_store(&[])).await.unwrap();
    assert_eq!(reason(&r).as_deref(), Some("missing_token"));
    let out = gate.stop();
    world.shutdown().await;
    let line = out
        .lines()
        .find(|l| l.contains("tokengate::decision"))
        .unwrap_or_else(|| panic!("no decision line:\n{out}"));
    assert!(line.contains("missing_token"), "{line}");
    assert!(!out.contains('\x1b'), "colour codes in a log file:\n{out}");
}

/// An OTLP/gRPC trace receiver that keeps every span it is sent, with its `service.name`.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, Span)>>>);

impl Receiver {
    /// Serves on a fresh port until `stop` fires; returns the address and the server task.
    async fn serve(
        &self,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        let listener = testkit::ports::listener().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self.clone()))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stop.await;
                    },
                ),
        );
        (addr, server)
    }

    fn spans(&self, service: &str) -> Vec<Span> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|(s, _)| s == service)
            .map(|(_, span)| span.clone())
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                        Some(s.clone())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            let spans = resource.scope_spans.into_iter().flat_map(|s| s.spans);
            let mut all = self.0.lock().unwrap();
            all.extend(spans.map(|span| (service.clone(), span)));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_traced_over_otlp_under_the_callers_trace() {
    let receiver = Receiver::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (otlp, server) = receiver.serve(stop_rx).await;

    let world = world().await;
    let gate = Served::start(
        &world,
        &format!("log: {{decisions: off}}\ntracing: {{otlp_endpoint: 'http://{otlp}'}}\n"),
    )
    .await;
    // A client's W3C context in the checked request's headers; a fresh token, so the Check
    // misses the cache and asks TokenReview.
    const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let good = world.api_token(AUD);
    let r = gate
        .check(data_store(&[
            ("x-client-id", &good),
            ("traceparent", &traceparent),
        ]))
        .await
        .unwrap();
    assert_eq!(denied_status(&r), None);
    // Envoy's ext_authz client puts its own span in the call's metadata (B3 here): that one
    // wins over the request's.
    const ENVOY_TRACE: &str = "80f198ee56343ba864fe8b2a57d3eff7";
    const ENVOY_SPAN: &str = "e457b5a2e4d86bd1";
    let mut req = tonic::Request::new(data_store(&[
        ("x-client-id", &good),
        ("traceparent", &traceparent),
    ]));
    for (k, v) in [
        ("x-b3-traceid", ENVOY_TRACE),
        ("x-b3-spanid", ENVOY_SPAN),
        ("x-b3-sampled", "1"),
    ] {
        req.metadata_mut().insert(k, v.parse().unwrap());
    }
    let r = gate.client.clone().check(req).await.unwrap().into_inner();
    assert_eq!(denied_status(&r), None);
    // A sampled-out parent is followed: no spans for this one.
    const DROPPED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let r = gate
        .check(data_store(&[
            ("x-client-id", "junk"),
            (
                "traceparent",
                &format!("00-{DROPPED_TRACE}-b7ad6b7169203331-00"),
            ),
        ]))
        .await
        .unwrap();
    assert_eq!(reason(&r).as_deref(), Some("malformed_token"));

    let out = gate.stop(); // flushes the batch exporter
    world.shutdown().await;
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();

    let spans = receiver.spans("tokengate");
    let names = |trace: &str| {
        let mut n: Vec<String> = spans
            .iter()
            .filter(|s| hex(&s.trace_id) == trace)
            .map(|s| s.name.clone())
            .collect();
        n.sort();
        n
    };
    assert!(
        names(DROPPED_TRACE).is_empty(),
        "sampled-out trace exported"
    );

    let check = |trace: &str| {
        spans
            .iter()
            .find(|s| hex(&s.trace_id) == trace && s.name == "check")
            .unwrap_or_else(|| panic!("no check span in trace {trace}: {spans:#?}\n{out}"))
    };
    let first = check(CLIENT_TRACE);
    assert_eq!(hex(&first.parent_span_id), CLIENT_SPAN);
    assert_eq!(attribute(first, "route").as_deref(), Some("data-store"));
    assert_eq!(attribute(first, "outcome").as_deref(), Some("allow"));
    assert_eq!(
        names(CLIENT_TRACE),
        ["cache", "check", "precheck", "review"],
        "a miss: cache, precheck, TokenReview"
    );
    for child in spans
        .iter()
        .filter(|s| hex(&s.trace_id) == CLIENT_TRACE && s.name != "check")
    {
        assert_eq!(
            child.parent_span_id, first.span_id,
            "{} under check",
            child.name
        );
    }
    let cache = spans
        .iter()
        .find(|s| hex(&s.trace_id) == CLIENT_TRACE && s.name == "cache")
        .unwrap();
    assert_eq!(attribute(cache, "hit").as_deref(), Some("false"));

    let second = check(ENVOY_TRACE);
    assert_eq!(hex(&second.parent_span_id), ENVOY_SPAN);
    assert_eq!(names(ENVOY_TRACE), ["cache", "check"], "a hit");
    assert!(!out.contains("OTLP"), "the exporter complained:\n{out}");
}

/// Envoy's own tracer (OpenTelemetry, to the same receiver) on the published sidecar config:
/// tokengate's `check` span is the child of the span of Envoy's ext_authz call, in the trace
/// Envoy started for the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_envoy_the_check_span_is_a_child_of_envoys_ext_authz_span() {
    let receiver = Receiver::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (otlp, server) = receiver.serve(stop_rx).await;
    let world = world().await;
    let gate = Served::start(
        &world,
        &format!("tracing: {{otlp_endpoint: 'http://{otlp}'}}\n"),
    )
    .await;
    let echo = testkit::echo::spawn_echo(testkit::ports::listener().await.unwrap()).unwrap();
    let ports = testkit::envoy::Ports::new(gate.grpc, echo.addr().port());
    let config = testkit::envoy::render("envoy/sidecar.yaml", &ports).unwrap();
    // Tracing on in the HCM (every request sampled), spans to the receiver, flushed one by one.
    let hcm = "          stat_prefix: ingress\n";
    assert!(config.contains(hcm));
    let config = config.replacen(
        hcm,
        &format!(
            "{hcm}          tracing:\n            random_sampling: {{value: 100}}\n            provider:\n              name: envoy.tracers.opentelemetry\n              typed_config:\n                \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig\n                grpc_service: {{envoy_grpc: {{cluster_name: otlp}}, timeout: 1s}}\n                service_name: envoy\n"
        ),
        1,
    ) + &format!(
        "  - name: otlp\n    type: STATIC\n    connect_timeout: 0.25s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n    load_assignment:\n      cluster_name: otlp\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\n\
         layered_runtime:\n  layers:\n  - name: static\n    static_layer: {{tracing.opentelemetry.min_flush_spans: 1}}\n",
        otlp.port()
    );
    let envoy = testkit::envoy::Envoy::start(&config, ports).await.unwrap();

    let token = world.api_token(AUD);
    let resp = testkit::http::get(
        envoy.addr(),
        "/items",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);

    // Envoy exports when its span ends; wait for both sides (bounded), never a fixed sleep.
    let out = gate.stop();
    let mut envoy_spans = Vec::new();
    for _ in 0..1500 {
        envoy_spans = receiver.spans("envoy");
        if envoy_spans.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(envoy);
    world.shutdown().await;
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();

    let ours = receiver.spans("tokengate");
    let check = ours
        .iter()
        .find(|s| s.name == "check")
        .unwrap_or_else(|| panic!("no check span: {ours:#?}\n{out}"));
    let parent = envoy_spans
        .iter()
        .find(|s| s.span_id == check.parent_span_id)
        .unwrap_or_else(|| {
            panic!(
                "the check span's parent is not one of Envoy's spans: {envoy_spans:#?}\n{check:#?}"
            )
        });
    assert_eq!(parent.trace_id, check.trace_id);
    assert!(
        parent.name.contains("Authorization.Check") || parent.name.contains("ext_authz"),
        "parent span {:?} is not Envoy's ext_authz call",
        parent.name
    );
    assert!(
        envoy_spans
            .iter()
            .any(|s| s.trace_id == check.trace_id && s.parent_span_id.is_empty()),
        "Envoy's request span roots the trace: {envoy_spans:#?}"
    );
}
