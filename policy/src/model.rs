//! The policy documents operators write, as Calico and Kubernetes define them, read from YAML
//! unchanged: `projectcalico.org/v3` `NetworkPolicy`, `GlobalNetworkPolicy` and `Tier`,
//! `networking.k8s.io/v1` `NetworkPolicy`, and `v1` `Namespace` (for namespace labels); and the
//! mesh's own `mesh.io/v1` `Federation` ([`crate::federation`]). External networks: Calico's
//! `NetworkSet` and `GlobalNetworkSet`, and the mesh's `mesh.io/v1` `ExternalNetwork` and
//! `GlobalExternalNetwork`, the same thing under the mesh's names. Unknown fields are errors, named
//! by their path in the document.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    // Fields the API server adds, accepted so `kubectl get -o yaml` output applies as is.
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    pub generation: Option<u64>,
}

/// `projectcalico.org/v3` NetworkPolicy and GlobalNetworkPolicy `spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CalicoSpec {
    #[serde(default)]
    pub tier: Option<String>,
    /// Only in the staged kinds ([`StagedAction`]).
    #[serde(default)]
    pub staged_action: Option<String>,
    #[serde(default)]
    pub order: Option<f64>,
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub namespace_selector: Option<String>,
    #[serde(default)]
    pub service_account_selector: Option<String>,
    #[serde(default)]
    pub types: Option<Vec<String>>,
    #[serde(default)]
    pub ingress: Vec<CalicoRule>,
    #[serde(default)]
    pub egress: Vec<CalicoRule>,
    #[serde(default)]
    pub do_not_track: Option<bool>,
    #[serde(default)]
    pub apply_on_forward: Option<bool>,
    #[serde(default)]
    pub pre_dnat: Option<bool>,
    #[serde(default)]
    pub performance_hints: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CalicoRule {
    pub action: String,
    #[serde(default)]
    pub protocol: Option<ProtocolValue>,
    #[serde(default)]
    pub not_protocol: Option<ProtocolValue>,
    #[serde(default, rename = "icmp")]
    pub icmp: Option<Icmp>,
    #[serde(default, rename = "notICMP")]
    pub not_icmp: Option<Icmp>,
    #[serde(default)]
    pub ip_version: Option<u8>,
    #[serde(default)]
    pub source: EntityRule,
    #[serde(default)]
    pub destination: EntityRule,
    #[serde(default)]
    pub metadata: Option<RuleMetadata>,
    #[serde(default)]
    pub http: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMetadata {
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A protocol by name (`TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, `UDPLite`) or number.
#[derive(Debug, Clone, PartialEq)]
pub enum ProtocolValue {
    Number(u8),
    Name(String),
}

impl<'de> Deserialize<'de> for ProtocolValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumberOrName {
            what: "protocol number",
            max: u8::MAX as u64,
            expecting: "a protocol: TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a number 0 to 255",
            number: |n| ProtocolValue::Number(n as u8),
            name: ProtocolValue::Name,
        })
    }
}

/// A YAML scalar that is a bounded number or a name, with errors in the user's words ("port 80800
/// is out of range (0 to 65535)", not "did not match any variant of untagged enum").
struct NumberOrName<T> {
    what: &'static str,
    max: u64,
    expecting: &'static str,
    number: fn(u64) -> T,
    name: fn(String) -> T,
}

impl<T> serde::de::Visitor<'_> for NumberOrName<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<T, E> {
        if n > self.max {
            return Err(E::custom(format!(
                "{} {n} is out of range (0 to {})",
                self.what, self.max
            )));
        }
        Ok((self.number)(n))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<T, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom(format!(
                "{} {n} is out of range (0 to {})",
                self.what, self.max
            ))),
        }
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
        Ok((self.name)(s.to_string()))
    }
}

/// A port number field (`endPort`): 0 to 65535, said so when it is not.
fn port_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let v: Option<PortValue> = Option::deserialize(d)?;
    match v {
        None => Ok(None),
        Some(PortValue::Number(n)) => Ok(Some(n)),
        Some(PortValue::Text(t)) => Err(serde::de::Error::custom(format!(
            "`{t}` is not a port number (0 to 65535)"
        ))),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Icmp {
    #[serde(default, rename = "type")]
    pub icmp_type: Option<u8>,
    #[serde(default)]
    pub code: Option<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EntityRule {
    #[serde(default)]
    pub nets: Vec<String>,
    #[serde(default)]
    pub not_nets: Vec<String>,
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub not_selector: Option<String>,
    #[serde(default)]
    pub namespace_selector: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortValue>,
    #[serde(default)]
    pub not_ports: Vec<PortValue>,
    #[serde(default)]
    pub service_accounts: Option<ServiceAccountMatch>,
    #[serde(default)]
    pub services: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountMatch {
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub selector: Option<String>,
}

/// A port (`8080`), a range (`"8000:8080"`) or a named port (not supported: an error later).
#[derive(Debug, Clone, PartialEq)]
pub enum PortValue {
    Number(u16),
    Text(String),
}

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumberOrName {
            what: "port",
            max: u16::MAX as u64,
            expecting: "a port 0 to 65535, a range like \"8000:8080\" or a port name",
            number: |n| PortValue::Number(n as u16),
            name: PortValue::Text,
        })
    }
}

/// The `spec` of a network set or external network: its addresses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkSetSpec {
    #[serde(default)]
    pub nets: Vec<String>,
}

/// Which kind named an external network (they mean the same; the name is kept for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkKind {
    /// `projectcalico.org/v3` `NetworkSet` / `GlobalNetworkSet`.
    CalicoNetworkSet,
    /// `mesh.io/v1` `ExternalNetwork` / `GlobalExternalNetwork`.
    ExternalNetwork,
}

/// `networking.k8s.io/v1` NetworkPolicy `spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct K8sSpec {
    /// Empty (or left out) selects every pod of the namespace.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Only in `StagedKubernetesNetworkPolicy` ([`StagedAction`]).
    #[serde(default)]
    pub staged_action: Option<String>,
    #[serde(default)]
    pub policy_types: Option<Vec<String>>,
    #[serde(default)]
    pub ingress: Option<Vec<K8sIngressRule>>,
    #[serde(default)]
    pub egress: Option<Vec<K8sEgressRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sIngressRule {
    #[serde(default)]
    pub from: Option<Vec<K8sPeer>>,
    #[serde(default)]
    pub ports: Option<Vec<K8sPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sEgressRule {
    #[serde(default)]
    pub to: Option<Vec<K8sPeer>>,
    #[serde(default)]
    pub ports: Option<Vec<K8sPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct K8sPeer {
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct K8sPort {
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub port: Option<PortValue>,
    #[serde(default, deserialize_with = "port_number")]
    pub end_port: Option<u16>,
}

/// `projectcalico.org/v3` Tier `spec`: where the tier's policies stand among the others, and what
/// the end of the tier does to a flow no rule of it decided.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TierSpec {
    /// Lower first; none is Calico's default, 1,000,000 (the `default` tier's).
    #[serde(default)]
    pub order: Option<f64>,
    /// `Deny` (Calico's default) or `Pass`.
    #[serde(default)]
    pub default_action: Option<String>,
}

/// What a staged policy (Calico's `StagedNetworkPolicy`, `StagedGlobalNetworkPolicy`,
/// `StagedKubernetesNetworkPolicy`, `spec.stagedAction`) stages. It never decides a packet: the
/// flow log says what the enforced set with the staged changes would have decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagedAction {
    /// Calico's default: the policy is evaluated as if it were enforced, beside the enforced
    /// ones (`Learn` and `Ignore`, which open-source Calico evaluates the same way, too).
    Set,
    /// The enforced policy of the same kind, namespace and name is left out.
    Delete,
}

impl StagedAction {
    pub fn parse(v: Option<&str>) -> Result<StagedAction, String> {
        match v {
            None | Some("Set" | "Learn" | "Ignore") => Ok(StagedAction::Set),
            Some("Delete") => Ok(StagedAction::Delete),
            Some(x) => Err(format!(
                "spec.stagedAction: `{x}` is not Set, Delete, Learn or Ignore"
            )),
        }
    }
}

/// One YAML document of a known kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    CalicoNetworkPolicy {
        metadata: Metadata,
        spec: CalicoSpec,
    },
    CalicoGlobalNetworkPolicy {
        metadata: Metadata,
        spec: CalicoSpec,
    },
    K8sNetworkPolicy {
        metadata: Metadata,
        spec: K8sSpec,
    },
    Namespace {
        metadata: Metadata,
    },
    /// A Calico tier: an ordered group of policies ([`crate::engine`]).
    Tier {
        metadata: Metadata,
        spec: TierSpec,
    },
    Federation {
        metadata: Metadata,
        spec: crate::federation::FederationSpec,
    },
    /// A named set of addresses outside the mesh, with labels that rule selectors match.
    Network {
        metadata: Metadata,
        spec: NetworkSetSpec,
        kind: NetworkKind,
        global: bool,
    },
    /// A staged `NetworkPolicy`, `GlobalNetworkPolicy` or Kubernetes `NetworkPolicy` (the
    /// document `policy`, whose `spec.stagedAction` says what is staged).
    Staged {
        action: StagedAction,
        policy: Box<Document>,
    },
    /// Expected flows, checked by `meshctl policy test` and before every apply
    /// ([`crate::testing`]); nodes ignore them.
    PolicyTest {
        metadata: Metadata,
        spec: crate::testing::PolicyTestSpec,
    },
}

/// A document that could not be read: which file, which document (1-based), what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: document {document}{}: {message}", kind_name.as_ref().map(|k| format!(" ({k})")).unwrap_or_default())]
pub struct LoadError {
    pub file: String,
    /// 1-based, in the file.
    pub line: usize,
    pub column: usize,
    pub document: usize,
    /// `Kind/name` when known.
    pub kind_name: Option<String>,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: S,
}

/// A document whose `spec` may be left out (a `Tier`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOptional<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNamespace {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    #[allow(dead_code)]
    spec: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml_ng::Value>,
}

/// Upper bound on one file: policy sets are written by people.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// Upper bound on documents in one file.
pub const MAX_DOCUMENTS: usize = 20_000;

/// Reads every document of `text` (from `file`, for messages): all of them, or every error.
pub fn parse_documents(text: &str, file: &str) -> Result<Vec<Document>, Vec<LoadError>> {
    let (docs, errors) = parse_located(text, file);
    if errors.is_empty() {
        Ok(docs.into_iter().map(|(_, d)| d).collect())
    } else {
        Err(errors)
    }
}

/// Where a document came from: its file and its place in that file's YAML stream (1-based,
/// counting empty documents, as an editor would).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub document: usize,
    /// The document's first line in the file (0-based) and its text, to place a field of it
    /// later (an error found by compiling).
    pub first_line: usize,
    pub text: std::sync::Arc<str>,
}

impl Origin {
    /// `FILE:LINE:COLUMN: document N` of field `path` of this document (its first line when the
    /// field is not found).
    pub fn at(&self, path: &str) -> String {
        let (line, column) = self.position(path);
        format!("{}:{line}:{column}: document {}", self.file, self.document)
    }

    /// The 1-based line and column of field `path`.
    pub fn position(&self, path: &str) -> (usize, usize) {
        crate::location::position_in(&self.text, self.first_line, path)
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.at(""))
    }
}

