//! The flow graph a policy set allows, as Calico's zero-trust guide draws it: "each identity is a
//! node, and each expected flow is an edge". Nodes are the identities given (a live mesh's
//! members, a file, or the identities the set's `PolicyTest` cases name) and the external
//! networks of the set; an edge from A to B carries every protocol and port on which a flow from
//! A to B is allowed by both ends' policies ([`crate::testing::decide`]), probed on each port a
//! rule names and each named port of B. Pure: `meshctl policy graph` prints it.

use crate::engine::PolicySet;
use crate::testing::{decide, parse_end, protocol_name, FlowEnd};
use std::collections::{BTreeMap, BTreeSet};

/// What a node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Identity,
    /// An external network of the set (its first address stands for it).
    Network,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// `TD/NS/NAME`, or the network's object name.
    pub id: String,
    pub kind: NodeKind,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The flows allowed from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Edge {
    /// Indices into [`Graph::nodes`].
    pub from: usize,
    pub to: usize,
    /// `TCP 8080`, `UDP 53`, `ICMP`: each allowed (protocol, port), in order.
    pub flows: Vec<String>,
    /// The policies that allowed them, on each side (`egress`, `ingress`), without repeats.
    pub by: Vec<String>,
    /// Flows observed in flow logs ([`Graph::overlay`]), by flow (`TCP 8080`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub seen: BTreeMap<String, Seen>,
}

/// What the flow logs say of one flow of an edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    /// New flows allowed (and not flagged below).
    pub allowed: u64,
    /// New flows denied.
    pub denied: u64,
    /// New flows that passed but audit mode or the staged policies would deny.
    pub would_deny: u64,
}

impl Edge {
    /// The allowed flows, then any seen flow that is not among them.
    pub fn label(&self) -> String {
        let mut all = self.flows.clone();
        all.extend(
            self.seen
                .keys()
                .filter(|f| !self.flows.contains(f))
                .cloned(),
        );
        all.join(", ")
    }
}

/// How an edge is drawn once flows are overlaid: the worst of what was seen on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeState {
    /// Allowed, and used.
    Used,
    /// Allowed by the policies, never seen: a candidate to tighten.
    Unused,
    /// Seen passing, but audit mode or the staged policies would deny it.
    WouldDeny,
    /// Denied attempts.
    Denied,
}

