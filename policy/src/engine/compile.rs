//! Documents (Calico, Kubernetes, ours) compiled into policies: every field checked, every
//! selector parsed once, every error reported with the object and the field.

use super::*;
use crate::ratelimit::{self, RATE_LIMIT_ANNOTATION};

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
        // Each policy's tier, by name, until every Tier is read.
        let mut tier_of: Vec<(String, String)> = Vec::new();
        let mut staged_tier_of: Vec<(String, String)> = Vec::new();
        for d in docs {
            let id = d.object_name();
            let ns = || {
                d.metadata()
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into())
            };
            let staged_action = match d {
                Document::CalicoNetworkPolicy { spec, .. }
                | Document::CalicoGlobalNetworkPolicy { spec, .. } => spec.staged_action.as_ref(),
                Document::K8sNetworkPolicy { spec, .. } => spec.staged_action.as_ref(),
                _ => None,
            };
            if staged_action.is_some() {
                errors.push(CompileError {
                    policy: id.clone(),
                    field: "spec.stagedAction".into(),
                    message: "only the Staged kinds have a stagedAction".into(),
                });
            }
            let r = match d {
                Document::Staged { action, policy } => {
                    match staged(&id, *action, policy) {
                        Ok(Staged::Delete(name)) => set.staged_deletes.push(name),
                        Ok(Staged::Set(p, tier)) => {
                            // The staged version of an enforced policy stands in its place.
                            set.staged_deletes.push(policy.object_name());
                            staged_tier_of.push((p.id.clone(), tier));
                            set.staged.push(*p);
                        }
                        Err(mut e) => errors.append(&mut e),
                    }
                    Ok(None)
                }
                Document::Namespace { metadata } => {
                    set.namespaces
                        .insert(metadata.name.clone(), metadata.labels.clone());
                    Ok(None)
                }
                Document::Tier { metadata, spec } => {
                    match tier(&id, &metadata.name, spec) {
                        Ok(t) if set.tiers.iter().any(|x| x.name == t.name) => {
                            errors.push(CompileError {
                                policy: id.clone(),
                                field: "metadata.name".into(),
                                message: "a second Tier of this name".into(),
                            })
                        }
                        Ok(t) => set.tiers.push(t),
                        Err(e) => errors.push(e),
                    }
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
            let r = r.and_then(|p| match p {
                Some(p) => with_rate_limits(&id, d, p).map(Some),
                None => Ok(None),
            });
            match r {
                Ok(Some(p)) => {
                    let tier = match d {
                        Document::CalicoNetworkPolicy { spec, .. }
                        | Document::CalicoGlobalNetworkPolicy { spec, .. } => spec.tier.clone(),
                        _ => None,
                    };
                    tier_of.push((p.id.clone(), tier.unwrap_or_else(|| DEFAULT_TIER.into())));
                    set.policies.push(p)
                }
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
        if !set.tiers.iter().any(|t| t.name == DEFAULT_TIER) {
            set.tiers.push(Tier {
                name: DEFAULT_TIER.into(),
                order: DEFAULT_TIER_ORDER,
                pass: false,
            });
        }
        set.tiers.sort_by(|a, b| {
            a.order
                .total_cmp(&b.order)
                .then_with(|| a.name.cmp(&b.name))
        });
        tier_of.append(&mut staged_tier_of);
        for (p, (id, name)) in set.policies.iter_mut().chain(&mut set.staged).zip(&tier_of) {
            match set.tiers.iter().position(|t| t.name == *name) {
                Some(i) => p.tier = i,
                None => errors.push(CompileError {
                    policy: id.clone(),
                    field: "spec.tier".into(),
                    message: format!("there is no Tier `{name}` in the set"),
                }),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        sort_policies(&mut set.policies);
        Ok(set)
    }
}

/// `p` with the rate limits of its document's [`RATE_LIMIT_ANNOTATION`], each on an Allow rule
/// of a Calico policy (a Kubernetes rule expands to one per peer and port, so its rules have no
/// index to name).
fn with_rate_limits(id: &str, d: &Document, mut p: Policy) -> Result<Policy, Vec<CompileError>> {
    let Some(value) = d.metadata().annotations.get(RATE_LIMIT_ANNOTATION) else {
        return Ok(p);
    };
    let err = |message: String| {
        vec![CompileError {
            policy: id.to_string(),
            field: format!("metadata.annotations[{RATE_LIMIT_ANNOTATION}]"),
            message,
        }]
    };
    if matches!(d, Document::K8sNetworkPolicy { .. }) {
        return Err(err(
            "rate limits are for Calico policies: a Kubernetes rule has no single rule to limit"
                .into(),
        ));
    }
    for ((dir, i), limit) in ratelimit::parse(value).map_err(err)? {
        let rules = match dir {
            Direction::Ingress => p.ingress.as_mut(),
            Direction::Egress => p.egress.as_mut(),
        };
        let name = match dir {
            Direction::Ingress => format!("ingress[{i}]"),
            Direction::Egress => format!("egress[{i}]"),
        };
        match rules.and_then(|r| r.get_mut(i)) {
            Some(r) if r.action == Action::Allow => r.limit = Some(limit),
            Some(_) => {
                return Err(err(format!(
                    "{name} is not an Allow rule: only what is allowed can be limited"
                )))
            }
            None => return Err(err(format!("the policy has no rule {name}"))),
        }
    }
    Ok(p)
}

/// Rules of one policy in one direction at most (a Kubernetes rule counts once per peer and
/// port): every rule is resolved against every identity, and verdicts name rules by a u16.
pub const MAX_RULES: usize = 10_000;

/// Refuses a direction of a policy with more than [`MAX_RULES`] rules.
fn bounded(ctx: &Ctx, dir: &str, n: usize) -> Result<(), CompileError> {
    if n > MAX_RULES {
        return Err(ctx.at(dir).err(format!(
            "{n} rules (Kubernetes: one per peer and port); at most {MAX_RULES}"
        )));
    }
    Ok(())
}

/// What a staged document stages.
enum Staged {
    /// The object name of the enforced policy left out.
    Delete(String),
    /// A policy, and its tier's name.
    Set(Box<Policy>, String),
}

/// A staged policy (`id` is its object name, `StagedNetworkPolicy NS/NAME`, ...): compiled as its
/// enforced kind would be; a `Delete` has no fields but `tier` and `stagedAction`, as Calico's
/// validator requires.
fn staged(id: &str, action: StagedAction, policy: &Document) -> Result<Staged, Vec<CompileError>> {
    let ns = || {
        policy
            .metadata()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    };
    let zero = match policy {
        Document::CalicoNetworkPolicy { spec, .. }
        | Document::CalicoGlobalNetworkPolicy { spec, .. } => {
            *spec
                == CalicoSpec {
                    tier: spec.tier.clone(),
                    staged_action: spec.staged_action.clone(),
                    ..CalicoSpec::default()
                }
        }
        Document::K8sNetworkPolicy { spec, .. } => {
            *spec
                == K8sSpec {
                    staged_action: spec.staged_action.clone(),
                    ..K8sSpec::default()
                }
        }
        _ => false,
    };
    if action == StagedAction::Delete {
        if !zero {
            return Err(vec![CompileError {
                policy: id.into(),
                field: "spec".into(),
                message: "a staged Delete has no fields but tier and stagedAction".into(),
            }]);
        }
        return Ok(Staged::Delete(policy.object_name()));
    }
    let (p, tier) = match policy {
        Document::CalicoNetworkPolicy { spec, .. } => (calico(id, Some(ns()), spec)?, &spec.tier),
        Document::CalicoGlobalNetworkPolicy { spec, .. } => (calico(id, None, spec)?, &spec.tier),
        Document::K8sNetworkPolicy { spec, .. } => (k8s(id, ns(), spec)?, &None),
        _ => {
            return Err(vec![CompileError {
                policy: id.into(),
                field: String::new(),
                message: "only a policy can be staged".into(),
            }])
        }
    };
    let p = Policy {
        sort_name: policy.object_name(),
        ..p
    };
    Ok(Staged::Set(
        Box::new(p),
        tier.clone().unwrap_or_else(|| DEFAULT_TIER.into()),
    ))
}

/// A Tier object: Calico's defaults (order 1,000,000, `Deny`) and rules (the `default` tier's
/// order is 1,000,000).
fn tier(id: &str, name: &str, spec: &model::TierSpec) -> Result<Tier, CompileError> {
    let ctx = Ctx {
        policy: id,
        field: "spec".into(),
    };
    let order = spec.order.unwrap_or(DEFAULT_TIER_ORDER);
    if !order.is_finite() {
        return Err(ctx.at("order").err(format!("{order} is not a number")));
    }
    if name == DEFAULT_TIER && order != DEFAULT_TIER_ORDER {
        return Err(ctx.at("order").err("the default tier's order is 1000000"));
    }
    let pass = match spec.default_action.as_deref() {
        None | Some("Deny") => false,
        Some("Pass") => true,
        Some(a) => {
            return Err(ctx
                .at("defaultAction")
                .err(format!("`{a}` is not Deny or Pass")))
        }
    };
    Ok(Tier {
        name: name.to_string(),
        order,
        pass,
    })
}

fn protocol(ctx: &Ctx, v: &Option<ProtocolValue>) -> Result<Option<u8>, CompileError> {
    v.as_ref()
        .map(|p| crate::testing::protocol_number(p).map_err(|e| ctx.err(e)))
        .transpose()
}

/// Ports and ranges, and port names (an identity's named ports, matched per identity).
type Ports = (Vec<(u16, u16)>, Vec<String>);

fn port_ranges(ctx: &Ctx, ports: &[PortValue]) -> Result<Ports, CompileError> {
    let (mut ranges, mut names) = (Vec::new(), Vec::new());
    for p in ports {
        match p {
            PortValue::Number(n) => ranges.push((*n, *n)),
            PortValue::Text(t) => {
                let parsed = match t.split_once(':') {
                    Some((a, b)) => a
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .zip(b.trim().parse::<u16>().ok()),
                    None => t.trim().parse::<u16>().ok().map(|n| (n, n)),
                };
                let named = NamedPort {
                    name: t.clone(),
                    protocol: TCP,
                    port: 1,
                };
                match parsed {
                    Some((a, b)) if a <= b => ranges.push((a, b)),
                    None if named.validate().is_ok() => names.push(t.clone()),
                    _ => {
                        return Err(ctx.err(format!(
                            "`{t}` is not a port, a range like 8000:8080 or a port name (1-15 of a-z 0-9 -)"
                        )))
                    }
                }
            }
        }
    }
    Ok((ranges, names))
}

fn nets(ctx: &Ctx, v: &[String]) -> Result<Vec<Cidr>, CompileError> {
    v.iter()
        .map(|n| n.parse().map_err(|e| ctx.err(format!("`{n}`: {e}"))))
        .collect()
}

fn entity(ctx: &Ctx, e: &EntityRule, proto: Option<u8>) -> Result<Entity, CompileError> {
    let (ports, named_ports) = port_ranges(&ctx.at("ports"), &e.ports)?;
    let (not_ports, not_named_ports) = port_ranges(&ctx.at("notPorts"), &e.not_ports)?;
    // Numbers need the rule's protocol; a named port alone carries its own (Calico 3.32), but
    // not under a protocol that has no ports.
    if (!ports.is_empty() || !not_ports.is_empty())
        && !matches!(proto, Some(TCP | UDP | SCTP | UDPLITE))
    {
        return Err(ctx.err("ports need protocol TCP, UDP, SCTP or UDPLite on the rule"));
    }
    if (!named_ports.is_empty() || !not_named_ports.is_empty())
        && !matches!(proto, None | Some(TCP | UDP | SCTP))
    {
        return Err(ctx.err("named ports need protocol TCP, UDP or SCTP on the rule, or none"));
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
        named_ports,
        not_named_ports,
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
        limit: None,
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
    for (list, dir) in [(&spec.ingress, "ingress"), (&spec.egress, "egress")] {
        if let Err(e) = bounded(&ctx, dir, list.len()) {
            return Err(vec![e]);
        }
    }
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
        tier: 0,
        sort_name: id.to_string(),
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
    Ok(Selector::all_of(parts))
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
            let (mut proto, mut ranges, mut names) = (None, Vec::new(), Vec::new());
            if let Some(p) = port {
                let name = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                proto = protocol(&tctx.at("protocol"), &Some(ProtocolValue::Name(name)))?;
                if let Some(pv) = &p.port {
                    (ranges, names) = port_ranges(&tctx.at("port"), std::slice::from_ref(pv))?;
                    if !names.is_empty() && p.end_port.is_some() {
                        return Err(tctx
                            .at("endPort")
                            .err("a named port has no range: endPort needs a number"));
                    }
                    if let Some(end) = p.end_port.filter(|_| !ranges.is_empty()) {
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
            let side = if ingress {
                &mut local_side
            } else {
                &mut peer_side
            };
            side.ports = ranges;
            side.named_ports = names;
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
                limit: None,
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
    // Each rule expands to one per peer and port: count before building any.
    let count = |peers: &Option<Vec<K8sPeer>>, ports: &Option<Vec<model::K8sPort>>| {
        let n = |l: Option<usize>| l.filter(|&n| n > 0).unwrap_or(1);
        n(peers.as_ref().map(Vec::len)).saturating_mul(n(ports.as_ref().map(Vec::len)))
    };
    let ins: usize = (spec.ingress.iter().flatten())
        .map(|r| count(&r.from, &r.ports))
        .fold(0, usize::saturating_add);
    let outs: usize = (spec.egress.iter().flatten())
        .map(|r| count(&r.to, &r.ports))
        .fold(0, usize::saturating_add);
    bounded(&ctx, "ingress", ins).map_err(one)?;
    bounded(&ctx, "egress", outs).map_err(one)?;
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
        tier: 0,
        sort_name: id.to_string(),
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
