//! The root of trust from the operator's side: `meshctl ca` and `meshctl identity`, run as real
//! processes against files in a temporary directory.

use mesh_tests::{bin, meshctl};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("meshctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn p(&self, rel: &str) -> String {
        self.0.join(rel).to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ok(args: &[&str]) -> String {
    let out = meshctl(args);
    assert!(
        out.status.success(),
        "meshctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn inspect_json(cert: &str, ca: Option<&str>) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["identity", "inspect", cert, "-o", "json"];
    if let Some(ca) = ca {
        args.extend(["--ca", ca]);
    }
    let out = meshctl(&args);
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout).expect("inspect -o json prints JSON"),
    )
}

#[test]
fn ca_init_and_issue_with_a_node_made_key() {
    let d = Dir::new("issue");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("ca"),
    ]);
    assert_eq!(mode(&d.p("ca/ca.key")), 0o600);
    // The recommended flow: the node makes its key and hands over only the public half.
    let private = ok(&["genkey"]);
    std::fs::write(d.p("node.pub"), {
        let mut c = Command::new(bin("meshctl"))
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(private.as_bytes())
            .unwrap();
        c.wait_with_output().unwrap().stdout
    })
    .unwrap();
    let public = std::fs::read_to_string(d.p("node.pub")).unwrap();
    ok(&[
        "identity",
        "issue",
        "--ca",
        &d.p("ca"),
        "--namespace",
        "microblog",
        "--name",
        "post",
        "--label",
        "app=post",
        "--label",
        "svc-post=access",
        "--ip",
        "100.64.0.5/32",
        "--ip",
        "fd00::5",
        "--ttl",
        "30d",
        "--public-key",
        &d.p("node.pub"),
        "--out",
        &d.p("ids"),
    ]);
    assert!(
        !Path::new(&d.p("ids/post.key")).exists(),
        "no private key is made when one is given"
    );
    let (code, j) = inspect_json(&d.p("ids/post.crt"), Some(&d.p("ca")));
    assert_eq!(code, Some(0));
    assert_eq!(j["verification"], "ok");
    assert_eq!(j["identity"], "example.org/microblog/post");
    assert_eq!(j["spiffe_id"], "spiffe://example.org/ns/microblog/sa/post");
    assert_eq!(j["public_key"], public.trim());
    assert_eq!(j["labels"]["svc-post"], "access");
    assert_eq!(
        j["addrs"],
        serde_json::json!(["100.64.0.5/32", "fd00::5/128"])
    );
    let validity = j["not_after"].as_u64().unwrap() - j["not_before"].as_u64().unwrap();
    assert_eq!(validity, 30 * 86400);

    // Without --public-key a key pair is made, the private half mode 0600.
    ok(&[
        "identity",
        "issue",
        "--ca",
        &d.p("ca"),
        "--namespace",
        "microblog",
        "--name",
        "api",
        "--ip",
        "100.64.0.6/32",
        "--out",
        &d.p("ids"),
    ]);
    assert_eq!(mode(&d.p("ids/api.key")), 0o600);
    let table = ok(&[
        "identity",
        "inspect",
        &d.p("ids/api.crt"),
        "--ca",
        &d.p("ca"),
    ]);
    assert!(table.contains("verifies     yes"), "{table}");
}

