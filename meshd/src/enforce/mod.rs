//! Packet-level enforcement: where a packet is allowed or dropped by policy, and why.
//!
//! Egress is checked in `tun-rx` before encryption, with the destination peer's identity; ingress
//! in `udp-rx` after decryption and the allowed-IPs check, with the identity of the peer whose key
//! authenticated the packet. Both identities come from certificates ([`Rules`] maps each
//! member's static key to its identity), never from an address alone.
//!
//! A packet of a tracked flow passes on the connection table alone. A new flow gets a verdict
//! from the compiled policy ([`policy::engine::Compiled`]); allowed flows are tracked, and every
//! new flow, allowed or not, goes to the flow log. The table is sharded by flow, so the two data
//! threads rarely meet on a lock; verdicts read the rules through one atomic pointer.

pub mod flowlog;

use crate::drops::{Drop, DropCounters};
use crate::routing::AllowedIps;
use arc_swap::ArcSwap;
use flowlog::{FlowEvent, FlowLog};
use parking_lot::Mutex;
use policy::conntrack::{ConnKey, Conntrack, Entry, MeterKey, Timeouts, Tracked};
use policy::engine::{Audit, Compiled, Direction, Endpoint, FastVerdict, Flow, Posture};
use policy::fragments::Fragments;
use policy::ratelimit::meters::{Limiter, MeterOf, Metered, Who};
use proto::ip::{FlowKey, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PROTO_UDPLITE};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Connection-table shards: enough that the two data threads and the maintenance task seldom
/// wait on each other.
const SHARDS: usize = 16;
/// Fragmented datagrams in flight whose first fragment passed, at most.
const MAX_FRAGMENTED_DATAGRAMS: usize = 4096;
/// The identity index of this node (see [`Rules::build`]).
pub const LOCAL: u32 = 0;
pub use policy::engine::{EXTERNAL, UNKNOWN};

/// An identity as policy and the flow log see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub endpoint: Endpoint,
    /// The overlay addresses its certificate names.
    pub addrs: Vec<proto::Cidr>,
}

/// Whose an identity is: the key whose tunnel its packets cross, and whether it is a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    /// This node ([`LOCAL`]) or a workload it runs: its packets are read from and written to the
    /// TUN device.
    Local,
    /// Member `key`'s own certificate, or (`workload`) a workload certificate bound to its key.
    Member { key: [u8; 32], workload: bool },
}

impl From<[u8; 32]> for Holder {
    /// A member's own identity.
    fn from(key: [u8; 32]) -> Holder {
        Holder::Member {
            key,
            workload: false,
        }
    }
}

/// Everything a verdict reads, rebuilt whenever policy or membership changes.
pub struct Rules {
    pub compiled: Compiled,
    /// The set with its staged changes ([`policy::engine::PolicySet::staged_view`]), resolved
    /// against the same identities: the flow log says what it would decide. It never decides a
    /// packet.
    pub staged: Option<Compiled>,
    /// Index 0 is this node; then its workloads, the members and their workloads, in the order
    /// given (indices of identities that left are retired, not reused).
    pub identities: Vec<Identity>,
    /// Whose each identity is (as `identities`).
    holders: Vec<Holder>,
    /// Each member's own identity, by its key.
    by_key: HashMap<[u8; 32], u32>,
    /// The live identities other than this node's, by holder and addresses.
    live: HashMap<(Holder, Vec<proto::Cidr>), u32>,
    /// Which identity's certificate names an address (longest prefix), to re-decide tracked
    /// flows after a change.
    owners: AllowedIps<u32>,
    pub audit_all: bool,
    pub serial: u64,
    pub posture: Posture,
    /// The routes outside the mesh this node serves as a gateway.
    pub served: Vec<proto::Cidr>,
}

/// A verdict on the first packet of a flow, and what it was decided as: the policy direction of
/// the governed identity, and the two ends ([`LOCAL`], a member, [`EXTERNAL`] or [`UNKNOWN`]).
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    pub verdict: FastVerdict,
    /// A denial that is only audited.
    pub audited: bool,
    pub direction: Direction,
    pub src: u32,
    pub dst: u32,
}

