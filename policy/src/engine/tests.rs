use super::*;
use crate::model::parse_documents;

const LOCAL: &str = "example.org";
const PARTNER: &str = "partner.org";

fn ep(ns: &str, name: &str, labels: &[(&str, &str)]) -> Endpoint {
    Endpoint {
        trust_domain: LOCAL.into(),
        namespace: ns.into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ip: None,
        ports: Vec::new(),
    }
}

/// Whether `s` lets TCP to `port` from `src` into `dst`.
fn admits(s: &PolicySet, port: u16, src: &Endpoint, dst: &Endpoint) -> bool {
    s.decide(Direction::Ingress, &tcp(port), src, dst).allow
}

fn tcp(port: u16) -> Flow {
    Flow {
        protocol: TCP,
        src_port: Some(40000),
        dst_port: Some(port),
        icmp: None,
        ip_version: 4,
    }
}

fn udp(port: u16) -> Flow {
    Flow {
        protocol: UDP,
        ..tcp(port)
    }
}

fn set(yaml: &str) -> PolicySet {
    let docs = parse_documents(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e:?}"));
    PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap_or_else(|e| panic!("{e:?}"))
        .in_trust_domain(LOCAL)
}

/// `e` as an identity of another trust domain.
fn remote(mut e: Endpoint) -> Endpoint {
    e.trust_domain = PARTNER.into();
    e
}

/// The seed's post-allow-list, unchanged: a federated `microblog/api` with the very labels and
/// namespace of the local one is still denied; a rule naming the trust domain admits it.
#[test]
fn local_policies_never_match_a_remote_identity() {
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/microblog/post-allow-list.yaml"
    ))
    .unwrap();
    let s = set(&format!("{NAMESPACE}---\n{seed}"));
    let api = ep("microblog", "api", &[("app", "api")]);
    assert!(admits(&s, 8080, &api, &post()));
    let v = s.decide(
        Direction::Ingress,
        &tcp(8080),
        &remote(api.clone()),
        &post(),
    );
    assert_eq!((v.allow, v.by.as_str()), (false, "end-of-policies"));
    // Nor does a policy that selects no identity in particular, or nets alone.
    let open = set(&format!(
        "{NAMESPACE}---{}",
        "
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: open}
spec:
  selector: all()
  ingress: [{action: Allow}, {action: Allow, source: {nets: [0.0.0.0/0]}}]
  egress: [{action: Allow}]
"
    ));
    assert!(admits(&open, 8080, &api, &post()));
    assert!(!admits(&open, 8080, &remote(api.clone()), &post()));
    // A remote identity is not governed by local policies either.
    let v = open.decide(Direction::Egress, &tcp(8080), &remote(api.clone()), &post());
    assert_eq!(v.by, "default-deny");
    // Naming the label, in any of the three selectors, is how a remote identity is admitted.
    for source in [
        "selector: mesh.io/trust-domain == 'partner.org'",
        "namespaceSelector: mesh.io/trust-domain == 'partner.org' && projectcalico.org/name == 'microblog'",
        "serviceAccounts: {selector: mesh.io/trust-domain == 'partner.org', names: [api]}",
    ] {
        let s = set(&format!(
            "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: partner-api, namespace: microblog}}
spec:
  selector: app == 'post'
  ingress: [{{action: Allow, protocol: TCP, source: {{{source}}}}}]
"
        ));
        assert!(admits(&s, 8080, &remote(api.clone()), &post()), "{source}");
        let mut third = remote(api.clone());
        third.trust_domain = "third.org".into();
        assert!(!admits(&s, 8080, &third, &post()), "{source}");
        // The local microblog/api is not of partner.org.
        assert!(!admits(&s, 8080, &api, &post()), "{source}");
    }
}

const NETWORKS: &str = "
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: partner-db, labels: {role: partner-db}}
spec:
  nets: [198.19.1.0/24, 'fd19::/64']
---
apiVersion: mesh.io/v1
kind: ExternalNetwork
metadata: {name: legacy, namespace: microblog, labels: {role: legacy}}
spec:
  nets: [198.19.2.0/24]
---
apiVersion: mesh.io/v1
kind: GlobalExternalNetwork
metadata: {name: internet, labels: {role: internet}}
spec:
  nets: [0.0.0.0/0]
";

fn ext(ip: &str) -> End<'static> {
    End::External(ip.parse().unwrap())
}

fn egress_to(s: &PolicySet, src: &Endpoint, dst: End, port: u16) -> Verdict {
    s.decide_ends(Direction::Egress, &tcp(port), End::Identity(src), dst)
}

/// Rules select external networks by label exactly as Calico selects network sets: a global
/// policy sees every network, a namespaced one the networks of its namespace, `namespaceSelector:
/// global()` the global ones; `nets` keeps working; service accounts never match an address.
#[test]
fn rules_select_external_networks_by_label_as_calico_selects_network_sets() {
    let policies = "
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-out, namespace: microblog}
spec:
  selector: app == 'api'
  egress:
    - action: Allow
      protocol: TCP
      destination: {selector: role == 'legacy', ports: [5432]}
    - action: Allow
      protocol: TCP
      destination: {selector: role == 'partner-db', namespaceSelector: global(), ports: [5432]}
    - action: Allow
      protocol: TCP
      destination: {nets: [198.19.9.0/24]}
    - action: Deny
      destination: {serviceAccounts: {names: [api]}}
