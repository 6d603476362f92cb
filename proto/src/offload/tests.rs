use super::*;
use proptest::prelude::*;

const SRC4: [u8; 4] = [100, 64, 0, 1];
const DST4: [u8; 4] = [100, 64, 0, 2];
const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;
const CWR: u8 = 0x80;

/// A TCP packet as an application's stack would hand it to TUN with TSO: checksums complete.
#[derive(Clone, Debug)]
struct Tcp {
    v6: bool,
    tos: u8,
    ttl: u8,
    id: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: Vec<u8>,
    payload: Vec<u8>,
    sport: u16,
}

impl Tcp {
    fn new(v6: bool, payload: Vec<u8>) -> Tcp {
        Tcp {
            v6,
            tos: 0,
            ttl: 64,
            id: 7,
            seq: 1000,
            ack: 5000,
            flags: ACK,
            window: 512,
            options: vec![],
            payload,
            sport: 40000,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let ip_len = if self.v6 { 40 } else { 20 };
        let tcp_len = 20 + self.options.len();
        let total = ip_len + tcp_len + self.payload.len();
        let mut p = vec![0u8; total];
        if self.v6 {
            p[0] = 0x60 | (self.tos >> 4);
            p[1] = self.tos << 4;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = self.ttl;
            p[8..24].copy_from_slice(&SRC6);
            p[24..40].copy_from_slice(&DST6);
        } else {
            p[0] = 0x45;
            p[1] = self.tos;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&self.id.to_be_bytes());
            p[6] = 0x40; // DF
            p[8] = self.ttl;
            p[9] = 6;
            p[12..16].copy_from_slice(&SRC4);
            p[16..20].copy_from_slice(&DST4);
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&self.sport.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&self.seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&self.ack.to_be_bytes());
        p[t + 12] = ((tcp_len / 4) as u8) << 4;
        p[t + 13] = self.flags;
        p[t + 14..t + 16].copy_from_slice(&self.window.to_be_bytes());
        p[t + 20..t + tcp_len].copy_from_slice(&self.options);
        p[t + tcp_len..].copy_from_slice(&self.payload);
        let l = Layout::of(&p).unwrap();
        l.set_ip_length(&mut p, total);
        set_transport_checksum(&l, &mut p);
        p
    }

    fn hdr(&self, gso_size: u16) -> VnetHdr {
        let ip_len = if self.v6 { 40 } else { 20 };
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if self.v6 {
                GsoType::TcpV6
            } else {
                GsoType::TcpV4
            },
            hdr_len: (ip_len + 20 + self.options.len()) as u16,
            gso_size,
            csum_start: ip_len as u16,
            csum_offset: 16,
        }
    }
}

fn split_all(hdr: &VnetHdr, packet: &[u8]) -> Vec<Vec<u8>> {
    let mut arena = Arena::new(1 << 20, 4096);
    let mut resume = 0;
    assert_eq!(split(hdr, packet, &mut arena, &mut resume), Ok(true));
    arena.iter().map(<[u8]>::to_vec).collect()
}

fn ipv4_checksum_ok(p: &[u8]) -> bool {
    p[0] >> 4 != 4 || fold(sum(&p[..20], 0)) == 0xffff
}

/// Coalesces `packets`; returns each written packet's virtio header and bytes (the iovecs the
/// data path would write, joined).
fn coalesce_all(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
    coalesce_with(packets, true)
}

fn coalesce_with(packets: &[Vec<u8>], udp: bool) -> Vec<(VnetHdr, Vec<u8>)> {
    let mut arena = Arena::new(1 << 20, 4096);
    let mut c = Coalescer::new(4096, udp);
    for (i, p) in packets.iter().enumerate() {
        assert!(arena.push(p));
        c.push(&arena, i);
    }
    c.finish(&mut arena);
    c.groups()
        .iter()
        .map(|g| {
            let mut out = Vec::new();
            for (k, i) in c.members(g).enumerate() {
                let p = arena.get(i);
                out.extend_from_slice(if k == 0 {
                    p
                } else {
                    &p[usize::from(g.hdr_len)..]
                });
            }
            (g.vnet_hdr(), out)
        })
        .collect()
}

