//! The admin protocol between `meshctl` and its local `meshd`: one JSON request line, one JSON
//! answer line, over a Unix socket that only root can open (`/var/run/meshd/IFNAME.sock`).

use crate::Cidr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Directory of the admin sockets, one per interface.
pub const SOCKET_DIR: &str = "/var/run/meshd";
/// Largest request or answer line accepted.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

pub fn socket_path(ifname: &str) -> String {
    format!("{SOCKET_DIR}/{ifname}.sock")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Mesh mode: re-read identity, trust bundle and revocation lists, as SIGHUP does.
    Reload,
    /// Mesh mode: contact this underlay endpoint (`IP:port`) and peer with whoever is there.
    PeerAdd {
        endpoint: String,
    },
    /// Mesh mode: the members this node knows.
    PeerList,
    /// Mesh mode: forget a member (by public key or `TD/NS/NAME`) and refuse it until restart.
    PeerRemove {
        id: String,
    },
    /// Flow-log records after sequence number `since` (0: the oldest kept), at most `limit`.
    Flows {
        #[serde(default)]
        since: u64,
        #[serde(default)]
        denied_only: bool,
        /// Only new flows that the staged policies would deny.
        #[serde(default)]
        staged_denied: bool,
        #[serde(default = "default_flow_limit")]
        limit: usize,
    },
    /// The policy set this node runs (signed, base64 of its encoding), if any.
    PolicyGet,
    /// Install a signed policy set (base64 of its encoding) and pass it to the whole mesh.
    PolicyApply {
        set: String,
    },
    /// The policy serial each node of the mesh last said it runs.
    PolicyStatus,
    /// Mesh mode: the flow logs of this node and every member of its trust domain, for a query
    /// a policy admin signed for this node (base64 of [`crate::flowquery::FlowQuery`]).
    MeshFlows {
        query: String,
    },
    /// Mesh mode: a workload this node runs (the CNI plugin's ADD): its certificate is asked of
    /// the issuer; the answer comes once it is in force here, or says why not (within
    /// `wait_ms`).
    WorkloadAttach {
        namespace: String,
        name: String,
        uid: String,
        #[serde(default = "default_attach_wait_ms")]
        wait_ms: u64,
    },
    /// Mesh mode: a workload this node no longer runs (the CNI plugin's DEL): its identity is
    /// withdrawn from the mesh.
    WorkloadDetach {
        namespace: String,
        name: String,
        uid: String,
    },
}

fn default_attach_wait_ms() -> u64 {
    10_000
}

fn default_flow_limit() -> usize {
    1000
}

/// One flow-log record: a new flow (allowed, denied or audited), or the end of one, with its
/// counts. Also the JSON line written to the flow log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `new`, `closed` (idle or finished) or `cut` (a policy change denied it).
    pub event: String,
    /// Where this node saw the first packet: `egress` (from its TUN) or `ingress` (from a peer).
    pub direction: String,
    /// `allow`, `deny`, or `audit` (denied by policy in audit mode; passed).
    pub verdict: String,
    pub protocol: String,
    pub src: FlowEnd,
    pub dst: FlowEnd,
    /// The deciding policy (`NetworkPolicy NS/NAME`, ...) or `default-deny`, `end-of-policies`,
    /// `no-policy`.
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A `Log` rule matched on the way to the verdict.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log_rule: bool,
    /// Closed flows: packets and bytes in both directions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// New flows, when the set stages policies: what the set with its staged changes would
    /// have decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedVerdict>,
    /// In a mesh-wide view (`meshctl flows --mesh`): the node whose log holds the record
    /// (`TD/NS/NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The answer to [`Request::MeshFlows`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshFlows {
    /// Every node's records, merged by time.
    pub records: Vec<FlowRecord>,
    /// Each node asked, and what it said.
    pub nodes: Vec<MeshFlowsNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshFlowsNode {
    /// `TD/NS/NAME`.
    pub node: String,
    /// Base64 static key: where a follow-up query's cursor goes.
    pub public_key: String,
    /// It answered in time (its last part arrived).
    pub answered: bool,
    pub records: usize,
    /// The sequence number to ask it from next.
    pub next: u64,
}

/// What the staged policies would have decided for a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVerdict {
    /// `allow` or `deny`.
    pub verdict: String,
    /// The deciding policy (a staged one: `StagedNetworkPolicy NS/NAME`, ...), as `policy`.
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The identity's trust domain, namespace and name (its service account); absent for an
    /// address no certificate names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The same identity as a SPIFFE ID: `spiffe://TD/ns/NAMESPACE/sa/NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// An address outside the mesh: the external networks that contain it, most specific first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A mesh peer not heard from for this long is offline: it sends a keepalive every 25 s, so this
