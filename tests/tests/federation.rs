//! Federation with a remote cluster (issue 9), with real daemons: cluster A (example.org: post,
//! api) and cluster B (partner.org: api, search, and two nodes outside the scope A grants B), each
//! with its own CA, scope and policy admin, on one switch. A rogue CA claiming A's trust domain
//! tries too.

use mesh_tests::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MB: u64 = 1 << 20;

struct Node {
    ns: String,
    ifname: String,
}

struct Cluster {
    pki: Pki,
    admin: PathBuf,
}

/// Cluster A (example.org, CA ranges 100.64.0.0/16) and cluster B (partner.org, 100.65.0.0/16),
/// each with its CA and policy-admin key.
fn clusters(lab: &Lab) -> (Cluster, Cluster) {
    let cluster = |td: &str, name: &str, ranges: &str| {
        let c = Cluster {
            pki: Pki::with_ranges(lab, td, &format!("ca-{name}"), ranges),
            admin: lab.dir.join(format!("admin-{name}.key")),
        };
        run(Command::new(bin("meshctl"))
            .args(["policy", "admin-key", "--out"])
            .arg(&c.admin));
        c
    };
    (
        cluster("example.org", "a", "100.64.0.0/16"),
        cluster("partner.org", "b", "100.65.0.0/16"),
    )
}

/// Each side federates the other through one of its nodes: A trusts partner.org within
/// 100.65.0.0/24 and namespace microblog; B trusts example.org.
fn federate(a: &Cluster, a_node: &str, b: &Cluster, b_node: &str) {
    meshctl_ok(
        a_node,
        &[
            "federation",
            "add",
            "--trust-domain",
            "partner.org",
            "--bundle",
            b.pki.ca_cert().to_str().unwrap(),
            "--addresses",
            "100.65.0.0/24",
            "--namespaces",
            "microblog",
            "--key",
            a.admin.to_str().unwrap(),
        ],
    );
    meshctl_ok(
        b_node,
        &[
            "federation",
            "add",
            "--trust-domain",
            "example.org",
            "--bundle",
            a.pki.ca_cert().to_str().unwrap(),
            "--key",
            b.admin.to_str().unwrap(),
        ],
    );
}

