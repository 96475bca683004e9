//! Graceful shutdown: one signal, observed by the gRPC server and the admin port alike.
//!
//! [`Lifecycle`] (owned by [`crate::serve`]) moves a single `watch` channel through the
//! [`Phase`]s; every part of the server holds a [`Shutdown`] and reads the same value, so
//! there is exactly one mechanism (as in tokio's mini-redis). When the caller's shutdown future
//! completes (SIGTERM), the phase becomes [`Phase::Leaving`] for the drain delay
//! (`listen.drain_delay`): `/readyz` turns 503 and gRPC health NOT_SERVING, but Checks are
//! still served on existing and new connections, because Kubernetes endpoints, DNS answers
//! and Envoy's health checks take a few seconds to steer proxies away, and a pod that stopped
//! accepting at once would refuse the Checks they still send. Then [`Phase::Draining`]: tonic
//! stops accepting, sends HTTP/2 GOAWAY and drains in-flight Checks, bounded by the grace
//! period. Then [`Phase::Stopped`]: the admin port closes and the gRPC socket file (when
//! listening on a Unix socket) is removed. The admin port stays up until then so readiness
//! probes see 503 rather than a refused connection.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

/// Longest wait for in-flight Checks after shutdown begins.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Where the server is in its life. Phases only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Set up, not yet serving Checks.
    Starting,
    /// Serving Checks: ready.
    Serving,
    /// Shutdown has begun: not ready (health NOT_SERVING, `/readyz` 503) while proxies move
    /// away, but Checks are still served on existing and new connections (the drain delay).
    Leaving,
    /// Draining: not ready, no new connections, GOAWAY sent, in-flight Checks finishing.
    Draining,
    /// The gRPC server has stopped; everything else stops too.
    Stopped,
}

/// An observer of the [`Phase`]; cheap to clone, one per task that must react to shutdown.
#[derive(Debug, Clone)]
pub struct Shutdown {
    phase: watch::Receiver<Phase>,
}

impl Shutdown {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Whether Checks are being served and shutdown has not begun (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Serving
    }

    /// Completes once the phase has reached `phase` (or the [`Lifecycle`] is gone, which
    /// only happens when `serve` itself ended).
    pub async fn reached(&mut self, phase: Phase) {
        // An error means the sender was dropped: nothing will ever run again.
        let _ = self.phase.wait_for(|p| *p >= phase).await;
    }
}

/// Drives the [`Phase`]: owns the grace timer and the cleanup after the gRPC server stops.
#[derive(Debug)]
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
    grace: Duration,
    delay: Duration,
    socket_file: Option<PathBuf>,
}

impl Lifecycle {
    /// A lifecycle in [`Phase::Starting`] with no drain delay, and its first observer.
    pub fn new(grace: Duration) -> (Lifecycle, Shutdown) {
        let (phase, rx) = watch::channel(Phase::Starting);
        (
            Lifecycle {
                phase,
                grace,
                delay: Duration::ZERO,
                socket_file: None,
            },
            Shutdown { phase: rx },
        )
    }

    /// Keeps serving for `delay` after the signal, not ready ([`Phase::Leaving`]), before
    /// draining begins. Zero skips the phase.
    pub fn delay_drain(&mut self, delay: Duration) {
        self.delay = delay;
    }

    /// Removes `path` (the gRPC Unix socket file) once the server has stopped.
    pub fn remove_when_stopped(&mut self, path: PathBuf) {
        self.socket_file = Some(path);
    }

