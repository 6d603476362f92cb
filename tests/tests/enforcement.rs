//! Policy enforced at packet level by real meshd nodes in network namespaces: default deny,
//! Calico's rule semantics, egress on the sender and ingress on the receiver, connection
//! tracking, audit mode, the flow log, and signed policy sets pushed to the whole mesh.

use mesh_tests::policy_lab::*;
use mesh_tests::traffic::*;
use mesh_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

const NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: microblog
  labels:
    app: microblog
";

/// Egress allow-all for every identity: zero trust denies egress no policy allows, and these
/// tests are about ingress.
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

/// post-allow-list by service-account names, as the guide writes it but for its namespace selector.
const POST_BY_NAMES: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      serviceAccounts:
        names: [\"api\", \"search\"]
    destination:
      ports: [8080]
";

#[test]
fn zero_trust_denies_by_default_on_the_sender_and_nothing_reaches_the_wire() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(
        &[("api", &[]), ("post", &["app=post"]), ("search", &[])],
        &[],
    );
    let _server = echo(&pl.node(2).ns, pl.addr(2, 8080));
    let ns1 = pl.node(1).ns.clone();
    let cap = pl.lab.capture(&ns1, "u0");
    assert!(!talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK));
    assert!(!pl.lab.ping(&pl.node(1).ns, &pl.node(2).ip, 1));
    let frames = cap.finish();
    // WireGuard data messages (type 4) longer than a keepalive would carry the denied packets.
    let data = frames
        .iter()
        .filter(|f| f.len() > 42 + 32 && f.get(42) == Some(&4))
        .count();
    assert_eq!(data, 0, "a denied packet left node 1 encrypted");
    assert!(pl.peer_drops(1, "policy_denied_egress") >= 2);
    assert_eq!(pl.peer_drops(2, "policy_denied_ingress"), 0);
    let denied = pl.flows(1, true);
    let syn = denied
        .iter()
        .find(|r| r["protocol"] == "tcp")
        .expect("the denied connection is in the flow log");
    assert_eq!(syn["verdict"], "deny");
    assert_eq!(syn["direction"], "egress");
    assert_eq!(syn["policy"], "default-deny");
    assert_eq!(syn["src"]["name"], "api");
    assert_eq!(syn["dst"]["name"], "post");
    assert_eq!(syn["dst"]["namespace"], "microblog");
    assert_eq!(syn["dst"]["trust_domain"], "example.org");
    assert_eq!(
        syn["dst"]["spiffe_id"],
        "spiffe://example.org/ns/microblog/sa/post"
    );
    assert_eq!(syn["dst"]["labels"]["app"], "post");
    assert_eq!(syn["dst"]["port"], 8080);
    assert!(denied.iter().any(|r| r["protocol"] == "icmp"));

    // `meshctl flows --follow` prints records as they come.
    let mut follow = Command::new(bin("meshctl"))
        .args([
            "flows",
            "--follow",
            "--denied",
            "-o",
            "json",
            "-i",
            &pl.node(1).ifname,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let later = talks(&pl.node(1).ns, pl.addr(3, 5432), QUICK);
    assert!(!later);
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("\"search\"") && line.contains("5432") => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "--follow printed the new denial");
}

