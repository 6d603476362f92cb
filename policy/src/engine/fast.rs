//! The fast path: a policy set resolved against the identities of the mesh, decided without
//! allocating.

use super::*;

/// Why a fast-path verdict came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rule,
    /// Passed on by a Pass rule (`policy` and `rule` say which) or by a tier's `defaultAction:
    /// Pass` (`tier` says which), past the last tier.
    Pass,
    /// The end of tier `tier`, which selected the endpoint and whose rules decided nothing.
    EndOfTier,
    DefaultDeny,
    NoPolicy,
}

/// What audit mode makes of a denial ([`Compiled::audit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// Reported as a denial, passed.
    Passes,
    /// Denied by the enforced policies, with their verdict.
    Denied(FastVerdict),
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
    /// The tier of the deciding policy, or whose end decided.
    pub tier: u16,
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
    /// The named ports of the source and destination entities, resolved against the identities:
    /// (identity, protocol, port), sorted, for [`NamedPorts::SRC`] ... [`NamedPorts::DST_NOT`].
    named: NamedPorts,
}

/// (identity, protocol, port) of the named ports an entity names, for its ports and its
/// not-ports, at each end; sorted, looked up by binary search. Empty for the rules (nearly all)
/// that name no port.
#[derive(Clone, Default)]
struct NamedPorts([Vec<(u32, u8, u16)>; 4]);

impl NamedPorts {
    const SRC: usize = 0;
    const SRC_NOT: usize = 1;
    const DST: usize = 2;
    const DST_NOT: usize = 3;

    fn lists(r: &Rule) -> [&[String]; 4] {
        [
            &r.source.named_ports,
            &r.source.not_named_ports,
            &r.destination.named_ports,
            &r.destination.not_named_ports,
        ]
    }

    /// Adds identity `i`'s named ports that rule `r` names; `i` is larger than every identity
    /// added before, so sorting what it adds keeps the list sorted.
    fn add(&mut self, r: &Rule, i: u32, e: &Endpoint) {
        for (list, names) in self.0.iter_mut().zip(NamedPorts::lists(r)) {
            if names.is_empty() {
                continue;
            }
            let before = list.len();
            for np in e.ports.iter().filter(|np| names.contains(&np.name)) {
                list.push((i, np.protocol, np.port));
            }
            list[before..].sort_unstable();
        }
    }

