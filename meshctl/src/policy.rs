//! `meshctl policy`: what-if tools for the policy language (more to come: apply, diff, check).

use crate::Failure;
use anyhow::anyhow;
use policy::engine::{CompileError, PolicySet, Posture};
use policy::model::ProtocolValue;
use policy::model::{Document, Origin};
use policy::testing::{self, FlowEnd};
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

/// The set of `paths` (checked first) under `--posture` and `--trust-domain` values.
pub fn load_for(
    paths: &[PathBuf],
    posture_name: &str,
    trust_domain: &str,
) -> Result<PolicySet, Failure> {
    validate_paths(paths)?;
    Ok(load(paths, posture(posture_name))?.in_trust_domain(trust_domain))
}

/// A `--posture` value (`calico`, else zero trust; clap allows only the two).
pub fn posture(name: &str) -> Posture {
    if name == "calico" {
        Posture::Calico
    } else {
        Posture::ZeroTrust
    }
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
    /// The named ports of its certificate.
    pub ports: Vec<proto::cert::NamedPort>,
}

/// Named ports as the daemon lists them (`NAME=PORT/PROTO`); one that does not parse is left out.
pub fn named_ports(list: &[String]) -> Vec<proto::cert::NamedPort> {
    let mut ports: Vec<proto::cert::NamedPort> =
        list.iter().filter_map(|p| p.parse().ok()).collect();
    ports.sort();
    ports
}

/// One end of `policy check`: `[TD/]NS/NAME[,K=V...]`, an IP address or `network:NAME`. Given no
/// labels and identities of a live mesh (`known`), the identity is looked up there and takes its
/// certificate's labels and first address; one the mesh does not know is an error.
fn resolve(
    flag: &str,
    spec: &str,
    ip: Option<&str>,
    set: &PolicySet,
    known: Option<&[Known]>,
) -> Result<FlowEnd, Failure> {
    let ip = ip
        .map(|t| {
            t.parse()
                .map_err(|_| Failure::input(anyhow!("{flag}-ip: `{t}` is not an IP address")))
        })
        .transpose()?;
    let mut end =
        testing::parse_end(spec, ip, set).map_err(|e| Failure::input(anyhow!("{flag}: {e}")))?;
    if let (FlowEnd::Identity(e), Some(known)) = (&mut end, known) {
        if e.labels.is_empty() && !spec.contains(',') {
            let full = format!("{}/{}/{}", e.trust_domain, e.namespace, e.name);
            let k = known.iter().find(|k| k.identity == full).ok_or_else(|| {
                Failure::input(anyhow!(
                    "{flag}: the mesh has no member {full}; give its labels ({spec},KEY=VALUE...) to ask about it anyway"
                ))
            })?;
            e.labels = k.labels.clone();
            e.ip = e.ip.or(k.ip);
            e.ports = k.ports.clone();
        }
    }
    Ok(end)
}

/// Known identities as flow ends of `set`: each with its labels and named ports, once.
pub fn ends_of(known: &[Known], set: &PolicySet) -> Result<Vec<FlowEnd>, Failure> {
    let mut ends: Vec<FlowEnd> = Vec::new();
    for k in known {
        let mut end = testing::parse_end(&k.identity, k.ip, set)
            .map_err(|e| Failure::input(anyhow!("identity {}: {e}", k.identity)))?;
        if let FlowEnd::Identity(e) = &mut end {
            e.labels.extend(k.labels.clone());
            if e.ports.is_empty() {
                e.ports = k.ports.clone();
            }
        }
        if !ends.contains(&end) {
            ends.push(end);
        }
    }
    Ok(ends)
}

