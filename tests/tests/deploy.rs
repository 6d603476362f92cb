//! The deployment files in deploy/ are checked by the tools that will read them: systemd's own
//! verifier and its exposure score for the units, the Kubernetes schemas for the manifests, and
//! the image's Dockerfile against what the build produces.

use mesh_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool the check needs: missing, the test is skipped with a message, or fails under CI.
fn tool(name: &str) -> Option<PathBuf> {
    let found = which(name);
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is needed under CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {name} not installed");
    }
    found
}

/// Each unit of deploy/systemd as an instance (`meshd@.service` as `meshd@wg0.service`) in a
/// scratch directory, with /usr/local/bin/ pointing at the binaries just built, so the verifier
/// checks the commands too.
fn units(dir: &Path) -> Vec<PathBuf> {
    let bin_dir = bin("meshd").parent().unwrap().to_path_buf();
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo().join("deploy/systemd")).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.ends_with(".service") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        let instance = dir.join(name.replace("@.", "@mesh0."));
        std::fs::write(&instance, text).unwrap();
        out.push(instance);
    }
    out.sort();
    out
}

#[test]
fn systemd_units_verify_and_expose_at_most_2_0() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("meshd-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let units = units(&dir);
    assert_eq!(units.len(), 2, "{units:?}");
    for unit in &units {
        let out = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            unit.display()
        );
        // Exposure 0.0 (locked down) to 10.0 (exposed); the threshold counts in tenths.
        let out = Command::new(&analyze)
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("no score");
        println!("{score}");
        assert!(out.status.success(), "{}: {score}\n{text}", unit.display());
    }
    // The mesh unit tells systemd when it is ready and reloads through meshctl, which fails when
    // meshd refuses the reload.
    let mesh = std::fs::read_to_string(repo().join("deploy/systemd/meshd-mesh@.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/usr/local/bin/meshctl reload -i %i",
        "User=meshd",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "DeviceAllow=/dev/net/tun rw",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=meshd meshd/%i",
    ] {
        assert!(mesh.lines().any(|l| l == line), "missing {line}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn manifests() -> PathBuf {
    repo().join("deploy/kubernetes")
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas_and_kustomize_lists_them_all() {
    let Some(validate) = tool("kubernetes-validate") else {
        return;
    };
    let mut files: Vec<String> = std::fs::read_dir(manifests())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    let out = Command::new(validate)
        .arg("--strict")
        .args(&files)
        .current_dir(manifests())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    println!("{text}");
    for f in &files {
        assert!(
            text.contains(&format!("{f} passed")),
            "{f} not validated:\n{text}"
        );
    }
    // kubectl apply -k applies every manifest of the directory.
    let kustomization: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let mut listed: Vec<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, files);
}

/// The DaemonSet asks for what the issue promises and nothing more: host network, the TUN
/// device, NET_ADMIN alone, probes on meshd's health endpoints, limits, a rolling update.
#[test]
fn the_daemonset_runs_meshd_with_one_capability_and_probes_its_health() {
    let ds: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests().join("daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    let added: Vec<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(added, ["NET_ADMIN"]);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert!(sc.get("privileged").is_none());
    // Liveness through the admin socket, which no one outside the pod can hold busy.
    assert_eq!(c["livenessProbe"]["exec"]["command"][1], "status");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let tun = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tun")
        .unwrap();
    assert_eq!(tun["hostPath"]["type"], "CharDevice");
}

/// The ConfigMap's meshd.toml is a configuration meshd takes: with a real CA, key, certificate
/// and admin key in place of the placeholders, `meshd --check-config` passes it. And the policies
/// ConfigMap holds the microblog example exactly as written.
#[test]
fn the_configmap_is_a_valid_configuration_and_the_policies_are_the_examples() {
    let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests().join("configmap.yaml")).unwrap(),
    )
    .unwrap();
    let toml = cm["data"]["meshd.toml"].as_str().unwrap();
    assert!(toml.contains("reload_on_change = true"));
    let dir = std::env::temp_dir().join(format!("meshd-cm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let meshctl = |args: &[&str]| run(Command::new(bin("meshctl")).args(args));
    let d = |p: &str| dir.join(p).display().to_string();
    meshctl(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        &d("ca"),
    ]);
    meshctl(&[
        "identity",
        "issue",
        "--ca",
        &d("ca"),
        "--namespace",
        "nodes",
        "--name",
        "node",
        "--ip",
        "100.64.0.1/32",
        "--out",
        &d("state/identity"),
    ]);
    // What a join leaves in the identity directory: the CA and the workload CA beside the
    // node's key and certificate.
    let prepared =
        String::from_utf8(meshctl(&["ca", "serve", "--ca", &d("ca"), "--prepare"]).stdout).unwrap();
    let issuer_key = prepared.split_whitespace().nth(1).unwrap().to_string();
    std::fs::copy(d("ca/ca.crt"), d("state/identity/ca.crt")).unwrap();
    std::fs::copy(d("ca/issuer/ca.crt"), d("state/identity/workload-ca.crt")).unwrap();
    meshctl(&["policy", "admin-key", "--out", &d("admin.key")]);
    let text = toml
        .replace("/etc/meshd/policy-admin.key.pub", &d("admin.key.pub"))
        .replace("REPLACE-WITH-THE-ISSUER-KEY", &issuer_key)
        .replace("/var/lib/meshd", &d("state"));
    let config = dir.join("meshd.toml");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(bin("meshd"))
        .arg("--check-config")
        .arg(&config)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("metrics at http://127.0.0.1:9469/metrics"),
        "{said}"
    );

    let policies: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests().join("policies.yaml")).unwrap(),
    )
    .unwrap();
    let data = policies["data"].as_mapping().unwrap();
    let examples = repo().join("examples/microblog");
    let mut names: Vec<String> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(data.len(), names.len());
    for n in &names {
        let want = std::fs::read_to_string(examples.join(n)).unwrap();
        assert_eq!(
            data[n.as_str()].as_str(),
            Some(want.as_str()),
            "{n} differs from the example"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The issuer's Deployment: alone (it assigns pod addresses), on the underlay (host network), with
/// read-only access to pods, namespaces and nodes and TokenReview create, nothing more; and the
/// DaemonSet's nodes join it with a projected token of the audience and service account it takes,
/// with flags meshctl takes.
#[test]
fn the_issuer_runs_alone_with_read_only_rbac_and_the_nodes_join_it_as_it_expects() {
    let text = std::fs::read_to_string(manifests().join("issuer.yaml")).unwrap();
    let docs: Vec<serde_yaml_ng::Value> = text
        .split("\n---\n")
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
    let deployment = kind("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "meshd-issuer");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let args: Vec<String> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().replace("$(HOST_IP)", "198.18.0.1"))
        .collect();
    let flag = |name: &str| args[args.iter().position(|a| a == name).unwrap() + 1].clone();
    assert!(args.iter().any(|a| a == "--kubernetes"));
    // meshctl takes these flags: it gets as far as reading the (missing) CA directory.
    let out = Command::new(bin("meshctl"))
        .args(
            args.iter()
                .map(|a| if a == "/ca" { "/nonexistent-ca" } else { a }),
        )
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("/nonexistent-ca is not a CA directory"),
        "{said}"
    );

    let role = kind("ClusterRole");
    let rules: Vec<(String, Vec<String>, Vec<String>)> = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |k: &str| -> Vec<String> {
                r[k].as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            (
                list("apiGroups").join(","),
                list("resources"),
                list("verbs"),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            (
                String::new(),
                vec!["pods".into(), "namespaces".into(), "nodes".into()],
                vec!["get".into(), "list".into(), "watch".into()]
            ),
            (
                "authentication.k8s.io".into(),
                vec!["tokenreviews".into()],
                vec!["create".into()]
            ),
        ]
    );
    let binding = kind("ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["name"], "meshd-issuer");
    assert_eq!(binding["roleRef"]["name"], "meshd-issuer");

    // The nodes: their pods' account is the one the issuer lets join, their token is for its
    // audience, and the join and renew containers run flags meshctl takes.
    let ds: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests().join("daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let dpod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        format!(
            "{}/{}",
            ds["metadata"]["namespace"].as_str().unwrap(),
            dpod["serviceAccountName"].as_str().unwrap()
        ),
        flag("--node-service-account")
    );
    let token = dpod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "token")
        .unwrap();
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"].as_str().unwrap(), flag("--audience"));
    // Readable by its owner only, or meshctl refuses it.
    assert_eq!(token["projected"]["defaultMode"], 0o400);
    let join = dpod["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "join")
        .unwrap();
    let renew = dpod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "renew")
        .unwrap();
    for (c, renews) in [(join, false), (renew, true)] {
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args.contains(&"--renew"), renews);
        let token_file = args[args
            .iter()
            .position(|a| *a == "--service-account-token")
            .unwrap()
            + 1];
        assert_eq!(
            token_file,
            format!(
                "/var/run/secrets/meshd/{}",
                projected["path"].as_str().unwrap()
            )
        );
        // meshctl takes them: it gets as far as reading the (missing) token file.
        let out = Command::new(bin("meshctl"))
            .args(args.iter().map(|a| {
                if a.starts_with("/var/run/secrets/meshd/") {
                    "/nonexistent-token"
                } else {
                    a
                }
            }))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("/etc/meshd/meshd.toml") || said.contains("/nonexistent-token"),
            "{said}"
        );
        assert!(!said.contains("Usage:"), "{said}");
    }
}

