//! The decisions every front door must give the same way, as one case table: the Envoy sidecar
//! (gRPC ext_authz), Envoy `http_service`, nginx `auth_request` and Traefik `ForwardAuth` each
//! run it through their published configs (`tests/envoy_sidecar.rs`, `tests/envoy_http.rs`,
//! `tests/nginx_forward_auth.rs`, `tests/traefik_forward_auth.rs`). All the samples route
//! `/items` on host `data-store` to the data-store route (audience `data-store`, only `api/api`,
//! the token stripped); Traefik's sample names host `data-store.example.com`, which its test
//! sends instead.

use std::future::Future;

use testkit::http::Response;
use testkit::world::World;

use super::envoy::{assert_api_identity, echo_of, with_spoofed};

const HOST: (&str, &str) = ("host", "data-store");

/// What the shared cases need from a front door.
pub trait FrontDoor {
    /// The stand-in world tokens come from.
    fn world(&self) -> &World;
    /// Requests the upstream (echo) has seen so far.
    fn upstream_requests(&self) -> u64;
    /// GET `path` through the front door.
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> impl Future<Output = Response>;
}

/// A request the front door must refuse.
struct Denial {
    what: &'static str,
    /// The token header, if any (besides Host).
    token: Option<(&'static str, String)>,
    status: u16,
    reason: &'static str,
}

fn denials(world: &World) -> Vec<Denial> {
    let case = |what, token: Option<(&'static str, String)>, status, reason| Denial {
        what,
        token,
        status,
        reason,
    };
    vec![
        case("no token", None, 401, "missing_token"),
        case(
            "not a JWT in x-client-id",
            Some(("x-client-id", "dummy".into())),
            403,
            "malformed_token",
        ),
        case(
            "not a JWT as a bearer token",
            Some(("authorization", "Bearer dummy".into())),
            403,
            "malformed_token",
        ),
        case(
            "a token for another audience",
            Some(("x-client-id", world.api_token("vault"))),
            403,
            "wrong_audience",
        ),
        case(
            "a valid token of a service account the route does not allow",
            Some((
                "x-client-id",
                world.token("default", "intruder", "data-store"),
            )),
            403,
            "not_allowed",
        ),
    ]
}

/// Every denial case: its status and `x-tokengate-reason`, `WWW-Authenticate: Bearer` on 401
/// only, and nothing reaches the upstream.
pub async fn assert_denials(door: &impl FrontDoor) {
    let before = door.upstream_requests();
    for case in denials(door.world()) {
        let mut headers = vec![HOST];
        if let Some((name, value)) = &case.token {
            headers.push((name, value.as_str()));
        }
        let resp = door.get("/items", &headers).await;
        let what = case.what;
        assert_eq!(resp.status, case.status, "{what}: {resp:?}");
        assert_eq!(
            resp.header("x-tokengate-reason"),
            Some(case.reason),
            "{what}: {resp:?}"
        );
        match resp.header("www-authenticate") {
            Some(challenge) if case.status == 401 => {
                assert!(challenge.starts_with("Bearer"), "{what}: {challenge}")
            }
            None if case.status == 401 => panic!("{what}: 401 without WWW-Authenticate"),
            other => assert_eq!(other, None, "{what}: a challenge on {}", case.status),
        }
    }
    assert_eq!(
        door.upstream_requests(),
        before,
        "a denied request reached the upstream"
    );
}

/// A valid token in each token header, with every identity header spoofed by the client: 200,
/// the request unchanged, exactly one true value of each identity header, and the token
/// stripped from every header.
pub async fn assert_allowed_with_true_identity(door: &impl FrontDoor) {
    let token = door.world().api_token("data-store");
    let bearer = format!("Bearer {token}");
    for (name, value) in [("x-client-id", token.as_str()), ("authorization", &bearer)] {
        let headers = with_spoofed(&[HOST, (name, value)]);
        let resp = door.get("/items?id=7", &headers).await;
        assert_eq!(resp.status, 200, "{name}: {resp:?}");
        let echo = echo_of(&resp);
        assert_eq!(echo.path, "/items?id=7");
        assert_eq!(
            echo.message,
            "authenticated as system:serviceaccount:api:api"
        );
        assert_api_identity(&echo, door.world());
        assert!(!echo.has(name), "token forwarded: {:?}", echo.headers);
        assert!(
            echo.headers.iter().all(|(_, v)| !v.contains(&token)),
            "token forwarded in some header: {:?}",
            echo.headers
        );
    }
}
