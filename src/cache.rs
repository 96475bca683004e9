//! TokenReview results, remembered: an LRU keyed by a keyed hash of token and audiences, with
//! separate positive and negative TTLs, and single-flight for concurrent misses.
//!
//! - The key is HMAC-SHA256 under a random per-process key over the length-prefixed token and
//!   audiences (as k8s.io/apiserver's cached token authenticator does), so the raw token is
//!   never stored and a memory dump does not yield a lookup table.
//! - Positive entries live `min(ttl, exp - now)`; negative ones (`authenticated: false` and
//!   other definitive refusals) `negative_ttl`; errors are never cached, so an API-server blip
//!   does not pin denials.
//! - Concurrent misses for one key share a single load. The load runs in its own task, so a
//!   Check that gives up (Envoy's ext_authz timeout defaults to 200 ms) does not abort the
//!   TokenReview: its answer is still cached for the next request, instead of every retry
//!   starting, and abandoning, a new one while the API server is slow.
//! - Time is `tokio::time::Instant`, so tests use `tokio::time::pause()` instead of sleeping.
//!
//! A `std::sync::Mutex` guards the LRU: even a lookup updates recency, critical sections are a
//! hash probe long, and the lock is never held across an `.await`.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aws_lc_rs::error::Unspecified;
use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use lru::LruCache;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::time::Instant;

/// A cache key: HMAC-SHA256 of token and audiences.
pub type Key = [u8; 32];

/// How a freshly loaded value may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// A positive answer: cached for `min(ttl, cap)`.
    Positive {
        /// Upper bound from the token itself (time to `exp`), if known.
        cap: Option<Duration>,
    },
    /// A definitive refusal: cached for `negative_ttl`.
    Negative,
}

struct Entry<V> {
    value: V,
    expires: Instant,
}

/// A load in flight: waiters watch for its result.
type Flight<V, E> = watch::Receiver<Option<Result<V, E>>>;

/// The task running a load ended without a result (it panicked). Load error types convert
/// from it so waiters get an error, never a hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlightLost;

/// The cache. `V` is the remembered outcome, `E` a load error (shared with concurrent waiters,
/// never stored).
pub struct Cache<V, E> {
    hmac_key: hmac::Key,
    entries: Mutex<LruCache<Key, Entry<V>>>,
    flights: Mutex<HashMap<Key, Flight<V, E>>>,
    ttl: Duration,
    negative_ttl: Duration,
    entries_gauge: Gauge,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the LRU half-updated in a way that matters
    // to correctness (worst case: a stale entry that still expires), so keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<V, E> Cache<V, E>
where
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + From<FlightLost> + 'static,
{
    /// A cache of `capacity` entries with a fresh random HMAC key (fails only if the system
    /// random number generator does).
    pub fn new(
        capacity: NonZeroUsize,
        ttl: Duration,
        negative_ttl: Duration,
        entries_gauge: Gauge,
    ) -> Result<Self, Unspecified> {
        let hmac_key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())?;
        Ok(Cache {
            hmac_key,
            entries: Mutex::new(LruCache::new(capacity)),
            flights: Mutex::new(HashMap::new()),
            ttl,
            negative_ttl,
            entries_gauge,
        })
    }

    /// The key for a token presented for these audiences.
    pub fn key(&self, token: &str, audiences: &[String]) -> Key {
        let mut ctx = hmac::Context::with_key(&self.hmac_key);
        ctx.update(&(token.len() as u64).to_le_bytes());
        ctx.update(token.as_bytes());
        for a in audiences {
            ctx.update(&(a.len() as u64).to_le_bytes());
            ctx.update(a.as_bytes());
        }
        let tag = ctx.sign();
        let mut key = [0u8; 32];
        key.copy_from_slice(tag.as_ref());
        key
    }

