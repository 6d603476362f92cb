//! Rate limits by source identity: an Allow rule of a Calico policy may carry a limit on new
//! connections, packets and bytes per second, each with a burst, counted per source identity (or
//! per source and destination identity). They are written in an annotation, which Calico
//! ignores, so the same YAML still applies to a Calico cluster unchanged:
//!
//! ```yaml
//! metadata:
//!   annotations:
//!     policy.mesh/rate-limit: |
//!       ingress[0]: {connectionsPerSecond: 5, connectionBurst: 10, packetsPerSecond: 1000}
//! ```
//!
//! Pure: the annotation's parser, the token bucket, and the table of meters ([`meters`]) that
//! the data path asks, with the time as an argument.

pub mod meters;

use crate::engine::Direction;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The annotation that carries a policy's rate limits.
pub const RATE_LIMIT_ANNOTATION: &str = "policy.mesh/rate-limit";
/// The largest annotation value read.
pub const MAX_ANNOTATION_BYTES: usize = 64 * 1024;

/// One rate: a sustained amount per second, and how much may come at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u64,
    pub burst: u64,
}

/// Whose traffic shares a bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Per {
    /// One bucket per source identity (of the rule).
    #[default]
    Source,
    /// One bucket per (source identity, destination identity).
    SourceAndDestination,
}

/// A rule's limits; at least one is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub connections: Option<Rate>,
    pub packets: Option<Rate>,
    pub bytes: Option<Rate>,
    pub per: Per,
}

/// One rule's entry in the annotation, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    connections_per_second: Option<u64>,
    connection_burst: Option<u64>,
    packets_per_second: Option<u64>,
    packet_burst: Option<u64>,
    bytes_per_second: Option<u64>,
    byte_burst: Option<u64>,
    #[serde(default)]
    per: Per,
}

/// The smallest byte burst: one packet of the largest size.
pub const MIN_BYTE_BURST: u64 = 65_535;
/// The largest rate or burst: beyond it the arithmetic of a bucket could overflow.
const MAX_RATE: u64 = 1 << 40;

/// A `PER_SECOND`/`BURST` pair: the burst defaults to one second's worth.
fn rate(what: &str, per_second: Option<u64>, burst: Option<u64>) -> Result<Option<Rate>, String> {
    match (per_second, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(format!("a {what} burst needs {what}s per second")),
        (Some(0), _) => Err(format!(
            "{what}s per second must be at least 1 (a rule that allows nothing is a Deny rule)"
        )),
        (Some(r), b) => {
            let burst = b.unwrap_or(r);
            // A byte bucket that cannot hold one largest packet would drop it for ever.
            if what == "byte" && burst < MIN_BYTE_BURST {
                return Err(format!(
                    "a byte burst (the rate, if no byteBurst is given) must be at least {MIN_BYTE_BURST}, the largest packet"
                ));
            }
            if r > MAX_RATE || burst > MAX_RATE {
                return Err(format!("{what} rate and burst are at most {MAX_RATE}"));
            }
            if burst == 0 {
                return Err(format!("a {what} burst must be at least 1"));
            }
            Ok(Some(Rate {
                per_second: r,
                burst,
            }))
        }
    }
}

/// The limits of a policy's annotation value, by rule (`ingress[N]`, `egress[N]`): `Err` names
/// the rule and what is wrong with it.
pub fn parse(value: &str) -> Result<BTreeMap<(Direction, usize), RateLimit>, String> {
    if value.len() > MAX_ANNOTATION_BYTES {
        return Err(format!("longer than {MAX_ANNOTATION_BYTES} bytes"));
    }
    let raw: BTreeMap<String, Spec> = serde_yaml_ng::from_str(value).map_err(|e| {
        format!(
            "not a map of ingress[N]/egress[N] to {{connectionsPerSecond, connectionBurst, \
             packetsPerSecond, packetBurst, bytesPerSecond, byteBurst, per}}: {e}"
        )
    })?;
    let mut out = BTreeMap::new();
    for (rule, spec) in raw {
        let at = rule_ref(&rule)?;
        let limit = || -> Result<RateLimit, String> {
            Ok(RateLimit {
                connections: rate(
                    "connection",
                    spec.connections_per_second,
                    spec.connection_burst,
                )?,
                packets: rate("packet", spec.packets_per_second, spec.packet_burst)?,
                bytes: rate("byte", spec.bytes_per_second, spec.byte_burst)?,
                per: spec.per,
            })
        };
        let limit = limit().map_err(|e| format!("{rule}: {e}"))?;
        if limit.connections.is_none() && limit.packets.is_none() && limit.bytes.is_none() {
            return Err(format!(
                "{rule}: no limit (connectionsPerSecond, packetsPerSecond or bytesPerSecond)"
            ));
        }
        out.insert(at, limit);
    }
    Ok(out)
}

