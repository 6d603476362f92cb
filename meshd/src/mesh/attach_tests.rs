//! Attached workloads alone: when they are asked for, renewed, kept and dropped.

use super::*;
use ed25519_dalek::SigningKey;
use proto::cert::{CertBody, CertKind};
use rand_core::OsRng;

const KEY: [u8; 32] = [1; 32];

fn pod(name: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: "microblog".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

fn cert(key: [u8; 32], not_before: u64, not_after: u64, serial: u64) -> Certificate {
    let ca = SigningKey::from_bytes(&[9; 32]);
    CertBody {
        kind: CertKind::Identity,
        serial,
        not_before,
        not_after,
        trust_domain: "example.org".into(),
        namespace: "microblog".into(),
        name: "post".into(),
        public_key: key,
        issuer: ca.verifying_key().to_bytes(),
        labels: Default::default(),
        addrs: vec!["100.64.9.1/32".parse().unwrap()],
        routes: vec![],
        ports: vec![],
    }
    .sign(&ca)
    .unwrap()
}

#[test]
fn a_new_workload_is_asked_for_at_once_and_again_each_second_until_answered() {
    let mut a = Attachments::default();
    a.attach(pod("post-1"));
    let first = a.due(1_000, &mut OsRng);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, [pod("post-1")]);
    assert!(a.due(1_500, &mut OsRng).is_empty());
    let again = a.due(2_000, &mut OsRng);
    assert_eq!(again.len(), 1);
    // The answer to the first request still counts.
    let out = a.on_answer(
        first[0].0,
        vec![Issued::Certificate(cert(KEY, 0, 3600, 1))],
        &KEY,
    );
    assert_eq!(out[0].0, pod("post-1"));
    let held = out[0].1.as_ref().unwrap();
    assert_eq!(held.body.identity(), "example.org/microblog/post");
    assert_eq!(a.certificates().len(), 1);
    // An answer to nothing we asked changes nothing.
    assert!(a
        .on_answer(12345, vec![Issued::Refused("x".into())], &KEY)
        .is_empty());
    assert_eq!(a.certificates().len(), 1);
}

#[test]
fn renewal_starts_at_half_life_and_the_certificate_is_kept_through_an_outage() {
    let mut a = Attachments::default();
    a.attach(pod("post-1"));
    let (nonce, _) = a.due(0, &mut OsRng).remove(0);
    a.on_answer(
        nonce,
        vec![Issued::Certificate(cert(KEY, 0, 3600, 1))],
        &KEY,
    );
    assert!(a.due(1_799_000, &mut OsRng).is_empty(), "before half-life");
    assert_eq!(a.due(1_800_000, &mut OsRng).len(), 1);
    // The issuer is down for 10 minutes: asked every 10 s, the certificate kept.
    let mut asked = 1;
    for t in (1_800_000..2_400_000).step_by(1_000) {
        asked += a.due(t + 1_000, &mut OsRng).len();
        assert!(!a.expire(t / 1000));
    }
    assert_eq!(asked, 61);
    assert_eq!(a.certificates().len(), 1);
    let (nonce, _) = a.due(2_410_000, &mut OsRng).remove(0);
    let renewed = cert(KEY, 2_410, 6_010, 2);
    a.on_answer(nonce, vec![Issued::Certificate(renewed.clone())], &KEY);
    assert_eq!(a.certificates(), [renewed]);
    // Past its end without an answer, it is dropped.
    assert!(a.expire(6_011));
    assert!(a.certificates().is_empty());
}

