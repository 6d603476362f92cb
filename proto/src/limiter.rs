//! Token buckets for the control plane's costly work: per source address (answers to unknown
//! senders), per authenticated sender (after the first Diffie-Hellman), and one for all (a global
//! budget, `K = ()`). Pure: time is an argument. The table is bounded; when full, the keys whose
//! buckets have refilled are forgotten (a new bucket starts full, so nothing is lost), and if
//! none has, all are: a flood of new sources costs a pass over the table once per table's worth
//! of them, never one per datagram.

use std::collections::HashMap;
use std::hash::Hash;

pub struct SourceLimiter<K> {
    rate_per_sec: u32,
    burst: u32,
    max_sources: usize,
    buckets: HashMap<K, Bucket>,
}

struct Bucket {
    tokens_milli: u64,
    last_ms: u64,
}

impl<K: Hash + Eq + Copy> SourceLimiter<K> {
    pub fn new(rate_per_sec: u32, burst: u32, max_sources: usize) -> SourceLimiter<K> {
        SourceLimiter {
            rate_per_sec,
            burst,
            max_sources,
            buckets: HashMap::new(),
        }
    }

    /// True if a datagram from `source` at `now_ms` is within its budget (and spends a token).
    pub fn allow(&mut self, source: K, now_ms: u64) -> bool {
        let cap = u64::from(self.burst) * 1000;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.max_sources {
            let rate = u64::from(self.rate_per_sec.max(1));
            self.buckets
                .retain(|_, b| b.tokens_milli + now_ms.saturating_sub(b.last_ms) * rate < cap);
            if self.buckets.len() >= self.max_sources {
                self.buckets.clear();
            }
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            tokens_milli: cap,
            last_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.last_ms);
        b.tokens_milli = (b.tokens_milli + elapsed * u64::from(self.rate_per_sec)).min(cap);
        b.last_ms = now_ms;
        if b.tokens_milli >= 1000 {
            b.tokens_milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// The source a budget per source is kept for: an IPv4 address, or an IPv6 address's /64 (one
/// host is commonly given a whole /64, so its addresses are one source).
pub fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        v4 @ std::net::IpAddr::V4(_) => v4,
        std::net::IpAddr::V6(a) => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(a) & !((1u128 << 64) - 1),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn an_ipv6_host_is_one_source_whatever_address_of_its_64_it_sends_from() {
        let mut l = SourceLimiter::new(1, 1, 16);
        let a: IpAddr = "fd00:1:2:3::1".parse().unwrap();
        let b: IpAddr = "fd00:1:2:3:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "fd00:1:2:4::1".parse().unwrap();
        assert!(l.allow(source_of(a), 0));
        assert!(!l.allow(source_of(b), 0), "the same /64");
        assert!(l.allow(source_of(other), 0), "another /64");
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(source_of(v4), v4);
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(source_of(mapped), v4, "an IPv4 host on an IPv6 socket");
    }

    #[test]
    fn bursts_then_refills_at_the_rate_per_source() {
        let mut l = SourceLimiter::new(10, 20, 4);
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!((0..100).filter(|_| l.allow(a, 0)).count(), 20, "the burst");
        assert!(l.allow(b, 0), "another source has its own budget");
        assert!(!l.allow(a, 50));
        assert!(l.allow(a, 100), "one token per 100 ms at 10/s");
        assert_eq!((0..100).filter(|_| l.allow(a, 1100)).count(), 10);
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut l = SourceLimiter::new(10, 1, 3);
        for i in 0..100u8 {
            l.allow(IpAddr::from([198, 18, 0, i]), u64::from(i));
            assert!(l.buckets.len() <= 3);
        }
    }

    #[test]
    fn a_full_table_forgets_only_sources_whose_buckets_refilled_while_any_have() {
        let mut l = SourceLimiter::new(10, 2, 3);
        let (a, b, c, d): (IpAddr, IpAddr, IpAddr, IpAddr) = (
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            "198.18.0.3".parse().unwrap(),
            "198.18.0.4".parse().unwrap(),
        );
        // a spends its burst at 0; b and c one token each, later.
        assert!(l.allow(a, 0) && l.allow(a, 0) && !l.allow(a, 0));
        assert!(l.allow(b, 150) && l.allow(c, 150));
        // At 200 a has refilled (2 tokens at 10/s take 200 ms); b and c have not: d takes a's
        // place, and b is still held to what it spent.
        assert!(l.allow(d, 200));
        assert_eq!(l.buckets.len(), 3);
        assert!(!l.buckets.contains_key(&a));
        assert!(
            l.allow(b, 200) && !l.allow(b, 200),
            "b: the 1.5 tokens it had, then none"
        );
    }
}