impl Rules {
    /// Resolves `set` against this node (`local`) and the `others`: this node's workloads
    /// ([`Holder::Local`]), the members (by static key) and their workloads.
    pub fn build<H: Into<Holder>>(
        set: &policy::engine::PolicySet,
        local: Identity,
        others: impl IntoIterator<Item = (H, Identity)>,
        audit_all: bool,
        serial: u64,
    ) -> Rules {
        let mut identities = vec![local];
        let mut holders = vec![Holder::Local];
        for (holder, id) in others {
            holders.push(holder.into());
            identities.push(id);
        }
        let (by_key, live) = index(&identities, &holders, 1..identities.len() as u32);
        let owners = owners(&identities, 0..identities.len() as u32);
        let endpoints: Vec<Endpoint> = identities.iter().map(|i| i.endpoint.clone()).collect();
        Rules {
            compiled: set.resolve(&endpoints),
            staged: set.staged_view().map(|view| view.resolve(&endpoints)),
            identities,
            holders,
            by_key,
            live,
            owners,
            audit_all,
            serial,
            posture: set.posture,
            served: Vec::new(),
        }
    }

    /// The same rules on a node that serves `routes` as a gateway.
    pub fn serving(mut self, routes: &[proto::Cidr]) -> Rules {
        self.served = routes.to_vec();
        self
    }

    /// The same rules for new `others` (as [`Rules::build`] takes them), resolving only the
    /// identities that are new or changed (one that left keeps its index, retired, never
    /// reused). `None` when rebuilding from scratch is better: the local identity changed, or
    /// retired indices outnumber live ones. `set` must be the set these rules were built from.
    pub fn with_members<H: Into<Holder>>(
        &self,
        set: &policy::engine::PolicySet,
        local: &Identity,
        others: impl IntoIterator<Item = (H, Identity)>,
    ) -> Option<Rules> {
        if self.identities.first() != Some(local) {
            return None;
        }
        let mut identities = self.identities.clone();
        let mut holders = self.holders.clone();
        let mut live_ids = Vec::new();
        let mut added = Vec::new();
        for (holder, id) in others {
            let holder = holder.into();
            match self.live.get(&(holder, id.addrs.clone())) {
                Some(&i) if self.identities.get(i as usize) == Some(&id) => live_ids.push(i),
                _ => {
                    live_ids.push(identities.len() as u32);
                    added.push(id.endpoint.clone());
                    identities.push(id);
                    holders.push(holder);
                }
            }
        }
        if identities.len() > 2 * (live_ids.len() + 1) + 16 {
            return None;
        }
        let (by_key, live) = index(&identities, &holders, live_ids.iter().copied());
        let mut compiled = self.compiled.clone();
        compiled.extend(set, &added);
        let staged = match (&self.staged, set.staged_view()) {
            (Some(c), Some(view)) => {
                let mut c = c.clone();
                c.extend(&view, &added);
                Some(c)
            }
            _ => None,
        };
        let all = std::iter::once(LOCAL).chain(live_ids.iter().copied());
        Some(Rules {
            compiled,
            staged,
            owners: owners(&identities, all),
            identities,
            holders,
            by_key,
            live,
            audit_all: self.audit_all,
            serial: self.serial,
            posture: self.posture,
            served: self.served.clone(),
        })
    }

    pub fn identity_of(&self, key: &[u8; 32]) -> u32 {
        self.by_key.get(key).copied().unwrap_or(UNKNOWN)
    }

    pub fn identity(&self, id: u32) -> Option<&Identity> {
        self.identities.get(id as usize)
    }

    /// Whether identity `id` is this node's or one of its workloads'.
    pub fn is_local(&self, id: u32) -> bool {
        self.holders.get(id as usize) == Some(&Holder::Local)
    }

    /// Whether identities `a` and `b` are of one member (its own and its workloads').
    fn same_member(&self, a: u32, b: u32) -> bool {
        let key = |id: u32| match self.holders.get(id as usize) {
            Some(Holder::Member { key, .. }) => Some(key),
            _ => None,
        };
        key(a).is_some() && key(a) == key(b)
    }

