//! Passing the signed policy set from node to node, pure (PROTOCOL.md section 6).
//!
//! A node that runs set `serial` offers it (serial, length, digest) to a newly admitted member, to
//! every member when the set changes, and to one member in turn every few seconds. A node pulls
//! the best set it has heard offered (the highest serial, then digest) from a member that offered
//! it, in chunks, a window at a time, re-asking from where it stopped if the chunks stall. A node
//! that runs no set yet first listens for [`GATHER_MS`], so that it takes the newest set its
//! members run, not the first one offered.
//!
//! The bytes of a finished transfer must hash to the offered digest before anything is decided
//! about the set: a member that serves other bytes than it offered is set aside for transfers,
//! and the set it named is still taken from an honest member. The node verifies the signature and
//! the serial of a complete set; a set that fails that is refused by (serial, digest).

use proto::control::{Message, MAX_POLICY_CHUNK_BYTES};
use proto::policyset::{digest_of, MAX_SET_BYTES};
use std::collections::{BTreeMap, BTreeSet};

/// Chunks sent for one request.
const WINDOW: usize = 4;
/// A transfer without progress for this long is asked again from where it stopped.
const STALL_MS: u64 = 1_000;
/// Re-asks before a transfer is given up.
const MAX_RETRIES: u32 = 10;
/// A member whose transfer stalled out, whose bytes did not match its offer, or whose set was
/// refused is not pulled from for this long, so a faulty or hostile member cannot keep others
/// from taking a good set.
pub const DISTRUST_MS: u64 = 60_000;
/// Refused (serial, digest) pairs remembered at most.
const MAX_REFUSED: usize = 1024;
/// A node without a set listens this long to its members' offers before it pulls the best.
pub const GATHER_MS: u64 = 1_000;

struct Transfer {
    from: [u8; 32],
    serial: u64,
    length: u32,
    digest: [u8; 32],
    buf: Vec<u8>,
    /// The offset last asked from: a window of chunks from there is on its way.
    asked: usize,
    last_ms: u64,
    retries: u32,
}

/// What a member last said it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    pub serial: u64,
    pub digest: [u8; 32],
    pub length: u32,
}

/// Whether set `offered` (serial, digest) replaces the running one: a higher serial does; so does
/// the same serial with a higher digest, so that two sets signed concurrently with the same serial
/// (two admins applying at once on different nodes) still converge to one, everywhere.
pub fn supersedes(offered: (u64, [u8; 32]), running: Option<(u64, [u8; 32])>) -> bool {
    running.is_none_or(|r| offered > r)
}

// Built a few times per transfer on the control path; boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum SyncAction {
    Send([u8; 32], Message),
    /// A whole set arrived whose bytes match the offered digest (not yet verified): its
    /// encoding, and the member it came from.
    Complete {
        from: [u8; 32],
        serial: u64,
        digest: [u8; 32],
        encoded: Vec<u8>,
    },
}

#[derive(Default)]
pub struct PolicySync {
    current: Option<(u64, Vec<u8>, [u8; 32])>,
    incoming: Option<Transfer>,
    /// (serial, digest) of sets that arrived whole, matched their digest, and were refused: not
    /// fetched again.
    refused: BTreeSet<(u64, [u8; 32])>,
    /// What each member last said it runs.
    heard: BTreeMap<[u8; 32], Heard>,
    /// Members not pulled from until the time given (ms).
    distrusted: BTreeMap<[u8; 32], u64>,
    /// While a node without a set gathers offers: until when.
    gather_until: Option<u64>,
}

impl PolicySync {
    /// The set this node now runs (already verified and installed).
    pub fn set_current(&mut self, serial: u64, encoded: Vec<u8>, digest: [u8; 32]) {
        self.current = Some((serial, encoded, digest));
        if self
            .incoming
            .as_ref()
            .is_some_and(|t| !supersedes((t.serial, t.digest), Some((serial, digest))))
        {
            self.incoming = None;
        }
    }

    fn current_id(&self) -> Option<(u64, [u8; 32])> {
        self.current.as_ref().map(|c| (c.0, c.2))
    }

    /// What member `key` last said it runs: serial and digest.
    pub fn heard(&self, key: &[u8; 32]) -> Option<(u64, [u8; 32])> {
        self.heard.get(key).map(|h| (h.serial, h.digest))
    }

