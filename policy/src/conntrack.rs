//! Connection tracking, pure: which flows are established, so that replies of an allowed flow pass
//! without a rule and a policy change can cut a flow it now denies. Time is an argument. The table
//! is bounded; when full, the oldest entry is evicted and counted.

use proto::ip::{FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP};
use std::collections::{HashMap, VecDeque};

/// Keys come from the network: a seeded hash (foldhash's per-process random state) keeps an
/// attacker from choosing colliding flows, at a fraction of SipHash's cost.
type Table = HashMap<ConnKey, Entry, foldhash::fast::RandomState>;
use std::net::IpAddr;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Idle timeouts, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tcp_syn_ms: u64,
    pub tcp_established_ms: u64,
    pub tcp_closing_ms: u64,
    pub udp_ms: u64,
    pub udp_replied_ms: u64,
    pub icmp_ms: u64,
    pub other_ms: u64,
}

impl Default for Timeouts {
    /// Linux nf_conntrack's defaults, shortened where they are generous (2 h for established TCP is
    /// kept, as a long idle SSH session expects).
    fn default() -> Self {
        Timeouts {
            tcp_syn_ms: 30_000,
            tcp_established_ms: 7_200_000,
            tcp_closing_ms: 60_000,
            udp_ms: 30_000,
            udp_replied_ms: 180_000,
            icmp_ms: 30_000,
            other_ms: 600_000,
        }
    }
}

/// A flow in both directions: the same key for a packet and its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
    protocol: u8,
}

impl ConnKey {
    pub fn of(k: &FlowKey) -> ConnKey {
        let a = (k.src, k.src_port);
        let b = (k.dst, k.dst_port);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        ConnKey {
            lo,
            hi,
            protocol: k.protocol,
        }
    }
}

