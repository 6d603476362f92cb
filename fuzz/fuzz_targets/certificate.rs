//! Certificates and revocation lists from untrusted bytes: decode, and re-encode what decodes
//! (the encoding is canonical, so it must give back the input).
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::cert::{Certificate, RevocationList};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Certificate::decode(data) {
        assert_eq!(c.encode(), data);
    }
    if let Ok(r) = RevocationList::decode(data) {
        assert_eq!(r.encode(), data);
    }
});
