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

/// One mesh node: host `n{i}` on the switch at 198.18.1.{i}, overlay 100.64.1.{i}.
struct Node {
    ns: String,
    ifname: String,
    ip: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    config: std::path::PathBuf,
}

fn node(
    lab: &mut Lab,
    sw: &Switch,
    pki: &Pki,
    bundle: &[std::path::PathBuf],
    i: u32,
    seeds: &[&str],
    issue: &[&str],
) -> Node {
    let ns = lab.host(&format!("n{i}"));
    lab.attach(sw, &ns, &format!("198.18.1.{i}/24"));
    let (cert, key) = pki.issue(
        "prod",
        &format!("node{i}"),
        &format!("100.64.1.{i}/32"),
        issue,
    );
    let ifname = lab.name(&format!("m{i}"));
    let config = mesh_config(lab, &ifname, &cert, &key, bundle, seeds);
    lab.meshd_config(&ns, &ifname, &config);
    Node {
        ns,
        ifname,
        ip: format!("100.64.1.{i}"),
        cert,
        key,
        config,
    }
}

fn peer_identities(lab: &Lab, n: &Node) -> Vec<String> {
    let st = lab.status(&n.ifname);
    let mut v: Vec<String> = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["identity"].as_str().unwrap_or("?").to_string())
        .collect();
    v.sort();
    v
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

const SEED: &str = "198.18.1.1:51820";

#[test]
fn a_node_from_another_ca_is_refused() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let rogue = Pki::new(&lab, "example.org", "rogue");
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);
    let n2 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 2, &[SEED], &[]);
    // The intruder trusts both CAs, so it tries hard; the mesh trusts only its own.
    let n3 = node(
        &mut lab,
        &sw,
        &rogue,
        &[pki.ca_cert(), rogue.ca_cert()],
        3,
        &[SEED],
        &[],
    );
    assert!(lab.ping_until(&n2.ns, &n1.ip, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(peer_identities(&lab, &n1), vec!["example.org/prod/node2"]);
    assert_eq!(peer_identities(&lab, &n2), vec!["example.org/prod/node1"]);
    assert!(!lab.ping(&n3.ns, &n1.ip, 2), "the intruder reaches no one");
    let st = lab.status(&n1.ifname);
    assert!(
        st["drops"]["control_refused"].as_u64().unwrap_or(0) > 0,
        "the refusal is counted: {st}"
    );
    assert!(
        lab.log(&n1.ifname).contains("not in the trust bundle"),
        "and logged"
    );
}

#[test]
fn a_certificate_for_another_key_or_a_tampered_one_is_refused() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);

    // A node whose certificate names another key than the one it holds never starts.
    let ns = lab.host("n2");
    lab.attach(&sw, &ns, "198.18.1.2/24");
    let (_, other_key) = pki.issue("prod", "other", "100.64.1.9/32", &[]);
    let swapped = mesh_config(
        &lab,
        &lab.name("m2"),
        &n1.cert,
        &other_key,
        &[pki.ca_cert()],
        &[SEED],
    );
    let out = lab.exec(
        &ns,
        &[
            bin("meshd").to_str().unwrap(),
            "--foreground",
            "--config",
            swapped.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds the private key of"),
        "{out:?}"
    );

    // A tampered certificate (its address changed) does not verify and is refused at start.
    let text = std::fs::read_to_string(&n1.cert).unwrap();
    let mut bytes = proto::armor::decode(proto::armor::CERTIFICATE, &text).unwrap();
    let pos = bytes.windows(4).position(|w| w == [100, 64, 1, 1]).unwrap();
    bytes[pos + 3] = 2;
    let forged = lab.dir.join("forged.crt");
    std::fs::write(
        &forged,
        proto::armor::encode(proto::armor::CERTIFICATE, &bytes),
    )
    .unwrap();
    let cfg = mesh_config(
        &lab,
        &lab.name("m3"),
        &forged,
        &n1.key,
        &[pki.ca_cert()],
        &[SEED],
    );
    let out = lab.exec(
        &ns,
        &[
            bin("meshd").to_str().unwrap(),
            "--foreground",
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature does not verify"),
        "{out:?}"
    );

    // A stock WireGuard peer with a key no certificate vouches for gets no handshake.
    let ifname = lab.name("wg");
    lab.wireguard_go(&ns, &ifname);
    let (key, _) = keypair(&lab, "stranger");
    let n1_pub = std::fs::read_to_string(&n1.key).unwrap();
    let n1_pub = proto::Key::from_base64(&n1_pub)
        .unwrap()
        .public()
        .to_base64();
    wg(&[
        "set",
        &ifname,
        "private-key",
        key.to_str().unwrap(),
        "peer",
        &n1_pub,
        "endpoint",
        SEED,
        "allowed-ips",
        "100.64.1.1/32",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "100.64.1.9/32",
        "dev",
        &ifname,
    ]);
    sh(&["ip", "-n", &ns, "link", "set", &ifname, "up"]);
    sh(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "100.64.1.1/32",
        "dev",
        &ifname,
    ]);
    assert!(!lab.ping(&ns, &n1.ip, 2));
    let st = lab.status(&n1.ifname);
    assert!(
        st["drops"]["unknown_peer"].as_u64().unwrap_or(0) > 0,
        "{st}"
    );
    assert!(st["peers"].as_array().unwrap().is_empty());
}

