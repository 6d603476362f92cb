//! Policy compilation and evaluation, pure. Documents (Calico and Kubernetes) compile into one
//! form: policies with a tier, a selector, an order and ingress/egress rules; every selector is
//! parsed once, here. `decide` evaluates one direction for one endpoint the way Calico does:
//! tier by tier (by the tier's order, then name), the tiers in which a policy selects the endpoint
//! and has that direction among its types; within a tier, policies by order (then name); within a
//! policy, rules in order. The first Allow or Deny decides, Log records and goes on, Pass skips the
//! rest of the tier. A tier that selects the endpoint and whose rules decide nothing ends in its
//! `defaultAction`: Deny (`end-of-policies` in the `default` tier, `end-of-tier TIER` in another),
//! or Pass to the next tier. Past the last tier (everything passed) or where no policy selects the
//! endpoint, the posture decides (zero trust: deny; Calico: allow, as its profiles do).
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
    ProtocolValue, StagedAction,
};
use crate::ratelimit::RateLimit;
use crate::selector::{Selector, Subject, NAMESPACED_LABEL};
use proto::cert::NamedPort;
use proto::trust::{Federation, TRUST_DOMAIN_LABEL};
use proto::Cidr;
use std::collections::BTreeMap;
use std::net::IpAddr;

mod compile;
mod fast;

pub use fast::{Audit, Compiled, FastVerdict, Reason};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SCTP: u8 = 132;
pub const UDPLITE: u8 = 136;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    /// Its certificate's named ports, which rules that name a port match.
    pub ports: Vec<NamedPort>,
}

/// The label Calico gives every workload endpoint for its service account
/// (`apiv3.LabelServiceAccount`), so that a policy's `selector` can select by it.
pub const SERVICE_ACCOUNT_LABEL: &str = "projectcalico.org/serviceaccount";

