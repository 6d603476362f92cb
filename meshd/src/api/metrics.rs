//! What `/metrics` and `/readyz` say, made from the same [`Status`] that `meshctl status` shows,
//! so the two never disagree. Pure: a status and a time in, text out.
//!
//! Names follow Prometheus conventions: the `meshd_` prefix, the unit in the name, `_total` on
//! counters (added by the exposition crate), labels for the peer's key and identity.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::admin::Status;

type Labels = Vec<(&'static str, String)>;

/// Drop reasons that are a handshake that failed (`meshd_handshake_failures_total`).
const HANDSHAKE_FAILURES: &[&str] = &["handshake_failed", "bad_mac", "unknown_peer"];

/// Builds families of one kind and registers them by name.
struct Exposition {
    registry: Registry,
}

impl Exposition {
    // The crate ends every help text with a full stop of its own.
    fn counter(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let family = Family::<Labels, Counter>::default();
        for (labels, v) in rows {
            family.get_or_create(&labels).inc_by(v);
        }
        self.registry
            .register(name, help.trim_end_matches('.'), family);
    }

    fn gauge(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, i64)>) {
        let family = Family::<Labels, Gauge>::default();
        for (labels, v) in rows {
            family.get_or_create(&labels).set(v);
        }
        self.registry
            .register(name, help.trim_end_matches('.'), family);
    }

    /// A counter without labels.
    fn counter1(&mut self, name: &str, help: &str, v: u64) {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        self.registry.register(name, help.trim_end_matches('.'), c);
    }

    /// A gauge without labels.
    fn gauge1(&mut self, name: &str, help: &str, v: i64) {
        let g = Gauge::<i64>::default();
        g.set(v);
        self.registry.register(name, help.trim_end_matches('.'), g);
    }
}

