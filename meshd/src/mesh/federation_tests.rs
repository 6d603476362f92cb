//! Two clusters over the simulated underlay: cluster A (example.org) and cluster B (partner.org),
//! each with its own CA and policy admin. They trust each other only once each side's policy set
//! federates the other, only within the scope it names, and no longer once it stops.

use super::node::Event;
use super::sim::{Ca, Sim};
use ed25519_dalek::SigningKey;
use proto::cert::Certificate;
use proto::control::Seed;
use proto::policyset::SignedPolicySet;
use x25519_dalek::StaticSecret;

const A: [usize; 2] = [0, 1];
const B: [usize; 2] = [2, 3];
/// A node of cluster B whose address lies outside the scope A grants B.
const B_OUT_OF_SCOPE: usize = 4;
/// The nodes of both clusters within each other's scope.
const EVERYONE: [usize; 4] = [A[0], A[1], B[0], B[1]];

const ALLOW_ALL: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: all()\n  ingress: [{action: Allow}]\n";

struct Clusters {
    sim: Sim,
    ca_b: Ca,
    admin_b: SigningKey,
}

/// A `Federation` document trusting `cas` for `td` within `addresses`, namespace `prod`.
fn federation(td: &str, cas: &[&Certificate], addresses: &str) -> String {
    let bundle: String = cas
        .iter()
        .flat_map(|c| {
            proto::armor::encode(proto::armor::CERTIFICATE, &c.encode())
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect::<Vec<_>>()
        })
        .collect();
    format!(
        "apiVersion: mesh.io/v1\nkind: Federation\nmetadata: {{name: {td}}}\nspec:\n  \
         addresses: [{addresses}]\n  namespaces: [prod]\n  bundle: |\n{bundle}"
    )
}

/// Nodes 0-1 of cluster A, 2-4 of cluster B (B's seed is node 2, whose seed is A's node 0);
/// each cluster formed, and neither trusting the other yet.
fn clusters(seed: u64) -> Clusters {
    clusters_with(seed, |_| {})
}

/// [`clusters`], with `underlay` changing the simulation before any node starts.
fn clusters_with(seed: u64, underlay: impl FnOnce(&mut Sim)) -> Clusters {
    let mut sim = Sim::new(5, seed);
    let ca_b = Ca::new(10, "partner.org");
    let admin_b = SigningKey::from_bytes(&[78; 32]);
    for i in [B[0], B[1], B_OUT_OF_SCOPE] {
        let addr = if i == B_OUT_OF_SCOPE {
            "100.66.0.1/32"
        } else {
            &format!("100.65.0.{i}/32")
        };
        let n = &mut sim.nodes[i];
        n.certificate = ca_b.issue(
            n.secret(),
            &format!("b{i}"),
            addr.parse().unwrap(),
            100 + i as u64,
            0,
            u64::MAX / 4,
        );
        n.bundle = vec![ca_b.cert.clone()];
        n.admins = vec![admin_b.verifying_key().to_bytes()];
        if i != B[0] {
            n.seeds = vec![Seed {
                addr: super::sim::underlay(B[0]),
                key: None,
            }];
        }
    }
    underlay(&mut sim);
    sim.start_all();
    sim.run(5_000);
    let c = Clusters { sim, ca_b, admin_b };
    assert!(c.peered(&A, &A) && c.peered(&B, &B), "each cluster formed");
    assert!(
        c.none_peered(&A, &B) && c.none_peered(&B, &A),
        "no trust across before federation"
    );
    c
}

/// Whether every node of `xs` has every other node of `ys` installed.
fn peered(sim: &Sim, xs: &[usize], ys: &[usize]) -> bool {
    xs.iter().all(|&x| {
        ys.iter()
            .filter(|&&y| y != x)
            .all(|&y| sim.nodes[x].host.peers.contains_key(&sim.nodes[y].public()))
    })
}

/// Whether every node of `xs` has heard every other node of `ys` (so each reaches the other),
/// and has the WireGuard peer where it heard it.
fn heard(sim: &Sim, xs: &[usize], ys: &[usize]) -> bool {
    xs.iter().all(|&x| {
        ys.iter().filter(|&&y| y != x).all(|&y| {
            let k = sim.nodes[y].public();
            let m = sim.nodes[x].node().members().get(&k);
            m.is_some_and(|m| {
                m.last_heard_ms.is_some()
                    && sim.nodes[x].host.peers.get(&k).map(|p| p.0) == Some(m.endpoint)
            })
        })
    })
}