fn payload_of(p: &[u8]) -> &[u8] {
    &p[Layout::of(p).unwrap().hdr_len..]
}

fn seq_of(p: &[u8]) -> u32 {
    let t = Layout::of(p).unwrap().ip_len;
    u32::from_be_bytes(p[t + 4..t + 8].try_into().unwrap())
}

fn flags_of(p: &[u8]) -> u8 {
    p[Layout::of(p).unwrap().ip_len + 13]
}

#[test]
fn checksum_matches_the_rfc_1071_reference() {
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }
    for len in 0..64 {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8 ^ 0xa5).collect();
        assert_eq!(fold(sum(&data, 0)), reference(&data), "length {len}");
    }
    let ff = vec![0xffu8; 70_000];
    assert_eq!(fold(sum(&ff, 0)), reference(&ff));
}

#[test]
fn virtio_header_round_trips_and_refuses_unknown_types() {
    let h = Tcp::new(false, vec![]).hdr(1380);
    assert_eq!(VnetHdr::decode(&h.encode()), Some(h));
    let mut b = h.encode();
    b[1] = 3; // GSO_UDP (UFO), never asked for
    assert_eq!(VnetHdr::decode(&b), None);
    assert_eq!(VnetHdr::decode(&b[..9]), None);
}

#[test]
fn a_partial_checksum_is_completed() {
    let mut p = Tcp::new(false, b"hello".to_vec()).bytes();
    let l = Layout::of(&p).unwrap();
    // What the kernel hands over with NEEDS_CSUM: only the pseudo-header sum in the field.
    let (src, dst) = l.addrs(&p);
    let partial = fold(pseudo_header_sum(src, dst, 6, p.len() - 20));
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHdr {
        gso_type: GsoType::None,
        gso_size: 0,
        ..Tcp::new(false, vec![]).hdr(0)
    };
    let segs = split_all(&hdr, &p);
    assert_eq!(segs.len(), 1);
    assert!(transport_checksum_ok(&l, &segs[0]));
    let mut bad = hdr;
    bad.csum_offset = 60_000;
    let mut arena = Arena::new(4096, 4);
    assert!(matches!(
        split(&bad, &p, &mut arena, &mut 0),
        Err(SplitError::Malformed(_))
    ));
}

#[test]
fn segments_of_a_tcp_super_packet_are_whole_packets() {
    for v6 in [false, true] {
        let mut t = Tcp::new(v6, (0..5000u32).map(|i| i as u8).collect());
        t.flags = ACK | PSH | FIN | CWR;
        t.options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        let segs = split_all(&t.hdr(1400), &t.bytes());
        assert_eq!(segs.len(), 4);
        let mut stream = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let l = Layout::of(s).unwrap();
            assert!(transport_checksum_ok(&l, s), "segment {i}");
            assert!(ipv4_checksum_ok(s), "segment {i}");
            assert_eq!(seq_of(s), 1000 + 1400 * i as u32);
            let f = flags_of(s);
            assert_eq!(f & (PSH | FIN) != 0, i == 3, "PSH and FIN on the last only");
            assert_eq!(f & CWR != 0, i == 0, "CWR on the first only");
            if !v6 {
                assert_eq!(
                    u16::from_be_bytes([s[4], s[5]]),
                    7 + i as u16,
                    "IPv4 IDs count up"
                );
            }
            assert_eq!(&s[l.ip_len + 20..l.hdr_len], &t.options[..]);
            stream.extend_from_slice(payload_of(s));
        }
        assert_eq!(stream, t.payload);
    }
}

