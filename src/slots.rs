//! TokenReview slots: `kubernetes.max_in_flight` of them, handed out fairly from a bounded
//! queue, so a flood of costly tokens from one place cannot starve callers elsewhere.
//!
//! A token that passes precheck (right shape, issuer and `kid`; only the signature wrong) is
//! indistinguishable from a legitimate new token until the API server has looked at it, so
//! fairness cannot come from the token. It comes from where the Check came from: each waiter
//! belongs to a *flow*, the downstream peer's IP address (Envoy's
//! `attributes.source.address`, else the gRPC connection's peer), and free slots go to flows
//! in turn, as a fair queue (deficit round robin with equal costs) does, rather than to
//! waiters in arrival order. The rules, borrowed from FQ-CoDel (RFC 8290) and Envoy's
//! overload manager:
//!
//! - **Round robin across flows, FIFO within one.** A flow that becomes active goes to the
//!   front of the rotation (FQ-CoDel's "new flows" list), so a caller whose peer has nothing
//!   queued gets the next free slot however long another peer's backlog is.
//! - **Bounded queue, shed at once.** At most `kubernetes.max_queued` waiters. When it is
//!   full, the *longest* flow loses its oldest waiter (FQ-CoDel drops from the fattest flow,
//!   head first: the oldest waiter is the one whose caller has most likely given up); if the
//!   newcomer's own flow is the longest, the newcomer is refused instead. Either way the
//!   answer is immediate (gRPC UNAVAILABLE, counted as `queue_full`), not after
//!   `kubernetes.timeout`.
//! - **Waiting is still bounded by time** (the caller wraps [`Slots::acquire`] in
//!   `kubernetes.timeout`), and a waiter whose Checks were all cancelled leaves the queue
//!   (the future is dropped; `Waiting`'s `Drop` removes it).
//! - **Orphans yield.** A review already sent whose Checks were all cancelled may finish (its
//!   answer is cached for Envoy's retry) only while nobody waits for a slot and at most
//!   [`Slots::max_orphans`] are running; [`Slots::adopt_orphan`] says whether it may, and
//!   [`Slots::pressure`] wakes orphans to give their slots up when a waiter queues.
//!
//! Bound, stated plainly: fairness is per source address. An attacker who spreads a flood over
//! many addresses gets a share per address, and a legitimate caller whose traffic shares the
//! attacker's address (behind the same NAT or gateway) shares its queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{oneshot, Notify};

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The queue was full and this waiter's flow was the longest.
    QueueFull,
}

/// A slot held: dropping it hands the slot to the next waiter, or frees it.
#[derive(Debug)]
pub struct Slot {
    slots: Option<Arc<Slots>>,
}

impl Slot {
    fn defuse(mut self) {
        self.slots = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            Slots::release(&slots);
        }
    }
}

/// An orphaned review's place in [`Slots::max_orphans`]; dropping it leaves.
#[derive(Debug)]
pub struct Orphan {
    slots: Arc<Slots>,
}

impl Drop for Orphan {
    fn drop(&mut self) {
        self.slots.state().orphans -= 1;
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Result<Slot, Shed>>,
}

#[derive(Default)]
struct State {
    free: usize,
    queued: usize,
    orphans: usize,
    next_id: u64,
    /// Waiters of each active flow, oldest first.
    flows: HashMap<Arc<str>, VecDeque<Waiter>>,
    /// Active flows in serving order.
    rotation: VecDeque<Arc<str>>,
}

/// The slots and their queue. Shared (`Arc`): each [`Slot`] returns itself on drop.
pub struct Slots {
    state: Mutex<State>,
    queued_gauge: Gauge,
    max_queued: usize,
    max_orphans: usize,
    pressure: Notify,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("max_queued", &self.max_queued)
            .finish_non_exhaustive()
    }
}

