//! An IP prefix as WireGuard's allowed IPs use it: `100.64.0.0/10`, `fd00::1/128`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address prefix whose host bits are zero (`10.1.2.3/8` parses to `10.0.0.0/8`, as the kernel
/// and wireguard-go store it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("`{0}` is not an IP address")]
    Address(String),
    #[error("prefix length `{text}` is not a number from 0 to {max}")]
    PrefixLength { text: String, max: u8 },
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr, CidrError> {
        let max = max_len(&addr);
        if prefix_len > max {
            return Err(CidrError::PrefixLength {
                text: prefix_len.to_string(),
                max,
            });
        }
        Ok(Cidr {
            addr: mask(addr, prefix_len),
            prefix_len,
        })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        let (fa, a0, a1) = self.span();
        let (fb, b0, b1) = other.span();
        fa == fb && a0 <= b0 && b1 <= a1
    }

    /// Whether `self` and `other` share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// The prefix as an interval: its family (4 or 6) and its first and last address as
    /// numbers. Two prefixes overlap exactly when their intervals of one family do.
    pub fn span(&self) -> (u8, u128, u128) {
        let (family, first, bits) = match self.addr {
            IpAddr::V4(a) => (4, u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (6, u128::from(a), 128),
        };
        let host_bits = u32::from(bits - self.prefix_len);
        let last = match host_bits {
            128 => u128::MAX,
            h => first | ((1u128 << h) - 1),
        };
        (family, first, last)
    }
}

fn max_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// `addr` with every bit past `len` cleared.
pub fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDR/LEN`, or a bare address meaning a host prefix (/32 or /128), as `wg` accepts.
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let s = s.trim();
        let (addr_text, len_text) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| CidrError::Address(addr_text.to_string()))?;
        let max = max_len(&addr);
        let len = match len_text {
            None => max,
            Some(t) => match t.parse::<u8>() {
                Ok(l) if l <= max => l,
                _ => {
                    return Err(CidrError::PrefixLength {
                        text: t.to_string(),
                        max,
                    })
                }
            },
        };
        Cidr::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn spans_overlap_exactly_when_prefixes_do() {
        let c = |t: &str| t.parse::<Cidr>().unwrap();
        assert_eq!(c("10.0.0.0/8").span(), (4, 0x0a00_0000, 0x0aff_ffff));
        assert_eq!(c("0.0.0.0/0").span(), (4, 0, 0xffff_ffff));
        assert_eq!(c("::/0").span(), (6, 0, u128::MAX));
        assert_eq!(c("fd00::1/128").span().1, c("fd00::1/128").span().2);
        let all = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "11.0.0.0/8",
            "0.0.0.0/0",
            "::/0",
            "fd00::/8",
            "fd00::1/128",
            "::a01:203/128",
        ];
        for a in all {
            for b in all {
                let (a, b) = (c(a), c(b));
                let (fa, sa, ea) = a.span();
                let (fb, sb, eb) = b.span();
                let by_span = fa == fb && sa <= eb && sb <= ea;
                let by_prefix = a.contains(b.addr()) || b.contains(a.addr());
                assert_eq!(by_span, by_prefix, "{a} {b}");
            }
        }
    }

    use super::*;

    #[test]
    fn parses_and_masks() {
        let c: Cidr = "100.64.1.7/10".parse().unwrap();
        assert_eq!(c.to_string(), "100.64.0.0/10");
        assert!(c.contains("100.127.255.255".parse().unwrap()));
        assert!(!c.contains("100.128.0.0".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        assert_eq!(
            "fd00::1".parse::<Cidr>().unwrap().to_string(),
            "fd00::1/128"
        );
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert_eq!(
            "100.64.0.1/33".parse::<Cidr>(),
            Err(CidrError::PrefixLength {
                text: "33".into(),
                max: 32
            })
        );
        assert_eq!(
            "nope/8".parse::<Cidr>(),
            Err(CidrError::Address("nope".into()))
        );
        assert!("fd00::/129".parse::<Cidr>().is_err());
    }
}
