//! A forward-auth proxy (nginx `auth_request`, Traefik `ForwardAuth`) in front of tokengate's
//! HTTP front door and the echo upstream: the stack the proxies' tests run the shared case
//! table ([`super::front_door`]) and their own cases on. Each test file only knows how to
//! start its proxy ([`Proxy`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use kube_standin::Options;
use testkit::echo::{spawn_echo, EchoServer};
use testkit::http::{self, Response};
use testkit::process::ChildGuard;
use testkit::world::World;

use super::{front_door, published_config, Tokengate};

/// A started proxy.
pub struct Proxy {
    /// Its name, in failure messages.
    pub name: &'static str,
    /// The process.
    pub child: ChildGuard,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its config (and whatever else it writes); removed with the stack.
    pub dir: tempfile::TempDir,
    /// A log file it writes, shown when a request through it fails.
    pub log: Option<PathBuf>,
    /// The host its published config serves, sent instead of the shared table's `data-store`.
    pub host: Option<&'static str>,
}

/// World + tokengate (HTTP front door) + echo + the proxy.
pub struct Proxied {
    pub world: World,
    pub echo: EchoServer,
    pub gate: Tokengate,
    pub proxy: Proxy,
}

impl Proxied {
    /// Starts the stand-in world, tokengate running the published `tokengate_config` with its
    /// HTTP front door, the echo, then the proxy: `start_proxy(tokengate's HTTP port, the
    /// echo's port)`. tokengate is stopped again if the proxy does not start.
    pub async fn start<F, Fut>(tokengate_config: &str, start_proxy: F) -> Result<Proxied>
    where
        F: FnOnce(u16, u16) -> Fut,
        Fut: Future<Output = Result<Proxy>>,
    {
        let world = World::start_with(Options::default()).await?;
        let yaml = published_config(tokengate_config, &world.standin.kubeconfig_path())?;
        let grpc = testkit::ports::listener().await?;
        let http = testkit::ports::listener().await?;
        let http_port = http.local_addr()?.port();
        let mut gate = Tokengate::start_with_http(&yaml, grpc.into(), Some(http)).await?;
        let echo = spawn_echo(testkit::ports::listener().await?)?;
        let proxy = match start_proxy(http_port, echo.addr().port()).await {
            Ok(proxy) => proxy,
            Err(e) => {
                gate.stop().await;
                return Err(e);
            }
        };
        Ok(Proxied {
            world,
            echo,
            gate,
            proxy,
        })
    }

    /// GET through the proxy (the shared table's `host: data-store` replaced by the proxy's
    /// published host, if it has one).
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|&(n, v)| match self.proxy.host {
                Some(host) if n == "host" && v == "data-store" => (n, host),
                _ => (n, v),
            })
            .collect();
        http::get(self.proxy.addr, path, &headers)
            .await
            .unwrap_or_else(|e| {
                let log = self
                    .proxy
                    .log
                    .as_ref()
                    .and_then(|l| std::fs::read_to_string(l).ok())
                    .unwrap_or_default();
                panic!(
                    "GET {path} through {}: {e:#}\n{}\n{log}",
                    self.proxy.name,
                    self.proxy.child.diagnostics()
                )
            })
    }

    /// Stops everything, surfacing tokengate errors.
    pub async fn finish(mut self) {
        self.gate.stop().await;
        self.proxy.child.kill();
        self.world.shutdown().await;
    }
}

impl front_door::FrontDoor for Proxied {
    fn world(&self) -> &World {
        &self.world
    }

    fn upstream_requests(&self) -> u64 {
        self.echo.requests_seen()
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        Proxied::get(self, path, headers).await
    }
}
