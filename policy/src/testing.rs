//! What-if decisions on whole flows (both ends' policies), and `PolicyTest`: cases of expected
//! flows that live in the same YAML files as the policies (`apiVersion: mesh.io/v1`,
//! `kind: PolicyTest`) and are run against the set those files make, offline. Pure, like the rest
//! of the engine: `meshctl policy check`, `policy test` and the gate of `policy apply` all decide
//! here.

use crate::engine::{Direction, End, Endpoint, Flow, PolicySet, Verdict};
use crate::engine::{ICMP, ICMPV6, SCTP, TCP, UDP, UDPLITE};
use crate::model::{PortValue, ProtocolValue};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const API_VERSION: &str = "mesh.io/v1";
pub const KIND: &str = "PolicyTest";

/// The `spec` of a `PolicyTest`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTestSpec {
    pub cases: Vec<TestCase>,
}

/// One expected flow.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TestCase {
    /// What the case is about, for its report; default: FROM -> TO PROTOCOL/PORT.
    #[serde(default)]
    pub name: Option<String>,
    /// `[TD/]NAMESPACE/NAME[,KEY=VALUE...]`, an IP address, or `network:NAME` (an external
    /// network of the set, by its name; its first address is used).
    pub from: String,
    pub to: String,
    /// Default TCP.
    #[serde(default)]
    pub protocol: Option<ProtocolValue>,
    #[serde(default)]
    pub port: Option<PortValue>,
    pub expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Expect {
    Allow,
    Deny,
}

/// One end of a what-if flow.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowEnd {
    Identity(Endpoint),
    External(IpAddr),
}

