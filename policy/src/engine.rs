//! Policy compilation and evaluation, pure. Documents (Calico and Kubernetes) compile into one
//! form: policies with a selector, an order and ingress/egress rules; every selector is parsed once,
//! here. `decide` evaluates one direction for one endpoint the way Calico does: policies that select
//! the endpoint, by order (then name); within a policy, rules in order; the first Allow or Deny
//! decides, Log records and goes on, Pass leaves the policies. If policies select the endpoint and
//! none allows, the flow is denied; if none selects it, the posture decides (zero trust: deny).
//!
//! Trust domains: every identity carries the label `mesh.io/trust-domain` (from its certificate,
//! never from its labels), also among its namespace's labels. An identity of another trust domain
//! than the set's own ([`PolicySet::trust_domain`]) is selected only by a policy or rule one of
//! whose selectors pins that label (`==`, `in` or a string match, in every alternative:
//! [`Selector::pins`]): policies written for local identities never match a remote one, however
//! alike its namespace, name and labels, and neither do rules that select no identities in
//! particular (`source: {}`, `nets` alone). No posture lets a remote identity through: with no
//! policy for it, it is denied also under Calico's posture.
//!
//! External networks: an address outside the mesh is an [`End::External`]. Calico rules select it
//! as Calico selects network sets: by `nets`/`notNets`, or by a selector matching the labels of an
//! external network (a `NetworkSet`, `GlobalNetworkSet`, `ExternalNetwork` or
//! `GlobalExternalNetwork`) that contains the address. A namespaced policy's selector sees the
//! networks of its namespace; a global policy's, every network; `namespaceSelector` picks
//! namespaced networks by their namespace's labels, or global ones with `global()`. Service
//! accounts and Kubernetes pod selectors never match an external address. No policy governs an
//! external end: only the mesh end's direction is decided.

use crate::model::{
    self, CalicoRule, CalicoSpec, Document, EntityRule, K8sPeer, K8sSpec, LabelSelector, PortValue,
    ProtocolValue,
};
use crate::selector::{Selector, Subject, NAMESPACED_LABEL};
use proto::trust::{Federation, TRUST_DOMAIN_LABEL};
use proto::Cidr;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SCTP: u8 = 132;
pub const UDPLITE: u8 = 136;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
    Pass,
}

/// What no policy selects gets: zero trust denies it; Calico's posture allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Posture {
    #[default]
    ZeroTrust,
    Calico,
}

/// An endpoint as policy sees it: from its certificate, and its overlay address if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub trust_domain: String,
    pub namespace: String,
    /// The service account.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<IpAddr>,
}

impl Subject for Endpoint {
    fn label(&self, key: &str) -> Option<&str> {
        if key == TRUST_DOMAIN_LABEL {
            return Some(&self.trust_domain);
        }
        self.labels.get(key).map(String::as_str)
    }
}

impl Endpoint {
    /// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/NAME`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.name
        )
    }
}

/// One end of a flow: an identity of the mesh, or an address outside it.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    Identity(&'a Endpoint),
    External(IpAddr),
}

/// An external network: a named set of addresses outside the mesh, with labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The object name: `GlobalNetworkSet NAME`, `ExternalNetwork NS/NAME`, ...
    pub name: String,
    /// `None` for a global one.
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub nets: Vec<Cidr>,
}

impl Subject for Network {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|c| c.contains(ip))
    }
}

/// What a rule's `namespaceSelector` is matched against for a global network: no namespace, no
/// labels (not even [`NAMESPACED_LABEL`]).
struct NoNamespace;

impl Subject for NoNamespace {
    fn label(&self, _: &str) -> Option<&str> {
        None
    }
}

/// The identity index that stands for an address outside the mesh in [`Compiled::decide`].
pub const EXTERNAL: u32 = u32::MAX - 1;
/// The identity index of a peer without an identity (a plain WireGuard peer): matched only by
/// rules that select no identity in particular (`{}`, `nets`, ports).
pub const UNKNOWN: u32 = u32::MAX;

/// Whether one of `selectors` pins the trust domain ([`Selector::pins`]): only then may what they
/// select include identities of another trust domain.
fn names_trust_domain<'a>(selectors: impl IntoIterator<Item = &'a Option<Selector>>) -> bool {
    selectors
        .into_iter()
        .flatten()
        .any(|s| s.pins(TRUST_DOMAIN_LABEL))
}

/// The headers of a flow that rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub protocol: u8,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
    pub ip_version: u8,
}

/// The decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    /// `Kind ns/name` of the deciding policy, or `default-deny` / `no-policy` / `end-of-policies`.
    pub by: String,
    /// `ingress[i]` / `egress[i]` of the deciding rule.
    pub rule: Option<String>,
    /// Policies whose Log rules matched on the way.
    pub logged: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {field}: {message}")]
pub struct CompileError {
    pub policy: String,
    pub field: String,
    pub message: String,
}