";
    let s = set(&format!("{NAMESPACE}---{NETWORKS}---{policies}"));
    let api = ep("microblog", "api", &[("app", "api")]);
    let v = egress_to(&s, &api, ext("198.19.2.7"), 5432);
    assert_eq!((v.allow, v.rule.as_deref()), (true, Some("egress[0]")));
    let v = egress_to(&s, &api, ext("198.19.1.7"), 5432);
    assert_eq!((v.allow, v.rule.as_deref()), (true, Some("egress[1]")));
    let mut v6 = tcp(5432);
    v6.ip_version = 6;
    assert!(
        s.decide_ends(Direction::Egress, &v6, End::Identity(&api), ext("fd19::7"))
            .allow
    );
    assert!(
        !egress_to(&s, &api, ext("198.19.1.7"), 22).allow,
        "the port is part of the rule"
    );
    assert!(
        egress_to(&s, &api, ext("198.19.9.1"), 80).allow,
        "nets alone"
    );
    let v = egress_to(&s, &api, ext("198.19.3.1"), 5432);
    assert_eq!((v.allow, v.by.as_str()), (false, "end-of-policies"));
    // A namespaced policy's plain selector does not see global networks.
    let plain = set(&format!(
        "{NAMESPACE}---{NETWORKS}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: p, namespace: microblog}}
spec:
  selector: app == 'api'
  egress: [{{action: Allow, destination: {{selector: role == 'partner-db'}}}}]
"
    ));
    assert!(!egress_to(&plain, &api, ext("198.19.1.7"), 5432).allow);
    // A global policy's does.
    let global = set(&format!(
        "{NAMESPACE}---{NETWORKS}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: g}}
spec:
  selector: app == 'api'
  egress: [{{action: Allow, destination: {{selector: \"role in {{'partner-db', 'legacy'}}\"}}}}]
"
    ));
    assert!(egress_to(&global, &api, ext("198.19.1.7"), 5432).allow);
    assert!(egress_to(&global, &api, ext("198.19.2.7"), 5432).allow);
    assert!(
        !egress_to(&global, &api, ext("198.19.5.7"), 5432).allow,
        "internet is not selected"
    );
    let c = global.resolve(std::slice::from_ref(&api));
    assert_eq!(
        c.networks_at("198.19.1.7".parse().unwrap()),
        vec![
            "GlobalNetworkSet partner-db",
            "GlobalExternalNetwork internet"
        ]
    );
}

/// `global()` stands only in a rule's `namespaceSelector`, alone, as Calico's validator says; there
/// `all()` is every namespace and `global()` none, at any depth, as Calico rewrites them; an empty
/// `namespaceSelector` is the policy's own namespace.
#[test]
fn global_and_all_in_rule_namespace_selectors_as_calico_means_them() {
    let refused = |spec: &str| {
        let yaml = format!(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: microblog}}\nspec:\n{spec}"
        );
        let docs = crate::model::parse_documents(&yaml, "p.yaml").unwrap();
        let errors = PolicySet::compile(&docs, Posture::ZeroTrust).unwrap_err();
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let e = refused("  selector: global()\n  ingress: [{action: Allow}]\n");
    assert!(
        e.contains("spec.selector")
            && e.contains("global() can only be used in an EntityRule namespaceSelector"),
        "{e}"
    );
    let e = refused(
        "  selector: all()\n  ingress: [{action: Allow, source: {selector: \"a == 'global('\"}}]\n",
    );
    assert!(e.contains("spec.ingress[0].source.selector"), "{e}");
    let e = refused("  selector: all()\n  ingress: [{action: Allow, source: {namespaceSelector: global() || has(x)}}]\n");
    assert!(
        e.contains("namespaceSelector")
            && e.contains("global() cannot be combined with other selectors"),
        "{e}"
    );

    let api = ep("microblog", "api", &[("app", "api")]);
    let other = ep("shop", "api", &[("app", "api")]);
    let with = |nsel: &str| {
        set(&format!(
            "{NAMESPACE}---{NETWORKS}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: g}}
spec:
  selector: all()
  egress: [{{action: Allow, destination: {{selector: \"role in {{'legacy', 'partner-db'}} || app == 'api'\", namespaceSelector: \"{nsel}\"}}}}]
"
        ))
    };
    let to = |s: &PolicySet, dst: End| egress_to(s, &api, dst, 5432).allow;
    let every_namespace = with("all()");
    assert!(to(&every_namespace, End::Identity(&other)));
    assert!(
        to(&every_namespace, ext("198.19.2.7")),
        "a namespaced network"
    );
    assert!(!to(&every_namespace, ext("198.19.1.7")), "not a global one");
    let no_namespace = with("!all()");
    assert!(!to(&no_namespace, End::Identity(&other)));
    assert!(!to(&no_namespace, ext("198.19.2.7")));
    assert!(to(&no_namespace, ext("198.19.1.7")), "!all() is global()");
    let either = with("app == 'microblog' || !all()");
    assert!(to(&either, ext("198.19.1.7")) && to(&either, End::Identity(&api)));
    assert!(!to(&either, End::Identity(&other)));
    // Empty: the policy's own namespace (for a global policy, any).
    let own = set(&format!(
        "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: p, namespace: microblog}}
spec:
  selector: all()
  egress: [{{action: Allow, destination: {{selector: app == 'api', namespaceSelector: ''}}}}]
"
    ));
    assert!(to(&own, End::Identity(&api)));
    assert!(!to(&own, End::Identity(&other)));
}

/// Traffic from an external network into the mesh: the destination's ingress decides, with the
/// network (by label, or by `nets`) as the source; Kubernetes pod selectors never match it.
#[test]
fn ingress_from_an_external_network_and_kubernetes_peers() {
    let s = set(&format!(
        "{NAMESPACE}---{NETWORKS}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: from-legacy, namespace: microblog}}
spec:
  selector: app == 'post'
  ingress: [{{action: Allow, protocol: TCP, source: {{selector: role == 'legacy'}}, destination: {{ports: [8080]}}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: k, namespace: microblog}}
spec:
  podSelector: {{matchLabels: {{app: search}}}}
  ingress:
    - from: [{{podSelector: {{}}}}]
    - from: [{{ipBlock: {{cidr: 198.19.1.0/24}}}}]
      ports: [{{port: 443}}]
"
    ));
    let into = |dst: &Endpoint, src: &str, port| {
        s.decide_ends(Direction::Ingress, &tcp(port), ext(src), End::Identity(dst))
    };
    assert!(into(&post(), "198.19.2.9", 8080).allow);
    assert!(!into(&post(), "198.19.1.9", 8080).allow);
    let search = ep("microblog", "search", &[("app", "search")]);
    assert!(
        !into(&search, "198.19.2.9", 80).allow,
        "a pod selector is not an address"
    );
    assert!(into(&search, "198.19.1.9", 443).allow, "ipBlock is");
    // Nothing governs the external end.
    let v = s.decide_ends(
        Direction::Egress,
        &tcp(8080),
        ext("198.19.2.9"),
        End::Identity(&post()),
    );
    assert_eq!((v.allow, v.by.as_str()), (false, "outside-the-mesh"));
}

#[test]
fn bad_external_networks_are_named() {
    let errs = parse_documents(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: x, namespace: a}\nspec: {nets: [10.0.0.0/8]}\n",
        "t.yaml",
    )
    .unwrap_err();
    assert!(errs[0].message.contains("not namespaced"), "{errs:?}");
    let docs = parse_documents(
        "apiVersion: mesh.io/v1\nkind: ExternalNetwork\nmetadata: {name: x}\nspec: {nets: [nope]}\n",
        "t.yaml",
    )
    .unwrap();
    let e = PolicySet::compile(&docs, Posture::ZeroTrust).unwrap_err();
    assert_eq!(e[0].policy, "ExternalNetwork default/x");
    assert!(e[0].field.starts_with("spec.nets"), "{e:?}");
}

/// Naming the label is not enough: it must pin the trust domain in every alternative, and no
/// posture lets a remote identity through.
#[test]
fn a_rule_admits_a_remote_identity_only_if_it_pins_the_trust_domain() {
    let rule = |source: &str| {
        set(&format!(
            "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: g}}
spec:
  selector: app == 'post'
  ingress: [{{action: Allow, source: {{{source}}}}}]
"
        ))
    };
    let mut third = remote(ep("microblog", "fe", &[("app", "frontend")]));
    third.trust_domain = "third.org".into();
    for loose in [
        "selector: \"app == 'frontend' || mesh.io/trust-domain == 'partner.org'\"",
        "notSelector: \"mesh.io/trust-domain == 'evil.org'\"",
        "selector: \"has(mesh.io/trust-domain)\"",
        "selector: \"mesh.io/trust-domain != 'x'\"",
    ] {
        assert!(!admits(&rule(loose), 8080, &third, &post()), "{loose}");
    }
    let pinned = rule(
        "selector: \"mesh.io/trust-domain in {'third.org', 'partner.org'} && app == 'frontend'\"",
    );
    assert!(admits(&pinned, 8080, &third, &post()));
    // Calico's posture allows what no policy selects, but not for a remote identity.
    let mut calico = set(NAMESPACE);
    calico.posture = Posture::Calico;
    let v = calico.decide(Direction::Egress, &tcp(8080), &third, &post());
    assert_eq!((v.allow, v.by.as_str()), (false, "default-deny"));
    assert!(
        calico
            .decide(Direction::Egress, &tcp(8080), &post(), &third)
            .allow
    );
    let c = calico.resolve(&[post(), third.clone()]);
    assert!(
        !c.decide(Direction::Egress, &tcp(8080), 1, None, 0, None)
            .allow
    );
    assert!(
        c.decide(Direction::Egress, &tcp(8080), 0, None, 1, None)
            .allow
    );
}

/// A peer without an identity is matched by rules that select no identity in particular,
/// whether or not identities of another trust domain are resolved too.
#[test]
fn a_peer_without_an_identity_matches_open_rules_only() {
    let s = set(&format!(
        "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: p, namespace: microblog}}
spec:
  selector: app == 'post'
  ingress:
    - {{action: Allow, protocol: TCP, destination: {{ports: [8080]}}}}
    - {{action: Allow, protocol: TCP, source: {{selector: app == 'api'}}}}
"
    ));
    for ids in [
        vec![post()],
        vec![post(), remote(ep("microblog", "api", &[]))],
    ] {
        let c = s.resolve(&ids);
        assert!(
            c.decide(Direction::Ingress, &tcp(8080), UNKNOWN, None, 0, None)
                .allow
        );
        assert!(
            !c.decide(Direction::Ingress, &tcp(9090), UNKNOWN, None, 0, None)
                .allow
        );
    }
}

#[test]
fn two_federations_never_share_an_address() {
    let ca = |td: &str, seed: u8| {
        crate::federation::tests::ca(td, seed)
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let fed = |td: &str, seed, addrs: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: Federation\nmetadata: {{name: {td}}}\nspec:\n  addresses: [{addrs}]\n  bundle: |\n{}",
            ca(td, seed)
        )
    };
    let two = |b_addrs: &str| {
        let text = format!(
            "{}---\n{}",
            fed("a.org", 1, "100.65.0.0/16"),
            fed("b.org", 2, b_addrs)
        );
        PolicySet::compile(
            &parse_documents(&text, "t.yaml").unwrap(),
            Posture::ZeroTrust,
        )
    };
    let e = two("100.65.7.0/24").unwrap_err();
    assert_eq!(e[0].field, "spec.addresses", "{e:?}");
    assert!(e[0].message.contains("a.org"), "{e:?}");
    assert_eq!(two("100.66.0.0/16").unwrap().federations().len(), 2);
}

/// A remote namespace of the same name is not the local one: its labels come from nowhere.
#[test]
fn a_remote_namespace_has_none_of_the_local_namespace_labels() {
    let s = set(&format!(
        "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: p, namespace: microblog}}
spec:
  selector: app == 'post'
  ingress: [{{action: Allow, source: {{namespaceSelector: app == 'microblog' && has(mesh.io/trust-domain)}}}}]
"
    ));
    let api = ep("microblog", "api", &[]);
    assert!(admits(&s, 8080, &api, &post()));
    assert!(!admits(&s, 8080, &remote(api), &post()));
}

#[test]
fn the_trust_domain_label_cannot_be_forged_by_labels() {
    let s = set(&format!(
        "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: p, namespace: microblog}}
spec:
  selector: app == 'post'
  ingress: [{{action: Allow, source: {{selector: mesh.io/trust-domain == 'example.org'}}}}]
"
    ));
    let forged = remote(ep("microblog", "api", &[("mesh.io/trust-domain", LOCAL)]));
    assert!(!admits(&s, 8080, &forged, &post()));
    assert!(admits(&s, 8080, &ep("microblog", "api", &[]), &post()));
}

const NAMESPACE: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: microblog
  labels:
    app: microblog
";

/// The guide's post allow-list by service-account names.
const POST_BY_NAMES: &str = "
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
spec:
  selector: app == 'post'
  ingress:
    - action: Allow
      protocol: TCP
      source:
        serviceAccounts:
          names: ['api', 'search']
        namespaceSelector: app == 'microblog'
      destination:
        ports:
          - 8080
";

/// The guide's second form: by service-account label.
const POST_BY_LABEL: &str = "
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
spec:
  selector: app == 'post'
  ingress:
    - action: Allow
      protocol: TCP
      source:
        serviceAccounts:
          selector: svc-post == 'access'
        namespaceSelector: app == 'microblog'
      destination:
        ports:
          - 8080
";

fn post() -> Endpoint {
    ep("microblog", "post", &[("app", "post")])
}

#[test]
fn zero_trust_denies_what_no_policy_selects() {
    let s = set(NAMESPACE);
    let v = s.decide(
        Direction::Ingress,
        &tcp(8080),
        &ep("microblog", "api", &[]),
        &post(),
    );
    assert_eq!((v.allow, v.by.as_str()), (false, "default-deny"));
    let mut calico = s.clone();
    calico.posture = Posture::Calico;
    assert!(
        calico
            .decide(
                Direction::Ingress,
                &tcp(8080),
                &ep("microblog", "api", &[]),
                &post()
            )
            .allow
    );
}

#[test]
fn post_allow_list_by_service_account_names() {
    let s = set(&format!("{NAMESPACE}---{POST_BY_NAMES}"));
    for src in ["api", "search"] {
        let v = s.decide(
            Direction::Ingress,
            &tcp(8080),
            &ep("microblog", src, &[("app", src)]),
            &post(),
        );
        assert!(v.allow, "{src}: {v:?}");
        assert_eq!(
            (v.by.as_str(), v.rule.as_deref()),
            (
                "NetworkPolicy microblog/post-allow-list",
                Some("ingress[0]")
            )
        );
    }
    let user = ep("microblog", "user", &[("app", "user")]);
    let v = s.decide(Direction::Ingress, &tcp(8080), &user, &post());
    assert_eq!((v.allow, v.by.as_str()), (false, "end-of-policies"));
    let api = ep("microblog", "api", &[]);
    assert!(
        !s.decide(Direction::Ingress, &tcp(9090), &api, &post())
            .allow,
        "port scoped"
    );
    let udp = Flow {
        protocol: UDP,
        ..tcp(8080)
    };
    assert!(
        !s.decide(Direction::Ingress, &udp, &api, &post()).allow,
        "protocol scoped"
    );
    let foreign = ep("other", "api", &[]);
    assert!(
        !s.decide(Direction::Ingress, &tcp(8080), &foreign, &post())
            .allow,
        "namespace scoped"
    );
}

#[test]
fn post_allow_list_by_service_account_label_and_namespace_selector() {
    let s = set(&format!("{NAMESPACE}---{POST_BY_LABEL}"));
    let access = ep("microblog", "search", &[("svc-post", "access")]);
    assert!(
        s.decide(Direction::Ingress, &tcp(8080), &access, &post())
            .allow
    );
    let none = ep("microblog", "search", &[]);
    assert!(
        !s.decide(Direction::Ingress, &tcp(8080), &none, &post())
            .allow
    );
    let elsewhere = ep("staging", "search", &[("svc-post", "access")]);
    assert!(
        !s.decide(Direction::Ingress, &tcp(8080), &elsewhere, &post())
            .allow,
        "namespace label app=microblog required"
    );
}

/// Calico's tiers: tier by tier by order; a tier counts for an endpoint and a direction only if
/// one of its policies selects the endpoint and has that direction among its types; Pass skips
/// the rest of the tier; the end of a tier that counts denies, or passes with `defaultAction:
/// Pass`; past the last tier the posture decides.
#[test]
fn tiers_pass_and_the_end_of_a_tier_as_calico_evaluates_them() {
    let yaml = "
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: platform}
spec: {order: 300, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.blocklist}
spec:
  tier: security
  order: 1
  selector: all()
  types: [Ingress]
  ingress:
    - action: Deny
      source: {selector: quarantined == 'true'}
    - action: Pass
      source: {selector: app == 'api'}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.later}
spec:
  tier: security
  order: 2
  selector: all()
  types: [Ingress]
  ingress:
    - action: Allow
      source: {selector: app == 'api'}
    - action: Allow
      source: {selector: app == 'search'}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: platform.monitoring}
spec:
  tier: platform
  selector: app == 'post'
  ingress:
    - action: Allow
      source: {selector: app == 'prometheus'}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: post-allow-list, namespace: microblog}
spec:
  selector: app == 'post'
  ingress:
    - action: Allow
      source: {selector: app == 'api'}
";
    let s = set(yaml);
    let post = ep("microblog", "post", &[("app", "post")]);
    let from = |labels: &[(&str, &str)]| {
        s.decide(
            Direction::Ingress,
            &tcp(8080),
            &ep("microblog", "x", labels),
            &post,
        )
    };
    // Denied in the first tier, whatever later tiers say.
    let v = from(&[("app", "api"), ("quarantined", "true")]);
    assert_eq!(
        (v.allow, v.by.as_str()),
        (false, "GlobalNetworkPolicy security.blocklist")
    );
    // Pass skips security.later (which would allow) and the end of the security tier; platform
    // decides nothing and passes at its end; the default tier allows.
    let v = from(&[("app", "api")]);
    assert_eq!(
        (v.allow, v.by.as_str()),
        (true, "NetworkPolicy microblog/post-allow-list")
    );
    // Allowed in the first tier: later tiers are never asked.
    let v = from(&[("app", "search")]);
    assert_eq!(
        (v.allow, v.by.as_str()),
        (true, "GlobalNetworkPolicy security.later")
    );
    // Nothing in the security tier decides: its end denies (Calico's defaultAction Deny).
    let v = from(&[("app", "prometheus")]);
    assert_eq!((v.allow, v.by.as_str()), (false, "end-of-tier security"));
    // Egress: no policy of the security tier has Egress among its types, so that tier does not
    // count; platform.monitoring has (types default to Ingress only): nothing selects.
    let v = s.decide(
        Direction::Egress,
        &tcp(8080),
        &post,
        &ep("microblog", "x", &[]),
    );
    assert_eq!((v.allow, v.by.as_str()), (false, "default-deny"));

    // The same through the fast path, with the same names.
    let ids = [
        post.clone(),
        ep("microblog", "x", &[("app", "api")]),
        ep("microblog", "x", &[("app", "prometheus")]),
    ];
    let c = s.resolve(&ids);
    let fast = |src: u32| c.decide(Direction::Ingress, &tcp(8080), src, None, 0, None);
    assert_eq!(
        c.policy_name(&fast(1)),
        "NetworkPolicy microblog/post-allow-list"
    );
    assert!(fast(1).allow);
    let v = fast(2);
    assert_eq!(
        (v.allow, v.reason, c.policy_name(&v)),
        (false, Reason::EndOfTier, "end-of-tier security")
    );

    // Everything passed, past the last tier: zero trust denies, Calico's posture allows.
    let passing = "
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: first}
spec: {order: 1, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: first.p}
spec:
  tier: first
  selector: all()
  ingress: [{action: Pass, protocol: TCP}]
";
    let mut s = set(passing);
    let a = ep("microblog", "a", &[]);
    let v = s.decide(Direction::Ingress, &tcp(1), &a, &post);
    assert_eq!(
        (v.allow, v.by.as_str()),
        (false, "passed by GlobalNetworkPolicy first.p")
    );
    let v = s.decide(Direction::Ingress, &udp(1), &a, &post);
    assert_eq!((v.allow, v.by.as_str()), (false, "passed by tier first"));
    s.posture = Posture::Calico;
    assert!(s.decide(Direction::Ingress, &udp(1), &a, &post).allow);
    let c = s.resolve(&[a.clone(), post.clone()]);
    let v = c.decide(Direction::Ingress, &udp(1), 0, None, 1, None);
    assert_eq!(
        (v.allow, v.reason, c.policy_name(&v)),
        (true, Reason::Pass, "tier first")
    );
}

/// Policies in audit mode report what they would deny and never switch off the enforced ones: a
/// denial an audit-mode policy decides is decided again without the audit-mode policies; it
/// passes if that allows it, or if audit-mode policies alone select the identity.
#[test]
fn audit_mode_policies_never_switch_off_enforced_ones_in_any_tier() {
    let yaml = format!(
        "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {{name: trial}}
spec: {{order: 100}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: trial.probe, annotations: {{policy.mesh/audit: 'true'}}}}
spec:
  tier: trial
  selector: all()
  ingress:
    - action: Deny
      source: {{selector: app == 'search'}}
    - action: Allow
      protocol: TCP
      destination: {{ports: [443]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: db-in, namespace: microblog}}
spec:
  selector: app == 'db'
  ingress:
    - action: Allow
      source: {{selector: \"app in {{'api', 'search'}}\"}}
"
    );
    let s = set(&yaml);
    let ids = [
        ep("microblog", "db", &[("app", "db")]),
        ep("microblog", "web", &[("app", "web")]),
        ep("microblog", "api", &[("app", "api")]),
        ep("microblog", "search", &[("app", "search")]),
        ep("microblog", "lonely", &[("app", "lonely")]),
    ];
    let c = s.resolve(&ids);
    let fate = |src: u32, dst: u32| {
        let f = tcp(5432);
        let v = c.decide(Direction::Ingress, &f, src, None, dst, None);
        let audit = c.audit(Direction::Ingress, &f, (src, None), (dst, None), &v);
        (v, audit)
    };
    // web -> db: the end of the audit-only tier would deny; the enforced db-in denies too.
    let (v, audit) = fate(1, 0);
    assert_eq!((v.allow, c.policy_name(&v)), (false, "end-of-tier trial"));
    let Some(Audit::Denied(enforced)) = audit else {
        panic!("{audit:?}")
    };
    assert_eq!(c.policy_name(&enforced), "end-of-policies");
    // search -> db: the audit-mode Deny is reported; db-in allows, so it passes.
    let (v, audit) = fate(3, 0);
    assert_eq!(
        (v.allow, c.policy_name(&v)),
        (false, "GlobalNetworkPolicy trial.probe")
    );
    assert_eq!(audit, Some(Audit::Passes));
    // lonely is selected by the audit-mode policy alone: a log-only rollout, it passes.
    let (v, audit) = fate(1, 4);
    assert!(!v.allow);
    assert_eq!(audit, Some(Audit::Passes));
    // A denial no audit-mode policy decided is not audit's business.
    let yaml2 = yaml.replace("policy.mesh/audit: 'true'", "x: 'y'");
    let c2 = set(&yaml2).resolve(&ids);
    let v = c2.decide(Direction::Ingress, &tcp(5432), 3, None, 0, None);
    assert_eq!(
        c2.audit(Direction::Ingress, &tcp(5432), (3, None), (0, None), &v),
        None
    );
}

/// A policy cannot make every node resolve millions of rules: a direction has at most
/// MAX_RULES, a Kubernetes rule counting once per peer and port.
#[test]
fn rule_counts_are_bounded() {
    let peers = vec!["{podSelector: {}}"; 200].join(", ");
    let ports = vec!["{port: 80}"; 100].join(", ");
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: big, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{peers}], ports: [{ports}]}}]\n"
    );
    let docs = parse_documents(&yaml, "big.yaml").unwrap();
    let e = PolicySet::compile(&docs, Posture::ZeroTrust).unwrap_err();
    assert!(e[0].to_string().contains("20000 rules"), "{e:?}");
    let rules = vec!["{action: Allow}"; compile::MAX_RULES + 1].join(", ");
    let yaml = format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: big}}\nspec:\n  egress: [{rules}]\n"
    );
    let docs = parse_documents(&yaml, "big.yaml").unwrap();
    let e = PolicySet::compile(&docs, Posture::ZeroTrust).unwrap_err();
    assert!(
        e[0].to_string().contains("spec.egress") && e[0].to_string().contains("at most"),
        "{e:?}"
    );
}