/// An identity's labels are its certificate's, and the implicit ones its certificate's fields
/// give it, which no label of the certificate can override: `mesh.io/trust-domain`, and as
/// Calico labels every workload endpoint, `projectcalico.org/namespace` and
/// `projectcalico.org/serviceaccount`.
impl Subject for Endpoint {
    fn label(&self, key: &str) -> Option<&str> {
        match key {
            TRUST_DOMAIN_LABEL => Some(&self.trust_domain),
            NAMESPACED_LABEL => Some(&self.namespace),
            SERVICE_ACCOUNT_LABEL => Some(&self.name),
            _ => self.labels.get(key).map(String::as_str),
        }
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

/// The tier every policy without `spec.tier` is in, and every Kubernetes policy.
pub const DEFAULT_TIER: &str = "default";
/// The `default` tier's order, and a tier's without one, as Calico defaults them.
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;

/// A tier, as the set evaluates it.
#[derive(Debug, Clone, PartialEq)]
struct Tier {
    name: String,
    order: f64,
    /// `defaultAction: Pass`: the end of the tier goes on to the next tier instead of denying.
    pass: bool,
}

impl Tier {
    /// What denies at the end of the tier, as verdicts name it.
    fn end_name(&self) -> String {
        if self.name == DEFAULT_TIER {
            "end-of-policies".into()
        } else {
            format!("end-of-tier {}", self.name)
        }
    }
}

#[derive(Debug, Clone)]
struct Policy {
    id: String,
    /// The name it sorts by among policies of equal order: its id, or for a staged policy the
    /// name of the policy it would be once promoted, so the staged view orders it as promotion
    /// would.
    sort_name: String,
    /// Index into [`PolicySet::tiers`].
    tier: usize,
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
    /// Rate limits by source identity ([`crate::ratelimit`]); only on Allow rules.
    limit: Option<RateLimit>,
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

    /// Nets and ports: what is checked per packet. `named` / `not_named`: whether the end's
    /// identity has one of the entity's named ports / not-ports at this flow's protocol and port
    /// (the caller looks them up: they are the identity's).
    fn header_matches(
        &self,
        ip: Option<IpAddr>,
        port: Option<u16>,
        named: bool,
        not_named: bool,
    ) -> bool {
        let in_any = |nets: &[Cidr]| ip.is_some_and(|ip| nets.iter().any(|c| c.contains(ip)));
        let port_in = |r: &[(u16, u16)]| {
            port.is_some_and(|pt| r.iter().any(|(a, b)| (*a..=*b).contains(&pt)))
        };
        // An empty not-list excludes nothing, as in_any/port_in of an empty list is false.
        (self.nets.is_empty() || in_any(&self.nets))
            && !in_any(&self.not_nets)
            && ((self.ports.is_empty() && self.named_ports.is_empty())
                || port_in(&self.ports)
                || named)
            && !(port_in(&self.not_ports) || not_named)
    }

    /// Whether identity `e` has one of `names` as a named port at `protocol` and `port`.
    fn named_port(names: &[String], e: &Endpoint, protocol: u8, port: Option<u16>) -> bool {
        !names.is_empty()
            && port.is_some_and(|pt| {
                e.ports
                    .iter()
                    .any(|np| np.protocol == protocol && np.port == pt && names.contains(&np.name))
            })
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
    /// Port names (`ports: [http]`): the end's identity's named ports.
    named_ports: Vec<String>,
    not_named_ports: Vec<String>,
    /// A Calico rule's entity: its selectors may select external networks too.
    calico: bool,
}

/// A compiled policy set and the namespace labels it matches against.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Sorted by tier, then order, then name: the order of evaluation.
    policies: Vec<Policy>,
    /// Sorted by order, then name; `default` always among them.
    tiers: Vec<Tier>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    federations: Vec<Federation>,
    networks: Vec<Network>,
    pub posture: Posture,
    /// The trust domain whose identities the policies are written for: the node's own. Set it
    /// before evaluating ([`PolicySet::in_trust_domain`]); every other is remote.
    pub trust_domain: String,
    /// The `PolicyTest` objects of the set (object name, cases): they decide nothing.
    pub tests: Vec<(String, crate::testing::PolicyTestSpec)>,
    /// Staged policies (`stagedAction: Set`): they decide nothing; [`PolicySet::staged_view`].
    staged: Vec<Policy>,
    /// The enforced policies the staged view leaves out, by object name: those a staged policy
    /// replaces or deletes.
    staged_deletes: Vec<String>,
}

/// The order of evaluation: by tier, then order, then name.
fn sort_policies(policies: &mut [Policy]) {
    policies.sort_by(|a, b| {
        (a.tier.cmp(&b.tier))
            .then(a.order.total_cmp(&b.order))
            .then_with(|| a.sort_name.cmp(&b.sort_name))
            .then_with(|| a.id.cmp(&b.id))
    });
}

impl PolicySet {
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

    /// Whether the set stages any change ([`PolicySet::staged_view`]).
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty() || !self.staged_deletes.is_empty()
    }

    /// What the set would decide with its staged changes enforced: the enforced policies and the
    /// staged ones together, in tier and policy order (as Calico's flow logs evaluate staged
    /// policies), where a staged policy stands in place of the enforced policy of the same kind,
    /// namespace and name (its promotion), and a staged `Delete` leaves that policy out. `None` if
    /// nothing is staged.
    pub fn staged_view(&self) -> Option<PolicySet> {
        if !self.has_staged() {
            return None;
        }
        let mut view = self.clone();
        view.policies
            .retain(|p| !self.staged_deletes.contains(&p.id));
        view.policies.append(&mut view.staged);
        view.staged_deletes.clear();
        sort_policies(&mut view.policies);
        Some(view)
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

    fn entity_matches(
        &self,
        p: &Policy,
        ent: &Entity,
        end: End,
        protocol: u8,
        port: Option<u16>,
    ) -> bool {
        match end {
            End::Identity(e) => {
                let named = Entity::named_port(&ent.named_ports, e, protocol, port);
                let not_named = Entity::named_port(&ent.not_named_ports, e, protocol, port);
                ent.header_matches(e.ip, port, named, not_named)
                    && self.selects(p, ent, e).unwrap_or(true)
            }
            // An address outside the mesh has no named ports.
            End::External(ip) => {
                ent.header_matches(Some(ip), port, false, false)
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
            && self.entity_matches(p, &r.source, src, flow.protocol, flow.src_port)
            && self.entity_matches(p, &r.destination, dst, flow.protocol, flow.dst_port)
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
        // Who passed the flow on last: a policy's Pass rule or a tier's defaultAction.
        let mut passed: Option<(String, Option<String>)> = None;
        let dir = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        for (t, tier) in self.tiers.iter().enumerate() {
            let (mut selected, mut tier_passed) = (false, false);
            'tier: for p in self.policies.iter().filter(|p| p.tier == t) {
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
                    let rule = Some(format!("{dir}[{i}]"));
                    let decided = |allow| Verdict {
                        allow,
                        by: p.id.clone(),
                        rule: rule.clone(),
                        logged: logged.clone(),
                    };
                    match r.action {
                        Action::Log => logged.push(p.id.clone()),
                        Action::Allow => return decided(true),
                        Action::Deny => return decided(false),
                        Action::Pass => {
                            passed = Some((format!("passed by {}", p.id), rule));
                            tier_passed = true;
                            break 'tier;
                        }
                    }
                }
            }
            if !selected || tier_passed {
                continue;
            }
            if tier.pass {
                passed = Some((format!("passed by tier {}", tier.name), None));
                continue;
            }
            return Verdict {
                allow: false,
                by: tier.end_name(),
                rule: None,
                logged,
            };
        }
        if let Some((by, rule)) = passed {
            return Verdict {
                allow: self.posture == Posture::Calico && self.is_local(local),
                by,
                rule,
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

#[cfg(test)]
mod tests;
