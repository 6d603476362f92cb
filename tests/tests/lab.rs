//! `meshctl lab`: the README's main command, run as an operator would.

use mesh_tests::*;
use std::process::{Command, Output};

/// Runs `meshctl lab ARGS` with this test's prefix and directory.
fn lab(prefix: &str, dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("meshctl"))
        .arg("lab")
        .args(args)
        .args(["--prefix", prefix, "--dir"])
        .arg(dir)
        .output()
        .expect("running meshctl lab")
}

/// Takes the lab down even when the test fails.
struct Down<'a>(&'a str, &'a std::path::Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = lab(self.0, self.1, &["down"]);
    }
}

fn namespaces(prefix: &str) -> Vec<String> {
    sh(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

#[test]
fn lab_up_runs_the_microblog_example_and_lab_down_removes_everything() {
    if !can_run() {
        return;
    }
    let prefix = format!("l{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("meshtest-lab-{prefix}"));
    let _down = Down(&prefix, &dir);

    let up = lab(&prefix, &dir, &["up", "--example", "microblog"]);
    let out = String::from_utf8_lossy(&up.stdout).to_string();
    assert!(
        up.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // Every edge allowed, by both sides' allow-lists; the non-edges denied, and by whom.
    for (flow, verdict, by) in [
        (
            "api -> post:8080",
            "ALLOWED",
            "ingress of post: allow NetworkPolicy microblog/post-allow-list ingress[0]",
        ),
        (
            "api -> search:8080",
            "ALLOWED",
            "ingress of search: allow NetworkPolicy microblog/search-allow-list",
        ),
        (
            "api -> user:8080",
            "ALLOWED",
            "ingress of user: allow NetworkPolicy microblog/user-allow-list",
        ),
        (
            "search -> post:8080",
            "ALLOWED",
            "egress of search: allow NetworkPolicy microblog/search-egress",
        ),
        (
            "post -> storage:5432",
            "ALLOWED",
            "ingress of storage: allow NetworkPolicy microblog/storage-allow-list",
        ),
        (
            "user -> storage:5432",
            "ALLOWED",
            "egress of user: allow NetworkPolicy microblog/storage-clients-egress",
        ),
        (
            "search -> user:8080",
            "DENIED",
            "egress of search: deny end-of-policies",
        ),
        (
            "api -> storage:5432",
            "DENIED",
            "egress of api: deny end-of-policies",
        ),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(flow))
            .unwrap_or_else(|| panic!("no line for {flow}:\n{out}"));
        assert!(line.contains(verdict) && line.contains(by), "{line}");
    }
    assert_eq!(namespaces(&prefix).len(), 6, "five services and the switch");

    let status = lab(&prefix, &dir, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    for service in ["api", "post", "search", "user", "storage"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(service))
            .unwrap_or_else(|| panic!("no row for {service}:\n{text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[3], "4", "{service} has four peers: {row}");
        assert_eq!(cols[4], "1", "{service} enforces policy set 1: {row}");
    }
    // A second `up` refuses while one runs, and changes nothing.
    let again = lab(&prefix, &dir, &["up"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    let down = lab(&prefix, &dir, &["down"]);
    assert!(down.status.success());
    assert!(String::from_utf8_lossy(&down.stdout)
        .contains("5 daemon(s) stopped, 6 namespace(s) removed"));
    assert!(namespaces(&prefix).is_empty());
    assert!(!dir.exists());
}

/// Removes a network namespace this test added, even when the test fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The lab removes only what it made: it refuses a directory holding someone else's files and a
/// prefix whose namespaces exist, and `lab down` leaves a namespace of its prefix that it did not
/// add, and a directory it did not make.
#[test]
fn the_lab_leaves_what_it_did_not_make_alone() {
    if !can_run() {
        return;
    }
    let prefix = format!("k{}", std::process::id() % 100_000);
    let base = std::env::temp_dir().join(format!("meshtest-lab-{prefix}"));
    let _cleanup = Down(&prefix, &base.join("lab"));
    std::fs::create_dir_all(&base).unwrap();

    // Someone else's directory: refused, its file kept, no namespace added.
    let theirs = base.join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("sentinel"), "keep me").unwrap();
    let up = lab(&prefix, &theirs, &["up"]);
    assert_eq!(up.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(
        err.contains("not empty, and not a lab meshctl made"),
        "{err}"
    );
    let down = lab(&prefix, &theirs, &["down"]);
    assert!(!down.status.success(), "down refuses it too");
    assert_eq!(
        std::fs::read_to_string(theirs.join("sentinel")).unwrap(),
        "keep me"
    );
    assert!(namespaces(&prefix).is_empty());

    // A namespace the lab would add exists: refused, naming it; it stays.
    let post = Netns(format!("{prefix}-post"));
    sh(&["ip", "netns", "add", &post.0]);
    let dir = base.join("lab");
    let up = lab(&prefix, &dir, &["up"]);
    assert_eq!(up.status.code(), Some(2));
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(err.contains(&format!("{}-post exists", prefix)), "{err}");
    assert_eq!(namespaces(&prefix), vec![post.0.clone()]);
    drop(post);

    // A namespace of the prefix that the lab does not use: up works around it, down leaves it.
    let foreign = Netns(format!("{prefix}-foreign"));
    sh(&["ip", "netns", "add", &foreign.0]);
    let up = lab(&prefix, &dir, &["up"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let down = lab(&prefix, &dir, &["down"]);
    assert!(down.status.success());
    assert_eq!(
        namespaces(&prefix),
        vec![foreign.0.clone()],
        "the foreign one stays"
    );
    assert!(!dir.exists(), "the directory the lab made is gone");
    assert!(theirs.join("sentinel").exists());
    let _ = std::fs::remove_dir_all(&base);
}

/// `meshctl lab up --nodes 2`: the services as pods on two nodes, added through the CNI plugin
/// with identities from the issuer; the guide's policies decide every flow across nodes and
/// within one.
#[test]
fn lab_up_on_two_nodes_runs_the_pods_and_decides_flows_across_and_within_nodes() {
    if !can_run() {
        return;
    }
    let prefix = format!("n{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("meshtest-lab-{prefix}"));
    let _down = Down(&prefix, &dir);
    let up = lab(
        &prefix,
        &dir,
        &["up", "--example", "microblog", "--nodes", "2"],
    );
    let out = String::from_utf8_lossy(&up.stdout).to_string();
    assert!(
        up.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // Each pod got its address from its certificate, through the CNI plugin.
    assert!(out.contains("post-2    on node2"), "{out}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(" -> ")).collect();
    for (where_, result) in [
        ("within", "ALLOWED"),
        ("across", "ALLOWED"),
        ("within", "DENIED"),
        ("across", "DENIED"),
    ] {
        assert!(
            rows.iter()
                .any(|r| r.contains(&format!(" {where_} ")) && r.contains(result)),
            "no {where_} {result} flow:\n{out}"
        );
    }
    let row = |flow: &str| {
        *rows
            .iter()
            .find(|r| r.starts_with(flow))
            .unwrap_or_else(|| panic!("no row {flow}:\n{out}"))
    };
    // The same service account on both nodes: api reaches both post replicas.
    assert!(
        row("api-1 -> post-1:8080").contains("within")
            && row("api-1 -> post-1:8080").contains("ALLOWED")
    );
    assert!(
        row("api-1 -> post-2:8080").contains("across")
            && row("api-1 -> post-2:8080").contains("ALLOWED")
    );
    assert!(row("api-1 -> post-2:8080")
        .contains("ingress of post-2: allow NetworkPolicy microblog/post-allow-list"));
    // api may not reach storage, on its node or the other.
    assert!(row("api-1 -> storage-1:5432").contains("DENIED"));
    assert!(row("api-1 -> storage-2:5432").contains("DENIED"));
    let status = lab(&prefix, &dir, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    for node in ["node1", "node2"] {
        let r = text
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("{text}"));
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(
            (cols[2], cols[4]),
            ("1", "1"),
            "one peer, policy set 1: {r}"
        );
    }
    let down = lab(&prefix, &dir, &["down"]);
    assert!(down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stdout)
            .contains("3 daemon(s) stopped, 12 namespace(s) removed"),
        "{}",
        String::from_utf8_lossy(&down.stdout)
    );
    assert!(namespaces(&prefix).is_empty());
}
