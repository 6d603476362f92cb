//! Passing the signed policy set from node to node, pure (PROTOCOL.md section 6).
//!
//! A node that runs set `serial` offers it (serial, length, digest) to a newly admitted member, to
//! every member when the set changes, and to one member in turn every few seconds. A node that
//! hears of a newer serial pulls it from the offerer in chunks, a window at a time, re-asking
//! from where it stopped if the chunks stall. The shell verifies the signature and the serial of a
//! complete set before anything uses it; this module only moves bytes.

use proto::control::{Message, MAX_POLICY_CHUNK_BYTES};
use proto::policyset::MAX_SET_BYTES;
use std::collections::{BTreeMap, BTreeSet};

/// Chunks sent for one request.
const WINDOW: usize = 4;
/// A transfer without progress for this long is asked again from where it stopped.
const STALL_MS: u64 = 1_000;
/// Re-asks before a transfer is given up.
const MAX_RETRIES: u32 = 10;
/// A member whose transfer stalled out or whose set was refused is not listened to for this long,
/// so a faulty or hostile member cannot keep others from taking a good set.
const DISTRUST_MS: u64 = 60_000;
/// Refused (serial, digest) pairs remembered at most.
const MAX_REFUSED: usize = 1024;

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
    /// A whole set arrived (not yet verified): its encoding, and the member it came from.
    Complete {
        from: [u8; 32],
        encoded: Vec<u8>,
    },
}

#[derive(Default)]
pub struct PolicySync {
    current: Option<(u64, Vec<u8>, [u8; 32])>,
    incoming: Option<Transfer>,
    /// (serial, digest) of sets that arrived whole but were refused: not fetched again.
    refused: BTreeSet<(u64, [u8; 32])>,
    /// What each member last said it runs: serial and digest.
    pub heard: BTreeMap<[u8; 32], (u64, [u8; 32])>,
    /// Members not listened to until the time given (ms).
    distrusted: BTreeMap<[u8; 32], u64>,
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

    /// A set that arrived whole and failed verification or compilation.
    #[cfg(test)]
    pub fn refuse(&mut self, serial: u64, digest: [u8; 32]) {
        self.refused.insert((serial, digest));
    }

    /// The set `from` sent was refused: its offers are ignored for a while.
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

    pub fn on_message(&mut self, from: [u8; 32], msg: Message, now_ms: u64) -> Vec<SyncAction> {
        let mut out = Vec::new();
        match msg {
            Message::PolicyOffer {
                serial,
                length,
                digest,
            } => {
                self.heard.insert(from, (serial, digest));
                self.distrusted.retain(|_, until| *until > now_ms);
                let wanted = supersedes((serial, digest), self.current_id())
                    && length as usize <= MAX_SET_BYTES
                    && !self.refused.contains(&(serial, digest))
                    && !self.distrusted.contains_key(&from)
                    && self
                        .incoming
                        .as_ref()
                        .is_none_or(|t| supersedes((serial, digest), Some((t.serial, t.digest))));
                if wanted {
                    self.incoming = Some(Transfer {
                        from,
                        serial,
                        length,
                        digest,
                        buf: Vec::new(),
                        asked: 0,
                        last_ms: now_ms,
                        retries: 0,
                    });
                    out.push(SyncAction::Send(
                        from,
                        Message::PolicyRequest { serial, offset: 0 },
                    ));
                }
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
                    // Marked refused until the shell installs it, so a bad set is fetched once.
                    if self.refused.len() >= MAX_REFUSED {
                        self.refused.clear();
                    }
                    self.refused.insert((t.serial, t.digest));
                    out.push(SyncAction::Complete {
                        from,
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

    /// Asks again for a stalled transfer, or gives it up (and distrusts its sender for a while).
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<SyncAction> {
        let Some(t) = &mut self.incoming else {
            return Vec::new();
        };
        if now_ms < t.last_ms + STALL_MS {
            return Vec::new();
        }
        if t.retries >= MAX_RETRIES {
            let from = t.from;
            self.incoming = None;
            self.distrust(from, now_ms);
            return Vec::new();
        }
        t.retries += 1;
        t.last_ms = now_ms;
        t.asked = t.buf.len();
        vec![SyncAction::Send(
            t.from,
            Message::PolicyRequest {
                serial: t.serial,
                offset: t.buf.len() as u32,
            },
        )]
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
        let mut push = |from: [u8; 32], acts: Vec<SyncAction>, q: &mut Vec<_>| {
            for act in acts {
                match act {
                    SyncAction::Send(to, m) => q.push((from, to, m)),
                    SyncAction::Complete { encoded, .. } => done = Some(encoded),
                }
            }
        };
        push(A, first, &mut queue);
        let mut now = 0;
        for _ in 0..10_000 {
            now += 10;
            if queue.is_empty() {
                // Let the stall timer speak.
                now += STALL_MS;
                push(B, b.on_tick(now), &mut queue);
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
            push(to, acts, &mut queue);
        }
        (done, stalls)
    }

    fn big(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A node running set 5 (`enc`, digest [9; 32]), and its offer to B.
    fn runs(enc: &[u8]) -> (PolicySync, Vec<SyncAction>) {
        let mut a = PolicySync::default();
        a.set_current(5, enc.to_vec(), [9; 32]);
        let offer = vec![SyncAction::Send(B, a.offer().unwrap())];
        (a, offer)
    }

    #[test]
    fn a_newer_set_is_pulled_whole_across_many_windows() {
        let enc = big(MAX_POLICY_CHUNK_BYTES * 9 + 123);
        let (mut a, offer) = runs(&enc);
        let mut b = PolicySync::default();
        b.set_current(4, vec![1, 2, 3], [8; 32]);
        assert_eq!(run(&mut a, &mut b, offer, |_| false), Some(enc));
        assert_eq!(b.heard.get(&A), Some(&(5, [9; 32])));
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
        let mut a = PolicySync::default();
        a.set_current(5, big(100), [2; 32]);
        let mut b = PolicySync::default();
        b.set_current(5, big(90), [1; 32]);
        let offer = vec![SyncAction::Send(B, a.offer().unwrap())];
        assert_eq!(run(&mut a, &mut b, offer, |_| false), Some(big(100)));
        // The other way round, nothing moves.
        let mut b2 = PolicySync::default();
        b2.set_current(5, big(90), [1; 32]);
        assert!(a.on_message(B, b2.offer().unwrap(), 0).is_empty());
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
        a.set_current(5, big(100), [9; 32]);
        assert_eq!(b.on_message(A, a.offer().unwrap(), now).len(), 1);
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
