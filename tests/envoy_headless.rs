//! The deployed Envoy sidecar sample (`deploy/envoy-sidecar/envoy.yaml`) against two tokengates
//! behind one DNS name, as the headless Service `tokengate-grpc` (deploy/base) gives them: a
//! small DNS server on loopback answers `tokengate-grpc.tokengate.svc.cluster.local` with
//! 127.0.0.1 and 127.0.0.2, and one tokengate listens on each, on the same port. The only
//! change to the published file is where Envoy sends its DNS queries.
//!
//! What must hold: Envoy spreads Checks over both instances (a ClusterIP, one address, pins
//! them all to one: the contrast test), a Check that meets a stopped instance is retried on the
//! other (`retry_policy`), and the gRPC health check takes the stopped one out of rotation.
//! And a rolling restart under steady load (each instance stopped with the drain delay, then
//! started again on its address) loses no request.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::Load;
use common::{published_config, Tokengate};
use testkit::echo::{spawn_echo, EchoServer};
use testkit::envoy::{render, Envoy, Ports};
use testkit::world::World;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

const ENVOY: &str = "deploy/envoy-sidecar/envoy.yaml";
const TOKENGATE: &str = "envoy/tokengate-sidecar.yaml";
/// The headless Service's name, as the sample's tokengate cluster resolves it.
const SERVICE: &str = "tokengate-grpc.tokengate.svc.cluster.local";
const HOST: (&str, &str) = ("host", "data-store");
const POD_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const POD_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A DNS server for one name over UDP: A queries for `name` get `addresses` (TTL 5 s), other
/// types for it an empty answer, other names NXDOMAIN. Counts the queries for `name`.
struct DnsStub {
    addr: SocketAddr,
    queries: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl DnsStub {
    async fn start(name: &'static str, addresses: Vec<Ipv4Addr>) -> DnsStub {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(AtomicU64::new(0));
        let counter = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some((reply, asked)) = dns_reply(&buf[..n], name, &addresses) {
                    if asked {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        DnsStub {
            addr,
            queries,
            task,
        }
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one DNS query (RFC 1035 §4.1), and whether it asked for `name`; `None` for
/// a datagram that is not a single-question query.
fn dns_reply(query: &[u8], name: &str, addresses: &[Ipv4Addr]) -> Option<(Vec<u8>, bool)> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(std::str::from_utf8(query.get(i..i + len)?).ok()?);
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    query.get(..question_end)?;
    let asked = labels.join(".").eq_ignore_ascii_case(name);
    let answers: &[Ipv4Addr] = if asked && qtype == 1 { addresses } else { &[] };
    let mut reply = Vec::with_capacity(question_end + 16 * answers.len());
    reply.extend_from_slice(&query[0..2]); // id
    reply.push(0x84 | (query[2] & 0x01)); // response, authoritative, RD echoed
    reply.push(0x80 | if asked { 0 } else { 3 }); // RA; NOERROR or NXDOMAIN
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional records
    reply.extend_from_slice(&query[12..question_end]);
    for address in answers {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // name -> question, A, IN
        reply.extend_from_slice(&5u32.to_be_bytes());
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&address.octets());
    }
    Some((reply, asked))
}

/// The sample's Envoy config, rendered for `ports`, resolving through `dns` instead of the
/// machine's resolver.
fn sample_config(ports: &Ports, dns: SocketAddr) -> String {
    let config = render(ENVOY, ports).unwrap_or_else(|e| panic!("{e:#}"));
    const DNS_CLUSTER: &str = "    type: STRICT_DNS\n";
    assert_eq!(
        config.matches(DNS_CLUSTER).count(),
        1,
        "{ENVOY}: expected one STRICT_DNS cluster (tokengate)"
    );
    assert!(config.contains(&format!("address: {SERVICE},")), "{config}");
    let resolver = format!(
        "{DNS_CLUSTER}    typed_dns_resolver_config:
      name: envoy.network.dns_resolver.cares
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
        resolvers:
        - socket_address: {{address: {}, port_value: {}}}
        dns_resolver_options: {{no_default_search_domain: true}}
",
        dns.ip(),
        dns.port()
    );
    config.replace(DNS_CLUSTER, &resolver)
}

/// Two tokengates (pods A and B, same port), the echo upstream, the sample Envoy and the DNS
/// stub answering `answers` for the Service name.
struct Headless {
    world: World,
    /// tokengate's configuration, to start an instance again.
    yaml: String,
    /// The gRPC port both instances listen on.
    port: u16,
    gates: Vec<Tokengate>,
    echo: EchoServer,
    envoy: Envoy,
    dns: DnsStub,
}

impl Headless {
    async fn start(answers: Vec<Ipv4Addr>) -> Headless {
        Headless::start_with_drain_delay(answers, None).await
    }

    /// Like [`Headless::start`], with `listen.drain_delay` set (else the harness makes it 0s).
    async fn start_with_drain_delay(answers: Vec<Ipv4Addr>, delay: Option<&str>) -> Headless {
        let world = World::start().await.unwrap_or_else(|e| panic!("{e:#}"));
        let mut yaml = published_config(TOKENGATE, &world.standin.kubeconfig_path()).unwrap();
        if let Some(delay) = delay {
            assert_eq!(
                yaml.matches("\nlisten:\n").count(),
                1,
                "{TOKENGATE}: one listen block"
            );
            yaml = yaml.replace(
                "\nlisten:\n",
                &format!("\nlisten:\n  drain_delay: {delay}\n"),
            );
        }
        let a = TcpListener::bind((POD_A, 0)).await.unwrap();
        let port = a.local_addr().unwrap().port();
        let b = TcpListener::bind((POD_B, port))
            .await
            .unwrap_or_else(|e| panic!("binding {POD_B}:{port}: {e}"));
        let mut gates = Vec::new();
        for listener in [a, b] {
            gates.push(Tokengate::start(&yaml, listener.into()).await.unwrap());
        }
        let dns = DnsStub::start(SERVICE, answers).await;
        let echo = spawn_echo(testkit::ports::listener().await.unwrap()).unwrap();
        let ports = Ports::new(port, echo.addr().port());
        let envoy = Envoy::start(&sample_config(&ports, dns.addr), ports)
            .await
            .unwrap_or_else(|e| panic!("starting envoy: {e:#}"));
        assert!(
            dns.queries.load(Ordering::SeqCst) >= 1,
            "Envoy never asked the DNS stub for {SERVICE}"
        );
        Headless {
            world,
            yaml,
            port,
            gates,
            echo,
            envoy,
            dns,
        }
    }

    /// GETs /items `n` times with a valid token; every answer must be 200.
    async fn get_ok(&self, n: usize, token: &str) {
        for i in 0..n {
            let resp =
                testkit::http::get(self.envoy.addr(), "/items", &[HOST, ("x-client-id", token)])
                    .await
                    .unwrap_or_else(|e| panic!("GET {i}: {e:#}"));
            assert_eq!(
                resp.status,
                200,
                "request {i}: {resp:?}\n{}",
                self.envoy.diagnostics()
            );
        }
    }

    /// The Checks tokengate `i` has decided (sum of `tokengate_decisions_total`).
    async fn checks(&self, i: usize) -> u64 {
        let (status, body) = self.gates[i].admin_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| l.starts_with("tokengate_decisions_total{"))
            .map(|l| {
                let value = l.rsplit(' ').next().unwrap();
                value.parse::<f64>().unwrap_or_else(|e| panic!("{l}: {e}")) as u64
            })
            .sum()
    }

    /// An Envoy counter or gauge that must exist.
    async fn stat(&self, name: &str) -> u64 {
        self.envoy
            .stat(name)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("Envoy has no stat {name}"))
    }

    /// Waits until `cluster.tokengate.membership_healthy` is `want` (health checks).
    async fn wait_healthy(&self, want: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let healthy = self.stat("cluster.tokengate.membership_healthy").await;
            if healthy == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "membership_healthy stayed {healthy}, wanted {want} within {within:?}\n{}",
                self.envoy.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts instance `i` again on its address (after [`Tokengate::stop`]).
    async fn restart(&mut self, i: usize) {
        let ip = [POD_A, POD_B][i];
        let listener = TcpListener::bind((ip, self.port))
            .await
            .unwrap_or_else(|e| panic!("binding {ip}:{} again: {e}", self.port));
        self.gates[i] = Tokengate::start(&self.yaml, listener.into()).await.unwrap();
    }

    async fn finish(mut self) {
        // Drain delays (if any) run side by side.
        for gate in &mut self.gates {
            gate.begin_shutdown();
        }
        for gate in &mut self.gates {
            gate.stop().await;
        }
        drop(self.dns);
        self.world.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_spread_over_every_pod_and_survive_one_going_away() {
    let mut stack = Headless::start(vec![POD_A, POD_B]).await;
    assert_eq!(stack.stat("cluster.tokengate.membership_total").await, 2);
    stack.wait_healthy(2, Duration::from_secs(10)).await;
    let token = stack.world.api_token("data-store");

    // Spread: round robin over the two hosts DNS returned.
    stack.get_ok(40, &token).await;
    let (a, b) = (stack.checks(0).await, stack.checks(1).await);
    assert_eq!(a + b, 40, "every request was checked once: a={a} b={b}");
    assert!(a >= 15 && b >= 15, "Checks not spread: a={a} b={b}");

    // Pod B goes away (graceful stop: NOT_SERVING, listener closed) while Envoy still counts
    // it healthy: Checks sent to it fail to connect and are retried on A. No client sees it.
    let retries_before = stack.stat("cluster.tokengate.upstream_rq_retry").await;
    stack.gates[1].stop().await;
    stack.get_ok(20, &token).await;
    assert_eq!(stack.checks(0).await, a + 20, "A decided every Check since");
    assert!(
        stack.stat("cluster.tokengate.upstream_rq_retry").await > retries_before,
        "no Check was retried: did any reach B?"
    );
    // The gRPC health check takes B out of rotation (DNS still lists it).
    stack.wait_healthy(1, Duration::from_secs(15)).await;
    assert_eq!(stack.stat("cluster.tokengate.membership_total").await, 2);
    stack.get_ok(10, &token).await;
    assert_eq!(stack.checks(0).await, a + 30);
    assert_eq!(stack.echo.requests_seen(), 70);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_no_request() {
    // The drain delay must outlast the sample's health checking (2 s interval, 2 failures),
    // so that Envoy takes an instance out while it still serves (at most ~6 s; 10 s leaves a
    // margin and keeps the test inside nextest's 60 s).
    let mut stack = Headless::start_with_drain_delay(vec![POD_A, POD_B], Some("10s")).await;
    stack.wait_healthy(2, Duration::from_secs(10)).await;
    let token = stack.world.api_token("data-store");
    let load = Load::start(
        stack.envoy.addr(),
        "/items",
        &[HOST, ("x-client-id", &token)],
        4,
    );

    for i in [0, 1] {
        load.wait_ok(load.ok(), 20).await;
        let checks_before = stack.checks(i).await;
        stack.gates[i].begin_shutdown();
        // During the delay: NOT_SERVING takes it out of Envoy's rotation, while it still runs
        // (its admin port closes only when it has stopped).
        stack.wait_healthy(1, Duration::from_secs(9)).await;
        let (status, _) = stack.gates[i].admin_get("/readyz").await;
        assert_eq!(
            status, 503,
            "instance {i} left rotation while in its drain delay"
        );
        let served_while_leaving = stack.checks(i).await;
        stack.gates[i].stop().await;
        // Envoy needs two failed health checks 2 s apart, and round robin kept sending it
        // Checks meanwhile: answered, not refused.
        assert!(
            served_while_leaving > checks_before,
            "instance {i} decided no Check after the signal ({checks_before})"
        );

        // Back on the same address: health checks put it back, and it decides Checks again.
        stack.restart(i).await;
        stack.wait_healthy(2, Duration::from_secs(15)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while stack.checks(i).await == 0 {
            assert!(
                Instant::now() < deadline,
                "restarted instance {i} got no Checks\n{}",
                stack.envoy.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    load.wait_ok(load.ok(), 20).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests lost during the rolling restart, e.g. {:?}\n{}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)],
        stack.envoy.diagnostics()
    );
    assert!(ok >= 100, "too little load to mean anything: {ok}");
    assert_eq!(
        stack.echo.requests_seen(),
        ok,
        "every 200 reached the upstream once"
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_pins_every_check_to_one_pod() {
    // The contrast: a ClusterIP Service resolves to one (virtual) address. Envoy then has one
    // host and sends every Check there, however many tokengate pods stand behind it.
    let stack = Headless::start(vec![POD_A]).await;
    assert_eq!(stack.stat("cluster.tokengate.membership_total").await, 1);
    let token = stack.world.api_token("data-store");
    stack.get_ok(40, &token).await;
    assert_eq!(stack.checks(0).await, 40);
    assert_eq!(stack.checks(1).await, 0);
    stack.finish().await;
}

#[test]
fn dns_stub_answers_a_queries_for_its_name_only() {
    // A query for tokengate-grpc.tokengate.svc.cluster.local, type A, class IN, id 0x1234.
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in SERVICE.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let (reply, asked) = dns_reply(&query, SERVICE, &[POD_A, POD_B]).unwrap();
    assert!(asked);
    assert_eq!(reply[0..2], [0x12, 0x34]);
    assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
    assert_eq!(reply[6..8], [0, 2], "two answers");
    assert_eq!(reply[reply.len() - 4..], [127, 0, 0, 2]);
    let other = query.len() - 5 - "local".len();
    let mut wrong = query.clone();
    wrong[other] = b'x';
    let (reply, asked) = dns_reply(&wrong, SERVICE, &[POD_A]).unwrap();
    assert!(!asked);
    assert_eq!(reply[3] & 0x0f, 3, "NXDOMAIN");
    assert_eq!(reply[6..8], [0, 0]);
}
