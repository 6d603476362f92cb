//! Workload identities across whole nodes on the simulated underlay: announced, derived into
//! peers and routes, withdrawn, reused on another node, and what a hostile member can do.

use super::node::Event;
use crate::mesh::sim::{overlay, Sim};
use proto::cert::Certificate;
use proto::Cidr;

/// A formed mesh of `n` nodes on a lossless network.
fn formed(n: usize, seed: u64) -> Sim {
    let mut sim = Sim::new(n, seed);
    sim.start_all();
    assert!(
        sim.run_until(10_000, Sim::full_mesh).is_some(),
        "the mesh formed"
    );
    sim
}

fn addr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// Pod `name` at `address`, bound to node `on`'s key, valid from `secs` after a minute ago (a
/// larger `secs` is a newer certificate) for an hour.
fn pod(sim: &Sim, on: usize, name: &str, address: &str, serial: u64, secs: u64) -> Certificate {
    let not_before = sim.now_ms / 1000 - 60 + secs;
    let secret = sim.nodes[on].secret().clone();
    sim.pods_ca.issue(
        &secret,
        name,
        addr(address),
        serial,
        not_before,
        not_before + 3600,
    )
}

fn set(sim: &mut Sim, on: usize, pods: Vec<Certificate>) {
    sim.handle(on, Event::Workloads(pods)).unwrap();
}

/// What node `i` has installed as node `of`'s allowed IPs.
fn allowed(sim: &Sim, i: usize, of: usize) -> Vec<Cidr> {
    let key = sim.nodes[of].public();
    sim.nodes[i]
        .host
        .peers
        .get(&key)
        .map(|p| p.1.clone())
        .unwrap_or_default()
}

#[test]
fn a_node_s_workloads_are_its_allowed_ips_and_routes_everywhere_until_it_withdraws_them() {
    let mut sim = formed(3, 1);
    let web = pod(&sim, 0, "web", "100.64.200.1/32", 100, 0);
    let api = pod(&sim, 0, "api", "100.64.200.2/32", 101, 0);
    set(&mut sim, 0, vec![api.clone(), web.clone()]);
    assert_eq!(sim.nodes[0].host.own_workloads, [web.clone(), api.clone()]);
    assert!(sim.nodes[0].host.workloads_refused.is_empty());
    sim.run(600);
    let both = vec![overlay(0), addr("100.64.200.1/32"), addr("100.64.200.2/32")];
    for i in 1..3 {
        assert_eq!(allowed(&sim, i, 0), both, "node {i}");
        assert!(sim.nodes[i].host.routes.contains(&addr("100.64.200.2/32")));
        assert_eq!(
            sim.nodes[i].node().workloads_of(&sim.nodes[0].public()),
            [web.clone(), api.clone()]
        );
    }
    // Node 0's own addresses on its interface stay its certificate's: pods are behind veths.
    assert_eq!(
        sim.nodes[0].host.addresses,
        [overlay(0)].into_iter().collect()
    );
    set(&mut sim, 0, vec![api]);
    sim.run(600);
    for i in 1..3 {
        assert_eq!(allowed(&sim, i, 0), [overlay(0), addr("100.64.200.2/32")]);
        assert!(!sim.nodes[i].host.routes.contains(&addr("100.64.200.1/32")));
    }
    set(&mut sim, 0, vec![]);
    sim.run(600);
    assert_eq!(allowed(&sim, 1, 0), [overlay(0)]);
}

#[test]
fn a_withdrawn_workload_is_out_of_force_on_every_member_within_5_s_under_20_percent_loss() {
    for seed in 1..=5 {
        let mut sim = formed(6, seed);
        sim.loss_pct = 20;
        let web = pod(&sim, 0, "web", "100.64.200.1/32", 100, 0);
        set(&mut sim, 0, vec![web]);
        sim.run(5_000);
        sim.loss_pct = 20;
        set(&mut sim, 0, vec![]);
        let gone = |sim: &Sim| (1..6).all(|i| allowed(sim, i, 0) == [overlay(0)]);
        let t = sim.run_until(5_000, gone);
        assert!(t.is_some(), "seed {seed}: still in force after 5 s");
    }
}

