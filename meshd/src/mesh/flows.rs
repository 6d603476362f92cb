//! Mesh-wide flow queries, the node's side: which signed queries ([`proto::flowquery`]) a member
//! answers, how often, and which answers this node asked for. Pure: the shell reads the flow log
//! and carries the records.
//!
//! A query is answered when a policy admin of this node signed it, it names the member that sent
//! it over the sealed channel as the node that asks, it is fresh, and its nonce was not answered
//! before; each member may ask [`QUERY_RATE`] times a second (with a burst), so a member cannot
//! make another read its log without pause. Answers count only for a query this node sent, from
//! a member it asked, until the query's time is up.

use policy::ratelimit::{Bucket, Rate};
use proto::flowquery::FlowQuery;
use std::collections::{BTreeMap, BTreeSet};

/// Queries a member may have answered per second, and at once.
pub const QUERY_RATE: Rate = Rate {
    per_second: 2,
    burst: 10,
};
/// How long this node waits for the answers to its own query.
pub const ANSWER_WAIT_MS: u64 = 3000;
/// Nonces remembered (answered, or asked), at most; beyond, the oldest are forgotten, and a
/// forgotten nonce's query is stale by then.
const MAX_NONCES: usize = 4096;
/// Members whose query budget is remembered at most.
const MAX_BUDGETS: usize = 4096;

/// What to read from the flow log for a query that is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serve {
    pub nonce: u64,
    /// Unix seconds; 0: every record kept.
    pub since: u64,
    pub denied_only: bool,
    pub limit: usize,
    /// Records after this sequence number.
    pub after: u64,
}

#[derive(Debug, Default)]
pub struct FlowQueries {
    /// (asker, nonce) of queries answered, with when they may be forgotten (once stale).
    answered: BTreeMap<([u8; 32], u64), u64>,
    budgets: BTreeMap<[u8; 32], Bucket>,
    /// This node's own queries: the members asked, until when.
    asked: BTreeMap<u64, (BTreeSet<[u8; 32]>, u64)>,
}

impl FlowQueries {
    /// A query `bytes` from member `from`: what to serve, or why not.
    pub fn on_query(
        &mut self,
        from: [u8; 32],
        bytes: &[u8],
        admins: &[[u8; 32]],
        now_ms: u64,
    ) -> Result<Serve, String> {
        self.forget(now_ms);
        // Every query costs its sender from its budget, answered or not, before the signature
        // is checked: a member cannot make this node verify signatures without pause.
        if !self.budgets.contains_key(&from) && self.budgets.len() >= MAX_BUDGETS {
            // Budgets that are full again are as good as forgotten.
            self.budgets.retain(|_, b| !b.is_full(QUERY_RATE, now_ms));
        }
        if self.budgets.len() >= MAX_BUDGETS && !self.budgets.contains_key(&from) {
            return Err("too many members asking at once".into());
        }
        let budget = self
            .budgets
            .entry(from)
            .or_insert_with(|| Bucket::full(QUERY_RATE, now_ms));
        if !budget.take(QUERY_RATE, 1, now_ms) {
            return Err(format!(
                "more than {} queries a second from this member",
                QUERY_RATE.per_second
            ));
        }
        let (serve, stale_after_ms) = check(from, bytes, admins, now_ms)?;
        if self.answered.contains_key(&(from, serve.nonce)) {
            return Err("a query already answered (replayed)".into());
        }
        if self.answered.len() >= MAX_NONCES {
            // The entry that goes stale first: a fresh nonce is never the one forgotten.
            if let Some(k) = self
                .answered
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(k, _)| *k)
            {
                self.answered.remove(&k);
            }
        }
        self.answered
            .insert((from, serve.nonce), stale_after_ms.max(now_ms));
        Ok(serve)
    }

    /// This node asks `members` with its own query `bytes` (signed for it, checked against its
    /// own admins as a member would): what to serve from its own log.
    pub fn ask(
        &mut self,
        own: [u8; 32],
        bytes: &[u8],
        admins: &[[u8; 32]],
        members: BTreeSet<[u8; 32]>,
        now_ms: u64,
    ) -> Result<Serve, String> {
        let (serve, _) = check(own, bytes, admins, now_ms)?;
        self.forget(now_ms);
        if self.asked.len() >= MAX_NONCES {
            self.asked.pop_first();
        }
        self.asked
            .insert(serve.nonce, (members, now_ms + ANSWER_WAIT_MS));
        Ok(serve)
    }

    /// Whether an answer to `nonce` from `from` is one this node waits for.
    pub fn solicited(&self, from: &[u8; 32], nonce: u64, now_ms: u64) -> bool {
        self.asked
            .get(&nonce)
            .is_some_and(|(who, until)| now_ms <= *until && who.contains(from))
    }

    fn forget(&mut self, now_ms: u64) {
        self.answered.retain(|_, until| now_ms <= *until);
        self.asked.retain(|_, (_, until)| now_ms <= *until);
    }
}

