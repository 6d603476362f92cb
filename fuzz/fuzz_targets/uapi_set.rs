//! The body of a UAPI `set=1` request (from a local client of the UAPI socket).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = proto::uapi::parse_set(text);
    }
});
