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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
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
                });
            }
        }
    }
    Graph {
        nodes: ends.into_iter().map(|(n, _)| n).collect(),
        edges,
    }
}

impl Graph {
    /// The same graph with nodes that share the value of label `key` merged into one (named
    /// `key=value`; nodes without the label stay as they are), and their edges merged.
    pub fn grouped_by(&self, key: &str) -> Graph {
        let mut nodes: Vec<Node> = Vec::new();
        let mut index = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let (id, labels) = match n.labels.get(key) {
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
            });
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
            out.push_str(&format!(
                "  {} -> {} [label={}];\n",
                q(&self.nodes[e.from].id),
                q(&self.nodes[e.to].id),
                q(&e.flows.join(", "))
            ));
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Posture;

    const NAMESPACE: &str = include_str!("../../examples/microblog/namespace.yaml");
    const POST: &str = include_str!("../../examples/microblog/post-allow-list.yaml");
    const OTHERS: &str = include_str!("../../examples/microblog/allow-lists.yaml");
    const TESTS: &str = include_str!("../../examples/microblog/policy-tests.yaml");

    fn microblog() -> PolicySet {
        let text = format!("{NAMESPACE}\n---\n{POST}\n---\n{OTHERS}\n---\n{TESTS}");
        let docs = crate::model::parse_documents(&text, "microblog").unwrap();
        PolicySet::compile(&docs, Posture::ZeroTrust)
            .unwrap()
            .in_trust_domain("cluster.local")
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
        let text = format!(
            "{NAMESPACE}\n---\n{}\n---\n{OTHERS}\n---\n{TESTS}",
            POST.replace(r#"["api", "search"]"#, r#"["api"]"#)
        );
        let docs = crate::model::parse_documents(&text, "microblog").unwrap();
        let less = PolicySet::compile(&docs, Posture::ZeroTrust)
            .unwrap()
            .in_trust_domain("cluster.local");
        let mut without = expected.clone();
        without.remove(&("search".into(), "post".into(), "TCP 8080".into()));
        assert_eq!(edges(&graph(&less, &ids)), without);
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
}