/// Tiers as Calico defines them: `default` always exists at order 1,000,000; a tier without an
/// order is there too (then by name); a policy names an existing tier; `defaultAction` is Deny or
/// Pass.
#[test]
fn tier_objects_are_checked() {
    let refused = |yaml: &str| {
        let docs = crate::model::parse_documents(yaml, "t.yaml").unwrap();
        let errors = PolicySet::compile(&docs, Posture::ZeroTrust).unwrap_err();
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let e = refused(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x.p}\nspec: {tier: x, selector: all()}\n",
    );
    assert!(e.contains("spec.tier") && e.contains("no Tier `x`"), "{e}");
    let e = refused("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: x}\nspec: {defaultAction: Allow}\n");
    assert!(
        e.contains("spec.defaultAction") && e.contains("`Allow` is not Deny or Pass"),
        "{e}"
    );
    let e = refused("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: default}\nspec: {order: 5}\n");
    assert!(e.contains("the default tier's order is 1000000"), "{e}");
    // An unordered tier sits with default, before it by name ("a" < "default").
    let s = set("
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: a}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: a.deny}
spec: {tier: a, selector: all(), ingress: [{action: Deny}]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow}
spec: {order: 1, selector: all(), ingress: [{action: Allow}]}
");
    let v = s.decide(Direction::Ingress, &tcp(1), &ep("a", "b", &[]), &post());
    assert_eq!(v.by, "GlobalNetworkPolicy a.deny");
}

