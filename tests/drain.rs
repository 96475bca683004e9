//! Shutdown with a drain delay, over real gRPC: after the signal tokengate reports NOT_SERVING
//! (grpc.health.v1) and 503 on `/readyz`, yet keeps answering Checks on the connections it
//! has and on new ones; when the delay is over it closes the listener and stops.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// The Authorization service's health status, as Envoy's gRPC health check asks for it.
async fn health(channel: Channel) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .expect("grpc.health.v1 Check")
        .into_inner()
        .status
}

async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to tokengate at {addr}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_delay_checks_are_served_while_health_says_not_serving() {
    let world = world().await;
    // Long enough that the steps below run inside it on a busy machine; nothing waits it out
    // except the final stop.
    let yaml = format!(
        "{}listen:\n  drain_delay: 10s\n",
        config(&world.standin.kubeconfig_path(), "")
    );
    let listener = testkit::ports::listener().await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut gate = Tokengate::start(&yaml, listener.into()).await.unwrap();
    let existing = connect(addr).await;
    wait_serving(existing.clone()).await;
    let token = world.api_token(AUD);
    let allowed = |r: CheckResponse| {
        assert_eq!(
            allowed_headers(&r).len(),
            world.api_identity().len(),
            "{r:?}"
        );
    };
    let mut client = AuthorizationClient::new(existing.clone());
    allowed(
        client
            .check(data_store(&[("x-client-id", &token)]))
            .await
            .unwrap()
            .into_inner(),
    );

    gate.begin_shutdown();
    // Health flips first: the signal for Envoy's health check and the kubelet.
    let mut status = health(existing.clone()).await;
    for _ in 0..100 {
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = health(existing.clone()).await;
    }
    assert_eq!(status, ServingStatus::NotServing as i32);
    assert_eq!(gate.admin_get("/readyz").await.0, 503);
    assert_eq!(gate.admin_get("/healthz").await.0, 200, "still alive");

    // ... but Checks are still answered, on the existing connection and on a new one.
    allowed(
        client
            .check(data_store(&[("x-client-id", &token)]))
            .await
            .unwrap()
            .into_inner(),
    );
    let fresh = connect(addr).await;
    allowed(
        AuthorizationClient::new(fresh.clone())
            .check(data_store(&[("x-client-id", &token)]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(health(fresh).await, ServingStatus::NotServing as i32);

    // Then it drains (GOAWAY to both clients) and stops; the port no longer accepts.
    gate.stop().await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the gRPC port still accepts after stop");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_drain_delay_the_listener_closes_at_once() {
    let h = Harness::start().await;
    let token = h.world.api_token(AUD);
    h.check_ok(data_store(&[("x-client-id", &token)])).await;
    let mut h = h;
    // BASE_CONFIG says nothing about drain_delay: the harness makes it 0s.
    h.gate.begin_shutdown();
    let mut refused = false;
    for _ in 0..200 {
        if h.check(data_store(&[("x-client-id", &token)]))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "Checks were still answered 2 s after a zero-delay shutdown"
    );
    h.stop().await;
}