/// `meshctl ARGS -i IFNAME`, which must succeed; its standard output.
fn meshctl_ok(ifname: &str, args: &[&str]) -> String {
    let o = Command::new(bin("meshctl"))
        .args(args)
        .args(["-i", ifname])
        .output()
        .expect("running meshctl");
    assert!(
        o.status.success(),
        "meshctl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn apply(lab: &Lab, ifname: &str, admin: &Path, name: &str, yaml: &str) {
    let f = lab.dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    meshctl_ok(
        ifname,
        &[
            "policy",
            "apply",
            "-f",
            f.to_str().unwrap(),
            "--key",
            admin.to_str().unwrap(),
        ],
    );
}

/// The identities (TD/NS/NAME) of the peers `ifname` has installed.
fn peers(lab: &Lab, ifname: &str) -> Vec<String> {
    lab.status(ifname)["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["identity"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: microblog\n  labels:\n    app: microblog\n";

/// A's rule for B's api: it names the trust-domain label, as a remote identity requires.
const PARTNER_API: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: partner-api
  namespace: microblog
spec:
  selector: app == 'post'
  ingress:
    - action: Allow
      protocol: TCP
      source:
        selector: mesh.io/trust-domain == 'partner.org' && app == 'api'
      destination:
        ports: [8080]
";

/// A's identities may call any identity of A (egress); ingress policy decides.
const A_EGRESS: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: egress
spec:
  selector: all()
  egress:
    - action: Allow
";

/// B lets its identities call example.org (egress); A's policy decides what they reach.
const B_EGRESS: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: to-example
spec:
  selector: all()
  egress:
    - action: Allow
      destination:
        namespaceSelector: mesh.io/trust-domain == 'example.org'
";

#[test]
fn a_federated_cluster_reaches_only_what_policy_names_within_its_scope_until_unfederated() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let (a, b) = clusters(&lab);
    let rogue = Pki::new(&lab, "example.org", "ca-rogue");
    // (cluster, namespace, name, labels, address, underlay, seed)
    let specs: [(&str, &str, &str, &str, &str, &str, &str); 7] = [
        (
            "a",
            "microblog",
            "post",
            "app=post",
            "100.64.2.1/32",
            "198.18.2.1",
            "",
        ),
        (
            "a",
            "microblog",
            "api",
            "app=api",
            "100.64.2.2/32",
            "198.18.2.2",
            "198.18.2.1:51820",
        ),
        (
            "b",
            "microblog",
            "api",
            "app=api",
            "100.65.0.1/32",
            "198.18.2.11",
            "198.18.2.1:51820",
        ),
        (
            "b",
            "microblog",
            "search",
            "app=search",
            "100.65.0.2/32",
            "198.18.2.12",
            "198.18.2.11:51820",
        ),
        // Within B's own CA, outside the scope A grants B: another namespace, another range.
        (
            "b",
            "kube-system",
            "dns",
            "app=dns",
            "100.65.0.3/32",
            "198.18.2.13",
            "198.18.2.11:51820",
        ),
        (
            "b",
            "microblog",
            "batch",
            "app=api",
            "100.65.1.4/32",
            "198.18.2.14",
            "198.18.2.11:51820",
        ),
        // A CA nobody trusts, claiming A's trust domain, B's api's labels and an A address.
        (
            "r",
            "microblog",
            "api2",
            "app=api",
            "100.64.2.9/32",
            "198.18.2.21",
            "",
        ),
    ];
    let mut nodes = Vec::new();
    for (i, (cluster, ns_name, name, label, addr, underlay, seed)) in specs.iter().enumerate() {
        let ns = lab.host(&format!("f{i}"));
        lab.attach(&sw, &ns, &format!("{underlay}/24"));
        let (pki, admin, bundle) = match *cluster {
            "a" => (&a.pki, &a.admin, a.pki.ca_cert()),
            "b" => (&b.pki, &b.admin, b.pki.ca_cert()),
            _ => (&rogue, &a.admin, rogue.ca_cert()),
        };
        let (cert, key) = pki.issue(ns_name, name, addr, &["--label", label]);
        let ifname = lab.name(&format!("g{i}"));
        let seeds: Vec<&str> = if seed.is_empty() { vec![] } else { vec![seed] };
        let policy = MeshPolicy {
            posture: "zero-trust",
            audit: false,
            admins: vec![PathBuf::from(format!("{}.pub", admin.display()))],
        };
        let config = mesh_config_with(&lab, &ifname, &cert, &key, &[bundle], &seeds, &policy);
        lab.meshd_config(&ns, &ifname, &config);
        nodes.push(Node { ns, ifname });
    }
    let (post, api, b_api, b_search) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    let b_all = [2, 3, 4, 5];
    wait_for("each cluster forms", Duration::from_secs(30), || {
        peers(&lab, &post.ifname).contains(&"example.org/microblog/api".to_string())
            && b_all
                .iter()
                .all(|&i| peers(&lab, &nodes[i].ifname).len() == 3)
    });
    assert!(
        peers(&lab, &post.ifname)
            .iter()
            .all(|p| p.starts_with("example.org/microblog/api")),
        "before federation A trusts nothing of B, nor the rogue CA: {:?}",
        peers(&lab, &post.ifname)
    );

    // The rogue node greets A's post by its key, showing its certificate.
    let post_key = lab.status(&post.ifname)["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    meshctl_ok(
        &nodes[6].ifname,
        &["peer", "add", &format!("{post_key}@198.18.2.1:51820")],
    );

    // Policy on each side, then each side federates the other within a scope.
    let seed_post = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/microblog/post-allow-list.yaml"),
    )
    .unwrap();
    apply(
        &lab,
        &post.ifname,
        &a.admin,
        "a1",
        &format!("{NAMESPACE}---\n{A_EGRESS}---\n{seed_post}"),
    );
    apply(&lab, &b_api.ifname, &b.admin, "b1", B_EGRESS);
    federate(&a, &post.ifname, &b, &b_api.ifname);
    let listed = meshctl_ok(&post.ifname, &["federation", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["federations"][0]["trust_domain"], "partner.org");
    assert_eq!(listed["federations"][0]["addresses"][0], "100.65.0.0/24");
    let took = wait_for("A and B peer", Duration::from_secs(20), || {
        let p = peers(&lab, &post.ifname);
        p.contains(&"partner.org/microblog/api".to_string())
            && p.contains(&"partner.org/microblog/search".to_string())
            && peers(&lab, &b_api.ifname).contains(&"example.org/microblog/post".to_string())
    });
    eprintln!("federated peering took {took:?}");
    std::thread::sleep(Duration::from_secs(3));
    let installed = peers(&lab, &post.ifname);
    for outsider in [
        "partner.org/kube-system/dns",
        "partner.org/microblog/batch",
        "example.org/microblog/api2",
    ] {
        assert!(
            !installed.contains(&outsider.to_string()),
            "{outsider} is outside every scope: {installed:?}"
        );
    }
    let refused = &lab.status(&post.ifname)["control"]["refused"];
    let count = |k: &str| {
        refused[k].as_u64().unwrap_or(0) + refused[format!("listed_{k}")].as_u64().unwrap_or(0)
    };
    assert!(
        count("out_of_scope") >= 1,
        "out-of-scope certificates are refused and counted: {refused}"
    );
    assert!(
        count("certificate") >= 1,
        "the rogue CA's certificate is refused and counted: {refused}"
    );

    // The seed's post-allow-list, unchanged, does not admit B's microblog/api, though its
    // namespace, name and labels are those of A's api, which it admits.
    let post_addr: SocketAddr = "100.64.2.1:8080".parse().unwrap();
    tcp_accept_all(&post.ns, post_addr);
    assert!(
        tcp_connects(&api.ns, post_addr, Duration::from_secs(5)),
        "A's api reaches post"
    );
    assert!(
        !tcp_connects(&b_api.ns, post_addr, Duration::from_secs(2)),
        "B's api is denied by the seed's list"
    );
    let denied = flow_records(&post.ifname, true);
    let from_b = denied
        .iter()
        .find(|r| r["src"]["trust_domain"] == "partner.org")
        .unwrap_or_else(|| panic!("a denied flow from partner.org in the log: {denied:?}"));
    assert_eq!(
        from_b["src"]["spiffe_id"],
        "spiffe://partner.org/ns/microblog/sa/api"
    );
    assert_eq!(
        from_b["dst"]["spiffe_id"],
        "spiffe://example.org/ns/microblog/sa/post"
    );
    assert_eq!(from_b["policy"], "end-of-policies");

    // A rule naming the trust domain admits B's api, and only it.
    apply(&lab, &post.ifname, &a.admin, "a2", PARTNER_API);
    wait_for("B's api admitted", Duration::from_secs(10), || {
        tcp_connects(&b_api.ns, post_addr, Duration::from_secs(1))
    });
    assert!(
        !tcp_connects(&b_search.ns, post_addr, Duration::from_secs(2)),
        "B's search is not named"
    );
    let policy_check = meshctl_ok(
        &post.ifname,
        &[
            "policy",
            "check",
            "--from",
            "partner.org/microblog/api,app=api",
            "--to",
            "microblog/post,app=post",
            "--port",
            "8080",
        ],
    );
    assert!(policy_check.starts_with("ALLOW"), "{policy_check}");
    assert!(
        policy_check.contains("spiffe://partner.org/ns/microblog/sa/api"),
        "{policy_check}"
    );

    // Removing the federation cuts B from A within 5 s, and its flows with it.
    meshctl_ok(
        &api.ifname,
        &[
            "federation",
            "remove",
            "partner.org",
            "--key",
            a.admin.to_str().unwrap(),
        ],
    );
    let took = wait_for("B cut from A", Duration::from_secs(5), || {
        [post, api].iter().all(|n| {
            peers(&lab, &n.ifname)
                .iter()
                .all(|p| !p.starts_with("partner.org/"))
        })
    });
    eprintln!("unfederated in {took:?}");
    assert!(
        !tcp_connects(&b_api.ns, post_addr, Duration::from_secs(2)),
        "B's api no longer reaches post"
    );
    assert!(
        tcp_connects(&api.ns, post_addr, Duration::from_secs(5)),
        "A's own traffic is untouched"
    );
}

/// The public key a certificate names (from `meshctl identity inspect`).
fn public_key_of(cert: &Path) -> String {
    let out = run(Command::new(bin("meshctl"))
        .args(["identity", "inspect"])
        .arg(cert));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("public key")
                .map(|k| k.trim().to_string())
        })
        .expect("inspect names the public key")
}

