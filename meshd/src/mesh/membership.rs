//! Membership: who our peers are, learned from seeds and from peers over the control protocol
//! (`proto::control`), and kept only while their certificates verify. One part of the pure
//! [`super::node::Node`]: time comes in as an argument, randomness through `RngCore`, and every
//! effect goes out as an [`Out`].
//!
//! What holds here, whatever arrives:
//! - For one identity only the newest certificate (by `not_before`, then serial) is a member; an
//!   older one is refused, also after the newer one left.
//! - No two members hold overlapping overlay addresses, and none holds one of ours: the first
//!   stays, a later claim is refused.
//! - Revocation lists are kept per CA, newest number wins, and are passed to every member whose
//!   Hello shows an older one, so a node that missed a list gets it at its next Hello.
//! - Every sealed message's counters pass the sender's replay window, which survives a restart
//!   as a floor (see [`Membership::floors`]).

use super::workloads::WorkloadBook;
use proto::cert::{CertError, Certificate, RevocationList};
use proto::control::{self, CrlVersion, Datagram, Member, Message, ReplayWindow};
use proto::limiter::{source_of, SourceLimiter};
use proto::relay::{Endpoint, Tag};
use proto::segment::Reassembly;
use proto::trust::{Federation, Signature, Trust};
use proto::Cidr;
use rand_core::RngCore;
use std::collections::VecDeque;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use x25519_dalek::StaticSecret;

/// How often an unanswered seed is probed again.
pub const PROBE_INTERVAL_MS: u64 = 1000;
/// How often we ask one member (in turn) for the members it knows.
pub const GOSSIP_INTERVAL_MS: u64 = 3000;
/// While asking brings new members (the mesh is forming or growing), the next member is asked
/// this soon instead; an answer that brings nobody new restores [`GOSSIP_INTERVAL_MS`], so a
/// mesh at rest, or one whose views differ for good (two claims of one address), is not asked
/// faster.
const GOSSIP_HURRIED_MS: u64 = 500;
/// A member learned from a list or from the state directory that has not spoken yet is greeted
/// again (its greeting or its answer may have been lost, or it was over its budget for senders
/// at unknown addresses while a whole mesh started): every [`GREET_RETRY_MS`] for the first
/// [`FAST_GREETINGS`] times, then after a wait that doubles up to [`GREET_RETRY_MAX_MS`].
const GREET_RETRY_MS: u64 = 1000;
const FAST_GREETINGS: u32 = 8;
const GREET_RETRY_MAX_MS: u64 = 30_000;
/// After this many greetings (about 40 s) an unheard member is left to gossip: an endpoint a
/// member listed may be stale or a victim's, and is not greeted for ever.
const MAX_GREETINGS: u32 = 12;
/// Greetings sent per tick at most, whatever the lists brought.
const GREETINGS_PER_TICK: usize = 256;
/// A Hello showing newer revocation lists than ours is answered at most this often per member
/// (the answer brings the lists; a list that never verifies here must not make two nodes
/// exchange Hellos without end).
const BEHIND_ANSWER_INTERVAL_MS: u64 = 5_000;
/// A greeting (a Hello without `want_members`) from a member is answered with our Hello when we
/// sealed nothing to that member for this long: the greeter (restarted, or it learned us from a
/// list) then hears us and stops greeting. An answer is never answered (we sealed to the member
/// just before), so Hellos do not ping-pong.
const GREETING_ANSWER_AFTER_MS: u64 = 60_000;
/// A member heard at its own address within this long keeps that path: the same member's
/// messages through a relay (a greeting sent both ways) do not move it onto the longer one.
const DIRECT_PREFERRED_MS: u64 = 10_000;
/// A member reached through a relay is greeted at its own address and through every relay this
/// often, so its path follows what answers.
const RELAYED_RECHECK_MS: u64 = 30_000;
/// A sender whose certificate is revoked is sent the list at most this often.
const REVOKED_TELL_MS: u64 = 30_000;
/// This node's workload list goes to every member at most this often; changes in between are
/// sent together.
const ANNOUNCE_GAP_MS: u64 = 500;
/// A request to the workload issuer that has gone unanswered this long sends the next one to
/// the issuer's next address (`[issuer] endpoints`): it may have moved to another host.
const ISSUER_FAILOVER_MS: u64 = 1_000;
/// A member's Hello is answered with this node's workload list at most this often.
const WORKLOADS_ANSWER_MS: u64 = 5_000;
/// This node's workload list goes to a member that does not say it took it this many times at
/// most (about a minute); its next Hello starts again.
const WORKLOADS_SENDS: u32 = 35;
/// This node's workload list, encoded, is at most this large: one message (with its type and
/// count) that every receiver decodes.
const MAX_WORKLOADS_BYTES: usize = 64_000;

/// When to greet an unheard member again after `greetings` greetings.
fn greet_wait_ms(greetings: u32) -> u64 {
    match greetings.checked_sub(FAST_GREETINGS) {
        None => GREET_RETRY_MS,
        Some(over) => (GREET_RETRY_MS << (over + 1).min(5)).min(GREET_RETRY_MAX_MS),
    }
}
/// Members per `Members` message at most.
const MEMBERS_PER_MESSAGE: usize = 32;
/// A `Members` message is at most this large unless one certificate alone is larger: one
/// datagram, so a list arrives member batch by member batch, a lost datagram costs only its own
/// few members, and nothing waits in reassembly (whose room is bounded per sender).
const MEMBERS_BYTES_PER_MESSAGE: usize = proto::segment::SEGMENT_PAYLOAD_BYTES;
/// Our counters follow the clock at this many per millisecond (and by one per datagram within a
/// millisecond), so a receiver can bound, after its own restart, the counters we used before.
pub const COUNTER_PER_MS: u64 = 1_000_000;
/// Diffie-Hellman operations per second (and burst) spent on senders whose address is not a
/// member's (joining nodes, roamed members): a flood cannot take more of the control plane.
const UNKNOWN_DH_PER_SEC: u32 = 500;
/// Sealed datagrams per second (and burst) taken from one authenticated sender.
const SENDER_PER_SEC: u32 = 1_000;
const SENDER_BURST: u32 = 2_000;
/// Cookie and probe replies per second, in all and per source address.
const REPLIES_PER_SEC: u32 = 2_000;
const REPLIES_PER_SOURCE_PER_SEC: u32 = 10;
/// The cookie secret changes this often; cookies of the previous one still count.
const COOKIE_ROTATION_MS: u64 = 120_000;
/// Addresses we keep cookies for, and our last datagrams to, at most.
const MAX_COOKIE_PEERS: usize = 1024;
/// Our last datagrams to one address, kept to repeat one a cookie reply asks for.
const SENT_PER_PEER: usize = 8;
/// Keys in each per-sender or per-source table, at most.
const MAX_LIMITED: usize = 4096;

/// A restarted node lets a sender's counters lag the floor it extrapolated by this share of the
/// time since it last heard the sender (clocks run at slightly different rates).
const FLOOR_SLACK_PER_MILLE: u64 = 1;

/// `list` in batches of at most [`MEMBERS_PER_MESSAGE`] members and, unless one member alone is
/// larger, [`MEMBERS_BYTES_PER_MESSAGE`] encoded bytes.
pub(super) fn member_batches(list: Vec<Member>) -> Vec<Vec<Member>> {
    let mut batches: Vec<Vec<Member>> = Vec::new();
    let mut bytes = 0;
    for m in list {
        let size = m.encoded_len();
        let full = batches.last().is_none_or(|b| {
            b.len() >= MEMBERS_PER_MESSAGE || bytes + size > MEMBERS_BYTES_PER_MESSAGE
        });
        if full {
            batches.push(Vec::new());
            bytes = control::MEMBERS_HEADER_LEN;
        }
        bytes += size;
        batches.last_mut().expect("pushed above").push(m);
    }
    batches
}

/// What membership asks of the node.
// Made and consumed at once on the control path; boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Send {
        to: Endpoint,
        datagram: Vec<u8>,
    },
    /// A policy-transfer message from an authenticated member, for the node's policy sync.
    Policy {
        from: [u8; 32],
        msg: Message,
    },
    /// A gateway probe or answer from an authenticated member, for the node's gateways.
    Gateway {
        from: [u8; 32],
        msg: Message,
    },
    /// A flow query or answer from an authenticated member, for the node's flow queries.
    Flows {
        from: [u8; 32],
        msg: Message,
    },
    /// An answer of the workload issuer (sealed by the issuer's configured key).
    Issued(Message),
}

/// Why an incoming control datagram, or a certificate in one, was not acted on.
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
    #[error("an older certificate of {identity}, whose newer one (serial {newest}) is known")]
    Superseded { identity: String, newest: u64 },
    #[error("{identity} claims {addr}, which {holder} holds")]
    AddressConflict {
        identity: String,
        addr: Cidr,
        holder: String,
    },
    #[error("{identity} is a workload certificate and holds {addr}, not one host address")]
    WorkloadRange { identity: String, addr: Cidr },
    #[error("more workload certificates than one announcement carries (128, 64,000 bytes)")]
    TooManyWorkloads,
    #[error("a message only the workload issuer sends or takes")]
    NotFromMembers,
    #[error("the workload issuer's key, but not at an address listed for it ([issuer] endpoints)")]
    IssuerElsewhere,
    #[error(
        "{identity} is a workload certificate (its CA is in trust.workload_cas), not a node's"
    )]
    WorkloadAsMember { identity: String },
    #[error("{identity} is not from a workload CA (trust.workload_cas)")]
    NotAWorkload { identity: String },
    #[error("{identity} is a workload certificate without an address")]
    WorkloadWithoutAddress { identity: String },
    #[error("no workload issuer is configured ([issuer] in the configuration)")]
    NoIssuer,
    #[error("policy set refused: {0}")]
    Policy(String),
    #[error("flow query refused: {0}")]
    FlowQuery(String),
    #[error("from an address that has not shown it receives there (no valid cookie), and no reply budget left")]
    CookieRequired,
    #[error("over the budget for senders at unknown addresses")]
    Busy,
    #[error("over the sender's rate")]
    SenderRate,
    #[error("a cookie reply that echoes nothing we sent")]
    UnexpectedCookie,
}

