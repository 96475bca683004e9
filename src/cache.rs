//! TokenReview results, remembered: an LRU keyed by a keyed hash of token and audiences, with
//! separate positive and negative TTLs, and single-flight for concurrent misses.
//!
//! - The key is HMAC-SHA256 under a random per-process key over the length-prefixed token and
//!   audiences (as k8s.io/apiserver's cached token authenticator does), so the raw token is
//!   never stored and a memory dump does not yield a lookup table.
//! - Positive entries live `min(ttl, exp - now)`; negative ones (`authenticated: false` and
//!   other definitive refusals) `negative_ttl`; errors are never cached, so an API-server blip
//!   does not pin denials.
//! - Positive and negative answers live in two LRUs, the negative one smaller: anyone can
//!   mint well-shaped forgeries faster than callers present real tokens, and each forgery's
//!   verdict is an entry, so in one LRU a flood would evict every verified identity (and send
//!   its next Check to the API server in the middle of the flood). Forgeries only evict each
//!   other.
//! - Expired entries are swept, not just skipped: a heap of expiry times per LRU is drained a
//!   few entries per insert and fully once a second by a background task, so the
//!   `tokengate_cache_entries` gauge counts live entries and memory follows the live set.
//! - Memory is allocated as entries arrive (`LruCache::new` would allocate the whole
//!   capacity up front; a typo'd `max_entries` must not cost terabytes at start).
//! - Concurrent misses for one key share a single load. The load runs in its own task, so a
//!   Check that gives up (Envoy's ext_authz timeout defaults to 200 ms) does not abort the
//!   TokenReview: its answer is still cached for the next request, instead of every retry
//!   starting, and abandoning, a new one while the API server is slow. The load is told,
//!   through its [`Interest`], when no Check waits for it any more: a TokenReview not yet
//!   started is then dropped, and one in flight keeps its slot only while nobody else needs
//!   it (see `slots`), so cancelled Checks cannot queue reviews for free.
//! - Time is `tokio::time::Instant`, so tests use `tokio::time::pause()` instead of sleeping.
//!
//! A `std::sync::Mutex` guards the LRU: even a lookup updates recency, critical sections are a
//! hash probe long, and the lock is never held across an `.await`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::Duration;

use aws_lc_rs::error::Unspecified;
use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use lru::LruCache;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{watch, Notify};
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

/// Expired entries removed per insert (bounded work on the request path).
const SWEEP_ON_INSERT: usize = 8;
/// Expired entries removed per lock hold by the background sweep.
const SWEEP_CHUNK: usize = 4096;
/// How often the background sweep runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One LRU with the expiry times of its entries, soonest first.
struct Shelf<V> {
    lru: LruCache<Key, Entry<V>>,
    /// `(expires, key)` of every insert; stale items (the entry was replaced, evicted or
    /// removed) are skipped when popped. Rebuilt from the LRU if it grows past twice its size.
    expiries: BinaryHeap<Reverse<(Instant, Key)>>,
}

impl<V> Shelf<V> {
    fn new(capacity: NonZeroUsize) -> Shelf<V> {
        // `unbounded` allocates nothing; `resize` only sets the cap. The map grows as entries
        // arrive.
        let mut lru = LruCache::unbounded();
        lru.resize(capacity);
        Shelf {
            lru,
            expiries: BinaryHeap::new(),
        }
    }

    fn put(&mut self, key: Key, entry: Entry<V>) {
        self.expiries.push(Reverse((entry.expires, key)));
        self.lru.put(key, entry);
        if self.expiries.len() > 2 * self.lru.len() + 1024 {
            self.expiries = self
                .lru
                .iter()
                .map(|(k, e)| Reverse((e.expires, *k)))
                .collect();
        }
    }

