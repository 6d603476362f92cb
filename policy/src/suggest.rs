//! Least-privilege allow-lists suggested from observed flows, as Calico's zero-trust guide asks of
//! teams without a flow graph ("collect flow logs, or run in log-only mode, and turn the observed
//! flows into rules"). Pure: flow-log records in, Calico YAML out; `meshctl policy suggest`
//! reads the files and prints the text.
//!
//! What is suggested: for each identity of the local trust domain that received flows, one
//! ingress `NetworkPolicy` allowing exactly the observed (source, protocol, port); for each that
//! sent flows, one egress `NetworkPolicy` allowing exactly the observed (destination, protocol,
//! port); and a `PolicyTest` with every observed flow as an `Allow` case, and flows never
//! observed (a reply direction, the next port) as `Deny` cases, so `meshctl policy test` shows the
//! suggestion does what it says. Denied flows are not suggested: an attempt the policies refused
//! may be an attack, and allowing it is a decision to make by hand.

use crate::engine::SERVICE_ACCOUNT_LABEL;
use crate::selector::Selector;
use crate::testing::protocol_name;
use proto::admin::{FlowEnd as RecordEnd, FlowRecord};
use proto::trust::TRUST_DOMAIN_LABEL;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

/// A flow seen from one peer on more ports than this is flagged: a port range, or a scan.
pub const MANY_PORTS: usize = 8;

/// How suggested policies select identities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum By {
    /// By service account (`projectcalico.org/serviceaccount`, `serviceAccounts.names`).
    #[default]
    Names,
    /// By every label the identity's certificate carries (`app == 'api' && ...`); an identity
    /// without labels is selected by name.
    Labels,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub by: By,
    /// Suggest policies only for the identities of this namespace.
    pub namespace: Option<String>,
    /// The local trust domain: policies are suggested for its identities only.
    pub trust_domain: String,
}

/// An identity as the flow log names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ident {
    trust_domain: String,
    namespace: String,
    name: String,
}

/// One end of an observed flow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Peer {
    Identity(Ident),
    /// An address outside the mesh, with the first external network that contains it.
    External(IpAddr, Option<String>),
}

/// (source, destination, protocol number, destination port).
type FlowKey = (Peer, Peer, u8, Option<u16>);

/// What the records say, before any policy is written.
#[derive(Debug, Default)]
struct Observed {
    /// New flows seen, by flow: the larger of the egress and the ingress count, since both
    /// nodes log the same flow.
    flows: BTreeMap<FlowKey, [u64; 2]>,
    /// The newest labels each identity was seen with.
    labels: BTreeMap<Ident, BTreeMap<String, String>>,
    denied: BTreeMap<FlowKey, u64>,
    /// Records that are not new flows of two known ends (closing records are not counted).
    unusable: u64,
}

/// The suggestion: the YAML text, and what it was made from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Suggestion {
    pub yaml: String,
    pub policies: Vec<Suggested>,
    /// Distinct flows allowed.
    pub flows: usize,
    /// Distinct denied flows left out.
    pub denied: usize,
}

fn end_of(e: &RecordEnd) -> Option<Peer> {
    match (&e.trust_domain, &e.namespace, &e.name) {
        (Some(td), Some(ns), Some(n)) => Some(Peer::Identity(Ident {
            trust_domain: td.clone(),
            namespace: ns.clone(),
            name: n.clone(),
        })),
        _ => Some(Peer::External(
            e.ip.parse().ok()?,
            e.networks.first().cloned(),
        )),
    }
}

fn protocol_of(name: &str) -> Option<u8> {
    let v = crate::model::ProtocolValue::Name(name.to_ascii_uppercase());
    crate::testing::protocol_number(&v)
        .ok()
        .or_else(|| name.parse().ok())
}

