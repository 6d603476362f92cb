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

/// The five-tuple and the transport details policy and connection tracking look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (after IPv6 extension headers).
    pub protocol: u8,
    /// TCP, UDP, UDP-Lite and SCTP ports; 0 for other protocols.
    pub src_port: u16,
    pub dst_port: u16,
    /// ICMP or ICMPv6 type and code.
    pub icmp: Option<(u8, u8)>,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 otherwise.
    pub tcp_flags: u8,
    /// True for a non-first fragment (its ports are not in this packet).
    pub later_fragment: bool,
    /// For a fragment, first or later: its IP identification (IPv4's 16 bits, IPv6's fragment
    /// header's 32), which with the addresses and protocol names the datagram it belongs to.
    pub fragment_id: Option<u32>,
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_UDPLITE: u8 = 136;

/// IPv6 extension headers walked before giving up (RFC 8200 section 4 recommends a small bound).
const MAX_EXTENSION_HEADERS: usize = 8;

impl FlowKey {
    /// Parses `packet`'s headers; `None` if they are truncated or malformed. Reads at most the
    /// IP header, a bounded chain of IPv6 extension headers and 14 bytes of transport header.
    pub fn parse(packet: &[u8]) -> Option<FlowKey> {
        Self::parse_at(packet, false).map(|(k, _)| k)
    }

    /// For an ICMP or ICMPv6 error (destination unreachable, time exceeded, parameter problem,
    /// packet too big), the flow of the packet it quotes, as that packet was sent (RFC 792, RFC
    /// 4443 section 2.4: the quote starts with the IP header and at least 8 bytes after it).
    pub fn quoted(packet: &[u8]) -> Option<FlowKey> {
        let (outer, l4) = Self::parse_at(packet, false)?;
        let is_error = match (outer.protocol, outer.icmp?) {
            (PROTO_ICMP, (t, _)) => matches!(t, 3 | 11 | 12),
            (PROTO_ICMPV6, (t, _)) => matches!(t, 1..=4),
            _ => false,
        };
        if !is_error {
            return None;
        }
        let (inner, _) = Self::parse_at(packet.get(l4 + 8..)?, true)?;
        (inner.protocol != PROTO_ICMP && inner.protocol != PROTO_ICMPV6 || inner.icmp.is_some())
            .then_some(inner)
    }

    /// Parses the headers and returns the offset of the transport header. A `quote` (inside an
    /// ICMP error) needs only the first 8 bytes of the transport header.
    fn parse_at(packet: &[u8], quote: bool) -> Option<(FlowKey, usize)> {
        let a = addrs(packet)?;
        let mut fragment_id = None;
        let (mut protocol, mut off, mut later_fragment) = if packet[0] >> 4 == 4 {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let flags = u16::from_be_bytes([packet[6], packet[7]]);
            let offset = flags & 0x1fff;
            if offset != 0 || flags & 0x2000 != 0 {
                fragment_id = Some(u32::from(u16::from_be_bytes([packet[4], packet[5]])));
            }
            (packet[9], ihl, offset != 0)
        } else {
            (packet[6], IPV6_HEADER_LEN, false)
        };
        if packet[0] >> 4 == 6 {
            for _ in 0..MAX_EXTENSION_HEADERS {
                match protocol {
                    // Hop-by-hop, routing, destination options: length in 8-byte units after the first 8.
                    0 | 43 | 60 => {
                        let h = packet.get(off..off + 2)?;
                        protocol = h[0];
                        off += (usize::from(h[1]) + 1) * 8;
                    }
                    // Fragment header: fixed 8 bytes.
                    44 => {
                        let h = packet.get(off..off + 8)?;
                        protocol = h[0];
                        later_fragment = u16::from_be_bytes([h[2], h[3]]) >> 3 != 0;
                        fragment_id = Some(u32::from_be_bytes([h[4], h[5], h[6], h[7]]));
                        off += 8;
                    }
                    _ => break,
                }
            }
            if matches!(protocol, 0 | 43 | 44 | 60) {
                return None;
            }
        }
        let mut key = FlowKey {
            src: a.src,
            dst: a.dst,
            protocol,
            src_port: 0,
            dst_port: 0,
            icmp: None,
            tcp_flags: 0,
            later_fragment,
            fragment_id,
        };
        if later_fragment {
            return Some((key, off));
        }
        let l4 = packet.get(off..)?;
        match protocol {
            PROTO_TCP => {
                let h = l4.get(..if quote { 8 } else { 14 })?;
                key.src_port = u16::from_be_bytes([h[0], h[1]]);
                key.dst_port = u16::from_be_bytes([h[2], h[3]]);
                key.tcp_flags = h.get(13).copied().unwrap_or(0);
            }
            PROTO_UDP | PROTO_UDPLITE | PROTO_SCTP => {
                let h = l4.get(..4)?;
                key.src_port = u16::from_be_bytes([h[0], h[1]]);
                key.dst_port = u16::from_be_bytes([h[2], h[3]]);
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                let h = l4.get(..2)?;
                key.icmp = Some((h[0], h[1]));
                // Echo: the identifier stands in for both ports, so a request and its reply are
                // one flow, and two pings between the same hosts are two (RFC 792, RFC 4443 4.1).
                if is_echo(protocol, h[0]) {
                    let id = l4.get(4..6)?;
                    key.src_port = u16::from_be_bytes([id[0], id[1]]);
                    key.dst_port = key.src_port;
                }
            }
            _ => {}
        }
        Some((key, off))
    }
}