impl CompileError {
    /// The error with the file, line and column of its field, when its policy's origin is
    /// known: `FILE:LINE:COLUMN: document N (POLICY): FIELD: MESSAGE`.
    pub fn at(&self, origin: Option<&crate::model::Origin>) -> String {
        match origin {
            Some(o) => format!(
                "{} ({}): {}: {}",
                o.at(&self.field),
                self.policy,
                self.field,
                self.message
            ),
            None => self.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
struct Policy {
    id: String,
    namespace: Option<String>,
    order: f64,
    selector: Selector,
    namespace_selector: Option<Selector>,
    sa_selector: Option<Selector>,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
    /// Audit mode ([`crate::model::AUDIT_ANNOTATION`]): its denials are reported, not enforced.
    audit: bool,
}

impl Policy {
    /// Whether the policy may apply to identities of another trust domain.
    fn names_trust_domain(&self) -> bool {
        self.selector.pins(TRUST_DOMAIN_LABEL)
            || names_trust_domain([&self.namespace_selector, &self.sa_selector])
    }
}

#[derive(Debug, Clone)]
struct Rule {
    action: Action,
    protocol: Option<u8>,
    not_protocol: Option<u8>,
    icmp: Option<(Option<u8>, Option<u8>)>,
    not_icmp: Option<(Option<u8>, Option<u8>)>,
    ip_version: Option<u8>,
    source: Entity,
    destination: Entity,
}

impl Rule {
    /// Protocol, ICMP and IP-version conditions.
    fn header_matches(&self, flow: &Flow) -> bool {
        if self.protocol.is_some_and(|x| x != flow.protocol)
            || self.not_protocol == Some(flow.protocol)
        {
            return false;
        }
        if self.ip_version.is_some_and(|v| v != flow.ip_version) {
            return false;
        }
        let icmp_match = |m: &(Option<u8>, Option<u8>)| {
            flow.icmp
                .is_some_and(|(t, c)| m.0.is_none_or(|x| x == t) && m.1.is_none_or(|x| x == c))
        };
        !(self.icmp.as_ref().is_some_and(|m| !icmp_match(m))
            || self.not_icmp.as_ref().is_some_and(icmp_match))
    }
}

impl Entity {
    /// Whether the entity names endpoints (selectors, namespace, service accounts) at all, as
    /// opposed to only nets and ports, or nothing.
    fn selects_endpoints(&self) -> bool {
        self.selector.is_some()
            || self.not_selector.is_some()
            || self.namespace_selector.is_some()
            || self.sa_selector.is_some()
            || !self.sa_names.is_empty()
    }

    /// Whether the entity may match identities of another trust domain: one of its positive
    /// selectors pins the trust domain (a `notSelector` only excludes).
    fn names_trust_domain(&self) -> bool {
        names_trust_domain([&self.selector, &self.namespace_selector, &self.sa_selector])
    }

    /// Nets and ports: what is checked per packet, not per identity.
    fn header_matches(&self, ip: Option<IpAddr>, port: Option<u16>) -> bool {
        let in_any = |nets: &[Cidr]| ip.is_some_and(|ip| nets.iter().any(|c| c.contains(ip)));
        let port_in = |r: &[(u16, u16)]| {
            port.is_some_and(|pt| r.iter().any(|(a, b)| (*a..=*b).contains(&pt)))
        };
        // An empty not-list excludes nothing, as in_any/port_in of an empty list is false.
        (self.nets.is_empty() || in_any(&self.nets))
            && !in_any(&self.not_nets)
            && (self.ports.is_empty() || port_in(&self.ports))
            && !port_in(&self.not_ports)
    }
}

#[derive(Debug, Clone, Default)]
struct Entity {
    nets: Vec<Cidr>,
    not_nets: Vec<Cidr>,
    selector: Option<Selector>,
    not_selector: Option<Selector>,
    namespace_selector: Option<Selector>,
    sa_names: Vec<String>,
    sa_selector: Option<Selector>,
    ports: Vec<(u16, u16)>,
    not_ports: Vec<(u16, u16)>,
    /// A Calico rule's entity: its selectors may select external networks too.
    calico: bool,
}

/// A compiled policy set and the namespace labels it matches against.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    federations: Vec<Federation>,
    networks: Vec<Network>,
    pub posture: Posture,
    /// The trust domain whose identities the policies are written for: the node's own. Set it
    /// before evaluating ([`PolicySet::in_trust_domain`]); every other is remote.
    pub trust_domain: String,
    /// The `PolicyTest` objects of the set (object name, cases): they decide nothing.
    pub tests: Vec<(String, crate::testing::PolicyTestSpec)>,
}

struct Ctx<'a> {
    policy: &'a str,
    field: String,
}

impl Ctx<'_> {
    fn err(&self, message: impl Into<String>) -> CompileError {
        CompileError {
            policy: self.policy.to_string(),
            field: self.field.clone(),
            message: message.into(),
        }
    }
    fn at(&self, field: &str) -> Ctx<'_> {
        Ctx {
            policy: self.policy,
            field: if self.field.is_empty() {
                field.to_string()
            } else {
                format!("{}.{field}", self.field)
            },
        }
    }
    /// A selector anywhere but a rule's `namespaceSelector`: Calico refuses `global()` there.
    fn selector(&self, text: &Option<String>) -> Result<Option<Selector>, CompileError> {
        text.as_ref()
            .map(|t| {
                Selector::check_outside_rule_namespaces(t)
                    .map_err(|e| self.err(format!("selector `{t}`: {e}")))?;
                Selector::parse(t).map_err(|e| self.err(format!("selector `{t}`: {e}")))
            })
            .transpose()
    }

    /// A rule's `namespaceSelector`, as Calico means it ([`Selector::for_rule_namespaces`]);
    /// empty is none (the policy's own namespace).
    fn rule_namespaces(&self, text: &Option<String>) -> Result<Option<Selector>, CompileError> {
        let Some(t) = text.as_ref().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        Selector::check_rule_namespace_text(t)
            .map_err(|e| self.err(format!("selector `{t}`: {e}")))?;
        let s = Selector::parse(t).map_err(|e| self.err(format!("selector `{t}`: {e}")))?;
        Ok(Some(s.for_rule_namespaces()))
    }

    /// A selector Calico evaluates as written, where `global()` matches everything (a rule's
    /// `notSelector`, `serviceAccounts.selector`).
    fn any_selector(&self, text: &Option<String>) -> Result<Option<Selector>, CompileError> {
        text.as_ref()
            .map(|t| Selector::parse(t).map_err(|e| self.err(format!("selector `{t}`: {e}"))))
            .transpose()
    }
}