/// Staged policies decide nothing; the staged view is the enforced set with the staged policies
/// beside the enforced ones (Calico's pending evaluation), less the enforced policies a staged
/// Delete names. The three staged kinds compile as their enforced kinds do.
#[test]
fn staged_policies_are_evaluated_beside_the_enforced_set_without_deciding() {
    let yaml = format!(
        "{NAMESPACE}---{POST_BY_NAMES}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: allow-all-egress}}
spec:
  selector: all()
  types: [Egress]
  egress: [{{action: Allow}}]
---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {{name: post-tighter, namespace: microblog}}
spec:
  order: 1
  selector: app == 'post'
  ingress:
    - action: Deny
      source: {{serviceAccounts: {{names: [search]}}}}
---
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata: {{name: allow-all-egress}}
spec:
  stagedAction: Delete
---
apiVersion: projectcalico.org/v3
kind: StagedKubernetesNetworkPolicy
metadata: {{name: api-egress, namespace: microblog}}
spec:
  stagedAction: Set
  podSelector: {{matchLabels: {{app: api}}}}
  policyTypes: [Egress]
  egress:
    - to: [{{podSelector: {{matchLabels: {{app: post}}}}}}]
      ports: [{{port: 8080}}]
"
    );
    let s = set(&yaml);
    let search = ep("microblog", "search", &[("app", "search")]);
    let api = ep("microblog", "api", &[("app", "api")]);
    let user = ep("microblog", "user", &[("app", "user")]);
    // The enforced set is unchanged by what is staged.
    assert!(s.has_staged());
    assert!(admits(&s, 8080, &search, &post()));
    assert!(s.decide(Direction::Egress, &tcp(5432), &api, &user).allow);
    let view = s.staged_view().unwrap();
    let v = view.decide(Direction::Ingress, &tcp(8080), &search, &post());
    assert_eq!(
        (v.allow, v.by.as_str()),
        (false, "StagedNetworkPolicy microblog/post-tighter")
    );
    assert!(
        view.decide(Direction::Ingress, &tcp(8080), &api, &post())
            .allow
    );
    // The Delete takes allow-all-egress out; the staged Kubernetes policy allows api -> post.
    let v = view.decide(Direction::Egress, &tcp(5432), &api, &user);
    assert_eq!((v.allow, v.by.as_str()), (false, "end-of-policies"));
    let v = view.decide(Direction::Egress, &tcp(8080), &api, &post());
    assert_eq!(
        (v.allow, v.by.as_str()),
        (true, "StagedKubernetesNetworkPolicy microblog/api-egress")
    );
    let v = view.decide(Direction::Egress, &tcp(5432), &user, &api);
    assert_eq!((v.allow, v.by.as_str()), (false, "default-deny"));
    // The fast path agrees.
    let ids = [search.clone(), post(), api.clone(), user.clone()];
    let c = view.resolve(&ids);
    let v = c.decide(Direction::Ingress, &tcp(8080), 0, None, 1, None);
    assert_eq!(
        (v.allow, c.policy_name(&v)),
        (false, "StagedNetworkPolicy microblog/post-tighter")
    );
    // Nothing staged, no view.
    assert!(set(POST_BY_NAMES).staged_view().is_none());
    // Among policies of equal order, a staged one sorts by the name it will have once promoted:
    // staged `a` (deny) comes before enforced `b` (allow), as promoted `a` would.
    let equal = "
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: b, namespace: microblog}
spec:
  order: 10
  selector: app == 'post'
  ingress: [{action: Allow}]