/// `meshctl policy graph`: what the set allows between the identities (`identities`, else those
/// its PolicyTest cases name) and its external networks.
pub fn graph(
    set: &PolicySet,
    identities: Option<&std::path::Path>,
    live: Option<Vec<Known>>,
    group_by: Option<&str>,
    flows: &[PathBuf],
    output: crate::GraphOutput,
) -> Result<(), Failure> {
    use ::policy::graph;
    let ends: Vec<FlowEnd> = match (identities, live) {
        (Some(path), _) => ends_of(&crate::policy_set::identities_file(path)?, set)?,
        (None, Some(known)) => ends_of(&known, set)?,
        (None, None) => graph::identities_of_tests(set),
    };
    if ends.is_empty() {
        return Err(Failure::input(anyhow!(
            "no identities to draw: give --identities FILE, or PolicyTest cases in the files"
        )));
    }
    let mut g = graph::graph(set, &ends);
    let records = if flows.is_empty() {
        Vec::new()
    } else {
        read_flow_logs(flows)?
    };
    if !flows.is_empty() {
        g.overlay(&records);
    }
    if let Some(key) = group_by {
        g = g.grouped_by(key);
    }
    let wide = match output {
        crate::GraphOutput::Dot => {
            print!("{}", g.to_dot());
            return Ok(());
        }
        crate::GraphOutput::Svg => {
            print!("{}", crate::graph_svg::to_svg(&g));
            return Ok(());
        }
        crate::GraphOutput::Html => {
            let svg = crate::graph_svg::to_svg(&g);
            print!("{}", crate::graph_html::to_html(&g, &svg, &records));
            return Ok(());
        }
        crate::GraphOutput::Json => crate::Output::Json.data(&g)?,
        crate::GraphOutput::Yaml => crate::Output::Yaml.data(&g)?,
        crate::GraphOutput::Table => Some(false),
        crate::GraphOutput::Wide => Some(true),
    };
    if let Some(wide) = wide {
        println!("{:<40} {:<40} FLOWS", "FROM", "TO");
        for e in &g.edges {
            let mut line = format!(
                "{:<40} {:<40} {}",
                g.nodes[e.from].id,
                g.nodes[e.to].id,
                e.label()
            );
            if let Some(state) = e.state(g.overlaid) {
                line.push_str(&format!(
                    "  {}",
                    serde_json::to_value(state)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("")
                ));
            }
            if wide {
                line.push_str(&format!("  [{}]", e.by.join("; ")));
            }
            println!("{line}");
        }
        println!("{} node(s), {} edge(s)", g.nodes.len(), g.edges.len());
    }
    Ok(())
}

/// `meshctl policy suggest`: allow-lists of the flows in the flow logs `flows`.
pub fn suggest(
    flows: &[PathBuf],
    namespace: Option<String>,
    by: &str,
    trust_domain: String,
    output: crate::Output,
) -> Result<(), Failure> {
    use ::policy::suggest::{suggest, By, Options};
    let records = read_flow_logs(flows)?;
    let opts = Options {
        by: if by == "labels" {
            By::Labels
        } else {
            By::Names
        },
        namespace,
        trust_domain,
    };
    let s = suggest(&records, &opts).map_err(|e| anyhow!("{e}"))?;
    if s.policies.is_empty() {
        return Err(Failure::input(anyhow!(
            "no flow in {} record(s) has an end in {}{}: nothing to suggest",
            records.len(),
            opts.trust_domain,
            opts.namespace
                .as_deref()
                .map(|ns| format!(" namespace {ns}"))
                .unwrap_or_default()
        )));
    }
    eprintln!(
        "{} policies for {} observed flow(s){}",
        s.policies.len(),
        s.flows,
        match s.denied {
            0 => String::new(),
            n => format!("; {n} denied flow(s) left out"),
        }
    );
    match output {
        crate::Output::Yaml => print!("{}", s.yaml),
        crate::Output::Json => {
            crate::Output::Json.data(&s)?;
        }
        crate::Output::Table | crate::Output::Wide => {
            println!(
                "{:<20} {:<40} {:<8} {:>5} REVIEW",
                "NAMESPACE", "NAME", "TYPE", "RULES"
            );
            for p in &s.policies {
                println!(
                    "{:<20} {:<40} {:<8} {:>5} {}",
                    p.namespace, p.name, p.kind, p.rules, p.reviews
                );
            }
        }
    }
    Ok(())
}

