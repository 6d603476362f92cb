//! `meshctl policy apply | diff | delete | get | list | status | admin-key`: the policy set a mesh
//! enforces. The set is signed here, with the policy-admin key, and handed to the local meshd,
//! which verifies it, installs it and passes it to every node.

use crate::status::request;
use crate::{Failure, Output};
use anyhow::{anyhow, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::SigningKey;
use policy::model::{located_objects, objects, stream, Object, Origin};
use proto::admin::{Request, Response};
use proto::armor;
use proto::policyset::{SignedPolicySet, ADMIN_PRIVATE_KEY, ADMIN_PUBLIC_KEY};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where `meshctl policy apply` looks for the policy-admin key unless told.
pub const DEFAULT_ADMIN_KEY: &str = "/etc/meshd/policy-admin.key";

/// `meshctl policy admin-key --out FILE`: an Ed25519 key (FILE, mode 0600) and its public half
/// (FILE.pub) for nodes' `trust.policy_admins`.
pub fn admin_key(out: &Path) -> Result<(), Failure> {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    keyfile::create(
        out,
        armor::encode(ADMIN_PRIVATE_KEY, &key.to_bytes()).as_bytes(),
        0o600,
    )?;
    let public = pub_path(out);
    keyfile::create(
        &public,
        armor::encode(ADMIN_PUBLIC_KEY, &key.verifying_key().to_bytes()).as_bytes(),
        0o644,
    )?;
    println!(
        "policy-admin key {} (public half {}: name it in every node's trust.policy_admins)",
        out.display(),
        public.display()
    );
    Ok(())
}

fn pub_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

pub fn signing_key(path: &Path) -> Result<SigningKey, Failure> {
    let text = keyfile::read_secret(path).map_err(Failure::input)?;
    let seed = armor::decode(ADMIN_PRIVATE_KEY, &text)
        .with_context(|| path.display().to_string())
        .map_err(Failure::input)?;
    let seed: [u8; 32] = seed.try_into().map_err(|_| {
        Failure::input(anyhow!(
            "{}: a policy-admin key is 32 bytes",
            path.display()
        ))
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Objects read from files, with where each came from (for errors found later).
pub struct Read {
    pub objects: Vec<Object>,
    pub origins: BTreeMap<String, Origin>,
}

/// Every object in `paths` (files, or directories of `*.yaml`/`*.yml`); all errors at once. An
/// object named twice, in one file or in two, is an error.
pub fn read_objects(paths: &[PathBuf]) -> Result<Read, Failure> {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in crate::policy::sources(paths)? {
        match located_objects(&text, &name) {
            Ok(mut o) => all.append(&mut o),
            Err(e) => errors.extend(e.iter().map(|e| e.to_string())),
        }
    }
    let dups = policy::model::duplicates(all.iter().map(|(at, o)| (at, o.name.clone())));
    errors.extend(dups.iter().map(|e| e.to_string()));
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    let origins = all
        .iter()
        .map(|(at, o)| (o.name.clone(), at.clone()))
        .collect();
    Ok(Read {
        objects: all.into_iter().map(|(_, o)| o).collect(),
        origins,
    })
}

fn invalid(errors: Vec<String>) -> Failure {
    Failure::input(anyhow!(
        "the policy set is invalid ({} error(s)); nothing was applied:\n  {}",
        errors.len(),
        errors.join("\n  ")
    ))
}

/// The set in force on the daemon at `socket`: its serial and objects by name.
pub fn current(socket: &Path) -> Result<(u64, BTreeMap<String, Object>), Failure> {
    match request(socket, &Request::PolicyGet)? {
        Response::Policy { set: None } => Ok((0, BTreeMap::new())),
        Response::Policy { set: Some(b64) } => {
            let bytes = STANDARD.decode(b64).context("the daemon's policy set")?;
            let set = SignedPolicySet::decode(&bytes).context("the daemon's policy set")?;
            let objs = objects(&set.documents, "the running policy set")
                .map_err(|e| anyhow!("the running policy set does not parse: {}", e[0]))?;
            Ok((
                set.serial,
                objs.into_iter().map(|o| (o.name.clone(), o)).collect(),
            ))
        }
        Response::Error { message } => Err(anyhow!("meshd refused: {message}").into()),
        other => Err(anyhow!("unexpected answer {other:?}").into()),
    }
}

/// The set in force on the daemon at `socket`, compiled under `posture`, or the daemon's own
/// posture when none is given (for `meshctl policy check` without files).
pub fn running(
    socket: &Path,
    posture: Option<policy::engine::Posture>,
    trust_domain: Option<&str>,
) -> Result<policy::engine::PolicySet, Failure> {
    let (posture, trust_domain) = daemon_view(socket, posture, trust_domain)?;
    let (_, objs) = current(socket)?;
    compiled(&objs, posture, &trust_domain)
        .map_err(|e| anyhow!("the running set does not compile: {e}").into())
}

/// `objs` compiled under `posture` for `trust_domain`; the first error if they do not.
fn compiled(
    objs: &BTreeMap<String, Object>,
    posture: policy::engine::Posture,
    trust_domain: &str,
) -> Result<policy::engine::PolicySet, String> {
    let list: Vec<Object> = objs.values().cloned().collect();
    let docs = policy::model::parse_documents(&stream(&list), "the policy set")
        .map_err(|e| e[0].to_string())?;
    policy::engine::PolicySet::compile(&docs, posture)
        .map(|s| s.in_trust_domain(trust_domain))
        .map_err(|e| e[0].to_string())
}

/// The `PolicyTest` cases of `objs`, decided as the daemon at `socket` decides (its posture and
/// trust domain): a failing one refuses the whole change, as Tailscale refuses an ACL whose
/// tests fail. Nodes do not run tests; this is the author's gate.
fn gate(socket: &Path, objs: &BTreeMap<String, Object>) -> Result<(), Failure> {
    if !objs.keys().any(|k| k.starts_with("PolicyTest ")) {
        return Ok(());
    }
    let (posture, trust_domain) = daemon_view(socket, None, None)?;
    let set = compiled(objs, posture, &trust_domain).map_err(|e| anyhow!("{e}"))?;
    let failing = crate::policy::failing_tests(&set);
    if failing.is_empty() {
        return Ok(());
    }
    Err(anyhow!(
        "the resulting set fails {} policy test case(s); nothing was applied:\n  {}",
        failing.len(),
        failing.join("\n  ")
    )
    .into())
}

/// The daemon's posture and trust domain, unless given.
fn daemon_view(
    socket: &Path,
    posture: Option<policy::engine::Posture>,
    trust_domain: Option<&str>,
) -> Result<(policy::engine::Posture, String), Failure> {
    let status = match request(socket, &Request::Status)? {
        Response::Status(s) => s,
        other => return Err(anyhow!("unexpected answer {other:?}").into()),
    };
    let posture = posture.unwrap_or(
        if status
            .policy
            .as_ref()
            .is_some_and(|p| p.posture == "calico")
        {
            policy::engine::Posture::Calico
        } else {
            policy::engine::Posture::ZeroTrust
        },
    );
    // The daemon's identity is TD/NS/NAME.
    let own = status
        .identity
        .as_deref()
        .and_then(|i| i.split('/').next())
        .unwrap_or(crate::policy::DEFAULT_TRUST_DOMAIN)
        .to_string();
    Ok((posture, trust_domain.unwrap_or(&own).to_string()))
}

/// The identities of the live mesh as the daemon at `socket` knows them: itself, its members and
/// the workloads in force on them, with the labels and first address of their certificates.
pub fn known(socket: &Path) -> Result<Vec<crate::policy::Known>, Failure> {
    let first = |a: &[proto::Cidr]| a.first().map(|c| c.addr());
    let mut out = Vec::new();
    if let Response::Status(s) = request(socket, &Request::Status)? {
        if let Some(own) = s.certificate {
            out.push(crate::policy::Known {
                identity: own.identity,
                labels: own.labels,
                ip: first(&own.addresses),
                ports: crate::policy::named_ports(&own.ports),
            });
        }
        // The workloads this node runs, in force.
        out.extend(
            s.workloads
                .into_iter()
                .filter(|w| w.state == proto::admin::IN_FORCE)
                .filter_map(|w| w.certificate)
                .map(workload_known),
        );
    }
    match request(socket, &Request::PeerList)? {
        Response::Peers(peers) => {
            for p in peers {
                // The workloads in force behind each member, as identities of their own.
                out.extend(p.workloads.into_iter().map(workload_known));
                out.push(crate::policy::Known {
                    ip: first(&p.addrs),
                    identity: p.identity,
                    labels: p.labels,
                    ports: crate::policy::named_ports(&p.ports),
                });
            }
        }
        Response::Error { message } => return Err(anyhow!("meshd refused: {message}").into()),
        other => return Err(anyhow!("unexpected answer {other:?}").into()),
    }
    Ok(out)
}

fn workload_known(w: proto::admin::WorkloadInfo) -> crate::policy::Known {
    crate::policy::Known {
        ip: w.addresses.first().map(|c| c.addr()),
        identity: w.identity,
        labels: w.labels,
        ports: crate::policy::named_ports(&w.ports),
    }
}

/// Checks that `objs` compile as a whole (every error at once), naming the file and document of
/// each object that came from a file.
pub fn validate(
    objs: &BTreeMap<String, Object>,
    origins: &BTreeMap<String, Origin>,
) -> Result<(), Failure> {
    let list: Vec<Object> = objs.values().cloned().collect();
    let text = stream(&list);
    let docs = policy::model::parse_documents(&text, "the resulting set")
        .map_err(|e| invalid(e.iter().map(|e| e.to_string()).collect()))?;
    policy::engine::PolicySet::compile(&docs, policy::engine::Posture::ZeroTrust)
        .map_err(|e| invalid(crate::policy::located_errors(&e, origins)))?;
    Ok(())
}

/// Signs `objs` as the next serial after `serial` and installs them on the daemon.
pub fn push(
    socket: &Path,
    key: &Path,
    serial: u64,
    objs: &BTreeMap<String, Object>,
) -> Result<String, Failure> {
    let key = signing_key(key)?;
    let list: Vec<Object> = objs.values().cloned().collect();
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let set = SignedPolicySet::sign(serial + 1, issued_at, stream(&list), &key)
        .map_err(|e| Failure::input(anyhow!("{e}")))?;
    match request(
        socket,
        &Request::PolicyApply {
            set: STANDARD.encode(set.encode()),
        },
    )? {
        Response::Done { message } => Ok(message),
        Response::Error { message } => Err(anyhow!("meshd refused the set: {message}").into()),
        other => Err(anyhow!("unexpected answer {other:?}").into()),
    }
}

/// `old` with the objects of `new` added or replaced.
pub fn merge(old: &BTreeMap<String, Object>, new: &[Object]) -> BTreeMap<String, Object> {
    let mut merged = old.clone();
    for o in new {
        merged.insert(o.name.clone(), o.clone());
    }
    merged
}

/// What applying `new` to `old` does to each object.
fn changes(old: &BTreeMap<String, Object>, new: &[Object]) -> Vec<(String, &'static str)> {
    new.iter()
        .map(|o| {
            let what = match old.get(&o.name) {
                None => "created",
                Some(cur) if cur.yaml == o.yaml => "unchanged",
                Some(_) => "configured",
            };
            (o.name.clone(), what)
        })
        .collect()
}

/// `meshctl policy apply -f FILE|DIR`: adds or replaces these objects in the mesh's set.
pub fn apply(socket: &Path, files: &[PathBuf], key: &Path) -> Result<(), Failure> {
    let Read {
        objects: new,
        origins,
    } = read_objects(files)?;
    let (serial, old) = current(socket)?;
    let merged = merge(&old, &new);
    validate(&merged, &origins)?;
    gate(socket, &merged)?;
    let report = changes(&old, &new);
    if merged == old {
        for (name, what) in &report {
            println!("{name} {what}");
        }
        println!("no change; policy set {serial} stays in force");
        return Ok(());
    }
    let message = push(socket, key, serial, &merged)?;
    for (name, what) in &report {
        println!("{name} {what}");
    }
    println!("{message}");
    Ok(())
}

/// `meshctl policy diff -f FILE|DIR --connectivity`: for every pair of identities (the live
/// mesh's, or those of `identities`) and every protocol and port a rule of either set names,
/// the flows the change newly allows and newly denies, with what decided before and after;
/// exit 1 when connectivity changes.
pub fn connectivity(
    socket: &Path,
    files: &[PathBuf],
    identities: Option<&Path>,
    output: crate::Output,
) -> Result<(), Failure> {
    use policy::testing;
    let Read {
        objects: new,
        origins,
    } = read_objects(files)?;
    let (serial, old) = current(socket)?;
    let merged = merge(&old, &new);
    validate(&merged, &origins)?;
    let (posture, trust_domain) = daemon_view(socket, None, None)?;
    let before =
        compiled(&old, posture, &trust_domain).map_err(|e| anyhow!("policy set {serial}: {e}"))?;
    let after = compiled(&merged, posture, &trust_domain).map_err(|e| anyhow!("{e}"))?;
    let known = match identities {
        Some(path) => identities_file(path)?,
        None => known(socket)?,
    };
    let ends = crate::policy::ends_of(&known, &after)?;
    let changes = testing::connectivity_diff(&before, &after, &ends);
    let probes = before.probes().union(&after.probes()).count();
    let row = |c: &testing::FlowChange| {
        serde_json::json!({
            "from": c.from,
            "to": c.to,
            "protocol": testing::protocol_name(c.protocol),
            "port": c.port,
            "before": c.before.decided_by(),
            "after": c.after.decided_by(),
        })
    };
    let (allowed, denied): (Vec<&testing::FlowChange>, Vec<&testing::FlowChange>) =
        changes.iter().partition(|c| c.after.allow);
    let report = serde_json::json!({
        "serial": serial,
        "identities": ends.len(),
        "probes": probes,
        "newly_allowed": allowed.iter().map(|c| row(c)).collect::<Vec<_>>(),
        "newly_denied": denied.iter().map(|c| row(c)).collect::<Vec<_>>(),
    });
    if output.data(&report)?.is_some() {
        println!(
            "connectivity against policy set {serial}: {} identities, {probes} protocol/port(s) probed",
            ends.len()
        );
        for (what, list, was, now) in [
            ("newly denied", &denied, "allowed", "denied"),
            ("newly allowed", &allowed, "denied", "allowed"),
        ] {
            if list.is_empty() {
                continue;
            }
            println!("{what} ({}):", list.len());
            for c in list.iter() {
                let port = c.port.map_or(String::new(), |p| format!("/{p}"));
                println!(
                    "  {} -> {}  {}{port}  was {was} by {}; now {now} by {}",
                    c.from,
                    c.to,
                    testing::protocol_name(c.protocol),
                    c.before.decided_by(),
                    c.after.decided_by()
                );
            }
        }
        if changes.is_empty() {
            println!("no change in connectivity");
        }
    }
    if changes.is_empty() {
        Ok(())
    } else {
        Err(Failure::answer())
    }
}

/// Identities from a file: a YAML list of `[TD/]NS/NAME[,K=V...]`, or what `meshctl status -o
/// yaml` prints (one node, or a list of them: each node and its peers, with their labels).
pub fn identities_file(path: &Path) -> Result<Vec<crate::policy::Known>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(anyhow!("--identities {}: {e}", path.display())))?;
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| Failure::input(anyhow!("--identities {}: {e}", path.display())))?;
    let mut out = Vec::new();
    let labelled = |m: &serde_yaml_ng::Value| -> Option<crate::policy::Known> {
        let identity = m.get("identity")?.as_str()?.to_string();
        let labels = m
            .get("labels")
            .and_then(|l| serde_yaml_ng::from_value(l.clone()).ok())
            .unwrap_or_default();
        let ports: Vec<String> = m
            .get("ports")
            .and_then(|l| serde_yaml_ng::from_value(l.clone()).ok())
            .unwrap_or_default();
        Some(crate::policy::Known {
            identity,
            labels,
            ip: None,
            ports: crate::policy::named_ports(&ports),
        })
    };
    let mut node = |n: &serde_yaml_ng::Value| {
        out.extend(n.get("certificate").and_then(labelled));
        if let Some(peers) = n.get("peers").and_then(|p| p.as_sequence()) {
            out.extend(peers.iter().filter_map(labelled));
        }
    };
    let items: Vec<serde_yaml_ng::Value> = match v {
        serde_yaml_ng::Value::Sequence(s) => s,
        other => vec![other],
    };
    let mut plain = Vec::new();
    for item in &items {
        match item.as_str() {
            Some(s) => plain.push(s.to_string()),
            None => node(item),
        }
    }
    for s in plain {
        let (id, labels) = s.split_once(',').unwrap_or((&s, ""));
        let mut map = BTreeMap::new();
        let mut ports = Vec::new();
        for kv in labels.split(',').filter(|kv| !kv.is_empty()) {
            if let Some(p) = kv.strip_prefix("port:") {
                ports.push(p.parse().map_err(|e| {
                    Failure::input(anyhow!("--identities {}: `{kv}`: {e}", path.display()))
                })?);
                continue;
            }
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                Failure::input(anyhow!(
                    "--identities {}: `{kv}` is not KEY=VALUE",
                    path.display()
                ))
            })?;
            map.insert(k.to_string(), v.to_string());
        }
        ports.sort();
        out.push(crate::policy::Known {
            identity: id.to_string(),
            labels: map,
            ip: None,
            ports,
        });
    }
    if out.is_empty() {
        return Err(Failure::input(anyhow!(
            "--identities {}: no identities found",
            path.display()
        )));
    }
    Ok(out)
}

