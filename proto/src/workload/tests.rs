use super::*;
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000;
const HOUR: u64 = 3600;

fn node(name: &str) -> CertBody {
    CertBody {
        kind: CertKind::Identity,
        serial: 1,
        not_before: NOW - HOUR,
        not_after: NOW + 30 * 24 * HOUR,
        trust_domain: "example.org".into(),
        namespace: "nodes".into(),
        name: name.into(),
        public_key: key_of(name),
        issuer: NODE_CA,
        // What a node's own certificate says is never passed on to a workload's.
        labels: [("role".to_string(), "node".to_string())].into(),
        addrs: vec!["100.64.0.1/32".parse().unwrap()],
        routes: vec!["198.19.0.0/24".parse().unwrap()],
        ports: vec!["ssh=22/tcp".parse().unwrap()],
    }
}

/// The offline CA that makes node certificates.
const NODE_CA: [u8; 32] = [9; 32];

/// A key of its own for each node name.
fn key_of(name: &str) -> [u8; 32] {
    let mut k = [0x55; 32];
    for (d, s) in k.iter_mut().zip(name.bytes()) {
        *d = s;
    }
    k
}

fn issuance() -> Issuance {
    Issuance {
        trust_domain: "example.org".into(),
        node_issuers: vec![NODE_CA],
        now: NOW,
        lifetime_secs: HOUR,
    }
}

fn pod(name: &str, uid: &str, on: &str, ip: &str) -> Workload {
    Workload {
        reference: WorkloadRef {
            namespace: "microblog".into(),
            name: name.into(),
            uid: uid.into(),
        },
        service_account: name.split('-').next().unwrap().into(),
        labels: [(
            "app".to_string(),
            name.split('-').next().unwrap().to_string(),
        )]
        .into(),
        addrs: vec![ip.parse().unwrap()],
        ports: vec!["http=8080/tcp".parse().unwrap()],
        node: NodeName {
            namespace: "nodes".into(),
            name: on.into(),
        },
    }
}

fn view(pods: &[Workload]) -> BTreeMap<(String, String), Workload> {
    pods.iter()
        .map(|w| {
            (
                (w.reference.namespace.clone(), w.reference.name.clone()),
                w.clone(),
            )
        })
        .collect()
}

