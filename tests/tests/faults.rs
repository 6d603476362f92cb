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
        (1..=3).all(|i| pl.serial(i) == serial) && (1..=3).all(|i| pl.peer(i, "d").is_none())
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
    // Every node loses a fifth of what arrives; they still meet (the lab waits for it).
    let mut pl = numbered_policy_lab("s", 10, Fragments::Lossy);
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
    let reached =
        |pl: &PolicyLab| (1..=9).all(|i| pl.serial(i) == serial && pl.peer(i, "s10").is_none());
    while !reached(&pl) {
        assert!(
            given.elapsed() < Duration::from_secs(10),
            "the set and the revocation did not reach every node within 10 s at 20% loss: serials {:?}, s10 held by {:?}",
            (1..=9).map(|i| pl.serial(i)).collect::<Vec<_>>(),
            (1..=9)
                .filter(|i| pl.peer(*i, "s10").is_some())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "at 20% loss: set and revocation everywhere in {:?}",
        given.elapsed()
    );
}

/// Nodes a, b and c, labelled `app=a`, `app=b` and `app=c`.
fn abc_lab() -> PolicyLab {
    policy_lab(
        &[("a", &["app=a"]), ("b", &["app=b"]), ("c", &["app=c"])],
        &[],
    )
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
    let mut pl = abc_lab();
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
    let mut pl = numbered_policy_lab("h", 8, Fragments::Pass);
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
    let has_h8 = |pl: &PolicyLab, i: usize| pl.peer(i, "h8").is_some();
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
    let mut pl = abc_lab();
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
    let peer1 = pl.peer(2, "a").expect("node 1 is still a member");
    assert_eq!(peer1["endpoint"], "198.18.2.1:51820", "{peer1}");
    assert!(pl.lab.ping(&pl.node(2).ns, &pl.node(1).ip, 2));
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (the kernel fills in the checksum and total length of what it sends).
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, id: u16, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// "Host unreachable" from `src` to `dst`, quoting a TCP segment `quoted_src:sport` ->
/// `quoted_dst:dport`.
fn icmp_unreachable(
    src: [u8; 4],
    dst: [u8; 4],
    quoted_src: [u8; 4],
    quoted_dst: [u8; 4],
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut tcp = sport.to_be_bytes().to_vec();
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1]);
    let mut quoted = ipv4(quoted_src, quoted_dst, 6, 7, 0x4000, &tcp);
    quoted[2..4].copy_from_slice(&40u16.to_be_bytes());
    let mut icmp = vec![3, 1, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4(src, dst, 1, 0x1111, 0, &icmp)
}

/// Sends whole IPv4 packets from namespace `ns` through a raw socket.
fn send_raw(ns: &str, packets: Vec<Vec<u8>>) {
    in_netns(ns, move || {
        // SAFETY: a raw socket; IPPROTO_RAW implies that we write the IP header.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        for p in packets {
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(p[16..20].try_into().unwrap()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sending a buffer we own to an address we built.
            let n = unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(n, p.len() as isize, "{}", std::io::Error::last_os_error());
        }
        // SAFETY: closing the socket we opened.
        unsafe { libc::close(fd) };
    })
    .join()
    .unwrap();
}