impl ConnKey {
    /// The first packet of the flow `e` tracks, as far as policy looks at it: the originator's
    /// direction, a SYN for TCP, an echo request for ICMP. Used to re-decide a flow after a
    /// policy change.
    pub fn first_packet(&self, e: &Entry) -> FlowKey {
        let (src, dst) = if self.lo == e.originator {
            (self.lo, self.hi)
        } else {
            (self.hi, self.lo)
        };
        FlowKey {
            src: src.0,
            dst: dst.0,
            protocol: self.protocol,
            src_port: src.1,
            dst_port: dst.1,
            icmp: match self.protocol {
                PROTO_ICMP => Some((8, 0)),
                PROTO_ICMPV6 => Some((128, 0)),
                _ => None,
            },
            tcp_flags: if self.protocol == PROTO_TCP {
                TCP_SYN
            } else {
                0
            },
            later_fragment: false,
            fragment_id: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    TcpSynSent,
    TcpEstablished,
    TcpClosing,
    Udp { replied: bool },
    Icmp,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The direction of the first packet: (source address, source port).
    pub originator: (IpAddr, u16),
    pub state: State,
    pub created_ms: u64,
    pub last_ms: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Whatever the caller attaches: the deciding policy and rule, for the flow log.
    pub tag: u32,
    /// The caller's rate-limit bucket for the originator's packets, if the rule that allowed
    /// the flow limits it ([`crate::ratelimit`]).
    pub meter: Option<MeterKey>,
}

/// Which rate-limit bucket a flow's packets count against: the caller's key (a hash of the rule
/// and the identities it counts by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MeterKey(pub std::num::NonZeroU64);

/// What a packet is, as far as tracking knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// No live entry: the packet starts a new flow and needs a policy verdict.
    New,
    /// Part of a tracked flow; `reply` if it goes against the originator's direction. `meter`:
    /// the flow's rate-limit bucket, for a packet of the originator's direction.
    Known {
        reply: bool,
        meter: Option<MeterKey>,
    },
}

pub struct Conntrack {
    table: Table,
    order: VecDeque<ConnKey>,
    max_entries: usize,
    timeouts: Timeouts,
    pub evictions: u64,
}

impl Conntrack {
    pub fn new(max_entries: usize, timeouts: Timeouts) -> Conntrack {
        Conntrack {
            table: Table::default(),
            order: VecDeque::new(),
            max_entries: max_entries.max(1),
            timeouts,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn timeout(&self, s: State) -> u64 {
        let t = &self.timeouts;
        match s {
            State::TcpSynSent => t.tcp_syn_ms,
            State::TcpEstablished => t.tcp_established_ms,
            State::TcpClosing => t.tcp_closing_ms,
            State::Udp { replied: false } => t.udp_ms,
            State::Udp { replied: true } => t.udp_replied_ms,
            State::Icmp => t.icmp_ms,
            State::Other => t.other_ms,
        }
    }

    /// Looks `packet` up and, if it belongs to a live flow, advances that flow's state.
    pub fn track(&mut self, packet: &FlowKey, len: usize, now_ms: u64) -> Tracked {
        let key = ConnKey::of(packet);
        let timeout_of = |c: &Conntrack, s| c.timeout(s);
        let Some(e) = self.table.get(&key) else {
            return Tracked::New;
        };
        if now_ms.saturating_sub(e.last_ms) > timeout_of(self, e.state) {
            self.table.remove(&key);
            return Tracked::New;
        }
        let e = self.table.get_mut(&key).expect("present");
        let reply = (packet.src, packet.src_port) != e.originator;
        e.last_ms = now_ms;
        e.packets += 1;
        e.bytes += len as u64;
        let f = packet.tcp_flags;
        e.state = match e.state {
            _ if packet.protocol == PROTO_TCP && f & TCP_RST != 0 => State::TcpClosing,
            State::TcpSynSent if reply && f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => {
                State::TcpEstablished
            }
            State::TcpEstablished if f & TCP_FIN != 0 => State::TcpClosing,
            State::Udp { replied } => State::Udp {
                replied: replied || reply,
            },
            s => s,
        };
        Tracked::Known {
            reply,
            meter: if reply { None } else { e.meter },
        }
    }

    /// Whether `flow` is live (for an ICMP error quoting it), without touching its state.
    pub fn contains(&self, flow: &FlowKey, now_ms: u64) -> bool {
        self.live(flow, now_ms).is_some()
    }

    /// `None` if `flow` is not live; else its flow's meter, whichever direction `flow` goes (an
    /// ICMP error quoting a packet of the flow counts against the flow's meter).
    pub fn live(&self, flow: &FlowKey, now_ms: u64) -> Option<Option<MeterKey>> {
        self.table
            .get(&ConnKey::of(flow))
            .filter(|e| now_ms.saturating_sub(e.last_ms) <= self.timeout(e.state))
            .map(|e| e.meter)
    }

    /// The meter of the flow of `packet`, if `packet` goes the originator's way (the packets a
    /// meter counts).
    pub fn meter(&self, packet: &FlowKey) -> Option<MeterKey> {
        let e = self.table.get(&ConnKey::of(packet))?;
        ((packet.src, packet.src_port) == e.originator)
            .then_some(e.meter)
            .flatten()
    }

    /// Starts tracking a flow the policy allowed (the first packet's direction is its originator).
    /// A TCP flow normally starts with a SYN. A mid-stream segment the policy allowed (a connection
    /// older than this table, after a restart or an eviction) is picked up as established, as
    /// Linux does with `nf_conntrack_tcp_loose`: the policy decided its direction just as it would
    /// have for the SYN. A lone RST starts nothing.
    pub fn insert(&mut self, packet: &FlowKey, len: usize, now_ms: u64, tag: u32) -> bool {
        self.insert_metered(packet, len, now_ms, tag, None)
    }

    /// [`Conntrack::insert`] for a flow whose originator's packets count against `meter`.
    pub fn insert_metered(
        &mut self,
        packet: &FlowKey,
        len: usize,
        now_ms: u64,
        tag: u32,
        meter: Option<MeterKey>,
    ) -> bool {
        let f = packet.tcp_flags;
        let state = match packet.protocol {
            PROTO_TCP if f & TCP_RST != 0 => return false,
            PROTO_TCP if f & (TCP_SYN | TCP_ACK) == TCP_SYN => State::TcpSynSent,
            PROTO_TCP if f & TCP_FIN != 0 => State::TcpClosing,
            PROTO_TCP => State::TcpEstablished,
            PROTO_ICMP | PROTO_ICMPV6 => State::Icmp,
            p if p == proto::ip::PROTO_UDP || p == proto::ip::PROTO_UDPLITE => {
                State::Udp { replied: false }
            }
            _ => State::Other,
        };
        let key = ConnKey::of(packet);
        while self.table.len() >= self.max_entries {
            match self.order.pop_front() {
                Some(old) => {
                    if self.table.remove(&old).is_some() {
                        self.evictions += 1;
                    }
                }
                None => break,
            }
        }
        let entry = Entry {
            originator: (packet.src, packet.src_port),
            state,
            created_ms: now_ms,
            last_ms: now_ms,
            packets: 1,
            bytes: len as u64,
            tag,
            meter,
        };
        if self.table.insert(key, entry).is_none() {
            self.order.push_back(key);
        }
        // Keep the order queue from growing past the table with keys already removed.
        if self.order.len() > 2 * self.max_entries {
            let table = &self.table;
            self.order.retain(|k| table.contains_key(k));
        }
        true
    }

    /// Removes and returns flows idle past their timeout (for the flow log's closing records).
    pub fn expire(&mut self, now_ms: u64) -> Vec<(ConnKey, Entry)> {
        let dead: Vec<ConnKey> = self
            .table
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.last_ms) > self.timeout(e.state))
            .map(|(k, _)| *k)
            .collect();
        dead.into_iter()
            .filter_map(|k| self.table.remove_entry(&k))
            .collect()
    }

