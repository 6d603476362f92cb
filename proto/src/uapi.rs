//! The WireGuard cross-platform userspace API (UAPI), the `key=value` protocol that `wg` speaks to
//! wireguard-go and boringtun over `/var/run/wireguard/IFNAME.sock`
//! (<https://www.wireguard.com/xplatform/>).
//!
//! A request is `get=1\n\n` or `set=1\n` followed by `key=value` lines and an empty line. The
//! answer to both ends in `errno=N\n\n`. This module parses the body of a `set` and serialises the
//! body of a `get`; the socket loop lives in meshd.

use crate::{Cidr, Key};
use std::fmt::Write;
use std::net::SocketAddr;

/// Longest line we accept; the longest valid one (an IPv6 endpoint or a hex key) is under 100.
pub const MAX_LINE_BYTES: usize = 512;
/// Largest request body; enough for tens of thousands of allowed IPs.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// errno values the protocol returns, as wireguard-go does.
pub const EINVAL: i32 = 22;
pub const EPROTO: i32 = 71;
pub const EIO: i32 = 5;
pub const EADDRINUSE: i32 = 98;

/// A parsed `set=1` request, applied in order by the device.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SetRequest {
    /// `Some(None)` removes the private key (an all-zero key does that).
    pub private_key: Option<Option<Key>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(None)` clears the preshared key.
    pub preshared_key: Option<Option<Key>>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; `Some(0)` turns keepalive off.
    pub persistent_keepalive_secs: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<Cidr>,
}

impl PeerUpdate {
    fn new(public_key: Key) -> PeerUpdate {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_secs: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// Why a `set` was refused: the line, the key and what was wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("UAPI line {line}: `{key}`: {reason}")]
pub struct UapiError {
    pub line: usize,
    pub key: String,
    pub reason: String,
    pub errno: i32,
}

/// Parses the lines of a `set=1` body (without the `set=1` line and the final empty line).
pub fn parse_set(body: &str) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for (i, raw) in body.lines().enumerate() {
        let line = i + 2; // line 1 is `set=1`
        if raw.is_empty() {
            continue;
        }
        let err = |key: &str, reason: String, errno: i32| UapiError {
            line,
            key: key.to_string(),
            reason,
            errno,
        };
        if raw.len() > MAX_LINE_BYTES {
            return Err(err(
                "",
                format!("line longer than {MAX_LINE_BYTES} bytes"),
                EPROTO,
            ));
        }
        let Some((key, value)) = raw.split_once('=') else {
            return Err(err(raw, "expected key=value".into(), EPROTO));
        };
        let invalid = |what: &str| err(key, format!("`{value}` is not {what}"), EINVAL);
        let flag = |v: &str| -> Result<bool, UapiError> {
            match v {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(invalid("true or false")),
            }
        };
        let hex_key = |v: &str| Key::from_hex(v).map_err(|e| err(key, e.to_string(), EINVAL));

        if key == "public_key" {
            req.peers.push(PeerUpdate::new(hex_key(value)?));
            continue;
        }
        match req.peers.last_mut() {
            None => match key {
                "private_key" => {
                    let k = hex_key(value)?;
                    req.private_key = Some(if k.is_zero() { None } else { Some(k) });
                }
                "listen_port" => {
                    req.listen_port = Some(value.parse().map_err(|_| invalid("a port"))?)
                }
                "fwmark" => req.fwmark = Some(value.parse().map_err(|_| invalid("a number"))?),
                "replace_peers" => req.replace_peers = flag(value)?,
                _ => return Err(err(key, "unknown interface key".into(), EPROTO)),
            },
            Some(peer) => match key {
                "remove" => peer.remove = flag(value)?,
                "update_only" => peer.update_only = flag(value)?,
                "preshared_key" => {
                    let k = hex_key(value)?;
                    peer.preshared_key = Some(if k.is_zero() { None } else { Some(k) });
                }
                "endpoint" => {
                    peer.endpoint = Some(value.parse().map_err(|_| invalid("an IP:port"))?)
                }
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive_secs =
                        Some(value.parse().map_err(|_| invalid("a number of seconds"))?)
                }
                "replace_allowed_ips" => peer.replace_allowed_ips = flag(value)?,
                "allowed_ip" => peer.allowed_ips.push(
                    value
                        .parse()
                        .map_err(|e: crate::cidr::CidrError| err(key, e.to_string(), EINVAL))?,
                ),
                "protocol_version" => {
                    if value != "1" {
                        return Err(invalid("protocol version 1"));
                    }
                }
                _ => return Err(err(key, "unknown peer key".into(), EPROTO)),
            },
        }
    }
    Ok(req)
}

/// What a `get=1` reports about the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last handshake as (seconds, nanoseconds) since the Unix epoch;
    /// (0, 0) means never.
    pub last_handshake: (u64, u32),
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub persistent_keepalive_secs: u16,
    pub allowed_ips: Vec<Cidr>,
}

/// The body of a `get=1` answer, ending with `errno=0` and the empty line.
pub fn format_get(info: &DeviceInfo) -> String {
    let mut out = String::with_capacity(256 + info.peers.len() * 256);
    if let Some(k) = &info.private_key {
        let _ = writeln!(out, "private_key={}", k.to_hex());
    }
    let _ = writeln!(out, "listen_port={}", info.listen_port);
    if info.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", info.fwmark);
    }
    for p in &info.peers {
        let _ = writeln!(out, "public_key={}", p.public_key.to_hex());
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(out, "preshared_key={}", k.to_hex());
        }
        let _ = writeln!(out, "protocol_version=1");
        if let Some(e) = &p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let _ = writeln!(out, "last_handshake_time_sec={}", p.last_handshake.0);
        let _ = writeln!(out, "last_handshake_time_nsec={}", p.last_handshake.1);
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive_secs
        );
        for a in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={a}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUB_HEX: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
    const PRIV_HEX: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";

    /// The example from the protocol's documentation, minus the `set=1` line.
    #[test]
    fn parses_documented_set_example() {
        let body = format!(
            "private_key={PRIV_HEX}\nfwmark=0\nlisten_port=12912\nreplace_peers=true\n\
             public_key={PUB_HEX}\npreshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52\n\
             replace_allowed_ips=true\nallowed_ip=192.168.4.4/32\n\
             endpoint=[abcd:23::33%2]:51820\n\
             public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376\n\
             replace_allowed_ips=true\nallowed_ip=192.168.4.6/32\npersistent_keepalive_interval=111\n\
             endpoint=182.122.22.19:3233\n\
             public_key=662e14fd594556f522604703340351258903b64f35553763f19426ab2a515c58\n\
             endpoint=5.152.198.39:51820\nreplace_allowed_ips=true\nallowed_ip=192.168.4.10/32\n\
             allowed_ip=192.168.4.11/32\n\
             public_key=e818b58db5274087fcc1be5dc728cf53d3b5726b4cef6b9bab8f8f8c2452c25c\n\
             remove=true\n"
        );
        let req = parse_set(&body).unwrap();
        assert_eq!(
            req.private_key,
            Some(Some(Key::from_hex(PRIV_HEX).unwrap()))
        );
        assert_eq!(req.listen_port, Some(12912));
        assert!(req.replace_peers);
        assert_eq!(req.peers.len(), 4);
        assert_eq!(req.peers[0].public_key.to_hex(), PUB_HEX);
        assert_eq!(req.peers[0].endpoint.unwrap().port(), 51820);
        assert_eq!(req.peers[1].persistent_keepalive_secs, Some(111));
        assert_eq!(req.peers[2].allowed_ips.len(), 2);
        assert!(req.peers[2].replace_allowed_ips);
        assert!(req.peers[3].remove);
    }

    #[test]
    fn zero_private_key_removes_it() {
        let req = parse_set(&format!("private_key={}\n", "0".repeat(64))).unwrap();
        assert_eq!(req.private_key, Some(None));
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = parse_set("listen_port=70000\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str(), e.errno),
            (2, "listen_port", EINVAL)
        );
        let e = parse_set(&format!("public_key={PUB_HEX}\nallowed_ip=1.2.3.4/40\n")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "allowed_ip"));
        assert!(e.reason.contains("40"), "{e}");
        let e = parse_set("bogus=1\n").unwrap_err();
        assert_eq!(e.errno, EPROTO);
        let e = parse_set("remove=true\n").unwrap_err();
        assert_eq!(e.key, "remove", "peer key before any public_key");
        let e = parse_set(&format!("public_key={PUB_HEX}\nlisten_port=1\n")).unwrap_err();
        assert_eq!(e.key, "listen_port", "interface key inside a peer section");
        assert!(parse_set("noequals\n").is_err());
        assert!(parse_set(&"a".repeat(MAX_LINE_BYTES + 1)).is_err());
    }

    #[test]
    fn get_lists_interface_then_peers_and_ends_with_errno() {
        let info = DeviceInfo {
            private_key: Some(Key::from_hex(PRIV_HEX).unwrap()),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerInfo {
                public_key: Key::from_hex(PUB_HEX).unwrap(),
                preshared_key: None,
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                last_handshake: (1700000000, 5),
                tx_bytes: 10,
                rx_bytes: 20,
                persistent_keepalive_secs: 25,
                allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            }],
        };
        let text = format_get(&info);
        let expected = format!(
            "private_key={PRIV_HEX}\nlisten_port=51820\npublic_key={PUB_HEX}\nprotocol_version=1\n\
             endpoint=198.18.0.2:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n\
             persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nerrno=0\n\n"
        );
        assert_eq!(text, expected);
    }
}
