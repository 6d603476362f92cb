//! The cases of the dataplane tests; `dataplane.rs` runs them with offloads on (where the kernel
//! has them) and `dataplane_offloads_off.rs` with offloads forced off, so both paths stay tested.

use mesh_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MB: u64 = 1 << 20;

/// A lab whose meshd daemons run with offloads as the including test target says.
fn lab() -> Lab {
    let mut lab = Lab::new();
    lab.env
        .push(("MESHD_OFFLOADS".into(), super::OFFLOADS.into()));
    lab
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn two_meshd_nodes_ping_and_carry_50mb_each_way_byte_for_byte() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 3), "IPv4 ping a->b");
    assert!(lab.ping(&p.b, "100.64.0.1", 3), "IPv4 ping b->a");
    assert!(lab.ping(&p.a, "fd00::2", 3), "IPv6 ping a->b");
    tcp_transfer(&p.a, &p.b, addr("100.64.0.2:5001"), 50 * MB);
    tcp_transfer(&p.b, &p.a, addr("[fd00::1]:5002"), 50 * MB);
    assert!(lab.alive(&p.ia) && lab.alive(&p.ib));
}

#[test]
fn ipv6_underlay_carries_the_overlay() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::with_endpoints(&mut lab, Impl::Meshd, "fd01::1", "fd01::2");
    assert!(lab.ping(&p.a, "100.64.0.2", 3));
    tcp_transfer(&p.b, &p.a, addr("100.64.0.1:5003"), 5 * MB);
    let peers = wg_dump_peers(&p.ia);
    assert_eq!(
        peers[0][2], "[fd01::2]:51821",
        "endpoint is the IPv6 underlay address"
    );
}

#[test]
fn wireguard_go_interoperates_with_handshakes_from_each_side() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::WireguardGo);
    // meshd initiates.
    assert!(
        lab.ping(&p.a, "100.64.0.2", 3),
        "ping meshd -> wireguard-go"
    );
    tcp_transfer(&p.a, &p.b, addr("100.64.0.2:5001"), 10 * MB);
    tcp_transfer(&p.b, &p.a, addr("100.64.0.1:5002"), 10 * MB);
    assert!(
        lab.log(&p.ib).contains("Received handshake initiation"),
        "wireguard-go answered meshd's handshake"
    );

    // Forget the sessions on both sides, then let wireguard-go initiate.
    wg(&["set", &p.ia, "peer", &p.pub_b, "remove"]);
    wg(&["set", &p.ib, "peer", &p.pub_a, "remove"]);
    wg(&[
        "set",
        &p.ia,
        "peer",
        &p.pub_b,
        "endpoint",
        "198.18.0.2:51821",
        "allowed-ips",
        "100.64.0.2/32",
    ]);
    wg(&[
        "set",
        &p.ib,
        "peer",
        &p.pub_a,
        "endpoint",
        "198.18.0.1:51820",
        "allowed-ips",
        "100.64.0.1/32",
    ]);
    assert!(
        lab.ping(&p.b, "100.64.0.1", 3),
        "ping wireguard-go -> meshd"
    );
    assert!(
        lab.log(&p.ib).contains("Sending handshake initiation"),
        "wireguard-go initiated"
    );
    tcp_transfer(&p.b, &p.a, addr("100.64.0.1:5003"), 10 * MB);
    tcp_transfer(&p.a, &p.b, addr("100.64.0.2:5004"), 10 * MB);
}