#[test]
fn allow_by_service_account_names_pushed_from_another_node_with_replies_and_flow_log() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(&[("api", &[]), ("post", &["app=post"]), ("user", &[])], &[]);
    // Applied on node 3 (user), enforced on node 2 (post): the set travels the mesh.
    let serial = pl.apply(
        3,
        &format!("{NAMESPACE}---\n{EGRESS_ALL}---\n{POST_BY_NAMES}"),
    );
    assert_eq!(serial, 1);
    let _server = echo(&pl.node(2).ns, pl.addr(2, 8080));
    assert!(
        talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK),
        "api -> post:8080 is allowed"
    );
    assert!(
        !talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK),
        "user -> post is not"
    );
    assert!(pl.peer_drops(2, "policy_denied_ingress") >= 1);

    let status = pl.meshctl(1, &["status", "-o", "json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes}");
    assert!(
        nodes.as_array().unwrap().iter().all(|n| n["serial"] == 1),
        "{nodes}"
    );

    // The what-if tool reads the set in force when given no files, with the daemon's posture.
    let check = pl.meshctl(
        1,
        &[
            "check",
            "--from",
            "microblog/api",
            "--to",
            "microblog/post,app=post",
            "--port",
            "8080",
        ],
    );
    let text = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        text.starts_with("ALLOW") && text.contains("post-allow-list"),
        "{text}"
    );
    let check = pl.meshctl(
        1,
        &[
            "check",
            "--from",
            "microblog/user",
            "--to",
            "microblog/post,app=post",
            "--port",
            "8080",
        ],
    );
    assert!(String::from_utf8_lossy(&check.stdout).starts_with("DENY"));
    assert_eq!(check.status.code(), Some(1), "DENY exits 1, as grep does");

    // Against the live mesh no labels are needed: they come from the members' certificates.
    let check = pl.meshctl(
        1,
        &[
            "check",
            "--from",
            "microblog/api",
            "--to",
            "microblog/post",
            "--port",
            "8080",
            "-o",
            "json",
        ],
    );
    let answer: serde_json::Value = serde_json::from_slice(&check.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&check.stdout)));
    assert_eq!(answer["verdict"], "ALLOW", "{answer}");
    assert_eq!(answer["ingress"]["labels"]["app"], "post", "{answer}");
    assert_eq!(
        answer["ingress"]["by"], "NetworkPolicy microblog/post-allow-list",
        "{answer}"
    );
    assert_eq!(check.status.code(), Some(0));
    let check = pl.meshctl(
        1,
        &[
            "check",
            "--from",
            "microblog/nobody",
            "--to",
            "microblog/post",
            "--port",
            "8080",
        ],
    );
    assert_eq!(check.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&check.stderr)
            .contains("the mesh has no member example.org/microblog/nobody"),
        "{check:?}"
    );

    let flows = pl.flows(2, false);
    let allowed = flows
        .iter()
        .find(|r| r["verdict"] == "allow" && r["direction"] == "ingress")
        .expect("the allowed flow is logged on post");
    assert_eq!(allowed["policy"], "NetworkPolicy microblog/post-allow-list");
    assert_eq!(allowed["rule"], "ingress[0]");
    assert_eq!(allowed["src"]["name"], "api");
    let denied = flows
        .iter()
        .find(|r| r["verdict"] == "deny")
        .expect("the denied flow is logged on post");
    assert_eq!(denied["src"]["name"], "user");
    assert_eq!(denied["policy"], "end-of-policies");
    // Closed flows carry packets and bytes (a finished TCP flow closes 10 s after its FIN).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let closed = pl
            .flows(2, false)
            .into_iter()
            .find(|r| r["event"] == "closed" && r["src"]["name"] == "api");
        if let Some(c) = closed {
            assert!(c["packets"].as_u64().unwrap() >= 6, "{c}");
            assert!(c["bytes"].as_u64().unwrap() > 8, "{c}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no closing record for api -> post"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn label_selector_with_namespace_selector_and_port_and_protocol_scoping() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(
        &[
            ("api", &["svc-post=access"]),
            (
                "post",
                &["app=post", "--port=http=9090/tcp", "--port=stats=8080/udp"],
            ),
            ("search", &[]),
        ],
        &[],
    );
    let policy = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      serviceAccounts:
        selector: svc-post == 'access'
      namespaceSelector: app == 'microblog'
    destination:
      ports: [\"8080:8081\"]
";
    pl.apply(1, &format!("{NAMESPACE}---\n{EGRESS_ALL}---\n{policy}"));
    let _a = echo(&pl.node(2).ns, pl.addr(2, 8080));
    let _b = echo(&pl.node(2).ns, pl.addr(2, 8081));
    let _c = echo(&pl.node(2).ns, pl.addr(2, 9090));
    assert!(talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK));
    assert!(
        talks(&pl.node(1).ns, pl.addr(2, 8081), QUICK),
        "ranges match"
    );
    assert!(
        !talks(&pl.node(1).ns, pl.addr(2, 9090), QUICK),
        "other ports do not"
    );
    assert!(
        !pl.lab.ping(&pl.node(1).ns, &pl.node(2).ip, 1),
        "nor other protocols"
    );
    assert!(
        !talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK),
        "no svc-post label"
    );
    // A rule that names a port matches the port of that name in post's certificate, on both
    // nodes (api's egress names it too): http is 9090/TCP, not 8080; stats is UDP.
    let named = policy
        .replace("[\"8080:8081\"]", "[http, stats]")
        .replace("name: post-allow-list", "name: post-by-port-name");
    let egress = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-to-http, namespace: microblog}
spec:
  selector: svc-post == 'access'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {selector: app == 'post', ports: [http]}
