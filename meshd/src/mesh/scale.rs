//! The scale benchmark of the mesh node: many nodes in memory over links with 1% loss, in
//! simulated time (`bench/scale.sh` runs it: `cargo test --release -p meshd -- --ignored
//! --nocapture scale`; `MESH_SIM_NODES` sets N, 1,000 by default). It prints, in simulated
//! seconds, the time to full membership from one seed, the time for a policy set and for a
//! revocation to reach every node, control bytes per node per minute at rest, and memory per node.

use super::node::Event;
use super::sim::{Sim, TICK_MS};
use std::time::Instant;

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[test]
#[ignore = "a benchmark: bench/scale.sh"]
fn scale() {
    let n: usize = std::env::var("MESH_SIM_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let wall = Instant::now();
    let rss0 = rss_bytes();
    let mut sim = Sim::new(n, 42);
    sim.loss_pct = 1;
    sim.jitter_ms = 5;
    sim.check_derivation = false;
    sim.start_all();
    let progress = std::env::var("MESH_SIM_PROGRESS").is_ok();
    let formed = sim.run_until(600_000, |s| {
        if progress && s.now_ms % 1000 == 0 {
            let installed: usize = s.nodes.iter().map(|x| x.host.peers.len()).sum();
            let complete = s
                .nodes
                .iter()
                .filter(|x| x.host.peers.len() == n - 1)
                .count();
            eprintln!(
                "t={:>4.1}s installed {:>5.1}% of pairs, {complete} nodes complete, {:.0} s of CPU",
                (s.now_ms - super::sim::T0_MS) as f64 / 1000.0,
                100.0 * installed as f64 / (n * (n - 1)) as f64,
                wall.elapsed().as_secs_f64()
            );
        }
        Sim::full_mesh(s)
    });
    let rss1 = rss_bytes();
    let formed_s = formed.map(|ms| ms as f64 / 1000.0);
    eprintln!(
        "N={n}: full membership from one seed in {:?} simulated s ({:.0} s of CPU so far)",
        formed_s,
        wall.elapsed().as_secs_f64()
    );
    let everywhere = |s: &Sim, f: &dyn Fn(&super::node::Node) -> bool| {
        s.nodes.iter().all(|x| x.node.as_ref().is_some_and(f))
    };
    let set = sim.policy_set(1, "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: all()\n  ingress: [{action: Allow}]\n");
    sim.handle(0, Event::ApplyPolicy(set)).unwrap();
    let policy = sim.run_until(120_000, |s| everywhere(s, &|x| x.policy().serial() == 1));
    let victim = sim.nodes[n - 1].public();
    let crl = proto::cert::RevocationList::sign_with_keys(
        "example.org",
        1,
        sim.now_ms / 1000,
        vec![],
        vec![victim],
        &sim.ca.key,
    )
    .unwrap();
    sim.handle(n / 2, Event::AddRevocation(crl)).unwrap();
    let revoked = sim.run_until(120_000, |s| {
        s.nodes[..n - 1]
            .iter()
            .all(|x| !x.node().members().contains_key(&victim))
    });
    // At rest: one simulated minute after everything settled.
    sim.run(10_000);
    let bytes0 = sim.bytes;
    sim.run(60_000);
    let per_node_minute = (sim.bytes - bytes0) as f64 / n as f64;
    eprintln!(
        "N={n}: policy set everywhere in {:?} s, revocation everywhere in {:?} s (simulated)",
        policy.map(|ms| ms as f64 / 1000.0),
        revoked.map(|ms| ms as f64 / 1000.0)
    );
    eprintln!(
        "N={n}: at rest {per_node_minute:.0} control bytes per node per minute; memory {:.0} KiB per node (the whole simulation, member lists included); {:.0} s of CPU; tick {TICK_MS} ms",
        (rss1.saturating_sub(rss0)) as f64 / 1024.0 / n as f64,
        wall.elapsed().as_secs_f64()
    );
    assert!(formed.is_some() && policy.is_some() && revoked.is_some());
}

/// Workload identities at scale (`bench/scale.sh churn`): N nodes (`MESH_SIM_NODES`, 100), each
/// attaching P pods (`MESH_SIM_PODS`, 100) from the simulated issuer, over links with 1% loss.
/// Prints the simulated time until every node holds every pod's certificate, the control bytes
/// it took per node, then the same for a churn that replaces a tenth of every node's pods, and
/// the bytes per node per minute at rest afterwards.
#[test]
#[ignore = "a benchmark: bench/scale.sh churn"]
fn churn() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (n, pods) = (env("MESH_SIM_NODES", 100), env("MESH_SIM_PODS", 100));
    let wall = Instant::now();
    let mut sim = Sim::new(n, 7);
    sim.loss_pct = 1;
    sim.jitter_ms = 5;
    sim.check_derivation = false;
    sim.with_issuer(3600);
    sim.start_all();
    let formed = sim.run_until(600_000, Sim::full_mesh);
    assert!(formed.is_some(), "the mesh formed");
    let name = |i: usize, p: usize, round: usize| format!("w{round}-{i}-{p}");
    let addr = |i: usize, p: usize, round: usize| {
        let k = (round * n + i) * pods + p;
        format!("100.{}.{}.{}/32", 66 + k / 65_536, (k / 256) % 256, k % 256)
    };
    let reference = |name: &str| proto::workload::WorkloadRef {
        namespace: "microblog".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    };
    // Every node holds every other node's `want` workloads.
    let settled = |s: &Sim, want: &dyn Fn(usize) -> Vec<String>| {
        (0..n).all(|i| {
            (0..n).filter(|j| *j != i).all(|j| {
                let mut held: Vec<String> = s.nodes[i]
                    .node()
                    .workloads_of(&s.nodes[j].public())
                    .iter()
                    .map(|c| c.body.name.clone())
                    .collect();
                held.sort();
                let mut w = want(j);
                w.sort();
                held == w
            })
        })
    };
    for i in 0..n {
        for p in 0..pods {
            sim.schedule(&name(i, p, 0), i, &addr(i, p, 0));
        }
    }
    let (bytes0, t0) = (sim.bytes, wall.elapsed().as_secs_f64());
    for i in 0..n {
        for p in 0..pods {
            sim.handle(i, Event::Attach(reference(&name(i, p, 0))))
                .unwrap();
        }
    }
    let first: Vec<Vec<String>> = (0..n)
        .map(|i| (0..pods).map(|p| name(i, p, 0)).collect())
        .collect();
    let all_in = sim.run_until(600_000, |s| settled(s, &|j| first[j].clone()));
    let issued = sim.issuer.as_ref().unwrap().issued;
    eprintln!(
        "N={n} P={pods}: {} pods in force on every node in {:?} simulated s; {issued} certificates issued; {:.0} KB of control traffic per node; {:.0} s of CPU",
        n * pods,
        all_in.map(|ms| ms as f64 / 1000.0),
        (sim.bytes - bytes0) as f64 / n as f64 / 1000.0,
        wall.elapsed().as_secs_f64() - t0
    );
    // Churn: a tenth of every node's pods replaced by new ones, at new addresses.
    let moved = (pods / 10).max(1);
    let (bytes1, t1) = (sim.bytes, wall.elapsed().as_secs_f64());
    for i in 0..n {
        for p in 0..moved {
            sim.schedule(&name(i, p, 1), i, &addr(i, p, 1));
            sim.handle(i, Event::Detach(reference(&name(i, p, 0))))
                .unwrap();
            sim.handle(i, Event::Attach(reference(&name(i, p, 1))))
                .unwrap();
        }
    }
    let second: Vec<Vec<String>> = (0..n)
        .map(|i| {
            (0..pods)
                .map(|p| name(i, p, usize::from(p < moved)))
                .collect()
        })
        .collect();
    let churned = sim.run_until(600_000, |s| settled(s, &|j| second[j].clone()));
    eprintln!(
        "N={n} P={pods}: churn of {} pods per node settled everywhere in {:?} simulated s; {:.0} KB of control traffic per node; {:.0} s of CPU",
        moved,
        churned.map(|ms| ms as f64 / 1000.0),
        (sim.bytes - bytes1) as f64 / n as f64 / 1000.0,
        wall.elapsed().as_secs_f64() - t1
    );
    sim.run(10_000);
    let bytes2 = sim.bytes;
    sim.run(60_000);
    eprintln!(
        "N={n} P={pods}: at rest {:.0} control bytes per node per minute; memory {:.0} MiB in all",
        (sim.bytes - bytes2) as f64 / n as f64,
        rss_bytes() as f64 / 1024.0 / 1024.0
    );
    assert!(all_in.is_some() && churned.is_some());
}