impl Slots {
    /// `max_in_flight` slots, at most `max_queued` waiters (counted in `queued_gauge`);
    /// orphans may keep up to half the slots (at least one).
    pub fn new(max_in_flight: usize, max_queued: usize, queued_gauge: Gauge) -> Arc<Slots> {
        Arc::new(Slots {
            state: Mutex::new(State {
                free: max_in_flight,
                ..State::default()
            }),
            queued_gauge,
            max_queued,
            max_orphans: (max_in_flight / 2).max(1),
            pressure: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the counters consistent before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Orphaned reviews allowed to run at once.
    pub fn max_orphans(&self) -> usize {
        self.max_orphans
    }

    /// Waiters now queued.
    pub fn queued(&self) -> usize {
        self.state().queued
    }

    /// A slot for `flow`: at once if one is free and nobody waits, else when the fair queue
    /// says so. `Err` at once when the queue is full and `flow` is its longest. Dropping the
    /// future leaves the queue.
    pub async fn acquire(self: &Arc<Self>, flow: &str) -> Result<Slot, Shed> {
        let (id, rx) = {
            let mut st = self.state();
            if st.free > 0 && st.queued == 0 {
                st.free -= 1;
                return Ok(Slot {
                    slots: Some(Arc::clone(self)),
                });
            }
            if st.queued >= self.max_queued {
                let own = st.flows.get(flow).map_or(0, VecDeque::len);
                let longest = st
                    .flows
                    .iter()
                    .max_by_key(|(_, w)| w.len())
                    .map(|(k, w)| (Arc::clone(k), w.len()));
                match longest {
                    Some((victim, len)) if len > own => {
                        let shed = st.flows.get_mut(&victim).and_then(VecDeque::pop_front);
                        if st.flows.get(&victim).is_some_and(VecDeque::is_empty) {
                            st.flows.remove(&victim);
                            st.rotation.retain(|f| *f != victim);
                        }
                        if let Some(w) = shed {
                            // Its place goes to the newcomer below (the gauge is set there).
                            st.queued -= 1;
                            let _ = w.tx.send(Err(Shed::QueueFull));
                        }
                    }
                    _ => return Err(Shed::QueueFull),
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_id;
            st.next_id += 1;
            match st.flows.get_mut(flow) {
                Some(waiters) => waiters.push_back(Waiter { id, tx }),
                None => {
                    let key: Arc<str> = Arc::from(flow);
                    st.flows
                        .insert(Arc::clone(&key), VecDeque::from([Waiter { id, tx }]));
                    st.rotation.push_front(key);
                }
            }
            st.queued += 1;
            self.queued_gauge.set(st.queued as i64);
            (id, rx)
        };
        // Orphaned reviews give their slots up to waiters.
        self.pressure.notify_waiters();
        let waiting = Waiting {
            slots: self,
            flow,
            id,
        };
        let result = match rx.await {
            Ok(r) => r,
            // The sender is only dropped after being sent on; treat the impossible as shed.
            Err(_) => Err(Shed::QueueFull),
        };
        std::mem::forget(waiting);
        result
    }

    /// A slot if one is free and nobody waits; never queues.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut st = self.state();
        if st.free == 0 || st.queued > 0 {
            return None;
        }
        st.free -= 1;
        Some(Slot {
            slots: Some(Arc::clone(self)),
        })
    }

    /// Gives a freed slot to the next waiter in the rotation, or frees it.
    fn release(self: &Arc<Self>) {
        let mut st = self.state();
        loop {
            let Some(flow) = st.rotation.pop_front() else {
                st.free += 1;
                return;
            };
            let waiter = st.flows.get_mut(&flow).and_then(VecDeque::pop_front);
            if st.flows.get(&flow).is_some_and(|w| !w.is_empty()) {
                st.rotation.push_back(flow);
            } else {
                st.flows.remove(&flow);
            }
            let Some(waiter) = waiter else { continue };
            st.queued -= 1;
            self.queued_gauge.set(st.queued as i64);
            let slot = Slot {
                slots: Some(Arc::clone(self)),
            };
            match waiter.tx.send(Ok(slot)) {
                Ok(()) => return,
                // Its caller went away a moment ago: the next one.
                Err(Ok(slot)) => slot.defuse(),
                Err(Err(_)) => {}
            }
        }
    }

    /// Whether a review whose callers all went away may go on running: only while nobody is
    /// queued and fewer than [`Slots::max_orphans`] do. Register interest in
    /// [`Slots::pressure`] before asking, so a waiter queued just after is not missed.
    pub fn adopt_orphan(self: &Arc<Self>) -> Option<Orphan> {
        let mut st = self.state();
        if st.queued > 0 || st.orphans >= self.max_orphans {
            return None;
        }
        st.orphans += 1;
        Some(Orphan {
            slots: Arc::clone(self),
        })
    }

    /// Notified whenever a waiter queues: orphans then give their slots up.
    pub fn pressure(&self) -> &Notify {
        &self.pressure
    }
}

/// A queued waiter; dropped before it is served (its Checks were cancelled, or it timed
/// out), it leaves the queue.
struct Waiting<'a> {
    slots: &'a Arc<Slots>,
    flow: &'a str,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.slots.state();
        let Some(waiters) = st.flows.get_mut(self.flow) else {
            // Already served or shed: a slot sent to a dropped receiver comes back through
            // `release`'s failed send, or was dropped with the channel (see below).
            return;
        };
        let before = waiters.len();
        waiters.retain(|w| w.id != self.id);
        let removed = before != waiters.len();
        if waiters.is_empty() {
            st.flows.remove(self.flow);
            st.rotation.retain(|f| &**f != self.flow);
        }
        if removed {
            st.queued -= 1;
            self.slots.queued_gauge.set(st.queued as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn queued_soon(slots: &Arc<Slots>, n: usize) {
        for _ in 0..1000 {
            if slots.queued() == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("expected {n} queued, have {}", slots.queued());
    }

    fn spawn_acquire(
        slots: &Arc<Slots>,
        flow: &'static str,
        order: &Arc<Mutex<Vec<String>>>,
        name: &'static str,
    ) -> tokio::task::JoinHandle<Result<(), Shed>> {
        let (slots, order) = (Arc::clone(slots), Arc::clone(order));
        tokio::spawn(async move {
            let slot = slots.acquire(flow).await?;
            order.lock().unwrap().push(name.to_owned());
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(slot);
            Ok(())
        })
    }

    /// A new flow is served before the backlog of an old one; flows then alternate.
    #[tokio::test(start_paused = true)]
    async fn new_flows_first_then_round_robin() {
        let slots = Slots::new(1, 100, Gauge::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots.acquire("flood").await.unwrap();
        let mut tasks = Vec::new();
        for (i, name) in ["f1", "f2", "f3", "f4"].into_iter().enumerate() {
            tasks.push(spawn_acquire(&slots, "flood", &order, name));
            queued_soon(&slots, i + 1).await;
        }
        tasks.push(spawn_acquire(&slots, "legit", &order, "l1"));
        queued_soon(&slots, 5).await;
        tasks.push(spawn_acquire(&slots, "legit", &order, "l2"));
        queued_soon(&slots, 6).await;
        drop(held);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["l1", "f1", "l2", "f2", "f3", "f4"],);
        assert_eq!(slots.queued(), 0);
        assert_eq!(slots.state().free, 1);
    }

    /// Full queue: the longest flow loses its oldest waiter at once; a newcomer from the
    /// longest flow is refused at once.
    #[tokio::test(start_paused = true)]
    async fn full_queue_sheds_the_longest_flow() {
        let slots = Slots::new(1, 3, Gauge::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots.acquire("flood").await.unwrap();
        let f1 = spawn_acquire(&slots, "flood", &order, "f1");
        queued_soon(&slots, 1).await;
        let f2 = spawn_acquire(&slots, "flood", &order, "f2");
        queued_soon(&slots, 2).await;
        let f3 = spawn_acquire(&slots, "flood", &order, "f3");
        queued_soon(&slots, 3).await;
        // The flood's own newcomer is refused.
        assert_eq!(slots.acquire("flood").await.unwrap_err(), Shed::QueueFull);
        // Another peer's newcomer takes the place of the flood's oldest waiter.
        let l1 = spawn_acquire(&slots, "legit", &order, "l1");
        assert_eq!(f1.await.unwrap(), Err(Shed::QueueFull));
        queued_soon(&slots, 3).await;
        drop(held);
        for t in [l1, f2, f3] {
            t.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["l1", "f2", "f3"]);
    }

    /// A waiter that goes away leaves the queue, and the slot goes to the next one.
    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_leave_the_queue() {
        let slots = Slots::new(1, 10, Gauge::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots.acquire("a").await.unwrap();
        let gone = spawn_acquire(&slots, "a", &order, "gone");
        queued_soon(&slots, 1).await;
        let stays = spawn_acquire(&slots, "b", &order, "stays");
        queued_soon(&slots, 2).await;
        gone.abort();
        queued_soon(&slots, 1).await;
        drop(held);
        stays.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), ["stays"]);
        assert_eq!(slots.queued(), 0);
        assert_eq!(slots.state().free, 1);
    }

    #[tokio::test]
    async fn orphans_are_bounded_and_yield_to_waiters() {
        let slots = Slots::new(4, 10, Gauge::default());
        assert_eq!(slots.max_orphans(), 2);
        let a = slots.adopt_orphan().unwrap();
        let _b = slots.adopt_orphan().unwrap();
        assert!(slots.adopt_orphan().is_none(), "at most half the slots");
        drop(a);
        let _c = slots.adopt_orphan().unwrap();
        // With a waiter queued, no orphan may run.
        let held: Vec<Slot> = vec![
            slots.acquire("x").await.unwrap(),
            slots.acquire("x").await.unwrap(),
            slots.acquire("x").await.unwrap(),
            slots.acquire("x").await.unwrap(),
        ];
        let s = Arc::clone(&slots);
        let waiter = tokio::spawn(async move { s.acquire("y").await.map(drop) });
        queued_soon(&slots, 1).await;
        drop(_c);
        assert!(slots.adopt_orphan().is_none(), "a waiter is queued");
        drop(held);
        waiter.await.unwrap().unwrap();
        assert!(slots.adopt_orphan().is_some());
    }

    #[tokio::test]
    async fn zero_queue_sheds_whenever_all_slots_are_busy() {
        let slots = Slots::new(1, 0, Gauge::default());
        let held = slots.acquire("a").await.unwrap();
        assert_eq!(slots.acquire("b").await.unwrap_err(), Shed::QueueFull);
        drop(held);
        assert!(slots.acquire("b").await.is_ok());
    }
}