/// is one keepalive lost and a margin.
pub const OFFLINE_AFTER_SECS: u64 = 60;

/// The policy set one node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicy {
    pub identity: String,
    /// 0: no policy set yet.
    pub serial: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Seconds since this node last received an authenticated datagram from the member (mesh
    /// peers send a keepalive at least every 25 s); absent for this node itself and for a member
    /// never reached. Older than [`OFFLINE_AFTER_SECS`]: the member is offline, and the serial is
    /// only what it last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_secs: Option<u64>,
    /// This node itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub this_node: bool,
}

// One per admin request; the size of the status answer does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Peers(Vec<MemberInfo>),
    Done {
        message: String,
    },
    Error {
        message: String,
    },
    Flows {
        records: Vec<FlowRecord>,
        next: u64,
    },
    /// Base64 of the signed set; `None` when the node has none.
    Policy {
        set: Option<String>,
    },
    PolicyStatus(Vec<NodePolicy>),
    MeshFlows(MeshFlows),
    /// An attached workload's identity in force on this node, and its addresses.
    Workload {
        identity: String,
        addresses: Vec<Cidr>,
        /// Unix seconds.
        not_after: u64,
    },
}

/// The data path of a node: what the kernel let it offload, and the heap allocations its two
/// threads made since start (they allocate their buffers once; a count that grows with traffic
/// would be a bug).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStatus {
    /// TUN device: `vnet header on, TSO on, USO on`, or which are off.
    pub tun_offloads: String,
    /// UDP segmentation (several datagrams per send).
    pub udp_gso: bool,
    pub send_allocations: u64,
    pub receive_allocations: u64,
    /// Reads from the TUN device, and the segments they were cut into: more segments than
    /// reads when the kernel hands over TCP or UDP super-packets.
    #[serde(default)]
    pub tun_reads: u64,
    #[serde(default)]
    pub tun_read_segments: u64,
    /// Writes to the TUN device, and the packets they carried: more packets than writes when
    /// decrypted segments were joined.
    #[serde(default)]
    pub tun_writes: u64,
    #[serde(default)]
    pub tun_written_packets: u64,
}

/// What `meshctl status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub public_key: Option<String>,
    pub listen_port: u16,
    pub mtu_bytes: u32,
    pub peers: Vec<PeerStatus>,
    /// Packets dropped by the device before a peer was known, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Mesh mode: this node's own identity (`TD/NS/NAME`), also as a SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Control-protocol bytes (UDP payload) received and sent.
    #[serde(default)]
    pub control_rx_bytes: u64,
    #[serde(default)]
    pub control_tx_bytes: u64,
    /// Frames this node relayed between two other members, and their bytes (`[relay] serve`).
    #[serde(default)]
    pub relayed_datagrams: u64,
    #[serde(default)]
    pub relayed_bytes: u64,
    /// The data path: offloads in use, and what its threads allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<DatapathStatus>,
    /// Mesh mode: the policy this node enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyStatus>,
    /// Mesh mode: what the control protocol spent and refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlStatus>,
    /// Mesh mode: this node's own certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<OwnCertificate>,
    /// Mesh mode: the workloads this node runs (attached), each with its identity once in
    /// force here, or why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<AttachedWorkload>,
}

/// A workload identity in force: a workload certificate bound to a member's key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// `TD/NS/NAME` (NAME is the service account).
    pub identity: String,
    pub addresses: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Named ports, `NAME=PORT/PROTO`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    pub serial: u64,
    /// Unix seconds, RFC 3339 on the wire.
    #[serde(with = "crate::time::as_rfc3339")]
    pub not_after: u64,
}

impl WorkloadInfo {
    pub fn of(c: &crate::cert::CertBody) -> WorkloadInfo {
        WorkloadInfo {
            identity: c.identity(),
            addresses: c.addrs.clone(),
            labels: c.labels.clone(),
            ports: c.ports.iter().map(ToString::to_string).collect(),
            serial: c.serial,
            not_after: c.not_after,
        }
    }
}

/// The state of an attached workload whose identity is in force on its node.
pub const IN_FORCE: &str = "in force";

/// A workload this node runs, as attached (the CNI plugin's ADD): which one, and its identity.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AttachedWorkload {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// [`IN_FORCE`], `asking the issuer`, `asking the issuer (not yet: WHY)` (the issuer
    /// cannot decide yet), `held, not in force (...)`, or `refused: WHY`.
    pub state: String,
    /// Its certificate, once the issuer gave one (kept through an issuer outage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<WorkloadInfo>,
}

