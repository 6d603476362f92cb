//! The issuer's view of a Kubernetes cluster, pure: pods, namespaces and nodes as the watches
//! report them, and from them the workloads the issuer may certify (a [`WorkloadView`]).
//!
//! The issuer is also the address authority for pods (Kubernetes learns a pod's address from
//! the CNI plugin's result, which comes from the pod's certificate): a pod scheduled to a node
//! and holding no address yet is given one from that node's pod CIDR (`spec.podCIDRs`), and an
//! address a pod reports (`status.podIPs`) is its own. Assignment is derived, never stored: the
//! first free address of a probe sequence that the pod's UID fixes, where the addresses pods
//! report and those assigned to other pods are taken. An issuer that restarts thus gives a pod the
//! same address again, unless another pod took it meanwhile; so a restarted issuer assigns nothing
//! until [`KubeView::start_assigning`], a grace after its first lists, in which the kubelets report
//! the addresses of pods that were given one just before the restart.
//!
//! Nodes join with a projected service-account token: [`token_claims`] and
//! [`KubeView::precheck`] decide for nothing whether a token is worth asking the API server about,
//! and [`KubeView::joining_node`] decides from the review whom it admits, and until when.

use proto::cert::NamedPort;
use proto::workload::{NodeName, Workload, WorkloadRef, WorkloadView};
use proto::Cidr;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

/// A pod, as much of it as the issuer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.nodeName`: none until the scheduler places it.
    pub node: Option<String>,
    /// `spec.serviceAccountName` ("default" when left out).
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// The containers' named ports.
    pub ports: Vec<NamedPort>,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: the node's own addresses, no identity of its own.
    pub host_network: bool,
    /// Phase Succeeded or Failed: it runs no more and holds no address.
    pub finished: bool,
}

/// A node: its name and the pod CIDRs assigned to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub pod_cidrs: Vec<Cidr>,
}

/// A namespace: its name and whether it is being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub terminating: bool,
}

/// The view: what the watches last reported, and the addresses assigned from it.
#[derive(Debug, Default)]
pub struct KubeView {
    /// The namespace of node certificates: a pod on node N runs on `node_namespace/N`.
    node_namespace: String,
    pods: BTreeMap<(String, String), Pod>,
    nodes: BTreeMap<String, Vec<Cidr>>,
    namespaces: BTreeMap<String, bool>,
    /// Addresses assigned to pods (by UID) that report none yet.
    assigned: HashMap<String, Vec<IpAddr>>,
    /// Whether each watch has listed once: until all have, nothing is certified.
    listed: [bool; 3],
    /// Whether addresses are held back; an issuer that restarted holds off a while.
    holding: bool,
}

impl KubeView {
    pub fn new(node_namespace: &str) -> KubeView {
        KubeView {
            node_namespace: node_namespace.to_string(),
            ..KubeView::default()
        }
    }

    /// The view of an issuer that may have assigned addresses before it restarted: it assigns
    /// none until [`KubeView::start_assigning`], so that a pod certified just before the restart,
    /// whose address the kubelet has not reported yet, keeps it.
    pub fn restarted(node_namespace: &str) -> KubeView {
        KubeView {
            holding: true,
            ..KubeView::new(node_namespace)
        }
    }

    /// Assigns addresses from now on (after the grace of [`KubeView::restarted`]).
    pub fn start_assigning(&mut self) {
        self.holding = false;
        self.assign();
    }

    /// Whether addresses are being assigned.
    pub fn assigning(&self) -> bool {
        !self.holding
    }

