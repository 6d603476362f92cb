//! Mesh membership: who our peers are, learned from seeds and from peers over the control
//! protocol (`proto::control`), and kept only while their certificates verify. Pure: time comes in
//! as an argument, randomness through `RngCore`, and every effect goes out as an [`Action`] for the
//! shell (`run.rs`) to carry out.

pub mod policy_store;
pub mod policy_sync;
pub mod ratelimit;
pub mod run;
pub mod state;

use proto::cert::{Certificate, RevocationList};
use proto::control::{self, Datagram, Member, Message, ReplayWindow};
use proto::segment::Reassembly;
use proto::Cidr;
use rand_core::RngCore;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use x25519_dalek::StaticSecret;

/// How often an unanswered seed is probed again.
const PROBE_INTERVAL_MS: u64 = 1000;
/// How often we ask one member (in turn) for the members it knows.
const GOSSIP_INTERVAL_MS: u64 = 3000;
/// Members per `Members` message at most.
const MEMBERS_PER_MESSAGE: usize = 32;
/// Certificate bytes per `Members` message at most (a larger certificate goes alone), so that a
/// message stays well under the largest one whatever the certificates' sizes.
const MEMBERS_BYTES_PER_MESSAGE: usize = 16 * 1024;

/// `list` in batches of at most [`MEMBERS_PER_MESSAGE`] members and, unless one certificate alone
/// is larger, [`MEMBERS_BYTES_PER_MESSAGE`] certificate bytes.
fn member_batches(list: Vec<Member>) -> Vec<Vec<Member>> {
    let mut batches: Vec<Vec<Member>> = Vec::new();
    let mut bytes = 0;
    for m in list {
        let size = m.certificate.encode().len();
        let full = batches.last().is_none_or(|b| {
            b.len() >= MEMBERS_PER_MESSAGE || bytes + size > MEMBERS_BYTES_PER_MESSAGE
        });
        if full {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        batches.last_mut().expect("pushed above").push(m);
    }
    batches
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        to: SocketAddr,
        datagram: Vec<u8>,
    },
    /// Make (or update) the WireGuard peer for `key`, with exactly `addrs` as its allowed IPs.
    Install {
        key: [u8; 32],
        endpoint: SocketAddr,
        addrs: Vec<Cidr>,
    },
    /// Remove the WireGuard peer for `key`.
    Remove {
        key: [u8; 32],
        addrs: Vec<Cidr>,
        reason: String,
    },
    /// The member set changed: save it so a restart rejoins without seeds.
    Persist,
    /// A policy-transfer message from an authenticated member, for the shell's policy sync.
    Policy {
        from: [u8; 32],
        msg: Box<Message>,
    },
}

/// Why an incoming control datagram was not acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed: {0}")]
    Malformed(#[from] control::ControlError),
    #[error("certificate refused: {0}")]
    Certificate(proto::cert::CertError),
    #[error("the certificate names another key than the sender's")]
    KeyMismatch,
    #[error("from a sender we hold no certificate for")]
    UnknownSender,
    #[error("replayed or too old")]
    Replay,
    #[error("a probe reply we did not ask for")]
    UnexpectedReply,
    #[error("a revocation list from a CA we do not trust")]
    UntrustedRevocation,
    #[error("from a member the operator removed")]
    Removed,
    #[error("a probe, and this node answers none (peering.answer_probes = false)")]
    ProbeIgnored,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    pub certificate: Certificate,
    pub endpoint: SocketAddr,
    pub last_heard_ms: Option<u64>,
}

struct Seed {
    addr: SocketAddr,
    nonce: [u8; 16],
    /// The seed's key: from the configuration (`pinned`), or from a `ProbeKey` reply. The
    /// seed's Hello, not the key, brings its certificate.
    key: Option<[u8; 32]>,
    /// The key came from the configuration: the seed is greeted with a sealed Hello, never
    /// probed.
    pinned: bool,
    last_probe_ms: Option<u64>,
}