    /// Forgets what a member that left said.
    pub fn forget(&mut self, key: &[u8; 32]) {
        self.heard.remove(key);
    }

    /// A set that arrived whole and failed verification or compilation: never fetched again.
    pub fn refuse(&mut self, serial: u64, digest: [u8; 32]) {
        if self.refused.len() >= MAX_REFUSED {
            self.refused.clear();
        }
        self.refused.insert((serial, digest));
    }

    /// `from` served bytes that did not match its offer, stalled, or sent a refused set: it is
    /// not pulled from for a while.
    pub fn distrust(&mut self, from: [u8; 32], now_ms: u64) {
        self.distrusted.insert(from, now_ms + DISTRUST_MS);
    }

    pub fn offer(&self) -> Option<Message> {
        self.current
            .as_ref()
            .map(|(serial, enc, digest)| Message::PolicyOffer {
                serial: *serial,
                length: enc.len() as u32,
                digest: *digest,
            })
    }

    /// The best set heard offered that is worth pulling, and a member to pull it from.
    fn best(&self, now_ms: u64) -> Option<([u8; 32], Heard)> {
        let current = self.current_id();
        self.heard
            .iter()
            .filter(|(k, h)| {
                supersedes((h.serial, h.digest), current)
                    && h.length as usize <= MAX_SET_BYTES
                    && !self.refused.contains(&(h.serial, h.digest))
                    && self.distrusted.get(*k).is_none_or(|until| *until <= now_ms)
            })
            .max_by_key(|(_, h)| (h.serial, h.digest))
            .map(|(k, h)| (*k, *h))
    }

    /// Starts pulling the best set heard of, unless a transfer of it (or of a better one) runs,
    /// or a node without a set is still gathering offers.
    fn pull_best(&mut self, now_ms: u64, out: &mut Vec<SyncAction>) {
        if self.current.is_none() && self.gather_until.is_some_and(|t| now_ms < t) {
            return;
        }
        let Some((from, h)) = self.best(now_ms) else {
            return;
        };
        if self
            .incoming
            .as_ref()
            .is_some_and(|t| !supersedes((h.serial, h.digest), Some((t.serial, t.digest))))
        {
            return;
        }
        self.incoming = Some(Transfer {
            from,
            serial: h.serial,
            length: h.length,
            digest: h.digest,
            buf: Vec::new(),
            asked: 0,
            last_ms: now_ms,
            retries: 0,
        });
        out.push(SyncAction::Send(
            from,
            Message::PolicyRequest {
                serial: h.serial,
                offset: 0,
            },
        ));
    }

    pub fn on_message(&mut self, from: [u8; 32], msg: Message, now_ms: u64) -> Vec<SyncAction> {
        let mut out = Vec::new();
        match msg {
            Message::PolicyOffer {
                serial,
                length,
                digest,
            } => {
                self.heard.insert(
                    from,
                    Heard {
                        serial,
                        digest,
                        length,
                    },
                );
                if self.current.is_none() && self.gather_until.is_none() {
                    self.gather_until = Some(now_ms + GATHER_MS);
                }
                // A member behind us (it restarted, or missed a change) learns of our set now
                // rather than at our next offer in turn.
                if let Some(ours) = self.offer() {
                    let id = self.current_id().expect("a current set");
                    if supersedes(id, Some((serial, digest))) {
                        out.push(SyncAction::Send(from, ours));
                    }
                }
                self.pull_best(now_ms, &mut out);
            }
            Message::PolicyRequest { serial, offset } => {
                let Some((cur, enc, _)) = &self.current else {
                    return out;
                };
                if *cur != serial {
                    return out;
                }
                let mut at = offset as usize;
                for _ in 0..WINDOW {
                    if at >= enc.len() {
                        break;
                    }
                    let end = (at + MAX_POLICY_CHUNK_BYTES).min(enc.len());
                    out.push(SyncAction::Send(
                        from,
                        Message::PolicyChunk {
                            serial,
                            offset: at as u32,
                            length: enc.len() as u32,
                            data: enc[at..end].to_vec(),
                        },
                    ));
                    at = end;
                }
            }
            Message::PolicyChunk {
                serial,
                offset,
                length,
                data,
            } => {
                let Some(t) = &mut self.incoming else {
                    return out;
                };
                if t.from != from || t.serial != serial || t.length != length {
                    return out;
                }
                let offset = offset as usize;
                if offset > t.buf.len() && t.asked != t.buf.len() {
                    // A later chunk came first: the one before it was lost. Ask again from the
                    // gap now, once, rather than after the stall timeout.
                    t.asked = t.buf.len();
                    t.last_ms = now_ms;
                    out.push(SyncAction::Send(
                        from,
                        Message::PolicyRequest {
                            serial,
                            offset: t.buf.len() as u32,
                        },
                    ));
                }
                if offset != t.buf.len() {
                    return out;
                }
                t.buf.extend_from_slice(&data);
                t.last_ms = now_ms;
                t.retries = 0;
                if t.buf.len() == t.length as usize {
                    let t = self.incoming.take().expect("present");
                    if digest_of(&t.buf) != t.digest {
                        // Not the set it offered: the member is set aside, the set is not, and
                        // another member that offers it is asked at once.
                        self.distrust(from, now_ms);
                        self.pull_best(now_ms, &mut out);
                        return out;
                    }
                    out.push(SyncAction::Complete {
                        from,
                        serial: t.serial,
                        digest: t.digest,
                        encoded: t.buf,
                    });
                } else if t.buf.len() >= t.asked + WINDOW * MAX_POLICY_CHUNK_BYTES {
                    t.asked = t.buf.len();
                    out.push(SyncAction::Send(
                        from,
                        Message::PolicyRequest {
                            serial,
                            offset: t.buf.len() as u32,
                        },
                    ));
                }
            }
            _ => {}
        }
        out
    }