    /// Whether pods, namespaces and nodes have each been listed once.
    pub fn ready(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    pub fn pod_applied(&mut self, pod: Pod) {
        if !pod.ips.is_empty() || pod.finished || pod.host_network {
            self.assigned.remove(&pod.uid);
        }
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(old) = self.pods.insert(key, pod.clone()) {
            if old.uid != pod.uid {
                self.assigned.remove(&old.uid);
            }
        }
        self.assign();
    }

    pub fn pod_deleted(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.pods.remove(&(namespace.to_string(), name.to_string())) {
            self.assigned.remove(&old.uid);
        }
    }

    /// A full list: it replaces every pod known.
    pub fn pods_listed(&mut self, pods: Vec<Pod>) {
        self.pods = pods
            .into_iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p))
            .collect();
        let live: HashSet<&str> = self
            .pods
            .values()
            .filter(|p| p.ips.is_empty() && !p.finished && !p.host_network)
            .map(|p| p.uid.as_str())
            .collect();
        self.assigned.retain(|uid, _| live.contains(uid.as_str()));
        self.listed[0] = true;
        self.assign();
    }

    pub fn node_applied(&mut self, node: Node) {
        self.nodes.insert(node.name, node.pod_cidrs);
        self.assign();
    }

    pub fn node_deleted(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    pub fn nodes_listed(&mut self, nodes: Vec<Node>) {
        self.nodes = nodes.into_iter().map(|n| (n.name, n.pod_cidrs)).collect();
        self.listed[1] = true;
        self.assign();
    }

    pub fn namespace_applied(&mut self, ns: Namespace) {
        self.namespaces.insert(ns.name, ns.terminating);
    }

    pub fn namespace_deleted(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn namespaces_listed(&mut self, all: Vec<Namespace>) {
        self.namespaces = all.into_iter().map(|n| (n.name, n.terminating)).collect();
        self.listed[2] = true;
    }

    /// A node's own overlay addresses: the first host address of each of its pod CIDRs (never
    /// given to a pod). None for a node unknown or without a pod CIDR.
    pub fn node_addresses(&self, node: &str) -> Option<Vec<Cidr>> {
        let cidrs = self.nodes.get(node).filter(|c| !c.is_empty())?;
        let addrs: Vec<Cidr> = cidrs
            .iter()
            .filter_map(|c| nth(c, 1))
            .filter_map(|a| Cidr::new(a, host_len(a)).ok())
            .collect();
        (!addrs.is_empty()).then_some(addrs)
    }

    /// Gives every pod that runs on a node with a pod CIDR and reports no address one from each
    /// of that node's CIDRs, in the order of the pods' names (so that a replay of the same
    /// events assigns the same).
    fn assign(&mut self) {
        if self.holding {
            return;
        }
        let mut taken: HashSet<IpAddr> = self
            .pods
            .values()
            .filter(|p| !p.finished && !p.host_network)
            .flat_map(|p| p.ips.iter().copied())
            .chain(self.assigned.values().flatten().copied())
            .collect();
        let mut new = Vec::new();
        for p in self.pods.values() {
            if !p.ips.is_empty()
                || p.finished
                || p.host_network
                || self.assigned.contains_key(&p.uid)
            {
                continue;
            }
            let Some(cidrs) = p.node.as_ref().and_then(|n| self.nodes.get(n)) else {
                continue;
            };
            let addrs: Vec<IpAddr> = cidrs
                .iter()
                .filter_map(|c| free_address(c, &p.uid, &taken))
                .collect();
            if addrs.is_empty() {
                continue;
            }
            taken.extend(addrs.iter().copied());
            new.push((p.uid.clone(), addrs));
        }
        self.assigned.extend(new);
    }
}

impl WorkloadView for KubeView {
    fn workload(&self, namespace: &str, name: &str) -> Option<Workload> {
        if !self.ready() || self.namespaces.get(namespace) != Some(&false) {
            return None;
        }
        let p = self.pods.get(&(namespace.to_string(), name.to_string()))?;
        if p.finished || p.host_network {
            return None;
        }
        let node = p.node.clone()?;
        let ips = if p.ips.is_empty() {
            self.assigned.get(&p.uid).cloned().unwrap_or_default()
        } else {
            p.ips.clone()
        };
        // Only addresses a pod of that node may hold: inside its pod CIDRs, never the block's
        // network address or the node's own. A node can write its pods' reported addresses
        // (the kubelet patches pod status), so one naming another node's pod's address is
        // given none, never a certificate that would take that address over.
        let blocks = self.nodes.get(&node).map(Vec::as_slice).unwrap_or_default();
        let ips: Vec<IpAddr> = ips
            .into_iter()
            .filter(|a| {
                blocks
                    .iter()
                    .any(|c| c.contains(*a) && nth(c, 0) != Some(*a) && nth(c, 1) != Some(*a))
            })
            .collect();
        Some(Workload {
            reference: WorkloadRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
            },
            service_account: p.service_account.clone(),
            labels: p.labels.clone(),
            addrs: ips
                .iter()
                .filter_map(|a| Cidr::new(*a, host_len(*a)).ok())
                .collect(),
            ports: p.ports.clone(),
            node: NodeName {
                namespace: self.node_namespace.clone(),
                name: node,
            },
        })
    }
}

