//! What `require_peer: service_account` sees behind an Istio ambient waypoint.
//!
//! A waypoint's Envoy does not run its HTTP filters on the connection that carries the
//! caller's mTLS: the outer listener terminates it and hands the bytes to the internal
//! listener `main_internal` (Envoy's `envoy.bootstrap.internal_listener`, reached through a
//! cluster with an `envoy_internal_address` endpoint and the `internal_upstream` transport
//! socket), whose HTTP connection manager runs ext_authz. The internal connection has no TLS,
//! so the Check's `source.principal` is empty (istio/istio#56379, #59046). Here, in one Envoy
//! derived from the published `envoy/sidecar-mtls.yaml`:
//!
//! ```text
//!                          protected Envoy (envoy/sidecar-mtls.yaml + a waypoint)
//! client-side Envoy --mTLS--> waypoint: TLS, tcp_proxy --internal--> main_internal: HCM,
//!   (SPIFFE client                                                    ext_authz, router -> echo
//!    certificates)  --mTLS--> ingress: TLS, HCM, ext_authz, router -> echo   (the control)
//!                                          | both ext_authz: the published one
//!                                          v
//!                                        tokengate (envoy/tokengate-sidecar-mtls.yaml)
//! ```
//!
//! The same certificate and token that pass `require_peer` on the TLS-terminating listener are
//! refused `peer_missing` (fail closed) through the internal hop; a route without
//! `require_peer` passes through the waypoint.

mod common;

use common::envoy::{assert_api_identity, assert_refused, echo_of, with_spoofed, Stack};
use common::mtls::{Client, ClientSidecar, Pki, San};
use common::{published_config, world};
use testkit::http::Response;

const ENVOY: &str = "envoy/sidecar-mtls.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar-mtls.yaml";
const HOST: (&str, &str) = ("host", "data-store");

const CLIENTS: [Client; 2] = [
    ("api", San::Uri("spiffe://cluster.local/ns/api/sa/api")),
    (
        "intruder",
        San::Uri("spiffe://cluster.local/ns/default/sa/intruder"),
    ),
];

/// Adds a waypoint to a rendered envoy/sidecar-mtls.yaml, leaving its `ingress` listener as it
/// is: a listener `waypoint` on `port` with `ingress`'s TLS context (client certificates
/// required) and a tcp_proxy to the internal listener `main_internal`, which runs `ingress`'s
/// HTTP connection manager (same routes, ext_authz and router; stat prefix `waypoint`).
fn with_waypoint(config: &str, port: u16) -> anyhow::Result<String> {
    let once = |text: &str, what: &str| -> anyhow::Result<usize> {
        anyhow::ensure!(
            config.matches(what).count() == 1,
            "expected one {what:?} in {text}"
        );
        Ok(config.find(what).unwrap())
    };
    let listener = once("the config", "  - name: ingress\n")?;
    let clusters = once("the config", "\n  clusters:\n")? + 1;
    let tls = once("the ingress listener", "    - transport_socket:\n")?;
    let filters_key = "      filters:\n";
    let filters = once("the ingress listener", filters_key)?;
    anyhow::ensure!(listener < tls && tls < filters && filters < clusters);
    let hcm = &config[filters + filters_key.len()..clusters];
    anyhow::ensure!(
        hcm.matches("stat_prefix: ingress\n").count() == 1,
        "the ingress HCM's stat_prefix"
    );
    let hcm = hcm.replace("stat_prefix: ingress\n", "stat_prefix: waypoint\n");

    let waypoint = format!(
        r#"  - name: waypoint
    address:
      socket_address: {{address: 127.0.0.1, port_value: {port}}}
    filter_chains:
{tls}      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: waypoint_outer
          cluster: main_internal
  - name: main_internal
    internal_listener: {{}}
    filter_chains:
    - filters:
{hcm}"#,
        tls = &config[tls..filters],
    );
    let cluster = r#"  - name: main_internal
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: main_internal
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {server_listener_name: main_internal}
    transport_socket:
      name: envoy.transport_sockets.internal_upstream
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
"#;
    let mut out = String::with_capacity(config.len() * 2);
    out.push_str(&config[..clusters]);
    out.push_str(&waypoint);
    out.push_str(&config[clusters..]);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(cluster);
    Ok(out)
}

/// The protected Envoy with its waypoint, and one client-side Envoy per way in.
struct Mesh {
    stack: Stack,
    /// Calls the `waypoint` listener.
    via_waypoint: ClientSidecar,
    /// Calls the `ingress` listener (TLS terminated where ext_authz runs): the control.
    direct: ClientSidecar,
    _pki: Pki,
}

