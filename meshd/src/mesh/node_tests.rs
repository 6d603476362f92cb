//! The whole node, many of them over the simulated underlay of `sim.rs`: formation, expiry,
//! revocation, renewal, policy sync, restarts, faults, and the attacks of issue 8, each of which
//! worked against the node before it was made one state machine.

use super::*;
use crate::mesh::sim::{overlay, underlay, Sim, T0_MS};
use proto::cert::RevocationList;
use proto::control::{self, Member, Message};

const POLICY: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: all()\n  ingress: [{action: Allow}]\n";

/// A formed mesh of `n` nodes on a lossless network.
fn formed(n: usize, seed: u64) -> Sim {
    let mut sim = Sim::new(n, seed);
    sim.start_all();
    let t = sim.run_until(10_000, Sim::full_mesh);
    assert!(t.is_some(), "the mesh formed");
    sim
}

fn revoke(sim: &Sim, number: u64, serials: Vec<u64>, keys: Vec<[u8; 32]>) -> RevocationList {
    RevocationList::sign_with_keys(
        "example.org",
        number,
        sim.now_ms / 1000,
        serials,
        keys,
        &sim.ca.key,
    )
    .unwrap()
}

/// True if no running node but `i` itself has node `i` installed.
fn cut_everywhere(sim: &Sim, i: usize) -> bool {
    let key = sim.nodes[i].public();
    sim.nodes
        .iter()
        .enumerate()
        .filter(|(j, n)| *j != i && n.node.is_some())
        .all(|(_, n)| !n.host.peers.contains_key(&key) && !n.node().members().contains_key(&key))
}

fn serial_everywhere(sim: &Sim, serial: u64) -> bool {
    sim.nodes
        .iter()
        .filter(|n| n.node.is_some())
        .all(|n| n.node().policy().serial() == serial)
}

#[test]
fn five_nodes_from_one_seed_converge_to_a_full_mesh_with_derived_peers_and_routes() {
    let mut sim = formed(5, 1);
    // The member list is saved at most once a second.
    sim.run(1_000);
    for (i, n) in sim.nodes.iter().enumerate() {
        assert_eq!(n.host.peers.len(), 4, "node {i}");
        assert_eq!(n.host.addresses, [overlay(i)].into_iter().collect());
        let others: std::collections::BTreeSet<_> =
            (0..5).filter(|j| *j != i).map(overlay).collect();
        assert_eq!(
            n.host.routes, others,
            "node {i}: one route per member address"
        );
        for j in (0..5).filter(|j| *j != i) {
            // Allowed IPs are exactly the certificate's addresses, the endpoint where it spoke.
            assert_eq!(
                n.host.peers[&sim.nodes[j].public()],
                (underlay(j).into(), vec![overlay(j)])
            );
        }
        assert_eq!(n.host.saved.members.len(), 4, "members are saved");
    }
}

#[test]
fn a_run_replays_byte_for_byte_from_its_seed() {
    let run = |seed: u64| {
        let mut sim = Sim::new(6, seed);
        sim.loss_pct = 10;
        sim.dup_pct = 5;
        sim.jitter_ms = 30;
        sim.start_all();
        sim.run(8_000);
        (sim.trace(), sim.delivered)
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7).0, run(8).0);
}

#[test]
fn expiry_cuts_a_member_on_the_next_tick() {
    let mut sim = Sim::new(2, 2);
    let secret = sim.nodes[1].secret().clone();
    let lasts = T0_MS / 1000 + 10;
    sim.nodes[1].certificate = sim.ca.issue(&secret, "node1", overlay(1), 5, 0, lasts);
    sim.start_all();
    sim.run(2_000);
    assert!(sim.full_mesh());
    sim.run(8_000);
    assert!(
        sim.nodes[0].host.peers.len() == 1,
        "valid through not_after"
    );
    sim.run(1_500);
    assert!(sim.nodes[0].host.peers.is_empty(), "cut once expired");
    assert!(sim.nodes[0].host.routes.is_empty(), "and its route with it");
}