fn ask(name: &str, uid: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: "microblog".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[test]
fn a_node_is_given_what_the_view_says_of_a_workload_it_runs_bound_to_its_own_key() {
    let v = view(&[pod("post-1", "u1", "node-a", "100.64.1.5/32")]);
    let g = authorize(&node("node-a"), &ask("post-1", "u1"), &v, &issuance()).unwrap();
    assert_eq!(g.trust_domain, "example.org");
    assert_eq!(
        (g.namespace.as_str(), g.name.as_str()),
        ("microblog", "post")
    );
    assert_eq!(g.labels, [("app".into(), "post".into())].into());
    assert_eq!(g.addrs, vec!["100.64.1.5/32".parse().unwrap()]);
    assert_eq!(g.ports.len(), 1);
    assert_eq!(g.public_key, node("node-a").public_key);
    assert_eq!((g.not_before, g.not_after), (NOW, NOW + HOUR));
    let body = g.body(42, [7; 32]);
    assert_eq!(
        (body.serial, body.issuer, body.kind),
        (42, [7; 32], CertKind::Identity)
    );
    assert!(
        body.routes.is_empty(),
        "a workload certificate grants no gateway routes"
    );
    assert!(!g.labels.contains_key("role") && g.ports[0].name == "http");
}

#[test]
fn only_a_node_certificate_may_ask_and_only_while_it_is_valid() {
    let v = view(&[pod("post-1", "u1", "node-a", "100.64.1.5/32")]);
    let request = ask("post-1", "u1");
    // A workload certificate (from the online issuer's key) named like the node: refused.
    let mut workload = node("node-a");
    workload.issuer = [8; 32];
    assert_eq!(
        authorize(&workload, &request, &v, &issuance()),
        Err(Refusal::NotANode)
    );
    let mut early = node("node-a");
    early.not_before = NOW + 1;
    assert_eq!(
        authorize(&early, &request, &v, &issuance()),
        Err(Refusal::NodeNotValid)
    );
    // Valid to the second, both ends included; a lifetime of 0 is a certificate for this second.
    let mut last = node("node-a");
    last.not_after = NOW;
    let g = authorize(&last, &request, &v, &issuance()).unwrap();
    assert_eq!((g.not_before, g.not_after), (NOW, NOW));
    let zero = Issuance {
        lifetime_secs: 0,
        ..issuance()
    };
    let g = authorize(&node("node-a"), &request, &v, &zero).unwrap();
    assert_eq!(g.not_after, NOW);
    // Two nodes, two keys: each grant carries its requester's.
    let v = view(&[
        pod("post-1", "u1", "node-a", "100.64.1.5/32"),
        pod("post-2", "u2", "node-b", "100.64.1.6/32"),
    ]);
    let ga = authorize(&node("node-a"), &request, &v, &issuance()).unwrap();
    let gb = authorize(&node("node-b"), &ask("post-2", "u2"), &v, &issuance()).unwrap();
    assert_eq!(ga.public_key, key_of("node-a"));
    assert_eq!(gb.public_key, key_of("node-b"));
    assert_ne!(ga.public_key, gb.public_key);
}

#[test]
fn a_workload_certificate_never_outlives_its_node_certificate() {
    let v = view(&[pod("post-1", "u1", "node-a", "100.64.1.5/32")]);
    let mut n = node("node-a");
    n.not_after = NOW + 600;
    let g = authorize(&n, &ask("post-1", "u1"), &v, &issuance()).unwrap();
    assert_eq!(g.not_after, NOW + 600);
}

#[test]
fn requests_that_are_refused_say_why() {
    let v = view(&[
        pod("post-1", "u1", "node-a", "100.64.1.5/32"),
        pod("api-1", "u2", "node-b", "100.64.2.5/32"),
        {
            let mut p = pod("search-1", "u3", "node-a", "100.64.1.6/32");
            p.addrs.clear();
            p
        },
    ]);
    let a = node("node-a");
    let refuse = |n: &CertBody, r: WorkloadRef| authorize(n, &r, &v, &issuance()).unwrap_err();
    assert_eq!(
        refuse(&a, ask("api-1", "u2")),
        Refusal::NotOnThisNode {
            namespace: "microblog".into(),
            name: "api-1".into(),
            node: NodeName {
                namespace: "nodes".into(),
                name: "node-a".into()
            }
        },
        "a pod scheduled on another node"
    );
    assert!(matches!(
        refuse(&a, ask("post-2", "u9")),
        Refusal::UnknownWorkload { .. }
    ));
    assert!(
        matches!(refuse(&a, ask("post-1", "u0")), Refusal::Replaced { ref uid, .. } if uid == "u1"),
        "a deleted pod's name, now another pod's"
    );
    assert!(matches!(
        refuse(&a, ask("search-1", "u3")),
        Refusal::NoAddress { .. }
    ));
    assert_eq!(
        refuse(&a, ask("", "u1")),
        Refusal::Malformed { field: "name" }
    );
    assert_eq!(
        refuse(&a, ask(&"x".repeat(254), "u1")),
        Refusal::Malformed { field: "name" }
    );
    // Another trust domain's node, a CA, an expired node certificate.
    let mut foreign = a.clone();
    foreign.trust_domain = "other.org".into();
    assert!(matches!(
        refuse(&foreign, ask("post-1", "u1")),
        Refusal::ForeignNode(_)
    ));
    let mut ca = a.clone();
    ca.kind = CertKind::Ca;
    assert!(matches!(
        refuse(&ca, ask("post-1", "u1")),
        Refusal::ForeignNode(_)
    ));
    let mut old = a.clone();
    old.not_after = NOW - 1;
    assert_eq!(refuse(&old, ask("post-1", "u1")), Refusal::NodeNotValid);
    // The same name in another namespace is another node.
    let mut elsewhere = a.clone();
    elsewhere.namespace = "vms".into();
    assert!(matches!(
        refuse(&elsewhere, ask("post-1", "u1")),
        Refusal::NotOnThisNode { .. }
    ));
    // The messages name the workload and the node.
    assert_eq!(
        refuse(&a, ask("api-1", "u2")).to_string(),
        "workload microblog/api-1 does not run on node nodes/node-a"
    );
}

fn arb_pod() -> impl Strategy<Value = Workload> {
    (0u8..6, 0u8..3, 0u8..3, 0u8..4, any::<bool>()).prop_map(|(n, uid, on, last, addr)| {
        let mut p = pod(
            &format!("svc{}-{n}", n % 3),
            &format!("u{uid}"),
            &format!("node-{on}"),
            &format!("100.64.0.{}/32", 10 + last),
        );
        if !addr {
            p.addrs.clear();
        }
        p
    })
}

proptest! {
    /// Whatever the view and the request, a certificate is given exactly when the view has that
    /// workload, with that UID, on that node, with an address; and it says only what the view
    /// says, bound to the requesting node's key, for at most the lifetime and the node's own.
    #[test]
    fn a_grant_is_exactly_what_the_view_allows(
        pods in prop::collection::vec(arb_pod(), 0..8),
        asked in (0u8..6, 0u8..3, 0u8..3),
        lifetime in 1u64..100_000,
        node_left in 1u64..100_000,
    ) {
        let v = view(&pods);
        let (n, uid, on) = asked;
        let mut requester = node(&format!("node-{on}"));
        requester.not_after = NOW + node_left;
        let request = ask(&format!("svc{}-{n}", n % 3), &format!("u{uid}"));
        let iss = Issuance { lifetime_secs: lifetime, ..issuance() };
        let known = v.workload(&request.namespace, &request.name);
        let allowed = known.filter(|w| {
            w.reference.uid == request.uid
                && w.node.name == requester.name
                && w.node.namespace == requester.namespace
                && !w.addrs.is_empty()
        });
        match (authorize(&requester, &request, &v, &iss), allowed) {
            (Ok(g), Some(w)) => {
                prop_assert_eq!(&g.name, &w.service_account);
                prop_assert_eq!(&g.namespace, &w.reference.namespace);
                prop_assert_eq!(&g.labels, &w.labels);
                prop_assert_eq!(&g.addrs, &w.addrs);
                prop_assert_eq!(&g.ports, &w.ports);
                prop_assert_eq!(g.public_key, requester.public_key);
                prop_assert!(g.not_after <= NOW + lifetime && g.not_after <= requester.not_after);
                prop_assert_eq!(g.not_before, NOW);
            }
            (Err(_), None) => {}
            (got, want) => prop_assert!(false, "got {:?}, the view allows {:?}", got, want),
        }
    }
}

#[test]
fn the_registry_holds_each_address_once_and_replaces_a_workload_by_name() {
    let mut r = Registry::default();
    assert_eq!(
        r.register(pod("post-1", "u1", "node-a", "100.64.1.5/32")),
        Ok(None)
    );
    assert_eq!(
        r.register(pod("api-1", "u2", "node-b", "100.64.2.5/32")),
        Ok(None)
    );
    // Another workload may not take post-1's address while post-1 holds it.
    let err = r
        .register(pod("search-1", "u3", "node-b", "100.64.1.5/32"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "workload microblog/search-1: address 100.64.1.5/32 is held by microblog/post-1; remove it first"
    );
    // post-1 again, with a new UID (a new pod of that name) on another node: it replaces the old.
    let old = r
        .register(pod("post-1", "u9", "node-b", "100.64.1.5/32"))
        .unwrap();
    assert_eq!(old.map(|w| w.reference.uid), Some("u1".into()));
    let g = authorize(&node("node-b"), &ask("post-1", "u9"), &r, &issuance()).unwrap();
    assert_eq!(g.addrs, vec!["100.64.1.5/32".parse().unwrap()]);
    assert!(matches!(
        authorize(&node("node-a"), &ask("post-1", "u1"), &r, &issuance()),
        Err(Refusal::Replaced { .. })
    ));
    // Removed, its address is free, and nothing is issued for it any more.
    assert!(r.remove("microblog", "post-1").is_some());
    assert!(r.remove("microblog", "post-1").is_none());
    assert!(matches!(
        authorize(&node("node-b"), &ask("post-1", "u9"), &r, &issuance()),
        Err(Refusal::UnknownWorkload { .. })
    ));
    assert_eq!(
        r.register(pod("search-1", "u3", "node-b", "100.64.1.5/32")),
        Ok(None)
    );
    assert_eq!(r.iter().count(), 2);
}

#[test]
fn the_registry_refuses_what_could_not_be_certified() {
    let mut r = Registry::default();
    let bad = |change: &dyn Fn(&mut Workload)| {
        let mut p = pod("post-1", "u1", "node-a", "100.64.1.5/32");
        change(&mut p);
        Registry::default().register(p).unwrap_err().to_string()
    };
    assert!(bad(&|p| p.addrs.clear()).contains("no overlay address"));
    assert!(bad(&|p| p.addrs = vec!["100.64.1.0/24".parse().unwrap()]).contains("not one address"));
    assert!(bad(&|p| p.reference.uid.clear()).contains("uid must be 1-253 bytes"));
    assert!(bad(&|p| p.node.name.clear()).contains("no node"));
    assert!(bad(&|p| p.service_account = "Not A Name".into()).contains("name"));
    assert!(bad(&|p| {
        p.labels.insert("bad key!".into(), "v".into());
    })
    .contains("label"));
    assert!(
        bad(&|p| p.addrs = vec!["::ffff:100.64.1.5/128".parse().unwrap()]).contains("IPv4-mapped")
    );
    assert!(bad(&|p| p.node.name = "Node A".into()).contains("node nodes/Node A"));
    assert!(r.iter().next().is_none());
    assert_eq!(
        r.register(pod("post-1", "u1", "node-a", "fd00::5/128")),
        Ok(None)
    );
    // Addresses and ports in any order, or twice, are kept in order, once.
    let mut p = pod("api-1", "u2", "node-a", "100.64.1.9/32");
    p.addrs = ["100.64.1.9/32", "100.64.1.7/32", "100.64.1.9/32"]
        .map(|a| a.parse().unwrap())
        .to_vec();
    p.ports = ["web=80/tcp", "api=81/tcp"]
        .map(|s| s.parse().unwrap())
        .to_vec();
    r.register(p).unwrap();
    let w = r.workload("microblog", "api-1").unwrap();
    assert_eq!(w.addrs.len(), 2);
    assert!(w.addrs[0] < w.addrs[1] && w.ports[0].name == "api");
}

#[test]
fn a_workload_may_not_be_named_as_a_node() {
    // Its certificate would then name that node, and could ask for that node's workloads.
    let mut r = Registry::default();
    r.register(pod("post-1", "u1", "node-a", "100.64.1.5/32"))
        .unwrap();
    let mut p = pod("x-1", "u2", "node-b", "100.64.1.6/32");
    p.reference.namespace = "nodes".into();
    p.service_account = "node-a".into();
    let e = r.register(p).unwrap_err().to_string();
    assert!(e.contains("is node nodes/node-a's name"), "{e}");
    // ...nor a node be a workload's identity.
    let mut p = pod("y-1", "u3", "post", "100.64.1.7/32");
    p.node.namespace = "microblog".into();
    let e = r.register(p).unwrap_err().to_string();
    assert!(
        e.contains("is the identity of workload microblog/post-1"),
        "{e}"
    );
}

/// A node certificate signed by a real node CA, the trust in that CA, and the CA's key.
fn signed_node(
    name: &str,
) -> (
    crate::cert::Certificate,
    crate::trust::Trust,
    ed25519_dalek::SigningKey,
) {
    let ca_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let public = ca_key.verifying_key().to_bytes();
    let ca = CertBody::ca("example.org", "nodes", public, 1, (0, NOW * 2), vec![])
        .sign(&ca_key)
        .unwrap();
    let mut body = node(name);
    body.issuer = public;
    let cert = body.sign(&ca_key).unwrap();
    let (trust, left_out) = crate::trust::Trust::new("example.org", vec![ca]);
    assert!(left_out.is_empty());
    (cert, trust, ca_key)
}

#[test]
fn the_issuer_answers_each_workload_in_order_only_to_the_node_that_sealed() {
    let (cert, trust, ca_key) = signed_node("node-a");
    let mut issuance = issuance();
    issuance.node_issuers = vec![ca_key.verifying_key().to_bytes()];
    let v = view(&[
        pod("post-1", "u1", "node-a", "100.64.1.5/32"),
        pod("api-1", "u2", "node-b", "100.64.1.6/32"),
    ]);
    let workload_ca = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let sign = |g: &Grant| {
        g.body(7, workload_ca.verifying_key().to_bytes())
            .sign(&workload_ca)
            .map_err(|e| e.to_string())
    };
    let key = cert.body.public_key;
    let asked = [ask("post-1", "u1"), ask("api-1", "u2"), ask("gone", "u3")];
    let results = answer(&key, &cert, &asked, &trust, None, &v, &issuance, sign).unwrap();
    let post = results[0].as_ref().unwrap();
    assert_eq!(
        (post.body.name.as_str(), post.body.public_key),
        ("post", key)
    );
    post.verify_signature(&workload_ca.verifying_key().to_bytes())
        .unwrap();
    assert!(results[1]
        .as_ref()
        .unwrap_err()
        .contains("does not run on node nodes/node-a"));
    assert!(results[2]
        .as_ref()
        .unwrap_err()
        .contains("no workload microblog/gone"));
    // Sealed by another key (a node certificate replayed by someone else): nothing.
    let e = answer(&[1; 32], &cert, &asked, &trust, None, &v, &issuance, sign).unwrap_err();
    assert!(e.contains("another key"), "{e}");
    // A revoked node: nothing.
    let crl = crate::cert::RevocationList::sign("example.org", 1, NOW, vec![1], &ca_key).unwrap();
    let e = answer(&key, &cert, &asked, &trust, Some(&crl), &v, &issuance, sign).unwrap_err();
    assert!(e.contains("revoked"), "{e}");
    // A certificate of a CA the issuer does not trust for nodes: nothing.
    let (foreign, _, _) = {
        let other = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let mut body = node("node-a");
        body.issuer = other.verifying_key().to_bytes();
        (body.sign(&other).unwrap(), (), ())
    };
    let e = answer(&key, &foreign, &asked, &trust, None, &v, &issuance, sign).unwrap_err();
    assert!(e.contains("node certificate refused"), "{e}");
}