/// Object names that occur more than once among `named`, each as an error at its second and later
/// places naming the first: which one should win is not obvious, so none does.
pub fn duplicates<'a>(named: impl IntoIterator<Item = (&'a Origin, String)>) -> Vec<LoadError> {
    let mut first: std::collections::BTreeMap<String, &Origin> = Default::default();
    let mut errors = Vec::new();
    for (origin, name) in named {
        match first.get(&name) {
            Some(at) => {
                let place = if at.file == origin.file {
                    format!("document {}", at.document)
                } else {
                    at.to_string()
                };
                let (line, column) = origin.position("metadata.name");
                errors.push(LoadError {
                    file: origin.file.clone(),
                    line,
                    column,
                    document: origin.document,
                    kind_name: None,
                    message: format!("{name} is also {place}"),
                });
            }
            None => {
                first.insert(name, origin);
            }
        }
    }
    errors
}

/// Reads every document of `text`: those that parse, each with its origin (so that later errors,
/// a selector that does not parse say, can name the file and document too), and an error for each
/// that does not, so an operator sees everything wrong at once. Empty documents are skipped.
pub fn parse_located(text: &str, file: &str) -> (Vec<(Origin, Document)>, Vec<LoadError>) {
    let documents = crate::location::Documents::new(text);
    // An error's place: where the parser says, else the document's first line.
    let err = |document: usize,
               kind_name: Option<String>,
               (message, at): (String, Option<(usize, usize)>)| {
        let (line, column) = at.unwrap_or_else(|| (documents.get(document).0 + 1, 1));
        LoadError {
            file: file.to_string(),
            line,
            column,
            document,
            kind_name,
            message,
        }
    };
    if text.len() > MAX_FILE_BYTES {
        return (
            vec![],
            vec![err(
                0,
                None,
                (format!("larger than {MAX_FILE_BYTES} bytes"), None),
            )],
        );
    }
    // Pass 1: the kind of each document.
    let mut heads = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        if i >= MAX_DOCUMENTS {
            return (
                vec![],
                vec![err(
                    i + 1,
                    None,
                    (format!("more than {MAX_DOCUMENTS} documents"), None),
                )],
            );
        }
        match serde_yaml_ng::Value::deserialize(de) {
            Ok(v) => heads.push(Some(v)),
            Err(e) => return (vec![], vec![err(i + 1, None, yaml_error(&e))]),
        }
    }
    // Pass 2: each document as its kind, with the path of any bad field.
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (i, (de, head)) in serde_yaml_ng::Deserializer::from_str(text)
        .zip(heads)
        .enumerate()
    {
        let n = i + 1;
        let Some(head) = head else { continue };
        if head.is_null() {
            continue;
        }
        let get = |k: &str| {
            head.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let (api, kind) = (get("apiVersion"), get("kind"));
        let name = head
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        let kind_name = Some(format!("{kind}/{name}"));
        let (first_line, doc_text) = documents.get(n);
        let doc = Doc {
            head: &head,
            text: doc_text,
            first_line,
        };
        let result = match (api.as_str(), kind.as_str()) {
            ("projectcalico.org/v3", "NetworkPolicy") => doc.typed::<Raw<CalicoSpec>>(de)
                .map(|r| Document::CalicoNetworkPolicy { metadata: r.metadata, spec: r.spec }),
            ("projectcalico.org/v3", "GlobalNetworkPolicy") => doc.typed::<Raw<CalicoSpec>>(de)
                .map(|r| Document::CalicoGlobalNetworkPolicy { metadata: r.metadata, spec: r.spec }),
            ("networking.k8s.io/v1", "NetworkPolicy") => doc.typed::<Raw<K8sSpec>>(de)
                .map(|r| Document::K8sNetworkPolicy { metadata: r.metadata, spec: r.spec }),
            ("projectcalico.org/v3", "StagedNetworkPolicy" | "StagedGlobalNetworkPolicy") => doc
                .typed::<Raw<CalicoSpec>>(de)
                .and_then(|r| {
                    let action = StagedAction::parse(r.spec.staged_action.as_deref()).map_err(|e| vec![(e, None)])?;
                    let policy = if kind == "StagedNetworkPolicy" {
                        Document::CalicoNetworkPolicy { metadata: r.metadata, spec: r.spec }
                    } else {
                        Document::CalicoGlobalNetworkPolicy { metadata: r.metadata, spec: r.spec }
                    };
                    Ok(Document::Staged { action, policy: Box::new(policy) })
                }),
            ("projectcalico.org/v3", "StagedKubernetesNetworkPolicy") => doc.typed::<Raw<K8sSpec>>(de)
                .and_then(|r| {
                    let action = StagedAction::parse(r.spec.staged_action.as_deref()).map_err(|e| vec![(e, None)])?;
                    let policy = Document::K8sNetworkPolicy { metadata: r.metadata, spec: r.spec };
                    Ok(Document::Staged { action, policy: Box::new(policy) })
                }),
            ("v1", "Namespace") => doc.typed::<RawNamespace>(de).map(|r| Document::Namespace { metadata: r.metadata }),
            ("projectcalico.org/v3", "Tier") => doc.typed::<RawOptional<TierSpec>>(de).and_then(|r| match r.metadata.namespace {
                Some(_) => Err(vec![("metadata.namespace: a Tier is not namespaced".into(), None)]),
                None => Ok(Document::Tier { metadata: r.metadata, spec: r.spec.unwrap_or_default() }),
            }),
            (crate::federation::API_VERSION, crate::federation::KIND) => doc.typed::<Raw<crate::federation::FederationSpec>>(de)
                .map(|r| Document::Federation { metadata: r.metadata, spec: r.spec }),
            (crate::testing::API_VERSION, crate::testing::KIND) => doc.typed::<Raw<crate::testing::PolicyTestSpec>>(de)
                .and_then(|r| match r.metadata.namespace {
                    Some(_) => Err(vec![("metadata.namespace: a PolicyTest is not namespaced".into(), None)]),
                    None => Ok(Document::PolicyTest { metadata: r.metadata, spec: r.spec }),
                }),
            ("projectcalico.org/v3", "NetworkSet" | "GlobalNetworkSet")
            | (crate::federation::API_VERSION, "ExternalNetwork" | "GlobalExternalNetwork") => {
                let network_kind = if api == crate::federation::API_VERSION {
                    NetworkKind::ExternalNetwork
                } else {
                    NetworkKind::CalicoNetworkSet
                };
                let global = kind.starts_with("Global");
                doc.typed::<Raw<NetworkSetSpec>>(de).and_then(|r| {
                    if global && r.metadata.namespace.is_some() {
                        return Err(vec![(format!("metadata.namespace: a {kind} is not namespaced"), None)]);
                    }
                    Ok(Document::Network { metadata: r.metadata, spec: r.spec, kind: network_kind, global })
                })
            }
            _ => Err(vec![(format!(
                "apiVersion `{api}` kind `{kind}` is not one of projectcalico.org/v3 NetworkPolicy, \
                 GlobalNetworkPolicy, Tier, StagedNetworkPolicy, StagedGlobalNetworkPolicy, \
                 StagedKubernetesNetworkPolicy, NetworkSet or GlobalNetworkSet, networking.k8s.io/v1 NetworkPolicy, \
                 v1 Namespace, mesh.io/v1 Federation, ExternalNetwork, GlobalExternalNetwork or PolicyTest"
            ), None)]),
        };
        match result {
            Ok(d) => docs.push((
                Origin {
                    file: file.to_string(),
                    document: n,
                    first_line,
                    text: doc_text.into(),
                },
                d,
            )),
            Err(problems) => {
                errors.extend(problems.into_iter().map(|p| err(n, kind_name.clone(), p)))
            }
        }
    }
    (docs, errors)
}