/// Datagrams delivered in the next 30 simulated seconds, per node.
fn delivered_per_node_in_30_s(sim: &mut Sim) -> f64 {
    let before = sim.delivered;
    sim.run(30_000);
    (sim.delivered - before) as f64 / sim.nodes.len() as f64
}

#[test]
fn a_mesh_at_rest_exchanges_only_hellos_and_offers() {
    let mut sim = formed(4, 3);
    sim.run(10_000);
    // Each node: a Hello per gossip interval (3 s) and an offer per offer interval when it runs a
    // set; none here, so 10 Hellos in 30 s, and nobody answers with Members.
    let per_node = delivered_per_node_in_30_s(&mut sim);
    assert!(
        (9.0..=11.0).contains(&per_node),
        "{per_node} datagrams per node"
    );
}

#[test]
fn a_renewal_to_another_address_adds_the_new_address_before_removing_the_old() {
    let mut sim = formed(2, 16);
    let secret = sim.nodes[1].secret().clone();
    let moved: proto::Cidr = "100.64.9.9/32".parse().unwrap();
    let renewed = sim.ca.issue(&secret, "node1", moved, 2, 1, u64::MAX / 4);
    let node = sim.nodes[1].node.as_mut().unwrap();
    let actions = node
        .handle(
            Event::Renew {
                secret,
                certificate: renewed,
                bundle: vec![sim.ca.cert.clone()],
            },
            sim.now_ms,
            &mut sim.rng,
        )
        .unwrap();
    let at = |want: &Action| actions.iter().position(|a| a == want).unwrap();
    assert!(at(&Action::Address(moved)) < at(&Action::Unaddress(overlay(1))));
    sim.carry_out(1, actions);
    sim.run(3_000);
    assert_eq!(
        sim.nodes[0].host.peers[&sim.nodes[1].public()].1,
        vec![moved]
    );
    assert!(sim.nodes[0].host.routes.contains(&moved));
    assert!(!sim.nodes[0].host.routes.contains(&overlay(1)));
}

#[test]
fn a_seed_named_by_key_answers_no_probe_and_the_mesh_still_forms() {
    let mut sim = Sim::new(5, 4);
    let key0 = sim.nodes[0].public();
    for n in &mut sim.nodes[1..] {
        n.seeds[0].key = Some(key0);
    }
    sim.start_all();
    sim.handle(0, Event::AnswerProbes(false)).unwrap();
    assert!(sim.run_until(10_000, Sim::full_mesh).is_some());
    let probe = control::encode_probe(&[3; 16]);
    let r = sim.handle(
        0,
        Event::Datagram {
            from: underlay(30).into(),
            bytes: probe,
        },
    );
    assert_eq!(r, Err(Refusal::ProbeIgnored));
}

#[test]
fn large_certificates_cross_in_small_datagrams_and_a_mesh_still_forms() {
    // About 2,000-byte certificates: too large for a probe reply (the seed answers with its key),
    // and a Members message of 11 of them spans many datagrams, each within the budget (`send`
    // asserts it), in any order (jitter).
    let mut sim = Sim::new(12, 5);
    sim.jitter_ms = 20;
    for i in 0..12 {
        let secret = sim.nodes[i].secret().clone();
        let mut body = sim.ca.identity(&secret, i, 1).body;
        body.labels = (0..40)
            .map(|l| {
                (
                    format!("team.example.org/key-{l:02}"),
                    format!("value-{l:02}-{i:03}-abcdefgh"),
                )
            })
            .collect();
        sim.nodes[i].certificate = body.sign(&sim.ca.key).unwrap();
    }
    assert!(sim.nodes[0].certificate.encode().len() > proto::segment::DATAGRAM_BYTES);
    sim.start_all();
    assert!(sim.run_until(10_000, Sim::full_mesh).is_some());
}

// Issue 8, attack 1: revocation did not last.