/// A UDP packet from 100.64.0.1:40000 (or fd00::1) to port 5201, checksums complete.
fn udp(v6: bool, sport: u16, id: u16, payload: &[u8]) -> Vec<u8> {
    let ip_len = if v6 { 40 } else { 20 };
    let mut t = Tcp::new(v6, vec![]);
    t.id = id;
    let mut p = t.bytes();
    p.truncate(ip_len);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&[0x14, 0x51, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    if v6 {
        p[6] = 17;
    } else {
        p[9] = 17;
    }
    let t = ip_len;
    let udp_len = (p.len() - t) as u16;
    p[t + 4..t + 6].copy_from_slice(&udp_len.to_be_bytes());
    let l = Layout::of(&p).unwrap();
    let total = p.len();
    l.set_ip_length(&mut p, total);
    set_transport_checksum(&l, &mut p);
    p
}

#[test]
fn udp_datagrams_of_one_flow_join_and_cut_back_into_the_same_datagrams() {
    for v6 in [false, true] {
        let sizes = [1000usize, 1000, 1000, 400, 1000, 1000];
        let packets: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| udp(v6, 40000, i as u16, &vec![i as u8; n]))
            .collect();
        let out = coalesce_all(&packets);
        // 1000 1000 1000 400 | 1000 1000: a shorter datagram ends its group.
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.gso_type, GsoType::UdpL4);
        let mut again = Vec::new();
        for (vh, p) in &out {
            let l = Layout::of(p).unwrap();
            assert_eq!(
                usize::from(u16::from_be_bytes([p[l.ip_len + 4], p[l.ip_len + 5]])),
                p.len() - l.ip_len
            );
            again.extend(split_all(vh, p));
        }
        assert_eq!(again, packets);
        // Without USO on the device, each is written alone and unchanged.
        let alone = coalesce_with(&packets, false);
        assert_eq!(
            alone.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
            packets
        );
    }
}

#[test]
fn udp_datagrams_that_must_stay_apart_are_not_joined() {
    let a = udp(false, 40000, 7, &[1; 500]);
    let next = |payload: &[u8]| udp(false, 40000, 8, payload);
    let other_port = udp(false, 40001, 8, &[1; 500]);
    let larger = next(&[1; 501]);
    let same_id = udp(false, 40000, 7, &[1; 500]);
    let mut bad = next(&[1; 500]);
    let end = bad.len() - 1;
    bad[end] ^= 0x55;
    let mut ce = next(&[1; 500]);
    ce[1] = 0x03;
    ce[10..12].fill(0);
    let c = !fold(sum(&ce[..20], 0));
    ce[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = Tcp::new(false, vec![1; 500]).bytes();
    assert_eq!(
        coalesce_all(&[a.clone(), next(&[1; 500])]).len(),
        1,
        "the next datagram joins"
    );
    for (what, second) in [
        ("other port", other_port),
        ("larger", larger),
        ("IPv4 ID not the next", same_id),
        ("bad checksum", bad),
        ("ECN CE", ce),
        ("TCP", tcp),
    ] {
        let out = coalesce_all(&[a.clone(), second.clone()]);
        assert_eq!(out.len(), 2, "{what}");
        assert_eq!(out[1].1, second, "{what}: written unchanged");
    }
}

#[test]
fn a_udp_super_packet_is_split_into_datagrams() {
    for v6 in [false, true] {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut t = Tcp::new(v6, vec![]);
        let mut p = t.bytes();
        // Rewrite as UDP: header 8 bytes, then the payload.
        let ip_len = if v6 { 40 } else { 20 };
        p.truncate(ip_len);
        p.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 0]);
        p.extend_from_slice(&payload);
        if v6 {
            p[6] = 17;
        } else {
            p[9] = 17;
        }
        let l = Layout::of(&p).unwrap();
        let total = p.len();
        l.set_ip_length(&mut p, total);
        t.options.clear();
        let hdr = VnetHdr {
            gso_type: GsoType::UdpL4,
            hdr_len: (ip_len + 8) as u16,
            gso_size: 1200,
            csum_offset: 6,
            ..t.hdr(0)
        };
        let segs = split_all(&hdr, &p);
        assert_eq!(segs.len(), 3);
        let mut got = Vec::new();
        for s in &segs {
            let l = Layout::of(s).unwrap();
            assert_eq!(
                usize::from(u16::from_be_bytes([s[ip_len + 4], s[ip_len + 5]])),
                s.len() - ip_len
            );
            assert!(transport_checksum_ok(&l, s));
            assert!(ipv4_checksum_ok(s));
            got.extend_from_slice(&s[ip_len + 8..]);
        }
        assert_eq!(got, payload);
    }
}