    /// Asks again for a stalled transfer, or gives it up (and sets its sender aside for a while);
    /// with no transfer running, pulls the best set heard of.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<SyncAction> {
        let mut out = Vec::new();
        if let Some(t) = &mut self.incoming {
            if now_ms < t.last_ms + STALL_MS {
                return out;
            }
            if t.retries >= MAX_RETRIES {
                let from = t.from;
                self.incoming = None;
                self.distrust(from, now_ms);
            } else {
                t.retries += 1;
                t.last_ms = now_ms;
                t.asked = t.buf.len();
                out.push(SyncAction::Send(
                    t.from,
                    Message::PolicyRequest {
                        serial: t.serial,
                        offset: t.buf.len() as u32,
                    },
                ));
                return out;
            }
        }
        self.pull_best(now_ms, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];

    /// Delivers every Send between two nodes until none is left, dropping messages `lose` picks.
    fn run(
        a: &mut PolicySync,
        b: &mut PolicySync,
        first: Vec<SyncAction>,
        mut lose: impl FnMut(&Message) -> bool,
    ) -> Option<Vec<u8>> {
        run_counting(a, b, first, &mut lose).0
    }

    /// [`run`], also returning how often the transfer waited for the stall timer.
    fn run_counting(
        a: &mut PolicySync,
        b: &mut PolicySync,
        first: Vec<SyncAction>,
        mut lose: impl FnMut(&Message) -> bool,
    ) -> (Option<Vec<u8>>, usize) {
        let mut stalls = 0;
        let mut queue: Vec<([u8; 32], [u8; 32], Message)> = Vec::new();
        let mut done = None;
        // As the node does: a complete set (verified there) becomes B's current one.
        let mut push =
            |from: [u8; 32], acts: Vec<SyncAction>, q: &mut Vec<_>, b: &mut PolicySync| {
                for act in acts {
                    match act {
                        SyncAction::Send(to, m) => q.push((from, to, m)),
                        SyncAction::Complete {
                            serial,
                            digest,
                            encoded,
                            ..
                        } => {
                            b.set_current(serial, encoded.clone(), digest);
                            done = Some(encoded);
                        }
                    }
                }
            };
        push(A, first, &mut queue, b);
        let mut now = 0;
        for _ in 0..10_000 {
            now += 10;
            if queue.is_empty() {
                // Let the stall timer speak.
                now += STALL_MS;
                let acts = b.on_tick(now);
                push(B, acts, &mut queue, b);
                if queue.is_empty() {
                    break;
                }
                stalls += 1;
            }
            let (from, to, m) = queue.remove(0);
            if lose(&m) {
                continue;
            }
            let acts = if to == B {
                b.on_message(from, m, now)
            } else {
                a.on_message(from, m, now)
            };
            push(to, acts, &mut queue, b);
        }
        (done, stalls)
    }