#[test]
fn a_revocation_spreads_lasts_across_a_restart_and_reaches_a_node_that_was_down() {
    let mut sim = formed(4, 6);
    sim.kill(3);
    // Every certificate here has serial 1: revoke node 2 by its key.
    let crl = revoke(&sim, 1, vec![], vec![sim.nodes[2].public()]);
    sim.handle(0, Event::AddRevocation(crl)).unwrap();
    sim.run(2_000);
    assert!(
        !sim.nodes[1].host.peers.contains_key(&sim.nodes[2].public()),
        "node 1 cut it"
    );
    assert_eq!(
        sim.nodes[1].host.saved.revocations.len(),
        1,
        "and saved the list"
    );
    // Node 1 restarts: the saved list applies to its saved members at once, and node 2's Hellos
    // are refused.
    sim.kill(1);
    sim.start(1);
    assert!(!sim.nodes[1].host.peers.contains_key(&sim.nodes[2].public()));
    sim.run(10_000);
    assert!(!sim.nodes[1].host.peers.contains_key(&sim.nodes[2].public()));
    // Node 3 was down while the list spread; within 10 s of coming back it has it.
    sim.start(3);
    let t = sim.run_until(10_000, |s| {
        s.nodes[3].node().revocations().count() == 1 && cut_everywhere(s, 2)
    });
    assert!(
        t.is_some(),
        "node 3 learned the list from a member's answer to its Hello"
    );
}

#[test]
fn a_certificate_reissued_for_a_revoked_key_stays_refused() {
    let mut sim = formed(3, 7);
    let victim = sim.nodes[2].public();
    let crl = revoke(&sim, 1, vec![], vec![victim]);
    sim.handle(0, Event::AddRevocation(crl)).unwrap();
    sim.run(2_000);
    assert!(cut_everywhere(&sim, 2));
    // The holder of the stolen key gets a renewal with a new serial: still refused everywhere.
    let secret = sim.nodes[2].secret().clone();
    let renewed = sim
        .ca
        .issue(&secret, "node2", overlay(2), 99, 1, u64::MAX / 4);
    sim.handle(
        2,
        Event::Renew {
            secret,
            certificate: renewed,
            bundle: vec![sim.ca.cert.clone()],
        },
    )
    .unwrap();
    sim.run(10_000);
    assert!(cut_everywhere(&sim, 2));
}

// Issue 8, attack 3: one member could stop a node from taking a new policy set.

#[test]
fn a_member_serving_wrong_bytes_does_not_keep_a_node_from_the_new_set() {
    let mut sim = formed(3, 8);
    let set1 = sim.policy_set(1, POLICY);
    sim.handle(0, Event::ApplyPolicy(set1)).unwrap();
    assert!(sim.run_until(10_000, |s| serial_everywhere(s, 1)).is_some());
    // Node 1 turns hostile: it offers set 2's real id to node 2 and would serve zeros. We play
    // its part by hand: an offer sealed with its key, then zeros for every request.
    let set2 = sim.policy_set(2, &POLICY.replace("name: p", "name: q"));
    let offer = Message::PolicyOffer {
        serial: 2,
        length: set2.len() as u32,
        digest: proto::policyset::digest_of(&set2),
    };
    let hostile = sim.nodes[1].secret().clone();
    let to = sim.nodes[2].public();
    let seal = |counter: u64, msg: &Message| {
        control::seal_message(
            &hostile,
            &to,
            &StaticSecret::from([41; 32]),
            counter,
            &msg.encode(),
        )
        .unwrap()
    };
    let base = (sim.now_ms + 60_000) * crate::mesh::membership::COUNTER_PER_MS;
    for d in seal(base, &offer) {
        sim.handle(
            2,
            Event::Datagram {
                from: underlay(1).into(),
                bytes: d,
            },
        )
        .unwrap();
    }
    sim.run(1_200);
    let zeros = Message::PolicyChunk {
        serial: 2,
        offset: 0,
        length: set2.len() as u32,
        data: vec![0; set2.len()],
    };
    for d in seal(base + 100, &zeros) {
        let _ = sim.handle(
            2,
            Event::Datagram {
                from: underlay(1).into(),
                bytes: d,
            },
        );
    }
    assert_eq!(
        sim.nodes[2].node().policy().serial(),
        1,
        "the zeros were not taken"
    );
    // The honest node 0 applies set 2: node 2 takes it within 10 s.
    sim.handle(0, Event::ApplyPolicy(set2)).unwrap();
    let t = sim.run_until(10_000, |s| s.nodes[2].node().policy().serial() == 2);
    assert!(t.is_some(), "node 2 took set 2 from the honest member");
}