    /// The two ends of `flow` as seen at this node `at` (Egress: read from the TUN device, for
    /// peer `remote`; Ingress: decrypted from peer `remote`, for the TUN device), and the policy
    /// direction that decides it: this node's own traffic is decided by its identity's egress or
    /// ingress; traffic it forwards as a gateway, between a member and a route it serves, by the
    /// member's ingress (from outside) or egress (to outside), the external end selected by its
    /// address. `None`: the packet is neither this node's nor for a route it serves.
    ///
    /// The near end is this node or the workload of this node whose certificate names the
    /// address. The far end is the authenticated peer's identity that names the address: its own
    /// or one of its workloads' (a packet of a member names an address only its certificates
    /// hold: the data path checked the peer's allowed IPs, derived from them). For an address no
    /// identity holds, the far end is outside the mesh (the peer's allowed IPs hold only its
    /// identities' addresses and the routes it carries, and a route never overlaps an identity's
    /// address). An address another member's certificate names, which the data path never lets
    /// through (a change under way), is an unknown end.
    pub fn ends(
        &self,
        at: Direction,
        flow: &FlowKey,
        remote: u32,
    ) -> Option<(Direction, u32, u32)> {
        let here = |ip| match self.owners.lookup(ip) {
            Some(&id) if self.is_local(id) => Some(id),
            _ if self.served.iter().any(|r| r.contains(ip)) => Some(EXTERNAL),
            _ => None,
        };
        let there = |ip| match self.owners.lookup(ip) {
            Some(&id) if self.is_local(id) => None,
            _ if remote == UNKNOWN => Some(UNKNOWN),
            Some(&id) if self.same_member(id, remote) => Some(id),
            Some(_) => Some(UNKNOWN),
            None => Some(EXTERNAL),
        };
        let member = |id| id != EXTERNAL && id != UNKNOWN;
        match at {
            Direction::Egress => {
                let (src, dst) = (here(flow.src)?, there(flow.dst)?);
                if self.is_local(src) {
                    Some((Direction::Egress, src, dst))
                } else {
                    member(dst).then_some((Direction::Ingress, src, dst))
                }
            }
            Direction::Ingress => {
                let (src, dst) = (there(flow.src)?, here(flow.dst)?);
                if self.is_local(dst) {
                    Some((Direction::Ingress, src, dst))
                } else {
                    member(src).then_some((Direction::Egress, src, dst))
                }
            }
        }
    }

    /// What the staged view ([`Rules::staged`]) would decide for a flow decided as `d`; `None`
    /// when nothing is staged.
    pub fn staged_verdict(&self, flow: &FlowKey, d: &Decision) -> Option<FastVerdict> {
        let staged = self.staged.as_ref()?;
        Some(staged.decide(
            d.direction,
            &policy_flow(flow),
            d.src,
            Some(flow.src),
            d.dst,
            Some(flow.dst),
        ))
    }

    /// The verdict for the first packet of `flow`, seen at this node `at`, to or from the peer
    /// whose identity is `remote` (see [`Rules::ends`]); `None` if it is not this node's to pass.
    pub fn decide(&self, at: Direction, flow: &FlowKey, remote: u32) -> Option<Decision> {
        let (direction, src, dst) = self.ends(at, flow, remote)?;
        Some(self.decide_ends(direction, flow, src, dst))
    }

    /// Whether `ip` is the address of one of this node's workloads (not of the node itself).
    pub fn is_local_workload(&self, ip: std::net::IpAddr) -> bool {
        self.owners
            .lookup(ip)
            .is_some_and(|&id| id != LOCAL && self.is_local(id))
    }

    /// The verdicts on the first packet of `flow` between two workloads of this node: the
    /// sender's egress and the receiver's ingress, both of which must pass it. `None` if either
    /// end is not a workload of this node.
    pub fn decide_between(&self, flow: &FlowKey) -> Option<(Decision, Decision)> {
        let (src, dst) = (
            *self.owners.lookup(flow.src)?,
            *self.owners.lookup(flow.dst)?,
        );
        if !(self.is_local_workload(flow.src) && self.is_local_workload(flow.dst)) {
            return None;
        }
        Some((
            self.decide_ends(Direction::Egress, flow, src, dst),
            self.decide_ends(Direction::Ingress, flow, src, dst),
        ))
    }

    /// The verdict of `direction`'s policy on the first packet of `flow` from `src` to `dst`.
    fn decide_ends(&self, direction: Direction, flow: &FlowKey, src: u32, dst: u32) -> Decision {
        let pflow = policy_flow(flow);
        let (s, d) = ((src, Some(flow.src)), (dst, Some(flow.dst)));
        let mut verdict = self.compiled.decide(direction, &pflow, s.0, s.1, d.0, d.1);
        let audited = !verdict.allow
            && (self.audit_all
                || match self.compiled.audit(direction, &pflow, s, d, &verdict) {
                    Some(Audit::Passes) => true,
                    Some(Audit::Denied(enforced)) => {
                        verdict = enforced;
                        false
                    }
                    None => false,
                });
        Decision {
            verdict,
            audited,
            direction,
            src,
            dst,
        }
    }
}