    /// Runs `server` (which observes a [`Shutdown`]) until it ends, or until `signal` completes,
    /// the drain delay has passed and it has drained or the grace period has run out. Returns
    /// the server's result, or `None` when the grace period cut it off.
    pub async fn run<T>(
        self,
        server: impl Future<Output = T>,
        signal: impl Future<Output = ()>,
    ) -> Option<T> {
        tokio::pin!(server);
        self.phase.send_replace(Phase::Serving);
        let result = tokio::select! {
            biased;
            // Ended on its own (an error: a healthy server only ends when told to).
            result = &mut server => Some(result),
            () = signal => self.leave_and_drain(&mut server).await,
        };
        self.phase.send_replace(Phase::Stopped);
        if let Some(path) = &self.socket_file {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), "removing the gRPC socket file: {e}");
            }
        }
        result
    }

    /// After the signal: [`Phase::Leaving`] for the delay (unless the server ends on its own),
    /// then [`Phase::Draining`] within the grace period.
    async fn leave_and_drain<T>(
        &self,
        server: &mut std::pin::Pin<&mut impl Future<Output = T>>,
    ) -> Option<T> {
        if !self.delay.is_zero() {
            tracing::info!(delay = ?self.delay, "shutting down: health NOT_SERVING, still serving checks while proxies move away");
            self.phase.send_replace(Phase::Leaving);
            tokio::select! {
                biased;
                result = &mut *server => return Some(result),
                () = tokio::time::sleep(self.delay) => {}
            }
        }
        tracing::info!("draining: no new connections (GOAWAY), in-flight checks finishing");
        self.phase.send_replace(Phase::Draining);
        match tokio::time::timeout(self.grace, server).await {
            Ok(result) => Some(result),
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "in-flight checks did not finish in time; stopping anyway");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn phases_move_forward_and_grace_bounds_the_drain() {
        let (lifecycle, shutdown) = Lifecycle::new(Duration::from_secs(10));
        assert_eq!(shutdown.phase(), Phase::Starting);
        let mut observer = shutdown.clone();
        // A server that never finishes draining.
        let server = async move {
            observer.reached(Phase::Draining).await;
            std::future::pending::<()>().await;
        };
        let started = tokio::time::Instant::now();
        let result = lifecycle
            .run(server, tokio::time::sleep(Duration::from_secs(1)))
            .await;
        assert_eq!(result, None);
        assert_eq!(started.elapsed(), Duration::from_secs(11));
        assert_eq!(shutdown.phase(), Phase::Stopped);
    }

    #[tokio::test]
    async fn a_server_that_drains_returns_its_result() {
        let (lifecycle, shutdown) = Lifecycle::new(DRAIN_GRACE);
        let mut observer = shutdown.clone();
        let ready_while_serving = shutdown.clone();
        let server = async move {
            assert!(ready_while_serving.is_ready());
            observer.reached(Phase::Draining).await;
            assert!(!ready_while_serving.is_ready());
            7
        };
        assert_eq!(lifecycle.run(server, async {}).await, Some(7));
        assert_eq!(shutdown.phase(), Phase::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_delay_keeps_serving_unready_before_draining() {
        let (mut lifecycle, shutdown) = Lifecycle::new(Duration::from_secs(10));
        lifecycle.delay_drain(Duration::from_secs(5));
        let (mut leaving, mut draining) = (shutdown.clone(), shutdown.clone());
        let server = async move {
            leaving.reached(Phase::Leaving).await;
            let left = tokio::time::Instant::now();
            assert_eq!(leaving.phase(), Phase::Leaving);
            assert!(!leaving.is_ready());
            draining.reached(Phase::Draining).await;
            left.elapsed()
        };
        let started = tokio::time::Instant::now();
        let result = lifecycle
            .run(server, tokio::time::sleep(Duration::from_secs(1)))
            .await;
        assert_eq!(
            result,
            Some(Duration::from_secs(5)),
            "Leaving lasts the delay"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(6));
        assert_eq!(shutdown.phase(), Phase::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_ending_during_the_delay_ends_the_run() {
        let (mut lifecycle, shutdown) = Lifecycle::new(Duration::from_secs(10));
        lifecycle.delay_drain(Duration::from_secs(60));
        let mut observer = shutdown.clone();
        let server = async move {
            observer.reached(Phase::Leaving).await;
            "failed"
        };
        let started = tokio::time::Instant::now();
        assert_eq!(lifecycle.run(server, async {}).await, Some("failed"));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(shutdown.phase(), Phase::Stopped);
    }
}