#[test]
fn a_fresh_node_takes_the_newest_set_its_members_run_not_the_first_offered() {
    let mut sim = Sim::new(4, 9);
    sim.nodes[3].seeds[0].addr = underlay(1);
    for i in 0..3 {
        sim.start(i);
    }
    assert!(sim.run_until(10_000, Sim::full_mesh).is_some());
    let set1 = sim.policy_set(1, POLICY);
    sim.handle(0, Event::ApplyPolicy(set1)).unwrap();
    assert!(sim.run_until(10_000, |s| serial_everywhere(s, 1)).is_some());
    // Node 1 is cut off while sets 2 and 3 are applied: it still runs and offers set 1.
    sim.sides = Some(vec![0, 1, 0, 1]);
    for serial in 2..=3 {
        let set = sim.policy_set(
            serial,
            &POLICY.replace("name: p", &format!("name: p{serial}")),
        );
        sim.handle(0, Event::ApplyPolicy(set)).unwrap();
        sim.run(2_000);
    }
    assert_eq!(sim.nodes[1].node().policy().serial(), 1);
    // A fresh node joins through node 1, whose offer of set 1 reaches it first.
    sim.sides = None;
    sim.start(3);
    let mut ran = std::collections::BTreeSet::new();
    let t = sim.run_until(10_000, |s| {
        ran.insert(s.nodes[3].node().policy().serial());
        s.nodes[3].node().policy().serial() == 3
    });
    assert!(t.is_some(), "it took set 3");
    assert_eq!(
        ran,
        [0, 3].into_iter().collect(),
        "and never ran an older one"
    );
}

// Issue 8, attack 4: an older, still valid certificate of a renewed identity took its addresses.

#[test]
fn replaying_an_old_certificate_of_a_renewed_identity_changes_nothing() {
    let mut sim = formed(3, 10);
    let old_cert = sim.nodes[2].certificate.clone();
    // Node 2 renews with a new key and a later not_before, same address.
    let secret = StaticSecret::from([99; 32]);
    let renewed = sim
        .ca
        .issue(&secret, "node2", overlay(2), 2, 1, u64::MAX / 4);
    sim.nodes[2].rekey(secret.clone());
    sim.nodes[2].certificate = renewed.clone();
    sim.handle(
        2,
        Event::Renew {
            secret,
            certificate: renewed,
            bundle: vec![sim.ca.cert.clone()],
        },
    )
    .unwrap();
    sim.run(3_000);
    assert!(sim.full_mesh());
    let before: Vec<_> = sim
        .nodes
        .iter()
        .map(|n| (n.host.peers.clone(), n.host.routes.clone()))
        .collect();
    // Node 1 (malicious, it kept the old certificate) sends node 0 a Members message with it.
    let members = Message::Members(vec![Member {
        certificate: old_cert,
        endpoint: underlay(40),
    }]);
    let d = control::seal_message(
        sim.nodes[1].secret(),
        &sim.nodes[0].public(),
        &StaticSecret::from([5; 32]),
        (sim.now_ms + 1) * crate::mesh::membership::COUNTER_PER_MS,
        &members.encode(),
    )
    .unwrap();
    for d in d {
        sim.handle(
            0,
            Event::Datagram {
                from: underlay(1).into(),
                bytes: d,
            },
        )
        .unwrap();
    }
    sim.run(5_000);
    let after: Vec<_> = sim
        .nodes
        .iter()
        .map(|n| (n.host.peers.clone(), n.host.routes.clone()))
        .collect();
    assert_eq!(before, after, "nothing a user can see changed");
}