#[test]
fn wg_show_reports_peer_endpoint_handshake_and_growing_counters() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 2));
    let before = wg_dump_peers(&p.ia);
    assert_eq!(before.len(), 1);
    let peer = &before[0];
    assert_eq!(peer[0], p.pub_b);
    assert_eq!(peer[2], "198.18.0.2:51821");
    assert_eq!(peer[3], "100.64.0.2/32,fd00::2/128");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hs: u64 = peer[4].parse().unwrap();
    assert!(
        now.abs_diff(hs) < 30,
        "latest handshake {hs} is recent (now {now})"
    );
    let (rx0, tx0): (u64, u64) = (peer[5].parse().unwrap(), peer[6].parse().unwrap());
    assert!(rx0 > 0 && tx0 > 0);

    tcp_transfer(&p.a, &p.b, addr("100.64.0.2:5001"), 2 * MB);
    let after = &wg_dump_peers(&p.ia)[0];
    let (rx1, tx1): (u64, u64) = (after[5].parse().unwrap(), after[6].parse().unwrap());
    assert!(
        tx1 >= tx0 + 2 * MB,
        "tx grew by the transfer: {tx0} -> {tx1}"
    );
    assert!(rx1 > rx0, "rx grew: {rx0} -> {rx1}");

    let show = wg(&["show", &p.ia]);
    for want in [
        format!("interface: {}", p.ia),
        format!("peer: {}", p.pub_b),
        "endpoint: 198.18.0.2:51821".into(),
        "latest handshake:".into(),
        "transfer:".into(),
    ] {
        assert!(show.contains(&want), "`wg show` lacks {want:?}:\n{show}");
    }
    let status = lab.status(&p.ia);
    assert_eq!(status["peers"][0]["public_key"], p.pub_b.as_str());
    assert!(status["peers"][0]["handshake_age_secs"].as_u64().unwrap() < 30);
}

#[test]
fn removing_a_peer_or_replacing_allowed_ips_takes_effect_at_once() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 2));
    wg(&[
        "set",
        &p.ia,
        "peer",
        &p.pub_b,
        "allowed-ips",
        "100.64.0.3/32",
    ]);
    assert!(
        !lab.ping(&p.a, "100.64.0.2", 2),
        "no route once the allowed IP is replaced"
    );
    let st = lab.status(&p.ia);
    assert!(st["drops"]["no_route"].as_u64().unwrap_or(0) >= 2, "{st}");
    wg(&[
        "set",
        &p.ia,
        "peer",
        &p.pub_b,
        "allowed-ips",
        "100.64.0.2/32",
    ]);
    assert!(lab.ping(&p.a, "100.64.0.2", 2));
    wg(&["set", &p.ia, "peer", &p.pub_b, "remove"]);
    assert!(wg_dump_peers(&p.ia).is_empty());
    assert!(
        !lab.ping(&p.a, "100.64.0.2", 2),
        "no traffic once the peer is removed"
    );
}

