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

/// Records gathered for one query at most (every node's); the rest are left for the next query.
pub const MAX_GATHERED: usize = 50_000;

/// The records of this node's log that `serve` asks for, and the cursor to ask from next.
pub fn read(log: &FlowLog, serve: &Serve) -> (Vec<FlowRecord>, u64) {
    let since = if serve.since == 0 {
        String::new()
    } else {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(serve.since)).to_string()
    };
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
            next,
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
    records: Vec<FlowRecord>,
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
        let mut p = Pending {
            reply,
            deadline_ms,
            nodes: members.into_iter().map(node).collect(),
            records: Vec::new(),
        };
        let (key, name) = own;
        p.nodes.insert(key, node((key, name)).1);
        p.take(key, local.0, local.1, true);
        p
    }

    /// A part of `from`'s answer (JSON lines; a line that is not a record is skipped).
    pub fn part(&mut self, from: [u8; 32], records: &[u8], next: u64, last: bool) {
        let parsed: Vec<FlowRecord> = records
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        self.take(from, parsed, next, last);
    }

    fn take(&mut self, from: [u8; 32], records: Vec<FlowRecord>, next: u64, last: bool) {
        let Some(n) = self.nodes.get_mut(&from) else {
            return;
        };
        let room = MAX_GATHERED.saturating_sub(self.records.len());
        n.records += records.len().min(room);
        n.answered |= last;
        n.next = n.next.max(next);
        let name = n.node.clone();
        self.records
            .extend(records.into_iter().take(room).map(|mut r| {
                r.node = Some(name.clone());
                r
            }));
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
        for m in &parts {
            let Message::FlowAnswer {
                records,
                next,
                last,
                ..
            } = m
            else {
                panic!()
            };
            p.part(other, records, *next, *last);
        }
        // A member not asked adds nothing; garbage lines are skipped.
        p.part([3; 32], b"{}", 1, true);
        p.part(other, b"not json\n", 400, false);
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
}