/// `ingress[N]` or `egress[N]`.
fn rule_ref(s: &str) -> Result<(Direction, usize), String> {
    let bad = || format!("`{s}` is not ingress[N] or egress[N]");
    let (dir, rest) = if let Some(r) = s.strip_prefix("ingress[") {
        (Direction::Ingress, r)
    } else if let Some(r) = s.strip_prefix("egress[") {
        (Direction::Egress, r)
    } else {
        return Err(bad());
    };
    let n = rest.strip_suffix(']').ok_or_else(bad)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 5 {
        return Err(bad());
    }
    Ok((dir, n.parse().map_err(|_| bad())?))
}

/// A token bucket in thousandths of a token, so that a rate of a few per second refills
/// smoothly at millisecond resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    milli_tokens: u64,
    last_ms: u64,
}

impl Bucket {
    /// A full bucket.
    pub fn full(rate: Rate, now_ms: u64) -> Bucket {
        Bucket {
            milli_tokens: rate.burst * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes `amount` tokens if the bucket, refilled at `rate` up to now, holds them; otherwise
    /// takes nothing and says no. A clock that goes back refills nothing.
    pub fn take(&mut self, rate: Rate, amount: u64, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        let cap = rate.burst * 1000;
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(rate.per_second))
            .min(cap);
        self.last_ms = self.last_ms.max(now_ms);
        let want = amount.saturating_mul(1000);
        if self.milli_tokens >= want {
            self.milli_tokens -= want;
            true
        } else {
            false
        }
    }

    /// Whether the bucket, refilled up to now, is full: forgetting it changes nothing.
    pub fn is_full(&self, rate: Rate, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.milli_tokens
            .saturating_add(elapsed.saturating_mul(rate.per_second))
            >= rate.burst * 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_annotation_reads_each_rule_and_says_what_is_wrong_where() {
        let l = parse(
            "ingress[0]: {connectionsPerSecond: 5, connectionBurst: 10, packetsPerSecond: 100}\n\
             egress[2]: {bytesPerSecond: 1000000, per: source-and-destination}\n",
        )
        .unwrap();
        let i = l[&(Direction::Ingress, 0)];
        assert_eq!(
            i.connections,
            Some(Rate {
                per_second: 5,
                burst: 10
            })
        );
        assert_eq!(
            i.packets,
            Some(Rate {
                per_second: 100,
                burst: 100
            })
        );
        assert_eq!(i.bytes, None);
        assert_eq!(i.per, Per::Source);
        assert_eq!(l[&(Direction::Egress, 2)].per, Per::SourceAndDestination);
        for (bad, says) in [
            (
                "ingress[0]: {packetsPerSecond: 0}",
                "ingress[0]: packets per second must be at least 1",
            ),
            (
                "ingress[0]: {packetBurst: 5}",
                "ingress[0]: a packet burst needs packets per second",
            ),
            ("ingress[0]: {}", "ingress[0]: no limit"),
            (
                "ingress[0]: {packetsPerSecnd: 5}",
                "unknown field `packetsPerSecnd`",
            ),
            (
                "ingres[0]: {packetsPerSecond: 5}",
                "`ingres[0]` is not ingress[N] or egress[N]",
            ),
            ("ingress[-1]: {packetsPerSecond: 5}", "`ingress[-1]` is not"),
            (
                "ingress[0]: {packetsPerSecond: 5, per: everyone}",
                "unknown variant `everyone`",
            ),
            (
                "ingress[0]: {packetsPerSecond: 5, packetBurst: 0}",
                "burst must be at least 1",
            ),
            ("ingress[0]: {bytesPerSecond: 99999999999999999}", "at most"),
            (
                "ingress[0]: {bytesPerSecond: 1000000, byteBurst: 1500}",
                "at least 65535",
            ),
            ("ingress[0]: {bytesPerSecond: 1000}", "at least 65535"),
            ("- 1", "not a map"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(parse(&"x".repeat(MAX_ANNOTATION_BYTES + 1))
            .unwrap_err()
            .contains("longer than"));
    }

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate() {
        let r = Rate {
            per_second: 10,
            burst: 5,
        };
        let mut b = Bucket::full(r, 1000);
        assert_eq!((0..20).filter(|_| b.take(r, 1, 1000)).count(), 5);
        // 10 per second: one every 100 ms.
        assert!(!b.take(r, 1, 1099));
        assert!(b.take(r, 1, 1100));
        assert!(!b.take(r, 1, 1150));
        // Idle for long: full again, never more than the burst.
        assert!(b.is_full(r, 10_000));
        assert_eq!((0..20).filter(|_| b.take(r, 1, 10_000)).count(), 5);
        // A clock that goes back refills nothing.
        assert!(!b.take(r, 1, 500));
    }

    const LIMITED: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
  annotations:
    policy.mesh/rate-limit: |
      ingress[1]: {connectionsPerSecond: 2, packetsPerSecond: 50}
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: TCP
    source: {serviceAccounts: {names: [api]}}
  - action: Allow
    protocol: TCP
    source: {serviceAccounts: {names: [search]}}
  - action: Deny
";

    fn compile(text: &str) -> Result<crate::engine::PolicySet, String> {
        let docs = crate::model::parse_documents(text, "t").map_err(|e| format!("{e:?}"))?;
        crate::engine::PolicySet::compile(&docs, crate::engine::Posture::ZeroTrust)
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn the_limit_is_on_the_rule_that_allowed_and_nowhere_else() {
        use crate::engine::{Endpoint, Flow};
        let set = compile(LIMITED).unwrap().in_trust_domain("cluster.local");
        let id = |name: &str| Endpoint {
            trust_domain: "cluster.local".into(),
            namespace: "microblog".into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            ip: None,
            ports: Vec::new(),
        };
        let c = set.resolve(&[id("post"), id("api"), id("search")]);
        assert!(c.has_limits());
        let flow = Flow {
            protocol: 6,
            src_port: Some(40000),
            dst_port: Some(8080),
            icmp: None,
            ip_version: 4,
        };
        let from = |src: u32| c.decide(Direction::Ingress, &flow, src, None, 0, None);
        let (api, search) = (from(1), from(2));
        assert!(api.allow && search.allow);
        assert_eq!(c.limit(Direction::Ingress, &api), None);
        let l = c
            .limit(Direction::Ingress, &search)
            .expect("search's rule is limited");
        assert_eq!(
            l.connections,
            Some(Rate {
                per_second: 2,
                burst: 2
            })
        );
        assert_eq!(
            l.packets,
            Some(Rate {
                per_second: 50,
                burst: 50
            })
        );
        // Calico ignores the annotation; without it the same policy has no limit.
        let plain = LIMITED.replace(RATE_LIMIT_ANNOTATION, "other.example/note");
        let c = compile(&plain)
            .unwrap()
            .resolve(&[id("post"), id("api"), id("search")]);
        assert!(!c.has_limits());
    }

    #[test]
    fn a_limit_that_names_no_allow_rule_is_refused_with_the_policy_and_annotation() {
        for (from, to, says) in [
            (
                "ingress[1]",
                "ingress[2]",
                "ingress[2] is not an Allow rule",
            ),
            (
                "ingress[1]",
                "ingress[3]",
                "the policy has no rule ingress[3]",
            ),
            (
                "ingress[1]",
                "egress[0]",
                "the policy has no rule egress[0]",
            ),
            (
                "connectionsPerSecond: 2",
                "connectionsPerSecond: -2",
                "ingress[1]",
            ),
        ] {
            let e = compile(&LIMITED.replace(from, to)).unwrap_err();
            assert!(e.contains(says), "{to}: {e}");
            assert!(
                e.contains("metadata.annotations[policy.mesh/rate-limit]"),
                "{e}"
            );
            assert!(e.contains("post-allow-list"), "{e}");
        }
        let k8s = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: k
  namespace: microblog
  annotations: {policy.mesh/rate-limit: 'ingress[0]: {packetsPerSecond: 5}'}
spec:
  podSelector: {}
  ingress: [{}]
";
        let e = compile(k8s).unwrap_err();
        assert!(e.contains("rate limits are for Calico policies"), "{e}");
    }

    proptest! {
        /// Over any schedule, what passes is at most the burst plus the rate times the time.
        #[test]
        fn never_more_than_burst_plus_rate_times_time(
            per_second in 1u64..10_000,
            burst in 1u64..10_000,
            steps in proptest::collection::vec((0u64..50, 1u64..2000), 1..300),
        ) {
            let r = Rate { per_second, burst };
            let mut b = Bucket::full(r, 0);
            let (mut now, mut passed) = (0u64, 0u64);
            for (dt, amount) in steps {
                now += dt;
                if b.take(r, amount, now) {
                    passed += amount;
                }
            }
            prop_assert!(passed * 1000 <= burst * 1000 + now * per_second);
        }
    }
}