#[test]
fn a_split_resumes_where_the_arena_filled() {
    let t = Tcp::new(false, vec![9; 10_000]);
    let p = t.bytes();
    let mut arena = Arena::new(4 * 1500, 64);
    let mut resume = 0;
    let mut all = Vec::new();
    loop {
        let done = split(&t.hdr(1400), &p, &mut arena, &mut resume).unwrap();
        all.extend(arena.iter().map(<[u8]>::to_vec));
        arena.clear();
        if done {
            break;
        }
    }
    assert_eq!(all, split_all(&t.hdr(1400), &p));
    let mut tiny = Arena::new(100, 4);
    assert_eq!(
        split(&t.hdr(1400), &p, &mut tiny, &mut 0),
        Err(SplitError::NoRoom)
    );
}

#[test]
fn split_then_coalesce_gives_back_one_packet_and_resplitting_it_the_same_segments() {
    for v6 in [false, true] {
        let mut t = Tcp::new(v6, (0..30_000u32).map(|i| (i % 251) as u8).collect());
        t.flags = ACK | PSH;
        let hdr = t.hdr(1380);
        let segs = split_all(&hdr, &t.bytes());
        let out = coalesce_all(&segs);
        assert_eq!(out.len(), 1, "one write");
        let (vh, joined) = &out[0];
        assert_eq!(vh.gso_type, hdr.gso_type);
        assert_eq!(vh.gso_size, 1380);
        assert_eq!(payload_of(joined), &t.payload[..]);
        assert_eq!(flags_of(joined), ACK | PSH);
        assert!(ipv4_checksum_ok(joined));
        // What the kernel does with it: cut it again, the same way.
        assert_eq!(split_all(vh, joined), segs);
    }
}

#[test]
fn segments_that_must_stay_apart_are_not_joined() {
    let base = Tcp::new(false, vec![1; 100]);
    let next = |f: &dyn Fn(&mut Tcp)| {
        let mut t = base.clone();
        t.seq += 100;
        f(&mut t);
        vec![base.bytes(), t.bytes()]
    };
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("FIN", next(&|t| t.flags |= FIN)),
        ("SYN", next(&|t| t.flags |= 0x02)),
        ("RST", next(&|t| t.flags |= 0x04)),
        ("URG", next(&|t| t.flags |= 0x20)),
        ("ECE", next(&|t| t.flags |= 0x40)),
        ("CWR", next(&|t| t.flags |= CWR)),
        ("ECN CE mark", next(&|t| t.tos = 0x03)),
        ("TTL", next(&|t| t.ttl = 63)),
        ("other ack", next(&|t| t.ack += 1)),
        ("other window", next(&|t| t.window += 1)),
        ("other options", next(&|t| t.options = vec![1, 1, 1, 1])),
        ("gap in sequence", next(&|t| t.seq += 1)),
        ("out of order", next(&|t| t.seq -= 200)),
        ("retransmission", next(&|t| t.seq -= 100)),
        ("larger than the first", next(&|t| t.payload = vec![1; 101])),
        ("other port", next(&|t| t.sport += 1)),
        ("no payload", next(&|t| t.payload.clear())),
        ("after PSH", {
            let mut first = base.clone();
            first.flags |= PSH;
            let mut t = base.clone();
            t.seq += 100;
            vec![first.bytes(), t.bytes()]
        }),
        ("after a short one", {
            let mut first = base.clone();
            first.payload = vec![1; 50];
            let mut second = base.clone();
            second.seq += 50;
            second.id += 1;
            second.payload = vec![1; 50];
            let mut third = base.clone();
            third.seq += 100;
            third.id += 2;
            vec![first.bytes(), second.bytes(), third.bytes()]
        }),
        ("bad checksum", {
            let mut b = next(&|_| {});
            let end = b[1].len() - 1;
            b[1][end] ^= 0xff;
            b
        }),
    ];
    for (what, packets) in cases {
        let out = coalesce_all(&packets);
        let joined = out
            .iter()
            .filter(|(h, _)| h.gso_type != GsoType::None)
            .count();
        match what {
            "after a short one" => assert_eq!(out.len(), 2, "{what}: 50+50 join, then stop"),
            _ => assert_eq!((out.len(), joined), (packets.len(), 0), "{what}"),
        }
        // Written alone, a packet is written unchanged.
        for (h, p) in &out {
            if h.gso_type == GsoType::None {
                assert!(packets.contains(p), "{what}");
            }
        }
    }
}