/// `meshctl policy diff -f FILE|DIR`: what `apply` would change, as a unified diff per object.
pub fn diff(socket: &Path, files: &[PathBuf], output: crate::Output) -> Result<(), Failure> {
    let Read {
        objects: new,
        origins,
    } = read_objects(files)?;
    let (serial, old) = current(socket)?;
    // Say now what apply would refuse.
    validate(&merge(&old, &new), &origins)?;
    let mut changes = Vec::new();
    for o in &new {
        let before = old.get(&o.name).map(|c| c.yaml.as_str()).unwrap_or("");
        if before == o.yaml {
            continue;
        }
        let label = if before.is_empty() {
            "created"
        } else {
            "configured"
        };
        let d = similar::TextDiff::from_lines(before, &o.yaml);
        let text = d
            .unified_diff()
            .context_radius(3)
            .header(&format!("set {serial}"), "applied")
            .to_string();
        changes.push(serde_json::json!({ "object": o.name, "change": label, "diff": text }));
    }
    let report = serde_json::json!({ "serial": serial, "changes": changes });
    if output.data(&report)?.is_some() {
        for c in &changes {
            println!(
                "# {} ({})",
                c["object"].as_str().unwrap_or(""),
                c["change"].as_str().unwrap_or("")
            );
            print!("{}", c["diff"].as_str().unwrap_or(""));
        }
        if changes.is_empty() {
            println!("no change against policy set {serial}");
        }
    }
    if changes.is_empty() {
        Ok(())
    } else {
        Err(Failure::answer())
    }
}

