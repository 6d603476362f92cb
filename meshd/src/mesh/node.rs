//! The mesh node: one sans-I/O state machine, as quinn-proto's endpoint is one. It holds
//! membership (seeds, gossip, certificate checks, expiry, revocation, renewal), policy sync and the
//! decision to take a policy set, and derives from them what the device, the kernel and the
//! state directory must hold. It takes [`Event`]s with the time and a random source and returns
//! [`Action`]s; the async shell (`run.rs`) only carries them out.
//!
//! Derived, never moved around: after every event the node recomputes the WireGuard peers (each
//! member's key, endpoint and exactly its certificate's addresses), the kernel routes (the union of
//! those addresses) and this node's own addresses (its certificate's), and emits the difference
//! from what it emitted before. Members never overlap one another (membership refuses a second
//! claim), and a member whose addresses overlap this node's own is not installed.

use super::attach::{AttachedStatus, Attachments};
use super::flows::{FlowQueries, Serve};
use super::gateways::Gateways;
use super::membership::{Floor, MemberState, Membership, Out, Refusal};
use super::policy_book::PolicyBook;
use super::policy_sync::{PolicySync, SyncAction};
use policy::engine::Posture;
use proto::cert::{Certificate, RevocationList};
use proto::control::{Member, Message, Seed};
use proto::relay::Endpoint;
use proto::workload::WorkloadRef;
use proto::Cidr;
use rand_core::RngCore;
use std::collections::{BTreeMap, BTreeSet};
use x25519_dalek::StaticSecret;

/// A node offers its policy set to one member in turn this often, so a member that missed a
/// change (it was down, a datagram was lost) catches up.
pub const POLICY_OFFER_INTERVAL_MS: u64 = 5_000;
/// Replay floors are saved at most this often (they are extrapolated on restart; see
/// [`Membership::restore_floors`]).
const FLOOR_SAVE_INTERVAL_MS: u64 = 1_000;
/// The member list is saved at most this often when members only join or move (a member learned
/// just before a crash is learned again, and a mesh of N nodes forming does not write an N-member
/// file N times); at once when one is cut or replaced.
const MEMBERS_SAVE_INTERVAL_MS: u64 = 1_000;

/// The workloads this node runs, and the workload identities in force behind each member.
pub type WorkloadStatus = (
    Vec<proto::admin::AttachedWorkload>,
    BTreeMap<[u8; 32], Vec<proto::admin::WorkloadInfo>>,
);

/// Everything a node is configured with.
pub struct NodeConfig {
    pub secret: StaticSecret,
    pub certificate: Certificate,
    pub bundle: Vec<Certificate>,
    /// Revocation lists named in the configuration.
    pub revocations: Vec<RevocationList>,
    pub admins: Vec<[u8; 32]>,
    pub posture: Posture,
    pub audit: bool,
    pub answer_probes: bool,
    pub seeds: Vec<Seed>,
    /// The routes outside the mesh this node serves as a gateway (`[gateway] routes`; each
    /// granted by its certificate).
    pub gateway_routes: Vec<Cidr>,
    /// The members asked to relay to members not reached at their own address (`[relay] via`,
    /// by key; PROTOCOL.md §9).
    pub relays: Vec<[u8; 32]>,
    /// The workload issuer (`[issuer]`): its key and the underlay addresses it may listen at.
    pub issuer: Option<([u8; 32], Vec<std::net::SocketAddr>)>,
    /// The CAs of workload certificates (`trust.workload_cas`; in `bundle` too).
    pub workload_cas: Vec<[u8; 32]>,
}

/// What an earlier run saved in the state directory; each part is verified again as it is taken.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    pub members: Vec<Member>,
    pub revocations: Vec<RevocationList>,
    pub floors: Vec<Floor>,
    pub policy: Option<Vec<u8>>,
    /// The workloads attached, with the certificate held for each.
    pub attached: Vec<(WorkloadRef, Option<Certificate>)>,
}

/// What happens to a node.
pub enum Event {
    /// A control datagram from the underlay.
    Datagram { from: Endpoint, bytes: Vec<u8> },
    /// Time passes: expiry, probes, gossip, offers, stalled transfers.
    Tick,
    /// The operator's `peer add`.
    AddSeed(Seed),
    /// The operator's `peer remove`.
    Forget([u8; 32]),
    /// Whether probes are answered (reload).
    AnswerProbes(bool),
    /// The operator's `policy apply`: a signed set that must follow the one in force.
    ApplyPolicy(Vec<u8>),
    /// A revocation list from the operator (reload).
    AddRevocation(RevocationList),
    /// A changed trust bundle with the same identity (reload).
    Trust { bundle: Vec<Certificate> },
    /// Changed policy admins, posture or audit mode (reload). Refused, changing nothing, when the
    /// set in force does not compile under the new posture.
    Reconfigure {
        admins: Vec<[u8; 32]>,
        posture: Posture,
        audit: bool,
    },
    /// The operator's `flows --mesh`: a signed flow query for every member of this trust
    /// domain; refused if this node would not answer it itself.
    QueryFlows(Vec<u8>),
    /// Seal and send these messages (a flow answer read from the log) to member `to`.
    AnswerFlows {
        to: [u8; 32],
        messages: Vec<Message>,
    },
    /// Workload certificates obtained elsewhere, in place of those held (the tests' hostile
    /// or hand-made certificates): announced to every member.
    #[cfg(test)]
    Workloads(Vec<Certificate>),
    /// A workload this node runs (the CNI plugin's ADD): its certificate is asked of the
    /// issuer, and [`Action::Attached`] says what became of it.
    Attach(WorkloadRef),
    /// A workload this node no longer runs (the CNI plugin's DEL): its identity is withdrawn
    /// from the mesh.
    Detach(WorkloadRef),
    /// The CAs of workload certificates (reload).
    WorkloadCas(Vec<[u8; 32]>),
    /// A renewed identity (reload).
    Renew {
        secret: StaticSecret,
        certificate: Certificate,
        bundle: Vec<Certificate>,
    },
}