/// Whether no node of `xs` has a node of `ys` installed or as a member.
fn none_peered(sim: &Sim, xs: &[usize], ys: &[usize]) -> bool {
    xs.iter().all(|&x| {
        ys.iter().all(|&y| {
            let k = sim.nodes[y].public();
            !sim.nodes[x].host.peers.contains_key(&k)
                && !sim.nodes[x].node().members().contains_key(&k)
        })
    })
}

impl Clusters {
    fn peered(&self, xs: &[usize], ys: &[usize]) -> bool {
        peered(&self.sim, xs, ys)
    }

    fn none_peered(&self, xs: &[usize], ys: &[usize]) -> bool {
        none_peered(&self.sim, xs, ys)
    }

    fn apply_a(&mut self, serial: u64, docs: &str) {
        let set = self.sim.policy_set(serial, docs);
        self.sim.handle(A[0], Event::ApplyPolicy(set)).unwrap();
    }

    fn apply_b(&mut self, serial: u64, docs: &str) {
        let set = SignedPolicySet::sign(serial, 0, docs.into(), &self.admin_b)
            .unwrap()
            .encode();
        self.sim.handle(B[0], Event::ApplyPolicy(set)).unwrap();
    }

    fn refused(&self, i: usize, kind: &str) -> u64 {
        let s = self.sim.nodes[i].node().control_status();
        s.refused.get(kind).copied().unwrap_or(0)
            + s.refused
                .get(&format!("listed_{kind}"))
                .copied()
                .unwrap_or(0)
    }

    /// Both sides federate the other; waits until A and B peer (10 s at most).
    fn federated(seed: u64) -> Clusters {
        let mut c = clusters(seed);
        c.federate_both();
        assert!(
            c.sim
                .run_until(10_000, |s| peered(s, &EVERYONE, &EVERYONE))
                .is_some(),
            "A and B peer within 10 s of federating"
        );
        c
    }

    fn federate_both(&mut self) {
        let fed_b = federation("partner.org", &[&self.ca_b.cert], "100.65.0.0/16");
        self.apply_a(1, &format!("{ALLOW_ALL}---\n{fed_b}"));
        let fed_a = federation("example.org", &[&self.sim.ca.cert], "100.64.0.0/16");
        self.apply_b(1, &format!("{ALLOW_ALL}---\n{fed_a}"));
    }
}

#[test]
fn federated_clusters_peer_within_scope_keep_their_own_sets_and_are_cut_when_unfederated() {
    let mut c = clusters(21);
    assert!(
        c.refused(B[0], "untrusted_trust_domain") > 0,
        "A's seed's answer was refused at B, and counted: {:?}",
        c.sim.nodes[B[0]].node().control_status().refused
    );
    c.federate_both();
    let t = c.sim.run_until(10_000, |s| peered(s, &EVERYONE, &EVERYONE));
    assert!(
        t.is_some(),
        "A and B peer with each other within 10 s of federating"
    );
    // The node outside the scope A grants B stays out of A, counted; B keeps it.
    assert!(c.none_peered(&A, &[B_OUT_OF_SCOPE]));
    assert!(c.peered(&B, &[B_OUT_OF_SCOPE]));
    assert!(
        c.refused(A[0], "out_of_scope") > 0,
        "the out-of-scope certificate was refused and counted"
    );
    // Each cluster runs its own set: A's admin signs A's, B's signs B's; neither takes the other's.
    let digest = |i: usize| {
        c.sim.nodes[i]
            .node()
            .policy()
            .current
            .as_ref()
            .map(|s| s.digest())
    };
    assert_eq!(digest(A[1]), digest(A[0]));
    assert_eq!(digest(B[1]), digest(B[0]));
    assert_ne!(digest(A[0]), digest(B[0]));
    // A removes the federation: every A node cuts every B node within 5 s.
    c.apply_a(2, ALLOW_ALL);
    let t = c.sim.run_until(5_000, |s| none_peered(s, &A, &B));
    assert!(
        t.is_some(),
        "removing the federation cut B from every A node within 5 s"
    );
    c.sim.run(10_000);
    assert!(c.none_peered(&A, &B), "and B stays out");
}

