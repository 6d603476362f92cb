//! Coalescing (GRO in user space): decrypted TCP segments of one flow that follow each other are
//! joined behind the first one's headers into one packet the kernel takes with a `virtio_net_hdr`
//! saying how to cut it again. Everything else, and every segment that could change meaning if
//! joined, is written alone and unchanged. UDP datagrams of one flow are joined the same way when
//! the device takes UDP segmentation (USO).
//!
//! A segment joins the newest group of its flow only when the result is exactly what its sender's
//! stack would have cut into those segments: the next sequence number, the same acknowledgment,
//! window, TCP options and IP fields (TOS/traffic class with its ECN bits, TTL, DF), a payload no
//! larger than the group's first, and a valid checksum. SYN, FIN, RST, URG, ECE and CWR segments
//! are never joined; a PSH segment or a short one ends its group. A UDP datagram joins when it has
//! the same IP fields, a valid checksum and a payload no larger than the group's first (a shorter
//! one ends it). Groups come out in the order of their first segment, and a flow's segments never
//! overtake each other.
//!
//! All the IPv4 fragments of one datagram, when they follow each other in the batch from the
//! first to the last, are joined into that datagram: only exact continuations (same addresses,
//! protocol, ID, TOS and TTL; each offset where the previous fragment ended; a valid header
//! checksum; no IP options; "don't fragment" clear; at most 65,535 bytes in all). The kernel has
//! nothing to reassemble. Any other fragment is written as it came, and reassembled (or refused)
//! by the kernel as before. A joined datagram may be longer than the device's MTU: the kernel
//! delivers it, and forwards it cut again.

use super::{
    fold, pseudo_header_sum, set_ipv4_checksum, sum, transport_checksum_ok, Arena, GsoType, Layout,
    VnetHdr, F_NEEDS_CSUM, PROTO_TCP, PROTO_UDP, TCP_CSUM_OFFSET, UDP_CSUM_OFFSET,
};
use crate::ip::IPV4_HEADER_MIN;

/// Most segments in one coalesced packet (the kernel's GSO limit for a TUN device is 64 KiB; this
/// bounds the iovec list of one write too).
pub const MAX_GROUP_SEGMENTS: usize = 64;
/// How many of the newest groups a segment looks through for its flow.
const LOOKBACK: usize = 8;
const NONE: u16 = u16::MAX;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// A packet to write: one segment, or several joined behind the first one's headers.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    /// Index (in the arena) of the first segment, whose headers lead.
    pub head: u16,
    tail: u16,
    /// Segments in the group.
    pub count: u16,
    /// Bytes of the IP and TCP headers.
    pub hdr_len: u16,
    /// Payload bytes of every segment but the last.
    pub gso_size: u16,
    ip_len: u8,
    v6: bool,
    udp: bool,
    /// Whether more may join.
    open: bool,
    /// The last segment carried PSH.
    psh: bool,
    /// IPv4 fragments of one datagram, from its first (no virtio header: the joined packet is the
    /// whole datagram); `complete` once its last fragment joined.
    frag: bool,
    complete: bool,
    /// The joined packet's length.
    total: u32,
    next_seq: u32,
}

/// The groups of one batch. Capacity is fixed at creation; nothing allocates afterwards.
pub struct Coalescer {
    /// Whether UDP datagrams are joined too (the device takes USO).
    udp: bool,
    groups: Vec<Group>,
    /// Where `finish` rebuilds `groups` when it must undo a join.
    spare: Vec<Group>,
    /// Next segment of the same group, by arena index.
    next: Vec<u16>,
}

impl Coalescer {
    /// For batches of at most `max_packets` (at most 65,535) packets; UDP datagrams are joined
    /// only with `udp`.
    pub fn new(max_packets: usize, udp: bool) -> Coalescer {
        assert!(max_packets < usize::from(NONE));
        Coalescer {
            udp,
            groups: Vec::with_capacity(max_packets),
            spare: Vec::with_capacity(max_packets),
            next: vec![NONE; max_packets],
        }
    }

    pub fn clear(&mut self) {
        self.groups.clear();
    }

