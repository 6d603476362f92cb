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