/// A YAML error's message without the position the library appends, and that position (1-based).
fn yaml_error(e: &serde_yaml_ng::Error) -> (String, Option<(usize, usize)>) {
    let at = e.location().map(|l| (l.line(), l.column()));
    let mut message = e.to_string();
    if let Some((line, column)) = at {
        for suffix in [
            format!(" at line {line} column {column}"),
            format!(" at position {}", e.location().map_or(0, |l| l.index())),
        ] {
            if let Some(i) = message.find(&suffix) {
                message.replace_range(i..i + suffix.len(), "");
            }
        }
    }
    (message, at)
}

/// What is wrong, and where (1-based line and column) when known.
type Problem = (String, Option<(usize, usize)>);

/// One document being read as its kind.
struct Doc<'a> {
    head: &'a serde_yaml_ng::Value,
    /// The document's own text and its first line in the file (0-based).
    text: &'a str,
    first_line: usize,
}

/// Errors reported in one document at most.
const MAX_ERRORS_PER_DOCUMENT: usize = 16;

impl Doc<'_> {
    /// The document as `T`, or every problem in it: the first as the parser met it, then the
    /// next ones found by reading the document again without each bad field, so an operator sees
    /// them all at once. A field missing only because a bad one was taken out is not reported.
    fn typed<T: serde::de::DeserializeOwned>(
        &self,
        de: serde_yaml_ng::Deserializer<'_>,
    ) -> Result<T, Vec<Problem>> {
        let first = match typed::<T>(de) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        let mut problems = vec![(first.0, first.1)];
        let mut value = self.head.clone();
        let mut path = first.2;
        while problems.len() < MAX_ERRORS_PER_DOCUMENT && remove_path(&mut value, &path) {
            let Err((message, _, next)) = typed::<T>(value.clone()) else {
                break;
            };
            if message.contains("missing field") || next == path {
                break;
            }
            let (line, column) = crate::location::position_in(self.text, self.first_line, &next);
            problems.push((message, Some((line, column))));
            path = next;
        }
        Err(problems)
    }
}