#[test]
fn two_members_claiming_one_address_are_never_both_installed() {
    let mut sim = Sim::new(4, 11);
    // Node 3 holds a certificate (another identity) for node 2's address.
    let secret = sim.nodes[3].secret().clone();
    sim.nodes[3].certificate = sim
        .ca
        .issue(&secret, "squatter", overlay(2), 7, 0, u64::MAX / 4);
    sim.start(0);
    sim.start(1);
    sim.start(2);
    sim.run(3_000);
    sim.start(3);
    sim.run(10_000);
    for i in 0..3 {
        let peers = &sim.nodes[i].host.peers;
        if i != 2 {
            assert!(
                peers.contains_key(&sim.nodes[2].public()),
                "node {i}: the first stays"
            );
        }
        assert!(
            !peers.contains_key(&sim.nodes[3].public()),
            "node {i}: the second is refused"
        );
    }
    assert!(sim.nodes[0].host.routes.contains(&overlay(2)));
    assert!(sim.nodes[0].refusals > 0, "refusals are counted");
}

// Issue 8, attack 7: replay across a restart.

#[test]
fn datagrams_captured_before_a_restart_are_refused_after_it() {
    let mut sim = formed(3, 12);
    sim.capture = Some(Vec::new());
    sim.run(6_000);
    let captured: Vec<_> = sim
        .capture
        .take()
        .unwrap()
        .into_iter()
        .filter(|c| c.to == underlay(1) && c.from == underlay(0))
        .collect();
    assert!(!captured.is_empty());
    sim.run(2_000);
    sim.kill(1);
    sim.run(300);
    sim.start(1);
    sim.run(1_000);
    let refused = sim.nodes[1].refusals;
    // The attacker replays node 0's old datagrams from node 0's address, and from its own
    // address with the cookie it got there (it receives at its own address).
    let cookie = sim.nodes[1].node().cookie_for(underlay(66));
    for c in &captured {
        let _ = sim.handle(
            1,
            Event::Datagram {
                from: underlay(0).into(),
                bytes: c.bytes.clone(),
            },
        );
        let mut bytes = c.bytes.clone();
        control::set_cookie(&mut bytes, &cookie);
        let _ = sim.handle(
            1,
            Event::Datagram {
                from: underlay(66).into(),
                bytes,
            },
        );
    }
    assert_eq!(
        sim.nodes[1].refusals - refused,
        2 * captured.len() as u64,
        "every replayed datagram is refused"
    );
    assert_eq!(
        sim.nodes[1].host.peers[&sim.nodes[0].public()].0,
        underlay(0).into(),
        "the endpoint stays"
    );
    // Node 0's new datagrams still pass.
    sim.run(6_000);
    assert!(sim.full_mesh());
}

// Faults.

#[test]
fn with_20_percent_loss_10_nodes_form_a_mesh_and_a_set_and_a_revocation_reach_every_node() {
    let mut sim = Sim::new(10, 13);
    sim.loss_pct = 20;
    sim.jitter_ms = 20;
    sim.start_all();
    assert!(sim.run_until(30_000, Sim::full_mesh).is_some(), "formed");
    let set = sim.policy_set(1, POLICY);
    sim.handle(0, Event::ApplyPolicy(set)).unwrap();
    let crl = revoke(&sim, 1, vec![], vec![sim.nodes[9].public()]);
    sim.handle(5, Event::AddRevocation(crl)).unwrap();
    let t = sim.run_until(10_000, |s| {
        (0..9).all(|i| s.nodes[i].node().policy().serial() == 1) && cut_everywhere(s, 9)
    });
    assert!(t.is_some(), "within 10 s");
}