#[test]
fn underlay_capture_holds_only_wireguard_messages_never_the_plaintext() {
    if !can_run() {
        return;
    }
    const CANARY: &[u8] = b"MESHD-PLAINTEXT-CANARY-0123456789-the-quick-brown-fox-";
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 1));
    let cap = lab.capture(&p.a, &p.veth_a);
    let target = addr("100.64.0.2:5001");
    let sink = tcp_sink(&p.b, target, 4 * MB, Some(CANARY));
    tcp_send(&p.a, target, 4 * MB, Some(CANARY), Duration::ZERO).expect("send canary");
    assert_eq!(sink.join().unwrap(), Ok(4 * MB));
    let frames = cap.finish();

    let mut wireguard = 0;
    for f in &frames {
        assert!(
            !f.windows(CANARY.len()).any(|w| w == CANARY),
            "plaintext seen on the underlay"
        );
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let (proto, l4) = match ethertype {
            0x0806 => continue, // ARP: link-layer housekeeping, not IP traffic
            0x0800 => (f[14 + 9], 14 + usize::from(f[14] & 0x0f) * 4),
            0x86dd => (f[14 + 6], 14 + 40),
            other => panic!("unexpected ethertype {other:#x}"),
        };
        // Link housekeeping the kernel sends for a new link, up to seconds
        // after it is up: neighbour discovery, and IGMP and MLD reports to
        // link-local multicast (MLD rides behind a hop-by-hop header).
        // The canary check above still covers these frames.
        let multicast = match ethertype {
            0x0800 => f[14 + 16] & 0xf0 == 0xe0,
            _ => f[14 + 24] == 0xff,
        };
        if multicast || (ethertype == 0x86dd && proto == 58) || (ethertype == 0x0800 && proto == 2)
        {
            continue;
        }
        assert_eq!(proto, 17, "only UDP crosses the underlay (frame {f:02x?})");
        let ports = [
            u16::from_be_bytes([f[l4], f[l4 + 1]]),
            u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
        ];
        assert!(
            ports.contains(&PORT_A) && ports.contains(&PORT_B),
            "UDP between the WireGuard ports"
        );
        let msg = &f[l4 + 8..];
        assert!(
            (1..=4).contains(&msg[0]) && msg[1..4] == [0, 0, 0],
            "a WireGuard message"
        );
        wireguard += 1;
    }
    assert!(
        wireguard > 1000,
        "the transfer crossed the capture ({wireguard} messages)"
    );
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped_and_counted() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    // b may send to all of 100.64.0.0/24, but a accepts only 100.64.0.2 from b.
    wg(&[
        "set",
        &p.ib,
        "peer",
        &p.pub_a,
        "allowed-ips",
        "100.64.0.0/24",
    ]);
    sh(&[
        "ip",
        "-n",
        &p.b,
        "addr",
        "add",
        "100.64.0.99/32",
        "dev",
        &p.ib,
    ]);
    assert!(
        lab.ping(&p.b, "100.64.0.1", 2),
        "the allowed source still gets through"
    );
    assert!(!lab
        .exec(
            &p.b,
            &[
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "100.64.0.99",
                "100.64.0.1"
            ]
        )
        .status
        .success());
    let st = lab.status(&p.ia);
    let dropped = st["peers"][0]["drops"]["source_not_allowed"]
        .as_u64()
        .unwrap_or(0);
    assert!(dropped >= 3, "drops counted in meshctl status: {st}");
    let table = sh(&[bin("meshctl").to_str().unwrap(), "status", &p.ia]);
    assert!(table.contains("source_not_allowed=3"), "{table}");
}

#[test]
fn roaming_peer_keeps_a_flow_going_without_reconfiguration() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.b, "100.64.0.1", 1));
    let target = addr("100.64.0.1:5001");
    let total = 24 * MB;
    let sink = tcp_sink(&p.a, target, total, None);
    let (b, veth_b) = (p.b.clone(), p.veth_b.clone());
    let sender =
        std::thread::spawn(move || tcp_send(&b, target, total, None, Duration::from_millis(25)));
    std::thread::sleep(Duration::from_millis(1500));
    // b's underlay address changes mid-flow; nobody tells a.
    sh(&[
        "ip",
        "-n",
        &p.b,
        "addr",
        "del",
        "198.18.0.2/24",
        "dev",
        &veth_b,
    ]);
    sh(&[
        "ip",
        "-n",
        &p.b,
        "addr",
        "add",
        "198.18.0.3/24",
        "dev",
        &veth_b,
        "nodad",
    ]);
    let sent = sender.join().unwrap();
    let received = sink.join().unwrap();
    assert!(sent.is_ok(), "sender: {sent:?}, receiver: {received:?}");
    assert_eq!(received, Ok(total), "the flow completed byte for byte");
    assert_eq!(
        wg_dump_peers(&p.ia)[0][2],
        "198.18.0.3:51821",
        "a follows b to its new address"
    );
    assert!(
        lab.ping(&p.a, "100.64.0.2", 2),
        "a reaches b at its new address"
    );
}

