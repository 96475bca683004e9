//! TokenReview results, remembered: an LRU keyed by a keyed hash of token and audiences, with
//! separate positive and negative TTLs, and single-flight for concurrent misses.
//!
//! - The key is HMAC-SHA256 under a random per-process key over the length-prefixed token and
//!   audiences (as k8s.io/apiserver's cached token authenticator does), so the raw token is
//!   never stored and a memory dump does not yield a lookup table.
//! - Positive entries live `min(ttl, exp - now)`; negative ones (`authenticated: false` and
//!   other definitive refusals) `negative_ttl`; errors are never cached, so an API-server blip
//!   does not pin denials.
//! - Concurrent misses for one key share a single load (a `tokio::sync::OnceCell` per key in
//!   flight). If the loading request is cancelled, a waiter takes over.
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
use tokio::sync::OnceCell;
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

type Flight<V, E> = Arc<OnceCell<Result<V, E>>>;

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

impl<V: Clone, E: Clone> Cache<V, E> {
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

    /// The live entry, or the result of `load`, shared by every concurrent caller with the same
    /// key (only one `load` runs). Successful loads are cached per their [`Freshness`].
    pub async fn get_or_load<F, Fut>(&self, key: Key, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Freshness), E>>,
    {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let flight = lock(&self.flights)
            .entry(key)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let result = flight
            .get_or_init(|| async {
                // A flight that just finished may have filled the cache between our miss and
                // joining; don't load twice.
                if let Some(v) = self.get(&key) {
                    return Ok(v);
                }
                let loaded = load().await;
                loaded.map(|(v, freshness)| {
                    self.insert(key, v.clone(), freshness);
                    v
                })
            })
            .await
            .clone();
        let mut flights = lock(&self.flights);
        if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&key);
        }
        result
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

    fn cache(ttl: u64, neg: u64) -> Cache<&'static str, &'static str> {
        Cache::new(
            NonZeroUsize::new(4).unwrap(),
            Duration::from_secs(ttl),
            Duration::from_secs(neg),
            Gauge::default(),
        )
        .unwrap()
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
            .get_or_load(k, || async {
                Ok((
                    "ok",
                    Freshness::Positive {
                        cap: Some(Duration::from_secs(10)),
                    },
                ))
            })
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
        c.get_or_load(k, || async {
            Ok(("ok", Freshness::Positive { cap: None }))
        })
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
        c.get_or_load(k, || async {
            Ok(("ok", Freshness::Positive { cap: None }))
        })
        .await
        .unwrap();
        assert_eq!(c.get(&k), None);
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            let r = c
                .get_or_load(k, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("down")
                })
                .await;
            assert_eq!(r, Err("down"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn single_flight() {
        let c = Arc::new(cache(60, 5));
        let k = c.key("t", &[]);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_load(k, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(("ok", Freshness::Positive { cap: None }))
                })
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
        let c = Arc::new(cache(60, 5));
        let k = c.key("t", &[]);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_load(k, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err("down")
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err("down"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let r = c
            .get_or_load(k, || async {
                Ok(("ok", Freshness::Positive { cap: None }))
            })
            .await;
        assert_eq!(r, Ok("ok"));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_leader_is_replaced() {
        let c = Arc::new(cache(60, 5));
        let k = c.key("t", &[]);
        let leader = {
            let c = c.clone();
            tokio::spawn(async move {
                c.get_or_load(k, || async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(("leader", Freshness::Positive { cap: None }))
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let follower = {
            let c = c.clone();
            tokio::spawn(async move {
                c.get_or_load(k, || async {
                    Ok(("follower", Freshness::Positive { cap: None }))
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        leader.abort();
        assert_eq!(follower.await.unwrap(), Ok("follower"));
    }

    #[tokio::test]
    async fn lru_evicts_and_gauge_tracks() {
        let g = Gauge::default();
        let c: Cache<u32, ()> = Cache::new(
            NonZeroUsize::new(2).unwrap(),
            Duration::from_secs(60),
            Duration::from_secs(5),
            g.clone(),
        )
        .unwrap();
        for i in 0..3u32 {
            let k = c.key(&i.to_string(), &[]);
            c.get_or_load(
                k,
                || async move { Ok((i, Freshness::Positive { cap: None })) },
            )
            .await
            .unwrap();
        }
        assert_eq!(c.len(), 2);
        assert_eq!(g.get(), 2);
        assert_eq!(c.get(&c.key("0", &[])), None);
        assert_eq!(c.get(&c.key("2", &[])), Some(2));
    }
}