/// The image: hadolint passes the Dockerfile; what it copies into the build exists, every
/// workspace member among it; the commands its build runs work on the binaries built here.
#[test]
fn the_dockerfile_lints_and_builds_from_what_exists() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "COPY {src}: missing");
        }
    }
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let members = cargo
        .lines()
        .find(|l| l.starts_with("members"))
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .collect::<Vec<_>>();
    for m in members {
        assert!(
            text.lines().any(|l| l == format!("COPY {m} {m}")),
            "workspace member {m} is not copied into the build"
        );
    }
    // The build stage's commands, on the binaries built here.
    let dir = std::env::temp_dir().join(format!("meshd-image-{}", std::process::id()));
    run(Command::new(bin("meshctl"))
        .args(["man", "--out"])
        .arg(&dir));
    assert!(dir.join("meshctl.1").exists() && dir.join("meshctl-policy-apply.1").exists());
    let page = run(Command::new(bin("meshd")).arg("--man"));
    assert!(String::from_utf8_lossy(&page.stdout).contains(".TH meshd 8"));
    let completion = run(Command::new(bin("meshctl")).args(["completion", "bash"]));
    assert!(String::from_utf8_lossy(&completion.stdout).contains("_meshctl()"));
    std::fs::remove_dir_all(&dir).unwrap();
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target"),
        "the build context leaves target/ out"
    );

    let Some(hadolint) = tool("hadolint") else {
        return;
    };
    let out = Command::new(hadolint)
        .arg(repo().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The system calls a unit's `SystemCallFilter=` lines allow, resolved in order as systemd does
/// (the first line an allow-list, `~` lines taking calls out, later lines adding them back),
/// with groups expanded by `systemd-analyze syscall-filter`.
fn allowed_syscalls(analyze: &Path, unit: &str) -> std::collections::BTreeSet<String> {
    fn expand(analyze: &Path, item: &str, out: &mut std::collections::BTreeSet<String>) {
        if !item.starts_with('@') {
            out.insert(item.to_string());
            return;
        }
        let o = Command::new(analyze)
            .args(["syscall-filter", item])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        for line in text.lines().skip(1) {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            expand(analyze, t, out);
        }
    }
    let mut allowed = std::collections::BTreeSet::new();
    for value in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (deny, list) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let mut set = std::collections::BTreeSet::new();
        for item in list.split_whitespace() {
            expand(analyze, item, &mut set);
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    allowed
}

/// meshd under the mesh unit's system-call filter: every call it makes while it starts, peers,
/// carries traffic, serves metrics, reloads and stops is one the filter allows, so systemd would
/// not kill it (capset, which drops capabilities at start, is in @privileged).
#[test]
fn every_system_call_meshd_makes_passes_the_units_filter() {
    if !can_run() {
        return;
    }
    let (Some(strace), Some(analyze)) = (tool("strace"), tool("systemd-analyze")) else {
        return;
    };
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/meshd-mesh@.service")).unwrap();
    let allowed = allowed_syscalls(&analyze, &unit);
    assert!(allowed.contains("read") && !allowed.contains("reboot"));

    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let ns = lab.host(&format!("s{i}"));
        lab.attach(&sw, &ns, &format!("198.18.1.{i}/24"));
        let (cert, key) = pki.issue("prod", &format!("n{i}"), &format!("100.64.1.{i}/32"), &[]);
        let ifname = lab.name(&format!("s{i}"));
        let seeds: &[&str] = if i == 1 { &[] } else { &["198.18.1.1:51820"] };
        let config = mesh_config(&lab, &ifname, &cert, &key, &[pki.ca_cert()], seeds);
        let trace = lab.dir.join(format!("strace-{i}.txt"));
        lab.exec_prefix = vec![
            strace.display().to_string(),
            "-f".into(),
            "-qq".into(),
            "-o".into(),
            trace.display().to_string(),
        ];
        lab.meshd_config(&ns, &ifname, &config);
        nodes.push((ns, ifname, config, trace));
    }
    assert!(
        lab.ping_until(
            &nodes[0].0,
            "100.64.1.2",
            std::time::Duration::from_secs(10)
        ),
        "the two nodes peer"
    );
    assert_eq!(http_get(&nodes[0].0, "/metrics").0, 200);
    let reload = Command::new(bin("meshctl"))
        .args(["reload", "-i", &nodes[0].1])
        .output()
        .unwrap();
    assert!(reload.status.success(), "{reload:?}");
    for (_, ifname, config, trace) in &nodes {
        // SIGTERM to meshd itself: the child the lab holds is strace.
        run(Command::new("pkill").args([
            "-TERM",
            "-f",
            "--",
            &format!("--config {}", config.display()),
        ]));
        lab.stop(ifname, 0);
        let text = std::fs::read_to_string(trace).unwrap();
        let mut made = std::collections::BTreeSet::new();
        for line in text.lines() {
            // `PID name(args...` or `PID <... name resumed>`
            let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
            let rest = rest.strip_prefix("<... ").unwrap_or(rest);
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && rest[name.len()..].starts_with(['(', ' ']) {
                made.insert(name);
            }
        }
        assert!(
            made.contains("capset") && made.contains("sendto"),
            "{made:?}"
        );
        let refused: Vec<&String> = made.iter().filter(|s| !allowed.contains(*s)).collect();
        assert!(
            refused.is_empty(),
            "{ifname}: meshd makes system calls the unit's filter refuses: {refused:?}"
        );
    }
}

/// The DaemonSet installs the CNI plugin and its network configuration on the node, and the
/// plugin takes that configuration as a runtime hands it over (the list's version and name in
/// the plugin's): with no meshd yet, it says "try again later", not "invalid".
#[test]
fn the_daemonset_installs_the_cni_plugin_with_a_configuration_it_takes() {
    let ds: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests().join("daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    let script = init["command"][2].as_str().unwrap();
    assert!(script.contains("/host/opt/cni/bin/meshd-cni") && script.contains("10-meshd.conflist"));
    assert!(
        init["securityContext"]["capabilities"].get("add").is_none(),
        "no capability"
    );
    let paths: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert!(paths.contains(&"/opt/cni/bin") && paths.contains(&"/etc/cni/net.d"));
    let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests().join("configmap.yaml")).unwrap(),
    )
    .unwrap();
    let list: serde_json::Value =
        serde_json::from_str(cm["data"]["10-meshd.conflist"].as_str().unwrap()).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let toml = cm["data"]["meshd.toml"].as_str().unwrap();
    let ifname = conf["meshInterface"].as_str().unwrap();
    assert!(
        toml.contains(&format!("name = \"{ifname}\"")),
        "the plugin asks meshd's interface"
    );
    let out = {
        use std::io::Write;
        let mut child = Command::new(bin("meshd-cni"))
            .env("CNI_COMMAND", "CHECK")
            .env("CNI_CONTAINERID", "deploy-test")
            .env("CNI_NETNS", "/nonexistent")
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_UID=c",
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["code"], 11, "{answer}");
    assert!(
        answer["msg"].as_str().unwrap().contains("not reachable"),
        "{answer}"
    );
}