#[test]
fn packets_from_an_address_outside_the_certificate_are_dropped() {
    if !can_run() {
        return;
    }
    let (lab, _pki, n1, n2) = seeded_pair();
    sh(&[
        "ip",
        "-n",
        &n2.ns,
        "addr",
        "add",
        "100.64.1.99/32",
        "dev",
        &n2.ifname,
    ]);
    assert!(!lab
        .exec(
            &n2.ns,
            &[
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "100.64.1.99",
                &n1.ip
            ]
        )
        .status
        .success());
    // The sending node's own check stops them first: the address is not its certificate's
    // (nor a route it serves). The receiver's allowed-IPs check, for a sender that does not
    // check, is `dataplane.rs`'s inner_source_outside_allowed_ips_is_dropped_and_counted.
    let st = lab.status(&n2.ifname);
    assert!(
        st["peers"][0]["drops"]["policy_not_this_node"]
            .as_u64()
            .unwrap_or(0)
            >= 3,
        "{st}"
    );
}

#[test]
fn a_short_lived_certificate_is_cut_at_expiry() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);
    let n2 = node(
        &mut lab,
        &sw,
        &pki,
        &[pki.ca_cert()],
        2,
        &[SEED],
        &["--ttl", "6s"],
    );
    assert!(
        lab.ping_until(&n1.ns, &n2.ip, Duration::from_secs(5)),
        "works while valid"
    );
    let (code, body) = http_get(&n2.ns, "/readyz");
    assert_eq!(code, 200, "ready while valid: {body}");
    let text = std::fs::read_to_string(&n2.cert).unwrap();
    let cert = proto::cert::Certificate::decode(
        &proto::armor::decode(proto::armor::CERTIFICATE, &text).unwrap(),
    )
    .unwrap();
    let expiry = std::time::UNIX_EPOCH + Duration::from_secs(cert.body.not_after + 1);
    let cut = wait_until(Duration::from_secs(20), || {
        peer_identities(&lab, &n1).is_empty()
    })
    .expect("node2 is cut");
    let late = std::time::SystemTime::now()
        .duration_since(expiry)
        .unwrap_or_default();
    assert!(
        late < Duration::from_secs(5),
        "cut {late:?} after expiry (waited {cut:?})"
    );
    assert!(!lab.ping(&n1.ns, &n2.ip, 2));
    assert!(!lab.ping(&n2.ns, &n1.ip, 2));
    // The expired node says so to its orchestrator, and is still alive.
    let (code, body) = http_get(&n2.ns, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("FAIL identity") && body.contains("expired"),
        "{body}"
    );
    assert_eq!(http_get(&n2.ns, "/healthz").0, 200);
    let (_, metrics) = http_get(&n2.ns, "/metrics");
    assert_eq!(sample(&metrics, "meshd_ready"), Some(0.0), "{metrics}");
}

