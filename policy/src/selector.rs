//! Calico's label selector language, the whole of it, parsed and decided as Calico's own
//! tokenizer and parser (`libcalico-go/lib/selector`) do
//! (<https://docs.tigera.io/calico/latest/reference/resources/networkpolicy#selectors>):
//!
//! | expression | matches a label set where |
//! |---|---|
//! | `all()` | always (also the empty selector) |
//! | `global()` | always; in a rule's `namespaceSelector`, the resource is in no namespace |
//! | `k == 'v'` | label `k` is `v` |
//! | `k != 'v'` | label `k` is absent or not `v` |
//! | `k in {'a', 'b'}` | label `k` is one of the values |
//! | `k not in {'a', 'b'}` (`notin`) | label `k` is absent or none of them |
//! | `has(k)` / `!has(k)` | label `k` is present / absent |
//! | `k contains 's'`, `k starts with 's'` (`startswith`), `k ends with 's'` (`endswith`) | label `k` is present and so |
//! | `!e`, `e && e`, `e \|\| e`, `(e)` | not, and, or (`!` binds tightest, then `&&`, then `\|\|`) |
//!
//! Strings take single or double quotes, without escapes. Whitespace is spaces and tabs. Where
//! `global()` may stand is the validator's business: [`Selector::check_rule_namespace_text`],
//! [`Selector::check_outside_rule_namespaces`]. A parse error names the column (1-based) and
//! what was expected there. The one difference from Calico: at most [`MAX_DEPTH`] nested
//! parentheses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    Global,
    Eq(String, String),
    Ne(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Has(String),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Selector>),
    /// Two or more terms, as Calico's parser builds them: a chain of `&&` or `||` is one node,
    /// so only parentheses (at most [`MAX_DEPTH`]) make the tree deeper.
    And(Vec<Selector>),
    Or(Vec<Selector>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: expected {expected}, found {found}")]
pub struct SelectorError {
    /// 1-based column (in characters) of the offending token.
    pub column: usize,
    pub expected: String,
    pub found: String,
}

/// What a selector is matched against: labels.
pub trait Subject {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Subject for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// The label every namespaced resource has in a rule's namespace selector, after
/// [`Selector::for_rule_namespaces`] (Calico's `projectcalico.org/namespace`).
pub const NAMESPACED_LABEL: &str = "projectcalico.org/namespace";

/// The longest selector we parse; policies are written by people, not generated without bound.
pub const MAX_SELECTOR_CHARS: usize = 64 * 1024;
/// The deepest nesting of parentheses we accept (keeps recursion bounded). Calico has no bound
/// but the input's length; a run of `!` is folded, as Calico folds it, and costs no depth.
pub const MAX_DEPTH: usize = 256;
/// The longest label key, in bytes, as Calico's tokenizer allows.
pub const MAX_LABEL_BYTES: usize = 512;

/// Calico's message for `global()` where only a rule's `namespaceSelector` may have it.
pub const GLOBAL_ONLY_IN_RULE_NAMESPACES: &str =
    "global() can only be used in an EntityRule namespaceSelector";

impl Selector {
    /// Parses a selector exactly as Calico's tokenizer and parser (`libcalico-go/lib/selector`)
    /// do: whitespace is spaces and tabs; `has(`, `all(` and `global(` open a call only with no
    /// gap before `(` (otherwise `has`, `all` and the operator words are label keys); the
    /// operators `starts with`, `ends with` and `not in` may be written as one word or with any
    /// gap; a set may end in a comma; label keys are at most [`MAX_LABEL_BYTES`]; a run of `!`
    /// folds to one or none.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let chars: Vec<char> = text.chars().collect();
        if chars.len() > MAX_SELECTOR_CHARS {
            return Err(SelectorError {
                column: MAX_SELECTOR_CHARS + 1,
                expected: format!("at most {MAX_SELECTOR_CHARS} characters"),
                found: format!("{} characters", chars.len()),
            });
        }
        let tokens = tokenize(&chars)?;
        let mut p = Parser {
            s: &chars,
            tokens,
            pos: 0,
            depth: 0,
        };
        if p.peek() == &Tok::Eof {
            return Ok(Selector::All);
        }
        let e = p.or()?;
        if p.peek() != &Tok::Eof {
            return Err(p.error("`&&`, `||` or the end"));
        }
        Ok(e)
    }

    /// Whether a selector's text may stand in a rule's `namespaceSelector` as Calico's validator
    /// decides: if it mentions `global(` at all, it must be `global()` alone.
    pub fn check_rule_namespace_text(text: &str) -> Result<(), String> {
        let only_global = text
            .trim_matches([' ', '\t'])
            .strip_prefix("global(")
            .is_some_and(|rest| rest.trim_start_matches([' ', '\t']) == ")");
        if text.contains("global(") && !only_global {
            return Err("global() cannot be combined with other selectors".into());
        }
        Ok(())
    }

    /// Whether a selector's text may stand anywhere but a rule's `namespaceSelector` (a policy's
    /// selectors, a rule's `selector`): Calico refuses any text containing `global(` there.
    pub fn check_outside_rule_namespaces(text: &str) -> Result<(), String> {
        if text.contains("global(") {
            return Err(GLOBAL_ONLY_IN_RULE_NAMESPACES.into());
        }
        Ok(())
    }

    /// The selector as a rule's `namespaceSelector` means it, as Calico rewrites it: `all()` is
    /// every namespace (`has(projectcalico.org/namespace)`) and `global()` is the resources in
    /// none (`!has(projectcalico.org/namespace)`), wherever they stand in the expression. Match
    /// the result against a namespace's labels with [`NAMESPACED_LABEL`] among them, or against
    /// no labels for a global resource.
    pub fn for_rule_namespaces(&self) -> Selector {
        let has = || Selector::Has(NAMESPACED_LABEL.to_string());
        match self {
            Selector::All => has(),
            Selector::Global => Selector::Not(Box::new(has())),
            Selector::Not(e) => Selector::Not(Box::new(e.for_rule_namespaces())),
            Selector::And(v) => {
                Selector::And(v.iter().map(Selector::for_rule_namespaces).collect())
            }
            Selector::Or(v) => Selector::Or(v.iter().map(Selector::for_rule_namespaces).collect()),
            other => other.clone(),
        }
    }

    /// `terms` joined by `&&`: the one term itself, `all()` for none.
    pub fn all_of(mut terms: Vec<Selector>) -> Selector {
        match terms.len() {
            0 => Selector::All,
            1 => terms.remove(0),
            _ => Selector::And(terms),
        }
    }

    /// `terms` joined by `||`: the one term itself. Never empty.
    fn any_of(mut terms: Vec<Selector>) -> Selector {
        match terms.len() {
            1 => terms.remove(0),
            _ => Selector::Or(terms),
        }
    }

    /// Whether every label set the selector matches has label `key` with a value the selector
    /// names (`==`, `in`, or a string match), in every alternative: `k == 'a' && x` and
    /// `k == 'a' || k == 'b'` pin `k`; `x || k == 'a'`, `k != 'a'`, `!(k == 'a')` and `has(k)`
    /// do not.
    pub fn pins(&self, key: &str) -> bool {
        match self {
            Selector::Eq(k, _)
            | Selector::In(k, _)
            | Selector::Contains(k, _)
            | Selector::StartsWith(k, _)
            | Selector::EndsWith(k, _) => k == key,
            Selector::And(v) => v.iter().any(|e| e.pins(key)),
            Selector::Or(v) => v.iter().all(|e| e.pins(key)),
            _ => false,
        }
    }

    /// Whether the selector matches; `global()` matches everything, as Calico's does, except
    /// in a rule's namespace selector ([`Selector::for_rule_namespaces`]).
    pub fn matches(&self, s: &impl Subject) -> bool {
        match self {
            Selector::All | Selector::Global => true,
            Selector::Eq(k, v) => s.label(k) == Some(v.as_str()),
            Selector::Ne(k, v) => s.label(k) != Some(v.as_str()),
            Selector::In(k, vs) => s.label(k).is_some_and(|x| vs.contains(x)),
            Selector::NotIn(k, vs) => !s.label(k).is_some_and(|x| vs.contains(x)),
            Selector::Has(k) => s.label(k).is_some(),
            Selector::Contains(k, v) => s.label(k).is_some_and(|x| x.contains(v.as_str())),
            Selector::StartsWith(k, v) => s.label(k).is_some_and(|x| x.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => s.label(k).is_some_and(|x| x.ends_with(v.as_str())),
            Selector::Not(e) => !e.matches(s),
            Selector::And(v) => v.iter().all(|e| e.matches(s)),
            Selector::Or(v) => v.iter().any(|e| e.matches(s)),
        }
    }
}

/// A token of Calico's selector tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Label(String),
    Str(String),
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    In,
    Not,
    NotIn,
    Contains,
    StartsWith,
    EndsWith,
    All,
    Global,
    Has(String),
    LParen,
    RParen,
    And,
    Or,
    Eof,
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_./-".contains(c)
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn error_at(s: &[char], pos: usize, expected: &str) -> SelectorError {
    let found = if pos >= s.len() {
        "the end".to_string()
    } else {
        let rest: String = s[pos..].iter().take(12).collect();
        format!("`{rest}`")
    };
    SelectorError {
        column: pos + 1,
        expected: expected.to_string(),
        found,
    }
}

/// Calico's tokenizer, over characters: each token with its 0-based position.
fn tokenize(s: &[char]) -> Result<Vec<(Tok, usize)>, SelectorError> {
    let mut out: Vec<(Tok, usize)> = Vec::new();
    let mut i = 0;
    let skip = |i: &mut usize| {
        while s.get(*i).copied().is_some_and(is_space) {
            *i += 1;
        }
    };
    let starts = |i: usize, w: &str| w.chars().enumerate().all(|(k, c)| s.get(i + k) == Some(&c));
    let boundary = |i: usize| !s.get(i).copied().is_some_and(is_key_char);
    // A label key at `i`: its end, or the error.
    let key = |i: usize| -> Result<usize, SelectorError> {
        let mut j = i;
        while s.get(j).copied().is_some_and(is_key_char) {
            j += 1;
        }
        if j == i {
            return Err(error_at(
                s,
                i,
                "a label key, all(), global(), has(...), `!` or `(`",
            ));
        }
        // Key characters are ASCII: characters are bytes.
        if j - i > MAX_LABEL_BYTES {
            return Err(error_at(
                s,
                i,
                &format!("a label key of at most {MAX_LABEL_BYTES} bytes"),
            ));
        }
        Ok(j)
    };
    // Words `ws` at `i` with any gap between them and a word boundary after: the end.
    let words = |i: usize, ws: &[&str]| -> Option<usize> {
        let mut j = i;
        for (n, w) in ws.iter().enumerate() {
            if !starts(j, w) {
                return None;
            }
            j += w.len();
            if n + 1 < ws.len() {
                while s.get(j).copied().is_some_and(is_space) {
                    j += 1;
                }
            }
        }
        boundary(j).then_some(j)
    };
    loop {
        skip(&mut i);
        let Some(&c) = s.get(i) else {
            out.push((Tok::Eof, i));
            return Ok(out);
        };
        let at = i;
        let after_label = matches!(out.last(), Some((Tok::Label(_), _)));
        let tok = match c {
            '(' => {
                i += 1;
                Tok::LParen
            }
            ')' => {
                i += 1;
                Tok::RParen
            }
            '{' => {
                i += 1;
                Tok::LBrace
            }
            '}' => {
                i += 1;
                Tok::RBrace
            }
            ',' => {
                i += 1;
                Tok::Comma
            }
            '"' | '\'' => {
                let Some(len) = s[i + 1..].iter().position(|&x| x == c) else {
                    return Err(error_at(s, i, "a closing quote"));
                };
                let v: String = s[i + 1..i + 1 + len].iter().collect();
                i += len + 2;
                Tok::Str(v)
            }
            '=' if starts(i, "==") => {
                i += 2;
                Tok::Eq
            }
            '=' => return Err(error_at(s, i, "`==`")),
            '!' if starts(i, "!=") => {
                i += 2;
                Tok::Ne
            }
            '!' => {
                i += 1;
                Tok::Not
            }
            '&' if starts(i, "&&") => {
                i += 2;
                Tok::And
            }
            '&' => return Err(error_at(s, i, "`&&`")),
            '|' if starts(i, "||") => {
                i += 2;
                Tok::Or
            }
            '|' => return Err(error_at(s, i, "`||`")),
            _ if after_label => {
                let ops: [(&[&str], Tok); 5] = [
                    (&["contains"], Tok::Contains),
                    (&["starts", "with"], Tok::StartsWith),
                    (&["ends", "with"], Tok::EndsWith),
                    (&["not", "in"], Tok::NotIn),
                    (&["in"], Tok::In),
                ];
                let Some((end, tok)) = ops
                    .into_iter()
                    .find_map(|(ws, tok)| words(i, ws).map(|end| (end, tok)))
                else {
                    return Err(error_at(
                        s,
                        i,
                        "an operator: ==, !=, in, not in, contains, starts with, ends with",
                    ));
                };
                i = end;
                tok
            }
            _ if starts(i, "has(") => {
                i += 4;
                skip(&mut i);
                let end = key(i)?;
                let k: String = s[i..end].iter().collect();
                i = end;
                skip(&mut i);
                if s.get(i) != Some(&')') {
                    return Err(error_at(s, i, "`)`"));
                }
                i += 1;
                Tok::Has(k)
            }
            _ if starts(i, "all(") || starts(i, "global(") => {
                let global = starts(i, "global(");
                i += if global { 7 } else { 4 };
                skip(&mut i);
                if s.get(i) != Some(&')') {
                    return Err(error_at(s, i, "`)`"));
                }
                i += 1;
                if global {
                    Tok::Global
                } else {
                    Tok::All
                }
            }
            _ => {
                let end = key(i)?;
                let k: String = s[i..end].iter().collect();
                i = end;
                Tok::Label(k)
            }
        };
        out.push((tok, at));
    }
}

/// Calico's parser, over the tokens (which end in [`Tok::Eof`]).
struct Parser<'a> {
    s: &'a [char],
    tokens: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.tokens[self.pos.min(self.tokens.len() - 1)].0
    }

    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn error(&self, expected: &str) -> SelectorError {
        let at = self.tokens[self.pos.min(self.tokens.len() - 1)].1;
        error_at(self.s, at, expected)
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut terms = vec![self.and()?];
        while self.peek() == &Tok::Or {
            self.next();
            terms.push(self.and()?);
        }
        Ok(Selector::any_of(terms))
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut terms = vec![self.operation()?];
        while self.peek() == &Tok::And {
            self.next();
            terms.push(self.operation()?);
        }
        Ok(Selector::all_of(terms))
    }

    /// One operation, after any run of `!` (folded: an odd run negates).
    fn operation(&mut self) -> Result<Selector, SelectorError> {
        let mut negated = false;
        while self.peek() == &Tok::Not {
            self.next();
            negated = !negated;
        }
        let e = match self.peek().clone() {
            Tok::Has(k) => {
                self.next();
                Selector::Has(k)
            }
            Tok::All => {
                self.next();
                Selector::All
            }
            Tok::Global => {
                self.next();
                Selector::Global
            }
            Tok::LParen => {
                if self.depth >= MAX_DEPTH {
                    return Err(self.error(&format!("at most {MAX_DEPTH} levels of parentheses")));
                }
                self.next();
                self.depth += 1;
                let e = self.or();
                self.depth -= 1;
                let e = e?;
                if self.peek() != &Tok::RParen {
                    return Err(self.error("`)`"));
                }
                self.next();
                e
            }
            Tok::Label(k) => {
                self.next();
                self.comparison(k)?
            }
            _ => return Err(self.error("a label key, all(), global(), has(...), `!` or `(`")),
        };
        Ok(if negated {
            Selector::Not(Box::new(e))
        } else {
            e
        })
    }

    fn comparison(&mut self, k: String) -> Result<Selector, SelectorError> {
        let op = self.peek().clone();
        let string = |p: &mut Self| match p.peek().clone() {
            Tok::Str(v) => {
                p.next();
                Ok(v)
            }
            _ => Err(p.error("a quoted string")),
        };
        match op {
            Tok::Eq => {
                self.next();
                Ok(Selector::Eq(k, string(self)?))
            }
            Tok::Ne => {
                self.next();
                Ok(Selector::Ne(k, string(self)?))
            }
            Tok::Contains => {
                self.next();
                Ok(Selector::Contains(k, string(self)?))
            }
            Tok::StartsWith => {
                self.next();
                Ok(Selector::StartsWith(k, string(self)?))
            }
            Tok::EndsWith => {
                self.next();
                Ok(Selector::EndsWith(k, string(self)?))
            }
            Tok::In | Tok::NotIn => {
                self.next();
                let set = self.set()?;
                Ok(if op == Tok::In {
                    Selector::In(k, set)
                } else {
                    Selector::NotIn(k, set)
                })
            }
            _ => {
                Err(self.error("an operator: ==, !=, in, not in, contains, starts with, ends with"))
            }
        }
    }

    /// `{` strings separated by commas, perhaps one more comma, `}`.
    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        if self.peek() != &Tok::LBrace {
            return Err(self.error("`{`"));
        }
        self.next();
        let mut vs = BTreeSet::new();
        while let Tok::Str(v) = self.peek().clone() {
            self.next();
            vs.insert(v);
            if self.peek() != &Tok::Comma {
                break;
            }
            self.next();
        }
        if self.peek() != &Tok::RBrace {
            return Err(self.error("`,` or `}`"));
        }
        self.next();
        Ok(vs)
    }
}