/// The object name `KIND NAME` means: `networkpolicy ns/name`, `globalnetworkpolicy name`,
/// `kubernetesnetworkpolicy ns/name`, their staged kinds (`stagednetworkpolicy`, ...), `tier name`,
/// `namespace name` (any case; `ns/` defaults to `default`; Calico's short names too).
pub fn object_name(kind: &str, name: &str) -> Result<String, Failure> {
    let namespaced = |k: &str| {
        if name.contains('/') {
            format!("{k} {name}")
        } else {
            format!("{k} default/{name}")
        }
    };
    Ok(match kind.to_ascii_lowercase().as_str() {
        "networkpolicy" | "netpol" => namespaced("NetworkPolicy"),
        "kubernetesnetworkpolicy" => namespaced("KubernetesNetworkPolicy"),
        "globalnetworkpolicy" | "gnp" => format!("GlobalNetworkPolicy {name}"),
        "stagednetworkpolicy" | "snp" => namespaced("StagedNetworkPolicy"),
        "stagedkubernetesnetworkpolicy" | "sknp" => namespaced("StagedKubernetesNetworkPolicy"),
        "stagedglobalnetworkpolicy" | "sgnp" => format!("StagedGlobalNetworkPolicy {name}"),
        "tier" => format!("Tier {name}"),
        "namespace" | "ns" => format!("Namespace {name}"),
        _ => {
            return Err(Failure::input(anyhow!(
                "`{kind}` is not networkpolicy, globalnetworkpolicy, kubernetesnetworkpolicy, \
                 their staged kinds (stagednetworkpolicy, ...), tier or namespace"
            )))
        }
    })
}

