//! Workload identities issued online: who may be given which workload certificate.
//!
//! A node runs many workloads (pods). For each it asks the issuer for a short-lived certificate
//! that binds the workload's identity to the node's own public key. The request names only the
//! workload (namespace, name and UID). Everything the certificate says comes from the issuer's own
//! view of workloads, never from the request: the service account (the certificate's name), the
//! labels, the overlay addresses, the named ports, and the node that runs it. A node is given the
//! certificate only for a workload that view places on it, so a compromised node can speak only
//! as the workloads scheduled on it, and only until their certificates expire.
//!
//! Pure: the decision is a function of the requesting node's (already verified) certificate, the
//! request, the view and the time, so it is unit- and property-tested without an issuer.

use crate::cert::{CertBody, CertKind, NamedPort};
use crate::Cidr;
use std::collections::BTreeMap;

/// The longest namespace, name or UID a request may carry (Kubernetes names are at most 253).
pub const MAX_REF_BYTES: usize = 253;

/// A workload as a request names it: for Kubernetes, the pod's namespace, name and UID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
    /// Tells a workload from a later one of the same name.
    pub uid: String,
}

/// A workload as the issuer's source of workloads knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub reference: WorkloadRef,
    /// The certificate's name.
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<Cidr>,
    pub ports: Vec<NamedPort>,
    /// The node that runs it, as that node's certificate names it.
    pub node: NodeName,
}

/// A node's identity: the namespace and name in its own certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A source of workloads: what the issuer knows of them at the moment it decides. Two
/// implement it: the operator's [`Registry`] and the view of a Kubernetes cluster that `meshctl
/// ca serve --kubernetes` keeps by watching pods, namespaces and nodes.
pub trait WorkloadView {
    /// The workload `namespace/name` as the source knows it now, if it runs.
    fn workload(&self, namespace: &str, name: &str) -> Option<Workload>;
}

/// Workloads by (namespace, name).
impl WorkloadView for BTreeMap<(String, String), Workload> {
    fn workload(&self, namespace: &str, name: &str) -> Option<Workload> {
        self.get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }
}

/// What the issuer signs with: its trust domain, the time, how long a certificate lives, and
/// which CAs make node certificates.
#[derive(Debug, Clone)]
pub struct Issuance {
    pub trust_domain: String,
    /// The (offline) CAs whose certificates are nodes'. Workload certificates come from the
    /// online issuer's own key, so one of them can never ask as a node: it would otherwise be
    /// given the workloads of any node whose name its service account shares.
    pub node_issuers: Vec<[u8; 32]>,
    /// Seconds since the Unix epoch.
    pub now: u64,
    pub lifetime_secs: u64,
}

/// What a workload certificate will say, but for its serial and issuer (the CA adds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub trust_domain: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<Cidr>,
    pub ports: Vec<NamedPort>,
    /// The requesting node's key: the workload speaks through that node's tunnel.
    pub public_key: [u8; 32],
    pub not_before: u64,
    pub not_after: u64,
}

impl Grant {
    /// The certificate body to sign.
    pub fn body(&self, serial: u64, issuer: [u8; 32]) -> CertBody {
        CertBody {
            kind: CertKind::Identity,
            serial,
            not_before: self.not_before,
            not_after: self.not_after,
            trust_domain: self.trust_domain.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            public_key: self.public_key,
            issuer,
            labels: self.labels.clone(),
            addrs: self.addrs.clone(),
            routes: Vec::new(),
            ports: self.ports.clone(),
        }
    }
}

/// Why a request is refused: each names what the requester may fix, or that it may not ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the requesting certificate is not an identity of trust domain {0}")]
    ForeignNode(String),
    #[error("the requesting certificate is not a node's (its CA does not make node certificates)")]
    NotANode,
    #[error("the requesting node's certificate is not valid now")]
    NodeNotValid,
    #[error("the request's {field} is empty or longer than 253 bytes")]
    Malformed { field: &'static str },
    #[error("no workload {namespace}/{name} is known")]
    UnknownWorkload { namespace: String, name: String },
    #[error("workload {namespace}/{name} is now another one (UID {uid}, not the one asked for)")]
    Replaced {
        namespace: String,
        name: String,
        uid: String,
    },
    #[error("workload {namespace}/{name} does not run on node {node}")]
    NotOnThisNode {
        namespace: String,
        name: String,
        node: NodeName,
    },
    #[error("workload {namespace}/{name} has no overlay address yet")]
    NoAddress { namespace: String, name: String },
}

