//! Steady load through Envoy: clients sending the same GET back to back until told to stop.
//! Every answer that is not a 200, and every request without an answer, is a lost request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;

/// The running clients.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    /// Starts `clients` loops of GET `path` with `headers` on `envoy`.
    pub fn start(envoy: SocketAddr, path: &str, headers: &[(&str, &str)], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok) = (stop.clone(), ok.clone());
                let (path, headers) = (path.to_owned(), headers.clone());
                tokio::spawn(async move {
                    let headers: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_str()))
                        .collect();
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match testkit::http::get(envoy, &path, &headers).await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(r) => failures.push(format!("{} {:?}", r.status, r.body)),
                            Err(e) => failures.push(format!("{e:#}")),
                        }
                    }
                    failures
                })
            })
            .collect();
        Load { stop, ok, tasks }
    }

    /// Answers 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have been answered 200 than `from` (fails after 30 s).
    pub async fn wait_ok(&self, from: u64, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.ok() < from + n {
            assert!(
                std::time::Instant::now() < deadline,
                "load stalled at {} answers (wanted {})",
                self.ok(),
                from + n
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Stops the clients: (answers 200, descriptions of the failures).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.expect("load client panicked"));
        }
        (self.ok.load(Ordering::SeqCst), failures)
    }
}
