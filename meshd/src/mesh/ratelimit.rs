//! A token bucket per source address for control datagrams: each sealed one costs two X25519
//! operations, so a flood from one address must not take the control plane's CPU. Pure: time is an
//! argument. The table is bounded; when full, the stalest source is forgotten.

use std::collections::HashMap;
use std::net::IpAddr;

pub struct SourceLimiter {
    rate_per_sec: u32,
    burst: u32,
    max_sources: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

struct Bucket {
    tokens_milli: u64,
    last_ms: u64,
}

impl SourceLimiter {
    pub fn new(rate_per_sec: u32, burst: u32, max_sources: usize) -> SourceLimiter {
        SourceLimiter {
            rate_per_sec,
            burst,
            max_sources,
            buckets: HashMap::new(),
        }
    }

    /// True if a datagram from `source` at `now_ms` is within its budget (and spends a token).
    pub fn allow(&mut self, source: IpAddr, now_ms: u64) -> bool {
        let cap = u64::from(self.burst) * 1000;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.max_sources {
            if let Some(stalest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last_ms)
                .map(|(k, _)| *k)
            {
                self.buckets.remove(&stalest);
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

#[cfg(test)]
mod tests {
    use super::*;

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
        }
        assert_eq!(l.buckets.len(), 3);
    }
}