impl Edge {
    /// The edge's state given what was seen; `None` before any overlay.
    pub fn state(&self, overlaid: bool) -> Option<EdgeState> {
        if !overlaid {
            return None;
        }
        let sum = |f: fn(&Seen) -> u64| self.seen.values().map(f).sum::<u64>();
        Some(if sum(|s| s.denied) > 0 {
            EdgeState::Denied
        } else if sum(|s| s.would_deny) > 0 {
            EdgeState::WouldDeny
        } else if sum(|s| s.allowed) > 0 {
            EdgeState::Used
        } else {
            EdgeState::Unused
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Flow logs were overlaid: every edge has a state ([`Edge::state`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overlaid: bool,
    /// Records whose ends are not nodes of the graph.
    #[serde(skip_serializing_if = "is_zero")]
    pub unplaced: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The identities the set's `PolicyTest` cases name (with the labels and named ports the cases
/// give them; the first spelling of an identity wins), in order of first mention: the nodes of a
/// graph drawn from the policy files alone.
pub fn identities_of_tests(set: &PolicySet) -> Vec<FlowEnd> {
    let mut out: Vec<FlowEnd> = Vec::new();
    let mut seen = BTreeSet::new();
    for (_, spec) in &set.tests {
        for case in &spec.cases {
            for spec in [&case.from, &case.to] {
                if let Ok(FlowEnd::Identity(e)) = parse_end(spec, None, set) {
                    let id = format!("{}/{}/{}", e.trust_domain, e.namespace, e.name);
                    if seen.insert(id) {
                        out.push(FlowEnd::Identity(e));
                    }
                }
            }
        }
    }
    out
}

/// The graph of what `set` allows between `identities` and the set's external networks.
pub fn graph(set: &PolicySet, identities: &[FlowEnd]) -> Graph {
    let mut ends: Vec<(Node, FlowEnd)> = Vec::new();
    for e in identities {
        if let FlowEnd::Identity(id) = e {
            ends.push((
                Node {
                    id: format!("{}/{}/{}", id.trust_domain, id.namespace, id.name),
                    kind: NodeKind::Identity,
                    labels: id.labels.clone(),
                },
                e.clone(),
            ));
        }
    }
    for n in set.networks() {
        if let Some(first) = n.nets.first() {
            ends.push((
                Node {
                    id: n.name.clone(),
                    kind: NodeKind::Network,
                    labels: n.labels.clone(),
                },
                FlowEnd::External(first.addr()),
            ));
        }
    }
    let probes = set.probes();
    let mut edges = Vec::new();
    for (i, (_, src)) in ends.iter().enumerate() {
        for (j, (_, dst)) in ends.iter().enumerate() {
            if i == j {
                continue;
            }
            let mut tried: BTreeSet<(u8, Option<u16>)> = probes.clone();
            if let FlowEnd::Identity(d) = dst {
                tried.extend(d.ports.iter().map(|p| (p.protocol, Some(p.port))));
            }
            let (mut flows, mut by) = (Vec::new(), Vec::new());
            for (protocol, port) in tried {
                let answer = decide(set, src, dst, protocol, port);
                if !answer.allow {
                    continue;
                }
                flows.push(match port {
                    Some(p) => format!("{} {p}", protocol_name(protocol)),
                    None => protocol_name(protocol),
                });
                for v in [&answer.egress, &answer.ingress].into_iter().flatten() {
                    if !by.contains(&v.by) {
                        by.push(v.by.clone());
                    }
                }
            }
            if !flows.is_empty() {
                edges.push(Edge {
                    from: i,
                    to: j,
                    flows,
                    by,
                    seen: BTreeMap::new(),
                });
            }
        }
    }
    Graph {
        nodes: ends.into_iter().map(|(n, _)| n).collect(),
        edges,
        ..Graph::default()
    }
}

impl Graph {
    /// Overlays flow-log records (`meshctl flows -o json`, or a node's `flows.jsonl`): each new
    /// flow between two nodes counts on its edge as allowed, denied, or would-deny (audited, or
    /// denied by the staged policies); a denied flow where no edge is allowed adds one. An end is
    /// a node by its identity, or by the first external network it is in.
    pub fn overlay(&mut self, records: &[proto::admin::FlowRecord]) {
        self.overlaid = true;
        let node = |g: &Graph, e: &proto::admin::FlowEnd| -> Option<usize> {
            match (&e.trust_domain, &e.namespace, &e.name) {
                (Some(td), Some(ns), Some(n)) => {
                    let id = format!("{td}/{ns}/{n}");
                    g.nodes.iter().position(|x| x.id == id)
                }
                _ => e
                    .networks
                    .iter()
                    .find_map(|net| g.nodes.iter().position(|x| x.id == *net)),
            }
        };
        for r in records.iter().filter(|r| r.event == "new") {
            let (Some(from), Some(to)) = (node(self, &r.src), node(self, &r.dst)) else {
                self.unplaced += 1;
                continue;
            };
            let flow = match r.dst.port {
                Some(p) => format!("{} {p}", r.protocol.to_ascii_uppercase()),
                None => r.protocol.to_ascii_uppercase(),
            };
            let at = match self.edges.iter().position(|e| e.from == from && e.to == to) {
                Some(at) => at,
                None => {
                    self.edges.push(Edge {
                        from,
                        to,
                        flows: Vec::new(),
                        by: Vec::new(),
                        seen: BTreeMap::new(),
                    });
                    self.edges.len() - 1
                }
            };
            let seen = self.edges[at].seen.entry(flow).or_default();
            let staged_deny = r.staged.as_ref().is_some_and(|s| s.verdict == "deny");
            match r.verdict.as_str() {
                "deny" => seen.denied += 1,
                "audit" => seen.would_deny += 1,
                _ if staged_deny => seen.would_deny += 1,
                _ => seen.allowed += 1,
            }
        }
    }

    /// The same graph with nodes that share the value of label `key` merged into one (named
    /// `key=value`; nodes without the label stay as they are), and their edges merged.
    pub fn grouped_by(&self, key: &str) -> Graph {
        let mut nodes: Vec<Node> = Vec::new();
        let mut index = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            // An identity's trust domain is a label of it (`mesh.io/trust-domain`), as selectors
            // see it: grouping by it makes each remote trust domain one node.
            let implicit = (key == proto::trust::TRUST_DOMAIN_LABEL
                && n.kind == NodeKind::Identity)
                .then(|| n.id.split('/').next().unwrap_or_default().to_string());
            let (id, labels) = match implicit.as_ref().or(n.labels.get(key)) {
                Some(v) => (
                    format!("{key}={v}"),
                    BTreeMap::from([(key.to_string(), v.clone())]),
                ),
                None => (n.id.clone(), n.labels.clone()),
            };
            let at = match nodes.iter().position(|m| m.id == id) {
                Some(at) => at,
                None => {
                    nodes.push(Node {
                        id,
                        kind: n.kind,
                        labels,
                    });
                    nodes.len() - 1
                }
            };
            index.push(at);
        }
        let mut merged: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
        for e in &self.edges {
            let (from, to) = (index[e.from], index[e.to]);
            let m = merged.entry((from, to)).or_insert_with(|| Edge {
                from,
                to,
                flows: Vec::new(),
                by: Vec::new(),
                seen: BTreeMap::new(),
            });
            for (f, s) in &e.seen {
                let t = m.seen.entry(f.clone()).or_default();
                t.allowed += s.allowed;
                t.denied += s.denied;
                t.would_deny += s.would_deny;
            }
            for f in &e.flows {
                if !m.flows.contains(f) {
                    m.flows.push(f.clone());
                }
            }
            for b in &e.by {
                if !m.by.contains(b) {
                    m.by.push(b.clone());
                }
            }
        }
        Graph {
            nodes,
            edges: merged.into_values().collect(),
            overlaid: self.overlaid,
            unplaced: self.unplaced,
        }
    }

    /// Graphviz DOT: identities as boxes, networks as ellipses, each edge labelled with its flows.
    pub fn to_dot(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out =
            String::from("digraph flows {\n  rankdir=LR;\n  node [fontname=\"sans-serif\"];\n");
        for n in &self.nodes {
            let shape = match n.kind {
                NodeKind::Identity => "box",
                NodeKind::Network => "ellipse",
            };
            out.push_str(&format!("  {} [shape={shape}];\n", q(&n.id)));
        }
        for e in &self.edges {
            let style = match e.state(self.overlaid) {
                None | Some(EdgeState::Used) => "",
                Some(EdgeState::Unused) => ", style=dashed, color=gray50",
                Some(EdgeState::WouldDeny) => ", color=darkorange",
                Some(EdgeState::Denied) => ", style=dashed, color=red",
            };
            out.push_str(&format!(
                "  {} -> {} [label={}{style}];\n",
                q(&self.nodes[e.from].id),
                q(&self.nodes[e.to].id),
                q(&e.label())
            ));
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::microblog::{self, POST};

    fn microblog() -> PolicySet {
        microblog::set(POST)
    }

    fn edges(g: &Graph) -> BTreeSet<(String, String, String)> {
        let short = |i: usize| g.nodes[i].id.rsplit('/').next().unwrap().to_string();
        g.edges
            .iter()
            .map(|e| (short(e.from), short(e.to), e.flows.join(",")))
            .collect()
    }

    /// From the policy files alone, the graph is exactly the guide's microblog flow graph.
    #[test]
    fn the_microblog_graph_is_the_guides_flow_graph() {
        let set = microblog();
        let ids = identities_of_tests(&set);
        assert_eq!(ids.len(), 5);
        let g = graph(&set, &ids);
        let expected: BTreeSet<(String, String, String)> = [
            ("api", "post", "TCP 8080"),
            ("api", "search", "TCP 8080"),
            ("api", "user", "TCP 8080"),
            ("search", "post", "TCP 8080"),
            ("post", "storage", "TCP 5432"),
            ("user", "storage", "TCP 5432"),
        ]
        .iter()
        .map(|(a, b, f)| (a.to_string(), b.to_string(), f.to_string()))
        .collect();
        assert_eq!(edges(&g), expected);
        let post = g
            .edges
            .iter()
            .find(|e| g.nodes[e.to].id.ends_with("/post") && g.nodes[e.from].id.ends_with("/api"))
            .unwrap();
        assert_eq!(
            post.by,
            [
                "NetworkPolicy microblog/api-egress",
                "NetworkPolicy microblog/post-allow-list"
            ]
        );
        // Removing search from post's allow-list removes exactly that edge.
        let less = microblog::set(&POST.replace(r#"["api", "search"]"#, r#"["api"]"#));
        let mut without = expected.clone();
        without.remove(&("search".into(), "post".into(), "TCP 8080".into()));
        assert_eq!(edges(&graph(&less, &ids)), without);
    }

    fn record(
        from: &str,
        to: &str,
        port: u16,
        verdict: &str,
        staged: Option<&str>,
    ) -> proto::admin::FlowRecord {
        let end = |name: &str, port| proto::admin::FlowEnd {
            ip: "100.64.3.1".into(),
            port,
            trust_domain: Some("cluster.local".into()),
            namespace: Some("microblog".into()),
            name: Some(name.into()),
            spiffe_id: None,
            networks: vec![],
            labels: BTreeMap::new(),
        };
        proto::admin::FlowRecord {
            seq: 1,
            time: String::new(),
            event: "new".into(),
            direction: "ingress".into(),
            verdict: verdict.into(),
            protocol: "tcp".into(),
            src: end(from, Some(40000)),
            dst: end(to, Some(port)),
            policy: String::new(),
            rule: None,
            log_rule: false,
            packets: None,
            bytes: None,
            staged: staged.map(|v| proto::admin::StagedVerdict {
                verdict: v.into(),
                policy: String::new(),
                rule: None,
            }),
            node: None,
        }
    }

    /// Observed flows overlaid: used edges, allowed edges never used, denied attempts (a new
    /// edge), and flows that audit mode or staged policies would deny.
    #[test]
    fn observed_flows_mark_used_unused_denied_and_would_deny_edges() {
        let set = microblog();
        let mut g = graph(&set, &identities_of_tests(&set));
        assert_eq!(g.edges[0].state(g.overlaid), None);
        let mut closed = record("api", "post", 8080, "allow", None);
        closed.event = "closed".into();
        let mut stranger = record("api", "post", 8080, "allow", None);
        stranger.src.name = Some("nobody".into());
        g.overlay(&[
            record("api", "post", 8080, "allow", None),
            record("api", "post", 8080, "allow", None),
            closed,
            record("search", "user", 8080, "deny", None),
            record("user", "storage", 5432, "audit", None),
            record("post", "storage", 5432, "allow", Some("deny")),
            stranger,
        ]);
        let edge = |a: &str, b: &str| {
            g.edges
                .iter()
                .find(|e| g.nodes[e.from].id.ends_with(a) && g.nodes[e.to].id.ends_with(b))
                .unwrap_or_else(|| panic!("{a} -> {b}"))
        };
        let state = |a, b| edge(a, b).state(g.overlaid).unwrap();
        assert_eq!(state("/api", "/post"), EdgeState::Used);
        assert_eq!(
            edge("/api", "/post").seen["TCP 8080"].allowed,
            2,
            "new flows only"
        );
        assert_eq!(state("/api", "/search"), EdgeState::Unused);
        assert_eq!(state("/search", "/user"), EdgeState::Denied);
        assert!(
            edge("/search", "/user").flows.is_empty(),
            "no flow is allowed there"
        );
        assert_eq!(edge("/search", "/user").label(), "TCP 8080");
        assert_eq!(state("/user", "/storage"), EdgeState::WouldDeny);
        assert_eq!(state("/post", "/storage"), EdgeState::WouldDeny);
        assert_eq!(g.unplaced, 1);
        assert_eq!(g.edges.len(), 7);
        let dot = g.to_dot();
        assert!(
            dot.contains("[label=\"TCP 8080\", style=dashed, color=red]"),
            "{dot}"
        );
        assert!(dot.contains("style=dashed, color=gray50"), "{dot}");
    }

    #[test]
    fn grouping_merges_nodes_and_edges_and_dot_quotes_names() {
        let set = microblog();
        let mut ids = identities_of_tests(&set);
        // A second replica of api under another service account: same label, no flows of its
        // own (post admits the service account api, not api2).
        ids.push(parse_end("microblog/api2,app=api", None, &set).unwrap());
        let g = graph(&set, &ids);
        assert_eq!(g.nodes.len(), 6);
        let grouped = g.grouped_by("app");
        assert_eq!(grouped.nodes.len(), 5);
        assert_eq!(grouped.nodes[0].id, "app=api");
        let short: BTreeSet<(String, String)> = grouped
            .edges
            .iter()
            .map(|e| {
                (
                    grouped.nodes[e.from].id.clone(),
                    grouped.nodes[e.to].id.clone(),
                )
            })
            .collect();
        assert!(
            short.contains(&("app=api".into(), "app=post".into())),
            "{short:?}"
        );
        assert_eq!(short.len(), 6);
        let one = g.grouped_by("missing");
        assert_eq!(one, g, "no node has the label: nothing changes");
        let dot = g.to_dot();
        assert!(dot.starts_with("digraph flows {"), "{dot}");
        assert!(
            dot.contains("\"cluster.local/microblog/api\" -> \"cluster.local/microblog/post\" [label=\"TCP 8080\"];"),
            "{dot}"
        );
        let mut odd = g.clone();
        odd.nodes[0].id = "a\"b".into();
        assert!(odd.to_dot().contains("\"a\\\"b\""));
    }

    /// Grouped by `mesh.io/trust-domain`, each trust domain is one node: a remote cluster's
    /// identities become that cluster.
    #[test]
    fn grouping_by_trust_domain_makes_each_remote_cluster_one_node() {
        let set = microblog();
        let mut ids = identities_of_tests(&set);
        ids.push(parse_end("partner.org/web/client,app=client", None, &set).unwrap());
        ids.push(parse_end("partner.org/web/batch,app=batch", None, &set).unwrap());
        let g = graph(&set, &ids).grouped_by(proto::trust::TRUST_DOMAIN_LABEL);
        let names: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            names,
            [
                "mesh.io/trust-domain=cluster.local",
                "mesh.io/trust-domain=partner.org"
            ]
        );
    }
}
