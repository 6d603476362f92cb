//! Control messages larger than one datagram, in pieces (PROTOCOL.md §4, "Segments"). Pure.
//!
//! Many firewalls and cloud networks drop IP fragments (RFC 8900), so no control datagram meshd
//! sends is larger than [`DATAGRAM_BYTES`], which crosses any IPv6 path (minimum MTU 1280) without
//! fragmentation. A message that does not fit is cut into segments, each sealed on its own with
//! consecutive counters; the receiver puts them together again. Segment `i` of a message whose
//! first segment was sealed with counter `c` is sealed with counter `c + i`, so the counters name
//! the message: segments of two messages cannot be mixed, and the replay window checks every
//! counter of a whole message before it is acted on.
//!
//! Every segment's plaintext is `u16 index ‖ u16 count ‖ payload`. Reassembly memory is bounded:
//! at most [`MAX_PARTIAL`] messages in progress (at most [`MAX_PARTIAL_PER_SENDER`] from one
//! sender), each at most [`MAX_MESSAGE_BYTES`], each given up after [`REASSEMBLY_MS`].

use crate::control::{ControlError, SEALED_OVERHEAD};
use std::collections::HashMap;

/// Largest control datagram sent: a 1280-byte IPv6 packet less its IPv6 and UDP headers.
pub const DATAGRAM_BYTES: usize = 1232;
/// `u16 index ‖ u16 count`.
pub const SEGMENT_HEADER_LEN: usize = 4;
/// Message bytes carried by one full segment.
pub const SEGMENT_PAYLOAD_BYTES: usize = DATAGRAM_BYTES - SEALED_OVERHEAD - SEGMENT_HEADER_LEN;
/// Largest message, whole.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest number of segments in one message.
pub const MAX_SEGMENTS: usize = MAX_MESSAGE_BYTES.div_ceil(SEGMENT_PAYLOAD_BYTES);
/// Messages being put together at once, over all senders.
pub const MAX_PARTIAL: usize = 256;
/// Messages being put together at once from one sender.
pub const MAX_PARTIAL_PER_SENDER: usize = 8;
/// A message not complete this long after its first segment arrived is given up.
pub const REASSEMBLY_MS: u64 = 5_000;

/// The plaintexts of `message`'s segments, in order (one, for a message that fits).
pub fn split(message: &[u8]) -> Result<Vec<Vec<u8>>, ControlError> {
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(ControlError::TooLarge {
            max: MAX_MESSAGE_BYTES,
        });
    }
    let pieces: Vec<&[u8]> = if message.is_empty() {
        vec![&[]]
    } else {
        message.chunks(SEGMENT_PAYLOAD_BYTES).collect()
    };
    let count = pieces.len() as u16;
    Ok(pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut b = Vec::with_capacity(SEGMENT_HEADER_LEN + p.len());
            b.extend_from_slice(&(i as u16).to_be_bytes());
            b.extend_from_slice(&count.to_be_bytes());
            b.extend_from_slice(p);
            b
        })
        .collect())
}

/// One segment's plaintext, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub index: u16,
    pub count: u16,
    pub payload: &'a [u8],
}

pub fn parse(plain: &[u8]) -> Result<Segment<'_>, ControlError> {
    if plain.len() < SEGMENT_HEADER_LEN {
        return Err(ControlError::Truncated {
            field: "segment header",
            offset: plain.len(),
        });
    }
    let index = u16::from_be_bytes([plain[0], plain[1]]);
    let count = u16::from_be_bytes([plain[2], plain[3]]);
    let invalid = |reason| ControlError::Invalid {
        field: "segment",
        reason,
    };
    if count == 0 || usize::from(count) > MAX_SEGMENTS {
        return Err(invalid("the count is 0 or above the largest message"));
    }
    if index >= count {
        return Err(invalid("the index is not below the count"));
    }
    Ok(Segment {
        index,
        count,
        payload: &plain[SEGMENT_HEADER_LEN..],
    })
}

/// A message put together again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whole {
    /// The counter of its first segment; segment `i` came with `first_counter + i`.
    pub first_counter: u64,
    pub count: u16,
    pub message: Vec<u8>,
}

struct Partial {
    parts: Vec<Option<Vec<u8>>>,
    have: usize,
    bytes: usize,
    started_ms: u64,
}

/// Messages in pieces, by sender and first counter.
#[derive(Default)]
pub struct Reassembly {
    partial: HashMap<([u8; 32], u64), Partial>,
}