#[test]
fn malformed_datagrams_are_dropped_and_the_daemon_keeps_forwarding() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 1));
    let sent = in_netns(&p.b, || {
        let s = std::net::UdpSocket::bind("198.18.0.2:0").unwrap();
        let to = "198.18.0.1:51820";
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut count = 0;
        for i in 0..3000u64 {
            let len = match i % 6 {
                0 => 0,                             // empty
                1 => 1 + (next() % 147) as usize,   // truncated handshake
                2 => 148,                           // handshake-sized garbage
                3 => 32 + (next() % 1400) as usize, // data-shaped garbage
                4 => 60_000,                        // oversized
                _ => 1 + (next() % 2000) as usize,  // anything
            };
            let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if !d.is_empty() && i % 6 != 5 {
                d[0] = match i % 6 {
                    1 | 2 => 1,
                    3 | 4 => 4,
                    _ => 9,
                };
                for b in d.iter_mut().skip(1).take(3) {
                    *b = 0;
                }
            }
            if i % 12 == 5 && !d.is_empty() {
                d[0] = 7; // wrong type
            }
            if s.send_to(&d, to).is_ok() {
                count += 1;
            }
        }
        count
    })
    .join()
    .unwrap();
    assert!(sent > 2500);
    std::thread::sleep(Duration::from_millis(300));
    assert!(lab.alive(&p.ia), "meshd survived: {}", lab.log(&p.ia));
    assert!(lab.ping(&p.a, "100.64.0.2", 3), "traffic still flows");
    tcp_transfer(&p.b, &p.a, addr("100.64.0.1:5001"), 2 * MB);
    let st = lab.status(&p.ia);
    let drops = &st["drops"];
    let total: u64 = drops
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_u64())
        .sum();
    assert!(total >= 2000, "the garbage is counted: {st}");
    assert!(
        drops["malformed_datagram"].as_u64().unwrap_or(0) > 0,
        "{st}"
    );
}

#[test]
fn sigterm_removes_the_interface_and_the_sockets() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let ns = lab.host("a");
    let ifname = lab.name("wa");
    lab.meshd(&ns, &ifname);
    assert!(lab
        .exec(&ns, &["ip", "link", "show", &ifname])
        .status
        .success());
    let status = lab.stop(&ifname, libc::SIGTERM);
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        !lab.exec(&ns, &["ip", "link", "show", &ifname])
            .status
            .success(),
        "interface removed"
    );
    assert!(!std::path::Path::new(&format!("/var/run/wireguard/{ifname}.sock")).exists());
    assert!(!std::path::Path::new(&format!("/var/run/meshd/{ifname}.sock")).exists());
}

#[test]
fn wg_setconf_replaces_the_configuration() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 1));
    let (_, stranger) = keypair(&lab, "stranger");
    let private = std::fs::read_to_string(&p.key_a).unwrap();
    let conf = lab.dir.join("a.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 198.18.0.2:51821\nAllowedIPs = 100.64.0.2/32\n\n\
             [Peer]\nPublicKey = {stranger}\nAllowedIPs = 100.64.0.50/32\nPersistentKeepalive = 15\n",
            private.trim(),
            p.pub_b
        ),
    )
    .unwrap();
    wg(&["setconf", &p.ia, conf.to_str().unwrap()]);
    let peers = wg_dump_peers(&p.ia);
    assert_eq!(peers.len(), 2, "{peers:?}");
    let s = peers
        .iter()
        .find(|l| l[0] == stranger)
        .expect("the new peer");
    assert_eq!((s[3].as_str(), s[7].as_str()), ("100.64.0.50/32", "15"));
    let b = peers.iter().find(|l| l[0] == p.pub_b).expect("b kept");
    assert_eq!(
        b[3], "100.64.0.2/32",
        "fd00::2 gone: setconf replaced the allowed IPs"
    );
    assert!(
        lab.ping(&p.a, "100.64.0.2", 3),
        "traffic flows under the new configuration"
    );
    assert!(
        !lab.ping(&p.a, "fd00::2", 1),
        "the removed allowed IP no longer routes"
    );
    let shown = wg(&["showconf", &p.ia]);
    assert!(
        shown.contains(&stranger) && shown.contains("ListenPort = 51820"),
        "{shown}"
    );
}

