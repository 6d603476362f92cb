//! Cryptokey routing's allowed-IPs table: longest-prefix match from an inner address to a peer.
//! Pure: no I/O, no clocks. One hash map per prefix length that is in use, probed from the
//! longest length down, so a lookup costs at most as many probes as there are distinct lengths.

use proto::cidr::mask;
use proto::Cidr;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Family<T>,
    v6: Family<T>,
}

#[derive(Debug, Clone)]
struct Family<T> {
    /// (prefix length, prefixes of that length), longest first; no empty maps.
    by_len: Vec<(u8, HashMap<IpAddr, T>)>,
}

impl<T> Default for Family<T> {
    fn default() -> Self {
        Family { by_len: Vec::new() }
    }
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

impl<T> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&self, ip: &IpAddr) -> &Family<T> {
        if ip.is_ipv4() {
            &self.v4
        } else {
            &self.v6
        }
    }

    /// Maps `cidr` to `value`; an existing entry for the same prefix is replaced and returned,
    /// as WireGuard moves an allowed IP from one peer to another.
    pub fn insert(&mut self, cidr: Cidr, value: T) -> Option<T> {
        let fam = if cidr.addr().is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        let len = cidr.prefix_len();
        let pos = match fam.by_len.iter().position(|(l, _)| *l <= len) {
            Some(p) if fam.by_len[p].0 == len => p,
            Some(p) => {
                fam.by_len.insert(p, (len, HashMap::new()));
                p
            }
            None => {
                fam.by_len.push((len, HashMap::new()));
                fam.by_len.len() - 1
            }
        };
        fam.by_len[pos].1.insert(cidr.addr(), value)
    }

    /// The value of the longest prefix holding `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        self.family(&ip)
            .by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(ip, *len)))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.v4
            .by_len
            .iter()
            .chain(self.v6.by_len.iter())
            .map(|(_, m)| m.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(c("0.0.0.0/0"), "default");
        t.insert(c("100.64.0.0/10"), "mesh");
        t.insert(c("100.64.1.0/24"), "b");
        t.insert(c("100.64.1.7/32"), "host");
        t.insert(c("fd00::/8"), "v6");
        assert_eq!(t.lookup(ip("100.64.1.7")), Some(&"host"));
        assert_eq!(t.lookup(ip("100.64.1.8")), Some(&"b"));
        assert_eq!(t.lookup(ip("100.65.0.1")), Some(&"mesh"));
        assert_eq!(t.lookup(ip("198.18.0.1")), Some(&"default"));
        assert_eq!(t.lookup(ip("fd12::1")), Some(&"v6"));
        assert_eq!(t.lookup(ip("fe80::1")), None);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn same_prefix_moves_to_new_value() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(c("100.64.0.2/32"), 1), None);
        assert_eq!(t.insert(c("100.64.0.2/32"), 2), Some(1));
        assert_eq!(t.lookup(ip("100.64.0.2")), Some(&2));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn families_do_not_mix() {
        let mut t = AllowedIps::new();
        t.insert(c("::/0"), 6);
        assert_eq!(t.lookup(ip("100.64.0.1")), None);
    }

    proptest! {
        /// The table agrees with a linear scan for the longest containing prefix.
        #[test]
        fn agrees_with_linear_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 1..40),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            let mut t = AllowedIps::new();
            let mut list: Vec<(Cidr, usize)> = Vec::new();
            for (i, (a, l)) in prefixes.iter().enumerate() {
                let cidr = Cidr::new(IpAddr::V4((*a).into()), *l).unwrap();
                t.insert(cidr, i);
                list.retain(|(c, _)| *c != cidr);
                list.push((cidr, i));
            }
            for p in probes {
                let addr = IpAddr::V4(p.into());
                let expect = list.iter().filter(|(c, _)| c.contains(addr))
                    .max_by_key(|(c, _)| c.prefix_len()).map(|(_, v)| v);
                prop_assert_eq!(t.lookup(addr), expect);
            }
        }
    }
}
