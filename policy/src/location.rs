//! Where in a policy file a document and a field are, so that every error names its line and
//! column as a compiler does (`FILE:LINE:COLUMN: ...`). Pure text work on block-style YAML, the
//! style Calico's and Kubernetes' examples use; a field it cannot find is placed at its
//! document's first line.

/// The 0-based line where each document of a YAML stream starts (after its `---`), in the order
/// the YAML parser yields them: a `---` before any content starts the first document.
pub fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut content_seen = false;
    for (i, line) in text.lines().enumerate() {
        let marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if marker {
            if starts.is_empty() && !content_seen {
                starts.push(i + 1);
            } else {
                if starts.is_empty() {
                    starts.push(0);
                }
                starts.push(i + 1);
            }
            continue;
        }
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') {
            content_seen = true;
        }
    }
    if starts.is_empty() {
        starts.push(0);
    }
    starts
}

/// One step of a field path: `spec.ingress[0].source.selector` is `spec`, `ingress`, `[0]`,
/// `source`, `selector`.
#[derive(Debug, PartialEq, Eq)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Step::Key(key));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            out.push(Step::Index(r[..end].parse().ok()?));
            rest = &r[end + 1..];
        }
    }
    Some(out)
}

/// A line's content column, skipping `- ` sequence markers: (column of the first key or value,
/// columns of the dashes before it).
fn content(line: &str) -> (usize, Vec<usize>) {
    let mut col = line.len() - line.trim_start().len();
    let mut dashes = Vec::new();
    loop {
        let rest = &line[col..];
        if rest == "-" || rest.starts_with("- ") {
            dashes.push(col);
            col += 1;
            col += line[col..].len() - line[col..].trim_start().len();
        } else {
            return (col, dashes);
        }
    }
}

fn blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// The 0-based line and column of the field `path` within `lines` (one document), or `None`.
pub fn locate(lines: &[&str], path: &str) -> Option<(usize, usize)> {
    let steps = steps(path)?;
    // The lines [from, to) that hold the current node, whose entries are indented deeper than
    // `parent` (the column of the key or dash that owns them).
    let (mut from, mut to, mut parent): (usize, usize, isize) = (0, lines.len(), -1);
    let mut found = None;
    for step in steps {
        match step {
            Step::Key(key) => {
                let mut hit = None;
                let mut level = None;
                for (i, line) in lines.iter().enumerate().take(to).skip(from) {
                    if blank(line) {
                        continue;
                    }
                    let (col, _) = content(line);
                    if (col as isize) <= parent {
                        break;
                    }
                    // Only keys of this mapping, not of mappings nested in it.
                    let level = *level.get_or_insert(col);
                    if col != level {
                        continue;
                    }
                    let rest = &line[col..];
                    let named = rest
                        .strip_prefix(key)
                        .or_else(|| rest.strip_prefix(&format!("\"{key}\"")))
                        .or_else(|| rest.strip_prefix(&format!("'{key}'")));
                    if named.is_some_and(|r| r.starts_with(':')) {
                        hit = Some((i, col));
                        break;
                    }
                }
                let (line, col) = hit?;
                found = Some((line, col));
                // Its value: the rest of the line, or the deeper lines after it.
                let end = (line + 1..to)
                    .find(|&j| {
                        !blank(lines[j]) && content(lines[j]).0 <= col && {
                            // A sequence under a key may sit at the key's own column.
                            let (c, dashes) = content(lines[j]);
                            !(dashes.first() == Some(&col) && c > col)
                        }
                    })
                    .unwrap_or(to);
                // The key's own line holds no entries of its value (unless inline), so the next
                // key is looked for after it.
                (from, to, parent) = (line + 1, end, col as isize);
            }
            Step::Index(n) => {
                // Items are the lines whose first dash is the shallowest in the range.
                let items: Vec<(usize, usize)> = (from..to)
                    .filter(|&j| !blank(lines[j]))
                    .filter_map(|j| content(lines[j]).1.first().map(|&d| (j, d)))
                    .collect();
                // A flow list (`ports: [80, 443]`): the key's own place is as close as it gets.
                let Some(dash) = items.iter().map(|&(_, d)| d).min() else {
                    return found;
                };
                let starts: Vec<usize> = items
                    .iter()
                    .filter(|&&(j, d)| d == dash && (from..to).contains(&j))
                    .map(|&(j, _)| j)
                    .collect();
                let start = *starts.get(n)?;
                let end = starts.get(n + 1).copied().unwrap_or(to);
                found = Some((start, dash));
                // Entries of the item start on its dash line, deeper than the dash.
                (from, to, parent) = (start, end, dash as isize);
            }
        }
    }
    found
}

