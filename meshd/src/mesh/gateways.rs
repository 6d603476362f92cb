//! Which member carries each route outside the mesh, pure (PROTOCOL.md section 8).
//!
//! A member whose certificate grants routes is a gateway candidate. Every second the node asks
//! each candidate which routes it serves ([`Message::GatewayProbe`]); the answer
//! ([`Message::GatewayServing`]) counts only for routes its certificate grants, and only if it
//! echoes the nonce of a probe still outstanding. A candidate that has not answered for
//! [`DEAD_MS`] is dead. Each route goes to the live candidate serving it with the lowest key, so
//! every node picks the same gateway, traffic moves to another within [`DEAD_MS`] plus a probe
//! interval when one dies, and back when it answers again. A gateway of this node's own trust
//! domain is preferred to a federated one serving the same route.

use proto::control::Message;
use proto::Cidr;
use std::collections::{BTreeMap, BTreeSet};

/// How often each candidate is asked.
pub const PROBE_INTERVAL_MS: u64 = 1_000;
/// A candidate silent for this long is dead: three probes unanswered.
pub const DEAD_MS: u64 = 3_000;

#[derive(Debug, Clone, Default)]
struct Candidate {
    /// Of another (federated) trust domain: chosen only when no local candidate serves.
    remote: bool,
    /// What its certificate grants.
    granted: Vec<Cidr>,
    /// What it last said it serves (within `granted`).
    serving: Vec<Cidr>,
    last_answer_ms: Option<u64>,
    /// Nonces of the probes not answered yet (the last few).
    outstanding: Vec<u64>,
}

#[derive(Debug, Default)]
pub struct Gateways {
    /// The routes this node serves (its `[gateway] routes`).
    serving: Vec<Cidr>,
    candidates: BTreeMap<[u8; 32], Candidate>,
    next_probe_ms: u64,
    next_nonce: u64,
}

impl Gateways {
    pub fn new(serving: Vec<Cidr>, nonce_seed: u64) -> Gateways {
        Gateways {
            serving,
            next_nonce: nonce_seed,
            ..Gateways::default()
        }
    }

    /// The routes this node serves.
    pub fn serving(&self) -> &[Cidr] {
        &self.serving
    }

    /// Keeps the candidates in step with the members: `granted` is each member's certificate
    /// routes (members without any are no candidates) and whether it is of another trust domain.
    pub fn set_candidates<'a>(
        &mut self,
        granted: impl Iterator<Item = ([u8; 32], &'a [Cidr], bool)>,
    ) {
        let mut seen = BTreeSet::new();
        for (k, routes, remote) in granted.filter(|(_, r, _)| !r.is_empty()) {
            seen.insert(k);
            let c = self.candidates.entry(k).or_default();
            c.remote = remote;
            if c.granted != routes {
                c.granted = routes.to_vec();
                c.serving.retain(|r| routes.iter().any(|g| g.covers(r)));
            }
        }
        self.candidates.retain(|k, _| seen.contains(k));
    }

    /// Probes due now: one to each candidate every [`PROBE_INTERVAL_MS`].
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<([u8; 32], Message)> {
        if now_ms < self.next_probe_ms {
            return Vec::new();
        }
        self.next_probe_ms = now_ms + PROBE_INTERVAL_MS;
        let mut out = Vec::new();
        for (k, c) in &mut self.candidates {
            self.next_nonce = self.next_nonce.wrapping_add(1);
            let nonce = self.next_nonce;
            c.outstanding.push(nonce);
            if c.outstanding.len() > 4 {
                c.outstanding.remove(0);
            }
            out.push((*k, Message::GatewayProbe { nonce }));
        }
        out
    }

    /// A gateway message from member `from`: a probe is answered with what this node serves; an
    /// answer to one of our outstanding probes updates the candidate. Returns the answer to send,
    /// if any.
    pub fn on_message(&mut self, from: [u8; 32], msg: Message, now_ms: u64) -> Option<Message> {
        match msg {
            Message::GatewayProbe { nonce } => Some(Message::GatewayServing {
                nonce,
                routes: self.serving.clone(),
            }),
            Message::GatewayServing { nonce, routes } => {
                let c = self.candidates.get_mut(&from)?;
                let at = c.outstanding.iter().position(|n| *n == nonce)?;
                c.outstanding.drain(..=at);
                c.last_answer_ms = Some(now_ms);
                // Only what its certificate grants: a node cannot attract other traffic.
                c.serving = routes
                    .into_iter()
                    .filter(|r| c.granted.iter().any(|g| g.covers(r)))
                    .collect();
                None
            }
            _ => None,
        }
    }