#[test]
fn after_a_partition_both_halves_converge_on_the_newest_set_and_the_revocation() {
    let mut sim = formed(8, 14);
    let set1 = sim.policy_set(1, POLICY);
    sim.handle(0, Event::ApplyPolicy(set1)).unwrap();
    assert!(sim.run_until(10_000, |s| serial_everywhere(s, 1)).is_some());
    sim.sides = Some(vec![0, 0, 0, 0, 1, 1, 1, 1]);
    sim.run(1_000);
    let set2 = sim.policy_set(2, &POLICY.replace("name: p", "name: q"));
    sim.handle(1, Event::ApplyPolicy(set2)).unwrap();
    let crl = revoke(&sim, 1, vec![], vec![sim.nodes[3].public()]);
    sim.handle(6, Event::AddRevocation(crl)).unwrap();
    sim.run(30_000);
    assert_eq!(
        sim.nodes[5].node().policy().serial(),
        1,
        "the partition held"
    );
    sim.sides = None;
    let t = sim.run_until(10_000, |s| {
        (0..8)
            .filter(|i| *i != 3)
            .all(|i| s.nodes[i].node().policy().serial() == 2)
            && cut_everywhere(s, 3)
    });
    assert!(t.is_some(), "converged within 10 s of healing");
}

#[test]
fn a_node_killed_while_a_set_is_applied_enforces_the_last_good_set_at_once_then_catches_up() {
    let mut sim = formed(4, 15);
    let set1 = sim.policy_set(1, POLICY);
    sim.handle(0, Event::ApplyPolicy(set1)).unwrap();
    assert!(sim.run_until(10_000, |s| serial_everywhere(s, 1)).is_some());
    let set2 = sim.policy_set(2, &POLICY.replace("name: p", "name: q"));
    sim.handle(0, Event::ApplyPolicy(set2)).unwrap();
    sim.kill(3); // before the offer reaches it
    sim.run(3_000);
    sim.start(3);
    assert_eq!(
        sim.nodes[3].node().policy().serial(),
        1,
        "enforces the last good set at once"
    );
    assert!(
        sim.run_until(10_000, |s| serial_everywhere(s, 2)).is_some(),
        "then catches up"
    );
}

// Issue 8, attack 2: a spoofed flood silenced a node's control plane.