impl KubeView {
    /// Whether `pod` runs as meshd's service account on `node`, as the view knows it: the pod a
    /// node's projected token is bound to must, so a token of a pod deleted or of another
    /// account joins nothing.
    fn node_pod(&self, policy: &NodePolicy, node: &str, pod: &BoundPod) -> Result<(), String> {
        if !self.ready() {
            return Err("the issuer has not listed the cluster yet".into());
        }
        let (namespace, account) = policy
            .service_account
            .split_once('/')
            .unwrap_or(("", &policy.service_account));
        let key = (namespace.to_string(), pod.name.clone());
        match self.pods.get(&key) {
            Some(p)
                if p.uid == pod.uid
                    && p.service_account == account
                    && p.node.as_deref() == Some(node)
                    && !p.finished =>
            {
                Ok(())
            }
            _ => Err(format!(
                "the token is bound to pod {namespace}/{:?} ({:?}), which is no running pod of {} \
                 on node {node:?}",
                pod.name, pod.uid, policy.service_account
            )),
        }
    }

    /// Whether a token with `claims` may be one that joins, by what the view knows at `now`:
    /// for the policy's audience, not expired, of meshd's service account, bound to a running
    /// meshd pod on a node. It costs nothing; a token that fails it is never sent for review,
    /// and one that passes is still nothing until the API server vouches for it.
    pub fn precheck(
        &self,
        claims: &TokenClaims,
        policy: &NodePolicy,
        now: u64,
    ) -> Result<(), String> {
        if !claims.audiences.contains(&policy.audience) {
            return Err(format!("the token is not for audience {}", policy.audience));
        }
        if claims.expires <= now {
            return Err("the token expired".into());
        }
        let expected = subject(policy);
        if claims.subject != expected {
            return Err(format!(
                "{:?} may not join as a node (only {expected})",
                claims.subject
            ));
        }
        self.node_pod(policy, &claims.node, &claims.pod)
    }

    /// Whom a token joins as, once the API server reviewed it: the node it is bound to, if the
    /// review admits it ([`reviewed_node`]), names the pod the token's claims name, and that pod
    /// runs as meshd on that node; the node certificate lives no longer than the token.
    pub fn joining_node(
        &self,
        review: &Review,
        claims: &TokenClaims,
        policy: &NodePolicy,
        now: u64,
    ) -> Result<JoiningNode, String> {
        let node = reviewed_node(review, policy)?;
        let pod = match (review.pod_name.as_slice(), review.pod_uid.as_slice()) {
            ([name], [uid]) => BoundPod {
                name: name.clone(),
                uid: uid.clone(),
            },
            _ => return Err("the token is bound to no pod".into()),
        };
        if pod != claims.pod || node != claims.node {
            return Err("the review and the token name different pods".into());
        }
        if claims.expires <= now {
            return Err("the token expired".into());
        }
        self.node_pod(policy, &node, &pod)?;
        Ok(JoiningNode {
            node,
            expires: claims.expires,
        })
    }
}

/// The node a token joins as, and when the token expires (the node certificate does by then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoiningNode {
    pub node: String,
    pub expires: u64,
}

/// The pod a projected token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
}

/// What the issuer reads of a projected service-account token's claims (a JWT's payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub audiences: Vec<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires: u64,
    /// `sub`: `system:serviceaccount:NAMESPACE:NAME`.
    pub subject: String,
    /// The node and pod the token is bound to (`kubernetes.io.node`, `kubernetes.io.pod`).
    pub node: String,
    pub pod: BoundPod,
}