";
    pl.apply(1, &format!("{NAMESPACE}---\n{named}---\n{egress}"));
    let key = pl.admin.display().to_string();
    for gone in [
        ["networkpolicy", "microblog/post-allow-list"],
        ["gnp", "egress-all"],
    ] {
        let o = pl.meshctl(1, &["delete", gone[0], gone[1], "--key", &key]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    pl.wait_serial(pl.serial(1));
    assert!(
        talks(&pl.node(1).ns, pl.addr(2, 9090), QUICK),
        "http is post's 9090/TCP"
    );
    assert!(
        !talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK),
        "8080/TCP has no name"
    );
    let flows = pl.flows(2, false);
    assert!(flows.iter().any(|r| r["dst"]["port"] == 9090
        && r["verdict"] == "allow"
        && r["policy"] == "NetworkPolicy microblog/post-by-port-name"));
    // The live what-if takes post's named ports from its certificate.
    let o = pl.meshctl(
        1,
        &[
            "check",
            "--from",
            "microblog/api",
            "--to",
            "microblog/post",
            "--port",
            "9090",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // The namespace's labels count: relabelled, the same selector no longer matches.
    pl.apply(1, &NAMESPACE.replace("app: microblog", "app: other"));
    assert!(!talks(&pl.node(1).ns, pl.addr(2, 9090), QUICK));
}

#[test]
fn deny_before_allow_by_order_and_pass_ends_the_tier() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(
        &[
            ("api", &[]),
            ("post", &["app=post"]),
            ("search", &[]),
            ("user", &[]),
        ],
        &[],
    );
    let set = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: deny-search, namespace: microblog}
spec:
  order: 10
  selector: app == 'post'
  ingress:
  - action: Deny
    source: {serviceAccounts: {names: [search]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: pass-user, namespace: microblog}
spec:
  order: 5
  selector: app == 'post'
  ingress:
  - action: Pass
    source: {serviceAccounts: {names: [user]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: allow-all, namespace: microblog}
spec:
  order: 20
  selector: app == 'post'
  ingress:
  - action: Log
  - action: Allow
";
    pl.apply(2, &format!("{EGRESS_ALL}---\n{set}"));
    let _s = echo(&pl.node(2).ns, pl.addr(2, 8080));
    assert!(
        talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK),
        "api: allowed at order 20"
    );
    assert!(
        !talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK),
        "search: denied at order 10 first"
    );
    assert!(
        !talks(&pl.node(4).ns, pl.addr(2, 8080), QUICK),
        "user: Pass skips the allow"
    );
    let denied = pl.flows(2, true);
    let by = |who: &str| {
        denied
            .iter()
            .find(|r| r["src"]["name"] == who)
            .map(|r| r["policy"].as_str().unwrap().to_string())
    };
    assert_eq!(
        by("search").as_deref(),
        Some("NetworkPolicy microblog/deny-search")
    );
    assert_eq!(
        by("user").as_deref(),
        Some("NetworkPolicy microblog/pass-user")
    );
    // The Log rule on the way to api's Allow is in its flow record.
    let flows = pl.flows(2, false);
    let api = flows
        .iter()
        .find(|r| r["src"]["name"] == "api" && r["event"] == "new")
        .expect("api's flow is logged");
    assert_eq!(api["policy"], "NetworkPolicy microblog/allow-all");
    assert_eq!(api["rule"], "ingress[1]");
    assert_eq!(api["log_rule"], true);
    assert!(flows
        .iter()
        .all(|r| r["src"]["name"] == "api" || r.get("log_rule").is_none()));
}

