//! Gateways over the simulated underlay: two nodes granted and serving a route outside the mesh,
//! a client, and a member that serves the route without the grant.

use super::sim::Sim;
use proto::Cidr;

const G1: usize = 0;
const G2: usize = 1;
const CLIENT: usize = 2;
/// Says it serves the route, but its certificate grants none.
const PRETENDER: usize = 3;

fn route() -> Cidr {
    "198.19.0.0/24".parse().unwrap()
}

fn mesh(seed: u64) -> Sim {
    let mut sim = Sim::new(4, seed);
    for i in [G1, G2, PRETENDER] {
        let n = &mut sim.nodes[i];
        if i != PRETENDER {
            let mut body = n.certificate.body.clone();
            body.routes = vec!["198.19.0.0/16".parse().unwrap()];
            n.certificate = body.sign(&sim.ca.key).unwrap();
        }
        n.gateway_routes = vec![route()];
    }
    sim.start_all();
    sim
}

/// The node carrying the route at `at`, as its device and kernel would hold it.
fn carrier(sim: &Sim, at: usize) -> Option<usize> {
    let host = &sim.nodes[at].host;
    let holder = host
        .peers
        .iter()
        .find(|(_, (_, addrs))| addrs.contains(&route()))
        .map(|(k, _)| *k)?;
    assert!(
        host.routes.contains(&route()),
        "the kernel routes it into the overlay"
    );
    sim.nodes.iter().position(|n| n.public() == holder)
}

#[test]
fn a_route_moves_to_a_live_gateway_within_5_s_and_back_and_never_to_one_without_the_grant() {
    let mut sim = mesh(31);
    let t = sim.run_until(10_000, |s| carrier(s, CLIENT) == Some(G1));
    assert!(
        t.is_some(),
        "the client routes 198.19.0.0/24 to the gateway with the lower key"
    );
    assert!(
        sim.nodes[G1].public() < sim.nodes[G2].public(),
        "the test's premise"
    );
    // A node does not route what it serves itself into the overlay.
    assert_eq!(carrier(&sim, G1), None);
    assert_eq!(carrier(&sim, PRETENDER), None);
    assert_eq!(carrier(&sim, G2), None);
    sim.kill(G1);
    let moved = sim.run_until(5_000, |s| carrier(s, CLIENT) == Some(G2));
    assert!(
        moved.is_some(),
        "the route moved to the live gateway within 5 s"
    );
    eprintln!("failover took {} ms", moved.unwrap());
    sim.start(G1);
    let back = sim.run_until(5_000, |s| carrier(s, CLIENT) == Some(G1));
    assert!(back.is_some(), "and back when it returns");
    // Never to the member without the grant, whatever it says it serves.
    sim.kill(G1);
    sim.kill(G2);
    sim.run(5_000);
    assert_eq!(carrier(&sim, CLIENT), None, "no live gateway: no route");
}
