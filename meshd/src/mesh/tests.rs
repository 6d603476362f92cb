//! Membership as a pure state machine: several nodes exchanging datagrams in memory.

use super::*;
use ed25519_dalek::SigningKey;
use proto::cert::{CertBody, CertKind};
use rand_core::OsRng;

const T0_MS: u64 = 1_800_000_000_000;

fn ca(seed: u8, td: &str) -> (SigningKey, Certificate) {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let pk = key.verifying_key().to_bytes();
    let cert = CertBody {
        kind: CertKind::Ca,
        serial: 1,
        not_before: 0,
        not_after: u64::MAX / 2,
        trust_domain: td.into(),
        namespace: String::new(),
        name: "ca".into(),
        public_key: pk,
        issuer: pk,
        labels: Default::default(),
        addrs: vec![],
    }
    .sign(&key)
    .unwrap();
    (key, cert)
}

fn identity(ca: &SigningKey, i: u8, not_after: u64) -> (StaticSecret, Certificate) {
    let secret = StaticSecret::from([i; 32]);
    let cert = CertBody {
        kind: CertKind::Identity,
        serial: u64::from(i),
        not_before: 0,
        not_after,
        trust_domain: "example.org".into(),
        namespace: "prod".into(),
        name: format!("node{i}"),
        public_key: *x25519_dalek::PublicKey::from(&secret).as_bytes(),
        issuer: ca.verifying_key().to_bytes(),
        labels: Default::default(),
        addrs: vec![format!("100.64.1.{i}/32").parse().unwrap()],
    }
    .sign(ca)
    .unwrap();
    (secret, cert)
}

/// [`identity`] with `n` labels of about 40 bytes each, for a certificate of any size.
fn labelled(ca: &SigningKey, i: u8, n: usize) -> (StaticSecret, Certificate) {
    let (secret, cert) = identity(ca, i, u64::MAX / 4);
    let mut body = cert.body;
    body.labels = (0..n)
        .map(|l| {
            (
                format!("team.example.org/key-{l:02}"),
                format!("value-{l:02}-{i:03}-abcdefgh"),
            )
        })
        .collect();
    (secret, body.sign(ca).unwrap())
}

fn addr(i: usize) -> SocketAddr {
    format!("198.18.1.{}:51820", i + 1).parse().unwrap()
}

/// Nodes on a lossless in-memory network.
struct Net {
    nodes: Vec<Membership>,
    now_ms: u64,
    installed: Vec<BTreeMap<[u8; 32], Vec<Cidr>>>,
}

impl Net {
    fn new(n: usize) -> (Net, SigningKey, Certificate) {
        Net::labelled(n, 0)
    }

    /// `n` nodes whose certificates carry `labels` labels each.
    fn labelled(n: usize, labels: usize) -> (Net, SigningKey, Certificate) {
        Net::build(n, labels, false)
    }

    /// `n` nodes seeded with node 0, by its key too if `pinned` (and then node 0 answers no
    /// probe).
    fn build(n: usize, labels: usize, pinned: bool) -> (Net, SigningKey, Certificate) {
        let (ca_key, ca_cert) = ca(9, "example.org");
        let mut nodes = Vec::new();
        for i in 0..n {
            let (secret, cert) = labelled(&ca_key, i as u8 + 1, labels);
            let mut m = Membership::new(secret, cert, vec![ca_cert.clone()], vec![], T0_MS);
            if i > 0 {
                let key = pinned.then(|| {
                    *x25519_dalek::PublicKey::from(&StaticSecret::from([1; 32])).as_bytes()
                });
                m.add_seed(addr(0), key, &mut OsRng);
            } else {
                m.set_answer_probes(!pinned);
            }
            nodes.push(m);
        }
        let installed = vec![BTreeMap::new(); n];
        (
            Net {
                nodes,
                now_ms: T0_MS,
                installed,
            },
            ca_key,
            ca_cert,
        )
    }

