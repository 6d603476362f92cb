//! Mesh mode: identities from a CA, peering from one seed, and refusals, with real meshd
//! processes in network namespaces on one switch.

use mesh_tests::*;
use std::time::{Duration, Instant};

/// Waits until `ns` pings every address in `targets`, or panics after `timeout`.
fn wait_full_mesh(lab: &Lab, nodes: &[(String, String)], timeout: Duration) -> Duration {
    let start = Instant::now();
    for (ns, _) in nodes {
        for (_, ip) in nodes {
            if !lab.ping_until(ns, ip, timeout.saturating_sub(start.elapsed())) {
                panic!("{ns} cannot reach {ip} after {:?}", start.elapsed());
            }
        }
    }
    start.elapsed()
}

#[test]
fn five_nodes_from_one_seed_form_a_full_mesh() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let mut nodes = Vec::new();
    for i in 1..=5 {
        let ns = lab.host(&format!("n{i}"));
        lab.attach(&sw, &ns, &format!("198.18.1.{i}/24"));
        let (cert, key) = pki.issue(
            "prod",
            &format!("node{i}"),
            &format!("100.64.1.{i}/32"),
            &["--label", &format!("app=n{i}")],
        );
        let ifname = lab.name(&format!("m{i}"));
        let seeds: Vec<&str> = if i == 1 {
            vec![]
        } else {
            vec!["198.18.1.1:51820"]
        };
        let cfg = mesh_config(&lab, &ifname, &cert, &key, &[pki.ca_cert()], &seeds);
        lab.meshd_config(&ns, &ifname, &cfg);
        nodes.push((ns, format!("100.64.1.{i}")));
    }
    let took = wait_full_mesh(&lab, &nodes, Duration::from_secs(30));
    eprintln!("full mesh of 5 in {took:?}");
    // Every pair is a direct tunnel: each node has the other four as WireGuard peers, with the
    // addresses of their certificates.
    for i in 1..=5 {
        let st = lab.status(&lab.name(&format!("m{i}")));
        let peers = st["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 4, "node {i}: {st}");
        for p in peers {
            let id = p["identity"].as_str().unwrap();
            let n: u32 = id
                .trim_start_matches("example.org/prod/node")
                .parse()
                .unwrap();
            assert_eq!(
                p["allowed_ips"],
                serde_json::json!([format!("100.64.1.{n}/32")])
            );
            assert_eq!(p["labels"]["app"], format!("n{n}"));
            assert!(p["handshake_age_secs"].is_u64(), "{p}");
        }
        assert_eq!(st["identity"], format!("example.org/prod/node{i}"));
    }
}
