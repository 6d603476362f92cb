//! `meshctl policy`: what-if tools for the policy language (more to come: apply, diff, check).

use crate::Failure;
use anyhow::anyhow;
use policy::engine::{CompileError, Direction, End, Endpoint, Flow, PolicySet, Posture};
use policy::model::{Document, Origin};
use policy::Selector;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The local trust domain `policy check` assumes for files, unless told (Kubernetes' and Istio's
/// default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// `meshctl policy selector EXPR --labels K=V,...`: prints `true` or `false`.
pub fn selector(expr: &str, labels: &str) -> Result<(), Failure> {
    let sel = Selector::parse(expr).map_err(|e| {
        let pointer = format!("{}^", " ".repeat(e.column.saturating_sub(1)));
        Failure::input(anyhow!("selector: {e}\n  {expr}\n  {pointer}"))
    })?;
    let mut map = BTreeMap::new();
    for pair in labels.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| Failure::input(anyhow!("--labels: `{pair}` is not KEY=VALUE")))?;
        map.insert(k.trim().to_string(), v.trim().to_string());
    }
    println!("{}", sel.matches(&map));
    Ok(())
}

/// The policy texts `paths` name, each with the name errors give it: files as given, the
/// `*.yaml`/`*.yml` of directories, and standard input for `-` (read once, named `<stdin>`).
pub fn sources(paths: &[PathBuf]) -> Result<Vec<(String, String)>, Failure> {
    let mut out = Vec::new();
    let mut stdin_read = false;
    for p in paths {
        if p.as_os_str() == "-" {
            if stdin_read {
                return Err(Failure::input(anyhow!("-f - given twice")));
            }
            stdin_read = true;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| Failure::input(anyhow!("reading standard input: {e}")))?;
            out.push(("<stdin>".to_string(), text));
            continue;
        }
        for f in files(std::slice::from_ref(p))? {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| Failure::input(anyhow!("{}: {e}", f.display())))?;
            out.push((f.display().to_string(), text));
        }
    }
    Ok(out)
}

