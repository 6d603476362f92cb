//! Just enough of IPv4 (RFC 791) and IPv6 (RFC 8200) headers to route a packet: its version and
//! its source and destination addresses. Everything is bounds-checked; a packet too short for its
//! header yields `None`, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const IPV4_HEADER_MIN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;

/// The addresses of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// Source and destination of `packet`, or `None` if it is not a well-formed IPv4 or IPv6 header.
pub fn addrs(packet: &[u8]) -> Option<Addrs> {
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < IPV4_HEADER_MIN || packet.len() < ihl {
                return None;
            }
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some(Addrs {
                src: Ipv4Addr::from(src).into(),
                dst: Ipv4Addr::from(dst).into(),
            })
        }
        6 => {
            if packet.len() < IPV6_HEADER_LEN {
                return None;
            }
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some(Addrs {
                src: Ipv6Addr::from(src).into(),
                dst: Ipv6Addr::from(dst).into(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn reads_v4_and_v6_addresses() {
        let a = addrs(&v4([100, 64, 0, 1], [100, 64, 0, 2])).unwrap();
        assert_eq!(a.src, "100.64.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(a.dst, "100.64.0.2".parse::<IpAddr>().unwrap());

        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        let a = addrs(&p).unwrap();
        assert_eq!(a.dst, "fd00::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rejects_short_and_unknown() {
        assert_eq!(addrs(&[]), None);
        assert_eq!(addrs(&v4([1; 4], [2; 4])[..19]), None);
        assert_eq!(addrs(&[0x60; 39]), None);
        assert_eq!(addrs(&[0x50; 60]), None);
        let mut bad_ihl = v4([1; 4], [2; 4]);
        bad_ihl[0] = 0x44;
        assert_eq!(addrs(&bad_ihl), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = addrs(&bytes);
        }
    }
}