    fn big(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A node running set 5 (`enc`), and its offer to B.
    fn runs(enc: &[u8]) -> (PolicySync, Vec<SyncAction>) {
        let mut a = PolicySync::default();
        a.set_current(5, enc.to_vec(), digest_of(enc));
        let offer = vec![SyncAction::Send(B, a.offer().unwrap())];
        (a, offer)
    }

    #[test]
    fn a_newer_set_is_pulled_whole_across_many_windows() {
        let enc = big(MAX_POLICY_CHUNK_BYTES * 9 + 123);
        let (mut a, offer) = runs(&enc);
        let mut b = PolicySync::default();
        b.set_current(4, vec![1, 2, 3], [8; 32]);
        assert_eq!(run(&mut a, &mut b, offer, |_| false), Some(enc.clone()));
        assert_eq!(b.heard(&A), Some((5, digest_of(&enc))));
    }

    #[test]
    fn lost_chunks_are_asked_for_again() {
        let enc = big(MAX_POLICY_CHUNK_BYTES * 6);
        let (mut a, offer) = runs(&enc);
        let mut b = PolicySync::default();
        let mut n = 0;
        let lose_every_third_chunk = |m: &Message| {
            n += 1;
            matches!(m, Message::PolicyChunk { .. }) && n % 3 == 0
        };
        assert_eq!(
            run(&mut a, &mut b, offer, lose_every_third_chunk),
            Some(enc)
        );
    }

    #[test]
    fn a_chunk_lost_inside_a_window_is_asked_for_at_once_without_a_stall() {
        let enc = big(MAX_POLICY_CHUNK_BYTES * 11 + 5);
        let (mut a, offer) = runs(&enc);
        let mut b = PolicySync::default();
        b.set_current(4, vec![1, 2, 3], [8; 32]);
        // Chunks 1 and 6, the first time each is sent.
        let mut lost = BTreeSet::new();
        let lose_two = |m: &Message| match m {
            Message::PolicyChunk { offset, .. } => {
                let i = *offset as usize / MAX_POLICY_CHUNK_BYTES;
                [1, 6].contains(&i) && lost.insert(i)
            }
            _ => false,
        };
        let (got, stalls) = run_counting(&mut a, &mut b, offer, lose_two);
        assert_eq!(got, Some(enc));
        assert_eq!(stalls, 0, "the gap was noticed by the chunk after it");
    }

    #[test]
    fn two_sets_with_one_serial_converge_on_the_higher_digest() {
        assert!(supersedes((5, [2; 32]), Some((5, [1; 32]))));
        assert!(!supersedes((5, [1; 32]), Some((5, [2; 32]))));
        assert!(!supersedes((4, [9; 32]), Some((5, [1; 32]))));
        assert!(supersedes((1, [0; 32]), None));
        let (hi, lo) = if digest_of(&big(100)) > digest_of(&big(90)) {
            (big(100), big(90))
        } else {
            (big(90), big(100))
        };
        let mut a = PolicySync::default();
        a.set_current(5, hi.clone(), digest_of(&hi));
        let mut b = PolicySync::default();
        b.set_current(5, lo.clone(), digest_of(&lo));
        let offer = vec![SyncAction::Send(B, a.offer().unwrap())];
        assert_eq!(run(&mut a, &mut b, offer, |_| false), Some(hi));
        // The other way round, A pulls nothing and answers with its own offer.
        let mut b2 = PolicySync::default();
        b2.set_current(5, lo.clone(), digest_of(&lo));
        assert_eq!(
            a.on_message(B, b2.offer().unwrap(), 0),
            vec![SyncAction::Send(B, a.offer().unwrap())]
        );
    }

    #[test]
    fn a_member_that_stalls_a_transfer_is_set_aside_and_another_supplies_the_set() {
        let mut b = PolicySync::default();
        let hostile = [7; 32];
        let huge = Message::PolicyOffer {
            serial: u64::MAX,
            length: 100,
            digest: [1; 32],
        };
        b.set_current(1, big(10), digest_of(&big(10)));
        assert_eq!(b.on_message(hostile, huge.clone(), 0).len(), 1);
        // It never sends a chunk: asked again each second, then given up.
        let mut now = 0;
        for _ in 0..MAX_RETRIES {
            now += STALL_MS;
            assert_eq!(b.on_tick(now).len(), 1);
        }
        now += STALL_MS;
        assert!(b.on_tick(now).is_empty());
        // Its next offer is ignored; a good member's offer is taken.
        assert!(b.on_message(hostile, huge, now).is_empty());
        let mut a = PolicySync::default();
        a.set_current(5, big(100), digest_of(&big(100)));
        assert_eq!(b.on_message(A, a.offer().unwrap(), now).len(), 1);
    }

    /// Offers `enc` as set `serial` from `from` to `b`, and serves `served` for it; returns what
    /// `b` did at the end.
    fn serve(
        b: &mut PolicySync,
        from: [u8; 32],
        serial: u64,
        enc: &[u8],
        served: &[u8],
        now: u64,
    ) -> Vec<SyncAction> {
        let offer = Message::PolicyOffer {
            serial,
            length: enc.len() as u32,
            digest: digest_of(enc),
        };
        let mut acts = b.on_message(from, offer, now);
        acts.extend(b.on_tick(now + GATHER_MS));
        let mut last = Vec::new();
        let mut at = 0;
        while at < served.len() {
            let end = (at + MAX_POLICY_CHUNK_BYTES).min(served.len());
            let chunk = Message::PolicyChunk {
                serial,
                offset: at as u32,
                length: served.len() as u32,
                data: served[at..end].to_vec(),
            };
            last = b.on_message(from, chunk, now + GATHER_MS);
            at = end;
        }
        last
    }

    #[test]
    fn a_member_serving_other_bytes_than_it_offered_is_set_aside_and_the_set_still_comes() {
        let good = big(MAX_POLICY_CHUNK_BYTES + 77);
        let zeros = vec![0u8; good.len()];
        let mut b = PolicySync::default();
        b.set_current(4, big(10), digest_of(&big(10)));
        let hostile = [7; 32];
        // The hostile member offers the real set's id and serves zeros: nothing completes, and
        // the id is not marked refused.
        let acts = serve(&mut b, hostile, 5, &good, &zeros, 0);
        assert!(!acts
            .iter()
            .any(|a| matches!(a, SyncAction::Complete { .. })));
        assert!(b.refused.is_empty(), "the set itself is not refused");
        // Its next offer is not pulled; the honest member's offer of the same id is.
        assert!(serve(&mut b, hostile, 5, &good, &zeros, 10).is_empty());
        let acts = serve(&mut b, A, 5, &good, &good, 20);
        assert!(
            matches!(&acts[..], [SyncAction::Complete { serial: 5, encoded, .. }] if *encoded == good),
            "{acts:?}"
        );
    }

    #[test]
    fn a_node_without_a_set_gathers_offers_and_pulls_the_newest() {
        let mut b = PolicySync::default();
        let old = big(50);
        let new = big(60);
        let offer = |serial: u64, enc: &[u8]| Message::PolicyOffer {
            serial,
            length: enc.len() as u32,
            digest: digest_of(enc),
        };
        // A replayed old set, offered first, is not pulled at once ...
        assert!(b.on_message([7; 32], offer(2, &old), 0).is_empty());
        assert!(b.on_message(A, offer(9, &new), 300).is_empty());
        assert!(b.on_tick(GATHER_MS - 1).is_empty());
        // ... and when the gathering ends, the newest is.
        assert_eq!(
            b.on_tick(GATHER_MS),
            vec![SyncAction::Send(
                A,
                Message::PolicyRequest {
                    serial: 9,
                    offset: 0
                }
            )]
        );
    }

    #[test]
    fn an_older_or_equal_or_refused_set_is_not_fetched() {
        let mut a = PolicySync::default();
        a.set_current(5, big(100), [9; 32]);
        let mut b = PolicySync::default();
        b.set_current(5, big(100), [9; 32]);
        let offer = a.offer().unwrap();
        assert!(b.on_message(A, offer.clone(), 0).is_empty());
        let mut c = PolicySync::default();
        c.refuse(5, [9; 32]);
        assert!(c.on_message(A, offer.clone(), 0).is_empty());
        // A chunk nobody asked for changes nothing.
        let stray = Message::PolicyChunk {
            serial: 5,
            offset: 0,
            length: 100,
            data: big(100),
        };
        assert!(c.on_message(A, stray, 0).is_empty());
    }
}
