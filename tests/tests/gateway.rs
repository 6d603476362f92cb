//! External networks through policy-enforcing gateways (issue 9), with real daemons: two
//! gateways serving 198.19.0.0/24 (masquerading), an external host behind them that is not in the
//! mesh (a TCP and a UDP server), an allowed identity (`api`), a disallowed one (`web`: stopped at
//! its own node, then, with that node in audit mode, at the gateway), and a node whose certificate
//! grants no route.

use mesh_tests::*;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ROUTE: &str = "198.19.0.0/24";
const EXT: &str = "198.19.0.5";

const POLICY: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata:
  name: partner-db
  labels:
    role: partner-db
spec:
  nets:
    - 198.19.0.0/24
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: api-to-partner
  namespace: microblog
spec:
  selector: app == 'api'
  egress:
    - action: Allow
      protocol: TCP
      destination:
        selector: role == 'partner-db'
        namespaceSelector: global()
        ports: [5432]
    - action: Allow
      protocol: UDP
      destination:
        selector: role == 'partner-db'
        namespaceSelector: global()
        ports: [5353]
  ingress:
    - action: Allow
      protocol: TCP
      source:
        selector: role == 'partner-db'
        namespaceSelector: global()
      destination:
        ports: [8080]
";

/// Whether a UDP datagram from `ns` to `addr` is echoed back within `timeout`.
fn udp_echoes(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.send_to(b"ping", addr).unwrap();
        let mut buf = [0u8; 16];
        matches!(s.recv_from(&mut buf), Ok((4, _)))
    })
    .join()
    .unwrap()
}

