//! The meters of a node: one set of token buckets ([`Meter`]) per
//! (limited rule, source identity), or per (rule, source, destination), shared by every flow the
//! rule allowed for that source.
//!
//! A new flow takes a connection token, a packet token and its bytes; each later packet of the
//! originator's direction takes a packet token and its bytes (replies are the limited service's
//! own traffic, not the source's). What finds the bucket empty is dropped and counted on the
//! meter, per policy. The buckets are keyed by names (the policy, the rule, the identities'
//! trust domain, namespace and name), hashed with a per-process random seed, so a policy or
//! membership change that keeps a rule keeps its buckets, and no peer can aim two keys at one
//! bucket.

use super::{Bucket, Rate, RateLimit};
use crate::conntrack::MeterKey;
use crate::engine::Direction;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroU64;
use std::sync::Arc;

/// Meters kept at most. Keys are (rule, certified identity) pairs, so only as many exist as
/// limited rules times identities; beyond this, idle full meters are forgotten, and if none is,
/// a new limited flow is refused (fails closed) rather than let through unmetered.
pub const MAX_METERS: usize = 1 << 16;
const SHARDS: usize = 16;
/// A meter is logged as limiting at most once per this interval.
pub const LOG_EVERY_MS: u64 = 10_000;

/// The buckets of one (rule, source[, destination]).
struct Meter {
    limit: RateLimit,
    /// The policy (as verdicts name it) and direction of the rule, for metrics.
    policy: Arc<str>,
    direction: Direction,
    connections: Option<Bucket>,
    packets: Option<Bucket>,
    bytes: Option<Bucket>,
    refused_connections: u64,
    dropped_packets: u64,
    last_logged_ms: Option<u64>,
}

impl Meter {
    fn new(limit: RateLimit, policy: &str, direction: Direction, now_ms: u64) -> Meter {
        Meter {
            limit,
            policy: policy.into(),
            direction,
            connections: limit.connections.map(|r| Bucket::full(r, now_ms)),
            packets: limit.packets.map(|r| Bucket::full(r, now_ms)),
            bytes: limit.bytes.map(|r| Bucket::full(r, now_ms)),
            refused_connections: 0,
            dropped_packets: 0,
            last_logged_ms: None,
        }
    }

    /// The rule's limits changed (a new policy set): the buckets take the new rates, full.
    fn update(&mut self, limit: RateLimit, now_ms: u64) {
        if self.limit != limit {
            let (refused, dropped) = (self.refused_connections, self.dropped_packets);
            *self = Meter::new(limit, &self.policy, self.direction, now_ms);
            (self.refused_connections, self.dropped_packets) = (refused, dropped);
        }
    }

    /// Whether a packet of `len` bytes fits the packet and byte buckets; takes from both only
    /// if it fits both.
    fn packet(&mut self, len: usize, now_ms: u64) -> bool {
        let (mut packets, mut bytes) = (self.packets, self.bytes);
        let fits = packets
            .as_mut()
            .zip(self.limit.packets)
            .is_none_or(|(b, r)| b.take(r, 1, now_ms))
            && bytes
                .as_mut()
                .zip(self.limit.bytes)
                .is_none_or(|(b, r)| b.take(r, len as u64, now_ms));
        if fits {
            (self.packets, self.bytes) = (packets, bytes);
        } else {
            self.dropped_packets += 1;
        }
        fits
    }

    fn is_idle(&self, now_ms: u64) -> bool {
        let full = |b: &Option<Bucket>, r: Option<Rate>| {
            b.zip(r).is_none_or(|(b, r)| b.is_full(r, now_ms))
        };
        full(&self.connections, self.limit.connections)
            && full(&self.packets, self.limit.packets)
            && full(&self.bytes, self.limit.bytes)
    }

    /// Whether to log this drop: the first, and then once per [`LOG_EVERY_MS`].
    fn log_now(&mut self, now_ms: u64) -> bool {
        let due = self
            .last_logged_ms
            .is_none_or(|t| now_ms >= t + LOG_EVERY_MS);
        if due {
            self.last_logged_ms = Some(now_ms);
        }
        due
    }
}

/// What a limited packet met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    Pass,
    /// Over the limit: dropped. `log`: the first drop of the meter in a while.
    Dropped {
        log: bool,
    },
    /// No meter (forgotten while idle): the caller decides the flow again and calls
    /// [`Limiter::admit_flow`] without a connection.
    Unknown,
}