#[test]
fn persistent_keepalive_handshakes_and_keeps_the_path_warm_without_traffic() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    // No traffic at all: only b's timers can make a handshake happen.
    wg(&["set", &p.ib, "peer", &p.pub_a, "persistent-keepalive", "1"]);
    std::thread::sleep(Duration::from_millis(2500));
    let first = &wg_dump_peers(&p.ia)[0];
    assert_ne!(
        first[4], "0",
        "a handshake happened, initiated by the keepalive timer: {first:?}"
    );
    let rx0: u64 = first[5].parse().unwrap();
    std::thread::sleep(Duration::from_millis(3200));
    let rx1: u64 = wg_dump_peers(&p.ia)[0][5].parse().unwrap();
    assert!(
        rx1 >= rx0 + 2 * 32,
        "keepalives (32 bytes each) arrive every second: {rx0} -> {rx1}"
    );
}

/// MAC1 of a handshake message for the responder `responder_pub` (WireGuard paper section 5.4.4).
fn mac1(responder_pub: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    use blake2::digest::{Digest, Mac};
    let mut h = blake2::Blake2s256::new();
    h.update(b"mac1----");
    h.update(responder_pub);
    let key = h.finalize();
    let mut m = blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().into()
}

#[test]
fn a_handshake_flood_is_answered_with_cookies_and_the_tunnel_survives() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 1));
    let responder = proto::Key::from_base64(&p.pub_a).unwrap().0;
    let cookies = in_netns(&p.b, move || {
        let s = std::net::UdpSocket::bind("198.18.0.2:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for i in 0..600u32 {
            // A well-formed initiation with a valid MAC1 from a static key a does not know.
            let mut m = [0u8; 148];
            m[0] = 1;
            m[4..8].copy_from_slice(&i.to_le_bytes());
            for (k, b) in m[8..116].iter_mut().enumerate() {
                *b = pattern(u64::from(i) * 1000 + k as u64);
            }
            let mac = mac1(&responder, &m[..116]);
            m[116..132].copy_from_slice(&mac);
            s.send_to(&m, "198.18.0.1:51820").unwrap();
        }
        let mut buf = [0u8; 256];
        let mut cookies = 0;
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            if n == 64 && buf[0] == 3 {
                cookies += 1;
            }
        }
        cookies
    })
    .join()
    .unwrap();
    assert!(cookies > 0, "meshd under load answers with cookie replies");
    let st = lab.status(&p.ia);
    assert!(
        st["drops"]["under_load_cookie_sent"].as_u64().unwrap_or(0) > 0,
        "{st}"
    );
    assert!(
        st["drops"]["handshake_failed"].as_u64().unwrap_or(0) > 0,
        "{st}"
    );
    assert!(lab.alive(&p.ia));
    assert!(
        lab.ping_until(&p.a, "100.64.0.2", Duration::from_secs(10)),
        "the real peer still gets through"
    );
}

#[test]
fn meshctl_keys_are_interchangeable_with_wg() {
    if !can_run() {
        return;
    }
    let meshctl = bin("meshctl");
    let pipe = |cmd: &str, input: &str| -> String {
        use std::io::Write;
        let mut parts = cmd.split(' ');
        let prog = parts.next().unwrap();
        let prog = if prog == "meshctl" {
            meshctl.to_str().unwrap()
        } else {
            prog
        };
        let mut c = std::process::Command::new(prog)
            .args(parts)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{cmd}");
        String::from_utf8(out.stdout).unwrap()
    };
    let ours = pipe("meshctl genkey", "");
    assert_eq!(pipe("wg pubkey", &ours), pipe("meshctl pubkey", &ours));
    let theirs = sh(&["wg", "genkey"]);
    assert_eq!(pipe("wg pubkey", &theirs), pipe("meshctl pubkey", &theirs));
    let bad = std::process::Command::new(&meshctl)
        .arg("pubkey")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "an empty key is an input error");
}