---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {name: a, namespace: microblog}
spec:
  order: 10
  selector: app == 'post'
  ingress: [{action: Deny}]
";
    let v = set(equal)
        .staged_view()
        .unwrap()
        .decide(Direction::Ingress, &tcp(1), &search, &post());
    assert_eq!(
        (v.allow, v.by.as_str()),
        (false, "StagedNetworkPolicy microblog/a")
    );
    // A staged version of an enforced policy stands in its place: what promoting it would do.
    let next = format!(
        "{NAMESPACE}---{POST_BY_NAMES}---{}",
        POST_BY_NAMES
            .replace("kind: NetworkPolicy", "kind: StagedNetworkPolicy")
            .replace("names: ['api', 'search']", "names: ['api']")
    );
    let s = set(&next);
    assert!(admits(&s, 8080, &search, &post()));
    let view = s.staged_view().unwrap();
    let v = view.decide(Direction::Ingress, &tcp(8080), &search, &post());
    assert_eq!((v.allow, v.by.as_str()), (false, "end-of-policies"));
    let v = view.decide(Direction::Ingress, &tcp(8080), &api, &post());
    assert_eq!(
        (v.allow, v.by.as_str()),
        (true, "StagedNetworkPolicy microblog/post-allow-list")
    );

    let refused = |yaml: &str| {
        let docs = crate::model::parse_documents(yaml, "s.yaml");
        let errors: Vec<String> = match docs {
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
            Ok(docs) => PolicySet::compile(&docs, Posture::ZeroTrust)
                .unwrap_err()
                .iter()
                .map(|e| e.to_string())
                .collect(),
        };
        errors.join("\n")
    };
    let e = refused("apiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: {name: x}\nspec: {stagedAction: Delete, selector: all()}\n");
    assert!(
        e.contains("a staged Delete has no fields but tier and stagedAction"),
        "{e}"
    );
    let e = refused("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec: {stagedAction: Set}\n");
    assert!(
        e.contains("spec.stagedAction") && e.contains("only the Staged kinds"),
        "{e}"
    );
    let e = refused("apiVersion: projectcalico.org/v3\nkind: StagedNetworkPolicy\nmetadata: {name: x}\nspec: {stagedAction: Maybe}\n");
    assert!(
        e.contains("`Maybe` is not Set, Delete, Learn or Ignore"),
        "{e}"
    );
}