/// Takes the field at `path` (`spec.ingress[0].protocl`) out of `v`: a key from its mapping, or
/// for a bad item of a list the whole list (taking the item out would renumber the others).
fn remove_path(v: &mut serde_yaml_ng::Value, path: &str) -> bool {
    let mut keys: Vec<&str> = path.split('.').filter(|k| !k.is_empty()).collect();
    // A list item: drop the list's key instead.
    while keys.last().is_some_and(|k| k.ends_with(']')) {
        let last = keys.pop().unwrap_or_default();
        match last.find('[') {
            Some(0) | None => {}
            Some(i) => keys.push(&last[..i]),
        }
    }
    let Some((last, parents)) = keys.split_last() else {
        return false;
    };
    let mut node = v;
    for key in parents {
        let (name, indexes) = match key.find('[') {
            Some(i) => (&key[..i], &key[i..]),
            None => (*key, ""),
        };
        let Some(next) = node.get_mut(name) else {
            return false;
        };
        node = next;
        for ix in indexes.split(['[', ']']).filter(|s| !s.is_empty()) {
            let Some(next) = ix.parse::<usize>().ok().and_then(|i| node.get_mut(i)) else {
                return false;
            };
            node = next;
        }
    }
    node.as_mapping_mut()
        .is_some_and(|m| m.remove(*last).is_some())
}