pub struct Membership {
    secret: StaticSecret,
    public: [u8; 32],
    certificate: Certificate,
    bundle: Vec<Certificate>,
    /// The newest revocation list of each CA, by the CA's key.
    revocations: BTreeMap<[u8; 32], RevocationList>,
    members: BTreeMap<[u8; 32], MemberState>,
    seeds: Vec<Seed>,
    replay: HashMap<[u8; 32], ReplayWindow>,
    /// Messages arriving in segments (bounded in count, size and time).
    reassembly: Reassembly,
    /// Counter of our sealed messages; starts at the clock so a restarted node's counters are
    /// above anything its peers saw before.
    counter: u64,
    next_gossip_ms: u64,
    gossip_turn: usize,
    /// Keys the operator removed; refused until the daemon restarts.
    removed: std::collections::HashSet<[u8; 32]>,
    answer_probes: bool,
}

impl Membership {
    pub fn new(
        secret: StaticSecret,
        certificate: Certificate,
        bundle: Vec<Certificate>,
        revocations: Vec<RevocationList>,
        now_ms: u64,
    ) -> Membership {
        let public = *x25519_dalek::PublicKey::from(&secret).as_bytes();
        Membership {
            secret,
            public,
            certificate,
            bundle,
            revocations: revocations.into_iter().map(|r| (r.issuer, r)).collect(),
            members: BTreeMap::new(),
            seeds: Vec::new(),
            replay: HashMap::new(),
            reassembly: Reassembly::default(),
            counter: now_ms.saturating_mul(1_000_000),
            next_gossip_ms: now_ms,
            gossip_turn: 0,
            removed: Default::default(),
            answer_probes: true,
        }
    }

    pub fn members(&self) -> &BTreeMap<[u8; 32], MemberState> {
        &self.members
    }

    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// Adds an underlay endpoint to contact (a seed, or an operator's `peer add`), with the
    /// seed's static key if known: then it is greeted with a sealed Hello instead of a probe.
    pub fn add_seed(&mut self, addr: SocketAddr, key: Option<[u8; 32]>, rng: &mut impl RngCore) {
        if let Some(s) = self.seeds.iter_mut().find(|s| s.addr == addr) {
            // Named again, now with its key: greet it by key from now on.
            if key.is_some() {
                s.key = key;
                s.pinned = true;
                s.last_probe_ms = None;
            }
        } else {
            let mut nonce = [0u8; 16];
            rng.fill_bytes(&mut nonce);
            self.seeds.push(Seed {
                addr,
                nonce,
                key,
                pinned: key.is_some(),
                last_probe_ms: None,
            });
        }
    }

    /// Whether probes are answered: with `false`, a sender that has shown no certificate learns
    /// nothing from this node, not even its key.
    pub fn set_answer_probes(&mut self, answer: bool) {
        self.answer_probes = answer;
    }

    /// Takes a member learned earlier (from the state directory) if its certificate still
    /// verifies.
    pub fn restore(
        &mut self,
        certificate: Certificate,
        endpoint: SocketAddr,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.verify(&certificate, now_ms).is_ok() && certificate.body.public_key != self.public {
            self.admit(certificate, endpoint, None, &mut actions);
        }
        actions
    }

    fn verify(&self, cert: &Certificate, now_ms: u64) -> Result<(), proto::cert::CertError> {
        let crl = self.revocations.get(&cert.body.issuer);
        cert.verify_identity(&self.bundle, now_ms / 1000, crl)
    }

    /// `msg` sealed for `to`, as datagrams small enough never to be fragmented (one, unless the
    /// message is large); none if it exceeds the largest message.
    fn seal(&mut self, to: &[u8; 32], msg: &Message, rng: &mut impl RngCore) -> Vec<Vec<u8>> {
        let mut e = [0u8; 32];
        rng.fill_bytes(&mut e);
        let first = self.counter + 1;
        match control::seal_message(
            &self.secret,
            to,
            &StaticSecret::from(e),
            first,
            &msg.encode(),
        ) {
            Ok(datagrams) => {
                self.counter += datagrams.len() as u64;
                datagrams
            }
            Err(_) => Vec::new(),
        }
    }

    fn send(
        &mut self,
        to_key: &[u8; 32],
        to: SocketAddr,
        msg: &Message,
        rng: &mut impl RngCore,
        out: &mut Vec<Action>,
    ) {
        for datagram in self.seal(to_key, msg, rng) {
            out.push(Action::Send { to, datagram });
        }
    }