#[test]
fn a_remote_ca_rotation_keeps_the_federated_members() {
    let mut c = Clusters::federated(22);
    let new_b = Ca::new(11, "partner.org");
    let both = federation("partner.org", &[&c.ca_b.cert, &new_b.cert], "100.65.0.0/16");
    c.apply_a(2, &format!("{ALLOW_ALL}---\n{both}"));
    c.sim.run(2_000);
    // B renews every node onto the new CA.
    for i in [B[0], B[1], B_OUT_OF_SCOPE] {
        let n = &c.sim.nodes[i];
        let secret: StaticSecret = n.secret().clone();
        let addr = n.certificate.body.addrs[0];
        let cert = new_b.issue(
            &secret,
            &format!("b{i}"),
            addr,
            200 + i as u64,
            0,
            u64::MAX / 4,
        );
        c.sim.nodes[i].certificate = cert.clone();
        c.sim.nodes[i].bundle = vec![c.ca_b.cert.clone(), new_b.cert.clone()];
        let bundle = c.sim.nodes[i].bundle.clone();
        c.sim
            .handle(
                i,
                Event::Renew {
                    secret,
                    certificate: cert,
                    bundle,
                },
            )
            .unwrap();
    }
    c.sim.run(3_000);
    let only_new = federation("partner.org", &[&new_b.cert], "100.65.0.0/16");
    c.apply_a(3, &format!("{ALLOW_ALL}---\n{only_new}"));
    for _ in 0..20 {
        c.sim.run(500);
        assert!(
            c.peered(&A, &B),
            "the federated members stay installed through the rotation"
        );
    }
    for &x in &A {
        for &y in &B {
            let m = &c.sim.nodes[x].node().members()[&c.sim.nodes[y].public()];
            assert_eq!(
                m.certificate.body.issuer,
                new_b.key.verifying_key().to_bytes()
            );
        }
    }
}

#[test]
fn a_federation_lasts_across_a_restart() {
    let mut c = Clusters::federated(23);
    // A's node restarts from its state directory: the saved set brings the federation back
    // before the saved members, so B's are trusted again at once, without any other node's help.
    c.sim.kill(A[1]);
    c.sim.start(A[1]);
    let k = c.sim.nodes[B[0]].public();
    assert!(
        c.sim.nodes[A[1]].node().members().contains_key(&k),
        "B's member restored at start"
    );
    assert!(c
        .sim
        .run_until(5_000, |s| peered(s, &EVERYONE, &EVERYONE))
        .is_some());
}

/// A partner CA's revocation list, once taken, lasts across a restart: the saved federation is
/// trusted again before the saved lists are taken, so the revoked partner node stays out.
#[test]
fn a_federated_cas_revocation_lasts_across_a_restart() {
    let mut c = Clusters::federated(24);
    let serial = c.sim.nodes[B[1]].certificate.body.serial;
    let crl = proto::cert::RevocationList::sign(
        "partner.org",
        1,
        c.sim.now_ms / 1000,
        vec![serial],
        &c.ca_b.key,
    )
    .unwrap();
    c.sim.handle(A[0], Event::AddRevocation(crl)).unwrap();
    assert!(c
        .sim
        .run_until(5_000, |s| none_peered(s, &A, &[B[1]]))
        .is_some());
    c.sim.run(2_000);
    // The restarted node can hear only the revoked one: nobody else can bring the list back.
    c.sim.sides = Some(vec![0, 1, 0, 1, 0]);
    c.sim.kill(A[1]);
    c.sim.start(A[1]);
    c.sim.run(10_000);
    assert!(
        none_peered(&c.sim, &[A[1]], &[B[1]]),
        "the revoked partner node stays out of the restarted node"
    );
    c.sim.sides = None;
    c.sim.run(10_000);
    let k = c.sim.nodes[B[0]].public();
    assert!(
        peered(&c.sim, &[A[1]], &[B[0]]),
        "its other members are back: member {} refused {:?} b0 refused {:?}",
        c.sim.nodes[A[1]].node().members().contains_key(&k),
        c.sim.nodes[A[1]].node().control_status().refused,
        c.sim.nodes[B[0]].node().control_status().refused
    );
}

/// Cluster A's underlay (link 1) and cluster B's (link 2) do not reach each other; A's node 0 and
/// B's node 2 are also on a third (link 4) and relay, and every node asks its cluster's relay.
fn relayed_underlays(sim: &mut Sim) {
    sim.links = Some(vec![1 | 4, 1, 2 | 4, 2, 2]);
    let (ga, gb) = (sim.nodes[A[0]].public(), sim.nodes[B[0]].public());
    for i in 0..5 {
        let n = &mut sim.nodes[i];
        n.relay_serve = i == A[0] || i == B[0];
        n.relays = match i {
            0 => vec![gb],
            2 => vec![ga],
            1 => vec![ga],
            _ => vec![gb],
        };
    }
}

