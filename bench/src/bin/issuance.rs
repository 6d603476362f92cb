//! Issuance rate of the workload issuer: what `meshctl ca serve` does for each request, in
//! process (no socket): open the sealed request, check the node's certificate, decide each
//! workload against a registry of 10,000 pods, sign each certificate, seal the answer; and the
//! node's side, opening the answer. Prints certificates per second for requests of 1 and of 16
//! workloads. Run: cargo run --release -p mesh-bench --bin issuance

use ed25519_dalek::SigningKey;
use proto::cert::{CertBody, CertKind};
use proto::control::{self, Datagram, Message};
use proto::issuer::Responder;
use proto::workload::{Issuance, NodeName, Registry, Workload, WorkloadRef};
use rand_core::OsRng;
use std::net::SocketAddr;
use std::time::Instant;
use x25519_dalek::{PublicKey, StaticSecret};

const NODES: usize = 100;
const PODS_PER_NODE: usize = 100;

fn main() {
    let node_ca = SigningKey::from_bytes(&[1; 32]);
    let pods_ca = SigningKey::from_bytes(&[2; 32]);
    let ca_cert = CertBody::ca(
        "example.org",
        "nodes",
        node_ca.verifying_key().to_bytes(),
        1,
        (0, u64::MAX / 2),
        vec![],
    )
    .sign(&node_ca)
    .unwrap();
    let (trust, _) = proto::trust::Trust::new("example.org", vec![ca_cert]);
    let now = 1_800_000_000;
    let mut registry = Registry::default();
    let mut nodes = Vec::new();
    for n in 0..NODES {
        let secret = StaticSecret::from([n as u8 + 10; 32]);
        let cert = CertBody {
            kind: CertKind::Identity,
            serial: n as u64 + 1,
            not_before: now - 10,
            not_after: now + 86_400,
            trust_domain: "example.org".into(),
            namespace: "nodes".into(),
            name: format!("node{n}"),
            public_key: *PublicKey::from(&secret).as_bytes(),
            issuer: node_ca.verifying_key().to_bytes(),
            labels: Default::default(),
            addrs: vec![format!("100.64.0.{}/32", n + 1).parse().unwrap()],
            routes: vec![],
            ports: vec![],
        }
        .sign(&node_ca)
        .unwrap();
        for p in 0..PODS_PER_NODE {
            let i = n * PODS_PER_NODE + p;
            registry
                .register(Workload {
                    reference: WorkloadRef {
                        namespace: "microblog".into(),
                        name: format!("pod-{i}"),
                        uid: format!("uid-{i}"),
                    },
                    service_account: ["api", "post", "search", "user"][i % 4].into(),
                    labels: [(
                        "app".to_string(),
                        ["api", "post", "search", "user"][i % 4].to_string(),
                    )]
                    .into(),
                    addrs: vec![format!("100.65.{}.{}/32", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap()],
                    ports: vec!["http=8080/tcp".parse().unwrap()],
                    node: NodeName {
                        namespace: "nodes".into(),
                        name: format!("node{n}"),
                    },
                })
                .unwrap();
        }
        nodes.push((secret, cert));
    }
    let issuer_secret = StaticSecret::from([3; 32]);
    let issuer_key = *PublicKey::from(&issuer_secret).as_bytes();
    let issuance = Issuance {
        trust_domain: "example.org".into(),
        node_issuers: vec![node_ca.verifying_key().to_bytes()],
        now,
        lifetime_secs: 3600,
    };
    println!(
        "registry: {} pods on {NODES} nodes; each certificate signed with Ed25519",
        NODES * PODS_PER_NODE
    );
    for batch in [1usize, 16] {
        let mut responder = Responder::new(issuer_secret.clone());
        let requests = 2_000 / batch.max(1) * 4;
        let mut issued = 0u64;
        let mut serial = 0u64;
        let start = Instant::now();
        for r in 0..requests {
            let (secret, cert) = &nodes[r % NODES];
            let from: SocketAddr = format!("198.18.0.{}:51820", r % NODES + 1).parse().unwrap();
            let first = (r % PODS_PER_NODE) / batch * batch;
            let workloads: Vec<WorkloadRef> = (0..batch)
                .map(|k| {
                    let i = (r % NODES) * PODS_PER_NODE + (first + k) % PODS_PER_NODE;
                    WorkloadRef {
                        namespace: "microblog".into(),
                        name: format!("pod-{i}"),
                        uid: format!("uid-{i}"),
                    }
                })
                .collect();
            let request = Message::IssueRequest {
                nonce: r as u64,
                certificate: cert.clone(),
                workloads,
            };
            let sealed = control::seal_message(
                secret,
                &issuer_key,
                &StaticSecret::random_from_rng(OsRng),
                (r as u64 + 1) * 1_000_000,
                &request.encode(),
            )
            .unwrap();
            let mut opened = None;
            for d in &sealed {
                if let Some(o) = responder.open(r as u64, from, d).unwrap() {
                    opened = Some(o);
                }
            }
            let opened = opened.expect("a whole request");
            let Message::IssueRequest {
                nonce,
                certificate,
                workloads,
            } = &opened.msg
            else {
                unreachable!()
            };
            let results = proto::workload::answer(
                &opened.sender,
                certificate,
                workloads,
                &trust,
                None,
                &registry,
                &issuance,
                |g| {
                    serial += 1;
                    g.body(serial, pods_ca.verifying_key().to_bytes())
                        .sign(&pods_ca)
                        .map_err(|e| e.to_string())
                },
            )
            .unwrap();
            assert!(responder.confirm(&opened));
            issued += results.iter().filter(|r| r.is_ok()).count() as u64;
            let answer = Message::IssueAnswer {
                nonce: *nonce,
                results: results.into_iter().map(Into::into).collect(),
            };
            for d in responder.seal(&opened.sender, &answer, r as u64, &mut OsRng) {
                // The node opens it.
                let Datagram::Sealed(s) = control::decode(&d).unwrap() else {
                    unreachable!()
                };
                s.open(secret).unwrap();
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{requests} requests of {batch:>2} workloads: {issued} certificates in {secs:.2} s = {:.0} certificates/s, {:.0} requests/s (one core)",
            issued as f64 / secs,
            requests as f64 / secs
        );
    }
}