/// A field path, where in the text (line, column), and what was wrong.
type FieldError = (String, Option<(usize, usize)>, String);

fn typed<'de, T: Deserialize<'de>>(
    de: impl serde::Deserializer<'de, Error = serde_yaml_ng::Error>,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let (inner, at) = yaml_error(e.inner());
        // The YAML library often names the field itself; say it once.
        let named = inner
            .split(':')
            .next()
            .is_some_and(|head| !head.contains(' ') && path.starts_with(head));
        let message = if path == "." || named {
            inner
        } else {
            format!("{path}: {inner}")
        };
        (message, at, path)
    })
}

/// The annotation that puts one policy in audit mode: its denials are logged and counted, and the
/// packets pass (Calico's "logging-only mode" while an allow-list is being tried out).
pub const AUDIT_ANNOTATION: &str = "policy.mesh/audit";

impl Document {
    /// The name `apply`, `delete`, the flow log and verdicts use for this object:
    /// `NetworkPolicy NS/NAME`, `GlobalNetworkPolicy NAME`, `KubernetesNetworkPolicy NS/NAME` or
    /// `Namespace NAME`. Namespaced kinds without a namespace are in `default`, as in Kubernetes.
    pub fn object_name(&self) -> String {
        let ns = |m: &Metadata| m.namespace.clone().unwrap_or_else(|| "default".into());
        match self {
            Document::CalicoNetworkPolicy { metadata, .. } => {
                format!("NetworkPolicy {}/{}", ns(metadata), metadata.name)
            }
            Document::CalicoGlobalNetworkPolicy { metadata, .. } => {
                format!("GlobalNetworkPolicy {}", metadata.name)
            }
            Document::K8sNetworkPolicy { metadata, .. } => {
                format!("KubernetesNetworkPolicy {}/{}", ns(metadata), metadata.name)
            }
            Document::Namespace { metadata } => format!("Namespace {}", metadata.name),
            Document::Tier { metadata, .. } => format!("Tier {}", metadata.name),
            Document::Staged { policy, .. } => format!("Staged{}", policy.object_name()),
            Document::Federation { metadata, .. } => format!("Federation {}", metadata.name),
            Document::PolicyTest { metadata, .. } => format!("PolicyTest {}", metadata.name),
            Document::Network {
                metadata,
                kind,
                global,
                ..
            } => {
                let k = match kind {
                    NetworkKind::CalicoNetworkSet => "NetworkSet",
                    NetworkKind::ExternalNetwork => "ExternalNetwork",
                };
                if *global {
                    format!("Global{k} {}", metadata.name)
                } else {
                    format!("{k} {}/{}", ns(metadata), metadata.name)
                }
            }
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Document::Staged { policy, .. } => policy.metadata(),
            Document::CalicoNetworkPolicy { metadata, .. }
            | Document::CalicoGlobalNetworkPolicy { metadata, .. }
            | Document::K8sNetworkPolicy { metadata, .. }
            | Document::Namespace { metadata }
            | Document::Tier { metadata, .. }
            | Document::Federation { metadata, .. }
            | Document::PolicyTest { metadata, .. }
            | Document::Network { metadata, .. } => metadata,
        }
    }
}