/// The Prometheus (OpenMetrics) text for `status` and the readiness `ready`.
pub fn render(status: &Status, ready: &Readiness, version: &str) -> String {
    let mut x = Exposition {
        registry: Registry::default(),
    };
    let peer = |p: &proto::admin::PeerStatus| -> Labels {
        vec![
            ("public_key", p.public_key.clone()),
            ("identity", p.identity.clone().unwrap_or_default()),
        ]
    };
    x.gauge(
        "meshd_build_info",
        "The running meshd: version and commit.",
        [(vec![("version", version.to_string())], 1)],
    );
    x.gauge1(
        "meshd_ready",
        "1 when the interface is up, the identity valid and a policy in force (as /readyz).",
        ready.is_ready() as i64,
    );
    x.gauge1(
        "meshd_peers",
        "WireGuard peers configured on the interface.",
        status.peers.len() as i64,
    );
    x.counter(
        "meshd_peer_rx_bytes",
        "UDP payload bytes received from the peer and authenticated.",
        status.peers.iter().map(|p| (peer(p), p.rx_bytes)),
    );
    x.counter(
        "meshd_peer_tx_bytes",
        "UDP payload bytes sent to the peer.",
        status.peers.iter().map(|p| (peer(p), p.tx_bytes)),
    );
    x.counter(
        "meshd_peer_rx_packets",
        "Datagrams received from the peer and authenticated.",
        status.peers.iter().map(|p| (peer(p), p.rx_packets)),
    );
    x.counter(
        "meshd_peer_tx_packets",
        "Datagrams sent to the peer.",
        status.peers.iter().map(|p| (peer(p), p.tx_packets)),
    );
    x.counter(
        "meshd_peer_handshakes",
        "Handshake messages from the peer that authenticated.",
        status.peers.iter().map(|p| (peer(p), p.handshakes)),
    );
    x.gauge(
        "meshd_peer_last_seen_age_seconds",
        "Seconds since the last authenticated datagram from the peer (peers heard at least once).",
        status
            .peers
            .iter()
            .filter_map(|p| Some((peer(p), p.last_seen_secs? as i64))),
    );
    x.gauge(
        "meshd_peer_certificate_expiry_timestamp_seconds",
        "When the member's certificate expires, Unix seconds.",
        status
            .peers
            .iter()
            .filter_map(|p| Some((peer(p), p.cert_not_after? as i64))),
    );
    // Drops of the device (before a peer is known) and of each peer, by reason.
    let drops: Vec<(Labels, u64)> = status
        .drops
        .iter()
        .map(|(reason, n)| {
            (
                vec![("reason", reason.clone()), ("public_key", String::new())],
                *n,
            )
        })
        .chain(status.peers.iter().flat_map(|p| {
            p.drops.iter().map(|(reason, n)| {
                (
                    vec![
                        ("reason", reason.clone()),
                        ("public_key", p.public_key.clone()),
                    ],
                    *n,
                )
            })
        }))
        .collect();
    let mut failures: std::collections::BTreeMap<String, u64> = Default::default();
    for (labels, n) in &drops {
        if HANDSHAKE_FAILURES.contains(&labels[0].1.as_str()) {
            *failures.entry(labels[0].1.clone()).or_default() += n;
        }
    }
    x.counter(
        "meshd_dropped_packets",
        "Packets and datagrams not delivered, by reason (public_key empty: before a peer was known).",
        drops,
    );
    x.counter(
        "meshd_handshake_failures",
        "Handshake messages refused, by reason.",
        failures.into_iter().map(|(r, n)| (vec![("reason", r)], n)),
    );
    x.counter1(
        "meshd_control_rx_bytes",
        "Control-protocol bytes received.",
        status.control_rx_bytes,
    );
    x.counter1(
        "meshd_control_tx_bytes",
        "Control-protocol bytes sent.",
        status.control_tx_bytes,
    );
    x.counter1(
        "meshd_relayed_datagrams",
        "Frames relayed between two other members.",
        status.relayed_datagrams,
    );
    x.counter1(
        "meshd_relayed_bytes",
        "Bytes of frames relayed between two other members.",
        status.relayed_bytes,
    );
    if let Some(c) = &status.control {
        x.gauge1(
            "meshd_members",
            "Members of the mesh this node knows (itself not counted).",
            c.members as i64,
        );
        x.counter(
            "meshd_control_messages",
            "Control-protocol messages that authenticated, by kind.",
            c.received
                .iter()
                .map(|(k, n)| (vec![("kind", k.clone())], *n)),
        );
        x.counter(
            "meshd_control_refused",
            "Control-protocol datagrams refused, and certificates refused in members' lists (listed_*), by reason.",
            c.refused
                .iter()
                .map(|(k, n)| (vec![("reason", k.clone())], *n)),
        );
        x.counter1(
            "meshd_control_dh_operations",
            "X25519 operations spent on received control datagrams.",
            c.dh_ops,
        );
        x.counter1(
            "meshd_control_cookie_replies",
            "Cookie replies sent to senders that had not shown they receive at their address.",
            c.cookie_replies,
        );
    }
    if let Some(own) = &status.certificate {
        let id = vec![("identity", own.identity.clone())];
        x.gauge(
            "meshd_certificate_expiry_timestamp_seconds",
            "When this node's own certificate expires, Unix seconds.",
            [(id.clone(), own.not_after as i64)],
        );
        x.gauge(
            "meshd_certificate_serial",
            "The serial of this node's own certificate.",
            [(id, own.serial as i64)],
        );
    }
    if let Some(p) = &status.policy {
        x.gauge1(
            "meshd_policy_serial",
            "The serial of the signed policy set in force (0: none).",
            p.serial as i64,
        );
        x.gauge1(
            "meshd_policy_policies",
            "Policies in the set in force.",
            p.policies as i64,
        );
        x.counter(
            "meshd_policy_verdicts",
            "Decisions on new flows by direction, deciding policy (or default-deny) and action (allow, deny, audit).",
            p.verdicts.iter().map(|v| {
                (
                    vec![
                        ("direction", v.direction.clone()),
                        ("policy", v.policy.clone()),
                        ("action", v.action.clone()),
                    ],
                    v.count,
                )
            }),
        );
        let by_policy = |r: &proto::admin::RateLimitCount| {
            vec![
                ("direction", r.direction.clone()),
                ("policy", r.policy.clone()),
            ]
        };
        x.counter(
            "meshd_policy_rate_limited_packets",
            "Packets dropped over a rule's rate limit (policy.mesh/rate-limit), by direction and policy.",
            p.rate_limits
                .iter()
                .map(|r| (by_policy(r), r.dropped_packets)),
        );
        x.counter(
            "meshd_policy_rate_limited_connections",
            "New connections refused over a rule's connection rate, by direction and policy.",
            p.rate_limits
                .iter()
                .map(|r| (by_policy(r), r.refused_connections)),
        );
        x.counter1(
            "meshd_policy_cut_flows",
            "Established flows cut because a new policy denies them.",
            p.cut_flows,
        );
        x.gauge1(
            "meshd_conntrack_entries",
            "Flows tracked now.",
            p.conntrack_entries as i64,
        );
        x.counter1(
            "meshd_conntrack_evictions",
            "Tracked flows evicted because the table was full.",
            p.conntrack_evictions,
        );
        x.counter1(
            "meshd_flow_log_lost_events",
            "Flow-log events dropped because the logger fell behind.",
            p.flow_log_lost,
        );
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &x.registry);
    text
}

