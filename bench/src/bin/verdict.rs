//! Verdict cost per packet: a new flow (compiled policy walk) and an established flow (connection
//! tracking lookup), with 10, 1,000 and 10,000 policies over 1,000 identities.
//! Run: cargo run --release -p mesh-bench --bin verdict

use policy::conntrack::{Conntrack, Timeouts};
use policy::engine::{Direction, Endpoint, Flow, PolicySet, Posture, TCP};
use policy::model::parse_documents;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

const IDENTITIES: usize = 1000;
const NAMESPACES: usize = 10;

fn identities() -> Vec<Endpoint> {
    (0..IDENTITIES)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("app".to_string(), format!("svc{i}"));
            labels.insert("tier".to_string(), ["fe", "be", "db"][i % 3].to_string());
            Endpoint {
                trust_domain: "example.org".into(),
                namespace: format!("ns{}", i % NAMESPACES),
                name: format!("svc{i}"),
                labels,
                ip: Some(
                    format!("100.64.{}.{}", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                ),
                ports: Vec::new(),
            }
        })
        .collect()
}

/// `n` namespaced policies, each selecting one service and allowing a few callers on one port.
fn policies(n: usize) -> String {
    let mut y = String::new();
    for i in 0..NAMESPACES {
        y.push_str(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{i}, labels: {{team: t{i}}}}}\n---\n"));
    }
    for p in 0..n {
        let svc = (p * 7919) % IDENTITIES;
        let ns = svc % NAMESPACES;
        let callers: Vec<String> = (1..=3)
            .map(|k| format!("svc{}", (svc + k * NAMESPACES) % IDENTITIES))
            .collect();
        y.push_str(&format!(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p{p}, namespace: ns{ns}}}\nspec:\n  order: {}\n  selector: app == 'svc{svc}'\n  ingress:\n    - action: Allow\n      protocol: TCP\n      source:\n        serviceAccounts: {{names: [{}]}}\n      destination: {{ports: [{}]}}\n  egress:\n    - action: Allow\n      protocol: TCP\n      destination: {{selector: tier == 'db', ports: ['5432']}}\n---\n",
            p % 100,
            callers.join(", "),
            8000 + p % 50
        ));
    }
    y
}

fn main() {
    let ids = identities();
    println!("| policies | identities | resolve all (ms) | one identity joins (ms) | new flow (ns/verdict, both directions) | established flow (ns/packet) |");
    println!("|---|---|---|---|---|---|");
    for n in [10, 1000, 10_000] {
        let docs = parse_documents(&policies(n), "bench.yaml").expect("generated policies parse");
        let set =
            PolicySet::compile(&docs, Posture::ZeroTrust).expect("generated policies compile");
        let t = Instant::now();
        let compiled = set.resolve(&ids);
        let resolve_ms = t.elapsed().as_secs_f64() * 1e3;
        // A member joining: the last identity added to the others already resolved (with the
        // copy a new snapshot needs), against resolving everything again.
        let base = set.resolve(&ids[..IDENTITIES - 1]);
        let t = Instant::now();
        let mut grown = base.clone();
        grown.extend(&set, &ids[IDENTITIES - 1..]);
        let join_ms = t.elapsed().as_secs_f64() * 1e3;
        black_box(grown.identities());

        // New flows: random identity pairs and ports, egress of the source then ingress of the
        // destination, as meshd evaluates a first packet.
        let flows: Vec<(u32, u32, Flow)> = (0..4096u32)
            .map(|i| {
                let a = i.wrapping_mul(2654435761) % IDENTITIES as u32;
                let b = i.wrapping_mul(40503) % IDENTITIES as u32;
                let flow = Flow {
                    protocol: TCP,
                    src_port: Some(40000),
                    dst_port: Some(8000 + (i % 60) as u16),
                    icmp: None,
                    ip_version: 4,
                };
                (a, b, flow)
            })
            .collect();
        let rounds = 200;
        let t = Instant::now();
        let mut allowed = 0u64;
        for _ in 0..rounds {
            for (a, b, f) in &flows {
                let e = compiled.decide(
                    Direction::Egress,
                    f,
                    *a,
                    ids[*a as usize].ip,
                    *b,
                    ids[*b as usize].ip,
                );
                let i = compiled.decide(
                    Direction::Ingress,
                    f,
                    *a,
                    ids[*a as usize].ip,
                    *b,
                    ids[*b as usize].ip,
                );
                allowed += u64::from(black_box(e.allow && i.allow));
            }
        }
        let new_ns = t.elapsed().as_nanos() as f64 / (rounds * flows.len()) as f64;
        black_box(allowed);

        // Established flows: conntrack lookups of live flows.
        let mut ct = Conntrack::new(100_000, Timeouts::default());
        let keys: Vec<proto::ip::FlowKey> = (0..4096u32)
            .map(|i| proto::ip::FlowKey {
                src: ids[(i as usize) % IDENTITIES].ip.unwrap(),
                dst: ids[(i as usize * 7) % IDENTITIES].ip.unwrap(),
                protocol: proto::ip::PROTO_UDP,
                src_port: 10000 + i as u16,
                dst_port: 53,
                icmp: None,
                tcp_flags: 0,
                later_fragment: false,
                fragment_id: None,
            })
            .collect();
        for k in &keys {
            ct.insert(k, 100, 0, 0);
        }
        let t = Instant::now();
        for r in 0..rounds {
            for k in &keys {
                black_box(ct.track(black_box(k), 100, r as u64));
            }
        }
        let est_ns = t.elapsed().as_nanos() as f64 / (rounds * keys.len()) as f64;
        println!(
            "| {n} | {IDENTITIES} | {resolve_ms:.1} | {join_ms:.2} | {new_ns:.0} | {est_ns:.0} |"
        );
    }
}
