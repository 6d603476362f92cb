//! What the CNI specification (1.0, and 0.3/0.4) asks of a plugin, as pure functions: the
//! network configuration on standard input, `CNI_ARGS`, the result and error documents, and the
//! names and nftables rules the plugin makes for a pod. Unit-tested without a namespace.

use proto::Cidr;
use serde::Deserialize;
use serde_json::{json, Value};

/// The CNI versions this plugin speaks.
pub const SUPPORTED: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The network configuration on standard input is at most this large.
pub const MAX_CONF_BYTES: usize = 1 << 20;
/// The plugin's `type` in a network configuration.
pub const TYPE: &str = "meshd-cni";
/// The nftables table of the anti-spoofing rules.
pub const TABLE: &str = "meshd-cni";

/// A CNI error: its code (the specification's, or 100 and up for this plugin's own) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error document the plugin prints on standard output.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The specification's codes.
pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const INVALID_ENV: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
/// This plugin's: the mesh refused the pod's identity.
pub const IDENTITY_REFUSED: u32 = 100;

/// The plugin's network configuration, as the runtime gives it on standard input.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The mesh interface whose meshd gives pods their identities (its admin socket is
    /// `/run/meshd/IFNAME.sock`).
    #[serde(default = "default_mesh_interface")]
    pub mesh_interface: String,
    /// How long ADD waits for the pod's certificate before it fails (milliseconds).
    #[serde(default = "default_wait_ms")]
    pub attach_wait_ms: u64,
    // Set by runtimes; read or passed over.
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    #[serde(default)]
    pub capabilities: Option<Value>,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default)]
    pub dns: Option<Value>,
    #[serde(default)]
    pub ipam: Option<Value>,
}

fn default_mesh_interface() -> String {
    "mesh0".into()
}

fn default_wait_ms() -> u64 {
    10_000
}

/// Reads the network configuration; the error names what is wrong.
pub fn parse_conf(bytes: &[u8]) -> Result<NetConf, CniError> {
    if bytes.len() > MAX_CONF_BYTES {
        return Err(CniError::new(
            DECODE_FAILURE,
            "network configuration too large",
            format!("{} bytes; at most {MAX_CONF_BYTES}", bytes.len()),
        ));
    }
    let conf: NetConf = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            DECODE_FAILURE,
            "network configuration is not valid",
            e.to_string(),
        )
    })?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!("{} (supported: {})", conf.cni_version, SUPPORTED.join(", ")),
        ));
    }
    if conf.kind != TYPE {
        return Err(CniError::new(
            INVALID_CONFIG,
            "wrong plugin type",
            format!("type is {}, not {TYPE}", conf.kind),
        ));
    }
    if conf.ipam.is_some() {
        return Err(CniError::new(
            INVALID_CONFIG,
            "ipam is not used",
            "a pod's addresses are the ones its certificate names, from the issuer",
        ));
    }
    check_ifname("meshInterface", &conf.mesh_interface)
        .map_err(|e| CniError::new(INVALID_CONFIG, "invalid meshInterface", e))?;
    if !(100..=120_000).contains(&conf.attach_wait_ms) {
        return Err(CniError::new(
            INVALID_CONFIG,
            "invalid attachWaitMs",
            format!("{} (100 to 120000)", conf.attach_wait_ms),
        ));
    }
    Ok(conf)
}

/// An interface name: 1-15 of `A-Z a-z 0-9 _ . -`, not `.` or `..`.
pub fn check_ifname(what: &str, name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(format!("{what} `{name}`: 1-15 of A-Z a-z 0-9 _ . -"))
    }
}

/// The pod a kubelet names in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Reads `CNI_ARGS` (`K=V;K=V`): the pod's namespace, name and UID must be there; other keys
/// are passed over.
pub fn parse_args(args: &str) -> Result<Pod, CniError> {
    let (mut namespace, mut name, mut uid) = (None, None, None);
    for item in args.split(';').filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(CniError::new(
                INVALID_ENV,
                "CNI_ARGS is not K=V;K=V",
                format!("`{item}`"),
            ));
        };
        let slot = match k {
            "K8S_POD_NAMESPACE" => &mut namespace,
            "K8S_POD_NAME" => &mut name,
            "K8S_POD_UID" => &mut uid,
            _ => continue,
        };
        if v.is_empty() || v.len() > proto::workload::MAX_REF_BYTES {
            return Err(CniError::new(
                INVALID_ENV,
                format!("CNI_ARGS: {k} is empty or longer than 253 bytes"),
                "",
            ));
        }
        *slot = Some(v.to_string());
    }
    let need = |v: Option<String>, k: &str| {
        v.ok_or_else(|| {
            CniError::new(
                INVALID_ENV,
                format!("CNI_ARGS has no {k}"),
                args.to_string(),
            )
        })
    };
    Ok(Pod {
        namespace: need(namespace, "K8S_POD_NAMESPACE")?,
        name: need(name, "K8S_POD_NAME")?,
        uid: need(uid, "K8S_POD_UID")?,
    })
}

/// The host side of a pod's veth: `msh` and 12 hex digits of a hash of the container and its
/// interface (FNV-1a), so ADD and DEL find the same name.
pub fn host_veth(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("msh{:012x}", h & 0xffff_ffff_ffff)
}