/// The headers policy rules look at. Ports exist only for port protocols: an ICMP echo
/// identifier keys the connection table but is not a port to a rule.
pub fn policy_flow(k: &FlowKey) -> Flow {
    let ports = matches!(
        k.protocol,
        PROTO_TCP | PROTO_UDP | PROTO_UDPLITE | PROTO_SCTP
    );
    Flow {
        protocol: k.protocol,
        src_port: ports.then_some(k.src_port),
        dst_port: ports.then_some(k.dst_port),
        icmp: k.icmp,
        ip_version: if k.src.is_ipv4() { 4 } else { 6 },
    }
}

#[derive(Default)]
pub struct Counters {
    pub allowed_flows: AtomicU64,
    pub denied_packets: AtomicU64,
    pub audited_flows: AtomicU64,
    pub cut_flows: AtomicU64,
    /// Packets (first packets of new flows included) dropped by rate limits.
    pub rate_limited_packets: AtomicU64,
}

pub struct Enforcer {
    rules: ArcSwap<Rules>,
    shards: Box<[Mutex<Conntrack>]>,
    /// Datagrams whose first fragment passed (only fragmented traffic takes this lock).
    /// The fragmented datagrams whose first fragment passed, sharded like `shards` (by
    /// datagram) so that no packet takes a lock every other packet needs.
    fragments: Box<[Mutex<Fragments>]>,
    hasher: foldhash::fast::RandomState,
    epoch: Instant,
    log: FlowLog,
    limiter: Limiter,
    pub counters: Counters,
}

impl Enforcer {
    pub fn new(rules: Rules, conntrack_max: usize, log: FlowLog) -> Enforcer {
        let per_shard = conntrack_max.div_ceil(SHARDS).max(1);
        let timeouts = Timeouts {
            // A finished TCP flow is reported (and forgotten) 10 s after its FIN or RST, as
            // Linux's CLOSE state does; late retransmissions of the close still pass.
            tcp_closing_ms: 10_000,
            ..Timeouts::default()
        };
        Enforcer {
            rules: ArcSwap::from_pointee(rules),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Conntrack::new(per_shard, timeouts)))
                .collect(),
            fragments: (0..SHARDS)
                .map(|_| Mutex::new(Fragments::new(MAX_FRAGMENTED_DATAGRAMS / SHARDS)))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
            epoch: Instant::now(),
            log,
            limiter: Limiter::default(),
            counters: Counters::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shard(&self, flow: &FlowKey) -> &Mutex<Conntrack> {
        let h = self.hasher.hash_one(ConnKey::of(flow)) as usize;
        &self.shards[h % SHARDS]
    }

    /// The fragment table of `flow`'s datagram.
    fn fragments(&self, flow: &FlowKey) -> &Mutex<Fragments> {
        let h = self
            .hasher
            .hash_one((flow.src, flow.dst, flow.protocol, flow.fragment_id))
            as usize;
        &self.fragments[h % SHARDS]
    }

    /// Whether `packet`, read from the TUN device, may go to the peer with static key `remote`.
    #[inline]
    pub fn egress(&self, packet: &[u8], remote: &[u8; 32], drops: &DropCounters) -> bool {
        self.check(Direction::Egress, packet, remote, drops)
    }

    /// Whether `packet`, decrypted from the peer with static key `remote`, may reach the TUN.
    #[inline]
    pub fn ingress(&self, packet: &[u8], remote: &[u8; 32], drops: &DropCounters) -> bool {
        self.check(Direction::Ingress, packet, remote, drops)
    }