#[test]
fn revocation_reaching_one_node_cuts_the_identity_everywhere_within_5s_and_lasts_across_a_restart()
{
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let mut nodes = Vec::new();
    for i in 1..=4 {
        let seeds: &[&str] = if i == 1 { &[] } else { &[SEED] };
        nodes.push(node(&mut lab, &sw, &pki, &[pki.ca_cert()], i, seeds, &[]));
    }
    for a in &nodes {
        for b in &nodes {
            assert!(
                lab.ping_until(&a.ns, &b.ip, Duration::from_secs(15)),
                "{} -> {}",
                a.ns,
                b.ip
            );
        }
    }
    let text = std::fs::read_to_string(&nodes[3].cert).unwrap();
    let serial = proto::cert::Certificate::decode(
        &proto::armor::decode(proto::armor::CERTIFICATE, &text).unwrap(),
    )
    .unwrap()
    .body
    .serial;
    run(std::process::Command::new(bin("meshctl"))
        .args(["ca", "revoke", "--serial", &serial.to_string(), "--ca"])
        .arg(&pki.dir));
    // The list reaches node 1 only: its config now names it, and meshctl reload reads it.
    let crl = pki.dir.join("revoked.crl");
    let cfg = std::fs::read_to_string(&nodes[0].config).unwrap();
    std::fs::write(
        &nodes[0].config,
        cfg.replace(
            "[peering]",
            &format!("revocation_lists = [\"{}\"]\n\n[peering]", crl.display()),
        ),
    )
    .unwrap();
    let start = Instant::now();
    run(std::process::Command::new(bin("meshctl")).args(["reload", &nodes[0].ifname]));
    for n in &nodes[..3] {
        let took = wait_until(Duration::from_secs(10), || {
            !peer_identities(&lab, n).contains(&"example.org/prod/node4".to_string())
        });
        assert!(took.is_some(), "{} still has node4", n.ifname);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "cut everywhere in {took:?}");
    for n in &nodes[..3] {
        assert_eq!(peer_identities(&lab, n).len(), 2, "the others stay");
        assert!(!lab.ping(&nodes[3].ns, &n.ip, 1));
    }
    // The list lasts: node 2, which learned it over the control protocol only, restarts while
    // node 4 keeps greeting it, and never takes node 4 back.
    let n2 = &nodes[1];
    lab.stop(&n2.ifname, libc::SIGTERM);
    lab.meshd_config(&n2.ns, &n2.ifname, &n2.config);
    let restarted = Instant::now();
    while restarted.elapsed() < Duration::from_secs(8) {
        let ids = peer_identities(&lab, n2);
        assert!(
            !ids.contains(&"example.org/prod/node4".to_string()),
            "node 2 took the revoked node back {:?} after its restart",
            restarted.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(peer_identities(&lab, n2).len(), 2, "the others are back");
    assert!(!lab.ping(&nodes[3].ns, &n2.ip, 1));
}

/// Three nodes of one CA, nodes 2 and 3 seeded with node 1.
fn three_nodes() -> (Lab, Pki, Node, Node, Node) {
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);
    let n2 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 2, &[SEED], &[]);
    let n3 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 3, &[SEED], &[]);
    (lab, pki, n1, n2, n3)
}

/// Two nodes of one CA, node 2 seeded with node 1, once node 2 has pinged node 1.
fn seeded_pair() -> (Lab, Pki, Node, Node) {
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);
    let n2 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 2, &[SEED], &[]);
    assert!(lab.ping_until(&n2.ns, &n1.ip, Duration::from_secs(10)));
    (lab, pki, n1, n2)
}

/// Renews node `n` (named `node1`): a new key made on the node, a new certificate for `ip`, then
/// a reload. Returns the directory of the new key and certificate.
fn renew(lab: &mut Lab, pki: &Pki, n: &Node, ip: &str) -> std::path::PathBuf {
    let renewed = lab.dir.join("renewed");
    std::fs::create_dir_all(&renewed).unwrap();
    run(std::process::Command::new(bin("meshctl"))
        .args([
            "identity",
            "issue",
            "--namespace",
            "prod",
            "--name",
            "node1",
        ])
        .args(["--ip", ip, "--ca"])
        .arg(&pki.dir)
        .arg("--out")
        .arg(&renewed));
    let cfg = std::fs::read_to_string(&n.config).unwrap();
    let cfg = cfg
        .replace(
            n.cert.to_str().unwrap(),
            renewed.join("node1.crt").to_str().unwrap(),
        )
        .replace(
            n.key.to_str().unwrap(),
            renewed.join("node1.key").to_str().unwrap(),
        );
    std::fs::write(&n.config, cfg).unwrap();
    lab.signal(&n.ifname, libc::SIGHUP);
    renewed
}

#[test]
fn a_renewed_certificate_with_another_address_moves_the_node_to_it() {
    if !can_run() {
        return;
    }
    let (mut lab, pki, n1, n2) = seeded_pair();
    renew(&mut lab, &pki, &n1, "100.64.1.11/32");
    let reached = lab.ping_until(&n2.ns, "100.64.1.11", Duration::from_secs(10));
    assert!(
        reached,
        "the new address is reached: node 1 {} {} node 2 {}",
        lab.exec_ok(&n1.ns, &["ip", "-o", "addr"]),
        lab.exec_ok(&n1.ns, &["ip", "route"]),
        lab.exec_ok(&n2.ns, &["ip", "route"]),
    );
    let addrs = lab.exec_ok(&n1.ns, &["ip", "-o", "addr", "show", "dev", &n1.ifname]);
    assert!(addrs.contains("100.64.1.11/32"), "{addrs}");
    assert!(
        !addrs.contains("100.64.1.1/"),
        "the old address left the interface: {addrs}"
    );
    assert!(!lab.ping(&n2.ns, "100.64.1.1", 1), "nor is it reached");
}