    /// Removes up to `budget` entries expired at `now`; returns how many heap items it
    /// looked at (0: nothing more is due).
    fn sweep(&mut self, now: Instant, budget: usize) -> usize {
        let mut seen = 0;
        while seen < budget {
            match self.expiries.peek() {
                Some(Reverse((expires, _))) if *expires <= now => {}
                _ => break,
            }
            let Some(Reverse((_, key))) = self.expiries.pop() else {
                break;
            };
            seen += 1;
            if self.lru.peek(&key).is_some_and(|e| e.expires <= now) {
                self.lru.pop(&key);
            }
        }
        seen
    }
}

/// Both LRUs, behind one lock.
struct Entries<V> {
    positive: Shelf<V>,
    negative: Shelf<V>,
}

impl<V> Entries<V> {
    fn len(&self) -> usize {
        self.positive.lru.len() + self.negative.lru.len()
    }
}

/// A load in flight: waiters watch for its result, and count themselves in its interest.
struct Flight<V, E> {
    result: watch::Receiver<Option<Result<V, E>>>,
    interest: Interest,
}

/// How many Checks wait for a load. The load watches it: when it falls to zero (every Check
/// waiting was cancelled), work not yet started need not be.
#[derive(Clone, Debug)]
pub struct Interest(Arc<InterestState>);

#[derive(Debug, Default)]
struct InterestState {
    waiters: AtomicUsize,
    changed: Notify,
}

impl Interest {
    fn new() -> Interest {
        Interest(Arc::default())
    }

    /// An interest that never goes away: for a caller that awaits the load itself, outside
    /// the cache.
    pub fn unconditional() -> Interest {
        let interest = Interest::new();
        interest.0.waiters.store(1, Ordering::SeqCst);
        interest
    }

    /// Counts one more waiter until the guard is dropped.
    fn join(&self) -> Waiter {
        self.0.waiters.fetch_add(1, Ordering::SeqCst);
        Waiter(self.clone())
    }

    /// Whether no Check waits any more.
    pub fn gone(&self) -> bool {
        self.0.waiters.load(Ordering::SeqCst) == 0
    }

    /// Resolves once no Check waits (at once if none does).
    pub async fn abandoned(&self) {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.gone() {
                return;
            }
            changed.await;
        }
    }
}

/// One waiting Check, counted in an [`Interest`] until dropped.
struct Waiter(Interest);

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.0 .0.waiters.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0 .0.changed.notify_waiters();
        }
    }
}

/// The task running a load ended without a result (it panicked). Load error types convert
/// from it so waiters get an error, never a hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlightLost;