/// Decodes `bytes` and checks that this node answers it for `sender`: what to serve, and when
/// the query goes stale.
fn check(
    sender: [u8; 32],
    bytes: &[u8],
    admins: &[[u8; 32]],
    now_ms: u64,
) -> Result<(Serve, u64), String> {
    let (q, signature) = FlowQuery::decode(bytes).map_err(|e| e.to_string())?;
    q.verify(&signature, admins, &sender, now_ms / 1000)
        .map_err(|e| e.to_string())?;
    let serve = Serve {
        nonce: q.nonce,
        since: q.since,
        denied_only: q.denied_only,
        limit: usize::from(q.limit),
        after: q.cursor(&sender),
    };
    Ok((serve, q.stale_after_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    const ASKER: [u8; 32] = [7; 32];
    const NOW_MS: u64 = 1_000_000_000;

    fn signed(admin: &SigningKey, requester: [u8; 32], nonce: u64, issued_at: u64) -> Vec<u8> {
        FlowQuery {
            admin: [0; 32],
            requester,
            nonce,
            issued_at,
            since: 0,
            denied_only: false,
            limit: 100,
            cursors: vec![([1; 32], 40)],
        }
        .sign(admin)
    }

    #[test]
    fn only_a_fresh_query_of_an_admin_for_its_sender_is_served_once() {
        let admin = SigningKey::from_bytes(&[3; 32]);
        let admins = [admin.verifying_key().to_bytes()];
        let mut f = FlowQueries::default();
        let q = signed(&admin, ASKER, 1, NOW_MS / 1000);
        // Served to us (node [1; 32]) from our cursor.
        let s = f.on_query(ASKER, &q, &admins, NOW_MS).unwrap();
        assert_eq!((s.nonce, s.limit, s.after), (1, 100, 0));
        // The same query again: replayed.
        assert!(f
            .on_query(ASKER, &q, &admins, NOW_MS)
            .unwrap_err()
            .contains("replayed"));
        // Sent on by another member: not for it.
        let q2 = signed(&admin, ASKER, 2, NOW_MS / 1000);
        assert!(f
            .on_query([8; 32], &q2, &admins, NOW_MS)
            .unwrap_err()
            .contains("another node"));
        // Signed by a key that is no admin here; stale; garbage.
        let rogue = SigningKey::from_bytes(&[4; 32]);
        let q3 = signed(&rogue, ASKER, 3, NOW_MS / 1000);
        assert!(f
            .on_query(ASKER, &q3, &admins, NOW_MS)
            .unwrap_err()
            .contains("not a policy admin"));
        let q4 = signed(&admin, ASKER, 4, NOW_MS / 1000 - 120);
        assert!(f
            .on_query(ASKER, &q4, &admins, NOW_MS)
            .unwrap_err()
            .contains("not within"));
        assert!(f.on_query(ASKER, b"MSFQ", &admins, NOW_MS).is_err());
    }

    #[test]
    fn a_member_that_asks_too_often_is_refused_until_its_budget_refills() {
        let admin = SigningKey::from_bytes(&[3; 32]);
        let admins = [admin.verifying_key().to_bytes()];
        let mut f = FlowQueries::default();
        let served = (0..50)
            .filter(|n| {
                let q = signed(&admin, ASKER, *n, NOW_MS / 1000);
                f.on_query(ASKER, &q, &admins, NOW_MS).is_ok()
            })
            .count();
        assert_eq!(served as u64, QUERY_RATE.burst);
        let q = signed(&admin, ASKER, 100, NOW_MS / 1000);
        assert!(f.on_query(ASKER, &q, &admins, NOW_MS + 500).is_ok());
    }

    #[test]
    fn answers_count_only_from_members_asked_until_the_time_is_up() {
        let admin = SigningKey::from_bytes(&[3; 32]);
        let admins = [admin.verifying_key().to_bytes()];
        let mut f = FlowQueries::default();
        let own = [1; 32];
        let q = signed(&admin, own, 9, NOW_MS / 1000);
        let s = f
            .ask(own, &q, &admins, [[2; 32], [3; 32]].into(), NOW_MS)
            .unwrap();
        assert_eq!(s.after, 40, "our own cursor");
        assert!(f.solicited(&[2; 32], 9, NOW_MS + 10));
        assert!(!f.solicited(&[4; 32], 9, NOW_MS + 10), "not asked");
        assert!(!f.solicited(&[2; 32], 10, NOW_MS + 10), "another nonce");
        assert!(
            !f.solicited(&[2; 32], 9, NOW_MS + ANSWER_WAIT_MS + 1),
            "too late"
        );
        // A query this node could not answer itself is refused before anything is sent.
        let rogue = SigningKey::from_bytes(&[4; 32]);
        assert!(f
            .ask(
                own,
                &signed(&rogue, own, 11, NOW_MS / 1000),
                &admins,
                BTreeSet::new(),
                NOW_MS
            )
            .is_err());
    }
}