/// A TCP server accepting every connection and, with `udp`, a UDP echo server, in `ns`.
fn servers(ns: &str, tcp: SocketAddr, udp: Option<SocketAddr>) {
    tcp_accept_all(ns, tcp);
    if let Some(udp) = udp {
        let (tx, rx) = std::sync::mpsc::channel();
        drop(in_netns(ns, move || {
            let s = UdpSocket::bind(udp).expect("bind udp");
            let _ = tx.send(());
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("udp listening");
    }
}

/// The mesh's switch, the outside switch, a CA and a policy-admin key.
fn gateway_lab(lab: &mut Lab) -> (Switch, Switch, Pki, PathBuf) {
    let sw = lab.switch();
    let outside = lab.switch_named("so");
    let pki = Pki::new(lab, "example.org", "ca");
    let admin = lab.dir.join("admin.key");
    run(Command::new(bin("meshctl"))
        .args(["policy", "admin-key", "--out"])
        .arg(&admin));
    (sw, outside, pki, admin)
}

/// `meshctl policy apply` of `yaml` through `ifname`, signed with `admin`; must succeed.
fn apply_policy(lab: &Lab, ifname: &str, admin: &Path, yaml: &str) {
    let f = lab.dir.join("policy.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(bin("meshctl"))
        .args(["policy", "apply", "-f", f.to_str().unwrap(), "--key"])
        .arg(admin)
        .args(["-i", ifname])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Which peer of `ifname` holds the route, by its overlay address.
fn carrier(lab: &Lab, ifname: &str) -> Option<String> {
    lab.status(ifname)["peers"]
        .as_array()?
        .iter()
        .find_map(|p| {
            let ips = p["allowed_ips"].as_array()?;
            ips.iter()
                .any(|i| i == ROUTE)
                .then(|| ips[0].as_str().unwrap_or("").to_string())
        })
}

#[test]
fn an_external_network_is_reached_through_gateways_that_enforce_policy_and_fail_over() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let (sw, outside, pki, admin) = gateway_lab(&mut lab);
    let ext = lab.host("x");
    lab.attach(&outside, &ext, &format!("{EXT}/24"));
    // (suffix, name, labels, overlay, underlay, routes granted, audit)
    let specs = [
        (
            "g1",
            "gateway1",
            "app=gateway",
            "100.64.3.1/32",
            "198.18.3.1",
            true,
            false,
        ),
        (
            "g2",
            "gateway2",
            "app=gateway",
            "100.64.3.2/32",
            "198.18.3.2",
            true,
            false,
        ),
        (
            "a",
            "api",
            "app=api",
            "100.64.3.3/32",
            "198.18.3.3",
            false,
            false,
        ),
        (
            "w",
            "web",
            "app=web",
            "100.64.3.4/32",
            "198.18.3.4",
            false,
            false,
        ),
    ];
    let mut nodes = Vec::new();
    for (i, (suffix, name, label, addr, underlay, gateway, audit)) in specs.iter().enumerate() {
        let ns = lab.host(suffix);
        lab.attach(&sw, &ns, &format!("{underlay}/24"));
        let mut extra = vec!["--label", label];
        if *gateway {
            extra.extend(["--route", "198.19.0.0/16"]);
            lab.attach_as(&outside, &ns, "u1", &format!("198.19.0.{}/24", i + 1));
            lab.exec_ok(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        let (cert, key) = pki.issue("microblog", name, addr, &extra);
        let ifname = lab.name(&format!("m{suffix}"));
        let seeds: Vec<&str> = if i == 0 {
            vec![]
        } else {
            vec!["198.18.3.1:51820"]
        };
        let policy = MeshPolicy {
            posture: "zero-trust",
            audit: *audit,
            admins: vec![PathBuf::from(format!("{}.pub", admin.display()))],
        };
        let config = mesh_config_with(
            &lab,
            &ifname,
            &cert,
            &key,
            &[pki.ca_cert()],
            &seeds,
            &policy,
        );
        if *gateway {
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(&format!(
                "\n[gateway]\nroutes = [\"{ROUTE}\"]\nmasquerade = true\n"
            ));
            std::fs::write(&config, text).unwrap();
        }
        lab.meshd_config(&ns, &ifname, &config);
        nodes.push((ns, ifname));
    }
    let (api, web) = (&nodes[2], &nodes[3]);

    // A node whose certificate grants no route cannot serve one: its configuration is refused.
    let (cert, key) = pki.issue("microblog", "rogue", "100.64.3.9/32", &[]);
    let rogue = mesh_config(&lab, "rogue0", &cert, &key, &[pki.ca_cert()], &[]);
    let mut text = std::fs::read_to_string(&rogue).unwrap();
    text.push_str(&format!("\n[gateway]\nroutes = [\"{ROUTE}\"]\n"));
    std::fs::write(&rogue, text).unwrap();
    let o = Command::new(bin("meshd"))
        .args(["--check-config", rogue.to_str().unwrap()])
        .output()
        .unwrap();
    let says = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a gateway without the grant is refused"
    );
    assert!(
        says.contains("gateway.routes") && says.contains("not granted"),
        "{says}"
    );

    apply_policy(&lab, &api.1, &admin, POLICY);
    // Every node routes 198.19.0.0/24 to the same gateway (the live one with the lower key).
    let gateways = ["100.64.3.1/32", "100.64.3.2/32"];
    wait_for(
        "api and web route 198.19.0.0/24 to a gateway",
        Duration::from_secs(20),
        || {
            let a = carrier(&lab, &api.1);
            a.as_deref().is_some_and(|c| gateways.contains(&c))
                && carrier(&lab, &web.1) == a
                && [&nodes[0], &nodes[1], web]
                    .iter()
                    .all(|n| lab.status(&n.1)["policy"]["serial"].as_u64() == Some(1))
        },
    );
    let first = gateways
        .iter()
        .position(|g| carrier(&lab, &api.1).as_deref() == Some(*g))
        .unwrap();
    let (gw, standby) = (&nodes[first], &nodes[1 - first]);
    let db: SocketAddr = format!("{EXT}:5432").parse().unwrap();
    let dns: SocketAddr = format!("{EXT}:5353").parse().unwrap();
    servers(&ext, db, Some(dns));

    // The allowed identity reaches the external host, TCP and UDP; the flow log names the
    // network.
    assert!(
        tcp_connects(&api.0, db, Duration::from_secs(5)),
        "api reaches the partner database"
    );
    assert!(
        udp_echoes(&api.0, dns, Duration::from_secs(3)),
        "and its UDP service"
    );
    let rec = flow_records(&api.1, false)
        .into_iter()
        .find(|r| r["dst"]["ip"] == EXT && r["verdict"] == "allow")
        .expect("api's flow to the database in its log");
    assert_eq!(rec["dst"]["networks"][0], "GlobalNetworkSet partner-db");
    assert_eq!(
        rec["src"]["spiffe_id"],
        "spiffe://example.org/ns/microblog/sa/api"
    );

    // The disallowed one is dropped at its own node...
    assert!(
        !tcp_connects(&web.0, db, Duration::from_secs(2)),
        "web is stopped at its node"
    );
    let st = lab.status(&web.1);
    let dropped: u64 = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["drops"]["policy_denied_egress"].as_u64().unwrap_or(0))
        .sum();
    assert!(dropped >= 1, "counted at web's node: {st}");
    assert!(
        !flow_records(&gw.1, false)
            .iter()
            .any(|r| r["src"]["name"] == "web"),
        "nothing of web reached the gateway"
    );
    // ... and, when its node is made to skip its egress checks (audit mode: it lets denials
    // through), at the gateway.
    lab.stop(&web.1, libc::SIGTERM);
    let config = lab.dir.join(format!("{}.toml", web.1));
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("audit = false", "audit = true")).unwrap();
    lab.meshd_config(&web.0, &web.1, &config);
    wait_for(
        "web rejoins and routes through the gateway",
        Duration::from_secs(15),
        || {
            carrier(&lab, &web.1).as_deref() == Some(gateways[first])
                && lab.status(&web.1)["policy"]["audit"] == true
        },
    );
    assert!(
        !tcp_connects(&web.0, db, Duration::from_secs(2)),
        "web is stopped at the gateway"
    );
    let at_gateway = flow_records(&gw.1, false);
    let denied = at_gateway
        .iter()
        .find(|r| r["src"]["name"] == "web" && r["verdict"] == "deny")
        .unwrap_or_else(|| panic!("the gateway's log shows web denied: {at_gateway:?}"));
    assert_eq!(denied["direction"], "egress", "decided as web's egress");
    assert_eq!(denied["dst"]["networks"][0], "GlobalNetworkSet partner-db");
    assert!(flow_records(&web.1, false)
        .iter()
        .any(|r| r["dst"]["ip"] == EXT && r["verdict"] == "audit"));

    // The external host reaches the allowed service through the gateway, and nothing else.
    let api_svc: SocketAddr = "100.64.3.3:8080".parse().unwrap();
    let api_other: SocketAddr = "100.64.3.3:9090".parse().unwrap();
    let web_svc: SocketAddr = "100.64.3.4:8080".parse().unwrap();
    servers(&api.0, api_svc, None);
    servers(&api.0, api_other, None);
    servers(&web.0, web_svc, None);
    let via = format!("198.19.0.{}", first + 1);
    lab.exec_ok(&ext, &["ip", "route", "add", "100.64.0.0/16", "via", &via]);
    assert!(
        tcp_connects(&ext, api_svc, Duration::from_secs(5)),
        "the external host reaches api:8080"
    );
    assert!(
        !tcp_connects(&ext, api_other, Duration::from_secs(2)),
        "not api:9090"
    );
    assert!(
        !tcp_connects(&ext, web_svc, Duration::from_secs(2)),
        "nor web (stopped at the gateway)"
    );
    let from_ext = flow_records(&api.1, false)
        .into_iter()
        .find(|r| r["src"]["ip"] == EXT && r["verdict"] == "allow")
        .expect("the inbound flow in api's log");
    assert_eq!(from_ext["direction"], "ingress");
    assert_eq!(
        from_ext["src"]["networks"][0],
        "GlobalNetworkSet partner-db"
    );
    assert!(
        flow_records(&gw.1, false)
            .iter()
            .any(|r| r["src"]["ip"] == EXT
                && r["dst"]["name"] == "web"
                && r["verdict"] == "deny"
                && r["direction"] == "ingress"),
        "the gateway decided web's ingress"
    );

    // Failover: the gateway dies; api's traffic moves to the other within 5 s, and back.
    lab.stop(&gw.1, libc::SIGKILL);
    let moved = wait_for(
        "the route moves to the standby gateway",
        Duration::from_secs(5),
        || carrier(&lab, &api.1).as_deref() == Some(gateways[1 - first]),
    );
    eprintln!("failover took {moved:?}");
    assert!(
        tcp_connects(&api.0, db, Duration::from_secs(5)),
        "api reaches the database through the standby"
    );
    assert!(
        flow_records(&standby.1, false)
            .iter()
            .any(|r| r["src"]["name"] == "api" && r["verdict"] == "allow"),
        "the standby gateway decided api's flow"
    );
    let config = lab.dir.join(format!("{}.toml", gw.1));
    lab.meshd_config(&gw.0, &gw.1, &config);
    let back = wait_for("the route moves back", Duration::from_secs(10), || {
        carrier(&lab, &api.1).as_deref() == Some(gateways[first])
    });
    eprintln!("failback took {back:?} (with the restart)");
    assert!(
        tcp_connects(&api.0, db, Duration::from_secs(5)),
        "and through the first gateway again"
    );
}

const ROUTE6: &str = "fd19::/64";
const EXT6: &str = "fd19::5";

const POLICY6: &str = "apiVersion: mesh.io/v1
kind: GlobalExternalNetwork
metadata:
  name: partner-db6
  labels:
    role: partner-db
spec:
  nets:
    - fd19::/64
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: api-to-partner
  namespace: microblog
spec:
  selector: app == 'api'
  egress:
    - action: Allow
      protocol: TCP
      destination:
        selector: role == 'partner-db'
        namespaceSelector: global()
        ports: [5432]
  ingress:
    - action: Allow
      protocol: TCP
      source:
        selector: role == 'partner-db'
        namespaceSelector: global()
      destination:
        ports: [8080]
";

/// An IPv6 external network behind a gateway (no masquerade: the external host routes the
/// overlay's IPv6 range back to the gateway): the allowed identity reaches it and is reached from
/// it on the allowed port; the other identity reaches nothing; the flow logs name the network.
#[test]
fn an_ipv6_external_network_is_reached_through_a_gateway_that_enforces_policy() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let (sw, outside, pki, admin) = gateway_lab(&mut lab);
    let ext = lab.host("x");
    lab.attach(&outside, &ext, &format!("{EXT6}/64"));
    // (suffix, name, labels, overlay v4, overlay v6, underlay, gateway)
    let specs = [
        (
            "g",
            "gateway",
            "app=gateway",
            "100.64.7.1/32",
            "fd64::1/128",
            "198.18.7.1",
            true,
        ),
        (
            "a",
            "api",
            "app=api",
            "100.64.7.3/32",
            "fd64::3/128",
            "198.18.7.3",
            false,
        ),
        (
            "w",
            "web",
            "app=web",
            "100.64.7.4/32",
            "fd64::4/128",
            "198.18.7.4",
            false,
        ),
    ];
    let mut nodes = Vec::new();
    for (i, (suffix, name, label, v4, v6, underlay, gateway)) in specs.iter().enumerate() {
        let ns = lab.host(suffix);
        lab.attach(&sw, &ns, &format!("{underlay}/24"));
        let mut extra = vec!["--label", label, "--ip", v6];
        if *gateway {
            extra.extend(["--route", ROUTE6]);
            lab.attach_as(&outside, &ns, "u1", "fd19::1/64");
            lab.exec_ok(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        let (cert, key) = pki.issue("microblog", name, v4, &extra);
        let ifname = lab.name(&format!("s{suffix}"));
        let seeds: Vec<&str> = if i == 0 {
            vec![]
        } else {
            vec!["198.18.7.1:51820"]
        };
        let policy = MeshPolicy {
            posture: "zero-trust",
            audit: false,
            admins: vec![PathBuf::from(format!("{}.pub", admin.display()))],
        };
        let config = mesh_config_with(
            &lab,
            &ifname,
            &cert,
            &key,
            &[pki.ca_cert()],
            &seeds,
            &policy,
        );
        if *gateway {
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(&format!("\n[gateway]\nroutes = [\"{ROUTE6}\"]\n"));
            std::fs::write(&config, text).unwrap();
        }
        lab.meshd_config(&ns, &ifname, &config);
        nodes.push((ns, ifname));
    }
    let (gw, api, web) = (&nodes[0], &nodes[1], &nodes[2]);
    apply_policy(&lab, &api.1, &admin, POLICY6);
    let routed = |n: &(String, String)| {
        lab.status(&n.1)["peers"].as_array().is_some_and(|ps| {
            ps.iter().any(|p| {
                p["allowed_ips"]
                    .as_array()
                    .is_some_and(|ips| ips.iter().any(|i| i == ROUTE6))
            })
        }) && lab.status(&n.1)["policy"]["serial"].as_u64() == Some(1)
    };
    wait_for(
        "api and web route fd19::/64 to the gateway",
        Duration::from_secs(20),
        || routed(api) && routed(web) && lab.status(&gw.1)["policy"]["serial"].as_u64() == Some(1),
    );
    // No masquerade: the external host routes the overlay's IPv6 range back to the gateway.
    lab.exec_ok(
        &ext,
        &["ip", "-6", "route", "add", "fd64::/16", "via", "fd19::1"],
    );
    let db: SocketAddr = format!("[{EXT6}]:5432").parse().unwrap();
    servers(&ext, db, None);
    assert!(
        tcp_connects(&api.0, db, Duration::from_secs(5)),
        "api reaches the IPv6 partner database"
    );
    assert!(
        !tcp_connects(&web.0, db, Duration::from_secs(2)),
        "web does not"
    );
    let rec = flow_records(&gw.1, false)
        .into_iter()
        .find(|r| r["dst"]["ip"] == EXT6 && r["verdict"] == "allow")
        .expect("the gateway decided api's flow to the database");
    assert_eq!(rec["src"]["name"], "api");
    assert_eq!(
        rec["dst"]["networks"][0],
        "GlobalExternalNetwork partner-db6"
    );

    // Inbound.
    let api_svc: SocketAddr = "[fd64::3]:8080".parse().unwrap();
    let web_svc: SocketAddr = "[fd64::4]:8080".parse().unwrap();
    servers(&api.0, api_svc, None);
    servers(&web.0, web_svc, None);
    assert!(
        tcp_connects(&ext, api_svc, Duration::from_secs(5)),
        "the external host reaches api:8080 over IPv6"
    );
    assert!(
        !tcp_connects(&ext, web_svc, Duration::from_secs(2)),
        "not web"
    );
    let from_ext = flow_records(&api.1, false)
        .into_iter()
        .find(|r| r["src"]["ip"] == EXT6 && r["verdict"] == "allow")
        .expect("the inbound IPv6 flow in api's log");
    assert_eq!(
        from_ext["src"]["networks"][0],
        "GlobalExternalNetwork partner-db6"
    );
}
