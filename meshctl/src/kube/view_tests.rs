use super::*;
use proptest::prelude::*;

fn pod(name: &str, uid: &str, node: Option<&str>, ips: &[&str]) -> Pod {
    Pod {
        namespace: "microblog".into(),
        name: name.into(),
        uid: uid.into(),
        node: node.map(str::to_string),
        service_account: "post".into(),
        labels: BTreeMap::from([("app".into(), "post".into())]),
        ports: vec!["http=8080/tcp".parse().unwrap()],
        ips: ips.iter().map(|a| a.parse().unwrap()).collect(),
        host_network: false,
        finished: false,
    }
}

fn node(name: &str, cidrs: &[&str]) -> Node {
    Node {
        name: name.into(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
    }
}

/// A view with namespace microblog, nodes node-1 (100.64.1.0/24) and node-2 (100.64.2.0/24).
fn view(pods: Vec<Pod>) -> KubeView {
    let mut v = KubeView::new("nodes");
    v.namespaces_listed(vec![Namespace {
        name: "microblog".into(),
        terminating: false,
    }]);
    v.nodes_listed(vec![
        node("node-1", &["100.64.1.0/24"]),
        node("node-2", &["100.64.2.0/24"]),
    ]);
    v.pods_listed(pods);
    v
}

fn addrs(v: &KubeView, name: &str) -> Vec<String> {
    v.workload("microblog", name)
        .map(|w| w.addrs.iter().map(|c| c.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn a_scheduled_pod_is_a_workload_of_its_node_with_an_address_from_the_nodes_block() {
    let v = view(vec![pod("post-1", "u1", Some("node-1"), &[])]);
    let w = v.workload("microblog", "post-1").unwrap();
    assert_eq!(w.node.to_string(), "nodes/node-1");
    assert_eq!(
        (w.service_account.as_str(), w.reference.uid.as_str()),
        ("post", "u1")
    );
    assert_eq!(w.labels["app"], "post");
    assert_eq!(w.ports[0].to_string(), "http=8080/tcp");
    let a: Cidr = addrs(&v, "post-1")[0].parse().unwrap();
    let block: Cidr = "100.64.1.0/24".parse().unwrap();
    assert!(block.contains(a.addr()) && a.prefix_len() == 32);
    // Never the network address, the node's own (.1) or broadcast.
    for reserved in ["100.64.1.0", "100.64.1.1", "100.64.1.255"] {
        assert_ne!(a.addr().to_string(), reserved);
    }
    assert_eq!(
        v.node_addresses("node-1").unwrap()[0].to_string(),
        "100.64.1.1/32"
    );
}

#[test]
fn a_reported_address_is_the_pods_own_and_never_given_to_another() {
    let mut v = view(vec![pod("post-1", "u1", Some("node-1"), &["100.64.1.77"])]);
    assert_eq!(addrs(&v, "post-1"), ["100.64.1.77/32"]);
    // Many new pods: none is given .77, no two the same.
    let mut seen = HashSet::new();
    for i in 0..200 {
        v.pod_applied(pod(
            &format!("p{i}"),
            &format!("uid-{i}"),
            Some("node-1"),
            &[],
        ));
        let a = addrs(&v, &format!("p{i}"));
        assert_eq!(a.len(), 1);
        assert_ne!(a[0], "100.64.1.77/32");
        assert!(seen.insert(a[0].clone()), "{} given twice", a[0]);
    }
}

#[test]
fn a_reported_address_outside_the_nodes_block_is_no_address_of_the_pod() {
    // A compromised node patches its pod's status with another node's pod's address, or its
    // own: the pod holds no address, and so is given no certificate.
    for stolen in ["100.64.2.23", "100.64.1.1", "100.64.1.0", "198.18.0.11"] {
        let v = view(vec![pod("thief", "u7", Some("node-1"), &[stolen])]);
        assert_eq!(addrs(&v, "thief"), Vec::<String>::new(), "{stolen}");
    }
}

#[test]
fn an_issuer_that_restarts_gives_a_pod_the_same_address_again() {
    let pods: Vec<Pod> = (0..20)
        .map(|i| pod(&format!("p{i}"), &format!("uid-{i}"), Some("node-2"), &[]))
        .collect();
    let first = view(pods.clone());
    let again = view(pods.into_iter().rev().collect());
    for i in 0..20 {
        assert_eq!(
            addrs(&first, &format!("p{i}")),
            addrs(&again, &format!("p{i}"))
        );
    }
}

#[test]
fn nothing_is_certified_before_every_watch_has_listed() {
    let mut v = KubeView::new("nodes");
    v.pods_listed(vec![pod("post-1", "u1", Some("node-1"), &["100.64.1.5"])]);
    v.nodes_listed(vec![node("node-1", &["100.64.1.0/24"])]);
    assert!(!v.ready());
    assert!(v.workload("microblog", "post-1").is_none());
    v.namespaces_listed(vec![Namespace {
        name: "microblog".into(),
        terminating: false,
    }]);
    assert!(v.ready());
    assert!(v.workload("microblog", "post-1").is_some());
}

#[test]
fn pods_that_do_not_run_here_as_themselves_are_no_workloads() {
    let mut host = pod("kube-proxy", "u2", Some("node-1"), &["198.18.0.1"]);
    host.host_network = true;
    let mut done = pod("job-1", "u3", Some("node-1"), &[]);
    done.finished = true;
    let unscheduled = pod("pending", "u4", None, &[]);
    let v = view(vec![host, done, unscheduled]);
    for name in ["kube-proxy", "job-1", "pending", "absent"] {
        assert!(v.workload("microblog", name).is_none(), "{name}");
    }
}

#[test]
fn a_namespace_being_deleted_or_unknown_certifies_nothing() {
    let mut v = view(vec![pod("post-1", "u1", Some("node-1"), &[])]);
    v.namespace_applied(Namespace {
        name: "microblog".into(),
        terminating: true,
    });
    assert!(v.workload("microblog", "post-1").is_none());
    v.namespace_deleted("microblog");
    assert!(v.workload("microblog", "post-1").is_none());
}

#[test]
fn a_pod_deleted_frees_its_address_and_a_new_pod_of_its_name_is_another_uid() {
    let mut v = view(vec![pod("post-1", "u1", Some("node-1"), &[])]);
    let before = addrs(&v, "post-1");
    v.pod_deleted("microblog", "post-1");
    assert!(v.workload("microblog", "post-1").is_none());
    assert!(v.assigned.is_empty());
    v.pod_applied(pod("post-1", "u9", Some("node-2"), &[]));
    let w = v.workload("microblog", "post-1").unwrap();
    assert_eq!(
        (w.reference.uid.as_str(), w.node.name.as_str()),
        ("u9", "node-2")
    );
    assert_ne!(addrs(&v, "post-1"), before);
}

#[test]
fn a_pod_on_a_node_without_a_block_waits_for_one_and_a_full_block_gives_none() {
    let mut v = view(vec![pod("a", "ua", Some("node-3"), &[])]);
    assert_eq!(addrs(&v, "a"), Vec::<String>::new());
    assert!(v.node_addresses("node-3").is_none());
    // A /30 has one address a pod may hold (.2): the first pod takes it, the second has none.
    v.node_applied(node("node-3", &["100.64.3.0/30"]));
    assert_eq!(addrs(&v, "a"), ["100.64.3.2/32"]);
    v.pod_applied(pod("b", "ub", Some("node-3"), &[]));
    assert_eq!(addrs(&v, "b"), Vec::<String>::new());
}

#[test]
fn a_dual_stack_node_gives_a_pod_one_address_of_each_family() {
    let mut v = view(vec![]);
    v.node_applied(node("node-6", &["100.64.6.0/24", "fd00:6::/64"]));
    v.pod_applied(pod("a", "ua", Some("node-6"), &[]));
    let a = addrs(&v, "a");
    assert_eq!(a.len(), 2);
    assert!(
        a[0].starts_with("100.64.6.") && a[1].starts_with("fd00:6::"),
        "{a:?}"
    );
    assert_eq!(
        v.node_addresses("node-6")
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["100.64.6.1/32", "fd00:6::1/128"]
    );
}

proptest! {
    /// However pods come and go, no address is held by two live pods, and each lies in its node's
    /// block.
    #[test]
    fn no_address_is_held_twice(ops in proptest::collection::vec((0u8..3, 0usize..40, 0usize..2), 1..200)) {
        let mut v = view(vec![]);
        v.node_applied(node("node-1", &["100.64.1.0/27"]));
        for (op, i, n) in ops {
            let name = format!("p{i}");
            match op {
                0 => v.pod_applied(pod(&name, &format!("u{i}-{n}"), Some(["node-1", "node-2"][n]), &[])),
                1 => v.pod_deleted("microblog", &name),
                _ => {
                    // The kubelet reports what the pod was given.
                    if let Some(w) = v.workload("microblog", &name) {
                        let mut p = pod(&name, &w.reference.uid, Some(&w.node.name), &[]);
                        p.ips = w.addrs.iter().map(|c| c.addr()).collect();
                        v.pod_applied(p);
                    }
                }
            }
            let mut held = HashSet::new();
            for i in 0..40 {
                if let Some(w) = v.workload("microblog", &format!("p{i}")) {
                    let block: Cidr = if w.node.name == "node-1" { "100.64.1.0/27" } else { "100.64.2.0/24" }.parse().unwrap();
                    for a in &w.addrs {
                        prop_assert!(block.contains(a.addr()));
                        prop_assert!(held.insert(a.addr()), "{} held twice", a);
                    }
                }
            }
        }
    }
}

fn policy() -> NodePolicy {
    NodePolicy {
        service_account: "kube-system/meshd".into(),
        audience: "meshd-issuer".into(),
    }
}

fn review() -> Review {
    Review {
        authenticated: true,
        error: None,
        username: "system:serviceaccount:kube-system:meshd".into(),
        audiences: vec!["meshd-issuer".into()],
        node: vec!["node-1".into()],
        pod_name: vec!["meshd-abcde".into()],
        pod_uid: vec!["m1".into()],
    }
}

/// A projected token of meshd's pod meshd-abcde (uid m1) on node-1, expiring at `exp`, with
/// `edit` applied to its claims.
fn jwt(exp: u64, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let mut claims = serde_json::json!({
        "aud": ["meshd-issuer"],
        "exp": exp,
        "iat": exp - 3600,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "kubernetes.io": {
            "namespace": "kube-system",
            "node": {"name": "node-1", "uid": "n1"},
            "pod": {"name": "meshd-abcde", "uid": "m1"},
            "serviceaccount": {"name": "meshd", "uid": "s1"}
        },
        "nbf": exp - 3600,
        "sub": "system:serviceaccount:kube-system:meshd"
    });
    edit(&mut claims);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"k"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"signature")
    )
}

/// The view of `view`, with meshd's pod meshd-abcde (uid m1) running on node-1.
fn with_meshd() -> KubeView {
    let mut v = view(vec![]);
    v.namespace_applied(Namespace {
        name: "kube-system".into(),
        terminating: false,
    });
    v.pod_applied(Pod {
        namespace: "kube-system".into(),
        service_account: "meshd".into(),
        host_network: true,
        ..pod("meshd-abcde", "m1", Some("node-1"), &["198.18.0.11"])
    });
    v
}

#[test]
fn a_projected_tokens_claims_are_read_and_junk_is_refused() {
    let c = token_claims(&jwt(5_000, |_| {})).unwrap();
    assert_eq!(c.audiences, vec!["meshd-issuer".to_string()]);
    assert_eq!(c.expires, 5_000);
    assert_eq!(c.subject, "system:serviceaccount:kube-system:meshd");
    assert_eq!(c.node, "node-1");
    assert_eq!(
        c.pod,
        BoundPod {
            name: "meshd-abcde".into(),
            uid: "m1".into()
        }
    );
    let one_audience = jwt(5_000, |c| c["aud"] = "meshd-issuer".into());
    assert_eq!(token_claims(&one_audience).unwrap().audiences.len(), 1);
    for (junk, says) in [
        ("", "not a service-account token"),
        ("a.b", "not a service-account token"),
        ("a.!!!.c", "not a service-account token"),
        ("a.e30.c", "not a service-account token"),
        (
            &jwt(5_000, |c| {
                c["kubernetes.io"]["pod"] = serde_json::Value::Null
            }),
            "not bound",
        ),
        (&"x".repeat(MAX_TOKEN_BYTES + 1), "over"),
    ] {
        let e = token_claims(junk).unwrap_err();
        assert!(e.contains(says), "{junk}: {e}");
    }
}

proptest! {
    #[test]
    fn no_token_text_makes_the_claims_reader_panic(s in ".{0,300}", parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 0..5)) {
        let _ = token_claims(&s);
        let _ = token_claims(&parts.join("."));
    }
}

#[test]
fn a_token_is_sent_for_review_only_if_it_names_a_running_meshd_pod_on_its_node() {
    let v = with_meshd();
    let ok = token_claims(&jwt(5_000, |_| {})).unwrap();
    assert_eq!(v.precheck(&ok, &policy(), 1_000), Ok(()));
    let cases: Vec<(String, u64, &str)> = vec![
        (
            jwt(5_000, |c| {
                c["aud"] = serde_json::json!(["https://kubernetes.default.svc"])
            }),
            1_000,
            "audience",
        ),
        (jwt(5_000, |_| {}), 5_000, "expired"),
        (
            jwt(5_000, |c| {
                c["sub"] = "system:serviceaccount:microblog:post".into()
            }),
            1_000,
            "may not join",
        ),
        (
            jwt(5_000, |c| c["kubernetes.io"]["pod"]["uid"] = "m2".into()),
            1_000,
            "no running pod",
        ),
        (
            jwt(5_000, |c| {
                c["kubernetes.io"]["pod"]["name"] = "meshd-zzzzz".into()
            }),
            1_000,
            "no running pod",
        ),
        (
            jwt(5_000, |c| {
                c["kubernetes.io"]["node"]["name"] = "node-2".into()
            }),
            1_000,
            "no running pod",
        ),
    ];
    for (token, now, says) in cases {
        let claims = token_claims(&token).unwrap();
        let e = v.precheck(&claims, &policy(), now).unwrap_err();
        assert!(e.contains(says), "{claims:?}: {e}");
    }
    // A pod of another account by the same name, or a finished one, is not meshd's.
    let mut other = with_meshd();
    other.pod_applied(Pod {
        namespace: "kube-system".into(),
        service_account: "default".into(),
        ..pod("meshd-abcde", "m1", Some("node-1"), &[])
    });
    assert!(other.precheck(&ok, &policy(), 1_000).is_err());
    let mut finished = with_meshd();
    finished.pod_applied(Pod {
        namespace: "kube-system".into(),
        service_account: "meshd".into(),
        finished: true,
        ..pod("meshd-abcde", "m1", Some("node-1"), &[])
    });
    assert!(finished.precheck(&ok, &policy(), 1_000).is_err());
    let mut deleted = with_meshd();
    deleted.pod_deleted("kube-system", "meshd-abcde");
    assert!(deleted.precheck(&ok, &policy(), 1_000).is_err());
}

#[test]
fn a_reviewed_token_joins_as_its_node_until_it_expires_and_only_for_its_own_pod() {
    let v = with_meshd();
    let claims = token_claims(&jwt(5_000, |_| {})).unwrap();
    assert_eq!(
        v.joining_node(&review(), &claims, &policy(), 1_000),
        Ok(JoiningNode {
            node: "node-1".into(),
            expires: 5_000
        })
    );
    for (r, says) in [
        (
            Review {
                pod_uid: vec![],
                ..review()
            },
            "bound to no pod",
        ),
        (
            Review {
                pod_uid: vec!["m2".into()],
                ..review()
            },
            "different pods",
        ),
        (
            Review {
                authenticated: false,
                ..review()
            },
            "did not authenticate",
        ),
    ] {
        let e = v.joining_node(&r, &claims, &policy(), 1_000).unwrap_err();
        assert!(e.contains(says), "{r:?}: {e}");
    }
    let e = v
        .joining_node(&review(), &claims, &policy(), 5_000)
        .unwrap_err();
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn a_restarted_issuer_assigns_nothing_in_its_grace_so_a_pod_certified_before_keeps_its_address() {
    // node-3's block has a single address for pods: 100.64.3.2.
    let pods = vec![
        pod("a-new", "u-new", Some("node-3"), &[]),
        pod("b-certified", "u-old", Some("node-3"), &[]),
    ];
    let listed = |mut v: KubeView| {
        v.namespaces_listed(vec![Namespace {
            name: "microblog".into(),
            terminating: false,
        }]);
        v.nodes_listed(vec![node("node-3", &["100.64.3.0/30"])]);
        v.pods_listed(pods.clone());
        v
    };
    // Without the grace, the relist gives the address by name order: to a-new, though
    // b-certified holds a certificate for it and the kubelet is about to report it.
    let hasty = listed(KubeView::new("nodes"));
    assert_eq!(addrs(&hasty, "a-new"), vec!["100.64.3.2/32"]);

    let mut v = listed(KubeView::restarted("nodes"));
    assert!(!v.assigning());
    assert!(addrs(&v, "a-new").is_empty() && addrs(&v, "b-certified").is_empty());
    v.pod_applied(pod("b-certified", "u-old", Some("node-3"), &["100.64.3.2"]));
    v.start_assigning();
    assert_eq!(addrs(&v, "b-certified"), vec!["100.64.3.2/32"]);
    assert!(addrs(&v, "a-new").is_empty(), "the block is full");
}

#[test]
fn a_reviewed_token_of_meshds_service_account_joins_as_its_node() {
    assert_eq!(reviewed_node(&review(), &policy()), Ok("node-1".into()));
}

#[test]
fn a_token_not_authenticated_for_the_audience_of_another_account_or_no_node_is_refused() {
    let cases: Vec<(Review, &str)> = vec![
        (
            Review {
                authenticated: false,
                error: Some("token has expired".into()),
                ..review()
            },
            "did not authenticate the token: token has expired",
        ),
        (
            Review {
                audiences: vec!["https://kubernetes.default.svc".into()],
                ..review()
            },
            "not for audience meshd-issuer",
        ),
        (
            Review {
                username: "system:serviceaccount:microblog:post".into(),
                ..review()
            },
            "may not join as a node",
        ),
        (
            Review {
                username: "system:node:node-1".into(),
                ..review()
            },
            "may not join as a node",
        ),
        (
            Review {
                node: vec![],
                ..review()
            },
            "names no node",
        ),
        (
            Review {
                node: vec!["a".into(), "b".into()],
                ..review()
            },
            "names no node",
        ),
        (
            Review {
                node: vec!["../etc".into()],
                ..review()
            },
            "names no node",
        ),
    ];
    for (r, says) in cases {
        let e = reviewed_node(&r, &policy()).unwrap_err();
        assert!(e.contains(says), "{r:?}: {e}");
    }
}