/// Drops by a policy's limits, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitCounts {
    pub refused_connections: u64,
    pub dropped_packets: u64,
}

pub struct Limiter {
    shards: Box<[Mutex<HashMap<MeterKey, Meter>>]>,
    hasher: foldhash::fast::RandomState,
    /// Counts of meters forgotten, by (direction, policy), so totals never go back.
    retired: Mutex<BTreeMap<(Direction, Arc<str>), LimitCounts>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            retired: Mutex::new(BTreeMap::new()),
        }
    }
}

/// One end of a metered flow: an identity (trust domain, namespace, name), or for an end
/// outside the mesh, its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Who<'a> {
    Identity(&'a str, &'a str, &'a str),
    Address(std::net::IpAddr),
}

/// Who a bucket counts for: a rule of a policy, and the ends it is keyed by.
pub struct MeterOf<'a> {
    pub policy: &'a str,
    pub direction: Direction,
    pub rule: u16,
    pub src: Who<'a>,
    /// Only for limits per source and destination.
    pub dst: Option<Who<'a>>,
}

impl Limiter {
    /// The bucket key of `m`.
    pub fn key(&self, m: &MeterOf) -> MeterKey {
        let h = self
            .hasher
            .hash_one((m.policy, m.direction, m.rule, m.src, m.dst));
        MeterKey(NonZeroU64::new(h).unwrap_or(NonZeroU64::MIN))
    }

    fn shard(&self, key: MeterKey) -> &Mutex<HashMap<MeterKey, Meter>> {
        &self.shards[(key.0.get() >> 32) as usize % SHARDS]
    }

    /// The first packet of a flow that `limit` governs: with `connection`, it takes a connection
    /// token too (a new flow; not a tracked flow whose meter was forgotten). `Dropped` if a
    /// bucket is empty, or if no meter can be kept for it.
    #[allow(clippy::too_many_arguments)]
    pub fn admit_flow(
        &self,
        key: MeterKey,
        limit: &RateLimit,
        policy: &str,
        direction: Direction,
        connection: bool,
        len: usize,
        now_ms: u64,
    ) -> Metered {
        let mut shard = self.shard(key).lock();
        if !shard.contains_key(&key) && shard.len() >= MAX_METERS / SHARDS {
            self.forget_idle(&mut shard, now_ms);
            if shard.len() >= MAX_METERS / SHARDS {
                return Metered::Dropped { log: false };
            }
        }
        let m = shard
            .entry(key)
            .or_insert_with(|| Meter::new(*limit, policy, direction, now_ms));
        m.update(*limit, now_ms);
        if connection {
            if let (Some(b), Some(r)) = (m.connections.as_mut(), m.limit.connections) {
                if !b.take(r, 1, now_ms) {
                    m.refused_connections += 1;
                    m.dropped_packets += 1;
                    // The refused flow's own record says so (a new flow, `rate-limited`).
                    return Metered::Dropped { log: false };
                }
            }
        }
        match m.packet(len, now_ms) {
            true => Metered::Pass,
            false => Metered::Dropped {
                log: m.log_now(now_ms),
            },
        }
    }

    /// A later packet of the originator's direction of a flow counted against `key`.
    #[inline]
    pub fn admit_packet(&self, key: MeterKey, len: usize, now_ms: u64) -> Metered {
        let mut shard = self.shard(key).lock();
        let Some(m) = shard.get_mut(&key) else {
            return Metered::Unknown;
        };
        if m.packet(len, now_ms) {
            Metered::Pass
        } else {
            Metered::Dropped {
                log: m.log_now(now_ms),
            }
        }
    }

    /// A policy change gave the rule of meter `key` the limits `limit`.
    pub fn refresh(&self, key: MeterKey, limit: &RateLimit, now_ms: u64) {
        if let Some(m) = self.shard(key).lock().get_mut(&key) {
            m.update(*limit, now_ms);
        }
    }

    fn forget_idle(&self, shard: &mut HashMap<MeterKey, Meter>, now_ms: u64) {
        let mut retired = self.retired.lock();
        shard.retain(|_, m| {
            let idle = m.is_idle(now_ms);
            if idle {
                let c = retired.entry((m.direction, m.policy.clone())).or_default();
                c.refused_connections += m.refused_connections;
                c.dropped_packets += m.dropped_packets;
            }
            !idle
        });
    }