#[test]
fn inspect_refuses_other_cas_tampering_revocation_and_expiry() {
    let d = Dir::new("refuse");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("ca"),
    ]);
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("other"),
    ]);
    ok(&[
        "identity",
        "issue",
        "--ca",
        &d.p("ca"),
        "--namespace",
        "ns1",
        "--name",
        "svc",
        "--ip",
        "100.64.1.1/32",
        "--out",
        &d.p("ids"),
    ]);
    let cert = d.p("ids/svc.crt");

    let (code, j) = inspect_json(&cert, Some(&d.p("other")));
    assert_eq!(code, Some(1));
    assert!(
        j["verification"]
            .as_str()
            .unwrap()
            .contains("not in the trust bundle"),
        "{j}"
    );

    // Tamper: swap the certificate's address for another one of the same length.
    let text = std::fs::read_to_string(&cert).unwrap();
    let bytes = proto::armor::decode(proto::armor::CERTIFICATE, &text).unwrap();
    let pos = bytes.windows(4).position(|w| w == [100, 64, 1, 1]).unwrap();
    let mut forged = bytes.clone();
    forged[pos + 3] = 2;
    std::fs::write(
        d.p("forged.crt"),
        proto::armor::encode(proto::armor::CERTIFICATE, &forged),
    )
    .unwrap();
    let (code, j) = inspect_json(&d.p("forged.crt"), Some(&d.p("ca")));
    assert_eq!(code, Some(1));
    assert_eq!(j["verification"], "the signature does not verify");
    assert_eq!(j["addrs"][0], "100.64.1.2/32");

    let serial = inspect_json(&cert, None).1["serial"].as_u64().unwrap();
    ok(&[
        "ca",
        "revoke",
        "--ca",
        &d.p("ca"),
        "--serial",
        &serial.to_string(),
    ]);
    let (code, j) = inspect_json(&cert, Some(&d.p("ca")));
    assert_eq!(code, Some(1));
    assert_eq!(j["verification"], format!("serial {serial} is revoked"));
    // A serial this CA never issued is an error, naming it; the list stays as it was.
    let out = meshctl(&["ca", "revoke", "--ca", &d.p("ca"), "--serial", "42"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--serial 42: not in") && err.contains("this CA never issued it"),
        "{err}"
    );
    let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    ok(&["ca", "revoke", "--ca", &d.p("ca"), "--key", key]);
    let crl = proto::armor::decode(
        proto::armor::REVOCATION_LIST,
        &std::fs::read_to_string(d.p("ca/revoked.crl")).unwrap(),
    )
    .unwrap();
    let crl = proto::cert::RevocationList::decode(&crl).unwrap();
    assert_eq!(
        (crl.number, crl.serials.len(), crl.keys.len()),
        (2, 1, 1),
        "each revocation bumps the list number"
    );
    // The list as an operator reads it, and checked against its CA.
    let shown = ok(&[
        "ca",
        "crl",
        "inspect",
        &d.p("ca/revoked.crl"),
        "--ca",
        &d.p("ca"),
    ]);
    assert!(shown.contains("number       2"), "{shown}");
    assert!(
        shown.contains(&serial.to_string()) && shown.contains(key),
        "{shown}"
    );
    assert!(shown.contains("verifies     ok"), "{shown}");
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "ca",
        "crl",
        "inspect",
        &d.p("ca/revoked.crl"),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(j["serials"][0], serial);
    assert_eq!(j["keys"][0], key);
    assert!(j["issued_at"].as_str().unwrap().ends_with('Z'));
    let other = Dir::new("otherca");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &other.p("ca"),
    ]);
    let out = meshctl(&[
        "ca",
        "crl",
        "inspect",
        &d.p("ca/revoked.crl"),
        "--ca",
        &other.p("ca"),
    ]);
    assert_eq!(out.status.code(), Some(1), "another CA did not sign it");

    ok(&[
        "identity",
        "issue",
        "--ca",
        &d.p("ca"),
        "--namespace",
        "ns1",
        "--name",
        "brief",
        "--ip",
        "100.64.1.3/32",
        "--ttl",
        "1s",
        "--out",
        &d.p("ids"),
    ]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (code, j) = inspect_json(&d.p("ids/brief.crt"), Some(&d.p("ca")));
    assert_eq!(code, Some(1));
    assert!(
        j["verification"]
            .as_str()
            .unwrap()
            .starts_with("expired at"),
        "{j}"
    );
}