fn with_ports(mut e: Endpoint, ports: &[&str]) -> Endpoint {
    e.ports = ports.iter().map(|p| p.parse().unwrap()).collect();
    e.ports.sort();
    e
}

/// Named ports, as Calico and Kubernetes match container ports: a rule's `ports: [http]` is the
/// destination identity's port of that name and protocol (the source's in `source.ports`), an
/// address outside the mesh has none, and the fast path agrees.
#[test]
fn rules_that_name_ports_match_the_identities_named_ports() {
    let yaml = format!(
        "{NAMESPACE}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: post-in, namespace: microblog}}
spec:
  selector: app == 'post'
  ingress:
    - action: Deny
      protocol: TCP
      destination: {{ports: [debug]}}
    - action: Allow
      protocol: TCP
      source: {{selector: app == 'api'}}
      destination: {{ports: [http, 9000]}}
    - action: Allow
      destination: {{ports: [dns]}}
    - action: Allow
      protocol: TCP
      source: {{selector: app == 'api', ports: [client]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: api-out, namespace: microblog}}
spec:
  selector: app == 'api'
  egress:
    - action: Allow
      protocol: TCP
      destination: {{ports: [http], notPorts: [admin]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: user-in, namespace: microblog}}
spec:
  podSelector: {{matchLabels: {{app: user}}}}
  ingress:
    - ports: [{{port: http}}]
"
    );
    let s = set(&yaml);
    let post = with_ports(
        ep("microblog", "post", &[("app", "post")]),
        &[
            "http=8080/tcp",
            "debug=8081/tcp",
            "dns=53/udp",
            "admin=8080/tcp",
        ],
    );
    let api = with_ports(
        ep("microblog", "api", &[("app", "api")]),
        &["client=40000/tcp"],
    );
    let user = with_ports(
        ep("microblog", "user", &[("app", "user")]),
        &["http=7000/tcp"],
    );
    let flow = |protocol, sport, dport| Flow {
        protocol,
        src_port: Some(sport),
        dst_port: Some(dport),
        icmp: None,
        ip_version: 4,
    };
    let cases: &[(&Endpoint, &Endpoint, Direction, Flow, bool, &str)] = &[
        (
            &api,
            &post,
            Direction::Ingress,
            flow(TCP, 1, 8080),
            true,
            "http is post's 8080/TCP",
        ),
        (
            &api,
            &post,
            Direction::Ingress,
            flow(TCP, 1, 9000),
            true,
            "a number beside a name",
        ),
        (
            &api,
            &post,
            Direction::Ingress,
            flow(TCP, 1, 8081),
            false,
            "debug is denied first",
        ),
        (
            &api,
            &post,
            Direction::Ingress,
            flow(TCP, 1, 7000),
            false,
            "7000 is user's http",
        ),
        (
            &api,
            &post,
            Direction::Ingress,
            flow(UDP, 1, 8080),
            false,
            "post names no 8080/UDP",
        ),
        (
            &api,
            &post,
            Direction::Ingress,
            flow(UDP, 1, 53),
            true,
            "a named port alone takes its protocol",
        ),
        (
            &api,
            &post,
            Direction::Ingress,
            flow(TCP, 1, 53),
            false,
            "dns is 53/UDP",
        ),
        (
            &api,
            &post,
            Direction::Ingress,
            flow(TCP, 40000, 22),
            true,
            "source port named client",
        ),
        (
            &api,
            &post,
            Direction::Egress,
            flow(TCP, 1, 8080),
            false,
            "post's admin is 8080/TCP too: a not-port",
        ),
        (
            &api,
            &user,
            Direction::Egress,
            flow(TCP, 1, 7000),
            true,
            "the destination's http",
        ),
        (
            &api,
            &user,
            Direction::Egress,
            flow(TCP, 1, 8080),
            false,
            "post's http is not user's",
        ),
        (
            &post,
            &user,
            Direction::Ingress,
            flow(TCP, 1, 7000),
            true,
            "Kubernetes: the pod's own port",
        ),
        (
            &post,
            &user,
            Direction::Ingress,
            flow(TCP, 1, 8080),
            false,
            "Kubernetes: not the peer's",
        ),
    ];
    let ids = [api.clone(), post.clone(), user.clone()];
    let c = s.resolve(&ids);
    let idx = |e: &Endpoint| ids.iter().position(|x| x == e).unwrap() as u32;
    for (src, dst, dir, f, allow, why) in cases {
        let v = s.decide(*dir, f, src, dst);
        assert_eq!(v.allow, *allow, "{why}: {v:?}");
        let fast = c.decide(*dir, f, idx(src), None, idx(dst), None);
        assert_eq!(fast.allow, *allow, "fast path: {why}");
    }
    // An address outside the mesh never has a named port.
    let v = s.decide_ends(
        Direction::Egress,
        &flow(TCP, 1, 8080),
        End::Identity(&api),
        ext("198.19.1.1"),
    );
    assert!(!v.allow);

    let refused = |rule: &str| {
        let yaml = format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: x}}\nspec:\n  selector: all()\n  ingress: [{rule}]\n"
        );
        let docs = crate::model::parse_documents(&yaml, "x.yaml").unwrap();
        let e = PolicySet::compile(&docs, Posture::ZeroTrust).unwrap_err();
        e.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let e = refused("{action: Allow, protocol: ICMP, destination: {ports: [http]}}");
    assert!(
        e.contains("named ports need protocol TCP, UDP or SCTP"),
        "{e}"
    );
    let e = refused("{action: Allow, protocol: TCP, destination: {ports: [Http_1]}}");
    assert!(
        e.contains("`Http_1` is not a port, a range like 8000:8080 or a port name"),
        "{e}"
    );
    let e = refused("{action: Allow, destination: {ports: [80]}}");
    assert!(e.contains("ports need protocol"), "{e}");
}