#[test]
fn a_restarted_member_learns_the_workloads_again_from_its_greeting() {
    let mut sim = formed(2, 3);
    let web = pod(&sim, 0, "web", "100.64.200.1/32", 100, 0);
    set(&mut sim, 0, vec![web]);
    sim.run(1_000);
    sim.kill(1);
    sim.run(1_000);
    sim.start(1);
    let back = |sim: &Sim| allowed(sim, 1, 0).contains(&addr("100.64.200.1/32"));
    assert!(sim.run_until(5_000, back).is_some());
}

#[test]
fn an_address_reused_on_another_node_goes_to_the_newest_certificate() {
    let mut sim = formed(3, 4);
    let old = pod(&sim, 0, "web-1", "100.64.200.1/32", 100, 0);
    set(&mut sim, 0, vec![old.clone()]);
    sim.run(500);
    // The pod is rescheduled on node 1 with the same address; node 0, stale or hostile, keeps
    // announcing the old certificate.
    let new = pod(&sim, 1, "web-2", "100.64.200.1/32", 101, 10);
    set(&mut sim, 1, vec![new]);
    sim.run(500);
    assert_eq!(allowed(&sim, 2, 1), [overlay(1), addr("100.64.200.1/32")]);
    assert_eq!(allowed(&sim, 2, 0), [overlay(0)]);
    assert!(
        sim.nodes[0].host.own_workloads.is_empty(),
        "node 0 is told its pod moved"
    );
    set(&mut sim, 0, vec![old.clone()]);
    sim.run(500);
    assert_eq!(allowed(&sim, 2, 0), [overlay(0)]);
    assert_eq!(allowed(&sim, 2, 1), [overlay(1), addr("100.64.200.1/32")]);
    assert!(
        sim.nodes[0]
            .host
            .workloads_refused
            .iter()
            .any(|(_, why)| why.contains("older")),
        "{:?}",
        sim.nodes[0].host.workloads_refused
    );
    // Even after the new pod is gone, the old certificate stays refused.
    set(&mut sim, 1, vec![]);
    sim.run(500);
    set(&mut sim, 0, vec![old]);
    sim.run(500);
    assert_eq!(allowed(&sim, 2, 0), [overlay(0)]);
}

#[test]
fn a_member_cannot_announce_a_workload_bound_to_another_key_or_holding_a_node_address() {
    let mut sim = formed(3, 5);
    // A certificate of node 1's pod, which node 0 got hold of, announced by node 0.
    let theirs = pod(&sim, 1, "web", "100.64.200.1/32", 100, 0);
    // A pod certificate for node 2's own address, bound to node 0.
    let on_node = pod(&sim, 0, "sneaky", &overlay(2).to_string(), 101, 0);
    let node = sim.nodes[0].node.as_mut().unwrap();
    // Past node 0's own checks: straight onto the wire, sealed by node 0.
    let actions = node.announce_unchecked(vec![theirs, on_node], sim.now_ms, &mut sim.rng);
    sim.carry_out(0, actions);
    sim.run(500);
    assert_eq!(allowed(&sim, 2, 0), [overlay(0)]);
    assert_eq!(allowed(&sim, 1, 0), [overlay(0)]);
    assert_eq!(allowed(&sim, 1, 2), [overlay(2)]);
    for i in 1..3 {
        let refused = sim.nodes[i].node().control_status().refused;
        assert_eq!(
            refused.get("workload_key_mismatch"),
            Some(&1),
            "{refused:?}"
        );
        assert_eq!(
            refused.get("workload_address_conflict"),
            Some(&1),
            "{refused:?}"
        );
    }
}