    fn check(
        &self,
        dir: Direction,
        packet: &[u8],
        remote: &[u8; 32],
        drops: &DropCounters,
    ) -> bool {
        let Some(flow) = FlowKey::parse(packet) else {
            drops.count(Drop::PolicyMalformed);
            return false;
        };
        let now = self.now_ms();
        // A later fragment carries no ports: it passes only if the first fragment of its
        // datagram passed (decided or tracked) in the same direction.
        if flow.later_fragment {
            let later = self.fragments(&flow).lock().later(&flow, now);
            return match later {
                Some(None) => true,
                // The datagram's flow is rate-limited: each fragment counts, as a packet would.
                Some(Some(key)) => self.charge(key, packet.len(), now, drops),
                None => {
                    drops.count(Drop::PolicyFragment);
                    false
                }
            };
        }
        let pass = self.check_flow(dir, packet, &flow, remote, drops, now);
        if pass && flow.fragment_id.is_some() {
            let meter = self.shard(&flow).lock().meter(&flow);
            self.fragments(&flow)
                .lock()
                .first_passed_metered(&flow, now, meter);
        }
        pass
    }

    /// Whether `ip` is the address of one of this node's workloads, under the rules in force.
    pub fn is_local_workload(&self, ip: std::net::IpAddr) -> bool {
        self.rules.load().is_local_workload(ip)
    }

    /// Whether `packet`, read from the TUN device from one of this node's workloads to another
    /// (traffic between two pods of one node, steered through the mesh interface), may be
    /// written back to it: the sender's egress and the receiver's ingress policy must both pass
    /// its flow. Tracked flows pass on the connection table; rate limits do not apply here.
    pub fn between(&self, packet: &[u8], drops: &DropCounters) -> bool {
        let Some(flow) = FlowKey::parse(packet) else {
            drops.count(Drop::PolicyMalformed);
            return false;
        };
        let now = self.now_ms();
        if flow.later_fragment {
            return match self.fragments(&flow).lock().later(&flow, now) {
                Some(_) => true,
                None => {
                    drops.count(Drop::PolicyFragment);
                    false
                }
            };
        }
        let mut table = self.shard(&flow).lock();
        if let Tracked::Known { .. } = table.track(&flow, packet.len(), now) {
            drop(table);
            // A first fragment of a tracked flow lets its later fragments pass.
            if flow.fragment_id.is_some() {
                self.fragments(&flow)
                    .lock()
                    .first_passed_metered(&flow, now, None);
            }
            return true;
        }
        let rules = self.rules.load();
        let Some((out, inn)) = rules.decide_between(&flow) else {
            drop(table);
            drops.count(Drop::PolicyNotHere);
            return false;
        };
        let passes = |d: &Decision| d.verdict.allow || d.audited;
        let pass = passes(&out) && passes(&inn);
        if pass {
            table.insert_metered(&flow, packet.len(), now, BETWEEN_TAG, None);
        }
        drop(table);
        // The flow log and counters tell the decision that denied, or the sender's.
        let d = if passes(&out) && !passes(&inn) {
            inn
        } else {
            out
        };
        let allowed = out.verdict.allow && inn.verdict.allow;
        self.record_new(flow, d, &rules, allowed, pass && !allowed, false, drops);
        if pass && flow.fragment_id.is_some() {
            self.fragments(&flow)
                .lock()
                .first_passed_metered(&flow, now, None);
        }
        pass
    }

    /// A packet counted against meter `key` alone (a later fragment, an ICMP error about a
    /// flow): dropped and counted over the limit; a meter forgotten while idle lets it pass (its
    /// flow's next packet makes it again).
    fn charge(&self, key: MeterKey, len: usize, now: u64, drops: &DropCounters) -> bool {
        match self.limiter.admit_packet(key, len, now) {
            Metered::Dropped { .. } => {
                self.counters.rate_limited_packets.fetch_add(1, Relaxed);
                drops.count(Drop::RateLimited);
                false
            }
            Metered::Pass | Metered::Unknown => true,
        }
    }

