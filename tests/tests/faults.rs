//! Faults and attacks on a mesh of real meshd nodes (issue 8): a spoofed-source flood, loss on
//! every underlay link, a node killed while a set spreads, a partition healing.

use mesh_tests::policy_lab::*;
use mesh_tests::*;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// These tests measure convergence against deadlines with up to ten daemons each, one of them
/// under a flood: they run one at a time, so that one test's load is not another's delay.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends `rate` UDP datagrams a second for `secs` seconds from namespace `ns` to `dst`:51820,
/// each with a source address forged from `sources`, through a raw socket: 4-byte control
/// magics, sealed-looking datagrams that no key made, and probes. Returns how many were sent.
fn spoofed_flood(
    ns: &str,
    dst: [u8; 4],
    sources: Vec<[u8; 4]>,
    rate: u64,
    secs: u64,
) -> std::thread::JoinHandle<u64> {
    in_netns(ns, move || {
        // SAFETY: a raw socket; IPPROTO_RAW implies that we write the IP header.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst),
            },
            sin_zero: [0; 8],
        };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            // Bounded in count and time: `rate` a second, in batches every 10 ms.
            let due = start.elapsed().as_millis() as u64 * rate / 1000;
            while sent < due {
                let payload: Vec<u8> = match next() % 3 {
                    0 => b"MSHP".to_vec(),
                    1 => {
                        let mut p = b"MSHP\x03\x03".to_vec();
                        p.extend((0..200).map(|_| next() as u8));
                        p
                    }
                    _ => {
                        let mut p = b"MSHP\x03\x01".to_vec();
                        p.resize(1200, 0);
                        p
                    }
                };
                let src = sources[(next() % sources.len() as u64) as usize];
                let total = 28 + payload.len();
                let mut pkt = vec![0u8; 28];
                pkt[0] = 0x45;
                pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                pkt[8] = 64;
                pkt[9] = 17;
                pkt[12..16].copy_from_slice(&src);
                pkt[16..20].copy_from_slice(&dst);
                pkt[20..22].copy_from_slice(&51820u16.to_be_bytes());
                pkt[22..24].copy_from_slice(&51820u16.to_be_bytes());
                pkt[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                pkt.extend_from_slice(&payload);
                // SAFETY: sending a buffer we own to an address we built.
                unsafe {
                    libc::sendto(
                        fd,
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: closing the socket we opened.
        unsafe { libc::close(fd) };
        sent
    })
}

#[test]
fn under_a_spoofed_flood_a_set_and_a_revocation_reach_every_node_and_pings_flow() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let mut pl = policy_lab(
        &[
            ("a", &["app=a"]),
            ("b", &["app=b"]),
            ("c", &["app=c"]),
            ("d", &["app=d"]),
        ],
        &[],
    );
    pl.apply(1, POLICY_ALLOW_ALL);
    assert!(pl
        .lab
        .ping_until(&pl.node(1).ns, &pl.node(2).ip, Duration::from_secs(10)));
    // The attacker is a host on the same underlay; it forges the members' addresses and others
    // of the subnet, 5,000 datagrams a second for 15 s, at node 2.
    let attacker = pl.lab.host("fl");
    pl.lab.attach(&pl.sw, &attacker, "198.18.2.66/24");
    let mut sources: Vec<[u8; 4]> = vec![[198, 18, 2, 1], [198, 18, 2, 3], [198, 18, 2, 4]];
    sources.extend((100..200).map(|i| [198, 18, 2, i]));
    let flood = spoofed_flood(&attacker, [198, 18, 2, 2], sources, 5_000, 15);
    std::thread::sleep(Duration::from_secs(2));
    // During the flood: a new set on node 1, and node 4 revoked through node 3.
    let set_applied = Instant::now();
    let admin = pl.admin.clone();
    let o = pl.apply_with(
        1,
        &POLICY_ALLOW_ALL.replace("name: open", "name: open-2"),
        &admin,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let serial = pl.serial(1);
    revoke_through(&pl, "d", 3);
    let reached = |pl: &PolicyLab| {
        (1..=3).all(|i| pl.serial(i) == serial)
            && (1..=3).all(|i| {
                let st = pl.lab.status(&pl.node(i).ifname);
                !st["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["identity"] == "example.org/microblog/d")
            })
    };
    let deadline = set_applied + Duration::from_secs(10);
    while !reached(&pl) {
        assert!(
            Instant::now() < deadline,
            "the set and the revocation did not reach every node within 10 s of the flood's start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "set and revocation everywhere {:?} after",
        set_applied.elapsed()
    );
    // Pings between members keep flowing while the flood goes on.
    assert!(
        pl.lab.ping(&pl.node(1).ns, &pl.node(2).ip, 3),
        "pings through the flood"
    );
    assert!(
        pl.lab.ping(&pl.node(3).ns, &pl.node(2).ip, 3),
        "pings through the flood"
    );
    let sent = flood.join().unwrap();
    assert!(sent >= 60_000, "the flood sent {sent} datagrams");
    let st = pl.lab.status(&pl.node(2).ifname);
    eprintln!("victim after the flood: {} {}", st["drops"], st["control"]);
    // What the victim spent: the flood's sealed-looking datagrams never showed a cookie, so they
    // cost no Diffie-Hellman; the members' own datagrams cost almost none (kept agreements).
    let control = &st["control"];
    let refused = |kind: &str| control["refused"][kind].as_u64().unwrap_or(0);
    assert!(
        refused("malformed") + refused("cookie_required") >= 15_000,
        "the flood was refused and counted: {control}"
    );
    let dh = control["dh_ops"].as_u64().unwrap();
    assert!(
        dh < 1_000,
        "{dh} Diffie-Hellman operations spent: {control}"
    );
}

#[test]
fn with_20_percent_loss_10_nodes_form_a_mesh_and_a_set_and_a_revocation_reach_every_node() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let names: Vec<String> = (1..=10).map(|i| format!("s{i}")).collect();
    let labels: Vec<String> = names.iter().map(|n| format!("app={n}")).collect();
    let ids: Vec<(&str, Vec<&str>)> = names
        .iter()
        .zip(&labels)
        .map(|(n, l)| (n.as_str(), vec![l.as_str()]))
        .collect();
    let ids: Vec<(&str, &[&str])> = ids.iter().map(|(n, l)| (*n, l.as_slice())).collect();
    // Every node loses a fifth of what arrives; they still meet (policy_lab_on waits for it).
    let mut pl = policy_lab_on(&ids, &[], Fragments::Lossy);
    let lost = pl
        .lab
        .exec_ok(&pl.node(1).ns, &["nft", "list", "table", "inet", "lossy"]);
    assert!(
        !lost.contains("packets 0 "),
        "the loss rule dropped datagrams: {lost}"
    );
    let given = Instant::now();
    let admin = pl.admin.clone();
    let o = pl.apply_with(1, POLICY_ALLOW_ALL, &admin);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let serial = pl.serial(1);
    revoke_through(&pl, "s10", 5);
    let reached = |pl: &PolicyLab| {
        (1..=9).all(|i| {
            let st = pl.lab.status(&pl.node(i).ifname);
            st["policy"]["serial"].as_u64() == Some(serial)
                && !st["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["identity"] == "example.org/microblog/s10")
        })
    };
    while !reached(&pl) {
        assert!(
            given.elapsed() < Duration::from_secs(10),
            "the set and the revocation did not reach every node within 10 s at 20% loss: serials {:?}, s10 held by {:?}",
            (1..=9).map(|i| pl.serial(i)).collect::<Vec<_>>(),
            (1..=9)
                .filter(|i| pl.lab.status(&pl.node(*i).ifname)["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["identity"] == "example.org/microblog/s10"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "at 20% loss: set and revocation everywhere in {:?}",
        given.elapsed()
    );
}

/// Drops every control datagram (they start with `MSHP`) arriving in a namespace, and nothing
/// else: WireGuard's handshakes and data still pass.
const NO_CONTROL_RULES: &str = "table inet nocontrol {
  chain in {
    type filter hook input priority -400; policy accept;
    udp dport 51820 @th,64,32 0x4d534850 counter drop
  }
}
";

const EGRESS_ALL_AND_C_FROM_A: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: egress-all}
spec:
  selector: all()
  egress: [{action: Allow}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: c-from-a}
spec:
  selector: app == 'c'
  ingress: [{action: Allow, source: {selector: app == 'a'}}]
";

const C_FROM_B: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: c-from-b}
spec:
  selector: app == 'c'
  ingress: [{action: Allow, source: {selector: app == 'b'}}]
";

#[test]
fn a_node_killed_while_a_set_spreads_enforces_its_last_good_set_at_once_then_catches_up() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let mut pl = policy_lab(
        &[("a", &["app=a"]), ("b", &["app=b"]), ("c", &["app=c"])],
        &[],
    );
    let first = pl.apply(1, EGRESS_ALL_AND_C_FROM_A);
    assert!(pl
        .lab
        .ping_until(&pl.node(1).ns, &pl.node(3).ip, Duration::from_secs(10)));
    assert!(!pl.lab.ping(&pl.node(2).ns, &pl.node(3).ip, 1), "b may not");
    // Node c hears no control message from now on (its tunnels still work), a set that also
    // lets b in is applied on a, and c is killed -9 while a offers it.
    let (ns3, if3, cfg3) = (
        pl.node(3).ns.clone(),
        pl.node(3).ifname.clone(),
        pl.node(3).config.clone(),
    );
    let rules = pl.lab.dir.join("nocontrol.nft");
    std::fs::write(&rules, NO_CONTROL_RULES).unwrap();
    pl.lab
        .exec_ok(&ns3, &["nft", "-f", rules.to_str().unwrap()]);
    let admin = pl.admin.clone();
    let o = pl.apply_with(
        1,
        &format!("{EGRESS_ALL_AND_C_FROM_A}---\n{C_FROM_B}"),
        &admin,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let second = pl.serial(1);
    assert!(second > first);
    pl.lab.stop(&if3, libc::SIGKILL);
    pl.lab.meshd_config(&ns3, &if3, &cfg3);
    // At once, from its state directory: the last good set, enforced.
    assert_eq!(
        pl.serial(3),
        first,
        "the restarted node enforces its last good set at once"
    );
    assert!(pl
        .lab
        .ping_until(&pl.node(1).ns, &pl.node(3).ip, Duration::from_secs(10)));
    let denied = pl.peer_drops(3, "policy_denied_ingress");
    assert!(!pl.lab.ping(&pl.node(2).ns, &pl.node(3).ip, 2));
    assert!(
        pl.peer_drops(3, "policy_denied_ingress") > denied,
        "c's ingress (the set it had) refused b; nothing else did"
    );
    let cut = pl
        .lab
        .exec_ok(&ns3, &["nft", "list", "table", "inet", "nocontrol"]);
    assert!(!cut.contains("packets 0 "), "control was cut: {cut}");
    // Then it catches up once it hears the mesh again.
    pl.lab
        .exec_ok(&ns3, &["nft", "delete", "table", "inet", "nocontrol"]);
    let heard = Instant::now();
    while pl.serial(3) != second {
        assert!(
            heard.elapsed() < Duration::from_secs(10),
            "the restarted node did not catch up within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("caught up {:?} after hearing the mesh", heard.elapsed());
    assert!(pl
        .lab
        .ping_until(&pl.node(2).ns, &pl.node(3).ip, Duration::from_secs(5)));
}

#[test]
fn after_a_30_s_partition_both_halves_converge_on_the_newest_set_and_the_revocation() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let names: Vec<String> = (1..=8).map(|i| format!("h{i}")).collect();
    let labels: Vec<String> = names.iter().map(|n| format!("app={n}")).collect();
    let ids: Vec<(&str, Vec<&str>)> = names
        .iter()
        .zip(&labels)
        .map(|(n, l)| (n.as_str(), vec![l.as_str()]))
        .collect();
    let ids: Vec<(&str, &[&str])> = ids.iter().map(|(n, l)| (*n, l.as_slice())).collect();
    let mut pl = policy_lab(&ids, &[]);
    let old = pl.apply(1, POLICY_ALLOW_ALL);
    // Nodes 1-4 and 5-8 stop hearing each other.
    let side = |i: usize| usize::from(i > 4);
    for i in 1..=8 {
        let others: Vec<String> = (1..=8)
            .filter(|j| side(*j) != side(i))
            .map(|j| format!("198.18.2.{j}"))
            .collect();
        let rules = format!(
            "table inet partition {{\n  chain in {{\n    type filter hook input priority -400; policy accept;\n    ip saddr {{ {} }} counter drop\n  }}\n}}\n",
            others.join(", ")
        );
        let file = pl.lab.dir.join(format!("partition-{i}.nft"));
        std::fs::write(&file, rules).unwrap();
        pl.lab
            .exec_ok(&pl.node(i).ns, &["nft", "-f", file.to_str().unwrap()]);
    }
    let parted = Instant::now();
    // A new set on one side, a revocation (of h8) on the other.
    let admin = pl.admin.clone();
    let o = pl.apply_with(
        2,
        &POLICY_ALLOW_ALL.replace("name: open", "name: open-2"),
        &admin,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let newest = pl.serial(2);
    revoke_through(&pl, "h8", 6);
    let has_h8 = |pl: &PolicyLab, i: usize| {
        pl.lab.status(&pl.node(i).ifname)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["identity"] == "example.org/microblog/h8")
    };
    std::thread::sleep(Duration::from_secs(30).saturating_sub(parted.elapsed()));
    // The partition held: each side has only its own news.
    assert!((1..=4).all(|i| pl.serial(i) == newest && has_h8(&pl, i)));
    assert!((5..=7).all(|i| pl.serial(i) == old && !has_h8(&pl, i)));
    for i in 1..=8 {
        pl.lab.exec_ok(
            &pl.node(i).ns,
            &["nft", "delete", "table", "inet", "partition"],
        );
    }
    let healed = Instant::now();
    while !(1..=7).all(|i| pl.serial(i) == newest && !has_h8(&pl, i)) {
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "the halves did not converge within 10 s of healing: serials {:?}, h8 held by {:?}",
            (1..=7).map(|i| pl.serial(i)).collect::<Vec<_>>(),
            (1..=7).filter(|i| has_h8(&pl, *i)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("converged {:?} after healing", healed.elapsed());
    // Nothing older wins later either.
    std::thread::sleep(Duration::from_secs(3));
    assert!((1..=7).all(|i| pl.serial(i) == newest && !has_h8(&pl, i)));
}

/// The sealed control datagrams (type 3) node `from` sent node `to` in a capture taken on `to`'s
/// underlay link: UDP payloads, in order.
fn sealed_between(frames: &[Vec<u8>], from: [u8; 4], to: [u8; 4]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| {
            f.len() > 42 + 6
                && f[12..14] == [0x08, 0x00]
                && f[23] == 17
                && f[26..30] == from
                && f[30..34] == to
                && f[36..38] == 51820u16.to_be_bytes()
                && &f[42..46] == b"MSHP"
                && f[47] == 3
        })
        .map(|f| f[42..].to_vec())
        .collect()
}

#[test]
fn control_datagrams_captured_before_a_restart_are_refused_after_it_from_any_address() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let mut pl = policy_lab(
        &[("a", &["app=a"]), ("b", &["app=b"]), ("c", &["app=c"])],
        &[],
    );
    pl.apply(1, POLICY_ALLOW_ALL);
    // An observer of the underlay records what node 1 sends node 2 for a while.
    let ns2 = pl.node(2).ns.clone();
    let cap = pl.lab.capture(&ns2, "u0");
    let admin = pl.admin.clone();
    let o = pl.apply_with(
        1,
        &POLICY_ALLOW_ALL.replace("name: open", "name: open-2"),
        &admin,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_secs(7));
    let captured = sealed_between(&cap.finish(), [198, 18, 2, 1], [198, 18, 2, 2]);
    assert!(
        captured.len() >= 3,
        "captured {} sealed datagrams",
        captured.len()
    );
    let attacker = pl.lab.host("rp");
    pl.lab.attach(&pl.sw, &attacker, "198.18.2.77/24");
    // Node 2 restarts; at once, before node 1 speaks to it again (its replay windows hold only
    // the floors it saved), the attacker replays every datagram from its own address, where it
    // can receive: it answers each cookie reply by sending the datagram again with the cookie,
    // as node 1 would.
    let (if2, cfg2) = (pl.node(2).ifname.clone(), pl.node(2).config.clone());
    pl.lab.stop(&if2, libc::SIGTERM);
    pl.lab.meshd_config(&ns2, &if2, &cfg2);
    let replays = |pl: &PolicyLab| {
        pl.lab.status(&if2)["control"]["refused"]["replay"]
            .as_u64()
            .unwrap_or(0)
    };
    let n = captured.len();
    let sent = in_netns(&attacker, move || {
        let s = std::net::UdpSocket::bind("198.18.2.77:51820").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 2048];
        let mut repeated = 0;
        for d in &captured {
            s.send_to(d, "198.18.2.2:51820").unwrap();
            // A cookie reply: header (6), the echoed MAC (16), the cookie (16).
            if let Ok((38, _)) = s.recv_from(&mut buf) {
                let mut again = d.clone();
                let len = again.len();
                again[len - 16..].copy_from_slice(&buf[22..38]);
                s.send_to(&again, "198.18.2.2:51820").unwrap();
                repeated += 1;
            }
        }
        repeated
    })
    .join()
    .unwrap();
    assert!(sent > 0, "node 2 answered the replays with cookies");
    std::thread::sleep(Duration::from_millis(500));
    let refused = replays(&pl);
    assert!(
        refused as usize >= sent.min(n),
        "{refused} of {sent} replays shown with a cookie were refused as replays"
    );
    // Nothing moved: node 2 still reaches node 1 where node 1 is.
    let st = pl.lab.status(&if2);
    let peer1 = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["identity"] == "example.org/microblog/a")
        .expect("node 1 is still a member")
        .clone();
    assert_eq!(peer1["endpoint"], "198.18.2.1:51820", "{peer1}");
    assert!(pl.lab.ping(&pl.node(2).ns, &pl.node(1).ip, 2));
}