/// The longest token read: projected tokens are about 1 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of a JWT `token`, read without checking its signature: only the API server's
/// review makes them true. Refused: anything but three base64url parts, a payload that is not
/// the claims of a projected token bound to a pod and a node.
pub fn token_claims(token: &str) -> Result<TokenClaims, String> {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Audience {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    struct Ref {
        name: String,
        uid: String,
    }
    #[derive(serde::Deserialize)]
    struct Bound {
        node: Option<Ref>,
        pod: Option<Ref>,
    }
    #[derive(serde::Deserialize)]
    struct Claims {
        aud: Audience,
        exp: u64,
        sub: String,
        #[serde(rename = "kubernetes.io")]
        kubernetes: Option<Bound>,
    }
    let not_jwt = || "not a service-account token (a JWT)".to_string();
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!("the token is over {MAX_TOKEN_BYTES} bytes"));
    }
    let parts: Vec<&str> = token.trim().split('.').collect();
    let [_, payload, _] = parts.as_slice() else {
        return Err(not_jwt());
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| not_jwt())?;
    let c: Claims = serde_json::from_slice(&json).map_err(|e| format!("{}: {e}", not_jwt()))?;
    let bound = c.kubernetes.unwrap_or(Bound {
        node: None,
        pod: None,
    });
    let (Some(node), Some(pod)) = (bound.node, bound.pod) else {
        return Err(concat!(
            "the token is not bound to a pod and a node (a projected token of Kubernetes ",
            "1.32 and later is)"
        )
        .into());
    };
    Ok(TokenClaims {
        audiences: match c.aud {
            Audience::One(a) => vec![a],
            Audience::Many(a) => a,
        },
        expires: c.exp,
        subject: c.sub,
        node: node.name,
        pod: BoundPod {
            name: pod.name,
            uid: pod.uid,
        },
    })
}

fn subject(policy: &NodePolicy) -> String {
    format!(
        "system:serviceaccount:{}",
        policy.service_account.replacen('/', ":", 1)
    )
}

/// Who may join as a node with a projected service-account token.
#[derive(Debug, Clone)]
pub struct NodePolicy {
    /// The service account of meshd's DaemonSet, `NAMESPACE/NAME`.
    pub service_account: String,
    /// The audience the token must be for: never the API server's own, or the issuer could
    /// replay a token it was shown to the API server.
    pub audience: String,
}

/// What the API server said of a token (a TokenReview's status).
#[derive(Debug, Clone, Default)]
pub struct Review {
    pub authenticated: bool,
    pub error: Option<String>,
    pub username: String,
    /// The audiences the token is good for, of those asked.
    pub audiences: Vec<String>,
    /// The node the token's pod runs on, and that pod (the review's extra information).
    pub node: Vec<String>,
    pub pod_name: Vec<String>,
    pub pod_uid: Vec<String>,
}

/// The node a reviewed token may join as: it must be authenticated, for the policy's audience,
/// of the policy's service account, and bound to exactly one node.
pub fn reviewed_node(r: &Review, policy: &NodePolicy) -> Result<String, String> {
    if !r.authenticated {
        return Err(format!(
            "the API server did not authenticate the token{}",
            r.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    if !r.audiences.contains(&policy.audience) {
        return Err(format!("the token is not for audience {}", policy.audience));
    }
    let expected = subject(policy);
    if r.username != expected {
        return Err(format!(
            "{} may not join as a node (only {expected})",
            r.username
        ));
    }
    match r.node.as_slice() {
        [n] if is_dns_subdomain(n) => Ok(n.clone()),
        _ => Err(concat!(
            "the token names no node (Kubernetes binds projected tokens to their pod's node ",
            "from 1.32 on)"
        )
        .into()),
    }
}

/// A Kubernetes object name: 1 to 253 of `a-z 0-9 - .`, starting and ending alphanumeric.
fn is_dns_subdomain(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

fn host_len(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

/// The `n`th address of `c`, if it has one.
fn nth(c: &Cidr, n: u128) -> Option<IpAddr> {
    let (family, first, last) = c.span();
    let a = first.checked_add(n).filter(|a| *a <= last)?;
    Some(if family == 4 {
        IpAddr::V4(std::net::Ipv4Addr::from(a as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(a))
    })
}

/// The most addresses of a block tried for one pod: a block this full is full.
const PROBES: u128 = 4096;

/// The first address of `c` not in `taken`, probing from a place `uid` fixes. Never the
/// block's first two (the network address and the node's own) nor, in IPv4, its last
/// (broadcast).
fn free_address(c: &Cidr, uid: &str, taken: &HashSet<IpAddr>) -> Option<IpAddr> {
    let (family, first, last) = c.span();
    let reserved_end = if family == 4 { 1 } else { 0 };
    // Usable offsets are 2 ..= size - 1 - reserved_end.
    let size = last - first + 1;
    let usable = size.checked_sub(2 + reserved_end).filter(|u| *u > 0)?;
    let start = u128::from(fnv(uid)) % usable;
    (0..usable.min(PROBES))
        .map(|i| 2 + (start + i) % usable)
        .filter_map(|off| nth(c, off))
        .find(|a| !taken.contains(a))
}

/// FNV-1a: a stable hash of the UID (the same in every build, unlike the standard hasher).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
