//! Seeing and shaping traffic on real meshd nodes: allow-lists suggested from the flows a mesh in
//! audit mode observed, applied in enforce mode.

use mesh_tests::policy_lab::*;
use mesh_tests::traffic::*;
use mesh_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// Every identity may send anything: the sending nodes enforce no limit of their own.
const EGRESS_ALL: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: egress-all
spec:
  selector: all()
  types: [Egress]
  egress:
  - action: Allow
";

/// post lets api and search send UDP to 7000, each source held to 100 packets a second.
const POST_LIMITED: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
  annotations:
    policy.mesh/rate-limit: 'ingress[0]: {packetsPerSecond: 100, packetBurst: 100}'
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: UDP
    source:
      serviceAccounts:
        names: [api, search]
    destination:
      ports: [7000]
";

/// Sends `count` datagrams from `ns` to `to`, one every `gap`, from one socket (one flow).
fn send_udp(
    ns: &str,
    to: std::net::SocketAddr,
    count: usize,
    gap: Duration,
) -> std::thread::JoinHandle<()> {
    in_netns(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let start = Instant::now();
        for i in 0..count {
            let _ = s.send_to(&(i as u32).to_be_bytes(), to);
            // Paced against the clock, so a slow thread catches up instead of stretching.
            let due = start + gap * (i as u32 + 1);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    })
}

#[test]
fn a_flood_from_one_identity_is_held_to_its_limit_on_the_receiver_and_another_is_not_touched() {
    if !can_run() {
        return;
    }
    let names: Vec<String> = ["post", "api", "search"].map(String::from).to_vec();
    let mut pl = labelled_policy_lab(&names, &[], Fragments::Pass);
    pl.apply(1, &format!("{EGRESS_ALL}---\n{POST_LIMITED}"));
    let post = pl.addr(1, 7000);

    // post counts what arrives from each source until 1.5 s of silence.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = in_netns(&pl.node(1).ns, move || {
        let s = std::net::UdpSocket::bind(post).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let _ = ready_tx.send(());
        let mut from = std::collections::BTreeMap::<std::net::IpAddr, usize>::new();
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match s.recv_from(&mut buf) {
                Ok((_, peer)) => *from.entry(peer.ip()).or_default() += 1,
                Err(_) => break,
            }
        }
        from
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // api floods: 3,000 datagrams in 1.5 s (2,000 a second); search sends 100 in 2 s, half its
    // limit, at the same time.
    let started = Instant::now();
    let flood = send_udp(&pl.node(2).ns, post, 3000, Duration::from_micros(500));
    let calm = send_udp(&pl.node(3).ns, post, 100, Duration::from_millis(20));
    flood.join().unwrap();
    calm.join().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let got = receiver.join().unwrap();
    let api: std::net::IpAddr = pl.node(2).ip.parse().unwrap();
    let search: std::net::IpAddr = pl.node(3).ip.parse().unwrap();
    let (from_api, from_search) = (got.get(&api).copied(), got.get(&search).copied());
    assert_eq!(from_search, Some(100), "search is not touched: {got:?}");
    let from_api = from_api.unwrap_or(0);
    // The burst, then 100 a second for as long as the flood lasted (and a margin of one
    // second's worth for the clocks' edges).
    let most = 100 + (100.0 * secs) as usize + 100;
    assert!(
        (100..=most).contains(&from_api),
        "api held to its limit: {from_api} in {secs:.1} s (at most {most})"
    );

    // post counted and logged it; api's node, which enforces no limit, dropped nothing.
    let status = pl.lab.status(&pl.node(1).ifname);
    let limited = status["policy"]["rate_limited_packets"].as_u64().unwrap();
    assert!(limited >= (3000 - most) as u64, "{limited}");
    let per_policy = &status["policy"]["rate_limits"][0];
    assert_eq!(
        per_policy["policy"],
        "NetworkPolicy microblog/post-allow-list"
    );
    assert_eq!(per_policy["direction"], "ingress");
    assert_eq!(pl.peer_drops(1, "rate_limited"), limited);
    assert_eq!(pl.policy_counter(2, "rate_limited_packets"), 0);
    let (code, metrics) = http_get(&pl.node(1).ns, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains(&format!(
            "meshd_policy_rate_limited_packets_total{{direction=\"ingress\",policy=\"NetworkPolicy microblog/post-allow-list\"}} {limited}"
        )),
        "{metrics}"
    );
    let records = pl.flows(1, true);
    assert!(
        records.iter().any(|r| r["verdict"] == "rate-limited"
            && r["event"] == "limited"
            && r["src"]["name"] == "api"),
        "{records:?}"
    );
    assert!(!records
        .iter()
        .any(|r| r["verdict"] == "rate-limited" && r["src"]["name"] == "search"));
}

