//! `meshctl policy graph -o svg`: the flow graph drawn without any external program. The layout
//! is `layout-rs` (a pure-Rust layered layout in the manner of Graphviz's `dot`: ranks, crossing
//! reduction, edges routed around nodes), chosen so that nothing needs installing.

use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::color::Color;
use layout::core::style::{LineStyleKind, StyleAttr};
use layout::std_shapes::render::get_shape_size;
use layout::std_shapes::shapes::{Arrow, Element, ShapeKind};
use layout::topo::layout::VisualGraph;
use policy::graph::{EdgeState, Graph, NodeKind};

const FONT: usize = 14;

/// The graph as an SVG document: identities as boxes, external networks as circles, each edge
/// labelled with the flows it allows.
pub fn to_svg(g: &Graph) -> String {
    let dir = Orientation::LeftToRight;
    let mut vg = VisualGraph::new(dir);
    // With one trust domain, an identity's NAMESPACE/NAME tells it apart.
    let domains: std::collections::BTreeSet<&str> = g
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::Identity)
        .filter_map(|n| n.id.split_once('/').map(|(td, _)| td))
        .collect();
    let label = |n: &policy::graph::Node| match n.kind {
        NodeKind::Identity if domains.len() == 1 => {
            n.id.split_once('/')
                .map_or(n.id.clone(), |(_, rest)| rest.to_string())
        }
        NodeKind::Identity => n.id.clone(),
        NodeKind::Network => short(&n.id),
    };
    let handles: Vec<_> = g
        .nodes
        .iter()
        .map(|n| {
            let (shape, fill) = match n.kind {
                NodeKind::Identity => (ShapeKind::new_box(&label(n)), "white"),
                NodeKind::Network => (ShapeKind::new_circle(&label(n)), "lightblue"),
            };
            let look = StyleAttr::new(Color::fast("black"), 2, Some(Color::fast(fill)), 4, FONT);
            let size = get_shape_size(dir, &shape, FONT, false);
            vg.add_node(Element::create(shape, look, dir, size))
        })
        .collect();
    for e in &g.edges {
        let mut arrow = Arrow::simple(&e.label());
        let (color, line) = match e.state(g.overlaid) {
            None | Some(EdgeState::Used) => ("black", LineStyleKind::Normal),
            Some(EdgeState::Unused) => ("gray", LineStyleKind::Dotted),
            Some(EdgeState::WouldDeny) => ("darkorange", LineStyleKind::Normal),
            Some(EdgeState::Denied) => ("red", LineStyleKind::Dashed),
        };
        arrow.look = StyleAttr::new(Color::fast(color), 2, None, 0, FONT - 2);
        arrow.line_style = line;
        vg.add_edge(arrow, handles[e.from], handles[e.to]);
    }
    if g.overlaid {
        // The legend: one box per kind of edge, in the colour edges of that kind have.
        for (text, color) in [
            ("used and allowed", "black"),
            ("allowed, never used", "gray"),
            ("would be denied (audit, staged)", "darkorange"),
            ("denied attempts", "red"),
        ] {
            let shape = ShapeKind::new_box(text);
            let look = StyleAttr::new(
                Color::fast(color),
                2,
                Some(Color::fast("white")),
                0,
                FONT - 2,
            );
            let size = get_shape_size(dir, &shape, FONT - 2, false);
            vg.add_node(Element::create(shape, look, dir, size));
        }
    }
    let mut svg = SVGWriter::new();
    vg.do_it(false, false, false, &mut svg);
    labels_on_top(&stable_styles(&svg.finalize()))
}

/// The writer draws edge labels (every text but the nodes' own, in their font size) before the
/// edges, so lines cross them: moved to the end of the document, with their halo they are drawn
/// last and stay readable.
fn labels_on_top(svg: &str) -> String {
    let mut body = String::with_capacity(svg.len());
    let mut labels = String::new();
    let mut rest = svg;
    while let Some(at) = rest.find("<text") {
        let Some(len) = rest[at..].find("</text>").map(|e| e + "</text>".len()) else {
            break;
        };
        let text = &rest[at..at + len];
        body.push_str(&rest[..at]);
        let node_label = text.contains(&format!("class=\"a{FONT}\""));
        if !node_label && !text.contains("<textPath") {
            labels.push_str(text);
            labels.push('\n');
        } else {
            body.push_str(text);
        }
        rest = &rest[at + len..];
    }
    body.push_str(rest);
    match body.rfind("</svg>") {
        Some(end) => {
            body.insert_str(end, &labels);
            body
        }
        None => svg.to_string(),
    }
}

/// Labels get a white halo, so that a line crossing one leaves it readable (inside a node's
/// white box it changes nothing).
const LABEL_HALO: &str =
    "text { paint-order: stroke; stroke: white; stroke-width: 4px; stroke-linejoin: round; }";

/// The writer lists its font classes in hash order: sorted, the same graph is the same file;
/// and the edge labels get their halo.
fn stable_styles(svg: &str) -> String {
    let (Some(a), Some(b)) = (svg.find("<style>\n"), svg.find("</style>")) else {
        return svg.to_string();
    };
    let start = a + "<style>\n".len();
    if start > b {
        return svg.to_string();
    }
    let mut lines: Vec<&str> = svg[start..b].lines().collect();
    lines.push(LABEL_HALO);
    lines.sort_unstable();
    let mut out = String::with_capacity(svg.len());
    out.push_str(&svg[..start]);
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&svg[b..]);
    out
}