fn observe(records: &[FlowRecord]) -> Observed {
    let mut o = Observed::default();
    for r in records {
        if r.event != "new" {
            continue;
        }
        let (Some(src), Some(dst), Some(proto)) =
            (end_of(&r.src), end_of(&r.dst), protocol_of(&r.protocol))
        else {
            o.unusable += 1;
            continue;
        };
        for (end, peer) in [(&r.src, &src), (&r.dst, &dst)] {
            if let Peer::Identity(id) = peer {
                o.labels.insert(id.clone(), end.labels.clone());
            }
        }
        let key = (src, dst, proto, r.dst.port);
        if r.verdict == "deny" {
            *o.denied.entry(key).or_default() += 1;
        } else {
            let at = usize::from(r.direction == "ingress");
            o.flows.entry(key).or_default()[at] += 1;
        }
    }
    o
}

/// A YAML double-quoted scalar.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A selector literal: Calico quotes with `'` or `"`.
fn lit(s: &str) -> Option<String> {
    if !s.contains('\'') {
        Some(format!("'{s}'"))
    } else if !s.contains('"') {
        Some(format!("\"{s}\""))
    } else {
        None
    }
}

/// `k1 == 'v1' && k2 == 'v2'` for every label, if that parses and selects exactly these labels.
fn label_selector(labels: &BTreeMap<String, String>) -> Option<String> {
    if labels.is_empty() {
        return None;
    }
    let terms: Option<Vec<String>> = labels
        .iter()
        .map(|(k, v)| lit(v).map(|v| format!("{k} == {v}")))
        .collect();
    let text = terms?.join(" && ");
    let parsed = Selector::parse(&text).ok()?;
    parsed.matches(labels).then_some(text)
}

/// How a rule names its peer: the fields of its `source` or `destination` (without ports), and
/// what to review about it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Entity {
    lines: Vec<String>,
    review: Vec<String>,
}

impl Options {
    fn is_local(&self, id: &Ident) -> bool {
        id.trust_domain == self.trust_domain
    }

    fn governs(&self, id: &Ident) -> bool {
        self.is_local(id) && self.namespace.as_ref().is_none_or(|ns| *ns == id.namespace)
    }

    /// The policy `selector` for identity `id`, and a note when labels could not be used.
    fn selector(&self, id: &Ident, labels: &BTreeMap<String, String>) -> (String, Option<String>) {
        let by_name = || {
            let name = lit(&id.name).unwrap_or_else(|| format!("'{}'", id.name));
            format!("{SERVICE_ACCOUNT_LABEL} == {name}")
        };
        match self.by {
            By::Names => (by_name(), None),
            By::Labels => match label_selector(labels) {
                Some(s) => (s, None),
                None => (
                    by_name(),
                    Some(format!(
                        "{} has no labels a selector can name: selected by service account",
                        id.name
                    )),
                ),
            },
        }
    }

    /// The peer `p` as seen from a policy of namespace `ns`.
    fn entity(
        &self,
        p: &Peer,
        ns: &str,
        labels: &BTreeMap<Ident, BTreeMap<String, String>>,
    ) -> Entity {
        let mut review = Vec::new();
        let mut lines = Vec::new();
        match p {
            Peer::External(ip, network) => {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                lines.push(format!("nets: [{}]", q(&format!("{ip}/{len}"))));
                review.push(match network {
                    Some(n) => format!("{ip} is outside the mesh (in network {n})"),
                    None => format!("{ip} is outside the mesh and in no external network"),
                });
            }
            Peer::Identity(id) => {
                let mut nsel = Vec::new();
                if !self.is_local(id) {
                    nsel.push(format!(
                        "{TRUST_DOMAIN_LABEL} == {}",
                        lit(&id.trust_domain).unwrap_or_default()
                    ));
                    review.push(format!(
                        "{} is of trust domain {}",
                        id.name, id.trust_domain
                    ));
                }
                if !self.is_local(id) || id.namespace != ns {
                    nsel.push(format!(
                        "projectcalico.org/name == {}",
                        lit(&id.namespace).unwrap_or_default()
                    ));
                    if self.is_local(id) {
                        review.push(format!("{} is of namespace {}", id.name, id.namespace));
                    }
                }
                if !nsel.is_empty() {
                    lines.push(format!("namespaceSelector: {}", q(&nsel.join(" && "))));
                }
                let own = labels.get(id).cloned().unwrap_or_default();
                match (self.by, label_selector(&own)) {
                    (By::Labels, Some(s)) => lines.push(format!("selector: {}", q(&s))),
                    _ => lines.push(format!("serviceAccounts: {{names: [{}]}}", q(&id.name))),
                }
            }
        }
        Entity { lines, review }
    }
}