#[test]
fn order_deny_pass_and_log() {
    let yaml = "
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-debug}
spec:
  order: 10
  selector: all()
  ingress:
    - action: Log
    - action: Deny
      source: {selector: debug == 'true'}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: pass-legacy}
spec:
  order: 20
  selector: all()
  ingress:
    - action: Pass
      source: {selector: legacy == 'true'}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-all}
spec:
  order: 100
  selector: all()
  ingress:
    - action: Allow
";
    let s = set(yaml);
    let dst = ep("a", "b", &[]);
    let v = s.decide(
        Direction::Ingress,
        &tcp(1),
        &ep("x", "y", &[("debug", "true")]),
        &dst,
    );
    assert_eq!(
        (v.allow, v.by.as_str(), v.rule.as_deref()),
        (false, "GlobalNetworkPolicy deny-debug", Some("ingress[1]"))
    );
    assert_eq!(v.logged, vec!["GlobalNetworkPolicy deny-debug"]);
    let v = s.decide(
        Direction::Ingress,
        &tcp(1),
        &ep("x", "y", &[("legacy", "true")]),
        &dst,
    );
    assert_eq!(
        (v.allow, v.by.as_str()),
        (false, "passed by GlobalNetworkPolicy pass-legacy")
    );
    let v = s.decide(Direction::Ingress, &tcp(1), &ep("x", "y", &[]), &dst);
    assert_eq!(
        (v.allow, v.by.as_str()),
        (true, "GlobalNetworkPolicy allow-all")
    );
    let v = s.decide(Direction::Egress, &tcp(1), &dst, &ep("x", "y", &[]));
    assert_eq!(
        (v.allow, v.by.as_str()),
        (false, "default-deny"),
        "no egress policy selects it"
    );
}

#[test]
fn kubernetes_network_policy() {
    let yaml = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  podSelector:
    matchLabels: {app: db}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        - podSelector:
            matchExpressions:
              - {key: role, operator: In, values: [api, worker]}
        - namespaceSelector:
            matchLabels: {team: ops}
      ports:
        - {protocol: TCP, port: 5432, endPort: 5433}
  egress:
    - to:
        - ipBlock: {cidr: 100.64.0.0/16, except: [100.64.9.0/24]}
      ports:
        - {protocol: UDP, port: 53}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: ops}}
";
    let s = set(yaml);
    let db = ep("prod", "db", &[("app", "db")]);
    let api = |ns| ep(ns, "a", &[("role", "api")]);
    assert!(admits(&s, 5433, &api("prod"), &db), "inside port..endPort");
    assert!(!admits(&s, 5434, &api("prod"), &db), "past endPort");
    assert!(
        !admits(&s, 5432, &api("dev"), &db),
        "podSelector alone: same namespace"
    );
    assert!(
        admits(&s, 5432, &ep("ops", "x", &[]), &db),
        "namespaceSelector alone: any pod there"
    );
    let dns = Flow {
        protocol: UDP,
        src_port: Some(5000),
        dst_port: Some(53),
        icmp: None,
        ip_version: 4,
    };
    let mut resolver = ep("infra", "dns", &[]);
    resolver.ip = Some("100.64.1.53".parse().unwrap());
    assert!(s.decide(Direction::Egress, &dns, &db, &resolver).allow);
    resolver.ip = Some("100.64.9.53".parse().unwrap());
    assert!(
        !s.decide(Direction::Egress, &dns, &db, &resolver).allow,
        "except"
    );
}

#[test]
fn bad_documents_are_refused_with_file_document_field_and_column() {
    let bad_field = format!(
        "{NAMESPACE}---{}",
        POST_BY_NAMES.replace("protocol: TCP", "protocl: TCP")
    );
    let e = parse_documents(&bad_field, "policies.yaml").unwrap_err();
    let msg = e[0].to_string();
    // FILE:LINE:COLUMN at the bad key itself.
    let line_of = |text: &str, msg: &str| -> (usize, usize) {
        let mut at = msg.split(':').skip(1).map(|n| n.parse::<usize>().unwrap());
        let (l, c) = (at.next().unwrap(), at.next().unwrap());
        let line = text.lines().nth(l - 1).unwrap();
        (l, line[c - 1..].len())
    };
    let (l, _) = line_of(&bad_field, &msg);
    let line = bad_field.lines().nth(l - 1).unwrap();
    assert!(line.contains("protocl"), "{msg} points at `{line}`");
    assert!(
        msg.contains(": document 2 (NetworkPolicy/post-allow-list): spec.ingress[0]"),
        "{msg}"
    );
    assert!(msg.contains("unknown field `protocl`"), "{msg}");

    let bad_selector = POST_BY_NAMES.replace("app == 'post'", "app == 'post");
    let (located, _) = crate::model::parse_located(&bad_selector, "p.yaml");
    let docs: Vec<_> = located.iter().map(|(_, d)| d.clone()).collect();
    let e = PolicySet::compile(&docs, Posture::ZeroTrust).unwrap_err();
    let msg = e[0].at(Some(&located[0].0));
    let (l, _) = line_of(&bad_selector, &msg);
    let line = bad_selector.lines().nth(l - 1).unwrap();
    assert!(
        line.trim_start().starts_with("selector: app == 'post"),
        "{msg} points at `{line}`"
    );
    assert!(
        msg.contains(": document 1 (NetworkPolicy microblog/post-allow-list): spec.selector"),
        "{msg}"
    );
    assert!(msg.contains("column 8"), "{msg}");

    let bad_port = POST_BY_NAMES.replace("- 8080", "- '9000:8000'");
    let e = PolicySet::compile(
        &parse_documents(&bad_port, "p.yaml").unwrap(),
        Posture::ZeroTrust,
    )
    .unwrap_err();
    assert!(
        e[0].to_string()
            .contains("spec.ingress[0].destination.ports"),
        "{:?}",
        e
    );
    let e =
        parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", "p.yaml").unwrap_err();
    assert!(e[0].message.contains("kind `Pod`"), "{e:?}");
    assert!(parse_documents("a: [", "p.yaml").is_err());
}