impl Mesh {
    async fn start() -> Mesh {
        let pki = Pki::new(&CLIENTS);
        let world = world().await;
        let yaml = published_config(TOKENGATE, &world.standin.kubeconfig_path()).unwrap();
        // The /internal/ route without require_peer: the same waypoint, a route that does not
        // bind the peer.
        let bound = "    audiences: [other]\n    require_peer: service_account\n";
        assert_eq!(yaml.matches(bound).count(), 1, "{TOKENGATE}: {bound:?}");
        let yaml = yaml.replace(bound, "    audiences: [other]\n");
        assert_eq!(yaml.matches("\n    require_peer: ").count(), 1);

        let [waypoint_port] = testkit::ports::free_ports::<1>();
        let edit = |config: String| with_waypoint(&pki.cert_paths(config)?, waypoint_port);
        let stack = Stack::start_world(ENVOY, world, &yaml, None, Some(&edit))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let waypoint = std::net::SocketAddr::from(([127, 0, 0, 1], waypoint_port));
        let via_waypoint = ClientSidecar::start(&pki, waypoint)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let direct = ClientSidecar::start(&pki, stack.envoy.addr())
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        Mesh {
            stack,
            via_waypoint,
            direct,
            _pki: pki,
        }
    }

    async fn get(
        &self,
        client: &ClientSidecar,
        who: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Response {
        client.get(&self.stack.envoy, who, path, headers).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_waypoint_require_peer_sees_no_peer_and_fails_closed() {
    let mesh = Mesh::start().await;
    let world = &mesh.stack.world;
    let api = world.api_token("data-store");
    let headers = with_spoofed(&[HOST, ("x-client-id", &api)]);

    // Control: the api workload's certificate and its own token, straight to the listener
    // that terminates mTLS and runs ext_authz: require_peer sees the peer and passes.
    let resp = mesh.get(&mesh.direct, "api", "/items", &headers).await;
    assert_eq!(
        resp.status,
        200,
        "control: {resp:?}\n{}",
        mesh.stack.envoy.diagnostics()
    );
    assert_api_identity(&echo_of(&resp), world);
    assert_eq!(mesh.stack.echo.requests_seen(), 1);

    // The same certificate and token through the waypoint's internal hop: the Check carries no
    // source.principal, so require_peer refuses (fail closed), and nothing reaches the upstream.
    let resp = mesh
        .get(&mesh.via_waypoint, "api", "/items", &headers)
        .await;
    assert_refused(
        &resp,
        403,
        "peer_missing",
        &format!("via the waypoint\n{}", mesh.stack.envoy.diagnostics()),
    );
    // Whichever certificate the caller presented: no peer, not a wrong one.
    let resp = mesh
        .get(&mesh.via_waypoint, "intruder", "/items", &headers)
        .await;
    assert_refused(&resp, 403, "peer_missing", "the intruder via the waypoint");
    assert_eq!(
        mesh.stack.echo.requests_seen(),
        1,
        "a request refused at the waypoint reached the upstream"
    );

    // A route without require_peer through the same waypoint: allowed, with the identity.
    let other = world.token("api", "api", "other");
    let resp = mesh
        .get(
            &mesh.via_waypoint,
            "api",
            "/internal/x",
            &with_spoofed(&[HOST, ("x-client-id", &other)]),
        )
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = echo_of(&resp);
    assert_eq!(echo.path, "/internal/x");
    assert_eq!(
        echo.values("x-k8s-sa-user"),
        vec!["system:serviceaccount:api:api"]
    );
    assert_eq!(echo.values("x-k8s-sa-namespace"), vec!["api"]);
    assert_eq!(echo.values("x-k8s-sa-name"), vec!["api"]);
    assert_eq!(mesh.stack.echo.requests_seen(), 2);

    // The waypoint's requests did go through the internal listener's HCM, and the direct one
    // through ingress's: Envoy's own counters.
    assert_eq!(
        mesh.stack.counter("http.waypoint.ext_authz.denied").await,
        2
    );
    assert_eq!(mesh.stack.counter("http.waypoint.ext_authz.ok").await, 1);
    assert_eq!(mesh.stack.counter("http.ingress.ext_authz.ok").await, 1);
    assert!(
        mesh.stack
            .counter("tcp.waypoint_outer.downstream_cx_total")
            .await
            >= 1
    );

    let (_, metrics) = mesh.stack.tokengate_admin("/metrics").await;
    for line in [
        r#"tokengate_decisions_total{route="data-store",outcome="deny",reason="peer_missing"} 2"#,
        r#"tokengate_decisions_total{route="data-store",outcome="allow",reason="ok"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // Not one Check saw a (wrong) peer: the intruder's certificate went unseen, too.
    for line in metrics
        .lines()
        .filter(|l| l.contains(r#"reason="peer_mismatch""#))
    {
        assert!(
            line.ends_with(" 0"),
            "a waypoint Check carried a peer: {line}"
        );
    }

    drop(mesh.via_waypoint);
    drop(mesh.direct);
    mesh.stack.finish().await;
}