/// One suggested policy, for a summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Suggested {
    pub namespace: String,
    pub name: String,
    /// `Ingress` or `Egress`.
    pub kind: &'static str,
    pub rules: usize,
    /// `# review:` lines in it.
    pub reviews: usize,
}

/// The ports of one rule, with how often each was seen.
type Ports = BTreeMap<Option<u16>, u64>;

/// One suggested policy: its namespace and selector, and its rules by (peer, protocol).
struct Draft {
    namespace: String,
    selector: String,
    /// The identities it selects, for its name and its header.
    identities: BTreeSet<String>,
    notes: Vec<String>,
    rules: BTreeMap<(Entity, u8), Ports>,
}

/// The suggestion for `records`: least-privilege allow-lists of the observed flows. Its
/// `PolicyTest` cases are run on it before it is returned; an error is a suggestion that does
/// not compile, or fails one of its `Allow` cases (a bug, reported rather than printed).
pub fn suggest(records: &[FlowRecord], opts: &Options) -> Result<Suggestion, String> {
    let o = observe(records);
    let mut drafts: [BTreeMap<(String, String), Draft>; 2] = Default::default();
    let empty = BTreeMap::new();
    for ((src, dst, proto, port), counts) in &o.flows {
        let seen = counts[0].max(counts[1]);
        // [0]: the egress policy of the source; [1]: the ingress policy of the destination.
        for (side, own, peer) in [(0, src, dst), (1, dst, src)] {
            let Peer::Identity(id) = own else { continue };
            if !opts.governs(id) {
                continue;
            }
            let (selector, note) = opts.selector(id, o.labels.get(id).unwrap_or(&empty));
            let d = drafts[side]
                .entry((id.namespace.clone(), selector.clone()))
                .or_insert_with(|| Draft {
                    namespace: id.namespace.clone(),
                    selector,
                    identities: BTreeSet::new(),
                    notes: Vec::new(),
                    rules: BTreeMap::new(),
                });
            d.identities.insert(id.name.clone());
            if let Some(n) = note {
                if !d.notes.contains(&n) {
                    d.notes.push(n);
                }
            }
            let entity = opts.entity(peer, &id.namespace, &o.labels);
            let ports = d.rules.entry((entity, *proto)).or_default();
            *ports.entry(*port).or_default() += seen;
        }
    }

    let mut yaml = String::new();
    let _ = writeln!(
        yaml,
        "# Suggested by `meshctl policy suggest` from {} observed flow(s): least-privilege \
         allow-lists\n# in Calico's YAML. Review every `# review:` line before applying.",
        o.flows.len()
    );
    if !o.denied.is_empty() {
        let _ = writeln!(
            yaml,
            "# Not suggested: {} flow(s) that were denied when observed (allow them by hand if \
             they are wanted):",
            o.denied.len()
        );
        for ((src, dst, proto, port), n) in o.denied.iter().take(20) {
            let _ = writeln!(
                yaml,
                "#   {} -> {} {}, {n} time(s)",
                peer_name(src),
                peer_name(dst),
                flow_name(*proto, *port)
            );
        }
        if o.denied.len() > 20 {
            let _ = writeln!(yaml, "#   ... and {} more", o.denied.len() - 20);
        }
    }
    if o.unusable > 0 {
        let _ = writeln!(
            yaml,
            "# {} record(s) skipped: an end or protocol the flow log could not name",
            o.unusable
        );
    }
    let mut names = BTreeSet::new();
    let mut policies = Vec::new();
    for (side, kind) in [(1, "Ingress"), (0, "Egress")] {
        for d in drafts[side].values() {
            policies.push(write_policy(&mut yaml, d, kind, &mut names));
        }
    }
    let cases = checked_cases(&yaml, candidate_cases(&o, opts), opts)?;
    write_tests(&mut yaml, &cases);
    Ok(Suggestion {
        yaml,
        policies,
        flows: o.flows.len(),
        denied: o.denied.len(),
    })
}