impl PolicySet {
    /// Compiles documents into a policy set; every error is reported, and nothing is compiled if
    /// any document is wrong.
    pub fn compile(docs: &[Document], posture: Posture) -> Result<PolicySet, Vec<CompileError>> {
        let mut set = PolicySet {
            posture,
            ..PolicySet::default()
        };
        let mut errors = Vec::new();
        for d in docs {
            let id = d.object_name();
            let ns = || {
                d.metadata()
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into())
            };
            let r = match d {
                Document::Namespace { metadata } => {
                    set.namespaces
                        .insert(metadata.name.clone(), metadata.labels.clone());
                    Ok(None)
                }
                Document::CalicoNetworkPolicy { spec, .. } => {
                    calico(&id, Some(ns()), spec).map(Some)
                }
                Document::CalicoGlobalNetworkPolicy { spec, .. } => {
                    calico(&id, None, spec).map(Some)
                }
                Document::K8sNetworkPolicy { spec, .. } => k8s(&id, ns(), spec).map(Some),
                Document::Network { metadata, spec, .. } => {
                    let ctx = Ctx {
                        policy: &id,
                        field: "spec.nets".into(),
                    };
                    match nets(&ctx, &spec.nets) {
                        Ok(cidrs) if cidrs.is_empty() => {
                            errors.push(ctx.err("an external network needs at least one address"))
                        }
                        Ok(cidrs) => set.networks.push(Network {
                            name: id.clone(),
                            namespace: match d {
                                Document::Network { global: true, .. } => None,
                                _ => Some(ns()),
                            },
                            labels: metadata.labels.clone(),
                            nets: cidrs,
                        }),
                        Err(e) => errors.push(e),
                    }
                    Ok(None)
                }
                Document::PolicyTest { spec, .. } => {
                    set.tests.push((id.clone(), spec.clone()));
                    Ok(None)
                }
                Document::Federation { metadata, spec } => {
                    match crate::federation::federation(&metadata.name, spec) {
                        Ok(f) => set.federations.push(f),
                        Err(e) => errors.push(CompileError {
                            policy: id.clone(),
                            field: e.field,
                            message: e.message,
                        }),
                    }
                    Ok(None)
                }
            };
            let r = r.map(|p| {
                p.map(|mut p| {
                    p.audit = d
                        .metadata()
                        .annotations
                        .get(crate::model::AUDIT_ANNOTATION)
                        .is_some_and(|v| v == "true");
                    p
                })
            });
            match r {
                Ok(Some(p)) => set.policies.push(p),
                Ok(None) => {}
                Err(mut e) => errors.append(&mut e),
            }
        }
        // Two clusters never share an address: each federation's ranges are its own.
        for (i, f) in set.federations.iter().enumerate() {
            for g in &set.federations[..i] {
                if let Some((a, b)) = f
                    .addresses
                    .iter()
                    .find_map(|a| g.addresses.iter().find(|b| a.overlaps(b)).map(|b| (a, b)))
                {
                    errors.push(CompileError {
                        policy: format!("Federation {}", f.trust_domain),
                        field: "spec.addresses".into(),
                        message: format!(
                            "{a} overlaps {b} of federation {}: two trust domains never share an address",
                            g.trust_domain
                        ),
                    });
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        set.policies
            .sort_by(|a, b| a.order.total_cmp(&b.order).then_with(|| a.id.cmp(&b.id)));
        Ok(set)
    }

    /// The set, for identities of `trust_domain` (see [`PolicySet::trust_domain`]).
    pub fn in_trust_domain(mut self, trust_domain: &str) -> PolicySet {
        self.trust_domain = trust_domain.to_string();
        self
    }

    /// The external networks of the set.
    pub fn networks(&self) -> &[Network] {
        &self.networks
    }

    /// The (protocol, destination port) pairs the rules name, which a connectivity diff probes:
    /// each range's first and last port, `None` for a rule without ports (a rule without a
    /// protocol is probed as TCP).
    pub fn probes(&self) -> std::collections::BTreeSet<(u8, Option<u16>)> {
        let mut out = std::collections::BTreeSet::new();
        let rules = self
            .policies
            .iter()
            .flat_map(|p| p.ingress.iter().chain(p.egress.iter()).flatten());
        for r in rules {
            let protocol = r.protocol.unwrap_or(TCP);
            let ranges: Vec<&(u16, u16)> = r
                .destination
                .ports
                .iter()
                .chain(&r.destination.not_ports)
                .collect();
            if ranges.is_empty() {
                out.insert((protocol, None));
            }
            for (a, b) in ranges {
                out.insert((protocol, Some(*a)));
                out.insert((protocol, Some(*b)));
            }
        }
        out
    }

    /// The other clusters' CAs the set trusts, and within what scope.
    pub fn federations(&self) -> &[Federation] {
        &self.federations
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The labels of `e`'s namespace: the set's Namespace labels for a local identity (a remote
    /// cluster's namespace is not ours, whatever its name), with Calico's implicit
    /// `projectcalico.org/name`, Kubernetes' `kubernetes.io/metadata.name` and the trust domain.
    fn namespace_labels(&self, e: &Endpoint) -> BTreeMap<String, String> {
        let ns = &e.namespace;
        let mut l = if self.is_local(e) {
            self.namespaces.get(ns).cloned().unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        l.insert("projectcalico.org/name".into(), ns.to_string());
        l.insert("kubernetes.io/metadata.name".into(), ns.to_string());
        l.insert(NAMESPACED_LABEL.into(), ns.to_string());
        l.insert(TRUST_DOMAIN_LABEL.into(), e.trust_domain.clone());
        l
    }

    fn is_local(&self, e: &Endpoint) -> bool {
        e.trust_domain == self.trust_domain
    }

    fn applies(&self, p: &Policy, e: &Endpoint) -> bool {
        if !self.is_local(e) && !p.names_trust_domain() {
            return false;
        }
        if let Some(ns) = &p.namespace {
            if *ns != e.namespace {
                return false;
            }
        }
        if let Some(nsel) = &p.namespace_selector {
            if !nsel.matches(&self.namespace_labels(e)) {
                return false;
            }
        }
        if let Some(sa) = &p.sa_selector {
            if !sa.matches(e) {
                return false;
            }
        }
        p.selector.matches(e)
    }

    fn entity_matches(&self, p: &Policy, ent: &Entity, end: End, port: Option<u16>) -> bool {
        match end {
            End::Identity(e) => {
                ent.header_matches(e.ip, port) && self.selects(p, ent, e).unwrap_or(true)
            }
            End::External(ip) => {
                ent.header_matches(Some(ip), port)
                    && (!ent.selects_endpoints()
                        || self
                            .networks
                            .iter()
                            .any(|n| n.contains(ip) && self.selects_network(p, ent, n)))
            }
        }
    }

    /// Whether an entity that selects endpoints selects external network `n`, as Calico's rule
    /// selectors select network sets.
    fn selects_network(&self, p: &Policy, ent: &Entity, n: &Network) -> bool {
        if !ent.calico || !ent.sa_names.is_empty() || ent.sa_selector.is_some() {
            return false;
        }
        let in_namespace = match (&ent.namespace_selector, &n.namespace) {
            (Some(nsel), None) => nsel.matches(&NoNamespace),
            (Some(nsel), Some(ns)) => {
                let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
                labels.insert("projectcalico.org/name".into(), ns.clone());
                labels.insert("kubernetes.io/metadata.name".into(), ns.clone());
                labels.insert(NAMESPACED_LABEL.into(), ns.clone());
                nsel.matches(&labels)
            }
            (None, _) => p.namespace.is_none() || p.namespace == n.namespace,
        };
        in_namespace
            && ent.selector.as_ref().is_none_or(|s| s.matches(n))
            && !ent.not_selector.as_ref().is_some_and(|s| s.matches(n))
    }

    /// Whether the entity's endpoint part (selectors, namespace, service accounts) matches `e`;
    /// `None` if the entity selects no endpoints in particular (only nets and ports, or nothing).
    /// A remote identity is matched only by an entity whose selectors name the trust domain.
    fn selects(&self, p: &Policy, ent: &Entity, e: &Endpoint) -> Option<bool> {
        if !self.is_local(e) && !ent.names_trust_domain() {
            return Some(false);
        }
        if !ent.selects_endpoints() {
            return None;
        }
        let in_namespace = match &ent.namespace_selector {
            Some(nsel) => nsel.matches(&self.namespace_labels(e)),
            None => p.namespace.as_ref().is_none_or(|ns| *ns == e.namespace),
        };
        Some(
            in_namespace
                && ent.selector.as_ref().is_none_or(|s| s.matches(e))
                && !ent.not_selector.as_ref().is_some_and(|s| s.matches(e))
                && (ent.sa_names.is_empty() || ent.sa_names.contains(&e.name))
                && ent.sa_selector.as_ref().is_none_or(|s| s.matches(e)),
        )
    }

    fn rule_matches(&self, p: &Policy, r: &Rule, flow: &Flow, src: End, dst: End) -> bool {
        r.header_matches(flow)
            && self.entity_matches(p, &r.source, src, flow.src_port)
            && self.entity_matches(p, &r.destination, dst, flow.dst_port)
    }

    /// The verdict for `flow` from `src` to `dst` in `direction`: egress is evaluated for `src`,
    /// ingress for `dst`.
    pub fn decide(
        &self,
        direction: Direction,
        flow: &Flow,
        src: &Endpoint,
        dst: &Endpoint,
    ) -> Verdict {
        self.decide_ends(direction, flow, End::Identity(src), End::Identity(dst))
    }

    /// [`PolicySet::decide`] where either end may be outside the mesh. The end whose direction is
    /// decided must be an identity: nothing governs an external one (denied, `outside-the-mesh`,
    /// if asked).
    pub fn decide_ends(&self, direction: Direction, flow: &Flow, src: End, dst: End) -> Verdict {
        let local = match (direction, src, dst) {
            (Direction::Ingress, _, End::Identity(e))
            | (Direction::Egress, End::Identity(e), _) => e,
            _ => {
                return Verdict {
                    allow: false,
                    by: "outside-the-mesh".into(),
                    rule: None,
                    logged: Vec::new(),
                }
            }
        };
        let mut logged = Vec::new();
        let mut selected = false;
        for p in &self.policies {
            let rules = match direction {
                Direction::Ingress => &p.ingress,
                Direction::Egress => &p.egress,
            };
            let Some(rules) = rules else { continue };
            if !self.applies(p, local) {
                continue;
            }
            selected = true;
            for (i, r) in rules.iter().enumerate() {
                if !self.rule_matches(p, r, flow, src, dst) {
                    continue;
                }
                let rule = Some(format!(
                    "{}[{i}]",
                    if direction == Direction::Ingress {
                        "ingress"
                    } else {
                        "egress"
                    }
                ));
                match r.action {
                    Action::Log => logged.push(p.id.clone()),
                    Action::Allow => {
                        return Verdict {
                            allow: true,
                            by: p.id.clone(),
                            rule,
                            logged,
                        }
                    }
                    Action::Deny => {
                        return Verdict {
                            allow: false,
                            by: p.id.clone(),
                            rule,
                            logged,
                        }
                    }
                    Action::Pass => {
                        return Verdict {
                            allow: self.posture == Posture::Calico && self.is_local(local),
                            by: format!("passed by {}", p.id),
                            rule,
                            logged,
                        }
                    }
                }
            }
        }
        if selected {
            return Verdict {
                allow: false,
                by: "end-of-policies".into(),
                rule: None,
                logged,
            };
        }
        match self.posture {
            Posture::Calico if self.is_local(local) => Verdict {
                allow: true,
                by: "no-policy".into(),
                rule: None,
                logged,
            },
            _ => Verdict {
                allow: false,
                by: "default-deny".into(),
                rule: None,
                logged,
            },
        }
    }
}

/// Why a fast-path verdict came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rule,
    Pass,
    EndOfPolicies,
    DefaultDeny,
    NoPolicy,
}

/// A verdict without allocation: indices into the compiled set, names resolved on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastVerdict {
    pub allow: bool,
    pub reason: Reason,
    pub policy: Option<u32>,
    pub rule: Option<u16>,
    /// A Log rule matched on the way.
    pub logged: bool,
}

#[derive(Clone)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        if i / 64 >= self.0.len() {
            self.0.resize(i / 64 + 1, 0);
        }
        self.0[i / 64] |= 1 << (i % 64);
    }
    #[inline]
    fn has(&self, i: u32) -> bool {
        self.0
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

#[derive(Clone)]
struct CompiledRule {
    rule: Rule,
    /// Identities the source / destination entity selects; `None` for any.
    src: Option<BitSet>,
    dst: Option<BitSet>,
    /// External networks the source / destination entity selects; `None` for any address.
    src_nets: Option<BitSet>,
    dst_nets: Option<BitSet>,
    /// The source / destination entity selects no identity in particular.
    src_open: bool,
    dst_open: bool,
}

/// A policy set resolved against the identities of the mesh: every selector evaluated once per
/// identity ahead of time, so a verdict is a walk over the few policies that apply to one
/// identity, with set lookups instead of selector evaluation. Rebuilt when policies or identities
/// change.
#[derive(Clone)]
pub struct Compiled {
    ids: Vec<String>,
    rules: Vec<[Vec<CompiledRule>; 2]>,
    /// Per identity: the policies that apply to it, [ingress, egress], in order.
    applicable: Vec<[Vec<u32>; 2]>,
    /// Per policy: in audit mode.
    audit: Vec<bool>,
    posture: Posture,
    /// Per identity: of another trust domain (never let through by the posture).
    remote: Vec<bool>,
    /// Every address of every external network, with the network's index, most specific first;
    /// and the networks' names.
    network_nets: Vec<(Cidr, u32)>,
    network_names: Vec<String>,
}

fn slot(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl PolicySet {
    /// Resolves the set against `identities` (identity `i` is index `i`).
    pub fn resolve(&self, identities: &[Endpoint]) -> Compiled {
        let n = identities.len();
        let any_remote = identities.iter().any(|e| !self.is_local(e));
        let members = |p: &Policy, ent: &Entity| -> Option<BitSet> {
            if !ent.selects_endpoints() && !any_remote {
                return None;
            }
            let mut set = BitSet::new(n);
            for (i, e) in identities.iter().enumerate() {
                if self.selects(p, ent, e).unwrap_or(true) {
                    set.set(i);
                }
            }
            Some(set)
        };
        let networks = |p: &Policy, ent: &Entity| -> Option<BitSet> {
            if !ent.selects_endpoints() {
                return None;
            }
            let mut set = BitSet::new(self.networks.len());
            for (i, n) in self.networks.iter().enumerate() {
                if self.selects_network(p, ent, n) {
                    set.set(i);
                }
            }
            Some(set)
        };
        let compile_rules = |p: &Policy, rules: &Option<Vec<Rule>>| -> Vec<CompiledRule> {
            rules
                .iter()
                .flatten()
                .map(|r| CompiledRule {
                    rule: r.clone(),
                    src: members(p, &r.source),
                    dst: members(p, &r.destination),
                    src_nets: networks(p, &r.source),
                    dst_nets: networks(p, &r.destination),
                    src_open: !r.source.selects_endpoints(),
                    dst_open: !r.destination.selects_endpoints(),
                })
                .collect()
        };
        let mut network_nets: Vec<(Cidr, u32)> = self
            .networks
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.nets.iter().map(move |c| (*c, i as u32)))
            .collect();
        network_nets.sort_by_key(|(c, _)| std::cmp::Reverse(c.prefix_len()));
        let mut applicable = vec![[Vec::new(), Vec::new()]; n];
        for (pi, p) in self.policies.iter().enumerate() {
            for (i, e) in identities.iter().enumerate() {
                if self.applies(p, e) {
                    if p.ingress.is_some() {
                        applicable[i][0].push(pi as u32);
                    }
                    if p.egress.is_some() {
                        applicable[i][1].push(pi as u32);
                    }
                }
            }
        }
        Compiled {
            ids: self.policies.iter().map(|p| p.id.clone()).collect(),
            rules: self
                .policies
                .iter()
                .map(|p| [compile_rules(p, &p.ingress), compile_rules(p, &p.egress)])
                .collect(),
            applicable,
            audit: self.policies.iter().map(|p| p.audit).collect(),
            posture: self.posture,
            remote: identities.iter().map(|e| !self.is_local(e)).collect(),
            network_nets,
            network_names: self.networks.iter().map(|n| n.name.clone()).collect(),
        }
    }
}

impl Compiled {
    /// The verdict for a flow from identity `src` to identity `dst` (indices given to
    /// [`PolicySet::resolve`]); the same as [`PolicySet::decide`], without allocating.
    pub fn decide(
        &self,
        direction: Direction,
        flow: &Flow,
        src: u32,
        src_ip: Option<IpAddr>,
        dst: u32,
        dst_ip: Option<IpAddr>,
    ) -> FastVerdict {
        let local = match direction {
            Direction::Ingress => dst,
            Direction::Egress => src,
        };
        let d = slot(direction);
        let mut logged = false;
        let Some(list) = self.applicable.get(local as usize).map(|a| &a[d]) else {
            return FastVerdict {
                allow: false,
                reason: Reason::DefaultDeny,
                policy: None,
                rule: None,
                logged,
            };
        };
        // Calico's posture lets through what no policy selects, but never for another trust
        // domain's identity.
        let calico = self.posture == Posture::Calico
            && !self.remote.get(local as usize).copied().unwrap_or(true);
        for &pi in list {
            for (ri, r) in self.rules[pi as usize][d].iter().enumerate() {
                let hit = r.rule.header_matches(flow)
                    && r.rule.source.header_matches(src_ip, flow.src_port)
                    && r.rule.destination.header_matches(dst_ip, flow.dst_port)
                    && self.end_selected(&r.src, &r.src_nets, r.src_open, src, src_ip)
                    && self.end_selected(&r.dst, &r.dst_nets, r.dst_open, dst, dst_ip);
                if !hit {
                    continue;
                }
                let v = |allow, reason| FastVerdict {
                    allow,
                    reason,
                    policy: Some(pi),
                    rule: Some(ri as u16),
                    logged,
                };
                match r.rule.action {
                    Action::Log => logged = true,
                    Action::Allow => return v(true, Reason::Rule),
                    Action::Deny => return v(false, Reason::Rule),
                    Action::Pass => return v(calico, Reason::Pass),
                }
            }
        }
        let (allow, reason) = if !list.is_empty() {
            (false, Reason::EndOfPolicies)
        } else if calico {
            (true, Reason::NoPolicy)
        } else {
            (false, Reason::DefaultDeny)
        };
        FastVerdict {
            allow,
            reason,
            policy: None,
            rule: None,
            logged,
        }
    }

    /// Whether a rule's entity (its identities `ids`, its external networks `nets`; `open` if it
    /// selects no identity in particular) selects end `idx` ([`EXTERNAL`]: the address `ip`
    /// outside the mesh; [`UNKNOWN`]: a peer without an identity).
    #[inline]
    fn end_selected(
        &self,
        ids: &Option<BitSet>,
        nets: &Option<BitSet>,
        open: bool,
        idx: u32,
        ip: Option<IpAddr>,
    ) -> bool {
        if idx == UNKNOWN {
            return open;
        }
        if idx != EXTERNAL {
            return ids.as_ref().is_none_or(|s| s.has(idx));
        }
        match (nets, ip) {
            (None, _) => true,
            (Some(bits), Some(ip)) => self
                .network_nets
                .iter()
                .any(|(c, n)| bits.has(*n) && c.contains(ip)),
            (Some(_), None) => false,
        }
    }

    /// The external networks that contain `ip`, most specific first (for the flow log).
    pub fn networks_at(&self, ip: IpAddr) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for (c, n) in &self.network_nets {
            let name = self.network_names[*n as usize].as_str();
            if c.contains(ip) && !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// How many identities this was resolved against.
    pub fn identities(&self) -> usize {
        self.applicable.len()
    }

    /// Resolves `more` identities as well, numbered after those already resolved, exactly as
    /// [`PolicySet::resolve`] of the whole list would: one identity costs one pass over the
    /// policies, instead of a pass over every identity. `set` must be the set this was resolved
    /// from.
    pub fn extend(&mut self, set: &PolicySet, more: &[Endpoint]) {
        for e in more {
            let i = self.applicable.len();
            let mut applicable = [Vec::new(), Vec::new()];
            for (pi, p) in set.policies.iter().enumerate() {
                if set.applies(p, e) {
                    if p.ingress.is_some() {
                        applicable[0].push(pi as u32);
                    }
                    if p.egress.is_some() {
                        applicable[1].push(pi as u32);
                    }
                }
                for (d, rules) in [&p.ingress, &p.egress].into_iter().enumerate() {
                    for (cr, r) in self.rules[pi][d].iter_mut().zip(rules.iter().flatten()) {
                        for (bits, ent) in [(&mut cr.src, &r.source), (&mut cr.dst, &r.destination)]
                        {
                            let selected = set.selects(p, ent, e);
                            if bits.is_none() && selected == Some(false) {
                                // "Any" so far, but not this one: every earlier identity.
                                let mut all = BitSet::new(i + 1);
                                (0..i).for_each(|j| all.set(j));
                                *bits = Some(all);
                            }
                            if let Some(bits) = bits {
                                if selected.unwrap_or(true) {
                                    bits.set(i);
                                }
                            }
                        }
                    }
                }
            }
            self.applicable.push(applicable);
            self.remote.push(!set.is_local(e));
        }
    }

    /// The deciding policy's name, for logs.
    pub fn policy_name(&self, v: &FastVerdict) -> &str {
        match (v.reason, v.policy) {
            (_, Some(i)) => &self.ids[i as usize],
            (Reason::DefaultDeny, None) => "default-deny",
            (Reason::NoPolicy, None) => "no-policy",
            _ => "end-of-policies",
        }
    }

    pub fn policies(&self) -> usize {
        self.ids.len()
    }

    /// Whether the denial `v` of identity `local`'s traffic is only audited: decided by a policy
    /// in audit mode, or falling off the end of policies that are all in audit mode.
    pub fn audited(&self, direction: Direction, local: u32, v: &FastVerdict) -> bool {
        if v.allow {
            return false;
        }
        match (v.reason, v.policy) {
            (_, Some(p)) => self.audit.get(p as usize).copied().unwrap_or(false),
            (Reason::EndOfPolicies, None) => self
                .applicable
                .get(local as usize)
                .is_some_and(|a| a[slot(direction)].iter().all(|&p| self.audit[p as usize])),
            _ => false,
        }
    }

    /// `ingress[i]` / `egress[i]` of the deciding rule, for logs.
    pub fn rule_name(direction: Direction, v: &FastVerdict) -> Option<String> {
        let d = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        v.rule.map(|r| format!("{d}[{r}]"))
    }
}

fn protocol(ctx: &Ctx, v: &Option<ProtocolValue>) -> Result<Option<u8>, CompileError> {
    v.as_ref()
        .map(|p| crate::testing::protocol_number(p).map_err(|e| ctx.err(e)))
        .transpose()
}

fn port_ranges(ctx: &Ctx, ports: &[PortValue]) -> Result<Vec<(u16, u16)>, CompileError> {
    ports
        .iter()
        .map(|p| match p {
            PortValue::Number(n) => Ok((*n, *n)),
            PortValue::Text(t) => {
                let parsed = match t.split_once(':') {
                    Some((a, b)) => a.trim().parse::<u16>().ok().zip(b.trim().parse::<u16>().ok()),
                    None => t.trim().parse::<u16>().ok().map(|n| (n, n)),
                };
                match parsed {
                    Some((a, b)) if a <= b => Ok((a, b)),
                    _ => Err(ctx.err(format!("`{t}` is not a port or a range like 8000:8080 (named ports are not supported)"))),
                }
            }
        })
        .collect()
}

fn nets(ctx: &Ctx, v: &[String]) -> Result<Vec<Cidr>, CompileError> {
    v.iter()
        .map(|n| n.parse().map_err(|e| ctx.err(format!("`{n}`: {e}"))))
        .collect()
}

fn entity(ctx: &Ctx, e: &EntityRule, proto: Option<u8>) -> Result<Entity, CompileError> {
    let ports = port_ranges(&ctx.at("ports"), &e.ports)?;
    let not_ports = port_ranges(&ctx.at("notPorts"), &e.not_ports)?;
    if (!ports.is_empty() || !not_ports.is_empty())
        && !matches!(proto, Some(TCP | UDP | SCTP | UDPLITE))
    {
        return Err(ctx.err("ports need protocol TCP, UDP, SCTP or UDPLite on the rule"));
    }
    if e.services.is_some() {
        return Err(ctx
            .at("services")
            .err("Kubernetes service matches are not supported"));
    }
    let (sa_names, sa_selector) = match &e.service_accounts {
        Some(sa) => (
            sa.names.clone(),
            ctx.at("serviceAccounts.selector")
                .any_selector(&sa.selector)?,
        ),
        None => (vec![], None),
    };
    Ok(Entity {
        nets: nets(&ctx.at("nets"), &e.nets)?,
        not_nets: nets(&ctx.at("notNets"), &e.not_nets)?,
        selector: ctx.at("selector").selector(&e.selector)?,
        not_selector: ctx.at("notSelector").any_selector(&e.not_selector)?,
        namespace_selector: ctx
            .at("namespaceSelector")
            .rule_namespaces(&e.namespace_selector)?,
        sa_names,
        sa_selector,
        ports,
        not_ports,
        calico: true,
    })
}

fn rule(ctx: &Ctx, r: &CalicoRule) -> Result<Rule, CompileError> {
    let action = match r.action.as_str() {
        "Allow" => Action::Allow,
        "Deny" => Action::Deny,
        "Log" => Action::Log,
        "Pass" => Action::Pass,
        a => {
            return Err(ctx
                .at("action")
                .err(format!("`{a}` is not Allow, Deny, Log or Pass")))
        }
    };
    if r.http.is_some() {
        return Err(ctx.at("http").err("HTTP matches are not supported"));
    }
    let proto = protocol(&ctx.at("protocol"), &r.protocol)?;
    let icmp = |i: &Option<model::Icmp>| i.as_ref().map(|i| (i.icmp_type, i.code));
    if let Some(v) = r.ip_version {
        if v != 4 && v != 6 {
            return Err(ctx.at("ipVersion").err(format!("{v} is not 4 or 6")));
        }
    }
    Ok(Rule {
        action,
        protocol: proto,
        not_protocol: protocol(&ctx.at("notProtocol"), &r.not_protocol)?,
        icmp: icmp(&r.icmp),
        not_icmp: icmp(&r.not_icmp),
        ip_version: r.ip_version,
        source: entity(&ctx.at("source"), &r.source, proto)?,
        destination: entity(&ctx.at("destination"), &r.destination, proto)?,
    })
}

fn calico(
    id: &str,
    namespace: Option<String>,
    spec: &CalicoSpec,
) -> Result<Policy, Vec<CompileError>> {
    let ctx = Ctx {
        policy: id,
        field: "spec".into(),
    };
    let mut errors = Vec::new();
    let mut rules = |list: &[CalicoRule], dir: &str| -> Vec<Rule> {
        list.iter()
            .enumerate()
            .filter_map(|(i, r)| {
                rule(&ctx.at(&format!("{dir}[{i}]")), r)
                    .map_err(|e| errors.push(e))
                    .ok()
            })
            .collect()
    };
    let ingress = rules(&spec.ingress, "ingress");
    let egress = rules(&spec.egress, "egress");
    let types: Vec<String> = spec.types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_string()];
        if !spec.egress.is_empty() {
            t.push("Egress".into());
        }
        t
    });
    for t in &types {
        if t != "Ingress" && t != "Egress" {
            errors.push(
                ctx.at("types")
                    .err(format!("`{t}` is not Ingress or Egress")),
            );
        }
    }
    if spec.tier.as_deref().is_some_and(|t| t != "default") {
        errors.push(ctx.at("tier").err("only the default tier is supported"));
    }
    let selector = ctx
        .at("selector")
        .selector(&spec.selector)
        .map_err(|e| errors.push(e))
        .ok()
        .flatten();
    let namespace_selector = ctx
        .at("namespaceSelector")
        .selector(&spec.namespace_selector)
        .map_err(|e| errors.push(e))
        .ok()
        .flatten();
    let sa_selector = ctx
        .at("serviceAccountSelector")
        .selector(&spec.service_account_selector)
        .map_err(|e| errors.push(e))
        .ok()
        .flatten();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Policy {
        id: id.to_string(),
        namespace,
        order: spec.order.unwrap_or(f64::INFINITY),
        selector: selector.unwrap_or(Selector::All),
        namespace_selector,
        sa_selector,
        ingress: types.iter().any(|t| t == "Ingress").then_some(ingress),
        egress: types.iter().any(|t| t == "Egress").then_some(egress),
        audit: false,
    })
}