/// One object of a policy set: its name (see [`Document::object_name`]) and its YAML, normalised
/// (re-serialised from the parsed document, so formatting and comments do not count as changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub name: String,
    pub yaml: String,
}

/// Reads `text` as objects, in order, after checking every document (all of them or every error).
/// Two documents naming the same object are an error: which one would win is not obvious.
pub fn objects(text: &str, file: &str) -> Result<Vec<Object>, Vec<LoadError>> {
    Ok(located_objects(text, file)?
        .into_iter()
        .map(|(_, o)| o)
        .collect())
}

/// [`objects`], each with its origin.
pub fn located_objects(text: &str, file: &str) -> Result<Vec<(Origin, Object)>, Vec<LoadError>> {
    let (docs, errors) = parse_located(text, file);
    if !errors.is_empty() {
        return Err(errors);
    }
    let errors = duplicates(docs.iter().map(|(o, d)| (o, d.object_name())));
    if !errors.is_empty() {
        return Err(errors);
    }
    let values: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|de| serde_yaml_ng::Value::deserialize(de).ok())
        .filter(|v| !v.is_null())
        .collect();
    Ok(docs
        .into_iter()
        .zip(values)
        .map(|((origin, doc), value)| {
            let yaml = serde_yaml_ng::to_string(&value).unwrap_or_default();
            let name = doc.object_name();
            (origin, Object { name, yaml })
        })
        .collect())
}