/// ICMP echo request or reply (type 8/0, ICMPv6 128/129).
pub fn is_echo(protocol: u8, icmp_type: u8) -> bool {
    matches!(
        (protocol, icmp_type),
        (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129)
    )
}

#[cfg(test)]
mod quote_tests {
    use super::*;

    fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn an_icmp_error_names_the_flow_it_quotes() {
        // A's TCP SYN to B port 8080, quoted with only 8 transport bytes, as routers do.
        let syn = v4(
            PROTO_TCP,
            [100, 64, 0, 1],
            [100, 64, 0, 2],
            &[0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1],
        );
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&syn);
        let err = v4(PROTO_ICMP, [100, 64, 0, 2], [100, 64, 0, 1], &icmp);
        let q = FlowKey::quoted(&err).unwrap();
        assert_eq!(
            (q.src_port, q.dst_port, q.protocol),
            (40000, 8080, PROTO_TCP)
        );
        assert_eq!(q.src, "100.64.0.1".parse::<IpAddr>().unwrap());
        // Not an error type: nothing quoted.
        let mut echo = icmp.clone();
        echo[0] = 8;
        assert_eq!(
            FlowKey::quoted(&v4(PROTO_ICMP, [1; 4], [2; 4], &echo)),
            None
        );
        // A quote cut short of the ports is not a flow.
        assert_eq!(FlowKey::quoted(&err[..err.len() - 5]), None);
    }

    #[test]
    fn echo_identifier_keys_request_and_reply_alike() {
        let req = FlowKey::parse(&v4(
            PROTO_ICMP,
            [1; 4],
            [2; 4],
            &[8, 0, 0, 0, 0x12, 0x34, 0, 1],
        ))
        .unwrap();
        let rep = FlowKey::parse(&v4(
            PROTO_ICMP,
            [2; 4],
            [1; 4],
            &[0, 0, 0, 0, 0x12, 0x34, 0, 1],
        ))
        .unwrap();
        assert_eq!((req.src_port, rep.dst_port), (0x1234, 0x1234));
        let unreach = FlowKey::parse(&v4(
            PROTO_ICMP,
            [2; 4],
            [1; 4],
            &[3, 1, 0, 0, 0x12, 0x34, 0, 1],
        ))
        .unwrap();
        assert_eq!(unreach.src_port, 0);
    }
}

#[cfg(test)]
mod flow_tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn tcp_udp_and_icmp() {
        let mut tcp = [0u8; 20];
        tcp[..4].copy_from_slice(&[0x9c, 0x40, 0x1f, 0x90]);
        tcp[13] = 0x02;
        let k = FlowKey::parse(&v4(PROTO_TCP, &tcp)).unwrap();
        assert_eq!((k.src_port, k.dst_port, k.tcp_flags), (40000, 8080, 0x02));
        let k = FlowKey::parse(&v4(PROTO_UDP, &[0, 53, 0, 54, 0, 8, 0, 0])).unwrap();
        assert_eq!((k.protocol, k.src_port, k.dst_port), (PROTO_UDP, 53, 54));
        let k = FlowKey::parse(&v4(PROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1])).unwrap();
        assert_eq!(k.icmp, Some((8, 0)));
        assert_eq!(
            FlowKey::parse(&v4(PROTO_TCP, &tcp[..13])),
            None,
            "truncated TCP header"
        );
    }

    #[test]
    fn ipv6_extension_headers_and_fragments() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = 0; // hop-by-hop
        p[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[44, 0, 0, 0, 0, 0, 0, 0]); // hop-by-hop, next: fragment
        p.extend_from_slice(&[PROTO_UDP, 0, 0, 0, 0, 0, 0, 7]); // first fragment, next: UDP
        p.extend_from_slice(&[0x13, 0x88, 0x00, 0x35]);
        let k = FlowKey::parse(&p).unwrap();
        assert_eq!(
            (k.protocol, k.src_port, k.dst_port, k.later_fragment),
            (PROTO_UDP, 5000, 53, false)
        );
        assert_eq!(k.fragment_id, Some(7));
        // A later fragment: no ports.
        let n = p.len();
        p[n - 8] = 0x00;
        p[n - 9] = 0x08; // offset 1 (in 8-byte units) lives in bytes 2..4 of the fragment header
        let k = FlowKey::parse(&p).unwrap();
        assert!(k.later_fragment);
        assert_eq!(k.dst_port, 0);
        assert_eq!(k.fragment_id, Some(7));
    }

    #[test]
    fn ipv4_fragments_carry_their_identification() {
        let mut p = v4(PROTO_UDP, &[0x13, 0x88, 0x00, 0x35, 0, 8, 0, 0]);
        assert_eq!(
            FlowKey::parse(&p).unwrap().fragment_id,
            None,
            "a whole datagram"
        );
        p[4..6].copy_from_slice(&0xbeefu16.to_be_bytes());
        p[6] = 0x20; // more fragments, offset 0: the first fragment
        let k = FlowKey::parse(&p).unwrap();
        assert_eq!(
            (k.fragment_id, k.later_fragment, k.dst_port),
            (Some(0xbeef), false, 53)
        );
        p[6] = 0x00;
        p[7] = 0x03; // offset 3, last fragment
        let k = FlowKey::parse(&p).unwrap();
        assert_eq!(
            (k.fragment_id, k.later_fragment, k.dst_port),
            (Some(0xbeef), true, 0)
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = FlowKey::parse(&bytes);
        }
    }
}
