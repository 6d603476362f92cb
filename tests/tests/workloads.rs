//! Workload identities issued online (issue 14), with real processes in network namespaces: the
//! issuer (`meshctl ca serve`) on the underlay, meshd nodes that attach workloads by reference,
//! and what the mesh derives from the certificates.

use mesh_tests::*;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const ISSUER: &str = "198.18.3.100:7100";

/// Two nodes (`nodes/node-a` at 100.64.3.1, `nodes/node-b` at 100.64.3.2) and the issuer, on one
/// switch; the registry places the workloads.
struct WorkloadLab {
    lab: Lab,
    pki: Pki,
    /// Each node's namespace and interface.
    nodes: Vec<(String, String)>,
}

fn meshctl(args: &[&str]) -> Output {
    Command::new(bin("meshctl"))
        .args(args)
        .output()
        .expect("running meshctl")
}

impl WorkloadLab {
    fn new() -> WorkloadLab {
        let mut lab = Lab::new();
        let sw = lab.switch();
        let pki = Pki::new(&lab, "example.org", "ca");
        let iss = lab.host("iss");
        lab.attach(&sw, &iss, "198.18.3.100/24");
        let ca = pki.dir.to_str().unwrap().to_string();
        lab.spawn(
            &iss,
            "issuer",
            &bin("meshctl"),
            &[
                "ca", "serve", "--ca", &ca, "--listen", ISSUER, "--ttl", "1h",
            ],
        );
        let key = wait_for_issuer_key(&lab);
        let mut nodes = Vec::new();
        for (i, name) in ["node-a", "node-b"].iter().enumerate() {
            let i = i + 1;
            let ns = lab.host(&format!("n{i}"));
            lab.attach(&sw, &ns, &format!("198.18.3.{i}/24"));
            let (cert, key_file) = pki.issue("nodes", name, &format!("100.64.3.{i}/32"), &[]);
            let ifname = lab.name(&format!("w{i}"));
            let seeds: Vec<&str> = if i == 1 {
                vec![]
            } else {
                vec!["198.18.3.1:51820"]
            };
            let bundle = [pki.ca_cert(), pki.dir.join("issuer/ca.crt")];
            let cfg = mesh_config(&lab, &ifname, &cert, &key_file, &bundle, &seeds);
            let mut text = std::fs::read_to_string(&cfg).unwrap();
            text.push_str(&format!(
                "\n[issuer]\nendpoint = \"{ISSUER}\"\nkey = \"{key}\"\n"
            ));
            std::fs::write(&cfg, text).unwrap();
            lab.meshd_config(&ns, &ifname, &cfg);
            nodes.push((ns, ifname));
        }
        let wl = WorkloadLab { lab, pki, nodes };
        wait_for("both nodes to meet", Duration::from_secs(30), || {
            wl.nodes.iter().all(|(_, ifc)| {
                wl.lab.status(ifc)["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == 1)
            })
        });
        wl
    }

    fn ca(&self) -> String {
        self.pki.dir.to_str().unwrap().to_string()
    }

    /// Registers pod `name` (UID `uid`, service account `sa`) at `ip` on node `node`.
    fn register(&self, name: &str, uid: &str, sa: &str, node: &str, ip: &str) {
        let out = meshctl(&[
            "workload",
            "register",
            "--ca",
            &self.ca(),
            "--namespace",
            "microblog",
            "--name",
            name,
            "--uid",
            uid,
            "--service-account",
            sa,
            "--node",
            node,
            "--ip",
            ip,
            "--label",
            &format!("app={sa}"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `meshctl workload attach|detach` on node `i` (from 1).
    fn workload(&self, i: usize, verb: &str, name: &str, uid: &str) -> Output {
        let mut args = vec![
            "workload",
            verb,
            "-i",
            &self.nodes[i - 1].1,
            "--namespace",
            "microblog",
            "--name",
            name,
            "--uid",
            uid,
        ];
        if verb == "attach" {
            args.extend(["--wait", "5s"]);
        }
        meshctl(&args)
    }

    /// The allowed IPs node `i` holds for its one peer.
    fn allowed(&self, i: usize) -> Vec<String> {
        let st = self.lab.status(&self.nodes[i - 1].1);
        st["peers"][0]["allowed_ips"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }
}

/// The issuer's public key, from the line it prints once it listens.
fn wait_for_issuer_key(lab: &Lab) -> String {
    let log: PathBuf = lab.dir.join("issuer.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.trim_start().starts_with("key ")) {
            return line.split_whitespace().nth(1).unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the issuer did not start: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_node_gets_the_identity_of_a_workload_it_runs_and_only_that_and_a_detached_one_is_cut() {
    if !can_run() {
        return;
    }
    let wl = WorkloadLab::new();
    wl.register("post-1", "u1", "post", "nodes/node-a", "100.64.4.1/32");
    wl.register("api-1", "u2", "api", "nodes/node-b", "100.64.4.2/32");
    // Node A attaches its pod: the issuer signs what the registry says of it.
    let out = wl.workload(1, "attach", "post-1", "u1");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("workload microblog/post-1 is example.org/microblog/post"),
        "{}",
        text(&out)
    );
    wait_for(
        "node B to route the pod's address to A",
        Duration::from_secs(5),
        || wl.allowed(2).contains(&"100.64.4.1/32".to_string()),
    );
    // Node A asks for api-1, which runs on node B: refused, with the reason, and nothing of it
    // reaches the mesh.
    let out = wl.workload(1, "attach", "api-1", "u2");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not run on node nodes/node-a"),
        "{}",
        text(&out)
    );
    // A stale UID (the pod was replaced) is refused too.
    let out = wl.workload(2, "attach", "api-1", "old-uid");
    assert!(!out.status.success());
    assert!(text(&out).contains("is now another one"), "{}", text(&out));
    assert_eq!(wl.allowed(1), ["100.64.3.2/32"]);
    // Packets to and from the pod's address cross as the pod's identity.
    wl.lab.exec_ok(
        &wl.nodes[0].0,
        &["ip", "addr", "add", "100.64.4.1/32", "dev", "lo"],
    );
    assert!(wl
        .lab
        .ping_until(&wl.nodes[1].0, "100.64.4.1", Duration::from_secs(5)));
    // Detached: withdrawn from node B within 5 s.
    let out = wl.workload(1, "detach", "post-1", "u1");
    assert!(out.status.success(), "{}", text(&out));
    let took = wait_for(
        "node B to drop the pod's address",
        Duration::from_secs(5),
        || !wl.allowed(2).contains(&"100.64.4.1/32".to_string()),
    );
    eprintln!("withdrawn in {took:?}");
    assert!(!wl.lab.ping(&wl.nodes[1].0, "100.64.4.1", 1));
    let log = std::fs::read_to_string(wl.lab.dir.join("issuer.log")).unwrap();
    assert!(log.contains("issued microblog/post-1"), "{log}");
    assert!(log.contains("refused microblog/api-1"), "{log}");
}

#[test]
fn attach_fails_with_the_reason_when_no_issuer_answers() {
    if !can_run() {
        return;
    }
    let wl = WorkloadLab::new();
    wl.register("post-1", "u1", "post", "nodes/node-a", "100.64.4.1/32");
    wl.lab
        .exec_ok(&wl.nodes[0].0, &["nft", "add", "table", "inet", "cut"]);
    wl.lab.exec_ok(
        &wl.nodes[0].0,
        &[
            "nft",
            "add",
            "chain",
            "inet",
            "cut",
            "out",
            "{ type filter hook output priority 0; policy accept; }",
        ],
    );
    wl.lab.exec_ok(
        &wl.nodes[0].0,
        &[
            "nft",
            "add",
            "rule",
            "inet",
            "cut",
            "out",
            "ip",
            "daddr",
            "198.18.3.100",
            "drop",
        ],
    );
    let start = Instant::now();
    let out = wl.workload(1, "attach", "post-1", "u1");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no certificate within 5000 ms"),
        "{}",
        text(&out)
    );
    assert!(start.elapsed() < Duration::from_secs(8));
    assert_eq!(wl.allowed(2), ["100.64.3.1/32"]);
}
