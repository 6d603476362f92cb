//! The policy what-if tools from the operator's side.

use mesh_tests::bin;
use std::path::Path;
use std::process::Command;

fn selector(expr: &str, labels: &str) -> (Option<i32>, String, String) {
    let o = Command::new(bin("meshctl"))
        .args(["policy", "selector", expr, "--labels", labels])
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn meshctl_policy_selector_prints_true_false_or_the_error_column() {
    assert_eq!(
        selector("svc-post == 'access'", "app=post,svc-post=access").1,
        "true\n"
    );
    assert_eq!(
        selector(
            "app == \"microblog\" && !has(debug)",
            "app=microblog,debug=1"
        )
        .1,
        "false\n"
    );
    assert_eq!(selector("tier not in {'db', 'cache'}", "").1, "true\n");
    let (code, out, err) = selector("app in {'a' 'b'}", "app=a");
    assert_eq!(code, Some(2));
    assert!(out.is_empty());
    assert!(err.contains("column 13"), "{err}");
    let (code, _, err) = selector("all()", "novalue");
    assert_eq!(code, Some(2));
    assert!(err.contains("`novalue` is not KEY=VALUE"), "{err}");
}

fn check(args: &[&str]) -> (Option<i32>, String, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/microblog");
    let mut a = vec!["policy", "check", "-f", root];
    a.extend_from_slice(args);
    let o = Command::new(bin("meshctl")).args(&a).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn meshctl_policy_check_decides_offline_and_names_the_deciding_policy() {
    let (code, out, _) = check(&[
        "--from",
        "microblog/api",
        "--to",
        "microblog/post,app=post",
        "--port",
        "8080",
        "--posture",
        "calico",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("ALLOW\n"), "{out}");
    assert!(out.contains("ingress of spiffe://cluster.local/ns/microblog/sa/post: allowed by NetworkPolicy microblog/post-allow-list rule ingress[0]"), "{out}");

    let (code, out, err) = check(&[
        "--from",
        "microblog/user",
        "--to",
        "microblog/post,app=post",
        "--port",
        "8080",
        "--posture",
        "calico",
    ]);
    assert!(
        out.starts_with("DENY\n") && out.contains("denied by end-of-policies"),
        "{out}"
    );
    assert_eq!(
        code,
        Some(1),
        "DENY exits 1, as grep does when nothing matches"
    );
    assert!(err.is_empty(), "the answer is on stdout: {err}");
    // Zero trust: api's egress is selected by no policy, so it is denied too.
    let (_, out, _) = check(&[
        "--from",
        "microblog/api",
        "--to",
        "microblog/post,app=post",
        "--port",
        "8080",
    ]);
    assert!(
        out.starts_with("DENY\n")
            && out.contains(
                "egress of spiffe://cluster.local/ns/microblog/sa/api: denied by default-deny"
            ),
        "{out}"
    );
    let (_, out, _) = check(&[
        "--from",
        "microblog/search",
        "--to",
        "microblog/post,app=post",
        "--port",
        "9999",
        "--posture",
        "calico",
    ]);
    assert!(out.starts_with("DENY\n"), "wrong port: {out}");
}

/// What-if for external networks and other trust domains: an address outside the mesh is
/// selected by the labels of the network sets that contain it, and only the local identity's
/// direction is decided.
#[test]
fn meshctl_policy_check_knows_external_networks_and_remote_trust_domains() {
    let dir = std::env::temp_dir().join(format!("meshctl-ext-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ext.yaml"),
        "apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: partner-db, labels: {role: partner-db}}
spec: {nets: [198.19.0.0/24]}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-out, namespace: microblog}
spec:
  selector: app == 'api'
  egress:
    - action: Allow
      protocol: TCP
      destination: {selector: role == 'partner-db', namespaceSelector: global(), ports: [5432]}
",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(bin("meshctl"))
            .args([
                "policy",
                "check",
                "-f",
                dir.to_str().unwrap(),
                "--trust-domain",
                "example.org",
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = run(&[
        "--from",
        "microblog/api,app=api",
        "--to",
        "198.19.0.5",
        "--port",
        "5432",
    ]);
    assert!(out.starts_with("ALLOW\n"), "{out}");
    assert!(out.contains("egress of spiffe://example.org/ns/microblog/sa/api: allowed by NetworkPolicy microblog/api-out rule egress[0]"), "{out}");
    assert!(
        out.contains("ingress of 198.19.0.5 (GlobalNetworkSet partner-db): outside the mesh"),
        "{out}"
    );
    let out = run(&[
        "--from",
        "microblog/api,app=api",
        "--to",
        "198.19.1.5",
        "--port",
        "5432",
    ]);
    assert!(
        out.starts_with("DENY\n") && out.contains("198.19.1.5 (outside the mesh)"),
        "{out}"
    );
    let out = run(&[
        "--from",
        "partner.org/microblog/api,app=api",
        "--to",
        "198.19.0.5",
        "--port",
        "5432",
    ]);
    assert!(
        out.contains("decided by partner.org's own policies"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_invalid_policy_set_is_refused_naming_every_error() {
    let dir = std::env::temp_dir().join(format!("meshctl-policy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: a, namespace: n}\nspec:\n  selector: app == 'x\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: b}\nspec:\n  ingres: []\n  ingress:\n  - action: Allow\n    protocol: 300\n    destination:\n      ports: [80800]\n",
    )
    .unwrap();
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n";
    std::fs::write(dir.join("ns1.yaml"), ns).unwrap();
    std::fs::write(dir.join("ns2.yaml"), format!("---\n{ns}")).unwrap();
    let o = Command::new(bin("meshctl"))
        .args([
            "policy",
            "check",
            "-f",
            dir.to_str().unwrap(),
            "--from",
            "n/a",
            "--to",
            "n/b",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    // Every error of a document, each at its file, line and column, in the user's words.
    assert!(
        err.contains(
            "bad.yaml:11:3: document 2 (GlobalNetworkPolicy/b): spec: unknown field `ingres`"
        ),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:14:5: document 2 (GlobalNetworkPolicy/b): spec.ingress[0].protocol: protocol number 300 is out of range (0 to 255)"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:16:7: document 2 (GlobalNetworkPolicy/b): spec.ingress[0].destination.ports[0]: port 80800 is out of range (0 to 65535)"),
        "{err}"
    );
    assert!(!err.contains("untagged enum"), "{err}");
    // Found when compiling, still named by file, line, column, document and field.
    assert!(
        err.contains("bad.yaml:5:3: document 1 (NetworkPolicy n/a): spec.selector: selector `app == 'x`: column 8"),
        "{err}"
    );
    // The same object in two files is refused, naming both.
    assert!(
        err.contains("ns2.yaml:2:1: document 1: Namespace n is also ")
            && err.contains("ns1.yaml:1:1: document 1"),
        "{err}"
    );
    assert!(err.contains("(5 error(s))"), "{err}");

    // -f - reads standard input; its errors name <stdin>.
    let mut child = Command::new(bin("meshctl"))
        .args(["policy", "check", "-f", "-", "--from", "n/a", "--to", "n/b"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n---\napiVersion: v1\nkind: Namespce\nmetadata: {name: m}\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("<stdin>:5:1: document 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `meshctl policy test`: the microblog's own cases pass; with `search` taken out of
/// post-allow-list exactly its case fails, named with what decided, and the command exits 1.
#[test]
fn policy_tests_run_offline_and_name_the_failing_case() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/microblog");
    let o = Command::new(bin("meshctl"))
        .args(["policy", "test", "-f"])
        .arg(&examples)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("11 case(s), 11 passed, 0 failed"), "{out}");

    let dir = std::env::temp_dir().join(format!("meshctl-policy-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&examples).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replace(r#"names: ["api", "search"]"#, r#"names: ["api"]"#);
        std::fs::write(dir.join(p.file_name().unwrap()), text).unwrap();
    }
    let o = Command::new(bin("meshctl"))
        .args(["policy", "test", "-o", "json", "-f"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["failed"], 1, "{report}");
    let failed: Vec<&serde_json::Value> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["passed"] == false)
        .collect();
    assert_eq!(failed[0]["name"], "search reaches post");
    assert_eq!(failed[0]["verdict"], "Deny");
    assert_eq!(failed[0]["decided_by"], "end-of-policies");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The what-if tool knows the Calico model this release adds: beside the enforced verdict it says
/// what the staged policies would decide, a tier ahead of `default` decides first, and an
/// identity's named ports (`,port:NAME=PORT/PROTO`) meet rules that name them.
#[test]
fn policy_check_shows_staged_verdicts_tiers_and_named_ports() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/microblog");
    let dir = std::env::temp_dir().join(format!("meshctl-policy-staged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&examples).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let staged = std::fs::read_to_string(examples.join("post-allow-list.yaml"))
        .unwrap()
        .replace("kind: NetworkPolicy", "kind: StagedNetworkPolicy")
        .replace(r#"names: ["api", "search"]"#, r#"names: ["api"]"#);
    assert!(staged.contains("StagedNetworkPolicy") && !staged.contains(r#""search""#));
    std::fs::write(dir.join("staged.yaml"), staged).unwrap();
    let check = |args: &[&str]| {
        let o = Command::new(bin("meshctl"))
            .args(["policy", "check", "--posture", "calico", "-f"])
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let search = [
        "--from",
        "microblog/search",
        "--to",
        "microblog/post,app=post",
        "--port",
        "8080",
    ];
    let (code, out) = check(&search);
    assert_eq!(
        code,
        Some(0),
        "the enforced verdict decides the exit: {out}"
    );
    assert!(
        out.starts_with("ALLOW\n") && out.contains("  staged: DENY by end-of-policies"),
        "{out}"
    );
    let (_, out) = check(&[&search[..], &["-o", "json"]].concat());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["staged"]["verdict"], "DENY");
    assert_eq!(v["staged"]["ingress"]["by"], "end-of-policies");
    let (_, out) = check(&[
        "--from",
        "microblog/api",
        "--to",
        "microblog/post,app=post",
        "--port",
        "8080",
    ]);
    assert!(
        out.contains("staged: ALLOW by StagedNetworkPolicy microblog/post-allow-list"),
        "{out}"
    );

    // A tier ahead of default: its Deny decides before post-allow-list is asked.
    std::fs::write(
        dir.join("tier.yaml"),
        "apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.no-search}
spec:
  tier: security
  selector: app == 'post'
  ingress:
    - action: Deny
      source: {serviceAccounts: {names: [search]}}
    - action: Pass
",
    )
    .unwrap();
    let (code, out) = check(&search);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("denied by GlobalNetworkPolicy security.no-search rule ingress[0]"),
        "{out}"
    );
    let (code, _) = check(&[
        "--from",
        "microblog/api",
        "--to",
        "microblog/post,app=post",
        "--port",
        "8080",
    ]);
    assert_eq!(
        code,
        Some(0),
        "Pass goes on to the default tier, which allows api"
    );

    // Named ports: the rule names `web`; post's web is 8080/TCP.
    let named = std::fs::read_to_string(examples.join("post-allow-list.yaml"))
        .unwrap()
        .replace("          - 8080", "          - web");
    assert!(named.contains("- web"));
    std::fs::write(dir.join("post-allow-list.yaml"), named).unwrap();
    std::fs::remove_file(dir.join("tier.yaml")).unwrap();
    std::fs::remove_file(dir.join("policy-tests.yaml")).unwrap();
    let api_to = |to: &str| check(&["--from", "microblog/api", "--to", to, "--port", "8080"]).0;
    assert_eq!(api_to("microblog/post,app=post,port:web=8080/tcp"), Some(0));
    assert_eq!(api_to("microblog/post,app=post,port:web=9090/tcp"), Some(1));
    assert_eq!(api_to("microblog/post,app=post"), Some(1));
    let (code, out) = check(&[
        "--from",
        "microblog/api",
        "--to",
        "microblog/post,port:Web=1",
        "--port",
        "1",
    ]);
    assert_eq!(code, Some(2), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `meshctl policy graph` from the policy files alone: the guide's microblog flow graph, as a
/// table, JSON and Graphviz DOT.
#[test]
fn policy_graph_draws_the_microblog_flow_graph_from_the_files() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/microblog");
    let graph = |args: &[&str]| {
        let o = Command::new(bin("meshctl"))
            .args(["policy", "graph", "-f"])
            .arg(&examples)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let table = graph(&[]);
    assert!(table.contains("5 node(s), 6 edge(s)"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&graph(&["-o", "json"])).unwrap();
    let name = |i: &serde_json::Value| {
        json["nodes"][i.as_u64().unwrap() as usize]["id"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    };
    let mut edges: Vec<String> = json["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}->{} {}",
                name(&e["from"]),
                name(&e["to"]),
                e["flows"][0].as_str().unwrap()
            )
        })
        .collect();
    edges.sort();
    assert_eq!(
        edges,
        [
            "api->post TCP 8080",
            "api->search TCP 8080",
            "api->user TCP 8080",
            "post->storage TCP 5432",
            "search->post TCP 8080",
            "user->storage TCP 5432"
        ]
    );
    let dot = graph(&["-o", "dot", "--group-by", "app"]);
    assert!(
        dot.contains("\"app=search\" -> \"app=post\" [label=\"TCP 8080\"];"),
        "{dot}"
    );
    let wide = graph(&["-o", "wide"]);
    assert!(
        wide.contains(
            "NetworkPolicy microblog/search-egress; NetworkPolicy microblog/post-allow-list"
        ),
        "{wide}"
    );
}

/// Flow logs overlaid on the graph: each edge says whether it was used, never used, denied or
/// would be denied; a bad line is refused with its file and line.
#[test]
fn policy_graph_overlays_observed_flows() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/microblog");
    let dir = std::env::temp_dir().join(format!("meshctl-graph-flows-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rec = |from: &str, to: &str, port: u16, verdict: &str| {
        let end = |name: &str, port: u16| {
            serde_json::json!({"ip": "100.64.3.1", "port": port, "trust_domain": "cluster.local",
                "namespace": "microblog", "name": name, "labels": {}})
        };
        serde_json::json!({"seq": 1, "time": "2026-11-24T00:00:00.000Z", "event": "new",
            "direction": "ingress", "verdict": verdict, "protocol": "tcp",
            "src": end(from, 40000), "dst": end(to, port), "policy": "p"})
        .to_string()
    };
    let log = dir.join("flows.jsonl");
    let lines = [
        rec("api", "post", 8080, "allow"),
        rec("search", "user", 8080, "deny"),
        rec("user", "storage", 5432, "audit"),
    ];
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let run = |log: &Path| {
        Command::new(bin("meshctl"))
            .args(["policy", "graph", "-f"])
            .arg(&examples)
            .arg("--flows")
            .arg(log)
            .output()
            .unwrap()
    };
    let o = run(&log);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let state = |from: &str, to: &str| {
        out.lines()
            .find(|l| {
                l.starts_with(&format!("cluster.local/microblog/{from} "))
                    && l.contains(&format!("microblog/{to} "))
            })
            .unwrap_or_else(|| panic!("{from} -> {to}: {out}"))
            .split_whitespace()
            .last()
            .unwrap()
            .to_string()
    };
    assert_eq!(state("api", "post"), "used");
    assert_eq!(state("api", "search"), "unused");
    assert_eq!(state("search", "user"), "denied");
    assert_eq!(state("user", "storage"), "would-deny");
    assert!(out.contains("5 node(s), 7 edge(s)"), "{out}");
    std::fs::write(&log, format!("{}\nnot json\n", lines[0])).unwrap();
    let o = run(&log);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("flows.jsonl:2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