/// The policy files `paths` name: files as given, and the `*.yaml`/`*.yml` of directories.
fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Failure> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Failure::input(anyhow!("{}: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// Reads every policy document in `paths` (files, or directories of `*.yaml`/`*.yml`), reporting
/// every error with its file, document and field, and compiles them.
pub fn load(paths: &[PathBuf], posture: Posture) -> Result<PolicySet, Failure> {
    let mut located = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in sources(paths)? {
        let (mut d, e) = policy::model::parse_located(&text, &name);
        located.append(&mut d);
        errors.extend(e.iter().map(|e| e.to_string()));
    }
    let dups = policy::model::duplicates(located.iter().map(|(o, d)| (o, d.object_name())));
    errors.extend(dups.iter().map(|e| e.to_string()));
    let origins: BTreeMap<String, Origin> = located
        .iter()
        .map(|(o, d)| (d.object_name(), o.clone()))
        .collect();
    let docs: Vec<Document> = located.into_iter().map(|(_, d)| d).collect();
    // Compile what parsed too, so every error is reported at once.
    match PolicySet::compile(&docs, posture) {
        Ok(set) if errors.is_empty() => return Ok(set),
        Ok(_) => {}
        Err(e) => errors.extend(located_errors(&e, &origins)),
    }
    Err(Failure::input(anyhow!(
        "the policy set is invalid ({} error(s)):\n  {}",
        errors.len(),
        errors.join("\n  ")
    )))
}

/// Compile errors, each with the file and document of its policy when `origins` knows them.
pub fn located_errors(errors: &[CompileError], origins: &BTreeMap<String, Origin>) -> Vec<String> {
    errors
        .iter()
        .map(|e| e.at(origins.get(&e.policy)))
        .collect()
}

/// An identity the live mesh knows: its labels and first address, from its certificate.
pub struct Known {
    /// `TD/NS/NAME`
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<std::net::IpAddr>,
}

/// `[TD/]NS/NAME[,K=V...]` as an endpoint; without `TD/`, of trust domain `local`. Given no
/// labels and identities of a live mesh (`known`), the identity is looked up there and takes its
/// certificate's labels and address; one the mesh does not know is an error.
fn endpoint(
    flag: &str,
    spec: &str,
    ip: Option<&str>,
    local: &str,
    known: Option<&[Known]>,
) -> Result<Endpoint, Failure> {
    let mut parts = spec.split(',');
    let id = parts.next().unwrap_or_default();
    let names: Vec<&str> = id.split('/').collect();
    let (trust_domain, namespace, name) = match names[..] {
        [ns, name] => (local, ns, name),
        [td, ns, name] => (td, ns, name),
        _ => ("", "", ""),
    };
    if [trust_domain, namespace, name].iter().any(|s| s.is_empty()) {
        return Err(Failure::input(anyhow!(
            "{flag}: `{id}` is not [TRUST_DOMAIN/]NAMESPACE/NAME"
        )));
    }
    let mut labels = BTreeMap::new();
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Failure::input(anyhow!("{flag}: `{kv}` is not KEY=VALUE")))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let mut ip = ip
        .map(|t| {
            t.parse()
                .map_err(|_| Failure::input(anyhow!("{flag}-ip: `{t}` is not an IP address")))
        })
        .transpose()?;
    if let (true, Some(known)) = (labels.is_empty() && !spec.contains(','), known) {
        let full = format!("{trust_domain}/{namespace}/{name}");
        let Some(k) = known.iter().find(|k| k.identity == full) else {
            return Err(Failure::input(anyhow!(
                "{flag}: the mesh has no member {full}; give its labels ({id},KEY=VALUE...) to ask about it anyway"
            )));
        };
        labels = k.labels.clone();
        ip = ip.or(k.ip);
    }
    Ok(Endpoint {
        trust_domain: trust_domain.into(),
        namespace: namespace.into(),
        name: name.into(),
        labels,
        ip,
    })
}

pub struct CheckArgs<'a> {
    pub set: PolicySet,
    /// The live mesh's identities, when checking against the set in force.
    pub known: Option<Vec<Known>>,
    pub output: crate::Output,
    pub from: &'a str,
    pub to: &'a str,
    pub from_ip: Option<&'a str>,
    pub to_ip: Option<&'a str>,
    pub proto: &'a str,
    pub port: Option<u16>,
}

/// `meshctl policy check`: ALLOW or DENY for one flow, with what decided each direction.
/// `--from`/`--to`: an identity, or an address outside the mesh.
enum CheckEnd {
    Identity(Endpoint),
    External(std::net::IpAddr),
}

impl CheckEnd {
    fn parse(
        flag: &str,
        spec: &str,
        ip: Option<&str>,
        local: &str,
        known: Option<&[Known]>,
    ) -> Result<CheckEnd, Failure> {
        match spec.parse() {
            Ok(addr) => Ok(CheckEnd::External(addr)),
            Err(_) => endpoint(flag, spec, ip, local, known).map(CheckEnd::Identity),
        }
    }

    fn end(&self) -> End<'_> {
        match self {
            CheckEnd::Identity(e) => End::Identity(e),
            CheckEnd::External(ip) => End::External(*ip),
        }
    }

    fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            CheckEnd::Identity(e) => e.ip,
            CheckEnd::External(ip) => Some(*ip),
        }
    }

    /// A SPIFFE ID, or the address with the external networks that contain it.
    fn name(&self, set: &PolicySet) -> String {
        match self {
            CheckEnd::Identity(e) => e.spiffe_id(),
            CheckEnd::External(ip) => {
                let nets: Vec<&str> = set
                    .networks()
                    .iter()
                    .filter(|n| n.contains(*ip))
                    .map(|n| n.name.as_str())
                    .collect();
                if nets.is_empty() {
                    format!("{ip} (outside the mesh)")
                } else {
                    format!("{ip} ({})", nets.join(", "))
                }
            }
        }
    }
}