#[test]
fn a_refusal_drops_the_certificate_and_a_foreign_key_is_a_refusal() {
    let mut a = Attachments::default();
    a.attach(pod("post-1"));
    a.attach(pod("post-2"));
    let (nonce, asked) = a.due(0, &mut OsRng).remove(0);
    assert_eq!(asked, [pod("post-1"), pod("post-2")]);
    let out = a.on_answer(
        nonce,
        vec![
            Issued::Certificate(cert(KEY, 0, 3600, 1)),
            Issued::Certificate(cert([2; 32], 0, 3600, 2)),
        ],
        &KEY,
    );
    assert!(out[1].1.as_ref().unwrap_err().contains("another key"));
    assert_eq!(a.certificates().len(), 1);
    let (nonce, _) = a.due(1_800_000, &mut OsRng).remove(0);
    let out = a.on_answer(
        nonce,
        vec![Issued::Refused(
            "no workload microblog/post-1 is known".into(),
        )],
        &KEY,
    );
    assert!(out[0].1.is_err());
    assert!(a.certificates().is_empty());
    assert_eq!(
        a.status()[0].refused.as_deref(),
        Some("no workload microblog/post-1 is known")
    );
}

#[test]
fn later_keeps_what_is_held_and_the_workload_is_asked_again_until_decided() {
    let mut a = Attachments::default();
    // Restored after a restart with a young certificate; and one without any.
    a.restore(pod("post-1"), Some(cert(KEY, 0, 3600, 1)));
    a.attach(pod("post-2"));
    let (nonce, asked) = a.due(60_000, &mut OsRng).remove(0);
    assert_eq!(asked, [pod("post-1"), pod("post-2")]);
    let later = || Issued::Later("the issuer has not listed the cluster yet".into());
    let out = a.on_answer(nonce, vec![later(), later()], &KEY);
    assert!(out.is_empty(), "nothing decided: {out:?}");
    assert_eq!(a.certificates(), [cert(KEY, 0, 3600, 1)]);
    assert!(a.status().iter().all(|s| s.refused.is_none()));
    assert!(a.status()[1].later.is_some());
    // post-2, without a certificate, is asked again in 3 s; post-1, safe with its certificate,
    // in 10 s (still unconfirmed).
    assert!(a.due(62_000, &mut OsRng).is_empty());
    let (_, asked) = a.due(63_000, &mut OsRng).remove(0);
    assert_eq!(asked, [pod("post-2")]);
    let (nonce, asked) = a.due(70_000, &mut OsRng).remove(0);
    assert_eq!(asked, [pod("post-1"), pod("post-2")]);
    let out = a.on_answer(
        nonce,
        vec![
            Issued::Refused("no workload microblog/post-1 is known".into()),
            Issued::Certificate(cert(KEY, 70, 3670, 2)),
        ],
        &KEY,
    );
    assert_eq!(out.len(), 2);
    assert_eq!(a.certificates(), [cert(KEY, 70, 3670, 2)]);
    assert!(a.status()[1].later.is_none());
}

#[test]
fn requests_carry_at_most_16_workloads_and_a_detached_one_is_not_answered_for() {
    let mut a = Attachments::default();
    for i in 0..40 {
        a.attach(pod(&format!("p{i:02}")));
    }
    let due = a.due(0, &mut OsRng);
    assert_eq!(
        due.iter().map(|(_, w)| w.len()).collect::<Vec<_>>(),
        [16, 16, 8]
    );
    assert!(a.detach(&pod("p00")));
    assert!(!a.detach(&pod("p00")));
    let results = (0..16)
        .map(|_| Issued::Certificate(cert(KEY, 0, 3600, 1)))
        .collect();
    let out = a.on_answer(due[0].0, results, &KEY);
    assert_eq!(out.len(), 15);
}

#[test]
fn renewals_go_together_once_one_is_at_half_its_life() {
    let mut a = Attachments::default();
    a.attach(pod("post-1"));
    a.attach(pod("post-2"));
    a.attach(pod("post-3"));
    let (nonce, _) = a.due(0, &mut OsRng).remove(0);
    // Issued at 0, 500 and 2000 s, each for an hour.
    let results = vec![
        Issued::Certificate(cert(KEY, 0, 3600, 1)),
        Issued::Certificate(cert(KEY, 500, 4100, 2)),
        Issued::Certificate(cert(KEY, 2000, 5600, 3)),
    ];
    a.on_answer(nonce, results, &KEY);
    // At 1800 s post-1 is at half its life; post-2 is past three tenths of its (it joins), post-3
    // is not.
    let due = a.due(1_800_000, &mut OsRng);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].1, [pod("post-1"), pod("post-2")]);
}
