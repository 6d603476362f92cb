//! The shell's half of mesh-wide flow queries: reading this node's flow log for a query the node
//! said to serve, cutting it into answer messages, and gathering the answers to this node's own
//! query until every member asked has answered or the time is up. The node decides who is
//! answered and which answers count ([`super::flows`]).

use super::flows::Serve;
use crate::enforce::flowlog::FlowLog;
use proto::admin::{FlowRecord, MeshFlows, MeshFlowsNode};
use proto::control::{Message, MAX_FLOW_ANSWER_BYTES};
use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Bytes of records (as JSON) gathered for one query at most, shared equally by the nodes
/// asked, so that the answer stays within an admin-socket message and no member crowds out the
/// others; a node's records beyond its share are left for the next query (its cursor stops at
/// the last record kept).
pub const MAX_GATHERED_BYTES: usize = 12 << 20;

/// The records of this node's log that `serve` asks for, and the cursor to ask from next.
pub fn read(log: &FlowLog, serve: &Serve) -> (Vec<FlowRecord>, u64) {
    // The query was checked to be no later than its issue (a time that prints); a time that
    // does not is read as "everything", never a panic.
    let since = UNIX_EPOCH
        .checked_add(Duration::from_secs(serve.since))
        .filter(|_| serve.since > 0)
        .and_then(|t| {
            use std::fmt::Write;
            let mut s = String::new();
            write!(s, "{}", humantime::format_rfc3339_millis(t))
                .ok()
                .map(|_| s)
        })
        .unwrap_or_default();
    log.query_since(serve.after, &since, serve.denied_only, serve.limit)
}

/// The answer messages for `records`: JSON lines, each part at most
/// [`MAX_FLOW_ANSWER_BYTES`]; the last part says so and carries `next`. A record too large for
/// a part alone is left out.
pub fn answer(nonce: u64, records: &[FlowRecord], next: u64) -> Vec<Message> {
    let mut parts: Vec<Vec<u8>> = vec![Vec::new()];
    for r in records {
        let Ok(mut line) = serde_json::to_vec(r) else {
            continue;
        };
        line.push(b'\n');
        if line.len() > MAX_FLOW_ANSWER_BYTES {
            continue;
        }
        let room = parts.last().map_or(0, |p| MAX_FLOW_ANSWER_BYTES - p.len());
        if line.len() > room {
            parts.push(Vec::new());
        }
        if let Some(p) = parts.last_mut() {
            p.extend_from_slice(&line);
        }
    }
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, records)| Message::FlowAnswer {
            nonce,
            part: i.min(usize::from(u16::MAX)) as u16,
            last: i + 1 == n,
            // The cursor is on the last part alone: it counts once every part arrived.
            next: if i + 1 == n { next } else { 0 },
            records,
        })
        .collect()
}

/// This node's query, waiting for answers.
pub struct Pending {
    reply: oneshot::Sender<Result<MeshFlows, String>>,
    deadline_ms: u64,
    /// Per node asked (this one first): identity, key, answered, next.
    nodes: BTreeMap<[u8; 32], MeshFlowsNode>,
    /// Per node: the parts that arrived, the number of the last, the bytes kept, and the cursor
    /// of the last record kept when its share ran out.
    parts: BTreeMap<[u8; 32], Parts>,
    share_bytes: usize,
    records: Vec<FlowRecord>,
}

#[derive(Default)]
struct Parts {
    seen: std::collections::BTreeSet<u16>,
    last: Option<(u16, u64)>,
    bytes: usize,
    cut_at: Option<u64>,
}

impl Pending {
    /// A query asked of `members`, with this node's own records already read.
    pub fn new(
        reply: oneshot::Sender<Result<MeshFlows, String>>,
        deadline_ms: u64,
        own: ([u8; 32], String),
        local: (Vec<FlowRecord>, u64),
        members: Vec<([u8; 32], String)>,
    ) -> Pending {
        let node = |(k, name): ([u8; 32], String)| {
            (
                k,
                MeshFlowsNode {
                    node: name,
                    public_key: proto::Key(k).to_base64(),
                    answered: false,
                    records: 0,
                    next: 0,
                },
            )
        };
        let nodes: BTreeMap<[u8; 32], MeshFlowsNode> = members.into_iter().map(node).collect();
        let mut p = Pending {
            reply,
            deadline_ms,
            share_bytes: MAX_GATHERED_BYTES / (nodes.len() + 1),
            nodes,
            parts: BTreeMap::new(),
            records: Vec::new(),
        };
        let (key, name) = own;
        p.nodes.insert(key, node((key, name)).1);
        let (records, next) = local;
        let lines: Vec<Vec<u8>> = records
            .iter()
            .filter_map(|r| serde_json::to_vec(r).ok())
            .collect();
        p.take(key, 0, lines.join(&b'\n').as_slice(), Some(next));
        p
    }