/// `meshctl policy check`: ALLOW or DENY for one flow, with what decided each direction. An end
/// outside the mesh, or of another trust domain, is not governed by these policies: only the
/// local identity's direction is decided.
pub fn check(a: CheckArgs) -> Result<(), Failure> {
    let set = a.set;
    let known = a.known.as_deref();
    let src = CheckEnd::parse("--from", a.from, a.from_ip, &set.trust_domain, known)?;
    let dst = CheckEnd::parse("--to", a.to, a.to_ip, &set.trust_domain, known)?;
    let protocol = match a.proto.to_ascii_lowercase().as_str() {
        "tcp" => policy::engine::TCP,
        "udp" => policy::engine::UDP,
        "icmp" => policy::engine::ICMP,
        "icmpv6" => policy::engine::ICMPV6,
        "sctp" => policy::engine::SCTP,
        other => other.parse().map_err(|_| {
            Failure::input(anyhow!(
                "--proto: `{other}` is not tcp, udp, icmp, icmpv6, sctp or a number"
            ))
        })?,
    };
    let v6 = src.ip().or(dst.ip()).is_some_and(|ip| ip.is_ipv6());
    let flow = Flow {
        protocol,
        src_port: None,
        dst_port: a.port,
        icmp: None,
        ip_version: if v6 { 6 } else { 4 },
    };
    let governed = |e: &CheckEnd| match e {
        CheckEnd::Identity(e) if e.trust_domain == set.trust_domain => None,
        CheckEnd::Identity(e) => Some(format!(
            "decided by {}'s own policies, not these",
            e.trust_domain
        )),
        CheckEnd::External(_) => Some("outside the mesh: no policy governs it".to_string()),
    };
    let decide = |dir, e: &CheckEnd| {
        governed(e).map_or_else(
            || Ok(set.decide_ends(dir, &flow, src.end(), dst.end())),
            Err,
        )
    };
    let egress = decide(Direction::Egress, &src);
    let ingress = decide(Direction::Ingress, &dst);
    let allowed =
        |v: &Result<policy::engine::Verdict, String>| v.as_ref().map_or(true, |v| v.allow);
    let allow = allowed(&egress) && allowed(&ingress);
    let side = |end: &CheckEnd, v: &Result<policy::engine::Verdict, String>| {
        // The address decided with (a member's first; ask with --from-ip/--to-ip for another).
        let mut o = serde_json::json!({ "end": end.name(&set), "ip": end.ip() });
        if let CheckEnd::Identity(e) = end {
            o["labels"] = serde_json::json!(e.labels);
        }
        match v {
            Ok(v) => {
                o["allowed"] = v.allow.into();
                o["by"] = v.by.to_string().into();
                o["rule"] = serde_json::json!(v.rule);
            }
            Err(why) => o["not_governed"] = why.clone().into(),
        }
        o
    };
    let answer = serde_json::json!({
        "verdict": if allow { "ALLOW" } else { "DENY" },
        "protocol": a.proto,
        "port": a.port,
        "egress": side(&src, &egress),
        "ingress": side(&dst, &ingress),
    });
    if a.output.data(&answer)?.is_none() {
        return if allow {
            Ok(())
        } else {
            Err(Failure::answer())
        };
    }
    println!("{}", if allow { "ALLOW" } else { "DENY" });
    for (what, end, v) in [("egress of", &src, &egress), ("ingress of", &dst, &ingress)] {
        match v {
            Ok(v) => println!(
                "  {what} {}: {} by {}{}",
                end.name(&set),
                if v.allow { "allowed" } else { "denied" },
                v.by,
                v.rule
                    .as_ref()
                    .map(|r| format!(" rule {r}"))
                    .unwrap_or_default()
            ),
            Err(why) => println!("  {what} {}: {why}", end.name(&set)),
        }
    }
    if allow {
        Ok(())
    } else {
        Err(Failure::answer())
    }
}

pub fn validate_paths(files: &[PathBuf]) -> Result<(), Failure> {
    for f in files {
        if f.as_os_str() != "-" && !Path::new(f).exists() {
            return Err(Failure::input(anyhow!(
                "-f {}: no such file or directory",
                f.display()
            )));
        }
    }
    Ok(())
}
