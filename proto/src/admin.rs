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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Reloading,
    Peers(Vec<MemberInfo>),
    Done { message: String },
    Error { message: String },
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
    /// Mesh mode: this node's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Control-protocol bytes (UDP payload) received and sent.
    #[serde(default)]
    pub control_rx_bytes: u64,
    #[serde(default)]
    pub control_tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<Cidr>,
    /// Seconds since the last completed handshake, if any.
    pub handshake_age_secs: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub persistent_keepalive_secs: u16,
    /// Packets from or to this peer that were dropped, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Mesh mode: the identity its certificate names (`TD/NS/NAME`), labels and expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<u64>,
}

/// One member of the mesh as `meshctl peer list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub public_key: String,
    pub identity: String,
    pub spiffe_id: String,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<Cidr>,
    pub endpoint: String,
    pub serial: u64,
    /// Certificate expiry, seconds since the Unix epoch.
    pub not_after: u64,
}
