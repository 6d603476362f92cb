//! A mesh of real meshd nodes with signed policy, for the policy and fault tests: node `i` (from
//! 1) in namespace `p{i}` on one switch at 198.18.2.i, overlay 100.64.2.i, seeded with node 1.

use crate::*;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct PolicyNode {
    pub ns: String,
    pub ifname: String,
    pub ip: String,
    pub config: PathBuf,
}

pub struct PolicyLab {
    pub lab: Lab,
    pub nodes: Vec<PolicyNode>,
    pub admin: PathBuf,
    pub applied: u32,
    pub pki: Pki,
    pub sw: Switch,
}

/// A mesh of `ids.len()` nodes, all in namespace `microblog`: node `i` (from 1) is service
/// account `ids[i-1].0` with labels `ids[i-1].1` (and `--flag=...` items passed to `identity
/// issue` as they are), overlay 100.64.2.i. Zero-trust posture; the
/// nodes in `audit` run with global audit mode on.
pub fn policy_lab(ids: &[(&str, &[&str])], audit: &[usize]) -> PolicyLab {
    policy_lab_on(ids, audit, Fragments::Pass)
}

/// What the underlay does with IP fragments, or with every datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragments {
    Pass,
    /// Dropped on arrival, before the kernel could reassemble them, as by many firewalls and
    /// cloud networks.
    Dropped,
    /// Every UDP datagram arriving at a node is lost with probability 1 in 5 (this kernel has no
    /// netem; nftables' random numbers do it).
    Lossy,
}

const LOSSY_RULES: &str = "table inet lossy {
  chain in {
    type filter hook input priority -400; policy accept;
    meta l4proto udp numgen random mod 100 < 20 counter drop
  }
}
";

const NOFRAG_RULES: &str = "table inet nofrag {
  chain pre {
    type filter hook prerouting priority -500; policy accept;
    ip frag-off & 0x3fff != 0 counter drop
    exthdr frag exists counter drop
  }
}
";