#[test]
fn a_segment_written_alone_is_never_overtaken_by_its_flow() {
    for v6 in [false, true] {
        // data 1000+100, then a RST at 1100 (written alone), then data at 1100.
        let d1 = Tcp::new(v6, vec![1; 100]);
        let mut rst = d1.clone();
        rst.seq += 100;
        rst.id += 1;
        rst.payload.clear();
        rst.flags = ACK | 0x04;
        let mut d3 = d1.clone();
        d3.seq += 100;
        d3.id += 2;
        let packets = [d1.bytes(), rst.bytes(), d3.bytes()];
        let out = coalesce_all(&packets);
        let written: Vec<Vec<u8>> = out.into_iter().map(|(_, p)| p).collect();
        assert_eq!(written, packets, "IPv6 {v6}: in the order they came");
    }
    // UDP: a datagram with a bad checksum between two good ones of its flow.
    let a = udp(false, 40000, 1, &[1; 300]);
    let mut bad = udp(false, 40000, 2, &[2; 300]);
    let end = bad.len() - 1;
    bad[end] ^= 1;
    let c = udp(false, 40000, 3, &[3; 300]);
    let written: Vec<Vec<u8>> = coalesce_all(&[a.clone(), bad.clone(), c.clone()])
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(written, [a, bad, c]);
}

#[test]
fn a_bad_ipv4_header_checksum_is_not_laundered_by_joining() {
    let t = Tcp::new(false, vec![1; 100]);
    let mut next = t.clone();
    next.seq += 100;
    next.id += 1;
    let mut bad = next.bytes();
    bad[10] ^= 0x01; // IPv4 header checksum
    let out = coalesce_all(&[t.bytes(), bad.clone()]);
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[1].1, bad,
        "written alone, as it came: the kernel drops it"
    );
}

#[test]
fn interleaved_flows_coalesce_each_and_keep_their_order() {
    let mut packets = Vec::new();
    for i in 0..10u32 {
        for port in [1000u16, 2000] {
            let mut t = Tcp::new(false, vec![port as u8; 500]);
            t.sport = port;
            t.seq = 1 + 500 * i;
            t.id = i as u16;
            packets.push(t.bytes());
        }
    }
    let out = coalesce_all(&packets);
    assert_eq!(out.len(), 2);
    assert_eq!(payload_of(&out[0].1).len(), 5000);
    assert_eq!(payload_of(&out[1].1).len(), 5000);
}

