//! Whether a cached verdict still holds: the check a cache hit passes before it admits anyone.
//!
//! A positive verdict depends on three things the API server can take away: the service
//! account (with the token's UID), the pod the token is bound to (with its UID; a terminating
//! pod until `deletionTimestamp` + 60 s), and the signing key (in the JWKS). The watch caches
//! ([`crate::watch`]) and the key set ([`crate::keys`]) learn of each removal from the API
//! server within milliseconds, so a cache hit asks them, and a verdict whose object or key is
//! gone is dropped at once instead of living to its TTL. Asking costs two hash probes under a
//! read lock per hit, cheaper than keeping a reverse index from objects to cache entries, and
//! it cannot miss an entry.
//!
//! When the watches themselves have been cut off from the API server for longer than
//! `kubernetes.max_staleness`, they can no longer vouch for anything: hits are then treated as
//! misses and verified again (TokenReview, or local verification that answers UNAVAILABLE).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::identity::Identity;
use crate::watch::{Kind, Objects, Presence};

/// A verified caller as the cache remembers it: who, the signing key the token's validity
/// hangs on, and the RBAC answers already given for it.
#[derive(Debug)]
pub struct Admitted {
    /// The caller.
    pub identity: Arc<Identity>,
    /// The token's `kid`, if its header named one.
    pub kid: Option<Box<str>>,
    /// `allow.rbac` answers for this caller (filled by [`crate::rbac::Authorizer::allows`]).
    pub rbac: crate::rbac::Memo,
}

impl Admitted {
    /// A caller with no RBAC answers yet.
    pub fn new(identity: Arc<Identity>, kid: Option<Box<str>>) -> Admitted {
        Admitted {
            identity,
            kid,
            rbac: Default::default(),
        }
    }
}

/// Why a cached verdict no longer holds (metric label: [`Cause::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The service account was deleted or recreated with another UID.
    ServiceAccount,
    /// The bound pod was deleted, recreated, or is past `deletionTimestamp` + 60 s.
    Pod,
    /// The signing key left the JWKS.
    Key,
}

impl Cause {
    /// Every cause, for metric labels.
    pub const ALL: [Cause; 3] = [Cause::ServiceAccount, Cause::Pod, Cause::Key];

    /// Fixed snake_case code.
    pub const fn code(self) -> &'static str {
        match self {
            Cause::ServiceAccount => "service_account",
            Cause::Pod => "pod",
            Cause::Key => "key",
        }
    }
}

/// What a cache hit may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouch {
    /// Nothing it depends on is known to be gone.
    Holds,
    /// Revoked: drop it.
    Revoked(Cause),
    /// The watches are too stale to say: verify again.
    Stale,
}

/// The revocation check, shared by every Check.
pub struct Revocation {
    objects: Arc<Objects>,
    removed_kids: Arc<Mutex<HashSet<Box<str>>>>,
    max_staleness: Duration,
}

impl Revocation {
    /// Revocation from `objects` (the watch caches), the kids that left the JWKS
    /// (`removed_kids`, filled by the key refresher) and the staleness bound.
    pub fn new(
        objects: Arc<Objects>,
        removed_kids: Arc<Mutex<HashSet<Box<str>>>>,
        max_staleness: Duration,
    ) -> Revocation {
        Revocation {
            objects,
            removed_kids,
            max_staleness,
        }
    }

    /// Does `admitted` still hold at `now` (Unix seconds)?
    pub fn vouch(&self, admitted: &Admitted, now: i64) -> Vouch {
        match self.objects.staleness() {
            Some(age) if age <= self.max_staleness => {}
            // Never listed, or cut off too long: the caches cannot vouch.
            _ => return Vouch::Stale,
        }
        let id = &admitted.identity;
        if let Some(uid) = &id.uid {
            let presence =
                self.objects
                    .judge(Kind::ServiceAccount, &id.namespace, &id.name, uid, now);
            if presence == Presence::Gone {
                return Vouch::Revoked(Cause::ServiceAccount);
            }
        }
        if let (Some(pod), Some(uid)) = (&id.pod_name, &id.pod_uid) {
            // Bound pods live in the service account's namespace.
            if self.objects.judge(Kind::Pod, &id.namespace, pod, uid, now) == Presence::Gone {
                return Vouch::Revoked(Cause::Pod);
            }
        }
        if let Some(kid) = &admitted.kid {
            let removed = self
                .removed_kids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(kid);
            if removed {
                return Vouch::Revoked(Cause::Key);
            }
        }
        Vouch::Holds
    }
}