#[test]
fn own_workloads_that_are_not_valid_here_are_refused_with_the_reason() {
    let mut sim = formed(2, 6);
    let theirs = pod(&sim, 1, "web", "100.64.200.1/32", 100, 0);
    let expired = {
        let secret = sim.nodes[0].secret().clone();
        sim.pods_ca
            .issue(&secret, "old", addr("100.64.200.2/32"), 101, 0, 1)
    };
    let good = pod(&sim, 0, "api", "100.64.200.3/32", 102, 0);
    set(&mut sim, 0, vec![theirs, expired, good.clone()]);
    assert_eq!(sim.nodes[0].host.own_workloads, [good]);
    let reasons: Vec<&str> = sim.nodes[0]
        .host
        .workloads_refused
        .iter()
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("another key")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("expired") || r.contains("valid")),
        "{reasons:?}"
    );
}

#[test]
fn an_expiring_workload_certificate_leaves_every_member_on_its_own() {
    let mut sim = formed(2, 7);
    let secret = sim.nodes[0].secret().clone();
    let now = sim.now_ms / 1000;
    let short = sim.pods_ca.issue(
        &secret,
        "web",
        addr("100.64.200.1/32"),
        100,
        now - 1,
        now + 5,
    );
    set(&mut sim, 0, vec![short]);
    sim.run(1_000);
    assert!(allowed(&sim, 1, 0).contains(&addr("100.64.200.1/32")));
    sim.run(6_000);
    assert_eq!(allowed(&sim, 1, 0), [overlay(0)]);
    assert!(sim.nodes[0].host.own_workloads.is_empty());
}

#[test]
fn a_workload_certificate_is_never_a_member_and_a_node_certificate_never_a_workload() {
    let mut sim = formed(3, 8);
    let key0 = sim.nodes[0].public();
    // Node 0, compromised, presents its pod's certificate (bound to its key) as its own: the
    // members keep its node certificate and count the refusal.
    let w = pod(&sim, 0, "web", "100.64.200.1/32", 100, 0);
    let secret = sim.nodes[0].secret().clone();
    let bundle = sim.nodes[0].bundle.clone();
    sim.handle(
        0,
        Event::Renew {
            secret,
            certificate: w.clone(),
            bundle,
        },
    )
    .unwrap();
    sim.run(500);
    for i in 1..3 {
        let m = &sim.nodes[i].node().members()[&key0];
        assert_eq!(m.certificate.body.name, "node0", "node {i}");
        let refused = sim.nodes[i].node().control_status().refused;
        assert!(
            refused.get("workload_as_member").is_some_and(|n| *n >= 1),
            "{refused:?}"
        );
        assert_eq!(allowed(&sim, i, 0), [overlay(0)]);
    }
    // Node 1 announces its node certificate as a workload: not from a workload CA, refused.
    let own = sim.nodes[1].certificate.clone();
    let node = sim.nodes[1].node.as_mut().unwrap();
    let actions = node.announce_unchecked(vec![own], sim.now_ms, &mut sim.rng);
    sim.carry_out(1, actions);
    sim.run(500);
    let refused = sim.nodes[2].node().control_status().refused;
    assert_eq!(
        refused.get("workload_not_a_workload"),
        Some(&1),
        "{refused:?}"
    );
}