#[test]
fn bad_input_is_named_and_nothing_is_overwritten() {
    let d = Dir::new("bad");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("ca"),
    ]);
    let before = std::fs::read(d.p("ca/ca.key")).unwrap();
    let again = meshctl(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("ca"),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a CA"));
    assert_eq!(
        std::fs::read(d.p("ca/ca.key")).unwrap(),
        before,
        "the CA key is untouched"
    );

    let (ca_dir, ids_dir) = (d.p("ca"), d.p("ids"));
    let issue = |extra: &[&str]| {
        let mut a = vec!["identity", "issue", "--ca", &ca_dir, "--out", &ids_dir];
        a.extend_from_slice(extra);
        let o = meshctl(&a);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = issue(&["--namespace", "Bad_NS", "--name", "x", "--ip", "100.64.0.1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("namespace `Bad_NS`"), "{err}");
    let (code, err) = issue(&["--namespace", "ns", "--name", "x", "--ip", "100.64.0.1/40"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--ip `100.64.0.1/40`"), "{err}");
    let (code, err) = issue(&[
        "--namespace",
        "ns",
        "--name",
        "x",
        "--ip",
        "100.64.0.1",
        "--ttl",
        "5y",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--ttl") && err.contains("5y"), "{err}");
    let (code, err) = issue(&[
        "--namespace",
        "ns",
        "--name",
        "x",
        "--ip",
        "100.64.0.1",
        "--label",
        "novalue",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--label `novalue`"), "{err}");

    std::fs::set_permissions(d.p("ca/ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = issue(&["--namespace", "ns", "--name", "x", "--ip", "100.64.0.1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("ca.key is accessible by others (mode 644)"),
        "{err}"
    );

    let missing = meshctl(&["identity", "inspect", &d.p("nope.crt")]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.crt"));
}

fn check_config(path: &str) -> (Option<i32>, String) {
    let o = Command::new(bin("meshd"))
        .args(["--check-config", path])
        .output()
        .unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn meshd_check_config_validates_the_file_and_the_identity_it_names() {
    let d = Dir::new("config");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("ca"),
    ]);
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("rogue"),
    ]);
    for (ca, name) in [("ca", "post"), ("ca", "api"), ("rogue", "evil")] {
        ok(&[
            "identity",
            "issue",
            "--ca",
            &d.p(ca),
            "--namespace",
            "microblog",
            "--name",
            name,
            "--ip",
            "100.64.0.5/32",
            "--out",
            &d.p("ids"),
        ]);
    }
    let write = |file: &str, cert: &str, key: &str, extra: &str| {
        let text = format!(
            "[interface]\nname = \"mesh0\"\n{extra}\n[identity]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\n[trust]\nbundle = [\"{}\"]\n\n[peering]\nseeds = [\"198.18.0.1:51820\"]\nstate_dir = \"{}\"\n",
            d.p(cert), d.p(key), d.p("ca/ca.crt"), d.p("state")
        );
        std::fs::write(d.p(file), text).unwrap();
        d.p(file)
    };
    let (code, out) = check_config(&write("good.toml", "ids/post.crt", "ids/post.key", ""));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("identity example.org/microblog/post") && out.contains("1 seed(s)"),
        "{out}"
    );

    // The policy settings and the policy-admin keys are read and checked too.
    ok(&["policy", "admin-key", "--out", &d.p("admin.key")]);
    let with_policy = |file: &str, admin: &str| {
        let base = std::fs::read_to_string(d.p("good.toml")).unwrap();
        let text = base.replace(
            "[peering]",
            &format!("policy_admins = [\"{}\"]\n\n[peering]", d.p(admin)),
        ) + "\n[policy]\nposture = \"calico\"\naudit = true\nconntrack_max = 1000\n";
        std::fs::write(d.p(file), text).unwrap();
        d.p(file)
    };
    let (code, out) = check_config(&with_policy("policy.toml", "admin.key.pub"));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "policy: posture calico, audit on, 1 policy admin(s), up to 1000 tracked flows"
        ),
        "{out}"
    );
    let (code, out) = check_config(&with_policy("badadmin.toml", "ids/post.crt"));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("post.crt") && out.contains("MESH POLICY ADMIN PUBLIC KEY"),
        "{out}"
    );

    let (code, out) = check_config(&write(
        "typo.toml",
        "ids/post.crt",
        "ids/post.key",
        "listen_prot = 5",
    ));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("typo.toml")
            && out.contains("unknown field `listen_prot`")
            && out.contains("line 3"),
        "{out}"
    );

    let (code, out) = check_config(&write("swap.toml", "ids/post.crt", "ids/api.key", ""));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("post.crt is for key") && out.contains("api.key holds the private key"),
        "{out}"
    );

    let (code, out) = check_config(&write("rogue.toml", "ids/evil.crt", "ids/evil.key", ""));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("does not verify") && out.contains("not in the trust bundle"),
        "{out}"
    );

    std::fs::set_permissions(d.p("ids/post.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, out) = check_config(&d.p("good.toml"));
    assert_eq!(code, Some(1));
    assert!(out.contains("post.key is accessible by others"), "{out}");

    let (code, out) = check_config(&d.p("missing.toml"));
    assert_eq!(code, Some(1));
    assert!(out.contains("missing.toml"), "{out}");
}

#[test]
fn identity_issue_force_renews_in_place_keeping_the_key() {
    let d = Dir::new("force");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("ca"),
    ]);
    let args = |extra: &[&'static str]| {
        let mut a: Vec<String> = [
            "identity",
            "issue",
            "--ca",
            &d.p("ca"),
            "--namespace",
            "prod",
            "--name",
            "web",
            "--ip",
            "100.64.1.1/32",
            "--out",
            &d.p("ids"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| meshctl(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run(args(&[])).status.success());
    let key = std::fs::read(d.p("ids/web.key")).unwrap();
    let first = inspect_json(&d.p("ids/web.crt"), None).1;
    // Without --force: refused, and it says how to renew.
    let again = run(args(&[]));
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force renews it in place"));
    // With --force: a new certificate (serial, validity) for the same key; the key file stays.
    let renewed = run(args(&["--force", "--label", "tier=front"]));
    assert!(
        renewed.status.success(),
        "{}",
        String::from_utf8_lossy(&renewed.stderr)
    );
    let second = inspect_json(&d.p("ids/web.crt"), Some(&d.p("ca"))).1;
    assert_eq!(
        std::fs::read(d.p("ids/web.key")).unwrap(),
        key,
        "the key stays"
    );
    assert_eq!(second["public_key"], first["public_key"]);
    assert_ne!(second["serial"], first["serial"]);
    assert_eq!(second["labels"]["tier"], "front");
    assert_eq!(second["verification"], "ok");
    assert_eq!(mode(&d.p("ids/web.crt")), 0o644);
    // The CA recorded both: either serial can be revoked by number.
    for s in [&first["serial"], &second["serial"]] {
        ok(&[
            "ca",
            "revoke",
            "--ca",
            &d.p("ca"),
            "--serial",
            &s.to_string(),
        ]);
    }
    assert_eq!(mode(&d.p("ca/issued.jsonl")), 0o600);
}

#[test]
fn both_binaries_name_the_git_commit_they_were_built_from() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let want = commit.unwrap_or_else(|| "unknown".into());
    let meshd = Command::new(bin("meshd"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&meshd.stdout);
    assert!(
        text.starts_with("meshd 0.") && text.contains(&format!("({want})")),
        "{text}"
    );
    let text = ok(&["version"]);
    assert!(
        text.starts_with("meshctl 0.") && text.contains(&format!("({want})")),
        "{text}"
    );
}

#[test]
fn workloads_are_registered_listed_replaced_and_removed_and_a_refused_change_keeps_the_registry() {
    let d = Dir::new("workloads");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        &d.p("ca"),
    ]);
    let ca = d.p("ca");
    let register = |name: &str, uid: &str, node: &str, ip: &str| {
        meshctl(&[
            "workload",
            "register",
            "--ca",
            &ca,
            "--namespace",
            "microblog",
            "--name",
            name,
            "--uid",
            uid,
            "--service-account",
            name.split('-').next().unwrap(),
            "--node",
            node,
            "--ip",
            ip,
            "--label",
            "app=post",
            "--port",
            "http=8080/tcp",
        ])
    };
    let out = register("post-1", "u1", "nodes/node-a", "100.64.1.5/32");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "registered microblog/post-1 (uid u1) on nodes/node-a\n"
    );
    let file = d.p("ca/workloads.yaml");
    assert_eq!(mode(&file), 0o600);
    let before = std::fs::read(&file).unwrap();

    // Another workload may not take post-1's address: refused, the file untouched.
    let out = register("search-1", "u3", "nodes/node-b", "100.64.1.5/32");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("100.64.1.5/32 is held by microblog/post-1") && err.contains("unchanged"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
    // Bad input names the flag.
    let out = register("api-1", "u4", "node-b", "100.64.2.5/32");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node"));

    let list: serde_json::Value =
        serde_json::from_str(&ok(&["workload", "list", "--ca", &ca, "-o", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["serviceAccount"], "post");
    assert_eq!(list[0]["node"], "nodes/node-a");
    assert_eq!(list[0]["addrs"][0], "100.64.1.5/32");
    assert_eq!(list[0]["ports"][0], "http=8080/tcp");

    // The same pod name again, a new pod on another node: it replaces the old one.
    let out = register("post-1", "u2", "nodes/node-b", "100.64.1.5/32");
    assert!(String::from_utf8_lossy(&out.stdout).contains("replacing uid u1 on nodes/node-a"));
    let table = ok(&["workload", "list", "--ca", &ca]);
    assert!(
        table.contains("microblog/post-1\tpost\tnodes/node-b\t100.64.1.5/32"),
        "{table}"
    );

    let remove = || {
        meshctl(&[
            "workload",
            "remove",
            "--ca",
            &ca,
            "--namespace",
            "microblog",
            "--name",
            "post-1",
        ])
    };
    assert!(remove().status.success());
    let out = remove();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workload microblog/post-1"));
    // Its address is free again.
    let out = register("search-1", "u3", "nodes/node-b", "100.64.1.5/32");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Registered again without --uid on the same node (a label changed): the same workload.
    let again = ok(&[
        "workload",
        "register",
        "--ca",
        &ca,
        "--namespace",
        "microblog",
        "--name",
        "search-1",
        "--service-account",
        "search",
        "--node",
        "nodes/node-b",
        "--ip",
        "100.64.1.5/32",
        "--label",
        "app=search",
    ]);
    assert!(
        again.contains("(uid u3)") && again.contains("replacing uid u3"),
        "{again}"
    );
    // A mistyped CA directory is an error, not an empty registry.
    let out = meshctl(&["workload", "list", "--ca", &d.p("no-such-ca")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a CA directory"));

    // A hand-edited file with a misspelt key: every command says where, and changes nothing.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("serviceAccount", "serviceAcount");
    std::fs::write(&file, &text).unwrap();
    let out = meshctl(&["workload", "list", "--ca", &ca]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workloads.yaml") && err.contains("serviceAcount"),
        "{err}"
    );
    assert!(!register("post-2", "u5", "nodes/node-a", "100.64.1.9/32")
        .status
        .success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}