/// `meshctl policy delete KIND NAME` or `-f FILE`: removes objects from the mesh's set.
pub fn delete(socket: &Path, names: Vec<String>, key: &Path) -> Result<(), Failure> {
    let (serial, old) = current(socket)?;
    let mut merged = old.clone();
    let mut missing = Vec::new();
    for n in &names {
        if merged.remove(n).is_none() {
            missing.push(n.clone());
        }
    }
    if !missing.is_empty() {
        return Err(Failure::input(anyhow!(
            "not in policy set {serial}: {}; nothing was deleted",
            missing.join(", ")
        )));
    }
    validate(&merged, &BTreeMap::new())?;
    gate(socket, &merged)?;
    let message = push(socket, key, serial, &merged)?;
    for n in &names {
        println!("{n} deleted");
    }
    println!("{message}");
    Ok(())
}

/// `meshctl policy get [KIND NAME] [-o yaml|json|table|wide]`: the objects as they were applied
/// (YAML), as JSON, or their names in a table.
pub fn get(socket: &Path, name: Option<String>, output: Output) -> Result<(), Failure> {
    let (serial, objs) = current(socket)?;
    let chosen: Vec<&Object> = match &name {
        Some(n) => vec![objs
            .get(n)
            .ok_or_else(|| Failure::from(anyhow!("{n} is not in policy set {serial}")))?],
        None => objs.values().collect(),
    };
    match output {
        Output::Table | Output::Wide => {
            println!("policy set {serial}");
            for o in chosen {
                println!("  {}", o.name);
            }
        }
        Output::Yaml => {
            for o in chosen {
                print!("---\n{}", o.yaml);
            }
        }
        Output::Json => {
            let values: Vec<serde_json::Value> = chosen
                .iter()
                .map(|o| yaml_to_json(&o.yaml))
                .collect::<anyhow::Result<_>>()?;
            let v = if name.is_some() {
                values.into_iter().next().unwrap_or_default()
            } else {
                serde_json::json!({ "serial": serial, "items": values })
            };
            println!("{}", serde_json::to_string_pretty(&v).context("encoding")?);
        }
    }
    Ok(())
}

