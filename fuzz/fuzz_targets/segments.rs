//! Opened segments as they reach reassembly, from many senders and counters in any order: the
//! reassembly state must stay within its bounds, and a message it gives back is never larger than
//! the largest message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::segment::{Reassembly, MAX_MESSAGE_BYTES, MAX_PARTIAL, MAX_SEGMENTS};

fuzz_target!(|data: &[u8]| {
    let mut r = Reassembly::default();
    let mut now = 0u64;
    // Each record: sender (1 byte), counter (1 byte), time step (1 byte), length (1 byte), bytes.
    let mut rest = data;
    while rest.len() >= 4 {
        let (sender, counter, step, len) = (rest[0], rest[1], rest[2], usize::from(rest[3]));
        rest = &rest[4..];
        let take = len.min(rest.len());
        let (plain, tail) = rest.split_at(take);
        rest = tail;
        now += u64::from(step) * 20;
        if let Ok(Some(w)) = r.add([sender % 16; 32], u64::from(counter), plain, now) {
            assert!(w.message.len() <= MAX_MESSAGE_BYTES);
            assert!(usize::from(w.count) <= MAX_SEGMENTS);
        }
        assert!(r.len() <= MAX_PARTIAL);
        assert!(r.bytes() <= MAX_PARTIAL * MAX_MESSAGE_BYTES);
    }
});
