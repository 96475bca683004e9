//! Test harness shared by tokengate's integration tests, the Envoy end-to-end tests and the demo.
//!
//! Every test here runs real parts on loopback: a real Envoy binary, real sockets, real child
//! processes. This crate keeps the plumbing out of the tests:
//!
//! - [`world`]: the seeded world (the Kubernetes API stand-in with `api/api` calling
//!   `data-store/data-store`) and its tokens;
//! - [`check`]: the CheckRequest Envoy would send, and accessors for the CheckResponse;
//! - [`ports`]: free-port picking, so parallel tests never collide on a fixed port;
//! - [`process`]: [`process::ChildGuard`], a child process that is always killed when the guard
//!   drops (even when a test panics) and whose stdout/stderr land in files quoted in failures;
//! - [`envoy`]: locating the Envoy binary, rendering a published config from `envoy/` with the
//!   test's ports, validating configs, and running Envoy until its admin `/ready` says LIVE;
//! - [`echo`]: an HTTP upstream that answers with every request header it received (duplicates
//!   included), so a test can prove what Envoy forwarded;
//! - [`http`]: a minimal HTTP/1.1 client over a fresh TCP connection, with repeated headers;
//! - [`yaml`]: YAML (published configs, kustomize output) as `serde_json::Value` for structure checks.
//!
//! tokengate itself is started by `tests/common` (one function around `tokengate::serve`):
//! tokengate dev-depends on this crate, so this crate cannot depend on tokengate.
//!
//! Readiness is always awaited (admin endpoints, "ready" lines, accepted connections), never
//! guessed with fixed sleeps.

#![warn(missing_docs)]

pub mod check;
pub mod echo;
pub mod envoy;
pub mod http;
pub mod ports;
pub mod process;
pub mod world;
pub mod yaml;

use std::path::PathBuf;

/// The identity headers tokengate sets by default (its `identity_headers`), which every
/// published Envoy config strips from client requests. Spelled out here, not read from
/// tokengate, so the tests pin the names.
pub const IDENTITY_HEADERS: [&str; 7] = [
    "x-k8s-sa-user",
    "x-k8s-sa-namespace",
    "x-k8s-sa-name",
    "x-k8s-sa-uid",
    "x-k8s-sa-groups",
    "x-k8s-pod-name",
    "x-k8s-pod-uid",
];

/// The workspace root (the directory holding `envoy/`, `deploy/` and `.venv/`).
pub fn workspace_root() -> PathBuf {
    // tests/testkit -> tests -> workspace root
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