    /// Drops by limits so far, by (direction, policy).
    pub fn counts(&self) -> BTreeMap<(Direction, String), LimitCounts> {
        let mut out: BTreeMap<(Direction, String), LimitCounts> = self
            .retired
            .lock()
            .iter()
            .map(|((d, p), c)| ((*d, p.to_string()), *c))
            .collect();
        for shard in self.shards.iter() {
            for m in shard.lock().values() {
                let c = out.entry((m.direction, m.policy.to_string())).or_default();
                c.refused_connections += m.refused_connections;
                c.dropped_packets += m.dropped_packets;
            }
        }
        out
    }

    /// Forgets every meter, as if each had been idle long enough to be forgotten: what a
    /// tracked flow meets next must then come from the rules in force.
    pub fn forget_all(&self) {
        for s in self.shards.iter() {
            s.lock().clear();
        }
    }

    pub fn meters(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Per;

    fn limit(connections: Option<u64>, packets: Option<u64>) -> RateLimit {
        RateLimit {
            connections: connections.map(|n| Rate {
                per_second: n,
                burst: n,
            }),
            packets: packets.map(|n| Rate {
                per_second: n,
                burst: n,
            }),
            bytes: None,
            per: Per::Source,
        }
    }

    fn of<'a>(src: &'a str) -> MeterOf<'a> {
        MeterOf {
            policy: "NetworkPolicy microblog/post-allow-list",
            direction: Direction::Ingress,
            rule: 0,
            src: Who::Identity("cluster.local", "microblog", src),
            dst: None,
        }
    }

    #[test]
    fn one_source_is_held_to_its_limit_and_another_is_not_touched() {
        let l = Limiter::default();
        let lim = limit(Some(3), Some(10));
        let (api, search) = (l.key(&of("api")), l.key(&of("search")));
        assert_ne!(api, search);
        let p = "NetworkPolicy microblog/post-allow-list";
        let new = |k| l.admit_flow(k, &lim, p, Direction::Ingress, true, 60, 1000);
        let passed = (0..10).filter(|_| new(api) == Metered::Pass).count();
        assert_eq!(passed, 3, "three connections a second");
        assert_eq!(new(search), Metered::Pass, "search has its own bucket");
        // Packets: 10 a second; api used 3 with its connections.
        let more = (0..20)
            .filter(|_| l.admit_packet(api, 100, 1000) == Metered::Pass)
            .count();
        assert_eq!(more, 7);
        // The first drop is logged, the next ones not until LOG_EVERY_MS.
        assert_eq!(
            l.admit_packet(api, 100, 1000),
            Metered::Dropped { log: false }
        );
        assert_eq!(
            l.admit_packet(api, 100, 1000 + LOG_EVERY_MS),
            Metered::Pass,
            "refilled"
        );
        let c = l.counts()[&(Direction::Ingress, p.to_string())];
        assert_eq!(c.refused_connections, 7);
        assert_eq!(
            c.dropped_packets,
            7 + 14,
            "refused connections' packets too"
        );
        assert_eq!(l.admit_packet(l.key(&of("user")), 1, 0), Metered::Unknown);
    }

    #[test]
    fn the_table_is_bounded_forgets_idle_meters_and_keeps_their_counts() {
        let l = Limiter::default();
        let lim = limit(None, Some(1));
        let p = "GlobalNetworkPolicy flood";
        let (mut passed, mut refused) = (0u64, 0u64);
        for i in 0..MAX_METERS * 2 {
            let k = l.key(&of(&format!("id{i}")));
            match l.admit_flow(k, &lim, p, Direction::Ingress, true, 1, 0) {
                Metered::Pass => {
                    passed += 1;
                    // Its one token is used: the meter is not idle.
                    assert_eq!(l.admit_packet(k, 1, 0), Metered::Dropped { log: true });
                }
                Metered::Dropped { .. } => refused += 1,
                Metered::Unknown => unreachable!(),
            }
        }
        assert!(l.meters() <= MAX_METERS);
        assert!(
            refused > 0,
            "full of busy meters: new limited flows are refused"
        );
        assert!(passed >= MAX_METERS as u64 / 2, "{passed}");
        let key = (Direction::Ingress, p.to_string());
        assert_eq!(l.counts()[&key].dropped_packets, passed);
        // A second later every bucket is full again: idle meters make room, counts stay.
        let k = l.key(&of("late"));
        assert_eq!(
            l.admit_flow(k, &lim, p, Direction::Ingress, true, 1, 1000),
            Metered::Pass
        );
        assert_eq!(l.counts()[&key].dropped_packets, passed);
    }
}