/// The YAML stream of a set of objects, in name order: what a signed policy set carries.
pub fn stream(objects: &[Object]) -> String {
    let mut sorted: Vec<&Object> = objects.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted.iter().map(|o| format!("---\n{}", o.yaml)).collect()
}

#[cfg(test)]
mod object_tests {
    use super::*;

    const TWO: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: b\n  labels: {app: x}  # note\n---\n\
apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: b}\nspec:\n  selector: all()\n";

    #[test]
    fn objects_are_named_normalised_and_streamed_in_name_order() {
        let objs = objects(TWO, "f.yaml").unwrap();
        let names: Vec<&str> = objs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["Namespace b", "NetworkPolicy b/p"]);
        assert!(
            !objs[0].yaml.contains("note"),
            "comments are not part of the object"
        );
        let s = stream(&objs);
        let again = objects(&s, "stream").unwrap();
        assert_eq!(again, objs);
        assert!(s.find("Namespace").unwrap() < s.find("NetworkPolicy").unwrap());
    }

    #[test]
    fn origins_count_every_document_and_duplicates_across_files_name_both_places() {
        let text =
            format!("{TWO}---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: c}}\n");
        let (docs, errors) = parse_located(&text, "a.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        let at: Vec<String> = docs.iter().map(|(o, _)| o.to_string()).collect();
        assert_eq!(
            at,
            [
                "a.yaml:1:1: document 1",
                "a.yaml:7:1: document 2",
                "a.yaml:14:1: document 4"
            ]
        );

        let (other, _) = parse_located(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n",
            "b.yaml",
        );
        let all = docs.iter().chain(&other);
        let errs = duplicates(all.map(|(o, d)| (o, d.object_name())));
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "b.yaml:1:1: document 1: Namespace c is also a.yaml:14:1: document 4"
        );
    }

    #[test]
    fn the_same_object_twice_is_an_error_naming_both_documents() {
        let text = format!("{TWO}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: b}}\n");
        let errs = objects(&text, "f.yaml").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].document, 3);
        assert!(
            errs[0].message.contains("Namespace b is also document 1"),
            "{}",
            errs[0]
        );
    }
}
