//! Calico's label selector language, the whole of it
//! (<https://docs.tigera.io/calico/latest/reference/resources/networkpolicy#selectors>):
//!
//! | expression | matches a label set where |
//! |---|---|
//! | `all()` | always (also the empty selector) |
//! | `global()` | the resource is not namespaced |
//! | `k == 'v'` | label `k` is `v` |
//! | `k != 'v'` | label `k` is absent or not `v` |
//! | `k in {'a', 'b'}` | label `k` is one of the values |
//! | `k not in {'a', 'b'}` | label `k` is absent or none of them |
//! | `has(k)` / `!has(k)` | label `k` is present / absent |
//! | `k contains 's'`, `k starts with 's'`, `k ends with 's'` | label `k` is present and so |
//! | `!e`, `e && e`, `e \|\| e`, `(e)` | not, and, or (`!` binds tightest, then `&&`, then `\|\|`) |
//!
//! Strings take single or double quotes. A parse error names the column (1-based) and what was
//! expected there.

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
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: expected {expected}, found {found}")]
pub struct SelectorError {
    /// 1-based column (in characters) of the offending token.
    pub column: usize,
    pub expected: String,
    pub found: String,
}

/// What a selector is matched against: labels, and whether the resource is namespaced.
pub trait Subject {
    fn label(&self, key: &str) -> Option<&str>;
    fn is_global(&self) -> bool {
        false
    }
}

impl Subject for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// The longest selector we parse; policies are written by people, not generated without bound.
pub const MAX_SELECTOR_CHARS: usize = 64 * 1024;
/// The deepest nesting of parentheses and `!` we accept (keeps recursion bounded).
pub const MAX_DEPTH: usize = 64;

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let chars: Vec<char> = text.chars().collect();
        if chars.len() > MAX_SELECTOR_CHARS {
            return Err(SelectorError {
                column: MAX_SELECTOR_CHARS + 1,
                expected: format!("at most {MAX_SELECTOR_CHARS} characters"),
                found: format!("{} characters", chars.len()),
            });
        }
        let mut p = Parser {
            s: chars,
            pos: 0,
            depth: 0,
        };
        p.skip_ws();
        if p.at_end() {
            return Ok(Selector::All);
        }
        let e = p.or()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("`&&`, `||` or the end"));
        }
        Ok(e)
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
            Selector::And(a, b) => a.pins(key) || b.pins(key),
            Selector::Or(a, b) => a.pins(key) && b.pins(key),
            _ => false,
        }
    }

    pub fn matches(&self, s: &impl Subject) -> bool {
        match self {
            Selector::All => true,
            Selector::Global => s.is_global(),
            Selector::Eq(k, v) => s.label(k) == Some(v.as_str()),
            Selector::Ne(k, v) => s.label(k) != Some(v.as_str()),
            Selector::In(k, vs) => s.label(k).is_some_and(|x| vs.contains(x)),
            Selector::NotIn(k, vs) => !s.label(k).is_some_and(|x| vs.contains(x)),
            Selector::Has(k) => s.label(k).is_some(),
            Selector::Contains(k, v) => s.label(k).is_some_and(|x| x.contains(v.as_str())),
            Selector::StartsWith(k, v) => s.label(k).is_some_and(|x| x.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => s.label(k).is_some_and(|x| x.ends_with(v.as_str())),
            Selector::Not(e) => !e.matches(s),
            Selector::And(a, b) => a.matches(s) && b.matches(s),
            Selector::Or(a, b) => a.matches(s) || b.matches(s),
        }
    }
}

struct Parser {
    s: Vec<char>,
    pos: usize,
    depth: usize,
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_./-".contains(c)
}

impl Parser {
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn peek(&self) -> Option<char> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn error(&self, expected: &str) -> SelectorError {
        let found = match self.peek() {
            None => "the end".to_string(),
            Some(_) => {
                let rest: String = self.s[self.pos..].iter().take(12).collect();
                format!("`{rest}`")
            }
        };
        SelectorError {
            column: self.pos + 1,
            expected: expected.to_string(),
            found,
        }
    }