/// What `status` says of a node's data path: (send allocations, receive allocations).
fn datapath_allocations(lab: &Lab, ifname: &str) -> (u64, u64) {
    let s = lab.status(ifname);
    let d = &s["datapath"];
    (
        d["send_allocations"].as_u64().expect("send_allocations"),
        d["receive_allocations"]
            .as_u64()
            .expect("receive_allocations"),
    )
}

#[test]
fn offloads_are_used_as_asked_and_reported() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 1));
    let s = lab.status(&p.ia);
    let d = &s["datapath"];
    let (tun, gso) = (
        d["tun_offloads"].as_str().unwrap(),
        d["udp_gso"].as_bool().unwrap(),
    );
    if super::OFFLOADS == "on" {
        // This kernel (6.x) has all of them; an older one would say which it refused.
        assert_eq!(tun, "vnet header on, TSO on, USO on");
        assert!(gso, "UDP GSO");
    } else {
        assert_eq!(tun, "vnet header off, TSO off, USO off");
        assert!(!gso, "UDP GSO");
    }
    let log = std::fs::read_to_string(lab.dir.join(format!("{}.log", p.ia))).unwrap();
    assert!(
        log.contains(tun),
        "the log says which offloads are in use: {log}"
    );

    // A TCP transfer: with offloads, the sender reads super-packets and the receiver writes
    // joined segments; without, one packet per read and per write.
    tcp_transfer(&p.a, &p.b, addr("100.64.0.2:5011"), 16 * MB);
    let tun_io = |ifname: &str, n: &str, d: &str| {
        let s = lab.status(ifname);
        let count = |k: &str| s["datapath"][k].as_u64().expect(k);
        (count(n), count(d))
    };
    let (segments, reads) = tun_io(&p.ia, "tun_read_segments", "tun_reads");
    let (packets, writes) = tun_io(&p.ib, "tun_written_packets", "tun_writes");
    assert!(reads > 0 && writes > 0, "{reads} reads, {writes} writes");
    let (per_read, per_write) = (
        segments as f64 / reads as f64,
        packets as f64 / writes as f64,
    );
    if super::OFFLOADS == "on" {
        assert!(per_read > 2.0, "{per_read:.1} segments per TUN read");
        assert!(per_write > 2.0, "{per_write:.1} packets per TUN write");
    } else {
        assert_eq!(segments, reads, "one segment per read");
        assert_eq!(packets, writes, "one packet per write");
    }
}

#[test]
fn the_data_path_allocates_nothing_per_packet() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    // Sessions up and every buffer made, both ways.
    assert!(lab.ping(&p.a, "100.64.0.2", 2));
    tcp_transfer(&p.a, &p.b, addr("100.64.0.2:5010"), 4 * MB);
    let (send_a, _) = datapath_allocations(&lab, &p.ia);
    let (_, receive_b) = datapath_allocations(&lab, &p.ib);
    // The counters count: each thread's buffers, made once at its start, are in them.
    assert!(
        send_a >= 4 && receive_b >= 4,
        "buffers counted: {send_a}, {receive_b}"
    );
    let rx_b = |lab: &Lab| {
        lab.status(&p.ib)["peers"][0]["rx_packets"]
            .as_u64()
            .unwrap()
    };
    let before = rx_b(&lab);
    // 160 MiB: at least 100,000 segments of at most 1,380 bytes through encrypt and decrypt.
    tcp_transfer(&p.a, &p.b, addr("100.64.0.2:5011"), 160 * MB);
    let packets = rx_b(&lab) - before;
    assert!(packets >= 100_000, "only {packets} datagrams crossed");
    let (send_a2, _) = datapath_allocations(&lab, &p.ia);
    let (_, receive_b2) = datapath_allocations(&lab, &p.ib);
    // A few are allowed for what is not per packet (a rekey, a log line); none per packet.
    eprintln!(
        "{packets} datagrams: {} allocations to send, {} to receive",
        send_a2 - send_a,
        receive_b2 - receive_b
    );
    assert!(
        send_a2 - send_a < 100 && receive_b2 - receive_b < 100,
        "{packets} packets took {} allocations to send and {} to receive",
        send_a2 - send_a,
        receive_b2 - receive_b
    );
}