/// api may send UDP to post: port 7000 held to a burst of 10 packets (and 1 a second), 7001 free.
const API_LIMITED: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: api-sends
  namespace: microblog
  annotations:
    policy.mesh/rate-limit: 'egress[0]: {packetsPerSecond: 1, packetBurst: 10}'
spec:
  selector: app == 'api'
  types: [Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination:
      ports: [7000]
  - action: Allow
    protocol: UDP
    destination:
      ports: [7001]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: UDP
    source:
      serviceAccounts:
        names: [api]
    destination:
      ports: [7000, 7001]
";

/// `UDP_SEGMENT` (linux/udp.h): every send of the socket is cut into datagrams of this size.
const UDP_SEGMENT: libc::c_int = 103;

#[test]
fn a_rate_limited_datagram_inside_a_super_packet_is_dropped_and_counted_alone() {
    if !can_run() {
        return;
    }
    const SEGMENTS: usize = 40;
    const SIZE: usize = 1000;
    let names: Vec<String> = ["post", "api"].map(String::from).to_vec();
    let mut pl = labelled_policy_lab(&names, &[], Fragments::Pass);
    pl.apply(1, API_LIMITED);
    let (limited, free) = (pl.addr(1, 7000), pl.addr(1, 7001));

    // post keeps what arrives on 7000 until a second of silence.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = in_netns(&pl.node(1).ns, move || {
        let s = std::net::UdpSocket::bind(limited).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let mut started = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match s.recv(&mut buf) {
                Ok(n) => {
                    started = true;
                    got.push(buf[..n].to_vec());
                }
                Err(_) if started => break,
                Err(_) => {}
            }
        }
        got
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // The tunnel comes up on the free port, which has no limit.
    assert!(
        udp_reaches(&pl.node(2).ns, &pl.node(1).ns, free),
        "api reaches post on the free port"
    );

    let api = pl.lab.status(&pl.node(2).ifname);
    let before = (
        pl.peer_drops(2, "rate_limited"),
        api["datapath"]["tun_reads"].as_u64().unwrap(),
        api["datapath"]["tun_read_segments"].as_u64().unwrap(),
    );
    // One send of 40 datagrams: with USO on the TUN device, the kernel hands meshd one
    // super-packet; without it, 40 packets.
    in_netns(&pl.node(2).ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let size = SIZE as libc::c_int;
        // SAFETY: setsockopt with a pointer to one int and its size, on a socket we own.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_UDP,
                UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        let mut d = vec![0u8; SEGMENTS * SIZE];
        for (i, chunk) in d.chunks_mut(SIZE).enumerate() {
            chunk.fill(i as u8);
        }
        assert_eq!(s.send_to(&d, limited).unwrap(), d.len());
    })
    .join()
    .unwrap();
    let got = receiver.join().unwrap();

    // The first ten (the burst) arrive whole and in order; the other thirty are dropped, each
    // counted once, on the sending node.
    let seqs: Vec<u8> = got.iter().map(|d| d[0]).collect();
    assert_eq!(seqs, (0..10).collect::<Vec<u8>>(), "what arrived");
    assert!(got
        .iter()
        .all(|d| d.len() == SIZE && d.iter().all(|b| *b == d[0])));
    let api = pl.lab.status(&pl.node(2).ifname);
    let limited_now = pl.peer_drops(2, "rate_limited") - before.0;
    assert_eq!(
        limited_now,
        (SEGMENTS - 10) as u64,
        "rate-limited drops on api"
    );
    assert_eq!(pl.peer_drops(1, "rate_limited"), 0, "post dropped nothing");
    let reads = api["datapath"]["tun_reads"].as_u64().unwrap() - before.1;
    let segments = api["datapath"]["tun_read_segments"].as_u64().unwrap() - before.2;
    assert!(segments >= SEGMENTS as u64, "{segments} segments read");
    // This kernel (6.x) takes USO: the send came as a super-packet, far fewer reads than
    // segments.
    let offloads = api["datapath"]["tun_offloads"].as_str().unwrap();
    assert!(offloads.contains("USO on"), "{offloads}");
    assert!(
        reads * 4 < segments,
        "{reads} reads for {segments} segments: the send came as one super-packet"
    );
}