#[test]
fn clusters_whose_underlays_do_not_meet_peer_through_a_relay_of_each() {
    use proto::relay::{Endpoint, Tag};
    let mut c = clusters_with(25, relayed_underlays);
    c.federate_both();
    let t = c.sim.run_until(20_000, |s| heard(s, &EVERYONE, &EVERYONE));
    assert!(
        t.is_some(),
        "every node of A and B hears every other within 20 s of federating, through the relays"
    );
    let relayed_before = c.sim.relayed;
    assert!(relayed_before > 0);
    let ep =
        |x: usize, y: usize| c.sim.nodes[x].node().members()[&c.sim.nodes[y].public()].endpoint;
    let via = |relay: usize, to: usize| Endpoint::Relayed {
        relay: super::sim::underlay(relay),
        tag: Tag::of(&c.sim.nodes[to].public()),
    };
    // a1 reaches b1 through its own relay (which passes it to B's), b1 reaches a1 through B's;
    // the relays reach each other directly, and each reaches the other's cluster through the
    // other; inside a cluster nothing is relayed.
    assert_eq!(ep(A[1], B[1]), via(A[0], B[1]));
    assert_eq!(ep(B[1], A[1]), via(B[0], A[1]));
    assert_eq!(ep(A[0], B[0]), Endpoint::Direct(super::sim::underlay(B[0])));
    assert_eq!(ep(A[0], B[1]), via(B[0], B[1]));
    assert_eq!(ep(B[0], A[1]), via(A[0], A[1]));
    assert_eq!(ep(A[1], A[0]), Endpoint::Direct(super::sim::underlay(A[0])));
    assert_eq!(ep(B[1], B[0]), Endpoint::Direct(super::sim::underlay(B[0])));
    // The paths hold: the mesh at rest keeps talking through them.
    c.sim.run(10_000);
    assert!(heard(&c.sim, &EVERYONE, &EVERYONE));
    assert!(
        c.sim.relayed > relayed_before,
        "gossip keeps crossing the relays"
    );
    // Removing the federation cuts B from every A node within 5 s, relayed or not.
    c.apply_a(2, ALLOW_ALL);
    assert!(c.sim.run_until(5_000, |s| none_peered(s, &A, &B)).is_some());
}

#[test]
fn without_relays_clusters_whose_underlays_do_not_meet_stay_apart() {
    let mut c = clusters_with(26, |sim| {
        relayed_underlays(sim);
        for n in &mut sim.nodes {
            n.relay_serve = false;
        }
    });
    c.federate_both();
    c.sim.run(20_000);
    assert!(
        !heard(&c.sim, &[A[1]], &[B[1]]) && !heard(&c.sim, &[B[1]], &[A[1]]),
        "a node that relays for no one passes nothing on"
    );
    assert_eq!(c.sim.relayed, 0);
    assert!(
        heard(&c.sim, &[A[0]], &[B[0]]),
        "the nodes on both underlays still peer"
    );
}

#[test]
fn a_member_reached_through_a_relay_returns_to_its_own_address_once_that_answers() {
    use proto::relay::Endpoint;
    let mut c = clusters_with(27, relayed_underlays);
    c.federate_both();
    assert!(c
        .sim
        .run_until(20_000, |s| heard(s, &EVERYONE, &EVERYONE))
        .is_some());
    let ep =
        |s: &Sim, x: usize, y: usize| s.nodes[x].node().members()[&s.nodes[y].public()].endpoint;
    assert!(ep(&c.sim, A[1], B[1]).is_relayed());
    // The underlays are joined: within a recheck (30 s) both ends use their own addresses.
    c.sim.links = Some(vec![7; 5]);
    let direct = |s: &Sim| {
        ep(s, A[1], B[1]) == Endpoint::Direct(super::sim::underlay(B[1]))
            && ep(s, B[1], A[1]) == Endpoint::Direct(super::sim::underlay(A[1]))
    };
    assert!(
        c.sim.run_until(35_000, direct).is_some(),
        "a1 and b1 talk directly within 35 s of the underlays meeting"
    );
    assert_eq!(
        c.sim.nodes[A[1]].host.peers[&c.sim.nodes[B[1]].public()].0,
        Endpoint::Direct(super::sim::underlay(B[1])),
        "and the WireGuard peer follows"
    );
}