#[test]
fn under_a_spoofed_flood_a_set_and_a_revocation_still_reach_every_node_and_the_cost_is_bounded() {
    let mut sim = formed(4, 17);
    let set1 = sim.policy_set(1, POLICY);
    sim.handle(0, Event::ApplyPolicy(set1)).unwrap();
    assert!(sim.run_until(10_000, |s| serial_everywhere(s, 1)).is_some());
    // Captured datagrams of the members, to replay from their addresses.
    sim.capture = Some(Vec::new());
    sim.run(4_000);
    let captured: Vec<_> = sim.capture.take().unwrap();
    let victim = sim.nodes[1].public();
    // Datagrams sealed to the victim by throw-away keys, with and without the cookie of the
    // attacker's own address (where it can receive one).
    let attacker = underlay(66);
    let cookie = sim.nodes[1].node().cookie_for(attacker);
    let junk: Vec<Vec<u8>> = (0..64u8)
        .map(|i| {
            let (secret, cert) = {
                let s = StaticSecret::from([i.wrapping_add(100); 32]);
                let c = sim.ca.identity(&s, 200 + usize::from(i), 1);
                (s, c)
            };
            let hello = Message::Hello {
                certificate: cert,
                want_members: true,
                want_workloads: false,
                digest: [0; 32],
                revocations: vec![],
            };
            control::seal_message(
                &secret,
                &victim,
                &StaticSecret::from([i; 32]),
                1,
                &hello.encode(),
            )
            .unwrap()
            .remove(0)
        })
        .collect();
    let dh_before = sim.nodes[1].node().control_counters().dh_ops;
    // 5,000 datagrams a second for 15 s; a set and a revocation are given 2 s into it.
    let set2 = sim.policy_set(2, &POLICY.replace("name: p", "name: q"));
    let crl = revoke(&sim, 1, vec![], vec![sim.nodes[3].public()]);
    let mut reached = None;
    let start = sim.now_ms;
    for slice in 0..1_500u64 {
        if slice == 200 {
            sim.handle(0, Event::ApplyPolicy(set2.clone())).unwrap();
            sim.handle(2, Event::AddRevocation(crl.clone())).unwrap();
        }
        for k in 0..50u64 {
            let pick = sim.rng.below(5);
            let members = [underlay(0), underlay(2), underlay(3)];
            let spoofed = members[sim.rng.below(3) as usize];
            let (from, bytes) = match pick {
                0 => (spoofed, b"MSHP".to_vec()),
                1 => (spoofed, junk[(k % 64) as usize].clone()),
                2 => {
                    let mut d = junk[(k % 64) as usize].clone();
                    control::set_cookie(&mut d, &cookie);
                    (attacker, d)
                }
                3 => {
                    let c = &captured[sim.rng.below(captured.len() as u64) as usize];
                    (c.from, c.bytes.clone())
                }
                _ => (underlay(100 + sim.rng.below(100) as usize), junk[0].clone()),
            };
            let _ = sim.handle(
                1,
                Event::Datagram {
                    from: from.into(),
                    bytes,
                },
            );
        }
        sim.run(10);
        if slice >= 200 && reached.is_none() {
            let done = (0..3).all(|i| sim.nodes[i].node().policy().serial() == 2)
                && cut_everywhere(&sim, 3);
            if done {
                reached = Some(sim.now_ms - start - 2_000);
            }
        }
    }
    let took = reached.expect("the set and the revocation reached every node during the flood");
    assert!(took <= 10_000, "{took} ms");
    // What the flood cost the victim: the budget for unknown senders (500 a second), plus what
    // its members legitimately sent, never one Diffie-Hellman per flooded datagram.
    let spent = sim.nodes[1].node().control_counters().dh_ops - dh_before;
    eprintln!("reached every node {took} ms after it was given; the victim spent {spent} DH");
    assert!(
        spent < 500 * 15 + 2_000,
        "{spent} Diffie-Hellman operations for 75,000 datagrams"
    );
}

#[test]
fn a_restarted_node_greets_its_saved_members_until_each_has_answered_then_rests() {
    let mut sim = formed(6, 21);
    sim.run(20_000);
    sim.kill(0);
    sim.run(2_000);
    sim.start(0);
    assert_eq!(sim.nodes[0].node().unheard(), 5, "every saved member");
    // Each member answers a greeting once it sealed nothing to the greeter for a minute, or
    // speaks to it sooner on its own; then the greetings stop.
    let quiet = sim.run_until(70_000, |s| s.nodes[0].node().unheard() == 0);
    assert!(
        quiet.is_some(),
        "still greeting {}",
        sim.nodes[0].node().unheard()
    );
    sim.run(5_000);
    let per_node = delivered_per_node_in_30_s(&mut sim);
    assert!(
        (9.0..=11.0).contains(&per_node),
        "{per_node} datagrams per node at rest afterwards"
    );
}

#[test]
fn a_reloaded_trust_bundle_admits_a_newly_trusted_ca_and_cuts_a_dropped_one() {
    let mut sim = Sim::new(3, 31);
    let ca2 = crate::mesh::sim::Ca::new(12, "example.org");
    let first = sim.ca.cert.clone();
    let both = vec![first.clone(), ca2.cert.clone()];
    let n = &mut sim.nodes[2];
    n.certificate = ca2.issue(n.secret(), "node2", overlay(2), 5, 0, u64::MAX / 4);
    n.bundle = both.clone();
    let k2 = sim.nodes[2].public();
    sim.start_all();
    sim.run(5_000);
    let has = |s: &Sim, i: usize| s.nodes[i].host.peers.contains_key(&k2);
    assert!(!has(&sim, 0) && !has(&sim, 1), "a CA nobody trusts yet");
    for i in [0, 1] {
        sim.handle(
            i,
            Event::Trust {
                bundle: both.clone(),
            },
        )
        .unwrap();
    }
    assert!(
        sim.run_until(5_000, |s| has(s, 0) && has(s, 1)).is_some(),
        "the newly trusted CA's node joins within 5 s, without a restart"
    );
    sim.handle(
        0,
        Event::Trust {
            bundle: vec![first],
        },
    )
    .unwrap();
    assert!(
        !has(&sim, 0),
        "a CA dropped from the bundle: its node is cut at once"
    );
    sim.run(5_000);
    assert!(!has(&sim, 0) && has(&sim, 1));
}