/// Decides whether `node` (the requesting node's certificate, whose signature, CA and revocation
/// the caller has checked) may be given the certificate of the workload `request` names, and
/// what it says. The certificate lives `lifetime_secs` from now, and never past the node's own.
pub fn authorize(
    node: &CertBody,
    request: &WorkloadRef,
    view: &(impl WorkloadView + ?Sized),
    issuance: &Issuance,
) -> Result<Grant, Refusal> {
    if node.kind != CertKind::Identity || node.trust_domain != issuance.trust_domain {
        return Err(Refusal::ForeignNode(issuance.trust_domain.clone()));
    }
    if !issuance.node_issuers.contains(&node.issuer) {
        return Err(Refusal::NotANode);
    }
    if !(node.not_before..=node.not_after).contains(&issuance.now) {
        return Err(Refusal::NodeNotValid);
    }
    for (field, value) in [
        ("namespace", &request.namespace),
        ("name", &request.name),
        ("uid", &request.uid),
    ] {
        if value.is_empty() || value.len() > MAX_REF_BYTES {
            return Err(Refusal::Malformed { field });
        }
    }
    let (namespace, name) = (request.namespace.clone(), request.name.clone());
    let Some(w) = view.workload(&request.namespace, &request.name) else {
        return Err(Refusal::UnknownWorkload { namespace, name });
    };
    if w.reference.uid != request.uid {
        return Err(Refusal::Replaced {
            namespace,
            name,
            uid: w.reference.uid.clone(),
        });
    }
    if w.node.namespace != node.namespace || w.node.name != node.name {
        return Err(Refusal::NotOnThisNode {
            namespace,
            name,
            node: NodeName {
                namespace: node.namespace.clone(),
                name: node.name.clone(),
            },
        });
    }
    if w.addrs.is_empty() {
        return Err(Refusal::NoAddress { namespace, name });
    }
    Ok(Grant {
        trust_domain: issuance.trust_domain.clone(),
        namespace: w.reference.namespace.clone(),
        name: w.service_account.clone(),
        labels: w.labels.clone(),
        addrs: w.addrs.clone(),
        ports: w.ports.clone(),
        public_key: node.public_key,
        not_before: issuance.now,
        not_after: issuance
            .now
            .saturating_add(issuance.lifetime_secs)
            .min(node.not_after),
    })
}

/// The issuer's answer to a node's request (`IssueRequest`, PROTOCOL.md §11), sealed by
/// `sender`: the node's certificate must name that key and verify against `trust` (the node CAs,
/// with `revoked`); then each workload asked is decided by [`authorize`] and, if granted, signed
/// by `sign`. `Err` refuses the whole request (the node is not one that may ask), with the reason.
#[allow(clippy::too_many_arguments)]
pub fn answer(
    sender: &[u8; 32],
    node: &crate::cert::Certificate,
    requests: &[WorkloadRef],
    trust: &crate::trust::Trust,
    revoked: Option<&crate::cert::RevocationList>,
    view: &(impl WorkloadView + ?Sized),
    issuance: &Issuance,
    mut sign: impl FnMut(&Grant) -> Result<crate::cert::Certificate, String>,
) -> Result<Vec<Result<crate::cert::Certificate, String>>, String> {
    check_node(sender, node, trust, revoked, issuance.now)?;
    Ok(requests
        .iter()
        .map(|r| {
            authorize(&node.body, r, view, issuance)
                .map_err(|e| e.to_string())
                .and_then(|g| sign(&g))
        })
        .collect())
}

/// Whether `node`, in a request sealed by `sender`, may ask at all: it names that key and
/// verifies against `trust` (the node CAs) and `revoked` at `now`.
pub fn check_node(
    sender: &[u8; 32],
    node: &crate::cert::Certificate,
    trust: &crate::trust::Trust,
    revoked: Option<&crate::cert::RevocationList>,
    now: u64,
) -> Result<(), String> {
    if node.body.public_key != *sender {
        return Err("the node certificate names another key than the one that sealed".into());
    }
    trust
        .check(node, now, revoked, crate::trust::Signature::Verify)
        .map_err(|e| format!("node certificate refused: {e}"))
}