fn arb_tcp() -> impl Strategy<Value = Tcp> {
    (
        any::<bool>(),
        1usize..20_000,
        any::<u32>(),
        prop::sample::select(vec![ACK, ACK | PSH, ACK | FIN, ACK | CWR, ACK | PSH | FIN]),
        prop::sample::select(vec![0usize, 4, 12, 40]),
        any::<u16>(),
    )
        .prop_map(|(v6, len, seq, flags, opts, id)| {
            let mut t = Tcp::new(v6, (0..len).map(|i| (i * 13 % 256) as u8).collect());
            t.seq = seq;
            t.flags = flags;
            t.options = vec![1; opts];
            t.id = id;
            t
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn split_coalesce_resplit_is_the_identity(t in arb_tcp(), gso in 16u16..1500) {
        let hdr = t.hdr(gso);
        let segs = split_all(&hdr, &t.bytes());
        for s in &segs {
            prop_assert!(transport_checksum_ok(&Layout::of(s).unwrap(), s));
            prop_assert!(ipv4_checksum_ok(s));
        }
        let out = coalesce_all(&segs);
        let mut stream = Vec::new();
        let mut again = Vec::new();
        for (vh, p) in &out {
            stream.extend_from_slice(payload_of(p));
            again.extend(split_all(vh, p));
        }
        prop_assert_eq!(stream, t.payload.clone());
        prop_assert_eq!(again, segs);
    }

    #[test]
    fn shuffled_segments_are_joined_only_in_sequence(t in arb_tcp(), gso in 100u16..1500, seed in any::<u64>()) {
        let segs = split_all(&t.hdr(gso), &t.bytes());
        let mut order: Vec<usize> = (0..segs.len()).collect();
        let mut x = seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let shuffled: Vec<Vec<u8>> = order.iter().map(|&i| segs[i].clone()).collect();
        let out = coalesce_all(&shuffled);
        let mut total = 0;
        for (vh, p) in &out {
            let pieces = split_all(vh, p);
            // A joined packet is consecutive original segments, byte for byte.
            let first = segs.iter().position(|s| s == &pieces[0]).unwrap();
            prop_assert_eq!(&segs[first..first + pieces.len()], &pieces[..]);
            total += pieces.len();
        }
        prop_assert_eq!(total, segs.len());
    }

    #[test]
    fn split_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), gso in any::<u16>(), kind in 0u8..6, flags in any::<u8>(), start in any::<u16>(), off in any::<u16>()) {
        if let Some(gso_type) = GsoType::from_wire(kind) {
            let hdr = VnetHdr { flags, gso_type, hdr_len: 0, gso_size: gso, csum_start: start, csum_offset: off };
            let mut arena = Arena::new(1 << 16, 256);
            let mut resume = 0;
            let _ = split(&hdr, &bytes, &mut arena, &mut resume);
        }
    }

    #[test]
    fn fragments_in_order_join_into_their_datagram(payload in 1usize..9000, mtu in 68usize..1500, id in any::<u16>()) {
        let datagram = fragmentable(id, payload);
        let fragments = fragment_v4(&datagram, mtu);
        let out = coalesce_all(&fragments);
        // At most 64 fragments join in one write; a datagram of more is written as it came.
        let out: Vec<Vec<u8>> = out.into_iter().map(|(_, p)| p).collect();
        if fragments.len() <= MAX_GROUP_SEGMENTS {
            prop_assert!(out == [datagram], "{} fragments joined", fragments.len());
        } else {
            prop_assert!(out == fragments);
        }
    }

    #[test]
    fn joined_fragments_are_whole_datagrams_made_of_the_fragments_in_order(
        spec in prop::collection::vec((0u8..3, 0u16..6, 1usize..5, any::<bool>(), 0u8..10), 1..12),
    ) {
        // Fragments with valid headers: datagram ID 0-2, offset in 8-byte blocks of 0-5 times
        // 1,000 bytes, payload 1-4 blocks of 250 bytes (a last one may be one byte shorter),
        // "more fragments", and rarely DF or another TOS.
        let packets: Vec<Vec<u8>> = spec
            .iter()
            .map(|&(id, at, blocks, more, odd)| {
                let mut f = fragmentable(u16::from(id), 0)[..20].to_vec();
                let len = blocks * 250 - usize::from(!more && odd == 1);
                f.extend((0..len).map(|i| (i as u8) ^ id));
                let total = f.len() as u16;
                f[2..4].copy_from_slice(&total.to_be_bytes());
                let bits = u16::from(more) << 13 | (at * 125) | u16::from(odd == 2) << 14;
                f[6..8].copy_from_slice(&bits.to_be_bytes());
                f[1] = u8::from(odd == 3);
                seal_ipv4_header(&mut f);
                f
            })
            .collect();
        let out: Vec<Vec<u8>> = coalesce_all(&packets).into_iter().map(|(_, p)| p).collect();
        // Every byte once, in order; every header says its length and has a valid checksum.
        let body = |ps: &[Vec<u8>]| ps.iter().flat_map(|p| p[20..].to_vec()).collect::<Vec<u8>>();
        prop_assert!(body(&out) == body(&packets));
        for p in &out {
            prop_assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
            prop_assert!(ipv4_checksum_ok(p));
            // A packet that is not one of the fragments is a whole datagram.
            if !packets.contains(p) {
                prop_assert_eq!(p[6] & 0x3f, 0);
                prop_assert_eq!(p[7], 0);
            }
        }
    }

    #[test]
    fn coalescing_never_panics_and_keeps_every_byte(packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 0..20)) {
        let out = coalesce_all(&packets);
        let written: usize = out.iter().map(|(_, p)| p.len()).sum();
        prop_assert!(written <= packets.iter().map(Vec::len).sum::<usize>());
        if out.len() == packets.len() {
            prop_assert_eq!(out.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), packets);
        }
    }
}