/// IP fragments that arrived in `ns` and were dropped.
pub fn fragments_dropped(lab: &Lab, ns: &str) -> u64 {
    let rules = lab.exec_ok(ns, &["nft", "list", "table", "inet", "nofrag"]);
    rules
        .split("packets ")
        .skip(1)
        .filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// [`policy_lab_on`] with `n` identities `{prefix}1` to `{prefix}{n}`, each labelled `app=` its
/// name.
pub fn numbered_policy_lab(prefix: &str, n: usize, fragments: Fragments) -> PolicyLab {
    let names: Vec<String> = (1..=n).map(|i| format!("{prefix}{i}")).collect();
    labelled_policy_lab(&names, &[], fragments)
}

/// [`policy_lab_on`] with identities `names`, each labelled `app=` its name.
pub fn labelled_policy_lab(names: &[String], audit: &[usize], fragments: Fragments) -> PolicyLab {
    let labels: Vec<Vec<String>> = names.iter().map(|n| vec![format!("app={n}")]).collect();
    let label_refs: Vec<Vec<&str>> = labels
        .iter()
        .map(|l| l.iter().map(String::as_str).collect())
        .collect();
    let ids: Vec<(&str, &[&str])> = names
        .iter()
        .zip(&label_refs)
        .map(|(n, l)| (n.as_str(), l.as_slice()))
        .collect();
    policy_lab_on(&ids, audit, fragments)
}

/// [`policy_lab`] on an underlay that treats fragments as `fragments` says.
pub fn policy_lab_on(ids: &[(&str, &[&str])], audit: &[usize], fragments: Fragments) -> PolicyLab {
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let admin = lab.dir.join("policy-admin.key");
    run(Command::new(bin("meshctl"))
        .args(["policy", "admin-key", "--out"])
        .arg(&admin));
    let mut nodes = Vec::new();
    for (i, (name, labels)) in ids.iter().enumerate() {
        let i = i + 1;
        let ns = lab.host(&format!("p{i}"));
        lab.attach(&sw, &ns, &format!("198.18.2.{i}/24"));
        let rules = match fragments {
            Fragments::Pass => None,
            Fragments::Dropped => Some(("nofrag.nft", NOFRAG_RULES)),
            Fragments::Lossy => Some(("lossy.nft", LOSSY_RULES)),
        };
        if let Some((file, text)) = rules {
            let rules = lab.dir.join(file);
            std::fs::write(&rules, text).unwrap();
            lab.exec_ok(&ns, &["nft", "-f", rules.to_str().unwrap()]);
        }
        // A label KEY=VALUE, or an `identity issue` flag as it is (`--port=http=8080/tcp`).
        let mut extra = Vec::new();
        for l in labels.iter() {
            if l.starts_with("--") {
                extra.push(*l);
            } else {
                extra.extend(["--label", l]);
            }
        }
        let (cert, key) = pki.issue("microblog", name, &format!("100.64.2.{i}/32"), &extra);
        let ifname = lab.name(&format!("e{i}"));
        let seeds: Vec<&str> = if i == 1 {
            vec![]
        } else {
            vec!["198.18.2.1:51820"]
        };
        let policy = MeshPolicy {
            posture: "zero-trust",
            audit: audit.contains(&i),
            admins: vec![PathBuf::from(format!("{}.pub", admin.display()))],
        };
        let config = mesh_config_with(
            &lab,
            &ifname,
            &cert,
            &key,
            &[pki.ca_cert()],
            &seeds,
            &policy,
        );
        lab.meshd_config(&ns, &ifname, &config);
        nodes.push(PolicyNode {
            ns,
            ifname,
            ip: format!("100.64.2.{i}"),
            config,
        });
    }
    let pl = PolicyLab {
        lab,
        nodes,
        admin,
        applied: 0,
        pki,
        sw,
    };
    pl.wait_members();
    pl
}

impl PolicyLab {
    pub fn node(&self, i: usize) -> &PolicyNode {
        &self.nodes[i - 1]
    }

    pub fn addr(&self, i: usize, port: u16) -> SocketAddr {
        format!("{}:{port}", self.node(i).ip).parse().unwrap()
    }

    /// Waits until every node knows every other (no data flows: zero trust denies pings).
    pub fn wait_members(&self) {
        let want = self.nodes.len() - 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &self.nodes {
            loop {
                let st = self.lab.status(&n.ifname);
                if st["peers"].as_array().map_or(0, |p| p.len()) == want {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} has not met every member: {st}",
                    n.ifname
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `meshctl policy ARGS` against node `on`.
    pub fn meshctl(&self, on: usize, args: &[&str]) -> Output {
        Command::new(bin("meshctl"))
            .arg("policy")
            .args(args)
            .args(["-i", &self.node(on).ifname])
            .output()
            .expect("running meshctl")
    }

    /// Writes `yaml` to a file and applies it on node `on` with the admin key; returns the output.
    pub fn apply_with(&mut self, on: usize, yaml: &str, key: &std::path::Path) -> Output {
        self.applied += 1;
        let f = self.lab.dir.join(format!("policy-{}.yaml", self.applied));
        std::fs::write(&f, yaml).unwrap();
        let key = key.display().to_string();
        self.meshctl(on, &["apply", "-f", f.to_str().unwrap(), "--key", &key])
    }

    /// Applies `yaml` on node `on` and waits until every node enforces the new serial.
    pub fn apply(&mut self, on: usize, yaml: &str) -> u64 {
        let admin = self.admin.clone();
        let o = self.apply_with(on, yaml, &admin);
        assert!(
            o.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let serial = self.serial(on);
        self.wait_serial(serial);
        serial
    }

    /// Node `i`'s peer whose certificate names `example.org/microblog/{name}`, as `status` shows
    /// it.
    pub fn peer(&self, i: usize, name: &str) -> Option<serde_json::Value> {
        let identity = format!("example.org/microblog/{name}");
        self.lab.status(&self.node(i).ifname)["peers"]
            .as_array()?
            .iter()
            .find(|p| p["identity"] == identity.as_str())
            .cloned()
    }

    pub fn serial(&self, i: usize) -> u64 {
        self.lab.status(&self.node(i).ifname)["policy"]["serial"]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn wait_serial(&self, serial: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for (i, n) in self.nodes.iter().enumerate() {
            while self.serial(i + 1) != serial {
                assert!(
                    Instant::now() < deadline,
                    "{} still enforces serial {}, not {serial}",
                    n.ifname,
                    self.serial(i + 1)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub fn policy_counter(&self, i: usize, field: &str) -> u64 {
        self.lab.status(&self.node(i).ifname)["policy"][field]
            .as_u64()
            .unwrap_or(0)
    }

    /// Sum over peers of a per-peer drop counter on node `i`.
    pub fn peer_drops(&self, i: usize, reason: &str) -> u64 {
        let st = self.lab.status(&self.node(i).ifname);
        st["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["drops"][reason].as_u64().unwrap_or(0))
            .sum()
    }

    /// The flow log of node `i` (JSON lines from `meshctl flows -o json`).
    pub fn flows(&self, i: usize, denied: bool) -> Vec<serde_json::Value> {
        flow_records(&self.node(i).ifname, denied)
    }
}

/// Revokes identity `name` (its serial and key) and gives the list to node `via` alone: its
/// configuration names the list, and `meshctl reload` reads it; the mesh spreads it from there.
pub fn revoke_through(pl: &PolicyLab, name: &str, via: usize) {
    let cert = pl.pki.dir.join("ids").join(format!("{name}.crt"));
    run(Command::new(bin("meshctl"))
        .args(["ca", "revoke", "--cert"])
        .arg(&cert)
        .arg("--ca")
        .arg(&pl.pki.dir));
    let config = &pl.node(via).config;
    let text = std::fs::read_to_string(config).unwrap();
    let crl = pl.pki.dir.join("revoked.crl");
    std::fs::write(
        config,
        text.replace(
            "[peering]",
            &format!("revocation_lists = [\"{}\"]\n\n[peering]", crl.display()),
        ),
    )
    .unwrap();
    run(Command::new(bin("meshctl")).args(["reload", &pl.node(via).ifname]));
}

pub const POLICY_ALLOW_ALL: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: open}
spec:
  selector: all()
  ingress: [{action: Allow}]
  egress: [{action: Allow}]
";