    /// The verdict on a whole datagram or a first fragment.
    fn check_flow(
        &self,
        dir: Direction,
        packet: &[u8],
        flow: &FlowKey,
        remote: &[u8; 32],
        drops: &DropCounters,
        now: u64,
    ) -> bool {
        let flow = *flow;
        // An ICMP error about a tracked flow (unreachable, too big, time exceeded) is part of it,
        // if that flow runs through this peer: its far end is an address of the peer's
        // certificate. A peer cannot speak for flows of others.
        if let Some(quoted) = flow.icmp.and_then(|_| FlowKey::quoted(packet)) {
            let rules = self.rules.load();
            let remote_id = rules.identity_of(remote);
            let far = match dir {
                Direction::Ingress => quoted.dst,
                Direction::Egress => quoted.src,
            };
            if rules
                .owners
                .lookup(far)
                .is_some_and(|&owner| rules.same_member(owner, remote_id))
            {
                let live = self.shard(&quoted).lock().live(&quoted, now);
                match live {
                    Some(None) => return true,
                    Some(Some(key)) => return self.charge(key, packet.len(), now, drops),
                    None => {}
                }
            }
        }
        let mut table = self.shard(&flow).lock();
        match table.track(&flow, packet.len(), now) {
            Tracked::Known { meter: None, .. } => return true,
            Tracked::Known {
                meter: Some(key), ..
            } => {
                drop(table);
                return self.metered(dir, &flow, key, remote, packet.len(), now, drops);
            }
            Tracked::New => {}
        }
        // Only a new flow reads the rules; a tracked one passes on the table alone.
        let rules = self.rules.load();
        let remote_id = rules.identity_of(remote);
        let Some(d) = rules.decide(dir, &flow, remote_id) else {
            drop(table);
            drops.count(Drop::PolicyNotHere);
            return false;
        };
        let Decision {
            verdict, audited, ..
        } = d;
        // A rule with a rate limit: the new flow takes a connection token and its first
        // packet's; over the limit, it is not tracked, and its next packet is a new flow again.
        let mut meter = None;
        let mut limited = false;
        if let Some(limit) = rules.compiled.limit(d.direction, &verdict) {
            let key = self.meter_key(&rules, &d, &flow, limit.per);
            let policy = rules.compiled.policy_name(&verdict);
            match self
                .limiter
                .admit_flow(key, limit, policy, d.direction, true, packet.len(), now)
            {
                Metered::Pass => meter = Some(key),
                _ => limited = true,
            }
        }
        let pass = (verdict.allow || audited) && !limited;
        if pass {
            let far = match dir {
                Direction::Egress => d.dst,
                Direction::Ingress => d.src,
            };
            table.insert_metered(&flow, packet.len(), now, flow_tag(dir, far), meter);
        }
        drop(table);
        self.record_new(flow, d, &rules, verdict.allow, audited, limited, drops);
        pass
    }

    /// Counts a new flow decided as `d` (allowed, passed only as audited, rate-limited, or
    /// denied, with the drop counted on `drops`) and sends it to the flow log.
    #[allow(clippy::too_many_arguments)]
    fn record_new(
        &self,
        flow: FlowKey,
        d: Decision,
        rules: &Arc<Rules>,
        allowed: bool,
        audited: bool,
        limited: bool,
        drops: &DropCounters,
    ) {
        if limited {
            self.counters.rate_limited_packets.fetch_add(1, Relaxed);
            drops.count(Drop::RateLimited);
        } else if allowed {
            self.counters.allowed_flows.fetch_add(1, Relaxed);
        } else if audited {
            self.counters.audited_flows.fetch_add(1, Relaxed);
        } else {
            self.counters.denied_packets.fetch_add(1, Relaxed);
            drops.count(match d.direction {
                Direction::Egress => Drop::PolicyEgress,
                Direction::Ingress => Drop::PolicyIngress,
            });
        }
        self.log.send(FlowEvent::New {
            flow,
            decision: d,
            rules: rules.clone(),
            limited,
        });
    }

    /// The bucket key of a flow decided as `d` by a rule whose limit counts `per`.
    fn meter_key(
        &self,
        rules: &Rules,
        d: &Decision,
        flow: &FlowKey,
        per: policy::ratelimit::Per,
    ) -> MeterKey {
        let who = |id: u32, ip| match rules.identity(id) {
            Some(i) if id != EXTERNAL && id != UNKNOWN => Who::Identity(
                &i.endpoint.trust_domain,
                &i.endpoint.namespace,
                &i.endpoint.name,
            ),
            // An end outside the mesh has no identity, and addresses cost nothing to change:
            // its meter is its /24 (IPv6: /64), so a sender with many addresses fills no more
            // meters than a network.
            _ => Who::Address(address_block(ip)),
        };
        self.limiter.key(&MeterOf {
            policy: rules.compiled.policy_name(&d.verdict),
            direction: d.direction,
            rule: d.verdict.rule.unwrap_or(0),
            src: who(d.src, flow.src),
            dst: (per == policy::ratelimit::Per::SourceAndDestination)
                .then(|| who(d.dst, flow.dst)),
        })
    }

