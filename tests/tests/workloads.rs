//! Workload identities issued online (issue 14), with real processes in network namespaces: the
//! issuer (`meshctl ca serve`) on the underlay, meshd nodes that attach workloads by reference,
//! and what the mesh derives from the certificates.

use mesh_tests::*;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const ISSUER: &str = "198.18.3.100:7100";
/// An address on the lab's switch where no issuer listens (no host has it).
const NO_ISSUER: &str = "198.18.3.99:7100";

/// Two nodes (`nodes/node-a` at 100.64.3.1, `nodes/node-b` at 100.64.3.2) and the issuer, on one
/// switch; the registry places the workloads.
struct WorkloadLab {
    lab: Lab,
    sw: Switch,
    pki: Pki,
    /// Each node's namespace and interface.
    nodes: Vec<(String, String)>,
    /// The policy admin's key.
    admin: PathBuf,
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
        let key = issuer_key(&lab);
        let admin = lab.dir.join("policy-admin.key");
        run(Command::new(bin("meshctl"))
            .args(["policy", "admin-key", "--out"])
            .arg(&admin));
        let policy = mesh_policy(&admin);
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
            let cfg = mesh_config_with(
                &lab,
                &ifname,
                &cert,
                &key_file,
                &[pki.ca_cert()],
                &seeds,
                &policy,
            );
            let mut text = std::fs::read_to_string(&cfg).unwrap().replace(
                "policy_admins = [",
                &format!(
                    "workload_cas = [\"{}\"]\npolicy_admins = [",
                    pki.dir.join("issuer/ca.crt").display()
                ),
            );
            // node-b lists first a host the issuer does not run on (as after it moved): each
            // request goes there first, and to the issuer a second later.
            let at = if i == 1 {
                format!("endpoint = \"{ISSUER}\"")
            } else {
                format!("endpoints = [\"{NO_ISSUER}\", \"{ISSUER}\"]")
            };
            text.push_str(&format!("\n[issuer]\n{at}\nkey = \"{key}\"\n"));
            std::fs::write(&cfg, text).unwrap();
            lab.meshd_config(&ns, &ifname, &cfg);
            nodes.push((ns, ifname));
        }
        let wl = WorkloadLab {
            lab,
            sw,
            pki,
            nodes,
            admin,
        };
        wait_for("both nodes to meet", Duration::from_secs(30), || {
            wl.nodes.iter().all(|(_, ifc)| {
                wl.lab.status(ifc)["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == 1)
            })
        });
        wl
    }

    /// Applies the policy files `files` on node 1 and waits until both nodes run the set.
    fn apply(&self, files: &[PathBuf]) {
        let mut args = vec!["policy".to_string(), "apply".into()];
        for f in files {
            args.extend(["-f".into(), f.display().to_string()]);
        }
        args.extend([
            "--key".into(),
            self.admin.display().to_string(),
            "-i".into(),
            self.nodes[0].1.clone(),
        ]);
        let out = Command::new(bin("meshctl")).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        wait_for(
            "both nodes to run the policy set",
            Duration::from_secs(10),
            || {
                self.nodes
                    .iter()
                    .all(|(_, ifc)| self.lab.status(ifc)["policy"]["serial"].as_u64() > Some(0))
            },
        );
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

fn mesh_policy(admin: &std::path::Path) -> MeshPolicy {
    MeshPolicy {
        posture: "calico",
        audit: false,
        admins: vec![PathBuf::from(format!("{}.pub", admin.display()))],
    }
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
    // Status, per workload: node A's attached workloads with their state; node B's view of A
    // with the workload identity behind it; peer list the same.
    let st = wl.lab.status(&wl.nodes[0].1);
    let attached = st["workloads"].as_array().expect("node A's workloads");
    let state = |name: &str| {
        attached
            .iter()
            .find(|w| w["name"] == name)
            .map(|w| w["state"].as_str().unwrap().to_string())
    };
    assert_eq!(state("post-1").as_deref(), Some("in force"), "{st}");
    assert!(
        state("api-1").is_some_and(|s| s.starts_with("refused: ")),
        "{st}"
    );
    let post = attached.iter().find(|w| w["name"] == "post-1").unwrap();
    assert_eq!(
        post["certificate"]["identity"],
        "example.org/microblog/post"
    );
    assert_eq!(post["certificate"]["addresses"][0], "100.64.4.1/32");
    let st = wl.lab.status(&wl.nodes[1].1);
    assert_eq!(
        st["peers"][0]["workloads"][0]["identity"], "example.org/microblog/post",
        "{st}"
    );
    let out = meshctl(&["status", "-i", &wl.nodes[0].1]);
    assert!(
        text(&out).contains("microblog/post-1 (uid u1): in force  example.org/microblog/post"),
        "{}",
        text(&out)
    );
    let out = meshctl(&["peer", "list", "-i", &wl.nodes[1].1]);
    assert!(
        text(&out).contains("+ example.org/microblog/post"),
        "{}",
        text(&out)
    );
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
fn a_node_joins_with_a_single_use_token_and_its_private_key_never_leaves_it() {
    if !can_run() {
        return;
    }
    let mut wl = WorkloadLab::new();
    let vm = wl.lab.host("vm");
    wl.lab.attach(&wl.sw, &vm, "198.18.3.50/24");
    let token = |ttl: &str| {
        let out = meshctl(&[
            "ca",
            "token",
            "create",
            "--ca",
            &wl.ca(),
            "--namespace",
            "nodes",
            "--name",
            "vm-1",
            "--ip",
            "100.64.3.50/32",
            "--issuer",
            ISSUER,
            "--ttl",
            ttl,
        ]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let dir = |n: usize| wl.lab.dir.join(format!("vm-{n}"));
    // The issuer's addresses given on the command line (overriding the token's): the first is
    // a host it does not run on.
    let join = |n: usize, token: &str| {
        let out = dir(n);
        wl.lab.exec(
            &vm,
            &[
                bin("meshctl").to_str().unwrap(),
                "join",
                "--token",
                token,
                "--issuer",
                NO_ISSUER,
                "--issuer",
                ISSUER,
                "--out",
                out.to_str().unwrap(),
                "--wait",
                "5s",
            ],
        )
    };
    let good = token("1h");
    // A token of the right form that the CA never made (its secret changed): refused.
    let mut forged = good.clone().into_bytes();
    forged[12] = if forged[12] == b'A' { b'B' } else { b'A' };
    let out = join(0, std::str::from_utf8(&forged).unwrap());
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown join token"), "{}", text(&out));
    assert!(!dir(0).join("node.crt").exists());

    let out = join(1, &good);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("joined as example.org/nodes/vm-1 (100.64.3.50/32)"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!("endpoints = [\"{NO_ISSUER}\", \"{ISSUER}\"]")),
        "{}",
        text(&out)
    );
    // The key was made on the node, readable by its owner only, and the CA holds neither it
    // nor the token's secret.
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::read_to_string(dir(1).join("node.key")).unwrap();
    let mode = std::fs::metadata(dir(1).join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let secret_part = &good["meshjoin1.".len().."meshjoin1.".len() + 40];
    for entry in walk(&wl.pki.dir) {
        let bytes = std::fs::read(&entry).unwrap();
        let content = String::from_utf8_lossy(&bytes);
        assert!(
            !content.contains(key.trim()),
            "{} holds the node's key",
            entry.display()
        );
        assert!(
            !content.contains(secret_part),
            "{} holds the token",
            entry.display()
        );
    }
    // The same token again, by another key: refused, even though the first answer was taken.
    let out = join(2, &good);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("used already, by another key"),
        "{}",
        text(&out)
    );
    // A token past its time: refused.
    let short = token("1s");
    std::thread::sleep(Duration::from_millis(2_100));
    let out = join(3, &short);
    assert!(
        text(&out).contains("the join token expired"),
        "{}",
        text(&out)
    );

    // The joined node runs with what it was given, and the mesh takes it as itself.
    let ifname = wl.lab.name("wv");
    let cfg = mesh_config_with(
        &wl.lab,
        &ifname,
        &dir(1).join("node.crt"),
        &dir(1).join("node.key"),
        &[dir(1).join("ca.crt")],
        &["198.18.3.1:51820"],
        &mesh_policy(&wl.admin),
    );
    wl.lab.meshd_config(&vm, &ifname, &cfg);
    wait_for(
        "node-a to take the joined node",
        Duration::from_secs(30),
        || {
            wl.lab.status(&wl.nodes[0].1)["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["identity"] == "example.org/nodes/vm-1"))
        },
    );
    // The node is revoked (its key with it): its token, still good, gives it nothing more.
    let node_dir = wl.lab.dir.join("vm-1");
    let out = meshctl(&[
        "ca",
        "revoke",
        "--ca",
        &wl.ca(),
        "--cert",
        node_dir.join("node.crt").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let revoked_crt = std::fs::read(node_dir.join("node.crt")).unwrap();
    let out = wl.lab.exec(
        &vm,
        &[
            bin("meshctl").to_str().unwrap(),
            "join",
            "--token",
            &good,
            "--out",
            node_dir.to_str().unwrap(),
            "--wait",
            "5s",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("this token was redeemed for is revoked"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(node_dir.join("node.crt")).unwrap(),
        revoked_crt
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
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

/// Runs the CNI plugin in node `i`'s namespace as a kubelet would: `command` for pod `name` (UID
/// `uid`, container `container`) in network namespace `pod_ns`; (exit success, stdout).
#[allow(clippy::too_many_arguments)] // each is one of the kubelet's variables
fn cni(
    wl: &WorkloadLab,
    i: usize,
    command: &str,
    container: &str,
    pod_ns: &str,
    name: &str,
    uid: &str,
    mesh_interface: &str,
) -> (bool, serde_json::Value) {
    use std::io::Write;
    let conf = format!(
        r#"{{"cniVersion": "1.0.0", "name": "mesh", "type": "meshd-cni", "meshInterface": "{mesh_interface}", "attachWaitMs": 3000}}"#
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &wl.nodes[i - 1].0])
        .arg(bin("meshd-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/var/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=microblog;K8S_POD_NAME={name};K8S_POD_UID={uid}"
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running meshd-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    eprintln!(
        "meshd-cni {command}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), json)
}

/// The host-side links in node `i`'s namespace whose name starts with `msh`.
fn pod_veths(wl: &WorkloadLab, i: usize) -> Vec<String> {
    wl.lab
        .exec_ok(&wl.nodes[i - 1].0, &["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("msh"))
        .collect()
}

#[test]
fn pods_added_by_the_cni_plugin_talk_across_nodes_as_themselves_and_cannot_spoof() {
    if !can_run() {
        return;
    }
    let mut wl = WorkloadLab::new();
    wl.register("post-1", "u1", "post", "nodes/node-a", "100.64.4.1/32");
    wl.register("api-1", "u2", "api", "nodes/node-b", "100.64.4.2/32");
    wl.register("web-1", "u3", "web", "nodes/node-a", "100.64.4.3/32");
    let (pa, pb) = (wl.lab.host("pa"), wl.lab.host("pb"));
    let (ifa, ifb) = (wl.nodes[0].1.clone(), wl.nodes[1].1.clone());
    let (ok, result) = cni(&wl, 1, "ADD", "ctr-post-1", &pa, "post-1", "u1", &ifa);
    assert!(ok, "{result}");
    assert_eq!(result["ips"][0]["address"], "100.64.4.1/32");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    let (ok, result) = cni(&wl, 2, "ADD", "ctr-api-1", &pb, "api-1", "u2", &ifb);
    assert!(ok, "{result}");
    // The pod's address is the one its certificate names, and only that.
    let shown = wl
        .lab
        .exec_ok(&pa, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(shown.contains("100.64.4.1/32"), "{shown}");
    // The pod's link takes the mesh interface's MTU: its packets fit the tunnel without
    // path-MTU discovery (a full-size UDP datagram is sent, not refused).
    let mesh_mtu = wl.lab.exec_ok(
        &wl.nodes[0].0,
        &["cat", &format!("/sys/class/net/{ifa}/mtu")],
    );
    let pod_link = wl
        .lab
        .exec_ok(&pa, &["ip", "-o", "link", "show", "dev", "eth0"]);
    assert!(
        pod_link.contains(&format!("mtu {} ", mesh_mtu.trim())),
        "{pod_link} (mesh {mesh_mtu})"
    );
    assert!(
        wl.lab.ping_until(&pb, "100.64.4.1", Duration::from_secs(5)),
        "api-1 reaches post-1 across the mesh"
    );
    let full = (mesh_mtu.trim().parse::<usize>().unwrap() - 28).to_string();
    assert!(
        wl.lab
            .exec(
                &pb,
                &[
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    "-M",
                    "do",
                    "-s",
                    &full,
                    "100.64.4.1"
                ]
            )
            .status
            .success(),
        "a full-size packet crosses"
    );
    let (ok, _) = cni(&wl, 1, "CHECK", "ctr-post-1", &pa, "post-1", "u1", &ifa);
    assert!(ok);
    // post-1 takes web-1's address (on the same node) and sends from it: dropped at its own
    // node, by the rule on its veth, never reaching the mesh.
    let veth = pod_veths(&wl, 1).remove(0);
    let dropped = |wl: &WorkloadLab| -> u64 {
        let chain = wl.lab.exec_ok(
            &wl.nodes[0].0,
            &[
                "nft",
                "list",
                "chain",
                "inet",
                "meshd-cni",
                &format!("pod-{veth}"),
            ],
        );
        let line = chain
            .lines()
            .find(|l| l.contains("ip saddr"))
            .expect("the IPv4 rule");
        line.split("packets ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(dropped(&wl), 0, "the pod's own traffic passes");
    wl.lab
        .exec_ok(&pa, &["ip", "addr", "add", "100.64.4.3/32", "dev", "eth0"]);
    let spoofed = wl.lab.exec(
        &pa,
        &[
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "100.64.4.3",
            "100.64.4.2",
        ],
    );
    assert!(!spoofed.status.success(), "a spoofed source got an answer");
    assert!(dropped(&wl) >= 2, "dropped on the pod's veth");
    // A neighbour on the underlay sends as post-1 through node A: dropped there, never carried
    // by the mesh under post-1's identity.
    let iss = wl.lab.name("iss");
    wl.lab
        .exec_ok(&iss, &["ip", "addr", "add", "100.64.4.1/32", "dev", "lo"]);
    wl.lab.exec_ok(
        &iss,
        &["ip", "route", "add", "100.64.4.0/24", "via", "198.18.3.1"],
    );
    wl.lab.exec_ok(
        &wl.nodes[0].0,
        &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"],
    );
    let forged = wl.lab.exec(
        &iss,
        &[
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "100.64.4.1",
            "100.64.4.2",
        ],
    );
    assert!(!forged.status.success(), "a forged pod source was carried");
    let table = wl.lab.exec_ok(
        &wl.nodes[0].0,
        &["nft", "list", "chain", "inet", "meshd-cni", "prerouting"],
    );
    let line = table
        .lines()
        .find(|l| l.contains("ip saddr @pod4"))
        .expect("the rule");
    let n: u64 = line
        .split("packets ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(n >= 2, "{table}");
    // CHECK notices what is missing.
    wl.lab.exec_ok(
        &wl.nodes[0].0,
        &[
            "nft",
            "flush",
            "chain",
            "inet",
            "meshd-cni",
            &format!("pod-{veth}"),
        ],
    );
    wl.lab.exec_ok(
        &wl.nodes[0].0,
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "meshd-cni",
            "pods",
            &format!("{{ \"{veth}\" }}"),
        ],
    );
    wl.lab.exec_ok(
        &wl.nodes[0].0,
        &[
            "nft",
            "delete",
            "chain",
            "inet",
            "meshd-cni",
            &format!("pod-{veth}"),
        ],
    );
    let (ok, result) = cni(&wl, 1, "CHECK", "ctr-post-1", &pa, "post-1", "u1", &ifa);
    assert!(
        !ok && result["msg"]
            .as_str()
            .unwrap()
            .contains("not as ADD made it"),
        "{result}"
    );
    // DEL withdraws the identity from node B within 5 s and removes the veth; again, it
    // succeeds.
    let (ok, _) = cni(&wl, 1, "DEL", "ctr-post-1", &pa, "post-1", "u1", &ifa);
    assert!(ok);
    assert!(pod_veths(&wl, 1).is_empty());
    wait_for("node B to drop post-1", Duration::from_secs(5), || {
        !wl.allowed(2).contains(&"100.64.4.1/32".to_string())
    });
    // CHECK of a deleted pod fails and changes nothing: it never attaches the pod again.
    let (ok, result) = cni(&wl, 1, "CHECK", "ctr-post-1", &pa, "post-1", "u1", &ifa);
    assert!(
        !ok && result["msg"]
            .as_str()
            .unwrap()
            .contains("identity is not in force"),
        "{result}"
    );
    let attached = wl.lab.status(&wl.nodes[0].1)["workloads"].clone();
    assert!(
        attached
            .as_array()
            .is_none_or(|a| a.iter().all(|w| w["name"] != "post-1")),
        "{attached}"
    );
    assert!(cni(&wl, 1, "DEL", "ctr-post-1", &pa, "post-1", "u1", &ifa).0);
    let (ok, v) = cni(&wl, 1, "VERSION", "x", &pa, "x", "x", &ifa);
    assert!(
        ok && v["supportedVersions"].as_array().unwrap().len() == 4,
        "{v}"
    );
}

#[test]
fn cni_add_fails_closed_and_leaves_nothing_when_meshd_is_down_or_refuses() {
    if !can_run() {
        return;
    }
    let mut wl = WorkloadLab::new();
    wl.register("api-1", "u2", "api", "nodes/node-b", "100.64.4.2/32");
    let pa = wl.lab.host("pa");
    let ifa = wl.nodes[0].1.clone();
    // No meshd on that interface: try again later.
    let (ok, result) = cni(&wl, 1, "ADD", "ctr-1", &pa, "api-1", "u2", "nosuch0");
    assert!(!ok);
    assert_eq!(result["code"], 11, "{result}");
    // meshd runs, but the pod is scheduled on the other node: refused, with the reason.
    let (ok, result) = cni(&wl, 1, "ADD", "ctr-2", &pa, "api-1", "u2", &ifa);
    assert!(!ok);
    assert_eq!(result["code"], 100, "{result}");
    assert!(
        result["details"]
            .as_str()
            .unwrap()
            .contains("does not run on node nodes/node-a"),
        "{result}"
    );
    assert!(pod_veths(&wl, 1).is_empty());
    let links = wl.lab.exec_ok(&pa, &["ip", "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "only lo in the pod: {links}");
    let rules = wl.lab.exec(
        &wl.nodes[0].0,
        &["nft", "list", "table", "inet", "meshd-cni"],
    );
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("pod-msh"),
        "no rules left"
    );
}

#[test]
fn traffic_between_pods_of_one_node_is_decided_by_both_pods_policies() {
    if !can_run() {
        return;
    }
    let mut wl = WorkloadLab::new();
    wl.register("post-1", "u1", "post", "nodes/node-a", "100.64.4.1/32");
    wl.register("web-1", "u3", "web", "nodes/node-a", "100.64.4.3/32");
    wl.register("api-1", "u2", "api", "nodes/node-b", "100.64.4.2/32");
    let (post, web, api) = (wl.lab.host("po"), wl.lab.host("we"), wl.lab.host("ap"));
    let (ifa, ifb) = (wl.nodes[0].1.clone(), wl.nodes[1].1.clone());
    assert!(cni(&wl, 1, "ADD", "c-post", &post, "post-1", "u1", &ifa).0);
    assert!(cni(&wl, 1, "ADD", "c-web", &web, "web-1", "u3", &ifa).0);
    assert!(cni(&wl, 2, "ADD", "c-api", &api, "api-1", "u2", &ifb).0);
    // Before any policy (Calico's posture: unselected endpoints pass), web reaches post through
    // meshd on its own node.
    let to_post: std::net::SocketAddr = "100.64.4.1:8080".parse().unwrap();
    tcp_accept_all(&post, to_post);
    assert!(
        tcp_connects(&web, to_post, Duration::from_secs(5)),
        "same node, no policy"
    );
    let st = wl.lab.status(&ifa);
    assert!(
        st["policy"]["allowed_flows"].as_u64() >= Some(1),
        "decided by meshd: {st}"
    );
    // The guide's namespace and post allow-list, unchanged: only api and search may reach post.
    let ex = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/microblog");
    wl.apply(&[ex.join("namespace.yaml"), ex.join("post-allow-list.yaml")]);
    assert!(
        tcp_connects(&api, to_post, Duration::from_secs(5)),
        "api from the other node"
    );
    assert!(
        !tcp_connects(&web, to_post, Duration::from_secs(2)),
        "web on post's own node"
    );
    let denied = flow_records(&ifa, true);
    assert!(
        denied
            .iter()
            .any(|r| r["src"]["name"] == "web" && r["dst"]["name"] == "post"),
        "the denial names both pods: {denied:?}"
    );
    // What-if against the live mesh knows the pods as identities: this node's own (web, post)
    // and the one behind node B (api), with their certificates' labels.
    let check = |from: &str| {
        meshctl(&[
            "policy",
            "check",
            "-i",
            &ifa,
            "--from",
            from,
            "--to",
            "microblog/post",
            "--port",
            "8080",
        ])
    };
    let out = check("microblog/web");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("DENY"), "{}", text(&out));
    let out = check("microblog/api");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("ALLOW"), "{}", text(&out));
    assert!(text(&out).contains("post-allow-list"), "{}", text(&out));
    // post's egress is not restricted (the allow-list is for ingress): post reaches web, on the
    // same node, through meshd.
    let to_web: std::net::SocketAddr = "100.64.4.3:9000".parse().unwrap();
    tcp_accept_all(&web, to_web);
    assert!(tcp_connects(&post, to_web, Duration::from_secs(5)));
}