    /// Takes packet `index` of `arena` (packets must be pushed in arena order).
    pub fn push(&mut self, arena: &Arena, index: usize) {
        let i = index as u16;
        self.next[index] = NONE;
        let packet = arena.get(index);
        let Some(seg) = Segment::of(packet, self.udp) else {
            // Written alone (a pure ACK, a RST, a bad checksum, a fragment...): its flow's open
            // group must not take later segments, which would then be written before it.
            self.close_flow_of(arena, packet);
            if let Some(f) = Fragment::of(packet) {
                if self.join_fragment(arena, i, packet, &f) {
                    return;
                }
                if f.offset == 0 {
                    self.groups.push(f.start(i, packet.len()));
                    return;
                }
            }
            self.groups.push(Group::single(i));
            return;
        };
        let start = self.groups.len().saturating_sub(LOOKBACK);
        for g in (start..self.groups.len()).rev() {
            let group = self.groups[g];
            let head = arena.get(usize::from(group.head));
            if group.ip_len == 0 || group.frag || !same_flow(&seg.l, packet, head, &group) {
                continue;
            }
            // The newest group of this flow: join it, or start a new one after it.
            if group.open && seg.can_join(packet, head, &group) {
                let group = &mut self.groups[g];
                self.next[usize::from(group.tail)] = i;
                group.tail = i;
                group.count += 1;
                group.total += seg.payload_len;
                group.next_seq = seg.seq.wrapping_add(seg.payload_len);
                group.psh = seg.psh;
                group.open = !seg.psh
                    && seg.payload_len == u32::from(group.gso_size)
                    && usize::from(group.count) < MAX_GROUP_SEGMENTS;
                return;
            }
            self.groups[g].open = false;
            break;
        }
        self.groups.push(seg.start(i, packet.len()));
    }

    /// Closes the open group of `packet`'s flow, which it is not joining. A packet whose ports
    /// cannot be read (a fragment, a truncated header) closes every group between its addresses.
    fn close_flow_of(&mut self, arena: &Arena, packet: &[u8]) {
        let fragment = packet.len() >= IPV4_HEADER_MIN
            && packet[0] >> 4 == 4
            && u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
        let l = if fragment { None } else { Layout::of(packet) };
        let start = self.groups.len().saturating_sub(LOOKBACK);
        for g in (start..self.groups.len()).rev() {
            let group = self.groups[g];
            if group.ip_len == 0 || group.frag {
                continue;
            }
            let head = arena.get(usize::from(group.head));
            match &l {
                Some(l) if same_flow(l, packet, head, &group) => {
                    self.groups[g].open = false;
                    break;
                }
                Some(_) => {}
                None => {
                    let addrs = if group.v6 { 8..40 } else { 12..20 };
                    if packet.len() >= addrs.end
                        && packet[0] >> 4 == head[0] >> 4
                        && packet[addrs.clone()] == head[addrs]
                    {
                        self.groups[g].open = false;
                    }
                }
            }
        }
    }

    /// Joins fragment `f` (packet `i`) to the group right before it, if that is the run of
    /// fragments it continues.
    fn join_fragment(&mut self, arena: &Arena, i: u16, packet: &[u8], f: &Fragment) -> bool {
        let Some(group) = self.groups.last_mut() else {
            return false;
        };
        if !group.frag || !group.open || group.tail.wrapping_add(1) != i {
            return false;
        }
        let head = arena.get(usize::from(group.head));
        // TOS, ID, TTL, protocol and both addresses as the first fragment's.
        let same =
            packet[1] == head[1] && packet[4..6] == head[4..6] && packet[8..10] == head[8..10];
        if !same
            || packet[12..20] != head[12..20]
            || f.offset != group.next_seq
            || group.total + f.payload_len > u32::from(u16::MAX)
        {
            return false;
        }
        self.next[usize::from(group.tail)] = i;
        group.tail = i;
        group.count += 1;
        group.total += f.payload_len;
        group.next_seq += f.payload_len;
        group.complete = !f.more;
        group.open = f.more && usize::from(group.count) < MAX_GROUP_SEGMENTS;
        true
    }

    /// Rewrites the first segment of every joined group into the joined packet's headers (IP
    /// length and checksum, PSH from the last segment, the TCP checksum as the partial
    /// pseudo-header sum the kernel completes; for a whole datagram joined from its fragments,
    /// the IPv4 length, "more fragments" cleared, and a fresh header checksum). Call once, after
    /// the last push.
    pub fn finish(&mut self, arena: &mut Arena) {
        self.unjoin_partial_datagrams();
        for g in &self.groups {
            if g.count < 2 {
                continue;
            }
            let head = arena.get_mut(usize::from(g.head));
            if g.frag {
                debug_assert!(g.complete && g.total <= u32::from(u16::MAX));
                head[2..4].copy_from_slice(&(g.total as u16).to_be_bytes());
                head[6] &= !MORE_FRAGMENTS;
                set_ipv4_checksum(&mut head[..IPV4_HEADER_MIN]);
                continue;
            }
            let l = g.layout();
            let total = g.total as usize;
            l.set_ip_length(head, total);
            let t = l.ip_len;
            if g.udp {
                head[t + 4..t + 6].copy_from_slice(&((total - t) as u16).to_be_bytes());
            } else if g.psh {
                head[t + 13] |= TCP_PSH;
            }
            let (src, dst) = l.addrs(head);
            let partial = fold(pseudo_header_sum(src, dst, l.protocol, total - t));
            let at = t + l.csum_offset();
            head[at..at + 2].copy_from_slice(&partial.to_be_bytes());
        }
    }