fn peer_name(p: &Peer) -> String {
    match p {
        Peer::Identity(id) => format!("{}/{}/{}", id.trust_domain, id.namespace, id.name),
        Peer::External(ip, Some(n)) => format!("{ip} ({n})"),
        Peer::External(ip, None) => ip.to_string(),
    }
}

fn flow_name(proto: u8, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{} {p}", protocol_name(proto)),
        None => protocol_name(proto),
    }
}

fn has_ports(proto: u8) -> bool {
    use crate::engine::{SCTP, TCP, UDP, UDPLITE};
    matches!(proto, TCP | UDP | SCTP | UDPLITE)
}

fn write_policy(
    out: &mut String,
    d: &Draft,
    kind: &'static str,
    names: &mut BTreeSet<(String, String)>,
) -> Suggested {
    let start = out.len();
    let who: Vec<&str> = d.identities.iter().map(String::as_str).collect();
    let base = format!("suggested-{}-{}", who[0], kind.to_ascii_lowercase());
    let mut name = base.clone();
    let mut n = 2;
    while !names.insert((d.namespace.clone(), name.clone())) {
        name = format!("{base}-{n}");
        n += 1;
    }
    let (field, peer_field) = match kind {
        "Ingress" => ("ingress", "source"),
        _ => ("egress", "destination"),
    };
    let _ = writeln!(out, "---");
    let _ = writeln!(
        out,
        "# {kind} of {} in namespace {}: {} rule(s).",
        who.join(", "),
        d.namespace,
        d.rules.len()
    );
    for n in &d.notes {
        let _ = writeln!(out, "# review: {n}");
    }
    let _ = writeln!(out, "apiVersion: projectcalico.org/v3");
    let _ = writeln!(out, "kind: NetworkPolicy");
    let _ = writeln!(out, "metadata:");
    let _ = writeln!(out, "  name: {}", q(&name));
    let _ = writeln!(out, "  namespace: {}", q(&d.namespace));
    let _ = writeln!(out, "spec:");
    let _ = writeln!(out, "  selector: {}", q(&d.selector));
    let _ = writeln!(out, "  types: [{kind}]");
    let _ = writeln!(out, "  {field}:");
    for ((entity, proto), ports) in &d.rules {
        for r in &entity.review {
            let _ = writeln!(out, "    # review: {r}");
        }
        let once: Vec<String> = ports
            .iter()
            .filter(|(_, n)| **n == 1)
            .map(|(p, _)| flow_name(*proto, *p))
            .collect();
        if !once.is_empty() {
            let _ = writeln!(out, "    # review: seen once: {}", once.join(", "));
        }
        let numbers: Vec<u16> = ports.keys().filter_map(|p| *p).collect();
        if numbers.len() > MANY_PORTS {
            let _ = writeln!(
                out,
                "    # review: {} ports from one peer: a range, or a scan?",
                numbers.len()
            );
        }
        let _ = writeln!(out, "    - action: Allow");
        let _ = writeln!(out, "      protocol: {}", protocol_name(*proto));
        let _ = writeln!(out, "      {peer_field}:");
        for l in &entity.lines {
            let _ = writeln!(out, "        {l}");
        }
        if has_ports(*proto) && !numbers.is_empty() {
            let list: Vec<String> = numbers.iter().map(u16::to_string).collect();
            if kind == "Ingress" {
                let _ = writeln!(out, "      destination:");
            }
            let _ = writeln!(out, "        ports: [{}]", list.join(", "));
        }
    }
    Suggested {
        namespace: d.namespace.clone(),
        name,
        kind,
        rules: d.rules.len(),
        reviews: out[start..].matches("# review:").count(),
    }
}

