//! `meshctl policy graph -o html`: one self-contained file (no script, style or font from
//! anywhere else) with the SVG picture, the edges, and the observed flows in a table that a
//! filter box narrows as one types.

use policy::graph::Graph;
use proto::admin::FlowRecord;

/// Text made safe for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn end(e: &proto::admin::FlowEnd) -> String {
    let who = match (&e.namespace, &e.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        _ => e.networks.first().cloned().unwrap_or_else(|| e.ip.clone()),
    };
    match e.port {
        Some(p) => format!("{who} ({}:{p})", e.ip),
        None => format!("{who} ({})", e.ip),
    }
}

/// The page: `svg` (the graph drawn), the edges of `g`, and `records`.
pub fn to_html(g: &Graph, svg: &str, records: &[FlowRecord]) -> String {
    let mut edges = String::new();
    for e in &g.edges {
        let state = e
            .state(g.overlaid)
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        edges.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&g.nodes[e.from].id),
            esc(&g.nodes[e.to].id),
            esc(&e.label()),
            esc(&state),
            esc(&e.by.join("; ")),
        ));
    }
    let mut flows = String::new();
    for r in records {
        let mut policy = r.policy.clone();
        if let Some(rule) = &r.rule {
            policy.push(' ');
            policy.push_str(rule);
        }
        if let Some(s) = &r.staged {
            policy.push_str(&format!(" [staged: {} by {}]", s.verdict, s.policy));
        }
        flows.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&r.verdict),
            esc(&r.time),
            esc(r.node.as_deref().unwrap_or("")),
            esc(&r.event),
            esc(&r.verdict),
            esc(&r.protocol),
            esc(&end(&r.src)),
            esc(&end(&r.dst)),
            esc(&policy),
        ));
    }
    let flows_section = if records.is_empty() {
        String::new()
    } else {
        format!(
            "<h2>Observed flows ({n})</h2>\n<p><input id=\"filter\" type=\"search\" \
             placeholder=\"filter: any text of a row (a name, a port, deny, a policy)\" size=\"60\" \
             oninput=\"narrow(this.value)\"> <span id=\"shown\">{n} shown</span></p>\n\
             <table id=\"flows\"><thead><tr><th>time</th><th>node</th><th>event</th>\
             <th>verdict</th><th>protocol</th><th>source</th><th>destination</th>\
             <th>policy</th></tr></thead>\n<tbody>\n{flows}</tbody></table>\n",
            n = records.len()
        )
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Flow graph</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 1em 2em; }}\n\
         table {{ border-collapse: collapse; margin-bottom: 2em; }}\n\
         th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 13px; }}\n\
         th {{ background: #eee; }}\n\
         tr.deny td {{ color: #b00; }}\n\
         tr.audit td, tr.rate-limited td {{ color: #c60; }}\n\
         .graph {{ overflow: auto; border: 1px solid #ddd; margin-bottom: 2em; }}\n\
         </style>\n</head>\n<body>\n<h1>Flow graph</h1>\n\
         <p>{nodes} node(s), {edge_count} edge(s). Drawn by <code>meshctl policy graph -o html</code>.</p>\n\
         <div class=\"graph\">\n{svg}\n</div>\n\
         <h2>Edges</h2>\n<table><thead><tr><th>from</th><th>to</th><th>flows</th>\
         <th>seen</th><th>allowed by</th></tr></thead>\n<tbody>\n{edges}</tbody></table>\n\
         {flows_section}\
         <script>\n\
         function narrow(text) {{\n\
           var words = text.toLowerCase().split(/\\s+/).filter(function (w) {{ return w; }});\n\
           var rows = document.querySelectorAll('#flows tbody tr'), shown = 0;\n\
           rows.forEach(function (row) {{\n\
             var t = row.textContent.toLowerCase();\n\
             var keep = words.every(function (w) {{ return t.indexOf(w) >= 0; }});\n\
             row.style.display = keep ? '' : 'none';\n\
             if (keep) shown++;\n\
           }});\n\
           document.getElementById('shown').textContent = shown + ' shown';\n\
         }}\n\
         </script>\n</body>\n</html>\n",
        nodes = g.nodes.len(),
        edge_count = g.edges.len(),
        svg = strip_prolog(svg),
    )
}

/// An SVG document without its XML declaration, to stand inside HTML.
fn strip_prolog(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(at) => &svg[at..],
        None => svg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_stands_alone_and_escapes_what_it_shows() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/microblog");
        let set = crate::policy::load(&[root.into()], policy::engine::Posture::ZeroTrust)
            .unwrap_or_else(|e| panic!("{}", e.error))
            .in_trust_domain("cluster.local");
        let mut g = policy::graph::graph(&set, &policy::graph::identities_of_tests(&set));
        let mut r: FlowRecord = serde_json::from_str(
            r#"{"seq":1,"time":"2026-11-24T10:00:00.000Z","event":"new","direction":"ingress",
            "verdict":"deny","protocol":"tcp","policy":"<script>alert(1)</script>",
            "src":{"ip":"100.64.0.2","port":40000,"trust_domain":"cluster.local","namespace":"microblog","name":"user"},
            "dst":{"ip":"100.64.0.3","port":8080,"trust_domain":"cluster.local","namespace":"microblog","name":"post"}}"#,
        )
        .unwrap();
        r.node = Some("cluster.local/microblog/post".into());
        g.overlay(std::slice::from_ref(&r));
        let svg = crate::graph_svg::to_svg(&g);
        let html = to_html(&g, &svg, &[r]);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<svg"));
        assert!(!html.contains("<?xml"), "the SVG's prolog is left out");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("microblog/user (100.64.0.2:40000)"));
        assert!(html.contains("Observed flows (1)"));
        // Nothing is loaded from elsewhere: the SVG's namespace declaration is the one URL,
        // and references stay inside the page.
        for outside in ["http://", "https://"] {
            assert!(
                html.match_indices(outside)
                    .all(|(i, _)| html[..i].ends_with("xmlns=\"")),
                "{outside} in the page"
            );
        }
        assert!(!html.contains("src="));
        assert!(html
            .match_indices("href=\"")
            .all(|(i, _)| html[i + 6..].starts_with('#')));
    }
}