/// Prints the canonical form, which parses back to the same selector, with parentheses only where
/// precedence needs them (so it never nests deeper than the text it was parsed from).
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |s: &str| {
            if s.contains('\'') {
                format!("\"{s}\"")
            } else {
                format!("'{s}'")
            }
        };
        let set = |vs: &BTreeSet<String>| vs.iter().map(|v| q(v)).collect::<Vec<_>>().join(", ");
        // `!` applies to one term: a compound operand needs parentheses.
        // `!!e` would fold away: a negated negation needs them too.
        let operand = |e: &Selector| match e {
            Selector::And(..) | Selector::Or(..) | Selector::Not(..) => format!("({e})"),
            _ => e.to_string(),
        };
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Global => write!(f, "global()"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", q(v)),
            Selector::Ne(k, v) => write!(f, "{k} != {}", q(v)),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", set(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", set(vs)),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Contains(k, v) => write!(f, "{k} contains {}", q(v)),
            Selector::StartsWith(k, v) => write!(f, "{k} starts with {}", q(v)),
            Selector::EndsWith(k, v) => write!(f, "{k} ends with {}", q(v)),
            Selector::Not(e) => write!(f, "!{}", operand(e)),
            // A nested chain keeps its parentheses, so the text parses back to the same tree.
            Selector::And(v) => {
                let terms: Vec<String> = v
                    .iter()
                    .map(|e| match e {
                        Selector::And(..) | Selector::Or(..) => format!("({e})"),
                        _ => e.to_string(),
                    })
                    .collect();
                write!(f, "{}", terms.join(" && "))
            }
            Selector::Or(v) => {
                let terms: Vec<String> = v
                    .iter()
                    .map(|e| match e {
                        Selector::Or(..) => format!("({e})"),
                        _ => e.to_string(),
                    })
                    .collect();
                write!(f, "{}", terms.join(" || "))
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn pins_means_every_alternative_names_a_value() {
        let pins = |t: &str| Selector::parse(t).unwrap().pins("k");
        assert!(pins("k == 'a'"));
        assert!(pins("k in {'a', 'b'} && x == 'y'"));
        assert!(pins("k == 'a' || k ends with '.b'"));
        assert!(pins("(k == 'a' || k == 'b') && !has(z)"));
        assert!(!pins("x == 'y' || k == 'a'"));
        assert!(!pins("k != 'a'"));
        assert!(!pins("!(k == 'a')"));
        assert!(!pins("has(k)"));
        assert!(!pins("all()"));
    }

    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn m(sel: &str, l: &[(&str, &str)]) -> bool {
        Selector::parse(sel)
            .unwrap_or_else(|e| panic!("{sel}: {e}"))
            .matches(&labels(l))
    }

    #[test]
    fn the_zero_trust_guide_selectors() {
        let post = [("app", "post"), ("svc-post", "access")];
        assert!(m("svc-post == 'access'", &post));
        assert!(m("app == 'microblog'", &[("app", "microblog")]));
        assert!(!m("svc-post == 'access'", &[("app", "search")]));
        assert!(m(
            "projectcalico.org/name == \"microblog\"",
            &[("projectcalico.org/name", "microblog")]
        ));
    }

    #[test]
    fn every_operator() {
        let l = [("app", "web-frontend"), ("tier", "fe"), ("empty", "")];
        assert!(m("all()", &l) && m("", &l) && m("  ", &l));
        assert!(
            m("global()", &l),
            "global() matches everything outside a rule's namespaces"
        );
        assert!(m("app != 'db'", &l) && m("missing != 'x'", &l) && !m("tier != 'fe'", &l));
        assert!(
            m("tier in {'fe', 'be'}", &l) && !m("tier in {}", &l) && !m("missing in {'x'}", &l)
        );
        assert!(
            m("tier not in {'be'}", &l)
                && m("missing not in {'x'}", &l)
                && !m("tier not in {'fe'}", &l)
        );
        assert!(m("has(app)", &l) && m("has(empty)", &l) && m("!has(missing)", &l));
        assert!(m("app contains 'front'", &l) && !m("missing contains ''", &l));
        assert!(m("app starts with 'web'", &l) && m("app ends with \"end\"", &l));
        assert!(m("!(tier == 'be') && (app == 'x' || tier == 'fe')", &l));
        assert!(
            m("tier == 'be' || tier == 'fe' && app starts with 'web'", &l),
            "&& binds tighter"
        );
        assert!(!m("!has(app) || tier == 'be'", &l));
        assert!(m("!!has(app)", &l));
        assert!(
            m("hash == 'x'", &[("hash", "x")]),
            "`has` is not a prefix of every key"
        );
        assert!(m("all() && has(app)", &l));
    }

    #[test]
    fn errors_name_the_column_and_what_was_expected() {
        let e = Selector::parse("app == 'web").unwrap_err();
        assert_eq!(e.column, 8);
        assert!(e.expected.contains("closing quote"), "{e}");
        let e = Selector::parse("app = 'web'").unwrap_err();
        assert_eq!(e.column, 5);
        let e = Selector::parse("has(app").unwrap_err();
        assert_eq!((e.column, e.expected.as_str()), (8, "`)`"));
        let e = Selector::parse("a == 'b' &&").unwrap_err();
        assert_eq!(e.column, 12);
        assert_eq!(e.found, "the end");
        let e = Selector::parse("a in {'x' 'y'}").unwrap_err();
        assert_eq!(e.column, 11);
        let e = Selector::parse("a == 'b' c").unwrap_err();
        assert_eq!(e.column, 10);
        assert!(Selector::parse(&"(".repeat(100)).is_err());
        let deep = format!("{}a == 'b'{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(Selector::parse(&deep).is_ok());
        let deeper = format!("({deep})");
        let e = Selector::parse(&deeper).unwrap_err();
        assert!(e.expected.contains("levels of parentheses"), "{e}");
        assert!(Selector::parse("a starts 'x'").is_err());
        assert!(Selector::parse("all(").is_err());
    }

    /// Calico's own test vectors (libcalico-go/lib/selector/parser/parser_test.go and
    /// tokenizer/tokenizer_test.go): what it accepts, how it decides, what it refuses.
    #[test]
    fn calicos_parser_test_vectors() {
        type Labels<'a> = &'a [&'a [(&'a str, &'a str)]];
        let cases: &[(&str, Labels, Labels)] = &[
            (
                r#"a == "b""#,
                &[&[("a", "b")], &[("a", "b"), ("c", "d")]],
                &[&[], &[("a", "c")], &[("c", "d")]],
            ),
            (
                r#"a == "b" && c == "d""#,
                &[&[("a", "b"), ("c", "d")]],
                &[
                    &[],
                    &[("a", "b"), ("c", "e")],
                    &[("a", "c"), ("c", "d")],
                    &[("c", "d")],
                    &[("a", "b")],
                ],
            ),
            (
                r#"a == "b" || c == "d""#,
                &[&[("a", "b"), ("c", "d")], &[("a", "b")], &[("c", "d")]],
                &[&[], &[("a", "e"), ("c", "e")], &[("c", "e")], &[("a", "e")]],
            ),
            (
                r#"a in {"'", '"', "c"}"#,
                &[&[("a", "c")], &[("a", "\"")], &[("a", "'")]],
                &[&[], &[("a", "e")]],
            ),
            (
                r#"a not in {"'", '"', "c"}"#,
                &[&[], &[("a", "e")]],
                &[&[("a", "c")], &[("a", "\"")], &[("a", "'")]],
            ),
            ("a == 'a'", &[&[("a", "a")]], &[&[("a", "b")], &[]]),
            (r#"a == "a""#, &[&[("a", "a")]], &[]),
            (r#"a != "b""#, &[&[("a", "a")]], &[]),
            (r#"a != "a""#, &[&[]], &[&[("a", "a")]]),
            ("a != 'a'", &[], &[&[("a", "a")]]),
            (
                r#"a contains "a""#,
                &[&[("a", "a")], &[("a", "bab")], &[("a", "aaa"), ("b", "c")]],
                &[&[], &[("a", "b")], &[("b", "aaa")]],
            ),
            (
                r#"a starts with "a""#,
                &[&[("a", "a")], &[("a", "abb")], &[("a", "aaa"), ("b", "c")]],
                &[&[], &[("a", "b")], &[("a", "baa")], &[("b", "aaa")]],
            ),
            (
                r#"a ends with "a""#,
                &[&[("a", "a")], &[("a", "bba")], &[("a", "aaa"), ("b", "c")]],
                &[&[], &[("a", "b")], &[("a", "aab")], &[("b", "aaa")]],
            ),
            (r#"a in {"a"}"#, &[&[("a", "a")]], &[&[("a", "b")]]),
            (r#"!a in {"a"}"#, &[&[("a", "b")]], &[]),
            (
                r#"a in {"a", "b"}"#,
                &[&[("a", "a")], &[("a", "b")]],
                &[&[("a", "c")]],
            ),
            (r#"a not in {"d", "e"}"#, &[&[("a", "a")]], &[]),
            (r#"a not in {"a"}"#, &[], &[&[("a", "a")]]),
            ("has(a)", &[&[("a", "b")]], &[]),
            ("!has(a)", &[&[("b", "b")]], &[&[("a", "b")]]),
            ("has(b)", &[], &[&[("a", "b")]]),
            ("!!has(b)", &[], &[&[("a", "b")]]),
            ("! has(a)", &[], &[&[("a", "b")]]),
            ("!!! has(a)", &[], &[&[("a", "b")]]),
            ("!!!has(a)", &[], &[&[("a", "b")]]),
            ("!! ! has(a)", &[], &[&[("a", "b")]]),
            ("! !!has(a)", &[], &[&[("a", "b")]]),
            ("", &[&[], &[("a", "b")]], &[]),
            (" ", &[&[]], &[]),
            ("all()", &[&[]], &[]),
            (" all()", &[&[], &[("a", "b")]], &[]),
            ("global()", &[&[]], &[]),
            (" global()", &[&[], &[("a", "b")]], &[]),
            (
                "a == 'a1' && b == 'b1'",
                &[&[("a", "a1"), ("b", "b1")]],
                &[],
            ),
            (
                "a == 'a1' && b != 'b1'",
                &[],
                &[&[("a", "a1"), ("b", "b1")]],
            ),
            (
                "a != 'a1' && b == 'b1'",
                &[],
                &[&[("a", "a1"), ("b", "b1")]],
            ),
            (
                "a != 'a1' && b != 'b1'",
                &[],
                &[&[("a", "a1"), ("b", "b1")]],
            ),
            (
                "a != 'a1' && !b == 'b1'",
                &[],
                &[&[("a", "a1"), ("b", "b1")]],
            ),
            (
                "!a == 'a1' && b == 'b1'",
                &[],
                &[&[("a", "a1"), ("b", "b1")]],
            ),
            ("has(a) && !has(b)", &[&[("a", "a")]], &[]),
            ("!has(b) && has(a)", &[&[("a", "a")]], &[]),
            ("!(!has(a) || has(b))", &[&[("a", "a")]], &[]),
            ("!(has(b) || !has(a))", &[&[("a", "a")]], &[]),
            (
                "a == 'a1' || b == 'b1'",
                &[&[("a", "a1"), ("b", "b1")]],
                &[],
            ),
            (
                "a == 'a1' || b != 'b1'",
                &[&[("a", "a1"), ("b", "b1")]],
                &[],
            ),
            (
                "a != 'a1' || b == 'b1'",
                &[&[("a", "a1"), ("b", "b1")]],
                &[],
            ),
            (
                "a != 'a1' || b != 'b1'",
                &[],
                &[&[("a", "a1"), ("b", "b1")]],
            ),
            (
                "! a == 'a1' || ! b == 'b1'",
                &[],
                &[&[("a", "a1"), ("b", "b1")]],
            ),
            // The tokenizer's: operator words as keys, one-word and spaced operators.
            (
                r#"contains contains "contains""#,
                &[&[("contains", "contains")]],
                &[],
            ),
            (r#"label contains"value""#, &[&[("label", "a value")]], &[]),
            (
                r#"label startswith "value""#,
                &[&[("label", "values")]],
                &[&[("label", "a value")]],
            ),
            (
                r#"label endswith "value""#,
                &[&[("label", "a value")]],
                &[&[("label", "values")]],
            ),
            (
                r#"startswith starts with "value""#,
                &[&[("startswith", "values")]],
                &[],
            ),
            (
                r#"endswith ends with "value""#,
                &[&[("endswith", "a value")]],
                &[],
            ),
            (
                "label starts  with \"value\"",
                &[&[("label", "values")]],
                &[],
            ),
            (
                "label ends \t with \"value\"",
                &[&[("label", "a value")]],
                &[],
            ),
            (r#"a not in {}"#, &[&[], &[("a", "x")]], &[]),
            (
                r#"a notin{"bar"}&&!has(foo)||b in{"c"}"#,
                &[&[("a", "x")], &[("b", "c"), ("foo", "")]],
                &[&[("a", "bar")]],
            ),
            (
                r#"a  not  in  {"bar"}  &&  ! has( foo )  ||  b  in  {'c'} "#,
                &[&[("a", "x")]],
                &[&[("a", "bar")]],
            ),
            (
                "has(calico/k8s_NS-.1/role)",
                &[&[("calico/k8s_NS-.1/role", "")]],
                &[],
            ),
            (
                "has == 'x' && all == 'y' && global == 'z' && not == 'n' && in == 'i'",
                &[&[
                    ("has", "x"),
                    ("all", "y"),
                    ("global", "z"),
                    ("not", "n"),
                    ("in", "i"),
                ]],
                &[],
            ),
            ("a in {'x', 'y',}", &[&[("a", "y")]], &[&[("a", "z")]]),
            ("all( ) && global( )", &[&[]], &[]),
            ("a == 'x'\t", &[&[("a", "x")]], &[]),
        ];
        for (sel, yes, no) in cases {
            let parsed = Selector::parse(sel).unwrap_or_else(|e| panic!("{sel:?}: {e}"));
            let again = Selector::parse(&parsed.to_string()).unwrap();
            for l in *yes {
                assert!(parsed.matches(&labels(l)), "{sel:?} should match {l:?}");
                assert!(again.matches(&labels(l)), "{parsed} should match {l:?}");
            }
            for l in *no {
                assert!(
                    !parsed.matches(&labels(l)),
                    "{sel:?} should not match {l:?}"
                );
                assert!(
                    !again.matches(&labels(l)),
                    "{parsed} should not match {l:?}"
                );
            }
        }
        let long = "a".repeat(MAX_LABEL_BYTES);
        assert!(Selector::parse(&format!("{long} == 'v'")).is_ok());
        let e = Selector::parse(&format!("{long}a == 'v'")).unwrap_err();
        assert!(e.expected.contains("512 bytes"), "{e}");
        for bad in [
            "b == b",
            "b contains b",
            "b starts with b",
            "b ends with b",
            "'b1' == b",
            "b",
            "a b",
            "!",
            r#"foo == "bar" &"#,
            r#"foo == "bar" |"#,
            "foo != ||",
            r#"foo in {"", ||"#,
            r#"foo in """#,
            r#""FOO"#,
            r#""FOO'"#,
            "'FOO",
            "(",
            r#"(a == "foo""#,
            ")",
            "()",
            "%",
            r#"a == "b" && %"#,
            r#"a == "b" || %"#,
            "a ",
            "has(foo) &&",
            r#"label == "value"#,
            "label == 'value",
            r#"label = "value""#,
            "all(",
            "global(",
            "has()",
            "has(foo",
            "has( foo ",
            r#"a == "b" & has(foo)"#,
            r#"a == "b" | has(foo)"#,
            r#"label starts foo "value""#,
            r#"label inf "value""#,
            r#"label ends foo "value""#,
            r#"label ends withs "value""#,
            r#"label squiggles "value""#,
            // Not spaces: a newline is not whitespace; `has (`, `all ()` are a label and garbage.
            "a == 'x'\n",
            "has (a)",
            "all ()",
            "global ()",
            "a in {,}",
            "a in {'x',,}",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should be refused");
        }
        // Calico's canonicalisation tests, as equivalences.
        for (a, b) in [
            (" (all() )", "all()"),
            ("! (has( b)||! has(a ))", "!(has(b) || !has(a))"),
            (r#"! (a == "b"&&! c != "d")"#, r#"!(a == "b" && !c != "d")"#),
            (r#"a startswith '"'"#, r#"a starts with '"'"#),
            (r#"a endswith "'""#, r#"a ends with "'""#),
            (r#"a!='"'"#, r#"a != '"'"#),
            (
                r#"a in {"z", "z", "x", "y", "x", "a"}"#,
                r#"a in {"a", "x", "y", "z"}"#,
            ),
        ] {
            assert_eq!(
                Selector::parse(a).unwrap(),
                Selector::parse(b).unwrap(),
                "{a}"
            );
        }
    }

    /// The longest selector is a chain of thousands of terms: one node, not a tree as deep as
    /// the chain, so matching, printing, copying and dropping it need no deep stack.
    #[test]
    fn a_long_chain_is_one_node_and_needs_no_deep_stack() {
        for op in ["&&", "||"] {
            let term = "a == 'b' ";
            let n = MAX_SELECTOR_CHARS / (term.len() + 3);
            let text = vec![term; n].join(&format!("{op} "));
            assert!(text.chars().count() <= MAX_SELECTOR_CHARS);
            let handle = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let sel = Selector::parse(&text).unwrap();
                    let labels = labels(&[("a", "b")]);
                    assert!(sel.matches(&labels));
                    let again = Selector::parse(&sel.to_string()).unwrap();
                    assert_eq!(again, sel.clone().for_rule_namespaces());
                    match &sel {
                        Selector::And(v) | Selector::Or(v) => v.len(),
                        _ => 0,
                    }
                })
                .unwrap();
            assert!(handle.join().unwrap() > 5000, "{op}");
        }
    }

    #[test]
    fn where_global_may_stand_and_what_it_means_there() {
        assert!(Selector::check_rule_namespace_text("global()").is_ok());
        assert!(Selector::check_rule_namespace_text(" global(\t) ").is_ok());
        assert!(Selector::check_rule_namespace_text("a == 'b' && all()").is_ok());
        for bad in [
            "global() || a == 'b'",
            "!global()",
            "(global())",
            "a == 'global('",
        ] {
            assert!(Selector::check_rule_namespace_text(bad).is_err(), "{bad}");
        }
        assert!(Selector::check_outside_rule_namespaces("a == 'b'").is_ok());
        let e = Selector::check_outside_rule_namespaces("global()").unwrap_err();
        assert_eq!(e, GLOBAL_ONLY_IN_RULE_NAMESPACES);
        // In a rule's namespaces, all() is every namespace and global() none, at any depth.
        let ns = labels(&[(NAMESPACED_LABEL, "shop"), ("env", "prod")]);
        let none = labels(&[]);
        let r = |t: &str| Selector::parse(t).unwrap().for_rule_namespaces();
        assert!(r("all()").matches(&ns) && !r("all()").matches(&none));
        assert!(!r("global()").matches(&ns) && r("global()").matches(&none));
        assert!(r("!all()").matches(&none) && !r("!all()").matches(&ns));
        assert!(r("env == 'prod' && all()").matches(&ns));
        assert!(!r("(env == 'x' || all()) && !all()").matches(&ns));
    }

    fn arb_selector() -> impl Strategy<Value = Selector> {
        let key = "[a-z][a-z0-9./_-]{0,8}";
        let val = "[a-zA-Z0-9 ._-]{0,6}";
        let leaf = prop_oneof![
            Just(Selector::All),
            Just(Selector::Global),
            (key, val).prop_map(|(k, v)| Selector::Eq(k, v)),
            (key, val).prop_map(|(k, v)| Selector::Ne(k, v)),
            (key, proptest::collection::btree_set(val, 0..3)).prop_map(|(k, v)| Selector::In(k, v)),
            (key, proptest::collection::btree_set(val, 0..3))
                .prop_map(|(k, v)| Selector::NotIn(k, v)),
            key.prop_map(Selector::Has),
            (key, val).prop_map(|(k, v)| Selector::Contains(k, v)),
            (key, val).prop_map(|(k, v)| Selector::StartsWith(k, v)),
            (key, val).prop_map(|(k, v)| Selector::EndsWith(k, v)),
        ];
        leaf.prop_recursive(4, 16, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Selector::Not(Box::new(e))),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| Selector::And(vec![a, b])),
                (inner.clone(), inner.clone(), inner)
                    .prop_map(|(a, b, c)| Selector::Or(vec![a, b, c])),
            ]
        })
    }

    proptest! {
        #[test]
        fn display_parses_back_to_the_same_selector(sel in arb_selector()) {
            let text = sel.to_string();
            prop_assert_eq!(Selector::parse(&text).unwrap(), sel);
        }

        #[test]
        fn printing_never_nests_deeper_than_the_input(depth in 1usize..=MAX_DEPTH) {
            let text = format!("{}a == 'b'", "!".repeat(depth));
            let sel = Selector::parse(&text).unwrap();
            prop_assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
        }

        #[test]
        fn parse_never_panics(text in "[ -~]{0,60}") {
            let _ = Selector::parse(&text);
        }

        #[test]
        fn not_in_is_the_negation_of_in(
            vals in proptest::collection::btree_set("[a-c]", 0..3),
            l in proptest::option::of("[a-c]"),
        ) {
            let set: Vec<String> = vals.iter().map(|v| format!("'{v}'")).collect();
            let labels = l.map(|v| labels(&[("k", &v)])).unwrap_or_default();
            let a = Selector::parse(&format!("k in {{{}}}", set.join(","))).unwrap().matches(&labels);
            let b = Selector::parse(&format!("k not in {{{}}}", set.join(","))).unwrap().matches(&labels);
            prop_assert_eq!(a, !b);
        }
    }
}