/// The documents of one file, found once: each as its first line and its own text, so that
/// placing a field costs the document's length, not the file's.
pub struct Documents<'a> {
    text: &'a str,
    starts: Vec<usize>,
    /// Byte offset of each line's start, and the text's length at the end.
    offsets: Vec<usize>,
}

impl<'a> Documents<'a> {
    pub fn new(text: &'a str) -> Documents<'a> {
        let mut offsets = vec![0];
        offsets.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        if offsets.last() != Some(&text.len()) {
            offsets.push(text.len());
        }
        Documents {
            text,
            starts: document_starts(text),
            offsets,
        }
    }

    /// Document `document` (1-based, as the parser counts): its first line (0-based) and text.
    pub fn get(&self, document: usize) -> (usize, &'a str) {
        let lines = self.offsets.len() - 1;
        let start = self
            .starts
            .get(document.saturating_sub(1))
            .copied()
            .unwrap_or(0)
            .min(lines);
        // Up to the next document's `---` line.
        let end = self
            .starts
            .get(document)
            .map_or(lines, |s| s.saturating_sub(1))
            .clamp(start, lines);
        (start, &self.text[self.offsets[start]..self.offsets[end]])
    }
}

/// The 1-based line and column of field `path` in a document whose text is `doc` and whose first
/// line in its file is `first_line` (0-based); the document's first line when not found.
pub fn position_in(doc: &str, first_line: usize, path: &str) -> (usize, usize) {
    let lines: Vec<&str> = doc.lines().collect();
    match locate(&lines, path) {
        Some((l, c)) => (first_line + l + 1, c + 1),
        None => (first_line + 1, 1),
    }
}

/// The 1-based line and column of field `path` of document `document` of `text` (see
/// [`Documents`], which does it without reading the file again for each field).
pub fn field_position(text: &str, document: usize, path: &str) -> (usize, usize) {
    let (first, doc) = Documents::new(text).get(document);
    position_in(doc, first, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# the microblog
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      serviceAccounts:
        names: [api, search]
    destination:
      ports: [8080]
  - action: Deny
    source:
      selector: role == 'x'
---
apiVersion: v1
kind: Namespace
metadata:
  name: microblog
";

    #[test]
    fn finds_documents_and_fields_by_their_path() {
        assert_eq!(document_starts(TEXT), vec![2, 21]);
        assert_eq!(field_position(TEXT, 1, "spec.selector"), (9, 3));
        assert_eq!(
            field_position(TEXT, 1, "spec.ingress[0].destination.ports"),
            (17, 7)
        );
        assert_eq!(
            field_position(TEXT, 1, "spec.ingress[1].source.selector"),
            (20, 7)
        );
        assert_eq!(field_position(TEXT, 1, "spec.ingress[1]"), (18, 3));
        assert_eq!(field_position(TEXT, 1, "spec.ingress[0].protocol"), (12, 5));
        // An item of a flow list: at its key.
        assert_eq!(
            field_position(TEXT, 1, "spec.ingress[0].destination.ports[0]"),
            (17, 7)
        );
        assert_eq!(field_position(TEXT, 2, "metadata.name"), (25, 3));
        // Not there: the document's first line.
        assert_eq!(field_position(TEXT, 1, "spec.egress[0]"), (3, 1));
        assert_eq!(field_position(TEXT, 2, "spec.nothing"), (22, 1));
    }

    #[test]
    fn sequences_at_the_keys_column_and_nested_dashes() {
        let text = "spec:\n  ingress:\n    - action: Allow\n      source:\n        nets:\n        - 10.0.0.0/8\n    - action: Deny\n";
        assert_eq!(field_position(text, 1, "spec.ingress[1].action"), (7, 7));
        assert_eq!(
            field_position(text, 1, "spec.ingress[0].source.nets[0]"),
            (6, 9)
        );
        let flat = "spec:\n  ingress:\n  - action: Allow\n  - action: Deny\n    protocol: TCP\n";
        assert_eq!(field_position(flat, 1, "spec.ingress[1].protocol"), (5, 5));
    }

    #[test]
    fn a_stream_without_markers_is_one_document_and_a_leading_marker_starts_the_first() {
        assert_eq!(document_starts("a: 1\n"), vec![0]);
        assert_eq!(document_starts("a: 1\n---\nb: 2\n"), vec![0, 2]);
        assert_eq!(document_starts("---\na: 1\n"), vec![1]);
        assert_eq!(document_starts("---\n---\na: 1\n"), vec![1, 2]);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "[ a-z:\\-\\[\\]0-9\n#'\"]{0,200}", path in "[a-z.\\[\\]0-9]{0,30}") {
            let _ = field_position(&text, 1, &path);
            let _ = field_position(&text, 3, &path);
        }
    }
}