/// The nftables script that drops, at the host side of a pod's veth, every packet whose source
/// is not one of the pod's `addrs` (IPv6 link-local too, for neighbour discovery), and records the
/// veth and the addresses in the table's sets. When `new_table`, it makes the table for mesh
/// interface `mesh`: a pod's address is taken from no interface but its veth (a neighbour on the
/// underlay cannot send as a pod, which the mesh would carry under the pod's identity); a pod
/// veth is reached only from the mesh interface, where both pods' policies decided (never past
/// meshd, if a route is missing); and decrypted traffic for a pod's address goes nowhere but a
/// pod veth (never out of the node unencrypted, before or after the veth exists).
pub fn nft_install(host: &str, addrs: &[Cidr], mesh: &str, new_table: bool) -> String {
    let v4: Vec<String> = addrs
        .iter()
        .filter(|a| a.addr().is_ipv4())
        .map(|a| a.addr().to_string())
        .collect();
    let mut v6: Vec<String> = addrs
        .iter()
        .filter(|a| a.addr().is_ipv6())
        .map(|a| a.addr().to_string())
        .collect();
    v6.push("fe80::/10".into());
    let set = |v: &[String]| format!("{{ {} }}", v.join(", "));
    let mut s = String::new();
    if new_table {
        s.push_str(&format!(
            "add table inet {TABLE}\n\
             add map inet {TABLE} pods {{ type ifname : verdict; }}\n\
             add set inet {TABLE} podifs {{ type ifname; }}\n\
             add set inet {TABLE} pod4 {{ type ipv4_addr; }}\n\
             add set inet {TABLE} pod6 {{ type ipv6_addr; }}\n\
             add chain inet {TABLE} prerouting {{ type filter hook prerouting priority raw; policy accept; }}\n\
             add rule inet {TABLE} prerouting iifname vmap @pods\n\
             add rule inet {TABLE} prerouting iifname != @podifs iifname != \"{mesh}\" ip saddr @pod4 counter drop\n\
             add rule inet {TABLE} prerouting iifname != @podifs iifname != \"{mesh}\" ip6 saddr @pod6 counter drop\n\
             add chain inet {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
             add rule inet {TABLE} forward oifname @podifs iifname != \"{mesh}\" counter drop\n\
             add rule inet {TABLE} forward iifname \"{mesh}\" ip daddr @pod4 oifname != @podifs counter drop\n\
             add rule inet {TABLE} forward iifname \"{mesh}\" ip6 daddr @pod6 oifname != @podifs counter drop\n"
        ));
    }
    s.push_str(&format!("add chain inet {TABLE} pod-{host}\n"));
    if v4.is_empty() {
        s.push_str(&format!(
            "add rule inet {TABLE} pod-{host} meta nfproto ipv4 counter drop\n"
        ));
    } else {
        s.push_str(&format!(
            "add rule inet {TABLE} pod-{host} meta nfproto ipv4 ip saddr != {} counter drop\n",
            set(&v4)
        ));
    }
    s.push_str(&format!(
        "add rule inet {TABLE} pod-{host} meta nfproto ipv6 ip6 saddr != {} counter drop\n",
        set(&v6)
    ));
    s.push_str(&format!(
        "add element inet {TABLE} pods {{ \"{host}\" : jump pod-{host} }}\n\
         add element inet {TABLE} podifs {{ \"{host}\" }}\n"
    ));
    s.push_str(&set_elements("add", addrs));
    s
}

/// Adds or deletes (`verb`) a pod's addresses in the table's address sets.
fn set_elements(verb: &str, addrs: &[Cidr]) -> String {
    addrs
        .iter()
        .map(|a| {
            let set = if a.addr().is_ipv4() { "pod4" } else { "pod6" };
            format!("{verb} element inet {TABLE} {set} {{ {} }}\n", a.addr())
        })
        .collect()
}

/// The nftables script that removes a pod's rules (run after its veth is gone).
pub fn nft_remove(host: &str, addrs: &[Cidr]) -> String {
    format!(
        "delete element inet {TABLE} pods {{ \"{host}\" }}\n\
         delete element inet {TABLE} podifs {{ \"{host}\" }}\n\
         delete chain inet {TABLE} pod-{host}\n{}",
        set_elements("delete", addrs)
    )
}

/// The ADD result: the host veth, the pod's interface in its namespace, its addresses, and a
/// default route for each family it has.
pub fn add_result(version: &str, host: &str, ifname: &str, netns: &str, addrs: &[Cidr]) -> Value {
    let old = version != "1.0.0";
    let ips: Vec<Value> = addrs
        .iter()
        .map(|a| {
            let mut ip = json!({"address": a.to_string(), "interface": 1});
            if old {
                ip["version"] = json!(if a.addr().is_ipv4() { "4" } else { "6" });
            }
            ip
        })
        .collect();
    let mut routes = Vec::new();
    if addrs.iter().any(|a| a.addr().is_ipv4()) {
        routes.push(json!({"dst": "0.0.0.0/0"}));
    }
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        routes.push(json!({"dst": "::/0"}));
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": host},
            {"name": ifname, "sandbox": netns},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// The VERSION answer.
pub fn version_result(version: &str) -> Value {
    json!({"cniVersion": version, "supportedVersions": SUPPORTED})
}

#[cfg(test)]
#[path = "spec/tests.rs"]
mod tests;