    /// For each route some live candidate serves: the one that carries it (of this trust domain
    /// if one serves it, then the lowest key).
    pub fn chosen(&self, now_ms: u64) -> BTreeMap<Cidr, [u8; 32]> {
        let mut out = BTreeMap::new();
        let mut order: Vec<(&[u8; 32], &Candidate)> = self.candidates.iter().collect();
        order.sort_by_key(|(k, c)| (c.remote, **k));
        for (k, c) in order {
            let alive = c
                .last_answer_ms
                .is_some_and(|t| now_ms.saturating_sub(t) < DEAD_MS);
            if !alive {
                continue;
            }
            for r in &c.serving {
                out.entry(*r).or_insert(*k);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    const G1: [u8; 32] = [1; 32];
    const G2: [u8; 32] = [2; 32];

    /// Probes everyone at `now` and lets the gateways in `answering` answer with `serving`.
    fn round(gw: &mut Gateways, now: u64, answering: &[([u8; 32], &[&str])]) {
        for (k, probe) in gw.on_tick(now) {
            let Message::GatewayProbe { nonce } = probe else {
                panic!("a probe")
            };
            if let Some((_, routes)) = answering.iter().find(|(a, _)| *a == k) {
                let routes = routes.iter().map(|r| cidr(r)).collect();
                gw.on_message(k, Message::GatewayServing { nonce, routes }, now + 5);
            }
        }
    }

    fn granted() -> Vec<Cidr> {
        vec![cidr("198.19.0.0/16")]
    }

    #[test]
    fn the_lowest_live_key_carries_a_route_and_it_fails_over_and_back() {
        let mut gw = Gateways::new(vec![], 0);
        let g = granted();
        gw.set_candidates([(G1, g.as_slice(), false), (G2, g.as_slice(), false)].into_iter());
        let both: &[([u8; 32], &[&str])] = &[(G1, &["198.19.0.0/24"]), (G2, &["198.19.0.0/24"])];
        round(&mut gw, 0, both);
        assert_eq!(gw.chosen(10)[&cidr("198.19.0.0/24")], G1);
        // G1 dies: after DEAD_MS without an answer, G2 carries the route.
        let mut now = 0;
        while gw.chosen(now).get(&cidr("198.19.0.0/24")) == Some(&G1) {
            now += PROBE_INTERVAL_MS;
            round(&mut gw, now, &[(G2, &["198.19.0.0/24"])]);
        }
        assert!(
            now <= DEAD_MS + PROBE_INTERVAL_MS,
            "failed over after {now} ms"
        );
        assert_eq!(gw.chosen(now)[&cidr("198.19.0.0/24")], G2);
        // G1 returns: it carries the route again after one answer.
        now += PROBE_INTERVAL_MS;
        round(&mut gw, now, both);
        assert_eq!(gw.chosen(now + 5)[&cidr("198.19.0.0/24")], G1);
    }

    #[test]
    fn only_granted_routes_and_answers_to_our_probes_count() {
        let mut gw = Gateways::new(vec![], 0);
        let g = granted();
        gw.set_candidates([(G1, g.as_slice(), false)].into_iter());
        // A route outside the grant is ignored.
        round(
            &mut gw,
            0,
            &[(G1, &["198.19.1.0/24", "10.0.0.0/8", "0.0.0.0/0"])],
        );
        let chosen = gw.chosen(10);
        assert_eq!(
            chosen.keys().copied().collect::<Vec<_>>(),
            vec![cidr("198.19.1.0/24")]
        );
        // An answer with a nonce we never sent, or from a member that is no candidate, is not
        // taken.
        let mut late = Gateways::new(vec![], 0);
        late.set_candidates([(G1, g.as_slice(), false)].into_iter());
        let forged = Message::GatewayServing {
            nonce: 999,
            routes: vec![cidr("198.19.0.0/24")],
        };
        late.on_message(G1, forged.clone(), 1);
        late.on_message(G2, forged, 1);
        assert!(late.chosen(2).is_empty());
        // A member whose certificate grants nothing is never probed.
        let mut none = Gateways::new(vec![], 0);
        none.set_candidates([(G2, &[][..], false)].into_iter());
        assert!(none.on_tick(0).is_empty());
    }

    #[test]
    fn a_local_gateway_is_preferred_to_a_federated_one() {
        let mut gw = Gateways::new(vec![], 0);
        let g = granted();
        // G1 has the lower key but is of another trust domain.
        gw.set_candidates([(G1, g.as_slice(), true), (G2, g.as_slice(), false)].into_iter());
        let both: &[([u8; 32], &[&str])] = &[(G1, &["198.19.0.0/24"]), (G2, &["198.19.0.0/24"])];
        round(&mut gw, 0, both);
        assert_eq!(gw.chosen(10)[&cidr("198.19.0.0/24")], G2);
    }

    #[test]
    fn a_probe_is_answered_with_what_this_node_serves() {
        let mut gw = Gateways::new(vec![cidr("198.19.0.0/24")], 0);
        let answer = gw.on_message(G1, Message::GatewayProbe { nonce: 7 }, 0);
        assert_eq!(
            answer,
            Some(Message::GatewayServing {
                nonce: 7,
                routes: vec![cidr("198.19.0.0/24")]
            })
        );
    }
}