/// A file of the state directory, with what it must now hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Members(Vec<Member>),
    Revocations(Vec<RevocationList>),
    Floors(Vec<Floor>),
    /// The encoded signed policy set in force.
    Policy(Vec<u8>),
    /// The workloads attached, with the certificate held for each.
    Attached(Vec<(WorkloadRef, Option<Certificate>)>),
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        to: Endpoint,
        datagram: Vec<u8>,
    },
    /// Members or policy changed: rebuild the verdict rules (before the peer actions that
    /// follow, so no packet meets an identity the rules do not know).
    Resolve,
    /// Make or update the WireGuard peer `key`, with exactly `addrs` as its allowed IPs.
    Peer {
        key: [u8; 32],
        endpoint: Endpoint,
        addrs: Vec<Cidr>,
    },
    /// Remove the WireGuard peer `key`.
    Unpeer {
        key: [u8; 32],
        reason: String,
    },
    /// A kernel route to the interface.
    Route(Cidr),
    Unroute(Cidr),
    /// An address of this node on the interface.
    Address(Cidr),
    Unaddress(Cidr),
    Store(Stored),
    /// Read the flow log as `serve` says and answer member `to` ([`Event::AnswerFlows`]).
    ServeFlows {
        to: [u8; 32],
        serve: Serve,
    },
    /// This node's own query went to `members` (key, identity): serve it from the local log too,
    /// and wait for their answers.
    FlowsAsked {
        serve: Serve,
        members: Vec<([u8; 32], String)>,
    },
    /// The issuer answered for attached workloads: each one's identity in force now, or why it
    /// has none.
    Attached(Vec<(WorkloadRef, Result<Certificate, String>)>),
    /// This node's own workload certificates in force changed (or were set): `held` are in
    /// force; `refused` were not taken (identity, reason).
    OwnWorkloads {
        held: Vec<Certificate>,
        refused: Vec<(String, String)>,
    },
    /// A part of a member's answer to this node's query.
    FlowAnswer {
        from: [u8; 32],
        nonce: u64,
        part: u16,
        last: bool,
        next: u64,
        records: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    endpoint: Endpoint,
    addrs: Vec<Cidr>,
}

pub struct Node {
    membership: Membership,
    sync: PolicySync,
    book: PolicyBook,
    gateways: Gateways,
    flows: FlowQueries,
    /// The gateway carrying each route, as last derived.
    chosen: BTreeMap<Cidr, [u8; 32]>,
    /// What the device was told to hold: derived, compared after every event.
    peers: BTreeMap<[u8; 32], Installed>,
    routes: BTreeSet<Cidr>,
    addresses: BTreeSet<Cidr>,
    next_offer_ms: u64,
    offer_turn: usize,
    next_floor_save_ms: u64,
    /// The member list changed since it was last saved.
    members_unsaved: bool,
    next_members_save_ms: u64,
    /// Policy changed since the last [`Action::Resolve`].
    policy_changed: bool,
    /// Why members left since the last derivation, for the log.
    reasons: BTreeMap<[u8; 32], String>,
    /// Actions of a policy set taken from a member, for the end of the event.
    pending: Vec<Action>,
    /// This node's own certificate changed (or it just started): derive everything again.
    rederive: bool,
    /// Control datagrams refused, by [`Refusal::kind`].
    refused: BTreeMap<&'static str, u64>,
    /// The workloads this node runs, and their certificates from the issuer.
    attached: Attachments,
    has_issuer: bool,
    /// What was last saved of them, and the certificates last announced (none yet: the first
    /// announcement, at start, always goes out) with what was refused of them.
    attached_saved: Vec<(WorkloadRef, Option<Certificate>)>,
    announced: Option<Vec<Certificate>>,
    announce_refused: Vec<(String, String)>,
}

