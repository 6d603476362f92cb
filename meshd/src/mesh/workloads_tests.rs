//! The workload book alone: which certificate holds an address, whatever members announce.

use super::*;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use proto::cert::{CertBody, CertKind};

const A: [u8; 32] = [1; 32];
const B: [u8; 32] = [2; 32];
const C: [u8; 32] = [3; 32];

/// A workload certificate bound to `key`: pod `pod`, issued at `not_before` with `serial`.
fn pod(key: [u8; 32], pod: &str, addrs: &[&str], not_before: u64, serial: u64) -> Certificate {
    let ca = SigningKey::from_bytes(&[9; 32]);
    CertBody {
        kind: CertKind::Identity,
        serial,
        not_before,
        not_after: not_before + 3600,
        trust_domain: "example.org".into(),
        namespace: "microblog".into(),
        name: pod.into(),
        public_key: key,
        issuer: ca.verifying_key().to_bytes(),
        labels: Default::default(),
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        routes: vec![],
        ports: vec![],
    }
    .sign(&ca)
    .unwrap()
}

fn free(_: &Cidr) -> Option<String> {
    None
}

fn names(book: &WorkloadBook, key: &[u8; 32]) -> Vec<String> {
    book.of(key).iter().map(|c| c.body.name.clone()).collect()
}

#[test]
fn an_announcement_replaces_the_last_and_an_empty_one_withdraws_everything() {
    let mut book = WorkloadBook::default();
    let web = pod(A, "web", &["100.64.2.1/32"], 10, 1);
    let api = pod(A, "api", &["100.64.2.2/32", "fd00::2:2/128"], 10, 2);
    let t = book.announce(A, 1, vec![web.clone(), api.clone()], free);
    assert_eq!(t.changed, BTreeSet::from([A]));
    assert!(t.refused.is_empty(), "{:?}", t.refused);
    assert_eq!(names(&book, &A), ["web", "api"], "in address order");
    assert_eq!(book.holder(&"fd00::2:2/128".parse().unwrap()), Some(A));
    assert_eq!(book.holder(&"100.64.2.0/24".parse().unwrap()), Some(A));
    // The same list again changes nothing; a list without web withdraws it.
    assert!(book
        .announce(A, 2, vec![api.clone(), web.clone()], free)
        .changed
        .is_empty());
    assert_eq!(
        book.announce(A, 3, vec![api], free).changed,
        BTreeSet::from([A])
    );
    assert_eq!(names(&book, &A), ["api"]);
    assert_eq!(book.holder(&"100.64.2.1/32".parse().unwrap()), None);
    book.announce(A, 4, vec![], free);
    assert!(book.of(&A).is_empty());
    assert_eq!(book.holder(&"100.64.0.0/10".parse().unwrap()), None);
    assert!(book.consistent());
}

#[test]
fn an_older_announcement_arriving_late_changes_nothing() {
    let mut book = WorkloadBook::default();
    let web = pod(A, "web", &["100.64.2.1/32"], 10, 1);
    book.announce(A, 5, vec![], free);
    let t = book.announce(A, 4, vec![web], free);
    assert_eq!(t, Taken::default());
    assert!(book.of(&A).is_empty());
}