#[test]
fn a_compromised_member_cannot_deliver_icmp_errors_or_fragments_about_other_members_flows() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let mut pl = abc_lab();
    pl.apply(
        1,
        "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: egress-all}
spec:
  selector: all()
  egress: [{action: Allow}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: a-and-b}
spec:
  selector: \"app in {'a', 'b'}\"
  ingress: [{action: Allow, source: {selector: \"app in {'a', 'b'}\"}}]
",
    );
    let (a, b, c) = ([100, 64, 2, 1], [100, 64, 2, 2], [100, 64, 2, 3]);
    // A TCP connection from a to b, tracked on both nodes.
    let server = in_netns(&pl.node(2).ns, || {
        let l = std::net::TcpListener::bind("100.64.2.2:8080").unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 1];
        use std::io::{Read, Write};
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = in_netns(&pl.node(1).ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &"100.64.2.2:8080".parse().unwrap(),
            Duration::from_secs(5),
        )
        .expect("a reaches b");
        port_tx.send(s.local_addr().unwrap().port()).unwrap();
        let _ = go_rx.recv_timeout(Duration::from_secs(60));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 1];
        s.write_all(b"x").is_ok() && s.read_exact(&mut buf).is_ok() && buf == *b"x"
    });
    let sport = port_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // Node c is compromised: its daemon is gone and a stock WireGuard runs with its key, so
    // nothing on c enforces anything. a still holds c as a member (its certificate is valid).
    let (ns_a, if_a) = (pl.node(1).ns.clone(), pl.node(1).ifname.clone());
    let (ns_c, if_c) = (pl.node(3).ns.clone(), pl.node(3).ifname.clone());
    let pub_a = pl.lab.status(&if_a)["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    pl.lab.stop(&if_c, libc::SIGKILL);
    pl.lab.wireguard_go(&ns_c, &if_c);
    let key_c = pl.pki.dir.join("ids").join("c.key");
    wg(&[
        "set",
        &if_c,
        "private-key",
        key_c.to_str().unwrap(),
        "listen-port",
        "51820",
        "peer",
        &pub_a,
        "endpoint",
        "198.18.2.1:51820",
        "allowed-ips",
        "100.64.2.0/24",
    ]);
    for args in [
        vec!["addr", "add", "100.64.2.3/32", "dev", &if_c],
        vec!["link", "set", &if_c, "up"],
        vec!["route", "add", "100.64.2.0/24", "dev", &if_c],
    ] {
        let mut full = vec!["ip", "-n", &ns_c];
        full.extend(args);
        sh(&full);
    }
    let drops_before = |pl: &PolicyLab, reason: &str| {
        pl.peer(1, "c").expect("a still holds c")["drops"][reason]
            .as_u64()
            .unwrap_or(0)
    };
    // A handshake first: c's pings reach a, whose ingress refuses them. (a takes wireguard-go's
    // handshake only once its TAI64N timestamp passes the last one meshd's boringtun sent, whose
    // epoch is 27 s later: up to half a minute.)
    let tunnel = Instant::now();
    while drops_before(&pl, "policy_denied_ingress") == 0 {
        assert!(
            tunnel.elapsed() < Duration::from_secs(45),
            "c's stock WireGuard never reached a: c: {}; a: {}",
            wg(&["show", &if_c]),
            pl.lab.status(&if_a)["peers"]
        );
        pl.lab.ping(&ns_c, "100.64.2.1", 1);
    }
    eprintln!("c's tunnel to a up after {:?}", tunnel.elapsed());
    let (icmp0, frag0) = (
        drops_before(&pl, "policy_denied_ingress"),
        drops_before(&pl, "policy_fragment_unmatched"),
    );
    let cap = pl.lab.capture(&ns_a, &if_a);
    // c forges an error about a's flow to b, and a later fragment of a datagram never begun.
    send_raw(
        &ns_c,
        vec![
            icmp_unreachable(c, a, a, b, sport, 8080),
            ipv4(c, a, 17, 0x2222, 16, &[0u8; 64]),
        ],
    );
    // b, through whose address the flow runs, may send the same error: it reaches a.
    send_raw(
        &pl.node(2).ns.clone(),
        vec![icmp_unreachable(b, a, a, b, sport, 8080)],
    );
    std::thread::sleep(Duration::from_secs(1));
    let frames = cap.finish();
    let reached = |src: [u8; 4], proto: u8| {
        frames
            .iter()
            .filter(|f| f.len() >= 20 && f[9] == proto && f[12..16] == src)
            .count()
    };
    assert_eq!(reached(b, 1), 1, "b's error about its own flow reached a");
    assert_eq!(reached(c, 1), 0, "c's forged error did not reach a");
    assert_eq!(reached(c, 17), 0, "c's stray fragment did not reach a");
    assert!(drops_before(&pl, "policy_denied_ingress") > icmp0);
    assert!(drops_before(&pl, "policy_fragment_unmatched") > frag0);
    // a's connection to b goes on.
    go_tx.send(()).unwrap();
    assert!(client.join().unwrap(), "a's connection to b still works");
    drop(server);
}

/// Node c's part, played by hand after its daemon stopped: for `secs` seconds on c's address,
/// it opens what arrives with c's key; it passes the offer of serial `after`+ it hears from a on to
/// b as its own, and answers b's requests with zeros. Returns (offers passed on, requests
/// answered).
/// The keys the hostile member c plays with: its own private key, a's and b's public keys.
struct HostileKeys {
    c: [u8; 32],
    a: [u8; 32],
    b: [u8; 32],
}

fn serve_wrong_bytes(
    ns: &str,
    me: std::net::SocketAddr,
    b: std::net::SocketAddr,
    keys: HostileKeys,
    after: u64,
    secs: u64,
) -> std::thread::JoinHandle<(u32, u32)> {
    let HostileKeys {
        c: key_c,
        a: pub_a,
        b: pub_b,
    } = keys;
    use proto::control::{decode, seal_message, Datagram, Message};
    use x25519_dalek::StaticSecret;
    in_netns(ns, move || {
        let s = std::net::UdpSocket::bind(me).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let secret = StaticSecret::from(key_c);
        let mut counter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            + 1_000_000_000;
        let mut send = |msg: &Message| {
            let ds = seal_message(
                &secret,
                &pub_b,
                &StaticSecret::from([0x24; 32]),
                counter,
                &msg.encode(),
            )
            .unwrap();
            counter += ds.len() as u64;
            for d in ds {
                s.send_to(&d, b).unwrap();
            }
        };
        let (mut offered, mut answered, mut offered_length) = (0, 0, 0u32);
        let start = Instant::now();
        let mut buf = [0u8; 65536];
        while start.elapsed() < Duration::from_secs(secs) {
            let Ok((n, _)) = s.recv_from(&mut buf) else {
                continue;
            };
            let Ok(Datagram::Sealed(sealed)) = decode(&buf[..n]) else {
                continue;
            };
            let Ok(opened) = sealed.open(&secret) else {
                continue;
            };
            // One-segment messages: index 0, count 1, then the message.
            if opened.plaintext.len() < 4 || opened.plaintext[..4] != [0, 0, 0, 1] {
                continue;
            }
            match Message::decode(&opened.plaintext[4..]) {
                Ok(offer @ Message::PolicyOffer { serial, length, .. })
                    if opened.sender == pub_a && serial > after =>
                {
                    send(&offer);
                    offered += 1;
                    offered_length = length;
                }
                Ok(Message::PolicyRequest { serial, offset }) if opened.sender == pub_b => {
                    // The real set's length, every byte zero.
                    let length = offered_length;
                    send(&Message::PolicyChunk {
                        serial,
                        offset,
                        length,
                        data: vec![0; (length - offset.min(length)) as usize],
                    });
                    answered += 1;
                }
                _ => {}
            }
        }
        (offered, answered)
    })
}

#[test]
fn a_member_serving_wrong_bytes_does_not_keep_a_node_from_the_new_set() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let mut pl = abc_lab();
    let first = pl.apply(1, POLICY_ALLOW_ALL);
    let key = |pl: &PolicyLab, i: usize| {
        proto::Key::from_base64(
            pl.lab.status(&pl.node(i).ifname)["public_key"]
                .as_str()
                .unwrap(),
        )
        .unwrap()
        .0
    };
    let (pub_a, pub_b) = (key(&pl, 1), key(&pl, 2));
    // b stops hearing a's control messages for now, so that c's word comes first.
    let ns_b = pl.node(2).ns.clone();
    let block = pl.lab.dir.join("block-a.nft");
    std::fs::write(
        &block,
        "table inet blocka {\n  chain in {\n    type filter hook input priority -400; policy accept;\n    ip saddr 198.18.2.1 udp dport 51820 @th,64,32 0x4d534850 counter drop\n  }\n}\n",
    )
    .unwrap();
    pl.lab
        .exec_ok(&ns_b, &["nft", "-f", block.to_str().unwrap()]);
    // c turns hostile: it passes on a's offer of the next set as its own and serves zeros.
    let if_c = pl.node(3).ifname.clone();
    pl.lab.stop(&if_c, libc::SIGKILL);
    let key_c = proto::Key::from_base64(
        std::fs::read_to_string(pl.pki.dir.join("ids").join("c.key"))
            .unwrap()
            .trim(),
    )
    .unwrap()
    .0;
    let hostile = serve_wrong_bytes(
        &pl.node(3).ns.clone(),
        "198.18.2.3:51820".parse().unwrap(),
        "198.18.2.2:51820".parse().unwrap(),
        HostileKeys {
            c: key_c,
            a: pub_a,
            b: pub_b,
        },
        first,
        8,
    );
    let admin = pl.admin.clone();
    let o = pl.apply_with(
        1,
        &POLICY_ALLOW_ALL.replace("name: open", "name: open-2"),
        &admin,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let second = pl.serial(1);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(pl.serial(2), first, "b did not take c's zeros");
    // a is heard again. Its next offer to b (members offer their set to one member in turn every
    // 5 s, and at once to one whose offer names an older set) comes within a few seconds; from
    // then b takes the set from it within 10 s.
    pl.lab
        .exec_ok(&ns_b, &["nft", "delete", "table", "inet", "blocka"]);
    let unblocked = Instant::now();
    let heard_from_a = |pl: &PolicyLab| {
        let out = pl.meshctl(2, &["status", "-o", "json"]);
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["identity"] == "example.org/microblog/a" && n["serial"] == second)
    };
    while !heard_from_a(&pl) && pl.serial(2) != second {
        assert!(
            unblocked.elapsed() < Duration::from_secs(20),
            "a never offered its set to b"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let heard = Instant::now();
    while pl.serial(2) != second {
        assert!(
            heard.elapsed() < Duration::from_secs(10),
            "b did not take the set within 10 s of the honest member offering it"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "a's offer heard {:?} after a was heard again; b took set {second} {:?} after that",
        heard.duration_since(unblocked),
        heard.elapsed()
    );
    let (offered, answered) = hostile.join().unwrap();
    assert!(
        offered >= 1 && answered >= 1,
        "c offered {offered} times and served zeros {answered} times"
    );
}