impl Reassembly {
    /// Takes segment `plain`, sealed by `sender` with `counter` and already opened. Returns the
    /// whole message once its last missing segment arrives.
    pub fn add(
        &mut self,
        sender: [u8; 32],
        counter: u64,
        plain: &[u8],
        now_ms: u64,
    ) -> Result<Option<Whole>, ControlError> {
        let seg = parse(plain)?;
        if seg.count == 1 {
            return Ok(Some(Whole {
                first_counter: counter,
                count: 1,
                message: seg.payload.to_vec(),
            }));
        }
        let first = counter
            .checked_sub(u64::from(seg.index))
            .ok_or(ControlError::Invalid {
                field: "segment",
                reason: "the counter is below the index",
            })?;
        self.expire(now_ms);
        let key = (sender, first);
        if !self.partial.contains_key(&key) {
            self.make_room(&sender);
            self.partial.insert(
                key,
                Partial {
                    parts: vec![None; usize::from(seg.count)],
                    have: 0,
                    bytes: 0,
                    started_ms: now_ms,
                },
            );
        }
        let p = self.partial.get_mut(&key).expect("inserted above");
        if p.parts.len() != usize::from(seg.count) {
            self.partial.remove(&key);
            return Err(ControlError::Invalid {
                field: "segment",
                reason: "segments of one message disagree on the count",
            });
        }
        let slot = &mut p.parts[usize::from(seg.index)];
        if slot.is_some() {
            return Ok(None);
        }
        if p.bytes + seg.payload.len() > MAX_MESSAGE_BYTES {
            self.partial.remove(&key);
            return Err(ControlError::TooLarge {
                max: MAX_MESSAGE_BYTES,
            });
        }
        *slot = Some(seg.payload.to_vec());
        p.have += 1;
        p.bytes += seg.payload.len();
        if p.have < p.parts.len() {
            return Ok(None);
        }
        let p = self.partial.remove(&key).expect("present");
        let mut message = Vec::with_capacity(p.bytes);
        for part in p.parts.into_iter().flatten() {
            message.extend_from_slice(&part);
        }
        Ok(Some(Whole {
            first_counter: first,
            count: seg.count,
            message,
        }))
    }

    /// Gives up messages older than [`REASSEMBLY_MS`].
    pub fn expire(&mut self, now_ms: u64) {
        self.partial
            .retain(|_, p| now_ms < p.started_ms.saturating_add(REASSEMBLY_MS));
    }

    /// Messages in progress.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Bytes held for messages in progress.
    pub fn bytes(&self) -> usize {
        self.partial.values().map(|p| p.bytes).sum()
    }