    /// A packet of the originator's direction of a tracked flow whose rule limits it.
    #[allow(clippy::too_many_arguments)]
    fn metered(
        &self,
        dir: Direction,
        flow: &FlowKey,
        key: MeterKey,
        remote: &[u8; 32],
        len: usize,
        now: u64,
        drops: &DropCounters,
    ) -> bool {
        let log = match self.limiter.admit_packet(key, len, now) {
            Metered::Pass => return true,
            Metered::Dropped { log } => log,
            // The meter was forgotten while idle: the rules in force say what limits the flow.
            Metered::Unknown => {
                let rules = self.rules.load();
                let d = rules.decide(dir, flow, rules.identity_of(remote));
                let limit =
                    d.and_then(|d| Some((d, rules.compiled.limit(d.direction, &d.verdict)?)));
                let Some((d, limit)) = limit else {
                    return true;
                };
                let policy = rules.compiled.policy_name(&d.verdict);
                match self
                    .limiter
                    .admit_flow(key, limit, policy, d.direction, false, len, now)
                {
                    Metered::Pass => return true,
                    Metered::Dropped { log } => log,
                    Metered::Unknown => false,
                }
            }
        };
        self.counters.rate_limited_packets.fetch_add(1, Relaxed);
        drops.count(Drop::RateLimited);
        if log {
            let rules = self.rules.load_full();
            if let Some(decision) = rules.decide(dir, flow, rules.identity_of(remote)) {
                self.log.send(FlowEvent::Limited {
                    flow: *flow,
                    decision,
                    rules,
                });
            }
        }
        false
    }

    /// Installs new rules and re-decides every tracked flow under them: a flow they deny is
    /// cut (forgotten, so its next packet is a new flow and denied) and logged.
    pub fn install(&self, rules: Rules) {
        let rules = Arc::new(rules);
        self.rules.store(rules.clone());
        for shard in self.shards.iter() {
            let now = self.now_ms();
            let cut = shard.lock().retain(|k, e| {
                let Some(d) = still_allowed(&rules, k, e) else {
                    return false;
                };
                // The flow's meter follows the rule that allows it now.
                e.meter = rules.compiled.limit(d.direction, &d.verdict).map(|limit| {
                    let key = self.meter_key(&rules, &d, &k.first_packet(e), limit.per);
                    self.limiter.refresh(key, limit, now);
                    key
                });
                true
            });
            for (key, entry) in cut {
                self.counters.cut_flows.fetch_add(1, Relaxed);
                self.log.send(FlowEvent::Closed {
                    key,
                    entry,
                    cut: true,
                });
            }
        }
    }

    /// Forgets idle flows and logs them as closed, with their counts.
    pub fn expire(&self) {
        let now = self.now_ms();
        for shard in self.shards.iter() {
            let gone = shard.lock().expire(now);
            for (key, entry) in gone {
                self.log.send(FlowEvent::Closed {
                    key,
                    entry,
                    cut: false,
                });
            }
        }
    }

    pub fn status(&self) -> proto::admin::PolicyStatus {
        let rules = self.rules.load();
        let (mut entries, mut evictions) = (0, 0);
        for s in self.shards.iter() {
            let t = s.lock();
            entries += t.len();
            evictions += t.evictions;
        }
        proto::admin::PolicyStatus {
            serial: rules.serial,
            posture: match rules.posture {
                Posture::ZeroTrust => "zero-trust".into(),
                Posture::Calico => "calico".into(),
            },
            audit: rules.audit_all,
            policies: rules.compiled.policies(),
            identities: rules.identities.len(),
            conntrack_entries: entries,
            conntrack_evictions: evictions,
            allowed_flows: self.counters.allowed_flows.load(Relaxed),
            denied_packets: self.counters.denied_packets.load(Relaxed),
            audited_flows: self.counters.audited_flows.load(Relaxed),
            cut_flows: self.counters.cut_flows.load(Relaxed),
            flow_log_lost: self.log.lost.load(Relaxed),
            rate_limited_packets: self.counters.rate_limited_packets.load(Relaxed),
            rate_meters: self.limiter.meters(),
            rate_limits: self
                .limiter
                .counts()
                .into_iter()
                .map(|((d, policy), c)| proto::admin::RateLimitCount {
                    direction: match d {
                        Direction::Ingress => "ingress".into(),
                        Direction::Egress => "egress".into(),
                    },
                    policy,
                    refused_connections: c.refused_connections,
                    dropped_packets: c.dropped_packets,
                })
                .collect(),
            verdicts: self
                .log
                .verdicts
                .lock()
                .iter()
                .map(
                    |((direction, policy, action), n)| proto::admin::VerdictCount {
                        direction: direction.to_string(),
                        policy: policy.clone(),
                        action: action.to_string(),
                        count: *n,
                    },
                )
                .collect(),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    pub fn flow_log(&self) -> &FlowLog {
        &self.log
    }
}

/// The block an address outside the mesh is metered by: its /24, or for IPv6 its /64.
fn address_block(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) & 0xffff_ff00).into(),
        std::net::IpAddr::V6(a) => {
            std::net::Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1)).into()
        }
    }
}