/// What a node's control protocol spent on received datagrams, and what it refused, by reason
/// (`replay`, `cookie_required`, `busy`, `sender_rate`, `certificate`, ...; a certificate in a
/// member's list refused as `listed_superseded`, `listed_address_conflict`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ControlStatus {
    pub members: usize,
    /// X25519 operations spent on received datagrams.
    pub dh_ops: u64,
    /// Cookie replies sent to senders at addresses that had not shown they receive there.
    pub cookie_replies: u64,
    pub refused: BTreeMap<String, u64>,
    /// Authenticated messages received, by kind (`hello`, `members`, `policy_chunk`, ...).
    #[serde(default)]
    pub received: BTreeMap<String, u64>,
}

/// This node's own certificate, as the node holds it now (after any renewal), and why the mesh
/// would refuse it if it would.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OwnCertificate {
    pub identity: String,
    pub spiffe_id: String,
    pub addresses: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Named ports, `NAME=PORT/PROTO`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    pub serial: u64,
    /// Unix seconds, RFC 3339 on the wire.
    #[serde(with = "crate::time::as_rfc3339")]
    pub not_before: u64,
    #[serde(with = "crate::time::as_rfc3339")]
    pub not_after: u64,
    /// Why members refuse it now (expired, revoked, its CA no longer trusted); `None` while valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What the enforcement of one node is doing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The serial of the signed set in force; 0 for none.
    pub serial: u64,
    pub posture: String,
    pub audit: bool,
    pub policies: usize,
    pub identities: usize,
    pub conntrack_entries: usize,
    pub conntrack_evictions: u64,
    /// New flows allowed, denied, and denied but passed in audit mode; established flows cut
    /// by a policy change.
    pub allowed_flows: u64,
    pub denied_packets: u64,
    pub audited_flows: u64,
    pub cut_flows: u64,
    /// Flow-log events dropped because the logger fell behind.
    #[serde(default)]
    pub flow_log_lost: u64,
    /// Decisions on new flows by direction, deciding policy and action (each packet of a denied
    /// flow is decided again); counted by the flow logger, so `flow_log_lost` are missing here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<VerdictCount>,
    /// Packets dropped by rate limits (`policy.mesh/rate-limit`), and by policy.
    #[serde(default)]
    pub rate_limited_packets: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitCount>,
    /// Rate-limit buckets kept now (one per limited rule and source).
    #[serde(default)]
    pub rate_meters: usize,
}

/// What one policy's rate limits dropped in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitCount {
    pub direction: String,
    pub policy: String,
    /// New connections refused over a connection rate.
    pub refused_connections: u64,
    /// Packets dropped over a packet or byte rate (refused connections' first packets included).
    pub dropped_packets: u64,
}

/// How often one policy decided one way in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCount {
    /// `ingress` or `egress`.
    pub direction: String,
    /// The deciding policy, or `default-deny`.
    pub policy: String,
    /// `allow`, `deny` or `audit` (denied by policy, passed in audit mode).
    pub action: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<Cidr>,
    /// Seconds since the last completed handshake, if any.
    pub handshake_age_secs: Option<u64>,
    /// Seconds since the last authenticated datagram from the peer (a keepalive at least every
    /// 25 s from a mesh peer that is up), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_secs: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// UDP datagrams sent to and authenticated from this peer.
    #[serde(default)]
    pub tx_packets: u64,
    #[serde(default)]
    pub rx_packets: u64,
    /// Handshake messages from this peer that authenticated (initiations and responses).
    #[serde(default)]
    pub handshakes: u64,
    pub persistent_keepalive_secs: u16,
    /// Packets from or to this peer that were dropped, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Mesh mode: the identity its certificate names (`TD/NS/NAME`, and as a SPIFFE ID), labels
    /// and expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Named ports of its certificate, `NAME=PORT/PROTO`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::option_rfc3339"
    )]
    pub cert_not_after: Option<u64>,
    /// Mesh mode: the workload identities in force behind this peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadInfo>,
}

/// One member of the mesh as `meshctl peer list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub public_key: String,
    pub identity: String,
    pub spiffe_id: String,
    pub labels: BTreeMap<String, String>,
    /// Named ports of its certificate, `NAME=PORT/PROTO`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    pub addrs: Vec<Cidr>,
    pub endpoint: String,
    pub serial: u64,
    /// Certificate expiry: Unix seconds, RFC 3339 on the wire.
    #[serde(with = "crate::time::as_rfc3339")]
    pub not_after: u64,
    /// The workload identities in force behind this member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadInfo>,
}