/// A new allow-list rolls out without an outage: staged (a `StagedNetworkPolicy` of the same name),
/// search's connections to post keep working and post's flow log says the staged set would deny
/// them (`meshctl flows --staged`); promoted (applied as a `NetworkPolicy`, the staged object
/// deleted), the same connections are denied while api's still pass.
#[test]
fn a_staged_policy_logs_would_be_denials_then_denies_once_promoted() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(
        &[("api", &[]), ("post", &["app=post"]), ("search", &[])],
        &[],
    );
    pl.apply(
        2,
        &format!("{NAMESPACE}---\n{EGRESS_ALL}---\n{POST_BY_NAMES}"),
    );
    let _s = echo(&pl.node(2).ns, pl.addr(2, 8080));
    let tighter = POST_BY_NAMES.replace("names: [\"api\", \"search\"]", "names: [\"api\"]");
    assert_ne!(tighter, POST_BY_NAMES);
    let staged = tighter.replace("kind: NetworkPolicy", "kind: StagedNetworkPolicy");
    pl.apply(2, &staged);
    assert!(
        talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK),
        "search: a staged policy denies nothing"
    );
    assert!(talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK));

    let would = |i: usize| {
        let out = run(Command::new(bin("meshctl")).args([
            "flows",
            "--staged",
            "-o",
            "json",
            "-i",
            &pl.node(i).ifname,
        ]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let mut staged_denied = Vec::new();
    wait_for(
        "post's flow log to show search's flow",
        Duration::from_secs(5),
        || {
            staged_denied = would(2);
            !staged_denied.is_empty()
        },
    );
    assert!(
        staged_denied.iter().all(|r| r["src"]["name"] == "search"
            && r["verdict"] == "allow"
            && r["staged"]["verdict"] == "deny"
            && r["staged"]["policy"] == "end-of-policies"),
        "{staged_denied:?}"
    );
    let flows = pl.flows(2, false);
    let api = flows
        .iter()
        .find(|r| r["src"]["name"] == "api" && r["event"] == "new")
        .expect("api's flow is logged");
    assert_eq!(api["staged"]["verdict"], "allow");
    assert_eq!(
        api["staged"]["policy"],
        "StagedNetworkPolicy microblog/post-allow-list"
    );
    // The table says it too.
    let table =
        run(Command::new(bin("meshctl")).args(["flows", "--staged", "-i", &pl.node(2).ifname]));
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains("[staged: deny by end-of-policies]"),
        "{table}"
    );

    // Promoted: the enforced policy takes the staged spec; the staged object goes.
    pl.apply(2, &tighter);
    let key = pl.admin.display().to_string();
    let o = pl.meshctl(
        2,
        &[
            "delete",
            "stagednetworkpolicy",
            "microblog/post-allow-list",
            "--key",
            &key,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    pl.wait_serial(pl.serial(2));
    assert!(
        !talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK),
        "search: denied once promoted"
    );
    assert!(talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK));
    let denied = pl.flows(2, true);
    assert!(denied.iter().any(|r| r["src"]["name"] == "search"
        && r["policy"] == "end-of-policies"
        && r.get("staged").is_none()));
}

#[test]
fn the_receiver_enforces_ingress_even_when_the_sender_lets_everything_out_and_audit_passes() {
    if !can_run() {
        return;
    }
    // Node 1 stands for a compromised node: global audit mode, so its own policy stops nothing.
    let mut pl = policy_lab(
        &[("api", &[]), ("post", &["app=post"]), ("search", &[])],
        &[1],
    );
    let audited_policy = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: search-trial
  namespace: microblog
  annotations:
    policy.mesh/audit: \"true\"
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    source: {serviceAccounts: {names: [api]}}
";
    // No egress allow-list at all: node 1 sends anyway (audit); node 3 enforces its egress.
    pl.apply(
        1,
        "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: post-closed, namespace: microblog}
spec:
  selector: app == 'post'
  ingress:
  - action: Deny
    source: {serviceAccounts: {names: [api]}}
",
    );
    let _s = echo(&pl.node(2).ns, pl.addr(2, 8080));
    assert!(
        !talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK),
        "post's ingress stops api"
    );
    assert!(
        pl.peer_drops(2, "policy_denied_ingress") >= 1,
        "post dropped it after decryption"
    );
    assert!(
        pl.policy_counter(1, "audited_flows") >= 1,
        "api let it out, audited"
    );
    let out = pl.flows(1, true);
    assert!(
        out.iter()
            .any(|r| r["verdict"] == "audit" && r["direction"] == "egress"),
        "{out:?}"
    );

    // Per-policy audit: post's only policy is in audit mode, so search's flow passes and is
    // logged as an audited denial by that policy. search's egress needs an allow (node 3 is not
    // in audit mode).
    pl.apply(1, &format!("{EGRESS_ALL}---\n{audited_policy}"));
    pl.meshctl(
        1,
        &[
            "delete",
            "networkpolicy",
            "microblog/post-closed",
            "--key",
            pl.admin.to_str().unwrap(),
        ],
    );
    pl.wait_serial(3);
    assert!(
        talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK),
        "audit mode passes the packets"
    );
    let audited = pl.flows(2, true);
    let rec = audited
        .iter()
        .find(|r| r["src"]["name"] == "search" && r["verdict"] == "audit")
        .unwrap_or_else(|| panic!("no audit record on post: {audited:?}"));
    assert_eq!(rec["policy"], "end-of-policies");
    assert!(pl.policy_counter(2, "audited_flows") >= 1);
}

