//! The plaintext of a sealed control message (what an authenticated but hostile peer can send).
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::control::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        assert_eq!(Message::decode(&m.encode()).as_ref(), Ok(&m));
    }
});