/// A flow query signed by `admin` for node `asker` of `sim`, issued now.
fn flow_query(sim: &Sim, admin: &ed25519_dalek::SigningKey, asker: usize, nonce: u64) -> Vec<u8> {
    proto::flowquery::FlowQuery {
        admin: [0; 32],
        requester: sim.nodes[asker].public(),
        nonce,
        issued_at: sim.now_ms / 1000,
        since: 0,
        denied_only: false,
        limit: 10,
        cursors: Vec::new(),
    }
    .sign(admin)
}

#[test]
fn an_admins_flow_query_reaches_every_member_and_only_the_asker_gets_answers() {
    let mut sim = formed(4, 31);
    let admin = sim.admin.clone();
    let q = flow_query(&sim, &admin, 0, 1);
    sim.handle(0, Event::QueryFlows(q.clone())).unwrap();
    sim.run(500);
    for i in 1..4 {
        let serves = &sim.nodes[i].host.flow_serves;
        assert_eq!(serves.len(), 1, "node {i} serves the query once");
        assert_eq!(serves[0].0, sim.nodes[0].public());
    }
    // Each member answers (the shell reads its log); node 0 takes every part.
    for i in 1..4 {
        let to = sim.nodes[0].public();
        let messages = vec![Message::FlowAnswer {
            nonce: 1,
            part: 0,
            last: true,
            next: 7,
            records: format!("{{\"from\": {i}}}\n").into_bytes(),
        }];
        sim.handle(i, Event::AnswerFlows { to, messages }).unwrap();
    }
    sim.run(500);
    let answers = &sim.nodes[0].host.flow_answers;
    assert_eq!(answers.len(), 3);
    let from: std::collections::BTreeSet<[u8; 32]> = answers.iter().map(|a| a.0).collect();
    assert_eq!(from, (1..4).map(|i| sim.nodes[i].public()).collect());

    // A member that kept the query and sends it as its own is refused by the others (it names
    // node 0), and the query is not answered twice.
    let kept = Message::FlowQuery { query: q };
    sim.handle(
        3,
        Event::AnswerFlows {
            to: sim.nodes[1].public(),
            messages: vec![kept.clone()],
        },
    )
    .unwrap();
    sim.run(500);
    assert_eq!(sim.nodes[1].host.flow_serves.len(), 1, "not served again");
    // An answer nobody asked for is not taken: node 3 answers node 2, which asked nothing.
    sim.handle(
        3,
        Event::AnswerFlows {
            to: sim.nodes[2].public(),
            messages: vec![Message::FlowAnswer {
                nonce: 1,
                part: 0,
                last: true,
                next: 0,
                records: b"{}\n".to_vec(),
            }],
        },
    )
    .unwrap();
    sim.run(500);
    assert!(sim.nodes[2].host.flow_answers.is_empty());
    let flow_refusals = |i: usize| {
        sim.nodes[i]
            .node
            .as_ref()
            .unwrap()
            .control_status()
            .refused
            .get("flow_query")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(flow_refusals(1), 1, "the kept query");
    assert_eq!(flow_refusals(2), 1, "the unsolicited answer");

    // A query signed by a key that is no admin is refused by the asking node itself.
    let rogue = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let e = sim
        .handle(0, Event::QueryFlows(flow_query(&sim, &rogue, 0, 2)))
        .unwrap_err();
    assert!(e.to_string().contains("not a policy admin"), "{e}");
}
