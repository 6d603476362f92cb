//! Many [`Node`]s over a simulated underlay, in memory: loss, duplication, reordering and
//! partitions, restarts from the saved state, and adversaries that capture and inject datagrams.
//! Everything random comes from one seed, so a run replays byte for byte ([`Sim::trace`]). Used by
//! the node's tests and by the scale benchmark (`bench/`).

use super::node::{Action, Event, Node, NodeConfig, Saved, Stored};
use ed25519_dalek::SigningKey;
use policy::engine::Posture;
use proto::cert::{CertBody, CertKind, Certificate};
use proto::control::Seed;
use proto::relay::{self, Endpoint, Tag};
use proto::Cidr;
use rand_core::{impls, RngCore};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use x25519_dalek::StaticSecret;

/// The simulated clock starts here (2027), so certificates from time 0 are valid.
pub const T0_MS: u64 = 1_800_000_000_000;
/// Every node's time moves this often, as the shell's tick.
pub const TICK_MS: u64 = 500;

/// A small deterministic generator (SplitMix64): the same seed gives the same run.
#[derive(Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

impl RngCore for SimRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        impls::fill_bytes_via_next(self, dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// A trust domain's CA for the simulation.
pub struct Ca {
    pub key: SigningKey,
    pub cert: Certificate,
}

impl Ca {
    pub fn new(seed: u8, td: &str) -> Ca {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let pk = key.verifying_key().to_bytes();
        let cert = CertBody::ca(td, "ca", pk, 1, (0, u64::MAX / 2), vec![])
            .sign(&key)
            .expect("a valid CA body");
        Ca { key, cert }
    }

    /// The identity `prod/node{i}` for `secret`, at overlay address 100.64.x.y of `i`.
    pub fn identity(&self, secret: &StaticSecret, i: usize, serial: u64) -> Certificate {
        self.issue(
            secret,
            &format!("node{i}"),
            overlay(i),
            serial,
            0,
            u64::MAX / 4,
        )
    }

    pub fn issue(
        &self,
        secret: &StaticSecret,
        name: &str,
        addr: Cidr,
        serial: u64,
        not_before: u64,
        not_after: u64,
    ) -> Certificate {
        CertBody {
            kind: CertKind::Identity,
            serial,
            not_before,
            not_after,
            trust_domain: self.cert.body.trust_domain.clone(),
            namespace: "prod".into(),
            name: name.into(),
            public_key: *x25519_dalek::PublicKey::from(secret).as_bytes(),
            issuer: self.key.verifying_key().to_bytes(),
            labels: [("app".to_string(), name.to_string())]
                .into_iter()
                .collect(),
            addrs: vec![addr],
            routes: vec![],
            ports: vec![],
        }
        .sign(&self.key)
        .expect("a valid identity body")
    }
}

/// Node `i`'s overlay address.
pub fn overlay(i: usize) -> Cidr {
    format!("100.64.{}.{}/32", i / 250, i % 250 + 1)
        .parse()
        .expect("a valid address")
}

/// Node `i`'s underlay endpoint.
pub fn underlay(i: usize) -> SocketAddr {
    format!("198.18.{}.{}:51820", i / 250, i % 250 + 1)
        .parse()
        .expect("a valid endpoint")
}

/// What the shell of one node would hold: the device's peers, routes, addresses, and the state
/// directory.
#[derive(Debug, Default, Clone)]
pub struct Host {
    pub peers: BTreeMap<[u8; 32], (Endpoint, Vec<Cidr>)>,
    pub routes: BTreeSet<Cidr>,
    pub addresses: BTreeSet<Cidr>,
    pub saved: Saved,
    pub resolves: u64,
    /// Flow queries the node said to serve: (the member that asked, what to read).
    pub flow_serves: Vec<([u8; 32], super::flows::Serve)>,
    /// Parts of answers to the node's own flow queries: (from, nonce, last, records).
    pub flow_answers: Vec<([u8; 32], u64, bool, Vec<u8>)>,
    /// This node's own workload certificates in force, as last said, and what was refused.
    pub own_workloads: Vec<Certificate>,
    pub workloads_refused: Vec<(String, String)>,
    /// What became of attached workloads, as the node said.
    pub attached: Vec<(proto::workload::WorkloadRef, Result<Certificate, String>)>,
}

pub struct SimNode {
    pub node: Option<Node>,
    pub addr: SocketAddr,
    secret: StaticSecret,
    /// The public key of `secret` (an X25519 base multiplication, computed once).
    key: [u8; 32],
    pub certificate: Certificate,
    /// The node's trust bundle and policy admins (the simulation's CA and admin unless a test
    /// makes the node one of another cluster).
    pub bundle: Vec<Certificate>,
    pub admins: Vec<[u8; 32]>,
    /// The routes the node serves as a gateway.
    pub gateway_routes: Vec<Cidr>,
    /// Whether its device relays frames, and the members it asks to relay (PROTOCOL.md §9).
    pub relay_serve: bool,
    pub relays: Vec<[u8; 32]>,
    pub seeds: Vec<Seed>,
    pub host: Host,
    pub refusals: u64,
}

impl SimNode {
    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("the node is running")
    }

    pub fn public(&self) -> [u8; 32] {
        self.key
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    /// A new key pair for the node (a renewal onto a new key), used from its next start.
    pub fn rekey(&mut self, secret: StaticSecret) {
        self.key = *x25519_dalek::PublicKey::from(&secret).as_bytes();
        self.secret = secret;
    }
}

struct Packet {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

/// The workload issuer (`meshctl ca serve`) on the simulated underlay: the same sealed side and
/// decision, its view of workloads a map the test changes, signing with the simulation's workload
/// CA. While `down`, it answers nothing.
pub struct SimIssuer {
    /// Where it listens now (a test may move it).
    pub addr: SocketAddr,
    /// The addresses nodes started from now on are configured with (`[issuer] endpoints`).
    pub listed_at: Vec<SocketAddr>,
    pub public: [u8; 32],
    responder: proto::issuer::Responder,
    trust: proto::trust::Trust,
    node_ca: [u8; 32],
    pub view: BTreeMap<(String, String), proto::workload::Workload>,
    pub lifetime_secs: u64,
    pub down: bool,
    /// Answers "later" for every workload (as a restarted issuer before its lists).
    pub not_listed_yet: bool,
    /// Sends its answers from this address instead of where it listens (as if spoofed).
    pub reply_from: Option<SocketAddr>,
    pub issued: u64,
    serial: u64,
}

impl SimIssuer {
    fn on_datagram(
        &mut self,
        now_ms: u64,
        from: SocketAddr,
        bytes: &[u8],
        pods_ca: &Ca,
        rng: &mut SimRng,
    ) -> Vec<Vec<u8>> {
        if self.down {
            return Vec::new();
        }
        let opened = match self.responder.open(now_ms, from, bytes) {
            Ok(Some(opened)) => opened,
            Ok(None) => return Vec::new(),
            // Over budget: a cookie reply, if any, for the node to repeat its datagram with.
            Err(dropped) => return dropped.reply.into_iter().collect(),
        };
        let proto::control::Message::IssueRequest {
            nonce,
            certificate,
            workloads,
        } = &opened.msg
        else {
            return Vec::new();
        };
        if self.not_listed_yet {
            self.responder.confirm(&opened);
            let answer = proto::control::Message::IssueAnswer {
                nonce: *nonce,
                results: workloads
                    .iter()
                    .map(|_| proto::control::Issued::Later("not listed yet".into()))
                    .collect(),
            };
            return self.responder.seal(&opened.sender, &answer, now_ms, rng);
        }
        let issuance = proto::workload::Issuance {
            trust_domain: "example.org".into(),
            node_issuers: vec![self.node_ca],
            now: now_ms / 1000,
            lifetime_secs: self.lifetime_secs,
        };
        let key = pods_ca.key.verifying_key().to_bytes();
        let results = proto::workload::answer(
            &opened.sender,
            certificate,
            workloads,
            &self.trust,
            None,
            &self.view,
            &issuance,
            |g| {
                self.serial += 1;
                self.issued += 1;
                g.body(self.serial, key)
                    .sign(&pods_ca.key)
                    .map_err(|e| e.to_string())
            },
        )
        .unwrap_or_else(|why| workloads.iter().map(|_| Err(why.clone())).collect());
        self.responder.confirm(&opened);
        let results = results.into_iter().map(Into::into).collect();
        let answer = proto::control::Message::IssueAnswer {
            nonce: *nonce,
            results,
        };
        self.responder.seal(&opened.sender, &answer, now_ms, rng)
    }
}

/// The simulated issuer's static key.
const ISSUER_SECRET: [u8; 32] = [0x15; 32];

/// A datagram as the underlay saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

pub struct Sim {
    pub nodes: Vec<SimNode>,
    pub now_ms: u64,
    pub rng: SimRng,
    pub ca: Ca,
    /// The workload issuer's CA: in every node's bundle, as `trust.workload_cas`.
    pub pods_ca: Ca,
    /// The workload issuer on the underlay, when a test starts one ([`Sim::with_issuer`]).
    pub issuer: Option<SimIssuer>,
    pub admin: SigningKey,
    /// Percent of datagrams lost, duplicated; the largest extra delay (reordering).
    pub loss_pct: u64,
    pub dup_pct: u64,
    pub jitter_ms: u64,
    /// A side per node: datagrams between different sides are lost.
    pub sides: Option<Vec<u8>>,
    /// The underlay links of each node, as bits: a datagram crosses only between nodes that
    /// share one (separate underlays joined by nodes on both).
    pub links: Option<Vec<u8>>,
    /// Frames relayed by the nodes' devices.
    pub relayed: u64,
    /// Every datagram sent, when capturing.
    pub capture: Option<Vec<Captured>>,
    /// After every event, check that the node's peers and routes are what a derivation from
    /// scratch gives (O(members) per event: off for the scale benchmark).
    pub check_derivation: bool,
    /// Datagrams and bytes delivered.
    pub delivered: u64,
    pub bytes: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    packets: BTreeMap<u64, Packet>,
    seq: u64,
    next_tick_ms: u64,
    trace: blake2::Blake2s256,
}

impl Sim {
    /// `n` nodes of one CA, every node but the first seeded with the first's address; nothing runs
    /// until [`Sim::start`].
    pub fn new(n: usize, seed: u64) -> Sim {
        let ca = Ca::new(9, "example.org");
        let pods_ca = Ca::new(31, "example.org");
        let admin = SigningKey::from_bytes(&[77; 32]);
        let nodes = (0..n)
            .map(|i| {
                let secret = StaticSecret::from(key_seed(i));
                let certificate = ca.identity(&secret, i, 1);
                let seeds = if i == 0 {
                    vec![]
                } else {
                    vec![Seed {
                        addr: underlay(0),
                        key: None,
                    }]
                };
                SimNode {
                    node: None,
                    addr: underlay(i),
                    key: *x25519_dalek::PublicKey::from(&secret).as_bytes(),
                    secret,
                    certificate,
                    bundle: vec![ca.cert.clone(), pods_ca.cert.clone()],
                    admins: vec![admin.verifying_key().to_bytes()],
                    gateway_routes: Vec::new(),
                    relay_serve: false,
                    relays: Vec::new(),
                    seeds,
                    host: Host::default(),
                    refusals: 0,
                }
            })
            .collect();
        use blake2::Digest;
        Sim {
            nodes,
            now_ms: T0_MS,
            rng: SimRng::new(seed),
            ca,
            pods_ca,
            issuer: None,
            admin,
            loss_pct: 0,
            dup_pct: 0,
            jitter_ms: 0,
            sides: None,
            links: None,
            relayed: 0,
            capture: None,
            check_derivation: true,
            delivered: 0,
            bytes: 0,
            queue: BinaryHeap::new(),
            packets: BTreeMap::new(),
            seq: 0,
            next_tick_ms: T0_MS,
            trace: blake2::Blake2s256::new(),
        }
    }

    fn config(&self, i: usize) -> NodeConfig {
        let n = &self.nodes[i];
        NodeConfig {
            secret: n.secret.clone(),
            certificate: n.certificate.clone(),
            bundle: n.bundle.clone(),
            revocations: vec![],
            admins: n.admins.clone(),
            posture: Posture::ZeroTrust,
            audit: false,
            answer_probes: true,
            seeds: n.seeds.clone(),
            gateway_routes: n.gateway_routes.clone(),
            relays: n.relays.clone(),
            issuer: self
                .issuer
                .as_ref()
                .map(|i| (i.public, i.listed_at.clone())),
            workload_cas: vec![self.pods_ca.key.verifying_key().to_bytes()],
        }
    }

    /// Starts (or restarts, from what it saved) node `i`.
    pub fn start(&mut self, i: usize) {
        let cfg = self.config(i);
        let saved = self.nodes[i].host.saved.clone();
        // A restart keeps the state directory; the device and the kernel start empty.
        self.nodes[i].host = Host {
            saved,
            ..Host::default()
        };
        let (node, actions) = Node::new(
            cfg,
            self.nodes[i].host.saved.clone(),
            self.now_ms,
            &mut self.rng,
        );
        self.nodes[i].node = Some(node);
        self.carry_out(i, actions);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// Stops node `i` at once (as `kill -9`): what it saved stays.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].node = None;
    }

    /// Carries out node `i`'s actions as its shell would.
    pub fn carry_out(&mut self, i: usize, actions: Vec<Action>) {
        if self.check_derivation {
            if let Some(node) = &self.nodes[i].node {
                assert!(
                    node.derived_from_scratch(),
                    "node {i}: what was derived for what changed (peers, routes, membership's indexes) differs from a derivation of every member"
                );
            }
        }
        let from = self.nodes[i].addr;
        for a in actions {
            let host = &mut self.nodes[i].host;
            match a {
                Action::Send { to, datagram } => match to {
                    Endpoint::Direct(to) => self.send(from, to, datagram),
                    Endpoint::Relayed { relay, tag } => {
                        let me = Tag::of(&self.nodes[i].key);
                        self.send(from, relay, relay::frame(me, tag, &datagram))
                    }
                },
                Action::Resolve => host.resolves += 1,
                Action::Peer {
                    key,
                    endpoint,
                    addrs,
                } => {
                    host.peers.insert(key, (endpoint, addrs));
                }
                Action::Unpeer { key, .. } => {
                    host.peers.remove(&key);
                }
                Action::Route(c) => {
                    assert!(host.routes.insert(c), "route {c} added twice");
                }
                Action::Unroute(c) => {
                    assert!(host.routes.remove(&c), "route {c} removed but not there");
                }
                Action::Address(c) => {
                    host.addresses.insert(c);
                }
                Action::Unaddress(c) => {
                    host.addresses.remove(&c);
                }
                Action::ServeFlows { to, serve } => host.flow_serves.push((to, serve)),
                Action::FlowsAsked { .. } => {}
                Action::Attached(outcomes) => host.attached.extend(outcomes),
                Action::OwnWorkloads { held, refused } => {
                    host.own_workloads = held;
                    host.workloads_refused = refused;
                }
                Action::FlowAnswer {
                    from,
                    nonce,
                    last,
                    records,
                    ..
                } => host.flow_answers.push((from, nonce, last, records)),
                Action::Store(s) => match s {
                    Stored::Members(m) => host.saved.members = m,
                    Stored::Revocations(r) => host.saved.revocations = r,
                    Stored::Floors(f) => host.saved.floors = f,
                    Stored::Policy(p) => host.saved.policy = Some(p),
                    Stored::Attached(a) => host.saved.attached = a,
                },
            }
        }
    }

    /// Puts a datagram on the underlay, subject to loss, duplication, delay and partitions.
    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let inner = if relay::is_frame(&bytes) {
            relay::HEADER_LEN
        } else {
            0
        };
        assert!(
            bytes.len() - inner <= proto::segment::DATAGRAM_BYTES,
            "a {}-byte datagram would need fragmentation",
            bytes.len()
        );
        if let Some(c) = &mut self.capture {
            c.push(Captured {
                from,
                to,
                bytes: bytes.clone(),
            });
        }
        let copies = if self.rng.below(100) < self.dup_pct {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.rng.below(100) < self.loss_pct {
                continue;
            }
            let at = self.now_ms + 1 + self.rng.below(self.jitter_ms + 1);
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq)));
            self.packets.insert(
                self.seq,
                Packet {
                    from,
                    to,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    fn deliver(&mut self, p: Packet) {
        if self.issuer.as_ref().is_some_and(|i| i.addr == p.to) {
            self.delivered += 1;
            let now = self.now_ms;
            let issuer = self.issuer.as_mut().expect("checked");
            let from = issuer.reply_from.unwrap_or(issuer.addr);
            let answers = issuer.on_datagram(now, p.from, &p.bytes, &self.pods_ca, &mut self.rng);
            for d in answers {
                self.send(from, p.from, d);
            }
            return;
        }
        let Some(dst) = self.index_of(p.to) else {
            return;
        };
        if let (Some(sides), Some(src)) = (&self.sides, self.index_of(p.from)) {
            if sides[src] != sides[dst] {
                return;
            }
        }
        if let (Some(links), Some(src)) = (&self.links, self.index_of(p.from)) {
            if links[src] & links[dst] == 0 {
                return;
            }
        }
        {
            use blake2::Digest;
            self.trace.update(self.now_ms.to_be_bytes());
            self.trace.update(p.from.to_string());
            self.trace.update(p.to.to_string());
            self.trace.update(&p.bytes);
        }
        self.delivered += 1;
        self.bytes += p.bytes.len() as u64;
        let now = self.now_ms;
        if self.nodes[dst].node.is_none() {
            return;
        }
        // A relay frame meets the node's device first, as in meshd's data path.
        let (from, bytes) = match relay::parse(&p.bytes) {
            None => (Endpoint::Direct(p.from), p.bytes),
            Some((header, inner)) => {
                let host = &self.nodes[dst];
                let node = host.node();
                let td = &node.certificate().body.trust_domain;
                let path = |t: &Tag| {
                    host.host
                        .peers
                        .iter()
                        .find(|(k, _)| Tag::of(k) == *t)
                        .map(|(k, (e, _))| {
                            let local = node
                                .members()
                                .get(k)
                                .is_some_and(|m| m.certificate.body.trust_domain == *td);
                            (*e, local)
                        })
                };
                let me = Tag::of(&host.key);
                match relay::decide(&header, p.from, me, host.relay_serve, path) {
                    relay::Verdict::Deliver(from) => (from, inner.to_vec()),
                    relay::Verdict::Forward(to) => {
                        let mut bytes = p.bytes.clone();
                        bytes[1] = header.ttl - 1;
                        self.relayed += 1;
                        let at = self.nodes[dst].addr;
                        self.send(at, to, bytes);
                        return;
                    }
                    relay::Verdict::Drop(_) => return,
                }
            }
        };
        let Some(node) = self.nodes[dst].node.as_mut() else {
            return;
        };
        let event = Event::Datagram { from, bytes };
        match node.handle(event, now, &mut self.rng) {
            Ok(actions) => self.carry_out(dst, actions),
            Err(_) => self.nodes[dst].refusals += 1,
        }
    }

    /// Gives node `i` an event now; a refusal is counted as one from the network is.
    pub fn handle(&mut self, i: usize, event: Event) -> Result<(), super::Refusal> {
        let now = self.now_ms;
        let node = self.nodes[i].node.as_mut().expect("the node is running");
        match node.handle(event, now, &mut self.rng) {
            Ok(actions) => {
                self.carry_out(i, actions);
                Ok(())
            }
            Err(e) => {
                self.nodes[i].refusals += 1;
                Err(e)
            }
        }
    }

    /// Runs the network and every node's tick for `ms` simulated milliseconds.
    pub fn run(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        loop {
            let next_packet = self.queue.peek().map(|Reverse((at, _))| *at);
            let next = next_packet.unwrap_or(u64::MAX).min(self.next_tick_ms);
            if next > end {
                break;
            }
            self.now_ms = next;
            if next_packet == Some(next) {
                let Reverse((_, seq)) = self.queue.pop().expect("peeked");
                let p = self.packets.remove(&seq).expect("queued");
                self.deliver(p);
            } else {
                self.next_tick_ms += TICK_MS;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].node.is_some() {
                        let _ = self.handle(i, Event::Tick);
                    }
                }
            }
        }
        self.now_ms = end;
    }

    /// Runs until `done` holds (checked every tick) or `limit_ms` passes; returns the simulated
    /// time it took, or `None`.
    pub fn run_until(&mut self, limit_ms: u64, mut done: impl FnMut(&Sim) -> bool) -> Option<u64> {
        let start = self.now_ms;
        while self.now_ms - start <= limit_ms {
            if done(self) {
                return Some(self.now_ms - start);
            }
            self.run(TICK_MS);
        }
        None
    }

    /// The issuer as under a flood: it opens nothing without a cookie, which it answers with.
    pub fn issuer_under_load(&mut self) {
        let i = self.issuer.as_mut().expect("an issuer");
        i.responder =
            proto::issuer::Responder::with_open_budget(StaticSecret::from(ISSUER_SECRET), 0);
    }

    /// Starts a workload issuer at 198.18.255.254:7100 that nodes started from now on ask; its
    /// certificates live `lifetime_secs`.
    pub fn with_issuer(&mut self, lifetime_secs: u64) {
        let secret = StaticSecret::from(ISSUER_SECRET);
        let public = *x25519_dalek::PublicKey::from(&secret).as_bytes();
        let (trust, _) = proto::trust::Trust::new("example.org", vec![self.ca.cert.clone()]);
        let addr: SocketAddr = "198.18.255.254:7100".parse().expect("literal");
        self.issuer = Some(SimIssuer {
            addr,
            listed_at: vec![addr],
            public,
            responder: proto::issuer::Responder::new(secret),
            trust,
            node_ca: self.ca.key.verifying_key().to_bytes(),
            view: BTreeMap::new(),
            lifetime_secs,
            down: false,
            not_listed_yet: false,
            reply_from: None,
            issued: 0,
            serial: 0,
        });
    }

    /// Places workload `name` (service account `name`) at `addr` on node `on` in the issuer's
    /// view, with the UID `uid-NAME`.
    pub fn schedule(&mut self, name: &str, on: usize, addr: &str) {
        let w = proto::workload::Workload {
            reference: proto::workload::WorkloadRef {
                namespace: "microblog".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            },
            service_account: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            addrs: vec![addr.parse().expect("an address")],
            ports: Vec::new(),
            node: proto::workload::NodeName {
                namespace: "prod".into(),
                name: format!("node{on}"),
            },
        };
        let issuer = self.issuer.as_mut().expect("an issuer");
        issuer.view.insert(("microblog".into(), name.into()), w);
    }

    /// True if every running node has every other running node installed.
    pub fn full_mesh(&self) -> bool {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].node.is_some())
            .collect();
        running.iter().all(|&i| {
            running.iter().filter(|&&j| j != i).all(|&j| {
                self.nodes[i]
                    .host
                    .peers
                    .contains_key(&self.nodes[j].public())
            })
        })
    }

    /// A policy set signed by the simulation's admin.
    pub fn policy_set(&self, serial: u64, docs: &str) -> Vec<u8> {
        proto::policyset::SignedPolicySet::sign(serial, 0, docs.into(), &self.admin)
            .expect("a signable set")
            .encode()
    }

    /// The digest of everything delivered so far, in order: equal for two runs from one seed.
    pub fn trace(&self) -> [u8; 32] {
        use blake2::Digest;
        self.trace.clone().finalize().into()
    }
}

/// Node `i`'s static private key.
pub fn key_seed(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    k[31] = 0x5a;
    k
}