    /// A live entry, if any. Expired entries are dropped on the way.
    pub fn get(&self, key: &Key) -> Option<V> {
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        match entries.get(key) {
            Some(e) if e.expires > now => Some(e.value.clone()),
            Some(_) => {
                entries.pop(key);
                self.entries_gauge.set(entries.len() as i64);
                None
            }
            None => None,
        }
    }

    /// Forgets `key` (a verdict that no longer holds), so the next lookup loads afresh.
    pub fn remove(&self, key: &Key) {
        let mut entries = lock(&self.entries);
        if entries.pop(key).is_some() {
            self.entries_gauge.set(entries.len() as i64);
        }
    }

    /// The live entry, or the result of `load`, shared by every concurrent caller with the same
    /// key: only the first caller's `load` is called, and its future runs in a task of its own,
    /// so it completes (and is cached per its [`Freshness`]) even if every caller goes away.
    pub async fn get_or_load<F, Fut>(self: &Arc<Self>, key: Key, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Freshness), E>> + Send + 'static,
    {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let mut flight = {
            let mut flights = lock(&self.flights);
            match flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    // A flight that finished between our miss and taking the lock has filled
                    // the cache (it inserts before it leaves `flights`): don't load twice.
                    if let Some(v) = self.get(&key) {
                        return Ok(v);
                    }
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key, rx.clone());
                    let cache = Arc::clone(self);
                    let loading = load();
                    tokio::spawn(async move {
                        let result = loading.await.map(|(v, freshness)| {
                            cache.insert(key, v.clone(), freshness);
                            v
                        });
                        lock(&cache.flights).remove(&key);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let outcome = match flight.wait_for(Option::is_some).await {
            Ok(done) => done.clone(),
            Err(_) => None,
        };
        match outcome {
            Some(result) => result,
            None => {
                // The task died without answering; forget it so the next caller retries.
                let mut flights = lock(&self.flights);
                if flights.get(&key).is_some_and(|f| f.same_channel(&flight)) {
                    flights.remove(&key);
                }
                Err(E::from(FlightLost))
            }
        }
    }

    fn insert(&self, key: Key, value: V, freshness: Freshness) {
        let ttl = match freshness {
            Freshness::Positive { cap } => cap.map_or(self.ttl, |c| c.min(self.ttl)),
            Freshness::Negative => self.negative_ttl,
        };
        if ttl.is_zero() {
            return;
        }
        let expires = Instant::now() + ttl;
        let mut entries = lock(&self.entries);
        entries.put(key, Entry { value, expires });
        self.entries_gauge.set(entries.len() as i64);
    }

    /// Number of entries (live or not yet swept).
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether the cache holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum TestError {
        Down,
        Lost,
    }

    impl From<FlightLost> for TestError {
        fn from(_: FlightLost) -> Self {
            TestError::Lost
        }
    }

    type TestCache = Arc<Cache<&'static str, TestError>>;

    fn cache(ttl: u64, neg: u64) -> TestCache {
        Arc::new(
            Cache::new(
                NonZeroUsize::new(4).unwrap(),
                Duration::from_secs(ttl),
                Duration::from_secs(neg),
                Gauge::default(),
            )
            .unwrap(),
        )
    }

    fn positive(cap: Option<u64>) -> Freshness {
        Freshness::Positive {
            cap: cap.map(Duration::from_secs),
        }
    }

    #[test]
    fn key_depends_on_token_and_audiences_and_process() {
        let c = cache(60, 5);
        let a = vec!["a".to_string()];
        let ab = vec!["a".to_string(), "b".to_string()];
        assert_eq!(c.key("t", &a), c.key("t", &a));
        assert_ne!(c.key("t", &a), c.key("u", &a));
        assert_ne!(c.key("t", &a), c.key("t", &ab));
        // Length prefixes: ("ta", ["b"]) and ("t", ["ab"]) differ.
        assert_ne!(c.key("ta", &["b".into()]), c.key("t", &["ab".into()]));
        assert_ne!(
            cache(60, 5).key("t", &a),
            c.key("t", &a),
            "random per cache"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn positive_ttl_capped_by_exp() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let v = c
            .get_or_load(k, || async { Ok(("ok", positive(Some(10)))) })
            .await;
        assert_eq!(v, Ok("ok"));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(c.get(&k), Some("ok"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get(&k), None);
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn positive_ttl_without_cap() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        c.get_or_load(k, || async { Ok(("ok", positive(None))) })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(c.get(&k), Some("ok"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get(&k), None);
    }

    #[tokio::test(start_paused = true)]
    async fn negative_ttl() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        c.get_or_load(k, || async { Ok(("no", Freshness::Negative)) })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(c.get(&k), Some("no"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get(&k), None);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_ttl_disables() {
        let c = cache(0, 0);
        let k = c.key("t", &[]);
        c.get_or_load(k, || async { Ok(("ok", positive(None))) })
            .await
            .unwrap();
        assert_eq!(c.get(&k), None);
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let calls = calls.clone();
            let r = c
                .get_or_load(k, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(TestError::Down)
                })
                .await;
            assert_eq!(r, Err(TestError::Down));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(c.is_empty());
    }

    fn counted(
        calls: &Arc<AtomicUsize>,
        result: Result<&'static str, TestError>,
        delay: Duration,
    ) -> impl Future<Output = Result<(&'static str, Freshness), TestError>> + Send + 'static {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            result.map(|v| (v, positive(None)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn single_flight() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_load(k, || counted(&calls, Ok("ok"), Duration::from_millis(100)))
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok("ok"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(c.flights.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn single_flight_shares_errors_then_forgets_them() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_load(k, || {
                    counted(&calls, Err(TestError::Down), Duration::from_millis(100))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(TestError::Down));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let r = c
            .get_or_load(k, || async { Ok(("ok", positive(None))) })
            .await;
        assert_eq!(r, Ok("ok"));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_load_still_fills_the_cache() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let calls = Arc::new(AtomicUsize::new(0));
        let first = {
            let (c, calls) = (c.clone(), calls.clone());
            tokio::spawn(async move {
                c.get_or_load(k, || counted(&calls, Ok("first"), Duration::from_secs(1)))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The caller gives up (Envoy timed out); the TokenReview goes on.
        first.abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A retry joins the same flight instead of starting another.
        let second = c
            .get_or_load(k, || counted(&calls, Ok("second"), Duration::ZERO))
            .await;
        assert_eq!(second, Ok("first"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.get(&k), Some("first"));
    }

    #[tokio::test]
    async fn a_panicking_load_is_an_error_and_is_forgotten() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let r = c
            .get_or_load(k, || async move {
                if k.len() == 32 {
                    panic!("load panicked (expected by this test)");
                }
                Ok(("never", positive(None)))
            })
            .await;
        assert_eq!(r, Err(TestError::Lost));
        assert!(c.flights.lock().unwrap().is_empty());
        let r = c
            .get_or_load(k, || async { Ok(("ok", positive(None))) })
            .await;
        assert_eq!(r, Ok("ok"));
    }

    #[tokio::test]
    async fn lru_evicts_and_gauge_tracks() {
        let g = Gauge::default();
        let c: Arc<Cache<u32, TestError>> = Arc::new(
            Cache::new(
                NonZeroUsize::new(2).unwrap(),
                Duration::from_secs(60),
                Duration::from_secs(5),
                g.clone(),
            )
            .unwrap(),
        );
        for i in 0..3u32 {
            let k = c.key(&i.to_string(), &[]);
            c.get_or_load(k, || async move { Ok((i, positive(None))) })
                .await
                .unwrap();
        }
        assert_eq!(c.len(), 2);
        assert_eq!(g.get(), 2);
        assert_eq!(c.get(&c.key("0", &[])), None);
        assert_eq!(c.get(&c.key("2", &[])), Some(2));
    }
}
