//! `meshctl lab up --example microblog --nodes N`: the microblog example as Kubernetes would run
//! it. N node namespaces each run one meshd; the microblog services run as pods (their own
//! network namespaces), replicas of one service on different nodes sharing its service account.
//! Every pod is created through the CNI plugin exactly as a kubelet calls it, and gets its
//! identity from the workload issuer (`meshctl ca serve`, in a namespace of its own on the
//! underlay). The guide's policies, unchanged, then decide every flow, across nodes and within
//! one, and the report shows both.
//!
//! Underlay 198.18.3.0/24 (nodes .11 up, the issuer .100), nodes' overlay addresses
//! 100.64.3.201 up, pods 100.64.4.0/24.

use super::{add_namespace, attach, meshctl, sh, Manifest};
use anyhow::{bail, Context};
use proto::admin::{FlowRecord, Request, Response};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The pods: name, service (its service account and `app` label), the node it runs on (from 1;
/// taken modulo the node count), and the port it serves (0: none).
const PODS: [(&str, &str, usize, u16); 8] = [
    ("api-1", "api", 1, 0),
    ("post-1", "post", 1, 8080),
    ("post-2", "post", 2, 8080),
    ("search-1", "search", 2, 8080),
    ("search-2", "search", 1, 8080),
    ("user-1", "user", 2, 8080),
    ("storage-1", "storage", 1, 5432),
    ("storage-2", "storage", 2, 5432),
];

const ISSUER: &str = "198.18.3.100:7100";

fn node_name(i: usize) -> String {
    format!("node{i}")
}
fn node_ns(i: usize) -> String {
    format!("{}-{}", super::prefix(), node_name(i))
}
fn node_if(i: usize) -> String {
    format!("{}-n{i}", super::prefix())
}
fn node_socket(i: usize) -> PathBuf {
    PathBuf::from(proto::admin::socket_path(&node_if(i)))
}
fn pod_ns(pod: &str) -> String {
    format!("{}-{pod}", super::prefix())
}
fn pod_ip(index: usize) -> String {
    format!("100.64.4.{}", index + 1)
}
/// The node pod `p` runs on, for `nodes` nodes.
fn pod_node(p: usize, nodes: usize) -> usize {
    (PODS[p].2 - 1) % nodes + 1
}

/// The namespaces this lab would add.
pub fn namespaces(nodes: usize) -> Vec<String> {
    let mut v = vec![
        format!("{}-sw", super::prefix()),
        format!("{}-iss", super::prefix()),
    ];
    v.extend((1..=nodes).map(node_ns));
    v.extend(PODS.iter().map(|p| pod_ns(p.0)));
    v
}

/// The admin sockets of the lab's nodes.
pub fn sockets(nodes: usize) -> Vec<PathBuf> {
    (1..=nodes).map(node_socket).collect()
}

/// A binary beside this meshctl (a cargo build), else on PATH.
fn beside(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts `program ARGS` in `ns`, logging to `log`, recorded so that `lab down` stops it
/// (`marker` is an argument its command line holds).
fn spawn(
    dir: &Path,
    made: &mut Manifest,
    ns: &str,
    log: &str,
    program: &Path,
    args: &[&str],
    marker: PathBuf,
) -> anyhow::Result<()> {
    let log = std::fs::File::create(dir.join(log))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    made.daemons.push((child.id(), marker));
    made.save(dir)
}

pub fn build(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut made = Manifest {
        nodes,
        ..Manifest::default()
    };
    made.save(dir)?;
    let d = |p: &str| dir.join(p).display().to_string();
    let p = super::prefix();
    let sw = super::switch_and_trust(dir, &mut made)?;
    println!(
        "microblog lab in {}: CA lab.example, {nodes} nodes, {} pods",
        dir.display(),
        PODS.len()
    );
    // The issuer, on the underlay.
    let iss = format!("{p}-iss");
    add_namespace(dir, &mut made, &iss)?;
    sh(&["ip", "-n", &iss, "link", "set", "lo", "up"])?;
    attach(&sw, &iss, &format!("{p}pi"), "198.18.3.100/24")?;
    let ca = dir.join("ca");
    let exe = std::env::current_exe().context("finding meshctl")?;
    spawn(
        dir,
        &mut made,
        &iss,
        "issuer.log",
        &exe,
        &["ca", "serve", "--ca", &d("ca"), "--listen", ISSUER],
        ca.clone(),
    )?;
    let key = issuer_key(&dir.join("issuer.log"))?;
    println!("  issuer   namespace {iss:<13} underlay 198.18.3.100  key {key}");
    // The nodes.
    for i in 1..=nodes {
        let (ns, ifc) = (node_ns(i), node_if(i));
        add_namespace(dir, &mut made, &ns)?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        attach(
            &sw,
            &ns,
            &format!("{p}pn{i}"),
            &format!("198.18.3.{}/24", 10 + i),
        )?;
        let overlay = format!("100.64.3.{}/32", 200 + i);
        // The node joins as a VM does: it makes its own key and trades a single-use token for
        // its certificate, so no private key is copied.
        let token = meshctl(&[
            "ca",
            "token",
            "create",
            "--ca",
            &d("ca"),
            "--namespace",
            "nodes",
            "--name",
            &node_name(i),
            "--ip",
            &overlay,
            "--issuer",
            ISSUER,
            "--ttl",
            "5m",
        ])?;
        let ids = d(&format!("ids/{}", node_name(i)));
        let exe_arg = exe.display().to_string();
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            &exe_arg,
            "join",
            "--token",
            token.trim(),
            "--out",
            &ids,
        ])?;
        let seeds = if i == 1 {
            String::new()
        } else {
            "\"198.18.3.11:51820\"".into()
        };
        let config = format!(
            "[interface]\nname = \"{ifc}\"\n\n[identity]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\n\
             [trust]\nbundle = [\"{}\"]\nworkload_cas = [\"{}\"]\npolicy_admins = [\"{}\"]\n\n\
             [peering]\nseeds = [{seeds}]\nstate_dir = \"{}\"\n\n[issuer]\nendpoint = \"{ISSUER}\"\nkey = \"{key}\"\n",
            d(&format!("ids/{}/node.crt", node_name(i))),
            d(&format!("ids/{}/node.key", node_name(i))),
            d(&format!("ids/{}/ca.crt", node_name(i))),
            d(&format!("ids/{}/workload-ca.crt", node_name(i))),
            d("policy-admin.key.pub"),
            d(&format!("state-{}", node_name(i))),
        );
        let cfg = dir.join(format!("{}.toml", node_name(i)));
        std::fs::write(&cfg, config)?;
        let cfg_arg = cfg.display().to_string();
        spawn(
            dir,
            &mut made,
            &ns,
            &format!("{}.log", node_name(i)),
            &super::meshd(),
            &["--foreground", "--config", &cfg_arg],
            cfg.clone(),
        )?;
        println!(
            "  {:<8} namespace {ns:<13} underlay 198.18.3.{}   overlay {overlay}",
            node_name(i),
            10 + i
        );
    }
    wait_for_nodes(nodes, dir)?;
    // The pods: registered (what the issuer will certify), then added as a kubelet would.
    for (k, (pod, service, _, _)) in PODS.iter().enumerate() {
        let on = pod_node(k, nodes);
        meshctl(&[
            "workload",
            "register",
            "--ca",
            &d("ca"),
            "--namespace",
            "microblog",
            "--name",
            pod,
            "--uid",
            &format!("uid-{pod}"),
            "--service-account",
            service,
            "--node",
            &format!("nodes/{}", node_name(on)),
            "--ip",
            &format!("{}/32", pod_ip(k)),
            "--label",
            &format!("app={service}"),
        ])?;
        let ns = pod_ns(pod);
        add_namespace(dir, &mut made, &ns)?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        let started = Instant::now();
        let result = cni_add(&node_ns(on), &node_if(on), pod, &ns)?;
        println!(
            "  {pod:<9} on {:<6} namespace {ns:<16} {} ({} ms from CNI ADD)",
            node_name(on),
            result,
            started.elapsed().as_millis()
        );
    }
    // The guide's policies, unchanged, applied on one node; the mesh carries them.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    for (f, text) in [
        ("namespace.yaml", super::NAMESPACE_YAML),
        ("post-allow-list.yaml", super::POST_YAML),
        ("allow-lists.yaml", super::OTHERS_YAML),
    ] {
        std::fs::write(policies.join(f), text)?;
    }
    meshctl(&[
        "policy",
        "apply",
        "-f",
        &d("policies"),
        "--key",
        &d("policy-admin.key"),
        "-i",
        &node_if(1),
    ])?;
    for i in 1..=nodes {
        wait_serial(i, 1)?;
    }
    println!("policy set 1 (examples/microblog) applied on node1 and in force on every node");
    Ok(())
}

