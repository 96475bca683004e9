//! Benchmark support for tokengate (not part of the product).
//!
//! `bench/run.sh` drives everything; this crate supplies the pieces that `wrk` and `h2load`
//! cannot:
//!
//! - [`check`]: a realistic Envoy `CheckRequest` (the headers Envoy really sends) and its
//!   gRPC wire framing, so `h2load -d body.bin` can load the Check RPC alone;
//! - [`jwt`]: an RS256 key, its JWKS and a signed token for Envoy's own `jwt_authn` filter;
//! - [`stats`]: latency percentiles from raw samples;
//! - [`load`]: an open-loop (fixed-rate) HTTP/1.1 and gRPC client that reports p50/p99
//!   measured from the *intended* send time when a connection falls behind, so a slow server
//!   cannot hide its queueing (the coordinated-omission trap of closed-loop tools like `wrk`);
//! - [`forge`]: forged tokens (cheap shapes and perfectly shaped ones) for the forged-token
//!   flood and the reliability harness;
//! - [`gate`], [`issue9`]: tokengate as a process, and issue 9's measurements (revocation
//!   latency, TokenReviews after a restart, RSS of the watch caches).
//!
//! The binaries are `null-authz` (a Check server that allows everything: the ceiling for any
//! tonic ext_authz server on this stack), `tokengate-bench` (helpers as subcommands),
//! `forged-flood` and `reliability` (RELIABILITY.md, driven by `reliability/run.sh`).

pub mod check;
pub mod forge;
pub mod gate;
pub mod issue9;
pub mod jwt;
pub mod load;
pub mod stats;