/// A Kubernetes label selector as a Calico selector.
fn label_selector(ctx: &Ctx, s: &LabelSelector) -> Result<Selector, CompileError> {
    let mut parts: Vec<Selector> = s
        .match_labels
        .iter()
        .map(|(k, v)| Selector::Eq(k.clone(), v.clone()))
        .collect();
    for (i, r) in s.match_expressions.iter().enumerate() {
        let values = r.values.iter().cloned().collect();
        parts.push(match r.operator.as_str() {
            "In" => Selector::In(r.key.clone(), values),
            "NotIn" => Selector::NotIn(r.key.clone(), values),
            "Exists" => Selector::Has(r.key.clone()),
            "DoesNotExist" => Selector::Not(Box::new(Selector::Has(r.key.clone()))),
            op => {
                return Err(ctx
                    .at(&format!("matchExpressions[{i}].operator"))
                    .err(format!("`{op}` is not In, NotIn, Exists or DoesNotExist")))
            }
        });
    }
    Ok(parts
        .into_iter()
        .reduce(|a, b| Selector::And(Box::new(a), Box::new(b)))
        .unwrap_or(Selector::All))
}

fn k8s_rules(
    ctx: &Ctx,
    peers: &Option<Vec<K8sPeer>>,
    ports: &Option<Vec<model::K8sPort>>,
    ingress: bool,
) -> Result<Vec<Rule>, CompileError> {
    // An absent or empty list matches everything.
    let peers: Vec<Option<&K8sPeer>> = match peers {
        Some(p) if !p.is_empty() => p.iter().map(Some).collect(),
        _ => vec![None],
    };
    let ports: Vec<Option<&model::K8sPort>> = match ports {
        Some(p) if !p.is_empty() => p.iter().map(Some).collect(),
        _ => vec![None],
    };
    let mut out = Vec::new();
    for (pi, peer) in peers.iter().enumerate() {
        let pctx = ctx.at(&format!("{}[{pi}]", if ingress { "from" } else { "to" }));
        let mut remote = Entity::default();
        if let Some(peer) = peer {
            if let Some(ps) = &peer.pod_selector {
                remote.selector = Some(label_selector(&pctx.at("podSelector"), ps)?);
            }
            if let Some(ns) = &peer.namespace_selector {
                remote.namespace_selector =
                    Some(label_selector(&pctx.at("namespaceSelector"), ns)?.for_rule_namespaces());
                remote.selector.get_or_insert(Selector::All);
            }
            if let Some(b) = &peer.ip_block {
                remote.nets = nets(&pctx.at("ipBlock.cidr"), std::slice::from_ref(&b.cidr))?;
                remote.not_nets = nets(&pctx.at("ipBlock.except"), &b.except)?;
            }
        }
        for (ti, port) in ports.iter().enumerate() {
            let tctx = ctx.at(&format!("ports[{ti}]"));
            let (mut proto, mut ranges) = (None, Vec::new());
            if let Some(p) = port {
                let name = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                proto = protocol(&tctx.at("protocol"), &Some(ProtocolValue::Name(name)))?;
                if let Some(pv) = &p.port {
                    ranges = port_ranges(&tctx.at("port"), std::slice::from_ref(pv))?;
                    if let Some(end) = p.end_port {
                        if end < ranges[0].0 {
                            return Err(tctx
                                .at("endPort")
                                .err(format!("{end} is below port {}", ranges[0].0)));
                        }
                        ranges[0].1 = end;
                    }
                }
            }
            // The port is the destination's: the local endpoint's on ingress, the peer's on egress.
            let mut peer_side = remote.clone();
            let mut local_side = Entity::default();
            if ingress {
                local_side.ports = ranges;
            } else {
                peer_side.ports = ranges;
            }
            let (source, destination) = if ingress {
                (peer_side, local_side)
            } else {
                (local_side, peer_side)
            };
            out.push(Rule {
                action: Action::Allow,
                protocol: proto,
                not_protocol: None,
                icmp: None,
                not_icmp: None,
                ip_version: None,
                source,
                destination,
            });
        }
    }
    Ok(out)
}

