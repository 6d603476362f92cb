//! Membership alone: what one node refuses, and how large messages cross. The whole node, many
//! of them over a simulated network, is tested in `node_tests.rs`.

use super::*;
use ed25519_dalek::SigningKey;
use proto::cert::{CertBody, CertKind};
use rand_core::OsRng;

use crate::mesh::sim::T0_MS;

fn ca(seed: u8, td: &str) -> (SigningKey, Certificate) {
    let ca = crate::mesh::sim::Ca::new(seed, td);
    (ca.key, ca.cert)
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
        routes: vec![],
        ports: vec![],
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

/// A node that knows nobody yet: node `i` of `ca_key`.
fn lone(ca_key: &SigningKey, ca_cert: &Certificate, i: u8) -> Membership {
    let (secret, cert) = identity(ca_key, i, u64::MAX / 4);
    Membership::new(secret, cert, vec![ca_cert.clone()], T0_MS, &mut OsRng)
}

fn sealed_hello(from: &StaticSecret, to: &Membership, cert: Certificate, counter: u64) -> Vec<u8> {
    sealed_hello_at(from, to, cert, counter, true, addr(6).into())
}

/// A sealed Hello from `from` to `to`, with the cookie of a sender at `endpoint`.
fn sealed_hello_at(
    from: &StaticSecret,
    to: &Membership,
    cert: Certificate,
    counter: u64,
    want_members: bool,
    endpoint: Endpoint,
) -> Vec<u8> {
    let msg = Message::Hello {
        certificate: cert,
        want_members,
        want_workloads: false,
        digest: [0; 32],
        revocations: vec![],
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
    let mut datagram = d.remove(0);
    control::set_cookie(&mut datagram, &to.cookie_for(endpoint));
    datagram
}

/// `datagram` with the cookie `to` asks of a sender at `from` (as after a cookie reply).
fn with_cookie(to: &Membership, from: SocketAddr, mut datagram: Vec<u8>) -> Vec<u8> {
    control::set_cookie(&mut datagram, &to.cookie_for(from));
    datagram
}

#[test]
fn refuses_other_cas_foreign_keys_tampering_replays_and_strangers() {
    let (ca_key, ca_cert) = ca(9, "example.org");
    let mut node = lone(&ca_key, &ca_cert, 1);
    let (rogue_key, _) = ca(3, "example.org");
    let n = &mut node;
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
    let d = with_cookie(n, addr(6), d);
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
fn a_message_in_segments_arriving_in_any_order_is_taken_once() {
    let (ca_key, ca_cert) = ca(9, "example.org");
    let mut node = lone(&ca_key, &ca_cert, 1);
    // A Hello with a 3 KB certificate, in segments arriving in any order, admits its sender once.
    let n = &mut node;
    let (big, cert) = labelled(&ca_key, 40, 64);
    assert!(cert.encode().len() > 3000);
    let hello = Message::Hello {
        certificate: cert,
        want_members: false,
        want_workloads: false,
        digest: [0; 32],
        revocations: vec![],
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
    let now = T0_MS;
    let before = n.members().len();
    for d in &mut segs {
        control::set_cookie(d, &n.cookie_for(addr(40)));
    }
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
fn members_are_batched_one_datagram_to_a_message_unless_one_member_is_larger() {
    let (ca_key, _) = ca(9, "example.org");
    let member = |i: u8, labels: usize| Member {
        certificate: labelled(&ca_key, i, labels).1,
        endpoint: addr(usize::from(i)),
    };
    let datagrams = |batch: &[Member]| {
        control::seal_message(
            &StaticSecret::from([1; 32]),
            &[9; 32],
            &StaticSecret::from([2; 32]),
            1,
            &Message::Members(batch.to_vec()).encode(),
        )
        .unwrap()
        .len()
    };
    let small: Vec<Member> = (1..=70).map(|i| member(i, 0)).collect();
    let batches = member_batches(small.clone());
    assert_eq!(batches.concat(), small, "every member, in order");
    for b in &batches {
        assert_eq!(datagrams(b), 1, "a batch of {} is one datagram", b.len());
        assert!(b.len() <= 32);
    }
    assert!(
        batches[0].len() > 1,
        "small certificates share a datagram: {}",
        batches[0].len()
    );
    // A 3 KB certificate does not fit one datagram: it goes alone, in segments.
    let big: Vec<Member> = (1..=3).map(|i| member(i, 64)).collect();
    let batches = member_batches(big);
    assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
    assert!(datagrams(&batches[0]) > 1);
}

#[test]
fn a_newer_revocation_list_crosses_whichever_side_greets() {
    let (ca_key, ca_cert) = ca(9, "example.org");
    let mut a = lone(&ca_key, &ca_cert, 1);
    let mut b = lone(&ca_key, &ca_cert, 2);
    let (sa, _) = identity(&ca_key, 1, u64::MAX / 4);
    let (a_at, b_at) = (addr(1), addr(2));
    let now = T0_MS;
    let greeting = |a: &Membership, b: &Membership, counter: u64| {
        control::seal_message(
            &sa,
            &b.public,
            &StaticSecret::from([77; 32]),
            counter,
            &a.hello(&b.public, false).encode(),
        )
        .unwrap()
        .remove(0)
    };
    let sends = |outs: Vec<Out>| -> Vec<Vec<u8>> {
        outs.into_iter()
            .filter_map(|o| match o {
                Out::Send { datagram, .. } => Some(datagram),
                Out::Policy { .. } | Out::Gateway { .. } | Out::Flows { .. } | Out::Issued(_) => {
                    None
                }
            })
            .collect()
    };
    // a greets b, b admits a and greets back, a admits b.
    let first = with_cookie(&b, a_at, greeting(&a, &b, 1));
    for d in sends(b.on_datagram(now, a_at, &first, &mut OsRng).unwrap()) {
        a.on_datagram(now, b_at, &with_cookie(&a, b_at, d), &mut OsRng)
            .unwrap();
    }
    assert_eq!((a.members().len(), b.members().len()), (1, 1));
    // a learns a list; a greets b again. b, which is behind, answers with its own Hello, whose
    // number makes a send the list.
    let (_, revoked) = identity(&ca_key, 9, u64::MAX / 4);
    let crl = RevocationList::sign_with_keys(
        "example.org",
        1,
        now / 1000,
        vec![],
        vec![revoked.body.public_key],
        &ca_key,
    )
    .unwrap();
    assert!(a.take_revocation(crl).unwrap());
    // (b answers a Hello that shows newer lists at most once in 5 s; it just greeted a.)
    let now = now + 6_000;
    let answer = sends(
        b.on_datagram(now, a_at, &greeting(&a, &b, 2), &mut OsRng)
            .unwrap(),
    );
    assert_eq!(answer.len(), 1, "b answers a's Hello: it is behind");
    for d in answer {
        for list in sends(a.on_datagram(now, b_at, &d, &mut OsRng).unwrap()) {
            b.on_datagram(now, a_at, &list, &mut OsRng).unwrap();
        }
    }
    assert_eq!(b.revocations().map(|l| l.number).collect::<Vec<_>>(), [1]);
    // Even, the next greeting is answered with nothing (its counter above a's own, which the
    // list used).
    let later = (now + 1) * COUNTER_PER_MS;
    assert!(b
        .on_datagram(now, a_at, &greeting(&a, &b, later), &mut OsRng)
        .unwrap()
        .is_empty());
}

#[test]
fn an_unheard_member_is_greeted_every_second_for_a_while_then_less_often() {
    let waits: Vec<u64> = (1..=16).map(greet_wait_ms).collect();
    assert_eq!(
        waits,
        [
            1000, 1000, 1000, 1000, 1000, 1000, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000,
            30000, 30000
        ]
    );
}

#[test]
fn a_member_naming_nested_prefixes_still_holds_all_of_them() {
    let (ca_key, ca_cert) = ca(9, "example.org");
    let mut n = lone(&ca_key, &ca_cert, 1);
    let now = T0_MS;
    let with_addrs = |i: u8, addrs: &[&str]| {
        let (secret, cert) = identity(&ca_key, i, u64::MAX / 4);
        let mut body = cert.body;
        body.addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        (secret, body.sign(&ca_key).unwrap())
    };
    // Two shapes of nesting: a host inside the range, and one prefix with two lengths.
    let (s2, c2) = with_addrs(2, &["100.70.0.0/16", "100.70.0.5/32"]);
    let (s3, c3) = with_addrs(3, &["100.80.0.0/16", "100.80.0.0/24"]);
    for (s, c, counter) in [(&s2, c2, 1), (&s3, c3, 2)] {
        let d = sealed_hello(s, &n, c, counter);
        n.on_datagram(now, addr(6), &d, &mut OsRng).unwrap();
    }
    assert_eq!(n.members().len(), 2);
    assert!(n.indexes_match_members());
    for (i, claim) in [(4u8, "100.70.1.0/24"), (5, "100.80.9.0/24")] {
        let (s, c) = with_addrs(i, &[claim]);
        let d = sealed_hello(&s, &n, c, 10 + u64::from(i));
        let r = n.on_datagram(now, addr(6), &d, &mut OsRng);
        assert!(
            matches!(r, Err(Refusal::AddressConflict { .. })),
            "{claim} lies inside a member's /16: {r:?}"
        );
    }
    assert_eq!(n.members().len(), 2);
}

#[test]
fn a_listed_member_that_never_answers_is_greeted_a_dozen_times_then_left_to_gossip() {
    let (ca_key, ca_cert) = ca(9, "example.org");
    let mut n = lone(&ca_key, &ca_cert, 1);
    let now = T0_MS;
    let (s2, c2) = identity(&ca_key, 2, u64::MAX / 4);
    n.on_datagram(now, addr(6), &sealed_hello(&s2, &n, c2, 1), &mut OsRng)
        .unwrap();
    // Member 2 lists member 3 at an address where nobody answers (stale, or a victim's).
    let (_, c3) = identity(&ca_key, 3, u64::MAX / 4);
    let victim = addr(50);
    let list = Message::Members(vec![Member {
        certificate: c3,
        endpoint: victim,
    }]);
    let d = control::seal_message(
        &s2,
        &n.public,
        &StaticSecret::from([5; 32]),
        2,
        &list.encode(),
    )
    .unwrap()
    .remove(0);
    n.on_datagram(now, addr(6), &d, &mut OsRng).unwrap();
    assert_eq!(n.unheard(), 1);
    let mut greeted_until = None;
    for t in (500..120_000).step_by(500) {
        n.on_tick(now + t, &mut OsRng);
        if n.unheard() == 0 && greeted_until.is_none() {
            greeted_until = Some(t);
        }
    }
    // Greeted every second for 8 s, then after 2, 4, 8 and 16 s: left to gossip at about 38 s
    // (gossip still asks each member in turn, as any other).
    let t = greeted_until.expect("greetings stop");
    assert!((30_000..=45_000).contains(&t), "greeted until {t} ms");
    assert_eq!(MAX_GREETINGS, 12);
}

#[test]
fn through_a_relay_only_the_senders_own_tag_counts_and_its_path_is_never_listed_or_saved() {
    let (ca_key, ca_cert) = ca(9, "example.org");
    let mut n = lone(&ca_key, &ca_cert, 1);
    let (s7, cert7) = identity(&ca_key, 7, u64::MAX / 4);
    let key7 = cert7.body.public_key;
    let relay = addr(5);
    // A genuine Hello of node 7 in a frame whose source tag names someone else: refused (its
    // answers would go to that someone), and nothing moves.
    let wrong = Endpoint::Relayed {
        relay,
        tag: Tag::of(&[9; 32]),
    };
    let d = sealed_hello_at(&s7, &n, cert7.clone(), 1, false, wrong);
    assert_eq!(
        n.on_datagram(T0_MS, wrong, &d, &mut OsRng),
        Err(Refusal::KeyMismatch)
    );
    assert!(n.members().is_empty());
    // With its own tag it is admitted, reached through the relay, with no address of its own.
    let right = Endpoint::Relayed {
        relay,
        tag: Tag::of(&key7),
    };
    let d = sealed_hello_at(&s7, &n, cert7.clone(), 2, false, right);
    n.on_datagram(T0_MS, right, &d, &mut OsRng).unwrap();
    let m = &n.members()[&key7];
    assert_eq!((m.endpoint, m.address), (right, None));
    // Node 8 asks for members: node 7 is not listed (the relay's address is not its own).
    let (s8, cert8) = identity(&ca_key, 8, u64::MAX / 4);
    let d = sealed_hello(&s8, &n, cert8, 1);
    let out = n.on_datagram(T0_MS, addr(6), &d, &mut OsRng).unwrap();
    let sent: Vec<&Vec<u8>> = out
        .iter()
        .filter_map(|o| match o {
            Out::Send { to, datagram } if *to == Endpoint::Direct(addr(6)) => Some(datagram),
            _ => None,
        })
        .collect();
    assert!(!sent.is_empty(), "node 8 is answered");
    let k8 = *x25519_dalek::PublicKey::from(&s8).as_bytes();
    let pair = control::Pair::with_public(&s8, &k8, &n.public).unwrap();
    for d in sent {
        let Ok(control::Datagram::Sealed(sealed)) = control::decode(d) else {
            continue;
        };
        let step = sealed.open_sender_as(&s8, &k8).unwrap();
        let opened = sealed.open_message_in(&pair, step).unwrap();
        let seg = proto::segment::parse(&opened.plaintext).unwrap();
        if let Ok(Message::Members(list)) = Message::decode(seg.payload) {
            assert!(
                list.iter().all(|m| m.certificate.body.public_key != key7),
                "a member known only through a relay is not listed"
            );
        }
    }
    // Heard at its own address, it moves there, and stays there when it is heard through the
    // relay again within 10 s.
    let own = Endpoint::Direct(addr(7));
    let d = sealed_hello_at(&s7, &n, cert7.clone(), 3, false, own);
    n.on_datagram(T0_MS + 100, own, &d, &mut OsRng).unwrap();
    assert_eq!(n.members()[&key7].address, Some(addr(7)));
    let d = sealed_hello_at(&s7, &n, cert7, 4, false, right);
    n.on_datagram(T0_MS + 200, right, &d, &mut OsRng).unwrap();
    assert_eq!(n.members()[&key7].endpoint, own);
}

#[test]
fn a_saved_floor_never_rises_above_the_clock_so_a_wrong_heard_time_locks_nobody_out() {
    let (ca_key, ca_cert) = ca(1, "example.org");
    let mut m = lone(&ca_key, &ca_cert, 1);
    let now = T0_MS + 1_000;
    let sender = [7; 32];
    // Heard "at 0": extrapolated, the floor would be decades ahead of any counter it sends.
    m.restore_floors(
        &[Floor {
            sender,
            counter: 5 * COUNTER_PER_MS,
            heard_ms: 0,
        }],
        now,
    );
    assert!(m.check_counter(&sender, now * COUNTER_PER_MS + 1).is_ok());
    assert!(m.check_counter(&sender, 5 * COUNTER_PER_MS).is_err());
    // Heard a second before the restart: everything it sent until now is refused.
    let mut m = lone(&ca_key, &ca_cert, 1);
    m.restore_floors(
        &[Floor {
            sender,
            counter: (now - 1_000) * COUNTER_PER_MS,
            heard_ms: now - 1_000,
        }],
        now,
    );
    assert!(m
        .check_counter(&sender, (now - 10) * COUNTER_PER_MS)
        .is_err());
    assert!(m
        .check_counter(&sender, (now + 10) * COUNTER_PER_MS)
        .is_ok());
}