    #[inline]
    fn has(&self, which: usize, idx: u32, protocol: u8, port: Option<u16>) -> bool {
        let list = &self.0[which];
        !list.is_empty() && port.is_some_and(|pt| list.binary_search(&(idx, protocol, pt)).is_ok())
    }
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
    /// Per policy: its tier (policies are in tier order).
    tier_of: Vec<u16>,
    /// Per tier: whether its end passes on, what a denial at its end is called, and what a pass
    /// by its end is called.
    tiers: Vec<(bool, String, String)>,
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
                    named: {
                        let mut named = NamedPorts::default();
                        for (i, e) in identities.iter().enumerate() {
                            named.add(r, i as u32, e);
                        }
                        named
                    },
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
            tier_of: self.policies.iter().map(|p| p.tier as u16).collect(),
            tiers: self
                .tiers
                .iter()
                .map(|t| (t.pass, t.end_name(), format!("tier {}", t.name)))
                .collect(),
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
        self.walk(direction, flow, (src, src_ip), (dst, dst_ip), false)
    }

    /// [`Compiled::decide`]; with `skip_audit`, as if the policies in audit mode were not there.
    fn walk(
        &self,
        direction: Direction,
        flow: &Flow,
        (src, src_ip): (u32, Option<IpAddr>),
        (dst, dst_ip): (u32, Option<IpAddr>),
        skip_audit: bool,
    ) -> FastVerdict {
        let local = match direction {
            Direction::Ingress => dst,
            Direction::Egress => src,
        };
        let d = slot(direction);
        let mut logged = false;
        let done = |allow, reason, policy, rule, tier, logged| FastVerdict {
            allow,
            reason,
            policy,
            rule,
            logged,
            tier,
        };
        let Some(list) = self.applicable.get(local as usize).map(|a| &a[d]) else {
            return done(false, Reason::DefaultDeny, None, None, 0, logged);
        };
        // Calico's posture lets through what no policy selects, but never for another trust
        // domain's identity.
        let calico = self.posture == Posture::Calico
            && !self.remote.get(local as usize).copied().unwrap_or(true);
        // The last pass: (policy, rule, tier).
        let mut passed: Option<(Option<u32>, Option<u16>, u16)> = None;
        let mut k = 0;
        while k < list.len() {
            let tier = self.tier_of[list[k] as usize];
            let (mut tier_passed, mut tier_selected) = (false, false);
            while k < list.len() && self.tier_of[list[k] as usize] == tier {
                let pi = list[k];
                k += 1;
                if tier_passed || (skip_audit && self.audit[pi as usize]) {
                    continue;
                }
                tier_selected = true;
                for (ri, r) in self.rules[pi as usize][d].iter().enumerate() {
                    let named = |which, idx, port| r.named.has(which, idx, flow.protocol, port);
                    let (sp, dp) = (flow.src_port, flow.dst_port);
                    let hit = r.rule.header_matches(flow)
                        && r.rule.source.header_matches(
                            src_ip,
                            sp,
                            named(NamedPorts::SRC, src, sp),
                            named(NamedPorts::SRC_NOT, src, sp),
                        )
                        && r.rule.destination.header_matches(
                            dst_ip,
                            dp,
                            named(NamedPorts::DST, dst, dp),
                            named(NamedPorts::DST_NOT, dst, dp),
                        )
                        && self.end_selected(&r.src, &r.src_nets, r.src_open, src, src_ip)
                        && self.end_selected(&r.dst, &r.dst_nets, r.dst_open, dst, dst_ip);
                    if !hit {
                        continue;
                    }
                    let (p, ri) = (Some(pi), Some(ri as u16));
                    match r.rule.action {
                        Action::Log => logged = true,
                        Action::Allow => return done(true, Reason::Rule, p, ri, tier, logged),
                        Action::Deny => return done(false, Reason::Rule, p, ri, tier, logged),
                        Action::Pass => {
                            passed = Some((p, ri, tier));
                            tier_passed = true;
                            break;
                        }
                    }
                }
            }
            if tier_passed || !tier_selected {
                continue;
            }
            if !self.tiers[tier as usize].0 {
                return done(false, Reason::EndOfTier, None, None, tier, logged);
            }
            passed = Some((None, None, tier));
        }
        match passed {
            Some((p, ri, tier)) => done(calico, Reason::Pass, p, ri, tier, logged),
            None if calico => done(true, Reason::NoPolicy, None, None, 0, logged),
            None => done(false, Reason::DefaultDeny, None, None, 0, logged),
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
                        cr.named.add(r, i as u32, e);
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

    /// The deciding policy's name, for logs: a policy, `end-of-policies` (the end of the
    /// `default` tier), `end-of-tier TIER`, `tier TIER` (passed on by its end), `default-deny` or
    /// `no-policy`.
    pub fn policy_name(&self, v: &FastVerdict) -> &str {
        let tier = self.tiers.get(v.tier as usize);
        match (v.reason, v.policy) {
            (_, Some(i)) => &self.ids[i as usize],
            (Reason::DefaultDeny, None) => "default-deny",
            (Reason::NoPolicy, None) => "no-policy",
            (Reason::EndOfTier, None) => tier.map_or("end-of-policies", |t| t.1.as_str()),
            (Reason::Pass, None) => tier.map_or("end-of-policies", |t| t.2.as_str()),
            (Reason::Rule, None) => "end-of-policies",
        }
    }

    pub fn policies(&self) -> usize {
        self.ids.len()
    }

    /// The rate limit of the rule that allowed a flow (`v`, decided in `direction`), if it has
    /// one ([`crate::ratelimit`]).
    #[inline]
    pub fn limit(&self, direction: Direction, v: &FastVerdict) -> Option<&RateLimit> {
        if !v.allow || v.reason != Reason::Rule {
            return None;
        }
        let rules = self.rules.get(v.policy? as usize)?;
        rules[slot(direction)]
            .get(usize::from(v.rule?))?
            .rule
            .limit
            .as_ref()
    }

    /// Whether any rule of the set has a rate limit.
    pub fn has_limits(&self) -> bool {
        self.rules
            .iter()
            .flatten()
            .flatten()
            .any(|r| r.rule.limit.is_some())
    }

    /// What policies in audit mode ([`crate::model::AUDIT_ANNOTATION`]) make of the denial `v`
    /// of a flow ([`Compiled::decide`] with the same arguments). Their denials are reported, not
    /// enforced, but they never switch off the policies that are enforced: a denial that an
    /// audit-mode policy decided (its Deny or Pass, or the end of a tier of audit-mode policies
    /// alone) is decided again as if no policy were in audit mode. The flow passes, audited, if
    /// that allows it or if audit-mode policies alone select the identity (a log-only rollout);
    /// otherwise the enforced verdict stands. `None`: the denial is not an audit-mode policy's.
    pub fn audit(
        &self,
        direction: Direction,
        flow: &Flow,
        src: (u32, Option<IpAddr>),
        dst: (u32, Option<IpAddr>),
        v: &FastVerdict,
    ) -> Option<Audit> {
        if v.allow {
            return None;
        }
        let local = match direction {
            Direction::Ingress => dst.0,
            Direction::Egress => src.0,
        };
        let list = &self.applicable.get(local as usize)?[slot(direction)];
        let by_audit = match (v.reason, v.policy) {
            (Reason::Rule | Reason::Pass, Some(p)) => self.audit[p as usize],
            (Reason::EndOfTier, None) => list
                .iter()
                .filter(|&&p| self.tier_of[p as usize] == v.tier)
                .all(|&p| self.audit[p as usize]),
            _ => false,
        };
        if !by_audit {
            return None;
        }
        let enforced = self.walk(direction, flow, src, dst, true);
        if enforced.allow || list.iter().all(|&p| self.audit[p as usize]) {
            Some(Audit::Passes)
        } else {
            Some(Audit::Denied(enforced))
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