#[test]
fn policy_change_cuts_a_flow_bad_sets_are_refused_and_policy_survives_restart() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(
        &[("api", &[]), ("post", &["app=post"]), ("search", &[])],
        &[],
    );
    let allow_api = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: post-allow-list, namespace: microblog}
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    source: {serviceAccounts: {names: [api]}}
";
    pl.apply(1, &format!("{EGRESS_ALL}---\n{allow_api}"));
    let _s = echo(&pl.node(2).ns, pl.addr(2, 8080));

    // An invalid set (one good document, one with an unknown field) is refused whole.
    let bad = format!(
        "{}---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: typo, namespace: microblog}}\nspec:\n  selector: all()\n  ingres: []\n",
        allow_api.replace("post-allow-list", "second")
    );
    let o = pl.apply_with(1, &bad, &pl.admin.clone());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("document 2") && err.contains("ingres"),
        "{err}"
    );
    assert!(err.contains("nothing was applied"), "{err}");
    // An error found only when compiling still names the file, document, field and column.
    let bad_selector = allow_api.replace("app == 'post'", "app == 'post' &&");
    let o = pl.apply_with(1, &bad_selector, &pl.admin.clone());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let file = format!("policy-{}.yaml", pl.applied);
    assert!(
        err.contains(&format!(
            "{file}:5:3: document 1 (NetworkPolicy microblog/post-allow-list): spec.selector: selector `app == 'post' &&`: column 17"
        )),
        "{err}"
    );
    // A set signed by a key no node trusts is refused by the daemon.
    let rogue = pl.lab.dir.join("rogue.key");
    run(Command::new(bin("meshctl"))
        .args(["policy", "admin-key", "--out"])
        .arg(&rogue));
    let o = pl.apply_with(1, NAMESPACE, &rogue);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a policy-admin key"));
    assert_eq!(pl.serial(1), 1, "the running set stays in force");
    let list = String::from_utf8_lossy(&pl.meshctl(1, &["list"]).stdout).to_string();
    assert!(
        list.contains("NetworkPolicy microblog/post-allow-list") && !list.contains("second"),
        "{list}"
    );

    // A long-lived allowed connection...
    let addr = pl.addr(2, 8080);
    let stream = in_netns(&pl.node(1).ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, QUICK).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(1))).ok();
        let mut round_trips = 0;
        let mut buf = [0u8; 4];
        loop {
            if s.write_all(b"ping").is_err() || s.read_exact(&mut buf).is_err() {
                return round_trips;
            }
            round_trips += 1;
            std::thread::sleep(Duration::from_millis(100));
            if round_trips > 600 {
                return round_trips;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    // ...is cut when a new set no longer allows it.
    let before = pl.policy_counter(2, "cut_flows");
    let o = pl.meshctl(
        1,
        &[
            "delete",
            "networkpolicy",
            "microblog/post-allow-list",
            "--key",
            pl.admin.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cut_at = Instant::now();
    let trips = stream.join().unwrap();
    assert!(
        trips >= 5,
        "the flow ran before the change ({trips} round trips)"
    );
    assert!(
        cut_at.elapsed() < Duration::from_secs(10),
        "the flow was cut promptly"
    );
    assert!(pl.policy_counter(2, "cut_flows") > before);
    assert!(pl.flows(2, false).iter().any(|r| r["event"] == "cut"));

    // Restart post: it enforces serial 2 (no allow) at once, from its state directory.
    pl.apply(1, allow_api);
    let ifname = pl.node(2).ifname.clone();
    pl.lab.stop(&ifname, libc::SIGTERM);
    let (ns, cfg) = (pl.node(2).ns.clone(), pl.node(2).config.clone());
    pl.lab.meshd_config(&ns, &ifname, &cfg);
    pl.wait_members();
    assert_eq!(pl.serial(2), 3, "the applied set survived the restart");
    // The echo server's socket outlives the interface; it serves again once the address is back.
    // Node 1 still holds a session with post's previous run; the restarted post starts a new
    // handshake with every member it restores, so this works at once, not after node 1's own
    // REKEY_TIMEOUT (15 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK) {
        assert!(
            Instant::now() < deadline,
            "api cannot reach post after its restart"
        );
    }
    assert!(!talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK));
}

#[test]
fn policy_diff_get_list_delete_and_an_allowed_ping() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(&[("api", &[]), ("post", &["app=post"])], &[]);
    let icmp = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: ping}
spec:
  selector: all()
  types: [Ingress, Egress]
  ingress:
  - action: Allow
    protocol: ICMP
    icmp: {type: 8}
  egress:
  - action: Allow
    protocol: ICMP