    /// Seals `msg` for the member `to`, at the endpoint it was last seen at.
    pub fn send_to(&mut self, to: &[u8; 32], msg: &Message, rng: &mut impl RngCore) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(ep) = self.members.get(to).map(|m| m.endpoint) {
            self.send(to, ep, msg, rng, &mut out);
        }
        out
    }

    fn hello(&self, want_members: bool) -> Message {
        Message::Hello {
            certificate: self.certificate.clone(),
            want_members,
            digest: self.digest(),
        }
    }

    /// The digest of the mesh as this node knows it, itself included.
    fn digest(&self) -> [u8; 32] {
        control::members_digest(self.members.keys().chain(std::iter::once(&self.public)))
    }

    /// Records a verified member and installs it; returns true if it is new.
    fn admit(
        &mut self,
        cert: Certificate,
        endpoint: SocketAddr,
        heard_ms: Option<u64>,
        out: &mut Vec<Action>,
    ) -> bool {
        let key = cert.body.public_key;
        if self.removed.contains(&key) {
            return false;
        }
        // One live certificate per identity: a renewed one (new key) replaces the old.
        let stale: Vec<[u8; 32]> = self
            .members
            .iter()
            .filter(|(k, m)| **k != key && m.certificate.body.identity() == cert.body.identity())
            .filter(|(_, m)| m.certificate.body.not_before <= cert.body.not_before)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.expel(&k, "replaced by a renewed certificate", out);
        }
        let addrs = cert.body.addrs.clone();
        let (new, changed) = match self.members.get_mut(&key) {
            Some(m) => {
                let changed = m.endpoint != endpoint || m.certificate != cert;
                m.endpoint = endpoint;
                m.certificate = cert;
                if heard_ms.is_some() {
                    m.last_heard_ms = heard_ms;
                }
                (false, changed)
            }
            None => {
                let state = MemberState {
                    certificate: cert,
                    endpoint,
                    last_heard_ms: heard_ms,
                };
                self.members.insert(key, state);
                (true, true)
            }
        };
        if changed {
            out.push(Action::Install {
                key,
                endpoint,
                addrs,
            });
            out.push(Action::Persist);
        }
        new
    }

    fn expel(&mut self, key: &[u8; 32], reason: &str, out: &mut Vec<Action>) {
        if let Some(m) = self.members.remove(key) {
            self.replay.remove(key);
            out.push(Action::Remove {
                key: *key,
                addrs: m.certificate.body.addrs,
                reason: reason.to_string(),
            });
            out.push(Action::Persist);
        }
    }

    /// Forgets a member on the operator's request and refuses it from now on (until restart;
    /// to exclude an identity for good, revoke its certificate).
    pub fn forget(&mut self, key: &[u8; 32]) -> Vec<Action> {
        let mut out = Vec::new();
        self.removed.insert(*key);
        self.expel(key, "removed by the operator", &mut out);
        out
    }

    /// One control datagram from `from`.
    pub fn on_datagram(
        &mut self,
        now_ms: u64,
        from: SocketAddr,
        datagram: &[u8],
        rng: &mut impl RngCore,
    ) -> Result<Vec<Action>, Refusal> {
        let mut out = Vec::new();
        match control::decode(datagram)? {
            Datagram::Probe { .. } if !self.answer_probes => return Err(Refusal::ProbeIgnored),
            Datagram::Probe { nonce } => {
                if let Some(reply) =
                    control::encode_probe_reply(&nonce, &self.certificate, datagram.len())
                {
                    out.push(Action::Send {
                        to: from,
                        datagram: reply,
                    });
                }
            }
            Datagram::ProbeReply { nonce, certificate } => {
                if !self
                    .seeds
                    .iter()
                    .any(|s| s.addr == from && s.nonce == nonce)
                {
                    return Err(Refusal::UnexpectedReply);
                }
                self.verify(&certificate, now_ms)
                    .map_err(Refusal::Certificate)?;
                let key = certificate.body.public_key;
                if key == self.public {
                    return Ok(out); // we probed ourselves
                }
                self.admit(certificate, from, None, &mut out);
                let hello = self.hello(true);
                self.send(&key, from, &hello, rng, &mut out);
            }
            Datagram::ProbeKey { nonce, key } => {
                // The seed's certificate is too large for one datagram: our Hello goes to its key,
                // and its Hello, which carries the certificate, admits it (or nothing does).
                let seed = self
                    .seeds
                    .iter_mut()
                    .find(|s| s.addr == from && s.nonce == nonce && !s.pinned)
                    .ok_or(Refusal::UnexpectedReply)?;
                if key != self.public && !self.removed.contains(&key) {
                    seed.key = Some(key);
                    // Its members would be refused until it is one: asked for once it is.
                    let hello = self.hello(false);
                    self.send(&key, from, &hello, rng, &mut out);
                }
            }
            Datagram::Sealed(sealed) => {
                let control::Opened {
                    sender,
                    plaintext: plain,
                } = sealed.open(&self.secret)?;
                if self.removed.contains(&sender) {
                    return Err(Refusal::Removed);
                }
                let Some(whole) = self
                    .reassembly
                    .add(sender, sealed.counter, &plain, now_ms)?
                else {
                    return Ok(out); // more segments to come
                };
                let msg = Message::decode(&whole.message)?;
                let cert = match &msg {
                    Message::Hello { certificate, .. } => certificate.clone(),
                    _ => self
                        .members
                        .get(&sender)
                        .ok_or(Refusal::UnknownSender)?
                        .certificate
                        .clone(),
                };
                if cert.body.public_key != sender {
                    return Err(Refusal::KeyMismatch);
                }
                // A member whose certificate stopped verifying is cut by the next tick; a refusal
                // changes no state, since its actions would not be carried out.
                self.verify(&cert, now_ms).map_err(Refusal::Certificate)?;
                if !self
                    .replay
                    .entry(sender)
                    .or_default()
                    .accept_run(whole.first_counter, whole.count)
                {
                    return Err(Refusal::Replay);
                }
                // The message opened with the sender's static key: this is where it is now.
                let new = self.admit(cert, from, Some(now_ms), &mut out);
                if new {
                    // A newcomer learns who we are (it may know only our key, from a ProbeKey)
                    // and gets the revocation lists we hold. A seed known only by its key is
                    // now asked for the members it knows.
                    let seed = self.seeds.iter().any(|s| s.key == Some(sender));
                    let hello = self.hello(seed);
                    self.send(&sender, from, &hello, rng, &mut out);
                    for crl in self.revocations.values().cloned().collect::<Vec<_>>() {
                        self.send(&sender, from, &Message::Revocation(crl), rng, &mut out);
                    }
                }
                self.on_message(now_ms, sender, from, msg, rng, &mut out)?;
            }
        }
        Ok(out)
    }

    fn on_message(
        &mut self,
        now_ms: u64,
        sender: [u8; 32],
        from: SocketAddr,
        msg: Message,
        rng: &mut impl RngCore,
        out: &mut Vec<Action>,
    ) -> Result<(), Refusal> {
        match msg {
            Message::Hello {
                want_members,
                digest,
                ..
            } => {
                // Answer only if the sender's view of the mesh differs from ours.
                if want_members && digest != self.digest() {
                    let list: Vec<Member> = self
                        .members
                        .iter()
                        .filter(|(k, _)| **k != sender)
                        .map(|(_, m)| Member {
                            certificate: m.certificate.clone(),
                            endpoint: m.endpoint,
                        })
                        .collect();
                    for batch in member_batches(list) {
                        self.send(&sender, from, &Message::Members(batch), rng, out);
                    }
                }
            }
            Message::Members(list) => {
                for m in list {
                    let key = m.certificate.body.public_key;
                    if key == self.public || self.members.contains_key(&key) {
                        continue;
                    }
                    if self.verify(&m.certificate, now_ms).is_err() {
                        continue;
                    }
                    self.admit(m.certificate, m.endpoint, None, out);
                    let hello = self.hello(false);
                    self.send(&key, m.endpoint, &hello, rng, out);
                }
            }
            m @ (Message::PolicyOffer { .. }
            | Message::PolicyRequest { .. }
            | Message::PolicyChunk { .. }) => out.push(Action::Policy {
                from: sender,
                msg: Box::new(m),
            }),
            Message::Revocation(crl) => {
                let ca = self
                    .bundle
                    .iter()
                    .find(|ca| ca.body.public_key == crl.issuer)
                    .ok_or(Refusal::UntrustedRevocation)?;
                crl.verify(ca).map_err(Refusal::Certificate)?;
                if self
                    .revocations
                    .get(&crl.issuer)
                    .is_some_and(|cur| cur.number >= crl.number)
                {
                    return Ok(());
                }
                self.revocations.insert(crl.issuer, crl.clone());
                self.expel_invalid(now_ms, out);
                // Spread it: every member that has not got it yet gets it from us.
                let targets: Vec<([u8; 32], SocketAddr)> = self
                    .members
                    .iter()
                    .filter(|(k, _)| **k != sender)
                    .map(|(k, m)| (*k, m.endpoint))
                    .collect();
                for (k, ep) in targets {
                    self.send(&k, ep, &Message::Revocation(crl.clone()), rng, out);
                }
            }
        }
        Ok(())
    }

    /// Takes a renewed identity (new certificate, possibly a new key) and the current trust
    /// bundle, and announces the certificate to every member, which then replaces the old one.
    pub fn renew(
        &mut self,
        secret: StaticSecret,
        certificate: Certificate,
        bundle: Vec<Certificate>,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.public = *x25519_dalek::PublicKey::from(&secret).as_bytes();
        self.secret = secret;
        self.certificate = certificate;
        self.bundle = bundle;
        self.expel_invalid(now_ms, &mut out);
        let targets: Vec<([u8; 32], SocketAddr)> =
            self.members.iter().map(|(k, m)| (*k, m.endpoint)).collect();
        let hello = self.hello(false);
        for (k, ep) in targets {
            self.send(&k, ep, &hello, rng, &mut out);
        }
        out
    }

    /// Replaces the revocation list of its CA if it is newer (from the operator or a file);
    /// cuts revoked members and spreads the list.
    pub fn add_revocation(
        &mut self,
        now_ms: u64,
        crl: RevocationList,
        rng: &mut impl RngCore,
    ) -> Result<Vec<Action>, Refusal> {
        let mut out = Vec::new();
        let me = self.public;
        self.on_message(
            now_ms,
            me,
            "0.0.0.0:0".parse().expect("literal"),
            Message::Revocation(crl),
            rng,
            &mut out,
        )?;
        Ok(out)
    }

    fn expel_invalid(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let bad: Vec<([u8; 32], String)> = self
            .members
            .iter()
            .filter_map(|(k, m)| {
                self.verify(&m.certificate, now_ms)
                    .err()
                    .map(|e| (*k, e.to_string()))
            })
            .collect();
        for (k, why) in bad {
            self.expel(&k, &why, out);
        }
    }

    /// Periodic work: cut members whose certificates stopped verifying, probe seeds we have not
    /// reached, and ask one member in turn for the members it knows.
    pub fn on_tick(&mut self, now_ms: u64, rng: &mut impl RngCore) -> Vec<Action> {
        let mut out = Vec::new();
        self.expel_invalid(now_ms, &mut out);
        self.reassembly.expire(now_ms);
        let known: Vec<SocketAddr> = self.members.values().map(|m| m.endpoint).collect();
        let mut greet = Vec::new();
        for s in &mut self.seeds {
            let due = s
                .last_probe_ms
                .is_none_or(|t| now_ms >= t + PROBE_INTERVAL_MS);
            let reached = match s.key {
                Some(k) if s.pinned => self.members.contains_key(&k),
                _ => known.contains(&s.addr),
            };
            if reached || !due {
                continue;
            }
            s.last_probe_ms = Some(now_ms);
            match s.key {
                Some(k) if s.pinned => greet.push((k, s.addr)),
                _ => {
                    rng.fill_bytes(&mut s.nonce);
                    out.push(Action::Send {
                        to: s.addr,
                        datagram: control::encode_probe(&s.nonce),
                    });
                }
            }
        }
        for (key, addr) in greet {
            // Its Hello in answer admits it, and is answered with a request for its members.
            let hello = self.hello(false);
            self.send(&key, addr, &hello, rng, &mut out);
        }
        if now_ms >= self.next_gossip_ms && !self.members.is_empty() {
            self.next_gossip_ms = now_ms + GOSSIP_INTERVAL_MS;
            self.gossip_turn = (self.gossip_turn + 1) % self.members.len();
            let (key, ep) = self
                .members
                .iter()
                .nth(self.gossip_turn)
                .map(|(k, m)| (*k, m.endpoint))
                .expect("index in range");
            let hello = self.hello(true);
            self.send(&key, ep, &hello, rng, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests;
