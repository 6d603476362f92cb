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

/// The writer draws edge labels before the edges, so lines cross them: moved to the end of
/// the document, with their halo they are drawn last and stay readable.
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
        if text.contains("class=\"a12\"") && !text.contains("<textPath") {
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

/// Edge labels (the smaller font) get a white halo, so that a line crossing a label leaves it
/// readable.
const LABEL_HALO: &str =
    ".a12 { paint-order: stroke; stroke: white; stroke-width: 4px; stroke-linejoin: round; }";

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
}