#[test]
fn an_address_reused_on_another_node_goes_to_the_newest_certificate_for_good() {
    let mut book = WorkloadBook::default();
    let old = pod(A, "web-1", &["100.64.2.1/32", "fd00::1/128"], 10, 1);
    let new = pod(B, "web-2", &["100.64.2.1/32"], 20, 2);
    book.announce(A, 1, vec![old.clone()], free);
    let t = book.announce(B, 1, vec![new.clone()], free);
    // The new pod holds the address; the old certificate is out of force entirely (its other
    // address too), on the node that still announces it.
    assert_eq!(t.changed, BTreeSet::from([A, B]));
    assert_eq!(book.holder(&"100.64.2.1/32".parse().unwrap()), Some(B));
    assert_eq!(book.holder(&"fd00::1/128".parse().unwrap()), None);
    assert!(book.of(&A).is_empty());
    // A re-announces it: refused. After B withdraws the new pod, still refused, until the newest
    // certificate for the address has expired.
    let t = book.announce(A, 2, vec![old.clone()], free);
    assert!(
        matches!(t.refused[..], [Refusal::Superseded { newest: 2, .. }]),
        "{t:?}"
    );
    book.announce(B, 2, vec![], free);
    let t = book.announce(A, 3, vec![old.clone()], free);
    assert!(
        matches!(t.refused[..], [Refusal::Superseded { .. }]),
        "{t:?}"
    );
    assert!(book.of(&A).is_empty());
    book.prune(20 + 3600);
    assert!(matches!(
        book.announce(A, 4, vec![old.clone()], free).refused[..],
        [Refusal::Superseded { .. }]
    ));
    book.prune(20 + 3601);
    let t = book.announce(A, 5, vec![old], free);
    assert!(t.refused.is_empty(), "{t:?}");
    assert!(book.consistent());
}

#[test]
fn the_newer_arrives_first_and_the_older_is_refused() {
    let mut book = WorkloadBook::default();
    book.announce(B, 1, vec![pod(B, "web-2", &["100.64.2.1/32"], 20, 2)], free);
    let t = book.announce(A, 1, vec![pod(A, "web-1", &["100.64.2.1/32"], 10, 1)], free);
    assert_eq!(t.changed, BTreeSet::new());
    assert!(matches!(t.refused[..], [Refusal::Superseded { .. }]));
    assert_eq!(book.holder(&"100.64.2.1/32".parse().unwrap()), Some(B));
}

#[test]
fn a_renewed_certificate_replaces_its_predecessor_and_the_predecessor_cannot_return() {
    let mut book = WorkloadBook::default();
    let first = pod(A, "web", &["100.64.2.1/32"], 10, 1);
    let renewed = pod(A, "web", &["100.64.2.1/32"], 1810, 7);
    book.announce(A, 1, vec![first.clone()], free);
    book.announce(A, 2, vec![renewed.clone()], free);
    assert_eq!(book.of(&A), std::slice::from_ref(&renewed));
    // Both in one list: the newer holds the address, the older is refused.
    let t = book.announce(A, 3, vec![first.clone(), renewed.clone()], free);
    assert_eq!(book.of(&A), [renewed]);
    assert_eq!(t.refused.len(), 1);
    let t = book.announce(A, 4, vec![first], free);
    assert!(book.of(&A).is_empty(), "{t:?}");
}

#[test]
fn ranges_foreign_keys_and_taken_addresses_are_refused_and_the_rest_kept() {
    let mut book = WorkloadBook::default();
    let range = pod(A, "wide", &["100.64.3.0/24"], 10, 1);
    let foreign = pod(B, "theirs", &["100.64.2.9/32"], 10, 2);
    let node = pod(A, "on-a-node", &["100.64.1.1/32"], 10, 3);
    let good = pod(A, "web", &["100.64.2.1/32"], 10, 4);
    let taken = |c: &Cidr| {
        (*c == "100.64.1.1/32".parse().unwrap()).then(|| "example.org/prod/node1".to_string())
    };
    let t = book.announce(A, 1, vec![range, foreign, node, good.clone()], taken);
    assert_eq!(book.of(&A), [good]);
    let kinds: BTreeSet<&str> = t.refused.iter().map(Refusal::kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["workload_range", "key_mismatch", "address_conflict"])
    );
}