/// Whether a datagram from `from_ns` reaches `to` in `to_ns`: sent every 100 ms for up to 10 s.
fn udp_reaches(from_ns: &str, to_ns: &str, to: std::net::SocketAddr) -> bool {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sink = in_netns(to_ns, move || {
        let s = std::net::UdpSocket::bind(to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = ready_tx.send(());
        s.recv(&mut [0u8; 64]).is_ok()
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let source = in_netns(from_ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..100 {
            let _ = s.send_to(b"hello", to);
            std::thread::sleep(Duration::from_millis(100));
            if sink.is_finished() {
                break;
            }
        }
        sink.join().unwrap()
    });
    source.join().unwrap()
}

/// Every identity may reach every other on TCP 8080, and nothing else.
const ALLOW_8080: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: allow-8080
spec:
  selector: all()
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: TCP
    destination:
      ports: [8080]
";

/// `meshctl flows --mesh` on node `on`, signed with `key`: its output, as JSON records.
fn mesh_flows(
    pl: &PolicyLab,
    on: usize,
    key: &std::path::Path,
    extra: &[&str],
) -> (bool, Vec<serde_json::Value>, String) {
    let out = Command::new(bin("meshctl"))
        .args([
            "flows",
            "--mesh",
            "-o",
            "json",
            "-i",
            &pl.node(on).ifname,
            "--key",
        ])
        .arg(key)
        .args(extra)
        .output()
        .expect("running meshctl");
    let records = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a record is JSON"))
        .collect();
    (
        out.status.success(),
        records,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn one_admin_query_reads_the_flow_logs_of_five_nodes_and_history_survives_a_restart() {
    if !can_run() {
        return;
    }
    let names: Vec<String> = ["api", "post", "search", "user", "storage"]
        .map(String::from)
        .to_vec();
    let mut pl = labelled_policy_lab(&names, &[], Fragments::Pass);
    pl.apply(1, &format!("{EGRESS_ALL}---\n{ALLOW_8080}"));
    let _servers: Vec<Echo> = (1..=5)
        .map(|i| echo(&pl.node(i).ns, pl.addr(i, 8080)))
        .collect();
    // Each node calls the next on 8080 (allowed) and on 9090 (denied at the receiver).
    for i in 1..=5 {
        let next = i % 5 + 1;
        assert!(
            talks(&pl.node(i).ns, pl.addr(next, 8080), QUICK),
            "{i} -> {next}"
        );
        assert!(!talks(
            &pl.node(i).ns,
            pl.addr(next, 9090),
            Duration::from_millis(300)
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    let admin = pl.admin.clone();
    let (ok, records, err) = mesh_flows(&pl, 1, &admin, &[]);
    assert!(ok, "{err}");
    let nodes: std::collections::BTreeSet<String> = records
        .iter()
        .filter_map(|r| r["node"].as_str().map(String::from))
        .collect();
    let want: std::collections::BTreeSet<String> = names
        .iter()
        .map(|n| format!("example.org/microblog/{n}"))
        .collect();
    assert_eq!(nodes, want, "every node's records, each naming its node");
    // Merged by time.
    let times: Vec<&str> = records
        .iter()
        .map(|r| r["time"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    // Each flow is seen by both of its ends: search's call to user is in search's log (egress)
    // and in user's (ingress).
    let seen_by = |from: &str, to: &str, port: u64| -> std::collections::BTreeSet<String> {
        records
            .iter()
            .filter(|r| {
                r["event"] == "new"
                    && r["src"]["name"] == from
                    && r["dst"]["name"] == to
                    && r["dst"]["port"] == port
            })
            .map(|r| r["node"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        seen_by("search", "user", 8080),
        ["example.org/microblog/search", "example.org/microblog/user"]
            .map(String::from)
            .into()
    );
    // Filters: denied only (the 9090 calls, denied by the receivers), from one identity, by policy.
    let (_, denied, _) = mesh_flows(&pl, 1, &admin, &["--denied"]);
    assert!(denied.len() >= 5, "{denied:?}");
    assert!(denied
        .iter()
        .all(|r| r["verdict"] != "allow" && r["dst"]["port"] == 9090));
    let (_, from_api, _) = mesh_flows(&pl, 3, &admin, &["--from", "microblog/api"]);
    assert!(!from_api.is_empty() && from_api.iter().all(|r| r["src"]["name"] == "api"));
    let (_, by_policy, _) = mesh_flows(&pl, 1, &admin, &["--policy", "allow-8080"]);
    assert!(
        !by_policy.is_empty()
            && by_policy
                .iter()
                .all(|r| r["policy"] == "GlobalNetworkPolicy allow-8080")
    );
    // The live graph: the set in force between the members, the mesh's flows overlaid.
    let all = pl.lab.dir.join("all.jsonl");
    let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    std::fs::write(&all, lines.join("\n")).unwrap();
    let graph = |format: &str| {
        let out = run(Command::new(bin("meshctl"))
            .args([
                "policy",
                "graph",
                "-o",
                format,
                "-i",
                &pl.node(1).ifname,
                "--flows",
            ])
            .arg(&all));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let g: serde_json::Value = serde_json::from_str(&graph("json")).unwrap();
    assert_eq!(g["nodes"].as_array().unwrap().len(), 5, "{g}");
    let edges = g["edges"].as_array().unwrap();
    assert_eq!(
        edges.len(),
        5 * 4,
        "everyone may call everyone on 8080: {g}"
    );
    let used = edges
        .iter()
        .filter(|e| e["seen"]["TCP 8080"]["allowed"].as_u64().unwrap_or(0) > 0)
        .count();
    assert_eq!(used, 5, "each node called the next: {g}");
    let html = graph("html");
    assert!(html.contains("<svg") && html.contains(&format!("Observed flows ({})", records.len())));
    let (_, recent, _) = mesh_flows(&pl, 1, &admin, &["--since", "10m"]);
    assert!(
        recent.len() >= records.len(),
        "{} of {}",
        recent.len(),
        records.len()
    );

    // A key that is no policy admin reads nothing: the asking node refuses it, and so would
    // every member.
    let rogue = pl.lab.dir.join("rogue.key");
    run(Command::new(bin("meshctl"))
        .args(["policy", "admin-key", "--out"])
        .arg(&rogue));
    let (ok, none, err) = mesh_flows(&pl, 1, &rogue, &[]);
    assert!(!ok && none.is_empty(), "{err}");
    assert!(err.contains("not a policy admin"), "{err}");

    // user restarts: its log's history is still there, numbered as before.
    let user_before: Vec<u64> = pl
        .flows(4, false)
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(!user_before.is_empty());
    let (ifname, ns, config) = (
        pl.node(4).ifname.clone(),
        pl.node(4).ns.clone(),
        pl.node(4).config.clone(),
    );
    assert!(pl.lab.stop(&ifname, libc::SIGTERM).success());
    pl.lab.meshd_config(&ns, &ifname, &config);
    pl.wait_members();
    let user_after: Vec<u64> = pl
        .flows(4, false)
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(
        user_after.starts_with(&user_before),
        "before {user_before:?}, after {user_after:?}"
    );
    // --follow: a flow that starts while it runs shows up, once per node that logged it.
    let mut follow = Command::new(bin("meshctl"))
        .args([
            "flows",
            "--mesh",
            "--follow",
            "-o",
            "json",
            "-i",
            &pl.node(1).ifname,
        ])
        .args(["--from", "microblog/storage", "--key"])
        .arg(&admin)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running meshctl flows --follow");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        talks(&pl.node(5).ns, pl.addr(1, 8080), QUICK),
        "storage -> api"
    );
    std::thread::sleep(Duration::from_millis(3000));
    let _ = follow.kill();
    let out = follow.wait_with_output().unwrap();
    let followed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a record is JSON"))
        .collect();
    let new_flow: Vec<&serde_json::Value> = followed
        .iter()
        .filter(|r| r["event"] == "new" && r["dst"]["name"] == "api" && r["dst"]["port"] == 8080)
        .collect();
    // The first call's flow (each end logged it), then the one made while following.
    assert_eq!(new_flow.len(), 4, "{new_flow:?}");
    let logged_by: std::collections::BTreeSet<&str> = new_flow
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        logged_by,
        ["example.org/microblog/api", "example.org/microblog/storage"].into(),
        "{followed:?}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for r in &followed {
        assert!(
            seen.insert((r["node"].to_string(), r["seq"].as_u64())),
            "a record printed twice: {r}"
        );
    }
    let (ok, again, err) = mesh_flows(
        &pl,
        2,
        &admin,
        &["--from", "microblog/search", "--to", "microblog/user"],
    );
    assert!(ok, "{err}");
    assert!(
        again
            .iter()
            .any(|r| r["node"] == "example.org/microblog/user"),
        "{again:?}"
    );
}