/// A network's object name without its kind.
fn short(id: &str) -> String {
    match id.split_once(' ') {
        Some((_, name)) => name.to_string(),
        None => id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's picture of the microblog graph is what `policy graph -o svg` draws today.
    #[test]
    fn the_readme_picture_is_the_current_rendering() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/microblog");
        let set = crate::policy::load(&[root.into()], policy::engine::Posture::ZeroTrust)
            .unwrap_or_else(|e| panic!("{}", e.error))
            .in_trust_domain("cluster.local");
        let g = policy::graph::graph(&set, &policy::graph::identities_of_tests(&set));
        let svg = to_svg(&g);
        for name in [
            "microblog/api",
            "microblog/post",
            "microblog/storage",
            "TCP 5432",
        ] {
            assert!(svg.contains(name), "{name}");
        }
        assert!(
            !svg.contains("cluster.local/"),
            "one trust domain: names without it"
        );
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/microblog-graph.svg");
        let saved = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            saved == svg,
            "docs/microblog-graph.svg is stale: meshctl policy graph -f examples/microblog -o svg > docs/microblog-graph.svg"
        );
    }

    /// A number attribute `name="..."` of an SVG element.
    fn attr(el: &str, name: &str) -> Option<f64> {
        let at = el.find(&format!(" {name}=\""))? + name.len() + 3;
        el[at..].split('"').next()?.trim().parse().ok()
    }

    /// (x0, y0, x1, y1).
    type Box4 = (f64, f64, f64, f64);

    /// Boxes of the edge labels (with their text) and of the nodes of a drawing.
    fn boxes(svg: &str) -> (Vec<(Box4, String)>, Vec<Box4>) {
        let mut labels = Vec::new();
        for el in svg.split("<text").skip(1) {
            let el = el.split("</text>").next().unwrap_or_default();
            if el.contains("<textPath") || el.contains(&format!("class=\"a{FONT}\"")) {
                continue;
            }
            let (Some(x), Some(y)) = (attr(el, "x"), attr(el, "y")) else {
                continue;
            };
            let size: f64 = el
                .split("class=\"a")
                .nth(1)
                .and_then(|c| c.split('"').next())
                .and_then(|c| c.parse().ok())
                .unwrap_or(12.0);
            let inner = el.split("</tspan").next().unwrap_or_default();
            let text = inner.rsplit('>').next().unwrap_or_default().to_string();
            assert!(!text.is_empty(), "a label without text: {el}");
            // Times at this size: about half the size per character; the text stands one em
            // below y, centred on it.
            let w = text.chars().count() as f64 * size * 0.5;
            let b = (x - w / 2.0, y + size * 0.5, x + w / 2.0, y + size * 1.5);
            labels.push((b, text));
        }
        let nodes = svg
            .split("<rect")
            .skip(1)
            .filter_map(|el| {
                let (x, y) = (attr(el, "x")?, attr(el, "y")?);
                Some((x, y, x + attr(el, "width")?, y + attr(el, "height")?))
            })
            .collect();
        (labels, nodes)
    }

    /// Fifty identities, each letting two others in on a port: the drawing puts no label on
    /// another label or on a node.
    #[test]
    fn fifty_identities_draw_without_overlapping_labels() {
        let mut yaml = String::new();
        let mut ids = Vec::new();
        let mut seed: u64 = 7;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for i in 0..50u64 {
            ids.push(format!("shop/svc{i},app=svc{i}"));
            let callers: std::collections::BTreeSet<u64> = [next(50), next(50)]
                .into_iter()
                .filter(|c| *c != i)
                .collect();
            if callers.is_empty() {
                continue;
            }
            let names: Vec<String> = callers.iter().map(|c| format!("svc{c}")).collect();
            yaml.push_str(&format!(
                "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: svc{i}, namespace: shop}}\nspec:\n  selector: app == 'svc{i}'\n  ingress:\n  - action: Allow\n    protocol: TCP\n    source: {{serviceAccounts: {{names: [{}]}}}}\n    destination: {{ports: [{}]}}\n",
                names.join(", "),
                8000 + i % 7
            ));
        }
        yaml.push_str("---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: egress-all}\nspec:\n  selector: all()\n  types: [Egress]\n  egress: [{action: Allow}]\n");
        let docs = policy::model::parse_documents(&yaml, "fifty").unwrap();
        let set = policy::engine::PolicySet::compile(&docs, policy::engine::Posture::ZeroTrust)
            .unwrap()
            .in_trust_domain("cluster.local");
        let ends: Vec<_> = ids
            .iter()
            .map(|s| policy::testing::parse_end(s, None, &set).unwrap())
            .collect();
        let g = policy::graph::graph(&set, &ends);
        assert_eq!(g.nodes.len(), 50);
        assert!(g.edges.len() >= 80, "{} edges", g.edges.len());
        let svg = to_svg(&g);
        let (labels, nodes) = boxes(&svg);
        assert_eq!(labels.len(), g.edges.len(), "one label per edge");
        let overlap = |a: (f64, f64, f64, f64), b: (f64, f64, f64, f64)| {
            a.0 < b.2 - 1.0 && b.0 < a.2 - 1.0 && a.1 < b.3 - 1.0 && b.1 < a.3 - 1.0
        };
        for (i, a) in labels.iter().enumerate() {
            for b in &labels[i + 1..] {
                assert!(!overlap(a.0, b.0), "labels {a:?} and {b:?} overlap");
            }
            for n in &nodes {
                assert!(!overlap(a.0, *n), "label {a:?} on node {n:?}");
            }
        }
    }
}