impl Refusal {
    /// A short name of the reason, for counters (`meshctl status`).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Certificate(CertError::OutOfScope { .. }) => "out_of_scope",
            Refusal::Certificate(CertError::UntrustedTrustDomain { .. }) => {
                "untrusted_trust_domain"
            }
            Refusal::Certificate(_) => "certificate",
            Refusal::KeyMismatch => "key_mismatch",
            Refusal::UnknownSender => "unknown_sender",
            Refusal::Replay => "replay",
            Refusal::UnexpectedReply => "unexpected_reply",
            Refusal::UntrustedRevocation => "untrusted_revocation",
            Refusal::Removed => "removed",
            Refusal::ProbeIgnored => "probe_ignored",
            Refusal::Superseded { .. } => "superseded",
            Refusal::AddressConflict { .. } => "address_conflict",
            Refusal::WorkloadRange { .. } => "workload_range",
            Refusal::TooManyWorkloads => "too_many_workloads",
            Refusal::NotFromMembers => "not_from_members",
            Refusal::IssuerElsewhere => "issuer_elsewhere",
            Refusal::WorkloadAsMember { .. } => "workload_as_member",
            Refusal::NotAWorkload { .. } => "not_a_workload",
            Refusal::WorkloadWithoutAddress { .. } => "workload_without_address",
            Refusal::NoIssuer => "no_issuer",
            Refusal::Policy(_) => "policy",
            Refusal::FlowQuery(_) => "flow_query",
            Refusal::CookieRequired => "cookie_required",
            Refusal::Busy => "busy",
            Refusal::SenderRate => "sender_rate",
            Refusal::UnexpectedCookie => "unexpected_cookie",
        }
    }
}

/// Where a message came from (the sender's endpoint, now), and whether it moved the sender there.
struct Arrival {
    from: Endpoint,
    moved: bool,
}

/// What the control plane spent and refused, for `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ControlCounters {
    /// X25519 operations spent on received datagrams.
    pub dh_ops: u64,
    /// Cookie replies sent to unknown addresses.
    pub cookie_replies: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    pub certificate: Certificate,
    /// Where it is reached now: its own address, or through a relay (PROTOCOL.md §9).
    pub endpoint: Endpoint,
    /// Its own underlay address as last known: what member lists and the state directory carry
    /// (none for a member only ever heard through a relay, which they then leave out).
    pub address: Option<SocketAddr>,
    pub last_heard_ms: Option<u64>,
    /// When it was last heard at its own address.
    pub direct_heard_ms: Option<u64>,
}

/// A sender's replay window and when we last took a counter from it.
#[derive(Debug, Clone, Default)]
struct Replay {
    window: ReplayWindow,
    heard_ms: u64,
}

/// What a node saves of a sender's counters so that, after a restart, it refuses datagrams
/// captured before it: the newest counter taken and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Floor {
    #[serde(with = "key_b64")]
    pub sender: [u8; 32],
    pub counter: u64,
    pub heard_ms: u64,
}

mod key_b64 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&proto::Key(*k).to_base64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        proto::Key::from_base64(&text)
            .map(|k| k.0)
            .map_err(serde::de::Error::custom)
    }
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

/// What changed since the node last looked, so it knows what to save and re-derive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dirty {
    pub members: bool,
    /// A member was cut or replaced: saved at once, so that a restart never brings it back.
    pub members_removed: bool,
    pub revocations: bool,
    pub floors: bool,
}

pub struct Membership {
    secret: StaticSecret,
    public: [u8; 32],
    certificate: Certificate,
    /// The CAs trusted, and for what: this trust domain's from the bundle, and the federations
    /// of the policy set in force.
    trust: Trust,
    /// The newest revocation list of each CA, by the CA's key.
    revocations: BTreeMap<[u8; 32], RevocationList>,
    members: BTreeMap<[u8; 32], MemberState>,
    /// For each identity, (not_before, serial) of the newest certificate admitted: an older one
    /// is refused from then on.
    newest: HashMap<String, (u64, u64)>,
    /// The member holding each identity, and the members' addresses as intervals
    /// ([`Cidr::span`]) by (family, first address): members never overlap, so a new claim is
    /// checked against its neighbours, not against every member.
    holders: HashMap<String, [u8; 32]>,
    claims: BTreeMap<(u8, u128), (u128, [u8; 32])>,
    seeds: Vec<Seed>,
    replay: HashMap<[u8; 32], Replay>,
    /// Messages arriving in segments (bounded in count, size and time).
    reassembly: Reassembly,
    /// Counter of our last sealed datagram; see [`COUNTER_PER_MS`].
    counter: u64,
    next_gossip_ms: u64,
    next_recheck_ms: u64,
    last_gossip_ms: u64,
    gossip_turn: usize,
    /// Members not heard from since they were admitted: when to greet each again, and how often
    /// it was greeted.
    unheard: BTreeMap<[u8; 32], (u64, u32)>,
    /// When we last sealed a message to each member.
    sealed_to: HashMap<[u8; 32], u64>,
    /// Keys the operator removed; refused until the daemon restarts.
    removed: HashSet<[u8; 32]>,
    answer_probes: bool,
    pub dirty: Dirty,
    /// Members cut since the node last looked, with the reason.
    expelled: Vec<([u8; 32], String)>,
    /// Keys whose member entry was added, changed or removed since the node last looked.
    touched: BTreeSet<[u8; 32]>,
    /// Each member's static agreement ([`control::Pair`]: the pair key of the MAC and the
    /// static-static Diffie-Hellman) and the member at each endpoint: a datagram from a member's
    /// address is checked with one MAC before any Diffie-Hellman, and sealing to a member or
    /// opening from one costs one Diffie-Hellman, not two.
    pairs: HashMap<[u8; 32], control::Pair>,
    by_endpoint: HashMap<Endpoint, [u8; 32]>,
    /// Our ephemeral key for each receiver, until it expires ([`control::EPHEMERAL_LIFETIME_MS`]),
    /// and each member's last ephemeral agreement: a message to or from a member costs no
    /// Diffie-Hellman while its ephemeral key lasts.
    ephemerals: HashMap<[u8; 32], (control::Ephemeral, u64)>,
    received: HashMap<[u8; 32], control::EphemeralAgreement>,
    cookie_secret: [u8; 32],
    previous_cookie_secret: [u8; 32],
    next_rotation_ms: u64,
    /// Cookies others gave us, by their address; our last datagrams to each address.
    cookies: HashMap<Endpoint, [u8; control::COOKIE_LEN]>,
    sent: HashMap<Endpoint, VecDeque<Vec<u8>>>,
    /// The members this node asks to relay to members it has not heard from at their own
    /// address (`[relay] via`).
    relays: Vec<[u8; 32]>,
    /// When each revoked sender was last sent its revocation list, and what waits to be sent.
    told_revoked: HashMap<[u8; 32], u64>,
    deferred: Vec<Out>,
    unknown_dh: SourceLimiter<()>,
    per_sender: SourceLimiter<[u8; 32]>,
    replies: SourceLimiter<()>,
    /// By source address, and by tag for a sender through a relay (a relay passes on only its
    /// members' tags, so these are few).
    replies_per_source: SourceLimiter<(std::net::IpAddr, Option<Tag>)>,
    pub counters: ControlCounters,
    /// This node's own workloads in force changed (a newer certificate elsewhere took one's
    /// address) since the node last looked.
    pub own_workloads_changed: bool,
    /// Certificates in members' lists that were refused, by [`Refusal::kind`].
    pub listed_refused: BTreeMap<&'static str, u64>,
    /// Messages that authenticated and passed the replay window, by [`Message::kind`].
    pub received_kinds: BTreeMap<&'static str, u64>,
    digest_cache: std::cell::Cell<Option<[u8; 32]>>,
    /// The workload certificates in force: members' and this node's own (`workloads.rs`).
    workloads: WorkloadBook,
    /// The version of this node's workload list: it follows the clock like the counters (in
    /// [`COUNTER_PER_MS`]), so a list set after a restart is newer than every list before.
    own_version: u64,
    /// The members that have not said they took this node's list: when to send it again, and
    /// how often it was sent.
    workloads_unacked: HashMap<[u8; 32], (u64, u32)>,
    /// When this node last sent its workload list to each member.
    workloads_sent: HashMap<[u8; 32], u64>,
    /// The list changed since it was last announced to every member, and when that was.
    announce_pending: bool,
    last_announce_ms: Option<u64>,
    /// Workload certificates in members' announcements that were not taken, by
    /// [`Refusal::kind`].
    pub workloads_refused: BTreeMap<&'static str, u64>,
    /// The workload issuer (`[issuer]`).
    issuer: Option<IssuerLink>,
    /// The CAs whose certificates are workloads' (`[trust] workload_cas`): only in workload
    /// lists, never a member's own certificate.
    workload_cas: HashSet<[u8; 32]>,
}

/// The workload issuer: our agreement with its key, and the addresses it may listen at, asked
/// in turn while it does not answer; the one that last answered is kept.
#[derive(Debug)]
struct IssuerLink {
    pair: control::Pair,
    at: Vec<std::net::SocketAddr>,
    current: usize,
    /// When a request went unanswered first, since the last answer.
    unanswered_since_ms: Option<u64>,
}

impl IssuerLink {
    fn is_at(&self, from: Endpoint) -> bool {
        matches!(from, Endpoint::Direct(a) if self.at.contains(&a))
    }

    /// Where to send a request now: the next address once one has gone unanswered for
    /// [`ISSUER_FAILOVER_MS`].
    fn next(&mut self, now_ms: u64) -> Endpoint {
        match self.unanswered_since_ms {
            Some(t) if now_ms >= t + ISSUER_FAILOVER_MS => {
                self.current = (self.current + 1) % self.at.len();
                self.unanswered_since_ms = Some(now_ms);
            }
            Some(_) => {}
            None => self.unanswered_since_ms = Some(now_ms),
        }
        Endpoint::Direct(self.at[self.current])
    }

    /// It answered from `from`: asked there from now on.
    fn answered(&mut self, from: Endpoint) {
        if let Endpoint::Direct(a) = from {
            if let Some(i) = self.at.iter().position(|x| *x == a) {
                self.current = i;
            }
        }
        self.unanswered_since_ms = None;
    }
}