/// Sets the IPv4 header checksum of `p`.
fn seal_ipv4_header(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    set_ipv4_checksum(&mut p[..ihl]);
}

/// A UDP datagram (IPv4, ID `id`) that may be fragmented: "don't fragment" clear.
fn fragmentable(id: u16, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + 3) as u8).collect();
    let mut p = udp(false, 40000, id, &payload);
    p[6] = 0;
    seal_ipv4_header(&mut p);
    p
}

/// Cuts an IPv4 datagram into fragments of at most `mtu` bytes, as Linux's `ip_fragment` does.
fn fragment_v4(datagram: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let step = (mtu - 20) & !7;
    let body = &datagram[20..];
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let end = (at + step).min(body.len());
        let mut f = datagram[..20].to_vec();
        f.extend_from_slice(&body[at..end]);
        let total = f.len() as u16;
        f[2..4].copy_from_slice(&total.to_be_bytes());
        let more = if end < body.len() { 0x2000 } else { 0 };
        f[6..8].copy_from_slice(&(more | (at / 8) as u16).to_be_bytes());
        seal_ipv4_header(&mut f);
        out.push(f);
        at = end;
    }
    out
}

#[test]
fn fragments_of_a_datagram_are_joined_back_into_it() {
    // iperf3's 1,400 bytes over a 1,420-byte MTU (two fragments), three, and many small ones.
    for (payload, mtu) in [(1400, 1420), (3000, 1420), (20000, 576), (9000, 1500)] {
        let datagram = fragmentable(9, payload);
        let fragments = fragment_v4(&datagram, mtu);
        assert!(fragments.len() >= 2);
        let out = coalesce_all(&fragments);
        assert_eq!(out.len(), 1, "{payload} bytes over MTU {mtu}: one write");
        assert_eq!(out[0].0, VnetHdr::PLAIN, "a whole datagram, nothing to cut");
        assert_eq!(out[0].1, datagram, "{payload} bytes over MTU {mtu}");
        assert!(transport_checksum_ok(
            &Layout::of(&out[0].1).unwrap(),
            &out[0].1
        ));
    }
    // Two datagrams back to back, and a whole one between: each joined, in order.
    let (a, b) = (fragmentable(1, 3000), fragmentable(2, 2000));
    let whole = fragmentable(3, 100);
    let mut packets = fragment_v4(&a, 1420);
    packets.push(whole.clone());
    packets.extend(fragment_v4(&b, 1420));
    let out: Vec<Vec<u8>> = coalesce_all(&packets).into_iter().map(|(_, p)| p).collect();
    assert_eq!(out, [a, whole, b]);
}

#[test]
fn only_a_whole_datagram_is_joined_a_partial_run_is_written_as_it_came() {
    let datagram = fragmentable(9, 4000);
    let f = fragment_v4(&datagram, 1420);
    assert_eq!(f.len(), 3);
    let written = |packets: &[Vec<u8>]| -> Vec<Vec<u8>> {
        coalesce_all(packets).into_iter().map(|(_, p)| p).collect()
    };
    // The batch ends before the last fragment, or began after the first: the kernel gets the
    // fragments themselves, and reassembles (or refuses, if they overlap others) as before.
    assert!(written(&f[..2]) == f[..2], "first two");
    assert!(written(&f[1..]) == f[1..], "last two");
    assert!(written(&f) == [datagram.clone()], "all three");
    // More than 64 fragments (MTU 68): too many for one write, so none is joined.
    let small = fragment_v4(&datagram, 68);
    assert!(small.len() > MAX_GROUP_SEGMENTS);
    assert!(written(&small) == small, "{} fragments", small.len());
}

