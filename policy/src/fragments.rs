//! Later fragments carry no ports, so policy cannot decide them: they pass only when the first
//! fragment of their datagram passed (it carries the ports, and was decided or tracked). A
//! datagram is named by its addresses, protocol and IP identification, as the receiver's
//! reassembly names it (RFC 791, RFC 8200 section 4.5). Bounded in entries and time, pure: time
//! comes in as an argument.

use crate::conntrack::MeterKey;
use proto::ip::FlowKey;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// How long a first fragment lets its later fragments through: Linux's IPv4 reassembly timeout
/// (`ipfrag_time`, 30 s).
pub const FRAGMENT_MS: u64 = 30_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DatagramId {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    id: u32,
}

impl DatagramId {
    fn of(flow: &FlowKey) -> Option<DatagramId> {
        flow.fragment_id.map(|id| DatagramId {
            src: flow.src,
            dst: flow.dst,
            protocol: flow.protocol,
            id,
        })
    }
}

/// The datagrams whose first fragment passed, oldest first; at most `max` of them.
pub struct Fragments {
    max: usize,
    expires: HashMap<DatagramId, u64>,
    order: VecDeque<(DatagramId, u64)>,
    /// The rate-limit meter of a datagram's flow: its later fragments count against it too.
    meters: HashMap<DatagramId, MeterKey>,
    /// Entries dropped to stay within `max` before they expired.
    pub evictions: u64,
}

impl Fragments {
    pub fn new(max: usize) -> Fragments {
        Fragments {
            max: max.max(1),
            expires: HashMap::new(),
            order: VecDeque::new(),
            meters: HashMap::new(),
            evictions: 0,
        }
    }

    /// Records that the first fragment `flow` passed at `now_ms`. Whole datagrams are ignored.
    pub fn first_passed(&mut self, flow: &FlowKey, now_ms: u64) {
        let Some(id) = DatagramId::of(flow) else {
            return;
        };
        self.expire(now_ms);
        let until = now_ms + FRAGMENT_MS;
        if self.expires.insert(id, until).is_none() {
            while self.expires.len() > self.max {
                self.pop_oldest(true);
            }
        }
        self.order.push_back((id, until));
        if self.order.len() > 2 * self.max {
            // Renewals left stale entries behind: keep only the live ones, oldest first.
            let mut live: Vec<(DatagramId, u64)> =
                self.expires.iter().map(|(k, u)| (*k, *u)).collect();
            live.sort_by_key(|(_, u)| *u);
            self.order = live.into();
        }
    }

    /// [`Fragments::first_passed`] for a first fragment whose flow counts against `meter`.
    pub fn first_passed_metered(&mut self, flow: &FlowKey, now_ms: u64, meter: Option<MeterKey>) {
        self.first_passed(flow, now_ms);
        let Some(id) = DatagramId::of(flow) else {
            return;
        };
        match meter {
            Some(m) if self.expires.contains_key(&id) => {
                self.meters.insert(id, m);
            }
            _ => {
                self.meters.remove(&id);
            }
        }
    }

    /// Whether the later fragment `flow` belongs to a datagram whose first fragment passed.
    pub fn later_allowed(&mut self, flow: &FlowKey, now_ms: u64) -> bool {
        self.later(flow, now_ms).is_some()
    }

    /// `None` if the later fragment `flow` belongs to no datagram whose first fragment passed;
    /// else the meter its packets and bytes count against, if its flow has one.
    pub fn later(&mut self, flow: &FlowKey, now_ms: u64) -> Option<Option<MeterKey>> {
        self.expire(now_ms);
        let id = DatagramId::of(flow)?;
        self.expires
            .contains_key(&id)
            .then(|| self.meters.get(&id).copied())
    }

    pub fn len(&self) -> usize {
        self.expires.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expires.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        while self
            .order
            .front()
            .is_some_and(|(_, until)| *until <= now_ms)
        {
            self.pop_oldest(false);
        }
    }

    /// Drops the oldest queue entry; it removes the datagram only if no later first fragment
    /// renewed it (a stale queue entry is skipped).
    fn pop_oldest(&mut self, evicting: bool) {
        let Some((id, until)) = self.order.pop_front() else {
            return;
        };
        if self.expires.get(&id) == Some(&until) {
            self.expires.remove(&id);
            self.meters.remove(&id);
            if evicting {
                self.evictions += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(id: u32, later: bool) -> FlowKey {
        FlowKey {
            src: "100.64.0.2".parse().unwrap(),
            dst: "100.64.0.1".parse().unwrap(),
            protocol: 17,
            src_port: if later { 0 } else { 5000 },
            dst_port: if later { 0 } else { 53 },
            icmp: None,
            tcp_flags: 0,
            later_fragment: later,
            fragment_id: Some(id),
        }
    }

    #[test]
    fn a_later_fragment_passes_only_after_its_first_and_not_forever() {
        let mut f = Fragments::new(16);
        assert!(
            !f.later_allowed(&frag(7, true), 0),
            "no first fragment passed"
        );
        f.first_passed(&frag(7, false), 0);
        assert!(f.later_allowed(&frag(7, true), 10));
        assert!(!f.later_allowed(&frag(8, true), 10), "another datagram");
        let mut other_src = frag(7, true);
        other_src.src = "100.64.0.3".parse().unwrap();
        assert!(
            !f.later_allowed(&other_src, 10),
            "another sender's datagram"
        );
        assert!(!f.later_allowed(&frag(7, true), FRAGMENT_MS), "expired");
        assert!(f.is_empty());
    }

    #[test]
    fn the_table_stays_bounded_and_counts_evictions() {
        let mut f = Fragments::new(3);
        for id in 0..10 {
            f.first_passed(&frag(id, false), u64::from(id));
        }
        assert_eq!(f.len(), 3);
        assert_eq!(f.evictions, 7);
        assert!(f.later_allowed(&frag(9, true), 20));
        assert!(!f.later_allowed(&frag(0, true), 20));
        // The same first fragment again renews, without growing the table.
        f.first_passed(&frag(9, false), 30);
        assert_eq!(f.len(), 3);
        for t in 0..100 {
            f.first_passed(&frag(9, false), 40 + t);
        }
        assert!(f.order.len() <= 6, "renewals do not grow the queue");
        assert!(f.later_allowed(&frag(9, true), 150));
    }
}