/// A `PolicyTest` end for `p`: `TD/NS/NAME,K=V...` or the address.
fn case_end(p: &Peer, labels: &BTreeMap<Ident, BTreeMap<String, String>>) -> Option<String> {
    match p {
        Peer::External(ip, _) => Some(ip.to_string()),
        Peer::Identity(id) => {
            let mut s = format!("{}/{}/{}", id.trust_domain, id.namespace, id.name);
            for (k, v) in labels.get(id).into_iter().flatten() {
                // A label the case syntax cannot carry leaves the end out of the test.
                if [k, v].iter().any(|x| x.contains([',', '='])) {
                    return None;
                }
                let _ = write!(s, ",{k}={v}");
            }
            Some(s)
        }
    }
}

/// A `PolicyTest` case line: (expectation, text).
type Case = (&'static str, String);

/// Cases for the observed flows (`Allow`) and for flows next to them never observed (`Deny`: the
/// reply direction, the next port). A flow with an end that this suggestion does not govern but
/// whose policies live in the same trust domain (another namespace under `--namespace`) gets no
/// case: the other end's policies are not in the file.
fn candidate_cases(o: &Observed, opts: &Options) -> Vec<Case> {
    let mut cases = Vec::new();
    let governed = |p: &Peer| matches!(p, Peer::Identity(id) if opts.governs(id));
    let elsewhere =
        |p: &Peer| matches!(p, Peer::Identity(id) if opts.is_local(id) && !opts.governs(id));
    let observed = |src: &Peer, dst: &Peer, proto: u8, port: Option<u16>| {
        o.flows
            .contains_key(&(src.clone(), dst.clone(), proto, port))
    };
    for (src, dst, proto, port) in o.flows.keys() {
        if (!governed(src) && !governed(dst)) || elsewhere(src) || elsewhere(dst) {
            continue;
        }
        let (Some(from), Some(to)) = (case_end(src, &o.labels), case_end(dst, &o.labels)) else {
            continue;
        };
        let case = |expect: &'static str, from: &str, to: &str, p: Option<u16>| {
            let port = p.map(|p| format!(", port: {p}")).unwrap_or_default();
            (
                expect,
                format!(
                    "    - {{from: {}, to: {}, protocol: {}{port}, expect: {expect}}}",
                    q(from),
                    q(to),
                    protocol_name(*proto),
                ),
            )
        };
        cases.push(case("Allow", &from, &to, *port));
        if governed(src) && governed(dst) && !observed(dst, src, *proto, *port) {
            cases.push(case("Deny", &to, &from, *port));
        }
        if let Some(next) = port.and_then(|p| p.checked_add(1)) {
            if has_ports(*proto) && !observed(src, dst, *proto, Some(next)) {
                cases.push(case("Deny", &from, &to, Some(next)));
            }
        }
    }
    let mut seen = BTreeSet::new();
    cases.retain(|c| seen.insert(c.1.clone()));
    cases
}

/// Runs `cases` on the policies of `yaml`: every `Allow` case must pass; a `Deny` case that a
/// broader rule allows (identities selected by the same labels) is left out, being untrue.
fn checked_cases(yaml: &str, cases: Vec<Case>, opts: &Options) -> Result<Vec<Case>, String> {
    use crate::engine::{PolicySet, Posture};
    let mut text = yaml.to_string();
    write_tests(&mut text, &cases);
    let docs = crate::model::parse_documents(&text, "suggestion")
        .map_err(|e| format!("the suggestion does not parse: {e:?}"))?;
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .map_err(|e| format!("the suggestion does not compile: {e:?}"))?
        .in_trust_domain(&opts.trust_domain);
    let results = crate::testing::run(&set, &set.tests);
    if results.len() != cases.len() {
        return Err(format!(
            "the suggestion has {} test case(s), {} expected",
            results.len(),
            cases.len()
        ));
    }
    let mut kept = Vec::new();
    for (case, result) in cases.into_iter().zip(&results) {
        match (case.0, result.passed()) {
            (_, true) => kept.push(case),
            ("Deny", false) => {}
            _ => {
                return Err(format!(
                    "the suggestion fails its own case {}: {result:?}",
                    case.1
                ))
            }
        }
    }
    Ok(kept)
}