";
    // diff against nothing: everything is created.
    let f = pl.lab.dir.join("ping.yaml");
    std::fs::write(&f, icmp).unwrap();
    let diff = pl.meshctl(1, &["diff", "-f", f.to_str().unwrap()]);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "differences: exit 1, as diff does"
    );
    let text = String::from_utf8_lossy(&diff.stdout).to_string();
    assert!(
        text.contains("# GlobalNetworkPolicy ping (created)"),
        "{text}"
    );
    assert!(text.contains("+  selector: all()"), "{text}");
    pl.apply(1, icmp);
    // Echo requests are allowed; the replies pass on the connection table.
    assert!(pl.lab.ping(&pl.node(1).ns, &pl.node(2).ip, 2));

    // A changed object shows as a line diff; an unchanged apply is no change.
    let changed = icmp.replace("type: 8", "type: 13");
    std::fs::write(&f, &changed).unwrap();
    let text = String::from_utf8_lossy(&pl.meshctl(1, &["diff", "-f", f.to_str().unwrap()]).stdout)
        .to_string();
    assert!(
        text.contains("(configured)")
            && text
                .lines()
                .any(|l| l.starts_with('-') && l.contains("type: 8"))
            && text
                .lines()
                .any(|l| l.starts_with('+') && l.contains("type: 13")),
        "{text}"
    );
    let o = pl.apply_with(1, icmp, &pl.admin.clone());
    assert!(String::from_utf8_lossy(&o.stdout).contains("no change"));

    let list = String::from_utf8_lossy(&pl.meshctl(2, &["list", "-o", "json"]).stdout).to_string();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["serial"], 1);
    assert_eq!(
        list["objects"],
        serde_json::json!(["GlobalNetworkPolicy ping"])
    );
    let got = pl.meshctl(2, &["get", "globalnetworkpolicy", "ping", "-o", "json"]);
    let got: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(got["spec"]["selector"], "all()");
    let yaml = String::from_utf8_lossy(&pl.meshctl(2, &["get", "-o", "yaml"]).stdout).to_string();
    assert!(
        yaml.starts_with("---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy"),
        "{yaml}"
    );

    // Deleting something that is not there changes nothing; deleting the policy denies again.
    let key = pl.admin.display().to_string();
    let o = pl.meshctl(
        1,
        &["delete", "networkpolicy", "microblog/nope", "--key", &key],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not in policy set 1"));
    let o = pl.meshctl(1, &["delete", "gnp", "ping", "--key", &key]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    pl.wait_serial(2);
    assert!(!pl.lab.ping(&pl.node(1).ns, &pl.node(2).ip, 1));
}

#[test]
fn a_kubernetes_network_policy_applies_as_written() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(
        &[
            ("api", &["app=api"]),
            ("post", &["app=post"]),
            ("search", &["app=search"]),
        ],
        &[],
    );
    let k8s = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: post-from-api
  namespace: microblog
spec:
  podSelector:
    matchLabels:
      app: post
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: api
    ports:
    - protocol: TCP
      port: 8080
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: all-egress
  namespace: microblog
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - {}
";
    pl.apply(2, k8s);
    let _s = echo(&pl.node(2).ns, pl.addr(2, 8080));
    let _t = echo(&pl.node(2).ns, pl.addr(2, 9090));
    assert!(talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK));
    assert!(
        !talks(&pl.node(1).ns, pl.addr(2, 9090), QUICK),
        "only the listed port"
    );
    assert!(
        !talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK),
        "only the listed pods"
    );
    let flows = pl.flows(2, false);
    let allowed = flows
        .iter()
        .find(|r| r["verdict"] == "allow" && r["src"]["name"] == "api")
        .expect("api's flow is logged");
    assert_eq!(
        allowed["policy"],
        "KubernetesNetworkPolicy microblog/post-from-api"
    );
}

#[test]
fn members_meet_and_policy_spreads_over_an_underlay_that_drops_ip_fragments() {
    if !can_run() {
        return;
    }
    // Forty labels make certificates of about 2,000 bytes: the seed's certificate does not fit a
    // probe reply, and every Hello, Members message and policy chunk is larger than one packet
    // on the link.
    let many: Vec<String> = (0..40)
        .map(|i| format!("team.example.org/key-{i:02}=value-{i:02}-abcdefghijkl"))
        .collect();
    let with = |app: &'static str| -> Vec<String> {
        let mut l = vec![format!("app={app}")];
        l.extend(many.iter().cloned());
        l
    };
    let (api, post, search) = (with("api"), with("post"), with("search"));
    fn refs(l: &[String]) -> Vec<&str> {
        l.iter().map(String::as_str).collect()
    }
    let (api, post, search) = (refs(&api), refs(&post), refs(&search));
    let mut pl = policy_lab_on(
        &[("api", &api), ("post", &post), ("search", &search)],
        &[],
        Fragments::Dropped,
    );

    let text = std::fs::read_to_string(pl.lab.dir.join("ca/ids/api.crt")).unwrap();
    let cert = proto::armor::decode(proto::armor::CERTIFICATE, &text).unwrap();
    assert!(
        cert.len() > proto::segment::DATAGRAM_BYTES,
        "{} bytes",
        cert.len()
    );

    // A set of about 90 KB: api may reach post, and 300 policies that select no one.
    let mut yaml = format!(
        "{EGRESS_ALL}---\napiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: post-allow-list, namespace: microblog}}
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: TCP
    source: {{serviceAccounts: {{names: [api]}}}}
    destination: {{ports: [8080]}}
"
    );
    for i in 0..300 {
        yaml.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: filler-{i:03}}}\n\
             spec:\n  selector: app == 'nobody-{i:03}' && has(team.example.org/key-00)\n  ingress:\n  \
             - action: Allow\n    protocol: TCP\n    source: {{selector: app == 'nobody-{i:03}'}}\n    \
             destination: {{ports: [{}]}}\n",
            10_000 + i
        ));
    }
    assert!(yaml.len() > 80_000, "{} bytes", yaml.len());
    pl.apply(1, &yaml);
    let _post = echo(&pl.node(2).ns, pl.addr(2, 8080));
    assert!(talks(&pl.node(1).ns, pl.addr(2, 8080), QUICK));
    assert!(!talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK));

    // Nothing the nodes sent needed fragmenting...
    for n in &pl.nodes {
        assert_eq!(fragments_dropped(&pl.lab, &n.ns), 0, "{}", n.ns);
    }
    // ...and the underlay does drop fragments: a datagram larger than the link does not cross.
    let big = pl.lab.exec(
        &pl.node(2).ns,
        &["ping", "-c", "1", "-W", "1", "-s", "3000", "198.18.2.1"],
    );
    assert!(!big.status.success(), "a fragmented ping crossed");
    assert!(fragments_dropped(&pl.lab, &pl.node(1).ns) > 0);
}