mod compiled {
    use super::*;
    use proptest::prelude::*;

    const SETS: &[&str] = &[NAMESPACE, POST_BY_NAMES, POST_BY_LABEL];

    const FEDERATED: &str = "
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: f}
spec:
  order: 7
  selector: app == 'post'
  ingress:
    - action: Allow
      protocol: TCP
      source: {namespaceSelector: mesh.io/trust-domain == 'partner.org', selector: app == 'api'}
";

    fn all_sets() -> PolicySet {
        let order = "
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: g}
spec:
  order: 5
  selector: tier in {'fe', 'be'}
  types: [Ingress, Egress]
  ingress:
    - action: Log
    - action: Deny
      protocol: UDP
      source: {notSelector: app == 'post', namespaceSelector: all()}
    - action: Pass
      source: {selector: tier == 'be'}
  egress:
    - action: Allow
      protocol: TCP
      destination: {ports: ['8000:8100'], notNets: [100.64.9.0/24]}
";
        let by_network = "
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: n, namespace: microblog}
spec:
  order: 6
  selector: all()
  egress:
    - action: Allow
      protocol: TCP
      destination: {selector: role == 'legacy'}
    - action: Deny
      destination: {selector: role == 'partner-db', namespaceSelector: global()}
  ingress:
    - action: Allow
      source: {selector: has(role)}
";
        // Tiers: one ahead of default that passes at its end, one that denies at its end.
        let tiers = "
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: platform}
spec: {order: 200}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.quarantine}
spec:
  tier: security
  selector: app == 'post'
  types: [Ingress, Egress]
  ingress:
    - action: Deny
      protocol: UDP
    - action: Pass
      source: {selector: app == 'api'}
  egress:
    - action: Allow
      protocol: TCP
      destination: {ports: [8100]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: platform.fe}
spec:
  tier: platform
  selector: tier == 'fe'
  ingress:
    - action: Allow
      protocol: TCP
      destination: {ports: ['8000:8010']}
    - action: Pass
      protocol: TCP
      destination: {ports: ['8011:8050']}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: named}
spec:
  order: 1
  selector: has(app)
  types: [Ingress, Egress]
  ingress:
    - action: Allow
      destination: {ports: [web]}
  egress:
    - action: Deny
      protocol: TCP
      destination: {notPorts: [ops, '8090:8095']}
      source: {ports: [web]}
";
        let yaml = format!(
            "{}---{}---{order}---{FEDERATED}---{NETWORKS}---{by_network}---{tiers}",
            SETS[0], SETS[1]
        );
        set(&yaml)
    }

    fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
        (
            prop_oneof![Just("microblog"), Just("other")],
            prop_oneof![Just("api"), Just("search"), Just("post"), Just("user")],
            proptest::option::of(prop_oneof![Just("post"), Just("api")]),
            proptest::option::of(prop_oneof![Just("fe"), Just("be")]),
            proptest::option::of(0u8..=10),
            any::<bool>(),
            proptest::option::of(prop_oneof![
                Just("web=8000/tcp"),
                Just("web=8020/udp"),
                Just("ops=8099/tcp")
            ]),
        )
            .prop_map(|(ns, name, app, tier, ip, local, port)| {
                let mut e = ep(ns, name, &[]);
                if let Some(p) = port {
                    e.ports = vec![p.parse().unwrap()];
                }
                if !local {
                    e = remote(e);
                }
                if let Some(a) = app {
                    e.labels.insert("app".into(), a.into());
                }
                if let Some(t) = tier {
                    e.labels.insert("tier".into(), t.into());
                }
                e.ip = ip.map(|x| {
                    format!("100.64.{}.1", if x > 5 { 9 } else { x })
                        .parse()
                        .unwrap()
                });
                e
            })
    }

    proptest! {
        /// The resolved fast path decides exactly as the interpreter does.
        #[test]
        fn compiled_agrees_with_the_interpreter(
            ids in proptest::collection::vec(arb_endpoint(), 2..8),
            pairs in proptest::collection::vec((0usize..8, 0usize..8, prop_oneof![Just(TCP), Just(UDP)], 7990u16..8110), 1..20),
            calico in any::<bool>(),
        ) {
            let mut s = all_sets();
            if calico {
                s.posture = Posture::Calico;
            }
            let c = s.resolve(&ids);
            for (a, b, proto, port) in pairs {
                let (a, b) = (a % ids.len(), b % ids.len());
                let flow = Flow { protocol: proto, src_port: Some(40000), dst_port: Some(port), icmp: None, ip_version: 4 };
                // Each end an identity, or (for one in three) an address outside the mesh.
                let end = |i: usize| -> (End, u32, Option<std::net::IpAddr>) {
                    if i % 3 == 2 {
                        let ip: std::net::IpAddr = format!("198.19.{}.9", i % 4).parse().unwrap();
                        (End::External(ip), EXTERNAL, Some(ip))
                    } else {
                        (End::Identity(&ids[i]), i as u32, ids[i].ip)
                    }
                };
                let ((src, si, sip), (dst, di, dip)) = (end(a), end(b));
                for dir in [Direction::Ingress, Direction::Egress] {
                    let slow = s.decide_ends(dir, &flow, src, dst);
                    if slow.by == "outside-the-mesh" {
                        continue;
                    }
                    let fast = c.decide(dir, &flow, si, sip, di, dip);
                    prop_assert_eq!(fast.allow, slow.allow, "{:?} {:?} {:?}", dir, slow, fast);
                    let name = c.policy_name(&fast);
                    prop_assert!(slow.by.ends_with(name) || slow.by == name, "{} vs {}", slow.by, name);
                    prop_assert_eq!(fast.logged, !slow.logged.is_empty());
                }
            }
        }

        /// Resolving some identities and extending with the rest decides as resolving all at once.
        #[test]
        fn extending_agrees_with_resolving_everything(
            ids in proptest::collection::vec(arb_endpoint(), 2..8),
            first in 1usize..8,
            pairs in proptest::collection::vec((0usize..8, 0usize..8, prop_oneof![Just(TCP), Just(UDP)], 7990u16..8110), 1..20),
        ) {
            let s = all_sets();
            let first = first.min(ids.len());
            let whole = s.resolve(&ids);
            let mut grown = s.resolve(&ids[..first]);
            grown.extend(&s, &ids[first..]);
            prop_assert_eq!(grown.identities(), ids.len());
            for (a, b, proto, port) in pairs {
                let (a, b) = (a % ids.len(), b % ids.len());
                let flow = Flow { protocol: proto, src_port: Some(40000), dst_port: Some(port), icmp: None, ip_version: 4 };
                for dir in [Direction::Ingress, Direction::Egress] {
                    let x = whole.decide(dir, &flow, a as u32, ids[a].ip, b as u32, ids[b].ip);
                    let y = grown.decide(dir, &flow, a as u32, ids[a].ip, b as u32, ids[b].ip);
                    prop_assert_eq!(x, y);
                }
            }
        }
    }
}