#[test]
fn a_renewed_certificate_and_key_keep_a_long_tcp_transfer_alive() {
    if !can_run() {
        return;
    }
    let (mut lab, pki, n1, n2) = seeded_pair();
    let target: std::net::SocketAddr = "100.64.1.1:5001".parse().unwrap();
    let total = 16 << 20;
    let sink = tcp_sink(&n1.ns, target, total, None);
    let ns2 = n2.ns.clone();
    let sender =
        std::thread::spawn(move || tcp_send(&ns2, target, total, None, Duration::from_millis(20)));
    std::thread::sleep(Duration::from_millis(1500));
    let renewed = renew(&mut lab, &pki, &n1, "100.64.1.1/32");
    let sent = sender.join().unwrap();
    let received = sink.join().unwrap();
    assert!(sent.is_ok(), "sender: {sent:?}, receiver: {received:?}");
    assert_eq!(
        received,
        Ok(total),
        "the transfer survived the rotation byte for byte"
    );
    let new_pub =
        proto::Key::from_base64(&std::fs::read_to_string(renewed.join("node1.key")).unwrap())
            .unwrap()
            .public()
            .to_base64();
    let st = lab.status(&n2.ifname);
    assert_eq!(st["peers"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(
        st["peers"][0]["public_key"],
        new_pub.as_str(),
        "node 2 now knows node 1 by its new key"
    );
}

#[test]
fn a_restarted_node_rejoins_from_its_state_without_seeds() {
    if !can_run() {
        return;
    }
    let (mut lab, _pki, n1, n2, n3) = three_nodes();
    for n in [&n1, &n2] {
        assert!(lab.ping_until(&n3.ns, &n.ip, Duration::from_secs(10)));
    }
    assert!(lab.stop(&n3.ifname, libc::SIGTERM).success());
    let cfg = std::fs::read_to_string(&n3.config).unwrap();
    std::fs::write(&n3.config, cfg.replace(&format!("\"{SEED}\""), "")).unwrap();
    lab.meshd_config(&n3.ns, &n3.ifname, &n3.config);
    for n in [&n1, &n2] {
        assert!(
            lab.ping_until(&n3.ns, &n.ip, Duration::from_secs(10)),
            "rejoined {}",
            n.ip
        );
    }
    assert_eq!(
        peer_identities(&lab, &n3),
        vec!["example.org/prod/node1", "example.org/prod/node2"]
    );
}

#[test]
fn operator_peering_with_meshctl_peer_add_list_remove() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);
    let n2 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 2, &[], &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(peer_identities(&lab, &n2).is_empty(), "no seeds, no peers");
    let out = meshctl(&["peer", "add", SEED, "-i", &n2.ifname]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        lab.ping_until(&n2.ns, &n1.ip, Duration::from_secs(10)),
        "peered by the operator"
    );

    let out = meshctl(&["peer", "list", "-i", &n1.ifname, "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["identity"], "example.org/prod/node2");
    assert_eq!(
        list[0]["spiffe_id"],
        "spiffe://example.org/ns/prod/sa/node2"
    );
    assert_eq!(list[0]["addrs"], serde_json::json!(["100.64.1.2/32"]));
    assert_eq!(list[0]["endpoint"], "198.18.1.2:51820");
    let table = String::from_utf8(meshctl(&["status", &n1.ifname]).stdout).unwrap();
    assert!(
        table.contains("identity: example.org/prod/node2  spiffe://example.org/ns/prod/sa/node2"),
        "{table}"
    );

    let out = meshctl(&["peer", "remove", "prod/node2", "-i", &n1.ifname]);
    assert!(out.status.success(), "{out:?}");
    assert!(peer_identities(&lab, &n1).is_empty());
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        peer_identities(&lab, &n1).is_empty(),
        "a removed member stays out despite its gossip"
    );
    assert!(!lab.ping(&n1.ns, &n2.ip, 1));

    let bad = meshctl(&["peer", "add", "not-an-endpoint", "-i", &n1.ifname]);
    assert_eq!(bad.status.code(), Some(2));
    let missing = meshctl(&[
        "peer",
        "remove",
        "example.org/prod/nobody",
        "-i",
        &n1.ifname,
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no member"));
}

/// Whether a probe sent from `ns` to `to` is answered within a second.
fn probe_answered(ns: &str, to: &str) -> bool {
    let to: std::net::SocketAddr = to.parse().unwrap();
    in_netns(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.send_to(&proto::control::encode_probe(&[7; 16]), to)
            .unwrap();
        let mut buf = [0u8; 2048];
        s.recv_from(&mut buf).is_ok()
    })
    .join()
    .unwrap()
}

#[test]
fn a_seed_named_by_key_can_answer_no_probe_and_still_be_joined() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    // Node 1 answers no probe: a sender without a certificate learns nothing from it.
    let ns1 = lab.host("n1");
    lab.attach(&sw, &ns1, "198.18.1.1/24");
    let (cert, key) = pki.issue("prod", "node1", "100.64.1.1/32", &[]);
    let if1 = lab.name("m1");
    let config = mesh_config(&lab, &if1, &cert, &key, &[pki.ca_cert()], &[]);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[peering]\n", "[peering]\nanswer_probes = false\n"),
    )
    .unwrap();
    lab.meshd_config(&ns1, &if1, &config);
    // Node 2 names node 1 by key and address.
    let pub1 = proto::Key::from_base64(&std::fs::read_to_string(&key).unwrap())
        .unwrap()
        .public()
        .to_base64();
    let seed = format!("{pub1}@{SEED}");
    let n2 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 2, &[&seed], &[]);
    assert!(lab.ping_until(&n2.ns, "100.64.1.1", Duration::from_secs(10)));
    assert_eq!(
        lab.status(&if1)["peers"][0]["identity"],
        "example.org/prod/node2"
    );
    assert!(!probe_answered(&n2.ns, SEED), "node 1 answers no probe");
    // The operator's `peer add` takes a key too.
    let n3 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 3, &[], &[]);
    let out = meshctl(&["peer", "add", "198.18.1.1:51820", "-i", &n3.ifname]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        peer_identities(&lab, &n3).is_empty(),
        "by address alone, node 1 cannot be reached"
    );
    let out = meshctl(&["peer", "add", &seed, "-i", &n3.ifname]);
    assert!(out.status.success(), "{out:?}");
    assert!(lab.ping_until(&n3.ns, "100.64.1.1", Duration::from_secs(10)));
    let bad = meshctl(&["peer", "add", "AAAA@198.18.1.1:51820", "-i", &n3.ifname]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not IP:port or KEY@IP:port"),
        "{bad:?}"
    );
    assert!(
        probe_answered(&ns1, "198.18.1.2:51820"),
        "node 2, which answers probes, does"
    );
}