fn reference(name: &str) -> proto::workload::WorkloadRef {
    proto::workload::WorkloadRef {
        namespace: "microblog".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

#[test]
fn a_restarted_node_announces_its_saved_workloads_and_withdraws_those_detached_while_down() {
    let mut sim = formed(2, 9);
    let web = pod(&sim, 0, "web", "100.64.200.1/32", 100, 0);
    let api = pod(&sim, 0, "api", "100.64.200.2/32", 101, 0);
    set(&mut sim, 0, vec![web.clone(), api.clone()]);
    sim.run(500);
    assert_eq!(allowed(&sim, 1, 0).len(), 3);
    // Down; while it is down, api is detached (its saved attachments keep web only).
    sim.kill(0);
    sim.nodes[0].host.saved.attached = vec![(reference("web"), Some(web.clone()))];
    sim.run(1_000);
    assert_eq!(allowed(&sim, 1, 0).len(), 3, "node 1 still holds both");
    sim.start(0);
    let back = |sim: &Sim| allowed(sim, 1, 0) == [overlay(0), addr("100.64.200.1/32")];
    assert!(
        sim.run_until(5_000, back).is_some(),
        "{:?}",
        allowed(&sim, 1, 0)
    );
    assert_eq!(sim.nodes[0].host.own_workloads, [web]);
    // Down again with nothing attached: everything is withdrawn at start.
    sim.kill(0);
    sim.nodes[0].host.saved.attached = Vec::new();
    sim.start(0);
    let gone = |sim: &Sim| allowed(sim, 1, 0) == [overlay(0)];
    assert!(sim.run_until(5_000, gone).is_some());
}

/// A formed mesh of `n` nodes that ask the simulated issuer (certificates of `lifetime` s).
fn with_issuer(n: usize, seed: u64, lifetime: u64) -> Sim {
    let mut sim = Sim::new(n, seed);
    sim.with_issuer(lifetime);
    sim.start_all();
    assert!(
        sim.run_until(10_000, Sim::full_mesh).is_some(),
        "the mesh formed"
    );
    sim
}

/// Two nodes asking the simulated issuer (certificates of `lifetime` s), node 0 running web
/// (100.64.200.1) and api (100.64.200.2), both in force on node 1.
fn web_and_api_on_node_0(seed: u64, lifetime: u64) -> Sim {
    let mut sim = with_issuer(2, seed, lifetime);
    sim.schedule("web", 0, "100.64.200.1/32");
    sim.schedule("api", 0, "100.64.200.2/32");
    sim.handle(0, Event::Attach(reference("web"))).unwrap();
    sim.handle(0, Event::Attach(reference("api"))).unwrap();
    sim.run(1_000);
    assert_eq!(allowed(&sim, 1, 0).len(), 3);
    sim
}

/// The certificate node `i` holds in force for workload `name`.
fn in_force(sim: &Sim, i: usize, of: usize, name: &str) -> Option<Certificate> {
    let key = sim.nodes[of].public();
    let list = if i == of {
        sim.nodes[i].host.own_workloads.clone()
    } else {
        sim.nodes[i].node().workloads_of(&key).to_vec()
    };
    list.into_iter().find(|c| c.body.name == name)
}

#[test]
fn an_attached_workload_gets_its_identity_from_the_issuer_only_on_the_node_that_runs_it() {
    let mut sim = with_issuer(3, 10, 3600);
    sim.schedule("web", 0, "100.64.200.1/32");
    sim.schedule("api", 1, "100.64.200.2/32");
    sim.handle(0, Event::Attach(reference("web"))).unwrap();
    sim.handle(0, Event::Attach(reference("api"))).unwrap();
    sim.run(1_000);
    let outcomes = &sim.nodes[0].host.attached;
    let web = outcomes.iter().find(|(w, _)| w.name == "web").unwrap();
    assert_eq!(
        web.1.as_ref().unwrap().body.identity(),
        "example.org/microblog/web"
    );
    let api = outcomes.iter().find(|(w, _)| w.name == "api").unwrap();
    assert!(
        api.1
            .as_ref()
            .unwrap_err()
            .contains("does not run on node prod/node0"),
        "{api:?}"
    );
    for i in 1..3 {
        assert_eq!(
            allowed(&sim, i, 0),
            [overlay(0), addr("100.64.200.1/32")],
            "node {i}"
        );
    }
    // Without an issuer in the configuration, attaching is refused at once.
    let mut plain = formed(2, 11);
    assert!(matches!(
        plain.handle(0, Event::Attach(reference("web"))),
        Err(super::Refusal::NoIssuer)
    ));
}

#[test]
fn a_workload_keeps_its_identity_through_a_10_minute_issuer_outage_and_is_renewed_after_it() {
    // Certificates of 20 minutes, renewed from 10 minutes on; the issuer is down from minute 9
    // to minute 19.
    let mut sim = with_issuer(2, 12, 1200);
    sim.schedule("web", 0, "100.64.200.1/32");
    sim.handle(0, Event::Attach(reference("web"))).unwrap();
    sim.run(1_000);
    let first = in_force(&sim, 1, 0, "web").expect("in force on node 1");
    sim.run(8 * 60_000);
    sim.issuer.as_mut().unwrap().down = true;
    for _ in 0..60 {
        sim.run(10_000);
        assert_eq!(
            in_force(&sim, 1, 0, "web"),
            Some(first.clone()),
            "kept at {} s",
            sim.now_ms / 1000
        );
    }
    sim.issuer.as_mut().unwrap().down = false;
    sim.run(15_000);
    let renewed = in_force(&sim, 1, 0, "web").expect("still in force");
    assert!(
        renewed.body.not_before > first.body.not_before,
        "renewed after the outage"
    );
    // Past the first certificate's end, the renewed one holds.
    sim.run(2 * 60_000);
    assert!(sim.now_ms / 1000 > first.body.not_after);
    assert!(in_force(&sim, 1, 0, "web").is_some());
    assert!(allowed(&sim, 1, 0).contains(&addr("100.64.200.1/32")));
}

#[test]
fn a_workload_gone_from_the_issuer_s_view_loses_its_identity_at_its_renewal_and_one_that_outlives_an_outage_lapses(
) {
    let mut sim = web_and_api_on_node_0(13, 120);
    // web is deleted: refused at half-life, withdrawn.
    sim.issuer
        .as_mut()
        .unwrap()
        .view
        .remove(&("microblog".into(), "web".into()));
    let gone = |sim: &Sim| !allowed(sim, 1, 0).contains(&addr("100.64.200.1/32"));
    let t = sim.run_until(70_000, gone).expect("withdrawn at renewal");
    assert!(t >= 55_000, "not before half-life: {t} ms");
    // The issuer goes down for longer than api's certificate lives: it lapses everywhere.
    sim.issuer.as_mut().unwrap().down = true;
    let lapsed = |sim: &Sim| !allowed(sim, 1, 0).contains(&addr("100.64.200.2/32"));
    assert!(sim.run_until(130_000, lapsed).is_some());
    assert!(sim.nodes[0].host.own_workloads.is_empty());
}

#[test]
fn a_workload_deleted_while_its_node_was_down_is_withdrawn_when_the_node_restarts_not_at_its_renewal(
) {
    // Hour-long certificates: without asking at restart, web would stay for half an hour.
    let mut sim = web_and_api_on_node_0(14, 3600);
    let api = in_force(&sim, 1, 0, "api").unwrap();
    // Down; web is deleted meanwhile, and its CNI DEL found meshd down: the saved attachments
    // still hold it, with a young certificate.
    sim.kill(0);
    assert_eq!(sim.nodes[0].host.saved.attached.len(), 2);
    sim.issuer
        .as_mut()
        .unwrap()
        .view
        .remove(&("microblog".into(), "web".into()));
    sim.run(2_000);
    sim.start(0);
    let gone = |sim: &Sim| !allowed(sim, 1, 0).contains(&addr("100.64.200.1/32"));
    assert!(
        sim.run_until(5_000, gone).is_some(),
        "{:?}",
        allowed(&sim, 1, 0)
    );
    assert!(in_force(&sim, 0, 0, "web").is_none());
    // api still runs there: it stays in force throughout (renewed, the same pod).
    let kept = in_force(&sim, 1, 0, "api").expect("api kept");
    assert_eq!(kept.body.addrs, api.body.addrs);
    // With the issuer down at restart, the saved certificates hold (an outage is no deletion).
    sim.kill(0);
    sim.issuer.as_mut().unwrap().down = true;
    sim.start(0);
    sim.run(30_000);
    assert!(in_force(&sim, 1, 0, "api").is_some());
}

#[test]
fn a_node_asks_the_issuer_s_next_listed_address_while_one_does_not_answer_and_follows_it_when_it_moves(
) {
    let mut sim = Sim::new(2, 15);
    sim.with_issuer(120);
    let here = sim.issuer.as_ref().unwrap().addr;
    let other: std::net::SocketAddr = "198.18.255.250:7100".parse().unwrap();
    // Listed first where nothing listens (the issuer runs on the second host).
    sim.issuer.as_mut().unwrap().listed_at = vec![other, here];
    sim.start_all();
    assert!(sim.run_until(10_000, Sim::full_mesh).is_some());
    sim.schedule("web", 0, "100.64.200.1/32");
    sim.handle(0, Event::Attach(reference("web"))).unwrap();
    let t = sim
        .run_until(5_000, |s| in_force(s, 1, 0, "web").is_some())
        .expect("in force through the second address");
    assert!(t >= 1_000, "the first address was asked first: {t} ms");
    let first = in_force(&sim, 1, 0, "web").unwrap();
    // The issuer moves to the first host: the renewal at half-life is answered there, within
    // a second or two (a renewal unanswered is asked again after a second while there is
    // another address to try).
    sim.issuer.as_mut().unwrap().addr = other;
    let b = &first.body;
    let half = b.not_before + (b.not_after - b.not_before) / 2;
    let renewed = |s: &Sim| {
        in_force(s, 1, 0, "web").is_some_and(|c| c.body.not_before > first.body.not_before)
    };
    assert!(sim.run_until(90_000, renewed).is_some(), "renewed");
    assert!(
        sim.now_ms / 1000 <= half + 3,
        "renewed at {} s, half-life at {half} s",
        sim.now_ms / 1000
    );
    // And it stays there: the next renewal is answered without a retry.
    let asked = sim.issuer.as_ref().unwrap().issued;
    sim.run(60_000);
    assert_eq!(sim.issuer.as_ref().unwrap().issued, asked + 1);
    // Answers sealed by the issuer's key but from an address not listed for it are not taken.
    let web = in_force(&sim, 1, 0, "web").unwrap();
    sim.issuer.as_mut().unwrap().reply_from = Some("198.18.255.249:7100".parse().unwrap());
    sim.schedule("api", 0, "100.64.200.2/32");
    sim.handle(0, Event::Attach(reference("api"))).unwrap();
    sim.run(5_000);
    assert!(in_force(&sim, 0, 0, "api").is_none());
    sim.issuer.as_mut().unwrap().reply_from = None;
    assert!(sim
        .run_until(5_000, |s| in_force(s, 0, 0, "api").is_some())
        .is_some());
    assert_eq!(in_force(&sim, 1, 0, "web"), Some(web));
}

#[test]
fn a_node_gets_its_workloads_from_an_issuer_that_asks_every_sender_for_a_cookie_first() {
    let mut sim = with_issuer(2, 16, 3600);
    // Under a flood, the issuer opens nothing that does not carry the sender's cookie: the node
    // repeats each datagram with the cookie it is sent, and keeps using it.
    sim.issuer_under_load();
    sim.schedule("web", 0, "100.64.200.1/32");
    sim.handle(0, Event::Attach(reference("web"))).unwrap();
    assert!(
        sim.run_until(5_000, |s| in_force(s, 1, 0, "web").is_some())
            .is_some(),
        "{:?}",
        sim.nodes[0].host.attached
    );
    assert_eq!(sim.issuer.as_ref().unwrap().issued, 1);
}

#[test]
fn a_node_that_restarts_with_the_issuer_keeps_its_workloads_while_the_issuer_cannot_decide_yet() {
    let mut sim = web_and_api_on_node_0(17, 3600);
    // The host of both restarts: the issuer comes back before it has listed its workloads
    // (and web was deleted meanwhile), and answers "later" for each.
    sim.kill(0);
    {
        let issuer = sim.issuer.as_mut().unwrap();
        issuer.not_listed_yet = true;
        issuer.view.remove(&("microblog".into(), "web".into()));
    }
    sim.start(0);
    sim.run(15_000);
    assert_eq!(
        allowed(&sim, 1, 0).len(),
        3,
        "both kept while it cannot decide"
    );
    let status = sim.nodes[0].node().workload_status();
    assert!(
        status.0.iter().all(|w| w.state == proto::admin::IN_FORCE),
        "{:?}",
        status.0
    );
    // Once it has listed: web is refused and withdrawn, api confirmed.
    sim.issuer.as_mut().unwrap().not_listed_yet = false;
    let settled = |s: &Sim| allowed(s, 1, 0) == [overlay(0), addr("100.64.200.2/32")];
    assert!(
        sim.run_until(15_000, settled).is_some(),
        "{:?}",
        allowed(&sim, 1, 0)
    );
}