    /// Keeps only the flows `keep` still allows (after a policy change; it may update what the
    /// caller attached, such as the meter), returning the cut ones.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&ConnKey, &mut Entry) -> bool,
    ) -> Vec<(ConnKey, Entry)> {
        let cut: Vec<ConnKey> = self
            .table
            .iter_mut()
            .filter_map(|(k, e)| (!keep(k, e)).then_some(*k))
            .collect();
        cut.into_iter()
            .filter_map(|k| self.table.remove_entry(&k))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_packet_rebuilds_the_originators_direction() {
        let mut ct = Conntrack::new(8, Timeouts::default());
        let syn = pkt("100.64.0.9", 40000, "100.64.0.1", 8080, PROTO_TCP, TCP_SYN);
        ct.insert(&syn, 60, 0, 0);
        let cut = ct.retain(|_, _| false);
        let (k, e) = &cut[0];
        assert_eq!(k.first_packet(e), syn);
        assert!(!ct.contains(&syn, 1));
    }

    fn pkt(src: &str, sp: u16, dst: &str, dp: u16, proto: u8, flags: u8) -> FlowKey {
        FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: proto,
            src_port: sp,
            dst_port: dp,
            icmp: None,
            tcp_flags: flags,
            later_fragment: false,
            fragment_id: None,
        }
    }

    const A: &str = "100.64.0.1";
    const B: &str = "100.64.0.2";

    #[test]
    fn a_tcp_flow_from_syn_to_established_to_close() {
        let mut ct = Conntrack::new(16, Timeouts::default());
        let syn = pkt(A, 40000, B, 8080, PROTO_TCP, TCP_SYN);
        assert_eq!(ct.track(&syn, 60, 0), Tracked::New);
        assert!(ct.insert(&syn, 60, 0, 7));
        let synack = pkt(B, 8080, A, 40000, PROTO_TCP, TCP_SYN | TCP_ACK);
        assert_eq!(
            ct.track(&synack, 60, 1),
            Tracked::Known {
                reply: true,
                meter: None
            }
        );
        let ack = pkt(A, 40000, B, 8080, PROTO_TCP, TCP_ACK);
        assert_eq!(
            ct.track(&ack, 60, 2),
            Tracked::Known {
                reply: false,
                meter: None
            }
        );
        let e = ct.table.values().next().unwrap();
        assert_eq!((e.state, e.packets, e.tag), (State::TcpEstablished, 3, 7));
        let fin = pkt(A, 40000, B, 8080, PROTO_TCP, TCP_FIN | TCP_ACK);
        ct.track(&fin, 60, 3);
        assert_eq!(ct.table.values().next().unwrap().state, State::TcpClosing);
        assert_eq!(
            ct.expire(3 + 60_001).len(),
            1,
            "closing flows expire after their timeout"
        );
    }