/// The issuer's public key, from the line it prints once it listens.
fn issuer_key(log: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.trim_start().starts_with("key ")) {
            return Ok(line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string());
        }
        if Instant::now() > deadline {
            bail!("the issuer did not start: {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_nodes(nodes: usize, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 1..=nodes {
        loop {
            let peers = match crate::status::request(&node_socket(i), &Request::PeerList) {
                Ok(Response::Peers(p)) => p.len(),
                _ => 0,
            };
            if peers == nodes - 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not meet every node within 30 s (log: {})",
                    node_name(i),
                    dir.join(format!("{}.log", node_name(i))).display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("full mesh of {nodes} nodes formed");
    Ok(())
}

fn wait_serial(i: usize, serial: u64) -> anyhow::Result<()> {
    super::wait_serial_at(&node_socket(i), &node_name(i), serial)
}

/// Runs the CNI plugin's ADD in node namespace `node_ns` for `pod` in namespace `ns`, as a
/// kubelet does; the addresses it gave the pod.
fn cni_add(node_ns: &str, mesh_if: &str, pod: &str, ns: &str) -> anyhow::Result<String> {
    let conf = format!(
        r#"{{"cniVersion": "1.0.0", "name": "mesh", "type": "meshd-cni", "meshInterface": "{mesh_if}"}}"#
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(beside("meshd-cni"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("lab-{pod}"))
        .env("CNI_NETNS", format!("/var/run/netns/{ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=microblog;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running meshd-cni")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if !out.status.success() {
        bail!("CNI ADD of {pod} failed: {result}");
    }
    let ips: Vec<String> = result["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(ips.join(", "))
}

/// The pods of `service`.
fn pods_of(service: &str) -> impl Iterator<Item = usize> + '_ {
    PODS.iter()
        .enumerate()
        .filter(move |(_, p)| p.1 == service)
        .map(|(k, _)| k)
}

/// Runs traffic from every pod of a service to every pod of each service it calls (the flow
/// graph's edges) and of two it must not, and prints what happened, where, and who decided.
pub fn report(nodes: usize) -> anyhow::Result<()> {
    let servers: Vec<(String, SocketAddr)> = PODS
        .iter()
        .enumerate()
        .filter(|(_, p)| p.3 != 0)
        .map(|(k, p)| {
            (
                pod_ns(p.0),
                SocketAddr::new(pod_ip(k).parse().expect("an address"), p.3),
            )
        })
        .collect();
    let mut flows: Vec<(usize, usize, bool)> = Vec::new();
    for (edges, edge) in [(&super::EDGES[..], true), (&super::NOT_EDGES[..], false)] {
        for (a, b) in edges {
            for x in pods_of(a) {
                for y in pods_of(b) {
                    flows.push((x, y, edge));
                }
            }
        }
    }
    let attempts: Vec<(String, SocketAddr)> = flows
        .iter()
        .map(|(x, y, _)| {
            let addr = SocketAddr::new(pod_ip(*y).parse().expect("an address"), PODS[*y].3);
            (pod_ns(PODS[*x].0), addr)
        })
        .collect();
    let results = super::run_flows(&servers, &attempts)?;
    let logs: Vec<Vec<FlowRecord>> = (1..=nodes).map(flow_log).collect();
    println!(
        "\n{:<28} {:<7} {:<5} {:<8} DECIDED BY",
        "FLOW", "WHERE", "EDGE", "RESULT"
    );
    let mut wrong = 0;
    for ((x, y, edge), ok) in flows.iter().zip(&results) {
        let (nx, ny) = (pod_node(*x, nodes), pod_node(*y, nodes));
        let why = decided_by(&logs, *x, *y, nx, ny);
        println!(
            "{:<28} {:<7} {:<5} {:<8} {why}",
            format!("{} -> {}:{}", PODS[*x].0, PODS[*y].0, PODS[*y].3),
            if nx == ny { "within" } else { "across" },
            if *edge { "yes" } else { "no" },
            if *ok { "ALLOWED" } else { "DENIED" },
        );
        if ok != edge {
            wrong += 1;
        }
    }
    if wrong > 0 {
        bail!("{wrong} flow(s) did not behave as the flow graph says");
    }
    println!(
        "\nevery edge of the flow graph is allowed, across nodes and within one; every other flow is denied"
    );
    Ok(())
}

fn flow_log(i: usize) -> Vec<FlowRecord> {
    match crate::status::request(
        &node_socket(i),
        &Request::Flows {
            since: 0,
            denied_only: false,
            staged_denied: false,
            limit: 10_000,
        },
    ) {
        Ok(Response::Flows { records, .. }) => records,
        _ => Vec::new(),
    }
}

/// The deciding policies of the latest flow from pod `x` to pod `y`, from the flow logs of their
/// nodes: the sender's egress and the receiver's ingress (within one node, one record holds the
/// decision that counted).
fn decided_by(logs: &[Vec<FlowRecord>], x: usize, y: usize, nx: usize, ny: usize) -> String {
    let (from, to) = (pod_ip(x), pod_ip(y));
    let find = |node: usize, direction: Option<&str>| {
        logs[node - 1].iter().rev().find(|r| {
            r.event == "new"
                && direction.is_none_or(|d| r.direction == d)
                && r.src.ip == from
                && r.dst.ip == to
        })
    };
    let show = |r: &FlowRecord| {
        let rule = r
            .rule
            .as_deref()
            .map(|x| format!(" {x}"))
            .unwrap_or_default();
        format!("{} {}{rule}", r.verdict, r.policy)
    };
    let (a, b) = (PODS[x].0, PODS[y].0);
    if nx == ny {
        return match find(nx, None) {
            Some(r) => format!(
                "on {}: {} of {}: {}",
                node_name(nx),
                r.direction,
                if r.direction == "egress" { a } else { b },
                show(r)
            ),
            None => "no flow-log record".into(),
        };
    }
    match (find(nx, Some("egress")), find(ny, Some("ingress"))) {
        (Some(e), _) if e.verdict == "deny" => format!("egress of {a}: {}", show(e)),
        (Some(e), Some(i)) => format!("egress of {a}: {}; ingress of {b}: {}", show(e), show(i)),
        (Some(e), None) => format!("egress of {a}: {}; ingress of {b}: not logged", show(e)),
        (None, _) => "no flow-log record".into(),
    }
}

/// `lab status` for a lab of nodes.
pub fn status(nodes: usize) {
    println!(
        "{:<8} {:<16} {:>5} {:>9} {:>7} {:>8} {:>8}",
        "NODE", "NAMESPACE", "PEERS", "WORKLOADS", "POLICY", "ALLOWED", "DENIED"
    );
    for i in 1..=nodes {
        match crate::status::request(&node_socket(i), &Request::Status) {
            Ok(Response::Status(s)) => {
                let p = s.policy.unwrap_or_default();
                let pods = PODS
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| pod_node(*k, nodes) == i)
                    .count();
                println!(
                    "{:<8} {:<16} {:>5} {:>9} {:>7} {:>8} {:>8}",
                    node_name(i),
                    node_ns(i),
                    s.peers.len(),
                    pods,
                    p.serial,
                    p.allowed_flows,
                    p.denied_packets
                );
            }
            _ => println!(
                "{:<8} {:<16} meshd is not answering",
                node_name(i),
                node_ns(i)
            ),
        }
    }
}