#[test]
fn forgetting_a_member_and_retaining_valid_certificates_free_their_addresses() {
    let mut book = WorkloadBook::default();
    book.announce(A, 1, vec![pod(A, "web", &["100.64.2.1/32"], 10, 1)], free);
    book.announce(B, 1, vec![pod(B, "api", &["100.64.2.2/32"], 10, 2)], free);
    let lost = book.retain(|c| match c.body.name.as_str() {
        "api" => Err("revoked".into()),
        _ => Ok(()),
    });
    assert_eq!(
        lost,
        [(B, "example.org/microblog/api".into(), "revoked".into())]
    );
    assert_eq!(book.holder(&"100.64.2.2/32".parse().unwrap()), None);
    assert!(book.forget(&A));
    assert!(!book.forget(&A));
    assert_eq!(book.iter().count(), 0);
    assert!(book.consistent());
    // A forgotten member starts again from any counter (it may have restarted).
    let t = book.announce(A, 1, vec![pod(A, "web", &["100.64.2.1/32"], 10, 1)], free);
    assert_eq!(t.changed, BTreeSet::from([A]));
}

/// One step of the property test: member `key` announces a subset of the pool.
#[derive(Debug, Clone)]
struct Step {
    key: usize,
    picks: Vec<usize>,
}

proptest! {
    /// Whatever the members announce, in whatever order: no address is held twice, and the index
    /// matches the certificates; every certificate in force was in its member's latest list and
    /// is at least as new, at each of its addresses, as any certificate ever in force there; and
    /// a certificate of a latest list that is not in force has a newer one at one of its
    /// addresses.
    #[test]
    fn the_newest_announced_certificate_holds_each_address(
        steps in proptest::collection::vec(
            (0usize..3, proptest::collection::vec(0usize..12, 0..5))
                .prop_map(|(key, picks)| Step { key, picks }),
            1..40,
        )
    ) {
        let keys = [A, B, C];
        // A pool of 12 certificates per key over 4 addresses, of many ranks.
        let pool: Vec<Vec<Certificate>> = keys
            .iter()
            .enumerate()
            .map(|(k, key)| {
                (0..12u64)
                    .map(|i| {
                        let a = format!("100.64.2.{}/32", i % 4);
                        let b = format!("fd00::{}/128", (i + k as u64) % 4);
                        let addrs: Vec<&str> = if i % 3 == 0 { vec![&a, &b] } else { vec![&a] };
                        pod(*key, &format!("p{k}-{i}"), &addrs, 10 + (i * 7 + k as u64) % 5, i * 3 + k as u64)
                    })
                    .collect()
            })
            .collect();
        let mut book = WorkloadBook::default();
        let mut latest: Vec<Vec<Certificate>> = vec![Vec::new(); 3];
        let mut seen_max: BTreeMap<Addr, Rank> = BTreeMap::new();
        for (n, step) in steps.iter().enumerate() {
            let list: Vec<Certificate> = step.picks.iter().map(|i| pool[step.key][*i].clone()).collect();
            book.announce(keys[step.key], n as u64 + 1, list.clone(), free);
            latest[step.key] = list;
            prop_assert!(book.consistent());
            for (k, key) in keys.iter().enumerate() {
                for c in book.of(key) {
                    prop_assert!(latest[k].contains(c), "in force but not announced");
                }
            }
            let at = |a: &Cidr| {
                let (f, first, _) = a.span();
                (f, first)
            };
            for key in &keys {
                for c in book.of(key) {
                    for a in &c.body.addrs {
                        let e = seen_max.entry(at(a)).or_insert(rank(c));
                        *e = (*e).max(rank(c));
                    }
                }
            }
            for (k, key) in keys.iter().enumerate() {
                for c in book.of(key) {
                    for a in &c.body.addrs {
                        prop_assert!(rank(c) >= seen_max[&at(a)]);
                        prop_assert_eq!(book.holder(a), Some(*key));
                    }
                }
                for c in latest[k].iter().filter(|c| !book.of(key).contains(c)) {
                    let newer = c.body.addrs.iter().any(|a| seen_max.get(&at(a)).is_some_and(|r| *r > rank(c)));
                    prop_assert!(newer, "{} announced, free, and not in force", c.body.name);
                }
            }
        }
    }
}