/// Flow-log records from JSON-lines files, each line a record; at most 64 MiB a file, and a
/// line that is not a record is an error naming the file and line.
fn read_flow_logs(paths: &[PathBuf]) -> Result<Vec<proto::admin::FlowRecord>, Failure> {
    use anyhow::Context;
    use std::io::Read;
    const MAX_BYTES: u64 = 64 << 20;
    let mut out = Vec::new();
    for path in paths {
        let mut text = String::new();
        std::fs::File::open(path)
            .with_context(|| format!("--flows {}", path.display()))?
            .take(MAX_BYTES + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading --flows {}", path.display()))?;
        if text.len() as u64 > MAX_BYTES {
            return Err(Failure::input(anyhow!(
                "--flows {}: larger than {MAX_BYTES} bytes",
                path.display()
            )));
        }
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            out.push(serde_json::from_str(line).map_err(|e| {
                Failure::input(anyhow!("--flows {}:{}: {e}", path.display(), i + 1))
            })?);
        }
    }
    Ok(out)
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

/// `meshctl policy check`: ALLOW or DENY for one flow, with what decided each direction. An end
/// outside the mesh, or of another trust domain, is not governed by these policies: only the
/// local identity's direction is decided.
pub fn check(a: CheckArgs) -> Result<(), Failure> {
    let set = a.set;
    let known = a.known.as_deref();
    let src = resolve("--from", a.from, a.from_ip, &set, known)?;
    let dst = resolve("--to", a.to, a.to_ip, &set, known)?;
    let protocol = testing::protocol_number(&ProtocolValue::Name(a.proto.to_string()))
        .map_err(|e| Failure::input(anyhow!("--proto: {e}")))?;
    let answer = testing::decide(&set, &src, &dst, protocol, a.port);
    let allow = answer.allow;
    let side = |end: &FlowEnd, v: &testing::Side| {
        // The address decided with (a member's first; ask with --from-ip/--to-ip for another).
        let mut o = serde_json::json!({ "end": end.name(&set), "ip": end.ip() });
        if let FlowEnd::Identity(e) = end {
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
    // With staged policies: what the set would decide were they promoted (the exit code stays
    // the enforced verdict's).
    let staged = set
        .staged_view()
        .map(|view| testing::decide(&view, &src, &dst, protocol, a.port));
    let mut json = serde_json::json!({
        "verdict": if allow { "ALLOW" } else { "DENY" },
        "protocol": a.proto,
        "port": a.port,
        "egress": side(&src, &answer.egress),
        "ingress": side(&dst, &answer.ingress),
    });
    if let Some(s) = &staged {
        json["staged"] = serde_json::json!({
            "verdict": if s.allow { "ALLOW" } else { "DENY" },
            "decided_by": s.decided_by(),
            "egress": side(&src, &s.egress),
            "ingress": side(&dst, &s.ingress),
        });
    }
    if a.output.data(&json)?.is_some() {
        println!("{}", if allow { "ALLOW" } else { "DENY" });
        for (what, end, v) in [
            ("egress of", &src, &answer.egress),
            ("ingress of", &dst, &answer.ingress),
        ] {
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
        if let Some(s) = &staged {
            let verdict = if s.allow { "ALLOW" } else { "DENY" };
            println!("  staged: {verdict} by {}", s.decided_by());
        }
    }
    if allow {
        Ok(())
    } else {
        Err(Failure::answer())
    }
}

/// `meshctl policy test -f ...`: every `PolicyTest` case of the set the files make, with its
/// verdict, and for a failure what decided; exit 1 when any fails.
pub fn test(set: &PolicySet, output: crate::Output) -> Result<(), Failure> {
    let results = testing::run(set, &set.tests);
    let failed = results.iter().filter(|r| !r.passed()).count();
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "test": r.test,
                "case": r.index,
                "name": r.name,
                "expect": format!("{:?}", r.expect),
                "passed": r.passed(),
                "verdict": r.answer.as_ref().ok().map(|a| if a.allow { "Allow" } else { "Deny" }),
                "decided_by": r.answer.as_ref().ok().map(|a| a.decided_by()),
                "error": r.answer.as_ref().err(),
            })
        })
        .collect();
    let summary = serde_json::json!({
        "cases": results.len(),
        "failed": failed,
        "results": rows,
    });
    if let Some(wide) = output.data(&summary)? {
        for r in &results {
            let mark = if r.passed() { "PASS" } else { "FAIL" };
            let got = match &r.answer {
                Ok(a) if !r.passed() || wide => format!(
                    "  got {} by {}",
                    if a.allow { "Allow" } else { "Deny" },
                    a.decided_by()
                ),
                Ok(_) => String::new(),
                Err(e) => format!("  cannot decide: {e}"),
            };
            println!(
                "{mark}  {}[{}] {}: expect {:?}{got}",
                r.test, r.index, r.name, r.expect
            );
        }
        println!(
            "{} case(s), {} passed, {failed} failed",
            results.len(),
            results.len() - failed
        );
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure::answer())
    }
}

/// The cases of `set` that fail, one line each, for the gate of `policy apply`.
pub fn failing_tests(set: &PolicySet) -> Vec<String> {
    testing::run(set, &set.tests)
        .into_iter()
        .filter(|r| !r.passed())
        .map(|r| match &r.answer {
            Ok(a) => format!(
                "{}[{}] {}: expected {:?}, got {} by {}",
                r.test,
                r.index,
                r.name,
                r.expect,
                if a.allow { "Allow" } else { "Deny" },
                a.decided_by()
            ),
            Err(e) => format!("{}[{}] {}: cannot decide: {e}", r.test, r.index, r.name),
        })
        .collect()
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