impl Node {
    /// A node from its configuration and what an earlier run saved; the actions bring the device,
    /// the kernel and the state directory in line.
    pub fn new(
        cfg: NodeConfig,
        saved: Saved,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> (Node, Vec<Action>) {
        let trust_domain = cfg.certificate.body.trust_domain.clone();
        let mut membership = Membership::new(cfg.secret, cfg.certificate, cfg.bundle, now_ms, rng);
        membership.set_answer_probes(cfg.answer_probes);
        membership.set_relays(cfg.relays);
        let has_issuer = cfg.issuer.is_some();
        let issuer_addresses = cfg.issuer.as_ref().map_or(0, |(_, at)| at.len());
        membership.set_issuer(cfg.issuer);
        membership.set_workload_cas(cfg.workload_cas);
        let mut book = PolicyBook::new(&trust_domain, cfg.admins, cfg.posture, cfg.audit);
        let mut sync = PolicySync::default();
        if let Some(encoded) = &saved.policy {
            match book.restore(encoded) {
                Ok(msg) => tracing::info!("saved {msg}"),
                Err(e) => {
                    tracing::warn!(error = %e, "saved policy set refused; enforcing none")
                }
            }
            if let Some(set) = &book.current {
                sync.set_current(set.serial, encoded.clone(), set.digest());
            }
        }
        // Before the revocation lists (federated CAs' lists are taken only once their CAs are
        // trusted) and the saved members (federated ones are trusted again).
        membership.federate(book.federations(), now_ms);
        for crl in cfg.revocations.into_iter().chain(saved.revocations) {
            if let Err(e) = membership.take_revocation(crl) {
                tracing::warn!(error = %e, "revocation list not taken");
            }
        }
        membership.restore_floors(&saved.floors, now_ms);
        tracing::info!(members = saved.members.len(), "restoring saved members");
        for m in saved.members {
            membership.restore(m.certificate, m.endpoint, now_ms);
        }
        for s in cfg.seeds {
            membership.add_seed(s.addr, s.key, rng);
        }
        let gateways = Gateways::new(cfg.gateway_routes, rng.next_u64());
        let mut node = Node {
            membership,
            sync,
            book,
            gateways,
            flows: FlowQueries::default(),
            chosen: BTreeMap::new(),
            peers: BTreeMap::new(),
            routes: BTreeSet::new(),
            addresses: BTreeSet::new(),
            next_offer_ms: now_ms,
            offer_turn: 0,
            next_floor_save_ms: now_ms,
            members_unsaved: false,
            next_members_save_ms: now_ms,
            policy_changed: true,
            reasons: BTreeMap::new(),
            pending: Vec::new(),
            rederive: true,
            refused: BTreeMap::new(),
            attached: Attachments::default(),
            has_issuer,
            attached_saved: Vec::new(),
            announced: None,
            announce_refused: Vec::new(),
        };
        let mut out = Vec::new();
        // The workloads attached before a restart, and at once the list of those whose
        // certificates are still good: it replaces what members held of this node's before (an
        // empty list withdraws workloads detached while it was down).
        node.attached.set_issuer_addresses(issuer_addresses);
        for (w, c) in saved.attached {
            node.attached.restore(w, c);
        }
        let mut outs = Vec::new();
        node.announce_attached(now_ms, rng, &mut outs, &mut out);
        node.settle(now_ms, rng, outs, &mut out);
        (node, out)
    }

    pub fn members(&self) -> &BTreeMap<[u8; 32], MemberState> {
        self.membership.members()
    }

    pub fn certificate(&self) -> &Certificate {
        self.membership.certificate()
    }

    /// A hostile node's announcement: `certificates` sealed to every member as this node's
    /// workload list, past every check this node would make.
    #[cfg(test)]
    pub fn announce_unchecked(
        &mut self,
        certificates: Vec<Certificate>,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Vec<Action> {
        let msg = Message::Workloads {
            version: now_ms * super::membership::COUNTER_PER_MS,
            certificates,
        };
        let keys: Vec<[u8; 32]> = self.members().keys().copied().collect();
        let mut outs = Vec::new();
        for k in keys {
            self.membership.send_to(&k, &msg, now_ms, rng, &mut outs);
        }
        let mut out = Vec::new();
        self.settle(now_ms, rng, outs, &mut out);
        out
    }

    /// The verdict rules of the policy in force for this node, its workloads, the members and
    /// theirs (resolving only what changed since `prev`, when it can).
    pub fn rules(&self, prev: Option<&crate::enforce::Rules>) -> crate::enforce::Rules {
        use crate::enforce::Holder;
        let own = self
            .own_workloads()
            .iter()
            .map(|c| (Holder::Local, &c.body));
        let members = self.members().iter().flat_map(|(k, m)| {
            let workloads = self.membership.workloads_of(k).iter().map(|c| {
                let holder = Holder::Member {
                    key: *k,
                    workload: true,
                };
                (holder, &c.body)
            });
            std::iter::once((Holder::from(*k), &m.certificate.body)).chain(workloads)
        });
        self.book.rules(
            &self.certificate().body,
            own.chain(members),
            self.serving(),
            prev,
        )
    }

    /// Asks the issuer for the attached workloads that need a certificate or a renewal.
    fn ask_issuer(&mut self, now_ms: u64, rng: &mut impl RngCore, outs: &mut Vec<Out>) {
        for (nonce, workloads) in self.attached.due(now_ms, rng) {
            let msg = Message::IssueRequest {
                nonce,
                certificate: self.certificate().clone(),
                workloads,
            };
            self.membership.send_to_issuer(&msg, now_ms, rng, outs);
        }
    }

    /// Saves the attached workloads and, if their certificates changed since the last
    /// announcement (or `force`), announces them in place of those before; returns the refusals
    /// by identity.
    fn announce_attached(
        &mut self,
        now_ms: u64,
        rng: &mut impl RngCore,
        outs: &mut Vec<Out>,
        out: &mut Vec<Action>,
    ) -> Vec<(String, String)> {
        let saved = self.attached.saved();
        if saved != self.attached_saved {
            out.push(Action::Store(Stored::Attached(saved.clone())));
            self.attached_saved = saved;
        }
        let certificates = self.attached.certificates();
        if self.announced.as_ref() == Some(&certificates) {
            return self.announce_refused.clone();
        }
        self.announced = Some(certificates);
        let (more, refused) =
            self.membership
                .set_workloads(self.attached.certificates(), now_ms, rng);
        outs.extend(more);
        let refused: Vec<(String, String)> = refused
            .into_iter()
            .map(|(i, e)| (i, e.to_string()))
            .collect();
        for (identity, why) in &refused {
            tracing::warn!(%identity, %why, "workload certificate not taken");
        }
        self.membership.own_workloads_changed = false;
        out.push(Action::OwnWorkloads {
            held: self.own_workloads().to_vec(),
            refused: refused.clone(),
        });
        self.announce_refused = refused.clone();
        refused
    }

    /// Takes the issuer's answer for attached workloads and announces the certificates; a
    /// certificate this node cannot put in force (its CA is not in the trust bundle, a newer
    /// one holds its address) is a failure of its workload, with the reason.
    fn take_attached(
        &mut self,
        answered: Vec<(WorkloadRef, Result<Certificate, String>)>,
        now_ms: u64,
        rng: &mut impl RngCore,
        outs: &mut Vec<Out>,
        out: &mut Vec<Action>,
    ) -> Vec<(WorkloadRef, Result<Certificate, String>)> {
        let refused = self.announce_attached(now_ms, rng, outs, out);
        answered
            .into_iter()
            .map(|(w, r)| {
                let r = r.and_then(|c| {
                    if self.own_workloads().contains(&c) {
                        return Ok(c);
                    }
                    let identity = c.body.identity();
                    let why = refused
                        .iter()
                        .find(|(i, _)| *i == identity)
                        .map_or("not in force on this node".to_string(), |(_, why)| {
                            why.clone()
                        });
                    Err(format!("issued as {identity}, but {why}"))
                });
                (w, r)
            })
            .collect()
    }

    /// The attached workloads, their certificates and the issuer's refusals.
    pub fn attached(&self) -> Vec<AttachedStatus> {
        self.attached.status()
    }

    /// This node's own workload certificates in force.
    pub fn own_workloads(&self) -> &[Certificate] {
        let key = self.certificate().body.public_key;
        self.membership.workloads_of(&key)
    }

    /// The workloads this node runs, each with its state, and the workload identities in force
    /// behind each member: what `meshctl status` and `peer list` show.
    pub fn workload_status(&self) -> WorkloadStatus {
        let in_force = self.own_workloads();
        let attached = self
            .attached()
            .into_iter()
            .map(|a| {
                let state = match (&a.refused, &a.certificate) {
                    (Some(why), _) => format!("refused: {why}"),
                    (None, Some(c)) if in_force.contains(c) => proto::admin::IN_FORCE.to_string(),
                    (None, Some(_)) => {
                        "held, not in force (a newer certificate holds its address)".to_string()
                    }
                    (None, None) => match &a.later {
                        Some(why) => format!("asking the issuer (not yet: {why})"),
                        None => "asking the issuer".to_string(),
                    },
                };
                proto::admin::AttachedWorkload {
                    namespace: a.reference.namespace,
                    name: a.reference.name,
                    uid: a.reference.uid,
                    state,
                    certificate: a
                        .certificate
                        .as_ref()
                        .map(|c| proto::admin::WorkloadInfo::of(&c.body)),
                }
            })
            .collect();
        let members = self
            .membership
            .members()
            .keys()
            .map(|k| {
                let ws = self.membership.workloads_of(k);
                (
                    *k,
                    ws.iter()
                        .map(|c| proto::admin::WorkloadInfo::of(&c.body))
                        .collect(),
                )
            })
            .filter(|(_, ws): &(_, Vec<_>)| !ws.is_empty())
            .collect();
        (attached, members)
    }

    /// The workload certificates in force of member `key`.
    #[cfg(test)]
    pub fn workloads_of(&self, key: &[u8; 32]) -> &[Certificate] {
        self.membership.workloads_of(key)
    }

    /// A member's addresses: its certificate's and its workloads'.
    fn member_addrs(&self, key: &[u8; 32], m: &MemberState) -> Vec<Cidr> {
        let mut addrs = m.certificate.body.addrs.clone();
        for w in self.membership.workloads_of(key) {
            addrs.extend(w.body.addrs.iter().copied());
        }
        addrs
    }

    /// The routes this node serves as a gateway.
    pub fn serving(&self) -> &[Cidr] {
        self.gateways.serving()
    }

    pub fn policy(&self) -> &PolicyBook {
        &self.book
    }

    /// What member `key` last said about its policy set: serial and digest.
    pub fn heard_policy(&self, key: &[u8; 32]) -> Option<(u64, [u8; 32])> {
        self.sync.heard(key)
    }

    pub fn revocations(&self) -> impl Iterator<Item = &RevocationList> {
        self.membership.revocations()
    }

    /// The cookie a sender at `from` must show now.
    #[cfg(test)]
    pub fn cookie_for(&self, from: impl Into<Endpoint>) -> [u8; proto::control::COOKIE_LEN] {
        self.membership.cookie_for(from)
    }

    /// What the control plane spent and refused.
    #[cfg(test)]
    pub fn control_counters(&self) -> super::membership::ControlCounters {
        self.membership.counters
    }

    /// Members not heard from since they were admitted.
    #[cfg(test)]
    pub fn unheard(&self) -> usize {
        self.membership.unheard()
    }

    /// What `meshctl status` shows of the control protocol.
    /// This node's certificate now, and why members would refuse it (`None` while valid).
    pub fn own_certificate(&self, now_ms: u64) -> proto::admin::OwnCertificate {
        let b = &self.certificate().body;
        proto::admin::OwnCertificate {
            identity: b.identity(),
            spiffe_id: b.spiffe_id(),
            addresses: b.addrs.clone(),
            labels: b.labels.clone(),
            ports: b.ports.iter().map(ToString::to_string).collect(),
            serial: b.serial,
            not_before: b.not_before,
            not_after: b.not_after,
            problem: self.membership.own_problem(now_ms),
        }
    }

    pub fn control_status(&self) -> proto::admin::ControlStatus {
        let c = self.membership.counters;
        proto::admin::ControlStatus {
            members: self.members().len(),
            dh_ops: c.dh_ops,
            cookie_replies: c.cookie_replies,
            // Datagrams refused, certificates refused in members' lists (`listed_...`) and in
            // their workload lists (`workload_...`).
            refused: self
                .refused
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .chain(
                    self.membership
                        .listed_refused
                        .iter()
                        .map(|(k, n)| (format!("listed_{k}"), *n)),
                )
                .chain(
                    self.membership
                        .workloads_refused
                        .iter()
                        .map(|(k, n)| (format!("workload_{k}"), *n)),
                )
                .collect(),
            received: self
                .membership
                .received_kinds
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
        }
    }

    /// Handles one event at `now_ms`. A refused event changes nothing the shell would see.
    pub fn handle(
        &mut self,
        event: Event,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Result<Vec<Action>, Refusal> {
        let mut out = Vec::new();
        let outs = match event {
            Event::Datagram { from, bytes } => {
                match self.membership.on_datagram(now_ms, from, &bytes, rng) {
                    Ok(outs) => outs,
                    Err(refusal) => {
                        *self.refused.entry(refusal.kind()).or_default() += 1;
                        return Err(refusal);
                    }
                }
            }
            Event::Tick => {
                let mut outs = self.membership.take_deferred();
                outs.extend(self.membership.on_tick(now_ms, rng));
                if self.attached.expire(now_ms / 1000) {
                    self.announce_attached(now_ms, rng, &mut outs, &mut out);
                }
                self.ask_issuer(now_ms, rng, &mut outs);
                let acts = self.sync.on_tick(now_ms);
                self.sync_actions(acts, now_ms, rng, &mut outs);
                self.offer_in_turn(now_ms, rng, &mut outs);
                let members = self.membership.members();
                let local = &self.membership.certificate().body.trust_domain;
                self.gateways.set_candidates(members.iter().map(|(k, m)| {
                    let body = &m.certificate.body;
                    (*k, body.routes.as_slice(), body.trust_domain != *local)
                }));
                for (k, probe) in self.gateways.on_tick(now_ms) {
                    self.membership.send_to(&k, &probe, now_ms, rng, &mut outs);
                }
                outs
            }
            Event::AddSeed(seed) => {
                self.membership.add_seed(seed.addr, seed.key, rng);
                self.membership.on_tick(now_ms, rng)
            }
            Event::Forget(key) => {
                if self.membership.forget(&key).is_some() {
                    self.reasons.insert(key, "removed by the operator".into());
                }
                Vec::new()
            }
            Event::AnswerProbes(answer) => {
                self.membership.set_answer_probes(answer);
                Vec::new()
            }
            Event::ApplyPolicy(encoded) => {
                self.book.check_next(&encoded).map_err(Refusal::Policy)?;
                let mut outs = Vec::new();
                self.take_policy(encoded, now_ms, rng, &mut outs, &mut out)
                    .map_err(Refusal::Policy)?;
                outs
            }
            Event::AddRevocation(crl) => self.membership.add_revocation(now_ms, crl, rng)?,
            Event::Trust { bundle } => {
                self.rederive = true;
                self.membership.set_bundle(bundle, now_ms);
                Vec::new()
            }
            Event::Reconfigure {
                admins,
                posture,
                audit,
            } => {
                let notes = self
                    .book
                    .reconfigure(admins, posture, audit)
                    .map_err(Refusal::Policy)?;
                for note in notes {
                    tracing::warn!("{note}");
                }
                self.policy_changed = true;
                Vec::new()
            }
            Event::QueryFlows(query) => {
                let own = self.membership.certificate().body.public_key;
                let local = self.membership.certificate().body.trust_domain.clone();
                let members: Vec<([u8; 32], String)> = self
                    .membership
                    .members()
                    .iter()
                    .filter(|(_, m)| m.certificate.body.trust_domain == local)
                    .map(|(k, m)| (*k, m.certificate.body.identity()))
                    .collect();
                let serve = self
                    .flows
                    .ask(
                        own,
                        &query,
                        self.book.admins(),
                        members.iter().map(|(k, _)| *k).collect(),
                        now_ms,
                    )
                    .map_err(Refusal::FlowQuery)?;
                let mut outs = Vec::new();
                let msg = Message::FlowQuery { query };
                for (k, _) in &members {
                    self.membership.send_to(k, &msg, now_ms, rng, &mut outs);
                }
                out.push(Action::FlowsAsked { serve, members });
                outs
            }
            Event::AnswerFlows { to, messages } => {
                let mut outs = Vec::new();
                for m in &messages {
                    self.membership.send_to(&to, m, now_ms, rng, &mut outs);
                }
                outs
            }
            #[cfg(test)]
            Event::Workloads(certificates) => {
                let (outs, refused) = self.membership.set_workloads(certificates, now_ms, rng);
                for (identity, why) in &refused {
                    tracing::warn!(%identity, %why, "workload certificate not taken");
                }
                self.membership.own_workloads_changed = false;
                out.push(Action::OwnWorkloads {
                    held: self.own_workloads().to_vec(),
                    refused: refused
                        .into_iter()
                        .map(|(i, e)| (i, e.to_string()))
                        .collect(),
                });
                outs
            }
            Event::Attach(w) => {
                if !self.has_issuer {
                    return Err(Refusal::NoIssuer);
                }
                self.attached.attach(w);
                let mut outs = Vec::new();
                self.announce_attached(now_ms, rng, &mut outs, &mut out);
                self.ask_issuer(now_ms, rng, &mut outs);
                outs
            }
            Event::WorkloadCas(keys) => {
                self.membership.set_workload_cas(keys);
                Vec::new()
            }
            Event::Detach(w) => {
                let mut outs = Vec::new();
                if self.attached.detach(&w) {
                    self.announce_attached(now_ms, rng, &mut outs, &mut out);
                }
                outs
            }
            Event::Renew {
                secret,
                certificate,
                bundle,
            } => {
                self.policy_changed = true;
                self.rederive = true;
                let rekeyed = certificate.body.public_key != self.certificate().body.public_key;
                let mut outs = self
                    .membership
                    .renew(secret, certificate, bundle, now_ms, rng);
                if rekeyed {
                    // The workloads' certificates name the old key: asked for again at once.
                    self.attached.rekey();
                    self.announce_attached(now_ms, rng, &mut outs, &mut out);
                    self.ask_issuer(now_ms, rng, &mut outs);
                }
                outs
            }
        };
        self.settle(now_ms, rng, outs, &mut out);
        Ok(out)
    }

    /// A flow query from a member of this trust domain (another domain's admins are not ours),
    /// or an answer to this node's own query; anything else is refused and counted.
    fn on_flows(&mut self, from: [u8; 32], msg: Message, now_ms: u64, out: &mut Vec<Action>) {
        let refused = match msg {
            Message::FlowQuery { .. } if !self.membership.same_domain(&from) => {
                Some("another trust domain's member".to_string())
            }
            Message::FlowQuery { query } => {
                match self
                    .flows
                    .on_query(from, &query, self.book.admins(), now_ms)
                {
                    Ok(serve) => {
                        out.push(Action::ServeFlows { to: from, serve });
                        None
                    }
                    Err(why) => Some(why),
                }
            }
            Message::FlowAnswer {
                nonce,
                part,
                last,
                next,
                records,
            } if self.flows.solicited(&from, nonce, now_ms) => {
                out.push(Action::FlowAnswer {
                    from,
                    nonce,
                    part,
                    last,
                    next,
                    records,
                });
                None
            }
            _ => Some("an answer to no query of ours".to_string()),
        };
        if let Some(why) = refused {
            tracing::debug!(from = %proto::Key(from), %why, "flow message refused");
            *self.refused.entry("flow_query").or_default() += 1;
        }
    }

    /// Carries membership's outputs into actions (policy messages go through policy sync), then
    /// derives peers, routes and addresses and says what to save.
    fn settle(
        &mut self,
        now_ms: u64,
        rng: &mut impl RngCore,
        outs: Vec<Out>,
        out: &mut Vec<Action>,
    ) {
        let mut queue: std::collections::VecDeque<Out> = outs.into();
        while let Some(o) = queue.pop_front() {
            match o {
                Out::Send { to, datagram } => out.push(Action::Send { to, datagram }),
                Out::Gateway { from, msg } => {
                    if let Some(answer) = self.gateways.on_message(from, msg, now_ms) {
                        let mut more = Vec::new();
                        self.membership
                            .send_to(&from, &answer, now_ms, rng, &mut more);
                        queue.extend(more);
                    }
                }
                Out::Flows { from, msg } => self.on_flows(from, msg, now_ms, out),
                Out::Issued(Message::IssueAnswer { nonce, results }) => {
                    let key = self.certificate().body.public_key;
                    let answered = self.attached.on_answer(nonce, results, &key);
                    if !answered.is_empty() {
                        let mut more = Vec::new();
                        let outcomes = self.take_attached(answered, now_ms, rng, &mut more, out);
                        out.push(Action::Attached(outcomes));
                        queue.extend(more);
                    }
                }
                Out::Issued(_) => {}
                Out::Policy { from, .. } if !self.membership.same_domain(&from) => {
                    tracing::debug!(from = %proto::Key(from), "policy message from another trust domain ignored");
                }
                Out::Policy { from, msg } => {
                    let acts = self.sync.on_message(from, msg, now_ms);
                    let mut more = Vec::new();
                    self.sync_actions(acts, now_ms, rng, &mut more);
                    // Stores and logs from a taken set go straight out; messages are queued.
                    queue.extend(more);
                }
            }
        }
        out.append(&mut self.pending);
        if std::mem::take(&mut self.membership.own_workloads_changed) {
            out.push(Action::OwnWorkloads {
                held: self.own_workloads().to_vec(),
                refused: Vec::new(),
            });
        }
        for (key, why) in self.membership.take_expelled() {
            self.sync.forget(&key);
            self.reasons.entry(key).or_insert(why);
        }
        let dirty = std::mem::take(&mut self.membership.dirty);
        if dirty.members || self.policy_changed {
            out.push(Action::Resolve);
            self.policy_changed = false;
        }
        let mut touched = self.membership.take_touched();
        // The gateways whose routes changed (one died, or came back), and, when members came or
        // went, every gateway: a route never overlaps a member's address.
        let chosen = self.chosen_routes(now_ms);
        if chosen != self.chosen || (!touched.is_empty() && !chosen.is_empty()) {
            touched.extend(self.chosen.values().chain(chosen.values()).copied());
            self.chosen = chosen;
        }
        let new_peers = if std::mem::take(&mut self.rederive) {
            self.derive(None, out)
        } else if !touched.is_empty() {
            self.derive(Some(touched), out)
        } else {
            Vec::new()
        };
        if let Some(offer) = self.sync.offer() {
            let mut outs = Vec::new();
            for key in new_peers {
                if !self.membership.same_domain(&key) {
                    continue;
                }
                self.membership
                    .send_to(&key, &offer, now_ms, rng, &mut outs);
            }
            out.extend(outs.into_iter().filter_map(|o| match o {
                Out::Send { to, datagram } => Some(Action::Send { to, datagram }),
                Out::Policy { .. } | Out::Gateway { .. } | Out::Flows { .. } | Out::Issued(_) => {
                    None
                }
            }));
        }
        self.members_unsaved |= dirty.members;
        if self.members_unsaved && (dirty.members_removed || now_ms >= self.next_members_save_ms) {
            self.members_unsaved = false;
            self.next_members_save_ms = now_ms + MEMBERS_SAVE_INTERVAL_MS;
            let list = self
                .members()
                .values()
                .filter_map(|m| {
                    Some(Member {
                        certificate: m.certificate.clone(),
                        endpoint: m.address?,
                    })
                })
                .collect();
            out.push(Action::Store(Stored::Members(list)));
        }
        if dirty.revocations {
            out.push(Action::Store(Stored::Revocations(
                self.revocations().cloned().collect(),
            )));
        }
        if dirty.floors {
            self.membership.dirty.floors = true; // saved when due
        }
        if self.membership.dirty.floors && now_ms >= self.next_floor_save_ms {
            self.membership.dirty.floors = false;
            self.next_floor_save_ms = now_ms + FLOOR_SAVE_INTERVAL_MS;
            out.push(Action::Store(Stored::Floors(self.membership.floors())));
        }
    }

    /// For each route outside the mesh that a live gateway serves, the gateway that carries it
    /// here: not one this node serves itself, and never one that shares an address with this
    /// node or a member (a route cannot take an identity's traffic).
    fn chosen_routes(&self, now_ms: u64) -> BTreeMap<Cidr, [u8; 32]> {
        let mine = &self.certificate().body.addrs;
        self.gateways
            .chosen(now_ms)
            .into_iter()
            .filter(|(r, _)| {
                if self.gateways.serving().contains(r) {
                    return false;
                }
                let overlaps =
                    super::membership::overlaps_any(r, mine) || self.membership.claimed(r);
                if overlaps && !self.chosen.contains_key(r) {
                    tracing::debug!(route = %r, "a gateway's route shares addresses with this node or a member: not routed into the mesh");
                }
                !overlaps
            })
            .collect()
    }

    /// What the device must hold for member `key`, from its certificate and the gateway
    /// choice: its endpoint, exactly its addresses, and the routes it carries for this node; or
    /// nothing if it is no member or its addresses overlap this node's own (then the reason is
    /// noted).
    fn wanted(&mut self, key: &[u8; 32], mine: &[Cidr]) -> Option<Installed> {
        let m = self.membership.members().get(key)?;
        let mut addrs = self.member_addrs(key, m);
        addrs.extend(
            self.chosen
                .iter()
                .filter(|(_, g)| *g == key)
                .map(|(r, _)| *r),
        );
        let addrs = &addrs;
        if addrs
            .iter()
            .any(|a| super::membership::overlaps_any(a, mine))
        {
            if !self.peers.contains_key(key) {
                tracing::warn!(identity = %m.certificate.body.identity(), "member not installed: its addresses overlap this node's");
            }
            self.reasons
                .entry(*key)
                .or_insert_with(|| "its addresses overlap this node's".into());
            return None;
        }
        Some(Installed {
            endpoint: m.endpoint,
            addrs: addrs.clone(),
        })
    }

    /// Recomputes, from the certificates, the peers of `keys` (every member and installed peer if
    /// `None`: this node's own addresses changed), their routes and this node's addresses, and
    /// emits the differences; returns the keys of peers that are new. Members never overlap one
    /// another (membership refuses the second claim), so a route belongs to one peer and the
    /// peers not in `keys` keep theirs: the result is what a derivation of every member would
    /// give (the simulator checks that after every event).
    fn derive(&mut self, keys: Option<BTreeSet<[u8; 32]>>, out: &mut Vec<Action>) -> Vec<[u8; 32]> {
        let mine: BTreeSet<Cidr> = self.certificate().body.addrs.iter().copied().collect();
        let mine_list: Vec<Cidr> = mine.iter().copied().collect();
        let keys = keys.unwrap_or_else(|| {
            self.members()
                .keys()
                .chain(self.peers.keys())
                .copied()
                .collect()
        });
        let mut gone = Vec::new();
        let mut changed = Vec::new();
        let mut new = Vec::new();
        let mut old_routes = BTreeSet::new();
        let mut new_routes = BTreeSet::new();
        for k in keys {
            let want = self.wanted(&k, &mine_list);
            let have = self.peers.get(&k);
            old_routes.extend(have.iter().flat_map(|p| p.addrs.iter().copied()));
            new_routes.extend(want.iter().flat_map(|p| p.addrs.iter().copied()));
            match (have, want) {
                (Some(_), None) => gone.push(k),
                (have, Some(want)) if have != Some(&want) => {
                    if have.is_none() {
                        new.push(k);
                    }
                    changed.push((k, want));
                }
                _ => {}
            }
        }
        for k in gone {
            self.peers.remove(&k);
            let reason = self
                .reasons
                .remove(&k)
                .unwrap_or_else(|| "no longer a member".into());
            out.push(Action::Unpeer { key: k, reason });
        }
        self.reasons.clear();
        for (k, p) in changed {
            out.push(Action::Peer {
                key: k,
                endpoint: p.endpoint,
                addrs: p.addrs.clone(),
            });
            self.peers.insert(k, p);
        }
        for c in old_routes.difference(&new_routes) {
            self.routes.remove(c);
            out.push(Action::Unroute(*c));
        }
        for c in new_routes.difference(&old_routes) {
            self.routes.insert(*c);
            out.push(Action::Route(*c));
        }
        // New addresses first: Linux flushes every route through a device when its last IPv4
        // address goes, which would take the members' routes with it.
        out.extend(
            mine.difference(&self.addresses)
                .map(|c| Action::Address(*c)),
        );
        out.extend(
            self.addresses
                .difference(&mine)
                .map(|c| Action::Unaddress(*c)),
        );
        self.addresses = mine;
        new
    }

    /// Whether the peers and routes the node holds are what a derivation of every member from
    /// scratch gives (the simulator's check of [`Node::derive`]), and membership's indexes what
    /// its members say.
    #[cfg(test)]
    pub fn derived_from_scratch(&self) -> bool {
        let mine: Vec<Cidr> = self.certificate().body.addrs.clone();
        let peers: BTreeMap<[u8; 32], Installed> = self
            .members()
            .iter()
            .filter(|(k, m)| {
                !self
                    .member_addrs(k, m)
                    .iter()
                    .any(|a| super::membership::overlaps_any(a, &mine))
            })
            .map(|(k, m)| {
                let mut addrs = self.member_addrs(k, m);
                addrs.extend(self.chosen.iter().filter(|(_, g)| *g == k).map(|(r, _)| *r));
                (
                    *k,
                    Installed {
                        endpoint: m.endpoint,
                        addrs,
                    },
                )
            })
            .collect();
        let routes: BTreeSet<Cidr> = peers.values().flat_map(|p| p.addrs.clone()).collect();
        peers == self.peers && routes == self.routes && self.membership.indexes_match_members()
    }

    /// Verifies, compiles and takes a signed policy set, from the operator or a member; on
    /// success it is saved and offered to every member.
    fn take_policy(
        &mut self,
        encoded: Vec<u8>,
        now_ms: u64,
        rng: &mut impl RngCore,
        outs: &mut Vec<Out>,
        actions: &mut Vec<Action>,
    ) -> Result<(), String> {
        let msg = self.book.accept(&encoded)?;
        let set = self.book.current.as_ref().expect("just accepted");
        self.sync
            .set_current(set.serial, encoded.clone(), set.digest());
        tracing::info!("{msg}");
        self.policy_changed = true;
        actions.push(Action::Store(Stored::Policy(encoded)));
        self.membership.federate(self.book.federations(), now_ms);
        // Every member of our trust domain hears of it, the one it came from too: `policy
        // status` there shows what this node runs from what this node said.
        if let Some(offer) = self.sync.offer() {
            let keys: Vec<[u8; 32]> = self
                .members()
                .keys()
                .filter(|k| self.membership.same_domain(k))
                .copied()
                .collect();
            for k in &keys {
                self.membership.send_to(k, &offer, now_ms, rng, outs);
            }
        }
        Ok(())
    }

    fn sync_actions(
        &mut self,
        acts: Vec<SyncAction>,
        now_ms: u64,
        rng: &mut impl RngCore,
        outs: &mut Vec<Out>,
    ) {
        for a in acts {
            match a {
                SyncAction::Send(to, msg) => self.membership.send_to(&to, &msg, now_ms, rng, outs),
                SyncAction::Complete {
                    from,
                    serial,
                    digest,
                    encoded,
                } => {
                    let mut actions = Vec::new();
                    match self.take_policy(encoded, now_ms, rng, outs, &mut actions) {
                        Ok(()) => self.pending.extend(actions),
                        Err(e) => {
                            tracing::warn!(from = %proto::Key(from), error = %e, "policy set from a member refused; the running one stays in force");
                            self.sync.refuse(serial, digest);
                            self.sync.distrust(from, now_ms);
                        }
                    }
                }
            }
        }
    }

    fn offer_in_turn(&mut self, now_ms: u64, rng: &mut impl RngCore, outs: &mut Vec<Out>) {
        let n = self.members().len();
        if now_ms < self.next_offer_ms || n == 0 {
            return;
        }
        self.next_offer_ms = now_ms + POLICY_OFFER_INTERVAL_MS;
        let Some(offer) = self.sync.offer() else {
            return;
        };
        self.offer_turn = (self.offer_turn + 1) % n;
        let key = *self
            .members()
            .keys()
            .nth(self.offer_turn)
            .expect("index in range");
        // Another trust domain's member misses its turn: its admins sign its sets.
        if self.membership.same_domain(&key) {
            self.membership.send_to(&key, &offer, now_ms, rng, outs);
        }
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