fn yaml_to_json(yaml: &str) -> anyhow::Result<serde_json::Value> {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml)?;
    Ok(serde_json::to_value(v)?)
}

/// `meshctl policy list [-o table|json]`: the objects of the set in force.
pub fn list(socket: &Path, output: Output) -> Result<(), Failure> {
    let (serial, objs) = current(socket)?;
    let names: Vec<&String> = objs.keys().collect();
    if output
        .data(&serde_json::json!({ "serial": serial, "objects": names }))?
        .is_some()
    {
        println!("policy set {serial}: {} object(s)", objs.len());
        for n in objs.keys() {
            println!("  {n}");
        }
    }
    Ok(())
}

/// Whether node `n` runs the set this node runs (`mine`), as far as this node can tell: a member
/// not heard from for [`proto::admin::OFFLINE_AFTER_SECS`] is offline, and the serial shown is
/// only what it last said.
fn sync_state(n: &proto::admin::NodePolicy, mine: u64) -> String {
    if n.this_node {
        return "this node".into();
    }
    match n.last_seen_secs {
        Some(age) if age < proto::admin::OFFLINE_AFTER_SECS => {}
        Some(age) => return format!("offline ({age}s)"),
        None => return "offline (never seen)".into(),
    }
    if n.serial < mine {
        "behind".into()
    } else if n.serial > mine {
        "ahead".into()
    } else {
        "in sync".into()
    }
}