    /// Drops the oldest message in progress from `sender` if it has the most allowed, then the
    /// oldest of all if the table is full.
    fn make_room(&mut self, sender: &[u8; 32]) {
        let oldest = |it: &mut dyn Iterator<Item = (&([u8; 32], u64), &Partial)>| {
            it.min_by_key(|(_, p)| p.started_ms).map(|(k, _)| *k)
        };
        let mine = self.partial.keys().filter(|(s, _)| s == sender).count();
        if mine >= MAX_PARTIAL_PER_SENDER {
            if let Some(k) = oldest(&mut self.partial.iter().filter(|((s, _), _)| s == sender)) {
                self.partial.remove(&k);
            }
        }
        if self.partial.len() >= MAX_PARTIAL {
            if let Some(k) = oldest(&mut self.partial.iter()) {
                self.partial.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];

    fn message(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn every_segment_fits_the_datagram_budget_once_sealed() {
        for n in [
            0,
            1,
            SEGMENT_PAYLOAD_BYTES,
            SEGMENT_PAYLOAD_BYTES + 1,
            MAX_MESSAGE_BYTES,
        ] {
            let segs = split(&message(n)).unwrap();
            assert_eq!(segs.len(), n.div_ceil(SEGMENT_PAYLOAD_BYTES).max(1), "{n}");
            for s in &segs {
                assert!(s.len() + SEALED_OVERHEAD <= DATAGRAM_BYTES, "{n}");
            }
        }
        assert!(split(&message(MAX_MESSAGE_BYTES + 1)).is_err());
    }

    #[test]
    fn a_message_that_fits_is_whole_at_once() {
        let mut r = Reassembly::default();
        let segs = split(b"hello").unwrap();
        let w = r.add(A, 77, &segs[0], 0).unwrap().unwrap();
        assert_eq!(
            w,
            Whole {
                first_counter: 77,
                count: 1,
                message: b"hello".to_vec()
            }
        );
        assert!(r.is_empty());
    }

    #[test]
    fn segments_of_two_messages_are_never_mixed() {
        let one = message(3 * SEGMENT_PAYLOAD_BYTES);
        let two: Vec<u8> = one.iter().map(|b| !b).collect();
        let (s1, s2) = (split(&one).unwrap(), split(&two).unwrap());
        let mut r = Reassembly::default();
        // Message one at counters 10..13, message two at 13..16; interleaved.
        assert_eq!(r.add(A, 10, &s1[0], 0).unwrap(), None);
        assert_eq!(r.add(A, 14, &s2[1], 0).unwrap(), None);
        assert_eq!(r.add(A, 11, &s1[1], 0).unwrap(), None);
        assert_eq!(r.add(A, 13, &s2[0], 0).unwrap(), None);
        // The same segment again changes nothing.
        assert_eq!(r.add(A, 11, &s1[1], 0).unwrap(), None);
        let w1 = r.add(A, 12, &s1[2], 0).unwrap().unwrap();
        assert_eq!((w1.first_counter, w1.count, &w1.message), (10, 3, &one));
        let w2 = r.add(A, 15, &s2[2], 0).unwrap().unwrap();
        assert_eq!((w2.first_counter, w2.message), (13, two));
        // Another sender's segment under the same counters is another message.
        assert_eq!(r.add(B, 10, &s1[0], 0).unwrap(), None);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn bad_segments_are_refused() {
        let mut r = Reassembly::default();
        assert!(r.add(A, 1, &[0, 0, 0], 0).is_err(), "short");
        assert!(r.add(A, 1, &[0, 0, 0, 0], 0).is_err(), "count 0");
        assert!(r.add(A, 1, &[0, 2, 0, 2], 0).is_err(), "index = count");
        let too_many = (MAX_SEGMENTS as u16 + 1).to_be_bytes();
        assert!(r.add(A, 1, &[0, 0, too_many[0], too_many[1]], 0).is_err());
        assert!(
            r.add(A, 0, &[0, 1, 0, 2, 9], 0).is_err(),
            "counter below index"
        );
        // Segments of one message that disagree on the count end it.
        assert_eq!(r.add(A, 5, &[0, 0, 0, 3, 1], 0).unwrap(), None);
        assert!(r.add(A, 6, &[0, 1, 0, 2, 1], 0).is_err());
        assert!(r.is_empty());
    }

    #[test]
    fn memory_is_bounded_per_sender_in_all_and_in_time() {
        let mut r = Reassembly::default();
        let first = split(&message(2 * SEGMENT_PAYLOAD_BYTES))
            .unwrap()
            .remove(0);
        // One sender cannot hold more than its share: its oldest messages go first.
        for i in 0..100u64 {
            r.add(A, i * 10, &first, i).unwrap();
        }
        assert_eq!(r.len(), MAX_PARTIAL_PER_SENDER);
        // Many senders cannot hold more than the table.
        for s in 0..MAX_PARTIAL as u16 + 50 {
            let mut sender = [0u8; 32];
            sender[..2].copy_from_slice(&s.to_be_bytes());
            r.add(sender, 1000, &first, 200).unwrap();
        }
        assert_eq!(r.len(), MAX_PARTIAL);
        assert!(r.bytes() <= MAX_PARTIAL * SEGMENT_PAYLOAD_BYTES);
        r.expire(200 + REASSEMBLY_MS);
        assert!(r.is_empty());
    }

    proptest! {
        /// Any order, with duplicates, gives back exactly the message.
        #[test]
        fn any_order_with_duplicates_gives_back_the_message(
            n in 0usize..6 * SEGMENT_PAYLOAD_BYTES,
            order in proptest::collection::vec(0usize..64, 0..40),
            first in 0u64..u64::MAX / 2,
        ) {
            let msg = message(n);
            let segs = split(&msg).unwrap();
            let mut r = Reassembly::default();
            let mut sequence: Vec<usize> = order.iter().map(|i| i % segs.len()).collect();
            sequence.extend(0..segs.len());
            let mut wholes = Vec::new();
            for i in sequence {
                if let Some(w) = r.add(A, first + i as u64, &segs[i], 0).unwrap() {
                    wholes.push(w);
                }
            }
            // Segments repeated after the message is whole can make it whole again: the
            // receiver's replay window refuses that copy, as all its counters were seen.
            prop_assert!(!wholes.is_empty());
            for w in &wholes {
                prop_assert_eq!(&w.message, &msg);
                prop_assert_eq!(w.first_counter, first);
                prop_assert_eq!(usize::from(w.count), segs.len());
            }
        }
    }
}