/// The checks `/readyz` makes, each passed with what it saw or failed with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub checks: Vec<(&'static str, Result<String, String>)>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.checks.iter().all(|(_, r)| r.is_ok())
    }

    /// One line per check: `ok interface: ...` or `FAIL identity: ...`.
    pub fn text(&self) -> String {
        self.checks
            .iter()
            .map(|(name, r)| match r {
                Ok(m) => format!("ok   {name}: {m}\n"),
                Err(m) => format!("FAIL {name}: {m}\n"),
            })
            .collect()
    }
}

/// Ready when the interface is up with a key, the node's identity is valid at `now_secs`, and a
/// policy is in force: a signed set, or the Calico posture (which lets an endpoint that no policy
/// selects talk). Under the zero-trust posture without a set every flow is denied: not ready.
pub fn readiness(status: &Status, now_secs: u64) -> Readiness {
    let interface = match &status.public_key {
        Some(_) => Ok(format!("{} up", status.interface)),
        None => Err(format!("{} has no private key", status.interface)),
    };
    let identity = match &status.certificate {
        None => Ok("not in mesh mode".to_string()),
        Some(c) => {
            if let Some(problem) = &c.problem {
                Err(format!("{}: {problem}", c.identity))
            } else if now_secs >= c.not_after {
                Err(format!("{}: certificate expired", c.identity))
            } else if now_secs < c.not_before {
                Err(format!("{}: certificate not valid yet", c.identity))
            } else {
                Ok(format!(
                    "{} valid for {} s",
                    c.identity,
                    c.not_after - now_secs
                ))
            }
        }
    };
    let policy = match (&status.policy, &status.certificate) {
        (_, None) | (None, _) => Ok("no enforcement on this interface".to_string()),
        (Some(p), Some(_)) if p.serial > 0 => Ok(format!("set {} in force", p.serial)),
        (Some(p), Some(_)) if p.posture == "calico" => {
            Ok("no set yet; the calico posture allows endpoints no policy selects".to_string())
        }
        (Some(_), Some(_)) => {
            Err("no policy set yet; the zero-trust posture denies every flow".into())
        }
    };
    Readiness {
        checks: vec![
            ("interface", interface),
            ("identity", identity),
            ("policy", policy),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::admin::{OwnCertificate, PeerStatus, PolicyStatus, VerdictCount};

    fn status() -> Status {
        Status {
            datapath: None,
            interface: "mesh0".into(),
            public_key: Some("k".into()),
            listen_port: 51820,
            mtu_bytes: 1420,
            peers: vec![PeerStatus {
                public_key: "PEER=".into(),
                endpoint: None,
                allowed_ips: vec![],
                handshake_age_secs: Some(3),
                last_seen_secs: Some(2),
                tx_bytes: 1000,
                rx_bytes: 2000,
                tx_packets: 10,
                rx_packets: 20,
                handshakes: 2,
                persistent_keepalive_secs: 25,
                drops: [("bad_mac".to_string(), 4), ("replay".to_string(), 1)].into(),
                identity: Some("td/prod/api".into()),
                spiffe_id: None,
                labels: Default::default(),
                ports: Vec::new(),
                cert_not_after: Some(2_000_000_000),
                workloads: Vec::new(),
            }],
            drops: [("handshake_failed".to_string(), 3)].into(),
            identity: Some("td/prod/web".into()),
            spiffe_id: None,
            control_rx_bytes: 5,
            control_tx_bytes: 6,
            relayed_datagrams: 0,
            relayed_bytes: 0,
            policy: Some(PolicyStatus {
                serial: 7,
                posture: "zero-trust".into(),
                verdicts: vec![VerdictCount {
                    direction: "ingress".into(),
                    policy: "default.allow-web".into(),
                    action: "allow".into(),
                    count: 9,
                }],
                rate_limits: vec![proto::admin::RateLimitCount {
                    direction: "ingress".into(),
                    policy: "NetworkPolicy prod/web".into(),
                    refused_connections: 4,
                    dropped_packets: 11,
                }],
                ..Default::default()
            }),
            control: None,
            certificate: Some(OwnCertificate {
                identity: "td/prod/web".into(),
                not_before: 100,
                not_after: 1000,
                serial: 42,
                ..Default::default()
            }),
            workloads: Vec::new(),
        }
    }

    #[test]
    fn metrics_name_units_and_totals() {
        let s = status();
        let text = render(&s, &readiness(&s, 500), "0.1.0 (abc)");
        for line in [
            r#"meshd_peer_rx_bytes_total{public_key="PEER=",identity="td/prod/api"} 2000"#,
            r#"meshd_peer_tx_packets_total{public_key="PEER=",identity="td/prod/api"} 10"#,
            r#"meshd_peer_handshakes_total{public_key="PEER=",identity="td/prod/api"} 2"#,
            r#"meshd_dropped_packets_total{reason="bad_mac",public_key="PEER="} 4"#,
            r#"meshd_dropped_packets_total{reason="handshake_failed",public_key=""} 3"#,
            r#"meshd_handshake_failures_total{reason="bad_mac"} 4"#,
            r#"meshd_handshake_failures_total{reason="handshake_failed"} 3"#,
            r#"meshd_policy_verdicts_total{direction="ingress",policy="default.allow-web",action="allow"} 9"#,
            r#"meshd_policy_rate_limited_packets_total{direction="ingress",policy="NetworkPolicy prod/web"} 11"#,
            r#"meshd_policy_rate_limited_connections_total{direction="ingress",policy="NetworkPolicy prod/web"} 4"#,
            r#"meshd_policy_serial 7"#,
            r#"meshd_certificate_expiry_timestamp_seconds{identity="td/prod/web"} 1000"#,
            r#"meshd_peer_certificate_expiry_timestamp_seconds{public_key="PEER=",identity="td/prod/api"} 2000000000"#,
            r#"meshd_ready 1"#,
            r#"meshd_build_info{version="0.1.0 (abc)"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(text.contains("# TYPE meshd_peer_rx_bytes counter"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn an_expired_identity_is_not_ready_and_says_why() {
        let s = status();
        assert!(readiness(&s, 999).is_ready());
        let r = readiness(&s, 1000);
        assert!(!r.is_ready());
        assert!(
            r.text()
                .contains("FAIL identity: td/prod/web: certificate expired"),
            "{}",
            r.text()
        );
        let text = render(&s, &r, "v");
        assert!(text.lines().any(|l| l == "meshd_ready 0"));
    }

    #[test]
    fn a_revoked_identity_is_not_ready() {
        let mut s = status();
        s.certificate.as_mut().unwrap().problem = Some("revoked by its CA".into());
        let r = readiness(&s, 500);
        assert!(!r.is_ready());
        assert!(r.text().contains("revoked"));
    }

    #[test]
    fn zero_trust_without_a_set_is_not_ready_but_calico_is() {
        let mut s = status();
        s.policy.as_mut().unwrap().serial = 0;
        let r = readiness(&s, 500);
        assert!(!r.is_ready());
        assert!(r.text().contains("FAIL policy"), "{}", r.text());
        s.policy.as_mut().unwrap().posture = "calico".into();
        assert!(readiness(&s, 500).is_ready());
    }

    #[test]
    fn an_interface_without_a_key_is_not_ready() {
        let mut s = status();
        s.public_key = None;
        assert!(!readiness(&s, 500).is_ready());
    }
}