    /// Delivers `actions` of node `from` and everything they cause, until the network is quiet.
    fn deliver(&mut self, from: usize, actions: Vec<Action>) {
        let mut queue: Vec<(usize, Action)> = actions.into_iter().map(|a| (from, a)).collect();
        while let Some((src, action)) = queue.pop() {
            match action {
                Action::Send { to, datagram } => {
                    // No control datagram needs IP fragmentation.
                    assert!(
                        datagram.len() <= proto::segment::DATAGRAM_BYTES,
                        "a {}-byte datagram",
                        datagram.len()
                    );
                    let Some(dst) = (0..self.nodes.len()).find(|i| addr(*i) == to) else {
                        continue;
                    };
                    if let Ok(out) =
                        self.nodes[dst].on_datagram(self.now_ms, addr(src), &datagram, &mut OsRng)
                    {
                        queue.extend(out.into_iter().map(|a| (dst, a)));
                    }
                }
                Action::Install { key, addrs, .. } => {
                    self.installed[src].insert(key, addrs);
                }
                Action::Remove { key, .. } => {
                    self.installed[src].remove(&key);
                }
                // Policy sync is the shell's; its own tests are in policy_sync.rs.
                Action::Persist | Action::Policy { .. } => {}
            }
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now_ms += ms;
        for i in 0..self.nodes.len() {
            let out = self.nodes[i].on_tick(self.now_ms, &mut OsRng);
            self.deliver(i, out);
        }
    }
}

#[test]
fn five_nodes_from_one_seed_converge_to_a_full_mesh() {
    let (mut net, _, _) = Net::new(5);
    net.tick(0);
    for (i, m) in net.nodes.iter().enumerate() {
        assert_eq!(
            m.members().len(),
            4,
            "node {i} knows all others after one round"
        );
        assert_eq!(net.installed[i].len(), 4);
    }
    // Allowed IPs are exactly the certificate's addresses.
    let key1 = *x25519_dalek::PublicKey::from(&StaticSecret::from([2u8; 32])).as_bytes();
    assert_eq!(
        net.installed[0][&key1],
        vec!["100.64.1.2/32".parse::<Cidr>().unwrap()]
    );
}

fn sealed_hello(from: &StaticSecret, to: &Membership, cert: Certificate, counter: u64) -> Vec<u8> {
    let msg = Message::Hello {
        certificate: cert,
        want_members: true,
        digest: [0; 32],
    };
    let mut d = control::seal_message(
        from,
        &to.public,
        &StaticSecret::from([77; 32]),
        counter,
        &msg.encode(),
    )
    .unwrap();
    assert_eq!(d.len(), 1, "a Hello fits one datagram");
    d.remove(0)
}

#[test]
fn refuses_other_cas_foreign_keys_tampering_replays_and_strangers() {
    let (mut net, ca_key, _) = Net::new(1);
    let (rogue_key, _) = ca(3, "example.org");
    let n = &mut net.nodes[0];
    let now = T0_MS;

    let (s, cert) = identity(&rogue_key, 7, u64::MAX / 4);
    let r = n.on_datagram(now, addr(6), &sealed_hello(&s, n, cert, 1), &mut OsRng);
    assert!(
        matches!(
            r,
            Err(Refusal::Certificate(proto::cert::CertError::UnknownIssuer))
        ),
        "{r:?}"
    );

    let (s7, _) = identity(&ca_key, 7, u64::MAX / 4);
    let (_, cert8) = identity(&ca_key, 8, u64::MAX / 4);
    let r = n.on_datagram(now, addr(6), &sealed_hello(&s7, n, cert8, 1), &mut OsRng);
    assert_eq!(
        r,
        Err(Refusal::KeyMismatch),
        "a certificate for another key than the sender's"
    );

    let (_, cert7) = identity(&ca_key, 7, u64::MAX / 4);
    let mut bytes = cert7.encode();
    let pos = bytes.windows(4).position(|w| w == [100, 64, 1, 7]).unwrap();
    bytes[pos + 3] = 8;
    let tampered = Certificate::decode(&bytes).unwrap();
    let r = n.on_datagram(now, addr(6), &sealed_hello(&s7, n, tampered, 2), &mut OsRng);
    assert!(
        matches!(
            r,
            Err(Refusal::Certificate(proto::cert::CertError::BadSignature))
        ),
        "{r:?}"
    );
    assert!(n.members().is_empty());

    let good = sealed_hello(&s7, n, cert7.clone(), 3);
    assert!(n.on_datagram(now, addr(6), &good, &mut OsRng).is_ok());
    assert_eq!(n.members().len(), 1);
    assert_eq!(
        n.on_datagram(now, addr(6), &good, &mut OsRng),
        Err(Refusal::Replay)
    );

    let (s9, _) = identity(&ca_key, 9, u64::MAX / 4);
    let members = Message::Members(vec![]).encode();
    let d = control::seal_message(&s9, &n.public, &StaticSecret::from([5; 32]), 1, &members)
        .unwrap()
        .remove(0);
    assert_eq!(
        n.on_datagram(now, addr(6), &d, &mut OsRng),
        Err(Refusal::UnknownSender)
    );

    let reply = control::encode_probe_reply(&[1; 16], &cert7, 1200).unwrap();
    assert_eq!(
        n.on_datagram(now, addr(6), &reply, &mut OsRng),
        Err(Refusal::UnexpectedReply)
    );
    let small_probe = &control::encode_probe(&[1; 16])[..600];
    assert!(matches!(
        n.on_datagram(now, addr(6), small_probe, &mut OsRng),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn expiry_cuts_a_member_on_the_next_tick() {
    let (mut net, ca_key, _) = Net::new(1);
    let (s, cert) = identity(&ca_key, 7, T0_MS / 1000 + 10);
    let hello = sealed_hello(&s, &net.nodes[0], cert, 1);
    let out = net.nodes[0]
        .on_datagram(T0_MS, addr(6), &hello, &mut OsRng)
        .unwrap();
    assert!(out.iter().any(|a| matches!(a, Action::Install { .. })));
    net.tick(10_000);
    assert_eq!(net.nodes[0].members().len(), 1, "valid through not_after");
    net.tick(1_000);
    assert!(net.nodes[0].members().is_empty(), "cut once expired");
}

#[test]
fn a_revocation_added_on_one_node_spreads_and_cuts_everywhere() {
    let (mut net, ca_key, _) = Net::new(4);
    net.tick(0);
    let revoked = *x25519_dalek::PublicKey::from(&StaticSecret::from([4u8; 32])).as_bytes();
    let crl = RevocationList::sign("example.org", 1, T0_MS / 1000, vec![4], &ca_key).unwrap();
    let out = net.nodes[0]
        .add_revocation(net.now_ms, crl.clone(), &mut OsRng)
        .unwrap();
    net.deliver(0, out);
    for i in 0..3 {
        assert!(
            !net.nodes[i].members().contains_key(&revoked),
            "node {i} cut the revoked identity"
        );
        assert!(!net.installed[i].contains_key(&revoked));
        assert_eq!(net.nodes[i].members().len(), 2);
    }
    // An older list does not undo a newer one.
    let older = RevocationList::sign("example.org", 0, 0, vec![], &ca_key).unwrap();
    assert!(net.nodes[1]
        .add_revocation(net.now_ms, older, &mut OsRng)
        .unwrap()
        .is_empty());
}

#[test]
fn a_renewed_certificate_replaces_the_old_key_everywhere() {
    let (mut net, ca_key, ca_cert) = Net::new(3);
    net.tick(0);
    let old = net.nodes[2].public;
    let (secret, mut cert) = identity(&ca_key, 33, u64::MAX / 4);
    // Same identity as node 3 (its name), a new key and a later not_before.
    let mut body = cert.body.clone();
    body.name = "node3".into();
    body.addrs = vec!["100.64.1.3/32".parse().unwrap()];
    body.not_before = 1;
    cert = body.sign(&ca_key).unwrap();
    let out = net.nodes[2].renew(secret, cert, vec![ca_cert], net.now_ms, &mut OsRng);
    net.deliver(2, out);
    let new = net.nodes[2].public;
    for i in 0..2 {
        assert!(
            net.installed[i].contains_key(&new) && !net.installed[i].contains_key(&old),
            "node {i}"
        );
    }
}

#[test]
fn a_refused_message_changes_nothing_and_the_tick_cuts_the_expired_member() {
    let (mut net, ca_key, _) = Net::new(1);
    let (s, cert) = identity(&ca_key, 7, T0_MS / 1000 + 10);
    let first = sealed_hello(&s, &net.nodes[0], cert.clone(), 1);
    let out = net.nodes[0]
        .on_datagram(T0_MS, addr(6), &first, &mut OsRng)
        .unwrap();
    net.deliver(0, out);
    assert_eq!(net.installed[0].len(), 1);
    // A Hello after expiry is refused, and the refusal leaves membership as it was ...
    let late = T0_MS + 12_000;
    let second = sealed_hello(&s, &net.nodes[0], cert, 2);
    assert!(net.nodes[0]
        .on_datagram(late, addr(6), &second, &mut OsRng)
        .is_err());
    assert_eq!(net.nodes[0].members().len(), 1);
    // ... so the tick's removal reaches the device.
    net.tick(12_000);
    assert!(net.nodes[0].members().is_empty());
    assert!(net.installed[0].is_empty(), "the WireGuard peer is removed");
}

#[test]
fn a_mesh_at_rest_exchanges_only_hellos() {
    let (mut net, _, _) = Net::new(4);
    net.tick(0);
    net.tick(GOSSIP_INTERVAL_MS);
    // One more gossip round: each node's Hello finds the same digest, so nobody answers.
    net.now_ms += GOSSIP_INTERVAL_MS;
    for i in 0..4 {
        let out = net.nodes[i].on_tick(net.now_ms, &mut OsRng);
        let sends: Vec<&Action> = out
            .iter()
            .filter(|a| matches!(a, Action::Send { .. }))
            .collect();
        assert_eq!(sends.len(), 1, "one Hello per gossip interval");
        for a in out {
            if let Action::Send { to, datagram } = a {
                let dst = (0..4).find(|j| addr(*j) == to).unwrap();
                let reply = net.nodes[dst]
                    .on_datagram(net.now_ms, addr(i), &datagram, &mut OsRng)
                    .unwrap();
                assert!(
                    reply.iter().all(|a| !matches!(a, Action::Send { .. })),
                    "no Members reply at rest"
                );
            }
        }
    }
}

#[test]
fn large_certificates_cross_in_small_datagrams_and_a_mesh_still_forms() {
    // About 2,000-byte certificates: too large for a probe reply (the seed answers with its key),
    // and a Members message of 11 of them spans many datagrams, which `deliver` checks are each
    // within the budget, and delivers last segment first.
    let (mut net, ca_key, _) = Net::labelled(12, 40);
    assert!(net.nodes[0].certificate().encode().len() > proto::segment::DATAGRAM_BYTES);
    net.tick(0);
    for (i, m) in net.nodes.iter().enumerate() {
        assert_eq!(m.members().len(), 11, "node {i}");
    }

    // A Hello with a 3 KB certificate, in segments arriving in any order, admits its sender once.
    let n = &mut net.nodes[0];
    let (big, cert) = labelled(&ca_key, 40, 64);
    assert!(cert.encode().len() > 3000);
    let hello = Message::Hello {
        certificate: cert,
        want_members: false,
        digest: [0; 32],
    };
    let mut segs = control::seal_message(
        &big,
        &n.public,
        &StaticSecret::from([8; 32]),
        500,
        &hello.encode(),
    )
    .unwrap();
    assert!(segs.len() >= 3);
    segs.swap(0, 2);
    let now = net.now_ms;
    let before = n.members().len();
    for (i, d) in segs.iter().enumerate() {
        let out = n.on_datagram(now, addr(40), d, &mut OsRng).unwrap();
        assert_eq!(
            out.is_empty(),
            i + 1 < segs.len(),
            "acted on at the last segment"
        );
    }
    assert_eq!(n.members().len(), before + 1);
    // The same segments again (a replay) are put together, and refused whole.
    let mut refusal = None;
    for d in &segs {
        if let Err(e) = n.on_datagram(now, addr(40), d, &mut OsRng) {
            refusal = Some(e);
        }
    }
    assert_eq!(refusal, Some(Refusal::Replay));
}

#[test]
fn members_are_batched_by_count_and_by_certificate_bytes() {
    let (ca_key, _) = ca(9, "example.org");
    let member = |i: u8, labels: usize| Member {
        certificate: labelled(&ca_key, i, labels).1,
        endpoint: addr(usize::from(i)),
    };
    let small: Vec<Member> = (1..=70).map(|i| member(i, 0)).collect();
    let sizes: Vec<usize> = member_batches(small).iter().map(Vec::len).collect();
    assert_eq!(sizes, [32, 32, 6]);
    // 3 KB certificates: five to a message.
    let big: Vec<Member> = (1..=12).map(|i| member(i, 64)).collect();
    let batches = member_batches(big);
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 12);
    for b in &batches {
        let encoded = Message::Members(b.clone()).encode().len();
        assert!(encoded <= MEMBERS_BYTES_PER_MESSAGE + 1024, "{encoded}");
        assert!(encoded <= proto::segment::MAX_MESSAGE_BYTES);
    }
    assert!(batches.len() >= 3, "{}", batches.len());
}

#[test]
fn a_seed_named_by_key_answers_no_probe_and_the_mesh_still_forms() {
    let (mut net, _, _) = Net::build(5, 0, true);
    net.tick(0);
    for (i, m) in net.nodes.iter().enumerate() {
        assert_eq!(m.members().len(), 4, "node {i}");
    }
    // A stranger's probe gets nothing: not the certificate, not the key.
    let probe = control::encode_probe(&[3; 16]);
    assert_eq!(
        net.nodes[0].on_datagram(net.now_ms, addr(30), &probe, &mut OsRng),
        Err(Refusal::ProbeIgnored)
    );
    // A node that answers probes still does.
    let out = net.nodes[1]
        .on_datagram(net.now_ms, addr(30), &probe, &mut OsRng)
        .unwrap();
    assert!(matches!(&out[..], [Action::Send { .. }]));
}