#[test]
fn udp_bursts_arrive_as_the_datagrams_that_were_sent_in_order() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 1));
    udp_bursts(&p, 3000, 1200);
}

#[test]
fn fragmented_udp_datagrams_arrive_whole_and_in_order() {
    if !can_run() {
        return;
    }
    let mut lab = lab();
    let p = Pair::new(&mut lab, Impl::Meshd);
    assert!(lab.ping(&p.a, "100.64.0.2", 1));
    let tun_io = |lab: &Lab| {
        let s = lab.status(&p.ib);
        let count = |k: &str| s["datapath"][k].as_u64().expect(k);
        (count("tun_writes"), count("tun_written_packets"))
    };
    let before = tun_io(&lab);
    // iperf3's 1,400 bytes over the 1,420-byte MTU (two fragments each), and 4,000 (three).
    udp_bursts(&p, 1000, 1400);
    udp_bursts(&p, 1000, 4000);
    let after = tun_io(&lab);
    let (writes, packets) = (after.0 - before.0, after.1 - before.1);
    assert!(packets >= 4500, "{packets} fragments written");
    if super::OFFLOADS == "on" {
        // The fragments of a datagram are written as the whole datagram.
        assert!(
            writes * 2 < packets,
            "{writes} writes for {packets} fragments"
        );
    } else {
        assert_eq!(writes, packets, "one fragment per write");
    }
}

/// Sends `count` UDP datagrams of `size` bytes from a to b in bursts of 100, and checks that
/// nearly all arrive, each whole and intact, in order.
fn udp_bursts(p: &Pair, count: u32, size: usize) {
    let body = move |seq: u32, i: usize| pattern(u64::from(seq) * size as u64 + i as u64);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sink = in_netns(&p.b, move || {
        let s = std::net::UdpSocket::bind("100.64.0.2:5020").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // Room for whole bursts: the default buffer holds fewer than 100 such datagrams.
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with a pointer to one int and its size, on a socket we own.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        ready_tx.send(()).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < count as usize {
            match s.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) => break,
            }
        }
        got
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    in_netns(&p.a, move || {
        let s = std::net::UdpSocket::bind("100.64.0.1:0").expect("bind");
        let mut d = vec![0u8; size];
        for seq in 0..count {
            d[..4].copy_from_slice(&seq.to_be_bytes());
            for (i, b) in d.iter_mut().enumerate().skip(4) {
                *b = body(seq, i);
            }
            s.send_to(&d, "100.64.0.2:5020").expect("send");
            // Bursts of 100 back to back (what the batches join), then a breath.
            if seq % 100 == 99 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })
    .join()
    .unwrap();
    let got = sink.join().unwrap();
    assert!(
        got.len() >= count as usize * 95 / 100,
        "only {} of {count} arrived",
        got.len()
    );
    let mut last = None;
    for d in &got {
        assert_eq!(
            d.len(),
            size,
            "a datagram arrives whole, never joined or cut"
        );
        let seq = u32::from_be_bytes(d[..4].try_into().unwrap());
        assert!(
            d[4..]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == body(seq, i + 4)),
            "datagram {seq} intact"
        );
        assert!(
            last.is_none_or(|l| seq > l),
            "datagram {seq} after {last:?}: in order"
        );
        last = Some(seq);
    }
}