    /// Only a whole datagram is joined: the fragments of a run that lacks its end are written
    /// one by one, as they came, so the kernel reassembles (or refuses) exactly what was sent.
    fn unjoin_partial_datagrams(&mut self) {
        if !self
            .groups
            .iter()
            .any(|g| g.frag && !g.complete && g.count > 1)
        {
            return;
        }
        self.spare.clear();
        for g in &self.groups {
            if g.frag && !g.complete && g.count > 1 {
                let mut at = g.head;
                for _ in 0..g.count {
                    self.spare.push(Group::single(at));
                    at = self.next[usize::from(at)];
                }
            } else {
                self.spare.push(*g);
            }
        }
        std::mem::swap(&mut self.groups, &mut self.spare);
    }

    /// The packets to write, in order.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Arena indices of `group`'s segments, first to last.
    pub fn members(&self, group: &Group) -> impl Iterator<Item = usize> + '_ {
        let mut at = group.head;
        std::iter::from_fn(move || {
            if at == NONE {
                return None;
            }
            let i = usize::from(at);
            at = self.next[i];
            Some(i)
        })
        .take(usize::from(group.count))
    }
}

impl Group {
    fn single(i: u16) -> Group {
        Group {
            head: i,
            tail: i,
            count: 1,
            hdr_len: 0,
            gso_size: 0,
            ip_len: 0,
            v6: false,
            udp: false,
            open: false,
            psh: false,
            frag: false,
            complete: false,
            total: 0,
            next_seq: 0,
        }
    }

    fn layout(&self) -> Layout {
        Layout {
            v6: self.v6,
            ip_len: usize::from(self.ip_len),
            protocol: if self.udp { PROTO_UDP } else { PROTO_TCP },
            hdr_len: usize::from(self.hdr_len),
        }
    }

    /// The virtio header to write before this packet.
    pub fn vnet_hdr(&self) -> VnetHdr {
        if self.count < 2 || self.frag {
            return VnetHdr::PLAIN;
        }
        let (gso_type, csum_offset) = match (self.udp, self.v6) {
            (true, _) => (GsoType::UdpL4, UDP_CSUM_OFFSET),
            (false, false) => (GsoType::TcpV4, TCP_CSUM_OFFSET),
            (false, true) => (GsoType::TcpV6, TCP_CSUM_OFFSET),
        };
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: self.hdr_len,
            gso_size: self.gso_size,
            csum_start: u16::from(self.ip_len),
            csum_offset: csum_offset as u16,
        }
    }
}

/// Whether `packet` (laid out as `l`) has the protocol, addresses and ports of `group`'s first
/// segment `head`; each packet's ports are read after its own IP header.
fn same_flow(l: &Layout, packet: &[u8], head: &[u8], group: &Group) -> bool {
    if l.v6 != group.v6 || (l.protocol == PROTO_UDP) != group.udp {
        return false;
    }
    let (t, h) = (l.ip_len, usize::from(group.ip_len));
    let addrs = if l.v6 { 8..40 } else { 12..20 };
    packet[addrs.clone()] == head[addrs] && packet[t..t + 4] == head[h..h + 4]
}

/// The "don't fragment" and "more fragments" bits, in the IPv4 header's byte 6.
const DONT_FRAGMENT: u8 = 0x40;
const MORE_FRAGMENTS: u8 = 0x20;

/// An IPv4 fragment that may be joined to the ones before it: what decides it, read once.
struct Fragment {
    /// Where its payload goes in the datagram, in bytes.
    offset: u32,
    more: bool,
    payload_len: u32,
}

impl Fragment {
    /// `None` for anything but an IPv4 fragment without options or "don't fragment", whose
    /// length field agrees with the packet and whose header checksum is valid (the joined packet
    /// gets a fresh one: a bad one must not be laundered), with a payload, a multiple of 8 bytes
    /// unless it is the last.
    fn of(packet: &[u8]) -> Option<Fragment> {
        if packet.len() <= IPV4_HEADER_MIN || packet[0] != 0x45 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        let bits = u16::from_be_bytes([packet[6], packet[7]]);
        let more = packet[6] & MORE_FRAGMENTS != 0;
        let offset = u32::from(bits & 0x1fff) * 8;
        let payload_len = (packet.len() - IPV4_HEADER_MIN) as u32;
        if total != packet.len()
            || packet[6] & DONT_FRAGMENT != 0
            || (!more && offset == 0)
            || (more && !payload_len.is_multiple_of(8))
            || fold(sum(&packet[..IPV4_HEADER_MIN], 0)) != 0xffff
        {
            return None;
        }
        Some(Fragment {
            offset,
            more,
            payload_len,
        })
    }