/// CAP_NET_ADMIN (bit 12) and CAP_NET_BIND_SERVICE (bit 10): all a meshd thread may hold.
const KEPT_CAPS: u64 = (1 << 12) | (1 << 10);

#[test]
fn every_thread_keeps_only_two_capabilities_and_the_state_is_private() {
    if !can_run() {
        return;
    }
    let (mut lab, _pki, n1, _n2) = seeded_pair();
    let pid = lab.child(&n1.ifname).id();
    let tasks: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        tasks.len() >= 3,
        "meshd runs its packet loops on threads of their own"
    );
    for t in &tasks {
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        for field in ["CapPrm", "CapEff", "CapInh", "CapAmb"] {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{field}:\t")))
                .unwrap_or_else(|| panic!("{field} in {}", t.display()));
            let caps = u64::from_str_radix(hex.trim(), 16).unwrap();
            assert_eq!(
                caps & !KEPT_CAPS,
                0,
                "{field} {caps:#x} of thread {} (the packet loops parse network input)",
                t.display()
            );
        }
    }
    // The state directory and everything in it is root's alone; so are the flow log and sockets.
    use std::os::unix::fs::PermissionsExt;
    let state = lab.dir.join(format!("state-{}", n1.ifname));
    assert!(wait_until(Duration::from_secs(5), || state
        .join("members.json")
        .exists())
    .is_some());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "{}", state.display());
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p) & 0o077, 0, "{} is readable by others", p.display());
    }
    assert_eq!(mode(&state.join("flows.jsonl")), 0o600);
    let admin = format!("/var/run/meshd/{}.sock", n1.ifname);
    assert_eq!(mode(std::path::Path::new(&admin)), 0o600);
}

#[test]
fn meshd_runs_as_a_non_root_user_with_only_its_two_capabilities() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);
    let ns = lab.host("n2");
    lab.attach(&sw, &ns, "198.18.1.2/24");
    let (cert, key) = pki.issue("prod", "node2", "100.64.1.2/32", &[]);
    let ifname = lab.name("m2");
    let config = mesh_config(&lab, &ifname, &cert, &key, &[pki.ca_cert()], &[SEED]);
    // As an operator would for the unit's user: the key is its own, the state directory too.
    const NOBODY: u32 = 65534;
    let state = lab.dir.join(format!("state-{ifname}"));
    std::fs::create_dir_all(&state).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [&state, &key] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    for d in [lab.dir.clone(), pki.dir.clone(), pki.dir.join("ids")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    lab.meshd_unprivileged(&ns, &ifname, &config, NOBODY);
    assert!(
        lab.ping_until(&ns, &n1.ip, Duration::from_secs(15)),
        "the unprivileged node joined and carries traffic: {}",
        lab.log(&ifname)
    );
    let pid = lab.child(&ifname).id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
            .unwrap()
            .to_string()
    };
    assert!(field("Uid").starts_with("65534"), "{status}");
    assert_eq!(
        u64::from_str_radix(field("CapEff").trim(), 16).unwrap(),
        KEPT_CAPS
    );
}