fn k8s(id: &str, namespace: String, spec: &K8sSpec) -> Result<Policy, Vec<CompileError>> {
    let ctx = Ctx {
        policy: id,
        field: "spec".into(),
    };
    let one = |e: CompileError| vec![e];
    let selector = label_selector(&ctx.at("podSelector"), &spec.pod_selector).map_err(one)?;
    let types: Vec<String> = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_string()];
        if spec.egress.is_some() {
            t.push("Egress".into());
        }
        t
    });
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.extend(
            k8s_rules(&ctx.at(&format!("ingress[{i}]")), &r.from, &r.ports, true).map_err(one)?,
        );
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.extend(
            k8s_rules(&ctx.at(&format!("egress[{i}]")), &r.to, &r.ports, false).map_err(one)?,
        );
    }
    for t in &types {
        if t != "Ingress" && t != "Egress" {
            return Err(one(ctx
                .at("policyTypes")
                .err(format!("`{t}` is not Ingress or Egress"))));
        }
    }
    Ok(Policy {
        id: id.to_string(),
        namespace: Some(namespace),
        // Calico orders Kubernetes policies at 1000.
        order: 1000.0,
        selector,
        namespace_selector: None,
        sa_selector: None,
        ingress: types.iter().any(|t| t == "Ingress").then_some(ingress),
        egress: types.iter().any(|t| t == "Egress").then_some(egress),
        audit: false,
    })
}

#[cfg(test)]
mod tests;