    /// Part `part` of `from`'s answer (JSON lines; a line that is not a record is skipped);
    /// `next` counts on the last part. The node has answered, and its cursor moves, only when
    /// every part up to the last arrived: a part lost on the way leaves the cursor where it was,
    /// so the next query asks again for what was lost.
    pub fn part(&mut self, from: [u8; 32], part: u16, records: &[u8], next: u64, last: bool) {
        self.take(from, part, records, last.then_some(next));
    }

    fn take(&mut self, from: [u8; 32], part: u16, records: &[u8], last: Option<u64>) {
        let Some(n) = self.nodes.get_mut(&from) else {
            return;
        };
        let p = self.parts.entry(from).or_default();
        if !p.seen.insert(part) {
            return; // a duplicate
        }
        if let Some(next) = last {
            p.last = Some((part, next));
        }
        for line in records.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(mut r) = serde_json::from_slice::<FlowRecord>(line) else {
                continue;
            };
            if p.cut_at.is_some() {
                // Over its share: the rest waits for the next query (parts may come in any
                // order: the cursor stops at the lowest record left out).
                p.cut_at = p.cut_at.map(|c| c.min(r.seq.saturating_sub(1)));
                continue;
            }
            if p.bytes + line.len() > self.share_bytes {
                p.cut_at = Some(r.seq.saturating_sub(1));
                continue;
            }
            p.bytes += line.len();
            n.records += 1;
            r.node = Some(n.node.clone());
            self.records.push(r);
        }
        if let Some((last, next)) = p.last {
            if p.seen.len() == usize::from(last) + 1 {
                n.answered = true;
                n.next = p.cut_at.map_or(next, |c| c.min(next));
            }
        }
    }

    pub fn complete(&self) -> bool {
        self.nodes.values().all(|n| n.answered)
    }

    pub fn due(&self, now_ms: u64) -> bool {
        now_ms >= self.deadline_ms
    }

    /// Answers the operator: every record, merged by time, and what each node said.
    pub fn finish(mut self) {
        self.records
            .sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.node.cmp(&b.node)));
        let _ = self.reply.send(Ok(MeshFlows {
            records: self.records,
            nodes: self.nodes.into_values().collect(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::admin::FlowEnd;

    fn record(seq: u64, time: &str) -> FlowRecord {
        let end = FlowEnd {
            ip: "100.64.0.1".into(),
            port: Some(1),
            trust_domain: None,
            namespace: None,
            name: None,
            spiffe_id: None,
            networks: Vec::new(),
            labels: [("k".to_string(), "v".repeat(300))].into(),
        };
        FlowRecord {
            seq,
            time: time.into(),
            event: "new".into(),
            direction: "ingress".into(),
            verdict: "allow".into(),
            protocol: "tcp".into(),
            src: end.clone(),
            dst: end,
            policy: "p".into(),
            rule: None,
            log_rule: false,
            packets: None,
            bytes: None,
            staged: None,
            node: None,
        }
    }

    #[test]
    fn answers_are_cut_into_bounded_parts_and_gathered_back_by_node_and_time() {
        let records: Vec<FlowRecord> = (1..=400)
            .map(|i| record(i, &format!("2026-11-24T10:00:{:02}.000Z", i % 60)))
            .collect();
        let parts = answer(7, &records, 400);
        assert!(parts.len() > 1, "{} parts", parts.len());
        for (i, m) in parts.iter().enumerate() {
            let Message::FlowAnswer {
                nonce,
                part,
                last,
                records,
                ..
            } = m
            else {
                panic!()
            };
            assert_eq!((*nonce, usize::from(*part)), (7, i));
            assert_eq!(*last, i + 1 == parts.len());
            assert!(records.len() <= MAX_FLOW_ANSWER_BYTES);
            // Each part fits a control datagram once sealed.
            assert!(
                m.encode().len() + proto::control::SEALED_OVERHEAD
                    <= proto::control::MAX_DATAGRAM_BYTES
            );
        }
        let (tx, mut rx) = oneshot::channel();
        let (me, other) = ([1; 32], [2; 32]);
        let mut p = Pending::new(
            tx,
            1000,
            (me, "td/ns/me".into()),
            (vec![record(1, "2026-11-24T10:00:30.500Z")], 1),
            vec![(other, "td/ns/other".into())],
        );
        assert!(!p.complete());
        // The parts arrive last first, and one twice: the answer counts once all are there.
        for (i, m) in parts.iter().rev().chain(parts.first()).enumerate() {
            assert_eq!(p.complete(), i == parts.len(), "part {i}");
            let Message::FlowAnswer {
                part,
                records,
                next,
                last,
                ..
            } = m
            else {
                panic!()
            };
            p.part(other, *part, records, *next, *last);
        }
        // A member not asked adds nothing; garbage lines are skipped.
        p.part([3; 32], 0, b"{}", 1, true);
        p.part(other, 999, b"not json\n", 400, false);
        assert!(p.complete());
        p.finish();
        let got = rx.try_recv().unwrap().unwrap();
        assert_eq!(got.records.len(), 401);
        assert!(got.records.windows(2).all(|w| w[0].time <= w[1].time));
        let mine: Vec<_> = got
            .records
            .iter()
            .filter(|r| r.node.as_deref() == Some("td/ns/me"))
            .collect();
        assert_eq!(mine.len(), 1);
        let other_node = got.nodes.iter().find(|n| n.node == "td/ns/other").unwrap();
        assert_eq!((other_node.records, other_node.next), (400, 400));
        assert!(other_node.answered);
    }

    /// A part lost on the way: the node has not answered, and its cursor stays, so the next
    /// query asks again for what was lost.
    #[test]
    fn a_lost_part_leaves_the_cursor_where_it_was() {
        let records: Vec<FlowRecord> = (1..=400).map(|i| record(i, "t")).collect();
        let parts = answer(7, &records, 400);
        assert!(parts.len() > 2);
        let (tx, mut rx) = oneshot::channel();
        let other = [2; 32];
        let mut p = Pending::new(
            tx,
            0,
            ([1; 32], "me".into()),
            (Vec::new(), 0),
            vec![(other, "other".into())],
        );
        for m in parts.iter().skip(1) {
            let Message::FlowAnswer {
                part,
                records,
                next,
                last,
                ..
            } = m
            else {
                panic!()
            };
            p.part(other, *part, records, *next, *last);
        }
        assert!(!p.complete());
        p.finish();
        let got = rx.try_recv().unwrap().unwrap();
        let n = got.nodes.iter().find(|n| n.node == "other").unwrap();
        assert!(!n.answered);
        assert_eq!(n.next, 0, "the cursor does not move past the lost part");
    }

    /// A member that sends more than its share crowds out no one: its records beyond the share
    /// wait for the next query, and its cursor says so.
    #[test]
    fn each_node_gets_its_share_and_a_cut_cursor() {
        let big: Vec<FlowRecord> = (1..=40_000).map(|i| record(i, "t")).collect();
        let parts = answer(9, &big, 40_000);
        let (tx, mut rx) = oneshot::channel();
        let (greedy, honest) = ([2; 32], [3; 32]);
        let mut p = Pending::new(
            tx,
            0,
            ([1; 32], "me".into()),
            (Vec::new(), 0),
            vec![(greedy, "greedy".into()), (honest, "honest".into())],
        );
        for m in &parts {
            let Message::FlowAnswer {
                part,
                records,
                next,
                last,
                ..
            } = m
            else {
                panic!()
            };
            p.part(greedy, *part, records, *next, *last);
        }
        let few: Vec<FlowRecord> = (1..=10).map(|i| record(i, "t")).collect();
        for m in answer(9, &few, 10) {
            let Message::FlowAnswer {
                part,
                records,
                next,
                last,
                ..
            } = m
            else {
                panic!()
            };
            p.part(honest, part, &records, next, last);
        }
        assert!(p.complete());
        p.finish();
        let got = rx.try_recv().unwrap().unwrap();
        let node = |name: &str| got.nodes.iter().find(|n| n.node == name).unwrap().clone();
        let (g, h) = (node("greedy"), node("honest"));
        assert_eq!((h.records, h.next), (10, 10));
        assert!(g.records < 40_000 && g.records > 0, "{}", g.records);
        assert_eq!(
            g.next, g.records as u64,
            "the cursor stops at the last record kept"
        );
        let bytes: usize = got
            .records
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap().len())
            .sum();
        assert!(bytes <= MAX_GATHERED_BYTES);
    }
}