/// The Prometheus metrics of post (node 2), scraped from its namespace's loopback.
fn metrics(pl: &PolicyLab) -> String {
    let (code, body) = http_get(&pl.node(2).ns, "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

#[test]
fn metrics_move_during_a_transfer_and_count_verdicts_and_drops_by_reason() {
    if !can_run() {
        return;
    }
    let mut pl = policy_lab(&[("api", &[]), ("post", &["app=post"]), ("user", &[])], &[]);
    let post_ns = pl.node(2).ns.clone();
    // Zero trust without a set denies every flow: the node is alive but not ready.
    assert_eq!(http_get(&post_ns, "/healthz"), (200, "ok\n".to_string()));
    let (code, body) = http_get(&post_ns, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("FAIL policy"), "{body}");
    let serial = pl.apply(
        1,
        &format!("{NAMESPACE}---\n{EGRESS_ALL}---\n{POST_BY_NAMES}"),
    );
    pl.wait_serial(serial);
    let (code, body) = http_get(&post_ns, "/readyz");
    assert_eq!(code, 200, "ready once a set is in force: {body}");
    assert!(body.contains(&format!("set {serial} in force")), "{body}");

    let key = |i: usize| {
        pl.lab.status(&pl.node(i).ifname)["public_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (api, user) = (key(1), key(3));
    let peer = |name: &str, key: &str| {
        format!("{{public_key=\"{key}\",identity=\"example.org/microblog/{name}\"}}")
    };
    let rx = format!("meshd_peer_rx_bytes_total{}", peer("api", &api));

    // 64 MiB from api to post; the counter is read while the transfer runs.
    const BYTES: u64 = 64 << 20;
    let to = pl.addr(2, 8080);
    let api_ns = pl.node(1).ns.clone();
    let transfer = std::thread::spawn({
        let post_ns = post_ns.clone();
        move || tcp_transfer(&api_ns, &post_ns, to, BYTES)
    });
    let mut seen = Vec::new();
    while !transfer.is_finished() && seen.len() < 200 {
        if let Some(v) = sample(&metrics(&pl), &rx) {
            seen.push(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    transfer.join().expect("the transfer");
    // The listener takes the status at most once a second.
    wait_for("the whole transfer counted", Duration::from_secs(5), || {
        sample(&metrics(&pl), &rx).is_some_and(|v| v >= BYTES as f64)
    });
    let after = metrics(&pl);
    let total = sample(&after, &rx).expect("rx bytes of api");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "a counter never goes down: {seen:?}"
    );
    assert!(
        seen.iter().any(|v| *v > 0.0 && *v < total),
        "scraped while moving: {seen:?} then {total}"
    );
    let packets = format!("meshd_peer_rx_packets_total{}", peer("api", &api));
    assert!(sample(&after, &packets).unwrap() >= (BYTES / 1500) as f64);
    let handshakes = format!("meshd_peer_handshakes_total{}", peer("api", &api));
    assert!(sample(&after, &handshakes).unwrap() >= 1.0, "{after}");

    // user -> post is denied at post's ingress: a drop by reason, from user's key, and a
    // verdict of the end of the policies.
    assert!(!talks(&pl.node(3).ns, pl.addr(2, 8080), QUICK));
    let denied = format!(
        "meshd_dropped_packets_total{{reason=\"policy_denied_ingress\",public_key=\"{user}\"}}"
    );
    let allow = "meshd_policy_verdicts_total{direction=\"ingress\",policy=\"NetworkPolicy microblog/post-allow-list\",action=\"allow\"}";
    let deny = "meshd_policy_verdicts_total{direction=\"ingress\",policy=\"end-of-policies\",action=\"deny\"}";
    wait_for("the denial in the metrics", Duration::from_secs(5), || {
        let m = metrics(&pl);
        sample(&m, &denied).unwrap_or(0.0) >= 1.0
            && sample(&m, allow).unwrap_or(0.0) >= 1.0
            && sample(&m, deny).unwrap_or(0.0) >= 1.0
    });
    let m = metrics(&pl);
    assert_eq!(sample(&m, "meshd_policy_serial"), Some(serial as f64));
    assert_eq!(sample(&m, "meshd_members"), Some(2.0));
    assert_eq!(sample(&m, "meshd_ready"), Some(1.0));
    assert!(sample(&m, "meshd_control_messages_total{kind=\"hello\"}").unwrap() >= 1.0);
    assert!(
        m.lines().any(|l| l.starts_with(
            "meshd_certificate_expiry_timestamp_seconds{identity=\"example.org/microblog/post\"}"
        )),
        "{m}"
    );
    assert!(m.contains("# TYPE meshd_conntrack_entries gauge"));
    // Anything but GET of the three paths is refused, and the daemon goes on.
    assert_eq!(http_get(&post_ns, "/").0, 404);
    assert_eq!(http_get(&post_ns, "/healthz").0, 200);
}

/// The author's gate: `policy apply` runs the PolicyTest cases of the resulting set as the daemon
/// would decide them, and refuses a change that breaks one, naming it; the set in force stays.
#[test]
fn apply_refuses_a_change_that_fails_a_policy_test() {
    if !can_run() {
        return;
    }
    let pl = policy_lab(&[("api", &["app=api"]), ("post", &["app=post"])], &[]);
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/microblog");
    let apply = |path: &std::path::Path| {
        Command::new(bin("meshctl"))
            .args(["policy", "apply", "-f"])
            .arg(path)
            .args([
                "--key",
                pl.admin.to_str().unwrap(),
                "-i",
                &pl.node(1).ifname,
            ])
            .output()
            .unwrap()
    };
    let o = apply(&examples);
    assert!(o.status.success(), "{o:?}");
    pl.wait_serial(1);

    let changed = pl.lab.dir.join("post-without-search.yaml");
    let post = std::fs::read_to_string(examples.join("post-allow-list.yaml")).unwrap();
    std::fs::write(
        &changed,
        post.replace(r#"names: ["api", "search"]"#, r#"names: ["api"]"#),
    )
    .unwrap();
    let o = apply(&changed);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fails 1 policy test case(s); nothing was applied")
            && err.contains("PolicyTest microblog-flows[1] search reaches post: expected Allow, got Deny by end-of-policies"),
        "{err}"
    );
    assert_eq!(pl.serial(1), 1, "the set in force stays");

    // What the change does to flows, for a reviewer: against identities listed in a file, and
    // against the live mesh's members (labels from their certificates).
    let diff = |file: &std::path::Path, extra: &[&str]| {
        Command::new(bin("meshctl"))
            .args(["policy", "diff", "--connectivity", "-o", "json", "-f"])
            .arg(file)
            .args(extra)
            .args(["-i", &pl.node(1).ifname])
            .output()
            .unwrap()
    };
    let ids = pl.lab.dir.join("identities.yaml");
    std::fs::write(
        &ids,
        ["api", "post", "search", "user", "storage"]
            .iter()
            .map(|n| format!("- microblog/{n},app={n}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let o = diff(&changed, &["--identities", ids.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["identities"], 5);
    assert_eq!(
        report["newly_allowed"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    let denied = report["newly_denied"].as_array().unwrap();
    assert_eq!(denied.len(), 1, "{report}");
    assert_eq!(denied[0]["from"], "example.org/microblog/search");
    assert_eq!(denied[0]["to"], "example.org/microblog/post");
    assert_eq!(denied[0]["port"], 8080);
    assert_eq!(
        denied[0]["before"],
        "NetworkPolicy microblog/post-allow-list ingress[0]"
    );

    let without_api = pl.lab.dir.join("post-without-api.yaml");
    std::fs::write(
        &without_api,
        post.replace(r#"names: ["api", "search"]"#, r#"names: ["search"]"#),
    )
    .unwrap();
    let o = diff(&without_api, &[]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["identities"], 2, "the live mesh: api and post");
    let denied = report["newly_denied"].as_array().unwrap();
    assert_eq!(denied.len(), 1, "{report}");
    assert_eq!(denied[0]["from"], "example.org/microblog/api");

    // The set in force against itself: no change, exit 0.
    let o = diff(&examples.join("post-allow-list.yaml"), &[]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
}

/// Whoever reaches the metrics listener cannot wedge it: 16 idle connections fill it, the next
/// is told 503 at once instead of waiting, the idle ones are dropped after the 2 s head timeout,
/// and then a scrape works again.
#[test]
fn idle_connections_do_not_wedge_the_metrics_listener() {
    if !can_run() {
        return;
    }
    let pl = policy_lab(&[("api", &[]), ("post", &["app=post"])], &[]);
    let ns = pl.node(2).ns.clone();
    let held = in_netns(&ns, || {
        let idle: Vec<TcpStream> = (0..16)
            .map(|_| TcpStream::connect(METRICS).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut extra = TcpStream::connect(METRICS).expect("connect");
        extra
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut answer = String::new();
        let _ = extra.read_to_string(&mut answer);
        (idle, answer)
    })
    .join()
    .unwrap();
    let (idle, answer) = held;
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "over the limit: {answer:?}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let (code, body) = http_get(&ns, "/metrics");
    assert_eq!(code, 200, "{body}");
    drop(idle);
    assert_eq!(
        pl.lab.status(&pl.node(2).ifname)["interface"],
        pl.node(2).ifname.as_str(),
        "meshd answers its admin socket throughout"
    );
}