/// `meshctl policy status`: the serial each node runs, as this node last heard.
pub fn status(socket: &Path, output: Output) -> Result<(), Failure> {
    let nodes = match request(socket, &Request::PolicyStatus)? {
        Response::PolicyStatus(n) => n,
        Response::Error { message } => return Err(anyhow!("meshd refused: {message}").into()),
        other => return Err(anyhow!("unexpected answer {other:?}").into()),
    };
    if let Some(wide) = output.data(&nodes)? {
        let mine = nodes.first().map_or(0, |n| n.serial);
        print!("{:<48} {:>6}  {:<18}  DIGEST", "NODE", "SERIAL", "STATE");
        println!("{}", if wide { "  LAST SEEN" } else { "" });
        for n in &nodes {
            print!(
                "{:<48} {:>6}  {:<18}  {}",
                n.identity,
                n.serial,
                sync_state(n, mine),
                n.digest.as_deref().unwrap_or("-")
            );
            let seen = match (n.this_node, n.last_seen_secs) {
                (true, _) => "-".to_string(),
                (false, Some(age)) => format!("{age}s ago"),
                (false, None) => "never".to_string(),
            };
            println!(
                "{}",
                if wide {
                    format!("  {seen}")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod sync_tests {
    use super::sync_state;
    use proto::admin::NodePolicy;

    fn node(serial: u64, seen: Option<u64>) -> NodePolicy {
        NodePolicy {
            identity: "example.org/prod/x".into(),
            serial,
            digest: None,
            last_seen_secs: seen,
            this_node: false,
        }
    }

    #[test]
    fn a_dead_node_is_offline_not_in_sync() {
        assert_eq!(sync_state(&node(3, Some(5)), 3), "in sync");
        assert_eq!(sync_state(&node(2, Some(5)), 3), "behind");
        assert_eq!(sync_state(&node(3, Some(75)), 3), "offline (75s)");
        assert_eq!(sync_state(&node(3, None), 3), "offline (never seen)");
        let me = NodePolicy {
            this_node: true,
            ..node(3, None)
        };
        assert_eq!(sync_state(&me, 3), "this node");
    }
}