/// Each member's own identity by key, and every live identity but this node's by holder and
/// addresses.
#[allow(clippy::type_complexity)]
fn index(
    identities: &[Identity],
    holders: &[Holder],
    live: impl Iterator<Item = u32>,
) -> (
    HashMap<[u8; 32], u32>,
    HashMap<(Holder, Vec<proto::Cidr>), u32>,
) {
    let mut by_key = HashMap::new();
    let mut all = HashMap::new();
    for i in live {
        let holder = holders[i as usize];
        if let Holder::Member {
            key,
            workload: false,
        } = holder
        {
            by_key.insert(key, i);
        }
        all.insert((holder, identities[i as usize].addrs.clone()), i);
    }
    (by_key, all)
}

/// Which of the `live` identities' certificates names an address.
fn owners(identities: &[Identity], live: impl Iterator<Item = u32>) -> AllowedIps<u32> {
    let mut t = AllowedIps::new();
    for i in live {
        for c in &identities[i as usize].addrs {
            t.insert(*c, i);
        }
    }
    t
}

/// The connection table's tag of a flow: the direction its first packet was decided in.
/// The connection table's tag of a flow: the direction its first packet was seen in at this
/// node (bit 0), and what its far end (the peer's side) was (bits 1-2: a member, outside the
/// mesh, or a peer without an identity), so that it is decided again as it was first.
/// The tag of a flow between two workloads of this node (both ends decided; [`Enforcer::between`]).
const BETWEEN_TAG: u32 = direction_tag(Direction::Egress) | 3 << 1;

fn flow_tag(d: Direction, far: u32) -> u32 {
    let kind = match far {
        EXTERNAL => 1,
        UNKNOWN => 2,
        _ => 0,
    };
    direction_tag(d) | kind << 1
}

const fn direction_tag(d: Direction) -> u32 {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// The decision under `rules` of the flow `e` tracks, if they still allow (or audit) it,
/// decided in the direction it was first decided in, with the remote end's identity found by
/// address (the allowed IPs of a peer are exactly its certificate's addresses, the binding the
/// data path enforced when the flow started).
fn still_allowed(rules: &Rules, key: &ConnKey, e: &Entry) -> Option<Decision> {
    let first = key.first_packet(e);
    if e.tag == BETWEEN_TAG {
        let (out, inn) = rules.decide_between(&first)?;
        let passes = |d: &Decision| d.verdict.allow || d.audited;
        return (passes(&out) && passes(&inn)).then_some(out);
    }
    let (dir, remote_ip) = if e.tag & 1 == direction_tag(Direction::Egress) {
        (Direction::Egress, first.dst)
    } else {
        (Direction::Ingress, first.src)
    };
    // The far end as it was first: a member (by its address now: one that left, or whose
    // federation was removed, holds none, and its flows are cut), outside the mesh, or a peer
    // without an identity.
    let remote = match e.tag >> 1 {
        1 => EXTERNAL,
        2 => UNKNOWN,
        _ => match rules.owners.lookup(remote_ip) {
            Some(&id) => id,
            None => return None,
        },
    };
    rules
        .decide(dir, &first, remote)
        .filter(|d| d.verdict.allow || d.audited)
}

/// The identity of a certificate, for policy.
pub fn identity_of_cert(body: &proto::cert::CertBody) -> Identity {
    Identity {
        endpoint: Endpoint {
            trust_domain: body.trust_domain.clone(),
            namespace: body.namespace.clone(),
            name: body.name.clone(),
            labels: body.labels.clone(),
            ip: body.addrs.first().map(|c| c.addr()),
            ports: body.ports.clone(),
        },
        addrs: body.addrs.clone(),
    }
}

#[cfg(test)]
mod tests;