    /// Consumes `tok` (after spaces) if it is next.
    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        let t: Vec<char> = tok.chars().collect();
        if self.s[self.pos..].starts_with(&t) {
            // A word token must not run on into a key (`has` vs `hash`).
            let word = t.last().is_some_and(|c| c.is_ascii_alphabetic());
            if word
                && self
                    .s
                    .get(self.pos + t.len())
                    .copied()
                    .is_some_and(is_key_char)
            {
                return false;
            }
            self.pos += t.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut e = self.and()?;
        while self.eat("||") {
            e = Selector::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut e = self.unary()?;
        while self.eat("&&") {
            e = Selector::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SelectorError>,
    ) -> Result<T, SelectorError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error(&format!("at most {MAX_DEPTH} levels of nesting")));
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        if self.peek() == Some('!') && self.s.get(self.pos + 1) != Some(&'=') {
            self.pos += 1;
            return self.nested(|p| Ok(Selector::Not(Box::new(p.unary()?))));
        }
        if self.eat("(") {
            let e = self.nested(|p| p.or())?;
            if !self.eat(")") {
                return Err(self.error("`)`"));
            }
            return Ok(e);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Selector, SelectorError> {
        if self.eat("all") {
            return self.empty_call(Selector::All);
        }
        if self.eat("global") {
            return self.empty_call(Selector::Global);
        }
        if self.eat("has") {
            if !self.eat("(") {
                return Err(self.error("`(` after has"));
            }
            let k = self.key()?;
            if !self.eat(")") {
                return Err(self.error("`)`"));
            }
            return Ok(Selector::Has(k));
        }
        let k = self.key()?;
        if self.eat("==") {
            return Ok(Selector::Eq(k, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::Ne(k, self.string()?));
        }
        if self.eat("not") {
            if !self.eat("in") {
                return Err(self.error("`in` after `not`"));
            }
            return Ok(Selector::NotIn(k, self.set()?));
        }
        if self.eat("in") {
            return Ok(Selector::In(k, self.set()?));
        }
        if self.eat("contains") {
            return Ok(Selector::Contains(k, self.string()?));
        }
        if self.eat("starts") {
            if !self.eat("with") {
                return Err(self.error("`with` after `starts`"));
            }
            return Ok(Selector::StartsWith(k, self.string()?));
        }
        if self.eat("ends") {
            if !self.eat("with") {
                return Err(self.error("`with` after `ends`"));
            }
            return Ok(Selector::EndsWith(k, self.string()?));
        }
        Err(self.error("an operator: ==, !=, in, not in, contains, starts with, ends with"))
    }

    fn empty_call(&mut self, e: Selector) -> Result<Selector, SelectorError> {
        if self.eat("(") && self.eat(")") {
            Ok(e)
        } else {
            Err(self.error("`()`"))
        }
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(is_key_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("a label key, all(), global(), has(...), `!` or `(`"));
        }
        Ok(self.s[start..self.pos].iter().collect())
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.error("a quoted string")),
        };
        let start = self.pos;
        self.pos += 1;
        let from = self.pos;
        while let Some(c) = self.peek() {
            if c == quote {
                let v: String = self.s[from..self.pos].iter().collect();
                self.pos += 1;
                return Ok(v);
            }
            self.pos += 1;
        }
        self.pos = start;
        Err(self.error("a closing quote"))
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        if !self.eat("{") {
            return Err(self.error("`{`"));
        }
        let mut vs = BTreeSet::new();
        if self.eat("}") {
            return Ok(vs);
        }
        loop {
            vs.insert(self.string()?);
            if self.eat("}") {
                return Ok(vs);
            }
            if !self.eat(",") {
                return Err(self.error("`,` or `}`"));
            }
        }
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
        let operand = |e: &Selector| match e {
            Selector::And(..) | Selector::Or(..) => format!("({e})"),
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
            // Both operators associate to the left: a right operand of the same kind, and any
            // `||` inside `&&`, needs parentheses.
            Selector::And(a, b) => {
                let left = match **a {
                    Selector::Or(..) => format!("({a})"),
                    _ => a.to_string(),
                };
                write!(f, "{left} && {}", operand(b))
            }
            Selector::Or(a, b) => {
                let right = match **b {
                    Selector::Or(..) => format!("({b})"),
                    _ => b.to_string(),
                };
                write!(f, "{a} || {right}")
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
        assert!(!m("global()", &l));
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
        assert!(
            Selector::parse(&"(".repeat(100)).is_err(),
            "nesting is bounded"
        );
        assert!(Selector::parse("a starts 'x'").is_err());
        assert!(Selector::parse("all(").is_err());
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
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Selector::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| Selector::Or(Box::new(a), Box::new(b))),
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
