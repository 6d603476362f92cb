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
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
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
        &d("ids"),
    ]);
    meshctl(&["policy", "admin-key", "--out", &d("admin.key")]);
    let text = toml
        .replace("/etc/meshd-node/node.crt", &d("ids/node.crt"))
        .replace("/etc/meshd-node/node.key", &d("ids/node.key"))
        .replace("/etc/meshd/ca.crt", &d("ca/ca.crt"))
        .replace("/etc/meshd/policy-admin.key.pub", &d("admin.key.pub"))
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
