//! The seeded world every end-to-end test runs in: the Kubernetes API stand-in holding the
//! seeds' identities, so the in-process tests and the Envoy tests speak about the same
//! service accounts.
//!
//! - `api/api`, with pod `api/api-0` on `node-1`: the caller (the seeds' api service);
//! - `data-store/data-store`: the callee;
//! - `default/intruder`: a valid identity that the data-store's allow-list does not name.

use anyhow::{Context, Result};
use kube_standin::{MintRequest, Options, Standin};

/// The stand-in with the seeds' identities.
pub struct World {
    /// The Kubernetes API stand-in.
    pub standin: Standin,
    /// UID of service account `api/api`.
    pub api_uid: String,
    /// UID of pod `api/api-0`.
    pub api_pod_uid: String,
}

impl World {
    /// Starts the stand-in with default options and seeds it.
    pub async fn start() -> Result<World> {
        World::start_with(Options::default()).await
    }

    /// Starts the stand-in with `options` (e.g. short-lived tokens allowed) and seeds it.
    pub async fn start_with(options: Options) -> Result<World> {
        let standin = Standin::start(options)
            .await
            .context("starting kube-standin")?;
        let api_uid = standin.create_service_account("api", "api");
        let api_pod_uid = standin.create_pod("api", "api-0", "api", Some("node-1"));
        standin.create_service_account("data-store", "data-store");
        standin.create_service_account("default", "intruder");
        Ok(World {
            standin,
            api_uid,
            api_pod_uid,
        })
    }

    /// A token of `api/api`, bound to pod `api-0`, for `audience`.
    pub fn api_token(&self, audience: &str) -> String {
        self.mint(
            MintRequest::new("api", "api")
                .audience(audience)
                .pod("api-0"),
        )
    }

    /// A token of `ns/sa` (not bound to a pod) for `audience`.
    pub fn token(&self, ns: &str, sa: &str, audience: &str) -> String {
        self.mint(MintRequest::new(ns, sa).audience(audience))
    }

    /// A token as `request` describes (expiry, issue time, pod binding).
    pub fn mint(&self, request: MintRequest) -> String {
        self.standin
            .mint(&request)
            .unwrap_or_else(|e| panic!("minting {request:?}: {e:#}"))
    }

    /// The identity headers tokengate must send upstream for an [`World::api_token`], in
    /// tokengate's default header names.
    pub fn api_identity(&self) -> Vec<(&'static str, String)> {
        vec![
            ("x-k8s-sa-user", "system:serviceaccount:api:api".to_string()),
            ("x-k8s-sa-namespace", "api".to_string()),
            ("x-k8s-sa-name", "api".to_string()),
            ("x-k8s-sa-uid", self.api_uid.clone()),
            (
                "x-k8s-sa-groups",
                "system:serviceaccounts,system:serviceaccounts:api,system:authenticated"
                    .to_string(),
            ),
            ("x-k8s-pod-name", "api-0".to_string()),
            ("x-k8s-pod-uid", self.api_pod_uid.clone()),
        ]
    }

    /// Stops the stand-in.
    pub async fn shutdown(self) {
        self.standin.shutdown().await;
    }
}