/// The UDP payloads of the IPv4 frames of a capture (ARP and link housekeeping left out); panics
/// on anything else crossing the link.
fn udp_payloads(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in frames {
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        if ethertype != 0x0800 {
            continue; // ARP, and the IPv6 neighbour discovery and MLD of a new link
        }
        let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
        let (proto, multicast) = (f[14 + 9], f[14 + 16] & 0xf0 == 0xe0);
        if multicast || proto == 2 {
            continue; // IGMP reports of a new link
        }
        assert_eq!(
            proto, 17,
            "only UDP crosses between the relays (frame {f:02x?})"
        );
        out.push(f[l4 + 8..].to_vec());
    }
    out
}

/// Clusters on underlays that do not reach each other: A's post and B's api and search see only
/// their own cluster's switch; one relay node of each cluster is also on a third switch with the
/// other's. Federated, B's api reaches A's post through both relays, end to end encrypted and
/// decided by post's policy with B's api's identity; B's search is denied; the relays carry only
/// relay frames of WireGuard and sealed control messages.
#[test]
fn clusters_on_separate_underlays_federate_through_a_relay_of_each() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let (sw_a, sw_b, sw_x) = (
        lab.switch_named("swa"),
        lab.switch_named("swb"),
        lab.switch_named("swx"),
    );
    let (a, b) = clusters(&lab);
    // (cluster, name, labels, overlay, own underlay, the relay-link underlay, seed)
    let specs: [(&str, &str, &str, &str, &str, &str, &str); 5] = [
        (
            "a",
            "relay",
            "app=relay",
            "100.64.4.1/32",
            "198.18.4.1",
            "198.18.6.1",
            "",
        ),
        (
            "a",
            "post",
            "app=post",
            "100.64.4.2/32",
            "198.18.4.2",
            "",
            "198.18.4.1:51820",
        ),
        (
            "b",
            "relay",
            "app=relay",
            "100.65.0.1/32",
            "198.18.5.1",
            "198.18.6.2",
            "198.18.6.1:51820",
        ),
        (
            "b",
            "api",
            "app=api",
            "100.65.0.2/32",
            "198.18.5.2",
            "",
            "198.18.5.1:51820",
        ),
        (
            "b",
            "search",
            "app=search",
            "100.65.0.3/32",
            "198.18.5.3",
            "",
            "198.18.5.1:51820",
        ),
    ];
    let issued: Vec<(PathBuf, PathBuf)> = specs
        .iter()
        .map(|(cluster, name, label, addr, ..)| {
            let pki = if *cluster == "a" { &a.pki } else { &b.pki };
            pki.issue("microblog", name, addr, &["--label", label])
        })
        .collect();
    let (relay_a, relay_b) = (public_key_of(&issued[0].0), public_key_of(&issued[2].0));
    let mut nodes = Vec::new();
    for (i, (cluster, _, _, _, underlay, link, seed)) in specs.iter().enumerate() {
        let ns = lab.host(&format!("r{i}"));
        let sw = if *cluster == "a" { &sw_a } else { &sw_b };
        lab.attach(sw, &ns, &format!("{underlay}/24"));
        if !link.is_empty() {
            lab.attach_as(&sw_x, &ns, "u1", &format!("{link}/24"));
        }
        let c = if *cluster == "a" { &a } else { &b };
        let ifname = lab.name(&format!("q{i}"));
        let seeds: Vec<&str> = if seed.is_empty() { vec![] } else { vec![seed] };
        let policy = MeshPolicy {
            posture: "zero-trust",
            audit: false,
            admins: vec![PathBuf::from(format!("{}.pub", c.admin.display()))],
        };
        let (cert, key) = &issued[i];
        let config = mesh_config_with(
            &lab,
            &ifname,
            cert,
            key,
            &[c.pki.ca_cert()],
            &seeds,
            &policy,
        );
        // Each relay serves and asks the other cluster's; every other node asks its own.
        let relay = match (i, *cluster) {
            (0, _) => format!("serve = true\nvia = [\"{relay_b}\"]"),
            (2, _) => format!("serve = true\nvia = [\"{relay_a}\"]"),
            (_, "a") => format!("via = [\"{relay_a}\"]"),
            _ => format!("via = [\"{relay_b}\"]"),
        };
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("\n[relay]\n{relay}\n"));
        std::fs::write(&config, text).unwrap();
        lab.meshd_config(&ns, &ifname, &config);
        nodes.push(Node { ns, ifname });
    }
    let (relay_a_node, post, relay_b_node, api, search) =
        (&nodes[0], &nodes[1], &nodes[2], &nodes[3], &nodes[4]);
    assert!(
        !lab.ping(&post.ns, "198.18.5.2", 1),
        "A's post cannot reach B's underlay"
    );

    apply(
        &lab,
        &post.ifname,
        &a.admin,
        "a1",
        &format!(
            "{NAMESPACE}---\n{A_EGRESS}---\n{PARTNER_API}---\n{}",
            PARTNER_API
                .replace("partner-api", "partner-bulk")
                .replace("[8080]", "[5001]")
        ),
    );
    apply(&lab, &api.ifname, &b.admin, "b1", B_EGRESS);
    federate(&a, &post.ifname, &b, &api.ifname);
    let post_addr: SocketAddr = "100.64.4.2:8080".parse().unwrap();
    tcp_accept_all(&post.ns, post_addr);
    let took = wait_for(
        "B's api reaches A's post through the relays",
        Duration::from_secs(30),
        || tcp_connects(&api.ns, post_addr, Duration::from_secs(1)),
    );
    eprintln!("federated through relays in {took:?}");

    // What crosses between the relays while B's api talks to post: relay frames, each holding a
    // WireGuard message or a sealed control datagram, and never the plaintext.
    const CANARY: &[u8] = b"RELAYED-PLAINTEXT-CANARY-0123456789";
    let cap = lab.capture(&relay_a_node.ns, "u1");
    let sink = tcp_sink(
        &post.ns,
        "100.64.4.2:5001".parse().unwrap(),
        MB,
        Some(CANARY),
    );
    tcp_send(
        &api.ns,
        "100.64.4.2:5001".parse().unwrap(),
        MB,
        Some(CANARY),
        Duration::ZERO,
    )
    .expect("B's api sends 1 MB to post");
    assert_eq!(sink.join().unwrap(), Ok(MB));
    let payloads = udp_payloads(&cap.finish());
    let mut data = 0;
    for p in &payloads {
        assert!(
            !p.windows(CANARY.len()).any(|w| w == CANARY),
            "plaintext seen between the relays"
        );
        let (header, inner) = proto::relay::parse(p)
            .unwrap_or_else(|| panic!("only relay frames between the relays: {p:02x?}"));
        assert!(header.ttl >= 1);
        let wireguard = (1..=4).contains(&inner[0]) && inner[1..4] == [0, 0, 0];
        assert!(
            wireguard || proto::control::is_control(inner),
            "a frame holds a WireGuard message or a control datagram"
        );
        data += usize::from(inner[0] == 4);
    }
    assert!(
        data > 500,
        "the transfer crossed the relays ({data} data messages)"
    );

    // Post's policy decided with B's api's identity, at post: search is not named.
    wait_for(
        "post denies B's search and logs it",
        Duration::from_secs(15),
        || {
            assert!(
                !tcp_connects(&search.ns, post_addr, Duration::from_secs(1)),
                "B's search is denied"
            );
            flow_records(&post.ifname, true)
                .iter()
                .any(|r| r["src"]["spiffe_id"] == "spiffe://partner.org/ns/microblog/sa/search")
        },
    );
    // Post's tunnel to B's api leaves through A's relay; the relays reach each other directly.
    let endpoint = |n: &Node, identity: &str| {
        lab.status(&n.ifname)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["identity"] == identity)
            .map(|p| p["endpoint"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(
        endpoint(post, "partner.org/microblog/api").as_deref(),
        Some("198.18.4.1:51820")
    );
    assert_eq!(
        endpoint(relay_b_node, "example.org/microblog/relay").as_deref(),
        Some("198.18.6.1:51820")
    );
    let relayed = lab.status(&relay_a_node.ifname)["relayed_datagrams"]
        .as_u64()
        .unwrap_or(0);
    assert!(relayed > 500, "A's relay counts what it relayed: {relayed}");

    // Removing the federation cuts B from post within 5 s, through the relays too.
    meshctl_ok(
        &post.ifname,
        &[
            "federation",
            "remove",
            "partner.org",
            "--key",
            a.admin.to_str().unwrap(),
        ],
    );
    wait_for("B cut from A", Duration::from_secs(5), || {
        peers(&lab, &post.ifname)
            .iter()
            .all(|p| !p.starts_with("partner.org/"))
    });
    assert!(!tcp_connects(&api.ns, post_addr, Duration::from_secs(2)));
}