/// The cache. `V` is the remembered outcome, `E` a load error (shared with concurrent waiters,
/// never stored).
pub struct Cache<V, E> {
    hmac_key: hmac::Key,
    entries: Mutex<Entries<V>>,
    sweeper: Once,
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
    /// A cache of `capacity` positive and `negative_capacity` negative entries with a fresh
    /// random HMAC key (fails only if the system random number generator does).
    pub fn new(
        capacity: NonZeroUsize,
        negative_capacity: NonZeroUsize,
        ttl: Duration,
        negative_ttl: Duration,
        entries_gauge: Gauge,
    ) -> Result<Self, Unspecified> {
        let hmac_key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())?;
        Ok(Cache {
            hmac_key,
            entries: Mutex::new(Entries {
                positive: Shelf::new(capacity),
                negative: Shelf::new(negative_capacity),
            }),
            sweeper: Once::new(),
            flights: Mutex::new(HashMap::new()),
            ttl,
            negative_ttl,
            entries_gauge,
        })
    }

    /// The key for a token presented for these audiences.
    pub fn key(&self, token: &str, audiences: &[String]) -> Key {
        self.key_of(std::iter::once(token).chain(audiences.iter().map(String::as_str)))
    }

    /// The key of a sequence of parts, each length-prefixed (no two sequences share a key).
    pub fn key_of<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> Key {
        let mut ctx = hmac::Context::with_key(&self.hmac_key);
        for part in parts {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part.as_bytes());
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
        let entries = &mut *entries;
        for shelf in [&mut entries.positive, &mut entries.negative] {
            match shelf.lru.get(key) {
                Some(e) if e.expires > now => return Some(e.value.clone()),
                Some(_) => {
                    shelf.lru.pop(key);
                    break;
                }
                None => {}
            }
        }
        self.entries_gauge.set(entries.len() as i64);
        None
    }

    /// Removes every expired entry (in chunks, releasing the lock between them); returns
    /// how many heap items were looked at.
    pub fn sweep(&self) -> usize {
        let mut total = 0;
        loop {
            let now = Instant::now();
            let mut entries = lock(&self.entries);
            let seen =
                entries.positive.sweep(now, SWEEP_CHUNK) + entries.negative.sweep(now, SWEEP_CHUNK);
            self.entries_gauge.set(entries.len() as i64);
            drop(entries);
            total += seen;
            if seen == 0 {
                return total;
            }
        }
    }

    /// Starts the background sweep once, on the first load: it holds only a weak
    /// reference, so it ends when the cache is dropped.
    fn start_sweeper(self: &Arc<Self>) {
        self.sweeper.call_once(|| {
            let cache: Weak<Self> = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    match cache.upgrade() {
                        Some(c) => {
                            c.sweep();
                        }
                        None => return,
                    }
                }
            });
        });
    }

    /// Forgets `key` (a verdict that no longer holds), so the next lookup loads afresh.
    pub fn remove(&self, key: &Key) {
        let mut entries = lock(&self.entries);
        let entries = &mut *entries;
        let popped =
            entries.positive.lru.pop(key).is_some() | entries.negative.lru.pop(key).is_some();
        if popped {
            self.entries_gauge.set(entries.len() as i64);
        }
    }

    /// The live entry, or the result of `load`, shared by every concurrent caller with the same
    /// key: only the first caller's `load` is called, and its future runs in a task of its own,
    /// so it completes (and is cached per its [`Freshness`]) even if every caller goes away.
    /// `load` receives the flight's [`Interest`], to give up work nobody waits for.
    pub async fn get_or_load<F, Fut>(self: &Arc<Self>, key: Key, load: F) -> Result<V, E>
    where
        F: FnOnce(Interest) -> Fut,
        Fut: Future<Output = Result<(V, Freshness), E>> + Send + 'static,
    {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        self.start_sweeper();
        let (mut flight, _waiter) = {
            let mut flights = lock(&self.flights);
            match flights.get(&key) {
                // Joined under the lock, so a load that sees its interest gone and leaves
                // `flights` cannot miss a waiter that arrived meanwhile for long.
                Some(f) => (f.result.clone(), f.interest.join()),
                None => {
                    // A flight that finished between our miss and taking the lock has filled
                    // the cache (it inserts before it leaves `flights`): don't load twice.
                    if let Some(v) = self.get(&key) {
                        return Ok(v);
                    }
                    let (tx, rx) = watch::channel(None);
                    let interest = Interest::new();
                    let waiter = interest.join();
                    flights.insert(
                        key,
                        Flight {
                            result: rx.clone(),
                            interest: interest.clone(),
                        },
                    );
                    let cache = Arc::clone(self);
                    let loading = load(interest);
                    tokio::spawn(async move {
                        let result = loading.await.map(|(v, freshness)| {
                            cache.insert(key, v.clone(), freshness);
                            v
                        });
                        lock(&cache.flights).remove(&key);
                        let _ = tx.send(Some(result));
                    });
                    (rx, waiter)
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
                if flights
                    .get(&key)
                    .is_some_and(|f| f.result.same_channel(&flight))
                {
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
        let now = Instant::now();
        let expires = now + ttl;
        let mut entries = lock(&self.entries);
        let entries = &mut *entries;
        let (shelf, other) = match freshness {
            Freshness::Positive { .. } => (&mut entries.positive, &mut entries.negative),
            Freshness::Negative => (&mut entries.negative, &mut entries.positive),
        };
        // One answer per key: a newer verdict replaces the other kind.
        other.lru.pop(&key);
        shelf.sweep(now, SWEEP_ON_INSERT);
        shelf.put(key, Entry { value, expires });
        self.entries_gauge.set(entries.len() as i64);
    }

    /// Number of entries, positive and negative (live or not yet swept).
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Number of negative entries (live or not yet swept).
    pub fn negative_len(&self) -> usize {
        lock(&self.entries).negative.lru.len()
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
            .get_or_load(k, |_| async { Ok(("ok", positive(Some(10)))) })
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
        c.get_or_load(k, |_| async { Ok(("ok", positive(None))) })
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
        c.get_or_load(k, |_| async { Ok(("no", Freshness::Negative)) })
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
        c.get_or_load(k, |_| async { Ok(("ok", positive(None))) })
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
                .get_or_load(k, |_| async move {
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
                c.get_or_load(k, |_| counted(&calls, Ok("ok"), Duration::from_millis(100)))
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
                c.get_or_load(k, |_| {
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
            .get_or_load(k, |_| async { Ok(("ok", positive(None))) })
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
                c.get_or_load(k, |_| counted(&calls, Ok("first"), Duration::from_secs(1)))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The caller gives up (Envoy timed out); the TokenReview goes on.
        first.abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A retry joins the same flight instead of starting another.
        let second = c
            .get_or_load(k, |_| counted(&calls, Ok("second"), Duration::ZERO))
            .await;
        assert_eq!(second, Ok("first"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.get(&k), Some("first"));
    }

    /// The load is told when every waiting caller has gone, and not before.
    #[tokio::test(start_paused = true)]
    async fn the_load_learns_when_nobody_waits() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let (told_tx, mut told_rx) = tokio::sync::oneshot::channel();
        let first = {
            let c = c.clone();
            tokio::spawn(async move {
                c.get_or_load(k, |interest| async move {
                    interest.abandoned().await;
                    let _ = told_tx.send(());
                    Err(TestError::Down)
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = {
            let c = c.clone();
            tokio::spawn(async move { c.get_or_load(k, |_| async { unreachable!() }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        // One waiter remains: the load goes on.
        assert!(told_rx.try_recv().is_err(), "told too early");
        assert!(!second.is_finished());
        second.abort();
        told_rx.await.expect("the load was told nobody waits");
    }

    #[tokio::test]
    async fn a_panicking_load_is_an_error_and_is_forgotten() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        let r = c
            .get_or_load(k, |_| async move {
                if k.len() == 32 {
                    panic!("load panicked (expected by this test)");
                }
                Ok(("never", positive(None)))
            })
            .await;
        assert_eq!(r, Err(TestError::Lost));
        assert!(c.flights.lock().unwrap().is_empty());
        let r = c
            .get_or_load(k, |_| async { Ok(("ok", positive(None))) })
            .await;
        assert_eq!(r, Ok("ok"));
    }

    #[tokio::test]
    async fn lru_evicts_and_gauge_tracks() {
        let g = Gauge::default();
        let c: Arc<Cache<u32, TestError>> = Arc::new(
            Cache::new(
                NonZeroUsize::new(2).unwrap(),
                NonZeroUsize::new(2).unwrap(),
                Duration::from_secs(60),
                Duration::from_secs(5),
                g.clone(),
            )
            .unwrap(),
        );
        for i in 0..3u32 {
            let k = c.key(&i.to_string(), &[]);
            c.get_or_load(k, |_| async move { Ok((i, positive(None))) })
                .await
                .unwrap();
        }
        assert_eq!(c.len(), 2);
        assert_eq!(g.get(), 2);
        assert_eq!(c.get(&c.key("0", &[])), None);
        assert_eq!(c.get(&c.key("2", &[])), Some(2));
    }

    /// A flood of refusals (forged but well-shaped tokens) only evicts other refusals.
    #[tokio::test]
    async fn negative_entries_cannot_evict_positive_ones() {
        let g = Gauge::default();
        let c: Arc<Cache<u32, TestError>> = Arc::new(
            Cache::new(
                NonZeroUsize::new(100).unwrap(),
                NonZeroUsize::new(10).unwrap(),
                Duration::from_secs(60),
                Duration::from_secs(5),
                g.clone(),
            )
            .unwrap(),
        );
        let good = c.key("verified", &[]);
        c.get_or_load(good, |_| async { Ok((1, positive(None))) })
            .await
            .unwrap();
        for i in 0..10_000u32 {
            let k = c.key(&format!("forged-{i}"), &[]);
            c.get_or_load(k, |_| async move { Ok((0, Freshness::Negative)) })
                .await
                .unwrap();
        }
        assert_eq!(
            c.get(&good),
            Some(1),
            "the verified identity is still a hit"
        );
        assert_eq!(c.negative_len(), 10);
        assert_eq!(c.len(), 11);
        assert_eq!(g.get(), 11);
        // The newest refusals are remembered, the oldest were evicted.
        assert_eq!(c.get(&c.key("forged-9999", &[])), Some(0));
        assert_eq!(c.get(&c.key("forged-0", &[])), None);
    }

    #[tokio::test]
    async fn a_newer_verdict_replaces_the_other_kind() {
        let c = cache(60, 5);
        let k = c.key("t", &[]);
        c.insert(k, "no", Freshness::Negative);
        c.insert(k, "ok", positive(None));
        assert_eq!((c.len(), c.negative_len()), (1, 0));
        assert_eq!(c.get(&k), Some("ok"));
        c.insert(k, "no", Freshness::Negative);
        assert_eq!((c.len(), c.negative_len()), (1, 1));
        assert_eq!(c.get(&k), Some("no"));
    }

    /// Expired entries leave the cache (and the gauge) without being looked up again.
    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept_and_the_gauge_follows() {
        let g = Gauge::default();
        let c: Arc<Cache<u32, TestError>> = Arc::new(
            Cache::new(
                NonZeroUsize::new(1000).unwrap(),
                NonZeroUsize::new(1000).unwrap(),
                Duration::from_secs(60),
                Duration::from_secs(5),
                g.clone(),
            )
            .unwrap(),
        );
        for i in 0..500u32 {
            let k = c.key(&format!("no-{i}"), &[]);
            c.get_or_load(k, |_| async move { Ok((i, Freshness::Negative)) })
                .await
                .unwrap();
        }
        for i in 0..5u32 {
            let k = c.key(&format!("ok-{i}"), &[]);
            c.get_or_load(k, |_| async move { Ok((i, positive(Some(30)))) })
                .await
                .unwrap();
        }
        assert_eq!(g.get(), 505);
        // The background sweep (once a second) removes the refusals after 5 s ...
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(g.get(), 5);
        assert_eq!(c.len(), 5);
        // ... and the positive entries at their token's exp.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(g.get(), 0);
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn inserts_sweep_a_bounded_number_of_expired_entries() {
        let c = cache(60, 5);
        let k = |i: u32| c.key(&i.to_string(), &[]);
        for i in 0..3 {
            c.insert(k(i), "no", Freshness::Negative);
        }
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(c.len(), 3);
        c.insert(k(9), "no", Freshness::Negative);
        assert_eq!(c.len(), 1, "the insert swept the expired entries");
    }

    /// A huge capacity allocates nothing up front (LruCache::new would try to).
    #[test]
    fn capacity_is_not_preallocated() {
        let huge = NonZeroUsize::new(usize::MAX / 64).unwrap();
        let c: Cache<u32, TestError> = Cache::new(
            huge,
            huge,
            Duration::from_secs(60),
            Duration::from_secs(5),
            Gauge::default(),
        )
        .unwrap();
        assert!(c.is_empty());
    }
}