    /// A group of fragments led by this one, its datagram's first.
    fn start(&self, i: u16, len: usize) -> Group {
        Group {
            head: i,
            tail: i,
            count: 1,
            hdr_len: IPV4_HEADER_MIN as u16,
            gso_size: 0,
            ip_len: IPV4_HEADER_MIN as u8,
            v6: false,
            udp: false,
            open: true,
            psh: false,
            frag: true,
            complete: false,
            total: len as u32,
            next_seq: self.offset + self.payload_len,
        }
    }
}

/// A TCP segment or UDP datagram that may be joined: what decides it, read once.
struct Segment {
    l: Layout,
    seq: u32,
    payload_len: u32,
    psh: bool,
}

impl Segment {
    /// `None` for anything that is written alone: not TCP (or UDP, with `udp`) over IPv4 without
    /// options or IPv6 without extension headers, a length field that disagrees with the packet,
    /// a fragment, no payload, a TCP flag other than ACK and PSH, or a bad checksum.
    fn of(packet: &[u8], udp: bool) -> Option<Segment> {
        let l = Layout::of(packet)?;
        if l.protocol != PROTO_TCP && !(udp && l.protocol == PROTO_UDP) {
            return None;
        }
        if l.v6 {
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if payload + l.ip_len != packet.len() {
                return None;
            }
        } else {
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff; // MF, offset
            if l.ip_len != IPV4_HEADER_MIN || total != packet.len() || fragment != 0 {
                return None;
            }
            // The joined packet gets a fresh header checksum: a bad one must not be laundered.
            if fold(sum(&packet[..l.ip_len], 0)) != 0xffff {
                return None;
            }
        }
        let t = l.ip_len;
        let payload_len = packet.len() - l.hdr_len;
        if payload_len == 0 || payload_len > usize::from(u16::MAX) {
            return None;
        }
        let (seq, psh) = if l.protocol == PROTO_UDP {
            let len = usize::from(u16::from_be_bytes([packet[t + 4], packet[t + 5]]));
            if len != packet.len() - t {
                return None;
            }
            (0, false)
        } else {
            let flags = packet[t + 13];
            if flags & !TCP_PSH != TCP_ACK {
                return None;
            }
            let seq = u32::from_be_bytes(packet[t + 4..t + 8].try_into().expect("4 bytes"));
            (seq, flags & TCP_PSH != 0)
        };
        if !transport_checksum_ok(&l, packet) {
            return None;
        }
        Some(Segment {
            l,
            seq,
            payload_len: payload_len as u32,
            psh,
        })
    }

    fn start(&self, i: u16, len: usize) -> Group {
        Group {
            head: i,
            tail: i,
            count: 1,
            hdr_len: self.l.hdr_len as u16,
            gso_size: self.payload_len as u16,
            ip_len: self.l.ip_len as u8,
            v6: self.l.v6,
            udp: self.l.protocol == PROTO_UDP,
            open: !self.psh,
            psh: self.psh,
            frag: false,
            complete: false,
            total: len as u32,
            next_seq: self.seq.wrapping_add(self.payload_len),
        }
    }

    /// Whether it continues the group exactly (see the module's comment).
    fn can_join(&self, packet: &[u8], head: &[u8], group: &Group) -> bool {
        let t = self.l.ip_len;
        let ip_same = if self.l.v6 {
            packet[..4] == head[..4] && packet[7] == head[7]
        } else {
            // TOS with its ECN bits, TTL, DF; and the IPv4 ID the kernel would give this segment
            // when it cuts the joined packet again (it counts up from the first's).
            let id = |p: &[u8]| u16::from_be_bytes([p[4], p[5]]);
            packet[1] == head[1]
                && packet[8] == head[8]
                && (packet[6] & 0x40) == (head[6] & 0x40)
                && id(packet) == id(head).wrapping_add(group.count)
        };
        let fits = self.l.hdr_len == usize::from(group.hdr_len)
            && self.payload_len <= u32::from(group.gso_size)
            && group.total + self.payload_len <= u32::from(u16::MAX);
        if group.udp {
            return ip_same && fits;
        }
        ip_same
            && fits
            && self.seq == group.next_seq
            // acknowledgment, data offset and window, and every option byte
            && packet[t + 8..t + 13] == head[t + 8..t + 13]
            && packet[t + 14..t + 16] == head[t + 14..t + 16]
            && packet[t + 20..self.l.hdr_len] == head[t + 20..self.l.hdr_len]
    }
}
