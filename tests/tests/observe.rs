//! Seeing and shaping traffic on real meshd nodes: allow-lists suggested from the flows a mesh in
//! audit mode observed, applied in enforce mode.

use mesh_tests::policy_lab::*;
use mesh_tests::traffic::*;
use mesh_tests::*;
use std::process::Command;

/// The microblog's services, one node each (node i is `SERVICES[i-1]`), and the flows the guide
/// draws between them: (from, to, port).
const SERVICES: [&str; 5] = ["api", "post", "search", "user", "storage"];
const FLOWS: [(usize, usize, u16); 6] = [
    (1, 2, 8080), // api -> post
    (3, 2, 8080), // search -> post
    (1, 3, 8080), // api -> search
    (1, 4, 8080), // api -> user
    (2, 5, 5432), // post -> storage
    (4, 5, 5432), // user -> storage
];

/// Audit mode on or off in node `i`'s configuration, applied by `meshctl reload`.
fn set_audit(pl: &PolicyLab, i: usize, on: bool) {
    let node = pl.node(i);
    let text = std::fs::read_to_string(&node.config).unwrap();
    let text = text.replace(&format!("audit = {}", !on), &format!("audit = {on}"));
    std::fs::write(&node.config, text).unwrap();
    let out = run(Command::new(bin("meshctl")).args(["reload", "-i", &node.ifname]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn allow_lists_suggested_from_audited_flows_pass_the_same_traffic_and_deny_the_rest() {
    if !can_run() {
        return;
    }
    let names: Vec<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    let mut pl = labelled_policy_lab(&names, &[1, 2, 3, 4, 5], Fragments::Pass);
    let _servers: Vec<Echo> = [(2, 8080), (3, 8080), (4, 8080), (5, 5432)]
        .iter()
        .map(|&(i, port)| echo(&pl.node(i).ns, pl.addr(i, port)))
        .collect();

    // Audit mode, zero trust, no policy yet: every flow would be denied, and passes.
    let replay = |pl: &PolicyLab| {
        for &(from, to, port) in &FLOWS {
            for _ in 0..2 {
                assert!(
                    talks(&pl.node(from).ns, pl.addr(to, port), QUICK),
                    "{} -> {}:{port}",
                    SERVICES[from - 1],
                    SERVICES[to - 1]
                );
            }
        }
    };
    replay(&pl);
    let logs: Vec<std::path::PathBuf> = (1..=5)
        .map(|i| {
            let path = pl.lab.dir.join(format!("flows-{i}.jsonl"));
            let out = run(Command::new(bin("meshctl")).args([
                "flows",
                "-o",
                "json",
                "-i",
                &pl.node(i).ifname,
            ]));
            std::fs::write(&path, &out.stdout).unwrap();
            path
        })
        .collect();
    let audited: usize = (1..=5)
        .map(|i| {
            pl.flows(i, true)
                .iter()
                .filter(|r| r["verdict"] == "audit")
                .count()
        })
        .sum();
    assert!(audited >= 12, "each flow audited: {audited}");

    let mut suggest = Command::new(bin("meshctl"));
    suggest.args(["policy", "suggest", "--trust-domain", "example.org"]);
    for l in &logs {
        suggest.arg("--flows").arg(l);
    }
    let out = run(&mut suggest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert_eq!(yaml.matches("kind: NetworkPolicy").count(), 4 + 4, "{yaml}");
    let file = pl.lab.dir.join("suggested.yaml");
    std::fs::write(&file, &yaml).unwrap();
    for check in [
        vec![
            "test",
            "-f",
            file.to_str().unwrap(),
            "--trust-domain",
            "example.org",
        ],
        vec![
            "check",
            "-f",
            file.to_str().unwrap(),
            "--trust-domain",
            "example.org",
            "--from",
            "microblog/api",
            "--to",
            "microblog/post",
            "--port",
            "8080",
        ],
    ] {
        let o = run(Command::new(bin("meshctl")).arg("policy").args(&check));
        assert!(
            o.status.success(),
            "policy {check:?}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }

    // Enforced: the suggestion applied as it was printed, audit mode off everywhere.
    pl.apply(1, &yaml);
    for i in 1..=5 {
        set_audit(&pl, i, false);
    }
    let before: Vec<u64> = (1..=5)
        .map(|i| {
            pl.flows(i, false)
                .last()
                .map_or(0, |r| r["seq"].as_u64().unwrap())
        })
        .collect();
    replay(&pl);
    for i in 1..=5 {
        let denied: Vec<_> = pl
            .flows(i, true)
            .into_iter()
            .filter(|r| r["seq"].as_u64().unwrap() > before[i - 1])
            .collect();
        assert!(denied.is_empty(), "node {i} denied {denied:?}");
    }
    // A flow never observed is denied: user -> post, api -> storage, and post on another port.
    assert!(
        !talks(&pl.node(4).ns, pl.addr(2, 8080), QUICK),
        "user -> post"
    );
    assert!(
        !talks(&pl.node(1).ns, pl.addr(5, 5432), QUICK),
        "api -> storage"
    );
    let _other = echo(&pl.node(2).ns, pl.addr(2, 9090));
    assert!(
        !talks(&pl.node(1).ns, pl.addr(2, 9090), QUICK),
        "api -> post:9090"
    );
    let denied: usize = (1..=5).map(|i| pl.flows(i, true).len()).sum();
    assert!(denied > audited, "the denials are logged");
}