impl FlowEnd {
    fn end(&self) -> End<'_> {
        match self {
            FlowEnd::Identity(e) => End::Identity(e),
            FlowEnd::External(ip) => End::External(*ip),
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            FlowEnd::Identity(e) => e.ip,
            FlowEnd::External(ip) => Some(*ip),
        }
    }

    /// A SPIFFE ID, or the address with the external networks that contain it.
    pub fn name(&self, set: &PolicySet) -> String {
        match self {
            FlowEnd::Identity(e) => e.spiffe_id(),
            FlowEnd::External(ip) => {
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

/// `[TD/]NS/NAME[,K=V...][,port:NAME=PORT/PROTO...]` (without `TD/`, of `set`'s trust domain;
/// `port:` items are the identity's named ports, as its certificate would list them), an IP
/// address, or
/// `network:NAME` for an external network of `set` (`NAME` as in its metadata, `NS/NAME` for a
/// namespaced one). `ip` is the identity's address, when the caller knows one.
pub fn parse_end(spec: &str, ip: Option<IpAddr>, set: &PolicySet) -> Result<FlowEnd, String> {
    if let Ok(addr) = spec.parse::<IpAddr>() {
        return Ok(FlowEnd::External(addr));
    }
    if let Some(name) = spec.strip_prefix("network:") {
        let net = set
            .networks()
            .iter()
            .find(|n| {
                n.name
                    .split_once(' ')
                    .is_some_and(|(_, short)| short == name)
            })
            .ok_or_else(|| format!("`{spec}`: the set has no external network {name}"))?;
        let first = net
            .nets
            .first()
            .ok_or_else(|| format!("`{spec}`: the network has no address"))?;
        return Ok(FlowEnd::External(first.addr()));
    }
    let mut parts = spec.split(',');
    let id = parts.next().unwrap_or_default();
    let names: Vec<&str> = id.split('/').collect();
    let (trust_domain, namespace, name) = match names[..] {
        [ns, name] => (set.trust_domain.as_str(), ns, name),
        [td, ns, name] => (td, ns, name),
        _ => ("", "", ""),
    };
    if [trust_domain, namespace, name].iter().any(|s| s.is_empty()) {
        return Err(format!(
            "`{id}` is not [TRUST_DOMAIN/]NAMESPACE/NAME, an IP address or network:NAME"
        ));
    }
    let mut labels = BTreeMap::new();
    let mut ports: Vec<proto::cert::NamedPort> = Vec::new();
    for kv in parts {
        if let Some(p) = kv.strip_prefix("port:") {
            let np = p
                .parse()
                .map_err(|e| format!("`{kv}` is not port:NAME=PORT[/PROTO]: {e}"))?;
            ports.push(np);
            continue;
        }
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("`{kv}` is not KEY=VALUE or port:NAME=PORT[/PROTO]"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    ports.sort();
    Ok(FlowEnd::Identity(Endpoint {
        trust_domain: trust_domain.into(),
        namespace: namespace.into(),
        name: name.into(),
        labels,
        ip,
        ports,
    }))
}

/// A protocol by name or number, as policies write it: the one table of names, for the
/// compiler, the what-if tools and the flow log.
pub fn protocol_number(v: &ProtocolValue) -> Result<u8, String> {
    match v {
        ProtocolValue::Number(n) => Ok(*n),
        ProtocolValue::Name(s) => match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(TCP),
            "UDP" => Ok(UDP),
            "ICMP" => Ok(ICMP),
            "ICMPV6" => Ok(ICMPV6),
            "SCTP" => Ok(SCTP),
            "UDPLITE" => Ok(UDPLITE),
            other => other.parse().map_err(|_| {
                format!(
                    "unknown protocol `{s}` (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a number)"
                )
            }),
        },
    }
}

/// A protocol's name as policies write it (`TCP`, `UDP`, ...), or its number.
pub fn protocol_name(n: u8) -> String {
    match n {
        TCP => "TCP".into(),
        UDP => "UDP".into(),
        ICMP => "ICMP".into(),
        ICMPV6 => "ICMPv6".into(),
        SCTP => "SCTP".into(),
        UDPLITE => "UDPLite".into(),
        n => n.to_string(),
    }
}

/// What one direction's policies said: a verdict, or why none of these policies governs it (an
/// end outside the mesh, or of another trust domain, which its own policies govern).
pub type Side = Result<Verdict, String>;

/// The decision on a flow: egress of the source and ingress of the destination.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowAnswer {
    pub allow: bool,
    pub egress: Side,
    pub ingress: Side,
}

impl FlowAnswer {
    /// What decided a flow that is denied (the side that denied), or allowed (the ingress side
    /// when it is governed, else the egress).
    pub fn decided_by(&self) -> String {
        let pick = |s: &Side| s.as_ref().ok().filter(|v| v.allow == self.allow).cloned();
        let v = if self.allow {
            pick(&self.ingress).or_else(|| pick(&self.egress))
        } else {
            pick(&self.egress).or_else(|| pick(&self.ingress))
        };
        match v {
            Some(v) => match v.rule {
                Some(r) => format!("{} {r}", v.by),
                None => v.by,
            },
            None => "not governed by these policies".into(),
        }
    }
}

/// Decides a flow from `src` to `dst` as the two nodes would: the source's egress policies, then
/// the destination's ingress policies; an end these policies do not govern passes its side.
pub fn decide(
    set: &PolicySet,
    src: &FlowEnd,
    dst: &FlowEnd,
    protocol: u8,
    port: Option<u16>,
) -> FlowAnswer {
    let v6 = src.ip().or(dst.ip()).is_some_and(|ip| ip.is_ipv6());
    let flow = Flow {
        protocol,
        src_port: None,
        dst_port: port,
        icmp: None,
        ip_version: if v6 { 6 } else { 4 },
    };
    let governed = |e: &FlowEnd| match e {
        FlowEnd::Identity(e) if e.trust_domain == set.trust_domain => None,
        FlowEnd::Identity(e) => Some(format!(
            "decided by {}'s own policies, not these",
            e.trust_domain
        )),
        FlowEnd::External(_) => Some("outside the mesh: no policy governs it".to_string()),
    };
    let side = |dir, e: &FlowEnd| match governed(e) {
        None => Ok(set.decide_ends(dir, &flow, src.end(), dst.end())),
        Some(why) => Err(why),
    };
    let egress = side(Direction::Egress, src);
    let ingress = side(Direction::Ingress, dst);
    let passes = |s: &Side| s.as_ref().map_or(true, |v| v.allow);
    FlowAnswer {
        allow: passes(&egress) && passes(&ingress),
        egress,
        ingress,
    }
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// The `PolicyTest` object's name and the case's place in it.
    pub test: String,
    pub index: usize,
    pub name: String,
    pub expect: Expect,
    /// The decision, or why the case cannot be decided (a bad end or protocol): a failure too.
    pub answer: Result<FlowAnswer, String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.answer
            .as_ref()
            .is_ok_and(|a| a.allow == (self.expect == Expect::Allow))
    }
}

/// Runs every case of `tests` (object name, spec) against `set`.
pub fn run(set: &PolicySet, tests: &[(String, PolicyTestSpec)]) -> Vec<CaseResult> {
    let mut out = Vec::new();
    for (test, spec) in tests {
        for (index, case) in spec.cases.iter().enumerate() {
            let protocol = case.protocol.as_ref().map_or(Ok(TCP), protocol_number);
            let port = match &case.port {
                None => Ok(None),
                Some(PortValue::Number(n)) => Ok(Some(*n)),
                Some(PortValue::Text(t)) => Err(format!("port `{t}` is not a number")),
            };
            let answer = (|| {
                let src = parse_end(&case.from, None, set).map_err(|e| format!("from: {e}"))?;
                let dst = parse_end(&case.to, None, set).map_err(|e| format!("to: {e}"))?;
                Ok(decide(set, &src, &dst, protocol?, port?))
            })();
            let name = case.name.clone().unwrap_or_else(|| {
                let proto = case
                    .protocol
                    .as_ref()
                    .map_or("TCP".to_string(), |p| match p {
                        ProtocolValue::Number(n) => n.to_string(),
                        ProtocolValue::Name(s) => s.clone(),
                    });
                match &case.port {
                    Some(PortValue::Number(p)) => {
                        format!("{} -> {} {proto}/{p}", case.from, case.to)
                    }
                    _ => format!("{} -> {} {proto}", case.from, case.to),
                }
            });
            out.push(CaseResult {
                test: test.clone(),
                index,
                name,
                expect: case.expect,
                answer,
            });
        }
    }
    out
}

/// A flow whose verdict a change of policy set changes.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowChange {
    /// `TD/NS/NAME` of each end.
    pub from: String,
    pub to: String,
    pub protocol: u8,
    pub port: Option<u16>,
    pub before: FlowAnswer,
    pub after: FlowAnswer,
}

/// `TD/NS/NAME` of an identity end, the address otherwise.
fn end_id(e: &FlowEnd) -> String {
    match e {
        FlowEnd::Identity(e) => format!("{}/{}/{}", e.trust_domain, e.namespace, e.name),
        FlowEnd::External(ip) => ip.to_string(),
    }
}

/// Every flow between two of `ends` (in each direction) on every protocol and port that a rule
/// of either set names, whose verdict differs between `old` and `new`, in order of source,
/// destination, protocol and port. A set against itself gives nothing.
pub fn connectivity_diff(old: &PolicySet, new: &PolicySet, ends: &[FlowEnd]) -> Vec<FlowChange> {
    let mut probes: std::collections::BTreeSet<(u8, Option<u16>)> =
        old.probes().union(&new.probes()).copied().collect();
    // A rule that names a port matches each identity's port of that name: probe them all.
    for e in ends {
        if let FlowEnd::Identity(e) = e {
            probes.extend(e.ports.iter().map(|p| (p.protocol, Some(p.port))));
        }
    }
    let mut out = Vec::new();
    for (i, src) in ends.iter().enumerate() {
        for (j, dst) in ends.iter().enumerate() {
            if i == j {
                continue;
            }
            for &(protocol, port) in &probes {
                let before = decide(old, src, dst, protocol, port);
                let after = decide(new, src, dst, protocol, port);
                if before.allow != after.allow {
                    out.push(FlowChange {
                        from: end_id(src),
                        to: end_id(dst),
                        protocol,
                        port,
                        before,
                        after,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.from, &a.to, a.protocol, a.port).cmp(&(&b.from, &b.to, b.protocol, b.port))
    });
    out
}

/// The microblog example of `examples/microblog`, for the tests of this crate.
#[cfg(test)]
pub(crate) mod microblog {
    use crate::engine::{PolicySet, Posture};

    pub const NAMESPACE: &str = include_str!("../../examples/microblog/namespace.yaml");
    pub const POST: &str = include_str!("../../examples/microblog/post-allow-list.yaml");
    pub const OTHERS: &str = include_str!("../../examples/microblog/allow-lists.yaml");
    pub const TESTS: &str = include_str!("../../examples/microblog/policy-tests.yaml");

    /// The example's set, with `post` for its post-allow-list.
    pub fn set(post: &str) -> PolicySet {
        let text = format!("{NAMESPACE}\n---\n{post}\n---\n{OTHERS}\n---\n{TESTS}");
        let docs = crate::model::parse_documents(&text, "microblog").unwrap();
        PolicySet::compile(&docs, Posture::ZeroTrust)
            .unwrap()
            .in_trust_domain("cluster.local")
    }
}

#[cfg(test)]
mod tests {
    use super::microblog::{set, NAMESPACE, POST};
    use super::*;
    use crate::engine::Posture;

    #[test]
    fn the_microblog_passes_its_own_tests() {
        let s = set(POST);
        let results = run(&s, &s.tests);
        assert_eq!(results.len(), 11);
        for r in &results {
            assert!(r.passed(), "{r:?}");
        }
    }

    #[test]
    fn removing_search_from_post_allow_list_fails_exactly_its_case_and_names_what_decided() {
        let s = set(&POST.replace(r#"["api", "search"]"#, r#"["api"]"#));
        let failed: Vec<CaseResult> = run(&s, &s.tests)
            .into_iter()
            .filter(|r| !r.passed())
            .collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].name, "search reaches post");
        assert_eq!(failed[0].test, "PolicyTest microblog-flows");
        let answer = failed[0].answer.as_ref().unwrap();
        assert!(!answer.allow);
        assert_eq!(answer.decided_by(), "end-of-policies");
    }

    fn microblog_ends(s: &PolicySet) -> Vec<FlowEnd> {
        ["api", "post", "search", "user", "storage"]
            .iter()
            .map(|n| parse_end(&format!("microblog/{n},app={n}"), None, s).unwrap())
            .collect()
    }

    #[test]
    fn the_connectivity_diff_of_removing_search_is_exactly_search_to_post_8080() {
        let old = set(POST);
        let new = set(&POST.replace(r#"["api", "search"]"#, r#"["api"]"#));
        let ends = microblog_ends(&old);
        assert!(connectivity_diff(&old, &old, &ends).is_empty());
        let changes = connectivity_diff(&old, &new, &ends);
        assert_eq!(changes.len(), 1, "{changes:#?}");
        let c = &changes[0];
        assert_eq!(
            (c.from.as_str(), c.to.as_str(), c.protocol, c.port),
            (
                "cluster.local/microblog/search",
                "cluster.local/microblog/post",
                TCP,
                Some(8080)
            )
        );
        assert!(c.before.allow && !c.after.allow);
        assert_eq!(c.after.decided_by(), "end-of-policies");
        assert_eq!(
            c.before.decided_by(),
            "NetworkPolicy microblog/post-allow-list ingress[0]"
        );
    }

    proptest::proptest! {
        /// Every change the diff lists is what deciding the flow under each set says, and a set
        /// against itself lists nothing, whichever allow-list a service loses.
        #[test]
        fn the_diff_agrees_with_deciding_each_pair(drop_api in proptest::bool::ANY, port in 8000u16..8100) {
            let old = set(POST);
            let names = if drop_api { r#"["search"]"# } else { r#"["api"]"# };
            let new = set(&POST.replace(r#"["api", "search"]"#, names).replace("- 8080", &format!("- {port}")));
            let ends = microblog_ends(&old);
            proptest::prop_assert!(connectivity_diff(&new, &new, &ends).is_empty());
            for c in connectivity_diff(&old, &new, &ends) {
                let find = |id: &str| ends.iter().find(|e| end_id(e) == id).unwrap().clone();
                let (src, dst) = (find(&c.from), find(&c.to));
                proptest::prop_assert_eq!(decide(&old, &src, &dst, c.protocol, c.port).allow, c.before.allow);
                proptest::prop_assert_eq!(decide(&new, &src, &dst, c.protocol, c.port).allow, c.after.allow);
                proptest::prop_assert_ne!(c.before.allow, c.after.allow);
            }
        }
    }

    #[test]
    fn a_case_that_cannot_be_decided_fails_and_says_why() {
        let mut s = set(POST);
        s.tests = vec![(
            "PolicyTest t".into(),
            PolicyTestSpec {
                cases: vec![TestCase {
                    name: None,
                    from: "api".into(),
                    to: "network:nowhere".into(),
                    protocol: Some(ProtocolValue::Name("TCP".into())),
                    port: Some(PortValue::Number(80)),
                    expect: Expect::Deny,
                }],
            },
        )];
        let r = &run(&s, &s.tests)[0];
        assert!(!r.passed());
        assert_eq!(r.name, "api -> network:nowhere TCP/80");
        let e = r.answer.as_ref().unwrap_err();
        assert!(e.starts_with("from: `api` is not"), "{e}");
    }

    #[test]
    fn ends_parse_as_identities_addresses_and_networks() {
        let text = format!(
            "{NAMESPACE}\n---\napiVersion: mesh.io/v1\nkind: GlobalExternalNetwork\nmetadata: {{name: partners, labels: {{role: partner}}}}\nspec:\n  nets: [198.19.1.0/24]\n"
        );
        let docs = crate::model::parse_documents(&text, "n").unwrap();
        let s = PolicySet::compile(&docs, Posture::ZeroTrust)
            .unwrap()
            .in_trust_domain("example.org");
        assert_eq!(
            parse_end("network:partners", None, &s),
            Ok(FlowEnd::External("198.19.1.0".parse().unwrap()))
        );
        assert_eq!(
            parse_end("198.19.1.7", None, &s),
            Ok(FlowEnd::External("198.19.1.7".parse().unwrap()))
        );
        match parse_end("microblog/api,app=api", None, &s).unwrap() {
            FlowEnd::Identity(e) => {
                assert_eq!(e.trust_domain, "example.org");
                assert_eq!(e.labels.get("app").map(String::as_str), Some("api"));
            }
            other => panic!("{other:?}"),
        }
        match parse_end("other.org/ns/x", None, &s).unwrap() {
            FlowEnd::Identity(e) => assert_eq!(e.trust_domain, "other.org"),
            other => panic!("{other:?}"),
        }
        assert!(parse_end("a/b/c/d", None, &s).is_err());
        assert!(parse_end("ns/x,novalue", None, &s).is_err());
    }

    #[test]
    fn a_policy_test_in_a_file_is_read_with_every_error_placed() {
        let bad = "apiVersion: mesh.io/v1\nkind: PolicyTest\nmetadata: {name: t}\nspec:\n  cases:\n  - from: a/b\n    to: a/c\n    port: 80800\n    expect: Maybe\n";
        let (_, errors) = crate::model::parse_located(bad, "t.yaml");
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|e| e.starts_with("t.yaml:8:") && e.contains("port 80800 is out of range")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|e| e.contains("unknown variant `Maybe`")),
            "{text:?}"
        );
    }
}