#[test]
fn fragments_that_would_pass_65535_bytes_are_not_joined() {
    // Contiguous fragments of 1,408 bytes, the last at offset 64,768: the datagram would end at
    // byte 66,176, which no IPv4 length can say. The kernel drops such a datagram; it gets the
    // fragments as they came.
    let mut head = fragmentable(3, 0)[..20].to_vec();
    head[2..4].copy_from_slice(&[0, 0]);
    let fragments: Vec<Vec<u8>> = (0..47u16)
        .map(|k| {
            let mut f = head.clone();
            f.extend((0..1408).map(|i| (i + usize::from(k)) as u8));
            let total = f.len() as u16;
            f[2..4].copy_from_slice(&total.to_be_bytes());
            let more = if k < 46 { 0x2000 } else { 0 };
            f[6..8].copy_from_slice(&(more | (k * 1408 / 8)).to_be_bytes());
            seal_ipv4_header(&mut f);
            f
        })
        .collect();
    let out: Vec<Vec<u8>> = coalesce_all(&fragments)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert!(out == fragments, "{} written", out.len());
}

#[test]
fn a_fragment_whose_ports_cannot_be_read_is_not_overtaken_by_its_flow() {
    // A TCP segment, then a first fragment of the same flow's next segment carrying only 16
    // bytes of its TCP header, then the segment after: the last must not join the first and be
    // written before the fragment.
    let t = Tcp::new(false, vec![1; 100]);
    let mut frag = t.clone();
    frag.seq += 100;
    frag.id += 1;
    let mut frag = frag.bytes()[..36].to_vec();
    frag[2..4].copy_from_slice(&36u16.to_be_bytes());
    frag[6] = 0x20; // more fragments, offset 0
    seal_ipv4_header(&mut frag);
    let mut next = t.clone();
    next.seq += 200;
    next.id += 2;
    let packets = [t.bytes(), frag, next.bytes()];
    let out: Vec<Vec<u8>> = coalesce_all(&packets).into_iter().map(|(_, p)| p).collect();
    assert!(out == packets, "each written alone, in order");
}

#[test]
fn fragments_that_must_stay_apart_are_not_joined() {
    let datagram = fragmentable(9, 3000);
    let f = fragment_v4(&datagram, 1420);
    let edit = |k: usize, change: &dyn Fn(&mut Vec<u8>)| {
        let mut g = f.clone();
        change(&mut g[k]);
        seal_ipv4_header(&mut g[k]);
        g
    };
    let other = fragmentable(10, 50);
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("a missing middle", vec![f[0].clone(), f[2].clone()]),
        ("reversed", vec![f[1].clone(), f[0].clone()]),
        ("another ID", edit(1, &|p| p[5] ^= 1)),
        ("another TTL", edit(1, &|p| p[8] -= 1)),
        ("another TOS (ECN)", edit(1, &|p| p[1] |= 1)),
        ("another source", edit(1, &|p| p[15] ^= 1)),
        ("another protocol", edit(1, &|p| p[9] = 6)),
        ("overlapping", edit(1, &|p| p[7] -= 1)),
        ("don't fragment on the first", edit(0, &|p| p[6] |= 0x40)),
        ("a middle not a multiple of 8", {
            let mut g = f.clone();
            g[1].pop();
            let total = g[1].len() as u16;
            g[1][2..4].copy_from_slice(&total.to_be_bytes());
            seal_ipv4_header(&mut g[1]);
            g
        }),
        ("a length field that disagrees", edit(1, &|p| p[3] ^= 4)),
        ("a bad header checksum", {
            let mut g = f.clone();
            g[1][10] ^= 1;
            g
        }),
        ("a packet between", vec![f[0].clone(), other, f[1].clone()]),
    ];
    for (what, packets) in cases {
        let out: Vec<Vec<u8>> = coalesce_all(&packets).into_iter().map(|(_, p)| p).collect();
        assert!(out == packets, "{what}: each written alone, as it came");
    }
    // IP options: never joined.
    let mut with_options = f.clone();
    for p in &mut with_options {
        p.splice(20..20, [1, 1, 1, 0]); // NOP NOP NOP EOL
        p[0] = 0x46;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        seal_ipv4_header(p);
    }
    let out: Vec<Vec<u8>> = coalesce_all(&with_options)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert!(out == with_options, "with IP options, each written alone");
}