fn write_tests(out: &mut String, cases: &[Case]) {
    if cases.is_empty() {
        return;
    }
    let _ = writeln!(out, "---");
    let _ = writeln!(
        out,
        "# The observed flows are allowed, and flows next to them never observed are not:\n\
         # `meshctl policy test` runs these cases on this file alone."
    );
    let _ = writeln!(out, "apiVersion: mesh.io/v1");
    let _ = writeln!(out, "kind: PolicyTest");
    let _ = writeln!(out, "metadata:");
    let _ = writeln!(out, "  name: suggested-flows");
    let _ = writeln!(out, "spec:");
    let _ = writeln!(out, "  cases:");
    for (_, c) in cases {
        let _ = writeln!(out, "{c}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{PolicySet, Posture};
    use crate::graph::graph;
    use crate::testing::{parse_end, FlowEnd};
    use proto::admin::{FlowEnd as RecordEnd, FlowRecord};

    const TD: &str = "cluster.local";

    fn end(id: &str, port: Option<u16>) -> RecordEnd {
        let mut e = RecordEnd {
            ip: "100.64.0.1".into(),
            port,
            trust_domain: None,
            namespace: None,
            name: None,
            spiffe_id: None,
            networks: Vec::new(),
            labels: BTreeMap::new(),
        };
        match id.parse::<IpAddr>() {
            Ok(ip) => e.ip = ip.to_string(),
            Err(_) => {
                let parts: Vec<&str> = id.split('/').collect();
                let (td, ns, name) = match parts[..] {
                    [ns, name] => (TD, ns, name),
                    [td, ns, name] => (td, ns, name),
                    _ => panic!("{id}"),
                };
                e.trust_domain = Some(td.into());
                e.namespace = Some(ns.into());
                e.name = Some(name.into());
                e.labels.insert("app".into(), name.into());
            }
        }
        e
    }

    /// A new flow as the flow log writes it, on the node of `direction`.
    fn record(
        from: &str,
        to: &str,
        proto: &str,
        port: u16,
        verdict: &str,
        direction: &str,
    ) -> FlowRecord {
        FlowRecord {
            seq: 1,
            time: "2026-11-24T10:00:00.000Z".into(),
            event: "new".into(),
            direction: direction.into(),
            verdict: verdict.into(),
            protocol: proto.into(),
            src: end(from, Some(40000)),
            dst: end(to, (proto != "icmp").then_some(port)),
            policy: "no-policy".into(),
            rule: None,
            log_rule: false,
            packets: None,
            bytes: None,
            staged: None,
            node: None,
        }
    }

    /// The microblog's six flows, each seen twice from both nodes, in audit mode.
    fn microblog() -> Vec<FlowRecord> {
        let flows = [
            ("microblog/api", "microblog/post", 8080),
            ("microblog/search", "microblog/post", 8080),
            ("microblog/api", "microblog/search", 8080),
            ("microblog/api", "microblog/user", 8080),
            ("microblog/post", "microblog/storage", 5432),
            ("microblog/user", "microblog/storage", 5432),
        ];
        let mut out = Vec::new();
        for (from, to, port) in flows {
            for _ in 0..2 {
                for dir in ["egress", "ingress"] {
                    out.push(record(from, to, "tcp", port, "audit", dir));
                }
            }
        }
        out
    }

    fn opts(by: By) -> Options {
        Options {
            by,
            namespace: None,
            trust_domain: TD.into(),
        }
    }

    fn compiled(s: &Suggestion) -> PolicySet {
        let docs = crate::model::parse_documents(&s.yaml, "s").unwrap();
        PolicySet::compile(&docs, Posture::ZeroTrust)
            .unwrap()
            .in_trust_domain(TD)
    }

    fn ends(set: &PolicySet, names: &[&str]) -> Vec<FlowEnd> {
        names
            .iter()
            .map(|n| parse_end(&format!("microblog/{n},app={n}"), None, set).unwrap())
            .collect()
    }

    /// Edges of the graph a set allows, as `FROM -> TO: FLOWS`.
    fn edges(set: &PolicySet, names: &[&str]) -> Vec<String> {
        let g = graph(set, &ends(set, names));
        let mut out: Vec<String> = g
            .edges
            .iter()
            .map(|e| {
                format!(
                    "{} -> {}: {}",
                    g.nodes[e.from].id,
                    g.nodes[e.to].id,
                    e.flows.join(", ")
                )
            })
            .collect();
        out.sort();
        out
    }

    const SERVICES: [&str; 5] = ["api", "post", "search", "storage", "user"];

    #[test]
    fn the_microblog_flows_give_back_the_microblog_graph_by_names_and_by_labels() {
        let guide = edges(
            &crate::testing::microblog::set(crate::testing::microblog::POST),
            &SERVICES,
        );
        assert_eq!(guide.len(), 6);
        for by in [By::Names, By::Labels] {
            let s = suggest(&microblog(), &opts(by)).unwrap();
            // One ingress policy per destination, one egress policy per source.
            assert_eq!(s.policies.len(), 4 + 4, "{}", s.yaml);
            assert_eq!(s.flows, 6);
            let set = compiled(&s);
            assert_eq!(edges(&set, &SERVICES), guide, "{}", s.yaml);
            let results = crate::testing::run(&set, &set.tests);
            assert!(results.len() > 6);
            assert!(results.iter().all(|r| r.passed()), "{results:?}");
            assert!(results
                .iter()
                .any(|r| r.expect == crate::testing::Expect::Deny));
            // Each flow seen twice: nothing flagged as seen once.
            assert!(!s.yaml.contains("seen once"), "{}", s.yaml);
        }
        let by_labels = suggest(&microblog(), &opts(By::Labels)).unwrap().yaml;
        assert!(
            by_labels.contains("selector: \"app == 'post'\""),
            "{by_labels}"
        );
        let by_names = suggest(&microblog(), &opts(By::Names)).unwrap().yaml;
        assert!(
            by_names.contains("selector: \"projectcalico.org/serviceaccount == 'post'\""),
            "{by_names}"
        );
        assert!(
            by_names.contains("serviceAccounts: {names: [\"api\"]}"),
            "{by_names}"
        );
    }

    #[test]
    fn denied_flows_are_left_out_and_named() {
        let mut records = microblog();
        records.push(record(
            "microblog/user",
            "microblog/post",
            "tcp",
            8080,
            "deny",
            "egress",
        ));
        let s = suggest(&records, &opts(By::Names)).unwrap();
        assert_eq!(s.denied, 1);
        assert!(s
            .yaml
            .contains("cluster.local/microblog/user -> cluster.local/microblog/post TCP 8080"));
        let set = compiled(&s);
        let g = edges(&set, &SERVICES);
        assert!(
            !g.iter()
                .any(|e| e
                    .starts_with("cluster.local/microblog/user -> cluster.local/microblog/post"))
        );
    }

    #[test]
    fn what_to_review_is_said_where_it_is() {
        let mut records = microblog();
        // Seen once, from another namespace, from another trust domain, to outside the mesh,
        // and on many ports.
        records.push(record(
            "ops/backup",
            "microblog/storage",
            "tcp",
            5432,
            "allow",
            "ingress",
        ));
        records.push(record(
            "partner.org/web/client",
            "microblog/api",
            "tcp",
            443,
            "allow",
            "ingress",
        ));
        records.push(record(
            "microblog/post",
            "198.19.0.7",
            "udp",
            53,
            "allow",
            "egress",
        ));
        for port in 9000..9010 {
            for _ in 0..2 {
                records.push(record(
                    "microblog/api",
                    "microblog/search",
                    "tcp",
                    port,
                    "allow",
                    "egress",
                ));
            }
        }
        records.push(record(
            "microblog/api",
            "microblog/post",
            "icmp",
            0,
            "allow",
            "egress",
        ));
        let s = suggest(&records, &opts(By::Names)).unwrap();
        let y = &s.yaml;
        for want in [
            "# review: seen once: TCP 5432",
            "# review: backup is of namespace ops",
            "# review: client is of trust domain partner.org",
            "# review: 198.19.0.7 is outside the mesh and in no external network",
            "# review: 11 ports from one peer: a range, or a scan?",
            "nets: [\"198.19.0.7/32\"]",
            "namespaceSelector: \"mesh.io/trust-domain == 'partner.org' && projectcalico.org/name == 'web'\"",
            "namespaceSelector: \"projectcalico.org/name == 'ops'\"",
            "protocol: ICMP",
        ] {
            assert!(y.contains(want), "missing {want:?} in\n{y}");
        }
        let set = compiled(&s);
        let results = crate::testing::run(&set, &set.tests);
        assert!(results.iter().all(|r| r.passed()), "{results:?}");
        // The remote client and the external address are allowed exactly where seen.
        let decide = |from: &str, to: &str, proto: u8, port: Option<u16>| {
            let f = parse_end(from, None, &set).unwrap();
            let t = parse_end(to, None, &set).unwrap();
            crate::testing::decide(&set, &f, &t, proto, port).allow
        };
        assert!(decide(
            "partner.org/web/client",
            "microblog/api,app=api",
            6,
            Some(443)
        ));
        assert!(!decide(
            "partner.org/web/client",
            "microblog/api,app=api",
            6,
            Some(8080)
        ));
        assert!(!decide(
            "partner.org/web/other",
            "microblog/api,app=api",
            6,
            Some(443)
        ));
        assert!(decide(
            "microblog/post,app=post",
            "198.19.0.7",
            17,
            Some(53)
        ));
        assert!(!decide(
            "microblog/post,app=post",
            "198.19.0.8",
            17,
            Some(53)
        ));
        assert!(decide(
            "microblog/api,app=api",
            "microblog/post,app=post",
            1,
            None
        ));
    }

    #[test]
    fn a_namespace_limits_the_policies_to_its_identities() {
        let mut records = microblog();
        records.push(record(
            "ops/backup",
            "microblog/storage",
            "tcp",
            5432,
            "allow",
            "ingress",
        ));
        let mut o = opts(By::Names);
        o.namespace = Some("ops".into());
        let s = suggest(&records, &o).unwrap();
        assert_eq!(s.policies.len(), 1, "{}", s.yaml);
        assert!(s.yaml.contains("name: \"suggested-backup-egress\""));
        assert!(s.yaml.contains("namespace: \"ops\""));
        assert!(!s.yaml.contains("namespace: \"microblog\""));
    }

    #[test]
    fn records_that_name_nothing_are_counted_not_fatal() {
        let mut records = microblog();
        let mut bad = record(
            "microblog/api",
            "microblog/post",
            "tcp",
            1,
            "allow",
            "egress",
        );
        bad.dst = end("198.19.0.1", None);
        bad.dst.ip = "nonsense".into();
        records.push(bad);
        let mut closed = record(
            "microblog/api",
            "microblog/post",
            "tcp",
            2,
            "allow",
            "egress",
        );
        closed.event = "closed".into();
        records.push(closed);
        let s = suggest(&records, &opts(By::Names)).unwrap();
        assert!(s.yaml.contains("# 1 record(s) skipped"), "{}", s.yaml);
        assert_eq!(s.flows, 6);
    }
}