/// Why the registry refuses a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("workload {namespace}/{name}: {reason}")]
    Invalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("workload {namespace}/{name}: address {addr} is held by {holder}; remove it first")]
    AddressTaken {
        namespace: String,
        name: String,
        addr: Cidr,
        holder: String,
    },
}

/// The workloads the operator (or the lab) registered by hand: `meshctl workload register`.
/// A view as Kubernetes' pods are: each address held by one workload at a time, and a workload
/// registered again under its name is replaced (a new UID is a new workload).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    workloads: BTreeMap<(String, String), Workload>,
}

impl Registry {
    /// Adds `w`, or replaces the workload of its namespace and name; returns the one replaced.
    /// Refused when a field could not go into a certificate, or an address is another's.
    pub fn register(&mut self, mut w: Workload) -> Result<Option<Workload>, RegistryError> {
        // A certificate holds its addresses and ports in order, each once.
        w.addrs.sort();
        w.addrs.dedup();
        w.ports.sort();
        w.ports.dedup();
        let r = &w.reference;
        let invalid = |reason: String| RegistryError::Invalid {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            reason,
        };
        for (field, value) in [("name", &r.name), ("uid", &r.uid)] {
            if value.is_empty() || value.len() > MAX_REF_BYTES {
                return Err(invalid(format!("{field} must be 1-253 bytes")));
            }
        }
        if w.node.namespace.is_empty() || w.node.name.is_empty() {
            return Err(invalid("no node".into()));
        }
        if w.addrs.iter().any(|a| match a.addr() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
            _ => false,
        }) {
            return Err(invalid(
                "an IPv4-mapped IPv6 address: give the IPv4 address".into(),
            ));
        }
        if w.addrs.is_empty() {
            return Err(invalid("no overlay address".into()));
        }
        let host = |a: &Cidr| a.prefix_len() == if a.addr().is_ipv4() { 32 } else { 128 };
        if let Some(a) = w.addrs.iter().find(|a| !host(a)) {
            return Err(invalid(format!("{a} is not one address (/32 or /128)")));
        }
        // What a certificate would say must be a valid certificate.
        let probe = Grant {
            trust_domain: "registry.check".into(),
            namespace: r.namespace.clone(),
            name: w.service_account.clone(),
            labels: w.labels.clone(),
            addrs: w.addrs.clone(),
            ports: w.ports.clone(),
            public_key: [0; 32],
            not_before: 0,
            not_after: 0,
        };
        probe
            .body(1, [0; 32])
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        // The node must be a name a certificate can hold.
        let node_probe = Grant {
            namespace: w.node.namespace.clone(),
            name: w.node.name.clone(),
            labels: BTreeMap::new(),
            ports: Vec::new(),
            ..probe
        };
        node_probe
            .body(1, [0; 32])
            .validate()
            .map_err(|e| invalid(format!("node {}: {e}", w.node)))?;
        // A workload's identity must never be a node's: its certificate would name that node.
        let sa = NodeName {
            namespace: r.namespace.clone(),
            name: w.service_account.clone(),
        };
        for other in self.workloads.values() {
            if other.node == sa {
                return Err(invalid(format!(
                    "service account {} is node {}'s name",
                    w.service_account, other.node
                )));
            }
            if other.reference.namespace == w.node.namespace && other.service_account == w.node.name
            {
                return Err(invalid(format!(
                    "node {} is the identity of workload {}/{}",
                    w.node, other.reference.namespace, other.reference.name
                )));
            }
        }
        if sa == w.node {
            return Err(invalid(format!("its identity is its node's, {}", w.node)));
        }
        let key = (r.namespace.clone(), r.name.clone());
        for (k, other) in &self.workloads {
            if *k == key {
                continue;
            }
            if let Some(addr) = w.addrs.iter().find(|a| other.addrs.contains(a)) {
                return Err(RegistryError::AddressTaken {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    addr: *addr,
                    holder: format!("{}/{}", k.0, k.1),
                });
            }
        }
        Ok(self.workloads.insert(key, w))
    }

    /// Removes the workload `namespace/name`; returns it if there was one.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<Workload> {
        self.workloads
            .remove(&(namespace.to_string(), name.to_string()))
    }

    /// Every workload, by namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }
}

impl WorkloadView for Registry {
    fn workload(&self, namespace: &str, name: &str) -> Option<Workload> {
        self.workloads.workload(namespace, name)
    }
}

#[cfg(test)]
mod tests;