    #[test]
    fn a_mid_stream_segment_is_picked_up_in_its_direction_and_a_lone_rst_is_not() {
        let mut ct = Conntrack::new(16, Timeouts::default());
        assert!(!ct.insert(&pkt(A, 1, B, 2, PROTO_TCP, TCP_RST | TCP_ACK), 60, 0, 0));
        assert!(ct.is_empty());
        let ack = pkt(A, 40000, B, 8080, PROTO_TCP, TCP_ACK);
        assert!(ct.insert(&ack, 60, 0, 0));
        let e = ct.table.values().next().unwrap().clone();
        assert_eq!(e.state, State::TcpEstablished);
        assert_eq!(e.originator, (A.parse().unwrap(), 40000));
        let reply = pkt(B, 8080, A, 40000, PROTO_TCP, TCP_ACK);
        assert_eq!(
            ct.track(&reply, 60, 1),
            Tracked::Known {
                reply: true,
                meter: None
            }
        );
    }

    #[test]
    fn udp_replies_and_timeouts() {
        let t = Timeouts::default();
        let mut ct = Conntrack::new(16, t);
        let q = pkt(A, 5000, B, 53, proto::ip::PROTO_UDP, 0);
        ct.insert(&q, 40, 0, 0);
        assert_eq!(
            ct.track(&pkt(B, 53, A, 5000, proto::ip::PROTO_UDP, 0), 80, 10),
            Tracked::Known {
                reply: true,
                meter: None
            }
        );
        assert_eq!(
            ct.track(&q, 40, 10 + t.udp_replied_ms - 1),
            Tracked::Known {
                reply: false,
                meter: None
            }
        );
        assert_eq!(
            ct.track(&q, 40, 10 + 2 * t.udp_replied_ms + 1),
            Tracked::New,
            "idle past the timeout"
        );
    }

    #[test]
    fn the_table_is_bounded_and_evictions_are_counted() {
        let mut ct = Conntrack::new(3, Timeouts::default());
        for p in 0..10u16 {
            ct.insert(
                &pkt(A, 1000 + p, B, 53, proto::ip::PROTO_UDP, 0),
                40,
                u64::from(p),
                0,
            );
        }
        assert_eq!(ct.len(), 3);
        assert_eq!(ct.evictions, 7);
        assert_eq!(
            ct.track(&pkt(A, 1009, B, 53, proto::ip::PROTO_UDP, 0), 40, 10),
            Tracked::Known {
                reply: false,
                meter: None
            },
            "the newest stay"
        );
        assert_eq!(
            ct.track(&pkt(A, 1000, B, 53, proto::ip::PROTO_UDP, 0), 40, 10),
            Tracked::New,
            "the oldest went"
        );
    }

    #[test]
    fn a_policy_change_cuts_flows_it_now_denies() {
        let mut ct = Conntrack::new(16, Timeouts::default());
        ct.insert(&pkt(A, 1, B, 8080, PROTO_TCP, TCP_SYN), 60, 0, 1);
        ct.insert(&pkt(A, 2, B, 5432, PROTO_TCP, TCP_SYN), 60, 0, 2);
        let cut = ct.retain(|_, e| e.tag != 2);
        assert_eq!(cut.len(), 1);
        assert_eq!(
            ct.track(&pkt(A, 2, B, 5432, PROTO_TCP, TCP_ACK), 60, 1),
            Tracked::New
        );
        assert_eq!(
            ct.track(&pkt(B, 8080, A, 1, PROTO_TCP, TCP_SYN | TCP_ACK), 60, 1),
            Tracked::Known {
                reply: true,
                meter: None
            }
        );
    }
}