impl Membership {
    pub fn new(
        secret: StaticSecret,
        certificate: Certificate,
        bundle: Vec<Certificate>,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Membership {
        let public = *x25519_dalek::PublicKey::from(&secret).as_bytes();
        let mut cookie_secret = [0u8; 32];
        rng.fill_bytes(&mut cookie_secret);
        Membership {
            pairs: HashMap::new(),
            by_endpoint: HashMap::new(),
            ephemerals: HashMap::new(),
            received: HashMap::new(),
            cookie_secret,
            previous_cookie_secret: cookie_secret,
            next_rotation_ms: now_ms + COOKIE_ROTATION_MS,
            cookies: HashMap::new(),
            sent: HashMap::new(),
            relays: Vec::new(),
            told_revoked: HashMap::new(),
            deferred: Vec::new(),
            unknown_dh: SourceLimiter::new(UNKNOWN_DH_PER_SEC, UNKNOWN_DH_PER_SEC, 1),
            per_sender: SourceLimiter::new(SENDER_PER_SEC, SENDER_BURST, MAX_LIMITED),
            replies: SourceLimiter::new(REPLIES_PER_SEC, REPLIES_PER_SEC, 1),
            replies_per_source: SourceLimiter::new(
                REPLIES_PER_SOURCE_PER_SEC,
                2 * REPLIES_PER_SOURCE_PER_SEC,
                MAX_LIMITED,
            ),
            counters: ControlCounters::default(),
            own_workloads_changed: false,
            listed_refused: BTreeMap::new(),
            received_kinds: BTreeMap::new(),
            digest_cache: std::cell::Cell::new(None),
            workloads: WorkloadBook::default(),
            own_version: 0,
            workloads_unacked: HashMap::new(),
            announce_pending: false,
            last_announce_ms: None,
            workloads_sent: HashMap::new(),
            workloads_refused: BTreeMap::new(),
            issuer: None,
            workload_cas: HashSet::new(),
            secret,
            public,
            trust: trust_of(&certificate, bundle),
            certificate,
            revocations: BTreeMap::new(),
            members: BTreeMap::new(),
            newest: HashMap::new(),
            holders: HashMap::new(),
            claims: BTreeMap::new(),
            seeds: Vec::new(),
            replay: HashMap::new(),
            reassembly: Reassembly::default(),
            counter: now_ms.saturating_mul(COUNTER_PER_MS),
            next_gossip_ms: now_ms,
            next_recheck_ms: now_ms + RELAYED_RECHECK_MS,
            last_gossip_ms: now_ms,
            gossip_turn: 0,
            unheard: BTreeMap::new(),
            sealed_to: HashMap::new(),
            removed: Default::default(),
            answer_probes: true,
            dirty: Dirty::default(),
            expelled: Vec::new(),
            touched: BTreeSet::new(),
        }
    }

    pub fn members(&self) -> &BTreeMap<[u8; 32], MemberState> {
        &self.members
    }

    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// The workload certificates in force bound to `key` (this node's own with its own key).
    pub fn workloads_of(&self, key: &[u8; 32]) -> &[Certificate] {
        self.workloads.of(key)
    }

    /// The identity of member `key`, or of this node.
    fn identity_of(&self, key: &[u8; 32]) -> String {
        match self.members.get(key) {
            Some(m) => m.certificate.body.identity(),
            None if *key == self.public => {
                format!("{} (this node)", self.certificate.body.identity())
            }
            None => proto::Key(*key).to_string(),
        }
    }

    /// Takes `certificates` as the workload certificates this node holds now, in place of those
    /// before, and sends the list to every member, again until each says it took it. Returns the
    /// actions and the certificates not taken, with the reason: not bound to this node's key,
    /// not valid, holding a member's address or one a newer certificate holds, or beyond what
    /// one announcement carries.
    pub fn set_workloads(
        &mut self,
        certificates: Vec<Certificate>,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> (Vec<Out>, Vec<(String, Refusal)>) {
        let mut refused = Vec::new();
        let mut valid = Vec::new();
        let mut bytes = 2;
        for c in certificates {
            let identity = c.body.identity();
            let size = 2 + c.encode().len();
            if c.body.public_key != self.public {
                refused.push((identity, Refusal::KeyMismatch));
            } else if !self.workload_cas.contains(&c.body.issuer) {
                refused.push((identity.clone(), Refusal::NotAWorkload { identity }));
            } else if let Err(e) = self.verify(&c, now_ms) {
                refused.push((identity, Refusal::Certificate(e)));
            } else if valid.len() >= control::MAX_WORKLOADS || bytes + size > MAX_WORKLOADS_BYTES {
                refused.push((identity, Refusal::TooManyWorkloads));
            } else {
                bytes += size;
                valid.push(c);
            }
        }
        self.own_version = now_ms
            .saturating_mul(COUNTER_PER_MS)
            .max(self.own_version + 1);
        let taken = self.take_workloads(self.public, self.own_version, valid);
        refused.extend(taken);
        self.announce_pending = true;
        let mut out = Vec::new();
        self.announce(now_ms, false, rng, &mut out);
        (out, refused)
    }

    /// Sends this node's workload list to every member if it changed since the last
    /// announcement, and that was at least [`ANNOUNCE_GAP_MS`] ago (or on a tick); else the next
    /// tick does. Many changes in a burst (a hundred pods starting) go out as a few lists, not
    /// one each.
    fn announce(&mut self, now_ms: u64, tick: bool, rng: &mut impl RngCore, out: &mut Vec<Out>) {
        let due = tick
            || self
                .last_announce_ms
                .is_none_or(|t| now_ms >= t + ANNOUNCE_GAP_MS);
        if !self.announce_pending || !due {
            return;
        }
        self.announce_pending = false;
        self.last_announce_ms = Some(now_ms);
        // A new version starts its resending afresh for every member.
        self.workloads_unacked.clear();
        let keys: Vec<[u8; 32]> = self.members.keys().copied().collect();
        for k in keys {
            self.send_workloads(&k, now_ms, rng, out);
        }
    }

    /// Takes member (or this node) `key`'s announced workload certificates, verified and bound
    /// to it; marks what changed and counts what was refused, which it returns.
    fn take_workloads(
        &mut self,
        key: [u8; 32],
        counter: u64,
        certificates: Vec<Certificate>,
    ) -> Vec<(String, Refusal)> {
        let mine = &self.certificate.body;
        let (claims, members) = (&self.claims, &self.members);
        let taken = self.workloads.announce(key, counter, certificates, |a| {
            if overlaps_any(a, &mine.addrs) {
                return Some(format!("{} (this node)", mine.identity()));
            }
            claimants_in(claims, a)
                .next()
                .map(|k| members[&k].certificate.body.identity())
        });
        if !taken.changed.is_empty() {
            self.dirty.members = true;
            let me = self.public;
            self.touched
                .extend(taken.changed.iter().filter(|k| **k != me));
            self.own_workloads_changed |= taken.changed.contains(&me);
        }
        for e in &taken.refused {
            *self.workloads_refused.entry(e.kind()).or_default() += 1;
        }
        let who = self.identity_of(&key);
        taken
            .refused
            .into_iter()
            .map(|e| (who.clone(), e))
            .collect()
    }

    /// Sends this node's workload list to member `key`, and again (every 0.5 s, after 10 times
    /// every 2 s, at most [`WORKLOADS_SENDS`] times) until the member says it took it.
    fn send_workloads(
        &mut self,
        key: &[u8; 32],
        now_ms: u64,
        rng: &mut impl RngCore,
        out: &mut Vec<Out>,
    ) {
        let Some(ep) = self.members.get(key).map(|m| m.endpoint) else {
            return;
        };
        let sends = self.workloads_unacked.get(key).map_or(0, |(_, n)| *n) + 1;
        if sends > WORKLOADS_SENDS {
            self.workloads_unacked.remove(key);
            return;
        }
        let wait = if sends < 10 { 500 } else { 2_000 };
        self.workloads_unacked.insert(*key, (now_ms + wait, sends));
        let msg = Message::Workloads {
            version: self.own_version,
            certificates: self.workloads.of(&self.public).to_vec(),
        };
        self.workloads_sent.insert(*key, now_ms);
        self.send(key, ep, &msg, now_ms, rng, out);
    }

    pub fn revocations(&self) -> impl Iterator<Item = &RevocationList> {
        self.revocations.values()
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
    /// verifies and it conflicts with nobody.
    pub fn restore(&mut self, certificate: Certificate, endpoint: SocketAddr, now_ms: u64) {
        let endpoint = Endpoint::Direct(endpoint);
        let key = certificate.body.public_key;
        if key != self.public {
            if let Err(e) = self
                .verify(&certificate, now_ms)
                .map_err(Refusal::Certificate)
                .and_then(|()| self.admit(certificate, endpoint, None, None))
            {
                tracing::info!(refusal = %e, "saved member not restored");
            } else {
                // Greeted at the first tick: it learns where we are now, and we that it is there.
                self.unheard.insert(key, (now_ms, 0));
            }
        }
    }

    /// The replay windows to save: for each sender, the newest counter taken and when.
    pub fn floors(&self) -> Vec<Floor> {
        let mut v: Vec<Floor> = self
            .replay
            .iter()
            .filter_map(|(k, r)| {
                r.window.newest().map(|counter| Floor {
                    sender: *k,
                    counter,
                    heard_ms: r.heard_ms,
                })
            })
            .collect();
        v.sort_by_key(|f| f.sender);
        v
    }

    /// Takes saved floors after a restart at `now_ms`: a sender's counters follow its clock
    /// ([`COUNTER_PER_MS`]), so anything it sent before this node went down is below its newest
    /// saved counter plus the time since, in counter units. Datagrams captured before the restart
    /// are refused; the sender's new ones are above.
    pub fn restore_floors(&mut self, floors: &[Floor], now_ms: u64) {
        for f in floors {
            let gap = now_ms.saturating_sub(f.heard_ms);
            let credited = gap - gap * FLOOR_SLACK_PER_MILLE / 1000;
            // Never above our clock (or the saved counter): a sender's new counters follow its
            // clock, and a floor from a wrong `heard_ms` must not lock it out for good.
            let floor = f
                .counter
                .saturating_add(credited.saturating_mul(COUNTER_PER_MS))
                .min(f.counter.max(now_ms.saturating_mul(COUNTER_PER_MS)));
            self.replay.insert(
                f.sender,
                Replay {
                    window: ReplayWindow::above(floor),
                    heard_ms: now_ms,
                },
            );
        }
    }

    /// Takes a revocation list saved earlier or named in the configuration, if it verifies and is
    /// newer than the one held; true if taken.
    pub fn take_revocation(&mut self, crl: RevocationList) -> Result<bool, Refusal> {
        let ca = self
            .trust
            .ca(&crl.issuer)
            .ok_or(Refusal::UntrustedRevocation)?;
        // A list no newer than ours changes nothing, whatever its signature: not worth checking
        // (every member passes a new list on, so most copies a node gets are repeats).
        if self
            .revocations
            .get(&crl.issuer)
            .is_some_and(|cur| cur.number >= crl.number)
        {
            return Ok(false);
        }
        crl.verify(ca).map_err(Refusal::Certificate)?;
        self.revocations.insert(crl.issuer, crl);
        self.dirty.revocations = true;
        Ok(true)
    }

    /// Checks a certificate against the bundle (whose CA signatures were checked when it was
    /// taken) and the revocation lists. A member's own certificate, byte for byte, is not checked
    /// for its signature again: that held at admission, and a new list or bundle checks every
    /// member again ([`Membership::expel_invalid`]).
    fn verify(&self, cert: &Certificate, now_ms: u64) -> Result<(), proto::cert::CertError> {
        let crl = self.revocations.get(&cert.body.issuer);
        let known = self
            .members
            .get(&cert.body.public_key)
            .is_some_and(|m| m.certificate == *cert);
        let signature = if known {
            Signature::Known
        } else {
            Signature::Verify
        };
        self.trust.check(cert, now_ms / 1000, crl, signature)
    }

    /// Queues the revocation list that revokes `cert` for its holder at `from` (a message to a
    /// sender that opened, so it is that holder's), at most once per [`REVOKED_TELL_MS`] per
    /// holder; the node sends it with its next actions ([`Membership::take_deferred`]).
    fn tell_revoked(
        &mut self,
        cert: &Certificate,
        from: Endpoint,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) {
        let key = cert.body.public_key;
        if self
            .told_revoked
            .get(&key)
            .is_some_and(|t| now_ms < t + REVOKED_TELL_MS)
        {
            return;
        }
        if self.told_revoked.len() >= MAX_LIMITED {
            self.told_revoked.clear();
        }
        self.told_revoked.insert(key, now_ms);
        let Some(crl) = self.revocations.get(&cert.body.issuer).cloned() else {
            return;
        };
        let mut out = Vec::new();
        self.send(&key, from, &Message::Revocation(crl), now_ms, rng, &mut out);
        self.deferred.extend(out);
    }

    /// Datagrams queued while handling one that was refused (see [`Membership::tell_revoked`]).
    pub fn take_deferred(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.deferred)
    }

    /// Why members would refuse this node's own certificate now (expired, revoked by a list this
    /// node holds, its CA no longer trusted), if they would.
    pub fn own_problem(&self, now_ms: u64) -> Option<String> {
        let crl = self.revocations.get(&self.certificate.body.issuer);
        self.trust
            .check(&self.certificate, now_ms / 1000, crl, Signature::Verify)
            .err()
            .map(|e| e.to_string())
    }

    /// Our agreement with `peer`: the member's, kept, or made now.
    fn pair(&self, peer: &[u8; 32]) -> Option<std::borrow::Cow<'_, control::Pair>> {
        match self.pairs.get(peer) {
            Some(p) => Some(std::borrow::Cow::Borrowed(p)),
            None => control::Pair::with_public(&self.secret, &self.public, peer)
                .ok()
                .map(std::borrow::Cow::Owned),
        }
    }

    /// `msg` sealed for `to`, as datagrams small enough never to be fragmented (one, unless the
    /// message is large); none if it exceeds the largest message.
    fn seal(
        &mut self,
        to: &[u8; 32],
        msg: &Message,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Vec<Vec<u8>> {
        let first = (self.counter + 1).max(now_ms.saturating_mul(COUNTER_PER_MS));
        let fresh = self
            .ephemerals
            .get(to)
            .is_some_and(|(_, expires)| now_ms < *expires);
        if !fresh {
            let mut e = [0u8; 32];
            rng.fill_bytes(&mut e);
            match control::Ephemeral::new(&StaticSecret::from(e), to) {
                Ok(eph) => {
                    let expires = now_ms + control::EPHEMERAL_LIFETIME_MS;
                    self.ephemerals.insert(*to, (eph, expires));
                }
                Err(_) => return Vec::new(), // a low-order key: nothing can be sealed to it
            }
        }
        let Some(pair) = self.pair(to) else {
            return Vec::new();
        };
        let (eph, _) = &self.ephemerals[to];
        match control::seal_message_with(&pair, eph, first, &msg.encode()) {
            Ok(datagrams) => {
                self.counter = first + datagrams.len() as u64 - 1;
                datagrams
            }
            Err(_) => Vec::new(),
        }
    }

    fn send(
        &mut self,
        to_key: &[u8; 32],
        to: Endpoint,
        msg: &Message,
        now_ms: u64,
        rng: &mut impl RngCore,
        out: &mut Vec<Out>,
    ) {
        let cookie = self.cookies.get(&to).copied();
        if self.members.contains_key(to_key) {
            self.sealed_to.insert(*to_key, now_ms);
        }
        for mut datagram in self.seal(to_key, msg, now_ms, rng) {
            if let Some(c) = &cookie {
                control::set_cookie(&mut datagram, c);
            }
            self.remember(to, &datagram);
            out.push(Out::Send { to, datagram });
        }
    }

    /// Keeps our last datagrams to `to`, to repeat one with a cookie if `to` asks for it.
    fn remember(&mut self, to: Endpoint, datagram: &[u8]) {
        if !self.sent.contains_key(&to) && self.sent.len() >= MAX_COOKIE_PEERS {
            self.sent.clear();
        }
        let q = self.sent.entry(to).or_default();
        if q.len() >= SENT_PER_PEER {
            q.pop_front();
        }
        q.push_back(datagram.to_vec());
    }

    /// Records a member's endpoint and agreement (`pair` if the caller made it, else a
    /// Diffie-Hellman, once per member and key).
    fn index(
        &mut self,
        key: [u8; 32],
        old_endpoint: Option<Endpoint>,
        endpoint: Endpoint,
        pair: Option<control::Pair>,
    ) {
        if let Some(old) = old_endpoint.filter(|o| *o != endpoint) {
            if self.by_endpoint.get(&old) == Some(&key) {
                self.by_endpoint.remove(&old);
            }
        }
        self.by_endpoint.insert(endpoint, key);
        if !self.pairs.contains_key(&key) {
            let made = pair
                .filter(|p| *p.peer() == key)
                .or_else(|| control::Pair::with_public(&self.secret, &self.public, &key).ok());
            if let Some(p) = made {
                self.pairs.insert(key, p);
            }
        }
    }

    fn unindex(&mut self, key: &[u8; 32], endpoint: Endpoint) {
        self.pairs.remove(key);
        self.sealed_to.remove(key);
        self.unheard.remove(key);
        self.ephemerals.remove(key);
        self.received.remove(key);
        if self.by_endpoint.get(&endpoint) == Some(key) {
            self.by_endpoint.remove(&endpoint);
        }
    }

    /// Takes `keys` as the CAs of workload certificates: members whose own certificate is of one
    /// are cut, and workload certificates of any other CA leave force.
    pub fn set_workload_cas(&mut self, keys: Vec<[u8; 32]>) {
        self.workload_cas = keys.into_iter().collect();
        let bad: Vec<([u8; 32], String)> = self
            .members
            .iter()
            .filter(|(_, m)| self.workload_cas.contains(&m.certificate.body.issuer))
            .map(|(k, m)| (*k, m.certificate.body.identity()))
            .collect();
        for (k, identity) in bad {
            self.expel(&k, &format!("{identity} is a workload certificate"));
        }
        let cas = &self.workload_cas;
        let lost = self.workloads.retain(|c| {
            if cas.contains(&c.body.issuer) {
                Ok(())
            } else {
                Err("its CA is no longer a workload CA".into())
            }
        });
        self.workloads_lost(lost);
    }

    /// The workload issuer this node asks for its workloads' certificates: its key and the
    /// addresses it may listen at (at least one).
    pub fn set_issuer(&mut self, issuer: Option<([u8; 32], Vec<std::net::SocketAddr>)>) {
        self.issuer = issuer
            .filter(|(_, at)| !at.is_empty())
            .and_then(|(key, at)| {
                let pair = control::Pair::with_public(&self.secret, &self.public, &key).ok()?;
                Some(IssuerLink {
                    pair,
                    at,
                    current: 0,
                    unanswered_since_ms: None,
                })
            });
    }

    /// Seals `msg` to the workload issuer; false if none is configured.
    pub fn send_to_issuer(
        &mut self,
        msg: &Message,
        now_ms: u64,
        rng: &mut impl RngCore,
        out: &mut Vec<Out>,
    ) -> bool {
        let Some(link) = &mut self.issuer else {
            return false;
        };
        let (key, endpoint) = (*link.pair.peer(), link.next(now_ms));
        self.send(&key, endpoint, msg, now_ms, rng, out);
        true
    }

    /// The members asked to relay (`[relay] via`).
    pub fn set_relays(&mut self, relays: Vec<[u8; 32]>) {
        self.relays = relays;
    }

    /// Greets member `key` (a Hello without `want_members`) where it is reached now and, while
    /// it has not been heard or is reached through a relay, also at its own address and through
    /// each of our relays that we reach directly: the path its answer takes is the one used from
    /// then on, its own address first. A relayed member is greeted so again every
    /// [`RELAYED_RECHECK_MS`], so it returns to its own address when that answers again, and
    /// moves to another relay when its relay stops.
    fn greet(&mut self, key: &[u8; 32], now_ms: u64, rng: &mut impl RngCore, out: &mut Vec<Out>) {
        let Some(m) = self.members.get(key) else {
            return;
        };
        let mut paths = vec![m.endpoint];
        if m.last_heard_ms.is_none() || m.endpoint.is_relayed() {
            if let Some(direct) = m.address.map(Endpoint::Direct) {
                if !paths.contains(&direct) {
                    paths.push(direct);
                }
            }
            let tag = Tag::of(key);
            for r in &self.relays {
                let relay = self.members.get(r).and_then(|rm| rm.endpoint.direct());
                if let (Some(relay), false) = (relay, r == key) {
                    let via = Endpoint::Relayed { relay, tag };
                    if !paths.contains(&via) {
                        paths.push(via);
                    }
                }
            }
        }
        let hello = self.hello(key, false);
        for p in paths {
            self.send(key, p, &hello, now_ms, rng, out);
        }
    }

    /// Seals `msg` for the member `to`, at the endpoint it was last seen at.
    pub fn send_to(
        &mut self,
        to: &[u8; 32],
        msg: &Message,
        now_ms: u64,
        rng: &mut impl RngCore,
        out: &mut Vec<Out>,
    ) {
        if let Some(ep) = self.members.get(to).map(|m| m.endpoint) {
            self.send(to, ep, msg, now_ms, rng, out);
        }
    }

    /// The numbers of the revocation lists we hold, one per CA of our bundle (0: none).
    fn crl_versions(&self) -> Vec<CrlVersion> {
        self.trust
            .cas()
            .take(control::MAX_HELLO_CAS)
            .map(|ca| CrlVersion {
                issuer: ca.body.public_key,
                number: self
                    .revocations
                    .get(&ca.body.public_key)
                    .map_or(0, |l| l.number),
            })
            .collect()
    }

    /// Our Hello to `to`: asking for its members if `want_members`, and for its workload list if
    /// we hold none of it.
    fn hello(&self, to: &[u8; 32], want_members: bool) -> Message {
        Message::Hello {
            certificate: self.certificate.clone(),
            want_members,
            want_workloads: !self.workloads.has_heard(to),
            digest: self.digest(),
            revocations: self.crl_versions(),
        }
    }

    /// The digest of the mesh as this node knows it, itself included; computed once per change
    /// of the member set, not per Hello.
    fn digest(&self) -> [u8; 32] {
        if let Some(d) = self.digest_cache.get() {
            return d;
        }
        let d = control::members_digest(self.members.keys().chain(std::iter::once(&self.public)));
        self.digest_cache.set(Some(d));
        d
    }

    /// Checks a verified certificate against the members without changing anything: refused if
    /// the operator removed its key, if a newer certificate of its identity (or of its key) is
    /// known, or if it claims an address that ours or another identity's names. Returns the keys
    /// of older certificates of the same identity, which it replaces.
    fn admissible(&self, cert: &Certificate) -> Result<Vec<[u8; 32]>, Refusal> {
        let body = &cert.body;
        if self.workload_cas.contains(&body.issuer) {
            return Err(Refusal::WorkloadAsMember {
                identity: body.identity(),
            });
        }
        if self.removed.contains(&body.public_key) {
            return Err(Refusal::Removed);
        }
        let identity = body.identity();
        let current = self
            .members
            .get(&body.public_key)
            .map(|m| &m.certificate.body);
        let newest = self
            .newest
            .get(&identity)
            .copied()
            .into_iter()
            .chain(current.map(|c| (c.not_before, c.serial)))
            .max();
        if let Some((nb, serial)) = newest {
            if (body.not_before, body.serial) < (nb, serial) {
                return Err(Refusal::Superseded {
                    identity,
                    newest: serial,
                });
            }
        }
        let mine = &self.certificate.body;
        if let Some(addr) = body.addrs.iter().find(|a| overlaps_any(a, &mine.addrs)) {
            return Err(Refusal::AddressConflict {
                identity,
                addr: *addr,
                holder: format!("{} (this node)", mine.identity()),
            });
        }
        let key = body.public_key;
        let replaced: Vec<[u8; 32]> = self
            .holders
            .get(&identity)
            .filter(|k| **k != key)
            .copied()
            .into_iter()
            .collect();
        for addr in &body.addrs {
            if let Some(k) = self.workloads.holder(addr) {
                return Err(Refusal::AddressConflict {
                    identity,
                    addr: *addr,
                    holder: format!("a workload of {}", self.identity_of(&k)),
                });
            }
            let holder = self
                .claimants(addr)
                .find(|k| *k != key && !replaced.contains(k));
            if let Some(holder) = holder {
                return Err(Refusal::AddressConflict {
                    identity,
                    addr: *addr,
                    holder: self.members[&holder].certificate.body.identity(),
                });
            }
        }
        Ok(replaced)
    }

    /// Whether any member's address shares an address with `c`.
    pub fn claimed(&self, c: &Cidr) -> bool {
        self.claimants(c).next().is_some() || self.workloads.holder(c).is_some()
    }

    /// The members whose addresses overlap `addr`.
    fn claimants(&self, addr: &Cidr) -> impl Iterator<Item = [u8; 32]> + '_ {
        claimants_in(&self.claims, addr)
    }

    /// Records `cert`'s identity and addresses as `key`'s (`add`) or forgets them.
    fn claim(&mut self, key: [u8; 32], cert: &Certificate, add: bool) {
        let identity = cert.body.identity();
        for a in outermost(&cert.body.addrs) {
            let (family, first, last) = a.span();
            if add {
                self.claims.insert((family, first), (last, key));
            } else if self
                .claims
                .get(&(family, first))
                .is_some_and(|(_, k)| *k == key)
            {
                self.claims.remove(&(family, first));
            }
        }
        if add {
            self.holders.insert(identity, key);
        } else if self.holders.get(&identity) == Some(&key) {
            self.holders.remove(&identity);
        }
    }

    /// Records a certificate that verified, if [`Membership::admissible`]; returns true if its
    /// key is a new member.
    fn admit(
        &mut self,
        cert: Certificate,
        endpoint: Endpoint,
        heard_ms: Option<u64>,
        pair: Option<control::Pair>,
    ) -> Result<bool, Refusal> {
        let replaced = self.admissible(&cert)?;
        for k in replaced {
            self.expel(&k, "replaced by a renewed certificate");
        }
        let key = cert.body.public_key;
        let newest = self.newest.entry(cert.body.identity()).or_insert((0, 0));
        *newest = (*newest).max((cert.body.not_before, cert.body.serial));
        let old_endpoint = self.members.get(&key).map(|m| m.endpoint);
        let direct_heard = heard_ms.filter(|_| !endpoint.is_relayed());
        // Heard through a relay while it was heard at its own address lately: it stays there.
        let endpoint = match (self.members.get(&key), heard_ms) {
            (Some(m), Some(now)) if endpoint.is_relayed() && !m.endpoint.is_relayed() => {
                let recent = m
                    .direct_heard_ms
                    .is_some_and(|t| now < t + DIRECT_PREFERRED_MS);
                if recent {
                    m.endpoint
                } else {
                    endpoint
                }
            }
            _ => endpoint,
        };
        self.index(key, old_endpoint, endpoint, pair);
        let previous = self
            .members
            .get(&key)
            .filter(|m| m.certificate != cert)
            .map(|m| m.certificate.clone());
        if let Some(old) = &previous {
            self.claim(key, old, false);
            self.claim(key, &cert, true);
            self.dirty.members_removed = true; // the older certificate must not come back
        }
        let new = match self.members.get_mut(&key) {
            Some(m) => {
                let renewed = m.certificate != cert;
                if m.endpoint != endpoint || renewed {
                    self.dirty.members = true;
                    self.touched.insert(key);
                }
                m.endpoint = endpoint;
                if let Some(a) = endpoint.direct() {
                    m.address = Some(a);
                }
                m.certificate = cert;
                if heard_ms.is_some() {
                    m.last_heard_ms = heard_ms;
                }
                if direct_heard.is_some() {
                    m.direct_heard_ms = direct_heard;
                }
                false
            }
            None => {
                self.claim(key, &cert, true);
                self.members.insert(
                    key,
                    MemberState {
                        certificate: cert,
                        endpoint,
                        address: endpoint.direct(),
                        last_heard_ms: heard_ms,
                        direct_heard_ms: direct_heard,
                    },
                );
                self.digest_cache.set(None);
                self.dirty.members = true;
                self.touched.insert(key);
                true
            }
        };
        Ok(new)
    }

    fn expel(&mut self, key: &[u8; 32], reason: &str) -> Option<MemberState> {
        let m = self.members.remove(key)?;
        self.claim(*key, &m.certificate, false);
        self.workloads.forget(key);
        self.workloads_sent.remove(key);
        self.workloads_unacked.remove(key);
        self.dirty.members_removed = true;
        self.digest_cache.set(None);
        self.unindex(key, m.endpoint);
        self.dirty.members = true;
        self.touched.insert(*key);
        self.expelled.push((*key, reason.to_string()));
        Some(m)
    }

    /// The keys whose member entry was added, changed or removed since the last call.
    pub fn take_touched(&mut self) -> BTreeSet<[u8; 32]> {
        std::mem::take(&mut self.touched)
    }

    /// The members cut since the last call, with the reason.
    pub fn take_expelled(&mut self) -> Vec<([u8; 32], String)> {
        std::mem::take(&mut self.expelled)
    }

    /// Forgets a member on the operator's request and refuses it from now on (until restart;
    /// to exclude an identity for good, revoke its certificate).
    pub fn forget(&mut self, key: &[u8; 32]) -> Option<MemberState> {
        self.removed.insert(*key);
        self.expel(key, "removed by the operator")
    }

    /// One control datagram from `from`.
    pub fn on_datagram(
        &mut self,
        now_ms: u64,
        from: impl Into<Endpoint>,
        datagram: &[u8],
        rng: &mut impl RngCore,
    ) -> Result<Vec<Out>, Refusal> {
        let from = from.into();
        let mut out = Vec::new();
        match control::decode(datagram)? {
            Datagram::Probe { .. } if !self.answer_probes => return Err(Refusal::ProbeIgnored),
            Datagram::Probe { nonce } => {
                if !self.reply_allowed(from, now_ms) {
                    return Err(Refusal::CookieRequired);
                }
                if let Some(reply) =
                    control::encode_probe_reply(&nonce, &self.certificate, datagram.len())
                {
                    out.push(Out::Send {
                        to: from,
                        datagram: reply,
                    });
                }
            }
            Datagram::ProbeReply { nonce, certificate } => {
                if !self
                    .seeds
                    .iter()
                    .any(|s| Endpoint::Direct(s.addr) == from && s.nonce == nonce)
                {
                    return Err(Refusal::UnexpectedReply);
                }
                self.verify(&certificate, now_ms)
                    .map_err(Refusal::Certificate)?;
                let key = certificate.body.public_key;
                if key == self.public {
                    return Ok(out); // we probed ourselves
                }
                self.admit(certificate, from, None, None)?;
                let hello = self.hello(&key, true);
                self.send(&key, from, &hello, now_ms, rng, &mut out);
            }
            Datagram::ProbeKey { nonce, key } => {
                // The seed's certificate is too large for one datagram: our Hello goes to its key,
                // and its Hello, which carries the certificate, admits it (or nothing does).
                let seed = self
                    .seeds
                    .iter_mut()
                    .find(|s| Endpoint::Direct(s.addr) == from && s.nonce == nonce && !s.pinned)
                    .ok_or(Refusal::UnexpectedReply)?;
                if key != self.public && !self.removed.contains(&key) {
                    seed.key = Some(key);
                    // Its members would be refused until it is one: asked for once it is.
                    let hello = self.hello(&key, false);
                    self.send(&key, from, &hello, now_ms, rng, &mut out);
                }
            }
            Datagram::CookieReply { echo, cookie } => {
                let repeat = self
                    .sent
                    .get(&from)
                    .and_then(|q| q.iter().find(|d| control::mac_of(d) == Some(echo)))
                    .cloned()
                    .ok_or(Refusal::UnexpectedCookie)?;
                if !self.cookies.contains_key(&from) && self.cookies.len() >= MAX_COOKIE_PEERS {
                    self.cookies.clear();
                }
                self.cookies.insert(from, cookie);
                let mut datagram = repeat;
                control::set_cookie(&mut datagram, &cookie);
                out.push(Out::Send { to: from, datagram });
            }
            Datagram::Sealed(sealed) => {
                let Some(step) = self.first_step(&sealed, from, now_ms, &mut out)? else {
                    return Ok(out); // a cookie reply went out
                };
                let made = match self.pairs.get(&step.sender) {
                    Some(_) => None,
                    None => {
                        self.counters.dh_ops += 1;
                        Some(control::Pair::with_public(
                            &self.secret,
                            &self.public,
                            &step.sender,
                        )?)
                    }
                };
                let pair = made
                    .as_ref()
                    .or_else(|| self.pairs.get(&step.sender))
                    .expect("kept or made above");
                let agreement = step.agreement();
                let control::Opened {
                    sender,
                    plaintext: plain,
                } = sealed.open_message_in(pair, step)?;
                // Through a relay, the frame's source tag must be the sender's: answers go there.
                if let Endpoint::Relayed { tag, .. } = from {
                    if tag != Tag::of(&sender) {
                        return Err(Refusal::KeyMismatch);
                    }
                }
                if self.members.contains_key(&sender) {
                    self.received.insert(sender, agreement.clone());
                }
                if self.removed.contains(&sender) {
                    return Err(Refusal::Removed);
                }
                let Some(whole) = self
                    .reassembly
                    .add(sender, sealed.counter, &plain, now_ms)?
                else {
                    return Ok(out); // more segments to come
                };
                if self
                    .replay
                    .get(&sender)
                    .is_some_and(|r| !r.window.would_accept(whole.first_counter, whole.count))
                {
                    return Err(Refusal::Replay);
                }
                let msg = Message::decode(&whole.message)?;
                if let Some(link) = self.issuer.as_mut().filter(|l| *l.pair.peer() == sender) {
                    if !matches!(msg, Message::IssueAnswer { .. }) {
                        return Err(Refusal::NotFromMembers);
                    }
                    if !link.is_at(from) {
                        return Err(Refusal::IssuerElsewhere);
                    }
                    let replay = self.replay.entry(sender).or_default();
                    if !replay.window.accept_run(whole.first_counter, whole.count) {
                        return Err(Refusal::Replay);
                    }
                    // A fresh answer, authenticated: asked where it answered from.
                    link.answered(from);
                    // Its floor is saved as a member's: extrapolated from when it was heard.
                    replay.heard_ms = now_ms;
                    self.dirty.floors = true;
                    *self.received_kinds.entry(msg.kind()).or_default() += 1;
                    out.push(Out::Issued(msg));
                    return Ok(out);
                }
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
                // changes no state, but a sender whose certificate is revoked is told, with the
                // list, so that its operator sees it there.
                if let Err(e) = self.verify(&cert, now_ms) {
                    if matches!(e, CertError::Revoked { .. } | CertError::RevokedKey { .. }) {
                        self.tell_revoked(&cert, from, now_ms, rng);
                    }
                    return Err(Refusal::Certificate(e));
                }
                // Checked before the counters are taken: a refused message moves nothing.
                self.admissible(&cert)?;
                let replay = self.replay.entry(sender).or_default();
                if !replay.window.accept_run(whole.first_counter, whole.count) {
                    return Err(Refusal::Replay);
                }
                replay.heard_ms = now_ms;
                self.dirty.floors = true;
                // The message opened with the sender's static key: this is where it is now.
                let before = self.members.get(&sender).map(|m| m.endpoint);
                let new = self.admit(cert, from, Some(now_ms), made)?;
                let moved = before
                    .is_some_and(|b| Some(b) != self.members.get(&sender).map(|m| m.endpoint));
                self.received.insert(sender, agreement);
                self.unheard.remove(&sender);
                if new {
                    // A newcomer learns who we are (it may know only our key, from a ProbeKey).
                    // A seed known only by its key is now asked for the members it knows.
                    let seed = self.seeds.iter().any(|s| s.key == Some(sender));
                    let hello = self.hello(&sender, seed);
                    self.send(&sender, from, &hello, now_ms, rng, &mut out);
                }
                // Answers go where the member is now (a greeting through a relay, while it is
                // heard at its own address, is answered there).
                let from = self.members.get(&sender).map_or(from, |m| m.endpoint);
                let arrival = Arrival { from, moved };
                *self.received_kinds.entry(msg.kind()).or_default() += 1;
                self.on_message(now_ms, sender, arrival, msg, rng, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Whether the identity and address indexes hold exactly what the members' certificates
    /// say (the simulator checks it after every event).
    #[cfg(test)]
    pub fn indexes_match_members(&self) -> bool {
        let holders: HashMap<String, [u8; 32]> = self
            .members
            .iter()
            .map(|(k, m)| (m.certificate.body.identity(), *k))
            .collect();
        // The claims are disjoint intervals (what `claimants` relies on)...
        let disjoint = self
            .claims
            .iter()
            .zip(self.claims.iter().skip(1))
            .all(|(((f1, _), (last, _)), ((f2, first), _))| f1 != f2 || last < first);
        // ...each a member's address...
        let owned = self.claims.iter().all(|((f, first), (last, k))| {
            self.members.get(k).is_some_and(|m| {
                m.certificate
                    .body
                    .addrs
                    .iter()
                    .any(|a| a.span() == (*f, *first, *last))
            })
        });
        // ...and every member's every address is covered by its own claims, and no other's.
        let covered = self.members.iter().all(|(k, m)| {
            m.certificate.body.addrs.iter().all(|a| {
                let mut holders = self.claimants(a).peekable();
                holders.peek().is_some() && holders.all(|h| h == *k)
            })
        });
        // Workloads are only of members and this node, and hold no member's address.
        let workloads = self.workloads.consistent()
            && self.workloads.iter().all(|(k, list)| {
                (self.members.contains_key(k) || *k == self.public)
                    && list
                        .iter()
                        .flat_map(|c| &c.body.addrs)
                        .all(|a| self.claimants(a).next().is_none())
            });
        holders == self.holders && disjoint && owned && covered && workloads
    }

    /// Members not heard from since they were admitted (greeted again until they speak).
    #[cfg(test)]
    pub fn unheard(&self) -> usize {
        self.unheard.len()
    }

    /// The cookie a sender at `from` must show now (what a cookie reply would give it).
    #[cfg(test)]
    pub fn cookie_for(&self, from: impl Into<Endpoint>) -> [u8; control::COOKIE_LEN] {
        cookie(&self.cookie_secret, &from.into())
    }

    /// Whether a reply to an unauthenticated sender at `from` is within both reply budgets.
    fn reply_allowed(&mut self, from: Endpoint, now_ms: u64) -> bool {
        let source = match from {
            Endpoint::Direct(a) => (source_of(a.ip()), None),
            Endpoint::Relayed { relay, tag } => (source_of(relay.ip()), Some(tag)),
        };
        self.replies_per_source.allow(source, now_ms) && self.replies.allow((), now_ms)
    }

    /// The cheap checks before a sealed datagram costs anything, and its first Diffie-Hellman
    /// (PROTOCOL.md section 4, "Cost"). From a member's address with that member's MAC: the
    /// counter and the member's rate are checked before any Diffie-Hellman. From anywhere else:
    /// the sender must show a cookie for its address (else it gets one, and `None` is returned),
    /// the global budget must allow it, and after the first Diffie-Hellman names the sender, its
    /// counter and rate are checked before the second.
    fn first_step(
        &mut self,
        sealed: &control::Sealed<'_>,
        from: Endpoint,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) -> Result<Option<control::SenderStep>, Refusal> {
        // The issuer, at an address we ask it at: one MAC, then its counter and rate, before
        // any Diffie-Hellman, as for a member.
        if let Some(link) = &self.issuer {
            if link.is_at(from) && sealed.mac_valid(link.pair.mac_key()) {
                let key = *link.pair.peer();
                self.check_counter(&key, sealed.counter)?;
                if !self.per_sender.allow(key, now_ms) {
                    return Err(Refusal::SenderRate);
                }
                self.counters.dh_ops += 1;
                let step = sealed.open_sender_as(&self.secret, &self.public)?;
                if step.sender != key {
                    return Err(Refusal::KeyMismatch);
                }
                return Ok(Some(step));
            }
        }
        let member = self.by_endpoint.get(&from).copied().filter(|k| {
            self.pairs
                .get(k)
                .is_some_and(|p| sealed.mac_valid(p.mac_key()))
        });
        if let Some(key) = member {
            self.check_counter(&key, sealed.counter)?;
            if !self.per_sender.allow(key, now_ms) {
                return Err(Refusal::SenderRate);
            }
            let kept = self
                .received
                .get(&key)
                .and_then(|known| sealed.open_sender_known(&self.public, known));
            let step = match kept {
                Some(step) => step?,
                None => {
                    self.counters.dh_ops += 1;
                    sealed.open_sender_as(&self.secret, &self.public)?
                }
            };
            if step.sender != key {
                return Err(Refusal::KeyMismatch);
            }
            return Ok(Some(step));
        }
        let shown = [self.cookie_secret, self.previous_cookie_secret]
            .iter()
            .any(|s| cookie(s, &from) == sealed.cookie);
        if !shown {
            if !self.reply_allowed(from, now_ms) {
                return Err(Refusal::CookieRequired);
            }
            self.counters.cookie_replies += 1;
            let cookie = cookie(&self.cookie_secret, &from);
            out.push(Out::Send {
                to: from,
                datagram: control::encode_cookie_reply(&sealed.mac, &cookie),
            });
            return Ok(None);
        }
        if !self.unknown_dh.allow((), now_ms) {
            return Err(Refusal::Busy);
        }
        self.counters.dh_ops += 1;
        let step = sealed.open_sender_as(&self.secret, &self.public)?;
        self.check_counter(&step.sender, sealed.counter)?;
        if !self.per_sender.allow(step.sender, now_ms) {
            return Err(Refusal::SenderRate);
        }
        Ok(Some(step))
    }

    /// Refuses a counter the sender's replay window has seen or left behind, without taking it.
    fn check_counter(&self, sender: &[u8; 32], counter: u64) -> Result<(), Refusal> {
        match self.replay.get(sender) {
            Some(r) if !r.window.would_accept(counter, 1) => Err(Refusal::Replay),
            _ => Ok(()),
        }
    }

    fn on_message(
        &mut self,
        now_ms: u64,
        sender: [u8; 32],
        Arrival { from, moved }: Arrival,
        msg: Message,
        rng: &mut impl RngCore,
        out: &mut Vec<Out>,
    ) -> Result<(), Refusal> {
        match msg {
            Message::Hello {
                want_members,
                want_workloads,
                digest,
                revocations,
                ..
            } => {
                // Answer only if the sender's view of the mesh differs from ours.
                if want_members && digest != self.digest() {
                    let list: Vec<Member> = self
                        .members
                        .iter()
                        .filter(|(k, _)| **k != sender)
                        .filter_map(|(_, m)| {
                            Some(Member {
                                certificate: m.certificate.clone(),
                                endpoint: m.address?,
                            })
                        })
                        .collect();
                    for batch in member_batches(list) {
                        self.send(&sender, from, &Message::Members(batch), now_ms, rng, out);
                    }
                }
                // Any list of a CA the sender trusts that is newer than the one it holds.
                let newer: Vec<RevocationList> = revocations
                    .iter()
                    .filter_map(|v| {
                        self.revocations
                            .get(&v.issuer)
                            .filter(|l| l.number > v.number)
                            .cloned()
                    })
                    .collect();
                for crl in newer {
                    self.send(&sender, from, &Message::Revocation(crl), now_ms, rng, out);
                }
                // The sender holds a newer list than ours: our Hello in answer shows our number,
                // and its answer brings the list (whichever side greeted, a list crosses).
                let behind = revocations.iter().any(|v| {
                    self.trust.ca(&v.issuer).is_some()
                        && self.revocations.get(&v.issuer).map_or(0, |l| l.number) < v.number
                });
                let quiet_for =
                    |ms: u64| self.sealed_to.get(&sender).is_none_or(|t| now_ms >= t + ms);
                if (behind && quiet_for(BEHIND_ANSWER_INTERVAL_MS))
                    || (!want_members && (moved || quiet_for(GREETING_ANSWER_AFTER_MS)))
                {
                    let hello = self.hello(&sender, false);
                    self.send(&sender, from, &hello, now_ms, rng, out);
                }
                // A member that holds none of our workload list (it just met us, or restarted)
                // asks for it, and gets it at most once in WORKLOADS_ANSWER_MS.
                let sent_lately = self
                    .workloads_sent
                    .get(&sender)
                    .is_some_and(|t| now_ms < t + WORKLOADS_ANSWER_MS);
                if want_workloads && !self.workloads.of(&self.public).is_empty() && !sent_lately {
                    self.send_workloads(&sender, now_ms, rng, out);
                }
            }
            Message::IssueRequest { .. }
            | Message::IssueAnswer { .. }
            | Message::JoinRequest { .. }
            | Message::JoinAnswer { .. } => {
                return Err(Refusal::NotFromMembers);
            }
            Message::WorkloadsTaken { version } => {
                if version >= self.own_version {
                    self.workloads_unacked.remove(&sender);
                }
            }
            Message::Workloads {
                version,
                certificates,
            } => {
                let mut valid = Vec::new();
                // An older list changes nothing: no certificate of it is checked.
                let current = self.workloads.is_newer(&sender, version);
                let held = self.workloads.of(&sender).to_vec();
                for c in certificates.into_iter().filter(|_| current) {
                    // A certificate already in force was verified when it was taken; expiry and
                    // revocation take it out of force by themselves.
                    let checked = if !self.workload_cas.contains(&c.body.issuer) {
                        Err(Refusal::NotAWorkload {
                            identity: c.body.identity(),
                        })
                    } else if held.contains(&c) {
                        Ok(())
                    } else {
                        self.verify(&c, now_ms).map_err(Refusal::Certificate)
                    };
                    match checked {
                        Ok(()) => valid.push(c),
                        Err(e) => {
                            *self.workloads_refused.entry(e.kind()).or_default() += 1;
                        }
                    }
                }
                for (who, e) in self.take_workloads(sender, version, valid) {
                    tracing::debug!(member = %who, reason = %e, "a workload certificate not taken");
                }
                // Said for every copy (a lost answer is mended by the next), and for an older
                // list too: the sender stops repeating it either way.
                let taken = Message::WorkloadsTaken { version };
                self.send(&sender, from, &taken, now_ms, rng, out);
            }
            Message::Members(list) => {
                let mut learned = false;
                for m in list {
                    let key = m.certificate.body.public_key;
                    if key == self.public || self.members.contains_key(&key) {
                        continue;
                    }
                    if let Err(e) = self.verify(&m.certificate, now_ms) {
                        *self
                            .listed_refused
                            .entry(Refusal::Certificate(e).kind())
                            .or_default() += 1;
                        continue;
                    }
                    let admitted =
                        self.admit(m.certificate, Endpoint::Direct(m.endpoint), None, None);
                    if let Err(e) = &admitted {
                        *self.listed_refused.entry(e.kind()).or_default() += 1;
                    }
                    if admitted.is_ok() {
                        self.greet(&key, now_ms, rng, out);
                        self.unheard.insert(key, (now_ms + greet_wait_ms(1), 1));
                        learned = true;
                    }
                }
                if learned {
                    self.next_gossip_ms = self
                        .next_gossip_ms
                        .min(self.last_gossip_ms + GOSSIP_HURRIED_MS);
                }
            }
            m @ (Message::PolicyOffer { .. }
            | Message::PolicyRequest { .. }
            | Message::PolicyChunk { .. }) => out.push(Out::Policy {
                from: sender,
                msg: m,
            }),
            m @ (Message::GatewayProbe { .. } | Message::GatewayServing { .. }) => {
                out.push(Out::Gateway {
                    from: sender,
                    msg: m,
                })
            }
            m @ (Message::FlowQuery { .. } | Message::FlowAnswer { .. }) => out.push(Out::Flows {
                from: sender,
                msg: m,
            }),
            Message::Revocation(crl) => {
                if !self.take_revocation(crl.clone())? {
                    return Ok(());
                }
                if let Some(problem) = self.own_problem(now_ms) {
                    tracing::warn!(%problem, "this node's own certificate: members refuse it; renew it");
                }
                self.expel_invalid(now_ms);
                // Spread it: every member that has not got it yet gets it from us.
                let targets: Vec<([u8; 32], Endpoint)> = self
                    .members
                    .iter()
                    .filter(|(k, _)| **k != sender)
                    .map(|(k, m)| (*k, m.endpoint))
                    .collect();
                for (k, ep) in targets {
                    self.send(&k, ep, &Message::Revocation(crl.clone()), now_ms, rng, out);
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
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let public = *x25519_dalek::PublicKey::from(&secret).as_bytes();
        if public != self.public && self.workloads.forget(&self.public) {
            // Bound to the old key: the workloads ask for certificates of the new one.
            self.own_workloads_changed = true;
            self.dirty.members = true;
        }
        self.public = public;
        self.digest_cache.set(None);
        self.secret = secret;
        let federations: Vec<Federation> = self.trust.federations().cloned().collect();
        self.trust = trust_of(&certificate, bundle);
        self.federate_quietly(federations);
        self.certificate = certificate;
        // Every agreement involving our static key changes with it; and no ephemeral key is
        // shared by messages under the old and the new static key (it would link them).
        self.pairs.clear();
        self.received.clear();
        self.ephemerals.clear();
        if let Some(link) = self.issuer.take() {
            let current = link.current;
            self.set_issuer(Some((*link.pair.peer(), link.at)));
            if let Some(l) = &mut self.issuer {
                l.current = current;
            }
        }
        let keyed: Vec<([u8; 32], Endpoint)> =
            self.members.iter().map(|(k, m)| (*k, m.endpoint)).collect();
        for (k, ep) in keyed {
            self.index(k, Some(ep), ep, None);
        }
        self.expel_invalid(now_ms);
        let targets: Vec<([u8; 32], Endpoint)> =
            self.members.iter().map(|(k, m)| (*k, m.endpoint)).collect();
        for (k, ep) in targets {
            let hello = self.hello(&k, false);
            self.send(&k, ep, &hello, now_ms, rng, &mut out);
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
    ) -> Result<Vec<Out>, Refusal> {
        let mut out = Vec::new();
        let me = self.public;
        self.on_message(
            now_ms,
            me,
            Arrival {
                from: Endpoint::Direct("0.0.0.0:0".parse().expect("literal")),
                moved: false,
            },
            Message::Revocation(crl),
            rng,
            &mut out,
        )?;
        Ok(out)
    }

    /// Cuts members whose certificates or CAs expired: the only thing that changes with time
    /// alone (signatures were verified at admission, and a new revocation list or bundle makes
    /// [`Membership::expel_invalid`] verify everything again). A few comparisons per member, so
    /// the tick costs no signature checks however large the mesh.
    fn expel_expired(&mut self, now_ms: u64) {
        let now = now_ms / 1000;
        let lapsed = |b: &proto::cert::CertBody| now < b.not_before || now > b.not_after;
        let bad: Vec<([u8; 32], String)> = self
            .members
            .iter()
            .filter_map(|(k, m)| {
                let body = &m.certificate.body;
                let ca = self.trust.ca(&body.issuer);
                if lapsed(body) {
                    Some((
                        *k,
                        format!(
                            "certificate outside its validity (not after {})",
                            body.not_after
                        ),
                    ))
                } else if ca.is_none_or(|ca| lapsed(&ca.body)) {
                    Some((*k, "its CA's certificate expired".to_string()))
                } else {
                    None
                }
            })
            .collect();
        for (k, why) in &bad {
            self.expel(k, why);
        }
        let trust = &self.trust;
        let lost = self.workloads.retain(|c| {
            let ca = trust.ca(&c.body.issuer);
            if lapsed(&c.body) {
                Err(format!(
                    "certificate outside its validity (not after {})",
                    c.body.not_after
                ))
            } else if ca.is_none_or(|ca| lapsed(&ca.body)) {
                Err("its CA's certificate expired".to_string())
            } else {
                Ok(())
            }
        });
        self.workloads.prune(now);
        self.workloads_lost(lost);
    }

    /// Marks the keys whose workload certificates went out of force.
    fn workloads_lost(&mut self, lost: Vec<([u8; 32], String, String)>) {
        for (key, identity, why) in lost {
            tracing::info!(member = %self.identity_of(&key), workload = %identity, %why, "workload certificate out of force");
            self.dirty.members = true;
            if key == self.public {
                self.own_workloads_changed = true;
            } else {
                self.touched.insert(key);
            }
        }
    }

    /// Trusts the federations of the policy set in force, in place of those before, and cuts
    /// every member they no longer cover (a removed federation, a narrowed scope). Seeds not
    /// reached yet are tried again at once: they may be of a newly federated trust domain.
    /// Trusts the CAs of `bundle` (of this node's trust domain) instead of the bundle's so far,
    /// with the same federations: members no CA vouches for any more are cut, and seeds not
    /// reached yet are contacted again (they may be of a newly trusted CA).
    pub fn set_bundle(&mut self, bundle: Vec<Certificate>, now_ms: u64) {
        let federations: Vec<Federation> = self.trust.federations().cloned().collect();
        self.trust = trust_of(&self.certificate, bundle);
        self.federate_quietly(federations);
        for s in &mut self.seeds {
            s.last_probe_ms = None;
        }
        for (k, why) in self.expel_invalid(now_ms) {
            tracing::info!(member = %proto::Key(k), %why, "member cut: no longer trusted");
        }
    }

    pub fn federate(&mut self, federations: Vec<Federation>, now_ms: u64) {
        if self.trust.federations().eq(federations.iter()) {
            return;
        }
        if !federations.is_empty() && self.trust.local_ranges().is_empty() {
            tracing::warn!(
                "federated, but this trust domain's CAs list no address ranges: a federated \
                 identity may take an address this one would grant (give the CA ranges: meshctl \
                 ca init --addresses)"
            );
        }
        self.federate_quietly(federations);
        for s in &mut self.seeds {
            s.last_probe_ms = None;
        }
        for (k, why) in self.expel_invalid(now_ms) {
            tracing::info!(member = %proto::Key(k), %why, "member cut: no longer trusted");
        }
    }

    fn federate_quietly(&mut self, federations: Vec<Federation>) {
        for (what, why) in self.trust.federate(federations) {
            tracing::warn!(%what, %why, "left out of a federation");
        }
    }

    /// Whether member `key` is of this node's own trust domain (policy sets pass only between
    /// such members: another cluster's are signed by its own admins).
    pub fn same_domain(&self, key: &[u8; 32]) -> bool {
        self.members
            .get(key)
            .is_some_and(|m| self.trust.is_local(&m.certificate.body.trust_domain))
    }

    /// Cuts members whose certificates stopped verifying; returns them with the reason.
    pub fn expel_invalid(&mut self, now_ms: u64) -> Vec<([u8; 32], String)> {
        let bad: Vec<([u8; 32], String)> = self
            .members
            .iter()
            .filter_map(|(k, m)| {
                self.verify(&m.certificate, now_ms)
                    .err()
                    .map(|e| (*k, e.to_string()))
            })
            .collect();
        for (k, why) in &bad {
            self.expel(k, why);
        }
        let invalid: HashMap<Vec<u8>, String> = self
            .workloads
            .iter()
            .flat_map(|(_, list)| list)
            .filter_map(|c| {
                let crl = self.revocations.get(&c.body.issuer);
                let e = self
                    .trust
                    .check(c, now_ms / 1000, crl, Signature::Known)
                    .err()?;
                Some((c.encode(), e.to_string()))
            })
            .collect();
        if !invalid.is_empty() {
            let lost = self.workloads.retain(|c| {
                invalid
                    .get(&c.encode())
                    .map_or(Ok(()), |why| Err(why.clone()))
            });
            self.workloads_lost(lost);
        }
        bad
    }

    /// Periodic work: cut members whose certificates stopped verifying, probe seeds we have not
    /// reached, and ask one member in turn for the members it knows.
    pub fn on_tick(&mut self, now_ms: u64, rng: &mut impl RngCore) -> Vec<Out> {
        let mut out = Vec::new();
        if now_ms >= self.next_rotation_ms {
            self.previous_cookie_secret = self.cookie_secret;
            rng.fill_bytes(&mut self.cookie_secret);
            self.next_rotation_ms = now_ms + COOKIE_ROTATION_MS;
        }
        self.expel_expired(now_ms);
        self.reassembly.expire(now_ms);
        self.ephemerals.retain(|_, (_, expires)| now_ms < *expires);
        let known: Vec<SocketAddr> = self.members.values().filter_map(|m| m.address).collect();
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
                Some(k) if s.pinned => greet.push((k, Endpoint::Direct(s.addr))),
                _ => {
                    rng.fill_bytes(&mut s.nonce);
                    out.push(Out::Send {
                        to: Endpoint::Direct(s.addr),
                        datagram: control::encode_probe(&s.nonce),
                    });
                }
            }
        }
        for (key, addr) in greet {
            // Its Hello in answer admits it, and is answered with a request for its members.
            let hello = self.hello(&key, false);
            self.send(&key, addr, &hello, now_ms, rng, &mut out);
        }
        self.unheard
            .retain(|_, (_, greetings)| *greetings < MAX_GREETINGS);
        let due: Vec<[u8; 32]> = self
            .unheard
            .iter()
            .filter(|(_, (at, _))| now_ms >= *at)
            .map(|(k, _)| *k)
            .take(GREETINGS_PER_TICK)
            .collect();
        for key in due {
            if let Some((at, greetings)) = self.unheard.get_mut(&key) {
                *greetings += 1;
                *at = now_ms + greet_wait_ms(*greetings);
            }
            self.greet(&key, now_ms, rng, &mut out);
        }
        if now_ms >= self.next_recheck_ms {
            self.next_recheck_ms = now_ms + RELAYED_RECHECK_MS;
            let relayed: Vec<[u8; 32]> = self
                .members
                .iter()
                .filter(|(_, m)| m.endpoint.is_relayed())
                .map(|(k, _)| *k)
                .collect();
            for key in relayed {
                self.greet(&key, now_ms, rng, &mut out);
            }
        }
        self.announce(now_ms, true, rng, &mut out);
        let due: Vec<[u8; 32]> = self
            .workloads_unacked
            .iter()
            .filter(|(_, (at, _))| now_ms >= *at)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            self.send_workloads(&k, now_ms, rng, &mut out);
        }
        if now_ms >= self.next_gossip_ms && !self.members.is_empty() {
            self.next_gossip_ms = now_ms + GOSSIP_INTERVAL_MS;
            self.last_gossip_ms = now_ms;
            self.gossip_turn = (self.gossip_turn + 1) % self.members.len();
            let (key, ep) = self
                .members
                .iter()
                .nth(self.gossip_turn)
                .map(|(k, m)| (*k, m.endpoint))
                .expect("index in range");
            let hello = self.hello(&key, true);
            self.send(&key, ep, &hello, now_ms, rng, &mut out);
        }
        out
    }
}

/// The members whose addresses overlap `addr`. Members' intervals are disjoint, so those are the
/// ones just before `addr`'s last address, walking back while they reach its first.
fn claimants_in<'a>(
    claims: &'a BTreeMap<(u8, u128), (u128, [u8; 32])>,
    addr: &Cidr,
) -> impl Iterator<Item = [u8; 32]> + 'a {
    let (family, first, last) = addr.span();
    claims
        .range(..=(family, last))
        .rev()
        .take_while(move |((f, _), (end, _))| *f == family && *end >= first)
        .map(|(_, (_, k))| *k)
}

/// The cookie of a sender at `from`: of its address (PROTOCOL.md §4), or of the relay and its
/// tag for one heard through a relay.
fn cookie(secret: &[u8; 32], from: &Endpoint) -> [u8; control::COOKIE_LEN] {
    match from {
        Endpoint::Direct(a) => control::cookie(secret, a),
        Endpoint::Relayed { relay, tag } => control::cookie_relayed(secret, relay, &tag.0),
    }
}

/// Trust in the CAs of `bundle` of our own trust domain (the one of `certificate`), whose
/// self-signatures are checked once here, not with every certificate; the others are logged and
/// left out.
fn trust_of(certificate: &Certificate, bundle: Vec<Certificate>) -> Trust {
    let (trust, left_out) = Trust::new(&certificate.body.trust_domain, bundle);
    for (ca, why) in left_out {
        tracing::warn!(%ca, %why, "a trust bundle entry is left out");
    }
    trust
}

/// The addresses of `addrs` that no other of them contains: a certificate may name nested
/// prefixes, and the claims index holds disjoint intervals only.
fn outermost(addrs: &[Cidr]) -> impl Iterator<Item = &Cidr> {
    addrs.iter().filter(move |a| {
        !addrs
            .iter()
            .any(|b| b.prefix_len() < a.prefix_len() && b.contains(a.addr()))
    })
}

/// True if `a` shares an address with any of `others`.
pub fn overlaps_any(a: &Cidr, others: &[Cidr]) -> bool {
    others
        .iter()
        .any(|b| a.contains(b.addr()) || b.contains(a.addr()))
}

#[cfg(test)]
#[path = "membership_tests.rs"]
mod tests;