/// A certificate file's certificate.
fn certificate(path: &std::path::Path) -> proto::cert::Certificate {
    let text = std::fs::read_to_string(path).unwrap();
    proto::cert::Certificate::decode(
        &proto::armor::decode(proto::armor::CERTIFICATE, &text).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_member_replaying_an_old_certificate_of_a_renewed_identity_changes_nothing() {
    if !can_run() {
        return;
    }
    let (mut lab, pki, n1, n2, n3) = three_nodes();
    for n in [&n2, &n3] {
        assert!(lab.ping_until(&n.ns, &n1.ip, Duration::from_secs(15)));
    }
    // Node 1 renews onto a new key, same address. Its old certificate is still valid, and its
    // old key is in the wrong hands.
    let old = certificate(&n1.cert);
    let renewed = renew(&mut lab, &pki, &n1, "100.64.1.1/32");
    let new_key = proto::Key(certificate(&renewed.join("node1.crt")).body.public_key).to_base64();
    let holds = |lab: &Lab, key: &str| {
        lab.status(&n2.ifname)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["public_key"] == key)
    };
    assert!(
        wait_until(Duration::from_secs(10), || holds(&lab, &new_key)).is_some(),
        "node 2 took node 1's renewed key"
    );
    // Node 3 turns hostile: its daemon stops, and from its address, sealed with its own key, it
    // tells node 2 of node 1's old certificate at an endpoint of its choosing.
    lab.stop(&n3.ifname, libc::SIGKILL);
    let key3 = proto::Key::from_base64(std::fs::read_to_string(&n3.key).unwrap().trim()).unwrap();
    let pub2 =
        proto::Key::from_base64(lab.status(&n2.ifname)["public_key"].as_str().unwrap()).unwrap();
    let members = proto::control::Message::Members(vec![proto::control::Member {
        certificate: old.clone(),
        endpoint: "198.18.1.3:51820".parse().unwrap(),
    }]);
    // Counters follow the sender's clock in nanoseconds; ahead of anything node 3 sent.
    let counter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        + 1_000_000_000;
    let datagrams = proto::control::seal_message(
        &x25519_dalek::StaticSecret::from(key3.0),
        &pub2.0,
        &x25519_dalek::StaticSecret::from([0x42; 32]),
        counter,
        &members.encode(),
    )
    .unwrap();
    let refused_before = lab.status(&n2.ifname)["control"]["refused"]["listed_superseded"]
        .as_u64()
        .unwrap_or(0);
    in_netns(&n3.ns, move || {
        let s = std::net::UdpSocket::bind("198.18.1.3:51820").unwrap();
        for d in datagrams {
            s.send_to(&d, "198.18.1.2:51820").unwrap();
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // Nothing a user can see changed on node 2: node 1 is its renewed key, the old key is no
    // peer, node 1 is reached, and the refusal is counted.
    let st = lab.status(&n2.ifname);
    let old_key = proto::Key(old.body.public_key).to_base64();
    assert!(
        holds(&lab, &new_key) && !holds(&lab, &old_key),
        "{}",
        st["peers"]
    );
    assert_eq!(
        st["control"]["refused"]["listed_superseded"]
            .as_u64()
            .unwrap_or(0),
        refused_before + 1,
        "the old certificate was refused and counted: {}",
        st["control"]
    );
    assert!(lab.ping(&n2.ns, &n1.ip, 2), "node 1 is still reached");
}

/// `meshctl reload -i IFNAME`: (success, standard output, standard error).
fn reload(ifname: &str) -> (bool, String, String) {
    let o = std::process::Command::new(bin("meshctl"))
        .args(["reload", "-i", ifname])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The operator hears what a reload did, or why it was refused (and the node keeps running as
/// before); a trust bundle and `[policy]` change without a restart; settings that need one are
/// named; SIGHUP logs the same outcome.
#[test]
fn a_reload_says_what_it_changed_or_why_it_was_refused() {
    if !can_run() {
        return;
    }
    let (mut lab, _pki, n1, n2) = seeded_pair();
    let (ok, out, _) = reload(&n1.ifname);
    assert!(ok && out.contains("nothing changed"), "{out}");

    // A certificate file that does not parse: refused with the file named; nothing moved.
    let good = std::fs::read(&n1.cert).unwrap();
    std::fs::write(&n1.cert, b"garbage\n").unwrap();
    let (ok, _, err) = reload(&n1.ifname);
    assert!(!ok, "a refused reload fails");
    assert!(
        err.contains("reload refused") && err.contains(n1.cert.to_str().unwrap()),
        "{err}"
    );
    assert!(lab.ping(&n2.ns, &n1.ip, 1), "the node runs as before");
    std::fs::write(&n1.cert, good).unwrap();

    // A second CA in the bundle, audit mode on, and a new port (which needs a restart).
    let other = Pki::new(&lab, "example.org", "ca2");
    let cfg = std::fs::read_to_string(&n1.config).unwrap();
    let bundle_line = cfg.lines().find(|l| l.starts_with("bundle = ")).unwrap();
    let changed = cfg
        .replace(
            bundle_line,
            &format!(
                "{}, \"{}\"]",
                bundle_line.trim_end_matches(']'),
                other.ca_cert().display()
            ),
        )
        .replace("audit = false", "audit = true")
        .replace("listen_port = 51820", "listen_port = 51821");
    std::fs::write(&n1.config, changed).unwrap();
    let (ok, out, err) = reload(&n1.ifname);
    assert!(ok, "{err}");
    assert!(out.contains("trust bundle: 2 CAs"), "{out}");
    assert!(out.contains("audit on"), "{out}");
    assert!(
        out.contains("needs a restart (running as before): [interface]"),
        "{out}"
    );
    let st = lab.status(&n1.ifname);
    assert_eq!(st["policy"]["audit"], true);
    assert_eq!(st["listen_port"], 51820, "the port stays until a restart");
    assert!(lab.ping(&n2.ns, &n1.ip, 1));

    // SIGHUP logs the same outcome.
    let outcomes = |lab: &Lab| {
        lab.log(&n1.ifname)
            .lines()
            .filter(|l| l.contains("reloaded") && l.contains("needs a restart"))
            .count()
    };
    let before = outcomes(&lab);
    lab.signal(&n1.ifname, libc::SIGHUP);
    let logged = wait_until(Duration::from_secs(5), || outcomes(&lab) > before);
    assert!(logged.is_some(), "{}", lab.log(&n1.ifname));
}

/// A log written to a file carries no colour escape codes; with `log_format = "json"` every line
/// is one JSON object with the level and the message.
#[test]
fn logs_in_files_have_no_colour_codes_and_json_lines_parse() {
    if !can_run() {
        return;
    }
    let (mut lab, _pki, n1, n2) = seeded_pair();
    let text = lab.log(&n1.ifname);
    assert!(text.contains("meshd up"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no escape codes in a file: {text:?}"
    );
    lab.stop(&n2.ifname, libc::SIGTERM);
    let cfg = std::fs::read_to_string(&n2.config).unwrap();
    std::fs::write(&n2.config, format!("log_format = \"json\"\n{cfg}")).unwrap();
    lab.meshd_config(&n2.ns, &n2.ifname, &n2.config);
    assert!(lab.ping_until(&n2.ns, &n1.ip, Duration::from_secs(10)));
    let log = lab.log(&n2.ifname);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "meshd up" && l["level"] == "INFO"),
        "{log}"
    );
}

/// `meshctl status` starts with the node itself (addresses, serial, expiry in RFC 3339 and time
/// left) and says so when its own certificate is revoked; peers show online.
#[test]
fn status_starts_with_the_node_and_warns_when_it_is_revoked() {
    if !can_run() {
        return;
    }
    let (lab, pki, n1, n2) = seeded_pair();
    let status = |ifname: &str| {
        let o = std::process::Command::new(bin("meshctl"))
            .args(["status", "-i", ifname])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let text = status(&n1.ifname);
    let mut lines = text.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("identity example.org/prod/node1"),
        "{text}"
    );
    let me = lines.next().unwrap();
    assert!(me.contains("addresses 100.64.1.1/32"), "{me}");
    assert!(
        me.contains("Z (in 29d 23h)") || me.contains("Z (in 30d 0h)"),
        "RFC 3339 and time left: {me}"
    );
    assert!(!me.contains("REVOKED") && !me.contains("EXPIRE"), "{me}");
    assert!(
        text.lines().any(|l| l.contains(" online ")),
        "the peer is online: {text}"
    );
    let json = lab.status(&n1.ifname);
    let seen = json["peers"][0]["last_seen_secs"].as_u64();
    assert!(seen.is_some_and(|s| s < 60), "{seen:?}");
    // Times in JSON are RFC 3339 too, and so is YAML, the same document.
    let rfc3339 = |v: &serde_json::Value| {
        v.as_str()
            .is_some_and(|t| proto::time::parse_rfc3339(t).is_some())
    };
    assert!(rfc3339(&json["certificate"]["not_after"]), "{json}");
    assert!(rfc3339(&json["peers"][0]["cert_not_after"]), "{json}");
    let yaml = std::process::Command::new(bin("meshctl"))
        .args(["status", "-i", &n1.ifname, "-o", "yaml"])
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    assert!(
        yaml.lines().any(|l| l
            .trim_start()
            .starts_with("identity: example.org/prod/node1")),
        "{yaml}"
    );
    let o = std::process::Command::new(bin("meshctl"))
        .args(["policy", "status", "-i", &n1.ifname])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    let row = |who: &str| {
        table
            .lines()
            .find(|l| l.starts_with(who))
            .map(str::to_string)
    };
    assert!(
        row("example.org/prod/node1").is_some_and(|r| r.contains("this node")),
        "{table}"
    );
    assert!(
        row("example.org/prod/node2").is_some_and(|r| r.contains("in sync")),
        "{table}"
    );

    // Node 1 is revoked on node 2: node 2 cuts it, and tells it why, with the list.
    run(std::process::Command::new(bin("meshctl"))
        .args(["ca", "revoke", "--cert"])
        .arg(&n1.cert)
        .arg("--ca")
        .arg(&pki.dir));
    let cfg = std::fs::read_to_string(&n2.config).unwrap();
    let crl = pki.dir.join("revoked.crl");
    std::fs::write(
        &n2.config,
        cfg.replace(
            "[peering]",
            &format!("revocation_lists = [\"{}\"]\n\n[peering]", crl.display()),
        ),
    )
    .unwrap();
    run(std::process::Command::new(bin("meshctl")).args(["reload", &n2.ifname]));
    let told = wait_until(Duration::from_secs(10), || {
        status(&n1.ifname).contains("REVOKED: ")
    });
    let text = status(&n1.ifname);
    assert!(told.is_some(), "node 1 shows it is revoked: {text}");
    let json = lab.status(&n1.ifname);
    assert!(
        json["certificate"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("revoked")),
        "{json}"
    );
}

/// What systemd's `Type=notify` hears: READY=1 first (the sockets listen by then), RELOADING=1
/// and READY=1 around a reload (with the outcome, also of a refused one), STOPPING=1 at the end.
#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let path = lab.dir.join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 1024];
        let n = manager.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    lab.env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    let n1 = node(&mut lab, &sw, &pki, &[pki.ca_cert()], 1, &[], &[]);
    assert_eq!(next(), format!("READY=1\nSTATUS={} up", n1.ifname));
    assert!(std::path::Path::new(&proto::admin::socket_path(&n1.ifname)).exists());

    assert!(reload(&n1.ifname).0);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1\nSTATUS=reloaded");

    std::fs::write(&n1.cert, b"garbage\n").unwrap();
    assert!(!reload(&n1.ifname).0);
    assert!(next().starts_with("RELOADING=1"));
    let refused = next();
    assert!(
        refused.starts_with("READY=1\nSTATUS=reload refused: ") && !refused[9..].contains('\n'),
        "{refused}"
    );

    lab.stop(&n1.ifname, libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
}

/// `reload_on_change = true` (as in the Kubernetes DaemonSet, whose ConfigMap is updated in
/// place): a changed file is taken without a signal, a broken one is refused once and the node
/// runs on.
#[test]
fn a_node_that_watches_its_files_reloads_when_they_change() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let ns = lab.host("w1");
    lab.attach(&sw, &ns, "198.18.1.1/24");
    let (cert, key) = pki.issue("prod", "watcher", "100.64.1.1/32", &[]);
    let ifname = lab.name("w1");
    let config = mesh_config(&lab, &ifname, &cert, &key, &[pki.ca_cert()], &[]);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("reload_on_change = true\n{text}")).unwrap();
    lab.meshd_config(&ns, &ifname, &config);
    assert_eq!(lab.status(&ifname)["policy"]["audit"], false);

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("audit = false", "audit = true")).unwrap();
    wait_for("the watched change taken", Duration::from_secs(12), || {
        lab.status(&ifname)["policy"]["audit"] == true
    });
    assert!(lab
        .log(&ifname)
        .contains("configuration files changed: reloading"));

    std::fs::write(&cert, b"garbage\n").unwrap();
    wait_for(
        "the broken certificate refused",
        Duration::from_secs(12),
        || lab.log(&ifname).contains("reload refused"),
    );
    assert!(lab.alive(&ifname), "the node runs on");
    assert_eq!(lab.status(&ifname)["policy"]["audit"], true);
}
